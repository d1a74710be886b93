//! Metric names, in one place, with their descriptions.
//!
//! Labels come from small fixed sets (transport, result, reason, policy), never
//! from user ids. Recording is a no-op until a recorder is installed
//! ([`install`]), so library users and tests pay nothing.
//!
//! Every metric is one entry of [`METRICS`] (name, kind, help, label
//! values): [`describe`] and [`register_all`] both read it, so a metric
//! added there is described and on the page at 0 from the start, for every
//! label value. This module serves nothing; the admin listener does.

use std::sync::OnceLock;

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::ids::TransportKind;
use crate::wire::Code;

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
pub const QUIC_HANDSHAKES_PENDING: &str = "tether_quic_handshakes_pending";
pub const TLS_HANDSHAKES: &str = "tether_tls_handshakes_total";
pub const TLS_HANDSHAKES_PENDING: &str = "tether_tls_handshakes_pending";
pub const WS_UPGRADES: &str = "tether_ws_upgrades_total";
pub const WS_CLOSES: &str = "tether_ws_closes_total";
/// The `result` values of [`WS_UPGRADES`].
pub const WS_UPGRADE_RESULTS: [&str; 11] = [
    "accepted", "page", "400", "403", "404", "405", "426", "431", "503", "timeout", "failed",
];
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
pub const UPSTREAM_PENDING_HELLOS: &str = "tether_upstream_pending_hellos";
pub const UPSTREAM_HELLOS_EVICTED: &str = "tether_upstream_hellos_evicted_total";
pub const UPSTREAM_FAILED_HELLOS: &str = "tether_upstream_failed_hellos_total";
pub const UPSTREAM_REPLY_BYTES: &str = "tether_upstream_reply_bytes";
pub const UPSTREAM_REPLY_WAITS: &str = "tether_upstream_reply_waits_total";
pub const UPSTREAM_STALLS: &str = "tether_upstream_stalls_total";
pub const UNDELIVERED: &str = "tether_undelivered_total";
pub const BUS_CONNECTED: &str = "tether_bus_connected";
pub const BUS_EXPIRED_PUSHES: &str = "tether_bus_expired_pushes_total";
pub const BUS_COMMANDS_CONNECTED: &str = "tether_bus_commands_connected";
pub const BUS_DISCONNECTS: &str = "tether_bus_disconnects_total";
pub const BUS_REQUESTS: &str = "tether_bus_requests_total";
pub const CLUSTER_NODES: &str = "tether_cluster_nodes";
pub const SESSIONS_MOVED: &str = "tether_sessions_moved_total";
pub const SESSION_TAKES: &str = "tether_session_takes_total";
pub const ROOMS: &str = "tether_rooms";
pub const RESUMES: &str = "tether_resumes_total";
pub const ACKED: &str = "tether_pushes_acked_total";
pub const REPLAY_BYTES: &str = "tether_replay_bytes";
pub const DETACHED: &str = "tether_detached_sessions";
pub const RESIDENT_MEMORY: &str = "tether_process_resident_memory_bytes";
pub const PARKED: &str = "tether_parked_connections";
pub const PARKS: &str = "tether_parks_total";
pub const PARKED_ANSWERS: &str = "tether_parked_answers_total";

pub const ADMIN_CONNECTIONS: &str = "tether_admin_connections";
pub const ADMIN_REFUSED: &str = "tether_admin_connections_refused_total";
pub const ADMIN_TIMEOUTS: &str = "tether_admin_timeouts_total";
pub const API_REQUESTS: &str = "tether_api_requests_total";
pub const API_REFUSED: &str = "tether_api_refused_total";

/// What a metric is in Prometheus terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric: its name, kind, help and the label it takes. [`describe`]
/// and [`register_all`] both read [`METRICS`], so a metric in the table is
/// described and present (at 0, for every label value) from the start.
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// At most one label, with every value it can take. A metric whose
    /// values are not in the list still counts them; they appear at their
    /// first count.
    pub label: Option<Label>,
}

/// A label and the fixed set of values it takes.
#[derive(Debug)]
pub struct Label {
    pub key: &'static str,
    pub values: fn() -> Vec<&'static str>,
}

/// The client transports, as labels (`memory` is for tests and in-process
/// use, and appears only when counted): every [`TransportKind`] a device
/// connects over.
pub fn transport_labels() -> Vec<&'static str> {
    TransportKind::ALL
        .into_iter()
        .filter(|k| k.is_client())
        .map(TransportKind::as_str)
        .collect()
}

const fn transport() -> Option<Label> {
    Some(Label {
        key: "transport",
        values: transport_labels,
    })
}

const fn none() -> Option<Label> {
    None
}

/// Every code name but `CODE_OK`: what a connection can close with.
fn close_codes() -> Vec<&'static str> {
    // The enum's values are below 10,000 (docs/PROTOCOL.md, the code table).
    (1..10_000)
        .filter_map(|i| Code::try_from(i).ok())
        .map(|c| c.as_str_name())
        .collect()
}

/// The results of a login attempt: `ok`, or the code it was refused with.
fn login_results() -> Vec<&'static str> {
    let mut v = vec!["ok"];
    v.extend(
        [
            Code::RateLimited,
            Code::ServerDraining,
            Code::TokenExpired,
            Code::TokenBadSignature,
            Code::TokenMalformed,
            Code::TokenInvalid,
            Code::DeviceMismatch,
            Code::TooManyDevices,
        ]
        .map(|c| c.as_str_name()),
    );
    v
}

/// The metrics of the gateway, with their help text (Prometheus HELP).
pub static METRICS: &[Def] = &[
    Def {
        name: CONNECTIONS,
        kind: Kind::Gauge,
        unit: None,
        help: "Open client connections, by transport.",
        label: transport(),
    },
    Def {
        name: CONNECTIONS_ACCEPTED,
        kind: Kind::Counter,
        unit: None,
        help: "Client connections accepted, by transport.",
        label: transport(),
    },
    Def {
        name: CONNECTIONS_REFUSED,
        kind: Kind::Counter,
        unit: None,
        help: "Client connections refused at accept, by reason.",
        label: Some(Label {
            key: "reason",
            values: || vec![Code::TooManyConnections.as_str_name()],
        }),
    },
    Def {
        name: ACCEPT_ERRORS,
        kind: Kind::Counter,
        unit: None,
        help: "Failed accept calls, by kind: resource (out of descriptors or memory; the listener pauses 50ms) or connection (one connection's error; the next is accepted at once).",
        label: Some(Label {
            key: "kind",
            values: || vec!["resource", "connection"],
        }),
    },
    Def {
        name: PENDING_LOGINS,
        kind: Kind::Gauge,
        unit: None,
        help: "Connections accepted that have not logged in yet (limits.max_pending_logins bounds it).",
        label: none(),
    },
    Def {
        name: PENDING_LOGINS_REFUSED,
        kind: Kind::Counter,
        unit: None,
        help: "Connections refused with CODE_TOO_MANY_CONNECTIONS because limits.max_pending_logins connections were waiting to log in.",
        label: none(),
    },
    Def {
        name: FANOUT_YIELDS,
        kind: Kind::Counter,
        unit: None,
        help: "Times a large push paused its fan-out to let other tasks (sessions, timers) run.",
        label: none(),
    },
    Def {
        name: SESSIONS,
        kind: Kind::Gauge,
        unit: None,
        help: "Logged-in sessions.",
        label: none(),
    },
    Def {
        name: PARKED,
        kind: Kind::Gauge,
        unit: None,
        help: "Idle TCP and TLS connections parked: no task and no reactor entry, their socket watched by the parker (listen.park_after).",
        label: none(),
    },
    Def {
        name: PARKS,
        kind: Kind::Counter,
        unit: None,
        help: "Times a quiet TCP or TLS connection was parked; a push, a close or a deadline unparks it, and so does a read that needs more than an answer.",
        label: none(),
    },
    Def {
        name: PARKED_ANSWERS,
        kind: Kind::Counter,
        unit: None,
        help: "Reads of parked connections answered in place (a heartbeat, mostly) after which the connection stayed parked.",
        label: none(),
    },
    Def {
        name: LOGINS,
        kind: Kind::Counter,
        unit: None,
        help: "Login attempts, by result (ok or a code name).",
        label: Some(Label {
            key: "result",
            values: login_results,
        }),
    },
    Def {
        name: CLOSES,
        kind: Kind::Counter,
        unit: None,
        help: "Connections closed by the gateway or peer, by reason.",
        label: Some(Label {
            key: "reason",
            values: close_codes,
        }),
    },
    Def {
        name: FRAMES_IN,
        kind: Kind::Counter,
        unit: None,
        help: "Frames received from clients, by transport.",
        label: transport(),
    },
    Def {
        name: FRAMES_OUT,
        kind: Kind::Counter,
        unit: None,
        help: "Frames sent to clients, by transport.",
        label: transport(),
    },
    Def {
        name: BYTES_IN,
        kind: Kind::Counter,
        unit: Some(Unit::Bytes),
        help: "Bytes received from clients.",
        label: none(),
    },
    Def {
        name: BYTES_OUT,
        kind: Kind::Counter,
        unit: Some(Unit::Bytes),
        help: "Bytes written to clients.",
        label: none(),
    },
    Def {
        name: WRITES,
        kind: Kind::Counter,
        unit: None,
        help: "Socket write calls (frames are coalesced into few writes).",
        label: none(),
    },
    Def {
        name: PUSHES,
        kind: Kind::Counter,
        unit: None,
        help: "Push requests from upstream, by target kind.",
        label: Some(Label {
            key: "target",
            values: || PUSH_TARGETS.to_vec(),
        }),
    },
    Def {
        name: DELIVERIES,
        kind: Kind::Counter,
        unit: None,
        help: "Pushes queued into session queues.",
        label: none(),
    },
    Def {
        name: DROPS,
        kind: Kind::Counter,
        unit: None,
        help: "Pushes a session did not keep, by policy: drop (a full queue under the drop policy), budget (the node's replay budget spent though detached sessions held nothing more), evicted (a detached or slow session's own bound, or its user's, made room for a newer push), reclaimed (a detached session's oldest push evicted to make room in the node's replay budget).",
        label: Some(Label {
            key: "policy",
            values: || vec!["drop", "budget", "evicted", "reclaimed"],
        }),
    },
    Def {
        name: SLOW_CONSUMERS,
        kind: Kind::Counter,
        unit: None,
        help: "Sessions closed as slow consumers.",
        label: none(),
    },
    Def {
        name: ACK_TIMEOUTS,
        kind: Kind::Counter,
        unit: None,
        help: "Connections closed because pushes went unacknowledged for delivery.ack_timeout (dead path).",
        label: none(),
    },
    Def {
        name: QUIC_MIGRATIONS,
        kind: Kind::Counter,
        unit: None,
        help: "QUIC connections whose client address changed (migration or NAT rebinding).",
        label: none(),
    },
    Def {
        name: QUIC_HANDSHAKES,
        kind: Kind::Counter,
        unit: None,
        help: "New QUIC clients, by result (accepted, retry, refused, failed, evicted).",
        label: Some(Label {
            key: "result",
            values: || vec!["accepted", "retry", "refused", "failed", "evicted"],
        }),
    },
    Def {
        name: QUIC_HANDSHAKES_PENDING,
        kind: Kind::Gauge,
        unit: None,
        help: "QUIC connections accepted that have not opened their stream yet.",
        label: none(),
    },
    Def {
        name: QUIC_SOCKET_BUFFER,
        kind: Kind::Gauge,
        unit: Some(Unit::Bytes),
        help: "The QUIC UDP socket's buffer the kernel granted, by direction (receive, send); less than quic.socket_buffer when net.core.rmem_max or wmem_max caps it.",
        label: Some(Label {
            key: "direction",
            values: || vec!["receive", "send"],
        }),
    },
    Def {
        name: TLS_HANDSHAKES,
        kind: Kind::Counter,
        unit: None,
        help: "TLS handshakes, by result (accepted, hello_timeout, timeout, evicted, failed).",
        label: Some(Label {
            key: "result",
            values: || vec!["accepted", "hello_timeout", "timeout", "evicted", "failed"],
        }),
    },
    Def {
        name: WS_UPGRADES,
        kind: Kind::Counter,
        unit: None,
        help: "WebSocket upgrade requests, by result: accepted, page (a plain GET answered with the example browser client, listen.ws_page), the HTTP status of a refusal (400, 403, 404, 405, 426, 431; 503 for a connection limit), timeout (no whole request within session.login_timeout) or failed (the peer closed or the socket failed).",
        label: Some(Label {
            key: "result",
            values: || WS_UPGRADE_RESULTS.to_vec(),
        }),
    },
    Def {
        name: WS_CLOSES,
        kind: Kind::Counter,
        unit: None,
        help: "WebSocket connections the gateway closed for a frame it refuses, by close code: 1002 (protocol error), 1003 (a text message), 1008 (too many fragments), 1009 (a message over limits.max_frame).",
        label: Some(Label {
            key: "code",
            values: || vec!["1002", "1003", "1008", "1009"],
        }),
    },
    Def {
        name: TLS_HANDSHAKES_PENDING,
        kind: Kind::Gauge,
        unit: None,
        help: "TLS connections accepted whose handshake has not finished.",
        label: none(),
    },
    Def {
        name: QUEUE_DEPTH,
        kind: Kind::Histogram,
        unit: None,
        help: "Session queue depth observed at each flush.",
        label: none(),
    },
    Def {
        name: PUSH_WAIT,
        kind: Kind::Histogram,
        unit: Some(Unit::Seconds),
        help: "Time from a push's arrival at the gateway to the first write that carries it to a connected device: one sample per write, that of its oldest such push. Pushes queued while the device was offline are left out.",
        label: none(),
    },
    Def {
        name: UPLINKS,
        kind: Kind::Counter,
        unit: None,
        help: "Uplink sends from clients, by result.",
        label: Some(Label {
            key: "result",
            values: || vec!["ok", "unavailable", "duplicate"],
        }),
    },
    Def {
        name: BUS_CONNECTED,
        kind: Kind::Gauge,
        unit: None,
        help: "1 while the cluster bus (bus.kind = \"nats\") is connected to a NATS server, else 0 (always 0 with the local bus).",
        label: none(),
    },
    Def {
        name: BUS_EXPIRED_PUSHES,
        kind: Kind::Counter,
        unit: None,
        help: "Pushes from other nodes not run because they came after their request's deadline (bus.request_timeout from when the upstream asked, plus 1 s for the nodes' clocks): the asking node had reported this node as not answering already.",
        label: none(),
    },
    Def {
        name: BUS_COMMANDS_CONNECTED,
        kind: Kind::Gauge,
        unit: None,
        help: "1 while the cluster bus's command link (its own NATS connection for the commands other nodes send this one) is connected and subscribed, else 0.",
        label: none(),
    },
    Def {
        name: BUS_DISCONNECTS,
        kind: Kind::Counter,
        unit: None,
        help: "Times the cluster bus lost its NATS connection (it reconnects by itself).",
        label: none(),
    },
    Def {
        name: BUS_REQUESTS,
        kind: Kind::Counter,
        unit: None,
        help: "Commands sent to other nodes, by result: ok, timeout (no answer within bus.request_timeout), unreachable (the node is gone or the bus is down), error (the answer made no sense).",
        label: Some(Label {
            key: "result",
            values: || vec!["ok", "timeout", "unreachable", "error"],
        }),
    },
    Def {
        name: SESSIONS_MOVED,
        kind: Kind::Counter,
        unit: None,
        help: "Sessions that moved between nodes with a resume, by direction: in (resumed here from another node), out (handed to another node).",
        label: Some(Label {
            key: "direction",
            values: || vec!["in", "out"],
        }),
    },
    Def {
        name: SESSION_TAKES,
        kind: Kind::Counter,
        unit: None,
        help: "Resumes here of sessions another node held, by result: ok, or the code of why the session could not be fetched (the client then gets CODE_RESUME_EXPIRED).",
        label: Some(Label {
            key: "result",
            values: || {
                vec![
                    "ok",
                    Code::ResumeExpired.as_str_name(),
                    Code::ResumeRejected.as_str_name(),
                    Code::NodeUnreachable.as_str_name(),
                    Code::NodeTimeout.as_str_name(),
                    Code::BadRequest.as_str_name(),
                    Code::Internal.as_str_name(),
                ]
            },
        }),
    },
    Def {
        name: CLUSTER_NODES,
        kind: Kind::Gauge,
        unit: None,
        help: "Nodes of the cluster this node knows alive, itself included.",
        label: none(),
    },
    Def {
        name: UPSTREAM_CONNECTIONS,
        kind: Kind::Gauge,
        unit: None,
        help: "Connected upstream services.",
        label: none(),
    },
    Def {
        name: UPSTREAM_EVENTS_DROPPED,
        kind: Kind::Counter,
        unit: None,
        help: "Events dropped because an upstream subscriber's queue was full (upstream.event_queue, upstream.event_queue_bytes), by kind: uplink, opened, closed, undelivered, delivery.",
        label: Some(Label {
            key: "kind",
            values: || vec!["uplink", "opened", "closed", "undelivered", "delivery"],
        }),
    },
    Def {
        name: UPSTREAM_REFUSED,
        kind: Kind::Counter,
        unit: None,
        help: "Upstream connections refused, by reason: CODE_TOO_MANY_CONNECTIONS (upstream.max_connections, at Hello), CODE_FRAME_TOO_LARGE (a Hello over 4096 bytes), CODE_UPSTREAM_AUTH_FAILED (no Hello in time, or a bad secret), CODE_RATE_LIMITED (a bad secret past its source's budget of failed Hellos), CODE_UNSUPPORTED_VERSION.",
        label: Some(Label {
            key: "reason",
            values: || {
                [
                    Code::TooManyConnections,
                    Code::FrameTooLarge,
                    Code::UpstreamAuthFailed,
                    Code::RateLimited,
                    Code::UnsupportedVersion,
                ]
                .map(|c| c.as_str_name())
                .to_vec()
            },
        }),
    },
    Def {
        name: UPSTREAM_PENDING_HELLOS,
        kind: Kind::Gauge,
        unit: None,
        help: "Upstream connections that have not completed Hello (at most upstream.max_pending_hellos).",
        label: none(),
    },
    Def {
        name: UPSTREAM_HELLOS_EVICTED,
        kind: Kind::Counter,
        unit: None,
        help: "Upstream connections closed before their Hello to make room for a newer one (upstream.max_pending_hellos).",
        label: none(),
    },
    Def {
        name: UPSTREAM_FAILED_HELLOS,
        kind: Kind::Counter,
        unit: None,
        help: "Upstream Hellos with a wrong secret, from every source.",
        label: none(),
    },
    Def {
        name: UPSTREAM_REPLY_BYTES,
        kind: Kind::Gauge,
        unit: Some(Unit::Bytes),
        help: "Bytes of replies queued for upstream connections, all together (each connection at most upstream.reply_queue_bytes).",
        label: none(),
    },
    Def {
        name: UPSTREAM_REPLY_WAITS,
        kind: Kind::Counter,
        unit: None,
        help: "Times an upstream connection's reader stopped reading requests because its replies filled upstream.reply_queue_bytes.",
        label: none(),
    },
    Def {
        name: UPSTREAM_STALLS,
        kind: Kind::Counter,
        unit: None,
        help: "Upstream connections closed because their socket took no byte of a pending reply or event for upstream.stall_timeout.",
        label: none(),
    },
    Def {
        name: UNDELIVERED,
        kind: Kind::Counter,
        unit: None,
        help: "Undelivered reports (push found no live session).",
        label: none(),
    },
    Def {
        name: ROOMS,
        kind: Kind::Gauge,
        unit: None,
        help: "Rooms with at least one member.",
        label: none(),
    },
    Def {
        name: RESUMES,
        kind: Kind::Counter,
        unit: None,
        help: "Resume attempts, by result (CODE_OK, CODE_RESUME_GAP, CODE_RESUME_EXPIRED, CODE_RESUME_REJECTED).",
        label: Some(Label {
            key: "result",
            values: || {
                [
                    Code::Ok,
                    Code::ResumeGap,
                    Code::ResumeExpired,
                    Code::ResumeRejected,
                ]
                .map(|c| c.as_str_name())
                .to_vec()
            },
        }),
    },
    Def {
        name: ACKED,
        kind: Kind::Counter,
        unit: None,
        help: "Pushes acknowledged by clients.",
        label: none(),
    },
    Def {
        name: REPLAY_BYTES,
        kind: Kind::Gauge,
        unit: Some(Unit::Bytes),
        help: "Bytes held in session queues and unacknowledged windows (delivery.replay_budget bounds it).",
        label: none(),
    },
    Def {
        name: DETACHED,
        kind: Kind::Gauge,
        unit: None,
        help: "Sessions without a connection, waiting for a resume.",
        label: none(),
    },
    Def {
        name: RESIDENT_MEMORY,
        kind: Kind::Gauge,
        unit: Some(Unit::Bytes),
        help: "Resident memory of the gateway process (Linux VmRSS), sampled each second.",
        label: none(),
    },
    Def {
        name: ADMIN_CONNECTIONS,
        kind: Kind::Gauge,
        unit: None,
        help: "Open connections to the admin listener (metrics.max_connections bounds it).",
        label: none(),
    },
    Def {
        name: ADMIN_REFUSED,
        kind: Kind::Counter,
        unit: None,
        help: "Admin connections closed at accept because metrics.max_connections were open.",
        label: none(),
    },
    Def {
        name: ADMIN_TIMEOUTS,
        kind: Kind::Counter,
        unit: None,
        help: "Admin connections closed by a timeout, by kind: header (no complete request head within metrics.header_timeout, also between requests), idle (no byte moved either way for metrics.idle_timeout), request (no answer within metrics.request_timeout).",
        label: Some(Label {
            key: "kind",
            values: || vec!["header", "idle", "request"],
        }),
    },
    Def {
        name: API_REQUESTS,
        kind: Kind::Counter,
        unit: None,
        help: "HTTP API requests that passed the key check, by route (push, kick, rooms_add, rooms_remove, presence).",
        label: Some(Label {
            key: "route",
            values: || vec!["push", "kick", "rooms_add", "rooms_remove", "presence"],
        }),
    },
    Def {
        name: API_REFUSED,
        kind: Kind::Counter,
        unit: None,
        help: "HTTP API requests refused before they ran, by reason: off (no api.keys, 403), unauthorized (missing or unknown key, 401), too_large (body over api.max_body, 413), timeout (body not in within metrics.request_timeout, 408), bad_json (400).",
        label: Some(Label {
            key: "reason",
            values: || vec!["off", "unauthorized", "too_large", "timeout", "bad_json"],
        }),
    },
];

/// Describes every metric of [`METRICS`] (Prometheus HELP lines).
pub fn describe() {
    for d in METRICS {
        match (d.kind, d.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(d.name, u, d.help),
            (Kind::Counter, None) => describe_counter!(d.name, d.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(d.name, u, d.help),
            (Kind::Gauge, None) => describe_gauge!(d.name, d.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(d.name, u, d.help),
            (Kind::Histogram, None) => describe_histogram!(d.name, d.help),
        }
    }
}

/// One series of a metric in [`METRICS`]: the metric, and its label and
/// value if it has a label.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub def: &'static Def,
    pub label: Option<(&'static str, &'static str)>,
}

/// Every series of [`METRICS`], one per label value.
pub fn series() -> Vec<Series> {
    let mut out = Vec::new();
    for def in METRICS {
        match &def.label {
            None => out.push(Series { def, label: None }),
            Some(l) => out.extend((l.values)().into_iter().map(|v| Series {
                def,
                label: Some((l.key, v)),
            })),
        }
    }
    out
}

/// Registers every series of [`METRICS`] with the installed recorder, so
/// that each is on the page at 0 before its first count: dashboards and
/// `rate()` see a series from the start instead of one that appears at its
/// first event. Registering does not change a value already counted.
pub fn register_all() {
    for s in series() {
        let name = s.def.name;
        match (s.def.kind, s.label) {
            (Kind::Counter, None) => drop(metrics::counter!(name)),
            (Kind::Counter, Some((k, v))) => drop(metrics::counter!(name, k => v)),
            (Kind::Gauge, None) => drop(metrics::gauge!(name)),
            (Kind::Gauge, Some((k, v))) => drop(metrics::gauge!(name, k => v)),
            (Kind::Histogram, None) => drop(metrics::histogram!(name)),
            (Kind::Histogram, Some((k, v))) => drop(metrics::histogram!(name, k => v)),
        }
    }
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
    frames_in: [Counter; TransportKind::ALL.len()],
    frames_out: [Counter; TransportKind::ALL.len()],
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

impl Hot {
    fn new() -> Self {
        let by_transport = |name: &'static str| {
            TransportKind::ALL.map(|t| metrics::counter!(name, "transport" => t.as_str()))
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

/// The installed Prometheus recorder and the process metrics it renders;
/// the admin listener serves [`Exporter::render`] at `/metrics`.
pub struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl Exporter {
    /// A recorder of its own, not installed: what the process records does
    /// not reach it (tests of the page's serving).
    #[cfg(test)]
    pub(crate) fn unattached() -> Self {
        Self {
            handle: PrometheusBuilder::new().build_recorder().handle(),
            process: metrics_process::Collector::default(),
        }
    }

    /// The Prometheus text page, with the `process_*` series read now.
    /// It reads `/proc/self` (its descriptor count walks `/proc/self/fd`,
    /// one entry per open connection): call it off the async workers.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }

    /// The recorder's series alone, without reading `/proc` for the
    /// `process_*` ones: what the status page's sampler reads once a
    /// second (the descriptor count walks one entry per connection).
    pub fn render_series(&self) -> String {
        self.handle.render()
    }

    /// Folds the histogram samples recorded since the last call into their
    /// buckets. [`render`](Self::render) does it too; between scrapes,
    /// call this every few seconds so that samples do not pile up.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// Installs the Prometheus recorder as the process's recorder, describes
/// every metric and registers each series at 0 ([`register_all`]), and
/// describes the `process_*` series. Serving the page is the admin
/// listener's job.
///
/// # Errors
/// When a recorder is already installed, or a bucket list is empty.
pub fn install() -> anyhow::Result<Exporter> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(QUEUE_DEPTH.to_owned()),
            &[0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0],
        )?
        .set_buckets_for_metric(Matcher::Full(PUSH_WAIT.to_owned()), &PUSH_WAIT_BUCKETS)?
        .install_recorder()?;
    describe();
    register_all();
    if let Some(b) = resident_bytes() {
        metrics::gauge!(RESIDENT_MEMORY).set(b as f64);
    }
    let process = metrics_process::Collector::default();
    process.describe();
    process.collect();
    Ok(Exporter { handle, process })
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
    fn the_table_names_each_metric_once_with_labels_from_fixed_sets() {
        let mut names: Vec<_> = METRICS.iter().map(|d| d.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a metric is in the table twice");
        for d in METRICS {
            assert!(d.name.starts_with("tether_"), "{}", d.name);
            assert!(!d.help.is_empty(), "{}", d.name);
            if let Some(l) = &d.label {
                let mut v = (l.values)();
                assert!(!v.is_empty() && v.len() <= 64, "{}: {v:?}", d.name);
                v.sort_unstable();
                let k = v.len();
                v.dedup();
                assert_eq!(v.len(), k, "{}: a label value twice", d.name);
            }
        }
        let closes = close_codes();
        assert!(closes.contains(&"CODE_ACK_TIMEOUT"));
        assert!(closes.contains(&"CODE_CONNECTION_LOST"));
        assert!(!closes.contains(&"CODE_OK"));
    }

    #[test]
    fn every_transport_has_a_hot_counter_and_a_label() {
        let hot = Hot::new();
        assert_eq!(hot.frames_in.len(), TransportKind::ALL.len());
        for k in TransportKind::ALL {
            // Indexes its own slot (a kind past the array would panic here).
            let _ = hot.frames_in(k);
            let _ = hot.frames_out(k);
            assert_eq!(
                k.is_client(),
                transport_labels().contains(&k.as_str()),
                "{k:?}"
            );
        }
        assert!(transport_labels().contains(&"ws"));
        assert!(transport_labels().contains(&"wss"));
    }
}
