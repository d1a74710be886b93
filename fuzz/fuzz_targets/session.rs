//! Fuzz the sans-IO session state machine: the input is a little program of
//! driver operations (frames of arbitrary bytes, valid logins, time advances,
//! timeouts, framing errors, draining, the peer leaving), run against a fake
//! environment. Besides panics, it checks the invariants the driver relies on:
//! every written frame is one well-formed `ServerFrame`, nothing but the Close
//! frame comes out once the session is closing, the Close frame comes out once
//! and last, and `poll_timeout` is `Some` until the session is Closed.
#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tether::auth::Identity;
use tether::config::ClientJoin;
use tether::ids::{RoomId, SessionId, UserId};
use tether::session::{LoginGrant, Session, SessionEnv, SessionParams, UplinkAck};
use tether::wire::{pb, Code, FrameError, LoginRequest, SendRequest};

struct Env;

impl SessionEnv for Env {
    fn login(&mut self, _now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        if req.token.starts_with("ok") {
            Ok(LoginGrant {
                session_id: SessionId(1),
                identity: Identity {
                    user: UserId::new("fuzz"),
                    device: req.device.clone(),
                    rooms: vec!["lobby".into(), "team-*".into()].into_boxed_slice(),
                },
                resume_token: bytes::Bytes::from_static(b"rt"),
                resume: None,
                next_uplink_seq: 1,
                // 60 s after the fake wall clock: time advances reach it.
                token_exp: Some(1_700_000_060),
            })
        } else {
            Err((Code::TokenInvalid, "refused".into()))
        }
    }
    fn refresh(
        &mut self,
        _now: Instant,
        req: &tether::wire::RefreshRequest,
    ) -> Result<tether::session::Refreshed, (Code, String)> {
        if req.token.starts_with("ok") {
            Ok(tether::session::Refreshed {
                token_exp: Some(1_700_003_600),
                rooms: vec!["lobby".into()].into_boxed_slice(),
            })
        } else {
            Err((Code::TokenInvalid, "refused".into()))
        }
    }
    fn uplink(&mut self, _now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
        if req.route == "down" {
            Err(Code::UpstreamUnavailable)
        } else {
            Ok(UplinkAck {
                server_msg_id: 7,
                seq: 1,
                duplicate: req.route == "dup",
            })
        }
    }
    fn join(&mut self, room: &RoomId) -> Result<(), Code> {
        if room.as_str() == "full" {
            Err(Code::TooManyRooms)
        } else {
            Ok(())
        }
    }
    fn leave(&mut self, _room: &RoomId) {}
    fn ack(&mut self, _now: Instant, _lane: pb::Lane, _up_to_seq: u64, _ranges: &[(u64, u64)]) {}
    fn wall_ms(&self) -> u64 {
        1_700_000_000_000
    }
}

fn check_frame(b: &[u8]) -> pb::ServerFrame {
    assert!(b.len() >= 4);
    let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    assert_eq!(len + 4, b.len(), "length prefix does not match");
    pb::ServerFrame::decode(&b[4..]).expect("undecodable ServerFrame")
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(flags) = input.byte() else { return };
    let client_join = match flags % 3 {
        0 => ClientJoin::Off,
        1 => ClientJoin::Token,
        _ => ClientJoin::Any,
    };
    let auto_drain = flags & 0x80 != 0;
    let params = Arc::new(SessionParams {
        login_timeout: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(90),
        max_frame: 65536,
        client_join,
        node_id: "fuzz".into(),
        token_grace: Duration::from_secs(30),
        epoch: Instant::now(),
    });
    let mut now = Instant::now();
    let mut s = Session::new(now, params);
    let mut env = Env;
    let mut close_taken = false;

    while let Some(op) = input.byte() {
        let was_closing = s.is_closing();
        match op % 8 {
            0..=2 => {
                let n = input.byte().unwrap_or(0) as usize;
                let body = input.bytes(n);
                s.handle_frame(now, body, &mut env);
            }
            3 => {
                let v = input.byte().unwrap_or(1);
                let login = pb::ClientFrame {
                    request_id: u64::from(op),
                    body: Some(pb::client_frame::Body::Login(pb::Login {
                        token: if v & 1 == 1 {
                            "ok".into()
                        } else {
                            "bad".into()
                        },
                        device_id: "dev".into(),
                        platform: 1,
                        protocol_version: u32::from(v >> 6),
                        resume: None,
                    })),
                };
                s.handle_frame(now, &login.encode_to_vec(), &mut env);
            }
            4 => {
                let hi = input.byte().unwrap_or(0);
                let lo = input.byte().unwrap_or(0);
                now += Duration::from_millis(u64::from(u16::from_be_bytes([hi, lo])) * 4);
                if op & 0x80 == 0 {
                    s.handle_timeout(now);
                }
            }
            5 => {
                while let Some(f) = s.poll_transmit() {
                    let f = check_frame(&f);
                    assert!(!matches!(f.body, Some(pb::server_frame::Body::Close(_))));
                }
                if let Some(f) = s.poll_close_frame() {
                    assert!(!close_taken, "a second Close frame");
                    close_taken = true;
                    assert!(s.is_closing());
                    let f = check_frame(&f);
                    let Some(pb::server_frame::Body::Close(c)) = f.body else {
                        panic!("poll_close_frame returned {f:?}");
                    };
                    assert_eq!(Code::try_from(c.code).ok(), s.close_code());
                }
                assert!(s.poll_transmit().is_none());
            }
            6 => s.handle_frame_error(
                now,
                FrameError::TooLarge {
                    len: 1 << 20,
                    max: 65536,
                },
            ),
            _ => {
                if op & 0x80 == 0 {
                    s.handle_flushed_and_gone();
                } else {
                    s.handle_peer_gone(Code::NormalClose);
                }
            }
        }
        if auto_drain {
            let mut n = 0;
            while let Some(f) = s.poll_transmit() {
                check_frame(&f);
                n += 1;
            }
            if was_closing {
                assert_eq!(n, 0, "output after the close");
            }
        }
        assert_eq!(s.poll_timeout().is_some(), !s.is_closed());
        assert_eq!(s.close_code().is_some(), s.is_closing());
        if s.is_closing() {
            assert!(!s.wants_input());
            assert!(!s.is_active());
        }
        if let Some(t) = s.poll_timeout() {
            if t <= now && op % 8 == 4 && op & 0x80 == 0 {
                panic!("a due timer did not make progress");
            }
        }
    }
});
