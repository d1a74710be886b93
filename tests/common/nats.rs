//! A private nats-server for the cluster tests: started on a free port, and
//! killed and restarted by the tests that need an outage. Never the
//! machine's own server: tests must be free to stop it.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A nats-server process on 127.0.0.1:`port`; killed on drop.
pub struct NatsServer {
    pub port: u16,
    /// Its HTTP monitoring port (`/varz`, `/subsz`).
    pub monitor: u16,
    /// TLS required of clients, with this certificate and key (PEM files).
    tls: Option<(String, String)>,
    /// More arguments (authentication).
    extra: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        Self::start_args(None, &[])
    }

    /// Starts one with these arguments more (`--user u --pass p`,
    /// `--auth token`), and TLS if `tls` names a certificate and key.
    pub fn start_args(tls: Option<(&str, &str)>, extra: &[&str]) -> Self {
        let mut s = Self {
            port: super::free_port(),
            monitor: super::free_port(),
            tls: tls.map(|(c, k)| (c.to_string(), k.to_string())),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        s.restart();
        s
    }

    /// The config of node `node` of cluster `cluster` on this server, with
    /// the tests' quick heartbeat (200 ms), node timeout (1 s) and request
    /// timeout (500 ms).
    pub fn node_config(&self, cluster: &str, node: &str) -> tether::config::Config {
        let mut cfg = super::test_config();
        cfg.node_id = node.into();
        cfg.bus.kind = tether::config::bus::BusKind::Nats;
        cfg.bus.urls = vec![self.url()];
        cfg.bus.cluster = cluster.into();
        cfg.bus.heartbeat = Duration::from_millis(200);
        cfg.bus.node_timeout = Duration::from_millis(1_000);
        cfg.bus.request_timeout = Duration::from_millis(500);
        cfg
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "tls" } else { "nats" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (after [`NatsServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new(super::system::nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor.to_string()])
            .args(match &self.tls {
                Some((cert, key)) => vec!["--tls", "--tlscert", cert, "--tlskey", key],
                None => vec![],
            })
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl NatsServer {
    /// Messages the server has received from its clients so far (`/varz`).
    pub fn messages_in(&self) -> u64 {
        self.monitored("/varz", "in_msgs")
    }

    /// Subscriptions the server holds now (from its `/subsz` page).
    pub fn subscriptions(&self) -> u64 {
        self.monitored("/subsz", "num_subscriptions")
    }

    /// The number `key` on the monitoring page `path` (one per line, as
    /// nats-server prints its JSON).
    fn monitored(&self, path: &str, key: &str) -> u64 {
        let page = super::http_get(self.monitor, path);
        let prefix = format!("\"{key}\":");
        page.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(prefix.as_str())
                    .map(|v| v.trim().trim_end_matches(',').parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no {key} in {page}"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
