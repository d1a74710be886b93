//! Parking: an idle plain-TCP connection without a task or a reactor entry.
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
use super::Wire;

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// Parks idle plain-TCP connections of one gateway. Does nothing until
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
    pub(crate) fn park(&self, slot: &mut Option<Connection<TcpStream>>) -> bool {
        let Some(shared) = self.shared.get() else {
            return false;
        };
        if !shared.alive.load(Ordering::Relaxed) {
            return false;
        }
        let Some(conn) = slot.as_ref() else {
            return false;
        };
        let fd = conn.raw_fd();
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
        let socket = match wire.into_std() {
            Ok(s) => s,
            Err(e) => {
                // The socket is gone with its registration; the link's drop
                // ends the session as a lost connection would.
                tracing::debug!(error = %e, "parking failed: the socket left the reactor in error");
                drop(slots);
                drop(link);
                return true;
            }
        };
        if let Err(e) = shared
            .registry
            .register(&mut SourceFd(&fd), Token(idx), Interest::READABLE)
        {
            tracing::debug!(error = %e, "parking failed: epoll refused the socket");
            drop(slots);
            respawn(socket, link);
            return true;
        }
        if slots.len() <= idx {
            slots.resize_with((idx + 1).next_power_of_two(), || None);
        }
        slots[idx] = Some(Box::new(Parked { socket, link }));
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
        InPlaceEnd::Stayed => {}
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
    let Parked { socket, link } = p;
    let waker = park_waker(shared.id, fd);
    let mut conn = Connection::from_parts(
        InPlace {
            socket,
            drained: false,
        },
        link,
    );
    if std::future::Future::poll(
        std::pin::Pin::new(&mut conn),
        &mut Context::from_waker(&waker),
    )
    .is_ready()
    {
        // Out of the epoll set before the descriptor closes (and may be
        // reused by the next accept).
        let _ = shared.registry.deregister(&mut SourceFd(&fd));
        drop(conn);
        return InPlaceEnd::Ended;
    }
    let (wire, link) = conn.into_parts();
    let p = Box::new(Parked {
        socket: wire.socket,
        link,
    });
    if wire.drained && p.link.may_stay_parked(p.link.now()) {
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
    respawn(p.socket, p.link);
}

/// Spawns a driver for a socket and its link again. If the socket cannot
/// go back to the reactor (out of memory for its registration), the link's
/// drop ends the session as a lost connection.
fn respawn(socket: std::net::TcpStream, mut link: Link) {
    link.unparked();
    match TcpStream::from_std(socket) {
        Ok(wire) => {
            tokio::spawn(TcpConnection::from(Connection::from_parts(wire, link)));
        }
        Err(e) => tracing::warn!(error = %e, "an unparked socket could not rejoin the reactor"),
    }
}

/// A plain-TCP connection's task: drives the [`Connection`], and parks it
/// when its link says it may.
#[must_use = "a TcpConnection does nothing unless spawned or awaited"]
pub struct TcpConnection(Option<Connection<TcpStream>>);

impl From<Connection<TcpStream>> for TcpConnection {
    fn from(c: Connection<TcpStream>) -> Self {
        Self(Some(c))
    }
}

impl std::future::Future for TcpConnection {
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
        // park (whatever brought it has woken this task), or when pushes
        // wait for an ack (which will wake it).
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

    fn parker() -> Arc<Shared> {
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
        shared
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
}
