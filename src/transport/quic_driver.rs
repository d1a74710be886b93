//! The gateway's QUIC driver: quinn-proto's protocol state moved by one task
//! per UDP socket, with nothing per connection that an idle session does not
//! need (docs/ARCHITECTURE.md, "QUIC").
//!
//! quinn-proto is the protocol: packets, crypto, streams, loss recovery,
//! migration, Retry. It does no I/O and keeps no time; a driver feeds it
//! datagrams and timeouts and sends what it produces. quinn's own driver
//! gives every connection a task, an event channel from the endpoint (a
//! tokio unbounded channel, whose blocks hold 32 events: 6.6 KB from the
//! first datagram, 13.2 KB from the 33rd) and a transmit buffer; this one
//! keeps a connection as one allocation: quinn-proto's `Connection`, three
//! waker slots and its timer. Hand-written because that is the point: the
//! driver is what decides what an idle connection costs. An idle session
//! of the gateway measured 22.0 KB with this driver against 31.2 KB with
//! quinn's, 41.2 KB once it had had a few dozen datagrams
//! (docs/LOADTEST.md, "QUIC memory"; examples/quic_driver_memory.rs
//! compares the two drivers alone).
//!
//! What it costs: every received datagram, handshakes included, is
//! decrypted and processed on the endpoint's one task, so the receive side
//! of one `listen.quic` address uses one core at most (quinn's did the same
//! for the first flight of a handshake, under its endpoint lock, and spread
//! the rest over the connections' tasks). Sends, the bulk of a push's cost,
//! still run on the sessions' own tasks. Several `listen.quic` addresses
//! spread the receive side.
//!
//! - The **driver task** ([`Endpoint::run`]) owns the receive side of the
//!   socket, quinn-proto's `Endpoint`, the connections by handle, and the
//!   decision on each new client ([`Admission`]). A datagram goes from the
//!   endpoint straight to its connection, under that connection's lock.
//! - The **session task** reads and writes its streams under the same lock
//!   and sends what that produces itself, from a buffer per worker thread;
//!   a datagram the socket cannot take at once is kept on the connection and
//!   sent by the driver once the socket is writable, before anything else
//!   of that connection.
//! - **Timers**: one ordered set per endpoint, holding each connection's next
//!   deadline (at most one entry per connection); whoever changes a
//!   connection's deadline updates its entry, and wakes the driver when it
//!   moved ahead of the earliest.
//! - **Locks**: a connection's, then the timer set's or the stalled list's
//!   (leaves). The driver owns quinn-proto's `Endpoint` outright, so no lock
//!   is held around it, and endpoint events (new connection IDs, a drained
//!   connection) are handled by the driver only, the next time the
//!   connection has a datagram or a timer.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use quinn_proto::{
    ConnectionError, ConnectionHandle, DatagramEvent, Dir, Event, ServerConfig, StreamEvent,
    StreamId, Transmit, VarInt,
};
use tokio::io::{Interest, ReadBuf};
use tokio::sync::Notify;

use crate::metrics as m;

/// Batches of datagrams (`recvmmsg`, each up to `quinn_udp::BATCH_SIZE`)
/// read in one go before the driver looks at its timers and its wake-ups
/// again.
const RECV_BURST: usize = 4;

/// What the driver does with a client's first packet ([`Endpoint::run`]).
pub enum Admission {
    /// Start the handshake, and hand the connection to this.
    Accept(Box<dyn FnOnce(Connection) + Send>),
    /// Ask the client to prove its address first (a stateless Retry).
    Retry,
    /// Refuse it (`CONNECTION_REFUSED`), keeping no state.
    Refuse,
}

/// What the driver, the session tasks and the gateway share of one endpoint.
struct Shared {
    socket: tokio::net::UdpSocket,
    /// quinn-udp's view of the socket: GSO, GRO, ECN, the destination
    /// address of what is received.
    udp: quinn_udp::UdpSocketState,
    local: SocketAddr,
    /// Each connection's next deadline, by connection handle.
    timers: Mutex<BTreeSet<(Instant, usize)>>,
    /// Connections holding a datagram the socket could not take.
    stalled: Mutex<Vec<Arc<Inner>>>,
    /// Wakes the driver: an earlier deadline, a stalled datagram, a
    /// change of `accepting` or `closing`.
    wake: Notify,
    accepting: AtomicBool,
    /// Connections the driver holds (from accept until drained).
    open: AtomicUsize,
    /// The close every connection gets ([`Endpoint::close`]); once set, the
    /// driver ends when the last connection has finished closing.
    closing: Mutex<Option<(VarInt, Bytes)>>,
}

/// A QUIC endpoint on one UDP socket. Clones share it.
#[derive(Clone)]
pub struct Endpoint {
    shared: Arc<Shared>,
    /// The driver's half, until [`Endpoint::run`] takes it.
    driver: Arc<Mutex<Option<Driver>>>,
}

impl Endpoint {
    /// An endpoint on `socket` (bound, and set up by the caller). Must be
    /// called within a Tokio runtime.
    ///
    /// # Errors
    /// The socket cannot be registered with the runtime.
    pub fn new(
        config: quinn_proto::EndpointConfig,
        server: ServerConfig,
        socket: std::net::UdpSocket,
    ) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let udp = quinn_udp::UdpSocketState::new((&socket).into())?;
        let max_udp = config.get_max_udp_payload_size().min(64 * 1024) as usize;
        let shared = Arc::new(Shared {
            socket: tokio::net::UdpSocket::from_std(socket)?,
            udp,
            local,
            timers: Mutex::default(),
            stalled: Mutex::default(),
            wake: Notify::new(),
            accepting: AtomicBool::new(true),
            open: AtomicUsize::new(0),
            closing: Mutex::new(None),
        });
        let driver = Driver {
            shared: shared.clone(),
            endpoint: quinn_proto::Endpoint::new(
                Arc::new(config),
                Some(Arc::new(server)),
                false,
                None,
            ),
            conns: HashMap::new(),
            out: Vec::with_capacity(1500),
            max_udp,
            closed: false,
        };
        Ok(Self {
            shared,
            driver: Arc::new(Mutex::new(Some(driver))),
        })
    }

    /// The socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// Connections the endpoint holds: from accept until they have finished
    /// closing (or timed out), whether or not a session still holds them.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Relaxed)
    }

    /// Refuses new connections from now on; the ones there carry on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Relaxed);
        self.shared.wake.notify_one();
    }

    /// Closes every connection with `code` and `reason`, and refuses new
    /// ones; [`Endpoint::run`] returns once they have all finished closing.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.shared.accepting.store(false, Relaxed);
        *self.shared.closing.lock() = Some((code.into(), Bytes::copy_from_slice(reason)));
        self.shared.wake.notify_one();
    }

    /// The driver: reads the socket, runs timers, asks `admit` about each
    /// new client. Runs until [`Endpoint::close`] and its connections are
    /// gone; a second call returns at once.
    pub async fn run(&self, admit: impl FnMut(&quinn_proto::Incoming) -> Admission) {
        let Some(driver) = self.driver.lock().take() else {
            return;
        };
        driver.run(admit).await;
    }
}

/// The driver task's state.
struct Driver {
    shared: Arc<Shared>,
    endpoint: quinn_proto::Endpoint,
    conns: HashMap<usize, Arc<Inner>>,
    out: Vec<u8>,
    /// The largest datagram the endpoint takes.
    max_udp: usize,
    /// Whether [`Endpoint::close`] has been carried out.
    closed: bool,
}

impl Driver {
    async fn run(mut self, mut admit: impl FnMut(&quinn_proto::Incoming) -> Admission) {
        let shared = self.shared.clone();
        // One buffer per datagram of a batch, each room for a GRO train.
        let slot = self.max_udp * shared.udp.gro_segments().max(1);
        let mut buf = vec![0u8; slot * quinn_udp::BATCH_SIZE];
        loop {
            DRIVING.with(|d| d.set(true));
            self.timeouts();
            self.commands();
            if self.closed && self.conns.is_empty() {
                return;
            }
            let next = shared.timers.lock().first().map(|(t, _)| *t);
            let stalled = !shared.stalled.lock().is_empty();
            let sleep = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            // The task may move to another thread while it waits.
            DRIVING.with(|d| d.set(false));
            tokio::select! {
                r = shared.socket.readable() => {
                    if r.is_ok() {
                        DRIVING.with(|d| d.set(true));
                        self.receive(&mut buf, &mut admit);
                    }
                }
                () = sleep => {}
                () = shared.wake.notified() => {}
                r = shared.socket.writable(), if stalled => {
                    if r.is_ok() {
                        DRIVING.with(|d| d.set(true));
                        self.flush_stalled();
                    }
                }
            }
        }
    }

    /// Reads what the socket has, up to [`RECV_BURST`] batches.
    fn receive(
        &mut self,
        buf: &mut [u8],
        admit: &mut impl FnMut(&quinn_proto::Incoming) -> Admission,
    ) {
        let shared = self.shared.clone();
        let slot = buf.len() / quinn_udp::BATCH_SIZE;
        for _ in 0..RECV_BURST {
            let mut metas = [quinn_udp::RecvMeta::default(); quinn_udp::BATCH_SIZE];
            let got = {
                let mut chunks = buf.chunks_mut(slot);
                let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                    std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
                shared.socket.try_io(Interest::READABLE, || {
                    shared
                        .udp
                        .recv((&shared.socket).into(), &mut iovs, &mut metas)
                })
            };
            let n = match got {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // An ICMP error reported on the socket, for one peer:
                    // nothing to do for the others.
                    tracing::trace!(error = %e, "QUIC socket receive error");
                    continue;
                }
            };
            for (meta, chunk) in metas.iter().zip(buf.chunks(slot)).take(n) {
                let mut data = BytesMut::from(&chunk[..meta.len.min(chunk.len())]);
                while !data.is_empty() {
                    let one = data.split_to(meta.stride.clamp(1, data.len()));
                    let ecn = meta.ecn.map(proto_ecn);
                    self.datagram(meta.addr, meta.dst_ip, ecn, one, admit);
                }
            }
        }
    }

    fn datagram(
        &mut self,
        remote: SocketAddr,
        dst_ip: Option<IpAddr>,
        ecn: Option<quinn_proto::EcnCodepoint>,
        data: BytesMut,
        admit: &mut impl FnMut(&quinn_proto::Incoming) -> Admission,
    ) {
        let now = Instant::now();
        let local_ip =
            dst_ip.or_else(|| Some(self.shared.local.ip()).filter(|ip| !ip.is_unspecified()));
        self.out.clear();
        match self
            .endpoint
            .handle(now, remote, local_ip, ecn, data, &mut self.out)
        {
            Some(DatagramEvent::ConnectionEvent(h, ev)) => {
                if let Some(conn) = self.conns.get(&h.0).cloned() {
                    let mut st = conn.state.lock();
                    st.proto.handle_event(ev);
                    self.drive(&conn, st, now);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => self.incoming(incoming, now, admit),
            Some(DatagramEvent::Response(t)) => self.shared.send_or_drop(&self.out, &t),
            None => {}
        }
    }

    fn incoming(
        &mut self,
        incoming: quinn_proto::Incoming,
        now: Instant,
        admit: &mut impl FnMut(&quinn_proto::Incoming) -> Admission,
    ) {
        let decision = if self.shared.accepting.load(Relaxed) {
            admit(&incoming)
        } else {
            Admission::Refuse
        };
        self.out.clear();
        let transmit = match decision {
            Admission::Refuse => Some(self.endpoint.refuse(incoming, &mut self.out)),
            Admission::Retry => match self.endpoint.retry(incoming, &mut self.out) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.out.clear();
                    Some(self.endpoint.refuse(e.into_incoming(), &mut self.out))
                }
            },
            Admission::Accept(then) => {
                match self.endpoint.accept(incoming, now, &mut self.out, None) {
                    Ok((h, proto)) => {
                        let conn = Arc::new(Inner {
                            handle: h.0,
                            id: NEXT_ID.fetch_add(1, Relaxed),
                            shared: self.shared.clone(),
                            state: Mutex::new(State::new(proto)),
                        });
                        self.conns.insert(h.0, conn.clone());
                        self.shared.open.fetch_add(1, Relaxed);
                        let st = conn.state.lock();
                        self.drive(&conn, st, now);
                        then(Connection(conn));
                        None
                    }
                    Err(e) => {
                        tracing::debug!(error = %e.cause, "QUIC accept failed");
                        metrics::counter!(m::QUIC_HANDSHAKES, "result" => "failed").increment(1);
                        e.response
                    }
                }
            }
        };
        if let Some(t) = transmit {
            self.shared.send_or_drop(&self.out, &t);
        }
    }

    /// Runs every timer that is due.
    fn timeouts(&mut self) {
        let now = Instant::now();
        loop {
            let due = {
                let mut timers = self.shared.timers.lock();
                match timers.first() {
                    Some(&(t, h)) if t <= now => {
                        timers.pop_first();
                        (t, h)
                    }
                    _ => return,
                }
            };
            if let Some(conn) = self.conns.get(&due.1).cloned() {
                let mut st = conn.state.lock();
                // That entry is gone: the next rearm must not look for it
                // (unless the session moved the deadline since: then its
                // entry is a new one, and stays).
                if st.timer == Some(due.0) {
                    st.timer = None;
                }
                st.proto.handle_timeout(now);
                self.drive(&conn, st, now);
            }
        }
    }

    /// Carries out [`Endpoint::close`], once.
    fn commands(&mut self) {
        if self.closed {
            return;
        }
        let Some((code, reason)) = self.shared.closing.lock().clone() else {
            return;
        };
        self.closed = true;
        let now = Instant::now();
        for conn in self.conns.values().cloned().collect::<Vec<_>>() {
            let mut st = conn.state.lock();
            st.proto.close(now, code, reason.clone());
            self.drive(&conn, st, now);
        }
    }

    fn flush_stalled(&mut self) {
        let stalled = std::mem::take(&mut *self.shared.stalled.lock());
        let now = Instant::now();
        for conn in stalled {
            let mut st = conn.state.lock();
            st.queued = false;
            if let Some(s) = st.stalled.take() {
                let t = quinn_udp::Transmit {
                    destination: s.to,
                    ecn: s.ecn,
                    contents: &s.data,
                    segment_size: s.segment_size,
                    src_ip: s.src_ip,
                };
                match self.shared.send(&t) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        st.stalled = Some(s);
                        conn.queue_stalled(&mut st);
                        continue;
                    }
                    _ => {}
                }
            }
            let wake = conn.after(&mut st, now);
            drop(st);
            wake.run();
        }
    }

    /// After input: the connection's endpoint events (the driver's alone),
    /// its events, datagrams and timer; and its end, once drained.
    fn drive(
        &mut self,
        conn: &Arc<Inner>,
        mut st: parking_lot::MutexGuard<'_, State>,
        now: Instant,
    ) {
        let h = ConnectionHandle(conn.handle);
        let mut wake = Wakers::default();
        loop {
            let mut back = false;
            while let Some(ev) = st.proto.poll_endpoint_events() {
                if let Some(reply) = self.endpoint.handle_event(h, ev) {
                    st.proto.handle_event(reply);
                    back = true;
                }
            }
            wake.join(conn.after(&mut st, now));
            if !back {
                break;
            }
        }
        if st.proto.is_drained() {
            // quinn-proto has freed the handle (its Drained endpoint event
            // went above); it may be reused by the next connection.
            while let Some(ev) = st.proto.poll_endpoint_events() {
                let _ = self.endpoint.handle_event(h, ev);
            }
            if let Some(t) = st.timer.take() {
                self.shared.timers.lock().remove(&(t, conn.handle));
            }
            st.gone = true;
            st.stalled = None;
            wake.all(&mut st);
            if self.conns.remove(&conn.handle).is_some() {
                self.shared.open.fetch_sub(1, Relaxed);
            }
        }
        drop(st);
        wake.run();
    }
}

/// Stable connection ids (quinn-proto's handles are reused).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The datagram being built, per thread: connections do not keep one.
    static OUT: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1500));
    /// Set while a driver runs on this thread: it looks at the timer set
    /// after every step, so a deadline it moved needs no wake-up.
    static DRIVING: Cell<bool> = const { Cell::new(false) };
}

/// One connection: quinn-proto's state, behind one lock.
struct Inner {
    handle: usize,
    id: u64,
    shared: Arc<Shared>,
    state: Mutex<State>,
}

struct State {
    proto: quinn_proto::Connection,
    /// This connection's entry in the timer set.
    timer: Option<Instant>,
    /// The task reading the client's stream.
    reader: Option<Waker>,
    /// The task writing the connection's streams.
    writer: Option<Waker>,
    /// The task waiting for the client's stream or for the handshake's end.
    waiter: Option<Waker>,
    /// The handshake completed.
    confirmed: bool,
    /// Why the connection ended, once it did.
    lost: Option<ConnectionError>,
    /// Drained and removed from the endpoint.
    gone: bool,
    /// A datagram the socket could not take, to go before any other.
    stalled: Option<Box<Stalled>>,
    /// In the endpoint's stalled list.
    queued: bool,
}

struct Stalled {
    data: Vec<u8>,
    to: SocketAddr,
    ecn: Option<quinn_udp::EcnCodepoint>,
    segment_size: Option<usize>,
    src_ip: Option<IpAddr>,
}

impl State {
    fn new(proto: quinn_proto::Connection) -> Self {
        Self {
            proto,
            timer: None,
            reader: None,
            writer: None,
            waiter: None,
            confirmed: false,
            lost: None,
            gone: false,
            stalled: None,
            queued: false,
        }
    }

    /// The error a read or write gets once the connection has ended.
    fn ended(&self) -> Option<io::Error> {
        if let Some(e) = &self.lost {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                e.to_string(),
            ));
        }
        self.gone
            .then(|| io::Error::new(io::ErrorKind::NotConnected, "QUIC connection closed"))
    }
}

/// Wakers taken under a connection's lock, woken after it is released.
#[derive(Default)]
struct Wakers([Option<Waker>; 3]);

impl Wakers {
    fn join(&mut self, other: Wakers) {
        for (mine, theirs) in self.0.iter_mut().zip(other.0) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }

    fn all(&mut self, st: &mut State) {
        self.0[0] = st.reader.take().or(self.0[0].take());
        self.0[1] = st.writer.take().or(self.0[1].take());
        self.0[2] = st.waiter.take().or(self.0[2].take());
    }

    fn run(self) {
        for w in self.0.into_iter().flatten() {
            w.wake();
        }
    }
}

impl Inner {
    /// After anything that may have changed the connection: its events
    /// (waking whoever waits for them), its datagrams, its timer.
    fn after(self: &Arc<Self>, st: &mut State, now: Instant) -> Wakers {
        let mut wake = Wakers::default();
        while let Some(ev) = st.proto.poll() {
            match ev {
                Event::Connected => {
                    st.confirmed = true;
                    wake.0[2] = st.waiter.take();
                }
                Event::ConnectionLost { reason } => {
                    st.lost = Some(reason);
                    wake.all(st);
                }
                Event::Stream(StreamEvent::Opened { .. }) => wake.0[2] = st.waiter.take(),
                Event::Stream(StreamEvent::Readable { .. }) => wake.0[0] = st.reader.take(),
                Event::Stream(StreamEvent::Writable { .. } | StreamEvent::Stopped { .. }) => {
                    wake.0[1] = st.writer.take();
                }
                _ => {}
            }
        }
        self.transmit(st, now);
        self.rearm(st);
        wake
    }

    /// Sends what the connection has to send, until it has nothing or the
    /// socket is full (then the datagrams wait on the connection). Several
    /// datagrams to the same address go in one system call where the
    /// kernel can split them (GSO).
    fn transmit(self: &Arc<Self>, st: &mut State, now: Instant) {
        if st.gone || st.stalled.is_some() {
            return;
        }
        let batch = self.shared.udp.max_gso_segments().clamp(1, MAX_GSO);
        OUT.with(|out| {
            let mut out = out.borrow_mut();
            loop {
                out.clear();
                let Some(t) = st.proto.poll_transmit(now, batch, &mut out) else {
                    return;
                };
                let tx = udp_transmit(&t, &out[..t.size]);
                match self.shared.send(&tx) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        st.stalled = Some(Box::new(Stalled {
                            data: tx.contents.to_vec(),
                            to: tx.destination,
                            ecn: tx.ecn,
                            segment_size: tx.segment_size,
                            src_ip: tx.src_ip,
                        }));
                        self.queue_stalled(st);
                        return;
                    }
                    // Lost, as on the network: QUIC resends what mattered
                    // (quinn-udp has logged it).
                    Err(_) => {}
                }
            }
        });
    }

    /// Puts this connection in the endpoint's stalled list (the caller holds
    /// its lock and has set `stalled`).
    fn queue_stalled(self: &Arc<Self>, st: &mut State) {
        if st.queued {
            return;
        }
        st.queued = true;
        self.shared.stalled.lock().push(self.clone());
        self.shared.wake.notify_one();
    }

    /// Moves this connection's entry in the timer set to its next deadline.
    fn rearm(&self, st: &mut State) {
        let next = if st.gone {
            None
        } else {
            // A drained connection has no timer, but the driver must see it
            // once, to give quinn-proto's endpoint its Drained event and
            // let go of it: due at once.
            st.proto
                .poll_timeout()
                .or_else(|| st.proto.is_drained().then(Instant::now))
        };
        if next == st.timer {
            return;
        }
        let mut timers = self.shared.timers.lock();
        if let Some(old) = st.timer {
            timers.remove(&(old, self.handle));
        }
        let mut earliest = false;
        if let Some(t) = next {
            earliest = timers.first().is_none_or(|&(first, _)| t < first);
            timers.insert((t, self.handle));
        }
        drop(timers);
        st.timer = next;
        if earliest && !DRIVING.with(Cell::get) {
            self.shared.wake.notify_one();
        }
    }
}

impl Shared {
    /// Sends one transmit (one datagram, or several of one size to one
    /// address with GSO). `WouldBlock` when the socket is full; other errors
    /// are the network's (quinn-udp logs them) and count as sent.
    fn send(&self, t: &quinn_udp::Transmit<'_>) -> io::Result<()> {
        self.socket.try_io(Interest::WRITABLE, || {
            self.udp.send((&self.socket).into(), t)
        })
    }

    /// Sends a datagram the endpoint produced (a Retry, a refusal, a
    /// stateless reset); if the socket is full it is dropped, as the
    /// network may.
    fn send_or_drop(&self, out: &[u8], t: &Transmit) {
        if let Err(e) = self.send(&udp_transmit(t, &out[..t.size])) {
            tracing::trace!(error = %e, to = %t.destination, "QUIC endpoint datagram not sent");
        }
    }
}

/// Datagrams sent in one system call at most (GSO): what quinn sends too.
const MAX_GSO: usize = 10;

fn udp_transmit<'a>(t: &Transmit, contents: &'a [u8]) -> quinn_udp::Transmit<'a> {
    quinn_udp::Transmit {
        destination: t.destination,
        ecn: t.ecn.map(|e| match e {
            quinn_proto::EcnCodepoint::Ect0 => quinn_udp::EcnCodepoint::Ect0,
            quinn_proto::EcnCodepoint::Ect1 => quinn_udp::EcnCodepoint::Ect1,
            quinn_proto::EcnCodepoint::Ce => quinn_udp::EcnCodepoint::Ce,
        }),
        contents,
        segment_size: t.segment_size,
        src_ip: t.src_ip,
    }
}

fn proto_ecn(e: quinn_udp::EcnCodepoint) -> quinn_proto::EcnCodepoint {
    match e {
        quinn_udp::EcnCodepoint::Ect0 => quinn_proto::EcnCodepoint::Ect0,
        quinn_udp::EcnCodepoint::Ect1 => quinn_proto::EcnCodepoint::Ect1,
        quinn_udp::EcnCodepoint::Ce => quinn_proto::EcnCodepoint::Ce,
    }
}

/// One QUIC connection, for its session: closed when dropped.
pub struct Connection(Arc<Inner>);

/// A reference to a connection that does not keep it open: what presence
/// reads a session's live address from.
#[derive(Clone)]
pub struct ConnRef(Arc<Inner>);

impl ConnRef {
    /// The client's address now (it changes when the client migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.0.state.lock().proto.remote_address()
    }

    /// A number no other connection of this process has.
    pub fn stable_id(&self) -> u64 {
        self.0.id
    }
}

impl Connection {
    /// A reference that does not keep the connection open.
    pub fn reference(&self) -> ConnRef {
        ConnRef(self.0.clone())
    }

    /// The client's address now (it changes when the client migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.0.state.lock().proto.remote_address()
    }

    /// The local address the client reached, when the socket knows it.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.0.state.lock().proto.local_ip()
    }

    /// A number no other connection of this process has.
    pub fn stable_id(&self) -> u64 {
        self.0.id
    }

    /// Whether the client's 0-RTT data was accepted.
    pub fn accepted_0rtt(&self) -> bool {
        self.0.state.lock().proto.accepted_0rtt()
    }

    /// Runs `f` on the connection's state and then what follows any change
    /// (events, datagrams, timer); refuses once the connection has ended.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.0.state.lock();
        let out = f(&mut st);
        let wake = self.0.after(&mut st, Instant::now());
        drop(st);
        wake.run();
        out
    }

    /// The client's bidirectional stream, once it has opened it.
    ///
    /// # Errors
    /// The connection ended first.
    pub async fn accept_bi(&self) -> io::Result<StreamId> {
        poll_fn(|cx| {
            self.with(|st| {
                if let Some(id) = st.proto.streams().accept(Dir::Bi) {
                    return Poll::Ready(Ok(id));
                }
                if let Some(e) = st.ended() {
                    return Poll::Ready(Err(e));
                }
                st.waiter = Some(cx.waker().clone());
                Poll::Pending
            })
        })
        .await
    }

    /// Opens a unidirectional stream: `None` when the client allows none.
    ///
    /// # Errors
    /// The connection has ended.
    pub fn open_uni(&self) -> io::Result<Option<StreamId>> {
        self.with(|st| match st.ended() {
            Some(e) => Err(e),
            None => Ok(st.proto.streams().open(Dir::Uni)),
        })
    }

    /// Ready once the handshake is complete (or the connection has ended).
    pub fn poll_confirmed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.0.state.lock();
        if st.confirmed || st.lost.is_some() || st.gone {
            return Poll::Ready(());
        }
        st.waiter = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Reads what has arrived on stream `id`; nothing read at its end.
    pub fn poll_read(
        &self,
        id: StreamId,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|st| {
            if st.gone {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            }
            let mut stream = st.proto.recv_stream(id);
            let mut chunks = match stream.read(true) {
                Ok(c) => c,
                // Read to its end and freed: its end again.
                Err(quinn_proto::ReadableError::ClosedStream) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(io::Error::other(e.to_string()))),
            };
            let start = buf.filled().len();
            let mut end = None;
            while buf.remaining() > 0 {
                match chunks.next(buf.remaining()) {
                    Ok(Some(chunk)) => buf.put_slice(&chunk.bytes),
                    Ok(None) => {
                        end = Some(Ok(()));
                        break;
                    }
                    Err(quinn_proto::ReadError::Blocked) => break,
                    Err(quinn_proto::ReadError::Reset(code)) => {
                        end = Some(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("stream reset by the client, code {code}"),
                        )));
                        break;
                    }
                }
            }
            // Flow-control credit goes out with the next transmit (`with`).
            let _ = chunks.finalize();
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            if let Some(r) = end {
                return Poll::Ready(r);
            }
            if let Some(e) = st.ended() {
                return Poll::Ready(Err(e));
            }
            st.reader = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// Reads into `buf` what has arrived on stream `id`: 0 at its end.
    ///
    /// # Errors
    /// The stream was reset or the connection ended.
    pub async fn read(&self, id: StreamId, buf: &mut [u8]) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut *buf);
            self.poll_read(id, cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        })
        .await
    }

    /// Writes all of `data` to stream `id`.
    ///
    /// # Errors
    /// The stream was stopped or the connection ended.
    pub async fn write_all(&self, id: StreamId, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = poll_fn(|cx| self.poll_write(id, cx, data)).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes what stream `id` takes of `data`: at least one byte, or
    /// pending until flow control allows more.
    pub fn poll_write(
        &self,
        id: StreamId,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|st| {
            if let Some(e) = st.ended() {
                return Poll::Ready(Err(e));
            }
            match st.proto.send_stream(id).write(data) {
                Ok(n) => Poll::Ready(Ok(n)),
                Err(quinn_proto::WriteError::Blocked) => {
                    st.writer = Some(cx.waker().clone());
                    Poll::Pending
                }
                Err(quinn_proto::WriteError::Stopped(code)) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    format!("stream stopped by the client, code {code}"),
                ))),
                Err(quinn_proto::WriteError::ClosedStream) => {
                    Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
                }
            }
        })
    }

    /// Ends stream `id` after what was written (FIN).
    pub fn finish(&self, id: StreamId) {
        self.with(|st| {
            if !st.gone {
                let _ = st.proto.send_stream(id).finish();
            }
        });
    }

    /// Stream `id`'s send priority: higher goes first.
    pub fn set_priority(&self, id: StreamId, priority: i32) {
        self.with(|st| {
            if !st.gone {
                let _ = st.proto.send_stream(id).set_priority(priority);
            }
        });
    }

    /// Closes the connection with an application `code` and `reason`.
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.with(|st| {
            if !st.gone && st.lost.is_none() {
                st.proto
                    .close(Instant::now(), code.into(), Bytes::copy_from_slice(reason));
            }
        });
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close(0, b"");
    }
}
