//! The part of a session that other tasks touch: its outbound queue, its close
//! request, its rooms, and the waker of the task that drives it.
//!
//! Every lock here is a `parking_lot::Mutex` held for a few instructions and
//! never across an `.await`; the outbox lock is a leaf (nothing else is locked
//! while it is held), so fan-out can take it while holding a room's read lock.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use parking_lot::Mutex;

use crate::config::SlowConsumerPolicy;
use crate::ids::{DeviceId, NodeId, RoomId, SessionId, TransportKind, UserId};
use crate::wire::{pb, Code, SharedPush};

/// Who a logged-in session belongs to. Set once, at login.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub user: UserId,
    pub device: DeviceId,
    pub platform: pb::Platform,
    pub transport: TransportKind,
    pub since_ms: u64,
}

/// A request to close a session, made from outside its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseCmd {
    pub code: Code,
    pub reason: String,
    pub reconnect_to: String,
    pub reconnect_after_ms: u32,
}

impl CloseCmd {
    pub fn new(code: Code, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            reconnect_to: String::new(),
            reconnect_after_ms: 0,
        }
    }
}

/// How far past its capacity a session's queue may grow while its socket is
/// still writable (its task has simply not run yet).
pub const OVERFLOW: usize = 4;

/// What [`SessionHandle::enqueue`] did with a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The queue was full and the policy is `drop`.
    Dropped,
    /// The queue was full and the policy is `disconnect`: the session is closing.
    SlowConsumer,
    /// The session is already closing.
    Closed,
}

struct Outbox {
    queue: VecDeque<(u64, SharedPush)>,
    next_seq: u64,
    /// Boxed: a close request is rare, and idle sessions pay 8 bytes for it.
    close: Option<Box<CloseCmd>>,
    /// A close was requested: new pushes are refused from then on.
    closing: bool,
    /// The driver finished: nothing is queued any more.
    closed: bool,
    /// The socket refused the last write: the peer is not reading.
    blocked: bool,
}

struct Rooms {
    /// Allocated only while the session is in a room: 8 bytes when idle
    /// instead of a Vec's 24 (hence the box around a collection).
    #[allow(clippy::box_collection)]
    list: Option<Box<Vec<RoomId>>>,
    closed: bool,
}

struct Shared {
    id: SessionId,
    info: OnceLock<SessionInfo>,
    outbox: Mutex<Outbox>,
    rooms: Mutex<Rooms>,
    waker: AtomicWaker,
}

/// A cheap, cloneable reference to one live connection or session.
#[derive(Clone)]
pub struct SessionHandle(Arc<Shared>);

impl std::fmt::Debug for SessionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionHandle")
            .field("id", &self.0.id)
            .field("info", &self.0.info.get())
            .finish()
    }
}

impl SessionHandle {
    /// A handle for a new connection, not yet logged in.
    pub fn new(id: SessionId) -> Self {
        Self(Arc::new(Shared {
            id,
            info: OnceLock::new(),
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                next_seq: 1,
                close: None,
                closing: false,
                closed: false,
                blocked: false,
            }),
            rooms: Mutex::new(Rooms {
                list: None,
                closed: false,
            }),
            waker: AtomicWaker::new(),
        }))
    }

    pub fn id(&self) -> SessionId {
        self.0.id
    }

    /// Identity of the session; `None` before login.
    pub fn info(&self) -> Option<&SessionInfo> {
        self.0.info.get()
    }

    /// Records the identity at login. Returns false if it was already set.
    pub fn set_info(&self, info: SessionInfo) -> bool {
        self.0.info.set(info).is_ok()
    }

    /// Queues a shared push, assigning this session's next sequence number.
    /// Never blocks beyond the leaf outbox lock.
    pub fn enqueue(
        &self,
        push: &SharedPush,
        capacity: usize,
        policy: SlowConsumerPolicy,
    ) -> Enqueued {
        let wake;
        let res = {
            let mut o = self.0.outbox.lock();
            if o.closed || o.closing {
                return Enqueued::Closed;
            }
            // A full queue means a slow consumer only when the socket is full
            // too; a session whose task has not run yet (the gateway is busy
            // fanning out) may queue up to OVERFLOW times the capacity.
            let len = o.queue.len();
            if len >= capacity && (o.blocked || len >= capacity.saturating_mul(OVERFLOW)) {
                match policy {
                    SlowConsumerPolicy::Drop => {
                        // The dropped push still takes its sequence number, so
                        // the client sees the gap and knows it missed one.
                        o.next_seq += 1;
                        return Enqueued::Dropped;
                    }
                    SlowConsumerPolicy::Disconnect => {
                        o.close = Some(Box::new(CloseCmd::new(
                            Code::SlowConsumer,
                            "outbound queue full: the client is not reading fast enough",
                        )));
                        o.closing = true;
                        wake = true;
                        Enqueued::SlowConsumer
                    }
                }
            } else {
                let seq = o.next_seq;
                o.next_seq += 1;
                wake = o.queue.is_empty();
                o.queue.push_back((seq, push.clone()));
                Enqueued::Queued
            }
        };
        if wake {
            self.0.waker.wake();
        }
        res
    }

    /// Asks the session's task to close with `cmd` (the first request wins).
    pub fn request_close(&self, cmd: CloseCmd) {
        {
            let mut o = self.0.outbox.lock();
            if o.closed || o.closing {
                return;
            }
            o.close = Some(Box::new(cmd));
            o.closing = true;
        }
        self.0.waker.wake();
    }

    /// Wakes the session's task (timer wheel, drain).
    pub fn wake(&self) {
        self.0.waker.wake();
    }

    /// Registers the waker of the task that drives this session.
    pub fn register_waker(&self, w: &Waker) {
        self.0.waker.register(w);
    }

    /// Takes a pending close request (driver side).
    pub fn take_close(&self) -> Option<CloseCmd> {
        self.0.outbox.lock().close.take().map(|b| *b)
    }

    /// Moves up to `max` queued pushes into `out` (driver side).
    /// Returns how many remain queued. Frees the queue's memory once drained.
    pub fn drain_into(&self, out: &mut Vec<(u64, SharedPush)>, max: usize) -> usize {
        let mut o = self.0.outbox.lock();
        let n = o.queue.len().min(max);
        out.extend(o.queue.drain(..n));
        if o.queue.is_empty() && o.queue.capacity() > 0 {
            // An idle session holds no queue memory.
            o.queue = VecDeque::new();
        }
        o.queue.len()
    }

    /// Records whether the socket refused the last write (driver side).
    pub fn set_blocked(&self, blocked: bool) {
        self.0.outbox.lock().blocked = blocked;
    }

    /// Pushes currently queued.
    pub fn queued(&self) -> usize {
        self.0.outbox.lock().queue.len()
    }

    /// The sequence number the next push will get.
    pub fn next_seq(&self) -> u64 {
        self.0.outbox.lock().next_seq
    }

    /// Marks the outbox closed: later pushes are refused. Returns what was queued.
    pub fn close_outbox(&self) -> usize {
        let mut o = self.0.outbox.lock();
        o.closed = true;
        o.closing = true;
        let n = o.queue.len();
        o.queue = VecDeque::new();
        n
    }

    /// Adds `room` to this session's list, unless closed or at `max`.
    /// Called with the registry's room shard *not* locked (lock order: rooms → shard).
    pub(crate) fn with_rooms<R>(&self, f: impl FnOnce(&mut Vec<RoomId>, bool) -> R) -> R {
        let mut r = self.0.rooms.lock();
        let closed = r.closed;
        let mut list = r.list.take().unwrap_or_default();
        let res = f(&mut list, closed);
        if !list.is_empty() {
            r.list = Some(list);
        }
        res
    }

    /// Marks rooms closed (no further joins) and takes the list.
    pub(crate) fn take_rooms(&self) -> Vec<RoomId> {
        let mut r = self.0.rooms.lock();
        r.closed = true;
        r.list.take().map(|b| *b).unwrap_or_default()
    }

    /// Rooms this session is in.
    pub fn rooms(&self) -> Vec<RoomId> {
        self.0
            .rooms
            .lock()
            .list
            .as_deref()
            .cloned()
            .unwrap_or_default()
    }

    /// Bytes of one session's shared state (Arc counts excluded), for the size tests.
    pub fn shared_size() -> usize {
        std::mem::size_of::<Shared>()
    }

    /// A weak reference for the timer wheel.
    pub(crate) fn downgrade(&self) -> WeakSession {
        WeakSession(Arc::downgrade(&self.0))
    }

    /// Presence record of this session.
    pub fn presence(&self, node: &NodeId) -> Option<pb::DevicePresence> {
        let i = self.info()?;
        Some(pb::DevicePresence {
            device_id: i.device.to_string(),
            session_id: self.id().0,
            node_id: node.to_string(),
            platform: i.platform as i32,
            transport: i.transport.as_str().into(),
            since_ms: i.since_ms,
        })
    }

    /// Same underlying session?
    pub fn ptr_eq(&self, other: &SessionHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Bytes of one session's shared state (Arc counts excluded), for the size tests.
pub fn shared_size() -> usize {
    std::mem::size_of::<Shared>()
}

/// A handle that does not keep the session alive (timer wheel entries).
pub struct WeakSession(std::sync::Weak<Shared>);

impl WeakSession {
    /// Wakes the session's task if it still exists.
    pub fn wake(&self) -> bool {
        match self.0.upgrade() {
            Some(s) => {
                s.waker.wake();
                true
            }
            None => false,
        }
    }
}
