//! WebSocket over a byte stream, after the upgrade: a [`Wire`] that turns
//! the peer's binary messages into the length-prefixed frame stream the
//! link reads, and the link's frames into binary messages
//! ([`crate::wire::ws`] does the framing). It answers Pings and Closes
//! itself; the link never sees a WebSocket frame.
//!
//! Its buffers hold bytes only while they are in flight, as the TLS wire's
//! do (tls.rs): input the link's buffer could not take yet, a fragmented
//! message or a control frame partly in, frame headers and control frames
//! the socket has not taken. An idle WebSocket connection holds none of
//! them, and parks as a plain-TCP one does (park.rs), keeping only its
//! message size limit.
//!
//! The upgrade itself (the HTTP request before this wire exists) is
//! upgrade.rs's.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use crate::wire::ws::{self, Control, Decoder, Framer};

use super::link::Outputs;
use super::Wire;

/// Bytes read from the stream per read call (a stack buffer).
const READ_CHUNK: usize = 8 * 1024;
/// A body slice at least this long goes out as a slice of its own (on a
/// stream that takes `writev`), not copied behind its header.
const DIRECT: usize = 512;

/// A WebSocket connection over `S` (a TCP socket, TLS over one, or while
/// parked its socket answering in place).
pub struct WsStream<S> {
    io: S,
    dec: Decoder,
    framer: Framer,
    /// Input read but not yet decoded (the link's buffer was full, or a
    /// control frame stopped the decoder), from `input_at`.
    input: Vec<u8>,
    input_at: usize,
    /// Bytes for the socket: message headers, copied bodies, control
    /// frames, from `output_at`.
    output: Vec<u8>,
    output_at: usize,
    /// The Pong owed for the last Ping, while a message is going out (a
    /// control frame goes out only between messages).
    pong: Option<Vec<u8>>,
    /// The peer's Close came, or a frame was refused: reads end.
    read_closed: bool,
    /// The refusal's code, returned as an error by every later read.
    refused: Option<ws::CloseCode>,
    /// Our Close is queued: nothing more goes out after it.
    close_sent: bool,
}

impl<S> WsStream<S> {
    /// A connection whose upgrade is done; `early` holds bytes the peer
    /// sent behind its upgrade request (its first frames).
    pub fn new(io: S, early: Vec<u8>, max_message: u32) -> Self {
        Self {
            io,
            dec: Decoder::server(max_message),
            framer: Framer::default(),
            input: early,
            input_at: 0,
            output: Vec::new(),
            output_at: 0,
            pong: None,
            read_closed: false,
            refused: None,
            close_sent: false,
        }
    }

    /// Whether nothing is in flight: nothing partly decoded or unread, no
    /// frame partly handed over by the link, nothing unwritten, no close
    /// begun. Only such a connection may park.
    pub fn is_quiet(&self) -> bool {
        self.dec.is_idle()
            && self.framer.is_idle()
            && self.input_at >= self.input.len()
            && self.output_at >= self.output.len()
            && self.pong.is_none()
            && !self.read_closed
            && !self.close_sent
    }

    /// The stream, and the connection without it (to be joined to it
    /// again with [`WsStream::map_io`]). A quiet connection that parks
    /// keeps neither: it is made anew over its socket when it unparks
    /// (see park.rs), as it holds nothing but its limit.
    pub fn split(self) -> (S, WsStream<()>) {
        let io = self.io;
        (
            io,
            WsStream {
                io: (),
                dec: self.dec,
                framer: self.framer,
                input: self.input,
                input_at: self.input_at,
                output: self.output,
                output_at: self.output_at,
                pong: self.pong,
                read_closed: self.read_closed,
                refused: self.refused,
                close_sent: self.close_sent,
            },
        )
    }

    /// The same connection over another stream, its state kept.
    pub fn map_io<T>(self, f: impl FnOnce(S) -> T) -> WsStream<T> {
        let (io, rest) = self.split();
        WsStream {
            io: f(io),
            dec: rest.dec,
            framer: rest.framer,
            input: rest.input,
            input_at: rest.input_at,
            output: rest.output,
            output_at: rest.output_at,
            pong: rest.pong,
            read_closed: rest.read_closed,
            refused: rest.refused,
            close_sent: rest.close_sent,
        }
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    pub fn io_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Queues a Pong, or keeps it for later: while a message is half
    /// written (a control frame goes out only between messages), and while
    /// the socket has not taken what is queued. Only the last Ping needs
    /// its Pong (RFC 6455, 5.5.3), so a peer that sends Pings and reads
    /// nothing grows nothing here: one Pong waits, the newest.
    fn queue_pong(&mut self, payload: Vec<u8>) {
        if self.close_sent {
            return;
        }
        self.pong = Some(payload);
        self.release_pong();
    }

    fn queue_close(&mut self, code: u16) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        // A close cuts a message the link is in the middle of: nothing
        // more of it goes out after the Close.
        ws::close(&mut self.output, code);
    }

    /// A Pong kept for later goes out once a message is not half written
    /// and the socket has taken everything queued before it.
    fn release_pong(&mut self) {
        if self.framer.at_boundary() && self.output_at >= self.output.len() {
            if let Some(p) = self.pong.take() {
                ws::pong(&mut self.output, &p);
            }
        }
    }
}

impl<S: Wire> WsStream<S> {
    /// Writes `output` until none is left; `Pending` when the socket is
    /// full (its waker is registered).
    fn poll_flush_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.output_at < self.output.len() {
            match self.io.poll_write(0, cx, &self.output[self.output_at..]) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.output_at += n,
            }
        }
        // Nothing kept while nothing is in flight.
        self.output = Vec::new();
        self.output_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Decodes what `input` holds into `buf`. True when `buf` got bytes or
    /// the input ended (the peer's Close).
    fn decode_input(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> io::Result<bool> {
        loop {
            let out = buf.initialize_unfilled();
            if out.is_empty() {
                return Ok(true);
            }
            let p = match self.dec.decode(&self.input[self.input_at..], out) {
                Ok(p) => p,
                Err(code) => return Err(self.refuse(cx, code)),
            };
            self.input_at += p.used;
            buf.advance(p.wrote);
            if self.input_at >= self.input.len() {
                self.input = Vec::new();
                self.input_at = 0;
            }
            match p.control {
                None => return Ok(!buf.filled().is_empty()),
                Some(Control::Pong) => {}
                Some(Control::Ping(payload)) => {
                    self.queue_pong(payload);
                    // Best effort; the next write or flush finishes it.
                    if let Poll::Ready(Err(e)) = self.poll_flush_output(cx) {
                        return Err(e);
                    }
                }
                Some(Control::Close(code)) => {
                    self.read_closed = true;
                    self.queue_close(code.unwrap_or(ws::CloseCode::Normal.as_u16()));
                    if let Poll::Ready(Err(e)) = self.poll_flush_output(cx) {
                        return Err(e);
                    }
                    self.input = Vec::new();
                    self.input_at = 0;
                    return Ok(true);
                }
            }
        }
    }

    /// Closes with `code` (best effort: one try to write the Close) and
    /// ends reading; the error the read returns.
    fn refuse(&mut self, cx: &mut Context<'_>, code: ws::CloseCode) -> io::Error {
        self.read_closed = true;
        self.refused = Some(code);
        self.input = Vec::new();
        self.input_at = 0;
        self.queue_close(code.as_u16());
        let _ = self.poll_flush_output(cx);
        let label = match code {
            ws::CloseCode::Protocol => "1002",
            ws::CloseCode::Unsupported => "1003",
            ws::CloseCode::Policy => "1008",
            ws::CloseCode::TooBig => "1009",
            ws::CloseCode::Normal => "1000",
        };
        metrics::counter!(crate::metrics::WS_CLOSES, "code" => label).increment(1);
        io::Error::new(io::ErrorKind::InvalidData, code)
    }
}

impl<S: Wire> Wire for WsStream<S> {
    fn outputs(&self) -> Outputs {
        Outputs::One
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(code) = self.refused {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, code)));
            }
            if self.read_closed {
                // End of stream: nothing filled.
                return Poll::Ready(Ok(()));
            }
            if self.decode_input(cx, buf)? {
                return Poll::Ready(Ok(()));
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut stack);
            match self.io.poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    if self.dec.is_idle() && self.input.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(())) => self.input.extend_from_slice(rb.filled()),
            }
        }
    }

    fn poll_write(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(out, cx, &[IoSlice::new(buf)])
    }

    /// Headers and short bodies are copied into one buffer; on a stream
    /// that takes `writev`, a long body goes out as a slice of its own
    /// behind them.
    fn poll_write_vectored(
        &mut self,
        _out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.poll_flush_output(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.close_sent {
            // After our Close nothing may follow: what the link still
            // writes is dropped.
            return Poll::Ready(Ok(total));
        }
        let direct = self.io.vectored(0);
        let mut used = 0;
        for b in bufs {
            let mut s: &[u8] = b;
            while !s.is_empty() {
                if self.framer.at_boundary() {
                    self.release_pong();
                    let n = self.framer.take_prefix(s, &mut self.output);
                    used += n;
                    s = &s[n..];
                    continue;
                }
                let n = self.framer.body_left().min(s.len());
                if !direct || n < DIRECT {
                    self.output.extend_from_slice(&s[..n]);
                    self.framer.body_sent(n);
                    used += n;
                    s = &s[n..];
                    continue;
                }
                // Whatever is queued goes first, then the body itself.
                let queued = self.output.len() - self.output_at;
                let iov = [
                    IoSlice::new(&self.output[self.output_at..]),
                    IoSlice::new(&s[..n]),
                ];
                let wrote = match self.io.poll_write_vectored(0, cx, &iov) {
                    // The socket is full (its waker is registered): the
                    // rest of this body is the link's again.
                    Poll::Pending if used == 0 => return Poll::Pending,
                    Poll::Pending => return Poll::Ready(Ok(used)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(w)) => w,
                };
                let from_output = wrote.min(queued);
                self.output_at += from_output;
                let body = wrote - from_output;
                self.framer.body_sent(body);
                used += body;
                s = &s[body..];
            }
        }
        self.release_pong();
        // The bytes are ours now: what the socket does not take goes out
        // on the next write or flush (its waker is registered).
        if let Poll::Ready(Err(e)) = self.poll_flush_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(used))
    }

    fn vectored(&self, _out: usize) -> bool {
        self.io.vectored(0)
    }

    fn poll_flush(&mut self, _out: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.release_pong();
        match self.poll_flush_output(cx) {
            Poll::Ready(Ok(())) => self.io.poll_flush(0, cx),
            other => other,
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.queue_close(ws::CloseCode::Normal.as_u16());
        match self.poll_flush_output(cx) {
            Poll::Ready(Ok(())) => self.io.poll_shutdown(cx),
            other => other,
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.io.peer_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::poll_fn;

    use tokio::io::AsyncWriteExt;

    use crate::wire::ws::{client_frame, op};

    /// A peer that sends Pings and reads nothing: the socket fills, and the
    /// Pongs owed stay one, the newest.
    #[tokio::test]
    async fn pings_from_a_peer_that_does_not_read_grow_nothing() {
        let (server, mut peer) = tokio::io::duplex(256);
        let mut ws = WsStream::new(server, Vec::new(), 1024);
        let mut pings = Vec::new();
        for i in 0..2000u32 {
            client_frame(&mut pings, op::PING, &i.to_be_bytes(), [1, 2, 3, 4]);
        }
        let feed = tokio::spawn(async move {
            peer.write_all(&pings).await.unwrap();
            peer
        });
        let mut most = 0;
        loop {
            let mut buf = [0u8; 64];
            let mut rb = ReadBuf::new(&mut buf);
            let r = poll_fn(|cx| match ws.poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Ready(None),
                Poll::Ready(r) => Poll::Ready(Some(r)),
            })
            .await;
            most = most.max(ws.output.len() - ws.output_at);
            assert!(r.is_none(), "only Pings came: {r:?}");
            if feed.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _peer = feed.await.unwrap();
        assert!(most <= 2 * (2 + 125), "{most} bytes of Pongs queued");
        assert!(ws.pong.is_some(), "the newest Pong waits for room");
    }
}
