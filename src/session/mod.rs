//! Sessions: the sans-IO state machine ([`Session`]), the sans-IO delivery
//! state ([`delivery`]), and the shared handle ([`SessionHandle`]) through
//! which the router reaches a session.
//!
//! The state machines import no tokio and never read the clock: frames and
//! `now` come in, frames, timeouts and a close decision come out. Side effects
//! that need the rest of the gateway (token checks, the registry, the
//! upstream) go through the [`SessionEnv`] trait, so tests drive it with a
//! fake environment on virtual time.

mod core;
pub mod delivery;
mod handle;
mod write_delay;

pub use self::core::{
    LoginGrant, Refreshed, Session, SessionEnv, SessionParams, UplinkAck, CLOSE_LINGER,
    MAX_INVALID_FRAMES,
};
pub use delivery::{Budget, DeliveryConfig, Exported, ExportedLane, Lanes, ITEM_OVERHEAD};
pub use handle::{
    keeps_state, shared_size, CloseCmd, End, Enqueued, Moved, MovedUplink, SessionHandle,
    SessionInfo, Uplink, WeakSession,
};
pub use write_delay::WriteDelay;
