//! Newtypes for the identifiers that travel through the gateway.
//!
//! String ids are `Arc<str>` so that the registry and every session share one
//! allocation per id instead of copying it.

use std::fmt;
use std::sync::Arc;

macro_rules! str_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a string without validation (validation happens at the wire edge).
            pub fn new(s: impl AsRef<str>) -> Self {
                Self(Arc::from(s.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

str_id!(
    /// A user, as named by the `sub` claim of the login token.
    UserId
);
str_id!(
    /// One device (app install) of a user.
    DeviceId
);
str_id!(
    /// A room: a named group of sessions that receive the same pushes.
    RoomId
);
str_id!(
    /// A gateway node, unique within a cluster.
    NodeId
);

/// A connection, and once logged in its session. Unique per node run.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The transport a session arrived on; a small fixed set, usable as a metric label.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TransportKind {
    Tcp,
    Tls,
    Quic,
    Memory,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Quic => "quic",
            TransportKind::Memory => "memory",
        }
    }
}
