//! Slow consumers: a client that never reads, with a tiny per-session queue,
//! under the `disconnect` and `drop` policies.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tether::client::Client;
use tether::config::SlowConsumerPolicy;
use tether::wire::pb::{self, push_request::Target, server_frame::Body as Resp, Code};
use tokio::sync::mpsc;

const PAYLOAD: usize = 32 * 1024;
const MAX_PUSHES: usize = 3000;

fn slow_config(policy: SlowConsumerPolicy) -> tether::config::Config {
    let mut cfg = test_config();
    cfg.delivery.queue_bytes = 4 * (PAYLOAD as u64 + tether::session::ITEM_OVERHEAD as u64);
    cfg.session.slow_consumer = policy;
    // A fixed, small send buffer on the gateway's client sockets, so a client
    // that does not read fills it quickly.
    cfg.listen.send_buffer = 64 * 1024;
    cfg
}

/// A client whose socket receive buffer is small (it will never read).
async fn stubborn_client(g: &TestGateway) -> Client {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    let stream = s.connect(g.tcp).await.unwrap();
    stream.set_nodelay(true).unwrap();
    Client::over(stream)
}

/// Reads and acknowledges pushes on `c` and reports each (seq, message id)
/// on `tx` (a client that never acks stalls once its window is full).
fn spawn_reader(mut c: Client) -> mpsc::UnboundedReceiver<(u64, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(f)) = c.recv_timeout(Duration::from_secs(10)).await {
            if let Some(Resp::Push(p)) = f.body {
                assert_eq!(p.payload.len(), PAYLOAD);
                if c.ack(p.seq).await.is_err() || tx.send((p.seq, p.message_id)).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn big_push(n: usize) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(Target::Users(pb::UserList {
            user_ids: vec!["slow".into(), "fast".into()],
        })),
        payload: vec![(n % 251) as u8; PAYLOAD].into(),
        message_id: format!("m-{n}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_is_disconnected_while_a_reader_gets_everything() {
    let g = start(slow_config(SlowConsumerPolicy::Disconnect)).await;
    let (up, mut events) = g.upstream(true).await;

    let mut slow = stubborn_client(&g).await;
    let slow_ok = slow.login(&token("slow", "phone"), "phone").await.unwrap();
    let (fast, _) = g.login("fast", "phone").await;
    let mut fast_rx = spawn_reader(fast);
    assert_eq!(g.gw.registry().len(), 2);

    let t0 = Instant::now();
    let mut queued_for_fast = 0u64;
    let mut tripped_at = None;
    for n in 0..MAX_PUSHES {
        // The slow connection is closed once its Close frame is flushed or the
        // 2 s close linger ends: after the first pushes, go slowly enough for
        // that to happen within the loop.
        if n > 200 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let r = up.push(big_push(n)).await.unwrap();
        assert_eq!(r.message_id, format!("m-{n}"));
        // The reader is always counted; the slow client until it trips.
        assert!(r.sessions >= 1, "push {n}: {r:?}");
        queued_for_fast += 1;
        // Pace the pushes on the reader, so only the slow client falls behind.
        let (seq, id) = tokio::time::timeout(Duration::from_secs(3), fast_rx.recv())
            .await
            .expect("the reading client stalled")
            .expect("the reading client was disconnected");
        assert_eq!(seq, n as u64 + 1, "reader gap at push {n}");
        assert_eq!(id, format!("m-{n}"));
        // Nothing is refused: the slow session keeps even the push that trips
        // it, for a resume. The trip shows as the session losing its
        // connection (detached).
        assert_eq!((r.sessions, r.dropped), (2, 0), "push {n}: {r:?}");
        if g.gw.detached_count() > 0 {
            tripped_at = Some(n);
            break;
        }
    }
    let tripped = tripped_at.expect("the slow client never filled its queue");
    eprintln!(
        "slow consumer tripped after {} pushes in {:?}",
        tripped + 1,
        t0.elapsed()
    );

    // More pushes still reach the reader. The slow session is disconnected
    // but keeps its replay state for a resume: it queues them (dropping its
    // oldest when full, which a resume reports as a gap), never refuses them.
    for n in tripped + 1..tripped + 4 {
        let r = up.push(big_push(n)).await.unwrap();
        assert_eq!(
            (r.sessions, r.dropped),
            (2, 0),
            "push {n} after the trip: {r:?}"
        );
        queued_for_fast += 1;
        let (seq, _) = tokio::time::timeout(Duration::from_secs(3), fast_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seq, n as u64 + 1);
    }

    // The gateway drops the slow connection (after at most the close linger)
    // and keeps the session detached for a resume.
    g.wait_sessions(1).await;
    assert_eq!(g.gw.detached_count(), 1);
    let closed = wait_event(&mut events, Duration::from_secs(3), |e| match e {
        pb::event::Kind::Closed(c)
            if c.session
                .as_ref()
                .is_some_and(|s| s.session_id == slow_ok.session_id) =>
        {
            Some(c.clone())
        }
        _ => None,
    })
    .await;
    assert_eq!(closed.code, Code::SlowConsumer as i32);

    // The slow client finds pushes (in order, no gaps) and then the end of the
    // stream; if the Close frame made it into the socket, it says SLOW_CONSUMER.
    let mut expect_seq = 1;
    let end = loop {
        let f = match slow.recv_timeout(Duration::from_secs(3)).await {
            Ok(Some(f)) => f,
            other => break other,
        };
        match f.body {
            Some(Resp::Push(p)) => {
                assert_eq!(p.seq, expect_seq);
                expect_seq += 1;
            }
            Some(Resp::Close(c)) => assert_eq!(c.code, Code::SlowConsumer as i32),
            other => panic!("unexpected frame for the slow client: {other:?}"),
        }
    };
    match end {
        Ok(None) => {}
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "the slow client's connection was not closed"
        ),
        Ok(Some(_)) => unreachable!(),
    }
    assert!(expect_seq > 1, "the slow client received nothing at all");

    // The reader got every push that was queued for it, and is still here.
    assert_eq!(queued_for_fast, tripped as u64 + 4);
    assert!(fast_rx.try_recv().is_err(), "extra pushes for the reader");
    let r = up.push_user("fast", vec![7u8; PAYLOAD]).await.unwrap();
    assert_eq!(r.sessions, 1);
    let (seq, id) = tokio::time::timeout(Duration::from_secs(3), fast_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((seq, id), (queued_for_fast + 1, r.message_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_policy_drops_pushes_but_keeps_the_session() {
    let g = start(slow_config(SlowConsumerPolicy::Drop)).await;
    let (up, mut events) = g.upstream(true).await;
    let mut slow = stubborn_client(&g).await;
    slow.login(&token("slow", "phone"), "phone").await.unwrap();
    let (fast, _) = g.login("fast", "phone").await;
    let mut fast_rx = spawn_reader(fast);

    let mut dropped_total = 0;
    let mut pushes = 0;
    for n in 0..MAX_PUSHES {
        let r = up.push(big_push(n)).await.unwrap();
        pushes += 1;
        let (seq, _) = tokio::time::timeout(Duration::from_secs(3), fast_rx.recv())
            .await
            .expect("the reading client stalled")
            .expect("the reading client was disconnected");
        assert_eq!(seq, n as u64 + 1);
        assert_eq!(r.sessions + r.dropped, 2, "push {n}: {r:?}");
        dropped_total += r.dropped;
        if dropped_total >= 3 {
            break;
        }
    }
    assert!(dropped_total > 0, "nothing dropped after {pushes} pushes");

    // The slow session is still registered and not closing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(g.gw.registry().len(), 2);
    let evs = drain_events(&mut events, Duration::from_millis(100)).await;
    assert!(
        !evs.iter().any(|e| matches!(e, pb::event::Kind::Closed(_))),
        "{evs:?}"
    );

    // Once it reads, it gets the queued pushes (in order) and then answers a ping.
    let rid = slow.ping().await.unwrap();
    let mut last_seq = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    loop {
        assert!(Instant::now() < deadline, "no pong for the slow client");
        let f = slow
            .recv_timeout(Duration::from_secs(3))
            .await
            .unwrap()
            .expect("the slow client was disconnected");
        match f.body {
            Some(Resp::Push(p)) => {
                assert_eq!(p.seq, last_seq + 1, "seq must not skip");
                last_seq = p.seq;
            }
            Some(Resp::Pong(_)) => {
                assert_eq!(f.request_id, rid);
                break;
            }
            other => panic!("unexpected frame: {other:?}"),
        }
    }
    // Every push that was not dropped for it was (or will be) delivered.
    assert!(last_seq > 0);
    assert!(last_seq <= pushes as u64 - dropped_total);
}
