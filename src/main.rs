//! The `tether` binary: a thin CLI over the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tether::config::{Config, LogFormat};
use tether::upstream::{json, ClientError, Endpoint, UpstreamClient, UpstreamOptions};
use tether::wire::pb;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tether", version, about = "A long-connection gateway")]
struct Cli {
    /// Log line format: text (coloured only on a terminal) or json (one
    /// object per line). Overrides log.format.
    #[arg(long, global = true, value_name = "text|json")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// TOML config file; defaults apply to every key it omits.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// This node's id (overrides node_id).
        #[arg(long)]
        node_id: Option<String>,
        /// Plain TCP listen address (overrides listen.tcp).
        #[arg(long)]
        tcp: Vec<std::net::SocketAddr>,
        /// TLS listen address (overrides listen.tls).
        #[arg(long)]
        tls: Vec<std::net::SocketAddr>,
        /// WebSocket listen address, plain (overrides listen.ws).
        #[arg(long)]
        ws: Vec<std::net::SocketAddr>,
        /// WebSocket-over-TLS listen address (overrides listen.wss).
        #[arg(long)]
        wss: Vec<std::net::SocketAddr>,
        /// QUIC (UDP) listen address (overrides listen.quic; without either,
        /// QUIC listens on the TLS addresses).
        #[arg(long)]
        quic: Vec<std::net::SocketAddr>,
        /// Upstream TCP address (overrides upstream.tcp).
        #[arg(long)]
        upstream: Option<std::net::SocketAddr>,
        /// Metrics address (overrides metrics.listen).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Print the documented default configuration; with --config, the
    /// effective one (the file, then the environment's secrets), every
    /// secret shown as "<redacted>".
    PrintConfig {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and exit.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Mint a development token (HS256, with the configured secret).
    Token {
        #[arg(long)]
        user: String,
        /// Bind the token to one device id.
        #[arg(long)]
        device: Option<String>,
        /// Lifetime, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Rooms the user may join (repeatable; `prefix*` matches every room starting with prefix).
        #[arg(long = "room")]
        rooms: Vec<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Push a message from the command line, as an upstream service would.
    Push {
        #[command(flatten)]
        up: UpstreamArgs,
        #[arg(long, group = "target")]
        user: Option<String>,
        /// With --user: one device of that user.
        #[arg(long, requires = "user")]
        device: Option<String>,
        /// Comma-separated user ids.
        #[arg(long, group = "target", value_delimiter = ',')]
        users: Option<Vec<String>>,
        #[arg(long, group = "target")]
        room: Option<String>,
        /// Every session on every node.
        #[arg(long, group = "target")]
        all: bool,
        /// The payload, as UTF-8 text.
        #[arg(long)]
        data: String,
        #[arg(long, default_value = "cli")]
        source: String,
        /// Send in the bulk lane (campaigns, feeds) instead of the interactive one.
        #[arg(long)]
        bulk: bool,
        /// Ask for delivery reports (delivered, failed, expired) as events.
        #[arg(long)]
        report: bool,
    },
    /// Kick a user (every device) or one device.
    Kick {
        #[command(flatten)]
        up: UpstreamArgs,
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "")]
        device: String,
        #[arg(long, default_value = "kicked by an operator")]
        reason: String,
    },
    /// Add users' live sessions to a room (or remove them).
    Room {
        #[command(flatten)]
        up: UpstreamArgs,
        #[arg(long)]
        room: String,
        #[arg(long, value_delimiter = ',', required = true)]
        users: Vec<String>,
        #[arg(long)]
        remove: bool,
    },
    /// Show which devices of users are online.
    Presence {
        #[command(flatten)]
        up: UpstreamArgs,
        #[arg(value_delimiter = ',', required = true)]
        users: Vec<String>,
    },
    /// Print every upstream event (uplinks, sessions, undelivered reports).
    Events {
        #[command(flatten)]
        up: UpstreamArgs,
        #[arg(long, default_value = "")]
        group: String,
    },
    /// Connect as a device, log in, and print everything received.
    Client {
        /// host:port of a client listener.
        #[arg(long, default_value = "127.0.0.1:7400")]
        addr: String,
        /// Use TLS, trusting the certificate(s) in this PEM file.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Connect over QUIC (UDP) instead of TCP; needs --tls-ca.
        #[arg(long, requires = "tls_ca")]
        quic: bool,
        /// Connect over WebSocket (ws://ADDR/tether, a listen.ws address);
        /// with --tls-ca, over TLS (wss://, a listen.wss address).
        #[arg(long, conflicts_with = "quic")]
        ws: bool,
        /// Server name to verify with TLS.
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// How long to wait for the gateway to answer the connect (TCP, TLS
        /// or QUIC handshake), e.g. 5s, 500ms.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        connect_timeout: Duration,
        /// A token; minted with the dev secret for --user when omitted.
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "alice")]
        user: String,
        #[arg(long, default_value = "cli-device")]
        device: String,
        /// Rooms to join after login.
        #[arg(long = "join")]
        join: Vec<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct UpstreamArgs {
    /// The gateway's upstream socket: host:port or unix:/path.
    #[arg(long, default_value = "127.0.0.1:7401", env = "TETHER_UPSTREAM")]
    upstream: String,
    /// The upstream shared secret.
    #[arg(long, env = "TETHER_UPSTREAM_SECRET", default_value = tether::config::DEV_UPSTREAM_SECRET, hide_default_value = true)]
    secret: String,
    /// Print JSON for scripts: one object per reply, or per event (one a
    /// line); an error is one object on standard error (docs/OPERATIONS.md,
    /// "JSON output").
    #[arg(long)]
    json: bool,
}

impl UpstreamArgs {
    async fn connect(
        &self,
        subscribe: bool,
        group: &str,
    ) -> anyhow::Result<(UpstreamClient, tether::upstream::EventStream)> {
        let ep: Endpoint = self.upstream.parse()?;
        UpstreamClient::connect(
            &ep,
            UpstreamOptions {
                secret: self.secret.clone(),
                subscribe,
                group: group.into(),
                name: "tether-cli".into(),
            },
        )
        .await
        .with_context(|| format!("cannot reach the upstream socket at {}", self.upstream))
    }
}

/// Writes `v` as one line on standard output and flushes it, so that a
/// reader at the end of a pipe (`jq`) gets each object as it comes.
///
/// # Errors
/// When standard output fails (a reader that went away ends the process
/// quietly instead, see [`out`]).
fn emit(v: &serde_json::Value) -> std::io::Result<()> {
    // `Display` of a `Value` is its compact JSON.
    out(format_args!("{v}\n"))
}

/// `println!` for the commands' output: a reader at the end of a pipe that
/// went away (`tether events | head -3`) ends the process quietly, where
/// `println!` panics. The output is flushed at each line.
macro_rules! say {
    ($($arg:tt)*) => {
        out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Writes `text` on standard output and flushes it; see [`say!`].
fn out(text: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(text).and_then(|()| out.flush());
    gone_reader_ends(written)
}

/// A write to standard output whose reader went away (`EPIPE`) ends the
/// process with success, as `yes | head` does: nobody is left to read
/// the rest, and that is no error of ours. Other errors are returned.
fn gone_reader_ends(written: std::io::Result<()>) -> std::io::Result<()> {
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => r,
    }
}

/// The protocol code behind an error, when the gateway refused a request.
fn refusal_code(e: &anyhow::Error) -> Option<pb::Code> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<ClientError>() {
            Some(ClientError::Refused { code, .. }) => Some(*code),
            _ => None,
        })
}

/// The file (or the defaults), then the secrets the environment sets
/// (`tether::config::env`), validated.
fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let env = |var: &str| std::env::var(var).ok();
    Ok(Config::load_with(path.map(PathBuf::as_path), &env)?)
}

/// Turns transparent huge pages off for this process unless
/// `TETHER_HUGE_PAGES=1`. The allocator asks the kernel for them
/// (`madvise`); a kernel that grants them zeroes 2 MiB at the first touch of
/// each (27 % of the gateway's CPU during a login ramp from empty), grows
/// memory in 2 MiB steps, and may stall a page fault to compact memory for
/// one. They do speed up pushes that touch thousands of sessions (about
/// 12 % here), so an operator may keep them: docs/OPERATIONS.md, "The
/// process".
fn no_huge_pages() {
    if std::env::var_os("TETHER_HUGE_PAGES").is_some_and(|v| v == "1") {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory
    // of this process; it only sets a flag on it (inherited by children).
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Called by each runtime worker as it runs out of work: at most once a
/// second per worker, mimalloc collects that thread's heap, taking in what
/// other threads freed in its pages and returning the pages that are empty.
///
/// mimalloc does that work only inside this thread's own allocations. A
/// worker whose connections have all parked allocates almost nothing, so
/// without this the memory a reconnect storm or a wave of TLS handshakes
/// left behind stayed resident for as long as the connections stayed idle,
/// or not, depending on which worker had run what: 19,000 idle TLS
/// connections measured 1,264 to 2,509 bytes each from run to run.
fn return_freed_memory() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    const EVERY: Duration = Duration::from_secs(1);
    let now = Instant::now();
    if LAST.get().is_some_and(|t| now.duration_since(t) < EVERY) {
        return;
    }
    LAST.set(Some(now));
    // SAFETY: mi_collect takes a flag and works on this thread's own heap;
    // it is safe to call at any time from any thread.
    unsafe { libmimalloc_sys::mi_collect(false) };
}

/// Set once JSON logging is on: errors are then logged, not printed.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Cmd {
    /// Whether the command prints JSON (`--json`), errors included.
    fn json(&self) -> bool {
        match self {
            Cmd::Push { up, .. }
            | Cmd::Kick { up, .. }
            | Cmd::Room { up, .. }
            | Cmd::Presence { up, .. }
            | Cmd::Events { up, .. } => up.json,
            _ => false,
        }
    }
}

/// A command line clap refused: under `--json`, one JSON object on standard
/// error and exit status 2 (clap's own for usage errors); otherwise clap's
/// text, `--help` and `--version` included.
fn usage_error(e: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    let asked_json = std::env::args_os().any(|a| a == "--json");
    let help = matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    );
    if !asked_json || help {
        e.exit();
    }
    let message = e.render().to_string();
    let message = message.trim_end().trim_start_matches("error: ");
    eprintln!("{}", json::error(message, None));
    std::process::ExitCode::from(2)
}

/// Logs to standard error, filtered by `RUST_LOG` (default `info`). Text
/// lines carry colour codes only when standard error is a terminal (and
/// `NO_COLOR` is unset): a log shipper reading a pipe gets plain lines.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(ansi).init();
        }
        // One object per line: timestamp, level, target, the event's
        // fields (message among them) at the top level, and its spans.
        LogFormat::Json => {
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(true)
                .init();
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn main() -> std::process::ExitCode {
    no_huge_pages();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let json_out = cli.cmd.json();
    // `serve` reads log.format from its config first; it starts logging
    // itself once the config is loaded. Under `--json`, log lines are JSON
    // too unless --log-format says otherwise, so that every line on
    // standard error is an object.
    if !matches!(cli.cmd, Cmd::Serve { .. }) {
        let default = if json_out {
            LogFormat::Json
        } else {
            LogFormat::default()
        };
        init_logging(cli.log_format.unwrap_or(default));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(return_freed_memory)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if json_out {
                // One object, the last line on standard error.
                let v = json::error(&format!("{e:#}"), refusal_code(&e));
                eprintln!("{v}");
                return std::process::ExitCode::FAILURE;
            }
            // A shipper reading JSON lines gets the reason as one more.
            if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(error = %format!("{e:#}"), "exiting on an error");
            } else {
                eprintln!("error: {e:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let log_format = cli.log_format;
    match cli.cmd {
        Cmd::Serve {
            config,
            node_id,
            tcp,
            tls,
            ws,
            wss,
            quic,
            upstream,
            metrics,
        } => {
            let mut cfg = load_config(config.as_ref())?;
            if let Some(n) = node_id {
                cfg.node_id = n;
            }
            if !tcp.is_empty() {
                cfg.listen.tcp = tcp;
            }
            if !tls.is_empty() {
                cfg.listen.tls = tls;
            }
            if !ws.is_empty() {
                cfg.listen.ws = ws;
            }
            if !wss.is_empty() {
                cfg.listen.wss = wss;
            }
            if !quic.is_empty() {
                cfg.listen.quic = Some(quic);
            }
            if upstream.is_some() {
                cfg.upstream.tcp = upstream;
            }
            if metrics.is_some() {
                cfg.metrics.listen = metrics;
            }
            if let Some(f) = log_format {
                cfg.log.format = f;
            }
            cfg.validate()?;
            init_logging(cfg.log.format);
            if cfg.auth.secret == tether::config::DEV_SECRET {
                tracing::warn!(
                    "auth.secret is the development default: set your own before production"
                );
            }
            if cfg.upstream.secret == tether::config::DEV_UPSTREAM_SECRET {
                tracing::warn!(
                    "upstream.secret is the development default: set your own before production"
                );
            }
            // The recorder first: the gateway takes its hot-path metric
            // handles from it (`tether::metrics::hot`). The admin port is
            // bound before the gateway's, so that a port in use stops the
            // start before any device is accepted; it serves once the
            // gateway it shows is built.
            let admin_stop = CancellationToken::new();
            let admin = match cfg.metrics.listen {
                Some(addr) => {
                    let exporter = tether::metrics::install()
                        .with_context(|| format!("cannot start metrics on {addr}"))?;
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("cannot start metrics on {addr}"))?;
                    Some((exporter, listener))
                }
                None => None,
            };
            // Metrics stay served through the drain.
            let _admin_stop = admin_stop.clone().drop_guard();
            let server = tether::gateway::Server::bind(cfg.clone()).await?;
            if let Some((exporter, listener)) = admin {
                let node: std::sync::Arc<dyn tether::admin::AdminNode> = server.gateway().clone();
                let admin = std::sync::Arc::new(tether::admin::Admin::new(
                    std::sync::Arc::new(exporter),
                    node,
                    tether::admin::ApiSettings::from_config(&cfg.api),
                ));
                tokio::spawn(tether::admin::serve(
                    listener,
                    admin,
                    tether::admin::Limits::from_config(&cfg),
                    admin_stop,
                ));
            }
            let stop = CancellationToken::new();
            let s2 = stop.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("signal received");
                s2.cancel();
            });
            server.run(stop).await
        }
        Cmd::PrintConfig { config: None } => {
            out(format_args!("{}", tether::config::DEFAULT_TOML))?;
            Ok(())
        }
        Cmd::PrintConfig { config: Some(path) } => {
            let cfg = Config::load(&path)?;
            let text = cfg
                .to_redacted_toml()
                .context("cannot write the configuration as TOML")?;
            out(format_args!("{text}"))?;
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            // Also load the files the config names, as `serve` would.
            tether::auth::Verifier::new(&cfg.auth)?;
            if let (Some(c), Some(k)) = (&cfg.tls.cert, &cfg.tls.key) {
                if !cfg.listen.tls.is_empty() || !cfg.listen.wss.is_empty() {
                    tether::tls::server_config(c, k)?;
                }
            }
            say!("{}: ok", config.display())?;
            Ok(())
        }
        Cmd::Token {
            user,
            device,
            ttl,
            rooms,
            config,
        } => {
            let cfg = load_config(config.as_ref())?;
            anyhow::ensure!(
                cfg.auth.algorithm == tether::config::JwtAlgorithm::HS256,
                "tether token mints HS256 development tokens; with {:?}, mint tokens with your private key",
                cfg.auth.algorithm
            );
            say!(
                "{}",
                tether::auth::mint_hs256(&cfg.auth.secret, &user, device.as_deref(), ttl, rooms)?
            )?;
            Ok(())
        }
        Cmd::Push {
            up,
            user,
            device,
            users,
            room,
            all,
            data,
            source,
            bulk,
            report,
        } => {
            use pb::push_request::Target;
            let target = match (user, device, users, room, all) {
                (Some(u), Some(d), ..) => Target::Device(pb::DeviceTarget {
                    user_id: u,
                    device_id: d,
                }),
                (Some(u), None, ..) => Target::UserId(u),
                (_, _, Some(us), ..) => Target::Users(pb::UserList { user_ids: us }),
                (_, _, _, Some(r), _) => Target::Room(r),
                (.., true) => Target::Everyone(true),
                _ => anyhow::bail!("give one target: --user, --users, --room or --all"),
            };
            let (c, _) = up.connect(false, "").await?;
            let r = c
                .push(pb::PushRequest {
                    target: Some(target),
                    payload: data.into_bytes().into(),
                    source,
                    message_id: String::new(),
                    report_undelivered: true,
                    lane: if bulk {
                        pb::Lane::Bulk
                    } else {
                        pb::Lane::Interactive
                    } as i32,
                    report_delivery: report,
                })
                .await?;
            if up.json {
                emit(&json::push_reply(&r))?;
            } else {
                say!(
                    "message {} queued for {} session(s), {} dropped",
                    r.message_id,
                    r.sessions,
                    r.dropped
                )?;
            }
            Ok(())
        }
        Cmd::Kick {
            up,
            user,
            device,
            reason,
        } => {
            let (c, _) = up.connect(false, "").await?;
            let r = c.kick_reply(&user, &device, &reason).await?;
            if up.json {
                emit(&json::count_reply(&r))?;
            } else {
                say!("kicked {} session(s)", r.sessions)?;
            }
            Ok(())
        }
        Cmd::Room {
            up,
            room,
            users,
            remove,
        } => {
            let (c, _) = up.connect(false, "").await?;
            let us: Vec<&str> = users.iter().map(String::as_str).collect();
            let r = c.room_reply(&room, &us, remove).await?;
            if up.json {
                emit(&json::count_reply(&r))?;
            } else {
                say!(
                    "{} {} session(s) {} {room}",
                    if remove { "removed" } else { "added" },
                    r.sessions,
                    if remove { "from" } else { "to" }
                )?;
            }
            Ok(())
        }
        Cmd::Presence { up, users } => {
            let (c, _) = up.connect(false, "").await?;
            let us: Vec<&str> = users.iter().map(String::as_str).collect();
            let reply = c.presence_reply(&us).await?;
            if up.json {
                emit(&json::presence_reply(&reply))?;
                return Ok(());
            }
            for u in reply.users {
                if u.devices.is_empty() {
                    say!("{}: offline", u.user_id)?;
                }
                for d in u.devices {
                    let from = if d.remote_addr.is_empty() {
                        String::new()
                    } else {
                        format!(" from {}", d.remote_addr)
                    };
                    say!(
                        "{}: device {} session {:016x} on {} via {}{from} since {}",
                        u.user_id,
                        d.device_id,
                        d.session_id,
                        d.node_id,
                        d.transport,
                        d.since_ms
                    )?;
                }
            }
            Ok(())
        }
        Cmd::Events { up, group } => {
            let (_c, mut events) = up.connect(true, &group).await?;
            if !up.json {
                eprintln!("subscribed; waiting for events (Ctrl-C to stop)");
                while let Some(ev) = events.recv().await {
                    say!("{ev:?}")?;
                }
                return Ok(());
            }
            // The first line says the subscription is live: a script can
            // wait for it before it makes the events it wants to see.
            let subscribed = serde_json::json!({ "event": "subscribed", "group": group });
            let mut line = emit(&subscribed);
            while line.is_ok() {
                let Some(ev) = events.recv().await else {
                    anyhow::bail!("the gateway closed the upstream connection");
                };
                line = emit(&json::event(&ev));
            }
            match line {
                // The reader went away (`jq` ended, `head -n 1`): done.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => Ok(other?),
            }
        }
        Cmd::Client {
            addr,
            tls_ca,
            quic,
            ws,
            server_name,
            connect_timeout,
            token,
            user,
            device,
            join,
            config,
        } => {
            let transport = match (tls_ca, quic, ws) {
                (Some(ca), true, _) => ClientTransport::Quic(ca),
                (Some(ca), false, true) => ClientTransport::Wss(ca),
                (Some(ca), false, false) => ClientTransport::Tls(ca),
                (None, _, true) => ClientTransport::Ws,
                (None, _, false) => ClientTransport::Tcp,
            };
            let dial = Dial {
                addr,
                transport,
                server_name,
                timeout: connect_timeout,
            };
            run_client(dial, token, user, device, join, config).await
        }
    }
}

/// The WebSocket upgrade `tether client --ws` sends (no `Origin`: not a
/// browser).
fn ws_request(addr: &str) -> tether::ws_client::WsRequest {
    tether::ws_client::WsRequest {
        host: addr.to_owned(),
        origin: None,
    }
}

/// How `tether client` connects.
enum ClientTransport {
    Tcp,
    Tls(PathBuf),
    Quic(PathBuf),
    Ws,
    Wss(PathBuf),
}

/// Where and how `tether client` connects.
struct Dial {
    addr: String,
    transport: ClientTransport,
    server_name: String,
    /// The bound on the connect and its handshake.
    timeout: Duration,
}

impl Dial {
    /// Connects, waiting at most `timeout` for the gateway's answer.
    async fn connect(&self) -> anyhow::Result<tether::client::Client> {
        use tether::client::Client;
        let Dial {
            addr,
            server_name,
            timeout,
            ..
        } = self;
        let within = humantime::format_duration(*timeout);
        match &self.transport {
            ClientTransport::Quic(ca) => {
                let to = tokio::net::lookup_host(addr)
                    .await?
                    .next()
                    .with_context(|| format!("{addr} resolves to no address"))?;
                // The QUIC connector has the bound and its own message.
                Ok(Client::connect_quic(to, server_name, ca, *timeout).await?)
            }
            ClientTransport::Tls(ca) => {
                tokio::time::timeout(*timeout, Client::connect_tls(addr, server_name, ca))
                    .await
                    .map_err(|_| anyhow::anyhow!("no TLS answer from {addr} within {within}"))?
                    .with_context(|| format!("cannot connect over TLS to {addr}"))
            }
            ClientTransport::Ws => {
                let req = ws_request(addr);
                tokio::time::timeout(*timeout, Client::connect_ws(addr, &req))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no WebSocket answer from {addr} within {within}")
                    })?
                    .with_context(|| format!("cannot connect over WebSocket to {addr}"))
            }
            ClientTransport::Wss(ca) => {
                let req = ws_request(addr);
                tokio::time::timeout(*timeout, Client::connect_wss(addr, server_name, ca, &req))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("no WebSocket-over-TLS answer from {addr} within {within}")
                    })?
                    .with_context(|| format!("cannot connect over WebSocket and TLS to {addr}"))
            }
            ClientTransport::Tcp => tokio::time::timeout(*timeout, Client::connect_tcp(addr))
                .await
                .map_err(|_| anyhow::anyhow!("no TCP answer from {addr} within {within}"))?
                .with_context(|| format!("cannot connect over TCP to {addr}")),
        }
    }
}

async fn run_client(
    dial: Dial,
    token: Option<String>,
    user: String,
    device: String,
    join: Vec<String>,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let token = match token {
        Some(t) => t,
        None => {
            let cfg = load_config(config.as_ref())?;
            tether::auth::mint_hs256(
                &cfg.auth.secret,
                &user,
                Some(&device),
                Duration::from_secs(3600),
                join.clone(),
            )?
        }
    };
    let mut c = dial.connect().await?;
    let ok = c.login(&token, &device).await?;
    say!(
        "logged in as {} (session {:016x} on {}, heartbeat {} ms)",
        ok.user_id,
        ok.session_id,
        ok.node_id,
        ok.heartbeat_interval_ms
    )?;
    for r in &join {
        c.join(r).await?;
    }
    let beat = Duration::from_millis(u64::from(ok.heartbeat_interval_ms.max(1000)));
    let mut ticker = tokio::time::interval(beat);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => { c.ping().await?; }
            f = c.recv() => {
                let Some(f) = f? else {
                    say!("connection closed by the gateway")?;
                    return Ok(());
                };
                use pb::server_frame::Body;
                match f.body {
                    Some(Body::Push(p)) => {
                        say!("push lane={} seq={} id={} source={} room={} payload={}", p.lane, p.seq, p.message_id, p.source, p.room, String::from_utf8_lossy(&p.payload))?;
                        let lane = pb::Lane::try_from(p.lane).unwrap_or(pb::Lane::Interactive);
                        c.ack_lane(lane, p.seq).await?;
                    }
                    Some(Body::Pong(_)) => {}
                    Some(Body::Close(cl)) => {
                        say!("closed by the gateway: {:?} {}", pb::Code::try_from(cl.code).unwrap_or(pb::Code::Internal), cl.reason)?;
                        return Ok(());
                    }
                    other => say!("{other:?}")?,
                }
            }
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
