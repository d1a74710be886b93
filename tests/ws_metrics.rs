//! The WebSocket transport on the metrics page, in a process of its own (the
//! recorder is process-wide): `tether_connections{transport}` counts ws and
//! wss connections, `tether_ws_upgrades_total` counts upgrades by result and
//! `tether_ws_closes_total` refused frames by close code, every label value
//! on the page from the start.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::client::Client;
use tether::wire::ws::{self, op};
use tether::ws_client::WsRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of the series that `series` names exactly (name and labels).
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Waits (5 s at most) until `series` reads `want` on the page.
async fn wait_value(exporter: &tether::metrics::Exporter, series: &str, want: f64) {
    let t0 = Instant::now();
    loop {
        let page = exporter.render();
        if value(&page, series) == Some(want) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{series} is {:?}, not {want}:\n{page}",
            value(&page, series)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connections_upgrades_and_closes_are_counted() {
    let exporter = tether::metrics::install().expect("the recorder");
    let mut cfg = test_config();
    Over::Ws.listen(&mut cfg);
    Over::Wss.listen(&mut cfg);
    cfg.listen.ws_origins = vec!["https://app.example.com".into()];
    cfg.limits.max_frame = 1024;
    let g = start(cfg).await;

    let page = exporter.render();
    for series in [
        "tether_connections{transport=\"ws\"}",
        "tether_connections{transport=\"wss\"}",
        "tether_ws_upgrades_total{result=\"accepted\"}",
        "tether_ws_upgrades_total{result=\"403\"}",
        "tether_ws_upgrades_total{result=\"timeout\"}",
        "tether_ws_closes_total{code=\"1009\"}",
        "tether_ws_closes_total{code=\"1002\"}",
    ] {
        assert_eq!(
            value(&page, series),
            Some(0.0),
            "{series} not at 0 from the start"
        );
    }

    let mut a = g.client_over(Over::Ws).await;
    a.login(&token("ann", "web"), "web").await.unwrap();
    let mut b = g.client_over(Over::Wss).await;
    b.login(&token("ann", "phone"), "phone").await.unwrap();
    wait_value(&exporter, "tether_connections{transport=\"ws\"}", 1.0).await;
    wait_value(&exporter, "tether_connections{transport=\"wss\"}", 1.0).await;
    wait_value(
        &exporter,
        "tether_ws_upgrades_total{result=\"accepted\"}",
        2.0,
    )
    .await;

    // A foreign origin: 403.
    let foreign = WsRequest {
        host: "localhost".into(),
        origin: Some("https://evil.example".into()),
    };
    assert!(Client::connect_ws(g.ws.unwrap(), &foreign).await.is_err());
    wait_value(&exporter, "tether_ws_upgrades_total{result=\"403\"}", 1.0).await;

    // An oversized message: closed with 1009.
    let mut raw = tokio::net::TcpStream::connect(g.ws.unwrap()).await.unwrap();
    raw.write_all(
        b"GET /tether HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: tether.v1\r\n\r\n",
    )
    .await
    .unwrap();
    let mut big = Vec::new();
    ws::client_frame(&mut big, op::BINARY, &[0u8; 2000], [9, 8, 7, 6]);
    let _ = raw.write_all(&big).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    wait_value(&exporter, "tether_ws_closes_total{code=\"1009\"}", 1.0).await;

    // Closed connections leave the gauge.
    drop(a);
    drop(b);
    wait_value(&exporter, "tether_connections{transport=\"ws\"}", 0.0).await;
    wait_value(&exporter, "tether_connections{transport=\"wss\"}", 0.0).await;
}
