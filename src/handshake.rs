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
//! 2. **The ClientHello arriving.** The first TLS record is read into a
//!    buffer that grows only with the bytes that arrive (its header says
//!    how long it is), then handed to rustls's `Acceptor` (through
//!    `tokio_rustls::LazyConfigAcceptor`), which reads the rest of the
//!    ClientHello if it spans records, before any crypto. A peer that
//!    trickles bytes thus costs its bytes, not rustls's state. Phases 1 and
//!    2 together must end within `tls.hello_timeout` of accept, so a peer
//!    that trickles a byte a second is cut off after a few seconds.
//! 3. **The key exchange.** With a complete ClientHello the connection
//!    takes one of `tls.max_handshakes` slots, and rustls computes the key
//!    exchange and the signature and writes the gateway's flight. The slot
//!    is given back as soon as that flight is handed to the socket: the
//!    wait for the client's Finished costs no CPU, and a slot held over it
//!    would let a peer that replays one captured ClientHello and then stays
//!    silent hold a slot for the whole `tls.handshake_timeout`, which is the
//!    lockout this module exists to prevent. The whole handshake must end
//!    within `tls.handshake_timeout` of accept.
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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

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
        F: FnOnce(TlsStream<TcpStream>) + Send + 'static,
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
    ) -> Result<TlsStream<IO>, HandshakeError> {
        let start = Instant::now();
        let hello_by = start + self.hello_timeout;
        let done_by = start + self.handshake_timeout;
        // Phase 1: only the socket and this timer are held.
        match timeout_at(hello_by, poll_fn(|cx| io.poll_first_bytes(cx))).await {
            Err(_) => return Err(HandshakeError::HelloTimeout),
            Ok(Err(_)) => return Err(HandshakeError::Failed),
            Ok(Ok(())) => {}
        }
        // Phase 2: the first record in a buffer that grows only with what
        // arrives, so a byte-a-second peer costs its bytes, not rustls's
        // read buffer and connection state.
        let mut first = Vec::new();
        match timeout_at(
            hello_by,
            poll_fn(|cx| poll_first_record(&mut io, cx, &mut first)),
        )
        .await
        {
            Err(_) => return Err(HandshakeError::HelloTimeout),
            Ok(Err(_)) => return Err(HandshakeError::Failed),
            Ok(Ok(())) => {}
        }
        // The rest in a box of its own (rustls's state makes it about 7 KB):
        // a task keeps the size of its largest state for its life, and the
        // task of a peer that has not sent its first record must stay the
        // size of phases 1 and 2 (256 bytes).
        Box::pin(self.after_first_record(io, first, hello_by, done_by)).await
    }

    async fn after_first_record<IO: HelloIo>(
        &self,
        mut io: IO,
        first: Vec<u8>,
        hello_by: Instant,
        done_by: Instant,
    ) -> Result<TlsStream<IO>, HandshakeError> {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rest = &first[..];
        while !rest.is_empty() {
            // rustls takes at most its read size per call, and a whole
            // record always fits its buffer.
            if acceptor.read_tls(&mut rest).is_err() {
                return Err(HandshakeError::Failed);
            }
        }
        drop(first);
        let start = match acceptor.accept() {
            // Usually the whole ClientHello is in its first record.
            Ok(Some(accepted)) => StartHandshake::from_parts(accepted, io),
            // It spans records: rustls reads the rest.
            Ok(None) => {
                let acceptor = LazyConfigAcceptor::new(acceptor, io);
                match timeout_at(hello_by, acceptor).await {
                    Err(_) => return Err(HandshakeError::HelloTimeout),
                    Ok(Err(_)) => return Err(HandshakeError::Failed),
                    Ok(Ok(s)) => s,
                }
            }
            // Not a ClientHello rustls can take: its alert, best effort.
            Err((_, mut alert)) => {
                let _ = timeout_at(
                    hello_by,
                    poll_fn(|cx| {
                        let mut w = SyncWrite { io: &mut io, cx };
                        loop {
                            match alert.write(&mut w) {
                                Ok(0) => return Poll::Ready(()),
                                Ok(_) => {}
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                    return Poll::Pending
                                }
                                Err(_) => return Poll::Ready(()),
                            }
                        }
                    }),
                )
                .await;
                return Err(HandshakeError::Failed);
            }
        };
        // Phase 3: the key exchange under a slot.
        let permit = match timeout_at(done_by, self.slots.acquire()).await {
            Err(_) => return Err(HandshakeError::Timeout),
            Ok(Err(_)) => return Err(HandshakeError::Failed),
            Ok(Ok(p)) => p,
        };
        // rustls computes the key exchange and signs here, synchronously.
        let mut accept = start.into_stream(self.config.clone());
        // One poll writes the gateway's flight (a fresh socket's buffer
        // holds it) and finds the client's answer not there yet.
        let first = poll_fn(|cx| Poll::Ready(Pin::new(&mut accept).poll(cx))).await;
        drop(permit);
        let done = match first {
            Poll::Ready(r) => r,
            Poll::Pending => match timeout_at(done_by, accept).await {
                Err(_) => return Err(HandshakeError::Timeout),
                Ok(r) => r,
            },
        };
        done.map_err(|_| HandshakeError::Failed)
    }
}

/// The most a first record may hold before it is handed to rustls as it
/// is: a TLS plaintext record's limit (2^14) plus its 5-byte header.
const MAX_FIRST_RECORD: usize = 5 + (1 << 14);

/// Reads into `buf` until it holds the peer's first TLS record whole (the
/// record header says how long it is). Ready early with what is there when
/// the bytes cannot be a handshake record, or claim more than a record may
/// hold: rustls then refuses them with the right alert.
fn poll_first_record<IO: AsyncRead + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    buf: &mut Vec<u8>,
) -> Poll<io::Result<()>> {
    loop {
        if buf.first().is_some_and(|&t| t != 0x16) {
            return Poll::Ready(Ok(()));
        }
        if buf.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
            if 5 + len > MAX_FIRST_RECORD || buf.len() >= 5 + len {
                return Poll::Ready(Ok(()));
            }
        }
        let want = match buf.get(3..5) {
            Some(l) => 5 + usize::from(u16::from_be_bytes([l[0], l[1]])) - buf.len(),
            None => 5 - buf.len(),
        };
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

/// `std::io::Write` over an `AsyncWrite` inside a poll: `WouldBlock` when
/// the socket is full (the waker is registered).
struct SyncWrite<'a, 'b, IO> {
    io: &'a mut IO,
    cx: &'a mut Context<'b>,
}

impl<IO: AsyncWrite + Unpin> io::Write for SyncWrite<'_, '_, IO> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
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
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = ck.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
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
        drop((half_peer, replay_peer));
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
        poll_fn(|cx| poll_first_record(&mut server, cx, &mut buf))
            .await
            .unwrap();
        assert_eq!(buf, [0x16, 3, 1, 0, 3, 1, 2, 3]);
        // A peer that closes before its record is whole.
        drop(peer);
        let mut buf = Vec::new();
        let (mut server, mut peer) = pipe();
        peer.write_all(&[0x16, 3, 1, 0, 9, 1]).await.unwrap();
        drop(peer);
        let r = poll_fn(|cx| poll_first_record(&mut server, cx, &mut buf)).await;
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
