//! Reliable delivery for one session, sans-IO: per-lane sequence numbers, the
//! queue of pushes not yet written, the window of pushes written but not yet
//! acknowledged, retransmission timers with backoff, replay for resume, and
//! the byte budget that bounds all of it.
//!
//! Every push of a session gets the next sequence number of its lane. It
//! waits in the lane's queue until the connection writes it, then sits in the
//! lane's window until the client acknowledges it (cumulatively, or by range).
//! Unacknowledged pushes are written again after `ack_timeout`, doubling each
//! time, up to `max_tries` writes; then they are given up and reported.
//! A session with nothing in flight holds no buffers at all (8 bytes).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::SlowConsumerPolicy;
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

/// How far past its capacity a lane's queue may grow while the socket is
/// still writable (the session's task simply has not run yet).
pub const OVERFLOW: usize = 4;

/// Bytes a queued or unacknowledged push is charged beyond its payload.
const ITEM_OVERHEAD: usize = 96;

/// Delivery settings, per lane where they differ.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Pushes waiting to be written, per lane.
    pub queue: [usize; 2],
    /// Pushes written but not acknowledged, per lane (flow control).
    pub window: [usize; 2],
    /// What a full queue does, per lane.
    pub policy: [SlowConsumerPolicy; 2],
    /// First retransmission after this long without an ack; doubles per try.
    pub ack_timeout: Duration,
    /// Writes of one push before it is given up.
    pub max_tries: u8,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            queue: [128, 1024],
            window: [256, 64],
            policy: [SlowConsumerPolicy::Disconnect, SlowConsumerPolicy::Drop],
            ack_timeout: Duration::from_secs(10),
            max_tries: 3,
        }
    }
}

/// The node-wide budget for bytes held in queues and windows.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes currently held by every session of the node.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        let prev = self.used.fetch_add(n, Ordering::Relaxed);
        if prev + n > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// One push on one session.
#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    pub push: SharedPush,
    sent_at: Option<Instant>,
    tries: u8,
}

impl Item {
    fn cost(&self) -> usize {
        self.push.body.len() + ITEM_OVERHEAD
    }
}

/// What [`Delivery::enqueue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued; `wake` when the queue was empty (the task must be woken).
    Queued { wake: bool },
    /// Dropped for this session (policy "drop", or the node budget is spent).
    /// Its seq is used up, so the client sees the gap.
    Dropped,
    /// The queue is full and the policy is "disconnect".
    SlowConsumer,
}

#[derive(Debug, Default)]
struct LaneBufs {
    queue: VecDeque<Item>,
    window: VecDeque<Item>,
    /// No window item is due (retransmission or give-up) before this; a lower
    /// bound, so that most polls skip scanning the window.
    due: Option<Instant>,
}

impl LaneBufs {
    fn lower_due(&mut self, at: Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    fn recompute_due(&mut self, base: Duration) {
        self.due = self
            .window
            .iter()
            .filter_map(|it| it.sent_at.map(|at| at + rto(base, it.tries)))
            .min();
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

    /// Offers a push. `blocked`: the socket refused the last write, or no
    /// connection is attached. `detached`: no connection is attached; a full
    /// queue then evicts its oldest push into `evicted` (the resume reports
    /// the gap) instead of refusing the newest. A push that trips the
    /// "disconnect" policy is queued the same way, since the session keeps
    /// its state for a resume.
    pub fn enqueue(
        &mut self,
        push: &SharedPush,
        blocked: bool,
        detached: bool,
        cfg: &DeliveryConfig,
        budget: &Budget,
        evicted: &mut Vec<Item>,
    ) -> Offer {
        let l = ix(push.lane);
        let cap = cfg.queue[l];
        let len = self.bufs.as_ref().map_or(0, |b| b[l].queue.len());
        let seq = self.next_seq[l];
        let item = Item {
            seq,
            push: push.clone(),
            sent_at: None,
            tries: 0,
        };
        if !budget.try_take(item.cost()) {
            self.next_seq[l] += 1;
            return Offer::Dropped;
        }
        let mut result = None;
        let full = len >= cap && (detached || blocked || len >= cap.saturating_mul(OVERFLOW));
        if full && !detached {
            match cfg.policy[l] {
                SlowConsumerPolicy::Drop => {
                    budget.give(item.cost());
                    self.next_seq[l] += 1;
                    return Offer::Dropped;
                }
                SlowConsumerPolicy::Disconnect => result = Some(Offer::SlowConsumer),
            }
        }
        if full {
            if let Some(old) = self.bufs.as_mut().and_then(|b| b[l].queue.pop_front()) {
                self.release(old.cost(), budget);
                evicted.push(old);
            }
        }
        self.held += item.cost();
        self.next_seq[l] += 1;
        let bufs = self.bufs.get_or_insert_with(Box::default);
        let wake = bufs[0].queue.is_empty() && bufs[1].queue.is_empty();
        if bufs[l].queue.capacity() == 0 {
            // Most bursts are one push (a broadcast): start with room for one.
            bufs[l].queue.reserve_exact(1);
        }
        bufs[l].queue.push_back(item);
        result.unwrap_or(Offer::Queued { wake })
    }

    /// Moves what may be written now into `out` (lane, seq, push): first the
    /// retransmissions that are due, then interactive pushes while the
    /// interactive window has room, then bulk pushes likewise. Returns how
    /// many remain queued that the windows would still admit (0: wait for
    /// acks or new pushes).
    pub fn poll_send(
        &mut self,
        now: Instant,
        max: usize,
        cfg: &DeliveryConfig,
        out: &mut Vec<(Lane, u64, SharedPush)>,
    ) -> usize {
        let Some(bufs) = self.bufs.as_mut() else {
            return 0;
        };
        for (l, lane) in LANES.iter().enumerate() {
            let b = &mut bufs[l];
            if b.due.is_none_or(|d| now < d) {
                continue;
            }
            for it in b.window.iter_mut() {
                if out.len() >= max {
                    break;
                }
                if let Some(at) = it.sent_at {
                    if it.tries < cfg.max_tries && now >= at + rto(cfg.ack_timeout, it.tries) {
                        it.sent_at = Some(now);
                        it.tries += 1;
                        out.push((*lane, it.seq, it.push.clone()));
                    }
                }
            }
            b.recompute_due(cfg.ack_timeout);
        }
        let mut sendable = 0;
        for (l, lane) in LANES.iter().enumerate() {
            let b = &mut bufs[l];
            while out.len() < max && b.window.len() < cfg.window[l] {
                let Some(mut it) = b.queue.pop_front() else {
                    break;
                };
                it.sent_at = Some(now);
                it.tries = 1;
                out.push((*lane, it.seq, it.push.clone()));
                b.window.push_back(it);
                b.lower_due(now + rto(cfg.ack_timeout, 1));
            }
            sendable += b
                .queue
                .len()
                .min(cfg.window[l].saturating_sub(b.window.len()));
        }
        sendable
    }

    /// When the next retransmission or give-up is due.
    /// (A lower bound: an early wake finds nothing due and re-arms.)
    pub fn next_deadline(&self, _cfg: &DeliveryConfig) -> Option<Instant> {
        let bufs = self.bufs.as_ref()?;
        bufs.iter().filter_map(|b| b.due).min()
    }

    /// Removes pushes written `max_tries` times whose last timeout passed.
    pub fn poll_failed(
        &mut self,
        now: Instant,
        cfg: &DeliveryConfig,
        budget: &Budget,
        out: &mut Vec<Item>,
    ) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        let mut freed = 0;
        for b in bufs.iter_mut() {
            if b.due.is_none_or(|d| now < d) {
                continue;
            }
            b.window.retain(|it| {
                let dead = it.tries >= cfg.max_tries
                    && it
                        .sent_at
                        .is_some_and(|at| now >= at + rto(cfg.ack_timeout, it.tries));
                if dead {
                    freed += it.cost();
                    out.push(it.clone());
                }
                !dead
            });
            b.recompute_due(cfg.ack_timeout);
        }
        self.release(freed, budget);
        self.shrink();
    }

    /// Applies an acknowledgement of `lane`: every seq <= `up_to`, and every
    /// seq inside `ranges`. Acknowledged pushes go to `acked`.
    pub fn ack(
        &mut self,
        lane: Lane,
        up_to: u64,
        ranges: &[(u64, u64)],
        budget: &Budget,
        acked: &mut Vec<Item>,
    ) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        let w = &mut bufs[ix(lane)].window;
        let mut freed = 0;
        while w.front().is_some_and(|it| it.seq <= up_to) {
            if let Some(it) = w.pop_front() {
                freed += it.cost();
                acked.push(it);
            }
        }
        if !ranges.is_empty() {
            w.retain(|it| {
                let hit = ranges.iter().any(|(a, b)| (*a..=*b).contains(&it.seq));
                if hit {
                    freed += it.cost();
                    acked.push(it.clone());
                }
                !hit
            });
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
            while let Some(mut it) = b.window.pop_back() {
                it.sent_at = None;
                it.tries = 0;
                b.queue.push_front(it);
            }
            b.due = None;
        }
    }

    /// A client resumes having received everything up to `last` (per lane).
    /// Pushes at or below it are dropped as delivered; what remains will be
    /// replayed in order. Call [`Delivery::detach`] first.
    pub fn resume(
        &mut self,
        last: [u64; 2],
        budget: &Budget,
        delivered: &mut Vec<Item>,
    ) -> [LaneResume; 2] {
        let mut res = [LaneResume::default(); 2];
        let mut freed = 0;
        for (l, r) in res.iter_mut().enumerate() {
            // A client cannot have seen more than was assigned.
            let last = last[l].min(self.next_seq[l] - 1);
            if let Some(b) = self.bufs.as_mut() {
                let q = &mut b[l].queue;
                while q.front().is_some_and(|it| it.seq <= last) {
                    if let Some(it) = q.pop_front() {
                        freed += it.cost();
                        delivered.push(it);
                    }
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
        if let Some(bufs) = self.bufs.take() {
            let [a, b] = *bufs;
            for lb in [a, b] {
                out.extend(lb.window);
                out.extend(lb.queue);
            }
        }
        budget.give(self.held);
        self.held = 0;
    }

    fn release(&mut self, n: usize, budget: &Budget) {
        if n > 0 {
            self.held -= n;
            budget.give(n);
        }
    }

    fn shrink(&mut self) {
        if self
            .bufs
            .as_ref()
            .is_some_and(|b| b.iter().all(|l| l.queue.is_empty() && l.window.is_empty()))
        {
            self.bufs = None;
        }
    }
}

/// Retransmission timeout after `tries` writes: `base`, then doubling.
fn rto(base: Duration, tries: u8) -> Duration {
    base.saturating_mul(1u32 << tries.saturating_sub(1).min(16))
}

#[cfg(test)]
mod tests {
    //! Deterministic tests on virtual time: loss, duplication, reordering,
    //! lost acks, retransmission timers, full windows, resume and gaps.
    use super::*;

    fn push(lane: Lane, id: &str) -> SharedPush {
        SharedPush::with(id, b"x", "t", "", lane, true)
    }

    fn cfg() -> DeliveryConfig {
        DeliveryConfig {
            queue: [4, 8],
            window: [3, 2],
            policy: [SlowConsumerPolicy::Disconnect, SlowConsumerPolicy::Drop],
            ack_timeout: Duration::from_secs(1),
            max_tries: 3,
        }
    }

    fn send(d: &mut Delivery, now: Instant, c: &DeliveryConfig) -> Vec<(Lane, u64)> {
        let mut out = Vec::new();
        d.poll_send(now, 100, c, &mut out);
        out.into_iter().map(|(l, s, _)| (l, s)).collect()
    }

    fn offer(d: &mut Delivery, lane: Lane, c: &DeliveryConfig, b: &Budget) -> Offer {
        d.enqueue(&push(lane, "m"), false, false, c, b, &mut Vec::new())
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
        d.ack(Lane::Interactive, 2, &[], &b, &mut acked);
        assert_eq!(acked.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(send(&mut d, t0, &c), vec![(Lane::Interactive, 4)]);
    }

    #[test]
    fn lost_ack_retransmits_with_backoff_then_gives_up() {
        let (c, b, t0) = (cfg(), Budget::new(1 << 20), Instant::now());
        let mut d = Delivery::default();
        offer(&mut d, Lane::Interactive, &c, &b);
        assert_eq!(send(&mut d, t0, &c).len(), 1);
        assert_eq!(d.next_deadline(&c), Some(t0 + Duration::from_secs(1)));
        assert!(send(&mut d, t0 + Duration::from_millis(999), &c).is_empty());
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            send(&mut d, t1, &c),
            vec![(Lane::Interactive, 1)],
            "second try"
        );
        // Backoff: the third try waits 2 s.
        assert_eq!(d.next_deadline(&c), Some(t1 + Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(send(&mut d, t2, &c).len(), 1, "third try");
        let mut failed = Vec::new();
        d.poll_failed(t2 + Duration::from_secs(3), &c, &b, &mut failed);
        assert!(failed.is_empty(), "the last try still has its 4 s");
        d.poll_failed(t2 + Duration::from_secs(4), &c, &b, &mut failed);
        assert_eq!(failed.len(), 1);
        assert!(d.is_idle() && b.used() == 0, "given up: nothing held");
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
        d.ack(Lane::Interactive, 0, &[(3, 3)], &b, &mut acked); // selective, out of order
        d.ack(Lane::Interactive, 2, &[], &b, &mut acked);
        d.ack(Lane::Interactive, 1, &[], &b, &mut acked); // stale
        d.ack(Lane::Interactive, 3, &[(1, 3)], &b, &mut acked); // duplicate
        d.ack(Lane::Bulk, 99, &[], &b, &mut acked); // nothing in that lane
        let mut seqs: Vec<u64> = acked.iter().map(|i| i.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, vec![1, 2, 3], "each push acknowledged exactly once");
        assert!(d.is_idle());
        assert_eq!(b.used(), 0);
        assert!(
            send(&mut d, t0 + Duration::from_secs(60), &c).is_empty(),
            "no retransmission after the ack"
        );
    }

    #[test]
    fn full_queue_applies_the_lane_policy_and_overflow_allowance() {
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let mut d = Delivery::default();
        for _ in 0..4 {
            offer(&mut d, Lane::Interactive, &c, &b);
        }
        // Socket writable: up to OVERFLOW x capacity.
        for _ in 4..4 * OVERFLOW {
            assert!(matches!(
                offer(&mut d, Lane::Interactive, &c, &b),
                Offer::Queued { .. }
            ));
        }
        let before = d.queued();
        let mut evicted = Vec::new();
        assert_eq!(
            d.enqueue(
                &push(Lane::Interactive, "m"),
                false,
                false,
                &c,
                &b,
                &mut evicted
            ),
            Offer::SlowConsumer
        );
        assert_eq!(
            d.queued(),
            before,
            "the tripping push is kept, the oldest evicted"
        );
        assert_eq!(evicted.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![1]);
        // Blocked socket: the capacity itself.
        let mut d2 = Delivery::default();
        for _ in 0..8 {
            d2.enqueue(&push(Lane::Bulk, "b"), true, false, &c, &b, &mut Vec::new());
        }
        assert_eq!(
            d2.enqueue(&push(Lane::Bulk, "b"), true, false, &c, &b, &mut Vec::new()),
            Offer::Dropped
        );
        assert_eq!(
            d2.next_seq(Lane::Bulk),
            10,
            "the dropped push used up seq 9: the client sees a gap"
        );
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
        assert_eq!(offer(&mut d2, Lane::Interactive, &c, &b), Offer::Dropped);
        send(&mut d1, t0, &c);
        let mut acked = Vec::new();
        d1.ack(Lane::Interactive, 1, &[], &b, &mut acked);
        assert!(matches!(
            offer(&mut d2, Lane::Interactive, &c, &b),
            Offer::Queued { .. }
        ));
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
        let r = d.resume([2, 0], &b, &mut delivered);
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
        let (c, b) = (cfg(), Budget::new(1 << 20));
        let mut d = Delivery::default();
        d.detach();
        for _ in 0..6 {
            d.enqueue(
                &push(Lane::Interactive, "m"),
                true,
                true,
                &c,
                &b,
                &mut Vec::new(),
            );
        }
        let r = d.resume([0, 0], &b, &mut Vec::new());
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
        let r2 = d2.resume([1000, 0], &b, &mut Vec::new());
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
        assert_eq!((b.used(), d.held()), (0, 0));
        assert!(d.is_idle());
    }
}
