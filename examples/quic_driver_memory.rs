//! What an idle QUIC connection costs the server with quinn's connection
//! driver, and what it costs with the gateway's own driver around
//! quinn-proto: measured side by side (docs/LOADTEST.md, "QUIC memory").
//!
//! Both servers take the gateway's QUIC settings (`tether::quic`'s server,
//! transport and endpoint configuration, the development certificate, the
//! gateway's allocator) and do what the gateway's QUIC layer does for an idle
//! session, nothing more: accept the connection and the client's
//! bidirectional stream, open the bulk unidirectional stream, and answer
//! what the client writes on its stream (an echo stands in for a login and
//! its heartbeats). Tether's own session state is not in either: the
//! difference between the two is what replacing quinn's per-connection
//! pieces saves the gateway.
//!
//! - `quinn`: `quinn::Endpoint`; per connection, quinn's `Connection` (its
//!   shared state, its event channel from the endpoint, its transmit buffer,
//!   its driver task) and one task of ours holding the two streams.
//! - `tether`: the gateway's own driver around quinn-proto
//!   (`tether::quic::driver`): one task per UDP socket owns quinn-proto's
//!   `Endpoint` and hands each datagram straight to its connection; per
//!   connection, one allocation (quinn-proto's `Connection`, waker slots,
//!   a timer entry) and the same one task of ours holding it.
//!
//! The measuring process starts the server as a child process (this same
//! binary), connects `--conns` clients (quinn, 256 to a UDP socket, as the
//! load tool does) and reads the child's RSS from /proc: after a warm-up,
//! after the logins, and after `--pings` rounds of one small write and its
//! answer on every connection, which is how quinn's per-connection event
//! channel grows (it allocates 32 events at a time, per datagram received).
//!
//! ```sh
//! cargo run --release --example quic_driver_memory -- --conns 5000 --pings 40 --runs 3
//! ```

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tether::quic::driver::{Admission, Connection, Endpoint};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Connections a client UDP socket carries.
const PER_SOCKET: usize = 256;
/// Connections opened, and measured away, before the first reading.
const WARM: usize = 200;
/// What a client writes, and the server answers, per login or ping.
const MSG: &[u8; 8] = b"tether!\n";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => args
                .get(i + 1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} takes a number")),
            None => Ok(default),
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.first().map(String::as_str) == Some("serve") {
        let (Some(driver), Some(dir)) = (args.get(1), args.get(2)) else {
            bail!("serve DRIVER CERT_DIR");
        };
        return rt.block_on(serve(driver, Path::new(dir)));
    }
    let conns = opt("--conns", 5_000)?;
    let pings = opt("--pings", 40)?;
    let runs = opt("--runs", 1)?;
    let dir = tempfile::tempdir()?;
    tether::tls::generate_dev_cert(dir.path())?;
    println!("driver  run  after login (B/conn)  after {pings} pings (B/conn)");
    for run in 1..=runs {
        for driver in ["quinn", "tether"] {
            let (login, pinged) = rt.block_on(measure(driver, dir.path(), conns, pings))?;
            println!("{driver:<6}  {run:>3}  {login:>20.0}  {pinged:>21.0}");
        }
    }
    Ok(())
}

/// The gateway's QUIC server configuration over the development certificate.
fn configs(dir: &Path) -> anyhow::Result<(quinn_proto::EndpointConfig, quinn_proto::ServerConfig)> {
    let cfg = tether::config::Config::default();
    let tls = tether::tls::server_config(
        &dir.join(tether::tls::DEV_CERT),
        &dir.join(tether::tls::DEV_KEY),
    )?;
    let server = tether::quic::server_config(&cfg, &tls)?;
    Ok((tether::quic::endpoint_config(&cfg)?, server))
}

async fn serve(driver: &str, dir: &Path) -> anyhow::Result<()> {
    let (ep_cfg, server) = configs(dir)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    println!("ready {addr}");
    match driver {
        "quinn" => serve_quinn(ep_cfg, server, socket).await,
        "tether" => serve_tether(ep_cfg, server, socket).await,
        other => bail!("unknown driver {other}"),
    }
}

async fn serve_quinn(
    ep_cfg: quinn_proto::EndpointConfig,
    server: quinn_proto::ServerConfig,
    socket: std::net::UdpSocket,
) -> anyhow::Result<()> {
    let endpoint =
        quinn::Endpoint::new(ep_cfg, Some(server), socket, Arc::new(quinn::TokioRuntime))?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                return;
            };
            // Held for the connection's life, as the gateway holds its bulk lane.
            let _bulk = conn.open_uni().await;
            let mut buf = [0u8; 64];
            while let Ok(Some(n)) = recv.read(&mut buf).await {
                if send.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// The gateway's driver (`tether::quic::driver`), with one task per
/// connection holding it, as the gateway's session task does.
async fn serve_tether(
    ep_cfg: quinn_proto::EndpointConfig,
    server: quinn_proto::ServerConfig,
    socket: std::net::UdpSocket,
) -> anyhow::Result<()> {
    let endpoint = Endpoint::new(ep_cfg, server, socket)?;
    endpoint
        .run(|_| {
            Admission::Accept(Box::new(|conn| {
                tokio::spawn(echo(conn));
            }))
        })
        .await;
    Ok(())
}

async fn echo(conn: Connection) {
    let Ok(stream) = conn.accept_bi().await else {
        return;
    };
    // Held for the connection's life, as the gateway holds its bulk lane.
    let _bulk = conn.open_uni();
    let mut buf = [0u8; 64];
    while let Ok(n @ 1..) = conn.read(stream, &mut buf).await {
        if conn.write_all(stream, &buf[..n]).await.is_err() {
            return;
        }
    }
}
/// One measurement: the server's RSS growth per connection after the
/// logins and after the pings.
async fn measure(
    driver: &str,
    dir: &Path,
    conns: usize,
    pings: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["serve", driver])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("ready ")
        .context("the server did not start")?
        .parse()?;
    let result = clients(addr, dir, pid, conns, pings).await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

async fn clients(
    addr: SocketAddr,
    dir: &Path,
    pid: u32,
    conns: usize,
    pings: usize,
) -> anyhow::Result<(f64, f64)> {
    let ca: PathBuf = dir.join(tether::tls::DEV_CERT);
    let tls = tether::tls::client_config_pinned(&ca)?;
    let cfg = tether::quic::client_config(&tether::config::Config::default(), tls)?;
    let endpoints = (0..(WARM + conns).div_ceil(PER_SOCKET))
        .map(|_| {
            let mut e = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            e.set_default_client_config(cfg.clone());
            Ok(e)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let open = |i: usize| {
        let ep = endpoints[i / PER_SOCKET].clone();
        async move {
            let conn = ep.connect(addr, "localhost")?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(MSG).await?;
            let mut back = [0u8; MSG.len()];
            recv.read_exact(&mut back).await?;
            anyhow::Ok((conn, send, recv))
        }
    };
    let mut held = Vec::with_capacity(WARM + conns);
    for chunk in (0..WARM).collect::<Vec<_>>().chunks(100) {
        for r in futures_util::future::join_all(chunk.iter().map(|&i| open(i))).await {
            held.push(r?);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss(pid)?;
    for chunk in (WARM..WARM + conns).collect::<Vec<_>>().chunks(100) {
        for r in futures_util::future::join_all(chunk.iter().map(|&i| open(i))).await {
            held.push(r?);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let login = rss(pid)?;
    for _ in 0..pings {
        let rounds = held.iter_mut().map(|(_, send, recv)| async move {
            send.write_all(MSG).await?;
            let mut back = [0u8; MSG.len()];
            recv.read_exact(&mut back).await?;
            anyhow::Ok(())
        });
        for r in futures_util::future::join_all(rounds).await {
            r?;
        }
        // Let the acknowledgements arrive as separate datagrams, as a
        // heartbeat's do.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pinged = rss(pid)?;
    let per = |after: u64| (after.saturating_sub(before)) as f64 / conns as f64;
    drop(held);
    Ok((per(login), per(pinged)))
}

/// A process's resident set, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}
