//! Shared helpers for the integration tests: a gateway on ephemeral ports,
//! token minting, and small waits.
#![allow(dead_code)]

pub mod browser;
pub mod http;
pub mod nats;
pub mod system;
pub use system::free_port;

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
    pub quic: Option<SocketAddr>,
    pub upstream: SocketAddr,
    pub gw: Arc<Gateway>,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// WebSocket listeners (`listen.ws`, `listen.wss`), if configured.
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub certs: tempfile::TempDir,
    /// What [`TestGateway::client`] connects over.
    pub clients_over: Over,
}

/// A transport test clients connect over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl Over {
    /// Adds the listener this transport needs to `cfg` (TCP is always on).
    pub fn listen(self, cfg: &mut Config) {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        match self {
            Over::Tcp => {}
            Over::Tls => cfg.listen.tls = vec![any],
            Over::Ws => cfg.listen.ws = vec![any],
            Over::Wss => cfg.listen.wss = vec![any],
        }
    }
}

/// The WebSocket request test clients make (Host only, no Origin).
pub fn ws_request() -> tether::ws_client::WsRequest {
    tether::ws_client::WsRequest {
        host: "localhost".into(),
        origin: None,
    }
}

/// Sends SIGTERM to a child process; false if it is already gone. A system
/// call rather than the `kill` program, which a minimal system lacks.
pub fn sigterm(child: &std::process::Child) -> bool {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return false;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the
    // pid is our own child's, not yet reaped (we hold its `Child`).
    unsafe { libc::kill(pid, libc::SIGTERM) == 0 }
}

/// GET /metrics on loopback `port` over a raw socket (no HTTP client in the
/// dependency tree): the whole response, head and body.
pub fn scrape(port: u16) -> String {
    http_get(port, "/metrics")
}

/// `tether serve --config <cfg>` of this build, run in `dir`, its output
/// dropped and its standard error as `stderr` says.
pub fn serve_binary(
    dir: &std::path::Path,
    cfg: &std::path::Path,
    stderr: std::process::Stdio,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--config"])
        .arg(cfg)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start tether serve")
}

/// A device connection to 127.0.0.1:`port`, retried until a gateway that
/// is starting listens there (at most 20 s).
pub async fn connect_when_up(port: u16) -> Client {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(c) = Client::connect_tcp(("127.0.0.1", port)).await {
            return c;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1.1 GET of `path` on 127.0.0.1:`port`: the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// A config bound to loopback ephemeral ports, TLS off, dev cert in a temp dir.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.listen.tcp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.listen.tls = vec![];
    cfg.listen.quic = Some(vec![]);
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
        quic: addrs.quic.first().copied(),
        upstream: addrs.upstream_tcp.unwrap(),
        gw,
        stop,
        done,
        ws: addrs.ws.first().copied(),
        wss: addrs.wss.first().copied(),
        certs,
        clients_over: Over::Tcp,
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
        self.client_over(self.clients_over).await
    }

    /// A client over `over` (its listener must be configured).
    pub async fn client_over(&self, over: Over) -> Client {
        let none = || panic!("clients over {over:?}, and no such listener");
        match over {
            Over::Tcp => Client::connect_tcp(self.tcp).await.unwrap(),
            Over::Tls => {
                Client::connect_tls(self.tls.unwrap_or_else(none), "localhost", &self.ca())
                    .await
                    .unwrap()
            }
            Over::Ws => Client::connect_ws(self.ws.unwrap_or_else(none), &ws_request())
                .await
                .unwrap(),
            Over::Wss => Client::connect_wss(
                self.wss.unwrap_or_else(none),
                "localhost",
                &self.ca(),
                &ws_request(),
            )
            .await
            .unwrap(),
        }
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

    /// Sessions with a connection attached (detached ones wait for a resume).
    pub fn attached(&self) -> usize {
        self.gw.registry().len() - self.gw.detached_count()
    }

    /// Waits until `n` sessions have a connection (logins are synchronous with
    /// LoginOk, so this is only needed after closes).
    pub async fn wait_sessions(&self, n: usize) {
        for _ in 0..500 {
            if self.attached() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("expected {n} attached sessions, have {}", self.attached());
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

/// The next push on `c` within `d`, skipping Pongs; any other frame, a
/// close or the timeout fails naming `what`.
pub async fn push_within(c: &mut Client, d: Duration, what: &str) -> pb::Push {
    let deadline = std::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match c.recv_timeout(left).await {
            Ok(Some(f)) => match f.body {
                Some(pb::server_frame::Body::Push(p)) => return p,
                Some(pb::server_frame::Body::Pong(_)) => {}
                other => panic!("{what}: expected a push, got {other:?}"),
            },
            Ok(None) => panic!("{what}: the connection closed"),
            Err(e) => panic!("{what} did not arrive within {d:?}: {e}"),
        }
    }
}

/// A Login of `user`'s `device` that resumes `ok`'s session, claiming the
/// pushes up to `last_seq` and `last_bulk_seq`.
pub fn resume_login(
    user: &str,
    device: &str,
    ok: &pb::LoginOk,
    last_seq: u64,
    last_bulk_seq: u64,
) -> pb::Login {
    pb::Login {
        token: token(user, device),
        device_id: device.into(),
        platform: pb::Platform::Android as i32,
        protocol_version: 1,
        resume: Some(pb::Resume {
            session_id: ok.session_id,
            resume_token: ok.resume_token.clone(),
            last_seq,
            last_bulk_seq,
        }),
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

// ---------------------------------------------------------------------------
// Helpers added for the integration suites (login, push, limits, tls, drain...).
// ---------------------------------------------------------------------------

use pb::client_frame::Body as Req;
use pb::server_frame::Body as Resp;

/// A short wait used to show that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(250);

/// A Login request body for protocol version 1 on the desktop platform.
pub fn login_req(token: &str, device: &str) -> Req {
    Req::Login(pb::Login {
        token: token.into(),
        device_id: device.into(),
        platform: pb::Platform::Desktop as i32,
        protocol_version: 1,
        resume: None,
    })
}

/// Encodes a raw frame: a 4-byte big-endian length, then `body`.
pub fn raw_frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

/// Asserts that the gateway closed the connection: the next read is EOF (or a
/// reset), not a frame, and it happens within 3 s.
pub async fn expect_eof(c: &mut Client) {
    match c.recv_timeout(Duration::from_secs(3)).await {
        Ok(None) => {}
        Ok(Some(f)) => panic!("expected the connection to be closed, got {f:?}"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            panic!("the gateway did not close the connection in time")
        }
        // A reset is also the gateway closing the connection.
        Err(_) => {}
    }
}

/// Asserts that nothing arrives on `c` for `d` (the read times out).
pub async fn expect_silence(c: &mut Client, d: Duration) {
    match c.recv_timeout(d).await {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected no frame, got {other:?}"),
    }
}

/// Asserts a refused request: an Error with `code` echoing `rid`, then a Close
/// with `code`, then the gateway closes the connection.
pub async fn expect_refused(c: &mut Client, rid: u64, code: pb::Code) {
    let f = next(c).await;
    assert_eq!(error_of(&f), code, "error code in {f:?}");
    assert_eq!(f.request_id, rid, "the error must echo the request id");
    let f = next(c).await;
    assert_eq!(close_of(&f), code, "close code in {f:?}");
    assert_eq!(f.request_id, 0, "a Close is unsolicited");
    expect_eof(c).await;
}

/// Sends a Ping and waits for its Pong (skipping nothing else: any other frame
/// before the Pong fails the test).
pub async fn ping_pong(c: &mut Client) {
    let rid = c.ping().await.expect("send ping");
    let f = c
        .recv_timeout(Duration::from_secs(3))
        .await
        .expect("recv pong")
        .expect("connection closed instead of a pong");
    match f.body {
        Some(Resp::Pong(_)) => assert_eq!(f.request_id, rid, "pong must echo the ping's id"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

/// The next upstream event within `d`; panics on timeout or a closed stream.
pub async fn next_event(rx: &mut EventStream, d: Duration) -> pb::event::Kind {
    tokio::time::timeout(d, rx.recv())
        .await
        .expect("no upstream event in time")
        .expect("upstream event stream closed")
        .kind
        .expect("event without a kind")
}

/// Skips events until `pick` returns `Some`, within `d` overall.
pub async fn wait_event<T>(
    rx: &mut EventStream,
    d: Duration,
    mut pick: impl FnMut(&pb::event::Kind) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let ev = next_event(rx, left).await;
        if let Some(t) = pick(&ev) {
            return t;
        }
    }
}

/// Every event that arrives within `d`.
pub async fn drain_events(rx: &mut EventStream, d: Duration) -> Vec<pb::event::Kind> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        out.extend(ev.kind);
    }
    out
}

impl TestGateway {
    /// Logs in with a token carrying a `rooms` claim (not bound to a device).
    pub async fn login_rooms(
        &self,
        user: &str,
        device: &str,
        rooms: &[&str],
    ) -> (Client, pb::LoginOk) {
        let mut c = self.client().await;
        let ok = c
            .login(&token_rooms(user, rooms), device)
            .await
            .expect("login");
        (c, ok)
    }
}

impl TestGateway {
    /// The development certificate the gateway generated (its own CA).
    pub fn ca(&self) -> std::path::PathBuf {
        self.certs.path().join(tether::tls::DEV_CERT)
    }

    /// A QUIC connector on a fresh loopback UDP socket trusting the gateway.
    pub fn quic_connector(&self) -> tether::client::QuicConnector {
        tether::client::QuicConnector::new("127.0.0.1:0".parse().unwrap(), &self.ca())
            .expect("QUIC connector")
    }

    /// Logs in over QUIC with a new connector (returned, for rebinds).
    pub async fn login_quic(
        &self,
        user: &str,
        device: &str,
    ) -> (tether::client::QuicConnector, Client, pb::LoginOk) {
        let q = self.quic_connector();
        let addr = self.quic.expect("a QUIC listener");
        let mut c = q
            .connect(addr, "localhost", false)
            .await
            .expect("QUIC connect");
        let ok = c.login(&token(user, device), device).await.expect("login");
        (q, c, ok)
    }
}

/// The process's metrics recorder, installed once per test binary (it is
/// process-wide): what the admin listener renders and samples.
pub fn exporter() -> Arc<tether::metrics::Exporter> {
    static E: std::sync::OnceLock<Arc<tether::metrics::Exporter>> = std::sync::OnceLock::new();
    E.get_or_init(|| Arc::new(tether::metrics::install().expect("install the recorder")))
        .clone()
}

/// An admin listener on 127.0.0.1 for `g` (status page and API, with
/// `keys`), until the guard drops.
pub async fn start_admin(
    g: &TestGateway,
    keys: &[&str],
    max_body: usize,
    limits: tether::admin::Limits,
) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let node: Arc<dyn tether::admin::AdminNode> = g.gw.clone();
    let settings =
        tether::admin::ApiSettings::new(keys.iter().map(|k| k.to_string()).collect(), max_body);
    let admin = Arc::new(tether::admin::Admin::new(exporter(), node, settings));
    tokio::spawn(tether::admin::serve(listener, admin, limits, stop.clone()));
    (addr, stop.drop_guard())
}

/// The admin listener's bounds for tests: generous, but a request's body
/// must arrive within `request_timeout`.
pub fn admin_limits(request_timeout: Duration) -> tether::admin::Limits {
    tether::admin::Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        request_timeout,
    }
}
