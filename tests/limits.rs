//! Connection and login limits.

mod common;

use std::time::Duration;

use common::*;
use tether::wire::pb::Code;

#[tokio::test]
async fn per_ip_connection_cap_refuses_the_third_connection() {
    let mut cfg = test_config();
    cfg.limits.max_connections_per_ip = 2;
    let g = start(cfg).await;
    let (mut a, _) = g.login("alice", "phone").await;
    let mut b = g.client().await; // counted even before it logs in
    ping_pong(&mut a).await;

    let mut c = g.client().await;
    let f = next(&mut c).await;
    assert_eq!(close_of(&f), Code::TooManyConnections);
    expect_eof(&mut c).await;
    assert_eq!(g.gw.limits().connections(), 2);

    // The two admitted connections are unaffected.
    ping_pong(&mut a).await;
    let ok = b.login(&token("bob", "phone"), "phone").await.unwrap();
    assert_eq!(ok.user_id, "bob");

    // Closing one frees a slot.
    drop(b);
    for _ in 0..200 {
        if g.gw.limits().connections() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(g.gw.limits().connections(), 1);
    let (_d, ok) = g.login("dave", "phone").await;
    assert_eq!(ok.user_id, "dave");
}

#[tokio::test]
async fn global_connection_cap_refuses_extra_connections() {
    let mut cfg = test_config();
    cfg.limits.max_connections = 1;
    let g = start(cfg).await;
    let (_a, _) = g.login("alice", "phone").await;
    let mut c = g.client().await;
    assert_eq!(close_of(&next(&mut c).await), Code::TooManyConnections);
    expect_eof(&mut c).await;
}

#[tokio::test]
async fn login_rate_limit_refuses_the_second_quick_login() {
    let mut cfg = test_config();
    cfg.limits.login_rate = 1;
    cfg.limits.login_burst = 1;
    let g = start(cfg).await;
    let (mut a, _) = g.login("alice", "phone").await;

    let mut c = g.client().await;
    let rid = c
        .request(login_req(&token("bob", "phone"), "phone"))
        .await
        .unwrap();
    expect_refused(&mut c, rid, Code::RateLimited).await;
    assert_eq!(g.gw.registry().len(), 1);
    ping_pong(&mut a).await;

    // The bucket refills at one login per second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_b, ok) = g.login("bob", "phone").await;
    assert_eq!(ok.user_id, "bob");
}

#[tokio::test]
async fn pending_login_cap_refuses_connections_beyond_it() {
    let mut cfg = test_config();
    cfg.limits.max_pending_logins = 2;
    let g = start(cfg).await;
    let mut a = g.client().await;
    let mut b = g.client().await;
    wait_until(|| g.gw.limits().pending_logins() == 2).await;

    // A third connection that has not logged in is one too many.
    let mut c = g.client().await;
    assert_eq!(close_of(&next(&mut c).await), Code::TooManyConnections);
    expect_eof(&mut c).await;

    // A login frees its slot: the next connection is admitted.
    let ok = a.login(&token("alice", "phone"), "phone").await.unwrap();
    assert_eq!(ok.user_id, "alice");
    assert_eq!(g.gw.limits().pending_logins(), 1);
    let (_d, ok) = g.login("dave", "phone").await;
    assert_eq!(ok.user_id, "dave");
    let ok = b.login(&token("bob", "phone"), "phone").await.unwrap();
    assert_eq!(ok.user_id, "bob");
    assert_eq!(g.gw.limits().pending_logins(), 0);
}

/// Polls `cond` every 10 ms, for up to 5 s.
async fn wait_until(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in time");
}

#[tokio::test]
async fn device_cap_refuses_one_device_too_many() {
    let mut cfg = test_config();
    cfg.limits.max_devices_per_user = 2;
    let g = start(cfg).await;
    let (mut phone, _) = g.login("alice", "phone").await;
    let (_tablet, _) = g.login("alice", "tablet").await;

    let mut c = g.client().await;
    let rid = c
        .request(login_req(&token("alice", "laptop"), "laptop"))
        .await
        .unwrap();
    expect_refused(&mut c, rid, Code::TooManyDevices).await;
    assert_eq!(g.gw.registry().len(), 2);
    ping_pong(&mut phone).await;

    // A device already logged in logs in again (replacing its session), and
    // other users are not affected.
    let (_phone2, ok) = g.login("alice", "phone").await;
    assert_eq!(ok.user_id, "alice");
    assert_eq!(expect_closed(&mut phone).await, Code::Replaced);
    let (_b, ok) = g.login("bob", "laptop").await;
    assert_eq!(ok.user_id, "bob");
}

#[tokio::test]
async fn refused_connections_are_closed_at_once() {
    let mut cfg = test_config();
    cfg.limits.max_connections = 1;
    let g = start(cfg).await;
    let (mut a, _) = g.login("alice", "phone").await;
    let port = g.tcp.port();
    assert_eq!(
        gateway_sockets(port),
        Some(1).filter(|_| cfg!(target_os = "linux"))
    );
    let mut refused = Vec::new();
    for _ in 0..20 {
        let mut c = g.client().await;
        assert_eq!(close_of(&next(&mut c).await), Code::TooManyConnections);
        expect_eof(&mut c).await;
        // Once the client saw the close, the gateway holds no descriptor
        // of the refused connection: only alice's socket is left.
        assert_eq!(
            gateway_sockets(port),
            Some(1).filter(|_| cfg!(target_os = "linux"))
        );
        refused.push(c);
    }
    assert_eq!(g.gw.limits().connections(), 1);
    drop(refused);
    ping_pong(&mut a).await;
}

/// TCP sockets of this process on the gateway's side of `port` that still
/// have a descriptor (Linux; `None` elsewhere): accepted connections, not the
/// listener and not the closed ones the kernel still finishes (their inode
/// is 0 once the descriptor is gone).
fn gateway_sockets(port: u16) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    let n = table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && f.get(3) != Some(&"0A") && f.get(9) != Some(&"0")
        })
        .count();
    Some(n)
}
