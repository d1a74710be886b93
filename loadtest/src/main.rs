//! tether-loadtest: load scenarios against a running gateway.
//!
//! This first cut has the `idle` scenario (hold N logged-in, heartbeating
//! connections and report the gateway's RSS slope per connection). The
//! remaining scenarios arrive with the load-tool issue.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tether::client::Client;

#[derive(Parser)]
#[command(name = "tether-loadtest")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Subcommand)]
enum Cmd {
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
    },
    /// N logged-in clients; an upstream pushes M messages, each to one random
    /// user; reports pushes per second and end-to-end latency.
    Unicast {
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7401")]
        upstream: String,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        #[arg(long, default_value_t = 100_000)]
        msgs: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Pushes in flight at once, over all upstream connections.
        #[arg(long, default_value_t = 256)]
        inflight: usize,
        /// Upstream connections the pushes are spread over.
        #[arg(long, default_value_t = 4)]
        upstreams: usize,
        /// Pushes per second (0: as fast as the gateway answers).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = tether::config::DEV_SECRET)]
        secret: String,
    },
    /// N logged-in clients; an upstream pushes M messages to all of them (or a
    /// room holding them all); reports deliveries per second.
    Broadcast {
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:7401")]
        upstream: String,
        #[arg(long, default_value_t = 5_000)]
        conns: usize,
        #[arg(long, default_value_t = 200)]
        msgs: usize,
        /// Payload bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Push to a room the clients joined instead of to everyone.
        #[arg(long)]
        room: bool,
        /// Pushes in flight at once.
        #[arg(long, default_value_t = 32)]
        inflight: usize,
        /// Pushes per second (0: as fast as the gateway answers).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = tether::config::DEV_SECRET)]
        secret: String,
    },
    /// Hold N logged-in connections; report gateway RSS per connection.
    Idle {
        /// Gateway client address.
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: SocketAddr,
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// Connections opened per second.
        #[arg(long, default_value_t = 5_000)]
        rate: u32,
        /// Seconds to hold them after the ramp.
        #[arg(long, default_value_t = 5)]
        hold: u64,
        /// Heartbeat interval in seconds.
        #[arg(long, default_value_t = 30)]
        ping: u64,
        /// The gateway's pid, to read its RSS from /proc.
        #[arg(long)]
        pid: Option<u32>,
        /// Source addresses to spread connections over (e.g. 127.0.0.2).
        #[arg(long, value_delimiter = ',')]
        source: Vec<IpAddr>,
        /// HS256 secret the tokens are signed with.
        #[arg(long, default_value = tether::config::DEV_SECRET)]
        secret: String,
    },
}

/// Resident memory of `pid`, from smaps_rollup: it walks the page tables, while
/// VmRSS in /proc/PID/status is a cached counter that lags by megabytes.
fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Wall clock in nanoseconds; pushes carry it in their first 8 payload bytes.
fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A payload of `size` bytes (at least 8) that starts with the send time.
fn stamped_payload(size: usize) -> bytes::Bytes {
    let mut p = vec![b'x'; size.max(8)];
    p[..8].copy_from_slice(&unix_nanos().to_le_bytes());
    p.into()
}

/// The send time in a push frame's payload (the frame without its length
/// prefix): walks the protobuf by hand, so counting stays cheap.
fn push_timestamp(mut b: &[u8]) -> Option<u64> {
    use prost::encoding::decode_varint;
    // ServerFrame.push: field 5, length-delimited.
    if b.first() != Some(&0x2a) {
        return None;
    }
    b = &b[1..];
    let len = decode_varint(&mut b).ok()? as usize;
    let mut inner = b.get(..len)?;
    while !inner.is_empty() {
        let key = decode_varint(&mut inner).ok()?;
        match key & 7 {
            0 => {
                decode_varint(&mut inner).ok()?;
            }
            2 => {
                let n = decode_varint(&mut inner).ok()? as usize;
                let v = inner.get(..n)?;
                if key >> 3 == 3 {
                    return v
                        .get(..8)
                        .map(|t| u64::from_le_bytes(t.try_into().unwrap_or([0; 8])));
                }
                inner = &inner[n..];
            }
            _ => return None,
        }
    }
    None
}

type Latency = hdrhistogram::Histogram<u64>;
/// One histogram for all connections of a run (a histogram is ~100 KB: one
/// per connection would cost gigabytes at 10k connections).
type SharedLatency = std::sync::Arc<std::sync::Mutex<Latency>>;

fn new_latency() -> anyhow::Result<SharedLatency> {
    // Microseconds, up to 10 minutes, 3 significant digits.
    let h = Latency::new_with_bounds(1, 600_000_000, 3)?;
    Ok(std::sync::Arc::new(std::sync::Mutex::new(h)))
}

fn print_latency(what: &str, h: &Latency) {
    if h.is_empty() {
        return;
    }
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "{what} latency over {} samples: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        h.len(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
}

/// Counts frames on a raw socket by walking length prefixes, and acknowledges
/// them cumulatively (pushes arrive in seq order from 1, and after login they
/// are the only frames, so the count is the last seq). Frames that arrive in
/// one read have their payload's send time sampled into a latency histogram.
async fn count_frames(
    mut s: tokio::net::TcpStream,
    want: usize,
    lat: SharedLatency,
) -> std::io::Result<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    let mut acked = 0usize;
    let (mut frames, mut need, mut hdr, mut hdr_len) = (0usize, 0usize, [0u8; 4], 0usize);
    while frames < want {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let now = unix_nanos();
        let mut d = &buf[..n];
        while !d.is_empty() {
            if need > 0 {
                let k = need.min(d.len());
                need -= k;
                d = &d[k..];
                if need == 0 {
                    frames += 1;
                }
                continue;
            }
            let k = (4 - hdr_len).min(d.len());
            hdr[hdr_len..hdr_len + k].copy_from_slice(&d[..k]);
            hdr_len += k;
            d = &d[k..];
            if hdr_len == 4 {
                need = u32::from_be_bytes(hdr) as usize;
                hdr_len = 0;
                if need == 0 {
                    frames += 1;
                } else if let Some(ts) = d.get(..need).and_then(push_timestamp) {
                    if let Ok(mut h) = lat.lock() {
                        let _ = h.record(now.saturating_sub(ts) / 1000);
                    }
                }
            }
        }
        if frames >= acked + 32 || frames >= want {
            let ack = tether::wire::frame_bytes(&tether::wire::pb::ClientFrame {
                request_id: 0,
                body: Some(tether::wire::pb::client_frame::Body::Ack(
                    tether::wire::pb::Ack {
                        up_to_seq: frames as u64,
                        ..Default::default()
                    },
                )),
            });
            s.write_all(&ack).await?;
            acked = frames;
        }
    }
    Ok(frames)
}

/// Sleeps until push `n` is due at `rate` pushes per second (0: no pacing).
async fn pace(start: Instant, n: usize, rate: u64) {
    if rate > 0 {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Connects a raw socket and logs it in as `user` on `device` with a token
/// minted for it (allowed to join `rooms`).
async fn raw_login(
    addr: SocketAddr,
    secret: &str,
    user: &str,
    device: &str,
    rooms: Vec<String>,
) -> anyhow::Result<tokio::net::TcpStream> {
    use tether::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
    let token = tether::auth::mint_hs256(secret, user, None, Duration::from_secs(3600), rooms)?;
    let mut s = connect(addr, None).await?;
    let login = Req::Login(pb::Login {
        token,
        device_id: device.to_owned(),
        platform: pb::Platform::Server as i32,
        protocol_version: 1,
        resume: None,
    });
    anyhow::ensure!(
        matches!(roundtrip(&mut s, login).await?, Resp::LoginOk(_)),
        "login refused"
    );
    Ok(s)
}

/// Writes one client frame and reads one server frame, on a raw socket.
async fn roundtrip(
    s: &mut tokio::net::TcpStream,
    body: tether::wire::pb::client_frame::Body,
) -> anyhow::Result<tether::wire::pb::server_frame::Body> {
    use prost::Message;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = tether::wire::frame_bytes(&tether::wire::pb::ClientFrame {
        request_id: 1,
        body: Some(body),
    });
    s.write_all(&f).await?;
    let n = s.read_u32().await? as usize;
    anyhow::ensure!(n <= 1 << 20, "reply frame too large");
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).await?;
    tether::wire::pb::ServerFrame::decode(&b[..])?
        .body
        .ok_or_else(|| anyhow::anyhow!("empty reply"))
}

#[allow(clippy::too_many_arguments)]
async fn broadcast(
    addr: SocketAddr,
    upstream: String,
    conns: usize,
    msgs: usize,
    size: usize,
    room: bool,
    inflight: usize,
    rate: u64,
    secret: String,
) -> anyhow::Result<()> {
    use tether::upstream::{Endpoint, UpstreamClient, UpstreamOptions};
    use tether::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp};
    let rooms = if room {
        vec!["bench".to_owned()]
    } else {
        vec![]
    };
    let mut streams = Vec::with_capacity(conns);
    let t0 = Instant::now();
    for i in 0..conns {
        let mut s = raw_login(
            addr,
            &secret,
            &format!("b{i}"),
            &format!("d{i}"),
            rooms.clone(),
        )
        .await?;
        if room {
            let join = Req::Join(pb::Join {
                room: "bench".into(),
            });
            anyhow::ensure!(
                matches!(roundtrip(&mut s, join).await?, Resp::RoomOk(_)),
                "join refused"
            );
        }
        streams.push(s);
    }
    println!(
        "{conns} clients logged in in {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    let lat = new_latency()?;
    let counters: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let lat = lat.clone();
            tokio::spawn(async move { (count_frames(s, msgs, lat).await, Instant::now()) })
        })
        .collect();
    let (up, _) =
        UpstreamClient::connect(&Endpoint::Tcp(upstream.clone()), UpstreamOptions::default())
            .await?;
    let target = if room {
        pb::push_request::Target::Room("bench".into())
    } else {
        pb::push_request::Target::Everyone(true)
    };
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let start = Instant::now();
    let mut pushes = tokio::task::JoinSet::new();
    for n in 0..msgs {
        pace(start, n, rate).await;
        let permit = sem.clone().acquire_owned().await?;
        let (up, target, payload) = (up.clone(), target.clone(), stamped_payload(size));
        pushes.spawn(async move {
            let r = up
                .push(pb::PushRequest {
                    target: Some(target),
                    payload,
                    ..Default::default()
                })
                .await;
            drop(permit);
            r
        });
    }
    let (mut queued, mut dropped) = (0u64, 0u64);
    while let Some(r) = pushes.join_next().await {
        let r = r??;
        queued += r.sessions;
        dropped += r.dropped;
    }
    let pushed = start.elapsed();
    let mut received = 0usize;
    let mut last = start;
    for c in counters {
        let (n, at) = c.await?;
        received += n?;
        last = last.max(at);
    }
    let secs = last.duration_since(start).as_secs_f64();
    println!(
        "{msgs} pushes of {size} B to {conns} sessions{}: upstream done in {:.3}s; {received} deliveries received in {secs:.3}s = {:.0} deliveries/s (queued {queued}, dropped {dropped})",
        if room { " (room)" } else { "" },
        pushed.as_secs_f64(),
        received as f64 / secs
    );
    if let Ok(h) = lat.lock() {
        print_latency("push-to-delivery", &h);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn unicast(
    addr: SocketAddr,
    upstream: String,
    conns: usize,
    msgs: usize,
    size: usize,
    inflight: usize,
    upstreams: usize,
    rate: u64,
    secret: String,
) -> anyhow::Result<()> {
    use tether::upstream::{Endpoint, UpstreamClient, UpstreamOptions};
    use tether::wire::pb;
    let mut streams = Vec::with_capacity(conns);
    for i in 0..conns {
        streams.push(raw_login(addr, &secret, &format!("u{i}"), &format!("d{i}"), vec![]).await?);
    }
    // Which user gets which push: a fixed pseudo-random sequence (xorshift).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let targets: Vec<usize> = (0..msgs)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % conns as u64) as usize
        })
        .collect();
    let mut per_user = vec![0usize; conns];
    for &t in &targets {
        per_user[t] += 1;
    }
    let lat = new_latency()?;
    let counters: Vec<_> = streams
        .into_iter()
        .zip(per_user)
        .map(|(s, want)| {
            let lat = lat.clone();
            tokio::spawn(async move { (count_frames(s, want, lat).await, Instant::now()) })
        })
        .collect();
    let mut ups = Vec::new();
    for _ in 0..upstreams.max(1) {
        let (u, _) =
            UpstreamClient::connect(&Endpoint::Tcp(upstream.clone()), UpstreamOptions::default())
                .await?;
        ups.push(u);
    }
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(inflight.max(1)));
    let start = Instant::now();
    let mut pushes = tokio::task::JoinSet::new();
    for (n, t) in targets.into_iter().enumerate() {
        pace(start, n, rate).await;
        let permit = sem.clone().acquire_owned().await?;
        let (up, payload) = (ups[n % ups.len()].clone(), stamped_payload(size));
        pushes.spawn(async move {
            let r = up
                .push(pb::PushRequest {
                    target: Some(pb::push_request::Target::UserId(format!("u{t}"))),
                    payload,
                    ..Default::default()
                })
                .await;
            drop(permit);
            r
        });
    }
    let mut queued = 0u64;
    while let Some(r) = pushes.join_next().await {
        queued += r??.sessions;
    }
    let pushed = start.elapsed();
    let mut received = 0usize;
    let mut last = start;
    for c in counters {
        let (n, at) = c.await?;
        received += n?;
        last = last.max(at);
    }
    let secs = last.duration_since(start).as_secs_f64();
    if let Ok(h) = lat.lock() {
        print_latency("push-to-delivery", &h);
    }
    println!(
        "{msgs} unicast pushes of {size} B to {conns} sessions: upstream done in {:.3}s ({:.0} pushes/s); {received} received in {secs:.3}s = {:.0} deliveries/s (queued {queued})",
        pushed.as_secs_f64(),
        msgs as f64 / pushed.as_secs_f64(),
        received as f64 / secs
    );
    Ok(())
}

fn self_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

async fn simulate(n: usize, pipe: usize) -> anyhow::Result<()> {
    use tether::bus::PushTarget;
    use tether::ids::{DeviceId, RoomId};
    use tether::wire::{pb, SharedPush};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut cfg = tether::config::Config::default();
    cfg.limits.login_rate = 0;
    cfg.metrics.listen = None;
    let secret = cfg.auth.secret.clone();
    let gw = tether::gateway::Gateway::new(cfg)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _ticker = gw.spawn_ticker(stop.clone());
    let rss0 = self_rss_kib();

    // Log every session in through a pipe, as a device would.
    let t0 = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let token = tether::auth::mint_hs256(
            &secret,
            &format!("u{i}"),
            None,
            Duration::from_secs(3600),
            vec![],
        )?;
        let login = tether::wire::frame_bytes(&pb::ClientFrame {
            request_id: 1,
            body: Some(pb::client_frame::Body::Login(pb::Login {
                token,
                device_id: format!("d{i}"),
                platform: pb::Platform::Server as i32,
                protocol_version: 1,
                resume: None,
            })),
        });
        let mut c = gw
            .connect_memory(pipe)
            .map_err(|c| anyhow::anyhow!("refused: {c:?}"))?;
        c.write_all(&login).await?;
        clients.push(c);
        if i % 4096 == 4095 {
            tokio::task::yield_now().await;
        }
    }
    while gw.registry().len() < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read each LoginOk, so the pipes hold nothing.
    let mut buf = vec![0u8; 512];
    for c in clients.iter_mut() {
        let len = c.read_u32().await? as usize;
        c.read_exact(&mut buf[..len]).await?;
    }
    let login = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss1 = self_rss_kib();
    println!(
        "{n} sessions logged in over in-memory pipes in {:.2}s ({:.0} logins/s)",
        login.as_secs_f64(),
        n as f64 / login.as_secs_f64()
    );
    println!(
        "RSS {} MiB before, {} MiB with {n} idle sessions: {:.0} B per session (both ends of each pipe included)",
        rss0 / 1024,
        rss1 / 1024,
        (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64
    );

    // One broadcast into every session queue, from a runtime task as the
    // upstream server does it (wakes then go to the worker's own run queue),
    // then read by every client. The second broadcast finds the session
    // buffers in place (the first push waits for an ack in each window).
    for (round, what) in ["one broadcast", "a second broadcast"].iter().enumerate() {
        let shared = SharedPush::new(&format!("sim-{round}"), &[0x42; 64], "simulate", "");
        let g2 = gw.clone();
        let (out, enq) = tokio::spawn(async move {
            let t = Instant::now();
            let out = g2.router().push(&PushTarget::Everyone, &shared);
            (out, t.elapsed())
        })
        .await?;
        println!(
            "{what} queued for {} sessions in {:.3}s ({:.0} deliveries/s into queues)",
            out.sessions,
            enq.as_secs_f64(),
            out.sessions as f64 / enq.as_secs_f64()
        );
        let t = Instant::now();
        for c in clients.iter_mut() {
            let len = c.read_u32().await? as usize;
            c.read_exact(&mut buf[..len]).await?;
        }
        println!(
            "every session wrote it to its pipe {:.3}s after it was queued",
            t.elapsed().as_secs_f64()
        );
    }

    // Registry operations.
    let handles: Vec<_> = (0..n)
        .filter_map(|i| {
            gw.registry()
                .device(&format!("u{i}"), &DeviceId::new(format!("d{i}")))
        })
        .collect();
    let t = Instant::now();
    let mut found = 0;
    for i in 0..n {
        found += usize::from(
            gw.registry()
                .device(&format!("u{i}"), &DeviceId::new(format!("d{i}")))
                .is_some(),
        );
    }
    let lookup = t.elapsed();
    let rooms: Vec<RoomId> = (0..1000)
        .map(|r| RoomId::new(format!("room-{r}")))
        .collect();
    let t = Instant::now();
    for (i, h) in handles.iter().enumerate() {
        let _ = gw.registry().join(h, &rooms[i % rooms.len()], 64);
    }
    let join = t.elapsed();
    let t = Instant::now();
    for (i, h) in handles.iter().enumerate() {
        gw.registry().leave(h, &rooms[i % rooms.len()]);
    }
    let leave = t.elapsed();
    println!(
        "registry with {n} sessions: lookup {:.0}/s ({found} found), join {:.0}/s, leave {:.0}/s (one thread)",
        n as f64 / lookup.as_secs_f64(),
        n as f64 / join.as_secs_f64(),
        n as f64 / leave.as_secs_f64()
    );
    stop.cancel();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Simulate { sessions, pipe } => simulate(sessions, pipe).await,
        Cmd::Unicast {
            addr,
            upstream,
            conns,
            msgs,
            size,
            inflight,
            upstreams,
            rate,
            secret,
        } => {
            unicast(
                addr, upstream, conns, msgs, size, inflight, upstreams, rate, secret,
            )
            .await
        }
        Cmd::Broadcast {
            addr,
            upstream,
            conns,
            msgs,
            size,
            room,
            inflight,
            rate,
            secret,
        } => {
            broadcast(
                addr, upstream, conns, msgs, size, room, inflight, rate, secret,
            )
            .await
        }
        Cmd::Idle {
            addr,
            conns,
            rate,
            hold,
            ping,
            pid,
            source,
            secret,
        } => {
            let base = pid.and_then(rss_kib);
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            let step = Duration::from_millis(10);
            let per_step = (rate as usize / 100).max(1);
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(), String>>(conns.max(1));
            // Sessions logged in so far, and the gateway's RSS once a quarter
            // of them are: the slope from there on excludes fixed costs.
            let logged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut quarter: Option<(usize, u64)> = None;
            for i in 0..conns {
                let src = (!source.is_empty()).then(|| source[i % source.len()]);
                let token = tether::auth::mint_hs256(
                    &secret,
                    &format!("u{i}"),
                    None,
                    Duration::from_secs(86_400),
                    vec![],
                )?;
                let (tx, counter) = (tx.clone(), logged.clone());
                tasks.spawn(async move {
                    let r = async {
                        let s = connect(addr, src).await.map_err(|e| e.to_string())?;
                        let mut c = Client::over(s);
                        c.login(&token, &format!("d{i}"))
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(c)
                    }
                    .await;
                    match r {
                        Ok(mut c) => {
                            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let _ = tx.send(Ok(())).await;
                            let mut t = tokio::time::interval(Duration::from_secs(ping));
                            t.tick().await;
                            loop {
                                tokio::select! {
                                    _ = t.tick() => { if c.ping().await.is_err() { break; } }
                                    f = c.recv() => { if !matches!(f, Ok(Some(_))) { break; } }
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                        }
                    }
                });
                // Pace in 10 ms steps: timers are too coarse for per-connection gaps.
                if (i + 1) % per_step == 0 {
                    tokio::time::sleep(step).await;
                    let n = logged.load(std::sync::atomic::Ordering::Relaxed);
                    if quarter.is_none() && n >= conns / 4 && n > 0 {
                        quarter = pid.and_then(rss_kib).map(|r| (n, r));
                    }
                }
            }
            drop(tx);
            let (mut ok, mut failed) = (0usize, 0usize);
            while ok + failed < conns {
                match rx.recv().await {
                    Some(Ok(())) => ok += 1,
                    Some(Err(e)) => {
                        if failed < 5 {
                            eprintln!("connect/login failed: {e}");
                        }
                        failed += 1;
                    }
                    None => break,
                }
            }
            println!(
                "logged in {ok}/{conns} in {:.2}s ({failed} failed)",
                started.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(hold)).await;
            if let (Some(pid), Some(base)) = (pid, base) {
                let full = rss_kib(pid).context("gateway pid vanished")?;
                println!("gateway RSS: {base} KiB before, {full} KiB with {ok} sessions");
                if ok > 0 {
                    println!(
                        "per session (total growth / sessions): {:.0} B",
                        (full.saturating_sub(base) as f64 * 1024.0) / ok as f64
                    );
                }
                if let Some((n0, r0)) = quarter {
                    if ok > n0 {
                        println!(
                            "per session (RSS slope from {n0} to {ok} sessions): {:.0} B",
                            (full.saturating_sub(r0) as f64 * 1024.0) / (ok - n0) as f64
                        );
                    }
                }
            }
            tasks.abort_all();
            Ok(())
        }
    }
}
