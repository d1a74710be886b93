//! Resume tokens (an HMAC over the holding node, the session's id, user and
//! device, with the cluster's key or one random per process) and the resume
//! itself: a new connection takes over a detached (or still attached)
//! session.

use super::Gateway;
use crate::ids::{SessionId, TransportKind};
use crate::session::SessionHandle;
use crate::wire::{pb, Code};

/// The version byte of a resume token.
const TOKEN_V1: u8 = 1;

/// The bytes a resume token's MAC covers.
fn token_message(node: &str, id: SessionId, user: &str, device: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(2 + node.len() + 8 + user.len() + 1 + device.len());
    msg.push(TOKEN_V1);
    msg.push(node.len() as u8);
    msg.extend_from_slice(node.as_bytes());
    msg.extend_from_slice(&id.0.to_be_bytes());
    msg.extend_from_slice(user.as_bytes());
    msg.push(0);
    msg.extend_from_slice(device.as_bytes());
    msg
}

/// The node a resume token names, if it is well formed: `[1][n][node: n
/// bytes][HMAC-SHA256: 32 bytes]`.
pub(super) fn token_node(token: &[u8]) -> Option<&str> {
    let (&v, rest) = token.split_first()?;
    let (&n, rest) = rest.split_first()?;
    if v != TOKEN_V1 || rest.len() != usize::from(n) + 32 {
        return None;
    }
    std::str::from_utf8(&rest[..usize::from(n)]).ok()
}

/// The keys resume tokens are signed and checked with: `bus.resume_secret`
/// (shared by the cluster) and the one before it, or a random key of this
/// process.
pub(super) fn resume_keys(cfg: &crate::config::Config) -> anyhow::Result<Vec<ring::hmac::Key>> {
    // Their lengths were checked with the config (`BusConfig::check`), the
    // environment's values included (`config::env`).
    let current = &cfg.bus.resume_secret;
    let previous = &cfg.bus.resume_secret_previous;
    let key = |s: &str| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes());
    match current {
        Some(c) => {
            if c.len() < 32 {
                anyhow::bail!("bus.resume_secret must be at least 32 bytes");
            }
            Ok(std::iter::once(key(c))
                .chain(previous.as_deref().map(key))
                .collect())
        }
        None => {
            if cfg.bus.kind == crate::config::bus::BusKind::Nats {
                tracing::warn!(
                    "bus.resume_secret is not set: each node signs resume tokens with a key \
                     of its own, so a device resumes only on the node that holds its session"
                );
            }
            let rng = ring::rand::SystemRandom::new();
            let k = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .map_err(|_| anyhow::anyhow!("cannot generate the resume-token key"))?;
            Ok(vec![k])
        }
    }
}

impl Gateway {
    /// The resume token of a session held here: it names this node, and
    /// is signed with the cluster's resume key.
    pub fn resume_token(&self, h: &SessionHandle) -> bytes::Bytes {
        let Some(i) = h.info() else {
            return bytes::Bytes::new();
        };
        let node = self.node.as_str();
        let msg = token_message(node, h.id(), i.user.as_str(), i.device.as_str());
        let tag = ring::hmac::sign(&self.resume_keys[0], &msg);
        let mut t = Vec::with_capacity(2 + node.len() + 32);
        t.extend_from_slice(&msg[..2 + node.len()]);
        t.extend_from_slice(tag.as_ref());
        bytes::Bytes::from(t)
    }

    /// Whether `token` was signed for this session (by whichever node of
    /// the cluster held it then).
    fn check_resume_token(&self, h: &SessionHandle, token: &[u8]) -> bool {
        let Some(i) = h.info() else { return false };
        let Some(node) = token_node(token) else {
            return false;
        };
        let msg = token_message(node, h.id(), i.user.as_str(), i.device.as_str());
        let tag = &token[2 + node.len()..];
        self.resume_keys
            .iter()
            .any(|k| ring::hmac::verify(k, &msg, tag).is_ok())
    }

    /// Whether `token` is a valid token for session `id` of `user` and
    /// `device`; returns the node it names.
    pub(super) fn verify_token<'t>(
        &self,
        token: &'t [u8],
        id: SessionId,
        user: &str,
        device: &str,
    ) -> Option<&'t str> {
        let node = token_node(token)?;
        let msg = token_message(node, id, user, device);
        let tag = &token[2 + node.len()..];
        self.resume_keys
            .iter()
            .any(|k| ring::hmac::verify(k, &msg, tag).is_ok())
            .then_some(node)
    }

    /// Takes over the detached (or still attached) session a resume names.
    pub(super) fn resume(
        &self,
        user: &crate::ids::UserId,
        device: &crate::ids::DeviceId,
        r: &crate::wire::ResumeRequest,
        kind: TransportKind,
    ) -> Result<(SessionHandle, u32, pb::ResumeResult), Code> {
        let h = self
            .registry
            .session(SessionId(r.session_id))
            .ok_or(Code::ResumeExpired)?;
        let same = h
            .info()
            .is_some_and(|i| &i.user == user && &i.device == device);
        if !same || !self.check_resume_token(&h, &r.token) {
            return Err(Code::ResumeRejected);
        }
        let (mut delivered, mut failed) = (Vec::new(), Vec::new());
        let (gen, lanes, old_waker) = h
            .attach(
                kind,
                r.last,
                &self.delivery,
                &self.budget,
                &mut delivered,
                &mut failed,
            )
            .ok_or(Code::ResumeExpired)?;
        self.detached.remove(&h.id());
        // Pushes the client says it has: delivered.
        self.report(&h, &delivered, Code::Ok);
        // Written on `max_tries` connections and never acknowledged.
        self.report(&h, &failed, Code::DeliveryFailed);
        if let Some(w) = old_waker {
            // The previous connection, if alive, must notice it lost the session.
            w.wake();
        }
        let gap = lanes.iter().any(|l| l.gap);
        Ok((
            h,
            gen,
            pb::ResumeResult {
                code: if gap { Code::ResumeGap } else { Code::Ok } as i32,
                first_seq: lanes[0].first_held,
                first_bulk_seq: lanes[1].first_held,
                replayed: lanes[0].replay + lanes[1].replay,
            },
        ))
    }
}
