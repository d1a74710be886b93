//! Wiring: the shared [`Gateway`] state, the [`SessionEnv`] that connects a
//! session to it, and the [`Server`] that binds listeners, accepts, and drains.
//!
//! [`Server::bind`] takes a validated config and binds every port (port 0 is
//! fine, tests use it); [`Server::run`] accepts until its shutdown token fires,
//! then drains: stop accepting, send every session `CODE_SERVER_DRAINING` with
//! a reconnect hint, flush, and return once all connections closed or the
//! drain timeout passed.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Verifier};
use crate::bus::{Bus, LocalBus};
use crate::config::Config;
use crate::handshake::{HandshakeLimits, HandshakeSet, SetMetrics, TlsAdmission};
use crate::ids::{NodeId, RoomId, SessionId, TransportKind};
use crate::metrics as m;
use crate::registry::Registry;
use crate::router::Router;
use crate::session::delivery::Item;
use crate::session::{
    keeps_state, Budget, CloseCmd, DeliveryConfig, End, LoginGrant, Refreshed, SessionEnv,
    SessionHandle, SessionInfo, SessionParams, Uplink, UplinkAck,
};
use crate::timer::TimerWheel;
use crate::transport::{ConnGuard, Connection};
use crate::wire::{frame_bytes, pb, Code, LoginRequest, SendRequest};

/// Connection and login limits of one node.
pub struct Limits {
    per_ip_max: u32,
    per_ip: DashMap<IpAddr, u32>,
    max_conns: usize,
    conns: AtomicUsize,
    /// `limits.max_pending_logins`; 0 = unlimited.
    max_pending: usize,
    /// Connections in `Gateway::pending` (accepted, not logged in yet).
    pending: AtomicUsize,
    /// `limits.max_devices_per_user`; 0 = unlimited.
    max_devices: usize,
    bucket: Option<Mutex<Bucket>>,
}

struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Limits {
    fn new(cfg: &Config, now: Instant) -> Self {
        let l = &cfg.limits;
        Self {
            per_ip_max: l.max_connections_per_ip,
            per_ip: DashMap::new(),
            max_conns: l.max_connections as usize,
            conns: AtomicUsize::new(0),
            max_pending: l.max_pending_logins as usize,
            pending: AtomicUsize::new(0),
            max_devices: l.max_devices_per_user as usize,
            bucket: (l.login_rate > 0).then(|| {
                Mutex::new(Bucket {
                    rate: f64::from(l.login_rate),
                    burst: f64::from(l.login_burst),
                    tokens: f64::from(l.login_burst),
                    last: now,
                })
            }),
        }
    }

    /// Counts a new connection. Returns the IP to release later when per-IP
    /// accounting is on.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when a cap is reached.
    pub fn acquire_conn(&self, ip: IpAddr) -> Result<Option<IpAddr>, Code> {
        let n = self.conns.fetch_add(1, Ordering::Relaxed);
        if self.max_conns > 0 && n >= self.max_conns {
            self.conns.fetch_sub(1, Ordering::Relaxed);
            return Err(Code::TooManyConnections);
        }
        if self.per_ip_max == 0 {
            return Ok(None);
        }
        let mut e = self.per_ip.entry(ip).or_insert(0);
        if *e >= self.per_ip_max {
            drop(e);
            self.conns.fetch_sub(1, Ordering::Relaxed);
            return Err(Code::TooManyConnections);
        }
        *e += 1;
        Ok(Some(ip))
    }

    pub fn release_conn(&self, ip: Option<IpAddr>) {
        self.conns.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = ip {
            self.per_ip.remove_if_mut(&ip, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }

    /// Connections accepted that have not logged in yet.
    pub fn pending_logins(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether a new connection would exceed `limits.max_pending_logins`
    /// (checked at accept, before any per-connection state exists).
    pub(crate) fn pending_full(&self) -> bool {
        self.max_pending > 0 && self.pending.load(Ordering::Relaxed) >= self.max_pending
    }

    /// Counts one more connection waiting for its login.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when `limits.max_pending_logins` is reached.
    fn acquire_pending(&self) -> Result<(), Code> {
        let n = self.pending.fetch_add(1, Ordering::Relaxed);
        if self.max_pending > 0 && n >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(Code::TooManyConnections);
        }
        metrics::gauge!(m::PENDING_LOGINS).increment(1.0);
        Ok(())
    }

    fn release_pending(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PENDING_LOGINS).decrement(1.0);
    }

    /// Takes one login token from the bucket.
    pub fn try_login(&self, now: Instant) -> bool {
        let Some(b) = &self.bucket else {
            return true;
        };
        let mut b = b.lock();
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.last = now.max(b.last);
        b.tokens = (b.tokens + dt * b.rate).min(b.burst);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The state shared by every connection of one node.
pub struct Gateway {
    cfg: Arc<Config>,
    params: Arc<SessionParams>,
    node: NodeId,
    registry: Arc<Registry>,
    router: Arc<Router>,
    bus: Arc<dyn Bus>,
    local_bus: Arc<LocalBus>,
    verifier: Verifier,
    wheel: TimerWheel,
    limits: Limits,
    /// Connections that have not logged in yet, so that a drain reaches them.
    pending: DashMap<SessionId, SessionHandle>,
    write_delay: std::sync::OnceLock<Arc<crate::router::WriteDelay>>,
    writes: AtomicU64,
    migrations: AtomicU64,
    /// The QUIC connection of each session attached over QUIC, so that
    /// presence shows the address a migrating client sends from now.
    paths: Arc<QuicPaths>,
    /// Sessions without a connection, waiting for a resume until their deadline.
    detached: DashMap<SessionId, (SessionHandle, Instant)>,
    /// The same sessions in deadline order, so a sweep visits only the
    /// expired ones (entries of sessions resumed since are skipped then).
    expiry: Mutex<DetachQueue>,
    delivery: DeliveryConfig,
    budget: Arc<Budget>,
    /// Signs resume tokens; random per process (a resume needs this node's state).
    resume_key: ring::hmac::Key,
    draining: AtomicBool,
    next_session: AtomicU64,
    next_msg: AtomicU64,
    msg_prefix: String,
    /// Idle plain-TCP connections without a task (transport/park.rs).
    #[cfg(parking)]
    parker: crate::transport::Parker,
}

impl Gateway {
    /// Builds the gateway state from a validated config.
    ///
    /// # Errors
    /// When the auth key file cannot be read or parsed.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        cfg.validate()?;
        let verifier = Verifier::new(&cfg.auth)?;
        let node = NodeId::new(&cfg.node_id);
        let registry = Arc::new(Registry::new());
        let delivery = cfg.delivery_config();
        let budget = Budget::new(usize::try_from(cfg.delivery.replay_budget).unwrap_or(usize::MAX));
        let router = Arc::new(Router::with_delivery(
            node.clone(),
            registry.clone(),
            delivery.clone(),
            budget.clone(),
            cfg.session.max_rooms as usize,
        ));
        let rng = ring::rand::SystemRandom::new();
        let resume_key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the resume-token key"))?;
        let local_bus = Arc::new(LocalBus::new(node.clone(), router.clone()));
        let now = tokio::time::Instant::now().into_std();
        // Session ids start at a random point so ids of a restarted node differ.
        let seed: u64 = rand::random::<u64>() >> 16;
        let gw = Arc::new(Self {
            params: Arc::new(SessionParams::from_config(&cfg, now)),
            wheel: TimerWheel::new(cfg.session.timer_tick, now),
            limits: Limits::new(&cfg, now),
            msg_prefix: format!("{}-{:x}", cfg.node_id, rand::random::<u32>()),
            cfg: Arc::new(cfg),
            node,
            registry,
            router,
            bus: local_bus.clone(),
            local_bus,
            verifier,
            pending: DashMap::new(),
            write_delay: std::sync::OnceLock::new(),
            writes: AtomicU64::new(0),
            migrations: AtomicU64::new(0),
            paths: Arc::default(),
            detached: DashMap::new(),
            expiry: Mutex::new(DetachQueue::default()),
            delivery,
            budget,
            resume_key,
            draining: AtomicBool::new(false),
            next_session: AtomicU64::new(seed.max(1)),
            next_msg: AtomicU64::new(1),
            #[cfg(parking)]
            parker: crate::transport::Parker::default(),
        });
        let hooks: std::sync::Weak<dyn crate::router::RouterHooks> = Arc::downgrade(&gw) as _;
        gw.router.set_hooks(hooks);
        let reclaim: std::sync::Weak<dyn crate::budget::Reclaim> = Arc::downgrade(&gw) as _;
        gw.budget.set_reclaim(reclaim);
        if !gw.cfg.session.write_delay.is_zero() {
            let wd = crate::router::WriteDelay::new(gw.cfg.session.write_delay);
            gw.router.set_write_delay(wd.clone());
            let _ = gw.write_delay.set(wd);
        }
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn params(&self) -> &Arc<SessionParams> {
        &self.params
    }
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }
    pub fn local_bus(&self) -> &Arc<LocalBus> {
        &self.local_bus
    }
    pub fn wheel(&self) -> &TimerWheel {
        &self.wheel
    }
    pub fn limits(&self) -> &Limits {
        &self.limits
    }
    pub fn delivery(&self) -> &DeliveryConfig {
        &self.delivery
    }

    #[cfg(parking)]
    pub(crate) fn parker(&self) -> &crate::transport::Parker {
        &self.parker
    }

    /// How long a plain-TCP connection stays quiet before it parks; None
    /// when parking is off (`listen.park_after = 0`, or no parker runs).
    pub(crate) fn park_after(&self) -> Option<Duration> {
        #[cfg(parking)]
        if self.parker.is_running() && !self.cfg.listen.park_after.is_zero() {
            return Some(self.cfg.listen.park_after);
        }
        None
    }

    /// Plain-TCP connections parked now (transport/park.rs).
    pub fn parked_connections(&self) -> usize {
        #[cfg(parking)]
        return self.parker.parked();
        #[cfg(not(parking))]
        0
    }

    /// Times a plain-TCP connection was parked so far.
    pub fn parks(&self) -> u64 {
        #[cfg(parking)]
        return self.parker.parks();
        #[cfg(not(parking))]
        0
    }

    /// Reads of parked connections answered in place (a heartbeat, mostly),
    /// after which the connection stayed parked.
    pub fn parked_answers(&self) -> u64 {
        #[cfg(parking)]
        return self.parker.answers();
        #[cfg(not(parking))]
        0
    }

    /// Starts parking idle plain-TCP connections (the server does this with
    /// its listeners; needs a runtime). Off when `listen.park_after` is 0.
    pub fn start_parker(&self) {
        #[cfg(parking)]
        if !self.cfg.listen.park_after.is_zero() {
            self.parker.start();
        }
    }

    /// Socket writes made to clients so far (tests use it; the metric
    /// `tether_socket_writes_total` counts the same).
    pub fn socket_writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub(crate) fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }

    /// QUIC clients seen at a new address so far (tests use it; the metric
    /// `tether_quic_migrations_total` counts the same).
    pub fn quic_migrations(&self) -> u64 {
        self.migrations.load(Ordering::Relaxed)
    }

    pub(crate) fn count_migration(&self) {
        self.migrations.fetch_add(1, Ordering::Relaxed);
    }

    /// Sessions attached over QUIC, and their connections.
    pub(crate) fn quic_paths(&self) -> &Arc<QuicPaths> {
        &self.paths
    }
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Sessions waiting for a resume.
    pub fn detached_count(&self) -> usize {
        self.detached.len()
    }

    /// The resume token of a session: HMAC over its id, user and device.
    pub fn resume_token(&self, h: &SessionHandle) -> bytes::Bytes {
        let Some(i) = h.info() else {
            return bytes::Bytes::new();
        };
        let mut ctx = ring::hmac::Context::with_key(&self.resume_key);
        ctx.update(&h.id().0.to_be_bytes());
        ctx.update(i.user.as_str().as_bytes());
        ctx.update(&[0]);
        ctx.update(i.device.as_str().as_bytes());
        bytes::Bytes::copy_from_slice(ctx.sign().as_ref())
    }

    fn check_resume_token(&self, h: &SessionHandle, token: &[u8]) -> bool {
        let Some(i) = h.info() else { return false };
        let mut msg = Vec::with_capacity(8 + i.user.as_str().len() + 1 + i.device.as_str().len());
        msg.extend_from_slice(&h.id().0.to_be_bytes());
        msg.extend_from_slice(i.user.as_str().as_bytes());
        msg.push(0);
        msg.extend_from_slice(i.device.as_str().as_bytes());
        ring::hmac::verify(&self.resume_key, &msg, token).is_ok()
    }

    /// Emits delivery reports for the pushes in `items` that asked for them.
    pub fn report(&self, h: &SessionHandle, items: &[Item], code: Code) {
        let mut info = None;
        for it in items {
            let Some(id) = &it.push.report else { continue };
            let session = info.get_or_insert_with(|| self.session_info(h)).clone();
            self.bus.emit(pb::Event {
                kind: Some(pb::event::Kind::Delivery(pb::DeliveryReport {
                    message_id: id.to_string(),
                    session,
                    lane: it.push.lane as i32,
                    seq: it.seq,
                    code: code as i32,
                })),
            });
        }
    }

    /// The connection of generation `gen` of a registered session ended with
    /// `code`: detach the session for a resume, or end it.
    pub fn connection_ended(&self, h: &SessionHandle, gen: u32, code: Code) {
        let window = self.cfg.delivery.resume_window;
        if keeps_state(code) && !window.is_zero() && !self.is_draining() && h.detach(gen) {
            {
                // The deadline is taken under the queue's lock, so the queue
                // stays in deadline order (the window is the same for all).
                let mut q = self.expiry.lock();
                let deadline = self.now() + window;
                q.push(deadline, h.id());
                self.detached.insert(h.id(), (h.clone(), deadline));
            }
            self.emit_closed(h, code);
            return;
        }
        self.end_session(h, End::Gen(gen), code);
    }

    /// Ends a session for good: unregister, report what was never acknowledged,
    /// and tell the upstream.
    fn end_session(&self, h: &SessionHandle, which: End, code: Code) -> bool {
        let mut left = Vec::new();
        if !h.close_outbox(which, &self.budget, &mut left) {
            return false;
        }
        self.detached.remove(&h.id());
        self.registry.unregister(h);
        self.report(h, &left, Code::DeliveryExpired);
        metrics::gauge!(m::SESSIONS).decrement(1.0);
        metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
        self.emit_closed(h, code);
        true
    }

    /// Ends detached sessions whose resume window passed; returns how many.
    /// Visits only the entries whose deadline passed, not every detached
    /// session.
    pub fn sweep_detached(&self, now: Instant) -> usize {
        let mut due = Vec::new();
        self.expiry.lock().pop_due(now, &mut due);
        let expired: Vec<SessionHandle> = due
            .iter()
            .filter_map(|id| self.detached.get(id).map(|e| e.value().0.clone()))
            .collect();
        let mut ended = 0;
        for h in &expired {
            // The deadline is read again: the session may have been resumed
            // and dropped again since. Ending it is atomic with a resume
            // (End::Detached is checked under the session's lock).
            let due = self
                .detached
                .get(&h.id())
                .is_some_and(|e| now >= e.value().1);
            if due && self.end_session(h, End::Detached, Code::ResumeExpired) {
                ended += 1;
            }
            self.detached
                .remove_if(&h.id(), |_, (d, _)| !d.is_detached());
        }
        metrics::gauge!(m::REPLAY_BYTES).set(self.budget.used() as f64);
        metrics::gauge!(m::DETACHED).set(self.detached.len() as f64);
        ended
    }

    fn emit_closed(&self, h: &SessionHandle, code: Code) {
        let reason = match code {
            Code::NormalClose => "closed".to_owned(),
            c => c.as_str_name().to_owned(),
        };
        self.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Closed(pb::SessionClosed {
                session: self.session_info(h),
                code: code as i32,
                reason,
            })),
        });
    }

    /// Takes over the detached (or still attached) session a resume names.
    fn resume(
        &self,
        user: &crate::ids::UserId,
        device: &crate::ids::DeviceId,
        r: &crate::wire::ResumeRequest,
        kind: TransportKind,
    ) -> Result<(SessionHandle, u32, pb::ResumeResult), Code> {
        let h = self
            .registry
            .session(SessionId(r.session_id))
            .ok_or(Code::ResumeExpired)?;
        let same = h
            .info()
            .is_some_and(|i| &i.user == user && &i.device == device);
        if !same || !self.check_resume_token(&h, &r.token) {
            return Err(Code::ResumeRejected);
        }
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        let (gen, lanes, old_waker) = h
            .attach(
                kind,
                r.last,
                &self.delivery,
                &self.budget,
                &mut delivered,
                &mut failed,
            )
            .ok_or(Code::ResumeExpired)?;
        self.detached.remove(&h.id());
        // Pushes the client says it has: delivered.
        self.report(&h, &delivered, Code::Ok);
        // Written on `max_tries` connections and never acknowledged.
        self.report(&h, &failed, Code::DeliveryFailed);
        if let Some(w) = old_waker {
            // The previous connection, if alive, must notice it lost the session.
            w.wake();
        }
        let gap = lanes.iter().any(|l| l.gap);
        Ok((
            h,
            gen,
            pb::ResumeResult {
                code: if gap { Code::ResumeGap } else { Code::Ok } as i32,
                first_seq: lanes[0].first_held,
                first_bulk_seq: lanes[1].first_held,
                replayed: lanes[0].replay + lanes[1].replay,
            },
        ))
    }

    /// The session core's clock: tokio's, so paused-time tests control it.
    pub fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// A server message id, unique per node run.
    pub fn next_msg_id(&self) -> u64 {
        self.next_msg.fetch_add(1, Ordering::Relaxed)
    }

    /// A push message id, unique across nodes and restarts.
    pub fn new_message_id(&self) -> String {
        message_id(&self.msg_prefix, self.next_msg_id())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The Close sent to every session when the node drains.
    pub fn drain_close(&self) -> CloseCmd {
        let s = &self.cfg.shutdown;
        CloseCmd {
            code: Code::ServerDraining,
            reason: "server is shutting down".into(),
            reconnect_to: s.reconnect_to.clone(),
            reconnect_after_ms: s.reconnect_after.as_millis().min(u32::MAX as u128) as u32,
        }
    }

    /// Starts draining: refuse new logins, ask every connection to close.
    pub fn start_drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        let cmd = self.drain_close();
        let mut n = self.router.close_all(&cmd);
        let detached: Vec<SessionHandle> =
            self.detached.iter().map(|e| e.value().0.clone()).collect();
        for h in detached {
            self.end_session(&h, End::Detached, Code::ServerDraining);
        }
        for e in self.pending.iter() {
            e.value().request_close(cmd.clone());
            n += 1;
        }
        n
    }

    /// A connection was accepted (it is not logged in yet). Beyond
    /// `limits.max_pending_logins` it is asked to close at once with
    /// `CODE_TOO_MANY_CONNECTIONS` (plain TCP is refused before this, at
    /// accept; this catches TLS connections that finished their handshake
    /// meanwhile, and in-memory ones).
    pub fn connection_opened(&self, h: &SessionHandle) {
        if let Err(code) = self.limits.acquire_pending() {
            metrics::counter!(m::PENDING_LOGINS_REFUSED).increment(1);
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => code.as_str_name()).increment(1);
            h.request_close(refusal(code));
            return;
        }
        self.pending.insert(h.id(), h.clone());
        if self.is_draining() {
            h.request_close(self.drain_close());
        }
    }

    /// A connection logged in or ended: it is no longer pending.
    pub fn connection_settled(&self, h: &SessionHandle) {
        if self.pending.remove(&h.id()).is_some() {
            self.limits.release_pending();
        }
    }

    /// Spawns the timer wheel's ticker; it stops with `stop`.
    pub fn spawn_ticker(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        if let Some(wd) = self.write_delay.get().cloned() {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(wd.delay());
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => { wd.flush(); }
                    }
                }
                wd.flush();
            });
        }
        let gw = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gw.wheel.tick());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let per_sweep =
                (Duration::from_secs(1).as_nanos() / gw.wheel.tick().as_nanos()).max(1) as u64;
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let now = gw.now();
                        gw.wheel.advance(now);
                        n += 1;
                        if n % per_sweep == 0 {
                            gw.sweep_detached(now);
                            if let Some(b) = crate::metrics::resident_bytes() {
                                metrics::gauge!(crate::metrics::RESIDENT_MEMORY).set(b as f64);
                            }
                        }
                    }
                }
            }
        })
    }

    /// Runs a connection over an in-memory pipe, through the same session code
    /// as TCP. Returns the client's end.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when a connection cap is reached.
    pub fn connect_memory(self: &Arc<Self>, buf: usize) -> Result<tokio::io::DuplexStream, Code> {
        let (client, server) = tokio::io::duplex(buf);
        let remote = SocketAddr::from(([127, 0, 0, 1], 0));
        let guard = ConnGuard::acquire(self, remote, TransportKind::Memory)?;
        tokio::spawn(Connection::new(
            self.clone(),
            server,
            TransportKind::Memory,
            guard,
        ));
        Ok(client)
    }

    fn session_info(&self, h: &SessionHandle) -> Option<pb::SessionInfo> {
        let i = h.info()?;
        Some(pb::SessionInfo {
            user_id: i.user.to_string(),
            device_id: i.device.to_string(),
            session_id: h.id().0,
            node_id: self.node.to_string(),
            platform: i.platform as i32,
            transport: h.transport().as_str().into(),
        })
    }
}

impl crate::router::RouterHooks for Gateway {
    fn report(&self, h: &SessionHandle, items: &[Item], code: Code) {
        Gateway::report(self, h, items, code);
    }

    fn end_detached(&self, h: &SessionHandle, code: Code) -> bool {
        self.end_session(h, End::Detached, code)
    }

    fn remote_addr(&self, h: &SessionHandle) -> Option<std::net::SocketAddr> {
        if h.transport() != TransportKind::Quic {
            return None;
        }
        self.paths.get(&h.id()).map(|c| c.remote_address())
    }
}

impl crate::budget::Reclaim for Gateway {
    /// Detached sessions pay before live ones: the oldest pushes held by any
    /// detached session go first, until the budget is down to `target`.
    /// Oldest across sessions, not one session emptied after another,
    /// because a broadcast's body is shared: it is freed only once every
    /// session holding it let go, and taking pushes by age frees the oldest
    /// broadcast from all of them before touching the next. Each eviction is
    /// reported (`CODE_DELIVERY_EXPIRED`) and the session's resume shows the
    /// gap. Costs one lock per detached session to start, then a heap step
    /// per eviction.
    fn reclaim(&self, budget: &Budget, target: usize) {
        use std::cmp::Reverse;
        let ids = self.expiry.lock().ids();
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        let mut sessions = Vec::new();
        let mut heap = std::collections::BinaryHeap::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            let Some(h) = self.detached.get(&id).map(|e| e.value().0.clone()) else {
                continue;
            };
            if let Some(at) = h.oldest_detached() {
                heap.push(Reverse((at, sessions.len())));
                sessions.push(h);
            }
        }
        let mut evicted = Vec::new();
        let mut n = 0u64;
        while budget.used() > target {
            let Some(Reverse((_, i))) = heap.pop() else {
                break;
            };
            let h = &sessions[i];
            if !h.evict_oldest_detached(budget, &mut evicted) {
                continue;
            }
            n += evicted.len() as u64;
            self.report(h, &evicted, Code::DeliveryExpired);
            evicted.clear();
            if let Some(at) = h.oldest_detached() {
                heap.push(Reverse((at, i)));
            }
        }
        metrics::counter!(m::DROPS, "policy" => "reclaimed").increment(n);
        metrics::gauge!(m::REPLAY_BYTES).set(budget.used() as f64);
    }
}

/// The QUIC connection a session is attached over, by session: one entry
/// per QUIC session (TCP sessions pay nothing), read live so that presence
/// sees a migration as soon as quinn does.
pub(crate) type QuicPaths = DashMap<SessionId, quinn::Connection>;

/// `<prefix>-<n in hex>`, written by hand: `format!` showed at 1.2 % of the
/// gateway's CPU in a unicast run (one id per push).
fn message_id(prefix: &str, n: u64) -> String {
    let digits = (64 - n.leading_zeros() as usize).div_ceil(4).max(1);
    let mut s = String::with_capacity(prefix.len() + 1 + digits);
    s.push_str(prefix);
    s.push('-');
    for i in (0..digits).rev() {
        let d = ((n >> (i * 4)) & 0xf) as u8;
        s.push(char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 }));
    }
    s
}

/// The [`SessionEnv`] of a real connection.
pub struct GatewayEnv<'a> {
    pub gw: &'a Arc<Gateway>,
    /// The connection's session handle; a resume replaces it.
    pub handle: &'a mut SessionHandle,
    /// The connection's generation on that handle.
    pub gen: &'a mut u32,
    pub kind: TransportKind,
    /// The peer's address (asked only when a login succeeds).
    pub peer: &'a dyn Fn() -> Option<std::net::SocketAddr>,
    pub registered: &'a mut bool,
}

impl SessionEnv for GatewayEnv<'_> {
    fn login(&mut self, now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        let gw = self.gw;
        let result = (|| {
            if gw.is_draining() {
                return Err((Code::ServerDraining, "server is shutting down".to_owned()));
            }
            if !gw.limits.try_login(now) {
                return Err((
                    Code::RateLimited,
                    "login rate limit reached; retry with backoff".to_owned(),
                ));
            }
            let crate::auth::Verified { identity, exp } = gw
                .verifier
                .check(&req.token, &req.device)
                .map_err(|e: AuthError| (e.code(), e.to_string()))?;
            // A resume takes the old session over; if it cannot, this login
            // starts a new session and says why in LoginOk.resume.
            let mut resume = None;
            if let Some(r) = &req.resume {
                match gw.resume(&identity.user, &identity.device, r, self.kind) {
                    Ok((h, gen, res)) => {
                        gw.connection_settled(self.handle);
                        *self.handle = h;
                        *self.gen = gen;
                        *self.registered = true;
                        metrics::counter!(m::RESUMES, "result" => Code::try_from(res.code).unwrap_or(Code::Ok).as_str_name()).increment(1);
                        return Ok((identity, exp, Some(res), true));
                    }
                    Err(code) => {
                        metrics::counter!(m::RESUMES, "result" => code.as_str_name()).increment(1);
                        resume = Some(pb::ResumeResult {
                            code: code as i32,
                            ..pb::ResumeResult::default()
                        });
                    }
                }
            }
            self.handle.set_info(SessionInfo {
                user: identity.user.clone(),
                device: identity.device.clone(),
                platform: req.platform,
                transport: self.kind,
                since_ms: crate::unix_ms(),
            });
            let replaced = gw
                .registry
                .register_limited(
                    self.handle,
                    gw.cfg.session.multi_login,
                    gw.limits.max_devices,
                )
                .map_err(|e| {
                    (
                        e.code(),
                        format!(
                            "this user already has {} devices logged in; log one out first",
                            gw.limits.max_devices
                        ),
                    )
                })?;
            gw.connection_settled(self.handle);
            *self.registered = true;
            for old in replaced {
                old.request_close(CloseCmd::new(
                    Code::Replaced,
                    "this device logged in on another connection",
                ));
                // A detached session replaced by a new login ends now.
                gw.end_session(&old, End::Detached, Code::Replaced);
            }
            Ok((identity, exp, resume, false))
        })();
        let label = match &result {
            Ok(_) => "ok",
            Err((c, _)) => c.as_str_name(),
        };
        metrics::counter!(m::LOGINS, "result" => label).increment(1);
        let (identity, exp, resume, resumed) = result?;
        if !resumed {
            metrics::gauge!(m::SESSIONS).increment(1.0);
        }
        gw.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Opened(pb::SessionOpened {
                session: gw.session_info(self.handle),
                remote_addr: (self.peer)().map(|a| a.to_string()).unwrap_or_default(),
            })),
        });
        Ok(LoginGrant {
            session_id: self.handle.id(),
            identity,
            resume_token: gw.resume_token(self.handle),
            resume,
            next_uplink_seq: self.handle.next_uplink_seq(),
            token_exp: Some(exp),
        })
    }

    fn refresh(
        &mut self,
        now: Instant,
        req: &crate::wire::RefreshRequest,
    ) -> Result<Refreshed, (Code, String)> {
        // A refresh costs a signature check, like a login: the same bucket.
        if !self.gw.limits.try_login(now) {
            return Err((
                Code::RateLimited,
                "login rate limit reached; retry with backoff".to_owned(),
            ));
        }
        let Some(info) = self.handle.info() else {
            // Set at login, before the session is Active; kept for its life.
            return Err((Code::Internal, "the session has no identity".to_owned()));
        };
        let v = self
            .gw
            .verifier
            .verify_refresh(&req.token, &info.user, &info.device)
            .map_err(|e| (e.code(), e.to_string()))?;
        Ok(Refreshed {
            token_exp: Some(v.exp),
            rooms: v.identity.rooms,
        })
    }

    fn uplink(&mut self, now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
        let d = &self.gw.cfg.delivery;
        let id = self.gw.next_msg_id();
        let seq = match self.handle.uplink(
            &req.client_msg_id,
            id,
            now,
            d.dedup_window,
            d.dedup_max as usize,
        ) {
            Uplink::Duplicate { server_msg_id, seq } => {
                metrics::counter!(m::UPLINKS, "result" => "duplicate").increment(1);
                return Ok(UplinkAck {
                    server_msg_id,
                    seq,
                    duplicate: true,
                });
            }
            Uplink::New { seq } => seq,
        };
        let client_msg_id = req.client_msg_id.clone();
        let ok = self.gw.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                session: self.gw.session_info(self.handle),
                client_msg_id: req.client_msg_id,
                server_msg_id: id,
                route: req.route,
                payload: req.payload,
                received_ms: crate::unix_ms(),
                seq,
            })),
        });
        metrics::counter!(m::UPLINKS, "result" => if ok { "ok" } else { "unavailable" })
            .increment(1);
        if ok {
            Ok(UplinkAck {
                server_msg_id: id,
                seq,
                duplicate: false,
            })
        } else {
            // Not forwarded: a retry must run again, not be answered as a duplicate.
            self.handle.forget_uplink(&client_msg_id, seq);
            Err(Code::UpstreamUnavailable)
        }
    }

    fn join(&mut self, room: &RoomId) -> Result<(), Code> {
        let r = self
            .gw
            .registry
            .join(self.handle, room, self.gw.cfg.session.max_rooms as usize);
        metrics::gauge!(m::ROOMS).set(self.gw.registry.room_count() as f64);
        r
    }

    fn leave(&mut self, room: &RoomId) {
        self.gw.registry.leave(self.handle, room);
        metrics::gauge!(m::ROOMS).set(self.gw.registry.room_count() as f64);
    }

    fn ack(&mut self, now: Instant, lane: pb::Lane, up_to_seq: u64, ranges: &[(u64, u64)]) {
        let mut acked = Vec::new();
        self.handle
            .ack(lane, up_to_seq, ranges, now, &self.gw.budget, &mut acked);
        if !acked.is_empty() {
            m::hot().acked.increment(acked.len() as u64);
            self.gw.report(self.handle, &acked, Code::Ok);
        }
    }

    fn wall_ms(&self) -> u64 {
        crate::unix_ms()
    }
}

/// Addresses the server actually bound (useful with port 0).
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
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
    /// Handshake slots and the handshakes in progress, shared by every TLS
    /// listener (None without TLS listeners).
    tls_admission: Option<Arc<TlsAdmission>>,
    quic: Vec<quinn::Endpoint>,
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
        let tls_config = if cfg.listen.tls.is_empty() && cfg.listen.quic_addrs().is_empty() {
            None
        } else {
            let (c, k) = crate::tls::resolve_paths(
                cfg.tls.cert.as_deref(),
                cfg.tls.key.as_deref(),
                &cfg.tls.dev_cert_dir,
            )?;
            Some(crate::tls::server_config(&c, &k)?)
        };
        let gw = Gateway::new(cfg.clone())?;
        let mut addrs = BoundAddrs::default();
        let mut tcp = Vec::new();
        for a in &cfg.listen.tcp {
            let l = bind_tcp(*a, &cfg)?;
            addrs.tcp.push(l.local_addr()?);
            tcp.push(l);
        }
        let mut tls = Vec::new();
        let mut tls_admission = None;
        let mut quic = Vec::new();
        if let Some(tc) = tls_config {
            for a in &cfg.listen.tls {
                let l = bind_tcp(*a, &cfg)?;
                addrs.tls.push(l.local_addr()?);
                tls.push(l);
            }
            if !tls.is_empty() {
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
                    addrs.quic.push(ep.local_addr()?);
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
        if !self.tcp.is_empty() {
            gw.start_parker();
        }
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.tcp {
            tasks.spawn(accept_loop(gw.clone(), l, None, stop_accept.clone()));
        }
        for l in self.tls {
            let tls = self.tls_admission.clone();
            tasks.spawn(accept_loop(gw.clone(), l, tls, stop_accept.clone()));
        }
        // One set of QUIC handshakes in progress for all QUIC listeners,
        // apart from the TLS one: a flood on one transport does not evict
        // the other's handshakes.
        let quic_handshakes =
            HandshakeSet::new(gw.cfg.tls.max_pending_handshakes as usize, SetMetrics::QUIC);
        for ep in self.quic.iter().cloned() {
            tasks.spawn(crate::quic::accept_loop(
                gw.clone(),
                ep,
                quic_handshakes.clone(),
                stop_accept.clone(),
            ));
        }
        let upstream_stop = CancellationToken::new();
        tasks.spawn(self.upstream.run(gw.clone(), upstream_stop.clone()));
        tracing::info!(node = %gw.node, addrs = ?self.addrs, "tether serving");

        shutdown.cancelled().await;
        tracing::info!("draining");
        stop_accept.cancel();
        let asked = gw.start_drain();
        tracing::info!(sessions = asked, "sent SERVER_DRAINING to every session");
        let deadline = tokio::time::Instant::now() + gw.cfg.shutdown.drain_timeout;
        while gw.limits.connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = gw.limits.connections();
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain timeout reached; dropping the rest"
            );
        } else {
            tracing::info!("all connections closed");
        }
        for ep in &self.quic {
            // Whatever is left after the drain is closed with the endpoint.
            ep.close(0u32.into(), b"server shutting down");
        }
        upstream_stop.cancel();
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

async fn accept_loop(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<Arc<TlsAdmission>>,
    stop: CancellationToken,
) {
    let kind = if tls.is_some() {
        TransportKind::Tls
    } else {
        TransportKind::Tcp
    };
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
                    tracing::warn!(error = %e, "accept failed; backing off");
                    metrics::counter!(m::ACCEPT_ERRORS, "kind" => "resource").increment(1);
                    tokio::time::sleep(pause).await;
                    continue;
                }
                // One connection's trouble (aborted before accept, ...):
                // the next one is accepted at once.
                None => {
                    tracing::debug!(error = %e, "accept failed for one connection");
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
            ConnGuard::acquire(&gw, remote, kind)
        };
        let guard = match guard {
            Ok(g) => g,
            Err(code) => {
                metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => code.as_str_name())
                    .increment(1);
                // A plain-text Close would be garbage to a TLS client, and a
                // handshake per refused connection is what a storm must not
                // cost: TLS listeners just close.
                if tls.is_none() {
                    refuse(stream, code);
                }
                continue;
            }
        };
        match &tls {
            None => {
                let conn = Connection::new(gw.clone(), stream, kind, guard);
                #[cfg(parking)]
                tokio::spawn(crate::transport::TcpConnection::from(conn));
                #[cfg(not(parking))]
                tokio::spawn(conn);
            }
            Some(tls) => {
                // No slot and no rustls state until the ClientHello is in
                // (src/handshake.rs); the connection then runs in a task of
                // its own, so the handshake task stays small.
                let gw = gw.clone();
                tls.spawn(stream, remote, move |s| {
                    tokio::spawn(Connection::new(gw, s, kind, guard));
                });
            }
        }
    }
}

/// The wait a refused client is asked to keep before reconnecting.
const REFUSED_RECONNECT_AFTER_MS: u32 = 5_000;

/// How long the accept loop pauses after an error that says the process is
/// out of a resource (descriptors, buffers, memory).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The Close a connection refused by a limit gets.
fn refusal(code: Code) -> CloseCmd {
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

/// Detached sessions in the order their resume windows end. The window is
/// the same for every session and deadlines are taken under the queue's
/// lock, so pushing at the back keeps the queue sorted and a sweep pops only
/// what is due. A session resumed (or ended) since it was pushed leaves a
/// stale entry that the sweep skips when it comes up; entries are bounded
/// by the detaches of one resume window.
#[derive(Default)]
struct DetachQueue {
    q: VecDeque<(Instant, SessionId)>,
}

impl DetachQueue {
    fn push(&mut self, deadline: Instant, id: SessionId) {
        self.q.push_back((deadline, id));
    }

    /// Every id queued, oldest first (stale entries and repeats included).
    fn ids(&self) -> Vec<SessionId> {
        self.q.iter().map(|&(_, id)| id).collect()
    }

    /// Moves the ids whose deadline is at or before `now` into `out`.
    fn pop_due(&mut self, now: Instant, out: &mut Vec<SessionId>) {
        while let Some(&(deadline, id)) = self.q.front() {
            if deadline > now {
                break;
            }
            self.q.pop_front();
            out.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_prefix_dash_hex() {
        for n in [0, 1, 9, 10, 15, 16, 255, 0xdead_beef, u64::MAX] {
            assert_eq!(message_id("node-1-ab", n), format!("node-1-ab-{n:x}"));
        }
    }

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

    #[test]
    fn detach_queue_pops_only_what_is_due_in_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = DetachQueue::default();
        for i in 0..5u64 {
            q.push(t0 + s * (i as u32), SessionId(i));
        }
        let mut out = Vec::new();
        q.pop_due(t0 + s * 2, &mut out);
        assert_eq!(out, [SessionId(0), SessionId(1), SessionId(2)]);
        assert_eq!(q.q.len(), 2, "later deadlines are not touched");
        out.clear();
        q.pop_due(t0 + s * 2, &mut out);
        assert!(out.is_empty());
        q.pop_due(t0 + s * 10, &mut out);
        assert_eq!(out, [SessionId(3), SessionId(4)]);
    }
}
