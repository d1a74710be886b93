//! Codec micro-benchmarks: the per-frame work on the read path (split + decode +
//! validate), on the reply path (encode a `ServerFrame`), and on the fan-out
//! write path (per-recipient push header + the shared, pre-encoded body).
//!
//! Run: `cargo bench --bench codec` (add `-- --warm-up-time 1 --measurement-time 3`
//! for a quick pass).

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use tether::wire::{
    decode_frame, encode_frame, encode_push_header, frame_bytes, frame_len, pb, ClientMsg,
    SharedPush, LEN_PREFIX, PUSH_HEADER_MAX,
};

/// Frames per iteration of the stream benchmarks.
const FRAMES: usize = 1000;
/// The gateway's default maximum frame (generous enough for every frame here).
const MAX_FRAME: usize = 64 * 1024;

fn ping(request_id: u64) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id,
        body: Some(pb::client_frame::Body::Ping(pb::Ping {
            client_time_ms: 1_700_000_000_000 + request_id,
        })),
    }
}

fn send(request_id: u64, payload: &[u8]) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id,
        body: Some(pb::client_frame::Body::Send(pb::Send {
            client_msg_id: format!("c-{request_id:08}"),
            route: "chat.send".into(),
            payload: Bytes::copy_from_slice(payload),
        })),
    }
}

/// `FRAMES` client frames, alternating Ping and Send (64 B payload), concatenated.
fn client_stream() -> Bytes {
    let payload = [0x5a_u8; 64];
    let mut b = BytesMut::new();
    for i in 0..FRAMES as u64 {
        if i % 2 == 0 {
            encode_frame(&ping(i + 1), &mut b);
        } else {
            encode_frame(&send(i + 1, &payload), &mut b);
        }
    }
    b.freeze()
}

fn bench_decode(c: &mut Criterion) {
    let stream = client_stream();
    let mut g = c.benchmark_group("decode_stream");

    // decode_frame + ClientMsg::decode over a BytesMut holding the whole stream.
    // The BytesMut is built in the (untimed) setup, since decode_frame consumes it.
    let run_full = |buf: BytesMut| {
        let mut buf = buf;
        let mut n = 0usize;
        while let Some(f) = decode_frame(&mut buf, MAX_FRAME).unwrap() {
            let msg = ClientMsg::decode(&f).unwrap();
            black_box(&msg);
            n += 1;
        }
        assert_eq!(n, FRAMES);
        buf
    };
    for (id, tp) in [
        ("ping+send64/frames", Throughput::Elements(FRAMES as u64)),
        ("ping+send64/bytes", Throughput::Bytes(stream.len() as u64)),
    ] {
        g.throughput(tp);
        g.bench_function(id, |b| {
            b.iter_batched(
                || BytesMut::from(&stream[..]),
                run_full,
                BatchSize::LargeInput,
            )
        });
    }

    // Framing alone (decode_frame, no protobuf), to split the cost.
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("split_only/frames", |b| {
        b.iter_batched(
            || BytesMut::from(&stream[..]),
            |mut buf| {
                let mut n = 0usize;
                while let Some(f) = decode_frame(&mut buf, MAX_FRAME).unwrap() {
                    black_box(&f);
                    n += 1;
                }
                assert_eq!(n, FRAMES);
                buf
            },
            BatchSize::LargeInput,
        )
    });

    // The connection driver's zero-copy path: frame_len over a borrowed slice,
    // ClientMsg::decode on the sub-slice (no BytesMut, no setup copy).
    g.bench_function("slice_frame_len+decode/frames", |b| {
        b.iter(|| {
            let mut data: &[u8] = black_box(&stream[..]);
            let mut n = 0usize;
            while let Some(total) = frame_len(data, MAX_FRAME).unwrap() {
                let (frame, rest) = data.split_at(total);
                let msg = ClientMsg::decode(&frame[LEN_PREFIX..]).unwrap();
                black_box(&msg);
                data = rest;
                n += 1;
                if data.is_empty() {
                    break;
                }
            }
            assert_eq!(n, FRAMES);
        })
    });
    g.finish();
}

fn replies() -> Vec<pb::ServerFrame> {
    use pb::server_frame::Body;
    (0..FRAMES as u64)
        .map(|i| {
            let body = match i % 4 {
                0 | 1 => Body::Pong(pb::Pong {
                    client_time_ms: 1_700_000_000_000 + i,
                    server_time_ms: 1_700_000_000_100 + i,
                }),
                2 => Body::SendAck(pb::SendAck {
                    client_msg_id: format!("c-{i:08}"),
                    server_msg_id: 10_000 + i,
                    code: pb::Code::Ok as i32,
                    seq: i,
                    duplicate: false,
                }),
                _ => Body::Error(pb::Error {
                    code: pb::Code::NotLoggedIn as i32,
                    message: "log in first".into(),
                }),
            };
            pb::ServerFrame {
                request_id: i + 1,
                body: Some(body),
            }
        })
        .collect()
}

fn bench_encode(c: &mut Criterion) {
    let frames = replies();
    let total: usize = frames.iter().map(|f| frame_bytes(f).len()).sum();
    let mut g = c.benchmark_group("encode_replies");

    // encode_frame into one reused buffer (cleared per iteration, so after the
    // first iteration no allocation happens: this is the encoder's own cost).
    let mut dst = BytesMut::with_capacity(total);
    for (id, tp) in [
        (
            "pong+sendack+error/frames",
            Throughput::Elements(FRAMES as u64),
        ),
        ("pong+sendack+error/bytes", Throughput::Bytes(total as u64)),
    ] {
        g.throughput(tp);
        g.bench_function(id, |b| {
            b.iter(|| {
                dst.clear();
                for f in &frames {
                    encode_frame(black_box(f), &mut dst);
                }
                black_box(dst.len())
            })
        });
    }

    // frame_bytes: what Session::reply does (one allocation per frame).
    g.throughput(Throughput::Elements(FRAMES as u64));
    g.bench_function("frame_bytes_each/frames", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(frame_bytes(black_box(f)));
            }
        })
    });
    g.finish();
}

fn bench_push_framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_framing");
    for size in [64usize, 256] {
        let payload = vec![0xa5_u8; size];
        let shared = SharedPush::new("m-0000000000000001", &payload, "chat", "lobby");
        let per = {
            let mut h = BytesMut::new();
            encode_push_header(1_000_000, shared.body.len(), &mut h);
            h.len() + shared.body.len()
        };

        // Flat write batch: header + copy of the shared body, FRAMES recipients'
        // worth (in reality: FRAMES pushes of one connection's batch).
        let mut flat = BytesMut::with_capacity(FRAMES * shared.wire_len());
        for (id, tp) in [
            (
                format!("flat_{size}B/frames"),
                Throughput::Elements(FRAMES as u64),
            ),
            (
                format!("flat_{size}B/bytes"),
                Throughput::Bytes((FRAMES * per) as u64),
            ),
        ] {
            g.throughput(tp);
            g.bench_function(id, |b| {
                b.iter(|| {
                    flat.clear();
                    for seq in 1_000_000..1_000_000 + FRAMES as u64 {
                        encode_push_header(seq, shared.body.len(), &mut flat);
                        flat.extend_from_slice(&shared.body);
                    }
                    black_box(flat.len())
                })
            });
        }

        // Vectored write batch: header into a scratch buffer split off as its own
        // Bytes, body shared by refcount (no payload copy).
        g.throughput(Throughput::Elements(FRAMES as u64));
        let mut hdr = BytesMut::with_capacity(FRAMES * PUSH_HEADER_MAX);
        let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * FRAMES);
        g.bench_function(format!("vectored_{size}B/frames"), |b| {
            b.iter(|| {
                chunks.clear();
                for seq in 1_000_000..1_000_000 + FRAMES as u64 {
                    hdr.reserve(PUSH_HEADER_MAX);
                    encode_push_header(seq, shared.body.len(), &mut hdr);
                    chunks.push(hdr.split().freeze());
                    chunks.push(shared.body.clone());
                }
                black_box(chunks.len())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_decode, bench_encode, bench_push_framing);
criterion_main!(benches);
