//! The admin listener over real sockets: every metric of the table on the
//! page from the start, the process series, 404s and 405s, and the bounds (header
//! timeout for silent and dribbling clients, the connection cap).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tether::admin::{Admin, Limits};
use tether::metrics::{self as m, Exporter, Kind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One recorder per test binary (it is process-wide): tests that read
/// counters compare before and after.
fn exporter() -> Arc<Exporter> {
    static E: OnceLock<Arc<Exporter>> = OnceLock::new();
    E.get_or_init(|| Arc::new(m::install().expect("install the recorder")))
        .clone()
}

fn limits() -> Limits {
    Limits {
        max_connections: 64,
        header_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(10),
    }
}

/// An admin listener on a free port, until the test ends.
async fn start(limits: Limits) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let admin = Arc::new(Admin::metrics_only(exporter()));
    tokio::spawn(tether::admin::serve(listener, admin, limits, stop.clone()));
    (addr, stop.drop_guard())
}

/// One request with `Connection: close`; the whole answer (head and body).
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The value of the series that `line_prefix` starts (name and labels).
fn value(page: &str, line_prefix: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// Reads until the peer closes (EOF or reset); what it sent meanwhile.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn every_metric_of_the_table_is_on_the_page_from_the_start() {
    let (addr, _stop) = start(limits()).await;
    let page = get(addr, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains("content-type: text/plain; version=0.0.4"),
        "{page}"
    );
    let mut missing = Vec::new();
    for s in m::series() {
        let name = match s.def.kind {
            Kind::Histogram => format!("{}_count", s.def.name),
            Kind::Counter | Kind::Gauge => s.def.name.to_owned(),
        };
        let series = match s.label {
            Some((k, v)) => format!("{name}{{{k}=\"{v}\"}}"),
            None => name,
        };
        if value(&page, &series).is_none() {
            missing.push(series);
        }
        assert!(
            page.contains(&format!("# HELP {} ", s.def.name)),
            "no HELP for {}",
            s.def.name
        );
    }
    assert!(missing.is_empty(), "missing {missing:?} in\n{page}");
    // The one the audit named, with nothing having migrated.
    assert_eq!(value(&page, m::QUIC_MIGRATIONS), Some(0.0), "{page}");
    assert!(value(&page, "tether_closes_total{reason=\"CODE_SLOW_CONSUMER\"}").is_some());
    assert!(value(&page, "tether_connections{transport=\"quic\"}").is_some());
}

#[tokio::test]
async fn process_series_are_on_the_page() {
    let (addr, _stop) = start(limits()).await;
    let page = get(addr, "/metrics").await;
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_start_time_seconds",
    ] {
        assert!(value(&page, name).is_some(), "no {name} in\n{page}");
    }
    // Read now, not made up: this test holds a few descriptors open itself,
    // and the process has some memory.
    assert!(value(&page, "process_open_fds").unwrap() >= 3.0);
    assert!(value(&page, "process_max_fds").unwrap() >= value(&page, "process_open_fds").unwrap());
    assert!(value(&page, "process_resident_memory_bytes").unwrap() > 1e6);
}

#[tokio::test]
async fn unknown_paths_get_404_and_other_methods_405() {
    let (addr, _stop) = start(limits()).await;
    let r = get(addr, "/nothing").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let r = get(addr, "/metrics/extra").await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = String::from_utf8(until_closed(&mut s).await).unwrap();
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert!(r.contains("allow: GET, HEAD"), "{r}");
}

/// A connection that sends nothing is closed at the header timeout (2 s of
/// virtual time), not kept.
#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_at_the_header_timeout() {
    let before = value(
        &exporter().render(),
        "tether_admin_timeouts_total{kind=\"header\"}",
    );
    let (addr, _stop) = start(limits()).await;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(60), until_closed(&mut s)).await;
    assert!(closed.is_ok(), "still open after a minute");
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2), "closed early: {took:?}");
    assert!(took < Duration::from_secs(3), "closed late: {took:?}");
    let after = value(
        &exporter().render(),
        "tether_admin_timeouts_total{kind=\"header\"}",
    );
    assert!(after >= before.map(|b| b + 1.0), "{before:?} -> {after:?}");
}

/// A client that sends its request one byte a second never completes its
/// head within the timeout: the head's time is counted as a whole, not
/// from its last byte.
#[tokio::test(start_paused = true)]
async fn a_dribbling_client_is_closed_at_the_header_timeout() {
    let (addr, _stop) = start(limits()).await;
    let t0 = Instant::now();
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut r, mut w) = s.into_split();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let dribbler = tokio::spawn(async move {
        let mut sent = 0;
        for b in request {
            if w.write_all(&[*b]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sent
    });
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "still open after a minute");
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(2), "closed early: {took:?}");
    assert!(took < Duration::from_secs(4), "closed late: {took:?}");
    // Closed before the head was complete, and nothing was served.
    let sent = dribbler.await.unwrap();
    assert!(sent < request.len(), "sent all {sent} bytes");
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
}

/// Past `max_connections`, a new connection is closed at once (its
/// descriptor given back, counted); a slot freed by a closing client is
/// then used by a scrape that works.
#[tokio::test(start_paused = true)]
async fn past_the_cap_a_connection_is_closed_at_once_and_a_freed_slot_serves() {
    let refused = || value(&exporter().render(), m::ADMIN_REFUSED).unwrap_or(0.0);
    let before = refused();
    let (addr, _stop) = start(Limits {
        max_connections: 2,
        // Long enough that no slot frees itself during the test.
        header_timeout: Duration::from_secs(300),
        ..limits()
    })
    .await;
    let holder = TcpStream::connect(addr).await.unwrap();
    let _other = TcpStream::connect(addr).await.unwrap();
    // Accepted in order: the third finds both slots taken.
    let t0 = Instant::now();
    let mut third = TcpStream::connect(addr).await.unwrap();
    let got = until_closed(&mut third).await;
    assert!(got.is_empty(), "{got:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(refused() > before, "not counted");
    // One holder leaves; a scrape takes its slot once the listener has seen
    // it go (each refused try is a fresh connection closed at once).
    drop(holder);
    let mut page = String::new();
    for _ in 0..50 {
        page = get(addr, "/metrics").await;
        if !page.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains(m::QUIC_MIGRATIONS), "{page}");
}
