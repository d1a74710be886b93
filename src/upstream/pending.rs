//! The pool of upstream connections that have not completed `Hello`: a
//! bounded set, oldest first, that admits every newcomer and evicts the
//! oldest member when full.
//!
//! Why evict rather than refuse: a real service sends its `Hello` as soon as
//! it connects, so it spends microseconds in this pool, while a silent or
//! slow socket sits in it until `upstream.hello_timeout`. Refusing the newest
//! would let a few hundred silent sockets lock out every service that connects
//! after them; evicting the oldest means a flood must open a whole pool's
//! worth of connections between a service's connect and its `Hello` to push
//! it out. The pool's size still bounds what unauthenticated peers hold
//! (descriptors, tasks, a 4 KiB `Hello` buffer each).
//!
//! Sans-IO: it holds a value per member (the server's cancel handle) and
//! does nothing to it; the caller closes what [`Pending::admit`] evicts.

use std::collections::BTreeMap;

/// A member's place in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PendingId(u64);

/// Connections waiting for their `Hello`, oldest first; see the module doc.
#[derive(Debug)]
pub struct Pending<T> {
    max: usize,
    next: u64,
    open: BTreeMap<PendingId, T>,
}

impl<T> Pending<T> {
    /// A pool of at most `max` members (at least 1).
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            next: 0,
            open: BTreeMap::new(),
        }
    }

    /// Admits a newcomer; when the pool was full, the oldest member leaves
    /// it and its value is returned for the caller to close.
    pub fn admit(&mut self, v: T) -> (PendingId, Option<T>) {
        let evicted = if self.open.len() >= self.max {
            self.open.pop_first().map(|(_, v)| v)
        } else {
            None
        };
        let id = PendingId(self.next);
        self.next += 1;
        self.open.insert(id, v);
        (id, evicted)
    }

    /// A member leaves (its `Hello` came, or it closed); `None` when it
    /// had been evicted already.
    pub fn remove(&mut self, id: PendingId) -> Option<T> {
        self.open.remove(&id)
    }

    /// Members now.
    pub fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pool_evicts_its_oldest_member() {
        let mut p = Pending::new(3);
        let ids: Vec<_> = (0..3).map(|i| p.admit(i)).collect();
        assert!(ids.iter().all(|(_, e)| e.is_none()));
        // The oldest that is still there goes first.
        assert_eq!(p.remove(ids[0].0), Some(0));
        assert_eq!(p.admit(3).1, None, "there was room");
        assert_eq!(p.admit(4).1, Some(1));
        assert_eq!(p.admit(5).1, Some(2));
        assert_eq!(p.len(), 3);
        // An evicted member's own removal finds nothing.
        assert_eq!(p.remove(ids[1].0), None);
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn a_flood_cannot_grow_it() {
        let mut p = Pending::new(16);
        let mut evicted = 0;
        for i in 0..10_000 {
            evicted += usize::from(p.admit(i).1.is_some());
        }
        assert_eq!((p.len(), evicted), (16, 10_000 - 16));
    }
}
