//! The sans-IO session state machine.
//!
//! States: `AwaitingLogin` → `Active` → `Closing` → `Closed`.
//! - `AwaitingLogin`: only `Login` and `Close` are valid. Any other frame
//!   (another request, an undecodable frame, a frame without a body, a Login
//!   with a field out of range) is answered with `Error{code}` and
//!   `Close{code}` at once (`CODE_NOT_LOGGED_IN`, `CODE_BAD_FRAME`,
//!   `CODE_BAD_REQUEST`), so a peer that has not logged in costs one reply.
//!   A refused Login closes the same way with its own code. The login
//!   deadline closes the connection with `CODE_LOGIN_TIMEOUT` (slowloris).
//! - `Active`: any frame from the peer resets the idle deadline; silence for
//!   `idle_timeout` closes with `CODE_HEARTBEAT_TIMEOUT`. A frame refused
//!   before it runs (`CODE_BAD_FRAME`, `CODE_BAD_REQUEST`,
//!   `CODE_ALREADY_LOGGED_IN`, `CODE_UNSUPPORTED`, a refused `Refresh`) adds
//!   one to an invalid-frame count, every other frame takes one off (never
//!   below 0); the refusal that brings the count to [`MAX_INVALID_FRAMES`] is
//!   followed by `Close` with its code. The token's `exp` plus the grace
//!   (`auth.leeway`) is a deadline too: it closes with `CODE_TOKEN_EXPIRED`
//!   unless a `Refresh` with a new token of the same user and device moved it.
//! - `Closing`: a `Close` frame is queued last; input is ignored; after
//!   [`CLOSE_LINGER`] the state becomes `Closed` even if the peer never read it.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::Identity;
use crate::config::{ClientJoin, Config};
use crate::ids::{RoomId, SessionId};
use crate::session::CloseCmd;
use crate::wire::{
    self, frame_bytes, pb, pb::server_frame::Body, ClientMsg, ClientRequest, Code, FrameError,
    LoginRequest, RefreshRequest, RequestError, SendRequest,
};

/// How long a closing session waits for its Close frame to be written and the
/// peer to hang up, before the connection is dropped regardless.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Control frames a session may have waiting before it stops reading from its
/// peer (backpressure on a client that sends requests but does not read).
const MAX_PENDING_CONTROL: usize = 64;

/// How far invalid frames of a logged-in session may run ahead of its valid
/// ones: each invalid frame adds one, each valid frame takes one off, and the
/// refusal that reaches this closes the connection. A correct client never
/// gets near it; a buggy or hostile one costs at most this many error replies
/// beyond its valid traffic, instead of one per frame for ever.
pub const MAX_INVALID_FRAMES: u8 = 16;

/// The per-session settings, taken from [`Config`] once.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub login_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    pub max_frame: usize,
    pub client_join: ClientJoin,
    pub node_id: String,
    /// How long after its token's `exp` a session is closed
    /// (`auth.leeway`: as long as the token would still be accepted at login).
    pub token_grace: Duration,
    /// The instant token deadlines count from, in whole seconds (no later
    /// than any session's `now`); it keeps the deadline at 4 bytes.
    pub epoch: Instant,
}

impl SessionParams {
    /// The settings of `cfg`; `epoch` is the gateway's start.
    pub fn from_config(cfg: &Config, epoch: Instant) -> Self {
        Self {
            login_timeout: cfg.session.login_timeout,
            heartbeat_interval: cfg.session.heartbeat_interval,
            idle_timeout: cfg.session.idle_timeout,
            max_frame: cfg.limits.max_frame as usize,
            client_join: cfg.session.client_join,
            node_id: cfg.node_id.clone(),
            token_grace: cfg.auth.leeway,
            epoch,
        }
    }
}

/// What a successful login grants.
#[derive(Debug, Clone)]
pub struct LoginGrant {
    pub session_id: SessionId,
    pub identity: Identity,
    /// The token a client presents to resume this session.
    pub resume_token: Bytes,
    /// The outcome of the resume the login asked for, if it asked.
    pub resume: Option<pb::ResumeResult>,
    pub next_uplink_seq: u64,
    /// The token's `exp`, seconds since the Unix epoch; `None`: unbounded.
    pub token_exp: Option<u64>,
}

/// What an accepted `Refresh` grants.
#[derive(Debug, Clone)]
pub struct Refreshed {
    /// The new token's `exp`, seconds since the Unix epoch; `None`: unbounded.
    pub token_exp: Option<u64>,
    /// The new token's room patterns (for later Joins).
    pub rooms: Box<[Box<str>]>,
}

/// What an accepted uplink is acknowledged with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UplinkAck {
    pub server_msg_id: u64,
    /// The authoritative per-session uplink sequence.
    pub seq: u64,
    /// A retry of a message already accepted: nothing was forwarded again.
    pub duplicate: bool,
}

/// The side effects a session needs from the gateway. Implementations do no
/// blocking IO; the gateway's implementation touches the registry and the bus.
pub trait SessionEnv {
    /// Verifies the token, applies login limits, and registers the session.
    ///
    /// # Errors
    /// The code and message to answer the login with; the session then closes.
    fn login(&mut self, now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)>;
    /// Verifies a new token for this logged-in session: it must name the
    /// session's user and admit its device.
    ///
    /// # Errors
    /// The code and message to answer the Refresh with; the session goes on
    /// under its current token.
    fn refresh(&mut self, now: Instant, req: &RefreshRequest) -> Result<Refreshed, (Code, String)>;
    /// Hands an uplink to the upstream (or recognises a retry of one).
    ///
    /// # Errors
    /// The code for the SendAck (e.g. `CODE_UPSTREAM_UNAVAILABLE`).
    fn uplink(&mut self, now: Instant, req: SendRequest) -> Result<UplinkAck, Code>;
    /// Adds this session to a room (authorization already checked).
    ///
    /// # Errors
    /// E.g. `CODE_TOO_MANY_ROOMS`.
    fn join(&mut self, room: &RoomId) -> Result<(), Code>;
    /// Removes this session from a room.
    fn leave(&mut self, room: &RoomId);
    /// Acknowledgement of the pushes of `lane` up to `up_to_seq`, and of the
    /// inclusive `ranges` above it.
    fn ack(&mut self, now: Instant, lane: pb::Lane, up_to_seq: u64, ranges: &[(u64, u64)]);
    /// Wall clock in milliseconds since the Unix epoch (for LoginOk and Pong).
    fn wall_ms(&self) -> u64;
}

#[derive(Debug)]
enum State {
    AwaitingLogin {
        deadline: Instant,
    },
    /// Only the room patterns of the identity stay here; who the session
    /// belongs to lives in its shared handle.
    Active {
        rooms: Box<[Box<str>]>,
        idle_deadline: Instant,
    },
    Closing {
        deadline: Instant,
        code: Code,
    },
    Closed {
        code: Code,
    },
}

/// Control frames waiting to be written. Boxed and allocated only while
/// frames are waiting, so an idle session pays 8 bytes for it.
// The box is the point: 8 bytes inline instead of a VecDeque's 32.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
struct OutQueue(Option<Box<VecDeque<Bytes>>>);

impl OutQueue {
    fn push_back(&mut self, b: Bytes) {
        self.0.get_or_insert_with(Box::default).push_back(b);
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        let q = self.0.as_mut()?;
        let f = q.pop_front();
        if q.is_empty() {
            self.0 = None;
        }
        f
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    params: std::sync::Arc<SessionParams>,
    /// Encoded control frames waiting to be written (replies, errors); when
    /// `close_last` is set, the last one is the Close frame, written after
    /// everything else (it shares this queue to keep idle sessions small).
    out: OutQueue,
    close_last: bool,
    /// Invalid frames ahead of valid ones (see [`MAX_INVALID_FRAMES`]).
    invalid: u8,
    /// When the token runs out: whole seconds after `params.epoch`, rounded
    /// up. Kept out of `State` and at 4 bytes so the session stays 56 bytes.
    token_deadline: Option<NonZeroU32>,
}

impl Session {
    /// A new connection accepted at `now`.
    pub fn new(now: Instant, params: std::sync::Arc<SessionParams>) -> Self {
        Self {
            state: State::AwaitingLogin {
                deadline: now + params.login_timeout,
            },
            params,
            out: OutQueue::default(),
            close_last: false,
            invalid: 0,
            token_deadline: None,
        }
    }

    /// Feeds one complete frame body (the length prefix already removed).
    pub fn handle_frame(&mut self, now: Instant, body: &[u8], env: &mut dyn SessionEnv) {
        if matches!(self.state, State::Closing { .. } | State::Closed { .. }) {
            return;
        }
        let was_active = if let State::Active { idle_deadline, .. } = &mut self.state {
            *idle_deadline = now + self.params.idle_timeout;
            true
        } else {
            false
        };
        let invalid_before = self.invalid;
        match ClientMsg::decode(body) {
            Ok(msg) => self.handle_msg(now, msg, env),
            Err(e) => self.refuse(now, e),
        }
        if was_active && self.invalid <= invalid_before {
            // A valid frame earns one invalid frame back.
            self.invalid = self.invalid.saturating_sub(1);
        }
    }

    /// Reports a framing error (the connection's byte stream is unusable).
    pub fn handle_frame_error(&mut self, now: Instant, e: FrameError) {
        let FrameError::TooLarge { len, max } = e;
        self.close(
            now,
            CloseCmd::new(
                Code::FrameTooLarge,
                format!("frame of {len} bytes exceeds the maximum of {max}"),
            ),
        );
    }

    /// The peer closed its side (EOF) or the socket failed.
    pub fn handle_peer_gone(&mut self, code: Code) {
        self.drop_output();
        if !matches!(self.state, State::Closed { .. }) {
            let code = match self.state {
                State::Closing { code, .. } => code,
                _ => code,
            };
            self.state = State::Closed { code };
        }
    }

    /// Applies timeouts due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::AwaitingLogin { deadline } if now >= *deadline => self.close(
                now,
                CloseCmd::new(Code::LoginTimeout, "no login within the login timeout"),
            ),
            State::Active { .. } if self.token_deadline().is_some_and(|t| now >= t) => self.close(
                now,
                CloseCmd::new(
                    Code::TokenExpired,
                    "the token expired; refresh it before its exp",
                ),
            ),
            State::Active { idle_deadline, .. } if now >= *idle_deadline => self.close(
                now,
                CloseCmd::new(Code::HeartbeatTimeout, "no frame within the idle timeout"),
            ),
            State::Closing { deadline, code } if now >= *deadline => {
                let code = *code;
                self.drop_output();
                self.state = State::Closed { code };
            }
            _ => {}
        }
    }

    /// Starts closing: queue a Close frame after the pending output.
    pub fn close(&mut self, now: Instant, cmd: CloseCmd) {
        if matches!(self.state, State::Closing { .. } | State::Closed { .. }) {
            return;
        }
        let frame = pb::ServerFrame {
            request_id: 0,
            body: Some(Body::Close(pb::Close {
                code: cmd.code as i32,
                reason: cmd.reason,
                reconnect_to: cmd.reconnect_to,
                reconnect_after_ms: cmd.reconnect_after_ms,
            })),
        };
        self.out.push_back(frame_bytes(&frame));
        self.close_last = true;
        self.state = State::Closing {
            deadline: now + CLOSE_LINGER,
            code: cmd.code,
        };
    }

    /// The next instant at which [`Session::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingLogin { deadline } => Some(*deadline),
            State::Active { idle_deadline, .. } => Some(match self.token_deadline() {
                Some(t) => t.min(*idle_deadline),
                None => *idle_deadline,
            }),
            State::Closing { deadline, .. } => Some(*deadline),
            State::Closed { .. } => None,
        }
    }

    /// The next control frame to write, if any. The Close frame comes last.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.close_last && self.out.len() <= 1 {
            return None;
        }
        self.out.pop_front()
    }

    /// The Close frame, once every other control frame has been taken.
    pub fn poll_close_frame(&mut self) -> Option<Bytes> {
        if self.close_last && self.out.len() == 1 {
            self.close_last = false;
            self.out.pop_front()
        } else {
            None
        }
    }

    /// When the session's token runs out (its `exp` plus the grace), while
    /// logged in with a token that has an expiry.
    pub fn token_deadline(&self) -> Option<Instant> {
        let secs = self.token_deadline?.get();
        self.params
            .epoch
            .checked_add(Duration::from_secs(u64::from(secs)))
    }

    /// The coarse deadline of a token expiring at `exp` (Unix seconds), seen
    /// at `now` when the wall clock reads `wall_ms`: `exp` plus the grace,
    /// rounded up to whole seconds after the epoch (so never early).
    fn deadline_of(&self, now: Instant, wall_ms: u64, exp: Option<u64>) -> Option<NonZeroU32> {
        let end_ms = exp?
            .saturating_mul(1000)
            .saturating_add(self.params.token_grace.as_millis() as u64);
        let left = Duration::from_millis(end_ms.saturating_sub(wall_ms));
        let since = now
            .saturating_duration_since(self.params.epoch)
            .saturating_add(left);
        let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
        NonZeroU32::new(secs.clamp(1, u64::from(u32::MAX)) as u32)
    }

    fn drop_output(&mut self) {
        self.out = OutQueue::default();
        self.close_last = false;
    }

    /// Whether the driver should read more input now.
    pub fn wants_input(&self) -> bool {
        matches!(
            self.state,
            State::AwaitingLogin { .. } | State::Active { .. }
        ) && self.out.len() < MAX_PENDING_CONTROL
    }

    /// Since when the peer has been silent, while logged in with no control
    /// frame waiting to be written (a connection may park after a while).
    pub fn quiet_since(&self) -> Option<Instant> {
        match &self.state {
            State::Active { idle_deadline, .. } if self.out.is_empty() && !self.close_last => {
                idle_deadline.checked_sub(self.params.idle_timeout)
            }
            _ => None,
        }
    }

    /// Logged in and not closing: pushes may flow.
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Active { .. })
    }

    /// Closing or closed.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing { .. } | State::Closed { .. })
    }

    /// Nothing more will be written: the connection can be dropped.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed { .. })
    }

    /// The close code, once closing.
    pub fn close_code(&self) -> Option<Code> {
        match self.state {
            State::Closing { code, .. } | State::Closed { code } => Some(code),
            _ => None,
        }
    }

    /// The Close frame is written and the peer hung up (or will not read):
    /// the Closing state may finish before its deadline.
    pub fn handle_flushed_and_gone(&mut self) {
        if let State::Closing { code, .. } = self.state {
            if self.out.is_empty() {
                self.state = State::Closed { code };
            }
        }
    }

    fn handle_msg(&mut self, now: Instant, msg: ClientMsg, env: &mut dyn SessionEnv) {
        let rid = msg.request_id;
        match (&self.state, msg.request) {
            (State::AwaitingLogin { .. }, ClientRequest::Login(req)) => {
                self.login(now, rid, req, env)
            }
            (State::AwaitingLogin { .. }, ClientRequest::Close { .. })
            | (State::Active { .. }, ClientRequest::Close { .. }) => {
                self.close(now, CloseCmd::new(Code::NormalClose, "goodbye"));
            }
            (State::AwaitingLogin { .. }, _) => self.refuse(
                now,
                RequestError {
                    request_id: rid,
                    code: Code::NotLoggedIn,
                    message: "log in first".into(),
                },
            ),
            (State::Active { .. }, ClientRequest::Login(_)) => self.refuse(
                now,
                RequestError {
                    request_id: rid,
                    code: Code::AlreadyLoggedIn,
                    message: "this connection is already logged in".into(),
                },
            ),
            (State::Active { .. }, ClientRequest::Refresh(req)) => self.refresh(now, rid, req, env),
            (State::Active { .. }, ClientRequest::Ping { client_time_ms }) => self.reply(
                rid,
                Body::Pong(pb::Pong {
                    client_time_ms,
                    server_time_ms: env.wall_ms(),
                }),
            ),
            (State::Active { .. }, ClientRequest::Send(req)) => {
                let client_msg_id = req.client_msg_id.clone();
                let ack = match env.uplink(now, req) {
                    Ok(a) => pb::SendAck {
                        client_msg_id,
                        server_msg_id: a.server_msg_id,
                        code: Code::Ok as i32,
                        seq: a.seq,
                        duplicate: a.duplicate,
                    },
                    Err(code) => pb::SendAck {
                        client_msg_id,
                        code: code as i32,
                        ..pb::SendAck::default()
                    },
                };
                self.reply(rid, Body::SendAck(ack));
            }
            (
                State::Active { .. },
                ClientRequest::Ack {
                    lane,
                    up_to_seq,
                    ranges,
                },
            ) => env.ack(now, lane, up_to_seq, &ranges),
            (State::Active { rooms, .. }, ClientRequest::Join(room)) => {
                if self.params.client_join == ClientJoin::Off {
                    return self.refuse(
                        now,
                        RequestError {
                            request_id: rid,
                            code: Code::Unsupported,
                            message: "client-side rooms are disabled".into(),
                        },
                    );
                }
                let allowed = match self.params.client_join {
                    // Refused above already, as an invalid frame.
                    ClientJoin::Off => Err(Code::Unsupported),
                    ClientJoin::Any => Ok(()),
                    ClientJoin::Token if crate::auth::room_allowed(rooms, &room) => Ok(()),
                    ClientJoin::Token => Err(Code::RoomForbidden),
                };
                match allowed.and_then(|()| env.join(&room)) {
                    Ok(()) => self.reply(
                        rid,
                        Body::RoomOk(pb::RoomOk {
                            room: room.to_string(),
                            joined: true,
                        }),
                    ),
                    Err(code) => self.reply_error(RequestError {
                        request_id: rid,
                        code,
                        message: format!("cannot join room {room}"),
                    }),
                }
            }
            (State::Active { .. }, ClientRequest::Leave(room)) => {
                if self.params.client_join == ClientJoin::Off {
                    self.refuse(
                        now,
                        RequestError {
                            request_id: rid,
                            code: Code::Unsupported,
                            message: "client-side rooms are disabled".into(),
                        },
                    );
                } else {
                    env.leave(&room);
                    self.reply(
                        rid,
                        Body::RoomOk(pb::RoomOk {
                            room: room.to_string(),
                            joined: false,
                        }),
                    );
                }
            }
            (State::Closing { .. } | State::Closed { .. }, _) => {}
        }
    }

    fn login(&mut self, now: Instant, rid: u64, req: LoginRequest, env: &mut dyn SessionEnv) {
        if !wire::PROTOCOL_VERSIONS.contains(&req.protocol_version) {
            let msg = format!(
                "protocol version {} is not supported; this gateway speaks {}..={}",
                req.protocol_version,
                wire::PROTOCOL_VERSIONS.start(),
                wire::PROTOCOL_VERSIONS.end()
            );
            return self.refuse_login(now, rid, Code::UnsupportedVersion, msg);
        }
        match env.login(now, &req) {
            Ok(grant) => {
                let p = &self.params;
                let ok = pb::LoginOk {
                    session_id: grant.session_id.0,
                    heartbeat_interval_ms: p.heartbeat_interval.as_millis().min(u32::MAX as u128)
                        as u32,
                    node_id: p.node_id.clone(),
                    server_time_ms: env.wall_ms(),
                    protocol_version: req.protocol_version,
                    max_frame_len: p.max_frame as u32,
                    user_id: grant.identity.user.to_string(),
                    resume_token: grant.resume_token,
                    resume: grant.resume,
                    next_uplink_seq: grant.next_uplink_seq,
                    token_exp_ms: exp_ms(grant.token_exp),
                };
                self.token_deadline = self.deadline_of(now, ok.server_time_ms, grant.token_exp);
                self.state = State::Active {
                    rooms: grant.identity.rooms,
                    idle_deadline: now + p.idle_timeout,
                };
                self.reply(rid, Body::LoginOk(ok));
            }
            Err((code, msg)) => self.refuse_login(now, rid, code, msg),
        }
    }

    fn refresh(&mut self, now: Instant, rid: u64, req: RefreshRequest, env: &mut dyn SessionEnv) {
        match env.refresh(now, &req) {
            Ok(r) => {
                let wall_ms = env.wall_ms();
                self.token_deadline = self.deadline_of(now, wall_ms, r.token_exp);
                if let State::Active { rooms, .. } = &mut self.state {
                    *rooms = r.rooms;
                }
                self.reply(
                    rid,
                    Body::RefreshOk(pb::RefreshOk {
                        token_exp_ms: exp_ms(r.token_exp),
                        server_time_ms: wall_ms,
                    }),
                );
            }
            Err((code, message)) => self.refuse(
                now,
                RequestError {
                    request_id: rid,
                    code,
                    message,
                },
            ),
        }
    }

    /// Answers a frame refused before it ran. Before login that closes the
    /// connection; after it, the refusal counts towards
    /// [`MAX_INVALID_FRAMES`], and the one that reaches it closes.
    fn refuse(&mut self, now: Instant, e: RequestError) {
        match self.state {
            State::AwaitingLogin { .. } => self.refuse_login(now, e.request_id, e.code, e.message),
            State::Active { .. } => {
                self.invalid = self.invalid.saturating_add(1);
                let code = e.code;
                self.reply_error(e);
                if self.invalid >= MAX_INVALID_FRAMES {
                    self.close(
                        now,
                        CloseCmd::new(
                            code,
                            format!("{MAX_INVALID_FRAMES} more invalid frames than valid ones"),
                        ),
                    );
                }
            }
            State::Closing { .. } | State::Closed { .. } => {}
        }
    }

    fn refuse_login(&mut self, now: Instant, rid: u64, code: Code, message: String) {
        self.reply_error(RequestError {
            request_id: rid,
            code,
            message: message.clone(),
        });
        self.close(now, CloseCmd::new(code, message));
    }

    fn reply(&mut self, request_id: u64, body: Body) {
        self.out.push_back(frame_bytes(&pb::ServerFrame {
            request_id,
            body: Some(body),
        }));
    }

    fn reply_error(&mut self, e: RequestError) {
        self.reply(
            e.request_id,
            Body::Error(pb::Error {
                code: e.code as i32,
                message: e.message,
            }),
        );
    }
}

/// `exp` (Unix seconds) in milliseconds, as LoginOk and RefreshOk carry it;
/// 0 for a token without expiry.
fn exp_ms(exp: Option<u64>) -> u64 {
    exp.map_or(0, |e| e.saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    //! Deterministic tests on virtual time: `now` is a base instant plus offsets.
    use super::*;
    use crate::ids::UserId;
    use crate::wire::pb::client_frame::Body as Req;
    use prost::Message;

    #[derive(Default)]
    struct Fake {
        logins: u32,
        uplinks: Vec<SendRequest>,
        refuse: Option<Code>,
        upstream_down: bool,
        joined: Vec<RoomId>,
        acks: Vec<u64>,
        /// The `exp` of the login token (Unix seconds).
        exp: Option<u64>,
        /// What a Refresh gets: a new `exp`, or a refusal.
        refresh: Option<Result<u64, Code>>,
        refreshes: u32,
    }

    impl SessionEnv for Fake {
        fn login(
            &mut self,
            _now: Instant,
            req: &LoginRequest,
        ) -> Result<LoginGrant, (Code, String)> {
            self.logins += 1;
            if let Some(c) = self.refuse {
                return Err((c, "refused".into()));
            }
            Ok(LoginGrant {
                session_id: SessionId(7),
                identity: Identity {
                    user: UserId::new("alice"),
                    device: req.device.clone(),
                    rooms: vec!["lobby".into()].into_boxed_slice(),
                },
                resume_token: Bytes::from_static(b"rt"),
                resume: None,
                next_uplink_seq: 1,
                token_exp: self.exp,
            })
        }
        fn refresh(
            &mut self,
            _now: Instant,
            _req: &RefreshRequest,
        ) -> Result<Refreshed, (Code, String)> {
            self.refreshes += 1;
            match self.refresh {
                Some(Ok(exp)) => Ok(Refreshed {
                    token_exp: Some(exp),
                    rooms: vec!["lobby".into(), "vip".into()].into_boxed_slice(),
                }),
                Some(Err(c)) => Err((c, "refused".into())),
                None => Err((Code::TokenInvalid, "refused".into())),
            }
        }
        fn uplink(&mut self, _now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
            if self.upstream_down {
                return Err(Code::UpstreamUnavailable);
            }
            self.uplinks.push(req);
            let n = self.uplinks.len() as u64;
            Ok(UplinkAck {
                server_msg_id: n,
                seq: n,
                duplicate: false,
            })
        }
        fn join(&mut self, room: &RoomId) -> Result<(), Code> {
            self.joined.push(room.clone());
            Ok(())
        }
        fn leave(&mut self, _room: &RoomId) {}
        fn ack(&mut self, _now: Instant, _lane: pb::Lane, up_to_seq: u64, _ranges: &[(u64, u64)]) {
            self.acks.push(up_to_seq);
        }
        fn wall_ms(&self) -> u64 {
            WALL_MS
        }
    }

    /// The fake's wall clock: constant, so `exp` maps onto virtual time as
    /// `t0 + (exp - WALL_S)` seconds for a session that logs in at `t0`.
    const WALL_MS: u64 = 1_700_000_000_000;
    const WALL_S: u64 = WALL_MS / 1000;
    const GRACE: Duration = Duration::from_secs(30);

    /// The epoch is fixed per thread, so that every test's `t0` (taken after
    /// it) lies at or after it.
    fn epoch() -> Instant {
        thread_local!(static EPOCH: Instant = Instant::now());
        EPOCH.with(|e| *e)
    }

    fn params() -> Arc<SessionParams> {
        Arc::new(SessionParams {
            login_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(45),
            idle_timeout: Duration::from_secs(135),
            max_frame: 65536,
            client_join: ClientJoin::Token,
            node_id: "n1".into(),
            token_grace: GRACE,
            epoch: epoch(),
        })
    }

    /// A `t0` a whole number of seconds after the epoch, so token deadlines
    /// (whole seconds after the epoch) fall exactly on `exp + GRACE`.
    fn t0() -> Instant {
        epoch() + Duration::from_secs(1)
    }

    use std::sync::Arc;

    fn frame(request_id: u64, body: Req) -> Vec<u8> {
        pb::ClientFrame {
            request_id,
            body: Some(body),
        }
        .encode_to_vec()
    }

    fn login(version: u32) -> Req {
        Req::Login(pb::Login {
            token: "t".into(),
            device_id: "phone".into(),
            platform: pb::Platform::Ios as i32,
            protocol_version: version,
            resume: None,
        })
    }

    fn out(s: &mut Session) -> Vec<pb::ServerFrame> {
        let mut v = Vec::new();
        while let Some(b) = s.poll_transmit() {
            v.push(decode(b));
        }
        v
    }

    fn decode(b: Bytes) -> pb::ServerFrame {
        let mut buf = bytes::BytesMut::from(&b[..]);
        let body = crate::wire::decode_frame(&mut buf, 1 << 20)
            .unwrap()
            .unwrap();
        pb::ServerFrame::decode(body).unwrap()
    }

    fn code_of(f: &pb::ServerFrame) -> Code {
        match &f.body {
            Some(Body::Error(e)) => Code::try_from(e.code).unwrap(),
            Some(Body::Close(c)) => Code::try_from(c.code).unwrap(),
            Some(Body::SendAck(a)) => Code::try_from(a.code).unwrap(),
            other => panic!("no code in {other:?}"),
        }
    }

    fn active(t0: Instant, env: &mut Fake) -> Session {
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &frame(1, login(1)), env);
        assert!(s.is_active());
        let o = out(&mut s);
        assert!(matches!(o[0].body, Some(Body::LoginOk(_))));
        s
    }

    #[test]
    fn login_ok_reports_session_and_heartbeat() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &frame(9, login(1)), &mut env);
        let o = out(&mut s);
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].request_id, 9);
        let Some(Body::LoginOk(ok)) = &o[0].body else {
            panic!()
        };
        assert_eq!(
            (ok.session_id, ok.heartbeat_interval_ms, ok.user_id.as_str()),
            (7, 45_000, "alice")
        );
        assert_eq!(ok.node_id, "n1");
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(135)));
    }

    /// Error then Close with `code`, echoing `rid`, and nothing after.
    fn assert_refused_and_closing(s: &mut Session, rid: u64, code: Code) {
        let o = out(s);
        assert_eq!(o.len(), 1, "{o:?}");
        assert_eq!((o[0].request_id, code_of(&o[0])), (rid, code));
        assert_eq!(code_of(&decode(s.poll_close_frame().unwrap())), code);
        assert_eq!(s.close_code(), Some(code));
    }

    #[test]
    fn a_request_before_login_closes_with_not_logged_in_and_does_not_run() {
        let t0 = Instant::now();
        let send = Req::Send(pb::Send {
            client_msg_id: "c1".into(),
            route: "r".into(),
            payload: Bytes::from_static(b"x"),
        });
        let refresh = Req::Refresh(pb::Refresh { token: "t".into() });
        for req in [
            send,
            Req::Ping(pb::Ping { client_time_ms: 1 }),
            Req::Join(pb::Join {
                room: "lobby".into(),
            }),
            refresh,
        ] {
            let mut env = Fake::default();
            let mut s = Session::new(t0, params());
            s.handle_frame(t0, &frame(3, req), &mut env);
            assert_refused_and_closing(&mut s, 3, Code::NotLoggedIn);
            // Whatever follows is not read: not even a Login.
            s.handle_frame(t0, &frame(4, login(1)), &mut env);
            assert!(out(&mut s).is_empty());
            assert!(env.uplinks.is_empty() && env.joined.is_empty());
            assert_eq!((env.logins, env.refreshes), (0, 0));
        }
    }

    #[test]
    fn an_invalid_frame_before_login_closes_with_its_code() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        // A zero-length frame: a ClientFrame without a body.
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &[], &mut env);
        assert_refused_and_closing(&mut s, 0, Code::BadFrame);
        // Undecodable bytes.
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &[0xff, 0xff, 0xff], &mut env);
        assert_refused_and_closing(&mut s, 0, Code::BadFrame);
        // A Login with a field out of range.
        let mut s = Session::new(t0, params());
        let bad = Req::Login(pb::Login {
            token: String::new(),
            device_id: "phone".into(),
            platform: 1,
            protocol_version: 1,
            resume: None,
        });
        s.handle_frame(t0, &frame(8, bad), &mut env);
        assert_refused_and_closing(&mut s, 8, Code::BadRequest);
        assert_eq!(env.logins, 0);
    }

    #[test]
    fn close_before_login_is_a_normal_close() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &frame(0, Req::Close(pb::Close::default())), &mut env);
        assert!(out(&mut s).is_empty());
        assert_eq!(s.close_code(), Some(Code::NormalClose));
    }

    #[test]
    fn a_run_of_invalid_frames_closes_at_the_bound_not_before() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        for i in 1..MAX_INVALID_FRAMES {
            s.handle_frame(t0, &[], &mut env);
            assert!(s.is_active(), "closed after {i} invalid frames");
        }
        assert_eq!(out(&mut s).len(), usize::from(MAX_INVALID_FRAMES) - 1);
        s.handle_frame(t0, &[], &mut env);
        assert_refused_and_closing(&mut s, 0, Code::BadFrame);
    }

    #[test]
    fn valid_frames_earn_invalid_ones_back() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        let ping = frame(2, Req::Ping(pb::Ping { client_time_ms: 1 }));
        // Up to one below the bound, then one valid frame per invalid one:
        // the count never reaches the bound.
        for _ in 1..MAX_INVALID_FRAMES {
            s.handle_frame(t0, &[], &mut env);
        }
        for _ in 0..1000 {
            s.handle_frame(t0, &ping, &mut env);
            s.handle_frame(t0, &frame(3, login(1)), &mut env);
            out(&mut s);
        }
        assert!(s.is_active());
        // One more invalid frame now reaches it.
        s.handle_frame(t0, &frame(4, login(1)), &mut env);
        assert_refused_and_closing(&mut s, 4, Code::AlreadyLoggedIn);
    }

    #[test]
    fn token_expiry_closes_at_exp_plus_grace_not_before() {
        let t0 = t0();
        let exp = WALL_S + 600;
        let mut env = Fake {
            exp: Some(exp),
            ..Fake::default()
        };
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &frame(1, login(1)), &mut env);
        let o = out(&mut s);
        let Some(Body::LoginOk(ok)) = &o[0].body else {
            panic!("{o:?}")
        };
        assert_eq!(ok.token_exp_ms, exp * 1000, "the client is told exp");
        let deadline = t0 + Duration::from_secs(600) + GRACE;
        assert_eq!(s.token_deadline(), Some(deadline));
        // Keep the session busy so that only the token can end it.
        let mut now = t0;
        while now + Duration::from_secs(100) < deadline {
            now += Duration::from_secs(100);
            s.handle_frame(
                now,
                &frame(2, Req::Ping(pb::Ping { client_time_ms: 1 })),
                &mut env,
            );
            s.handle_timeout(now);
            assert!(s.is_active());
        }
        assert_eq!(s.poll_timeout(), Some(deadline), "the driver wakes it then");
        s.handle_timeout(deadline - Duration::from_millis(1));
        assert!(s.is_active());
        s.handle_timeout(deadline);
        assert_eq!(s.close_code(), Some(Code::TokenExpired));
        out(&mut s);
        assert_eq!(
            code_of(&decode(s.poll_close_frame().unwrap())),
            Code::TokenExpired
        );
    }

    #[test]
    fn a_token_without_exp_does_not_bound_the_session() {
        let t0 = t0();
        let mut env = Fake::default();
        let s = active(t0, &mut env);
        assert_eq!(s.token_deadline(), None);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(135)));
    }

    #[test]
    fn refresh_moves_the_deadline_and_adopts_the_rooms() {
        let t0 = t0();
        let mut env = Fake {
            exp: Some(WALL_S + 60),
            refresh: Some(Ok(WALL_S + 3600)),
            ..Fake::default()
        };
        let mut s = active(t0, &mut env);
        let first = t0 + Duration::from_secs(60) + GRACE;
        assert_eq!(s.poll_timeout(), Some(first));
        let t1 = t0 + Duration::from_secs(50);
        s.handle_frame(
            t1,
            &frame(5, Req::Refresh(pb::Refresh { token: "t2".into() })),
            &mut env,
        );
        let o = out(&mut s);
        assert_eq!(o[0].request_id, 5);
        let Some(Body::RefreshOk(r)) = &o[0].body else {
            panic!("{o:?}")
        };
        assert_eq!(
            (r.token_exp_ms, r.server_time_ms),
            ((WALL_S + 3600) * 1000, WALL_MS)
        );
        // The fake's wall clock stands still, so the new exp counts from t1.
        let moved = t1 + Duration::from_secs(3600) + GRACE;
        assert_eq!(s.token_deadline(), Some(moved));
        s.handle_timeout(first);
        assert!(s.is_active(), "the old deadline no longer applies");
        // The new token's rooms claim applies to later joins.
        s.handle_frame(
            first,
            &frame(6, Req::Join(pb::Join { room: "vip".into() })),
            &mut env,
        );
        assert!(matches!(&out(&mut s)[0].body, Some(Body::RoomOk(r)) if r.joined));
    }

    #[test]
    fn a_refused_refresh_keeps_the_old_deadline() {
        let t0 = t0();
        for code in [Code::TokenInvalid, Code::DeviceMismatch, Code::TokenExpired] {
            let mut env = Fake {
                exp: Some(WALL_S + 60),
                refresh: Some(Err(code)),
                ..Fake::default()
            };
            let mut s = active(t0, &mut env);
            let deadline = s.token_deadline();
            s.handle_frame(
                t0,
                &frame(5, Req::Refresh(pb::Refresh { token: "t2".into() })),
                &mut env,
            );
            let o = out(&mut s);
            assert_eq!((o[0].request_id, code_of(&o[0])), (5, code));
            assert!(s.is_active(), "a refused refresh does not close");
            assert_eq!(s.token_deadline(), deadline);
            s.handle_timeout(deadline.unwrap());
            assert_eq!(s.close_code(), Some(Code::TokenExpired));
        }
    }

    #[test]
    fn unsupported_version_refuses_and_closes() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        for v in [0, 2, 99] {
            let mut s = Session::new(t0, params());
            s.handle_frame(t0, &frame(1, login(v)), &mut env);
            let o = out(&mut s);
            assert_eq!(
                (o[0].request_id, code_of(&o[0])),
                (1, Code::UnsupportedVersion)
            );
            let close = decode(s.poll_close_frame().unwrap());
            assert_eq!(code_of(&close), Code::UnsupportedVersion);
            assert!(s.is_closing());
        }
        assert_eq!(
            env.logins, 0,
            "the token is never checked for an unknown version"
        );
    }

    #[test]
    fn refused_login_closes_with_its_code() {
        let t0 = Instant::now();
        let mut env = Fake {
            refuse: Some(Code::TokenExpired),
            ..Fake::default()
        };
        let mut s = Session::new(t0, params());
        s.handle_frame(t0, &frame(2, login(1)), &mut env);
        assert_eq!(code_of(&out(&mut s)[0]), Code::TokenExpired);
        assert_eq!(
            code_of(&decode(s.poll_close_frame().unwrap())),
            Code::TokenExpired
        );
        // Input after the close does nothing.
        s.handle_frame(t0, &frame(3, login(1)), &mut env);
        assert!(out(&mut s).is_empty());
        assert_eq!(env.logins, 1);
    }

    #[test]
    fn login_timeout_closes_at_the_deadline_not_before() {
        let t0 = Instant::now();
        let mut s = Session::new(t0, params());
        s.handle_timeout(t0 + Duration::from_millis(9_999));
        assert!(!s.is_closing());
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(10)));
        s.handle_timeout(t0 + Duration::from_secs(10));
        assert_eq!(s.close_code(), Some(Code::LoginTimeout));
        assert_eq!(
            code_of(&decode(s.poll_close_frame().unwrap())),
            Code::LoginTimeout
        );
        // The linger deadline then drops the connection even if the peer never reads.
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + Duration::from_secs(10) + CLOSE_LINGER)
        );
        s.handle_timeout(t0 + Duration::from_secs(10) + CLOSE_LINGER);
        assert!(s.is_closed());
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn any_frame_resets_idle_deadline_and_silence_closes() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        let t1 = t0 + Duration::from_secs(100);
        s.handle_frame(
            t1,
            &frame(2, Req::Ping(pb::Ping { client_time_ms: 5 })),
            &mut env,
        );
        let o = out(&mut s);
        let Some(Body::Pong(p)) = &o[0].body else {
            panic!()
        };
        assert_eq!((o[0].request_id, p.client_time_ms), (2, 5));
        s.handle_timeout(t0 + Duration::from_secs(135));
        assert!(s.is_active(), "the ping at t+100s moved the deadline");
        s.handle_timeout(t1 + Duration::from_secs(135));
        assert_eq!(s.close_code(), Some(Code::HeartbeatTimeout));
    }

    #[test]
    fn send_acks_with_server_id_or_unavailable() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        let send = |id: &str| {
            Req::Send(pb::Send {
                client_msg_id: id.into(),
                route: "chat".into(),
                payload: Bytes::from_static(b"hi"),
            })
        };
        s.handle_frame(t0, &frame(2, send("m1")), &mut env);
        env.upstream_down = true;
        s.handle_frame(t0, &frame(3, send("m2")), &mut env);
        let o = out(&mut s);
        let acks: Vec<_> = o
            .iter()
            .map(|f| match &f.body {
                Some(Body::SendAck(a)) => (
                    f.request_id,
                    a.client_msg_id.clone(),
                    a.server_msg_id,
                    code_of(f),
                ),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            acks,
            vec![
                (2, "m1".to_owned(), 1, Code::Ok),
                (3, "m2".to_owned(), 0, Code::UpstreamUnavailable)
            ]
        );
        assert_eq!(env.uplinks.len(), 1);
    }

    #[test]
    fn join_follows_the_token_policy() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(
            t0,
            &frame(
                2,
                Req::Join(pb::Join {
                    room: "lobby".into(),
                }),
            ),
            &mut env,
        );
        s.handle_frame(
            t0,
            &frame(
                3,
                Req::Join(pb::Join {
                    room: "secret".into(),
                }),
            ),
            &mut env,
        );
        let o = out(&mut s);
        assert!(matches!(&o[0].body, Some(Body::RoomOk(r)) if r.joined && r.room == "lobby"));
        assert_eq!((o[1].request_id, code_of(&o[1])), (3, Code::RoomForbidden));
        assert_eq!(env.joined, vec![RoomId::new("lobby")]);
    }

    #[test]
    fn second_login_is_refused_without_closing() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(t0, &frame(2, login(1)), &mut env);
        assert_eq!(code_of(&out(&mut s)[0]), Code::AlreadyLoggedIn);
        assert!(s.is_active());
        assert_eq!(env.logins, 1);
    }

    #[test]
    fn a_few_bad_frames_answer_bad_frame_and_keep_the_session() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(t0, &[0xff, 0xff, 0xff, 0xff], &mut env);
        s.handle_frame(
            t0,
            &pb::ClientFrame {
                request_id: 4,
                body: None,
            }
            .encode_to_vec(),
            &mut env,
        );
        let o = out(&mut s);
        assert_eq!(code_of(&o[0]), Code::BadFrame);
        assert_eq!((o[1].request_id, code_of(&o[1])), (4, Code::BadFrame));
        assert!(s.is_active());
    }

    #[test]
    fn oversized_frame_closes_with_its_code() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame_error(
            t0,
            FrameError::TooLarge {
                len: 1 << 20,
                max: 65536,
            },
        );
        assert_eq!(
            code_of(&decode(s.poll_close_frame().unwrap())),
            Code::FrameTooLarge
        );
    }

    #[test]
    fn close_frame_comes_after_pending_replies() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(
            t0,
            &frame(2, Req::Ping(pb::Ping { client_time_ms: 1 })),
            &mut env,
        );
        s.close(t0, CloseCmd::new(Code::Kicked, "bye"));
        assert!(s.poll_close_frame().is_none(), "the Pong goes first");
        assert!(matches!(
            decode(s.poll_transmit().unwrap()).body,
            Some(Body::Pong(_))
        ));
        assert_eq!(
            code_of(&decode(s.poll_close_frame().unwrap())),
            Code::Kicked
        );
        // A second close request does not replace the first.
        s.close(t0, CloseCmd::new(Code::ServerDraining, "x"));
        assert_eq!(s.close_code(), Some(Code::Kicked));
        s.handle_flushed_and_gone();
        assert!(s.is_closed());
    }

    #[test]
    fn client_close_and_acks() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(
            t0,
            &frame(
                0,
                Req::Ack(pb::Ack {
                    up_to_seq: 42,
                    ..pb::Ack::default()
                }),
            ),
            &mut env,
        );
        assert!(out(&mut s).is_empty(), "acks get no reply");
        assert_eq!(env.acks, vec![42]);
        s.handle_frame(t0, &frame(0, Req::Close(pb::Close::default())), &mut env);
        assert_eq!(s.close_code(), Some(Code::NormalClose));
    }

    #[test]
    fn stops_reading_when_replies_pile_up() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        for i in 0..MAX_PENDING_CONTROL as u64 {
            assert!(s.wants_input());
            s.handle_frame(
                t0,
                &frame(i + 2, Req::Ping(pb::Ping { client_time_ms: i })),
                &mut env,
            );
        }
        assert!(
            !s.wants_input(),
            "a client that never reads is not read either"
        );
        s.poll_transmit();
        assert!(s.wants_input());
    }

    #[test]
    fn peer_gone_closes_without_output() {
        let t0 = Instant::now();
        let mut env = Fake::default();
        let mut s = active(t0, &mut env);
        s.handle_frame(
            t0,
            &frame(2, Req::Ping(pb::Ping { client_time_ms: 1 })),
            &mut env,
        );
        s.handle_peer_gone(Code::NormalClose);
        assert!(s.is_closed());
        assert!(s.poll_transmit().is_none() && s.poll_close_frame().is_none());
    }
}
