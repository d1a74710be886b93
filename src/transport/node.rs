//! What a connection asks of the node it runs on: the [`Node`] trait.
//!
//! A [`Link`](super::Link) and its driver need a clock, the settings, the
//! connection limits, the session lifecycle (a new session id, pending,
//! settled, ended), a [`SessionEnv`] to run frames with, the drain, a few
//! counters and the parker. They get exactly that through this trait, which
//! the gateway implements, so the transport layer sits below the gateway and
//! a test can drive a link with a small fake node.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::ids::{SessionId, TransportKind};
use crate::session::{CloseCmd, DeliveryConfig, SessionEnv, SessionHandle, SessionParams};
use crate::timer::TimerWheel;
use crate::wire::Code;

use super::quic::QuicPaths;

/// A node as a connection holds it: one thin pointer. `Arc<dyn Node>` takes
/// two words, and a connection's size is counted in bytes (a task of up to
/// 152 bytes of future stays in tokio's 256-byte cell; see the `sizes` test
/// in conn.rs), so connections share one `Arc<dyn Node>` behind an `Arc`.
#[derive(Clone)]
pub struct NodeRef(Arc<Arc<dyn Node>>);

impl NodeRef {
    pub fn new(node: Arc<dyn Node>) -> Self {
        Self(Arc::new(node))
    }

    /// A reference that does not keep the node alive (a node keeps one to
    /// hand the same `NodeRef` to all its connections).
    pub fn downgrade(&self) -> Weak<Arc<dyn Node>> {
        Arc::downgrade(&self.0)
    }

    pub fn upgrade(weak: &Weak<Arc<dyn Node>>) -> Option<Self> {
        weak.upgrade().map(Self)
    }
}

impl std::ops::Deref for NodeRef {
    type Target = dyn Node;

    fn deref(&self) -> &(dyn Node + 'static) {
        &**self.0
    }
}

/// A connection's side of its [`SessionEnv`]: what a frame may change in the
/// connection (a login registers it, a resume swaps its handle).
pub struct ConnEnv<'a> {
    /// The connection's session handle; a resume replaces it.
    pub handle: &'a mut SessionHandle,
    /// The connection's generation on that handle.
    pub gen: &'a mut u32,
    pub kind: TransportKind,
    /// The peer's address (asked only when a login succeeds).
    pub peer: &'a dyn Fn() -> Option<SocketAddr>,
    /// Set once the session is in the registry (a login or a resume).
    pub registered: &'a mut bool,
}

/// What a connection asks of its node. One per node, shared by every
/// connection as an `Arc<dyn Node>`.
pub trait Node: Send + Sync + 'static {
    /// The session core's clock: tokio's, so paused-time tests control it.
    fn now(&self) -> Instant;
    fn config(&self) -> &Config;
    fn params(&self) -> &Arc<SessionParams>;
    fn delivery(&self) -> &DeliveryConfig;
    /// The timer wheel every connection arms its deadline on.
    fn wheel(&self) -> &TimerWheel;

    /// Counts a new connection against the caps; the IP to release later
    /// when per-IP accounting is on.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when a cap is reached.
    fn acquire_conn(&self, ip: IpAddr, kind: TransportKind) -> Result<Option<IpAddr>, Code>;
    /// Gives back what [`Node::acquire_conn`] took.
    fn release_conn(&self, ip: Option<IpAddr>, kind: TransportKind);
    /// Whether a new connection would exceed `limits.max_pending_logins`
    /// (checked at accept, before any per-connection state exists).
    fn pending_full(&self) -> bool;

    fn next_session_id(&self) -> SessionId;
    /// A connection was accepted (it is not logged in yet).
    fn connection_opened(&self, h: &SessionHandle);
    /// A connection logged in or ended: it is no longer pending.
    fn connection_settled(&self, h: &SessionHandle);
    /// The connection of generation `gen` of a registered session ended
    /// with `code`.
    fn connection_ended(&self, h: &SessionHandle, gen: u32, code: Code);
    /// Runs `run` with this node's [`SessionEnv`] for the connection `conn`
    /// (a closure, so that no environment is allocated per frame).
    fn with_env(&self, conn: ConnEnv<'_>, run: &mut dyn FnMut(&mut dyn SessionEnv));

    fn is_draining(&self) -> bool;
    /// The Close sent to every session when the node drains.
    fn drain_close(&self) -> CloseCmd;

    /// One socket write made to a client.
    fn count_write(&self);
    /// A QUIC client seen at a new address.
    fn count_migration(&self);
    /// Sessions attached over QUIC, and their connections.
    fn quic_paths(&self) -> &Arc<QuicPaths>;

    /// Called with each whole frame a connection receives before it logs
    /// in: true when the connection must hold `body` (and what follows)
    /// until the node wakes it through `conn`, then offer it again. A
    /// cluster node fetches a session another node holds this way before
    /// the `Login` that resumes it runs. One node: never.
    fn await_take(&self, _conn: &SessionHandle, _body: &[u8]) -> bool {
        false
    }

    /// How long a TCP or TLS connection stays quiet before it parks; None
    /// when parking is off.
    fn park_after(&self) -> Option<Duration>;
    /// Idle TCP and TLS connections without a task (park.rs).
    #[cfg(parking)]
    fn parker(&self) -> &super::Parker;
}
