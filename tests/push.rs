//! Downlink routing: user, device, user list, everyone, rooms; undelivered
//! reports; kicks and presence.

mod common;

use std::time::Duration;

use common::*;
use tether::client::Client;
use tether::wire::pb::{self, client_frame::Body as Req, push_request::Target, Code};

fn push_req(target: Target, payload: &str) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(target),
        payload: payload.as_bytes().to_vec().into(),
        source: "test".into(),
        ..Default::default()
    }
}

/// Asserts `c` receives one push with `payload` and `message_id`; returns it.
async fn expect_push(c: &mut Client, payload: &str, message_id: &str) -> pb::Push {
    let f = next(c).await;
    let p = push_of(&f).clone();
    assert_eq!(&p.payload[..], payload.as_bytes());
    assert_eq!(p.message_id, message_id);
    assert_eq!(p.source, "test");
    p
}

#[tokio::test]
async fn push_to_user_reaches_every_device_and_nobody_else() {
    let g = start(test_config()).await;
    let (mut a1, _) = g.login("alice", "phone").await;
    let (mut a2, _) = g.login("alice", "tablet").await;
    let (mut a3, _) = g.login("alice", "laptop").await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let (up, _) = g.upstream(false).await;

    let r = up
        .push(push_req(Target::UserId("alice".into()), "to-alice"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 3);
    assert_eq!(r.dropped, 0);
    assert!(!r.message_id.is_empty());
    for c in [&mut a1, &mut a2, &mut a3] {
        let p = expect_push(c, "to-alice", &r.message_id).await;
        assert_eq!(p.seq, 1);
        assert_eq!(p.room, "");
    }
    expect_silence(&mut bob, QUIET).await;
    for c in [&mut a1, &mut a2, &mut a3] {
        expect_silence(c, Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn push_to_device_reaches_only_that_device() {
    let g = start(test_config()).await;
    let (mut a1, _) = g.login("alice", "phone").await;
    let (mut a2, _) = g.login("alice", "tablet").await;
    let (mut bob, _) = g.login("bob", "tablet").await;
    let (up, _) = g.upstream(false).await;

    let r = up
        .push(push_req(
            Target::Device(pb::DeviceTarget {
                user_id: "alice".into(),
                device_id: "tablet".into(),
            }),
            "to-tablet",
        ))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    expect_push(&mut a2, "to-tablet", &r.message_id).await;
    expect_silence(&mut a1, QUIET).await;
    expect_silence(&mut bob, Duration::from_millis(50)).await;

    // A device that is not online gets nothing and counts nothing.
    let r = up
        .push(push_req(
            Target::Device(pb::DeviceTarget {
                user_id: "alice".into(),
                device_id: "watch".into(),
            }),
            "to-watch",
        ))
        .await
        .unwrap();
    assert_eq!(r.sessions, 0);
    expect_silence(&mut a1, QUIET).await;
    expect_silence(&mut a2, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn push_to_user_list_reaches_exactly_those_users() {
    let g = start(test_config()).await;
    let (mut a1, _) = g.login("alice", "phone").await;
    let (mut a2, _) = g.login("alice", "tablet").await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let (mut carol, _) = g.login("carol", "phone").await;
    let (up, _) = g.upstream(false).await;

    let r = up
        .push(push_req(
            Target::Users(pb::UserList {
                user_ids: vec!["alice".into(), "carol".into(), "nobody".into()],
            }),
            "to-list",
        ))
        .await
        .unwrap();
    assert_eq!(r.sessions, 3);
    for c in [&mut a1, &mut a2, &mut carol] {
        expect_push(c, "to-list", &r.message_id).await;
    }
    expect_silence(&mut bob, QUIET).await;
}

#[tokio::test]
async fn push_to_everyone_reaches_every_session_once() {
    let g = start(test_config()).await;
    let mut clients = Vec::new();
    for (u, d) in [
        ("alice", "phone"),
        ("alice", "tablet"),
        ("bob", "x"),
        ("carol", "y"),
    ] {
        clients.push(g.login(u, d).await.0);
    }
    // A connection that never logged in is not "everyone".
    let mut anon = g.client().await;
    let (up, _) = g.upstream(false).await;
    let r = up
        .push(push_req(Target::Everyone(true), "to-all"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 4);
    for c in &mut clients {
        expect_push(c, "to-all", &r.message_id).await;
    }
    for c in &mut clients {
        expect_silence(c, Duration::from_millis(50)).await;
    }
    expect_silence(&mut anon, Duration::from_millis(50)).await;

    // Sequence numbers are per session and count up.
    let r2 = up
        .push(push_req(Target::Everyone(true), "to-all-2"))
        .await
        .unwrap();
    assert_ne!(r2.message_id, r.message_id);
    for c in &mut clients {
        let p = expect_push(c, "to-all-2", &r2.message_id).await;
        assert_eq!(p.seq, 2);
    }
}

#[tokio::test]
async fn room_push_reaches_exactly_the_members() {
    let g = start(test_config()).await;
    // m1 joins from the client side (the token allows "lobby").
    let (mut m1, _) = g.login_rooms("u1", "d1", &["lobby", "team.*"]).await;
    // m2's token allows nothing; the upstream adds it.
    let (mut m2, _) = g.login_rooms("u2", "d2", &[]).await;
    // A non-member whose token would allow the room but who never joins.
    let (mut outsider, _) = g.login_rooms("u3", "d3", &["lobby"]).await;
    let (up, _) = g.upstream(false).await;

    let rid = m1.join("lobby").await.unwrap();
    let f = next(&mut m1).await;
    assert_eq!(f.request_id, rid);
    match f.body {
        Some(pb::server_frame::Body::RoomOk(ok)) => {
            assert_eq!(ok.room, "lobby");
            assert!(ok.joined);
        }
        other => panic!("expected RoomOk, got {other:?}"),
    }
    // A pattern in the token works too.
    let rid = m1.join("team.blue").await.unwrap();
    let f = next(&mut m1).await;
    assert_eq!(f.request_id, rid);
    assert!(matches!(f.body, Some(pb::server_frame::Body::RoomOk(ref ok)) if ok.joined));

    // A room not in the token is forbidden.
    let rid = m2.join("lobby").await.unwrap();
    let f = next(&mut m2).await;
    assert_eq!(error_of(&f), Code::RoomForbidden);
    assert_eq!(f.request_id, rid);
    let rid = m1.join("secret").await.unwrap();
    let f = next(&mut m1).await;
    assert_eq!(error_of(&f), Code::RoomForbidden);
    assert_eq!(f.request_id, rid);

    assert_eq!(up.room("lobby", &["u2"], false).await.unwrap(), 1);

    let r = up
        .push(push_req(Target::Room("lobby".into()), "room-1"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 2);
    for c in [&mut m1, &mut m2] {
        let p = expect_push(c, "room-1", &r.message_id).await;
        assert_eq!(p.room, "lobby");
    }
    expect_silence(&mut outsider, QUIET).await;

    // Leave stops delivery to m1.
    let rid = m1
        .request(Req::Leave(pb::Leave {
            room: "lobby".into(),
        }))
        .await
        .unwrap();
    let f = next(&mut m1).await;
    assert_eq!(f.request_id, rid);
    assert!(
        matches!(f.body, Some(pb::server_frame::Body::RoomOk(ref ok)) if !ok.joined && ok.room == "lobby")
    );
    let r = up
        .push(push_req(Target::Room("lobby".into()), "room-2"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    expect_push(&mut m2, "room-2", &r.message_id).await;
    expect_silence(&mut m1, QUIET).await;
    expect_silence(&mut outsider, Duration::from_millis(50)).await;

    // The upstream removing m2 stops delivery to it; nobody is left.
    assert_eq!(up.room("lobby", &["u2"], true).await.unwrap(), 1);
    let r = up
        .push(push_req(Target::Room("lobby".into()), "room-3"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 0);
    for c in [&mut m1, &mut m2, &mut outsider] {
        expect_silence(c, Duration::from_millis(100)).await;
    }

    // m1 is still in team.blue.
    let r = up
        .push(push_req(Target::Room("team.blue".into()), "team"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    let p = expect_push(&mut m1, "team", &r.message_id).await;
    assert_eq!(p.room, "team.blue");
}

#[tokio::test]
async fn push_to_offline_user_reports_undelivered() {
    let g = start(test_config()).await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let (up, mut events) = g.upstream(true).await;
    // Skip nothing: bob logged in before the subscription.
    let r = up.push_user("ghost", "into-the-void").await.unwrap();
    assert_eq!(r.sessions, 0);
    assert_eq!(r.dropped, 0);
    let u = wait_event(&mut events, Duration::from_secs(2), |e| match e {
        pb::event::Kind::Undelivered(u) => Some(u.clone()),
        _ => None,
    })
    .await;
    assert_eq!(u.user_id, "ghost");
    assert_eq!(u.message_id, r.message_id);
    assert_eq!(u.device_id, "");

    // With a caller-chosen message id, and for a list mixing online and offline.
    let r = up
        .push(pb::PushRequest {
            target: Some(Target::Users(pb::UserList {
                user_ids: vec!["bob".into(), "ghost2".into()],
            })),
            payload: b"mixed".to_vec().into(),
            message_id: "my-id-7".into(),
            report_undelivered: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.message_id, "my-id-7");
    assert_eq!(r.sessions, 1);
    let u = wait_event(&mut events, Duration::from_secs(2), |e| match e {
        pb::event::Kind::Undelivered(u) => Some(u.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (u.user_id.as_str(), u.message_id.as_str()),
        ("ghost2", "my-id-7")
    );
    assert_eq!(&push_of(&next(&mut bob).await).payload[..], b"mixed");
    // Only one report for that push: bob was delivered.
    let rest = drain_events(&mut events, QUIET).await;
    assert!(
        !rest
            .iter()
            .any(|e| matches!(e, pb::event::Kind::Undelivered(_))),
        "{rest:?}"
    );

    // Without report_undelivered there is no event.
    let r = up
        .push(pb::PushRequest {
            target: Some(Target::UserId("ghost".into())),
            payload: b"quiet".to_vec().into(),
            report_undelivered: false,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.sessions, 0);
    let rest = drain_events(&mut events, QUIET).await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_push_batch_runs_each_push_and_answers_each_in_order() {
    let g = start(test_config()).await;
    let (mut alice, _) = g.login("alice", "phone").await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let (up, _) = g.upstream(false).await;
    let to = |user: &str, payload: &'static [u8]| pb::PushRequest {
        target: Some(pb::push_request::Target::UserId(user.into())),
        payload: payload.into(),
        ..Default::default()
    };
    let results = up
        .push_batch(vec![
            to("alice", b"a1"),
            to("bob", b"b1"),
            // A bad push is refused alone; the ones around it still run.
            pb::PushRequest::default(),
            to("carol", b"nobody"),
            to("alice", b"a2"),
        ])
        .await
        .unwrap();
    assert_eq!(results.len(), 5);
    let sessions: Vec<_> = results
        .iter()
        .map(|r| r.as_ref().map(|r| r.sessions).ok())
        .collect();
    assert_eq!(sessions, [Some(1), Some(1), None, Some(0), Some(1)]);
    match &results[2] {
        Err(tether::upstream::ClientError::Refused { code, .. }) => {
            assert_eq!(*code, Code::BadRequest)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let ids: std::collections::HashSet<_> = results
        .iter()
        .flatten()
        .map(|r| r.message_id.clone())
        .collect();
    assert_eq!(ids.len(), 4, "each push gets its own message id");
    let a1 = push_of(&next(&mut alice).await).clone();
    let a2 = push_of(&next(&mut alice).await).clone();
    assert_eq!((&a1.payload[..], &a2.payload[..]), (&b"a1"[..], &b"a2"[..]));
    assert_eq!(a2.seq, a1.seq + 1, "in the batch's order");
    assert_eq!(&push_of(&next(&mut bob).await).payload[..], b"b1");

    // Over the limit, the whole batch is refused and nothing is pushed.
    let many = (0..=tether::upstream::MAX_PUSHES_PER_BATCH)
        .map(|_| to("alice", b"x"))
        .collect();
    match up.push_batch(many).await {
        Err(tether::upstream::ClientError::Refused { code, message }) => {
            assert_eq!(code, Code::BadRequest);
            assert!(message.contains("1024"), "{message}");
        }
        other => panic!("expected the batch refused, got {other:?}"),
    }
    expect_silence(&mut alice, Duration::from_millis(200)).await;
    ping_pong(&mut alice).await;
}

#[tokio::test]
async fn kick_closes_one_device_and_leaves_the_other() {
    let g = start(test_config()).await;
    let (mut phone, _) = g.login("alice", "phone").await;
    let (mut tablet, _) = g.login("alice", "tablet").await;
    let (up, _) = g.upstream(false).await;

    assert_eq!(up.kick("alice", "phone", "bye").await.unwrap(), 1);
    let f = next(&mut phone).await;
    assert_eq!(close_of(&f), Code::Kicked);
    match &f.body {
        Some(pb::server_frame::Body::Close(c)) => assert_eq!(c.reason, "bye"),
        _ => unreachable!(),
    }
    expect_eof(&mut phone).await;
    drop(phone);
    g.wait_sessions(1).await;

    ping_pong(&mut tablet).await;
    let r = up.push_user("alice", "after-kick").await.unwrap();
    assert_eq!(r.sessions, 1);
    assert_eq!(
        &push_of(&next(&mut tablet).await).payload[..],
        b"after-kick"
    );

    // Kicking a device that is not online affects nothing.
    assert_eq!(up.kick("alice", "phone", "again").await.unwrap(), 0);
    ping_pong(&mut tablet).await;

    // Kicking the user (no device) closes every device.
    assert_eq!(up.kick("alice", "", "all").await.unwrap(), 1);
    assert_eq!(close_of(&next(&mut tablet).await), Code::Kicked);
    expect_eof(&mut tablet).await;
}

#[tokio::test]
async fn presence_lists_online_devices() {
    let mut cfg = test_config();
    cfg.node_id = "node-presence".into();
    let g = start(cfg).await;
    let (_phone, phone_ok) = g.login("alice", "phone").await;
    let (tablet, tablet_ok) = g.login("alice", "tablet").await;
    let (up, _) = g.upstream(false).await;

    let users = up.presence(&["alice", "nobody"]).await.unwrap();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0].user_id, "alice");
    let mut devs: Vec<(String, u64, String, String)> = users[0]
        .devices
        .iter()
        .map(|d| {
            (
                d.device_id.clone(),
                d.session_id,
                d.node_id.clone(),
                d.transport.clone(),
            )
        })
        .collect();
    devs.sort();
    assert_eq!(
        devs,
        vec![
            (
                "phone".to_string(),
                phone_ok.session_id,
                "node-presence".to_string(),
                "tcp".to_string()
            ),
            (
                "tablet".to_string(),
                tablet_ok.session_id,
                "node-presence".to_string(),
                "tcp".to_string()
            ),
        ]
    );
    for d in &users[0].devices {
        assert_eq!(d.platform, pb::Platform::Desktop as i32);
        assert!(d.since_ms > 0);
    }
    assert_eq!(users[1].user_id, "nobody");
    assert!(users[1].devices.is_empty());

    // After a device disconnects it is no longer listed.
    drop(tablet);
    g.wait_sessions(1).await;
    let users = up.presence(&["alice"]).await.unwrap();
    assert_eq!(users.len(), 1);
    let ids: Vec<&str> = users[0]
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    assert_eq!(ids, ["phone"]);
}
