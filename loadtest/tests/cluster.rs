//! The load tool against a cluster of gateway processes joined by a private
//! nats-server: `--cross-node` unicasts and broadcasts, and
//! `rolling-restart`, which restarts every gateway under load and must lose
//! and duplicate nothing. The gateways are the `tether` binary of this
//! build (next to `tether-loadtest`; `cargo test --workspace` builds it, or
//! set TETHER_BIN), nats-server as the gateway's own cluster tests find it
//! (NATS_SERVER, the PATH, /usr/sbin; `scripts/test` installs it). The
//! figures asserted are counts, never speeds.

mod common;
use common::system::nats_server_binary;
use common::{figure, free_port, stat};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The gateway binary: TETHER_BIN, or `tether` next to `tether-loadtest`.
fn tether_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TETHER_BIN") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_BIN_EXE_tether-loadtest")).with_file_name("tether");
    assert!(
        p.is_file(),
        "{} is missing: the cluster tests start gateway processes. Build it \
         (`cargo build --bin tether`, or run `cargo test --workspace`), or set TETHER_BIN",
        p.display()
    );
    p
}

/// The addresses and config files of an `n`-gateway cluster on the NATS
/// server at `nats_port`, written into `dir`.
struct Plan {
    nats_port: u16,
    addrs: Vec<String>,
    upstreams: Vec<String>,
    configs: Vec<PathBuf>,
}

fn plan(dir: &Path, n: usize) -> Plan {
    let nats_port = free_port();
    let mut p = Plan {
        nats_port,
        addrs: Vec::new(),
        upstreams: Vec::new(),
        configs: Vec::new(),
    };
    for k in 0..n {
        let (addr, up) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let cfg = dir.join(format!("node-{k}.toml"));
        std::fs::write(
            &cfg,
            format!(
                r#"node_id = "node-{k}"
[listen]
tcp = ["{addr}"]
tls = []
[upstream]
tcp = "{up}"
[metrics]
listen = ""
[limits]
login_rate = 0
[bus]
kind = "nats"
urls = ["nats://127.0.0.1:{nats_port}"]
cluster = "loadtest"
resume_secret = "a cluster-wide resume secret of 32+ bytes"
request_timeout = "1s"
heartbeat = "200ms"
node_timeout = "1s"
[shutdown]
drain_timeout = "5s"
reconnect_after = "100ms"
"#
            ),
        )
        .expect("write a gateway config");
        p.addrs.push(addr);
        p.upstreams.push(up);
        p.configs.push(cfg);
    }
    p
}

/// Processes of a test's own, killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_listening(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the nats-server and the gateways of `p` (for the scenarios that
/// do not start them themselves).
fn start_cluster(p: &Plan) -> Procs {
    let mut procs = Procs(Vec::new());
    procs.0.push(
        Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &p.nats_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server"),
    );
    wait_listening(&format!("127.0.0.1:{}", p.nats_port));
    for cfg in &p.configs {
        procs.0.push(
            Command::new(tether_bin())
                .arg("serve")
                .arg("--config")
                .arg(cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start a gateway"),
        );
    }
    for a in p.addrs.iter().chain(&p.upstreams) {
        wait_listening(a);
    }
    procs
}

/// Runs the load tool with `args` plus --json into `dir`; its JSON result
/// (written whether or not the run passed), its exit status, and its output.
fn run(dir: &Path, args: &[String]) -> (Value, bool, String) {
    let json = dir.join("result.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .args(args)
        .args(["--quiet", "--json"])
        .arg(&json)
        .output()
        .expect("run tether-loadtest");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Shown when a test fails (cargo test captures it otherwise).
    eprintln!("{text}");
    let v = match std::fs::read(&json) {
        Ok(b) => serde_json::from_slice(&b).expect("valid JSON"),
        Err(e) => panic!("no JSON result ({e}); exit {:?}\n{text}", out.status),
    };
    (v, out.status.success(), text)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn cluster_args(p: &Plan) -> Vec<String> {
    strings(&[
        "--addr",
        &p.addrs.join(","),
        "--upstream",
        &p.upstreams.join(","),
    ])
}

#[test]
fn cross_node_unicasts_and_broadcasts_reach_every_device_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(dir.path(), 3);
    let _procs = start_cluster(&p);

    let mut args = strings(&["unicast", "--cross-node", "--conns", "90", "--msgs", "600"]);
    args.extend(cluster_args(&p));
    let (v, ok, text) = run(dir.path(), &args);
    assert!(ok, "{text}");
    assert_eq!(figure(&v, "push_requests"), 600.0);
    assert_eq!(figure(&v, "queued"), 600.0, "every unicast found its user");
    assert_eq!(figure(&v, "received"), 600.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert!(figure(&v, "cluster_converge_s") >= 0.0);
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);

    let mut args = strings(&["broadcast", "--cross-node", "--conns", "90", "--msgs", "20"]);
    args.extend(cluster_args(&p));
    let (v, ok, text) = run(dir.path(), &args);
    assert!(ok, "{text}");
    assert_eq!(
        figure(&v, "push_requests"),
        20.0,
        "one request per broadcast"
    );
    assert_eq!(figure(&v, "queued"), 20.0 * 90.0, "each reached all 90");
    assert_eq!(figure(&v, "received"), 20.0 * 90.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);
}

/// Three gateways restarted in turn under unicasts and broadcasts: every
/// accepted push reaches its devices once, none twice. Needs the drain
/// hand-over (a draining node keeps its sessions for a resume on another
/// node): without it, every drained device starts a new session and the
/// pushes of the gap are lost.
#[test]
fn a_rolling_restart_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = plan(dir.path(), 3);
    let logs = dir.path().join("logs");
    let mut args = strings(&["rolling-restart", "--conns", "50"]);
    args.extend(cluster_args(&p));
    args.extend(strings(&[
        "--gateway-bin",
        &tether_bin().display().to_string(),
        "--gateway-config",
        &p.configs
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()
            .join(","),
        "--nats-server",
        &nats_server_binary().display().to_string(),
        "--nats-port",
        &p.nats_port.to_string(),
        "--push-rate",
        "50",
        "--broadcast-rate",
        "2",
        "--settle",
        "1",
        "--restart-timeout",
        "20",
        "--gateway-log-dir",
        &logs.display().to_string(),
    ]));
    let (v, ok, text) = run(dir.path(), &args);
    assert_eq!(figure(&v, "restarts"), 3.0, "{text}");
    assert!(
        figure(&v, "accepted_unicasts") > 0.0 && figure(&v, "accepted_broadcasts") > 0.0,
        "{text}"
    );
    assert_eq!(figure(&v, "lost"), 0.0, "{text}");
    assert_eq!(figure(&v, "duplicated"), 0.0, "{text}");
    assert!(ok, "{text}");
}

/// A base port whose offsets the `million` scenario uses (gateway k on
/// base+k over TCP, base+1000+k over TLS, base+2000+k for upstreams) are
/// all free now, for `gateways` gateways.
fn million_base(gateways: u16) -> u16 {
    for _ in 0..200 {
        let base = free_port();
        if base > 60_000 {
            continue;
        }
        let free = (0..gateways).all(|k| {
            [0, 1000, 2000]
                .iter()
                .all(|off| std::net::TcpListener::bind(("127.0.0.1", base + off + k)).is_ok())
        });
        if free {
            return base;
        }
    }
    panic!("no free ports for the million scenario's gateways")
}

/// The `million` scenario at a small scale: 3 gateways and 2,000 devices
/// (200 over TLS) in 50 rooms; every figure is there and nothing is lost
/// or duplicated, through the ramp, the broadcast, the room pushes, the
/// unicasts, the reconnect storm and a rolling restart of every gateway
/// under load (books kept by payload id).
#[test]
fn the_million_scenario_at_a_small_scale_reports_every_figure_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let args = strings(&[
        "million",
        "--gateway-bin",
        &tether_bin().display().to_string(),
        "--nats-server",
        &nats_server_binary().display().to_string(),
        "--nats-port",
        &free_port().to_string(),
        "--base-port",
        &million_base(3).to_string(),
        "--work-dir",
        &dir.path().join("work").display().to_string(),
        "--gateways",
        "3",
        "--conns",
        "2000",
        "--tls-conns",
        "200",
        "--rooms",
        "50",
        "--hold",
        "2",
        "--unicast-rate",
        "300",
        "--unicast-secs",
        "2",
        "--ramp",
        "2000",
        "--restart-push-rate",
        "200",
        "--restart-broadcast-every",
        "1",
        "--restart-settle",
        "1",
    ]);
    let (v, ok, text) = run(dir.path(), &args);
    assert!(ok, "{text}");
    assert_eq!(figure(&v, "online"), 2000.0);
    assert_eq!(figure(&v, "restarts"), 3.0, "every gateway, once");
    assert!(figure(&v, "restart_accepted_unicasts") > 100.0, "{text}");
    assert!(figure(&v, "restart_accepted_broadcasts") >= 2.0, "{text}");
    assert!(figure(&v, "restart_due") > 4000.0, "{text}");
    for key in [
        "ramp_s",
        "login_rate",
        "gateway_rss_per_conn",
        "gateway_rss_total",
        "nats_rss",
        "kernel_slab_per_conn",
        "kernel_tcp_mem_per_conn",
        "heartbeat_cores_per_million",
        "broadcast_s",
        "rooms_s",
        "unicast_rate",
        "storm_s",
    ] {
        assert!(figure(&v, key) >= 0.0, "{key}");
    }
    assert!(figure(&v, "gateway_rss_total") > 0.0);
    assert_eq!(figure(&v, "unicast_sent"), 600.0);
    assert!(figure(&v, "storm_dropped") > 0.0);
    for key in [
        "broadcast_lost",
        "rooms_lost",
        "unicast_lost",
        "after_storm_lost",
        "storm_resume_new",
        "duplicated",
        "seq_gaps",
        "restart_lost",
        "restart_unexpected",
        "lost",
    ] {
        assert_eq!(figure(&v, key), 0.0, "{key}: {text}");
    }
}
