//! The connection and login limits of one node ([`Limits`]): the global,
//! per-IP and pending-login caps, the device cap per user, and the login
//! token bucket (which refreshes share).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::config::Config;
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::wire::Code;

/// Connection and login limits of one node.
pub struct Limits {
    per_ip_max: u32,
    per_ip: DashMap<IpAddr, u32>,
    max_conns: usize,
    conns: AtomicUsize,
    /// Open connections by transport, indexed by `TransportKind as usize`:
    /// this node's own (the `tether_connections` gauge is the process's,
    /// shared by every node in it).
    by_kind: [AtomicUsize; TransportKind::ALL.len()],
    /// `limits.max_pending_logins`; 0 = unlimited.
    max_pending: usize,
    /// Connections in `Gateway::pending` (accepted, not logged in yet).
    pending: AtomicUsize,
    /// `limits.max_devices_per_user`; 0 = unlimited.
    pub(super) max_devices: usize,
    bucket: Option<Mutex<Bucket>>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Limits {
    pub(super) fn new(cfg: &Config, now: Instant) -> Self {
        let l = &cfg.limits;
        Self {
            per_ip_max: l.max_connections_per_ip,
            per_ip: DashMap::new(),
            max_conns: l.max_connections as usize,
            conns: AtomicUsize::new(0),
            by_kind: Default::default(),
            max_pending: l.max_pending_logins as usize,
            pending: AtomicUsize::new(0),
            max_devices: l.max_devices_per_user as usize,
            bucket: (l.login_rate > 0).then(|| {
                Mutex::new(Bucket {
                    rate: f64::from(l.login_rate),
                    burst: f64::from(l.login_burst),
                    tokens: f64::from(l.login_burst),
                    last: now,
                })
            }),
        }
    }

    /// Counts a new connection. Returns the IP to release later when per-IP
    /// accounting is on.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when a cap is reached.
    pub fn acquire_conn(&self, ip: IpAddr, kind: TransportKind) -> Result<Option<IpAddr>, Code> {
        let n = self.conns.fetch_add(1, Ordering::Relaxed);
        if self.max_conns > 0 && n >= self.max_conns {
            self.conns.fetch_sub(1, Ordering::Relaxed);
            return Err(Code::TooManyConnections);
        }
        let ip = if self.per_ip_max == 0 {
            None
        } else {
            let mut e = self.per_ip.entry(ip).or_insert(0);
            if *e >= self.per_ip_max {
                drop(e);
                self.conns.fetch_sub(1, Ordering::Relaxed);
                return Err(Code::TooManyConnections);
            }
            *e += 1;
            Some(ip)
        };
        self.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        Ok(ip)
    }

    pub fn release_conn(&self, ip: Option<IpAddr>, kind: TransportKind) {
        self.conns.fetch_sub(1, Ordering::Relaxed);
        self.by_kind[kind as usize].fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = ip {
            self.per_ip.remove_if_mut(&ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }

    /// Open connections by transport, in the order of [`TransportKind::ALL`].
    pub fn connections_by_transport(&self) -> [usize; TransportKind::ALL.len()] {
        std::array::from_fn(|i| self.by_kind[i].load(Ordering::Relaxed))
    }

    /// Connections accepted that have not logged in yet.
    pub fn pending_logins(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether a new connection would exceed `limits.max_pending_logins`
    /// (checked at accept, before any per-connection state exists).
    pub(crate) fn pending_full(&self) -> bool {
        self.max_pending > 0 && self.pending.load(Ordering::Relaxed) >= self.max_pending
    }

    /// Counts one more connection waiting for its login.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when `limits.max_pending_logins` is reached.
    pub(super) fn acquire_pending(&self) -> Result<(), Code> {
        let n = self.pending.fetch_add(1, Ordering::Relaxed);
        if self.max_pending > 0 && n >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(Code::TooManyConnections);
        }
        metrics::gauge!(m::PENDING_LOGINS).increment(1.0);
        Ok(())
    }

    pub(super) fn release_pending(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PENDING_LOGINS).decrement(1.0);
    }

    /// Takes one login token from the bucket.
    pub fn try_login(&self, now: Instant) -> bool {
        let Some(b) = &self.bucket else {
            return true;
        };
        let mut b = b.lock();
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now.max(b.last);
        b.tokens = (b.tokens + dt * b.rate).min(b.burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
