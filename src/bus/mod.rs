//! The bus: the seam between the upstream side (requests from logic services)
//! and the session side (the sessions of each node).
//!
//! Commands travel from the upstream side to the nodes that hold their
//! targets and come back as one merged [`Reply`]; events travel from sessions
//! to the upstream subscribers. The in-process [`LocalBus`] is the default;
//! [`NatsBus`] joins the nodes of a cluster over a NATS server. The bus is
//! the transport between nodes only: the [`Executor`] (the router) runs
//! commands on a node's sessions, and the [`EventHub`] fans events out to
//! that node's upstream subscribers.

mod codec;
pub mod directory;
mod hub;
mod local;
mod nats;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub use hub::{EventHub, EventKind, QueueLimits, Scope, Subscription};
pub use local::LocalBus;
pub use nats::{moved_memory, NatsBus, NatsConnection, NatsOptions, Sessions, TakeGuard};

use crate::ids::{DeviceId, NodeId, RoomId, UserId};
use crate::session::CloseCmd;
use crate::wire::{pb, Code, SharedPush};

/// Who a push is for.
#[derive(Debug, Clone)]
pub enum PushTarget {
    User(UserId),
    Device(UserId, DeviceId),
    Users(Vec<UserId>),
    Room(RoomId),
    Everyone,
}

/// A command for the sessions of a node.
#[derive(Debug, Clone)]
pub enum Command {
    Push {
        target: PushTarget,
        push: SharedPush,
    },
    Kick {
        user: UserId,
        device: Option<DeviceId>,
        close: CloseCmd,
        /// Only sessions that logged in before this (Unix ms); 0: all. A
        /// login that replaces sessions on other nodes never ends a newer
        /// one.
        before_ms: u64,
    },
    Room {
        room: RoomId,
        users: Vec<UserId>,
        remove: bool,
    },
    Presence {
        users: Vec<UserId>,
    },
}

/// What one push did on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushOutcome {
    /// Sessions it was queued for.
    pub sessions: u64,
    /// Sessions that refused it (full queue).
    pub dropped: u64,
    /// Targeted users with no live session on this node.
    pub missing_users: Vec<UserId>,
    /// Sessions found that had ended before the push reached them (rare:
    /// a race with a kick or with a move to another node).
    pub closed: Vec<(UserId, DeviceId)>,
    /// Cluster: sessions this push missed here because they moved to
    /// another node a moment ago, and the node they went to.
    pub moved: Vec<(UserId, DeviceId, NodeId)>,
}

/// One node's answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Push(PushOutcome),
    Count(u64),
    Presence(Vec<pb::UserPresence>),
}

/// A node that did not run its part of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFailure {
    pub node: NodeId,
    /// `CODE_NODE_UNREACHABLE`, `CODE_NODE_TIMEOUT`, or `CODE_INTERNAL`
    /// (its answer made no sense).
    pub code: Code,
    pub message: String,
    /// For a push: the targeted users routed to that node and found on no
    /// other (they may or may not have got it).
    pub users: Vec<UserId>,
}

/// What a command did across the cluster: the outcomes of every node that
/// answered, merged (a push's `missing_users` are those no node had), and
/// the nodes that did not answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub outcome: Outcome,
    pub failed: Vec<NodeFailure>,
}

/// A boxed future, so the trait stays object safe.
pub type BusFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An encoded upstream event: one `GatewayFrame` with its length prefix,
/// encoded once and shared by every subscriber.
#[derive(Debug, Clone)]
pub struct EventFrame(pub Bytes);

/// What runs commands on this node's sessions (the router). The bus hands
/// it the commands addressed to this node; it is a trait so that the bus
/// sits below the router and knows nothing of registries or sessions.
pub trait Executor: Send + Sync + 'static {
    /// Small commands (kick, room, presence): synchronous, done on return.
    fn execute(&self, cmd: &Command) -> Outcome;
    /// A push, paced: yields to the runtime while it fans out.
    fn run<'a>(&'a self, cmd: &'a Command) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
}

/// The pluggable bus.
pub trait Bus: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &NodeId;

    /// Runs `cmd` wherever its targets are (this node, and with a cluster
    /// the other nodes that hold them) and merges what they did. A push to
    /// many sessions yields to the runtime while it fans out. No node is
    /// waited on longer than the bus's request timeout.
    ///
    /// # Cancel safety
    /// Not cancel safe: a push dropped midway has reached some of its
    /// recipients and its outcomes are lost. Await it to the end.
    fn request(&self, cmd: Command) -> BusFuture<Reply>;

    /// Publishes an event to the upstream subscribers. Returns whether at least
    /// one subscriber accepted it (uplinks answer the client with this).
    fn emit(&self, event: pb::Event) -> bool;

    /// Subscribes an upstream connection to events, with a queue bounded by
    /// `limits`.
    fn subscribe(&self, group: &str, limits: QueueLimits) -> Subscription;

    /// A session of `user` (of `device`, or of any device when `None`)
    /// logged in here at `since_ms` under a policy that replaces others:
    /// sessions it replaces on other nodes that logged in before it end
    /// with `CODE_REPLACED`. One node has no others.
    fn replace_elsewhere(&self, _user: &UserId, _device: Option<&DeviceId>, _since_ms: u64) {}
}
