//! session.write_delay: pushes that arrive within the delay share one write.

use std::time::{Duration, Instant};

mod common;
use common::*;

#[tokio::test]
async fn write_delay_coalesces_pushes_into_few_writes() {
    let mut cfg = test_config();
    cfg.session.write_delay = Duration::from_millis(500);
    let g = start(cfg).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let (up, _) = g.upstream(false).await;
    let before = g.gw.socket_writes();
    let t0 = Instant::now();
    for i in 0..20 {
        let r = up.push_user("alice", format!("m{i}")).await.unwrap();
        assert_eq!(r.sessions, 1);
    }
    let pushed = t0.elapsed();
    assert!(
        pushed < Duration::from_millis(400),
        "pushes took {pushed:?}; the test needs them inside one delay"
    );
    for i in 0..20 {
        let f = next(&mut c).await;
        let p = push_of(&f);
        assert_eq!((p.seq, &p.payload[..]), (i + 1, format!("m{i}").as_bytes()));
    }
    // At most two flushes can fall inside the burst: at most two writes.
    let writes = g.gw.socket_writes() - before;
    assert!(writes <= 2, "{writes} writes for 20 pushes");
}

#[tokio::test]
async fn without_write_delay_pushes_go_out_at_once() {
    let g = start(test_config()).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let (up, _) = g.upstream(false).await;
    let t0 = Instant::now();
    up.push_user("alice", "now").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(&push_of(&f).payload[..], b"now");
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "took {:?}",
        t0.elapsed()
    );
}
