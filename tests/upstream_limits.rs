//! Bounds of the upstream socket: the Hello size and deadline, the connection
//! cap, and the per-subscriber event queue (bytes), over real sockets.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use prost::Message;
use tether::upstream::FrameCodec;
use tether::wire::pb::{self, gateway_frame::Body as Out, upstream_frame::Body as In};
use tether::wire::{frame_bytes, Code};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

/// One Prometheus recorder for this test binary, so tests can read the
/// rendered metrics (counters are process-wide: assert on deltas or on
/// labels only one test produces).
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static H: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("install the recorder")
    })
}

/// The value of the first rendered sample whose line starts with `prefix`
/// (name plus labels); 0 when there is none yet.
fn sample(prefix: &str) -> f64 {
    metrics()
        .render()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

struct Raw {
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    w: OwnedWriteHalf,
}

impl Raw {
    async fn connect(g: &TestGateway) -> Self {
        let s = TcpStream::connect(g.upstream)
            .await
            .expect("connect upstream");
        let (r, w) = s.into_split();
        Self {
            frames: FramedRead::new(r, FrameCodec::new(64 * 1024 * 1024)),
            w,
        }
    }

    async fn send(&mut self, f: &pb::UpstreamFrame) {
        self.w.write_all(&frame_bytes(f)).await.expect("write");
    }

    /// The next frame within 10 s; `None` at EOF (or a reset).
    async fn next(&mut self) -> Option<pb::GatewayFrame> {
        match tokio::time::timeout(Duration::from_secs(10), self.frames.next())
            .await
            .expect("a frame or EOF in time")
        {
            Some(Ok(b)) => Some(pb::GatewayFrame::decode(b).expect("a GatewayFrame")),
            _ => None,
        }
    }

    /// Asserts a refusal: one `Error{code}`, then EOF.
    async fn expect_refused(&mut self, code: Code) {
        match self.next().await.map(|f| f.body) {
            Some(Some(Out::Error(e))) => {
                assert_eq!(Code::try_from(e.code), Ok(code), "{}", e.message)
            }
            other => panic!("expected Error{{{code:?}}}, got {other:?}"),
        }
        assert!(self.next().await.is_none(), "the connection must close");
    }
}

fn hello(subscribe: bool, name: &str) -> pb::UpstreamFrame {
    pb::UpstreamFrame {
        request_id: 1,
        body: Some(In::Hello(pb::Hello {
            secret: tether::config::DEV_UPSTREAM_SECRET.into(),
            subscribe,
            group: String::new(),
            name: name.into(),
            protocol_version: 1,
        })),
    }
}

#[tokio::test]
async fn a_hello_larger_than_4_kib_is_refused_with_frame_too_large() {
    let g = start(test_config()).await;
    let mut up = Raw::connect(&g).await;
    up.send(&hello(false, &"n".repeat(8 * 1024))).await;
    up.expect_refused(Code::FrameTooLarge).await;

    // A Hello within the bound is still fine.
    let mut up = Raw::connect(&g).await;
    up.send(&hello(false, &"n".repeat(3 * 1024))).await;
    match up.next().await.and_then(|f| f.body) {
        Some(Out::HelloOk(_)) => {}
        other => panic!("expected HelloOk, got {other:?}"),
    }
}

#[tokio::test]
async fn an_upstream_without_hello_is_refused_after_hello_timeout() {
    let refused =
        r#"tether_upstream_connections_refused_total{reason="CODE_UPSTREAM_AUTH_FAILED"}"#;
    let before = sample(refused);
    let mut cfg = test_config();
    cfg.upstream.hello_timeout = Duration::from_millis(200);
    let g = start(cfg).await;
    let mut up = Raw::connect(&g).await;
    up.expect_refused(Code::UpstreamAuthFailed).await;
    assert!(sample(refused) > before, "the refusal is counted");
}

#[tokio::test]
async fn the_connection_past_the_cap_is_refused() {
    let refused =
        r#"tether_upstream_connections_refused_total{reason="CODE_TOO_MANY_CONNECTIONS"}"#;
    let before = sample(refused);
    let mut cfg = test_config();
    cfg.upstream.max_connections = 2;
    let g = start(cfg).await;
    // One authenticated connection and one that has not sent Hello: both count.
    let (authed, _) = g.upstream(false).await;
    let quiet = Raw::connect(&g).await;
    let mut third = Raw::connect(&g).await;
    third.expect_refused(Code::TooManyConnections).await;
    assert!(sample(refused) > before, "the refusal is counted");
    authed
        .ping()
        .await
        .expect("the connections under the cap carry on");

    // A closed connection gives its slot back.
    drop(quiet);
    let mut tries = 0;
    let again = loop {
        match tether::upstream::UpstreamClient::connect(
            &tether::upstream::Endpoint::Tcp(g.upstream.to_string()),
            tether::upstream::UpstreamOptions::default(),
        )
        .await
        {
            Ok((c, _)) => break c,
            Err(e) => {
                tries += 1;
                assert!(tries < 500, "the slot never came back: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    again.ping().await.expect("the new connection works");
}

/// A subscriber that stops reading while devices send many large uplinks:
/// what the gateway queues stays under `upstream.event_queue_bytes` per
/// subscriber, the drops are counted by kind, devices and another subscriber
/// carry on, and the stuck subscriber is told how many uplinks it missed
/// when it reads again.
#[tokio::test]
async fn a_stuck_subscriber_is_bounded_in_bytes_and_told_what_it_missed() {
    const DEVICES: usize = 2;
    const ROUNDS: usize = 60;
    const PER_ROUND: usize = 4;
    const PAYLOAD: usize = 60 * 1024;
    const BOUND: u64 = 1024 * 1024;
    const TOTAL: usize = DEVICES * ROUNDS * PER_ROUND;
    let dropped_metric = r#"tether_upstream_events_dropped_total{kind="uplink"}"#;
    let dropped_before = sample(dropped_metric);
    let mut cfg = test_config();
    cfg.upstream.event_queue_bytes = BOUND;
    let g = start(cfg).await;

    // The stuck subscriber: Hello, HelloOk, then it reads nothing.
    let mut stuck = Raw::connect(&g).await;
    stuck.send(&hello(true, "stuck")).await;
    assert!(matches!(
        stuck.next().await.and_then(|f| f.body),
        Some(Out::HelloOk(_))
    ));
    // A healthy subscriber counts the uplinks it receives.
    let (healthy_client, mut events) = g.upstream(true).await;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let healthy = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev.kind {
                    Some(pb::event::Kind::Uplink(_)) => {
                        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Some(pb::event::Kind::Dropped(d)) => {
                        panic!("the healthy subscriber lost {d:?}")
                    }
                    _ => {}
                }
            }
        })
    };

    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let mut devices = Vec::new();
    for d in 0..DEVICES {
        devices.push(g.login(&format!("dev{d}"), "phone").await.0);
    }
    // Rounds small enough for the healthy subscriber's queue: each waits
    // until it has everything sent so far.
    for round in 0..ROUNDS {
        for c in devices.iter_mut() {
            for i in 0..PER_ROUND {
                c.send_up(&format!("m{round}-{i}"), "flood", payload.clone())
                    .await
                    .expect("send");
            }
        }
        for c in devices.iter_mut() {
            for _ in 0..PER_ROUND {
                match next(c).await.body {
                    Some(pb::server_frame::Body::SendAck(a)) => {
                        assert_eq!(a.code, Code::Ok as i32, "the healthy subscriber took it")
                    }
                    other => panic!("expected a SendAck, got {other:?}"),
                }
            }
        }
        let want = (round + 1) * DEVICES * PER_ROUND;
        let mut polls = 0;
        while seen.load(std::sync::atomic::Ordering::SeqCst) < want {
            polls += 1;
            assert!(polls < 2_000, "the healthy subscriber stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let queued = g.gw.local_bus().hub().queued_bytes() as u64;
        assert!(queued <= 2 * BOUND, "two subscribers hold {queued} bytes");
    }
    let queued = g.gw.local_bus().hub().queued_bytes() as u64;
    assert!(queued <= BOUND, "the stuck subscriber holds {queued} bytes");
    assert!(queued > BOUND / 2, "its queue did fill up: {queued} bytes");
    let dropped = sample(dropped_metric) - dropped_before;
    assert!(dropped > 0.0, "drops for the stuck subscriber are counted");

    // The stuck subscriber reads again: every uplink either arrives or is
    // counted in a notice.
    let (mut got, mut missed) = (0u64, 0u64);
    while got + missed < TOTAL as u64 {
        let f = stuck.next().await.expect("the stream goes on");
        match f.body {
            Some(Out::Event(pb::Event {
                kind: Some(pb::event::Kind::Uplink(_)),
            })) => got += 1,
            Some(Out::Event(pb::Event {
                kind: Some(pb::event::Kind::Dropped(d)),
            })) => missed += d.uplinks,
            _ => {}
        }
    }
    assert_eq!(got + missed, TOTAL as u64);
    assert!(missed > 0 && got > 0, "got {got}, missed {missed}");
    assert_eq!(missed as f64, dropped, "the notice and the metric agree");
    // Closing the healthy client ends its event stream and its task.
    drop(healthy_client);
    healthy.await.expect("the healthy subscriber lost nothing");
}
