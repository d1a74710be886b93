//! RESP2, the part of redis's protocol the load tool's redis mode speaks:
//! commands out (arrays of bulk strings), and in, the replies to SUBSCRIBE
//! and PUBLISH and the messages a subscriber gets.
//!
//! Sans-IO, like Tether's own wire code: [`command`] appends to a buffer,
//! and [`parse`] reads one frame in place from the front of a buffer, so a
//! device reads once per readiness and parses every whole frame, as it does
//! over Tether's wire. It must not let a peer grow a buffer: every length is
//! checked against the caller's maximum before anything waits for the bytes,
//! and lines (numbers, statuses, errors) are at most [`MAX_LINE`] bytes.

use std::fmt;
use std::io::Write as _;

/// Bytes a line (a number, a status, an error message) may take at most.
pub const MAX_LINE: usize = 4096;
/// Items an array may hold at most: a pubsub message has 3 (`pmessage` 4).
const MAX_ITEMS: usize = 8;

/// Appends the command `args`, an array of bulk strings, to `out`.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    // Writes into a Vec cannot fail.
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One frame from the server, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A message on a subscribed channel: `message`, the channel, the payload.
    Message {
        channel: &'a [u8],
        payload: &'a [u8],
    },
    /// A subscription confirmed: `subscribe`, the channel, and how many
    /// channels the connection is subscribed to now.
    Subscribed { channel: &'a [u8], count: i64 },
    /// An integer reply (to PUBLISH: the subscribers that got the message).
    Int(i64),
    /// A status reply (`+OK`).
    Simple(&'a [u8]),
    /// An error reply (`-ERR ...`), without the dash.
    Error(&'a [u8]),
    /// Any other well-formed frame: a bulk string, a null, another array.
    Other,
}

/// Bytes that are not RESP2 as this parser takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespError {
    /// A frame starts with a byte that names no RESP2 type.
    BadType(u8),
    /// A length or integer that is not a decimal number in range.
    BadNumber,
    /// A bulk string over the caller's maximum, or a line over [`MAX_LINE`].
    TooLong,
    /// An array of more than [`MAX_ITEMS`] items, or an array inside one.
    TooDeep,
    /// A line or bulk string not ended by CRLF.
    BadTerminator,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RespError::BadType(b) => write!(f, "RESP: no type starts with byte {b:#04x}"),
            RespError::BadNumber => f.write_str("RESP: bad number"),
            RespError::TooLong => f.write_str("RESP: frame over the maximum length"),
            RespError::TooDeep => f.write_str("RESP: nested or oversized array"),
            RespError::BadTerminator => f.write_str("RESP: line not ended by CRLF"),
        }
    }
}

impl std::error::Error for RespError {}

/// Parses the frame at the start of `buf`: `Ok(None)` until all of it is
/// there, else the frame and its length in bytes. A bulk string longer than
/// `max` is an error as soon as its header is read.
///
/// # Errors
/// [`RespError`] when the bytes are not RESP2 or break a bound.
pub fn parse(buf: &[u8], max: usize) -> Result<Option<(Frame<'_>, usize)>, RespError> {
    if buf.first() != Some(&b'*') {
        return Ok(scalar(buf, 0, max)?.map(|(item, end)| {
            let f = match item {
                Item::Int(n) => Frame::Int(n),
                Item::Simple(s) => Frame::Simple(s),
                Item::Error(e) => Frame::Error(e),
                Item::Bulk(_) | Item::Nil => Frame::Other,
            };
            (f, end)
        }));
    }
    let Some((n, mut at)) = number(buf, 1)? else {
        return Ok(None);
    };
    if n == -1 {
        return Ok(Some((Frame::Other, at)));
    }
    let n = usize::try_from(n).map_err(|_| RespError::BadNumber)?;
    if n > MAX_ITEMS {
        return Err(RespError::TooDeep);
    }
    let mut items = [Item::Nil; MAX_ITEMS];
    for item in items.iter_mut().take(n) {
        let Some((it, end)) = scalar(buf, at, max)? else {
            return Ok(None);
        };
        *item = it;
        at = end;
    }
    let f = match &items[..n] {
        [Item::Bulk(b"message"), Item::Bulk(channel), Item::Bulk(payload)] => {
            Frame::Message { channel, payload }
        }
        [Item::Bulk(b"subscribe"), Item::Bulk(channel), Item::Int(count)] => Frame::Subscribed {
            channel,
            count: *count,
        },
        _ => Frame::Other,
    };
    Ok(Some((f, at)))
}

/// A value that is not an array.
#[derive(Clone, Copy, Debug)]
enum Item<'a> {
    Bulk(&'a [u8]),
    Nil,
    Int(i64),
    Simple(&'a [u8]),
    Error(&'a [u8]),
}

/// The scalar at `buf[at..]` and where it ends.
fn scalar(buf: &[u8], at: usize, max: usize) -> Result<Option<(Item<'_>, usize)>, RespError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    let item = match kind {
        b'+' | b'-' => {
            let Some(cr) = line(buf, at + 1)? else {
                return Ok(None);
            };
            let text = &buf[at + 1..cr];
            let item = if kind == b'+' {
                Item::Simple(text)
            } else {
                Item::Error(text)
            };
            (item, cr + 2)
        }
        b':' => match number(buf, at + 1)? {
            Some((n, end)) => (Item::Int(n), end),
            None => return Ok(None),
        },
        b'$' => {
            let Some((n, start)) = number(buf, at + 1)? else {
                return Ok(None);
            };
            if n == -1 {
                return Ok(Some((Item::Nil, start)));
            }
            let n = usize::try_from(n).map_err(|_| RespError::BadNumber)?;
            if n > max {
                return Err(RespError::TooLong);
            }
            let end = start + n;
            let Some(crlf) = buf.get(end..end + 2) else {
                return Ok(None);
            };
            if crlf != b"\r\n" {
                return Err(RespError::BadTerminator);
            }
            (Item::Bulk(&buf[start..end]), end + 2)
        }
        b'*' => return Err(RespError::TooDeep),
        other => return Err(RespError::BadType(other)),
    };
    Ok(Some(item))
}

/// The decimal number on the line at `buf[at..]` and where the next line
/// starts.
fn number(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, RespError> {
    let Some(cr) = line(buf, at)? else {
        return Ok(None);
    };
    let digits = &buf[at..cr];
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return Err(RespError::BadNumber);
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(RespError::BadNumber);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(i64::from(d - b'0')))
            .ok_or(RespError::BadNumber)?;
    }
    Ok(Some((if neg { -n } else { n }, cr + 2)))
}

/// The index of the CR ending the line that starts at `buf[at..]`, once its
/// LF is there too.
fn line(buf: &[u8], at: usize) -> Result<Option<usize>, RespError> {
    let rest = buf.get(at..).unwrap_or_default();
    match rest.iter().take(MAX_LINE + 1).position(|&b| b == b'\r') {
        Some(i) => match rest.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(at + i)),
            Some(_) => Err(RespError::BadTerminator),
        },
        None if rest.len() > MAX_LINE => Err(RespError::TooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        command(&mut out, args);
        out
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            cmd(&[b"SUBSCRIBE", b"u:u7", b"r:bench"]),
            b"*3\r\n$9\r\nSUBSCRIBE\r\n$4\r\nu:u7\r\n$7\r\nr:bench\r\n"
        );
        // Binary payloads travel as they are.
        assert_eq!(
            cmd(&[b"PUBLISH", b"c", b"a\r\nb"]),
            b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nc\r\n$4\r\na\r\nb\r\n"
        );
    }

    #[test]
    fn parses_what_subscribers_and_publishers_get() {
        let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nu:u7\r\n$5\r\nhe\r\no\r\n";
        assert_eq!(
            parse(msg, 64),
            Ok(Some((
                Frame::Message {
                    channel: b"u:u7",
                    payload: b"he\r\no"
                },
                msg.len()
            )))
        );
        let sub = b"*3\r\n$9\r\nsubscribe\r\n$7\r\nr:bench\r\n:2\r\n";
        assert_eq!(
            parse(sub, 64),
            Ok(Some((
                Frame::Subscribed {
                    channel: b"r:bench",
                    count: 2
                },
                sub.len()
            )))
        );
        assert_eq!(parse(b":1500\r\n", 64), Ok(Some((Frame::Int(1500), 7))));
        assert_eq!(parse(b":-3\r\n", 64), Ok(Some((Frame::Int(-3), 5))));
        assert_eq!(parse(b"+OK\r\n", 64), Ok(Some((Frame::Simple(b"OK"), 5))));
        assert_eq!(
            parse(b"-ERR no\r\n", 64),
            Ok(Some((Frame::Error(b"ERR no"), 9)))
        );
        assert_eq!(parse(b"$-1\r\n", 64), Ok(Some((Frame::Other, 5))));
        assert_eq!(parse(b"*-1\r\n", 64), Ok(Some((Frame::Other, 5))));
        assert_eq!(parse(b"$2\r\nhi\r\n", 64), Ok(Some((Frame::Other, 8))));
        let pong = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n";
        assert_eq!(parse(pong, 64), Ok(Some((Frame::Other, pong.len()))));
    }

    #[test]
    fn waits_for_whole_frames_and_reads_them_back_to_back() {
        let mut two = b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$3\r\nabc\r\n".to_vec();
        let one = two.len();
        two.extend_from_slice(b":7\r\n");
        for cut in 0..one {
            assert_eq!(parse(&two[..cut], 64), Ok(None), "cut at {cut}");
        }
        let (f, n) = parse(&two, 64).expect("valid").expect("whole");
        assert_eq!(n, one);
        assert!(matches!(
            f,
            Frame::Message {
                payload: b"abc",
                ..
            }
        ));
        assert_eq!(parse(&two[n..], 64), Ok(Some((Frame::Int(7), 4))));
    }

    #[test]
    fn refuses_what_breaks_a_bound_before_the_bytes_come() {
        // A bulk string over the maximum: refused from its header alone.
        assert_eq!(parse(b"$65\r\n", 64), Err(RespError::TooLong));
        assert_eq!(
            parse(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1000000\r\n", 64),
            Err(RespError::TooLong)
        );
        // A line with no end in sight.
        assert_eq!(parse(&[b'+'; MAX_LINE + 2], 64), Err(RespError::TooLong));
        assert_eq!(parse(b"*9\r\n", 64), Err(RespError::TooDeep));
        assert_eq!(parse(b"*1\r\n*1\r\n:1\r\n", 64), Err(RespError::TooDeep));
        assert_eq!(parse(b"%1\r\n", 64), Err(RespError::BadType(b'%')));
        assert_eq!(parse(b":12x\r\n", 64), Err(RespError::BadNumber));
        assert_eq!(parse(b":\r\n", 64), Err(RespError::BadNumber));
        assert_eq!(
            parse(b":99999999999999999999\r\n", 64),
            Err(RespError::BadNumber)
        );
        assert_eq!(parse(b"$-2\r\n", 64), Err(RespError::BadNumber));
        assert_eq!(parse(b"$2\r\nhiXY", 64), Err(RespError::BadTerminator));
        assert_eq!(parse(b":1\rX", 64), Err(RespError::BadTerminator));
    }

    #[test]
    fn never_panics_on_any_prefix_or_corruption() {
        let frames: &[&[u8]] = &[
            b"*3\r\n$7\r\nmessage\r\n$4\r\nu:u7\r\n$5\r\nhello\r\n",
            b"*3\r\n$9\r\nsubscribe\r\n$7\r\nr:bench\r\n:2\r\n",
            b"-ERR unknown command\r\n",
        ];
        for f in frames {
            for cut in 0..=f.len() {
                let _ = parse(&f[..cut], 8);
                for at in 0..cut {
                    let mut bad = f[..cut].to_vec();
                    bad[at] ^= 0x5a;
                    let _ = parse(&bad, 8);
                }
            }
        }
    }
}
