//! Fan-out on one node: executes bus commands against the local [`Registry`].
//!
//! A push is encoded once ([`SharedPush`]) and each recipient's queue gets a
//! clone of the same `Bytes` handle. Enqueueing never blocks on a socket: a full
//! queue applies the slow-consumer policy for that session only.
//!
//! A fan-out never enqueues under a registry lock: it copies the handles of
//! one session shard, one room or one user into a reused buffer, lets go of
//! the lock, and enqueues from the buffer ([`FanOut`]). [`Router::run`], the
//! path the bus takes, also yields to the runtime every [`FANOUT_CHUNK`]
//! enqueues, so a broadcast to a million sessions does not keep its worker
//! (and the timer ticks and sessions queued behind it) waiting for the
//! whole walk.

use std::sync::{Arc, Weak};

use crate::bus::{Command, Executor, Outcome, PushOutcome, PushTarget};
use crate::config::SlowConsumerPolicy;
use crate::ids::{NodeId, UserId};
use crate::metrics as m;
use crate::registry::Registry;
use crate::session::delivery::Item;
use crate::session::{Budget, DeliveryConfig, WriteDelay};
use crate::session::{CloseCmd, Enqueued, SessionHandle};
use crate::wire::{pb, Code, SharedPush};

/// What the router needs from the gateway around it (set once, after both
/// exist; a weak reference, so the two do not keep each other alive).
pub trait RouterHooks: Send + Sync {
    /// Delivery reports for pushes a session dropped or gave up.
    fn report(&self, h: &SessionHandle, items: &[Item], code: Code);
    /// Ends a session that has no connection (a kick of a detached session).
    /// Returns false if it had a connection after all.
    fn end_detached(&self, h: &SessionHandle, code: Code) -> bool;
    /// The current address of a session whose transport can move (QUIC).
    fn remote_addr(&self, _h: &SessionHandle) -> Option<std::net::SocketAddr> {
        None
    }
}

/// The bus runs this node's commands on the router.
impl Executor for Router {
    fn execute(&self, cmd: &Command) -> Outcome {
        Router::execute(self, cmd)
    }

    fn run<'a>(
        &'a self,
        cmd: &'a Command,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send + 'a>> {
        Box::pin(Router::run(self, cmd))
    }
}

/// Enqueues a paced fan-out makes between two yields to the runtime: a few
/// milliseconds of work at most, so timers and sessions on the same worker
/// wait no longer than that for a broadcast.
pub const FANOUT_CHUNK: usize = 4096;

/// Buffers of handles kept for reuse, and the capacity one may keep: a
/// broadcast to a million sessions allocates its buffer for itself rather
/// than pinning that much memory forever.
const SPARE_BUFFERS: usize = 4;
const SPARE_CAPACITY: usize = 64 * 1024;

/// Executes commands addressed to this node.
pub struct Router {
    node: NodeId,
    registry: Arc<Registry>,
    delivery: DeliveryConfig,
    budget: Arc<Budget>,
    max_rooms: usize,
    hooks: std::sync::OnceLock<Weak<dyn RouterHooks>>,
    write_delay: std::sync::OnceLock<Arc<WriteDelay>>,
    /// Spare handle buffers for fan-outs (see [`SPARE_BUFFERS`]).
    spare: parking_lot::Mutex<Vec<Vec<SessionHandle>>>,
    /// Sessions that moved here from another node lately, and the pushes
    /// they hold (see [`Router::note_brought`]); counted, so that the
    /// hot path pays one atomic load while there are none.
    brought: parking_lot::Mutex<std::collections::HashMap<crate::ids::SessionId, Brought>>,
    brought_count: std::sync::atomic::AtomicUsize,
    /// How long a moved session's pushes are remembered (at least
    /// [`BROUGHT_FOR`]; the cluster bus sets it from its request timeout).
    brought_for: std::sync::OnceLock<std::time::Duration>,
}

/// The pushes a moved session holds: those it brought, and those queued
/// for it here since.
struct Brought {
    at: std::time::Instant,
    /// Hashes of their bodies.
    bodies: std::collections::HashSet<u64>,
}

/// How long a moved session's pushes are remembered, at least: longer than
/// a push takes to reach every node.
pub const BROUGHT_FOR: std::time::Duration = std::time::Duration::from_secs(5);

fn body_hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct Tally {
    sessions: u64,
    /// Queued for a session with a connection.
    live: u64,
    dropped: u64,
    evicted: Vec<Item>,
    /// Sessions that had ended when the push reached them.
    closed: Vec<(UserId, crate::ids::DeviceId)>,
    hooks: Option<Arc<dyn RouterHooks>>,
    delay: Option<Arc<WriteDelay>>,
}

impl Tally {
    fn new(hooks: Option<Arc<dyn RouterHooks>>, delay: Option<Arc<WriteDelay>>) -> Self {
        Self {
            sessions: 0,
            live: 0,
            dropped: 0,
            evicted: Vec::new(),
            closed: Vec::new(),
            hooks,
            delay,
        }
    }

    fn add(&mut self, h: &SessionHandle, push: &SharedPush, router: &Router) {
        if router.holds(h, push) {
            // A moved session that has it already: brought from its old
            // node, or queued here by the other copy of a push that
            // reached both nodes (counted where it was queued).
            return;
        }
        let (cfg, budget) = (&router.delivery, &router.budget);
        let offered = match &self.delay {
            Some(d) => h.enqueue_deferred(push, cfg, budget, &mut self.evicted, d),
            None => h.enqueue(push, cfg, budget, &mut self.evicted),
        };
        match offered {
            Enqueued::Queued => {
                self.sessions += 1;
                self.live += 1;
            }
            Enqueued::Parked => {
                self.sessions += 1;
                router.bound_user(h, self.hooks.as_ref());
            }
            Enqueued::Dropped => {
                self.dropped += 1;
                metrics::counter!(m::DROPS, "policy" => "drop").increment(1);
            }
            Enqueued::OverBudget => {
                self.dropped += 1;
                metrics::counter!(m::DROPS, "policy" => "budget").increment(1);
            }
            Enqueued::SlowConsumer => {
                // Queued for the resume the session keeps its state for.
                self.sessions += 1;
                metrics::counter!(m::SLOW_CONSUMERS).increment(1);
            }
            Enqueued::Closed => {
                // Ended between the map walk and the enqueue (a move to
                // another node, a kick): the cluster bus forwards it to
                // where a moved session went.
                if let Some(i) = h.info() {
                    self.closed.push((i.user.clone(), i.device.clone()));
                }
            }
        }
        if !self.evicted.is_empty() {
            // A detached (or slow) session's oldest push made room: the
            // resume will show the gap; the upstream hears of it now.
            metrics::counter!(m::DROPS, "policy" => "evicted").increment(self.evicted.len() as u64);
            if let Some(hooks) = &self.hooks {
                hooks.report(h, &self.evicted, Code::DeliveryExpired);
            }
            self.evicted.clear();
        }
    }
}

impl Router {
    /// A router with default delivery settings except the interactive queue
    /// bound (charged bytes) and policy (benches and tests use it).
    pub fn new(
        node: NodeId,
        registry: Arc<Registry>,
        queue_bytes: usize,
        policy: SlowConsumerPolicy,
        max_rooms: usize,
    ) -> Self {
        let mut delivery = DeliveryConfig::default();
        delivery.queue_bytes[0] = queue_bytes;
        delivery.policy[0] = policy;
        Self::with_delivery(
            node,
            registry,
            delivery,
            Budget::new(usize::MAX / 2),
            max_rooms,
        )
    }

    pub fn with_delivery(
        node: NodeId,
        registry: Arc<Registry>,
        delivery: DeliveryConfig,
        budget: Arc<Budget>,
        max_rooms: usize,
    ) -> Self {
        Self {
            node,
            registry,
            delivery,
            budget,
            max_rooms,
            hooks: std::sync::OnceLock::new(),
            write_delay: std::sync::OnceLock::new(),
            spare: parking_lot::Mutex::new(Vec::new()),
            brought: parking_lot::Mutex::new(std::collections::HashMap::new()),
            brought_count: std::sync::atomic::AtomicUsize::new(0),
            brought_for: std::sync::OnceLock::new(),
        }
    }

    /// Remembers a moved session's pushes for `d` (once; never less than
    /// [`BROUGHT_FOR`]).
    pub fn remember_moved_for(&self, d: std::time::Duration) {
        let _ = self.brought_for.set(d.max(BROUGHT_FOR));
    }

    fn brought_for(&self) -> std::time::Duration {
        self.brought_for.get().copied().unwrap_or(BROUGHT_FOR)
    }

    /// Defers the wake-ups of pushes through `delay` (once).
    pub fn set_write_delay(&self, delay: Arc<WriteDelay>) {
        let _ = self.write_delay.set(delay);
    }

    /// Connects the router to its gateway (once).
    pub fn set_hooks(&self, hooks: Weak<dyn RouterHooks>) {
        let _ = self.hooks.set(hooks);
    }

    fn hooks(&self) -> Option<Arc<dyn RouterHooks>> {
        self.hooks.get().and_then(Weak::upgrade)
    }

    /// Keeps what the detached sessions of `h`'s user hold together within
    /// `delivery.detached_bytes_per_user`, after a push was queued for `h`
    /// while detached: the oldest pushes among them are evicted (reported,
    /// and their resumes show the gap). A user whose every device could fill
    /// its detached bound without passing the user's is not even looked at,
    /// so most pushes pay one map lookup for this.
    fn bound_user(&self, h: &SessionHandle, hooks: Option<&Arc<dyn RouterHooks>>) {
        let cap = self.delivery.detached_bytes_per_user;
        let Some(info) = h.info() else { return };
        let devices = self.registry.device_count(info.user.as_str());
        if devices.saturating_mul(self.delivery.detached_bytes) <= cap {
            return;
        }
        let mut sessions = Vec::with_capacity(devices);
        self.registry.for_user(info.user.as_str(), |s| {
            if s.is_detached() {
                sessions.push(s.clone());
            }
        });
        let mut evicted = Vec::new();
        while sessions.iter().map(SessionHandle::held).sum::<usize>() > cap {
            let oldest = sessions
                .iter()
                .filter_map(|s| s.oldest_detached().map(|at| (at, s)))
                .min_by_key(|(at, _)| *at)
                .map(|(_, s)| s);
            let Some(s) = oldest else { break };
            if !s.evict_oldest_detached(&self.budget, &mut evicted) {
                break;
            }
            metrics::counter!(m::DROPS, "policy" => "evicted").increment(evicted.len() as u64);
            if let Some(hooks) = hooks {
                hooks.report(s, &evicted, Code::DeliveryExpired);
            }
            evicted.clear();
        }
    }

    /// The node's replay budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Runs one command on this node, yielding to the runtime during a large
    /// fan-out (see [`Router::push_paced`]). The bus runs commands this way.
    ///
    /// # Cancel safety
    /// Not cancel safe for pushes: dropped midway, a push has reached some of
    /// its recipients and its outcome is lost. Await it to the end.
    pub async fn run(&self, cmd: &Command) -> Outcome {
        match cmd {
            Command::Push { target, push } => Outcome::Push(self.push_paced(target, push).await),
            other => self.execute(other),
        }
    }

    /// Runs one command on this node, without yielding.
    pub fn execute(&self, cmd: &Command) -> Outcome {
        match cmd {
            Command::Push { target, push } => Outcome::Push(self.push(target, push)),
            Command::Kick {
                user,
                device,
                close,
                before_ms,
            } => {
                let mut n = 0;
                // Cloned out of the map: ending a detached session unregisters
                // it, which must not happen under the user shard's lock.
                for h in self.registry.user_sessions(user.as_str()) {
                    let hit = h.info().is_some_and(|i| {
                        device.as_ref().is_none_or(|d| &i.device == d)
                            && (*before_ms == 0 || i.since_ms < *before_ms)
                    });
                    if hit {
                        let ended = h.is_detached()
                            && self.hooks().is_some_and(|k| k.end_detached(&h, close.code));
                        if !ended {
                            h.request_close(close.clone());
                        }
                        n += 1;
                    }
                }
                Outcome::Count(n)
            }
            Command::Room {
                room,
                users,
                remove,
            } => {
                let mut n = 0;
                for u in users {
                    for h in self.registry.user_sessions(u.as_str()) {
                        let changed = if *remove {
                            self.registry.leave(&h, room)
                        } else {
                            self.registry.join(&h, room, self.max_rooms).is_ok()
                        };
                        n += u64::from(changed);
                    }
                }
                metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
                Outcome::Count(n)
            }
            Command::Presence { users } => {
                let hooks = self.hooks();
                Outcome::Presence(
                    users
                        .iter()
                        .map(|u| pb::UserPresence {
                            user_id: u.to_string(),
                            devices: self
                                .registry
                                .user_sessions(u.as_str())
                                .iter()
                                .filter_map(|h| {
                                    let mut p = h.presence(&self.node)?;
                                    if let Some(a) = hooks.as_ref().and_then(|k| k.remote_addr(h)) {
                                        p.remote_addr = a.to_string();
                                    }
                                    Some(p)
                                })
                                .collect(),
                        })
                        .collect(),
                )
            }
        }
    }

    /// Queues one push for every local session it targets, in one go
    /// (benches and tests; the bus uses [`Router::push_paced`]). No registry
    /// lock is held while enqueueing.
    pub fn push(&self, target: &PushTarget, push: &SharedPush) -> PushOutcome {
        let mut f = FanOut::new(self, target, push);
        while f.step(usize::MAX) {}
        f.finish()
    }

    /// Queues one push for every local session it targets, yielding to the
    /// runtime every [`FANOUT_CHUNK`] enqueues. Sessions that join or log in
    /// meanwhile may miss the push, as they would a moment later; sessions
    /// present throughout all get it.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped midway, the push has reached only some of its
    /// recipients.
    pub async fn push_paced(&self, target: &PushTarget, push: &SharedPush) -> PushOutcome {
        let mut f = FanOut::new(self, target, push);
        while f.step(FANOUT_CHUNK) {
            metrics::counter!(m::FANOUT_YIELDS).increment(1);
            tokio::task::yield_now().await;
        }
        f.finish()
    }

    fn take_buffer(&self) -> Vec<SessionHandle> {
        self.spare.lock().pop().unwrap_or_default()
    }

    fn return_buffer(&self, mut buf: Vec<SessionHandle>) {
        buf.clear();
        buf.shrink_to(SPARE_CAPACITY);
        let mut spare = self.spare.lock();
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// Asks every session to close with `cmd` (drain).
    pub fn close_all(&self, cmd: &CloseCmd) -> usize {
        self.registry.for_each(|h| h.request_close(cmd.clone()))
    }

    /// A session moved here from another node with these pushes (`at`:
    /// when it arrived). For a while (see [`Router::remember_moved_for`])
    /// the router remembers them, and every push queued for the session
    /// here, so that the same push reaching it twice is queued once: a room
    /// push or a broadcast sent to both nodes as it moved, which the old
    /// node also sends on because it missed the session there.
    pub fn note_brought<'a>(
        &self,
        id: crate::ids::SessionId,
        bodies: impl Iterator<Item = &'a [u8]>,
        at: std::time::Instant,
    ) {
        let bodies = bodies.map(body_hash).collect();
        let keep = self.brought_for();
        let mut m = self.brought.lock();
        m.retain(|_, b| at.saturating_duration_since(b.at) < keep);
        m.insert(id, Brought { at, bodies });
        self.brought_count
            .store(m.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `h`, a session that moved here lately, holds `push` already.
    /// If not, the push is noted as held (check and note are one step, so
    /// that two copies of a push racing to the session queue it once).
    fn holds(&self, h: &SessionHandle, push: &SharedPush) -> bool {
        if self
            .brought_count
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            return false;
        }
        let keep = self.brought_for();
        let mut m = self.brought.lock();
        // Forget what is past remembering, so that the check costs one
        // atomic load again once moves are over.
        let now = push.arrived;
        m.retain(|_, b| now.saturating_duration_since(b.at) < keep);
        self.brought_count
            .store(m.len(), std::sync::atomic::Ordering::Relaxed);
        m.get_mut(&h.id())
            .is_some_and(|b| !b.bodies.insert(body_hash(&push.body)))
    }

    /// Asks every session's connection to close, keeping the sessions (a
    /// draining node of a cluster, whose sessions move to other nodes).
    pub fn close_all_keeping(&self, cmd: &CloseCmd) -> usize {
        self.registry
            .for_each(|h| h.request_close_keeping(cmd.clone()))
    }
}

/// Where a fan-out finds its next recipients.
enum Walk<'a> {
    /// The sessions of these users, one user at a time from `next`.
    Users { users: &'a [UserId], next: usize },
    /// Every session, one registry shard at a time from `next`.
    Shards { next: usize },
    /// Nothing more to copy: the buffer holds the rest (a room), or all done.
    Done,
}

/// One push on its way to its local recipients: a walk that copies handles
/// into a buffer under a registry lock, releases it, and enqueues from the
/// buffer, `step` by `step`. The payload is encoded once; each recipient
/// gets a clone of the same [`SharedPush`].
pub struct FanOut<'a> {
    router: &'a Router,
    push: &'a SharedPush,
    walk: Walk<'a>,
    buf: Vec<SessionHandle>,
    /// The next handle of `buf` to enqueue for.
    pos: usize,
    tally: Tally,
    /// Targeted users with no session with a connection (see `user`).
    missing: Vec<UserId>,
    /// The target, as an index into [`m::PUSH_TARGETS`].
    kind: usize,
}

impl<'a> FanOut<'a> {
    /// Starts a fan-out. A room's members are copied here, under the room's
    /// read lock (one `Arc` clone each, held for the copy only).
    pub fn new(router: &'a Router, target: &'a PushTarget, push: &'a SharedPush) -> Self {
        let mut f = Self {
            router,
            push,
            walk: Walk::Done,
            buf: router.take_buffer(),
            pos: 0,
            tally: Tally::new(router.hooks(), router.write_delay.get().cloned()),
            missing: Vec::new(),
            kind: m::TARGET_USER,
        };
        match target {
            PushTarget::User(u) => {
                f.kind = m::TARGET_USER;
                f.walk = Walk::Users {
                    users: std::slice::from_ref(u),
                    next: 0,
                };
            }
            PushTarget::Device(u, d) => {
                f.kind = m::TARGET_DEVICE;
                let live = f.tally.live;
                if let Some(h) = router.registry.device(u.as_str(), d) {
                    f.tally.add(&h, push, router);
                }
                if f.tally.live == live {
                    f.missing.push(u.clone());
                }
            }
            PushTarget::Users(us) => {
                f.kind = m::TARGET_USERS;
                f.walk = Walk::Users { users: us, next: 0 };
            }
            PushTarget::Room(r) => {
                f.kind = m::TARGET_ROOM;
                if let Some(room) = router.registry.room(r) {
                    room.copy_members(&mut f.buf);
                }
            }
            PushTarget::Everyone => {
                f.kind = m::TARGET_EVERYONE;
                f.walk = Walk::Shards { next: 0 };
            }
        }
        f
    }

    /// Enqueues the push for up to about `max` more recipients (a user's
    /// sessions are not split). Returns whether recipients remain.
    pub fn step(&mut self, max: usize) -> bool {
        let r = self.router;
        let mut done = 0usize;
        loop {
            while self.pos < self.buf.len() && done < max {
                self.tally.add(&self.buf[self.pos], self.push, r);
                self.pos += 1;
                done += 1;
            }
            if self.pos < self.buf.len() {
                return true;
            }
            self.buf.clear();
            self.pos = 0;
            match &mut self.walk {
                Walk::Done => return false,
                Walk::Shards { next } => {
                    if *next >= r.registry.shard_count() {
                        self.walk = Walk::Done;
                        return false;
                    }
                    r.registry.copy_shard(*next, &mut self.buf);
                    *next += 1;
                }
                Walk::Users { users, next } => {
                    let Some(u) = users.get(*next) else {
                        self.walk = Walk::Done;
                        return false;
                    };
                    *next += 1;
                    // A user counts as missing (undelivered) when no session
                    // of theirs has a connection: pushes parked in detached
                    // sessions wait for a resume that may never come, so the
                    // logic layer hears about them at once.
                    let buf = &mut self.buf;
                    r.registry.for_user(u.as_str(), |h| buf.push(h.clone()));
                    let live = self.tally.live;
                    for h in self.buf.drain(..) {
                        self.tally.add(&h, self.push, r);
                        done += 1;
                    }
                    if self.tally.live == live {
                        self.missing.push(u.clone());
                    }
                }
            }
            if done >= max {
                return true;
            }
        }
    }

    /// Ends the fan-out (whatever `step` left is not delivered) and returns
    /// what it did.
    pub fn finish(mut self) -> PushOutcome {
        let hot = m::hot();
        hot.pushes(self.kind).increment(1);
        hot.deliveries.increment(self.tally.sessions);
        self.router.return_buffer(std::mem::take(&mut self.buf));
        PushOutcome {
            sessions: self.tally.sessions,
            dropped: self.tally.dropped,
            missing_users: std::mem::take(&mut self.missing),
            closed: std::mem::take(&mut self.tally.closed),
            moved: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MultiLogin;
    use crate::ids::{DeviceId, SessionId, TransportKind};
    use crate::session::SessionInfo;

    fn session(registry: &Registry, id: u64, user: &str) -> SessionHandle {
        let h = SessionHandle::new(SessionId(id));
        h.set_info(SessionInfo {
            user: UserId::new(user),
            device: DeviceId::new("phone"),
            platform: pb::Platform::Ios,
            transport: TransportKind::Tcp,
            since_ms: 0,
        });
        registry.register(&h, MultiLogin::PerDevice);
        h
    }

    /// Node `b`'s registry and router, as a session moves to it.
    fn node_b() -> (Arc<Registry>, Router) {
        let registry = Arc::new(Registry::new());
        let router = Router::new(
            NodeId::new("b"),
            registry.clone(),
            1 << 20,
            SlowConsumerPolicy::Disconnect,
            8,
        );
        (registry, router)
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_queued_for_a_moved_session_here_is_not_queued_again_when_sent_on() {
        let (registry, router) = node_b();
        router.remember_moved_for(std::time::Duration::from_secs(7));
        let h = session(&registry, 1, "ann");
        let other = session(&registry, 2, "bob");
        let now = tokio::time::Instant::now().into_std();
        // It brought nothing; a broadcast reaches it here after it arrived.
        router.note_brought(h.id(), std::iter::empty(), now);
        let everyone = PushTarget::Everyone;
        let b1 = SharedPush::new("b1", b"x", "", "");
        assert_eq!(router.push(&everyone, &b1).sessions, 2);
        // The old node missed it there and sends it on, as a device push.
        let device = PushTarget::Device(UserId::new("ann"), DeviceId::new("phone"));
        let sent_on = SharedPush::new("b1", b"x", "", "");
        assert_eq!(router.push(&device, &sent_on).sessions, 0);
        assert_eq!((h.queued(), other.queued()), (1, 1));
        // A session that did not move is not looked at.
        let again = SharedPush::new("b1", b"x", "", "");
        let bob = PushTarget::Device(UserId::new("bob"), DeviceId::new("phone"));
        assert_eq!(router.push(&bob, &again).sessions, 1);
        // The memory lasts as long as the bus asked, not BROUGHT_FOR.
        tokio::time::advance(BROUGHT_FOR).await;
        let late = SharedPush::new("b1", b"x", "", "");
        assert_eq!(router.push(&device, &late).sessions, 0);
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        let later = SharedPush::new("b1", b"x", "", "");
        assert_eq!(router.push(&device, &later).sessions, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_a_moved_session_brought_is_not_queued_twice_for_a_while() {
        let (registry, router) = node_b();
        let h = session(&registry, 1, "ann");
        let brought = SharedPush::new("m1", b"hello", "", "");
        let now = tokio::time::Instant::now().into_std();
        router.note_brought(h.id(), std::iter::once(&brought.body[..]), now);
        let everyone = PushTarget::Everyone;
        // The same push, reaching this node too (a new object, the same bytes).
        let again = SharedPush::new("m1", b"hello", "", "");
        assert_eq!(router.push(&everyone, &again).sessions, 0);
        let other = SharedPush::new("m2", b"hello", "", "");
        assert_eq!(router.push(&everyone, &other).sessions, 1);
        assert_eq!(h.queued(), 1);
        // Past BROUGHT_FOR the same bytes are a new push, and the check is
        // off the hot path again.
        tokio::time::advance(BROUGHT_FOR).await;
        let later = SharedPush::new("m1", b"hello", "", "");
        assert_eq!(router.push(&everyone, &later).sessions, 1);
        assert_eq!(
            router
                .brought_count
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
