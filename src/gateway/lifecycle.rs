//! A session's life across connections: a connection opened, settled
//! (logged in or gone), ended; detaching for a resume, the map of detached
//! sessions in deadline order ([`DetachQueue`]) and its sweep, ending a
//! session for good, and the delivery reports and session events sent
//! upstream on the way.

use std::collections::VecDeque;
use std::time::Instant;

use super::accept::refusal;
use super::Gateway;
use crate::ids::SessionId;
use crate::metrics as m;
use crate::session::delivery::Item;
use crate::session::{keeps_state, End, SessionHandle};
use crate::wire::{pb, Code};

impl Gateway {
    /// Sessions waiting for a resume.
    pub fn detached_count(&self) -> usize {
        self.detached.len()
    }

    /// A connection was accepted (it is not logged in yet). Beyond
    /// `limits.max_pending_logins` it is asked to close at once with
    /// `CODE_TOO_MANY_CONNECTIONS` (plain TCP is refused before this, at
    /// accept; this catches TLS connections that finished their handshake
    /// meanwhile, and in-memory ones).
    pub fn connection_opened(&self, h: &SessionHandle) {
        if let Err(code) = self.limits.acquire_pending() {
            metrics::counter!(m::PENDING_LOGINS_REFUSED).increment(1);
            metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => code.as_str_name()).increment(1);
            h.request_close(refusal(code));
            return;
        }
        self.pending.insert(h.id(), h.clone());
        if self.is_draining() {
            h.request_close(self.drain_close());
        }
    }

    /// A connection logged in or ended: it is no longer pending.
    pub fn connection_settled(&self, h: &SessionHandle) {
        self.takes.remove(&h.id());
        if self.pending.remove(&h.id()).is_some() {
            self.limits.release_pending();
        }
    }

    /// Emits delivery reports for the pushes in `items` that asked for them.
    pub fn report(&self, h: &SessionHandle, items: &[Item], code: Code) {
        let mut info = None;
        for it in items {
            let Some(id) = &it.push.report else { continue };
            let session = info.get_or_insert_with(|| self.session_info(h)).clone();
            self.bus.emit(pb::Event {
                kind: Some(pb::event::Kind::Delivery(pb::DeliveryReport {
                    message_id: id.to_string(),
                    session,
                    lane: it.push.lane as i32,
                    seq: it.seq,
                    code: code as i32,
                })),
            });
        }
    }

    /// The connection of generation `gen` of a registered session ended with
    /// `code`: detach the session for a resume, or end it.
    pub fn connection_ended(&self, h: &SessionHandle, gen: u32, code: Code) {
        let window = self.cfg.delivery.resume_window;
        // A draining node of a cluster keeps every session for a resume on
        // another node (start_drain asked for it); one node ends them.
        let keep = if self.hands_over() && self.is_draining() {
            keeps_state(code) || code == Code::ServerDraining
        } else {
            keeps_state(code) && !self.is_draining()
        };
        if keep && !window.is_zero() && h.detach(gen) {
            {
                // The deadline is taken under the queue's lock, so the queue
                // stays in deadline order (the window is the same for all).
                let mut q = self.expiry.lock();
                let deadline = self.now() + window;
                q.push(deadline, h.id());
                self.detached.insert(h.id(), (h.clone(), deadline));
            }
            self.emit_closed(h, code);
            return;
        }
        self.end_session(h, End::Gen(gen), code);
    }

    /// Ends a session for good: unregister, report what was never acknowledged,
    /// and tell the upstream.
    pub(super) fn end_session(&self, h: &SessionHandle, which: End, code: Code) -> bool {
        let mut left = Vec::new();
        if !h.close_outbox(which, &self.budget, &mut left) {
            return false;
        }
        self.detached.remove(&h.id());
        self.registry.unregister(h);
        self.report(h, &left, Code::DeliveryExpired);
        metrics::gauge!(m::SESSIONS).decrement(1.0);
        metrics::gauge!(m::ROOMS).set(self.registry.room_count() as f64);
        self.emit_closed(h, code);
        true
    }

    /// Ends detached sessions whose resume window passed; returns how many.
    /// Visits only the entries whose deadline passed, not every detached
    /// session.
    pub fn sweep_detached(&self, now: Instant) -> usize {
        let mut due = Vec::new();
        self.expiry.lock().pop_due(now, &mut due);
        let expired: Vec<SessionHandle> = due
            .iter()
            .filter_map(|id| self.detached.get(id).map(|e| e.value().0.clone()))
            .collect();
        let mut ended = 0;
        for h in &expired {
            // The deadline is read again: the session may have been resumed
            // and dropped again since. Ending it is atomic with a resume
            // (End::Detached is checked under the session's lock).
            let due = self
                .detached
                .get(&h.id())
                .is_some_and(|e| now >= e.value().1);
            if due && self.end_session(h, End::Detached, Code::ResumeExpired) {
                ended += 1;
            }
            self.detached
                .remove_if(&h.id(), |_, (d, _)| !d.is_detached());
        }
        metrics::gauge!(m::REPLAY_BYTES).set(self.budget.used() as f64);
        metrics::gauge!(m::DETACHED).set(self.detached.len() as f64);
        ended
    }

    fn emit_closed(&self, h: &SessionHandle, code: Code) {
        let reason = match code {
            Code::NormalClose => "closed".to_owned(),
            c => c.as_str_name().to_owned(),
        };
        self.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Closed(pb::SessionClosed {
                session: self.session_info(h),
                code: code as i32,
                reason,
            })),
        });
    }

    pub(super) fn session_info(&self, h: &SessionHandle) -> Option<pb::SessionInfo> {
        let i = h.info()?;
        Some(pb::SessionInfo {
            user_id: i.user.to_string(),
            device_id: i.device.to_string(),
            session_id: h.id().0,
            node_id: self.node.to_string(),
            platform: i.platform as i32,
            transport: h.transport().as_str().into(),
        })
    }
}

/// Detached sessions in the order their resume windows end. The window is
/// the same for every session and deadlines are taken under the queue's
/// lock, so pushing at the back keeps the queue sorted and a sweep pops only
/// what is due. A session resumed (or ended) since it was pushed leaves a
/// stale entry that the sweep skips when it comes up; entries are bounded
/// by the detaches of one resume window.
#[derive(Default)]
pub(super) struct DetachQueue {
    q: VecDeque<(Instant, SessionId)>,
}

impl DetachQueue {
    pub(super) fn push(&mut self, deadline: Instant, id: SessionId) {
        self.q.push_back((deadline, id));
    }

    /// Every id queued, oldest first (stale entries and repeats included).
    pub(super) fn ids(&self) -> Vec<SessionId> {
        self.q.iter().map(|&(_, id)| id).collect()
    }

    /// Moves the ids whose deadline is at or before `now` into `out`.
    pub(super) fn pop_due(&mut self, now: Instant, out: &mut Vec<SessionId>) {
        while let Some(&(deadline, id)) = self.q.front() {
            if deadline > now {
                break;
            }
            self.q.pop_front();
            out.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn detach_queue_pops_only_what_is_due_in_order() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut q = DetachQueue::default();
        for i in 0..5u64 {
            q.push(t0 + s * (i as u32), SessionId(i));
        }
        let mut out = Vec::new();
        q.pop_due(t0 + s * 2, &mut out);
        assert_eq!(out, [SessionId(0), SessionId(1), SessionId(2)]);
        assert_eq!(q.q.len(), 2, "later deadlines are not touched");
        out.clear();
        q.pop_due(t0 + s * 2, &mut out);
        assert!(out.is_empty());
        q.pop_due(t0 + s * 10, &mut out);
        assert_eq!(out, [SessionId(3), SessionId(4)]);
    }
}
