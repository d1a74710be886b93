//! `[bus]`: how the nodes of a cluster reach each other.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The bus between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// One node, in process: `tether serve` alone.
    #[default]
    Local,
    /// A cluster joined by a NATS server (core NATS: no JetStream needed).
    Nats,
}

/// `[bus]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub kind: BusKind,
    /// NATS servers to connect to (any one will do; the client finds the
    /// rest of a NATS cluster from them).
    pub urls: Vec<String>,
    /// The subject prefix: the nodes with the same one form a cluster, so
    /// that several clusters can share one NATS server.
    pub cluster: String,
    /// NATS credentials: a user and password, or a token.
    /// `TETHER_BUS_PASSWORD` and `TETHER_BUS_TOKEN` override the file
    /// (`config::env`).
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// How long a request waits for another node's answer; a node that
    /// does not answer in time is reported in the upstream's reply.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How often a node tells the others it is alive.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Silence after which the others take a node for dead (stop routing
    /// to it and report its users' pushes as undelivered).
    #[serde(with = "humantime_serde")]
    pub node_timeout: Duration,
    /// The key every node signs resume tokens with, so that a device can
    /// resume on any node (at least 32 bytes). Unset, each node draws a
    /// random one and a session resumes only on the node that holds it.
    /// `TETHER_RESUME_SECRET` overrides it (`config::env`).
    pub resume_secret: Option<String>,
    /// The key before the last rotation: tokens it signed still verify.
    /// `TETHER_RESUME_SECRET_PREVIOUS` overrides it (`config::env`).
    pub resume_secret_previous: Option<String>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            kind: BusKind::Local,
            urls: vec!["nats://127.0.0.1:4222".into()],
            cluster: "tether".into(),
            user: None,
            password: None,
            token: None,
            request_timeout: Duration::from_secs(2),
            heartbeat: Duration::from_secs(1),
            node_timeout: Duration::from_secs(5),
            resume_secret: None,
            resume_secret_previous: None,
        }
    }
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &Option<String>| s.as_ref().map(|_| "<hidden>");
        f.debug_struct("BusConfig")
            .field("kind", &self.kind)
            .field("urls", &self.urls)
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("request_timeout", &self.request_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("node_timeout", &self.node_timeout)
            .field("resume_secret", &hidden(&self.resume_secret))
            .field(
                "resume_secret_previous",
                &hidden(&self.resume_secret_previous),
            )
            .finish()
    }
}

/// Whether `s` is one or more NATS subject tokens of letters, digits, `-`
/// and `_`, separated by dots (no wildcard, no empty token).
pub fn is_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl BusConfig {
    /// Checks the section; `node_id` must be one subject token with NATS.
    ///
    /// # Errors
    /// The offending key and why.
    pub fn check(&self, node_id: &str) -> Result<(), (&'static str, String)> {
        for (key, v) in [
            ("bus.resume_secret", &self.resume_secret),
            ("bus.resume_secret_previous", &self.resume_secret_previous),
        ] {
            if v.as_ref().is_some_and(|v| v.len() < 32) {
                return Err((key, "must be at least 32 bytes".into()));
            }
        }
        if self.kind != BusKind::Nats {
            return Ok(());
        }
        if self.urls.is_empty() {
            return Err(("bus.urls", "needs at least one NATS URL".into()));
        }
        for u in &self.urls {
            if !(u.starts_with("nats://") || u.starts_with("tls://") || !u.contains("://")) {
                return Err(("bus.urls", format!("{u:?} is not a nats:// or tls:// URL")));
            }
        }
        if !is_subject(&self.cluster) || self.cluster.len() > 64 {
            return Err((
                "bus.cluster",
                "must be 1..=64 bytes of letters, digits, '-', '_' and dots".into(),
            ));
        }
        if node_id.contains('.') || !is_subject(node_id) {
            return Err((
                "node_id",
                "with bus.kind = \"nats\", must be letters, digits, '-' and '_' only".into(),
            ));
        }
        if self.password.is_some() != self.user.is_some() {
            return Err(("bus.user", "bus.user and bus.password go together".into()));
        }
        let ms = |d: Duration| d.as_millis();
        if !(10..=60_000).contains(&ms(self.request_timeout)) {
            return Err(("bus.request_timeout", "must be 10ms..=60s".into()));
        }
        if !(100..=10_000).contains(&ms(self.heartbeat)) {
            return Err(("bus.heartbeat", "must be 100ms..=10s".into()));
        }
        if self.node_timeout < self.heartbeat * 3 || self.node_timeout > Duration::from_secs(60) {
            return Err((
                "bus.node_timeout",
                "must be at least 3 heartbeats and at most 60s".into(),
            ));
        }
        Ok(())
    }
}
