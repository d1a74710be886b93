//! The part of a session that other tasks touch: its delivery state (queues,
//! unacknowledged windows, sequence numbers), its close request, its uplink
//! dedup memory, its rooms, and the waker of the task that drives it.
//!
//! The handle outlives connections: after a drop the session is *detached*
//! (still registered, still queueing pushes) until a client resumes it on a
//! new connection or the resume window ends. Each attached connection holds a
//! generation number; a connection whose generation is stale (another one
//! resumed the session) no longer touches the shared state.
//!
//! Every lock here is a `parking_lot::Mutex` held for a few instructions and
//! never across an `.await`; the outbox lock is a leaf (nothing else is locked
//! while it is held), so fan-out can take it while holding a room's read lock.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::task::Waker;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::delivery::{Budget, Delivery, DeliveryConfig, Item, LaneResume, Lanes, Offer};
use crate::ids::{DeviceId, NodeId, RoomId, SessionId, TransportKind, UserId};
use crate::wire::pb::Lane;
use crate::wire::{pb, Code, SharedPush};

/// Who a logged-in session belongs to. Set once, at login.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub user: UserId,
    pub device: DeviceId,
    pub platform: pb::Platform,
    pub transport: TransportKind,
    pub since_ms: u64,
}

/// A request to close a session, made from outside its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseCmd {
    pub code: Code,
    pub reason: String,
    pub reconnect_to: String,
    pub reconnect_after_ms: u32,
}

impl CloseCmd {
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            reconnect_to: String::new(),
            reconnect_after_ms: 0,
        }
    }
}

/// Which session [`SessionHandle::close_outbox`] may end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Only while this connection generation holds the session.
    Gen(u32),
    /// Only while no connection is attached.
    Detached,
    /// Whatever is attached.
    Any,
}

/// Whether a session that closes with `code` keeps its state for a resume.
pub fn keeps_state(code: Code) -> bool {
    matches!(
        code,
        Code::ConnectionLost | Code::HeartbeatTimeout | Code::SlowConsumer | Code::AckTimeout
    )
}

/// What [`SessionHandle::enqueue`] did with a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued for a session with a connection.
    Queued,
    /// Queued for a detached session, to be replayed if it resumes.
    Parked,
    /// The queue was full and the policy is `drop`. The push's seq is used
    /// up: the client sees the gap.
    Dropped,
    /// The node's replay budget is spent, even after evicting what detached
    /// sessions held. The push's seq is used up: the client sees the gap.
    OverBudget,
    /// The queue was full and the policy is `disconnect`: the session is
    /// closing (its state is kept for a resume).
    SlowConsumer,
    /// The session is closing for good.
    Closed,
}

/// A remembered uplink, for answering retries within the dedup window.
#[derive(Debug, Clone)]
struct Sent {
    client_msg_id: Box<str>,
    server_msg_id: u64,
    seq: u64,
    at: Instant,
}

/// The answer to an uplink on this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uplink {
    /// New: forward it with this seq.
    New { seq: u64 },
    /// A retry of an accepted message: repeat its ack, forward nothing.
    Duplicate { server_msg_id: u64, seq: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    No,
    /// Slow consumer or ack timeout: the connection closes, the state stays
    /// for a resume.
    KeepState,
    /// Kicked, replaced, draining: the session ends with its connection.
    Final,
}

struct Outbox {
    delivery: Delivery,
    uplink_seq: u64,
    /// Uplinks accepted within the dedup window (boxed: idle sessions pay 8 bytes).
    #[allow(clippy::box_collection)]
    sent: Option<Box<VecDeque<Sent>>>,
    /// Boxed: a close request is rare, and idle sessions pay 8 bytes for it.
    close: Option<Box<CloseCmd>>,
    closing: Closing,
    /// The session ended: nothing is queued any more.
    closed: bool,
    /// No connection is attached (waiting for a resume).
    detached: bool,
    /// Generation of the attached connection.
    gen: u32,
    /// The transport of the attached (or last attached) connection: a
    /// resume may move the session from QUIC to TCP and back. (It fits in
    /// the struct's padding: the shared handle stays 176 bytes.)
    transport: TransportKind,
    waker: Option<Waker>,
}

impl Outbox {
    /// Forgets uplinks older than `window`; frees the list once empty.
    fn prune_sent(&mut self, now: Instant, window: Duration) {
        if let Some(sent) = self.sent.as_mut() {
            while sent
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > window)
            {
                sent.pop_front();
            }
            if sent.is_empty() {
                self.sent = None;
            }
        }
    }
}

struct Rooms {
    /// Allocated only while the session is in a room: 8 bytes when idle
    /// instead of a Vec's 24 (hence the box around a collection).
    #[allow(clippy::box_collection)]
    list: Option<Box<Vec<RoomId>>>,
    closed: bool,
}

struct Shared {
    id: SessionId,
    info: OnceLock<SessionInfo>,
    outbox: Mutex<Outbox>,
    rooms: Mutex<Rooms>,
}

/// A cheap, cloneable reference to one connection or session.
#[derive(Clone)]
pub struct SessionHandle(Arc<Shared>);

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.0.id)
            .field("info", &self.0.info.get())
            .finish()
    }
}

impl SessionHandle {
    /// A handle for a new connection, not yet logged in (generation 0).
    pub fn new(id: SessionId) -> Self {
        Self(Arc::new(Shared {
            id,
            info: OnceLock::new(),
            outbox: Mutex::new(Outbox {
                delivery: Delivery::default(),
                uplink_seq: 1,
                sent: None,
                close: None,
                closing: Closing::No,
                closed: false,
                detached: false,
                gen: 0,
                transport: TransportKind::Memory,
                waker: None,
            }),
            rooms: Mutex::new(Rooms {
                list: None,
                closed: false,
            }),
        }))
    }

    pub fn id(&self) -> SessionId {
        self.0.id
    }

    /// Identity of the session; `None` before login. Its `transport` is
    /// the login's; [`SessionHandle::transport`] is the current one.
    pub fn info(&self) -> Option<&SessionInfo> {
        self.0.info.get()
    }

    /// Records the identity at login. Returns false if it was already set.
    pub fn set_info(&self, info: SessionInfo) -> bool {
        let kind = info.transport;
        let ok = self.0.info.set(info).is_ok();
        if ok {
            self.0.outbox.lock().transport = kind;
        }
        ok
    }

    /// The transport of the connection attached now (or last), which a
    /// resume may have changed since login.
    pub fn transport(&self) -> TransportKind {
        self.0.outbox.lock().transport
    }

    /// Queues a shared push, assigning the next sequence number of its lane.
    /// Never blocks beyond the leaf outbox lock.
    /// Pushes evicted to make room (a detached session's oldest) go to
    /// `evicted`, for reports.
    pub fn enqueue(
        &self,
        push: &SharedPush,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
        evicted: &mut Vec<Item>,
    ) -> Enqueued {
        let (res, waker) = self.offer(push, cfg, budget, evicted);
        if let Some(w) = waker {
            w.wake();
        }
        res
    }

    /// Like [`SessionHandle::enqueue`], but the session's task is woken by
    /// `delay`'s next flush instead of at once, so that pushes arriving in
    /// the meantime go out in the same write.
    pub fn enqueue_deferred(
        &self,
        push: &SharedPush,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
        evicted: &mut Vec<Item>,
        delay: &crate::router::WriteDelay,
    ) -> Enqueued {
        let (res, waker) = self.offer(push, cfg, budget, evicted);
        if let Some(w) = waker {
            delay.defer(w);
        }
        res
    }

    fn offer(
        &self,
        push: &SharedPush,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
        evicted: &mut Vec<Item>,
    ) -> (Enqueued, Option<Waker>) {
        if let Some(r) = self.offer_once(push, cfg, budget, evicted, false) {
            return r;
        }
        // The node's budget is spent: make room with no lock held (detached
        // sessions' oldest pushes are evicted), then try once more; a second
        // refusal uses up the seq.
        budget.make_room(push.body.len() + crate::budget::ITEM_OVERHEAD);
        self.offer_once(push, cfg, budget, evicted, true)
            .unwrap_or((Enqueued::OverBudget, None))
    }

    /// One try of [`SessionHandle::offer`] under the outbox lock. `None`: no
    /// room in the node's budget and `last` is false (nothing changed).
    fn offer_once(
        &self,
        push: &SharedPush,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
        evicted: &mut Vec<Item>,
        last: bool,
    ) -> Option<(Enqueued, Option<Waker>)> {
        let waker;
        let res = {
            let mut o = self.0.outbox.lock();
            if o.closed || o.closing == Closing::Final {
                return Some((Enqueued::Closed, None));
            }
            // A slow consumer whose connection is going keeps queueing as if
            // detached: oldest out, the resume reports the gap.
            let detached = o.detached || o.closing == Closing::KeepState;
            match o.delivery.enqueue(push, detached, cfg, budget, evicted) {
                Offer::Queued { wake } => {
                    waker = if wake { o.waker.take() } else { None };
                    if detached {
                        budget.note_detached_add();
                        Enqueued::Parked
                    } else {
                        Enqueued::Queued
                    }
                }
                // A connected client is told of the drop with a `Gap` frame:
                // wake its task to write it.
                Offer::Dropped => {
                    let w = if detached { None } else { o.waker.take() };
                    return Some((Enqueued::Dropped, w));
                }
                Offer::NoRoom if !last => return None,
                Offer::NoRoom => {
                    o.delivery.refuse(push.lane, !detached);
                    let w = if detached { None } else { o.waker.take() };
                    return Some((Enqueued::OverBudget, w));
                }
                Offer::SlowConsumer => {
                    o.close = Some(Box::new(CloseCmd::new(
                        Code::SlowConsumer,
                        "outbound queue over its byte bound: the client is not reading fast enough",
                    )));
                    o.closing = Closing::KeepState;
                    // The close is not deferred: the task acts on it at once.
                    if let Some(w) = o.waker.take() {
                        w.wake();
                    }
                    waker = None;
                    Enqueued::SlowConsumer
                }
            }
        };
        Some((res, waker))
    }

    /// Bytes this session holds (bodies plus the per-push overhead).
    pub fn held(&self) -> usize {
        self.0.outbox.lock().delivery.held()
    }

    /// While no connection is attached: when its oldest queued push arrived.
    pub fn oldest_detached(&self) -> Option<Instant> {
        let o = self.0.outbox.lock();
        if !o.detached || o.closed {
            return None;
        }
        o.delivery.oldest_queued()
    }

    /// While no connection is attached: evicts the oldest queued push into
    /// `out` (the resume reports the gap). False when attached, ended or
    /// holding nothing.
    pub fn evict_oldest_detached(&self, budget: &Budget, out: &mut Vec<Item>) -> bool {
        let mut o = self.0.outbox.lock();
        if !o.detached || o.closed {
            return false;
        }
        o.delivery.evict_oldest(budget, out)
    }

    /// Asks the attached connection to close with `cmd` (the first request
    /// wins). The session ends with it unless `cmd.code` keeps state.
    pub fn request_close(&self, cmd: CloseCmd) {
        let waker = {
            let mut o = self.0.outbox.lock();
            let final_cmd = !keeps_state(cmd.code);
            match o.closing {
                _ if o.closed => return,
                Closing::Final => return,
                // Already closing but keeping state (slow consumer): a kick or
                // replacement still ends the session when the connection goes.
                Closing::KeepState if !final_cmd => return,
                Closing::KeepState | Closing::No => {}
            }
            o.closing = if final_cmd {
                Closing::Final
            } else {
                Closing::KeepState
            };
            o.close = Some(Box::new(cmd));
            o.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wakes the attached connection's task (timer wheel, drain).
    pub fn wake(&self) {
        let w = self.0.outbox.lock().waker.take();
        if let Some(w) = w {
            w.wake();
        }
    }

    /// Registers the waker of the connection of generation `gen`; refused
    /// (false) when another connection has taken the session over.
    pub fn register_waker(&self, gen: u32, w: &Waker) -> bool {
        let mut o = self.0.outbox.lock();
        if o.gen != gen {
            return false;
        }
        match &o.waker {
            Some(old) if old.will_wake(w) => {}
            _ => o.waker = Some(w.clone()),
        }
        true
    }

    /// Hands the session's wake-ups to a parked connection's `waker`, if
    /// nothing waits: the connection of generation `gen` still holds the
    /// session, nothing is queued or unacknowledged, no close is asked, and
    /// (with `current`) nobody has taken its task's waker since that poll
    /// began (a push, a timer or a close request takes it to wake the
    /// task). Under the session's lock, so a push either comes before (and
    /// parking is refused) or after (and wakes `waker`).
    pub fn try_park(&self, gen: u32, waker: Waker, current: bool) -> bool {
        let mut o = self.0.outbox.lock();
        if o.gen != gen
            || (current && o.waker.is_none())
            || !o.delivery.is_idle()
            || o.close.is_some()
            || o.closed
            || o.detached
        {
            return false;
        }
        o.waker = Some(waker);
        true
    }

    /// Takes a pending close request (driver side).
    pub fn take_close(&self, gen: u32) -> Option<CloseCmd> {
        let mut o = self.0.outbox.lock();
        if o.gen != gen {
            return None;
        }
        o.close.take().map(|b| *b)
    }

    /// Moves what may be written now on an output carrying `lanes` into
    /// the windows, showing each push to `out` (driver side, under the
    /// session's lock: `out` only copies it into a write batch); see
    /// [`Delivery::poll_send`]. Nothing for a stale generation.
    pub fn poll_send(
        &self,
        gen: u32,
        now: Instant,
        max: usize,
        lanes: Lanes,
        cfg: &DeliveryConfig,
        out: &mut impl super::delivery::Sink,
    ) -> usize {
        let mut o = self.0.outbox.lock();
        if o.gen != gen || o.closed {
            return 0;
        }
        o.delivery.poll_send(now, max, lanes, cfg, out)
    }

    /// When the pushes in flight on `lanes` will have waited `ack_timeout`
    /// without ack progress (see [`Delivery::ack_deadline`]).
    pub fn ack_deadline(&self, gen: u32, lanes: Lanes, cfg: &DeliveryConfig) -> Option<Instant> {
        let o = self.0.outbox.lock();
        if o.gen != gen || o.closed {
            return None;
        }
        o.delivery.ack_deadline(lanes, cfg)
    }

    /// A refused write on the output carrying `lanes` moved again.
    pub fn progress(&self, gen: u32, lanes: Lanes, now: Instant) {
        let mut o = self.0.outbox.lock();
        if o.gen == gen && !o.closed {
            o.delivery.progress(lanes, now);
        }
    }

    /// Applies a client acknowledgement; acknowledged pushes go to `acked`.
    pub fn ack(
        &self,
        lane: Lane,
        up_to: u64,
        ranges: &[(u64, u64)],
        now: Instant,
        budget: &Budget,
        acked: &mut Vec<Item>,
    ) {
        self.0
            .outbox
            .lock()
            .delivery
            .ack(lane, up_to, ranges, now, budget, acked);
    }

    /// Pushes waiting to be written.
    pub fn queued(&self) -> usize {
        self.0.outbox.lock().delivery.queued()
    }

    /// Charged bytes waiting to be written, per lane.
    pub fn queued_bytes(&self) -> [usize; 2] {
        self.0.outbox.lock().delivery.queued_bytes()
    }

    /// Pushes written and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.0.outbox.lock().delivery.unacked()
    }

    /// Whether the session holds no delivery buffers.
    pub fn delivery_idle(&self) -> bool {
        self.0.outbox.lock().delivery.is_idle()
    }

    /// The seq the next push of `lane` will get.
    pub fn next_seq(&self, lane: Lane) -> u64 {
        self.0.outbox.lock().delivery.next_seq(lane)
    }

    /// The uplink seq the next accepted Send will get.
    pub fn next_uplink_seq(&self) -> u64 {
        self.0.outbox.lock().uplink_seq
    }

    /// Checks an uplink against the dedup memory and, if new, assigns its seq
    /// and remembers it with `server_msg_id`.
    pub fn uplink(
        &self,
        client_msg_id: &str,
        server_msg_id: u64,
        now: Instant,
        window: Duration,
        max: usize,
    ) -> Uplink {
        let mut o = self.0.outbox.lock();
        o.prune_sent(now, window);
        if let Some(sent) = o.sent.as_ref() {
            if let Some(s) = sent.iter().find(|s| &*s.client_msg_id == client_msg_id) {
                return Uplink::Duplicate {
                    server_msg_id: s.server_msg_id,
                    seq: s.seq,
                };
            }
        }
        let seq = o.uplink_seq;
        o.uplink_seq += 1;
        if max > 0 {
            let sent = o.sent.get_or_insert_with(Box::default);
            if sent.len() >= max {
                sent.pop_front();
            }
            sent.push_back(Sent {
                client_msg_id: client_msg_id.into(),
                server_msg_id,
                seq,
                at: now,
            });
        }
        Uplink::New { seq }
    }

    /// Forgets an uplink that could not be forwarded, so a retry runs again,
    /// and gives its seq back (uplinks of a session are handled one at a time
    /// by its connection, so it was the last one assigned).
    pub fn forget_uplink(&self, client_msg_id: &str, seq: u64) {
        let mut o = self.0.outbox.lock();
        if o.uplink_seq == seq + 1 {
            o.uplink_seq = seq;
        }
        if let Some(sent) = o.sent.as_mut() {
            sent.retain(|s| &*s.client_msg_id != client_msg_id);
            if sent.is_empty() {
                o.sent = None;
            }
        }
    }

    /// Drops dedup entries older than `window` (idle sessions give memory back).
    pub fn prune_uplinks(&self, now: Instant, window: Duration) {
        self.0.outbox.lock().prune_sent(now, window);
    }

    /// The connection of generation `gen` is gone and the session keeps its
    /// state: unacknowledged pushes go back to the queue for a resume.
    /// Returns false when the generation is stale or the session ended.
    pub fn detach(&self, gen: u32) -> bool {
        let mut o = self.0.outbox.lock();
        if o.gen != gen || o.closed || o.closing == Closing::Final {
            return false;
        }
        o.delivery.detach();
        o.detached = true;
        o.close = None;
        o.closing = Closing::No;
        o.waker = None;
        true
    }

    /// A new connection takes the session over (resume): the previous one,
    /// if still attached, is told to close and no longer touches the state.
    /// Replays start from `last` (per lane). Returns the new generation and
    /// what the resume found; pushes found delivered go to `delivered`, pushes
    /// given up after `cfg.max_tries` connections go to `failed`.
    pub fn attach(
        &self,
        kind: TransportKind,
        last: [u64; 2],
        cfg: &DeliveryConfig,
        budget: &Budget,
        delivered: &mut Vec<Item>,
        failed: &mut Vec<Item>,
    ) -> Option<(u32, [LaneResume; 2], Option<Waker>)> {
        let mut o = self.0.outbox.lock();
        if o.closed || o.closing == Closing::Final {
            return None;
        }
        o.delivery.detach();
        let res = o.delivery.resume(last, cfg, budget, delivered, failed);
        o.gen = o.gen.wrapping_add(1);
        o.transport = kind;
        o.detached = false;
        o.close = None;
        o.closing = Closing::No;
        // The previous connection's waker: wake it so it notices it is stale.
        Some((o.gen, res, o.waker.take()))
    }

    /// Removes every queued and unacknowledged push as if it had been written
    /// and acknowledged; returns how many (benches and simulations use it).
    pub fn drain_all(&self, budget: &Budget) -> usize {
        let mut out = Vec::new();
        self.0.outbox.lock().delivery.release_all(budget, &mut out);
        out.len()
    }

    /// Whether no connection is attached.
    pub fn is_detached(&self) -> bool {
        self.0.outbox.lock().detached
    }

    /// The generation of the attached connection.
    pub fn gen(&self) -> u32 {
        self.0.outbox.lock().gen
    }

    /// Ends the session for good: later pushes are refused, and everything
    /// still held comes back (for expiry reports). Which sessions it ends:
    /// [`End::Gen`] only while that connection generation holds it,
    /// [`End::Detached`] only while no connection is attached (checked under
    /// the same lock as a resume, so the two cannot interleave), [`End::Any`]
    /// whatever is attached.
    pub fn close_outbox(&self, which: End, budget: &Budget, out: &mut Vec<Item>) -> bool {
        let mut o = self.0.outbox.lock();
        let ok = match which {
            End::Gen(g) => g == o.gen,
            End::Detached => o.detached,
            End::Any => true,
        };
        if !ok || o.closed {
            return false;
        }
        o.closed = true;
        o.closing = Closing::Final;
        o.detached = false;
        o.sent = None;
        o.waker = None;
        o.delivery.release_all(budget, out);
        true
    }

    /// Adds `room` to this session's list, unless closed or at `max`.
    /// Called with the registry's room shard *not* locked (lock order: rooms → shard).
    pub(crate) fn with_rooms<R>(&self, f: impl FnOnce(&mut Vec<RoomId>, bool) -> R) -> R {
        let mut r = self.0.rooms.lock();
        let closed = r.closed;
        let mut list = r.list.take().unwrap_or_default();
        let res = f(&mut list, closed);
        if !list.is_empty() {
            r.list = Some(list);
        }
        res
    }

    /// Marks rooms closed (no further joins) and takes the list.
    pub(crate) fn take_rooms(&self) -> Vec<RoomId> {
        let mut r = self.0.rooms.lock();
        r.closed = true;
        r.list.take().map(|b| *b).unwrap_or_default()
    }

    /// Rooms this session is in.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.0
            .rooms
            .lock()
            .list
            .as_deref()
            .cloned()
            .unwrap_or_default()
    }

    /// A weak reference for the timer wheel.
    pub(crate) fn downgrade(&self) -> WeakSession {
        WeakSession(Arc::downgrade(&self.0))
    }

    /// Presence record of this session (`None` before login or while detached).
    pub fn presence(&self, node: &NodeId) -> Option<pb::DevicePresence> {
        let i = self.info()?;
        let (detached, transport) = {
            let o = self.0.outbox.lock();
            (o.detached, o.transport)
        };
        if detached {
            return None;
        }
        Some(pb::DevicePresence {
            device_id: i.device.to_string(),
            session_id: self.id().0,
            node_id: node.to_string(),
            platform: i.platform as i32,
            transport: transport.as_str().into(),
            since_ms: i.since_ms,
            remote_addr: String::new(),
        })
    }

    /// Same underlying session?
    pub fn ptr_eq(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Bytes of one session's shared state (Arc counts excluded), for the size tests.
pub fn shared_size() -> usize {
    std::mem::size_of::<Shared>()
}

/// A handle that does not keep the session alive (timer wheel entries).
pub struct WeakSession(std::sync::Weak<Shared>);

impl WeakSession {
    /// Whether this is a reference to `h`'s session.
    pub fn is(&self, h: &SessionHandle) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(&h.0))
    }

    /// Whether the session is gone (the entry only keeps its allocation).
    pub fn is_dead(&self) -> bool {
        self.0.strong_count() == 0
    }

    /// Wakes the session's task if it still exists.
    pub fn wake(&self) -> bool {
        match self.0.upgrade() {
            Some(s) => {
                let w = s.outbox.lock().waker.take();
                if let Some(w) = w {
                    w.wake();
                }
                true
            }
            None => false,
        }
    }
}
