//! A Rust client for upstream services: push, kick, rooms, presence, and the
//! event stream. Two background tasks own the socket: a reader that never
//! waits on anything but the socket (replies go to their callers, events to a
//! bounded buffer), and a writer that sends requests. Reading never waits on
//! a write, so a flood of events cannot deadlock the client against a gateway
//! that is itself waiting for the client to read. Requests are matched to
//! replies by request id, so many may be in flight at once; a request whose
//! caller gave up (timeout or drop) is forgotten at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::codec::FrameCodec;
use crate::wire::pb::{self, gateway_frame::Body as Out, upstream_frame::Body as In};
use crate::wire::{frame_bytes, Code};

/// How long a request waits for its response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Events the client buffers for its [`EventStream`] at most.
pub const EVENT_BUFFER: usize = 65_536;
/// Bytes of events (as framed on the wire) the client buffers for its
/// [`EventStream`] at most. When the caller reads events more slowly than
/// they arrive, newer events are dropped, counted
/// ([`UpstreamClient::events_dropped`]) and logged, and the socket keeps
/// being read, so replies still arrive.
pub const EVENT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
/// Requests queued for the writer task.
const WRITE_QUEUE: usize = 1024;

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

/// Requests awaiting their reply, by request id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Out>>>>;

/// Counters shared by the reader task, the client and the event stream.
#[derive(Default)]
struct EventStats {
    /// Bytes of the events in the buffer.
    bytes: AtomicUsize,
    /// Events dropped because the buffer was full.
    dropped: AtomicU64,
}

/// Events from the gateway, buffered up to [`EVENT_BUFFER`] events and
/// [`EVENT_BUFFER_BYTES`] bytes; `recv` gives `None` when the connection
/// closed. Events that arrive while the buffer is full are dropped and
/// counted ([`EventStream::dropped`]).
pub struct EventStream {
    rx: mpsc::Receiver<(pb::Event, usize)>,
    stats: Arc<EventStats>,
}

impl EventStream {
    /// The next event; `None` once the connection closed and the buffer is
    /// empty.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is taken from the buffer only when returned.
    pub async fn recv(&mut self) -> Option<pb::Event> {
        let (ev, len) = self.rx.recv().await?;
        self.stats.bytes.fetch_sub(len, Ordering::AcqRel);
        Some(ev)
    }

    /// Events dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }
}

/// A connected upstream client. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    tx: mpsc::Sender<Bytes>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    stats: Arc<EventStats>,
    /// Cancelled when either background task ends: the connection is over.
    closed: CancellationToken,
    node_id: String,
}

/// Removes a request's entry from the pending map when its caller is done
/// with it: replied, timed out, or dropped mid-wait.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.id);
    }
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
        let (tx, rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_BUFFER);
        let pending: Pending = Arc::default();
        let stats = Arc::new(EventStats::default());
        let closed = CancellationToken::new();
        tokio::spawn(write_requests(rx, w, closed.clone()));
        tokio::spawn(read_frames(
            frames,
            pending.clone(),
            ev_tx,
            stats.clone(),
            closed.clone(),
        ));
        let client = Self {
            tx,
            pending,
            next_id: Arc::new(AtomicU64::new(2)),
            stats: stats.clone(),
            closed,
            node_id,
        };
        Ok((client, EventStream { rx: ev_rx, stats }))
    }

    /// The node that answered Hello.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Events dropped so far because the [`EventStream`] buffer was full.
    pub fn events_dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Requests sent and still waiting for their reply.
    pub fn pending_requests(&self) -> usize {
        self.pending.lock().len()
    }

    /// Sends one request and waits up to [`REQUEST_TIMEOUT`] for its reply.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future forgets the request (a reply that
    /// comes later is discarded).
    async fn call(&self, body: In) -> Result<Out, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = frame_bytes(&pb::UpstreamFrame {
            request_id: id,
            body: Some(body),
        });
        let (reply, rx) = oneshot::channel();
        self.pending.lock().insert(id, reply);
        let _guard = PendingGuard {
            pending: &self.pending,
            id,
        };
        // The reader cancels `closed` before it clears the map: an entry
        // inserted after the clear is caught here.
        if self.closed.is_cancelled() {
            return Err(ClientError::Closed);
        }
        let exchange = async {
            self.tx.send(frame).await.map_err(|_| ClientError::Closed)?;
            rx.await.map_err(|_| ClientError::Closed)
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(e)) => Err(e),
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

    /// Sends up to [`MAX_PUSHES_PER_BATCH`](crate::upstream::MAX_PUSHES_PER_BATCH)
    /// pushes in one request; one result per push, in order: its reply, or
    /// the refusal it would have got alone.
    ///
    /// # Errors
    /// [`ClientError`] for the request as a whole (a batch over the limit is
    /// refused with `CODE_BAD_REQUEST`).
    pub async fn push_batch(
        &self,
        pushes: Vec<pb::PushRequest>,
    ) -> Result<Vec<Result<pb::PushReply, ClientError>>, ClientError> {
        let n = pushes.len();
        match self.call(In::PushBatch(pb::PushBatch { pushes })).await? {
            Out::PushBatchReply(r) if r.results.len() == n => Ok(r
                .results
                .into_iter()
                .map(|r| match (Code::try_from(r.code), r.reply) {
                    (Ok(Code::Ok), Some(reply)) => Ok(reply),
                    (code, _) => Err(ClientError::Refused {
                        code: code.unwrap_or(Code::Internal),
                        message: r.message,
                    }),
                })
                .collect()),
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
        Ok(self.kick_reply(user, device, reason).await?.sessions)
    }

    /// [`kick`](Self::kick), with the whole reply: the sessions kicked and,
    /// in a cluster, the nodes that did not run their part.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn kick_reply(
        &self,
        user: &str,
        device: &str,
        reason: &str,
    ) -> Result<pb::CountReply, ClientError> {
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
        Ok(self.room_reply(room, users, remove).await?.sessions)
    }

    /// [`room`](Self::room), with the whole reply: the sessions added or
    /// removed and, in a cluster, the nodes that did not run their part.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn room_reply(
        &self,
        room: &str,
        users: &[&str],
        remove: bool,
    ) -> Result<pb::CountReply, ClientError> {
        self.count(In::Room(pb::RoomRequest {
            room: room.into(),
            user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            remove,
        }))
        .await
    }

    async fn count(&self, body: In) -> Result<pb::CountReply, ClientError> {
        match self.call(body).await? {
            Out::CountReply(r) => Ok(r),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Which devices of `users` are online, and where.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn presence(&self, users: &[&str]) -> Result<Vec<pb::UserPresence>, ClientError> {
        Ok(self.presence_reply(users).await?.users)
    }

    /// [`presence`](Self::presence), with the whole reply: the users and,
    /// in a cluster, the nodes that did not answer.
    ///
    /// # Errors
    /// [`ClientError`].
    pub async fn presence_reply(&self, users: &[&str]) -> Result<pb::PresenceReply, ClientError> {
        match self
            .call(In::Presence(pb::PresenceRequest {
                user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            }))
            .await?
        {
            Out::PresenceReply(r) => Ok(r),
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

/// The writer task: sends queued requests, coalescing what is ready into one
/// flush. Ends when every client handle is gone (then it closes the write
/// side), when the socket fails, or when the reader ended; it cancels
/// `closed` on its way out.
async fn write_requests<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Bytes>,
    w: W,
    closed: CancellationToken,
) {
    let mut w = BufWriter::new(w);
    let run = async {
        while let Some(first) = rx.recv().await {
            w.write_all(&first).await?;
            while let Ok(more) = rx.try_recv() {
                w.write_all(&more).await?;
            }
            w.flush().await?;
        }
        w.shutdown().await
    };
    // A write cut short here is abandoned with the connection.
    tokio::select! {
        _ = closed.cancelled() => {}
        _ = run => {}
    }
    closed.cancel();
}

/// The reader task: hands replies to their callers and events to the
/// bounded buffer; it waits on nothing but the socket. When the connection
/// ends, every caller still waiting gets [`ClientError::Closed`] and the
/// event stream ends.
async fn read_frames<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, FrameCodec>,
    pending: Pending,
    events: mpsc::Sender<(pb::Event, usize)>,
    stats: Arc<EventStats>,
    closed: CancellationToken,
) {
    // Whether events are being dropped now: warn once per run of drops.
    let mut dropping = false;
    loop {
        // Cancel safe: `FramedRead` keeps partial frames in its buffer.
        let next = tokio::select! {
            _ = closed.cancelled() => break,
            f = frames.next() => f,
        };
        let Some(Ok(b)) = next else { break };
        let len = b.len();
        let Ok(frame) = pb::GatewayFrame::decode(b) else {
            break;
        };
        match frame.body {
            Some(Out::Event(ev)) => {
                let fits = stats
                    .bytes
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        n.checked_add(len).filter(|t| *t <= EVENT_BUFFER_BYTES)
                    })
                    .is_ok();
                let kept = fits
                    && match events.try_send((ev, len)) {
                        Ok(()) => true,
                        Err(_) => {
                            stats.bytes.fetch_sub(len, Ordering::AcqRel);
                            false
                        }
                    };
                if kept {
                    dropping = false;
                } else {
                    let n = stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if !dropping {
                        tracing::warn!(
                            dropped_total = n,
                            "upstream client: event buffer full, dropping events (read the EventStream faster)"
                        );
                        dropping = true;
                    }
                }
            }
            Some(body) => {
                // The guard in `call` removes entries whose caller left, so
                // a missing id is a late reply: discard it.
                let tx = pending.lock().remove(&frame.request_id);
                if let Some(tx) = tx {
                    let _ = tx.send(body);
                }
            }
            None => {}
        }
    }
    // Waiting callers see their sender dropped: ClientError::Closed.
    closed.cancel();
    pending.lock().clear();
}
