//! Reliable delivery over real loopback TCP: resume after a dropped connection
//! (everything exactly once, in order), resume gaps, rejected and expired
//! resumes, takeover of a half-dead connection, uplink retry dedup,
//! retransmission and delivery reports, the flow-control window, a slow
//! consumer beside many fast ones, and the two lanes.

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use tether::client::Client;
use tether::ids::SessionId;
use tether::upstream::UpstreamClient;
use tether::wire::pb::{
    self, client_frame::Body as Req, push_request::Target, server_frame::Body as Resp, Code, Lane,
};

/// Tests that measure latency or push a lot take turns, so they do not
/// starve each other of the (few) CPUs.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A push to one device whose payload starts with `idx` and the send time
/// (microseconds since `base`), padded to `size` bytes.
fn indexed_push(
    user: &str,
    device: &str,
    idx: u64,
    base: Instant,
    size: usize,
    lane: Lane,
) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: user.into(),
            device_id: device.into(),
        })),
        payload: payload(idx, base, size),
        source: "test".into(),
        message_id: format!("{user}-{idx}"),
        lane: lane as i32,
        ..Default::default()
    }
}

fn payload(idx: u64, base: Instant, size: usize) -> Bytes {
    let mut v = Vec::with_capacity(size.max(16));
    v.extend_from_slice(&idx.to_be_bytes());
    v.extend_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
    v.resize(size.max(16), (idx % 251) as u8);
    v.into()
}

/// The index carried by a push's payload.
fn idx_of(p: &pb::Push) -> u64 {
    u64::from_be_bytes(p.payload[..8].try_into().unwrap())
}

/// How long ago (relative to `base`) the push was sent.
fn latency_of(p: &pb::Push, base: Instant) -> Duration {
    let sent = u64::from_be_bytes(p.payload[8..16].try_into().unwrap());
    base.elapsed().saturating_sub(Duration::from_micros(sent))
}

/// A Login that asks to resume `session_id`.
fn resume_login(
    token: String,
    device: &str,
    session_id: u64,
    resume_token: Bytes,
    last_seq: u64,
    last_bulk_seq: u64,
) -> pb::Login {
    pb::Login {
        token,
        device_id: device.into(),
        platform: pb::Platform::Desktop as i32,
        protocol_version: 1,
        resume: Some(pb::Resume {
            session_id,
            resume_token,
            last_seq,
            last_bulk_seq,
        }),
    }
}

/// Connects and logs in with a resume request for `user`/`device`.
async fn resume(
    g: &TestGateway,
    user: &str,
    device: &str,
    session_id: u64,
    resume_token: Bytes,
    last_seq: u64,
) -> (Client, pb::LoginOk) {
    let mut c = g.client().await;
    let ok = c
        .login_with(resume_login(
            token(user, device),
            device,
            session_id,
            resume_token,
            last_seq,
            0,
        ))
        .await
        .expect("login with resume");
    (c, ok)
}

fn resume_result(ok: &pb::LoginOk) -> (Code, pb::ResumeResult) {
    let r = ok
        .resume
        .unwrap_or_else(|| panic!("LoginOk without a resume result: {ok:?}"));
    (Code::try_from(r.code).expect("a known code"), r)
}

/// The next push on `c` within 5 s, skipping Pongs; any other frame fails.
async fn recv_push(c: &mut Client) -> pb::Push {
    let f = next(c).await;
    match f.body {
        Some(Resp::Push(p)) => p,
        other => panic!("expected a push, got {other:?}"),
    }
}

/// Reads what is left on `c` (pushes in order, perhaps a Close) until the
/// gateway's close shows (EOF or reset); returns the Close code if one came.
async fn read_until_closed(c: &mut Client) -> Option<Code> {
    let mut code = None;
    let mut last_seq = 0;
    loop {
        match c.recv_timeout(Duration::from_secs(3)).await {
            Ok(Some(f)) => match f.body {
                Some(Resp::Push(p)) => {
                    assert!(p.seq > last_seq, "seq {} after {last_seq}", p.seq);
                    last_seq = p.seq;
                }
                Some(Resp::Close(cl)) => code = Some(Code::try_from(cl.code).unwrap()),
                other => panic!("unexpected frame {other:?}"),
            },
            Ok(None) => return code,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the connection was not closed")
            }
            Err(_) => return code,
        }
    }
}

/// Polls `cond` every 10 ms until it holds; panics after `d`.
async fn wait_until(what: &str, d: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + d;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pushes the indices of `range` in order, pipelined `depth` deep on one
/// upstream connection (which the gateway serves in order, so the seqs follow
/// the indices). Counts each reply in `pushed`.
///
/// Runs unconstrained by tokio's cooperative budget: a push whose channel
/// send is refused for budget would be polled again after later ones (the
/// stream's queue rotates), and the gateway would see them out of order.
#[allow(clippy::too_many_arguments)]
async fn push_range(
    up: &UpstreamClient,
    user: &str,
    device: &str,
    range: Range<u64>,
    base: Instant,
    size: usize,
    lane: Lane,
    depth: usize,
    pushed: &AtomicU64,
) {
    tokio::task::unconstrained(async {
        let mut replies = futures_util::stream::iter(range)
            .map(|i| {
                let req = indexed_push(user, device, i, base, size, lane);
                async move { (i, up.push(req).await) }
            })
            .buffered(depth);
        while let Some((i, r)) = replies.next().await {
            let r = r.unwrap_or_else(|e| panic!("push {i}: {e}"));
            assert_eq!((r.sessions, r.dropped), (1, 0), "push {i}: {r:?}");
            pushed.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
}

/// Sends an uplink and returns its SendAck.
async fn send_up(c: &mut Client, id: &str, payload: &'static [u8]) -> pb::SendAck {
    let rid = c.send_up(id, "chat.send", payload).await.unwrap();
    let f = next(c).await;
    assert_eq!(f.request_id, rid, "{f:?}");
    match f.body {
        Some(Resp::SendAck(a)) => a,
        other => panic!("expected a SendAck, got {other:?}"),
    }
}

fn closed_event(e: &pb::event::Kind, session_id: u64) -> Option<pb::SessionClosed> {
    match e {
        pb::event::Kind::Closed(c)
            if c.session
                .as_ref()
                .is_some_and(|s| s.session_id == session_id) =>
        {
            Some(c.clone())
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// 1. Kill mid-stream and resume
// ---------------------------------------------------------------------------

const STREAM: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_mid_stream_and_resume_delivers_every_push_once_in_order() {
    let _heavy = HEAVY.lock().await;
    let mut cfg = test_config();
    // Nothing may be dropped while the session waits detached.
    cfg.delivery.queue_bytes = 64 << 20;
    cfg.delivery.detached_bytes = 64 << 20;
    let g = start(cfg).await;
    let (up, _) = g.upstream(false).await;
    let (mut c, ok) = g.login("kim", "phone").await;
    let (sid, rtok) = (ok.session_id, ok.resume_token.clone());
    assert!(!rtok.is_empty(), "LoginOk must carry a resume token");
    let base = Instant::now();

    // The pusher sends the first half freely, then waits until the client's
    // connection is gone, and pushes the second half while it is detached
    // and while it resumes.
    let pushed = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let pusher = tokio::spawn({
        let (up, pushed) = (up.clone(), pushed.clone());
        async move {
            let half = STREAM / 2;
            push_range(
                &up,
                "kim",
                "phone",
                0..half,
                base,
                64,
                Lane::Interactive,
                32,
                &pushed,
            )
            .await;
            go_rx.await.expect("go signal");
            push_range(
                &up,
                "kim",
                "phone",
                half..STREAM,
                base,
                64,
                Lane::Interactive,
                32,
                &pushed,
            )
            .await;
        }
    });

    let mut last = 0u64;
    let mut dups = 0u64;
    let mut on_push = |p: &pb::Push, last: &mut u64| -> bool {
        if p.seq <= *last {
            dups += 1;
            return false;
        }
        assert_eq!(p.seq, *last + 1, "gap or reorder after seq {last}");
        assert_eq!(idx_of(p), p.seq - 1, "seq {} carries the wrong push", p.seq);
        assert_eq!(p.message_id, format!("kim-{}", p.seq - 1));
        assert_eq!(p.lane, Lane::Interactive as i32);
        *last = p.seq;
        true
    };

    // First connection: read and ack (every 50) until ~3,000 are seen.
    // (Not a multiple of 50: some pushes it saw are not acknowledged.)
    while last < 3_017 {
        let p = recv_push(&mut c).await;
        if on_push(&p, &mut last) && last.is_multiple_of(50) {
            c.ack(last).await.unwrap();
        }
    }
    // Abrupt drop: no Close frame, the socket just goes away.
    drop(c);
    let dropped_at = last;
    wait_until("the session to detach", Duration::from_secs(3), || {
        g.gw.detached_count() == 1
    })
    .await;
    assert_eq!(
        g.gw.registry().len(),
        1,
        "the detached session stays registered"
    );
    go_tx.send(()).unwrap();
    // Let some pushes land while nobody is attached.
    let at_go = pushed.load(Ordering::Relaxed);
    wait_until("pushes while detached", Duration::from_secs(5), || {
        pushed.load(Ordering::Relaxed) >= (at_go + 500).min(STREAM)
    })
    .await;

    // Second connection: resume from the highest seq seen.
    let pushed_before = pushed.load(Ordering::Relaxed);
    let (mut c, ok2) = resume(&g, "kim", "phone", sid, rtok.clone(), last).await;
    let (code, r) = resume_result(&ok2);
    assert_eq!(code, Code::Ok, "{r:?}");
    assert_eq!(ok2.session_id, sid, "a resume keeps the session id");
    assert_eq!(r.first_seq, last + 1, "{r:?}");
    assert!(
        r.replayed >= pushed_before - last,
        "replayed {} but at least {} were pushed after seq {last}: {r:?}",
        r.replayed,
        pushed_before - last
    );
    assert_eq!(g.gw.detached_count(), 0);
    eprintln!(
        "dropped after seq {dropped_at}; resumed with {} pushed, {} replayed",
        pushed_before, r.replayed
    );

    while last < STREAM {
        let p = recv_push(&mut c).await;
        if on_push(&p, &mut last) && (last.is_multiple_of(50) || last == STREAM) {
            c.ack(last).await.unwrap();
        }
    }
    tokio::time::timeout(Duration::from_secs(10), pusher)
        .await
        .expect("pusher stalled")
        .expect("pusher failed");
    assert_eq!(pushed.load(Ordering::Relaxed), STREAM);
    expect_silence(&mut c, QUIET).await;
    eprintln!(
        "{STREAM} pushes over two connections in {:?}; {dups} duplicates skipped",
        base.elapsed()
    );
    // Everything is acknowledged: the session holds no replay memory.
    wait_until(
        "the replay memory to be released",
        Duration::from_secs(3),
        || g.gw.budget().used() == 0,
    )
    .await;
}

// ---------------------------------------------------------------------------
// 2. The gap case
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_overflow_reports_the_gap_and_replays_what_is_held() {
    // Pushes of 32 B are charged 32 B + their ids + 96 B each: this holds
    // between 10 and 16 of them.
    const HELD: u64 = 2048;
    let mut cfg = test_config();
    cfg.delivery.detached_bytes = HELD;
    let g = start(cfg).await;
    let (up, _) = g.upstream(false).await;
    let (mut c, ok) = g.login("gap", "phone").await;
    let base = Instant::now();

    for i in 0..2 {
        up.push(indexed_push("gap", "phone", i, base, 32, Lane::Interactive))
            .await
            .unwrap();
    }
    for seq in 1..=2 {
        assert_eq!(recv_push(&mut c).await.seq, seq);
    }
    c.ack(2).await.unwrap();
    ping_pong(&mut c).await; // the ack is processed
    drop(c);
    wait_until("the session to detach", Duration::from_secs(3), || {
        g.gw.detached_count() == 1
    })
    .await;

    // 50 pushes while detached: seqs 3..=52, of which the newest within the detached bound are held.
    for i in 2..52 {
        let r = up
            .push(indexed_push("gap", "phone", i, base, 32, Lane::Interactive))
            .await
            .unwrap();
        assert_eq!(
            (r.sessions, r.dropped),
            (1, 0),
            "a detached session queues (dropping its oldest): {r:?}"
        );
    }
    let (mut c, ok2) = resume(&g, "gap", "phone", ok.session_id, ok.resume_token, 2).await;
    let (code, r) = resume_result(&ok2);
    assert_eq!(code, Code::ResumeGap, "{r:?}");
    assert_eq!(ok2.session_id, ok.session_id);
    assert!(r.first_seq > 2 + 1, "{r:?}");
    assert_eq!(r.first_seq, 52 - r.replayed + 1, "{r:?}");
    assert!(
        (HELD / 192..=HELD / 128).contains(&r.replayed),
        "the detached bound holds {} pushes: {r:?}",
        r.replayed
    );
    assert_eq!(
        r.first_bulk_seq, 1,
        "nothing was pushed in the bulk lane: {r:?}"
    );

    for seq in r.first_seq..=52 {
        let p = recv_push(&mut c).await;
        assert_eq!(p.seq, seq);
        assert_eq!(idx_of(&p), seq - 1);
    }
    expect_silence(&mut c, QUIET).await;
    // New pushes continue the sequence.
    up.push(indexed_push(
        "gap",
        "phone",
        52,
        base,
        32,
        Lane::Interactive,
    ))
    .await
    .unwrap();
    let p = push_within(
        &mut c,
        Duration::from_secs(2),
        "a push made after the resume",
    )
    .await;
    assert_eq!(p.seq, 53);
}

// ---------------------------------------------------------------------------
// 3. Rejected and expired resumes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_a_wrong_token_is_rejected_and_starts_a_new_session() {
    let g = start(test_config()).await;
    let (up, _) = g.upstream(false).await;
    let (mut a, ok) = g.login("rj", "phone").await;
    let base = Instant::now();
    for i in 0..3 {
        up.push(indexed_push("rj", "phone", i, base, 32, Lane::Interactive))
            .await
            .unwrap();
    }
    for seq in 1..=3 {
        assert_eq!(recv_push(&mut a).await.seq, seq);
    }
    drop(a);
    wait_until("the session to detach", Duration::from_secs(3), || {
        g.gw.detached_count() == 1
    })
    .await;

    // The real token with one bit flipped.
    let mut bad = ok.resume_token.to_vec();
    *bad.last_mut().unwrap() ^= 1;
    let (mut b, okb) = resume(&g, "rj", "phone", ok.session_id, bad.into(), 3).await;
    let (code, r) = resume_result(&okb);
    assert_eq!(code, Code::ResumeRejected, "{r:?}");
    assert_eq!(r.replayed, 0, "{r:?}");
    assert_ne!(
        okb.session_id, ok.session_id,
        "a rejected resume is a new session"
    );
    assert!(!okb.resume_token.is_empty());
    assert_ne!(okb.resume_token, ok.resume_token);
    assert_eq!(okb.next_uplink_seq, 1);
    // Seqs restart at 1 on the new session.
    up.push(indexed_push(
        "rj",
        "phone",
        100,
        base,
        32,
        Lane::Interactive,
    ))
    .await
    .unwrap();
    let p = recv_push(&mut b).await;
    assert_eq!((p.seq, idx_of(&p)), (1, 100));
    // The old session of this device was replaced by the new login.
    assert_eq!(g.gw.detached_count(), 0);
    assert_eq!(g.gw.registry().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_of_another_users_or_devices_session_is_rejected() {
    let g = start(test_config()).await;
    let (up, _) = g.upstream(false).await;
    let (mut alice, oka) = g.login("alice", "phone").await;
    let base = Instant::now();

    // Bob presents alice's session id and her valid resume token.
    let mut bob = g.client().await;
    let okb = bob
        .login_with(resume_login(
            token("bob", "phone"),
            "phone",
            oka.session_id,
            oka.resume_token.clone(),
            0,
            0,
        ))
        .await
        .expect("bob's login");
    let (code, r) = resume_result(&okb);
    assert_eq!(code, Code::ResumeRejected, "{r:?}");
    assert_ne!(okb.session_id, oka.session_id);
    assert_eq!(okb.user_id, "bob");

    // Alice's other device presents her phone's session and token.
    let (mut tablet, okt) = resume(
        &g,
        "alice",
        "tablet",
        oka.session_id,
        oka.resume_token.clone(),
        0,
    )
    .await;
    let (code, r) = resume_result(&okt);
    assert_eq!(code, Code::ResumeRejected, "{r:?}");
    assert_ne!(okt.session_id, oka.session_id);

    // Alice's session is untouched; each new session starts at seq 1.
    assert_eq!(g.gw.registry().len(), 3);
    for (c, user, device) in [
        (&mut alice, "alice", "phone"),
        (&mut bob, "bob", "phone"),
        (&mut tablet, "alice", "tablet"),
    ] {
        up.push(indexed_push(user, device, 7, base, 32, Lane::Interactive))
            .await
            .unwrap();
        let p = recv_push(c).await;
        assert_eq!((p.seq, idx_of(&p)), (1, 7), "{user}/{device}");
    }
    ping_pong(&mut alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_window_is_expired_and_the_upstream_is_told() {
    let mut cfg = test_config();
    cfg.delivery.resume_window = Duration::from_secs(1);
    let g = start(cfg).await;
    let (up, mut events) = g.upstream(true).await;
    let (mut c, ok) = g.login("exp", "phone").await;
    let base = Instant::now();
    up.push(indexed_push("exp", "phone", 0, base, 32, Lane::Interactive))
        .await
        .unwrap();
    assert_eq!(recv_push(&mut c).await.seq, 1);
    drop(c);
    let dropped = Instant::now();

    let first = wait_event(&mut events, Duration::from_secs(3), |e| {
        closed_event(e, ok.session_id)
    })
    .await;
    assert_eq!(first.code, Code::ConnectionLost as i32, "{first:?}");
    assert_eq!(g.gw.detached_count(), 1);
    let expired = wait_event(&mut events, Duration::from_secs(4), |e| {
        closed_event(e, ok.session_id)
    })
    .await;
    let after = dropped.elapsed();
    assert_eq!(expired.code, Code::ResumeExpired as i32, "{expired:?}");
    assert!(
        after >= Duration::from_millis(900),
        "expired after {after:?}, before the 1 s resume window"
    );
    eprintln!("detached session expired {after:?} after the drop");
    assert_eq!(g.gw.detached_count(), 0);
    assert_eq!(g.gw.registry().len(), 0);

    let (mut c, ok2) = resume(&g, "exp", "phone", ok.session_id, ok.resume_token, 1).await;
    let (code, r) = resume_result(&ok2);
    assert_eq!(code, Code::ResumeExpired, "{r:?}");
    assert_ne!(ok2.session_id, ok.session_id);
    up.push(indexed_push("exp", "phone", 1, base, 32, Lane::Interactive))
        .await
        .unwrap();
    assert_eq!(
        recv_push(&mut c).await.seq,
        1,
        "a new session starts at seq 1"
    );
}

// ---------------------------------------------------------------------------
// 4. Resume while the old connection is still open
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_takes_over_a_half_dead_connection() {
    let g = start(test_config()).await;
    let (up, mut events) = g.upstream(true).await;
    let (mut a, ok) = g.login("hd", "phone").await;
    let base = Instant::now();
    up.push(indexed_push("hd", "phone", 0, base, 32, Lane::Interactive))
        .await
        .unwrap();
    let p1 = recv_push(&mut a).await;
    assert_eq!(p1.seq, 1);
    // A never acks; B claims to have seen nothing, so seq 1 is replayed.
    let (mut b, okb) = resume(&g, "hd", "phone", ok.session_id, ok.resume_token.clone(), 0).await;
    let (code, r) = resume_result(&okb);
    assert_eq!(code, Code::Ok, "{r:?}");
    assert_eq!(okb.session_id, ok.session_id);
    assert_eq!((r.first_seq, r.replayed), (1, 1), "{r:?}");
    let p = recv_push(&mut b).await;
    assert_eq!((p.seq, &p.message_id), (1, &p1.message_id));

    // A is told it was replaced, gets nothing more, and is closed.
    let mut a_close = None;
    loop {
        match a.recv_timeout(Duration::from_secs(3)).await {
            Ok(Some(f)) => match f.body {
                Some(Resp::Close(c)) => a_close = Some(Code::try_from(c.code).unwrap()),
                Some(Resp::Pong(_)) => {}
                other => panic!("the replaced connection got {other:?}"),
            },
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                panic!("the replaced connection was not closed")
            }
            Err(_) => break,
        }
    }
    assert_eq!(a_close, Some(Code::Replaced));

    up.push(indexed_push("hd", "phone", 1, base, 32, Lane::Interactive))
        .await
        .unwrap();
    let p = push_within(
        &mut b,
        Duration::from_secs(2),
        "a push made after the resume",
    )
    .await;
    assert_eq!((p.seq, idx_of(&p)), (2, 1));
    g.wait_sessions(1).await;
    assert_eq!(g.gw.registry().len(), 1);
    assert_eq!(g.gw.detached_count(), 0);
    // The takeover does not end the session for the upstream.
    let evs = drain_events(&mut events, QUIET).await;
    assert!(
        !evs.iter().any(|e| closed_event(e, ok.session_id).is_some()),
        "{evs:?}"
    );
    ping_pong(&mut b).await;
}

// ---------------------------------------------------------------------------
// 5. Uplink retry dedup
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_retries_are_deduplicated_across_resume() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut c, ok) = g.login("dd", "phone").await;
    assert_eq!(ok.next_uplink_seq, 1);

    let a1 = send_up(&mut c, "m1", b"one").await;
    assert_eq!(a1.code, Code::Ok as i32, "{a1:?}");
    assert_eq!((a1.seq, a1.duplicate), (1, false), "{a1:?}");
    assert_ne!(a1.server_msg_id, 0);
    let again = send_up(&mut c, "m1", b"one").await;
    assert_eq!(again.code, Code::Ok as i32, "{again:?}");
    assert!(again.duplicate, "{again:?}");
    assert_eq!((again.server_msg_id, again.seq), (a1.server_msg_id, 1));
    let a2 = send_up(&mut c, "m2", b"two").await;
    let a3 = send_up(&mut c, "m3", b"three").await;
    assert_eq!((a2.seq, a2.duplicate), (2, false), "{a2:?}");
    assert_eq!((a3.seq, a3.duplicate), (3, false), "{a3:?}");
    assert_ne!(a2.server_msg_id, a1.server_msg_id);

    // Retry after a resume on a new connection.
    drop(c);
    wait_until("the session to detach", Duration::from_secs(3), || {
        g.gw.detached_count() == 1
    })
    .await;
    let (mut c, ok2) = resume(&g, "dd", "phone", ok.session_id, ok.resume_token, 0).await;
    assert_eq!(resume_result(&ok2).0, Code::Ok);
    assert_eq!(ok2.next_uplink_seq, 4, "uplink seqs continue across resume");
    let a1c = send_up(&mut c, "m1", b"one").await;
    assert!(a1c.duplicate, "{a1c:?}");
    assert_eq!(
        (a1c.server_msg_id, a1c.seq),
        (a1.server_msg_id, 1),
        "{a1c:?}"
    );
    let a4 = send_up(&mut c, "m4", b"four").await;
    assert_eq!((a4.seq, a4.duplicate), (4, false), "{a4:?}");

    let evs = drain_events(&mut events, QUIET).await;
    let uplinks: Vec<&pb::Uplink> = evs
        .iter()
        .filter_map(|e| match e {
            pb::event::Kind::Uplink(u) => Some(u),
            _ => None,
        })
        .collect();
    let ids: Vec<(&str, u64)> = uplinks
        .iter()
        .map(|u| (u.client_msg_id.as_str(), u.seq))
        .collect();
    assert_eq!(
        ids,
        vec![("m1", 1), ("m2", 2), ("m3", 3), ("m4", 4)],
        "{uplinks:?}"
    );
    assert_eq!(uplinks[0].server_msg_id, a1.server_msg_id);
}

// ---------------------------------------------------------------------------
// 6. Retransmission and delivery reports
// ---------------------------------------------------------------------------

/// Reads events until a delivery report for `id` arrives; every delivery
/// report seen on the way is kept in `seen`.
async fn report_for(
    events: &mut tether::upstream::EventStream,
    seen: &mut Vec<pb::DeliveryReport>,
    id: &str,
    d: Duration,
) -> pb::DeliveryReport {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        if let Some(r) = seen.iter().find(|r| r.message_id == id) {
            return r.clone();
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if let pb::event::Kind::Delivery(r) = next_event(events, left).await {
            seen.push(r);
        }
    }
}

fn reported_push(id: &str) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: "rt".into(),
            device_id: "phone".into(),
        })),
        payload: Bytes::from(format!("payload of {id}")),
        source: "test".into(),
        message_id: id.into(),
        report_delivery: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_push_closes_the_connection_and_is_given_up_after_max_tries_connections() {
    let mut cfg = test_config();
    cfg.delivery.ack_timeout = Duration::from_millis(200);
    cfg.delivery.max_tries = 3;
    let g = start(cfg).await;
    let (up, mut events) = g.upstream(true).await;
    let (mut c, mut ok) = g.login("rt", "phone").await;
    let session_id = ok.session_id;
    let mut reports = Vec::new();

    // Never acked: written once per connection, and each connection is
    // closed as a dead path after the ack timeout; the resume replays it.
    up.push(reported_push("rt-1")).await.unwrap();
    for conn in 1..=3 {
        let t0 = Instant::now();
        let p = push_within(&mut c, Duration::from_secs(3), "the push").await;
        assert_eq!(
            (p.seq, p.message_id.as_str()),
            (1, "rt-1"),
            "connection {conn}"
        );
        assert_eq!(&p.payload[..], b"payload of rt-1");
        // Nothing more arrives on this connection but its Close: the push is
        // never written twice on one connection.
        match c.recv_timeout(Duration::from_secs(3)).await {
            Ok(Some(pb::ServerFrame {
                body: Some(Resp::Close(cl)),
                ..
            })) => assert_eq!(cl.code, Code::AckTimeout as i32, "connection {conn}"),
            other => panic!("connection {conn}: expected Close, got {other:?}"),
        }
        let after = t0.elapsed();
        assert!(
            after >= Duration::from_millis(150),
            "closed {after:?} after the write, before the ack timeout"
        );
        let (c2, ok2) = resume(&g, "rt", "phone", session_id, ok.resume_token.clone(), 0).await;
        (c, ok) = (c2, ok2);
        let (code, r) = resume_result(&ok);
        if conn < 3 {
            assert_eq!(code, Code::Ok, "connection {conn}: {r:?}");
            assert_eq!((r.first_seq, r.replayed), (1, 1), "{r:?}");
        } else {
            // Written on three connections: given up at this resume.
            assert_eq!(code, Code::ResumeGap, "{r:?}");
            assert_eq!((r.first_seq, r.replayed), (2, 0), "{r:?}");
        }
    }
    let r = report_for(&mut events, &mut reports, "rt-1", Duration::from_secs(3)).await;
    assert_eq!(r.code, Code::DeliveryFailed as i32, "{r:?}");
    assert_eq!((r.seq, r.lane), (1, Lane::Interactive as i32), "{r:?}");
    assert_eq!(r.session.as_ref().map(|s| s.session_id), Some(session_id));

    // Acked: delivered.
    up.push(reported_push("rt-2")).await.unwrap();
    let p = recv_push(&mut c).await;
    assert_eq!((p.seq, p.message_id.as_str()), (2, "rt-2"));
    c.ack(2).await.unwrap();
    let r = report_for(&mut events, &mut reports, "rt-2", Duration::from_secs(3)).await;
    assert_eq!((r.code, r.seq), (Code::Ok as i32, 2), "{r:?}");

    // The session ends (the client says goodbye) before the ack: expired.
    up.push(reported_push("rt-3")).await.unwrap();
    let p = recv_push(&mut c).await;
    assert_eq!((p.seq, p.message_id.as_str()), (3, "rt-3"));
    c.send(pb::ClientFrame {
        request_id: 0,
        body: Some(Req::Close(pb::Close {
            code: Code::NormalClose as i32,
            reason: "bye".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    assert_eq!(expect_closed(&mut c).await, Code::NormalClose);
    let r = report_for(&mut events, &mut reports, "rt-3", Duration::from_secs(3)).await;
    assert_eq!((r.code, r.seq), (Code::DeliveryExpired as i32, 3), "{r:?}");

    // One report per push and session, no more.
    for ev in drain_events(&mut events, QUIET).await {
        if let pb::event::Kind::Delivery(r) = ev {
            reports.push(r);
        }
    }
    let mut ids: Vec<&str> = reports.iter().map(|r| r.message_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec!["rt-1", "rt-2", "rt-3"], "{reports:?}");
    assert_eq!(g.gw.budget().used(), 0);
}

// ---------------------------------------------------------------------------
// 7. Window flow control
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_limits_unacknowledged_pushes() {
    let mut cfg = test_config();
    cfg.delivery.window = 4;
    let g = start(cfg).await;
    let (up, _) = g.upstream(false).await;
    let (mut c, ok) = g.login("win", "phone").await;
    let base = Instant::now();
    for i in 0..12 {
        let r = up
            .push(indexed_push("win", "phone", i, base, 32, Lane::Interactive))
            .await
            .unwrap();
        assert_eq!(r.sessions, 1);
    }
    let h = g.gw.registry().session(SessionId(ok.session_id)).unwrap();

    read_seqs(&mut c, 1..5).await;
    expect_silence(&mut c, Duration::from_millis(300)).await;
    assert_eq!((h.unacked(), h.queued()), (4, 8));

    c.ack(4).await.unwrap();
    read_seqs(&mut c, 5..9).await;
    expect_silence(&mut c, Duration::from_millis(300)).await;

    // A selective ack (5 and 6 only) opens two slots.
    c.send(pb::ClientFrame {
        request_id: 0,
        body: Some(Req::Ack(pb::Ack {
            up_to_seq: 4,
            lane: Lane::Interactive as i32,
            ranges: vec![pb::SeqRange { first: 5, last: 6 }],
        })),
    })
    .await
    .unwrap();
    read_seqs(&mut c, 9..11).await;
    expect_silence(&mut c, Duration::from_millis(300)).await;
    assert_eq!((h.unacked(), h.queued()), (4, 2));

    c.ack(10).await.unwrap();
    read_seqs(&mut c, 11..13).await;
    c.ack(12).await.unwrap();
    wait_until("everything acknowledged", Duration::from_secs(2), || {
        h.delivery_idle()
    })
    .await;
    assert_eq!(g.gw.budget().used(), 0);
}

async fn read_seqs(c: &mut Client, seqs: Range<u64>) {
    for seq in seqs {
        let p = recv_push(c).await;
        assert_eq!((p.seq, idx_of(&p)), (seq, seq - 1));
    }
}

// ---------------------------------------------------------------------------
// 8. A slow client beside 100 fast ones
// ---------------------------------------------------------------------------

const FAST: usize = 100;
const FAN_PUSHES: u64 = 2_000;
const FAN_SIZE: usize = 1024;
const FAN_BURST: u64 = 100;

/// A client whose socket receive buffer is small (it will never read).
async fn stubborn_client(g: &TestGateway) -> Client {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    let stream = s.connect(g.tcp).await.unwrap();
    stream.set_nodelay(true).unwrap();
    Client::over(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_client_beside_100_fast_ones() {
    let _heavy = HEAVY.lock().await;
    let cfg = test_config();
    let (queue_bytes, detached_bytes) = (
        cfg.delivery.queue_bytes as usize,
        cfg.delivery.detached_bytes as usize,
    );
    let window = cfg.delivery.window as usize;
    let g = start(cfg).await;
    let (up, mut events) = g.upstream(true).await;
    let base = Instant::now();

    let mut slow = stubborn_client(&g).await;
    let slow_ok = slow.login(&token("slow", "phone"), "phone").await.unwrap();

    let mut readers = Vec::new();
    for i in 0..FAST {
        let (mut c, _) = g.login(&format!("fast-{i}"), "phone").await;
        readers.push(tokio::spawn(async move {
            let mut max = Duration::ZERO;
            let mut sum = Duration::ZERO;
            for seq in 1..=FAN_PUSHES {
                let f = c
                    .recv_timeout(Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|e| panic!("fast-{i} stalled at seq {seq}: {e}"))
                    .unwrap_or_else(|| panic!("fast-{i} closed at seq {seq}"));
                let p = match f.body {
                    Some(Resp::Push(p)) => p,
                    other => panic!("fast-{i}: unexpected {other:?}"),
                };
                assert_eq!(p.seq, seq, "fast-{i}: out of order");
                assert_eq!(idx_of(&p), seq - 1, "fast-{i}");
                assert_eq!(p.payload.len(), FAN_SIZE);
                let l = latency_of(&p, base);
                max = max.max(l);
                sum += l;
                if seq % 32 == 0 || seq == FAN_PUSHES {
                    c.ack(seq).await.unwrap();
                }
            }
            (max, sum)
        }));
    }
    assert_eq!(g.gw.registry().len(), FAST + 1);

    // Watch the replay memory: node-wide and per session.
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn({
        let (gw, stop) = (g.gw.clone(), stop.clone());
        async move {
            let (mut max_used, mut max_items) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                max_used = max_used.max(gw.budget().used());
                gw.registry().for_each(|h| {
                    max_items = max_items.max(h.queued() + h.unacked());
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (max_used, max_items)
        }
    });

    let t0 = Instant::now();
    let dropped = AtomicUsize::new(0);
    for burst in 0..FAN_PUSHES / FAN_BURST {
        let range = burst * FAN_BURST..(burst + 1) * FAN_BURST;
        let (up, dropped) = (&up, &dropped);
        // In order on the one upstream connection (see push_range).
        tokio::task::unconstrained(async move {
            let mut replies = futures_util::stream::iter(range)
                .map(|i| {
                    let req = pb::PushRequest {
                        target: Some(Target::Everyone(true)),
                        payload: payload(i, base, FAN_SIZE),
                        source: "test".into(),
                        message_id: format!("fan-{i}"),
                        ..Default::default()
                    };
                    async move { (i, up.push(req).await) }
                })
                .buffered(16);
            while let Some((i, r)) = replies.next().await {
                let r = r.unwrap_or_else(|e| panic!("push {i}: {e}"));
                assert_eq!(r.sessions + r.dropped, FAST as u64 + 1, "push {i}: {r:?}");
                dropped.fetch_add(r.dropped as usize, Ordering::Relaxed);
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let push_time = t0.elapsed();

    let mut max_latency = Duration::ZERO;
    let mut sum = Duration::ZERO;
    for r in readers {
        let (m, s) = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("a fast reader stalled")
            .expect("a fast reader failed");
        max_latency = max_latency.max(m);
        sum += s;
    }
    let all = t0.elapsed();
    let mean = sum / (FAST as u32 * FAN_PUSHES as u32);

    let closed = wait_event(&mut events, Duration::from_secs(5), |e| {
        closed_event(e, slow_ok.session_id)
    })
    .await;
    assert_eq!(closed.code, Code::SlowConsumer as i32, "{closed:?}");
    stop.store(true, Ordering::Relaxed);
    let (max_used, max_items) = monitor.await.unwrap();

    // Per session, the queue holds at most its byte bound (one more push
    // trips it) plus a full window, or, detached, the detached bound; each
    // item is charged at least its payload and the fixed overhead (and well
    // under 256 bytes more here).
    let per_item = FAN_SIZE + 256;
    let charged = FAN_SIZE + tether::session::ITEM_OVERHEAD;
    let per_session_items = (queue_bytes / charged + 1 + window).max(detached_bytes / charged);
    let bound = (64 << 20).min((FAST + 1) * per_session_items * per_item);
    let slow_h =
        g.gw.registry()
            .session(SessionId(slow_ok.session_id))
            .expect("the slow session waits detached for a resume");
    let slow_items = slow_h.queued() + slow_h.unacked();
    eprintln!(
        "fan-out: {FAN_PUSHES} x {FAN_SIZE} B to {} sessions: pushed in {push_time:?}, all read in {all:?}; \
         latency max {max_latency:?}, mean {mean:?}; replay memory max {max_used} B (bound {bound} B), \
         max items per session {max_items} (bound {per_session_items}); slow session holds {slow_items} items; \
         {} refusals",
        FAST + 1,
        dropped.load(Ordering::Relaxed),
    );
    assert!(
        max_latency < Duration::from_secs(2),
        "max latency {max_latency:?}"
    );
    assert!(max_used < bound, "replay memory {max_used} B >= {bound} B");
    assert!(
        max_items <= per_session_items,
        "{max_items} items in one session"
    );
    assert!(slow_items <= per_session_items);
    assert!(slow_h.is_detached());
    assert_eq!(
        dropped.load(Ordering::Relaxed),
        0,
        "nothing is refused: even the push that tripped the slow consumer is kept for its resume"
    );
    // The slow client's connection was closed by the gateway.
    let code = read_until_closed(&mut slow).await;
    assert!(
        matches!(code, None | Some(Code::SlowConsumer)),
        "the slow client was closed with {code:?}"
    );
}

// ---------------------------------------------------------------------------
// 9. Lanes
// ---------------------------------------------------------------------------

const BULK: u64 = 5_000;
const BULK_SIZE: usize = 4 * 1024;
const INTERACTIVE: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bulk_flood_does_not_delay_interactive_pushes() {
    let _heavy = HEAVY.lock().await;
    let mut cfg = test_config();
    cfg.delivery.bulk_window = 8;
    // Queue the whole flood: this test is about latency, not drops.
    cfg.delivery.bulk_queue_bytes = 64 << 20;
    let g = start(cfg).await;
    let (int_up, _) = g.upstream(false).await;
    let (mut c, ok) = g.login("lane", "phone").await;
    let h = g.gw.registry().session(SessionId(ok.session_id)).unwrap();
    let base = Instant::now();

    let bulk_seen = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let bulk_seen = bulk_seen.clone();
        async move {
            let mut seen = vec![false; BULK as usize];
            let (mut last_bulk, mut last_int) = (0u64, 0u64);
            // (latency, bulk pushes received before it)
            let mut lat = Vec::new();
            while last_bulk < BULK || last_int < INTERACTIVE {
                let p = recv_push(&mut c).await;
                if p.lane == Lane::Bulk as i32 {
                    assert_eq!(p.seq, last_bulk + 1, "bulk gap");
                    last_bulk = p.seq;
                    let i = idx_of(&p) as usize;
                    assert!(!seen[i], "bulk push {i} twice");
                    seen[i] = true;
                    assert_eq!(p.payload.len(), BULK_SIZE);
                    bulk_seen.store(last_bulk, Ordering::Relaxed);
                    if last_bulk % 4 == 0 || last_bulk == BULK {
                        c.ack_lane(Lane::Bulk, last_bulk).await.unwrap();
                    }
                } else {
                    assert_eq!(p.lane, Lane::Interactive as i32);
                    assert_eq!(p.seq, last_int + 1, "interactive gap");
                    assert_eq!(idx_of(&p), p.seq - 1);
                    last_int = p.seq;
                    lat.push((latency_of(&p, base), last_bulk));
                    c.ack(last_int).await.unwrap();
                }
            }
            assert!(seen.iter().all(|s| *s));
            expect_silence(&mut c, Duration::from_millis(100)).await;
            lat
        }
    });

    // Four upstream connections flood the bulk lane in parallel.
    let bulk_pushed = Arc::new(AtomicU64::new(0));
    let mut pushers = Vec::new();
    const TASKS: u64 = 4;
    for k in 0..TASKS {
        let (up, _) = g.upstream(false).await;
        let pushed = bulk_pushed.clone();
        pushers.push(tokio::spawn(async move {
            let per = BULK / TASKS;
            push_range(
                &up,
                "lane",
                "phone",
                k * per..(k + 1) * per,
                base,
                BULK_SIZE,
                Lane::Bulk,
                64,
                &pushed,
            )
            .await;
        }));
    }

    // Interactive pushes while the flood flows.
    wait_until("bulk to flow", Duration::from_secs(5), || {
        bulk_seen.load(Ordering::Relaxed) >= 100
    })
    .await;
    // (bulk received when the gateway had queued it, bulk backlog when it
    // was sent) for each interactive push. The count starts at the reply,
    // which comes once the push is queued: what flowed before that was the
    // upstream request's own way in (long when the machine is busy), which
    // lanes do not shorten.
    let mut at_send = Vec::new();
    for i in 0..INTERACTIVE {
        // Bulk pushes queued on the session (nothing else is queued).
        let backlog = h.queued() as u64;
        let r = int_up
            .push(indexed_push(
                "lane",
                "phone",
                i,
                base,
                64,
                Lane::Interactive,
            ))
            .await
            .unwrap();
        assert_eq!((r.sessions, r.dropped), (1, 0));
        at_send.push((bulk_seen.load(Ordering::Relaxed), backlog));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for p in pushers {
        p.await.unwrap();
    }
    let lat = tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("the reader stalled")
        .expect("the reader failed");
    let bulk_time = base.elapsed();

    let mut sorted: Vec<Duration> = lat.iter().map(|(l, _)| *l).collect();
    sorted.sort_unstable();
    let (p50, p100) = (sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    let during_flood = lat.iter().filter(|(_, b)| *b < BULK).count();
    // Bulk pushes the client read between an interactive push's queueing and
    // its arrival: a lane-blind queue would put the whole backlog ahead of it.
    let ahead: Vec<(u64, u64)> = lat
        .iter()
        .zip(&at_send)
        .map(|((_, before), (seen, backlog))| (before.saturating_sub(*seen), *backlog))
        .collect();
    eprintln!(
        "lanes: {BULK} bulk x {BULK_SIZE} B in {bulk_time:?}; interactive latency p50 {p50:?}, p100 {p100:?}; \
         {during_flood}/{INTERACTIVE} arrived while bulk was still flowing; \
         (bulk read after it was queued and before it, bulk backlog at send) per interactive push: {ahead:?}"
    );
    assert!(
        during_flood >= INTERACTIVE as usize / 2,
        "the flood ended too early to test anything ({during_flood} interactive during it)"
    );
    assert!(p100 < Duration::from_secs(1), "interactive p100 {p100:?}");
    let deep: Vec<&(u64, u64)> = ahead.iter().filter(|(_, b)| *b >= 512).collect();
    assert!(
        deep.len() >= 5,
        "too few interactive pushes met a deep bulk backlog: {ahead:?}"
    );
    for (read, backlog) in deep {
        assert!(
            read * 2 < *backlog,
            "an interactive push waited behind {read} of {backlog} queued bulk pushes: {ahead:?}"
        );
    }
}
