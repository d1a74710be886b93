//! The `million` scenario: a whole cluster on this host, started by the
//! tool, and the phases of a million-connection test in one run.
//!
//! The tool starts a private nats-server and `--gateways` gateway
//! processes (their configs written into `--work-dir`), spreads `--conns`
//! devices over them (device `i` on gateway `i % gateways`; the last
//! `--tls-conns` over TLS), each in room `r<i % rooms>` and in room `all`
//! (both in its token), and runs, in order:
//!
//! 1. **ramp**: every device logs in (progress bars); the login rate.
//! 2. **hold**: `--hold` seconds idle, heartbeating at the gateways' hint;
//!    the gateways' RSS and the kernel's memory (slab, TCP socket memory)
//!    per connection, and the gateways' CPU per million idle connections.
//! 3. **broadcast**: one push to everyone; the time until the last device
//!    has it.
//! 4. **rooms**: one push to each room `r<k>`; the time until the last
//!    device has its own.
//! 5. **unicast**: `--unicast-rate` pushes a second for `--unicast-secs`,
//!    each to a random user through a random gateway; delivery latency
//!    (only these pushes carry a send time) and losses.
//! 6. **storm**: `--storm-permille` of the devices drop their connections
//!    at once and resume; lost and duplicated must both be 0.
//! 7. **restart**: `--restarts` gateways (all by default), one at a time,
//!    are sent SIGTERM, drain and start again, while unicasts
//!    (`--restart-push-rate`) and broadcasts (one every
//!    `--restart-broadcast-every` seconds) go through the gateways that are
//!    up; the devices of a draining gateway resume on the others. Every
//!    push carries a payload id and the books are kept per device, as in
//!    the `rolling-restart` scenario: lost and duplicated must both be 0.
//!
//! Each gateway takes `limits.max_connections` = its open-file limit less
//! 500, so that a gateway that is full refuses a device
//! (`CODE_TOO_MANY_CONNECTIONS`, and the device tries another) instead of
//! running out of descriptors.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use tether::wire::pb;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::coord::{Fleet, Fleets, Gauge};
use crate::fleet::{self, Stats};
use crate::scenario;
use crate::Common;

/// What the `million` scenario takes besides the common options (whose
/// `--addr` it sets itself).
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct MillionOpts {
    /// Gateway processes (each holds at most about 19,000 connections
    /// under a 20,000 open-file limit).
    #[arg(long, default_value_t = 3)]
    pub gateways: usize,
    /// The gateway binary (e.g. target/release/tether).
    #[arg(long)]
    pub gateway_bin: PathBuf,
    /// The nats-server binary; a private one runs on --nats-port.
    #[arg(long)]
    pub nats_server: PathBuf,
    #[arg(long, default_value_t = 27422)]
    pub nats_port: u16,
    /// Gateway k listens for devices on 127.0.0.1:(base+k) over TCP and
    /// (base+1000+k) over TLS, and for upstreams on (base+2000+k).
    #[arg(long, default_value_t = 30000)]
    pub base_port: u16,
    /// The last N devices connect over TLS.
    #[arg(long, default_value_t = 0)]
    pub tls_conns: usize,
    /// Rooms `r0`.. the devices are spread over (besides `all`).
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,
    /// Seconds the devices idle before the pushes.
    #[arg(long, default_value_t = 30)]
    pub hold: u64,
    #[arg(long, default_value_t = 1000)]
    pub unicast_rate: u64,
    #[arg(long, default_value_t = 10)]
    pub unicast_secs: u64,
    /// Devices per mille that drop and resume at once.
    #[arg(long, default_value_t = 100)]
    pub storm_permille: u32,
    /// Gateway configs, logs and the development certificate.
    #[arg(long)]
    pub work_dir: PathBuf,
    /// Seconds a push phase, or the storm, may take.
    #[arg(long, default_value_t = 120)]
    pub phase_timeout: u64,
    /// Gateways restarted, one at a time, in the last phase (gateway 0
    /// first); all of them when not given, none with 0.
    #[arg(long)]
    pub restarts: Option<usize>,
    /// Unicasts a second while the gateways restart.
    #[arg(long, default_value_t = 100.0)]
    pub restart_push_rate: f64,
    /// Seconds between broadcasts while the gateways restart (0: none).
    /// Each device keeps the id of every push it received for the books,
    /// so at a million devices every broadcast costs the load tool about
    /// 16 MB.
    #[arg(long, default_value_t = 10.0)]
    pub restart_broadcast_every: f64,
    /// Seconds of pushes before the first restart and after each.
    #[arg(long, default_value_t = 2.0)]
    pub restart_settle: f64,
    /// Seconds a gateway may take to exit after SIGTERM, to start, and its
    /// devices to be online again.
    #[arg(long, default_value_t = 120)]
    pub restart_timeout: u64,
    /// The gateways' `shutdown.drain_timeout`, in seconds: how long a
    /// restarting gateway waits for its sessions to be taken by the others
    /// before it ends the rest.
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// The gateways' `bus.request_timeout`, in milliseconds (which also
    /// sets how long a moved session's new node remembers the pushes it
    /// holds).
    #[arg(long, default_value_t = 2000)]
    pub bus_request_timeout_ms: u64,
}

/// The upstream secret the generated configs use.
const UPSTREAM_SECRET: &str = tether::config::DEV_UPSTREAM_SECRET;

/// Writes gateway `k`'s config; its device, TLS and upstream addresses.
fn write_config(o: &MillionOpts, k: usize) -> anyhow::Result<(PathBuf, String, String, String)> {
    let port = |off: usize| -> anyhow::Result<u16> {
        u16::try_from(usize::from(o.base_port) + off + k).context("--base-port too high")
    };
    let (tcp, tls, up) = (
        format!("127.0.0.1:{}", port(0)?),
        format!("127.0.0.1:{}", port(1000)?),
        format!("127.0.0.1:{}", port(2000)?),
    );
    let tls_list = if o.tls_conns > 0 {
        format!("[\"{tls}\"]")
    } else {
        "[]".into()
    };
    let certs = o.work_dir.join("certs");
    let cfg = format!(
        r#"node_id = "node-{k}"
[listen]
tcp = ["{tcp}"]
tls = {tls_list}
quic = []
[upstream]
tcp = "{up}"
[metrics]
listen = ""
[limits]
login_rate = 0
max_pending_logins = 0
max_connections = {max_conns}
[tls]
dev_cert_dir = "{certs}"
[shutdown]
drain_timeout = "{drain}s"
[bus]
kind = "nats"
urls = ["nats://127.0.0.1:{nats}"]
cluster = "million"
request_timeout = "{rt}ms"
resume_secret = "the million scenario's cluster-wide resume secret"
"#,
        certs = certs.display(),
        nats = o.nats_port,
        max_conns = max_connections(),
        drain = o.drain_timeout.max(1),
        rt = o.bus_request_timeout_ms,
    );
    let path = o.work_dir.join(format!("node-{k}.toml"));
    std::fs::write(&path, cfg).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, tcp, tls, up))
}

/// A gateway's `limits.max_connections`: the open-file limit it inherits
/// (raised to the hard one) less 500 for its listeners, the bus, logs and
/// handshakes in progress; 0 (no cap) when the limit cannot be read.
fn max_connections() -> u64 {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((_, hard)) if hard > 1000 => hard.min(u64::from(u32::MAX)) - 500,
        _ => 0,
    }
}

/// Kernel memory now, in bytes: slab, and TCP socket buffers.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Kernel {
    slab: u64,
    tcp_mem: u64,
}

fn kernel() -> Kernel {
    let slab = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Slab:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024);
    // "TCP: inuse N orphan N tw N alloc N mem PAGES"
    let tcp_mem = std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("TCP:"))?;
            let mut w = l.split_whitespace();
            w.position(|x| x == "mem")?;
            w.next()?.parse::<u64>().ok()
        })
        .map_or(0, |p| p * 4096);
    Kernel { slab, tcp_mem }
}

/// CPU seconds (user and system) the processes `pids` used so far.
fn cpu_s(pids: &[u32]) -> f64 {
    let ticks: u64 = pids.iter().filter_map(|&p| crate::soak::cpu_ticks(p)).sum();
    ticks as f64 / crate::soak::CLK_TCK
}

/// A push whose payload carries no send time (fewer than 8 bytes), so that
/// only the unicasts feed the latency histogram.
fn untimed(target: pb::push_request::Target) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(target),
        payload: b"tick".to_vec().into(),
        ..Default::default()
    }
}

pub async fn million(mut c: Common, o: MillionOpts) -> anyhow::Result<()> {
    anyhow::ensure!(o.gateways > 0, "--gateways must be at least 1");
    anyhow::ensure!(o.tls_conns <= c.conns, "--tls-conns is more than --conns");
    // While a gateway restarts, its devices need room on the others.
    let cap = max_connections() as usize;
    let restarts = o.restarts.unwrap_or(o.gateways).min(o.gateways);
    if restarts > 0 && cap > 0 {
        let room = (o.gateways - 1) * cap;
        anyhow::ensure!(
            c.conns <= room,
            "a rolling restart needs room for every device on the other gateways: {} devices, {} gateways of {cap} connections each hold {room} while one restarts; use --gateways {} or more, or --restarts 0",
            c.conns,
            o.gateways,
            c.conns.div_ceil(cap) + 1
        );
    }
    std::fs::create_dir_all(&o.work_dir)
        .with_context(|| format!("creating {}", o.work_dir.display()))?;
    // The gateways inherit this process's limit.
    fleet::raise_nofile();
    let mut configs = Vec::new();
    let (mut tcp, mut tls, mut ups) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..o.gateways {
        let (cfg, a, t, u) = write_config(&o, k)?;
        configs.push(cfg);
        tcp.push(a.parse()?);
        tls.push(t.parse()?);
        ups.push(u);
    }
    let mut cluster = Cluster::new(
        o.gateway_bin.clone(),
        configs,
        tcp.clone(),
        ups.clone(),
        Some(o.work_dir.join("logs")),
        // SIGTERM to exit: the drain, and time to spare.
        Duration::from_secs(o.drain_timeout.saturating_add(30).max(60)),
    );
    let run = run(&mut c, &o, &mut cluster, tls, &ups).await;
    cluster.stop_all().await;
    let (report, pass) = run?;
    report.emit(c.json.as_deref(), c.plot.as_deref())?;
    anyhow::ensure!(pass, "million failed: {}", report.failures.join("; "));
    Ok(())
}

async fn run(
    c: &mut Common,
    o: &MillionOpts,
    cluster: &mut Cluster,
    tls: Vec<std::net::SocketAddr>,
    ups: &[String],
) -> anyhow::Result<(crate::report::RunReport, bool)> {
    let mut failures = Vec::new();
    let k0 = kernel();
    cluster.start_nats(&o.nats_server, o.nats_port).await?;
    for k in 0..o.gateways {
        cluster.start(k).await?;
    }
    let pids = cluster.pids();
    let gateways_rss = Gauge::Pids(pids.clone());
    let rss0 = gateways_rss.read().await.unwrap_or(0);
    c.addr = cluster.addrs().to_vec();
    let total = c.conns;
    let plain = total - o.tls_conns;
    let ramp = Instant::now();
    let mut fleets = Vec::new();
    let mut t0 = 0;
    for (first, count, over_tls) in [(0, plain, false), (plain, o.tls_conns, true)] {
        if count == 0 {
            continue;
        }
        let mut fc = c.clone();
        fc.conns = count;
        fc.ramp = c.ramp * count as f64 / total as f64;
        fc.tls = over_tls;
        if over_tls {
            fc.addr = tls.clone();
            fc.ca = Some(o.work_dir.join("certs").join(tether::tls::DEV_CERT));
        }
        let mut spec = scenario::spec(&fc)?;
        spec.first = first;
        spec.room = Some("all".into());
        spec.rooms = o.rooms;
        spec.record_sessions = false;
        // The restart phase: devices move to another gateway when theirs
        // drains, and keep the payload ids they receive for the books.
        spec.failover = true;
        spec.record_ids = true;
        let workers = fc
            .workers
            .unwrap_or(count.div_ceil(crate::coord::PER_WORKER).max(1));
        let gauge = fleets.is_empty().then(|| gateways_rss.clone());
        let fleet = Fleet::start(spec, workers, gauge, c.quiet).await?;
        if t0 == 0 {
            t0 = unix_ms();
        }
        fleets.push((fleet, fc));
    }
    let mut online = 0;
    for (f, _) in &fleets {
        online += ramped(f).await?.online;
    }
    let ramp_s = ramp.elapsed().as_secs_f64();
    let fleets_only = Fleets(fleets.iter().map(|(f, _)| f).collect());
    if online < total as u64 {
        failures.push(format!("{online} of {total} devices online after the ramp"));
    }

    // Hold: idle, heartbeating.
    let cpu_before = cpu_s(&pids);
    let hold = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.hold)).await;
    let hold_s = hold.elapsed().as_secs_f64();
    let cpu_hold = cpu_s(&pids) - cpu_before;
    let k1 = kernel();
    let rss1 = gateways_rss.read().await.unwrap_or(0);
    let nats_rss = cluster
        .nats_pid()
        .and_then(crate::coord::rss_kib)
        .map_or(0, |k| k * 1024);

    let mut clients = Vec::new();
    for ep in ups {
        clients.push(crate::cluster::connect(ep, UPSTREAM_SECRET).await?);
    }
    let timeout = Duration::from_secs(o.phase_timeout);

    // Broadcast to everyone, through gateway 0.
    let before = fleets_only.totals().pushes;
    let b = Instant::now();
    let r = clients[0]
        .push(untimed(pb::push_request::Target::Everyone(true)))
        .await;
    if let Err(e) = &r {
        failures.push(format!("the broadcast was refused: {e}"));
    }
    let (after, all) = fleets_only
        .wait_for(timeout, |s| s.pushes >= before + online)
        .await;
    let broadcast_s = b.elapsed().as_secs_f64();
    let broadcast_lost = (before + online).saturating_sub(after.pushes);
    if !all {
        failures.push(format!(
            "the broadcast reached {} of {online} devices",
            after.pushes - before
        ));
    }

    // One push to each room, spread over the gateways.
    let before = fleets_only.totals().pushes;
    let rb = Instant::now();
    let mut room_errors = 0;
    if o.rooms > 0 {
        let mut tasks = tokio::task::JoinSet::new();
        for (g, client) in clients.iter().enumerate() {
            let client = client.clone();
            let (rooms, n) = (o.rooms, clients.len());
            tasks.spawn(async move {
                let mut errors = 0u64;
                for room in (g..rooms).step_by(n) {
                    let t = pb::push_request::Target::Room(format!("r{room}"));
                    if client.push(untimed(t)).await.is_err() {
                        errors += 1;
                    }
                }
                errors
            });
        }
        while let Some(r) = tasks.join_next().await {
            room_errors += r.unwrap_or(1);
        }
    }
    let want = if o.rooms > 0 { online } else { 0 };
    let (after, all) = fleets_only
        .wait_for(timeout, |s| s.pushes >= before + want)
        .await;
    let rooms_s = rb.elapsed().as_secs_f64();
    let rooms_lost = (before + want).saturating_sub(after.pushes);
    if !all || room_errors > 0 {
        failures.push(format!(
            "room pushes reached {} of {want} devices ({room_errors} refused)",
            after.pushes - before
        ));
    }

    // Unicasts at a steady rate to random users through random gateways.
    let before = fleets_only.totals().pushes;
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let u = Instant::now();
    let n = o.unicast_rate.saturating_mul(o.unicast_secs);
    let every = Duration::from_secs_f64(1.0 / o.unicast_rate.max(1) as f64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ unix_ms();
    for i in 0..n {
        // xorshift: a different user and gateway each time.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let user = format!("{}{}", c.prefix, rng % total as u64);
        let client = clients[(rng >> 32) as usize % clients.len()].clone();
        let (sent, errors) = (sent.clone(), errors.clone());
        tasks.spawn(async move {
            // The send time alone (8 bytes): no payload id, which only
            // the restart phase's pushes carry.
            let req = scenario::request(pb::push_request::Target::UserId(user), 8);
            match client.push(req).await {
                Ok(r) if r.sessions > 0 => {
                    sent.fetch_add(1, Relaxed);
                }
                _ => {
                    errors.fetch_add(1, Relaxed);
                }
            }
        });
        tokio::time::sleep_until(u + every * (i as u32 + 1)).await;
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let unicast_s = u.elapsed().as_secs_f64();
    let sent = sent.load(Relaxed);
    let unicast_errors = errors.load(Relaxed);
    let (after, _) = fleets_only
        .wait_for(timeout, |s| s.pushes >= before + sent)
        .await;
    let unicast_lost = (before + sent).saturating_sub(after.pushes);
    if unicast_lost > 0 || unicast_errors > 0 {
        failures.push(format!(
            "unicasts: {unicast_lost} of {sent} lost, {unicast_errors} refused or not found"
        ));
    }

    // Reconnect storm.
    let before = fleets_only.totals();
    let s = Instant::now();
    for f in &fleets_only.0 {
        f.command(fleet::Command::Storm {
            permille: o.storm_permille,
        })
        .await;
    }
    // Done when some dropped, each of them came back, every device is
    // online again, and no more drops came in for a second (the workers
    // report every 200 ms; each drops its share when the command reaches
    // it).
    let back = |t: &Stats| {
        let dropped = t.storm_drops - before.storm_drops;
        dropped > 0
            && t.resumes + t.resume_new >= before.resumes + before.resume_new + dropped
            && t.online >= online
    };
    let deadline = s + timeout;
    let (during, all, storm_s) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, ok) = fleets_only.wait_for(left, back).await;
        let at = s.elapsed().as_secs_f64();
        if !ok {
            break (t, false, at);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t2 = fleets_only.totals();
        if t2.storm_drops == t.storm_drops && back(&t2) {
            break (t, true, at);
        }
    };
    if !all {
        failures.push("not every dropped device resumed".into());
    }
    // A broadcast after the storm: every device, resumed or not, has it.
    let before_b = fleets_only.totals().pushes;
    if clients[0]
        .push(untimed(pb::push_request::Target::Everyone(true)))
        .await
        .is_err()
    {
        failures.push("the broadcast after the storm was refused".into());
    }
    let (after, _) = fleets_only
        .wait_for(timeout, |s| s.pushes >= before_b + online)
        .await;
    let after_storm_lost = (before_b + online).saturating_sub(after.pushes);

    // Rolling restart under load, with the books kept by payload id.
    let restarts = o.restarts.unwrap_or(o.gateways).min(o.gateways);
    let rolled = if restarts > 0 {
        let users: Vec<String> = (0..total).map(|i| format!("{}{i}", c.prefix)).collect();
        let phase = crate::cluster::RollingPhase {
            ups,
            secret: UPSTREAM_SECRET,
            users: &users,
            load: crate::cluster::PushLoad {
                push_rate: o.restart_push_rate.max(0.0),
                broadcast_rate: if o.restart_broadcast_every > 0.0 {
                    1.0 / o.restart_broadcast_every
                } else {
                    0.0
                },
                size: 16,
                devices: total,
                prefix: c.prefix.clone(),
                inflight: 64,
            },
            settle: Duration::from_secs_f64(o.restart_settle.max(0.0)),
            order: (0..restarts).map(|k| (k, 1)).collect(),
            online,
            restart_timeout: o.restart_timeout,
        };
        let r = crate::cluster::roll(phase, cluster, &fleets_only, clients.clone(), ramp).await?;
        failures.extend(r.failures.iter().cloned());
        Some(r)
    } else {
        None
    };

    drop(fleets_only);
    let mut outs = Vec::new();
    for (f, _) in fleets {
        outs.push(f.finish().await);
    }
    let mut out = outs.remove(0);
    for o2 in outs {
        out.stats.add(&o2.stats);
        for (into, from) in [
            (&mut out.login, &o2.login),
            (&mut out.resume, &o2.resume),
            (&mut out.push, &o2.push),
        ] {
            let _ = into.add(from);
        }
        out.failures.extend(o2.failures);
        out.ids.extend(o2.ids);
    }
    let title = format!(
        "{total} devices ({} over TLS) on {} gateways, {} rooms",
        o.tls_conns, o.gateways, o.rooms
    );
    let mut r = scenario::report(
        "million",
        title,
        c,
        serde_json::json!({ "million": o, "kernel_before": k0, "kernel_held": k1 }),
        t0,
        &out,
    );
    let per = |v: f64| v / online.max(1) as f64;
    r.figure("online", "devices online after the ramp", online as f64, "");
    r.figure("ramp_s", "seconds to log every device in", ramp_s, "s");
    r.figure(
        "login_rate",
        "logins per second over the ramp",
        online as f64 / ramp_s.max(1e-3),
        "/s",
    );
    r.figure(
        "gateway_rss_per_conn",
        "gateways' RSS growth per connection (all gateways, from their start)",
        per(rss1.saturating_sub(rss0) as f64),
        "B",
    );
    r.figure(
        "gateway_rss_total",
        "gateways' RSS, all together, after the hold",
        rss1 as f64,
        "B",
    );
    r.figure(
        "nats_rss",
        "the nats-server's RSS after the hold",
        nats_rss as f64,
        "B",
    );
    r.figure(
        "kernel_slab_per_conn",
        "kernel slab growth per connection (both ends on this host)",
        per(k1.slab.saturating_sub(k0.slab) as f64),
        "B",
    );
    r.figure(
        "kernel_tcp_mem_per_conn",
        "TCP socket buffer memory per connection (both ends)",
        per(k1.tcp_mem.saturating_sub(k0.tcp_mem) as f64),
        "B",
    );
    r.figure(
        "heartbeat_cores_per_million",
        "gateway CPU while idle, in cores per million connections",
        cpu_hold / hold_s.max(1e-3) / online.max(1) as f64 * 1e6,
        "",
    );
    r.figure(
        "broadcast_s",
        "broadcast: seconds until the last device had it",
        broadcast_s,
        "s",
    );
    r.figure(
        "broadcast_lost",
        "broadcast: devices that did not get it",
        broadcast_lost as f64,
        "",
    );
    r.figure(
        "rooms_s",
        "room pushes: seconds until every device had its own",
        rooms_s,
        "s",
    );
    r.figure(
        "rooms_lost",
        "room pushes: deliveries missing",
        rooms_lost as f64,
        "",
    );
    r.figure("unicast_sent", "unicasts accepted", sent as f64, "");
    r.figure(
        "unicast_rate",
        "unicasts per second sent",
        sent as f64 / unicast_s.max(1e-3),
        "/s",
    );
    r.figure(
        "unicast_lost",
        "unicasts not delivered",
        unicast_lost as f64,
        "",
    );
    r.figure(
        "storm_dropped",
        "devices that dropped in the storm",
        (during.storm_drops - before.storm_drops) as f64,
        "",
    );
    r.figure(
        "storm_s",
        "seconds until every dropped device resumed",
        storm_s,
        "s",
    );
    r.figure(
        "storm_resume_new",
        "storm resumes refused (a new session)",
        (during.resume_new - before.resume_new) as f64,
        "",
    );
    r.figure(
        "after_storm_lost",
        "broadcast after the storm: devices that did not get it",
        after_storm_lost as f64,
        "",
    );
    let mut restart_lost = 0;
    if let Some(rolled) = &rolled {
        let t = crate::cluster::tally(&rolled.sent, total, &out.ids);
        crate::cluster::restart_figures(&mut r, rolled);
        for (key, label, v) in [
            (
                "restart_accepted_unicasts",
                "restart phase: unicasts accepted (no node failed)",
                t.accepted_unicasts,
            ),
            (
                "restart_accepted_broadcasts",
                "restart phase: broadcasts accepted (no node failed)",
                t.accepted_broadcasts,
            ),
            (
                "restart_refused",
                "restart phase: pushes a node failed in part, or that failed (the upstream was told)",
                t.refused + t.failed,
            ),
            (
                "restart_due",
                "restart phase: deliveries due",
                t.due,
            ),
            (
                "restart_lost",
                "restart phase: deliveries lost (due, not received)",
                t.lost,
            ),
            (
                "restart_unexpected",
                "restart phase: payloads received that no push sent",
                t.unexpected,
            ),
        ] {
            r.figure(key, label, v as f64, "");
        }
        crate::cluster::lost_examples(&mut r, &t, &c.prefix);
        if t.accepted_unicasts + t.accepted_broadcasts == 0 {
            r.failures
                .push("restart phase: no push was accepted".into());
        }
        if out.stats.ids_overflow > 0 {
            r.failures
                .push(format!("{} payload ids not kept", out.stats.ids_overflow));
        }
        restart_lost = t.lost;
    }
    let duplicated = out.stats.seq_dups + out.stats.id_dups;
    r.figure(
        "duplicated",
        "pushes a device got twice (a seq, or a payload id, seen before)",
        duplicated as f64,
        "",
    );
    r.figure(
        "seq_gaps",
        "gaps in a device's seqs",
        out.stats.seq_gaps as f64,
        "",
    );
    let lost = broadcast_lost + rooms_lost + unicast_lost + after_storm_lost + restart_lost;
    r.figure("lost", "deliveries lost, all phases", lost as f64, "");
    r.failures.extend(failures);
    if lost > 0 || duplicated > 0 || out.stats.seq_gaps > 0 {
        r.failures.push(format!(
            "{lost} lost, {duplicated} duplicated, {} seq gaps (all must be 0)",
            out.stats.seq_gaps
        ));
    }
    let pass = r.failures.is_empty();
    Ok((r, pass))
}

/// How long the ramp may go without one more device settling.
const RAMP_STALL: Duration = Duration::from_secs(60);

/// Waits until every device of `fleet` made its first login attempt, for
/// as long as devices keep settling: at this scale the ramp runs as fast
/// as the host's CPU lets it, not at `--ramp`.
async fn ramped(fleet: &Fleet) -> anyhow::Result<Stats> {
    let mut settled = 0;
    loop {
        match fleet.wait_ready(RAMP_STALL).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                let now = fleet.totals().settled;
                if now <= settled || fleet.worker_failure().is_some() {
                    return Err(e.context(format!(
                        "no device settled in the last {} s of the ramp",
                        RAMP_STALL.as_secs()
                    )));
                }
                settled = now;
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
