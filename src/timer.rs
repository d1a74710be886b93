//! A hashed timer wheel shared by every connection of a process.
//!
//! A connection keeps one entry (a weak handle, 8 bytes) in the wheel instead
//! of a sleeping future per connection. Entries are lazy: when a slot fires,
//! its connections are woken, look at their own deadline, and re-register if
//! it moved (heartbeats push the idle deadline forward without touching the
//! wheel). Deadlines beyond the wheel's horizon land in its last slot and
//! simply re-register when they fire early.
//!
//! Entries hold weak references, so an ended session is not kept alive, but
//! its allocation is, until the entry goes. A connection that ends takes its
//! current entry out ([`TimerWheel::cancel`]); entries left behind by earlier
//! registrations are swept by [`TimerWheel::advance`], a few slots per tick
//! ([`COMPACT_SLOTS`]), so an ended session's memory comes back within one
//! sweep of the wheel (16 s at the default 250 ms tick) rather than when its
//! slot fires (up to the idle timeout).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::session::{SessionHandle, WeakSession};

/// Number of slots; with a 250 ms tick the horizon is about 17 minutes.
const SLOTS: usize = 4096;

/// Slots swept of dead entries per tick: the whole wheel every 64 ticks.
/// A sweep reads each entry's strong count (no atomic read-modify-write), so
/// a million entries cost about a millisecond per full round.
const COMPACT_SLOTS: usize = 64;

pub struct TimerWheel {
    tick: Duration,
    origin: Instant,
    /// The next tick index to fire; every slot below it has fired.
    cursor: AtomicU64,
    /// The next slot to sweep of dead entries.
    compact: AtomicU64,
    slots: Box<[Mutex<Vec<WeakSession>>]>,
}

/// What [`TimerWheel::schedule`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// Registered to fire at this tick index.
    At(u64),
    /// Already due: the caller should act now.
    Due,
}

impl TimerWheel {
    pub fn new(tick: Duration, origin: Instant) -> Self {
        Self {
            tick,
            origin,
            cursor: AtomicU64::new(0),
            compact: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// The tick at or after `at`.
    pub fn tick_ceil(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.origin);
        let t = self.tick.as_nanos();
        (d.as_nanos().div_ceil(t)) as u64
    }

    /// The tick at or before `now`.
    fn tick_floor(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.origin);
        (d.as_nanos() / self.tick.as_nanos()) as u64
    }

    /// Index of the next tick to fire.
    pub fn cursor(&self) -> u64 {
        self.cursor.load(Ordering::Acquire)
    }

    /// Arranges for `who` to be woken at or after `at` (within one tick).
    pub fn schedule(&self, at: Instant, who: &SessionHandle) -> Scheduled {
        let cursor = self.cursor();
        let want = self.tick_ceil(at);
        if want < cursor {
            // That tick has already fired: the deadline has passed.
            return Scheduled::Due;
        }
        let t = want.min(cursor + SLOTS as u64 - 1);
        let mut slot = self.slots[(t % SLOTS as u64) as usize].lock();
        // The cursor only moves past a slot while that slot's lock is held, so
        // this check cannot race with the slot being fired.
        if self.cursor() > t {
            return Scheduled::Due;
        }
        slot.push(who.downgrade());
        Scheduled::At(t)
    }

    /// Removes one entry of `who` registered at tick `at` (the low 32 bits of
    /// the tick [`TimerWheel::schedule`] returned), if it is still there. One
    /// only: another connection of the same session may have registered at
    /// the same tick.
    pub fn cancel(&self, at: u32, who: &SessionHandle) {
        let mut slot = self.slots[at as usize % SLOTS].lock();
        if let Some(i) = slot.iter().position(|w| w.is(who)) {
            slot.swap_remove(i);
        }
    }

    /// Entries in the wheel, live or dead (tests and metrics).
    pub fn len(&self) -> usize {
        self.slots.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether the wheel holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops the entries of ended sessions from the next `n` slots.
    fn compact(&self, n: usize) {
        let start = self.compact.fetch_add(n as u64, Ordering::Relaxed);
        for i in 0..n as u64 {
            let mut slot = self.slots[((start + i) % SLOTS as u64) as usize].lock();
            slot.retain(|w| !w.is_dead());
            if slot.is_empty() && slot.capacity() > 64 {
                slot.shrink_to_fit();
            }
        }
    }

    /// Fires every slot due at `now`; returns how many live entries were woken.
    /// Also sweeps a few slots of dead entries.
    pub fn advance(&self, now: Instant) -> usize {
        self.compact(COMPACT_SLOTS);
        let target = self.tick_floor(now);
        let mut woken = 0;
        let mut batch = Vec::new();
        loop {
            let c = self.cursor();
            if c > target {
                break;
            }
            {
                let mut slot = self.slots[(c % SLOTS as u64) as usize].lock();
                std::mem::swap(&mut *slot, &mut batch);
                self.cursor.store(c + 1, Ordering::Release);
            }
            for w in batch.drain(..) {
                woken += usize::from(w.wake());
            }
        }
        woken
    }

    pub fn tick(&self) -> Duration {
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SessionId;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn fires_at_or_after_deadline_not_before() {
        let t0 = Instant::now();
        let w = TimerWheel::new(Duration::from_millis(100), t0);
        let h = SessionHandle::new(SessionId(1));
        let c = Arc::new(Count(AtomicUsize::new(0)));
        h.register_waker(0, &Waker::from(c.clone()));
        assert_eq!(
            w.schedule(t0 + Duration::from_millis(250), &h),
            Scheduled::At(3)
        );
        w.advance(t0 + Duration::from_millis(299));
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        w.advance(t0 + Duration::from_millis(300));
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        // Past deadlines are due at once.
        assert_eq!(w.schedule(t0, &h), Scheduled::Due);
        // Dropped sessions are skipped.
        let gone = SessionHandle::new(SessionId(2));
        w.schedule(t0 + Duration::from_secs(1), &gone);
        drop(gone);
        assert_eq!(w.advance(t0 + Duration::from_secs(2)), 0);
    }

    #[test]
    fn far_deadlines_clamp_to_horizon() {
        let t0 = Instant::now();
        let w = TimerWheel::new(Duration::from_millis(10), t0);
        let h = SessionHandle::new(SessionId(1));
        assert_eq!(
            w.schedule(t0 + Duration::from_secs(3600), &h),
            Scheduled::At(SLOTS as u64 - 1)
        );
    }

    #[test]
    fn cancel_and_sweeps_let_ended_sessions_go() {
        let t0 = Instant::now();
        let w = TimerWheel::new(Duration::from_millis(100), t0);
        let a = SessionHandle::new(SessionId(1));
        let b = SessionHandle::new(SessionId(2));
        let Scheduled::At(ta) = w.schedule(t0 + Duration::from_secs(60), &a) else {
            panic!("a future deadline is scheduled");
        };
        w.schedule(t0 + Duration::from_secs(60), &a);
        w.schedule(t0 + Duration::from_secs(60), &b);
        w.schedule(t0 + Duration::from_secs(30), &a);
        assert_eq!(w.len(), 4);
        w.cancel(ta as u32, &a);
        assert_eq!(w.len(), 3, "cancel takes one entry of that session only");
        drop(a);
        // Well before any slot fires, a full round of sweeps drops the dead
        // session's entries and keeps the live one.
        for i in 0..(SLOTS / COMPACT_SLOTS) as u64 {
            w.advance(t0 + Duration::from_millis(i));
        }
        assert_eq!(w.len(), 1);
        assert_eq!(w.advance(t0 + Duration::from_secs(61)), 1, "b still fires");
    }
}
