//! A Rust client for upstream services: push, kick, rooms, presence, and the
//! event stream. One background task owns the socket; requests are matched to
//! responses by request id, so many may be in flight at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::codec::FrameCodec;
use crate::wire::pb::{self, gateway_frame::Body as Out, upstream_frame::Body as In};
use crate::wire::{frame_bytes, Code};

/// How long a request waits for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the gateway's upstream socket is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = std::convert::Infallible;
    /// `unix:/path/to.sock` or `host:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.strip_prefix("unix:") {
            Some(p) => Endpoint::Unix(PathBuf::from(p)),
            None => Endpoint::Tcp(s.to_owned()),
        })
    }
}

/// Connection options.
#[derive(Clone)]
pub struct UpstreamOptions {
    pub secret: String,
    /// Receive events.
    pub subscribe: bool,
    /// Share events with other subscribers of the same group (round robin).
    pub group: String,
    pub name: String,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            secret: crate::config::DEV_UPSTREAM_SECRET.into(),
            subscribe: false,
            group: String::new(),
            name: "tether-client".into(),
        }
    }
}

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection to the gateway closed")]
    Closed,
    #[error("request timed out")]
    Timeout,
    #[error("gateway refused: {code:?}: {message}")]
    Refused { code: Code, message: String },
    #[error("unexpected response: {0}")]
    Protocol(String),
}

struct Req {
    frame: pb::UpstreamFrame,
    reply: oneshot::Sender<Out>,
}

/// Events from the gateway; `None` when the connection closed.
pub type EventStream = mpsc::Receiver<pb::Event>;

/// A connected upstream client. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    tx: mpsc::Sender<Req>,
    node_id: String,
}

impl UpstreamClient {
    /// Connects, authenticates, and (with `subscribe`) returns the event stream.
    ///
    /// # Errors
    /// [`ClientError`] when the socket fails or the gateway refuses the secret.
    pub async fn connect(
        ep: &Endpoint,
        opts: UpstreamOptions,
    ) -> Result<(Self, EventStream), ClientError> {
        match ep {
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Self::over(s, opts).await
            }
            #[cfg(unix)]
            Endpoint::Unix(p) => Self::over(tokio::net::UnixStream::connect(p).await?, opts).await,
            #[cfg(not(unix))]
            Endpoint::Unix(_) => Err(ClientError::Protocol(
                "unix sockets need a unix platform".into(),
            )),
        }
    }

    /// Like [`UpstreamClient::connect`], over an already connected stream.
    ///
    /// # Errors
    /// As [`UpstreamClient::connect`].
    pub async fn over<S>(
        stream: S,
        opts: UpstreamOptions,
    ) -> Result<(Self, EventStream), ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, mut w) = tokio::io::split(stream);
        let mut frames = FramedRead::new(r, FrameCodec::new(64 * 1024 * 1024));
        let hello = pb::UpstreamFrame {
            request_id: 1,
            body: Some(In::Hello(pb::Hello {
                secret: opts.secret,
                subscribe: opts.subscribe,
                group: opts.group,
                name: opts.name,
                protocol_version: 1,
            })),
        };
        w.write_all(&frame_bytes(&hello)).await?;
        let first = tokio::time::timeout(REQUEST_TIMEOUT, frames.next())
            .await
            .map_err(|_| ClientError::Timeout)?
            .ok_or(ClientError::Closed)??;
        let node_id = match pb::GatewayFrame::decode(first)
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .body
        {
            Some(Out::HelloOk(ok)) => ok.node_id,
            Some(Out::Error(e)) => {
                return Err(ClientError::Refused {
                    code: Code::try_from(e.code).unwrap_or(Code::Internal),
                    message: e.message,
                })
            }
            other => {
                return Err(ClientError::Protocol(format!(
                    "expected HelloOk, got {other:?}"
                )))
            }
        };
        let (tx, mut rx) = mpsc::channel::<Req>(1024);
        let (ev_tx, ev_rx) = mpsc::channel::<pb::Event>(65_536);
        tokio::spawn(async move {
            let mut pending: HashMap<u64, oneshot::Sender<Out>> = HashMap::new();
            let mut next_id: u64 = 2;
            loop {
                tokio::select! {
                    req = rx.recv() => {
                        let Some(mut req) = req else { break };
                        let id = next_id;
                        next_id += 1;
                        req.frame.request_id = id;
                        if w.write_all(&frame_bytes(&req.frame)).await.is_err() {
                            break;
                        }
                        pending.insert(id, req.reply);
                    }
                    f = frames.next() => {
                        let Some(Ok(b)) = f else { break };
                        let Ok(frame) = pb::GatewayFrame::decode(b) else { break };
                        match frame.body {
                            Some(Out::Event(ev)) => {
                                // Never block the reader on a slow event consumer.
                                let _ = ev_tx.try_send(ev);
                            }
                            Some(body) => {
                                if let Some(tx) = pending.remove(&frame.request_id) {
                                    let _ = tx.send(body);
                                }
                            }
                            None => {}
                        }
                    }
                }
            }
        });
        Ok((Self { tx, node_id }, ev_rx))
    }

    /// The node that answered Hello.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn call(&self, body: In) -> Result<Out, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Req {
                frame: pb::UpstreamFrame {
                    request_id: 0,
                    body: Some(body),
                },
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(Out::Error(e))) => Err(ClientError::Refused {
                code: Code::try_from(e.code).unwrap_or(Code::Internal),
                message: e.message,
            }),
            Ok(Ok(b)) => Ok(b),
        }
    }

    /// Sends a push.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn push(&self, req: pb::PushRequest) -> Result<pb::PushReply, ClientError> {
        match self.call(In::Push(req)).await? {
            Out::PushReply(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Pushes `payload` to every device of `user`, asking for an undelivered report.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn push_user(
        &self,
        user: &str,
        payload: impl Into<Bytes>,
    ) -> Result<pb::PushReply, ClientError> {
        self.push(pb::PushRequest {
            target: Some(pb::push_request::Target::UserId(user.into())),
            payload: payload.into(),
            report_undelivered: true,
            ..Default::default()
        })
        .await
    }

    /// Pushes `payload` to every session in `room`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn push_room(
        &self,
        room: &str,
        payload: impl Into<Bytes>,
    ) -> Result<pb::PushReply, ClientError> {
        self.push(pb::PushRequest {
            target: Some(pb::push_request::Target::Room(room.into())),
            payload: payload.into(),
            ..Default::default()
        })
        .await
    }

    /// Kicks one device (or every device when `device` is empty) of a user.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn kick(&self, user: &str, device: &str, reason: &str) -> Result<u64, ClientError> {
        self.count(In::Kick(pb::KickRequest {
            user_id: user.into(),
            device_id: device.into(),
            code: Code::Kicked as i32,
            reason: reason.into(),
        }))
        .await
    }

    /// Adds (or with `remove`, removes) the live sessions of `users` to `room`.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn room(&self, room: &str, users: &[&str], remove: bool) -> Result<u64, ClientError> {
        self.count(In::Room(pb::RoomRequest {
            room: room.into(),
            user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            remove,
        }))
        .await
    }

    async fn count(&self, body: In) -> Result<u64, ClientError> {
        match self.call(body).await? {
            Out::CountReply(r) => Ok(r.sessions),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Which devices of `users` are online, and where.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn presence(&self, users: &[&str]) -> Result<Vec<pb::UserPresence>, ClientError> {
        match self
            .call(In::Presence(pb::PresenceRequest {
                user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            }))
            .await?
        {
            Out::PresenceReply(r) => Ok(r.users),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Round trip to the gateway.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self
            .call(In::Ping(pb::Ping {
                client_time_ms: crate::unix_ms(),
            }))
            .await?
        {
            Out::Pong(_) => Ok(()),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }
}
