//! The admin listener: a small HTTP/1.1 server for operators (hyper), with
//! a router that serves `/metrics`, the live status page (`/` and
//! `/status.json`, [`status`]), the HTTP API (`/api/v1/`, [`api`]) and its
//! OpenAPI document (`/api/openapi.json`).
//!
//! It owns the bounds that keep it from taking what device connections
//! need: a cap on open connections (past it a new one is closed as soon as
//! it is accepted), a header-read timeout (hyper's; it also bounds the
//! wait between requests on a kept-alive connection), an idle bound (no
//! byte moving either way, as when a client does not read its response),
//! and a time limit on answering each request (for the API, on receiving
//! its body). Each bound that bites is counted
//! (`tether_admin_connections_refused_total`,
//! `tether_admin_timeouts_total`, `tether_api_refused_total`). It must not
//! reach into the gateway: what a route needs is handed to it in [`Admin`]
//! (the node, as an [`AdminNode`]).

pub mod api;
pub mod status;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{self as m, Exporter};
use crate::upstream::hello_limit::{HelloLimiter, Source};
use crate::upstream::UpstreamNode;
pub use api::ApiSettings;
pub use status::{ClusterStatus, NodeStatus, PeerStatus, StatusSource};

/// The status page: HTML, CSS and its script in one file, served from the
/// binary (no CDN, no external font: operators' machines may have no
/// internet).
pub const STATUS_PAGE: &str = include_str!("status.html");

/// The OpenAPI 3 document of every route, served at `/api/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every route of the listener and the methods it takes (anything else is
/// 405 with `Allow`). The OpenAPI document describes exactly these.
pub const ROUTES: [(&str, &[&str]); 9] = [
    ("/", &["GET", "HEAD"]),
    ("/status.json", &["GET", "HEAD"]),
    ("/metrics", &["GET", "HEAD"]),
    ("/api/openapi.json", &["GET", "HEAD"]),
    (api::ROUTES[0], &["POST"]),
    (api::ROUTES[1], &["POST"]),
    (api::ROUTES[2], &["POST"]),
    (api::ROUTES[3], &["POST"]),
    (api::ROUTES[4], &["POST"]),
];

/// The admin listener's bounds (`[metrics]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time to send a complete request head, from accept or from the end
    /// of the previous response.
    pub header_timeout: Duration,
    /// A connection on which no byte moves either way for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// Time the gateway may take to answer one request.
    pub request_timeout: Duration,
}

impl Limits {
    /// The admin listener's bounds, from `[metrics]`.
    pub fn from_config(cfg: &Config) -> Self {
        let m = &cfg.metrics;
        Self {
            max_connections: m.max_connections as usize,
            header_timeout: m.header_timeout,
            idle_timeout: m.idle_timeout,
            request_timeout: m.request_timeout,
        }
    }
}

/// What the node is to the admin listener: the node its API requests run
/// on (as the upstream socket runs them) and the source of its status. The
/// gateway implements both.
pub trait AdminNode: UpstreamNode + StatusSource {}

impl<T: UpstreamNode + StatusSource> AdminNode for T {}

/// What the routes serve.
pub struct Admin {
    /// Rendered at `/metrics`.
    exporter: Arc<Exporter>,
    /// The node behind the API and the status page; without one they
    /// answer 503 (`/metrics` alone).
    node: Option<Arc<dyn AdminNode>>,
    api: ApiSettings,
    sampler: Mutex<status::Sampler>,
    /// Requests with a missing or unknown API key, by source: past a
    /// source's budget its refusals are held back, and they are logged
    /// once per interval with a count (as the upstream socket's failed
    /// Hellos are).
    failures: Mutex<HelloLimiter>,
}

impl Admin {
    /// `/metrics` only: the API and the status page answer 503.
    pub fn metrics_only(exporter: Arc<Exporter>) -> Self {
        Self {
            exporter,
            node: None,
            api: ApiSettings::new(Vec::new(), 0),
            sampler: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Every route, for `node`.
    pub fn new(exporter: Arc<Exporter>, node: Arc<dyn AdminNode>, api: ApiSettings) -> Self {
        Self {
            exporter,
            node: Some(node),
            api,
            sampler: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Takes a status sample now (`/status.json`'s), off the async workers
    /// (the metrics page is rendered to read its counters).
    async fn sample(self: &Arc<Self>) -> Option<Bytes> {
        let node = self.node.clone()?;
        let me = self.clone();
        let taken = tokio::task::spawn_blocking(move || {
            let page = me.exporter.render_series();
            let st = node.status();
            me.sampler.lock().record(Instant::now(), st, &page)
        });
        taken.await.ok()
    }
}

/// How often the histogram samples are folded into buckets between
/// scrapes ([`Exporter::run_upkeep`]).
const UPKEEP: Duration = Duration::from_secs(5);

/// After a failed `accept` (out of descriptors, most likely), wait this long
/// before the next one instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves the admin routes on `listener` until `stop` is cancelled.
///
/// # Cancel safety
/// Dropping the future stops accepting; connections being served finish
/// on their own tasks, within the bounds of [`Limits`].
pub async fn serve(
    listener: TcpListener,
    admin: Arc<Admin>,
    limits: Limits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut upkeep = tokio::time::interval(UPKEEP);
    upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    if admin.node.is_some() {
        // Its own task: a sample renders the metrics page on a blocking
        // thread, which the accept loop does not wait for.
        let (admin, stop) = (admin.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(status::INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                admin.sample().await;
            }
        });
    }
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = upkeep.tick() => {
                admin.exporter.run_upkeep();
                let due = admin.failures.lock().sweep(api::now());
                due.iter().for_each(api::log_failures);
                continue;
            }
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok((s, peer)) => (s, peer),
            Err(e) => {
                tracing::debug!(error = %e, "admin accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Past the cap the connection is closed at once: its descriptor is
        // given back now, not after a timeout.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(m::ADMIN_REFUSED).increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let admin = admin.clone();
        tokio::spawn(async move {
            metrics::gauge!(m::ADMIN_CONNECTIONS).increment(1.0);
            serve_connection(stream, Source::Ip(peer.ip()), admin, limits).await;
            metrics::gauge!(m::ADMIN_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
}

async fn serve_connection<S>(stream: S, source: Source, admin: Arc<Admin>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Idle::new(stream, limits.idle_timeout));
    let svc = hyper::service::service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(route(admin, source, req, limits.request_timeout).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, svc);
    if let Err(e) = conn.await {
        if e.is_timeout() {
            metrics::counter!(m::ADMIN_TIMEOUTS, "kind" => "header").increment(1);
        } else if is_idle_timeout(&e) {
            metrics::counter!(m::ADMIN_TIMEOUTS, "kind" => "idle").increment(1);
        }
        tracing::debug!(error = %e, "admin connection failed");
    }
}

/// Whether hyper's error came from [`Idle`]'s timeout.
fn is_idle_timeout(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

/// The router: one arm per path of [`ROUTES`].
async fn route(
    admin: Arc<Admin>,
    source: Source,
    req: Request<Incoming>,
    request_timeout: Duration,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let Some((_, methods)) = ROUTES.iter().find(|(p, _)| *p == path) else {
        return if path.starts_with("/api/") {
            api::ApiError::not_found().into_response()
        } else {
            text(StatusCode::NOT_FOUND, "not found\n")
        };
    };
    if !methods.contains(&parts.method.as_str()) {
        return if path.starts_with("/api/v1/") {
            api::ApiError::method_not_allowed().into_response()
        } else {
            method_not_allowed("GET, HEAD")
        };
    }
    if parts.method == Method::POST {
        // Only the API's routes take POST.
        let Some(node) = admin.node.clone() else {
            let e = api::ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                crate::wire::Code::Unsupported,
                "no node behind this listener",
            );
            return e.into_response();
        };
        let req = api::Req {
            path: &path,
            parts: &parts,
            source,
            failures: &admin.failures,
        };
        return api::serve(&*node, &admin.api, req, body, request_timeout)
            .await
            .unwrap_or_else(api::ApiError::into_response);
    }
    // Nothing below reads a request body; dropping it now tells hyper so
    // (it closes the connection instead of reading a body nobody wants).
    drop(body);
    match path.as_str() {
        "/metrics" => metrics_page(&admin, request_timeout).await,
        "/" => static_page(STATUS_PAGE, "text/html; charset=utf-8"),
        "/api/openapi.json" => static_page(OPENAPI, "application/json; charset=utf-8"),
        "/status.json" => {
            let latest = admin.sampler.lock().latest();
            let json = match latest {
                Some(j) => Some(j),
                None => admin.sample().await,
            };
            match json {
                Some(j) => {
                    let mut r = Response::new(Full::new(j));
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("application/json; charset=utf-8"),
                    );
                    r.headers_mut()
                        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    r
                }
                None => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no node behind this listener\n",
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn static_page(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn metrics_page(admin: &Admin, request_timeout: Duration) -> Response<Full<Bytes>> {
    // Rendering reads /proc (one directory entry per open descriptor for
    // process_open_fds): a blocking thread, not an async worker.
    let exporter = admin.exporter.clone();
    let render = tokio::task::spawn_blocking(move || exporter.render());
    match tokio::time::timeout(request_timeout, render).await {
        Ok(Ok(page)) => {
            let mut r = Response::new(Full::new(Bytes::from(page)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "rendering the metrics page failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "render failed\n")
        }
        Err(_) => {
            metrics::counter!(m::ADMIN_TIMEOUTS, "kind" => "request").increment(1);
            text(StatusCode::SERVICE_UNAVAILABLE, "timed out\n")
        }
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// A stream that fails with `TimedOut` once no byte has moved either way
/// for `timeout` while its user waits on it: hyper then drops the
/// connection. Hyper has no such bound of its own for a response the
/// client does not read.
struct Idle<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> Idle<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn progressed(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }

    /// Called when the inner stream is not ready: an error once the
    /// deadline has passed, else `Pending` (with the deadline's waker set).
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        ready!(self.deadline.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "admin connection idle",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => this.poll_deadline(cx),
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.progressed();
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.poll_deadline(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.progressed();
                }
                Poll::Ready(r)
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.poll_deadline(cx),
            Poll::Ready(r) => {
                if matches!(r, Ok(n) if n > 0) {
                    this.progressed();
                }
                Poll::Ready(r)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_deadline(cx),
            r => r,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.poll_deadline(cx),
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(60),
        }
    }

    fn admin() -> Arc<Admin> {
        Arc::new(Admin::metrics_only(Arc::new(Exporter::unattached())))
    }

    /// A client that sends a request and never reads the answer: the
    /// answer fills the pipe, no byte moves, and the idle bound closes the
    /// connection (the header timeout, a minute here, would not).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_is_closed_when_idle() {
        let (mut client, server) = tokio::io::duplex(64);
        let t0 = Instant::now();
        let conn = tokio::spawn(serve_connection(server, Source::Other, admin(), limits()));
        client
            .write_all(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), conn)
            .await
            .expect("the connection outlived its idle bound")
            .unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(3), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        // What did get through is the start of the 404.
        let mut got = vec![0u8; 64];
        let n = client.read(&mut got).await.unwrap();
        assert!(got[..n].starts_with(b"HTTP/1.1 404"), "{:?}", &got[..n]);
    }

    /// The same client reading its answer is served and kept alive.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_is_answered() {
        let (mut client, server) = tokio::io::duplex(64);
        let conn = tokio::spawn(serve_connection(server, Source::Other, admin(), limits()));
        client
            .write_all(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 404"), "{got:?}");
        assert!(got.ends_with(b"not found\n"), "{got:?}");
        conn.await.unwrap();
    }

    /// A node whose bus runs nothing: every command reaches no session.
    struct NoSessions;

    impl crate::bus::Executor for NoSessions {
        fn execute(&self, _: &crate::bus::Command) -> crate::bus::Outcome {
            crate::bus::Outcome::Count(0)
        }
        fn run<'a>(
            &'a self,
            _: &'a crate::bus::Command,
        ) -> Pin<Box<dyn Future<Output = crate::bus::Outcome> + Send + 'a>> {
            Box::pin(async { crate::bus::Outcome::Push(crate::bus::PushOutcome::default()) })
        }
    }

    struct FakeNode {
        bus: Arc<dyn crate::bus::Bus>,
        id: crate::ids::NodeId,
    }

    impl UpstreamNode for FakeNode {
        fn bus(&self) -> &Arc<dyn crate::bus::Bus> {
            &self.bus
        }
        fn node_id(&self) -> &crate::ids::NodeId {
            &self.id
        }
        fn new_message_id(&self) -> String {
            "m-1".into()
        }
    }

    impl StatusSource for FakeNode {
        fn status(&self) -> NodeStatus {
            NodeStatus {
                node_id: self.id.to_string(),
                ..NodeStatus::default()
            }
        }
    }

    fn api_admin() -> Arc<Admin> {
        let id = crate::ids::NodeId::new("fake");
        let bus = crate::bus::LocalBus::new(id.clone(), Arc::new(NoSessions), Arc::default());
        let node = Arc::new(FakeNode {
            bus: Arc::new(bus),
            id,
        });
        Arc::new(Admin::new(
            Arc::new(Exporter::unattached()),
            node,
            ApiSettings::new(vec!["0123456789abcdef".into()], 1024),
        ))
    }

    /// A body that stops coming is refused with 408 at the request timeout
    /// (5 s here), on virtual time: not at the idle bound or the header
    /// timeout, and not never.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_is_refused_at_the_request_timeout() {
        let limits = Limits {
            max_connections: 4,
            header_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
        };
        let (mut client, server) = tokio::io::duplex(4096);
        let t0 = Instant::now();
        let conn = tokio::spawn(serve_connection(server, Source::Other, api_admin(), limits));
        client
            .write_all(
                b"POST /api/v1/presence HTTP/1.1\r\nHost: x\r\n\
                  Authorization: Bearer 0123456789abcdef\r\nContent-Length: 100\r\n\r\n{\"user",
            )
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let took = t0.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("\"number\":1005"), "{text}");
        assert_eq!(took, Duration::from_secs(5), "{took:?}");
        conn.await.unwrap();
    }

    /// A body declared over the bound is refused at once, unread, and the
    /// connection closed; one within it runs (here against a node that
    /// holds no session).
    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_bound_is_refused_unread() {
        let (mut client, server) = tokio::io::duplex(4096);
        let t0 = Instant::now();
        let conn = tokio::spawn(serve_connection(
            server,
            Source::Other,
            api_admin(),
            limits(),
        ));
        client
            .write_all(
                b"POST /api/v1/push HTTP/1.1\r\nHost: x\r\n\
                  Authorization: Bearer 0123456789abcdef\r\nContent-Length: 999999\r\n\r\n",
            )
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
        assert!(text.contains("CODE_FRAME_TOO_LARGE"), "{text}");
        assert_eq!(t0.elapsed(), Duration::ZERO);
        conn.await.unwrap();

        let (mut client, server) = tokio::io::duplex(4096);
        let conn = tokio::spawn(serve_connection(
            server,
            Source::Other,
            api_admin(),
            limits(),
        ));
        let body = br#"{"target":{"user":"nobody"},"payload":"x"}"#;
        let head = format!(
            "POST /api/v1/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer 0123456789abcdef\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        client.write_all(head.as_bytes()).await.unwrap();
        client.write_all(body).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.ends_with(
                r#"{"message_id":"m-1","sessions":0,"dropped":0,"failed":[],"undelivered":[]}"#
            ),
            "{text}"
        );
        conn.await.unwrap();
    }
}
