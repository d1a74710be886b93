//! Wiring: the shared [`Gateway`] state, the [`SessionEnv`] that connects a
//! session to it, and the [`Server`] that binds listeners, accepts, and drains.
//!
//! [`Server::bind`] takes a validated config and binds every port (port 0 is
//! fine, tests use it); [`Server::run`] accepts until its shutdown token fires,
//! then drains: stop accepting, send every session `CODE_SERVER_DRAINING` with
//! a reconnect hint, flush, and return once all connections closed or the
//! drain timeout passed.
//!
//! This file holds the [`Gateway`] itself (its state, `new` and the
//! accessors); each concern has a file of its own:
//! - limits.rs: [`Limits`], the connection caps and the login bucket;
//! - env.rs: [`GatewayEnv`], the session's view of the node;
//! - node.rs: the gateway as the layers below see it
//!   ([`transport::Node`](crate::transport::Node),
//!   [`upstream::UpstreamNode`](crate::upstream::UpstreamNode));
//! - hooks.rs: the router's hooks and the replay budget's reclaim;
//! - lifecycle.rs: a session across connections: opened, settled, ended,
//!   detached, swept, and the delivery reports and events on the way;
//! - resume.rs: resume tokens and the resume itself;
//! - ids.rs: session and message ids; drain.rs: the drain;
//! - ticker.rs: the wheel's ticker, the sweep and the RSS gauge;
//! - parking.rs: the gateway's side of parking idle TCP connections;
//! - memory.rs: the in-memory transport (`connect_memory`);
//! - server.rs: [`Server`], binding and running the listeners;
//! - accept.rs: the TCP/TLS accept loop, refusals and accept back-off.
//!
//! [`SessionEnv`]: crate::session::SessionEnv

mod accept;
mod cluster;
mod drain;
mod env;
mod hooks;
mod ids;
mod lifecycle;
mod limits;
mod memory;
mod node;
mod parking;
mod resume;
mod server;
mod ticker;

pub use env::GatewayEnv;
pub use limits::Limits;
pub use server::{BoundAddrs, Server};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::auth::Verifier;
use crate::bus::{Bus, EventHub, LocalBus, NatsBus, NatsConnection};
use crate::config::Config;
use crate::ids::{NodeId, SessionId};
use crate::registry::Registry;
use crate::router::Router;
use crate::session::{Budget, DeliveryConfig, SessionHandle, SessionParams};
use crate::timer::TimerWheel;
use crate::transport::quic::QuicPaths;
use crate::transport::{Node, NodeRef};
use lifecycle::DetachQueue;

/// The target of the gateway's log lines, whichever file they come from:
/// the one they had before the gateway was split into files, which log
/// filters and shippers may name.
const LOG_TARGET: &str = "tether::gateway";

/// The state shared by every connection of one node.
pub struct Gateway {
    cfg: Arc<Config>,
    params: Arc<SessionParams>,
    node: NodeId,
    registry: Arc<Registry>,
    router: Arc<Router>,
    bus: Arc<dyn Bus>,
    /// The cluster bus, when this node is one of a cluster.
    cluster: Option<Arc<NatsBus>>,
    /// The upstream subscribers' queues, which the bus emits into.
    hub: Arc<EventHub>,
    verifier: Verifier,
    wheel: TimerWheel,
    limits: Limits,
    /// Connections that have not logged in yet, so that a drain reaches them.
    pending: DashMap<SessionId, SessionHandle>,
    write_delay: std::sync::OnceLock<Arc<crate::session::WriteDelay>>,
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
    /// Sign resume tokens (the first) and check them (any): the cluster's
    /// `bus.resume_secret` and the one before it, or a random key.
    resume_keys: Vec<ring::hmac::Key>,
    /// Resumes of sessions held by other nodes, by the id of the connection
    /// that asked, while their state is fetched (see cluster.rs).
    takes: DashMap<SessionId, cluster::Take>,
    /// This gateway, for the tasks it spawns (set once it is in its `Arc`).
    me: std::sync::OnceLock<std::sync::Weak<Gateway>>,
    draining: AtomicBool,
    next_session: AtomicU64,
    next_msg: AtomicU64,
    msg_prefix: String,
    /// Idle TCP and TLS connections without a task (transport/park.rs).
    #[cfg(parking)]
    parker: crate::transport::Parker,
    /// The `NodeRef` every connection shares while any runs (weak: the
    /// gateway must not keep itself alive).
    node_ref: Mutex<std::sync::Weak<Arc<dyn Node>>>,
}

impl Gateway {
    /// Builds the gateway state from a validated config.
    ///
    /// # Errors
    /// When the auth key file cannot be read or parsed.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        Self::with_bus(cfg, None)
    }

    /// Like [`Gateway::new`], with the cluster bus on `nats` when given
    /// (`bus.kind = "nats"`; [`Server::bind`] connects it).
    ///
    /// # Errors
    /// As [`Gateway::new`].
    pub fn with_bus(cfg: Config, nats: Option<NatsConnection>) -> anyhow::Result<Arc<Self>> {
        cfg.validate()?;
        let verifier = Verifier::new(&cfg.auth)?;
        let node = NodeId::new(&cfg.node_id);
        let registry = Arc::new(Registry::new());
        let delivery = DeliveryConfig::from_config(&cfg);
        let budget = Budget::new(usize::try_from(cfg.delivery.replay_budget).unwrap_or(usize::MAX));
        let router = Arc::new(Router::with_delivery(
            node.clone(),
            registry.clone(),
            delivery.clone(),
            budget.clone(),
            cfg.session.max_rooms as usize,
        ));
        let resume_keys = resume::resume_keys(&cfg)?;
        let hub = Arc::new(EventHub::default());
        let (bus, cluster): (Arc<dyn Bus>, _) = match nats {
            Some(conn) => {
                router.remember_moved_for(crate::bus::moved_memory(cfg.bus.request_timeout));
                let b = NatsBus::start(
                    conn,
                    node.clone(),
                    router.clone(),
                    hub.clone(),
                    registry.clone(),
                );
                (b.clone(), Some(b))
            }
            None => (
                Arc::new(LocalBus::new(node.clone(), router.clone(), hub.clone())),
                None,
            ),
        };
        let now = tokio::time::Instant::now().into_std();
        // Session ids start at a random point so ids of a restarted node
        // differ; the top 12 of their 52 bits come from the node id, so that
        // a session that moves to another node keeps an id no session there
        // has (ids stay below 2^53, exact in a JavaScript number).
        let node_bits = cfg.node_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let seed: u64 = ((node_bits & 0xfff) << 40) | (rand::random::<u64>() >> 25);
        let gw = Arc::new(Self {
            params: Arc::new(SessionParams::from_config(&cfg, now)),
            wheel: TimerWheel::new(cfg.session.timer_tick, now),
            limits: Limits::new(&cfg, now),
            msg_prefix: format!("{}-{:x}", cfg.node_id, rand::random::<u32>()),
            cfg: Arc::new(cfg),
            node,
            registry,
            router,
            bus,
            cluster,
            hub,
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
            resume_keys,
            takes: DashMap::new(),
            me: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
            next_session: AtomicU64::new(seed.max(1)),
            next_msg: AtomicU64::new(1),
            #[cfg(parking)]
            parker: crate::transport::Parker::default(),
            node_ref: Mutex::new(std::sync::Weak::new()),
        });
        let hooks: std::sync::Weak<dyn crate::router::RouterHooks> = Arc::downgrade(&gw) as _;
        gw.router.set_hooks(hooks);
        let reclaim: std::sync::Weak<dyn crate::budget::Reclaim> = Arc::downgrade(&gw) as _;
        gw.budget.set_reclaim(reclaim);
        let _ = gw.me.set(Arc::downgrade(&gw));
        if let Some(c) = &gw.cluster {
            let sessions: std::sync::Weak<dyn crate::bus::Sessions> = Arc::downgrade(&gw) as _;
            c.set_sessions(sessions);
        }
        if !gw.cfg.session.write_delay.is_zero() {
            let wd = crate::session::WriteDelay::new(gw.cfg.session.write_delay);
            gw.router.set_write_delay(wd.clone());
            let _ = gw.write_delay.set(wd);
        }
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This node as its connections hold it: one `NodeRef` for all of
    /// them while any runs.
    pub fn node_ref(self: &Arc<Self>) -> NodeRef {
        let mut weak = self.node_ref.lock();
        if let Some(n) = NodeRef::upgrade(&weak) {
            return n;
        }
        let n = NodeRef::new(self.clone());
        *weak = n.downgrade();
        n
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

    /// The cluster bus, when this node is one of a cluster.
    pub fn cluster(&self) -> Option<&Arc<NatsBus>> {
        self.cluster.as_ref()
    }
    /// The event hub: the upstream subscribers and their queues.
    pub fn hub(&self) -> &Arc<EventHub> {
        &self.hub
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

    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The session core's clock: tokio's, so paused-time tests control it.
    pub fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}
