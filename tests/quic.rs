//! QUIC over real UDP sockets on loopback: login, pushes on both lanes and
//! acks; a client that migrates to a new address mid-stream; resume across
//! QUIC and TCP; a stalled bulk stream beside interactive pushes; a
//! handshake and garbage flood beside an established session; 0-RTT
//! accepted, refused and replayed by an attacker; presence's address right
//! after a login and a resume; a connect that nothing answers; QUIC on
//! the TLS address by default.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tether::wire::pb::{self, push_request::Target, server_frame::Body as Resp};
use tether::wire::Code;

fn quic_config() -> tether::config::Config {
    let mut cfg = test_config();
    cfg.listen.quic = Some(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.limits.login_rate = 0;
    cfg
}

fn to_device(user: &str, device: &str, payload: Bytes, lane: pb::Lane) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: user.into(),
            device_id: device.into(),
        })),
        payload,
        source: "test".into(),
        lane: lane as i32,
        ..Default::default()
    }
}

/// Pushes `payload` to `user`'s phone on `lane`; the push must be taken.
async fn push_phone(
    up: &tether::upstream::UpstreamClient,
    user: &str,
    payload: impl Into<Bytes>,
    lane: pb::Lane,
) -> pb::PushReply {
    up.push(to_device(user, "phone", payload.into(), lane))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_push_and_ack_over_quic_with_bulk_on_its_own_stream() {
    let g = start(quic_config()).await;
    let (up, mut events) = g.upstream(true).await;
    let (_q, mut c, ok) = g.login_quic("qa", "phone").await;
    assert_eq!(ok.user_id, "qa");

    let mut req = to_device(
        "qa",
        "phone",
        Bytes::from_static(b"hi"),
        pb::Lane::Interactive,
    );
    req.report_delivery = true;
    req.message_id = "i-1".into();
    assert_eq!(up.push(req).await.unwrap().sessions, 1);
    let mut req = to_device("qa", "phone", Bytes::from_static(b"feed"), pb::Lane::Bulk);
    req.report_delivery = true;
    req.message_id = "b-1".into();
    up.push(req).await.unwrap();

    let mut got = Vec::new();
    for _ in 0..2 {
        let p = push_within(&mut c, Duration::from_secs(5), "a push").await;
        got.push((p.lane, p.seq, p.message_id.clone(), p.payload.clone()));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                pb::Lane::Interactive as i32,
                1,
                "i-1".into(),
                Bytes::from_static(b"hi")
            ),
            (
                pb::Lane::Bulk as i32,
                1,
                "b-1".into(),
                Bytes::from_static(b"feed")
            ),
        ]
    );
    c.ack_lane(pb::Lane::Interactive, 1).await.unwrap();
    c.ack_lane(pb::Lane::Bulk, 1).await.unwrap();
    let mut reported = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reported.len() < 2 && Instant::now() < deadline {
        if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
        {
            if let Some(pb::event::Kind::Delivery(r)) = ev.kind {
                assert_eq!(r.code, Code::Ok as i32, "{r:?}");
                reported.push(r.message_id);
            }
        }
    }
    reported.sort();
    assert_eq!(reported, vec!["b-1", "i-1"], "both acknowledged over QUIC");

    // Presence says QUIC; a ping is answered on the stream.
    let h =
        g.gw.registry()
            .session(tether::ids::SessionId(ok.session_id))
            .unwrap();
    assert_eq!(h.info().unwrap().transport.as_str(), "quic");
    c.ping().await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(f.body, Some(Resp::Pong(_))), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_migrates_mid_stream_keeps_its_session_and_loses_nothing() {
    const N: u64 = 10_000;
    let g = start(quic_config()).await;
    let (up, _events) = g.upstream(false).await;
    let (q, mut c, ok) = g.login_quic("mig", "phone").await;
    let before = q.local_addr().unwrap();

    let pusher = tokio::spawn(async move {
        for i in 1..=N {
            let req = to_device(
                "mig",
                "phone",
                Bytes::from(i.to_be_bytes().to_vec()),
                pb::Lane::Interactive,
            );
            let r = up.push(req).await.expect("push");
            assert_eq!(r.sessions, 1, "push {i}: the session is reachable");
        }
    });
    let mut last = 0;
    let mut rebound = None;
    while last < N {
        let p = push_within(&mut c, Duration::from_secs(10), "a push").await;
        let idx = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
        assert_eq!(p.seq, last + 1, "each push exactly once, in order");
        assert_eq!(idx, p.seq);
        last = p.seq;
        if last % 64 == 0 {
            c.ack(last).await.unwrap();
        }
        if last == N / 2 {
            // The phone leaves Wi-Fi: a new socket, a new address.
            rebound = Some(q.rebind("127.0.0.1:0".parse().unwrap()).unwrap());
        }
    }
    c.ack(last).await.unwrap();
    pusher.await.unwrap();
    let after = rebound.unwrap();
    assert_ne!(before, after);
    assert!(
        g.gw.quic_migrations() >= 1,
        "the gateway saw the client's new address"
    );
    let h =
        g.gw.registry()
            .session(tether::ids::SessionId(ok.session_id))
            .unwrap();
    assert!(!h.is_detached(), "same connection, same session");
    assert_eq!(g.gw.registry().len(), 1, "no second session");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.unacked(), 0);
    // Presence shows where the phone sends from now.
    let (up, _events) = g.upstream(false).await;
    let p = up.presence(&["mig"]).await.unwrap();
    let d = &p[0].devices[0];
    assert_eq!(
        (d.transport.as_str(), d.remote_addr.as_str()),
        ("quic", after.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_from_quic_to_tcp_and_back() {
    let g = start(quic_config()).await;
    let (up, _events) = g.upstream(false).await;
    let (q, mut c, ok) = g.login_quic("rs", "phone").await;
    for i in 1..=3u8 {
        push_phone(&up, "rs", Bytes::from(vec![i]), pb::Lane::Interactive).await;
    }
    for seq in 1..=3 {
        assert_eq!(
            push_within(&mut c, Duration::from_secs(5), "a push")
                .await
                .seq,
            seq
        );
    }
    c.ack(2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // UDP is blocked on this network: the QUIC connection dies silently.
    drop(c);
    drop(q);
    // Over TCP, resuming from seq 2: seq 3 comes again, then what is new.
    let mut t = g.client().await;
    let ok_t = t
        .login_with(resume_login("rs", "phone", &ok, 2, 0))
        .await
        .unwrap();
    assert_eq!(ok_t.session_id, ok.session_id, "the same session");
    let r = ok_t.resume.unwrap();
    assert_eq!((r.code, r.first_seq, r.replayed), (Code::Ok as i32, 3, 1));
    assert_eq!(
        push_within(&mut t, Duration::from_secs(5), "a push")
            .await
            .seq,
        3
    );
    let presence = |g: &TestGateway| {
        let h =
            g.gw.registry()
                .session(tether::ids::SessionId(ok.session_id))
                .unwrap();
        h.presence(g.gw.node_id()).unwrap().transport
    };
    assert_eq!(presence(&g), "tcp", "presence follows the resume");
    push_phone(&up, "rs", Bytes::from_static(b"4"), pb::Lane::Interactive).await;
    assert_eq!(
        push_within(&mut t, Duration::from_secs(5), "a push")
            .await
            .seq,
        4
    );
    drop(t);
    // Back to QUIC, resuming from seq 4.
    let q2 = g.quic_connector();
    let mut c2 = q2
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    let ok_q = c2
        .login_with(resume_login("rs", "phone", &ok_t, 4, 0))
        .await
        .unwrap();
    assert_eq!(ok_q.session_id, ok.session_id);
    assert_eq!(ok_q.resume.unwrap().code, Code::Ok as i32);
    assert_eq!(presence(&g), "quic");
    push_phone(&up, "rs", Bytes::from_static(b"5"), pb::Lane::Interactive).await;
    assert_eq!(
        push_within(&mut c2, Duration::from_secs(5), "a push")
            .await
            .seq,
        5
    );
}

/// The one device of `user` that presence lists.
async fn presence_of(up: &tether::upstream::UpstreamClient, user: &str) -> pb::DevicePresence {
    let p = up.presence(&[user]).await.expect("presence");
    assert_eq!(p[0].devices.len(), 1, "{p:?}");
    p[0].devices[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_has_the_quic_address_right_after_login_and_after_a_resume() {
    let mut cfg = quic_config();
    // No heartbeat or timer may poll the connection again before presence
    // is asked: the address must be there from the login itself.
    cfg.session.heartbeat_interval = Duration::from_secs(60);
    cfg.session.idle_timeout = Duration::from_secs(120);
    let g = start(cfg).await;
    let (up, mut events) = g.upstream(true).await;
    let (q, c, ok) = g.login_quic("pa", "phone").await;
    let from = q.local_addr().unwrap().to_string();
    let d = presence_of(&up, "pa").await;
    assert_eq!(
        (d.transport.as_str(), d.remote_addr.as_str()),
        ("quic", from.as_str()),
        "presence asked right after LoginOk"
    );
    let opened = wait_event(&mut events, Duration::from_secs(5), |e| match e {
        pb::event::Kind::Opened(o) => Some(o.remote_addr.clone()),
        _ => None,
    })
    .await;
    assert_eq!(opened, from, "the same address as SessionOpened");

    // A resume over QUIC from another socket: presence names the new one.
    drop(c);
    drop(q);
    let q2 = g.quic_connector();
    let mut c2 = q2
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    let ok2 = c2
        .login_with(resume_login("pa", "phone", &ok, 0, 0))
        .await
        .unwrap();
    assert_eq!(ok2.session_id, ok.session_id, "the same session");
    assert_eq!(ok2.resume.unwrap().code, Code::Ok as i32);
    let d = presence_of(&up, "pa").await;
    assert_eq!(
        d.remote_addr,
        q2.local_addr().unwrap().to_string(),
        "presence asked right after the resume's LoginOk"
    );

    // TCP: the address cannot change, and is in SessionOpened only
    // (docs/PROTOCOL.md, section 16.2).
    let (t, _) = g.login("pt", "phone").await;
    let d = presence_of(&up, "pt").await;
    assert_eq!((d.transport.as_str(), d.remote_addr.as_str()), ("tcp", ""));
    drop(t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_an_address_where_nothing_answers_ends_at_its_timeout() {
    let g = start(quic_config()).await;
    // A UDP socket that is bound and never read: no ICMP, no answer.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let q = g
        .quic_connector()
        .with_connect_timeout(Duration::from_millis(200));
    let err = match q.connect(addr, "localhost", false).await {
        Ok(_) => panic!("a connect to a silent address succeeded"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "no QUIC answer from {addr} within 200ms (is the gateway listening on UDP {addr}?)"
        )
    );
    // The same connector still reaches a gateway that answers.
    let mut c = q
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    c.login(&token("ct", "phone"), "phone").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_listens_where_tls_does_unless_it_is_set() {
    let mut cfg = test_config();
    cfg.listen.tls = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.listen.quic = None;
    let g = start(cfg).await;
    let tls = g.tls.expect("a TLS listener");
    assert_eq!(g.quic, Some(tls), "QUIC on the port TLS was given");
    let mut c = g
        .quic_connector()
        .connect(tls, "localhost", false)
        .await
        .unwrap();
    c.login(&token("ft", "phone"), "phone").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_bulk_stream_does_not_delay_interactive_pushes() {
    let g = start(quic_config()).await;
    let (up, _events) = g.upstream(false).await;
    let (_q, mut c, _ok) = g.login_quic("bk", "phone").await;
    // The device does not read its bulk stream: its 64 KiB window fills.
    c.pause_bulk(true);
    let flood = Bytes::from(vec![7u8; 4096]);
    for _ in 0..200 {
        push_phone(&up, "bk", flood.clone(), pb::Lane::Bulk).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    for i in 1..=50u64 {
        let t0 = Instant::now();
        push_phone(
            &up,
            "bk",
            Bytes::from(i.to_be_bytes().to_vec()),
            pb::Lane::Interactive,
        )
        .await;
        let p = push_within(&mut c, Duration::from_secs(2), "a push").await;
        assert_eq!((p.lane, p.seq), (pb::Lane::Interactive as i32, i));
        worst = worst.max(t0.elapsed());
        c.ack(i).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("slowest interactive push beside a stalled bulk stream: {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    // The bulk stream opens again: every bulk push arrives, in order.
    c.pause_bulk(false);
    let mut seq = 0;
    while seq < 200 {
        let p = push_within(&mut c, Duration::from_secs(5), "a push").await;
        assert_eq!(p.lane, pb::Lane::Bulk as i32);
        assert_eq!(p.seq, seq + 1);
        seq = p.seq;
        if seq % 32 == 0 {
            c.ack_lane(pb::Lane::Bulk, seq).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_and_garbage_flood_leaves_established_sessions_receiving() {
    let mut cfg = quic_config();
    cfg.quic.handshake_rate = 50;
    cfg.session.login_timeout = Duration::from_secs(1);
    let g = start(cfg).await;
    let (up, _events) = g.upstream(false).await;
    let (_q, mut c, _ok) = g.login_quic("fl", "phone").await;
    let target: SocketAddr = g.quic.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();

    // Garbage: random datagrams, and truncated Initial-looking packets.
    let garbage = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut n = 0u64;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            while !stop.is_cancelled() {
                for _ in 0..64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = 1 + (x % 1400) as usize;
                    let mut d: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
                    if n.is_multiple_of(2) {
                        d[0] = 0xc3; // long header, Initial
                        d.truncate(len.min(40));
                    }
                    let _ = s.send_to(&d, target).await;
                    n += 1;
                }
                tokio::task::yield_now().await;
            }
            n
        })
    };
    // Handshakes that never log in, from many sockets.
    let ca = g.ca();
    let handshakes = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut ok = 0u32;
            while !stop.is_cancelled() {
                let q = tether::client::QuicConnector::new("127.0.0.1:0".parse().unwrap(), &ca)
                    .unwrap();
                if let Ok(Ok(_c)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    q.connect(target, "localhost", false),
                )
                .await
                {
                    ok += 1;
                }
            }
            ok
        })
    };
    // Meanwhile the established session keeps receiving.
    let mut worst = Duration::ZERO;
    for i in 1..=100u64 {
        let t0 = Instant::now();
        push_phone(
            &up,
            "fl",
            Bytes::from(i.to_be_bytes().to_vec()),
            pb::Lane::Interactive,
        )
        .await;
        let p = push_within(&mut c, Duration::from_secs(2), "a push").await;
        assert_eq!(p.seq, i, "no push lost during the flood");
        worst = worst.max(t0.elapsed());
        c.ack(i).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let sent = garbage.await.unwrap();
    let shaken = handshakes.await.unwrap();
    eprintln!("{sent} garbage datagrams, {shaken} handshakes; slowest push {worst:?}");
    assert!(sent > 1000, "the flood ran ({sent} datagrams)");
    assert!(worst < Duration::from_secs(1), "{worst:?}");
    // The flood's connections never logged in: they are gone after the
    // login timeout; only the established session is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.gw.limits().connections() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(g.gw.limits().connections(), 1, "flood connections released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_client_logs_in_with_0rtt_and_falls_back_when_refused() {
    let g = start(quic_config()).await;
    let addr = g.quic.unwrap();
    let q = g.quic_connector();
    // First visit: a full handshake; the gateway sends session tickets.
    let mut c = q.connect(addr, "localhost", true).await.unwrap();
    assert_eq!(c.zero_rtt_accepted().await, None, "nothing remembered yet");
    let ok = c.login(&token("z", "phone"), "phone").await.unwrap();
    c.ping().await.unwrap();
    let _ = c.recv_timeout(Duration::from_secs(5)).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Second visit: the login (a resume) goes out in 0-RTT data.
    let mut c = q.connect(addr, "localhost", true).await.unwrap();
    let ok2 = c
        .login_with(resume_login("z", "phone", &ok, 0, 0))
        .await
        .unwrap();
    assert_eq!(ok2.session_id, ok.session_id);
    assert_eq!(c.zero_rtt_accepted().await, Some(true), "0-RTT accepted");
    // One ticket per connection: this connection's arrives after its
    // handshake; a round trip makes sure the client has it.
    c.ping().await.unwrap();
    let _ = c.recv_timeout(Duration::from_secs(5)).await.unwrap();
    drop(c);

    // Another gateway with the same certificate does not know the session:
    // 0-RTT is refused, and a plain reconnect works.
    let mut cfg = quic_config();
    cfg.tls.dev_cert_dir = g.certs.path().to_owned();
    let server = tether::gateway::Server::bind(cfg).await.unwrap();
    let other = server.addrs().quic[0];
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(server.run(stop.clone()));
    let mut c = q.connect(other, "localhost", true).await.unwrap();
    let tried = c.login(&token("z", "phone"), "phone").await;
    let verdict = c.zero_rtt_accepted().await;
    assert_eq!(verdict, Some(false), "refused by a node that never saw it");
    // A login written as 0-RTT data is lost with the refusal (an error
    // here). On a loaded machine the handshake can finish, refusing 0-RTT,
    // before the client's first write; the login then goes as 1-RTT data
    // and is answered, which is also right. Either way a plain reconnect
    // works (below).
    if let Ok(ok) = &tried {
        eprintln!("the login went after the handshake, as 1-RTT data: {ok:?}");
    }
    let mut c = q.connect(other, "localhost", false).await.unwrap();
    c.login(&token("z", "phone"), "phone").await.unwrap();
    stop.cancel();
    let _ = run.await;
}

/// An attacker who recorded a client's 0-RTT flight (a resume and an
/// uplink) and sends it again gets neither: the ticket was single-use, so
/// the replay's 0-RTT data is refused, and its handshake can never finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_0rtt_flight_neither_resumes_nor_sends_again() {
    let g = start(quic_config()).await;
    let addr = g.quic.unwrap();
    let (_up, mut events) = g.upstream(true).await;
    let q = g.quic_connector();
    let mut c = q.connect(addr, "localhost", true).await.unwrap();
    let ok = c.login(&token("rp", "phone"), "phone").await.unwrap();
    c.ping().await.unwrap();
    let _ = c.recv_timeout(Duration::from_secs(5)).await.unwrap();
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The visit that gets recorded: a resume and an uplink, both in 0-RTT.
    let flight = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<u8>>::new()));
    let rec = flight.clone();
    let via = relay(addr, move |p| {
        if p[0] & 0x80 != 0 {
            rec.lock().unwrap().push(p.to_vec()); // long header: the handshake flight
        }
    })
    .await;
    let mut c = q.connect(via, "localhost", true).await.unwrap();
    let login = c
        .request(pb::client_frame::Body::Login(resume_login(
            "rp", "phone", &ok, 0, 0,
        )))
        .await
        .unwrap();
    let send = c.send_up("once", "chat", &b"hello"[..]).await.unwrap();
    let mut answered = Vec::new();
    while answered.len() < 2 {
        let f = c
            .recv_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        match f.body {
            Some(Resp::LoginOk(_)) | Some(Resp::SendAck(_)) => answered.push(f.request_id),
            _ => {}
        }
    }
    assert_eq!(
        answered,
        [login, send],
        "resumed, then the uplink once confirmed"
    );
    assert_eq!(c.zero_rtt_accepted().await, Some(true), "sent in 0-RTT");
    drop(c);
    let h =
        g.gw.registry()
            .session(tether::ids::SessionId(ok.session_id))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.is_detached() {
        assert!(Instant::now() < deadline, "the session detaches");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the gateway forget the recorded connection, so that the replay
    // reaches a fresh handshake rather than a connection it still drains.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The replay, from another address.
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let recorded = flight.lock().unwrap().clone();
    assert!(!recorded.is_empty(), "the flight was recorded");
    for p in &recorded {
        attacker.send_to(p, addr).await.unwrap();
    }
    let mut buf = vec![0u8; 65536];
    let answer = tokio::time::timeout(Duration::from_secs(2), attacker.recv_from(&mut buf)).await;
    assert!(answer.is_ok(), "the replay reached a new handshake");
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(
        h.is_detached(),
        "the replayed resume did not attach the session"
    );
    let evs = drain_events(&mut events, Duration::from_millis(300)).await;
    let uplinks = evs
        .iter()
        .filter(|e| matches!(e, pb::event::Kind::Uplink(u) if u.client_msg_id == "once"))
        .count();
    let opened = evs
        .iter()
        .filter(|e| matches!(e, pb::event::Kind::Opened(_)))
        .count();
    assert_eq!(uplinks, 1, "the uplink went upstream once");
    assert_eq!(
        opened, 2,
        "the login and the recorded resume; no third: {evs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_inside_a_quic_stream_are_refused_as_over_tcp() {
    let g = start(quic_config()).await;
    let q = g.quic_connector();
    // Not a protobuf envelope, before login: Error + Close(BAD_FRAME).
    let mut c = q
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    c.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    let mut codes = Vec::new();
    while let Ok(Some(f)) = c.recv_timeout(Duration::from_secs(5)).await {
        match f.body {
            Some(Resp::Error(e)) => codes.push(e.code),
            Some(Resp::Close(cl)) => {
                codes.push(cl.code);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(codes, vec![Code::BadFrame as i32, Code::BadFrame as i32]);
    // A length prefix over the maximum: Close(FRAME_TOO_LARGE), nothing read.
    let mut c = q
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    c.send_raw(&u32::MAX.to_be_bytes()).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(close_of(&f), Code::FrameTooLarge);
    // The gateway carries on.
    let (_q, mut ok_c, _) = g.login_quic("h", "phone").await;
    ok_c.ping().await.unwrap();
    assert!(ok_c
        .recv_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_applies_to_quic() {
    let mut cfg = quic_config();
    cfg.limits.max_connections = 1;
    let g = start(cfg).await;
    let (_q, mut first, _) = g.login_quic("cap", "a").await;
    let q = g.quic_connector();
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        q.connect(g.quic.unwrap(), "localhost", false),
    )
    .await
    .expect("refused at once, not left to time out");
    assert!(refused.is_err(), "the second connection is refused");
    first.ping().await.unwrap();
    assert!(first
        .recv_timeout(Duration::from_secs(5))
        .await
        .unwrap()
        .is_some());
    assert_eq!(g.gw.limits().connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_client_that_never_reads_holds_only_what_the_bounds_allow() {
    let mut cfg = quic_config();
    cfg.delivery.stall_timeout = Duration::from_secs(1);
    let (queue, detached) = (cfg.delivery.queue_bytes, cfg.delivery.detached_bytes);
    let g = start(cfg).await;
    let (up, _events) = g.upstream(false).await;
    let (_q, c, ok) = g.login_quic("nr", "phone").await;
    // 8 MiB of pushes to a device that reads nothing: QUIC flow control
    // stops the stream at the device's window, the session's queue bound
    // cuts the connection, and the detached bound caps what waits.
    let body = Bytes::from(vec![1u8; 4096]);
    for _ in 0..2048 {
        push_phone(&up, "nr", body.clone(), pb::Lane::Interactive).await;
    }
    let h =
        g.gw.registry()
            .session(tether::ids::SessionId(ok.session_id))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.is_detached() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.is_detached(), "cut as a slow consumer, kept for a resume");
    let held = g.gw.budget().used() as u64;
    eprintln!("held for a device that never reads: {held} bytes (queue bound {queue}, detached bound {detached})");
    assert!(held <= detached, "{held} bytes held");
    drop(c);
}

/// A UDP relay between one client and the gateway, which shows `seen`
/// every datagram the client sends before forwarding it.
async fn relay(gateway: SocketAddr, mut seen: impl FnMut(&[u8]) + Send + 'static) -> SocketAddr {
    let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(gateway).await.unwrap();
    let addr = front.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut buf, mut back_buf) = (vec![0u8; 65536], vec![0u8; 65536]);
        let mut client = None;
        loop {
            tokio::select! {
                r = front.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    seen(&buf[..n]);
                    let _ = back.send(&buf[..n]).await;
                }
                r = back.recv(&mut back_buf) => {
                    let Ok(n) = r else { return };
                    if let Some(c) = client {
                        let _ = front.send_to(&back_buf[..n], c).await;
                    }
                }
            }
        }
    });
    addr
}

/// A relay that decodes the destination connection ID of every
/// short-header packet the client sends (those carry a connection ID the
/// gateway issued): (decoded to this node, not).
async fn cid_relay(
    gateway: SocketAddr,
    cfg: tether::quic::cid::CidConfig,
) -> (SocketAddr, tokio::sync::watch::Receiver<(usize, usize)>) {
    let (tx, rx) = tokio::sync::watch::channel((0usize, 0usize));
    let len = 1 + cfg.server_id.len() + usize::from(cfg.nonce_len);
    let (mut ok, mut bad) = (0, 0);
    let addr = relay(gateway, move |p| {
        if p.len() > len && p[0] & 0x80 == 0 {
            match tether::quic::cid::decode(&cfg, &p[1..1 + len]) {
                Ok(d) if d.server_id() == cfg.server_id.as_slice() => ok += 1,
                _ => bad += 1,
            }
            let _ = tx.send((ok, bad));
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_id_the_gateway_issues_routes_to_its_node() {
    let cid: tether::quic::cid::CidConfig = toml::from_str(
        "config_id = 1\nserver_id = \"0a17\"\nnonce_len = 8\nkey = \"8f95f09245765f80256934e50c66207f\"\n",
    )
    .unwrap();
    let mut cfg = quic_config();
    cfg.quic.cid = Some(cid.clone());
    let g = start(cfg).await;
    let (relay, seen) = cid_relay(g.quic.unwrap(), cid).await;
    let q = g.quic_connector();
    let mut c = q.connect(relay, "localhost", false).await.unwrap();
    c.login(&token("cid", "phone"), "phone").await.unwrap();
    for _ in 0..10 {
        c.ping().await.unwrap();
        let _ = c.recv_timeout(Duration::from_secs(5)).await.unwrap();
    }
    let (ok, bad) = *seen.borrow();
    assert!(ok >= 10, "{ok} short-header packets seen");
    assert_eq!(
        bad, 0,
        "every connection ID decodes to this node's server ID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_allows_no_unidirectional_stream_gets_bulk_on_its_own_stream() {
    let g = start(quic_config()).await;
    let (up, _events) = g.upstream(false).await;
    let q = tether::client::QuicConnector::with_transport(
        "127.0.0.1:0".parse().unwrap(),
        &g.ca(),
        |t| {
            t.max_concurrent_uni_streams(0u32.into());
        },
    )
    .unwrap();
    let mut c = q
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .unwrap();
    c.login(&token("one", "phone"), "phone").await.unwrap();
    push_phone(&up, "one", Bytes::from_static(b"b"), pb::Lane::Bulk).await;
    push_phone(&up, "one", Bytes::from_static(b"i"), pb::Lane::Interactive).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = push_within(&mut c, Duration::from_secs(5), "a push").await;
        got.push((p.lane, p.seq));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            (pb::Lane::Interactive as i32, 1),
            (pb::Lane::Bulk as i32, 1)
        ],
        "both lanes arrive on the client's stream"
    );
}

/// One login timeout from the end of the handshake covers both the wait for
/// the client's stream and the wait for its Login: a client that opens its
/// stream late does not get a second timeout for the Login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_for_the_stream_counts_in_the_login_timeout() {
    let mut cfg = quic_config();
    cfg.session.login_timeout = Duration::from_secs(1);
    let g = start(cfg).await;
    let mut c = g
        .quic_connector()
        .connect(g.quic.unwrap(), "localhost", false)
        .await
        .expect("handshake");
    let handshaken = Instant::now();
    // The stream reaches the gateway with its first bytes: two bytes of a
    // length prefix, late, and never a Login.
    tokio::time::sleep(Duration::from_millis(900)).await;
    c.send_raw(&[0, 0]).await.unwrap();
    let f = c
        .recv_timeout(Duration::from_secs(5))
        .await
        .expect("a frame in time")
        .expect("a Close, not the end");
    assert_eq!(close_of(&f), Code::LoginTimeout);
    let took = handshaken.elapsed();
    // One timeout (1 s, plus a timer tick) rather than the stream's wait
    // plus a whole second one (1.9 s).
    assert!(
        took < Duration::from_millis(1_500),
        "closed {took:?} after the handshake"
    );
}
