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

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use std::sync::Arc;

use super::{Link, Outputs, Wire};
use crate::ids::SessionId;
use crate::metrics as m;

/// The QUIC connection a session is attached over, by session: one entry
/// per QUIC session (TCP sessions pay nothing), read live so that presence
/// sees a migration as soon as quinn does.
pub type QuicPaths = dashmap::DashMap<SessionId, quinn::Connection>;

/// One QUIC connection carrying one session.
pub struct QuicWire {
    conn: quinn::Connection,
    recv: quinn::RecvStream,
    send: quinn::SendStream,
    /// The bulk lane's stream; `None` when the client allows no
    /// unidirectional stream (both lanes then share `send`).
    bulk: Option<quinn::SendStream>,
    /// Until the handshake is confirmed: its outcome (the link runs only
    /// idempotent requests before). Boxed: it is gone after the first RTT.
    confirmed: Option<Pin<Box<quinn::ZeroRttAccepted>>>,
    /// The client's address as last seen, and the one before: a path that
    /// flips back (a probe that failed validation) is not a new migration.
    remote: SocketAddr,
    previous: SocketAddr,
    /// Where presence looks up this connection's address, and the session
    /// it is entered under (once logged in; a resume changes it).
    paths: Option<(Arc<QuicPaths>, SessionId)>,
}

impl QuicWire {
    pub fn new(
        conn: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        bulk: Option<quinn::SendStream>,
        confirmed: Option<quinn::ZeroRttAccepted>,
    ) -> Self {
        let remote = conn.remote_address();
        Self {
            conn,
            recv,
            send,
            bulk,
            confirmed: confirmed.map(Box::pin),
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
        paths.insert(h.id(), self.conn.clone());
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

    fn out(&mut self, out: usize) -> Pin<&mut quinn::SendStream> {
        match (out, self.bulk.as_mut()) {
            (1, Some(b)) => Pin::new(b),
            _ => Pin::new(&mut self.send),
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
        self.confirmed.is_some()
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }

    fn poll_write(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(self.out(out), cx, buf)
    }

    fn poll_write_vectored(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write_vectored(self.out(out), cx, bufs)
    }

    /// QUIC copies what it is given into its own send buffer, and a slice
    /// per call would be a write per slice: one flat buffer per batch.
    fn vectored(&self, _out: usize) -> bool {
        false
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // FIN on both streams; the connection itself closes when the driver
        // drops it (after the linger, or once the client hung up).
        let _ = self.send.finish();
        if let Some(b) = self.bulk.as_mut() {
            let _ = b.finish();
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
        if let Some(c) = self.confirmed.as_mut() {
            if let Poll::Ready(accepted) = c.as_mut().poll(cx) {
                tracing::trace!(zero_rtt = accepted, "QUIC handshake confirmed");
                self.confirmed = None;
                let conn = &self.conn;
                link.confirm(link.now(), &|| Some(conn.remote_address()));
            }
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
        self.conn.close(0u32.into(), b"");
    }
}
