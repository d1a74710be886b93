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
use super::write_delay::WriteDelay;
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

/// A session's whole state on its way to another node
/// ([`SessionHandle::take_for_move`], [`SessionHandle::restore`]).
#[derive(Debug)]
pub struct Moved {
    pub info: SessionInfo,
    pub delivery: super::delivery::Exported,
    pub uplink_seq: u64,
    pub uplinks: Vec<MovedUplink>,
    pub rooms: Vec<RoomId>,
}

/// An uplink in a moved session's dedup memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedUplink {
    pub client_msg_id: String,
    pub server_msg_id: u64,
    pub seq: u64,
    /// How long ago it was accepted.
    pub age: Duration,
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
        delay: &WriteDelay,
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
        let keep = keeps_state(cmd.code);
        self.close_with(cmd, keep);
    }

    /// Like [`SessionHandle::request_close`], but the session keeps its
    /// state whatever the code: a draining node of a cluster closes its
    /// connections with `CODE_SERVER_DRAINING` and keeps their sessions for
    /// the devices to resume on another node.
    pub fn request_close_keeping(&self, cmd: CloseCmd) {
        self.close_with(cmd, true);
    }

    fn close_with(&self, cmd: CloseCmd, keep: bool) {
        let waker = {
            let mut o = self.0.outbox.lock();
            let final_cmd = !keep;
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

    /// Ends the session here for a move to another node (a resume there):
    /// the connection attached, if any, is superseded as by a local resume
    /// (it sees a new generation, and closes), and the whole state is taken
    /// out: delivery, uplink memory, rooms. `None` when the session already
    /// ended. The caller removes it from the registry.
    pub fn take_for_move(&self, now: Instant, budget: &Budget) -> Option<Moved> {
        let info = self.info()?.clone();
        let (delivery, uplink_seq, uplinks, old) = {
            let mut o = self.0.outbox.lock();
            if o.closed || o.closing == Closing::Final {
                return None;
            }
            o.delivery.detach();
            let delivery = o.delivery.export(budget);
            let uplinks = o
                .sent
                .take()
                .map(|b| {
                    b.iter()
                        .map(|s| MovedUplink {
                            client_msg_id: s.client_msg_id.to_string(),
                            server_msg_id: s.server_msg_id,
                            seq: s.seq,
                            age: now.saturating_duration_since(s.at),
                        })
                        .collect()
                })
                .unwrap_or_default();
            o.gen = o.gen.wrapping_add(1);
            o.closed = true;
            o.closing = Closing::Final;
            o.detached = false;
            (delivery, o.uplink_seq, uplinks, o.waker.take())
        };
        if let Some(w) = old {
            // The connection that had it must notice it lost the session.
            w.wake();
        }
        Some(Moved {
            info,
            delivery,
            uplink_seq,
            uplinks,
            rooms: self.take_rooms(),
        })
    }

    /// A detached session rebuilt here from a state moved from another node
    /// (its id stays the same); the caller registers it and its rooms.
    pub fn restore(
        id: SessionId,
        m: Moved,
        now: Instant,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
    ) -> Self {
        let h = Self::new(id);
        let kind = m.info.transport;
        h.set_info(m.info);
        {
            let mut o = h.0.outbox.lock();
            o.delivery = Delivery::import(m.delivery, cfg, budget);
            o.uplink_seq = m.uplink_seq.max(1);
            if !m.uplinks.is_empty() {
                o.sent = Some(Box::new(
                    m.uplinks
                        .into_iter()
                        .map(|u| Sent {
                            client_msg_id: u.client_msg_id.into_boxed_str(),
                            server_msg_id: u.server_msg_id,
                            seq: u.seq,
                            at: now.checked_sub(u.age).unwrap_or(now),
                        })
                        .collect(),
                ));
            }
            o.detached = true;
            o.transport = kind;
        }
        h
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

#[cfg(test)]
mod tests {
    //! The handle's rules, deterministic: explicit instants, counting wakers,
    //! no runtime and no clock but the arrival stamp of each push.
    use super::*;
    use crate::config::SlowConsumerPolicy;
    use crate::session::WriteDelay;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Wakes>, Waker) {
        let w = Arc::new(Wakes::default());
        (w.clone(), Waker::from(w))
    }

    fn count(w: &Wakes) -> usize {
        w.0.load(Ordering::SeqCst)
    }

    fn push(lane: Lane, id: &str) -> SharedPush {
        SharedPush::with(id, b"x", "t", "", lane, false)
    }

    /// What one test push is charged (body plus the per-item overhead).
    fn one() -> usize {
        push(Lane::Interactive, "m").body.len() + crate::budget::ITEM_OVERHEAD
    }

    /// What one test bulk push is charged (the lane is encoded in the body).
    fn one_bulk() -> usize {
        push(Lane::Bulk, "m").body.len() + crate::budget::ITEM_OVERHEAD
    }

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            queue_bytes: [4 * one(), 4 * one_bulk()],
            detached_bytes: 16 * one(),
            detached_bytes_per_user: 32 * one(),
            stall_timeout: Duration::from_secs(30),
            window: [3, 2],
            policy: [SlowConsumerPolicy::Disconnect, SlowConsumerPolicy::Drop],
            ack_timeout: Duration::from_secs(1),
            max_tries: 3,
        }
    }

    impl SessionHandle {
        fn join_test_room(&self, room: &str) {
            self.with_rooms(|l, _| l.push(RoomId::new(room)));
        }
    }

    fn handle(id: u64) -> SessionHandle {
        let h = SessionHandle::new(SessionId(id));
        assert!(h.set_info(SessionInfo {
            user: UserId::new("ann"),
            device: DeviceId::new("phone"),
            platform: pb::Platform::Ios,
            transport: TransportKind::Tcp,
            since_ms: 7,
        }));
        h
    }

    fn offer(h: &SessionHandle, lane: Lane, c: &DeliveryConfig, b: &Arc<Budget>) -> Enqueued {
        h.enqueue(&push(lane, "m"), c, b, &mut Vec::new())
    }

    /// Records what a write would carry: pushes and gap notices.
    #[derive(Default)]
    struct Written(Vec<String>);

    impl super::super::delivery::Sink for Written {
        fn push(&mut self, lane: Lane, seq: u64, _: &SharedPush) {
            self.0.push(format!("{lane:?} {seq}"));
        }
        fn gap(&mut self, lane: Lane, first: u64, last: u64) {
            self.0.push(format!("{lane:?} gap {first}..={last}"));
        }
    }

    fn send(h: &SessionHandle, gen: u32, now: Instant, c: &DeliveryConfig) -> Vec<String> {
        let mut w = Written::default();
        h.poll_send(gen, now, 100, Lanes::ALL, c, &mut w);
        w.0
    }

    fn attach(
        h: &SessionHandle,
        last: [u64; 2],
        c: &DeliveryConfig,
        b: &Budget,
    ) -> (u32, [LaneResume; 2], Option<Waker>, Vec<u64>) {
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        let (gen, res, w) = h
            .attach(TransportKind::Tcp, last, c, b, &mut delivered, &mut failed)
            .expect("attached");
        assert!(failed.is_empty(), "{failed:?}");
        (gen, res, w, delivered.iter().map(|i| i.seq).collect())
    }

    #[test]
    fn only_the_codes_of_a_lost_connection_keep_the_session() {
        let kept: Vec<Code> = (0..10_000)
            .filter_map(|n| Code::try_from(n).ok())
            .filter(|&c| keeps_state(c))
            .collect();
        assert_eq!(
            kept,
            vec![
                Code::SlowConsumer,
                Code::HeartbeatTimeout,
                Code::AckTimeout,
                Code::ConnectionLost
            ]
        );
    }

    #[test]
    fn info_is_set_once_and_a_resume_moves_the_transport_and_presence() {
        let h = SessionHandle::new(SessionId(5));
        assert!(h.info().is_none());
        assert!(h.presence(&NodeId::new("n1")).is_none(), "not logged in");
        assert_eq!(h.transport(), TransportKind::Memory);
        let info = SessionInfo {
            user: UserId::new("ann"),
            device: DeviceId::new("phone"),
            platform: pb::Platform::Android,
            transport: TransportKind::Quic,
            since_ms: 42,
        };
        assert!(h.set_info(info.clone()));
        assert!(!h.set_info(SessionInfo {
            transport: TransportKind::Tls,
            ..info
        }));
        assert_eq!(h.transport(), TransportKind::Quic, "the first login's");
        let p = h.presence(&NodeId::new("n1")).expect("presence");
        assert_eq!(
            (p.device_id.as_str(), p.session_id, p.node_id.as_str()),
            ("phone", 5, "n1")
        );
        assert_eq!((p.transport.as_str(), p.since_ms), ("quic", 42));
        assert_eq!(p.platform, pb::Platform::Android as i32);

        let (c, b) = (cfg(), Budget::new(1 << 20));
        assert!(h.detach(0));
        assert!(h.presence(&NodeId::new("n1")).is_none(), "detached");
        attach(&h, [0, 0], &c, &b);
        assert_eq!(h.transport(), TransportKind::Tcp, "the resume's transport");
        assert_eq!(
            h.info().map(|i| i.transport),
            Some(TransportKind::Quic),
            "the login's stays in the info"
        );
        let p = h.presence(&NodeId::new("n1")).expect("attached again");
        assert_eq!(p.transport, "tcp");
    }

    #[test]
    fn a_resume_moves_to_a_new_generation_and_the_old_one_touches_nothing() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let h = handle(1);
        assert_eq!(h.gen(), 0);
        let (old, w_old) = waker();
        assert!(h.register_waker(0, &w_old));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!(send(&h, 0, t0, &c), vec!["Interactive 1"]);
        assert!(h.register_waker(0, &w_old));

        // A resume while the old connection is still attached: its window
        // goes back to the queue, and its waker comes back to be woken.
        let (gen, res, w, delivered) = attach(&h, [0, 0], &c, &b);
        assert_eq!(gen, 1);
        assert_eq!(h.gen(), 1);
        assert!(delivered.is_empty());
        assert_eq!(res[0].replay, 1, "the window is replayed");
        assert!(w.expect("the old connection's waker").will_wake(&w_old));
        assert_eq!((h.queued(), h.unacked()), (1, 0));

        // The old generation is refused everywhere.
        assert!(!h.register_waker(0, &w_old));
        h.request_close(CloseCmd::new(Code::SlowConsumer, "slow"));
        assert_eq!(h.take_close(0), None, "a stale generation takes no close");
        assert_eq!(send(&h, 0, t0, &c), Vec::<String>::new());
        assert_eq!(h.queued(), 1, "a stale generation writes nothing");
        assert!(!h.try_park(0, waker().1, false));
        assert!(!h.detach(0));
        assert!(!h.is_detached());
        let mut out = Vec::new();
        assert!(!h.close_outbox(End::Gen(0), &b, &mut out));
        assert!(out.is_empty());

        // The new one is served.
        assert_eq!(h.take_close(1).map(|c| c.code), Some(Code::SlowConsumer));
        assert_eq!(h.take_close(1), None, "taken once");
        assert!(h.detach(1));
        let (gen, _, w, _) = attach(&h, [0, 0], &c, &b);
        assert_eq!(gen, 2);
        assert!(w.is_none(), "a detached session has no waker");
        assert_eq!(send(&h, 2, t0, &c), vec!["Interactive 1"]);
        assert_eq!(
            h.ack_deadline(2, Lanes::ALL, &c),
            Some(t0 + Duration::from_secs(1))
        );
        assert_eq!(h.ack_deadline(1, Lanes::ALL, &c), None, "stale");
        let t1 = t0 + Duration::from_millis(600);
        h.progress(1, Lanes::ALL, t1);
        assert_eq!(
            h.ack_deadline(2, Lanes::ALL, &c),
            Some(t0 + Duration::from_secs(1)),
            "a stale generation's progress moves nothing"
        );
        h.progress(2, Lanes::ALL, t1);
        assert_eq!(
            h.ack_deadline(2, Lanes::ALL, &c),
            Some(t1 + Duration::from_secs(1))
        );
        assert_eq!(
            old.0.load(Ordering::SeqCst),
            1,
            "woken by the first push only"
        );
    }

    #[test]
    fn detach_and_resume_replay_what_was_not_acknowledged_and_report_the_rest() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let h = handle(2);
        for _ in 0..3 {
            offer(&h, Lane::Interactive, &c, &b);
        }
        offer(&h, Lane::Bulk, &c, &b);
        assert_eq!(
            send(&h, 0, t0, &c),
            vec!["Interactive 1", "Interactive 2", "Interactive 3", "Bulk 1"]
        );
        let mut acked = Vec::new();
        h.ack(Lane::Interactive, 1, &[], t0, &b, &mut acked);
        assert_eq!(acked.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!((h.queued(), h.unacked()), (0, 3));

        assert!(h.detach(0));
        assert!(h.is_detached());
        assert_eq!((h.queued(), h.unacked()), (3, 0), "the window went back");
        assert_eq!(h.ack_deadline(0, Lanes::ALL, &c), None);
        let late = push(Lane::Interactive, "m");
        assert_eq!(h.enqueue(&late, &c, &b, &mut Vec::new()), Enqueued::Parked);
        assert_eq!(h.held(), 3 * one() + one_bulk());
        assert_eq!(h.next_seq(Lane::Interactive), 5);
        assert_eq!(h.next_seq(Lane::Bulk), 2);

        // The client has interactive 2 and bulk 1; 4 was never written, so a
        // claim beyond 3 does not drop it.
        let (gen, res, _, delivered) = attach(&h, [9, 1], &c, &b);
        assert_eq!(gen, 1);
        assert_eq!(delivered, vec![2, 3, 1], "interactive 2 and 3, bulk 1");
        assert_eq!(
            res,
            [
                LaneResume {
                    first_held: 4,
                    gap: false,
                    replay: 1
                },
                LaneResume {
                    first_held: 2,
                    gap: false,
                    replay: 0
                }
            ]
        );
        assert!(!h.is_detached());
        assert_eq!(send(&h, 1, t0, &c), vec!["Interactive 4"]);
        h.ack(Lane::Interactive, 4, &[], t0, &b, &mut acked);
        assert!(h.delivery_idle());
        drop((acked, late));
        assert_eq!(b.used(), 0, "every byte given back");
    }

    #[test]
    fn a_detached_session_that_overflows_reports_the_gap_at_the_resume() {
        let (mut c, b) = (cfg(), Budget::new(1 << 20));
        c.detached_bytes = 6 * one();
        let h = handle(3);
        assert!(h.detach(0));
        let mut evicted = Vec::new();
        for i in 0..8 {
            let r = h.enqueue(&push(Lane::Interactive, "m"), &c, &b, &mut evicted);
            assert_eq!(r, Enqueued::Parked, "push {i}");
        }
        assert_eq!(
            evicted.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1, 2],
            "the oldest go past the detached bound"
        );
        assert_eq!(h.held(), 6 * one());
        let (_, res, _, _) = attach(&h, [0, 0], &c, &b);
        assert_eq!(
            res[0],
            LaneResume {
                first_held: 3,
                gap: true,
                replay: 6
            }
        );
    }

    #[test]
    fn enqueue_queues_or_parks_and_wakes_the_attached_task_once_per_empty_lane() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let h = handle(4);
        let (w, wk) = waker();
        assert!(h.register_waker(0, &wk));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!(count(&w), 1);
        assert!(h.register_waker(0, &wk));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!(count(&w), 1, "the lane was not empty: no wake-up");
        assert_eq!(offer(&h, Lane::Bulk, &c, &b), Enqueued::Queued);
        assert_eq!(count(&w), 2, "an empty lane wakes the task");
        assert_eq!(h.queued(), 3);
        assert_eq!(h.queued_bytes(), [2 * one(), one_bulk()]);
        assert_eq!(h.held(), 2 * one() + one_bulk());
        assert_eq!(h.held(), b.used(), "one body each, and one item each");

        // A second waker replaces the first; an equivalent one is kept.
        let (w2, wk2) = waker();
        assert!(h.register_waker(0, &wk));
        assert!(h.register_waker(0, &wk2));
        assert!(h.register_waker(0, &wk2.clone()));
        h.wake();
        assert_eq!((count(&w), count(&w2)), (2, 1));
        h.wake();
        assert_eq!(count(&w2), 1, "a wake-up takes the waker");

        // Detached: parked for the resume, nobody woken.
        assert!(h.detach(0));
        assert!(h.register_waker(0, &wk2));
        h.request_close(CloseCmd::new(Code::ConnectionLost, "x"));
        let before = count(&w2);
        assert!(h.detach(0));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Parked);
        assert_eq!(count(&w2), before, "detach dropped the waker");
        assert_eq!(h.take_close(0), None, "detach cleared the close request");

        // Everything goes at once for benches.
        assert_eq!(h.drain_all(&b), 4);
        assert_eq!((h.held(), h.queued()), (0, 0));
    }

    #[test]
    fn a_full_lane_drops_or_cuts_per_its_policy() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let h = handle(6);
        let (w, wk) = waker();
        for _ in 0..4 {
            assert_eq!(offer(&h, Lane::Bulk, &c, &b), Enqueued::Queued);
        }
        assert!(h.register_waker(0, &wk));
        let held = h.held();
        assert_eq!(offer(&h, Lane::Bulk, &c, &b), Enqueued::Dropped);
        assert_eq!(count(&w), 1, "woken to write the gap notice");
        assert_eq!(h.held(), held, "nothing charged");
        assert_eq!(h.next_seq(Lane::Bulk), 6, "the seq is used up");
        assert_eq!(
            send(&h, 0, Instant::now(), &c),
            vec!["Bulk 1", "Bulk 2"],
            "the gap waits for the pushes below it"
        );
        h.ack(Lane::Bulk, 2, &[], Instant::now(), &b, &mut Vec::new());
        assert_eq!(
            send(&h, 0, Instant::now(), &c),
            vec!["Bulk 3", "Bulk 4", "Bulk gap 5..=5"]
        );

        // Interactive disconnects: the push is kept, the close keeps state,
        // and the task is woken at once.
        for _ in 0..4 {
            assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        }
        assert!(h.register_waker(0, &wk));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::SlowConsumer);
        assert_eq!(count(&w), 2);
        assert_eq!(h.queued_bytes()[0], 5 * one(), "the push is kept");
        assert_eq!(
            offer(&h, Lane::Interactive, &c, &b),
            Enqueued::Parked,
            "while its connection goes, it queues as if detached"
        );
        assert_eq!(count(&w), 2);
        let close = h.take_close(0).expect("a close request");
        assert_eq!(close.code, Code::SlowConsumer);
        assert!(h.detach(0), "the state is kept");
        assert_eq!(h.queued(), 6 + 2, "bulk 3 and 4 went back too");
    }

    #[test]
    fn a_spent_budget_refuses_with_a_gap_and_is_reclaimed_from_detached_sessions_first() {
        let c = cfg();
        let b = Budget::new(2 * one());
        let h = handle(7);
        let (w, wk) = waker();
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert!(h.register_waker(0, &wk));
        let p = push(Lane::Interactive, "over");
        assert_eq!(h.enqueue(&p, &c, &b, &mut Vec::new()), Enqueued::OverBudget);
        assert!(!p.charge.is_charged());
        assert_eq!(b.used(), 2 * one());
        assert_eq!(h.next_seq(Lane::Interactive), 4, "seq 3 is used up");
        assert_eq!(count(&w), 1, "woken to tell the client");
        assert_eq!(
            send(&h, 0, Instant::now(), &c),
            vec!["Interactive 1", "Interactive 2", "Interactive gap 3..=3"]
        );

        // Detached, a refusal wakes nobody: the resume reports the gap.
        assert!(h.detach(0));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::OverBudget);
        let (_, res, _, _) = attach(&h, [2, 0], &c, &b);
        assert_eq!(
            res[0],
            LaneResume {
                first_held: 5,
                gap: true,
                replay: 0
            },
            "1 and 2 delivered, 3 and 4 refused"
        );
        assert_eq!(b.used(), 0);

        /// Evicts the oldest pushes of one detached session, as the gateway does.
        struct Evict(SessionHandle);
        impl crate::budget::Reclaim for Evict {
            fn reclaim(&self, budget: &Budget, target: usize) {
                let mut out = Vec::new();
                while budget.used() > target && self.0.evict_oldest_detached(budget, &mut out) {
                    out.clear();
                }
            }
        }
        let d = handle(8);
        assert!(d.detach(0));
        let reclaim: Arc<dyn crate::budget::Reclaim> = Arc::new(Evict(d.clone()));
        b.set_reclaim(Arc::downgrade(&reclaim));
        for i in 0..2 {
            let r = d.enqueue(&push(Lane::Interactive, "m"), &c, &b, &mut Vec::new());
            assert_eq!(r, Enqueued::Parked, "push {i}");
        }
        assert_eq!(b.used(), 2 * one(), "the budget is spent");
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!(d.queued(), 1, "the detached session's oldest made room");
        assert_eq!(h.queued(), 1);
        assert_eq!(b.used(), 2 * one());
    }

    #[test]
    fn a_deferred_enqueue_wakes_at_the_next_flush_and_a_slow_consumer_at_once() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let delay = WriteDelay::new(Duration::from_millis(5));
        let h = handle(9);
        let (w, wk) = waker();
        let deferred = |lane| h.enqueue_deferred(&push(lane, "m"), &c, &b, &mut Vec::new(), &delay);
        assert!(h.register_waker(0, &wk));
        assert_eq!(deferred(Lane::Interactive), Enqueued::Queued);
        assert_eq!(count(&w), 0, "not yet");
        assert_eq!(deferred(Lane::Interactive), Enqueued::Queued);
        assert_eq!(delay.flush(), 1, "one wake-up for the two pushes");
        assert_eq!(count(&w), 1);
        assert_eq!(delay.flush(), 0);

        for _ in 0..2 {
            deferred(Lane::Interactive);
        }
        assert!(h.register_waker(0, &wk));
        assert_eq!(deferred(Lane::Interactive), Enqueued::SlowConsumer);
        assert_eq!(count(&w), 2, "a close is not deferred");
        assert_eq!(delay.flush(), 0);

        let h = handle(10);
        assert!(h.detach(0));
        let r = h.enqueue_deferred(&push(Lane::Bulk, "m"), &c, &b, &mut Vec::new(), &delay);
        assert_eq!(r, Enqueued::Parked);
        assert_eq!(delay.flush(), 0, "nobody to wake");
    }

    #[test]
    fn the_first_close_request_wins_unless_a_final_one_overrides_a_kept_state() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let code = |h: &SessionHandle| h.take_close(h.gen()).map(|c| c.code);

        // Final first: nothing overrides it, and the session ends with its
        // connection.
        let h = handle(11);
        let (w, wk) = waker();
        assert!(h.register_waker(0, &wk));
        h.request_close(CloseCmd::new(Code::Kicked, "kick"));
        assert_eq!(count(&w), 1);
        assert!(h.register_waker(0, &wk));
        h.request_close(CloseCmd::new(Code::Replaced, "replaced"));
        h.request_close(CloseCmd::new(Code::SlowConsumer, "slow"));
        assert_eq!(count(&w), 1, "an ignored request wakes nobody");
        assert_eq!(code(&h), Some(Code::Kicked));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Closed);
        assert!(!h.detach(0), "closing for good");
        assert!(h
            .attach(
                TransportKind::Tcp,
                [0, 0],
                &c,
                &b,
                &mut Vec::new(),
                &mut Vec::new()
            )
            .is_none());

        // Keep-state first: a second keep-state request is ignored, a final
        // one replaces it, taken or not.
        let h = handle(12);
        h.request_close(CloseCmd::new(Code::AckTimeout, "acks"));
        h.request_close(CloseCmd::new(Code::SlowConsumer, "slow"));
        assert_eq!(code(&h), Some(Code::AckTimeout));
        h.request_close(CloseCmd::new(Code::HeartbeatTimeout, "hb"));
        assert_eq!(code(&h), None, "still keeping state: ignored");
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Parked);
        h.request_close(CloseCmd::new(Code::ServerDraining, "drain"));
        assert_eq!(code(&h), Some(Code::ServerDraining));
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Closed);
        assert!(!h.detach(0), "the final request ends the session");

        let h = handle(13);
        h.request_close(CloseCmd::new(Code::SlowConsumer, "slow"));
        h.request_close(CloseCmd::new(Code::Replaced, "replaced"));
        h.request_close(CloseCmd::new(Code::Kicked, "kick"));
        assert_eq!(code(&h), Some(Code::Replaced), "the first final one");

        // A keep-state close ends in a detach, which forgets it; a resume
        // forgets it too.
        let h = handle(14);
        h.request_close(CloseCmd::new(Code::SlowConsumer, "slow"));
        assert!(h.detach(0));
        assert_eq!(code(&h), None);
        h.request_close(CloseCmd::new(Code::ConnectionLost, "lost"));
        let (gen, ..) = attach(&h, [0, 0], &c, &b);
        assert_eq!(h.take_close(gen), None);
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);

        // An ended session takes no request.
        let (w, wk) = waker();
        assert!(h.register_waker(gen, &wk));
        assert!(h.close_outbox(End::Any, &b, &mut Vec::new()));
        h.request_close(CloseCmd::new(Code::Kicked, "kick"));
        assert_eq!(count(&w), 0);
        assert_eq!(h.take_close(gen), None);
    }

    #[test]
    fn close_outbox_ends_only_the_session_it_names_and_gives_everything_back() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let window = Duration::from_secs(10);
        let h = handle(15);
        let (w, wk) = waker();
        assert_eq!(h.uplink("a", 100, t0, window, 8), Uplink::New { seq: 1 });
        offer(&h, Lane::Interactive, &c, &b);
        offer(&h, Lane::Interactive, &c, &b);
        send(&h, 0, t0, &c);
        offer(&h, Lane::Bulk, &c, &b);
        assert!(h.register_waker(0, &wk));
        let mut out = Vec::new();
        assert!(!h.close_outbox(End::Detached, &b, &mut out), "attached");
        assert!(
            !h.close_outbox(End::Gen(1), &b, &mut out),
            "another generation"
        );
        assert!(out.is_empty());
        assert!(h.close_outbox(End::Gen(0), &b, &mut out));
        let mut seqs: Vec<_> = out.iter().map(|i| (i.push.lane, i.seq)).collect();
        seqs.sort();
        assert_eq!(
            seqs,
            vec![
                (Lane::Interactive, 1),
                (Lane::Interactive, 2),
                (Lane::Bulk, 1)
            ],
            "the window and the queue"
        );
        drop(out);
        assert_eq!((h.held(), b.used()), (0, 0));
        h.wake();
        assert_eq!(count(&w), 0, "the waker was dropped");
        assert!(!h.close_outbox(End::Any, &b, &mut Vec::new()), "once");
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Closed);
        assert_eq!(b.used(), 0, "nothing charged for a closed session");
        assert!(!h.is_detached());
        assert!(!h.try_park(0, wk.clone(), false));
        assert_eq!(send(&h, 0, t0, &c), Vec::<String>::new());
        assert_eq!(
            h.uplink("a", 101, t0, window, 8),
            Uplink::New { seq: 2 },
            "the dedup memory is forgotten"
        );

        // Detached: only `Detached` and `Any` reach it, and a resume first
        // shuts `Detached` out.
        let h = handle(16);
        assert!(h.detach(0));
        offer(&h, Lane::Interactive, &c, &b);
        assert!(h.close_outbox(End::Detached, &b, &mut Vec::new()));
        assert!(!h.is_detached(), "ended, not detached");
        assert_eq!(h.oldest_detached(), None);
        let h = handle(17);
        assert!(h.detach(0));
        attach(&h, [0, 0], &c, &b);
        assert!(!h.close_outbox(End::Detached, &b, &mut Vec::new()));
        assert!(h.close_outbox(End::Any, &b, &mut Vec::new()));
    }

    #[test]
    fn park_consent_needs_the_generation_an_idle_session_and_no_wake_up_taken() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let h = handle(18);
        let (task, wk) = waker();
        let (parked, pk) = waker();
        assert!(!h.try_park(0, pk.clone(), true), "no waker: it was taken");
        assert!(h.register_waker(0, &wk));
        assert!(!h.try_park(1, pk.clone(), true), "another generation");
        assert!(h.try_park(0, pk.clone(), true));
        // The parked waker now gets the session's wake-ups, once each.
        assert_eq!(offer(&h, Lane::Interactive, &c, &b), Enqueued::Queued);
        assert_eq!((count(&task), count(&parked)), (0, 1));
        assert!(!h.try_park(0, pk.clone(), false), "a push waits");
        assert!(h.register_waker(0, &wk));
        assert_eq!(send(&h, 0, t0, &c), vec!["Interactive 1"]);
        assert!(!h.try_park(0, pk.clone(), true), "a push waits for its ack");
        h.ack(Lane::Interactive, 1, &[], t0, &b, &mut Vec::new());
        assert!(h.try_park(0, pk.clone(), true), "idle again");

        // A wake-up taken since the poll began (a timer) withdraws consent
        // for a task about to park, not for a parked connection re-parking.
        h.wake();
        assert_eq!(count(&parked), 2);
        assert!(!h.try_park(0, pk.clone(), true));
        assert!(h.try_park(0, pk.clone(), false));

        // A close request withdraws it until taken.
        h.request_close(CloseCmd::new(Code::Kicked, "kick"));
        assert_eq!(count(&parked), 3);
        assert!(h.register_waker(0, &wk));
        assert!(!h.try_park(0, pk.clone(), true));
        assert!(!h.try_park(0, pk.clone(), false));

        // A gap notice waiting is something to write.
        let h = handle(19);
        for _ in 0..4 {
            offer(&h, Lane::Bulk, &c, &b);
        }
        assert_eq!(offer(&h, Lane::Bulk, &c, &b), Enqueued::Dropped);
        send(&h, 0, t0, &c);
        h.ack(Lane::Bulk, 2, &[], t0, &b, &mut Vec::new());
        assert_eq!(
            send(&h, 0, t0, &c),
            vec!["Bulk 3", "Bulk 4", "Bulk gap 5..=5"]
        );
        h.ack(Lane::Bulk, 4, &[], t0, &b, &mut Vec::new());
        assert!(h.delivery_idle());
        assert!(h.try_park(0, pk.clone(), false));

        // Nor does a detached or ended session park.
        assert!(h.detach(0));
        assert!(!h.try_park(0, pk.clone(), false));
        attach(&h, [0, 0], &c, &b);
        assert!(h.try_park(1, pk.clone(), false));
        h.close_outbox(End::Any, &b, &mut Vec::new());
        assert!(!h.try_park(1, pk, false));
    }

    #[test]
    fn uplinks_get_consecutive_seqs_and_retries_within_the_window_repeat_their_ack() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let window = 10 * s;
        let h = handle(20);
        assert_eq!(h.next_uplink_seq(), 1);
        assert_eq!(h.uplink("a", 100, t0, window, 3), Uplink::New { seq: 1 });
        assert_eq!(
            h.uplink("b", 101, t0 + s, window, 3),
            Uplink::New { seq: 2 }
        );
        assert_eq!(
            h.uplink("a", 999, t0 + window, window, 3),
            Uplink::Duplicate {
                server_msg_id: 100,
                seq: 1
            },
            "still within the window at its very end"
        );
        assert_eq!(h.next_uplink_seq(), 3, "a duplicate takes no seq");
        assert_eq!(
            h.uplink("a", 102, t0 + window + Duration::from_nanos(1), window, 3),
            Uplink::New { seq: 3 },
            "past the window: new again"
        );
        assert_eq!(
            h.uplink("b", 103, t0 + window, window, 3),
            Uplink::Duplicate {
                server_msg_id: 101,
                seq: 2
            }
        );

        // At most `max` are remembered: the oldest goes.
        for (id, seq) in [("c", 4), ("d", 5)] {
            assert_eq!(h.uplink(id, 0, t0 + 2 * s, window, 3), Uplink::New { seq });
        }
        assert!(matches!(
            h.uplink("c", 0, t0 + 2 * s, window, 3),
            Uplink::Duplicate { seq: 4, .. }
        ));
        assert_eq!(
            h.uplink("b", 0, t0 + 2 * s, window, 3),
            Uplink::New { seq: 6 },
            "b made room for d"
        );

        // One that could not be forwarded is forgotten, its seq given back
        // when it was the last one assigned.
        h.forget_uplink("b", 6);
        assert_eq!(h.next_uplink_seq(), 6);
        h.forget_uplink("c", 4);
        assert_eq!(h.next_uplink_seq(), 6, "not the last: kept");
        assert_eq!(
            h.uplink("c", 0, t0 + 2 * s, window, 3),
            Uplink::New { seq: 6 }
        );

        // Pruning gives the memory back once everything is past the window.
        h.prune_uplinks(t0 + 13 * s, window);
        assert!(h.0.outbox.lock().sent.is_none());
        assert_eq!(
            h.uplink("d", 0, t0 + 13 * s, window, 3),
            Uplink::New { seq: 7 }
        );

        // With no memory, nothing is a duplicate.
        let h = handle(21);
        assert_eq!(h.uplink("a", 1, t0, window, 0), Uplink::New { seq: 1 });
        assert_eq!(h.uplink("a", 1, t0, window, 0), Uplink::New { seq: 2 });
        assert!(h.0.outbox.lock().sent.is_none());

        // The memory survives a resume.
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let h = handle(22);
        assert_eq!(h.uplink("x", 7, t0, window, 3), Uplink::New { seq: 1 });
        assert!(h.detach(0));
        attach(&h, [0, 0], &c, &b);
        assert_eq!(
            h.uplink("x", 8, t0 + s, window, 3),
            Uplink::Duplicate {
                server_msg_id: 7,
                seq: 1
            }
        );
    }

    #[test]
    fn the_room_list_exists_only_while_in_a_room_and_take_rooms_closes_it() {
        let h = handle(23);
        let (r1, r2) = (RoomId::new("r1"), RoomId::new("r2"));
        assert!(h.rooms().is_empty());
        h.with_rooms(|l, closed| {
            assert!(!closed);
            l.push(r1.clone());
            l.push(r2.clone());
        });
        assert_eq!(h.rooms(), vec![r1.clone(), r2.clone()]);
        h.with_rooms(|l, _| l.retain(|r| r != &r1));
        assert_eq!(h.rooms(), vec![r2.clone()]);
        h.with_rooms(|l, _| l.clear());
        assert!(h.0.rooms.lock().list.is_none(), "freed when empty");
        h.with_rooms(|l, _| l.push(r1.clone()));
        assert_eq!(h.take_rooms(), vec![r1.clone()]);
        assert!(h.rooms().is_empty());
        assert!(h.with_rooms(|_, closed| closed), "no joins after");
        assert!(h.take_rooms().is_empty());
    }

    /// On virtual time: each push's arrival stamp is tokio's clock.
    #[tokio::test(start_paused = true)]
    async fn a_detached_sessions_oldest_push_can_be_evicted_and_an_attached_ones_cannot() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let h = handle(24);
        let bulk = push(Lane::Bulk, "m");
        assert_eq!(h.enqueue(&bulk, &c, &b, &mut Vec::new()), Enqueued::Queued);
        let mut out = Vec::new();
        assert_eq!(h.oldest_detached(), None, "attached");
        assert!(!h.evict_oldest_detached(&b, &mut out));
        assert!(h.detach(0));
        tokio::time::advance(Duration::from_millis(1)).await;
        let later = push(Lane::Interactive, "m");
        assert_eq!(h.enqueue(&later, &c, &b, &mut Vec::new()), Enqueued::Parked);
        assert!(bulk.arrived < later.arrived);
        assert_eq!(h.oldest_detached(), Some(bulk.arrived));
        assert!(h.evict_oldest_detached(&b, &mut out));
        assert_eq!(
            out.iter().map(|i| (i.push.lane, i.seq)).collect::<Vec<_>>(),
            vec![(Lane::Bulk, 1)],
            "the oldest first, whatever its lane"
        );
        assert_eq!(h.oldest_detached(), Some(later.arrived));
        assert!(h.evict_oldest_detached(&b, &mut out));
        assert!(!h.evict_oldest_detached(&b, &mut out), "nothing left");
        assert_eq!(h.oldest_detached(), None);
        assert_eq!(h.held(), 0);
        offer(&h, Lane::Bulk, &c, &b);
        h.close_outbox(End::Detached, &b, &mut Vec::new());
        assert!(!h.evict_oldest_detached(&b, &mut out), "ended");
    }

    #[test]
    fn a_weak_session_wakes_while_the_session_lives_and_knows_its_own() {
        let h = handle(25);
        let other = handle(26);
        let weak = h.downgrade();
        assert!(weak.is(&h) && weak.is(&h.clone()));
        assert!(!weak.is(&other));
        assert!(h.ptr_eq(&h.clone()) && !h.ptr_eq(&other));
        let (w, wk) = waker();
        assert!(h.register_waker(0, &wk));
        assert!(weak.wake());
        assert!(weak.wake(), "alive, nothing to wake");
        assert_eq!(count(&w), 1);
        assert!(!weak.is_dead());
        drop(h);
        assert!(weak.is_dead());
        assert!(!weak.wake());
    }

    #[tokio::test(start_paused = true)]
    async fn a_moved_session_is_rebuilt_whole_and_the_old_node_queues_nothing_after() {
        let (a, b) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let h = handle(7);
        let mut ev = Vec::new();
        for i in 1..=3 {
            h.enqueue(
                &push(Lane::Interactive, &format!("m{i}")),
                &cfg(),
                &a,
                &mut ev,
            );
        }
        h.join_test_room("lobby");
        let now = Instant::now();
        let m = h.take_for_move(now, &a).expect("a live session");
        assert!(h.take_for_move(now, &a).is_none(), "taken once");
        assert_eq!(
            h.enqueue(&push(Lane::Interactive, "late"), &cfg(), &a, &mut ev),
            Enqueued::Closed,
            "the old node queues nothing after"
        );
        assert_eq!(m.rooms, [RoomId::new("lobby")]);
        assert_eq!(m.delivery.next_seq, [4, 1]);
        let moved = SessionHandle::restore(SessionId(7), m, now, &cfg(), &b);
        assert!(moved.is_detached());
        assert_eq!(moved.next_seq(Lane::Interactive), 4);
        assert_eq!(moved.queued(), 3);
        assert_eq!(
            moved.enqueue(&push(Lane::Interactive, "m4"), &cfg(), &b, &mut ev),
            Enqueued::Parked
        );
        assert_eq!(moved.next_seq(Lane::Interactive), 5);
    }
}
