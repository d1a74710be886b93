//! Upstream events across the cluster: published on the event subjects
//! (queued while the connection is busy), and subscribed to as this
//! node's upstream subscribers and groups require.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Inner, EVENT_QUEUE_BYTES};
use crate::bus::hub::Scope;
use crate::bus::{EventFrame, EventKind};
use crate::metrics as m;
use crate::wire::{frame_bytes, pb};

impl Inner {
    pub(super) fn emit(&self, event: pb::Event) -> bool {
        if !self.is_up() {
            // Cut off: this node's own subscribers still get its events.
            return self.hub.publish(event);
        }
        if self.hub.subscribers() == 0 && self.dir.read().remote_subscribers() == 0 {
            return false;
        }
        let kind = EventKind::of(&event);
        let frame = frame_bytes(&pb::GatewayFrame {
            request_id: 0,
            body: Some(pb::gateway_frame::Body::Event(event)),
        });
        let len = frame.len();
        let room = self
            .event_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                b.checked_add(len).filter(|n| *n <= EVENT_QUEUE_BYTES)
            })
            .is_ok();
        if room && self.events.try_send((kind, frame)).is_ok() {
            return true;
        }
        if room {
            self.event_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        metrics::counter!(m::UPSTREAM_EVENTS_DROPPED, "kind" => kind.label()).increment(1);
        false
    }

    pub(super) async fn send_events(self: Arc<Self>, mut rx: mpsc::Receiver<(EventKind, Bytes)>) {
        while let Some((kind, frame)) = rx.recv().await {
            self.event_bytes.fetch_sub(frame.len(), Ordering::AcqRel);
            let subject = format!("{}.ev.{}", self.prefix, kind.label());
            let _ = self.client.publish(subject, frame).await;
        }
    }

    /// Keeps this node's NATS event subscriptions in step with its upstream
    /// subscribers: a plain one while it has ungrouped subscribers, one per
    /// group with local members (a NATS queue group, shared cluster-wide).
    pub(super) async fn follow_subscribers(self: Arc<Self>) {
        let mut plain: Option<CancellationToken> = None;
        let mut groups: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let changed = self.hub.changed().notified();
            let (ungrouped, wanted) = self.hub.groups();
            let wanted: HashSet<String> = wanted.into_iter().collect();
            if ungrouped > 0 && plain.is_none() {
                plain = self.clone().deliver_events(None).await;
            } else if ungrouped == 0 {
                if let Some(t) = plain.take() {
                    t.cancel();
                }
            }
            groups.retain(|g, t| {
                let keep = wanted.contains(g);
                if !keep {
                    t.cancel();
                }
                keep
            });
            for g in wanted {
                if let std::collections::hash_map::Entry::Vacant(e) = groups.entry(g) {
                    let g = e.key().clone();
                    if let Some(t) = self.clone().deliver_events(Some(g)).await {
                        e.insert(t);
                    }
                }
            }
            // A change is visible to the others at the next heartbeat;
            // send one now.
            self.beat_now.notify_one();
            changed.await;
        }
    }

    /// Subscribes to the event subjects (as a member of `group`'s queue
    /// group when given) and hands what arrives to the local hub.
    async fn deliver_events(self: Arc<Self>, group: Option<String>) -> Option<CancellationToken> {
        let subject = format!("{}.ev.*", self.prefix);
        let sub = match &group {
            // Hex: a group name may hold characters a NATS queue name may not.
            Some(g) => {
                let q = format!("g{}", hex(g.as_bytes()));
                self.client.queue_subscribe(subject, q).await
            }
            None => self.client.subscribe(subject).await,
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cluster bus: cannot subscribe to events: {e}");
                return None;
            }
        };
        // A child of the bus's own: when the bus stops, so do deliveries.
        let stop = self.stop.child_token();
        let done = stop.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    () = done.cancelled() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let kind = msg
                    .subject
                    .rsplit('.')
                    .next()
                    .map_or(EventKind::Other, EventKind::from_label);
                let scope = match &group {
                    Some(g) => Scope::Group(g),
                    None => Scope::Ungrouped,
                };
                self.hub.deliver(kind, &EventFrame(msg.payload), scope);
            }
            let _ = sub.unsubscribe().await;
        });
        Some(stop)
    }
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}
