//! Keeping the directory in step across the cluster: this node's
//! heartbeats and deltas (gathered by the `Announcer` from the registry),
//! the others' applied to its `Directory`, and snapshots asked for and
//! served.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Inner, DELTA_DELAY};
use crate::bus::directory::Need;
use crate::ids::{NodeId, RoomId, UserId};
use crate::metrics as m;
use crate::registry::Watch;
use crate::wire::pb;

/// Entries per delta or snapshot chunk: well under NATS's 1 MB payload.
const MAX_ENTRIES: usize = 4096;

/// The changes of this node's holdings not yet announced.
#[derive(Default)]
struct Pending {
    users: HashMap<UserId, bool>,
    rooms: HashMap<RoomId, bool>,
}

/// Gathers the registry's changes for the next delta (the registry calls it
/// under its shard locks: a map insert, nothing more).
#[derive(Default)]
pub(super) struct Announcer {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Watch for Announcer {
    fn user(&self, user: &UserId, present: bool) {
        self.pending.lock().users.insert(user.clone(), present);
        self.notify.notify_one();
    }

    fn room(&self, room: &RoomId, present: bool) {
        self.pending.lock().rooms.insert(room.clone(), present);
        self.notify.notify_one();
    }
}

impl Inner {
    pub(super) fn heartbeat(&self, leaving: bool) -> pb::DirectoryMessage {
        pb::DirectoryMessage {
            body: Some(pb::directory_message::Body::Heartbeat(pb::Heartbeat {
                node_id: self.node.to_string(),
                epoch: self.epoch,
                seq: self.seq.load(Ordering::Acquire),
                subscribers: u32::try_from(self.hub.subscribers()).unwrap_or(u32::MAX),
                sessions: self.registry.len() as u64,
                draining: self.draining.load(Ordering::Relaxed),
                leaving,
                sent_unix_ms: crate::unix_ms(),
            })),
        }
    }

    pub(super) async fn publish_dir(&self, msg: pb::DirectoryMessage) -> Result<(), String> {
        let subject = format!("{}.dir", self.prefix);
        self.client
            .publish(subject, msg.encode_to_vec().into())
            .await
            .map_err(|e| e.to_string())
    }

    /// Publishes this node's changes (gathered for [`DELTA_DELAY`]) and a
    /// heartbeat every `bus.heartbeat`; takes silent nodes for dead and asks
    /// again for the snapshots that did not come.
    pub(super) async fn announce(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.opts.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.announcer.notify.notified() => {
                    tokio::time::sleep(DELTA_DELAY).await;
                    self.publish_deltas().await;
                }
                () = self.beat_now.notified() => {
                    self.publish_deltas().await;
                    let _ = self.publish_dir(self.heartbeat(false)).await;
                }
                _ = tick.tick() => {
                    let _ = self.publish_dir(self.heartbeat(false)).await;
                    self.housekeeping();
                }
            }
        }
    }

    fn housekeeping(self: &Arc<Self>) {
        let now = Instant::now().into_std();
        let (dead, due) = {
            let mut dir = self.dir.write();
            // Silence while this node is cut off says nothing of the others.
            let dead = if self.is_up() {
                dir.expire(now)
            } else {
                Vec::new()
            };
            (dead, dir.due_snapshots(now))
        };
        for n in dead {
            tracing::warn!(node = %n, "cluster: node silent for {:?}, taken for dead", self.opts.node_timeout);
        }
        metrics::gauge!(m::CLUSTER_NODES).set((self.dir.read().len() + 1) as f64);
        for n in due {
            tokio::spawn(self.clone().fetch_snapshot(n));
        }
    }

    async fn publish_deltas(&self) {
        let Pending { users, rooms } = std::mem::take(&mut *self.announcer.pending.lock());
        if users.is_empty() && rooms.is_empty() {
            return;
        }
        let mut d = pb::DirectoryDelta::default();
        let entries = users
            .into_iter()
            .map(|(u, p)| (true, u.to_string(), p))
            .chain(rooms.into_iter().map(|(r, p)| (false, r.to_string(), p)));
        let mut n = 0;
        for (is_user, id, present) in entries {
            match (is_user, present) {
                (true, true) => d.users_added.push(id),
                (true, false) => d.users_removed.push(id),
                (false, true) => d.rooms_added.push(id),
                (false, false) => d.rooms_removed.push(id),
            }
            n += 1;
            if n == MAX_ENTRIES {
                self.send_delta(std::mem::take(&mut d)).await;
                n = 0;
            }
        }
        if n > 0 {
            self.send_delta(d).await;
        }
    }

    async fn send_delta(&self, mut d: pb::DirectoryDelta) {
        d.node_id = self.node.to_string();
        d.epoch = self.epoch;
        // One task publishes deltas: seqs go out in order.
        d.seq = self.seq.load(Ordering::Acquire) + 1;
        let msg = pb::DirectoryMessage {
            body: Some(pb::directory_message::Body::Delta(d)),
        };
        // Counted as published even when the connection is down: the
        // others then see a gap in the seqs and ask for a snapshot.
        let _ = self.publish_dir(msg).await;
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) async fn follow_directory(self: Arc<Self>) {
        let subject = format!("{}.dir", self.prefix);
        let mut sub = match self.client.subscribe(subject.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cluster bus: cannot subscribe to {subject}: {e}");
                return;
            }
        };
        while let Some(msg) = sub.next().await {
            let Ok(m) = pb::DirectoryMessage::decode(msg.payload) else {
                tracing::warn!("cluster bus: a directory message that does not decode");
                continue;
            };
            let now = Instant::now().into_std();
            let need = {
                let mut dir = self.dir.write();
                match m.body {
                    Some(pb::directory_message::Body::Delta(d)) => dir.on_delta(d, now),
                    Some(pb::directory_message::Body::Heartbeat(h)) => {
                        self.check_clock(&h);
                        let before = dir.len();
                        let need = dir.on_heartbeat(&h, now);
                        if dir.len() > before {
                            tracing::info!(node = %h.node_id, "cluster: node joined");
                        }
                        need
                    }
                    None => Need::Nothing,
                }
            };
            if let Need::Snapshot(n) = need {
                tokio::spawn(self.clone().fetch_snapshot(n));
            }
        }
    }

    /// Warns (at most once a minute per node) when another node's clock
    /// is ahead of this one's by more than half of
    /// [`CLOCK_MARGIN`](super::requests::CLOCK_MARGIN): that node then
    /// takes this one's pushes for later than they are, and refuses them as
    /// past their deadline once the difference passes the margin. (A clock
    /// behind cannot be told from a heartbeat that took long: the node
    /// behind warns about the one ahead.)
    fn check_clock(&self, h: &pb::Heartbeat) {
        if h.sent_unix_ms == 0 || h.node_id == self.node.as_str() {
            return;
        }
        let margin = super::requests::CLOCK_MARGIN.as_millis() as u64;
        let Some(ahead) = ahead_by(h.sent_unix_ms, crate::unix_ms(), margin / 2) else {
            return;
        };
        let now = Instant::now();
        let mut warned = self.clock_warned.lock();
        if warned.len() > 1024 {
            warned.clear();
        }
        if let Some(last) = warned.get(&h.node_id) {
            if now.duration_since(*last) < std::time::Duration::from_secs(60) {
                return;
            }
        }
        warned.insert(h.node_id.clone(), now);
        tracing::warn!(
            node = %h.node_id,
            ahead_ms = ahead,
            "cluster: that node's clock is ahead of this one's: keep the nodes' clocks within \
             a second (NTP), or pushes between them are refused as past their deadline"
        );
    }

    /// Asks `node` for its whole state and applies it (again while a gap
    /// remains after the deltas kept aside).
    async fn fetch_snapshot(self: Arc<Self>, node: NodeId) {
        for _ in 0..3 {
            let Some(chunks) = self.snapshot_of(&node).await else {
                return; // asked again on a later heartbeat
            };
            let need = self
                .dir
                .write()
                .on_snapshot(&chunks, Instant::now().into_std());
            if need == Need::Nothing {
                return;
            }
        }
    }

    async fn snapshot_of(&self, node: &NodeId) -> Option<Vec<pb::SnapshotChunk>> {
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await.ok()?;
        let subject = self.subject(node, "snap");
        self.client
            .publish_with_reply(subject, inbox, Bytes::new())
            .await
            .ok()?;
        let mut chunks: Vec<pb::SnapshotChunk> = Vec::new();
        let deadline = tokio::time::sleep(self.opts.request_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return None,
                m = sub.next() => {
                    let c = pb::SnapshotChunk::decode(m?.payload).ok()?;
                    let count = c.count as usize;
                    chunks.push(c);
                    if chunks.len() >= count {
                        return Some(chunks);
                    }
                }
            }
        }
    }

    /// Answers snapshot requests with this node's users and rooms.
    pub(super) async fn serve_snapshots(self: Arc<Self>) {
        let subject = self.subject(&self.node, "snap");
        let Ok(mut sub) = self.client.subscribe(subject).await else {
            return;
        };
        while let Some(msg) = sub.next().await {
            let Some(reply) = msg.reply else { continue };
            // Every delta up to `seq` was made before the maps are read
            // below, so the maps hold them (and perhaps later changes, which
            // later deltas repeat).
            let seq = self.seq.load(Ordering::Acquire);
            let users = self.registry.user_ids();
            let rooms = self.registry.room_ids();
            let count =
                (users.len().div_ceil(MAX_ENTRIES) + rooms.len().div_ceil(MAX_ENTRIES)).max(1);
            let chunk = |index: usize, users: &[UserId], rooms: &[RoomId]| pb::SnapshotChunk {
                node_id: self.node.to_string(),
                epoch: self.epoch,
                seq,
                index: index as u32,
                count: count as u32,
                users: users.iter().map(ToString::to_string).collect(),
                rooms: rooms.iter().map(ToString::to_string).collect(),
                subscribers: u32::try_from(self.hub.subscribers()).unwrap_or(u32::MAX),
                draining: self.draining.load(Ordering::Relaxed),
            };
            let mut out = Vec::with_capacity(count);
            for c in users.chunks(MAX_ENTRIES) {
                out.push(chunk(out.len(), c, &[]));
            }
            for c in rooms.chunks(MAX_ENTRIES) {
                out.push(chunk(out.len(), &[], c));
            }
            if out.is_empty() {
                out.push(chunk(0, &[], &[]));
            }
            for c in out {
                let _ = self
                    .client
                    .publish(reply.clone(), c.encode_to_vec().into())
                    .await;
            }
        }
    }
}

/// How far a clock that read `sent_ms` when `now_ms` was read here is
/// ahead of this one, if by more than `beyond_ms`.
fn ahead_by(sent_ms: u64, now_ms: u64, beyond_ms: u64) -> Option<u64> {
    sent_ms
        .checked_sub(now_ms)
        .filter(|ahead| *ahead > beyond_ms)
}

#[cfg(test)]
mod tests {
    use super::ahead_by;

    #[test]
    fn only_a_clock_ahead_by_more_than_the_margin_is_reported() {
        assert_eq!(ahead_by(10_000, 9_000, 500), Some(1_000));
        assert_eq!(ahead_by(10_000, 9_600, 500), None, "within the margin");
        // Behind, or a heartbeat that took long: indistinguishable, silent.
        assert_eq!(ahead_by(9_000, 10_000, 500), None);
        assert_eq!(ahead_by(0, u64::MAX, 500), None);
    }
}
