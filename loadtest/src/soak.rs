//! The soak: minutes of mixed load on one gateway (steady unicast and
//! broadcast, churn, slow consumers that stall, a reconnect storm every
//! period, hostile connections), sampling the gateway's memory and CPU and
//! keeping the books on every push: accepted, delivered, reported
//! undeliverable, lost without a report (see docs/LOADTEST.md, "Soak").

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tether::upstream::UpstreamClient;
use tether::wire::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::coord::{self, Gauge};
use crate::ledger::{Ledger, Reconciled};
use crate::plot::{Line, Panel, XScale};
use crate::report::human;
use crate::scenario;
use crate::{Common, Upstream};

/// The soak's own options.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct SoakOpts {
    /// How long the mixed load runs (e.g. 10m, 90s).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Memory growth is measured from the end of the warm-up.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub warmup: Duration,
    /// How often to sample the gateway and the counters.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub sample_every: Duration,
    /// Unicast pushes per second, each to one pseudo-random user.
    #[arg(long, default_value_t = 200.0)]
    pub unicast_rate: f64,
    /// Broadcast pushes per second.
    #[arg(long, default_value_t = 2.0)]
    pub broadcast_rate: f64,
    /// Broadcast to a room every device joins instead of to everyone.
    #[arg(long)]
    pub room: bool,
    /// Push payload bytes (at least 8).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Share of the devices that are slow consumers: they log in with a small
    /// receive buffer and stop reading (see --slow-stall).
    #[arg(long, default_value_t = 0.01)]
    pub slow_fraction: f64,
    /// How long a slow consumer stops reading after each login before it
    /// reads for 5 s (and stalls again); cut off, it resumes. Long enough
    /// by default for its queue to fill at the default rates.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub slow_stall: Duration,
    /// A slow consumer's socket receive buffer, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub slow_rcvbuf: usize,
    /// Devices per second (over the fleet) that say goodbye and log in again
    /// with a new session.
    #[arg(long, default_value_t = 5.0)]
    pub churn_rate: f64,
    /// A reconnect storm this often (0s: none).
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub storm_every: Duration,
    /// Share of the devices that drop (RST, no goodbye) and resume in each storm.
    #[arg(long, default_value_t = 0.2)]
    pub storm_fraction: f64,
    /// Hostile connections opened per second (garbage, zero-length frames
    /// before login, silence, oversized length prefixes, a partial frame).
    #[arg(long, default_value_t = 2.0)]
    pub hostile_rate: f64,
    /// A hostile connection the gateway has not closed by then counts as
    /// left open (the login timeout, 10 s by default, bounds the silent ones).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub hostile_deadline: Duration,
    /// Largest RSS growth from the end of the warm-up to the end that counts
    /// as flat, in percent of the RSS at the end of the warm-up.
    #[arg(long, default_value_t = 10.0)]
    pub rss_tolerance: f64,
    /// Exit with status 2 when the verdict is FAIL.
    #[arg(long)]
    pub check: bool,
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// `90`, `90s`, `500ms`, `10m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|e| format!("{s}: {e}"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        u => return Err(format!("{s}: unknown unit {u:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(n * scale).map_err(|e| format!("{s}: {e}"))
}

/// One sample of the run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakSample {
    /// Seconds since the load started (after the ramp).
    pub t: f64,
    pub rss_bytes: Option<u64>,
    /// Gateway CPU over the last interval, in percent of one core.
    pub cpu_pct: Option<f64>,
    /// From the gateway's metrics, when --metrics is given.
    pub gw_connections: Option<u64>,
    pub gw_sessions: Option<u64>,
    pub gw_detached: Option<u64>,
    /// Events the gateway dropped for full subscriber queues (reports among them).
    pub gw_events_dropped: Option<u64>,
    pub online: u64,
    pub logins: u64,
    pub resumes: u64,
    pub churns: u64,
    pub storms: u64,
    pub push_requests: u64,
    /// Sum of PushReply.sessions.
    pub queued: u64,
    /// Sum of PushReply.dropped.
    pub dropped: u64,
    /// Unique pushes the devices received.
    pub delivered: u64,
    pub duplicates: u64,
    pub reported_ok: u64,
    pub reported_failed: u64,
    pub reported_expired: u64,
    /// Accepted pushes without a report yet.
    pub unresolved: u64,
    pub slow_cut: u64,
    pub hostile_opened: u64,
    pub hostile_closed: u64,
}

/// What the pushers saw.
#[derive(Default)]
struct PushCounters {
    requests: AtomicU64,
    queued: AtomicU64,
    dropped: AtomicU64,
    unreached: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// What the hostile connections saw.
#[derive(Default)]
struct HostileCounters {
    opened: AtomicU64,
    connect_errors: AtomicU64,
    /// Closed by the gateway (end of stream or reset) before the deadline.
    closed: AtomicU64,
    /// Still open at the deadline (then dropped by us).
    left_open: AtomicU64,
    // std Mutex: held for an insert, never across an await.
    /// Close codes the gateway sent, by kind of hostility.
    codes: Mutex<BTreeMap<String, u64>>,
    /// Longest time to close, in milliseconds.
    max_close_ms: AtomicU64,
}

/// Kinds of hostile connection, in rotation.
const HOSTILE: [&str; 5] = ["garbage", "zero_frames", "silent", "oversized", "partial"];

/// Runs the soak.
///
/// # Errors
/// When the fleet or the upstream cannot start.
pub async fn soak(c: Common, u: Upstream, o: SoakOpts) -> anyhow::Result<()> {
    anyhow::ensure!(
        u.upstream.len() == 1,
        "the soak drives one gateway: give one --upstream"
    );
    anyhow::ensure!(o.size >= 8, "--size must be at least 8");
    let gauge = scenario::gauge(&c);
    // The ledger's subscriber comes first, so no report is missed.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut sub_opts = u.clone();
    sub_opts.upstreams = 1;
    let (sub, events) = scenario::upstreams(&sub_opts, true).await?;
    for mut ev in events {
        let ledger = ledger.clone();
        tokio::spawn(async move {
            while let Some(e) = ev.recv().await {
                if let Ok(mut l) = ledger.lock() {
                    l.handle_event(e);
                }
            }
        });
    }
    let mut spec = scenario::spec(&c)?;
    if o.slow_fraction > 0.0 {
        spec.slow_every = (1.0 / o.slow_fraction).round().max(1.0) as usize;
        spec.slow_stall_ms = o.slow_stall.as_millis().max(1) as u64;
        spec.slow_rcvbuf = o.slow_rcvbuf;
    } else {
        spec.slow_every = 0;
    }
    if o.churn_rate > 0.0 {
        spec.churn_ms = ((c.conns as f64 / o.churn_rate) * 1000.0).max(1.0) as u64;
    }
    if o.room {
        spec.room = Some("soak".into());
    }
    spec.record_sessions = true;
    let slow_every = spec.slow_every;
    let (fleet, t0) = scenario::start(&c, spec).await?;
    scenario::wait_ready(&fleet, &c).await?;
    let (ups, _) = scenario::upstreams(&u, false).await?;
    let ups: Vec<UpstreamClient> = ups.into_iter().flatten().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pushed = Arc::new(PushCounters::default());
    let hostile = Arc::new(HostileCounters::default());
    let mut tasks = tokio::task::JoinSet::new();
    let conns = c.conns.max(1) as u64;
    let prefix = c.prefix.clone();
    if o.unicast_rate > 0.0 {
        // A fixed pseudo-random sequence of users (xorshift), so runs compare.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let next = move |_n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pb::push_request::Target::UserId(format!("{prefix}{}", x % conns))
        };
        tasks.spawn(pump(
            ups.clone(),
            o.unicast_rate,
            u.inflight,
            o.size,
            "u",
            next,
            stop.clone(),
            pushed.clone(),
        ));
    }
    if o.broadcast_rate > 0.0 {
        let target = if o.room {
            pb::push_request::Target::Room("soak".into())
        } else {
            pb::push_request::Target::Everyone(true)
        };
        tasks.spawn(pump(
            ups.clone(),
            o.broadcast_rate,
            u.inflight,
            o.size,
            "b",
            move |_| target.clone(),
            stop.clone(),
            pushed.clone(),
        ));
    }
    if o.hostile_rate > 0.0 && c.quic {
        // Hostile connections are raw TCP byte streams; --addr is a UDP
        // address with --quic, where they would only fail to connect.
        eprintln!("note: no hostile connections with --quic (they speak TCP)");
    } else if o.hostile_rate > 0.0 {
        tasks.spawn(hostile_driver(
            c.addr[0],
            o.hostile_rate,
            o.hostile_deadline,
            stop.clone(),
            hostile.clone(),
        ));
    }

    // The load runs; sample and storm on schedule.
    let metrics = c.metrics.clone();
    let pid = c.pid;
    let start = Instant::now();
    let mut samples: Vec<SoakSample> = Vec::new();
    let mut cpu_prev = pid.and_then(cpu_ticks).map(|t| (t, Instant::now()));
    let mut storms = 0u64;
    let mut tick = tokio::time::interval(o.sample_every.max(Duration::from_millis(100)));
    let storm_period = if o.storm_every.is_zero() {
        Duration::from_secs(86_400 * 365)
    } else {
        o.storm_every
    };
    let mut storm = tokio::time::interval_at(start + storm_period, storm_period);
    let end = start + o.duration;
    let sampler = Sampler {
        gauge: gauge.clone(),
        metrics,
        pid,
        start,
        ledger: ledger.clone(),
        pushed: pushed.clone(),
        hostile: hostile.clone(),
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(end) => break,
            _ = tick.tick() => {
                let s = sampler.sample(&fleet, storms, &mut cpu_prev).await;
                samples.push(s);
            }
            _ = storm.tick() => {
                storms += 1;
                let permille = (o.storm_fraction.clamp(0.0, 1.0) * 1000.0).round() as u32;
                fleet.command(crate::fleet::Command::Storm { permille }).await;
            }
        }
    }
    let load_end = samples.len();
    samples.push(sampler.sample(&fleet, storms, &mut cpu_prev).await);

    // Drain: stop pushing, let the devices catch up, stop them (each says
    // goodbye, which ends its session), then end the sessions that are left
    // detached, so that every accepted push has its fate reported.
    stop.store(true, Relaxed);
    while tasks.join_next().await.is_some() {}
    let mut last = fleet.totals();
    let drain_end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = fleet.totals();
        if now.pushes + now.slow_pushes == last.pushes + last.slow_pushes {
            break;
        }
        last = now;
    }
    samples.push(sampler.sample(&fleet, storms, &mut cpu_prev).await);
    let out = fleet.finish().await;
    let kicker = ups.first().cloned().context("an upstream connection")?;
    let mut kicks = tokio::task::JoinSet::new();
    for i in 0..conns {
        let (k, user) = (kicker.clone(), format!("{}{i}", c.prefix));
        kicks.spawn(async move { k.kick(&user, "", "soak over").await.unwrap_or(0) });
        if kicks.len() >= 64 {
            let _ = kicks.join_next().await;
        }
    }
    while kicks.join_next().await.is_some() {}
    // Reports come as events: wait until every accepted push has one, or
    // until none came for 5 s.
    let queued = pushed.queued.load(Relaxed);
    let mut quiet_since = Instant::now();
    let mut seen = 0;
    loop {
        let n = ledger.lock().map(|l| l.reports()).unwrap_or(0);
        if n >= queued {
            break;
        }
        if n != seen {
            seen = n;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rec = match ledger.lock() {
        Ok(l) => l.reconcile(queued, &out.sessions),
        Err(_) => Reconciled::default(),
    };
    let (closed_codes, opened) = ledger
        .lock()
        .map(|l| (l.closed.clone(), l.opened))
        .unwrap_or_default();
    let final_sample = sampler
        .sample_stats(&out.stats, storms, None, None, None)
        .await;
    samples.push(final_sample);

    // The verdict.
    let warm = o.warmup.as_secs_f64();
    let window = 60f64
        .min((o.duration.as_secs_f64() - warm) / 2.0)
        .max(o.sample_every.as_secs_f64());
    let load = &samples[..load_end.max(1).min(samples.len())];
    let rss_at = |from: f64, to: f64| -> Option<f64> {
        let mut v: Vec<u64> = load
            .iter()
            .filter(|s| s.t >= from && s.t <= to)
            .filter_map(|s| s.rss_bytes)
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).map(|&m| m as f64)
    };
    let t_end = load.last().map(|s| s.t).unwrap_or(0.0);
    let rss_warm = rss_at(warm, warm + window);
    let rss_end = rss_at(t_end - window, t_end);
    let cpu: Vec<f64> = load
        .iter()
        .filter(|s| s.t >= warm)
        .filter_map(|s| s.cpu_pct)
        .collect();
    let p = &pushed;
    let hostile_left = hostile.left_open.load(Relaxed);
    let mut fails = Vec::new();
    if rec.lost_without_report > 0 {
        fails.push(format!(
            "{} pushes lost without a report",
            rec.lost_without_report
        ));
    }
    if hostile_left > 0 {
        fails.push(format!("{hostile_left} hostile connections left open"));
    }
    let mut rss_growth_pct = None;
    match (rss_warm, rss_end) {
        (Some(a), Some(b)) if t_end > warm => {
            let g = (b - a) / a * 100.0;
            rss_growth_pct = Some(g);
            if g > o.rss_tolerance {
                fails.push(format!(
                    "RSS grew {g:.1} % after the warm-up (tolerance {} %)",
                    o.rss_tolerance
                ));
            }
        }
        _ => fails.push("no RSS reading after the warm-up (give --pid or --metrics, and a --duration longer than --warmup)".into()),
    }
    if p.errors.load(Relaxed) > 0 {
        fails.push(format!("{} push requests failed", p.errors.load(Relaxed)));
    }

    let title = format!(
        "{} devices, {} of mixed load: {}/s unicast, {}/s broadcast to {}, {:.1} % slow, {}/s churn, {:.0} % storm every {}, {}/s hostile",
        c.conns,
        fmt_dur(o.duration),
        o.unicast_rate,
        o.broadcast_rate,
        if o.room { "a room" } else { "everyone" },
        if slow_every > 0 { 100.0 / slow_every as f64 } else { 0.0 },
        o.churn_rate,
        o.storm_fraction * 100.0,
        fmt_dur(o.storm_every),
        // None are opened over QUIC (see above).
        if c.quic { 0.0 } else { o.hostile_rate }
    );
    let mut r = scenario::report(
        "soak",
        title,
        &c,
        serde_json::json!({"upstream": u, "soak": o}),
        t0,
        &out,
    );
    let f = |r: &mut crate::report::RunReport, k: &str, l: &str, v: f64, unit: &str| {
        r.figure(k, l, v, unit)
    };
    if let (Some(a), Some(b)) = (rss_warm, rss_end) {
        f(
            &mut r,
            "rss_warm_mib",
            "gateway RSS at the end of the warm-up (median of a minute)",
            a / 1_048_576.0,
            "MiB",
        );
        f(
            &mut r,
            "rss_end_mib",
            "gateway RSS at the end (median of the last minute)",
            b / 1_048_576.0,
            "MiB",
        );
    }
    if let Some(g) = rss_growth_pct {
        f(
            &mut r,
            "rss_growth_pct",
            "RSS growth after the warm-up",
            g,
            "%",
        );
    }
    if let Some(max) = load.iter().filter_map(|s| s.rss_bytes).max() {
        f(
            &mut r,
            "rss_max_mib",
            "gateway RSS, highest sample",
            max as f64 / 1_048_576.0,
            "MiB",
        );
    }
    if !cpu.is_empty() {
        f(
            &mut r,
            "cpu_mean_pct",
            "gateway CPU after the warm-up, mean",
            cpu.iter().sum::<f64>() / cpu.len() as f64,
            "% of a core",
        );
        f(
            &mut r,
            "cpu_max_pct",
            "gateway CPU after the warm-up, highest sample",
            cpu.iter().cloned().fold(0.0, f64::max),
            "% of a core",
        );
    }
    f(
        &mut r,
        "push_requests",
        "push requests answered",
        p.requests.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "queued",
        "pushes accepted for a session (PushReply.sessions)",
        rec.queued as f64,
        "",
    );
    f(
        &mut r,
        "unreached",
        "push requests that reached no session",
        p.unreached.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "dropped",
        "pushes refused in the reply (PushReply.dropped)",
        p.dropped.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "delivered",
        "delivered: received by a device, once per (session, lane, seq)",
        rec.delivered as f64,
        "",
    );
    f(
        &mut r,
        "duplicates",
        "received again (duplicates, not counted above)",
        out.stats.seq_dups as f64,
        "",
    );
    f(
        &mut r,
        "reported_ok",
        "reported CODE_OK (acknowledged)",
        rec.reported_ok as f64,
        "",
    );
    f(
        &mut r,
        "reported_expired",
        "reported CODE_DELIVERY_EXPIRED",
        rec.reported_expired as f64,
        "",
    );
    f(
        &mut r,
        "reported_failed",
        "reported CODE_DELIVERY_FAILED",
        rec.reported_failed as f64,
        "",
    );
    f(
        &mut r,
        "delivered_but_reported",
        "delivered although reported expired or failed",
        (rec.delivered_but_expired + rec.delivered_but_failed) as f64,
        "",
    );
    f(
        &mut r,
        "delivered_unreported",
        "delivered, no report at all",
        rec.delivered_unreported as f64,
        "",
    );
    f(
        &mut r,
        "reports_dropped",
        "reports the gateway dropped (EventsDropped)",
        rec.reports_dropped as f64,
        "",
    );
    let buffer_dropped: u64 = sub.iter().flatten().map(|c| c.events_dropped()).sum();
    f(
        &mut r,
        "events_dropped_here",
        "events this tool's subscriber buffer dropped",
        buffer_dropped as f64,
        "",
    );
    f(
        &mut r,
        "repeated_reports",
        "second reports for one push",
        rec.repeated_reports as f64,
        "",
    );
    f(
        &mut r,
        "ok_not_delivered",
        "reported CODE_OK, never received",
        rec.ok_not_delivered as f64,
        "",
    );
    f(
        &mut r,
        "unreported_not_delivered",
        "never reported, never received",
        rec.unreported_not_delivered as f64,
        "",
    );
    f(
        &mut r,
        "lost_without_report",
        "LOST WITHOUT A REPORT",
        rec.lost_without_report as f64,
        "",
    );
    f(
        &mut r,
        "seq_gaps",
        "seqs skipped on the devices (gaps)",
        out.stats.seq_gaps as f64,
        "",
    );
    f(
        &mut r,
        "resume_gap_msgs",
        "pushes skipped by resume gaps",
        out.stats.resume_gap_msgs as f64,
        "",
    );
    f(&mut r, "storms", "reconnect storms", storms as f64, "");
    f(
        &mut r,
        "storm_drops",
        "devices dropped by storms",
        out.stats.storm_drops as f64,
        "",
    );
    f(&mut r, "resumes", "resumes", out.stats.resumes as f64, "");
    f(
        &mut r,
        "resume_new",
        "resumes refused (a new session)",
        out.stats.resume_new as f64,
        "",
    );
    f(
        &mut r,
        "churns",
        "goodbyes (churn)",
        out.stats.churns as f64,
        "",
    );
    f(
        &mut r,
        "slow_cut",
        "slow consumers cut off",
        out.stats.slow_closed as f64,
        "",
    );
    f(
        &mut r,
        "hostile_opened",
        "hostile connections opened",
        hostile.opened.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "hostile_connect_errors",
        "hostile connections that failed to connect",
        hostile.connect_errors.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "hostile_closed",
        "hostile connections closed by the gateway",
        hostile.closed.load(Relaxed) as f64,
        "",
    );
    f(
        &mut r,
        "hostile_left_open",
        "hostile connections left open past the deadline",
        hostile_left as f64,
        "",
    );
    f(
        &mut r,
        "hostile_max_close_s",
        "hostile connection, longest time to close",
        hostile.max_close_ms.load(Relaxed) as f64 / 1000.0,
        "s",
    );
    f(
        &mut r,
        "sessions_opened",
        "SessionOpened events",
        opened as f64,
        "",
    );
    for (code, n) in &closed_codes {
        f(
            &mut r,
            &format!("closed_{code}"),
            &format!("SessionClosed {}", crate::report::code_name(*code)),
            *n as f64,
            "",
        );
    }
    if p.errors.load(Relaxed) > 0 {
        let e = p
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default();
        r.failures.push(format!("push: {e}"));
    }
    let hostile_codes = hostile.codes.lock().map(|m| m.clone()).unwrap_or_default();
    let verdict = if fails.is_empty() {
        "PASS".to_owned()
    } else {
        format!("FAIL: {}", fails.join("; "))
    };
    r.soak = Some(serde_json::json!({
        "samples": samples,
        "load_samples": load_end,
        "reconciled": rec,
        "hostile_codes": hostile_codes,
        "rss_tolerance_pct": o.rss_tolerance,
        "verdict": verdict,
        "pass": fails.is_empty(),
    }));
    r.panels = panels(&samples);
    r.emit(c.json.as_deref(), c.plot.as_deref())?;
    print!("{}", table(&samples));
    println!("  hostile connections, close codes by kind: {hostile_codes:?}");
    println!("\nverdict: {verdict}");
    if o.check && !fails.is_empty() {
        std::process::exit(2);
    }
    Ok(())
}

fn fmt_dur(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 && s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{:.0} s", d.as_secs_f64())
    }
}

/// Sends pushes at `rate` per second to `target(n)` until `stop`, with
/// delivery reports asked for, at most `inflight` at once.
#[allow(clippy::too_many_arguments)]
async fn pump(
    ups: Vec<UpstreamClient>,
    rate: f64,
    inflight: usize,
    size: usize,
    tag: &'static str,
    mut target: impl FnMut(u64) -> pb::push_request::Target + Send + 'static,
    stop: Arc<AtomicBool>,
    c: Arc<PushCounters>,
) {
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while !stop.load(Relaxed) && !ups.is_empty() {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate)).await;
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let mut req = scenario::request(target(n), size);
        req.report_delivery = true;
        req.message_id = format!("{tag}{n}");
        let (up, c) = (ups[n as usize % ups.len()].clone(), c.clone());
        tasks.spawn(async move {
            let r = up.push(req).await;
            drop(permit);
            match r {
                Ok(r) => {
                    c.requests.fetch_add(1, Relaxed);
                    c.queued.fetch_add(r.sessions, Relaxed);
                    c.dropped.fetch_add(r.dropped, Relaxed);
                    c.unreached.fetch_add(u64::from(r.sessions == 0), Relaxed);
                }
                Err(e) => {
                    c.errors.fetch_add(1, Relaxed);
                    if let Ok(mut f) = c.first_error.lock() {
                        f.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        });
        while tasks.try_join_next().is_some() {}
        n += 1;
    }
    while tasks.join_next().await.is_some() {}
}

/// Opens hostile connections at `rate` per second until `stop`, then waits
/// for the last ones to be closed (or to pass their deadline).
async fn hostile_driver(
    addr: std::net::SocketAddr,
    rate: f64,
    deadline: Duration,
    stop: Arc<AtomicBool>,
    h: Arc<HostileCounters>,
) {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut n: u64 = 0;
    while !stop.load(Relaxed) {
        tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate)).await;
        let kind = HOSTILE[n as usize % HOSTILE.len()];
        tasks.spawn(hostile_conn(addr, kind, n, deadline, h.clone()));
        while tasks.try_join_next().is_some() {}
        n += 1;
    }
    while tasks.join_next().await.is_some() {}
}

/// One hostile connection: sends its kind of nonsense, then reads until
/// the gateway closes it or `deadline` passes.
async fn hostile_conn(
    addr: std::net::SocketAddr,
    kind: &'static str,
    n: u64,
    deadline: Duration,
    h: Arc<HostileCounters>,
) {
    let t0 = Instant::now();
    let conn =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await;
    let Ok(Ok(mut s)) = conn else {
        h.connect_errors.fetch_add(1, Relaxed);
        return;
    };
    h.opened.fetch_add(1, Relaxed);
    // xorshift from n: garbage that differs per connection.
    let mut x = n.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    };
    let bytes: Vec<u8> = match kind {
        // A small length, then bytes that are no protobuf (a string field
        // with invalid UTF-8 and a truncated varint), then random bytes.
        "garbage" => {
            let mut b = vec![
                0, 0, 0, 12, 0x12, 0x04, 0xff, 0xfe, 0xfd, 0xfc, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff,
            ];
            b.extend((0..256).map(|_| rand()));
            b
        }
        "zero_frames" => vec![0; 4 * 64],
        "silent" => Vec::new(),
        "oversized" => vec![0xff, 0xff, 0xff, 0xf0, 1, 2, 3, 4],
        // Half a frame, then silence: a slowloris.
        _ => vec![0, 0, 0, 100, 0x0a, 0x05],
    };
    if !bytes.is_empty() && s.write_all(&bytes).await.is_err() {
        // Refused at once: the gateway closed it.
        h.closed.fetch_add(1, Relaxed);
        return;
    }
    let mut buf = bytes::BytesMut::with_capacity(4096);
    let end = t0 + deadline;
    let closed = loop {
        buf.reserve(1024);
        match tokio::time::timeout_at(end, s.read_buf(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {
                if buf.len() > 1 << 20 {
                    buf.clear();
                }
            }
        }
    };
    let ms = t0.elapsed().as_millis() as u64;
    // The first Close the gateway sent, if any.
    let mut code = "no Close".to_owned();
    while let Ok(Some(f)) = tether::wire::decode_frame(&mut buf, 1 << 20) {
        use prost::Message as _;
        if let Ok(pb::ServerFrame { body: Some(b), .. }) = pb::ServerFrame::decode(&f[..]) {
            match b {
                pb::server_frame::Body::Close(c) => {
                    code = crate::report::code_name(c.code);
                    break;
                }
                pb::server_frame::Body::Error(e) if code == "no Close" => {
                    code = format!("Error {} then no Close", crate::report::code_name(e.code));
                }
                _ => {}
            }
        }
    }
    if closed {
        h.closed.fetch_add(1, Relaxed);
        h.max_close_ms.fetch_max(ms, Relaxed);
    } else {
        h.left_open.fetch_add(1, Relaxed);
        code = "left open".into();
    }
    if let Ok(mut m) = h.codes.lock() {
        *m.entry(format!("{kind}: {code}")).or_default() += 1;
    }
}

/// Everything a sample reads.
struct Sampler {
    gauge: Option<Gauge>,
    metrics: Option<String>,
    pid: Option<u32>,
    start: Instant,
    ledger: Arc<Mutex<Ledger>>,
    pushed: Arc<PushCounters>,
    hostile: Arc<HostileCounters>,
}

impl Sampler {
    async fn sample(
        &self,
        fleet: &coord::Fleet,
        storms: u64,
        cpu_prev: &mut Option<(u64, Instant)>,
    ) -> SoakSample {
        let rss = match &self.gauge {
            Some(g) => g.read().await,
            None => None,
        };
        let cpu = match (self.pid.and_then(cpu_ticks), cpu_prev.as_ref()) {
            (Some(now), Some(&(before, at))) => {
                let secs = at.elapsed().as_secs_f64().max(1e-3);
                *cpu_prev = Some((now, Instant::now()));
                Some(now.saturating_sub(before) as f64 / CLK_TCK / secs * 100.0)
            }
            (Some(now), None) => {
                *cpu_prev = Some((now, Instant::now()));
                None
            }
            _ => None,
        };
        self.sample_stats(&fleet.totals(), storms, rss, cpu, Some(()))
            .await
    }

    async fn sample_stats(
        &self,
        st: &crate::fleet::Stats,
        storms: u64,
        rss: Option<u64>,
        cpu: Option<f64>,
        scrape: Option<()>,
    ) -> SoakSample {
        let text = match (&self.metrics, scrape) {
            (Some(m), Some(())) => coord::scrape_text(m).await,
            _ => None,
        };
        let m = |name: &str| {
            text.as_deref()
                .and_then(|t| coord::metric_sum(t, name))
                .map(|v| v as u64)
        };
        let (ok, failed, expired, reports) = self
            .ledger
            .lock()
            .map(|l| (l.ok, l.failed, l.expired, l.reports()))
            .unwrap_or_default();
        let queued = self.pushed.queued.load(Relaxed);
        SoakSample {
            t: self.start.elapsed().as_secs_f64(),
            rss_bytes: rss.or_else(|| m(tether::metrics::RESIDENT_MEMORY)),
            cpu_pct: cpu,
            gw_connections: m(tether::metrics::CONNECTIONS),
            gw_sessions: m(tether::metrics::SESSIONS),
            gw_detached: m(tether::metrics::DETACHED),
            gw_events_dropped: m(tether::metrics::UPSTREAM_EVENTS_DROPPED),
            online: st.online,
            logins: st.logins,
            resumes: st.resumes,
            churns: st.churns,
            storms,
            push_requests: self.pushed.requests.load(Relaxed),
            queued,
            dropped: self.pushed.dropped.load(Relaxed),
            delivered: st.pushes + st.slow_pushes,
            duplicates: st.seq_dups,
            reported_ok: ok,
            reported_failed: failed,
            reported_expired: expired,
            unresolved: queued.saturating_sub(reports),
            slow_cut: st.slow_closed,
            hostile_opened: self.hostile.opened.load(Relaxed),
            hostile_closed: self.hostile.closed.load(Relaxed),
        }
    }
}

/// Clock ticks per second of /proc/PID/stat times: USER_HZ, 100 on every
/// Linux architecture this runs on.
pub(crate) const CLK_TCK: f64 = 100.0;

/// utime + stime of `pid`, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. utime and stime are fields 14 and 15 (state is 3).
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The table over time.
fn table(samples: &[SoakSample]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n  {:>6} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10} {:>10} {:>6} {:>10} {:>8} {:>6} {:>8} {:>5} {:>7}",
        "t s", "RSS MiB", "CPU %", "conns", "online", "detach", "accepted", "delivered", "dups", "rep. OK", "expired", "failed", "unresol.", "cut", "hostile"
    );
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    for x in samples {
        let _ = writeln!(
            s,
            "  {:>6.0} {:>8} {:>6} {:>6} {:>6} {:>7} {:>10} {:>10} {:>6} {:>10} {:>8} {:>6} {:>8} {:>5} {:>7}",
            x.t,
            x.rss_bytes.map(|r| format!("{:.1}", r as f64 / 1_048_576.0)).unwrap_or_else(|| "-".into()),
            x.cpu_pct.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into()),
            opt(x.gw_connections),
            x.online,
            opt(x.gw_detached),
            human(x.queued as f64),
            human(x.delivered as f64),
            x.duplicates,
            human(x.reported_ok as f64),
            x.reported_expired,
            x.reported_failed,
            x.unresolved,
            x.slow_cut,
            format!("{}/{}", x.hostile_closed, x.hostile_opened),
        );
    }
    s
}

/// Panels for the plot: memory, CPU, connections, and the books.
fn panels(samples: &[SoakSample]) -> Vec<Panel> {
    let line = |label: &str, f: &dyn Fn(&SoakSample) -> Option<f64>| Line {
        label: label.to_owned(),
        points: samples.iter().filter_map(|s| Some((s.t, f(s)?))).collect(),
    };
    // Steps over windows of at least 0.25 s: the samples at the end of the
    // load and of the drain can come just after a periodic one.
    let rate = |label: &str, f: &dyn Fn(&SoakSample) -> u64| Line {
        label: label.to_owned(),
        points: crate::report::rate_steps(samples, |s| s.t, f),
    };
    let panel = |title: &str, y: &str, lines: Vec<Line>| Panel {
        title: title.into(),
        x_label: "seconds".into(),
        y_label: y.into(),
        x_scale: XScale::Linear,
        y_log: false,
        lines: lines.into_iter().filter(|l| !l.points.is_empty()).collect(),
    };
    vec![
        panel(
            "Gateway resident memory",
            "MiB",
            vec![line("gateway RSS", &|s| {
                Some(s.rss_bytes? as f64 / 1_048_576.0)
            })],
        ),
        panel(
            "Gateway CPU",
            "% of one core",
            vec![line("gateway CPU", &|s| s.cpu_pct)],
        ),
        panel(
            "Connections",
            "count",
            vec![
                line("devices online", &|s| Some(s.online as f64)),
                line("gateway connections", &|s| Some(s.gw_connections? as f64)),
                line("detached sessions", &|s| Some(s.gw_detached? as f64)),
            ],
        ),
        panel(
            "Pushes per second",
            "per second",
            vec![
                rate("accepted", &|s| s.queued),
                rate("delivered", &|s| s.delivered),
                rate("reported OK", &|s| s.reported_ok),
                rate("reported expired + failed", &|s| {
                    s.reported_expired + s.reported_failed
                }),
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cpu_ticks_reads_this_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
    }
}
