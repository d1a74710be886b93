//! The client fleet: N simulated devices in one process (a worker).
//!
//! Each device is one task that connects (TCP, TLS or QUIC), logs in with a minted
//! token, heartbeats, counts and acknowledges pushes, tracks per-lane sequence
//! numbers (so loss and duplicates show), and, by its [`FleetSpec`], sends
//! uplinks, churns, reads slowly, or resumes its session when told to
//! reconnect. The fleet reports cumulative [`Stats`] and, at the end, its
//! latency histograms. It owns no scenario logic: the coordinator decides what
//! upstream traffic runs and when the fleet reconnects or stops.
//!
//! The same [`run`] serves a worker process (JSON lines over stdio) and an
//! in-process fleet, so both paths measure with the same code. With
//! [`FleetSpec::redis`] the devices are redis subscribers instead
//! ([`redis`]), counted and timed by the same code.

mod redis;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tether::wire::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What a fleet does; sent to a worker as its first stdin line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FleetSpec {
    /// Gateway client listeners; device `i` uses `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// Connect over TLS, trusting this CA file, verifying this name.
    pub tls: Option<TlsSpec>,
    /// Connect over QUIC instead of TCP (`addrs` are UDP addresses).
    #[serde(default)]
    pub quic: Option<QuicSpec>,
    /// Connect over WebSocket (over TLS with `tls`): `addrs` are the
    /// gateway's WebSocket listeners.
    #[serde(default)]
    pub ws: bool,
    /// HS256 secret the tokens are minted with.
    pub secret: String,
    /// User ids are `{prefix}{i}`, device ids `d{i}`.
    pub prefix: String,
    /// Global index of this fleet's first device.
    pub first: usize,
    /// Devices in this fleet.
    pub count: usize,
    /// First connections per second for this fleet (0: all at once).
    pub rate: f64,
    /// Source addresses; device `i` binds `sources[i % len]`.
    pub sources: Vec<IpAddr>,
    /// Heartbeat interval; `None` follows the gateway's hint.
    pub ping_ms: Option<u64>,
    /// Room every device joins after login.
    pub room: Option<String>,
    /// With more than 0, device `i` is also in room `r<i % rooms>`, from
    /// its token (joined at login).
    #[serde(default)]
    pub rooms: usize,
    /// Every `slow_every`-th device (by global index) reads at `slow_bps`
    /// bytes per second and gives up when the gateway closes it (0: none).
    pub slow_every: usize,
    pub slow_bps: u64,
    /// Each device sends an uplink this often (0: never).
    pub uplink_ms: u64,
    pub uplink_size: usize,
    /// Each device closes and logs in afresh after about this long (0: never).
    pub churn_ms: u64,
    /// A device acknowledges once `ack_every` pushes are unacknowledged, or
    /// about `ack_delay_ms` (±50 %) after the first unacknowledged one.
    pub ack_every: u64,
    pub ack_delay_ms: u64,
    /// Slow devices stall instead of reading slowly: they connect with a
    /// receive buffer of `slow_rcvbuf` bytes (0: the system's), read nothing
    /// for `slow_stall_ms` after each login, then read normally for
    /// `SLOW_READ_MS` and stall again; when the gateway cuts them off they
    /// resume their session, as a phone that came back would (0: read at
    /// `slow_bps` and give up when cut off).
    #[serde(default)]
    pub slow_stall_ms: u64,
    #[serde(default)]
    pub slow_rcvbuf: usize,
    /// Keep, per session, which seqs each lane received, and hand them back
    /// with the final report ([`SessionRecord`]), so the coordinator can
    /// match them against the gateway's delivery reports.
    #[serde(default)]
    pub record_sessions: bool,
    /// Milliseconds between progress reports (0: [`PROGRESS_MS`]). A
    /// scenario that paces its pushes by what the fleet received asks for
    /// them more often.
    #[serde(default)]
    pub progress_ms: u64,
    /// Subscribe to the redis server at `addrs` instead of logging in to a
    /// gateway (no TLS, no QUIC).
    #[serde(default)]
    pub redis: Option<RedisSpec>,
    /// The gateways at `addrs` are one cluster: a device whose gateway
    /// drains it, drops its connection, is full or cannot be reached moves
    /// on to another address, picked at random (or to the Close's
    /// `reconnect_to`, after its `reconnect_after_ms`), and resumes its
    /// session there.
    #[serde(default)]
    pub failover: bool,
    /// Keep the payload id of every push received (bytes 8 to 16 of its
    /// payload, after the send time), count a payload seen twice in
    /// `Stats::id_dups`, and hand the ids back with the final report
    /// ([`IdRecord`]).
    #[serde(default)]
    pub record_ids: bool,
}

/// What a redis subscriber subscribes to: its user's channel `u:<user>`
/// when `user_channel`, and the room's `r:<room>` when the spec has a room.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RedisSpec {
    pub user_channel: bool,
}

/// Milliseconds between progress reports by default.
pub const PROGRESS_MS: u64 = 200;

/// What one session of one device received: the session id and, per lane
/// (interactive, bulk), the seqs received as inclusive ranges.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub session: u64,
    pub lanes: [Vec<(u64, u64)>; 2],
}

/// The payload ids one device received ([`FleetSpec::record_ids`]),
/// sorted.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IdRecord {
    /// The device's global index.
    pub device: usize,
    pub ids: Vec<u64>,
}

/// Payload ids one device keeps at most; past that `Stats::ids_overflow`
/// counts what it did not keep.
const MAX_IDS: usize = 1 << 20;

/// Ranges one lane of one session records at most; past that the record is
/// cut short and `Stats::record_overflow` counts it (a session that skips
/// this often is broken anyway).
const MAX_RANGES: usize = 4096;
/// How long a stalled slow device reads before it stalls again.
const SLOW_READ_MS: u64 = 5000;

/// TLS client settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TlsSpec {
    pub ca: PathBuf,
    pub server_name: String,
}

/// QUIC client settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuicSpec {
    pub ca: PathBuf,
    pub server_name: String,
    /// Client endpoints (UDP sockets) this fleet's devices share (at least
    /// one; the coordinator splits `--quic-endpoints` over its workers).
    pub endpoints: usize,
    /// Devices keep their session tickets and log in (or resume) in 0-RTT
    /// data when they connect again (`--zero-rtt`).
    #[serde(default)]
    pub zero_rtt: bool,
}

/// Coordinator to fleet.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Every device drops its connection at once and resumes its session.
    Reconnect,
    /// `permille` of the devices online (a different pick each time) drop
    /// their connections at once and resume their sessions.
    Storm { permille: u32 },
    /// Every QUIC endpoint moves to a new UDP socket (a new local port),
    /// the rebinds spread evenly over `spread_ms`: every connection on it
    /// migrates. Without QUIC, nothing happens.
    Rebind { spread_ms: u64 },
    /// Report the final figures and exit.
    Stop,
}

/// Fleet to coordinator.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Report {
    Progress {
        stats: Stats,
    },
    /// Every device has made its first login attempt.
    Ready {
        stats: Stats,
    },
    Done {
        stats: Stats,
        hists: Hists,
        /// With `record_sessions`: what every session received.
        #[serde(default)]
        sessions: Vec<SessionRecord>,
        /// With `record_ids`: the payload ids every device received.
        #[serde(default)]
        ids: Vec<IdRecord>,
    },
    Failed {
        message: String,
    },
}

/// Cumulative counters of one fleet (or, summed, of all).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// TCP (and TLS) connections attempted, and those that failed.
    pub connects: u64,
    pub connect_errors: u64,
    /// Fresh logins that succeeded, and logins refused (by code in `refusals`).
    pub logins: u64,
    pub refused: u64,
    /// Devices logged in right now.
    pub online: u64,
    /// Devices whose first login attempt is over (success or refusal).
    pub settled: u64,
    /// Unique pushes received, their payload bytes, and the newest arrival
    /// (unix nanoseconds).
    pub pushes: u64,
    pub push_bytes: u64,
    pub last_push_ns: u64,
    /// Pushes skipped over (a sequence number jumped) and seen twice.
    pub seq_gaps: u64,
    pub seq_dups: u64,
    /// Pushes received by slow devices (not in the latency histogram).
    pub slow_pushes: u64,
    pub uplinks_sent: u64,
    pub uplinks_acked: u64,
    pub uplink_errors: u64,
    pub resumes: u64,
    /// Resumes answered with CODE_RESUME_GAP, and the pushes they lost.
    pub resume_gaps: u64,
    pub resume_gap_msgs: u64,
    /// Resumes refused (expired or rejected): a new session started.
    pub resume_new: u64,
    /// Closes the device chose (churn) and connections lost unexpectedly.
    pub churns: u64,
    pub drops: u64,
    /// Slow devices whose connection the gateway ended (they do not resume,
    /// unless they stall: see `FleetSpec::slow_stall_ms`).
    pub slow_closed: u64,
    /// Reconnect storms a device took part in (dropped and resumed).
    #[serde(default)]
    pub storm_drops: u64,
    /// Session records cut short at `MAX_RANGES`.
    #[serde(default)]
    pub record_overflow: u64,
    /// QUIC endpoints the fleet holds, the rebinds done on them, and those
    /// that failed (the new socket could not be bound).
    #[serde(default)]
    pub endpoints: u64,
    #[serde(default)]
    pub rebinds: u64,
    #[serde(default)]
    pub rebind_errors: u64,
    /// With `--zero-rtt`: connections whose 0-RTT data the gateway
    /// accepted, refused, and connections made without a ticket to try.
    #[serde(default)]
    pub zero_rtt_accepted: u64,
    #[serde(default)]
    pub zero_rtt_refused: u64,
    #[serde(default)]
    pub zero_rtt_no_ticket: u64,
    /// Devices still running when the fleet reported its end (their
    /// session records are missing).
    #[serde(default)]
    pub unfinished: u64,
    /// With `record_ids`: pushes with a new seq whose payload id the device
    /// had received before (a duplicate the seqs do not show), and ids not
    /// kept past `MAX_IDS`.
    #[serde(default)]
    pub id_dups: u64,
    #[serde(default)]
    pub ids_overflow: u64,
    /// With `failover`: connections made to another gateway than the one
    /// before (after a drain, a lost connection or a failed connect).
    #[serde(default)]
    pub failovers: u64,
    /// Server Close and Error frames and login refusals, by code.
    #[serde(with = "code_map")]
    pub codes: BTreeMap<i32, u64>,
    /// The first few error messages.
    pub errors: Vec<String>,
}

impl Stats {
    /// Adds `o` into `self` (`online`/`settled` add too: they are per fleet).
    pub fn add(&mut self, o: &Stats) {
        self.connects += o.connects;
        self.connect_errors += o.connect_errors;
        self.logins += o.logins;
        self.refused += o.refused;
        self.online += o.online;
        self.settled += o.settled;
        self.pushes += o.pushes;
        self.push_bytes += o.push_bytes;
        self.last_push_ns = self.last_push_ns.max(o.last_push_ns);
        self.seq_gaps += o.seq_gaps;
        self.seq_dups += o.seq_dups;
        self.slow_pushes += o.slow_pushes;
        self.uplinks_sent += o.uplinks_sent;
        self.uplinks_acked += o.uplinks_acked;
        self.uplink_errors += o.uplink_errors;
        self.resumes += o.resumes;
        self.resume_gaps += o.resume_gaps;
        self.resume_gap_msgs += o.resume_gap_msgs;
        self.resume_new += o.resume_new;
        self.churns += o.churns;
        self.drops += o.drops;
        self.slow_closed += o.slow_closed;
        self.storm_drops += o.storm_drops;
        self.record_overflow += o.record_overflow;
        self.endpoints += o.endpoints;
        self.rebinds += o.rebinds;
        self.rebind_errors += o.rebind_errors;
        self.zero_rtt_accepted += o.zero_rtt_accepted;
        self.zero_rtt_refused += o.zero_rtt_refused;
        self.zero_rtt_no_ticket += o.zero_rtt_no_ticket;
        self.unfinished += o.unfinished;
        self.id_dups += o.id_dups;
        self.ids_overflow += o.ids_overflow;
        self.failovers += o.failovers;
        for (k, v) in &o.codes {
            *self.codes.entry(*k).or_default() += v;
        }
        for e in &o.errors {
            if self.errors.len() < MAX_ERRORS {
                self.errors.push(e.clone());
            }
        }
    }
}

const MAX_ERRORS: usize = 8;

/// Codes travel as `[[code, count], ...]`: JSON object keys are strings,
/// which would not read back as integers.
mod code_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<i32, u64>, s: S) -> Result<S::Ok, S::Error> {
        m.iter().collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<i32, u64>, D::Error> {
        Ok(Vec::<(i32, u64)>::deserialize(d)?.into_iter().collect())
    }
}

/// A histogram as (value, count) pairs, for the trip over JSON.
pub type Buckets = Vec<(u64, u64)>;

/// The fleet's latency histograms, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Hists {
    /// Connect + handshake + login, for fresh logins.
    pub login: Buckets,
    /// Connect + handshake + resume, after a reconnect.
    pub resume: Buckets,
    /// Push payload timestamp to arrival, fast devices.
    pub push: Buckets,
    /// Same, slow devices.
    pub push_slow: Buckets,
    /// Uplink written to SendAck read.
    pub uplink: Buckets,
}

/// A latency histogram: microseconds up to 10 minutes, 3 significant digits.
pub type Histogram = hdrhistogram::Histogram<u64>;

/// A new empty latency histogram.
pub fn histogram() -> Histogram {
    // Invariant: constant bounds that hdrhistogram accepts (low >= 1, high >= 2 low, 3 digits).
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid constant histogram bounds")
}

fn buckets(h: &Histogram) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds JSON buckets into a histogram.
pub fn merge(into: &mut Histogram, b: &Buckets) {
    for &(v, n) in b {
        let _ = into.record_n(v.min(600_000_000), n);
    }
}

/// Wall clock in nanoseconds; pushes carry their send time in their first 8
/// payload bytes.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs a fleet until [`Command::Stop`] (or until `commands` closes), sending
/// progress every `spec.progress_ms` ([`PROGRESS_MS`] by default).
pub async fn run(
    spec: FleetSpec,
    mut commands: mpsc::Receiver<Command>,
    reports: mpsc::Sender<Report>,
) {
    let tls = match &spec.tls {
        None => None,
        Some(t) => match tls_connector(t) {
            Ok(c) => Some(c),
            Err(e) => {
                let _ = reports.send(Report::Failed { message: e }).await;
                return;
            }
        },
    };
    let quic = match &spec.quic {
        None => None,
        Some(q) => {
            let v6 = spec.addrs.iter().any(SocketAddr::is_ipv6);
            match crate::quic::Endpoints::new(
                &q.ca,
                &q.server_name,
                q.endpoints,
                &spec.sources,
                spec.first,
                v6,
                q.zero_rtt,
            ) {
                Ok(e) => Some(e),
                Err(e) => {
                    let _ = reports.send(Report::Failed { message: e }).await;
                    return;
                }
            }
        }
    };
    let read_size = ((64usize << 20) / spec.count.max(1)).clamp(4096, 65536);
    let shared = Arc::new(Shared {
        read_size,
        spec,
        tls,
        quic,
        counters: Counters::default(),
        hists: Mutex::new(HistSet::default()),
        codes: Mutex::new(BTreeMap::new()),
        errors: Mutex::new(Vec::new()),
        records: Mutex::new(Vec::new()),
        ids: Mutex::new(Vec::new()),
        running: AtomicU64::new(0),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Run(0, 1000));
    let spawner = tokio::spawn(spawn_devices(shared.clone(), phase_rx));
    let every = match shared.spec.progress_ms {
        0 => PROGRESS_MS,
        ms => ms,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(every));
    // A busy thread skips reports rather than sending a burst of equal ones.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    let mut generation = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let stats = shared.snapshot();
                let msg = if !ready && stats.settled >= shared.spec.count as u64 {
                    ready = true;
                    Report::Ready { stats }
                } else {
                    Report::Progress { stats }
                };
                if reports.send(msg).await.is_err() {
                    break;
                }
            }
            c = commands.recv() => match c {
                Some(Command::Reconnect) => {
                    generation += 1;
                    let _ = phase_tx.send(Phase::Run(generation, 1000));
                }
                Some(Command::Storm { permille }) => {
                    generation += 1;
                    let _ = phase_tx.send(Phase::Run(generation, permille));
                }
                Some(Command::Rebind { spread_ms }) => {
                    tokio::spawn(rebind_all(shared.clone(), Duration::from_millis(spread_ms)));
                }
                Some(Command::Stop) | None => break,
            }
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    spawner.abort();
    // Devices notice Stop at their next poll; give them a moment to leave
    // (and to hand in their session records).
    let records = shared.spec.record_sessions || shared.spec.record_ids;
    let deadline = Instant::now() + Duration::from_secs(if records { 10 } else { 2 });
    while (shared.counters.online.load(Relaxed) > 0 || shared.running.load(Relaxed) > 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = shared.snapshot();
    let hists = shared.hists.lock().map(|h| h.export()).unwrap_or_default();
    let sessions = shared
        .records
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    let ids = shared
        .ids
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default();
    let _ = reports
        .send(Report::Done {
            stats,
            hists,
            sessions,
            ids,
        })
        .await;
}

/// Moves every QUIC endpoint to a new UDP socket, the moves spread evenly
/// over `spread` (all at once when zero).
async fn rebind_all(shared: Arc<Shared>, spread: Duration) {
    let Some(eps) = &shared.quic else { return };
    let n = eps.len();
    let start = Instant::now();
    for k in 0..n {
        tokio::time::sleep_until(start + spread.mul_f64(k as f64 / n as f64)).await;
        match eps.rebind(k) {
            Ok(()) => shared.counters.rebinds.fetch_add(1, Relaxed),
            Err(e) => {
                shared.error(format!("rebind: {e}"));
                shared.counters.rebind_errors.fetch_add(1, Relaxed)
            }
        };
    }
}

/// Raises the open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((_, hard)) => rlimit::increase_nofile_limit(hard).unwrap_or(0),
        Err(_) => 0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Connected devices stay; a new generation means that this many per
    /// mille of them (picked by [`storm_pick`]) reconnect now.
    Run(u32, u32),
    Stop,
}

/// Whether device `ix` takes part in storm `generation` of `permille`: a
/// hash, so each storm picks a different set of about that share.
fn storm_pick(ix: usize, generation: u32, permille: u32) -> bool {
    if permille >= 1000 {
        return true;
    }
    let h = ((ix as u64) ^ (u64::from(generation) << 40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) % 1000 < u64::from(permille)
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    connect_errors: AtomicU64,
    logins: AtomicU64,
    refused: AtomicU64,
    online: AtomicU64,
    settled: AtomicU64,
    pushes: AtomicU64,
    push_bytes: AtomicU64,
    last_push_ns: AtomicU64,
    seq_gaps: AtomicU64,
    seq_dups: AtomicU64,
    slow_pushes: AtomicU64,
    uplinks_sent: AtomicU64,
    uplinks_acked: AtomicU64,
    uplink_errors: AtomicU64,
    resumes: AtomicU64,
    resume_gaps: AtomicU64,
    resume_gap_msgs: AtomicU64,
    resume_new: AtomicU64,
    churns: AtomicU64,
    drops: AtomicU64,
    slow_closed: AtomicU64,
    storm_drops: AtomicU64,
    record_overflow: AtomicU64,
    rebinds: AtomicU64,
    rebind_errors: AtomicU64,
    id_dups: AtomicU64,
    ids_overflow: AtomicU64,
    failovers: AtomicU64,
}

#[derive(Default)]
struct HistSet {
    login: Option<Histogram>,
    resume: Option<Histogram>,
    push: Option<Histogram>,
    push_slow: Option<Histogram>,
    uplink: Option<Histogram>,
}

impl HistSet {
    fn export(&self) -> Hists {
        let b = |h: &Option<Histogram>| h.as_ref().map(buckets).unwrap_or_default();
        Hists {
            login: b(&self.login),
            resume: b(&self.resume),
            push: b(&self.push),
            push_slow: b(&self.push_slow),
            uplink: b(&self.uplink),
        }
    }
}

/// Records `us` into a lazily created histogram (one per fleet, not per
/// device: a histogram is ~100 KB).
fn record(h: &mut Option<Histogram>, us: u64) {
    let _ = h
        .get_or_insert_with(histogram)
        .record(us.clamp(1, 600_000_000));
}

struct Shared {
    spec: FleetSpec,
    /// Bytes a fast device reads at once: large when there are few devices
    /// (fewer system calls at millions of pushes per second), small when
    /// there are many (the buffer stays allocated).
    read_size: usize,
    tls: Option<(
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    )>,
    /// With QUIC: the endpoints the devices share.
    quic: Option<crate::quic::Endpoints>,
    counters: Counters,
    // std Mutex: held for a record() call, never across an await.
    hists: Mutex<HistSet>,
    codes: Mutex<BTreeMap<i32, u64>>,
    errors: Mutex<Vec<String>>,
    // std Mutex: held for a push, never across an await.
    records: Mutex<Vec<SessionRecord>>,
    ids: Mutex<Vec<IdRecord>>,
    /// Device tasks still running.
    running: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Relaxed);
        let zero_rtt = self
            .quic
            .as_ref()
            .map(crate::quic::Endpoints::zero_rtt_counts)
            .unwrap_or_default();
        Stats {
            connects: l(&c.connects),
            connect_errors: l(&c.connect_errors),
            logins: l(&c.logins),
            refused: l(&c.refused),
            online: l(&c.online),
            settled: l(&c.settled),
            pushes: l(&c.pushes),
            push_bytes: l(&c.push_bytes),
            last_push_ns: l(&c.last_push_ns),
            seq_gaps: l(&c.seq_gaps),
            seq_dups: l(&c.seq_dups),
            slow_pushes: l(&c.slow_pushes),
            uplinks_sent: l(&c.uplinks_sent),
            uplinks_acked: l(&c.uplinks_acked),
            uplink_errors: l(&c.uplink_errors),
            resumes: l(&c.resumes),
            resume_gaps: l(&c.resume_gaps),
            resume_gap_msgs: l(&c.resume_gap_msgs),
            resume_new: l(&c.resume_new),
            churns: l(&c.churns),
            drops: l(&c.drops),
            slow_closed: l(&c.slow_closed),
            storm_drops: l(&c.storm_drops),
            record_overflow: l(&c.record_overflow),
            endpoints: self.quic.as_ref().map_or(0, |q| q.len() as u64),
            rebinds: l(&c.rebinds),
            rebind_errors: l(&c.rebind_errors),
            zero_rtt_accepted: zero_rtt.accepted,
            zero_rtt_refused: zero_rtt.refused,
            zero_rtt_no_ticket: zero_rtt.no_ticket,
            unfinished: self.running.load(Relaxed),
            id_dups: l(&c.id_dups),
            ids_overflow: l(&c.ids_overflow),
            failovers: l(&c.failovers),
            codes: self.codes.lock().map(|m| m.clone()).unwrap_or_default(),
            errors: self.errors.lock().map(|m| m.clone()).unwrap_or_default(),
        }
    }

    fn code(&self, code: i32) {
        if let Ok(mut m) = self.codes.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    fn error(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < MAX_ERRORS {
                v.push(e);
            }
        }
    }

    fn hist(&self, f: impl FnOnce(&mut HistSet)) {
        if let Ok(mut h) = self.hists.lock() {
            f(&mut h);
        }
    }
}

fn tls_connector(
    t: &TlsSpec,
) -> Result<
    (
        tokio_rustls::TlsConnector,
        tokio_rustls::rustls::pki_types::ServerName<'static>,
    ),
    String,
> {
    let cfg = tether::tls::client_config_pinned(&t.ca).map_err(|e| e.to_string())?;
    let name = tether::tls::server_name(&t.server_name)?;
    Ok((tokio_rustls::TlsConnector::from(cfg), name))
}

/// Starts the devices at the fleet's rate, in 10 ms steps (timers are too
/// coarse for per-device gaps).
async fn spawn_devices(shared: Arc<Shared>, phase: watch::Receiver<Phase>) {
    let spec = &shared.spec;
    let per_step = if spec.rate > 0.0 {
        ((spec.rate / 100.0).round() as usize).max(1)
    } else {
        usize::MAX
    };
    for k in 0..spec.count {
        // Detached: each device ends by itself on Phase::Stop.
        tokio::spawn(device(spec.first + k, shared.clone(), phase.clone()));
        if (k + 1) % per_step == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A device's connection: TCP, TLS over TCP, WebSocket over either, or
/// QUIC (both of the gateway's streams merged, see
/// [`crate::quic::QuicIo`]).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {
    /// Drops the connection as a device that lost its network would: no
    /// Close frame, no orderly end.
    fn abort(self: Box<Self>);
}

/// Over TCP an abort is an RST, not a FIN handshake, so no TIME_WAIT entry
/// either: a storm of reconnects would otherwise exhaust the ephemeral ports
/// of one source address, and the kernel's port search gets slow long before.
fn reset(tcp: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

impl Io for tokio::net::TcpStream {
    fn abort(self: Box<Self>) {
        reset(&self);
    }
}

impl Io for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    fn abort(self: Box<Self>) {
        reset(self.get_ref().0);
    }
}

/// WebSocket, framed by hand with the gateway's own codec
/// (`tether::ws_client`): masked, and no buffer while idle, for thousands of
/// connections per process.
impl Io for tether::ws_client::WsClientIo<tokio::net::TcpStream> {
    fn abort(self: Box<Self>) {
        reset(self.get_ref());
    }
}

impl Io for tether::ws_client::WsClientIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    fn abort(self: Box<Self>) {
        reset(self.get_ref().get_ref().0);
    }
}

/// The WebSocket upgrade over a connected stream, within 10 s.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    host: String,
) -> std::io::Result<tether::ws_client::WsClientIo<S>> {
    let req = tether::ws_client::WsRequest { host, origin: None };
    tokio::time::timeout(
        Duration::from_secs(10),
        tether::ws_client::WsClientIo::connect(s, &req),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "WebSocket upgrade timed out"))?
}

impl Io for crate::quic::QuicIo {
    /// quinn sends a CONNECTION_CLOSE (see [`crate::quic::QuicIo::abort`]).
    fn abort(self: Box<Self>) {
        crate::quic::QuicIo::abort(&self);
    }
}

/// Says goodbye: a Close frame, then the orderly end of the connection
/// (over QUIC: until the gateway closed it, or 2 s).
async fn goodbye(mut conn: Box<dyn Io>) {
    if write_frame(&mut conn, close_frame()).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
    }
}

/// Why a connection ended.
enum End {
    Stop,
    Reconnect,
    Churn,
    /// The gateway closed the session with this code.
    Closed(i32),
    Lost(String),
}

/// What a device keeps across connections to resume its session.
struct Resumable {
    session_id: u64,
    token: bytes::Bytes,
}

/// One device's delivery state.
struct Device {
    /// Global index.
    ix: usize,
    user: String,
    device: String,
    slow: bool,
    /// Highest in-order seq per lane (interactive, bulk), and what was acked.
    seq: [u64; 2],
    acked: [u64; 2],
    session: Option<Resumable>,
    uplink_no: u64,
    /// Uplinks waiting for their SendAck: (id, sent at).
    inflight: VecDeque<(u64, Instant)>,
    rng: u64,
    /// With `record_sessions`: the seqs this session received, per lane.
    recv: [Vec<(u64, u64)>; 2],
    /// When this session says goodbye (with `churn_ms`), and whether one
    /// did before.
    churn_at: Option<Instant>,
    churned: bool,
    /// With `record_ids`: the payload ids received.
    ids: std::collections::HashSet<u64>,
    /// With `failover`: how many addresses on from its own the device
    /// connects to, and where and when a draining Close said to reconnect.
    hop: usize,
    redirect: Option<SocketAddr>,
    reconnect_after_ms: u32,
    /// With `failover`: other gateways tried at once since the last
    /// backoff (see [`Device::retry_pause`]).
    quick_tries: usize,
}

impl Device {
    fn next_rand(&mut self) -> u64 {
        // xorshift64: per-device jitter without a shared generator.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// A duration around `ms` (±50%).
    fn jitter(&mut self, ms: u64) -> Duration {
        let ms = ms.max(1);
        Duration::from_millis(ms / 2 + self.next_rand() % ms)
    }

    /// The gateway address to connect to next: where a draining Close
    /// said, else the device's own (`ix mod n`), `hop` addresses on.
    fn addr(&mut self, spec: &FleetSpec) -> Option<SocketAddr> {
        if let Some(a) = self.redirect.take() {
            return Some(a);
        }
        let n = spec.addrs.len();
        spec.addrs.get((self.ix + self.hop) % n.max(1)).copied()
    }

    /// With `failover`: the next connection goes to another gateway, one
    /// picked at random (as a client behind a load balancer would land), so
    /// that the devices of a gateway that drains spread over the others
    /// instead of all landing on its neighbour.
    fn fail_over(&mut self, shared: &Shared) {
        if self.hop_on(shared.spec.failover, shared.spec.addrs.len()) {
            shared.counters.failovers.fetch_add(1, Relaxed);
        }
    }

    /// [`Device::fail_over`]'s rule, over `n` gateways: moves `hop` on by
    /// 1 to n - 1 (never back to the same gateway); true when it moved.
    fn hop_on(&mut self, failover: bool, n: usize) -> bool {
        if !failover || n < 2 {
            return false;
        }
        self.hop += 1 + (self.next_rand() % (n as u64 - 1)) as usize;
        true
    }

    /// How long to wait after a failed connect or a refused login. With
    /// `failover` the device has moved on to another gateway, and tries it
    /// at once (25 to 75 ms): a client with a list of endpoints tries the
    /// next when one is down, draining or full, and waiting seconds each
    /// time let sessions outlive their drain. Once it has tried every other
    /// gateway that way, it backs off (`backoff`, doubled each time up to
    /// 5 s), then tries them all again.
    fn retry_pause(&mut self, shared: &Shared, backoff: &mut Duration) -> Duration {
        self.pause_over(shared.spec.failover, shared.spec.addrs.len(), backoff)
    }

    /// [`Device::retry_pause`]'s rule, over `n` gateways.
    fn pause_over(&mut self, failover: bool, n: usize, backoff: &mut Duration) -> Duration {
        if failover && n > 1 && self.quick_tries < n - 1 {
            self.quick_tries += 1;
            return self.jitter(50);
        }
        self.quick_tries = 0;
        self.back_off(backoff)
    }

    /// A pause around `backoff`, which doubles for next time (up to 5 s).
    fn back_off(&mut self, backoff: &mut Duration) -> Duration {
        let pause = self.jitter(backoff.as_millis() as u64);
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        pause
    }

    /// How long to wait before reconnecting after a draining Close: its
    /// `reconnect_after_ms` plus up to half of it again (at most 10 s), or
    /// about 200 ms when it names none.
    fn drain_delay(&mut self) -> Duration {
        match u64::from(std::mem::take(&mut self.reconnect_after_ms)).min(10_000) {
            0 => self.jitter(200),
            ms => Duration::from_millis(ms + self.next_rand() % (ms / 2 + 1)),
        }
    }

    /// Notes a payload id received with a new seq; false when the device
    /// had it already.
    fn note_id(&mut self, shared: &Shared, id: u64) -> bool {
        if self.ids.contains(&id) {
            return false;
        }
        if self.ids.len() < MAX_IDS {
            self.ids.insert(id);
        } else {
            shared.counters.ids_overflow.fetch_add(1, Relaxed);
        }
        true
    }

    /// Notes a push received (not a duplicate) in the session's record.
    fn note(&mut self, shared: &Shared, lane: usize, seq: u64) {
        if !shared.spec.record_sessions {
            return;
        }
        let r = &mut self.recv[lane];
        if let Some(last) = r.last_mut().filter(|l| l.1 + 1 == seq) {
            last.1 = seq;
        } else if r.len() < MAX_RANGES {
            r.push((seq, seq));
        } else {
            shared.counters.record_overflow.fetch_add(1, Relaxed);
        }
    }

    /// Hands the current session's record in (the session ended, or this
    /// device stops).
    fn end_record(&mut self, shared: &Shared) {
        let lanes = std::mem::take(&mut self.recv);
        let Some(s) = &self.session else { return };
        if !shared.spec.record_sessions || lanes.iter().all(Vec::is_empty) {
            return;
        }
        if let Ok(mut r) = shared.records.lock() {
            r.push(SessionRecord {
                session: s.session_id,
                lanes,
            });
        }
    }
}

impl Device {
    /// Device `ix` of `spec`, not connected yet.
    fn new(ix: usize, spec: &FleetSpec) -> Self {
        Device {
            ix,
            user: format!("{}{ix}", spec.prefix),
            device: format!("d{ix}"),
            slow: spec.slow_every > 0 && ix.is_multiple_of(spec.slow_every),
            seq: [0; 2],
            acked: [0; 2],
            session: None,
            uplink_no: 0,
            inflight: VecDeque::new(),
            rng: 0x9e37_79b9_7f4a_7c15 ^ (ix as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
            recv: Default::default(),
            churn_at: None,
            churned: false,
            ids: Default::default(),
            hop: 0,
            redirect: None,
            reconnect_after_ms: 0,
            quick_tries: 0,
        }
    }
}

async fn device(ix: usize, shared: Arc<Shared>, phase: watch::Receiver<Phase>) {
    shared.running.fetch_add(1, Relaxed);
    let spec = &shared.spec;
    let mut d = Device::new(ix, spec);
    if shared.spec.redis.is_some() {
        redis::device_loop(ix, &shared, &mut d, phase).await;
    } else {
        device_loop(ix, &shared, &mut d, phase).await;
    }
    d.end_record(&shared);
    if shared.spec.record_ids {
        let mut ids: Vec<u64> = std::mem::take(&mut d.ids).into_iter().collect();
        ids.sort_unstable();
        if let Ok(mut r) = shared.ids.lock() {
            r.push(IdRecord { device: ix, ids });
        }
    }
    shared.running.fetch_sub(1, Relaxed);
}

async fn device_loop(
    ix: usize,
    shared: &Shared,
    d: &mut Device,
    mut phase: watch::Receiver<Phase>,
) {
    let spec = &shared.spec;
    let stall = d.slow && spec.slow_stall_ms > 0;
    let mut settled = false;
    let mut backoff = Duration::from_millis(100);
    let mut generation = match *phase.borrow_and_update() {
        Phase::Run(g, _) => g,
        Phase::Stop => return,
    };
    loop {
        let resuming = d.session.is_some();
        let started = Instant::now();
        let addr = d.addr(spec);
        let conn = tokio::select! {
            c = connect_to(shared, ix, addr) => c,
            _ = phase.wait_for(|p| *p == Phase::Stop) => return,
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                shared.counters.connect_errors.fetch_add(1, Relaxed);
                shared.error(format!("connect: {e}"));
                d.fail_over(shared);
                if !settled {
                    settled = true;
                    shared.counters.settled.fetch_add(1, Relaxed);
                }
                let pause = d.retry_pause(shared, &mut backoff);
                if sleep_or_stop(&mut phase, pause).await {
                    return;
                }
                continue;
            }
        };
        let mut rbuf = BytesMut::with_capacity(if d.slow { 1024 } else { shared.read_size });
        let login = tokio::select! {
            r = login(shared, d, &mut conn, &mut rbuf) => r,
            _ = phase.wait_for(|p| *p == Phase::Stop) => return,
        };
        if !settled {
            settled = true;
            shared.counters.settled.fetch_add(1, Relaxed);
        }
        match login {
            Ok(ok) => {
                backoff = Duration::from_millis(100);
                d.quick_tries = 0;
                let us = started.elapsed().as_micros() as u64;
                let c = &shared.counters;
                if resuming {
                    c.resumes.fetch_add(1, Relaxed);
                    shared.hist(|h| record(&mut h.resume, us));
                } else {
                    c.logins.fetch_add(1, Relaxed);
                    shared.hist(|h| record(&mut h.login, us));
                }
                if d.session.as_ref().map(|s| s.session_id) != Some(ok.session_id) {
                    d.end_record(shared);
                }
                d.session = Some(Resumable {
                    session_id: ok.session_id,
                    token: ok.resume_token.clone(),
                });
                let ping = spec.ping_ms.map(Duration::from_millis).unwrap_or_else(|| {
                    Duration::from_millis(u64::from(ok.heartbeat_interval_ms.max(1000)))
                });
                c.online.fetch_add(1, Relaxed);
                let end = session(shared, d, &mut conn, rbuf, ping, &mut phase, generation).await;
                c.online.fetch_sub(1, Relaxed);
                d.inflight.clear();
                match end {
                    End::Stop => {
                        goodbye(conn).await;
                        return;
                    }
                    End::Reconnect => {
                        if let Phase::Run(g, _) = *phase.borrow() {
                            generation = g;
                        }
                        c.storm_drops.fetch_add(1, Relaxed);
                        conn.abort();
                    }
                    End::Churn => {
                        c.churns.fetch_add(1, Relaxed);
                        goodbye(conn).await;
                        d.end_record(shared);
                        d.session = None;
                        d.churn_at = None;
                        d.churned = true;
                        d.seq = [0; 2];
                        d.acked = [0; 2];
                    }
                    End::Closed(code) => {
                        shared.code(code);
                        if d.slow {
                            c.slow_closed.fetch_add(1, Relaxed);
                            if !stall {
                                return;
                            }
                        }
                        if !resumable_close(code) {
                            return;
                        }
                        let pause = if code == pb::Code::ServerDraining as i32 && spec.failover {
                            d.fail_over(shared);
                            d.drain_delay()
                        } else {
                            d.jitter(200)
                        };
                        if sleep_or_stop(&mut phase, pause).await {
                            return;
                        }
                    }
                    End::Lost(_) if d.slow => {
                        // The gateway cut it off (its Close sat behind unread pushes).
                        c.slow_closed.fetch_add(1, Relaxed);
                        if !stall || sleep_or_stop(&mut phase, d.jitter(200)).await {
                            return;
                        }
                    }
                    End::Lost(e) => {
                        c.drops.fetch_add(1, Relaxed);
                        shared.error(format!("connection lost: {e}"));
                        d.fail_over(shared);
                        if sleep_or_stop(&mut phase, d.jitter(200)).await {
                            return;
                        }
                    }
                }
            }
            Err(LoginFail::Refused { code, retry }) => {
                shared.counters.refused.fetch_add(1, Relaxed);
                shared.code(code);
                if !retry {
                    shared.error(format!("login refused with code {code}"));
                    return;
                }
                let pause = if code == pb::Code::ServerDraining as i32
                    || code == pb::Code::TooManyConnections as i32
                {
                    d.fail_over(shared);
                    d.retry_pause(shared, &mut backoff)
                } else {
                    d.back_off(&mut backoff)
                };
                if sleep_or_stop(&mut phase, pause).await {
                    return;
                }
            }
            Err(LoginFail::Io(e)) => {
                shared.counters.connect_errors.fetch_add(1, Relaxed);
                shared.error(format!("login: {e}"));
                d.fail_over(shared);
                let pause = d.retry_pause(shared, &mut backoff);
                if sleep_or_stop(&mut phase, pause).await {
                    return;
                }
            }
        }
    }
}

/// Closes after which a real client resumes its session: those that keep
/// it (PROTOCOL.md section 11.8: a slow consumer, a heartbeat or an ack
/// timeout), and a drain (whose resume finds the session ended and starts
/// a new one).
fn resumable_close(code: i32) -> bool {
    pb::Code::try_from(code)
        .is_ok_and(|c| tether::session::keeps_state(c) || c == pb::Code::ServerDraining)
}

/// Sleeps `d`; true if the fleet stopped meanwhile.
async fn sleep_or_stop(phase: &mut watch::Receiver<Phase>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = phase.wait_for(|p| *p == Phase::Stop) => return true,
    }
    *phase.borrow() == Phase::Stop
}

async fn connect(shared: &Shared, ix: usize) -> std::io::Result<Box<dyn Io>> {
    let spec = &shared.spec;
    connect_to(
        shared,
        ix,
        spec.addrs.get(ix % spec.addrs.len().max(1)).copied(),
    )
    .await
}

/// Connects device `ix` to `addr`.
async fn connect_to(
    shared: &Shared,
    ix: usize,
    addr: Option<SocketAddr>,
) -> std::io::Result<Box<dyn Io>> {
    let spec = &shared.spec;
    shared.counters.connects.fetch_add(1, Relaxed);
    let addr = addr.ok_or_else(|| std::io::Error::other("no gateway address"))?;
    if let Some(q) = &shared.quic {
        // The fleet's k-th device, so that devices spread over endpoints.
        return Ok(Box::new(q.connect(ix - spec.first, addr).await?));
    }
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if !spec.sources.is_empty() {
        sock.bind(SocketAddr::new(spec.sources[ix % spec.sources.len()], 0))?;
    }
    if spec.slow_rcvbuf > 0 && spec.slow_every > 0 && ix.is_multiple_of(spec.slow_every) {
        // Before connect, so the window the gateway sees is small from the start.
        sock.set_recv_buffer_size(spec.slow_rcvbuf as u32)?;
    }
    let s = tokio::time::timeout(Duration::from_secs(10), sock.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    match &shared.tls {
        None if spec.ws => Ok(Box::new(upgrade(s, addr.to_string()).await?)),
        None => Ok(Box::new(s)),
        Some((c, name)) => {
            let t = tokio::time::timeout(Duration::from_secs(10), c.connect(name.clone(), s))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                })??;
            if spec.ws {
                let host = spec
                    .tls
                    .as_ref()
                    .map_or_else(|| addr.to_string(), |t| t.server_name.clone());
                return Ok(Box::new(upgrade(t, host).await?));
            }
            Ok(Box::new(t))
        }
    }
}

enum LoginFail {
    Refused { code: i32, retry: bool },
    Io(std::io::Error),
}

impl From<std::io::Error> for LoginFail {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Logs in (or resumes); on success `rbuf` may already hold pushes.
async fn login(
    shared: &Shared,
    d: &mut Device,
    conn: &mut Box<dyn Io>,
    rbuf: &mut BytesMut,
) -> Result<pb::LoginOk, LoginFail> {
    let token = tether::auth::mint_hs256(
        &shared.spec.secret,
        &d.user,
        None,
        Duration::from_secs(86_400),
        shared
            .spec
            .room
            .iter()
            .cloned()
            .chain((shared.spec.rooms > 0).then(|| format!("r{}", d.ix % shared.spec.rooms)))
            .collect(),
    )
    .map_err(|e| LoginFail::Io(std::io::Error::other(e.to_string())))?;
    let resume = d.session.as_ref().map(|s| pb::Resume {
        session_id: s.session_id,
        resume_token: s.token.clone(),
        last_seq: d.seq[0],
        last_bulk_seq: d.seq[1],
    });
    let frame = pb::ClientFrame {
        request_id: 1,
        body: Some(pb::client_frame::Body::Login(pb::Login {
            token,
            device_id: d.device.clone(),
            platform: pb::Platform::Android as i32,
            protocol_version: 1,
            resume,
        })),
    };
    write_frame(conn, frame).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(f) = take_frame(rbuf).map_err(LoginFail::Io)? {
            let f = pb::ServerFrame::decode(&f[..])
                .map_err(|e| LoginFail::Io(std::io::Error::other(e.to_string())))?;
            match f.body {
                Some(pb::server_frame::Body::LoginOk(ok)) => {
                    after_login(shared, d, &ok);
                    return Ok(ok);
                }
                Some(pb::server_frame::Body::Close(c)) => {
                    return Err(LoginFail::Refused {
                        code: c.code,
                        retry: retry_login(c.code),
                    })
                }
                Some(pb::server_frame::Body::Error(e)) => {
                    return Err(LoginFail::Refused {
                        code: e.code,
                        retry: retry_login(e.code),
                    })
                }
                _ => continue,
            }
        }
        rbuf.reserve(1024);
        let n = tokio::time::timeout_at(deadline, conn.read_buf(rbuf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no login reply"))??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed during login",
            )
            .into());
        }
    }
}

/// Refusals after which a device tries again later (load shedding).
fn retry_login(code: i32) -> bool {
    use pb::Code;
    [
        Code::RateLimited,
        Code::TooManyConnections,
        Code::ServerDraining,
    ]
    .iter()
    .any(|c| *c as i32 == code)
}

/// Applies a LoginOk's resume outcome to the device's sequence state.
fn after_login(shared: &Shared, d: &mut Device, ok: &pb::LoginOk) {
    let c = &shared.counters;
    match &ok.resume {
        None => {
            d.seq = [0; 2];
            d.acked = [0; 2];
        }
        Some(r) if r.code == pb::Code::Ok as i32 => {}
        Some(r) if r.code == pb::Code::ResumeGap as i32 => {
            c.resume_gaps.fetch_add(1, Relaxed);
            let firsts = [r.first_seq, r.first_bulk_seq];
            for (seq, first) in d.seq.iter_mut().zip(firsts) {
                if first > *seq + 1 {
                    c.resume_gap_msgs.fetch_add(first - *seq - 1, Relaxed);
                    *seq = first - 1;
                }
            }
            d.acked = d.seq;
        }
        Some(r) => {
            c.resume_new.fetch_add(1, Relaxed);
            shared.code(r.code);
            d.seq = [0; 2];
            d.acked = [0; 2];
        }
    }
}

/// Splits one whole frame (without its length prefix) off `rbuf`: the
/// gateway's own codec, with its error as an I/O error.
fn take_frame(rbuf: &mut BytesMut) -> std::io::Result<Option<bytes::Bytes>> {
    tether::wire::decode_frame(rbuf, MAX_FRAME).map_err(std::io::Error::other)
}

const MAX_FRAME: usize = 16 << 20;
/// Uplinks a device keeps unanswered before it skips a send.
const MAX_UPLINKS_INFLIGHT: usize = 256;

async fn write_frame(conn: &mut Box<dyn Io>, f: pb::ClientFrame) -> std::io::Result<()> {
    conn.write_all(&tether::wire::frame_bytes(&f)).await?;
    conn.flush().await
}

fn close_frame() -> pb::ClientFrame {
    pb::ClientFrame {
        request_id: 0,
        body: Some(pb::client_frame::Body::Close(pb::Close {
            code: pb::Code::NormalClose as i32,
            ..Default::default()
        })),
    }
}

/// The logged-in loop of one connection.
#[allow(clippy::too_many_arguments)]
async fn session(
    shared: &Shared,
    d: &mut Device,
    conn: &mut Box<dyn Io>,
    mut rbuf: BytesMut,
    ping: Duration,
    phase: &mut watch::Receiver<Phase>,
    mut generation: u32,
) -> End {
    let spec = &shared.spec;
    if !d.slow {
        // What the login left: nothing, mostly; no buffer until traffic.
        release_idle(&mut rbuf, 0);
    }
    let rooms = spec
        .room
        .iter()
        .cloned()
        .chain((spec.rooms > 0).then(|| format!("r{}", d.ix % spec.rooms)));
    for (rid, room) in (2..).zip(rooms) {
        let join = pb::ClientFrame {
            request_id: rid,
            body: Some(pb::client_frame::Body::Join(pb::Join { room })),
        };
        if let Err(e) = write_frame(conn, join).await {
            return End::Lost(e.to_string());
        }
    }
    let far = Instant::now() + Duration::from_secs(86_400 * 365);
    let ping_at = tokio::time::sleep(ping);
    let ack_at = tokio::time::sleep_until(far);
    let uplink_every = Duration::from_millis(spec.uplink_ms.max(1));
    let uplink_at = tokio::time::sleep(if spec.uplink_ms > 0 {
        d.jitter(spec.uplink_ms)
    } else {
        far - Instant::now()
    });
    // The session's end is set once per session and kept across resumes,
    // so that reconnects do not postpone it.
    // A device's first session lives 0 to 2x churn_ms, so that goodbyes come
    // at a steady rate from the start; later ones churn_ms ±50%.
    let churn_deadline = if spec.churn_ms > 0 {
        let life = if d.churned {
            d.jitter(spec.churn_ms)
        } else {
            Duration::from_millis(d.next_rand() % (2 * spec.churn_ms))
        };
        *d.churn_at.get_or_insert_with(|| Instant::now() + life)
    } else {
        far
    };
    let churn_at = tokio::time::sleep_until(churn_deadline);
    // A stalling slow device reads nothing until `stall_at`, then reads for
    // SLOW_READ_MS, and so on.
    let mut stalled = d.slow && spec.slow_stall_ms > 0;
    let stall_at = tokio::time::sleep(if stalled {
        Duration::from_millis(spec.slow_stall_ms)
    } else {
        far - Instant::now()
    });
    tokio::pin!(ping_at, ack_at, uplink_at, churn_at, stall_at);
    let mut ack_armed = false;
    // Pushes that arrived with the LoginOk (a resume's replay), acked as
    // those of any read: when nothing follows the replay, no later read
    // would ack it, and the gateway would close the connection for its
    // ack timeout.
    if !rbuf.is_empty() {
        if let Some(end) = handle_frames(shared, d, &mut rbuf) {
            return end;
        }
        match ack_due(d, spec.ack_every) {
            AckDue::Now => {
                if let Err(e) = send_acks(conn, d).await {
                    return End::Lost(e.to_string());
                }
            }
            AckDue::Later => {
                ack_at
                    .as_mut()
                    .reset(Instant::now() + d.jitter(spec.ack_delay_ms));
                ack_armed = true;
            }
            AckDue::No => {}
        }
    }
    loop {
        tokio::select! {
            r = phase.changed() => {
                match (r, *phase.borrow()) {
                    (Err(_), _) | (_, Phase::Stop) => return End::Stop,
                    (_, Phase::Run(g, permille)) if g != generation => {
                        generation = g;
                        if storm_pick(d.ix, g, permille) {
                            return End::Reconnect;
                        }
                    }
                    _ => {}
                }
            }
            _ = &mut stall_at => {
                let next = if stalled { SLOW_READ_MS } else { spec.slow_stall_ms };
                stalled = !stalled;
                stall_at.as_mut().reset(Instant::now() + Duration::from_millis(next));
            }
            r = read_some(conn, &mut rbuf, d.slow && !stalled_mode(spec), shared.read_size), if !stalled => {
                match r {
                    Ok(0) => return End::Lost("closed by the gateway".into()),
                    Ok(n) => {
                        if let Some(end) = handle_frames(shared, d, &mut rbuf) {
                            return end;
                        }
                        if !d.slow {
                            release_idle(&mut rbuf, n);
                        }
                        if d.slow && !stalled_mode(spec) && spec.slow_bps > 0 {
                            // Reading slowly is the point: this device stalls here.
                            tokio::time::sleep(Duration::from_secs_f64(n as f64 / spec.slow_bps as f64)).await;
                        }
                        match ack_due(d, spec.ack_every) {
                            AckDue::Now => {
                                if let Err(e) = send_acks(conn, d).await {
                                    return End::Lost(e.to_string());
                                }
                            }
                            AckDue::Later if !ack_armed => {
                                // Jittered: after a stall, the devices read in
                                // one pass would otherwise all ack in one later
                                // millisecond, and that burst of writes stalls
                                // this thread again: an echo every ack delay.
                                ack_at.as_mut().reset(Instant::now() + d.jitter(spec.ack_delay_ms));
                                ack_armed = true;
                            }
                            AckDue::Later | AckDue::No => {}
                        }
                    }
                    Err(e) => return End::Lost(e.to_string()),
                }
            }
            _ = &mut ack_at, if ack_armed => {
                ack_armed = false;
                ack_at.as_mut().reset(far);
                if let Err(e) = send_acks(conn, d).await {
                    return End::Lost(e.to_string());
                }
            }
            _ = &mut ping_at => {
                ping_at.as_mut().reset(Instant::now() + ping);
                let f = pb::ClientFrame {
                    request_id: 0,
                    body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 0 })),
                };
                if let Err(e) = write_frame(conn, f).await {
                    return End::Lost(e.to_string());
                }
            }
            _ = &mut uplink_at => {
                uplink_at.as_mut().reset(Instant::now() + uplink_every);
                if d.inflight.len() < MAX_UPLINKS_INFLIGHT {
                    d.uplink_no += 1;
                    let mut payload = vec![b'u'; spec.uplink_size.max(8)];
                    payload[..8].copy_from_slice(&unix_nanos().to_le_bytes());
                    let f = pb::ClientFrame {
                        request_id: 0,
                        body: Some(pb::client_frame::Body::Send(pb::Send {
                            client_msg_id: d.uplink_no.to_string(),
                            route: "load".into(),
                            payload: payload.into(),
                        })),
                    };
                    d.inflight.push_back((d.uplink_no, Instant::now()));
                    shared.counters.uplinks_sent.fetch_add(1, Relaxed);
                    if let Err(e) = write_frame(conn, f).await {
                        return End::Lost(e.to_string());
                    }
                }
            }
            _ = &mut churn_at => return End::Churn,
        }
    }
}

/// Whether slow devices stall (rather than read at `slow_bps`).
fn stalled_mode(spec: &FleetSpec) -> bool {
    spec.slow_stall_ms > 0
}

/// Reads what is there into `rbuf` (at most 1 KiB at a time when slow).
///
/// # Cancel safety
/// `read_buf` is cancel safe: a cancelled read consumed nothing.
async fn read_some(
    conn: &mut Box<dyn Io>,
    rbuf: &mut BytesMut,
    slow: bool,
    read_size: usize,
) -> std::io::Result<usize> {
    if slow {
        rbuf.reserve(1024);
        let mut limited = (&mut *conn).take(1024);
        limited.read_buf(rbuf).await
    } else if rbuf.capacity() == 0 {
        // Idle (see `release_idle`): wait on a stack buffer, so that a
        // device between heartbeats holds no read buffer. A heartbeat's
        // answer fits; a full one means traffic, and the next read takes
        // a buffer of `read_size`.
        let mut small = [0u8; SMALL_READ];
        let n = conn.read(&mut small).await?;
        rbuf.extend_from_slice(&small[..n]);
        Ok(n)
    } else {
        rbuf.reserve(read_size);
        conn.read_buf(rbuf).await
    }
}

/// What a device reads into its stack while idle ([`read_some`]).
const SMALL_READ: usize = 256;

/// Gives back the read buffer once everything in it was handled and the
/// last read was small: a device that is mostly idle (a million of them)
/// then holds no buffer, and one that receives a flood keeps its buffer.
fn release_idle(rbuf: &mut BytesMut, last_read: usize) {
    if rbuf.is_empty() && last_read < SMALL_READ && rbuf.capacity() > 0 {
        *rbuf = BytesMut::new();
    }
}

/// Handles every whole frame in `rbuf`; `Some` when the connection must end.
fn handle_frames(shared: &Shared, d: &mut Device, rbuf: &mut BytesMut) -> Option<End> {
    let c = &shared.counters;
    let mut arrivals = Arrivals::new();
    // Frames are read in place and the buffer advanced once: at millions of
    // pushes per second the load side must stay cheaper than the gateway.
    let mut pos = 0;
    let buf = &rbuf[..];
    // Set when the connection must end; the pushes before it still count.
    let mut end = None;
    loop {
        let total = match tether::wire::frame_len(&buf[pos..], MAX_FRAME) {
            Ok(Some(total)) if buf.len() - pos >= total => total,
            Ok(_) => break,
            Err(e) => {
                end = Some(End::Lost(e.to_string()));
                break;
            }
        };
        let f = &buf[pos + 4..pos + total];
        pos += total;
        if let Some(p) = parse_push(f) {
            let lane = usize::from(p.lane == 1);
            let last = d.seq[lane];
            if p.seq <= last {
                c.seq_dups.fetch_add(1, Relaxed);
                continue;
            }
            if p.seq > last + 1 {
                c.seq_gaps.fetch_add(p.seq - last - 1, Relaxed);
            }
            d.seq[lane] = p.seq;
            d.note(shared, lane, p.seq);
            if shared.spec.record_ids {
                if let Some(id) = p.id {
                    if !d.note_id(shared, id) {
                        c.id_dups.fetch_add(1, Relaxed);
                    }
                }
            }
            arrivals.push(shared, d.slow, p.payload_len, p.sent_ns);
            continue;
        }
        match pb::ServerFrame::decode(f).map(|f| f.body) {
            Ok(Some(pb::server_frame::Body::SendAck(a))) => {
                if a.code != pb::Code::Ok as i32 {
                    c.uplink_errors.fetch_add(1, Relaxed);
                    shared.code(a.code);
                }
                let id: u64 = a.client_msg_id.parse().unwrap_or(0);
                while let Some(&(front, at)) = d.inflight.front() {
                    if front > id {
                        break;
                    }
                    d.inflight.pop_front();
                    if front == id {
                        if a.code == pb::Code::Ok as i32 {
                            c.uplinks_acked.fetch_add(1, Relaxed);
                        }
                        let us = at.elapsed().as_micros() as u64;
                        shared.hist(|h| record(&mut h.uplink, us));
                    }
                }
            }
            Ok(Some(pb::server_frame::Body::Close(cl))) => {
                d.reconnect_after_ms = cl.reconnect_after_ms;
                d.redirect = cl.reconnect_to.parse().ok();
                end = Some(End::Closed(cl.code));
                break;
            }
            Ok(Some(pb::server_frame::Body::Error(e))) => shared.code(e.code),
            Ok(_) => {}
            Err(e) => {
                end = Some(End::Lost(format!("undecodable frame: {e}")));
                break;
            }
        }
    }
    rbuf.advance(pos);
    arrivals.finish(shared, d.slow);
    end
}

/// The pushes of one pass over a device's read buffer: counted, and their
/// latencies recorded, once at the end of the pass (one lock, a few atomic
/// adds), whichever server they came from.
struct Arrivals {
    now_ns: u64,
    latencies: [u64; 64],
    nlat: usize,
    fresh: u64,
    bytes: u64,
}

impl Arrivals {
    fn new() -> Self {
        Self {
            now_ns: unix_nanos(),
            latencies: [0; 64],
            nlat: 0,
            fresh: 0,
            bytes: 0,
        }
    }

    /// One push received, with `len` payload bytes and the send time its
    /// payload carries.
    fn push(&mut self, shared: &Shared, slow: bool, len: usize, sent_ns: Option<u64>) {
        self.fresh += 1;
        self.bytes += len as u64;
        if let Some(ts) = sent_ns {
            if self.nlat == self.latencies.len() {
                record_latencies(shared, slow, &self.latencies);
                self.nlat = 0;
            }
            self.latencies[self.nlat] = self.now_ns.saturating_sub(ts) / 1000;
            self.nlat += 1;
        }
    }

    /// Adds the pass's pushes to the fleet's counters and histograms.
    fn finish(self, shared: &Shared, slow: bool) {
        if self.fresh == 0 {
            return;
        }
        let c = &shared.counters;
        if slow {
            c.slow_pushes.fetch_add(self.fresh, Relaxed);
        } else {
            c.pushes.fetch_add(self.fresh, Relaxed);
        }
        c.push_bytes.fetch_add(self.bytes, Relaxed);
        c.last_push_ns.fetch_max(self.now_ns, Relaxed);
        record_latencies(shared, slow, &self.latencies[..self.nlat]);
    }
}

/// The send time a push payload starts with, if it has 8 bytes.
fn sent_ns(payload: &[u8]) -> Option<u64> {
    payload
        .get(..8)
        .and_then(|t| t.try_into().ok())
        .map(u64::from_le_bytes)
}

/// Records push latencies under one lock.
fn record_latencies(shared: &Shared, slow: bool, us: &[u64]) {
    if us.is_empty() {
        return;
    }
    shared.hist(|h| {
        let h = if slow { &mut h.push_slow } else { &mut h.push };
        for &v in us {
            record(h, v);
        }
    });
}

/// When a device acks the pushes it took in.
#[derive(Debug, PartialEq, Eq)]
enum AckDue {
    /// A lane is `ack_every` pushes behind: now.
    Now,
    /// Behind by fewer: after the ack delay.
    Later,
    /// Nothing to ack.
    No,
}

fn ack_due(d: &Device, ack_every: u64) -> AckDue {
    let behind = (d.seq[0] - d.acked[0]).max(d.seq[1] - d.acked[1]);
    if behind >= ack_every.max(1) {
        AckDue::Now
    } else if behind > 0 {
        AckDue::Later
    } else {
        AckDue::No
    }
}

async fn send_acks(conn: &mut Box<dyn Io>, d: &mut Device) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(32);
    for lane in 0..2 {
        if d.seq[lane] > d.acked[lane] {
            let f = pb::ClientFrame {
                request_id: 0,
                body: Some(pb::client_frame::Body::Ack(pb::Ack {
                    up_to_seq: d.seq[lane],
                    lane: lane as i32,
                    ranges: vec![],
                })),
            };
            out.extend_from_slice(&tether::wire::frame_bytes(&f));
            d.acked[lane] = d.seq[lane];
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    conn.write_all(&out).await?;
    conn.flush().await
}

/// The fields of a push the fleet needs.
struct PushInfo {
    seq: u64,
    lane: u64,
    payload_len: usize,
    /// The send time in the payload's first 8 bytes, if it has them.
    sent_ns: Option<u64>,
    /// Bytes 8 to 16 of the payload, if it has them: the payload id of a
    /// scenario that numbers its pushes.
    id: Option<u64>,
}

/// Reads a ServerFrame holding a push by walking the protobuf by hand, so
/// counting millions of pushes stays cheap. `None` for any other frame.
fn parse_push(mut b: &[u8]) -> Option<PushInfo> {
    use prost::encoding::decode_varint;
    // ServerFrame.push: field 5, length-delimited (tag 0x2a). The gateway
    // writes no request_id on pushes, so the tag comes first.
    if b.first() != Some(&0x2a) {
        return None;
    }
    b = &b[1..];
    let len = decode_varint(&mut b).ok()? as usize;
    let mut inner = b.get(..len)?;
    let mut p = PushInfo {
        seq: 0,
        lane: 0,
        payload_len: 0,
        sent_ns: None,
        id: None,
    };
    while !inner.is_empty() {
        let key = decode_varint(&mut inner).ok()?;
        match key & 7 {
            0 => {
                let v = decode_varint(&mut inner).ok()?;
                match key >> 3 {
                    1 => p.seq = v,
                    6 => p.lane = v,
                    _ => {}
                }
            }
            2 => {
                let n = decode_varint(&mut inner).ok()? as usize;
                let v = inner.get(..n)?;
                if key >> 3 == 3 {
                    p.payload_len = n;
                    p.sent_ns = sent_ns(v);
                    p.id = v
                        .get(8..16)
                        .and_then(|t| t.try_into().ok())
                        .map(u64::from_le_bytes);
                }
                inner = &inner[n..];
            }
            _ => return None,
        }
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_device_gives_its_read_buffer_back_and_a_busy_one_keeps_it() {
        let mut rbuf = BytesMut::with_capacity(4096);
        release_idle(&mut rbuf, SMALL_READ);
        assert!(rbuf.capacity() >= 4096, "a full read: traffic, kept");
        rbuf.extend_from_slice(b"half a frame");
        release_idle(&mut rbuf, 12);
        assert_eq!(&rbuf[..], b"half a frame", "unhandled bytes are kept");
        rbuf.clear();
        release_idle(&mut rbuf, 12);
        assert_eq!(rbuf.capacity(), 0, "empty after a small read: given back");
    }

    #[test]
    fn parse_push_reads_seq_lane_and_stamp() {
        let f = pb::ServerFrame {
            request_id: 0,
            body: Some(pb::server_frame::Body::Push(pb::Push {
                seq: 300,
                message_id: "m".into(),
                payload: [7u64.to_le_bytes().as_slice(), b"rest"].concat().into(),
                source: "s".into(),
                room: String::new(),
                lane: pb::Lane::Bulk as i32,
            })),
        };
        let p = parse_push(&f.encode_to_vec()).expect("a push");
        assert_eq!(
            (p.seq, p.lane, p.payload_len, p.sent_ns),
            (300, 1, 12, Some(7))
        );
        let pong = pb::ServerFrame {
            request_id: 0,
            body: Some(pb::server_frame::Body::Pong(pb::Pong::default())),
        };
        assert!(parse_push(&pong.encode_to_vec()).is_none());
        // Truncated: never a panic, never a push.
        let bytes = f.encode_to_vec();
        for cut in 0..bytes.len() {
            let _ = parse_push(&bytes[..cut]);
        }
    }

    #[test]
    fn a_failed_device_tries_every_other_gateway_quickly_then_backs_off() {
        let spec = one_device("127.0.0.1:1".parse().unwrap());
        let mut d = Device::new(7, &spec);
        let quick = Duration::from_millis(25)..Duration::from_millis(75);
        let mut backoff = Duration::from_millis(400);
        // 4 gateways: three quick tries (the three others), then a pause
        // around the backoff, which doubles; then three quick tries again.
        for round in 0..3 {
            for _ in 0..3 {
                let p = d.pause_over(true, 4, &mut backoff);
                assert!(quick.contains(&p), "round {round}: {p:?}");
            }
            let before = backoff;
            let p = d.pause_over(true, 4, &mut backoff);
            assert!(
                p >= before / 2 && p < before * 3 / 2,
                "round {round}: {p:?} around {before:?}"
            );
            assert_eq!(backoff, (before * 2).min(Duration::from_secs(5)));
        }
        // Without failover (or with one gateway) every pause backs off, up
        // to 5 s.
        let mut backoff = Duration::from_secs(2);
        for (failover, n) in [(false, 4), (true, 1)] {
            let p = d.pause_over(failover, n, &mut backoff);
            assert!(p >= Duration::from_millis(1_000), "{p:?}");
        }
        assert_eq!(backoff, Duration::from_secs(5));
    }

    #[test]
    fn failing_over_never_lands_on_the_same_gateway_and_reaches_them_all() {
        let spec = one_device("127.0.0.1:1".parse().unwrap());
        let mut d = Device::new(3, &spec);
        let n = 5;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let from = (d.ix + d.hop) % n;
            assert!(d.hop_on(true, n));
            let to = (d.ix + d.hop) % n;
            assert_ne!(from, to, "moved to the gateway it left");
            seen.insert(to);
        }
        assert_eq!(seen.len(), n, "a random pick reaches every gateway");
        let hop = d.hop;
        assert!(!d.hop_on(false, n), "no failover: it stays");
        assert!(!d.hop_on(true, 1), "one gateway: nowhere to go");
        assert_eq!(d.hop, hop);
    }

    /// One device against a stand-in gateway on loopback.
    fn one_device(addr: SocketAddr) -> FleetSpec {
        FleetSpec {
            addrs: vec![addr],
            tls: None,
            quic: None,
            ws: false,
            secret: "s".into(),
            prefix: "u".into(),
            first: 0,
            count: 1,
            rate: 0.0,
            sources: vec![],
            ping_ms: Some(60_000),
            room: None,
            rooms: 0,
            slow_every: 0,
            slow_bps: 0,
            uplink_ms: 0,
            uplink_size: 0,
            churn_ms: 0,
            ack_every: 16,
            ack_delay_ms: 50,
            slow_stall_ms: 0,
            slow_rcvbuf: 0,
            record_sessions: false,
            progress_ms: 0,
            redis: None,
            failover: false,
            record_ids: false,
        }
    }

    async fn next_client_frame(
        s: &mut tokio::net::TcpStream,
        rbuf: &mut BytesMut,
    ) -> pb::ClientFrame {
        loop {
            if let Some(f) = take_frame(rbuf).expect("a frame") {
                return pb::ClientFrame::decode(&f[..]).expect("a client frame");
            }
            assert!(s.read_buf(rbuf).await.expect("read") > 0, "closed");
        }
    }

    fn push_frame(seq: u64) -> Vec<u8> {
        tether::wire::frame_bytes(&pb::ServerFrame {
            request_id: 0,
            body: Some(pb::server_frame::Body::Push(pb::Push {
                seq,
                message_id: format!("m{seq}"),
                payload: vec![0u8; 8].into(),
                ..Default::default()
            })),
        })
        .to_vec()
    }

    /// Pushes that come in the read that brings the LoginOk (a resume's
    /// replay) are acknowledged after the ack delay even when nothing
    /// follows them: no later read would, and the gateway closes a
    /// connection whose pushes stay unacknowledged for its ack timeout.
    /// The stand-in answers the login with a LoginOk and three pushes in one
    /// write; the device's next frame must be their Ack (about 50 ms on),
    /// not its first Ping (a minute on): an order, not a time limit.
    #[tokio::test]
    async fn pushes_that_come_with_the_login_ok_are_acknowledged() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (cmds, cmd_rx) = mpsc::channel(4);
        let (report_tx, mut reports) = mpsc::channel(64);
        let fleet = tokio::spawn(run(one_device(addr), cmd_rx, report_tx));
        let drain = tokio::spawn(async move { while reports.recv().await.is_some() {} });
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut rbuf = BytesMut::new();
        let login = next_client_frame(&mut s, &mut rbuf).await;
        assert!(matches!(login.body, Some(pb::client_frame::Body::Login(_))));
        let mut out = tether::wire::frame_bytes(&pb::ServerFrame {
            request_id: login.request_id,
            body: Some(pb::server_frame::Body::LoginOk(pb::LoginOk {
                session_id: 7,
                heartbeat_interval_ms: 60_000,
                ..Default::default()
            })),
        })
        .to_vec();
        for seq in 1..=3 {
            out.extend(push_frame(seq));
        }
        s.write_all(&out).await.expect("write");
        let next = next_client_frame(&mut s, &mut rbuf).await;
        match next.body {
            Some(pb::client_frame::Body::Ack(a)) => {
                assert_eq!((a.lane, a.up_to_seq), (pb::Lane::Interactive as i32, 3));
            }
            other => panic!("expected the Ack of seq 3, got {other:?}"),
        }
        cmds.send(Command::Stop).await.expect("fleet running");
        fleet.await.expect("fleet ends");
        drain.await.expect("reports end");
    }

    /// A device resumes after every Close that keeps its session, as
    /// PROTOCOL.md section 11.8 tells a client to; one that gave up after an
    /// ack timeout left the pushes held for it uncounted.
    #[test]
    fn a_device_resumes_after_every_close_that_keeps_its_session() {
        use pb::Code;
        for c in [Code::HeartbeatTimeout, Code::AckTimeout, Code::SlowConsumer] {
            assert!(resumable_close(c as i32), "{c:?}");
        }
        assert!(resumable_close(Code::ServerDraining as i32));
        for c in [Code::NormalClose, Code::Kicked, Code::Replaced] {
            assert!(!resumable_close(c as i32), "{c:?}");
        }
        assert!(!resumable_close(-1));
    }

    #[test]
    fn take_frame_waits_for_whole_frames_and_refuses_huge_ones() {
        let mut b = BytesMut::from(&[0u8, 0, 0, 3, 1, 2][..]);
        assert!(take_frame(&mut b).expect("ok").is_none());
        b.extend_from_slice(&[3, 0, 0]);
        assert_eq!(
            &take_frame(&mut b).expect("ok").expect("frame")[..],
            &[1, 2, 3]
        );
        assert_eq!(b.len(), 2);
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(take_frame(&mut huge).is_err());
    }

    #[test]
    fn stats_add_sums_and_keeps_latest_push() {
        let mut a = Stats {
            pushes: 2,
            last_push_ns: 5,
            ..Default::default()
        };
        a.codes.insert(3002, 1);
        let mut b = Stats {
            pushes: 3,
            last_push_ns: 9,
            ..Default::default()
        };
        b.codes.insert(3002, 2);
        a.add(&b);
        assert_eq!((a.pushes, a.last_push_ns, a.codes[&3002]), (5, 9, 3));
        // Over the worker pipe and back.
        let json = serde_json::to_string(&Report::Progress { stats: a.clone() }).expect("encode");
        match serde_json::from_str::<Report>(&json).expect("decode") {
            Report::Progress { stats } => assert_eq!(stats, a),
            other => panic!("{other:?}"),
        }
    }
}
