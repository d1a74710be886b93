//! The WebSocket listeners (`listen.ws`, `listen.wss`) over real sockets:
//! a session over WebSocket does all a TCP one does (login, pushes, acks,
//! uplinks, presence), resumes across transports with nothing lost, and
//! every hostile upgrade or frame is refused with its documented HTTP
//! status or close code while a bystander session keeps its pushes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tether::client::Client;
use tether::wire::pb;
use tether::wire::ws::{self, op};
use tether::ws_client::WsRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x08];

fn ws_config() -> tether::config::Config {
    let mut cfg = test_config();
    Over::Ws.listen(&mut cfg);
    Over::Wss.listen(&mut cfg);
    cfg
}

/// An upgrade request with `lines` as its header lines (each without CRLF).
fn request(first: &str, lines: &[&str]) -> Vec<u8> {
    let mut s = format!("{first}\r\n");
    for l in lines {
        s.push_str(l);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

/// The header lines of a valid upgrade request.
fn good_headers() -> Vec<&'static str> {
    vec![
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: tether.v1",
    ]
}

/// Sends `req` and reads the answer to its end (the gateway closes after
/// a refusal): the status and the body.
async fn refused(addr: SocketAddr, req: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut all))
        .await
        .expect("the gateway did not close after its answer")
        .unwrap();
    let text = String::from_utf8(all).expect("an HTTP answer");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A raw WebSocket connection, upgraded by hand (the 101 head read).
async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&request("GET /tether HTTP/1.1", &good_headers()))
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("no upgrade answer")
            .unwrap();
        assert_eq!(
            n,
            1,
            "closed during the upgrade: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "{head}"
    );
    s
}

/// Reads server frames until a Close: its code, and whether the socket
/// then ended. Server frames must be unmasked.
async fn close_code(s: &mut TcpStream) -> u16 {
    let mut d = ws::Decoder::client(1 << 20);
    let mut buf = vec![0u8; 4096];
    let mut out = vec![0u8; 1 << 20];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no Close within 5 s")
            .unwrap();
        assert!(n > 0, "the socket ended without a Close frame");
        let mut input = &buf[..n];
        while !input.is_empty() {
            let p = d.decode(input, &mut out).expect("a valid server frame");
            input = &input[p.used..];
            if let Some(ws::Control::Close(code)) = p.control {
                let code = code.expect("a Close with a code");
                // Then the end.
                let mut rest = [0u8; 64];
                let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut rest))
                    .await
                    .expect("the socket stayed open after the Close");
                assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
                return code;
            }
        }
    }
}

/// A logged-in TCP session that must keep receiving pushes whatever other
/// connections do.
struct Bystander {
    c: Client,
    up: tether::upstream::UpstreamClient,
    n: u32,
}

impl Bystander {
    async fn new(g: &TestGateway) -> Self {
        let (c, _) = g.login("bystander", "phone").await;
        let (up, _) = g.upstream(false).await;
        Self { c, up, n: 0 }
    }

    async fn still_served(&mut self) {
        self.n += 1;
        let body = format!("still-{}", self.n);
        self.up.push_user("bystander", body.clone()).await.unwrap();
        let p = push_within(&mut self.c, Duration::from_secs(3), "a bystander's push").await;
        assert_eq!(&p.payload[..], body.as_bytes());
        self.c.ack(p.seq).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_push_ack_and_uplink_over_ws_and_wss() {
    let g = start(ws_config()).await;
    let (up, mut events) = g.upstream(true).await;
    let mut clients = Vec::new();
    for (over, device) in [(Over::Ws, "browser"), (Over::Wss, "phone")] {
        let mut c = g.client_over(over).await;
        let ok = c
            .login(&token("alice", device), device)
            .await
            .expect("login");
        assert_eq!(ok.user_id, "alice");
        ping_pong(&mut c).await;

        // A push, small and large (many TCP segments, one message).
        let r = up.push_user("alice", &b"hello"[..]).await.unwrap();
        assert!(r.sessions >= 1);
        let p = push_within(&mut c, Duration::from_secs(3), "a push").await;
        assert_eq!(&p.payload[..], b"hello");
        c.ack(p.seq).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        up.push(pb::PushRequest {
            target: Some(pb::push_request::Target::Device(pb::DeviceTarget {
                user_id: "alice".into(),
                device_id: device.into(),
            })),
            payload: big.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let p = push_within(&mut c, Duration::from_secs(3), "a large push").await;
        assert!(p.payload[..] == big[..], "the large push came garbled");
        c.ack(p.seq).await.unwrap();

        // An uplink reaches the subscriber and is acknowledged.
        let rid = c
            .send_up(&format!("cm-{device}"), "chat", &b"up"[..])
            .await
            .unwrap();
        assert_eq!(next(&mut c).await.request_id, rid);
        loop {
            if let pb::event::Kind::Uplink(u) =
                next_event(&mut events, Duration::from_secs(3)).await
            {
                assert_eq!(&u.payload[..], b"up");
                assert_eq!(u.client_msg_id, format!("cm-{device}"));
                break;
            }
        }
        clients.push(c);
    }
    // Presence names the transports.
    let users = up.presence(&["alice"]).await.unwrap();
    let mut t: Vec<(String, String)> = users[0]
        .devices
        .iter()
        .map(|d| (d.device_id.clone(), d.transport.clone()))
        .collect();
    t.sort();
    assert_eq!(
        t,
        [
            ("browser".into(), "ws".into()),
            ("phone".into(), "wss".into())
        ]
    );
}

/// A session opened over WebSocket resumes over TCP, and back, with the
/// same resume token: every push arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_from_ws_to_tcp_and_back_with_nothing_lost() {
    let g = start(ws_config()).await;
    let (up, _) = g.upstream(false).await;
    let mut got = Vec::new();

    let mut c = g.client_over(Over::Ws).await;
    let ok = c.login(&token("bob", "phone"), "phone").await.unwrap();
    up.push_user("bob", &b"1"[..]).await.unwrap();
    let p = push_within(&mut c, Duration::from_secs(3), "push 1").await;
    got.push(p.seq);
    c.ack(p.seq).await.unwrap();
    drop(c);
    g.wait_sessions(0).await;
    for b in [&b"2"[..], &b"3"[..]] {
        up.push_user("bob", b).await.unwrap();
    }

    // Over TCP: 2 and 3, replayed.
    let mut t = g.client_over(Over::Tcp).await;
    let ok2 = t
        .login_with(resume_login("bob", "phone", &ok, 1, 0))
        .await
        .expect("resume over TCP");
    assert_eq!(ok2.session_id, ok.session_id, "the same session");
    for want in [2, 3] {
        let p = push_within(&mut t, Duration::from_secs(3), "a replayed push").await;
        assert_eq!(p.seq, want);
        got.push(p.seq);
    }
    t.ack(3).await.unwrap();
    up.push_user("bob", &b"4"[..]).await.unwrap();
    let p = push_within(&mut t, Duration::from_secs(3), "push 4").await;
    got.push(p.seq);
    drop(t);
    g.wait_sessions(0).await;
    up.push_user("bob", &b"5"[..]).await.unwrap();

    // Back over WebSocket (TLS this time): 4 was not acknowledged, then 5.
    let mut w = g.client_over(Over::Wss).await;
    let ok3 = w
        .login_with(resume_login("bob", "phone", &ok2, 3, 0))
        .await
        .expect("resume over WebSocket");
    assert_eq!(ok3.session_id, ok.session_id);
    for want in [4, 5] {
        let p = push_within(&mut w, Duration::from_secs(3), "a replayed push").await;
        assert_eq!(p.seq, want);
        if !got.contains(&p.seq) {
            got.push(p.seq);
        }
    }
    w.ack(5).await.unwrap();
    expect_silence(&mut w, Duration::from_millis(300)).await;
    assert_eq!(got, [1, 2, 3, 4, 5], "every push once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upgrade_requests_get_their_status() {
    let mut cfg = ws_config();
    cfg.listen.ws_origins = vec!["https://app.example.com".into()];
    let g = start(cfg).await;
    let addr = g.ws.unwrap();
    let mut by = Bystander::new(&g).await;
    let with = |first: &str, edit: &dyn Fn(&mut Vec<&'static str>)| {
        let mut h = good_headers();
        edit(&mut h);
        request(first, &h)
    };
    let drop_header =
        |name: &'static str| move |h: &mut Vec<&'static str>| h.retain(|l| !l.starts_with(name));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "a plain GET of /tether",
            request("GET /tether HTTP/1.1", &["Host: x"]),
            426,
        ),
        (
            "another path",
            request("GET /index.html HTTP/1.1", &["Host: x"]),
            404,
        ),
        (
            "an upgrade of another path",
            with("GET /chat HTTP/1.1", &|_| {}),
            404,
        ),
        ("POST", with("POST /tether HTTP/1.1", &|_| {}), 405),
        ("HTTP/1.0", with("GET /tether HTTP/1.0", &|_| {}), 400),
        (
            "no Upgrade",
            with("GET /tether HTTP/1.1", &drop_header("Upgrade")),
            400,
        ),
        (
            "no key",
            with("GET /tether HTTP/1.1", &drop_header("Sec-WebSocket-Key")),
            400,
        ),
        (
            "a short key",
            with("GET /tether HTTP/1.1", &|h| {
                h[3] = "Sec-WebSocket-Key: c2hvcnQ="
            }),
            400,
        ),
        (
            "version 8",
            with("GET /tether HTTP/1.1", &|h| {
                h[4] = "Sec-WebSocket-Version: 8"
            }),
            426,
        ),
        (
            "no subprotocol",
            with(
                "GET /tether HTTP/1.1",
                &drop_header("Sec-WebSocket-Protocol"),
            ),
            400,
        ),
        (
            "another subprotocol",
            with("GET /tether HTTP/1.1", &|h| {
                h[5] = "Sec-WebSocket-Protocol: mqtt"
            }),
            400,
        ),
        (
            "a foreign origin",
            with("GET /tether HTTP/1.1", &|h| {
                h.push("Origin: https://evil.example")
            }),
            403,
        ),
        (
            "not HTTP",
            b"\x16\x03\x01\x00\x05hello\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (what, req, want) in cases {
        let (status, body) = refused(addr, &req).await;
        assert_eq!(status, want, "{what}: {body}");
        assert!(
            body.ends_with('\n') && body.trim().lines().count() == 1,
            "{what}: {body:?}"
        );
    }
    by.still_served().await;

    // The listed origin, and a client that sends none, are let in.
    let listed = WsRequest {
        host: "localhost".into(),
        origin: Some("https://app.example.com".into()),
    };
    let mut c = Client::connect_ws(addr, &listed)
        .await
        .expect("a listed origin");
    c.login(&token("carol", "web"), "web").await.unwrap();
    let foreign = WsRequest {
        host: "localhost".into(),
        origin: Some("https://evil.example".into()),
    };
    let e = Client::connect_ws(addr, &foreign)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("403"), "{e}");
    Client::connect_ws(addr, &ws_request())
        .await
        .expect("no Origin: not a browser, not checked");
    by.still_served().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_gets_431() {
    let g = start(ws_config()).await;
    let mut by = Bystander::new(&g).await;
    let pad = format!("X-Pad: {}", "a".repeat(9000));
    let mut lines = good_headers();
    lines.push(&pad);
    let (status, _) = refused(g.ws.unwrap(), &request("GET /tether HTTP/1.1", &lines)).await;
    assert_eq!(status, 431);
    let many: Vec<String> = (0..40).map(|i| format!("X-{i}: y")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (status, _) = refused(g.ws.unwrap(), &request("GET /tether HTTP/1.1", &many)).await;
    assert_eq!(status, 431);
    by.still_served().await;
}

/// A client that trickles its upgrade request is closed at
/// `session.login_timeout`, and its connection slot is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upgrade_is_closed_at_the_login_timeout_and_its_slot_freed() {
    let mut cfg = ws_config();
    cfg.session.login_timeout = Duration::from_millis(600);
    cfg.limits.max_connections = 2;
    let g = start(cfg).await;
    let mut by = Bystander::new(&g).await;
    assert_eq!(g.gw.limits().connections(), 1);
    let t0 = Instant::now();
    let mut s = TcpStream::connect(g.ws.unwrap()).await.unwrap();
    let req = request("GET /tether HTTP/1.1", &good_headers());
    let mut end = [0u8; 64];
    let mut closed = false;
    for b in req.iter().take(req.len() - 1) {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        match tokio::time::timeout(Duration::from_millis(50), s.read(&mut end)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => panic!("an answer to half a request: {:?}", &end[..n]),
        }
    }
    assert!(closed, "the trickled upgrade was never closed");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    // The slot is free again: a second connection fits under the cap of 2.
    for _ in 0..100 {
        if g.gw.limits().connections() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(g.gw.limits().connections(), 1);
    let mut c = g.client_over(Over::Ws).await;
    c.login(&token("dave", "web"), "web").await.unwrap();
    by.still_served().await;
}

/// A connection refused by a connection limit gets HTTP 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_the_cap_gets_503() {
    let mut cfg = ws_config();
    cfg.limits.max_connections = 1;
    let g = start(cfg).await;
    let (mut c, _) = g.login("erin", "phone").await;
    let (status, body) = refused(g.ws.unwrap(), b"").await;
    assert_eq!(status, 503, "{body}");
    ping_pong(&mut c).await;
}

/// Each hostile frame after the upgrade is answered with its close code,
/// and the socket closes; the bystander is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_closed_with_their_codes() {
    let mut cfg = ws_config();
    cfg.limits.max_frame = 1024;
    let g = start(cfg).await;
    let mut by = Bystander::new(&g).await;
    let addr = g.ws.unwrap();
    let frame = |fin: bool, opcode: u8, body: &[u8]| {
        let mut v = Vec::new();
        ws::client_frame(&mut v, opcode, body, MASK);
        if !fin {
            v[0] &= 0x7F;
        }
        v
    };
    let unmasked = {
        let mut v = Vec::new();
        ws::write_header(&mut v, op::BINARY, 3, None);
        v.extend_from_slice(b"abc");
        v
    };
    let flood = {
        let mut v = frame(false, op::BINARY, b"a");
        for _ in 0..10_000 {
            v.extend(frame(false, op::CONTINUATION, b"b"));
        }
        v
    };
    let oversized_header_only = {
        let mut v = Vec::new();
        ws::write_header(&mut v, op::BINARY, 1 << 30, Some(MASK));
        v
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "an oversized message",
            frame(true, op::BINARY, &[0u8; 2000]),
            1009,
        ),
        ("a 1 GiB length", oversized_header_only, 1009),
        (
            "a text message",
            frame(true, op::TEXT, b"{\"login\":1}"),
            1003,
        ),
        ("an unmasked frame", unmasked, 1002),
        (
            "a reserved bit",
            {
                let mut v = frame(true, op::BINARY, b"x");
                v[0] |= 0x20;
                v
            },
            1002,
        ),
        ("an unknown opcode", frame(true, 0x5, b""), 1002),
        (
            "a lone continuation",
            frame(true, op::CONTINUATION, b"x"),
            1002,
        ),
        ("a fragmented flood", flood, 1008),
    ];
    for (what, bytes, want) in cases {
        let mut s = raw_ws(addr).await;
        // Writes may fail once the gateway has closed: the code still came.
        let _ = s.write_all(&bytes).await;
        assert_eq!(close_code(&mut s).await, want, "{what}");
        by.still_served().await;
    }
}

/// Ping gets a Pong with its payload; a Close gets a Close, and the session
/// then waits for a resume as after any drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_close_are_answered() {
    let g = start(ws_config()).await;
    let mut s = raw_ws(g.ws.unwrap()).await;
    let mut login = Vec::new();
    let body = {
        use prost::Message;
        pb::ClientFrame {
            request_id: 1,
            body: Some(pb::client_frame::Body::Login(pb::Login {
                token: token("frank", "web"),
                device_id: "web".into(),
                platform: pb::Platform::Web as i32,
                protocol_version: 1,
                resume: None,
            })),
        }
        .encode_to_vec()
    };
    // The login in two fragments, a Ping between them.
    let (a, b) = body.split_at(body.len() / 2);
    ws::client_frame(&mut login, op::BINARY, a, MASK);
    login[0] &= 0x7F;
    ws::client_frame(&mut login, op::PING, b"are you there", MASK);
    ws::client_frame(&mut login, op::CONTINUATION, b, MASK);
    s.write_all(&login).await.unwrap();

    let mut d = ws::Decoder::client(1 << 20);
    let mut out = vec![0u8; 1 << 16];
    let mut stream = Vec::new();
    let mut pong = None;
    let mut buf = [0u8; 4096];
    while pong.is_none() || stream.len() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed");
        let mut input = &buf[..n];
        while !input.is_empty() {
            let p = d.decode(input, &mut out).expect("a valid server frame");
            input = &input[p.used..];
            stream.extend_from_slice(&out[..p.wrote]);
            match p.control {
                Some(ws::Control::Pong) => pong = Some(()),
                Some(other) => panic!("{other:?}"),
                None => {}
            }
        }
    }
    assert_eq!(g.attached(), 1, "logged in over fragments");
    let mut close = Vec::new();
    ws::client_frame(&mut close, op::CLOSE, &1000u16.to_be_bytes(), MASK);
    s.write_all(&close).await.unwrap();
    assert_eq!(close_code(&mut s).await, 1000);
    g.wait_sessions(0).await;
    assert_eq!(g.gw.detached_count(), 1, "kept for a resume");
}

/// A client may send its first frames behind its upgrade request, in the
/// same write, before the 101 comes: the gateway keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_behind_the_upgrade_request_are_kept() {
    use prost::Message;
    let g = start(ws_config()).await;
    let mut s = TcpStream::connect(g.ws.unwrap()).await.unwrap();
    let mut bytes = request("GET /tether HTTP/1.1", &good_headers());
    let login = pb::ClientFrame {
        request_id: 1,
        body: Some(pb::client_frame::Body::Login(pb::Login {
            token: token("gina", "web"),
            device_id: "web".into(),
            platform: pb::Platform::Web as i32,
            protocol_version: 1,
            resume: None,
        })),
    }
    .encode_to_vec();
    ws::client_message(&mut bytes, &login, MASK);
    s.write_all(&bytes).await.unwrap();
    let t0 = Instant::now();
    while g.attached() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the early Login was lost"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The 101, then the LoginOk as one binary message.
    let mut all = Vec::new();
    let mut buf = [0u8; 1024];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed");
        all.extend_from_slice(&buf[..n]);
        if let Some(i) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    assert!(all.starts_with(b"HTTP/1.1 101 "));
    let mut d = ws::Decoder::client(1 << 20);
    let mut out = vec![0u8; 1 << 16];
    let mut stream = Vec::new();
    let mut input = all[head_end..].to_vec();
    loop {
        let p = d.decode(&input, &mut out).expect("a valid server frame");
        stream.extend_from_slice(&out[..p.wrote]);
        input.drain(..p.used);
        if stream.len() >= 4 {
            let len = u32::from_be_bytes([stream[0], stream[1], stream[2], stream[3]]) as usize;
            if stream.len() >= 4 + len {
                let f = pb::ServerFrame::decode(&stream[4..4 + len]).expect("a ServerFrame");
                assert!(
                    matches!(f.body, Some(pb::server_frame::Body::LoginOk(_))),
                    "{f:?}"
                );
                break;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no LoginOk")
            .unwrap();
        assert!(n > 0, "closed before the LoginOk");
        input.extend_from_slice(&buf[..n]);
    }
}
