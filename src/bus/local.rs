//! The in-process bus: one node, commands run on the local [`Executor`] (the
//! router), events go to the [`EventHub`] of this process's upstream
//! connections.

use std::sync::Arc;

use super::{Bus, BusFuture, Command, EventHub, Executor, QueueLimits, Reply, Subscription};
use crate::ids::NodeId;
use crate::wire::pb;

/// The default bus.
pub struct LocalBus {
    node: NodeId,
    executor: Arc<dyn Executor>,
    hub: Arc<EventHub>,
}

impl LocalBus {
    /// The bus of node `node`: commands run on `executor`, events go to `hub`.
    pub fn new(node: NodeId, executor: Arc<dyn Executor>, hub: Arc<EventHub>) -> Self {
        Self {
            node,
            executor,
            hub,
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

    fn request(&self, cmd: Command) -> BusFuture<Reply> {
        let outcome = match cmd {
            // A push may reach every session of the node: it runs paced,
            // yielding to the runtime between chunks of recipients.
            Command::Push { .. } => {
                let executor = self.executor.clone();
                return Box::pin(async move {
                    Reply {
                        outcome: executor.run(&cmd).await,
                        failed: Vec::new(),
                    }
                });
            }
            // Other commands are small and synchronous: already done.
            _ => self.executor.execute(&cmd),
        };
        Box::pin(std::future::ready(Reply {
            outcome,
            failed: Vec::new(),
        }))
    }

    fn emit(&self, event: pb::Event) -> bool {
        self.hub.publish(event)
    }

    fn subscribe(&self, group: &str, limits: QueueLimits) -> Subscription {
        self.hub.subscribe(group, limits)
    }
}
