//! Reliable delivery for one session, sans-IO: per-lane sequence numbers, the
//! queue of pushes not yet written, the window of pushes written but not yet
//! acknowledged, the ack deadline that judges a connection's liveness, replay
//! for resume, and the byte budget that bounds all of it.
//!
//! Every push of a session gets the next sequence number of its lane. It
//! waits in the lane's queue until the connection writes it, then sits in the
//! lane's window until the client acknowledges it (cumulatively, or by range).
//!
//! A push is never written twice on one connection. Every transport Tether
//! speaks is a reliable stream (TCP, TLS, a QUIC stream): a byte the peer has
//! not acknowledged is already being retransmitted by the transport, and
//! writing the push again would only add bytes to a congested or dead path.
//! Instead the ack timeout is a liveness signal: when a lane has had pushes
//! unacknowledged for `ack_timeout` with no ack progress at all (in any
//! lane), the
//! connection is judged dead and closed (`CODE_ACK_TIMEOUT`), the session is
//! kept, and the client's resume replays the window on a new connection.
//! A push counts one try per connection it was written on; one written on
//! `max_tries` connections without an ack is given up at the next resume and
//! reported, so a push that makes a client fail (and reconnect) cannot loop
//! for ever. A session with nothing in flight holds no buffers at all.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::budget::{Budget, ITEM_OVERHEAD};

use crate::config::{Config, SlowConsumerPolicy};
use crate::wire::pb::Lane;
use crate::wire::SharedPush;

/// Lanes, indexable.
pub const LANES: [Lane; 2] = [Lane::Interactive, Lane::Bulk];

fn ix(lane: Lane) -> usize {
    match lane {
        Lane::Interactive => 0,
        Lane::Bulk => 1,
    }
}

/// Delivery settings, per lane where they differ.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Charged bytes (the encoded body + [`ITEM_OVERHEAD`] per push) waiting to be
    /// written, per lane, before the lane's policy applies. Bytes, not a
    /// count: a reader that keeps up still falls behind by a whole burst when
    /// an upstream publishes faster than any phone reads, and what that costs
    /// is memory, which bytes measure.
    pub queue_bytes: [usize; 2],
    /// Charged bytes a session keeps while no connection is attached (a blip,
    /// a resume on its way); past it the oldest pushes are evicted and the
    /// resume reports the gap. The node's budget bounds the sum.
    pub detached_bytes: usize,
    /// Charged bytes all detached sessions of one user keep together; past
    /// it the router evicts the oldest pushes among them.
    pub detached_bytes_per_user: usize,
    /// A connection whose socket accepts no byte of a pending write for this
    /// long is closed as a slow consumer (its session kept for a resume).
    pub stall_timeout: Duration,
    /// Pushes written but not acknowledged, per lane (flow control).
    pub window: [usize; 2],
    /// What a full queue does, per lane.
    pub policy: [SlowConsumerPolicy; 2],
    /// A lane with pushes unacknowledged this long, with no ack progress
    /// meanwhile, closes the connection as dead (the session is kept).
    pub ack_timeout: Duration,
    /// Connections one push may be written on before it is given up.
    pub max_tries: u8,
}

impl DeliveryConfig {
    /// The sans-IO delivery settings of a validated config.
    pub fn from_config(cfg: &Config) -> Self {
        let d = &cfg.delivery;
        Self {
            // Validated to fit in memory (at most the replay budget).
            queue_bytes: [d.queue_bytes as usize, d.bulk_queue_bytes as usize],
            detached_bytes: d.detached_bytes as usize,
            detached_bytes_per_user: d.detached_bytes_per_user as usize,
            stall_timeout: d.stall_timeout,
            window: [d.window as usize, d.bulk_window as usize],
            policy: [cfg.session.slow_consumer, SlowConsumerPolicy::Drop],
            ack_timeout: d.ack_timeout,
            max_tries: d.max_tries,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            queue_bytes: [1 << 20, 4 << 20],
            detached_bytes: 4 << 20,
            detached_bytes_per_user: 16 << 20,
            stall_timeout: Duration::from_secs(30),
            window: [256, 64],
            policy: [SlowConsumerPolicy::Disconnect, SlowConsumerPolicy::Drop],
            ack_timeout: Duration::from_secs(10),
            max_tries: 3,
        }
    }
}

/// One push on one session.
#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    pub push: SharedPush,
    /// Connections this push was written on.
    tries: u8,
    /// Queued while a connection was attached (fits the padding after
    /// `tries`): only such pushes count in `tether_push_wait_seconds`, so
    /// that time spent waiting for an offline device does not.
    online: bool,
}

impl Item {
    fn cost(&self) -> usize {
        self.push.body.len() + ITEM_OVERHEAD
    }
}

/// Pushes a session lets go of: its own bytes, and how many (each was
/// charged [`ITEM_OVERHEAD`] to the node's budget).
#[derive(Debug, Default, Clone, Copy)]
struct Freed {
    bytes: usize,
    items: usize,
}

impl Freed {
    fn add(&mut self, it: &Item) {
        self.bytes += it.cost();
        self.items += 1;
    }
}

/// What [`Delivery::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued; `wake` when the lane's queue was empty (the task must be woken).
    Queued { wake: bool },
    /// Dropped for this session (policy "drop"). Its seq is used up, so the
    /// client sees the gap.
    Dropped,
    /// The node's replay budget has no room for it. Nothing changed, its
    /// seq included: make room ([`Budget::make_room`], with no lock held)
    /// and offer it again, or give it up with [`Delivery::refuse`].
    NoRoom,
    /// The queue is full and the policy is "disconnect".
    SlowConsumer,
}

#[derive(Debug)]
struct LaneBufs {
    queue: VecDeque<Item>,
    /// Charged bytes of `queue`.
    queued_bytes: usize,
    window: VecDeque<Item>,
    /// The highest seq ever written on any connection. Seqs are written in
    /// order, so everything at or below it was written at least once; a
    /// resume never takes a client's word for more (see [`Delivery::resume`]).
    written: u64,
    /// Since when the window has held pushes with no ack progress: set when
    /// a push enters an empty window, moved to now by every ack that frees
    /// something in either lane (and by a stalled write that moves again),
    /// cleared when the window empties. The ack deadline is this plus `ack_timeout`.
    waiting: Option<Instant>,
    /// The latest run of seqs dropped while a connection was attached, not
    /// yet told: a `Gap` frame goes out once every push below it is written.
    /// One run is enough: an earlier one is followed by a queued push, whose
    /// seq shows the client that gap.
    lost: Option<(u64, u64)>,
}

impl LaneBufs {
    /// Buffers for a lane whose every seq below `next_seq` is settled
    /// (acknowledged, given up or dropped): nothing was held when they were
    /// freed, so all of them count as written.
    fn new(next_seq: u64) -> Self {
        Self {
            queue: VecDeque::new(),
            queued_bytes: 0,
            window: VecDeque::new(),
            written: next_seq - 1,
            waiting: None,
            lost: None,
        }
    }

    fn pop_queued(&mut self) -> Option<Item> {
        let it = self.queue.pop_front()?;
        self.queued_bytes -= it.cost();
        Some(it)
    }
}

/// Where [`Delivery::poll_send`] puts the pushes it moves into the windows.
/// A closure `(lane, seq, push)` is one.
pub trait Sink {
    /// Shows the pushes about to come, before the first: a write batch sizes
    /// its buffer once instead of growing it push by push.
    fn reserve(&mut self, _pushes: &mut dyn Iterator<Item = &SharedPush>) {}
    fn push(&mut self, lane: Lane, seq: u64, push: &SharedPush);
    /// A push queued while a connection was attached goes out for the first
    /// time; `arrived` is when the gateway took it in.
    fn first_write(&mut self, _arrived: Instant) {}
    /// Pushes `first..=last` of `lane` were dropped while connected: tell
    /// the client (a `Gap` frame), in order with the lane's pushes.
    fn gap(&mut self, _lane: Lane, _first: u64, _last: u64) {}
}

impl<F: FnMut(Lane, u64, &SharedPush)> Sink for F {
    fn push(&mut self, lane: Lane, seq: u64, push: &SharedPush) {
        self(lane, seq, push);
    }
}

/// A set of lanes: which a connection's output carries (both on a byte
/// stream; one per stream on QUIC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes(pub [bool; 2]);

impl Lanes {
    pub const ALL: Lanes = Lanes([true, true]);
    pub const INTERACTIVE: Lanes = Lanes([true, false]);
    pub const BULK: Lanes = Lanes([false, true]);

    fn has(self, l: usize) -> bool {
        self.0[l]
    }
}

/// Per-lane state of a resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneResume {
    /// The first seq still held (the next seq when nothing is held).
    pub first_held: u64,
    /// Pushes after the client's last seq that are gone.
    pub gap: bool,
    /// Pushes that will be replayed.
    pub replay: u64,
}

/// A detached session's delivery state on its way to another node.
#[derive(Debug, Default)]
pub struct Exported {
    pub next_seq: [u64; 2],
    pub lanes: [ExportedLane; 2],
}

/// One lane of an [`Exported`] state.
#[derive(Debug, Default)]
pub struct ExportedLane {
    /// The highest seq written on any connection.
    pub written: u64,
    /// Pushes still held, by seq: `(seq, tries, push)`.
    pub items: Vec<(u64, u8, SharedPush)>,
}

/// A session's delivery state.
#[derive(Debug)]
pub struct Delivery {
    next_seq: [u64; 2],
    /// Allocated only while something is queued or unacknowledged.
    bufs: Option<Box<[LaneBufs; 2]>>,
    held: usize,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            next_seq: [1, 1],
            bufs: None,
            held: 0,
        }
    }
}

impl Delivery {
    /// The seq the next push of `lane` will get.
    pub fn next_seq(&self, lane: Lane) -> u64 {
        self.next_seq[ix(lane)]
    }

    /// Pushes waiting to be written, both lanes.
    pub fn queued(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b[0].queue.len() + b[1].queue.len())
    }

    /// Charged bytes waiting to be written, per lane.
    pub fn queued_bytes(&self) -> [usize; 2] {
        self.bufs
            .as_ref()
            .map_or([0, 0], |b| [b[0].queued_bytes, b[1].queued_bytes])
    }

    /// Pushes written and not yet acknowledged, both lanes.
    pub fn unacked(&self) -> usize {
        self.bufs
            .as_ref()
            .map_or(0, |b| b[0].window.len() + b[1].window.len())
    }

    /// Bytes this session holds against the budget.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Whether any buffer is allocated.
    pub fn is_idle(&self) -> bool {
        self.bufs.is_none()
    }

    /// Offers a push. `detached`: no connection is attached (or it is closing
    /// as a slow consumer); the session then keeps at most
    /// `cfg.detached_bytes`, evicting its oldest pushes into `evicted` (the
    /// resume reports the gap) rather than refusing the newest. Attached, a
    /// lane whose queued bytes would pass `cfg.queue_bytes` applies its policy:
    /// "drop" refuses the push, "disconnect" keeps it (the session is kept for
    /// a resume) and answers [`Offer::SlowConsumer`]. A push alone in its queue
    /// is always accepted, whatever its size.
    pub fn enqueue(
        &mut self,
        push: &SharedPush,
        detached: bool,
        cfg: &DeliveryConfig,
        budget: &Arc<Budget>,
        evicted: &mut Vec<Item>,
    ) -> Offer {
        let l = ix(push.lane);
        let seq = self.next_seq[l];
        let cost = push.body.len() + ITEM_OVERHEAD;
        let mut result = None;
        let queued = self.bufs.as_ref().map_or(0, |b| b[l].queued_bytes);
        if !detached && queued > 0 && queued + cost > cfg.queue_bytes[l] {
            match cfg.policy[l] {
                SlowConsumerPolicy::Drop => {
                    self.next_seq[l] += 1;
                    self.note_lost(l, seq);
                    return Offer::Dropped;
                }
                SlowConsumerPolicy::Disconnect => result = Some(Offer::SlowConsumer),
            }
        }
        // The node's budget: this session's reference, and the body once
        // per push (see crate::budget).
        if !budget.try_take(ITEM_OVERHEAD) {
            return Offer::NoRoom;
        }
        if !push.charge.charge(budget, push.body.len()) {
            budget.give(ITEM_OVERHEAD);
            return Offer::NoRoom;
        }
        let item = Item {
            seq,
            push: push.clone(),
            tries: 0,
            online: !detached,
        };
        if detached || result.is_some() {
            self.evict_to(cfg.detached_bytes.saturating_sub(cost), l, budget, evicted);
        }
        let next = self.next_seq;
        self.held += cost;
        self.next_seq[l] += 1;
        let bufs = self
            .bufs
            .get_or_insert_with(|| Box::new([LaneBufs::new(next[0]), LaneBufs::new(next[1])]));
        // Wake the task when this lane's queue was empty: the other lane's
        // queue may be stuck behind a full window or a stalled stream, and
        // must not keep this lane's push from waking the writer.
        let wake = bufs[l].queue.is_empty();
        if bufs[l].queue.capacity() == 0 {
            // Most bursts are one push (a broadcast): start with room for one.
            bufs[l].queue.reserve_exact(1);
        }
        bufs[l].queued_bytes += cost;
        bufs[l].queue.push_back(item);
        result.unwrap_or(Offer::Queued { wake })
    }

    /// Gives up a push the node's budget had no room for ([`Offer::NoRoom`]):
    /// its seq is used up, so the client sees the gap. `attached`: a
    /// connection is attached, and is told with a `Gap` frame (a detached
    /// session's resume reports the gap instead).
    pub fn refuse(&mut self, lane: Lane, attached: bool) {
        let l = ix(lane);
        let seq = self.next_seq[l];
        self.next_seq[l] += 1;
        if attached {
            self.note_lost(l, seq);
        }
    }

    /// Records that `seq` of lane `l` was dropped while connected.
    fn note_lost(&mut self, l: usize, seq: u64) {
        let next = self.next_seq;
        let b = &mut self
            .bufs
            .get_or_insert_with(|| Box::new([LaneBufs::new(next[0]), LaneBufs::new(next[1])]))[l];
        b.lost = match b.lost {
            Some((first, last)) if last + 1 == seq => Some((first, seq)),
            _ => Some((seq, seq)),
        };
    }

    /// Whether a `Gap` frame is waiting to be written.
    pub fn gap_pending(&self) -> bool {
        self.bufs
            .as_ref()
            .is_some_and(|b| b.iter().any(|l| l.lost.is_some()))
    }

    /// Evicts the oldest queued push, whichever lane holds it, into `out`.
    /// Returns false when nothing is queued. Reclaiming the node's budget
    /// from detached sessions uses it (their resume reports the gap).
    pub fn evict_oldest(&mut self, budget: &Budget, out: &mut Vec<Item>) -> bool {
        let Some(bufs) = self.bufs.as_mut() else {
            return false;
        };
        let front = |l: usize| bufs[l].queue.front().map(|it| it.push.arrived);
        let l = match (front(0), front(1)) {
            (Some(a), Some(b)) => usize::from(b < a),
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (None, None) => return false,
        };
        let Some(it) = bufs[l].pop_queued() else {
            return false;
        };
        let freed = Freed {
            bytes: it.cost(),
            items: 1,
        };
        out.push(it);
        self.release(freed, budget);
        self.shrink();
        true
    }

    /// When the oldest queued push arrived, if any is queued.
    pub fn oldest_queued(&self) -> Option<Instant> {
        let bufs = self.bufs.as_ref()?;
        bufs.iter()
            .filter_map(|b| b.queue.front().map(|it| it.push.arrived))
            .min()
    }

    /// Evicts the oldest queued pushes, lane `first` first, until the session
    /// holds at most `limit` bytes.
    fn evict_to(&mut self, limit: usize, first: usize, budget: &Budget, out: &mut Vec<Item>) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        let mut freed = Freed::default();
        for l in [first, 1 - first] {
            while self.held - freed.bytes > limit {
                let Some(old) = bufs[l].pop_queued() else {
                    break;
                };
                freed.add(&old);
                out.push(old);
            }
        }
        self.release(freed, budget);
    }

    /// Moves up to `max` pushes that may be written now on an output
    /// carrying `lanes` into their windows, showing each to `out` (lane, seq,
    /// push): interactive pushes while the interactive window has room, then
    /// bulk pushes likewise. Returns how many remain queued in those lanes
    /// that the windows would still admit (0: wait for acks or new pushes).
    pub fn poll_send(
        &mut self,
        now: Instant,
        max: usize,
        lanes: Lanes,
        cfg: &DeliveryConfig,
        out: &mut impl Sink,
    ) -> usize {
        let Some(bufs) = self.bufs.as_mut() else {
            return 0;
        };
        // What will move: per lane, what its window admits, up to `max`.
        let mut take = [0usize; 2];
        let mut left = max;
        for l in 0..2 {
            if lanes.has(l) {
                let b = &bufs[l];
                take[l] = b
                    .queue
                    .len()
                    .min(cfg.window[l].saturating_sub(b.window.len()))
                    .min(left);
                left -= take[l];
            }
        }
        out.reserve(
            &mut (0..2).flat_map(|l| bufs[l].queue.iter().take(take[l]).map(|it| &it.push)),
        );
        let mut sendable = 0;
        for (l, lane) in LANES.iter().enumerate() {
            if !lanes.has(l) {
                continue;
            }
            let b = &mut bufs[l];
            for _ in 0..take[l] {
                let Some(mut it) = b.pop_queued() else {
                    break;
                };
                if let Some((first, last)) = b.lost.filter(|&(_, last)| last < it.seq) {
                    out.gap(*lane, first, last);
                    b.lost = None;
                }
                it.tries = it.tries.saturating_add(1);
                b.written = b.written.max(it.seq);
                out.push(*lane, it.seq, &it.push);
                if it.tries == 1 && it.online {
                    out.first_write(it.push.arrived);
                }
                if b.window.is_empty() {
                    b.waiting = Some(now);
                }
                b.window.push_back(it);
            }
            if b.queue.is_empty() {
                if let Some((first, last)) = b.lost.take() {
                    out.gap(*lane, first, last);
                }
            }
            sendable += b
                .queue
                .len()
                .min(cfg.window[l].saturating_sub(b.window.len()));
        }
        // A gap told with nothing else held frees the buffers.
        self.shrink();
        sendable
    }

    /// When a lane of `lanes` will have gone `ack_timeout` with pushes
    /// unacknowledged and no ack progress: the connection is then dead.
    pub fn ack_deadline(&self, lanes: Lanes, cfg: &DeliveryConfig) -> Option<Instant> {
        let bufs = self.bufs.as_ref()?;
        (0..2)
            .filter(|&l| lanes.has(l))
            .filter_map(|l| bufs[l].waiting)
            .min()
            .map(|at| at + cfg.ack_timeout)
    }

    /// The output carrying `lanes` moved again after the socket had refused
    /// it: the client is reading, so the pushes waiting in those windows get a
    /// full `ack_timeout` from now (they may only just have reached it).
    pub fn progress(&mut self, lanes: Lanes, now: Instant) {
        if let Some(bufs) = self.bufs.as_mut() {
            for (l, b) in bufs.iter_mut().enumerate() {
                if lanes.has(l) && b.waiting.is_some() {
                    b.waiting = Some(now);
                }
            }
        }
    }

    /// Applies an acknowledgement of `lane`: every seq <= `up_to`, and every
    /// seq inside `ranges`. Acknowledged pushes go to `acked`.
    pub fn ack(
        &mut self,
        lane: Lane,
        up_to: u64,
        ranges: &[(u64, u64)],
        now: Instant,
        budget: &Budget,
        acked: &mut Vec<Item>,
    ) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        let w = &mut bufs[ix(lane)].window;
        let mut freed = Freed::default();
        while w.front().is_some_and(|it| it.seq <= up_to) {
            if let Some(it) = w.pop_front() {
                freed.add(&it);
                acked.push(it);
            }
        }
        if !ranges.is_empty() {
            w.retain(|it| {
                let hit = ranges.iter().any(|(a, b)| (*a..=*b).contains(&it.seq));
                if hit {
                    freed.add(it);
                    acked.push(it.clone());
                }
                !hit
            });
        }
        if freed.items > 0 {
            // Any ack that releases a push proves the path alive: every
            // lane's clock starts over (a lane the client reads slowly is
            // the stall rule's and the queue bound's business, not this).
            for b in bufs.iter_mut() {
                b.waiting = (!b.window.is_empty()).then_some(now);
            }
        }
        self.release(freed, budget);
        self.shrink();
    }

    /// The connection is gone: unacknowledged pushes go back in front of the
    /// queue, in order, to be written again after a resume.
    pub fn detach(&mut self) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        for b in bufs.iter_mut() {
            while let Some(it) = b.window.pop_back() {
                b.queued_bytes += it.cost();
                b.queue.push_front(it);
            }
            b.waiting = None;
            // Untold gaps: the resume reports them (or a later seq shows them).
            b.lost = None;
        }
        self.shrink();
    }

    /// A client resumes having received everything up to `last` (per lane).
    /// Pushes at or below it that were written are dropped as delivered; a
    /// client cannot have received a push that was never written, so a
    /// `last` beyond the highest written seq does not drop the rest (they
    /// are replayed; the client discards seqs it has). Pushes already written on
    /// `cfg.max_tries` connections are given up into `failed`. What remains
    /// will be replayed in order. Call [`Delivery::detach`] first.
    pub fn resume(
        &mut self,
        last: [u64; 2],
        cfg: &DeliveryConfig,
        budget: &Budget,
        delivered: &mut Vec<Item>,
        failed: &mut Vec<Item>,
    ) -> [LaneResume; 2] {
        let mut res = [LaneResume::default(); 2];
        let mut freed = Freed::default();
        for (l, r) in res.iter_mut().enumerate() {
            // A client cannot have seen more than was assigned.
            let last = last[l].min(self.next_seq[l] - 1);
            if let Some(b) = self.bufs.as_mut() {
                let cut = last.min(b[l].written);
                while b[l].queue.front().is_some_and(|it| it.seq <= cut) {
                    if let Some(it) = b[l].pop_queued() {
                        freed.add(&it);
                        delivered.push(it);
                    }
                }
                // Pushes written before sit at the front, in seq order.
                let tried = b[l].queue.iter().take_while(|it| it.tries > 0).count();
                let mut kept = VecDeque::with_capacity(tried);
                for _ in 0..tried {
                    let Some(it) = b[l].pop_queued() else { break };
                    if it.tries >= cfg.max_tries {
                        freed.add(&it);
                        failed.push(it);
                    } else {
                        kept.push_back(it);
                    }
                }
                while let Some(it) = kept.pop_back() {
                    b[l].queued_bytes += it.cost();
                    b[l].queue.push_front(it);
                }
            }
            let first = self
                .bufs
                .as_ref()
                .and_then(|b| b[l].queue.front().map(|it| it.seq))
                .unwrap_or(self.next_seq[l]);
            r.first_held = first;
            r.gap = last + 1 < first;
            r.replay = self.bufs.as_ref().map_or(0, |b| b[l].queue.len() as u64);
        }
        self.release(freed, budget);
        self.shrink();
        res
    }

    /// The session ends: everything still held is returned (for reports).
    pub fn release_all(&mut self, budget: &Budget, out: &mut Vec<Item>) {
        let mut items = 0;
        if let Some(bufs) = self.bufs.take() {
            let [a, b] = *bufs;
            for lb in [a, b] {
                items += lb.window.len() + lb.queue.len();
                out.extend(lb.window);
                out.extend(lb.queue);
            }
        }
        budget.give(items * ITEM_OVERHEAD);
        self.held = 0;
    }

    /// Takes a detached session's whole state out, for a move to another
    /// node: what [`Delivery::import`] rebuilds there. This node's budget
    /// gets back its per-push charges (each body's with its last reference).
    /// Call [`Delivery::detach`] first.
    pub fn export(&mut self, budget: &Budget) -> Exported {
        let mut out = Exported {
            next_seq: self.next_seq,
            lanes: Default::default(),
        };
        let mut items = 0;
        if let Some(bufs) = self.bufs.take() {
            let [a, b] = *bufs;
            for (l, lb) in [a, b].into_iter().enumerate() {
                items += lb.window.len() + lb.queue.len();
                out.lanes[l].written = lb.written;
                out.lanes[l].items = lb
                    .window
                    .into_iter()
                    .chain(lb.queue)
                    .map(|it| (it.seq, it.tries, it.push))
                    .collect();
                out.lanes[l].items.sort_by_key(|(seq, _, _)| *seq);
            }
        } else {
            for (l, e) in out.lanes.iter_mut().enumerate() {
                e.written = self.next_seq[l] - 1;
            }
        }
        budget.give(items * ITEM_OVERHEAD);
        self.held = 0;
        out
    }

    /// A detached session's state moved from another node. Each push is
    /// charged to this node's budget as if queued here; those that do not
    /// fit (or beyond `cfg.detached_bytes`) are left out, and the resume
    /// reports the gap.
    pub fn import(e: Exported, cfg: &DeliveryConfig, budget: &Arc<Budget>) -> Self {
        let mut d = Self {
            next_seq: [e.next_seq[0].max(1), e.next_seq[1].max(1)],
            bufs: None,
            held: 0,
        };
        let mut bufs = [LaneBufs::new(d.next_seq[0]), LaneBufs::new(d.next_seq[1])];
        for (l, lane) in e.lanes.into_iter().enumerate() {
            bufs[l].written = lane.written.min(d.next_seq[l] - 1);
            for (seq, tries, push) in lane.items {
                let cost = push.body.len() + ITEM_OVERHEAD;
                if seq == 0 || seq >= d.next_seq[l] || d.held + cost > cfg.detached_bytes {
                    continue;
                }
                if bufs[l].queue.back().is_some_and(|b| b.seq >= seq) {
                    continue; // out of order or repeated: not from a real export
                }
                if !budget.try_take(ITEM_OVERHEAD) {
                    continue;
                }
                if !push.charge.charge(budget, push.body.len()) {
                    budget.give(ITEM_OVERHEAD);
                    continue;
                }
                d.held += cost;
                bufs[l].queued_bytes += cost;
                bufs[l].queue.push_back(Item {
                    seq,
                    push,
                    tries,
                    online: false,
                });
            }
        }
        d.bufs = Some(Box::new(bufs));
        d.shrink();
        d
    }

    /// Lets go of freed pushes: this session's bytes, and the node budget's
    /// per-item charges (each body's charge goes with the push's last
    /// reference, see crate::budget).
    fn release(&mut self, freed: Freed, budget: &Budget) {
        if freed.items > 0 {
            self.held -= freed.bytes;
            budget.give(freed.items * ITEM_OVERHEAD);
        }
    }

    fn shrink(&mut self) {
        if self.bufs.as_ref().is_some_and(|b| {
            b.iter()
                .all(|l| l.queue.is_empty() && l.window.is_empty() && l.lost.is_none())
        }) {
            self.bufs = None;
        }
    }
}

#[cfg(test)]
mod tests {
    //! Deterministic tests on virtual time: loss, duplication, reordering,
    //! lost acks, the ack deadline, full windows, resume and gaps.
    use super::*;

    fn push(lane: Lane, id: &str) -> SharedPush {
        SharedPush::with(id, b"x", "t", "", lane, true)
    }

    /// What one test push is charged.
    fn one() -> usize {
        push(Lane::Interactive, "m").body.len() + ITEM_OVERHEAD
    }

    /// What one test bulk push is charged (the lane is encoded in the body).
    fn one_bulk() -> usize {
        push(Lane::Bulk, "b").body.len() + ITEM_OVERHEAD
    }

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            queue_bytes: [8 * one(), 8 * one_bulk()],
            detached_bytes: 8 * one(),
            detached_bytes_per_user: 32 * one(),
            stall_timeout: Duration::from_secs(30),
            window: [3, 2],
            policy: [SlowConsumerPolicy::Disconnect, SlowConsumerPolicy::Drop],
            ack_timeout: Duration::from_secs(1),
            max_tries: 3,
        }
    }

    fn send(d: &mut Delivery, now: Instant, c: &DeliveryConfig) -> Vec<(Lane, u64)> {
        let mut out = Vec::new();
        d.poll_send(now, 100, Lanes::ALL, c, &mut |l, s, _: &SharedPush| {
            out.push((l, s))
        });
        out
    }

    fn offer(d: &mut Delivery, lane: Lane, c: &DeliveryConfig, b: &Arc<Budget>) -> Offer {
        d.enqueue(&push(lane, "m"), false, c, b, &mut Vec::new())
    }

    /// Records `first_write` calls, as a write batch does.
    #[derive(Default)]
    struct FirstWrites {
        seqs: Vec<u64>,
        arrived: Vec<Instant>,
    }

    impl Sink for FirstWrites {
        fn push(&mut self, _: Lane, seq: u64, _: &SharedPush) {
            self.seqs.push(seq);
        }
        fn first_write(&mut self, arrived: Instant) {
            self.arrived.push(arrived);
        }
    }

    #[test]
    fn only_the_first_write_of_a_push_queued_online_is_timed() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let mut d = Delivery::default();
        let online = push(Lane::Interactive, "on");
        d.enqueue(&online, false, &c, &b, &mut Vec::new());
        let mut w = FirstWrites::default();
        d.poll_send(Instant::now(), 100, Lanes::ALL, &c, &mut w);
        assert_eq!(w.seqs, vec![1]);
        assert_eq!(w.arrived, vec![online.arrived], "timed from its arrival");

        // The connection drops; a push comes in while detached; on the
        // resume both are written, neither is timed: the first was timed
        // already, the second waited for an offline device.
        d.detach();
        d.enqueue(
            &push(Lane::Interactive, "off"),
            true,
            &c,
            &b,
            &mut Vec::new(),
        );
        d.resume([0, 0], &c, &b, &mut Vec::new(), &mut Vec::new());
        let mut w = FirstWrites::default();
        d.poll_send(Instant::now(), 100, Lanes::ALL, &c, &mut w);
        assert_eq!(w.seqs, vec![1, 2]);
        assert!(w.arrived.is_empty(), "{:?}", w.arrived);
    }

    #[test]
    fn seqs_count_per_lane_and_windows_limit_flight() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        for _ in 0..4 {
            assert!(matches!(
                offer(&mut d, Lane::Interactive, &c, &b),
                Offer::Queued { .. }
            ));
        }
        for _ in 0..3 {
            offer(&mut d, Lane::Bulk, &c, &b);
        }
        // Interactive first, each lane up to its window.
        assert_eq!(
            send(&mut d, t0, &c),
            vec![
                (Lane::Interactive, 1),
                (Lane::Interactive, 2),
                (Lane::Interactive, 3),
                (Lane::Bulk, 1),
                (Lane::Bulk, 2)
            ]
        );
        assert!(send(&mut d, t0, &c).is_empty(), "windows are full");
        let mut acked = Vec::new();
        d.ack(Lane::Interactive, 2, &[], t0, &b, &mut acked);
        assert_eq!(acked.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(send(&mut d, t0, &c), vec![(Lane::Interactive, 4)]);
    }

    #[test]
    fn a_push_is_written_once_per_connection_and_the_ack_deadline_follows_progress() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), None, "nothing in flight");
        offer(&mut d, Lane::Interactive, &c, &b);
        offer(&mut d, Lane::Interactive, &c, &b);
        assert_eq!(send(&mut d, t0, &c).len(), 2);
        let s = Duration::from_secs(1);
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), Some(t0 + s));
        assert_eq!(d.ack_deadline(Lanes::BULK, &c), None, "per lane");
        assert!(
            send(&mut d, t0 + 10 * s, &c).is_empty(),
            "never written again on the same connection"
        );
        // An ack that frees something restarts the clock for the rest.
        let t1 = t0 + Duration::from_millis(700);
        d.ack(Lane::Interactive, 1, &[], t1, &b, &mut Vec::new());
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), Some(t1 + s));
        // A stale ack frees nothing and moves nothing.
        d.ack(Lane::Interactive, 1, &[], t1 + s, &b, &mut Vec::new());
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), Some(t1 + s));
        // A stalled write that moves again counts as progress.
        let t2 = t1 + Duration::from_millis(900);
        d.progress(Lanes::INTERACTIVE, t2);
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), Some(t2 + s));
        d.ack(Lane::Interactive, 2, &[], t2, &b, &mut Vec::new());
        assert_eq!(d.ack_deadline(Lanes::ALL, &c), None, "window empty");
        assert!(d.is_idle() && b.used() == 0);
    }

    #[test]
    fn a_push_wakes_the_writer_when_its_lane_was_empty_whatever_the_other_lane_holds() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        for _ in 0..4 {
            offer(&mut d, Lane::Bulk, &c, &b);
        }
        send(&mut d, t0, &c); // the bulk window (2) is full; 2 stay queued
        assert_eq!(d.queued(), 2);
        assert_eq!(
            offer(&mut d, Lane::Interactive, &c, &b),
            Offer::Queued { wake: true },
            "bulk stuck behind its window must not swallow the wake-up"
        );
        assert_eq!(
            offer(&mut d, Lane::Interactive, &c, &b),
            Offer::Queued { wake: false }
        );
    }

    #[test]
    fn an_ack_in_either_lane_restarts_both_ack_clocks() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        offer(&mut d, Lane::Interactive, &c, &b);
        offer(&mut d, Lane::Bulk, &c, &b);
        send(&mut d, t0, &c);
        let t1 = t0 + Duration::from_millis(800);
        d.ack(Lane::Bulk, 1, &[], t1, &b, &mut Vec::new());
        assert_eq!(
            d.ack_deadline(Lanes::INTERACTIVE, &c),
            Some(t1 + Duration::from_secs(1)),
            "the path is alive: the interactive push gets a full timeout"
        );
    }

    #[test]
    fn a_push_written_on_max_tries_connections_is_given_up_at_the_resume() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        offer(&mut d, Lane::Interactive, &c, &b); // 1: the poison push
        for conn in 1..=3u8 {
            let mut failed = Vec::new();
            let r = d.resume([0, 0], &c, &b, &mut Vec::new(), &mut failed);
            assert!(failed.is_empty(), "connection {conn}: still tried");
            assert_eq!(r[0].first_held, 1);
            assert_eq!(send(&mut d, t0, &c), vec![(Lane::Interactive, 1)]);
            d.detach(); // the connection died without an ack
        }
        offer(&mut d, Lane::Interactive, &c, &b); // 2: never written
        let mut failed = Vec::new();
        let r = d.resume([0, 0], &c, &b, &mut Vec::new(), &mut failed);
        assert_eq!(
            failed.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1],
            "written on three connections: given up"
        );
        assert_eq!(
            r[0],
            LaneResume {
                first_held: 2,
                gap: true,
                replay: 1
            },
            "the client learns of the gap"
        );
        assert_eq!(send(&mut d, t0, &c), vec![(Lane::Interactive, 2)]);
    }

    #[test]
    fn duplicate_and_reordered_acks_are_harmless() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        for _ in 0..3 {
            offer(&mut d, Lane::Interactive, &c, &b);
        }
        send(&mut d, t0, &c);
        let mut acked = Vec::new();
        d.ack(Lane::Interactive, 0, &[(3, 3)], t0, &b, &mut acked); // selective, out of order
        d.ack(Lane::Interactive, 2, &[], t0, &b, &mut acked);
        d.ack(Lane::Interactive, 1, &[], t0, &b, &mut acked); // stale
        d.ack(Lane::Interactive, 3, &[(1, 3)], t0, &b, &mut acked); // duplicate
        d.ack(Lane::Bulk, 99, &[], t0, &b, &mut acked); // nothing in that lane
        let mut seqs: Vec<u64> = acked.iter().map(|i| i.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![1, 2, 3], "each push acknowledged exactly once");
        assert!(d.is_idle());
        drop(acked);
        assert_eq!(
            b.used(),
            0,
            "the last reference to each body gave its charge back"
        );
        assert!(
            send(&mut d, t0 + Duration::from_secs(60), &c).is_empty(),
            "no retransmission after the ack"
        );
    }

    #[test]
    fn full_queue_applies_the_lane_policy_by_bytes() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let mut d = Delivery::default();
        for _ in 0..8 {
            assert!(matches!(
                offer(&mut d, Lane::Interactive, &c, &b),
                Offer::Queued { .. }
            ));
        }
        assert_eq!(d.queued_bytes(), [8 * one(), 0]);
        let mut evicted = Vec::new();
        assert_eq!(
            d.enqueue(&push(Lane::Interactive, "m"), false, &c, &b, &mut evicted),
            Offer::SlowConsumer
        );
        assert_eq!(d.queued(), 8, "the tripping push is kept for the resume");
        assert_eq!(
            evicted.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1],
            "within the detached bound: the oldest is evicted for it"
        );
        // Bulk drops at its own bound; the seq is used up.
        let mut d2 = Delivery::default();
        for _ in 0..8 {
            offer(&mut d2, Lane::Bulk, &c, &b);
        }
        assert_eq!(offer(&mut d2, Lane::Bulk, &c, &b), Offer::Dropped);
        assert_eq!(
            d2.next_seq(Lane::Bulk),
            10,
            "the dropped push used up seq 9: the client sees a gap"
        );
        // Writing frees queue bytes: the lane accepts again.
        send(&mut d2, Instant::now(), &c);
        assert!(matches!(
            offer(&mut d2, Lane::Bulk, &c, &b),
            Offer::Queued { .. }
        ));
    }

    #[test]
    fn a_lone_push_larger_than_the_queue_bound_is_accepted() {
        let (mut c, b) = (cfg(), Budget::new(1 << 20));
        c.queue_bytes = [10, 10];
        let mut d = Delivery::default();
        assert!(matches!(
            offer(&mut d, Lane::Interactive, &c, &b),
            Offer::Queued { .. }
        ));
        assert_eq!(
            offer(&mut d, Lane::Interactive, &c, &b),
            Offer::SlowConsumer
        );
    }

    #[test]
    fn a_burst_within_the_byte_bound_is_not_a_slow_consumer() {
        // The old rule cut a session at 128 queued items (x4 while the socket
        // took writes) whatever their size; 2,000 pushes of 64 B in a burst
        // are about 320 kB charged, well within the default 1 MiB.
        let (c, b) = (DeliveryConfig::default(), Budget::new(1 << 30));
        let mut d = Delivery::default();
        let p = SharedPush::with("m", &[7u8; 64], "t", "", Lane::Interactive, false);
        for i in 0..2_000 {
            let r = d.enqueue(&p, false, &c, &b, &mut Vec::new());
            assert!(matches!(r, Offer::Queued { .. }), "push {i}: {r:?}");
        }
    }

    #[test]
    fn budget_bounds_the_node() {
        let (c, t0) = (cfg(), Instant::now());
        let one = push(Lane::Interactive, "m").body.len() + ITEM_OVERHEAD;
        let b = Budget::new(one * 2);
        let (mut d1, mut d2) = (Delivery::default(), Delivery::default());
        assert!(matches!(
            offer(&mut d1, Lane::Interactive, &c, &b),
            Offer::Queued { .. }
        ));
        assert!(matches!(
            offer(&mut d2, Lane::Interactive, &c, &b),
            Offer::Queued { .. }
        ));
        assert_eq!(offer(&mut d2, Lane::Interactive, &c, &b), Offer::NoRoom);
        assert_eq!(d2.next_seq(Lane::Interactive), 2, "NoRoom changes nothing");
        d2.refuse(Lane::Interactive, false);
        assert_eq!(
            d2.next_seq(Lane::Interactive),
            3,
            "a refusal uses up the seq"
        );
        send(&mut d1, t0, &c);
        let mut acked = Vec::new();
        d1.ack(Lane::Interactive, 1, &[], t0, &b, &mut acked);
        drop(acked);
        assert!(matches!(
            offer(&mut d2, Lane::Interactive, &c, &b),
            Offer::Queued { .. }
        ));
    }

    /// Records pushes and gap notices in the order a write would carry them.
    #[derive(Default)]
    struct Written(Vec<String>);

    impl Sink for Written {
        fn push(&mut self, lane: Lane, seq: u64, _: &SharedPush) {
            self.0.push(format!("{lane:?} {seq}"));
        }
        fn gap(&mut self, lane: Lane, first: u64, last: u64) {
            self.0.push(format!("{lane:?} gap {first}..={last}"));
        }
    }

    #[test]
    fn a_connected_client_is_told_of_dropped_pushes_in_seq_order() {
        let (c, t0) = (cfg(), Instant::now());
        let b = Budget::new(1 << 20);
        let mut d = Delivery::default();
        // Dropped with nothing queued: told at once, the buffers then freed.
        d.refuse(Lane::Interactive, true);
        d.refuse(Lane::Interactive, true);
        assert!(d.gap_pending());
        let mut w = Written::default();
        d.poll_send(t0, 100, Lanes::ALL, &c, &mut w);
        assert_eq!(w.0, vec!["Interactive gap 1..=2"]);
        assert!(d.is_idle() && !d.gap_pending());

        // Queued 3, dropped 4 and 5, queued 6, dropped 7: the notices go
        // between the pushes, each after every push below it.
        offer(&mut d, Lane::Interactive, &c, &b);
        d.refuse(Lane::Interactive, true);
        d.refuse(Lane::Interactive, true);
        offer(&mut d, Lane::Interactive, &c, &b);
        d.refuse(Lane::Interactive, true);
        let mut w = Written::default();
        d.poll_send(t0, 100, Lanes::ALL, &c, &mut w);
        assert_eq!(
            w.0,
            vec!["Interactive 3", "Interactive 6", "Interactive gap 7..=7"],
            "4..=5 is shown by seq 6 following 3; the last run needs its notice"
        );

        // A full bulk queue under the drop policy tells the client too.
        let mut small = cfg();
        small.queue_bytes[1] = one_bulk();
        let mut d = Delivery::default();
        assert!(matches!(
            offer(&mut d, Lane::Bulk, &small, &b),
            Offer::Queued { .. }
        ));
        assert_eq!(offer(&mut d, Lane::Bulk, &small, &b), Offer::Dropped);
        let mut w = Written::default();
        d.poll_send(t0, 100, Lanes::INTERACTIVE, &small, &mut w);
        assert!(
            w.0.is_empty(),
            "the bulk lane's notice goes on the bulk output"
        );
        d.poll_send(t0, 100, Lanes::BULK, &small, &mut w);
        assert_eq!(w.0, vec!["Bulk 1", "Bulk gap 2..=2"]);

        // Detached: no notice (the resume reports the gap).
        let mut d = Delivery::default();
        d.refuse(Lane::Interactive, false);
        assert!(!d.gap_pending() && d.is_idle());
        d.refuse(Lane::Interactive, true);
        d.detach();
        assert!(
            !d.gap_pending(),
            "a connection that went takes its notice with it"
        );
        let r = d.resume([0, 0], &c, &b, &mut Vec::new(), &mut Vec::new());
        assert!(r[0].gap, "the resume reports it: {r:?}");
    }

    #[test]
    fn a_body_held_by_many_sessions_is_charged_once() {
        let c = cfg();
        let p = SharedPush::with("m", &[7u8; 4000], "t", "room", Lane::Interactive, false);
        let body = p.body.len();
        let b = Budget::new(body + 100 * ITEM_OVERHEAD);
        let mut sessions: Vec<Delivery> = (0..100).map(|_| Delivery::default()).collect();
        for d in &mut sessions {
            let r = d.enqueue(&p, true, &c, &b, &mut Vec::new());
            assert!(matches!(r, Offer::Queued { .. }), "{r:?}");
            assert_eq!(
                d.held(),
                body + ITEM_OVERHEAD,
                "each session counts what it pins"
            );
        }
        assert_eq!(
            b.used(),
            body + 100 * ITEM_OVERHEAD,
            "the body once, 96 B per session"
        );
        // Evicting it from 99 sessions frees their references, not the body.
        let mut out = Vec::new();
        for d in &mut sessions[1..] {
            assert!(d.evict_oldest(&b, &mut out));
        }
        drop(out);
        assert_eq!(b.used(), body + ITEM_OVERHEAD);
        drop(p);
        assert_eq!(b.used(), body + ITEM_OVERHEAD, "one session still holds it");
        sessions[0].release_all(&b, &mut Vec::new());
        assert_eq!(b.used(), 0, "the last reference gave the body back");
    }

    #[test]
    fn evict_oldest_takes_the_older_lane_front_and_reports_its_oldest() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let mut d = Delivery::default();
        assert!(!d.evict_oldest(&b, &mut Vec::new()), "nothing queued");
        let first = push(Lane::Bulk, "b1");
        d.enqueue(&first, true, &c, &b, &mut Vec::new());
        // Arrival instants must differ for "older" to mean something.
        std::thread::sleep(Duration::from_millis(1));
        d.enqueue(
            &push(Lane::Interactive, "i1"),
            true,
            &c,
            &b,
            &mut Vec::new(),
        );
        assert_eq!(d.oldest_queued(), Some(first.arrived));
        let mut out = Vec::new();
        assert!(d.evict_oldest(&b, &mut out));
        assert!(d.evict_oldest(&b, &mut out));
        assert!(!d.evict_oldest(&b, &mut out));
        let order: Vec<(Lane, u64)> = out.iter().map(|i| (i.push.lane, i.seq)).collect();
        assert_eq!(order, vec![(Lane::Bulk, 1), (Lane::Interactive, 1)]);
        assert!(d.is_idle());
        assert_eq!(d.held(), 0);
        d.detach();
        let r = d.resume([0, 0], &c, &b, &mut Vec::new(), &mut Vec::new());
        assert!(r[0].gap && r[1].gap, "the resume reports both gaps: {r:?}");
    }

    #[test]
    fn resume_replays_exactly_what_was_missed_in_order() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        for _ in 0..3 {
            offer(&mut d, Lane::Interactive, &c, &b);
        }
        send(&mut d, t0, &c); // 1..3 written; the client got 1 and 2 only
        offer(&mut d, Lane::Interactive, &c, &b); // 4 queued
        d.detach();
        offer(&mut d, Lane::Interactive, &c, &b); // 5 arrives while detached
        let mut delivered = Vec::new();
        let r = d.resume([2, 0], &c, &b, &mut delivered, &mut Vec::new());
        assert_eq!(
            delivered.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(
            r[0],
            LaneResume {
                first_held: 3,
                gap: false,
                replay: 3
            }
        );
        assert_eq!(
            r[1],
            LaneResume {
                first_held: 1,
                gap: false,
                replay: 0
            }
        );
        assert_eq!(
            send(&mut d, t0, &c),
            vec![
                (Lane::Interactive, 3),
                (Lane::Interactive, 4),
                (Lane::Interactive, 5)
            ]
        );
    }

    #[test]
    fn overflow_while_detached_drops_oldest_and_resume_reports_the_gap() {
        let (mut c, b) = (cfg(), Budget::new(1 << 20));
        c.detached_bytes = 4 * one();
        let mut d = Delivery::default();
        d.detach();
        for _ in 0..6 {
            d.enqueue(&push(Lane::Interactive, "m"), true, &c, &b, &mut Vec::new());
        }
        assert_eq!(d.held(), c.detached_bytes, "the detached bound holds");
        let r = d.resume([0, 0], &c, &b, &mut Vec::new(), &mut Vec::new());
        assert_eq!(
            r[0],
            LaneResume {
                first_held: 3,
                gap: true,
                replay: 4
            }
        );
        // A client claiming more than was ever sent is clamped.
        let mut d2 = Delivery::default();
        let r2 = d2.resume([1000, 0], &c, &b, &mut Vec::new(), &mut Vec::new());
        assert_eq!(
            r2[0],
            LaneResume {
                first_held: 1,
                gap: false,
                replay: 0
            }
        );
    }

    #[test]
    fn detached_eviction_takes_the_pushes_lane_first_then_the_other() {
        let (mut c, b) = (cfg(), Budget::new(1 << 20));
        c.detached_bytes = 4 * one_bulk();
        let mut d = Delivery::default();
        d.detach();
        for _ in 0..4 {
            d.enqueue(&push(Lane::Bulk, "b"), true, &c, &b, &mut Vec::new());
        }
        let mut evicted = Vec::new();
        d.enqueue(&push(Lane::Interactive, "i"), true, &c, &b, &mut evicted);
        assert_eq!(
            evicted
                .iter()
                .map(|i| (i.push.lane, i.seq))
                .collect::<Vec<_>>(),
            vec![(Lane::Bulk, 1)]
        );
        assert_eq!(d.queued_bytes(), [one(), 3 * one_bulk()]);
    }

    #[test]
    fn resume_does_not_take_the_clients_word_for_pushes_never_written() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        offer(&mut d, Lane::Interactive, &c, &b);
        send(&mut d, t0, &c); // seq 1 written
        offer(&mut d, Lane::Interactive, &c, &b); // 2 and 3 never written
        offer(&mut d, Lane::Interactive, &c, &b);
        d.detach();
        let mut delivered = Vec::new();
        let r = d.resume([3, 0], &c, &b, &mut delivered, &mut Vec::new());
        assert_eq!(
            delivered.iter().map(|i| i.seq).collect::<Vec<_>>(),
            vec![1],
            "only what was written can have been received"
        );
        assert_eq!(
            r[0],
            LaneResume {
                first_held: 2,
                gap: false,
                replay: 2
            }
        );
        assert_eq!(d.queued_bytes(), [2 * one(), 0]);
        // After everything settles and the buffers are freed, a new push is
        // not written either.
        send(&mut d, t0, &c);
        d.ack(Lane::Interactive, 3, &[], t0, &b, &mut Vec::new());
        assert!(d.is_idle());
        offer(&mut d, Lane::Interactive, &c, &b); // seq 4
        d.detach();
        let mut delivered = Vec::new();
        d.resume([4, 0], &c, &b, &mut delivered, &mut Vec::new());
        assert!(delivered.is_empty());
        assert_eq!(d.queued(), 1);
    }

    #[test]
    fn export_then_import_moves_exactly_what_is_held() {
        let cfg = DeliveryConfig::default();
        let (a, b) = (Budget::new(1 << 20), Budget::new(1 << 20));
        let t = Instant::now();
        let mut d = Delivery::default();
        let mut ev = Vec::new();
        for i in 0..5 {
            d.enqueue(
                &push(Lane::Interactive, &format!("m{i}")),
                false,
                &cfg,
                &a,
                &mut ev,
            );
        }
        // Two written, one acknowledged; the connection goes away.
        let mut sent = Vec::new();
        d.poll_send(t, 2, Lanes::ALL, &cfg, &mut |_l, seq, _p: &SharedPush| {
            sent.push(seq)
        });
        assert_eq!(sent, [1, 2]);
        let mut acked = Vec::new();
        d.ack(Lane::Interactive, 1, &[], t, &a, &mut acked);
        assert_eq!(acked.len(), 1);
        drop(acked);
        d.detach();
        let mut e = d.export(&a);
        // What crosses the wire is the bytes: the new node's pushes are its
        // own, and the old node's charges go with its copies.
        for lane in &mut e.lanes {
            for it in &mut lane.items {
                it.2 = SharedPush::from_body(it.2.body.clone(), it.2.lane, it.2.report.as_deref());
            }
        }
        assert_eq!(a.used(), 0, "the old node keeps nothing");
        assert_eq!(e.next_seq, [6, 1]);
        let seqs: Vec<u64> = e.lanes[0].items.iter().map(|x| x.0).collect();
        assert_eq!(seqs, [2, 3, 4, 5]);
        let mut d2 = Delivery::import(e, &cfg, &b);
        assert!(b.used() > 0, "the new node is charged");
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        let r = d2.resume([1, 0], &cfg, &b, &mut delivered, &mut failed);
        assert!(!r[0].gap);
        assert_eq!(r[0].replay, 4, "2..=5 replay on the new node");
        assert_eq!(d2.next_seq(Lane::Interactive), 6);
    }

    #[test]
    fn an_import_bigger_than_detached_bytes_keeps_the_oldest_and_the_resume_sees_the_gap() {
        let cost = push(Lane::Interactive, "m1").body.len() + ITEM_OVERHEAD;
        let cfg = DeliveryConfig {
            detached_bytes: 2 * cost,
            ..DeliveryConfig::default()
        };
        let budget = Budget::new(1 << 20);
        let e = Exported {
            next_seq: [4, 1],
            lanes: [
                ExportedLane {
                    written: 0,
                    items: (1..=3)
                        .map(|s| (s, 0, push(Lane::Interactive, &format!("m{s}"))))
                        .collect(),
                },
                ExportedLane::default(),
            ],
        };
        let mut d = Delivery::import(e, &cfg, &budget);
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        let r = d.resume([0, 0], &cfg, &budget, &mut delivered, &mut failed);
        assert_eq!(r[0].replay, 2);
        assert_eq!(d.next_seq(Lane::Interactive), 4);
    }

    #[test]
    fn release_all_returns_everything_and_the_budget() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        for _ in 0..5 {
            offer(&mut d, Lane::Interactive, &c, &b);
        }
        send(&mut d, t0, &c);
        let mut out = Vec::new();
        d.release_all(&b, &mut out);
        assert_eq!(out.len(), 5);
        drop(out);
        assert_eq!((b.used(), d.held()), (0, 0));
        assert!(d.is_idle());
    }
}
