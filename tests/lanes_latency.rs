//! Interactive push latency beside a bulk flood that the device takes at its
//! own pace, over TCP and over QUIC in one run: the figure behind QUIC's
//! per-lane streams. The device takes 100 bulk pushes a second and keeps at
//! most 64 KiB of them read ahead (a bounded app buffer over TCP, the bulk
//! stream's flow-control window over QUIC); 100 interactive pushes a second
//! go beside it. Prints p50/p99/max per transport; asserts that every
//! interactive push arrived. Ignored by default (it takes ~15 s); run by
//! name: `cargo test --release --test lanes_latency -- --ignored --nocapture`.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tether::client::Client;
use tether::wire::pb::{self, push_request::Target, server_frame::Body as Resp};

const BULK: usize = 2_000;
const BULK_SIZE: usize = 4096;
const INTERACTIVE: u64 = 500;
/// Bulk pushes the device keeps read ahead: 64 KiB.
const READ_AHEAD: usize = 16;

fn push(user: &str, payload: Bytes, lane: pb::Lane) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(Target::Device(pb::DeviceTarget {
            user_id: user.into(),
            device_id: "phone".into(),
        })),
        payload,
        source: "bench".into(),
        lane: lane as i32,
        ..Default::default()
    }
}

/// Runs the device; returns the interactive latencies.
async fn device(mut c: Client, base: Instant, quic: bool) -> Vec<Duration> {
    let mut lat = Vec::new();
    let mut ahead: VecDeque<u64> = VecDeque::new();
    let mut bulk_done = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if quic {
        c.pause_bulk(true);
    }
    while (lat.len() as u64) < INTERACTIVE {
        // Over TCP the device stops reading while its buffer is full; over
        // QUIC the interactive stream is always read.
        let can_read = quic || ahead.len() < READ_AHEAD;
        tokio::select! {
            _ = tick.tick() => {
                if quic {
                    if let Ok(Ok(Some(f))) = tokio::time::timeout(Duration::from_millis(1), c.recv_bulk()).await {
                        if let Some(Resp::Push(p)) = f.body { ahead.push_back(p.seq); }
                    }
                }
                if let Some(seq) = ahead.pop_front() {
                    bulk_done += 1;
                    if bulk_done.is_multiple_of(8) {
                        c.ack_lane(pb::Lane::Bulk, seq).await.unwrap();
                    }
                }
            }
            f = c.recv(), if can_read => {
                let Some(f) = f.unwrap() else { break };
                let Some(Resp::Push(p)) = f.body else { continue };
                if p.lane == pb::Lane::Bulk as i32 {
                    ahead.push_back(p.seq);
                } else {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    lat.push(base.elapsed().saturating_sub(Duration::from_micros(sent)));
                    c.ack(p.seq).await.unwrap();
                }
            }
        }
    }
    lat
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    format!(
        "p50 {:?}, p99 {:?}, max {:?} ({} pushes)",
        q(0.5),
        q(0.99),
        v[v.len() - 1],
        v.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a ~15 s measurement; run by name"]
async fn interactive_latency_beside_a_bulk_flood_tcp_and_quic() {
    let mut cfg = test_config();
    cfg.listen.quic = Some(vec!["127.0.0.1:0".parse().unwrap()]);
    cfg.limits.login_rate = 0;
    cfg.delivery.ack_timeout = Duration::from_secs(60);
    let g = start(cfg).await;
    let (up, _events) = g.upstream(false).await;
    let (mut tcp, _) = g.login("lt-tcp", "phone").await;
    tcp.ping().await.unwrap();
    let (_q, quic, _) = g.login_quic("lt-quic", "phone").await;
    let _ = tcp.recv_timeout(Duration::from_secs(5)).await.unwrap();
    let base = Instant::now();
    let flood = Bytes::from(vec![3u8; BULK_SIZE]);
    for user in ["lt-tcp", "lt-quic"] {
        for _ in 0..BULK {
            up.push(push(user, flood.clone(), pb::Lane::Bulk))
                .await
                .unwrap();
        }
    }
    let t = tokio::spawn(device(tcp, base, false));
    let q = tokio::spawn(device(quic, base, true));
    let mut every = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..INTERACTIVE {
        every.tick().await;
        for user in ["lt-tcp", "lt-quic"] {
            let now = base.elapsed().as_micros() as u64;
            up.push(push(
                user,
                Bytes::from(now.to_be_bytes().to_vec()),
                pb::Lane::Interactive,
            ))
            .await
            .unwrap();
        }
    }
    let (t, q) = (t.await.unwrap(), q.await.unwrap());
    assert_eq!(
        t.len() as u64,
        INTERACTIVE,
        "every interactive push arrived over TCP"
    );
    assert_eq!(
        q.len() as u64,
        INTERACTIVE,
        "every interactive push arrived over QUIC"
    );
    println!("interactive beside a bulk flood, TCP:  {}", summary(t));
    println!("interactive beside a bulk flood, QUIC: {}", summary(q));
}
