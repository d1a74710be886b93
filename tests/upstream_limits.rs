//! Bounds of the upstream socket over real sockets: the Hello size and
//! deadline, the pre-Hello pool and the connection cap, failed Hellos per
//! source, the reply queue per connection (bytes), and the per-subscriber
//! event queue (bytes).

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use prost::Message;
use tether::upstream::{Endpoint, FrameCodec, UpstreamClient, UpstreamOptions};
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

/// Tests whose upstream leaves its replies unread take turns: the queued
/// reply bytes are one process-wide gauge, which one of them asserts on.
static STUCK_WRITERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

/// `upstream.max_connections` counts authenticated connections only: a
/// Hello past it is refused, a connection that has not said Hello takes no
/// place, and a closed connection gives its place back.
#[tokio::test]
async fn the_hello_past_the_cap_is_refused() {
    let refused =
        r#"tether_upstream_connections_refused_total{reason="CODE_TOO_MANY_CONNECTIONS"}"#;
    let before = sample(refused);
    let mut cfg = test_config();
    cfg.upstream.max_connections = 2;
    let g = start(cfg).await;
    let (first, _) = g.upstream(false).await;
    // A connection that has not sent Hello does not count.
    let _quiet = Raw::connect(&g).await;
    let (second, _) = g.upstream(false).await;
    let mut third = Raw::connect(&g).await;
    third.send(&hello(false, "third")).await;
    third.expect_refused(Code::TooManyConnections).await;
    assert!(sample(refused) > before, "the refusal is counted");
    first
        .ping()
        .await
        .expect("the connections under the cap carry on");

    // A closed connection gives its place back.
    drop(second);
    let again = connect_once_free(&g, 500).await;
    again.ping().await.expect("the new connection works");
}

/// Connects (with a Hello) to the upstream TCP socket as soon as a place
/// under `upstream.max_connections` is free, trying every 10 ms, at most
/// `tries` times.
async fn connect_once_free(g: &TestGateway, tries: u32) -> UpstreamClient {
    let ep = Endpoint::Tcp(g.upstream.to_string());
    let mut tried = 0;
    loop {
        match connect(&ep).await {
            Ok(c) => return c,
            Err(e) => {
                tried += 1;
                assert!(tried < tries, "the place never came back: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connect(ep: &Endpoint) -> Result<UpstreamClient, tether::upstream::ClientError> {
    UpstreamClient::connect(ep, UpstreamOptions::default())
        .await
        .map(|(c, _)| c)
}

/// A push through a fresh upstream connection, which must succeed at once.
async fn push_through(ep: &Endpoint, device: &mut tether::client::Client) {
    let up = connect(ep)
        .await
        .expect("a service connects while silent sockets are open");
    let r = up.push_user("alice", &b"hi"[..]).await.expect("push");
    assert_eq!(r.sessions, 1);
    assert_eq!(push_of(&next(device).await).payload[..], b"hi"[..]);
}

/// 300 TCP sockets and 100 Unix sockets that never say Hello (more than
/// `upstream.max_connections`) do not keep a service out: the Rust client
/// (what `tether push` uses) connects and pushes at once, over TCP and over
/// the Unix socket. The silent sockets fit in the default pre-Hello pool, so
/// none of them is evicted.
#[tokio::test]
async fn silent_sockets_do_not_keep_services_out() {
    const SILENT: usize = 300;
    const SILENT_UNIX: usize = 100;
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("up.sock");
    let mut cfg = test_config();
    cfg.upstream.unix = Some(path.clone());
    // Nothing here may rely on the silent sockets timing out.
    cfg.upstream.hello_timeout = Duration::from_secs(300);
    assert!(cfg.upstream.max_connections < SILENT as u32);
    assert!(cfg.upstream.max_pending_hellos as usize > SILENT + SILENT_UNIX);
    let g = start(cfg).await;
    let (mut device, _) = g.login("alice", "phone").await;

    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(Raw::connect(&g).await);
    }
    let mut silent_unix = Vec::new();
    for _ in 0..SILENT_UNIX {
        silent_unix.push(
            tokio::net::UnixStream::connect(&path)
                .await
                .expect("connect"),
        );
    }
    // The accept queue is first in, first out: by the time the gateway
    // answers these, it has taken in every silent socket before them.
    push_through(&Endpoint::Tcp(g.upstream.to_string()), &mut device).await;
    push_through(&Endpoint::Unix(path.clone()), &mut device).await;

    // The oldest silent socket is still there, and may still say Hello.
    silent[0].send(&hello(false, "late")).await;
    assert!(matches!(
        silent[0].next().await.and_then(|f| f.body),
        Some(Out::HelloOk(_))
    ));
}

/// When the pre-Hello pool is full a newcomer evicts its oldest member
/// (`Error{CODE_TOO_MANY_CONNECTIONS}`, then the close), so a flood of
/// silent sockets cannot lock out a service that connects after it.
#[tokio::test]
async fn a_full_pre_hello_pool_evicts_its_oldest_member() {
    const POOL: u32 = 16;
    const SILENT: usize = 300;
    let evicted = "tether_upstream_hellos_evicted_total";
    let before = sample(evicted);
    let mut cfg = test_config();
    cfg.upstream.max_pending_hellos = POOL;
    cfg.upstream.hello_timeout = Duration::from_secs(300);
    let g = start(cfg).await;
    let (mut device, _) = g.login("alice", "phone").await;

    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(Raw::connect(&g).await);
    }
    push_through(&Endpoint::Tcp(g.upstream.to_string()), &mut device).await;

    // The oldest were told why, then closed.
    silent[0].expect_refused(Code::TooManyConnections).await;
    // The service's own connection took a place, and left it at its Hello;
    // the newest silent ones are still waiting.
    let kept = silent.len() - POOL as usize + 1;
    silent[kept].send(&hello(false, "late")).await;
    assert!(matches!(
        silent[kept].next().await.and_then(|f| f.body),
        Some(Out::HelloOk(_))
    ));
    let n = sample(evicted) - before;
    assert!(
        n >= (SILENT - POOL as usize) as f64,
        "{n} evictions counted"
    );
}

/// Wrong secrets from one source: the first `FAILED_HELLO_BURST` are
/// refused at once with `CODE_UPSTREAM_AUTH_FAILED`; past them the refusal
/// is held back and says `CODE_RATE_LIMITED`. Meanwhile a Hello with the
/// right secret from the same address is accepted at once, and every
/// failure is counted.
#[tokio::test]
async fn failed_hellos_are_rate_limited_per_source_but_a_right_secret_gets_in() {
    const BURST: usize = 10;
    let failed = "tether_upstream_failed_hellos_total";
    let limited = r#"tether_upstream_connections_refused_total{reason="CODE_RATE_LIMITED"}"#;
    let (failed_before, limited_before) = (sample(failed), sample(limited));
    let g = start(test_config()).await;
    let wrong = || {
        let mut h = hello(false, "guess");
        if let Some(In::Hello(h)) = &mut h.body {
            h.secret = "not-the-upstream-secret".into();
        }
        h
    };
    for i in 0..BURST {
        let mut up = Raw::connect(&g).await;
        up.send(&wrong()).await;
        match up.next().await.and_then(|f| f.body) {
            Some(Out::Error(e)) => assert_eq!(
                Code::try_from(e.code),
                Ok(Code::UpstreamAuthFailed),
                "failure {i}: {}",
                e.message
            ),
            other => panic!("failure {i}: expected an Error, got {other:?}"),
        }
    }
    // Past the burst: held back. A right secret gets in meanwhile.
    let mut held = Raw::connect(&g).await;
    held.send(&wrong()).await;
    let up = connect(&Endpoint::Tcp(g.upstream.to_string()))
        .await
        .expect("the right secret is accepted");
    up.ping().await.expect("and served");
    held.expect_refused(Code::RateLimited).await;
    assert!(sample(failed) - failed_before >= (BURST + 1) as f64);
    assert!(sample(limited) > limited_before);
}

/// An upstream that sends many presence requests with large replies and
/// never reads: the replies queued for it stay within
/// `upstream.reply_queue_bytes` (the gateway stops reading its requests),
/// another upstream connection and the devices are served meanwhile, and
/// every request is answered once it reads again.
#[tokio::test]
async fn replies_to_an_upstream_that_does_not_read_are_bounded_in_bytes() {
    let _one = STUCK_WRITERS.lock().await;
    const BOUND: u64 = 1024 * 1024;
    const USERS: usize = 20_000;
    const REQUESTS: usize = 100;
    let queued = "tether_upstream_reply_bytes";
    let waits = "tether_upstream_reply_waits_total";
    let waits_before = sample(waits);
    let mut cfg = test_config();
    cfg.upstream.reply_queue_bytes = BOUND;
    let g = start(cfg).await;
    let (mut device, _) = g.login("alice", "phone").await;

    let mut stuck = Raw::connect(&g).await;
    stuck.send(&hello(false, "stuck")).await;
    assert!(matches!(
        stuck.next().await.and_then(|f| f.body),
        Some(Out::HelloOk(_))
    ));
    let ids: Vec<String> = (0..USERS).map(|i| format!("user-{i}")).collect();
    let request = move |rid: u64| {
        frame_bytes(&pb::UpstreamFrame {
            request_id: rid,
            body: Some(In::Presence(pb::PresenceRequest {
                user_ids: ids.clone(),
            })),
        })
    };
    let Raw { mut frames, mut w } = stuck;
    let sender = tokio::spawn(async move {
        for rid in 0..REQUESTS as u64 {
            w.write_all(&request(rid)).await.expect("write");
        }
        w
    });
    // Wait until the gateway stops reading: its replies filled the bound.
    // Other tests of this binary may have a small reply (a HelloOk, a Pong)
    // queued at any moment, hence the slack over the bound.
    let mut polls = 0;
    loop {
        let held = sample(queued);
        assert!(
            held <= (BOUND + 4096) as f64,
            "{held} bytes of replies queued"
        );
        if sample(waits) > waits_before && held >= (BOUND / 2) as f64 {
            break;
        }
        polls += 1;
        assert!(polls < 3_000, "the reply queue never filled: {held} bytes");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // It stays there: the gateway reads no more requests.
    for _ in 0..20 {
        let held = sample(queued);
        assert!(
            held <= (BOUND + 4096) as f64,
            "{held} bytes of replies queued"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !sender.is_finished(),
        "the gateway stopped reading requests"
    );

    // Another upstream connection and a device are served meanwhile.
    let other = connect(&Endpoint::Tcp(g.upstream.to_string()))
        .await
        .expect("connect");
    let p = other.presence(&["alice"]).await.expect("presence");
    assert_eq!(p[0].devices.len(), 1);
    ping_pong(&mut device).await;

    // Reading again: every request is answered, in order.
    let mut seen = 0u64;
    while seen < REQUESTS as u64 {
        let b = tokio::time::timeout(Duration::from_secs(30), frames.next())
            .await
            .expect("replies keep coming")
            .expect("not at EOF")
            .expect("a frame");
        let f = pb::GatewayFrame::decode(b).expect("a GatewayFrame");
        assert_eq!(f.request_id, seen);
        match f.body {
            Some(Out::PresenceReply(r)) => assert_eq!(r.users.len(), USERS),
            other => panic!("expected a PresenceReply, got {other:?}"),
        }
        seen += 1;
    }
    let _ = sender.await.expect("all requests were written");
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
        let queued = g.gw.hub().queued_bytes() as u64;
        assert!(queued <= 2 * BOUND, "two subscribers hold {queued} bytes");
    }
    let queued = g.gw.hub().queued_bytes() as u64;
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

/// A service that stopped reading (its socket full of replies it never
/// takes) is closed after `upstream.stall_timeout`, and its place under
/// `upstream.max_connections` comes back: one leaking service cannot keep
/// every other one out for ever.
#[tokio::test]
async fn an_upstream_that_stops_reading_is_closed_after_the_stall_timeout() {
    let _one = STUCK_WRITERS.lock().await;
    let stalls = "tether_upstream_stalls_total";
    let before = sample(stalls);
    let mut cfg = test_config();
    cfg.upstream.max_connections = 1;
    cfg.upstream.stall_timeout = Duration::from_secs(1);
    let g = start(cfg).await;

    let mut stuck = Raw::connect(&g).await;
    stuck.send(&hello(false, "stuck")).await;
    assert!(matches!(
        stuck.next().await.and_then(|f| f.body),
        Some(Out::HelloOk(_))
    ));
    // Large presence replies it never reads: the socket buffers fill, and
    // the gateway's write waits.
    let ids: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let Raw { frames, mut w } = stuck;
    let sender = tokio::spawn(async move {
        for rid in 2..200u64 {
            let req = frame_bytes(&pb::UpstreamFrame {
                request_id: rid,
                body: Some(In::Presence(pb::PresenceRequest {
                    user_ids: ids.clone(),
                })),
            });
            if w.write_all(&req).await.is_err() {
                break;
            }
        }
        w
    });
    // Its place is taken meanwhile.
    let mut second = Raw::connect(&g).await;
    second.send(&hello(false, "second")).await;
    second.expect_refused(Code::TooManyConnections).await;

    // After the stall timeout the gateway gives up on it, and the place
    // comes back.
    let other = connect_once_free(&g, 1_000).await;
    other.ping().await.expect("the new connection works");
    assert!(sample(stalls) > before, "the stall is counted");
    drop(frames);
    sender.abort();
}
