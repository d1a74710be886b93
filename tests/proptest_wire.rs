//! Property tests of the sans-IO wire codec (`tether::wire`): framing
//! (`decode_frame`, `frame_len`, `encode_frame`) and request validation
//! (`ClientMsg::decode`).
//!
//! - arbitrary bytes, fed whole or in arbitrary chunks, never panic and give the
//!   same frames (and the same error) either way;
//! - `ClientMsg::decode` never panics, on raw garbage or on well-formed envelopes
//!   with out-of-range fields, and always echoes the request id it could read;
//! - valid frames of every kind round-trip through the framing and validation;
//! - a multi-frame stream split at arbitrary points yields the same frames as
//!   the whole stream;
//! - a length prefix above the maximum is refused before the buffer grows, and
//!   an acceptable one reserves room for the whole frame.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use prost::Message;
use tether::wire::{
    decode_frame, encode_frame, frame_len, pb, pb::client_frame::Body, ClientMsg, ClientRequest,
    Code, FrameError, LEN_PREFIX,
};

const MAX: usize = 4096;

// ---------------------------------------------------------------- strategies

/// A string that passes the gateway's id rules: `1..=n` chars, no control
/// characters, at most `4n` bytes.
fn clean(n: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::string::string_regex(&format!("[a-zA-Z0-9._:-]{{1,{n}}}")).unwrap(),
        proptest::string::string_regex(&format!("\\PC{{1,{}}}", n / 4)).unwrap(),
    ]
}

/// A string that may break the rules: empty, too long, control characters.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        ".{0,40}",
        "[a-z\\x00-\\x1f]{0,8}",
        (130usize..300).prop_map(|n| "x".repeat(n)),
        (0usize..600).prop_map(|n| "é".repeat(n / 2)),
    ]
}

fn any_payload() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

/// A `ClientFrame` whose fields are all within range: `ClientMsg::decode` accepts it.
fn valid_frame() -> impl Strategy<Value = pb::ClientFrame> {
    let body = prop_oneof![
        (clean(200), clean(128), any::<i32>(), any::<u32>()).prop_map(|(t, d, p, v)| {
            Body::Login(pb::Login {
                token: t,
                device_id: d,
                platform: p,
                protocol_version: v,
                resume: None,
            })
        }),
        any::<u64>().prop_map(|t| Body::Ping(pb::Ping { client_time_ms: t })),
        (
            clean(64),
            prop_oneof![Just(String::new()), clean(128)],
            any_payload()
        )
            .prop_map(|(c, r, p)| Body::Send(pb::Send {
                client_msg_id: c,
                route: r,
                payload: p,
            })),
        any::<u64>().prop_map(|s| Body::Ack(pb::Ack {
            up_to_seq: s,
            lane: 0,
            ranges: vec![],
        })),
        clean(128).prop_map(|r| Body::Join(pb::Join { room: r })),
        clean(128).prop_map(|r| Body::Leave(pb::Leave { room: r })),
        (any::<i32>(), any_string()).prop_map(|(c, r)| Body::Close(pb::Close {
            code: c,
            reason: r,
            reconnect_to: String::new(),
            reconnect_after_ms: 0,
        })),
    ];
    (any::<u64>(), body).prop_map(|(request_id, body)| pb::ClientFrame {
        request_id,
        body: Some(body),
    })
}

/// A well-formed `ClientFrame` of any kind, fields possibly out of range, body
/// possibly missing.
fn any_frame() -> impl Strategy<Value = pb::ClientFrame> {
    let body = prop_oneof![
        (
            any_string(),
            any_string(),
            any::<i32>(),
            any::<u32>(),
            proptest::option::of((any::<u64>(), any_payload(), any::<u64>()))
        )
            .prop_map(|(t, d, p, v, r)| Body::Login(pb::Login {
                token: t,
                device_id: d,
                platform: p,
                protocol_version: v,
                resume: r.map(|(s, t, l)| pb::Resume {
                    session_id: s,
                    resume_token: t,
                    last_seq: l,
                    last_bulk_seq: l / 2,
                }),
            })),
        any::<u64>().prop_map(|t| Body::Ping(pb::Ping { client_time_ms: t })),
        (any_string(), any_string(), any_payload()).prop_map(|(c, r, p)| Body::Send(pb::Send {
            client_msg_id: c,
            route: r,
            payload: p,
        })),
        any::<u64>().prop_map(|s| Body::Ack(pb::Ack {
            up_to_seq: s,
            lane: 0,
            ranges: vec![],
        })),
        any_string().prop_map(|r| Body::Join(pb::Join { room: r })),
        any_string().prop_map(|r| Body::Leave(pb::Leave { room: r })),
        (any::<i32>(), any_string(), any_string(), any::<u32>()).prop_map(|(c, r, t, a)| {
            Body::Close(pb::Close {
                code: c,
                reason: r,
                reconnect_to: t,
                reconnect_after_ms: a,
            })
        }),
    ];
    (any::<u64>(), proptest::option::weighted(0.95, body))
        .prop_map(|(request_id, body)| pb::ClientFrame { request_id, body })
}

/// Chunk sizes to cut a stream into (cycled).
fn chunking() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(prop_oneof![1usize..=4, 1usize..=64, 1usize..=2048], 1..16)
}

// ------------------------------------------------------------------ helpers

/// Decodes every frame of `data` fed at once; stops at the first error.
fn feed_whole(data: &[u8], max: usize) -> (Vec<Bytes>, Option<FrameError>, usize) {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        match decode_frame(&mut buf, max) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None, buf.len()),
            Err(e) => return (frames, Some(e), buf.len()),
        }
    }
}

/// Decodes every frame of `data` fed in chunks of the given sizes (cycled),
/// calling `decode_frame` until it wants more after every chunk.
fn feed_chunked(
    data: &[u8],
    chunks: &[usize],
    max: usize,
) -> (Vec<Bytes>, Option<FrameError>, usize) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = data;
    let mut sizes = chunks.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        loop {
            let cap_before = buf.capacity();
            let announced = frame_len(&buf, usize::MAX).unwrap();
            match decode_frame(&mut buf, max) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => {
                    if let Some(total) = announced {
                        // Documented: room for the rest of the frame is reserved.
                        assert!(
                            buf.capacity() >= total,
                            "capacity {} < frame {total}",
                            buf.capacity()
                        );
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.capacity(), cap_before, "refused frame grew the buffer");
                    let rest_len = buf.len() + rest.len();
                    return (frames, Some(e), rest_len);
                }
            }
        }
    }
    (frames, None, buf.len())
}

/// What `ClientMsg::decode` must answer for a well-formed envelope, per the
/// documented rules (1..=128 byte ids and rooms, 1..=64 client message id,
/// 0..=128 route, 1..=8192 token, no control characters, a resume token of
/// at most 256 bytes).
fn expected_code(f: &pb::ClientFrame) -> Option<Code> {
    fn ok(s: &str, min: usize, max: usize) -> bool {
        (min..=max).contains(&s.len()) && !s.chars().any(char::is_control)
    }
    let good = match &f.body {
        None => return Some(Code::BadFrame),
        Some(Body::Login(l)) => {
            ok(&l.device_id, 1, 128)
                && ok(&l.token, 1, 8192)
                && l.resume
                    .as_ref()
                    .is_none_or(|r| r.resume_token.len() <= 256)
        }
        Some(Body::Send(s)) => ok(&s.client_msg_id, 1, 64) && ok(&s.route, 0, 128),
        Some(Body::Join(j)) => ok(&j.room, 1, 128),
        Some(Body::Leave(l)) => ok(&l.room, 1, 128),
        Some(Body::Refresh(r)) => ok(&r.token, 1, 8192),
        Some(Body::Ping(_) | Body::Ack(_) | Body::Close(_)) => true,
    };
    (!good).then_some(Code::BadRequest)
}

/// Checks a validated message against the envelope it came from.
fn assert_matches(f: &pb::ClientFrame, m: &ClientMsg) {
    assert_eq!(m.request_id, f.request_id);
    match (f.body.as_ref().unwrap(), &m.request) {
        (Body::Login(l), ClientRequest::Login(r)) => {
            assert_eq!(r.token, l.token);
            assert_eq!(r.device.as_str(), l.device_id);
            assert_eq!(r.protocol_version, l.protocol_version);
            let p = pb::Platform::try_from(l.platform).unwrap_or(pb::Platform::Unspecified);
            assert_eq!(r.platform, p);
        }
        (Body::Ping(p), ClientRequest::Ping { client_time_ms }) => {
            assert_eq!(*client_time_ms, p.client_time_ms)
        }
        (Body::Send(s), ClientRequest::Send(r)) => {
            assert_eq!(r.client_msg_id, s.client_msg_id);
            assert_eq!(r.route, s.route);
            assert_eq!(r.payload, s.payload);
        }
        (Body::Ack(a), ClientRequest::Ack { up_to_seq, .. }) => assert_eq!(*up_to_seq, a.up_to_seq),
        (Body::Join(j), ClientRequest::Join(r)) => assert_eq!(r.as_str(), j.room),
        (Body::Leave(l), ClientRequest::Leave(r)) => assert_eq!(r.as_str(), l.room),
        (Body::Refresh(f), ClientRequest::Refresh(r)) => assert_eq!(r.token, f.token),
        (Body::Close(c), ClientRequest::Close { code, reason }) => {
            assert_eq!(
                *code,
                Code::try_from(c.code).unwrap_or(Code::NormalClose),
                "close code"
            );
            // Truncated to 256 bytes on a char boundary, never more than needed.
            assert!(reason.len() <= 256);
            assert!(c.reason.starts_with(reason.as_str()));
            if c.reason.len() <= 256 {
                assert_eq!(reason, &c.reason);
            } else {
                assert!(
                    reason.len() > 256 - 4,
                    "truncated too much: {}",
                    reason.len()
                );
            }
        }
        (b, r) => panic!("body {b:?} validated as {r:?}"),
    }
}

fn stream_of(frames: &[pb::ClientFrame]) -> Bytes {
    let mut b = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut b);
    }
    b.freeze()
}

// -------------------------------------------------------------------- tests

proptest! {
    /// Arbitrary bytes, whole or chunked, never panic, and chunking does not
    /// change which frames come out, nor the error.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            // Mostly small prefixes, so that frames actually complete.
            proptest::collection::vec(
                prop_oneof![3 => Just(0u8), 1 => any::<u8>()], 0..512),
        ],
        chunks in chunking(),
        max in prop_oneof![Just(0usize), 1usize..64, Just(MAX)],
    ) {
        let (whole, whole_err, whole_left) = feed_whole(&data, max);
        let (chunked, chunked_err, chunked_left) = feed_chunked(&data, &chunks, max);
        prop_assert_eq!(&whole, &chunked);
        prop_assert_eq!(&whole_err, &chunked_err);
        prop_assert_eq!(whole_left, chunked_left);
        // Every frame is within the maximum, and frames + leftover cover the input.
        let used: usize = whole.iter().map(|f| LEN_PREFIX + f.len()).sum();
        prop_assert!(whole.iter().all(|f| f.len() <= max));
        prop_assert_eq!(used + whole_left, data.len());
        for f in &whole {
            let _ = ClientMsg::decode(f);
        }
    }

    /// `ClientMsg::decode` never panics on garbage.
    #[test]
    fn decode_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
        if let Err(e) = ClientMsg::decode(&data) {
            prop_assert!(matches!(e.code, Code::BadFrame | Code::BadRequest));
        }
    }

    /// Valid envelopes with a byte flipped, cut short or extended still never panic.
    #[test]
    fn decode_mutated_never_panics(
        f in any_frame(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        how in 0u8..3,
    ) {
        let mut b = f.encode_to_vec();
        if !b.is_empty() {
            let i = at.index(b.len());
            match how {
                0 => b[i] = byte,
                1 => b.truncate(i),
                _ => b.insert(i, byte),
            }
        }
        let _ = ClientMsg::decode(&b);
    }

    /// Any well-formed envelope is accepted or refused exactly as documented,
    /// with its request id echoed.
    #[test]
    fn validation_follows_the_rules(f in any_frame()) {
        let body = f.encode_to_vec();
        match (ClientMsg::decode(&body), expected_code(&f)) {
            (Ok(m), None) => assert_matches(&f, &m),
            (Err(e), Some(code)) => {
                prop_assert_eq!(e.code, code);
                prop_assert_eq!(e.request_id, f.request_id);
            }
            (got, want) => prop_assert!(false, "frame {:?}: got {:?}, want error {:?}", f, got, want),
        }
    }

    /// A valid frame of every kind round-trips through framing and validation.
    #[test]
    fn valid_frames_roundtrip(f in valid_frame()) {
        let mut buf = BytesMut::new();
        encode_frame(&f, &mut buf);
        let announced = frame_len(&buf, usize::MAX).unwrap().unwrap();
        prop_assert_eq!(announced, buf.len());
        let body = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        prop_assert!(buf.is_empty());
        prop_assert_eq!(&pb::ClientFrame::decode(body.clone()).unwrap(), &f);
        let m = ClientMsg::decode(&body).unwrap();
        assert_matches(&f, &m);
    }

    /// A stream of valid frames split at arbitrary points gives the same frames
    /// as the whole stream, which are the frames that were encoded.
    #[test]
    fn split_stream_same_as_whole(
        frames in proptest::collection::vec(valid_frame(), 1..24),
        chunks in chunking(),
    ) {
        let stream = stream_of(&frames);
        let (whole, err, left) = feed_whole(&stream, 1 << 20);
        prop_assert_eq!(err, None);
        prop_assert_eq!(left, 0);
        let (chunked, err, left) = feed_chunked(&stream, &chunks, 1 << 20);
        prop_assert_eq!(err, None);
        prop_assert_eq!(left, 0);
        prop_assert_eq!(&whole, &chunked);
        let decoded: Vec<pb::ClientFrame> =
            whole.into_iter().map(|b| pb::ClientFrame::decode(b).unwrap()).collect();
        prop_assert_eq!(decoded, frames);
    }

    /// A frame one byte above the maximum in a stream is refused at its prefix:
    /// the frames before it come out, then the error, and nothing was reserved.
    #[test]
    fn oversized_frame_in_stream_is_refused(
        before in proptest::collection::vec(valid_frame(), 0..6),
        over in 1usize..10_000,
        chunks in chunking(),
    ) {
        let mut b = BytesMut::from(&stream_of(&before)[..]);
        let max = before.iter().map(|f| f.encoded_len()).max().unwrap_or(0) + 16;
        let len = max + over;
        b.put_u32(len as u32);
        b.extend_from_slice(&[0u8; 32]);
        let (got, err, _) = feed_chunked(&b, &chunks, max);
        prop_assert_eq!(got.len(), before.len());
        prop_assert_eq!(err, Some(FrameError::TooLarge { len, max }));
    }

    /// A length prefix above the maximum is refused before the buffer grows:
    /// the capacity stays what it was, well short of the announced length, and
    /// the buffer is left untouched.
    #[test]
    fn oversized_prefix_reserves_nothing(
        max in prop_oneof![Just(0usize), 0usize..(1 << 16), Just(16 << 20)],
        excess in prop_oneof![1u64..16, 1u64..(1u64 << 32)],
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        initial_cap in 0usize..128,
    ) {
        let len = (max as u64 + excess).min(u64::from(u32::MAX)) as usize;
        prop_assume!(len > max);
        let mut buf = BytesMut::with_capacity(initial_cap);
        buf.put_u32(len as u32);
        buf.extend_from_slice(&tail);
        let before = buf.clone();
        let cap = buf.capacity();
        prop_assert_eq!(
            decode_frame(&mut buf, max),
            Err(FrameError::TooLarge { len, max })
        );
        prop_assert_eq!(buf.capacity(), cap);
        prop_assert_eq!(&buf, &before);
        prop_assert_eq!(frame_len(&buf, max), Err(FrameError::TooLarge { len, max }));
        // Asking again changes nothing either.
        prop_assert_eq!(
            decode_frame(&mut buf, max),
            Err(FrameError::TooLarge { len, max })
        );
        prop_assert_eq!(buf.capacity(), cap);
    }
}
