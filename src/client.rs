//! A small device client over TCP, TLS or any byte stream: the `tether client`
//! command, the integration tests and the load tool use it. It speaks the
//! protocol documented in docs/PROTOCOL.md and nothing more.

use std::io;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::FramedRead;

use crate::upstream::FrameCodec;
use crate::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
use crate::wire::{frame_bytes, Code};

/// Any byte stream a client can run over.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ClientIo for T {}

/// A device's connection to the gateway.
pub struct Client {
    frames: FramedRead<ReadHalf<Box<dyn ClientIo>>, FrameCodec>,
    w: WriteHalf<Box<dyn ClientIo>>,
    next_id: u64,
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
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self::over(s))
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
        let cfg = crate::tls::client_config_pinned(ca).map_err(io::Error::other)?;
        let name = crate::tls::server_name(server_name).map_err(io::Error::other)?;
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, s)
            .await?;
        Ok(Self::over(tls))
    }

    /// Wraps an already connected stream.
    pub fn over(io: impl ClientIo) -> Self {
        let boxed: Box<dyn ClientIo> = Box::new(io);
        let (r, w) = tokio::io::split(boxed);
        Self {
            frames: FramedRead::new(r, FrameCodec::new(64 * 1024 * 1024)),
            w,
            next_id: 1,
        }
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
        match self.frames.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e),
            Some(Ok(b)) => pb::ServerFrame::decode(b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
        }
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
