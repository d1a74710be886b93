//! The scenarios: each starts a fleet, drives the upstream side, waits for
//! the deliveries, and turns the outcome into a [`RunReport`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tether::upstream::{Endpoint, EventStream, UpstreamClient, UpstreamOptions};
use tether::wire::pb;
use tokio::time::Instant;

use crate::coord::{Fleet, Gauge, PER_WORKER};
use crate::fleet::{self, FleetSpec, QuicSpec, RedisSpec, Stats, TlsSpec};
use crate::redis::{self, Publish, Publisher};
use crate::report::RunReport;
use crate::{Common, Pushes, Upstream};

/// The room devices join with `--room` (and redis subscribers' room channel).
const ROOM: &str = "bench";

/// Holds devices (in a room with `room`), or redis subscribers with
/// `redis`, and reports the server's memory per connection.
///
/// # Errors
/// When the fleet cannot start or settle.
pub async fn idle(
    c: Common,
    hold: u64,
    room: bool,
    redis: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let gauge = gauge(&c);
    let mut spec = match redis {
        Some(addr) => redis_spec(&c, addr, true)?,
        None => spec(&c)?,
    };
    if room {
        spec.room = Some(ROOM.into());
    }
    let server = server(redis);
    let (fleet, t0) = start(&c, spec).await?;
    let ready = wait_ready(&fleet, &c).await?;
    let ramp = fleet.elapsed();
    tokio::time::sleep(Duration::from_secs(hold)).await;
    let full = match &gauge {
        Some(g) => g.read().await,
        None => None,
    };
    let online = fleet.totals().online;
    let out = fleet.finish().await;
    let held = match (redis, room) {
        (Some(_), true) => format!(
            "{} redis subscribers on u:<user> and {} held {hold} s",
            c.conns,
            redis::room_channel(ROOM)
        ),
        (Some(_), false) => format!("{} redis subscribers on u:<user> held {hold} s", c.conns),
        (None, true) => format!("{} devices in a room held {hold} s", c.conns),
        (None, false) => format!("{} devices held {hold} s", c.conns),
    };
    let mut r = report(
        "idle",
        held,
        &c,
        serde_json::json!({"hold_s": hold, "room": room, "redis": redis}),
        t0,
        &out,
    );
    r.figure("online", "devices online", online as f64, "");
    r.figure(
        "login_rate",
        "logins per second (ramp)",
        ready.logins as f64 / ramp.as_secs_f64().max(1e-3),
        "/s",
    );
    if let (Some(full), Some(base)) = (full, out.timeline.iter().find_map(|s| s.gateway_rss)) {
        r.figure(
            "gateway_rss",
            &format!("{server} RSS at the end"),
            full as f64 / 1_048_576.0,
            "MiB",
        );
        if online > 0 {
            r.figure(
                "rss_per_conn_total",
                &format!("{server} RSS growth per device (total)"),
                full.saturating_sub(base) as f64 / online as f64,
                "B",
            );
        }
        // The slope from a quarter of the devices on excludes fixed costs
        // (thread stacks, first allocations of every size class).
        let quarter = out
            .timeline
            .iter()
            .find(|s| s.online >= (c.conns as u64 / 4).max(1) && s.gateway_rss.is_some());
        if let Some(q) = quarter {
            let (n0, r0) = (q.online, q.gateway_rss.unwrap_or(full));
            if online > n0 {
                r.figure(
                    "rss_per_conn_slope",
                    &format!("{server} RSS slope per device ({n0} to {online})"),
                    full.saturating_sub(r0) as f64 / (online - n0) as f64,
                    "B",
                );
            }
        }
    }
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// Broadcast to everyone or to a room; with `redis`, PUBLISH to the one
/// channel every subscriber is on.
///
/// # Errors
/// When the fleet or the upstream cannot start.
pub async fn broadcast(
    c: Common,
    u: Upstream,
    p: Pushes,
    room: bool,
    redis: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let batch = batch_of(&p, redis)?;
    let mut spec = push_spec(&c, &u, &p, redis, false)?;
    if room || redis.is_some() {
        spec.room = Some(ROOM.into());
    }
    let (fleet, t0) = start(&c, spec).await?;
    let ready = wait_ready(&fleet, &c).await?;
    let mut converge = None;
    let (tally, gateways, start_ns, waits_before) = match redis {
        None => {
            let (ups, _) = upstreams(&u, false).await?;
            if p.cross_node {
                converge = Some(crate::cluster::converge(&ups, &c, ready.online).await);
            }
            let waits_before = gateway_waits(&c).await;
            let target = if room {
                pb::push_request::Target::Room(ROOM.into())
            } else {
                pb::push_request::Target::Everyone(true)
            };
            let gateways = ups.len();
            // One request per gateway reaches the devices online there;
            // across nodes, one request reaches them all.
            let per_push = if p.cross_node { 1 } else { gateways.max(1) };
            let fanout = ready.online.div_ceil(per_push as u64);
            let window = Window::new(&fleet, p.max_inflight_deliveries, fanout * batch as u64);
            let start_ns = fleet::unix_nanos();
            let tally = drive(&ups, p.msgs, p.rate, batch, u.inflight, None, window, |n| {
                if p.cross_node {
                    vec![(n % gateways.max(1), request(target.clone(), p.size))]
                } else {
                    (0..gateways)
                        .map(|g| (g, request(target.clone(), p.size)))
                        .collect()
                }
            })
            .await;
            (tally, per_push, start_ns, waits_before)
        }
        Some(addr) => {
            let pubs = vec![redis::publishers(addr, u.upstreams).await?];
            let channel = redis::room_channel(ROOM);
            let window = Window::new(&fleet, p.max_inflight_deliveries, ready.online);
            let start_ns = fleet::unix_nanos();
            let waits_before = gateway_waits(&c).await;
            let tally = drive(&pubs, p.msgs, p.rate, 1, u.inflight, None, window, |_| {
                vec![(0, publish(&channel, p.size))]
            })
            .await;
            (tally, 1, start_ns, waits_before)
        }
    };
    let expected = everyone_expected(&c, &tally, gateways);
    let got = settle(&fleet, tally.queued, Some(expected)).await;
    let out = fleet.finish().await;
    let rate = if p.rate > 0 {
        format!(" at {}/s", p.rate)
    } else {
        String::new()
    };
    let title = match redis {
        Some(_) => format!(
            "{} redis subscribers on one channel, {} PUBLISHes of {} B{rate}",
            c.conns, p.msgs, p.size
        ),
        None => format!(
            "{} devices, {} pushes of {} B to {}{rate}{}",
            c.conns,
            p.msgs,
            p.size,
            if room { "a room" } else { "everyone" },
            cross_title(&p, &c),
        ),
    };
    let mut r = report(
        "broadcast",
        title,
        &c,
        serde_json::json!({"upstream": u, "pushes": p, "room": room, "redis": redis}),
        t0,
        &out,
    );
    push_figures(
        &mut r,
        server(redis),
        &tally,
        &got,
        start_ns,
        Some(expected),
    );
    converge_figure(&mut r, converge);
    gateway_wait_figures(&mut r, waits_before, gateway_waits(&c).await);
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// The title's note on `--cross-node`.
fn cross_title(p: &Pushes, c: &Common) -> String {
    if p.cross_node {
        format!(", across a cluster of {} gateways", c.addr.len())
    } else {
        String::new()
    }
}

/// How long the cluster took to see every device from every gateway
/// (`--cross-node`), or that it never did.
fn converge_figure(r: &mut RunReport, converge: Option<Result<f64, String>>) {
    match converge {
        Some(Ok(s)) => r.figure(
            "cluster_converge_s",
            "seconds until every gateway saw every device",
            s,
            "s",
        ),
        Some(Err(e)) => r.failures.push(e),
        None => {}
    }
}

/// The gateway that takes unicast `n` to the user of device `t`: the one
/// holding it (`t mod gateways`, as the devices spread), or with
/// `cross_node` one of the others, round robin over them by `n`.
pub(crate) fn unicast_gateway(t: usize, n: usize, gateways: usize, cross_node: bool) -> usize {
    let g = gateways.max(1);
    let home = t % g;
    if cross_node && g > 1 {
        (home + 1 + n % (g - 1)) % g
    } else {
        home
    }
}

/// Unicast pushes to random users; with `redis`, PUBLISH to their channels.
///
/// # Errors
/// When the fleet or the upstream cannot start.
pub async fn unicast(
    c: Common,
    u: Upstream,
    p: Pushes,
    redis: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let batch = batch_of(&p, redis)?;
    let spec = push_spec(&c, &u, &p, redis, true)?;
    let (fleet, t0) = start(&c, spec).await?;
    let ready = wait_ready(&fleet, &c).await?;
    // A fixed pseudo-random sequence of targets (xorshift), so runs compare.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let conns = c.conns.max(1) as u64;
    let targets: Vec<usize> = (0..p.msgs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % conns) as usize
        })
        .collect();
    let prefix = c.prefix.clone();
    let window = Window::new(&fleet, p.max_inflight_deliveries, batch as u64);
    let mut converge = None;
    let (tally, start_ns, waits_before) = match redis {
        None => {
            let (ups, _) = upstreams(&u, false).await?;
            if p.cross_node {
                converge = Some(crate::cluster::converge(&ups, &c, ready.online).await);
            }
            let waits_before = gateway_waits(&c).await;
            let gateways = ups.len();
            let addrs = c.addr.len().max(1);
            let start_ns = fleet::unix_nanos();
            let tally = drive(&ups, p.msgs, p.rate, batch, u.inflight, None, window, |n| {
                let t = targets[n];
                let user = pb::push_request::Target::UserId(format!("{prefix}{t}"));
                // With one upstream socket for several listeners, gateway 0.
                let g = unicast_gateway(t % addrs, n, addrs, p.cross_node) % gateways.max(1);
                vec![(g, request(user, p.size))]
            })
            .await;
            (tally, start_ns, waits_before)
        }
        Some(addr) => {
            let pubs = vec![redis::publishers(addr, u.upstreams).await?];
            let waits_before = gateway_waits(&c).await;
            let start_ns = fleet::unix_nanos();
            let tally = drive(&pubs, p.msgs, p.rate, 1, u.inflight, None, window, |n| {
                let user = format!("{prefix}{}", targets[n]);
                vec![(0, publish(&redis::user_channel_of(&user), p.size))]
            })
            .await;
            (tally, start_ns, waits_before)
        }
    };
    let fast = targets
        .iter()
        .filter(|&&t| c.slow_every == 0 || t % c.slow_every != 0)
        .count() as u64;
    let expected = (tally.errors == 0).then_some(fast);
    let got = settle(&fleet, tally.queued, expected).await;
    let out = fleet.finish().await;
    let (who, what) = match redis {
        Some(_) => ("redis subscribers", "PUBLISHes"),
        None => ("devices", "pushes"),
    };
    let title = format!(
        "{} {who}, {} {what} of {} B to random users{}{}{}",
        c.conns,
        p.msgs,
        p.size,
        if p.rate > 0 {
            format!(" at {}/s", p.rate)
        } else {
            String::new()
        },
        if batch > 1 {
            format!(", {batch} per request")
        } else {
            String::new()
        },
        cross_title(&p, &c),
    );
    let mut r = report(
        "unicast",
        title,
        &c,
        serde_json::json!({"upstream": u, "pushes": p, "redis": redis}),
        t0,
        &out,
    );
    r.figure(
        "push_rate",
        &format!("pushes answered by the {} per second", server(redis)),
        tally.sent as f64 / tally.took.as_secs_f64().max(1e-6),
        "/s",
    );
    push_figures(&mut r, server(redis), &tally, &got, start_ns, expected);
    converge_figure(&mut r, converge);
    gateway_wait_figures(&mut r, waits_before, gateway_waits(&c).await);
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// Uplinks from every device, consumed by an upstream.
///
/// # Errors
/// When the fleet or the upstream cannot start.
pub async fn uplink(
    c: Common,
    u: Upstream,
    every_ms: u64,
    size: usize,
    duration: u64,
) -> anyhow::Result<()> {
    check_upstreams(&c, &u)?;
    // Subscribe first: the gateway refuses uplinks nobody consumes.
    let (_ups, events) = upstreams(&u, true).await?;
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for mut ev in events {
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(e) = ev.recv().await {
                if matches!(e.kind, Some(pb::event::Kind::Uplink(_))) {
                    received.fetch_add(1, Relaxed);
                }
            }
        });
    }
    let mut spec = spec(&c)?;
    spec.uplink_ms = every_ms.max(1);
    spec.uplink_size = size;
    let (fleet, t0) = start(&c, spec).await?;
    wait_ready(&fleet, &c).await?;
    let (before, at) = (fleet.totals(), Instant::now());
    let up0 = received.load(Relaxed);
    tokio::time::sleep(Duration::from_secs(duration)).await;
    let (after, secs) = (fleet.totals(), at.elapsed().as_secs_f64());
    let up1 = received.load(Relaxed);
    let out = fleet.finish().await;
    let title = format!(
        "{} devices, one uplink of {size} B every {every_ms} ms each, {duration} s",
        c.conns
    );
    let mut r = report(
        "uplink",
        title,
        &c,
        serde_json::json!({"upstream": u, "every_ms": every_ms, "size": size, "duration_s": duration}),
        t0,
        &out,
    );
    r.figure(
        "sent_rate",
        "uplinks sent per second",
        (after.uplinks_sent - before.uplinks_sent) as f64 / secs,
        "/s",
    );
    r.figure(
        "acked_rate",
        "uplinks acknowledged per second",
        (after.uplinks_acked - before.uplinks_acked) as f64 / secs,
        "/s",
    );
    r.figure(
        "upstream_rate",
        "uplinks received upstream per second",
        (up1 - up0) as f64 / secs,
        "/s",
    );
    r.figure(
        "uplink_errors",
        "uplinks refused",
        out.stats.uplink_errors as f64,
        "",
    );
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// Devices that keep logging in and out.
///
/// # Errors
/// When the fleet cannot start.
pub async fn churn(c: Common, life_ms: u64, duration: u64) -> anyhow::Result<()> {
    let mut spec = spec(&c)?;
    spec.churn_ms = life_ms.max(1);
    let (fleet, t0) = start(&c, spec).await?;
    wait_ready(&fleet, &c).await?;
    let (before, at) = (fleet.totals(), Instant::now());
    tokio::time::sleep(Duration::from_secs(duration)).await;
    let (after, secs) = (fleet.totals(), at.elapsed().as_secs_f64());
    let out = fleet.finish().await;
    let title = format!(
        "{} devices, sessions living {life_ms} ms ±50%, {duration} s",
        c.conns
    );
    let mut r = report(
        "churn",
        title,
        &c,
        serde_json::json!({"life_ms": life_ms, "duration_s": duration}),
        t0,
        &out,
    );
    r.figure(
        "connect_rate",
        "connects per second",
        (after.connects - before.connects) as f64 / secs,
        "/s",
    );
    r.figure(
        "login_rate",
        "logins per second",
        (after.logins - before.logins) as f64 / secs,
        "/s",
    );
    r.figure(
        "disconnect_rate",
        "disconnects per second",
        (after.churns - before.churns) as f64 / secs,
        "/s",
    );
    r.figure(
        "online_end",
        "devices online at the end",
        after.online as f64,
        "",
    );
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// Every device drops and resumes at once, under background pushes.
///
/// # Errors
/// When the fleet or the upstream cannot start.
pub async fn reconnect(
    c: Common,
    u: Upstream,
    push_rate: u64,
    size: usize,
    settle_s: u64,
) -> anyhow::Result<()> {
    check_upstreams(&c, &u)?;
    // Each session's seqs come back, so that a loss names its sessions.
    let mut fleet_spec = spec(&c)?;
    fleet_spec.record_sessions = true;
    let (fleet, t0) = start(&c, fleet_spec).await?;
    let ready = wait_ready(&fleet, &c).await?;
    let (ups, _) = upstreams(&u, false).await?;
    let gateways = ups.len();
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (ups, stop) = (ups.clone(), stop.clone());
        tokio::spawn(async move {
            let target = pb::push_request::Target::Everyone(true);
            drive(
                &ups,
                usize::MAX,
                push_rate.max(1),
                1,
                64,
                Some(stop),
                None,
                |_| {
                    (0..gateways)
                        .map(|g| (g, request(target.clone(), size)))
                        .collect()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(settle_s)).await;
    let before = fleet.totals();
    let storm = Instant::now();
    fleet.command(fleet::Command::Reconnect).await;
    let want = before.resumes + before.resume_new + ready.online;
    let (during, all) = fleet
        .wait_for(Duration::from_secs(120), |s| {
            s.resumes + s.resume_new >= want
        })
        .await;
    let storm_s = storm.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(settle_s)).await;
    stop.store(true, Relaxed);
    let tally = pusher.await.context("the pusher task")?;
    // Every device should have every push, unless a session started afresh.
    let fresh = fleet.totals().resume_new > before.resume_new;
    let expected = everyone_expected(&c, &tally, gateways);
    let expected = (!fresh && tally.errors == 0).then_some(expected);
    let got = settle(&fleet, tally.queued, expected).await;
    let out = fleet.finish().await;
    let title = format!(
        "{} devices drop and resume at once, {push_rate} pushes/s to everyone",
        c.conns
    );
    let mut r = report(
        "reconnect",
        title,
        &c,
        serde_json::json!({"upstream": u, "push_rate": push_rate, "size": size, "settle_s": settle_s}),
        t0,
        &out,
    );
    let resumed = during.resumes - before.resumes;
    r.figure("resumed", "sessions resumed", resumed as f64, "");
    r.figure(
        "storm_s",
        if all {
            "seconds until every device resumed"
        } else {
            "seconds waited (not every device resumed)"
        },
        storm_s,
        "s",
    );
    r.figure(
        "resume_rate",
        "resumes per second in the storm",
        resumed as f64 / storm_s.max(1e-3),
        "/s",
    );
    r.figure(
        "resume_new",
        "resumes refused (new session)",
        (during.resume_new - before.resume_new) as f64,
        "",
    );
    r.figure(
        "resume_gaps",
        "resumes with a gap",
        out.stats.resume_gaps as f64,
        "",
    );
    if c.zero_rtt {
        let s = &out.stats;
        let rows = [
            (
                "zero_rtt_accepted",
                "QUIC connections whose 0-RTT login the gateway took",
                s.zero_rtt_accepted,
            ),
            (
                "zero_rtt_refused",
                "QUIC connections whose 0-RTT data was refused",
                s.zero_rtt_refused,
            ),
            (
                "zero_rtt_no_ticket",
                "QUIC connections without a ticket (full handshake)",
                s.zero_rtt_no_ticket,
            ),
        ];
        for (key, what, n) in rows {
            r.figure(key, what, n as f64, "");
        }
    }
    push_figures(&mut r, "gateway", &tally, &got, 0, expected);
    if expected.is_some() && c.slow_every == 0 {
        // Every push went to every session, which numbers them 1, 2, ...:
        // each session should hold 1..=pushes to its gateway.
        short_figures(&mut r, &out, c.conns, tally.sent / gateways.max(1) as u64);
    }
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// The sessions that missed pushes, by name, when each of `conns`
/// sessions should hold seqs `1..=per_session`; and those that handed in
/// no record at all (they received nothing).
fn short_figures(r: &mut RunReport, out: &crate::coord::Outcome, conns: usize, per_session: u64) {
    let short = crate::ledger::short_sessions(&out.sessions, per_session);
    let recorded: std::collections::HashSet<u64> = out.sessions.iter().map(|s| s.session).collect();
    let unrecorded = conns.saturating_sub(recorded.len());
    if !short.is_empty() || (unrecorded > 0 && per_session > 0) {
        r.figure(
            "short_sessions",
            "sessions that missed pushes (listed below)",
            short.len() as f64,
            "",
        );
        r.figure(
            "unrecorded_sessions",
            "sessions that handed in no record (received nothing)",
            unrecorded as f64,
            "",
        );
    }
    if out.stats.record_overflow > 0 {
        r.failures.push(format!(
            "{} session records cut short",
            out.stats.record_overflow
        ));
    }
    r.short_sessions = short;
}

/// What the `migrate` scenario does besides the common options.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct MigrateOpts {
    /// Pushes to everyone per second, before, during and after the rebinds
    /// (every other one on the bulk lane, so both QUIC streams carry pushes).
    #[arg(long, default_value_t = 50)]
    pub push_rate: u64,
    /// Push payload bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Rounds of rebinds; each moves every QUIC endpoint to a new UDP socket.
    #[arg(long, default_value_t = 1)]
    pub rebinds: u32,
    /// Seconds one round spreads its rebinds over, evenly (0: every endpoint
    /// at once).
    #[arg(long, default_value_t = 0.0)]
    pub migrate_secs: f64,
    /// Seconds of pushes before the first round, between rounds and after
    /// the last.
    #[arg(long, default_value_t = 2)]
    pub settle: u64,
}

/// QUIC devices migrate to new local addresses while pushes flow: every push
/// must arrive once, and no device may reconnect.
///
/// # Errors
/// Without `--quic`, or when the fleet or the upstream cannot start.
pub async fn migrate(c: Common, u: Upstream, o: MigrateOpts) -> anyhow::Result<()> {
    anyhow::ensure!(
        c.quic,
        "migrate needs --quic (and --ca): only QUIC connections migrate"
    );
    check_upstreams(&c, &u)?;
    let (fleet, t0) = start(&c, spec(&c)?).await?;
    let ready = wait_ready(&fleet, &c).await?;
    let migrations_before = gateway_migrations(&c).await;
    let (ups, _) = upstreams(&u, false).await?;
    let gateways = ups.len();
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (ups, stop, size) = (ups.clone(), stop.clone(), o.size);
        tokio::spawn(async move {
            let target = pb::push_request::Target::Everyone(true);
            drive(
                &ups,
                usize::MAX,
                o.push_rate.max(1),
                1,
                64,
                Some(stop),
                None,
                |n| {
                    let mut req = request(target.clone(), size);
                    if n % 2 == 1 {
                        req.lane = pb::Lane::Bulk as i32;
                    }
                    (0..gateways).map(|g| (g, req.clone())).collect()
                },
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(o.settle)).await;
    let endpoints = ready.endpoints;
    let spread = Duration::from_secs_f64(o.migrate_secs.max(0.0));
    let mut all_rebound = true;
    for round in 1..=u64::from(o.rebinds) {
        fleet
            .command(fleet::Command::Rebind {
                spread_ms: spread.as_millis() as u64,
            })
            .await;
        let want = endpoints * round;
        let (_, done) = fleet
            .wait_for(spread + Duration::from_secs(30), |s| {
                s.rebinds + s.rebind_errors >= want
            })
            .await;
        all_rebound &= done;
        tokio::time::sleep(Duration::from_secs(o.settle)).await;
    }
    stop.store(true, Relaxed);
    let tally = pusher.await.context("the pusher task")?;
    let expected = (tally.errors == 0).then(|| everyone_expected(&c, &tally, gateways));
    let got = settle(&fleet, tally.queued, expected).await;
    let out = fleet.finish().await;
    let migrations_after = gateway_migrations(&c).await;
    let title = format!(
        "{} devices over QUIC on {endpoints} endpoints, {} rebind round(s){}, {} pushes/s to everyone",
        c.conns,
        o.rebinds,
        if o.migrate_secs > 0.0 {
            format!(" spread over {} s", o.migrate_secs)
        } else {
            String::new()
        },
        o.push_rate
    );
    let mut r = report(
        "migrate",
        title,
        &c,
        serde_json::json!({"upstream": u, "migrate": o}),
        t0,
        &out,
    );
    push_figures(&mut r, "gateway", &tally, &got, 0, expected);
    if let Some(e) = expected {
        // Everything not received is lost here, resume gaps included: a
        // migration should need no resume at all.
        r.figure(
            "lost",
            "deliveries lost (not received, resume gaps included)",
            e.saturating_sub(got.pushes) as f64,
            "",
        );
    }
    r.figure(
        "duplicated",
        "deliveries received twice",
        out.stats.seq_dups as f64,
        "",
    );
    r.figure(
        "seq_gaps",
        "deliveries skipped (a sequence number jumped)",
        out.stats.seq_gaps as f64,
        "",
    );
    r.figure(
        "reconnects",
        "connections beyond each device's first",
        out.stats.connects.saturating_sub(c.conns as u64) as f64,
        "",
    );
    r.figure("drops", "connections lost", out.stats.drops as f64, "");
    r.figure("endpoints", "QUIC client endpoints", endpoints as f64, "");
    r.figure(
        "rebinds",
        "endpoint rebinds done",
        out.stats.rebinds as f64,
        "",
    );
    r.figure(
        "migrating_conns",
        "connections moved (online devices times rounds)",
        (ready.online * u64::from(o.rebinds)) as f64,
        "",
    );
    if out.stats.rebind_errors > 0 || !all_rebound {
        r.figure(
            "rebind_errors",
            "endpoint rebinds failed",
            out.stats.rebind_errors as f64,
            "",
        );
        r.failures
            .push("not every endpoint was rebound in time".into());
    }
    if let (Some(a), Some(b)) = (migrations_before, migrations_after) {
        r.figure(
            "gateway_migrations",
            "migrations the gateway counted (tether_quic_migrations_total)",
            b - a,
            "",
        );
    }
    r.emit(c.json.as_deref(), c.plot.as_deref())
}

/// The gateway's `tether_push_wait_seconds` buckets, with `--metrics`.
async fn gateway_waits(c: &Common) -> Option<crate::coord::Buckets> {
    let text = crate::coord::scrape_text(c.metrics.as_deref()?).await?;
    Some(crate::coord::Buckets::parse(
        &text,
        tether::metrics::PUSH_WAIT,
    ))
}

/// The gateway's own share of the push latency over the run, from its
/// `tether_push_wait_seconds` histogram (one sample per write: its oldest
/// push's wait from arrival to that write), as bucket bounds: the push
/// latency above minus these is the upstream's socket, the network and
/// the devices (here, the load core).
fn gateway_wait_figures(
    r: &mut RunReport,
    before: Option<crate::coord::Buckets>,
    after: Option<crate::coord::Buckets>,
) {
    let (Some(before), Some(after)) = (before, after) else {
        return;
    };
    let run = after.since(&before);
    if run.count() == 0.0 {
        return;
    }
    r.figure(
        "gateway_wait_writes",
        "writes timed by the gateway (tether_push_wait_seconds)",
        run.count(),
        "",
    );
    for (key, q, name) in [
        ("gateway_wait_p50_ms", 0.5, "p50"),
        ("gateway_wait_p99_ms", 0.99, "p99"),
        ("gateway_wait_p999_ms", 0.999, "p99.9"),
    ] {
        if let Some(le) = run.quantile_bound(q) {
            r.figure(
                key,
                &format!("the gateway's own wait per write, {name} at most"),
                le * 1000.0,
                "ms",
            );
        }
    }
}

/// The gateway's `tether_quic_migrations_total`, with `--metrics`.
async fn gateway_migrations(c: &Common) -> Option<f64> {
    let text = crate::coord::scrape_text(c.metrics.as_deref()?).await?;
    // A gateway that saw no migration yet may not list the counter.
    Some(crate::coord::metric_sum(&text, tether::metrics::QUIC_MIGRATIONS).unwrap_or(0.0))
}

pub(crate) fn gauge(c: &Common) -> Option<Gauge> {
    c.pid
        .map(Gauge::Pid)
        .or_else(|| c.metrics.clone().map(Gauge::Metrics))
}

pub(crate) fn spec(c: &Common) -> anyhow::Result<FleetSpec> {
    anyhow::ensure!(!c.addr.is_empty(), "--addr needs at least one address");
    let tls = if c.tls {
        let ca = c.ca.clone().context(
            "--tls needs --ca (the gateway's certificate or its CA, e.g. certs/dev.crt)",
        )?;
        Some(TlsSpec {
            ca,
            server_name: c.server_name.clone(),
        })
    } else {
        None
    };
    let quic = if c.quic {
        let ca = c.ca.clone().context(
            "--quic needs --ca (the gateway's certificate or its CA, e.g. certs/dev.crt)",
        )?;
        Some(QuicSpec {
            ca,
            server_name: c.server_name.clone(),
            // 0: the default share, one endpoint per 256 devices.
            endpoints: c.quic_endpoints.unwrap_or(0),
            zero_rtt: c.zero_rtt,
        })
    } else {
        None
    };
    Ok(FleetSpec {
        addrs: c.addr.clone(),
        tls,
        quic,
        ws: c.ws,
        secret: c.secret.clone(),
        prefix: c.prefix.clone(),
        first: 0,
        count: c.conns,
        rate: c.ramp,
        sources: c.sources.iter().flatten().copied().collect(),
        ping_ms: c.ping_ms,
        room: None,
        rooms: 0,
        slow_every: c.slow_every,
        slow_bps: c.slow_bps,
        uplink_ms: 0,
        uplink_size: 0,
        churn_ms: 0,
        ack_every: c.ack_every,
        ack_delay_ms: c.ack_delay_ms,
        slow_stall_ms: 0,
        slow_rcvbuf: 0,
        record_sessions: false,
        progress_ms: 0,
        redis: None,
        failover: false,
        record_ids: false,
    })
}

/// The fleet of a run against the redis server at `addr`: subscribers on
/// their user's channel with `user_channel` (and on the room's, once the
/// caller sets a room).
fn redis_spec(c: &Common, addr: SocketAddr, user_channel: bool) -> anyhow::Result<FleetSpec> {
    Ok(FleetSpec {
        addrs: vec![addr],
        redis: Some(RedisSpec { user_channel }),
        ..spec(c)?
    })
}

/// What answers the devices: a gateway, or redis with `--redis`.
fn server(redis: Option<SocketAddr>) -> &'static str {
    if redis.is_some() {
        "redis-server"
    } else {
        "gateway"
    }
}

pub(crate) async fn start(c: &Common, spec: FleetSpec) -> anyhow::Result<(Fleet, u64)> {
    fleet::raise_nofile();
    let workers = c.workers.unwrap_or(c.conns.div_ceil(PER_WORKER).max(1));
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok((Fleet::start(spec, workers, gauge(c), c.quiet).await?, t0))
}

pub(crate) async fn wait_ready(fleet: &Fleet, c: &Common) -> anyhow::Result<Stats> {
    let ramp = if c.ramp > 0.0 {
        c.conns as f64 / c.ramp
    } else {
        0.0
    };
    let s = fleet
        .wait_ready(Duration::from_secs_f64(ramp + 60.0))
        .await?;
    if s.online < c.conns as u64 {
        eprintln!(
            "warning: {} of {} devices online ({} refused, {} connect errors): {:?}",
            s.online, c.conns, s.refused, s.connect_errors, s.errors
        );
    }
    Ok(s)
}

pub(crate) fn report(
    scenario: &str,
    title: String,
    c: &Common,
    extra: serde_json::Value,
    t0: u64,
    out: &crate::coord::Outcome,
) -> RunReport {
    let params = serde_json::json!({ "common": c, "workers_used": out.workers, "scenario": extra });
    RunReport::new(scenario, title, params, t0, out)
}

/// One upstream socket per gateway, in the order of `--addr` (or one for
/// a single gateway with several listeners): unicasts go to the gateway
/// that holds the user, broadcasts to every gateway.
pub(crate) fn check_upstreams(c: &Common, u: &Upstream) -> anyhow::Result<()> {
    anyhow::ensure!(
        u.upstream.len() == 1 || u.upstream.len() == c.addr.len(),
        "--upstream lists {} sockets for {} gateway addresses: give one per --addr, in the same order (or one)",
        u.upstream.len(),
        c.addr.len()
    );
    Ok(())
}

/// Upstream clients per gateway (`upstreams` each) and, when subscribing,
/// their event streams.
pub(crate) async fn upstreams(
    u: &Upstream,
    subscribe: bool,
) -> anyhow::Result<(Vec<Vec<UpstreamClient>>, Vec<EventStream>)> {
    let mut all = Vec::new();
    let mut events = Vec::new();
    for ep in &u.upstream {
        let endpoint = if ep.contains(':') && !ep.starts_with('/') {
            Endpoint::Tcp(ep.clone())
        } else {
            Endpoint::Unix(ep.into())
        };
        let mut per = Vec::new();
        for _ in 0..u.upstreams.max(1) {
            let opts = UpstreamOptions {
                secret: u.upstream_secret.clone(),
                subscribe,
                group: "loadtest".into(),
                name: "tether-loadtest".into(),
            };
            let (c, ev) = UpstreamClient::connect(&endpoint, opts)
                .await
                .with_context(|| format!("connecting to the upstream socket {ep}"))?;
            per.push(c);
            events.push(ev);
        }
        all.push(per);
    }
    Ok((all, events))
}

/// `--batch`, refused against redis, which has no batch publish.
fn batch_of(p: &Pushes, redis: Option<SocketAddr>) -> anyhow::Result<usize> {
    if p.batch > 1 && redis.is_some() {
        anyhow::bail!("--batch is for the gateway: redis has no batch publish");
    }
    Ok(usize::from(p.batch))
}

/// A push request with a payload of `size` bytes stamped with the send time.
pub(crate) fn request(target: pb::push_request::Target, size: usize) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(target),
        payload: payload(size).into(),
        ..Default::default()
    }
}

/// A PUBLISH to `channel` with a payload as [`request`]'s.
fn publish(channel: &str, size: usize) -> Publish {
    Publish {
        channel: channel.to_owned(),
        payload: payload(size),
    }
}

/// `size` bytes (at least 8) starting with the send time.
fn payload(size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(8)];
    p[..8].copy_from_slice(&fleet::unix_nanos().to_le_bytes());
    p
}

/// What the upstream side pushes through: a gateway's upstream client, or
/// a redis connection that publishes.
pub(crate) trait Pusher: Clone + Send + Sync + 'static {
    type Request: Send + 'static;
    /// Sends one request and waits for its reply.
    fn send(&self, req: Self::Request) -> impl Future<Output = Result<Pushed, String>> + Send;
    /// Sends several in one request (`--batch`) and waits for the reply.
    fn send_batch(
        &self,
        reqs: Vec<Self::Request>,
    ) -> impl Future<Output = Result<Pushed, String>> + Send;
}

/// What a reply says.
#[derive(Default)]
pub(crate) struct Pushed {
    /// Pushes answered.
    pushes: u64,
    /// Sessions the pushes were queued for (subscribers reached).
    sessions: u64,
    /// Sessions that refused them (full queues).
    dropped: u64,
    /// Pushes that reached no session.
    unreached: u64,
    /// Pushes of a batch refused one by one, and the first reason.
    failed: u64,
    error: Option<String>,
}

impl Pushed {
    fn one(sessions: u64, dropped: u64) -> Self {
        Self {
            pushes: 1,
            sessions,
            dropped,
            unreached: u64::from(sessions == 0),
            ..Self::default()
        }
    }
}

impl Pusher for UpstreamClient {
    type Request = pb::PushRequest;
    async fn send(&self, req: pb::PushRequest) -> Result<Pushed, String> {
        let r = self.push(req).await.map_err(|e| e.to_string())?;
        Ok(Pushed::one(r.sessions, r.dropped))
    }

    async fn send_batch(&self, reqs: Vec<pb::PushRequest>) -> Result<Pushed, String> {
        let mut out = Pushed::default();
        for r in self.push_batch(reqs).await.map_err(|e| e.to_string())? {
            match r {
                Ok(r) => {
                    let one = Pushed::one(r.sessions, r.dropped);
                    out.pushes += 1;
                    out.sessions += one.sessions;
                    out.dropped += one.dropped;
                    out.unreached += one.unreached;
                }
                Err(e) => {
                    out.failed += 1;
                    out.error.get_or_insert_with(|| e.to_string());
                }
            }
        }
        Ok(out)
    }
}

impl Pusher for Publisher {
    type Request = Publish;
    async fn send(&self, req: Publish) -> Result<Pushed, String> {
        let sessions = self.publish(req).await?;
        Ok(Pushed::one(sessions, 0))
    }

    async fn send_batch(&self, _reqs: Vec<Publish>) -> Result<Pushed, String> {
        Err("redis has no batch publish (--batch is for the gateway)".into())
    }
}

/// What the upstream side saw of its pushes.
#[derive(Default, Debug)]
struct Tally {
    /// Push requests answered.
    sent: u64,
    /// Sessions the pushes were queued for, and refused (full queues).
    queued: u64,
    dropped: u64,
    /// Requests that reached no session.
    unreached: u64,
    errors: u64,
    first_error: Option<String>,
    took: Duration,
    /// Deliveries the in-flight bound stopped waiting for ([`Window`]).
    written_off: u64,
}

/// Progress reports this often while a [`Window`] paces the pushes: the
/// fleet's received count is that much late at the coordinator at most
/// (plus the trip), and at 2 M deliveries/s 10 ms is 20,000 deliveries,
/// well inside the default bound of 50,000.
const PACED_PROGRESS_MS: u64 = 10;

/// How long a [`Window`] waits for a delivery before it writes off what is
/// in flight: deliveries that did not come in that long (lost, or queued for
/// a device cut off) would otherwise hold the upstream side for ever.
const WINDOW_STALL: Duration = Duration::from_secs(5);

/// The fleet of a push scenario: devices of the gateway (once the upstream
/// sockets are known to match its addresses), or with `redis` subscribers,
/// on their user's channel with `user_channel`. It reports its progress
/// often when `--max-inflight-deliveries` paces the pushes.
fn push_spec(
    c: &Common,
    u: &Upstream,
    p: &Pushes,
    redis: Option<SocketAddr>,
    user_channel: bool,
) -> anyhow::Result<FleetSpec> {
    let mut spec = match redis {
        Some(addr) => redis_spec(c, addr, user_channel)?,
        None => {
            check_upstreams(c, u)?;
            if p.cross_node {
                anyhow::ensure!(
                    c.addr.len() >= 2 && u.upstream.len() == c.addr.len(),
                    "--cross-node needs a cluster: two --addr or more, and one --upstream per --addr in the same order"
                );
            }
            spec(c)?
        }
    };
    if p.max_inflight_deliveries > 0 {
        spec.progress_ms = PACED_PROGRESS_MS;
    }
    Ok(spec)
}

/// Deliveries received by the fleet, as the in-flight bound counts them: a
/// push a resume reported gone is no longer in flight either.
fn received(s: &Stats) -> u64 {
    s.pushes + s.slow_pushes + s.resume_gap_msgs
}

/// `--max-inflight-deliveries`: the upstream side sends a request only while
/// the deliveries in flight, published minus received across the fleet,
/// leave room for its `fanout` (or when none are in flight). A request
/// counts `fanout` deliveries when sent and, once answered, the number its
/// reply gives (sessions queued, subscribers reached). The fleet's count
/// arrives with its progress reports, so the count in flight runs high,
/// never low: the bound holds.
pub(crate) struct Window<'a> {
    fleet: &'a Fleet,
    max: u64,
    fanout: u64,
    /// Deliveries published so far (shared with the request tasks, which
    /// correct their estimate by the reply).
    published: Arc<AtomicU64>,
    /// The fleet's received count when the window opened, the latest one
    /// read, and deliveries written off after [`WINDOW_STALL`].
    base: u64,
    seen: u64,
    written_off: u64,
}

impl<'a> Window<'a> {
    /// A window of `max` deliveries (`None` for 0: no bound), `fanout` per
    /// request.
    pub(crate) fn new(fleet: &'a Fleet, max: u64, fanout: u64) -> Option<Self> {
        let base = received(&fleet.totals());
        (max > 0).then(|| Window {
            fleet,
            max,
            fanout,
            published: Arc::new(AtomicU64::new(0)),
            base,
            seen: base,
            written_off: 0,
        })
    }

    /// Deliveries in flight when the fleet has received `got` in all.
    fn in_flight(&self, got: u64) -> u64 {
        self.published
            .load(Relaxed)
            .saturating_sub(got.saturating_sub(self.base) + self.written_off)
    }

    /// Whether a request may go with `in_flight` deliveries out.
    fn opens(&self, in_flight: u64) -> bool {
        in_flight == 0 || in_flight + self.fanout <= self.max
    }

    /// Waits until the next request may go.
    async fn admit(&mut self) {
        // The latest count read is enough when it already leaves room: the
        // fleet's count only grows. Only a full window asks the fleet.
        if self.opens(self.in_flight(self.seen)) {
            return;
        }
        loop {
            let before = self.seen;
            let me = &*self;
            let (t, open) = me
                .fleet
                .wait_for(WINDOW_STALL, |s| me.opens(me.in_flight(received(s))))
                .await;
            self.seen = received(&t);
            if open {
                return;
            }
            if self.seen == before {
                // Nothing arrived for WINDOW_STALL (or the fleet ended).
                self.written_off += self.in_flight(self.seen);
                return;
            }
        }
    }
}

/// Sends push `n` for n in 0..count (or until `stop`), paced at `rate`
/// pushes a second, `batch` pushes per request, at most `inflight` requests
/// at once and, with a `window` (whose fanout is per request), at most its
/// bound of deliveries in flight; `make(n)` names the (gateway, push) pairs.
#[allow(clippy::too_many_arguments)]
async fn drive<P: Pusher>(
    ups: &[Vec<P>],
    count: usize,
    rate: u64,
    batch: usize,
    inflight: usize,
    stop: Option<Arc<AtomicBool>>,
    mut window: Option<Window<'_>>,
    make: impl Fn(usize) -> Vec<(usize, P::Request)>,
) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let sem = Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let batch = batch.max(1);
    let mut n = 0;
    while n < count {
        if stop.as_ref().is_some_and(|s| s.load(Relaxed)) {
            break;
        }
        // Before the payload is stamped: waiting for room is not latency.
        if let Some(w) = &mut window {
            w.admit().await;
        }
        if rate > 0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        // The next `batch` pushes, one request per gateway.
        let end = n.saturating_add(batch).min(count);
        let mut groups: Vec<(usize, Vec<P::Request>)> = Vec::new();
        for (g, req) in (n..end).flat_map(&make) {
            match groups.iter_mut().find(|(h, _)| *h == g) {
                Some((_, reqs)) => reqs.push(req),
                None => groups.push((g, vec![req])),
            }
        }
        let first = n;
        n = end;
        for (g, reqs) in groups {
            let Some(per) = ups.get(g).filter(|p| !p.is_empty()) else {
                continue;
            };
            let Ok(permit) = sem.clone().acquire_owned().await else {
                break;
            };
            let (up, tally) = (per[first / batch % per.len()].clone(), tally.clone());
            let published = window.as_ref().map(|w| {
                w.published.fetch_add(w.fanout, Relaxed);
                (w.published.clone(), w.fanout)
            });
            tasks.spawn(async move {
                // A group holds at least one push; one alone goes unbatched.
                let r = match <[P::Request; 1]>::try_from(reqs) {
                    Ok([req]) => up.send(req).await,
                    Err(reqs) => up.send_batch(reqs).await,
                };
                drop(permit);
                if let Some((p, fanout)) = published {
                    // The estimate gives way to the count (added first: no
                    // underflow).
                    p.fetch_add(r.as_ref().map_or(0, |r| r.sessions), Relaxed);
                    p.fetch_sub(fanout, Relaxed);
                }
                if let Ok(mut t) = tally.lock() {
                    match r {
                        Ok(r) => {
                            t.sent += r.pushes;
                            t.queued += r.sessions;
                            t.dropped += r.dropped;
                            t.unreached += r.unreached;
                            t.errors += r.failed;
                            if let Some(e) = r.error {
                                t.first_error.get_or_insert(e);
                            }
                        }
                        Err(e) => {
                            t.errors += 1;
                            t.first_error.get_or_insert(e);
                        }
                    }
                }
            });
        }
        // Reap finished tasks as we go, so a long run holds few.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut t = tally
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    t.took = start.elapsed();
    t.written_off = window.map_or(0, |w| w.written_off);
    t
}

/// Waits until the devices that keep up have their `expected_fast` pushes
/// (or, when unknown, until every queued push arrived), or until they
/// received nothing for 5 s. Slow devices' trickle is not progress.
async fn settle(fleet: &Fleet, queued: u64, expected_fast: Option<u64>) -> Stats {
    let done = |s: &Stats| match expected_fast {
        Some(e) => s.pushes + s.resume_gap_msgs >= e,
        None => s.pushes + s.slow_pushes >= queued,
    };
    loop {
        let before = fleet.totals();
        let (t, ok) = fleet.wait_for(Duration::from_secs(5), done).await;
        if ok || t.pushes == before.pushes {
            return t;
        }
    }
}

/// Pushes the devices that keep up should have received when every push
/// went to everyone: one request per gateway each, reaching all its devices.
fn everyone_expected(c: &Common, t: &Tally, gateways: usize) -> u64 {
    (c.conns as u64 - slow_count(c)) * (t.sent / gateways.max(1) as u64)
}

/// Devices in `0..conns` that read slowly.
fn slow_count(c: &Common) -> u64 {
    if c.slow_every == 0 {
        0
    } else {
        c.conns.div_ceil(c.slow_every) as u64
    }
}

/// `expected_fast`: pushes the fast devices should have received, when the
/// scenario knows it; the difference is reported as lost. `server` names
/// what answered the pushes.
fn push_figures(
    r: &mut RunReport,
    server: &str,
    t: &Tally,
    got: &Stats,
    start_ns: u64,
    expected_fast: Option<u64>,
) {
    let received = got.pushes + got.slow_pushes;
    if start_ns > 0 && got.last_push_ns > start_ns {
        let secs = (got.last_push_ns - start_ns) as f64 / 1e9;
        r.figure(
            "delivery_rate",
            "deliveries per second",
            received as f64 / secs,
            "/s",
        );
        r.figure(
            "delivery_s",
            "seconds from first push to last delivery",
            secs,
            "s",
        );
    }
    // Pushes, not requests: a --batch request answers several.
    r.figure("push_requests", "pushes answered", t.sent as f64, "");
    r.figure(
        "queued",
        &format!("deliveries queued by the {server}"),
        t.queued as f64,
        "",
    );
    r.figure(
        "received",
        "deliveries received (unique)",
        received as f64,
        "",
    );
    r.figure(
        "missing",
        "deliveries queued but not received",
        t.queued.saturating_sub(received) as f64,
        "",
    );
    // Pushes a resume reported gone (CODE_RESUME_GAP): lost, but the device
    // was told. What else is missing was lost silently.
    r.figure(
        "gap_skipped",
        "deliveries skipped by resume gaps (reported)",
        got.resume_gap_msgs as f64,
        "",
    );
    if let Some(e) = expected_fast {
        r.figure(
            "lost_fast",
            "deliveries lost silently by devices that kept up",
            e.saturating_sub(got.pushes + got.resume_gap_msgs) as f64,
            "",
        );
    }
    if got.slow_closed > 0 {
        r.figure(
            "slow_closed",
            "slow devices cut off by the gateway",
            got.slow_closed as f64,
            "",
        );
    }
    r.figure(
        "dropped",
        "deliveries refused (full queue)",
        t.dropped as f64,
        "",
    );
    if t.written_off > 0 {
        r.figure(
            "written_off",
            "deliveries the in-flight bound stopped waiting for",
            t.written_off as f64,
            "",
        );
    }
    if t.unreached > 0 {
        r.figure(
            "unreached",
            "pushes that reached no session",
            t.unreached as f64,
            "",
        );
    }
    if got.slow_pushes > 0 || r.stats.slow_pushes > 0 {
        r.figure(
            "slow_received",
            "deliveries to slow devices",
            got.slow_pushes as f64,
            "",
        );
    }
    if t.errors > 0 {
        r.figure("push_errors", "push requests failed", t.errors as f64, "");
        r.failures.push(format!(
            "push: {}",
            t.first_error.as_deref().unwrap_or("unknown error")
        ));
    }
}
