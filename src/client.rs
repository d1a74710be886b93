//! A small device client over TCP, TLS, WebSocket, QUIC or any byte stream: the
//! `tether client` command, the integration tests and the load tool use it.
//! It speaks the protocol documented in docs/PROTOCOL.md and nothing more.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;

use crate::upstream::FrameCodec;
use crate::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use crate::wire::{frame_bytes, Code};

/// Any byte stream a client can run over.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClientIo for T {}

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The largest frame the client accepts.
const MAX_FRAME: usize = 64 * 1024 * 1024;

/// A device's connection to the gateway.
pub struct Client {
    frames: FramedRead<Reader, FrameCodec>,
    w: Writer,
    next_id: u64,
    /// Over QUIC: the connection and the bulk stream.
    quic: Option<Box<QuicParts>>,
}

struct QuicParts {
    conn: quinn::Connection,
    /// The gateway's bulk stream, once it opened it (with its first push).
    bulk: Option<FramedRead<quinn::RecvStream, FrameCodec>>,
    /// The bulk stream ended (the gateway finished it).
    bulk_done: bool,
    /// The bulk stream is not read (tests: a device that stalls it).
    bulk_paused: bool,
    /// Whether the login went out as 0-RTT data, and the server's verdict.
    zero_rtt: Option<quinn::ZeroRttAccepted>,
}

/// How long a connect waits for the gateway's answer by default: QUIC's
/// handshake, or TCP's and TLS's in `tether client`. Without a bound, a QUIC
/// connect to an address where nothing listens waits for QUIC's idle
/// timeout with nothing to show (UDP has no "connection refused").
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes QUIC connections from one UDP socket, remembering TLS sessions so
/// that a reconnect can log in with 0-RTT data.
pub struct QuicConnector {
    endpoint: quinn::Endpoint,
    /// The bound on a connect: handshake and the client's stream.
    timeout: Duration,
}

impl QuicConnector {
    /// A connector on an ephemeral UDP port of `bind` (e.g. `127.0.0.1:0`),
    /// trusting only the certificates in `ca`.
    ///
    /// # Errors
    /// The socket cannot be bound, or `ca` cannot be read.
    pub fn new(bind: std::net::SocketAddr, ca: &Path) -> io::Result<Self> {
        Self::with_transport(bind, ca, |_| {})
    }

    /// Like [`QuicConnector::new`], with the QUIC transport settings
    /// changed by `tweak` (tests: a client that allows no unidirectional
    /// stream, as a minimal QUIC stack might).
    ///
    /// # Errors
    /// As [`QuicConnector::new`].
    pub fn with_transport(
        bind: std::net::SocketAddr,
        ca: &Path,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> io::Result<Self> {
        let tls = crate::tls::client_config_pinned(ca).map_err(io::Error::other)?;
        let defaults = crate::config::Config::default();
        let mut transport = crate::quic::transport_config(&defaults, true);
        tweak(&mut transport);
        let mut cfg = crate::quic::client_config(&defaults, tls).map_err(io::Error::other)?;
        cfg.transport_config(std::sync::Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(cfg);
        Ok(Self {
            endpoint,
            timeout: CONNECT_TIMEOUT,
        })
    }

    /// Bounds each [`QuicConnector::connect`] by `timeout` instead of
    /// [`CONNECT_TIMEOUT`].
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The local UDP address.
    ///
    /// # Errors
    /// The socket is gone.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Moves every connection of this connector to a new UDP socket on
    /// `bind` (what a phone does when it changes networks); returns its
    /// address. The connections migrate: no reconnect.
    ///
    /// # Errors
    /// The new socket cannot be bound.
    pub fn rebind(&self, bind: std::net::SocketAddr) -> io::Result<std::net::SocketAddr> {
        let socket = std::net::UdpSocket::bind(bind)?;
        let addr = socket.local_addr()?;
        self.endpoint.rebind(socket)?;
        Ok(addr)
    }

    /// Connects to `addr`, verifying `server_name`. With `early`, and a TLS
    /// session remembered from an earlier connection, the connection is
    /// usable at once and what is sent before the handshake completes goes
    /// as 0-RTT data ([`Client::zero_rtt_accepted`] tells whether the
    /// gateway took it).
    ///
    /// # Errors
    /// Connection or handshake failures; [`io::ErrorKind::TimedOut`] when
    /// the gateway does not answer within the connect timeout
    /// ([`CONNECT_TIMEOUT`] unless set with
    /// [`QuicConnector::with_connect_timeout`]).
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        server_name: &str,
        early: bool,
    ) -> io::Result<Client> {
        match tokio::time::timeout(self.timeout, self.connect_now(addr, server_name, early)).await
        {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no QUIC answer from {addr} within {} (is the gateway listening on UDP {addr}?)",
                    humantime::format_duration(self.timeout)
                ),
            )),
        }
    }

    /// [`QuicConnector::connect`] without its bound.
    async fn connect_now(
        &self,
        addr: std::net::SocketAddr,
        server_name: &str,
        early: bool,
    ) -> io::Result<Client> {
        let connecting = self
            .endpoint
            .connect(addr, server_name)
            .map_err(io::Error::other)?;
        let (conn, zero_rtt) = if early {
            match connecting.into_0rtt() {
                Ok((c, accepted)) => (c, Some(accepted)),
                Err(connecting) => (connecting.await.map_err(io::Error::other)?, None),
            }
        } else {
            (connecting.await.map_err(io::Error::other)?, None)
        };
        let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        Ok(Client {
            frames: FramedRead::new(Box::new(recv), FrameCodec::new(MAX_FRAME)),
            w: Box::new(send),
            next_id: 1,
            quic: Some(Box::new(QuicParts {
                conn,
                bulk: None,
                bulk_done: false,
                bulk_paused: false,
                zero_rtt,
            })),
        })
    }
}

/// What can go wrong in [`Client::login`].
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("login refused: {code:?}: {message}")]
    Refused { code: Code, message: String },
    #[error("connection closed before the login reply")]
    Closed,
    #[error("unexpected frame: {0:?}")]
    Unexpected(Box<pb::ServerFrame>),
}

impl Client {
    /// Connects over plain TCP.
    ///
    /// # Errors
    /// Connection failures.
    pub async fn connect_tcp(addr: impl tokio::net::ToSocketAddrs) -> io::Result<Self> {
        Ok(Self::over(tcp_stream(addr).await?))
    }

    /// Connects over TLS 1.3, trusting only the certificates in `ca` (e.g. the
    /// gateway's development certificate), verifying `server_name`.
    ///
    /// # Errors
    /// Connection, certificate or handshake failures.
    pub async fn connect_tls(
        addr: impl tokio::net::ToSocketAddrs,
        server_name: &str,
        ca: &Path,
    ) -> io::Result<Self> {
        Ok(Self::over(tls_stream(addr, server_name, ca).await?))
    }

    /// Connects over WebSocket (`ws://addr/tether`), with `req`'s `Host`
    /// and `Origin`.
    ///
    /// # Errors
    /// Connection failures, or the gateway refused the upgrade (the error
    /// says its status).
    pub async fn connect_ws(
        addr: impl tokio::net::ToSocketAddrs,
        req: &crate::ws_client::WsRequest,
    ) -> io::Result<Self> {
        let s = tcp_stream(addr).await?;
        Ok(Self::over(
            crate::ws_client::WsClientIo::connect(s, req).await?,
        ))
    }

    /// Connects over WebSocket over TLS (`wss://addr/tether`), trusting only
    /// the certificates in `ca`, verifying `server_name`.
    ///
    /// # Errors
    /// Connection, certificate or handshake failures, or a refused upgrade.
    pub async fn connect_wss(
        addr: impl tokio::net::ToSocketAddrs,
        server_name: &str,
        ca: &Path,
        req: &crate::ws_client::WsRequest,
    ) -> io::Result<Self> {
        let tls = tls_stream(addr, server_name, ca).await?;
        Ok(Self::over(
            crate::ws_client::WsClientIo::connect(tls, req).await?,
        ))
    }

    /// Connects over QUIC from a new UDP socket (see [`QuicConnector`] to
    /// share one, to rebind it, or for 0-RTT), waiting at most `timeout`
    /// for the gateway's answer.
    ///
    /// # Errors
    /// Connection, certificate or handshake failures;
    /// [`io::ErrorKind::TimedOut`] past `timeout`.
    pub async fn connect_quic(
        addr: std::net::SocketAddr,
        server_name: &str,
        ca: &Path,
        timeout: Duration,
    ) -> io::Result<Self> {
        let bind = if addr.is_ipv4() {
            std::net::SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            std::net::SocketAddr::from(([0u16; 8], 0))
        };
        QuicConnector::new(bind, ca)?
            .with_connect_timeout(timeout)
            .connect(addr, server_name, false)
            .await
    }

    /// Wraps an already connected stream.
    pub fn over(io: impl ClientIo) -> Self {
        let boxed: Box<dyn ClientIo> = Box::new(io);
        let (r, w) = tokio::io::split(boxed);
        Self {
            frames: FramedRead::new(Box::new(r), FrameCodec::new(MAX_FRAME)),
            w: Box::new(w),
            next_id: 1,
            quic: None,
        }
    }

    /// Over QUIC, whether the login went out as 0-RTT data and was
    /// accepted: `None` when 0-RTT was not tried (no remembered session, or
    /// not asked); otherwise waits for the handshake.
    pub async fn zero_rtt_accepted(&mut self) -> Option<bool> {
        let z = self.quic.as_mut()?.zero_rtt.take()?;
        Some(z.await)
    }

    /// Over QUIC, stops (or resumes) reading the bulk stream: its
    /// flow-control window then fills and the gateway's bulk writes stall,
    /// as with a device that reads bulk data slowly.
    pub fn pause_bulk(&mut self, paused: bool) {
        if let Some(q) = self.quic.as_mut() {
            q.bulk_paused = paused;
        }
    }

    /// Over QUIC, the next frame of the bulk stream only (whether or not
    /// it is paused); `Ok(None)` once it ended or over TCP. With the bulk
    /// stream paused, [`Client::recv`] reads only the other stream: a
    /// device can then take bulk pushes at its own pace.
    ///
    /// # Errors
    /// Read failures and undecodable frames.
    pub async fn recv_bulk(&mut self) -> io::Result<Option<pb::ServerFrame>> {
        let Some(q) = self.quic.as_deref_mut() else {
            return Ok(None);
        };
        if q.bulk_done {
            return Ok(None);
        }
        let next = next_bulk(q).await;
        if next.is_none() {
            q.bulk_done = true;
        }
        decode_next(next)
    }

    /// Over QUIC, the connection (tests look at its addresses and stats).
    pub fn quic_connection(&self) -> Option<&quinn::Connection> {
        self.quic.as_ref().map(|q| &q.conn)
    }

    /// Ends the sending side (TCP: shutdown; QUIC: FIN on the stream).
    ///
    /// # Errors
    /// Write failures.
    pub async fn finish(&mut self) -> io::Result<()> {
        self.w.shutdown().await
    }

    /// Sends a request with a fresh request id; returns the id.
    ///
    /// # Errors
    /// Write failures.
    pub async fn request(&mut self, body: Req) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(pb::ClientFrame {
            request_id: id,
            body: Some(body),
        })
        .await?;
        Ok(id)
    }

    /// Sends one frame as is.
    ///
    /// # Errors
    /// Write failures.
    pub async fn send(&mut self, frame: pb::ClientFrame) -> io::Result<()> {
        self.send_raw(&frame_bytes(&frame)).await
    }

    /// Writes raw bytes (tests use it for malformed input).
    ///
    /// # Errors
    /// Write failures.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes).await?;
        self.w.flush().await
    }

    /// The next frame; `Ok(None)` when the gateway closed the connection.
    ///
    /// # Errors
    /// Read failures and undecodable frames.
    pub async fn recv(&mut self) -> io::Result<Option<pb::ServerFrame>> {
        let next = match self.quic.as_deref_mut() {
            None => self.frames.next().await,
            Some(q) => {
                let frames = &mut self.frames;
                loop {
                    tokio::select! {
                        f = frames.next() => break f,
                        b = next_bulk(q), if !q.bulk_done && !q.bulk_paused => match b {
                            Some(f) => break Some(f),
                            None => q.bulk_done = true,
                        },
                    }
                }
            }
        };
        decode_next(next)
    }

    /// Like [`Client::recv`], giving up after `d`.
    ///
    /// # Errors
    /// `TimedOut` after `d`, and as [`Client::recv`].
    pub async fn recv_timeout(&mut self, d: Duration) -> io::Result<Option<pb::ServerFrame>> {
        tokio::time::timeout(d, self.recv())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no frame in time"))?
    }

    /// Logs in with protocol version 1 and waits for the reply.
    ///
    /// # Errors
    /// [`LoginError::Refused`] with the gateway's code, or transport errors.
    pub async fn login(&mut self, token: &str, device: &str) -> Result<pb::LoginOk, LoginError> {
        self.login_with(pb::Login {
            token: token.into(),
            device_id: device.into(),
            platform: pb::Platform::Desktop as i32,
            protocol_version: 1,
            resume: None,
        })
        .await
    }

    /// Logs in with a caller-built Login.
    ///
    /// # Errors
    /// As [`Client::login`].
    pub async fn login_with(&mut self, login: pb::Login) -> Result<pb::LoginOk, LoginError> {
        let id = self.request(Req::Login(login)).await?;
        let f = self.recv().await?.ok_or(LoginError::Closed)?;
        match f.body {
            Some(Resp::LoginOk(ok)) if f.request_id == id => Ok(ok),
            Some(Resp::Error(e)) if f.request_id == id => Err(LoginError::Refused {
                code: Code::try_from(e.code).unwrap_or(Code::Internal),
                message: e.message,
            }),
            Some(Resp::Close(c)) => Err(LoginError::Refused {
                code: Code::try_from(c.code).unwrap_or(Code::Internal),
                message: c.reason,
            }),
            _ => Err(LoginError::Unexpected(Box::new(f))),
        }
    }

    /// Sends an uplink message; returns the request id.
    ///
    /// # Errors
    /// Write failures.
    pub async fn send_up(
        &mut self,
        client_msg_id: &str,
        route: &str,
        payload: impl Into<Bytes>,
    ) -> io::Result<u64> {
        self.request(Req::Send(pb::Send {
            client_msg_id: client_msg_id.into(),
            route: route.into(),
            payload: payload.into(),
        }))
        .await
    }

    /// Sends a Ping; returns the request id.
    ///
    /// # Errors
    /// Write failures.
    pub async fn ping(&mut self) -> io::Result<u64> {
        self.request(Req::Ping(pb::Ping {
            client_time_ms: crate::unix_ms(),
        }))
        .await
    }

    /// Joins a room; returns the request id.
    ///
    /// # Errors
    /// Write failures.
    pub async fn join(&mut self, room: &str) -> io::Result<u64> {
        self.request(Req::Join(pb::Join { room: room.into() }))
            .await
    }

    /// Acknowledges every interactive push up to `seq`.
    ///
    /// # Errors
    /// Write failures.
    pub async fn ack(&mut self, seq: u64) -> io::Result<()> {
        self.ack_lane(pb::Lane::Interactive, seq).await
    }

    /// Acknowledges every push of `lane` up to `seq`.
    ///
    /// # Errors
    /// Write failures.
    pub async fn ack_lane(&mut self, lane: pb::Lane, seq: u64) -> io::Result<()> {
        self.send(pb::ClientFrame {
            request_id: 0,
            body: Some(Req::Ack(pb::Ack {
                up_to_seq: seq,
                lane: lane as i32,
                ranges: Vec::new(),
            })),
        })
        .await
    }
}

/// A frame read from a stream, decoded; `Ok(None)` at the stream's end.
fn decode_next(next: Option<io::Result<Bytes>>) -> io::Result<Option<pb::ServerFrame>> {
    match next {
        None => Ok(None),
        Some(Err(e)) => Err(e),
        Some(Ok(b)) => pb::ServerFrame::decode(b)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
    }
}

/// The next frame of the gateway's bulk stream, accepting the stream first;
/// `None` once it ended (or the connection did).
async fn next_bulk(q: &mut QuicParts) -> Option<io::Result<Bytes>> {
    if q.bulk.is_none() {
        let s = q.conn.accept_uni().await.ok()?;
        q.bulk = Some(FramedRead::new(s, FrameCodec::new(MAX_FRAME)));
    }
    q.bulk.as_mut()?.next().await
}

/// A TCP connection to `addr`, with Nagle off (frames go out as written).
async fn tcp_stream(addr: impl tokio::net::ToSocketAddrs) -> io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A TLS connection to `addr`, trusting only the certificates in `ca` and
/// verifying `server_name`.
async fn tls_stream(
    addr: impl tokio::net::ToSocketAddrs,
    server_name: &str,
    ca: &Path,
) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let cfg = crate::tls::client_config_pinned(ca).map_err(io::Error::other)?;
    let name = crate::tls::server_name(server_name).map_err(io::Error::other)?;
    let s = tcp_stream(addr).await?;
    tokio_rustls::TlsConnector::from(cfg).connect(name, s).await
}
