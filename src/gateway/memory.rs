//! The in-memory transport: a connection over a `tokio::io::duplex` pipe,
//! through the same session code as TCP (tests and the load tool use it).

use std::net::SocketAddr;
use std::sync::Arc;

use super::Gateway;
use crate::ids::TransportKind;
use crate::transport::{ConnGuard, Connection};
use crate::wire::Code;

impl Gateway {
    /// Runs a connection over an in-memory pipe, through the same session code
    /// as TCP. Returns the client's end.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_CONNECTIONS` when a connection cap is reached.
    pub fn connect_memory(self: &Arc<Self>, buf: usize) -> Result<tokio::io::DuplexStream, Code> {
        let (client, server) = tokio::io::duplex(buf);
        let remote = SocketAddr::from(([127, 0, 0, 1], 0));
        let node = self.node_ref();
        let guard = ConnGuard::acquire(&node, remote, TransportKind::Memory)?;
        tokio::spawn(Connection::new(node, server, TransportKind::Memory, guard));
        Ok(client)
    }
}
