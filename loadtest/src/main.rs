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

#[derive(Subcommand)]
enum Cmd {
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
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
            let mut half_rss = None;
            for i in 0..conns {
                let src = (!source.is_empty()).then(|| source[i % source.len()]);
                let token = tether::auth::mint_hs256(
                    &secret,
                    &format!("u{i}"),
                    None,
                    Duration::from_secs(86_400),
                    vec![],
                )?;
                let tx = tx.clone();
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
                if ok == conns / 2 && half_rss.is_none() {
                    half_rss = pid.and_then(rss_kib);
                }
                if conns >= 10 && ok > 0 && ok % (conns / 10) == 0 {
                    if let Some(r) = pid.and_then(rss_kib) {
                        eprintln!("{ok} sessions: gateway RSS {r} KiB");
                    }
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
                if let Some(half) = half_rss {
                    let n = ok - conns / 2;
                    if n > 0 {
                        println!(
                            "per session (slope, second half): {:.0} B",
                            (full.saturating_sub(half) as f64 * 1024.0) / n as f64
                        );
                    }
                }
            }
            tasks.abort_all();
            Ok(())
        }
    }
}
