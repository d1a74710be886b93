//! [`GatewayEnv`], the session's view of the node: the real [`SessionEnv`]
//! behind login (token check, rate limit, resume, registry), refresh,
//! uplinks, rooms and acks.

use std::time::Instant;

use super::Gateway;
use crate::auth::AuthError;
use crate::config::MultiLogin;
use crate::ids::{RoomId, TransportKind};
use crate::metrics as m;
use crate::session::{
    CloseCmd, End, LoginGrant, Refreshed, SessionEnv, SessionHandle, SessionInfo, Uplink, UplinkAck,
};
use crate::wire::{pb, Code, LoginRequest, SendRequest};

/// The [`SessionEnv`] of a real connection.
pub struct GatewayEnv<'a> {
    pub gw: &'a Gateway,
    /// The connection's session handle; a resume replaces it.
    pub handle: &'a mut SessionHandle,
    /// The connection's generation on that handle.
    pub gen: &'a mut u32,
    pub kind: TransportKind,
    /// The peer's address (asked only when a login succeeds).
    pub peer: &'a dyn Fn() -> Option<std::net::SocketAddr>,
    pub registered: &'a mut bool,
}

impl SessionEnv for GatewayEnv<'_> {
    fn login(&mut self, now: Instant, req: &LoginRequest) -> Result<LoginGrant, (Code, String)> {
        let gw = self.gw;
        let result = (|| {
            if gw.is_draining() {
                return Err((Code::ServerDraining, "server is shutting down".to_owned()));
            }
            if !gw.limits.try_login(now) {
                return Err((
                    Code::RateLimited,
                    "login rate limit reached; retry with backoff".to_owned(),
                ));
            }
            let crate::auth::Verified { identity, exp } = gw
                .verifier
                .check(&req.token, &req.device)
                .map_err(|e: AuthError| (e.code(), e.to_string()))?;
            // A resume takes the old session over; if it cannot, this login
            // starts a new session and says why in LoginOk.resume.
            let mut resume = None;
            if let Some(r) = &req.resume {
                match gw.resume(&identity.user, &identity.device, r, self.kind) {
                    Ok((h, gen, res)) => {
                        gw.connection_settled(self.handle);
                        *self.handle = h;
                        *self.gen = gen;
                        *self.registered = true;
                        metrics::counter!(m::RESUMES, "result" => Code::try_from(res.code).unwrap_or(Code::Ok).as_str_name()).increment(1);
                        return Ok((identity, exp, Some(res), true));
                    }
                    Err(code) => {
                        metrics::counter!(m::RESUMES, "result" => code.as_str_name()).increment(1);
                        resume = Some(pb::ResumeResult {
                            code: code as i32,
                            ..pb::ResumeResult::default()
                        });
                    }
                }
            }
            self.handle.set_info(SessionInfo {
                user: identity.user.clone(),
                device: identity.device.clone(),
                platform: req.platform,
                transport: self.kind,
                since_ms: crate::unix_ms(),
            });
            let replaced = gw
                .registry
                .register_limited(
                    self.handle,
                    gw.cfg.session.multi_login,
                    gw.limits.max_devices,
                )
                .map_err(|e| {
                    (
                        e.code(),
                        format!(
                            "this user already has {} devices logged in; log one out first",
                            gw.limits.max_devices
                        ),
                    )
                })?;
            gw.connection_settled(self.handle);
            *self.registered = true;
            // Sessions of other nodes this login replaces (one node: none).
            let since_ms = self.handle.info().map_or(0, |i| i.since_ms);
            match gw.cfg.session.multi_login {
                MultiLogin::PerDevice => {
                    gw.bus
                        .replace_elsewhere(&identity.user, Some(&identity.device), since_ms);
                }
                MultiLogin::Single => gw.bus.replace_elsewhere(&identity.user, None, since_ms),
            }
            for old in replaced {
                old.request_close(CloseCmd::new(
                    Code::Replaced,
                    "this device logged in on another connection",
                ));
                // A detached session replaced by a new login ends now.
                gw.end_session(&old, End::Detached, Code::Replaced);
            }
            Ok((identity, exp, resume, false))
        })();
        let label = match &result {
            Ok(_) => "ok",
            Err((c, _)) => c.as_str_name(),
        };
        metrics::counter!(m::LOGINS, "result" => label).increment(1);
        let (identity, exp, resume, resumed) = result?;
        if !resumed {
            metrics::gauge!(m::SESSIONS).increment(1.0);
        }
        gw.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Opened(pb::SessionOpened {
                session: gw.session_info(self.handle),
                remote_addr: (self.peer)().map(|a| a.to_string()).unwrap_or_default(),
            })),
        });
        Ok(LoginGrant {
            session_id: self.handle.id(),
            identity,
            resume_token: gw.resume_token(self.handle),
            resume,
            next_uplink_seq: self.handle.next_uplink_seq(),
            token_exp: Some(exp),
        })
    }

    fn refresh(
        &mut self,
        now: Instant,
        req: &crate::wire::RefreshRequest,
    ) -> Result<Refreshed, (Code, String)> {
        // A refresh costs a signature check, like a login: the same bucket.
        if !self.gw.limits.try_login(now) {
            return Err((
                Code::RateLimited,
                "login rate limit reached; retry with backoff".to_owned(),
            ));
        }
        let Some(info) = self.handle.info() else {
            // Set at login, before the session is Active; kept for its life.
            return Err((Code::Internal, "the session has no identity".to_owned()));
        };
        let v = self
            .gw
            .verifier
            .verify_refresh(&req.token, &info.user, &info.device)
            .map_err(|e| (e.code(), e.to_string()))?;
        Ok(Refreshed {
            token_exp: Some(v.exp),
            rooms: v.identity.rooms,
        })
    }

    fn uplink(&mut self, now: Instant, req: SendRequest) -> Result<UplinkAck, Code> {
        let d = &self.gw.cfg.delivery;
        let id = self.gw.next_msg_id();
        let seq = match self.handle.uplink(
            &req.client_msg_id,
            id,
            now,
            d.dedup_window,
            d.dedup_max as usize,
        ) {
            Uplink::Duplicate { server_msg_id, seq } => {
                metrics::counter!(m::UPLINKS, "result" => "duplicate").increment(1);
                return Ok(UplinkAck {
                    server_msg_id,
                    seq,
                    duplicate: true,
                });
            }
            Uplink::New { seq } => seq,
        };
        let client_msg_id = req.client_msg_id.clone();
        let ok = self.gw.bus.emit(pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                session: self.gw.session_info(self.handle),
                client_msg_id: req.client_msg_id,
                server_msg_id: id,
                route: req.route,
                payload: req.payload,
                received_ms: crate::unix_ms(),
                seq,
            })),
        });
        metrics::counter!(m::UPLINKS, "result" => if ok { "ok" } else { "unavailable" })
            .increment(1);
        if ok {
            Ok(UplinkAck {
                server_msg_id: id,
                seq,
                duplicate: false,
            })
        } else {
            // Not forwarded: a retry must run again, not be answered as a duplicate.
            self.handle.forget_uplink(&client_msg_id, seq);
            Err(Code::UpstreamUnavailable)
        }
    }

    fn join(&mut self, room: &RoomId) -> Result<(), Code> {
        let r = self
            .gw
            .registry
            .join(self.handle, room, self.gw.cfg.session.max_rooms as usize);
        metrics::gauge!(m::ROOMS).set(self.gw.registry.room_count() as f64);
        r
    }

    fn leave(&mut self, room: &RoomId) {
        self.gw.registry.leave(self.handle, room);
        metrics::gauge!(m::ROOMS).set(self.gw.registry.room_count() as f64);
    }

    fn ack(&mut self, now: Instant, lane: pb::Lane, up_to_seq: u64, ranges: &[(u64, u64)]) {
        let mut acked = Vec::new();
        self.handle
            .ack(lane, up_to_seq, ranges, now, &self.gw.budget, &mut acked);
        if !acked.is_empty() {
            m::hot().acked.increment(acked.len() as u64);
            self.gw.report(self.handle, &acked, Code::Ok);
        }
    }

    fn wall_ms(&self) -> u64 {
        crate::unix_ms()
    }
}
