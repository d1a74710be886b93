//! The Rust upstream client against a scripted gateway: it keeps reading while
//! it writes, and it forgets requests whose caller gave up.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tether::upstream::{ClientError, FrameCodec, UpstreamClient, UpstreamOptions};
use tether::wire::frame_bytes;
use tether::wire::pb::{self, gateway_frame::Body as Out, upstream_frame::Body as In};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;

fn out(request_id: u64, body: Out) -> Bytes {
    frame_bytes(&pb::GatewayFrame {
        request_id,
        body: Some(body),
    })
}

fn uplink_event(i: usize, payload: &Bytes) -> Bytes {
    out(
        0,
        Out::Event(pb::Event {
            kind: Some(pb::event::Kind::Uplink(pb::Uplink {
                client_msg_id: format!("m{i}"),
                payload: payload.clone(),
                ..Default::default()
            })),
        }),
    )
}

/// Reads the Hello and answers HelloOk; returns the frame reader.
async fn accept_hello<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
) -> (
    FramedRead<tokio::io::ReadHalf<S>, FrameCodec>,
    tokio::io::WriteHalf<S>,
) {
    let (r, mut w) = tokio::io::split(s);
    let mut frames = FramedRead::new(r, FrameCodec::new(64 * 1024 * 1024));
    let f = pb::UpstreamFrame::decode(frames.next().await.unwrap().unwrap()).unwrap();
    assert!(matches!(f.body, Some(In::Hello(_))));
    w.write_all(&out(
        f.request_id,
        Out::HelloOk(pb::HelloOk {
            node_id: "scripted".into(),
            protocol_version: 1,
        }),
    ))
    .await
    .unwrap();
    (frames, w)
}

/// The gateway writes a flood of events before it reads the next request,
/// as a real gateway does when its reader waits for its writer. Both floods
/// are larger than the socket buffers, so a client that stops reading while
/// it writes a request never gets the reply.
#[tokio::test]
async fn a_subscribed_client_gets_replies_under_an_event_flood() {
    const EVENTS: usize = 512;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (mut frames, mut w) = accept_hello(s).await;
        let payload = Bytes::from(vec![1u8; 64 * 1024]);
        for i in 0..EVENTS {
            w.write_all(&uplink_event(i, &payload)).await.unwrap();
        }
        w.flush().await.unwrap();
        while let Some(Ok(b)) = frames.next().await {
            let f = pb::UpstreamFrame::decode(b).unwrap();
            let body = match f.body {
                Some(In::Push(p)) => Out::PushReply(pb::PushReply {
                    message_id: format!("{}", p.payload.len()),
                    sessions: 0,
                    dropped: 0,
                    failed: Vec::new(),
                }),
                _ => Out::Pong(pb::Pong::default()),
            };
            w.write_all(&out(f.request_id, body)).await.unwrap();
        }
    });

    let (client, mut events) = UpstreamClient::connect(
        &tether::upstream::Endpoint::Tcp(addr.to_string()),
        UpstreamOptions {
            subscribe: true,
            ..UpstreamOptions::default()
        },
    )
    .await
    .unwrap();
    // A request as large as the flood, sent while the events arrive; nobody
    // reads the event stream meanwhile.
    let reply = client
        .push(pb::PushRequest {
            target: Some(pb::push_request::Target::UserId("u".into())),
            payload: Bytes::from(vec![2u8; 32 * 1024 * 1024]),
            ..Default::default()
        })
        .await
        .expect("the reply arrives despite the flood");
    assert_eq!(reply.message_id, (32 * 1024 * 1024).to_string());
    client.ping().await.expect("and later requests too");

    // Every event was read before the reply: it is in the buffer, or
    // counted as dropped (nobody read the stream, and 32 MiB is more than
    // the buffer holds).
    let dropped = client.events_dropped();
    assert_eq!(events.dropped(), dropped);
    assert!(dropped > 0, "the full buffer dropped events");
    drop(client);
    let mut got = 0;
    while events.recv().await.is_some() {
        got += 1;
    }
    assert!(got > 0, "events were kept");
    assert_eq!(got + dropped, EVENTS as u64);
    server.abort();
}

/// Requests whose caller gave up, by the client's timeout or by dropping the
/// call, leave nothing behind.
#[tokio::test(start_paused = true)]
async fn requests_whose_caller_gave_up_leave_no_pending_entry() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let (mut frames, _w) = accept_hello(b).await;
        // Reads requests and never answers them.
        while let Some(Ok(_)) = frames.next().await {}
    });
    let (client, _events) = UpstreamClient::over(a, UpstreamOptions::default())
        .await
        .unwrap();

    assert!(matches!(client.ping().await, Err(ClientError::Timeout)));
    assert_eq!(
        client.pending_requests(),
        0,
        "a timed-out request is forgotten"
    );

    assert!(tokio::time::timeout(Duration::from_secs(1), client.ping())
        .await
        .is_err());
    assert_eq!(client.pending_requests(), 0, "a dropped call is forgotten");

    let calls: Vec<_> = (0..100)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.ping().await })
        })
        .collect();
    for c in calls {
        assert!(matches!(c.await.unwrap(), Err(ClientError::Timeout)));
    }
    assert_eq!(client.pending_requests(), 0);
    server.abort();
}

/// When the gateway closes the connection, waiting callers get `Closed` at
/// once, and so do later calls.
#[tokio::test(start_paused = true)]
async fn a_closed_connection_fails_waiting_and_later_requests() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let (mut frames, w) = accept_hello(b).await;
        // Close after the first request, without answering it.
        let _ = frames.next().await;
        drop(w);
        drop(frames);
    });
    let (client, mut events) = UpstreamClient::over(a, UpstreamOptions::default())
        .await
        .unwrap();
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
    assert!(matches!(client.ping().await, Err(ClientError::Closed)));
    assert_eq!(client.pending_requests(), 0);
    assert!(events.recv().await.is_none(), "the event stream ends");
    let _ = server.await;
}
