//! The upstream socket server: one task per upstream connection (there are few),
//! a reader that runs requests in order, and a writer that coalesces responses
//! and events. Responses are never dropped (the reader waits for room: back
//! pressure on the upstream); events are dropped and counted when the
//! connection's event queue is full, so a stuck upstream cannot stall sessions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::codec::FrameCodec;
use crate::bus::{Command, Destination, Outcome, PushTarget};
use crate::config::UpstreamConfig;
use crate::gateway::Gateway;
use crate::ids::UserId;
use crate::metrics as m;
use crate::session::CloseCmd;
use crate::wire::pb::{gateway_frame::Body as Out, upstream_frame::Body as In};
use crate::wire::{frame_bytes, pb, Code, SharedPush};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_USERS_PER_REQUEST: usize = 100_000;
/// Deliveries queued by one upstream connection before it yields to sessions.
const YIELD_DELIVERIES: u64 = 16_384;

/// The bound upstream listeners.
pub struct UpstreamListeners {
    tcp: Option<TcpListener>,
    #[cfg(unix)]
    unix: Option<(tokio::net::UnixListener, PathBuf)>,
    max_frame: usize,
    secret: String,
    queue: usize,
}

impl UpstreamListeners {
    /// Binds the configured TCP address and/or Unix socket path (a stale socket
    /// file is replaced).
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn bind(cfg: &UpstreamConfig) -> anyhow::Result<Self> {
        let tcp = match cfg.tcp {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot bind upstream.tcp {a}: {e}"))?,
            ),
            None => None,
        };
        #[cfg(unix)]
        let unix = match &cfg.unix {
            Some(p) => {
                if let Ok(meta) = std::fs::symlink_metadata(p) {
                    use std::os::unix::fs::FileTypeExt;
                    anyhow::ensure!(
                        meta.file_type().is_socket(),
                        "upstream.unix {} exists and is not a socket; refusing to replace it",
                        p.display()
                    );
                    std::fs::remove_file(p).map_err(|e| {
                        anyhow::anyhow!("cannot replace upstream.unix {}: {e}", p.display())
                    })?;
                }
                let l = tokio::net::UnixListener::bind(p).map_err(|e| {
                    anyhow::anyhow!("cannot bind upstream.unix {}: {e}", p.display())
                })?;
                Some((l, p.clone()))
            }
            None => None,
        };
        Ok(Self {
            tcp,
            #[cfg(unix)]
            unix,
            max_frame: cfg.max_frame as usize,
            secret: cfg.secret.clone(),
            queue: cfg.event_queue as usize,
        })
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn unix_path(&self) -> Option<PathBuf> {
        #[cfg(unix)]
        {
            self.unix.as_ref().map(|(_, p)| p.clone())
        }
        #[cfg(not(unix))]
        None
    }

    /// Accepts upstream connections until `stop`.
    pub async fn run(self, gw: Arc<Gateway>, stop: CancellationToken) {
        let shared = Arc::new(ConnParams {
            max_frame: self.max_frame,
            secret: self.secret,
            queue: self.queue,
        });
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = self.tcp {
            let (gw, p, stop) = (gw.clone(), shared.clone(), stop.clone());
            tasks.spawn(async move {
                loop {
                    let r = tokio::select! { _ = stop.cancelled() => break, r = l.accept() => r };
                    match r {
                        Ok((s, peer)) => {
                            let _ = s.set_nodelay(true);
                            tokio::spawn(serve(
                                gw.clone(),
                                p.clone(),
                                s,
                                peer.to_string(),
                                stop.clone(),
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        #[cfg(unix)]
        if let Some((l, path)) = self.unix {
            let (gw, p, stop) = (gw.clone(), shared.clone(), stop.clone());
            tasks.spawn(async move {
                loop {
                    let r = tokio::select! { _ = stop.cancelled() => break, r = l.accept() => r };
                    match r {
                        Ok((s, _)) => {
                            tokio::spawn(serve(
                                gw.clone(),
                                p.clone(),
                                s,
                                format!("unix:{}", path.display()),
                                stop.clone(),
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "upstream accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            });
        }
        while tasks.join_next().await.is_some() {}
    }
}

struct ConnParams {
    max_frame: usize,
    secret: String,
    queue: usize,
}

fn reply(request_id: u64, body: Out) -> Bytes {
    frame_bytes(&pb::GatewayFrame {
        request_id,
        body: Some(body),
    })
}

fn error(request_id: u64, code: Code, message: impl Into<String>) -> Bytes {
    reply(
        request_id,
        Out::Error(pb::Error {
            code: code as i32,
            message: message.into(),
        }),
    )
}

/// Compares secrets in time independent of where they differ.
fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn serve<S>(
    gw: Arc<Gateway>,
    p: Arc<ConnParams>,
    stream: S,
    peer: String,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut frames = FramedRead::new(r, FrameCodec::new(p.max_frame));
    let mut w = BufWriter::new(w);

    // Hello first, with the shared secret.
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(b))) => pb::UpstreamFrame::decode(b).ok(),
        _ => None,
    };
    let (rid, hello) = match hello {
        Some(pb::UpstreamFrame {
            request_id,
            body: Some(In::Hello(h)),
        }) => (request_id, h),
        _ => {
            let _ = w
                .write_all(&error(0, Code::UpstreamAuthFailed, "expected Hello"))
                .await;
            let _ = w.flush().await;
            return;
        }
    };
    if !secret_eq(&hello.secret, &p.secret) {
        tracing::warn!(%peer, "upstream refused: bad secret");
        let _ = w
            .write_all(&error(rid, Code::UpstreamAuthFailed, "bad secret"))
            .await;
        let _ = w.flush().await;
        return;
    }
    if hello.protocol_version != 0
        && !crate::wire::PROTOCOL_VERSIONS.contains(&hello.protocol_version)
    {
        let _ = w
            .write_all(&error(
                rid,
                Code::UnsupportedVersion,
                "unsupported protocol version",
            ))
            .await;
        let _ = w.flush().await;
        return;
    }
    let mut sub = hello
        .subscribe
        .then(|| gw.bus().subscribe(&hello.group, p.queue));
    tracing::info!(%peer, name = %hello.name, subscribe = hello.subscribe, group = %hello.group, "upstream connected");
    metrics::gauge!(m::UPSTREAM_CONNECTIONS).increment(1.0);

    let (resp_tx, mut resp_rx) = mpsc::channel::<Bytes>(1024);
    let _ = resp_tx
        .send(reply(
            rid,
            Out::HelloOk(pb::HelloOk {
                node_id: gw.node_id().to_string(),
                protocol_version: *crate::wire::PROTOCOL_VERSIONS.end(),
            }),
        ))
        .await;

    // Writer: responses first, then events; flush when nothing else is ready.
    let writer_stop = stop.clone();
    let writer = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                _ = writer_stop.cancelled() => None,
                r = resp_rx.recv() => r,
                e = async {
                    match sub.as_mut() {
                        Some(s) => s.rx.recv().await.map(|f| f.0),
                        None => std::future::pending().await,
                    }
                } => e,
            };
            let Some(first) = next else { break };
            if w.write_all(&first).await.is_err() {
                break;
            }
            // Coalesce whatever else is ready into the same flush.
            loop {
                let more = match resp_rx.try_recv() {
                    Ok(b) => Some(b),
                    Err(_) => sub.as_mut().and_then(|s| s.rx.try_recv().ok()).map(|f| f.0),
                };
                let Some(b) = more else { break };
                if w.write_all(&b).await.is_err() {
                    return;
                }
            }
            if w.flush().await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });

    // About a quarter of what a reader that keeps up can have queued of
    // small pushes: the woken sessions write before the queues fill.
    let yield_pushes: u64 = 64;
    let (mut reached_since_yield, mut pushes_since_yield) = (0u64, 0u64);
    loop {
        let next = tokio::select! { _ = stop.cancelled() => break, f = frames.next() => f };
        let body = match next {
            Some(Ok(b)) => b,
            Some(Err(e)) => {
                let _ = resp_tx
                    .send(error(0, Code::FrameTooLarge, e.to_string()))
                    .await;
                break;
            }
            None => break,
        };
        let (out, reached) = match pb::UpstreamFrame::decode(body) {
            Ok(f) => handle(&gw, f).await,
            Err(e) => (
                error(0, Code::BadFrame, format!("undecodable UpstreamFrame: {e}")),
                0,
            ),
        };
        if resp_tx.send(out).await.is_err() {
            break;
        }
        // Pace fan-out against the sessions it wakes: after a few pushes (up
        // to half a queue) or many deliveries, let the woken sessions write.
        // Queues then coalesce several frames per write, and a burst cannot
        // fill every queue before a single session task runs.
        reached_since_yield += reached;
        pushes_since_yield += u64::from(reached > 0);
        if reached_since_yield >= YIELD_DELIVERIES || pushes_since_yield >= yield_pushes {
            reached_since_yield = 0;
            pushes_since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    drop(resp_tx);
    let _ = writer.await;
    metrics::gauge!(m::UPSTREAM_CONNECTIONS).decrement(1.0);
    tracing::info!(%peer, "upstream disconnected");
}

fn user(id: &str) -> Result<UserId, String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("user id must be 1..=128 bytes, got {}", id.len()));
    }
    Ok(UserId::new(id))
}

fn users(ids: &[String]) -> Result<Vec<UserId>, String> {
    if ids.len() > MAX_USERS_PER_REQUEST {
        return Err(format!("at most {MAX_USERS_PER_REQUEST} users per request"));
    }
    ids.iter().map(|u| user(u)).collect()
}

/// Runs one upstream request and encodes its response; also returns how many
/// sessions a push was queued for (0 for other requests).
async fn handle(gw: &Arc<Gateway>, f: pb::UpstreamFrame) -> (Bytes, u64) {
    let mut reached = 0;
    let out = handle_inner(gw, f, &mut reached).await;
    (out, reached)
}

async fn handle_inner(gw: &Arc<Gateway>, f: pb::UpstreamFrame, reached: &mut u64) -> Bytes {
    let rid = f.request_id;
    let bad = |m: String| error(rid, Code::BadRequest, m);
    match f.body {
        None => error(rid, Code::BadFrame, "UpstreamFrame has no body"),
        Some(In::Hello(_)) => error(rid, Code::AlreadyLoggedIn, "already authenticated"),
        Some(In::Ping(p)) => reply(
            rid,
            Out::Pong(pb::Pong {
                client_time_ms: p.client_time_ms,
                server_time_ms: crate::unix_ms(),
            }),
        ),
        Some(In::Push(p)) => {
            let target = match p.target {
                Some(pb::push_request::Target::UserId(u)) => match user(&u) {
                    Ok(u) => PushTarget::User(u),
                    Err(e) => return bad(e),
                },
                Some(pb::push_request::Target::Device(d)) => {
                    match (user(&d.user_id), crate::wire::device(&d.device_id)) {
                        (Ok(u), Ok(d)) => PushTarget::Device(u, d),
                        (Err(e), _) | (_, Err(e)) => return bad(e),
                    }
                }
                Some(pb::push_request::Target::Users(l)) => match users(&l.user_ids) {
                    Ok(us) => PushTarget::Users(us),
                    Err(e) => return bad(e),
                },
                Some(pb::push_request::Target::Room(r)) => match crate::wire::room(&r) {
                    Ok(r) => PushTarget::Room(r),
                    Err(e) => return bad(e),
                },
                Some(pb::push_request::Target::Everyone(true)) => PushTarget::Everyone,
                Some(pb::push_request::Target::Everyone(false)) | None => {
                    return bad("push needs a target".into())
                }
            };
            if p.message_id.len() > 128 || p.source.len() > 128 {
                return bad("message_id and source must be at most 128 bytes".into());
            }
            let message_id = if p.message_id.is_empty() {
                gw.new_message_id()
            } else {
                p.message_id
            };
            let room = match &target {
                PushTarget::Room(r) => r.as_str(),
                _ => "",
            };
            let lane = pb::Lane::try_from(p.lane).unwrap_or(pb::Lane::Interactive);
            let shared = SharedPush::with(
                &message_id,
                &p.payload,
                &p.source,
                room,
                lane,
                p.report_delivery,
            );
            let device = match &target {
                PushTarget::Device(_, d) => d.to_string(),
                _ => String::new(),
            };
            let outcomes = match gw
                .bus()
                .request(
                    Destination::All,
                    Command::Push {
                        target,
                        push: shared,
                    },
                )
                .await
            {
                Ok(o) => o,
                Err(e) => return error(rid, Code::Internal, e.to_string()),
            };
            let (mut sessions, mut dropped) = (0, 0);
            // A user is undelivered when no node had a session for them.
            let mut missing: HashMap<UserId, usize> = HashMap::new();
            let nodes = outcomes.len();
            for (_, o) in outcomes {
                if let Outcome::Push(po) = o {
                    sessions += po.sessions;
                    dropped += po.dropped;
                    for u in po.missing_users {
                        *missing.entry(u).or_default() += 1;
                    }
                }
            }
            for (u, n) in missing {
                if n < nodes {
                    continue;
                }
                metrics::counter!(m::UNDELIVERED).increment(1);
                if p.report_undelivered {
                    gw.bus().emit(pb::Event {
                        kind: Some(pb::event::Kind::Undelivered(pb::Undelivered {
                            message_id: message_id.clone(),
                            user_id: u.to_string(),
                            device_id: device.clone(),
                            code: Code::NotLoggedIn as i32,
                        })),
                    });
                }
            }
            *reached = sessions;
            reply(
                rid,
                Out::PushReply(pb::PushReply {
                    message_id,
                    sessions,
                    dropped,
                }),
            )
        }
        Some(In::Kick(k)) => {
            let u = match user(&k.user_id) {
                Ok(u) => u,
                Err(e) => return bad(e),
            };
            // A kick ends the session: codes that mean "keep it for a resume"
            // (or unknown ones) become CODE_KICKED.
            let code = match Code::try_from(k.code) {
                Ok(c) if c != Code::Ok && !crate::session::keeps_state(c) => c,
                _ => Code::Kicked,
            };
            let reason = if k.reason.is_empty() {
                "kicked by the server".to_owned()
            } else {
                k.reason.chars().take(256).collect()
            };
            let device = if k.device_id.is_empty() {
                None
            } else {
                match crate::wire::device(&k.device_id) {
                    Ok(d) => Some(d),
                    Err(e) => return bad(e),
                }
            };
            let cmd = Command::Kick {
                user: u,
                device,
                close: CloseCmd::new(code, reason),
            };
            count_reply(gw, rid, cmd).await
        }
        Some(In::Room(r)) => {
            let room = match crate::wire::room(&r.room) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            let us = match users(&r.user_ids) {
                Ok(u) => u,
                Err(e) => return bad(e),
            };
            count_reply(
                gw,
                rid,
                Command::Room {
                    room,
                    users: us,
                    remove: r.remove,
                },
            )
            .await
        }
        Some(In::Presence(q)) => {
            let us = match users(&q.user_ids) {
                Ok(u) => u,
                Err(e) => return bad(e),
            };
            let order: Vec<String> = us.iter().map(ToString::to_string).collect();
            match gw
                .bus()
                .request(Destination::All, Command::Presence { users: us })
                .await
            {
                Ok(outcomes) => {
                    let mut merged: HashMap<String, Vec<pb::DevicePresence>> = HashMap::new();
                    for (_, o) in outcomes {
                        if let Outcome::Presence(list) = o {
                            for up in list {
                                merged.entry(up.user_id).or_default().extend(up.devices);
                            }
                        }
                    }
                    let users = order
                        .into_iter()
                        .map(|u| pb::UserPresence {
                            devices: merged.remove(&u).unwrap_or_default(),
                            user_id: u,
                        })
                        .collect();
                    reply(rid, Out::PresenceReply(pb::PresenceReply { users }))
                }
                Err(e) => error(rid, Code::Internal, e.to_string()),
            }
        }
    }
}

async fn count_reply(gw: &Arc<Gateway>, rid: u64, cmd: Command) -> Bytes {
    match gw.bus().request(Destination::All, cmd).await {
        Ok(outcomes) => {
            let sessions = outcomes
                .iter()
                .map(|(_, o)| match o {
                    Outcome::Count(n) => *n,
                    _ => 0,
                })
                .sum();
            reply(rid, Out::CountReply(pb::CountReply { sessions }))
        }
        Err(e) => error(rid, Code::Internal, e.to_string()),
    }
}
