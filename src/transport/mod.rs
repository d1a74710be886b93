//! Transports: drive one [`Session`](crate::session::Session) over a byte stream.
//!
//! [`Connection`] is a hand-written future that works over any
//! `AsyncRead + AsyncWrite` (plain TCP, TLS, an in-memory pipe; later QUIC
//! streams). It holds no read buffer while a connection is idle (reads go
//! through a stack buffer; only a partial frame is kept), no write buffer
//! unless a write is blocked, and no per-connection timer (deadlines go to the
//! shared [`TimerWheel`](crate::timer::TimerWheel)).

mod conn;

pub use conn::{ConnGuard, Connection};
