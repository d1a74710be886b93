//! tether-loadtest: load scenarios against running Tether gateways.
//!
//! A coordinator (this process) spreads simulated devices over worker
//! processes (`--workers`) and source addresses (`--sources`), drives the
//! upstream side (pushes, event consumers) itself, and reports a summary
//! table, a JSON file (`--json`) and an SVG plot (`--plot`). `simulate` runs
//! a million sessions in one process over in-memory pipes. `idle`,
//! `broadcast` and `unicast` also run against a redis server (`--redis`),
//! to compare the two driven the same way.

mod cluster;
mod coord;
mod fleet;
mod ledger;
mod million;
mod plot;
mod quic;
mod redis;
mod report;
mod resp;
mod scenario;
mod simulate;
mod soak;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tether-loadtest",
    about = "Load generator for the Tether gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hold N logged-in, heartbeating devices; report the gateway's memory
    /// per connection (from --pid or --metrics). With --redis: N subscribers
    /// on a redis server, its memory from --pid.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to hold the devices after the last login.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Every device joins one room (with --redis: subscribes to its
        /// channel too).
        #[arg(long)]
        room: bool,
        #[command(flatten)]
        redis: RedisTarget,
    },
    /// An upstream pushes M messages to every device (or a room holding them
    /// all); reports deliveries per second and push-to-delivery latency.
    /// With --redis: M PUBLISHes to one channel every subscriber is on.
    Broadcast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        pushes: Pushes,
        /// Push to a room every device joined instead of to everyone.
        #[arg(long)]
        room: bool,
        #[command(flatten)]
        redis: RedisTarget,
    },
    /// An upstream pushes M messages, each to one random user; reports pushes
    /// per second and push-to-delivery latency. With --redis: M PUBLISHes,
    /// each to one random user's channel.
    Unicast {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        pushes: Pushes,
        #[command(flatten)]
        redis: RedisTarget,
    },
    /// Every device sends uplinks; an upstream consumes them; reports sends
    /// per second and send-to-SendAck latency.
    Uplink {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        /// Milliseconds between one device's uplinks.
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        /// Uplink payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Seconds to measure after every device logged in.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Devices log in, stay about --life-ms, close and log in afresh;
    /// reports connects and disconnects per second and login latency.
    Churn {
        #[command(flatten)]
        common: Common,
        /// Mean milliseconds a session lives (each one ±50%).
        #[arg(long, default_value_t = 2000)]
        life_ms: u64,
        /// Seconds to run after the ramp.
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Every device drops its connection at once and resumes its session,
    /// while an upstream keeps pushing to everyone; reports resume latency and
    /// checks that no push was lost.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        /// Background pushes to everyone per second.
        #[arg(long, default_value_t = 50)]
        push_rate: u64,
        /// Push payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Seconds of pushes before the storm, and after every device resumed.
        #[arg(long, default_value_t = 2)]
        settle: u64,
    },
    /// Devices log in over QUIC; an upstream pushes to everyone (every other
    /// push on the bulk lane); meanwhile every QUIC endpoint moves to a new
    /// UDP socket, --rebinds times. Checks that no push was lost or
    /// duplicated and that no device reconnected: the connections migrate.
    Migrate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        migrate: scenario::MigrateOpts,
    },
    /// Starts the gateways of one cluster (--gateway-bin, one
    /// --gateway-config each; a private nats-server with --nats-server),
    /// spreads the devices over them, pushes unicasts and broadcasts at a
    /// steady rate, and restarts each gateway in turn (SIGTERM, exit,
    /// start, accept). Drained devices resume on another gateway. Reports
    /// pushes accepted, delivered, lost and duplicated (by payload id, per
    /// device) and the resumes; exits non-zero unless lost and duplicated
    /// are both 0.
    RollingRestart {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        rolling: cluster::RollingOpts,
    },
    /// A whole cluster on this host, started by the tool (a private
    /// nats-server and --gateways gateways), --conns devices over it in
    /// rooms, and the phases of a million-connection test: ramp, idle hold,
    /// broadcast, a push to each room, unicasts, a reconnect storm.
    /// Reports login rate, memory per connection (gateways and kernel),
    /// heartbeat CPU, push times and losses; exits non-zero on any loss.
    Million {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        million: million::MillionOpts,
    },
    /// Minutes of mixed load on one gateway: unicast and broadcast, churn,
    /// slow consumers, a reconnect storm every period, hostile connections.
    /// Samples the gateway's RSS and CPU (--pid, or --metrics for RSS) and
    /// checks that every accepted push was delivered or reported.
    Soak {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        upstream: Upstream,
        #[command(flatten)]
        soak: soak::SoakOpts,
    },
    /// In one process, without sockets: N sessions over in-memory pipes
    /// through the real session, registry and router code. Reports RSS per
    /// session, the time for one broadcast to reach every session queue, and
    /// registry operations per second.
    Simulate {
        #[arg(long, default_value_t = 1_000_000)]
        sessions: usize,
        /// Bytes each in-memory pipe buffers.
        #[arg(long, default_value_t = 256)]
        pipe: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Internal: a fleet driven by a coordinator over stdin/stdout.
    #[command(hide = true)]
    Worker,
}

/// Options every fleet scenario takes.
#[derive(Args, Clone, Debug, Serialize)]
pub struct Common {
    /// Gateway client listeners (comma separated); device i uses addr[i % n].
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7400")]
    pub addr: Vec<SocketAddr>,
    /// Devices.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// New connections per second, over all workers (0: at once).
    #[arg(long, default_value_t = 5000.0)]
    pub ramp: f64,
    /// Worker processes (0: devices run in this process). Default: one per
    /// 15,000 devices.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Source addresses to bind (comma separated, ranges like
    /// 127.0.0.1-127.0.0.8); each gives another ~28k ports per gateway address.
    #[arg(long, value_delimiter = ',', value_parser = parse_sources)]
    pub sources: Vec<Vec<IpAddr>>,
    /// Connect over TLS.
    #[arg(long)]
    pub tls: bool,
    /// Connect over QUIC (needs --ca; --addr are then the gateway's UDP
    /// addresses, e.g. 127.0.0.1:7443).
    #[arg(long, conflicts_with = "tls")]
    pub quic: bool,
    /// Connect over WebSocket (`ws://ADDR/tether`; --addr are then the
    /// gateway's listen.ws addresses). With --tls, WebSocket over TLS
    /// (`wss://`, --addr its listen.wss addresses).
    #[arg(long, conflicts_with = "quic")]
    pub ws: bool,
    /// QUIC client endpoints (UDP sockets) the devices share, over all
    /// workers; each binds the --sources round-robin. Default: one per 256
    /// devices.
    #[arg(long, requires = "quic")]
    pub quic_endpoints: Option<usize>,
    /// QUIC devices keep the gateway's session tickets (each its own, as a
    /// phone does) and send their login or resume in 0-RTT data when they
    /// connect again; the report counts 0-RTT accepted and refused.
    #[arg(long, requires = "quic")]
    pub zero_rtt: bool,
    /// CA file to trust with --tls or --quic (e.g. the gateway's
    /// certs/dev.crt).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the gateway's certificate must carry.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// HS256 secret the device tokens are minted with.
    #[arg(long, default_value = tether::config::DEV_SECRET)]
    #[serde(skip)]
    pub secret: String,
    /// User ids are PREFIX + index.
    #[arg(long, default_value = "u")]
    pub prefix: String,
    /// Heartbeat interval in milliseconds (default: the gateway's hint).
    #[arg(long)]
    pub ping_ms: Option<u64>,
    /// Every Nth device reads slowly (a slow consumer), 0: none.
    #[arg(long, default_value_t = 0)]
    pub slow_every: usize,
    /// Bytes per second a slow device reads.
    #[arg(long, default_value_t = 2048)]
    pub slow_bps: u64,
    /// A device acknowledges once this many pushes are unacknowledged...
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// ...or about this many milliseconds (±50 %, drawn per ack) after the
    /// first unacknowledged push.
    #[arg(long, default_value_t = 20)]
    pub ack_delay_ms: u64,
    /// The gateway's pid, to sample its RSS from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The gateway's metrics listener (host:port), to sample its RSS from
    /// tether_process_resident_memory_bytes.
    #[arg(long)]
    pub metrics: Option<String>,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write an SVG plot (rates, devices, latency percentiles) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The upstream side.
#[derive(Args, Clone, Debug, Serialize)]
pub struct Upstream {
    /// Upstream listeners, one per gateway, in the order of --addr.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:7401")]
    pub upstream: Vec<String>,
    /// The upstream shared secret.
    #[arg(long, default_value = tether::config::DEV_UPSTREAM_SECRET)]
    #[serde(skip)]
    pub upstream_secret: String,
    /// Upstream connections per gateway.
    #[arg(long, default_value_t = 4)]
    pub upstreams: usize,
    /// Push requests in flight at once.
    #[arg(long, default_value_t = 256)]
    pub inflight: usize,
}

/// A redis server in the gateway's place (idle, broadcast and unicast).
#[derive(Args, Clone, Debug, Serialize)]
pub struct RedisTarget {
    /// Run against this redis server instead of a gateway: devices
    /// SUBSCRIBE (to u:<user>, and r:bench with a room or a broadcast), the
    /// upstream side PUBLISHes over --upstreams connections. Takes the
    /// place of --addr and --upstream; RSS only from --pid.
    #[arg(
        long,
        value_name = "HOST:PORT",
        value_parser = parse_host_port,
        conflicts_with_all = ["addr", "tls", "quic", "metrics"]
    )]
    pub redis: Option<SocketAddr>,
}

/// A push storm.
#[derive(Args, Clone, Debug, Serialize)]
pub struct Pushes {
    /// Pushes.
    #[arg(long, default_value_t = 100_000)]
    pub msgs: usize,
    /// Payload bytes (at least 8: the send time).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Pushes per second (0: as fast as the gateway answers).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Deliveries in flight at most: the upstream side pauses while the
    /// deliveries it published and the devices have not received yet
    /// number more (0: no bound, only --inflight requests).
    #[arg(long, default_value_t = 50_000)]
    pub max_inflight_deliveries: u64,
    /// Pushes per request (a PushBatch, at most 1024; the gateway only:
    /// redis has no batch publish). 1 sends each push alone.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,
    /// The gateways are one cluster: every unicast goes through the
    /// upstream socket of a gateway other than the one its user logged in
    /// to (round robin over the others), and every broadcast goes once, to
    /// one gateway (round robin), and must reach every device cluster-wide.
    /// Needs two --addr or more and one --upstream per --addr.
    #[arg(long, conflicts_with = "redis")]
    pub cross_node: bool,
}

/// `host:port`, resolved to its first address.
fn parse_host_port(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    s.to_socket_addrs()
        .map_err(|e| format!("{s}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s}: no address"))
}

fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    let Some((a, b)) = s.split_once('-') else {
        return s
            .parse()
            .map(|ip| vec![ip])
            .map_err(|e| format!("{s}: {e}"));
    };
    let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
        a.trim().parse().map_err(|e| format!("{a}: {e}"))?,
        b.trim().parse().map_err(|e| format!("{b}: {e}"))?,
    );
    let (lo, hi) = (u32::from(a), u32::from(b));
    if hi < lo || hi - lo >= 65_536 {
        return Err(format!(
            "{s}: a range runs low to high, at most 65536 addresses"
        ));
    }
    Ok((lo..=hi).map(|v| IpAddr::V4(v.into())).collect())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Simulate {
        sessions,
        pipe,
        json,
    } = cli.cmd
    {
        // The simulated gateway runs on a multi-threaded runtime, as `serve` does.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(simulate::simulate(sessions, pipe, json.as_deref()));
    }
    // Workers run on one thread each: the load is pinned to one core, where
    // more threads would only contend. The coordinator too.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Worker => coord::worker_main().await,
            Cmd::Simulate { .. } => Ok(()),
            Cmd::Idle {
                common,
                hold,
                room,
                redis,
            } => scenario::idle(common, hold, room, redis.redis).await,
            Cmd::Broadcast {
                common,
                upstream,
                pushes,
                room,
                redis,
            } => scenario::broadcast(common, upstream, pushes, room, redis.redis).await,
            Cmd::Unicast {
                common,
                upstream,
                pushes,
                redis,
            } => scenario::unicast(common, upstream, pushes, redis.redis).await,
            Cmd::Uplink {
                common,
                upstream,
                every_ms,
                size,
                duration,
            } => scenario::uplink(common, upstream, every_ms, size, duration).await,
            Cmd::Churn {
                common,
                life_ms,
                duration,
            } => scenario::churn(common, life_ms, duration).await,
            Cmd::Reconnect {
                common,
                upstream,
                push_rate,
                size,
                settle,
            } => scenario::reconnect(common, upstream, push_rate, size, settle).await,
            Cmd::Migrate {
                common,
                upstream,
                migrate,
            } => scenario::migrate(common, upstream, migrate).await,
            Cmd::Soak {
                common,
                upstream,
                soak,
            } => soak::soak(common, upstream, soak).await,
            Cmd::RollingRestart {
                common,
                upstream,
                rolling,
            } => cluster::rolling_restart(common, upstream, rolling).await,
            Cmd::Million { common, million } => million::million(common, million).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_take_lists_and_ranges() {
        assert_eq!(parse_sources("127.0.0.2").expect("one").len(), 1);
        let r = parse_sources("127.0.0.1-127.0.0.8").expect("range");
        assert_eq!(r.len(), 8);
        assert_eq!(r[7], "127.0.0.8".parse::<IpAddr>().expect("ip"));
        assert!(parse_sources("127.0.0.8-127.0.0.1").is_err());
        assert!(parse_sources("nonsense").is_err());
    }
}
