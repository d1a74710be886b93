//! Headless Chromium for tests of pages the gateway serves: find it, run it
//! on a URL with a private profile and a time limit, and kill it when done.
//!
//! - [`dump_dom`]: the DOM after the page's scripts ran (`--dump-dom`),
//!   what a test asserts on when the page fills itself in with JavaScript;
//! - [`screenshot`]: a PNG of the page after its scripts ran;
//! - [`open`]: keeps a page open until the returned guard drops, for tests
//!   whose assertions are made server-side (the page's polling, say).
//!
//! Each is blocking (a child process): call it from `spawn_blocking` in an
//! async test, so that the gateway it loads keeps running. Plain std.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Chromium is: `$CHROMIUM`, else `chromium`, `chromium-browser` or
/// `google-chrome` on the PATH. Panics with how to install it.
pub fn chromium_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return p.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "Chromium not found: the status page's tests load it in headless Chromium. \
         Install it (Debian: `apt-get install chromium`; or set CHROMIUM to its path), \
         or run scripts/test, which installs it"
    );
}

/// A running Chromium with its own profile directory; killed (and its
/// profile removed) on drop.
pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts headless Chromium on `url` with `extra` flags, its standard
    /// output piped.
    fn start(url: &str, extra: &[String]) -> Self {
        let profile = tempfile::tempdir().expect("a profile directory");
        let child = Command::new(chromium_binary())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--disable-component-update",
                "--mute-audio",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium_binary().display()));
        Self {
            child,
            _profile: profile,
        }
    }

    /// Waits for it to exit within `timeout`; its standard output. Panics
    /// (and kills it) past the timeout or on a failed exit.
    fn output(mut self, timeout: Duration) -> String {
        let mut stdout = self.child.stdout.take().expect("stdout is piped");
        // Read on a thread: a page bigger than the pipe would otherwise
        // block Chromium before it exits.
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for Chromium") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium did not finish within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = reader.join().unwrap_or_default();
        assert!(status.success(), "Chromium failed: {status}");
        out
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The DOM of `url` once its scripts have had `budget` of virtual time
/// (`--virtual-time-budget`: timers run as fast as the page lets them, and
/// the clock waits while a fetch is in flight, so a page that polls once a
/// second has polled `budget` seconds' worth). Panics past `timeout`.
pub fn dump_dom(url: &str, budget: Duration, timeout: Duration) -> String {
    let flags = [
        "--dump-dom".to_owned(),
        format!("--virtual-time-budget={}", budget.as_millis()),
    ];
    Chromium::start(url, &flags).output(timeout)
}

/// A PNG of `url` at `width`×`height` after `budget` of virtual time, in
/// `path`. Panics past `timeout` or when no image was written.
pub fn screenshot(
    url: &str,
    path: &Path,
    (width, height): (u32, u32),
    budget: Duration,
    timeout: Duration,
) {
    let _ = std::fs::remove_file(path);
    let flags = [
        format!("--screenshot={}", path.display()),
        format!("--window-size={width},{height}"),
        format!("--virtual-time-budget={}", budget.as_millis()),
    ];
    Chromium::start(url, &flags).output(timeout);
    let png = std::fs::read(path).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG"),
        "no screenshot written to {}",
        path.display()
    );
}

/// Opens `url` and keeps it open (its scripts running in real time) until
/// the guard drops.
pub fn open(url: &str) -> Chromium {
    // The DevTools endpoint keeps a headless browser running with its page
    // until it is killed; port 0 lets the system pick one.
    Chromium::start(url, &["--remote-debugging-port=0".to_owned()])
}
