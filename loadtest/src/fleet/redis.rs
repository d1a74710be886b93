//! Devices that are redis subscribers ([`FleetSpec::redis`]), for the
//! side-by-side comparison with redis.
//!
//! A device connects over TCP (from its `--sources` address, as a gateway
//! device does), SUBSCRIBEs to its channels in one command (see
//! [`crate::redis::channels`]), and counts the subscription confirmed as its
//! login. Then it reads as a gateway device does: one read per readiness
//! into a buffer of the fleet's read size, every whole frame parsed in
//! place ([`crate::resp`]), each message counted and timed from the send
//! time in its payload ([`Arrivals`]). A slow device reads slowly and, once
//! redis cuts it off, gives up; a connection lost otherwise subscribes
//! afresh (redis has no resume: what was published meanwhile is lost, and
//! shows as missing).
//!
//! What a gateway device does and a subscriber has no counterpart for:
//! minting a token, acknowledging pushes, sequence numbers (so no gaps or
//! duplicates are counted), heartbeats (redis needs none to keep a
//! subscriber), resumes and reconnect storms, uplinks, churn.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    connect, read_some, record, sent_ns, sleep_or_stop, Arrivals, Device, Io, Phase, Shared,
    MAX_FRAME,
};
use crate::resp::{self, Frame};

/// How long a device waits for its subscriptions to be confirmed.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes of an error reply kept for the report.
const MAX_ERROR: usize = 160;

/// A device's life: connect, subscribe, read until the fleet stops.
pub(super) async fn device_loop(
    ix: usize,
    shared: &Shared,
    d: &mut Device,
    mut phase: watch::Receiver<Phase>,
) {
    let spec = &shared.spec;
    let user_channel = spec.redis.is_some_and(|r| r.user_channel);
    let channels = crate::redis::channels(&d.user, user_channel, spec.room.as_deref());
    let mut subscribe = Vec::new();
    let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
    args.extend(channels.iter().map(|c| c.as_bytes()));
    resp::command(&mut subscribe, &args);
    let c = &shared.counters;
    let mut settled = false;
    let mut backoff = Duration::from_millis(100);
    if *phase.borrow_and_update() == Phase::Stop {
        return;
    }
    loop {
        let started = Instant::now();
        let conn = tokio::select! {
            c = connect(shared, ix) => c,
            _ = phase.wait_for(|p| *p == Phase::Stop) => return,
        };
        let sub = match conn {
            Ok(mut conn) => {
                let mut rbuf =
                    BytesMut::with_capacity(if d.slow { 1024 } else { shared.read_size });
                let sub = tokio::select! {
                    r = subscribe_all(shared, d, &mut conn, &mut rbuf, &subscribe, channels.len()) => r,
                    _ = phase.wait_for(|p| *p == Phase::Stop) => return,
                };
                sub.map(|()| (conn, rbuf))
            }
            Err(e) => Err(Fail::Io(format!("connect: {e}"))),
        };
        if !settled {
            settled = true;
            c.settled.fetch_add(1, Relaxed);
        }
        let (mut conn, rbuf) = match sub {
            Ok(ok) => ok,
            Err(f) => {
                match f {
                    Fail::Refused(e) => {
                        c.refused.fetch_add(1, Relaxed);
                        shared.error(format!("subscribe refused: {e}"));
                    }
                    Fail::Io(e) => {
                        c.connect_errors.fetch_add(1, Relaxed);
                        shared.error(e);
                    }
                }
                if sleep_or_stop(&mut phase, d.jitter(backoff.as_millis() as u64)).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        c.logins.fetch_add(1, Relaxed);
        let us = started.elapsed().as_micros() as u64;
        shared.hist(|h| record(&mut h.login, us));
        c.online.fetch_add(1, Relaxed);
        let lost = session(shared, d, &mut conn, rbuf, &mut phase).await;
        c.online.fetch_sub(1, Relaxed);
        match lost {
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.shutdown()).await;
                return;
            }
            Some(_) if d.slow => {
                // Redis cut it off (its output buffer limit for subscribers).
                c.slow_closed.fetch_add(1, Relaxed);
                return;
            }
            Some(e) => {
                c.drops.fetch_add(1, Relaxed);
                shared.error(format!("connection lost: {e}"));
                if sleep_or_stop(&mut phase, d.jitter(200)).await {
                    return;
                }
            }
        }
    }
}

/// Why subscribing failed.
enum Fail {
    /// Redis answered with an error (e.g. its client limit).
    Refused(String),
    Io(String),
}

/// Sends SUBSCRIBE and waits for its `want` confirmations; on success
/// `rbuf` holds what came after them.
async fn subscribe_all(
    shared: &Shared,
    d: &Device,
    conn: &mut Box<dyn Io>,
    rbuf: &mut BytesMut,
    subscribe: &[u8],
    want: usize,
) -> Result<(), Fail> {
    let io = |e: std::io::Error| Fail::Io(format!("subscribe: {e}"));
    conn.write_all(subscribe).await.map_err(io)?;
    conn.flush().await.map_err(io)?;
    let deadline = Instant::now() + SUBSCRIBE_TIMEOUT;
    let mut confirmed = 0;
    loop {
        // Redis runs one SUBSCRIBE whole, so its confirmations come back to
        // back; a message can only follow them, and is counted if it does.
        handle_frames(shared, d, rbuf, &mut confirmed)?;
        if confirmed >= want {
            return Ok(());
        }
        rbuf.reserve(1024);
        let n = tokio::time::timeout_at(deadline, conn.read_buf(rbuf))
            .await
            .map_err(|_| Fail::Io("subscribe: no confirmation".into()))?
            .map_err(io)?;
        if n == 0 {
            return Err(Fail::Io("subscribe: closed by the server".into()));
        }
    }
}

/// The subscribed loop of one connection: `None` when the fleet stops, else
/// why the connection was lost.
async fn session(
    shared: &Shared,
    d: &Device,
    conn: &mut Box<dyn Io>,
    mut rbuf: BytesMut,
    phase: &mut watch::Receiver<Phase>,
) -> Option<String> {
    let spec = &shared.spec;
    let mut confirmed = 0;
    let lost = |f: Fail| match f {
        Fail::Refused(e) => format!("error from the server: {e}"),
        Fail::Io(e) => e,
    };
    // Messages that came with the confirmations.
    if let Err(f) = handle_frames(shared, d, &mut rbuf, &mut confirmed) {
        return Some(lost(f));
    }
    loop {
        tokio::select! {
            r = phase.changed() => {
                // Reconnect storms are a gateway's: a subscriber has no session to resume.
                if r.is_err() || *phase.borrow() == Phase::Stop {
                    return None;
                }
            }
            r = read_some(conn, &mut rbuf, d.slow, shared.read_size) => match r {
                Ok(0) => return Some("closed by the server".into()),
                Ok(n) => {
                    if let Err(f) = handle_frames(shared, d, &mut rbuf, &mut confirmed) {
                        return Some(lost(f));
                    }
                    if d.slow && spec.slow_bps > 0 {
                        // Reading slowly is the point: this device stalls here.
                        tokio::time::sleep(Duration::from_secs_f64(n as f64 / spec.slow_bps as f64)).await;
                    }
                }
                Err(e) => return Some(e.to_string()),
            },
        }
    }
}

/// Handles every whole frame in `rbuf`: counts and times messages, and adds
/// the subscriptions confirmed to `confirmed`. An error reply or bytes that
/// are not RESP end the connection; the messages before them still count.
fn handle_frames(
    shared: &Shared,
    d: &Device,
    rbuf: &mut BytesMut,
    confirmed: &mut usize,
) -> Result<(), Fail> {
    let mut arrivals = Arrivals::new();
    let mut pos = 0;
    let mut end = Ok(());
    loop {
        match resp::parse(&rbuf[pos..], MAX_FRAME) {
            Ok(Some((f, n))) => {
                pos += n;
                match f {
                    Frame::Message { payload, .. } => {
                        arrivals.push(shared, d.slow, payload.len(), sent_ns(payload));
                    }
                    Frame::Subscribed { .. } => *confirmed += 1,
                    Frame::Error(e) => {
                        // Redis explains at length (protected mode: a page).
                        let e = &e[..e.len().min(MAX_ERROR)];
                        end = Err(Fail::Refused(String::from_utf8_lossy(e).into_owned()));
                        break;
                    }
                    Frame::Int(_) | Frame::Simple(_) | Frame::Other => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                end = Err(Fail::Io(e.to_string()));
                break;
            }
        }
    }
    rbuf.advance(pos);
    arrivals.finish(shared, d.slow);
    end
}
