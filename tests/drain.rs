//! Graceful drain: every session is told to reconnect elsewhere/later, the
//! server finishes within the drain timeout, and new connections are refused.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::client::Client;
use tether::wire::pb::{self, server_frame::Body as Resp, Code};

fn drain_config() -> tether::config::Config {
    let mut cfg = test_config();
    cfg.shutdown.drain_timeout = Duration::from_secs(3);
    cfg.shutdown.reconnect_after = Duration::from_millis(1500);
    cfg.shutdown.reconnect_to = "other.example:7400".into();
    cfg
}

/// Asserts the draining Close and the end of the connection.
async fn expect_draining(c: &mut Client) {
    let f = next(c).await;
    match f.body {
        Some(Resp::Close(cl)) => {
            assert_eq!(cl.code, Code::ServerDraining as i32);
            assert_eq!(cl.reconnect_after_ms, 1500);
            assert_eq!(cl.reconnect_to, "other.example:7400");
        }
        other => panic!("expected a draining Close, got {other:?}"),
    }
    expect_eof(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_closes_every_session_and_stops_accepting() {
    let g = start(drain_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(g.login(&format!("user-{i}"), "phone").await.0);
    }
    let _ = drain_events(&mut events, Duration::from_millis(50)).await;

    let t0 = Instant::now();
    g.stop.cancel();
    for c in &mut clients {
        expect_draining(c).await;
    }
    drop(clients);

    let TestGateway { done, tcp, .. } = g;
    let res = tokio::time::timeout(Duration::from_secs(3) + Duration::from_millis(500), done)
        .await
        .expect("the server did not finish within the drain timeout");
    res.unwrap().unwrap();
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "drain took {took:?}");

    // New connections are refused (nobody is listening any more, or the
    // connection ends without a login).
    match tokio::time::timeout(Duration::from_secs(2), Client::connect_tcp(tcp)).await {
        Err(_) => panic!("connect hung after the drain"),
        Ok(Err(_)) => {}
        Ok(Ok(mut c)) => {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.login(&token("late", "phone"), "phone"),
            )
            .await
            .expect("a connection after the drain hung");
            assert!(r.is_err(), "a login succeeded after the drain: {r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_emits_session_closed_events() {
    let g = start(drain_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut a, ok) = g.login("alice", "phone").await;
    let _ = drain_events(&mut events, Duration::from_millis(50)).await;
    g.stop.cancel();
    expect_draining(&mut a).await;
    drop(a);
    let closed = wait_event(&mut events, Duration::from_secs(3), |e| match e {
        pb::event::Kind::Closed(c) => Some(c.clone()),
        _ => None,
    })
    .await;
    assert_eq!(closed.session.unwrap().session_id, ok.session_id);
    assert_eq!(closed.code, Code::ServerDraining as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_closes_connections_that_never_logged_in() {
    // The login timeout (10 s by default) is far longer than the drain timeout
    // (2 s): the connection must be closed by the drain, not by its deadline.
    let mut cfg = drain_config();
    cfg.shutdown.drain_timeout = Duration::from_secs(2);
    let g = start(cfg).await;
    let (mut logged, _) = g.login("alice", "phone").await;
    let mut anon = g.client().await;
    ping_pong(&mut logged).await;
    assert_eq!(g.gw.limits().connections(), 2);

    let t0 = Instant::now();
    g.stop.cancel();
    expect_draining(&mut logged).await;
    drop(logged);

    // Watch the anonymous connection and the server side by side, so a failure
    // reports both what the client saw and how long the drain took.
    let watcher = tokio::spawn(async move {
        let r = anon.recv_timeout(Duration::from_millis(3000)).await;
        let at = t0.elapsed();
        let code = match &r {
            Ok(Some(f)) => match &f.body {
                Some(Resp::Close(c)) => Some(c.code),
                _ => None,
            },
            _ => None,
        };
        (code, at, format!("{r:?}"))
    });
    let TestGateway { done, gw, .. } = g;
    tokio::time::timeout(Duration::from_secs(4), done)
        .await
        .expect("the server did not finish")
        .unwrap()
        .unwrap();
    let drain_took = t0.elapsed();
    let (code, at, seen) = watcher.await.unwrap();

    assert_eq!(
        code,
        Some(Code::ServerDraining as i32),
        "a connection that never logged in got {seen} after {at:?} \
         (drain finished after {drain_took:?})"
    );
    assert!(at < Duration::from_secs(1), "draining Close after {at:?}");
    assert!(
        drain_took < Duration::from_secs(2),
        "the drain waited for the full drain timeout: {drain_took:?}"
    );
    assert_eq!(gw.limits().connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_during_drain_is_refused() {
    let mut cfg = drain_config();
    cfg.shutdown.drain_timeout = Duration::from_secs(2);
    let g = start(cfg).await;
    // A connection that is open but has not logged in when the drain starts,
    // and logs in right after: it must not become a new session.
    let mut c = g.client().await;
    let (mut a, _) = g.login("alice", "phone").await;
    g.stop.cancel();
    expect_draining(&mut a).await;
    let rid = c
        .request(login_req(&token("bob", "phone"), "phone"))
        .await
        .unwrap();
    // Either it was already closed by the drain, or the login is refused.
    let f = next(&mut c).await;
    match f.body {
        Some(Resp::Close(cl)) => assert_eq!(cl.code, Code::ServerDraining as i32),
        Some(Resp::Error(e)) => {
            assert_eq!(e.code, Code::ServerDraining as i32);
            assert_eq!(f.request_id, rid);
            assert_eq!(close_of(&next(&mut c).await), Code::ServerDraining);
        }
        other => panic!("a login during the drain got {other:?}"),
    }
    expect_eof(&mut c).await;
    // bob never became a session.
    assert!(g.gw.registry().user_sessions("bob").is_empty());
    drop((a, c));
    g.wait_sessions(0).await;
}
