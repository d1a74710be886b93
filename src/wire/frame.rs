//! Framing: `u32` big-endian length + body. The length is checked against the
//! maximum before a single byte is reserved for the body.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Splits one frame off the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed; in that case, and only once the
/// length prefix is known to be acceptable, `buf` has reserved room for the rest
/// of the frame.
///
/// # Errors
/// [`FrameError::TooLarge`] when the prefix exceeds `max`; nothing is reserved.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    match frame_len(buf, max)? {
        Some(total) if buf.len() >= total => {
            buf.advance(LEN_PREFIX);
            Ok(Some(buf.split_to(total - LEN_PREFIX).freeze()))
        }
        Some(total) => {
            buf.reserve(total - buf.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The total length (prefix included) of the frame at the front of `data`, once
/// its prefix is complete.
///
/// # Errors
/// [`FrameError::TooLarge`] when the prefix exceeds `max`.
pub fn frame_len(data: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = data.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(LEN_PREFIX + len))
}

/// Appends `msg` as one frame to `dst`.
pub fn encode_frame<M: Message>(msg: &M, dst: &mut BytesMut) {
    let len = msg.encoded_len();
    dst.reserve(LEN_PREFIX + len);
    dst.put_u32(len as u32);
    // Encoding into a BytesMut with enough reserved room cannot fail.
    let _ = msg.encode(dst);
}

/// Encodes `msg` as one frame in its own buffer.
pub fn frame_bytes<M: Message>(msg: &M) -> Bytes {
    let mut b = BytesMut::with_capacity(LEN_PREFIX + msg.encoded_len());
    encode_frame(msg, &mut b);
    b.freeze()
}

/// The upper bound of [`encode_push_header`]'s output.
pub const PUSH_HEADER_MAX: usize = LEN_PREFIX + 1 + 10 + 1 + 10;

/// A push encoded once and shared by every recipient.
///
/// `body` holds the encoded `Push` fields 2.. (message id, payload, source, room).
/// Each recipient's frame is a small header from [`encode_push_header`] (length
/// prefix, `ServerFrame.push` tag and length, `Push.seq`) followed by these same
/// bytes: protobuf allows fields in any order, so the result is one valid
/// `ServerFrame`. Fan-out clones the `Bytes` handle, never the payload.
///
/// One pointer wide, so a queued push costs a session 8 bytes for it.
#[derive(Clone, Debug)]
pub struct SharedPush(std::sync::Arc<PushData>);

/// What a [`SharedPush`] shares.
#[derive(Debug)]
pub struct PushData {
    pub body: Bytes,
    /// The lane (also encoded in `body`): it picks the session queue.
    pub lane: super::pb::Lane,
    /// The message id, when the upstream asked for delivery reports.
    pub report: Option<std::sync::Arc<str>>,
    /// When the gateway took the push in (the session core's clock, tokio's):
    /// `tether_push_wait_seconds` counts from here to the first write.
    pub arrived: std::time::Instant,
    /// The body's charge against the node's replay budget: taken by the
    /// first session that queues the push, given back when the push is
    /// dropped, so that a body held by many sessions counts once.
    pub charge: crate::budget::BodyCharge,
}

impl std::ops::Deref for SharedPush {
    type Target = PushData;
    fn deref(&self) -> &PushData {
        &self.0
    }
}

impl SharedPush {
    /// Encodes the shared part of an interactive push once, without reports.
    pub fn new(message_id: &str, payload: &[u8], source: &str, room: &str) -> Self {
        Self::with(
            message_id,
            payload,
            source,
            room,
            super::pb::Lane::Interactive,
            false,
        )
    }

    /// Encodes the shared part of a push once: the `Push` message without
    /// its `seq` (each recipient's header carries it). Encoded field by
    /// field straight from the borrowed parts, in field order and omitting
    /// empty fields as proto3 does, so the payload is copied once, into the
    /// shared body (building a `pb::Push` first would copy it twice and
    /// allocate three strings).
    pub fn with(
        message_id: &str,
        payload: &[u8],
        source: &str,
        room: &str,
        lane: super::pb::Lane,
        report: bool,
    ) -> Self {
        use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
        let fields: [(u32, &[u8]); 4] = [
            (2, message_id.as_bytes()),
            (3, payload),
            (4, source.as_bytes()),
            (5, room.as_bytes()),
        ];
        let lane_num = lane as i32;
        let len = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(tag, v)| key_len(*tag) + encoded_len_varint(v.len() as u64) + v.len())
            .sum::<usize>()
            + if lane_num == 0 {
                0
            } else {
                key_len(6) + encoded_len_varint(u64::from(lane_num as u32))
            };
        let mut b = BytesMut::with_capacity(len);
        for (tag, v) in fields {
            if !v.is_empty() {
                encode_key(tag, WireType::LengthDelimited, &mut b);
                encode_varint(v.len() as u64, &mut b);
                b.put_slice(v);
            }
        }
        if lane_num != 0 {
            encode_key(6, WireType::Varint, &mut b);
            // A non-negative enum value: its varint is that of the u64.
            encode_varint(u64::from(lane_num as u32), &mut b);
        }
        debug_assert_eq!(b.len(), len);
        Self(std::sync::Arc::new(PushData {
            body: b.freeze(),
            lane,
            report: report.then(|| std::sync::Arc::from(message_id)),
            arrived: tokio::time::Instant::now().into_std(),
            charge: crate::budget::BodyCharge::default(),
        }))
    }

    /// A push encoded by another node: `body` as [`SharedPush::with`] made
    /// it there, queued as it is (the cluster bus hands over a slice of the
    /// received message, so nothing is copied).
    pub fn from_body(body: Bytes, lane: super::pb::Lane, report: Option<&str>) -> Self {
        Self(std::sync::Arc::new(PushData {
            body,
            lane,
            report: report.map(std::sync::Arc::from),
            arrived: tokio::time::Instant::now().into_std(),
            charge: crate::budget::BodyCharge::default(),
        }))
    }

    /// Bytes this push occupies on the wire for one recipient, at most.
    pub fn wire_len(&self) -> usize {
        PUSH_HEADER_MAX + self.body.len()
    }
}

/// Writes the per-recipient header of a shared push: the frame length, the
/// `ServerFrame.push` field tag and length, and `Push.seq`.
///
/// Built on the stack and appended in one copy: it runs once per recipient
/// of every push, and prost's varint writer checks the buffer's room byte
/// by byte (about 45 instructions a push in a 100-session broadcast).
pub fn encode_push_header(seq: u64, body_len: usize, dst: &mut impl BufMut) {
    const PUSH_SEQ_TAG: u8 = 1 << 3; // field 1, varint
    const FRAME_PUSH_TAG: u8 = (5 << 3) | 2; // ServerFrame field 5, length-delimited
    fn varint(mut v: u64, out: &mut [u8; PUSH_HEADER_MAX], at: &mut usize) {
        while v >= 0x80 {
            out[*at] = (v as u8) | 0x80;
            v >>= 7;
            *at += 1;
        }
        out[*at] = v as u8;
        *at += 1;
    }
    let inner = 1 + prost::encoding::encoded_len_varint(seq) + body_len;
    let frame = 1 + prost::encoding::encoded_len_varint(inner as u64) + inner;
    let mut h = [0u8; PUSH_HEADER_MAX];
    h[..LEN_PREFIX].copy_from_slice(&(frame as u32).to_be_bytes());
    h[LEN_PREFIX] = FRAME_PUSH_TAG;
    let mut at = LEN_PREFIX + 1;
    varint(inner as u64, &mut h, &mut at);
    h[at] = PUSH_SEQ_TAG;
    at += 1;
    varint(seq, &mut h, &mut at);
    dst.put_slice(&h[..at]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::pb;

    #[test]
    fn roundtrip_and_partial() {
        let msg = pb::ClientFrame {
            request_id: 7,
            body: Some(pb::client_frame::Body::Ping(pb::Ping { client_time_ms: 9 })),
        };
        let mut all = BytesMut::new();
        encode_frame(&msg, &mut all);
        encode_frame(&msg, &mut all);
        let bytes = all.freeze();
        // Feed one byte at a time: every prefix short of a frame yields None.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in bytes.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode_frame(&mut buf, 1024).unwrap() {
                got.push(pb::ClientFrame::decode(f).unwrap());
            }
        }
        assert_eq!(got, vec![msg.clone(), msg]);
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_is_refused_before_reserving() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        let cap = buf.capacity();
        assert_eq!(
            decode_frame(&mut buf, 65536),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: 65536
            })
        );
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn shared_push_decodes_as_server_frame() {
        let shared = SharedPush::new("m-1", b"hello", "chat", "lobby");
        for seq in [1u64, 127, 128, 300, u64::MAX] {
            let mut b = BytesMut::new();
            encode_push_header(seq, shared.body.len(), &mut b);
            assert!(b.len() <= PUSH_HEADER_MAX);
            b.extend_from_slice(&shared.body);
            let f = decode_frame(&mut b, 1 << 20).unwrap().unwrap();
            assert!(b.is_empty());
            let frame = pb::ServerFrame::decode(f).unwrap();
            let expected = pb::ServerFrame {
                request_id: 0,
                body: Some(pb::server_frame::Body::Push(pb::Push {
                    seq,
                    message_id: "m-1".into(),
                    payload: Bytes::from_static(b"hello"),
                    source: "chat".into(),
                    room: "lobby".into(),
                    lane: 0,
                })),
            };
            assert_eq!(frame, expected);
        }
    }

    #[test]
    fn a_shared_push_body_is_what_prost_encodes() {
        let big = vec![7u8; 300];
        for (id, payload, source, room, lane) in [
            ("m-1", &b"hello"[..], "chat", "lobby", pb::Lane::Interactive),
            ("", &b""[..], "", "", pb::Lane::Interactive),
            ("x", &big[..], "", "r", pb::Lane::Bulk),
            ("id", &b"\0"[..], "s", "", pb::Lane::Bulk),
        ] {
            let shared = SharedPush::with(id, payload, source, room, lane, false);
            let expected = pb::Push {
                seq: 0,
                message_id: id.into(),
                payload: Bytes::copy_from_slice(payload),
                source: source.into(),
                room: room.into(),
                lane: lane as i32,
            }
            .encode_to_vec();
            assert_eq!(&shared.body[..], &expected[..], "{id:?} {room:?} {lane:?}");
        }
    }
}
