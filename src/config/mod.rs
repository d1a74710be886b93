//! Configuration: TOML with `deny_unknown_fields`, humantime durations, validated
//! into its final form before any port is bound.
//!
//! [`DEFAULT_TOML`] is the documented default file that `tether print-config`
//! prints; a unit test keeps it identical to [`Config::default`].

pub mod api;
pub mod bus;
pub mod cid;
pub mod env;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors found while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("invalid config {path}: {message}")]
    Parse { path: String, message: String },
    /// A value parsed but is out of its allowed range.
    #[error("invalid config value `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A secret from the environment ([`env::ENV_SECRETS`]) is refused:
    /// it does not parse, or the key it sets is out of range.
    #[error("invalid environment variable {var}: {reason}")]
    Env { var: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This gateway's node id, unique in a cluster.
    pub node_id: String,
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub session: SessionConfig,
    pub limits: LimitsConfig,
    pub upstream: UpstreamConfig,
    pub metrics: MetricsConfig,
    pub api: api::ApiConfig,
    pub shutdown: ShutdownConfig,
    pub delivery: DeliveryConfig,
    pub quic: QuicConfig,
    pub log: LogConfig,
    pub bus: bus::BusConfig,
}

/// The QUIC listener's settings (`listen.quic` binds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// New QUIC handshakes per second taken without proof of the client's
    /// address; past it, a new client first gets a stateless Retry (one
    /// round trip more, no state kept), which a spoofed source cannot answer.
    pub handshake_rate: u32,
    /// Bytes a client may send ahead on its stream, and on the whole
    /// connection: what a client can make the gateway buffer before it reads.
    pub stream_window: u32,
    /// Bytes of pushes the gateway hands to QUIC per connection that the
    /// client has not acknowledged yet (QUIC's send buffer).
    pub send_window: u32,
    /// TLS sessions the gateway remembers for resumption and 0-RTT; about
    /// 200 bytes each while used. 0 turns 0-RTT off.
    pub session_cache: u32,
    /// SO_RCVBUF and SO_SNDBUF of the UDP socket, in bytes: every client's
    /// packets share it, and the kernel drops what does not fit. 0 keeps
    /// the kernel's default (about 208 KiB, too small under load).
    pub socket_buffer: u32,
    /// Connection IDs a load balancer can route (QUIC-LB); random when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cid: Option<cid::CidConfig>,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            handshake_rate: 2_000,
            stream_window: 64 * 1024,
            send_window: 256 * 1024,
            session_cache: 65_536,
            socket_buffer: 8 << 20,
            cid: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Interactive pushes written but not yet acknowledged, per session.
    pub window: u32,
    /// Bulk pushes written but not yet acknowledged, per session.
    pub bulk_window: u32,
    /// Charged bytes (the encoded push body + 96 per push) of interactive pushes queued
    /// per session, not yet written, before `session.slow_consumer` applies.
    pub queue_bytes: u64,
    /// The same for bulk pushes (bulk always drops past it).
    pub bulk_queue_bytes: u64,
    /// Charged bytes a session keeps while no connection is attached; past
    /// it the oldest pushes are evicted (the resume reports the gap).
    pub detached_bytes: u64,
    /// Charged bytes all detached sessions of one user keep together; past
    /// it the oldest pushes among them are evicted.
    pub detached_bytes_per_user: u64,
    /// A connection whose socket takes no byte of a pending write for this
    /// long is closed as a slow consumer.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Pushes unacknowledged this long with no ack progress close the
    /// connection as dead (`CODE_ACK_TIMEOUT`); the session is kept.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Writes of one push before it is given up (and reported).
    pub max_tries: u8,
    /// How long a dropped session keeps its state for a resume.
    #[serde(with = "humantime_serde")]
    pub resume_window: Duration,
    /// Bytes held in queues and windows by all sessions of the node.
    pub replay_budget: u64,
    /// How long an uplink's client_msg_id is remembered for dedup.
    #[serde(with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Uplinks remembered per session.
    pub dedup_max: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            window: 256,
            bulk_window: 64,
            queue_bytes: 1 << 20,
            bulk_queue_bytes: 4 << 20,
            detached_bytes: 4 << 20,
            detached_bytes_per_user: 16 << 20,
            stall_timeout: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(10),
            max_tries: 3,
            resume_window: Duration::from_secs(120),
            replay_budget: 1 << 30,
            dedup_window: Duration::from_secs(300),
            dedup_max: 128,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Plain TCP listeners.
    pub tcp: Vec<SocketAddr>,
    /// TLS 1.3 listeners.
    pub tls: Vec<SocketAddr>,
    /// WebSocket listeners over plain TCP (`ws://host:port/tether`).
    pub ws: Vec<SocketAddr>,
    /// WebSocket listeners over TLS (`wss://host:port/tether`), with the
    /// TLS certificate and the TLS handshake limits of `[tls]`.
    pub wss: Vec<SocketAddr>,
    /// The `Origin` values a WebSocket upgrade may carry; empty allows any.
    /// A request without `Origin` (not from a browser) is not checked.
    pub ws_origins: Vec<String>,
    /// Whether the WebSocket listeners serve the example browser client
    /// (`/` and `/tether.js`) to plain GETs.
    pub ws_page: bool,
    /// QUIC listeners (UDP), with the TLS certificate. `None` (the key
    /// left out): the TLS listeners' addresses, so that QUIC moves with
    /// `listen.tls` (TLS is TCP and QUIC is UDP: the same port serves
    /// both); see [`ListenConfig::quic_addrs`]. An empty list turns QUIC off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic: Option<Vec<SocketAddr>>,
    /// Listen backlog.
    pub backlog: u32,
    /// SO_RCVBUF for client sockets in bytes; 0 keeps the kernel's autotuning.
    pub recv_buffer: u32,
    /// SO_SNDBUF for client sockets in bytes; 0 keeps the kernel's autotuning.
    pub send_buffer: u32,
    /// A TCP, TLS or WebSocket connection quiet this long (nothing read,
    /// nothing in flight) is parked: no task and no reactor entry until it reads or is
    /// woken. 0 turns parking off.
    #[serde(with = "humantime_serde")]
    pub park_after: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain; when empty a development certificate is generated.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// Where the development certificate is generated and kept.
    pub dev_cert_dir: PathBuf,
    /// Most key exchanges computed at once. A connection holds a slot only
    /// from its complete ClientHello until the gateway's answer is written,
    /// never while it waits for the peer; more wait their turn.
    pub max_handshakes: u32,
    /// The whole handshake, from accept to the client's Finished.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// The client's whole ClientHello, from accept (at most
    /// `handshake_timeout`: the shorter of the two applies).
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Most TLS connections accepted whose handshake has not finished; when
    /// full, the oldest of them is closed to make room for a new one.
    pub max_pending_handshakes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    EdDSA,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub algorithm: JwtAlgorithm,
    /// HS256 shared secret. The default is for development only and logs a warning.
    pub secret: String,
    /// RS256/EdDSA: PEM public key file used to verify tokens.
    pub public_key: Option<PathBuf>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &"<hidden>")
            .field("public_key", &self.public_key)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// What happens when a session's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumerPolicy {
    /// Drop the new push for that session and count it.
    Drop,
    /// Close the session with `CODE_SLOW_CONSUMER`.
    Disconnect,
}

/// Who may join rooms from the client side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientJoin {
    /// Clients cannot join or leave; only the upstream manages rooms.
    Off,
    /// Clients may join the rooms listed in their token's `rooms` claim.
    Token,
    /// Clients may join any room.
    Any,
}

/// How logins of one user coexist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiLogin {
    /// One session per device id; a new login of a device replaces its old session.
    PerDevice,
    /// One session per user; a new login replaces every other session of the user.
    Single,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// A connection that has not logged in by then is closed.
    #[serde(with = "humantime_serde")]
    pub login_timeout: Duration,
    /// Told to clients at login: how often to ping.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A logged-in session that sends nothing for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// What a full interactive queue (`delivery.queue_bytes`) does.
    pub slow_consumer: SlowConsumerPolicy,
    pub client_join: ClientJoin,
    pub multi_login: MultiLogin,
    /// Rooms one session may be in.
    pub max_rooms: u32,
    /// Granularity of the shared timer wheel.
    #[serde(with = "humantime_serde")]
    pub timer_tick: Duration,
    /// Wait up to this long before writing pushes, so that pushes arriving
    /// meanwhile share one write; 0 writes at once.
    #[serde(with = "humantime_serde")]
    pub write_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest frame accepted from a client, in bytes (the length prefix excluded).
    pub max_frame: u32,
    /// Open connections per remote IP; 0 = unlimited.
    pub max_connections_per_ip: u32,
    /// Open client connections in this process; 0 = unlimited.
    pub max_connections: u32,
    /// Logins per second accepted by this node (token bucket); 0 = unlimited.
    pub login_rate: u32,
    /// Burst size of the login bucket.
    pub login_burst: u32,
    /// Connections that have not logged in yet, at once; 0 = unlimited.
    /// Beyond it, new connections are refused with `CODE_TOO_MANY_CONNECTIONS`.
    pub max_pending_logins: u32,
    /// Devices (sessions with distinct device ids) one user may have on this
    /// node; 0 = unlimited. A login of one more device is refused with
    /// `CODE_TOO_MANY_DEVICES`.
    pub max_devices_per_user: u32,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Loopback TCP listener for upstream services; `""` = none.
    #[serde(with = "opt_addr")]
    pub tcp: Option<SocketAddr>,
    /// Unix socket path for upstream services; empty = none.
    pub unix: Option<PathBuf>,
    /// Allow `tcp` to be a non-loopback address.
    pub allow_public: bool,
    /// Shared secret upstream services present in Hello.
    pub secret: String,
    /// Events queued per subscribed upstream connection before new ones are
    /// dropped.
    pub event_queue: u32,
    /// Bytes of encoded events queued per subscribed upstream connection
    /// before new ones are dropped.
    pub event_queue_bytes: u64,
    /// Bytes of replies queued per upstream connection; past it the gateway
    /// reads no more requests from that connection until it reads replies.
    pub reply_queue_bytes: u64,
    /// Largest frame accepted from an upstream after its Hello (the Hello
    /// itself is capped at [`UPSTREAM_HELLO_MAX`]).
    pub max_frame: u32,
    /// Authenticated upstream connections open at once, on both listeners
    /// together (counted from a successful Hello).
    pub max_connections: u32,
    /// Connections that have not completed Hello, at once, on both listeners
    /// together; one more evicts the oldest of them.
    pub max_pending_hellos: u32,
    /// How long a new upstream connection has to send its Hello.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// An upstream connection whose socket takes no byte of a pending write
    /// (a reply or an event) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

/// Largest Hello frame (body) the upstream socket reads before
/// authentication; a bigger one is refused with `CODE_FRAME_TOO_LARGE`.
pub const UPSTREAM_HELLO_MAX: usize = 4096;

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("tcp", &self.tcp)
            .field("unix", &self.unix)
            .field("allow_public", &self.allow_public)
            .field("secret", &"<hidden>")
            .field("event_queue", &self.event_queue)
            .field("event_queue_bytes", &self.event_queue_bytes)
            .field("reply_queue_bytes", &self.reply_queue_bytes)
            .field("max_frame", &self.max_frame)
            .field("max_connections", &self.max_connections)
            .field("max_pending_hellos", &self.max_pending_hellos)
            .field("hello_timeout", &self.hello_timeout)
            .field("stall_timeout", &self.stall_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The admin listener (Prometheus scrape endpoint); `""` = off.
    #[serde(with = "opt_addr")]
    pub listen: Option<SocketAddr>,
    /// Admin connections open at once; more are closed at accept.
    pub max_connections: u32,
    /// How long a connection has to send a complete request head, from
    /// its accept or from the end of its previous response.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is
    /// closed (a client that does not read its response).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long the gateway may take to answer one request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// `[log]`: how log lines are written to standard error.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// The shape of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per event; coloured only when standard error is a
    /// terminal.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target, message, the
    /// event's fields and its spans), for log shippers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("unknown log format {s:?} (text or json)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT, how long sessions get to flush before the process exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Sent in the draining Close frame: wait this long before reconnecting
    /// (clients should add jitter).
    #[serde(with = "humantime_serde")]
    pub reconnect_after: Duration,
    /// Sent in the draining Close frame: where to reconnect; empty = same address.
    pub reconnect_to: String,
}

/// An optional socket address written as a string, where `""` means none.
mod opt_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(a) => s.collect_str(a),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(None);
        }
        s.parse().map(Some).map_err(serde::de::Error::custom)
    }
}

/// The development HS256 secret; using it logs a warning.
pub const DEV_SECRET: &str = "tether-dev-secret-change-me";
/// The development upstream secret; using it logs a warning.
pub const DEV_UPSTREAM_SECRET: &str = "tether-dev-upstream-secret";

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "node-1".into(),
            listen: ListenConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            session: SessionConfig::default(),
            limits: LimitsConfig::default(),
            upstream: UpstreamConfig::default(),
            metrics: MetricsConfig::default(),
            api: api::ApiConfig::default(),
            shutdown: ShutdownConfig::default(),
            delivery: DeliveryConfig::default(),
            quic: QuicConfig::default(),
            log: LogConfig::default(),
            bus: bus::BusConfig::default(),
        }
    }
}

impl ListenConfig {
    /// The addresses QUIC listens on as configured: `listen.quic` when
    /// set, otherwise `listen.tls`'s. A TLS address with port 0 gets the
    /// port its TLS listener was given (the server binds TLS first).
    pub fn quic_addrs(&self) -> &[SocketAddr] {
        self.quic.as_deref().unwrap_or(&self.tls)
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            tcp: vec![SocketAddr::from(([0, 0, 0, 0], 7400))],
            tls: vec![SocketAddr::from(([0, 0, 0, 0], 7443))],
            ws: Vec::new(),
            wss: Vec::new(),
            ws_origins: Vec::new(),
            ws_page: true,
            quic: None,
            backlog: 4096,
            recv_buffer: 0,
            send_buffer: 0,
            park_after: Duration::from_secs(5),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert: None,
            key: None,
            dev_cert_dir: PathBuf::from("certs"),
            max_handshakes: 256,
            handshake_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(5),
            max_pending_handshakes: 8192,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::HS256,
            secret: DEV_SECRET.into(),
            public_key: None,
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            login_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(45),
            idle_timeout: Duration::from_secs(135),
            slow_consumer: SlowConsumerPolicy::Disconnect,
            client_join: ClientJoin::Token,
            multi_login: MultiLogin::PerDevice,
            max_rooms: 64,
            timer_tick: Duration::from_millis(250),
            write_delay: Duration::ZERO,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame: 64 * 1024,
            max_connections_per_ip: 0,
            max_connections: 0,
            login_rate: 20_000,
            login_burst: 5_000,
            max_pending_logins: 50_000,
            max_devices_per_user: 32,
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            unix: None,
            allow_public: false,
            secret: DEV_UPSTREAM_SECRET.into(),
            event_queue: 65_536,
            event_queue_bytes: 16 * 1024 * 1024,
            reply_queue_bytes: 4 * 1024 * 1024,
            max_frame: 4 * 1024 * 1024,
            max_connections: 128,
            max_pending_hellos: 512,
            hello_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9400))),
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            // A cluster's rolling restart of 100,000 devices on 2 cores
            // needed it (docs/LOADTEST.md); a drain ends as soon as every
            // session is taken.
            drain_timeout: Duration::from_secs(30),
            reconnect_after: Duration::from_secs(2),
            reconnect_to: String::new(),
        }
    }
}

/// The documented default configuration, printed by `tether print-config`.
pub const DEFAULT_TOML: &str = r#"# Tether gateway configuration. Every key is optional; these are the defaults.
# Durations are humantime strings ("250ms", "45s", "2m"). Unknown keys are errors.

# This gateway's id, unique within a cluster. Sent to clients in LoginOk.
node_id = "node-1"

[listen]
# Plain TCP listeners for clients.
tcp = ["0.0.0.0:7400"]
# TLS 1.3 listeners for clients.
tls = ["0.0.0.0:7443"]
# WebSocket listeners (path /tether, subprotocol "tether.v1"; one Tether frame
# per binary message): ws over plain TCP, wss over TLS with the [tls]
# certificate and handshake limits. Both off by default.
ws = []
wss = []
# The Origin values a WebSocket upgrade may carry (e.g. "https://app.example.com");
# a browser page from any other origin is refused with 403. [] allows any origin;
# requests without Origin (not from a browser) are not checked.
ws_origins = []
# Serve the example browser client at / and /tether.js on the WebSocket
# listeners (a static page: it takes its token from the URL's #fragment).
ws_page = true
# QUIC listeners for clients (UDP; ALPN "tether/1", the TLS certificate).
# Unset, QUIC listens where TLS does (the same addresses and ports, over UDP),
# so that moving tls moves QUIC too; [] turns QUIC off.
# quic = ["0.0.0.0:7443"]
backlog = 4096
# SO_RCVBUF / SO_SNDBUF of client sockets in bytes; 0 keeps the kernel's autotuning,
# which allocates buffer memory only while data is in flight.
recv_buffer = 0
send_buffer = 0
# A TCP, TLS or WebSocket connection quiet this long (no frame read, nothing unacknowledged)
# is parked: it gives up its task and its reactor entry, about 400 bytes, until
# it reads or is pushed to. "0s" turns parking off.
park_after = "5s"

[tls]
# PEM certificate chain and key. When unset, a self-signed development
# certificate is generated in dev_cert_dir at first start (see certs/README.md).
# cert = "/etc/tether/cert.pem"
# key = "/etc/tether/key.pem"
dev_cert_dir = "certs"
# Key exchanges computed at once. A connection takes a slot only when its whole
# ClientHello has arrived, and gives it back once the answer is written: a peer
# that sends nothing, or sends slowly, holds none.
max_handshakes = 256
# The whole handshake, from accept to the client's Finished.
handshake_timeout = "10s"
# The client's whole ClientHello must have arrived within this time of accept
# (or handshake_timeout, if that is shorter).
hello_timeout = "5s"
# TLS connections whose handshake has not finished, at once. When full, the
# oldest of them is closed to make room: a flood of silent sockets cannot
# lock out a device that sends its ClientHello at once.
max_pending_handshakes = 8192

[auth]
# HS256 (shared secret), RS256 or EdDSA (public key file).
algorithm = "HS256"
# HS256 secret. The default is for development only: the gateway warns at start.
# TETHER_AUTH_SECRET in the environment overrides it.
secret = "tether-dev-secret-change-me"
# RS256 / EdDSA: PEM public key that verifies tokens.
# public_key = "/etc/tether/jwt.pub.pem"
# When set, tokens must carry this issuer / audience.
# issuer = "chat-auth"
# audience = "tether"
# Clock skew tolerated on exp and nbf.
leeway = "30s"

[session]
# A connection that has not logged in within this time is closed (slowloris).
login_timeout = "10s"
# Told to clients at login: send a Ping at least this often.
heartbeat_interval = "45s"
# A session that sends nothing for this long is closed (3 missed heartbeats).
idle_timeout = "2m 15s"
# What a full interactive queue (delivery.queue_bytes) does: "drop" (drop the
# push, count it) or "disconnect" (close with CODE_SLOW_CONSUMER, keep the
# session for a resume).
slow_consumer = "disconnect"
# Client-side Join/Leave: "off", "token" (rooms in the token's rooms claim), "any".
client_join = "token"
# "per_device": a new login of a device replaces its old session.
# "single": a new login replaces every other session of the user.
multi_login = "per_device"
# Rooms one session may be in.
max_rooms = 64
# Granularity of the shared timer wheel for login and idle timeouts.
timer_tick = "250ms"
# Wait up to this long before writing pushes to a session, so that pushes
# arriving meanwhile go out in one write: fewer writes for many subscribers
# at a moderate broadcast rate, at the cost of up to this much latency.
# "0s" writes at once.
write_delay = "0s"

[limits]
# Largest frame accepted from a client, in bytes, checked before allocation.
max_frame = 65536
# Open connections per remote IP (0 = unlimited; mobile carriers NAT many users).
max_connections_per_ip = 0
# Open client connections in this process (0 = unlimited).
max_connections = 0
# Logins per second on this node, JWT checks included (0 = unlimited).
login_rate = 20000
login_burst = 5000
# Connections that have not logged in yet, at once (0 = unlimited). Each waits
# at most session.login_timeout; beyond the cap new connections get
# CODE_TOO_MANY_CONNECTIONS at accept.
max_pending_logins = 50000
# Devices one user may have logged in on this node, detached sessions waiting
# for a resume included (0 = unlimited). One more gets CODE_TOO_MANY_DEVICES.
max_devices_per_user = 32

[upstream]
# The internal socket for upstream services. Loopback only unless allow_public.
# "" turns the TCP listener off (then set unix).
tcp = "127.0.0.1:7401"
# unix = "/run/tether/upstream.sock"
allow_public = false
# Shared secret upstream services present in Hello. Change it in production.
# TETHER_UPSTREAM_SECRET in the environment overrides it.
secret = "tether-dev-upstream-secret"
# Each subscribed connection's event queue: at most event_queue events and
# event_queue_bytes bytes of encoded events (16 MiB). When either is reached,
# new events for that connection are dropped, counted by kind, and reported to
# it in an EventsDropped notice.
event_queue = 65536
event_queue_bytes = 16777216
# Bytes of replies queued per connection (4 MiB). Past it the gateway reads no
# more requests from that connection until it reads its replies.
reply_queue_bytes = 4194304
# Largest request frame after Hello (a Hello is at most 4096 bytes).
max_frame = 4194304
# Authenticated connections open at once (both listeners); a Hello past it is
# refused with CODE_TOO_MANY_CONNECTIONS.
max_connections = 128
# Connections that have not completed Hello, at once (both listeners). One more
# evicts the oldest of them (CODE_TOO_MANY_CONNECTIONS), so silent sockets
# cannot lock services out.
max_pending_hellos = 512
# A new connection that sends no Hello within this time is refused.
hello_timeout = "2s"
# A connection whose socket takes no byte of a pending reply or event for this
# long is closed (tether_upstream_stalls_total): a service that stopped reading
# gives back its place and its queued replies.
stall_timeout = "30s"

[metrics]
# The admin listener: the Prometheus scrape endpoint (GET /metrics), the live
# status page (GET /, GET /status.json) and the HTTP API (/api/v1/, see [api]);
# "" turns it off.
listen = "127.0.0.1:9400"
# Admin connections open at once; more are closed as soon as they are accepted
# (tether_admin_connections_refused_total).
max_connections = 64
# Time to send a complete request head, from accept or from the end of the
# previous response on a kept-alive connection (so also its idle bound).
header_timeout = "5s"
# A connection on which no byte moves either way for this long is closed.
idle_timeout = "10s"
# Time the gateway may take to answer one request (an API request's body
# included: a body still arriving then is refused with 408).
request_timeout = "10s"

[api]
# The HTTP API on the admin listener (/api/v1/: push, kick, rooms, presence).
# Requests carry "Authorization: Bearer <key>"; any key of the list opens it.
# Each key is 16..=512 bytes of letters, digits and - . _ ~ + / =. Empty: the
# API is off (403); /metrics and the status page need no key. The environment
# variable TETHER_API_KEYS (keys separated by commas) replaces the list.
keys = []
# Largest request body, in bytes; a larger one is refused with 413.
max_body = 1048576

[log]
# "text": plain lines (coloured only on a terminal); "json": one JSON object
# per line, for log shippers. `tether serve --log-format` overrides it.
format = "text"

[bus]
# How the nodes of a cluster reach each other. "local": one node, nothing to
# set up. "nats": a cluster joined by a NATS server (2.2 or later; core NATS,
# no JetStream); every node needs its own node_id, of letters, digits, '-'
# and '_'.
kind = "local"
urls = ["nats://127.0.0.1:4222"]
# The subject prefix: the nodes with the same one form one cluster.
cluster = "tether"
# NATS credentials, if the server asks: user and password, or token.
# TETHER_BUS_PASSWORD and TETHER_BUS_TOKEN in the environment override them.
# user = "tether"
# password = "..."
# token = "..."
# How long an upstream request waits for another node; one that does not
# answer is named in the reply with CODE_NODE_TIMEOUT.
request_timeout = "2s"
# How often a node tells the others it is alive, and the silence after which
# they take it for dead (at least 3 heartbeats).
heartbeat = "1s"
node_timeout = "5s"
# The key every node signs resume tokens with (at least 32 bytes), so that a
# device resumes on whichever node it reconnects to, and the one before the
# last rotation. Unset, each node draws a random key and a session resumes
# only where it is. TETHER_RESUME_SECRET and TETHER_RESUME_SECRET_PREVIOUS
# override them.
# resume_secret = "..."
# resume_secret_previous = "..."

[shutdown]
# On SIGTERM/SIGINT: stop accepting, send Close(SERVER_DRAINING), flush, and
# exit after at most this long (in a cluster: once every session is taken by
# the node its device resumed on, or this long).
drain_timeout = "30s"
# Sent in the draining Close: wait this long (plus jitter) before reconnecting,
reconnect_after = "2s"
# and reconnect here (empty: the same address).
reconnect_to = ""

[delivery]
# Pushes written but not yet acknowledged per session: interactive and bulk
# lanes. A full window pauses that lane (flow control); acks open it again.
window = 256
bulk_window = 64
# Bytes of pushes queued per session and not yet written, counted as the
# encoded push (payload, message id, source, room) + 96 bytes each:
# interactive (past it, session.slow_consumer applies) and bulk (past it,
# bulk pushes are dropped: the client sees the seq gap).
queue_bytes = 1048576
bulk_queue_bytes = 4194304
# Bytes a session keeps while it has no connection (between a drop and its
# resume); past it the oldest pushes are evicted and the resume reports the gap.
detached_bytes = 4194304
# Bytes all detached sessions of one user keep together (a user may have many
# devices); past it the oldest pushes among them are evicted (a gap on resume).
detached_bytes_per_user = 16777216
# A connection whose socket accepts no byte of a pending write for this long
# is closed with CODE_SLOW_CONSUMER (its session is kept for a resume).
stall_timeout = "30s"
# A push is written once per connection. Pushes unacknowledged for ack_timeout,
# with no ack progress meanwhile, close the connection as a dead path
# (CODE_ACK_TIMEOUT; the session is kept and the resume replays them). A push
# written on max_tries connections without an ack is given up and reported.
ack_timeout = "10s"
max_tries = 3
# A session whose connection dropped keeps its queues this long for a resume.
resume_window = "2m"
# Bytes held in queues and windows by all sessions of this node, each push's
# body counted once however many sessions hold it. When a push does not fit,
# detached sessions' oldest pushes are evicted first (a gap on their resume);
# only when they hold nothing more is the push dropped for a live session.
replay_budget = 1073741824
# Uplinks are deduplicated by client_msg_id for this long, up to dedup_max
# remembered per session.
dedup_window = "5m"
dedup_max = 128

[quic]
# New handshakes per second taken without proof of the client's address; past
# it, new clients first get a stateless Retry (one round trip more).
handshake_rate = 2000
# Bytes a client may send ahead on its stream and connection (what it can make
# the gateway buffer before the gateway reads).
stream_window = 65536
# Bytes of pushes per connection handed to QUIC and not yet acknowledged by the
# client's QUIC stack.
send_window = 262144
# TLS sessions remembered for resumption and 0-RTT (about 200 bytes each while
# used); 0 turns 0-RTT off.
session_cache = 65536
# SO_RCVBUF / SO_SNDBUF of the UDP socket that every QUIC client shares; the
# kernel caps it at net.core.rmem_max / wmem_max (raise those; see OPERATIONS.md).
socket_buffer = 8388608
# Connection IDs a UDP load balancer can route (QUIC-LB); see OPERATIONS.md.
# [quic.cid]
# config_id = 0
# server_id = "0a01"
# nonce_len = 12
# key = "00112233445566778899aabbccddeeff"
# TETHER_QUIC_CID_KEY in the environment overrides the key.
"#;

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key and reason.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with(Some(path), &|var| std::env::var(var).ok())
    }

    /// The file at `path` (or the defaults without one), then the secrets
    /// `env` sets ([`env::ENV_SECRETS`]: the environment wins), validated.
    /// [`Config::load`] passes the process's environment.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key and reason; [`ConfigError::Env`]
    /// naming the variable when a value from the environment is refused.
    pub fn load_with(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse_unchecked(&text, &path.display().to_string())?
            }
            None => Config::default(),
        };
        let applied =
            env::apply(&mut cfg, env).map_err(|(var, reason)| ConfigError::Env { var, reason })?;
        match cfg.validate() {
            // A value the environment set is named by its variable.
            Err(ConfigError::Invalid { key, reason }) => {
                match applied.iter().find(|s| s.key == key) {
                    Some(s) => Err(ConfigError::Env {
                        var: s.var,
                        reason: format!("{key}: {reason}"),
                    }),
                    None => Err(ConfigError::Invalid { key, reason }),
                }
            }
            other => other.map(|()| cfg),
        }
    }

    /// The configuration as TOML, with the value of every secret of
    /// [`env::ENV_SECRETS`] replaced by [`env::REDACTED`]: what
    /// `tether print-config --config` prints.
    ///
    /// # Errors
    /// When a value cannot be written as TOML (none can today).
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        let mut doc = toml::Table::try_from(self)?;
        env::redact(&mut doc);
        toml::to_string(&doc)
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] or [`ConfigError::Invalid`].
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg = Self::parse_unchecked(text, origin)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn parse_unchecked(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Checks ranges and cross-field rules.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        }
        let s = &self.session;
        if self.node_id.is_empty() || self.node_id.len() > 64 {
            return bad("node_id", "must be 1..=64 bytes");
        }
        if let Err((key, reason)) = self.bus.check(&self.node_id) {
            return bad(key, reason);
        }
        if self.listen.tcp.is_empty()
            && self.listen.tls.is_empty()
            && self.listen.ws.is_empty()
            && self.listen.wss.is_empty()
            && self.listen.quic_addrs().is_empty()
        {
            return bad(
                "listen",
                "at least one of listen.tcp, listen.tls, listen.ws, listen.wss or listen.quic is needed",
            );
        }
        for o in &self.listen.ws_origins {
            let scheme = o.starts_with("http://") || o.starts_with("https://");
            if !scheme || o.ends_with('/') || o.chars().any(|c| c.is_whitespace()) {
                return bad(
                    "listen.ws_origins",
                    "each must be an origin such as \"https://app.example.com\" (scheme and host, no path)",
                );
            }
        }
        let q = &self.quic;
        if q.stream_window < 4096 || q.stream_window > 64 * 1024 * 1024 {
            return bad("quic.stream_window", "must be 4096..=67108864 bytes");
        }
        if q.send_window < 4096 || q.send_window > 64 * 1024 * 1024 {
            return bad("quic.send_window", "must be 4096..=67108864 bytes");
        }
        if let Some(cid) = &q.cid {
            if let Err(e) = cid.validate() {
                return bad("quic.cid", e.to_string());
            }
        }
        if !(16..=16 * 1024 * 1024).contains(&self.limits.max_frame) {
            return bad("limits.max_frame", "must be 16..=16777216 bytes");
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.upstream.max_frame) {
            return bad("upstream.max_frame", "must be 1024..=67108864 bytes");
        }
        if s.login_timeout.is_zero() {
            return bad("session.login_timeout", "must be greater than zero");
        }
        if s.heartbeat_interval < Duration::from_secs(1) {
            return bad("session.heartbeat_interval", "must be at least 1s");
        }
        if s.idle_timeout <= s.heartbeat_interval {
            return bad(
                "session.idle_timeout",
                "must be longer than session.heartbeat_interval",
            );
        }
        if s.write_delay > Duration::from_secs(1) {
            return bad("session.write_delay", "must be at most 1s");
        }
        if !s.write_delay.is_zero() && s.write_delay < Duration::from_millis(1) {
            return bad("session.write_delay", "must be 0 or at least 1ms");
        }
        if s.timer_tick < Duration::from_millis(10) || s.timer_tick > Duration::from_secs(5) {
            return bad("session.timer_tick", "must be 10ms..=5s");
        }
        if s.timer_tick > s.login_timeout {
            return bad(
                "session.timer_tick",
                "must not exceed session.login_timeout",
            );
        }
        if s.max_rooms > 100_000 {
            return bad("session.max_rooms", "must be at most 100000");
        }
        if self.limits.login_rate > 0 && self.limits.login_burst == 0 {
            return bad(
                "limits.login_burst",
                "must be at least 1 when login_rate is set",
            );
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert", "tls.cert and tls.key must be set together");
        }
        if self.tls.max_handshakes == 0 {
            return bad("tls.max_handshakes", "must be at least 1");
        }
        if self.tls.max_pending_handshakes == 0 {
            return bad("tls.max_pending_handshakes", "must be at least 1");
        }
        // A hello_timeout above handshake_timeout is not an error (a config
        // that shortened handshake_timeout before hello_timeout existed
        // keeps working): the shorter of the two applies to the ClientHello.
        if self.tls.hello_timeout.is_zero() {
            return bad("tls.hello_timeout", "must be more than 0");
        }
        match self.auth.algorithm {
            JwtAlgorithm::HS256 if self.auth.secret.len() < 16 => {
                return bad("auth.secret", "must be at least 16 bytes for HS256");
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::EdDSA if self.auth.public_key.is_none() => {
                return bad("auth.public_key", "is required for RS256 and EdDSA");
            }
            _ => {}
        }
        if self.upstream.tcp.is_none() && self.upstream.unix.is_none() {
            return bad(
                "upstream",
                "at least one of upstream.tcp or upstream.unix is needed",
            );
        }
        if let Some(a) = self.upstream.tcp {
            if !a.ip().is_loopback() && !self.upstream.allow_public {
                return bad(
                    "upstream.tcp",
                    format!("{a} is not a loopback address; set upstream.allow_public = true to allow it"),
                );
            }
        }
        if self.upstream.secret.len() < 16 {
            return bad("upstream.secret", "must be at least 16 bytes");
        }
        if self.upstream.event_queue == 0 {
            return bad("upstream.event_queue", "must be at least 1");
        }
        // The largest uplink event (a client frame plus session info) must fit.
        let min_queue_bytes = u64::from(self.limits.max_frame) + 4096;
        if !(min_queue_bytes..=1 << 32).contains(&self.upstream.event_queue_bytes) {
            return bad(
                "upstream.event_queue_bytes",
                format!("must be {min_queue_bytes}..=4294967296 bytes (at least limits.max_frame + 4096)"),
            );
        }
        if !(1..=65_536).contains(&self.upstream.max_connections) {
            return bad("upstream.max_connections", "must be 1..=65536");
        }
        if !(1..=65_536).contains(&self.upstream.max_pending_hellos) {
            return bad("upstream.max_pending_hellos", "must be 1..=65536");
        }
        if !(64 * 1024..=1 << 30).contains(&self.upstream.reply_queue_bytes) {
            return bad(
                "upstream.reply_queue_bytes",
                "must be 65536..=1073741824 bytes",
            );
        }
        if self.upstream.hello_timeout < Duration::from_millis(10)
            || self.upstream.hello_timeout > Duration::from_secs(300)
        {
            return bad("upstream.hello_timeout", "must be 10ms..=5m");
        }
        if self.upstream.stall_timeout < Duration::from_secs(1)
            || self.upstream.stall_timeout > Duration::from_secs(3600)
        {
            return bad("upstream.stall_timeout", "must be 1s..=1h");
        }
        let m = &self.metrics;
        if !(1..=65_536).contains(&m.max_connections) {
            return bad("metrics.max_connections", "must be 1..=65536");
        }
        for (key, v) in [
            ("metrics.header_timeout", m.header_timeout),
            ("metrics.idle_timeout", m.idle_timeout),
            ("metrics.request_timeout", m.request_timeout),
        ] {
            if v < Duration::from_millis(10) || v > Duration::from_secs(300) {
                return bad(key, "must be 10ms..=5m");
            }
        }
        if let Err((key, reason)) = self.api.check() {
            return Err(ConfigError::Invalid { key, reason });
        }
        if self.shutdown.drain_timeout.is_zero() {
            return bad("shutdown.drain_timeout", "must be greater than zero");
        }
        let d = &self.delivery;
        if !(1..=65_536).contains(&d.window) {
            return bad("delivery.window", "must be 1..=65536");
        }
        if !(1..=65_536).contains(&d.bulk_window) {
            return bad("delivery.bulk_window", "must be 1..=65536");
        }
        for (key, v) in [
            ("delivery.queue_bytes", d.queue_bytes),
            ("delivery.bulk_queue_bytes", d.bulk_queue_bytes),
            ("delivery.detached_bytes", d.detached_bytes),
            (
                "delivery.detached_bytes_per_user",
                d.detached_bytes_per_user,
            ),
        ] {
            if v < 1024 || v > d.replay_budget {
                return bad(
                    key,
                    "must be at least 1024 and at most delivery.replay_budget",
                );
            }
        }
        if d.stall_timeout < Duration::from_secs(1) {
            return bad("delivery.stall_timeout", "must be at least 1s");
        }
        if d.ack_timeout < Duration::from_millis(10) {
            return bad("delivery.ack_timeout", "must be at least 10ms");
        }
        if !(1..=16).contains(&d.max_tries) {
            return bad("delivery.max_tries", "must be 1..=16");
        }
        if d.resume_window > Duration::from_secs(86_400) {
            return bad("delivery.resume_window", "must be at most 24h");
        }
        if d.replay_budget < 1 << 20 {
            return bad("delivery.replay_budget", "must be at least 1048576 bytes");
        }
        if d.dedup_max > 65_536 {
            return bad("delivery.dedup_max", "must be at most 65536");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default() {
        let parsed = Config::parse(DEFAULT_TOML, "DEFAULT_TOML").unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[session]\nheartbeat = \"5s\"\n", "t.toml").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("heartbeat"), "{msg}");
        assert!(msg.contains("t.toml"), "{msg}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::parse("[delivery]\nqueue_bytes = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("delivery.queue_bytes"), "{e}");
        let e = Config::parse("[session]\nlogin_timeout = \"soon\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("login_timeout"), "{e}");
        let e = Config::parse("[upstream]\ntcp = \"0.0.0.0:7401\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.tcp"), "{e}");
        let e = Config::parse("[upstream]\nevent_queue_bytes = 1024\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.event_queue_bytes"), "{e}");
        let e = Config::parse("[upstream]\nmax_connections = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.max_connections"), "{e}");
        let e = Config::parse("[upstream]\nmax_pending_hellos = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.max_pending_hellos"), "{e}");
        let e = Config::parse("[upstream]\nreply_queue_bytes = 1024\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.reply_queue_bytes"), "{e}");
        let e = Config::parse("[upstream]\nhello_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.hello_timeout"), "{e}");
        let e = Config::parse("[upstream]\nstall_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream.stall_timeout"), "{e}");
        let e = Config::parse("[metrics]\nmax_connections = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("metrics.max_connections"), "{e}");
        let e = Config::parse("[metrics]\nheader_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("metrics.header_timeout"), "{e}");
        let e = Config::parse("[log]\nformat = \"xml\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("format"), "{e}");
        let c = Config::parse("[log]\nformat = \"json\"\n", "t").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let e = Config::parse("[tls]\nhello_timeout = \"0s\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("tls.hello_timeout"), "{e}");
        let e = Config::parse("[tls]\nmax_pending_handshakes = 0\n", "t").unwrap_err();
        assert!(e.to_string().contains("tls.max_pending_handshakes"), "{e}");
    }

    #[test]
    fn empty_address_turns_a_listener_off() {
        let c = Config::parse("[metrics]\nlisten = \"\"\n", "t").unwrap();
        assert_eq!(c.metrics.listen, None);
        let e = Config::parse("[upstream]\ntcp = \"\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("upstream"), "{e}");
        let c = Config::parse("[upstream]\ntcp = \"\"\nunix = \"/tmp/t.sock\"\n", "t").unwrap();
        assert_eq!(c.upstream.tcp, None);
    }

    #[test]
    fn quic_follows_tls_unless_it_is_set() {
        let c = Config::default();
        assert_eq!(c.listen.quic_addrs(), c.listen.tls.as_slice());
        let moved: SocketAddr = "127.0.0.1:37443".parse().unwrap();
        let c = Config::parse("[listen]\ntls = [\"127.0.0.1:37443\"]\n", "t").unwrap();
        assert_eq!(c.listen.quic_addrs(), [moved], "QUIC moves with TLS");
        let c = Config::parse(
            "[listen]\ntls = [\"127.0.0.1:37443\"]\nquic = [\"127.0.0.1:9443\"]\n",
            "t",
        )
        .unwrap();
        let own: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        assert_eq!(c.listen.quic_addrs(), [own], "an explicit listen.quic wins");
        let c = Config::parse("[listen]\nquic = []\n", "t").unwrap();
        assert!(c.listen.quic_addrs().is_empty(), "[] turns QUIC off");
        let c = Config::parse(
            "[listen]\nws = [\"127.0.0.1:7480\"]\nws_origins = [\"https://app.example.com\"]\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.listen.ws.len(), 1);
        for bad in ["app.example.com", "https://app.example.com/", "https://a b"] {
            let toml = format!("[listen]\nws_origins = [\"{bad}\"]\n");
            let e = Config::parse(&toml, "t").unwrap_err();
            assert!(e.to_string().contains("listen.ws_origins"), "{bad}: {e}");
        }
        let only_ws = "[listen]\ntcp = []\ntls = []\nquic = []\nwss = [\"127.0.0.1:0\"]\n";
        assert!(
            Config::parse(only_ws, "t").is_ok(),
            "a WebSocket listener alone is enough"
        );
        let e = Config::parse("[listen]\ntcp = []\ntls = []\n", "t").unwrap_err();
        assert!(e.to_string().contains("listen"), "no listener at all: {e}");
    }

    /// A lookup over `pairs`, for [`Config::load_with`].
    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |var| map.get(var).cloned()
    }

    #[test]
    fn the_environment_wins_over_the_file_and_empty_means_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            "[auth]\nsecret = \"the-file-auth-secret\"\n[upstream]\nsecret = \"the-file-upstream-secret\"\n[bus]\nuser = \"tether\"\n",
        )
        .unwrap();
        let env = env_of(&[
            ("TETHER_AUTH_SECRET", "the-env-auth-secret-0123"),
            ("TETHER_UPSTREAM_SECRET", ""),
            ("TETHER_BUS_PASSWORD", "nats-password"),
            ("TETHER_RESUME_SECRET", &"r".repeat(32)),
        ]);
        let c = Config::load_with(Some(&path), &env).unwrap();
        assert_eq!(c.auth.secret, "the-env-auth-secret-0123");
        assert_eq!(
            c.upstream.secret, "the-file-upstream-secret",
            "empty is unset"
        );
        assert_eq!(c.bus.password.as_deref(), Some("nats-password"));
        assert_eq!(c.bus.resume_secret.as_deref(), Some(&*"r".repeat(32)));
        // Without a file: the defaults, then the environment.
        let c = Config::load_with(None, &env).unwrap();
        assert_eq!(c.auth.secret, "the-env-auth-secret-0123");
        assert_eq!(c.upstream.secret, DEV_UPSTREAM_SECRET);
        let c = Config::load_with(None, &env_of(&[])).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn a_refused_value_from_the_environment_names_its_variable() {
        let e = Config::load_with(None, &env_of(&[("TETHER_RESUME_SECRET_PREVIOUS", "short")]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid environment variable TETHER_RESUME_SECRET_PREVIOUS: \
             bus.resume_secret_previous: must be at least 32 bytes"
        );
        let e = Config::load_with(None, &env_of(&[("TETHER_QUIC_CID_KEY", "00")])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid environment variable TETHER_QUIC_CID_KEY:"),
            "{e}"
        );
        // A file value out of range is still named by its key.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        std::fs::write(&path, "[upstream]\nsecret = \"short\"\n").unwrap();
        let e = Config::load_with(Some(&path), &env_of(&[])).unwrap_err();
        assert!(e.to_string().contains("`upstream.secret`"), "{e}");
    }

    #[test]
    fn every_secret_of_the_table_is_redacted_and_nothing_else() {
        let mut c = Config::parse(
            "[quic.cid]\nconfig_id = 1\nserver_id = \"0a01\"\nnonce_len = 12\nkey = \"00112233445566778899aabbccddeeff\"\n",
            "t",
        )
        .unwrap();
        c.bus.password = Some("p".into());
        c.bus.user = Some("tether".into());
        c.bus.token = Some("t".into());
        c.bus.resume_secret = Some("r".repeat(32));
        c.bus.resume_secret_previous = Some("q".repeat(32));
        c.api.keys = vec!["k".repeat(16), "j".repeat(16)];
        let text = c.to_redacted_toml().unwrap();
        let doc: toml::Table = toml::from_str(&text).unwrap();
        for s in env::ENV_SECRETS {
            let mut v = &toml::Value::Table(doc.clone());
            for part in s.key.split('.') {
                v = &v[part];
            }
            // A list of secrets (api.keys) is redacted element by element.
            let values = match v.as_array() {
                Some(items) => items.iter().collect(),
                None => vec![v],
            };
            assert!(!values.is_empty(), "{}", s.key);
            for v in values {
                assert_eq!(v.as_str(), Some(env::REDACTED), "{}", s.key);
            }
        }
        assert!(!text.contains(&"k".repeat(16)), "{text}");
        assert_eq!(doc["bus"]["user"].as_str(), Some("tether"));
        assert_eq!(doc["quic"]["cid"]["server_id"].as_str(), Some("0a01"));
        assert!(!text.contains(DEV_SECRET) && !text.contains("00112233"));
        // With the secrets put back, it reads back as the same config.
        let restored = text
            .replace(
                &format!("key = \"{}\"", env::REDACTED),
                "key = \"ffeeddccbbaa99887766554433221100\"",
            )
            .replace(env::REDACTED, &"s".repeat(32));
        let mut back = Config::parse(&restored, "t").unwrap_or_else(|e| panic!("{e}:\n{text}"));
        back.auth.secret.clone_from(&c.auth.secret);
        back.upstream.secret.clone_from(&c.upstream.secret);
        back.bus.clone_from(&c.bus);
        back.quic.cid.clone_from(&c.quic.cid);
        assert_eq!(back.api.keys, ["s".repeat(32), "s".repeat(32)]);
        back.api.keys.clone_from(&c.api.keys);
        assert_eq!(back, c);
    }

    #[test]
    fn secrets_are_hidden_in_debug() {
        let dbg = format!("{:?}", Config::default());
        assert!(!dbg.contains(DEV_SECRET));
        assert!(!dbg.contains(DEV_UPSTREAM_SECRET));
    }
}
