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
        // Local execution is synchronous and bounded; the future is already done.
        let res = match to {
            Destination::Node(n) if n != self.node => Err(BusError::UnknownNode(n)),
            _ => Ok(vec![(self.node.clone(), self.router.execute(&cmd))]),
        };
        Box::pin(std::future::ready(res))
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
        let mut groups_done: Vec<&str> = Vec::new();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = subs.len();
        for i in 0..n {
            let s = &subs[(start + i) % n];
            if !s.group.is_empty() && groups_done.contains(&s.group.as_str()) {
                continue;
            }
            match s.tx.try_send(frame.clone()) {
                Ok(()) => {
                    accepted = true;
                    if !s.group.is_empty() {
                        groups_done.push(&s.group);
                    }
                }
                Err(_) => {
                    metrics::counter!(m::UPSTREAM_EVENTS_DROPPED).increment(1);
                }
            }
        }
        accepted
    }

    pub fn subscribers(&self) -> usize {
        self.subs.read().len()
    }
}
