//! Fuzz the framing and request validation: `decode_frame` on an arbitrary
//! stream fed whole and in chunks (which must agree), and `ClientMsg::decode`
//! on every frame that comes out and on the raw input.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether::wire::{decode_frame, frame_len, ClientMsg, FrameError, LEN_PREFIX};

const MAXES: [usize; 6] = [0, 1, 16, 255, 4096, 65536];

fn whole(stream: &[u8], max: usize) -> (Vec<Bytes>, Option<FrameError>) {
    let mut buf = BytesMut::from(stream);
    let mut frames = Vec::new();
    loop {
        let cap = buf.capacity();
        match decode_frame(&mut buf, max) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => {
                assert_eq!(buf.capacity(), cap, "a refused frame grew the buffer");
                return (frames, Some(e));
            }
        }
    }
}

fn chunked(stream: &[u8], chunk: usize, max: usize) -> (Vec<Bytes>, Option<FrameError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let cap = buf.capacity();
            let announced = frame_len(&buf, usize::MAX).unwrap();
            match decode_frame(&mut buf, max) {
                Ok(Some(f)) => {
                    assert!(f.len() <= max);
                    frames.push(f);
                }
                Ok(None) => {
                    if let Some(total) = announced {
                        assert!(buf.capacity() >= total, "room for the frame not reserved");
                    }
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.capacity(), cap, "a refused frame grew the buffer");
                    return (frames, Some(e));
                }
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes pick the maximum frame and the chunk size.
    let Some((&[m, c], stream)) = data.split_first_chunk::<2>() else {
        let _ = ClientMsg::decode(data);
        return;
    };
    let max = MAXES[m as usize % MAXES.len()];
    let chunk = c as usize + 1;

    let (a, ea) = whole(stream, max);
    let (b, eb) = chunked(stream, chunk, max);
    assert_eq!(a, b, "chunking changed the frames");
    assert_eq!(ea, eb, "chunking changed the error");
    let used: usize = a.iter().map(|f| LEN_PREFIX + f.len()).sum();
    assert!(used <= stream.len());

    for f in &a {
        if let Err(e) = ClientMsg::decode(f) {
            assert!(e.message.len() < 1024);
        }
    }
    let _ = ClientMsg::decode(stream);
});
