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
