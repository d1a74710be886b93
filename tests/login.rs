//! Login: tokens, protocol versions, requests before login, second logins, and
//! how logins of one user coexist (per device, single).

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use tether::auth::{mint_claims, mint_hs256, Claims};
use tether::config::MultiLogin;
use tether::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp, Code};

fn unix_secs() -> u64 {
    tether::unix_ms() / 1000
}

#[tokio::test]
async fn login_ok_reports_the_session() {
    let mut cfg = test_config();
    cfg.node_id = "node-login".into();
    let g = start(cfg).await;
    let mut c = g.client().await;
    let rid = c
        .request(login_req(&token("alice", "phone"), "phone"))
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid, "LoginOk must echo the request id");
    let ok = match f.body {
        Some(Resp::LoginOk(ok)) => ok,
        other => panic!("expected LoginOk, got {other:?}"),
    };
    assert_eq!(ok.user_id, "alice");
    assert_eq!(ok.node_id, "node-login");
    assert_eq!(ok.protocol_version, 1);
    assert_eq!(ok.max_frame_len, 65536);
    assert_eq!(ok.heartbeat_interval_ms, 45_000);
    assert_ne!(ok.session_id, 0);
    let now = tether::unix_ms();
    assert!(
        ok.server_time_ms.abs_diff(now) < 60_000,
        "server time {} is far from {now}",
        ok.server_time_ms
    );
    assert_eq!(g.gw.registry().len(), 1);
    // The session is usable.
    ping_pong(&mut c).await;
}

/// Sends a Login with `token` and asserts the full refusal sequence.
async fn refused_login(g: &TestGateway, token: &str, version: u32, code: Code) {
    let mut c = g.client().await;
    let rid = c
        .request(Req::Login(pb::Login {
            token: token.into(),
            device_id: "phone".into(),
            platform: pb::Platform::Ios as i32,
            protocol_version: version,
            resume: None,
        }))
        .await
        .unwrap();
    expect_refused(&mut c, rid, code).await;
}

#[tokio::test]
async fn expired_token_is_refused() {
    let g = start(test_config()).await;
    let expired = mint_claims(
        SECRET,
        &Claims {
            sub: "alice".into(),
            dev: Some("phone".into()),
            exp: unix_secs() - 3600,
            iat: Some(unix_secs() - 7200),
            rooms: vec![],
        },
    )
    .unwrap();
    refused_login(&g, &expired, 1, Code::TokenExpired).await;
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn token_signed_with_another_secret_is_refused() {
    let g = start(test_config()).await;
    let forged = mint_hs256(
        "another-secret-that-is-long-enough",
        "alice",
        Some("phone"),
        Duration::from_secs(600),
        vec![],
    )
    .unwrap();
    refused_login(&g, &forged, 1, Code::TokenBadSignature).await;
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn malformed_token_is_refused() {
    let g = start(test_config()).await;
    refused_login(&g, "not.a.jwt", 1, Code::TokenMalformed).await;
    refused_login(&g, "garbage-without-dots", 1, Code::TokenMalformed).await;
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn unsupported_protocol_versions_are_refused() {
    let g = start(test_config()).await;
    let t = token("alice", "phone");
    refused_login(&g, &t, 99, Code::UnsupportedVersion).await;
    refused_login(&g, &t, 0, Code::UnsupportedVersion).await;
    g.wait_sessions(0).await;
    // The same token with version 1 is fine.
    let (_c, ok) = g.login("alice", "phone").await;
    assert_eq!(ok.protocol_version, 1);
}

#[tokio::test]
async fn requests_before_login_close_the_connection_and_do_not_run() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;

    let mut c = g.client().await;
    let ping = c.ping().await.unwrap();
    expect_refused(&mut c, ping, Code::NotLoggedIn).await;

    let mut c = g.client().await;
    let send = c.send_up("m-1", "chat.send", "early").await.unwrap();
    expect_refused(&mut c, send, Code::NotLoggedIn).await;

    let mut c = g.client().await;
    let join = c.join("lobby").await.unwrap();
    expect_refused(&mut c, join, Code::NotLoggedIn).await;

    // Nothing reached the upstream: the Send did not run.
    let evs = drain_events(&mut events, QUIET).await;
    assert!(evs.is_empty(), "unexpected events before login: {evs:?}");
    assert_eq!(g.gw.registry().len(), 0);

    // A Login right after a refused request in the same write is not read.
    let mut c = g.client().await;
    let mut bytes = raw_frame(
        &pb::ClientFrame {
            request_id: 1,
            body: Some(Req::Ping(pb::Ping { client_time_ms: 1 })),
        }
        .encode_to_vec(),
    );
    bytes.extend_from_slice(&raw_frame(
        &pb::ClientFrame {
            request_id: 2,
            body: Some(login_req(&token("alice", "phone"), "phone")),
        }
        .encode_to_vec(),
    ));
    c.send_raw(&bytes).await.unwrap();
    expect_refused(&mut c, 1, Code::NotLoggedIn).await;
    assert_eq!(g.gw.registry().len(), 0);

    // A Login on a fresh connection is fine; a second Login on it is refused
    // and the session lives on.
    let mut c = g.client().await;
    let ok = c.login(&token("alice", "phone"), "phone").await.unwrap();
    assert_eq!(ok.user_id, "alice");
    let again = c
        .request(login_req(&token("alice", "phone"), "phone"))
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::AlreadyLoggedIn);
    assert_eq!(f.request_id, again);
    ping_pong(&mut c).await;
    assert_eq!(g.gw.registry().len(), 1);
}

/// A token with the header `header` (JSON) over valid claims, signed HS256.
fn token_with_header(header: &str) -> String {
    let honest = token("alice", "phone");
    let rest = honest.split_once('.').unwrap().1;
    format!("{}.{rest}", b64url(header.as_bytes()))
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[tokio::test]
async fn alg_none_and_unknown_algorithms_are_token_invalid_without_internals() {
    let g = start(test_config()).await;
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"XS999","typ":"JWT"}"#,
        r#"{"alg":"HS512","typ":"JWT"}"#,
    ] {
        let mut c = g.client().await;
        let rid = c
            .request(login_req(&token_with_header(header), "phone"))
            .await
            .unwrap();
        let f = next(&mut c).await;
        let Some(Resp::Error(e)) = &f.body else {
            panic!("{header}: expected an Error, got {f:?}")
        };
        assert_eq!(
            (f.request_id, Code::try_from(e.code).unwrap()),
            (rid, Code::TokenInvalid),
            "{header}: {e:?}"
        );
        // Neither the library's list of algorithms nor its parser's words.
        for leak in ["HS256", "RS256", "EdDSA", "variant", "expected", "column"] {
            assert!(!e.message.contains(leak), "{header}: {:?}", e.message);
        }
        let f = next(&mut c).await;
        assert_eq!(close_of(&f), Code::TokenInvalid);
        expect_eof(&mut c).await;
    }
    g.wait_sessions(0).await;
}

/// A token of `user` for `device` expiring `secs` seconds from now.
fn token_for(user: &str, device: &str, secs: u64) -> String {
    mint_hs256(
        SECRET,
        user,
        Some(device),
        Duration::from_secs(secs),
        vec![],
    )
    .unwrap()
}

fn refresh(token: &str) -> Req {
    Req::Refresh(pb::Refresh {
        token: token.into(),
    })
}

#[tokio::test]
async fn refresh_keeps_the_session_alive_past_the_first_tokens_exp() {
    let mut cfg = test_config();
    // No grace: the sessions end at their tokens' exp.
    cfg.auth.leeway = Duration::ZERO;
    let g = start(cfg).await;

    // `kept` refreshes its 2 s token at once; `control` does not, and its
    // token expires a second after kept's first one.
    let mut kept = g.client().await;
    let ok = kept
        .login(&token_for("alice", "phone", 2), "phone")
        .await
        .unwrap();
    let exp_ms = (unix_secs() + 2) * 1000;
    assert!(ok.token_exp_ms.abs_diff(exp_ms) <= 1000, "{ok:?}");
    let mut control = g.client().await;
    control
        .login(&token_for("bob", "phone", 3), "phone")
        .await
        .unwrap();

    let rid = kept
        .request(refresh(&token_for("alice", "phone", 600)))
        .await
        .unwrap();
    let f = next(&mut kept).await;
    assert_eq!(f.request_id, rid);
    let Some(Resp::RefreshOk(r)) = &f.body else {
        panic!("expected RefreshOk, got {f:?}")
    };
    assert!(r.token_exp_ms / 1000 >= unix_secs() + 590, "{r:?}");

    // The control session is closed when its token runs out...
    assert_eq!(expect_closed(&mut control).await, Code::TokenExpired);
    // ...by when kept's first token had expired too: kept lives on.
    ping_pong(&mut kept).await;
    g.wait_sessions(1).await;
}

#[tokio::test]
async fn a_resumed_session_is_bounded_by_the_resume_logins_token() {
    let mut cfg = test_config();
    cfg.auth.leeway = Duration::ZERO;
    let g = start(cfg).await;
    let mut first = g.client().await;
    let ok = first
        .login(&token_for("alice", "phone", 600), "phone")
        .await
        .unwrap();
    drop(first);

    // The resume presents a token that runs out in 2 s.
    let mut c = g.client().await;
    let resumed = c
        .login_with(pb::Login {
            token: token_for("alice", "phone", 2),
            device_id: "phone".into(),
            platform: pb::Platform::Desktop as i32,
            protocol_version: 1,
            resume: Some(pb::Resume {
                session_id: ok.session_id,
                resume_token: ok.resume_token.clone(),
                last_seq: 0,
                last_bulk_seq: 0,
            }),
        })
        .await
        .unwrap();
    assert_eq!(resumed.session_id, ok.session_id, "{resumed:?}");
    assert_eq!(resumed.resume.map(|r| r.code), Some(Code::Ok as i32));
    let exp_ms = (unix_secs() + 2) * 1000;
    assert!(resumed.token_exp_ms.abs_diff(exp_ms) <= 1000, "{resumed:?}");
    assert_eq!(expect_closed(&mut c).await, Code::TokenExpired);
}

#[tokio::test]
async fn refresh_with_another_users_or_devices_token_is_refused() {
    let g = start(test_config()).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let rid = c
        .request(refresh(&token_for("bob", "phone", 600)))
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!((f.request_id, error_of(&f)), (rid, Code::TokenInvalid));
    let rid = c
        .request(refresh(&token_for("alice", "tablet", 600)))
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!((f.request_id, error_of(&f)), (rid, Code::DeviceMismatch));
    // The session goes on under its first token.
    ping_pong(&mut c).await;
}

#[tokio::test]
async fn second_login_of_a_device_replaces_the_first() {
    let g = start(test_config()).await;
    let (mut old, old_ok) = g.login("alice", "phone").await;
    let (mut tablet, _) = g.login("alice", "tablet").await;
    let (mut new, new_ok) = g.login("alice", "phone").await;
    assert_ne!(old_ok.session_id, new_ok.session_id);

    let f = next(&mut old).await;
    assert_eq!(close_of(&f), Code::Replaced);
    expect_eof(&mut old).await;
    drop(old);
    g.wait_sessions(2).await;

    // The other device and the new session both still receive pushes.
    let (up, _) = g.upstream(false).await;
    let r = up.push_user("alice", "after-replace").await.unwrap();
    assert_eq!(r.sessions, 2);
    for c in [&mut tablet, &mut new] {
        let f = next(c).await;
        assert_eq!(&push_of(&f).payload[..], b"after-replace");
        assert_eq!(push_of(&f).message_id, r.message_id);
    }
}

#[tokio::test]
async fn single_login_replaces_every_older_session() {
    let mut cfg = test_config();
    cfg.session.multi_login = MultiLogin::Single;
    let g = start(cfg).await;
    let (mut phone, _) = g.login("alice", "phone").await;
    let (mut tablet, _) = g.login("alice", "tablet").await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let (mut laptop, _) = g.login("alice", "laptop").await;

    for c in [&mut phone, &mut tablet] {
        let f = next(c).await;
        assert_eq!(close_of(&f), Code::Replaced);
        expect_eof(c).await;
    }
    drop((phone, tablet));
    g.wait_sessions(2).await;

    let (up, _) = g.upstream(false).await;
    let r = up.push_user("alice", "only-laptop").await.unwrap();
    assert_eq!(r.sessions, 1);
    let f = next(&mut laptop).await;
    assert_eq!(&push_of(&f).payload[..], b"only-laptop");
    // Another user is untouched.
    expect_silence(&mut bob, QUIET).await;
    ping_pong(&mut bob).await;
}

#[tokio::test]
async fn device_bound_token_refuses_another_device() {
    let g = start(test_config()).await;
    let mut c = g.client().await;
    let rid = c
        .request(login_req(&token("alice", "phone"), "tablet"))
        .await
        .unwrap();
    expect_refused(&mut c, rid, Code::DeviceMismatch).await;
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn client_join_off_and_room_cap() {
    let mut cfg = test_config();
    cfg.session.client_join = tether::config::ClientJoin::Off;
    let g = start(cfg).await;
    let (mut c, _) = g.login_rooms("alice", "phone", &["lobby"]).await;
    let rid = c.join("lobby").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::Unsupported);
    assert_eq!(f.request_id, rid);

    let mut cfg = test_config();
    cfg.session.client_join = tether::config::ClientJoin::Any;
    cfg.session.max_rooms = 2;
    let g = start(cfg).await;
    let (mut c, _) = g.login("alice", "phone").await;
    for room in ["a", "b"] {
        let rid = c.join(room).await.unwrap();
        let f = next(&mut c).await;
        assert_eq!(f.request_id, rid);
        assert!(matches!(f.body, Some(Resp::RoomOk(ref ok)) if ok.joined && ok.room == room));
    }
    let rid = c.join("c").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::TooManyRooms);
    assert_eq!(f.request_id, rid);
    ping_pong(&mut c).await;
}
