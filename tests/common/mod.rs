//! Shared helpers for the integration tests: a gateway on ephemeral ports,
//! token minting, and small waits.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether::client::Client;
use tether::config::Config;
use tether::gateway::{Gateway, Server};
use tether::upstream::{Endpoint, EventStream, UpstreamClient, UpstreamOptions};
use tether::wire::pb;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = tether::config::DEV_SECRET;

pub struct TestGateway {
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub upstream: SocketAddr,
    pub gw: Arc<Gateway>,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub certs: tempfile::TempDir,
}

/// A config bound to loopback ephemeral ports, TLS off, dev cert in a temp dir.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.listen.tls = vec![];
    cfg.upstream.tcp = Some("127.0.0.1:0".parse().unwrap());
    cfg.metrics.listen = None;
    cfg.session.timer_tick = Duration::from_millis(20);
    cfg
}

pub async fn start(mut cfg: Config) -> TestGateway {
    let certs = tempfile::tempdir().unwrap();
    cfg.tls.dev_cert_dir = certs.path().to_owned();
    let server = Server::bind(cfg).await.expect("bind");
    let addrs = server.addrs().clone();
    let gw = server.gateway().clone();
    let stop = CancellationToken::new();
    let done = tokio::spawn(server.run(stop.clone()));
    TestGateway {
        tcp: addrs.tcp[0],
        tls: addrs.tls.first().copied(),
        upstream: addrs.upstream_tcp.unwrap(),
        gw,
        stop,
        done,
        certs,
    }
}

pub fn token(user: &str, device: &str) -> String {
    tether::auth::mint_hs256(SECRET, user, Some(device), Duration::from_secs(600), vec![]).unwrap()
}

pub fn token_rooms(user: &str, rooms: &[&str]) -> String {
    tether::auth::mint_hs256(
        SECRET,
        user,
        None,
        Duration::from_secs(600),
        rooms.iter().map(|r| r.to_string()).collect(),
    )
    .unwrap()
}

impl TestGateway {
    pub async fn client(&self) -> Client {
        Client::connect_tcp(self.tcp).await.unwrap()
    }

    pub async fn login(&self, user: &str, device: &str) -> (Client, pb::LoginOk) {
        let mut c = self.client().await;
        let ok = c.login(&token(user, device), device).await.expect("login");
        (c, ok)
    }

    pub async fn upstream(&self, subscribe: bool) -> (UpstreamClient, EventStream) {
        UpstreamClient::connect(
            &Endpoint::Tcp(self.upstream.to_string()),
            UpstreamOptions {
                subscribe,
                ..UpstreamOptions::default()
            },
        )
        .await
        .unwrap()
    }

    /// Waits until `n` sessions are registered (logins are synchronous with
    /// LoginOk, so this is only needed after closes).
    pub async fn wait_sessions(&self, n: usize) {
        for _ in 0..500 {
            if self.gw.registry().len() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} sessions, have {}", self.gw.registry().len());
    }
}

/// The next frame that is not a Pong, within 5 s.
pub async fn next(c: &mut Client) -> pb::ServerFrame {
    loop {
        let f = c
            .recv_timeout(Duration::from_secs(5))
            .await
            .expect("recv")
            .expect("connection closed");
        if !matches!(f.body, Some(pb::server_frame::Body::Pong(_))) {
            return f;
        }
    }
}

pub fn push_of(f: &pb::ServerFrame) -> &pb::Push {
    match &f.body {
        Some(pb::server_frame::Body::Push(p)) => p,
        other => panic!("expected a push, got {other:?}"),
    }
}

pub fn close_of(f: &pb::ServerFrame) -> pb::Code {
    match &f.body {
        Some(pb::server_frame::Body::Close(c)) => pb::Code::try_from(c.code).unwrap(),
        other => panic!("expected a close, got {other:?}"),
    }
}

pub fn error_of(f: &pb::ServerFrame) -> pb::Code {
    match &f.body {
        Some(pb::server_frame::Body::Error(e)) => pb::Code::try_from(e.code).unwrap(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Reads until the gateway closes the connection; returns the close code seen.
pub async fn expect_closed(c: &mut Client) -> pb::Code {
    let mut code = None;
    loop {
        match c.recv_timeout(Duration::from_secs(10)).await {
            Ok(Some(f)) => {
                if let Some(pb::server_frame::Body::Close(cl)) = &f.body {
                    code = Some(pb::Code::try_from(cl.code).unwrap());
                }
            }
            Ok(None) => break,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => panic!("not closed in time"),
            Err(_) => break,
        }
    }
    code.expect("a Close frame before the connection closed")
}
