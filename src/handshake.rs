//! TLS admission: from an accepted TCP socket to a finished TLS handshake,
//! without letting peers that send nothing, or send slowly, hold what a real
//! device needs. Owns the handshake slots, the sets of handshakes in
//! progress and the deadlines; knows nothing of sessions or the gateway
//! (the caller passes what to do with the TLS stream) and must not: its
//! limits come in as values.
//!
//! A handshake goes through three phases, and only the third costs CPU:
//!
//! 1. **Nothing read yet.** The task holds the socket and one timer, no
//!    rustls state and no slot; it waits for the socket to become readable
//!    (a few hundred bytes per silent socket, most of it tokio's).
//! 2. **The ClientHello arriving.** Its records are read into a buffer
//!    that grows only with the bytes that arrive (the record headers and
//!    the handshake header say how long it is), before any rustls state
//!    exists. A peer that trickles bytes thus costs its bytes, not rustls's
//!    state. Phases 1 and 2 together must end within `tls.hello_timeout` of
//!    accept, so a peer that trickles a byte a second is cut off after a
//!    few seconds.
//! 3. **The key exchange.** With a complete ClientHello the connection
//!    takes one of `tls.max_handshakes` slots, and rustls (its unbuffered
//!    API: every buffer is ours) computes the key exchange and the
//!    signature and the gateway's flight is written. The slot is given
//!    back as soon as that flight is handed to the socket: the wait for
//!    the client's Finished costs no CPU, and a slot held over it would let
//!    a peer that replays one captured ClientHello and then stays silent
//!    hold a slot for the whole `tls.handshake_timeout`, which is the
//!    lockout this module exists to prevent. The whole handshake must end
//!    within `tls.handshake_timeout` of accept. At its end rustls hands
//!    over the traffic secrets, and the connection runs its records itself
//!    ([`crate::tls13`]): nothing of rustls's buffers outlives the
//!    handshake.
//!
//! What bounds the sockets in phases 1 to 3 (descriptors and memory) is
//! `tls.max_pending_handshakes`: when that many handshakes are in progress,
//! a new connection closes the *oldest* of them. A real device sends its
//! ClientHello as soon as TCP connects and finishes within a few round
//! trips, so it is among the newest; the sockets that sit there are the
//! ones evicted. A per-IP cap could not do this job alone: one attacker
//! address would then also lock out every device behind the same NAT.
//!
//! [`HandshakeSet`] is that bounded set; QUIC has one of its own, for
//! connections that have not opened their stream (src/quic/mod.rs).
//!
//! Each end of a TLS handshake is counted in `tether_tls_handshakes_total`
//! by result: `accepted`, `hello_timeout`, `timeout`, `evicted`, `failed`.
//! A refused TLS peer gets no Tether frame (no TLS yet to carry one): the
//! socket is closed.

use std::collections::BTreeMap;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};

use crate::tls13::{Established, Keys, SecretCapture, TrafficSecrets};

use crate::metrics as m;

/// Why a handshake ended without a TLS stream; each is a value of the
/// `result` label of `tether_tls_handshakes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No complete ClientHello within `tls.hello_timeout`.
    #[error("no ClientHello within tls.hello_timeout")]
    HelloTimeout,
    /// The handshake did not finish within `tls.handshake_timeout`.
    #[error("the handshake did not finish within tls.handshake_timeout")]
    Timeout,
    /// The peer closed, sent something that is not TLS 1.3, or the
    /// handshake failed otherwise.
    #[error("the handshake failed")]
    Failed,
}

impl HandshakeError {
    /// The metrics label.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::HelloTimeout => "hello_timeout",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
        }
    }
}

/// A byte stream a TLS handshake can start on: it can say, without reading,
/// when the peer has sent something (or closed).
pub trait HelloIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Ready once a read would not block. Must not consume anything.
    fn poll_first_bytes(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl HelloIo for TcpStream {
    fn poll_first_bytes(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// The `[tls]` limits admission applies (passed as values, so that this
/// module stays below the config).
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// `tls.max_handshakes`: key exchanges at once.
    pub max_handshakes: usize,
    /// `tls.max_pending_handshakes`: handshakes in progress at once.
    pub max_pending: usize,
    /// `tls.hello_timeout` (the shorter of it and `handshake_timeout` applies).
    pub hello_timeout: Duration,
    /// `tls.handshake_timeout`.
    pub handshake_timeout: Duration,
}

/// The handshake slots, the set of handshakes in progress and their
/// deadlines, shared by every TLS listener of one gateway.
pub struct TlsAdmission {
    config: Arc<rustls::ServerConfig>,
    slots: Semaphore,
    hello_timeout: Duration,
    handshake_timeout: Duration,
    pending: Arc<HandshakeSet>,
}

impl TlsAdmission {
    /// Admission with `limits`, for listeners with the server config `config`.
    pub fn new(limits: HandshakeLimits, config: Arc<rustls::ServerConfig>) -> Arc<Self> {
        // The records after the handshake are ours (src/tls13.rs), with
        // the keys rustls hands over only when asked to, and the traffic
        // secrets it gives its key log only.
        let mut c = (*config).clone();
        c.enable_secret_extraction = true;
        c.key_log = Arc::new(SecretCapture);
        let config = Arc::new(c);
        Arc::new(Self {
            config,
            slots: Semaphore::new(limits.max_handshakes.max(1)),
            hello_timeout: limits.hello_timeout.min(limits.handshake_timeout),
            handshake_timeout: limits.handshake_timeout,
            pending: HandshakeSet::new(limits.max_pending, SetMetrics::TLS),
        })
    }

    /// Handshakes in progress now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Runs the handshake of an accepted connection in a task of its own
    /// and hands the TLS stream to `then` (which should spawn what runs
    /// the connection, so that this small task ends). When the set of
    /// handshakes in progress is full, the oldest one is closed first. If
    /// this handshake is itself evicted or fails, `then` is dropped
    /// unrun, and whatever it owns (the connection's accounting) with it.
    pub fn spawn<F>(self: &Arc<Self>, stream: TcpStream, remote: SocketAddr, then: F)
    where
        F: FnOnce(Established<TcpStream>) + Send + 'static,
    {
        let me = self.clone();
        self.pending.spawn(async move {
            match me.handshake(stream).await {
                Ok(tls) => {
                    metrics::counter!(m::TLS_HANDSHAKES, "result" => "accepted").increment(1);
                    then(tls);
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake ended");
                    metrics::counter!(m::TLS_HANDSHAKES, "result" => e.as_label()).increment(1);
                }
            }
        });
    }

    /// The handshake itself, on any [`HelloIo`]: the phases and deadlines
    /// of the module documentation.
    ///
    /// # Errors
    /// [`HandshakeError`]: which deadline passed, or that it failed.
    ///
    /// # Cancel safety
    /// Dropping it drops the stream (the connection closes) and any slot.
    pub async fn handshake<IO: HelloIo>(
        &self,
        mut io: IO,
    ) -> Result<Established<IO>, HandshakeError> {
        let start = Instant::now();
        let hello_by = start + self.hello_timeout;
        let done_by = start + self.handshake_timeout;
        // Phase 1: only the socket and this timer are held.
        match timeout_at(hello_by, poll_fn(|cx| io.poll_first_bytes(cx))).await {
            Err(_) => return Err(HandshakeError::HelloTimeout),
            Ok(Err(_)) => return Err(HandshakeError::Failed),
            Ok(Ok(())) => {}
        }
        // Phase 2: the ClientHello in a buffer that grows only with what
        // arrives, so a byte-a-second peer costs its bytes, not rustls's
        // connection state.
        let mut hello = Vec::new();
        match timeout_at(
            hello_by,
            poll_fn(|cx| poll_client_hello(&mut io, cx, &mut hello)),
        )
        .await
        {
            Err(_) => return Err(HandshakeError::HelloTimeout),
            Ok(Err(_)) => return Err(HandshakeError::Failed),
            Ok(Ok(())) => {}
        }
        // The rest in a box of its own (rustls's state makes it a few KB):
        // a task keeps the size of its largest state for its life, and the
        // task of a peer that has not sent its ClientHello must stay the
        // size of phases 1 and 2 (256 bytes).
        Box::pin(self.key_exchange(io, hello, done_by)).await
    }

    /// Phase 3, on rustls's unbuffered API: every byte in and out goes
    /// through buffers of ours, so that when the handshake is done nothing
    /// of rustls's is left but the keys ([`crate::tls13`]).
    async fn key_exchange<IO: HelloIo>(
        &self,
        mut io: IO,
        mut incoming: Vec<u8>,
        done_by: Instant,
    ) -> Result<Established<IO>, HandshakeError> {
        // A slot is held from here until the gateway's flight is written,
        // and only while rustls works: should rustls still want more of the
        // ClientHello (a header that lied about its length), the slot goes
        // back while the peer is waited for.
        let mut permit = None;
        let mut flight_out = false;
        let mut conn = UnbufferedServerConnection::new(self.config.clone())
            .map_err(|_| HandshakeError::Failed)?;
        let mut outgoing = Vec::new();
        let mut early = Vec::new();
        let mut secrets = TrafficSecrets::default();
        loop {
            if !flight_out && permit.is_none() {
                permit = match timeout_at(done_by, self.slots.acquire()).await {
                    Err(_) => return Err(HandshakeError::Timeout),
                    Ok(Err(_)) => return Err(HandshakeError::Failed),
                    Ok(Ok(p)) => Some(p),
                };
            }
            // rustls computes the key exchange and signs in here,
            // synchronously, when it meets the ClientHello.
            SecretCapture::clear();
            let (discard, step) = {
                let status = conn.process_tls_records(&mut incoming);
                let step = match status.state {
                    Err(_) => Step::Fail,
                    Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, &mut outgoing),
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        Step::Transmit
                    }
                    Ok(ConnectionState::BlockedHandshake) => Step::Read,
                    Ok(ConnectionState::ReadTraffic(mut r)) => {
                        let mut step = Step::Again;
                        while let Some(rec) = r.next_record() {
                            match rec {
                                Ok(rec) if early.len() + rec.payload.len() <= MAX_EARLY => {
                                    early.extend_from_slice(rec.payload);
                                }
                                _ => step = Step::Fail,
                            }
                        }
                        step
                    }
                    Ok(ConnectionState::WriteTraffic(_)) => Step::Done,
                    // A close, or 0-RTT data (not offered on TLS).
                    Ok(_) => Step::Fail,
                };
                (status.discard, step)
            };
            SecretCapture::take(&mut secrets);
            incoming.drain(..discard);
            match step {
                Step::Again => {}
                Step::Transmit => {
                    match timeout_at(done_by, io.write_all(&outgoing)).await {
                        Err(_) => return Err(HandshakeError::Timeout),
                        Ok(Err(_)) => return Err(HandshakeError::Failed),
                        Ok(Ok(())) => {}
                    }
                    outgoing = Vec::new();
                    // The gateway's flight is out: the wait for the
                    // client's answer costs no CPU, and holds no slot.
                    permit = None;
                    flight_out = true;
                }
                // Writable once our Finished is out; done once the
                // client's is in.
                Step::Done if !conn.is_handshaking() => break,
                Step::Read | Step::Done => {
                    permit = None;
                    if incoming.len() >= MAX_HANDSHAKE_INPUT {
                        return Err(HandshakeError::Failed);
                    }
                    let mut chunk = [0u8; 4096];
                    match timeout_at(done_by, io.read(&mut chunk)).await {
                        Err(_) => return Err(HandshakeError::Timeout),
                        Ok(Err(_) | Ok(0)) => return Err(HandshakeError::Failed),
                        Ok(Ok(n)) => incoming.extend_from_slice(&chunk[..n]),
                    }
                }
                Step::Fail => {
                    // rustls queues its alert on failure: send it, best
                    // effort, without waiting.
                    let status = conn.process_tls_records(&mut incoming);
                    if let Ok(ConnectionState::EncodeTlsData(mut e)) = status.state {
                        outgoing.clear();
                        if matches!(encode(&mut e, &mut outgoing), Step::Again) {
                            let _ = poll_fn(|cx| {
                                Poll::Ready(Pin::new(&mut io).poll_write(cx, &outgoing))
                            })
                            .await;
                        }
                    }
                    return Err(HandshakeError::Failed);
                }
            }
        }
        drop(permit);
        let (keys, _key_schedule) = conn
            .dangerous_into_kernel_connection()
            .map_err(|_| HandshakeError::Failed)?;
        let keys = Keys::new(keys, secrets).map_err(|_| HandshakeError::Failed)?;
        Ok(Established {
            io,
            keys,
            input: incoming,
            early,
        })
    }
}

/// What the handshake loop does after one call into rustls.
enum Step {
    /// Call rustls again.
    Again,
    /// Write what was encoded.
    Transmit,
    /// Read more from the peer.
    Read,
    Done,
    Fail,
}

/// Encodes rustls's next handshake record onto `out`.
fn encode<D>(e: &mut rustls::unbuffered::EncodeTlsData<'_, D>, out: &mut Vec<u8>) -> Step {
    let start = out.len();
    out.resize(start + 4096, 0);
    let r = match e.encode(&mut out[start..]) {
        Err(EncodeError::InsufficientSize(s)) => {
            out.resize(start + s.required_size, 0);
            e.encode(&mut out[start..])
        }
        r => r,
    };
    match r {
        Ok(n) => {
            out.truncate(start + n);
            Step::Again
        }
        Err(_) => Step::Fail,
    }
}

/// The most a record may hold, with its 5-byte header (2^14 of plaintext).
const MAX_FIRST_RECORD: usize = 5 + (1 << 14);

/// The largest ClientHello read before rustls sees it (rustls's own limit
/// for a handshake message).
const MAX_HELLO: usize = 0xffff;

/// The most handshake input held at once (a ClientHello spanning records,
/// or the client's second flight).
const MAX_HANDSHAKE_INPUT: usize = 2 * MAX_HELLO;

/// The most application data taken with the client's Finished (a Login is
/// a few hundred bytes).
const MAX_EARLY: usize = 64 * 1024;

/// How many more bytes the ClientHello in `buf` needs (0 when it is whole,
/// or when what is there cannot be one: rustls then refuses it with the
/// right alert). Reads no further than the record it is in.
fn hello_wants(buf: &[u8]) -> usize {
    let mut pos = 0;
    let mut payload = 0;
    let mut hello_len = None;
    loop {
        let Some(h) = buf.get(pos..pos + 5) else {
            return pos + 5 - buf.len();
        };
        if h[0] != 0x16 {
            return 0;
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if 5 + len > MAX_FIRST_RECORD {
            return 0;
        }
        if buf.len() < pos + 5 + len {
            return pos + 5 + len - buf.len();
        }
        if hello_len.is_none() {
            // The handshake header: type, then a 24-bit length.
            let Some(m) = buf.get(pos + 5..pos + 9) else {
                return 0;
            };
            let n = 4 + (usize::from(m[1]) << 16 | usize::from(m[2]) << 8 | usize::from(m[3]));
            if n > MAX_HELLO {
                return 0;
            }
            hello_len = Some(n);
        }
        payload += len;
        pos += 5 + len;
        if hello_len.is_some_and(|n| payload >= n) {
            return 0;
        }
    }
}

/// Reads into `buf` until it holds the peer's ClientHello whole (record
/// headers and the handshake header say how long it is), and no further.
/// Ready early when the bytes cannot be a ClientHello (see [`hello_wants`]).
fn poll_client_hello<IO: AsyncRead + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<()>> {
    loop {
        let want = hello_wants(buf);
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        // The read buffer lives on the stack for this call only.
        let mut tmp = [0u8; 2048];
        let n = want.min(tmp.len());
        let mut rb = tokio::io::ReadBuf::new(&mut tmp[..n]);
        match Pin::new(&mut *io).poll_read(cx, &mut rb) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
            }
            Poll::Ready(Ok(())) => buf.extend_from_slice(rb.filled()),
        }
    }
}

/// Where a [`HandshakeSet`] counts its evictions and shows its size.
#[derive(Debug, Clone, Copy)]
pub struct SetMetrics {
    /// The counter that gets `result="evicted"`.
    pub results: &'static str,
    /// The gauge of handshakes in progress.
    pub pending: &'static str,
}

impl SetMetrics {
    pub const TLS: Self = Self {
        results: m::TLS_HANDSHAKES,
        pending: m::TLS_HANDSHAKES_PENDING,
    };
    pub const QUIC: Self = Self {
        results: m::QUIC_HANDSHAKES,
        pending: m::QUIC_HANDSHAKES_PENDING,
    };
}

/// The handshakes in progress of one transport, each a task, at most `max`
/// at once: spawning one more into a full set aborts the oldest task (its
/// socket or connection, and whatever it owns, are dropped with it). See
/// the module documentation for why the oldest.
pub struct HandshakeSet {
    pending: Mutex<Pending<AbortHandle>>,
    metrics: SetMetrics,
}

impl HandshakeSet {
    /// A set of at most `max` (at least 1).
    pub fn new(max: usize, metrics: SetMetrics) -> Arc<Self> {
        Arc::new(Self {
            pending: Mutex::new(Pending::new(max)),
            metrics,
        })
    }

    /// Handshakes in progress now.
    pub fn len(&self) -> usize {
        self.pending.lock().len()
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Spawns `handshake` as a task in the set, first aborting the oldest
    /// task when the set is full. The task leaves the set when it ends, or
    /// is aborted; it should end once its handshake has, handing the
    /// connection to a task of its own.
    pub fn spawn<F>(self: &Arc<Self>, handshake: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (id, evicted, len) = {
            let mut p = self.pending.lock();
            let full = p.is_full();
            let (id, h) = p.admit();
            (id, full.then_some(h), p.len())
        };
        metrics::gauge!(self.metrics.pending).set(len as f64);
        if let Some(h) = evicted {
            metrics::counter!(self.metrics.results, "result" => "evicted").increment(1);
            // Outside the lock: the evicted task's ticket takes it when
            // the task is dropped.
            if let Some(h) = h {
                h.abort();
            }
        }
        let ticket = Ticket {
            set: self.clone(),
            id,
        };
        let task = tokio::spawn(async move {
            let _ticket = ticket;
            handshake.await;
        });
        let late = self.pending.lock().set_handle(id, task.abort_handle());
        if let Some(h) = late {
            // Evicted between admit and here (or already done).
            h.abort();
        }
    }
}

/// Removes its handshake from the set when the handshake task ends (or is
/// aborted).
struct Ticket {
    set: Arc<HandshakeSet>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let len = {
            let mut p = self.set.pending.lock();
            p.remove(self.id);
            p.len()
        };
        metrics::gauge!(self.set.metrics.pending).set(len as f64);
    }
}

/// Handshakes in progress, oldest first, at most `max`: admitting one more
/// into a full set evicts the oldest. `H` is what closes a handshake (the
/// task's abort handle); it is set just after admission, once the task
/// exists.
struct Pending<H> {
    max: usize,
    next: u64,
    live: BTreeMap<u64, Option<H>>,
}

impl<H> Pending<H> {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            next: 0,
            live: BTreeMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.live.len()
    }

    fn is_full(&self) -> bool {
        self.live.len() >= self.max
    }

    /// Takes in a new handshake; returns its id, and the handle of the
    /// oldest one when it had to make room (`None` when there was room, or
    /// when the oldest has no handle yet: [`Pending::set_handle`] then
    /// returns it).
    fn admit(&mut self) -> (u64, Option<H>) {
        let mut evicted = None;
        if self.live.len() >= self.max {
            if let Some((_, h)) = self.live.pop_first() {
                evicted = h;
            }
        }
        let id = self.next;
        self.next += 1;
        self.live.insert(id, None);
        (id, evicted)
    }

    /// Gives handshake `id` its handle. Returns the handle back when `id`
    /// is no longer in the set (evicted, or already ended): the caller
    /// closes it.
    fn set_handle(&mut self, id: u64, h: H) -> Option<H> {
        match self.live.get_mut(&id) {
            Some(slot) => {
                *slot = Some(h);
                None
            }
            None => Some(h),
        }
    }

    fn remove(&mut self, id: u64) {
        self.live.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: Duration = Duration::from_secs(5);
    const HANDSHAKE: Duration = Duration::from_secs(10);

    #[test]
    fn a_full_set_evicts_its_oldest_and_keeps_the_rest() {
        let mut p = Pending::new(3);
        let ids: Vec<u64> = (0..3)
            .map(|i| {
                let (id, ev) = p.admit();
                assert_eq!(ev, None);
                assert_eq!(p.set_handle(id, i), None);
                id
            })
            .collect();
        assert_eq!(p.len(), 3);
        let (new, ev) = p.admit();
        assert_eq!(ev, Some(0), "the oldest is closed");
        assert_eq!(p.len(), 3);
        // The evicted handshake's own removal finds nothing.
        p.remove(ids[0]);
        assert_eq!(p.len(), 3);
        // One that ended frees its place: no eviction for the next.
        p.remove(ids[1]);
        let (_, ev) = p.admit();
        assert_eq!(ev, None);
        // The next eviction takes the oldest left (ids[2]), not the newer.
        assert_eq!(p.set_handle(new, 3), None);
        let (_, ev) = p.admit();
        assert_eq!(ev, Some(2));
    }

    #[test]
    fn a_handshake_evicted_before_its_handle_is_set_gets_it_back() {
        let mut p = Pending::new(1);
        let (a, _) = p.admit();
        let (_, ev) = p.admit();
        assert_eq!(ev, None::<u32>, "no handle yet to close");
        assert_eq!(p.set_handle(a, 7), Some(7), "the caller closes it");
        assert_eq!(p.len(), 1);
    }
    /// A duplex pipe whose first bytes are waited for by the acceptor
    /// itself (it cannot peek), so phase 1 ends at once.
    struct Pipe(tokio::io::DuplexStream);

    impl AsyncRead for Pipe {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Pipe {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl HelloIo for Pipe {
        fn poll_first_bytes(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn pipe() -> (Pipe, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        (Pipe(a), b)
    }

    /// Server and client configs around a fresh self-signed certificate.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let (server, client) = crate::tls::test_configs();
        (Arc::new(server), client)
    }

    fn admission(max_handshakes: usize) -> (Arc<TlsAdmission>, Arc<rustls::ClientConfig>) {
        let (server, client) = configs();
        let limits = HandshakeLimits {
            max_handshakes,
            max_pending: 16,
            hello_timeout: HELLO,
            handshake_timeout: HANDSHAKE,
        };
        (TlsAdmission::new(limits, server), client)
    }

    async fn client_handshake(
        client: Arc<rustls::ClientConfig>,
        io: tokio::io::DuplexStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
        let name = crate::tls::server_name("localhost").unwrap();
        tokio_rustls::TlsConnector::from(client)
            .connect(name, io)
            .await
    }

    /// A complete ClientHello, as a client sends it: what a peer can
    /// capture once and replay at no cost.
    async fn client_hello(client: Arc<rustls::ClientConfig>) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move { client_handshake(client, a).await.map(drop) });
        let mut buf = vec![0; 64 * 1024];
        let n = b.read(&mut buf).await.unwrap();
        task.abort();
        buf.truncate(n);
        buf
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_cut_at_the_hello_deadline() {
        let (adm, _) = admission(1);
        let (server, _silent) = pipe();
        let t0 = Instant::now();
        let r = adm.handshake(server).await;
        assert_eq!(r.err(), Some(HandshakeError::HelloTimeout));
        assert_eq!(t0.elapsed(), HELLO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_a_second_peer_is_cut_at_the_hello_deadline_not_the_handshake_one() {
        use tokio::io::AsyncWriteExt;
        let (adm, client) = admission(1);
        let hello = client_hello(client).await;
        let (server, mut peer) = pipe();
        let trickle = tokio::spawn(async move {
            for b in hello {
                if peer.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let t0 = Instant::now();
        let r = adm.handshake(server).await;
        assert_eq!(r.err(), Some(HandshakeError::HelloTimeout));
        assert_eq!(t0.elapsed(), HELLO);
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn peers_that_stall_before_or_after_their_hello_hold_no_slot() {
        use tokio::io::AsyncWriteExt;
        // One slot only.
        let (adm, client) = admission(1);
        let hello = client_hello(client.clone()).await;
        // A peer that sent half a ClientHello, and one that replayed a whole
        // one and then went silent: both stay in their handshakes.
        let (half, mut half_peer) = pipe();
        half_peer
            .write_all(&hello[..hello.len() / 2])
            .await
            .unwrap();
        let (replayed, mut replay_peer) = pipe();
        replay_peer.write_all(&hello).await.unwrap();
        let a = adm.clone();
        let stalled_half = tokio::spawn(async move { a.handshake(half).await.err() });
        let a = adm.clone();
        let stalled_replay = tokio::spawn(async move { a.handshake(replayed).await.err() });
        // And one whose first record is too short to say how long its
        // ClientHello is: rustls gets it, asks for more, and the slot goes
        // back while it waits.
        let (short, mut short_peer) = pipe();
        short_peer
            .write_all(&[0x16, 3, 1, 0, 2, 1, 0])
            .await
            .unwrap();
        let a = adm.clone();
        let stalled_short = tokio::spawn(async move { a.handshake(short).await.err() });
        tokio::task::yield_now().await;
        // A real client now finishes at once, without a tick of time.
        let (server, peer) = pipe();
        let t0 = Instant::now();
        let (s, c) = tokio::join!(adm.handshake(server), client_handshake(client, peer));
        assert!(s.is_ok(), "{:?}", s.err());
        c.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!(
            adm.slots.available_permits(),
            1,
            "no slot held by the stalled"
        );
        // The stalled ones end at their deadlines.
        assert_eq!(
            stalled_half.await.unwrap(),
            Some(HandshakeError::HelloTimeout)
        );
        assert_eq!(stalled_replay.await.unwrap(), Some(HandshakeError::Timeout));
        assert_eq!(stalled_short.await.unwrap(), Some(HandshakeError::Timeout));
        drop((half_peer, replay_peer, short_peer));
    }

    #[tokio::test]
    async fn a_silent_sockets_handshake_stays_small() {
        // What a task waiting for a first record holds for its life: the
        // rest of the handshake (rustls's state, about 7 KB) is boxed.
        let (adm, _) = admission(1);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let f = adm.handshake(c);
        assert!(
            std::mem::size_of_val(&f) <= 512,
            "{} bytes",
            std::mem::size_of_val(&f)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_not_a_tls_record_fails_at_once_with_an_alert() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (adm, _) = admission(1);
        for bytes in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            // A handshake record claiming more than a record may hold.
            &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01][..],
        ] {
            let (server, mut peer) = pipe();
            peer.write_all(bytes).await.unwrap();
            let t0 = Instant::now();
            let r = adm.handshake(server).await;
            assert_eq!(r.err(), Some(HandshakeError::Failed), "{bytes:?}");
            assert_eq!(t0.elapsed(), Duration::ZERO);
            let mut alert = Vec::new();
            peer.read_to_end(&mut alert).await.unwrap();
            assert_eq!(alert.first(), Some(&0x15), "an alert record: {alert:?}");
        }
    }

    #[tokio::test]
    async fn the_first_record_is_read_whole_and_no_further() {
        use tokio::io::AsyncWriteExt;
        let (mut server, mut peer) = pipe();
        // A 3-byte handshake record, then the next record's first bytes.
        peer.write_all(&[0x16, 3, 1, 0, 3, 1, 2, 3, 0x16, 3])
            .await
            .unwrap();
        let mut buf = Vec::new();
        poll_fn(|cx| poll_client_hello(&mut server, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(buf, [0x16, 3, 1, 0, 3, 1, 2, 3]);
        // A peer that closes before its record is whole.
        drop(peer);
        let mut buf = Vec::new();
        let (mut server, mut peer) = pipe();
        peer.write_all(&[0x16, 3, 1, 0, 9, 1]).await.unwrap();
        drop(peer);
        let r = poll_fn(|cx| poll_client_hello(&mut server, cx, &mut buf)).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_set_aborts_its_oldest_task_to_make_room_and_forgets_ended_ones() {
        let set = HandshakeSet::new(2, SetMetrics::TLS);
        // Each task holds a sender until it is dropped (aborted or ended).
        let mut rx = Vec::new();
        for _ in 0..2 {
            let (tx, r) = tokio::sync::oneshot::channel::<()>();
            rx.push(r);
            set.spawn(async move {
                let _tx = tx;
                std::future::pending::<()>().await;
            });
        }
        assert_eq!(set.len(), 2);
        // A third one that ends at once: the oldest is aborted for it.
        set.spawn(async {});
        let first = rx.remove(0);
        assert!(first.await.is_err(), "the oldest task was dropped");
        tokio::time::timeout(Duration::from_secs(5), async {
            while set.len() > 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the ended task left the set");
        // The second is untouched.
        assert_eq!(set.len(), 1);
        assert_eq!(
            rx[0].try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        );
    }
}
