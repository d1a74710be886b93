//! The drain: refuse new logins, and ask every connection (logged in or
//! not) to close with `CODE_SERVER_DRAINING` and a reconnect hint. One node
//! ends its sessions; a node of a cluster keeps them, detached, for their
//! devices to resume on other nodes, which take them over.

use std::sync::atomic::Ordering;

use super::Gateway;
use crate::session::{CloseCmd, End, SessionHandle};
use crate::wire::Code;

impl Gateway {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The Close sent to every session when the node drains.
    pub fn drain_close(&self) -> CloseCmd {
        let s = &self.cfg.shutdown;
        CloseCmd {
            code: Code::ServerDraining,
            reason: "server is shutting down".into(),
            reconnect_to: s.reconnect_to.clone(),
            reconnect_after_ms: s.reconnect_after.as_millis().min(u32::MAX as u128) as u32,
        }
    }

    /// Starts draining: refuse new logins, ask every connection to close.
    /// One node ends its sessions. A node of a cluster keeps them (and the
    /// detached ones) for [`Gateway::hands_over`]: their devices resume on
    /// other nodes, which take them over with what they hold.
    pub fn start_drain(&self) -> usize {
        self.draining.store(true, Ordering::Release);
        let cmd = self.drain_close();
        if self.hands_over() {
            let mut n = self.router.close_all_keeping(&cmd);
            for e in self.pending.iter() {
                e.value().request_close(cmd.clone());
                n += 1;
            }
            return n;
        }
        let mut n = self.router.close_all(&cmd);
        let detached: Vec<SessionHandle> =
            self.detached.iter().map(|e| e.value().0.clone()).collect();
        for h in detached {
            self.end_session(&h, End::Detached, Code::ServerDraining);
        }
        for e in self.pending.iter() {
            e.value().request_close(cmd.clone());
            n += 1;
        }
        n
    }

    /// Whether a drain hands sessions over to other nodes rather than
    /// ending them: a node of a cluster whose resume tokens the others can
    /// check, with a resume window.
    pub fn hands_over(&self) -> bool {
        self.cluster.is_some() && !self.cfg.delivery.resume_window.is_zero()
    }

    /// At the end of a drain: ends the sessions no other node took.
    pub fn end_detached(&self) -> usize {
        let left: Vec<SessionHandle> = self.detached.iter().map(|e| e.value().0.clone()).collect();
        left.iter()
            .filter(|h| self.end_session(h, End::Detached, Code::ServerDraining))
            .count()
    }
}
