//! WebSocket framing (RFC 6455), sans-IO: the messages of Tether's
//! WebSocket transport, turned into the length-prefixed frame stream every
//! other transport carries, and back.
//!
//! One Tether frame travels as one *binary* WebSocket message, with no
//! length prefix inside: the message is already delimited. [`Decoder`]
//! unmasks a peer's messages and writes each as `u32` big-endian length
//! then body, which is what the link's frame codec reads from TCP; it
//! answers nothing itself, but hands control frames (Ping, Pong, Close) to
//! its caller. [`Framer`] does the reverse for the other direction: it
//! reads the link's length-prefixed frames and writes each as one binary
//! message. [`client_message`] frames a message the way a client must
//! (masked), for the load tool and tests.
//!
//! Hand-written rather than tungstenite, for memory: tungstenite allocates
//! a 128 KiB read buffer per connection and holds its buffers while the
//! connection is idle, and an idle connection here must hold no buffer and
//! park (transport/park.rs) with nothing but its socket and link. This
//! decoder's state is a few words while no message is in flight; bytes are
//! unmasked straight into the caller's buffer, and a buffer exists only
//! while a fragmented message or a control frame is partly in.
//!
//! Like [`super::decode_frame`], it checks every length against its bound
//! before it reserves memory, and nothing a peer sends can make it panic.
//! It does no IO and never reads the clock.

/// The subprotocol a client must offer (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "tether.v1";
/// The path of the upgrade request.
pub const PATH: &str = "/tether";
/// Most frames (a first one and its continuations) one message may take.
/// A browser sends a message as one frame; a flood of tiny fragments is an
/// attack on the CPU, refused with [`CloseCode::Policy`].
pub const MAX_FRAGMENTS: u32 = 64;
/// Most bytes of a control frame's payload (RFC 6455, 5.5).
pub const MAX_CONTROL: usize = 125;
/// RFC 6455's GUID, appended to the key for `Sec-WebSocket-Accept`.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key` (RFC 6455,
/// 4.2.2): base64 of the SHA-1 of the key and the GUID. SHA-1 is what the
/// RFC names (a handshake check, not a security property).
pub fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The close codes this transport sends (RFC 6455, 7.4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u16)]
pub enum CloseCode {
    /// The session ended (the gateway closes after its Tether `Close`), or
    /// the answer to a peer's Close without a code.
    #[error("normal closure")]
    Normal = 1000,
    /// A frame broke RFC 6455: an unmasked client frame, a reserved bit, an
    /// unknown opcode, a continuation with no message begun, a new message
    /// inside a fragmented one, a fragmented or oversized control frame, a
    /// malformed Close payload.
    #[error("protocol error")]
    Protocol = 1002,
    /// A text message: Tether frames are binary.
    #[error("text messages are not accepted")]
    Unsupported = 1003,
    /// A message in more than [`MAX_FRAGMENTS`] frames.
    #[error("too many fragments in one message")]
    Policy = 1008,
    /// A message longer than the frame size limit.
    #[error("message too big")]
    TooBig = 1009,
}

impl CloseCode {
    pub fn as_u16(self) -> u16 {
        self as u16
    }
}

/// A control frame the decoder read; the caller answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// Answer with a Pong carrying the same payload.
    Ping(Vec<u8>),
    Pong,
    /// The peer closes, with the code it gave (if any): answer with a
    /// Close, then treat the input as ended.
    Close(Option<u16>),
}

/// What one [`Decoder::decode`] call did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Input bytes consumed.
    pub used: usize,
    /// Bytes of the length-prefixed stream written to the output.
    pub wrote: usize,
    /// A control frame that came, if any: the call stops after it.
    pub control: Option<Control>,
}

/// Where the decoder is in the peer's byte stream.
#[derive(Debug, Clone, Copy)]
enum St {
    /// Reading a frame header (`head`, `head_len` bytes so far).
    Head,
    /// A single-frame binary message: its length prefix (`pre` bytes of it
    /// written so far), then its payload, unmasked into the output.
    Stream {
        pre: u8,
        len: u32,
        left: u32,
        mask: [u8; 4],
        pos: u8,
    },
    /// A fragment's payload, appended to the message being assembled.
    Fragment {
        left: u32,
        mask: [u8; 4],
        pos: u8,
        fin: bool,
    },
    /// A control frame's payload, into `control`.
    Control {
        op: u8,
        left: u8,
        mask: [u8; 4],
        pos: u8,
    },
    /// An assembled message going out: `assembly` from `at`.
    Emit { at: usize },
}

/// Decodes a peer's WebSocket frames into the length-prefixed frame stream.
#[derive(Debug)]
pub struct Decoder {
    /// A server expects masked frames (a client's), a client unmasked ones.
    masked: bool,
    max_message: u32,
    st: St,
    head: [u8; 14],
    head_len: u8,
    /// A fragmented message being assembled: four bytes for its length
    /// prefix, then the payload so far. Empty (no allocation) otherwise.
    assembly: Vec<u8>,
    /// Frames of the fragmented message so far (0: none begun).
    fragments: u32,
    /// A control frame's payload as far as it came.
    control: Vec<u8>,
    /// The refusal, once there was one: every later call returns it.
    failed: Option<CloseCode>,
}

impl Decoder {
    /// A server's decoder (client frames must be masked).
    pub fn server(max_message: u32) -> Self {
        Self::new(true, max_message)
    }

    /// A client's decoder (server frames must not be masked).
    pub fn client(max_message: u32) -> Self {
        Self::new(false, max_message)
    }

    fn new(masked: bool, max_message: u32) -> Self {
        Self {
            masked,
            max_message,
            st: St::Head,
            head: [0; 14],
            head_len: 0,
            assembly: Vec::new(),
            fragments: 0,
            control: Vec::new(),
            failed: None,
        }
    }

    pub fn max_message(&self) -> u32 {
        self.max_message
    }

    /// Whether nothing is in flight: between messages, no frame header
    /// partly read, no buffer held.
    pub fn is_idle(&self) -> bool {
        matches!(self.st, St::Head)
            && self.head_len == 0
            && self.fragments == 0
            && self.assembly.capacity() == 0
            && self.control.capacity() == 0
    }

    /// Consumes `input` and writes the length-prefixed stream into `out`,
    /// until the input is used up, `out` is full, or a control frame came
    /// (returned in [`Progress::control`]).
    ///
    /// # Errors
    /// The close code for a frame this transport refuses: at once, or, when
    /// this call had written bytes of the frames before it, with the next
    /// call. Every call after a refusal returns it again.
    pub fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<Progress, CloseCode> {
        if let Some(code) = self.failed {
            return Err(code);
        }
        let mut p = Progress::default();
        match self.step(input, out, &mut p) {
            Ok(()) => Ok(p),
            // What this call wrote came before the refused frame: it goes
            // out first, and the refusal with the next call, so that where
            // the input was split never changes what the link receives.
            Err(code) if p.wrote > 0 => {
                self.failed = Some(code);
                Ok(p)
            }
            Err(code) => {
                self.failed = Some(code);
                Err(code)
            }
        }
    }

    fn step(&mut self, input: &[u8], out: &mut [u8], p: &mut Progress) -> Result<(), CloseCode> {
        loop {
            match self.st {
                St::Head => {
                    if p.used >= input.len() {
                        return Ok(());
                    }
                    if let Some(c) = self.head(input, p)? {
                        p.control = Some(c);
                        return Ok(());
                    }
                }
                St::Stream {
                    mut pre,
                    len,
                    mut left,
                    mask,
                    mut pos,
                } => {
                    let prefix = len.to_be_bytes();
                    while pre < 4 && p.wrote < out.len() {
                        out[p.wrote] = prefix[usize::from(pre)];
                        p.wrote += 1;
                        pre += 1;
                    }
                    let n = (left as usize)
                        .min(input.len() - p.used)
                        .min(out.len() - p.wrote);
                    unmask(
                        &input[p.used..p.used + n],
                        &mut out[p.wrote..p.wrote + n],
                        mask,
                        &mut pos,
                    );
                    p.used += n;
                    p.wrote += n;
                    left -= n as u32;
                    if pre == 4 && left == 0 {
                        self.st = St::Head;
                        continue;
                    }
                    self.st = St::Stream {
                        pre,
                        len,
                        left,
                        mask,
                        pos,
                    };
                    return Ok(());
                }
                St::Fragment {
                    mut left,
                    mask,
                    mut pos,
                    fin,
                } => {
                    let n = (left as usize).min(input.len() - p.used);
                    let at = self.assembly.len();
                    self.assembly.extend_from_slice(&input[p.used..p.used + n]);
                    unmask_in_place(&mut self.assembly[at..], mask, &mut pos);
                    p.used += n;
                    left -= n as u32;
                    if left > 0 {
                        self.st = St::Fragment {
                            left,
                            mask,
                            pos,
                            fin,
                        };
                        return Ok(());
                    }
                    if fin {
                        let len = (self.assembly.len() - 4) as u32;
                        self.assembly[..4].copy_from_slice(&len.to_be_bytes());
                        self.fragments = 0;
                        self.st = St::Emit { at: 0 };
                    } else {
                        self.st = St::Head;
                    }
                }
                St::Control {
                    op,
                    mut left,
                    mask,
                    mut pos,
                } => {
                    let n = usize::from(left).min(input.len() - p.used);
                    let at = self.control.len();
                    self.control.extend_from_slice(&input[p.used..p.used + n]);
                    unmask_in_place(&mut self.control[at..], mask, &mut pos);
                    p.used += n;
                    left -= n as u8;
                    if left > 0 {
                        self.st = St::Control {
                            op,
                            left,
                            mask,
                            pos,
                        };
                        return Ok(());
                    }
                    self.st = St::Head;
                    let payload = std::mem::take(&mut self.control);
                    p.control = Some(control(op, payload)?);
                    return Ok(());
                }
                St::Emit { at } => {
                    let n = (self.assembly.len() - at).min(out.len() - p.wrote);
                    out[p.wrote..p.wrote + n].copy_from_slice(&self.assembly[at..at + n]);
                    p.wrote += n;
                    if at + n < self.assembly.len() {
                        self.st = St::Emit { at: at + n };
                        return Ok(());
                    }
                    self.assembly = Vec::new();
                    self.st = St::Head;
                }
            }
        }
    }

    /// Reads header bytes; once the header is whole, checks it and moves to
    /// its payload. A control frame with no payload is returned at once.
    fn head(&mut self, input: &[u8], p: &mut Progress) -> Result<Option<Control>, CloseCode> {
        // The first two bytes say how long the header is.
        let need = |h: &[u8; 14], have: u8| -> usize {
            if have < 2 {
                return 2;
            }
            let ext = match h[1] & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            2 + ext + if h[1] & 0x80 != 0 { 4 } else { 0 }
        };
        loop {
            let want = need(&self.head, self.head_len);
            if usize::from(self.head_len) >= want {
                break;
            }
            if p.used >= input.len() {
                return Ok(None);
            }
            let n = (want - usize::from(self.head_len)).min(input.len() - p.used);
            let at = usize::from(self.head_len);
            self.head[at..at + n].copy_from_slice(&input[p.used..p.used + n]);
            self.head_len += n as u8;
            p.used += n;
            if self.head_len == 2 {
                self.check_first_two()?;
            }
        }
        let h = self.head;
        let hl = usize::from(self.head_len);
        self.head_len = 0;
        let fin = h[0] & 0x80 != 0;
        let op = h[0] & 0x0F;
        let len: u64 = match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => {
                let l = u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]);
                if l >> 63 != 0 {
                    return Err(CloseCode::Protocol);
                }
                l
            }
            l => u64::from(l),
        };
        let mask = if self.masked {
            [h[hl - 4], h[hl - 3], h[hl - 2], h[hl - 1]]
        } else {
            [0; 4]
        };
        if op >= OP_CLOSE {
            // check_first_two bounded it to MAX_CONTROL.
            let left = len as u8;
            if left == 0 {
                return control(op, Vec::new()).map(Some);
            }
            self.control = Vec::with_capacity(usize::from(left));
            self.st = St::Control {
                op,
                left,
                mask,
                pos: 0,
            };
            return Ok(None);
        }
        let so_far = self.assembly.len().saturating_sub(4) as u64;
        if so_far + len > u64::from(self.max_message) {
            return Err(CloseCode::TooBig);
        }
        // Bounded by max_message (a u32) just above.
        let len = len as u32;
        if op == OP_BINARY && fin {
            self.st = St::Stream {
                pre: 0,
                len,
                left: len,
                mask,
                pos: 0,
            };
            return Ok(None);
        }
        // A fragment: the first of a message, or a continuation.
        self.fragments += 1;
        if self.fragments > MAX_FRAGMENTS {
            return Err(CloseCode::Policy);
        }
        if op == OP_BINARY {
            self.assembly = Vec::with_capacity(4 + len as usize);
            self.assembly.extend_from_slice(&[0; 4]);
        } else {
            self.assembly.reserve(len as usize);
        }
        self.st = St::Fragment {
            left: len,
            mask,
            pos: 0,
            fin,
        };
        // An empty fragment finishes on the decoder's next turn.
        Ok(None)
    }

    /// The checks the first two header bytes allow, before any more is read.
    fn check_first_two(&self) -> Result<(), CloseCode> {
        let (b0, b1) = (self.head[0], self.head[1]);
        if b0 & 0x70 != 0 {
            // A reserved bit: no extension is negotiated.
            return Err(CloseCode::Protocol);
        }
        if (b1 & 0x80 != 0) != self.masked {
            return Err(CloseCode::Protocol);
        }
        let fin = b0 & 0x80 != 0;
        let in_message = self.fragments > 0;
        match b0 & 0x0F {
            OP_TEXT => Err(CloseCode::Unsupported),
            OP_BINARY if in_message => Err(CloseCode::Protocol),
            OP_CONTINUATION if !in_message => Err(CloseCode::Protocol),
            OP_BINARY | OP_CONTINUATION => Ok(()),
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || usize::from(b1 & 0x7F) > MAX_CONTROL {
                    Err(CloseCode::Protocol)
                } else {
                    Ok(())
                }
            }
            _ => Err(CloseCode::Protocol),
        }
    }
}

/// A whole control frame as a [`Control`].
fn control(op: u8, payload: Vec<u8>) -> Result<Control, CloseCode> {
    match op {
        OP_PING => Ok(Control::Ping(payload)),
        OP_PONG => Ok(Control::Pong),
        _ => match payload.len() {
            0 => Ok(Control::Close(None)),
            1 => Err(CloseCode::Protocol),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
                if !valid || std::str::from_utf8(&payload[2..]).is_err() {
                    return Err(CloseCode::Protocol);
                }
                Ok(Control::Close(Some(code)))
            }
        },
    }
}

fn unmask(src: &[u8], dst: &mut [u8], mask: [u8; 4], pos: &mut u8) {
    let mut k = usize::from(*pos);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s ^ mask[k & 3];
        k += 1;
    }
    *pos = (k & 3) as u8;
}

fn unmask_in_place(buf: &mut [u8], mask: [u8; 4], pos: &mut u8) {
    let mut k = usize::from(*pos);
    for b in buf.iter_mut() {
        *b ^= mask[k & 3];
        k += 1;
    }
    *pos = (k & 3) as u8;
}

/// Writes a frame header: FIN set, `op`, the payload length, and the mask
/// key if one is given. At most 14 bytes.
pub fn write_header(out: &mut Vec<u8>, op: u8, len: usize, mask: Option<[u8; 4]>) {
    let m = if mask.is_some() { 0x80 } else { 0 };
    out.push(0x80 | op);
    if len < 126 {
        out.push(m | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(k) = mask {
        out.extend_from_slice(&k);
    }
}

/// A server's Pong answering a Ping's payload.
pub fn pong(out: &mut Vec<u8>, payload: &[u8]) {
    let payload = &payload[..payload.len().min(MAX_CONTROL)];
    write_header(out, OP_PONG, payload.len(), None);
    out.extend_from_slice(payload);
}

/// A server's Close with `code` (no reason text).
pub fn close(out: &mut Vec<u8>, code: u16) {
    write_header(out, OP_CLOSE, 2, None);
    out.extend_from_slice(&code.to_be_bytes());
}

/// A client's frame: one binary message holding `body` (one Tether frame
/// without its length prefix), masked with `mask`.
pub fn client_message(out: &mut Vec<u8>, body: &[u8], mask: [u8; 4]) {
    client_frame(out, OP_BINARY, body, mask);
}

/// A client's frame of any opcode, masked with `mask` (FIN set).
pub fn client_frame(out: &mut Vec<u8>, op: u8, body: &[u8], mask: [u8; 4]) {
    write_header(out, op, body.len(), Some(mask));
    let at = out.len();
    out.extend_from_slice(body);
    let mut pos = 0;
    unmask_in_place(&mut out[at..], mask, &mut pos);
}

/// The opcodes, for clients and tests that build frames by hand.
pub mod op {
    pub const CONTINUATION: u8 = super::OP_CONTINUATION;
    pub const TEXT: u8 = super::OP_TEXT;
    pub const BINARY: u8 = super::OP_BINARY;
    pub const CLOSE: u8 = super::OP_CLOSE;
    pub const PING: u8 = super::OP_PING;
    pub const PONG: u8 = super::OP_PONG;
}

/// Turns the link's length-prefixed frames into binary messages, one each,
/// unmasked (a server's). Its state is the frame being turned: a prefix
/// partly read, or the body bytes still to come.
#[derive(Debug, Default, Clone, Copy)]
pub struct Framer {
    prefix: [u8; 4],
    got: u8,
    left: u32,
    /// A client's: the current message's mask key, and where in it.
    mask: [u8; 4],
    pos: u8,
}

impl Framer {
    /// Between frames: no prefix partly read, no body owed. A control
    /// frame may go out only here, between messages.
    pub fn at_boundary(&self) -> bool {
        self.left == 0
    }

    /// Nothing partly read at all.
    pub fn is_idle(&self) -> bool {
        self.left == 0 && self.got == 0
    }

    /// Body bytes of the current frame still to come.
    pub fn body_left(&self) -> usize {
        self.left as usize
    }

    /// Reads prefix bytes from `input` (when between bodies): returns how
    /// many it took; once a prefix is whole, the message header goes into
    /// `out`.
    pub fn take_prefix(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut used = 0;
        while self.left == 0 && used < input.len() {
            let n = (4 - usize::from(self.got)).min(input.len() - used);
            let at = usize::from(self.got);
            self.prefix[at..at + n].copy_from_slice(&input[used..used + n]);
            self.got += n as u8;
            used += n;
            if self.got == 4 {
                self.got = 0;
                let len = u32::from_be_bytes(self.prefix);
                write_header(out, OP_BINARY, len as usize, None);
                self.left = len;
            }
        }
        used
    }

    /// `n` body bytes went out (at most [`Framer::body_left`]).
    pub fn body_sent(&mut self, n: usize) {
        self.left -= n.min(self.left as usize) as u32;
    }

    /// A client's [`Framer::feed`]: each message masked with a key from
    /// `key` (RFC 6455 wants a fresh, unpredictable one per frame).
    pub fn feed_masked(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        key: &mut impl FnMut() -> [u8; 4],
    ) {
        while !input.is_empty() {
            if self.left == 0 {
                let n = (4 - usize::from(self.got)).min(input.len());
                let at = usize::from(self.got);
                self.prefix[at..at + n].copy_from_slice(&input[..n]);
                self.got += n as u8;
                input = &input[n..];
                if self.got == 4 {
                    self.got = 0;
                    let len = u32::from_be_bytes(self.prefix);
                    self.mask = key();
                    self.pos = 0;
                    write_header(out, OP_BINARY, len as usize, Some(self.mask));
                    self.left = len;
                }
                continue;
            }
            let n = self.body_left().min(input.len());
            let at = out.len();
            out.extend_from_slice(&input[..n]);
            unmask_in_place(&mut out[at..], self.mask, &mut self.pos);
            self.body_sent(n);
            input = &input[n..];
        }
    }

    /// Turns all of `input` into `out`: headers, and bodies copied.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            if self.left == 0 {
                let used = self.take_prefix(input, out);
                input = &input[used..];
                continue;
            }
            let n = self.body_left().min(input.len());
            out.extend_from_slice(&input[..n]);
            self.body_sent(n);
            input = &input[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    /// Decodes everything, in chunks of `step` input bytes and an output of
    /// `room` bytes; the stream and the controls, or the first error.
    fn run(
        input: &[u8],
        step: usize,
        room: usize,
        max: u32,
    ) -> Result<(Vec<u8>, Vec<Control>), CloseCode> {
        let mut d = Decoder::server(max);
        let mut stream = Vec::new();
        let mut controls = Vec::new();
        let mut at = 0;
        let mut out = vec![0; room];
        while at < input.len() {
            let end = (at + step).min(input.len());
            let mut chunk = &input[at..end];
            loop {
                let p = d.decode(chunk, &mut out)?;
                stream.extend_from_slice(&out[..p.wrote]);
                chunk = &chunk[p.used..];
                if let Some(c) = p.control {
                    controls.push(c);
                    continue;
                }
                if chunk.is_empty() && p.wrote < out.len() {
                    break;
                }
            }
            at = end;
        }
        // Drain what is assembled but not yet out.
        loop {
            let p = d.decode(&[], &mut out)?;
            stream.extend_from_slice(&out[..p.wrote]);
            if p.wrote == 0 {
                break;
            }
        }
        Ok((stream, controls))
    }

    fn prefixed(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn frame(fin: bool, op: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        client_frame(&mut v, op, body, MASK);
        if !fin {
            v[0] &= 0x7F;
        }
        v
    }

    #[test]
    fn a_binary_message_becomes_one_prefixed_frame_in_any_split() {
        let body: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let mut input = Vec::new();
        client_message(&mut input, &body, MASK);
        client_message(&mut input, b"", MASK);
        client_message(&mut input, &[7; 70_000], MASK);
        let mut want = prefixed(&body);
        want.extend(prefixed(b""));
        want.extend(prefixed(&[7; 70_000]));
        for (step, room) in [(1, 1), (3, 7), (1000, 5), (usize::MAX, 8192)] {
            let (got, c) = run(&input, step, room, 100_000).expect("valid");
            assert_eq!(got, want, "step {step} room {room}");
            assert!(c.is_empty());
        }
    }

    /// What the fuzzer found: a message, then a refused frame, read in
    /// one call, lost the message (the refusal came alone), while read in
    /// two it came out first. The link now gets the message either way,
    /// then the refusal.
    #[test]
    fn the_frames_before_a_refused_one_come_out_in_any_split() {
        let mut input = Vec::new();
        client_message(&mut input, &[8], MASK);
        input.extend_from_slice(&[0x82, 0x01, 0x08]); // unmasked: refused
        for step in [1, 2, 7, usize::MAX] {
            let mut d = Decoder::server(1000);
            let mut got = Vec::new();
            let mut out = [0u8; 64];
            let mut refused = None;
            'feed: for chunk in input.chunks(step.min(input.len())) {
                let mut chunk = chunk;
                loop {
                    match d.decode(chunk, &mut out) {
                        Ok(p) => {
                            got.extend_from_slice(&out[..p.wrote]);
                            chunk = &chunk[p.used..];
                            if chunk.is_empty() && p.wrote == 0 {
                                break;
                            }
                        }
                        Err(e) => {
                            refused = Some(e);
                            break 'feed;
                        }
                    }
                }
            }
            assert_eq!(got, prefixed(&[8]), "step {step}");
            assert_eq!(refused, Some(CloseCode::Protocol), "step {step}");
            assert_eq!(
                d.decode(&[], &mut out),
                Err(CloseCode::Protocol),
                "it stays refused"
            );
        }
    }

    #[test]
    fn fragments_are_assembled_and_controls_may_interleave() {
        let mut input = frame(false, op::BINARY, b"he");
        input.extend(frame(true, op::PING, b"p1"));
        input.extend(frame(false, op::CONTINUATION, b""));
        input.extend(frame(true, op::CONTINUATION, b"llo"));
        input.extend(frame(true, op::CLOSE, &[0x03, 0xE8, b'b']));
        for step in [1, 2, usize::MAX] {
            let (got, c) = run(&input, step, 3, 100).expect("valid");
            assert_eq!(got, prefixed(b"hello"), "step {step}");
            assert_eq!(
                c,
                [Control::Ping(b"p1".to_vec()), Control::Close(Some(1000))]
            );
        }
    }

    #[test]
    fn each_refusal_has_its_code() {
        let unmasked = {
            let mut v = Vec::new();
            write_header(&mut v, op::BINARY, 1, None);
            v.push(0);
            v
        };
        let cases: Vec<(&str, Vec<u8>, CloseCode)> = vec![
            ("unmasked", unmasked, CloseCode::Protocol),
            ("text", frame(true, op::TEXT, b"hi"), CloseCode::Unsupported),
            (
                "reserved bit",
                {
                    let mut v = frame(true, op::BINARY, b"x");
                    v[0] |= 0x40;
                    v
                },
                CloseCode::Protocol,
            ),
            ("unknown opcode", frame(true, 0x3, b""), CloseCode::Protocol),
            (
                "lone continuation",
                frame(true, op::CONTINUATION, b"x"),
                CloseCode::Protocol,
            ),
            (
                "new message inside one",
                {
                    let mut v = frame(false, op::BINARY, b"x");
                    v.extend(frame(true, op::BINARY, b"y"));
                    v
                },
                CloseCode::Protocol,
            ),
            (
                "fragmented ping",
                frame(false, op::PING, b""),
                CloseCode::Protocol,
            ),
            (
                "long ping",
                frame(true, op::PING, &[0; 126]),
                CloseCode::Protocol,
            ),
            (
                "oversized",
                frame(true, op::BINARY, &[0; 101]),
                CloseCode::TooBig,
            ),
            (
                "oversized in fragments",
                {
                    let mut v = frame(false, op::BINARY, &[0; 60]);
                    v.extend(frame(true, op::CONTINUATION, &[0; 41]));
                    v
                },
                CloseCode::TooBig,
            ),
            (
                "fragment flood",
                {
                    let mut v = frame(false, op::BINARY, b"");
                    for _ in 0..MAX_FRAGMENTS {
                        v.extend(frame(false, op::CONTINUATION, b""));
                    }
                    v
                },
                CloseCode::Policy,
            ),
            (
                "one-byte close",
                frame(true, op::CLOSE, &[3]),
                CloseCode::Protocol,
            ),
            (
                "reserved close code",
                frame(true, op::CLOSE, &[0x03, 0xED]),
                CloseCode::Protocol,
            ),
        ];
        for (name, input, code) in cases {
            for step in [1, usize::MAX] {
                assert_eq!(run(&input, step, 64, 100).map(|_| ()), Err(code), "{name}");
            }
        }
        // A 64-bit length is refused from its header, before any payload.
        let mut huge = vec![0x82, 0xFF];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&MASK);
        assert_eq!(run(&huge, 1, 8, 100).map(|_| ()), Err(CloseCode::TooBig));
        huge[2] = 0x80;
        assert_eq!(run(&huge, 1, 8, 100).map(|_| ()), Err(CloseCode::Protocol));
    }

    #[test]
    fn an_idle_decoder_holds_nothing() {
        let mut d = Decoder::server(100);
        assert!(d.is_idle());
        let mut input = frame(false, op::BINARY, b"ab");
        let mut out = [0; 16];
        let p = d.decode(&input, &mut out).expect("valid");
        assert_eq!(p.wrote, 0);
        assert!(!d.is_idle(), "a message begun");
        input = frame(true, op::CONTINUATION, b"c");
        let p = d.decode(&input, &mut out).expect("valid");
        assert_eq!(&out[..p.wrote], &prefixed(b"abc")[..]);
        assert!(d.is_idle(), "the assembly is freed once out");
    }

    #[test]
    fn the_framer_turns_prefixed_frames_into_messages_in_any_split() {
        let mut stream = prefixed(b"hello");
        stream.extend(prefixed(&[9; 300]));
        stream.extend(prefixed(&[8; 70_000]));
        let mut want = Vec::new();
        write_header(&mut want, op::BINARY, 5, None);
        want.extend_from_slice(b"hello");
        write_header(&mut want, op::BINARY, 300, None);
        want.extend_from_slice(&[9; 300]);
        write_header(&mut want, op::BINARY, 70_000, None);
        want.extend_from_slice(&[8; 70_000]);
        for step in [1, 3, 4, 5, 1000, usize::MAX] {
            let mut f = Framer::default();
            let mut out = Vec::new();
            for chunk in stream.chunks(step.min(stream.len())) {
                f.feed(chunk, &mut out);
            }
            assert!(f.is_idle());
            assert_eq!(out, want, "step {step}");
        }
        // What a client decoder makes of it is the stream again.
        let mut d = Decoder::client(100_000);
        let mut out = vec![0; 100_000];
        let mut got = Vec::new();
        let mut input = &want[..];
        while !input.is_empty() {
            let p = d.decode(input, &mut out).expect("valid");
            got.extend_from_slice(&out[..p.wrote]);
            input = &input[p.used..];
        }
        assert_eq!(got, stream);
    }

    proptest::proptest! {
        /// What the fuzz target checks, on any bytes: fed whole into a large
        /// output or in chunks into a small one, the same stream, controls
        /// and refusal, and nothing over the limit.
        #[test]
        fn any_bytes_decode_the_same_in_any_split(
            stream in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            step in 1usize..64,
            room in 1usize..64,
            max in 0u32..300,
        ) {
            let a = run(&stream, usize::MAX, 1 << 16, max);
            let b = run(&stream, step, room, max);
            proptest::prop_assert_eq!(&a, &b);
            if let Ok((s, _)) = a {
                let mut s = &s[..];
                while s.len() >= 4 {
                    let len = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
                    proptest::prop_assert!(len <= max);
                    s = &s[(4 + len as usize).min(s.len())..];
                }
            }
        }

        /// Valid masked messages, any split: exactly their frames.
        #[test]
        fn valid_messages_come_out_whole(
            bodies in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 1..6),
            frag in 5usize..100, // at most 60 fragments of a 300-byte body
            step in 1usize..50,
        ) {
            let mut input = Vec::new();
            let mut want = Vec::new();
            for b in &bodies {
                want.extend(prefixed(b));
                let pieces: Vec<&[u8]> = if b.is_empty() { vec![&b[..]] } else { b.chunks(frag).collect() };
                for (k, p) in pieces.iter().enumerate() {
                    let op = if k == 0 { op::BINARY } else { op::CONTINUATION };
                    input.extend(frame(k + 1 == pieces.len(), op, p));
                }
            }
            let (got, c) = run(&input, step, 17, 400).expect("valid");
            proptest::prop_assert_eq!(got, want);
            proptest::prop_assert!(c.is_empty());
        }
    }
}
