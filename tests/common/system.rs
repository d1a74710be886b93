//! What the tests that start processes need from the system: ports to give
//! them, and the nats-server binary. Plain std, so that the load tool's
//! tests include this same file (`#[path]`) rather than a copy.

use std::net::{TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port the kernel hands out for outgoing connections (and for
/// `bind(0)`): a port taken from below it is never picked by a client's
/// connect in between, as one from `bind(0)` can be while many tests run.
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A port below the ephemeral range that is free on loopback for both TCP
/// and UDP now: for a child process (a gateway, a nats-server) whose config
/// needs port numbers. Each call in one test binary starts at a different
/// place, so tests running in parallel do not pick the same one; two test
/// binaries run one after the other.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 10_000;
    let high = u32::from(ephemeral_start()).max(LOW + 1_000);
    let span = high - LOW;
    let seed = std::process::id().wrapping_mul(7_919);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(37);
        let port = LOW + seed.wrapping_add(n) % span;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        let tcp = TcpListener::bind(("127.0.0.1", port)).is_ok();
        if tcp && UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on loopback between {LOW} and {high}")
}

/// Where nats-server is: $NATS_SERVER, on the PATH, or where Debian's
/// package puts it. Panics with how to install it.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/bin".into()]);
    for d in dirs {
        let p = d.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "nats-server not found: the cluster tests start their own. Install it \
         (Debian: `apt-get install nats-server`; or set NATS_SERVER to its path), \
         or run scripts/test, which installs it"
    );
}
