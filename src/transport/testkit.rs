//! What the driver's and the link's virtual-time tests share: a waker that
//! counts, a fake [`Node`] with a fast wheel, the paused clock moved with the
//! wheel, and a login.
//!
//! The fake node is what a connection needs of a node and no more: it trusts
//! every login (as user "ann"), keeps its sessions in one map, detaches a
//! session whose connection was lost and resumes it on request, so the
//! link's rules are tested without a gateway (no registry, no bus, no
//! token checks).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Wake;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::quic::QuicPaths;
use super::{ConnEnv, Node};
use crate::auth::Identity;
use crate::config::Config;
use crate::ids::{RoomId, SessionId, TransportKind, UserId};
use crate::session::{
    keeps_state, Budget, CloseCmd, DeliveryConfig, End, LoginGrant, Refreshed, SessionEnv,
    SessionHandle, SessionInfo, SessionParams, Uplink, UplinkAck,
};
use crate::timer::TimerWheel;
use crate::wire::{pb, Code, LoginRequest, RefreshRequest, SendRequest};

/// A waker that counts its wake-ups.
#[derive(Default)]
pub struct Wakes(pub AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A node with a 100 ms wheel tick, its config changed by `f`.
pub fn node(f: impl FnOnce(&mut Config)) -> Arc<FakeNode> {
    let mut cfg = Config::default();
    cfg.session.timer_tick = Duration::from_millis(100);
    f(&mut cfg);
    let now = tokio::time::Instant::now().into_std();
    Arc::new(FakeNode {
        params: Arc::new(SessionParams::from_config(&cfg, now)),
        delivery: DeliveryConfig::from_config(&cfg),
        budget: Budget::new(1 << 30),
        wheel: TimerWheel::new(cfg.session.timer_tick, now),
        cfg,
        next_session: AtomicU64::new(1),
        next_msg: AtomicU64::new(1),
        conns: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        sessions: Mutex::default(),
        pending: Mutex::default(),
        paths: Arc::default(),
        #[cfg(parking)]
        parking: AtomicBool::new(false),
        #[cfg(parking)]
        parker: super::Parker::default(),
    })
}

/// Moves the paused clock and fires the wheel's due slots.
pub async fn advance(node: &FakeNode, d: Duration) {
    tokio::time::advance(d).await;
    node.wheel().advance(node.now());
}

/// The Login of user "ann" on device "phone" (a resume when `resume` is set).
pub fn login_body(resume: Option<pb::Resume>) -> pb::client_frame::Body {
    let token = crate::auth::mint_hs256(
        crate::config::DEV_SECRET,
        "ann",
        Some("phone"),
        Duration::from_secs(3600),
        vec![],
    )
    .expect("mint");
    pb::client_frame::Body::Login(pb::Login {
        token,
        device_id: "phone".into(),
        platform: pb::Platform::Ios as i32,
        protocol_version: 1,
        resume,
    })
}

/// A node for tests: see the module documentation.
pub struct FakeNode {
    cfg: Config,
    params: Arc<SessionParams>,
    delivery: DeliveryConfig,
    budget: Arc<Budget>,
    wheel: TimerWheel,
    next_session: AtomicU64,
    next_msg: AtomicU64,
    conns: AtomicUsize,
    draining: AtomicBool,
    /// Logged-in sessions, connected or detached.
    sessions: Mutex<HashMap<SessionId, SessionHandle>>,
    /// Connections not logged in yet, so that a drain reaches them.
    pending: Mutex<HashMap<SessionId, SessionHandle>>,
    paths: Arc<QuicPaths>,
    /// Whether connections may park (off unless a test turns it on, so that
    /// the default `listen.park_after` does not reach other tests).
    #[cfg(parking)]
    parking: AtomicBool,
    #[cfg(parking)]
    parker: super::Parker,
}

impl FakeNode {
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// A logged-in session by id.
    pub fn session(&self, id: SessionId) -> Option<SessionHandle> {
        self.sessions.lock().get(&id).cloned()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }

    /// Starts draining: new logins are refused and pending connections are
    /// asked to close.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        for h in self.pending.lock().values() {
            h.request_close(self.drain_close());
        }
    }

    /// Lets connections park, by the gateway's rule: `listen.park_after`
    /// when it is not zero and the parker runs.
    #[cfg(parking)]
    pub fn enable_parking(&self) {
        self.parking.store(true, Ordering::SeqCst);
    }

    /// Plain-TCP connections parked now.
    #[cfg(parking)]
    pub fn parked_connections(&self) -> usize {
        self.parker.parked()
    }

    /// Times a TCP or TLS connection was parked so far.
    #[cfg(parking)]
    pub fn parks(&self) -> u64 {
        self.parker.parks()
    }

    /// Reads of parked connections answered in place.
    #[cfg(parking)]
    pub fn parked_answers(&self) -> u64 {
        self.parker.answers()
    }
}

impl Node for FakeNode {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn config(&self) -> &Config {
        &self.cfg
    }
    fn params(&self) -> &Arc<SessionParams> {
        &self.params
    }
    fn delivery(&self) -> &DeliveryConfig {
        &self.delivery
    }
    fn wheel(&self) -> &TimerWheel {
        &self.wheel
    }
    fn acquire_conn(&self, _ip: IpAddr, _kind: TransportKind) -> Result<Option<IpAddr>, Code> {
        self.conns.fetch_add(1, Ordering::SeqCst);
        Ok(None)
    }
    fn release_conn(&self, _ip: Option<IpAddr>, _kind: TransportKind) {
        self.conns.fetch_sub(1, Ordering::SeqCst);
    }
    fn pending_full(&self) -> bool {
        false
    }
    fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::SeqCst))
    }
    fn connection_opened(&self, h: &SessionHandle) {
        self.pending.lock().insert(h.id(), h.clone());
    }
    fn connection_settled(&self, h: &SessionHandle) {
        self.pending.lock().remove(&h.id());
    }
    fn connection_ended(&self, h: &SessionHandle, gen: u32, code: Code) {
        if keeps_state(code) && h.detach(gen) {
            return;
        }
        if h.close_outbox(End::Gen(gen), &self.budget, &mut Vec::new()) {
            self.sessions.lock().remove(&h.id());
        }
    }
    fn with_env(&self, conn: ConnEnv<'_>, run: &mut dyn FnMut(&mut dyn SessionEnv)) {
        run(&mut FakeEnv { node: self, conn });
    }
    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    fn drain_close(&self) -> CloseCmd {
        CloseCmd::new(Code::ServerDraining, "server is shutting down")
    }
    fn count_write(&self) {}
    fn count_migration(&self) {}
    fn quic_paths(&self) -> &Arc<QuicPaths> {
        &self.paths
    }
    fn park_after(&self) -> Option<Duration> {
        #[cfg(parking)]
        if self.parking.load(Ordering::SeqCst)
            && self.parker.is_running()
            && !self.cfg.listen.park_after.is_zero()
        {
            return Some(self.cfg.listen.park_after);
        }
        None
    }
    #[cfg(parking)]
    fn parker(&self) -> &super::Parker {
        &self.parker
    }
}

/// The fake node's [`SessionEnv`].
struct FakeEnv<'a> {
    node: &'a FakeNode,
    conn: ConnEnv<'a>,
}

impl FakeEnv<'_> {
    /// Takes over the session a resume names (no token check).
    fn resume(&mut self, r: &crate::wire::ResumeRequest) -> Option<pb::ResumeResult> {
        let h = self.node.session(SessionId(r.session_id))?;
        let (gen, lanes, old) = h.attach(
            self.conn.kind,
            r.last,
            &self.node.delivery,
            &self.node.budget,
            &mut Vec::new(),
            &mut Vec::new(),
        )?;
        if let Some(w) = old {
            w.wake();
        }
        self.node.connection_settled(self.conn.handle);
        *self.conn.handle = h;
        *self.conn.gen = gen;
        Some(pb::ResumeResult {
            code: Code::Ok as i32,
            first_seq: lanes[0].first_held,
            first_bulk_seq: lanes[1].first_held,
            replayed: lanes[0].replay + lanes[1].replay,
        })
    }
}

impl SessionEnv for FakeEnv<'_> {
    fn login(&mut self, _now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        if self.node.is_draining() {
            return Err((Code::ServerDraining, "draining".to_owned()));
        }
        let identity = Identity {
            user: UserId::new("ann"),
            device: req.device.clone(),
            rooms: Box::default(),
        };
        let resume = req.resume.as_ref().and_then(|r| self.resume(r));
        if resume.is_none() {
            self.conn.handle.set_info(SessionInfo {
                user: identity.user.clone(),
                device: identity.device.clone(),
                platform: req.platform,
                transport: self.conn.kind,
                since_ms: 0,
            });
            self.node.connection_settled(self.conn.handle);
            let h = self.conn.handle.clone();
            self.node.sessions.lock().insert(h.id(), h);
        }
        *self.conn.registered = true;
        Ok(LoginGrant {
            session_id: self.conn.handle.id(),
            identity,
            resume_token: bytes::Bytes::from_static(b"token"),
            resume,
            next_uplink_seq: self.conn.handle.next_uplink_seq(),
            token_exp: None,
        })
    }

    fn refresh(
        &mut self,
        _now: Instant,
        _req: &RefreshRequest,
    ) -> Result<Refreshed, (Code, String)> {
        Ok(Refreshed {
            token_exp: None,
            rooms: Box::default(),
        })
    }

    fn uplink(&mut self, now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
        let id = self.node.next_msg.fetch_add(1, Ordering::SeqCst);
        let window = self.node.cfg.delivery.dedup_window;
        Ok(
            match self
                .conn
                .handle
                .uplink(&req.client_msg_id, id, now, window, 128)
            {
                Uplink::Duplicate { server_msg_id, seq } => UplinkAck {
                    server_msg_id,
                    seq,
                    duplicate: true,
                },
                Uplink::New { seq } => UplinkAck {
                    server_msg_id: id,
                    seq,
                    duplicate: false,
                },
            },
        )
    }

    fn join(&mut self, _room: &RoomId) -> Result<(), Code> {
        Ok(())
    }

    fn leave(&mut self, _room: &RoomId) {}

    fn ack(&mut self, now: Instant, lane: pb::Lane, up_to_seq: u64, ranges: &[(u64, u64)]) {
        self.conn.handle.ack(
            lane,
            up_to_seq,
            ranges,
            now,
            &self.node.budget,
            &mut Vec::new(),
        );
    }

    fn wall_ms(&self) -> u64 {
        0
    }
}
