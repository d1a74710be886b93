//! The node's replay budget: the bytes held for pushes that are queued or
//! unacknowledged, across every session of the node (`delivery.replay_budget`).
//!
//! It measures what is really held. A push's encoded body is stored once,
//! however many sessions queue it, so it is charged once: when the first
//! session takes it ([`BodyCharge::charge`]), and given back when the last
//! reference to it is gone (the `Drop` of the push that carries the charge).
//! Each session's reference to it is charged [`ITEM_OVERHEAD`] bytes.
//!
//! When a charge does not fit, [`Budget::make_room`] asks the node's
//! [`Reclaim`] hook (the gateway) to evict what detached sessions hold,
//! oldest first, before anything is refused: sessions without a connection
//! pay before live ones. This module is a leaf: it imports nothing of the
//! crate, so the wire layer can carry a charge without knowing sessions.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

/// Bytes a queued or unacknowledged push is charged per session beyond its
/// body: the item itself, its share of the queue's ring buffer and of the
/// shared push's bookkeeping. The body is charged once per push node-wide;
/// each session's own bounds (`queue_bytes`, `detached_bytes`) count the body
/// plus this for every push the session holds, since the session pins it.
pub const ITEM_OVERHEAD: usize = 96;

/// What the budget asks of the node when a charge does not fit.
pub trait Reclaim: Send + Sync {
    /// Evicts pushes held by sessions without a connection, oldest first,
    /// until `budget.used()` is at most `target` or nothing is left to evict.
    /// Called with no session lock held.
    fn reclaim(&self, budget: &Budget, target: usize);
}

/// The node-wide budget for bytes held in queues and windows.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
    reclaim: OnceLock<Weak<dyn Reclaim>>,
    /// One reclaim at a time; a second caller waits, then finds room made.
    reclaiming: Mutex<()>,
    /// Counts pushes queued for detached sessions; a reclaim that found
    /// nothing to evict is not repeated until this moves.
    detached_adds: AtomicU64,
    /// `detached_adds` when a reclaim last found nothing to evict.
    fruitless_at: AtomicU64,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("used", &self.used())
            .field("limit", &self.limit)
            .finish()
    }
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            reclaim: OnceLock::new(),
            reclaiming: Mutex::new(()),
            detached_adds: AtomicU64::new(0),
            fruitless_at: AtomicU64::new(u64::MAX),
        })
    }

    /// Connects the budget to what can evict detached sessions' pushes (once).
    pub fn set_reclaim(&self, r: Weak<dyn Reclaim>) {
        let _ = self.reclaim.set(r);
    }

    /// Bytes currently held by every session of the node.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The configured limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` bytes if they fit.
    pub fn try_take(&self, n: usize) -> bool {
        let prev = self.used.fetch_add(n, Ordering::Relaxed);
        if prev.saturating_add(n) > self.limit {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back `n` bytes taken before.
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// A push was queued for a session without a connection: there may be
    /// something to reclaim again.
    pub fn note_detached_add(&self) {
        self.detached_adds.fetch_add(1, Ordering::Relaxed);
    }

    /// Makes room for a charge of `need` bytes that did not fit, by evicting
    /// detached sessions' oldest pushes down to a low-water mark (so that the
    /// next charges fit without another walk). Returns whether `need` fits
    /// now. Must be called with no session lock held.
    pub fn make_room(&self, need: usize) -> bool {
        let fits = |b: &Self| b.used().saturating_add(need) <= b.limit;
        let Some(r) = self.reclaim.get().and_then(Weak::upgrade) else {
            return fits(self);
        };
        let _one = self.reclaiming.lock();
        if fits(self) {
            return true;
        }
        let adds = self.detached_adds.load(Ordering::Relaxed);
        if self.fruitless_at.load(Ordering::Relaxed) == adds {
            // Nothing was queued for a detached session since a walk found
            // nothing to evict: walking again would find nothing either.
            return false;
        }
        let headroom = (self.limit / 32).max(need);
        r.reclaim(self, self.limit.saturating_sub(headroom));
        if fits(self) {
            true
        } else {
            self.fruitless_at.store(adds, Ordering::Relaxed);
            false
        }
    }
}

/// The once-per-push charge of a push's body, carried by the push itself and
/// given back when the push is dropped (the last session let go of it).
#[derive(Default)]
pub struct BodyCharge {
    /// The budget charged and the bytes, set by the first successful charge.
    charged: OnceLock<(Arc<Budget>, usize)>,
}

impl std::fmt::Debug for BodyCharge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyCharge")
            .field("charged", &self.charged.get().map(|(_, n)| *n))
            .finish()
    }
}

impl BodyCharge {
    /// Charges `len` bytes to `budget` unless this push already carries a
    /// charge. Returns false when the bytes do not fit.
    pub fn charge(&self, budget: &Arc<Budget>, len: usize) -> bool {
        if self.charged.get().is_some() {
            return true;
        }
        if !budget.try_take(len) {
            return false;
        }
        if self.charged.set((budget.clone(), len)).is_err() {
            // Another session charged it first, concurrently.
            budget.give(len);
        }
        true
    }

    /// Whether the body is charged.
    pub fn is_charged(&self) -> bool {
        self.charged.get().is_some()
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        if let Some((b, n)) = self.charged.get() {
            b.give(*n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_charged_once_and_given_back_on_drop() {
        let b = Budget::new(1000);
        let c = BodyCharge::default();
        assert!(c.charge(&b, 600));
        assert!(
            c.charge(&b, 600),
            "a second charge of the same body is free"
        );
        assert_eq!(b.used(), 600);
        let other = BodyCharge::default();
        assert!(!other.charge(&b, 600), "does not fit");
        assert_eq!(b.used(), 600);
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(other.charge(&b, 600));
    }

    struct Evictor {
        held: Mutex<Vec<usize>>,
        calls: AtomicUsize,
    }

    impl Reclaim for Evictor {
        fn reclaim(&self, budget: &Budget, target: usize) {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let mut held = self.held.lock();
            while budget.used() > target {
                let Some(n) = held.pop() else { break };
                budget.give(n);
            }
        }
    }

    #[test]
    fn make_room_reclaims_to_a_low_water_mark_and_does_not_repeat_a_fruitless_walk() {
        let b = Budget::new(3200);
        let ev: Arc<Evictor> = Arc::new(Evictor {
            held: Mutex::new(vec![100; 32]),
            calls: AtomicUsize::new(0),
        });
        let dynev: Arc<dyn Reclaim> = ev.clone();
        b.set_reclaim(Arc::downgrade(&dynev));
        assert!(b.try_take(3200));
        assert!(!b.try_take(100));
        assert!(b.make_room(100));
        // Down to limit - max(limit / 32, need) = 3100 at most.
        assert!(b.used() <= 3100, "{}", b.used());
        assert_eq!(ev.calls.load(Ordering::Relaxed), 1);

        // Fill it with bytes nothing can evict.
        ev.held.lock().clear();
        while b.try_take(100) {}
        assert!(!b.make_room(100));
        assert_eq!(ev.calls.load(Ordering::Relaxed), 2);
        assert!(!b.make_room(100), "nothing new to evict: no second walk");
        assert_eq!(ev.calls.load(Ordering::Relaxed), 2);
        b.note_detached_add();
        assert!(!b.make_room(100));
        assert_eq!(
            ev.calls.load(Ordering::Relaxed),
            3,
            "walks again after a detached add"
        );
    }
}
