//! The upstream requests themselves (push, kick, rooms, presence): each
//! validates its protobuf request, runs it through the [`Bus`] (on every
//! node that holds a target) and returns its reply, or the code and message
//! of its refusal.
//!
//! The upstream socket ([`super::server`]) and the admin listener's HTTP API
//! both call these, so that a request means the same and is refused with
//! the same code whichever way it comes. This module frames nothing and
//! knows no connection.
//!
//! [`Bus`]: crate::bus::Bus

use crate::bus::{Command, NodeFailure, Outcome, PushTarget};
use crate::ids::{DeviceId, UserId};
use crate::metrics as m;
use crate::session::CloseCmd;
use crate::wire::{pb, Code, SharedPush};

use super::UpstreamNode;

/// Users named in one request (a push to a list, a room change, presence).
pub const MAX_USERS_PER_REQUEST: usize = 100_000;

/// Why a request was refused: its code (`CODE_BAD_REQUEST` for a field out
/// of its documented range) and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            code: Code::BadRequest,
            message: message.into(),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The upstream socket's answer.
    pub reply: pb::PushReply,
    /// Targeted users it did not reach, once each, with why:
    /// `CODE_NOT_LOGGED_IN` (no node had a session of theirs), or the code of
    /// the node that held them and did not answer. With `report_undelivered`
    /// each is also an `Undelivered` event.
    pub undelivered: Vec<(UserId, Code)>,
    /// The device of a device push (the events name it).
    pub device: Option<DeviceId>,
}

fn user(id: &str) -> Result<UserId, Refusal> {
    if id.is_empty() || id.len() > 128 {
        return Err(Refusal::bad(format!(
            "user id must be 1..=128 bytes, got {}",
            id.len()
        )));
    }
    Ok(UserId::new(id))
}

fn users(ids: &[String]) -> Result<Vec<UserId>, Refusal> {
    if ids.len() > MAX_USERS_PER_REQUEST {
        return Err(Refusal::bad(format!(
            "at most {MAX_USERS_PER_REQUEST} users per request"
        )));
    }
    ids.iter().map(|u| user(u)).collect()
}

/// A push: validates the target, runs it on every node, counts (and with
/// `report_undelivered` emits) the users it did not reach.
///
/// # Errors
/// `CODE_BAD_REQUEST` for a missing or malformed target, or a message id or
/// source over 128 bytes.
///
/// # Cancel safety
/// Not cancel safe (see [`Bus::request`](crate::bus::Bus::request)).
pub async fn push(node: &dyn UpstreamNode, p: pb::PushRequest) -> Result<Pushed, Refusal> {
    let target = match p.target {
        Some(pb::push_request::Target::UserId(u)) => PushTarget::User(user(&u)?),
        Some(pb::push_request::Target::Device(d)) => {
            let u = user(&d.user_id)?;
            let d = crate::wire::device(&d.device_id).map_err(Refusal::bad)?;
            PushTarget::Device(u, d)
        }
        Some(pb::push_request::Target::Users(l)) => PushTarget::Users(users(&l.user_ids)?),
        Some(pb::push_request::Target::Room(r)) => {
            PushTarget::Room(crate::wire::room(&r).map_err(Refusal::bad)?)
        }
        Some(pb::push_request::Target::Everyone(true)) => PushTarget::Everyone,
        Some(pb::push_request::Target::Everyone(false)) | None => {
            return Err(Refusal::bad("push needs a target"))
        }
    };
    if p.message_id.len() > 128 || p.source.len() > 128 {
        return Err(Refusal::bad(
            "message_id and source must be at most 128 bytes",
        ));
    }
    let message_id = if p.message_id.is_empty() {
        node.new_message_id()
    } else {
        p.message_id
    };
    let room = match &target {
        PushTarget::Room(r) => r.as_str(),
        _ => "",
    };
    let lane = pb::Lane::try_from(p.lane).unwrap_or(pb::Lane::Interactive);
    let shared = SharedPush::with(
        &message_id,
        &p.payload,
        &p.source,
        room,
        lane,
        p.report_delivery,
    );
    let device = match &target {
        PushTarget::Device(_, d) => Some(d.clone()),
        _ => None,
    };
    let reply = node
        .bus()
        .request(Command::Push {
            target,
            push: shared,
        })
        .await;
    let (sessions, dropped, missing) = match reply.outcome {
        Outcome::Push(po) => (po.sessions, po.dropped, po.missing_users),
        _ => (0, 0, Vec::new()),
    };
    // Each user once: those no node had (CODE_NOT_LOGGED_IN), and those
    // held only by nodes that did not answer (their node's code).
    let unreached = reply
        .failed
        .iter()
        .flat_map(|f| f.users.iter().map(move |u| (u.clone(), f.code)));
    let undelivered: Vec<(UserId, Code)> = missing
        .into_iter()
        .map(|u| (u, Code::NotLoggedIn))
        .chain(unreached)
        .collect();
    for (u, code) in &undelivered {
        metrics::counter!(m::UNDELIVERED).increment(1);
        if p.report_undelivered {
            node.bus().emit(pb::Event {
                kind: Some(pb::event::Kind::Undelivered(pb::Undelivered {
                    message_id: message_id.clone(),
                    user_id: u.to_string(),
                    device_id: device.as_ref().map(ToString::to_string).unwrap_or_default(),
                    code: *code as i32,
                })),
            });
        }
    }
    Ok(Pushed {
        reply: pb::PushReply {
            message_id,
            sessions,
            dropped,
            failed: node_errors(&reply.failed),
        },
        undelivered,
        device,
    })
}

/// A kick of one device or of every device of a user. Codes that mean
/// "keep the session for a resume" (and unknown ones) become
/// `CODE_KICKED`: a kick ends the session.
///
/// # Errors
/// `CODE_BAD_REQUEST` for a malformed user or device id.
pub async fn kick(node: &dyn UpstreamNode, k: pb::KickRequest) -> Result<pb::CountReply, Refusal> {
    let u = user(&k.user_id)?;
    let code = match Code::try_from(k.code) {
        Ok(c) if c != Code::Ok && !crate::session::keeps_state(c) => c,
        _ => Code::Kicked,
    };
    let reason = if k.reason.is_empty() {
        "kicked by the server".to_owned()
    } else {
        k.reason.chars().take(256).collect()
    };
    let device = if k.device_id.is_empty() {
        None
    } else {
        Some(crate::wire::device(&k.device_id).map_err(Refusal::bad)?)
    };
    let cmd = Command::Kick {
        user: u,
        device,
        close: CloseCmd::new(code, reason),
        before_ms: 0,
    };
    Ok(count(node, cmd).await)
}

/// Adds the live sessions of some users to a room, or removes them.
///
/// # Errors
/// `CODE_BAD_REQUEST` for a malformed room or user id, or too many users.
pub async fn room(node: &dyn UpstreamNode, r: pb::RoomRequest) -> Result<pb::CountReply, Refusal> {
    let room = crate::wire::room(&r.room).map_err(Refusal::bad)?;
    let us = users(&r.user_ids)?;
    let cmd = Command::Room {
        room,
        users: us,
        remove: r.remove,
    };
    Ok(count(node, cmd).await)
}

/// Which devices of some users are online, merged over every node.
///
/// # Errors
/// `CODE_BAD_REQUEST` for a malformed user id, or too many users.
pub async fn presence(
    node: &dyn UpstreamNode,
    q: pb::PresenceRequest,
) -> Result<pb::PresenceReply, Refusal> {
    let us = users(&q.user_ids)?;
    let r = node.bus().request(Command::Presence { users: us }).await;
    let users = match r.outcome {
        Outcome::Presence(list) => list,
        _ => Vec::new(),
    };
    Ok(pb::PresenceReply {
        users,
        failed: node_errors(&r.failed),
    })
}

/// The nodes of a cluster that did not run their part, for a reply.
fn node_errors(failed: &[NodeFailure]) -> Vec<pb::NodeError> {
    failed
        .iter()
        .map(|f| pb::NodeError {
            node_id: f.node.to_string(),
            code: f.code as i32,
            message: f.message.clone(),
        })
        .collect()
}

async fn count(node: &dyn UpstreamNode, cmd: Command) -> pb::CountReply {
    let r = node.bus().request(cmd).await;
    let sessions = match r.outcome {
        Outcome::Count(n) => n,
        _ => 0,
    };
    pb::CountReply {
        sessions,
        failed: node_errors(&r.failed),
    }
}
