//! Login deadline (including a slowloris that dribbles a partial frame) and
//! the idle/heartbeat timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::wire::{decode_frame, pb, Code};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn fast_timeouts() -> tether::config::Config {
    let mut cfg = test_config();
    cfg.session.login_timeout = Duration::from_millis(300);
    cfg.session.heartbeat_interval = Duration::from_secs(1);
    cfg.session.idle_timeout = Duration::from_millis(1500);
    cfg.session.timer_tick = Duration::from_millis(20);
    cfg
}

#[tokio::test]
async fn connection_without_login_is_closed_at_the_login_deadline() {
    let g = start(fast_timeouts()).await;
    let t0 = Instant::now();
    let mut c = g.client().await;
    let f = next(&mut c).await;
    assert_eq!(close_of(&f), Code::LoginTimeout);
    let took = t0.elapsed();
    expect_eof(&mut c).await;
    assert!(
        took >= Duration::from_millis(250),
        "closed too early: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "closed too late: {took:?}"
    );
    assert_eq!(g.gw.registry().len(), 0);
}

#[tokio::test]
async fn slowloris_partial_frame_is_closed_at_the_login_deadline() {
    let g = start(fast_timeouts()).await;
    let t0 = Instant::now();
    let stream = tokio::net::TcpStream::connect(g.tcp).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut r, mut w) = stream.into_split();

    // A valid Login frame, dribbled one byte every 25 ms: it would take about
    // (4 + len) * 25 ms, far beyond the 300 ms deadline.
    let login = tether::wire::frame_bytes(&pb::ClientFrame {
        request_id: 1,
        body: Some(login_req(&token("alice", "phone"), "phone")),
    });
    assert!(login.len() > 100);
    let dribbler = tokio::spawn(async move {
        let mut sent = 0usize;
        for b in login.iter() {
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        sent
    });

    // Read everything the gateway sends until it closes the connection.
    let mut got = bytes::BytesMut::new();
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let took = t0.elapsed();
    assert!(
        read.is_ok(),
        "the gateway did not close the slowloris connection"
    );
    dribbler.abort();

    let mut frames = Vec::new();
    while let Some(b) = decode_frame(&mut got, 1 << 20).unwrap() {
        frames.push(<pb::ServerFrame as prost::Message>::decode(b).unwrap());
    }
    assert_eq!(frames.len(), 1, "only a Close expected: {frames:?}");
    assert_eq!(close_of(&frames[0]), Code::LoginTimeout);
    assert!(
        took < Duration::from_millis(1500),
        "slowloris kept the connection open for {took:?}"
    );
    assert_eq!(g.gw.registry().len(), 0);
}

#[tokio::test]
async fn silent_session_times_out_while_a_pinging_one_stays() {
    let g = start(fast_timeouts()).await;
    let (mut silent, _) = g.login("alice", "phone").await;
    let (mut beating, _) = g.login("bob", "phone").await;
    let t0 = Instant::now();

    let pinger = tokio::spawn(async move {
        // Ping every 300 ms for 2.7 s: well past the 1.5 s idle timeout.
        let mut pongs = 0;
        while t0.elapsed() < Duration::from_millis(2700) {
            ping_pong(&mut beating).await;
            pongs += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (beating, pongs)
    });

    let f = next(&mut silent).await;
    assert_eq!(close_of(&f), Code::HeartbeatTimeout);
    let took = t0.elapsed();
    expect_eof(&mut silent).await;
    assert!(
        took >= Duration::from_millis(1400),
        "closed early: {took:?}"
    );
    assert!(took < Duration::from_millis(2600), "closed late: {took:?}");

    let (mut beating, pongs) = pinger.await.unwrap();
    assert!(pongs >= 8, "only {pongs} pongs");
    // Still connected and registered after the timeout.
    ping_pong(&mut beating).await;
    drop(silent);
    g.wait_sessions(1).await;
    let (up, _) = g.upstream(false).await;
    let r = up.push_user("bob", "still-here").await.unwrap();
    assert_eq!(r.sessions, 1);
    assert_eq!(
        &push_of(&next(&mut beating).await).payload[..],
        b"still-here"
    );
}

#[tokio::test]
async fn partial_frame_does_not_count_as_activity() {
    let g = start(fast_timeouts()).await;
    let mut c = g.client().await;
    c.login(&token("alice", "phone"), "phone").await.unwrap();
    let t0 = Instant::now();
    // Announce a 1000-byte frame and dribble its body one byte every 100 ms:
    // no complete frame ever arrives, so the idle timeout (1.5 s) applies.
    c.send_raw(&1000u32.to_be_bytes()).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            tokio::select! {
                f = c.recv() => return f,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if c.send_raw(&[0u8]).await.is_err() {
                        return c.recv().await;
                    }
                }
            }
        }
    })
    .await
    .expect("the dribbling session was never closed")
    .expect("read failed");
    let took = t0.elapsed();
    let f = closed.expect("closed without a Close frame");
    assert_eq!(close_of(&f), Code::HeartbeatTimeout);
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
}

#[tokio::test]
async fn heartbeat_timeout_is_reported_upstream() {
    let g = start(fast_timeouts()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut c, ok) = g.login("alice", "phone").await;
    assert_eq!(ok.heartbeat_interval_ms, 1000);
    assert_eq!(close_of(&next(&mut c).await), Code::HeartbeatTimeout);
    expect_eof(&mut c).await;
    drop(c);
    let closed = wait_event(&mut events, Duration::from_secs(3), |e| match e {
        pb::event::Kind::Closed(c) => Some(c.clone()),
        _ => None,
    })
    .await;
    assert_eq!(closed.code, Code::HeartbeatTimeout as i32);
    assert_eq!(closed.session.unwrap().session_id, ok.session_id);
    g.wait_sessions(0).await;
}
