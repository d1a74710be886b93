//! The live status page over real sockets: `/status.json`'s fields and the
//! numbers in them, and the page itself in headless Chromium (the DOM its
//! script fills in from the JSON, a screenshot, and what it shows when the
//! gateway stops answering).
//!
//! The metrics recorder is process-wide, so the tests take turns ([`TURN`]):
//! the process-wide series (connections by transport) are then this test's.

mod common;

use std::time::{Duration, Instant};

use common::browser;
use common::http::get;
use common::*;
use tether::wire::pb;

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `/status.json` once `ready` holds of it (at most 10 s).
async fn status_when(
    addr: std::net::SocketAddr,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = get(addr, "/status.json").await;
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        let v = a.json();
        if ready(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "status never got there: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_the_nodes_numbers() {
    let _turn = TURN.lock().await;
    exporter();
    let mut cfg = test_config();
    cfg.node_id = "status-json".into();
    cfg.delivery.replay_budget = 3 << 30;
    let g = start(cfg).await;
    let (addr, _admin) = start_admin(&g, &[], 1024, admin_limits(Duration::from_secs(5))).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(g.login(&format!("u{i}"), "phone").await.0);
    }
    // A connection that has not logged in is a connection, not a session.
    let _bare = g.client().await;
    let v = status_when(addr, |v| {
        v["connections"]["total"] == 4 && v["sessions"] == 3 && !v["rates"].is_null()
    })
    .await;
    assert_eq!(v["node_id"], "status-json");
    assert_eq!(v["draining"], false);
    assert!(v["cluster"].is_null(), "a node alone: {v:#}");
    assert_eq!(v["connections"]["tcp"], 4);
    assert_eq!(v["connections"]["tls"], 0);
    assert_eq!(v["connections"]["quic"], 0);
    assert_eq!(v["detached"], 0);
    assert!(v["parked"].is_u64(), "{v:#}");
    assert_eq!(v["replay"]["budget"], 3u64 << 30);
    assert!(v["replay"]["bytes"].is_u64());
    assert_eq!(v["interval_ms"], 1000);
    for k in [
        "logins",
        "pushes",
        "deliveries",
        "slow_consumers",
        "resumes",
    ] {
        assert!(v["rates"][k].is_f64(), "rates.{k}: {v:#}");
        assert!(v["totals"][k].is_u64(), "totals.{k}: {v:#}");
    }
    for k in ["window_seconds", "samples", "p50_seconds", "p99_seconds"] {
        assert!(v["push_wait"].get(k).is_some(), "push_wait.{k}: {v:#}");
    }
    let h = &v["history"];
    let n = h["t_ms"].as_array().unwrap().len();
    assert!(n >= 1, "{v:#}");
    for k in [
        "connections",
        "sessions",
        "logins",
        "pushes",
        "deliveries",
        "push_wait_p99",
    ] {
        assert_eq!(h[k].as_array().unwrap().len(), n, "history.{k}: {v:#}");
    }

    // Pushes show as pushes and deliveries, and their waits as quantiles.
    let before = v["totals"]["pushes"].as_f64().unwrap();
    let (up, _events) = g.upstream(false).await;
    for i in 0..20 {
        let r = up
            .push(pb::PushRequest {
                target: Some(pb::push_request::Target::Everyone(true)),
                payload: format!("p{i}").into_bytes().into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.sessions, 3);
    }
    for c in &mut clients {
        for i in 0..20 {
            push_within(c, Duration::from_secs(5), &format!("p{i}")).await;
        }
    }
    let v = status_when(addr, |v| {
        v["totals"]["pushes"].as_f64().unwrap() >= before + 20.0
            && v["push_wait"]["p99_seconds"].is_f64()
    })
    .await;
    assert!(v["totals"]["deliveries"].as_u64().unwrap() >= 60, "{v:#}");
    let p50 = v["push_wait"]["p50_seconds"].as_f64().unwrap();
    let p99 = v["push_wait"]["p99_seconds"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99 && p99 <= 10.0, "{v:#}");
    let pushes = v["history"]["pushes"].as_array().unwrap();
    assert!(
        pushes.iter().any(|p| p.as_f64().unwrap() > 0.0),
        "the chart's history shows the pushes: {v:#}"
    );
}

/// The page in headless Chromium shows the node id and the true number of
/// connections, both filled in by its script from `/status.json` (the HTML
/// the server sends has neither). A screenshot is kept at
/// `target/tmp/status_page/status.png` (the test prints its path; run with
/// `--nocapture` to see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_node_and_its_connections_in_chromium() {
    let _turn = TURN.lock().await;
    exporter();
    let mut cfg = test_config();
    cfg.node_id = "screen-node-7".into();
    let g = start(cfg).await;
    let (addr, _admin) = start_admin(&g, &[], 1024, admin_limits(Duration::from_secs(5))).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(g.login(&format!("viewer{i}"), "phone").await.0);
    }
    clients.push(g.client().await);
    // Samples are taken once a second: wait for one with every connection.
    status_when(addr, |v| {
        v["connections"]["total"] == 6 && v["sessions"] == 5
    })
    .await;
    let served = get(addr, "/").await;
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(served.body.to_vec()).unwrap();
    assert!(
        !html.contains("screen-node-7"),
        "the server renders no value"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "nothing is fetched from elsewhere"
    );

    let url = format!("http://{addr}/");
    let dom = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            browser::dump_dom(&url, Duration::from_secs(3), Duration::from_secs(60))
        })
        .await
        .unwrap()
    };
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the page never loaded its data:\n{dom}"
    );
    assert!(
        dom.contains(r#"<span id="node-id">screen-node-7</span>"#),
        "no node id in\n{dom}"
    );
    assert!(
        dom.contains(r#"<div class="v" id="conn-total">6</div>"#),
        "not the 6 connections open in\n{dom}"
    );
    assert!(dom.contains(r#"<span id="conn-tcp">6</span>"#), "{dom}");
    assert!(
        dom.contains(r#"<div class="v" id="sessions">5</div>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span id="state" class="live">LIVE</span>"#),
        "{dom}"
    );

    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("status.png");
    {
        let (url, png) = (url.clone(), png.clone());
        tokio::task::spawn_blocking(move || {
            browser::screenshot(
                &url,
                &png,
                (1600, 1000),
                Duration::from_secs(3),
                Duration::from_secs(60),
            )
        })
        .await
        .unwrap();
    }
    println!("status page screenshot: {}", png.display());
}

/// A page whose `/status.json` stops answering says so in a banner and in
/// its state, instead of showing stale numbers as if live. (A listener with
/// no node behind it serves the page and answers 503 to its polls.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_so_when_the_gateway_does_not_answer() {
    let _turn = TURN.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let admin = std::sync::Arc::new(tether::admin::Admin::metrics_only(exporter()));
    tokio::spawn(tether::admin::serve(
        listener,
        admin,
        admin_limits(Duration::from_secs(5)),
        stop.clone(),
    ));
    let _stop = stop.drop_guard();
    assert_eq!(get(addr, "/status.json").await.status, 503);
    let url = format!("http://{addr}/");
    let dom = tokio::task::spawn_blocking(move || {
        browser::dump_dom(&url, Duration::from_secs(3), Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(dom.contains(r#"<body class="down">"#), "{dom}");
    assert!(
        dom.contains(r#"<span id="state" class="down">NOT ANSWERING</span>"#),
        "{dom}"
    );
    assert!(dom.contains("NOT ANSWERING for "), "{dom}");
    assert!(dom.contains("HTTP 503"), "{dom}");
}

/// A server of the test's own: the status page, and `sample` as every
/// `/status.json`; when each poll came.
async fn serve_canned(
    sample: bytes::Bytes,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Instant>>>,
    tokio::task::JoinHandle<()>,
) {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Response, StatusCode};
    use hyper_util::rt::TokioIo;

    let polls: std::sync::Arc<std::sync::Mutex<Vec<Instant>>> = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let p = polls.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let (polls, sample) = (p.clone(), sample.clone());
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (polls, sample) = (polls.clone(), sample.clone());
                    async move {
                        let r = match req.uri().path() {
                            "/" => Response::new(Full::new(Bytes::from_static(
                                tether::admin::STATUS_PAGE.as_bytes(),
                            ))),
                            "/status.json" => {
                                polls.lock().unwrap().push(Instant::now());
                                Response::new(Full::new(sample))
                            }
                            _ => {
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    (addr, polls, server)
}

/// A sample from a real gateway's admin listener.
async fn real_sample() -> bytes::Bytes {
    let g = start(test_config()).await;
    let (real, _admin) = start_admin(&g, &[], 1024, admin_limits(Duration::from_secs(5))).await;
    get(real, "/status.json").await.body
}

/// The page left open polls `/status.json` once a second, in real time:
/// a server of the test's own serves the page and a sample taken from a
/// real gateway, and notes when each poll comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_polls_once_a_second() {
    let _turn = TURN.lock().await;
    exporter();
    let (addr, polls, server) = serve_canned(real_sample().await).await;
    let page = {
        let url = format!("http://{addr}/");
        tokio::task::spawn_blocking(move || browser::open(&url))
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while polls.lock().unwrap().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "the open page polled {} times in 20 s",
            polls.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(page);
    let p = polls.lock().unwrap().clone();
    for w in p.windows(2).skip(1) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(900) && gap < Duration::from_millis(2500),
            "polls {gap:?} apart: {p:?}"
        );
    }
    server.abort();
}

/// A gateway that answers, but with the same sample over and over (its
/// sampler stuck), is not shown as live: after 5 s without a new sample the
/// page says it is not answering, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_so_when_the_samples_stop_changing() {
    let _turn = TURN.lock().await;
    exporter();
    let (addr, _polls, server) = serve_canned(real_sample().await).await;
    let url = format!("http://{addr}/");
    let dom = tokio::task::spawn_blocking(move || {
        browser::dump_dom(&url, Duration::from_secs(8), Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert!(
        dom.contains(r#"<body data-loaded="1" class="down">"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<span id="state" class="down">NOT ANSWERING</span>"#),
        "{dom}"
    );
    assert!(dom.contains("no new sample since"), "{dom}");
    server.abort();
}
