//! The cluster bus over a NATS server: the nodes of a cluster run each
//! other's commands and share one event stream.
//!
//! Subjects, under the cluster's prefix `P` (`bus.cluster`):
//! - `P.node.<id>.cmd`: commands for one node (request/reply, protobuf
//!   `NodeCommand` / `NodeOutcome`), heard on the node's command link, a
//!   NATS connection of its own (`link.rs`), as its takes are.
//! - `P.node.<id>.snap`: a node's whole directory state, in chunks.
//! - `P.node.<id>.take`: hand a session over to the node its device
//!   resumed on (the state comes back in chunks); `P.node.<id>.moved`: the
//!   new node says the session is in place.
//! - `P.dir`: every node's directory deltas and heartbeats.
//! - `P.ev.<kind>`: upstream events. A node with ungrouped subscribers
//!   subscribes plainly; a node with members of group `g` joins the NATS
//!   queue group for `g`, so that each event reaches every ungrouped
//!   subscriber and one member of each group, cluster-wide.
//!
//! Routing: the node an upstream asked routes by its [`Directory`], so that
//! a push reaches only the nodes that hold a recipient, one message per
//! node; the node's own share runs in process. Each remote request has
//! `bus.request_timeout`; a node that does not answer is reported in the
//! reply with a code, never waited on longer. While the NATS connection is
//! down the node serves its own sessions and every remote request fails at
//! once with `CODE_NODE_UNREACHABLE`.
//!
//! Trust: every client of the NATS account can speak for a node. Give the
//! cluster its own NATS credentials (`bus.user`/`bus.password` or
//! `bus.token`) and no one else access to its subjects.

mod events;
mod link;
mod moves;
mod requests;
mod sync;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::{Mutex, RwLock};
use prost::Message as _;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::directory::Directory;
use super::{
    codec, Bus, BusFuture, Command, EventHub, EventKind, Executor, QueueLimits, Reply, Subscription,
};
use crate::ids::{DeviceId, NodeId, SessionId, UserId};
use crate::metrics as m;
use crate::registry::Registry;
use crate::session::Moved;
use crate::wire::{pb, Code};

use moves::MovedTo;
pub use moves::{moved_memory, TakeGuard};
use requests::NodeQueue;
use sync::Announcer;

/// What the bus asks of the node when a session moves to another node.
pub trait Sessions: Send + Sync {
    /// Ends session `id` of `user` and `device` here and hands its state
    /// over (a resume on another node).
    ///
    /// # Errors
    /// `CODE_RESUME_EXPIRED` (no such session here) or
    /// `CODE_RESUME_REJECTED` (another user's or device's).
    fn take(&self, id: SessionId, user: &UserId, device: &DeviceId) -> Result<Moved, Code>;
}

/// How the node reaches the cluster (from the `[bus]` config).
#[derive(Debug, Clone)]
pub struct NatsOptions {
    pub urls: Vec<String>,
    /// The subject prefix: nodes with the same one form a cluster.
    pub cluster: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub request_timeout: Duration,
    pub heartbeat: Duration,
    pub node_timeout: Duration,
}

/// Directory changes are gathered this long into one delta.
const DELTA_DELAY: Duration = Duration::from_millis(10);

/// Events waiting for the NATS connection, in count and bytes.
const EVENT_QUEUE: usize = 8192;
const EVENT_QUEUE_BYTES: usize = 32 << 20;

/// Takes of one session a resume makes at least before it gives up
/// ([`NatsBus::fetch_session`]).
const TAKE_ATTEMPTS: u32 = 3;
/// How long a resume keeps asking for its session, at least, when the
/// node that holds it answers late: 8 s (4 takes at the default 2 s
/// `bus.request_timeout`), within the time that node keeps what it sent
/// (`MOVED_FOR`, 10 s) and the resuming connection's
/// `session.login_timeout` (10 s by default). A node that hands over
/// thousands of sessions at once (a drain) on busy cores answers takes
/// seconds late: resumes that crossed nodes took p99 7.8 s in a rolling
/// restart of 100,000 devices on 2 cores (docs/LOADTEST.md).
const TAKE_PATIENCE: Duration = Duration::from_secs(8);

/// The NATS bus of one node.
pub struct NatsBus {
    inner: Arc<Inner>,
    stop: CancellationToken,
}

struct Inner {
    /// Stops every task of the bus (the event deliveries too).
    stop: CancellationToken,
    node: NodeId,
    prefix: String,
    opts: NatsOptions,
    client: async_nats::Client,
    executor: Arc<dyn Executor>,
    hub: Arc<EventHub>,
    registry: Arc<Registry>,
    dir: RwLock<Directory>,
    announcer: Arc<Announcer>,
    /// Start time in Unix µs: this run's epoch in the directory.
    epoch: u64,
    /// The last delta published.
    seq: AtomicU64,
    connected: AtomicBool,
    draining: AtomicBool,
    /// Wakes the announcer to send a heartbeat now (after a reconnect).
    beat_now: Notify,
    events: mpsc::Sender<(EventKind, Bytes)>,
    event_bytes: AtomicUsize,
    sessions: std::sync::OnceLock<std::sync::Weak<dyn Sessions>>,
    /// Sessions that moved from here to another node lately, by user: a
    /// push that misses them here is sent on (see [`Inner::hints`]).
    moved: Mutex<HashMap<UserId, Vec<MovedTo>>>,
    moved_count: AtomicUsize,
    /// Sessions this node is fetching from others and has not put in place
    /// yet, and the notice that one is done.
    takes: Mutex<std::collections::BTreeMap<u64, (UserId, DeviceId)>>,
    take_seq: AtomicU64,
    takes_done: Notify,
    /// Commands waiting for a request to their node, by node.
    queues: Mutex<HashMap<NodeId, NodeQueue>>,
    /// When this node last warned that another's clock is ahead, by node.
    clock_warned: Mutex<HashMap<String, Instant>>,
}

/// A NATS connection made (or being made) for a bus not started yet.
pub struct NatsConnection {
    opts: NatsOptions,
    client: async_nats::Client,
    state: Arc<ConnState>,
}

impl NatsBus {
    /// Connects to NATS, in the background: the node starts while NATS is
    /// down, and serves its own sessions until it is up.
    ///
    /// # Errors
    /// A URL that does not parse.
    pub async fn connect(node: &NodeId, opts: NatsOptions) -> anyhow::Result<NatsConnection> {
        let addrs = opts
            .urls
            .iter()
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("bus.urls: {e}"))?;
        let state = Arc::new(ConnState::default());
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("tether {node}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .request_timeout(Some(opts.request_timeout))
            .subscription_capacity(16 * 1024)
            .reconnect_delay_callback(|attempt| {
                // 0, 100, 200, ... ms up to 2 s: a restarted server is found
                // quickly, a dead one is not hammered.
                Duration::from_millis((attempt as u64 * 100).min(2_000))
            });
        if let (Some(u), Some(p)) = (&opts.user, &opts.password) {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &opts.token {
            o = o.token(t.clone());
        }
        let st = state.clone();
        o = o.event_callback(move |ev| {
            let st = st.clone();
            async move { st.on_event(ev) }
        });
        let client = o
            .connect(addrs)
            .await
            .map_err(|e| anyhow::anyhow!("bus: {e}"))?;
        Ok(NatsConnection {
            opts,
            client,
            state,
        })
    }

    /// Starts the bus's tasks on a connection: commands for this node run
    /// on `executor`, events for this node's subscribers go to `hub`, and
    /// `registry`'s users and rooms are announced to the others.
    pub fn start(
        conn: NatsConnection,
        node: NodeId,
        executor: Arc<dyn Executor>,
        hub: Arc<EventHub>,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        let NatsConnection {
            opts,
            client,
            state,
        } = conn;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let inner = Arc::new(Inner {
            stop: CancellationToken::new(),
            prefix: opts.cluster.clone(),
            dir: RwLock::new(Directory::new(node.clone(), opts.node_timeout)),
            node,
            opts,
            connected: AtomicBool::new(client.connection_state() == State::Connected),
            client,
            executor,
            hub,
            registry: registry.clone(),
            announcer: Arc::new(Announcer::default()),
            epoch: crate::unix_ms().saturating_mul(1000) + u64::from(rand::random::<u16>() % 1000),
            seq: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            beat_now: Notify::new(),
            events: tx,
            event_bytes: AtomicUsize::new(0),
            sessions: std::sync::OnceLock::new(),
            moved: Mutex::new(HashMap::new()),
            moved_count: AtomicUsize::new(0),
            takes: Mutex::new(std::collections::BTreeMap::new()),
            take_seq: AtomicU64::new(0),
            takes_done: Notify::new(),
            queues: Mutex::new(HashMap::new()),
            clock_warned: Mutex::new(HashMap::new()),
        });
        *state.inner.lock() = Some(Arc::downgrade(&inner));
        metrics::gauge!(m::BUS_CONNECTED).set(if inner.is_up() { 1.0 } else { 0.0 });
        registry.set_watch(inner.announcer.clone());
        let stop = inner.stop.clone();
        let spawn = |f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = f => {}
                }
            });
        };
        spawn(Box::pin(inner.clone().serve_commands()));
        spawn(Box::pin(inner.clone().serve_snapshots()));
        spawn(Box::pin(inner.clone().follow_installs()));
        spawn(Box::pin(inner.clone().follow_directory()));
        spawn(Box::pin(inner.clone().announce()));
        spawn(Box::pin(inner.clone().send_events(rx)));
        spawn(Box::pin(inner.clone().follow_subscribers()));
        Arc::new(Self { inner, stop })
    }

    /// Before a draining node leaves: waits (at most `limit`) until every
    /// session it handed over is in place on its new node, then for the
    /// new nodes' directory news to reach the others. Until then this node
    /// still sends on the pushes that reach it for those sessions.
    pub async fn settle(&self, limit: Duration) {
        let i = &self.inner;
        let deadline = Instant::now() + limit;
        loop {
            let waiting = i
                .moved
                .lock()
                .values()
                .flatten()
                .any(|t| !t.installed.0.load(Ordering::Acquire));
            if !waiting || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A delta goes out DELTA_DELAY after the change; give it time to
        // travel before the others forget this node.
        tokio::time::sleep(DELTA_DELAY * 10).await;
    }

    /// Tells the others this node is leaving (they forget it at once) and
    /// stops the bus's tasks.
    pub async fn leave(&self) {
        let i = &self.inner;
        // Bounded: with NATS down the last heartbeat cannot go out, and the
        // node must still exit (the others forget it after node_timeout).
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = i.publish_dir(i.heartbeat(true)).await;
            let _ = i.client.flush().await;
        })
        .await;
        self.stop.cancel();
    }

    /// Sets what hands sessions over to other nodes (once).
    pub fn set_sessions(&self, s: std::sync::Weak<dyn Sessions>) {
        let _ = self.inner.sessions.set(s);
    }

    /// Counts a session of `user`'s `device` this node starts to fetch
    /// from another; keep the guard until the session is in place here (or
    /// the fetch failed). Pushes that reach this node meanwhile wait for it
    /// (at most a quarter of `bus.request_timeout`; a push sent on to that
    /// device, until its request's deadline draws near): the node it leaves
    /// may already have missed them, and they would miss it here too.
    pub fn begin_take(&self, user: &UserId, device: &DeviceId) -> TakeGuard {
        let id = self.inner.take_seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner
            .takes
            .lock()
            .insert(id, (user.clone(), device.clone()));
        TakeGuard(self.inner.clone(), id)
    }

    /// Takes session `id` of `user` and `device` from `node`, which ends it
    /// there: a resume on this node of a session another node held.
    ///
    /// An answer that does not come within `bus.request_timeout` is asked
    /// for again, for [`TAKE_PATIENCE`] in all (at least [`TAKE_ATTEMPTS`]
    /// takes): the holder may have
    /// taken the session and answered late (a node busy with a drain's
    /// thousands of takes), and it answers a repeated take with the state
    /// it sent, until this node says the session is in place.
    ///
    /// # Errors
    /// The holder's refusal (`CODE_RESUME_EXPIRED`, `CODE_RESUME_REJECTED`),
    /// or `CODE_NODE_UNREACHABLE` / `CODE_NODE_TIMEOUT` when it cannot be
    /// asked.
    pub async fn fetch_session(
        &self,
        node: &NodeId,
        id: SessionId,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Moved, Code> {
        let rt = self.inner.opts.request_timeout;
        let patience = TAKE_PATIENCE.max(rt * TAKE_ATTEMPTS);
        let mut asked = rt;
        loop {
            match self.fetch_once(node, id, user, device).await {
                Err(Code::NodeTimeout) if asked + rt <= patience => asked += rt,
                r => return r,
            }
        }
    }

    /// One take of [`NatsBus::fetch_session`], within `bus.request_timeout`.
    async fn fetch_once(
        &self,
        node: &NodeId,
        id: SessionId,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Moved, Code> {
        let i = &self.inner;
        if !i.is_up() {
            return Err(Code::NodeUnreachable);
        }
        let req = pb::TakeRequest {
            session_id: id.0,
            user_id: user.to_string(),
            device_id: device.to_string(),
            from_node: i.node.to_string(),
        };
        let inbox = i.client.new_inbox();
        let mut sub = i
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|_| Code::NodeUnreachable)?;
        i.client
            .publish_with_reply(i.subject(node, "take"), inbox, req.encode_to_vec().into())
            .await
            .map_err(|_| Code::NodeUnreachable)?;
        let mut chunks: Vec<pb::SessionChunk> = Vec::new();
        let deadline = tokio::time::sleep(i.opts.request_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return Err(Code::NodeTimeout),
                m = sub.next() => {
                    let m = m.ok_or(Code::NodeUnreachable)?;
                    if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                        return Err(Code::NodeUnreachable);
                    }
                    let c = pb::SessionChunk::decode(m.payload).map_err(|_| Code::Internal)?;
                    let count = c.count as usize;
                    chunks.push(c);
                    if chunks.len() >= count {
                        break;
                    }
                }
            }
        }
        codec::decode_moved(chunks, user.clone(), device.clone())
    }

    /// Tells `from`, which a session of `user`'s `device` moved from, that
    /// it is in place here (pushes that missed it there wait for this).
    pub async fn confirm_moved(&self, from: &NodeId, user: &UserId, device: &DeviceId) {
        let i = &self.inner;
        let m = pb::MovedSession {
            user_id: user.to_string(),
            device_id: device.to_string(),
            node_id: i.node.to_string(),
        };
        let _ = i
            .client
            .publish(i.subject(from, "moved"), m.encode_to_vec().into())
            .await;
    }

    /// Marks this node as draining in its heartbeats.
    pub fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
        self.inner.beat_now.notify_one();
    }

    /// Other nodes known alive.
    pub fn peers(&self) -> Vec<super::directory::PeerInfo> {
        self.inner.dir.read().peers()
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Follows the NATS connection's events (logs, metrics, resync).
#[derive(Default)]
struct ConnState {
    inner: Mutex<Option<std::sync::Weak<Inner>>>,
}

impl ConnState {
    fn on_event(&self, ev: async_nats::Event) {
        let inner = self
            .inner
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade);
        match ev {
            async_nats::Event::Connected => {
                tracing::info!("cluster bus connected");
                metrics::gauge!(m::BUS_CONNECTED).set(1.0);
                if let Some(i) = inner {
                    i.connected.store(true, Ordering::Relaxed);
                    // What the others published meanwhile may be lost: hear
                    // them anew before taking any for dead, and tell them
                    // about this node at once.
                    i.dir.write().touch_all(Instant::now().into_std());
                    i.beat_now.notify_one();
                }
            }
            async_nats::Event::Disconnected => {
                tracing::warn!(
                    "cluster bus disconnected: serving this node's sessions only; \
                     requests for other nodes fail with CODE_NODE_UNREACHABLE until it is back"
                );
                metrics::gauge!(m::BUS_CONNECTED).set(0.0);
                metrics::counter!(m::BUS_DISCONNECTS).increment(1);
                if let Some(i) = inner {
                    i.connected.store(false, Ordering::Relaxed);
                }
            }
            async_nats::Event::SlowConsumer(sid) => {
                tracing::warn!(
                    sid,
                    "cluster bus: a subscription fell behind, messages lost"
                );
            }
            other => tracing::info!("cluster bus: {other}"),
        }
    }
}

impl Inner {
    fn subject(&self, node: &NodeId, what: &str) -> String {
        format!("{}.node.{}.{}", self.prefix, node, what)
    }

    fn is_up(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.client.connection_state() == State::Connected
    }
}

impl Bus for NatsBus {
    fn node_id(&self) -> &NodeId {
        &self.inner.node
    }

    fn request(&self, cmd: Command) -> BusFuture<Reply> {
        Box::pin(self.inner.clone().request(cmd))
    }

    fn emit(&self, event: pb::Event) -> bool {
        self.inner.emit(event)
    }

    fn subscribe(&self, group: &str, limits: QueueLimits) -> Subscription {
        self.inner.hub.subscribe(group, limits)
    }

    fn replace_elsewhere(
        &self,
        user: &UserId,
        device: Option<&crate::ids::DeviceId>,
        since_ms: u64,
    ) {
        if !self.inner.dir.read().may_hold(user.as_str()) {
            return;
        }
        let cmd = Command::Kick {
            user: user.clone(),
            device: device.cloned(),
            close: crate::session::CloseCmd::new(Code::Replaced, "logged in on another node"),
            before_ms: since_ms,
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let plan = inner.plan(&cmd, inner.not_after());
            for (n, bytes, _) in plan.remote {
                if let Err((code, m)) = inner.ask(&n, bytes).await {
                    tracing::debug!(node = %n, ?code, "replacing a session elsewhere: {m}");
                }
            }
        });
    }
}
