//! The connection machine: every decision about one connection that does not
//! depend on how its bytes move.
//!
//! A [`Link`] owns a connection's [`Session`] (the protocol state machine) and
//! its hold on the session's shared handle, and decides: whether pushes may
//! flow, what goes into the next write on each output, that a `Close` waits
//! for the pushes of its output (unless the connection is being cut), what a
//! superseded connection does, how a draining connection that never logged in
//! closes, the linger byte budget, the stall rule, the ack deadline, when the
//! cheap housekeeping runs, and which deadline the timer wheel is armed with.
//!
//! A driver ([`Connection`](super::Connection) over a [`Wire`](super::Wire))
//! only moves bytes, wake-ups and time: it reads into a stack buffer and
//! calls [`Link::on_read`], asks [`Link::batch`] for what to write on each
//! output and reports what the socket took ([`Link::on_written`],
//! [`Link::on_refused`]), and brackets each poll with [`Link::begin`] and
//! [`Link::end`]. Nothing here touches a socket, so the timing paths are
//! tested on virtual time by calling these methods (see the tests below).
//!
//! Outputs: a byte stream (TCP, TLS) has one, and both lanes interleave on
//! it. QUIC has two: output 0 (the client's bidirectional stream) carries
//! control frames and the interactive lane, output 1 (a server-opened
//! unidirectional stream) the bulk lane, so a bulk stream stalled by its
//! small flow-control window never delays an interactive push. Each output
//! has its own pending write, stall clock and ack deadline.

use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

use super::{ConnEnv, Node, NodeRef};
use crate::config::SlowConsumerPolicy;
use crate::ids::TransportKind;
use crate::metrics as m;
use crate::session::{CloseCmd, Lanes, Session, SessionHandle};
use crate::timer::Scheduled;
use crate::wire::{encode_push_header, frame_len, Code, FrameError, SharedPush, LEN_PREFIX};

/// Frames coalesced into one batch of writes.
const BATCH_FRAMES: usize = 256;
/// Bytes coalesced into one batch of writes (soft limit).
const BATCH_BYTES: usize = 256 * 1024;
/// Bytes discarded while lingering on close, before giving up on EOF.
pub(crate) const LINGER_BYTES: usize = 256 * 1024;

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
    /// Registered in the timer wheel (at `Link::timer`).
    const TIMER_SET: u16 = 1 << 5;
    /// Another connection resumed this session: hands off the shared state.
    /// `Link::handle` is then a private handle that only carries this task's
    /// wake-ups (the wheel wakes a handle's registered waker, which the
    /// session's handle now keeps for the new connection).
    const SUPERSEDED: u16 = 1 << 6;
    /// Logged in: the session is in the registry.
    const REGISTERED: u16 = 1 << 7;
    /// The bulk lane has its own output (QUIC).
    const TWO_OUTPUTS: u16 = 1 << 8;
    /// The handshake is not confirmed yet (QUIC 0-RTT): input may be a
    /// replay, so only idempotent requests run.
    const EARLY: u16 = 1 << 9;
    /// A request that must wait for the handshake's confirmation is held in
    /// `rbuf` (with everything after it); reading stops until then.
    const DEFERRED: u16 = 1 << 10;
    /// Unparked and nothing read since: it does not park again before its
    /// socket has been read (the reactor may not have reported the bytes
    /// that unparked it yet).
    const UNPARKED: u16 = 1 << 11;
    /// Set by the last poll: the connection may park now.
    const PARK_DUE: u16 = 1 << 12;

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

/// How a transport carries the lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// One byte stream: control frames and both lanes interleave.
    One,
    /// Output 0 carries control frames and the interactive lane, output 1 the
    /// bulk lane.
    Two,
}

/// Frames waiting to be written on one output, coalesced.
pub struct WriteBatch {
    /// Most batches are one flat slice: inline, no allocation for the list.
    chunks: SmallVec<[Bytes; 1]>,
    idx: usize,
    frames: u64,
    /// Since when the socket has taken no byte of this batch (set when a
    /// write is refused, cleared by any progress): the stall rule's clock.
    stalled_at: Option<Instant>,
}

impl WriteBatch {
    /// The slices still to write, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks[self.idx..]
    }

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
    chunks: SmallVec<[Bytes; 1]>,
    flat: BytesMut,
    frames: u64,
    bytes: usize,
    /// When the oldest push written here for the first time arrived.
    oldest: Option<Instant>,
}

impl BatchBuilder {
    fn new(vectored: bool) -> Self {
        Self {
            vectored,
            chunks: SmallVec::new(),
            flat: BytesMut::new(),
            frames: 0,
            bytes: 0,
            oldest: None,
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
        // A no-op after `Sink::reserve` sized the buffer for the batch.
        self.flat.reserve(self.flat_len(p));
        encode_push_header(seq, p.body.len(), &mut self.flat);
        if self.vectored && p.body.len() > COPY_MAX {
            self.cut();
            self.chunks.push(p.body.clone());
        } else {
            self.flat.extend_from_slice(&p.body);
        }
    }

    /// Bytes of `p` that go into the flat buffer.
    fn flat_len(&self, p: &SharedPush) -> usize {
        if self.vectored && p.body.len() > COPY_MAX {
            crate::wire::PUSH_HEADER_MAX
        } else {
            crate::wire::PUSH_HEADER_MAX + p.body.len()
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

impl crate::session::delivery::Sink for BatchBuilder {
    fn reserve(&mut self, pushes: &mut dyn Iterator<Item = &SharedPush>) {
        let n: usize = pushes.map(|p| self.flat_len(p)).sum();
        self.flat.reserve(n);
    }

    fn push(&mut self, _lane: crate::wire::pb::Lane, seq: u64, p: &SharedPush) {
        BatchBuilder::push(self, seq, p);
    }

    fn first_write(&mut self, arrived: Instant) {
        self.oldest = Some(self.oldest.map_or(arrived, |o| o.min(arrived)));
    }

    fn gap(&mut self, lane: crate::wire::pb::Lane, first: u64, last: u64) {
        use crate::wire::pb;
        self.frame(crate::wire::frame_bytes(&pb::ServerFrame {
            request_id: 0,
            body: Some(pb::server_frame::Body::Gap(pb::Gap {
                lane: lane as i32,
                first_seq: first,
                last_seq: last,
            })),
        }));
    }
}

/// The pending writes of a connection's outputs; allocated only while one is
/// pending, so an idle connection pays 8 bytes for it.
#[derive(Default)]
struct Pending([Option<WriteBatch>; 2]);

/// Whether tick `a` comes after tick `b` (both the low 32 bits of ticks less
/// than 2^31 apart).
pub(crate) fn tick_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// One connection's machine. See the module documentation.
pub struct Link {
    session: Session,
    handle: SessionHandle,
    node: NodeRef,
    /// Set when per-IP accounting counted this connection (boxed: per-IP
    /// accounting is off by default, and then a connection pays 8 bytes).
    ip: Option<Box<IpAddr>>,
    /// A partial frame, only while one is in flight (boxed: idle costs 8 bytes).
    rbuf: Option<Box<BytesMut>>,
    /// Pending writes, only while the socket refuses to take one.
    out: Option<Box<Pending>>,
    /// Low 32 bits of the wheel tick this connection is registered to wake
    /// at, when `TIMER_SET`.
    timer: u32,
    /// Generation of this connection's hold on the session (see SessionHandle).
    gen: u32,
    /// KiB discarded while lingering on close (u16 keeps the future small).
    lingered_kib: u16,
    f: Flags,
    kind: TransportKind,
}

impl Link {
    /// A new connection of `kind`, whose accounting `ip` was taken by a
    /// [`ConnGuard`](super::ConnGuard); the link releases it when dropped.
    /// Its login deadline counts from `since` (at most now).
    pub(crate) fn new(
        node: NodeRef,
        kind: TransportKind,
        outputs: Outputs,
        ip: Option<Box<IpAddr>>,
        since: Instant,
    ) -> Self {
        let now = since.min(node.now());
        let handle = SessionHandle::new(node.next_session_id());
        node.connection_opened(&handle);
        let mut f = Flags(Flags::FLUSH_ON_CLOSE);
        f.set(Flags::TWO_OUTPUTS, outputs == Outputs::Two);
        Self {
            session: Session::new(now, node.params().clone()),
            handle,
            node,
            ip,
            rbuf: None,
            out: None,
            timer: 0,
            gen: 0,
            lingered_kib: 0,
            f,
            kind,
        }
    }

    /// The session handle (tests and the in-memory transport use it).
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// The node this connection runs on.
    pub fn node(&self) -> &dyn Node {
        &*self.node
    }

    /// The node, shared (the parker takes it to park the connection).
    pub(crate) fn gateway_arc(&self) -> &NodeRef {
        &self.node
    }

    /// When this connection may park (see park.rs): a logged-in TCP, TLS or WebSocket
    /// connection with nothing partly read, nothing pending on its socket
    /// and no control frame waiting, `listen.park_after` after the peer's
    /// last frame. The session's own queues and windows are checked when it
    /// parks ([`Link::try_park`]). None while any of that does not hold, or
    /// when parking is off.
    pub fn park_at(&self) -> Option<Instant> {
        if !self.idle_shape() || self.f.has(Flags::UNPARKED) {
            return None;
        }
        let after = self.node.park_after()?;
        Some(self.session.quiet_since()? + after)
    }

    /// What parking asks of the link itself, whatever the quiet time: TCP,
    /// TLS or WebSocket (the wire's own buffers are checked when it parks), logged
    /// in, nothing partly read, nothing waiting to be written, the peer
    /// still sending.
    fn idle_shape(&self) -> bool {
        matches!(
            self.kind,
            TransportKind::Tcp | TransportKind::Tls | TransportKind::Ws | TransportKind::Wss
        ) && self.registered()
            && self.rbuf.is_none()
            && self.out.is_none()
            && !self.f.has(Flags::READ_CLOSED)
    }

    /// Whether a parked connection that was just driven in place (see
    /// transport/park.rs) may stay parked: what [`Link::park_at`] asks but
    /// the quiet time (its peer was just heard from), and no deadline due.
    /// The session's own consent comes after, under its lock.
    pub(crate) fn may_stay_parked(&self, now: Instant) -> bool {
        self.idle_shape()
            && !self.session.is_closing()
            && !self.session.is_closed()
            && self.session.poll_timeout().is_none_or(|t| t > now)
    }

    /// Whether the last poll found that the connection may park now (see
    /// [`Link::park_at`]).
    pub(crate) fn park_due(&self) -> bool {
        self.f.has(Flags::PARK_DUE)
    }

    /// The connection left the parker: it parks again only after a read.
    pub(crate) fn unparked(&mut self) {
        self.f.set(Flags::UNPARKED, true);
    }

    /// Hands the session's wake-ups to `waker` if nothing waits in it (see
    /// [`SessionHandle::try_park`]).
    pub(crate) fn try_park(&self, waker: Waker) -> bool {
        self.handle.try_park(self.gen, waker, true)
    }

    /// A parked connection was woken: true if it may stay parked, with
    /// `waker` as its session's waker again. The wheel's entries are lazy
    /// (an entry left from an earlier deadline, such as the login deadline,
    /// still fires), so a wake-up from the wheel often finds nothing due:
    /// the connection then re-arms the wheel for its real deadline and stays
    /// parked. Anything else (a push, a close request, a takeover, a
    /// deadline reached) unparks it.
    ///
    /// Not the quiet time of [`Link::park_at`]: a connection whose heartbeat
    /// was answered in place has just heard from its peer, and is as idle as
    /// before (a stale entry firing soon after such an answer unparked every
    /// connection once, until this was so).
    pub(crate) fn stay_parked(&mut self, now: Instant, waker: Waker) -> bool {
        if !self.may_stay_parked(now) {
            return false;
        }
        // The wake-up took the parked waker; whatever came with it shows in
        // the session's state, which `try_park` checks under its lock.
        self.handle.try_park(self.gen, waker, false) && self.arm(now)
    }

    /// The node's clock.
    pub fn now(&self) -> Instant {
        self.node.now()
    }

    pub fn kind(&self) -> TransportKind {
        self.kind
    }

    /// Outputs this connection writes to (1 or 2).
    pub fn outputs(&self) -> usize {
        if self.f.has(Flags::TWO_OUTPUTS) {
            2
        } else {
            1
        }
    }

    /// The lanes output `out` carries.
    fn lanes_of(&self, out: usize) -> Lanes {
        match (self.f.has(Flags::TWO_OUTPUTS), out) {
            (false, _) => Lanes::ALL,
            (true, 0) => Lanes::INTERACTIVE,
            (true, _) => Lanes::BULK,
        }
    }

    fn registered(&self) -> bool {
        self.f.has(Flags::REGISTERED) && !self.f.has(Flags::SUPERSEDED)
    }

    fn pending(&self, out: usize) -> Option<&WriteBatch> {
        self.out.as_ref().and_then(|p| p.0[out].as_ref())
    }

    fn any_pending(&self) -> bool {
        self.out.is_some()
    }

    // -----------------------------------------------------------------
    // A poll: begin, input, output, end.
    // -----------------------------------------------------------------

    /// Starts a poll at `now`: notices a takeover by another connection,
    /// applies the stall rule, the ack deadline and requests from outside
    /// (close, drain), the session's timeouts, and the wheel's housekeeping.
    pub fn begin(&mut self, now: Instant, waker: &Waker) {
        if !self.handle.register_waker(self.gen, waker) {
            // Another connection resumed this session: stop touching it. The
            // wheel wakes whatever waker a handle holds, and the session's
            // handle now holds the new connection's: this connection takes a
            // private handle (same id, registered nowhere) for its own
            // wake-ups until its Close is written and it lingers out.
            self.f.set(Flags::SUPERSEDED, true);
            self.f.set(Flags::TIMER_SET, false);
            self.handle = SessionHandle::new(self.handle.id());
            self.gen = 0;
            self.handle.register_waker(0, waker);
            self.session.close(
                now,
                CloseCmd::new(
                    Code::Replaced,
                    "the session was resumed on another connection",
                ),
            );
        }
        let wheel_fired = !self.f.has(Flags::TIMER_SET)
            || tick_after(self.node.wheel().cursor() as u32, self.timer);
        self.check_stall(now);
        if wheel_fired {
            // Woken by the wheel (or never armed): the checks that only a
            // deadline can make due.
            self.check_acks(now);
        }
        if !self.session.is_closing() {
            if let Some(cmd) = self.handle.take_close(self.gen) {
                // A connection cut for not reading (or for a dead path) gets
                // its Close at once: pushes queued behind it would not get
                // through, and they are kept for the resume.
                let cut = matches!(cmd.code, Code::SlowConsumer | Code::AckTimeout);
                self.f.set(Flags::FLUSH_ON_CLOSE, !cut);
                self.session.close(now, cmd);
            } else if !self.f.has(Flags::REGISTERED) && self.node.is_draining() {
                self.session.close(now, self.node.drain_close());
            }
        }
        self.session.handle_timeout(now);
        if wheel_fired && self.registered() {
            self.handle
                .prune_uplinks(now, self.node.config().delivery.dedup_window);
        }
    }

    /// The connection starts before its handshake is confirmed (0-RTT data
    /// may be a replay by an attacker): until [`Link::confirm`], only
    /// idempotent requests run (`Login`, with or without a resume, `Ping`,
    /// `Ack`, `Close`); the first other request, and everything after it,
    /// waits. So a replayed 0-RTT flight can log in again (which replaces or
    /// resumes, as a reconnect would) but never yields an uplink twice.
    pub fn set_early(&mut self) {
        self.f.set(Flags::EARLY, true);
    }

    /// The handshake is confirmed: requests held back run now.
    pub fn confirm(&mut self, now: Instant, peer: &dyn Fn() -> Option<SocketAddr>) {
        self.f.set(Flags::EARLY, false);
        if self.f.has(Flags::DEFERRED) {
            self.f.set(Flags::DEFERRED, false);
            if let Some(buf) = self.rbuf.take() {
                if !self.session.is_closing() {
                    self.feed_owned(now, buf, peer);
                }
            }
        }
    }

    /// Offers input held for the node ([`Node::await_take`]) again: it runs
    /// once the node no longer asks to wait (and not before a QUIC
    /// handshake is confirmed).
    pub fn retry_held(&mut self, now: Instant, peer: &dyn Fn() -> Option<SocketAddr>) {
        if self.f.has(Flags::DEFERRED) && !self.f.has(Flags::EARLY) {
            self.f.set(Flags::DEFERRED, false);
            if let Some(buf) = self.rbuf.take() {
                if !self.session.is_closing() {
                    self.feed_owned(now, buf, peer);
                }
            }
        }
    }

    /// Whether the node asks this connection to hold `body` (its first
    /// frames only, before it logs in; see [`Node::await_take`]).
    fn must_wait(&self, body: &[u8]) -> bool {
        !self.f.has(Flags::REGISTERED) && self.node.await_take(&self.handle, body)
    }

    /// Whether a frame may run before the handshake is confirmed.
    fn idempotent(body: &[u8]) -> bool {
        use crate::wire::pb::client_frame::Body;
        use prost::Message;
        matches!(
            crate::wire::pb::ClientFrame::decode(body).map(|f| f.body),
            Ok(Some(
                Body::Login(_) | Body::Ping(_) | Body::Ack(_) | Body::Close(_)
            )) | Err(_)
        )
    }

    /// Whether the driver should read: more input while the session takes
    /// it, or bytes to discard while lingering on close, within the budget.
    pub fn wants_read(&self) -> bool {
        if self.f.has(Flags::READ_CLOSED) || self.f.has(Flags::DEFERRED) {
            return false;
        }
        if self.session.is_closing() {
            !self.lingered_done()
        } else {
            self.session.wants_input()
        }
    }

    /// Reading is paused while replies pile up (no read waker is armed then,
    /// so once the replies are written the driver must poll input again).
    pub fn input_paused(&self) -> bool {
        !self.f.has(Flags::READ_CLOSED) && !self.session.is_closing() && !self.session.wants_input()
    }

    /// Bytes the peer sent (`peer` gives its address, asked only at login).
    pub fn on_read(&mut self, now: Instant, data: &[u8], peer: &dyn Fn() -> Option<SocketAddr>) {
        m::hot().bytes_in.increment(data.len() as u64);
        self.f.set(Flags::UNPARKED, false);
        if self.session.is_closing() {
            self.lingered_kib = self
                .lingered_kib
                .saturating_add(data.len().div_ceil(1024) as u16);
        } else {
            self.feed(now, data, peer);
        }
    }

    /// The peer's side ended: EOF (`failed` false) or an error.
    pub fn on_read_closed(&mut self, failed: bool) {
        let lingering = self.session.is_closing();
        self.f.set(Flags::READ_CLOSED, true);
        if failed || !lingering {
            self.session.handle_peer_gone(Code::ConnectionLost);
        }
    }

    /// What to write next on output `out`: the pending batch, or a new one
    /// (`vectored`: large push bodies as their own slices). `None`: nothing.
    pub fn batch(&mut self, out: usize, vectored: bool, now: Instant) -> Option<&WriteBatch> {
        if self.pending(out).is_none() {
            let b = self.next_batch(out, vectored, now)?;
            self.out.get_or_insert_with(Box::default).0[out] = Some(b);
        }
        self.pending(out)
    }

    /// The socket took `n` bytes of output `out`'s batch.
    pub fn on_written(&mut self, out: usize, n: usize, now: Instant) {
        let hot = m::hot();
        hot.writes.increment(1);
        hot.bytes_out.increment(n as u64);
        self.node.count_write();
        let lanes = self.lanes_of(out);
        let Some(p) = self.out.as_mut() else { return };
        let Some(b) = p.0[out].as_mut() else { return };
        if b.stalled_at.take().is_some() && self.f.has(Flags::REGISTERED) {
            // The client reads again: what waits in the window may only now
            // reach it, so its ack deadline starts over.
            self.handle.progress(self.gen, lanes, now);
        }
        b.advance(n);
        if b.is_done() {
            hot.frames_out(self.kind).increment(b.frames);
            p.0[out] = None;
            if p.0.iter().all(Option::is_none) {
                self.out = None;
            }
        }
    }

    /// The socket refused output `out`'s batch: the stall clock starts.
    pub fn on_refused(&mut self, out: usize, now: Instant) {
        if let Some(b) = self.out.as_mut().and_then(|p| p.0[out].as_mut()) {
            b.stalled_at.get_or_insert(now);
        }
    }

    /// A write failed: the connection is gone.
    pub fn on_write_failed(&mut self) {
        self.session.handle_peer_gone(Code::ConnectionLost);
    }

    /// Every output is written: the Close (if any) is out, so the driver
    /// shuts its sending side; once shut and the peer hung up (or lingered
    /// out), the connection is done. Returns whether the driver should shut
    /// its sending side now.
    pub fn on_flushed(&mut self) -> bool {
        let shut = self.f.has(Flags::CLOSE_WRITTEN) && !self.f.has(Flags::SHUTDOWN_DONE);
        if self.f.has(Flags::SHUTDOWN_DONE)
            && (self.f.has(Flags::READ_CLOSED) || self.lingered_done())
        {
            self.session.handle_flushed_and_gone();
        }
        shut
    }

    /// The driver shut its sending side.
    pub fn on_shutdown(&mut self) {
        self.f.set(Flags::SHUTDOWN_DONE, true);
        if self.f.has(Flags::READ_CLOSED) || self.lingered_done() {
            self.session.handle_flushed_and_gone();
        }
    }

    /// Nothing more will be written: the driver may drop the connection.
    pub fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    /// The close code, once closing.
    pub fn close_code(&self) -> Option<Code> {
        self.session.close_code()
    }

    /// Ends a poll: `Ready` when the connection is done; otherwise arms the
    /// wheel for the next deadline (and wakes the task at once if `again`).
    pub fn end(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
        again: bool,
        session_before: crate::ids::SessionId,
    ) -> Poll<()> {
        // A closing session whose peer hung up while we still had frames: done.
        if self.session.is_closing()
            && self.f.has(Flags::READ_CLOSED)
            && !self.any_pending()
            && self.f.has(Flags::CLOSE_WRITTEN)
        {
            self.session.handle_flushed_and_gone();
        }
        if self.session.is_closed() {
            self.finish();
            return Poll::Ready(());
        }
        let mut again = again;
        if self.handle.id() != session_before {
            // A resume swapped in another session's handle during this poll:
            // pushes and timers must wake this task from now on. Until now
            // the session had no waker (the resume took the old
            // connection's), so a push queued after this poll's output woke
            // nobody, and the pushes queued behind it wake nobody either
            // (only a push into an empty queue wakes): look again.
            self.handle.register_waker(self.gen, cx.waker());
            self.f.set(Flags::TIMER_SET, false);
            again = true;
        }
        if again {
            cx.waker().wake_by_ref();
        }
        self.arm_timer(cx, now);
        Poll::Pending
    }

    // -----------------------------------------------------------------
    // Input.
    // -----------------------------------------------------------------

    fn feed(&mut self, now: Instant, mut data: &[u8], peer: &dyn Fn() -> Option<SocketAddr>) {
        let max = self.node.params().max_frame;
        if let Some(mut buf) = self.rbuf.take() {
            buf.extend_from_slice(data);
            return self.feed_owned(now, buf, peer);
        }
        while !data.is_empty() && !self.session.is_closing() {
            match frame_len(data, max) {
                Err(e) => return self.frame_error(now, e),
                Ok(Some(total)) if data.len() >= total => {
                    let (frame, rest) = data.split_at(total);
                    if self.f.has(Flags::EARLY) && !Self::idempotent(&frame[LEN_PREFIX..]) {
                        return self.defer(data);
                    }
                    if self.must_wait(&frame[LEN_PREFIX..]) {
                        return self.defer(data);
                    }
                    self.on_frame(now, &frame[LEN_PREFIX..], peer);
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

    fn feed_owned(
        &mut self,
        now: Instant,
        mut buf: Box<BytesMut>,
        peer: &dyn Fn() -> Option<SocketAddr>,
    ) {
        let max = self.node.params().max_frame;
        while !self.session.is_closing() {
            if let Ok(Some(total)) = frame_len(&buf, max) {
                let body = buf.get(LEN_PREFIX..total);
                let hold = body.is_some_and(|b| {
                    (self.f.has(Flags::EARLY) && !Self::idempotent(b)) || self.must_wait(b)
                });
                if hold {
                    self.f.set(Flags::DEFERRED, true);
                    self.rbuf = Some(buf);
                    return;
                }
            }
            match crate::wire::decode_frame(&mut buf, max) {
                Err(e) => return self.frame_error(now, e),
                Ok(Some(frame)) => self.on_frame(now, &frame, peer),
                Ok(None) => break,
            }
        }
        if !buf.is_empty() && !self.session.is_closing() {
            self.rbuf = Some(buf);
        }
    }

    fn on_frame(&mut self, now: Instant, body: &[u8], peer: &dyn Fn() -> Option<SocketAddr>) {
        m::hot().frames_in(self.kind).increment(1);
        let mut registered = self.f.has(Flags::REGISTERED);
        let conn = ConnEnv {
            handle: &mut self.handle,
            gen: &mut self.gen,
            kind: self.kind,
            peer,
            registered: &mut registered,
        };
        let session = &mut self.session;
        self.node
            .with_env(conn, &mut |env| session.handle_frame(now, body, env));
        self.f.set(Flags::REGISTERED, registered);
    }

    /// Holds `data` (a request that must wait for the handshake, and what
    /// follows it) until [`Link::confirm`].
    fn defer(&mut self, data: &[u8]) {
        let mut buf = BytesMut::with_capacity(data.len());
        buf.extend_from_slice(data);
        self.rbuf = Some(Box::new(buf));
        self.f.set(Flags::DEFERRED, true);
    }

    fn frame_error(&mut self, now: Instant, e: FrameError) {
        tracing::debug!(session = ?self.handle.id(), error = %e, "closing on frame error");
        self.rbuf = None;
        self.session.handle_frame_error(now, e);
    }

    fn lingered_done(&self) -> bool {
        usize::from(self.lingered_kib) * 1024 >= LINGER_BYTES
    }

    // -----------------------------------------------------------------
    // Output.
    // -----------------------------------------------------------------

    fn next_batch(&mut self, out: usize, vectored: bool, now: Instant) -> Option<WriteBatch> {
        let mut b = BatchBuilder::new(vectored);
        let main = out == 0;
        if main {
            while !b.full() {
                match self.session.poll_transmit() {
                    Some(f) => b.frame(f),
                    None => break,
                }
            }
        }
        let pushes_flow = self.registered()
            && (self.session.is_active()
                || (self.session.is_closing() && self.f.has(Flags::FLUSH_ON_CLOSE)));
        let mut remaining = 0;
        if pushes_flow && !b.full() && !self.f.has(Flags::CLOSE_WRITTEN) {
            let before = b.frames;
            remaining = self.handle.poll_send(
                self.gen,
                now,
                BATCH_FRAMES - b.frames as usize,
                self.lanes_of(out),
                self.node.delivery(),
                &mut b,
            );
            let moved = (b.frames - before) as usize;
            if moved > 0 {
                m::hot().queue_depth.record((moved + remaining) as f64);
            }
            // One sample per write, not per push: the clock was read once
            // for this pass already, and a histogram record per push would
            // cost more than the push's header.
            if let Some(at) = b.oldest {
                m::hot()
                    .push_wait
                    .record(now.saturating_duration_since(at).as_secs_f64());
            }
        }
        // The Close goes last on output 0, once the pushes of that output
        // are out (when flushing).
        if main
            && self.session.is_closing()
            && remaining == 0
            && !b.full()
            && !self.f.has(Flags::CLOSE_WRITTEN)
        {
            if let Some(cf) = self.session.poll_close_frame() {
                b.frame(cf);
                self.f.set(Flags::CLOSE_WRITTEN, true);
            }
        }
        b.finish()
    }

    /// Whether a stall of output `out` closes the connection: always for the
    /// output of control frames and interactive pushes; for a bulk-only
    /// output, only when the bulk lane's policy is to disconnect (otherwise
    /// the bulk queue's byte bound drops what does not fit, and interactive
    /// pushes go on).
    fn stall_closes(&self, out: usize) -> bool {
        out == 0 || self.node.delivery().policy[1] == SlowConsumerPolicy::Disconnect
    }

    /// The stall rule: a write refused for `delivery.stall_timeout` closes the
    /// connection as a slow consumer (without flushing: nothing more would
    /// get through). A logged-in session keeps its state for a resume.
    fn check_stall(&mut self, now: Instant) {
        if self.session.is_closing() {
            return;
        }
        let timeout = self.node.delivery().stall_timeout;
        let stalled = (0..self.outputs()).any(|out| {
            self.stall_closes(out)
                && self
                    .pending(out)
                    .and_then(|b| b.stalled_at)
                    .is_some_and(|at| now >= at + timeout)
        });
        if stalled {
            metrics::counter!(m::SLOW_CONSUMERS).increment(1);
            self.cut(
                now,
                CloseCmd::new(
                    Code::SlowConsumer,
                    "the connection accepted no data for too long: the client is not reading",
                ),
            );
        }
    }

    /// The ack deadline: pushes in flight on an output whose writes are not
    /// refused, with no ack progress for `delivery.ack_timeout`, mean a dead
    /// path; the connection closes and the resume replays them elsewhere.
    /// (An output with a refused write is judged by the stall rule instead.)
    fn check_acks(&mut self, now: Instant) {
        if !self.session.is_active() || !self.registered() {
            return;
        }
        let Some(deadline) = self.ack_deadline() else {
            return;
        };
        if now >= deadline {
            metrics::counter!(m::ACK_TIMEOUTS).increment(1);
            self.cut(
                now,
                CloseCmd::new(
                    Code::AckTimeout,
                    "pushes went unacknowledged for the ack timeout: resume on a new connection",
                ),
            );
        }
    }

    /// The earliest ack deadline of the outputs without a refused write.
    fn ack_deadline(&self) -> Option<Instant> {
        let mut lanes = [false, false];
        for out in 0..self.outputs() {
            if self.pending(out).is_none_or(|b| b.stalled_at.is_none()) {
                let l = self.lanes_of(out).0;
                lanes = [lanes[0] || l[0], lanes[1] || l[1]];
            }
        }
        if lanes == [false, false] {
            return None;
        }
        self.handle
            .ack_deadline(self.gen, Lanes(lanes), self.node.delivery())
    }

    /// Closes without flushing, keeping a logged-in session for a resume.
    fn cut(&mut self, now: Instant, cmd: CloseCmd) {
        if self.registered() {
            // Through the handle, so that pushes from now on park as for a
            // detached session; taken in `begin` like any close request.
            self.handle.request_close(cmd);
        } else {
            self.f.set(Flags::FLUSH_ON_CLOSE, false);
            self.session.close(now, cmd);
        }
    }

    // -----------------------------------------------------------------
    // Time.
    // -----------------------------------------------------------------

    /// The deadline this connection must be woken at: the session's own
    /// (login, idle, token, linger), the stall rule's while a write is
    /// refused, the ack deadline of the outputs that are not refused, and
    /// when it may park. Each of them is acted on when it comes (a close; a
    /// park deadline passed is left out and sets `PARK_DUE` for the driver
    /// instead), so none can make the wheel answer "due" for ever: a
    /// deadline a poll cannot move would have the task wake itself in a
    /// loop.
    fn next_wakeup(&mut self, now: Instant) -> Option<Instant> {
        let closing = self.session.is_closing();
        let timeout = self.node.delivery().stall_timeout;
        let stall = if closing {
            None
        } else {
            (0..self.outputs())
                .filter(|&out| self.stall_closes(out))
                .filter_map(|out| self.pending(out).and_then(|b| b.stalled_at))
                .min()
                .map(|at| at + timeout)
        };
        let acks = if self.session.is_active() && self.registered() {
            self.ack_deadline()
        } else {
            None
        };
        // Pushes waiting for an ack keep the connection from parking (and
        // their deadline wakes it); a park deadline already passed is the
        // driver's to act on after this poll, not the wheel's.
        let park = if acks.is_none() { self.park_at() } else { None };
        let due = park.is_some_and(|at| at <= now);
        self.f.set(Flags::PARK_DUE, due);
        let park = park.filter(|_| !due);
        [self.session.poll_timeout(), stall, acks, park]
            .into_iter()
            .flatten()
            .min()
    }

    fn arm_timer(&mut self, cx: &mut Context<'_>, now: Instant) {
        if !self.arm(now) {
            // The next poll counts as woken by the wheel, so that its
            // deadline checks run and move the deadline.
            cx.waker().wake_by_ref();
        }
    }

    /// Registers the next deadline with the wheel; false when it is already
    /// due (the caller must act now).
    fn arm(&mut self, now: Instant) -> bool {
        // Ticks are kept as the low 32 bits and compared with wrapping
        // arithmetic: registrations lie within the wheel's horizon (a few
        // thousand ticks) of its cursor, so the difference always fits.
        let cursor = self.node.wheel().cursor() as u32;
        if self.f.has(Flags::TIMER_SET) && tick_after(cursor, self.timer) {
            self.f.set(Flags::TIMER_SET, false);
        }
        let Some(deadline) = self.next_wakeup(now) else {
            return true;
        };
        let wheel = self.node.wheel();
        let want = wheel.tick_ceil(deadline) as u32;
        if !self.f.has(Flags::TIMER_SET) || tick_after(self.timer, want) {
            match wheel.schedule(deadline, &self.handle) {
                Scheduled::At(t) => {
                    self.timer = t as u32;
                    self.f.set(Flags::TIMER_SET, true);
                }
                Scheduled::Due => {
                    self.f.set(Flags::TIMER_SET, false);
                    return false;
                }
            }
        }
        true
    }

    /// Takes this connection's entry out of the wheel, so that an ended
    /// session's allocation is not kept until its slot fires.
    fn disarm_timer(&mut self) {
        if self.f.has(Flags::TIMER_SET) {
            self.f.set(Flags::TIMER_SET, false);
            self.node.wheel().cancel(self.timer, &self.handle);
        }
    }

    /// The connection is gone without the driver (its socket could not
    /// stay in or rejoin the reactor): the session ends as for a lost
    /// connection, kept for a resume. Dropping a link instead ends it as a
    /// runtime shutting down does (`CODE_SERVER_DRAINING`).
    pub(crate) fn lost(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if self.f.has(Flags::FINISHED) {
            return;
        }
        self.f.set(Flags::FINISHED, true);
        self.disarm_timer();
        self.node.connection_settled(&self.handle);
        let code = self.session.close_code().unwrap_or(Code::ConnectionLost);
        metrics::counter!(m::CLOSES, "reason" => code.as_str_name()).increment(1);
        if self.registered() {
            self.node.connection_ended(&self.handle, self.gen, code);
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Runs on normal completion (already finished) and when the runtime
        // drops the task at shutdown: the registry must not keep a dead session.
        if !self.f.has(Flags::FINISHED) {
            self.f.set(Flags::FINISHED, true);
            self.disarm_timer();
            self.node.connection_settled(&self.handle);
            if self.registered() {
                self.node
                    .connection_ended(&self.handle, self.gen, Code::ServerDraining);
            }
        }
        super::conn::release(&*self.node, self.ip.as_deref().copied(), self.kind);
    }
}

#[cfg(test)]
mod tests {
    //! The connection machine on virtual time, with no socket at all: the
    //! test plays the driver (what the socket took, refused, or read), and
    //! tokio's paused clock and a hand-advanced wheel play time.

    use crate::wire::pb::Lane;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use prost::Message;

    use super::*;
    use crate::ids::SessionId;
    use crate::session::Enqueued;
    use crate::transport::testkit::{self, advance, login_body, FakeNode, Wakes};
    use crate::wire::pb;
    use std::sync::Arc;

    /// A link and the driver's side of it.
    struct T {
        link: Link,
        node: Arc<FakeNode>,
        wakes: Arc<Wakes>,
        done: bool,
    }

    fn frame(body: pb::client_frame::Body) -> Vec<u8> {
        let f = pb::ClientFrame {
            request_id: 1,
            body: Some(body),
        };
        let b = f.encode_to_vec();
        let mut v = (b.len() as u32).to_be_bytes().to_vec();
        v.extend(b);
        v
    }

    fn decode_all(mut bytes: BytesMut) -> Vec<pb::ServerFrame> {
        let mut v = Vec::new();
        while let Ok(Some(f)) = crate::wire::decode_frame(&mut bytes, 1 << 20) {
            v.push(pb::ServerFrame::decode(f).expect("valid frame"));
        }
        v
    }

    impl T {
        fn new(node: &Arc<FakeNode>, outputs: Outputs) -> Self {
            let remote = SocketAddr::from(([127, 0, 0, 1], 1));
            let dyn_node = NodeRef::new(node.clone());
            let ip = super::super::ConnGuard::acquire(&dyn_node, remote, TransportKind::Memory)
                .expect("no cap")
                .disarm_for_test();
            Self {
                link: Link::new(dyn_node, TransportKind::Memory, outputs, ip, node.now()),
                node: node.clone(),
                wakes: Arc::default(),
                done: false,
            }
        }

        /// One poll with no socket activity; true when the task woke itself.
        fn poll(&mut self) -> bool {
            assert!(!self.done, "polled after it finished");
            self.wakes.0.store(0, Ordering::SeqCst);
            let waker = Waker::from(self.wakes.clone());
            let mut cx = Context::from_waker(&waker);
            let before = self.link.handle().id();
            self.link.begin(self.node.now(), &waker);
            let now = self.node.now();
            self.done = self.link.end(&mut cx, now, false, before).is_ready();
            self.wakes.0.load(Ordering::SeqCst) > 0
        }

        fn woken(&self) -> bool {
            self.wakes.0.load(Ordering::SeqCst) > 0
        }

        fn read(&mut self, bytes: &[u8]) {
            let waker = Waker::from(self.wakes.clone());
            self.link.begin(self.node.now(), &waker);
            self.link.on_read(self.node.now(), bytes, &|| None);
        }

        /// Everything output `out` has to write, as if the socket took it all.
        fn write(&mut self, out: usize) -> Vec<pb::ServerFrame> {
            let mut bytes = BytesMut::new();
            let now = self.node.now();
            while let Some(b) = self.link.batch(out, true, now) {
                let n: usize = b.chunks().iter().map(|c| c.len()).sum();
                for c in b.chunks() {
                    bytes.extend_from_slice(c);
                }
                self.link.on_written(out, n, now);
            }
            decode_all(bytes)
        }

        /// Output `out` has a batch and the socket refuses it.
        fn refuse(&mut self, out: usize) -> bool {
            let now = self.node.now();
            if self.link.batch(out, true, now).is_none() {
                return false;
            }
            self.link.on_refused(out, now);
            true
        }

        fn login(&mut self) -> pb::LoginOk {
            self.read(&frame(login_body(None)));
            match self.write(0).into_iter().find_map(|f| f.body) {
                Some(pb::server_frame::Body::LoginOk(ok)) => ok,
                other => panic!("expected LoginOk, got {other:?}"),
            }
        }

        fn session(&self, ok: &pb::LoginOk) -> SessionHandle {
            self.node
                .session(SessionId(ok.session_id))
                .expect("registered")
        }
    }

    fn push(node: &FakeNode, h: &SessionHandle, lane: Lane, n: usize) {
        for i in 0..n {
            let p = SharedPush::with(&format!("m{i}"), &[0u8; 100], "t", "", lane, false);
            let r = h.enqueue(&p, node.delivery(), node.budget(), &mut Vec::new());
            assert_eq!(r, Enqueued::Queued);
        }
    }

    fn seqs(frames: &[pb::ServerFrame]) -> Vec<(i32, u64)> {
        frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(pb::server_frame::Body::Push(p)) => Some((p.lane, p.seq)),
                _ => None,
            })
            .collect()
    }

    fn close_code(frames: &[pb::ServerFrame]) -> Option<i32> {
        frames.iter().find_map(|f| match &f.body {
            Some(pb::server_frame::Body::Close(c)) => Some(c.code),
            _ => None,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_kick_writes_the_queued_pushes_before_the_close() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::One);
        let ok = t.login();
        let h = t.session(&ok);
        push(&node, &h, Lane::Interactive, 3);
        h.request_close(CloseCmd::new(Code::Kicked, "bye"));
        t.poll();
        let out = t.write(0);
        assert_eq!(seqs(&out), vec![(0, 1), (0, 2), (0, 3)]);
        assert_eq!(close_code(&out), Some(Code::Kicked as i32));
        assert!(
            matches!(
                out.last().and_then(|f| f.body.as_ref()),
                Some(pb::server_frame::Body::Close(_))
            ),
            "the Close comes last"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_consumer_is_cut_without_a_flush_and_keeps_its_session() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::One);
        let ok = t.login();
        let h = t.session(&ok);
        push(&node, &h, Lane::Interactive, 2);
        assert!(t.refuse(0), "the socket refuses the pushes");
        push(&node, &h, Lane::Interactive, 2);
        t.poll();
        advance(&node, Duration::from_secs(31)).await;
        assert!(t.woken(), "the stall deadline is armed");
        t.poll();
        // The refused batch is what the socket would still take; then only
        // the Close, not the two pushes queued behind it.
        let out = t.write(0);
        assert_eq!(seqs(&out), vec![(0, 1), (0, 2)]);
        assert_eq!(close_code(&out), Some(Code::SlowConsumer as i32));
        t.link.on_read_closed(false);
        t.poll();
        assert!(t.done);
        assert!(h.is_detached(), "kept for a resume");
        assert_eq!(h.queued(), 4, "the window went back to the queue");
    }

    #[tokio::test(start_paused = true)]
    async fn an_unacknowledged_window_closes_a_dead_path_and_nothing_is_written_twice() {
        let node = testkit::node(|c| c.delivery.ack_timeout = Duration::from_secs(10));
        let mut t = T::new(&node, Outputs::One);
        let ok = t.login();
        let h = t.session(&ok);
        push(&node, &h, Lane::Interactive, 2);
        t.poll();
        assert_eq!(seqs(&t.write(0)), vec![(0, 1), (0, 2)]);
        t.poll();
        // An ack of the first at 6 s restarts the clock for the second.
        advance(&node, Duration::from_secs(6)).await;
        t.read(&frame(pb::client_frame::Body::Ack(pb::Ack {
            lane: pb::Lane::Interactive as i32,
            up_to_seq: 1,
            ranges: vec![],
        })));
        t.poll();
        advance(&node, Duration::from_secs(6)).await;
        t.poll();
        assert!(t.write(0).is_empty(), "12 s in, 6 s since the ack: open");
        advance(&node, Duration::from_millis(4_200)).await;
        assert!(t.woken(), "the ack deadline wakes the connection");
        t.poll();
        let out = t.write(0);
        assert!(seqs(&out).is_empty(), "seq 2 is not written again");
        assert_eq!(close_code(&out), Some(Code::AckTimeout as i32));
        t.link.on_read_closed(false);
        t.poll();
        assert!(t.done);
        assert!(h.is_detached(), "kept for a resume");
    }

    /// A resume swaps the session's handle in during a poll, and the
    /// session's waker is this task's only from the end of that poll. A push
    /// that comes after the poll's output and before its end finds no waker
    /// to take: the poll must still leave the task to look again, or the
    /// push (and every one queued behind it, which wakes nobody either)
    /// waits for the client's next frame.
    #[tokio::test(start_paused = true)]
    async fn a_push_between_a_resumes_output_and_the_end_of_its_poll_is_written() {
        let node = testkit::node(|_| {});
        let mut a = T::new(&node, Outputs::One);
        let ok = a.login();
        let h = a.session(&ok);
        a.link.on_read_closed(true);
        a.poll();
        assert!(a.done);
        assert!(h.is_detached(), "kept for a resume");

        // The resume, polled as the driver polls: input, output, end. The
        // session holds nothing, so only the LoginOk goes out.
        let mut b = T::new(&node, Outputs::One);
        let waker = Waker::from(b.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let before = b.link.handle().id();
        b.read(&frame(login_body(Some(pb::Resume {
            session_id: ok.session_id,
            resume_token: ok.resume_token.clone(),
            last_seq: 0,
            last_bulk_seq: 0,
        }))));
        let out = b.write(0);
        let resumed = out.iter().find_map(|f| match &f.body {
            Some(pb::server_frame::Body::LoginOk(ok)) => ok.resume,
            _ => None,
        });
        assert_eq!(resumed.map(|r| (r.code, r.replayed)), Some((0, 0)));
        // Pushes come in before the poll ends.
        push(&node, &h, Lane::Interactive, 2);
        let now = node.now();
        assert!(b.link.end(&mut cx, now, false, before).is_pending());
        assert!(
            b.woken(),
            "the poll that resumed leaves its task to run again"
        );
        b.poll();
        assert_eq!(seqs(&b.write(0)), vec![(0, 1), (0, 2)]);
        // From then on the session's pushes wake this task.
        b.poll();
        push(&node, &h, Lane::Interactive, 1);
        assert!(b.woken());
        assert_eq!(seqs(&b.write(0)), vec![(0, 3)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_write_suspends_the_ack_deadline_and_progress_restarts_it() {
        let node = testkit::node(|c| c.delivery.ack_timeout = Duration::from_secs(10));
        let mut t = T::new(&node, Outputs::One);
        let ok = t.login();
        let h = t.session(&ok);
        push(&node, &h, Lane::Interactive, 1);
        assert!(t.refuse(0));
        t.poll();
        // 20 s refused: past the ack timeout but within the stall timeout.
        advance(&node, Duration::from_secs(20)).await;
        t.poll();
        assert!(
            !t.link.session.is_closing(),
            "a refused write is the stall rule's"
        );
        // The socket takes it: the client reads, so the push gets 10 s from now.
        assert_eq!(seqs(&t.write(0)), vec![(0, 1)]);
        t.poll();
        advance(&node, Duration::from_secs(9)).await;
        t.poll();
        assert!(!t.link.session.is_closing());
        advance(&node, Duration::from_secs(2)).await;
        t.poll();
        assert_eq!(close_code(&t.write(0)), Some(Code::AckTimeout as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_bulk_stream_does_not_stop_interactive_pushes() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::Two);
        let ok = t.login();
        let h = t.session(&ok);
        push(&node, &h, Lane::Bulk, 3);
        push(&node, &h, Lane::Interactive, 2);
        assert!(t.refuse(1), "the bulk stream's window is shut");
        let out = t.write(0);
        assert_eq!(
            seqs(&out),
            vec![(0, 1), (0, 2)],
            "interactive only on output 0"
        );
        // Far past the stall timeout: a stalled bulk stream (policy drop) is
        // not a slow consumer, and interactive pushes keep flowing.
        for _ in 0..10 {
            advance(&node, Duration::from_secs(5)).await;
            t.poll();
            push(&node, &h, Lane::Interactive, 1);
            assert_eq!(seqs(&t.write(0)).len(), 1);
            t.read(&frame(pb::client_frame::Body::Ack(pb::Ack {
                lane: pb::Lane::Interactive as i32,
                up_to_seq: h.next_seq(Lane::Interactive) - 1,
                ranges: vec![],
            })));
        }
        assert!(!t.link.session.is_closing());
        // The bulk stream opens again: its pushes go out on output 1.
        let bulk = t.write(1);
        assert_eq!(seqs(&bulk), vec![(1, 1), (1, 2), (1, 3)]);
        assert!(close_code(&bulk).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_handshake_is_confirmed_only_idempotent_requests_run() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::Two);
        t.link.set_early();
        // A 0-RTT flight: a login, an uplink, a ping.
        let ok = t.login();
        let h = t.session(&ok);
        let send = frame(pb::client_frame::Body::Send(pb::Send {
            client_msg_id: "once".into(),
            route: "r".into(),
            payload: bytes::Bytes::from_static(b"x"),
        }));
        let ping = frame(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 1 }));
        t.read(&[send.clone(), ping].concat());
        assert!(t.write(0).is_empty(), "the Send and what follows it wait");
        assert!(!t.link.wants_read(), "no more input while a request waits");
        // A replay of the flight is never confirmed: nothing more happens.
        // The real one is: the Send runs once, then the Ping.
        t.link.confirm(node.now(), &|| None);
        let out = t.write(0);
        let kinds: Vec<&str> = out
            .iter()
            .map(|f| match &f.body {
                Some(pb::server_frame::Body::SendAck(_)) => "SendAck",
                Some(pb::server_frame::Body::Pong(_)) => "Pong",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, vec!["SendAck", "Pong"]);
        assert!(t.link.wants_read());
        assert!(!h.is_detached());
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_gateway_closes_a_connection_that_never_logged_in() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::One);
        t.poll();
        node.start_drain();
        t.poll();
        assert_eq!(close_code(&t.write(0)), Some(Code::ServerDraining as i32));
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_reads_at_most_the_linger_budget() {
        let node = testkit::node(|_| {});
        let mut t = T::new(&node, Outputs::One);
        let _ = t.login();
        t.read(&frame(pb::client_frame::Body::Close(pb::Close::default())));
        assert_eq!(close_code(&t.write(0)), Some(Code::NormalClose as i32));
        assert!(t.link.on_flushed(), "shut the sending side");
        t.link.on_shutdown();
        let chunk = [0u8; 8 * 1024];
        let mut read = 0;
        while t.link.wants_read() {
            t.link.on_read(node.now(), &chunk, &|| None);
            read += chunk.len();
            assert!(read <= LINGER_BYTES, "read past the linger budget");
        }
        assert_eq!(read, LINGER_BYTES);
        t.link.on_flushed();
        t.poll();
        assert!(
            t.done,
            "done once the budget is spent, before the linger deadline"
        );
    }
}
