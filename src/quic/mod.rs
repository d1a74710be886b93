//! QUIC: the endpoint, its driver, its configuration, the accept loop, and
//! connection IDs a load balancer can route.
//!
//! A QUIC connection carries one session, as a TCP connection does, with the
//! same frames and length prefixes inside its streams (docs/PROTOCOL.md,
//! section 20): the client opens one bidirectional stream for login, control
//! frames, acks, uplinks and interactive pushes; the gateway opens one
//! unidirectional stream for the bulk lane. [`driver`] moves quinn-proto's
//! connections (the gateway's own driver, for memory: see there);
//! [`crate::transport::quic`] is the wire that moves a session's bytes over
//! them; everything else is the transport-neutral
//! [`Link`](crate::transport::Link).
//!
//! What QUIC settings are chosen, and why:
//! - **Streams.** A client may open one bidirectional stream and no
//!   unidirectional one: stream state is allocated per stream the peer may
//!   open, and a session needs one. More is a protocol error that closes the
//!   connection.
//! - **Windows.** `quic.stream_window` is both the per-stream and the
//!   connection receive window: a client can make the gateway buffer at most
//!   that much unread input. `quic.send_window` bounds what the gateway hands
//!   to QUIC per connection before the client acknowledges it; pushes beyond
//!   it stay in the session's queue (where they are counted and bounded). The
//!   interactive stream has a higher send priority than the bulk stream, and
//!   the bulk stream's flow-control window is the client's to keep small, so a
//!   bulk flood never delays an interactive push.
//! - **Liveness.** One mechanism: the application heartbeat (`Ping` every
//!   `heartbeat_interval`) keeps the connection and any NAT binding alive,
//!   and `session.idle_timeout` judges silence. QUIC's own keep-alive is off
//!   and its idle timeout is the session's idle timeout plus a margin, so it
//!   only ever cleans up after a client that never logged in or vanished.
//! - **Address validation.** Past `quic.handshake_rate` new handshakes a
//!   second, a client must answer a stateless Retry first, so a flood of
//!   spoofed Initial packets costs no connection state. Path validation and
//!   the anti-amplification limit are quinn-proto's and stay on; migration is on.
//! - **0-RTT.** The TLS session cache holds `quic.session_cache` sessions. A
//!   returning client may log in or resume in 0-RTT data; only idempotent
//!   requests run before the handshake is confirmed
//!   ([`Link::set_early`](crate::transport::Link::set_early)).

pub mod cid;

/// The QUIC driver lives with the other wires' I/O, below this module.
pub use crate::transport::quic_driver as driver;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::handshake::HandshakeSet;
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::transport::quic::QuicWire;
use crate::transport::{ConnGuard, Connection, NodeRef};

use driver::Admission;

/// The ALPN protocol id of Tether's frames over QUIC.
pub const ALPN: &[u8] = b"tether/1";

/// How long past the session's idle timeout QUIC's own idle timeout fires.
const IDLE_MARGIN: Duration = Duration::from_secs(15);

/// The QUIC server configuration: the TLS certificate's `rustls` config with
/// ALPN `tether/1`, 0-RTT and a session cache of `quic.session_cache`, and
/// the transport settings described in the module documentation.
///
/// # Errors
/// A TLS configuration QUIC cannot use.
pub fn server_config(
    cfg: &Config,
    tls: &rustls::ServerConfig,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let cache = cfg.quic.session_cache as usize;
    if cache > 0 {
        // QUIC allows 0 or u32::MAX here: the amount is bounded by flow control.
        tls.max_early_data_size = u32::MAX;
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(cache);
        // One ticket per connection: a reconnect uses one, and its
        // connection hands out the next (the default of 2 fills the cache
        // twice as fast). Tickets are stateful and single use: the cache
        // takes an entry when a client presents it, so a replayed 0-RTT
        // flight finds nothing and its early data is refused.
        tls.send_tls13_tickets = 1;
    } else {
        tls.max_early_data_size = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("the TLS configuration cannot be used for QUIC")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg, false)));
    server.migration(true);
    Ok(server)
}

/// Transport settings shared by the gateway and the Rust client (`client`:
/// the client's side, which may not open a stream but takes the bulk one).
pub fn transport_config(cfg: &Config, client: bool) -> quinn::TransportConfig {
    let q = &cfg.quic;
    let mut t = quinn::TransportConfig::default();
    if client {
        // The gateway opens one unidirectional stream (bulk) and no other.
        t.max_concurrent_bidi_streams(0u32.into());
        t.max_concurrent_uni_streams(1u32.into());
    } else {
        t.max_concurrent_bidi_streams(1u32.into());
        t.max_concurrent_uni_streams(0u32.into());
    }
    t.stream_receive_window(q.stream_window.into());
    if client {
        // The connection's window must hold a full bulk stream and leave
        // room for the interactive one, or a bulk stream the app reads
        // slowly would stall interactive pushes at the connection level.
        t.receive_window(
            (u64::from(q.stream_window) * 4)
                .try_into()
                .unwrap_or(quinn::VarInt::MAX),
        );
    } else {
        // One client stream: the connection window is the stream's.
        t.receive_window(q.stream_window.into());
    }
    t.send_window(u64::from(q.send_window));
    t.keep_alive_interval(None);
    let idle = cfg.session.idle_timeout + IDLE_MARGIN;
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    // No unreliable datagrams: their receive buffer is per connection.
    t.datagram_receive_buffer_size(None);
    if !client {
        // No path MTU discovery: its probes keep a send buffer of the probe
        // size per connection (about 2.5 KB idle, measured), and pushes are
        // small; datagrams stay at QUIC's 1200-byte minimum.
        t.mtu_discovery_config(None);
    }
    t
}

/// The endpoint's configuration: connection IDs from `quic.cid` when set.
///
/// # Errors
/// An invalid `[quic.cid]` table.
pub fn endpoint_config(cfg: &Config) -> anyhow::Result<quinn::EndpointConfig> {
    let mut ep = quinn::EndpointConfig::default();
    if let Some(c) = &cfg.quic.cid {
        let generator = cid::QuicLbGenerator::new(c).context("quic.cid")?;
        ep.cid_generator(move || Box::new(generator.clone()));
    }
    Ok(ep)
}

/// Binds a QUIC endpoint on `addr` (within a Tokio runtime).
///
/// # Errors
/// The address is in use or cannot be bound.
pub fn bind(
    addr: SocketAddr,
    cfg: &Config,
    server: quinn::ServerConfig,
) -> anyhow::Result<driver::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let want = cfg.quic.socket_buffer as usize;
    if want > 0 {
        // Every client's packets share this socket: with the kernel's
        // default buffer (about 208 KiB) a burst of acks and pings from
        // thousands of clients overflows it, and QUIC then retransmits.
        // The kernel caps what it grants without an error: read it back.
        let _ = sock.set_recv_buffer_size(want);
        let _ = sock.set_send_buffer_size(want);
        let sides = [
            (Direction::Receive, sock.recv_buffer_size()),
            (Direction::Send, sock.send_buffer_size()),
        ];
        for (dir, reported) in sides {
            let Ok(reported) = reported else { continue };
            let got = granted(reported);
            metrics::gauge!(m::QUIC_SOCKET_BUFFER, "direction" => dir.label()).set(got as f64);
            if got < want {
                tracing::warn!(
                    %addr,
                    configured = want,
                    granted = got,
                    "the kernel granted the QUIC socket a smaller {} buffer than quic.socket_buffer: raise {} to at least {want} (sysctl -w {}={want})",
                    dir.label(),
                    dir.sysctl(),
                    dir.sysctl(),
                );
            }
        }
    }
    sock.bind(&addr.into())
        .with_context(|| format!("cannot bind UDP {addr}"))?;
    let socket: std::net::UdpSocket = sock.into();
    driver::Endpoint::new(endpoint_config(cfg)?, server, socket)
        .with_context(|| format!("cannot start QUIC on {addr}"))
}

/// A side of the QUIC socket's kernel buffer.
#[derive(Clone, Copy)]
enum Direction {
    Receive,
    Send,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Receive => "receive",
            Direction::Send => "send",
        }
    }

    /// The sysctl that caps what an unprivileged `setsockopt` gets.
    fn sysctl(self) -> &'static str {
        match self {
            Direction::Receive => "net.core.rmem_max",
            Direction::Send => "net.core.wmem_max",
        }
    }
}

/// The buffer size the kernel granted, from what `getsockopt` reports:
/// Linux reports twice the size it set (the other half is its bookkeeping
/// allowance, socket(7)), so a capped 4 MiB reads back as the 8 MiB asked
/// for; other systems report the size itself.
fn granted(reported: usize) -> usize {
    if cfg!(target_os = "linux") {
        reported / 2
    } else {
        reported
    }
}

/// Counts handshakes per second to decide when new clients must prove
/// their address first (a stateless Retry).
struct HandshakeRate {
    limit: u64,
    window: Instant,
    count: u64,
}

impl HandshakeRate {
    fn new(limit: u32, now: Instant) -> Self {
        Self {
            limit: u64::from(limit),
            window: now,
            count: 0,
        }
    }

    /// Counts one handshake at `now`; false once the second's budget is spent.
    fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.limit
    }
}

/// Runs the QUIC endpoint `endpoint`: accepts connections until `stop`
/// (address validation under load, the connection limits, then one task
/// per connection), and carries the accepted ones until the endpoint is
/// closed ([`driver::Endpoint::close`]).
///
/// There is no handshake slot as for TLS: quinn-proto makes no `Incoming`
/// before a client's first Initial packet, and no connection waits for a
/// slot after it; past `quic.handshake_rate` a client must prove its
/// address before any crypto runs. What a handshake that never finishes
/// holds (its connection state, its task, its place in the connection
/// caps) is bounded in time by `session.login_timeout` (the wait for the
/// client's stream) and in number by `handshakes`, a set of at most
/// `tls.max_pending_handshakes` whose oldest is closed to make room: a
/// flood of handshakes that never finish cannot keep a real device out
/// (tests/quic_handshake_flood.rs).
pub async fn accept_loop(
    node: NodeRef,
    endpoint: driver::Endpoint,
    handshakes: Arc<HandshakeSet>,
    stop: CancellationToken,
) {
    // Draining: new connections are refused; the endpoint's connections
    // keep running until they drain (the server closes the endpoint after).
    let ep = endpoint.clone();
    tokio::spawn(async move {
        stop.cancelled().await;
        ep.stop_accepting();
    });
    let mut rate = HandshakeRate::new(node.config().quic.handshake_rate, Instant::now());
    let admit = move |incoming: &quinn_proto::Incoming| {
        if !incoming.remote_address_validated() && !rate.admit(Instant::now()) {
            // Over the rate: prove the address first. A retry keeps no state.
            metrics::counter!(m::QUIC_HANDSHAKES, "result" => "retry").increment(1);
            return if incoming.may_retry() {
                Admission::Retry
            } else {
                Admission::Refuse
            };
        }
        let remote = incoming.remote_address();
        let guard = if node.pending_full() {
            metrics::counter!(m::PENDING_LOGINS_REFUSED).increment(1);
            Err(crate::wire::Code::TooManyConnections)
        } else {
            ConnGuard::acquire(&node, remote, TransportKind::Quic)
        };
        match guard {
            Ok(guard) => {
                let (node, handshakes) = (node.clone(), handshakes.clone());
                Admission::Accept(Box::new(move |conn| {
                    handshakes.spawn(serve(node, conn, guard));
                }))
            }
            Err(code) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => code.as_str_name())
                    .increment(1);
                metrics::counter!(m::QUIC_HANDSHAKES, "result" => "refused").increment(1);
                // CONNECTION_REFUSED, before any state: what a storm costs.
                Admission::Refuse
            }
        }
    };
    endpoint.run(admit).await;
}

/// One connection, from its first packet: the client's stream, then the
/// session's task.
async fn serve(node: NodeRef, conn: driver::Connection, guard: ConnGuard) {
    // 0-RTT: a server reads early data at once, before the handshake ends;
    // the wire tells the link when the handshake is confirmed, and until
    // then the link runs only idempotent requests. A handshake that never
    // completes is bounded by the wait for the client's stream below and by
    // QUIC's idle timeout.
    metrics::counter!(m::QUIC_HANDSHAKES, "result" => "accepted").increment(1);
    // The client's stream comes with its first bytes (the Login): wait for
    // it as long as a login may take. The same login timeout goes on after
    // the stream came (Connection::since), so a client gets one
    // `session.login_timeout` from here to its LoginOk, not one per step.
    let login = node.config().session.login_timeout;
    let since = node.now();
    let stream = match tokio::time::timeout(login, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(remote = %conn.remote_address(), error = %e, "QUIC connection ended before its stream");
            return;
        }
        Err(_) => {
            conn.close(
                crate::wire::Code::LoginTimeout as u32,
                b"no stream within the login timeout",
            );
            return;
        }
    };
    // The bulk stream, if the client allows one: its transport parameters
    // are known by now, so the open succeeds at once or never will. Without
    // it, both lanes share the client's stream, as over TCP.
    let bulk = match conn.open_uni() {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(remote = %conn.remote_address(), error = %e, "cannot open the bulk stream");
            return;
        }
    };
    // Interactive frames first when both streams have data to send.
    conn.set_priority(stream, 1);
    if let Some(b) = bulk {
        conn.set_priority(b, 0);
    }
    let wire = QuicWire::new(conn, stream, bulk);
    // A task of its own: this setup's future (timeouts) is larger than the
    // session needs, and a task keeps the size of its largest state for its life.
    tokio::spawn(Connection::since(
        node,
        wire,
        TransportKind::Quic,
        guard,
        since,
    ));
}

/// The Rust client's QUIC configuration, trusting the certificates in
/// `roots`.
///
/// # Errors
/// A TLS configuration QUIC cannot use.
pub fn client_config(
    cfg: &Config,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("the TLS configuration cannot be used for QUIC")?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(Arc::new(transport_config(cfg, true)));
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_granted_buffer_is_read_back_as_the_kernel_reports_it() {
        // Linux: 8 MiB asked, rmem_max 4 MiB: getsockopt reports 8 MiB.
        let (want, capped) = (8 << 20, 4 << 20);
        if cfg!(target_os = "linux") {
            assert_eq!(granted(2 * capped), capped);
            assert!(granted(2 * capped) < want, "a capped buffer is seen");
            assert_eq!(granted(2 * want), want, "a full grant is not");
        } else {
            assert_eq!(granted(capped), capped);
        }
    }

    #[test]
    fn a_capped_socket_buffer_reads_back_smaller_than_asked() {
        // Whatever this machine's net.core.rmem_max: ask for more than any
        // kernel grants by default and compare with what it reports.
        use socket2::{Domain, Protocol, Socket, Type};
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let Some(max) = max else { return };
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
        let want = max * 2;
        sock.set_recv_buffer_size(want).unwrap();
        let got = granted(sock.recv_buffer_size().unwrap());
        // SO_RCVBUF is capped at rmem_max even for root (only
        // SO_RCVBUFFORCE goes past it, and the gateway does not use it).
        assert_eq!(got, max, "granted {got}, rmem_max {max}");
        assert!(got < want);
    }

    #[test]
    fn the_handshake_rate_admits_its_budget_per_second() {
        let t0 = Instant::now();
        let mut r = HandshakeRate::new(3, t0);
        assert!((0..3).all(|_| r.admit(t0)));
        assert!(
            !r.admit(t0),
            "the fourth in one second must prove its address"
        );
        assert!(r.admit(t0 + Duration::from_millis(1_000)), "a new second");
        let mut none = HandshakeRate::new(0, t0);
        assert!(!none.admit(t0), "0: every new client gets a Retry");
    }
}
