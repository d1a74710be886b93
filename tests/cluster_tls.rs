//! A cluster whose NATS server requires TLS and a password, or a token:
//! the nodes' NATS client and their command links (each node's own
//! connection for the commands the others send it) both speak TLS,
//! trusting the roots `SSL_CERT_FILE` names, and log in with
//! `bus.user`/`bus.password` or `bus.token`. A test binary of its own: it
//! sets that variable for the process.

mod common;

use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::*;
use tether::wire::pb;

/// Starts nodes a and b on `nats` (`login` sets their credentials), and
/// checks that a push through a reaches a device on b: a runs it on b
/// over b's command link. Then checks the server holds four connections,
/// two per node.
async fn a_push_crosses(nats: &NatsServer, login: impl Fn(&mut tether::config::Config)) {
    let mut nodes = Vec::new();
    for name in ["a", "b"] {
        let mut cfg = nats.node_config("tls", name);
        cfg.bus.request_timeout = Duration::from_millis(1_000);
        login(&mut cfg);
        nodes.push(start(cfg).await);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let (mut bob, _) = b.login("bob", "phone").await;
    let (up, _) = a.upstream(false).await;
    // Until a knows bob is on b, a push finds no one: retry until routed.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = up
            .push(pb::PushRequest {
                target: Some(pb::push_request::Target::UserId("bob".into())),
                payload: b"crossed".to_vec().into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(r.failed.is_empty(), "node b did not answer: {r:?}");
        if r.sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never routed to b: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = push_within(&mut bob, Duration::from_secs(5), "crossed").await;
    assert_eq!(&p.payload[..], b"crossed");
    // Every connection the server holds is the nodes': two each (the
    // client and the command link).
    let connz = http_get(nats.monitor, "/connz");
    assert!(
        connz.contains("\"num_connections\": 4"),
        "four connections expected: {connz}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_run_each_others_commands_over_tls_with_a_password() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = dir.path().join("nats-cert.pem");
    let key = dir.path().join("nats-key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    // The only root either side trusts: the server's own certificate.
    std::env::set_var("SSL_CERT_FILE", &cert);
    let nats = NatsServer::start_args(
        Some((cert.to_str().unwrap(), key.to_str().unwrap())),
        &["--user", "cluster", "--pass", "s3cret"],
    );
    assert!(nats.url().starts_with("tls://"));
    a_push_crosses(&nats, |cfg| {
        cfg.bus.user = Some("cluster".into());
        cfg.bus.password = Some("s3cret".into());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_run_each_others_commands_with_a_token() {
    let nats = NatsServer::start_args(None, &["--auth", "t0ken"]);
    a_push_crosses(&nats, |cfg| cfg.bus.token = Some("t0ken".into())).await;
}
