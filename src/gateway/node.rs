//! The gateway as the layers below see it: [`transport::Node`] (what a
//! connection asks of its node), [`upstream::UpstreamNode`] (what the
//! upstream server asks of it) and [`admin::StatusSource`] (what the status
//! page shows of it).
//!
//! [`admin::StatusSource`]: crate::admin::StatusSource
//! [`transport::Node`]: crate::transport::Node
//! [`upstream::UpstreamNode`]: crate::upstream::UpstreamNode

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::env::GatewayEnv;
use super::Gateway;
use crate::bus::Bus;
use crate::config::Config;
use crate::ids::{NodeId, SessionId, TransportKind};
use crate::session::{CloseCmd, DeliveryConfig, SessionEnv, SessionHandle, SessionParams};
use crate::timer::TimerWheel;
use crate::transport::quic::QuicPaths;
use crate::transport::{ConnEnv, Node};
use crate::wire::Code;

/// What the upstream server asks of this node.
impl crate::upstream::UpstreamNode for Gateway {
    fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }
    fn node_id(&self) -> &NodeId {
        &self.node
    }
    fn new_message_id(&self) -> String {
        Gateway::new_message_id(self)
    }
}

/// What the status page shows of this node.
impl crate::admin::StatusSource for Gateway {
    fn status(&self) -> crate::admin::NodeStatus {
        use crate::admin::{ClusterStatus, NodeStatus, PeerStatus};
        let cluster = self.cluster.as_ref().map(|c| ClusterStatus {
            connected: c.is_connected(),
            peers: c
                .peers()
                .into_iter()
                .map(|p| PeerStatus {
                    node_id: p.node.to_string(),
                    state: if p.draining { "draining" } else { "alive" },
                    users: p.users as u64,
                    sessions: p.sessions,
                    synced: p.synced,
                })
                .collect(),
        });
        NodeStatus {
            node_id: self.node.to_string(),
            draining: self.is_draining(),
            connections: self.limits.connections() as u64,
            by_transport: TransportKind::ALL
                .into_iter()
                .zip(self.limits.connections_by_transport())
                .filter(|(k, _)| k.is_client())
                .map(|(k, n)| (k.as_str(), n as u64))
                .collect(),
            sessions: self.registry.len() as u64,
            detached: self.detached_count() as u64,
            parked: self.parked_connections() as u64,
            replay_bytes: self.budget.used() as u64,
            replay_budget: self.budget.limit() as u64,
            cluster,
        }
    }
}

/// What a connection asks of this node.
impl Node for Gateway {
    fn now(&self) -> Instant {
        Gateway::now(self)
    }
    fn await_take(&self, conn: &SessionHandle, body: &[u8]) -> bool {
        Gateway::await_take(self, conn, body)
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
    fn acquire_conn(&self, ip: IpAddr, kind: TransportKind) -> Result<Option<IpAddr>, Code> {
        self.limits.acquire_conn(ip, kind)
    }
    fn release_conn(&self, ip: Option<IpAddr>, kind: TransportKind) {
        self.limits.release_conn(ip, kind);
    }
    fn pending_full(&self) -> bool {
        self.limits.pending_full()
    }
    fn next_session_id(&self) -> SessionId {
        Gateway::next_session_id(self)
    }
    fn connection_opened(&self, h: &SessionHandle) {
        Gateway::connection_opened(self, h);
    }
    fn connection_settled(&self, h: &SessionHandle) {
        Gateway::connection_settled(self, h);
    }
    fn connection_ended(&self, h: &SessionHandle, gen: u32, code: Code) {
        Gateway::connection_ended(self, h, gen, code);
    }
    fn with_env(&self, conn: ConnEnv<'_>, run: &mut dyn FnMut(&mut dyn SessionEnv)) {
        let mut env = GatewayEnv {
            gw: self,
            handle: conn.handle,
            gen: conn.gen,
            kind: conn.kind,
            peer: conn.peer,
            registered: conn.registered,
        };
        run(&mut env);
    }
    fn is_draining(&self) -> bool {
        Gateway::is_draining(self)
    }
    fn drain_close(&self) -> CloseCmd {
        Gateway::drain_close(self)
    }
    fn count_write(&self) {
        Gateway::count_write(self);
    }
    fn count_migration(&self) {
        Gateway::count_migration(self);
    }
    fn quic_paths(&self) -> &Arc<QuicPaths> {
        &self.paths
    }
    fn park_after(&self) -> Option<Duration> {
        Gateway::park_after(self)
    }
    #[cfg(parking)]
    fn parker(&self) -> &crate::transport::Parker {
        &self.parker
    }
}
