//! Sessions: the sans-IO state machine ([`Session`]) and the shared handle
//! ([`SessionHandle`]) through which the router reaches a live session.
//!
//! The state machine imports no tokio and never reads the clock: frames and `now`
//! come in, frames, timeouts and a close decision come out. Side effects that
//! need the rest of the gateway (token checks, the registry, the upstream) go
//! through the [`SessionEnv`] trait, so tests drive it with a fake environment
//! on virtual time.

mod core;
mod handle;

pub use self::core::{LoginGrant, Session, SessionEnv, SessionParams, CLOSE_LINGER};
pub use handle::{shared_size, CloseCmd, Enqueued, SessionHandle, SessionInfo, WeakSession};
