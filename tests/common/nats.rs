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
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on a free port and waits until it accepts connections.
    pub fn start() -> Self {
        let mut s = Self {
            port: super::free_port(),
            monitor: super::free_port(),
            child: None,
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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
