//! Devices over QUIC: shared client endpoints, and a byte stream that merges
//! the gateway's two streams into one.
//!
//! Over QUIC a device opens one bidirectional stream and writes the same
//! length-prefixed frames as over TCP; the gateway answers on it (control
//! frames, interactive pushes) and opens one unidirectional stream for the
//! bulk lane (docs/PROTOCOL.md, section 20). The fleet parses frames from a
//! single byte stream, so [`QuicIo`] hands it both streams' frames, merged
//! whole frame by whole frame: a frame is passed on only once all of its
//! bytes arrived, so the frames of one stream never split those of the other.
//!
//! A quinn endpoint (one UDP socket, one driver task) can carry many
//! connections, and its state is far larger than a connection's: the fleet
//! shares one endpoint among many devices ([`Endpoints`]), which is also
//! what makes a migration storm cheap to cause: rebinding one endpoint moves
//! every connection on it to a new local address at once.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Devices one endpoint carries by default.
pub const PER_ENDPOINT: usize = 256;

/// Bytes read from one stream at a time: small, because a device holds one
/// such buffer per stream for as long as a frame is incomplete (and none
/// once it is whole).
const READ_CHUNK: usize = 8192;

/// The fleet's QUIC client endpoints; device `k` of the fleet uses endpoint
/// `k % len`.
pub struct Endpoints {
    eps: Vec<Ep>,
    server_name: String,
    /// With 0-RTT: the TLS settings each device's own configuration starts
    /// from, and those configurations by device (each remembers the
    /// session tickets its device received, as a phone's QUIC stack does).
    zero_rtt: Option<ZeroRtt>,
}

struct ZeroRtt {
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    devices: Mutex<std::collections::HashMap<usize, quinn::ClientConfig>>,
    /// Connections that tried 0-RTT and had it accepted, refused; and
    /// connections that could not try (no ticket yet).
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    no_ticket: AtomicU64,
}

/// How the fleet's connections went with 0-RTT (`--zero-rtt`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRttCounts {
    pub accepted: u64,
    pub refused: u64,
    pub no_ticket: u64,
}

struct Ep {
    endpoint: quinn::Endpoint,
    /// The address each socket of this endpoint binds (port 0: a new port
    /// every time).
    bind: SocketAddr,
}

impl Endpoints {
    /// `count` endpoints (at least one) trusting only `ca`; endpoint `k`
    /// binds `sources[(first + k) % len]`, or the unspecified address of
    /// the gateway's family without sources.
    ///
    /// # Errors
    /// The CA cannot be read, or a socket cannot be bound.
    pub fn new(
        ca: &Path,
        server_name: &str,
        count: usize,
        sources: &[IpAddr],
        first: usize,
        v6: bool,
        zero_rtt: bool,
    ) -> Result<Self, String> {
        let tls = tether::tls::client_config_pinned(ca).map_err(|e| e.to_string())?;
        let cfg = tether::quic::client_config(&tether::config::Config::default(), tls.clone())
            .map_err(|e| e.to_string())?;
        let mut eps = Vec::new();
        for k in 0..count.max(1) {
            let ip = match sources.len() {
                0 if v6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                0 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                n => sources[(first + k) % n],
            };
            let bind = SocketAddr::new(ip, 0);
            let mut endpoint = udp_socket(bind)
                .and_then(|s| {
                    quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        None,
                        s,
                        Arc::new(quinn::TokioRuntime),
                    )
                })
                .map_err(|e| format!("QUIC bind {bind}: {e}"))?;
            endpoint.set_default_client_config(cfg.clone());
            eps.push(Ep { endpoint, bind });
        }
        Ok(Self {
            eps,
            server_name: server_name.to_owned(),
            zero_rtt: zero_rtt.then(|| ZeroRtt {
                tls,
                devices: Mutex::default(),
                accepted: Arc::default(),
                refused: Arc::default(),
                no_ticket: AtomicU64::new(0),
            }),
        })
    }

    /// With `--zero-rtt`: how the connections so far went.
    pub fn zero_rtt_counts(&self) -> ZeroRttCounts {
        self.zero_rtt
            .as_ref()
            .map_or(ZeroRttCounts::default(), |z| ZeroRttCounts {
                accepted: z.accepted.load(Relaxed),
                refused: z.refused.load(Relaxed),
                no_ticket: z.no_ticket.load(Relaxed),
            })
    }

    /// Device `k`'s own client configuration: a session store of its own
    /// (a few tickets), so that a device resumes with a ticket it received.
    fn device_config(z: &ZeroRtt, k: usize) -> io::Result<quinn::ClientConfig> {
        let mut devices = z.devices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = devices.get(&k) {
            return Ok(c.clone());
        }
        let mut tls = (*z.tls).clone();
        tls.resumption = tokio_rustls::rustls::client::Resumption::in_memory_sessions(4);
        let c = tether::quic::client_config(&tether::config::Config::default(), Arc::new(tls))
            .map_err(io::Error::other)?;
        devices.insert(k, c.clone());
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.eps.len()
    }

    /// Connects device `k` of the fleet to `addr`: the handshake, then the
    /// device's stream (opened here, it reaches the gateway with the first
    /// bytes written on it: the Login).
    ///
    /// # Errors
    /// Handshake failures, or no handshake within 10 s.
    pub async fn connect(&self, k: usize, addr: SocketAddr) -> io::Result<QuicIo> {
        let ep = &self.eps[k % self.eps.len()].endpoint;
        let connecting = match &self.zero_rtt {
            None => ep.connect(addr, &self.server_name),
            Some(z) => ep.connect_with(Self::device_config(z, k)?, addr, &self.server_name),
        }
        .map_err(io::Error::other)?;
        // Without --zero-rtt a device never sends early data: it waits for
        // the handshake (a resumed one when it holds a ticket).
        let early = match &self.zero_rtt {
            None => Err(connecting),
            Some(z) => connecting.into_0rtt().inspect_err(|_| {
                z.no_ticket.fetch_add(1, Relaxed);
            }),
        };
        let conn = match early {
            Ok((conn, accepted)) => {
                // The stream, and the login written on it, go out in 0-RTT
                // data; whether the gateway took them shows later.
                if let Some(z) = &self.zero_rtt {
                    let (yes, no) = (z.accepted.clone(), z.refused.clone());
                    tokio::spawn(async move {
                        let n = if accepted.await { yes } else { no };
                        n.fetch_add(1, Relaxed);
                    });
                }
                conn
            }
            Err(connecting) => tokio::time::timeout(Duration::from_secs(10), connecting)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "QUIC handshake timed out"))?
                .map_err(io::Error::other)?,
        };
        let (send, recv) = conn.open_bi().await.map_err(io::Error::other)?;
        Ok(QuicIo::new(conn, send, recv))
    }

    /// Moves endpoint `k` to a new UDP socket on the same address (a new
    /// port): every connection on it migrates, none reconnects.
    ///
    /// # Errors
    /// The new socket cannot be bound.
    pub fn rebind(&self, k: usize) -> io::Result<()> {
        let ep = &self.eps[k % self.eps.len()];
        ep.endpoint.rebind(udp_socket(ep.bind)?)
    }
}

/// Bytes of datagrams a client socket buffers (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket for an endpoint, with large buffers: the socket carries
/// hundreds of connections, and with the system's default (about 200 KB) a
/// burst of pushes to all of them overflows it while the worker's one
/// thread is busy; every datagram lost then costs a QUIC loss recovery.
fn udp_socket(bind: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    if bind.is_ipv6() {
        // Dual stack, as quinn's own client endpoints are.
        let _ = s.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked still works.
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    s.bind(&bind.into())?;
    Ok(s.into())
}

/// Endpoints a fleet part of `count` devices gets when the whole run of
/// `total` devices has `endpoints` (0: one per [`PER_ENDPOINT`] devices).
pub fn share(endpoints: usize, count: usize, total: usize) -> usize {
    if endpoints == 0 {
        return count.div_ceil(PER_ENDPOINT).max(1);
    }
    (endpoints * count)
        .div_ceil(total.max(1))
        .clamp(1, count.max(1))
}

/// One stream of the gateway's, and the bytes of a frame not yet whole.
struct Source {
    stream: quinn::RecvStream,
    partial: BytesMut,
    /// The gateway finished the stream.
    done: bool,
}

impl Source {
    fn new(stream: quinn::RecvStream) -> Self {
        Self {
            stream,
            partial: BytesMut::new(),
            done: false,
        }
    }

    /// Reads what the stream has and moves every whole frame to `out`.
    /// `Ready(Ok)` when something happened (bytes, or the stream's end).
    fn poll_fill(&mut self, cx: &mut Context<'_>, out: &mut BytesMut) -> Poll<io::Result<()>> {
        self.partial.reserve(READ_CHUNK);
        let n = match tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.partial,
        ) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r?,
        };
        if n == 0 {
            // A frame cut short by the stream's end is dropped, as the rest
            // of a TCP stream after its FIN would be.
            self.done = true;
            return Poll::Ready(Ok(()));
        }
        let whole = whole_frames(&self.partial)?;
        out.extend_from_slice(&self.partial[..whole]);
        self.partial.advance(whole);
        if self.partial.is_empty() {
            // Most reads end on a frame boundary: an idle device then holds
            // no buffer (an allocation per read is cheap next to QUIC's
            // decryption of the same bytes).
            self.partial = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// The length of the whole frames at the start of `b`.
fn whole_frames(b: &[u8]) -> io::Result<usize> {
    let mut pos = 0;
    loop {
        match tether::wire::frame_len(&b[pos..], MAX_FRAME) {
            Ok(Some(total)) if b.len() - pos >= total => pos += total,
            Ok(_) => return Ok(pos),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        }
    }
}

const MAX_FRAME: usize = 16 << 20;

/// The bulk stream: until its first push the gateway has opened it only on
/// its side, so the device waits to accept it.
enum Bulk {
    Waiting(Pin<Box<dyn Future<Output = Option<quinn::RecvStream>> + Send>>),
    Open(Source),
    Done,
}

/// A device's QUIC connection as one byte stream: writes go to the device's
/// bidirectional stream, reads return the frames of both of the gateway's
/// streams, each frame whole.
pub struct QuicIo {
    conn: quinn::Connection,
    send: quinn::SendStream,
    control: Source,
    bulk: Bulk,
    /// Whole frames not yet read by the device.
    ready: BytesMut,
    /// After a shutdown: the gateway closing the connection.
    closed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl QuicIo {
    fn new(conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let c = conn.clone();
        Self {
            bulk: Bulk::Waiting(Box::pin(async move { c.accept_uni().await.ok() })),
            conn,
            send,
            control: Source::new(recv),
            ready: BytesMut::new(),
            closed: None,
        }
    }

    /// Ends the connection as a device that lost its network would: no
    /// Close frame, no stream finished. quinn still sends a
    /// CONNECTION_CLOSE (a silent device would leave the gateway to its
    /// idle timeout), so the gateway notices at once, as it notices the RST
    /// the TCP devices send; the session stays resumable either way.
    pub fn abort(&self) {
        self.conn.close(0u32.into(), b"gone");
    }

    /// Reads from both streams until some whole frames are ready or the
    /// connection ended; `Ready(Ok)` with nothing ready is the end.
    fn poll_frames(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.ready.is_empty() {
            let mut moved = false;
            if !self.control.done {
                if let Poll::Ready(r) = self.control.poll_fill(cx, &mut self.ready) {
                    r?;
                    moved = true;
                }
            }
            match &mut self.bulk {
                Bulk::Waiting(accept) => {
                    if let Poll::Ready(s) = accept.as_mut().poll(cx) {
                        // None: the connection ended before a bulk push.
                        self.bulk = s.map_or(Bulk::Done, |s| Bulk::Open(Source::new(s)));
                        moved = true;
                    }
                }
                Bulk::Open(s) if s.done => {
                    self.bulk = Bulk::Done;
                    moved = true;
                }
                Bulk::Open(s) => {
                    if let Poll::Ready(r) = s.poll_fill(cx, &mut self.ready) {
                        r?;
                        moved = true;
                    }
                }
                Bulk::Done => {}
            }
            // The end is when the control stream ended and the bulk stream
            // did (or never came): every frame of both was handed out.
            if self.control.done && matches!(self.bulk, Bulk::Done) {
                return Poll::Ready(Ok(()));
            }
            if !moved {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for QuicIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ready.is_empty() {
            match this.poll_frames(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        let n = this.ready.len().min(buf.remaining());
        buf.put_slice(&this.ready[..n]);
        this.ready.advance(n);
        if this.ready.is_empty() {
            this.ready = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for QuicIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    /// Finishes the device's stream, then waits for the gateway to close
    /// the connection (it does once the session ended). Dropping the last
    /// handle of a quinn connection closes it at once and throws away what
    /// was not sent yet, such as a Close frame just written.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed.is_none() {
            // Already finished or reset: nothing more to send either way.
            let _ = this.send.finish();
            let c = this.conn.clone();
            this.closed = Some(Box::pin(async move {
                c.closed().await;
            }));
        }
        match this.closed.as_mut() {
            Some(f) => f.as_mut().poll(cx).map(Ok),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_stops_before_a_partial_frame() {
        let one = [0u8, 0, 0, 2, 7, 7];
        let mut b = one.to_vec();
        b.extend_from_slice(&one);
        assert_eq!(whole_frames(&b).expect("ok"), 12);
        b.extend_from_slice(&[0, 0, 0, 3, 1]);
        assert_eq!(whole_frames(&b).expect("ok"), 12, "the third is not whole");
        assert_eq!(whole_frames(&[0, 0]).expect("ok"), 0);
        assert!(
            whole_frames(&[0xff, 0xff, 0xff, 0xff]).is_err(),
            "too large"
        );
    }

    #[test]
    fn endpoints_are_shared_by_devices() {
        assert_eq!(share(0, 1000, 1000), 4, "one per 256 devices");
        assert_eq!(share(0, 10, 10), 1);
        assert_eq!(
            share(8, 500, 1000),
            4,
            "half the devices, half the endpoints"
        );
        assert_eq!(share(8, 1, 1000), 1, "at least one");
        assert_eq!(share(50, 3, 3), 3, "never more than devices");
    }
}
