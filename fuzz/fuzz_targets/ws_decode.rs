//! Fuzz the WebSocket decoder (`tether::wire::ws::Decoder`), which every
//! byte of a WebSocket peer reaches: an arbitrary stream decoded whole and
//! in chunks with outputs of any size must give the same length-prefixed
//! stream, the same control frames and the same refusal, never a frame
//! over the limit, and never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::wire::ws::{CloseCode, Control, Decoder};

const MAXES: [u32; 5] = [0, 1, 125, 4096, 65536];

/// Decodes `stream` fed `chunk` bytes at a time into an output of `room`
/// bytes: the stream, the controls, and the refusal if any.
fn run(
    stream: &[u8],
    chunk: usize,
    room: usize,
    max: u32,
) -> (Vec<u8>, Vec<Control>, Option<CloseCode>) {
    let mut d = Decoder::server(max);
    let mut got = Vec::new();
    let mut controls = Vec::new();
    let mut out = vec![0u8; room];
    for piece in stream.chunks(chunk) {
        let mut input = piece;
        loop {
            match d.decode(input, &mut out) {
                Err(e) => return (got, controls, Some(e)),
                Ok(p) => {
                    assert!(p.used <= input.len());
                    assert!(p.wrote <= out.len());
                    got.extend_from_slice(&out[..p.wrote]);
                    input = &input[p.used..];
                    let stopped_for_control = p.control.is_some();
                    if let Some(c) = p.control {
                        controls.push(c);
                    }
                    if input.is_empty() && p.wrote < out.len() && !stopped_for_control {
                        break;
                    }
                }
            }
        }
    }
    // What is assembled but not out yet, and a refusal held back behind
    // bytes written before it.
    loop {
        match d.decode(&[], &mut out) {
            Ok(p) if p.wrote > 0 => got.extend_from_slice(&out[..p.wrote]),
            Ok(_) => break,
            Err(e) => return (got, controls, Some(e)),
        }
    }
    (got, controls, None)
}

fuzz_target!(|data: &[u8]| {
    // The first three bytes pick the limit, the chunk and the output size.
    let Some((&[m, c, r], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = MAXES[m as usize % MAXES.len()];
    let a = run(stream, stream.len().max(1), 1 << 17, max);
    let b = run(stream, c as usize + 1, r as usize + 1, max);
    assert_eq!(a, b, "chunking or output room changed the outcome");
    // Every frame in the stream is within the limit.
    let mut s = &a.0[..];
    while s.len() >= 4 {
        let len = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
        assert!(len <= max, "a message over the limit came out");
        let end = 4 + len as usize;
        if end > s.len() {
            break;
        }
        s = &s[end..];
    }
});
