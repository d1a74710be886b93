//! The cluster directory: what every other node holds (its users and rooms,
//! whether it has upstream event subscribers), and whether it is alive.
//!
//! Each node publishes its own changes as numbered deltas and a heartbeat
//! every `bus.heartbeat`; every node applies the others' here. The state is
//! node-local and rebuilt from the others at any time, in the manner of
//! Phoenix.Tracker, rather than kept in a central store: a node that dies
//! takes nothing with it that another must clean up, a NATS outage leaves
//! every node serving what it knows, and routing a push costs a map lookup
//! rather than a round trip.
//!
//! Sans-IO: messages and `now` go in; routes, and the nodes whose snapshot
//! must be asked for, come out. The bus drives it (`nats/`).
//!
//! Consistency: a delta carries the node's `epoch` (its start time in Unix
//! microseconds: a restart has a larger one, and a late message of an
//! earlier run is ignored) and `seq` (1, 2, 3, ... within the epoch). A peer is *synced* when its state
//! is a snapshot plus every delta after it, in order. A missing seq (seen
//! from a later delta or from a heartbeat's seq), a new epoch or an unknown
//! node makes the peer unsynced: deltas are kept aside (bounded) while a
//! snapshot is asked for, then the ones after the snapshot's seq are
//! applied. Deltas state final presence (`added` / `removed`), so applying
//! one twice is harmless.
//!
//! An unsynced peer may hold anyone: routing sends it every user it asks
//! about (it answers which it lacks), so a resync costs messages, never a
//! false "undelivered".

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::ids::{NodeId, RoomId, UserId};
use crate::wire::pb;

/// Deltas kept aside per unsynced peer while its snapshot is on the way;
/// past it they are dropped and the snapshot is asked for again.
const MAX_BUFFERED: usize = 1024;

/// How long a node is still asked about a user it let go of: the user's
/// session may have moved to another node whose news has not come yet, and
/// the node it left knows where it went.
pub const LEFT_GRACE: Duration = Duration::from_secs(2);

/// How often a snapshot of an unsynced peer is asked for again when no
/// answer came.
pub const SNAPSHOT_RETRY: Duration = Duration::from_secs(1);

/// One other node, as this node knows it.
#[derive(Debug)]
struct Peer {
    epoch: u64,
    /// The last delta applied (synced), or the snapshot's seq.
    seq: u64,
    synced: bool,
    /// Deltas received while unsynced, applied after the snapshot.
    buffered: Vec<pb::DirectoryDelta>,
    /// When a snapshot was last asked for (unsynced only).
    asked: Option<Instant>,
    last_heard: Instant,
    users: HashSet<UserId>,
    /// Users it let go of within [`LEFT_GRACE`], oldest first.
    left: std::collections::VecDeque<(Instant, UserId)>,
    /// The same users, by id, with when they left (the latest time): a
    /// lookup per routed user, however many left lately (a rolling restart
    /// moves thousands at once).
    left_at: HashMap<UserId, Instant>,
    rooms: HashSet<RoomId>,
    subscribers: u32,
    sessions: u64,
    draining: bool,
}

impl Peer {
    fn new(epoch: u64, now: Instant) -> Self {
        Self {
            epoch,
            seq: 0,
            synced: false,
            buffered: Vec::new(),
            asked: None,
            last_heard: now,
            users: HashSet::new(),
            left: std::collections::VecDeque::new(),
            left_at: HashMap::new(),
            rooms: HashSet::new(),
            subscribers: 0,
            sessions: 0,
            draining: false,
        }
    }

    fn apply(&mut self, d: &pb::DirectoryDelta, now: Instant) {
        while self
            .left
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) >= LEFT_GRACE)
        {
            if let Some((at, u)) = self.left.pop_front() {
                // Only if it did not leave again since.
                if self.left_at.get(&u) == Some(&at) {
                    self.left_at.remove(&u);
                }
            }
        }
        for u in &d.users_added {
            self.users.insert(UserId::new(u));
        }
        for u in &d.users_removed {
            if let Some(u) = self.users.take(u.as_str()) {
                self.left_at.insert(u.clone(), now);
                self.left.push_back((now, u));
            }
        }
        for r in &d.rooms_added {
            self.rooms.insert(RoomId::new(r));
        }
        for r in &d.rooms_removed {
            self.rooms.remove(r.as_str());
        }
        self.seq = d.seq;
    }

    fn unsync(&mut self) {
        self.synced = false;
        self.asked = None;
    }
}

/// What the driver must do after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    Nothing,
    /// Ask this node for a snapshot (`<cluster>.node.<id>.snap`).
    Snapshot(NodeId),
}

/// Where a list of users lives.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Route {
    /// Other nodes and the users to ask each about.
    pub nodes: Vec<(NodeId, Vec<UserId>)>,
}

/// Every other node of the cluster, as this node knows it.
#[derive(Debug)]
pub struct Directory {
    me: NodeId,
    node_timeout: Duration,
    peers: HashMap<NodeId, Peer>,
}

/// One node's entry, for status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub node: NodeId,
    pub synced: bool,
    pub users: usize,
    pub rooms: usize,
    pub subscribers: u32,
    pub sessions: u64,
    pub draining: bool,
}

impl Directory {
    /// `node_timeout`: silence after which a node is taken for dead.
    pub fn new(me: NodeId, node_timeout: Duration) -> Self {
        Self {
            me,
            node_timeout,
            peers: HashMap::new(),
        }
    }

    /// The peer entry for `node` in `epoch`, created or reset as needed.
    /// `None` for this node's own messages (NATS echoes them).
    fn peer(&mut self, node: &str, epoch: u64, now: Instant) -> Option<&mut Peer> {
        if node == self.me.as_str() || node.is_empty() {
            return None;
        }
        let p = self
            .peers
            .entry(NodeId::new(node))
            .or_insert_with(|| Peer::new(epoch, now));
        if epoch < p.epoch {
            // A late message of the node's previous run.
            return None;
        }
        if epoch > p.epoch {
            // The node restarted: what it held before is gone.
            *p = Peer::new(epoch, now);
        }
        p.last_heard = now;
        Some(p)
    }

    /// Applies a delta of another node.
    pub fn on_delta(&mut self, d: pb::DirectoryDelta, now: Instant) -> Need {
        let node = NodeId::new(&d.node_id);
        let Some(p) = self.peer(&d.node_id, d.epoch, now) else {
            return Need::Nothing;
        };
        if p.synced {
            if d.seq <= p.seq {
                return Need::Nothing; // already applied
            }
            if d.seq == p.seq + 1 {
                p.apply(&d, now);
                return Need::Nothing;
            }
            // A gap: some deltas were lost.
            p.unsync();
        }
        if p.buffered.len() >= MAX_BUFFERED {
            // The snapshot is late; the deltas after it will be asked again.
            p.buffered.clear();
            p.asked = None;
        }
        p.buffered.push(d);
        Self::ask(&node, p, now)
    }

    /// Applies a heartbeat of another node. A `leaving` node is forgotten
    /// at once.
    pub fn on_heartbeat(&mut self, hb: &pb::Heartbeat, now: Instant) -> Need {
        if hb.leaving {
            self.peers.remove(hb.node_id.as_str());
            return Need::Nothing;
        }
        let Some(p) = self.peer(&hb.node_id, hb.epoch, now) else {
            return Need::Nothing;
        };
        p.subscribers = hb.subscribers;
        p.sessions = hb.sessions;
        p.draining = hb.draining;
        if p.synced && hb.seq > p.seq {
            // Deltas up to hb.seq were published and some never came.
            p.unsync();
        }
        if p.synced {
            return Need::Nothing;
        }
        let node = NodeId::new(&hb.node_id);
        Self::ask(&node, p, now)
    }

    /// Whether a snapshot of `p` should be asked for now.
    fn ask(node: &NodeId, p: &mut Peer, now: Instant) -> Need {
        match p.asked {
            Some(at) if now.saturating_duration_since(at) < SNAPSHOT_RETRY => Need::Nothing,
            _ => {
                p.asked = Some(now);
                Need::Snapshot(node.clone())
            }
        }
    }

    /// Applies a whole snapshot (its chunks, in any order, all of one seq)
    /// and the deltas kept aside after it. Returns `Need::Snapshot` when a
    /// gap remains between the snapshot and the deltas.
    pub fn on_snapshot(&mut self, chunks: &[pb::SnapshotChunk], now: Instant) -> Need {
        let Some(first) = chunks.first() else {
            return Need::Nothing;
        };
        let (node, epoch, seq) = (first.node_id.clone(), first.epoch, first.seq);
        if chunks.iter().any(|c| c.epoch != epoch || c.seq != seq) {
            return Need::Nothing; // mixed answers: ignore, the retry asks again
        }
        let Some(p) = self.peer(&node, epoch, now) else {
            return Need::Nothing;
        };
        if p.synced && p.seq >= seq {
            return Need::Nothing; // older than what is applied
        }
        p.users = chunks
            .iter()
            .flat_map(|c| c.users.iter().map(UserId::new))
            .collect();
        p.rooms = chunks
            .iter()
            .flat_map(|c| c.rooms.iter().map(RoomId::new))
            .collect();
        p.subscribers = first.subscribers;
        p.draining = first.draining;
        p.seq = seq;
        p.synced = true;
        p.asked = None;
        let mut buffered = std::mem::take(&mut p.buffered);
        buffered.sort_by_key(|d| d.seq);
        for d in buffered {
            if d.epoch != epoch || d.seq <= p.seq {
                continue;
            }
            if d.seq != p.seq + 1 {
                p.unsync();
                return Self::ask(&NodeId::new(&node), p, now);
            }
            p.apply(&d, now);
        }
        Need::Nothing
    }

    /// Forgets nodes silent for `node_timeout`; returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<NodeId> {
        let timeout = self.node_timeout;
        let dead: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.last_heard) >= timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &dead {
            self.peers.remove(n);
        }
        dead
    }

    /// Unsynced nodes whose snapshot should be asked for (again) now.
    pub fn due_snapshots(&mut self, now: Instant) -> Vec<NodeId> {
        let mut out = Vec::new();
        for (n, p) in &mut self.peers {
            if !p.synced {
                if let Need::Snapshot(n) = Self::ask(n, p, now) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// Counts every node as heard now: after this node was cut off from the
    /// bus, the others get `node_timeout` to be heard again before any is
    /// taken for dead.
    pub fn touch_all(&mut self, now: Instant) {
        for p in self.peers.values_mut() {
            p.last_heard = now;
        }
    }

    /// Forgets every node (this node lost the bus: what it knew is stale;
    /// heartbeats rebuild it).
    pub fn clear(&mut self) {
        self.peers.clear();
    }

    /// The other nodes to ask about `users`: those that hold them, those
    /// that let go of them within [`LEFT_GRACE`] of `now` (the session may
    /// be moving), and every unsynced node (it may hold anyone). Each user
    /// appears once per node.
    pub fn route_users<'a, I>(&self, users: I, now: Instant) -> Route
    where
        I: IntoIterator<Item = &'a UserId>,
        I::IntoIter: Clone,
    {
        let users = users.into_iter();
        let mut nodes = Vec::new();
        for (n, p) in &self.peers {
            let list: Vec<UserId> = users
                .clone()
                .filter(|u| {
                    !p.synced
                        || p.users.contains(u.as_str())
                        || p.left_at
                            .get(u.as_str())
                            .is_some_and(|at| now.saturating_duration_since(*at) < LEFT_GRACE)
                })
                .cloned()
                .collect();
            if !list.is_empty() {
                nodes.push((n.clone(), list));
            }
        }
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        Route { nodes }
    }

    /// Other nodes with members of `room` (and every unsynced node).
    pub fn room_nodes(&self, room: &RoomId) -> Vec<NodeId> {
        self.select(|p| !p.synced || p.rooms.contains(room.as_str()))
    }

    /// Every other node alive.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.select(|_| true)
    }

    fn select(&self, f: impl Fn(&Peer) -> bool) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether another node holds `user` (or may: unsynced).
    pub fn may_hold(&self, user: &str) -> bool {
        self.peers
            .values()
            .any(|p| !p.synced || p.users.contains(user))
    }

    /// Upstream event subscribers on other nodes.
    pub fn remote_subscribers(&self) -> u64 {
        self.peers.values().map(|p| u64::from(p.subscribers)).sum()
    }

    /// Nodes known, this one excluded.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// Every other node's entry, sorted by id.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> = self
            .peers
            .iter()
            .map(|(n, p)| PeerInfo {
                node: n.clone(),
                synced: p.synced,
                users: p.users.len(),
                rooms: p.rooms.len(),
                subscribers: p.subscribers,
                sessions: p.sessions,
                draining: p.draining,
            })
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn dir() -> Directory {
        Directory::new(NodeId::new("a"), Duration::from_secs(5))
    }

    fn delta(
        node: &str,
        epoch: u64,
        seq: u64,
        add: &[&str],
        remove: &[&str],
    ) -> pb::DirectoryDelta {
        pb::DirectoryDelta {
            node_id: node.into(),
            epoch,
            seq,
            users_added: add.iter().map(|s| (*s).into()).collect(),
            users_removed: remove.iter().map(|s| (*s).into()).collect(),
            ..Default::default()
        }
    }

    fn hb(node: &str, epoch: u64, seq: u64) -> pb::Heartbeat {
        pb::Heartbeat {
            node_id: node.into(),
            epoch,
            seq,
            ..Default::default()
        }
    }

    fn snap(node: &str, epoch: u64, seq: u64, users: &[&str]) -> pb::SnapshotChunk {
        pb::SnapshotChunk {
            node_id: node.into(),
            epoch,
            seq,
            index: 0,
            count: 1,
            users: users.iter().map(|s| (*s).into()).collect(),
            ..Default::default()
        }
    }

    fn users(d: &Directory, list: &[&str]) -> Vec<(String, Vec<String>)> {
        let us: Vec<UserId> = list.iter().map(UserId::new).collect();
        // Past the grace for users a node let go of (tested on its own).
        d.route_users(&us, Instant::now() + LEFT_GRACE)
            .nodes
            .into_iter()
            .map(|(n, l)| (n.to_string(), l.iter().map(ToString::to_string).collect()))
            .collect()
    }

    /// A synced peer "b" holding `held`, at seq 1.
    fn synced_b(d: &mut Directory, now: Instant, held: &[&str]) {
        assert_eq!(
            d.on_heartbeat(&hb("b", 7, 0), now),
            Need::Snapshot(NodeId::new("b"))
        );
        assert_eq!(d.on_snapshot(&[snap("b", 7, 0, &[])], now), Need::Nothing);
        assert_eq!(d.on_delta(delta("b", 7, 1, held, &[]), now), Need::Nothing);
    }

    #[test]
    fn an_unknown_node_is_asked_for_a_snapshot_and_may_hold_anyone_until_then() {
        let now = t0();
        let mut d = dir();
        assert_eq!(
            d.on_heartbeat(&hb("b", 7, 3), now),
            Need::Snapshot(NodeId::new("b"))
        );
        // Unsynced: asked about every user.
        assert_eq!(
            users(&d, &["u1", "u2"]),
            [("b".into(), vec!["u1".into(), "u2".into()])]
        );
        assert!(d.may_hold("anyone"));
        // Not asked twice within the retry interval.
        assert_eq!(d.on_heartbeat(&hb("b", 7, 3), now), Need::Nothing);
        assert_eq!(
            d.on_snapshot(&[snap("b", 7, 3, &["u1"])], now),
            Need::Nothing
        );
        assert_eq!(users(&d, &["u1", "u2"]), [("b".into(), vec!["u1".into()])]);
        assert!(!d.may_hold("u2"));
    }

    #[test]
    fn deltas_in_order_apply_and_a_gap_asks_for_a_snapshot() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &["u1"]);
        assert_eq!(
            d.on_delta(delta("b", 7, 2, &["u2"], &["u1"]), now),
            Need::Nothing
        );
        assert_eq!(users(&d, &["u1", "u2"]), [("b".into(), vec!["u2".into()])]);
        // A replayed delta changes nothing.
        assert_eq!(
            d.on_delta(delta("b", 7, 1, &["u1"], &[]), now),
            Need::Nothing
        );
        assert_eq!(users(&d, &["u1"]), Vec::<(String, Vec<String>)>::new());
        // Seq 3 lost: 4 makes the peer unsynced.
        assert_eq!(
            d.on_delta(delta("b", 7, 4, &["u4"], &[]), now),
            Need::Snapshot(NodeId::new("b"))
        );
        assert!(d.may_hold("nobody"));
        // The snapshot says seq 3 (u2, u3); delta 4 kept aside applies after it.
        assert_eq!(
            d.on_snapshot(&[snap("b", 7, 3, &["u2", "u3"])], now),
            Need::Nothing
        );
        assert_eq!(
            users(&d, &["u1", "u2", "u3", "u4"]),
            [("b".into(), vec!["u2".into(), "u3".into(), "u4".into()])]
        );
    }

    #[test]
    fn a_node_is_still_asked_about_a_user_it_let_go_of_for_a_moment() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &["u1"]);
        d.on_delta(delta("b", 7, 2, &[], &["u1"]), now);
        let us = [UserId::new("u1")];
        let asked = |t: Instant| d.route_users(&us, t).nodes.len();
        assert_eq!(asked(now + LEFT_GRACE / 2), 1, "it may know where u1 went");
        assert_eq!(asked(now + LEFT_GRACE), 0);
    }

    #[test]
    fn a_heartbeat_ahead_of_the_deltas_reveals_a_loss() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &["u1"]);
        assert_eq!(d.on_heartbeat(&hb("b", 7, 1), now), Need::Nothing);
        assert_eq!(
            d.on_heartbeat(&hb("b", 7, 2), now),
            Need::Snapshot(NodeId::new("b"))
        );
    }

    #[test]
    fn a_snapshot_with_a_gap_before_the_kept_deltas_asks_again_later() {
        let now = t0();
        let mut d = dir();
        d.on_heartbeat(&hb("b", 7, 0), now);
        // Deltas 5 and 6 arrive before the snapshot of seq 3.
        d.on_delta(delta("b", 7, 5, &["u5"], &[]), now);
        d.on_delta(delta("b", 7, 6, &["u6"], &[]), now);
        // 4 is missing: still unsynced, a newer snapshot is asked for.
        assert_eq!(
            d.on_snapshot(&[snap("b", 7, 3, &[])], now),
            Need::Snapshot(NodeId::new("b"))
        );
        assert!(d.may_hold("anyone"));
        assert!(d.due_snapshots(now).is_empty(), "just asked");
        let later = now + SNAPSHOT_RETRY;
        assert_eq!(d.due_snapshots(later), [NodeId::new("b")]);
        assert!(d.due_snapshots(later).is_empty(), "asked once per interval");
    }

    #[test]
    fn a_new_epoch_forgets_what_the_node_held() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &["u1"]);
        assert_eq!(
            d.on_heartbeat(&hb("b", 8, 0), now),
            Need::Snapshot(NodeId::new("b"))
        );
        assert_eq!(d.on_snapshot(&[snap("b", 8, 0, &[])], now), Need::Nothing);
        assert!(!d.may_hold("u1"));
        // A late snapshot of the old epoch is ignored.
        assert_eq!(
            d.on_snapshot(&[snap("b", 7, 9, &["u1"])], now),
            Need::Nothing
        );
        assert!(!d.may_hold("u1"));
    }

    #[test]
    fn silent_nodes_expire_after_the_timeout_and_leaving_ones_at_once() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &["u1"]);
        d.on_heartbeat(&hb("c", 1, 0), now + Duration::from_secs(3));
        assert!(d.expire(now + Duration::from_millis(4_999)).is_empty());
        assert_eq!(d.expire(now + Duration::from_secs(5)), [NodeId::new("b")]);
        assert_eq!(d.nodes(), [NodeId::new("c")]);
        let leave = pb::Heartbeat {
            leaving: true,
            ..hb("c", 1, 0)
        };
        d.on_heartbeat(&leave, now + Duration::from_secs(6));
        assert!(d.is_empty());
    }

    #[test]
    fn rooms_and_subscribers_route_to_the_nodes_that_have_them() {
        let now = t0();
        let mut d = dir();
        synced_b(&mut d, now, &[]);
        let mut c = delta("b", 7, 2, &[], &[]);
        c.rooms_added = vec!["lobby".into()];
        d.on_delta(c, now);
        d.on_heartbeat(&hb("c", 1, 0), now);
        d.on_snapshot(&[snap("c", 1, 0, &[])], now);
        let beat = pb::Heartbeat {
            subscribers: 2,
            ..hb("c", 1, 0)
        };
        d.on_heartbeat(&beat, now);
        assert_eq!(d.room_nodes(&RoomId::new("lobby")), [NodeId::new("b")]);
        assert!(d.room_nodes(&RoomId::new("other")).is_empty());
        assert_eq!(d.remote_subscribers(), 2);
        assert_eq!(d.nodes(), [NodeId::new("b"), NodeId::new("c")]);
    }

    #[test]
    fn own_messages_are_ignored() {
        let now = t0();
        let mut d = dir();
        assert_eq!(d.on_heartbeat(&hb("a", 1, 5), now), Need::Nothing);
        assert_eq!(
            d.on_delta(delta("a", 1, 1, &["u"], &[]), now),
            Need::Nothing
        );
        assert!(d.is_empty());
    }

    #[test]
    fn a_flood_of_deltas_while_unsynced_stays_bounded() {
        let now = t0();
        let mut d = dir();
        d.on_heartbeat(&hb("b", 7, 0), now);
        for seq in 1..=(MAX_BUFFERED as u64 * 3) {
            d.on_delta(delta("b", 7, seq, &["u"], &[]), now);
        }
        let p = d.peers.get("b").expect("b");
        assert!(p.buffered.len() <= MAX_BUFFERED);
    }
}
