//! The connection driver: one small task per connection.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::ReadBuf;

use crate::gateway::{Gateway, GatewayEnv};
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::session::{Session, SessionHandle};
use crate::timer::Scheduled;
use crate::wire::pb::Lane;
use crate::wire::{encode_push_header, frame_len, pb, Code, FrameError, SharedPush, LEN_PREFIX};

use super::Transport;

/// Bytes read per poll before yielding to other connections.
const READ_BUDGET: usize = 64 * 1024;
/// Bytes read per read call (a stack buffer; nothing is kept while idle).
const READ_CHUNK: usize = 8 * 1024;
/// Frames coalesced into one batch of writes.
const BATCH_FRAMES: usize = 256;
/// Bytes coalesced into one batch of writes (soft limit).
const BATCH_BYTES: usize = 256 * 1024;
/// Batches written per poll before yielding.
const WRITE_BUDGET: usize = 8;
/// Slices per writev call.
const IOV: usize = 64;
/// Bytes discarded while lingering on close, before giving up on EOF.
const LINGER_BYTES: usize = 256 * 1024;

/// Releases per-connection accounting (gauges, per-IP count) when dropped.
/// Held while a connection has no [`Connection`] yet (TLS handshake); the
/// connection then takes the duty over, to stay small.
pub struct ConnGuard {
    gw: Arc<Gateway>,
    ip: Option<std::net::IpAddr>,
    kind: TransportKind,
    armed: bool,
}

impl ConnGuard {
    /// Accounts for a new connection; `None` when a connection cap refuses it.
    pub fn acquire(
        gw: &Arc<Gateway>,
        remote: SocketAddr,
        kind: TransportKind,
    ) -> Result<Self, Code> {
        let ip = gw.limits().acquire_conn(remote.ip())?;
        metrics::gauge!(m::CONNECTIONS, "transport" => kind.as_str()).increment(1.0);
        metrics::counter!(m::CONNECTIONS_ACCEPTED, "transport" => kind.as_str()).increment(1);
        Ok(Self {
            gw: gw.clone(),
            ip,
            kind,
            armed: true,
        })
    }

    /// Hands the release duty to the caller; returns the IP whose per-IP
    /// count was taken, boxed (per-IP accounting is off by default, and then
    /// a connection pays 8 bytes for it).
    fn disarm(mut self) -> Option<Box<std::net::IpAddr>> {
        self.armed = false;
        self.ip.map(Box::new)
    }
}

fn release(gw: &Gateway, ip: Option<std::net::IpAddr>, kind: TransportKind) {
    gw.limits().release_conn(ip);
    metrics::gauge!(m::CONNECTIONS, "transport" => kind.as_str()).decrement(1.0);
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.armed {
            release(&self.gw, self.ip, self.kind);
        }
    }
}

/// Small state flags of a connection, packed into bits (the connection's
/// future must stay within 152 bytes; see the `sizes` test).
#[derive(Default, Clone, Copy)]
struct Flags(u16);

impl Flags {
    const FLUSH_ON_CLOSE: u16 = 1;
    const CLOSE_WRITTEN: u16 = 1 << 1;
    const SHUTDOWN_DONE: u16 = 1 << 2;
    const READ_CLOSED: u16 = 1 << 3;
    const FINISHED: u16 = 1 << 4;
    /// Registered in the timer wheel (at `Connection::timer`).
    const TIMER_SET: u16 = 1 << 5;
    /// Another connection resumed this session: hands off the shared state.
    /// `Connection::handle` is then a private handle that only carries this
    /// task's wake-ups (the wheel wakes a handle's registered waker, which
    /// the session's handle now keeps for the new connection).
    const SUPERSEDED: u16 = 1 << 6;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u16, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }
}

/// Frames waiting to be written, coalesced.
struct WriteBatch {
    chunks: Vec<Bytes>,
    idx: usize,
    frames: u64,
    /// Since when the socket has taken no byte of this batch (set when a
    /// write is refused, cleared by any progress): the stall rule's clock.
    /// Kept here, not in the connection, because it only exists while a
    /// write is pending.
    stalled_at: Option<Instant>,
}

impl WriteBatch {
    fn is_done(&self) -> bool {
        self.idx >= self.chunks.len()
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 && self.idx < self.chunks.len() {
            let c = &mut self.chunks[self.idx];
            if n >= c.len() {
                n -= c.len();
                self.idx += 1;
            } else {
                c.advance(n);
                n = 0;
            }
        }
    }
}

/// Pushes with a body at most this long are copied into the batch's flat
/// buffer; longer bodies go out as their own shared slice (`writev`). Copying
/// 64 bytes costs less than a slice of its own (measured in the codec bench:
/// about 8 ns a frame flat against 40 ns as separate slices).
const COPY_MAX: usize = 512;

/// Builds a batch of frames for one `writev`: small frames are copied into a
/// flat buffer, large push bodies are shared slices. Streams that encrypt
/// (TLS) get everything flat, since each slice would cost a TLS record.
struct BatchBuilder {
    vectored: bool,
    chunks: Vec<Bytes>,
    flat: BytesMut,
    frames: u64,
    bytes: usize,
}

impl BatchBuilder {
    fn new(vectored: bool) -> Self {
        Self {
            vectored,
            chunks: Vec::new(),
            flat: BytesMut::new(),
            frames: 0,
            bytes: 0,
        }
    }

    fn full(&self) -> bool {
        self.frames as usize >= BATCH_FRAMES || self.bytes >= BATCH_BYTES
    }

    /// Ends the flat run so far as one slice.
    fn cut(&mut self) {
        if !self.flat.is_empty() {
            self.chunks.push(self.flat.split().freeze());
        }
    }

    fn frame(&mut self, b: Bytes) {
        self.frames += 1;
        self.bytes += b.len();
        if self.vectored && b.len() > COPY_MAX {
            self.cut();
            self.chunks.push(b);
        } else {
            self.flat.extend_from_slice(&b);
        }
    }

    fn push(&mut self, seq: u64, p: &SharedPush) {
        self.frames += 1;
        self.bytes += p.wire_len();
        // Amortized: the flat buffer grows by doubling.
        self.flat
            .reserve(crate::wire::PUSH_HEADER_MAX + p.body.len().min(COPY_MAX));
        encode_push_header(seq, p.body.len(), &mut self.flat);
        if self.vectored && p.body.len() > COPY_MAX {
            self.cut();
            self.chunks.push(p.body.clone());
        } else {
            self.flat.extend_from_slice(&p.body);
        }
    }

    fn finish(mut self) -> Option<WriteBatch> {
        if self.frames == 0 {
            return None;
        }
        self.cut();
        Some(WriteBatch {
            chunks: self.chunks,
            idx: 0,
            frames: self.frames,
            stalled_at: None,
        })
    }
}

/// Drives one session over `IO` until it closes. Spawn it.
#[must_use = "a Connection does nothing unless spawned or awaited"]
pub struct Connection<IO: Transport> {
    io: IO,
    session: Session,
    handle: SessionHandle,
    gw: Arc<Gateway>,
    kind: TransportKind,
    /// Set when per-IP accounting counted this connection.
    ip: Option<Box<std::net::IpAddr>>,
    /// A partial frame, only while one is in flight (boxed: idle costs 8 bytes).
    rbuf: Option<Box<BytesMut>>,
    /// A batch, only while the socket refuses to take it all.
    wbatch: Option<Box<WriteBatch>>,
    /// Low 32 bits of the wheel tick this connection is registered to wake
    /// at, when `f.timer_set`.
    timer: u32,
    /// KiB discarded while lingering on close (u16 keeps the future small).
    lingered_kib: u16,
    /// Generation of this connection's hold on the session (see SessionHandle).
    gen: u32,
    registered: bool,
    f: Flags,
}

/// Whether tick `a` comes after tick `b` (both the low 32 bits of ticks less
/// than 2^31 apart).
fn tick_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl<IO: Transport> Connection<IO> {
    pub fn new(gw: Arc<Gateway>, io: IO, kind: TransportKind, guard: ConnGuard) -> Self {
        let now = gw.now();
        let handle = SessionHandle::new(gw.next_session_id());
        gw.connection_opened(&handle);
        Self {
            io,
            session: Session::new(now, gw.params().clone()),
            handle,
            gw,
            kind,
            ip: guard.disarm(),
            rbuf: None,
            wbatch: None,
            timer: 0,
            lingered_kib: 0,
            gen: 0,
            registered: false,
            f: Flags(Flags::FLUSH_ON_CLOSE),
        }
    }

    /// The session handle (tests and the in-memory transport use it).
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// Feeds bytes from the socket into the session.
    fn feed(&mut self, now: Instant, mut data: &[u8]) {
        let max = self.gw.params().max_frame;
        if let Some(mut buf) = self.rbuf.take() {
            buf.extend_from_slice(data);
            return self.feed_owned(now, buf);
        }
        while !data.is_empty() && !self.session.is_closing() {
            match frame_len(data, max) {
                Err(e) => return self.frame_error(now, e),
                Ok(Some(total)) if data.len() >= total => {
                    let (frame, rest) = data.split_at(total);
                    self.on_frame(now, &frame[LEN_PREFIX..]);
                    data = rest;
                }
                Ok(Some(total)) => {
                    // The prefix was checked against the maximum above.
                    let mut buf = BytesMut::with_capacity(total);
                    buf.extend_from_slice(data);
                    self.rbuf = Some(Box::new(buf));
                    return;
                }
                Ok(None) => {
                    let mut buf = BytesMut::with_capacity(LEN_PREFIX);
                    buf.extend_from_slice(data);
                    self.rbuf = Some(Box::new(buf));
                    return;
                }
            }
        }
    }

    fn feed_owned(&mut self, now: Instant, mut buf: Box<BytesMut>) {
        let max = self.gw.params().max_frame;
        while !self.session.is_closing() {
            match crate::wire::decode_frame(&mut buf, max) {
                Err(e) => return self.frame_error(now, e),
                Ok(Some(frame)) => self.on_frame(now, &frame),
                Ok(None) => break,
            }
        }
        if !buf.is_empty() && !self.session.is_closing() {
            self.rbuf = Some(buf);
        }
    }

    fn on_frame(&mut self, now: Instant, body: &[u8]) {
        metrics::counter!(m::FRAMES_IN, "transport" => self.kind.as_str()).increment(1);
        let mut env = GatewayEnv {
            gw: &self.gw,
            handle: &mut self.handle,
            gen: &mut self.gen,
            kind: self.kind,
            io: &self.io,
            registered: &mut self.registered,
        };
        self.session.handle_frame(now, body, &mut env);
    }

    fn frame_error(&mut self, now: Instant, e: FrameError) {
        tracing::debug!(remote = ?self.io.peer_addr(), error = %e, "closing on frame error");
        self.rbuf = None;
        self.session.handle_frame_error(now, e);
    }

    /// Reads and feeds input. Returns true when the read budget ran out with
    /// data possibly left (the task must be polled again).
    fn poll_input(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut budget = READ_BUDGET;
        let mut stack = [0u8; READ_CHUNK];
        loop {
            let lingering = self.session.is_closing();
            if self.f.has(Flags::READ_CLOSED) || (!lingering && !self.session.wants_input()) {
                return false;
            }
            if lingering && self.lingered_done() {
                return false;
            }
            if budget == 0 {
                return true;
            }
            let mut rb = ReadBuf::new(&mut stack);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return false,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(remote = ?self.io.peer_addr(), error = %e, "read failed");
                    self.f.set(Flags::READ_CLOSED, true);
                    self.session.handle_peer_gone(Code::ConnectionLost);
                    return false;
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.f.set(Flags::READ_CLOSED, true);
                        if !lingering {
                            self.session.handle_peer_gone(Code::ConnectionLost);
                        }
                        return false;
                    }
                    budget = budget.saturating_sub(n);
                    metrics::counter!(m::BYTES_IN).increment(n as u64);
                    if lingering {
                        self.lingered_kib =
                            self.lingered_kib.saturating_add(n.div_ceil(1024) as u16);
                    } else {
                        self.feed(now, &stack[..n]);
                    }
                }
            }
        }
    }

    fn next_batch(&mut self) -> Option<Box<WriteBatch>> {
        let mut b = BatchBuilder::new(self.io_vectored());
        while !b.full() {
            match self.session.poll_transmit() {
                Some(f) => b.frame(f),
                None => break,
            }
        }
        let pushes_flow = self.registered
            && !self.f.has(Flags::SUPERSEDED)
            && (self.session.is_active()
                || (self.session.is_closing() && self.f.has(Flags::FLUSH_ON_CLOSE)));
        let mut remaining = 0;
        if pushes_flow && !b.full() && !self.f.has(Flags::CLOSE_WRITTEN) {
            let now = self.gw.now();
            let mut items: Vec<(Lane, u64, SharedPush)> = Vec::new();
            remaining = self.handle.poll_send(
                self.gen,
                now,
                BATCH_FRAMES - b.frames as usize,
                self.gw.delivery(),
                &mut items,
            );
            if !items.is_empty() {
                metrics::histogram!(m::QUEUE_DEPTH).record((items.len() + remaining) as f64);
            }
            for (_, seq, p) in &items {
                b.push(*seq, p);
            }
        }
        if self.session.is_closing()
            && remaining == 0
            && !b.full()
            && !self.f.has(Flags::CLOSE_WRITTEN)
        {
            if let Some(cf) = self.session.poll_close_frame() {
                b.frame(cf);
                self.f.set(Flags::CLOSE_WRITTEN, true);
            }
        }
        b.finish().map(Box::new)
    }

    fn lingered_done(&self) -> bool {
        usize::from(self.lingered_kib) * 1024 >= LINGER_BYTES
    }

    fn io_vectored(&self) -> bool {
        self.kind != TransportKind::Tls && self.io.is_write_vectored()
    }

    /// Writes everything that is ready. `Ready(Ok(true))` when all is written,
    /// `Ready(Ok(false))` when the budget ran out.
    fn poll_output(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<io::Result<bool>> {
        for _ in 0..WRITE_BUDGET {
            if self.wbatch.is_none() {
                self.wbatch = self.next_batch();
            }
            let Some(batch) = self.wbatch.as_mut() else {
                return Poll::Ready(Ok(true));
            };
            while !batch.is_done() {
                let res = if batch.chunks.len() - batch.idx == 1 {
                    Pin::new(&mut self.io).poll_write(cx, &batch.chunks[batch.idx])
                } else {
                    let mut iov = [IoSlice::new(&[]); IOV];
                    let mut k = 0;
                    for c in batch.chunks[batch.idx..].iter().take(IOV) {
                        iov[k] = IoSlice::new(c);
                        k += 1;
                    }
                    Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..k])
                };
                let n = match res {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        batch.stalled_at.get_or_insert(now);
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                batch.stalled_at = None;
                metrics::counter!(m::WRITES).increment(1);
                self.gw.count_write();
                metrics::counter!(m::BYTES_OUT).increment(n as u64);
                batch.advance(n);
            }
            metrics::counter!(m::FRAMES_OUT, "transport" => self.kind.as_str())
                .increment(batch.frames);
            self.wbatch = None;
        }
        Poll::Ready(Ok(false))
    }

    /// The deadline this connection must be woken at: the session's own
    /// (login, idle, linger), the stall rule's while a write is refused, and
    /// the retransmission deadline only while a poll can act on it (a batch
    /// can be started and pushes flow). A deadline the next poll cannot move
    /// forward would make the wheel answer "due" forever: the task would wake
    /// itself in a loop. A refused write is woken by the socket instead, and
    /// a closing session is bounded by its linger.
    fn next_wakeup(&self) -> Option<Instant> {
        let closing = self.session.is_closing();
        let stall = match &self.wbatch {
            Some(b) if !closing => b.stalled_at.map(|at| at + self.gw.delivery().stall_timeout),
            _ => None,
        };
        let retry = if self.wbatch.is_none()
            && self.session.is_active()
            && self.registered
            && !self.f.has(Flags::SUPERSEDED)
        {
            self.handle.next_deadline(self.gw.delivery())
        } else {
            None
        };
        [self.session.poll_timeout(), stall, retry]
            .into_iter()
            .flatten()
            .min()
    }

    fn arm_timer(&mut self, cx: &mut Context<'_>) {
        // Ticks are kept as the low 32 bits and compared with wrapping
        // arithmetic: registrations lie within the wheel's horizon (a few
        // thousand ticks) of its cursor, so the difference always fits.
        let wheel = self.gw.wheel();
        let cursor = wheel.cursor() as u32;
        if self.f.has(Flags::TIMER_SET) && tick_after(cursor, self.timer) {
            self.f.set(Flags::TIMER_SET, false);
        }
        let Some(deadline) = self.next_wakeup() else {
            return;
        };
        let want = wheel.tick_ceil(deadline) as u32;
        if !self.f.has(Flags::TIMER_SET) || tick_after(self.timer, want) {
            match wheel.schedule(deadline, &self.handle) {
                Scheduled::At(t) => {
                    self.timer = t as u32;
                    self.f.set(Flags::TIMER_SET, true);
                }
                Scheduled::Due => {
                    // The next poll counts as woken by the wheel, so that its
                    // housekeeping (give-ups) runs and moves the deadline.
                    self.f.set(Flags::TIMER_SET, false);
                    cx.waker().wake_by_ref();
                }
            }
        }
    }

    /// Takes this connection's entry out of the wheel, so that an ended
    /// session's allocation is not kept until its slot fires.
    fn disarm_timer(&mut self) {
        if self.f.has(Flags::TIMER_SET) {
            self.f.set(Flags::TIMER_SET, false);
            self.gw.wheel().cancel(self.timer, &self.handle);
        }
    }

    /// The stall rule: a write refused for `delivery.stall_timeout` closes the
    /// connection as a slow consumer (without flushing: nothing more would
    /// get through). A logged-in session keeps its state for a resume.
    fn check_stall(&mut self, now: Instant) {
        let Some(at) = self.wbatch.as_ref().and_then(|b| b.stalled_at) else {
            return;
        };
        if self.session.is_closing() || now < at + self.gw.delivery().stall_timeout {
            return;
        }
        metrics::counter!(m::SLOW_CONSUMERS).increment(1);
        let cmd = crate::session::CloseCmd::new(
            Code::SlowConsumer,
            "the connection accepted no data for too long: the client is not reading",
        );
        if self.registered && !self.f.has(Flags::SUPERSEDED) {
            // Through the handle, so that pushes from now on park as for a
            // detached session; taken below like any close request.
            self.handle.request_close(cmd);
        } else {
            self.f.set(Flags::FLUSH_ON_CLOSE, false);
            self.session.close(now, cmd);
        }
    }

    fn finish(&mut self) {
        if self.f.has(Flags::FINISHED) {
            return;
        }
        self.f.set(Flags::FINISHED, true);
        self.disarm_timer();
        self.gw.connection_settled(&self.handle);
        let code = self.session.close_code().unwrap_or(Code::ConnectionLost);
        metrics::counter!(m::CLOSES, "reason" => code.as_str_name()).increment(1);
        if self.registered && !self.f.has(Flags::SUPERSEDED) {
            self.gw.connection_ended(&self.handle, self.gen, code);
        }
    }

    /// Expired retransmissions: reports for the pushes given up.
    fn give_up_failed(&mut self, now: Instant) {
        if !self.registered || self.f.has(Flags::SUPERSEDED) {
            return;
        }
        let mut failed = Vec::new();
        self.handle.poll_failed(
            self.gen,
            now,
            self.gw.delivery(),
            self.gw.budget(),
            &mut failed,
        );
        if !failed.is_empty() {
            self.gw.report(&self.handle, &failed, Code::DeliveryFailed);
        }
    }
}

impl<IO: Transport> Future for Connection<IO> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let now = this.gw.now();
        let session_before = this.handle.id();
        if !this.handle.register_waker(this.gen, cx.waker()) {
            // Another connection resumed this session: stop touching it. The
            // wheel wakes whatever waker a handle holds, and the session's
            // handle now holds the new connection's: this connection takes a
            // private handle (same id, registered nowhere) for its own
            // wake-ups until its Close is written and it lingers out.
            this.f.set(Flags::SUPERSEDED, true);
            this.f.set(Flags::TIMER_SET, false);
            this.handle = SessionHandle::new(this.handle.id());
            this.gen = 0;
            this.handle.register_waker(0, cx.waker());
            this.session.close(
                now,
                crate::session::CloseCmd::new(
                    Code::Replaced,
                    "the session was resumed on another connection",
                ),
            );
        }

        this.check_stall(now);
        if !this.session.is_closing() {
            if let Some(cmd) = this.handle.take_close(this.gen) {
                this.f
                    .set(Flags::FLUSH_ON_CLOSE, cmd.code != Code::SlowConsumer);
                this.session.close(now, cmd);
            } else if !this.registered && this.gw.is_draining() {
                this.session.close(now, this.gw.drain_close());
            }
        }
        this.session.handle_timeout(now);
        let wheel_fired = !this.f.has(Flags::TIMER_SET)
            || tick_after(this.gw.wheel().cursor() as u32, this.timer);
        if wheel_fired {
            // Woken by the wheel (or never armed): cheap housekeeping.
            this.give_up_failed(now);
            if this.registered {
                this.handle
                    .prune_uplinks(now, this.gw.config().delivery.dedup_window);
            }
        }

        let mut again = this.poll_input(cx, now);
        // Reading stops while replies pile up; no read waker is armed then,
        // so once the replies are written, input must be polled again.
        let input_paused = !this.f.has(Flags::READ_CLOSED)
            && !this.session.is_closing()
            && !this.session.wants_input();

        if !this.session.is_closed() {
            match this.poll_output(cx, now) {
                Poll::Ready(Ok(true)) => {
                    if input_paused && this.session.wants_input() {
                        again = true;
                    }
                    if this.f.has(Flags::CLOSE_WRITTEN) && !this.f.has(Flags::SHUTDOWN_DONE) {
                        match Pin::new(&mut this.io).poll_shutdown(cx) {
                            Poll::Ready(_) => this.f.set(Flags::SHUTDOWN_DONE, true),
                            Poll::Pending => {}
                        }
                    }
                    if this.f.has(Flags::SHUTDOWN_DONE)
                        && (this.f.has(Flags::READ_CLOSED) || this.lingered_done())
                    {
                        this.session.handle_flushed_and_gone();
                    }
                }
                Poll::Ready(Ok(false)) => again = true,
                Poll::Ready(Err(e)) => {
                    tracing::debug!(remote = ?this.io.peer_addr(), error = %e, "write failed");
                    this.session.handle_peer_gone(Code::ConnectionLost);
                }
                Poll::Pending => {}
            }
        }
        // A closing session whose peer hung up while we still had frames: done.
        if this.session.is_closing()
            && this.f.has(Flags::READ_CLOSED)
            && this.wbatch.is_none()
            && this.f.has(Flags::CLOSE_WRITTEN)
        {
            this.session.handle_flushed_and_gone();
        }

        if this.session.is_closed() {
            this.finish();
            return Poll::Ready(());
        }
        if this.handle.id() != session_before {
            // A resume swapped in another session's handle during this poll:
            // pushes and timers must wake this task from now on.
            this.handle.register_waker(this.gen, cx.waker());
            this.f.set(Flags::TIMER_SET, false);
        }
        if again {
            cx.waker().wake_by_ref();
        }
        this.arm_timer(cx);
        Poll::Pending
    }
}

impl<IO: Transport> Drop for Connection<IO> {
    fn drop(&mut self) {
        // Runs on normal completion (already finished) and when the runtime
        // drops the task at shutdown: the registry must not keep a dead session.
        if !self.f.has(Flags::FINISHED) {
            self.f.set(Flags::FINISHED, true);
            self.disarm_timer();
            self.gw.connection_settled(&self.handle);
            if self.registered && !self.f.has(Flags::SUPERSEDED) {
                self.gw
                    .connection_ended(&self.handle, self.gen, Code::ServerDraining);
            }
        }
        release(&self.gw, self.ip.as_deref().copied(), self.kind);
    }
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<Connection<tokio::net::TcpStream>>();
    let _ = pb::Code::Ok;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prints the per-connection sizes that matter for idle memory; run with
    /// `cargo test --lib sizes -- --nocapture`. Asserts a generous ceiling so a
    /// regression that bloats the idle connection is noticed.
    #[test]
    fn tick_comparison_wraps() {
        assert!(tick_after(5, 4));
        assert!(!tick_after(4, 4));
        assert!(!tick_after(4, 5));
        assert!(
            tick_after(2, u32::MAX - 1),
            "past the wrap, 2 follows 2^32-2"
        );
        assert!(!tick_after(u32::MAX - 1, 2));
    }

    #[test]
    fn sizes() {
        let conn = std::mem::size_of::<Connection<tokio::net::TcpStream>>();
        let session = std::mem::size_of::<Session>();
        println!(
            "Connection<TcpStream> = {conn} B, Session = {session} B, TcpStream = {} B, shared handle = {} B",
            std::mem::size_of::<tokio::net::TcpStream>(),
            crate::session::shared_size(),
        );
        // tokio stores a task as a 128-byte-aligned cell of about 104 bytes plus
        // the future: up to 152 bytes of future keeps the cell at 256 bytes
        // (measured: 152 gives 256; the idle_memory test sees any growth).
        assert!(conn <= 152, "Connection<TcpStream> grew to {conn} bytes");
        // 176 + 16 bytes of Arc counts fill the allocator's 192-byte class.
        let shared = crate::session::shared_size();
        assert!(
            shared <= 176,
            "the shared session handle grew to {shared} bytes"
        );
    }

    // -----------------------------------------------------------------
    // The driver's timing paths, deterministic: a scripted byte stream, the
    // connection future polled by hand with a waker that counts, and tokio's
    // paused clock moved by the test (the wheel is advanced by hand too).
    // -----------------------------------------------------------------

    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use parking_lot::Mutex;
    use prost::Message;
    use tokio::io::{AsyncRead, AsyncWrite};

    use crate::config::Config;
    use crate::ids::SessionId;

    /// Both ends of a scripted connection.
    #[derive(Default)]
    struct Pipe {
        /// Bytes the client sent, not yet read by the gateway.
        inbound: VecDeque<u8>,
        read_waker: Option<Waker>,
        /// Bytes the gateway wrote.
        outbound: BytesMut,
        /// Bytes the socket still accepts; 0 refuses writes (a peer that
        /// stopped reading).
        room: usize,
        write_waker: Option<Waker>,
    }

    #[derive(Clone)]
    struct Scripted(Arc<Mutex<Pipe>>);

    impl Scripted {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(Pipe {
                room: usize::MAX,
                ..Default::default()
            })))
        }

        fn send(&self, body: &[u8]) {
            let mut p = self.0.lock();
            p.inbound.extend((body.len() as u32).to_be_bytes());
            p.inbound.extend(body);
            if let Some(w) = p.read_waker.take() {
                w.wake();
            }
        }

        fn set_room(&self, room: usize) {
            let mut p = self.0.lock();
            p.room = room;
            if let Some(w) = p.write_waker.take() {
                w.wake();
            }
        }

        /// The frames the gateway wrote since the last call.
        fn frames(&self) -> Vec<pb::ServerFrame> {
            let mut p = self.0.lock();
            let mut v = Vec::new();
            while let Ok(Some(f)) = crate::wire::decode_frame(&mut p.outbound, 1 << 20) {
                v.push(pb::ServerFrame::decode(f).expect("the gateway writes valid frames"));
            }
            v
        }
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut p = self.0.lock();
            if p.inbound.is_empty() {
                p.read_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            while buf.remaining() > 0 {
                match p.inbound.pop_front() {
                    Some(b) => buf.put_slice(&[b]),
                    None => break,
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut p = self.0.lock();
            if p.room == 0 {
                p.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(p.room);
            p.room -= n;
            p.outbound.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Transport for Scripted {
        fn peer_addr(&self) -> Option<SocketAddr> {
            None
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A connection polled by hand.
    struct Driven {
        conn: Pin<Box<Connection<Scripted>>>,
        io: Scripted,
        wakes: Arc<Wakes>,
        done: bool,
    }

    impl Driven {
        fn new(gw: &Arc<Gateway>) -> Self {
            let io = Scripted::new();
            let remote = SocketAddr::from(([127, 0, 0, 1], 1));
            let guard = ConnGuard::acquire(gw, remote, TransportKind::Memory).expect("no cap");
            Self {
                conn: Box::pin(Connection::new(
                    gw.clone(),
                    io.clone(),
                    TransportKind::Memory,
                    guard,
                )),
                io,
                wakes: Arc::default(),
                done: false,
            }
        }

        /// Polls once; true when the connection woke itself during the poll
        /// (it asks to be polled again at once).
        fn poll(&mut self) -> bool {
            assert!(!self.done, "polled after it finished");
            self.wakes.0.store(0, Ordering::SeqCst);
            let waker = Waker::from(self.wakes.clone());
            let mut cx = Context::from_waker(&waker);
            self.done = self.conn.as_mut().poll(&mut cx).is_ready();
            self.wakes.0.load(Ordering::SeqCst) > 0
        }

        /// Polls while it wakes itself, at most `max` times; returns the count.
        fn settle(&mut self, max: usize) -> usize {
            let mut n = 1;
            while self.poll() && !self.done && n < max {
                n += 1;
            }
            n
        }

        /// Whether something woke the task since the last poll.
        fn woken(&self) -> bool {
            self.wakes.0.load(Ordering::SeqCst) > 0
        }

        fn login(&mut self, gw: &Gateway, resume: Option<pb::Resume>) -> pb::LoginOk {
            let token = crate::auth::mint_hs256(
                crate::config::DEV_SECRET,
                "ann",
                Some("phone"),
                Duration::from_secs(3600),
                vec![],
            )
            .expect("mint");
            let login = pb::ClientFrame {
                request_id: 1,
                body: Some(pb::client_frame::Body::Login(pb::Login {
                    token,
                    device_id: "phone".into(),
                    platform: pb::Platform::Ios as i32,
                    protocol_version: 1,
                    resume,
                })),
            };
            self.io.send(&login.encode_to_vec());
            self.settle(10);
            let _ = gw;
            match self.io.frames().into_iter().find_map(|f| f.body) {
                Some(pb::server_frame::Body::LoginOk(ok)) => ok,
                other => panic!("expected LoginOk, got {other:?}"),
            }
        }
    }

    fn gateway() -> Arc<Gateway> {
        let mut cfg = Config::default();
        cfg.session.timer_tick = Duration::from_millis(100);
        Gateway::new(cfg).expect("gateway")
    }

    /// Moves the paused clock and fires the wheel's due slots.
    async fn advance(gw: &Gateway, d: Duration) {
        tokio::time::advance(d).await;
        gw.wheel().advance(gw.now());
    }

    fn push(gw: &Gateway, h: &SessionHandle, n: usize) {
        for i in 0..n {
            let p = SharedPush::new(&format!("m{i}"), &[0u8; 100], "t", "");
            let r = h.enqueue(&p, gw.delivery(), gw.budget(), &mut Vec::new());
            assert_eq!(r, crate::session::Enqueued::Queued);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_with_retransmissions_due_does_not_spin() {
        let gw = gateway();
        let mut c = Driven::new(&gw);
        let ok = c.login(&gw, None);
        let h = gw.registry().session(SessionId(ok.session_id)).unwrap();
        push(&gw, &h, 4);
        c.settle(10);
        assert_eq!(c.io.frames().len(), 4, "four pushes written, none acked");
        // The peer stops reading: the next pushes stay in a pending write.
        c.io.set_room(0);
        push(&gw, &h, 4);
        c.settle(10);
        // Past the first retransmission deadline (10 s): the write is still
        // refused, so nothing can be retransmitted; the task must sleep until
        // the socket or the stall rule wakes it, not wake itself.
        advance(&gw, Duration::from_secs(11)).await;
        let polls = c.settle(1000);
        assert!(
            polls <= 2,
            "the connection woke itself {polls} times in a row with a retransmission due"
        );
        // The stall rule closes it once the socket took nothing for 30 s.
        advance(&gw, Duration::from_secs(20)).await;
        assert!(c.woken(), "the stall deadline wakes the connection");
        c.settle(10);
        assert!(!c.done, "the Close frame waits for the linger");
        advance(
            &gw,
            crate::session::CLOSE_LINGER + Duration::from_millis(200),
        )
        .await;
        assert!(c.woken(), "the linger deadline wakes the connection");
        c.settle(10);
        assert!(c.done, "a stalled connection ends after its linger");
        assert!(
            h.is_detached(),
            "a slow consumer's session waits for a resume"
        );
        assert_eq!(h.queued(), 8, "every push is held for the resume");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_shorter_than_the_timeout_is_not_a_slow_consumer() {
        let gw = gateway();
        let mut c = Driven::new(&gw);
        let ok = c.login(&gw, None);
        let h = gw.registry().session(SessionId(ok.session_id)).unwrap();
        c.io.set_room(0);
        push(&gw, &h, 2);
        c.settle(10);
        advance(&gw, Duration::from_secs(25)).await;
        c.settle(10);
        // The socket takes a few bytes: progress restarts the stall clock.
        c.io.set_room(10);
        c.settle(10);
        c.io.set_room(0);
        c.settle(10);
        advance(&gw, Duration::from_secs(25)).await;
        c.settle(10);
        assert!(!c.done);
        assert!(
            !h.is_detached(),
            "50 s blocked, but never 30 s without progress"
        );
        c.io.set_room(usize::MAX);
        c.settle(10);
        let mut seqs: Vec<u64> =
            c.io.frames()
                .into_iter()
                .filter_map(|f| match f.body {
                    Some(pb::server_frame::Body::Push(p)) => Some(p.seq),
                    _ => None,
                })
                .collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(
            seqs,
            vec![1, 2],
            "both pushes arrive (and are retransmitted)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_replaced_by_a_resume_lingers_out_on_a_dead_path() {
        let gw = gateway();
        let mut a = Driven::new(&gw);
        let ok = a.login(&gw, None);
        // The phone left Wi-Fi: connection A stays open and silent, and the
        // device resumes on connection B.
        let mut b = Driven::new(&gw);
        let ok_b = b.login(
            &gw,
            Some(pb::Resume {
                session_id: ok.session_id,
                resume_token: ok.resume_token.clone(),
                last_seq: 0,
                last_bulk_seq: 0,
            }),
        );
        assert_eq!(ok_b.session_id, ok.session_id, "resumed");
        assert!(a.woken(), "the resume tells the old connection");
        a.settle(10);
        let closes: Vec<_> =
            a.io.frames()
                .into_iter()
                .filter_map(|f| match f.body {
                    Some(pb::server_frame::Body::Close(c)) => Some(c.code),
                    _ => None,
                })
                .collect();
        assert_eq!(closes, vec![Code::Replaced as i32]);
        assert!(!a.done, "A lingers for the peer's EOF");
        // Nothing comes from A's peer: the linger deadline must end A.
        advance(
            &gw,
            crate::session::CLOSE_LINGER + Duration::from_millis(200),
        )
        .await;
        assert!(
            a.woken(),
            "the wheel wakes A, not the connection that replaced it"
        );
        a.settle(10);
        assert!(a.done, "the replaced connection finished after its linger");
        drop(a);
        assert_eq!(gw.limits().connections(), 1, "only B is left");
        let h = gw.registry().session(SessionId(ok.session_id)).unwrap();
        assert!(!h.is_detached(), "B still holds the session");
        b.settle(10);
        assert!(!b.done);
    }
}
