//! The command link: this node's own NATS connection for the commands
//! other nodes send it (`P.node.<id>.cmd`), on which one task reads a
//! message, runs it, and writes the reply.
//!
//! Why not the NATS client library's subscription: there each message
//! wakes three tasks in turn (the client's connection task reads it and
//! hands it to the subscription's channel; the subscription's task runs
//! it and hands the reply to the client's channel; the connection task
//! writes it), and on a 2-core node those hand-offs cost more than the
//! unicast push itself: a push from another node cost the node that
//! delivered it 2.8-2.9× a local push with few requests on their way, and
//! 1.25-1.3× with many (docs/LOADTEST.md, "What crossing a node costs the
//! node that delivers"). Here a read brings every whole message in the
//! buffer; the small commands run at once, in order, and their replies
//! leave together in one write, as a local upstream's do. With the link
//! (and `PushBatch` waves), a cross-node push cost that node 1.01× a local
//! one with batches or 32 connections, and 1.16× with 4 pushes in flight
//! either way.
//!
//! The protocol spoken is the subset a subscriber needs (INFO, CONNECT,
//! SUB, PUB, MSG, HMSG, PING, PONG, +OK, -ERR), parsed in place from the
//! read buffer (`parse`); it is small and fixed, and a parser of our own
//! costs no copy and no allocation per message. The takes of sessions that
//! resume on another node (`P.node.<id>.take`) come on the link too.
//! Everything else (this node's own requests, events, the directory) stays
//! on the library's client. TLS is spoken as the library speaks it: after
//! the server's INFO, with the system's roots (`SSL_CERT_FILE` names
//! others).
//!
//! The link reconnects by itself, as the client does (0, 100, 200 ms ...
//! up to 2 s between tries, over `bus.urls` and the servers the NATS
//! cluster names), and while it is down the other nodes' requests to this
//! one fail at once with `CODE_NODE_UNREACHABLE` (NATS answers "no
//! responders").

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use super::requests::{Answer, MAX_INFLIGHT_COMMANDS};
use super::Inner;
use crate::metrics as m;

/// The longest control line (`MSG subject sid reply size`) accepted.
const MAX_LINE: usize = 4096;
/// The payload limit when the server names none (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1 << 20;
/// The most the link believes a server's `max_payload` (NATS allows 64
/// MiB): a message is buffered whole, so a server's word bounds memory.
const MAX_PAYLOAD_CAP: usize = 64 << 20;
/// A PING goes out this often; two without a PONG and the link is redone.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How long the connect, the TLS handshake and the server's first answers
/// may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Servers the link knows at most (`bus.urls` and those a NATS cluster
/// names).
const MAX_SERVERS: usize = 64;
/// The link's subscriptions: commands, and takes of sessions.
const SID_COMMANDS: u64 = 1;
const SID_TAKES: u64 = 2;

/// A protocol operation from the server.
#[derive(Debug, PartialEq)]
pub(super) enum Op {
    /// A message: the subscription it came on, its reply subject (a
    /// request's inbox) and payload.
    Msg {
        sid: u64,
        reply: Option<Bytes>,
        payload: Bytes,
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR`: the server's complaint (it closes the connection after most).
    Err(String),
    /// `INFO`: the JSON body.
    Info(Bytes),
}

/// Takes the next whole operation off the front of `buf`: `Ok(None)` when
/// more bytes are needed. A message larger than `max_payload`, a control
/// line longer than [`MAX_LINE`], or anything that is not the protocol is
/// an error (the link is then redone).
pub(super) fn parse(buf: &mut BytesMut, max_payload: usize) -> Result<Option<Op>, String> {
    let Some(end) = buf.windows(2).take(MAX_LINE).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err(format!("a control line longer than {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "a control line not in UTF-8")?;
    let mut words = line.split_ascii_whitespace();
    let verb = words.next().unwrap_or("").to_ascii_uppercase();
    let args: Vec<&str> = words.collect();
    let simple = |op: Op, buf: &mut BytesMut| {
        buf.advance(end + 2);
        Ok(Some(op))
    };
    match verb.as_str() {
        "PING" => simple(Op::Ping, buf),
        "PONG" => simple(Op::Pong, buf),
        "+OK" => simple(Op::Ok, buf),
        "-ERR" => {
            let why = line[4..].trim().trim_matches('\'').to_string();
            simple(Op::Err(why), buf)
        }
        "INFO" => {
            let body = Bytes::copy_from_slice(line[4..].trim().as_bytes());
            simple(Op::Info(body), buf)
        }
        "MSG" | "HMSG" => {
            // MSG <subject> <sid> [reply] <size>
            // HMSG <subject> <sid> [reply] <header size> <total size>
            let sizes = if verb == "MSG" { 1 } else { 2 };
            if args.len() != 2 + sizes && args.len() != 3 + sizes {
                return Err(format!("a malformed {verb} line"));
            }
            let num = |s: &str| {
                s.parse::<usize>()
                    .map_err(|_| format!("a malformed {verb} size"))
            };
            let total = num(args[args.len() - 1])?;
            let headers = if sizes == 2 {
                num(args[args.len() - 2])?
            } else {
                0
            };
            if headers > total {
                return Err("an HMSG header larger than its message".into());
            }
            if total > max_payload {
                return Err(format!(
                    "a message of {total} bytes, over the limit of {max_payload}"
                ));
            }
            let sid = args[1]
                .parse::<u64>()
                .map_err(|_| format!("a malformed {verb} subscription id"))?;
            let has_reply = args.len() == 3 + sizes;
            let need = end + 2 + total + 2;
            if buf.len() < need {
                buf.reserve(need - buf.len());
                return Ok(None);
            }
            if &buf[need - 2..need] != b"\r\n" {
                return Err(format!("a {verb} not ended by CRLF"));
            }
            let reply = has_reply.then(|| Bytes::copy_from_slice(args[2].as_bytes()));
            let mut frame = buf.split_to(need);
            frame.advance(end + 2 + headers);
            frame.truncate(total - headers);
            Ok(Some(Op::Msg {
                sid,
                reply,
                payload: frame.freeze(),
            }))
        }
        _ => Err(format!(
            "an unknown operation {:?}",
            verb.chars().take(16).collect::<String>()
        )),
    }
}

/// What the server's INFO says that the link uses.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
pub(super) struct Info {
    max_payload: Option<usize>,
    tls_required: bool,
    /// Other servers of a NATS cluster (`host:port`).
    connect_urls: Vec<String>,
}

/// Appends `PUB <subject> <len>\r\n<payload>\r\n`.
pub(super) fn put_pub(out: &mut BytesMut, subject: &[u8], payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// A server to connect to.
#[derive(Clone, PartialEq, Debug)]
struct Server {
    host: String,
    port: u16,
    tls: bool,
    user: Option<String>,
    password: Option<String>,
}

impl Server {
    fn from_url(url: &str) -> Option<Self> {
        let a = url.parse::<async_nats::ServerAddr>().ok()?;
        if a.is_websocket() {
            return None;
        }
        Some(Self {
            host: a.host().to_string(),
            port: a.port(),
            tls: a.tls_required(),
            user: a.username().map(str::to_string),
            password: a.password().map(str::to_string),
        })
    }
}

/// A byte stream to the server: plain or TLS.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Inner {
    /// Serves the commands other nodes send this one, on the command link,
    /// until the bus stops: connects, subscribes, runs, and reconnects
    /// after any failure.
    pub(super) async fn serve_commands(self: Arc<Self>) {
        let mut servers: Vec<Server> = self
            .opts
            .urls
            .iter()
            .filter_map(|u| Server::from_url(u))
            .collect();
        if servers.is_empty() {
            tracing::error!("cluster bus: no usable server in bus.urls for the command link");
            return;
        }
        // Replies of the commands that run on tasks of their own.
        let (tx, mut rx) = mpsc::channel(MAX_INFLIGHT_COMMANDS);
        let slots = Arc::new(Semaphore::new(MAX_INFLIGHT_COMMANDS));
        let mut next = 0;
        let mut attempt: u64 = 0;
        let mut was_up = false;
        loop {
            let server = servers[next % servers.len()].clone();
            next += 1;
            let why = match self.connect_link(&server).await {
                Ok((stream, info, read)) => {
                    for u in &info.connect_urls {
                        let s = Server::from_url(&format!(
                            "{}://{u}",
                            if server.tls { "tls" } else { "nats" }
                        ));
                        if let Some(mut s) = s {
                            s.user.clone_from(&server.user);
                            s.password.clone_from(&server.password);
                            if servers.len() < MAX_SERVERS && !servers.contains(&s) {
                                servers.push(s);
                            }
                        }
                    }
                    was_up = true;
                    let since = tokio::time::Instant::now();
                    tracing::info!(
                        server = %format!("{}:{}", server.host, server.port),
                        "cluster bus: command link connected"
                    );
                    metrics::gauge!(m::BUS_COMMANDS_CONNECTED).set(1.0);
                    let max = info
                        .max_payload
                        .unwrap_or(DEFAULT_MAX_PAYLOAD)
                        .min(MAX_PAYLOAD_CAP);
                    let why = self.run_link(stream, read, max, &slots, &tx, &mut rx).await;
                    metrics::gauge!(m::BUS_COMMANDS_CONNECTED).set(0.0);
                    // A link that held a while is retried at once; one
                    // the server ends as soon as it is made backs off, so
                    // that it cannot spin.
                    if since.elapsed() >= Duration::from_secs(1) {
                        attempt = 0;
                    }
                    why
                }
                Err(e) => e,
            };
            if was_up {
                tracing::warn!(
                    "cluster bus: command link lost ({why}): other nodes' requests to this \
                     one fail with CODE_NODE_UNREACHABLE until it is back"
                );
                was_up = false;
            } else {
                tracing::info!("cluster bus: command link: {why}");
            }
            // 0, 100, 200, ... ms up to 2 s, as the client retries.
            tokio::time::sleep(Duration::from_millis((attempt * 100).min(2_000))).await;
            attempt += 1;
        }
    }

    /// Connects to `server`, speaks TLS if it or the server asks, logs in
    /// and subscribes to this node's commands.
    async fn connect_link(
        &self,
        server: &Server,
    ) -> Result<(Box<dyn Stream>, Info, BytesMut), String> {
        let steps = async {
            let tcp = TcpStream::connect((server.host.as_str(), server.port))
                .await
                .map_err(|e| format!("connect to {}:{}: {e}", server.host, server.port))?;
            let _ = tcp.set_nodelay(true);
            let mut tcp = tokio::io::BufReader::new(tcp);
            let mut line = String::new();
            // The server speaks first: INFO {...}.
            let n = (&mut tcp)
                .take(MAX_LINE as u64)
                .read_line(&mut line)
                .await
                .map_err(|e| format!("reading INFO: {e}"))?;
            let body = line
                .strip_prefix("INFO ")
                .filter(|_| n > 0 && line.ends_with("\r\n"))
                .ok_or_else(|| "the server did not begin with INFO".to_string())?;
            let info: Info =
                serde_json::from_str(body.trim()).map_err(|e| format!("the server's INFO: {e}"))?;
            // The server waits for CONNECT: nothing more may have come.
            if !tcp.buffer().is_empty() {
                return Err("the server sent more than INFO before CONNECT".into());
            }
            let tcp = tcp.into_inner();
            let mut stream: Box<dyn Stream> = if server.tls || info.tls_required {
                Box::new(tls_connect(tcp, &server.host).await?)
            } else {
                Box::new(tcp)
            };
            let mut connect = serde_json::json!({
                "verbose": false,
                "pedantic": false,
                "lang": "rust",
                "version": env!("CARGO_PKG_VERSION"),
                "protocol": 1,
                "headers": true,
                "no_responders": true,
                "name": format!("tether {} commands", self.node),
            });
            let user = server.user.as_ref().or(self.opts.user.as_ref());
            let pass = server.password.as_ref().or(self.opts.password.as_ref());
            if let (Some(u), Some(p)) = (user, pass) {
                connect["user"] = u.as_str().into();
                connect["pass"] = p.as_str().into();
            }
            if let Some(t) = &self.opts.token {
                connect["auth_token"] = t.as_str().into();
            }
            stream
                .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
                .await
                .map_err(|e| format!("sending CONNECT: {e}"))?;
            // Logged in once the PONG comes (the server answers in order;
            // a refused login gets an -ERR instead).
            let mut buf = BytesMut::with_capacity(512);
            let max = info
                .max_payload
                .unwrap_or(DEFAULT_MAX_PAYLOAD)
                .min(MAX_PAYLOAD_CAP);
            loop {
                match parse(&mut buf, max)? {
                    Some(Op::Pong) => break,
                    Some(Op::Err(e)) => return Err(format!("the server refused: {e}")),
                    Some(Op::Ping) => {
                        let _ = stream.write_all(b"PONG\r\n").await;
                    }
                    Some(_) => {}
                    None => {
                        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                            return Err("the server closed the connection".into());
                        }
                    }
                }
            }
            // Then the subscriptions: what comes for them from now on is
            // the link's to read (a refused one is an -ERR there).
            let subs = format!(
                "SUB {} {SID_COMMANDS}\r\nSUB {} {SID_TAKES}\r\nPING\r\n",
                self.subject(&self.node, "cmd"),
                self.subject(&self.node, "take"),
            );
            stream
                .write_all(subs.as_bytes())
                .await
                .map_err(|e| format!("subscribing: {e}"))?;
            Ok((stream, info, buf))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, steps)
            .await
            .map_err(|_| format!("no answer within {CONNECT_TIMEOUT:?}"))?
    }

    /// Runs the link until it fails: reads what came (after `buf`, read
    /// already), runs it, writes the replies at once; also sends the
    /// replies of commands that ran on tasks of their own (`later`), and
    /// pings.
    async fn run_link(
        self: &Arc<Self>,
        stream: Box<dyn Stream>,
        mut buf: BytesMut,
        max_payload: usize,
        slots: &Arc<Semaphore>,
        tx: &mpsc::Sender<(Bytes, Bytes)>,
        later: &mut mpsc::Receiver<(Bytes, Bytes)>,
    ) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        buf.reserve(64 * 1024);
        let mut out = BytesMut::with_capacity(16 * 1024);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut unanswered = 0u32;
        loop {
            tokio::select! {
                r = rd.read_buf(&mut buf) => match r {
                    Ok(0) => return "the server closed the connection".into(),
                    Err(e) => return format!("reading: {e}"),
                    Ok(_) => loop {
                        match parse(&mut buf, max_payload) {
                            Ok(Some(Op::Msg { sid, reply, payload })) => {
                                let Some(reply) = reply else { continue };
                                if sid == SID_TAKES {
                                    // Chunks of at most 256 KiB.
                                    for b in self.answer_take(payload) {
                                        put_pub(&mut out, &reply, &b);
                                    }
                                    continue;
                                }
                                match self.answer(payload) {
                                    Answer::Now(b) => {
                                        put_pub(&mut out, &reply, &fit(b, max_payload));
                                    }
                                    Answer::Later(work) => {
                                        // At most MAX_INFLIGHT_COMMANDS at
                                        // once; past it, reading waits (the
                                        // answers ready go out first).
                                        let permit = match slots.clone().try_acquire_owned() {
                                            Ok(p) => p,
                                            Err(_) => {
                                                if let Err(e) = wr.write_all(&out).await {
                                                    return format!("writing: {e}");
                                                }
                                                out.clear();
                                                let Ok(p) = slots.clone().acquire_owned().await else {
                                                    return "stopping".into();
                                                };
                                                p
                                            }
                                        };
                                        let tx = tx.clone();
                                        tokio::spawn(async move {
                                            let b = work.await;
                                            let _ = tx.send((reply, fit(b, max_payload))).await;
                                            drop(permit);
                                        });
                                    }
                                }
                            }
                            Ok(Some(Op::Ping)) => out.extend_from_slice(b"PONG\r\n"),
                            Ok(Some(Op::Pong)) => unanswered = 0,
                            Ok(Some(Op::Err(e))) => {
                                // A refused subscription leaves the link
                                // deaf: redo it (with the backoff). Parser
                                // and most other errors end the connection
                                // on the server's side; others are logged.
                                if e.contains("Permissions Violation for Subscription") {
                                    return format!("the server refused a subscription: {e}");
                                }
                                tracing::warn!("cluster bus: command link: the server says: {e}");
                            }
                            Ok(Some(Op::Ok | Op::Info(_))) => {}
                            Ok(None) => break,
                            Err(e) => return e,
                        }
                    },
                },
                Some((reply, body)) = later.recv() => {
                    put_pub(&mut out, &reply, &body);
                    while let Ok((reply, body)) = later.try_recv() {
                        put_pub(&mut out, &reply, &body);
                    }
                }
                _ = ping.tick() => {
                    if unanswered >= 2 {
                        return format!("no PONG to two PINGs in {:?}", PING_EVERY * 2);
                    }
                    unanswered += 1;
                    out.extend_from_slice(b"PING\r\n");
                }
            }
            if !out.is_empty() {
                if let Err(e) = wr.write_all(&out).await {
                    return format!("writing: {e}");
                }
                out.clear();
            }
        }
    }
}

/// `reply`, or a refusal when it is over the server's payload limit
/// (the asking node then hears why, rather than nothing).
fn fit(reply: Bytes, max_payload: usize) -> Bytes {
    if reply.len() <= max_payload {
        return reply;
    }
    crate::bus::codec::encode_outcome(Err(format!(
        "the answer ({} bytes) is over the NATS server's max_payload ({max_payload})",
        reply.len()
    )))
}

/// TLS to a NATS server, trusting the system's roots (as the NATS client
/// library does; `SSL_CERT_FILE` names another bundle).
async fn tls_connect(
    tcp: TcpStream,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(found.certs);
    let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("TLS: the server name {host:?}: {e}"))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {host}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8], max: usize) -> Result<Vec<Op>, String> {
        let mut buf = BytesMut::from(input);
        let mut ops = Vec::new();
        while let Some(op) = parse(&mut buf, max)? {
            ops.push(op);
        }
        Ok(ops)
    }

    #[test]
    fn every_operation_a_subscriber_meets_is_read() {
        let input = b"INFO {\"max_payload\":1048576}\r\nPING\r\nMSG a.b 1 _INBOX.x 5\r\nhello\r\n\
            MSG a.b 1 3\r\nabc\r\nHMSG a.b 1 _INBOX.y 12 14\r\nNATS/1.0\r\n\r\nhi\r\n+OK\r\nPONG\r\n\
            -ERR 'Slow Consumer'\r\n";
        let ops = all(input, 1 << 20).unwrap();
        assert_eq!(
            ops,
            vec![
                Op::Info(Bytes::from_static(b"{\"max_payload\":1048576}")),
                Op::Ping,
                Op::Msg {
                    sid: 1,
                    reply: Some(Bytes::from_static(b"_INBOX.x")),
                    payload: Bytes::from_static(b"hello")
                },
                Op::Msg {
                    sid: 1,
                    reply: None,
                    payload: Bytes::from_static(b"abc")
                },
                Op::Msg {
                    sid: 1,
                    reply: Some(Bytes::from_static(b"_INBOX.y")),
                    payload: Bytes::from_static(b"hi")
                },
                Op::Ok,
                Op::Pong,
                Op::Err("Slow Consumer".into()),
            ]
        );
    }

    #[test]
    fn a_message_split_anywhere_is_read_once_whole() {
        let input: &[u8] = b"MSG s 1 r 10\r\n0123456789\r\nPING\r\nMSG s 1 2\r\n\r\n\r\n";
        for cut in 0..input.len() {
            let mut buf = BytesMut::from(&input[..cut]);
            let mut ops = Vec::new();
            while let Some(op) = parse(&mut buf, 64).unwrap() {
                ops.push(op);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(op) = parse(&mut buf, 64).unwrap() {
                ops.push(op);
            }
            assert_eq!(ops.len(), 3, "cut at {cut}: {ops:?}");
            assert_eq!(
                ops[0],
                Op::Msg {
                    sid: 1,
                    reply: Some(Bytes::from_static(b"r")),
                    payload: Bytes::from_static(b"0123456789")
                }
            );
            assert_eq!(
                ops[2],
                Op::Msg {
                    sid: 1,
                    reply: None,
                    payload: Bytes::from_static(b"\r\n")
                },
                "a payload may hold CRLF"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn what_is_not_the_protocol_is_refused_not_buffered() {
        let bad: [&[u8]; 8] = [
            b"MSG s 1 r 99999\r\n",
            b"MSG s 1 r x\r\n",
            b"MSG s one r 1\r\n",
            b"MSG s\r\n",
            b"HMSG s 1 9 5\r\n",
            b"MSG s 1 3\r\nabcXY",
            b"HELLO\r\n",
            b"\xff\xfe\r\n",
        ];
        for b in bad {
            assert!(all(b, 1024).is_err(), "{:?}", String::from_utf8_lossy(b));
        }
        // A line with no end in sight is refused once it is too long.
        let long = vec![b'M'; MAX_LINE + 10];
        assert!(all(&long, 1024).is_err());
        // A short incomplete one waits for more.
        assert_eq!(all(b"MSG s 1 r 1", 1024).unwrap(), vec![]);
    }

    #[test]
    fn a_reply_is_written_as_one_pub() {
        let mut out = BytesMut::new();
        put_pub(&mut out, b"_INBOX.a.b", b"xyz");
        assert_eq!(&out[..], b"PUB _INBOX.a.b 3\r\nxyz\r\n");
    }

    #[test]
    fn servers_come_from_the_configured_urls() {
        let s = Server::from_url("nats://u:p@10.0.0.1:4333").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.tls, s.user.as_deref()),
            ("10.0.0.1", 4333, false, Some("u"))
        );
        assert!(Server::from_url("tls://nats.example:4222").unwrap().tls);
        assert_eq!(Server::from_url("127.0.0.1").unwrap().port, 4222);
    }
}
