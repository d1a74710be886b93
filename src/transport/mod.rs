//! Transports: drive one [`Session`](crate::session::Session) over a byte stream.
//!
//! [`Connection`] is a hand-written future that works over any
//! `AsyncRead + AsyncWrite` (plain TCP, TLS, an in-memory pipe; later QUIC
//! streams). It holds no read buffer while a connection is idle (reads go
//! through a stack buffer; only a partial frame is kept), no write buffer
//! unless a write is blocked, and no per-connection timer (deadlines go to the
//! shared [`TimerWheel`](crate::timer::TimerWheel)).

mod conn;

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

pub use conn::{ConnGuard, Connection};

/// A byte stream a session can run over.
pub trait Transport: AsyncRead + AsyncWrite + Unpin {
    /// The peer's address, for logs and events (not stored per connection).
    fn peer_addr(&self) -> Option<SocketAddr>;
}

impl Transport for tokio::net::TcpStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        tokio::net::TcpStream::peer_addr(self).ok()
    }
}

impl Transport for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer_addr().ok()
    }
}

impl Transport for tokio::io::DuplexStream {
    fn peer_addr(&self) -> Option<SocketAddr> {
        None
    }
}
