//! The redis mode's upstream side, and the channels both sides name.
//!
//! `--redis HOST:PORT` runs `idle`, `broadcast` or `unicast` against a redis
//! server instead of a gateway, with the same fleet, pacing and reports, so
//! the two compare in one sitting. Devices subscribe (see the fleet's redis
//! devices); the upstream side publishes through [`Publisher`]s, which play
//! the part of the gateway's upstream clients: a request is encoded by its
//! caller, a writer task sends what is queued and flushes, a reader task
//! hands each reply to its caller, and a caller waits at most
//! [`REPLY_TIMEOUT`]. Redis answers in order, so replies are matched to
//! requests first in, first out rather than by request id.
//!
//! Hand-written RESP2 ([`crate::resp`]), no redis crate: the client side
//! does the least work per message either way.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::resp::{self, Frame};

/// How long a PUBLISH waits for its reply: as long as the gateway's
/// upstream client waits for a push's.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands queued for the writer task, as in the gateway's upstream client.
const WRITE_QUEUE: usize = 1024;
/// Bytes a reply may take at most (PUBLISH answers with an integer).
const MAX_REPLY: usize = 64 * 1024;

/// The channels a device of `user` subscribes to: `u:<user>` when
/// `user_channel`, and `r:<room>` with a room.
pub fn channels(user: &str, user_channel: bool, room: Option<&str>) -> Vec<String> {
    let mut c = Vec::with_capacity(2);
    if user_channel {
        c.push(user_channel_of(user));
    }
    if let Some(room) = room {
        c.push(room_channel(room));
    }
    c
}

/// The channel a user's messages go to.
pub fn user_channel_of(user: &str) -> String {
    format!("u:{user}")
}

/// The channel a room's messages go to.
pub fn room_channel(room: &str) -> String {
    format!("r:{room}")
}

/// One PUBLISH.
pub struct Publish {
    pub channel: String,
    pub payload: Vec<u8>,
}

/// A reply on its way to the caller that waits for it.
type Reply = oneshot::Sender<Result<u64, String>>;
/// Callers waiting for their reply, in the order their commands were
/// written; `None` once the connection is over.
type Pending = Arc<Mutex<Option<VecDeque<Reply>>>>;

/// A connection that publishes, pipelined. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<(Vec<u8>, Reply)>,
}

impl Publisher {
    /// Connects to the redis server at `addr`.
    ///
    /// # Errors
    /// When the connection cannot be made.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to redis at {addr}"))?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let pending: Pending = Arc::new(Mutex::new(Some(VecDeque::new())));
        tokio::spawn(write_commands(rx, w, pending.clone()));
        tokio::spawn(read_replies(r, pending));
        Ok(Self { tx })
    }

    /// Publishes `p`; the number of subscribers that got it.
    ///
    /// # Errors
    /// The server's error reply, a closed connection, or no reply within
    /// [`REPLY_TIMEOUT`].
    ///
    /// # Cancel safety
    /// Cancel safe: a reply that comes after its caller left is dropped.
    pub async fn publish(&self, p: Publish) -> Result<u64, String> {
        let mut cmd = Vec::with_capacity(p.channel.len() + p.payload.len() + 48);
        resp::command(&mut cmd, &[b"PUBLISH", p.channel.as_bytes(), &p.payload]);
        let (reply, rx) = oneshot::channel();
        let closed = || "the connection to redis closed".to_owned();
        let exchange = async {
            self.tx.send((cmd, reply)).await.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
        };
        tokio::time::timeout(REPLY_TIMEOUT, exchange)
            .await
            .map_err(|_| "PUBLISH timed out".to_owned())?
    }
}

/// `n` publishers (at least one) to `addr`.
///
/// # Errors
/// When a connection cannot be made.
pub async fn publishers(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Publisher>> {
    let mut all = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        all.push(Publisher::connect(addr).await?);
    }
    Ok(all)
}

/// The writer task: queues each caller for its reply, then writes its
/// command; writes what else is queued, then flushes once.
async fn write_commands(
    mut rx: mpsc::Receiver<(Vec<u8>, Reply)>,
    w: OwnedWriteHalf,
    pending: Pending,
) {
    let mut w = BufWriter::new(w);
    let queue = |reply: Reply| -> bool {
        // std Mutex: held for a push, never across an await.
        match pending.lock().ok().as_mut().and_then(|p| p.as_mut()) {
            Some(q) => {
                q.push_back(reply);
                true
            }
            None => false,
        }
    };
    while let Some((cmd, reply)) = rx.recv().await {
        // Queued before it is written: its reply cannot come first.
        if !queue(reply) || w.write_all(&cmd).await.is_err() {
            return;
        }
        while let Ok((cmd, reply)) = rx.try_recv() {
            if !queue(reply) || w.write_all(&cmd).await.is_err() {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

/// The reader task: hands each reply to the caller first in line. When the
/// connection ends, every caller still waiting gets the reason.
async fn read_replies(mut r: OwnedReadHalf, pending: Pending) {
    let mut buf = BytesMut::with_capacity(MAX_REPLY);
    let why = 'conn: loop {
        let mut pos = 0;
        loop {
            let (f, n) = match resp::parse(&buf[pos..], MAX_REPLY) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => break 'conn e.to_string(),
            };
            pos += n;
            let reply = match f {
                Frame::Int(k) => u64::try_from(k).map_err(|_| format!("PUBLISH replied {k}")),
                Frame::Error(e) => Err(String::from_utf8_lossy(e).into_owned()),
                other => Err(format!("unexpected reply to PUBLISH: {other:?}")),
            };
            let next = pending
                .lock()
                .ok()
                .and_then(|mut p| p.as_mut().and_then(VecDeque::pop_front));
            match next {
                // A caller that gave up dropped its receiver.
                Some(tx) => drop(tx.send(reply)),
                None => break 'conn "a reply to no request".to_owned(),
            }
        }
        buf.advance(pos);
        buf.reserve(MAX_REPLY);
        match r.read_buf(&mut buf).await {
            Ok(0) => break "closed by the server".to_owned(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    let waiting = pending.lock().ok().and_then(|mut p| p.take());
    for tx in waiting.into_iter().flatten() {
        let _ = tx.send(Err(why.clone()));
    }
}
