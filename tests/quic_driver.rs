//! The gateway's QUIC driver on its own (src/transport/quic_driver.rs), over real UDP
//! sockets with quinn clients: every connection it takes is let go once it
//! has closed, from either side or by its idle timeout, and closing the
//! endpoint closes them all and ends the driver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::quic::driver::{Admission, Connection, Endpoint};

const MSG: &[u8] = b"tether!\n";

/// A driver on 127.0.0.1 with the gateway's QUIC settings (QUIC's idle
/// timeout set to `idle`), echoing what each client writes on its stream.
async fn echo_endpoint(
    dir: &std::path::Path,
    idle: Duration,
) -> (Endpoint, tokio::task::JoinHandle<()>) {
    tether::tls::generate_dev_cert(dir).unwrap();
    let cfg = tether::config::Config::default();
    let tls = tether::tls::server_config(
        &dir.join(tether::tls::DEV_CERT),
        &dir.join(tether::tls::DEV_KEY),
    )
    .unwrap();
    let mut server = tether::quic::server_config(&cfg, &tls).unwrap();
    let mut transport = tether::quic::transport_config(&cfg, false);
    transport.max_idle_timeout(Some(idle.try_into().unwrap()));
    server.transport_config(Arc::new(transport));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let ep = Endpoint::new(tether::quic::endpoint_config(&cfg).unwrap(), server, socket).unwrap();
    let driver = ep.clone();
    let task = tokio::spawn(async move {
        driver
            .run(|_| {
                Admission::Accept(Box::new(|conn| {
                    tokio::spawn(echo(conn));
                }))
            })
            .await;
    });
    (ep, task)
}

async fn echo(conn: Connection) {
    let Ok(stream) = conn.accept_bi().await else {
        return;
    };
    let mut buf = [0u8; 64];
    while let Ok(n @ 1..) = conn.read(stream, &mut buf).await {
        if conn.write_all(stream, &buf[..n]).await.is_err() {
            return;
        }
    }
}
fn client(dir: &std::path::Path) -> quinn::Endpoint {
    let tls = tether::tls::client_config_pinned(&dir.join(tether::tls::DEV_CERT)).unwrap();
    let cfg = tether::quic::client_config(&tether::config::Config::default(), tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    ep
}

/// A client connection with its stream (dropping the stream would finish
/// it, and the echo would end the connection).
type Held = (quinn::Connection, quinn::SendStream, quinn::RecvStream);

/// Connects, and has one message echoed on the client's stream.
async fn echoed(ep: &quinn::Endpoint, to: std::net::SocketAddr) -> Held {
    let conn = ep.connect(to, "localhost").unwrap().await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(MSG).await.unwrap();
    let mut back = [0u8; MSG.len()];
    recv.read_exact(&mut back).await.expect("the echo");
    assert_eq!(&back, MSG);
    (conn, send, recv)
}

/// `n` connections, each with one message echoed.
async fn echoed_many(ep: &quinn::Endpoint, to: std::net::SocketAddr, n: usize) -> Vec<Held> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(echoed(ep, to).await);
    }
    held
}

async fn until_open(ep: &Endpoint, n: usize, within: Duration) {
    let t0 = Instant::now();
    while ep.open_connections() != n {
        assert!(
            t0.elapsed() < within,
            "{} connections held, {n} expected",
            ep.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_closed_by_their_clients_are_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let (ep, _driver) = echo_endpoint(dir.path(), Duration::from_secs(30)).await;
    let c = client(dir.path());
    let conns = echoed_many(&c, ep.local_addr(), 20).await;
    assert_eq!(ep.open_connections(), 20);
    for (conn, _, _) in &conns {
        conn.close(7u32.into(), b"bye");
    }
    // Draining takes three probe timeouts: on loopback, well under a second.
    until_open(&ep, 0, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_let_go_at_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (ep, _driver) = echo_endpoint(dir.path(), Duration::from_millis(600)).await;
    let c = client(dir.path());
    // Held open on this side, silent (no keep-alive): only the server's
    // idle timeout can end it there.
    let held = echoed(&c, ep.local_addr()).await;
    assert_eq!(ep.open_connections(), 1);
    until_open(&ep, 0, Duration::from_secs(5)).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_endpoint_closes_every_connection_and_ends_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let (ep, driver) = echo_endpoint(dir.path(), Duration::from_secs(30)).await;
    let c = client(dir.path());
    let conns = echoed_many(&c, ep.local_addr(), 5).await;
    ep.close(42, b"shutting down");
    for (conn, _send, _recv) in conns {
        let err = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("closed in time");
        match err {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, 42u32.into());
                assert_eq!(&close.reason[..], b"shutting down");
            }
            other => panic!("{other:?}"),
        }
    }
    until_open(&ep, 0, Duration::from_secs(5)).await;
    // The driver has ended.
    tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("the driver ended")
        .expect("without a panic");
}
