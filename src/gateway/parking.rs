//! The gateway's side of parking idle TCP and TLS connections
//! (transport/park.rs): whether it is on, starting it, and its counts.

use std::time::Duration;

use super::Gateway;

impl Gateway {
    /// How long a TCP or TLS connection stays quiet before it parks; None
    /// when parking is off (`listen.park_after = 0`, or no parker runs).
    pub(crate) fn park_after(&self) -> Option<Duration> {
        #[cfg(parking)]
        if self.parker.is_running() && !self.cfg.listen.park_after.is_zero() {
            return Some(self.cfg.listen.park_after);
        }
        None
    }

    /// Plain-TCP connections parked now (transport/park.rs).
    pub fn parked_connections(&self) -> usize {
        #[cfg(parking)]
        return self.parker.parked();
        #[cfg(not(parking))]
        0
    }

    /// Times a TCP or TLS connection was parked so far.
    pub fn parks(&self) -> u64 {
        #[cfg(parking)]
        return self.parker.parks();
        #[cfg(not(parking))]
        0
    }

    /// Reads of parked connections answered in place (a heartbeat, mostly),
    /// after which the connection stayed parked.
    pub fn parked_answers(&self) -> u64 {
        #[cfg(parking)]
        return self.parker.answers();
        #[cfg(not(parking))]
        0
    }

    /// Starts parking idle TCP and TLS connections (the server does this with
    /// its listeners; needs a runtime). Off when `listen.park_after` is 0.
    pub fn start_parker(&self) {
        #[cfg(parking)]
        if !self.cfg.listen.park_after.is_zero() {
            self.parker.start();
        }
    }
}
