//! The internal socket for upstream services (chat logic, push service), and a
//! Rust client for it.
//!
//! Same framing as the client protocol, with `upstream.proto` envelopes. A
//! connection authenticates with the shared secret in its first frame (Hello),
//! then sends requests (push, kick, rooms, presence) that go through the
//! [`Bus`](crate::bus::Bus), and, if it subscribed, receives events.

mod client;
mod codec;
pub(crate) mod hello_limit;
pub mod json;
mod pending;
pub mod requests;
mod server;

pub use client::{ClientError, Endpoint, EventStream, UpstreamClient, UpstreamOptions};
pub use codec::FrameCodec;
pub use server::{UpstreamListeners, MAX_PUSHES_PER_BATCH};

use std::sync::Arc;

use crate::bus::Bus;
use crate::ids::NodeId;

/// What the upstream server asks of the node it serves: the bus its
/// requests go through (and its events come from), the node's id, and
/// message ids for pushes that come without one. The gateway implements it,
/// so the upstream layer sits below the gateway.
pub trait UpstreamNode: Send + Sync + 'static {
    fn bus(&self) -> &Arc<dyn Bus>;
    fn node_id(&self) -> &NodeId;
    /// A push message id, unique across nodes and restarts.
    fn new_message_id(&self) -> String;
}
