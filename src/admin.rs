//! The admin listener: a small HTTP/1.1 server for operators (hyper), with
//! a router that serves `/metrics` and can grow more routes.
//!
//! It owns the bounds that keep it from taking what device connections
//! need: a cap on open connections (past it a new one is closed as soon as
//! it is accepted), a header-read timeout (hyper's; it also bounds the
//! wait between requests on a kept-alive connection), an idle bound (no
//! byte moving either way, as when a client does not read its response),
//! and a time limit on answering each request. Each bound that bites is
//! counted (`tether_admin_connections_refused_total`,
//! `tether_admin_timeouts_total`). It must not reach into the gateway: what
//! a route shows is handed to it in [`Admin`].

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
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::metrics::{self as m, Exporter};

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

/// What the routes serve.
pub struct Admin {
    /// Rendered at `/metrics`.
    pub exporter: Arc<Exporter>,
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
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            _ = upkeep.tick() => {
                admin.exporter.run_upkeep();
                continue;
            }
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
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
            serve_connection(stream, admin, limits).await;
            metrics::gauge!(m::ADMIN_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
}

async fn serve_connection<S>(stream: S, admin: Arc<Admin>, limits: Limits)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Idle::new(stream, limits.idle_timeout));
    let svc = hyper::service::service_fn(move |req| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(route(&admin, req, limits.request_timeout).await) }
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

/// The router: one arm per path.
async fn route(
    admin: &Admin,
    req: Request<Incoming>,
    request_timeout: Duration,
) -> Response<Full<Bytes>> {
    // Nothing here reads a request body; dropping it now tells hyper so
    // (it closes the connection instead of reading a body nobody wants).
    let (parts, _body) = req.into_parts();
    match parts.uri.path() {
        "/metrics" => match parts.method {
            Method::GET | Method::HEAD => metrics_page(admin, request_timeout).await,
            _ => method_not_allowed("GET, HEAD"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
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
        Arc::new(Admin {
            exporter: Arc::new(Exporter::unattached()),
        })
    }

    /// A client that sends a request and never reads the answer: the
    /// answer fills the pipe, no byte moves, and the idle bound closes the
    /// connection (the header timeout, a minute here, would not).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_its_answer_is_closed_when_idle() {
        let (mut client, server) = tokio::io::duplex(64);
        let t0 = Instant::now();
        let conn = tokio::spawn(serve_connection(server, admin(), limits()));
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
        let conn = tokio::spawn(serve_connection(server, admin(), limits()));
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
}
