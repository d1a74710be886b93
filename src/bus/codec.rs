//! Bus commands and outcomes in their wire form (proto/tether/v1/cluster.proto),
//! for the nodes of a cluster. Pure conversions; what comes off the wire is
//! validated as an upstream request would be, and refused with a message.

use bytes::Bytes;
use prost::Message;

use super::{Command, Outcome, PushOutcome, PushTarget};
use crate::ids::TransportKind;
use crate::ids::UserId;
use crate::session::{CloseCmd, Exported, ExportedLane, Moved, MovedUplink, SessionInfo};
use crate::wire::{pb, Code, SharedPush};

/// The longest user id a command may carry (as upstream requests).
const MAX_USER_ID: usize = 128;
/// The most users one command may carry: a push to a list is split by node,
/// so one node never gets more than the upstream request had.
const MAX_USERS: usize = 10_000;

/// Encodes a command for another node, part of an upstream request whose
/// deadline is `not_after_ms` (ms since the Unix epoch; 0: none).
pub fn encode_command(cmd: &Command, not_after_ms: u64) -> Bytes {
    use pb::node_command::Cmd;
    let strings = |us: &[UserId]| us.iter().map(ToString::to_string).collect::<Vec<_>>();
    let cmd = match cmd {
        Command::Push { target, push } => {
            let mut p = pb::NodePush {
                body: push.body.clone(),
                lane: push.lane as i32,
                report_id: push.report.as_deref().unwrap_or_default().to_owned(),
                ..Default::default()
            };
            match target {
                PushTarget::User(u) => p.user_ids = vec![u.to_string()],
                PushTarget::Device(u, d) => {
                    p.user_ids = vec![u.to_string()];
                    p.device_id = d.to_string();
                }
                PushTarget::Users(us) => p.user_ids = strings(us),
                PushTarget::Room(r) => p.room = r.to_string(),
                PushTarget::Everyone => p.everyone = true,
            }
            Cmd::Push(p)
        }
        Command::Kick {
            user,
            device,
            close,
            before_ms,
        } => Cmd::Kick(pb::NodeKick {
            user_id: user.to_string(),
            device_id: device.as_ref().map(ToString::to_string).unwrap_or_default(),
            code: close.code as i32,
            reason: close.reason.clone(),
            logged_in_before_ms: *before_ms,
        }),
        Command::Room {
            room,
            users,
            remove,
        } => Cmd::Room(pb::NodeRoom {
            room: room.to_string(),
            user_ids: strings(users),
            remove: *remove,
        }),
        Command::Presence { users } => Cmd::Presence(pb::NodePresence {
            user_ids: strings(users),
        }),
    };
    pb::NodeCommand {
        cmd: Some(cmd),
        not_after_ms,
    }
    .encode_to_vec()
    .into()
}

fn user(u: String) -> Result<UserId, String> {
    if u.is_empty() || u.len() > MAX_USER_ID {
        return Err(format!("user id must be 1..={MAX_USER_ID} bytes"));
    }
    Ok(UserId::new(u))
}

fn users(us: Vec<String>) -> Result<Vec<UserId>, String> {
    if us.len() > MAX_USERS {
        return Err(format!("at most {MAX_USERS} users per command"));
    }
    us.into_iter().map(user).collect()
}

/// The most commands one batch may carry.
pub const MAX_BATCH: usize = 1024;

/// What another node sent: one command with its deadline (see
/// [`encode_command`]), or a batch of encoded commands.
pub enum Incoming {
    One(Command, u64),
    Batch(Vec<Bytes>),
}

/// Commands for one node in one message (each already encoded).
pub fn encode_batch(cmds: Vec<Bytes>) -> Bytes {
    pb::NodeCommand {
        cmd: Some(pb::node_command::Cmd::Batch(pb::NodeBatch { cmds })),
        not_after_ms: 0,
    }
    .encode_to_vec()
    .into()
}

/// The answer to a batch: each outcome already encoded, in order.
pub fn encode_outcomes(outcomes: Vec<Bytes>) -> Bytes {
    pb::NodeOutcome {
        outcome: Some(pb::node_outcome::Outcome::Batch(pb::NodeOutcomes {
            outcomes,
        })),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// Decodes what another node sent.
///
/// # Errors
/// As [`decode_command`]; a batch of more than [`MAX_BATCH`] commands, or
/// a batch in a batch.
pub fn decode_incoming(b: Bytes) -> Result<Incoming, String> {
    let cmd = pb::NodeCommand::decode(b).map_err(|e| format!("not a NodeCommand: {e}"))?;
    match cmd.cmd {
        Some(pb::node_command::Cmd::Batch(batch)) => {
            if batch.cmds.len() > MAX_BATCH {
                return Err(format!("at most {MAX_BATCH} commands per batch"));
            }
            Ok(Incoming::Batch(batch.cmds))
        }
        other => from_pb(other).map(|c| Incoming::One(c, cmd.not_after_ms)),
    }
}

/// The outcomes of a batch, in order.
///
/// # Errors
/// A message saying the answer is not a batch's.
pub fn decode_outcomes(b: Bytes) -> Result<Vec<Bytes>, String> {
    let o = pb::NodeOutcome::decode(b).map_err(|e| format!("not a NodeOutcome: {e}"))?;
    match o.outcome {
        Some(pb::node_outcome::Outcome::Batch(b)) => Ok(b.outcomes),
        None => Err(format!("refused ({}): {}", o.code, o.message)),
        Some(_) => Err("a batch answered with one outcome".into()),
    }
}

/// Decodes a command from another node, and its deadline (see
/// [`encode_command`]).
///
/// # Errors
/// A message saying what is wrong with it.
pub fn decode_command(b: Bytes) -> Result<(Command, u64), String> {
    let cmd = pb::NodeCommand::decode(b).map_err(|e| format!("not a NodeCommand: {e}"))?;
    from_pb(cmd.cmd).map(|c| (c, cmd.not_after_ms))
}

fn from_pb(cmd: Option<pb::node_command::Cmd>) -> Result<Command, String> {
    use pb::node_command::Cmd;
    match cmd {
        None => Err("NodeCommand has no command".into()),
        Some(Cmd::Batch(_)) => Err("a batch in a batch".into()),
        Some(Cmd::Push(p)) => {
            let lane = pb::Lane::try_from(p.lane).map_err(|_| "unknown lane".to_owned())?;
            let target = if p.everyone {
                PushTarget::Everyone
            } else if !p.room.is_empty() {
                PushTarget::Room(crate::wire::room(&p.room)?)
            } else if !p.device_id.is_empty() {
                let mut us = users(p.user_ids)?;
                let (Some(u), true) = (us.pop(), us.is_empty()) else {
                    return Err("a device push names exactly one user".into());
                };
                PushTarget::Device(u, crate::wire::device(&p.device_id)?)
            } else {
                match users(p.user_ids)? {
                    us if us.is_empty() => return Err("a push needs a target".into()),
                    mut us if us.len() == 1 => PushTarget::User(us.remove(0)),
                    us => PushTarget::Users(us),
                }
            };
            let report = (!p.report_id.is_empty()).then_some(p.report_id.as_str());
            Ok(Command::Push {
                target,
                push: SharedPush::from_body(p.body, lane, report),
            })
        }
        Some(Cmd::Kick(k)) => Ok(Command::Kick {
            user: user(k.user_id)?,
            device: if k.device_id.is_empty() {
                None
            } else {
                Some(crate::wire::device(&k.device_id)?)
            },
            close: CloseCmd::new(
                Code::try_from(k.code).unwrap_or(Code::Kicked),
                k.reason.chars().take(256).collect::<String>(),
            ),
            before_ms: k.logged_in_before_ms,
        }),
        Some(Cmd::Room(r)) => Ok(Command::Room {
            room: crate::wire::room(&r.room)?,
            users: users(r.user_ids)?,
            remove: r.remove,
        }),
        Some(Cmd::Presence(p)) => Ok(Command::Presence {
            users: users(p.user_ids)?,
        }),
    }
}

/// Encodes an outcome (or a refusal) for the node that asked.
pub fn encode_outcome(o: Result<Outcome, String>) -> Bytes {
    use pb::node_outcome::Outcome as O;
    let msg = match o {
        Ok(Outcome::Push(p)) => pb::NodeOutcome {
            outcome: Some(O::Push(pb::NodePushOutcome {
                sessions: p.sessions,
                dropped: p.dropped,
                missing_users: p.missing_users.iter().map(ToString::to_string).collect(),
                moved: p
                    .moved
                    .iter()
                    .map(|(u, d, n)| pb::MovedSession {
                        user_id: u.to_string(),
                        device_id: d.to_string(),
                        node_id: n.to_string(),
                    })
                    .collect(),
            })),
            ..Default::default()
        },
        Ok(Outcome::Count(n)) => pb::NodeOutcome {
            outcome: Some(O::Count(n)),
            ..Default::default()
        },
        Ok(Outcome::Presence(users)) => pb::NodeOutcome {
            outcome: Some(O::Presence(pb::NodePresenceOutcome { users })),
            ..Default::default()
        },
        Err(message) => pb::NodeOutcome {
            outcome: None,
            code: Code::BadRequest as i32,
            message,
        },
    };
    msg.encode_to_vec().into()
}

/// Decodes another node's outcome.
///
/// # Errors
/// The node's refusal, or a message saying the answer is not an outcome.
pub fn decode_outcome(b: Bytes) -> Result<Outcome, String> {
    use pb::node_outcome::Outcome as O;
    let o = pb::NodeOutcome::decode(b).map_err(|e| format!("not a NodeOutcome: {e}"))?;
    match o.outcome {
        Some(O::Push(p)) => Ok(Outcome::Push(PushOutcome {
            sessions: p.sessions,
            dropped: p.dropped,
            missing_users: p.missing_users.into_iter().map(UserId::new).collect(),
            closed: Vec::new(),
            moved: p
                .moved
                .into_iter()
                .filter(|m| crate::config::bus::is_subject(&m.node_id))
                .map(|m| {
                    (
                        UserId::new(m.user_id),
                        crate::ids::DeviceId::new(m.device_id),
                        crate::ids::NodeId::new(m.node_id),
                    )
                })
                .collect(),
        })),
        Some(O::Count(n)) => Ok(Outcome::Count(n)),
        Some(O::Presence(p)) => Ok(Outcome::Presence(p.users)),
        Some(O::Batch(_)) => Err("a batch's answer to one command".into()),
        None => Err(format!("refused ({}): {}", o.code, o.message)),
    }
}

/// Bytes of held pushes per [`pb::SessionChunk`]: well under NATS's 1 MB
/// payload.
const CHUNK_BYTES: usize = 256 * 1024;

/// A moved session in chunks (see [`pb::SessionChunk`]).
pub fn encode_moved(m: &Moved) -> Vec<Bytes> {
    let d = &m.delivery;
    let mut first = pb::SessionChunk {
        code: Code::Ok as i32,
        platform: m.info.platform as i32,
        since_ms: m.info.since_ms,
        transport: m.info.transport.as_str().to_owned(),
        next_seq: d.next_seq.to_vec(),
        written: d.lanes.iter().map(|l| l.written).collect(),
        uplink_seq: m.uplink_seq,
        uplinks: m
            .uplinks
            .iter()
            .map(|u| pb::UplinkSeen {
                client_msg_id: u.client_msg_id.clone(),
                server_msg_id: u.server_msg_id,
                seq: u.seq,
                age_ms: u64::try_from(u.age.as_millis()).unwrap_or(u64::MAX),
            })
            .collect(),
        rooms: m.rooms.iter().map(ToString::to_string).collect(),
        ..Default::default()
    };
    let mut chunks: Vec<pb::SessionChunk> = Vec::new();
    let mut bytes = 0;
    for (lane, l) in [pb::Lane::Interactive, pb::Lane::Bulk]
        .into_iter()
        .zip(&d.lanes)
    {
        for (seq, tries, push) in &l.items {
            if bytes + push.body.len() > CHUNK_BYTES && !first.pushes.is_empty() {
                chunks.push(std::mem::take(&mut first));
                bytes = 0;
            }
            bytes += push.body.len();
            first.pushes.push(pb::HeldPush {
                lane: lane as i32,
                seq: *seq,
                tries: u32::from(*tries),
                body: push.body.clone(),
                report_id: push.report.as_deref().unwrap_or_default().to_owned(),
            });
        }
    }
    chunks.push(first);
    let count = chunks.len() as u32;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c.index = i as u32;
            c.count = count;
            c.encode_to_vec().into()
        })
        .collect()
}

/// The one-chunk answer that no session is handed over.
pub fn encode_refusal(code: Code) -> Bytes {
    pb::SessionChunk {
        index: 0,
        count: 1,
        code: code as i32,
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// Rebuilds a moved session of `user` and `device` from its chunks (in any
/// order).
///
/// # Errors
/// The holder's refusal code, or `CODE_INTERNAL` for chunks that do not fit
/// together.
pub fn decode_moved(
    mut chunks: Vec<pb::SessionChunk>,
    user: UserId,
    device: crate::ids::DeviceId,
) -> Result<Moved, Code> {
    chunks.sort_by_key(|c| c.index);
    let bad = Code::Internal;
    let first = chunks.first().ok_or(bad)?;
    if first.code != Code::Ok as i32 {
        return Err(Code::try_from(first.code).unwrap_or(Code::ResumeExpired));
    }
    let n = first.count as usize;
    if chunks.len() != n
        || chunks
            .iter()
            .enumerate()
            .any(|(i, c)| c.index as usize != i)
    {
        return Err(bad);
    }
    let lane2 = |v: &[u64]| -> Result<[u64; 2], Code> {
        match v {
            [a, b] => Ok([*a, *b]),
            _ => Err(bad),
        }
    };
    let next_seq = lane2(&first.next_seq)?;
    let written = lane2(&first.written)?;
    let transport = TransportKind::from_label(&first.transport).unwrap_or(TransportKind::Memory);
    let mut rooms = Vec::with_capacity(first.rooms.len());
    for r in &first.rooms {
        rooms.push(crate::wire::room(r).map_err(|_| bad)?);
    }
    let info = SessionInfo {
        user,
        device,
        platform: pb::Platform::try_from(first.platform).unwrap_or_default(),
        transport,
        since_ms: first.since_ms,
    };
    let uplinks = first
        .uplinks
        .iter()
        .map(|u| MovedUplink {
            client_msg_id: u.client_msg_id.clone(),
            server_msg_id: u.server_msg_id,
            seq: u.seq,
            age: std::time::Duration::from_millis(u.age_ms),
        })
        .collect();
    let uplink_seq = first.uplink_seq;
    let mut lanes: [ExportedLane; 2] = Default::default();
    for (l, w) in lanes.iter_mut().zip(written) {
        l.written = w;
    }
    for c in chunks {
        for p in c.pushes {
            let lane = pb::Lane::try_from(p.lane).map_err(|_| bad)?;
            let report = (!p.report_id.is_empty()).then_some(p.report_id.as_str());
            let push = SharedPush::from_body(p.body, lane, report);
            let tries = u8::try_from(p.tries).unwrap_or(u8::MAX);
            lanes[usize::from(lane == pb::Lane::Bulk)]
                .items
                .push((p.seq, tries, push));
        }
    }
    Ok(Moved {
        info,
        delivery: Exported { next_seq, lanes },
        uplink_seq,
        uplinks,
        rooms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, RoomId};

    fn roundtrip(cmd: &Command) -> Command {
        let (c, until) = decode_command(encode_command(cmd, 1_234)).expect("decodes");
        assert_eq!(until, 1_234, "the deadline travels with the command");
        c
    }

    #[test]
    fn a_push_crosses_with_its_body_untouched() {
        let push = SharedPush::with("m-1", b"hello", "svc", "", pb::Lane::Bulk, true);
        let cmd = Command::Push {
            target: PushTarget::Device(UserId::new("u1"), DeviceId::new("phone")),
            push: push.clone(),
        };
        let Command::Push { target, push: got } = roundtrip(&cmd) else {
            panic!("not a push")
        };
        assert!(
            matches!(target, PushTarget::Device(u, d) if u.as_str() == "u1" && d.as_str() == "phone")
        );
        assert_eq!(got.body, push.body, "the encoded Push crosses as is");
        assert_eq!(got.lane, pb::Lane::Bulk);
        assert_eq!(got.report.as_deref(), Some("m-1"));
    }

    #[test]
    fn every_target_and_command_round_trips() {
        let push = SharedPush::new("m", b"x", "", "lobby");
        for target in [
            PushTarget::User(UserId::new("a")),
            PushTarget::Users(vec![UserId::new("a"), UserId::new("b")]),
            PushTarget::Room(RoomId::new("lobby")),
            PushTarget::Everyone,
        ] {
            let cmd = Command::Push {
                target: target.clone(),
                push: push.clone(),
            };
            let Command::Push { target: got, .. } = roundtrip(&cmd) else {
                panic!()
            };
            assert_eq!(format!("{got:?}"), format!("{target:?}"));
        }
        let kick = Command::Kick {
            user: UserId::new("a"),
            device: None,
            close: CloseCmd::new(Code::Replaced, "elsewhere"),
            before_ms: 42,
        };
        assert_eq!(format!("{:?}", roundtrip(&kick)), format!("{kick:?}"));
        let room = Command::Room {
            room: RoomId::new("r"),
            users: vec![UserId::new("a")],
            remove: true,
        };
        assert_eq!(format!("{:?}", roundtrip(&room)), format!("{room:?}"));
    }

    #[test]
    fn hostile_commands_are_refused_with_a_message() {
        assert!(decode_command(Bytes::from_static(b"\xff\xff\xff")).is_err());
        assert!(decode_command(pb::NodeCommand::default().encode_to_vec().into()).is_err());
        let long = pb::NodeCommand {
            cmd: Some(pb::node_command::Cmd::Presence(pb::NodePresence {
                user_ids: vec!["x".repeat(129)],
            })),
            not_after_ms: 0,
        };
        let e = decode_command(long.encode_to_vec().into()).unwrap_err();
        assert!(e.contains("user id"), "{e}");
        let two_users_one_device = pb::NodeCommand {
            cmd: Some(pb::node_command::Cmd::Push(pb::NodePush {
                user_ids: vec!["a".into(), "b".into()],
                device_id: "d".into(),
                ..Default::default()
            })),
            not_after_ms: 0,
        };
        assert!(decode_command(two_users_one_device.encode_to_vec().into()).is_err());
    }

    #[test]
    fn a_moved_session_crosses_in_chunks_and_comes_back_whole() {
        let big = vec![7u8; 100_000];
        let items: Vec<(u64, u8, SharedPush)> = (1..=6)
            .map(|s| {
                (
                    s,
                    1,
                    SharedPush::with(
                        &format!("m{s}"),
                        &big,
                        "",
                        "",
                        pb::Lane::Interactive,
                        s == 2,
                    ),
                )
            })
            .collect();
        let m = Moved {
            info: SessionInfo {
                user: UserId::new("u"),
                device: DeviceId::new("d"),
                platform: pb::Platform::Ios,
                transport: TransportKind::Quic,
                since_ms: 5,
            },
            delivery: Exported {
                next_seq: [7, 3],
                lanes: [
                    ExportedLane { written: 4, items },
                    ExportedLane {
                        written: 2,
                        items: Vec::new(),
                    },
                ],
            },
            uplink_seq: 9,
            uplinks: vec![MovedUplink {
                client_msg_id: "c1".into(),
                server_msg_id: 44,
                seq: 8,
                age: std::time::Duration::from_millis(1500),
            }],
            rooms: vec![RoomId::new("lobby")],
        };
        let chunks = encode_moved(&m);
        assert!(chunks.len() >= 3, "600 kB of pushes need several chunks");
        assert!(chunks.iter().all(|c| c.len() < 512 * 1024));
        let mut decoded: Vec<pb::SessionChunk> = chunks
            .into_iter()
            .map(|b| pb::SessionChunk::decode(b).unwrap())
            .collect();
        decoded.reverse(); // any order
        let back = decode_moved(decoded, UserId::new("u"), DeviceId::new("d")).unwrap();
        assert_eq!(back.delivery.next_seq, [7, 3]);
        assert_eq!(back.delivery.lanes[0].written, 4);
        let seqs: Vec<u64> = back.delivery.lanes[0].items.iter().map(|i| i.0).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
        assert_eq!(
            back.delivery.lanes[0].items[1].2.report.as_deref(),
            Some("m2")
        );
        assert_eq!(
            back.delivery.lanes[0].items[0].2.body,
            m.delivery.lanes[0].items[0].2.body
        );
        assert_eq!(back.uplinks, m.uplinks);
        assert_eq!(back.rooms, m.rooms);
        assert_eq!(back.info.transport, TransportKind::Quic);
        let refused = pb::SessionChunk::decode(encode_refusal(Code::ResumeExpired)).unwrap();
        assert_eq!(
            decode_moved(vec![refused], UserId::new("u"), DeviceId::new("d")).unwrap_err(),
            Code::ResumeExpired
        );
    }

    #[test]
    fn a_batch_carries_commands_in_order_and_never_a_batch_in_a_batch() {
        let kick = |u: &str| Command::Kick {
            user: UserId::new(u),
            device: None,
            close: CloseCmd::new(Code::Kicked, ""),
            before_ms: 0,
        };
        let b = encode_batch(vec![
            encode_command(&kick("a"), 0),
            encode_command(&kick("b"), 7),
        ]);
        let Ok(Incoming::Batch(cmds)) = decode_incoming(b.clone()) else {
            panic!("a batch")
        };
        let users: Vec<String> = cmds
            .into_iter()
            .map(|c| match decode_command(c) {
                Ok((Command::Kick { user, .. }, until)) => format!("{user}{until}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(users, ["a0", "b7"]);
        let nested = encode_batch(vec![b]);
        let Ok(Incoming::Batch(inner)) = decode_incoming(nested) else {
            panic!("a batch")
        };
        assert!(
            decode_command(inner[0].clone()).is_err(),
            "no batch in a batch"
        );
        let too_many = encode_batch(vec![encode_command(&kick("a"), 0); MAX_BATCH + 1]);
        assert!(decode_incoming(too_many).is_err());
        let outs = encode_outcomes(vec![encode_outcome(Ok(Outcome::Count(3)))]);
        let back = decode_outcomes(outs).unwrap();
        assert_eq!(decode_outcome(back[0].clone()), Ok(Outcome::Count(3)));
        assert!(decode_outcomes(encode_outcome(Ok(Outcome::Count(1)))).is_err());
    }

    #[test]
    fn outcomes_round_trip_and_refusals_say_why() {
        let o = Outcome::Push(PushOutcome {
            sessions: 3,
            dropped: 1,
            missing_users: vec![UserId::new("z")],
            ..Default::default()
        });
        assert_eq!(decode_outcome(encode_outcome(Ok(o.clone()))), Ok(o));
        let e = decode_outcome(encode_outcome(Err("no".into()))).unwrap_err();
        assert!(e.contains("no"), "{e}");
    }
}
