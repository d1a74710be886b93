//! TLS listeners with the generated development certificate, next to plain TCP.

mod common;

use std::time::Duration;

use common::*;
use tether::client::Client;
use tether::gateway::Server;
use tether::wire::pb::push_request::Target;
use tether::wire::pb::{self, Code};

fn tls_config() -> tether::config::Config {
    let mut cfg = test_config();
    cfg.listen.tls = vec!["127.0.0.1:0".parse().unwrap()];
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tcp_clients_on_one_gateway() {
    let g = start(tls_config()).await;
    let tls_addr = g.tls.expect("a TLS listener");
    let cert = g.certs.path().join("dev-cert.pem");
    assert!(cert.exists(), "the dev certificate was not generated");
    assert!(g.certs.path().join("dev-key.pem").exists());

    let mut t = Client::connect_tls(tls_addr, "localhost", &cert)
        .await
        .expect("TLS connect");
    let t_ok = t.login(&token("alice", "phone"), "phone").await.unwrap();
    assert_eq!(t_ok.user_id, "alice");
    let (mut p, _) = g.login("alice", "laptop").await;

    let (up, _) = g.upstream(false).await;
    let r = up.push_user("alice", "over-both").await.unwrap();
    assert_eq!(r.sessions, 2);
    for c in [&mut t, &mut p] {
        let f = next(c).await;
        assert_eq!(&push_of(&f).payload[..], b"over-both");
        assert_eq!(push_of(&f).message_id, r.message_id);
    }

    // A large push crosses several TLS records intact.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let r = up
        .push(pb::PushRequest {
            target: Some(Target::Device(pb::DeviceTarget {
                user_id: "alice".into(),
                device_id: "phone".into(),
            })),
            payload: big.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    let f = next(&mut t).await;
    assert_eq!(push_of(&f).payload.len(), big.len());
    assert!(
        push_of(&f).payload[..] == big[..],
        "payload corrupted over TLS"
    );
    assert_eq!(push_of(&f).seq, 2);

    // Request/response works over TLS too.
    ping_pong(&mut t).await;

    // Presence tells the transports apart.
    let users = up.presence(&["alice"]).await.unwrap();
    let mut transports: Vec<(String, String)> = users[0]
        .devices
        .iter()
        .map(|d| (d.device_id.clone(), d.transport.clone()))
        .collect();
    transports.sort();
    assert_eq!(
        transports,
        vec![
            ("laptop".to_string(), "tcp".to_string()),
            ("phone".to_string(), "tls".to_string())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_arrive_over_tls() {
    let g = start(tls_config()).await;
    let cert = g.certs.path().join("dev-cert.pem");
    let mut t = Client::connect_tls(g.tls.unwrap(), "localhost", &cert)
        .await
        .unwrap();
    let rid = t.request(login_req("not.a.jwt", "phone")).await.unwrap();
    expect_refused(&mut t, rid, Code::TokenMalformed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_rejects_a_wrong_server_name() {
    let g = start(tls_config()).await;
    let cert = g.certs.path().join("dev-cert.pem");
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        Client::connect_tls(g.tls.unwrap(), "example.com", &cert),
    )
    .await
    .expect("handshake hung");
    assert!(
        r.is_err(),
        "a certificate for localhost was accepted as example.com"
    );
    // The gateway is unaffected.
    let mut t = Client::connect_tls(g.tls.unwrap(), "127.0.0.1", &cert)
        .await
        .expect("the certificate also covers 127.0.0.1");
    t.login(&token("alice", "phone"), "phone").await.unwrap();
}

#[tokio::test]
async fn missing_certificate_file_fails_bind_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("no-such-cert.pem");
    let key = dir.path().join("no-such-key.pem");
    let mut cfg = tls_config();
    cfg.tls.dev_cert_dir = dir.path().join("dev");
    cfg.tls.cert = Some(cert.clone());
    cfg.tls.key = Some(key);
    let err = match Server::bind(cfg).await {
        Ok(_) => panic!("bind succeeded with a missing certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&cert.display().to_string()),
        "error does not name {}: {err}",
        cert.display()
    );
    // Nothing was generated in place of the configured files.
    assert!(!dir.path().join("dev").exists());
}

#[tokio::test]
async fn missing_key_file_fails_bind_naming_the_file() {
    // A real certificate, but the key file is missing.
    let dir = tempfile::tempdir().unwrap();
    tether::tls::generate_dev_cert(dir.path()).unwrap();
    let cert = dir.path().join("dev-cert.pem");
    let key = dir.path().join("missing-key.pem");
    let mut cfg = tls_config();
    cfg.tls.cert = Some(cert);
    cfg.tls.key = Some(key.clone());
    let err = match Server::bind(cfg).await {
        Ok(_) => panic!("bind succeeded with a missing key"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&key.display().to_string()),
        "error does not name {}: {err}",
        key.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshake_is_dropped() {
    let mut cfg = tls_config();
    cfg.tls.handshake_timeout = Duration::from_millis(300);
    let g = start(cfg).await;
    use tokio::io::AsyncReadExt;
    let t0 = std::time::Instant::now();
    // Plain TCP to the TLS port, saying nothing.
    let mut s = tokio::net::TcpStream::connect(g.tls.unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("the gateway kept a silent TLS connection open");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(250));
    // Its connection slot was released.
    for _ in 0..100 {
        if g.gw.limits().connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(g.gw.limits().connections(), 0);
    // A real TLS client still gets through.
    let cert = g.certs.path().join("dev-cert.pem");
    let mut t = Client::connect_tls(g.tls.unwrap(), "localhost", &cert)
        .await
        .unwrap();
    t.login(&token("alice", "phone"), "phone").await.unwrap();
}

/// Records a peer sends after the handshake that are not TLS (or do not
/// authenticate) close that connection only, and its session waits for a
/// resume as for any lost connection; the other sessions carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_after_the_handshake_close_that_connection_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut cfg = tls_config();
    cfg.listen.park_after = Duration::from_millis(100);
    let g = start(cfg).await;
    let tls_addr = g.tls.expect("a TLS listener");
    let mut good = Client::connect_tls(tls_addr, "localhost", &g.ca())
        .await
        .unwrap();
    good.login(&token("bob", "phone"), "phone").await.unwrap();

    let attacks: [&[u8]; 4] = [
        // Application data that does not authenticate.
        &[
            23, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
        ],
        // A plaintext handshake record (a renegotiation attempt).
        &[22, 3, 3, 0, 4, 1, 0, 0, 0],
        // A record longer than TLS allows.
        &[23, 3, 3, 0xff, 0xff],
        // Not TLS at all.
        b"GET / HTTP/1.1\r\n\r\n",
    ];
    for (i, bytes) in attacks.iter().enumerate() {
        let cert = g.ca();
        let cfg = tether::tls::client_config_pinned(&cert).unwrap();
        let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
        let name = tether::tls::server_name("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .expect("handshake");
        // Log in over TLS, then let it park, then write raw bytes under
        // the TLS layer.
        let login = tether::wire::frame_bytes(&pb::ClientFrame {
            request_id: 1,
            body: Some(pb::client_frame::Body::Login(pb::Login {
                token: token(&format!("mallory{i}"), "phone"),
                device_id: "phone".into(),
                platform: pb::Platform::Desktop as i32,
                protocol_version: 1,
                resume: None,
            })),
        });
        tls.write_all(&login).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        assert!(n > 0, "a LoginOk");
        tokio::time::sleep(Duration::from_millis(300)).await;
        tls.get_mut().0.write_all(bytes).await.unwrap();
        // The gateway closes the connection: the TCP stream ends (or is
        // reset) within a second.
        let tcp = tls.get_mut().0;
        let end = tokio::time::timeout(Duration::from_secs(3), async {
            let mut b = [0u8; 1024];
            loop {
                match tcp.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(end.is_ok(), "attack {i}: the connection stayed open");
    }
    // Every session waits for a resume; the good one still works.
    ping_pong(&mut good).await;
    let (up, _) = g.upstream(false).await;
    let r = up.push_user("bob", "still here").await.unwrap();
    assert_eq!(r.sessions, 1);
    assert_eq!(&push_of(&next(&mut good).await).payload[..], b"still here");
}
