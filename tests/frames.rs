//! Hostile framing: oversized length prefixes and undecodable bodies.

mod common;

use std::time::Duration;

use common::*;
use prost::Message;
use tether::client::Client;
use tether::wire::pb::{self, Code};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_frame_closes_only_that_client() {
    let g = start(test_config()).await;
    let mut others: Vec<Client> = Vec::with_capacity(100);
    for i in 0..100 {
        others.push(g.login(&format!("user-{i}"), "phone").await.0);
    }
    let (mut bad, _) = g.login("mallory", "phone").await;
    assert_eq!(g.gw.registry().len(), 101);

    // A length prefix one above limits.max_frame (65536), and nothing else.
    bad.send_raw(&65537u32.to_be_bytes()).await.unwrap();
    let f = next(&mut bad).await;
    assert_eq!(close_of(&f), Code::FrameTooLarge);
    expect_eof(&mut bad).await;
    drop(bad);
    g.wait_sessions(100).await;

    let (up, _) = g.upstream(false).await;
    let r = up
        .push(pb::PushRequest {
            target: Some(pb::push_request::Target::Everyone(true)),
            payload: b"still-alive".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.sessions, 100);
    assert_eq!(r.dropped, 0);
    for (i, c) in others.iter_mut().enumerate() {
        let f = next(c).await;
        let p = push_of(&f);
        assert_eq!(&p.payload[..], b"still-alive", "client {i}");
        assert_eq!(p.message_id, r.message_id, "client {i}");
        assert_eq!(p.seq, 1, "client {i}");
    }
}

#[tokio::test]
async fn oversized_frame_before_login_is_refused() {
    let g = start(test_config()).await;
    let mut c = g.client().await;
    c.send_raw(&u32::MAX.to_be_bytes()).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(close_of(&f), Code::FrameTooLarge);
    expect_eof(&mut c).await;
}

#[tokio::test]
async fn frame_at_the_limit_is_accepted() {
    let g = start(test_config()).await;
    let (mut c, _) = g.login("alice", "phone").await;
    // A Ping padded with an unknown field to exactly 65536 bytes.
    let mut body = pb::ClientFrame {
        request_id: 9,
        body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 1 })),
    }
    .encode_to_vec();
    // Unknown field 15, length-delimited: tag, 3-byte varint length, filler.
    let filler = 65536 - body.len() - 1 - 3;
    body.push((15 << 3) | 2);
    prost::encoding::encode_varint(filler as u64, &mut body);
    body.resize(65536, b'x');
    assert_eq!(body.len(), 65536);
    c.send_raw(&raw_frame(&body)).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .unwrap()
        .expect("connection closed");
    assert_eq!(f.request_id, 9);
    assert!(
        matches!(f.body, Some(pb::server_frame::Body::Pong(ref p)) if p.client_time_ms == 1),
        "{f:?}"
    );
}

#[tokio::test]
async fn garbage_inside_a_valid_prefix_is_bad_frame() {
    let g = start(test_config()).await;
    let (mut c, _) = g.login("alice", "phone").await;

    // Not a protobuf ClientFrame at all (a truncated varint tag).
    c.send_raw(&raw_frame(&[0xff, 0xff, 0xff])).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadFrame);
    assert_eq!(f.request_id, 0);
    ping_pong(&mut c).await;

    // An empty ClientFrame: a request id but no body.
    let empty = pb::ClientFrame {
        request_id: 42,
        body: None,
    };
    c.send_raw(&raw_frame(&empty.encode_to_vec()))
        .await
        .unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadFrame);
    assert_eq!(f.request_id, 42, "the request id is echoed when readable");
    ping_pong(&mut c).await;

    // A zero-length frame is an empty ClientFrame too.
    c.send_raw(&raw_frame(&[])).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadFrame);
    ping_pong(&mut c).await;

    // Garbage followed by a valid Ping in the same write: both are handled.
    let mut bytes = raw_frame(&[0x0a, 0x80]); // field 1 length-delimited, bad length
    let ping = pb::ClientFrame {
        request_id: 77,
        body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 5 })),
    };
    bytes.extend_from_slice(&raw_frame(&ping.encode_to_vec()));
    c.send_raw(&bytes).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(error_of(&f), Code::BadFrame);
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.request_id, 77);
    assert!(
        matches!(f.body, Some(pb::server_frame::Body::Pong(_))),
        "{f:?}"
    );

    // Still logged in and reachable.
    assert_eq!(g.gw.registry().len(), 1);
    let (up, _) = g.upstream(false).await;
    assert_eq!(up.push_user("alice", "ok").await.unwrap().sessions, 1);
    assert_eq!(&push_of(&next(&mut c).await).payload[..], b"ok");
}

#[tokio::test]
async fn garbage_before_login_closes_the_connection() {
    let g = start(test_config()).await;
    let mut c = g.client().await;
    c.send_raw(&raw_frame(b"\xff\xfe garbage")).await.unwrap();
    expect_refused(&mut c, 0, Code::BadFrame).await;

    // A frame without a body: its request id is echoed, then the close.
    let mut c = g.client().await;
    let empty = pb::ClientFrame {
        request_id: 3,
        body: None,
    };
    c.send_raw(&raw_frame(&empty.encode_to_vec()))
        .await
        .unwrap();
    expect_refused(&mut c, 3, Code::BadFrame).await;
    assert_eq!(g.gw.registry().len(), 0);
}

/// Reads `c` until the gateway closes it; returns the frames it sent.
/// Panics if the connection is still open after `within`.
async fn frames_until_closed(c: &mut Client, within: Duration) -> Vec<pb::ServerFrame> {
    let deadline = tokio::time::Instant::now() + within;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_timeout(left).await {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return frames,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => panic!(
                "still open after {within:?}, {} frames received",
                frames.len()
            ),
            // A reset is the gateway closing too.
            Err(_) => return frames,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_before_login_are_closed_at_once() {
    let g = start(test_config()).await;
    // 100 connections that each send 4,096 zero-length frames and no Login.
    let flood = raw_frame(&[]).repeat(4096);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let flood = flood.clone();
        let mut c = g.client().await;
        tasks.push(tokio::spawn(async move {
            c.send_raw(&flood).await.unwrap();
            // Generous: this waits for the close, it does not time it.
            frames_until_closed(&mut c, Duration::from_secs(30)).await
        }));
    }
    for t in tasks {
        let frames = t.await.unwrap();
        // The first frame is refused, the connection closes with its code,
        // and the other 4,095 are never answered.
        assert_eq!(
            frames.len(),
            2,
            "expected Error and Close, got {} frames, starting {:?}",
            frames.len(),
            &frames[..frames.len().min(3)]
        );
        assert_eq!(error_of(&frames[0]), Code::BadFrame);
        assert_eq!(close_of(&frames[1]), Code::BadFrame);
    }
    assert_eq!(g.gw.registry().len(), 0);
}

#[tokio::test]
async fn a_run_of_invalid_frames_after_login_closes_at_the_bound() {
    let g = start(test_config()).await;
    let (mut c, _) = g.login("mallory", "phone").await;
    c.send_raw(&raw_frame(&[]).repeat(4096)).await.unwrap();
    let frames = frames_until_closed(&mut c, Duration::from_secs(30)).await;
    let bound = usize::from(tether::session::MAX_INVALID_FRAMES);
    assert_eq!(frames.len(), bound + 1, "{bound} errors, then the close");
    for f in &frames[..bound] {
        assert_eq!(error_of(f), Code::BadFrame);
    }
    assert_eq!(close_of(&frames[bound]), Code::BadFrame);
    g.wait_sessions(0).await;
}

#[tokio::test]
async fn pipelined_requests_all_get_answers_in_order() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let _ = drain_events(&mut events, Duration::from_millis(50)).await;

    // 500 Pings and 300 Sends in one write: far more than the gateway keeps
    // pending before it stops reading, so it must resume after flushing.
    let mut bytes = Vec::new();
    for i in 0..800u64 {
        let body = if i % 8 < 3 {
            pb::client_frame::Body::Send(pb::Send {
                client_msg_id: format!("c-{i}"),
                route: "r".into(),
                payload: vec![1u8; 16].into(),
            })
        } else {
            pb::client_frame::Body::Ping(pb::Ping { client_time_ms: i })
        };
        bytes.extend_from_slice(&raw_frame(
            &pb::ClientFrame {
                request_id: 1000 + i,
                body: Some(body),
            }
            .encode_to_vec(),
        ));
    }
    c.send_raw(&bytes).await.unwrap();
    for i in 0..800u64 {
        let f = c
            .recv_timeout(Duration::from_secs(3))
            .await
            .unwrap_or_else(|e| panic!("answer {i}: {e}"))
            .expect("connection closed");
        assert_eq!(f.request_id, 1000 + i, "answers out of order");
        match f.body {
            Some(pb::server_frame::Body::Pong(p)) => {
                assert!(i % 8 >= 3);
                assert_eq!(p.client_time_ms, i);
            }
            Some(pb::server_frame::Body::SendAck(a)) => {
                assert!(i % 8 < 3);
                assert_eq!(a.code, Code::Ok as i32);
                assert_eq!(a.client_msg_id, format!("c-{i}"));
            }
            other => panic!("answer {i}: {other:?}"),
        }
    }
    let evs = drain_events(&mut events, Duration::from_millis(300)).await;
    let uplinks: Vec<String> = evs
        .iter()
        .filter_map(|e| match e {
            pb::event::Kind::Uplink(u) => Some(u.client_msg_id.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..800u64)
        .filter(|i| i % 8 < 3)
        .map(|i| format!("c-{i}"))
        .collect();
    assert_eq!(uplinks, expected);
}

#[tokio::test]
async fn out_of_range_fields_are_bad_request() {
    let g = start(test_config()).await;
    let (_up, mut events) = g.upstream(true).await;
    let (mut c, _) = g.login("alice", "phone").await;
    let _ = drain_events(&mut events, Duration::from_millis(50)).await;

    // Empty client_msg_id.
    let rid = c.send_up("", "r", &b"x"[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadRequest);
    assert_eq!(f.request_id, rid);
    // Route longer than 128 bytes.
    let route = "r".repeat(129);
    let rid = c.send_up("ok-id", &route, &b"x"[..]).await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadRequest);
    assert_eq!(f.request_id, rid);
    // Empty room name.
    let rid = c.join("").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(error_of(&f), Code::BadRequest);
    assert_eq!(f.request_id, rid);

    // None of them ran, and the session is fine.
    let evs = drain_events(&mut events, QUIET).await;
    assert!(evs.is_empty(), "{evs:?}");
    ping_pong(&mut c).await;
}

#[tokio::test]
async fn configured_max_frame_is_enforced_and_announced() {
    let mut cfg = test_config();
    cfg.limits.max_frame = 1024;
    let g = start(cfg).await;
    let (mut c, ok) = g.login("alice", "phone").await;
    assert_eq!(ok.max_frame_len, 1024);
    // 1024 is fine...
    let mut body = pb::ClientFrame {
        request_id: 5,
        body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 1 })),
    }
    .encode_to_vec();
    let filler = 1024 - body.len() - 1 - 2;
    body.push((15 << 3) | 2);
    prost::encoding::encode_varint(filler as u64, &mut body);
    body.resize(1024, 0);
    c.send_raw(&raw_frame(&body)).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(f.request_id, 5);
    // ...1025 is not, even with the body never sent.
    c.send_raw(&1025u32.to_be_bytes()).await.unwrap();
    assert_eq!(close_of(&next(&mut c).await), Code::FrameTooLarge);
    expect_eof(&mut c).await;
}
