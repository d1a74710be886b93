//! The upstream socket server: one task per upstream connection, a reader
//! that runs requests in order, and a writer that coalesces responses and
//! events.
//!
//! Before authentication a connection is in the pre-Hello pool
//! (`upstream.max_pending_hellos`, [`Pending`]: a newcomer evicts the oldest
//! member when it is full), is read with a small frame bound
//! ([`UPSTREAM_HELLO_MAX`]) and a deadline (`upstream.hello_timeout`), and
//! does not count against `upstream.max_connections`: silent sockets cannot
//! take the places of services. A wrong secret is counted per source
//! ([`HelloLimiter`]): past its source's budget the refusal is held back and
//! says `CODE_RATE_LIMITED`, and failures are logged once per interval with a
//! count. Only an authenticated connection gets `upstream.max_frame` and a
//! place under `upstream.max_connections`.
//!
//! Responses are never dropped: they are charged to the connection's
//! `upstream.reply_queue_bytes`, and past it the reader waits for the writer
//! (back pressure on the upstream, which stops being read). Events are
//! dropped, counted by kind and reported to the subscriber in an
//! `EventsDropped` notice when its queue is full (in events or in bytes), so a
//! stuck upstream can neither stall sessions nor hold unbounded memory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::codec::FrameCodec;
use super::hello_limit::{HelloLimiter, Report, Source, FAILED_HELLO_LOG_INTERVAL};
use super::pending::{Pending, PendingId};
use super::requests::{self, Refusal};
use crate::bus::QueueLimits;
use crate::config::{UpstreamConfig, UPSTREAM_HELLO_MAX};
use crate::metrics as m;

use super::UpstreamNode;
use crate::wire::pb::{gateway_frame::Body as Out, upstream_frame::Body as In};
use crate::wire::{frame_bytes, pb, Code};

/// How long a refused connection gets to read its `Error` (and how long the
/// gateway reads and discards what it was sending) before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Bytes read and discarded from a refused connection before it is closed, so
/// that the close is a FIN after the `Error` rather than a reset.
const REFUSAL_DRAIN: usize = 64 * 1024;
/// How long a wrong secret past its source's budget waits for its refusal
/// (one failure's worth of the budget's refill). The connection stays in the
/// pre-Hello pool meanwhile, so this holds nothing the pool does not bound.
const LIMITED_DELAY: Duration = Duration::from_secs(1);
/// Pushes in one `PushBatch`.
pub const MAX_PUSHES_PER_BATCH: usize = 1024;
/// Deliveries queued by one upstream connection before it yields to sessions.
const YIELD_DELIVERIES: u64 = 16_384;
/// Pushes that reached a session before the connection yields: about a
/// quarter of what a reader that keeps up can have queued of small pushes,
/// so the woken sessions write before the queues fill.
const YIELD_PUSHES: u64 = 64;

/// Pushes of a `PushBatch` that run at once at most.
const MAX_WAVE: usize = 256;

/// The user a push to one user or one device targets; None for a room, a
/// list or everyone.
fn unicast_user(p: &pb::PushRequest) -> Option<&str> {
    match &p.target {
        Some(pb::push_request::Target::UserId(u)) => Some(u),
        Some(pb::push_request::Target::Device(d)) => Some(&d.user_id),
        _ => None,
    }
}

/// The results of a `PushBatch` so far, run a wave at a time: consecutive
/// pushes to distinct users run at once, so that pushes to users on other
/// nodes cross together (one request per node and wave, not a round trip
/// per push); a push to a user already in the wave starts the next one,
/// and a push to a room, a list or everyone runs alone, so that each
/// session still gets the batch's pushes in the batch's order.
#[derive(Default)]
struct BatchRun {
    results: Vec<pb::PushResult>,
    reached: u64,
    pushes: u64,
    pacer: Pacer,
}

impl BatchRun {
    /// Runs the pushes of `wave` at once (emptying it), and keeps their
    /// results in order.
    async fn run(&mut self, node: &dyn UpstreamNode, wave: &mut Vec<pb::PushRequest>) {
        if wave.is_empty() {
            return;
        }
        let done =
            futures_util::future::join_all(wave.drain(..).map(|p| requests::push(node, p))).await;
        let (mut reached, mut pushes) = (0, 0);
        for r in done {
            self.results.push(match r {
                Ok(done) => {
                    let n = done.reply.sessions;
                    reached += n;
                    pushes += u64::from(n > 0);
                    pb::PushResult {
                        code: Code::Ok as i32,
                        message: String::new(),
                        reply: Some(done.reply),
                    }
                }
                Err(r) => pb::PushResult {
                    code: r.code as i32,
                    message: r.message,
                    reply: None,
                },
            });
        }
        self.reached += reached;
        self.pushes += pushes;
        self.pacer.after(reached, pushes).await;
    }
}

/// Paces fan-out against the sessions it wakes: after a few pushes (up to
/// half a queue) or many deliveries, let the woken sessions write. Queues
/// then coalesce several frames per write, and a burst cannot fill every
/// queue before a single session task runs.
#[derive(Default)]
struct Pacer {
    reached: u64,
    pushes: u64,
}

impl Pacer {
    /// Counts `pushes` pushes that reached `reached` sessions; yields when
    /// either bound is reached.
    async fn after(&mut self, reached: u64, pushes: u64) {
        self.reached += reached;
        self.pushes += pushes;
        if self.reached >= YIELD_DELIVERIES || self.pushes >= YIELD_PUSHES {
            *self = Self::default();
            tokio::task::yield_now().await;
        }
    }
}

/// The bound upstream listeners.
pub struct UpstreamListeners {
    tcp: Option<TcpListener>,
    #[cfg(unix)]
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    params: ConnParams,
}

impl UpstreamListeners {
    /// Binds the configured TCP address and/or Unix socket path (a stale socket
    /// file is replaced).
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn bind(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let tcp = match cfg.tcp {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot bind upstream.tcp {a}: {e}"))?,
            ),
            None => None,
        };
        #[cfg(unix)]
        let unix = match &cfg.unix {
            Some(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    anyhow::ensure!(
                        meta.file_type().is_socket(),
                        "upstream.unix {} exists and is not a socket; refusing to replace it",
                        p.display()
                    );
                    std::fs::remove_file(p).map_err(|e| {
                        anyhow::anyhow!("cannot replace upstream.unix {}: {e}", p.display())
                    })?;
                }
                let l = tokio::net::UnixListener::bind(p).map_err(|e| {
                    anyhow::anyhow!("cannot bind upstream.unix {}: {e}", p.display())
                })?;
                Some((l, p.clone()))
            }
            None => None,
        };
        Ok(Self {
            tcp,
            #[cfg(unix)]
            unix,
            params: ConnParams {
                max_frame: cfg.max_frame as usize,
                secret: cfg.secret.clone(),
                queue: QueueLimits {
                    events: cfg.event_queue as usize,
                    bytes: usize::try_from(cfg.event_queue_bytes).unwrap_or(usize::MAX),
                },
                // Validated to 64 KiB..=1 GiB: fits a u32 of permits.
                reply_bytes: u32::try_from(cfg.reply_queue_bytes).unwrap_or(1 << 30),
                hello_timeout: cfg.hello_timeout,
                stall_timeout: cfg.stall_timeout,
                slots: Arc::new(Semaphore::new(cfg.max_connections as usize)),
                pending: Arc::new(Mutex::new(Pending::new(cfg.max_pending_hellos as usize))),
                limiter: Mutex::new(HelloLimiter::default()),
            },
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn unix_path(&self) -> Option<PathBuf> {
        #[cfg(unix)]
        {
            self.unix.as_ref().map(|(_, p)| p.clone())
        }
        #[cfg(not(unix))]
        None
    }

    /// Accepts upstream connections until `stop`. Each joins the pre-Hello
    /// pool (evicting its oldest member when the pool is full); a Hello past
    /// `upstream.max_connections` gets `Error{CODE_TOO_MANY_CONNECTIONS}`.
    pub async fn run(self, node: Arc<dyn UpstreamNode>, stop: CancellationToken) {
        let shared = Arc::new(self.params);
        let mut tasks = tokio::task::JoinSet::new();
        {
            let (p, stop) = (shared.clone(), stop.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(FAILED_HELLO_LOG_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! { _ = stop.cancelled() => break, _ = tick.tick() => {} }
                    let due = p.limiter.lock().sweep(now());
                    due.iter().for_each(log_failures);
                }
            });
        }
        if let Some(l) = self.tcp {
            let (node, p, stop) = (node.clone(), shared.clone(), stop.clone());
            tasks.spawn(async move {
                loop {
                    let r = tokio::select! { _ = stop.cancelled() => break, r = l.accept() => r };
                    match r {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            let waiting = p.wait_for_hello();
                            tokio::spawn(serve(
                                node.clone(),
                                p.clone(),
                                s,
                                Source::Ip(peer.ip()),
                                peer.to_string(),
                                stop.clone(),
                                waiting,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        #[cfg(unix)]
        if let Some((l, path)) = self.unix {
            let (node, p, stop) = (node.clone(), shared.clone(), stop.clone());
            tasks.spawn(async move {
                loop {
                    let r = tokio::select! { _ = stop.cancelled() => break, r = l.accept() => r };
                    match r {
                        Ok((s, _)) => {
                            let waiting = p.wait_for_hello();
                            tokio::spawn(serve(
                                node.clone(),
                                p.clone(),
                                s,
                                Source::Unix,
                                format!("unix:{}", path.display()),
                                stop.clone(),
                                waiting,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

struct ConnParams {
    max_frame: usize,
    secret: String,
    queue: QueueLimits,
    /// `upstream.reply_queue_bytes`: replies queued per connection.
    reply_bytes: u32,
    hello_timeout: Duration,
    /// `upstream.stall_timeout`: the longest one write may wait for the peer.
    stall_timeout: Duration,
    /// One permit per authenticated upstream connection
    /// (`upstream.max_connections`).
    slots: Arc<Semaphore>,
    /// Connections waiting for their Hello (`upstream.max_pending_hellos`);
    /// each member's token closes it when it is evicted.
    pending: Arc<Mutex<Pending<CancellationToken>>>,
    limiter: Mutex<HelloLimiter>,
}

impl ConnParams {
    /// A place in the pre-Hello pool for a new connection. When the pool is
    /// full its oldest member is evicted (see [`Pending`] for why the oldest
    /// and not the newcomer).
    fn wait_for_hello(&self) -> Waiting {
        let token = CancellationToken::new();
        let mut pool = self.pending.lock();
        let (id, evicted) = pool.admit(token.clone());
        metrics::gauge!(m::UPSTREAM_PENDING_HELLOS).set(pool.len() as f64);
        drop(pool);
        if let Some(t) = evicted {
            metrics::counter!(m::UPSTREAM_HELLOS_EVICTED).increment(1);
            t.cancel();
        }
        Waiting {
            pool: self.pending.clone(),
            id,
            evicted: token,
        }
    }

    /// Counts a wrong secret from `source` and logs it when a line is due;
    /// whether it is within the source's budget.
    fn failed_hello(&self, source: Source) -> bool {
        metrics::counter!(m::UPSTREAM_FAILED_HELLOS).increment(1);
        let v = self.limiter.lock().handle_failure(source, now());
        if let Some(r) = &v.report {
            log_failures(r);
        }
        v.allowed
    }
}

/// A connection's place in the pre-Hello pool, given back when it is dropped
/// (at its Hello, or when it ends before).
struct Waiting {
    pool: Arc<Mutex<Pending<CancellationToken>>>,
    id: PendingId,
    /// Cancelled when a newer connection evicts this one.
    evicted: CancellationToken,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut pool = self.pool.lock();
        if pool.remove(self.id).is_some() {
            metrics::gauge!(m::UPSTREAM_PENDING_HELLOS).set(pool.len() as f64);
        }
    }
}

/// The limiter's clock: tokio's, so that paused-time tests control it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A reply with its share of the connection's `upstream.reply_queue_bytes`,
/// given back (and taken off [`m::UPSTREAM_REPLY_BYTES`]) once written.
struct Charged {
    bytes: Bytes,
    _room: OwnedSemaphorePermit,
    charge: u32,
}

impl Drop for Charged {
    fn drop(&mut self) {
        metrics::gauge!(m::UPSTREAM_REPLY_BYTES).decrement(f64::from(self.charge));
    }
}

/// The reader's side of a connection's reply queue: a frame count bound
/// (the channel) and a byte bound (the semaphore's permits, one per byte).
struct Replies {
    tx: mpsc::Sender<Charged>,
    room: Arc<Semaphore>,
    max: u32,
}

impl Replies {
    /// Queues a reply for the writer, first waiting (without reading more
    /// requests) while the replies queued before it fill the byte bound. A
    /// reply larger than the bound is charged the whole bound: it waits for
    /// an empty queue and goes alone. `false` when the writer has ended or
    /// `stop` was cancelled.
    ///
    /// # Cancel safety
    /// Not used in a `select!`; cancelling it drops the reply.
    async fn send(&self, bytes: Bytes, stop: &CancellationToken) -> bool {
        let charge = u32::try_from(bytes.len()).unwrap_or(u32::MAX).min(self.max);
        let room = match self.room.clone().try_acquire_many_owned(charge) {
            Ok(r) => r,
            Err(TryAcquireError::Closed) => return false,
            Err(TryAcquireError::NoPermits) => {
                metrics::counter!(m::UPSTREAM_REPLY_WAITS).increment(1);
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = self.tx.closed() => return false,
                    r = self.room.clone().acquire_many_owned(charge) => match r {
                        Ok(r) => r,
                        Err(_) => return false,
                    },
                }
            }
        };
        metrics::gauge!(m::UPSTREAM_REPLY_BYTES).increment(f64::from(charge));
        let c = Charged {
            bytes,
            _room: room,
            charge,
        };
        tokio::select! {
            _ = stop.cancelled() => false,
            r = self.tx.send(c) => r.is_ok(),
        }
    }
}

fn reply(request_id: u64, body: Out) -> Bytes {
    frame_bytes(&pb::GatewayFrame {
        request_id,
        body: Some(body),
    })
}

fn error(request_id: u64, code: Code, message: impl Into<String>) -> Bytes {
    reply(
        request_id,
        Out::Error(pb::Error {
            code: code as i32,
            message: message.into(),
        }),
    )
}

/// Compares secrets in time independent of where they differ (a different
/// length is refused at once).
fn secret_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Refuses a connection before or at Hello: counts it, writes `Error{code}`,
/// closes the write side, and reads and discards what the peer was still
/// sending (up to [`REFUSAL_DRAIN`]) so that the close does not reset the
/// connection before the peer reads the error. All within [`REFUSAL_LINGER`].
async fn refuse<R, W>(r: &mut R, w: &mut W, rid: u64, code: Code, message: &str)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    metrics::counter!(m::UPSTREAM_REFUSED, "reason" => code.as_str_name()).increment(1);
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        w.write_all(&error(rid, code, message)).await?;
        w.shutdown().await?;
        let mut buf = [0u8; 4096];
        let mut left = REFUSAL_DRAIN;
        while left > 0 {
            match r.read(&mut buf).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// How the wait for a Hello ended.
enum Greeted {
    /// The secret checked out: the Hello's request id and the Hello.
    Hello(u64, pb::Hello),
    /// Refused (and told so) or gone.
    Done,
    /// A newer connection took its place in the pre-Hello pool.
    Evicted,
    Stopped,
}

/// Reads and checks the Hello; refuses the connection itself when it is
/// missing, too large, not a Hello, has a wrong secret or an unsupported
/// version.
///
/// # Cancel safety
/// Cancelling it (an eviction) may drop a Hello that was half read or a
/// refusal that was half written; the connection is closed then anyway.
async fn greet<R, W>(
    p: &ConnParams,
    frames: &mut FramedRead<R, FrameCodec>,
    w: &mut W,
    source: Source,
    peer: &str,
) -> Greeted
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let first = match tokio::time::timeout(p.hello_timeout, frames.next()).await {
        Ok(Some(Ok(b))) => Ok(pb::UpstreamFrame::decode(b).ok()),
        Ok(Some(Err(e))) if e.kind() == std::io::ErrorKind::InvalidData => Err(()),
        // The peer went away (or reset) before a whole Hello.
        Ok(Some(Err(_)) | None) => return Greeted::Done,
        Err(_) => Ok(None),
    };
    let (rid, hello) = match first {
        Err(()) => {
            tracing::warn!(%peer, "upstream refused: Hello larger than {UPSTREAM_HELLO_MAX} bytes");
            let msg = "Hello larger than 4096 bytes";
            refuse(frames.get_mut(), w, 0, Code::FrameTooLarge, msg).await;
            return Greeted::Done;
        }
        Ok(Some(pb::UpstreamFrame {
            request_id,
            body: Some(In::Hello(h)),
        })) => (request_id, h),
        Ok(_) => {
            let msg = "expected Hello";
            refuse(frames.get_mut(), w, 0, Code::UpstreamAuthFailed, msg).await;
            return Greeted::Done;
        }
    };
    // The secret is always checked, also for a source past its budget: a
    // right one is accepted at once. Refusing unchecked would let anyone who
    // shares the source (every process on loopback or on the Unix socket)
    // lock the real services out; the comparison costs less than the
    // refusal.
    if !secret_eq(&hello.secret, &p.secret) {
        if p.failed_hello(source) {
            refuse(
                frames.get_mut(),
                w,
                rid,
                Code::UpstreamAuthFailed,
                "bad secret",
            )
            .await;
        } else {
            tokio::time::sleep(LIMITED_DELAY).await;
            let msg = "too many failed Hellos from this source";
            refuse(frames.get_mut(), w, rid, Code::RateLimited, msg).await;
        }
        return Greeted::Done;
    }
    if hello.protocol_version != 0
        && !crate::wire::PROTOCOL_VERSIONS.contains(&hello.protocol_version)
    {
        let msg = "unsupported protocol version";
        refuse(frames.get_mut(), w, rid, Code::UnsupportedVersion, msg).await;
        return Greeted::Done;
    }
    Greeted::Hello(rid, hello)
}

/// Serves one upstream connection; `waiting` is its place in the pre-Hello
/// pool, given back at its Hello, when it takes a place under
/// `upstream.max_connections` instead.
async fn serve<S>(
    node: Arc<dyn UpstreamNode>,
    p: Arc<ConnParams>,
    stream: S,
    source: Source,
    peer: String,
    stop: CancellationToken,
    waiting: Waiting,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(stream);
    // Unauthenticated: a Hello-sized bound, raised once the secret checks out.
    let mut frames = FramedRead::new(r, FrameCodec::new(UPSTREAM_HELLO_MAX));
    let greeted = tokio::select! {
        biased;
        _ = stop.cancelled() => Greeted::Stopped,
        _ = waiting.evicted.cancelled() => Greeted::Evicted,
        g = greet(&p, &mut frames, &mut w, source, &peer) => g,
    };
    let (rid, hello) = match greeted {
        Greeted::Hello(rid, hello) => (rid, hello),
        Greeted::Done | Greeted::Stopped => return,
        Greeted::Evicted => {
            // One non-blocking write, no linger: evictions come in floods,
            // and each lingering task would hold a descriptor the pool no
            // longer counts. A fresh socket has room for the frame.
            let msg = "too many upstream connections waiting for Hello";
            let _ = w
                .write_all(&error(0, Code::TooManyConnections, msg))
                .now_or_never();
            return;
        }
    };
    drop(waiting);
    let Ok(_slot) = p.slots.clone().try_acquire_owned() else {
        let msg = "too many upstream connections";
        refuse(frames.get_mut(), &mut w, rid, Code::TooManyConnections, msg).await;
        return;
    };
    *frames.decoder_mut() = FrameCodec::new(p.max_frame);
    let mut w = BufWriter::new(w);
    let mut sub = hello
        .subscribe
        .then(|| node.bus().subscribe(&hello.group, p.queue));
    tracing::info!(%peer, name = %hello.name, subscribe = hello.subscribe, group = %hello.group, "upstream connected");
    metrics::gauge!(m::UPSTREAM_CONNECTIONS).increment(1.0);

    let (resp_tx, mut resp_rx) = mpsc::channel::<Charged>(1024);
    let replies = Replies {
        tx: resp_tx,
        room: Arc::new(Semaphore::new(p.reply_bytes as usize)),
        max: p.reply_bytes,
    };
    let hello_ok = reply(
        rid,
        Out::HelloOk(pb::HelloOk {
            node_id: node.node_id().to_string(),
            protocol_version: *crate::wire::PROTOCOL_VERSIONS.end(),
        }),
    );
    let _ = replies.send(hello_ok, &stop).await;

    // This connection's own stop: the server's, or the writer giving up on
    // a peer that stopped reading (the reader then stops too, so the
    // connection gives back its place under `upstream.max_connections`).
    let stop = stop.child_token();
    // Writer: responses first, then events; flush when nothing else is ready.
    // A response's charge is given back (dropped) once it is written. Every
    // write (and flush) must make progress within `upstream.stall_timeout`.
    let writer_stop = stop.clone();
    let stall = p.stall_timeout;
    let writer_peer = peer.clone();
    let writer = tokio::spawn(async move {
        let stalled = |what: &str| {
            metrics::counter!(m::UPSTREAM_STALLS).increment(1);
            tracing::warn!(peer = %writer_peer, timeout = ?stall, "upstream took no byte of a pending {what}: closing it");
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = writer_stop.cancelled() => None,
                r = resp_rx.recv() => r.map(|c| (c.bytes.clone(), Some(c))),
                // Cancel safe: `Subscription::recv` takes a frame only when
                // it returns it.
                e = async {
                    match sub.as_mut() {
                        Some(s) => s.recv().await.map(|f| (f.0, None)),
                        None => std::future::pending().await,
                    }
                } => e,
            };
            let Some((first, charge)) = next else { break };
            match write_within(&mut w, &first, stall).await {
                Ok(()) => {}
                Err(Stall::Io) => break,
                Err(Stall::Timeout) => {
                    stalled("write");
                    break;
                }
            }
            drop(charge);
            // Coalesce whatever else is ready into the same flush.
            let mut failed = false;
            loop {
                let more = match resp_rx.try_recv() {
                    Ok(c) => Some((c.bytes.clone(), Some(c))),
                    Err(_) => sub.as_mut().and_then(|s| s.try_recv()).map(|f| (f.0, None)),
                };
                let Some((b, charge)) = more else { break };
                if let Err(e) = write_within(&mut w, &b, stall).await {
                    if e == Stall::Timeout {
                        stalled("write");
                    }
                    failed = true;
                    break;
                }
                drop(charge);
            }
            if failed {
                break;
            }
            match tokio::time::timeout(stall, w.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break,
                Err(_) => {
                    stalled("flush");
                    break;
                }
            }
        }
        writer_stop.cancel();
        // Bounded too: a peer that reads nothing would hold the shutdown.
        let _ = tokio::time::timeout(stall, w.shutdown()).await;
    });

    let mut pacer = Pacer::default();
    loop {
        let next = tokio::select! { _ = stop.cancelled() => break, f = frames.next() => f };
        let body = match next {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                let _ = replies
                    .send(error(0, Code::FrameTooLarge, e.to_string()), &stop)
                    .await;
                break;
            }
            None => break,
        };
        let (out, reached, pushes) = match pb::UpstreamFrame::decode(body) {
            Ok(f) => handle(&*node, f).await,
            Err(e) => (
                error(0, Code::BadFrame, format!("undecodable UpstreamFrame: {e}")),
                0,
                0,
            ),
        };
        if !replies.send(out, &stop).await {
            break;
        }
        pacer.after(reached, pushes).await;
    }
    drop(replies);
    let _ = writer.await;
    metrics::gauge!(m::UPSTREAM_CONNECTIONS).decrement(1.0);
    tracing::info!(%peer, "upstream disconnected");
}

/// Why [`write_within`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    Io,
    Timeout,
}

/// Writes all of `b`, failing when the socket takes no byte for `stall`.
/// Progress restarts the clock, so a slow reader that keeps reading is not
/// cut, however long a large reply takes.
///
/// # Cancel safety
/// Not cancel safe (part of `b` may be written); the writer never cancels it.
async fn write_within<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut b: &[u8],
    stall: Duration,
) -> Result<(), Stall> {
    while !b.is_empty() {
        match tokio::time::timeout(stall, w.write(b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(Stall::Io),
            Ok(Ok(n)) => b = &b[n..],
            Err(_) => return Err(Stall::Timeout),
        }
    }
    Ok(())
}

/// Runs one upstream request and encodes its response; also returns how many
/// sessions its pushes were queued for, and how many of its pushes reached
/// any (0 and 0 for other requests).
async fn handle(node: &dyn UpstreamNode, f: pb::UpstreamFrame) -> (Bytes, u64, u64) {
    let rid = f.request_id;
    let one = |b: Bytes| (b, 0, 0);
    match f.body {
        None => one(error(rid, Code::BadFrame, "UpstreamFrame has no body")),
        Some(In::Hello(_)) => one(error(rid, Code::AlreadyLoggedIn, "already authenticated")),
        Some(In::Ping(p)) => one(reply(
            rid,
            Out::Pong(pb::Pong {
                client_time_ms: p.client_time_ms,
                server_time_ms: crate::unix_ms(),
            }),
        )),
        Some(In::Push(p)) => match requests::push(node, p).await {
            Ok(done) => {
                let reached = done.reply.sessions;
                (
                    reply(rid, Out::PushReply(done.reply)),
                    reached,
                    u64::from(reached > 0),
                )
            }
            Err(r) => one(refused(rid, r)),
        },
        Some(In::PushBatch(b)) => handle_push_batch(node, rid, b).await,
        Some(In::Kick(k)) => one(match requests::kick(node, k).await {
            Ok(r) => reply(rid, Out::CountReply(r)),
            Err(r) => refused(rid, r),
        }),
        Some(In::Room(r)) => one(match requests::room(node, r).await {
            Ok(r) => reply(rid, Out::CountReply(r)),
            Err(r) => refused(rid, r),
        }),
        Some(In::Presence(q)) => one(match requests::presence(node, q).await {
            Ok(r) => reply(rid, Out::PresenceReply(r)),
            Err(r) => refused(rid, r),
        }),
    }
}

/// One line per source and interval, not one per failure.
fn log_failures(r: &Report) {
    r.log("upstream refused: bad secret", "failed upstream Hellos");
}

fn bad_request(rid: u64, message: String) -> Bytes {
    error(rid, Code::BadRequest, message)
}

fn refused(rid: u64, r: Refusal) -> Bytes {
    error(rid, r.code, r.message)
}

/// A batch of pushes, each run as if it came alone, in order for each
/// session (a wave at a time, [`BatchRun`]); one reply with a result per
/// push, in the batch's order. Paced as the connection's loop paces frames
/// ([`Pacer`]), once per wave.
async fn handle_push_batch(
    node: &dyn UpstreamNode,
    rid: u64,
    b: pb::PushBatch,
) -> (Bytes, u64, u64) {
    if b.pushes.len() > MAX_PUSHES_PER_BATCH {
        let m = format!(
            "at most {MAX_PUSHES_PER_BATCH} pushes per batch, got {}",
            b.pushes.len()
        );
        return (bad_request(rid, m), 0, 0);
    }
    let mut batch = BatchRun::default();
    let mut wave: Vec<pb::PushRequest> = Vec::new();
    let mut users: HashSet<String> = HashSet::new();
    for p in b.pushes {
        match unicast_user(&p) {
            Some(u) if wave.len() < MAX_WAVE && !users.contains(u) => {
                users.insert(u.to_string());
                wave.push(p);
            }
            Some(u) => {
                batch.run(node, &mut wave).await;
                users.clear();
                users.insert(u.to_string());
                wave.push(p);
            }
            None => {
                // A room, a list or everyone: alone, after what came before.
                batch.run(node, &mut wave).await;
                users.clear();
                wave.push(p);
                batch.run(node, &mut wave).await;
            }
        }
    }
    batch.run(node, &mut wave).await;
    let BatchRun {
        results,
        reached,
        pushes,
        ..
    } = batch;
    let out = reply(rid, Out::PushBatchReply(pb::PushBatchReply { results }));
    (out, reached, pushes)
}
