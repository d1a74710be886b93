//! The simulated million: sessions over in-memory pipes, in one process,
//! through the real session, registry and router code (no sockets, so no
//! open-file limit).

use std::time::{Duration, Instant};

use crate::coord::rss_kib;

fn self_rss_kib() -> u64 {
    rss_kib(std::process::id()).unwrap_or(0)
}

/// Logs in `n` sessions over pipes of `pipe` bytes; reports memory per
/// session, broadcast time into every queue, and registry operations.
///
/// # Errors
/// When a login or a pipe fails.
pub async fn simulate(n: usize, pipe: usize, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut figures = serde_json::Map::new();
    let mut fig = |k: &str, v: f64| {
        figures.insert(k.to_owned(), serde_json::json!(v));
    };
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
    fig("login_rate", n as f64 / login.as_secs_f64());
    fig("rss_before_bytes", (rss0 * 1024) as f64);
    fig("rss_idle_bytes", (rss1 * 1024) as f64);
    fig(
        "rss_per_session_bytes",
        (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64,
    );
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
        fig(&format!("broadcast_{round}_queue_s"), enq.as_secs_f64());
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
        fig(
            &format!("broadcast_{round}_written_s"),
            t.elapsed().as_secs_f64(),
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
    fig("registry_lookups_per_s", n as f64 / lookup.as_secs_f64());
    fig("registry_joins_per_s", n as f64 / join.as_secs_f64());
    fig("registry_leaves_per_s", n as f64 / leave.as_secs_f64());
    stop.cancel();
    if let Some(p) = json {
        let doc = serde_json::json!({
            "scenario": "simulate",
            "params": {"sessions": n, "pipe": pipe},
            "figures": figures,
        });
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
        println!("JSON result: {}", p.display());
    }
    Ok(())
}
