//! The QUIC wire: a session's bytes over QUIC streams.
//!
//! Input is the client's bidirectional stream. Output 0 is the same stream
//! (control frames and interactive pushes), output 1 the unidirectional
//! stream the gateway opened for the bulk lane. A client whose QUIC stack
//! allows the gateway no unidirectional stream gets both lanes on its
//! bidirectional stream, interleaved as over TCP (one output). The frames inside are the
//! same length-prefixed frames as over TCP; the [`Link`] decides everything.
//! This wire also tells the link when a 0-RTT handshake is confirmed, and
//! counts the client's address changes (connection migration).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn_proto::StreamId;
use tokio::io::ReadBuf;

use super::quic_driver::{ConnRef, Connection};
use super::{Link, Outputs, Wire};
use crate::ids::SessionId;
use crate::metrics as m;

/// The QUIC connection a session is attached over, by session: one entry
/// per QUIC session (TCP sessions pay nothing), read live so that presence
/// sees a migration as soon as QUIC does.
pub type QuicPaths = dashmap::DashMap<SessionId, ConnRef>;

/// One QUIC connection carrying one session.
pub struct QuicWire {
    conn: Connection,
    /// The client's bidirectional stream: input, and output 0.
    stream: StreamId,
    /// The bulk lane's stream; `None` when the client allows no
    /// unidirectional stream (both lanes then share `stream`).
    bulk: Option<StreamId>,
    /// Until the handshake is confirmed the link runs only idempotent
    /// requests (0-RTT).
    confirmed: bool,
    /// The client's address as last seen, and the one before: a path that
    /// flips back (a probe that failed validation) is not a new migration.
    remote: SocketAddr,
    previous: SocketAddr,
    /// Where presence looks up this connection's address, and the session
    /// it is entered under (once logged in; a resume changes it).
    paths: Option<(Arc<QuicPaths>, SessionId)>,
}

impl QuicWire {
    pub fn new(conn: Connection, stream: StreamId, bulk: Option<StreamId>) -> Self {
        let remote = conn.remote_address();
        Self {
            conn,
            stream,
            bulk,
            confirmed: false,
            remote,
            previous: remote,
            paths: None,
        }
    }

    /// Enters this connection under the session it carries, once logged
    /// in, and moves the entry when a resume adopts another session.
    fn track(&mut self, link: &Link) {
        let h = link.handle();
        if h.info().is_none() || self.paths.as_ref().is_some_and(|(_, id)| *id == h.id()) {
            return;
        }
        self.untrack();
        let paths = link.node().quic_paths().clone();
        paths.insert(h.id(), self.conn.reference());
        self.paths = Some((paths, h.id()));
    }

    /// Removes this connection's entry, unless a newer connection of the
    /// same session (a resume over QUIC) has replaced it.
    fn untrack(&mut self) {
        if let Some((paths, id)) = self.paths.take() {
            let me = self.conn.stable_id();
            paths.remove_if(&id, |_, c| c.stable_id() == me);
        }
    }

    fn out(&self, out: usize) -> StreamId {
        match (out, self.bulk) {
            (1, Some(b)) => b,
            _ => self.stream,
        }
    }
}

impl Wire for QuicWire {
    fn outputs(&self) -> Outputs {
        if self.bulk.is_some() {
            Outputs::Two
        } else {
            Outputs::One
        }
    }

    fn early(&self) -> bool {
        !self.confirmed
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.conn.poll_read(self.stream, cx, buf)
    }

    fn poll_write(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.conn.poll_write(self.out(out), cx, buf)
    }

    fn poll_write_vectored(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One slice at a time (`vectored` is false: the link hands over flat
        // batches); an empty first slice writes nothing.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.conn.poll_write(self.out(out), cx, first)
    }

    /// QUIC copies what it is given into its own send buffer, and a slice
    /// per call would be a write per slice: one flat buffer per batch.
    fn vectored(&self, _out: usize) -> bool {
        false
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // FIN on both streams; the connection itself closes when the wire
        // is dropped (after the linger, or once the client hung up).
        self.conn.finish(self.stream);
        if let Some(b) = self.bulk {
            self.conn.finish(b);
        }
        Poll::Ready(Ok(()))
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.conn.remote_address())
    }

    fn on_input(&mut self, link: &Link) {
        self.track(link);
    }

    fn poll_events(&mut self, cx: &mut Context<'_>, link: &mut Link) {
        if !self.confirmed && self.conn.poll_confirmed(cx).is_ready() {
            tracing::trace!(
                zero_rtt = self.conn.accepted_0rtt(),
                "QUIC handshake confirmed"
            );
            self.confirmed = true;
            let conn = &self.conn;
            link.confirm(link.now(), &|| Some(conn.remote_address()));
        }
        let now = self.conn.remote_address();
        if now != self.remote {
            if now != self.previous {
                metrics::counter!(m::QUIC_MIGRATIONS).increment(1);
                link.node().count_migration();
                tracing::debug!(from = %self.remote, to = %now, session = ?link.handle().id(), "QUIC client migrated");
            }
            self.previous = self.remote;
            self.remote = now;
        }
    }
}

impl Drop for QuicWire {
    fn drop(&mut self) {
        self.untrack();
        // The session is over on this connection: close it now rather than
        // waiting for the idle timeout.
        self.conn.close(0, b"");
    }
}
