//! TLS 1.3 after the handshake: the record layer, over the traffic keys
//! rustls hands over once the handshake is done.
//!
//! Why by hand: an idle connection must cost little, and rustls's own
//! connection objects do not. Measured with a counting allocator after a
//! handshake and one message each way, a buffered `ServerConnection` holds
//! 7,449 bytes for its whole life (a 4 KiB read buffer among them), an
//! `UnbufferedServerConnection` 3,273, and the keys with rustls's
//! `KernelConnection` (its interface for kernel TLS, which keeps the key
//! schedule for key updates) 1,311. What a connection needs once the
//! handshake is over is less: each direction's traffic secret, key, IV and
//! sequence number, 200 bytes. So the handshake runs on rustls's unbuffered
//! API (src/handshake.rs); `dangerous_into_kernel_connection` then hands
//! over the keys and sequence numbers, the handshake's key log
//! ([`SecretCapture`]) the two application traffic secrets, and this module
//! does what a kernel would do with them: AEAD with ring (the nonce of RFC
//! 8446 §5.3, the inner content type and padding of §5.2), KeyUpdate
//! (§4.6.3, the next secret by HKDF-Expand-Label, §7.1-7.2) and alerts.
//! The expanded AEAD keys are built on first use and dropped when the
//! connection parks ([`Keys::shed`]); a parked TLS connection then holds
//! the [`Keys`] box and nothing else of TLS.
//!
//! Anything else a peer sends after the handshake (a record that is not
//! application data on the outside, a record that does not authenticate, a
//! handshake message other than KeyUpdate, an alert other than
//! close_notify, a record longer than the RFC allows) is an error: the
//! connection closes, as rustls would close it.

use std::cell::RefCell;

use ring::{aead, hkdf};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// The most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_PLAINTEXT: usize = 16_384;
/// The longest encrypted record body a peer may send (§5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// A record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag of every suite TLS 1.3 has.
const TAG: usize = 16;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;

/// Records in a row that carry no application data (empty ones, key
/// updates) before the peer is cut off: each costs it a few bytes and us
/// an AEAD operation (and a KeyUpdate an answer, sealed whether or not the
/// peer reads), so an endless run of them would spin a worker and grow the
/// output. rustls allows 32 empty fragments in a row.
const MAX_EMPTY_IN_A_ROW: u8 = 32;

/// Why a record was refused; each closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("TLS record longer than RFC 8446 allows")]
    Overflow,
    #[error("TLS record failed to authenticate")]
    BadRecordMac,
    #[error("unexpected TLS record or message (type {0})")]
    Unexpected(u8),
    #[error("TLS alert {0} from the peer")]
    Alert(u8),
    #[error("TLS key update failed")]
    KeyUpdate,
    #[error("TLS sequence numbers exhausted")]
    Exhausted,
    #[error("too many TLS records in a row without application data")]
    TooManyEmpty,
}

impl From<RecordError> for std::io::Error {
    fn from(e: RecordError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

/// One direction's traffic key: the secret itself (so that a parked
/// connection can drop the expanded key and build it again) and its
/// record sequence number.
struct Traffic {
    alg: &'static aead::Algorithm,
    /// The suite's hash, for the next generation's secret.
    hash: hkdf::Algorithm,
    /// The application traffic secret of this generation.
    secret: Secret,
    key: [u8; 32],
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
    /// The expanded key, built on first use; dropped by [`Keys::shed`].
    expanded: Option<Box<aead::LessSafeKey>>,
}

impl Traffic {
    /// One direction from rustls's keys and sequence number and the
    /// traffic secret they were derived from; refused when the secret does
    /// not give these keys (a secret from another handshake).
    fn new(seq: u64, keys: ConnectionTrafficSecrets, secret: Secret) -> Result<Self, RecordError> {
        let (alg, hash, key, iv) = match keys {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                (&aead::AES_128_GCM, hkdf::HKDF_SHA256, key, iv)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                (&aead::AES_256_GCM, hkdf::HKDF_SHA384, key, iv)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, key, iv)
            }
            _ => return Err(RecordError::KeyUpdate),
        };
        if secret.len() != hkdf::KeyType::len(&hash) {
            return Err(RecordError::KeyUpdate);
        }
        let t = Self::derive(alg, hash, secret, seq)?;
        if t.key[..alg.key_len()] != *key.as_ref() || t.iv[..] != *iv.as_ref() {
            return Err(RecordError::KeyUpdate);
        }
        Ok(t)
    }

    /// The key and IV of `secret` (RFC 8446 §7.3).
    fn derive(
        alg: &'static aead::Algorithm,
        hash: hkdf::Algorithm,
        secret: Secret,
        seq: u64,
    ) -> Result<Self, RecordError> {
        let mut t = Self {
            alg,
            hash,
            secret,
            key: [0; 32],
            iv: [0; aead::NONCE_LEN],
            seq,
            expanded: None,
        };
        let key_len = alg.key_len();
        expand_label(hash, t.secret.bytes(), b"key", &mut t.key[..key_len])?;
        expand_label(hash, t.secret.bytes(), b"iv", &mut t.iv)?;
        Ok(t)
    }

    /// The next generation (a KeyUpdate, §7.2): a new secret, key and IV,
    /// and the sequence number back at 0.
    fn next(&self) -> Result<Self, RecordError> {
        let mut next = Secret {
            len: self.secret.len,
            ..Secret::default()
        };
        expand_label(
            self.hash,
            self.secret.bytes(),
            b"traffic upd",
            &mut next.bytes[..usize::from(self.secret.len)],
        )?;
        Self::derive(self.alg, self.hash, next, 0)
    }

    fn expanded(&mut self) -> Result<&aead::LessSafeKey, RecordError> {
        if self.expanded.is_none() {
            let unbound = aead::UnboundKey::new(self.alg, &self.key[..self.alg.key_len()])
                .map_err(|_| RecordError::KeyUpdate)?;
            self.expanded = Some(Box::new(aead::LessSafeKey::new(unbound)));
        }
        self.expanded.as_deref().ok_or(RecordError::KeyUpdate)
    }

    /// The nonce of the current record (§5.3), and the sequence number
    /// moved on.
    fn next_nonce(&mut self) -> Result<aead::Nonce, RecordError> {
        let mut n = self.iv;
        for (b, s) in n[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *b ^= s;
        }
        self.seq = self.seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        // Best effort: the secret should not outlive the connection in
        // freed memory.
        for b in self.key.iter_mut().chain(self.iv.iter_mut()) {
            // SAFETY: a plain write to a byte we own; volatile so that it
            // is not removed as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1), into `out`.
fn expand_label(
    hash: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    out: &mut [u8],
) -> Result<(), RecordError> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let (Ok(len), Ok(label_len)) = (u16::try_from(out.len()), u8::try_from(6 + label.len())) else {
        return Err(RecordError::KeyUpdate);
    };
    let prk = hkdf::Prk::new_less_safe(hash, secret);
    let info: [&[u8]; 5] = [&len.to_be_bytes(), &[label_len], b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| RecordError::KeyUpdate)
}

/// A traffic secret (32 or 48 bytes, by the suite's hash), zeroed when
/// dropped.
pub struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Default for Secret {
    fn default() -> Self {
        Self {
            bytes: [0; 48],
            len: 0,
        }
    }
}

impl Secret {
    fn from_slice(s: &[u8]) -> Option<Self> {
        let mut out = Self::default();
        out.bytes.get_mut(..s.len())?.copy_from_slice(s);
        out.len = u8::try_from(s.len()).ok()?;
        Some(out)
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn len(&self) -> usize {
        usize::from(self.len)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in &mut self.bytes {
            // SAFETY: a plain write to a byte we own; volatile so that it
            // is not removed as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// The application traffic secrets of one handshake: the client's (what
/// we receive) and the server's (what we send).
#[derive(Default)]
pub struct TrafficSecrets {
    client: Option<Secret>,
    server: Option<Secret>,
}

thread_local! {
    /// What the key log caught during the current call into rustls.
    static CAUGHT: RefCell<TrafficSecrets> = RefCell::new(TrafficSecrets::default());
}

/// A rustls key log that catches the two application traffic secrets of a
/// handshake (rustls hands them to a key log and to no other interface; a
/// key update needs them). rustls calls it synchronously, inside the call
/// that derives them, on the caller's thread: the handshake empties the
/// thread's slot before each call into rustls ([`SecretCapture::clear`])
/// and takes what came right after ([`SecretCapture::take`]), so what it
/// takes is its own handshake's. [`Keys::new`] checks it besides: the
/// secrets must give the keys rustls hands over.
#[derive(Debug, Default)]
pub struct SecretCapture;

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for SecretCapture {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAUGHT.with(|c| {
            let mut c = c.borrow_mut();
            match label {
                CLIENT_SECRET => c.client = Secret::from_slice(secret),
                SERVER_SECRET => c.server = Secret::from_slice(secret),
                _ => {}
            }
        });
    }
}

impl SecretCapture {
    /// Empties this thread's slot: before a call into rustls.
    pub fn clear() {
        CAUGHT.with(|c| *c.borrow_mut() = TrafficSecrets::default());
    }

    /// What the last call into rustls on this thread logged, merged into
    /// `into`.
    pub fn take(into: &mut TrafficSecrets) {
        let caught = CAUGHT.with(|c| std::mem::take(&mut *c.borrow_mut()));
        if caught.client.is_some() {
            into.client = caught.client;
        }
        if caught.server.is_some() {
            into.server = caught.server;
        }
    }
}

/// What opening the record at the front of a buffer gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// The buffer holds less than one whole record.
    Partial,
    /// Application data: `data` is where its plaintext now is in the
    /// buffer; `used` bytes of the buffer are done with.
    Data {
        used: usize,
        data: std::ops::Range<usize>,
    },
    /// A record for TLS itself (a KeyUpdate, handled; any answer was
    /// sealed onto the output).
    Control { used: usize },
    /// The peer's close_notify: nothing more will come.
    Closed { used: usize },
}

/// A TLS 1.3 connection's state after its handshake. Boxed: it travels
/// with the connection when it parks.
pub struct Keys {
    tx: Traffic,
    rx: Traffic,
    /// Records in a row without application data.
    empty: u8,
}

impl Keys {
    /// The keys of a finished handshake: rustls's keys and sequence
    /// numbers, and the traffic secrets its key log gave.
    ///
    /// # Errors
    /// [`RecordError::KeyUpdate`] for a missing secret, a secret that does
    /// not give rustls's keys, or a cipher suite this module does not know
    /// (TLS 1.3 has three; rustls may add more).
    pub fn new(keys: ExtractedSecrets, secrets: TrafficSecrets) -> Result<Box<Self>, RecordError> {
        let ExtractedSecrets { tx, rx } = keys;
        let (Some(client), Some(server)) = (secrets.client, secrets.server) else {
            return Err(RecordError::KeyUpdate);
        };
        Ok(Box::new(Self {
            tx: Traffic::new(tx.0, tx.1, server)?,
            rx: Traffic::new(rx.0, rx.1, client)?,
            empty: 0,
        }))
    }

    /// Drops the expanded AEAD keys (about 1 KB with their boxes); the next
    /// record builds them again from the secrets. For a connection that
    /// parks.
    pub fn shed(&mut self) {
        self.tx.expanded = None;
        self.rx.expanded = None;
    }

    /// Seals one record of application data, from the start of `data` (at
    /// most [`MAX_PLAINTEXT`] bytes of it), onto the end of `out`. Returns
    /// how many bytes of `data` it took.
    ///
    /// # Errors
    /// [`RecordError::Exhausted`] after 2^64 records.
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<usize, RecordError> {
        let n = data.len().min(MAX_PLAINTEXT);
        self.seal_typed(APPLICATION_DATA, &data[..n], out)?;
        Ok(n)
    }

    /// Seals a close_notify alert onto `out`.
    ///
    /// # Errors
    /// As [`Keys::seal`].
    pub fn seal_close_notify(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.seal_typed(ALERT, &[1, 0], out)
    }

    fn seal_typed(&mut self, typ: u8, data: &[u8], out: &mut Vec<u8>) -> Result<(), RecordError> {
        let len = data.len() + 1 + TAG;
        let Ok(len16) = u16::try_from(len) else {
            return Err(RecordError::Overflow);
        };
        let [hi, lo] = len16.to_be_bytes();
        let header = [APPLICATION_DATA, 3, 3, hi, lo];
        let nonce = self.tx.next_nonce()?;
        let start = out.len();
        out.reserve(HEADER + len);
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out.push(typ);
        let tag = self
            .tx
            .expanded()?
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut out[start + HEADER..])
            .map_err(|_| RecordError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the record at the front of `buf`, in place. A KeyUpdate that
    /// asks for ours seals it onto `out`.
    ///
    /// # Errors
    /// [`RecordError`]: the connection must close.
    pub fn open(&mut self, buf: &mut [u8], out: &mut Vec<u8>) -> Result<Opened, RecordError> {
        let Some(header) = buf.get(..HEADER) else {
            return Ok(Opened::Partial);
        };
        let header: [u8; HEADER] = [header[0], header[1], header[2], header[3], header[4]];
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::Unexpected(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow);
        }
        if len <= TAG {
            return Err(RecordError::BadRecordMac);
        }
        let used = HEADER + len;
        let Some(body) = buf.get_mut(HEADER..used) else {
            return Ok(Opened::Partial);
        };
        let nonce = self.rx.next_nonce()?;
        let plain = self
            .rx
            .expanded()?
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| RecordError::BadRecordMac)?;
        // The inner type is the last byte that is not padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::Unexpected(0));
        };
        let typ = plain[end];
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Overflow);
        }
        if typ == APPLICATION_DATA && end > 0 {
            self.empty = 0;
        } else {
            self.empty += 1;
            if self.empty > MAX_EMPTY_IN_A_ROW {
                return Err(RecordError::TooManyEmpty);
            }
        }
        match typ {
            APPLICATION_DATA => Ok(Opened::Data {
                used,
                data: HEADER..HEADER + end,
            }),
            ALERT => match plain[..end] {
                [_, 0] => Ok(Opened::Closed { used }),
                [_, d] => Err(RecordError::Alert(d)),
                _ => Err(RecordError::Unexpected(ALERT)),
            },
            HANDSHAKE => {
                let request = match plain[..end] {
                    [KEY_UPDATE, 0, 0, 1, r @ (0 | 1)] => r,
                    [t, ..] => return Err(RecordError::Unexpected(t)),
                    [] => return Err(RecordError::Unexpected(HANDSHAKE)),
                };
                self.key_update(request == 1, out)?;
                Ok(Opened::Control { used })
            }
            t => Err(RecordError::Unexpected(t)),
        }
    }

    /// The peer's KeyUpdate: new receive keys; when it asks, our own
    /// KeyUpdate (sealed with the old keys, §4.6.3) and new send keys.
    fn key_update(&mut self, requested: bool, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.rx = self.rx.next()?;
        if requested {
            self.seal_typed(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out)?;
            self.tx = self.tx.next()?;
        }
        Ok(())
    }
}

/// What a finished handshake hands to the connection.
pub struct Established<IO> {
    pub io: IO,
    pub keys: Box<Keys>,
    /// Ciphertext read past the handshake (part of the next record).
    pub input: Vec<u8>,
    /// Plaintext that came with the handshake's last flight (a Login sent
    /// with the client's Finished).
    pub early: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::server::UnbufferedServerConnection;
    use rustls::unbuffered::ConnectionState;

    /// A rustls client and our keys for the server end of one finished
    /// handshake, run in memory.
    fn pair() -> (rustls::ClientConnection, Box<Keys>) {
        let (c, keys, secrets) = handshake();
        (c, Keys::new(keys, secrets).unwrap())
    }

    /// A finished handshake: the client, rustls's keys, and what the key
    /// log caught.
    fn handshake() -> (rustls::ClientConnection, ExtractedSecrets, TrafficSecrets) {
        let (mut server, client) = crate::tls::test_configs();
        server.enable_secret_extraction = true;
        server.key_log = Arc::new(SecretCapture);
        let name = crate::tls::server_name("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = UnbufferedServerConnection::new(Arc::new(server)).unwrap();
        let mut to_server = Vec::new();
        let mut secrets = TrafficSecrets::default();
        for _ in 0..8 {
            while c.wants_write() {
                c.write_tls(&mut to_server).unwrap();
            }
            let mut to_client = Vec::new();
            let mut done = false;
            loop {
                SecretCapture::clear();
                let st = s.process_tls_records(&mut to_server);
                SecretCapture::take(&mut secrets);
                let discard = st.discard;
                let stop = match st.state.unwrap() {
                    ConnectionState::EncodeTlsData(mut e) => {
                        let mut buf = vec![0; 16 * 1024];
                        let n = e.encode(&mut buf).unwrap();
                        to_client.extend_from_slice(&buf[..n]);
                        false
                    }
                    ConnectionState::TransmitTlsData(t) => {
                        t.done();
                        false
                    }
                    ConnectionState::BlockedHandshake => true,
                    ConnectionState::WriteTraffic(_) => {
                        done = true;
                        true
                    }
                    other => panic!("{other:?}"),
                };
                to_server.drain(..discard);
                if stop {
                    break;
                }
            }
            feed_client(&mut c, &to_client);
            if done && !c.is_handshaking() {
                let (keys, _) = s.dangerous_into_kernel_connection().unwrap();
                return (c, keys, secrets);
            }
        }
        panic!("no handshake")
    }

    fn feed_client(c: &mut rustls::ClientConnection, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            c.read_tls(&mut bytes).unwrap();
            c.process_new_packets().unwrap();
        }
    }

    fn client_sends(c: &mut rustls::ClientConnection, data: &[u8]) -> Vec<u8> {
        c.writer().write_all(data).unwrap();
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        out
    }

    fn client_reads(c: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = c.reader().read_to_end(&mut got);
        got
    }

    /// Opens every record in `buf`; the application data, and whether a
    /// close_notify came.
    fn open_all(keys: &mut Keys, mut buf: Vec<u8>, out: &mut Vec<u8>) -> (Vec<u8>, bool) {
        let (mut data, mut closed) = (Vec::new(), false);
        loop {
            match keys.open(&mut buf, out).unwrap() {
                Opened::Partial => {
                    assert!(buf.is_empty(), "{} bytes left", buf.len());
                    return (data, closed);
                }
                Opened::Data { used, data: r } => {
                    data.extend_from_slice(&buf[r]);
                    buf.drain(..used);
                }
                Opened::Control { used } => {
                    buf.drain(..used);
                }
                Opened::Closed { used } => {
                    closed = true;
                    buf.drain(..used);
                }
            }
        }
    }

    #[test]
    fn records_go_both_ways_across_a_shed_and_a_partial_read() {
        let (mut c, mut keys) = pair();
        let mut out = Vec::new();
        let wire = client_sends(&mut c, b"login");
        // A record arriving in two parts: nothing until it is whole.
        let mut part = wire[..wire.len() - 3].to_vec();
        assert_eq!(keys.open(&mut part, &mut out).unwrap(), Opened::Partial);
        assert_eq!(
            open_all(&mut keys, wire, &mut out),
            (b"login".to_vec(), false)
        );
        keys.seal(b"ok", &mut out).unwrap();
        feed_client(&mut c, &out);
        assert_eq!(client_reads(&mut c), b"ok");
        // Parked: the expanded keys go, and come back from the secrets.
        keys.shed();
        let wire = client_sends(&mut c, b"ping");
        let mut out = Vec::new();
        assert_eq!(open_all(&mut keys, wire, &mut out).0, b"ping");
        keys.seal(b"pong", &mut out).unwrap();
        feed_client(&mut c, &out);
        assert_eq!(client_reads(&mut c), b"pong");
        // A big write takes one record's worth.
        let big = vec![7u8; MAX_PLAINTEXT + 10];
        let mut out = Vec::new();
        assert_eq!(keys.seal(&big, &mut out).unwrap(), MAX_PLAINTEXT);
        feed_client(&mut c, &out);
        assert_eq!(client_reads(&mut c).len(), MAX_PLAINTEXT);
    }

    #[test]
    fn a_key_update_the_client_asks_for_is_answered_and_both_sides_move_on() {
        let (mut c, mut keys) = pair();
        // rustls's client sends KeyUpdate(update_requested).
        c.refresh_traffic_keys().unwrap();
        let wire = client_sends(&mut c, b"after update");
        let mut out = Vec::new();
        assert_eq!(open_all(&mut keys, wire, &mut out).0, b"after update");
        assert!(!out.is_empty(), "our KeyUpdate is sealed");
        keys.seal(b"new keys", &mut out).unwrap();
        feed_client(&mut c, &out);
        assert_eq!(client_reads(&mut c), b"new keys");
        // And again, the next generation.
        c.refresh_traffic_keys().unwrap();
        let wire = client_sends(&mut c, b"again");
        let mut out = Vec::new();
        assert_eq!(open_all(&mut keys, wire, &mut out).0, b"again");
        keys.seal(b"fine", &mut out).unwrap();
        feed_client(&mut c, &out);
        assert_eq!(client_reads(&mut c), b"fine");
    }

    #[test]
    fn close_notify_ends_the_stream_both_ways() {
        let (mut c, mut keys) = pair();
        c.send_close_notify();
        let mut wire = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let mut out = Vec::new();
        assert_eq!(open_all(&mut keys, wire, &mut out), (Vec::new(), true));
        keys.seal_close_notify(&mut out).unwrap();
        let mut r = &out[..];
        c.read_tls(&mut r).unwrap();
        let state = c.process_new_packets().unwrap();
        assert!(state.peer_has_closed());
    }

    #[test]
    fn what_does_not_authenticate_or_fit_the_rfc_is_refused() {
        let (mut c, mut keys) = pair();
        let mut out = Vec::new();
        // A flipped bit in the body.
        let mut wire = client_sends(&mut c, b"hello");
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert_eq!(
            keys.open(&mut wire, &mut out),
            Err(RecordError::BadRecordMac)
        );
        // A plaintext alert, a handshake record, a change_cipher_spec
        // after the handshake.
        for typ in [21u8, 22, 20] {
            let mut r = vec![typ, 3, 3, 0, 2, 1, 0];
            assert_eq!(
                keys.open(&mut r, &mut out),
                Err(RecordError::Unexpected(typ))
            );
        }
        // A length past the RFC's, refused before the body comes.
        let mut r = vec![23, 3, 3, 0x48, 0x01];
        assert_eq!(keys.open(&mut r, &mut out), Err(RecordError::Overflow));
        // Shorter than a tag.
        let mut r = vec![23, 3, 3, 0, 3, 1, 2, 3];
        assert_eq!(keys.open(&mut r, &mut out), Err(RecordError::BadRecordMac));
        assert!(out.is_empty(), "nothing sealed for refused records");
    }

    #[test]
    fn endless_empty_records_or_key_updates_are_cut_off() {
        let (mut c, mut keys) = pair();
        let mut out = Vec::new();
        // A few in a row are fine, and data resets the count.
        for _ in 0..MAX_EMPTY_IN_A_ROW {
            c.refresh_traffic_keys().unwrap();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            assert!(matches!(
                keys.open(&mut wire, &mut out),
                Ok(Opened::Control { .. })
            ));
        }
        let wire = client_sends(&mut c, b"data");
        assert_eq!(open_all(&mut keys, wire, &mut out).0, b"data");
        // An endless run is cut off.
        let mut err = None;
        for _ in 0..=MAX_EMPTY_IN_A_ROW {
            c.refresh_traffic_keys().unwrap();
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            if let Err(e) = keys.open(&mut wire, &mut out) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(RecordError::TooManyEmpty));
    }

    #[test]
    fn secrets_that_do_not_give_rustls_keys_are_refused() {
        // Another handshake's secrets (what a key log mix-up would give).
        let (_, keys, _) = handshake();
        let (_, _, other) = handshake();
        assert_eq!(Keys::new(keys, other).err(), Some(RecordError::KeyUpdate));
        // One missing.
        let (_, keys, mut secrets) = handshake();
        secrets.server = None;
        assert_eq!(Keys::new(keys, secrets).err(), Some(RecordError::KeyUpdate));
    }

    /// Both directions from one secret (ChaCha20-Poly1305, SHA-256): a
    /// peer whose sealing this side can open, with no handshake.
    fn twin_keys(secret: u8) -> Box<Keys> {
        let t = || {
            let s = Secret::from_slice(&[secret; 32]).unwrap();
            Traffic::derive(&aead::CHACHA20_POLY1305, hkdf::HKDF_SHA256, s, 0).unwrap()
        };
        Box::new(Keys {
            tx: t(),
            rx: t(),
            empty: 0,
        })
    }

    /// What a hostile peer may put on the wire: records sealed with the
    /// right keys (any inner type, any content, any padding), or raw bytes.
    #[derive(Debug, Clone)]
    enum Piece {
        Sealed {
            typ: u8,
            content: Vec<u8>,
            pad: usize,
        },
        Raw(Vec<u8>),
    }

    fn piece() -> impl proptest::strategy::Strategy<Value = Piece> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (
                prop_oneof![Just(APPLICATION_DATA), Just(ALERT), Just(HANDSHAKE), any::<u8>()],
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    Just(vec![KEY_UPDATE, 0, 0, 1, 1]),
                    Just(vec![KEY_UPDATE, 0, 0, 1, 0]),
                    Just(vec![1, 0]),
                    Just(vec![2, 40]),
                ],
                0usize..40,
            )
                .prop_map(|(typ, content, pad)| Piece::Sealed { typ, content, pad }),
            1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Piece::Raw),
        ]
    }

    proptest::proptest! {
        #[test]
        fn any_records_a_peer_sends_are_opened_or_refused_never_garbled(
            pieces in proptest::collection::vec(piece(), 1..40),
            split in 1usize..64,
        ) {
            let mut peer = twin_keys(7);
            let mut keys = twin_keys(7);
            let mut wire = Vec::new();
            // The application data the sealed records give, in order, as
            // long as every record before was sealed whole and carries
            // application data (the inner type is the last non-zero byte).
            let mut expected = Vec::new();
            let mut clean = true;
            for p in &pieces {
                match p {
                    Piece::Sealed { typ, content, pad } => {
                        let mut body = content.clone();
                        body.push(*typ);
                        body.resize(body.len() + pad, 0);
                        let mut out = Vec::new();
                        let last = body.pop().unwrap_or(0);
                        peer.seal_typed(last, &body, &mut out).unwrap();
                        wire.extend_from_slice(&out);
                        body.push(last);
                        let end = body.iter().rposition(|&b| b != 0);
                        match end {
                            Some(e) if clean && body[e] == APPLICATION_DATA => {
                                expected.extend_from_slice(&body[..e]);
                            }
                            _ => clean = false,
                        }
                    }
                    Piece::Raw(b) => {
                        wire.extend_from_slice(b);
                        clean = false;
                    }
                }
            }
            // Fed in pieces of `split` bytes, as a socket would give them.
            let mut input = Vec::new();
            let mut got = Vec::new();
            let mut out = Vec::new();
            let mut refused = false;
            'feed: for chunk in wire.chunks(split) {
                input.extend_from_slice(chunk);
                loop {
                    match keys.open(&mut input, &mut out) {
                        Ok(Opened::Partial) => break,
                        Ok(Opened::Data { used, data }) => {
                            proptest::prop_assert!(data.end <= used && used <= input.len());
                            got.extend_from_slice(&input[data]);
                            input.drain(..used);
                        }
                        Ok(Opened::Control { used } | Opened::Closed { used }) => {
                            proptest::prop_assert!(used <= input.len());
                            input.drain(..used);
                        }
                        Err(_) => {
                            refused = true;
                            break 'feed;
                        }
                    }
                }
            }
            // Up to the first record that is not plain application data,
            // what came out is exactly what was sealed; past it, whatever
            // came out must not have been refused first.
            proptest::prop_assert!(
                got.starts_with(&expected) || (refused && expected.starts_with(&got)),
                "got {} bytes, expected {} (refused: {refused})", got.len(), expected.len()
            );
            if clean && !refused {
                proptest::prop_assert_eq!(&got, &expected);
            }
        }
    }

    #[test]
    fn the_keys_box_of_a_parked_connection_is_small() {
        let (_c, mut keys) = pair();
        keys.shed();
        // All a parked connection keeps of TLS, with the wire's box.
        assert!(
            std::mem::size_of::<Keys>() <= 320,
            "{}",
            std::mem::size_of::<Keys>()
        );
    }
}
