//! [`Server`]: binds every listener of a validated config (port 0 is fine,
//! tests use it), then runs them until shutdown, and drains.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::accept::{accept_loop, Listener};
use super::{Gateway, LOG_TARGET};
use crate::config::Config;
use crate::handshake::{HandshakeLimits, HandshakeSet, SetMetrics, TlsAdmission};

/// Addresses the server actually bound (useful with port 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    /// WebSocket listeners, plain and over TLS.
    pub ws: Vec<SocketAddr>,
    pub wss: Vec<SocketAddr>,
    /// QUIC listeners (UDP).
    pub quic: Vec<SocketAddr>,
    pub upstream_tcp: Option<SocketAddr>,
    pub upstream_unix: Option<PathBuf>,
}

/// A gateway with its listeners bound, ready to run.
pub struct Server {
    gw: Arc<Gateway>,
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    ws: Vec<TcpListener>,
    wss: Vec<TcpListener>,
    /// Handshake slots and the handshakes in progress, shared by every TLS
    /// and WebSocket-over-TLS listener (None without either).
    tls_admission: Option<Arc<TlsAdmission>>,
    quic: Vec<crate::quic::driver::Endpoint>,
    upstream: crate::upstream::UpstreamListeners,
    addrs: BoundAddrs,
}

fn bind_tcp(addr: SocketAddr, cfg: &Config) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if cfg.listen.recv_buffer > 0 {
        sock.set_recv_buffer_size(cfg.listen.recv_buffer as usize)?;
    }
    if cfg.listen.send_buffer > 0 {
        sock.set_send_buffer_size(cfg.listen.send_buffer as usize)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())
        .with_context(|| format!("cannot bind {addr}"))?;
    sock.listen(cfg.listen.backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(sock.into())?)
}

impl Server {
    /// Validates the config, loads TLS material, and binds every listener.
    ///
    /// # Errors
    /// Invalid config, unreadable certificate or key (named), or a port in use.
    pub async fn bind(cfg: Config) -> anyhow::Result<Self> {
        cfg.validate()?;
        let tls_config = if cfg.listen.tls.is_empty()
            && cfg.listen.wss.is_empty()
            && cfg.listen.quic_addrs().is_empty()
        {
            None
        } else {
            let (c, k) = crate::tls::resolve_paths(
                cfg.tls.cert.as_deref(),
                cfg.tls.key.as_deref(),
                &cfg.tls.dev_cert_dir,
            )?;
            Some(crate::tls::server_config(&c, &k)?)
        };
        let nats = match cfg.bus.kind {
            crate::config::bus::BusKind::Local => None,
            crate::config::bus::BusKind::Nats => {
                let b = &cfg.bus;
                let opts = crate::bus::NatsOptions {
                    urls: b.urls.clone(),
                    cluster: b.cluster.clone(),
                    user: b.user.clone(),
                    password: b.password.clone(),
                    token: b.token.clone(),
                    request_timeout: b.request_timeout,
                    heartbeat: b.heartbeat,
                    node_timeout: b.node_timeout,
                };
                let node = crate::ids::NodeId::new(&cfg.node_id);
                Some(crate::bus::NatsBus::connect(&node, opts).await?)
            }
        };
        let gw = Gateway::with_bus(cfg.clone(), nats)?;
        let mut addrs = BoundAddrs::default();
        let mut tcp = Vec::new();
        for a in &cfg.listen.tcp {
            let l = bind_tcp(*a, &cfg)?;
            addrs.tcp.push(l.local_addr()?);
            tcp.push(l);
        }
        let mut ws = Vec::new();
        for a in &cfg.listen.ws {
            let l = bind_tcp(*a, &cfg)?;
            addrs.ws.push(l.local_addr()?);
            ws.push(l);
        }
        let mut tls = Vec::new();
        let mut wss = Vec::new();
        let mut tls_admission = None;
        let mut quic = Vec::new();
        if let Some(tc) = tls_config {
            for a in &cfg.listen.tls {
                let l = bind_tcp(*a, &cfg)?;
                addrs.tls.push(l.local_addr()?);
                tls.push(l);
            }
            for a in &cfg.listen.wss {
                let l = bind_tcp(*a, &cfg)?;
                addrs.wss.push(l.local_addr()?);
                wss.push(l);
            }
            if !tls.is_empty() || !wss.is_empty() {
                let limits = HandshakeLimits {
                    max_handshakes: cfg.tls.max_handshakes as usize,
                    max_pending: cfg.tls.max_pending_handshakes as usize,
                    hello_timeout: cfg.tls.hello_timeout,
                    handshake_timeout: cfg.tls.handshake_timeout,
                };
                tls_admission = Some(TlsAdmission::new(limits, tc.clone()));
            }
            // Unset, listen.quic is where TLS listens: the bound TLS
            // addresses, so that a TLS port 0 shares its port with QUIC too.
            let (quic_addrs, key) = match &cfg.listen.quic {
                Some(q) => (q.clone(), "the QUIC listener of listen.quic or --quic"),
                None => (
                    addrs.tls.clone(),
                    "QUIC listens where TLS does unless listen.quic or --quic is given",
                ),
            };
            if !quic_addrs.is_empty() {
                let server = crate::quic::server_config(&cfg, &tc)?;
                for a in quic_addrs {
                    let ep = crate::quic::bind(a, &cfg, server.clone()).context(key)?;
                    addrs.quic.push(ep.local_addr());
                    quic.push(ep);
                }
            }
        }
        let upstream = crate::upstream::UpstreamListeners::bind(&cfg.upstream).await?;
        addrs.upstream_tcp = upstream.tcp_addr();
        addrs.upstream_unix = upstream.unix_path();
        Ok(Self {
            gw,
            tcp,
            tls,
            ws,
            wss,
            tls_admission,
            quic,
            upstream,
            addrs,
        })
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gw
    }

    /// Accepts until `shutdown` is cancelled, then drains.
    ///
    /// # Errors
    /// Only for failures that stop the whole server.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let gw = self.gw.clone();
        let stop_accept = CancellationToken::new();
        let stop_ticker = CancellationToken::new();
        let ticker = gw.spawn_ticker(stop_ticker.clone());
        if !(self.tcp.is_empty()
            && self.tls.is_empty()
            && self.ws.is_empty()
            && self.wss.is_empty())
        {
            gw.start_parker();
        }
        let mut tasks = tokio::task::JoinSet::new();
        let policy = Arc::new(crate::transport::upgrade::UpgradePolicy {
            origins: gw.cfg.listen.ws_origins.clone(),
            page: gw.cfg.listen.ws_page,
        });
        let mut listeners = Vec::new();
        listeners.extend(self.tcp.into_iter().map(|l| (l, Listener::Tcp)));
        listeners.extend(
            self.ws
                .into_iter()
                .map(|l| (l, Listener::Ws(policy.clone()))),
        );
        if let Some(adm) = &self.tls_admission {
            listeners.extend(
                self.tls
                    .into_iter()
                    .map(|l| (l, Listener::Tls(adm.clone()))),
            );
            listeners.extend(
                self.wss
                    .into_iter()
                    .map(|l| (l, Listener::Wss(adm.clone(), policy.clone()))),
            );
        }
        for (l, serves) in listeners {
            tasks.spawn(accept_loop(gw.clone(), l, serves, stop_accept.clone()));
        }
        // One set of QUIC handshakes in progress for all QUIC listeners,
        // apart from the TLS one: a flood on one transport does not evict
        // the other's handshakes.
        let quic_handshakes =
            HandshakeSet::new(gw.cfg.tls.max_pending_handshakes as usize, SetMetrics::QUIC);
        for ep in self.quic.iter().cloned() {
            tasks.spawn(crate::quic::accept_loop(
                gw.node_ref(),
                ep,
                quic_handshakes.clone(),
                stop_accept.clone(),
            ));
        }
        let upstream_stop = CancellationToken::new();
        tasks.spawn(self.upstream.run(gw.clone(), upstream_stop.clone()));
        tracing::info!(target: LOG_TARGET, node = %gw.node, addrs = ?self.addrs, "tether serving");

        shutdown.cancelled().await;
        tracing::info!(target: LOG_TARGET, "draining");
        stop_accept.cancel();
        if let Some(c) = gw.cluster() {
            c.set_draining();
        }
        let asked = gw.start_drain();
        tracing::info!(target: LOG_TARGET, sessions = asked, "sent SERVER_DRAINING to every session");
        let deadline = tokio::time::Instant::now() + gw.cfg.shutdown.drain_timeout;
        while gw.limits.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = gw.limits.connections();
        if left > 0 {
            tracing::warn!(
                target: LOG_TARGET,
                connections = left,
                "drain timeout reached; dropping the rest"
            );
        } else {
            tracing::info!(target: LOG_TARGET, "all connections closed");
        }
        if gw.hands_over() {
            // The sessions wait, detached, for their devices to resume them
            // on other nodes, until the same deadline; the rest end here.
            while gw.detached_count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(c) = gw.cluster() {
                c.settle(Duration::from_secs(1)).await;
            }
            let ended = gw.end_detached();
            tracing::info!(
                target: LOG_TARGET,
                ended,
                "sessions handed over to other nodes; the rest ended"
            );
        }
        for ep in &self.quic {
            // Whatever is left after the drain is closed with the endpoint.
            ep.close(0, b"server shutting down");
        }
        upstream_stop.cancel();
        if let Some(c) = gw.cluster() {
            c.leave().await;
        }
        stop_ticker.cancel();
        let _ = ticker.await;
        // Let the listeners finish (the Unix socket file is removed on the
        // way out); whatever is still running after a second is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        Ok(())
    }
}
