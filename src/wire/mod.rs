//! Sans-IO wire format: length-prefixed protobuf frames.
//!
//! Owns the framing (4-byte big-endian length, then one protobuf envelope), the
//! generated protobuf types ([`pb`]), and their conversion into validated domain
//! types ([`ClientMsg`]). It performs no IO and never reads the clock, so every
//! transport (TCP, TLS, in-memory, later QUIC) shares this one codec.

mod frame;
mod request;
pub mod ws;

pub use frame::{
    decode_frame, encode_frame, encode_push_header, frame_bytes, frame_len, FrameError, PushData,
    SharedPush, LEN_PREFIX, PUSH_HEADER_MAX,
};
pub use request::{
    device, room, ClientMsg, ClientRequest, LoginRequest, RefreshRequest, RequestError,
    ResumeRequest, SendRequest,
};

/// The protocol versions this gateway speaks (inclusive).
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u32> = 1..=1;

/// Generated protobuf types for `proto/tether/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
}

pub use pb::Code;
