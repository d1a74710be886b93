//! TLS over a byte stream, after the handshake: a [`Wire`] that seals what
//! the link writes into TLS 1.3 records and opens what the peer sends
//! ([`crate::tls13`] does the records). Its buffers hold bytes only while
//! they are in flight: a record not whole yet, plaintext the reader's buffer
//! could not take, ciphertext the socket would not take yet. An idle TLS
//! connection holds none of them, and parks as a plain-TCP one does
//! (park.rs), keeping only its [`Keys`].

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use tokio::io::ReadBuf;

use crate::tls13::{Established, Keys, Opened};

use super::link::Outputs;
use super::Wire;

/// Ciphertext read per read call (a stack buffer).
const READ_CHUNK: usize = 8 * 1024;

/// A TLS connection over `S`, a byte stream [`Wire`] (a TCP socket; while
/// parked, its socket answering in place).
pub struct TlsStream<S> {
    io: S,
    st: State,
}

/// Everything of a TLS connection but its stream: what stays with it
/// while it is parked (see [`TlsStream::split`]).
struct State {
    keys: Box<Keys>,
    /// Ciphertext of the next records, as far as it came.
    input: Vec<u8>,
    /// Plaintext of an opened record beyond what the reader took, from
    /// `plain_at`.
    plain: Vec<u8>,
    plain_at: usize,
    /// Sealed records the socket has not taken yet, from `output_at`.
    output: Vec<u8>,
    output_at: usize,
    /// The peer's close_notify came: reads end.
    read_closed: bool,
    /// Our close_notify is sealed.
    write_closed: bool,
}

impl<S> From<Established<S>> for TlsStream<S> {
    fn from(e: Established<S>) -> Self {
        Self {
            io: e.io,
            st: State {
                keys: e.keys,
                input: e.input,
                plain: e.early,
                plain_at: 0,
                output: Vec::new(),
                output_at: 0,
                read_closed: false,
                write_closed: false,
            },
        }
    }
}

impl<S> TlsStream<S> {
    /// Whether nothing is in flight: no partial record, no plaintext
    /// waiting for the reader, nothing unwritten, no close begun. Only
    /// such a connection may park (its buffers do not travel).
    pub fn is_quiet(&self) -> bool {
        self.st.input.is_empty()
            && self.st.plain_at >= self.st.plain.len()
            && self.st.output_at >= self.st.output.len()
            && !self.st.read_closed
            && !self.st.write_closed
    }

    /// The same connection over another stream (a socket that parks, or
    /// comes back from parking), its buffers kept.
    pub fn map_io<T>(self, f: impl FnOnce(S) -> T) -> TlsStream<T> {
        TlsStream {
            io: f(self.io),
            st: self.st,
        }
    }

    /// The stream, and the connection without it (to be joined to it
    /// again with [`TlsStream::map_io`]).
    pub fn split(self) -> (S, TlsStream<()>) {
        (
            self.io,
            TlsStream {
                io: (),
                st: self.st,
            },
        )
    }

    pub fn io(&self) -> &S {
        &self.io
    }

    /// Drops what a quiet connection need not keep (the expanded keys),
    /// for a connection that parks.
    pub fn shed(&mut self) {
        self.st.keys.shed();
        self.st.input = Vec::new();
        self.st.plain = Vec::new();
        self.st.plain_at = 0;
        self.st.output = Vec::new();
        self.st.output_at = 0;
    }
}

impl<S: Wire> TlsStream<S> {
    /// Writes sealed records until none is left; `Pending` when the socket
    /// is full (its waker is registered).
    fn poll_flush_output(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.st.output_at < self.st.output.len() {
            match self
                .io
                .poll_write(0, cx, &self.st.output[self.st.output_at..])
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.st.output_at += n,
            }
        }
        // Nothing kept while nothing is in flight.
        self.st.output = Vec::new();
        self.st.output_at = 0;
        Poll::Ready(Ok(()))
    }

    /// Opens the records in `input` until one gives plaintext for `buf`.
    /// True when `buf` got something or the peer closed.
    fn open_input(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<bool> {
        let mut used_total = 0;
        let mut done = false;
        while !done {
            let rest = &mut self.st.input[used_total..];
            match self.st.keys.open(rest, &mut self.st.output)? {
                Opened::Partial => break,
                Opened::Control { used } => used_total += used,
                Opened::Closed { used } => {
                    used_total += used;
                    self.st.read_closed = true;
                    done = true;
                }
                Opened::Data { used, data } => {
                    let data = &rest[data];
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    if n < data.len() {
                        self.st.plain = data[n..].to_vec();
                        self.st.plain_at = 0;
                    }
                    used_total += used;
                    // An empty record gives nothing: go on.
                    done = n > 0 || !self.st.plain.is_empty();
                }
            }
        }
        if used_total >= self.st.input.len() {
            self.st.input = Vec::new();
        } else {
            self.st.input.drain(..used_total);
        }
        Ok(done)
    }
}

impl<S: Wire> Wire for TlsStream<S> {
    fn outputs(&self) -> Outputs {
        Outputs::One
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.st.plain_at < self.st.plain.len() {
                let n = (self.st.plain.len() - self.st.plain_at).min(buf.remaining());
                buf.put_slice(&self.st.plain[self.st.plain_at..self.st.plain_at + n]);
                self.st.plain_at += n;
                if self.st.plain_at >= self.st.plain.len() {
                    self.st.plain = Vec::new();
                    self.st.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if self.st.read_closed {
                // End of stream: nothing filled.
                return Poll::Ready(Ok(()));
            }
            if self.open_input(buf)? {
                return Poll::Ready(Ok(()));
            }
            // A KeyUpdate may have sealed ours: out with it, best effort
            // (the next write or flush finishes it).
            if self.st.output_at < self.st.output.len() {
                if let Poll::Ready(Err(e)) = self.poll_flush_output(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut stack);
            match self.io.poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    if self.st.input.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Ready(Ok(())) => self.st.input.extend_from_slice(rb.filled()),
            }
        }
    }

    fn poll_write(
        &mut self,
        _out: usize,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.poll_flush_output(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = self.st.keys.seal(buf, &mut self.st.output)?;
        // The record is ours now: what the socket does not take goes out
        // on the next write or flush (the socket's waker is registered).
        if let Poll::Ready(Err(e)) = self.poll_flush_output(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        &mut self,
        out: usize,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(out, cx, first)
    }

    /// Each slice of a `writev` would cost a record of its own: the link
    /// gives one flat buffer.
    fn vectored(&self, _out: usize) -> bool {
        false
    }

    fn poll_flush(&mut self, _out: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_output(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.st.write_closed {
            self.st.write_closed = true;
            self.st.keys.seal_close_notify(&mut self.st.output)?;
        }
        match self.poll_flush_output(cx) {
            Poll::Ready(Ok(())) => self.io.poll_shutdown(cx),
            other => other,
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        self.io.peer_addr()
    }
}
