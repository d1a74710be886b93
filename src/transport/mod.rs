//! Transports: drive one [`Session`](crate::session::Session) over a wire.
//!
//! Three layers, thinnest at the bottom:
//! - [`Link`] (link.rs) is the connection machine: every protocol decision
//!   about one connection (what to write on which output, closing, lingering,
//!   the stall rule, the ack deadline, the timer), with no IO in it.
//! - [`Connection`] (conn.rs) is the hand-written future that moves bytes
//!   between a [`Wire`] and its link. It holds no read buffer while a
//!   connection is idle (reads go through a stack buffer; only a partial
//!   frame is kept), no write buffer unless a write is blocked, and no
//!   per-connection timer (deadlines go to the shared
//!   [`TimerWheel`](crate::timer::TimerWheel)).
//! - A [`Wire`] is how bytes move: any [`Transport`] byte stream (TCP, an
//!   in-memory pipe) with one output, TLS records over one ([`TlsStream`],
//!   tls.rs), WebSocket messages over either ([`WsStream`], ws.rs, after
//!   the HTTP upgrade of upgrade.rs), or QUIC streams (quic.rs) with two.

mod conn;
mod link;
mod node;
#[cfg(parking)]
mod park;
pub mod quic;
pub mod quic_driver;
#[cfg(test)]
mod testkit;
pub mod tls;
pub mod upgrade;
pub mod ws;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use conn::{ConnGuard, Connection};
pub use link::{Link, Outputs, WriteBatch};
pub use node::{ConnEnv, Node, NodeRef};
#[cfg(parking)]
pub use park::{
    Parkable, Parker, Parking, TcpConnection, TlsConnection, WsConnection, WssConnection,
};
pub use tls::TlsStream;
pub use ws::WsStream;

/// A byte stream a session can run over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    /// The peer's address, for logs and events (not stored per connection).
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// Whether large push bodies go out as slices of their own (`writev`).
    fn vectored(&self) -> bool {
        self.is_write_vectored()
    }
}

/// How a connection's bytes move: one input, and one output per
/// [`Outputs`] slot. Only moves bytes; every decision is the [`Link`]'s.
pub trait Wire: Unpin + Send {
    /// How the lanes are carried: both on one stream, or the bulk lane on
    /// output 1.
    fn outputs(&self) -> Outputs;

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;

    fn poll_write(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>>;

    fn poll_write_vectored(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;

    /// Whether output `out` takes large push bodies as slices of their own
    /// (`writev`) rather than copied into one flat buffer.
    fn vectored(&self, out: usize) -> bool;

    /// Writes what the wire itself holds for output `out` (a TLS record
    /// the socket did not take whole); `Pending` until it is out.
    fn poll_flush(&mut self, _out: usize, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends every output (the Close frame is written).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// The peer's address.
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// Whether the connection starts before its handshake is confirmed
    /// (QUIC 0-RTT): the link then runs only idempotent requests until
    /// [`Link::confirm`].
    fn early(&self) -> bool {
        false
    }

    /// Transport events a poll should notice (QUIC: the handshake was
    /// confirmed, the peer's address changed). Nothing for a byte stream.
    fn poll_events(&mut self, _cx: &mut Context<'_>, _link: &mut Link) {}

    /// Called after each read of input, before any output: a Login or a
    /// resume read just now has its session by then, and its LoginOk is
    /// not written yet (QUIC: enter the connection for presence, so that
    /// a service told of the login finds the address at once).
    fn on_input(&mut self, _link: &Link) {}
}

impl<T: Transport> Wire for T {
    fn outputs(&self) -> Outputs {
        Outputs::One
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_read(cx, buf)
    }

    fn poll_write(
        &mut self,
        _out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        &mut self,
        _out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self).poll_write_vectored(cx, bufs)
    }

    fn vectored(&self, _out: usize) -> bool {
        Transport::vectored(self)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Transport::peer_addr(self)
    }
}

impl Transport for tokio::net::TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        tokio::net::TcpStream::peer_addr(self).ok()
    }
}

impl Transport for tokio::io::DuplexStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}
