//! Parking over real loopback TCP and TLS: a quiet connection gives up its
//! task and its reactor entry (`listen.park_after`), and everything that
//! concerns it still reaches it: its own frames (a heartbeat or an uplink,
//! answered in place; a split frame; a hang-up), pushes, kicks, a resume
//! elsewhere, the idle timeout and a drain. Each test runs over every
//! parkable transport, as `<name>::tcp`, `<name>::tls`, `<name>::ws` and
//! `<name>::wss`: a parked TLS connection keeps only its keys, a parked
//! WebSocket one nothing of its wire, and each must behave exactly as a
//! plain-TCP one.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::wire::{pb, Code};

fn parking() -> tether::config::Config {
    let mut cfg = test_config();
    cfg.listen.park_after = Duration::from_millis(150);
    cfg
}

/// A gateway on `cfg` whose test clients connect over `over`.
async fn start_over(mut cfg: tether::config::Config, over: Over) -> TestGateway {
    over.listen(&mut cfg);
    let mut g = start(cfg).await;
    g.clients_over = over;
    g
}

/// Runs test `$name(over: Over)` over plain TCP, TLS, WebSocket and
/// WebSocket over TLS.
macro_rules! over_every_transport {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::Over;
            #[tokio::test]
            async fn tcp() {
                super::$name(Over::Tcp).await
            }
            #[tokio::test]
            async fn tls() {
                super::$name(Over::Tls).await
            }
            #[tokio::test]
            async fn ws() {
                super::$name(Over::Ws).await
            }
            #[tokio::test]
            async fn wss() {
                super::$name(Over::Wss).await
            }
        }
    )*};
}

over_every_transport!(
    a_quiet_connection_parks_and_pushes_pings_and_uplinks_still_flow,
    heartbeats_and_uplinks_to_a_parked_connection_are_answered_in_place,
    a_parked_connection_times_out_on_schedule,
    a_parked_connection_whose_peer_hangs_up_keeps_its_session_for_a_resume,
    a_resume_elsewhere_replaces_a_parked_connection,
    a_drain_reaches_parked_connections,
    parking_off_keeps_every_connection_running,
    a_stale_timer_entry_does_not_unpark,
    a_stale_timer_entry_soon_after_an_answer_in_place_does_not_unpark,
);

/// Waits (5 s at most, looking every `every`) until `read()` gives `n`;
/// `what` names the count in the failure.
async fn wait_count<T: PartialEq + std::fmt::Display>(
    what: &str,
    n: T,
    every: Duration,
    read: impl Fn() -> T,
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while read() != n {
        assert!(
            Instant::now() < deadline,
            "expected {n} {what}, have {}",
            read()
        );
        tokio::time::sleep(every).await;
    }
}

/// Waits until `n` connections are parked.
async fn wait_parked(g: &TestGateway, n: usize) {
    wait_count("parked connections", n, Duration::from_millis(10), || {
        g.gw.parked_connections()
    })
    .await;
}

async fn a_quiet_connection_parks_and_pushes_pings_and_uplinks_still_flow(over: Over) {
    let g = start_over(parking(), over).await;
    let (up, mut events) = g.upstream(true).await;
    let (mut c, ok) = g.login("alice", "phone").await;
    wait_parked(&g, 1).await;
    assert_eq!(g.attached(), 1, "a parked connection keeps its session");

    // A push wakes the session: the connection unparks and writes it.
    let r = up.push_user("alice", &b"one"[..]).await.unwrap();
    assert_eq!(r.sessions, 1);
    let p = push_within(
        &mut c,
        Duration::from_secs(3),
        "the push to a parked connection",
    );
    let p = p.await;
    assert_eq!(&p.payload[..], b"one");
    assert_eq!(
        g.gw.parked_connections(),
        0,
        "unacknowledged, it must not park"
    );
    c.ack(p.seq).await.unwrap();
    wait_parked(&g, 1).await;

    // Its own frames reach it: a heartbeat, then an uplink (both answered
    // where it is parked).
    ping_pong(&mut c).await;
    wait_parked(&g, 1).await;
    let rid = c.send_up("cm-1", "chat", &b"up"[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid);
    loop {
        match next_event(&mut events, Duration::from_secs(3)).await {
            pb::event::Kind::Uplink(u) => {
                assert_eq!(&u.payload[..], b"up");
                assert_eq!(u.session.unwrap().session_id, ok.session_id);
                break;
            }
            _ => continue,
        }
    }
    wait_parked(&g, 1).await;

    // A second push after parking again, acked: nothing lost, in order.
    up.push_user("alice", &b"two"[..]).await.unwrap();
    let p2 = push_within(&mut c, Duration::from_secs(3), "the second push").await;
    assert_eq!((&p2.payload[..], p2.seq), (&b"two"[..], p.seq + 1));
    c.ack(p2.seq).await.unwrap();
    wait_parked(&g, 1).await;

    // A kick reaches it.
    assert_eq!(up.kick("alice", "phone", "bye").await.unwrap(), 1);
    assert_eq!(close_of(&next(&mut c).await), Code::Kicked);
    expect_eof(&mut c).await;
    g.wait_sessions(0).await;
    wait_parked(&g, 0).await;
}

/// Waits until `n` reads of parked connections were answered in place.
async fn wait_answers(g: &TestGateway, n: u64) {
    wait_count(
        "reads answered in place",
        n,
        Duration::from_millis(5),
        || g.gw.parked_answers(),
    )
    .await;
}

async fn heartbeats_and_uplinks_to_a_parked_connection_are_answered_in_place(over: Over) {
    let g = start_over(parking(), over).await;
    let (up, mut events) = g.upstream(true).await;
    let (mut c, _) = g.login("alice", "phone").await;
    wait_parked(&g, 1).await;
    let parks = g.gw.parks();

    // Three heartbeats: each answered without a task, and the connection
    // never leaves the parker (so it never parks again either).
    for n in 1..=3 {
        ping_pong(&mut c).await;
        wait_answers(&g, n).await;
    }
    assert_eq!(g.gw.parked_connections(), 1);
    assert_eq!(g.gw.parks(), parks, "it never unparked");

    // An uplink too: handed to the subscriber and acknowledged in place.
    let rid = c.send_up("cm-1", "chat", &b"up"[..]).await.unwrap();
    assert_eq!(next(&mut c).await.request_id, rid);
    loop {
        if let pb::event::Kind::Uplink(u) = next_event(&mut events, Duration::from_secs(3)).await {
            assert_eq!(&u.payload[..], b"up");
            break;
        }
    }
    wait_answers(&g, 4).await;
    assert_eq!(g.gw.parks(), parks, "it never unparked");

    // Half a heartbeat: that needs a task (the rest may take a while); the
    // other half completes it there, and the connection parks again.
    let ping = tether::wire::frame_bytes(&pb::ClientFrame {
        request_id: 77,
        body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 1 })),
    });
    // Over WebSocket a client sends a message's header only once it knows
    // the frame's length: the cut falls inside the body, so that the
    // gateway gets part of a message.
    let cut = if matches!(over, Over::Ws | Over::Wss) {
        6
    } else {
        3
    };
    let (head, tail) = ping.split_at(cut);
    c.send_raw(head).await.unwrap();
    wait_parked(&g, 0).await;
    c.send_raw(tail).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .expect("recv")
        .expect("a pong, not the end");
    assert_eq!(f.request_id, 77);
    assert!(
        matches!(f.body, Some(pb::server_frame::Body::Pong(_))),
        "{f:?}"
    );
    wait_parked(&g, 1).await;
    assert_eq!(g.gw.parks(), parks + 1);
    assert_eq!(g.gw.parked_answers(), 4, "the split heartbeat was not");

    // Pushes still unpark it and arrive, after all of that.
    up.push_user("alice", &b"after"[..]).await.unwrap();
    let p = push_within(
        &mut c,
        Duration::from_secs(3),
        "a push after the heartbeats",
    )
    .await;
    assert_eq!(&p.payload[..], b"after");
}

async fn a_parked_connection_times_out_on_schedule(over: Over) {
    let mut cfg = parking();
    cfg.session.heartbeat_interval = Duration::from_secs(1);
    cfg.session.idle_timeout = Duration::from_millis(1500);
    let g = start_over(cfg, over).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let t0 = Instant::now();
    wait_parked(&g, 1).await;
    assert_eq!(close_of(&next(&mut c).await), Code::HeartbeatTimeout);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3000),
        "the idle timeout of a parked connection fired after {took:?}, not about 1.5 s"
    );
    expect_eof(&mut c).await;
    wait_parked(&g, 0).await;
}

async fn a_parked_connection_whose_peer_hangs_up_keeps_its_session_for_a_resume(over: Over) {
    let g = start_over(parking(), over).await;
    let (up, _) = g.upstream(false).await;
    let (c, ok) = g.login("alice", "phone").await;
    wait_parked(&g, 1).await;
    drop(c);
    // The hang-up is a readable socket: it unparks, reads the end, and the
    // session waits for a resume.
    g.wait_sessions(0).await;
    wait_parked(&g, 0).await;
    up.push_user("alice", &b"held"[..]).await.unwrap();

    let mut c = g.client().await;
    c.login_with(resume_login("alice", "phone", &ok, 0, 0))
        .await
        .expect("resume");
    let p = push_within(&mut c, Duration::from_secs(3), "the held push").await;
    assert_eq!(&p.payload[..], b"held");
}

async fn a_resume_elsewhere_replaces_a_parked_connection(over: Over) {
    let g = start_over(parking(), over).await;
    let (mut old, ok) = g.login("alice", "phone").await;
    wait_parked(&g, 1).await;

    // The device comes back on a new connection while the old one still
    // looks alive: the old one is woken and told it was replaced.
    let mut new = g.client().await;
    new.login_with(resume_login("alice", "phone", &ok, 0, 0))
        .await
        .expect("resume");
    assert_eq!(close_of(&next(&mut old).await), Code::Replaced);
    expect_eof(&mut old).await;
    ping_pong(&mut new).await;
    wait_parked(&g, 1).await;
}

async fn a_drain_reaches_parked_connections(over: Over) {
    let g = start_over(parking(), over).await;
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(g.login(&format!("u{i}"), "phone").await.0);
    }
    wait_parked(&g, 20).await;
    g.stop.cancel();
    for c in &mut clients {
        assert_eq!(close_of(&next(c).await), Code::ServerDraining);
    }
    tokio::time::timeout(Duration::from_secs(10), g.done)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
    assert_eq!(g.gw.parked_connections(), 0);
}

async fn parking_off_keeps_every_connection_running(over: Over) {
    let mut cfg = test_config();
    cfg.listen.park_after = Duration::ZERO;
    let g = start_over(cfg, over).await;
    let (mut c, _) = g.login("alice", "phone").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(g.gw.parked_connections(), 0);
    ping_pong(&mut c).await;
}

/// A parked connection whose login deadline (700 ms after it connected,
/// at the returned instant) left a wheel entry that fires after the login.
async fn parked_before_a_stale_login_deadline(
    over: Over,
) -> (TestGateway, tether::client::Client, Instant) {
    let mut cfg = parking();
    cfg.session.login_timeout = Duration::from_millis(700);
    let g = start_over(cfg, over).await;
    let t0 = Instant::now();
    let mut c = g.client().await;
    // The connection's first poll, with nothing read yet, registers the
    // login deadline.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.login(&token("alice", "phone"), "phone").await.unwrap();
    wait_parked(&g, 1).await;
    (g, c, t0)
}

/// Asserts, every 20 ms, that the one connection stays parked until `t0 +
/// until` (past the stale login deadline's entry).
async fn stays_parked(g: &TestGateway, t0: Instant, until: Duration) {
    while t0.elapsed() < until {
        assert_eq!(
            g.gw.parked_connections(),
            1,
            "unparked at {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_stale_timer_entry_does_not_unpark(over: Over) {
    // The wheel's entries are lazy: the one registered for the login
    // deadline still fires after the login. A parked connection woken by it
    // finds nothing due and stays parked (were it unparked, it would stay
    // so until its next heartbeat).
    let (g, mut c, t0) = parked_before_a_stale_login_deadline(over).await;
    assert!(
        t0.elapsed() < Duration::from_millis(600),
        "parked only after the login deadline; the test proves nothing"
    );
    stays_parked(&g, t0, Duration::from_millis(1200)).await;
    ping_pong(&mut c).await;
    wait_parked(&g, 1).await;
}

async fn a_stale_timer_entry_soon_after_an_answer_in_place_does_not_unpark(over: Over) {
    // As above, with a heartbeat answered in place just before the stale
    // login-deadline entry fires: the connection heard from its peer less
    // than `park_after` ago, and is as idle as before.
    let (g, mut c, t0) = parked_before_a_stale_login_deadline(over).await;
    let parks = g.gw.parks();
    tokio::time::sleep(Duration::from_millis(640).saturating_sub(t0.elapsed())).await;
    ping_pong(&mut c).await;
    wait_answers(&g, 1).await;
    stays_parked(&g, t0, Duration::from_millis(1200)).await;
    assert_eq!(g.gw.parks(), parks, "it never left the parker");
}
