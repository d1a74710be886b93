//! The client side of Tether's WebSocket transport, as a byte stream: the
//! upgrade request, then an `AsyncRead + AsyncWrite` that carries the
//! length-prefixed frame stream as binary messages (masked, as a client's
//! must be), so that the device `Client` (client.rs) and the load tool run over
//! it unchanged. Ping is answered with Pong; a Close from the gateway ends
//! the stream.
//!
//! Hand-framed with [`crate::wire::ws`], the gateway's own codec, for the
//! same reason as the gateway: the load tool holds thousands of
//! connections per process, and an idle one holds no buffer here (bytes are
//! kept only while in flight).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::wire::ws::{self, Control, Decoder, Framer, PATH, SUBPROTOCOL};

/// Bytes read from the stream per read call (a stack buffer).
const READ_CHUNK: usize = 8 * 1024;
/// The most bytes of the gateway's response head a client reads.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// The largest message the client accepts.
const MAX_MESSAGE: u32 = 64 * 1024 * 1024;

/// A WebSocket connection to a gateway, as a byte stream of
/// length-prefixed Tether frames.
pub struct WsClientIo<S> {
    io: S,
    dec: Decoder,
    framer: Framer,
    /// Bytes read but not yet decoded, from `input_at`.
    input: Vec<u8>,
    input_at: usize,
    /// Bytes for the socket, from `output_at`.
    output: Vec<u8>,
    output_at: usize,
    read_closed: bool,
    close_sent: bool,
}

/// What the upgrade request says beyond the required headers.
#[derive(Debug, Clone, Default)]
pub struct WsRequest {
    /// The `Host` header (required by HTTP/1.1).
    pub host: String,
    /// An `Origin` header, as a browser sends.
    pub origin: Option<String>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClientIo<S> {
    /// Sends the upgrade request for `/tether` over `io` and reads the
    /// gateway's answer.
    ///
    /// # Errors
    /// The gateway refused (the error names its status line and body), its
    /// answer is not a valid `101` for this request, or the socket failed.
    pub async fn connect(mut io: S, req: &WsRequest) -> io::Result<Self> {
        let key_bytes: [u8; 16] = rand::random();
        let key = base64::engine::general_purpose::STANDARD.encode(key_bytes);
        let mut head = format!(
            "GET {PATH} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n",
            req.host
        );
        if let Some(o) = &req.origin {
            head.push_str(&format!("Origin: {o}\r\n"));
        }
        head.push_str("\r\n");
        io.write_all(head.as_bytes()).await?;
        io.flush().await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "closed during the WebSocket upgrade: {}",
                        String::from_utf8_lossy(&buf).trim()
                    ),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let len = match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => continue,
                Ok(httparse::Status::Partial) => {
                    return Err(io::Error::other("the upgrade response head is too large"))
                }
                Err(e) => return Err(io::Error::other(format!("bad upgrade response: {e}"))),
            };
            if resp.code != Some(101) {
                return Err(io::Error::other(format!(
                    "WebSocket upgrade refused: {}",
                    String::from_utf8_lossy(&buf).trim()
                )));
            }
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
            };
            let want = ws::accept_key(&key);
            if header("sec-websocket-accept").as_deref() != Some(want.as_str()) {
                return Err(io::Error::other("wrong Sec-WebSocket-Accept"));
            }
            if header("sec-websocket-protocol").as_deref() != Some(SUBPROTOCOL) {
                return Err(io::Error::other("the gateway did not select tether.v1"));
            }
            let early = buf[len..].to_vec();
            return Ok(Self {
                io,
                dec: Decoder::client(MAX_MESSAGE),
                framer: Framer::default(),
                input: early,
                input_at: 0,
                output: Vec::new(),
                output_at: 0,
                read_closed: false,
                close_sent: false,
            });
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Writes `output` until none is left.
    fn poll_flush_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.output_at < self.output.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.output[self.output_at..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.output_at += n,
            }
        }
        self.output = Vec::new();
        self.output_at = 0;
        Poll::Ready(Ok(()))
    }

    fn queue_control(&mut self, op: u8, payload: &[u8]) {
        if self.close_sent || !self.framer.at_boundary() {
            // Mid-message (the caller's write was cut short): a Pong may
            // be skipped (only the last Ping needs one).
            return;
        }
        if op == ws::op::PONG && self.output_at < self.output.len() {
            // The socket has not taken what is queued: a gateway's Pings
            // do not pile Pongs up behind it.
            return;
        }
        ws::client_frame(&mut self.output, op, payload, rand::random());
        if op == ws::op::CLOSE {
            self.close_sent = true;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsClientIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.input_at < this.input.len() || !this.dec.is_idle() {
                let out = buf.initialize_unfilled();
                let p = this
                    .dec
                    .decode(&this.input[this.input_at..], out)
                    .map_err(|code| io::Error::new(io::ErrorKind::InvalidData, code))?;
                this.input_at += p.used;
                buf.advance(p.wrote);
                if this.input_at >= this.input.len() {
                    this.input = Vec::new();
                    this.input_at = 0;
                }
                let had_control = p.control.is_some();
                match p.control {
                    Some(Control::Ping(payload)) => {
                        this.queue_control(ws::op::PONG, &payload);
                        let _ = this.poll_flush_output(cx);
                    }
                    Some(Control::Pong) => {}
                    Some(Control::Close(code)) => {
                        this.read_closed = true;
                        let code = code.unwrap_or(ws::CloseCode::Normal.as_u16());
                        this.queue_control(ws::op::CLOSE, &code.to_be_bytes());
                        let _ = this.poll_flush_output(cx);
                        return Poll::Ready(Ok(()));
                    }
                    None => {}
                }
                if !buf.filled().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                if had_control {
                    continue;
                }
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.input.extend_from_slice(rb.filled()),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsClientIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_flush_output(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        if this.close_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        this.framer
            .feed_masked(buf, &mut this.output, &mut rand::random::<[u8; 4]>);
        if let Poll::Ready(Err(e)) = this.poll_flush_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_flush_output(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && this.framer.at_boundary() {
            this.queue_control(ws::op::CLOSE, &ws::CloseCode::Normal.as_u16().to_be_bytes());
        }
        match this.poll_flush_output(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut this.io).poll_shutdown(cx),
            other => other,
        }
    }
}
