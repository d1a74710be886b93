//! The HTTP API under `/api/v1/`: push, kick, room membership and presence
//! as JSON over HTTP, for services that would rather not speak the upstream
//! socket's protobuf.
//!
//! Each route decodes its JSON body into the upstream socket's protobuf
//! request and runs it with [`crate::upstream::requests`], the code the
//! socket runs: the same validation, the same codes, and the same path
//! through the bus, so that with `bus.kind = "nats"` a request reaches every
//! node. This module owns the HTTP side only: the key check (constant time),
//! the body bound and deadline, the JSON shapes and the error statuses.
//! It holds no state of the gateway.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::upstream::hello_limit::{HelloLimiter, Report, Source};
use crate::upstream::requests::{self, Refusal};
use crate::upstream::UpstreamNode;
use crate::wire::{pb, Code};

/// The API's routes, all `POST` with a JSON body.
pub const ROUTES: [&str; 5] = [
    "/api/v1/push",
    "/api/v1/kick",
    "/api/v1/rooms/add",
    "/api/v1/rooms/remove",
    "/api/v1/presence",
];

/// How long a refusal of a key past its source's budget is held back (as
/// the upstream socket holds back a wrong secret's).
const LIMITED_DELAY: Duration = Duration::from_secs(1);

/// One API request as the router hands it over.
pub(super) struct Req<'a> {
    pub path: &'a str,
    pub parts: &'a Parts,
    /// Where it came from, for the failed-key budget.
    pub source: Source,
    pub failures: &'a parking_lot::Mutex<HelloLimiter>,
}

/// The failed-key limiter's clock: tokio's, so that paused-time tests
/// control it.
pub(super) fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// One line per source and interval, not one per failure.
pub(super) fn log_failures(r: &Report) {
    r.log(
        "HTTP API refused: missing or unknown key",
        "HTTP API requests with a missing or unknown key",
    );
}

/// What the API needs besides the node: its keys and its body bound.
#[derive(Clone)]
pub struct ApiSettings {
    keys: Vec<Vec<u8>>,
    max_body: usize,
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("keys", &format_args!("<{} hidden>", self.keys.len()))
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl ApiSettings {
    /// `keys`: the keys in force (empty: the API is off); `max_body`: the
    /// largest body taken, in bytes.
    pub fn new(keys: Vec<String>, max_body: usize) -> Self {
        Self {
            keys: keys.into_iter().map(String::into_bytes).collect(),
            max_body,
        }
    }

    /// From `[api]` (the environment applied: `TETHER_API_KEYS`).
    pub fn from_config(cfg: &crate::config::api::ApiConfig) -> Self {
        Self::new(cfg.keys.clone(), cfg.max_body as usize)
    }

    /// Whether `presented` is one of the keys. Every key is compared, each
    /// in constant time over its bytes, so neither which bytes match nor
    /// which key matched shows in the time taken (`subtle` returns at once
    /// on a length that differs, so a key's length may; keys of 16 bytes or
    /// more are not found by their length).
    fn accepts(&self, presented: &[u8]) -> bool {
        self.keys
            .iter()
            .fold(subtle::Choice::from(0), |ok, k| ok | k.ct_eq(presented))
            .into()
    }
}

/// An API refusal: its HTTP status and the JSON error it carries.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: Code,
    message: String,
    /// Extra headers (`WWW-Authenticate`, `Allow`).
    header: Option<(hyper::header::HeaderName, &'static str)>,
    /// Close the connection after the answer (a body left unread).
    close: bool,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            header: None,
            close: false,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Code::BadRequest, message)
    }

    pub(super) fn method_not_allowed() -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            "this route takes POST",
        );
        e.header = Some((hyper::header::ALLOW, "POST"));
        e
    }

    pub(super) fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            Code::Unsupported,
            "no such API route",
        )
    }

    fn refused(r: Refusal) -> Self {
        let status = match r.code {
            Code::BadRequest => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, r.code, r.message)
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let body = ErrorBody {
            code: self.code.as_str_name(),
            number: self.code as i32,
            message: self.message,
        };
        let mut r = json(self.status, &body);
        if let Some((k, v)) = self.header {
            r.headers_mut().insert(k, HeaderValue::from_static(v));
        }
        if self.close {
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// The JSON of every refusal.
#[derive(Serialize)]
struct ErrorBody {
    /// The code's name, as docs/PROTOCOL.md lists it (`CODE_BAD_REQUEST`).
    code: &'static str,
    /// Its number.
    number: i32,
    message: String,
}

/// A JSON answer.
pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    // Serializing these plain structs (strings, numbers, lists) cannot fail.
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// Serves one API request on `path` (one of [`ROUTES`]; the method is
/// checked by the caller): the key, then the body within `deadline`, then
/// the request itself.
///
/// The deadline bounds what the client controls (sending its body). The
/// request then runs to its end, bounded by the bus's own request timeout:
/// a push cut midway would have reached some of its recipients with its
/// outcome lost (see [`Bus::request`](crate::bus::Bus::request)).
pub(super) async fn serve(
    node: &dyn UpstreamNode,
    settings: &ApiSettings,
    req: Req<'_>,
    body: Incoming,
    deadline: Duration,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let (path, parts) = (req.path, req.parts);
    if let Err(e) = check_key(settings, parts) {
        if e.status != StatusCode::UNAUTHORIZED {
            return Err(e);
        }
        // A wrong key counts against its source: within the budget it is
        // refused at once; past it the refusal waits and says so.
        let verdict = req.failures.lock().handle_failure(req.source, now());
        if let Some(r) = &verdict.report {
            log_failures(r);
        }
        if verdict.allowed {
            return Err(e);
        }
        tokio::time::sleep(LIMITED_DELAY).await;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::RateLimited,
            "too many requests with a missing or unknown key from this address",
        );
        e.header = Some((hyper::header::RETRY_AFTER, "1"));
        e.close = true;
        return Err(e);
    }
    let route = path.trim_start_matches("/api/v1/").replace('/', "_");
    metrics::counter!(crate::metrics::API_REQUESTS, "route" => route).increment(1);
    let body = read_body(settings, parts, body, deadline).await?;
    match path {
        "/api/v1/push" => {
            let p: PushBody = decode(&body)?;
            let req = p.into_request()?;
            let done = requests::push(node, req).await.map_err(ApiError::refused)?;
            Ok(json(StatusCode::OK, &PushAnswer::from(done)))
        }
        "/api/v1/kick" => {
            let k: KickBody = decode(&body)?;
            let r = requests::kick(node, k.into_request()?)
                .await
                .map_err(ApiError::refused)?;
            Ok(json(StatusCode::OK, &CountAnswer::from(r)))
        }
        "/api/v1/rooms/add" | "/api/v1/rooms/remove" => {
            let b: RoomBody = decode(&body)?;
            let req = pb::RoomRequest {
                room: b.room,
                user_ids: b.user_ids,
                remove: path.ends_with("/remove"),
            };
            let r = requests::room(node, req).await.map_err(ApiError::refused)?;
            Ok(json(StatusCode::OK, &CountAnswer::from(r)))
        }
        "/api/v1/presence" => {
            let b: PresenceBody = decode(&body)?;
            let req = pb::PresenceRequest {
                user_ids: b.user_ids,
            };
            let r = requests::presence(node, req)
                .await
                .map_err(ApiError::refused)?;
            Ok(json(StatusCode::OK, &PresenceAnswer::from(r)))
        }
        _ => Err(ApiError::not_found()),
    }
}

/// The API off (no keys) is 403; a missing, malformed or unknown key 401
/// with `WWW-Authenticate: Bearer`.
fn check_key(settings: &ApiSettings, parts: &Parts) -> Result<(), ApiError> {
    if settings.keys.is_empty() {
        metrics::counter!(crate::metrics::API_REFUSED, "reason" => "off").increment(1);
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            Code::Unsupported,
            "no API keys configured: the API is off (set api.keys or TETHER_API_KEYS)",
        ));
    }
    let unauthorized = |message: &str| {
        metrics::counter!(crate::metrics::API_REFUSED, "reason" => "unauthorized").increment(1);
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, Code::UpstreamAuthFailed, message);
        e.header = Some((hyper::header::WWW_AUTHENTICATE, "Bearer realm=\"tether\""));
        e.close = true;
        e
    };
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Err(unauthorized("missing Authorization: Bearer <key>"));
    };
    let v = value.as_bytes();
    // The scheme is case-insensitive (RFC 9110, 11.1).
    let key = match v.get(..7) {
        Some(s) if s.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
        _ => return Err(unauthorized("Authorization must be Bearer <key>")),
    };
    if !settings.accepts(key) {
        return Err(unauthorized("unknown API key"));
    }
    Ok(())
}

/// Reads the whole body: at most `max_body` bytes (413 past it, at once
/// when `Content-Length` says so), within `deadline` (408 past it), JSON
/// only (415 for another declared type).
async fn read_body(
    settings: &ApiSettings,
    parts: &Parts,
    body: Incoming,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    if let Some(t) = parts.headers.get(CONTENT_TYPE) {
        let t = t.to_str().unwrap_or("");
        let essence = t.split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            let mut e = ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::BadRequest,
                "the body must be application/json",
            );
            e.close = true;
            return Err(e);
        }
    }
    let too_large = || {
        metrics::counter!(crate::metrics::API_REFUSED, "reason" => "too_large").increment(1);
        let mut e = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Code::FrameTooLarge,
            format!(
                "the body is over api.max_body ({} bytes)",
                settings.max_body
            ),
        );
        e.close = true;
        e
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > settings.max_body as u64) {
        return Err(too_large());
    }
    let read = Limited::new(body, settings.max_body).collect();
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => {
            let mut e = ApiError::bad(format!("reading the body failed: {e}"));
            e.close = true;
            Err(e)
        }
        Err(_) => {
            metrics::counter!(crate::metrics::API_REFUSED, "reason" => "timeout").increment(1);
            let mut e = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                Code::BadRequest,
                format!(
                    "the body did not arrive within metrics.request_timeout ({}s)",
                    deadline.as_secs_f64()
                ),
            );
            e.close = true;
            Err(e)
        }
    }
}

fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        metrics::counter!(crate::metrics::API_REFUSED, "reason" => "bad_json").increment(1);
        ApiError::bad(format!("invalid JSON body: {e}"))
    })
}

/// Who a push is for: `"everyone"`, or one of `{"user": ...}`,
/// `{"device": {"user_id": ..., "device_id": ...}}`, `{"users": [...]}`,
/// `{"room": ...}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Target {
    User(String),
    Device(DeviceTarget),
    Users(Vec<String>),
    Room(String),
    Everyone,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceTarget {
    user_id: String,
    device_id: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Lane {
    #[default]
    Interactive,
    Bulk,
}

/// `POST /api/v1/push`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    target: Target,
    /// The payload as UTF-8 text.
    #[serde(default)]
    payload: Option<String>,
    /// The payload as base64 (standard alphabet, padded), for bytes.
    #[serde(default)]
    payload_base64: Option<String>,
    #[serde(default)]
    lane: Lane,
    #[serde(default)]
    message_id: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    report_undelivered: bool,
    #[serde(default)]
    report_delivery: bool,
}

impl PushBody {
    fn into_request(self) -> Result<pb::PushRequest, ApiError> {
        use pb::push_request::Target as T;
        let payload = match (self.payload, self.payload_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad(
                    "give the payload as payload or payload_base64, not both",
                ))
            }
            (Some(p), None) => p.into_bytes(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b.as_bytes())
                .map_err(|e| ApiError::bad(format!("payload_base64: {e}")))?,
            (None, None) => Vec::new(),
        };
        let target = match self.target {
            Target::User(u) => T::UserId(u),
            Target::Device(d) => T::Device(pb::DeviceTarget {
                user_id: d.user_id,
                device_id: d.device_id,
            }),
            Target::Users(l) => T::Users(pb::UserList { user_ids: l }),
            Target::Room(r) => T::Room(r),
            Target::Everyone => T::Everyone(true),
        };
        let lane = match self.lane {
            Lane::Interactive => pb::Lane::Interactive,
            Lane::Bulk => pb::Lane::Bulk,
        };
        Ok(pb::PushRequest {
            target: Some(target),
            payload: payload.into(),
            source: self.source,
            message_id: self.message_id,
            report_undelivered: self.report_undelivered,
            lane: lane as i32,
            report_delivery: self.report_delivery,
        })
    }
}

/// `POST /api/v1/kick`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    user_id: String,
    /// Absent or empty: every device of the user.
    #[serde(default)]
    device_id: String,
    /// The code's name the client is closed with; `CODE_KICKED` when absent.
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    reason: String,
}

impl KickBody {
    fn into_request(self) -> Result<pb::KickRequest, ApiError> {
        let code = match self.code {
            None => Code::Kicked,
            Some(name) => Code::from_str_name(&name)
                .ok_or_else(|| ApiError::bad(format!("unknown code {name:?}")))?,
        };
        Ok(pb::KickRequest {
            user_id: self.user_id,
            device_id: self.device_id,
            code: code as i32,
            reason: self.reason,
        })
    }
}

/// `POST /api/v1/rooms/add` and `/api/v1/rooms/remove`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomBody {
    room: String,
    user_ids: Vec<String>,
}

/// `POST /api/v1/presence`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceBody {
    user_ids: Vec<String>,
}

/// A node of the cluster that did not run its part.
#[derive(Serialize)]
struct NodeErrorJson {
    node_id: String,
    code: &'static str,
    number: i32,
    message: String,
}

fn code_name(n: i32) -> &'static str {
    Code::try_from(n).map_or("CODE_INTERNAL", |c| c.as_str_name())
}

fn node_errors(v: Vec<pb::NodeError>) -> Vec<NodeErrorJson> {
    v.into_iter()
        .map(|e| NodeErrorJson {
            node_id: e.node_id,
            code: code_name(e.code),
            number: e.code,
            message: e.message,
        })
        .collect()
}

#[derive(Serialize)]
struct Undelivered {
    user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    code: &'static str,
    number: i32,
}

#[derive(Serialize)]
struct PushAnswer {
    message_id: String,
    sessions: u64,
    dropped: u64,
    failed: Vec<NodeErrorJson>,
    undelivered: Vec<Undelivered>,
}

impl From<requests::Pushed> for PushAnswer {
    fn from(p: requests::Pushed) -> Self {
        let device = p.device.map(|d| d.to_string());
        Self {
            message_id: p.reply.message_id,
            sessions: p.reply.sessions,
            dropped: p.reply.dropped,
            failed: node_errors(p.reply.failed),
            undelivered: p
                .undelivered
                .into_iter()
                .map(|(u, c)| Undelivered {
                    user_id: u.to_string(),
                    device_id: device.clone(),
                    code: c.as_str_name(),
                    number: c as i32,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct CountAnswer {
    sessions: u64,
    failed: Vec<NodeErrorJson>,
}

impl From<pb::CountReply> for CountAnswer {
    fn from(r: pb::CountReply) -> Self {
        Self {
            sessions: r.sessions,
            failed: node_errors(r.failed),
        }
    }
}

#[derive(Serialize)]
struct DeviceJson {
    device_id: String,
    session_id: u64,
    node_id: String,
    platform: &'static str,
    transport: String,
    since_ms: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    remote_addr: String,
}

#[derive(Serialize)]
struct UserJson {
    user_id: String,
    devices: Vec<DeviceJson>,
}

#[derive(Serialize)]
struct PresenceAnswer {
    users: Vec<UserJson>,
    failed: Vec<NodeErrorJson>,
}

impl From<pb::PresenceReply> for PresenceAnswer {
    fn from(r: pb::PresenceReply) -> Self {
        let users = r
            .users
            .into_iter()
            .map(|u| UserJson {
                user_id: u.user_id,
                devices: u
                    .devices
                    .into_iter()
                    .map(|d| DeviceJson {
                        device_id: d.device_id,
                        session_id: d.session_id,
                        node_id: d.node_id,
                        platform: pb::Platform::try_from(d.platform)
                            .map_or("PLATFORM_UNSPECIFIED", |p| p.as_str_name()),
                        transport: d.transport,
                        since_ms: d.since_ms,
                        remote_addr: d.remote_addr,
                    })
                    .collect(),
            })
            .collect();
        Self {
            users,
            failed: node_errors(r.failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_key_opens_and_nothing_else_does() {
        let s = ApiSettings::new(
            vec!["0123456789abcdef".into(), "fedcba9876543210".into()],
            1024,
        );
        assert!(s.accepts(b"0123456789abcdef"));
        assert!(s.accepts(b"fedcba9876543210"));
        assert!(!s.accepts(b"0123456789abcde"));
        assert!(!s.accepts(b"0123456789abcdefg"));
        assert!(!s.accepts(b""));
        assert!(!ApiSettings::new(Vec::new(), 1024).accepts(b""));
    }

    #[test]
    fn targets_decode_from_their_json_shapes() {
        let t = |s: &str| serde_json::from_str::<Target>(s);
        assert!(matches!(t(r#""everyone""#).unwrap(), Target::Everyone));
        assert!(matches!(t(r#"{"user":"a"}"#).unwrap(), Target::User(u) if u == "a"));
        assert!(matches!(t(r#"{"users":["a","b"]}"#).unwrap(), Target::Users(l) if l.len() == 2));
        assert!(matches!(t(r#"{"room":"r"}"#).unwrap(), Target::Room(r) if r == "r"));
        assert!(matches!(
            t(r#"{"device":{"user_id":"a","device_id":"d"}}"#).unwrap(),
            Target::Device(d) if d.user_id == "a" && d.device_id == "d"
        ));
        assert!(t(r#"{"device":{"user_id":"a","device_id":"d","x":1}}"#).is_err());
        assert!(t(r#"{"planet":"mars"}"#).is_err());
    }

    #[test]
    fn a_payload_is_text_or_base64_never_both() {
        let body = |extra: &str| {
            serde_json::from_str::<PushBody>(&format!(r#"{{"target":"everyone"{extra}}}"#))
                .unwrap()
                .into_request()
        };
        assert_eq!(
            &body(r#","payload":"hé""#).unwrap().payload[..],
            "hé".as_bytes()
        );
        assert_eq!(
            &body(r#","payload_base64":"AAEC""#).unwrap().payload[..],
            [0, 1, 2]
        );
        assert!(body(r#","payload_base64":"not base64!""#).is_err());
        assert!(body(r#","payload":"a","payload_base64":"AA==""#).is_err());
        assert!(body("").unwrap().payload.is_empty());
    }
}
