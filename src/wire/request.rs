//! Validated client requests: the protobuf envelope converted with `TryFrom`,
//! so the session core only ever sees well-formed values.

use bytes::Bytes;
use prost::Message;

use super::pb::{self, client_frame::Body, Code, Platform};
use crate::ids::{DeviceId, RoomId};

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 128;
/// Longest client message id, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 64;
/// Longest uplink route, in bytes.
pub const MAX_ROUTE: usize = 128;
/// Longest room name, in bytes.
pub const MAX_ROOM: usize = 128;
/// Longest token, in bytes.
pub const MAX_TOKEN: usize = 8192;

/// A refused request: the code to answer with and the request id it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub request_id: u64,
    pub code: Code,
    pub message: String,
}

/// One validated client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientMsg {
    pub request_id: u64,
    pub request: ClientRequest,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientRequest {
    Login(LoginRequest),
    Ping {
        client_time_ms: u64,
    },
    Send(SendRequest),
    Ack {
        lane: pb::Lane,
        up_to_seq: u64,
        /// Selective acknowledgements above `up_to_seq` (inclusive ranges).
        ranges: Vec<(u64, u64)>,
    },
    Join(RoomId),
    Leave(RoomId),
    Close {
        code: Code,
        reason: String,
    },
    /// A new token for the logged-in session.
    Refresh(RefreshRequest),
}

/// A new token for a logged-in session (`Refresh`).
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshRequest {
    pub token: String,
}

impl std::fmt::Debug for RefreshRequest {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshRequest").finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq)]
pub struct LoginRequest {
    pub token: String,
    pub device: DeviceId,
    pub platform: Platform,
    pub protocol_version: u32,
    pub resume: Option<ResumeRequest>,
}

/// A request to resume a session (Login.resume).
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeRequest {
    pub session_id: u64,
    pub token: Bytes,
    /// The last seq received, per lane (interactive, bulk).
    pub last: [u64; 2],
}

impl std::fmt::Debug for ResumeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeRequest")
            .field("session_id", &self.session_id)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// Most selective-ack ranges in one Ack.
pub const MAX_ACK_RANGES: usize = 64;

impl std::fmt::Debug for LoginRequest {
    // The token is a credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginRequest")
            .field("device", &self.device)
            .field("platform", &self.platform)
            .field("protocol_version", &self.protocol_version)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    pub client_msg_id: String,
    pub route: String,
    pub payload: Bytes,
}

impl ClientMsg {
    /// Decodes and validates one frame body.
    ///
    /// # Errors
    /// A [`RequestError`] with `CODE_BAD_FRAME` when the bytes are not a
    /// `ClientFrame` or carry no body, `CODE_BAD_REQUEST` when a field is out of
    /// range. The request id is echoed whenever it could be read.
    pub fn decode(body: &[u8]) -> Result<Self, RequestError> {
        // The decoder's own words stay out of the reply: it may go to a peer
        // that has not logged in.
        let frame = pb::ClientFrame::decode(body).map_err(|_| RequestError {
            request_id: 0,
            code: Code::BadFrame,
            message: "undecodable ClientFrame".into(),
        })?;
        Self::try_from(frame)
    }
}

impl TryFrom<pb::ClientFrame> for ClientMsg {
    type Error = RequestError;

    fn try_from(frame: pb::ClientFrame) -> Result<Self, RequestError> {
        let request_id = frame.request_id;
        let bad = |message: String| RequestError {
            request_id,
            code: Code::BadRequest,
            message,
        };
        let request = match frame.body {
            None => {
                return Err(RequestError {
                    request_id,
                    code: Code::BadFrame,
                    message: "ClientFrame has no body".into(),
                })
            }
            Some(Body::Login(l)) => {
                check_len("device_id", &l.device_id, 1, MAX_DEVICE_ID).map_err(bad)?;
                check_len("token", &l.token, 1, MAX_TOKEN).map_err(bad)?;
                let resume = match l.resume {
                    Some(r) if r.session_id != 0 => {
                        if r.resume_token.len() > 256 {
                            return Err(bad("resume_token must be at most 256 bytes".into()));
                        }
                        Some(ResumeRequest {
                            session_id: r.session_id,
                            token: r.resume_token,
                            last: [r.last_seq, r.last_bulk_seq],
                        })
                    }
                    _ => None,
                };
                ClientRequest::Login(LoginRequest {
                    platform: Platform::try_from(l.platform).unwrap_or(Platform::Unspecified),
                    device: DeviceId::new(&l.device_id),
                    token: l.token,
                    protocol_version: l.protocol_version,
                    resume,
                })
            }
            Some(Body::Ping(p)) => ClientRequest::Ping {
                client_time_ms: p.client_time_ms,
            },
            Some(Body::Send(s)) => {
                check_len("client_msg_id", &s.client_msg_id, 1, MAX_CLIENT_MSG_ID).map_err(bad)?;
                check_len("route", &s.route, 0, MAX_ROUTE).map_err(bad)?;
                ClientRequest::Send(SendRequest {
                    client_msg_id: s.client_msg_id,
                    route: s.route,
                    payload: s.payload,
                })
            }
            Some(Body::Ack(a)) => {
                if a.ranges.len() > MAX_ACK_RANGES {
                    return Err(bad(format!("at most {MAX_ACK_RANGES} ack ranges")));
                }
                if a.ranges.iter().any(|r| r.first > r.last) {
                    return Err(bad("ack range with first > last".into()));
                }
                ClientRequest::Ack {
                    lane: pb::Lane::try_from(a.lane).unwrap_or(pb::Lane::Interactive),
                    up_to_seq: a.up_to_seq,
                    ranges: a.ranges.iter().map(|r| (r.first, r.last)).collect(),
                }
            }
            Some(Body::Join(j)) => ClientRequest::Join(room(&j.room).map_err(bad)?),
            Some(Body::Leave(l)) => ClientRequest::Leave(room(&l.room).map_err(bad)?),
            Some(Body::Close(c)) => ClientRequest::Close {
                code: Code::try_from(c.code).unwrap_or(Code::NormalClose),
                reason: truncate(c.reason, 256),
            },
            Some(Body::Refresh(r)) => {
                check_len("token", &r.token, 1, MAX_TOKEN).map_err(bad)?;
                ClientRequest::Refresh(RefreshRequest { token: r.token })
            }
        };
        Ok(ClientMsg {
            request_id,
            request,
        })
    }
}

/// Validates a room name: 1..=128 bytes, no control characters.
///
/// # Errors
/// A message naming the rule that was broken.
pub fn room(name: &str) -> Result<RoomId, String> {
    check_len("room", name, 1, MAX_ROOM)?;
    Ok(RoomId::new(name))
}

/// Validates a device id: 1..=128 bytes, no control characters.
///
/// # Errors
/// A message naming the rule that was broken.
pub fn device(id: &str) -> Result<DeviceId, String> {
    check_len("device_id", id, 1, MAX_DEVICE_ID)?;
    Ok(DeviceId::new(id))
}

fn check_len(field: &str, v: &str, min: usize, max: usize) -> Result<(), String> {
    if v.len() < min || v.len() > max {
        return Err(format!(
            "{field} must be {min}..={max} bytes, got {}",
            v.len()
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    Ok(())
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_body_is_bad_frame_with_request_id() {
        let f = pb::ClientFrame {
            request_id: 42,
            body: None,
        };
        let e = ClientMsg::decode(&f.encode_to_vec()).unwrap_err();
        assert_eq!((e.request_id, e.code), (42, Code::BadFrame));
    }

    #[test]
    fn device_id_range_is_enforced() {
        let f = pb::ClientFrame {
            request_id: 3,
            body: Some(Body::Login(pb::Login {
                token: "t".into(),
                device_id: "x".repeat(MAX_DEVICE_ID + 1),
                platform: 1,
                protocol_version: 1,
                resume: None,
            })),
        };
        let e = ClientMsg::decode(&f.encode_to_vec()).unwrap_err();
        assert_eq!((e.request_id, e.code), (3, Code::BadRequest));
    }

    #[test]
    fn garbage_is_bad_frame() {
        let e = ClientMsg::decode(&[0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(e.code, Code::BadFrame);
        assert_eq!(e.message, "undecodable ClientFrame", "no decoder internals");
    }

    #[test]
    fn refresh_token_range_is_enforced() {
        let f = |token: String| pb::ClientFrame {
            request_id: 5,
            body: Some(Body::Refresh(pb::Refresh { token })),
        };
        let e = ClientMsg::decode(&f(String::new()).encode_to_vec()).unwrap_err();
        assert_eq!((e.request_id, e.code), (5, Code::BadRequest));
        let e = ClientMsg::decode(&f("t".repeat(MAX_TOKEN + 1)).encode_to_vec()).unwrap_err();
        assert_eq!((e.request_id, e.code), (5, Code::BadRequest));
        let m = ClientMsg::decode(&f("a.b.c".into()).encode_to_vec()).unwrap();
        assert_eq!(
            m.request,
            ClientRequest::Refresh(RefreshRequest {
                token: "a.b.c".into()
            })
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("ééé".into(), 3), "é");
    }
}
