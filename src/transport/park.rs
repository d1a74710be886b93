//! Parking: an idle TCP, TLS or WebSocket connection without a task or a
//! reactor entry.
//!
//! Half of an idle connection's heap is tokio's: the task cell and the
//! socket's registration with the I/O driver, 256 bytes each (both are
//! 128-byte aligned). A connection that has been quiet for
//! `listen.park_after` (logged in, nothing partly read, nothing waiting to
//! be written, nothing unacknowledged, no close asked) hands its socket and
//! its [`Link`] to the [`Parker`] and ends its task. The parker keeps the
//! pair in a box (about 128 bytes), in a table indexed by descriptor, and
//! watches the socket through an epoll set of its own (mio), registered
//! once with tokio. Two things unpark a connection, by spawning a fresh
//! driver around the saved pair:
//!
//! - its socket becomes readable with more than an answer can settle (a
//!   partial frame, a hang-up, a request whose answer cannot be written at
//!   once); what only needs an answer (a heartbeat, mostly) is answered in
//!   place, and the connection stays parked (see [`InPlace`]);
//! - its session is woken: a push, a close request (a kick, a drain, a
//!   takeover by a resume) or the timer wheel (the idle timeout, the
//!   token's expiry). While parked the session's waker is a parked waker
//!   ([`park_waker`]), which queues the connection for the parker's task.
//!
//! The link's deadlines stay in the shared wheel, so a parked connection
//! still times out on schedule: the wheel wakes it, it unparks and closes.
//! Everything else (the session, its registry entries, its rooms) is where
//! it was; a parked connection differs from a running one only in who
//! polls its socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Registry, Token};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::metrics as m;

use super::conn::Connection;
use super::link::{Link, Outputs};
use super::tls::TlsStream;
use super::ws::WsStream;
use super::Wire;
use crate::ids::TransportKind;

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Parks idle TCP and TLS connections of one gateway. Does nothing until
/// [`Parker::start`] (the server starts it with its TCP listeners).
#[derive(Default)]
pub struct Parker {
    shared: OnceLock<Arc<Shared>>,
}

struct Shared {
    /// Registers parked sockets with the parker's epoll set.
    registry: Registry,
    /// Parked connections by descriptor (descriptors are small and dense:
    /// 8 bytes a slot, and no hashing).
    slots: Mutex<Vec<Option<Box<Parked>>>>,
    /// Parked connections whose session was woken, by descriptor. A stale
    /// wake-up (for a descriptor that has been reused since) finds nothing
    /// due and leaves its connection parked ([`Link::stay_parked`]).
    wakes: Mutex<Vec<RawFd>>,
    /// This parker's index in [`PARKERS`].
    id: u32,
    notify: Notify,
    /// Connections parked now, and parks so far.
    count: AtomicUsize,
    parks: AtomicU64,
    /// Reads answered in place, after which the connection stayed parked.
    answers: AtomicU64,
    /// Cleared if the epoll set fails: nothing parks any more.
    alive: AtomicBool,
}

struct Parked {
    socket: std::net::TcpStream,
    link: Link,
    /// A TLS connection's keys (its buffers are empty: only a quiet
    /// connection parks). A WebSocket connection keeps nothing of its
    /// wire: it parks only quiet, and its link's kind says to make its
    /// [`WsStream`] anew when it unparks.
    tls: Option<Box<TlsStream<()>>>,
}

/// Whether a link's connection runs WebSocket over its socket (or over
/// TLS over it).
fn is_ws(link: &Link) -> bool {
    matches!(link.kind(), TransportKind::Ws | TransportKind::Wss)
}

/// A WebSocket wire made anew over `io` for a connection that was quiet
/// when it parked.
fn ws_over<S>(io: S, link: &Link) -> WsStream<S> {
    let max = u32::try_from(link.node().params().max_frame).unwrap_or(u32::MAX);
    WsStream::new(io, Vec::new(), max)
}

/// A wire whose connection can park: a plain-TCP socket, or TLS over one.
pub trait Parkable: Wire + Sized + Send + 'static {
    fn raw_fd(&self) -> RawFd;

    /// Whether the wire holds nothing that parking would lose (TLS: no
    /// partial record, no unread plaintext, nothing unwritten).
    fn quiet(&self) -> bool;

    /// The socket out of the reactor, and a TLS connection's keys.
    fn into_parked(self) -> io::Result<(std::net::TcpStream, Option<Box<TlsStream<()>>>)>;
}

impl Parkable for TcpStream {
    fn raw_fd(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn quiet(&self) -> bool {
        true
    }

    fn into_parked(self) -> io::Result<(std::net::TcpStream, Option<Box<TlsStream<()>>>)> {
        Ok((self.into_std()?, None))
    }
}

impl Parkable for TlsStream<TcpStream> {
    fn raw_fd(&self) -> RawFd {
        self.io().as_raw_fd()
    }

    fn quiet(&self) -> bool {
        self.is_quiet()
    }

    fn into_parked(self) -> io::Result<(std::net::TcpStream, Option<Box<TlsStream<()>>>)> {
        let (socket, mut keys) = self.split();
        keys.shed();
        Ok((socket.into_std()?, Some(Box::new(keys))))
    }
}

/// WebSocket over either: parks as what it runs over, keeping nothing of
/// its own (it is quiet).
impl<S: Parkable> Parkable for WsStream<S> {
    fn raw_fd(&self) -> RawFd {
        self.io().raw_fd()
    }

    fn quiet(&self) -> bool {
        self.is_quiet() && self.io().quiet()
    }

    fn into_parked(self) -> io::Result<(std::net::TcpStream, Option<Box<TlsStream<()>>>)> {
        self.split().0.into_parked()
    }
}

/// Every parker of the process, by id (one per gateway; never removed, a
/// dead one is a dead `Weak`). A parked waker names its parker by index, so
/// that it needs no allocation of its own.
static PARKERS: parking_lot::RwLock<Vec<Weak<Shared>>> = parking_lot::const_rwlock(Vec::new());

/// The waker a parked session holds: its data is the parker's id and the
/// descriptor, packed into the pointer-sized word, so it costs nothing per
/// connection (an `Arc` of its own would be 48 bytes). Waking it queues the
/// descriptor for the parker's task.
fn park_waker(parker: u32, fd: RawFd) -> Waker {
    let word = (u64::from(parker) << 32 | u64::from(fd as u32)) as usize;
    // SAFETY: the vtable's functions never dereference the data: it is a
    // plain integer, valid to copy, share between threads and forget.
    unsafe { Waker::from_raw(RawWaker::new(word as *const (), &PARK_WAKER)) }
}

static PARK_WAKER: RawWakerVTable = RawWakerVTable::new(
    park_waker_clone,
    park_waker_wake,
    park_waker_wake,
    park_waker_drop,
);

fn park_waker_clone(word: *const ()) -> RawWaker {
    RawWaker::new(word, &PARK_WAKER)
}

fn park_waker_wake(word: *const ()) {
    let word = word as usize as u64;
    let (id, fd) = ((word >> 32) as usize, word as u32 as RawFd);
    // Called under the session's lock: only the parker list (read) and the
    // wake queue (a leaf lock) are touched here, never the slots.
    let parker = PARKERS.read().get(id).and_then(Weak::upgrade);
    if let Some(p) = parker {
        p.wakes.lock().push(fd);
        p.notify.notify_one();
    }
}

fn park_waker_drop(_: *const ()) {}

impl Parker {
    /// Starts the parker's task on the current runtime. Parking stays off
    /// (and connections keep their tasks) if the epoll set cannot be made.
    pub fn start(&self) {
        if self.shared.get().is_some() {
            return;
        }
        let poll = match mio::Poll::new() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "parking is off: no epoll set");
                return;
            }
        };
        let registry = match poll.registry().try_clone() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "parking is off: no epoll registry");
                return;
            }
        };
        // SAFETY: the AsyncFd owns the `mio::Poll`, whose descriptor stays
        // open, and the same, until the AsyncFd is dropped.
        let afd =
            match unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) } {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "parking is off: the epoll set cannot be watched");
                    return;
                }
            };
        let mut parkers = PARKERS.write();
        let Ok(id) = u32::try_from(parkers.len()) else {
            tracing::warn!("parking is off: too many parkers in this process");
            return;
        };
        let shared = Arc::new(Shared {
            registry,
            slots: Mutex::new(Vec::new()),
            wakes: Mutex::new(Vec::new()),
            id,
            notify: Notify::new(),
            count: AtomicUsize::new(0),
            parks: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        if self.shared.set(shared.clone()).is_err() {
            return;
        }
        parkers.push(Arc::downgrade(&shared));
        drop(parkers);
        tokio::spawn(run(shared, afd));
    }

    /// Whether the parker runs (connections may park).
    pub fn is_running(&self) -> bool {
        self.shared
            .get()
            .is_some_and(|s| s.alive.load(Ordering::Relaxed))
    }

    /// Connections parked now.
    pub fn parked(&self) -> usize {
        self.shared
            .get()
            .map_or(0, |s| s.count.load(Ordering::Relaxed))
    }

    /// Times a connection was parked so far.
    pub fn parks(&self) -> u64 {
        self.shared
            .get()
            .map_or(0, |s| s.parks.load(Ordering::Relaxed))
    }

    /// Reads of parked connections answered in place so far.
    pub fn answers(&self) -> u64 {
        self.shared
            .get()
            .map_or(0, |s| s.answers.load(Ordering::Relaxed))
    }

    /// Parks the connection in `slot` if its session agrees (nothing arrived
    /// since its poll began): takes it out of `slot` and returns true; the
    /// caller's task then ends. False leaves it where it was.
    pub(crate) fn park<W: Parkable>(&self, slot: &mut Option<Connection<W>>) -> bool {
        let Some(shared) = self.shared.get() else {
            return false;
        };
        if !shared.alive.load(Ordering::Relaxed) {
            return false;
        }
        let Some(conn) = slot.as_ref() else {
            return false;
        };
        if !conn.wire().quiet() {
            return false;
        }
        let fd = conn.wire().raw_fd();
        let Ok(idx) = usize::try_from(fd) else {
            return false;
        };
        let waker = park_waker(shared.id, fd);
        // The slots lock is held from the session's consent to the
        // registration: a wake-up queued meanwhile is handled after it, and
        // finds the connection parked.
        let mut slots = shared.slots.lock();
        if !conn.link().try_park(waker) {
            return false;
        }
        let Some(conn) = slot.take() else {
            return false;
        };
        let (wire, link) = conn.into_parts();
        let (socket, tls) = match wire.into_parked() {
            Ok(s) => s,
            Err(e) => {
                // The socket is gone with its registration: the session
                // ends as for a lost connection (kept for a resume).
                tracing::debug!(error = %e, "parking failed: the socket left the reactor in error");
                drop(slots);
                link.lost();
                return true;
            }
        };
        if let Err(e) = shared
            .registry
            .register(&mut SourceFd(&fd), Token(idx), Interest::READABLE)
        {
            tracing::debug!(error = %e, "parking failed: epoll refused the socket");
            drop(slots);
            respawn(socket, tls, link);
            return true;
        }
        if slots.len() <= idx {
            slots.resize_with((idx + 1).next_power_of_two(), || None);
        }
        slots[idx] = Some(Box::new(Parked { socket, link, tls }));
        // Counted under the lock, before an unpark can count it out.
        shared.count.fetch_add(1, Ordering::Relaxed);
        shared.parks.fetch_add(1, Ordering::Relaxed);
        m::hot().parked.increment(1.0);
        m::hot().parks.increment(1);
        drop(slots);
        true
    }
}

/// The parker's task: unparks connections whose socket is readable or
/// whose session was woken. When it ends (the runtime shuts down), the
/// connections still parked are dropped, which ends their sessions as a
/// running connection's task would be.
async fn run(shared: Arc<Shared>, mut afd: AsyncFd<mio::Poll>) {
    struct DropParked(Arc<Shared>);
    impl Drop for DropParked {
        fn drop(&mut self) {
            let parked: Vec<_> = self.0.slots.lock().drain(..).flatten().collect();
            drop(parked);
        }
    }
    let _guard = DropParked(shared.clone());
    let mut events = Events::with_capacity(EVENTS);
    let mut ready = Vec::with_capacity(EVENTS);
    'run: loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let Ok(mut guard) = guard else {
                    tracing::error!("the parker's epoll set failed; parked connections unpark now");
                    break 'run;
                };
                loop {
                    match guard.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            tracing::error!(error = %e, "epoll_wait failed in the parker; parked connections unpark now");
                            break 'run;
                        }
                    }
                    ready.clear();
                    ready.extend(events.iter().filter_map(|e| RawFd::try_from(e.token().0).ok()));
                    for &fd in &ready {
                        unpark(&shared, fd, false);
                    }
                    if ready.len() < EVENTS {
                        break;
                    }
                    // A full batch (each read answered in place is a read
                    // and a write): let the worker's other tasks run.
                    tokio::task::yield_now().await;
                }
                guard.clear_ready();
            }
            () = shared.notify.notified() => {
                let woken = std::mem::take(&mut *shared.wakes.lock());
                for fd in woken {
                    unpark(&shared, fd, true);
                }
            }
        }
    }
    // Only after a failure of the epoll set: hand every parked connection
    // back to a task of its own, and park no more.
    shared.alive.store(false, Ordering::Relaxed);
    let parked: Vec<_> = shared.slots.lock().drain(..).flatten().collect();
    for p in parked {
        hand_back(&shared, *p);
    }
}

/// Gives the connection parked on `fd` a task again: for a readable socket,
/// unless one poll in place settles what came (see [`answer_in_place`]); for
/// a wake-up of its session (`woken`), only if something is due (see
/// [`Link::stay_parked`]).
fn unpark(shared: &Shared, fd: RawFd, woken: bool) {
    let Ok(idx) = usize::try_from(fd) else {
        return;
    };
    let parked = {
        let mut slots = shared.slots.lock();
        let Some(slot) = slots.get_mut(idx) else {
            return;
        };
        if woken {
            let Some(p) = slot.as_mut() else {
                return;
            };
            let now = p.link.now();
            if p.link.stay_parked(now, park_waker(shared.id, fd)) {
                return;
            }
        }
        slot.take()
    };
    let Some(p) = parked else {
        return;
    };
    if woken {
        hand_back(shared, *p);
        return;
    }
    match answer_in_place(shared, fd, idx, *p) {
        InPlaceEnd::Stayed | InPlaceEnd::HandedBack => {}
        InPlaceEnd::Run(p) => hand_back(shared, *p),
        InPlaceEnd::Ended => {
            shared.count.fetch_sub(1, Ordering::Relaxed);
            m::hot().parked.decrement(1.0);
        }
    }
}

/// What one poll in place left.
enum InPlaceEnd {
    /// Answered; parked again in its slot.
    Stayed,
    /// It needs a task (the box is out of its slot, still in the epoll set).
    Run(Box<Parked>),
    /// It finished (its link ended the session as a task's would), and its
    /// socket left the epoll set and closed.
    Ended,
    /// Bytes were in flight in its wire: it left the epoll set and the
    /// count, and has a task again.
    HandedBack,
}

/// Drives a parked connection whose socket turned readable for one poll
/// where it is, with its parked waker: most such reads are a heartbeat,
/// which the link answers with a `Pong` written at once, and the connection
/// then stays parked, sparing a task, a reactor registration and four
/// `epoll_ctl` calls. It stays only if the read met `EAGAIN` (the
/// edge-triggered epoll set reports the next bytes), the link holds
/// nothing partly read or unwritten and no deadline is due, and the
/// session still has nothing waiting and no wake-up taken since the poll
/// began (checked under its lock and the table's, as when parking).
fn answer_in_place(shared: &Shared, fd: RawFd, idx: usize, p: Parked) -> InPlaceEnd {
    match (p.tls.is_some(), is_ws(&p.link)) {
        (false, false) => in_place::<InPlace>(shared, fd, idx, p),
        (true, false) => in_place::<TlsStream<InPlace>>(shared, fd, idx, p),
        (false, true) => in_place::<WsStream<InPlace>>(shared, fd, idx, p),
        (true, true) => in_place::<WsStream<TlsStream<InPlace>>>(shared, fd, idx, p),
    }
}

/// [`answer_in_place`] over the wire stack `S` the parked connection runs.
fn in_place<S: InPlaceStack>(shared: &Shared, fd: RawFd, idx: usize, p: Parked) -> InPlaceEnd {
    let Parked { socket, link, tls } = p;
    let waker = park_waker(shared.id, fd);
    let wire = S::build(
        InPlace {
            socket,
            drained: false,
        },
        tls,
        &link,
    );
    let Some((w, link)) = poll_in_place(shared, fd, Connection::from_parts(wire, link), &waker)
    else {
        return InPlaceEnd::Ended;
    };
    if !w.quiet() {
        // Bytes in flight in the wire (a TLS record or a WebSocket frame
        // partly in): a task gets the wire whole, its buffers with it.
        let _ = shared.registry.deregister(&mut SourceFd(&fd));
        shared.count.fetch_sub(1, Ordering::Relaxed);
        m::hot().parked.decrement(1.0);
        w.respawn(link);
        return InPlaceEnd::HandedBack;
    }
    let drained = w.base().drained;
    let (base, tls) = w.into_kept();
    let p = Box::new(Parked {
        socket: base.socket,
        link,
        tls,
    });
    if drained && p.link.may_stay_parked(p.link.now()) {
        let mut slots = shared.slots.lock();
        if let Some(slot) = slots.get_mut(idx) {
            if slot.is_none() && p.link.try_park(waker) {
                *slot = Some(p);
                shared.answers.fetch_add(1, Ordering::Relaxed);
                m::hot().parked_answers.increment(1);
                return InPlaceEnd::Stayed;
            }
        }
    }
    InPlaceEnd::Run(p)
}

/// A parked connection's wire for one poll in place: plain system calls
/// on its socket ([`InPlace`]), under TLS, WebSocket, or both.
trait InPlaceStack: Wire + Sized {
    /// The wire over the parked socket, from what parking kept.
    fn build(base: InPlace, tls: Option<Box<TlsStream<()>>>, link: &Link) -> Self;
    fn base(&self) -> &InPlace;
    /// Whether nothing is in flight in it (it may park again as it is).
    fn quiet(&self) -> bool;
    /// What a quiet wire keeps while parked.
    fn into_kept(self) -> (InPlace, Option<Box<TlsStream<()>>>);
    /// The socket and the TLS state with its buffers, for a task.
    fn into_busy(self) -> (InPlace, Option<Box<TlsStream<()>>>);
    /// A task for the connection, with everything its wire holds.
    fn respawn(self, link: Link);
}

impl InPlaceStack for InPlace {
    fn build(base: InPlace, _tls: Option<Box<TlsStream<()>>>, _link: &Link) -> Self {
        base
    }

    fn base(&self) -> &InPlace {
        self
    }

    fn quiet(&self) -> bool {
        true
    }

    fn into_kept(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        (self, None)
    }

    fn into_busy(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        (self, None)
    }

    fn respawn(self, link: Link) {
        respawn(self.socket, None, link);
    }
}

impl InPlaceStack for TlsStream<InPlace> {
    fn build(base: InPlace, tls: Option<Box<TlsStream<()>>>, _link: &Link) -> Self {
        // The caller picks this stack only for a connection with keys.
        let t = tls.unwrap_or_else(|| unreachable!("a TLS stack without keys"));
        t.map_io(|()| base)
    }

    fn base(&self) -> &InPlace {
        self.io()
    }

    fn quiet(&self) -> bool {
        self.is_quiet()
    }

    fn into_kept(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        let (base, mut rest) = self.split();
        rest.shed();
        (base, Some(Box::new(rest)))
    }

    fn into_busy(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        // Its buffers travel with it, in the box.
        let (base, rest) = self.split();
        (base, Some(Box::new(rest)))
    }

    fn respawn(self, link: Link) {
        let (base, tls) = self.into_busy();
        respawn(base.socket, tls, link);
    }
}

impl<T: InPlaceStack> InPlaceStack for WsStream<T> {
    fn build(base: InPlace, tls: Option<Box<TlsStream<()>>>, link: &Link) -> Self {
        ws_over(T::build(base, tls, link), link)
    }

    fn base(&self) -> &InPlace {
        self.io().base()
    }

    fn quiet(&self) -> bool {
        self.is_quiet() && self.io().quiet()
    }

    fn into_kept(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        self.split().0.into_kept()
    }

    fn into_busy(self) -> (InPlace, Option<Box<TlsStream<()>>>) {
        self.split().0.into_busy()
    }

    fn respawn(self, mut link: Link) {
        let (inner, ws) = self.split();
        let (base, tls) = inner.into_busy();
        link.unparked();
        let socket = match TcpStream::from_std(base.socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "an unparked socket could not rejoin the reactor");
                link.lost();
                return;
            }
        };
        match tls {
            None => {
                let wire = ws.map_io(|()| socket);
                tokio::spawn(WsConnection::from(Connection::from_parts(wire, link)));
            }
            Some(t) => {
                let wire = ws.map_io(|()| t.map_io(|()| socket));
                tokio::spawn(WssConnection::from(Connection::from_parts(wire, link)));
            }
        }
    }
}

/// Polls a parked connection once where it is, with its parked waker. The
/// wire and link back; `None` when the connection finished (its link ended
/// the session as a task's would): its socket, on `fd`, then leaves the
/// epoll set before it closes (the descriptor may be reused by the next
/// accept).
fn poll_in_place<W: Wire>(
    shared: &Shared,
    fd: RawFd,
    mut conn: Connection<W>,
    waker: &Waker,
) -> Option<(W, Link)> {
    let done = std::future::Future::poll(
        std::pin::Pin::new(&mut conn),
        &mut Context::from_waker(waker),
    )
    .is_ready();
    if done {
        let _ = shared.registry.deregister(&mut SourceFd(&fd));
        drop(conn);
        None
    } else {
        Some(conn.into_parts())
    }
}

/// A parked socket's [`Wire`] for one poll in place: plain non-blocking
/// system calls, `Pending` where one would block, and no waker kept (the
/// parker's epoll set watches the socket; a write that would block hands
/// the connection back to a task, which waits for room).
struct InPlace {
    socket: std::net::TcpStream,
    /// A read met `EAGAIN`: everything that came was read.
    drained: bool,
}

/// Bytes read per call in place: a heartbeat is a few dozen, and the buffer
/// is zeroed before each read (safe code; about 100 ns for this much).
const IN_PLACE_READ: usize = 2048;

impl Wire for InPlace {
    fn outputs(&self) -> Outputs {
        Outputs::One
    }

    fn poll_read(
        &mut self,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(IN_PLACE_READ);
        loop {
            match (&self.socket).read(buf.initialize_unfilled_to(want)) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return Poll::Pending;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write(
        &mut self,
        _out: usize,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        would_block((&self.socket).write(buf))
    }

    fn poll_write_vectored(
        &mut self,
        _out: usize,
        _cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        would_block((&self.socket).write_vectored(bufs))
    }

    fn vectored(&self, _out: usize) -> bool {
        true
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.shutdown(Shutdown::Write))
    }

    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.socket.peer_addr().ok()
    }
}

/// A non-blocking call's result as a poll: `Pending` when it would block
/// (and when interrupted: the task that takes over retries).
fn would_block<T>(r: io::Result<T>) -> Poll<io::Result<T>> {
    match r {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Poll::Pending
        }
        r => Poll::Ready(r),
    }
}

/// A connection taken out of its slot leaves the epoll set and the count,
/// and gets a task again.
fn hand_back(shared: &Shared, p: Parked) {
    let fd = p.socket.as_raw_fd();
    let _ = shared.registry.deregister(&mut SourceFd(&fd));
    shared.count.fetch_sub(1, Ordering::Relaxed);
    m::hot().parked.decrement(1.0);
    respawn(p.socket, p.tls, p.link);
}

/// Spawns a driver for a socket and its link again. If the socket cannot
/// go back to the reactor (out of memory for its registration), the
/// session ends as for a lost connection (kept for a resume).
fn respawn(socket: std::net::TcpStream, tls: Option<Box<TlsStream<()>>>, mut link: Link) {
    link.unparked();
    let socket = match TcpStream::from_std(socket) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "an unparked socket could not rejoin the reactor");
            link.lost();
            return;
        }
    };
    match (tls, is_ws(&link)) {
        (None, false) => {
            tokio::spawn(TcpConnection::from(Connection::from_parts(socket, link)));
        }
        (Some(t), false) => {
            let wire = t.map_io(|()| socket);
            tokio::spawn(TlsConnection::from(Connection::from_parts(wire, link)));
        }
        (None, true) => {
            let wire = ws_over(socket, &link);
            tokio::spawn(WsConnection::from(Connection::from_parts(wire, link)));
        }
        (Some(t), true) => {
            let wire = ws_over(t.map_io(|()| socket), &link);
            tokio::spawn(WssConnection::from(Connection::from_parts(wire, link)));
        }
    }
}

/// A parkable connection's task: drives the [`Connection`], and parks it
/// when its link says it may.
#[must_use = "a parking connection does nothing unless spawned or awaited"]
pub struct Parking<W: Parkable>(Option<Connection<W>>);

/// A TCP connection's task.
pub type TcpConnection = Parking<TcpStream>;
/// A TLS connection's task.
pub type TlsConnection = Parking<TlsStream<TcpStream>>;
/// A WebSocket connection's task.
pub type WsConnection = Parking<WsStream<TcpStream>>;
/// A WebSocket-over-TLS connection's task.
pub type WssConnection = Parking<WsStream<TlsStream<TcpStream>>>;

impl<W: Parkable> From<Connection<W>> for Parking<W> {
    fn from(c: Connection<W>) -> Self {
        Self(Some(c))
    }
}

impl<W: Parkable> std::future::Future for Parking<W> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(conn) = this.0.as_mut() else {
            return Poll::Ready(());
        };
        if std::pin::Pin::new(&mut *conn).poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let link = conn.link();
        if !link.park_due() {
            return Poll::Pending;
        }
        // Refused when something arrived as the connection was about to
        // park (whatever brought it has woken this task), when pushes wait
        // for an ack (which will wake it), or when TLS bytes are in flight
        // (the socket will wake it).
        let gw = link.gateway_arc().clone();
        if gw.parker().park(&mut this.0) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::future::Future;
    use std::pin::Pin;
    use std::time::Instant;

    use prost::Message;

    use crate::ids::{SessionId, TransportKind};
    use crate::session::{CloseCmd, Enqueued, SessionHandle};
    use crate::transport::testkit::{advance, login_body, node, FakeNode, Wakes};
    use crate::transport::{ConnGuard, Node, NodeRef};
    use crate::wire::pb::{self, client_frame::Body, server_frame::Body as Out};
    use crate::wire::{Code, SharedPush};

    fn parker() -> Arc<Shared> {
        parker_and_epoll().0
    }

    /// A parker with no task, and its epoll set, for the test to read.
    fn parker_and_epoll() -> (Arc<Shared>, mio::Poll) {
        let poll = mio::Poll::new().expect("epoll");
        let mut parkers = PARKERS.write();
        let shared = Arc::new(Shared {
            registry: poll.registry().try_clone().expect("registry"),
            slots: Mutex::new(Vec::new()),
            wakes: Mutex::new(Vec::new()),
            id: u32::try_from(parkers.len()).expect("id"),
            notify: Notify::new(),
            count: AtomicUsize::new(0),
            parks: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        parkers.push(Arc::downgrade(&shared));
        (shared, poll)
    }

    #[test]
    fn a_parked_waker_queues_its_descriptor_at_its_own_parker() {
        let (a, b) = (parker(), parker());
        let w = park_waker(b.id, 1_000_003);
        let c = w.clone();
        assert!(w.will_wake(&c));
        assert!(!w.will_wake(&park_waker(a.id, 1_000_003)));
        c.wake_by_ref();
        c.wake();
        w.wake();
        assert_eq!(*b.wakes.lock(), [1_000_003, 1_000_003, 1_000_003]);
        assert!(a.wakes.lock().is_empty());

        // A parker that is gone: the wake-up is dropped.
        let id = a.id;
        drop(a);
        park_waker(id, 7).wake();
        assert_eq!(b.wakes.lock().len(), 3);
    }

    // -----------------------------------------------------------------
    // Parking on virtual time. The node's parker is one with no task:
    // the test plays its task, reading the epoll set and the wake-up queue
    // and calling `unpark`, so every step happens when the test says.
    // Sockets are a loopback pair; the clock is tokio's, paused.
    // -----------------------------------------------------------------

    const PARK_AFTER: Duration = Duration::from_secs(5);
    /// Bounds a wait for bytes on the loopback pair (a failing test only).
    const PATIENCE: Duration = Duration::from_secs(10);

    struct Rig {
        node: Arc<FakeNode>,
        shared: Arc<Shared>,
        epoll: mio::Poll,
        client: std::net::TcpStream,
        /// The connection's task's waker, while it has a task.
        task: Arc<Wakes>,
        /// When the peer was last heard from.
        login: Instant,
    }

    fn frame(body: Body) -> Vec<u8> {
        let b = pb::ClientFrame {
            request_id: 1,
            body: Some(body),
        }
        .encode_to_vec();
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend(b);
        v
    }

    fn ping(t: u64) -> Vec<u8> {
        frame(Body::Ping(pb::Ping { client_time_ms: t }))
    }

    fn poll<F: Future + Unpin>(f: &mut F, w: &Arc<Wakes>) -> Poll<F::Output> {
        let waker = Waker::from(w.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    /// Blocks until the server's socket has bytes to read (it stays
    /// non-blocking for the link).
    fn wait_readable(conn: Connection<InPlace>) -> Connection<InPlace> {
        let (wire, link) = conn.into_parts();
        wire.socket.set_nonblocking(false).expect("blocking");
        wire.socket.peek(&mut [0u8; 1]).expect("bytes came");
        wire.socket.set_nonblocking(true).expect("non-blocking");
        Connection::from_parts(wire, link)
    }

    impl Rig {
        /// A logged-in plain-TCP connection, driven in place so far, and its
        /// session.
        fn logged_in() -> (Rig, Connection<InPlace>, SessionHandle) {
            let (shared, epoll) = parker_and_epoll();
            let node = node(|c| c.listen.park_after = PARK_AFTER);
            node.enable_parking();
            assert!(node.parker().shared.set(shared.clone()).is_ok());
            assert_eq!(node.park_after(), Some(PARK_AFTER));
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (server, peer) = listener.accept().expect("accept");
            client.set_read_timeout(Some(PATIENCE)).expect("timeout");
            server.set_read_timeout(Some(PATIENCE)).expect("timeout");
            server.set_nonblocking(true).expect("non-blocking");
            let node_ref = NodeRef::new(node.clone());
            let guard = ConnGuard::acquire(&node_ref, peer, TransportKind::Tcp).expect("no cap");
            let wire = InPlace {
                socket: server,
                drained: false,
            };
            let conn = Connection::new(node_ref, wire, TransportKind::Tcp, guard);
            let mut rig = Rig {
                login: node.now(),
                node,
                shared,
                epoll,
                client,
                task: Arc::default(),
            };
            // Polled once before its Login comes, as a task would be: the
            // login deadline goes into the wheel (and stays there after).
            let mut conn = conn;
            assert!(poll(&mut conn, &rig.task).is_pending());
            rig.send(&frame(login_body(None)));
            let mut conn = wait_readable(conn);
            assert!(poll(&mut conn, &rig.task).is_pending());
            let ok = match rig.read().body {
                Some(Out::LoginOk(ok)) => ok,
                other => panic!("expected LoginOk, got {other:?}"),
            };
            let h = rig
                .node
                .session(SessionId(ok.session_id))
                .expect("registered");
            (rig, conn, h)
        }

        /// Logged in, quiet for `park_after`, and parked by its task.
        async fn parked() -> (Rig, RawFd, SessionHandle) {
            let (rig, mut conn, h) = Rig::logged_in();
            advance(&rig.node, PARK_AFTER).await;
            assert!(poll(&mut conn, &rig.task).is_pending());
            assert!(conn.link().park_due());
            let (wire, link) = conn.into_parts();
            let fd = wire.socket.as_raw_fd();
            let tcp = TcpStream::from_std(wire.socket).expect("reactor");
            let mut task = TcpConnection::from(Connection::from_parts(tcp, link));
            assert!(
                poll(&mut task, &rig.task).is_ready(),
                "it parks: its task ends"
            );
            assert_eq!(rig.node.parked_connections(), 1);
            assert!(rig.is_parked(fd));
            (rig, fd, h)
        }

        fn send(&mut self, bytes: &[u8]) {
            self.client.write_all(bytes).expect("write");
        }

        fn read(&mut self) -> pb::ServerFrame {
            let mut len = [0u8; 4];
            self.client.read_exact(&mut len).expect("a frame");
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            self.client.read_exact(&mut body).expect("its body");
            pb::ServerFrame::decode(&body[..]).expect("valid frame")
        }

        /// Reads a frame written by a task of the runtime: yields to it
        /// until the bytes are there.
        async fn read_from_task(&mut self) -> pb::ServerFrame {
            self.client.set_nonblocking(true).expect("non-blocking");
            let t = std::time::Instant::now();
            while self.client.peek(&mut [0u8; 1]).is_err() && t.elapsed() < PATIENCE {
                tokio::task::yield_now().await;
            }
            self.client.set_nonblocking(false).expect("blocking");
            self.read()
        }

        fn is_parked(&self, fd: RawFd) -> bool {
            let slots = self.shared.slots.lock();
            slots.get(fd as usize).is_some_and(Option::is_some)
        }

        /// Waits for the parker's epoll set to report `fd`, as its task does.
        fn readable(&mut self, fd: RawFd) {
            let mut events = Events::with_capacity(8);
            self.epoll.poll(&mut events, Some(PATIENCE)).expect("epoll");
            let fds: Vec<usize> = events.iter().map(|e| e.token().0).collect();
            assert_eq!(fds, vec![fd as usize]);
        }

        /// Unparks what was woken, as the parker's task does; returns the
        /// descriptors that were queued.
        fn serve_wakes(&self) -> Vec<RawFd> {
            let woken = std::mem::take(&mut *self.shared.wakes.lock());
            for &fd in &woken {
                unpark(&self.shared, fd, true);
            }
            woken
        }
    }

    fn offer(node: &FakeNode, h: &SessionHandle) -> Enqueued {
        let p = SharedPush::with("m", b"hello", "t", "", pb::Lane::Interactive, false);
        h.enqueue(&p, node.delivery(), node.budget(), &mut Vec::new())
    }

    fn close_code(f: &pb::ServerFrame) -> Option<i32> {
        match &f.body {
            Some(Out::Close(c)) => Some(c.code),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_parks_at_park_after_but_not_while_a_push_awaits_its_ack() {
        let (mut rig, mut conn, h) = Rig::logged_in();
        let t0 = rig.login;
        assert_eq!(conn.link().park_at(), Some(t0 + PARK_AFTER));
        assert!(!conn.link().park_due());

        // A push in flight: the ack deadline, not the park deadline, is armed.
        assert_eq!(offer(&rig.node, &h), Enqueued::Queued);
        assert!(poll(&mut conn, &rig.task).is_pending());
        match rig.read().body {
            Some(Out::Push(p)) => assert_eq!(p.seq, 1),
            other => panic!("expected the push, got {other:?}"),
        }
        advance(&rig.node, PARK_AFTER).await;
        assert!(poll(&mut conn, &rig.task).is_pending());
        assert!(!conn.link().park_due(), "a push waits for its ack");

        // The ack is the peer's last frame: the quiet time counts from it.
        rig.send(&frame(Body::Ack(pb::Ack {
            lane: pb::Lane::Interactive as i32,
            up_to_seq: 1,
            ranges: vec![],
        })));
        let mut conn = wait_readable(conn);
        assert!(poll(&mut conn, &rig.task).is_pending());
        let t1 = rig.node.now();
        assert_eq!(conn.link().park_at(), Some(t1 + PARK_AFTER));
        assert!(!conn.link().park_due());
        rig.task.0.store(0, Ordering::SeqCst);
        advance(&rig.node, PARK_AFTER - Duration::from_millis(200)).await;
        assert_eq!(rig.task.0.load(Ordering::SeqCst), 0, "not yet");
        advance(&rig.node, Duration::from_millis(200)).await;
        assert!(
            rig.task.0.load(Ordering::SeqCst) > 0,
            "the wheel wakes the task when it may park"
        );
        assert!(poll(&mut conn, &rig.task).is_pending());
        assert!(conn.link().park_due());

        // A connection just unparked does not park again before a read.
        let (wire, mut link) = conn.into_parts();
        link.unparked();
        assert_eq!(link.park_at(), None);
        let mut conn = Connection::from_parts(wire, link);
        assert!(poll(&mut conn, &rig.task).is_pending());
        assert!(!conn.link().park_due());
        rig.send(&ping(1));
        let mut conn = wait_readable(conn);
        assert!(poll(&mut conn, &rig.task).is_pending());
        assert!(matches!(rig.read().body, Some(Out::Pong(_))));
        assert_eq!(conn.link().park_at(), Some(rig.node.now() + PARK_AFTER));

        // Parked by its task: out of the reactor, into the parker's table.
        advance(&rig.node, PARK_AFTER).await;
        let (wire, link) = conn.into_parts();
        let fd = wire.socket.as_raw_fd();
        let tcp = TcpStream::from_std(wire.socket).expect("reactor");
        let mut task = TcpConnection::from(Connection::from_parts(tcp, link));
        assert!(poll(&mut task, &rig.task).is_ready());
        assert!(rig.is_parked(fd));
        assert_eq!((rig.node.parked_connections(), rig.node.parks()), (1, 1));
        assert!(!h.is_detached(), "the session is untouched");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_answers_a_heartbeat_in_place_and_stays_parked() {
        let (mut rig, fd, h) = Rig::parked().await;
        rig.send(&ping(77));
        rig.readable(fd);
        unpark(&rig.shared, fd, false);
        match rig.read().body {
            Some(Out::Pong(p)) => assert_eq!(p.client_time_ms, 77),
            other => panic!("expected a Pong, got {other:?}"),
        }
        assert!(rig.is_parked(fd));
        assert_eq!(rig.node.parked_connections(), 1);
        assert_eq!(rig.node.parked_answers(), 1);
        assert!(rig.shared.wakes.lock().is_empty());

        // Its session still wakes the parker.
        assert_eq!(offer(&rig.node, &h), Enqueued::Queued);
        assert_eq!(*rig.shared.wakes.lock(), vec![fd]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_push_that_comes_with_a_heartbeat_is_written_in_place_then_the_task_takes_over() {
        let (mut rig, fd, h) = Rig::parked().await;
        assert_eq!(offer(&rig.node, &h), Enqueued::Queued);
        assert_eq!(*rig.shared.wakes.lock(), vec![fd], "queued for the parker");
        // The readable event is handled before the wake-up.
        rig.send(&ping(9));
        rig.readable(fd);
        unpark(&rig.shared, fd, false);
        let mut got: Vec<String> = (0..2)
            .map(|_| match rig.read().body {
                Some(Out::Pong(p)) => format!("pong {}", p.client_time_ms),
                Some(Out::Push(p)) => format!("push {}", p.seq),
                other => format!("{other:?}"),
            })
            .collect();
        got.sort();
        assert_eq!(got, vec!["pong 9", "push 1"], "both written in place");
        assert!(
            !rig.is_parked(fd),
            "a push awaiting its ack needs a task (its ack deadline)"
        );
        assert_eq!(rig.node.parked_answers(), 0);
        // The wake-up queued meanwhile finds nothing parked.
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert_eq!(rig.node.parked_connections(), 0, "counted out once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_frame_unparks_and_the_task_keeps_what_was_read() {
        let (mut rig, fd, _h) = Rig::parked().await;
        let p = ping(5);
        rig.send(&p[..3]);
        rig.readable(fd);
        unpark(&rig.shared, fd, false);
        assert!(!rig.is_parked(fd), "handed back to a task");
        assert_eq!(rig.node.parked_connections(), 0);
        assert_eq!(rig.node.parked_answers(), 0);
        rig.send(&p[3..]);
        match rig.read_from_task().await.body {
            Some(Out::Pong(p)) => assert_eq!(p.client_time_ms, 5),
            other => panic!("expected a Pong, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_with_nothing_due_leaves_it_parked_and_a_push_unparks_it() {
        let (mut rig, fd, h) = Rig::parked().await;
        // The login deadline's entry is still in the wheel: it fires with
        // nothing due.
        advance(&rig.node, Duration::from_secs(5)).await;
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert!(rig.is_parked(fd), "stays parked");
        // A wake-up for a descriptor with nothing parked is dropped.
        unpark(&rig.shared, fd + 1, true);
        assert!(rig.is_parked(fd));

        assert_eq!(offer(&rig.node, &h), Enqueued::Queued);
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert!(!rig.is_parked(fd));
        assert_eq!(rig.node.parked_connections(), 0);
        match rig.read_from_task().await.body {
            Some(Out::Push(p)) => assert_eq!(p.seq, 1),
            other => panic!("expected the push, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_request_unparks_and_the_close_is_written() {
        let (mut rig, fd, h) = Rig::parked().await;
        h.request_close(CloseCmd::new(Code::Kicked, "bye"));
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert!(!rig.is_parked(fd));
        assert_eq!(
            close_code(&rig.read_from_task().await),
            Some(Code::Kicked as i32)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_resume_elsewhere_unparks_the_connection_it_took_over() {
        let (mut rig, fd, h) = Rig::parked().await;
        let (delivered, failed) = (&mut Vec::new(), &mut Vec::new());
        let (gen, _, old) = h
            .attach(
                TransportKind::Tcp,
                [0, 0],
                rig.node.delivery(),
                rig.node.budget(),
                delivered,
                failed,
            )
            .expect("resumed");
        assert_eq!(gen, 1);
        old.expect("the parked waker").wake();
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert!(!rig.is_parked(fd), "a stale generation does not stay");
        assert_eq!(
            close_code(&rig.read_from_task().await),
            Some(Code::Replaced as i32)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_unparks_at_its_idle_deadline() {
        let (mut rig, fd, _h) = Rig::parked().await;
        let idle = rig.node.config().session.idle_timeout;
        let deadline = rig.login + idle;
        while rig.node.now() + Duration::from_secs(5) < deadline {
            advance(&rig.node, Duration::from_secs(5)).await;
            rig.serve_wakes();
            assert!(
                rig.is_parked(fd),
                "parked at {:?}",
                rig.node.now() - rig.login
            );
        }
        advance(&rig.node, deadline - rig.node.now()).await;
        assert_eq!(rig.serve_wakes(), vec![fd]);
        assert!(!rig.is_parked(fd));
        assert_eq!(
            close_code(&rig.read_from_task().await),
            Some(Code::HeartbeatTimeout as i32)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hang_up_ends_a_parked_connection_in_place_and_keeps_its_session() {
        let (mut rig, fd, h) = Rig::parked().await;
        rig.client.shutdown(Shutdown::Both).expect("shutdown");
        rig.readable(fd);
        unpark(&rig.shared, fd, false);
        assert!(!rig.is_parked(fd));
        assert_eq!(rig.node.parked_connections(), 0);
        assert!(h.is_detached(), "kept for a resume");
        assert_eq!(rig.node.parked_answers(), 0);
    }
}
