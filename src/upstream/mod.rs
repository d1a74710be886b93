//! The internal socket for upstream services (chat logic, push service), and a
//! Rust client for it.
//!
//! Same framing as the client protocol, with `upstream.proto` envelopes. A
//! connection authenticates with the shared secret in its first frame (Hello),
//! then sends requests (push, kick, rooms, presence) that go through the
//! [`Bus`](crate::bus::Bus), and, if it subscribed, receives events.

mod client;
mod codec;
mod hello_limit;
mod pending;
mod server;

pub use client::{ClientError, Endpoint, EventStream, UpstreamClient, UpstreamOptions};
pub use codec::FrameCodec;
pub use server::{UpstreamListeners, MAX_PUSHES_PER_BATCH};
