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
        Self::start_with(None)
    }

    /// Starts one with these arguments more (`--user u --pass p`,
    /// `--auth token`), and TLS if `tls` names a certificate and key.
    pub fn start_args(tls: Option<(&str, &str)>, extra: &[&str]) -> Self {
        let mut s = Self::unstarted(tls.map(|(c, k)| (c.to_string(), k.to_string())));
        s.extra = extra.iter().map(|a| a.to_string()).collect();
        s.restart();
        s
    }

    fn start_with(tls: Option<(String, String)>) -> Self {
        let mut s = Self::unstarted(tls);
        s.restart();
        s
    }

    fn unstarted(tls: Option<(String, String)>) -> Self {
        Self {
            port: super::free_port(),
            monitor: super::free_port(),
            tls,
            extra: Vec::new(),
            child: None,
        }
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
        let page = super::http_get(self.monitor, "/varz");
        page.lines()
            .find_map(|l| {
                let l = l.trim();
                l.strip_prefix("\"in_msgs\":")
                    .map(|v| v.trim().trim_end_matches(',').parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no in_msgs in {page}"))
    }

    /// Subscriptions the server holds now (from its `/subsz` page).
    pub fn subscriptions(&self) -> u64 {
        let page = super::http_get(self.monitor, "/subsz");
        page.lines()
            .find_map(|l| {
                let l = l.trim();
                l.strip_prefix("\"num_subscriptions\":")
                    .map(|v| v.trim().trim_end_matches(',').parse().unwrap_or(0))
            })
            .unwrap_or_else(|| panic!("no num_subscriptions in {page}"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
