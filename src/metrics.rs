//! Metric names, in one place, with their descriptions.
//!
//! Labels come from small fixed sets (transport, result, reason, policy), never
//! from user ids. Recording is a no-op until a recorder is installed
//! ([`install_prometheus`]), so library users and tests pay nothing.

use std::net::SocketAddr;

use std::sync::OnceLock;

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

use crate::ids::TransportKind;

pub const CONNECTIONS: &str = "tether_connections";
pub const CONNECTIONS_ACCEPTED: &str = "tether_connections_accepted_total";
pub const CONNECTIONS_REFUSED: &str = "tether_connections_refused_total";
pub const ACCEPT_ERRORS: &str = "tether_accept_errors_total";
pub const PENDING_LOGINS: &str = "tether_pending_logins";
pub const PENDING_LOGINS_REFUSED: &str = "tether_pending_logins_refused_total";
pub const FANOUT_YIELDS: &str = "tether_fanout_yields_total";
pub const SESSIONS: &str = "tether_sessions";
pub const LOGINS: &str = "tether_logins_total";
pub const CLOSES: &str = "tether_closes_total";
pub const FRAMES_IN: &str = "tether_frames_in_total";
pub const FRAMES_OUT: &str = "tether_frames_out_total";
pub const BYTES_IN: &str = "tether_bytes_in_total";
pub const BYTES_OUT: &str = "tether_bytes_out_total";
pub const WRITES: &str = "tether_socket_writes_total";
pub const PUSHES: &str = "tether_pushes_total";
pub const DELIVERIES: &str = "tether_push_deliveries_total";
pub const DROPS: &str = "tether_push_drops_total";
pub const SLOW_CONSUMERS: &str = "tether_slow_consumers_total";
pub const ACK_TIMEOUTS: &str = "tether_ack_timeouts_total";
pub const QUIC_MIGRATIONS: &str = "tether_quic_migrations_total";
pub const QUIC_HANDSHAKES: &str = "tether_quic_handshakes_total";
pub const QUIC_SOCKET_BUFFER: &str = "tether_quic_socket_buffer_bytes";
pub const QUEUE_DEPTH: &str = "tether_queue_depth";
pub const PUSH_WAIT: &str = "tether_push_wait_seconds";
/// From 100 µs (a push written in the pass that took it in) to 10 s (a
/// stalled reader).
pub const PUSH_WAIT_BUCKETS: [f64; 14] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];
pub const UPLINKS: &str = "tether_uplinks_total";
pub const UPSTREAM_CONNECTIONS: &str = "tether_upstream_connections";
pub const UPSTREAM_EVENTS_DROPPED: &str = "tether_upstream_events_dropped_total";
pub const UPSTREAM_REFUSED: &str = "tether_upstream_connections_refused_total";
pub const UNDELIVERED: &str = "tether_undelivered_total";
pub const ROOMS: &str = "tether_rooms";
pub const RESUMES: &str = "tether_resumes_total";
pub const ACKED: &str = "tether_pushes_acked_total";
pub const REPLAY_BYTES: &str = "tether_replay_bytes";
pub const DETACHED: &str = "tether_detached_sessions";
pub const RESIDENT_MEMORY: &str = "tether_process_resident_memory_bytes";
pub const PARKED: &str = "tether_parked_connections";
pub const PARKS: &str = "tether_parks_total";
pub const PARKED_ANSWERS: &str = "tether_parked_answers_total";

/// Describes every metric (Prometheus HELP lines).
pub fn describe() {
    describe_gauge!(CONNECTIONS, "Open client connections, by transport.");
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "Client connections accepted, by transport."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Client connections refused at accept, by reason."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accept calls, by kind: resource (out of descriptors or memory; the listener pauses 50ms) or connection (one connection's error; the next is accepted at once)."
    );
    describe_gauge!(
        PENDING_LOGINS,
        "Connections accepted that have not logged in yet (limits.max_pending_logins bounds it)."
    );
    describe_counter!(
        PENDING_LOGINS_REFUSED,
        "Connections refused with CODE_TOO_MANY_CONNECTIONS because limits.max_pending_logins connections were waiting to log in."
    );
    describe_counter!(
        FANOUT_YIELDS,
        "Times a large push paused its fan-out to let other tasks (sessions, timers) run."
    );
    describe_gauge!(SESSIONS, "Logged-in sessions.");
    describe_gauge!(
        PARKED,
        "Idle plain-TCP connections parked: no task and no reactor entry, their socket watched by the parker (listen.park_after)."
    );
    describe_counter!(
        PARKS,
        "Times a quiet plain-TCP connection was parked; a push, a close or a deadline unparks it, and so does a read that needs more than an answer."
    );
    describe_counter!(
        PARKED_ANSWERS,
        "Reads of parked connections answered in place (a heartbeat, mostly) after which the connection stayed parked."
    );
    describe_counter!(LOGINS, "Login attempts, by result (ok or a code name).");
    describe_counter!(
        CLOSES,
        "Connections closed by the gateway or peer, by reason."
    );
    describe_counter!(FRAMES_IN, "Frames received from clients, by transport.");
    describe_counter!(FRAMES_OUT, "Frames sent to clients, by transport.");
    describe_counter!(BYTES_IN, Unit::Bytes, "Bytes received from clients.");
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes written to clients.");
    describe_counter!(
        WRITES,
        "Socket write calls (frames are coalesced into few writes)."
    );
    describe_counter!(PUSHES, "Push requests from upstream, by target kind.");
    describe_counter!(DELIVERIES, "Pushes queued into session queues.");
    describe_counter!(
        DROPS,
        "Pushes a session did not keep, by policy: drop (full queue or spent replay budget), evicted (a disconnected or slow session's oldest push made room)."
    );
    describe_counter!(SLOW_CONSUMERS, "Sessions closed as slow consumers.");
    describe_counter!(
        ACK_TIMEOUTS,
        "Connections closed because pushes went unacknowledged for delivery.ack_timeout (dead path)."
    );
    describe_counter!(
        QUIC_MIGRATIONS,
        "QUIC connections whose client address changed (migration or NAT rebinding)."
    );
    describe_counter!(
        QUIC_HANDSHAKES,
        "New QUIC clients, by result (accepted, retry, refused, failed, timeout)."
    );
    describe_gauge!(
        QUIC_SOCKET_BUFFER,
        Unit::Bytes,
        "The QUIC UDP socket's buffer the kernel granted, by direction (receive, send); less than quic.socket_buffer when net.core.rmem_max or wmem_max caps it."
    );
    describe_histogram!(QUEUE_DEPTH, "Session queue depth observed at each flush.");
    describe_histogram!(
        PUSH_WAIT,
        Unit::Seconds,
        "Time from a push's arrival at the gateway to the first write that carries it to a connected device: one sample per write, that of its oldest such push. Pushes queued while the device was offline are left out."
    );
    describe_counter!(UPLINKS, "Uplink sends from clients, by result.");
    describe_gauge!(UPSTREAM_CONNECTIONS, "Connected upstream services.");
    describe_counter!(
        UPSTREAM_EVENTS_DROPPED,
        "Events dropped because an upstream subscriber's queue was full (upstream.event_queue, upstream.event_queue_bytes), by kind: uplink, opened, closed, undelivered, delivery."
    );
    describe_counter!(
        UPSTREAM_REFUSED,
        "Upstream connections refused, by reason: CODE_TOO_MANY_CONNECTIONS (upstream.max_connections), CODE_FRAME_TOO_LARGE (a Hello over 4096 bytes), CODE_UPSTREAM_AUTH_FAILED (no Hello in time, or a bad secret), CODE_UNSUPPORTED_VERSION."
    );
    describe_counter!(
        UNDELIVERED,
        "Undelivered reports (push found no live session)."
    );
    describe_gauge!(ROOMS, "Rooms with at least one member.");
    describe_counter!(RESUMES, "Resume attempts, by result (CODE_OK, CODE_RESUME_GAP, CODE_RESUME_EXPIRED, CODE_RESUME_REJECTED).");
    describe_counter!(ACKED, "Pushes acknowledged by clients.");
    describe_gauge!(REPLAY_BYTES, Unit::Bytes, "Bytes held in session queues and unacknowledged windows (delivery.replay_budget bounds it).");
    describe_gauge!(
        DETACHED,
        "Sessions without a connection, waiting for a resume."
    );
    describe_gauge!(
        RESIDENT_MEMORY,
        Unit::Bytes,
        "Resident memory of the gateway process (Linux VmRSS), sampled each second."
    );
}

/// Resident bytes of this process, from `VmRSS` in `/proc/self/status`
/// (Linux; `None` elsewhere). Cheap enough for once a second: it reads the
/// kernel's per-process counters and walks no page tables.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Handles of the metrics counted on every push, read and write, registered
/// once. A `counter!` call looks its metric up in the recorder's registry
/// (a hash of name and labels, and a lock) each time: the unicast profile
/// showed those lookups at 3.5 % of the gateway's CPU. A handle is one
/// atomic add.
///
/// The handles are taken from the recorder installed when [`hot`] is first
/// called: install the recorder before the gateway serves (as `tether serve`
/// does); until one is installed, and without one, they count nothing.
pub struct Hot {
    pub writes: Counter,
    pub bytes_out: Counter,
    pub bytes_in: Counter,
    frames_in: [Counter; 4],
    frames_out: [Counter; 4],
    pub acked: Counter,
    pub deliveries: Counter,
    /// By target: user, device, users, room, everyone.
    pushes: [Counter; 5],
    pub queue_depth: Histogram,
    pub push_wait: Histogram,
    pub parked: Gauge,
    pub parks: Counter,
    pub parked_answers: Counter,
}

/// Push targets, the label values of `tether_pushes_total{target}`, in the
/// order of [`Hot::pushes`]'s index (the `TARGET_*` constants).
pub const PUSH_TARGETS: [&str; 5] = ["user", "device", "users", "room", "everyone"];
pub const TARGET_USER: usize = 0;
pub const TARGET_DEVICE: usize = 1;
pub const TARGET_USERS: usize = 2;
pub const TARGET_ROOM: usize = 3;
pub const TARGET_EVERYONE: usize = 4;

const TRANSPORTS: [TransportKind; 4] = [
    TransportKind::Tcp,
    TransportKind::Tls,
    TransportKind::Quic,
    TransportKind::Memory,
];

impl Hot {
    fn new() -> Self {
        let by_transport = |name: &'static str| {
            TRANSPORTS.map(|t| metrics::counter!(name, "transport" => t.as_str()))
        };
        Self {
            writes: metrics::counter!(WRITES),
            bytes_out: metrics::counter!(BYTES_OUT),
            bytes_in: metrics::counter!(BYTES_IN),
            frames_in: by_transport(FRAMES_IN),
            frames_out: by_transport(FRAMES_OUT),
            acked: metrics::counter!(ACKED),
            deliveries: metrics::counter!(DELIVERIES),
            pushes: PUSH_TARGETS.map(|t| metrics::counter!(PUSHES, "target" => t)),
            queue_depth: metrics::histogram!(QUEUE_DEPTH),
            push_wait: metrics::histogram!(PUSH_WAIT),
            parked: metrics::gauge!(PARKED),
            parks: metrics::counter!(PARKS),
            parked_answers: metrics::counter!(PARKED_ANSWERS),
        }
    }

    pub fn frames_in(&self, t: TransportKind) -> &Counter {
        &self.frames_in[t as usize]
    }

    pub fn frames_out(&self, t: TransportKind) -> &Counter {
        &self.frames_out[t as usize]
    }

    /// `target` is an index into [`PUSH_TARGETS`].
    pub fn pushes(&self, target: usize) -> &Counter {
        &self.pushes[target]
    }
}

/// The hot-path metric handles (see [`Hot`]).
pub fn hot() -> &'static Hot {
    static HOT: OnceLock<Hot> = OnceLock::new();
    HOT.get_or_init(Hot::new)
}

/// Installs the Prometheus recorder and its HTTP scrape endpoint.
///
/// # Errors
/// When the recorder is already installed or the address cannot be bound.
pub fn install_prometheus(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(QUEUE_DEPTH.to_owned()),
            &[0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0],
        )?
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(PUSH_WAIT.to_owned()),
            &PUSH_WAIT_BUCKETS,
        )?
        .install()?;
    describe();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_target_indexes_name_their_labels() {
        let named = [
            (TARGET_USER, "user"),
            (TARGET_DEVICE, "device"),
            (TARGET_USERS, "users"),
            (TARGET_ROOM, "room"),
            (TARGET_EVERYONE, "everyone"),
        ];
        for (i, label) in named {
            assert_eq!(PUSH_TARGETS[i], label);
        }
    }

    #[test]
    fn transport_handles_are_indexed_by_the_enum() {
        for (i, t) in TRANSPORTS.iter().enumerate() {
            assert_eq!(*t as usize, i, "{t:?}");
        }
    }
}
