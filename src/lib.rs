//! Tether: a long-connection gateway.
//!
//! The crate is layered so that the parts a peer can reach are pure and testable:
//! - [`wire`]: sans-IO framing and the protobuf types (no tokio, no clock).
//! - [`session`]: the sans-IO session state machine, driven by frames and `now`.
//! - [`registry`], [`router`]: sharded maps and fan-out into per-session queues.
//! - [`transport`]: drives a session over a byte stream (TCP, TLS, WebSocket, in-memory).
//! - [`bus`]: the seam between the upstream side and the session side.
//! - [`upstream`]: the internal socket for upstream services, and its Rust client.
//! - [`gateway`]: wires everything together and runs it.
//! - [`admin`]: the operators' HTTP listener (`/metrics`, the status page, the HTTP
//!   API); [`metrics`]: the metric table.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod bus;
pub mod client;
pub mod config;
pub mod gateway;
pub mod handshake;
pub mod ids;
pub mod metrics;
pub mod quic;
pub mod registry;
pub mod router;
pub mod session;
pub mod timer;
pub mod tls;
pub mod tls13;
pub mod transport;
pub mod upstream;
pub mod wire;
pub mod ws_client;

/// Milliseconds since the Unix epoch, for fields that travel on the wire.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
