//! The WebSocket upgrade (RFC 6455, section 4): the HTTP/1.1 request a
//! WebSocket client opens with, read within a deadline and a size bound,
//! and its answer: `101 Switching Protocols`, or a refusal with a 4xx
//! status and a one-line text body, after which the connection closes.
//!
//! [`answer`] is the pure part (request bytes in, what to answer out; its
//! unit tests cover every refusal); [`upgrade`] reads and writes over a
//! [`Wire`] (a TCP socket, or TLS over one for `listen.wss`). The request
//! is parsed by `httparse` with a bounded header count; the head is bounded
//! by [`MAX_HEAD`], so a client costs at most that many bytes until it is
//! upgraded. The caller bounds the time (`session.login_timeout`): a client
//! that trickles its request is cut off then, and its connection slot freed.
//!
//! Only `GET /tether` upgrades. Any other GET is answered by [`get`], the
//! one place that decides what plain HTTP requests get: the example browser
//! client ([`PAGES`]: `/` and `/tether.js`, unless `listen.ws_page` is off),
//! 426 for a plain GET of `/tether`, and 404 for every other path.

use std::future::poll_fn;
use std::io;

use base64::Engine as _;
use tokio::io::ReadBuf;

pub use crate::wire::ws::accept_key;
use crate::wire::ws::{PATH, SUBPROTOCOL};

use super::Wire;

/// The most bytes of request head read before it is refused with 431.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines a request may have (431 beyond).
const MAX_HEADERS: usize = 32;

/// What a listener's upgrade asks of a request.
#[derive(Debug, Clone, Default)]
pub struct UpgradePolicy {
    /// `listen.ws_origins`: the `Origin` values allowed; empty allows any.
    /// A request without an `Origin` (not from a browser) is not checked.
    pub origins: Vec<String>,
    /// `listen.ws_page`: whether a plain GET of `/` or `/tether.js` gets
    /// the example browser client ([`PAGES`]).
    pub page: bool,
}

/// A file the WebSocket listener serves over plain HTTP.
#[derive(Debug, PartialEq, Eq)]
pub struct Page {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// The example browser client (web/ in the repository), built into the
/// binary: a page that logs in over this listener, shows and acknowledges
/// pushes, sends uplinks and resumes after a drop.
pub const PAGES: [Page; 2] = [
    Page {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../web/index.html"),
    },
    Page {
        path: "/tether.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/tether.js"),
    },
];

impl Page {
    /// The whole HTTP response. The page takes its token from the URL's
    /// fragment, which browsers never send, and sends no referrer.
    pub fn response(&self) -> Vec<u8> {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-cache\r\nX-Content-Type-Options: nosniff\r\n\
             Referrer-Policy: no-referrer\r\n\
             Content-Security-Policy: default-src 'self'; script-src 'self' 'unsafe-inline'; \
             style-src 'unsafe-inline'; connect-src 'self' ws: wss:\r\n\
             Connection: close\r\n\r\n",
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        r.extend_from_slice(self.body.as_bytes());
        r
    }
}

/// A refusal: its status, and the one line its body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub body: &'static str,
}

impl Refusal {
    fn new(status: u16, body: &'static str) -> Self {
        Self { status, body }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        }
    }

    /// The whole HTTP response.
    pub fn response(&self) -> Vec<u8> {
        let mut extra = String::new();
        match self.status {
            405 => extra.push_str("Allow: GET\r\n"),
            426 => extra.push_str(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
            ),
            503 => extra.push_str("Retry-After: 5\r\n"),
            _ => {}
        }
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{}\n",
            self.status,
            self.reason(),
            self.body.len() + 1,
            self.body
        )
        .into_bytes()
    }
}

/// The answer a connection refused by a connection limit gets, written on
/// the accept loop before its socket closes.
pub fn busy() -> Refusal {
    Refusal::new(503, "connection limit reached; retry later")
}

/// What to do with the request head read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The head is not complete yet.
    Partial,
    /// Upgrade: the `101` response to write, and where the head ended (the
    /// bytes after it are the client's first frames).
    Upgrade { response: Vec<u8>, head_len: usize },
    /// Refuse, and close.
    Refuse(Refusal),
    /// Serve a page (a plain GET), and close.
    Page(&'static Page),
}

impl From<Refusal> for Answer {
    fn from(r: Refusal) -> Self {
        Self::Refuse(r)
    }
}

/// Decides what to answer to the request head in `buf`.
pub fn answer(buf: &[u8], policy: &UpgradePolicy) -> Answer {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Answer::Refuse(Refusal::new(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Answer::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Answer::Refuse(Refusal::new(431, "too many header fields"))
        }
        Err(_) => return Answer::Refuse(Refusal::new(400, "malformed HTTP request")),
    };
    if head_len > MAX_HEAD {
        return Answer::Refuse(Refusal::new(431, "request head too large"));
    }
    match check(&req, policy) {
        Ok(key) => Answer::Upgrade {
            response: switching(&key),
            head_len,
        },
        Err(a) => a,
    }
}

/// The checks of RFC 6455, 4.2.1, and ours; the client's key.
fn check(req: &httparse::Request<'_, '_>, policy: &UpgradePolicy) -> Result<String, Answer> {
    let path = req.path.unwrap_or("");
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if req.version != Some(1) {
        return Err(refuse(400, "HTTP/1.1 required"));
    }
    if req.method != Some("GET") {
        return Err(refuse(405, "only GET is served"));
    }
    let header = |name: &str| -> Option<&str> {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    // Every value of a header that may repeat, split at commas.
    let tokens = |name: &str| -> Vec<String> {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let upgrade = tokens("upgrade").iter().any(|t| t == "websocket");
    let connection = tokens("connection").iter().any(|t| t == "upgrade");
    if !upgrade && !connection && header("sec-websocket-key").is_none() {
        return Err(get(path, policy.page));
    }
    if path != PATH {
        return Err(refuse(404, "no WebSocket endpoint here; it is /tether"));
    }
    if !upgrade || !connection {
        return Err(refuse(
            400,
            "Upgrade: websocket and Connection: Upgrade are required",
        ));
    }
    if header("host").is_none() {
        return Err(refuse(400, "Host is required"));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(refuse(426, "Sec-WebSocket-Version 13 is required"));
    }
    let key = header("sec-websocket-key").unwrap_or("");
    let key_ok = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !key_ok {
        return Err(refuse(400, "Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    if !policy.origins.is_empty() {
        if let Some(origin) = header("origin") {
            if !policy
                .origins
                .iter()
                .any(|o| o.eq_ignore_ascii_case(origin))
            {
                return Err(refuse(403, "origin not allowed"));
            }
        }
    }
    if !tokens("sec-websocket-protocol")
        .iter()
        .any(|t| t == SUBPROTOCOL)
    {
        return Err(refuse(
            400,
            "the subprotocol tether.v1 is required (Sec-WebSocket-Protocol)",
        ));
    }
    Ok(key.to_owned())
}

fn refuse(status: u16, body: &'static str) -> Answer {
    Answer::Refuse(Refusal::new(status, body))
}

/// The answer to a plain GET (no upgrade asked): the one place that
/// decides what the WebSocket listener serves over HTTP. The example
/// client's files (when `page`); `/tether` says that it wants an upgrade;
/// every other path is not found.
fn get(path: &str, page: bool) -> Answer {
    if let Some(p) = PAGES.iter().find(|p| page && p.path == path) {
        return Answer::Page(p);
    }
    if path == PATH {
        refuse(426, "this is a WebSocket endpoint (subprotocol tether.v1)")
    } else {
        refuse(404, "not found")
    }
}

fn switching(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n",
        accept_key(key)
    )
    .into_bytes()
}

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The request was refused with this status (the answer is written).
    #[error("refused with HTTP {0}")]
    Refused(u16),
    /// A plain GET was answered with a page (written); the connection closes.
    #[error("served {0}")]
    Served(&'static str),
    /// The peer closed, or the socket failed, before the upgrade.
    #[error("connection failed during the upgrade: {0}")]
    Io(#[from] io::Error),
}

/// Reads the upgrade request from `io` and answers it. On success, the
/// bytes the client sent behind its request (its first frames).
///
/// # Errors
/// A refusal (answered, the caller closes) or a socket error.
///
/// # Cancel safety
/// Not cancel safe: the caller drops the connection when it gives up (the
/// deadline).
pub async fn upgrade<W: Wire>(io: &mut W, policy: &UpgradePolicy) -> Result<Vec<u8>, UpgradeError> {
    // Grows with the bytes that come, up to MAX_HEAD (and one read beyond).
    let mut head = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let n = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut chunk);
            io.poll_read(cx, &mut rb).map_ok(|()| rb.filled().len())
        })
        .await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        head.extend_from_slice(&chunk[..n]);
        match answer(&head, policy) {
            Answer::Partial => continue,
            Answer::Upgrade { response, head_len } => {
                write_all(io, &response).await?;
                head.drain(..head_len);
                head.shrink_to_fit();
                return Ok(head);
            }
            Answer::Refuse(r) => {
                write_all(io, &r.response()).await?;
                let _ = poll_fn(|cx| io.poll_shutdown(cx)).await;
                return Err(UpgradeError::Refused(r.status));
            }
            Answer::Page(p) => {
                write_all(io, &p.response()).await?;
                let _ = poll_fn(|cx| io.poll_shutdown(cx)).await;
                return Err(UpgradeError::Served(p.path));
            }
        }
    }
}

async fn write_all<W: Wire>(io: &mut W, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = poll_fn(|cx| io.poll_write(0, cx, buf)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    poll_fn(|cx| io.poll_flush(0, cx)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request(lines: &[&str]) -> Vec<u8> {
        let mut s = String::new();
        for l in lines {
            s.push_str(l);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }

    fn good() -> Vec<&'static str> {
        vec![
            "GET /tether HTTP/1.1",
            "Host: example.com",
            "Upgrade: websocket",
            "Connection: keep-alive, Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat, tether.v1",
            "Origin: https://app.example.com",
        ]
    }

    fn status(lines: &[&str], policy: &UpgradePolicy) -> u16 {
        match answer(&request(lines), policy) {
            Answer::Upgrade { .. } => 101,
            Answer::Refuse(r) => r.status,
            Answer::Page(_) => 200,
            Answer::Partial => 0,
        }
    }

    #[test]
    fn the_accept_key_is_rfc_6455s_example() {
        assert_eq!(accept_key(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn a_good_request_upgrades_and_keeps_the_bytes_behind_it() {
        let mut req = request(&good());
        let n = req.len();
        req.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        let Answer::Upgrade { response, head_len } = answer(&req, &UpgradePolicy::default()) else {
            panic!("not upgraded");
        };
        assert_eq!(head_len, n);
        let text = String::from_utf8(response).expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: tether.v1\r\n"));
        assert!(!text.contains("Extensions"), "no extension is negotiated");
    }

    #[test]
    fn each_refusal_has_its_status() {
        let p = UpgradePolicy::default();
        let with = |f: &dyn Fn(&mut Vec<&'static str>)| {
            let mut l = good();
            f(&mut l);
            l
        };
        let drop_header = |name: &'static str| {
            with(&move |l: &mut Vec<&'static str>| l.retain(|h| !h.starts_with(name)))
        };
        assert_eq!(status(&good(), &p), 101);
        assert_eq!(status(&["GET /tether HTTP/1.1", "Host: x"], &p), 426);
        assert_eq!(status(&["GET / HTTP/1.1", "Host: x"], &p), 404);
        assert_eq!(status(&["GET /index.html HTTP/1.1", "Host: x"], &p), 404);
        assert_eq!(status(&with(&|l| l[0] = "GET /other HTTP/1.1"), &p), 404);
        assert_eq!(status(&with(&|l| l[0] = "POST /tether HTTP/1.1"), &p), 405);
        assert_eq!(status(&with(&|l| l[0] = "GET /tether HTTP/1.0"), &p), 400);
        assert_eq!(status(&drop_header("Upgrade"), &p), 400);
        assert_eq!(status(&drop_header("Connection"), &p), 400);
        assert_eq!(status(&drop_header("Host"), &p), 400);
        assert_eq!(status(&drop_header("Sec-WebSocket-Key"), &p), 400);
        assert_eq!(status(&drop_header("Sec-WebSocket-Version"), &p), 426);
        assert_eq!(status(&drop_header("Sec-WebSocket-Protocol"), &p), 400);
        assert_eq!(
            status(&with(&|l| l[4] = "Sec-WebSocket-Key: c2hvcnQ="), &p),
            400
        );
        assert_eq!(
            status(&with(&|l| l[5] = "Sec-WebSocket-Version: 8"), &p),
            426
        );
        assert_eq!(
            status(&with(&|l| l[6] = "Sec-WebSocket-Protocol: chat"), &p),
            400
        );
        assert_eq!(status(&["BLAH\u{1}"], &p), 400);
        assert_eq!(status(&good()[..3], &p), 400, "Connection and key missing");
    }

    #[test]
    fn the_example_client_is_served_when_the_page_is_on() {
        let on = UpgradePolicy {
            page: true,
            ..UpgradePolicy::default()
        };
        let get = |path: &str, policy: &UpgradePolicy| {
            let line = format!("GET {path} HTTP/1.1");
            match answer(&request(&[&line, "Host: x"]), policy) {
                Answer::Page(p) => Some(p),
                _ => None,
            }
        };
        let index = get("/?x=1", &on).expect("the page");
        assert!(index.body.contains("tether.js"));
        let js = get("/tether.js", &on).expect("the client");
        assert!(js.body.contains("class TetherClient"));
        assert_eq!(get("/", &UpgradePolicy::default()), None, "off");
        assert_eq!(get("/other", &on), None);
        assert_eq!(status(&["GET /tether HTTP/1.1", "Host: x"], &on), 426);
        // An upgrade is an upgrade, whatever the page setting.
        assert_eq!(status(&good(), &on), 101);
        let r = String::from_utf8(js.response()).expect("utf-8");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(&format!("Content-Length: {}\r\n", js.body.len())));
        assert!(r.contains("Content-Type: text/javascript"));
        assert!(r.ends_with(js.body));
    }

    #[test]
    fn origins_are_checked_only_when_listed_and_given() {
        let open = UpgradePolicy::default();
        let listed = UpgradePolicy {
            origins: vec!["https://app.example.com".into()],
            page: false,
        };
        let other = UpgradePolicy {
            origins: vec!["https://elsewhere.example".into()],
            page: false,
        };
        assert_eq!(status(&good(), &open), 101);
        assert_eq!(status(&good(), &listed), 101);
        assert_eq!(status(&good(), &other), 403);
        let no_origin: Vec<_> = good()
            .into_iter()
            .filter(|h| !h.starts_with("Origin"))
            .collect();
        assert_eq!(
            status(&no_origin, &other),
            101,
            "not a browser: not checked"
        );
    }

    #[test]
    fn a_head_is_partial_until_it_ends_and_refused_past_the_bound() {
        let req = request(&good());
        let p = UpgradePolicy::default();
        assert_eq!(answer(&req[..req.len() - 1], &p), Answer::Partial);
        let mut long = b"GET /tether HTTP/1.1\r\nX-Pad: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert!(matches!(
            answer(&long, &p),
            Answer::Refuse(Refusal { status: 431, .. })
        ));
        let mut many = vec!["GET /tether HTTP/1.1"];
        many.extend(std::iter::repeat_n("X-A: b", MAX_HEADERS + 1));
        assert_eq!(status(&many, &p), 431);
    }

    #[test]
    fn a_refusal_is_a_whole_http_response_with_one_line() {
        let r =
            String::from_utf8(Refusal::new(403, "origin not allowed").response()).expect("ascii");
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.contains("Content-Length: 19\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\norigin not allowed\n"), "{r}");
    }
}
