//! The live status page's data: once a second the admin listener takes a
//! sample (what the node reports of itself, and the counters and the
//! push-wait histogram of the metrics page), keeps the last five minutes of
//! them, and serves the latest as `/status.json`, history included.
//!
//! Sampling on a timer rather than per request keeps the cost fixed: a
//! wall of screens polling every second costs one sample a second, and a
//! page opened late still draws the last five minutes. The node's own
//! numbers come through [`StatusSource`], which the gateway implements; this
//! module knows nothing of the gateway.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use crate::metrics as m;

/// Samples kept: five minutes at one a second.
pub const HISTORY: usize = 300;
/// How often a sample is taken.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Samples the headline push-wait quantiles are taken over.
const WAIT_WINDOW: usize = 10;

/// What the node reports of itself for the status page.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> NodeStatus;
}

/// The node's own numbers, true for this node (the metrics page's are the
/// process's).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub draining: bool,
    /// Open client connections, every transport.
    pub connections: u64,
    /// Open client connections by transport label, in the order of
    /// [`m::transport_labels`] (a label left out counts 0).
    pub by_transport: Vec<(&'static str, u64)>,
    /// Logged-in sessions (attached or detached).
    pub sessions: u64,
    /// Sessions without a connection, waiting for a resume.
    pub detached: u64,
    /// Idle connections parked (no task).
    pub parked: u64,
    /// Bytes of the replay budget in use, and the budget
    /// (`delivery.replay_budget`).
    pub replay_bytes: u64,
    pub replay_budget: u64,
    /// `None` for a node alone (`bus.kind = "local"`).
    pub cluster: Option<ClusterStatus>,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    /// Whether the bus's connection is up.
    pub connected: bool,
    /// The other nodes known alive, by id.
    pub peers: Vec<PeerStatus>,
}

/// Another node of the cluster.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub node_id: String,
    /// `alive`, or `draining` when it is shutting down.
    pub state: &'static str,
    /// Users with a session there.
    pub users: u64,
    pub sessions: u64,
    /// Whether this node holds its whole directory (else it asks it about
    /// every user).
    pub synced: bool,
}

/// The process counters a sample reads from the metrics page.
#[derive(Debug, Clone, Default)]
struct Counters {
    logins: f64,
    pushes: f64,
    deliveries: f64,
    slow_consumers: f64,
    resumes: f64,
    /// Cumulative counts of `tether_push_wait_seconds`, one per bucket of
    /// [`m::PUSH_WAIT_BUCKETS`] and one for `+Inf`.
    wait: Vec<f64>,
}

impl Counters {
    /// Reads the series the page shows from a rendered metrics page.
    ///
    /// Hand-written rather than a crate's: it reads the output of our own
    /// renderer (no escapes in these label values, no timestamps), for a
    /// fixed handful of names.
    fn parse(page: &str) -> Self {
        let mut c = Self {
            wait: vec![0.0; m::PUSH_WAIT_BUCKETS.len() + 1],
            ..Self::default()
        };
        let wait_bucket = format!("{}_bucket", m::PUSH_WAIT);
        for line in page.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            match name {
                m::LOGINS if label(labels, "result") == Some("ok") => c.logins += v,
                m::PUSHES => c.pushes += v,
                m::DELIVERIES => c.deliveries += v,
                m::SLOW_CONSUMERS => c.slow_consumers += v,
                m::RESUMES
                    if matches!(label(labels, "result"), Some("CODE_OK" | "CODE_RESUME_GAP")) =>
                {
                    c.resumes += v
                }
                n if n == wait_bucket => {
                    let le = label(labels, "le").unwrap_or("");
                    let i = if le == "+Inf" {
                        Some(m::PUSH_WAIT_BUCKETS.len())
                    } else {
                        le.parse::<f64>().ok().and_then(|b| {
                            m::PUSH_WAIT_BUCKETS
                                .iter()
                                .position(|x| (x - b).abs() <= x * 1e-9)
                        })
                    };
                    if let Some(i) = i {
                        c.wait[i] = v;
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// The value of `key` in a label list like `a="x",b="y"`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// The `q` quantile (0..=1) of a histogram's per-bucket counts (not
/// cumulative), interpolated linearly inside its bucket as Prometheus's
/// `histogram_quantile` does; `None` without samples. In the `+Inf` bucket
/// it is the largest finite bound.
fn quantile(q: f64, counts: &[f64]) -> Option<f64> {
    let total: f64 = counts.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut seen = 0.0;
    for (i, n) in counts.iter().enumerate() {
        if *n > 0.0 && seen + n >= rank {
            let Some(&hi) = m::PUSH_WAIT_BUCKETS.get(i) else {
                return m::PUSH_WAIT_BUCKETS.last().copied();
            };
            let lo = if i == 0 {
                0.0
            } else {
                m::PUSH_WAIT_BUCKETS[i - 1]
            };
            return Some(lo + (hi - lo) * ((rank - seen) / n).clamp(0.0, 1.0));
        }
        seen += n;
    }
    m::PUSH_WAIT_BUCKETS.last().copied()
}

/// One second of the chart.
#[derive(Debug, Clone)]
struct Sample {
    t_ms: u64,
    connections: u64,
    sessions: u64,
    logins: f64,
    pushes: f64,
    deliveries: f64,
    /// Push waits recorded in the interval, per bucket.
    wait: Vec<f64>,
    wait_p99: Option<f64>,
}

/// The samples and the latest `/status.json`.
#[derive(Debug, Default)]
pub(super) struct Sampler {
    prev: Option<(Instant, Counters)>,
    history: VecDeque<Sample>,
    latest: Option<Bytes>,
}

impl Sampler {
    /// The latest `/status.json`, if a sample was taken.
    pub(super) fn latest(&self) -> Option<Bytes> {
        self.latest.clone()
    }

    /// Takes a sample at `now` of `node` and of the metrics `page`, and
    /// renders `/status.json`.
    pub(super) fn record(&mut self, now: Instant, node: NodeStatus, page: &str) -> Bytes {
        let c = Counters::parse(page);
        let t_ms = crate::unix_ms();
        let rate = |cur: f64, old: f64, secs: f64| ((cur - old).max(0.0)) / secs;
        let (rates, wait) = match &self.prev {
            Some((then, old)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(0.001);
                let wait: Vec<f64> = c
                    .wait
                    .iter()
                    .zip(&old.wait)
                    .scan(0.0, |below, (cur, old)| {
                        // Cumulative to per bucket, over the interval (a
                        // bucket missing from the page counts as the one
                        // below it).
                        let d = (cur - old).max(0.0);
                        let own = (d - *below).max(0.0);
                        *below = below.max(d);
                        Some(own)
                    })
                    .collect();
                let r = Rates {
                    logins: rate(c.logins, old.logins, secs),
                    pushes: rate(c.pushes, old.pushes, secs),
                    deliveries: rate(c.deliveries, old.deliveries, secs),
                    slow_consumers: rate(c.slow_consumers, old.slow_consumers, secs),
                    resumes: rate(c.resumes, old.resumes, secs),
                };
                (Some(r), wait)
            }
            None => (None, vec![0.0; c.wait.len()]),
        };
        if let Some(r) = &rates {
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(Sample {
                t_ms,
                connections: node.connections,
                sessions: node.sessions,
                logins: r.logins,
                pushes: r.pushes,
                deliveries: r.deliveries,
                wait_p99: quantile(0.99, &wait),
                wait,
            });
        }
        let mut window = vec![0.0; c.wait.len()];
        for s in self.history.iter().rev().take(WAIT_WINDOW) {
            for (w, n) in window.iter_mut().zip(&s.wait) {
                *w += n;
            }
        }
        let h = &self.history;
        // Every client transport's connections, by its metric label: this
        // node's own counts (the process's gauge would mix in every node a
        // process runs, as tests do).
        let mut connections = serde_json::Map::new();
        connections.insert("total".into(), json!(node.connections));
        for t in m::transport_labels() {
            let n = node.by_transport.iter().find(|(l, _)| *l == t);
            connections.insert(t.into(), json!(n.map_or(0, |(_, n)| *n)));
        }
        let body = json!({
            "node_id": node.node_id,
            "draining": node.draining,
            "time_ms": t_ms,
            "interval_ms": INTERVAL.as_millis() as u64,
            "cluster": node.cluster,
            "connections": connections,
            "sessions": node.sessions,
            "detached": node.detached,
            "parked": node.parked,
            "rates": rates,
            "totals": {
                "logins": c.logins as u64,
                "pushes": c.pushes as u64,
                "deliveries": c.deliveries as u64,
                "slow_consumers": c.slow_consumers as u64,
                "resumes": c.resumes as u64,
            },
            "replay": { "bytes": node.replay_bytes, "budget": node.replay_budget },
            "push_wait": {
                "window_seconds": h.len().min(WAIT_WINDOW),
                "samples": window.iter().sum::<f64>() as u64,
                "p50_seconds": quantile(0.5, &window),
                "p99_seconds": quantile(0.99, &window),
            },
            "history": {
                "t_ms": h.iter().map(|s| s.t_ms).collect::<Vec<_>>(),
                "connections": h.iter().map(|s| s.connections).collect::<Vec<_>>(),
                "sessions": h.iter().map(|s| s.sessions).collect::<Vec<_>>(),
                "logins": h.iter().map(|s| s.logins).collect::<Vec<_>>(),
                "pushes": h.iter().map(|s| s.pushes).collect::<Vec<_>>(),
                "deliveries": h.iter().map(|s| s.deliveries).collect::<Vec<_>>(),
                "push_wait_p99": h.iter().map(|s| s.wait_p99).collect::<Vec<_>>(),
            },
        });
        self.prev = Some((now, c));
        // Serializing a `Value` cannot fail.
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        self.latest = Some(bytes.clone());
        bytes
    }
}

/// Per second, over the last interval.
#[derive(Debug, Clone, Serialize)]
struct Rates {
    logins: f64,
    pushes: f64,
    deliveries: f64,
    slow_consumers: f64,
    resumes: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP tether_logins_total Login attempts
# TYPE tether_logins_total counter
tether_logins_total{result="ok"} 10
tether_logins_total{result="CODE_TOKEN_EXPIRED"} 5
tether_pushes_total{target="user"} 3
tether_pushes_total{target="room"} 4
tether_push_deliveries_total 70
tether_slow_consumers_total 1
tether_resumes_total{result="CODE_OK"} 2
tether_resumes_total{result="CODE_RESUME_EXPIRED"} 9
tether_connections{transport="tcp"} 6
tether_connections{transport="quic"} 1
tether_push_wait_seconds_bucket{le="0.0001"} 0
tether_push_wait_seconds_bucket{le="0.0002"} 50
tether_push_wait_seconds_bucket{le="0.0005"} 99
tether_push_wait_seconds_bucket{le="0.001"} 100
tether_push_wait_seconds_bucket{le="+Inf"} 100
tether_push_wait_seconds_count 100
"#;

    #[test]
    fn the_page_is_read_into_counters() {
        let c = Counters::parse(PAGE);
        assert_eq!(c.logins, 10.0);
        assert_eq!(c.pushes, 7.0);
        assert_eq!(c.deliveries, 70.0);
        assert_eq!(c.slow_consumers, 1.0);
        assert_eq!(c.resumes, 2.0, "resumed only, not refused");
        assert_eq!(c.wait[1], 50.0);
        assert_eq!(c.wait[3], 100.0);
        assert_eq!(c.wait[m::PUSH_WAIT_BUCKETS.len()], 100.0);
    }

    #[test]
    fn quantiles_interpolate_inside_their_bucket() {
        let mut counts = vec![0.0; m::PUSH_WAIT_BUCKETS.len() + 1];
        assert_eq!(quantile(0.5, &counts), None);
        counts[1] = 50.0; // 100..200 µs
        counts[2] = 50.0; // 200..500 µs
        let p50 = quantile(0.5, &counts).unwrap();
        assert!((p50 - 0.0002).abs() < 1e-12, "{p50}");
        let p99 = quantile(0.99, &counts).unwrap();
        assert!((p99 - (0.0002 + 0.0003 * 0.98)).abs() < 1e-12, "{p99}");
        let mut slow = vec![0.0; m::PUSH_WAIT_BUCKETS.len() + 1];
        slow[m::PUSH_WAIT_BUCKETS.len()] = 1.0;
        assert_eq!(quantile(0.99, &slow), Some(10.0), "+Inf: the largest bound");
    }

    /// Rates are deltas over the sample's interval; the history holds at
    /// most five minutes.
    #[tokio::test(start_paused = true)]
    async fn samples_give_rates_and_a_bounded_history() {
        let mut s = Sampler::default();
        let node = || NodeStatus {
            node_id: "n1".into(),
            connections: 7,
            by_transport: vec![("tcp", 6), ("quic", 1)],
            ..NodeStatus::default()
        };
        let first: serde_json::Value =
            serde_json::from_slice(&s.record(Instant::now(), node(), PAGE)).unwrap();
        assert!(first["rates"].is_null(), "no interval yet");
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = PAGE
            .replace("{result=\"ok\"} 10", "{result=\"ok\"} 30")
            .replace("{le=\"0.0002\"} 50", "{le=\"0.0002\"} 150")
            .replace("{le=\"0.0005\"} 99", "{le=\"0.0005\"} 199")
            .replace("{le=\"0.001\"} 100", "{le=\"0.001\"} 200")
            .replace("{le=\"+Inf\"} 100", "{le=\"+Inf\"} 200");
        let v: serde_json::Value =
            serde_json::from_slice(&s.record(Instant::now(), node(), &later)).unwrap();
        assert_eq!(v["node_id"], "n1");
        assert_eq!(v["rates"]["logins"], 10.0);
        assert_eq!(v["connections"]["total"], 7);
        assert_eq!(v["connections"]["tcp"], 6);
        assert_eq!(v["connections"]["quic"], 1);
        assert_eq!(
            v["connections"]["tls"], 0,
            "every client transport is named"
        );
        assert_eq!(v["push_wait"]["samples"], 100);
        // The 100 waits of the interval all fell in 100..200 µs.
        let p50 = v["push_wait"]["p50_seconds"].as_f64().unwrap();
        assert!((p50 - 0.00015).abs() < 1e-9, "{p50}");
        assert_eq!(v["history"]["logins"].as_array().unwrap().len(), 1);
        for _ in 0..HISTORY + 10 {
            tokio::time::advance(INTERVAL).await;
            s.record(Instant::now(), node(), &later);
        }
        assert_eq!(s.history.len(), HISTORY);
    }
}
