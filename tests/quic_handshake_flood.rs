//! QUIC handshakes that never finish (a client's real Initial packets,
//! relayed from a socket that never answers) do not hold a real device's
//! QUIC login back; at most `tls.max_pending_handshakes` of them are kept
//! (the oldest make room), and those are let go at the login timeout.
//!
//! The flood's Initials come from quinn clients aimed at a sink socket; the
//! test forwards each datagram to the gateway from a relay socket that
//! ignores every answer. `quic.handshake_rate` is raised so that they all
//! make connection state: an attacker with real addresses answers Retry
//! packets, so address validation does not stop this flood.

mod common;

use std::time::{Duration, Instant};

use common::*;

const FLOOD: usize = 2_000;
const CAP: u32 = 1_000;

/// The first datagrams of `n` QUIC handshakes toward a sink: each a
/// client Initial with a fresh connection ID.
async fn initials(ca: &std::path::Path, n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let to = sink.local_addr().unwrap();
    let defaults = tether::config::Config::default();
    let tls = tether::tls::client_config_pinned(ca).unwrap();
    let cfg = tether::quic::client_config(&defaults, tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let mut out = Vec::with_capacity(n);
    let mut seen = std::collections::HashSet::new();
    // Every connection stays open until the end: dropping one would send a
    // close, which is not what this flood is made of.
    let mut connecting = Vec::with_capacity(n);
    let mut buf = vec![0u8; 2048];
    while out.len() < n {
        // A few at a time, so that the sink's buffer holds them.
        for _ in 0..64 {
            connecting.push(ep.connect(to, "localhost").unwrap());
        }
        while out.len() < n {
            match tokio::time::timeout(Duration::from_millis(100), sink.recv_from(&mut buf)).await {
                Ok(Ok((len, _))) => {
                    // One datagram per connection (its destination
                    // connection ID, after the long header's first 6 bytes).
                    let d = &buf[..len];
                    let dcid = d.get(6..6 + usize::from(d[5])).map(<[u8]>::to_vec);
                    if dcid.is_some_and(|id| seen.insert(id)) {
                        out.push(d.to_vec());
                    }
                }
                _ => break,
            }
        }
    }
    // The client endpoint's closes go to the sink, which is not read again.
    ep.close(0u32.into(), b"");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_quic_login_gets_through_2k_handshakes_that_never_finish() {
    // The recorder, before the gateway: the test reads its handshake counts.
    let metrics = exporter();
    let mut cfg = test_config();
    cfg.listen.quic = Some(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.quic.handshake_rate = 1_000_000;
    cfg.session.login_timeout = Duration::from_secs(10);
    cfg.tls.max_pending_handshakes = CAP;
    let g = start(cfg).await;
    let addr = g.quic.unwrap();

    let flood = initials(&g.ca(), FLOOD).await;
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for chunk in flood.chunks(100) {
        for d in chunk {
            relay.send_to(d, addr).await.unwrap();
        }
        // Paced, so that the gateway's socket buffer does not overflow.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The gateway took them into handshakes, up to its cap.
    let t0 = Instant::now();
    while g.gw.limits().connections() < CAP as usize * 9 / 10 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the flood made {} connections",
            g.gw.limits().connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Until the gateway has been through the whole flood: no new handshake
    // for a while. (The connection count alone cannot tell: while the flood
    // is taken in it stays one above the cap, each new handshake's
    // connection counted before the oldest's eviction has finished. A real
    // login during that time waits for CPU behind the flood's key
    // exchanges, which is `quic.handshake_rate`'s business, not a slot held.)
    let accepted = || {
        metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("tether_quic_handshakes_total{result=\"accepted\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut taken = accepted();
    let mut same = 0;
    while same < 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = accepted();
        same = if now == taken { same + 1 } else { 0 };
        taken = now;
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{taken} handshakes taken in, never settled"
        );
    }
    eprintln!("{taken} handshakes taken in {:?}", t0.elapsed());
    let held = g.gw.limits().connections();

    // A real device meanwhile: handshake and login within a second.
    let t0 = Instant::now();
    let (_q, _c, ok) = g.login_quic("alice", "phone").await;
    let during = t0.elapsed();
    eprintln!("{held} QUIC handshakes held; a real login took {during:?}");
    assert_eq!(ok.user_id, "alice");
    assert!(held <= CAP as usize, "{held} held past the cap");
    assert!(during < Duration::from_secs(1), "{during:?}");

    // They are let go at the login timeout: only the real device is left.
    let t0 = Instant::now();
    while g.gw.limits().connections() > 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(12),
            "{} connections left",
            g.gw.limits().connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
