//! Gateways joined into one cluster: the wait until every gateway routes to
//! every device (for `--cross-node`), and the `rolling-restart` scenario,
//! which starts the gateways of a cluster itself (and, if asked, a private
//! nats-server), restarts each in turn under load, and keeps the books on
//! every push by payload id.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tether::upstream::{Endpoint, UpstreamClient, UpstreamOptions};
use tether::wire::pb;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::coord::Fleets;
use crate::fleet::{self, Stats};
use crate::scenario;
use crate::{Common, Upstream};

/// How long `--cross-node` waits for every gateway to see every device.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Users per presence request while waiting for the cluster to converge.
const PRESENCE_CHUNK: usize = 1000;
/// How long one push request may take before it counts as an error.
const PUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until presence, asked of every gateway, finds `online` devices
/// among the users of `c`: then every gateway's directory routes to every
/// device. The seconds it took, or why it gave up.
pub(crate) async fn converge(
    ups: &[Vec<UpstreamClient>],
    c: &Common,
    online: u64,
) -> Result<f64, String> {
    let users = user_ids(c);
    let clients: Vec<&UpstreamClient> = ups.iter().filter_map(|p| p.first()).collect();
    converge_on(&clients, &users, online, CONVERGE_TIMEOUT).await
}

fn user_ids(c: &Common) -> Vec<String> {
    (0..c.conns).map(|i| format!("{}{i}", c.prefix)).collect()
}

async fn converge_on(
    clients: &[&UpstreamClient],
    users: &[String],
    online: u64,
    timeout: Duration,
) -> Result<f64, String> {
    let start = Instant::now();
    loop {
        let mut why = None;
        for (g, up) in clients.iter().enumerate() {
            match seen_by(up, users).await {
                Ok(n) if n >= online => {}
                Ok(n) => why = Some(format!("gateway {g} sees {n} of {online} devices")),
                Err(e) => why = Some(format!("gateway {g}: presence: {e}")),
            }
            if why.is_some() {
                break;
            }
        }
        let Some(why) = why else {
            return Ok(start.elapsed().as_secs_f64());
        };
        if start.elapsed() >= timeout {
            return Err(format!(
                "the cluster did not converge within {} s: {why}",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Devices of `users` online anywhere in the cluster, as `up`'s gateway
/// sees them.
async fn seen_by(up: &UpstreamClient, users: &[String]) -> Result<u64, String> {
    let mut n = 0;
    for chunk in users.chunks(PRESENCE_CHUNK) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let list = up.presence(&refs).await.map_err(|e| e.to_string())?;
        n += list.iter().map(|u| u.devices.len() as u64).sum::<u64>();
    }
    Ok(n)
}

/// What the `rolling-restart` scenario does besides the common options.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct RollingOpts {
    /// The gateway binary (e.g. target/release/tether), started as
    /// `BIN serve --config FILE` once per --gateway-config.
    #[arg(long)]
    pub gateway_bin: PathBuf,
    /// One config file per gateway, in the order of --addr and --upstream:
    /// each gives its node a node_id of its own, listens where --addr and
    /// --upstream say (listen.tcp, upstream.tcp), and joins the cluster
    /// ([bus] kind = "nats", the same cluster and resume_secret on all).
    #[arg(long, value_delimiter = ',', required = true)]
    pub gateway_config: Vec<PathBuf>,
    /// Start a private nats-server (this binary) on 127.0.0.1:--nats-port
    /// for the run, and stop it at the end; the configs' bus.urls must name
    /// it. Without it, the gateways' NATS server must be running.
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    #[arg(long, default_value_t = 4222)]
    pub nats_port: u16,
    /// Unicasts per second, each to one pseudo-random user, through a
    /// gateway that is not restarting (round robin).
    #[arg(long, default_value_t = 100)]
    pub push_rate: u64,
    /// Broadcasts (to everyone) per second, each once, through a gateway
    /// that is not restarting.
    #[arg(long, default_value_t = 2)]
    pub broadcast_rate: u64,
    /// Push payload bytes (at least 16: the send time and the payload id).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of pushes before the first restart, after each gateway is
    /// back, and after the last.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Rounds; each restarts every gateway once, in order.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Seconds a gateway may take to exit after SIGTERM (then it is killed,
    /// and the run fails), to accept again once started, and its devices to
    /// come back online.
    #[arg(long, default_value_t = 30)]
    pub restart_timeout: u64,
    /// Append each gateway's output to DIR/gateway-<i>.log (and the
    /// nats-server's to DIR/nats-server.log); otherwise it is discarded.
    #[arg(long)]
    pub gateway_log_dir: Option<PathBuf>,
}

/// The processes of the cluster: the gateways (in the order of `--addr`)
/// and a private nats-server, all killed when dropped.
pub(crate) struct Cluster {
    bin: PathBuf,
    configs: Vec<PathBuf>,
    addrs: Vec<SocketAddr>,
    upstreams: Vec<String>,
    log_dir: Option<PathBuf>,
    gateways: Vec<Option<Child>>,
    nats: Option<Child>,
    timeout: Duration,
}

impl Cluster {
    pub(crate) fn new(
        bin: PathBuf,
        configs: Vec<PathBuf>,
        addrs: Vec<SocketAddr>,
        upstreams: Vec<String>,
        log_dir: Option<PathBuf>,
        timeout: Duration,
    ) -> Self {
        let n = configs.len();
        Self {
            bin,
            configs,
            addrs,
            upstreams,
            log_dir,
            gateways: (0..n).map(|_| None).collect(),
            nats: None,
            timeout,
        }
    }

    /// The gateways' device addresses, in order.
    pub(crate) fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The process ids of the gateways running now.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.gateways
            .iter()
            .flatten()
            .filter_map(Child::id)
            .collect()
    }

    /// The private nats-server's process id, if it runs.
    pub(crate) fn nats_pid(&self) -> Option<u32> {
        self.nats.as_ref().and_then(Child::id)
    }

    fn output(&self, name: &str) -> anyhow::Result<(Stdio, Stdio)> {
        let Some(dir) = &self.log_dir else {
            return Ok((Stdio::null(), Stdio::null()));
        };
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
    }

    pub(crate) async fn start_nats(&mut self, bin: &Path, port: u16) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        anyhow::ensure!(
            !listening(&addr.to_string()).await,
            "something already listens on {addr}: give --nats-port a free port"
        );
        let (out, err) = self.output("nats-server")?;
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.nats = Some(child);
        let deadline = Instant::now() + self.timeout;
        while !listening(&addr.to_string()).await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the nats-server did not listen on {addr} within {} s",
                self.timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts gateway `k` and waits until it accepts devices and upstreams;
    /// how long that took.
    pub(crate) async fn start(&mut self, k: usize) -> anyhow::Result<Duration> {
        let (addr, up) = (self.addrs[k].to_string(), self.upstreams[k].clone());
        for a in [&addr, &up] {
            anyhow::ensure!(
                !listening(a).await,
                "something already listens on {a}, before gateway {k} started"
            );
        }
        let (out, err) = self.output(&format!("gateway-{k}"))?;
        let t = Instant::now();
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.configs[k])
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let deadline = t + self.timeout;
        loop {
            if listening(&addr).await && listening(&up).await {
                break;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "gateway {k} ({}) exited at start: {status}{}{}",
                    self.configs[k].display(),
                    self.log_hint(),
                    self.log_tail(&format!("gateway-{k}"))
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "gateway {k} did not accept on {addr} and {up} within {} s{}",
                self.timeout.as_secs(),
                self.log_hint()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.gateways[k] = Some(child);
        Ok(t.elapsed())
    }

    /// The last lines `name` wrote, to show why it stopped where only the
    /// error is seen (a CI log).
    fn log_tail(&self, name: &str) -> String {
        const LINES: usize = 20;
        let Some(dir) = &self.log_dir else {
            return String::new();
        };
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.log"))) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        format!("; its last lines:\n{}", tail.join("\n"))
    }

    fn log_hint(&self) -> String {
        match &self.log_dir {
            Some(d) => format!(" (its output is in {})", d.display()),
            None => " (--gateway-log-dir keeps its output)".into(),
        }
    }

    /// Sends gateway `k` SIGTERM and waits for it to exit; kills it after
    /// the timeout. How long it took, and whether it exited by itself.
    async fn stop(&mut self, k: usize) -> (Duration, bool) {
        let t = Instant::now();
        let Some(mut child) = self.gateways[k].take() else {
            return (Duration::ZERO, true);
        };
        terminate(&child);
        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(_) => (t.elapsed(), true),
            Err(_) => {
                let _ = child.kill().await;
                (t.elapsed(), false)
            }
        }
    }

    /// Stops every gateway at once (SIGTERM, bounded), then the nats-server.
    pub(crate) async fn stop_all(&mut self) {
        let mut children: Vec<Child> = self.gateways.iter_mut().filter_map(Option::take).collect();
        for c in &children {
            terminate(c);
        }
        for c in &mut children {
            if tokio::time::timeout(self.timeout, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
        if let Some(mut n) = self.nats.take() {
            let _ = n.kill().await;
        }
    }
}

/// SIGTERM, as an orchestrator stops a gateway.
fn terminate(child: &Child) {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers and touches no memory; `pid` is a
    // child of ours that has not been reaped (we hold its handle), so the
    // id cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

/// Whether something accepts connections at `ep` (host:port, or a Unix
/// socket path).
async fn listening(ep: &str) -> bool {
    let t = Duration::from_millis(500);
    match endpoint(ep) {
        Endpoint::Tcp(a) => matches!(
            tokio::time::timeout(t, tokio::net::TcpStream::connect(a)).await,
            Ok(Ok(_))
        ),
        Endpoint::Unix(p) => matches!(
            tokio::time::timeout(t, tokio::net::UnixStream::connect(p)).await,
            Ok(Ok(_))
        ),
    }
}

fn endpoint(ep: &str) -> Endpoint {
    if ep.contains(':') && !ep.starts_with('/') {
        Endpoint::Tcp(ep.to_owned())
    } else {
        Endpoint::Unix(ep.into())
    }
}

pub(crate) async fn connect(ep: &str, secret: &str) -> anyhow::Result<UpstreamClient> {
    let opts = UpstreamOptions {
        secret: secret.to_owned(),
        subscribe: false,
        group: "loadtest".into(),
        name: "tether-loadtest".into(),
    };
    let (c, _) = UpstreamClient::connect(&endpoint(ep), opts)
        .await
        .with_context(|| format!("connecting to the upstream socket {ep}"))?;
    Ok(c)
}

/// The upstream clients pushes go through: one per gateway, `None` while
/// that gateway restarts.
struct Routes {
    clients: Mutex<Vec<Option<UpstreamClient>>>,
    next: AtomicUsize,
}

impl Routes {
    /// The next gateway up, round robin.
    fn pick(&self) -> Option<(usize, UpstreamClient)> {
        let clients = self.clients.lock().ok()?;
        let n = clients.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n).find_map(|i| {
            let g = (start + i) % n;
            clients[g].clone().map(|c| (g, c))
        })
    }

    fn set(&self, k: usize, c: Option<UpstreamClient>) {
        if let Ok(mut clients) = self.clients.lock() {
            clients[k] = c;
        }
    }
}

/// What became of one push.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Answered with no node failing: every device it names must get it.
    Accepted,
    /// Answered, but a node that held a recipient did not run its part
    /// (the reply names it): the upstream was told, so no device is
    /// expected to have it.
    Refused,
    /// The request failed (or timed out): the same.
    Failed,
}

/// One push sent: to device `Some(i)`'s user, or to everyone; when (ms
/// into the run), through which gateway, and its fate.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sent {
    id: u64,
    to: Option<usize>,
    at_ms: u64,
    via: usize,
    fate: Fate,
}

#[derive(Default)]
pub(crate) struct Books {
    next_id: AtomicU64,
    sent: Mutex<Vec<Sent>>,
    /// Accepted unicasts whose reply said no session took them.
    unreached: AtomicU64,
    /// No gateway up to send through (never, with two or more).
    unrouted: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// The pushes sent while gateways restart, each with a payload id the
/// books follow.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PushLoad {
    /// Unicasts a second, each to one pseudo-random user of `devices`
    /// (`prefix` + index).
    pub push_rate: f64,
    /// Broadcasts (to everyone) a second.
    pub broadcast_rate: f64,
    /// Payload bytes, at least 16 (the send time, then the payload id).
    pub size: usize,
    pub devices: usize,
    pub prefix: String,
    /// Push requests in flight at most.
    pub inflight: usize,
}

/// Pushes at the asked rates until `stop`: unicasts to pseudo-random users
/// and broadcasts, each through the next gateway up, `inflight` requests
/// at most.
async fn push_loop(
    routes: Arc<Routes>,
    books: Arc<Books>,
    o: PushLoad,
    start: Instant,
    stop: Arc<AtomicBool>,
) {
    let (conns, prefix) = (o.devices, o.prefix.clone());
    let sem = Arc::new(tokio::sync::Semaphore::new(o.inflight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = Instant::now();
    let (mut unicasts, mut broadcasts) = (0u64, 0u64);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while !stop.load(Relaxed) {
        tick.tick().await;
        let secs = t0.elapsed().as_secs_f64();
        let mut due: Vec<Option<usize>> = Vec::new();
        while (unicasts as f64) < o.push_rate * secs {
            unicasts += 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            due.push(Some((x % conns.max(1) as u64) as usize));
        }
        while (broadcasts as f64) < o.broadcast_rate * secs {
            broadcasts += 1;
            due.push(None);
        }
        for to in due {
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            let Some((via, up)) = routes.pick() else {
                books.unrouted.fetch_add(1, Relaxed);
                continue;
            };
            let id = books.next_id.fetch_add(1, Relaxed) + 1;
            let target = match to {
                Some(t) => pb::push_request::Target::UserId(format!("{prefix}{t}")),
                None => pb::push_request::Target::Everyone(true),
            };
            let mut req = scenario::request(target, o.size.max(16));
            let mut payload = req.payload.to_vec();
            payload[8..16].copy_from_slice(&id.to_le_bytes());
            req.payload = payload.into();
            let at_ms = start.elapsed().as_millis() as u64;
            let books = books.clone();
            tasks.spawn(async move {
                let r = tokio::time::timeout(PUSH_TIMEOUT, up.push(req)).await;
                drop(permit);
                let fate = match r {
                    Ok(Ok(r)) if r.failed.is_empty() => {
                        if to.is_some() && r.sessions == 0 {
                            books.unreached.fetch_add(1, Relaxed);
                        }
                        Fate::Accepted
                    }
                    Ok(Ok(r)) => {
                        note_error(&books, || {
                            let f = &r.failed[0];
                            format!(
                                "push refused in part: node {} {}",
                                f.node_id,
                                crate::report::code_name(f.code)
                            )
                        });
                        Fate::Refused
                    }
                    Ok(Err(e)) => {
                        note_error(&books, || format!("push: {e}"));
                        Fate::Failed
                    }
                    Err(_) => {
                        note_error(&books, || "push: no reply within 10 s".into());
                        Fate::Failed
                    }
                };
                if let Ok(mut s) = books.sent.lock() {
                    s.push(Sent {
                        id,
                        to,
                        at_ms,
                        via,
                        fate,
                    });
                }
            });
        }
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

fn note_error(books: &Books, e: impl FnOnce() -> String) {
    if let Ok(mut f) = books.first_error.lock() {
        if f.is_none() {
            *f = Some(e());
        }
    }
}

/// One gateway's restart.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Restart {
    round: u32,
    gateway: usize,
    /// Seconds into the run when SIGTERM went.
    at_s: f64,
    /// SIGTERM to exit; false when it had to be killed.
    exit_s: f64,
    exited: bool,
    /// Start to accepting.
    start_s: f64,
    /// SIGTERM until every device was online again, and until the gateway
    /// saw every device (then pushes go through it again).
    online_s: Option<f64>,
    converge_s: Option<f64>,
}

/// The books at the end: what every device should have had, against what
/// it received.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub accepted_unicasts: u64,
    pub accepted_broadcasts: u64,
    pub refused: u64,
    pub failed: u64,
    /// Deliveries due: accepted unicasts plus accepted broadcasts times
    /// devices.
    pub due: u64,
    /// Of those, received and not.
    pub delivered: u64,
    pub lost: u64,
    /// Payloads a device received that no accepted push sent it (nor a
    /// refused or failed one, which may have reached it).
    pub unexpected: u64,
    /// The first few lost: (device, push).
    pub examples: Vec<(usize, Sent)>,
}

/// Compares what `devices` devices received (`got`, payload ids per device)
/// with what was sent.
pub(crate) fn tally(sent: &[Sent], devices: usize, got: &[fleet::IdRecord]) -> Tally {
    let mut t = Tally::default();
    let mut broadcasts = Vec::new();
    let mut unicasts: HashMap<usize, Vec<&Sent>> = HashMap::new();
    let mut maybe: HashSet<u64> = HashSet::new();
    for s in sent {
        match (s.fate, s.to) {
            (Fate::Accepted, Some(d)) => {
                t.accepted_unicasts += 1;
                unicasts.entry(d).or_default().push(s);
            }
            (Fate::Accepted, None) => {
                t.accepted_broadcasts += 1;
                broadcasts.push(s);
            }
            (f, _) => {
                if f == Fate::Refused {
                    t.refused += 1;
                } else {
                    t.failed += 1;
                }
                maybe.insert(s.id);
            }
        }
    }
    let by_device: HashMap<usize, HashSet<u64>> = got
        .iter()
        .map(|r| (r.device, r.ids.iter().copied().collect()))
        .collect();
    let empty = HashSet::new();
    for d in 0..devices {
        let ids = by_device.get(&d).unwrap_or(&empty);
        let mine = unicasts.get(&d).map(Vec::as_slice).unwrap_or(&[]);
        let mut due: HashSet<u64> = HashSet::with_capacity(ids.len());
        for s in broadcasts.iter().copied().chain(mine.iter().copied()) {
            due.insert(s.id);
            t.due += 1;
            if ids.contains(&s.id) {
                t.delivered += 1;
            } else {
                t.lost += 1;
                if t.examples.len() < 10 {
                    t.examples.push((d, *s));
                }
            }
        }
        t.unexpected += ids
            .iter()
            .filter(|i| !due.contains(i) && !maybe.contains(i))
            .count() as u64;
    }
    t
}

/// Restarts every gateway of a cluster in turn under load; passes when no
/// push was lost or duplicated.
///
/// # Errors
/// When the cluster or the fleet cannot start, and when the run did not
/// pass (after its report).
pub async fn rolling_restart(c: Common, u: Upstream, o: RollingOpts) -> anyhow::Result<()> {
    let n = c.addr.len();
    anyhow::ensure!(
        n >= 2 && o.gateway_config.len() == n && u.upstream.len() == n,
        "rolling-restart needs two gateways or more: one --gateway-config, one --addr and one --upstream each, in the same order (got {}, {n} and {})",
        o.gateway_config.len(),
        u.upstream.len()
    );
    anyhow::ensure!(
        o.size >= 16,
        "--size must be at least 16 (send time and payload id)"
    );
    anyhow::ensure!(
        o.push_rate + o.broadcast_rate > 0,
        "nothing to push: --push-rate and --broadcast-rate are both 0"
    );
    let mut cluster = Cluster {
        bin: o.gateway_bin.clone(),
        configs: o.gateway_config.clone(),
        addrs: c.addr.clone(),
        upstreams: u.upstream.clone(),
        log_dir: o.gateway_log_dir.clone(),
        gateways: (0..n).map(|_| None).collect(),
        nats: None,
        timeout: Duration::from_secs(o.restart_timeout.max(1)),
    };
    let run = run(&c, &u, &o, &mut cluster).await;
    cluster.stop_all().await;
    let (report, pass) = run?;
    report.emit(c.json.as_deref(), c.plot.as_deref())?;
    anyhow::ensure!(
        pass,
        "rolling-restart failed: {}",
        report.failures.join("; ")
    );
    Ok(())
}

async fn run(
    c: &Common,
    u: &Upstream,
    o: &RollingOpts,
    cluster: &mut Cluster,
) -> anyhow::Result<(crate::report::RunReport, bool)> {
    let n = c.addr.len();
    if let Some(bin) = &o.nats_server {
        cluster.start_nats(bin, o.nats_port).await?;
    }
    for k in 0..n {
        cluster.start(k).await?;
    }
    let mut spec = scenario::spec(c)?;
    spec.failover = true;
    spec.record_ids = true;
    let (fleet, t0) = scenario::start(c, spec).await?;
    let ready = scenario::wait_ready(&fleet, c).await?;
    let run_start = Instant::now();
    let mut clients = Vec::new();
    for ep in &u.upstream {
        clients.push(connect(ep, &u.upstream_secret).await?);
    }
    let users = user_ids(c);
    let refs: Vec<&UpstreamClient> = clients.iter().collect();
    let mut failures = Vec::new();
    let converged = converge_on(&refs, &users, ready.online, CONVERGE_TIMEOUT).await;
    if let Err(e) = &converged {
        failures.push(e.clone());
    }
    let phase = RollingPhase {
        ups: &u.upstream,
        secret: &u.upstream_secret,
        users: &users,
        load: PushLoad {
            push_rate: o.push_rate as f64,
            broadcast_rate: o.broadcast_rate as f64,
            size: o.size,
            devices: c.conns,
            prefix: c.prefix.clone(),
            inflight: u.inflight,
        },
        settle: Duration::from_secs_f64(o.settle.max(0.0)),
        order: (1..=o.rounds)
            .flat_map(|round| (0..n).map(move |k| (k, round)))
            .collect(),
        online: ready.online,
        restart_timeout: o.restart_timeout,
    };
    let rolled = roll(phase, cluster, &Fleets(vec![&fleet]), clients, run_start).await?;
    failures.extend(rolled.failures.iter().cloned());
    let out = fleet.finish().await;
    let t = tally(&rolled.sent, c.conns, &out.ids);
    let title = format!(
        "{} devices on {n} gateways, {} unicasts/s and {} broadcasts/s, every gateway restarted {} time(s)",
        c.conns, o.push_rate, o.broadcast_rate, o.rounds
    );
    let mut r = scenario::report(
        "rolling-restart",
        title,
        c,
        serde_json::json!({
            "upstream": u,
            "rolling": o,
            "restarts": rolled.restarts,
            "first_push_error": rolled.first_error,
        }),
        t0,
        &out,
    );
    figures(&mut r, &t, &out.stats, &rolled.books, ready.online);
    if let Ok(s) = converged {
        r.figure(
            "cluster_converge_s",
            "seconds until every gateway saw every device",
            s,
            "s",
        );
    }
    restart_figures(&mut r, &rolled);
    r.failures.extend(failures);
    let duplicated = out.stats.seq_dups + out.stats.id_dups;
    let mut pass = r.failures.is_empty();
    if t.lost > 0 || duplicated > 0 {
        pass = false;
        r.failures.push(format!(
            "{} deliveries lost, {duplicated} duplicated (both must be 0)",
            t.lost
        ));
    }
    if t.accepted_unicasts + t.accepted_broadcasts == 0 {
        pass = false;
        r.failures.push("no push was accepted".into());
    }
    if out.stats.ids_overflow > 0 {
        pass = false;
        r.failures
            .push(format!("{} payload ids not kept", out.stats.ids_overflow));
    }
    lost_examples(&mut r, &t, &c.prefix);
    r.figure(
        "verdict_pass",
        "passed (1) or failed (0)",
        f64::from(u8::from(pass)),
        "",
    );
    Ok((r, pass))
}

/// What a rolling restart under load needs: the `rolling-restart`
/// scenario's whole run, and the `million`'s last phase.
pub(crate) struct RollingPhase<'a> {
    /// Every gateway's upstream address, in the cluster's order.
    pub ups: &'a [String],
    pub secret: &'a str,
    /// Every device's user, to ask a restarted gateway whether it sees
    /// them all.
    pub users: &'a [String],
    pub load: PushLoad,
    /// Pushes before the first restart, after each, and after the last.
    pub settle: Duration,
    /// The restarts, in order: (gateway, round).
    pub order: Vec<(usize, u32)>,
    /// Devices online at the start, which must all come back after each
    /// restart.
    pub online: u64,
    /// Seconds for a gateway to exit, to start, and for its devices to
    /// come back.
    pub restart_timeout: u64,
}

/// What a rolling restart did.
pub(crate) struct Rolled {
    pub sent: Vec<Sent>,
    pub restarts: Vec<Restart>,
    pub failures: Vec<String>,
    /// Seconds from the first SIGTERM to the last gateway back.
    pub restart_s: f64,
    pub books: Arc<Books>,
    pub first_error: Option<String>,
}

/// Pushes `p.load` through the gateways that are up while each gateway of
/// `p.order` restarts in turn, then waits until the devices have every
/// delivery due (or none came for 5 s). Stops at the first restart that
/// leaves the cluster broken (its gateway does not start again), with the
/// reason in the failures.
///
/// # Errors
/// When the push task panicked.
pub(crate) async fn roll(
    p: RollingPhase<'_>,
    cluster: &mut Cluster,
    fleets: &Fleets<'_>,
    clients: Vec<UpstreamClient>,
    run_start: Instant,
) -> anyhow::Result<Rolled> {
    let mut failures = Vec::new();
    let before = fleets.totals().pushes;
    let routes = Arc::new(Routes {
        clients: Mutex::new(clients.into_iter().map(Some).collect()),
        next: AtomicUsize::new(0),
    });
    let books = Arc::new(Books::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = tokio::spawn(push_loop(
        routes.clone(),
        books.clone(),
        p.load.clone(),
        run_start,
        stop.clone(),
    ));
    let timeout = Duration::from_secs(p.restart_timeout.max(1));
    tokio::time::sleep(p.settle).await;
    let restarts_start = Instant::now();
    let mut restarts = Vec::new();
    for &(k, round) in &p.order {
        let r = restart(&p, cluster, fleets, &routes, (k, round), run_start, timeout).await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                // The cluster is not whole: stop here, and report.
                failures.push(format!("gateway {k}, round {round}: {e:#}"));
                break;
            }
        };
        if !r.exited {
            failures.push(format!(
                "gateway {k} did not exit within {} s of SIGTERM: killed",
                p.restart_timeout
            ));
        }
        if r.online_s.is_none() {
            failures.push(format!(
                "not every device was back online within {} s of gateway {k}'s restart",
                p.restart_timeout
            ));
        }
        restarts.push(r);
        tokio::time::sleep(p.settle).await;
    }
    let restart_s = restarts_start.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    pusher.await.context("the pusher task")?;
    let sent = books.sent.lock().map(|s| s.clone()).unwrap_or_default();
    // Wait for the last deliveries: until the devices have what is due, or
    // nothing came for 5 s.
    let due: u64 = sent
        .iter()
        .filter(|s| s.fate == Fate::Accepted)
        .map(|s| if s.to.is_some() { 1 } else { p.online })
        .sum();
    loop {
        let last = fleets.totals().pushes;
        let (t, ok) = fleets
            .wait_for(Duration::from_secs(5), |s| s.pushes >= before + due)
            .await;
        if ok || t.pushes == last {
            break;
        }
    }
    let first_error = books.first_error.lock().ok().and_then(|e| e.clone());
    Ok(Rolled {
        sent,
        restarts,
        failures,
        restart_s,
        books,
        first_error,
    })
}

/// Restarts gateway `k` (in `round`): out of the push routes, SIGTERM,
/// wait for the exit, start, wait until it accepts, the devices online at
/// the start are online again and it sees them all, then back in the
/// routes.
async fn restart(
    p: &RollingPhase<'_>,
    cluster: &mut Cluster,
    fleets: &Fleets<'_>,
    routes: &Routes,
    (k, round): (usize, u32),
    run_start: Instant,
    timeout: Duration,
) -> anyhow::Result<Restart> {
    routes.set(k, None);
    let at = Instant::now();
    let at_s = run_start.elapsed().as_secs_f64();
    let (exit, exited) = cluster.stop(k).await;
    let start = cluster.start(k).await?;
    let (_, back) = fleets
        .wait_for(timeout, |s: &Stats| s.online >= p.online)
        .await;
    let online_s = back.then(|| at.elapsed().as_secs_f64());
    let client = connect(&p.ups[k], p.secret).await?;
    let online = fleets.totals().online;
    let converge_s = converge_on(&[&client], p.users, online, timeout).await.ok();
    routes.set(k, Some(client));
    Ok(Restart {
        round,
        gateway: k,
        at_s,
        exit_s: exit.as_secs_f64(),
        exited,
        start_s: start.as_secs_f64(),
        online_s,
        converge_s,
    })
}

/// The restarts' figures (count, time, the longest drain and return), and
/// one line printed per restart.
pub(crate) fn restart_figures(r: &mut crate::report::RunReport, rolled: &Rolled) {
    let restarts = &rolled.restarts;
    r.figure(
        "restarts",
        "gateway restarts done",
        restarts.len() as f64,
        "",
    );
    r.figure(
        "restart_s",
        "seconds from the first SIGTERM to the last gateway back",
        rolled.restart_s,
        "s",
    );
    let max = |f: fn(&Restart) -> Option<f64>| {
        restarts
            .iter()
            .filter_map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    if let Some(v) = max(|r| Some(r.exit_s)) {
        r.figure("exit_s_max", "longest SIGTERM to exit (the drain)", v, "s");
    }
    if let Some(v) = max(|r| r.online_s) {
        r.figure(
            "online_s_max",
            "longest SIGTERM until every device was online again",
            v,
            "s",
        );
    }
    if let Some(e) = &rolled.first_error {
        // Told to the upstream, so not a loss: a note, not a failure.
        println!("first push refused or failed: {e}");
    }
    for x in restarts {
        println!(
            "restart: round {} gateway {} at {:.1} s: exit {:.2} s{}, start {:.2} s, all online {}, seen by it {}",
            x.round,
            x.gateway,
            x.at_s,
            x.exit_s,
            if x.exited { "" } else { " (killed)" },
            x.start_s,
            x.online_s.map_or("never".into(), |v| format!("{v:.2} s")),
            x.converge_s.map_or("never".into(), |v| format!("{v:.2} s")),
        );
    }
}

/// The first few lost deliveries, each a failure line.
pub(crate) fn lost_examples(r: &mut crate::report::RunReport, t: &Tally, prefix: &str) {
    for (d, s) in &t.examples {
        r.failures.push(format!(
            "lost: device {d} ({prefix}{d}) missed push {} ({} via gateway {} at {:.2} s)",
            s.id,
            if s.to.is_some() {
                "unicast"
            } else {
                "broadcast"
            },
            s.via,
            s.at_ms as f64 / 1000.0
        ));
    }
}

pub(crate) fn figures(
    r: &mut crate::report::RunReport,
    t: &Tally,
    s: &Stats,
    books: &Books,
    online: u64,
) {
    let rows = [
        ("online", "devices online at the start", online),
        (
            "accepted_unicasts",
            "unicasts accepted (no node failed)",
            t.accepted_unicasts,
        ),
        (
            "accepted_broadcasts",
            "broadcasts accepted (no node failed)",
            t.accepted_broadcasts,
        ),
        (
            "refused",
            "pushes a node failed in part (the reply named it)",
            t.refused,
        ),
        ("push_errors", "push requests failed", t.failed),
        (
            "unreached",
            "accepted unicasts no session took (reply: 0 sessions)",
            books.unreached.load(Relaxed),
        ),
        ("due", "deliveries due (accepted, per device)", t.due),
        ("delivered", "deliveries received", t.delivered),
        ("lost", "deliveries lost (due, not received)", t.lost),
        (
            "duplicated",
            "deliveries received twice (seq or payload id)",
            s.seq_dups + s.id_dups,
        ),
        ("seq_dups", "pushes with a seq seen before", s.seq_dups),
        (
            "id_dups",
            "pushes with a new seq and a payload seen before",
            s.id_dups,
        ),
        ("seq_gaps", "pushes skipped over (a seq jumped)", s.seq_gaps),
        (
            "unexpected",
            "payloads received that no accepted push sent",
            t.unexpected,
        ),
        (
            "resumes_ok",
            "resumes answered OK",
            s.resumes.saturating_sub(s.resume_gaps + s.resume_new),
        ),
        ("resume_gaps", "resumes with a gap", s.resume_gaps),
        (
            "resume_gap_msgs",
            "pushes those gaps skipped",
            s.resume_gap_msgs,
        ),
        (
            "resumes_expired",
            "resumes refused (expired or rejected: a new session)",
            s.resume_new,
        ),
        ("failovers", "moves to another gateway", s.failovers),
        ("drops", "connections lost (no Close)", s.drops),
    ];
    for (key, label, v) in rows {
        r.figure(key, label, v as f64, "");
    }
    if books.unrouted.load(Relaxed) > 0 {
        r.figure(
            "unrouted",
            "pushes not sent: no gateway up",
            books.unrouted.load(Relaxed) as f64,
            "",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(id: u64, to: Option<usize>, fate: Fate) -> Sent {
        Sent {
            id,
            to,
            at_ms: 0,
            via: 0,
            fate,
        }
    }

    #[test]
    fn the_books_count_what_is_due_lost_and_unexpected() {
        let pushes = [
            sent(1, None, Fate::Accepted),
            sent(2, Some(0), Fate::Accepted),
            sent(3, Some(1), Fate::Accepted),
            sent(4, None, Fate::Refused),
            sent(5, Some(1), Fate::Failed),
        ];
        let got = [
            fleet::IdRecord {
                device: 0,
                // 4 may arrive (refused in part); 9 was never sent.
                ids: vec![1, 2, 4, 9],
            },
            fleet::IdRecord {
                device: 1,
                // 3 lost; 5 may arrive (the request failed).
                ids: vec![1, 5],
            },
        ];
        let t = tally(&pushes, 3, &got);
        assert_eq!((t.accepted_unicasts, t.accepted_broadcasts), (2, 1));
        assert_eq!((t.refused, t.failed), (1, 1));
        // Broadcast 1 to three devices, unicasts 2 and 3.
        assert_eq!(t.due, 5);
        assert_eq!(t.delivered, 3);
        // Device 1's unicast 3, and device 2 (no record) missed broadcast 1.
        assert_eq!(t.lost, 2);
        assert_eq!(t.unexpected, 1);
        let lost: Vec<(usize, u64)> = t.examples.iter().map(|(d, s)| (*d, s.id)).collect();
        assert_eq!(lost, [(1, 3), (2, 1)]);
    }

    #[test]
    fn cross_node_unicasts_never_go_to_the_user_s_gateway() {
        for gateways in 2..5 {
            for t in 0..20 {
                let mut seen = HashSet::new();
                for n in 0..20 {
                    let g = scenario::unicast_gateway(t, n, gateways, true);
                    assert_ne!(g, t % gateways);
                    assert!(g < gateways);
                    seen.insert(g);
                }
                assert_eq!(seen.len(), gateways - 1, "round robin over the others");
                assert_eq!(
                    scenario::unicast_gateway(t, 7, gateways, false),
                    t % gateways
                );
            }
        }
    }
}
