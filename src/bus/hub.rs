//! The event hub: events from this node's sessions fan out to the upstream
//! connections subscribed to them, one bounded queue per subscriber, one
//! member of each group per event.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::mpsc;

use super::EventFrame;
use crate::metrics as m;
use crate::wire::{frame_bytes, pb};

/// Bounds of one subscriber's event queue: whichever is reached first makes
/// the queue full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Events queued at most (`upstream.event_queue`).
    pub events: usize,
    /// Bytes of encoded event frames queued at most
    /// (`upstream.event_queue_bytes`). An event larger than this is never
    /// queued.
    pub bytes: usize,
}

/// Event kinds, for drop accounting: a small fixed set, used as the `kind`
/// label of `tether_upstream_events_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Uplink,
    Opened,
    Closed,
    Undelivered,
    Delivery,
    /// An event without a kind (none is emitted today).
    Other,
}

/// Kinds counted per subscriber and reported in `EventsDropped` notices
/// (every kind but [`EventKind::Other`]).
const NOTICE_KINDS: usize = 5;

impl EventKind {
    pub fn of(event: &pb::Event) -> Self {
        use pb::event::Kind as K;
        match &event.kind {
            Some(K::Uplink(_)) => Self::Uplink,
            Some(K::Opened(_)) => Self::Opened,
            Some(K::Closed(_)) => Self::Closed,
            Some(K::Undelivered(_)) => Self::Undelivered,
            Some(K::Delivery(_)) => Self::Delivery,
            Some(K::Dropped(_)) | None => Self::Other,
        }
    }

    /// The kind a metric label names ([`EventKind::label`]'s inverse).
    pub fn from_label(s: &str) -> Self {
        match s {
            "uplink" => Self::Uplink,
            "opened" => Self::Opened,
            "closed" => Self::Closed,
            "undelivered" => Self::Undelivered,
            "delivery" => Self::Delivery,
            _ => Self::Other,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Uplink => "uplink",
            Self::Opened => "opened",
            Self::Closed => "closed",
            Self::Undelivered => "undelivered",
            Self::Delivery => "delivery",
            Self::Other => "other",
        }
    }

    fn notice_index(self) -> Option<usize> {
        match self {
            Self::Uplink => Some(0),
            Self::Opened => Some(1),
            Self::Closed => Some(2),
            Self::Undelivered => Some(3),
            Self::Delivery => Some(4),
            Self::Other => None,
        }
    }
}

/// One subscriber's queue accounting, shared by the hub (which fills the
/// queue) and the [`Subscription`] (which empties it). Atomics only: the hub
/// updates it under its read lock from many session tasks at once.
#[derive(Default)]
struct Queue {
    max_bytes: usize,
    /// Bytes of the encoded frames now in the channel.
    bytes: AtomicUsize,
    /// Events lost since the last notice, by [`EventKind::notice_index`].
    lost: [AtomicU64; NOTICE_KINDS],
}

impl Queue {
    /// Reserves room for `len` bytes; false when the byte bound would be
    /// passed.
    fn reserve(&self, len: usize) -> bool {
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(len).filter(|n| *n <= self.max_bytes)
            })
            .is_ok()
    }

    fn release(&self, len: usize) {
        self.bytes.fetch_sub(len, Ordering::AcqRel);
    }

    fn lose(&self, kind: EventKind) {
        if let Some(i) = kind.notice_index() {
            self.lost[i].fetch_add(1, Ordering::Relaxed);
        }
        metrics::counter!(m::UPSTREAM_EVENTS_DROPPED, "kind" => kind.label()).increment(1);
    }

    /// Takes the lost counts (swapping them to zero, so that the consumer
    /// and the producers never report one loss twice).
    fn take_lost(&self) -> Option<[u64; NOTICE_KINDS]> {
        if self.lost.iter().all(|n| n.load(Ordering::Relaxed) == 0) {
            return None;
        }
        let n: [u64; NOTICE_KINDS] =
            std::array::from_fn(|i| self.lost[i].swap(0, Ordering::AcqRel));
        n.iter().any(|&x| x > 0).then_some(n)
    }

    /// Puts counts taken by [`Queue::take_lost`] back (their notice did not fit).
    fn restore_lost(&self, n: &[u64; NOTICE_KINDS]) {
        for (c, v) in self.lost.iter().zip(n) {
            c.fetch_add(*v, Ordering::Relaxed);
        }
    }
}

/// The `EventsDropped` notice for `n` lost events.
fn notice(n: &[u64; NOTICE_KINDS]) -> EventFrame {
    EventFrame(frame_bytes(&pb::GatewayFrame {
        request_id: 0,
        body: Some(pb::gateway_frame::Body::Event(pb::Event {
            kind: Some(pb::event::Kind::Dropped(pb::EventsDropped {
                uplinks: n[0],
                opened: n[1],
                closed: n[2],
                undelivered: n[3],
                delivery: n[4],
            })),
        })),
    }))
}

struct Subscriber {
    id: u64,
    group: String,
    tx: mpsc::Sender<EventFrame>,
    queue: Arc<Queue>,
}

impl Subscriber {
    /// Queues `frame` if both bounds allow it. Losses since the last notice
    /// go first, as an `EventsDropped` notice, so that it arrives where the
    /// gap is; the notice is queued only with an event behind it, so a stuck
    /// queue never fills up with notices.
    fn offer(&self, frame: &EventFrame) -> bool {
        let lost = self.queue.take_lost();
        let notice = lost.as_ref().map(notice);
        let len = frame.0.len() + notice.as_ref().map_or(0, |n| n.0.len());
        let permits = if self.queue.reserve(len) {
            match &notice {
                None => self.tx.try_reserve().map(|p| (None, p)).ok(),
                // Dropping the first permit when the second fails releases it.
                Some(_) => self
                    .tx
                    .try_reserve()
                    .and_then(|a| self.tx.try_reserve().map(|b| (Some(a), b)))
                    .ok(),
            }
        } else {
            if let Some(n) = &lost {
                self.queue.restore_lost(n);
            }
            return false;
        };
        match permits {
            Some((first, second)) => {
                if let (Some(p), Some(n)) = (first, notice) {
                    p.send(n);
                }
                second.send(frame.clone());
                true
            }
            None => {
                self.queue.release(len);
                if let Some(n) = &lost {
                    self.queue.restore_lost(n);
                }
                false
            }
        }
    }
}

/// Upstream subscribers of this process, grouped for load balancing.
#[derive(Default)]
pub struct EventHub {
    subs: RwLock<Vec<Subscriber>>,
    next_id: AtomicUsize,
    rr: AtomicUsize,
    /// Woken when a subscriber comes or goes (the cluster bus follows the
    /// groups present here).
    changed: tokio::sync::Notify,
}

/// Which of a hub's subscribers an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Every ungrouped subscriber and one member of each group (one node).
    All,
    /// Every ungrouped subscriber only (a cluster: groups get theirs
    /// through their own NATS queue group).
    Ungrouped,
    /// One member of this group only.
    Group(&'a str),
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<EventFrame>,
    queue: Arc<Queue>,
    hub: Arc<EventHub>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.subs.write().retain(|s| s.id != self.id);
        self.hub.changed.notify_waiters();
    }
}

impl Subscription {
    /// The next event frame. When the queue is empty and events were lost
    /// since the last notice, an `EventsDropped` notice comes first: the
    /// subscriber has caught up and learns what it missed. `None` once the
    /// hub is gone.
    ///
    /// # Cancel safety
    /// Cancel safe: a frame is taken from the queue only in the poll that
    /// returns it.
    pub async fn recv(&mut self) -> Option<EventFrame> {
        if let Some(f) = self.try_recv() {
            return Some(f);
        }
        let f = self.rx.recv().await?;
        self.queue.release(f.0.len());
        Some(f)
    }

    /// Like [`Subscription::recv`], without waiting.
    pub fn try_recv(&mut self) -> Option<EventFrame> {
        match self.rx.try_recv() {
            Ok(f) => {
                self.queue.release(f.0.len());
                Some(f)
            }
            Err(_) => self.queue.take_lost().map(|n| notice(&n)),
        }
    }

    /// Bytes of encoded events waiting in this subscription's queue.
    pub fn queued_bytes(&self) -> usize {
        self.queue.bytes.load(Ordering::Acquire)
    }
}

impl EventHub {
    pub fn subscribe(self: &Arc<Self>, group: &str, limits: QueueLimits) -> Subscription {
        let (tx, rx) = mpsc::channel(limits.events.max(1));
        let queue = Arc::new(Queue {
            max_bytes: limits.bytes.max(1),
            ..Queue::default()
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) as u64;
        self.subs.write().push(Subscriber {
            id,
            group: group.to_owned(),
            tx,
            queue: queue.clone(),
        });
        self.changed.notify_waiters();
        Subscription {
            rx,
            queue,
            hub: self.clone(),
            id,
        }
    }

    /// Sends one event to every ungrouped subscriber and to one member of each
    /// group (round robin, skipping full members). Encodes it once. A loss is
    /// counted once per ungrouped subscriber whose queue is full, and once per
    /// group whose members are all full (told to the first full member).
    pub fn publish(&self, event: pb::Event) -> bool {
        if self.subs.read().is_empty() {
            return false;
        }
        let kind = EventKind::of(&event);
        let frame = EventFrame(frame_bytes(&pb::GatewayFrame {
            request_id: 0,
            body: Some(pb::gateway_frame::Body::Event(event)),
        }));
        self.deliver(kind, &frame, Scope::All)
    }

    /// Offers an encoded event to the subscribers `scope` names: each
    /// ungrouped one, and one member of each group (round robin, skipping
    /// full members). Returns whether any took it.
    pub fn deliver(&self, kind: EventKind, frame: &EventFrame, scope: Scope<'_>) -> bool {
        let subs = self.subs.read();
        let mut accepted = false;
        // Groups that took the event, and groups with a full member (the
        // first one, by index).
        let mut served: Vec<&str> = Vec::new();
        let mut full: Vec<(&str, usize)> = Vec::new();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = subs.len();
        for i in 0..n {
            let at = (start + i) % n;
            let s = &subs[at];
            let grouped = !s.group.is_empty();
            let wanted = match scope {
                Scope::All => true,
                Scope::Ungrouped => !grouped,
                Scope::Group(g) => grouped && s.group == g,
            };
            if !wanted || (grouped && served.contains(&s.group.as_str())) {
                continue;
            }
            if s.offer(frame) {
                accepted = true;
                if grouped {
                    served.push(&s.group);
                }
            } else if !grouped {
                s.queue.lose(kind);
            } else if !full.iter().any(|(g, _)| *g == s.group) {
                // A full member of a group: another member may still take it.
                full.push((&s.group, at));
            }
        }
        for &(g, at) in &full {
            if !served.contains(&g) {
                subs[at].queue.lose(kind);
            }
        }
        if !accepted && matches!(scope, Scope::Group(_)) && full.is_empty() {
            // The group's last member here left while the event was on its
            // way (it may have been this node's last subscriber: `n` is 0
            // then): nobody here can be told, count it.
            metrics::counter!(m::UPSTREAM_EVENTS_DROPPED, "kind" => kind.label()).increment(1);
        }
        accepted
    }

    /// How many ungrouped subscribers there are, and the groups with at
    /// least one member.
    pub fn groups(&self) -> (usize, Vec<String>) {
        let subs = self.subs.read();
        let mut groups: Vec<String> = Vec::new();
        let mut ungrouped = 0;
        for s in subs.iter() {
            if s.group.is_empty() {
                ungrouped += 1;
            } else if !groups.contains(&s.group) {
                groups.push(s.group.clone());
            }
        }
        (ungrouped, groups)
    }

    /// Woken (all waiters) when a subscriber comes or goes.
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    pub fn subscribers(&self) -> usize {
        self.subs.read().len()
    }

    /// Bytes of encoded events queued for all subscribers.
    pub fn queued_bytes(&self) -> usize {
        self.subs
            .read()
            .iter()
            .map(|s| s.queue.bytes.load(Ordering::Acquire))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(events: usize) -> QueueLimits {
        QueueLimits {
            events,
            bytes: 1 << 20,
        }
    }

    fn ev() -> pb::Event {
        pb::Event {
            kind: Some(pb::event::Kind::Undelivered(pb::Undelivered::default())),
        }
    }

    #[tokio::test]
    async fn groups_share_and_ungrouped_get_all() {
        let hub = Arc::new(EventHub::default());
        let mut a1 = hub.subscribe("logic", limits(16));
        let mut a2 = hub.subscribe("logic", limits(16));
        let mut solo = hub.subscribe("", limits(16));
        for _ in 0..10 {
            assert!(hub.publish(ev()));
        }
        let count = |s: &mut Subscription| {
            let mut n = 0;
            while s.try_recv().is_some() {
                n += 1;
            }
            n
        };
        let (n1, n2, ns) = (count(&mut a1), count(&mut a2), count(&mut solo));
        assert_eq!(n1 + n2, 10, "each event goes to one member of the group");
        assert!(n1 > 0 && n2 > 0, "round robin uses both members: {n1} {n2}");
        assert_eq!(ns, 10);
    }

    #[tokio::test]
    async fn a_full_member_leaves_the_event_to_another() {
        let hub = Arc::new(EventHub::default());
        let mut small = hub.subscribe("g", limits(1));
        let mut big = hub.subscribe("g", limits(64));
        for _ in 0..20 {
            assert!(hub.publish(ev()));
        }
        let mut n = 0;
        while small.try_recv().is_some() {
            n += 1;
        }
        while big.try_recv().is_some() {
            n += 1;
        }
        assert_eq!(n, 20, "nothing is lost while one member has room");
        drop(small);
        drop(big);
        assert!(!hub.publish(ev()), "no subscriber: not accepted");
    }

    fn uplink(payload: usize) -> pb::Event {
        pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                payload: vec![0u8; payload].into(),
                ..Default::default()
            })),
        }
    }

    fn decode(f: &EventFrame) -> pb::event::Kind {
        use prost::Message;
        let body = crate::wire::decode_frame(&mut bytes::BytesMut::from(&f.0[..]), usize::MAX)
            .expect("a frame")
            .expect("a whole frame");
        match pb::GatewayFrame::decode(body).expect("a GatewayFrame").body {
            Some(pb::gateway_frame::Body::Event(e)) => e.kind.expect("a kind"),
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_byte_bound_drops_and_a_notice_tells_the_subscriber() {
        let hub = Arc::new(EventHub::default());
        let mut s = hub.subscribe(
            "",
            QueueLimits {
                events: 1_000,
                bytes: 10_000,
            },
        );
        for _ in 0..10 {
            hub.publish(uplink(3_000));
        }
        assert!(s.queued_bytes() <= 10_000, "{}", s.queued_bytes());
        assert_eq!(hub.queued_bytes(), s.queued_bytes());
        let mut uplinks = 0;
        let mut lost = 0;
        while let Some(f) = s.try_recv() {
            match decode(&f) {
                pb::event::Kind::Uplink(_) => uplinks += 1,
                pb::event::Kind::Dropped(d) => lost += d.uplinks,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(uplinks, 3, "three 3 kB frames fit in 10 kB");
        assert_eq!(lost, 7, "the other seven are reported once caught up");
        assert_eq!(s.queued_bytes(), 0);
        assert!(s.try_recv().is_none(), "a loss is reported once");
    }

    #[tokio::test]
    async fn a_notice_is_queued_where_the_gap_is() {
        let hub = Arc::new(EventHub::default());
        let mut s = hub.subscribe("", limits(3));
        let up = |i: usize| pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                client_msg_id: i.to_string(),
                ..Default::default()
            })),
        };
        for i in 0..5 {
            hub.publish(up(i));
        }
        // Three queued, two lost. The consumer takes two, which makes room
        // for the notice and the next event.
        for _ in 0..2 {
            assert!(matches!(
                decode(&s.try_recv().unwrap()),
                pb::event::Kind::Uplink(_)
            ));
        }
        hub.publish(up(5));
        let kinds: Vec<_> = std::iter::from_fn(|| s.try_recv())
            .map(|f| match decode(&f) {
                pb::event::Kind::Uplink(u) => format!("uplink {}", u.client_msg_id),
                pb::event::Kind::Dropped(d) => format!("dropped {}", d.uplinks),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["uplink 2", "dropped 2", "uplink 5"]);
    }
}
