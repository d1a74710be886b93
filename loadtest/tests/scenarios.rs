//! Every scenario of the load tool, small, against a real gateway on
//! loopback (TCP, TLS and QUIC), through the real binary: worker processes, JSON
//! result and SVG plot included; and the three that also run against redis
//! (`--redis`), each against a redis-server of its own, which must be on the
//! PATH (`scripts/test` installs it). The figures asserted are counts (what was queued arrived, nothing
//! was lost), never speeds.

mod common;
use common::{figure, stat};

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tether::config::Config;
use tether::gateway::Server;
use tether::ids::SessionId;
use tether::wire::pb::Lane;
use tokio_util::sync::CancellationToken;

struct Gw {
    gw: std::sync::Arc<tether::gateway::Gateway>,
    tcp: String,
    tls: Option<String>,
    quic: Option<String>,
    /// The WebSocket listeners (plain, over TLS), when both are configured.
    ws: Option<(String, String)>,
    upstream: String,
    stop: CancellationToken,
    certs: tempfile::TempDir,
}

impl Drop for Gw {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn gateway(tls: bool, tweak: impl FnOnce(&mut Config)) -> Gw {
    let certs = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::default();
    cfg.listen.tcp = vec!["127.0.0.1:0".parse().expect("addr")];
    cfg.listen.tls = if tls {
        vec!["127.0.0.1:0".parse().expect("addr")]
    } else {
        vec![]
    };
    cfg.listen.quic = Some(vec![]);
    cfg.upstream.tcp = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.metrics.listen = None;
    cfg.limits.login_rate = 0;
    cfg.tls.dev_cert_dir = certs.path().to_owned();
    tweak(&mut cfg);
    let server = Server::bind(cfg).await.expect("bind");
    let a = server.addrs().clone();
    let handle = server.gateway().clone();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Gw {
        gw: handle,
        tcp: a.tcp[0].to_string(),
        tls: a.tls.first().map(|a| a.to_string()),
        quic: a.quic.first().map(|a| a.to_string()),
        ws: a
            .ws
            .first()
            .zip(a.wss.first())
            .map(|(w, s)| (w.to_string(), s.to_string())),
        upstream: a.upstream_tcp.expect("upstream").to_string(),
        stop,
        certs,
    }
}

/// Runs the binary with `args` plus --json/--plot into `dir`; returns the
/// parsed JSON result.
async fn run(dir: &Path, args: Vec<String>) -> Value {
    let json = dir.join("result.json");
    let plot = dir.join("plot.svg");
    let mut all = args;
    all.extend([
        "--quiet".into(),
        "--json".into(),
        json.display().to_string(),
        "--plot".into(),
        plot.display().to_string(),
    ]);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
            .args(&all)
            .output()
            .expect("run tether-loadtest")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        out.status
    );
    // Shown when a test fails (cargo test captures it otherwise).
    eprintln!("{stdout}");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let v: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    assert!(
        stdout.contains(v["title"].as_str().unwrap_or("?")),
        "summary table printed:\n{stdout}"
    );
    v
}

/// A push run against redis: `requests` PUBLISHes reached `deliveries`
/// subscribers in all, every one received, timed, and no connection lost.
fn assert_redis_delivered_all(v: &Value, requests: f64, deliveries: u64, why: &str) {
    assert_eq!(figure(v, "push_requests"), requests);
    assert_eq!(figure(v, "queued"), deliveries as f64, "{why}");
    assert_eq!(figure(v, "received"), deliveries as f64);
    assert_eq!(figure(v, "missing"), 0.0);
    assert_eq!(figure(v, "lost_fast"), 0.0);
    assert_eq!(samples(v, "push"), deliveries, "every delivery timed");
    assert_eq!(stat(v, "drops"), 0);
}

/// A reconnect storm: all `n` sessions resumed (none started afresh), and
/// no push went missing, lost or skipped. A failure names the sessions
/// that missed pushes, and what `gw` still holds for each.
fn assert_every_session_resumed(v: &Value, n: f64, gw: &Gw) {
    let why = short_sessions(v, gw);
    assert_eq!(figure(v, "resumed"), n, "{why}");
    assert_eq!(figure(v, "resume_new"), 0.0, "{why}");
    assert_eq!(figure(v, "lost_fast"), 0.0, "{why}");
    assert_eq!(figure(v, "missing"), 0.0, "{why}");
    assert_eq!(stat(v, "seq_gaps"), 0, "{why}");
    assert!(v["short_sessions"].is_null(), "{why}");
}

/// The run's short sessions (which seqs each missed), each with the
/// gateway's state of it: a session still registered once the devices
/// have said goodbye is one whose device gave up on it.
fn short_sessions(v: &Value, gw: &Gw) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for x in v["short_sessions"].as_array().into_iter().flatten() {
        let id = SessionId(x["session"].as_u64().unwrap_or(0));
        let held = match gw.gw.registry().session(id) {
            Some(h) => format!(
                "next seq {}, {} queued, {} unacknowledged, detached: {}, connection generation {}",
                h.next_seq(Lane::Interactive),
                h.queued(),
                h.unacked(),
                h.is_detached(),
                h.gen()
            ),
            None => "ended".to_owned(),
        };
        let _ = writeln!(s, "short session {x}; at the gateway: {held}");
    }
    s
}

fn samples(v: &Value, name: &str) -> u64 {
    v["latency"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == name))
        .and_then(|l| l["samples"].as_u64())
        .unwrap_or(0)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_over_two_worker_processes_and_two_source_addresses() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "300",
            "--msgs",
            "50",
            "--workers",
            "2",
            "--sources",
            "127.0.0.1,127.0.0.2",
            // Two broadcasts in flight at most: the pushes wait on the
            // workers' progress reports.
            "--max-inflight-deliveries",
            "600",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "queued"), 15_000.0);
    assert_eq!(figure(&v, "received"), 15_000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert!(figure(&v, "delivery_rate") > 0.0);
    assert_eq!(stat(&v, "logins"), 300);
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);
    assert_eq!(samples(&v, "push"), 15_000);
    assert_eq!(samples(&v, "login"), 300);
    assert!(!v["timeline"].as_array().expect("timeline").is_empty());
    assert_eq!(v["params"]["workers_used"], 2, "two worker processes");
}

/// A broadcast far shorter than the one-second sampling interval still
/// plots what happened: devices online at the end of the login phase and
/// of the run, and the push rate over the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_shorter_than_a_second_plots_devices_online_and_a_rate() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            "--msgs",
            "1",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "received"), 200.0);
    let timeline = v["timeline"].as_array().expect("timeline");
    eprintln!("{} s, timeline {timeline:?}", v["duration_s"]);
    let n = |s: &Value, k: &str| s[k].as_f64().expect("a number");
    // The run's own last sample: every device online, every push in.
    let last = timeline.last().expect("a last sample");
    assert_eq!(n(last, "online"), 200.0, "{timeline:?}");
    assert_eq!(n(last, "pushes"), 200.0, "{timeline:?}");
    assert!(
        timeline.len() >= 2,
        "a first and a last sample: {timeline:?}"
    );
    assert!(n(&timeline[0], "t") < n(last, "t"), "{timeline:?}");
    assert!(v["duration_s"].as_f64().is_some_and(|d| d > 0.0));
    // The plot has the rate and the devices online, not "no data".
    let svg = std::fs::read_to_string(dir.path().join("plot.svg")).expect("plot");
    assert!(!svg.contains("no data"), "{svg}");
    assert!(svg.contains("pushes received /s"), "no push rate line");
    assert!(svg.contains("logins /s"), "no login rate line");
    assert!(svg.contains("devices online"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_in_process() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "unicast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            "--msgs",
            "2000",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "push_requests"), 2000.0);
    assert_eq!(figure(&v, "received"), 2000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(samples(&v, "push"), 2000);
}

/// A stand-in for a gateway's metrics listener: the n-th scrape reports
/// 10·n writes timed by `tether_push_wait_seconds`, all within 1 ms, and
/// 10·n more bytes resident.
async fn fake_metrics() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            let c = 10 * n;
            let body = format!(
                "# TYPE tether_push_wait_seconds histogram\n\
                 tether_push_wait_seconds_bucket{{le=\"0.0001\"}} 0\n\
                 tether_push_wait_seconds_bucket{{le=\"0.001\"}} {c}\n\
                 tether_push_wait_seconds_bucket{{le=\"+Inf\"}} {c}\n\
                 tether_push_wait_seconds_sum 0\n\
                 tether_push_wait_seconds_count {c}\n\
                 tether_process_resident_memory_bytes {}\n",
                1_000_000 + c
            );
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_reports_the_gateway_s_own_wait_from_its_metrics() {
    let gw = gateway(false, |_| {}).await;
    let metrics = fake_metrics().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "unicast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--metrics",
            &metrics,
            "--conns",
            "50",
            "--msgs",
            "200",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "received"), 200.0);
    // Counted between a scrape before the pushes and one after them.
    let writes = figure(&v, "gateway_wait_writes");
    assert!(writes >= 10.0 && writes % 10.0 == 0.0, "{writes}");
    assert_eq!(figure(&v, "gateway_wait_p50_ms"), 1.0);
    assert_eq!(figure(&v, "gateway_wait_p99_ms"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_to_connections_that_park_between_pushes() {
    // Parking after 30 ms of quiet, checked every 10 ms, and about one push
    // per device every 100 ms: most pushes find their connection parked,
    // and many are pushed as it parks. None may be lost or doubled.
    let gw = gateway(false, |cfg| {
        cfg.listen.park_after = Duration::from_millis(30);
        cfg.session.timer_tick = Duration::from_millis(10);
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "unicast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            "--msgs",
            "4000",
            "--rate",
            "2000",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "queued"), 4000.0);
    assert_eq!(figure(&v, "received"), 4000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);
    assert_eq!(stat(&v, "drops"), 0);
    let parks = gw.gw.parks();
    println!("{parks} parks for 4000 pushes");
    assert!(
        parks > 1000,
        "only {parks} parks: the test did not exercise parking"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicast_in_batches() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "unicast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            // Not a multiple of the batch: the last request carries 1.
            "--msgs",
            "2001",
            "--batch",
            "16",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "push_requests"), 2001.0);
    assert_eq!(figure(&v, "queued"), 2001.0);
    assert_eq!(figure(&v, "received"), 2001.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);
    assert_eq!(samples(&v, "push"), 2001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_broadcast_over_tls() {
    let gw = gateway(true, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = gw.certs.path().join("dev-cert.pem");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--room",
            "--tls",
            "--ca",
            &ca.display().to_string(),
            "--addr",
            gw.tls.as_deref().expect("tls listener"),
            "--upstream",
            &gw.upstream,
            "--conns",
            "100",
            "--msgs",
            "20",
            "--workers",
            "1",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "received"), 2000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "logins"), 100);
}

/// `--ws`: devices over WebSocket (the load tool's own framing), and with
/// `--tls` over WebSocket over TLS; a room broadcast reaches every device,
/// and a reconnect storm over wss resumes every session and loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_broadcast_over_ws_and_a_storm_over_wss() {
    let gw = gateway(false, |c| {
        c.listen.ws = vec!["127.0.0.1:0".parse().expect("addr")];
        c.listen.wss = vec!["127.0.0.1:0".parse().expect("addr")];
    })
    .await;
    let addrs = gw.ws.clone().expect("ws and wss listeners");
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--room",
            "--ws",
            "--addr",
            &addrs.0,
            "--upstream",
            &gw.upstream,
            "--conns",
            "100",
            "--msgs",
            "20",
            "--workers",
            "1",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "received"), 2000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "logins"), 100);

    let ca = gw.certs.path().join("dev-cert.pem");
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "reconnect",
            "--ws",
            "--tls",
            "--ca",
            &ca.display().to_string(),
            "--addr",
            &addrs.1,
            "--upstream",
            &gw.upstream,
            "--conns",
            "100",
            "--workers",
            "1",
            "--push-rate",
            "50",
            "--settle",
            "1",
        ]),
    )
    .await;
    assert_every_session_resumed(&v, 100.0, &gw);
    assert_eq!(samples(&v, "resume"), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_resumes_every_session_and_loses_nothing() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "reconnect",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            "--workers",
            "2",
            "--push-rate",
            "100",
            "--settle",
            "1",
        ]),
    )
    .await;
    assert_every_session_resumed(&v, 200.0, &gw);
    assert!(
        figure(&v, "received") >= 200.0 * 100.0,
        "two seconds of pushes at least"
    );
    assert_eq!(samples(&v, "resume"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplinks_are_acknowledged_and_reach_the_upstream() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "uplink",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "100",
            "--every-ms",
            "100",
            "--duration",
            "2",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert!(figure(&v, "acked_rate") > 0.0);
    assert!(figure(&v, "upstream_rate") > 0.0);
    assert_eq!(figure(&v, "uplink_errors"), 0.0);
    assert!(samples(&v, "uplink") > 100);
    assert!(stat(&v, "uplinks_acked") + stat(&v, "uplink_errors") <= stat(&v, "uplinks_sent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_logs_devices_in_and_out() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "churn",
            "--addr",
            &gw.tcp,
            "--conns",
            "100",
            "--life-ms",
            "200",
            "--duration",
            "2",
        ]),
    )
    .await;
    assert!(figure(&v, "disconnect_rate") > 0.0);
    assert!(
        stat(&v, "logins") > 200,
        "each device logs in several times"
    );
    assert_eq!(stat(&v, "refused") + stat(&v, "connect_errors"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_devices_are_cut_off_while_the_rest_get_everything() {
    // A small socket buffer, so the slow devices' backlog reaches the
    // session queue soon.
    let gw = gateway(false, |c| c.listen.send_buffer = 4096).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "50",
            "--msgs",
            "1500",
            "--size",
            "2048",
            "--rate",
            "500",
            "--slow-every",
            "5",
            "--slow-bps",
            "1024",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(figure(&v, "gap_skipped"), 0.0);
    assert_eq!(samples(&v, "push"), 40 * 1500);
    let slow = samples(&v, "push_slow");
    assert!(slow > 0 && slow < 10 * 1500, "slow devices got {slow}");
    // The devices see their cut-off late (the Close sits behind what they
    // have not read); the gateway knows at once: a slow consumer's session
    // stays detached for a resume, while every device that kept up said
    // goodbye and ended its session.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.gw.detached_count() != 10 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        gw.gw.detached_count(),
        10,
        "the 10 slow devices were cut off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reports_memory_per_connection_from_a_pid() {
    let gw = gateway(false, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = std::process::id().to_string();
    let v = run(
        dir.path(),
        args(&[
            "idle", "--addr", &gw.tcp, "--conns", "300", "--hold", "1", "--pid", &pid, "--room",
        ]),
    )
    .await;
    assert_eq!(figure(&v, "online"), 300.0);
    // Every device joined the room: no error came back.
    assert_eq!(
        v["stats"]["codes"],
        serde_json::json!([]),
        "{:#}",
        v["stats"]
    );
    assert!(v["title"].as_str().is_some_and(|t| t.contains("in a room")));
    assert!(figure(&v, "gateway_rss") > 1.0, "MiB of a live process");
    let _ = figure(&v, "rss_per_conn_total");
    drop(gw);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[test]
fn simulate_runs_sessions_over_pipes_and_writes_its_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("sim.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tether-loadtest"))
        .args(["simulate", "--sessions", "2000", "--json"])
        .arg(&json)
        .output()
        .expect("run tether-loadtest");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid JSON");
    let f = &v["figures"];
    for key in [
        "login_rate",
        "rss_per_session_bytes",
        "broadcast_0_queue_s",
        "broadcast_1_written_s",
        "registry_lookups_per_s",
    ] {
        assert!(f[key].as_f64().is_some_and(|x| x > 0.0), "{key} in {v:#}");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2000 sessions logged in"), "{text}");
    assert!(
        text.contains("(2000 found)"),
        "every session is in the registry: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_keeps_the_books_on_every_push() {
    // A short login timeout, so silent hostile connections close soon; a
    // short ack timeout, so stalled slow consumers see retransmissions; small
    // queues, windows and socket buffers, so they are cut off within seconds.
    let gw = gateway(false, |c| {
        c.session.login_timeout = Duration::from_secs(1);
        c.delivery.ack_timeout = Duration::from_secs(1);
        c.delivery.queue_bytes = 16 * (128 + 96);
        c.delivery.stall_timeout = Duration::from_secs(1);
        c.delivery.window = 16;
        c.listen.send_buffer = 4096;
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pid = std::process::id().to_string();
    let v = run(
        dir.path(),
        args(&[
            "soak",
            "--addr",
            &gw.tcp,
            "--upstream",
            &gw.upstream,
            "--conns",
            "200",
            "--workers",
            "1",
            "--pid",
            &pid,
            "--duration",
            "8s",
            "--warmup",
            "2s",
            "--sample-every",
            "1s",
            "--unicast-rate",
            "100",
            "--broadcast-rate",
            "20",
            "--slow-fraction",
            "0.05",
            "--slow-stall",
            "4s",
            "--slow-rcvbuf",
            "2048",
            "--churn-rate",
            "10",
            "--storm-every",
            "3s",
            "--storm-fraction",
            "0.25",
            "--hostile-rate",
            "5",
            "--hostile-deadline",
            "6s",
        ]),
    )
    .await;
    let soak = &v["soak"];
    let rec = &soak["reconciled"];
    let n = |k: &str| {
        rec[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {rec:#}"))
    };
    // The books balance: every accepted push is delivered, reported, or
    // counted lost, and the two ways of counting the lost agree.
    assert!(n("queued") > 200 * 20, "broadcasts reached the devices");
    assert_eq!(
        n("delivered"),
        n("delivered_ok")
            + n("delivered_but_failed")
            + n("delivered_but_expired")
            + n("delivered_unreported")
    );
    assert_eq!(
        n("lost_without_report"),
        n("ok_not_delivered") + n("unreported_not_delivered")
    );
    assert_eq!(
        rec["lost_check"].as_i64(),
        Some(n("lost_without_report") as i64)
    );
    assert_eq!(
        n("queued"),
        n("reported_ok") + n("reported_failed") + n("reported_expired") + n("unreported")
    );
    assert_eq!(
        figure(&v, "delivered"),
        (stat(&v, "pushes") + stat(&v, "slow_pushes")) as f64,
        "the devices' counters and their session records agree: {rec:#}"
    );
    assert_eq!(stat(&v, "record_overflow"), 0);
    // Every kind of load ran.
    assert!(figure(&v, "storms") >= 2.0);
    assert!(figure(&v, "storm_drops") > 0.0);
    assert!(figure(&v, "churns") > 0.0);
    assert!(figure(&v, "slow_cut") > 0.0, "slow consumers were cut off");
    assert!(figure(&v, "hostile_opened") >= 20.0);
    assert_eq!(
        figure(&v, "hostile_closed"),
        figure(&v, "hostile_opened"),
        "the gateway closed every hostile connection: {:#}",
        soak["hostile_codes"]
    );
    let samples = soak["samples"].as_array().expect("samples");
    assert!(samples.len() >= 6);
    assert!(samples.iter().any(|s| s["rss_bytes"].as_u64().is_some()));
    assert!(samples.iter().any(|s| s["cpu_pct"].as_f64().is_some()));
    assert!(soak["verdict"].as_str().is_some());
}

/// A gateway that also listens for QUIC on a loopback UDP port.
impl Gw {
    /// `scenario` against this gateway's QUIC listener (`--quic`, the
    /// development certificate as `--ca`, `--addr`, `--upstream`), then `rest`.
    fn quic_args(&self, scenario: &str, rest: &[&str]) -> Vec<String> {
        let ca = self.certs.path().join("dev-cert.pem");
        let mut a = args(&[
            scenario,
            "--quic",
            "--ca",
            &ca.display().to_string(),
            "--addr",
            self.quic.as_deref().expect("QUIC listener"),
            "--upstream",
            &self.upstream,
        ]);
        a.extend(args(rest));
        a
    }
}

async fn quic_gateway() -> Gw {
    gateway(false, |c| {
        c.listen.quic = Some(vec!["127.0.0.1:0".parse().expect("addr")]);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_over_quic_delivers_everything() {
    let gw = quic_gateway().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        gw.quic_args(
            "broadcast",
            &[
                "--conns",
                "200",
                "--msgs",
                "50",
                "--workers",
                "1",
                "--quic-endpoints",
                "3",
            ],
        ),
    )
    .await;
    assert_eq!(figure(&v, "queued"), 10_000.0);
    assert_eq!(figure(&v, "received"), 10_000.0);
    assert_eq!(figure(&v, "lost_fast"), 0.0);
    assert_eq!(stat(&v, "logins"), 200);
    assert_eq!(stat(&v, "endpoints"), 3, "devices share three endpoints");
    assert_eq!(stat(&v, "seq_gaps") + stat(&v, "seq_dups"), 0);
    assert_eq!(samples(&v, "push"), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_over_quic_resumes_every_session() {
    let gw = quic_gateway().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        gw.quic_args(
            "reconnect",
            &[
                "--conns",
                "100",
                "--workers",
                "0",
                "--push-rate",
                "50",
                "--settle",
                "1",
            ],
        ),
    )
    .await;
    assert_every_session_resumed(&v, 100.0, &gw);
    assert!(figure(&v, "received") > 0.0);
}

/// With `--zero-rtt` each device keeps the ticket of its first connection
/// and resumes in 0-RTT data: the gateway's session store (65,536 tickets
/// by default) takes every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_devices_resume_in_0rtt_after_a_storm() {
    let gw = quic_gateway().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        gw.quic_args(
            "reconnect",
            &[
                "--zero-rtt",
                "--conns",
                "50",
                "--workers",
                "0",
                "--push-rate",
                "20",
                "--settle",
                "1",
            ],
        ),
    )
    .await;
    assert_every_session_resumed(&v, 50.0, &gw);
    assert_eq!(figure(&v, "zero_rtt_no_ticket"), 50.0, "first connections");
    assert_eq!(
        figure(&v, "zero_rtt_accepted"),
        50.0,
        "every resume in 0-RTT"
    );
    assert_eq!(figure(&v, "zero_rtt_refused"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_quic_devices_lose_nothing_and_never_reconnect() {
    let gw = quic_gateway().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        gw.quic_args(
            "migrate",
            &[
                "--conns",
                "200",
                "--workers",
                "0",
                "--quic-endpoints",
                "4",
                "--rebinds",
                "2",
                "--migrate-secs",
                "0.5",
                "--push-rate",
                "40",
                "--settle",
                "1",
            ],
        ),
    )
    .await;
    let queued = figure(&v, "queued");
    assert!(queued >= 200.0 * 40.0, "pushes flowed throughout: {queued}");
    assert_eq!(figure(&v, "received"), queued);
    assert_eq!(figure(&v, "lost"), 0.0);
    assert_eq!(figure(&v, "duplicated"), 0.0);
    assert_eq!(figure(&v, "seq_gaps"), 0.0);
    assert_eq!(figure(&v, "reconnects"), 0.0, "a migration is no reconnect");
    assert_eq!(figure(&v, "drops"), 0.0);
    assert_eq!(figure(&v, "rebinds"), 8.0, "four endpoints, twice");
    assert_eq!(stat(&v, "resumes"), 0);
    // Every connection moved twice: 400 moves, and here the gateway counts
    // 400. Under overload it was seen to count fewer (debug builds) and
    // more (LOADTEST.md), so what is asserted is that it saw every
    // connection move.
    let seen = gw.gw.quic_migrations();
    assert!(seen >= 200, "gateway counted {seen} migrations");
}

/// A redis-server of one test's own, killed when dropped. Never the one a
/// machine may run on the default port.
struct Redis {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a redis-server on a free loopback port. redis-server takes a port
/// number, not a bound socket, so a free one is picked (common::free_port);
/// should another process take it meanwhile, the server
/// cannot bind and exits, or the process that answers is not ours: then
/// another port is tried.
fn redis_server() -> Redis {
    for _ in 0..5 {
        let port = common::free_port();
        assert_ne!(port, 6379, "never the default redis port");
        let dir = tempfile::tempdir().expect("tempdir");
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // Loopback only; protected mode would refuse the second
            // source address (127.0.0.2).
            .args(["--protected-mode", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not on the PATH; the side-by-side tests need it: \
                 run the tests with scripts/test, which installs it"
            ),
            Err(e) => panic!("starting redis-server: {e}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ours = loop {
            if child.try_wait().expect("redis-server status").is_some() {
                break false;
            }
            match redis_pid(port) {
                Some(pid) => break pid == child.id(),
                None if std::time::Instant::now() > deadline => {
                    panic!("redis-server did not answer on port {port} within 10 s")
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let redis = Redis {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        };
        if ours {
            return redis;
        }
    }
    panic!("redis-server could not start on any of 5 free ports")
}

/// The process id the redis server on `port` reports (INFO server).
fn redis_pid(port: u16) -> Option<u32> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n").ok()?;
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    while text.len() < 64 * 1024 {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..n]);
        let t = String::from_utf8_lossy(&text);
        if let Some(pid) = t
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .filter(|_| t.contains("\r\nrun_id:"))
        {
            return pid.trim().parse().ok();
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_idle_holds_subscribers_on_their_user_and_room_channels() {
    let redis = redis_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "idle",
            "--redis",
            &redis.addr,
            "--room",
            "--conns",
            "20",
            "--hold",
            "1",
            "--pid",
            &redis.pid(),
        ]),
    )
    .await;
    assert_eq!(figure(&v, "online"), 20.0);
    assert_eq!(stat(&v, "logins"), 20);
    assert_eq!(stat(&v, "refused") + stat(&v, "connect_errors"), 0);
    assert_eq!(samples(&v, "login"), 20, "connect and SUBSCRIBE, timed");
    assert!(
        figure(&v, "gateway_rss") > 1.0,
        "MiB of a live redis-server"
    );
    let _ = figure(&v, "rss_per_conn_total");
    let title = v["title"].as_str().expect("title");
    assert!(title.contains("u:<user> and r:bench"), "{title}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broadcast_reaches_every_subscriber_over_two_worker_processes() {
    let redis = redis_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "broadcast",
            "--redis",
            &redis.addr,
            "--conns",
            "20",
            "--msgs",
            "50",
            "--workers",
            "2",
            "--sources",
            "127.0.0.1,127.0.0.2",
            // Five PUBLISHes in flight at most.
            "--max-inflight-deliveries",
            "100",
        ]),
    )
    .await;
    assert_redis_delivered_all(&v, 50.0, 1000, "PUBLISH reached 20 each time");
    assert!(figure(&v, "delivery_rate") > 0.0);
    assert_eq!(stat(&v, "logins"), 20);
    assert_eq!(v["params"]["workers_used"], 2, "two worker processes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unicast_reaches_each_user_once() {
    let redis = redis_server();
    let dir = tempfile::tempdir().expect("tempdir");
    let v = run(
        dir.path(),
        args(&[
            "unicast",
            "--redis",
            &redis.addr,
            "--conns",
            "20",
            "--msgs",
            "500",
            "--workers",
            "0",
        ]),
    )
    .await;
    assert_redis_delivered_all(&v, 500.0, 500, "each PUBLISH reached its user");
}
