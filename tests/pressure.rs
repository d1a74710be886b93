//! Delivery under pressure, over real loopback TCP: a connection replaced by
//! a resume on a dead path is released after its linger; readers that keep
//! up are not cut as slow consumers by a burst queued at once; a blip during a burst loses
//! nothing. (The driver's timing paths, such as the stall rule and the
//! retransmission deadline of a blocked write, have deterministic tests on
//! virtual time in src/transport/conn.rs.)

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use tether::ids::SessionId;
use tether::upstream::UpstreamClient;
use tether::wire::pb::{self, push_request::Target, server_frame::Body as Resp, Code};

fn push_to(target: Target, i: u64, size: usize) -> pb::PushRequest {
    let mut payload = i.to_be_bytes().to_vec();
    payload.resize(size.max(8), 0x5a);
    pb::PushRequest {
        target: Some(target),
        payload: Bytes::from(payload),
        message_id: format!("p-{i}"),
        ..Default::default()
    }
}

/// Pushes `n` indexed pushes of `size` bytes to `target`, `depth` requests
/// in flight on the one upstream connection; returns the replies. In order:
/// unconstrained, because tokio's cooperative budget can make a request
/// future yield before it queues its frame and a later one overtake it.
async fn push_all(
    up: &UpstreamClient,
    target: &Target,
    n: u64,
    size: usize,
    depth: usize,
) -> Vec<pb::PushReply> {
    tokio::task::unconstrained(
        futures_util::stream::iter(0..n)
            .map(|i| {
                let req = push_to(target.clone(), i, size);
                async move { up.push(req).await.expect("push") }
            })
            .buffered(depth)
            .collect(),
    )
    .await
}

fn index_of(p: &pb::Push) -> u64 {
    u64::from_be_bytes(p.payload[..8].try_into().expect("8-byte index"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_replaced_on_a_dead_path_is_released_after_its_linger() {
    let g = start(test_config()).await;
    // Connection A stays open and silent: a phone that left Wi-Fi.
    let (_a, ok) = g.login("mover", "phone").await;
    let mut b = g.client().await;
    let okb = b
        .login_with(resume_login("mover", "phone", &ok, 0, 0))
        .await
        .expect("resume");
    assert_eq!(okb.session_id, ok.session_id);
    // A is told to close; its peer never answers. Its 2 s linger must end
    // it: the connection slot and descriptor come back.
    let released = wait_for(Duration::from_secs(10), || g.gw.limits().connections() == 1).await;
    assert!(
        released,
        "the replaced connection is still open 10 s later ({} connections)",
        g.gw.limits().connections()
    );
    ping_pong(&mut b).await;
    assert_eq!(g.gw.registry().len(), 1);
}

const READERS: usize = 50;
const BURST: u64 = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_keep_up_are_not_cut_by_an_unpaced_burst() {
    let g = start(test_config()).await;
    let (up, _) = g.upstream(false).await;
    let mut users = Vec::new();
    let mut readers = Vec::new();
    // The readers' apps are busy while the burst goes out (a phone's radio
    // waking up, a GC pause): they read only once it was all pushed, so the
    // whole burst is queued at once, as when an upstream outruns every
    // reader. Then they read and ack as fast as they can.
    let (go, _) = tokio::sync::broadcast::channel::<()>(1);
    for i in 0..READERS {
        let user = format!("reader-{i}");
        let (mut c, _) = g.login(&user, "phone").await;
        users.push(user);
        let mut go = go.subscribe();
        readers.push(tokio::spawn(async move {
            let _ = go.recv().await;
            for seq in 1..=BURST {
                let f = match c.recv_timeout(Duration::from_secs(20)).await {
                    Ok(Some(f)) => f,
                    other => return Err(format!("reader {i} at seq {seq}: {other:?}")),
                };
                match f.body {
                    Some(Resp::Push(p)) if p.seq == seq => {}
                    other => return Err(format!("reader {i} expected seq {seq}, got {other:?}")),
                }
                if seq % 16 == 0 && c.ack(seq).await.is_err() {
                    return Err(format!("reader {i}: ack failed at {seq}"));
                }
            }
            Ok(c)
        }));
    }
    let target = Target::Users(pb::UserList { user_ids: users });
    // Unpaced: the upstream pipelines the whole burst.
    for r in push_all(&up, &target, BURST, 64, 64).await {
        assert_eq!(r.dropped, 0, "{r:?}");
    }
    let _ = go.send(());
    let mut kept = Vec::new();
    for r in readers {
        kept.push(
            r.await
                .expect("reader task")
                .expect("a reader that keeps up"),
        );
    }
    assert_eq!(g.gw.registry().len(), READERS);
    assert_eq!(
        g.gw.detached_count(),
        0,
        "nobody was cut as a slow consumer"
    );
    for c in &mut kept {
        ping_pong(c).await;
    }
}

const BLIP: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blip_during_a_burst_loses_nothing() {
    let g = start(test_config()).await;
    let (up, _) = g.upstream(false).await;
    let (c, ok) = g.login("blip", "phone").await;
    drop(c);
    let detached = wait_for(Duration::from_secs(5), || g.gw.detached_count() == 1).await;
    assert!(detached, "the session waits for a resume");
    let target = Target::Device(pb::DeviceTarget {
        user_id: "blip".into(),
        device_id: "phone".into(),
    });
    for r in push_all(&up, &target, BLIP, 32, 32).await {
        assert_eq!((r.sessions, r.dropped), (1, 0), "{r:?}");
    }
    let h = g.gw.registry().session(SessionId(ok.session_id)).unwrap();
    assert_eq!(
        h.queued(),
        BLIP as usize,
        "the detached session holds the burst"
    );

    let mut c = g.client().await;
    let ok2 = c
        .login_with(resume_login("blip", "phone", &ok, 0, 0))
        .await
        .expect("resume");
    let r = ok2.resume.expect("a resume result");
    assert_eq!(r.code, Code::Ok as i32, "no gap: {r:?}");
    assert_eq!((r.first_seq, r.replayed), (1, BLIP), "{r:?}");
    for seq in 1..=BLIP {
        let f = next(&mut c).await;
        let p = push_of(&f);
        assert_eq!((p.seq, index_of(p)), (seq, seq - 1));
        if seq % 64 == 0 {
            c.ack(seq).await.unwrap();
        }
    }
    c.ack(BLIP).await.unwrap();
    expect_silence(&mut c, Duration::from_millis(300)).await;
}

/// Polls `cond` every 20 ms until it holds or `d` passes.
async fn wait_for(d: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}
