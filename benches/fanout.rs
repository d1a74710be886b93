//! Fan-out benchmarks: one push through the real [`Router`] into the queues of
//! 10,000 and 100,000 logged-in in-memory sessions (everyone, and one room
//! holding all of them); registry lookups, joins and leaves, alone and from
//! two threads at once; the session state machine's per-frame hot path; and
//! what a large fan-out costs everyone else (`pressure_100k`): how long a
//! join to the room waits while pushes to that room run on another thread,
//! and the longest a task on the same runtime thread waits while a push to
//! everyone goes through the bus.
//!
//! Only the fan-out is timed: after every iteration each session's queue is
//! drained (untimed, via `iter_custom`), so queues never fill and every
//! iteration does the same work (and, as in production, an idle session holds
//! no queue memory, so each enqueue starts from an empty queue).
//!
//! Run: `cargo bench --bench fanout` (add `-- --warm-up-time 1 --measurement-time 3`
//! for a quick pass).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prost::Message;
use tether::auth::Identity;
use tether::bus::{Bus, Command, LocalBus, PushTarget};
use tether::config::{ClientJoin, MultiLogin, SlowConsumerPolicy};
use tether::ids::{DeviceId, NodeId, RoomId, SessionId, TransportKind, UserId};
use tether::registry::Registry;
use tether::router::Router;
use tether::session::{
    LoginGrant, Session, SessionEnv, SessionHandle, SessionInfo, SessionParams, UplinkAck,
};
use tether::wire::{pb, Code, LoginRequest, SendRequest, SharedPush};

const SESSIONS: usize = 10_000;
/// Charged bytes per session queue: room for about 1,024 small pushes.
const QUEUE_BYTES: usize = 1024 * 160;
const MAX_ROOMS: usize = 16;

struct Fleet {
    router: Arc<Router>,
    handles: Vec<SessionHandle>,
    room: RoomId,
}

fn fleet(n: usize) -> Fleet {
    let registry = Arc::new(Registry::new());
    let room = RoomId::new("all");
    let mut handles = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let h = SessionHandle::new(SessionId(i + 1));
        assert!(h.set_info(SessionInfo {
            user: UserId::new(format!("user-{i}")),
            device: DeviceId::new("phone"),
            platform: pb::Platform::Ios,
            transport: TransportKind::Memory,
            since_ms: 0,
        }));
        assert!(registry.register(&h, MultiLogin::PerDevice).is_empty());
        registry.join(&h, &room, MAX_ROOMS).unwrap();
        handles.push(h);
    }
    assert_eq!(registry.len(), n);
    assert_eq!(registry.room(&room).unwrap().len(), n);
    let router = Arc::new(Router::new(
        NodeId::new("bench"),
        registry,
        QUEUE_BYTES,
        SlowConsumerPolicy::Drop,
        MAX_ROOMS,
    ));
    Fleet {
        router,
        handles,
        room,
    }
}

/// Empties every session's queue; returns how many pushes were taken.
fn drain_all(handles: &[SessionHandle], budget: &tether::session::Budget) -> usize {
    handles.iter().map(|h| h.drain_all(budget)).sum()
}

fn bench_fanout(c: &mut Criterion) {
    for (n, name, samples) in [
        (SESSIONS, "fanout_10k", 50),
        (SESSIONS * 10, "fanout_100k", 10),
    ] {
        fanout_group(c, n, name, samples);
    }
}

fn fanout_group(c: &mut Criterion, n: usize, group: &str, samples: usize) {
    let f = fleet(n);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(n as u64));
    g.sample_size(samples);

    // The payload size does not matter here: every queue gets a clone of the
    // same `Bytes` handle (see the codec bench for per-recipient framing).
    let shared = SharedPush::new("m-1", &[0x42; 64], "bench", "all");
    let budget = f.router.budget().clone();
    for (name, target) in [
        ("everyone", PushTarget::Everyone),
        ("room", PushTarget::Room(f.room.clone())),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let out = f.router.push(black_box(&target), black_box(&shared));
                    timed += t.elapsed();
                    debug_assert_eq!(out.sessions, n as u64);
                    black_box(out);
                    // Untimed: empty the queues so the next push starts equal.
                    let drained = drain_all(&f.handles, &budget);
                    debug_assert_eq!(drained, n);
                }
                timed
            })
        });
    }

    // For reference: fan-out plus the driver side of every delivery (taking
    // the push out of the queue), both timed.
    g.bench_function("everyone+drain", |b| {
        b.iter(|| {
            let out = f.router.push(&PushTarget::Everyone, black_box(&shared));
            black_box(out);
            black_box(drain_all(&f.handles, &budget))
        })
    });
    g.finish();

    // Sanity, outside the timing: a push really reaches every session once.
    let out = f.router.push(&PushTarget::Everyone, &shared);
    assert_eq!((out.sessions, out.dropped), (n as u64, 0));
    assert_eq!(drain_all(&f.handles, &budget), n);
}

/// Registry operations on 100,000 sessions: lookups of one device, and a
/// join followed by a leave (both O(1)), from one thread and from two
/// threads at once (each on its own half of the sessions and its own rooms).
fn bench_registry(c: &mut Criterion) {
    const N: usize = 100_000;
    let f = fleet(N);
    let reg = f.router.registry().clone();
    let users: Vec<String> = (0..N).map(|i| format!("user-{i}")).collect();
    let phone = DeviceId::new("phone");
    let rooms: Vec<RoomId> = (0..64).map(|r| RoomId::new(format!("r-{r}"))).collect();
    let mut g = c.benchmark_group("registry_100k");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("lookup_device", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            black_box(reg.device(&users[i], &phone))
        })
    });
    g.bench_function("join_leave", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            let room = &rooms[i % rooms.len()];
            let _ = reg.join(&f.handles[i], room, MAX_ROOMS);
            black_box(reg.leave(&f.handles[i], room))
        })
    });
    const OPS: u64 = 20_000;
    g.throughput(Throughput::Elements(2 * OPS));
    g.bench_function("join_leave_2_threads", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                std::thread::scope(|s| {
                    for half in 0..2usize {
                        let (reg, handles, rooms) = (&reg, &f.handles, &rooms);
                        s.spawn(move || {
                            for k in 0..OPS as usize {
                                let idx = (half * N / 2 + k * 7919) % N;
                                let room = &rooms[half * 32 + k % 32];
                                let _ = reg.join(&handles[idx], room, MAX_ROOMS);
                                reg.leave(&handles[idx], room);
                            }
                        });
                    }
                });
            }
            t.elapsed()
        })
    });
    g.finish();
}

/// What a fan-out to 100,000 sessions costs others. `join_during_room_push`:
/// one join and one leave of the room while another thread pushes to that
/// room (and drains the queues) in a loop; a join waits for any lock the
/// push holds on the room. `tick_gap_during_broadcast`: one push to everyone
/// through the bus on a current-thread runtime, with another task on the
/// same thread; the time reported per iteration is the longest that task
/// waited to run (what a timer tick on that worker would wait).
fn bench_pressure(c: &mut Criterion) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const N: usize = 100_000;
    let f = fleet(N);
    let reg = f.router.registry().clone();
    let budget = f.router.budget().clone();
    let shared = SharedPush::new("m-1", &[0x42; 64], "bench", "all");
    let mut g = c.benchmark_group("pressure_100k");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));

    let extra = SessionHandle::new(SessionId(u64::MAX));
    assert!(extra.set_info(SessionInfo {
        user: UserId::new("extra"),
        device: DeviceId::new("phone"),
        platform: pb::Platform::Ios,
        transport: TransportKind::Memory,
        since_ms: 0,
    }));
    reg.register(&extra, MultiLogin::PerDevice);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let target = PushTarget::Room(f.room.clone());
            while !stop.load(Ordering::Relaxed) {
                black_box(f.router.push(&target, &shared));
                drain_all(&f.handles, &budget);
            }
        });
        g.bench_function("join_during_room_push", |b| {
            b.iter(|| {
                reg.join(&extra, &f.room, MAX_ROOMS).unwrap();
                black_box(reg.leave(&extra, &f.room))
            })
        });
        stop.store(true, Ordering::Relaxed);
    });
    drain_all(&f.handles, &budget);

    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bus = LocalBus::new(NodeId::new("bench"), f.router.clone(), Arc::default());
    g.bench_function("tick_gap_during_broadcast", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let gap = rt.block_on(async {
                    let done = Arc::new(AtomicBool::new(false));
                    let longest = Arc::new(AtomicU64::new(0));
                    let ticker = {
                        let (done, longest) = (done.clone(), longest.clone());
                        tokio::spawn(async move {
                            let mut last = Instant::now();
                            while !done.load(Ordering::Relaxed) {
                                let now = Instant::now();
                                let waited = (now - last).as_nanos() as u64;
                                longest.fetch_max(waited, Ordering::Relaxed);
                                last = now;
                                tokio::task::yield_now().await;
                            }
                        })
                    };
                    tokio::task::yield_now().await;
                    let cmd = Command::Push {
                        target: PushTarget::Everyone,
                        push: shared.clone(),
                    };
                    black_box(bus.request(cmd).await);
                    // The ticker's run after the push ends its longest wait.
                    tokio::task::yield_now().await;
                    done.store(true, Ordering::Relaxed);
                    ticker.await.unwrap();
                    Duration::from_nanos(longest.load(Ordering::Relaxed))
                });
                total += gap;
                drain_all(&f.handles, &budget);
            }
            total
        })
    });
    g.finish();
}

/// A do-nothing environment: login always succeeds, uplinks always accepted.
struct FakeEnv {
    next_msg: u64,
}

impl SessionEnv for FakeEnv {
    fn login(&mut self, _now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        Ok(LoginGrant {
            session_id: SessionId(1),
            identity: Identity {
                user: UserId::new("bench"),
                device: req.device.clone(),
                rooms: Box::new([]),
            },
            resume_token: bytes::Bytes::new(),
            resume: None,
            next_uplink_seq: 1,
            token_exp: None,
        })
    }
    fn refresh(
        &mut self,
        _now: Instant,
        _req: &tether::wire::RefreshRequest,
    ) -> Result<tether::session::Refreshed, (Code, String)> {
        Err((Code::Unsupported, "not in this bench".into()))
    }
    fn uplink(&mut self, _now: Instant, _req: SendRequest) -> Result<UplinkAck, Code> {
        self.next_msg += 1;
        Ok(UplinkAck {
            server_msg_id: self.next_msg,
            seq: self.next_msg,
            duplicate: false,
        })
    }
    fn join(&mut self, _room: &RoomId) -> Result<(), Code> {
        Ok(())
    }
    fn leave(&mut self, _room: &RoomId) {}
    fn ack(&mut self, _now: Instant, _lane: pb::Lane, _up_to_seq: u64, _ranges: &[(u64, u64)]) {}
    fn wall_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

fn params() -> Arc<SessionParams> {
    Arc::new(SessionParams {
        login_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(90),
        max_frame: 64 * 1024,
        client_join: ClientJoin::Any,
        node_id: "bench".into(),
        token_grace: Duration::from_secs(30),
        epoch: Instant::now(),
    })
}

fn frame(request_id: u64, body: pb::client_frame::Body) -> Vec<u8> {
    pb::ClientFrame {
        request_id,
        body: Some(body),
    }
    .encode_to_vec()
}

fn bench_session(c: &mut Criterion) {
    use pb::client_frame::Body;
    let now = Instant::now();
    let mut env = FakeEnv { next_msg: 0 };
    let mut s = Session::new(now, params());
    s.handle_frame(
        now,
        &frame(
            1,
            Body::Login(pb::Login {
                token: "t".into(),
                device_id: "phone".into(),
                platform: pb::Platform::Ios as i32,
                protocol_version: 1,
                resume: None,
            }),
        ),
        &mut env,
    );
    assert!(s.is_active(), "the fake login must succeed");
    while s.poll_transmit().is_some() {}

    let ping = frame(
        2,
        Body::Ping(pb::Ping {
            client_time_ms: 1_700_000_000_000,
        }),
    );
    let send = frame(
        3,
        Body::Send(pb::Send {
            client_msg_id: "c-1".into(),
            route: "chat.send".into(),
            payload: Bytes::from_static(&[0x5a; 64]),
        }),
    );

    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1));
    // One frame in (decode + validate + state machine + reply encode), its
    // reply taken out, as the connection driver does.
    g.bench_function("active_ping", |b| {
        b.iter(|| {
            s.handle_frame(now, black_box(&ping), &mut env);
            black_box(s.poll_transmit().expect("a Pong"))
        })
    });
    g.bench_function("active_send64", |b| {
        b.iter(|| {
            s.handle_frame(now, black_box(&send), &mut env);
            black_box(s.poll_transmit().expect("a SendAck"))
        })
    });
    g.finish();
    assert!(s.is_active());
}

criterion_group!(
    benches,
    bench_fanout,
    bench_registry,
    bench_session,
    bench_pressure
);
criterion_main!(benches);
