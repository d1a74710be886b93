//! The JSON form of upstream events and replies that `tether ... --json`
//! prints, one object per event or reply, for scripts (`jq`).
//!
//! Field names are part of the documented interface (docs/OPERATIONS.md,
//! "JSON output"); change them only with the docs. The rules every object
//! follows:
//! - 64-bit ids (`session_id`, `server_msg_id`) are strings, because a JSON
//!   number loses precision past 2^53 in most readers: `session_id` as 16 hex
//!   digits (as the text output and the logs show it), `server_msg_id` in
//!   decimal. Counts, sequence numbers and times are numbers.
//! - A code is two fields: `code` (its number on the wire) and `code_name`
//!   (its name in the protocol, e.g. `CODE_KICKED`; `UNKNOWN` for a number
//!   this build does not know).
//! - A payload is two fields: `payload_base64` (standard alphabet, padded)
//!   always, and `payload`, the same bytes as text when they are valid UTF-8,
//!   else `null`.
//! - Lanes and platforms are their protocol names (`LANE_BULK`,
//!   `PLATFORM_IOS`), or `UNKNOWN`.
//!
//! It builds values only: printing them is the caller's.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::wire::pb;

/// One event as a JSON object, `{"event": "<kind>", ...}`; `kind` is one of
/// `uplink`, `session_opened`, `session_closed`, `undelivered`,
/// `delivery`, `events_dropped`, or `empty` for an event without a body
/// (a newer gateway's kind this build does not know).
#[must_use]
pub fn event(ev: &pb::Event) -> Value {
    use pb::event::Kind;
    match &ev.kind {
        Some(Kind::Uplink(u)) => {
            let mut v = json!({
                "event": "uplink",
                "session": session(u.session.as_ref()),
                "client_msg_id": u.client_msg_id,
                "server_msg_id": u.server_msg_id.to_string(),
                "route": u.route,
                "received_ms": u.received_ms,
                "seq": u.seq,
            });
            add_payload(&mut v, &u.payload);
            v
        }
        Some(Kind::Opened(o)) => json!({
            "event": "session_opened",
            "session": session(o.session.as_ref()),
            "remote_addr": o.remote_addr,
        }),
        Some(Kind::Closed(c)) => {
            let mut v = json!({
                "event": "session_closed",
                "session": session(c.session.as_ref()),
                "reason": c.reason,
            });
            add_code(&mut v, c.code);
            v
        }
        Some(Kind::Undelivered(u)) => {
            let mut v = json!({
                "event": "undelivered",
                "message_id": u.message_id,
                "user_id": u.user_id,
                "device_id": u.device_id,
            });
            add_code(&mut v, u.code);
            v
        }
        Some(Kind::Delivery(d)) => {
            let mut v = json!({
                "event": "delivery",
                "message_id": d.message_id,
                "session": session(d.session.as_ref()),
                "lane": lane(d.lane),
                "seq": d.seq,
            });
            add_code(&mut v, d.code);
            v
        }
        Some(Kind::Dropped(d)) => json!({
            "event": "events_dropped",
            "uplinks": d.uplinks,
            "opened": d.opened,
            "closed": d.closed,
            "undelivered": d.undelivered,
            "delivery": d.delivery,
        }),
        None => json!({ "event": "empty" }),
    }
}

/// A push's reply: `message_id`, `sessions`, `dropped`, `failed_nodes`.
#[must_use]
pub fn push_reply(r: &pb::PushReply) -> Value {
    json!({
        "message_id": r.message_id,
        "sessions": r.sessions,
        "dropped": r.dropped,
        "failed_nodes": failed_nodes(&r.failed),
    })
}

/// A kick's or a room change's reply: `sessions`, `failed_nodes`.
#[must_use]
pub fn count_reply(r: &pb::CountReply) -> Value {
    json!({
        "sessions": r.sessions,
        "failed_nodes": failed_nodes(&r.failed),
    })
}

/// A presence reply: `users` (each `user_id`, `online`, `devices`) and
/// `failed_nodes`.
#[must_use]
pub fn presence_reply(r: &pb::PresenceReply) -> Value {
    let users: Vec<Value> = r
        .users
        .iter()
        .map(|u| {
            let devices: Vec<Value> = u
                .devices
                .iter()
                .map(|d| {
                    json!({
                        "device_id": d.device_id,
                        "session_id": session_id(d.session_id),
                        "node_id": d.node_id,
                        "platform": platform(d.platform),
                        "transport": d.transport,
                        "since_ms": d.since_ms,
                        "remote_addr": d.remote_addr,
                    })
                })
                .collect();
            json!({
                "user_id": u.user_id,
                "online": !devices.is_empty(),
                "devices": devices,
            })
        })
        .collect();
    json!({ "users": users, "failed_nodes": failed_nodes(&r.failed) })
}

/// An error as printed on standard error: `{"error": "<message>"}`, plus
/// `code` and `code_name` when the gateway refused with a protocol code.
#[must_use]
pub fn error(message: &str, code: Option<pb::Code>) -> Value {
    let mut v = json!({ "error": message });
    if let Some(c) = code {
        add_code(&mut v, c as i32);
    }
    v
}

/// A session id as the text output and the logs show it.
fn session_id(id: u64) -> String {
    format!("{id:016x}")
}

fn session(s: Option<&pb::SessionInfo>) -> Value {
    match s {
        Some(s) => json!({
            "user_id": s.user_id,
            "device_id": s.device_id,
            "session_id": session_id(s.session_id),
            "node_id": s.node_id,
            "platform": platform(s.platform),
            "transport": s.transport,
        }),
        None => Value::Null,
    }
}

fn failed_nodes(nodes: &[pb::NodeError]) -> Value {
    Value::Array(
        nodes
            .iter()
            .map(|n| {
                let mut v = json!({ "node_id": n.node_id, "message": n.message });
                add_code(&mut v, n.code);
                v
            })
            .collect(),
    )
}

/// Adds `code` and `code_name` to an object.
fn add_code(v: &mut Value, code: i32) {
    let name = pb::Code::try_from(code).map_or("UNKNOWN", |c| c.as_str_name());
    if let Value::Object(m) = v {
        m.insert("code".into(), code.into());
        m.insert("code_name".into(), name.into());
    }
}

/// Adds `payload` (text or null) and `payload_base64` to an object.
fn add_payload(v: &mut Value, bytes: &[u8]) {
    if let Value::Object(m) = v {
        let text = std::str::from_utf8(bytes).map_or(Value::Null, |s| s.into());
        m.insert("payload".into(), text);
        m.insert(
            "payload_base64".into(),
            base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into(),
        );
    }
}

fn lane(l: i32) -> &'static str {
    pb::Lane::try_from(l).map_or("UNKNOWN", |l| l.as_str_name())
}

fn platform(p: i32) -> &'static str {
    pb::Platform::try_from(p).map_or("UNKNOWN", |p| p.as_str_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> pb::SessionInfo {
        pb::SessionInfo {
            user_id: "alice".into(),
            device_id: "phone".into(),
            session_id: u64::MAX - 1,
            node_id: "n1".into(),
            platform: pb::Platform::Ios as i32,
            transport: "tcp".into(),
        }
    }

    #[test]
    fn an_uplink_has_its_payload_as_text_and_base64_and_ids_as_strings() {
        let ev = pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                session: Some(info()),
                client_msg_id: "c1".into(),
                server_msg_id: u64::MAX,
                route: "chat".into(),
                payload: b"hi \xe2\x9c\x93".to_vec().into(),
                received_ms: 1_700_000_000_000,
                seq: 7,
            })),
        };
        let v = event(&ev);
        assert_eq!(v["event"], "uplink");
        assert_eq!(v["payload"], "hi \u{2713}");
        assert_eq!(v["payload_base64"], "aGkg4pyT");
        assert_eq!(v["server_msg_id"], "18446744073709551615");
        assert_eq!(v["session"]["session_id"], "fffffffffffffffe");
        assert_eq!(v["session"]["platform"], "PLATFORM_IOS");
        assert_eq!(v["seq"], 7);
    }

    #[test]
    fn a_binary_payload_is_null_as_text() {
        let ev = pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                payload: vec![0xff, 0x00, 0x80].into(),
                ..Default::default()
            })),
        };
        let v = event(&ev);
        assert_eq!(v["payload"], Value::Null);
        assert_eq!(v["payload_base64"], "/wCA");
        assert_eq!(v["session"], Value::Null);
    }

    #[test]
    fn codes_have_a_number_and_a_name_and_unknown_ones_say_so() {
        let closed = |code| pb::Event {
            kind: Some(pb::event::Kind::Closed(pb::SessionClosed {
                session: Some(info()),
                code,
                reason: "r".into(),
            })),
        };
        let v = event(&closed(pb::Code::Kicked as i32));
        assert_eq!(v["event"], "session_closed");
        assert_eq!(v["code"], pb::Code::Kicked as i32);
        assert_eq!(v["code_name"], "CODE_KICKED");
        let v = event(&closed(987_654));
        assert_eq!(v["code"], 987_654);
        assert_eq!(v["code_name"], "UNKNOWN");
        assert_eq!(event(&pb::Event { kind: None })["event"], "empty");
    }

    #[test]
    fn replies_carry_failed_nodes() {
        let r = pb::CountReply {
            sessions: 3,
            failed: vec![pb::NodeError {
                node_id: "n2".into(),
                code: pb::Code::NodeTimeout as i32,
                message: "slow".into(),
            }],
        };
        let v = count_reply(&r);
        assert_eq!(v["sessions"], 3);
        assert_eq!(v["failed_nodes"][0]["node_id"], "n2");
        assert_eq!(v["failed_nodes"][0]["code_name"], "CODE_NODE_TIMEOUT");
        let e = error("gateway refused", Some(pb::Code::UpstreamAuthFailed));
        assert_eq!(e["code_name"], "CODE_UPSTREAM_AUTH_FAILED");
        assert_eq!(error("x", None).get("code"), None);
    }
}
