//! Sharded maps of live sessions: by session id, by user, and by room.
//!
//! Lock order, to stay deadlock-free: a session's rooms lock → a `rooms` shard →
//! one room's member lock → a session's outbox lock (a leaf). Fan-out never
//! enqueues under a registry lock: it copies the handles of one session shard
//! ([`Registry::copy_shard`]) or of one room ([`Room::copy_members`]) into a
//! buffer under the read lock, releases it, and enqueues from the buffer, so
//! a broadcast to a million sessions does not hold up joins, logins and
//! closes that need those locks.
//! No guard here is ever held across an `.await`: every method is synchronous.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::config::MultiLogin;
use crate::ids::{DeviceId, RoomId, SessionId, UserId};
use crate::session::SessionHandle;
use crate::wire::Code;

/// Members of one room. Held behind an `Arc` so fan-out can release the map's
/// shard lock before walking the members.
#[derive(Default)]
pub struct Room {
    members: RwLock<HashMap<SessionId, SessionHandle>>,
}

impl Room {
    /// Calls `f` for each member, outside the room's lock (the members are
    /// copied out first).
    pub fn for_each(&self, f: impl FnMut(&SessionHandle)) -> usize {
        let mut buf = Vec::new();
        self.copy_members(&mut buf);
        buf.iter().for_each(f);
        buf.len()
    }

    /// Appends a clone of every member's handle to `out` (an `Arc` clone
    /// each) under the room's read lock, which is held for the copy only.
    /// Returns how many were appended.
    pub fn copy_members(&self, out: &mut Vec<SessionHandle>) -> usize {
        let m = self.members.read();
        out.reserve(m.len());
        out.extend(m.values().cloned());
        m.len()
    }

    pub fn len(&self) -> usize {
        self.members.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.read().is_empty()
    }
}

type Devices = SmallVec<[SessionHandle; 2]>;

/// Why [`Registry::register`] refused a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The user already has `max_devices_per_user` other devices registered
    /// on this node (detached sessions waiting for a resume count).
    #[error("too many devices for this user")]
    TooManyDevices,
}

impl RegisterError {
    /// The wire code a login refused for this reason carries.
    pub fn code(self) -> Code {
        match self {
            Self::TooManyDevices => Code::TooManyDevices,
        }
    }
}

/// Sessions by id, in shards the fan-out walks one at a time. Not a
/// `DashMap`: the fan-out needs to visit one shard, let go of it, and come
/// back for the next after an `.await`, which a map iterator cannot do.
struct SessionShards {
    shards: Box<[RwLock<HashMap<SessionId, SessionHandle>>]>,
    /// `64 - log2(shards)`: the top bits of the id's hash pick the shard.
    shift: u32,
}

impl SessionShards {
    fn new(n: usize) -> Self {
        let n = n.next_power_of_two().max(1);
        Self {
            shards: (0..n).map(|_| RwLock::default()).collect(),
            shift: 64 - n.trailing_zeros(),
        }
    }

    fn shard(&self, id: SessionId) -> &RwLock<HashMap<SessionId, SessionHandle>> {
        // Fibonacci hashing: ids are sequential, their top bits after the
        // multiplication are well spread. With one shard the shift is 64,
        // which `checked_shr` turns into index 0.
        let h = id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let i = h.checked_shr(self.shift).unwrap_or(0) as usize;
        &self.shards[i & (self.shards.len() - 1)]
    }
}

/// Told when a user gets a first session on this node or loses the last,
/// and when a room gets a first member or loses the last (the cluster bus
/// announces them). Called under the registry's shard locks, in the order
/// the changes happen for one user or room: it must only take note.
pub trait Watch: Send + Sync {
    fn user(&self, user: &UserId, present: bool);
    fn room(&self, room: &RoomId, present: bool);
}

/// All sessions of one node.
pub struct Registry {
    sessions: SessionShards,
    users: DashMap<UserId, Devices>,
    rooms: DashMap<RoomId, Arc<Room>>,
    room_count: AtomicUsize,
    watch: std::sync::OnceLock<Arc<dyn Watch>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        // 16 shards per core, at least 64, a power of two (DashMap requires it).
        let shards = (std::thread::available_parallelism().map_or(4, |n| n.get()) * 16)
            .next_power_of_two()
            .max(64);
        Self {
            sessions: SessionShards::new(shards),
            users: DashMap::with_shard_amount(shards),
            rooms: DashMap::with_shard_amount(shards),
            room_count: AtomicUsize::new(0),
            watch: std::sync::OnceLock::new(),
        }
    }

    /// Sets the watcher of users and rooms (once; later calls are ignored).
    pub fn set_watch(&self, w: Arc<dyn Watch>) {
        let _ = self.watch.set(w);
    }

    /// Every user with a session here.
    pub fn user_ids(&self) -> Vec<UserId> {
        self.users.iter().map(|e| e.key().clone()).collect()
    }

    /// Every room with a member here.
    pub fn room_ids(&self) -> Vec<RoomId> {
        self.rooms.iter().map(|e| e.key().clone()).collect()
    }

    /// Registers a logged-in session (its info must be set) and returns the
    /// sessions it replaces under `policy`, already removed from the registry.
    /// No device limit; see [`Registry::register_limited`].
    pub fn register(&self, h: &SessionHandle, policy: MultiLogin) -> Vec<SessionHandle> {
        self.register_limited(h, policy, 0).unwrap_or_default()
    }

    /// Like [`Registry::register`], but refuses a session whose user already
    /// has `max_devices` sessions of other devices on this node (0 = no
    /// limit). The check and the insert happen under the user's shard lock,
    /// so two logins of new devices at once cannot both pass it. A login of
    /// a device that is already registered replaces its session and is never
    /// refused.
    ///
    /// # Errors
    /// [`RegisterError::TooManyDevices`]; nothing was changed then.
    pub fn register_limited(
        &self,
        h: &SessionHandle,
        policy: MultiLogin,
        max_devices: usize,
    ) -> Result<Vec<SessionHandle>, RegisterError> {
        let Some(info) = h.info() else {
            return Ok(Vec::new());
        };
        let mut replaced = Vec::new();
        {
            let mut devices = self.users.entry(info.user.clone()).or_default();
            let first = devices.is_empty();
            if max_devices > 0 && policy == MultiLogin::PerDevice {
                let others = devices
                    .iter()
                    .filter(|d| d.info().is_some_and(|i| i.device != info.device))
                    .count();
                if others >= max_devices {
                    // `others >= 1`: the entry existed, nothing to clean up.
                    return Err(RegisterError::TooManyDevices);
                }
            }
            devices.retain(|old| {
                let same = match policy {
                    MultiLogin::Single => true,
                    MultiLogin::PerDevice => old.info().is_some_and(|i| i.device == info.device),
                };
                if same {
                    replaced.push(old.clone());
                }
                !same
            });
            devices.push(h.clone());
            if first {
                if let Some(w) = self.watch.get() {
                    w.user(&info.user, true);
                }
            }
        }
        self.sessions
            .shard(h.id())
            .write()
            .insert(h.id(), h.clone());
        for old in &replaced {
            self.sessions.shard(old.id()).write().remove(&old.id());
            self.leave_all(old);
        }
        Ok(replaced)
    }

    /// Removes a session from every map. Idempotent; never removes another
    /// session that took over the same device.
    pub fn unregister(&self, h: &SessionHandle) {
        self.leave_all(h);
        {
            let mut shard = self.sessions.shard(h.id()).write();
            // Absent or another handle: already removed (replaced).
            if shard.get(&h.id()).is_some_and(|v| v.ptr_eq(h)) {
                shard.remove(&h.id());
            }
        }
        if let Some(info) = h.info() {
            self.users.remove_if_mut(&info.user, |_, devices| {
                devices.retain(|d| !d.ptr_eq(h));
                let empty = devices.is_empty();
                if empty {
                    // Under the shard lock, so that a login racing with
                    // this removal is announced after it.
                    if let Some(w) = self.watch.get() {
                        w.user(&info.user, false);
                    }
                }
                empty
            });
        }
    }

    /// Adds a session to a room, O(1). Refused when the session is closing or
    /// already in `max_rooms` rooms.
    ///
    /// # Errors
    /// `CODE_TOO_MANY_ROOMS` or `CODE_NOT_LOGGED_IN` (closing session).
    pub fn join(&self, h: &SessionHandle, room: &RoomId, max_rooms: usize) -> Result<(), Code> {
        h.with_rooms(|list, closed| {
            if closed {
                return Err(Code::NotLoggedIn);
            }
            if list.contains(room) {
                return Ok(());
            }
            if list.len() >= max_rooms {
                return Err(Code::TooManyRooms);
            }
            // Exactly one more slot: most sessions are in one room or a
            // few, and joins are rare next to pushes (a doubling Vec would
            // hold 4 slots, 48 bytes more, for a session in one room).
            list.reserve_exact(1);
            list.push(room.clone());
            let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
                self.room_count.fetch_add(1, Ordering::Relaxed);
                if let Some(w) = self.watch.get() {
                    w.room(room, true);
                }
                Arc::default()
            });
            entry.members.write().insert(h.id(), h.clone());
            Ok(())
        })
    }

    /// Removes a session from a room, O(1). Returns whether it was a member.
    pub fn leave(&self, h: &SessionHandle, room: &RoomId) -> bool {
        let was = h.with_rooms(|list, _| {
            let before = list.len();
            list.retain(|r| r != room);
            before != list.len()
        });
        if was {
            self.remove_member(h.id(), room);
        }
        was
    }

    fn leave_all(&self, h: &SessionHandle) {
        for room in h.take_rooms() {
            self.remove_member(h.id(), &room);
        }
    }

    fn remove_member(&self, id: SessionId, room: &RoomId) {
        let removed = self.rooms.remove_if(room, |_, r| {
            let mut m = r.members.write();
            m.remove(&id);
            let empty = m.is_empty();
            if empty {
                if let Some(w) = self.watch.get() {
                    w.room(room, false);
                }
            }
            empty
        });
        if removed.is_some() {
            self.room_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The room, if it has members.
    pub fn room(&self, room: &RoomId) -> Option<Arc<Room>> {
        self.rooms.get(room).map(|r| r.value().clone())
    }

    /// Calls `f` for each live session of `user` (under the user shard's read lock).
    pub fn for_user(&self, user: &str, mut f: impl FnMut(&SessionHandle)) -> usize {
        match self.users.get(user) {
            Some(devices) => {
                devices.iter().for_each(&mut f);
                devices.len()
            }
            None => 0,
        }
    }

    /// How many sessions `user` has (a map lookup, nothing cloned).
    pub fn device_count(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |d| d.len())
    }

    /// The live session of one device of a user.
    pub fn device(&self, user: &str, device: &DeviceId) -> Option<SessionHandle> {
        let devices = self.users.get(user)?;
        devices
            .iter()
            .find(|h| h.info().is_some_and(|i| &i.device == device))
            .cloned()
    }

    /// Live sessions of `user`, cloned out of the map.
    pub fn user_sessions(&self, user: &str) -> Vec<SessionHandle> {
        self.users.get(user).map(|d| d.to_vec()).unwrap_or_default()
    }

    /// Calls `f` for every logged-in session, one shard at a time, outside
    /// the shard's lock (each shard's handles are copied out first).
    pub fn for_each(&self, mut f: impl FnMut(&SessionHandle)) -> usize {
        let mut buf = Vec::new();
        let mut n = 0;
        for i in 0..self.shard_count() {
            buf.clear();
            n += self.copy_shard(i, &mut buf);
            buf.iter().for_each(&mut f);
        }
        n
    }

    /// How many session shards [`Registry::copy_shard`] takes.
    pub fn shard_count(&self) -> usize {
        self.sessions.shards.len()
    }

    /// Appends a clone of the handle of every session in shard `i` to `out`
    /// under the shard's read lock, held for the copy only; returns how many.
    /// A shard index out of range appends nothing.
    pub fn copy_shard(&self, i: usize, out: &mut Vec<SessionHandle>) -> usize {
        let Some(shard) = self.sessions.shards.get(i) else {
            return 0;
        };
        let m = shard.read();
        out.reserve(m.len());
        out.extend(m.values().cloned());
        m.len()
    }

    pub fn session(&self, id: SessionId) -> Option<SessionHandle> {
        self.sessions.shard(id).read().get(&id).cloned()
    }

    /// Logged-in sessions.
    pub fn len(&self) -> usize {
        self.sessions.shards.iter().map(|s| s.read().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.shards.iter().all(|s| s.read().is_empty())
    }

    /// Users with at least one live session.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.room_count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TransportKind;
    use crate::session::SessionInfo;
    use crate::wire::pb::Platform;

    fn session(id: u64, user: &str, device: &str) -> SessionHandle {
        let h = SessionHandle::new(SessionId(id));
        h.set_info(SessionInfo {
            user: UserId::new(user),
            device: DeviceId::new(device),
            platform: Platform::Ios,
            transport: TransportKind::Memory,
            since_ms: 0,
        });
        h
    }

    #[test]
    fn same_device_replaces_other_devices_stay() {
        let r = Registry::new();
        let a = session(1, "alice", "phone");
        let b = session(2, "alice", "laptop");
        assert!(r.register(&a, MultiLogin::PerDevice).is_empty());
        assert!(r.register(&b, MultiLogin::PerDevice).is_empty());
        let a2 = session(3, "alice", "phone");
        let replaced = r.register(&a2, MultiLogin::PerDevice);
        assert_eq!(replaced.len(), 1);
        assert!(replaced[0].ptr_eq(&a));
        assert_eq!(r.for_user("alice", |_| {}), 2);
        // The old session's late unregister must not remove the new one.
        r.unregister(&a);
        assert_eq!(r.len(), 2);
        assert!(r
            .device("alice", &DeviceId::new("phone"))
            .unwrap()
            .ptr_eq(&a2));
    }

    #[test]
    fn single_policy_replaces_all() {
        let r = Registry::new();
        r.register(&session(1, "bob", "a"), MultiLogin::Single);
        r.register(&session(2, "bob", "b"), MultiLogin::Single);
        assert_eq!(r.for_user("bob", |_| {}), 1);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn rooms_join_leave_and_cleanup() {
        let r = Registry::new();
        let a = session(1, "a", "d");
        let b = session(2, "b", "d");
        r.register(&a, MultiLogin::PerDevice);
        r.register(&b, MultiLogin::PerDevice);
        let lobby = RoomId::new("lobby");
        r.join(&a, &lobby, 8).unwrap();
        r.join(&b, &lobby, 8).unwrap();
        r.join(&b, &lobby, 8).unwrap(); // idempotent
        assert_eq!(r.room(&lobby).unwrap().len(), 2);
        assert_eq!(r.join(&a, &RoomId::new("x"), 1), Err(Code::TooManyRooms));
        assert!(r.leave(&a, &lobby));
        assert!(!r.leave(&a, &lobby));
        r.unregister(&b);
        assert!(r.room(&lobby).is_none());
        assert_eq!(r.room_count(), 0);
        assert_eq!(r.join(&b, &lobby, 8), Err(Code::NotLoggedIn));
        assert_eq!(r.user_count(), 1);
    }

    #[test]
    fn device_limit_refuses_a_new_device_but_not_a_known_one() {
        let r = Registry::new();
        let p = MultiLogin::PerDevice;
        assert!(r.register_limited(&session(1, "al", "a"), p, 2).is_ok());
        assert!(r.register_limited(&session(2, "al", "b"), p, 2).is_ok());
        assert_eq!(
            r.register_limited(&session(3, "al", "c"), p, 2).err(),
            Some(RegisterError::TooManyDevices)
        );
        assert_eq!(r.len(), 2, "a refused session is not registered");
        // The same device logging in again replaces its session.
        let replaced = r.register_limited(&session(4, "al", "a"), p, 2).unwrap();
        assert_eq!(replaced.len(), 1);
        // Another user is not affected; 0 means no limit.
        assert!(r.register_limited(&session(5, "bo", "c"), p, 2).is_ok());
        assert!(r.register_limited(&session(6, "al", "c"), p, 0).is_ok());
        assert_eq!(r.for_user("al", |_| {}), 3);
    }

    #[test]
    fn shards_hold_every_session_once() {
        let r = Registry::new();
        for i in 1..=1000 {
            r.register(&session(i, &format!("u{i}"), "d"), MultiLogin::PerDevice);
        }
        let mut buf = Vec::new();
        let n: usize = (0..r.shard_count())
            .map(|i| r.copy_shard(i, &mut buf))
            .sum();
        assert_eq!((n, buf.len(), r.len()), (1000, 1000, 1000));
        let mut ids: Vec<u64> = buf.iter().map(|h| h.id().0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 1000);
        assert!(r.session(SessionId(500)).is_some());
        assert_eq!(r.copy_shard(r.shard_count(), &mut buf), 0);
    }
}
