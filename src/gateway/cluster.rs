//! Sessions that move between the nodes of a cluster.
//!
//! A device that reconnects to another node resumes there with the token
//! its old node gave it. The token names that node ([`resume::token_node`]),
//! so before the `Login` runs, the connection asks this node to fetch the
//! session ([`Gateway::await_take`]): the old node ends it there (its
//! connection, if still attached, is superseded) and sends its whole state
//! ([`SessionHandle::take_for_move`]); this node rebuilds it as a detached
//! session with the same id ([`Gateway::install`]). The `Login` then runs as
//! any resume does and replays exactly what the client lacks, or reports
//! the gap. A fetch that fails (the node is gone, the session expired)
//! leaves the `Login` to find no session: `CODE_RESUME_EXPIRED`.
//!
//! [`resume::token_node`]: super::resume::token_node

use prost::Message as _;

use super::resume::token_node;
use super::Gateway;
use crate::ids::{DeviceId, NodeId, SessionId, UserId};
use crate::metrics as m;
use crate::session::{Moved, SessionHandle};
use crate::wire::{pb, Code};

/// A fetch of another node's session for a connection of this one.
pub(super) enum Take {
    /// Under way; the connection holds its `Login` until it ends.
    Pending,
    /// Over (installed or failed): the `Login` runs now.
    Done,
}

impl crate::bus::Sessions for Gateway {
    fn take(&self, id: SessionId, user: &UserId, device: &DeviceId) -> Result<Moved, Code> {
        let h = self.registry.session(id).ok_or(Code::ResumeExpired)?;
        if !h
            .info()
            .is_some_and(|i| &i.user == user && &i.device == device)
        {
            return Err(Code::ResumeRejected);
        }
        let moved = h
            .take_for_move(self.now(), &self.budget)
            .ok_or(Code::ResumeExpired)?;
        self.detached.remove(&id);
        self.registry.unregister(&h);
        metrics::gauge!(m::SESSIONS).decrement(1.0);
        metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
        metrics::counter!(m::SESSIONS_MOVED, "direction" => "out").increment(1);
        Ok(moved)
    }
}

impl Gateway {
    /// Rebuilds a session moved from another node, detached, under its id.
    ///
    /// # Errors
    /// `CODE_RESUME_EXPIRED` when a session here has the same id.
    fn install(&self, id: SessionId, moved: Moved) -> Result<(), Code> {
        if self.registry.session(id).is_some() {
            return Err(Code::ResumeExpired);
        }
        let rooms = moved.rooms.clone();
        let bodies = moved
            .delivery
            .lanes
            .iter()
            .flat_map(|l| l.items.iter().map(|(_, _, p)| &p.body[..]));
        self.router.note_brought(id, bodies, self.now());
        let h = SessionHandle::restore(id, moved, self.now(), &self.delivery, &self.budget);
        let replaced = self.registry.register(&h, self.cfg.session.multi_login);
        for old in replaced {
            old.request_close(crate::session::CloseCmd::new(
                Code::Replaced,
                "this device resumed on another connection",
            ));
            self.end_session(&old, crate::session::End::Detached, Code::Replaced);
        }
        for r in &rooms {
            let _ = self
                .registry
                .join(&h, r, self.cfg.session.max_rooms as usize);
        }
        {
            let mut q = self.expiry.lock();
            let deadline = self.now() + self.cfg.delivery.resume_window;
            q.push(deadline, id);
            self.detached.insert(id, (h, deadline));
        }
        metrics::gauge!(m::SESSIONS).increment(1.0);
        metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
        metrics::counter!(m::SESSIONS_MOVED, "direction" => "in").increment(1);
        Ok(())
    }

    /// Called with each frame a connection receives before it logs in:
    /// whether it must hold `body` (a `Login` resuming a session another
    /// node holds) while that session is fetched. The connection is woken
    /// when the fetch is over, and offers the frame again.
    pub(super) fn await_take(&self, conn: &SessionHandle, body: &[u8]) -> bool {
        let Some(cluster) = self.cluster.clone() else {
            return false;
        };
        let Some(gw) = self.me.get().and_then(std::sync::Weak::upgrade) else {
            return false; // the gateway is going away
        };
        match self
            .takes
            .get(&conn.id())
            .map(|t| matches!(*t, Take::Pending))
        {
            Some(true) => return true,
            Some(false) => {
                self.takes.remove(&conn.id());
                return false;
            }
            None => {}
        }
        let Ok(pb::ClientFrame {
            body: Some(pb::client_frame::Body::Login(login)),
            ..
        }) = pb::ClientFrame::decode(body)
        else {
            return false;
        };
        let Some(r) = login.resume.filter(|r| r.session_id != 0) else {
            return false;
        };
        let id = SessionId(r.session_id);
        let Some(node) = token_node(&r.resume_token) else {
            return false;
        };
        if node == self.node.as_str() || self.registry.session(id).is_some() {
            return false; // a resume here: the Login runs as it is
        }
        // Who asks: the token must be this user's (a signature check, as
        // the Login will make again), and the resume token must be one the
        // cluster signed for that user and device.
        let Ok(device) = crate::wire::device(&login.device_id) else {
            return false;
        };
        let Ok(identity) = self.verifier.verify(&login.token, &device) else {
            return false;
        };
        let (user, device) = (identity.user, identity.device);
        let Some(node) = self
            .verify_token(&r.resume_token, id, user.as_str(), device.as_str())
            .map(NodeId::new)
        else {
            return false;
        };
        self.takes.insert(conn.id(), Take::Pending);
        let conn = conn.clone();
        let guard = cluster.begin_take(&user, &device);
        tokio::spawn(async move {
            let got = cluster.fetch_session(&node, id, &user, &device).await;
            let result = match got {
                Ok(moved) => gw.install(id, moved),
                Err(code) => Err(code),
            };
            drop(guard);
            if result.is_ok() {
                cluster.confirm_moved(&node, &user, &device).await;
            }
            let label = match &result {
                Ok(()) => "ok",
                Err(c) => c.as_str_name(),
            };
            metrics::counter!(m::SESSION_TAKES, "result" => label).increment(1);
            if let Err(code) = result {
                tracing::debug!(%node, session = %id, ?code, "no session to resume from another node");
            }
            // Unless the connection is gone meanwhile (its entry with it).
            if let Some(mut t) = gw.takes.get_mut(&conn.id()) {
                *t = Take::Done;
            }
            conn.wake();
        });
        true
    }
}
