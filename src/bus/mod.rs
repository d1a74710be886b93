//! The bus: the seam between the upstream side (requests from logic services)
//! and the session side (the sessions of each node).
//!
//! Commands travel from the upstream side to one node or to all nodes and come
//! back as per-node [`Outcome`]s; events travel from sessions to the upstream
//! subscribers. The in-process [`LocalBus`] is the default; a multi-node backend
//! (NATS) implements the same trait, so the upstream server and the session
//! drivers do not change when it arrives.

mod local;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

pub use local::{EventHub, EventKind, LocalBus, QueueLimits, Subscription};

use crate::ids::{DeviceId, NodeId, RoomId, UserId};
use crate::session::CloseCmd;
use crate::wire::{pb, SharedPush};

/// Where a command goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Every node of the cluster (this one included).
    All,
    /// One node.
    Node(NodeId),
}

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
}

/// One node's answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Push(PushOutcome),
    Count(u64),
    Presence(Vec<pb::UserPresence>),
}

/// Bus failures.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    #[error("bus unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future, so the trait stays object safe.
pub type BusFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An encoded upstream event: one `GatewayFrame` with its length prefix,
/// encoded once and shared by every subscriber.
#[derive(Debug, Clone)]
pub struct EventFrame(pub Bytes);

/// The pluggable bus.
pub trait Bus: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> &NodeId;

    /// Runs `cmd` on the nodes `to` names and gathers their outcomes. A
    /// push to many sessions yields to the runtime while it fans out.
    ///
    /// # Cancel safety
    /// Not cancel safe: a push dropped midway has reached some of its
    /// recipients and its outcomes are lost. Await it to the end.
    fn request(
        &self,
        to: Destination,
        cmd: Command,
    ) -> BusFuture<Result<Vec<(NodeId, Outcome)>, BusError>>;

    /// Publishes an event to the upstream subscribers. Returns whether at least
    /// one subscriber accepted it (uplinks answer the client with this).
    fn emit(&self, event: pb::Event) -> bool;

    /// Subscribes an upstream connection to events, with a queue bounded by
    /// `limits`.
    fn subscribe(&self, group: &str, limits: QueueLimits) -> Subscription;
}
