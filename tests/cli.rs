//! The `tether` binary: config errors, print-config, token, a client's
//! bounded connect, `--json` output against a gateway, secrets from the
//! environment.

mod common;

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

/// A reader at the end of a pipe that went away (`tether print-config |
/// head -1`, `tether events | head`) ends the command quietly, with
/// success; it used to panic ("failed printing to stdout").
#[test]
fn output_to_a_reader_that_went_away_ends_quietly() {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(["print-config"])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run tether print-config");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert_eq!(err, "", "nothing to say on standard error");
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
    // Below the ephemeral range (free_port), so that no other test's
    // outgoing connection takes that number over TCP first.
    let held = std::net::UdpSocket::bind(("127.0.0.1", common::system::free_port())).unwrap();
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

/// `run`, from an async test: on a blocking thread, so that the gateway the
/// test runs keeps its workers.
async fn run_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, Duration::from_secs(20))
    })
    .await
    .unwrap()
}

/// `tether <cmd> --json --upstream <addr> <rest>`.
fn up_args(cmd: &str, upstream: std::net::SocketAddr, rest: &[&str]) -> Vec<String> {
    let mut v = vec![
        cmd.to_owned(),
        "--json".to_owned(),
        "--upstream".to_owned(),
        upstream.to_string(),
    ];
    v.extend(rest.iter().map(|s| (*s).to_owned()));
    v
}

/// The one JSON object a `--json` command printed on standard output.
fn json_reply(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"))
}

/// `tether events --json` as a child, and its standard output line by line.
struct Events {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Events {
    fn start(upstream: std::net::SocketAddr) -> Events {
        let mut child = Command::new(BIN)
            .args(up_args("events", upstream, &[]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn tether events");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Events { child, lines }
    }

    /// The next object whose `event` is `kind`, within 10 s; each line
    /// must be one JSON object.
    async fn next(&self, kind: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(Duration::from_millis(0)) {
                Ok(l) => l,
                Err(_) if left.is_zero() => panic!("no {kind} event within 10s"),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let v: serde_json::Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line:?}"));
            if v["event"] == kind {
                return v;
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_presence_kick_room_and_push_print_json_that_scripts_can_read() {
    let g = common::start(common::test_config()).await;
    let events = Events::start(g.upstream);
    let sub = events.next("subscribed").await;
    assert_eq!(sub["group"], "");

    let (mut dev, ok) = g.login("alice", "phone").await;
    let opened = events.next("session_opened").await;
    assert_eq!(opened["session"]["user_id"], "alice");
    assert_eq!(opened["session"]["device_id"], "phone");
    let sid = format!("{:016x}", ok.session_id);
    assert_eq!(opened["session"]["session_id"], sid.as_str());
    assert_eq!(opened["session"]["transport"], "tcp");

    // An uplink in text, then one that is not UTF-8.
    dev.send_up("c1", "chat", &b"hello \xe2\x9c\x93"[..])
        .await
        .unwrap();
    let up = events.next("uplink").await;
    assert_eq!(up["client_msg_id"], "c1");
    assert_eq!(up["route"], "chat");
    assert_eq!(up["payload"], "hello \u{2713}");
    assert_eq!(up["payload_base64"], "aGVsbG8g4pyT");
    assert_eq!(up["seq"], 1);
    assert!(up["server_msg_id"]
        .as_str()
        .is_some_and(|s| s.parse::<u64>().is_ok()));
    dev.send_up("c2", "bin", &[0xffu8, 0x00, 0x80][..])
        .await
        .unwrap();
    let up = events.next("uplink").await;
    assert_eq!(up["client_msg_id"], "c2");
    assert_eq!(up["payload"], serde_json::Value::Null);
    assert_eq!(up["payload_base64"], "/wCA");

    // Presence: alice online on one device, bob offline.
    let out = run_async(up_args("presence", g.upstream, &["alice,bob"])).await;
    let p = json_reply(&out);
    assert_eq!(p["users"][0]["user_id"], "alice");
    assert_eq!(p["users"][0]["online"], true);
    assert_eq!(p["users"][0]["devices"][0]["device_id"], "phone");
    assert_eq!(p["users"][0]["devices"][0]["session_id"], sid.as_str());
    assert_eq!(p["users"][1]["user_id"], "bob");
    assert_eq!(p["users"][1]["online"], false);
    assert_eq!(p["failed_nodes"], serde_json::json!([]));

    // Room, then a push to it that reaches the device.
    let out = run_async(up_args(
        "room",
        g.upstream,
        &["--room", "r1", "--users", "alice"],
    ))
    .await;
    assert_eq!(json_reply(&out)["sessions"], 1);
    let out = run_async(up_args(
        "push",
        g.upstream,
        &["--room", "r1", "--data", "to the room"],
    ))
    .await;
    let r = json_reply(&out);
    assert_eq!(r["sessions"], 1);
    assert_eq!(r["dropped"], 0);
    let id = r["message_id"].as_str().expect("a message id").to_owned();
    // The uplinks' SendAcks come first.
    let push = loop {
        let f = common::next(&mut dev).await;
        if let Some(tether::wire::pb::server_frame::Body::Push(p)) = f.body {
            break p;
        }
    };
    assert_eq!(push.message_id, id);
    assert_eq!(&push.payload[..], b"to the room");

    // Kick: the reply counts one session, the event names the code.
    let out = run_async(up_args(
        "kick",
        g.upstream,
        &["--user", "alice", "--reason", "bye"],
    ))
    .await;
    assert_eq!(json_reply(&out)["sessions"], 1);
    let closed = events.next("session_closed").await;
    assert_eq!(closed["session"]["session_id"], sid.as_str());
    assert_eq!(closed["code_name"], "CODE_KICKED");
    assert_eq!(closed["code"], tether::wire::pb::Code::Kicked as i32);
}

/// Waits up to 20 s for `child` to exit; its status.
async fn exit_of(mut child: std::process::Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("still running after 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_json_ends_quietly_when_its_reader_goes_and_with_an_error_when_the_gateway_does() {
    let g = common::start(common::test_config()).await;
    // `tether events --json`, once it printed its first line, and the
    // reader of its standard output.
    let subscribed = || async {
        let mut child = Command::new(BIN)
            .args(up_args("events", g.upstream, &[]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (first, stdout) = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            (line, stdout)
        })
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["event"], "subscribed");
        (child, stdout)
    };
    // A reader that takes one line and goes (`| head -n 1`): the pipe is
    // closed when the next event is written.
    let (child, stdout) = subscribed().await;
    drop(stdout);
    let (_dev, _) = g.login("alice", "phone").await;
    let out = exit_of(child).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");

    // The gateway going away ends the stream with an error object.
    // (Its reader stays: the drain closes alice's session, an event it
    // prints.)
    let (child, _stdout) = subscribed().await;
    g.stop.cancel();
    let out = exit_of(child).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(err.lines().last().expect("a line"))
        .unwrap_or_else(|e| panic!("not JSON ({e}): {err}"));
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("closed the upstream connection")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_command_that_fails_prints_one_error_object_on_stderr() {
    let g = common::start(common::test_config()).await;
    let mut args = up_args("push", g.upstream, &["--all", "--data", "x"]);
    args.extend(["--secret".to_owned(), "not-the-upstream-secret".to_owned()]);
    let out = run_async(args).await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    let last = stderr.lines().last().expect("a line on stderr");
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"));
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    assert_eq!(v["code_name"], "CODE_UPSTREAM_AUTH_FAILED", "{v}");
    assert_eq!(
        v["code"],
        tether::wire::pb::Code::UpstreamAuthFailed as i32,
        "{v}"
    );
    // Every other line on stderr is a JSON log line.
    for l in stderr.lines() {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
    }

    // A command line that does not parse: an object too, status 2.
    let out = run_async(up_args("push", g.upstream, &["--all"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stderr}"));
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("--data")),
        "{v}"
    );

    // Nothing listens: the error is an object too, without a code.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let out = run_async(up_args("presence", addr, &["alice"])).await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let v: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains(&addr.to_string())),
        "{v}"
    );
    assert_eq!(v.get("code"), None, "{v}");
}

/// A config for `tether serve` on ports from `free_port`, TLS and QUIC
/// off: (the file, the client port, the upstream port).
fn serve_config(dir: &Path) -> (std::path::PathBuf, u16, u16) {
    let tcp = common::free_port();
    let up = common::free_port();
    let path = dir.join("env.toml");
    std::fs::write(
        &path,
        format!(
            "node_id = \"env-test\"\n[listen]\ntcp = [\"127.0.0.1:{tcp}\"]\ntls = []\nquic = []\n\n[upstream]\ntcp = \"127.0.0.1:{up}\"\n\n[metrics]\nlisten = \"\"\n\n[shutdown]\ndrain_timeout = \"1s\"\n"
        ),
    )
    .unwrap();
    (path, tcp, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_set_only_in_the_environment_are_used_and_never_printed() {
    let auth = "auth-secret-from-the-environment-7f3a";
    let upstream = "upstream-secret-from-the-environment-91c2";
    let dir = tempfile::tempdir().unwrap();
    let (cfg, tcp, up) = serve_config(dir.path());
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("TETHER_AUTH_SECRET", auth)
        .env("TETHER_UPSTREAM_SECRET", upstream)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether serve");

    // A token signed with the environment's secret logs in; one signed with
    // the file's (the default) does not.
    let mut c = common::connect_when_up(tcp).await;
    let token = |secret: &str| {
        tether::auth::mint_hs256(
            secret,
            "alice",
            Some("phone"),
            Duration::from_secs(60),
            vec![],
        )
        .unwrap()
    };
    let ok = c.login(&token(auth), "phone").await;
    assert!(ok.is_ok(), "a token signed with TETHER_AUTH_SECRET: {ok:?}");
    let mut other = common::connect_when_up(tcp).await;
    let refused = other
        .login(&token(tether::config::DEV_SECRET), "phone")
        .await;
    assert!(
        refused.is_err(),
        "the file's secret still works: {refused:?}"
    );

    // The upstream secret from the environment is the one the socket takes.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{up}").parse().unwrap();
    let mut args = up_args("presence", addr, &["alice"]);
    args.extend(["--secret".to_owned(), upstream.to_owned()]);
    let p = json_reply(&run_async(args).await);
    assert_eq!(p["users"][0]["online"], true, "{p}");
    let mut args = up_args("presence", addr, &["alice"]);
    args.extend([
        "--secret".to_owned(),
        tether::config::DEV_UPSTREAM_SECRET.to_owned(),
    ]);
    let out = run_async(args).await;
    assert!(
        !out.status.success(),
        "the file's upstream secret still works"
    );

    // print-config with the same environment: redacted, never the values.
    let cfg_arg = cfg.display().to_string();
    let printed = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["print-config", "--config", &cfg_arg])
            .env("TETHER_AUTH_SECRET", auth)
            .env("TETHER_UPSTREAM_SECRET", upstream)
            .env("TETHER_BUS_TOKEN", "bus-token-from-the-environment")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    let shown = text(&printed.stdout);
    for secret in [auth, upstream, "bus-token-from-the-environment"] {
        assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
    }
    let doc: toml::Table = toml::from_str(&shown).expect("print-config prints TOML");
    assert_eq!(doc["auth"]["secret"].as_str(), Some("<redacted>"));
    assert_eq!(doc["upstream"]["secret"].as_str(), Some("<redacted>"));
    assert_eq!(doc["bus"]["token"].as_str(), Some("<redacted>"));
    // The rest is the file's: the effective configuration.
    assert_eq!(doc["node_id"].as_str(), Some("env-test"));
    assert_eq!(
        doc["listen"]["tcp"][0].as_str(),
        Some(format!("127.0.0.1:{tcp}").as_str())
    );

    assert!(common::sigterm(&child));
    let out = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(log.contains("tether serving"), "{log}");
    assert!(!log.contains(auth) && !log.contains(upstream), "{log}");
    // The file's secrets are the defaults, but the environment's are in use:
    // no warning about development secrets.
    assert!(
        !log.contains("auth.secret is the development default"),
        "{log}"
    );
}

#[test]
fn an_invalid_secret_in_the_environment_is_named_by_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _, _) = serve_config(dir.path());
    let cfg = cfg.display().to_string();
    let out = Command::new(BIN)
        .args(["check-config", "--config", &cfg])
        .env("TETHER_AUTH_SECRET", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid environment variable TETHER_AUTH_SECRET: auth.secret: must be at least 16 bytes"),
        "{err}"
    );
    assert!(!err.contains("short"), "the value is printed: {err}");

    // A QUIC-LB key needs a [quic.cid] to go in, and must be 32 hex digits.
    let out = Command::new(BIN)
        .args(["check-config", "--config", &cfg])
        .env("TETHER_QUIC_CID_KEY", "00112233445566778899aabbccddeeff")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("TETHER_QUIC_CID_KEY") && err.contains("[quic.cid]"),
        "{err}"
    );
    let with_cid = dir.path().join("cid.toml");
    std::fs::write(
        &with_cid,
        format!(
            "{}\n[quic.cid]\nconfig_id = 0\nserver_id = \"0a01\"\nnonce_len = 12\n",
            std::fs::read_to_string(&cfg).unwrap()
        ),
    )
    .unwrap();
    let with_cid = with_cid.display().to_string();
    let out = Command::new(BIN)
        .args(["print-config", "--config", &with_cid])
        .env("TETHER_QUIC_CID_KEY", "00112233445566778899AABBCCDDEEFF")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let doc: toml::Table = toml::from_str(&shown).unwrap();
    assert_eq!(doc["quic"]["cid"]["key"].as_str(), Some("<redacted>"));
    assert_eq!(doc["quic"]["cid"]["server_id"].as_str(), Some("0a01"));
    assert!(!shown.to_lowercase().contains("00112233"), "{shown}");
    let out = Command::new(BIN)
        .args(["check-config", "--config", &with_cid])
        .env("TETHER_QUIC_CID_KEY", "0011")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "invalid environment variable TETHER_QUIC_CID_KEY: an AES-128 key is 16 bytes"
        ),
        "{err}"
    );
}

/// `tether client --ws` logs in over a WebSocket listener and prints what
/// it receives; the gateway lists it under the `ws` transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_websocket_logs_in_and_receives_a_push() {
    let mut cfg = common::test_config();
    cfg.listen.ws = vec!["127.0.0.1:0".parse().unwrap()];
    let g = common::start(cfg).await;
    let ws = g.ws.expect("a WebSocket listener").to_string();
    let mut child = Command::new(BIN)
        .args([
            "client", "--ws", "--addr", &ws, "--user", "wsann", "--device", "d1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether client");
    let mut stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let until = |rx: &std::sync::mpsc::Receiver<String>, seen: &mut String, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => seen.push_str(&s),
                Err(_) => return false,
            }
        }
        true
    };
    let mut seen = String::new();
    let logged_in = tokio::task::block_in_place(|| until(&rx, &mut seen, "logged in as wsann"));
    assert!(logged_in, "no login over WebSocket: {seen}");
    let (up, _) = g.upstream(false).await;
    let r = up.push_user("wsann", "over the web").await.expect("push");
    assert_eq!(r.sessions, 1, "{r:?}");
    let got = tokio::task::block_in_place(|| until(&rx, &mut seen, "over the web"));
    let p = up.presence(&["wsann"]).await.expect("presence");
    let _ = child.kill();
    let _ = child.wait();
    assert!(got, "the push was not printed: {seen}");
    let transports: Vec<_> = p[0].devices.iter().map(|d| d.transport.as_str()).collect();
    assert_eq!(transports, ["ws"], "{p:?}");
}
