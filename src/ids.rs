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
///
/// Adding a transport is one variant here and one line in [`TransportKind::ALL`]
/// (and its label in `as_str`): every per-transport table (the metric labels,
/// the hot counters in `metrics`) derives from `ALL`, and a unit test checks
/// that each kind has its slot and a label of its own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TransportKind {
    Tcp,
    Tls,
    Quic,
    Memory,
    /// WebSocket over plain TCP (`listen.ws`).
    Ws,
    /// WebSocket over TLS (`listen.wss`).
    Wss,
}

impl TransportKind {
    /// Every kind, each at the index of its discriminant (`kind as usize`).
    pub const ALL: [TransportKind; 6] = [
        TransportKind::Tcp,
        TransportKind::Tls,
        TransportKind::Quic,
        TransportKind::Memory,
        TransportKind::Ws,
        TransportKind::Wss,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Quic => "quic",
            TransportKind::Memory => "memory",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
        }
    }

    /// The kind a label names (the inverse of [`TransportKind::as_str`]).
    pub fn from_label(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether devices connect over it (every kind but the in-process one).
    pub fn is_client(self) -> bool {
        self != TransportKind::Memory
    }
}

#[cfg(test)]
mod tests {
    use super::TransportKind;

    #[test]
    fn every_transport_has_its_slot_and_a_label_of_its_own() {
        for (i, k) in TransportKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?} is not at its index in ALL");
            assert_eq!(TransportKind::from_label(k.as_str()), Some(*k));
        }
        let mut labels: Vec<_> = TransportKind::ALL.iter().map(|k| k.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), TransportKind::ALL.len(), "a label twice");
        // A variant missing from ALL fails here: the last variant's index
        // is ALL's last.
        assert_eq!(TransportKind::Wss as usize + 1, TransportKind::ALL.len());
    }
}
