//! The in-process bus: one node, commands run on the local router, events go
//! to the upstream connections of this process.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::mpsc;

use super::{Bus, BusError, BusFuture, Command, Destination, EventFrame, Outcome};
use crate::ids::NodeId;
use crate::metrics as m;
use crate::router::Router;
use crate::wire::{frame_bytes, pb};

/// The default bus.
pub struct LocalBus {
    node: NodeId,
    router: Arc<Router>,
    hub: Arc<EventHub>,
}

impl LocalBus {
    pub fn new(node: NodeId, router: Arc<Router>) -> Self {
        Self {
            node,
            router,
            hub: Arc::new(EventHub::default()),
        }
    }

    pub fn hub(&self) -> &Arc<EventHub> {
        &self.hub
    }
}

impl Bus for LocalBus {
    fn node_id(&self) -> &NodeId {
        &self.node
    }

    fn request(
        &self,
        to: Destination,
        cmd: Command,
    ) -> BusFuture<Result<Vec<(NodeId, Outcome)>, BusError>> {
        match to {
            Destination::Node(n) if n != self.node => {
                Box::pin(std::future::ready(Err(BusError::UnknownNode(n))))
            }
            // A push may reach every session of the node: it runs paced,
            // yielding to the runtime between chunks of recipients.
            _ if matches!(cmd, Command::Push { .. }) => {
                let (router, node) = (self.router.clone(), self.node.clone());
                Box::pin(async move { Ok(vec![(node, router.run(&cmd).await)]) })
            }
            // Other commands are small and synchronous: already done.
            _ => Box::pin(std::future::ready(Ok(vec![(
                self.node.clone(),
                self.router.execute(&cmd),
            )]))),
        }
    }

    fn emit(&self, event: pb::Event) -> bool {
        self.hub.publish(event)
    }

    fn subscribe(&self, group: &str, capacity: usize) -> Subscription {
        self.hub.subscribe(group, capacity)
    }
}

struct Subscriber {
    id: u64,
    group: String,
    tx: mpsc::Sender<EventFrame>,
}

/// Upstream subscribers of this process, grouped for load balancing.
#[derive(Default)]
pub struct EventHub {
    subs: RwLock<Vec<Subscriber>>,
    next_id: AtomicUsize,
    rr: AtomicUsize,
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    pub rx: mpsc::Receiver<EventFrame>,
    hub: Arc<EventHub>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.subs.write().retain(|s| s.id != self.id);
    }
}

impl EventHub {
    pub fn subscribe(self: &Arc<Self>, group: &str, capacity: usize) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        self.subs.write().push(Subscriber {
            id,
            group: group.to_owned(),
            tx,
        });
        Subscription {
            rx,
            hub: self.clone(),
            id,
        }
    }

    /// Sends one event to every ungrouped subscriber and to one member of each
    /// group (round robin, skipping full members). Encodes it once.
    pub fn publish(&self, event: pb::Event) -> bool {
        let subs = self.subs.read();
        if subs.is_empty() {
            return false;
        }
        let frame = EventFrame(frame_bytes(&pb::GatewayFrame {
            request_id: 0,
            body: Some(pb::gateway_frame::Body::Event(event)),
        }));
        let mut accepted = false;
        // Groups that took the event, and groups whose every member was full.
        let mut served: Vec<&str> = Vec::new();
        let mut full: Vec<&str> = Vec::new();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = subs.len();
        for i in 0..n {
            let s = &subs[(start + i) % n];
            let grouped = !s.group.is_empty();
            if grouped && served.contains(&s.group.as_str()) {
                continue;
            }
            match s.tx.try_send(frame.clone()) {
                Ok(()) => {
                    accepted = true;
                    if grouped {
                        served.push(&s.group);
                    }
                }
                // A full member of a group: another member may still take it.
                Err(_) if grouped => full.push(&s.group),
                Err(_) => metrics::counter!(m::UPSTREAM_EVENTS_DROPPED).increment(1),
            }
        }
        full.sort_unstable();
        full.dedup();
        let lost = full.iter().filter(|g| !served.contains(g)).count();
        if lost > 0 {
            metrics::counter!(m::UPSTREAM_EVENTS_DROPPED).increment(lost as u64);
        }
        accepted
    }

    pub fn subscribers(&self) -> usize {
        self.subs.read().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> pb::Event {
        pb::Event {
            kind: Some(pb::event::Kind::Undelivered(pb::Undelivered::default())),
        }
    }

    #[tokio::test]
    async fn groups_share_and_ungrouped_get_all() {
        let hub = Arc::new(EventHub::default());
        let mut a1 = hub.subscribe("logic", 16);
        let mut a2 = hub.subscribe("logic", 16);
        let mut solo = hub.subscribe("", 16);
        for _ in 0..10 {
            assert!(hub.publish(ev()));
        }
        let count = |s: &mut Subscription| {
            let mut n = 0;
            while s.rx.try_recv().is_ok() {
                n += 1;
            }
            n
        };
        let (n1, n2, ns) = (count(&mut a1), count(&mut a2), count(&mut solo));
        assert_eq!(n1 + n2, 10, "each event goes to one member of the group");
        assert!(n1 > 0 && n2 > 0, "round robin uses both members: {n1} {n2}");
        assert_eq!(ns, 10);
    }

    #[tokio::test]
    async fn a_full_member_leaves_the_event_to_another() {
        let hub = Arc::new(EventHub::default());
        let mut small = hub.subscribe("g", 1);
        let mut big = hub.subscribe("g", 64);
        for _ in 0..20 {
            assert!(hub.publish(ev()));
        }
        let mut n = 0;
        while small.rx.try_recv().is_ok() {
            n += 1;
        }
        while big.rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 20, "nothing is lost while one member has room");
        drop(small);
        drop(big);
        assert!(!hub.publish(ev()), "no subscriber: not accepted");
    }
}
