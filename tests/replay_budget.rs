//! The node's replay budget against cheap detached sessions, over real
//! loopback TCP: a push's body counts once however many sessions hold it,
//! detached sessions pay (their oldest pushes evicted, the gap shown at their
//! resume) before a live session loses anything, and one user's detached
//! sessions together hold at most `delivery.detached_bytes_per_user`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use tether::client::Client;
use tether::ids::SessionId;
use tether::wire::pb::{self, push_request::Target, Code};

const ROOM: &str = "lobby";
const BIG: usize = 60_000;

async fn wait_until(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + d;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Logs `users` × `devices` sessions in, each in [`ROOM`], then drops their
/// sockets; returns each session's `LoginOk` (for a resume) once all are detached.
async fn detached_members(
    g: &TestGateway,
    users: usize,
    devices: usize,
) -> Vec<(String, String, pb::LoginOk)> {
    let mut out = Vec::new();
    let mut conns = Vec::new();
    for u in 0..users {
        for d in 0..devices {
            let (user, device) = (format!("attacker-{u}"), format!("dev-{d}"));
            let (mut c, ok) = g.login_rooms(&user, &device, &[ROOM]).await;
            join(&mut c).await;
            conns.push(c);
            out.push((user, device, ok));
        }
    }
    let before = g.gw.detached_count();
    drop(conns);
    let n = users * devices;
    wait_until("the sessions to detach", Duration::from_secs(10), || {
        g.gw.detached_count() == before + n
    })
    .await;
    out
}

async fn join(c: &mut Client) {
    let rid = c.join(ROOM).await.unwrap();
    let f = next(c).await;
    assert_eq!(f.request_id, rid);
    match f.body {
        Some(pb::server_frame::Body::RoomOk(ok)) => assert!(ok.joined),
        other => panic!("join: {other:?}"),
    }
}

fn big(i: u64) -> Bytes {
    let mut v = vec![(i % 251) as u8; BIG];
    v[..8].copy_from_slice(&i.to_be_bytes());
    v.into()
}

/// Receives `n` pushes in seq order from `first`, acknowledging each.
async fn receive_all(c: &mut Client, first: u64, n: u64, what: &str) {
    for seq in first..first + n {
        let p = push_within(c, Duration::from_secs(10), what).await;
        assert_eq!(p.seq, seq, "{what}: no gap, in order");
        assert_eq!(p.payload.len(), BIG);
        c.ack(p.seq).await.unwrap();
    }
}

/// What the detached sessions of `user` hold together.
fn user_held(g: &TestGateway, user: &str) -> usize {
    let mut held = 0;
    g.gw.registry().for_user(user, |h| {
        if h.is_detached() {
            held += h.held();
        }
    });
    held
}

/// The attack as it was found: nine accounts with their 32 devices each in
/// one room, sockets reset (288 detached sessions), then 60 KB pushes to the
/// room. With each body charged per session, about 70 pushes spent the 1 GiB
/// budget and from then on every large push was dropped node-wide: a live
/// member got 0 of 40, a fresh user 0 of 20 direct pushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_sessions_cannot_spend_the_replay_budget_for_everyone() {
    let mut cfg = test_config();
    cfg.limits.max_devices_per_user = 32;
    let cap = cfg.delivery.detached_bytes_per_user as usize;
    let budget_limit = cfg.delivery.replay_budget as usize;
    assert_eq!(budget_limit, 1 << 30, "the default budget, as attacked");
    let g = start(cfg).await;
    let attackers = detached_members(&g, 9, 32).await;
    let (mut member, _) = g.login_rooms("member", "phone", &[ROOM]).await;
    join(&mut member).await;
    let (up, _events) = g.upstream(false).await;

    const ROOM_PUSHES: u64 = 110;
    let reader = tokio::spawn(async move {
        receive_all(&mut member, 1, ROOM_PUSHES, "room member").await;
        member
    });
    let mut max_used = 0;
    for i in 0..ROOM_PUSHES {
        let r = up
            .push(pb::PushRequest {
                target: Some(Target::Room(ROOM.into())),
                payload: big(i),
                source: "test".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(r.dropped, 0, "push {i}: nobody loses it");
        assert_eq!(r.sessions, 289, "push {i}: every member holds it");
        max_used = max_used.max(g.gw.budget().used());
        for u in 0..9 {
            let held = user_held(&g, &format!("attacker-{u}"));
            assert!(
                held <= cap,
                "attacker-{u}'s detached sessions hold {held} > {cap}"
            );
        }
    }
    let _member = reader.await.unwrap();
    // Each user's detached sessions keep at most `cap` (16 MiB) of session
    // bytes; the node holds each body once: well under 1 % of the budget.
    eprintln!("replay budget used at most {max_used} bytes");
    assert!(max_used < 32 << 20, "{max_used} bytes charged");

    // A fresh user's direct large pushes all arrive.
    let (mut fresh, _) = g.login("fresh", "phone").await;
    for i in 0..20 {
        let r = up
            .push(pb::PushRequest {
                target: Some(Target::Device(pb::DeviceTarget {
                    user_id: "fresh".into(),
                    device_id: "phone".into(),
                })),
                payload: big(i),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!((r.sessions, r.dropped), (1, 0), "direct push {i}");
    }
    receive_all(&mut fresh, 1, 20, "fresh user").await;

    // An attacker's device resumes: its oldest pushes were evicted for its
    // user's bound, and the resume says so; the rest follow in order.
    let (user, device, ok) = &attackers[0];
    let mut c = g.client().await;
    let back = c
        .login_with(resume_login(user, device, ok, 0, 0))
        .await
        .unwrap();
    let r = back.resume.expect("a resume result");
    assert_eq!(r.code, Code::ResumeGap as i32, "{r:?}");
    assert!(r.first_seq > 1 && r.replayed > 0, "{r:?}");
    assert_eq!(r.first_seq + r.replayed - 1, ROOM_PUSHES, "{r:?}");
    for seq in r.first_seq..=ROOM_PUSHES {
        let p = push_within(&mut c, Duration::from_secs(10), "resumed attacker").await;
        assert_eq!(p.seq, seq);
        assert_eq!(&p.payload[..8], &(seq - 1).to_be_bytes());
    }
}

/// A budget really spent by distinct pushes held for detached sessions: a
/// live session's pushes still all arrive, because the detached sessions'
/// oldest pushes are evicted first (each reported `CODE_DELIVERY_EXPIRED`,
/// each detached session's resume shows the gap).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_is_taken_from_detached_sessions_before_a_live_one() {
    let mut cfg = test_config();
    cfg.delivery.replay_budget = 4 << 20;
    cfg.delivery.detached_bytes = 1 << 20;
    cfg.delivery.detached_bytes_per_user = 4 << 20;
    let limit = cfg.delivery.replay_budget as usize;
    let g = start(cfg).await;
    let (up, mut events) = g.upstream(true).await;

    // Eight users with one device each: their own bounds (1 MiB each, 8 MiB
    // together) allow twice the node's budget.
    let mut oks = Vec::new();
    for u in 0..8 {
        let user = format!("away-{u}");
        let (c, ok) = g.login(&user, "phone").await;
        drop(c);
        oks.push((user, ok));
    }
    wait_until("the sessions to detach", Duration::from_secs(10), || {
        g.gw.detached_count() == 8
    })
    .await;
    let direct = |user: &str, i: u64, report: bool| pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: user.into(),
            device_id: "phone".into(),
        })),
        payload: big(i),
        message_id: format!("{user}-{i}"),
        report_delivery: report,
        ..Default::default()
    };
    for round in 0..16 {
        for (user, _) in &oks {
            let r = up.push(direct(user, round, true)).await.unwrap();
            assert_eq!((r.sessions, r.dropped), (1, 0), "{user} round {round}");
        }
    }
    assert!(g.gw.budget().used() <= limit);

    // The live session: every push arrives while the budget is full.
    let (mut live, _) = g.login("live", "phone").await;
    for i in 0..40 {
        let r = up.push(direct("live", i, false)).await.unwrap();
        assert_eq!((r.sessions, r.dropped), (1, 0), "live push {i}");
        assert!(g.gw.budget().used() <= limit);
        let p = push_within(&mut live, Duration::from_secs(10), "live").await;
        assert_eq!(p.seq, i + 1);
        live.ack(p.seq).await.unwrap();
    }

    // The evictions were reported to the upstream that asked.
    let mut expired = 0;
    for e in drain_events(&mut events, Duration::from_millis(500)).await {
        if let pb::event::Kind::Delivery(d) = e {
            assert!(d.message_id.starts_with("away-"), "{d:?}");
            assert_eq!(d.code, Code::DeliveryExpired as i32, "{d:?}");
            expired += 1;
        }
    }
    assert!(expired > 0, "evictions are reported");

    // Every detached session lost its oldest pushes, not its newest: each
    // resume reports the gap and replays a tail that ends with round 15.
    for (user, ok) in &oks {
        let mut c = g.client().await;
        let back = c
            .login_with(resume_login(user, "phone", ok, 0, 0))
            .await
            .unwrap();
        let r = back.resume.expect("a resume result");
        assert_eq!(r.code, Code::ResumeGap as i32, "{user}: {r:?}");
        assert_eq!(r.first_seq + r.replayed - 1, 16, "{user}: {r:?}");
        let h = g.gw.registry().session(SessionId(back.session_id)).unwrap();
        assert!(!h.is_detached());
    }
}

/// When live sessions alone hold the whole budget, a push that does not fit
/// is dropped for a connected session, and that client is told at once with
/// a `Gap` frame: no later push has to come for it to notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_that_loses_a_push_is_told_with_a_gap_frame() {
    let mut cfg = test_config();
    cfg.delivery.replay_budget = 1 << 20;
    cfg.delivery.queue_bytes = 1 << 20;
    cfg.delivery.bulk_queue_bytes = 1 << 20;
    cfg.delivery.detached_bytes = 1 << 20;
    cfg.delivery.detached_bytes_per_user = 1 << 20;
    let g = start(cfg).await;
    let (up, _events) = g.upstream(false).await;
    // A live client that reads nothing and acknowledges nothing pins what
    // the budget holds (its pushes wait unacknowledged in its window).
    let (_hog, _) = g.login("hog", "phone").await;
    let to = |user: &str, i: u64| pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: user.into(),
            device_id: "phone".into(),
        })),
        payload: big(i),
        ..Default::default()
    };
    let mut i = 0;
    loop {
        let r = up.push(to("hog", i)).await.unwrap();
        i += 1;
        if r.dropped == 1 {
            break;
        }
        assert!(i < 100, "the budget never filled");
    }
    let (mut victim, _) = g.login("victim", "phone").await;
    let r = up.push(to("victim", 0)).await.unwrap();
    assert_eq!(
        (r.sessions, r.dropped),
        (0, 1),
        "nothing to reclaim: dropped"
    );
    let f = next(&mut victim).await;
    match f.body {
        Some(pb::server_frame::Body::Gap(gap)) => {
            assert_eq!(f.request_id, 0);
            assert_eq!(gap.lane, pb::Lane::Interactive as i32);
            assert_eq!((gap.first_seq, gap.last_seq), (1, 1));
        }
        other => panic!("expected a Gap frame, got {other:?}"),
    }
}
