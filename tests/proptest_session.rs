//! Property tests of the sans-IO session state machine (`tether::session::Session`),
//! driven on virtual time with a fake `SessionEnv`.
//!
//! Each case runs an arbitrary sequence of steps: arbitrary bytes or valid
//! `ClientFrame`s of every kind (some with out-of-range fields), time advances
//! (with or without `handle_timeout`), framing errors, the peer going away, and
//! the driver taking output (all at once, or a few frames at a time). A small
//! reference model of the documented behaviour (see the header of
//! `src/session/core.rs`) runs beside it; after every step the session must
//! agree with it. In particular:
//!
//! - nothing panics;
//! - before a successful login any request but Login and Close gets exactly
//!   one `Error` with `CODE_NOT_LOGGED_IN`, then the Close with that code, and
//!   has no side effect; undecodable frames likewise close with
//!   `CODE_BAD_FRAME`/`CODE_BAD_REQUEST`; Login is answered by `LoginOk`, or
//!   by its own `Error` followed by a close; Close closes without a reply;
//! - after login, invalid frames may run at most `MAX_INVALID_FRAMES` ahead of
//!   valid ones: the refusal that reaches it is followed by the Close;
//! - once closing, no step produces output; only replies produced before the
//!   close and then the Close frame (last, once) come out;
//! - `poll_timeout` is `Some` until the session is Closed, and equals the
//!   documented deadline (login, idle, or close linger);
//! - the fake environment is only called in the Active state.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;
use tether::auth::Identity;
use tether::config::ClientJoin;
use tether::ids::{RoomId, SessionId, UserId};
use tether::session::{
    LoginGrant, Refreshed, Session, SessionEnv, SessionParams, UplinkAck, CLOSE_LINGER,
    MAX_INVALID_FRAMES,
};
use tether::wire::{
    pb, pb::client_frame::Body, ClientMsg, ClientRequest, Code, FrameError, LoginRequest,
    RefreshRequest, SendRequest,
};

const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
const MAX_FRAME: usize = 64 * 1024;
const MAX_PENDING_CONTROL: usize = 64; // src/session/core.rs
const WALL_MS: u64 = 1_700_000_000_000;
const SESSION_ID: u64 = 77;

// ------------------------------------------------------------------ fake env

/// Logins succeed for tokens starting with "ok", joins fail for room "full",
/// uplinks fail for route "down". Every call is counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Calls {
    login: u64,
    uplink: u64,
    join: u64,
    leave: u64,
    ack: u64,
    refresh: u64,
}

#[derive(Default)]
struct FakeEnv {
    calls: Calls,
}

impl SessionEnv for FakeEnv {
    fn login(&mut self, _now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        self.calls.login += 1;
        if req.token.starts_with("ok") {
            Ok(LoginGrant {
                session_id: SessionId(SESSION_ID),
                identity: Identity {
                    user: UserId::new("alice"),
                    device: req.device.clone(),
                    rooms: vec!["lobby".into(), "team-*".into()].into_boxed_slice(),
                },
                resume_token: bytes::Bytes::from_static(b"rt"),
                resume: None,
                next_uplink_seq: 1,
                token_exp: None,
            })
        } else if req.token == "limit" {
            Err((Code::TooManyConnections, "too many".into()))
        } else {
            Err((Code::TokenInvalid, "bad token".into()))
        }
    }
    fn refresh(
        &mut self,
        _now: Instant,
        req: &RefreshRequest,
    ) -> Result<Refreshed, (Code, String)> {
        self.calls.refresh += 1;
        if req.token.starts_with("ok") {
            Ok(Refreshed {
                token_exp: None,
                rooms: vec!["lobby".into(), "team-*".into()].into_boxed_slice(),
            })
        } else {
            Err((Code::TokenInvalid, "bad token".into()))
        }
    }
    fn uplink(&mut self, _now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
        self.calls.uplink += 1;
        if req.route == "down" {
            Err(Code::UpstreamUnavailable)
        } else {
            Ok(UplinkAck {
                server_msg_id: 1000 + self.calls.uplink,
                seq: self.calls.uplink,
                duplicate: false,
            })
        }
    }
    fn join(&mut self, room: &RoomId) -> Result<(), Code> {
        self.calls.join += 1;
        if room.as_str() == "full" {
            Err(Code::TooManyRooms)
        } else {
            Ok(())
        }
    }
    fn leave(&mut self, _room: &RoomId) {
        self.calls.leave += 1;
    }
    fn ack(&mut self, _now: Instant, _lane: pb::Lane, _up_to_seq: u64, _ranges: &[(u64, u64)]) {
        self.calls.ack += 1;
    }
    fn wall_ms(&self) -> u64 {
        WALL_MS
    }
}

// ------------------------------------------------------------------- model

/// A server frame, reduced to what the model predicts (no free-text messages).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Error {
        rid: u64,
        code: Code,
    },
    LoginOk {
        rid: u64,
        session_id: u64,
        user: String,
        heartbeat_ms: u32,
        max_frame: u32,
        server_time_ms: u64,
    },
    Pong {
        rid: u64,
        client_time_ms: u64,
        server_time_ms: u64,
    },
    SendAck {
        rid: u64,
        client_msg_id: String,
        server_msg_id: u64,
        code: Code,
    },
    RoomOk {
        rid: u64,
        room: String,
        joined: bool,
    },
    RefreshOk {
        rid: u64,
    },
    Close {
        code: Code,
    },
    Other(String),
}

fn summarize(frame: &Bytes) -> Out {
    use pb::server_frame::Body as S;
    assert!(frame.len() >= 4, "frame shorter than its prefix");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(
        len + 4,
        frame.len(),
        "length prefix does not match the frame"
    );
    let f = pb::ServerFrame::decode(&frame[4..]).expect("the session wrote an undecodable frame");
    let code = |c: i32| Code::try_from(c).expect("unknown code");
    match f.body {
        Some(S::Error(e)) => Out::Error {
            rid: f.request_id,
            code: code(e.code),
        },
        Some(S::LoginOk(ok)) => Out::LoginOk {
            rid: f.request_id,
            session_id: ok.session_id,
            user: ok.user_id,
            heartbeat_ms: ok.heartbeat_interval_ms,
            max_frame: ok.max_frame_len,
            server_time_ms: ok.server_time_ms,
        },
        Some(S::Pong(p)) => Out::Pong {
            rid: f.request_id,
            client_time_ms: p.client_time_ms,
            server_time_ms: p.server_time_ms,
        },
        Some(S::SendAck(a)) => Out::SendAck {
            rid: f.request_id,
            client_msg_id: a.client_msg_id,
            server_msg_id: a.server_msg_id,
            code: code(a.code),
        },
        Some(S::RoomOk(r)) => Out::RoomOk {
            rid: f.request_id,
            room: r.room,
            joined: r.joined,
        },
        Some(S::RefreshOk(_)) => Out::RefreshOk { rid: f.request_id },
        Some(S::Close(c)) => {
            assert_eq!(f.request_id, 0, "Close is unsolicited");
            Out::Close { code: code(c.code) }
        }
        other => Out::Other(format!("{other:?}")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Awaiting { deadline: Instant },
    Active { idle: Instant },
    Closing { deadline: Instant, code: Code },
    Closed { code: Code },
}

/// The documented behaviour, step by step.
struct Model {
    st: St,
    out: VecDeque<Out>,
    /// The Close frame, queued and not yet taken.
    close: Option<Code>,
    calls: Calls,
    client_join: ClientJoin,
    /// Invalid frames ahead of valid ones, after login.
    invalid: u8,
}

impl Model {
    fn new(now: Instant, client_join: ClientJoin) -> Self {
        Self {
            st: St::Awaiting {
                deadline: now + LOGIN_TIMEOUT,
            },
            out: VecDeque::new(),
            close: None,
            calls: Calls::default(),
            client_join,
            invalid: 0,
        }
    }

    /// A frame refused before it ran: before login it closes; after it, it
    /// counts, and the refusal that reaches the bound closes.
    fn refuse(&mut self, now: Instant, rid: u64, code: Code) {
        self.out.push_back(Out::Error { rid, code });
        match self.st {
            St::Awaiting { .. } => self.close(now, code),
            St::Active { .. } => {
                self.invalid += 1;
                if self.invalid >= MAX_INVALID_FRAMES {
                    self.close(now, code);
                }
            }
            _ => {}
        }
    }

    fn closing(&self) -> bool {
        matches!(self.st, St::Closing { .. } | St::Closed { .. })
    }

    fn close(&mut self, now: Instant, code: Code) {
        if self.closing() {
            return;
        }
        self.close = Some(code);
        self.st = St::Closing {
            deadline: now + CLOSE_LINGER,
            code,
        };
    }

    fn frame(&mut self, now: Instant, body: &[u8]) {
        if self.closing() {
            return;
        }
        let was_active = matches!(self.st, St::Active { .. });
        let before = self.invalid;
        self.frame_inner(now, body);
        if was_active && self.invalid <= before {
            self.invalid = self.invalid.saturating_sub(1);
        }
    }

    fn frame_inner(&mut self, now: Instant, body: &[u8]) {
        if let St::Active { idle } = &mut self.st {
            *idle = now + IDLE_TIMEOUT;
        }
        let msg = match ClientMsg::decode(body) {
            Ok(m) => m,
            Err(e) => return self.refuse(now, e.request_id, e.code),
        };
        let rid = msg.request_id;
        let active = matches!(self.st, St::Active { .. });
        match msg.request {
            ClientRequest::Close { .. } => self.close(now, Code::NormalClose),
            ClientRequest::Login(req) if !active => {
                if req.protocol_version != 1 {
                    self.out.push_back(Out::Error {
                        rid,
                        code: Code::UnsupportedVersion,
                    });
                    self.close(now, Code::UnsupportedVersion);
                    return;
                }
                self.calls.login += 1;
                let refused = if req.token.starts_with("ok") {
                    None
                } else if req.token == "limit" {
                    Some(Code::TooManyConnections)
                } else {
                    Some(Code::TokenInvalid)
                };
                match refused {
                    None => {
                        self.out.push_back(Out::LoginOk {
                            rid,
                            session_id: SESSION_ID,
                            user: "alice".into(),
                            heartbeat_ms: HEARTBEAT.as_millis() as u32,
                            max_frame: MAX_FRAME as u32,
                            server_time_ms: WALL_MS,
                        });
                        self.st = St::Active {
                            idle: now + IDLE_TIMEOUT,
                        };
                    }
                    Some(code) => {
                        self.out.push_back(Out::Error { rid, code });
                        self.close(now, code);
                    }
                }
            }
            _ if !active => self.refuse(now, rid, Code::NotLoggedIn),
            ClientRequest::Login(_) => self.refuse(now, rid, Code::AlreadyLoggedIn),
            ClientRequest::Refresh(req) => {
                self.calls.refresh += 1;
                if req.token.starts_with("ok") {
                    self.out.push_back(Out::RefreshOk { rid });
                } else {
                    self.refuse(now, rid, Code::TokenInvalid);
                }
            }
            ClientRequest::Ping { client_time_ms } => self.out.push_back(Out::Pong {
                rid,
                client_time_ms,
                server_time_ms: WALL_MS,
            }),
            ClientRequest::Send(req) => {
                self.calls.uplink += 1;
                let (server_msg_id, code) = if req.route == "down" {
                    (0, Code::UpstreamUnavailable)
                } else {
                    (1000 + self.calls.uplink, Code::Ok)
                };
                self.out.push_back(Out::SendAck {
                    rid,
                    client_msg_id: req.client_msg_id,
                    server_msg_id,
                    code,
                });
            }
            ClientRequest::Ack { .. } => self.calls.ack += 1,
            ClientRequest::Join(_) if self.client_join == ClientJoin::Off => {
                self.refuse(now, rid, Code::Unsupported)
            }
            ClientRequest::Join(room) => {
                let r = room.as_str();
                let allowed = match self.client_join {
                    ClientJoin::Off => Err(Code::Unsupported),
                    ClientJoin::Any => Ok(()),
                    ClientJoin::Token if r == "lobby" || r.starts_with("team-") => Ok(()),
                    ClientJoin::Token => Err(Code::RoomForbidden),
                };
                let res = allowed.and_then(|()| {
                    self.calls.join += 1;
                    if r == "full" {
                        Err(Code::TooManyRooms)
                    } else {
                        Ok(())
                    }
                });
                self.out.push_back(match res {
                    Ok(()) => Out::RoomOk {
                        rid,
                        room: r.to_owned(),
                        joined: true,
                    },
                    Err(code) => Out::Error { rid, code },
                });
            }
            ClientRequest::Leave(room) => {
                if self.client_join == ClientJoin::Off {
                    self.refuse(now, rid, Code::Unsupported);
                } else {
                    self.calls.leave += 1;
                    self.out.push_back(Out::RoomOk {
                        rid,
                        room: room.as_str().to_owned(),
                        joined: false,
                    });
                }
            }
        }
    }

    fn timeout(&mut self, now: Instant) {
        match self.st {
            St::Awaiting { deadline } if now >= deadline => self.close(now, Code::LoginTimeout),
            St::Active { idle } if now >= idle => self.close(now, Code::HeartbeatTimeout),
            St::Closing { deadline, code } if now >= deadline => {
                self.out.clear();
                self.close = None;
                self.st = St::Closed { code };
            }
            _ => {}
        }
    }

    fn peer_gone(&mut self, code: Code) {
        self.out.clear();
        self.close = None;
        self.st = match self.st {
            St::Closed { code } | St::Closing { code, .. } => St::Closed { code },
            _ => St::Closed { code },
        };
    }

    fn flushed_and_gone(&mut self) {
        if let St::Closing { code, .. } = self.st {
            if self.out.is_empty() && self.close.is_none() {
                self.st = St::Closed { code };
            }
        }
    }

    fn timeout_at(&self) -> Option<Instant> {
        match self.st {
            St::Awaiting { deadline } | St::Closing { deadline, .. } => Some(deadline),
            St::Active { idle } => Some(idle),
            St::Closed { .. } => None,
        }
    }

    fn close_code(&self) -> Option<Code> {
        match self.st {
            St::Closing { code, .. } | St::Closed { code } => Some(code),
            _ => None,
        }
    }
}

// --------------------------------------------------------------- strategies

#[derive(Debug, Clone)]
enum Step {
    /// Arbitrary bytes as one frame body.
    Bytes(Vec<u8>),
    /// A well-formed ClientFrame (fields possibly out of range).
    Frame(pb::ClientFrame),
    /// Advance virtual time; `fire` calls handle_timeout afterwards.
    Advance { ms: u64, fire: bool },
    /// Move time to the session's next deadline, `offset_ms` (-1, 0, +1) from
    /// it (never backwards), and call handle_timeout: the exact boundaries.
    ToDeadline { offset_ms: i8 },
    /// A length prefix above the maximum.
    TooLarge,
    /// EOF or a socket error.
    PeerGone,
    /// The driver takes up to `max` control frames, then maybe the Close frame,
    /// then maybe reports the peer gone after the flush.
    Drain {
        max: usize,
        take_close: bool,
        flushed_and_gone: bool,
    },
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("lobby".to_owned()),
        Just("team-7".to_owned()),
        Just("full".to_owned()),
        Just("secret".to_owned()),
        Just(String::new()),
        Just("bad\u{7}".to_owned()),
        "[a-z]{1,12}",
        (129usize..140).prop_map(|n| "r".repeat(n)),
    ]
}

fn client_frame() -> impl Strategy<Value = pb::ClientFrame> {
    let login = (
        prop_oneof![
            Just("ok-token".to_owned()),
            Just("ok".to_owned()),
            Just("bad".to_owned()),
            Just("limit".to_owned()),
            Just(String::new()),
        ],
        prop_oneof![Just("phone".to_owned()), Just(String::new()), "[a-z]{1,8}"],
        any::<i32>(),
        prop_oneof![4 => Just(1u32), 1 => Just(0u32), 1 => Just(2u32), 1 => any::<u32>()],
    )
        .prop_map(|(token, device_id, platform, protocol_version)| {
            Body::Login(pb::Login {
                token,
                device_id,
                platform,
                protocol_version,
                resume: None,
            })
        });
    let body = prop_oneof![
        3 => login,
        3 => any::<u64>().prop_map(|t| Body::Ping(pb::Ping { client_time_ms: t })),
        2 => (
            prop_oneof![Just("c-1".to_owned()), Just(String::new()), "[a-z]{1,70}"],
            prop_oneof![Just("chat".to_owned()), Just("down".to_owned()), Just(String::new())],
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(c, r, p)| Body::Send(pb::Send {
                client_msg_id: c,
                route: r,
                payload: p.into(),
            })),
        1 => (any::<u64>(), 0..3i32).prop_map(|(s, lane)| Body::Ack(pb::Ack {
            up_to_seq: s,
            lane,
            ranges: vec![pb::SeqRange { first: s / 2, last: s }],
        })),
        2 => name().prop_map(|room| Body::Join(pb::Join { room })),
        1 => name().prop_map(|room| Body::Leave(pb::Leave { room })),
        1 => prop_oneof![
            Just("ok-new".to_owned()),
            Just("bad".to_owned()),
            Just(String::new()),
        ]
        .prop_map(|token| Body::Refresh(pb::Refresh { token })),
        1 => (any::<i32>(), ".{0,8}").prop_map(|(code, reason)| Body::Close(pb::Close {
            code,
            reason,
            reconnect_to: String::new(),
            reconnect_after_ms: 0,
        })),
    ];
    (0u64..1000, proptest::option::weighted(0.95, body))
        .prop_map(|(request_id, body)| pb::ClientFrame { request_id, body })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => proptest::collection::vec(any::<u8>(), 0..48).prop_map(Step::Bytes),
        10 => client_frame().prop_map(Step::Frame),
        4 => (
            prop_oneof![0u64..3000, 0u64..200_000],
            prop_oneof![3 => Just(true), 1 => Just(false)]
        )
            .prop_map(|(ms, fire)| Step::Advance { ms, fire }),
        2 => (-1i8..=1).prop_map(|offset_ms| Step::ToDeadline { offset_ms }),
        1 => Just(Step::TooLarge),
        1 => Just(Step::PeerGone),
        3 => (
            prop_oneof![Just(usize::MAX), 0usize..4],
            any::<bool>(),
            prop_oneof![4 => Just(false), 1 => Just(true)]
        )
            .prop_map(|(max, take_close, flushed_and_gone)| Step::Drain {
                max,
                take_close,
                flushed_and_gone,
            }),
    ]
}

fn client_join() -> impl Strategy<Value = ClientJoin> {
    prop_oneof![
        Just(ClientJoin::Off),
        Just(ClientJoin::Token),
        Just(ClientJoin::Any)
    ]
}

// ------------------------------------------------------------------ driver

fn params(client_join: ClientJoin) -> Arc<SessionParams> {
    Arc::new(SessionParams {
        login_timeout: LOGIN_TIMEOUT,
        heartbeat_interval: HEARTBEAT,
        idle_timeout: IDLE_TIMEOUT,
        max_frame: MAX_FRAME,
        client_join,
        node_id: "node-test".into(),
        token_grace: Duration::from_secs(30),
        epoch: Instant::now(),
    })
}

/// The session under test, the model beside it, and virtual time.
struct Harness {
    s: Session,
    m: Model,
    env: FakeEnv,
    now: Instant,
    close_frames_taken: usize,
}

impl Harness {
    fn new(client_join: ClientJoin) -> Self {
        let now = Instant::now();
        Self {
            s: Session::new(now, params(client_join)),
            m: Model::new(now, client_join),
            env: FakeEnv::default(),
            now,
            close_frames_taken: 0,
        }
    }

    fn drain(&mut self, max: usize, take_close: bool) {
        for _ in 0..max {
            let got = self.s.poll_transmit().map(|f| summarize(&f));
            let want = self.m.out.pop_front();
            assert_eq!(got, want, "poll_transmit");
            if got.is_none() {
                break;
            }
            assert!(
                !matches!(got, Some(Out::Close { .. })),
                "Close must come from poll_close_frame"
            );
        }
        if take_close {
            let got = self.s.poll_close_frame().map(|f| summarize(&f));
            // The Close frame only once every other control frame was taken.
            let want = if self.m.out.is_empty() {
                self.m.close.take().map(|code| Out::Close { code })
            } else {
                None
            };
            assert_eq!(got, want, "poll_close_frame");
            if got.is_some() {
                self.close_frames_taken += 1;
                assert_eq!(self.close_frames_taken, 1, "a second Close frame");
                assert!(self.s.is_closing());
            }
        }
    }

    fn step(&mut self, step: &Step) {
        let was_closing = self.s.is_closing();
        let pending_before = self.m.out.len();
        let calls_before = self.env.calls.clone();
        match step {
            Step::Bytes(b) => {
                self.s.handle_frame(self.now, b, &mut self.env);
                self.m.frame(self.now, b);
            }
            Step::Frame(f) => {
                let b = f.encode_to_vec();
                self.s.handle_frame(self.now, &b, &mut self.env);
                self.m.frame(self.now, &b);
            }
            Step::Advance { ms, fire } => {
                self.now += Duration::from_millis(*ms);
                if *fire {
                    self.s.handle_timeout(self.now);
                    self.m.timeout(self.now);
                    // A due timer always makes progress (no busy loop).
                    if let Some(t) = self.s.poll_timeout() {
                        assert!(t > self.now, "timer due at {t:?} still pending at now");
                    }
                }
            }
            Step::ToDeadline { offset_ms } => {
                if let Some(t) = self.s.poll_timeout() {
                    let t = match offset_ms {
                        -1 => t.checked_sub(Duration::from_millis(1)).unwrap_or(t),
                        0 => t,
                        _ => t + Duration::from_millis(1),
                    };
                    self.now = self.now.max(t);
                }
                self.s.handle_timeout(self.now);
                self.m.timeout(self.now);
            }
            Step::TooLarge => {
                let e = FrameError::TooLarge {
                    len: MAX_FRAME + 1,
                    max: MAX_FRAME,
                };
                self.s.handle_frame_error(self.now, e);
                self.m.close(self.now, Code::FrameTooLarge);
            }
            Step::PeerGone => {
                self.s.handle_peer_gone(Code::NormalClose);
                self.m.peer_gone(Code::NormalClose);
            }
            Step::Drain {
                max,
                take_close,
                flushed_and_gone,
            } => {
                self.drain(*max, *take_close);
                if *flushed_and_gone {
                    self.s.handle_flushed_and_gone();
                    self.m.flushed_and_gone();
                }
            }
        }

        // After a close the environment is never called and no step adds
        // output (before login, `check` compares the calls with the model's).
        if was_closing {
            assert_eq!(self.env.calls, calls_before, "env called while closing");
            // No step after the close adds output.
            assert!(self.m.out.len() <= pending_before);
        }
        self.check();
    }

    fn check(&self) {
        let (s, m) = (&self.s, &self.m);
        assert_eq!(self.env.calls, m.calls, "env calls");
        assert_eq!(
            s.is_active(),
            matches!(m.st, St::Active { .. }),
            "is_active"
        );
        assert_eq!(s.is_closing(), m.closing(), "is_closing");
        assert_eq!(
            s.is_closed(),
            matches!(m.st, St::Closed { .. }),
            "is_closed"
        );
        assert_eq!(s.close_code(), m.close_code(), "close_code");
        // poll_timeout is Some until Closed, and is the documented deadline.
        assert_eq!(s.poll_timeout().is_some(), !s.is_closed(), "poll_timeout");
        assert_eq!(s.poll_timeout(), m.timeout_at(), "deadline");
        let wants = matches!(m.st, St::Awaiting { .. } | St::Active { .. })
            && m.out.len() < MAX_PENDING_CONTROL;
        assert_eq!(s.wants_input(), wants, "wants_input");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The session agrees with the model of its documented behaviour on
    /// arbitrary input, timing and draining.
    #[test]
    fn session_follows_its_model(
        client_join in client_join(),
        steps in proptest::collection::vec(step(), 0..60),
        auto_drain in any::<bool>(),
    ) {
        let mut h = Harness::new(client_join);
        h.check();
        for st in &steps {
            h.step(st);
            if auto_drain {
                h.drain(usize::MAX, true);
                h.check();
            }
        }
        // Whatever was queued comes out, in order, Close last.
        h.drain(usize::MAX, true);
        h.check();
        prop_assert!(h.s.poll_transmit().is_none());
        prop_assert!(h.s.poll_close_frame().is_none());
    }

    /// Focused: before a successful login, a non-Login, non-Close request (or
    /// an invalid frame) gets exactly one Error with its code and request id
    /// (CODE_NOT_LOGGED_IN for a valid request), then the Close with that
    /// code; it runs no side effect, and nothing after it is read.
    #[test]
    fn requests_before_login_are_refused_and_close(
        frames in proptest::collection::vec(client_frame(), 1..40),
    ) {
        let frames: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| f.encode_to_vec())
            .filter(|b| !matches!(
                ClientMsg::decode(b),
                Ok(ClientMsg { request: ClientRequest::Login(_) | ClientRequest::Close { .. }, .. })
            ))
            .collect();
        let Some(first) = frames.first() else { return Ok(()) };
        let mut h = Harness::new(ClientJoin::Any);
        h.now += Duration::from_millis(100);
        for b in &frames {
            h.s.handle_frame(h.now, b, &mut h.env);
        }
        let out: Vec<Out> = std::iter::from_fn(|| h.s.poll_transmit())
            .map(|f| summarize(&f))
            .collect();
        let (rid, code) = match ClientMsg::decode(first) {
            Ok(m) => (m.request_id, Code::NotLoggedIn),
            Err(e) => (e.request_id, e.code),
        };
        prop_assert_eq!(out, vec![Out::Error { rid, code }]);
        let close = h.s.poll_close_frame().map(|f| summarize(&f));
        prop_assert_eq!(close, Some(Out::Close { code }));
        prop_assert_eq!(h.s.close_code(), Some(code));
        prop_assert_eq!(&h.env.calls, &Calls::default());
    }

    /// Focused: after the session starts closing (by any cause), nothing a
    /// peer sends produces output; only the Close frame comes out, once, and
    /// `poll_timeout` stays Some until the linger ends.
    #[test]
    fn nothing_but_close_after_close(
        login_first in any::<bool>(),
        cause in 0u8..4,
        after in proptest::collection::vec(
            prop_oneof![
                client_frame().prop_map(|f| f.encode_to_vec()),
                proptest::collection::vec(any::<u8>(), 0..48),
            ],
            0..30,
        ),
        advance_ms in proptest::collection::vec(0u64..500, 30),
    ) {
        let mut h = Harness::new(ClientJoin::Any);
        if login_first {
            let login = pb::ClientFrame {
                request_id: 1,
                body: Some(Body::Login(pb::Login {
                    token: "ok".into(),
                    device_id: "phone".into(),
                    platform: 1,
                    protocol_version: 1,
                    resume: None,
                })),
            };
            h.step(&Step::Frame(login));
            h.drain(usize::MAX, true);
            prop_assert!(h.s.is_active());
        }
        match cause {
            0 => h.step(&Step::Frame(pb::ClientFrame {
                request_id: 9,
                body: Some(Body::Close(pb::Close::default())),
            })),
            1 => h.step(&Step::TooLarge),
            2 => h.step(&Step::Advance { ms: 200_000, fire: true }),
            _ => {
                h.s.close(h.now, tether::session::CloseCmd::new(Code::Kicked, "bye"));
                h.m.close(h.now, Code::Kicked);
                h.check();
            }
        }
        prop_assert!(h.s.is_closing());
        let code = h.s.close_code().unwrap();
        for (b, ms) in after.iter().zip(&advance_ms) {
            h.now += Duration::from_millis(*ms);
            h.s.handle_frame(h.now, b, &mut h.env);
            h.s.handle_timeout(h.now);
            prop_assert!(h.s.poll_transmit().is_none(), "output after close");
            prop_assert_eq!(h.s.poll_timeout().is_some(), !h.s.is_closed());
        }
        let linger_over = h.s.is_closed();
        let close = h.s.poll_close_frame();
        if linger_over {
            // The linger ran out before the driver took it: nothing more to write.
            prop_assert!(close.is_none());
        } else {
            prop_assert_eq!(summarize(&close.unwrap()), Out::Close { code });
        }
        prop_assert!(h.s.poll_close_frame().is_none());
        prop_assert!(h.s.poll_transmit().is_none());
        h.s.handle_flushed_and_gone();
        prop_assert!(h.s.is_closed());
        prop_assert_eq!(h.s.poll_timeout(), None);
        prop_assert_eq!(&h.env.calls, &Calls { login: u64::from(login_first), ..Calls::default() });
    }
}
