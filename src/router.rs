//! Fan-out on one node: executes bus commands against the local [`Registry`].
//!
//! A push is encoded once ([`SharedPush`]) and each recipient's queue gets a
//! clone of the same `Bytes` handle. Enqueueing never blocks on a socket: a full
//! queue applies the slow-consumer policy for that session only.

use std::sync::{Arc, Weak};

use crate::bus::{Command, Outcome, PushOutcome, PushTarget};
use crate::config::SlowConsumerPolicy;
use crate::ids::{NodeId, UserId};
use crate::metrics as m;
use crate::registry::Registry;
use crate::session::delivery::Item;
use crate::session::{Budget, DeliveryConfig};
use crate::session::{CloseCmd, Enqueued, SessionHandle};
use crate::wire::{pb, Code, SharedPush};

/// What the router needs from the gateway around it (set once, after both
/// exist; a weak reference, so the two do not keep each other alive).
pub trait RouterHooks: Send + Sync {
    /// Delivery reports for pushes a session dropped or gave up.
    fn report(&self, h: &SessionHandle, items: &[Item], code: Code);
    /// Ends a session that has no connection (a kick of a detached session).
    /// Returns false if it had a connection after all.
    fn end_detached(&self, h: &SessionHandle, code: Code) -> bool;
}

/// A write delay: sessions woken by pushes are woken in batches, every
/// `delay`, so that pushes arriving in between go out in one write. Trades a
/// little latency for far fewer writes when a moderate rate of broadcasts
/// reaches many sessions (each push alone would cost one write per session).
pub struct WriteDelay {
    delay: std::time::Duration,
    wakers: parking_lot::Mutex<Vec<std::task::Waker>>,
}

impl WriteDelay {
    pub fn new(delay: std::time::Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            wakers: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Wakes `w` at the next flush.
    pub fn defer(&self, w: std::task::Waker) {
        self.wakers.lock().push(w);
    }

    /// Wakes every deferred session; returns how many.
    pub fn flush(&self) -> usize {
        let batch = std::mem::take(&mut *self.wakers.lock());
        let n = batch.len();
        batch.into_iter().for_each(std::task::Waker::wake);
        n
    }

    pub fn delay(&self) -> std::time::Duration {
        self.delay
    }
}

/// Executes commands addressed to this node.
pub struct Router {
    node: NodeId,
    registry: Arc<Registry>,
    delivery: DeliveryConfig,
    budget: Arc<Budget>,
    max_rooms: usize,
    hooks: std::sync::OnceLock<Weak<dyn RouterHooks>>,
    write_delay: std::sync::OnceLock<Arc<WriteDelay>>,
}

#[derive(Default)]
struct Tally {
    sessions: u64,
    /// Queued for a session with a connection.
    live: u64,
    dropped: u64,
    evicted: Vec<Item>,
    hooks: Option<Arc<dyn RouterHooks>>,
    delay: Option<Arc<WriteDelay>>,
}

impl Tally {
    fn new(hooks: Option<Arc<dyn RouterHooks>>, delay: Option<Arc<WriteDelay>>) -> Self {
        Self {
            sessions: 0,
            live: 0,
            dropped: 0,
            evicted: Vec::new(),
            hooks,
            delay,
        }
    }

    fn add(&mut self, h: &SessionHandle, push: &SharedPush, cfg: &DeliveryConfig, budget: &Budget) {
        let offered = match &self.delay {
            Some(d) => h.enqueue_deferred(push, cfg, budget, &mut self.evicted, d),
            None => h.enqueue(push, cfg, budget, &mut self.evicted),
        };
        match offered {
            Enqueued::Queued => {
                self.sessions += 1;
                self.live += 1;
            }
            Enqueued::Parked => self.sessions += 1,
            Enqueued::Dropped => {
                self.dropped += 1;
                metrics::counter!(m::DROPS, "policy" => "drop").increment(1);
            }
            Enqueued::SlowConsumer => {
                // Queued for the resume the session keeps its state for.
                self.sessions += 1;
                metrics::counter!(m::SLOW_CONSUMERS).increment(1);
            }
            Enqueued::Closed => {}
        }
        if !self.evicted.is_empty() {
            // A detached (or slow) session's oldest push made room: the
            // resume will show the gap; the upstream hears of it now.
            metrics::counter!(m::DROPS, "policy" => "evicted").increment(self.evicted.len() as u64);
            if let Some(hooks) = &self.hooks {
                hooks.report(h, &self.evicted, Code::DeliveryExpired);
            }
            self.evicted.clear();
        }
    }
}

impl Router {
    /// A router with default delivery settings except the interactive queue
    /// bound (charged bytes) and policy (benches and tests use it).
    pub fn new(
        node: NodeId,
        registry: Arc<Registry>,
        queue_bytes: usize,
        policy: SlowConsumerPolicy,
        max_rooms: usize,
    ) -> Self {
        let mut delivery = DeliveryConfig::default();
        delivery.queue_bytes[0] = queue_bytes;
        delivery.policy[0] = policy;
        Self::with_delivery(
            node,
            registry,
            delivery,
            Budget::new(usize::MAX / 2),
            max_rooms,
        )
    }

    pub fn with_delivery(
        node: NodeId,
        registry: Arc<Registry>,
        delivery: DeliveryConfig,
        budget: Arc<Budget>,
        max_rooms: usize,
    ) -> Self {
        Self {
            node,
            registry,
            delivery,
            budget,
            max_rooms,
            hooks: std::sync::OnceLock::new(),
            write_delay: std::sync::OnceLock::new(),
        }
    }

    /// Defers the wake-ups of pushes through `delay` (once).
    pub fn set_write_delay(&self, delay: Arc<WriteDelay>) {
        let _ = self.write_delay.set(delay);
    }

    /// Connects the router to its gateway (once).
    pub fn set_hooks(&self, hooks: Weak<dyn RouterHooks>) {
        let _ = self.hooks.set(hooks);
    }

    fn hooks(&self) -> Option<Arc<dyn RouterHooks>> {
        self.hooks.get().and_then(Weak::upgrade)
    }

    /// The node's replay budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Runs one command on this node.
    pub fn execute(&self, cmd: &Command) -> Outcome {
        match cmd {
            Command::Push { target, push } => Outcome::Push(self.push(target, push)),
            Command::Kick {
                user,
                device,
                close,
            } => {
                let mut n = 0;
                // Cloned out of the map: ending a detached session unregisters
                // it, which must not happen under the user shard's lock.
                for h in self.registry.user_sessions(user.as_str()) {
                    let hit = match device {
                        Some(d) => h.info().is_some_and(|i| &i.device == d),
                        None => true,
                    };
                    if hit {
                        let ended = h.is_detached()
                            && self.hooks().is_some_and(|k| k.end_detached(&h, close.code));
                        if !ended {
                            h.request_close(close.clone());
                        }
                        n += 1;
                    }
                }
                Outcome::Count(n)
            }
            Command::Room {
                room,
                users,
                remove,
            } => {
                let mut n = 0;
                for u in users {
                    for h in self.registry.user_sessions(u.as_str()) {
                        let changed = if *remove {
                            self.registry.leave(&h, room)
                        } else {
                            self.registry.join(&h, room, self.max_rooms).is_ok()
                        };
                        n += u64::from(changed);
                    }
                }
                metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
                Outcome::Count(n)
            }
            Command::Presence { users } => Outcome::Presence(
                users
                    .iter()
                    .map(|u| pb::UserPresence {
                        user_id: u.to_string(),
                        devices: self
                            .registry
                            .user_sessions(u.as_str())
                            .iter()
                            .filter_map(|h| h.presence(&self.node))
                            .collect(),
                    })
                    .collect(),
            ),
        }
    }

    /// Queues one push for every local session it targets.
    pub fn push(&self, target: &PushTarget, push: &SharedPush) -> PushOutcome {
        let (cap, policy) = (&self.delivery, &*self.budget);
        let mut t = Tally::new(self.hooks(), self.write_delay.get().cloned());
        let mut missing: Vec<UserId> = Vec::new();
        // A user counts as missing (undelivered) when no session of theirs has
        // a connection: pushes parked in detached sessions wait for a resume
        // that may never come, so the logic layer hears about them at once.
        let mut user = |u: &UserId, t: &mut Tally| {
            let live = t.live;
            self.registry
                .for_user(u.as_str(), |h| t.add(h, push, cap, policy));
            if t.live == live {
                missing.push(u.clone());
            }
        };
        let kind = match target {
            PushTarget::User(u) => {
                user(u, &mut t);
                "user"
            }
            PushTarget::Device(u, d) => {
                let live = t.live;
                if let Some(h) = self.registry.device(u.as_str(), d) {
                    t.add(&h, push, cap, policy);
                }
                if t.live == live {
                    missing.push(u.clone());
                }
                "device"
            }
            PushTarget::Users(us) => {
                for u in us {
                    user(u, &mut t);
                }
                "users"
            }
            PushTarget::Room(r) => {
                if let Some(room) = self.registry.room(r) {
                    room.for_each(|h| t.add(h, push, cap, policy));
                }
                "room"
            }
            PushTarget::Everyone => {
                self.registry.for_each(|h| t.add(h, push, cap, policy));
                "everyone"
            }
        };
        metrics::counter!(m::PUSHES, "target" => kind).increment(1);
        metrics::counter!(m::DELIVERIES).increment(t.sessions);
        PushOutcome {
            sessions: t.sessions,
            dropped: t.dropped,
            missing_users: missing,
        }
    }

    /// Asks every session to close with `cmd` (drain).
    pub fn close_all(&self, cmd: &CloseCmd) -> usize {
        self.registry.for_each(|h| h.request_close(cmd.clone()))
    }
}
