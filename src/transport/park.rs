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
//! - its socket becomes readable (a heartbeat, an ack, an uplink, a hang-up);
//! - its session is woken: a push, a close request (a kick, a drain, a
//!   takeover by a resume) or the timer wheel (the idle timeout, the
//!   token's expiry). While parked the session's waker is a [`ParkWake`],
//!   which queues the connection for the parker's task.
//!
//! The link's deadlines stay in the shared wheel, so a parked connection
//! still times out on schedule: the wheel wakes it, it unparks and closes.
//! Everything else (the session, its registry entries, its rooms) is where
//! it was; a parked connection differs from a running one only in who
//! polls its socket.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Registry, Token};
use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::ids::SessionId;
use crate::metrics as m;

use super::conn::Connection;
use super::link::Link;

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
    /// Parked connections whose session was woken, with the session's id
    /// (a stale wake-up for a reused descriptor is then ignored).
    wakes: Mutex<Vec<(RawFd, SessionId)>>,
    notify: Notify,
    /// Connections parked now, and parks so far.
    count: AtomicUsize,
    parks: AtomicU64,
    /// Cleared if the epoll set fails: nothing parks any more.
    alive: AtomicBool,
}

struct Parked {
    socket: std::net::TcpStream,
    link: Link,
}

/// The waker a parked session holds: queues its connection for unparking.
/// Weak, so that a parked session does not keep the parker alive.
struct ParkWake {
    parker: Weak<Shared>,
    fd: RawFd,
    session: SessionId,
}

impl Wake for ParkWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Called under the session's lock: only the wake queue (a leaf
        // lock) is touched here, never the slots.
        if let Some(p) = self.parker.upgrade() {
            p.wakes.lock().push((self.fd, self.session));
            p.notify.notify_one();
        }
    }
}

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
        let shared = Arc::new(Shared {
            registry,
            slots: Mutex::new(Vec::new()),
            wakes: Mutex::new(Vec::new()),
            notify: Notify::new(),
            count: AtomicUsize::new(0),
            parks: AtomicU64::new(0),
            alive: AtomicBool::new(true),
        });
        if self.shared.set(shared.clone()).is_err() {
            return;
        }
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
        let Some(fd) = conn.raw_fd() else {
            return false;
        };
        let Ok(idx) = usize::try_from(fd) else {
            return false;
        };
        let waker = Waker::from(Arc::new(ParkWake {
            parker: Arc::downgrade(shared),
            fd,
            session: conn.link().handle().id(),
        }));
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
                        unpark(&shared, fd, None);
                    }
                    if ready.len() < EVENTS {
                        break;
                    }
                }
                guard.clear_ready();
            }
            () = shared.notify.notified() => {
                let woken = std::mem::take(&mut *shared.wakes.lock());
                for (fd, session) in woken {
                    unpark(&shared, fd, Some(session));
                }
            }
        }
    }
    // Only after a failure of the epoll set: hand every parked connection
    // back to a task of its own, and park no more.
    shared.alive.store(false, Ordering::Relaxed);
    let parked: Vec<_> = shared.slots.lock().drain(..).flatten().collect();
    for p in parked {
        let fd = p.socket.as_raw_fd();
        let _ = shared.registry.deregister(&mut SourceFd(&fd));
        shared.count.fetch_sub(1, Ordering::Relaxed);
        m::hot().parked.decrement(1.0);
        respawn(p.socket, p.link);
    }
}

/// Gives the connection parked on `fd` a task again: for a readable socket
/// (`session` None) always; for a wake-up of `session`, only if the
/// connection still drives that session and something is due (see
/// [`Link::stay_parked`]).
fn unpark(shared: &Arc<Shared>, fd: RawFd, session: Option<SessionId>) {
    let Ok(idx) = usize::try_from(fd) else {
        return;
    };
    let parked = {
        let mut slots = shared.slots.lock();
        let Some(slot) = slots.get_mut(idx) else {
            return;
        };
        if let Some(s) = session {
            let Some(p) = slot.as_mut().filter(|p| p.link.handle().id() == s) else {
                return;
            };
            let waker = Waker::from(Arc::new(ParkWake {
                parker: Arc::downgrade(shared),
                fd,
                session: s,
            }));
            let now = p.link.now();
            if p.link.stay_parked(now, waker) {
                return;
            }
        }
        slot.take()
    };
    let Some(p) = parked else { return };
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
