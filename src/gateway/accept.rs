//! The accept loop of a TCP, TLS, WebSocket or WebSocket-over-TLS
//! listener: connection limits at accept, the refusal written on the loop
//! itself (`refuse`), the WebSocket upgrade in a task of its own within
//! `session.login_timeout` (`spawn_ws`), and which accept errors call for
//! a pause (`accept_backoff`).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Gateway, LOG_TARGET};
use crate::handshake::TlsAdmission;
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::session::CloseCmd;
use crate::transport::upgrade::{self, UpgradeError, UpgradePolicy};
use crate::transport::{ConnGuard, Connection, NodeRef, TlsStream, Wire, WsStream};
use crate::wire::{frame_bytes, pb, Code};

/// What a listener speaks.
#[derive(Clone)]
pub(super) enum Listener {
    Tcp,
    Tls(Arc<TlsAdmission>),
    Ws(Arc<UpgradePolicy>),
    /// The TLS handshake (with the TLS listeners' slots), then the upgrade.
    Wss(Arc<TlsAdmission>, Arc<UpgradePolicy>),
}

impl Listener {
    fn kind(&self) -> TransportKind {
        match self {
            Listener::Tcp => TransportKind::Tcp,
            Listener::Tls(_) => TransportKind::Tls,
            Listener::Ws(_) => TransportKind::Ws,
            Listener::Wss(..) => TransportKind::Wss,
        }
    }
}

pub(super) async fn accept_loop(
    gw: Arc<Gateway>,
    listener: TcpListener,
    serves: Listener,
    stop: CancellationToken,
) {
    let node = gw.node_ref();
    let kind = serves.kind();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => match accept_backoff(&e) {
                // Out of descriptors or memory: back off briefly instead of
                // spinning; connections wait in the backlog meanwhile.
                Some(pause) => {
                    tracing::warn!(target: LOG_TARGET, error = %e, "accept failed; backing off");
                    metrics::counter!(m::ACCEPT_ERRORS, "kind" => "resource").increment(1);
                    tokio::time::sleep(pause).await;
                    continue;
                }
                // One connection's trouble (aborted before accept, ...):
                // the next one is accepted at once.
                None => {
                    tracing::debug!(target: LOG_TARGET, error = %e, "accept failed for one connection");
                    metrics::counter!(m::ACCEPT_ERRORS, "kind" => "connection").increment(1);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let guard = if gw.limits.pending_full() {
            metrics::counter!(m::PENDING_LOGINS_REFUSED).increment(1);
            Err(Code::TooManyConnections)
        } else {
            ConnGuard::acquire(&node, remote, kind)
        };
        let guard = match guard {
            Ok(g) => g,
            Err(code) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => code.as_str_name())
                    .increment(1);
                // A plain-text Close would be garbage to a TLS client, and a
                // handshake per refused connection is what a storm must not
                // cost: TLS listeners just close. A WebSocket client reads
                // HTTP first: it gets a 503.
                match serves {
                    Listener::Tcp => refuse(stream, code),
                    Listener::Ws(_) => refuse_http(stream),
                    Listener::Tls(_) | Listener::Wss(..) => {}
                }
                continue;
            }
        };
        match &serves {
            Listener::Tcp => {
                let conn = Connection::new(node.clone(), stream, kind, guard);
                #[cfg(parking)]
                tokio::spawn(crate::transport::TcpConnection::from(conn));
                #[cfg(not(parking))]
                tokio::spawn(conn);
            }
            Listener::Ws(policy) => {
                let ws = WsListener {
                    policy: policy.clone(),
                    guard,
                    kind,
                };
                spawn_ws(node.clone(), stream, ws, |c| {
                    #[cfg(parking)]
                    tokio::spawn(crate::transport::WsConnection::from(c));
                    #[cfg(not(parking))]
                    tokio::spawn(c);
                });
            }
            Listener::Wss(tls, policy) => {
                let node = node.clone();
                let ws = WsListener {
                    policy: policy.clone(),
                    guard,
                    kind,
                };
                tls.spawn(stream, remote, move |s| {
                    spawn_ws(node, TlsStream::from(s), ws, |c| {
                        #[cfg(parking)]
                        tokio::spawn(crate::transport::WssConnection::from(c));
                        #[cfg(not(parking))]
                        tokio::spawn(c);
                    });
                });
            }
            Listener::Tls(tls) => {
                // No slot and no rustls state until the ClientHello is in
                // (src/handshake.rs); the connection then runs in a task of
                // its own, so the handshake task stays small.
                let node = node.clone();
                tls.spawn(stream, remote, move |s| {
                    let conn = Connection::new(node, TlsStream::from(s), kind, guard);
                    #[cfg(parking)]
                    tokio::spawn(crate::transport::TlsConnection::from(conn));
                    #[cfg(not(parking))]
                    tokio::spawn(conn);
                });
            }
        }
    }
}

/// Runs the WebSocket upgrade over `io` (a socket, or TLS over one) in a
/// task of its own, then the connection in another, so that the
/// connection's task carries nothing of the upgrade. The upgrade must be
/// done within `session.login_timeout` of now; a client that trickles its
/// request is dropped then, and its slot (`guard`) with it. The login that
/// follows shares that same deadline.
fn spawn_ws<S: Wire + 'static>(
    node: NodeRef,
    mut io: S,
    ws: WsListener,
    run: fn(Connection<WsStream<S>>),
) {
    let WsListener {
        policy,
        guard,
        kind,
    } = ws;
    let since = node.now();
    let deadline = node.config().session.login_timeout;
    tokio::spawn(async move {
        let result = tokio::time::timeout(deadline, upgrade::upgrade(&mut io, &policy)).await;
        let early = match result {
            Ok(Ok(early)) => early,
            Ok(Err(UpgradeError::Refused(status))) => {
                let label = m::WS_UPGRADE_RESULTS
                    .iter()
                    .find(|l| **l == status.to_string())
                    .copied()
                    .unwrap_or("400");
                metrics::counter!(m::WS_UPGRADES, "result" => label).increment(1);
                return;
            }
            Ok(Err(UpgradeError::Served(_))) => {
                metrics::counter!(m::WS_UPGRADES, "result" => "page").increment(1);
                return;
            }
            Ok(Err(UpgradeError::Io(e))) => {
                tracing::debug!(target: LOG_TARGET, error = %e, "WebSocket upgrade failed");
                metrics::counter!(m::WS_UPGRADES, "result" => "failed").increment(1);
                return;
            }
            Err(_) => {
                metrics::counter!(m::WS_UPGRADES, "result" => "timeout").increment(1);
                return;
            }
        };
        metrics::counter!(m::WS_UPGRADES, "result" => "accepted").increment(1);
        let max = u32::try_from(node.params().max_frame).unwrap_or(u32::MAX);
        run(Connection::since(
            node,
            WsStream::new(io, early, max),
            kind,
            guard,
            since,
        ));
    });
}

/// What [`spawn_ws`] takes of its listener and the accept.
struct WsListener {
    policy: Arc<UpgradePolicy>,
    guard: ConnGuard,
    kind: TransportKind,
}

/// The wait a refused client is asked to keep before reconnecting.
const REFUSED_RECONNECT_AFTER_MS: u32 = 5_000;

/// How long the accept loop pauses after an error that says the process is
/// out of a resource (descriptors, buffers, memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The Close a connection refused by a limit gets.
pub(super) fn refusal(code: Code) -> CloseCmd {
    CloseCmd {
        code,
        reason: "connection limit reached".into(),
        reconnect_to: String::new(),
        reconnect_after_ms: REFUSED_RECONNECT_AFTER_MS,
    }
}

/// Tells a refused connection why, best effort, then closes it, at once and
/// on the accept loop: one non-blocking write of the Close frame (a fresh
/// socket's send buffer always has room for it; if not, the client sees only
/// the close), then the descriptor is dropped. No task, no timer, no
/// descriptor kept: in a reconnect storm a refusal must cost less than an
/// admission.
fn refuse(stream: TcpStream, code: Code) {
    let c = refusal(code);
    let frame = frame_bytes(&pb::ServerFrame {
        request_id: 0,
        body: Some(pb::server_frame::Body::Close(pb::Close {
            code: c.code as i32,
            reason: c.reason,
            reconnect_to: c.reconnect_to,
            reconnect_after_ms: c.reconnect_after_ms,
        })),
    });
    let _ = stream.try_write(&frame);
    drop(stream);
}

/// A WebSocket client refused by a connection limit: a `503` with
/// `Retry-After`, one non-blocking write on the accept loop, as [`refuse`]
/// does for plain TCP.
fn refuse_http(stream: TcpStream) {
    metrics::counter!(m::WS_UPGRADES, "result" => "503").increment(1);
    let _ = stream.try_write(&upgrade::busy().response());
    drop(stream);
}

/// Whether an `accept` error calls for a pause: only when the process ran
/// out of something (descriptors, kernel buffers, memory), which retrying at
/// once cannot fix. Errors of one connection (aborted or reset before it was
/// accepted, refused by a firewall rule, an interrupted call, a network error
/// Linux passes on from the new socket) return `None`: the next connection is
/// accepted at once. An unknown error pauses too, so that a broken listener
/// cannot spin a CPU.
fn accept_backoff(e: &std::io::Error) -> Option<Duration> {
    use std::io::ErrorKind as K;
    // EMFILE, ENFILE, ENOBUFS: no `ErrorKind` of their own.
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    const RESOURCE: [i32; 3] = [24, 23, 55];
    #[cfg(not(any(target_os = "macos", target_os = "ios", target_os = "freebsd")))]
    const RESOURCE: [i32; 3] = [24, 23, 105];
    // EPROTO, ENOPROTOOPT, EHOSTDOWN, ENONET, EOPNOTSUPP (Linux numbers):
    // accept(2) says to treat them like EAGAIN.
    #[cfg(target_os = "linux")]
    const PER_CONNECTION: [i32; 5] = [71, 92, 112, 64, 95];
    #[cfg(not(target_os = "linux"))]
    const PER_CONNECTION: [i32; 0] = [];
    if e.kind() == K::OutOfMemory || e.raw_os_error().is_some_and(|c| RESOURCE.contains(&c)) {
        return Some(ACCEPT_BACKOFF);
    }
    let per_connection = matches!(
        e.kind(),
        K::ConnectionAborted
            | K::ConnectionReset
            | K::ConnectionRefused
            | K::PermissionDenied
            | K::Interrupted
            | K::WouldBlock
            | K::TimedOut
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
    ) || e
        .raw_os_error()
        .is_some_and(|c| PER_CONNECTION.contains(&c));
    if per_connection {
        None
    } else {
        Some(ACCEPT_BACKOFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backs_off_only_when_out_of_resources() {
        use std::io::{Error, ErrorKind};
        for raw in [24, 23] {
            assert!(accept_backoff(&Error::from_raw_os_error(raw)).is_some());
        }
        assert!(accept_backoff(&Error::from(ErrorKind::OutOfMemory)).is_some());
        for kind in [
            ErrorKind::ConnectionAborted,
            ErrorKind::ConnectionReset,
            ErrorKind::PermissionDenied,
            ErrorKind::Interrupted,
        ] {
            assert_eq!(accept_backoff(&Error::from(kind)), None, "{kind:?}");
        }
        #[cfg(target_os = "linux")]
        {
            // ENOBUFS backs off; ECONNABORTED and EPROTO do not.
            assert!(accept_backoff(&Error::from_raw_os_error(105)).is_some());
            assert_eq!(accept_backoff(&Error::from_raw_os_error(103)), None);
            assert_eq!(accept_backoff(&Error::from_raw_os_error(71)), None);
        }
    }
}
