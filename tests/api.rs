//! The HTTP API on the admin listener over real sockets: every route with
//! its JSON, the same refusals as the upstream socket, the key check, each
//! bad request, sessions unharmed by abuse of the API, the OpenAPI document
//! against the router and the handlers, `TETHER_API_KEYS` in `tether serve`,
//! and a push and a presence across two nodes of a cluster.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http::{get, post, request};
use common::nats::NatsServer;
use common::*;
use serde_json::{json, Value};
use tether::wire::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "test-api-key-0123456789";

/// A gateway and its admin listener with [`KEY`] and a 4 KiB body bound.
async fn gateway() -> (TestGateway, SocketAddr, tokio_util::sync::DropGuard) {
    exporter();
    let g = start(test_config()).await;
    let (addr, guard) = start_admin(&g, &[KEY], 4096, admin_limits(Duration::from_secs(2))).await;
    (g, addr, guard)
}

fn payload_of(p: &pb::Push) -> &[u8] {
    &p.payload[..]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_reaches_each_kind_of_target() {
    let (g, addr, _admin) = gateway().await;
    let (mut ann, _) = g.login("ann", "phone").await;
    let (mut ann_tab, _) = g.login("ann", "tablet").await;
    let (mut bob, _) = g.login("bob", "phone").await;
    let r = post(
        addr,
        "/api/v1/rooms/add",
        KEY,
        &json!({"room": "lobby", "user_ids": ["bob"]}),
    )
    .await;
    assert_eq!(r.json()["sessions"], 1);

    // A user: both of ann's devices; the text payload as its bytes.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"user": "ann"}, "payload": "héllo", "message_id": "m-1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        r.json(),
        json!({"message_id": "m-1", "sessions": 2, "dropped": 0, "failed": [], "undelivered": []})
    );
    for c in [&mut ann, &mut ann_tab] {
        let p = push_within(c, Duration::from_secs(5), "to ann").await;
        assert_eq!(payload_of(&p), "héllo".as_bytes());
        assert_eq!(p.message_id, "m-1");
    }

    // One device; bytes as base64, on the bulk lane.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"device": {"user_id": "ann", "device_id": "tablet"}}, "payload_base64": "AAEC/w==", "lane": "bulk"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["sessions"], 1);
    assert!(
        !v["message_id"].as_str().unwrap().is_empty(),
        "assigned: {v}"
    );
    let p = push_within(&mut ann_tab, Duration::from_secs(5), "to the tablet").await;
    assert_eq!(payload_of(&p), [0, 1, 2, 255]);
    assert_eq!(p.lane, pb::Lane::Bulk as i32);
    expect_silence(&mut ann, QUIET).await;

    // A list of users, one of them offline: reported with its code.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"users": ["bob", "nobody"]}, "payload": "to the list"}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["sessions"], 1);
    assert_eq!(
        v["undelivered"],
        json!([{"user_id": "nobody", "code": "CODE_NOT_LOGGED_IN", "number": 1003}])
    );
    push_within(&mut bob, Duration::from_secs(5), "to the list").await;

    // A room.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"room": "lobby"}, "payload": "to the room"}),
    )
    .await;
    assert_eq!(r.json()["sessions"], 1);
    let p = push_within(&mut bob, Duration::from_secs(5), "to the room").await;
    assert_eq!(p.room, "lobby");

    // Everyone.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": "everyone", "payload": "to all"}),
    )
    .await;
    assert_eq!(r.json()["sessions"], 3);
    for c in [&mut ann, &mut ann_tab, &mut bob] {
        let p = push_within(c, Duration::from_secs(5), "to all").await;
        assert_eq!(payload_of(&p), b"to all");
    }
}

/// `report_undelivered` and `report_delivery` do what they do on the
/// upstream socket: events to the subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_flags_emit_the_upstream_events() {
    let (g, addr, _admin) = gateway().await;
    let (_sub, mut events) = g.upstream(true).await;
    let (mut ann, _) = g.login("ann", "phone").await;
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"users": ["ann", "ghost"]}, "payload": "x", "message_id": "rep-1",
                "report_undelivered": true, "report_delivery": true}),
    )
    .await;
    assert_eq!(r.status, 200);
    let u = wait_event(&mut events, Duration::from_secs(5), |k| match k {
        pb::event::Kind::Undelivered(u) => Some(u.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (u.user_id.as_str(), u.message_id.as_str()),
        ("ghost", "rep-1")
    );
    assert_eq!(u.code, pb::Code::NotLoggedIn as i32);
    let p = push_within(&mut ann, Duration::from_secs(5), "reported push").await;
    ann.ack(p.seq).await.unwrap();
    let d = wait_event(&mut events, Duration::from_secs(5), |k| match k {
        pb::event::Kind::Delivery(d) => Some(d.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (d.message_id.as_str(), d.code),
        ("rep-1", pb::Code::Ok as i32)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_rooms_and_presence() {
    let (g, addr, _admin) = gateway().await;
    let (mut ann, _) = g.login("ann", "phone").await;
    let (mut ann_tab, _) = g.login("ann", "tablet").await;
    let (mut bob, _) = g.login("bob", "phone").await;

    // Presence: each device with its node and transport.
    let r = post(
        addr,
        "/api/v1/presence",
        KEY,
        &json!({"user_ids": ["ann", "bob", "nobody"]}),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["failed"], json!([]));
    let users = v["users"].as_array().unwrap();
    let ann_p = users
        .iter()
        .find(|u| u["user_id"] == "ann")
        .expect("ann is online");
    let mut devices: Vec<&str> = ann_p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    devices.sort_unstable();
    assert_eq!(devices, ["phone", "tablet"]);
    let d = &ann_p["devices"][0];
    assert_eq!(d["node_id"], "node-1");
    assert_eq!(d["transport"], "tcp");
    assert_eq!(d["platform"], "PLATFORM_DESKTOP");
    assert!(d["session_id"].as_u64().unwrap() > 0 && d["since_ms"].as_u64().unwrap() > 0);
    let nobody = users.iter().find(|u| u["user_id"] == "nobody");
    assert_eq!(nobody.unwrap()["devices"], json!([]), "{v}");

    // Rooms: add, push to the room, remove, push again.
    let r = post(
        addr,
        "/api/v1/rooms/add",
        KEY,
        &json!({"room": "ops", "user_ids": ["ann", "bob"]}),
    )
    .await;
    assert_eq!(r.json(), json!({"sessions": 3, "failed": []}));
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"room": "ops"}, "payload": "r1"}),
    )
    .await;
    assert_eq!(r.json()["sessions"], 3);
    for c in [&mut ann, &mut ann_tab, &mut bob] {
        push_within(c, Duration::from_secs(5), "r1").await;
    }
    let r = post(
        addr,
        "/api/v1/rooms/remove",
        KEY,
        &json!({"room": "ops", "user_ids": ["bob"]}),
    )
    .await;
    assert_eq!(r.json(), json!({"sessions": 1, "failed": []}));
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"room": "ops"}, "payload": "r2"}),
    )
    .await;
    assert_eq!(r.json()["sessions"], 2);
    expect_silence(&mut bob, QUIET).await;

    // Kick one device, with a code the client sees.
    let r = post(
        addr,
        "/api/v1/kick",
        KEY,
        &json!({"user_id": "ann", "device_id": "tablet", "reason": "lost tablet"}),
    )
    .await;
    assert_eq!(r.json(), json!({"sessions": 1, "failed": []}));
    assert_eq!(expect_closed(&mut ann_tab).await, pb::Code::Kicked);
    g.wait_sessions(2).await;
    // Kick a user: every device left.
    let r = post(
        addr,
        "/api/v1/kick",
        KEY,
        &json!({"user_id": "ann", "code": "CODE_TOKEN_EXPIRED"}),
    )
    .await;
    assert_eq!(r.json(), json!({"sessions": 1, "failed": []}));
    assert_eq!(expect_closed(&mut ann).await, pb::Code::TokenExpired);
    // An unknown code name is a bad request, not a guess.
    let r = post(
        addr,
        "/api/v1/kick",
        KEY,
        &json!({"user_id": "bob", "code": "CODE_NOPE"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "CODE_BAD_REQUEST");
}

/// A request the upstream socket refuses is refused here with the same
/// code and message (the same validation code runs), as 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_the_upstream_sockets() {
    let (g, addr, _admin) = gateway().await;
    let (up, _events) = g.upstream(false).await;
    let long = "x".repeat(129);
    let cases: Vec<(Value, pb::PushRequest)> = vec![
        (
            json!({"target": {"user": ""}}),
            pb::PushRequest {
                target: Some(pb::push_request::Target::UserId(String::new())),
                ..Default::default()
            },
        ),
        (
            json!({"target": {"room": long}}),
            pb::PushRequest {
                target: Some(pb::push_request::Target::Room(long.clone())),
                ..Default::default()
            },
        ),
        (
            json!({"target": {"user": "a"}, "message_id": long}),
            pb::PushRequest {
                target: Some(pb::push_request::Target::UserId("a".into())),
                message_id: long.clone(),
                ..Default::default()
            },
        ),
        (
            json!({"target": {"device": {"user_id": "a", "device_id": ""}}}),
            pb::PushRequest {
                target: Some(pb::push_request::Target::Device(pb::DeviceTarget {
                    user_id: "a".into(),
                    device_id: String::new(),
                })),
                ..Default::default()
            },
        ),
    ];
    for (body, req) in cases {
        let r = post(addr, "/api/v1/push", KEY, &body).await;
        let Err(tether::upstream::ClientError::Refused { code, message }) = up.push(req).await
        else {
            panic!("the upstream socket took {body}");
        };
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(
            r.json(),
            json!({"code": code.as_str_name(), "number": code as i32, "message": message}),
            "{body}"
        );
        assert_eq!(code, pb::Code::BadRequest);
    }
    let r = post(
        addr,
        "/api/v1/rooms/add",
        KEY,
        &json!({"room": "", "user_ids": ["a"]}),
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.json()["number"].as_i64()),
        (400, Some(1005))
    );
    let r = post(addr, "/api/v1/presence", KEY, &json!({"user_ids": [""]})).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["code"].as_str()),
        (400, Some("CODE_BAD_REQUEST"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_checked() {
    let (_g, addr, _admin) = gateway().await;
    let body = json!({"user_ids": ["a"]});
    let bytes = serde_json::to_vec(&body).unwrap();
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[("authorization", "Bearer wrong-key-0123456789")],
        &[("authorization", "Bearer test-api-key-012345678")],
        &[("authorization", "Basic dGVzdDp0ZXN0")],
        &[("authorization", "test-api-key-0123456789")],
    ];
    for headers in cases {
        let r = request(addr, "POST", "/api/v1/presence", headers, bytes.clone()).await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"tether\"")
        );
        let v = r.json();
        assert_eq!(v["code"], "CODE_UPSTREAM_AUTH_FAILED");
        assert_eq!(v["number"], 2006);
    }
    // The scheme is case-insensitive.
    let r = request(
        addr,
        "POST",
        "/api/v1/presence",
        &[("authorization", "bearer test-api-key-0123456789")],
        bytes,
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Wrong keys from one address past a budget (10 at once, then one a
/// second) are refused after a second with 429 and `CODE_RATE_LIMITED`,
/// as the upstream socket holds back a wrong secret; the right key is
/// never held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_keys_past_a_budget_are_held_back() {
    let (_g, addr, _admin) = gateway().await;
    let body = json!({"user_ids": ["a"]});
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = post(addr, "/api/v1/presence", "wrong-key-0123456789", &body).await;
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [401; 10]);
    let t0 = Instant::now();
    let r = post(addr, "/api/v1/presence", "wrong-key-0123456789", &body).await;
    let took = t0.elapsed();
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["code"], "CODE_RATE_LIMITED");
    assert_eq!(r.json()["number"], 3000);
    assert!(took >= Duration::from_millis(950), "{took:?}");
    let t0 = Instant::now();
    let r = post(addr, "/api/v1/presence", KEY, &body).await;
    assert_eq!(r.status, 200);
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
}

/// No key configured: the API is off (403), `/metrics` and the status page
/// are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_api_is_off_and_the_rest_works() {
    exporter();
    let g = start(test_config()).await;
    let (addr, _admin) = start_admin(&g, &[], 4096, admin_limits(Duration::from_secs(2))).await;
    let r = post(addr, "/api/v1/push", KEY, &json!({"target": "everyone"})).await;
    assert_eq!(r.status, 403);
    let v = r.json();
    assert_eq!(v["code"], "CODE_UNSUPPORTED");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no API keys configured"),
        "{v}"
    );
    assert_eq!(get(addr, "/metrics").await.status, 200);
    assert_eq!(get(addr, "/status.json").await.status, 200);
    assert_eq!(get(addr, "/").await.status, 200);
    let head = request(addr, "HEAD", "/", &[], "").await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "HEAD has no body");
    assert_eq!(get(addr, "/nothing").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status() {
    let (_g, addr, _admin) = gateway().await;
    let auth = format!("Bearer {KEY}");
    let json_headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];

    // Bad JSON, and an unknown field (named).
    let r = request(addr, "POST", "/api/v1/push", &json_headers, "{\"target\":").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "CODE_BAD_REQUEST");
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": "everyone", "payloadd": "x"}),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"].as_str().unwrap().contains("payloadd"),
        "{:?}",
        r.json()
    );
    let r = post(
        addr,
        "/api/v1/presence",
        KEY,
        &json!({"user_ids": ["a"], "extra": 1}),
    )
    .await;
    assert_eq!(r.status, 400);
    // Both payload forms, or bad base64.
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": "everyone", "payload": "a", "payload_base64": "YQ=="}),
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": "everyone", "payload_base64": "%%%"}),
    )
    .await;
    assert_eq!(r.status, 400);

    // Oversized: declared, and sent without a length (chunked).
    let big = vec![b' '; 5000];
    let r = request(addr, "POST", "/api/v1/push", &json_headers, big.clone()).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["code"], "CODE_FRAME_TOO_LARGE");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..5 {
        s.write_all(b"3e8\r\n").await.unwrap();
        s.write_all(&[b' '; 1000]).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Another content type.
    let r = request(
        addr,
        "POST",
        "/api/v1/presence",
        &[("authorization", &auth), ("content-type", "text/plain")],
        "{\"user_ids\":[]}",
    )
    .await;
    assert_eq!(r.status, 415);

    // Wrong method, unknown route.
    let r = request(addr, "GET", "/api/v1/push", &[("authorization", &auth)], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(r.json()["code"], "CODE_UNSUPPORTED");
    let r = request(addr, "DELETE", "/api/v1/kick", &[], "").await;
    assert_eq!(r.status, 405);
    let r = post(addr, "/api/v1/nothing", KEY, &json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "CODE_UNSUPPORTED");
    let r = request(addr, "POST", "/metrics", &[], "").await;
    assert_eq!(
        (r.status.as_u16(), r.header("allow")),
        (405, Some("GET, HEAD"))
    );

    // A body that trickles in: 408 within the request timeout (2 s here).
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/presence HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user_ids\""
    );
    let t0 = Instant::now();
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut s).await;
    let took = t0.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("CODE_BAD_REQUEST"), "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

/// Reads what the server sends until it closes (at most 10 s).
async fn read_answer(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "no close within 10 s; got {}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// While the API is abused (bad keys, oversized and trickling bodies, bad
/// JSON, from many connections), a device session keeps getting the pushes
/// of an upstream service, each within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_of_the_api_does_not_hurt_sessions() {
    let (g, addr, _admin) = gateway().await;
    let (mut dev, _) = g.login("dev", "phone").await;
    let (up, _events) = g.upstream(false).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let mut abusers = tokio::task::JoinSet::new();
    for i in 0..24 {
        let stop = stop.clone();
        abusers.spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let Ok(mut s) = TcpStream::connect(addr).await else { continue };
                let req = match i % 4 {
                    0 => "POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope-nope-nope-nope\r\nContent-Length: 2\r\n\r\n{}".to_owned(),
                    1 => format!("POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 999999999\r\n\r\n"),
                    2 => format!("POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 50\r\n\r\n{{"),
                    _ => format!("POST /api/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 9\r\n\r\nnot json!"),
                };
                if s.write_all(req.as_bytes()).await.is_ok() {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
                }
                n += 1;
            }
            n
        });
    }
    for i in 0..40 {
        let t0 = Instant::now();
        let r = up
            .push_user("dev", format!("beat {i}").into_bytes())
            .await
            .unwrap();
        assert_eq!(r.sessions, 1);
        let p = push_within(&mut dev, Duration::from_secs(1), "a push during the abuse").await;
        assert_eq!(payload_of(&p), format!("beat {i}").as_bytes());
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "push {i} took {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let mut requests = 0;
    while let Some(n) = abusers.join_next().await {
        requests += n.unwrap();
    }
    assert!(requests > 24, "the abuse ran ({requests} requests)");
    // The admin listener itself still answers.
    assert_eq!(get(addr, "/status.json").await.status, 200);
}

/// The OpenAPI document lists exactly the router's routes and methods, and
/// every request example in it is taken by the real handlers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_matches_the_router_and_its_examples_run() {
    let (_g, addr, _admin) = gateway().await;
    let r = get(addr, "/api/openapi.json").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(tether::admin::OPENAPI).unwrap()
    );
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            documented.push((path.clone(), method.to_uppercase()));
        }
    }
    let mut routed: Vec<(String, String)> = tether::admin::ROUTES
        .iter()
        .flat_map(|(p, ms)| {
            ms.iter()
                .filter(|m| **m != "HEAD")
                .map(move |m| (p.to_string(), m.to_string()))
        })
        .collect();
    documented.sort();
    routed.sort();
    assert_eq!(documented, routed);

    let mut ran = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let Some(post_op) = ops.get("post") else {
            continue;
        };
        let examples = post_op["requestBody"]["content"]["application/json"]["examples"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} has no examples"));
        assert!(!examples.is_empty(), "{path}");
        for (name, ex) in examples {
            let r = post(addr, path, KEY, &ex["value"]).await;
            assert_eq!(
                r.status,
                200,
                "{path} example {name}: {}",
                String::from_utf8_lossy(&r.body)
            );
            ran += 1;
        }
        // Every status the handlers answer with is documented.
        for s in [
            "200", "400", "401", "403", "405", "408", "413", "415", "429",
        ] {
            assert!(
                post_op["responses"].get(s).is_some(),
                "{path} does not document {s}"
            );
        }
    }
    assert!(ran >= 5, "{ran}");
}

/// `tether serve` takes its API keys from `TETHER_API_KEYS` (comma
/// separated) and serves the API on its admin listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tether_serve_takes_keys_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (tcp, admin) = (free_port(), free_port());
    let cfg = dir.path().join("tether.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"env-keys\"\n[listen]\ntcp = [\"127.0.0.1:{tcp}\"]\ntls = []\nquic = []\n\
             [upstream]\ntcp = \"127.0.0.1:{}\"\n[metrics]\nlisten = \"127.0.0.1:{admin}\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .current_dir(dir.path())
        .env(
            "TETHER_API_KEYS",
            "first-key-0123456789, second-key-0123456789",
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut dev = connect_when_up(tcp).await;
    dev.login(&token("env", "phone"), "phone").await.unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let r = post(
        addr,
        "/api/v1/push",
        "second-key-0123456789",
        &json!({"target": {"user": "env"}, "payload": "from env"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["sessions"], 1);
    let p = push_within(&mut dev, Duration::from_secs(5), "pushed with an env key").await;
    assert_eq!(payload_of(&p), b"from env");
    let r = post(
        addr,
        "/api/v1/push",
        "not-a-key-0123456789",
        &json!({"target": "everyone"}),
    )
    .await;
    assert_eq!(r.status, 401);
    let s = get(addr, "/status.json").await.json();
    assert_eq!(s["node_id"], "env-keys");
    assert!(sigterm(&child));
    let _ = child.wait();
}

/// Two nodes on a private nats-server: an HTTP push on node a reaches a
/// session on node b, and presence asked of a sees it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_a_cluster_a_push_and_presence_reach_the_other_node() {
    exporter();
    let nats = NatsServer::start();
    let node = |name: &'static str| {
        let mut cfg = nats.node_config("api", name);
        cfg.bus.resume_secret = Some("a cluster-wide resume secret of 32+ bytes".into());
        start(cfg)
    };
    let a = node("a").await;
    let b = node("b").await;
    let (addr, _admin) = start_admin(&a, &[KEY], 4096, admin_limits(Duration::from_secs(2))).await;
    let (mut bob, _) = b.login("bob", "phone").await;
    // Until a knows b and bob's place in the directory.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let peers = a.gw.cluster().unwrap().peers();
        if peers.len() == 1 && peers[0].synced && peers[0].users == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "a never saw b: {peers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(
        addr,
        "/api/v1/push",
        KEY,
        &json!({"target": {"user": "bob"}, "payload": "via a"}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["sessions"], 1);
    assert_eq!(r.json()["failed"], json!([]));
    let p = push_within(&mut bob, Duration::from_secs(5), "the push through a").await;
    assert_eq!(payload_of(&p), b"via a");
    let r = post(addr, "/api/v1/presence", KEY, &json!({"user_ids": ["bob"]})).await;
    let v = r.json();
    assert_eq!(v["users"][0]["user_id"], "bob");
    assert_eq!(v["users"][0]["devices"][0]["node_id"], "b");
    assert_eq!(v["failed"], json!([]));
    // The status page of a shows b as its peer (within a sample or two).
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = get(addr, "/status.json").await.json();
        if s["cluster"]["peers"][0]["users"] == 1 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s["cluster"]["connected"], true);
    assert_eq!(s["cluster"]["peers"][0]["node_id"], "b");
    assert_eq!(s["cluster"]["peers"][0]["state"], "alive");
    assert_eq!(s["cluster"]["peers"][0]["users"], 1);
    assert_eq!(s["cluster"]["peers"][0]["synced"], true);
}
