//! A flood of TLS sockets that never finish their ClientHello (5,000 silent,
//! 5,000 sending a byte a second) does not hold a real device's TLS login
//! back: it still completes within a second, on the real binary with its
//! default limits.
//!
//! The gateway runs as a child process (`tether serve`): 10,000 client
//! sockets and up to as many server sides would not fit in one process
//! under a 20,000-descriptor limit with a margin. The test raises its soft
//! descriptor limit to the hard one, which the child inherits.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tether::client::Client;

mod common;

const SILENT: usize = 5_000;
const SLOW: usize = 5_000;

/// Raises the soft descriptor limit to the hard one; returns it.
fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is a valid rlimit for the call to fill and then read.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    l.rlim_cur
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics_of(port: u16) -> String {
    tokio::task::spawn_blocking(move || common::scrape(port))
        .await
        .unwrap()
}

/// A complete ClientHello as a rustls client sends it.
async fn client_hello(ca: &std::path::Path) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let cfg = tether::tls::client_config_pinned(ca).unwrap();
    let name = tether::tls::server_name("localhost").unwrap();
    let (a, mut b) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(async move {
        let _ = tokio_rustls::TlsConnector::from(cfg).connect(name, a).await;
    });
    let mut buf = vec![0; 64 * 1024];
    let n = b.read(&mut buf).await.unwrap();
    task.abort();
    buf.truncate(n);
    buf
}

/// A TCP connection to `to` from 127.0.0.`2 + i % 250` (loopback aliases:
/// many sources, and no shortage of ephemeral ports).
async fn connect_from(i: usize, to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    let from = std::net::SocketAddr::from(([127, 0, 0, 2 + (i % 250) as u8], 0));
    s.bind(from).unwrap();
    s.connect(to).await.unwrap()
}

struct Gateway {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real device: TLS handshake and login, timed.
async fn real_login(addr: std::net::SocketAddr, ca: &std::path::Path, n: usize) -> Duration {
    let t0 = Instant::now();
    let mut c = Client::connect_tls(addr, "localhost", ca)
        .await
        .expect("TLS connect");
    let device = format!("phone-{n}");
    c.login(&common::token("alice", &device), &device)
        .await
        .expect("login");
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_tls_login_gets_through_10k_silent_and_slow_sockets_within_a_second() {
    let limit = raise_nofile();
    assert!(
        limit >= (SILENT + SLOW + 1_000) as u64,
        "the descriptor limit {limit} is too low for this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let (tls, upstream, metrics) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let cfg = dir.path().join("tether.toml");
    // Default [tls] and [limits]: the defaults are what this proves.
    std::fs::write(
        &cfg,
        format!(
            "[listen]\ntcp = []\ntls = [\"127.0.0.1:{tls}\"]\nquic = []\n\n\
             [tls]\ndev_cert_dir = \"{}\"\n\n\
             [upstream]\ntcp = \"127.0.0.1:{upstream}\"\n\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let child = common::serve_binary(dir.path(), &cfg, Stdio::null());
    let ca = dir.path().join("dev-cert.pem");
    let _gw = Gateway { child, _dir: dir };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], tls).into();

    // Up, and a login's time with no flood.
    let t0 = Instant::now();
    let quiet = loop {
        if ca.exists() && tokio::net::TcpStream::connect(addr).await.is_ok() {
            break real_login(addr, &ca, 0).await;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "gateway did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Resident memory before the flood (sampled once a second).
    let mut rss0 = 0.0;
    for _ in 0..30 {
        rss0 = metric(
            &metrics_of(metrics).await,
            "tether_process_resident_memory_bytes ",
        );
        if rss0 > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The flood: 5,000 silent sockets, then 5,000 that trickle a real
    // ClientHello at a byte a second.
    let hello = client_hello(&ca).await;
    let flood0 = Instant::now();
    let mut silent = Vec::with_capacity(SILENT);
    for i in 0..SILENT {
        silent.push(connect_from(i, addr).await);
    }
    let mut slow = Vec::with_capacity(SLOW);
    for i in 0..SLOW {
        slow.push(connect_from(SILENT + i, addr).await);
    }
    let opened = flood0.elapsed();
    let trickle = tokio::spawn(async move {
        for b in hello.iter().cycle() {
            for s in &slow {
                let _ = s.try_write(&[*b]);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });

    // Every flood socket accepted (in a handshake or closed by now).
    let t0 = Instant::now();
    let text = loop {
        let text = metrics_of(metrics).await;
        let accepted = metric(
            &text,
            "tether_connections_accepted_total{transport=\"tls\"}",
        );
        if accepted >= (SILENT + SLOW + 1) as f64 {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the flood was not accepted: {accepted}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pending = metric(&text, "tether_tls_handshakes_pending ");
    let rss = metric(&text, "tether_process_resident_memory_bytes ");

    // A real device, while the flood holds the port: within a second.
    let during = real_login(addr, &ca, 1).await;
    eprintln!(
        "flood opened in {opened:?}; {pending} handshakes pending; \
         login alone {quiet:?}, during the flood {during:?}; \
         RSS {:.1} MB -> {:.1} MB",
        rss0 / 1e6,
        rss / 1e6
    );
    assert!(
        during < Duration::from_secs(1),
        "a real TLS login took {during:?} behind the flood"
    );
    // The set of handshakes in progress is bounded: the oldest flood
    // sockets made room for newer ones.
    let default_cap = tether::config::Config::default().tls.max_pending_handshakes;
    assert!(pending <= f64::from(default_cap), "{pending} pending");
    let text = metrics_of(metrics).await;
    assert!(
        metric(&text, "tether_tls_handshakes_total{result=\"evicted\"}")
            >= (SILENT + SLOW - default_cap as usize) as f64,
        "{text}"
    );

    // The slow ones are cut at tls.hello_timeout (5 s), not held for the
    // handshake timeout (10 s); a device still gets through meanwhile.
    let hello_timeout = tether::config::Config::default().tls.hello_timeout;
    let mut n = 2;
    let ended = loop {
        let during = real_login(addr, &ca, n).await;
        assert!(
            during < Duration::from_secs(1),
            "login {n} took {during:?} behind the flood"
        );
        n += 1;
        let text = metrics_of(metrics).await;
        if metric(&text, "tether_tls_handshakes_pending ") == 0.0 {
            break text;
        }
        // Each socket is cut within the hello timeout of its accept.
        assert!(
            flood0.elapsed() < opened + hello_timeout + Duration::from_secs(3),
            "the flood was not cut at the hello timeout: {text}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        metric(
            &ended,
            "tether_tls_handshakes_total{result=\"hello_timeout\"}"
        ) > 0.0,
        "{ended}"
    );
    assert_eq!(
        metric(&ended, "tether_tls_handshakes_total{result=\"timeout\"}"),
        0.0,
        "{ended}"
    );
    eprintln!(
        "flood cut after {:?}; {} logins during it",
        flood0.elapsed(),
        n - 1
    );
    trickle.abort();
    drop(silent);
}
