//! The real binary: `tether serve` on free ports, a device over TCP, a push
//! over the Unix upstream socket, the Prometheus endpoint (with the QUIC
//! socket's granted buffer), and SIGTERM drain.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tether::upstream::{Endpoint, UpstreamClient, UpstreamOptions};
use tether::wire::pb;

mod common;

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn serve_binary_pushes_over_unix_socket_exports_metrics_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (tcp, metrics) = (common::free_port(), common::free_port());
    let sock = dir.path().join("upstream.sock");
    let cfg = dir.path().join("tether.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\ntcp = [\"127.0.0.1:{tcp}\"]\ntls = []\nquic = [\"127.0.0.1:0\"]\n\n[upstream]\ntcp = \"\"\nunix = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[shutdown]\ndrain_timeout = \"3s\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let mut child = common::serve_binary(dir.path(), &cfg, Stdio::piped());

    // Wait for the client port.
    let mut c = common::connect_when_up(tcp).await;
    c.login(&common::token("alice", "phone"), "phone")
        .await
        .unwrap();

    let (up, _) =
        UpstreamClient::connect(&Endpoint::Unix(sock.clone()), UpstreamOptions::default())
            .await
            .unwrap();
    let r = up.push_user("alice", "over-unix").await.unwrap();
    assert_eq!(r.sessions, 1);
    let f = common::next(&mut c).await;
    assert_eq!(&common::push_of(&f).payload[..], b"over-unix");

    let text = tokio::task::spawn_blocking(move || common::scrape(metrics))
        .await
        .unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        metric(&text, "tether_logins_total{result=\"ok\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "tether_sessions "), Some(1.0), "{text}");
    // The QUIC socket's buffer as the kernel granted it: quic.socket_buffer
    // (8 MiB), or less where net.core.rmem_max caps it.
    let rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok());
    if let Some(max) = rmem_max {
        assert_eq!(
            metric(
                &text,
                "tether_quic_socket_buffer_bytes{direction=\"receive\"}"
            ),
            Some(max.min(8_388_608.0)),
            "{text}"
        );
    }
    assert_eq!(
        metric(&text, "tether_connections{transport=\"tcp\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tether_pushes_total{target=\"user\"}"),
        Some(1.0),
        "{text}"
    );
    // Counted through the hot-path handles (taken once, after the recorder
    // is installed): the LoginOk and the push went out.
    assert!(
        metric(&text, "tether_frames_out_total{transport=\"tcp\"}").is_some_and(|n| n >= 2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tether_push_deliveries_total "),
        Some(1.0),
        "{text}"
    );
    // The push was written once to a connected device: one wait sample,
    // in the configured buckets (the largest is 10 s).
    assert_eq!(
        metric(&text, "tether_push_wait_seconds_count "),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "tether_push_wait_seconds_bucket{le=\"10\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(
        text.contains("# HELP tether_push_drops_total")
            || text.contains("tether_push_deliveries_total")
    );
    // The resident-memory gauge (what `tether-loadtest --metrics` reads) is
    // sampled once a second.
    let mut rss = None;
    for _ in 0..30 {
        let text = tokio::task::spawn_blocking(move || common::scrape(metrics))
            .await
            .unwrap();
        rss = metric(&text, "tether_process_resident_memory_bytes ");
        if rss.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rss = rss.expect("tether_process_resident_memory_bytes within 6 s");
    assert!(
        (1_000_000.0..4e9).contains(&rss),
        "implausible resident memory {rss}"
    );

    // SIGTERM: the client hears SERVER_DRAINING, the process exits 0.
    assert!(common::sigterm(&child));
    assert_eq!(
        common::expect_closed(&mut c).await,
        pb::Code::ServerDraining
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "gateway did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {err}");
    assert!(err.contains("draining"), "{err}");
    assert!(!sock.exists(), "the unix socket is removed at exit");
}
