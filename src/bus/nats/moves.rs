//! Sessions that move between nodes: the node a session left remembers
//! where it went and sends on the pushes that missed it (`hints`) until
//! the new node says it is in place; the node it moves to holds pushes
//! back while it fetches one (`TakeGuard`, `settle_takes`); and the
//! handover itself (`answer_take`, which the command link runs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use prost::Message as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::Inner;
use crate::bus::{codec, Command, PushOutcome, PushTarget};
use crate::ids::{DeviceId, NodeId, RoomId, SessionId, UserId};
use crate::wire::{pb, Code};

/// How long a node remembers where a session moved: longer than the
/// directory takes to tell every node (a delta, tens of milliseconds).
const MOVED_FOR: Duration = Duration::from_secs(10);

/// How long after a session left this node a room push or a broadcast that
/// missed it here is sent on to its new node: such a push may have reached
/// the new node before the session did (the planner's own share runs at
/// once, and the take overtakes a command waiting in a batch), and it ran
/// here within `request_timeout` of running there.
#[must_use]
pub(super) fn forward_window(request_timeout: Duration) -> Duration {
    MOVED_FOR.min(request_timeout * 2)
}

/// How long the node a session moved to must remember the pushes it holds
/// (`Router::remember_moved_for`, which the gateway calls with this), so
/// that a copy of one sent on for the session is recognised if it came
/// already. A copy is sent on for a push that reached the old node within
/// [`MOVED_FOR`] of the move, and it runs here before its request's
/// deadline, at most `request_timeout` after the push was first taken in,
/// or not at all (`expired` in requests.rs, with
/// [`CLOCK_MARGIN`](super::requests::CLOCK_MARGIN) for the clocks): this
/// bound holds however slow the nodes are.
#[must_use]
pub fn moved_memory(request_timeout: Duration) -> Duration {
    MOVED_FOR + request_timeout + super::requests::CLOCK_MARGIN
}

/// Where a session that left this node went.
#[derive(Clone)]
pub(super) struct MovedTo {
    device: DeviceId,
    node: NodeId,
    at: Instant,
    /// The rooms it was in.
    rooms: Vec<RoomId>,
    /// Set once the new node says the session is in place there.
    pub(super) installed: Arc<(AtomicBool, Notify)>,
    /// The session, as sent, until the new node says it is in place: a
    /// take of the same session by the same node (its first answer came
    /// after its deadline, and it asked again) gets the same state, where
    /// it would otherwise find the session gone and the device lose it.
    session: SessionId,
    sent: Option<Arc<Vec<bytes::Bytes>>>,
}

/// How long a push that missed a moved session waits for its new node to
/// say the session is in place, before it is sent on anyway (at most a
/// quarter of `bus.request_timeout`, so that the asking node still hears).
const INSTALL_WAIT: Duration = Duration::from_millis(250);

/// A session being fetched from another node
/// ([`NatsBus::begin_take`](super::NatsBus::begin_take)): pushes wait for
/// it to be in place (or dropped) before they run here.
pub struct TakeGuard(pub(super) Arc<Inner>, pub(super) u64);

impl Drop for TakeGuard {
    fn drop(&mut self) {
        self.0.takes.lock().remove(&self.1);
        self.0.takes_done.notify_waiters();
    }
}

impl Inner {
    /// The answer to a take (`P.node.<id>.take`, heard on the command
    /// link): the session's state in chunks, sent before if the same node
    /// asked already, or a refusal.
    pub(super) fn answer_take(&self, payload: bytes::Bytes) -> Vec<bytes::Bytes> {
        match pb::TakeRequest::decode(payload) {
            Ok(t) if !t.user_id.is_empty() && t.user_id.len() <= 128 => {
                let sessions = self.sessions.get().and_then(std::sync::Weak::upgrade);
                let device = crate::wire::device(&t.device_id);
                let to =
                    crate::config::bus::is_subject(&t.from_node).then(|| NodeId::new(&t.from_node));
                match (sessions, device, to) {
                    (Some(s), Ok(d), Some(to)) => {
                        let u = UserId::new(&t.user_id);
                        let id = SessionId(t.session_id);
                        match self.sent_before(id, &u, &d, &to) {
                            Some(sent) => sent.to_vec(),
                            None => match self.take_noting(&*s, id, &u, &d, &to) {
                                Ok(m) => self.keep_sent(id, &u, &d, &to, codec::encode_moved(&m)),
                                Err(code) => vec![codec::encode_refusal(code)],
                            },
                        }
                    }
                    _ => vec![codec::encode_refusal(Code::ResumeExpired)],
                }
            }
            _ => vec![codec::encode_refusal(Code::BadRequest)],
        }
    }

    /// Ends the session `id` here for its move to `to`, noting where it
    /// went. The note and the take are one step under the `moved` lock, so
    /// that a push that misses the session here (it found it ended, or
    /// gone) always finds the note, with its rooms.
    fn take_noting(
        &self,
        sessions: &dyn crate::bus::Sessions,
        id: SessionId,
        user: &UserId,
        device: &DeviceId,
        to: &NodeId,
    ) -> Result<crate::session::Moved, Code> {
        let now = Instant::now();
        let mut m = self.moved.lock();
        m.retain(|_, v| {
            v.retain(|t| now.duration_since(t.at) < MOVED_FOR);
            !v.is_empty()
        });
        let taken = sessions.take(id, user, device);
        if let Ok(s) = &taken {
            m.entry(user.clone()).or_default().push(MovedTo {
                device: device.clone(),
                node: to.clone(),
                at: now,
                rooms: s.rooms.clone(),
                installed: Arc::default(),
                session: id,
                sent: None,
            });
        }
        self.moved_count.store(m.len(), Ordering::Relaxed);
        taken
    }

    /// Keeps `sent`, the encoded state of session `id` just taken for
    /// `to`, in its note until `to` says it is in place; returns it to be
    /// sent. Encoded outside the `moved` lock, which pushes take; takes run
    /// one at a time (on the command link), so no repeated take of it can
    /// come in between.
    fn keep_sent(
        &self,
        id: SessionId,
        user: &UserId,
        device: &DeviceId,
        to: &NodeId,
        sent: Vec<bytes::Bytes>,
    ) -> Vec<bytes::Bytes> {
        let sent = Arc::new(sent);
        let mut m = self.moved.lock();
        let note = m.get_mut(user).and_then(|v| {
            v.iter_mut()
                .rev()
                .find(|t| t.session == id && &t.device == device && &t.node == to)
        });
        if let Some(t) = note {
            if !t.installed.0.load(Ordering::Acquire) {
                t.sent = Some(sent.clone());
            }
        }
        drop(m);
        Arc::unwrap_or_clone(sent)
    }

    /// The state sent for session `id` to `to` a moment ago, if `to` has
    /// not said it is in place yet: `to` asks again (see
    /// [`MovedTo::sent`]).
    fn sent_before(
        &self,
        id: SessionId,
        user: &UserId,
        device: &DeviceId,
        to: &NodeId,
    ) -> Option<Arc<Vec<bytes::Bytes>>> {
        let m = self.moved.lock();
        m.get(user)?
            .iter()
            .rev()
            .find(|t| t.session == id && &t.device == device && &t.node == to)
            .filter(|t| t.at.elapsed() < MOVED_FOR && !t.installed.0.load(Ordering::Acquire))
            .and_then(|t| t.sent.clone())
    }

    /// Adds to a push's outcome here the sessions it missed because they
    /// moved to another node a moment ago: those it found ended, the moved
    /// devices of users it found nowhere, and, for a room push or a
    /// broadcast, the sessions of that room (or all) that left within
    /// [`forward_window`]. A push queued before the move went with the
    /// session; one that missed it is sent on, and the new node queues it
    /// unless the session holds it already (`Router::note_brought`).
    /// Before a push runs here: waits (at most a quarter of the request
    /// timeout) for the sessions being fetched from other nodes to be in
    /// place. A push that reaches the node a session leaves after it left,
    /// and this node before it arrived, would otherwise miss it on both; a
    /// push it brought with it is not queued twice (the session remembers
    /// what it brought).
    ///
    /// Only the fetches under way when the push arrived are waited for, so
    /// that a stream of moves (a rolling restart) never holds pushes back
    /// for longer than one fetch.
    ///
    /// A push to one device whose session this node is fetching (the node
    /// it left sent it on) waits for that fetch longer: until a quarter of
    /// `bus.request_timeout` before its request's deadline `until` (ms
    /// since the Unix epoch; 0: none). Under load a take can take seconds,
    /// and the push would otherwise find no session here and be reported
    /// undelivered while the device is on its way.
    pub(super) async fn settle_takes(&self, cmd: &Command, until: u64) {
        let upto = self.take_seq.load(Ordering::Acquire);
        let pending = |upto: u64| {
            self.takes
                .lock()
                .first_key_value()
                .is_some_and(|(&f, _)| f <= upto)
        };
        if !pending(upto) {
            return;
        }
        let quarter = self.opts.request_timeout / 4;
        let mine = match cmd {
            Command::Push {
                target: PushTarget::Device(u, d),
                ..
            } => Some((u, d)),
            _ => None,
        };
        let fetching = |u: &UserId, d: &DeviceId| {
            self.takes
                .lock()
                .values()
                .any(|(tu, td)| tu == u && td == d)
        };
        if let Some((u, d)) = mine.filter(|(u, d)| fetching(u, d)) {
            let left_ms = until.saturating_sub(crate::unix_ms());
            let patience = Duration::from_millis(left_ms).saturating_sub(quarter);
            self.wait_takes(patience, || !fetching(u, d)).await;
            return;
        }
        self.wait_takes(INSTALL_WAIT.min(quarter), || !pending(upto))
            .await;
    }

    /// Waits (at most `patience`) until `done` holds, looking again each
    /// time a fetch ends.
    async fn wait_takes(&self, patience: Duration, done: impl Fn() -> bool) {
        let _ = tokio::time::timeout(patience, async {
            loop {
                let ended = self.takes_done.notified();
                if done() {
                    return;
                }
                ended.await;
            }
        })
        .await;
    }

    /// Waits (up to [`INSTALL_WAIT`]) until the nodes these sessions went
    /// to have them in place, so that the push sent on finds them.
    pub(super) async fn hints(&self, cmd: &Command, o: &mut PushOutcome) {
        let waits = self.note_hints(cmd, o);
        let patience = INSTALL_WAIT.min(self.opts.request_timeout / 4);
        let all = futures_util::future::join_all(waits.iter().map(|w| async move {
            let notified = w.1.notified();
            if !w.0.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(patience, notified).await;
            }
        }));
        all.await;
    }

    fn note_hints(&self, cmd: &Command, o: &mut PushOutcome) -> Vec<Arc<(AtomicBool, Notify)>> {
        let closed = std::mem::take(&mut o.closed);
        let mut waits = Vec::new();
        if self.moved_count.load(Ordering::Relaxed) == 0 {
            return waits;
        }
        let Command::Push { target, .. } = cmd else {
            return waits;
        };
        let only = match target {
            PushTarget::Device(_, d) => Some(d),
            _ => None,
        };
        let now = Instant::now();
        let m = self.moved.lock();
        let fresh = |t: &MovedTo| now.duration_since(t.at) < MOVED_FOR;
        let mut hint = |u: &UserId, t: &MovedTo| {
            let h = (u.clone(), t.device.clone(), t.node.clone());
            if !o.moved.contains(&h) {
                o.moved.push(h);
                waits.push(t.installed.clone());
            }
        };
        for (u, d) in &closed {
            if let Some(t) = m
                .get(u)
                .and_then(|v| v.iter().rev().find(|t| &t.device == d && fresh(t)))
            {
                hint(u, t);
            }
        }
        for u in &o.missing_users {
            for t in m.get(u).map(Vec::as_slice).unwrap_or_default() {
                if fresh(t) && only.is_none_or(|x| x == &t.device) {
                    hint(u, t);
                }
            }
        }
        let room = match target {
            PushTarget::Room(r) => Some(Some(r)),
            PushTarget::Everyone => Some(None),
            _ => None,
        };
        if let Some(room) = room {
            let window = forward_window(self.opts.request_timeout);
            for (u, v) in m.iter() {
                for t in v {
                    let member = room.is_none_or(|r| t.rooms.contains(r));
                    if member && now.duration_since(t.at) < window {
                        hint(u, t);
                    }
                }
            }
        }
        waits
    }

    /// Marks a session that moved from here as in place on its new node.
    fn installed(&self, user: &str, device: &str, node: &str) {
        let mut m = self.moved.lock();
        for t in m.get_mut(user).map(Vec::as_mut_slice).unwrap_or_default() {
            if t.device.as_str() == device && t.node.as_str() == node {
                t.installed.0.store(true, Ordering::Release);
                t.installed.1.notify_waiters();
                t.sent = None;
            }
        }
    }

    /// Hears from the nodes sessions moved to that they are in place.
    pub(super) async fn follow_installs(self: Arc<Self>) {
        let Ok(mut sub) = self
            .client
            .subscribe(self.subject(&self.node, "moved"))
            .await
        else {
            return;
        };
        while let Some(msg) = sub.next().await {
            if let Ok(m) = pb::MovedSession::decode(msg.payload) {
                self.installed(&m.user_id, &m.device_id, &m.node_id);
            }
        }
    }
}
