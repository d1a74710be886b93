//! The sans-IO session state machine.
//!
//! States: `AwaitingLogin` → `Active` → `Closing` → `Closed`.
//! - `AwaitingLogin`: only `Login` runs; every other request gets
//!   `CODE_NOT_LOGGED_IN` and does not run. The login deadline closes the
//!   connection with `CODE_LOGIN_TIMEOUT` (slowloris).
//! - `Active`: any frame from the peer resets the idle deadline; silence for
//!   `idle_timeout` closes with `CODE_HEARTBEAT_TIMEOUT`.
//! - `Closing`: a `Close` frame is queued last; input is ignored; after
//!   [`CLOSE_LINGER`] the state becomes `Closed` even if the peer never read it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::Identity;
use crate::config::{ClientJoin, Config};
use crate::ids::{RoomId, SessionId};
use crate::session::CloseCmd;
use crate::wire::{
    self, frame_bytes, pb, pb::server_frame::Body, ClientMsg, ClientRequest, Code, FrameError,
    LoginRequest, RequestError, SendRequest,
};

/// How long a closing session waits for its Close frame to be written and the
/// peer to hang up, before the connection is dropped regardless.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Control frames a session may have waiting before it stops reading from its
/// peer (backpressure on a client that sends requests but does not read).
const MAX_PENDING_CONTROL: usize = 64;

/// The per-session settings, taken from [`Config`] once.
#[derive(Debug, Clone)]
pub struct SessionParams {
    pub login_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub idle_timeout: Duration,
    pub max_frame: usize,
    pub client_join: ClientJoin,
    pub node_id: String,
}

impl SessionParams {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            login_timeout: cfg.session.login_timeout,
            heartbeat_interval: cfg.session.heartbeat_interval,
            idle_timeout: cfg.session.idle_timeout,
            max_frame: cfg.limits.max_frame as usize,
            client_join: cfg.session.client_join,
            node_id: cfg.node_id.clone(),
        }
    }
}

/// What a successful login grants.
#[derive(Debug, Clone)]
pub struct LoginGrant {
    pub session_id: SessionId,
    pub identity: Identity,
}

/// The side effects a session needs from the gateway. Implementations do no
/// blocking IO; the gateway's implementation touches the registry and the bus.
pub trait SessionEnv {
    /// Verifies the token, applies login limits, and registers the session.
    ///
    /// # Errors
    /// The code and message to answer the login with; the session then closes.
    fn login(&mut self, now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)>;
    /// Hands an uplink to the upstream; returns the server message id.
    ///
    /// # Errors
    /// The code for the SendAck (e.g. `CODE_UPSTREAM_UNAVAILABLE`).
    fn uplink(&mut self, now: Instant, req: SendRequest) -> Result<u64, Code>;
    /// Adds this session to a room (authorization already checked).
    ///
    /// # Errors
    /// E.g. `CODE_TOO_MANY_ROOMS`.
    fn join(&mut self, room: &RoomId) -> Result<(), Code>;
    /// Removes this session from a room.
    fn leave(&mut self, room: &RoomId);
    /// Cumulative acknowledgement of pushes up to `seq`.
    fn ack(&mut self, up_to_seq: u64);
    /// Wall clock in milliseconds since the Unix epoch (for LoginOk and Pong).
    fn wall_ms(&self) -> u64;
}

#[derive(Debug)]
enum State {
    AwaitingLogin {
        deadline: Instant,
    },
    Active {
        identity: Identity,
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

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    state: State,
    params: std::sync::Arc<SessionParams>,
    /// Encoded control frames waiting to be written (replies, errors, Close).
    out: VecDeque<Bytes>,
    /// The Close frame, written after everything else.
    close_frame: Option<Bytes>,
    frames_in: u64,
}

impl Session {
    /// A new connection accepted at `now`.
    pub fn new(now: Instant, params: std::sync::Arc<SessionParams>) -> Self {
        Self {
            state: State::AwaitingLogin {
                deadline: now + params.login_timeout,
            },
            params,
            out: VecDeque::new(),
            close_frame: None,
            frames_in: 0,
        }
    }

    /// Feeds one complete frame body (the length prefix already removed).
    pub fn handle_frame(&mut self, now: Instant, body: &[u8], env: &mut dyn SessionEnv) {
        if matches!(self.state, State::Closing { .. } | State::Closed { .. }) {
            return;
        }
        self.frames_in += 1;
        if let State::Active { idle_deadline, .. } = &mut self.state {
            *idle_deadline = now + self.params.idle_timeout;
        }
        match ClientMsg::decode(body) {
            Ok(msg) => self.handle_msg(now, msg, env),
            Err(e) => self.reply_error(e),
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
        self.out.clear();
        self.close_frame = None;
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
            State::Active { idle_deadline, .. } if now >= *idle_deadline => self.close(
                now,
                CloseCmd::new(Code::HeartbeatTimeout, "no frame within the idle timeout"),
            ),
            State::Closing { deadline, code } if now >= *deadline => {
                self.out.clear();
                self.close_frame = None;
                self.state = State::Closed { code: *code };
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
        self.close_frame = Some(frame_bytes(&frame));
        self.state = State::Closing {
            deadline: now + CLOSE_LINGER,
            code: cmd.code,
        };
    }

    /// The next instant at which [`Session::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::AwaitingLogin { deadline } => Some(*deadline),
            State::Active { idle_deadline, .. } => Some(*idle_deadline),
            State::Closing { deadline, .. } => Some(*deadline),
            State::Closed { .. } => None,
        }
    }

    /// The next control frame to write, if any. The Close frame comes last.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// The Close frame, once every other control frame has been taken.
    pub fn poll_close_frame(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            self.close_frame.take()
        } else {
            None
        }
    }

    /// Whether the driver should read more input now.
    pub fn wants_input(&self) -> bool {
        matches!(
            self.state,
            State::AwaitingLogin { .. } | State::Active { .. }
        ) && self.out.len() < MAX_PENDING_CONTROL
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
            if self.out.is_empty() && self.close_frame.is_none() {
                self.state = State::Closed { code };
            }
        }
    }

    /// The identity, once logged in.
    pub fn identity(&self) -> Option<&Identity> {
        match &self.state {
            State::Active { identity, .. } => Some(identity),
            _ => None,
        }
    }

    /// Frames received so far.
    pub fn frames_in(&self) -> u64 {
        self.frames_in
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
            (State::AwaitingLogin { .. }, _) => self.reply_error(RequestError {
                request_id: rid,
                code: Code::NotLoggedIn,
                message: "log in first".into(),
            }),
            (State::Active { .. }, ClientRequest::Login(_)) => self.reply_error(RequestError {
                request_id: rid,
                code: Code::AlreadyLoggedIn,
                message: "this connection is already logged in".into(),
            }),
            (State::Active { .. }, ClientRequest::Ping { client_time_ms }) => self.reply(
                rid,
                Body::Pong(pb::Pong {
                    client_time_ms,
                    server_time_ms: env.wall_ms(),
                }),
            ),
            (State::Active { .. }, ClientRequest::Send(req)) => {
                let client_msg_id = req.client_msg_id.clone();
                let (server_msg_id, code) = match env.uplink(now, req) {
                    Ok(id) => (id, Code::Ok),
                    Err(code) => (0, code),
                };
                self.reply(
                    rid,
                    Body::SendAck(pb::SendAck {
                        client_msg_id,
                        server_msg_id,
                        code: code as i32,
                    }),
                );
            }
            (State::Active { .. }, ClientRequest::Ack { up_to_seq }) => env.ack(up_to_seq),
            (State::Active { identity, .. }, ClientRequest::Join(room)) => {
                let allowed = match self.params.client_join {
                    ClientJoin::Off => Err(Code::Unsupported),
                    ClientJoin::Any => Ok(()),
                    ClientJoin::Token if identity.may_join(&room) => Ok(()),
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
                    self.reply_error(RequestError {
                        request_id: rid,
                        code: Code::Unsupported,
                        message: "client-side rooms are disabled".into(),
                    });
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
                };
                self.state = State::Active {
                    identity: grant.identity,
                    idle_deadline: now + p.idle_timeout,
                };
                self.reply(rid, Body::LoginOk(ok));
            }
            Err((code, msg)) => self.refuse_login(now, rid, code, msg),
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
