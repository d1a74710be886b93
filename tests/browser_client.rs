//! The example browser client (web/index.html and web/tether.js, served by
//! the gateway's WebSocket listener) in headless Chromium: it logs in,
//! receives pushes, acknowledges them, sends uplinks, and resumes after the
//! test cuts its socket, with nothing lost and nothing twice. The page
//! echoes each push's payload as an uplink (`?echo=1`), so that what it
//! received is seen from the upstream side. It also proves what the
//! gateway's own client cannot: that a browser's upgrade, masking and
//! message framing are what the gateway expects, and the other way round.
//!
//! Needs Chromium (Debian's `chromium`; scripts/test installs it).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tether::wire::pb;
use tokio::net::{TcpListener, TcpStream};

/// A TCP relay in front of the gateway that the test can cut: every
/// connection through it so far is closed by `cut`, as a network drop
/// would close it, while new connections still go through.
struct Relay {
    addr: SocketAddr,
    conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let c = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().push(task);
            }
        });
        Self { addr, conns }
    }

    /// Closes every connection through the relay (both its sockets).
    fn cut(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock());
        let live = conns.iter().filter(|t| !t.is_finished()).count();
        conns.iter().for_each(tokio::task::JoinHandle::abort);
        live
    }
}

/// Pushes `from..to` to `user`, asking for delivery reports.
async fn push_range(up: &tether::upstream::UpstreamClient, user: &str, from: usize, to: usize) {
    for i in from..to {
        let r = up
            .push(pb::PushRequest {
                target: Some(pb::push_request::Target::UserId(user.into())),
                payload: format!("m{i}").into_bytes().into(),
                message_id: format!("id{i}"),
                report_delivery: true,
                ..Default::default()
            })
            .await
            .expect("push");
        assert_eq!(r.sessions, 1, "m{i}: {r:?}");
    }
}

/// Reads events until every payload `m0..m<n>` came back as an uplink
/// (counting each arrival) and every push was reported delivered.
async fn wait_echoes(
    events: &mut tether::upstream::EventStream,
    n: usize,
    echoed: &mut HashMap<String, usize>,
    delivered: &mut HashMap<String, i32>,
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (0..n).any(|i| {
        !echoed.contains_key(&format!("m{i}")) || !delivered.contains_key(&format!("id{i}"))
    }) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let missing: Vec<_> = (0..n)
            .filter(|i| !echoed.contains_key(&format!("m{i}")))
            .collect();
        let ev = tokio::time::timeout(left, events.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no echo of {missing:?} within 30 s"))
            .expect("event stream open");
        match ev.kind {
            Some(pb::event::Kind::Uplink(u)) if u.route == "echo" => {
                let p = String::from_utf8(u.payload.to_vec()).expect("utf-8");
                *echoed.entry(p).or_default() += 1;
            }
            Some(pb::event::Kind::Delivery(d)) => {
                delivered.insert(d.message_id.clone(), d.code);
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_page_receives_acks_sends_and_resumes_with_nothing_lost() {
    let mut cfg = test_config();
    cfg.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
    let g = start(cfg).await;
    let ws = g.ws.expect("a WebSocket listener");
    let relay = Relay::start(ws).await;
    let (up, mut events) = g.upstream(true).await;

    let url = format!(
        "http://{}/#token={}&device=browser&echo=1",
        relay.addr,
        token("ann", "browser")
    );
    let _page = tokio::task::spawn_blocking(move || common::browser::open(&url))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while g.attached() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the page did not log in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = g.gw.registry().len();
    assert_eq!(session, 1);

    let (mut echoed, mut delivered) = (HashMap::new(), HashMap::new());
    push_range(&up, "ann", 0, 20).await;
    wait_echoes(&mut events, 20, &mut echoed, &mut delivered, "online").await;

    // The network drops: the gateway keeps the session; pushes wait for it.
    assert!(relay.cut() >= 1, "the page's socket went through the relay");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while g.gw.detached_count() == 0 && g.attached() == 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drop was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    push_range(&up, "ann", 20, 40).await;
    wait_echoes(
        &mut events,
        40,
        &mut echoed,
        &mut delivered,
        "after the resume",
    )
    .await;

    // Each push reached the page once (it drops repeats by seq; its uplinks
    // are deduplicated by client_msg_id), and each was acknowledged.
    let twice: Vec<_> = echoed.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "echoed more than once: {twice:?}");
    assert_eq!(echoed.len(), 40, "{echoed:?}");
    assert!(
        delivered.values().all(|c| *c == pb::Code::Ok as i32),
        "{delivered:?}"
    );
    // The same session, resumed: one session, and a resume counted.
    assert_eq!(g.gw.registry().len(), 1);
}
