//! What the layers below call back into the gateway for: the router's
//! hooks (delivery reports, ending a detached session, a QUIC session's
//! current address) and the replay budget's reclaim (detached sessions pay
//! first).

use super::Gateway;
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::session::delivery::Item;
use crate::session::{Budget, End, SessionHandle};
use crate::wire::Code;

impl crate::router::RouterHooks for Gateway {
    fn report(&self, h: &SessionHandle, items: &[Item], code: Code) {
        Gateway::report(self, h, items, code);
    }

    fn end_detached(&self, h: &SessionHandle, code: Code) -> bool {
        self.end_session(h, End::Detached, code)
    }

    fn remote_addr(&self, h: &SessionHandle) -> Option<std::net::SocketAddr> {
        if h.transport() != TransportKind::Quic {
            return None;
        }
        self.paths.get(&h.id()).map(|c| c.remote_address())
    }
}

impl crate::budget::Reclaim for Gateway {
    /// Detached sessions pay before live ones: the oldest pushes held by any
    /// detached session go first, until the budget is down to `target`.
    /// Oldest across sessions, not one session emptied after another,
    /// because a broadcast's body is shared: it is freed only once every
    /// session holding it let go, and taking pushes by age frees the oldest
    /// broadcast from all of them before touching the next. Each eviction is
    /// reported (`CODE_DELIVERY_EXPIRED`) and the session's resume shows the
    /// gap. Costs one lock per detached session to start, then a heap step
    /// per eviction.
    fn reclaim(&self, budget: &Budget, target: usize) {
        use std::cmp::Reverse;
        let ids = self.expiry.lock().ids();
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let mut sessions = Vec::new();
        let mut heap = std::collections::BinaryHeap::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            let Some(h) = self.detached.get(&id).map(|e| e.value().0.clone()) else {
                continue;
            };
            if let Some(at) = h.oldest_detached() {
                heap.push(Reverse((at, sessions.len())));
                sessions.push(h);
            }
        }
        let mut evicted = Vec::new();
        let mut n = 0u64;
        while budget.used() > target {
            let Some(Reverse((_, i))) = heap.pop() else {
                break;
            };
            let h = &sessions[i];
            if !h.evict_oldest_detached(budget, &mut evicted) {
                continue;
            }
            n += evicted.len() as u64;
            self.report(h, &evicted, Code::DeliveryExpired);
            evicted.clear();
            if let Some(at) = h.oldest_detached() {
                heap.push(Reverse((at, i)));
            }
        }
        metrics::counter!(m::DROPS, "policy" => "reclaimed").increment(n);
        metrics::gauge!(m::REPLAY_BYTES).set(budget.used() as f64);
    }
}
