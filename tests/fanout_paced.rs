//! A large fan-out lets the rest of the runtime run while it walks: other
//! tasks (timer ticks, sessions, joins) run between its chunks, and the locks
//! they need are free meanwhile. Deterministic: a current-thread runtime,
//! where another task runs only when the fan-out yields.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tether::bus::{Bus, Command, LocalBus, Outcome, PushTarget};
use tether::config::{MultiLogin, SlowConsumerPolicy};
use tether::ids::{DeviceId, NodeId, RoomId, SessionId, TransportKind, UserId};
use tether::registry::Registry;
use tether::router::{Router, FANOUT_CHUNK};
use tether::session::{SessionHandle, SessionInfo};
use tether::wire::{pb, SharedPush};

const N: usize = 5 * FANOUT_CHUNK;

fn session(id: u64) -> SessionHandle {
    let h = SessionHandle::new(SessionId(id));
    assert!(h.set_info(SessionInfo {
        user: UserId::new(format!("user-{id}")),
        device: DeviceId::new("phone"),
        platform: pb::Platform::Ios,
        transport: TransportKind::Memory,
        since_ms: 0,
    }));
    h
}

struct Fleet {
    registry: Arc<Registry>,
    bus: LocalBus,
    handles: Vec<SessionHandle>,
    room: RoomId,
}

fn fleet() -> Fleet {
    let registry = Arc::new(Registry::new());
    let room = RoomId::new("all");
    let handles: Vec<SessionHandle> = (1..=N as u64).map(session).collect();
    for h in &handles {
        assert!(registry.register(h, MultiLogin::PerDevice).is_empty());
        registry.join(h, &room, 4).unwrap();
    }
    let router = Arc::new(Router::new(
        NodeId::new("n"),
        registry.clone(),
        16,
        SlowConsumerPolicy::Drop,
        4,
    ));
    Fleet {
        bus: LocalBus::new(NodeId::new("n"), router, Arc::default()),
        registry,
        handles,
        room,
    }
}

/// What the other task saw while the push was under way.
#[derive(Default)]
struct Seen {
    /// Sessions holding the push, at each of its runs.
    queued: Vec<usize>,
    /// Whether its join (or login) completed while the push was partial.
    changed_midway: bool,
}

/// Pushes to `target` through the bus while another task watches, and
/// changes the registry (`change`) the first time it sees the push partly
/// delivered. Returns the push's outcome and what the watcher saw.
async fn push_watched(
    f: &Fleet,
    target: PushTarget,
    change: impl Fn(&Registry) + Send + 'static,
) -> (tether::bus::PushOutcome, Seen) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done) = (seen.clone(), done.clone());
        let (handles, registry) = (f.handles.clone(), f.registry.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                let queued = handles.iter().filter(|h| h.queued() > 0).count();
                {
                    let mut s = seen.lock();
                    s.queued.push(queued);
                    if queued > 0 && queued < N && !s.changed_midway {
                        // The room's and the shard's locks are free: this
                        // completes while the fan-out is half done.
                        change(&registry);
                        s.changed_midway = true;
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    tokio::task::yield_now().await; // the watcher sees the state before the push
    let push = SharedPush::new("m-1", b"hello", "test", "");
    let out = f.bus.request(Command::Push { target, push }).await;
    done.store(true, Ordering::Release);
    watcher.await.unwrap();
    let Outcome::Push(out) = out.outcome else {
        panic!("a push has a push outcome");
    };
    let seen = std::mem::take(&mut *seen.lock());
    (out, seen)
}

#[tokio::test(flavor = "current_thread")]
async fn a_room_push_lets_a_join_to_that_room_complete_midway() {
    let f = fleet();
    let room = f.room.clone();
    let late = session(N as u64 + 1);
    assert!(f.registry.register(&late, MultiLogin::PerDevice).is_empty());
    let joiner = late.clone();
    let (out, seen) = push_watched(&f, PushTarget::Room(f.room.clone()), move |r| {
        r.join(&joiner, &room, 4).unwrap();
    })
    .await;
    assert!(
        seen.changed_midway,
        "other tasks never ran while the push was partly delivered: {:?}",
        seen.queued
    );
    // The counts are those of the members when the push started.
    assert_eq!((out.sessions, out.dropped), (N as u64, 0));
    assert!(f.handles.iter().all(|h| h.queued() == 1));
    assert_eq!(f.registry.room(&f.room).unwrap().len(), N + 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_push_to_everyone_yields_between_chunks_and_lets_logins_in() {
    let f = fleet();
    let late = session(N as u64 + 1);
    let (out, seen) = push_watched(&f, PushTarget::Everyone, move |r| {
        assert!(r.register(&late, MultiLogin::PerDevice).is_empty());
    })
    .await;
    assert!(seen.changed_midway, "no run midway: {:?}", seen.queued);
    let midway = seen.queued.iter().filter(|&&q| q > 0 && q < N).count();
    assert!(
        midway >= N / FANOUT_CHUNK - 2,
        "the push yields about every {FANOUT_CHUNK} sessions: {:?}",
        seen.queued
    );
    assert!(
        out.sessions >= N as u64,
        "every session present throughout gets it"
    );
    assert_eq!(out.dropped, 0);
    assert!(f.handles.iter().all(|h| h.queued() == 1));
    assert_eq!(f.registry.len(), N + 1);
}
