//! The `tether` binary: config errors, print-config, token, a client's
//! bounded connect.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tether::auth::{Claims, Verifier};
use tether::config::{AuthConfig, Config};
use tether::ids::DeviceId;
use tether::wire::Code;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// Runs the binary with `args`, killing it (and failing) after `limit`.
fn run(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stdout = Vec::new();
            let mut stderr = Vec::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_end(&mut stdout)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_end(&mut stderr)
                .unwrap();
            return Output {
                status,
                stdout,
                stderr,
            };
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`tether {}` still running after {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A config file whose listeners point at a port this test holds, so that if
/// the binary ever got as far as binding, it would say so on stderr.
fn write_config(dir: &Path, name: &str, held: u16, extra: &str) -> String {
    let path = dir.join(name);
    let text = format!(
        "node_id = \"cli-test\"\n{extra}\n[listen]\ntcp = [\"127.0.0.1:{held}\"]\ntls = []\nquic = []\n\n[upstream]\ntcp = \"127.0.0.1:0\"\n"
    );
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn serve_with_unknown_key_fails_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cfg = write_config(
        dir.path(),
        "bad.toml",
        port,
        "[session]\nbogus_knob = \"5s\"\n",
    );
    let out = run(&["serve", "--config", &cfg], Duration::from_secs(10));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(
        err.contains("bogus_knob"),
        "stderr does not name the key: {err}"
    );
    assert!(
        err.contains("bad.toml"),
        "stderr does not name the file: {err}"
    );
    assert!(!err.contains("cannot bind"), "it tried to bind: {err}");
    assert!(!err.contains("tether serving"), "it started serving: {err}");
}

#[test]
fn serve_with_bad_value_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cfg = write_config(
        dir.path(),
        "zero.toml",
        port,
        "[delivery]\nqueue_bytes = 0\n",
    );
    let out = run(&["serve", "--config", &cfg], Duration::from_secs(10));
    let err = text(&out.stderr);
    assert!(!out.status.success(), "exit status {:?}", out.status);
    assert!(
        err.contains("delivery.queue_bytes"),
        "stderr does not name delivery.queue_bytes: {err}"
    );
    assert!(!err.contains("cannot bind"), "it tried to bind: {err}");

    // check-config agrees, and accepts a good file.
    let out = run(&["check-config", "--config", &cfg], Duration::from_secs(10));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("delivery.queue_bytes"));
    let good = write_config(dir.path(), "good.toml", port, "");
    let out = run(
        &["check-config", "--config", &good],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ok"));
}

#[test]
fn serve_with_cross_field_error_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cfg = write_config(
        dir.path(),
        "idle.toml",
        port,
        "[session]\nheartbeat_interval = \"10s\"\nidle_timeout = \"5s\"\n",
    );
    let out = run(&["serve", "--config", &cfg], Duration::from_secs(10));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("session.idle_timeout"), "{err}");
}

#[test]
fn print_config_is_the_default_config() {
    let out = run(&["print-config"], Duration::from_secs(10));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    let parsed = Config::parse(&printed, "print-config").expect("print-config output parses");
    assert_eq!(parsed, Config::default());
}

#[test]
fn token_command_mints_a_verifiable_token() {
    let out = run(
        &[
            "token", "--user", "alice", "--device", "phone", "--ttl", "1h",
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let tok = stdout.trim();
    assert_eq!(tok.split('.').count(), 3, "not a JWT: {tok:?}");

    let v = Verifier::new(&AuthConfig::default()).unwrap();
    let id = v.verify(tok, &DeviceId::new("phone")).expect("verifies");
    assert_eq!(id.user.as_str(), "alice");
    // Bound to the device.
    let e = v.verify(tok, &DeviceId::new("tablet")).unwrap_err();
    assert_eq!(e.code(), Code::DeviceMismatch);

    // The lifetime is one hour.
    let data = jsonwebtoken::decode::<Claims>(
        tok,
        &jsonwebtoken::DecodingKey::from_secret(tether::config::DEV_SECRET.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .unwrap();
    let now = tether::unix_ms() / 1000;
    let ttl = data.claims.exp as i64 - now as i64;
    assert!((3590..=3610).contains(&ttl), "ttl {ttl}s");
    assert_eq!(data.claims.sub, "alice");
    assert_eq!(data.claims.dev.as_deref(), Some("phone"));
}

#[test]
fn token_command_uses_the_configured_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    std::fs::write(
        &path,
        "[auth]\nsecret = \"a-different-secret-of-enough-length\"\n",
    )
    .unwrap();
    let out = run(
        &[
            "token",
            "--user",
            "bob",
            "--config",
            &path.display().to_string(),
        ],
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let tok = stdout.trim();
    let dev = DeviceId::new("any");
    let default = Verifier::new(&AuthConfig::default()).unwrap();
    assert_eq!(
        default.verify(tok, &dev).unwrap_err().code(),
        Code::TokenBadSignature
    );
    let custom = Verifier::new(&AuthConfig {
        secret: "a-different-secret-of-enough-length".into(),
        ..AuthConfig::default()
    })
    .unwrap();
    assert_eq!(custom.verify(tok, &dev).unwrap().user.as_str(), "bob");
}

/// Runs `tether serve` with `args` on free ports until it logs that it is
/// serving, then stops it with SIGTERM; its whole standard error (a pipe).
fn serve_log(dir: &Path, extra_config: &str, args: &[&str]) -> String {
    let cfg = dir.join("serve.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"log-test\"\n{extra_config}\n[listen]\ntcp = [\"127.0.0.1:0\"]\ntls = []\nquic = []\n\n[upstream]\ntcp = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[shutdown]\ndrain_timeout = \"1s\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => {
                let serving = l.contains("tether serving");
                lines.push(l);
                if serving {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no `tether serving` line:\n{}", lines.join("\n"));
            }
        }
    }
    let pid = libc::pid_t::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the
    // pid is our own child's, not yet reaped (we hold its `Child`). A system
    // call rather than the `kill` program, which a minimal system lacks.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    lines.join("\n")
}

/// Every line is one JSON object with the fields shippers filter on.
fn assert_json_lines(log: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\n{log}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "no {field} in {line}");
        }
        out.push(v);
    }
    assert!(!out.is_empty(), "no log lines");
    out
}

#[test]
fn serve_logs_plain_lines_without_colour_to_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let log = serve_log(dir.path(), "", &[]);
    assert!(log.contains("tether serving"), "{log}");
    assert!(log.contains("WARN"), "{log}");
    assert!(!log.contains("\x1b["), "colour codes in a pipe:\n{log:?}");
}

#[test]
fn serve_logs_json_lines_with_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let log = serve_log(dir.path(), "", &["--log-format", "json"]);
    let lines = assert_json_lines(&log);
    // The event's own fields are at the top level, next to the message.
    let serving = lines
        .iter()
        .find(|v| v["message"] == "tether serving")
        .expect("a `tether serving` line");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["target"], "tether::gateway");
    assert_eq!(serving["node"], "log-test");
    assert!(lines.iter().any(|v| v["level"] == "WARN"), "{log}");
    assert!(!log.contains("\x1b["), "{log:?}");
}

#[test]
fn log_format_is_read_from_the_config_and_the_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    let log = serve_log(dir.path(), "[log]\nformat = \"json\"\n", &[]);
    assert_json_lines(&log);
    let log = serve_log(
        dir.path(),
        "[log]\nformat = \"json\"\n",
        &["--log-format", "text"],
    );
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
    assert!(
        log.contains(" INFO ") || log.contains("INFO tether"),
        "{log}"
    );
}

#[test]
fn a_failed_serve_with_json_logs_ends_on_a_json_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let cfg = write_config(dir.path(), "held.toml", port, "");
    let out = run(
        &["serve", "--log-format", "json", "--config", &cfg],
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let log = text(&out.stderr);
    let lines = assert_json_lines(&log);
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{log}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains(&port.to_string())),
        "{log}"
    );
}

#[test]
fn a_quic_client_to_a_silent_address_gives_up_within_its_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    tether::tls::generate_dev_cert(dir.path()).unwrap();
    let ca = dir.path().join(tether::tls::DEV_CERT).display().to_string();
    // Bound and never read: UDP has no "connection refused" to tell.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = run(
        &[
            "client",
            "--quic",
            "--tls-ca",
            &ca,
            "--addr",
            &addr,
            "--connect-timeout",
            "300ms",
        ],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "no QUIC answer from {addr} within 300ms (is the gateway listening on UDP {addr}?)"
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn serve_moves_quic_with_tls_and_names_the_override_when_its_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    // The UDP port this test holds; TLS asks for the same number over TCP.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tls = held.local_addr().unwrap().to_string();
    let cfg = dir.path().join("t.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\ntcp = []\n\n[tls]\ndev_cert_dir = \"{}\"\n\n[upstream]\ntcp = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let out = run(
        &["serve", "--config", &cfg, "--tls", &tls],
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "error: QUIC listens where TLS does unless listen.quic or --quic is given: cannot bind UDP {tls}"
        )),
        "{err}"
    );
}
