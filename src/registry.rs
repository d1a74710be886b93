//! Sharded maps of live sessions: by session id, by user, and by room.
//!
//! Lock order, to stay deadlock-free: a session's rooms lock → a `rooms` shard →
//! one room's member lock → a session's outbox lock (a leaf). Fan-out takes a
//! room's read lock and then outbox locks; it never takes a rooms lock.
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
    /// Calls `f` for each member under the room's read lock.
    pub fn for_each(&self, mut f: impl FnMut(&SessionHandle)) -> usize {
        let m = self.members.read();
        m.values().for_each(&mut f);
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

/// All sessions of one node.
pub struct Registry {
    sessions: DashMap<SessionId, SessionHandle>,
    users: DashMap<UserId, Devices>,
    rooms: DashMap<RoomId, Arc<Room>>,
    room_count: AtomicUsize,
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
            sessions: DashMap::with_shard_amount(shards),
            users: DashMap::with_shard_amount(shards),
            rooms: DashMap::with_shard_amount(shards),
            room_count: AtomicUsize::new(0),
        }
    }

    /// Registers a logged-in session (its info must be set) and returns the
    /// sessions it replaces under `policy`, already removed from the registry.
    pub fn register(&self, h: &SessionHandle, policy: MultiLogin) -> Vec<SessionHandle> {
        let Some(info) = h.info() else {
            return Vec::new();
        };
        let mut replaced = Vec::new();
        {
            let mut devices = self.users.entry(info.user.clone()).or_default();
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
        }
        self.sessions.insert(h.id(), h.clone());
        for old in &replaced {
            self.sessions.remove(&old.id());
            self.leave_all(old);
        }
        replaced
    }

    /// Removes a session from every map. Idempotent; never removes another
    /// session that took over the same device.
    pub fn unregister(&self, h: &SessionHandle) {
        self.leave_all(h);
        if self
            .sessions
            .remove_if(&h.id(), |_, v| v.ptr_eq(h))
            .is_none()
        {
            // Already removed (replaced); the user entry no longer holds it either.
        }
        if let Some(info) = h.info() {
            self.users.remove_if_mut(&info.user, |_, devices| {
                devices.retain(|d| !d.ptr_eq(h));
                devices.is_empty()
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
            list.push(room.clone());
            let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
                self.room_count.fetch_add(1, Ordering::Relaxed);
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
            m.is_empty()
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

    /// Calls `f` for every logged-in session, one shard at a time.
    pub fn for_each(&self, mut f: impl FnMut(&SessionHandle)) -> usize {
        let mut n = 0;
        for e in self.sessions.iter() {
            f(e.value());
            n += 1;
        }
        n
    }

    pub fn session(&self, id: SessionId) -> Option<SessionHandle> {
        self.sessions.get(&id).map(|e| e.value().clone())
    }

    /// Logged-in sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
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
}
