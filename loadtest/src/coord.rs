//! The coordinator: splits a fleet over worker processes (or runs it in this
//! process), aggregates their reports, samples a timeline and the gateway's
//! memory once a second, and draws progress bars.
//!
//! Workers are this same binary run as `tether-loadtest worker`: the first
//! stdin line is its [`FleetSpec`], further lines are [`Command`]s, and it
//! answers with one JSON [`Report`] per stdout line. A worker holds at most
//! about 15,000 connections, below this machine's 20,000 open files per
//! process; source addresses spread the 4-tuples past 64k ports.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::fleet::{
    self, Command, FleetSpec, Histogram, Hists, IdRecord, Report, SessionRecord, Stats,
};

/// Connections one worker process holds at most by default.
pub const PER_WORKER: usize = 15_000;

/// Where the gateway's resident memory comes from.
#[derive(Clone, Debug)]
pub enum Gauge {
    /// `/proc/PID/smaps_rollup` (the gateway runs on this host).
    Pid(u32),
    /// The sum over several processes on this host (a cluster's gateways).
    Pids(Vec<u32>),
    /// The `tether_process_resident_memory_bytes` gauge on a Prometheus
    /// endpoint (`host:port`).
    Metrics(String),
}

impl Gauge {
    /// Resident bytes now, if readable.
    pub async fn read(&self) -> Option<u64> {
        match self {
            Gauge::Pid(pid) => rss_kib(*pid).map(|k| k * 1024),
            Gauge::Pids(pids) => Some(pids.iter().filter_map(|&p| rss_kib(p)).sum::<u64>() * 1024),
            Gauge::Metrics(addr) => scrape(addr, "tether_process_resident_memory_bytes")
                .await
                .map(|v| v as u64),
        }
    }
}

/// Resident memory of `pid`, from smaps_rollup: it walks the page tables,
/// while VmRSS in /proc/PID/status is a cached counter that lags.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Reads one unlabelled metric from a Prometheus text endpoint.
async fn scrape(addr: &str, name: &str) -> Option<f64> {
    let text = scrape_text(addr).await?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Every series of metric `name` in a Prometheus text page: its labels
/// (what stands between the braces; empty without any) and its value.
/// Lines that do not parse are skipped.
fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(move |l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix(' ') {
                ("", r)
            } else {
                rest.strip_prefix('{')?.rsplit_once("} ")?
            };
            Some((labels, value.trim().parse::<f64>().ok()?))
        })
}

/// The sum of every series of metric `name` (all label sets) in a
/// Prometheus text page; `None` when the page has none.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    series(text, name).map(|(_, v)| v).reduce(|a, b| a + b)
}

/// A Prometheus histogram's cumulative buckets (`le` bound, count), summed
/// over its label sets, in bound order; `+Inf` last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// The `<name>_bucket` series of a Prometheus text page.
    pub fn parse(text: &str, name: &str) -> Self {
        let bucket = format!("{name}_bucket");
        let mut b: Vec<(f64, f64)> = Vec::new();
        for (labels, count) in series(text, &bucket) {
            let Some(le) = labels
                .split(',')
                .find_map(|kv| kv.trim().strip_prefix("le=\""))
                .and_then(|v| v.strip_suffix('"'))
            else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap_or(f64::NAN)
            };
            if le.is_nan() {
                continue;
            }
            match b.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c += count,
                None => b.push((le, count)),
            }
        }
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        Self(b)
    }

    /// What was recorded between `earlier` and `self` (bucket by bucket).
    pub fn since(&self, earlier: &Buckets) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(le, c)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(l, _)| *l == le)
                        .map_or(0.0, |x| x.1);
                    (le, (c - before).max(0.0))
                })
                .collect(),
        )
    }

    /// Samples in all.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |x| x.1)
    }

    /// The smallest bucket bound that holds at least the fraction `q` of
    /// the samples: an upper bound of the `q` quantile (`None` without
    /// samples).
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n <= 0.0 {
            return None;
        }
        self.0.iter().find(|(_, c)| *c >= q * n).map(|x| x.0)
    }
}

/// The text of a Prometheus endpoint's `/metrics` page.
pub async fn scrape_text(addr: &str) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        (&mut s).take(64 << 20).read_to_end(&mut body),
    )
    .await
    .ok()?
    .ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// The run at one moment, summed over workers: taken each second, and at
/// the end of each phase (every device settled, the run over), so that a run
/// shorter than a second still has a first and a last sample to plot.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    /// Seconds since the fleet started.
    pub t: f64,
    pub online: u64,
    pub logins: u64,
    pub pushes: u64,
    pub uplinks_acked: u64,
    pub resumes: u64,
    pub churns: u64,
    /// Gateway resident bytes, when a gauge is set.
    pub gateway_rss: Option<u64>,
}

impl Sample {
    /// The totals `t` now, `started` being when the fleet started.
    fn of(t: &Stats, started: Instant, gateway_rss: Option<u64>) -> Sample {
        Sample {
            t: started.elapsed().as_secs_f64(),
            online: t.online,
            logins: t.logins,
            pushes: t.pushes + t.slow_pushes,
            uplinks_acked: t.uplinks_acked,
            resumes: t.resumes,
            churns: t.churns,
            gateway_rss,
        }
    }
}

/// What a finished fleet hands back.
pub struct Outcome {
    pub stats: Stats,
    pub login: Histogram,
    pub resume: Histogram,
    pub push: Histogram,
    pub push_slow: Histogram,
    pub uplink: Histogram,
    pub timeline: Vec<Sample>,
    pub failures: Vec<String>,
    /// Worker processes used (0: the devices ran in the coordinator).
    pub workers: usize,
    /// What each session received, when the fleet recorded it.
    pub sessions: Vec<SessionRecord>,
    /// The payload ids each device received, when the fleet recorded them.
    pub ids: Vec<IdRecord>,
}

#[derive(Default)]
struct Agg {
    latest: Vec<Stats>,
    ready: Vec<bool>,
    done: Vec<Option<Hists>>,
    failed: Vec<Option<String>>,
    timeline: Vec<Sample>,
    sessions: Vec<SessionRecord>,
    ids: Vec<IdRecord>,
}

impl Agg {
    fn totals(&self) -> Stats {
        let mut t = Stats::default();
        for s in &self.latest {
            t.add(s);
        }
        t
    }

    fn finished(&self, w: usize) -> bool {
        self.done[w].is_some() || self.failed[w].is_some()
    }
}

/// A running fleet.
pub struct Fleet {
    cmds: Vec<mpsc::Sender<Command>>,
    /// Asks the monitor for a sample now; it answers once it is recorded.
    marks: mpsc::Sender<oneshot::Sender<()>>,
    agg: Arc<Mutex<Agg>>,
    changed: Arc<Notify>,
    monitor: tokio::task::JoinHandle<()>,
    children: Vec<tokio::process::Child>,
    started: Instant,
    total: usize,
    workers: usize,
}

impl Fleet {
    /// Starts `spec.count` devices over `workers` processes (0: in this
    /// process).
    ///
    /// # Errors
    /// When a worker process cannot be started.
    pub async fn start(
        spec: FleetSpec,
        workers: usize,
        gauge: Option<Gauge>,
        quiet: bool,
    ) -> anyhow::Result<Fleet> {
        let parts = workers.max(1);
        let (tx, rx) = mpsc::channel::<(usize, Report)>(1024);
        let mut cmds = Vec::new();
        let mut children = Vec::new();
        let mut first = spec.first;
        for w in 0..parts {
            let count = spec.count / parts + usize::from(w < spec.count % parts);
            let mut part = spec.clone();
            part.first = first;
            part.count = count;
            part.rate = spec.rate / parts as f64;
            if let Some(q) = &mut part.quic {
                q.endpoints = crate::quic::share(q.endpoints, count, spec.count);
            }
            first += count;
            let (ctx, crx) = mpsc::channel::<Command>(8);
            cmds.push(ctx);
            if workers == 0 {
                let (rtx, mut rrx) = mpsc::channel::<Report>(64);
                tokio::spawn(fleet::run(part, crx, rtx));
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(r) = rrx.recv().await {
                        if tx.send((w, r)).await.is_err() {
                            break;
                        }
                    }
                });
            } else {
                children.push(spawn_worker(w, part, crx, tx.clone()).await?);
            }
        }
        drop(tx);
        let agg = Arc::new(Mutex::new(Agg {
            latest: vec![Stats::default(); parts],
            ready: vec![false; parts],
            done: vec![None; parts],
            failed: vec![None; parts],
            timeline: Vec::new(),
            sessions: Vec::new(),
            ids: Vec::new(),
        }));
        let changed = Arc::new(Notify::new());
        let started = Instant::now();
        let (marks, marks_rx) = mpsc::channel(4);
        let monitor = tokio::spawn(monitor(
            rx,
            marks_rx,
            agg.clone(),
            changed.clone(),
            gauge,
            started,
            spec.count as u64,
            quiet,
        ));
        Ok(Fleet {
            cmds,
            marks,
            agg,
            changed,
            monitor,
            children,
            started,
            total: spec.count,
            workers,
        })
    }

    /// Records a sample of the timeline now (the end of a phase), besides
    /// the one each second; returns once it is recorded.
    pub async fn mark(&self) {
        let (tx, rx) = oneshot::channel();
        if self.marks.send(tx).await.is_ok() {
            // The monitor is gone only once the fleet finished.
            let _ = rx.await;
        }
    }

    /// The sum of the workers' latest reports.
    pub fn totals(&self) -> Stats {
        self.agg.lock().map(|a| a.totals()).unwrap_or_default()
    }

    /// Seconds since the fleet started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until `cond` holds on the totals, every worker has ended, or
    /// `timeout` passes; returns the totals and whether `cond` held.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        cond: impl Fn(&Stats) -> bool,
    ) -> (Stats, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let (t, all_ended) = match self.agg.lock() {
                Ok(a) => (a.totals(), (0..a.done.len()).all(|w| a.finished(w))),
                Err(_) => (Stats::default(), true),
            };
            if cond(&t) {
                return (t, true);
            }
            if all_ended || Instant::now() >= deadline {
                return (t, false);
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Waits until every device made its first login attempt.
    ///
    /// # Errors
    /// When a worker failed or the fleet did not settle within `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<Stats> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            // The guard is dropped at the end of the statement, before the
            // mark's await.
            let ready = match self.agg.lock() {
                Ok(a) => {
                    if let Some(f) = a.failed.iter().flatten().next() {
                        anyhow::bail!("a worker failed: {f}");
                    }
                    a.ready.iter().all(|r| *r).then(|| a.totals())
                }
                Err(_) => None,
            };
            if let Some(t) = ready {
                // The end of the login phase: devices online, logins.
                self.mark().await;
                return Ok(t);
            }
            if Instant::now() >= deadline {
                let t = self.totals();
                anyhow::bail!(
                    "only {} of {} devices settled within {timeout:?} ({} online); errors: {:?}",
                    t.settled,
                    self.total,
                    t.online,
                    t.errors
                );
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Why a worker failed, if one did.
    pub fn worker_failure(&self) -> Option<String> {
        self.agg
            .lock()
            .ok()
            .and_then(|a| a.failed.iter().flatten().next().cloned())
    }

    /// Sends a command to every worker.
    pub async fn command(&self, c: Command) {
        for tx in &self.cmds {
            let _ = tx.send(c).await;
        }
    }

    /// Stops every worker and collects the figures.
    pub async fn finish(mut self) -> Outcome {
        // The last sample while the devices are still online: however short
        // the run, the timeline ends on its true totals.
        self.mark().await;
        self.command(Command::Stop).await;
        let (_, _) = self.wait_for(Duration::from_secs(30), |_| false).await;
        self.monitor.abort();
        for c in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
        }
        let mut out = Outcome {
            stats: Stats::default(),
            login: fleet::histogram(),
            resume: fleet::histogram(),
            push: fleet::histogram(),
            push_slow: fleet::histogram(),
            uplink: fleet::histogram(),
            timeline: Vec::new(),
            failures: Vec::new(),
            workers: self.workers,
            sessions: Vec::new(),
            ids: Vec::new(),
        };
        if let Ok(mut a) = self.agg.lock() {
            out.sessions = std::mem::take(&mut a.sessions);
            out.ids = std::mem::take(&mut a.ids);
            out.stats = a.totals();
            out.timeline = a.timeline.clone();
            for (w, h) in a.done.iter().enumerate() {
                match h {
                    Some(h) => {
                        fleet::merge(&mut out.login, &h.login);
                        fleet::merge(&mut out.resume, &h.resume);
                        fleet::merge(&mut out.push, &h.push);
                        fleet::merge(&mut out.push_slow, &h.push_slow);
                        fleet::merge(&mut out.uplink, &h.uplink);
                    }
                    None => out.failures.push(format!(
                        "worker {w}: {}",
                        a.failed[w].as_deref().unwrap_or("no final report")
                    )),
                }
            }
        }
        out
    }
}

/// Starts one worker process and bridges its stdio to channels.
async fn spawn_worker(
    w: usize,
    spec: FleetSpec,
    mut cmds: mpsc::Receiver<Command>,
    reports: mpsc::Sender<(usize, Report)>,
) -> anyhow::Result<tokio::process::Child> {
    let exe = std::env::current_exe().context("locating this binary to start workers")?;
    let mut child = tokio::process::Command::new(exe)
        .arg("worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut line = serde_json::to_vec(&spec)?;
    line.push(b'\n');
    stdin.write_all(&line).await?;
    tokio::spawn(async move {
        while let Some(c) = cmds.recv().await {
            let Ok(mut l) = serde_json::to_vec(&c) else {
                continue;
            };
            l.push(b'\n');
            if stdin.write_all(&l).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut done = false;
        while let Ok(Some(l)) = lines.next_line().await {
            match serde_json::from_str::<Report>(&l) {
                Ok(r) => {
                    done |= matches!(r, Report::Done { .. } | Report::Failed { .. });
                    if reports.send((w, r)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let message = format!("unreadable report: {e}");
                    let _ = reports.send((w, Report::Failed { message })).await;
                    return;
                }
            }
        }
        if !done {
            let message = "worker exited without a final report".to_owned();
            let _ = reports.send((w, Report::Failed { message })).await;
        }
    });
    Ok(child)
}

/// Takes in reports, samples the timeline each second and when asked
/// (`marks`), draws progress.
// Eight arguments: the channels and shared state it alone drives; a struct
// made only to pass them would be read in this one place.
#[allow(clippy::too_many_arguments)]
async fn monitor(
    mut rx: mpsc::Receiver<(usize, Report)>,
    mut marks: mpsc::Receiver<oneshot::Sender<()>>,
    agg: Arc<Mutex<Agg>>,
    changed: Arc<Notify>,
    gauge: Option<Gauge>,
    started: Instant,
    total: u64,
    quiet: bool,
) {
    let bars = MultiProgress::with_draw_target(if quiet {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr_with_hz(5)
    });
    let online = bars.add(ProgressBar::new(total));
    online.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} online  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    online.set_prefix("devices");
    let traffic = bars.add(ProgressBar::new_spinner());
    traffic.set_style(
        ProgressStyle::with_template("{prefix:>8} {spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    traffic.set_prefix("traffic");
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut prev = Sample::default();
    loop {
        tokio::select! {
            m = rx.recv() => {
                let Some((w, r)) = m else { break };
                if let Ok(mut a) = agg.lock() {
                    match r {
                        Report::Progress { stats } => a.latest[w] = stats,
                        Report::Ready { stats } => {
                            a.latest[w] = stats;
                            a.ready[w] = true;
                        }
                        Report::Done { stats, hists, sessions, ids } => {
                            a.latest[w] = stats;
                            a.done[w] = Some(hists);
                            a.sessions.extend(sessions);
                            a.ids.extend(ids);
                        }
                        Report::Failed { message } => a.failed[w] = Some(message),
                    }
                }
                changed.notify_waiters();
            }
            Some(done) = marks.recv() => {
                let rss = match &gauge {
                    Some(g) => g.read().await,
                    None => None,
                };
                let t = agg.lock().map(|a| a.totals()).unwrap_or_default();
                if let Ok(mut a) = agg.lock() {
                    a.timeline.push(Sample::of(&t, started, rss));
                }
                let _ = done.send(());
            }
            _ = second.tick() => {
                let rss = match &gauge {
                    Some(g) => g.read().await,
                    None => None,
                };
                let t = agg.lock().map(|a| a.totals()).unwrap_or_default();
                let s = Sample::of(&t, started, rss);
                let dt = (s.t - prev.t).max(1e-3);
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                online.set_position(s.online);
                online.set_message(format!(
                    "{:.0} logins/s, {} refused, {} connect errors{}",
                    rate(s.logins, prev.logins),
                    t.refused,
                    t.connect_errors,
                    rss.map(|r| format!(", gateway RSS {} MiB", r >> 20)).unwrap_or_default()
                ));
                traffic.set_message(format!(
                    "{:.0} pushes/s ({} in all), {:.0} uplinks/s, {:.0} resumes/s, {:.0} churns/s",
                    rate(s.pushes, prev.pushes),
                    s.pushes,
                    rate(s.uplinks_acked, prev.uplinks_acked),
                    rate(s.resumes, prev.resumes),
                    rate(s.churns, prev.churns)
                ));
                traffic.tick();
                if let Ok(mut a) = agg.lock() {
                    a.timeline.push(s.clone());
                }
                prev = s;
            }
        }
    }
    online.finish_and_clear();
    traffic.finish_and_clear();
}

/// The `worker` subcommand: a fleet driven over stdio.
///
/// # Errors
/// When stdin holds no valid spec.
pub async fn worker_main() -> anyhow::Result<()> {
    fleet::raise_nofile();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let spec: FleetSpec =
        serde_json::from_str(&lines.next_line().await?.context("no fleet spec on stdin")?)
            .context("reading the fleet spec")?;
    let (ctx, crx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            match serde_json::from_str::<Command>(&l) {
                Ok(c) => {
                    if ctx.send(c).await.is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("worker: ignoring an unreadable command: {e}"),
            }
        }
        // The coordinator went away: stop.
        let _ = ctx.send(Command::Stop).await;
    });
    let (rtx, mut rrx) = mpsc::channel::<Report>(64);
    let fleet = tokio::spawn(fleet::run(spec, crx, rtx));
    let mut out = tokio::io::stdout();
    while let Some(r) = rrx.recv().await {
        let mut l = serde_json::to_vec(&r)?;
        l.push(b'\n');
        out.write_all(&l).await?;
        out.flush().await?;
        if matches!(r, Report::Done { .. } | Report::Failed { .. }) {
            break;
        }
    }
    let _ = fleet.await;
    Ok(())
}

/// Several fleets watched as one (the `million`'s TCP and TLS devices).
pub struct Fleets<'a>(pub Vec<&'a Fleet>);

impl Fleets<'_> {
    pub fn totals(&self) -> Stats {
        let mut t = Stats::default();
        for f in &self.0 {
            t.add(&f.totals());
        }
        t
    }

    /// Waits until `cond` holds of the totals, or `timeout`; whether it
    /// did, and the totals.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        cond: impl Fn(&Stats) -> bool,
    ) -> (Stats, bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.totals();
            if cond(&t) {
                return (t, true);
            }
            if Instant::now() >= deadline {
                return (t, false);
            }
            // Each fleet's own wait wakes on its reports; polling the sum
            // every 20 ms bounds a phase's time to 20 ms.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# TYPE tether_push_wait_seconds histogram
tether_push_wait_seconds_bucket{le=\"0.001\"} 90
tether_push_wait_seconds_bucket{le=\"0.01\"} 99
tether_push_wait_seconds_bucket{le=\"0.1\"} 100
tether_push_wait_seconds_bucket{le=\"+Inf\"} 100
tether_push_wait_seconds_sum 0.2
tether_push_wait_seconds_count 100
tether_queue_depth_bucket{le=\"1\"} 7
";

    #[test]
    fn histogram_buckets_give_quantile_bounds_over_a_run() {
        let b = Buckets::parse(PAGE, "tether_push_wait_seconds");
        assert_eq!(b.0.len(), 4, "{b:?}");
        assert_eq!(b.count(), 100.0);
        assert_eq!(b.quantile_bound(0.5), Some(0.001));
        assert_eq!(b.quantile_bound(0.95), Some(0.01));
        assert_eq!(b.quantile_bound(0.999), Some(0.1));
        // A later page: 100 more samples, all slow.
        let later = Buckets::parse(
            &PAGE
                .replace("\"0.1\"} 100", "\"0.1\"} 200")
                .replace("\"+Inf\"} 100", "\"+Inf\"} 200"),
            "tether_push_wait_seconds",
        );
        let run = later.since(&b);
        assert_eq!(run.count(), 100.0);
        assert_eq!(run.quantile_bound(0.5), Some(0.1), "{run:?}");
        assert_eq!(Buckets::parse("", "x").quantile_bound(0.5), None);
    }

    #[test]
    fn metric_sums_add_every_label_set_and_skip_other_names() {
        assert_eq!(
            metric_sum(PAGE, "tether_push_wait_seconds_count"),
            Some(100.0)
        );
        // 90 + 99 + 100 + 100 over the four `le` label sets.
        assert_eq!(
            metric_sum(PAGE, "tether_push_wait_seconds_bucket"),
            Some(389.0)
        );
        assert_eq!(metric_sum(PAGE, "tether_push_wait"), None, "a prefix only");
        assert_eq!(metric_sum(PAGE, "tether_absent"), None);
    }
}
