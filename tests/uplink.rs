//! Uplinks and session events at the upstream.

mod common;

use std::time::Duration;

use common::*;
use tether::wire::pb::{self, client_frame::Body as Req, server_frame::Body as Resp, Code};

const EV: Duration = Duration::from_secs(2);

#[tokio::test]
async fn send_reaches_subscriber_and_is_acked() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut c, ok) = g.login("alice", "phone").await;

    // SessionOpened on login.
    let opened = match next_event(&mut events, EV).await {
        pb::event::Kind::Opened(o) => o,
        other => panic!("expected SessionOpened, got {other:?}"),
    };
    let s = opened.session.expect("session info");
    assert_eq!(s.user_id, "alice");
    assert_eq!(s.device_id, "phone");
    assert_eq!(s.session_id, ok.session_id);
    assert_eq!(s.node_id, "node-1");
    assert_eq!(s.transport, "tcp");
    assert_eq!(s.platform, pb::Platform::Desktop as i32);
    let local = opened.remote_addr;
    assert!(local.starts_with("127.0.0.1:"), "remote addr {local}");

    let rid = c
        .send_up("cm-1", "chat.send", &b"hello upstream"[..])
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid, "SendAck must echo the request id");
    let ack = match f.body {
        Some(Resp::SendAck(a)) => a,
        other => panic!("expected SendAck, got {other:?}"),
    };
    assert_eq!(ack.code, Code::Ok as i32);
    assert_eq!(ack.client_msg_id, "cm-1");
    assert_ne!(ack.server_msg_id, 0);

    let up = match next_event(&mut events, EV).await {
        pb::event::Kind::Uplink(u) => u,
        other => panic!("expected Uplink, got {other:?}"),
    };
    let s = up.session.expect("session info");
    assert_eq!(
        (s.user_id.as_str(), s.device_id.as_str(), s.session_id),
        ("alice", "phone", ok.session_id)
    );
    assert_eq!(up.client_msg_id, "cm-1");
    assert_eq!(up.route, "chat.send");
    assert_eq!(&up.payload[..], b"hello upstream");
    assert_eq!(up.server_msg_id, ack.server_msg_id);
    assert!(up.received_ms > 0);

    // A second send gets a different server id.
    let rid2 = c.send_up("cm-2", "", &b""[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid2);
    let ack2 = match f.body {
        Some(Resp::SendAck(a)) => a,
        other => panic!("expected SendAck, got {other:?}"),
    };
    assert_eq!(ack2.code, Code::Ok as i32);
    assert_ne!(ack2.server_msg_id, ack.server_msg_id);
    let up2 = match next_event(&mut events, EV).await {
        pb::event::Kind::Uplink(u) => u,
        other => panic!("expected Uplink, got {other:?}"),
    };
    assert_eq!(up2.client_msg_id, "cm-2");
    assert_eq!(up2.server_msg_id, ack2.server_msg_id);

    // SessionClosed when the client says goodbye.
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
    let f = next(&mut c).await;
    assert_eq!(close_of(&f), Code::NormalClose);
    expect_eof(&mut c).await;
    drop(c);
    let closed = match next_event(&mut events, EV).await {
        pb::event::Kind::Closed(c) => c,
        other => panic!("expected SessionClosed, got {other:?}"),
    };
    assert_eq!(closed.session.unwrap().session_id, ok.session_id);
    assert_eq!(closed.code, Code::NormalClose as i32);
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn session_closed_event_when_the_client_disconnects() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (c, ok) = g.login("bob", "tablet").await;
    let o = match next_event(&mut events, EV).await {
        pb::event::Kind::Opened(o) => o,
        other => panic!("expected SessionOpened, got {other:?}"),
    };
    assert_eq!(o.session.unwrap().session_id, ok.session_id);
    drop(c); // hang up without a Close frame
    let closed = match next_event(&mut events, EV).await {
        pb::event::Kind::Closed(c) => c,
        other => panic!("expected SessionClosed, got {other:?}"),
    };
    let s = closed.session.unwrap();
    assert_eq!(
        (s.user_id.as_str(), s.device_id.as_str(), s.session_id),
        ("bob", "tablet", ok.session_id)
    );
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn send_without_subscriber_is_upstream_unavailable() {
    let g = start(test_config()).await;
    // An upstream that does not subscribe does not take uplinks.
    let (_up, _) = g.upstream(false).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let rid = c.send_up("cm-1", "chat.send", &b"x"[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid);
    match f.body {
        Some(Resp::SendAck(a)) => {
            assert_eq!(a.code, Code::UpstreamUnavailable as i32);
            assert_eq!(a.server_msg_id, 0);
            assert_eq!(a.client_msg_id, "cm-1");
        }
        other => panic!("expected SendAck, got {other:?}"),
    }
    // The session lives on.
    ping_pong(&mut c).await;

    // Once a subscriber is connected the same send goes through.
    let (_sub, mut events) = g.upstream(true).await;
    let rid = c.send_up("cm-2", "chat.send", &b"y"[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(f.request_id, rid);
    assert!(
        matches!(f.body, Some(Resp::SendAck(ref a)) if a.code == Code::Ok as i32 && a.server_msg_id != 0),
        "{f:?}"
    );
    let u = wait_event(&mut events, EV, |e| match e {
        pb::event::Kind::Uplink(u) => Some(u.clone()),
        _ => None,
    })
    .await;
    assert_eq!(u.client_msg_id, "cm-2");
}
