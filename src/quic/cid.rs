//! QUIC connection IDs that a UDP load balancer can route: the QUIC-LB format
//! of draft-ietf-quic-load-balancers-21.
//!
//! Several gateway nodes sit behind one UDP load balancer. A QUIC connection
//! outlives its client's address (phones move between networks), so the
//! balancer cannot route by 4-tuple: it must find the node in the packet
//! itself. The only stable field is the destination connection ID, which the
//! node chose. So every node writes its *server ID* into the connection IDs it
//! issues, and the balancer reads it back out, without any per-connection
//! state.
//!
//! A connection ID is one first octet and a block:
//!
//! ```text
//! first octet: config id (3 bits) | length of the block (5 bits)
//! block:       server id (1..=15 bytes) | nonce (4..=18 bytes), at most 19
//! ```
//!
//! With a key, the block is encrypted with AES-128 (one block when it is
//! exactly 16 bytes, a four-round Feistel network over AES otherwise), so an
//! observer cannot tell which node holds a connection, nor link the old and
//! new connection IDs of a client that migrated. Without a key the server ID is
//! readable in every connection ID: an observer can link all connection IDs of
//! one node to each other, and thus to the node, which weakens the privacy
//! that QUIC migration is meant to give. The draft allows it; the docs say so.
//!
//! The nonce is random (`rand`'s thread RNG, a CSPRNG) rather than a counter:
//! a counter leaks nothing under a key, but without one it would make
//! consecutive connection IDs linkable.
//!
//! The AES block cipher comes from the `aes` crate. The QUIC-LB framing and the
//! four-pass Feistel network are written here because no crate implements
//! QUIC-LB; they are short, and the draft's test vectors below pin them down
//! byte for byte.

use std::fmt;
use std::time::Duration;

use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::Aes128;
use quinn::{ConnectionId, ConnectionIdGenerator};
use quinn_proto::InvalidCid;
use rand::RngCore;

use crate::config::cid::Hex;
pub use crate::config::cid::{
    CidConfig, CidKey, MAX_BLOCK_LEN, MAX_SERVER_ID_LEN, MIN_NONCE_LEN, UNROUTABLE_CONFIG_ID,
};

/// Why a connection ID could not be decoded (the load balancer then routes
/// the packet by its fallback, e.g. the 4-tuple).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    /// The configuration itself is out of range (see [`CidConfig::validate`]).
    #[error("invalid QUIC-LB configuration: {0}")]
    InvalidConfig(String),
    /// The config id bits are 0b111: the issuer had no configuration.
    #[error("connection ID is marked unroutable")]
    Unroutable,
    /// The config id bits name another configuration.
    #[error("connection ID has config id {actual}, expected {expected}")]
    ConfigId { expected: u8, actual: u8 },
    /// The connection ID is not as long as the configuration makes them.
    #[error("connection ID is {actual} bytes, expected {expected}")]
    Length { expected: usize, actual: usize },
}

/// What a load balancer reads from a connection ID.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// The config rotation codepoint of the first octet.
    pub config_id: u8,
    server_id: [u8; MAX_SERVER_ID_LEN],
    server_id_len: u8,
}

impl Decoded {
    /// The server ID: the node to route to.
    pub fn server_id(&self) -> &[u8] {
        &self.server_id[..usize::from(self.server_id_len)]
    }
}

impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("config_id", &self.config_id)
            .field("server_id", &Hex(self.server_id()))
            .finish()
    }
}

/// Decodes a connection ID as a load balancer does: checks the config id and
/// the length, decrypts, and returns the server ID. It does not check that the
/// server ID belongs to a node: that is the caller's table.
///
/// Never panics, whatever `cfg` and `cid` hold. It expands the AES key on
/// every call; to decode many packets, build a [`CidCodec`] once.
pub fn decode(cfg: &CidConfig, cid: &[u8]) -> Result<Decoded, CidError> {
    CidCodec::new(cfg)?.decode(cid)
}

/// One QUIC-LB configuration, ready to encode and decode: lengths checked and
/// the AES key expanded once.
#[derive(Clone)]
pub struct CidCodec {
    config_id: u8,
    server_id_len: usize,
    nonce_len: usize,
    cipher: Option<Aes128>,
}

impl fmt::Debug for CidCodec {
    // The expanded key is the key: never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CidCodec")
            .field("config_id", &self.config_id)
            .field("server_id_len", &self.server_id_len)
            .field("nonce_len", &self.nonce_len)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

impl CidCodec {
    /// Checks `cfg` and expands its key.
    pub fn new(cfg: &CidConfig) -> Result<Self, CidError> {
        cfg.validate()
            .map_err(|e| CidError::InvalidConfig(e.to_string()))?;
        Ok(Self {
            config_id: cfg.config_id,
            server_id_len: cfg.server_id.len(),
            nonce_len: usize::from(cfg.nonce_len),
            cipher: cfg.key.as_ref().map(|k| Aes128::new(&Array::from(k.0))),
        })
    }

    /// Server ID plus nonce: the bytes after the first octet.
    fn block_len(&self) -> usize {
        self.server_id_len + self.nonce_len
    }

    /// Length of every connection ID of this configuration.
    pub fn cid_len(&self) -> usize {
        1 + self.block_len()
    }

    /// Config id in the top 3 bits, then the length of the rest (at most 19,
    /// so it fits the 5 bits): the draft's length self-description.
    fn first_octet(&self) -> u8 {
        // block_len() <= 19 is checked by CidConfig::validate.
        self.config_id << 5 | self.block_len() as u8
    }

    /// The connection ID for `server_id` and `nonce`, whose lengths must be
    /// this configuration's (the generator's and the tests' business).
    fn encode(&self, server_id: &[u8], nonce: &[u8]) -> ConnectionId {
        debug_assert_eq!(server_id.len(), self.server_id_len);
        debug_assert_eq!(nonce.len(), self.nonce_len);
        let mut cid = [0u8; 1 + MAX_BLOCK_LEN];
        cid[0] = self.first_octet();
        let block = &mut cid[1..self.cid_len()];
        block[..self.server_id_len].copy_from_slice(server_id);
        block[self.server_id_len..].copy_from_slice(nonce);
        if let Some(cipher) = &self.cipher {
            if block.len() == 16 {
                single_pass(cipher, block, Dir::Encrypt);
            } else {
                four_pass_encrypt(cipher, block);
            }
        }
        ConnectionId::new(&cid[..self.cid_len()])
    }

    /// The load balancer's side of [`decode`].
    pub fn decode(&self, cid: &[u8]) -> Result<Decoded, CidError> {
        let expected = self.cid_len();
        let Some(&first) = cid.first() else {
            return Err(CidError::Length {
                expected,
                actual: 0,
            });
        };
        let config_id = first >> 5;
        if config_id == UNROUTABLE_CONFIG_ID {
            return Err(CidError::Unroutable);
        }
        if config_id != self.config_id {
            return Err(CidError::ConfigId {
                expected: self.config_id,
                actual: config_id,
            });
        }
        if cid.len() != expected {
            return Err(CidError::Length {
                expected,
                actual: cid.len(),
            });
        }
        let mut block = [0u8; MAX_BLOCK_LEN];
        let block = &mut block[..self.block_len()];
        block.copy_from_slice(&cid[1..]);
        if let Some(cipher) = &self.cipher {
            if block.len() == 16 {
                single_pass(cipher, block, Dir::Decrypt);
            } else {
                // The draft's shortcut: a server ID no longer than the nonce
                // lies whole in the left half, which three passes recover.
                let passes = if self.server_id_len <= self.nonce_len {
                    3
                } else {
                    4
                };
                four_pass_decrypt(cipher, block, passes);
            }
        }
        let mut server_id = [0u8; MAX_SERVER_ID_LEN];
        server_id[..self.server_id_len].copy_from_slice(&block[..self.server_id_len]);
        Ok(Decoded {
            config_id,
            server_id,
            // At most 15, checked by CidConfig::validate.
            server_id_len: self.server_id_len as u8,
        })
    }
}

#[derive(Clone, Copy)]
enum Dir {
    Encrypt,
    Decrypt,
}

/// Server ID plus nonce of exactly 16 bytes: one AES-128-ECB block.
fn single_pass(cipher: &Aes128, block: &mut [u8], dir: Dir) {
    let mut b = [0u8; 16];
    b.copy_from_slice(block);
    let mut b = Array::from(b);
    match dir {
        Dir::Encrypt => cipher.encrypt_block(&mut b),
        Dir::Decrypt => cipher.decrypt_block(&mut b),
    }
    block.copy_from_slice(&b);
}

/// The two halves of the four-pass Feistel network. Each is `half` =
/// ceil(len / 2) bytes; for an odd length the middle octet is split by
/// nibbles, so the left half keeps its high nibble (low nibble zero) and the
/// right half its low nibble (high nibble zero).
struct Halves {
    left: [u8; MAX_BLOCK_LEN.div_ceil(2)],
    right: [u8; MAX_BLOCK_LEN.div_ceil(2)],
    half: usize,
    odd: bool,
    /// Block length, written into every AES input so that each length has
    /// its own round functions.
    len: u8,
}

impl Halves {
    fn split(block: &[u8]) -> Self {
        let len = block.len();
        let half = len.div_ceil(2);
        let mut h = Self {
            left: [0; MAX_BLOCK_LEN.div_ceil(2)],
            right: [0; MAX_BLOCK_LEN.div_ceil(2)],
            half,
            odd: len % 2 == 1,
            // At most 19, checked by CidConfig::validate.
            len: len as u8,
        };
        h.left[..half].copy_from_slice(&block[..half]);
        h.right[..half].copy_from_slice(&block[len - half..]);
        h.clear_left();
        h.clear_right();
        h
    }

    fn clear_left(&mut self) {
        if self.odd {
            self.left[self.half - 1] &= 0xf0;
        }
    }

    fn clear_right(&mut self) {
        if self.odd {
            self.right[0] &= 0x0f;
        }
    }

    /// right ^= truncate(AES(expand(len, pass, left)), half)
    fn right_from_left(&mut self, cipher: &Aes128, pass: u8) {
        let n = self.half;
        xor_round(
            cipher,
            self.len,
            pass,
            &self.left[..n],
            &mut self.right[..n],
        );
        self.clear_right();
    }

    /// left ^= truncate(AES(expand(len, pass, right)), half)
    fn left_from_right(&mut self, cipher: &Aes128, pass: u8) {
        let n = self.half;
        xor_round(
            cipher,
            self.len,
            pass,
            &self.right[..n],
            &mut self.left[..n],
        );
        self.clear_left();
    }

    /// Left then right, the shared middle octet (odd lengths) put together
    /// from the two nibbles.
    fn join(&self, block: &mut [u8]) {
        let n = self.half;
        block[..n].copy_from_slice(&self.left[..n]);
        if self.odd {
            block[n - 1] |= self.right[0];
            block[n..].copy_from_slice(&self.right[1..n]);
        } else {
            block[n..].copy_from_slice(&self.right[..n]);
        }
    }
}

/// One Feistel round: AES-128 over the draft's `expand(len, pass, input)`
/// (input, zeros, then len and pass in the last two octets), truncated to the
/// half's length and XORed into `target`.
fn xor_round(cipher: &Aes128, len: u8, pass: u8, input: &[u8], target: &mut [u8]) {
    let mut b = [0u8; 16];
    b[..input.len()].copy_from_slice(input);
    b[14] = len;
    b[15] = pass;
    let mut b = Array::from(b);
    cipher.encrypt_block(&mut b);
    for (t, k) in target.iter_mut().zip(b.iter()) {
        *t ^= k;
    }
}

/// The draft's four-pass encryption, for any length but 16.
fn four_pass_encrypt(cipher: &Aes128, block: &mut [u8]) {
    let mut h = Halves::split(block);
    h.right_from_left(cipher, 1);
    h.left_from_right(cipher, 2);
    h.right_from_left(cipher, 3);
    h.left_from_right(cipher, 4);
    h.join(block);
}

/// The passes in reverse. With `passes` = 3 the right half (the nonce's end)
/// stays encrypted; only the left half is plaintext afterwards.
fn four_pass_decrypt(cipher: &Aes128, block: &mut [u8], passes: u8) {
    let mut h = Halves::split(block);
    h.left_from_right(cipher, 4);
    h.right_from_left(cipher, 3);
    h.left_from_right(cipher, 2);
    if passes == 4 {
        h.right_from_left(cipher, 1);
    }
    h.join(block);
}

/// The node's [`ConnectionIdGenerator`]: every connection ID carries this
/// node's server ID under the configured key, with a fresh random nonce.
///
/// quinn asks `validate` only about short-header packets for connections it
/// does not know. A connection ID of another configuration, of the wrong
/// length, or that decodes to another node's server ID is refused, and quinn
/// drops the packet instead of answering it with a stateless reset.
#[derive(Clone, Debug)]
pub struct QuicLbGenerator {
    codec: CidCodec,
    server_id: [u8; MAX_SERVER_ID_LEN],
    lifetime: Option<Duration>,
}

impl QuicLbGenerator {
    /// Checks `cfg` (see [`CidConfig::validate`]) and expands its key. Build
    /// it once and clone it in quinn's generator factory.
    pub fn new(cfg: &CidConfig) -> anyhow::Result<Self> {
        cfg.validate()?;
        let codec = CidCodec::new(cfg)?;
        let mut server_id = [0u8; MAX_SERVER_ID_LEN];
        server_id[..cfg.server_id.len()].copy_from_slice(&cfg.server_id);
        Ok(Self {
            codec,
            server_id,
            lifetime: cfg.lifetime,
        })
    }

    fn server_id(&self) -> &[u8] {
        &self.server_id[..self.codec.server_id_len]
    }
}

impl ConnectionIdGenerator for QuicLbGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut nonce = [0u8; MAX_BLOCK_LEN];
        let nonce = &mut nonce[..self.codec.nonce_len];
        rand::rng().fill_bytes(nonce);
        self.codec.encode(self.server_id(), nonce)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        // Our connection IDs always describe their own length; one that does
        // not was not made here.
        if cid.first().map(|b| b & 0x1f) != Some(self.codec.block_len() as u8) {
            return Err(InvalidCid);
        }
        match self.codec.decode(cid) {
            Ok(d) if d.server_id() == self.server_id() => Ok(()),
            _ => Err(InvalidCid),
        }
    }

    fn cid_len(&self) -> usize {
        self.codec.cid_len()
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cid::parse_hex;
    use proptest::prelude::*;
    use serde::Deserialize;

    fn hex(s: &str) -> Vec<u8> {
        parse_hex(s).expect("test hex")
    }

    fn key(s: &str) -> CidKey {
        CidKey(hex(s).try_into().expect("16-byte test key"))
    }

    fn cfg(config_id: u8, server_id: &[u8], nonce_len: u8, key: Option<CidKey>) -> CidConfig {
        CidConfig {
            config_id,
            server_id: server_id.to_vec(),
            nonce_len,
            key,
            lifetime: None,
        }
    }

    /// Encodes with a given nonce, checks the bytes, and checks that decoding
    /// gives the server ID back.
    fn assert_vector(cfg: &CidConfig, nonce: &str, cid: &str) {
        let codec = CidCodec::new(cfg).expect("valid vector config");
        let got = codec.encode(&cfg.server_id, &hex(nonce));
        assert_eq!(
            format!("{:?}", Hex(&got)),
            cid,
            "encoding of sid {:?}",
            Hex(&cfg.server_id)
        );
        let d = codec.decode(&got).expect("vector decodes");
        assert_eq!(d.server_id(), &cfg.server_id[..]);
        assert_eq!(d.config_id, cfg.config_id);
    }

    // Test vectors of draft-ietf-quic-load-balancers-21, appendix "Load
    // Balancer Test Vectors" (the same in -19 and -20).

    #[test]
    fn draft_vector_unencrypted() {
        assert_vector(
            &cfg(0, &hex("c4605e"), 4, None),
            "4504cc4f",
            "07c4605e4504cc4f",
        );
    }

    #[test]
    fn draft_vector_unencrypted_second_as_its_layout_reads() {
        // The draft prints this one with a 9-digit nonce ("3487d970b") and a
        // CID ("20a350d28b4203487d970b") whose first octet does not say
        // config 1 and length 10. Read as a 5-byte nonce 03487d970b, the
        // layout gives the bytes below; assert that reading.
        assert_vector(
            &cfg(1, &hex("350d28b420"), 5, None),
            "03487d970b",
            "2a350d28b42003487d970b",
        );
    }

    #[test]
    fn draft_encryption_example_odd_length() {
        // Section "Encryption Example": 7 bytes, four passes, split nibble.
        let k = key("fdf726a9893ec05c0632d3956680baf0");
        assert_vector(
            &cfg(0, &hex("31441a"), 4, Some(k)),
            "9c69c275",
            "0767947d29be054a",
        );
    }

    const VECTOR_KEY: &str = "8f95f09245765f80256934e50c66207f";

    #[test]
    fn draft_vector_encrypted_short() {
        let k = key(VECTOR_KEY);
        assert_vector(
            &cfg(0, &hex("ed793a"), 4, Some(k)),
            "ee080dbf",
            "0720b1d07b359d3c",
        );
    }

    #[test]
    fn draft_vector_encrypted_sid_longer_than_nonce() {
        // Server ID longer than the nonce: the load balancer needs pass 4.
        let k = key(VECTOR_KEY);
        assert_vector(
            &cfg(1, &hex("ed793a51d49b8f5fab65"), 5, Some(k)),
            "ee080dbf48",
            "2fcc381bc74cb4fbad2823a3d1f8fed2",
        );
    }

    #[test]
    fn draft_vector_encrypted_single_pass() {
        let k = key(VECTOR_KEY);
        assert_vector(
            &cfg(2, &hex("ed793a51d49b8f5f"), 8, Some(k)),
            "ee080dbf48c0d1e5",
            "504dd2d05a7b0de9b2b9907afb5ecf8cc3",
        );
    }

    #[test]
    fn draft_vector_encrypted_eighteen() {
        // The draft's cr_bits column says 3, but its CID starts with 0x12,
        // which is config 0 and length 18. The first octet is not encrypted,
        // so the other 18 bytes do not depend on the config id: assert the
        // CID as printed (config 0), then the same tail under config 3.
        let sid = hex("ed793a51d49b8f5fab");
        let nonce = "ee080dbf48c0d1e55d";
        let tail = "5779c9cc86beb3a3a4a3ca96fce4bfe0cdbc";
        let k = key(VECTOR_KEY);
        assert_vector(
            &cfg(0, &sid, 9, Some(k.clone())),
            nonce,
            &format!("12{tail}"),
        );
        assert_vector(&cfg(3, &sid, 9, Some(k)), nonce, &format!("72{tail}"));
    }

    /// Every server ID and nonce length the draft allows, with a key (single-
    /// and four-pass) and without.
    fn all_layouts() -> impl Iterator<Item = (usize, u8)> {
        (1..=MAX_SERVER_ID_LEN).flat_map(|sid| {
            (MIN_NONCE_LEN..=MAX_BLOCK_LEN - sid).map(move |nonce| (sid, nonce as u8))
        })
    }

    fn sid_of(len: usize, salt: u8) -> Vec<u8> {
        (0..len as u8).map(|i| i.wrapping_mul(37) ^ salt).collect()
    }

    #[test]
    fn roundtrip_every_layout_with_and_without_key() {
        let mut layouts = 0;
        for (sid_len, nonce_len) in all_layouts() {
            for k in [None, Some(key(VECTOR_KEY))] {
                let c = cfg(5, &sid_of(sid_len, 0xa5), nonce_len, k);
                let mut generator = QuicLbGenerator::new(&c).expect("valid layout");
                assert_eq!(generator.cid_len(), 1 + sid_len + usize::from(nonce_len));
                for _ in 0..4 {
                    let cid = generator.generate_cid();
                    assert_eq!(cid.len(), generator.cid_len());
                    assert_eq!(cid[0], 5 << 5 | (sid_len as u8 + nonce_len));
                    let d = decode(&c, &cid).expect("own CID decodes");
                    assert_eq!(
                        d.server_id(),
                        &c.server_id[..],
                        "layout {sid_len}+{nonce_len}"
                    );
                    assert_eq!(d.config_id, 5);
                    assert!(generator.validate(&cid).is_ok());
                }
            }
            layouts += 1;
        }
        // 15 server ID lengths; nonce 4..=18 within 19 bytes in all.
        assert_eq!(layouts, (1..=15).map(|s| 19 - s - 4 + 1).sum::<usize>());
    }

    #[test]
    fn validate_refuses_other_nodes_other_configs_and_wrong_lengths() {
        let k = Some(key(VECTOR_KEY));
        for (sid_len, nonce_len) in [(2, 6), (4, 12), (8, 8), (10, 5)] {
            let ours = cfg(2, &sid_of(sid_len, 1), nonce_len, k.clone());
            let generator = QuicLbGenerator::new(&ours).expect("valid");

            let other_node = cfg(2, &sid_of(sid_len, 2), nonce_len, k.clone());
            let mut theirs = QuicLbGenerator::new(&other_node).expect("valid");
            let cid = theirs.generate_cid();
            assert!(generator.validate(&cid).is_err(), "another node's CID");
            assert_eq!(
                decode(&ours, &cid).map(|d| d.server_id().to_vec()),
                Ok(other_node.server_id.clone()),
                "the load balancer still routes it, to the other node"
            );

            let other_config = cfg(3, &sid_of(sid_len, 1), nonce_len, k.clone());
            let cid = QuicLbGenerator::new(&other_config)
                .expect("valid")
                .generate_cid();
            assert!(generator.validate(&cid).is_err(), "another config id");
            assert_eq!(
                decode(&ours, &cid),
                Err(CidError::ConfigId {
                    expected: 2,
                    actual: 3
                })
            );

            let longer = cfg(2, &sid_of(sid_len, 1), nonce_len + 1, k.clone());
            let cid = QuicLbGenerator::new(&longer).expect("valid").generate_cid();
            assert!(generator.validate(&cid).is_err(), "another length");
            assert!(matches!(decode(&ours, &cid), Err(CidError::Length { .. })));

            // Right length and config id, but the length bits lie.
            let mut own = generator.clone().generate_cid().to_vec();
            own[0] ^= 0x01;
            assert!(generator.validate(&ConnectionId::new(&own)).is_err());

            let mut unroutable = generator.clone().generate_cid().to_vec();
            unroutable[0] |= 0xe0;
            assert!(generator.validate(&ConnectionId::new(&unroutable)).is_err());
            assert_eq!(decode(&ours, &unroutable), Err(CidError::Unroutable));
        }
        assert!(matches!(
            decode(&cfg(0, &[1], 4, None), &[]),
            Err(CidError::Length {
                expected: 6,
                actual: 0
            })
        ));
    }

    #[test]
    fn with_a_key_the_server_id_is_not_visible() {
        // Server IDs of 4 bytes and more: a random match of the whole field
        // has a chance of 2^-32 at most per CID.
        for (sid_len, nonce_len) in [(4, 4), (4, 12), (6, 10), (8, 8), (9, 10), (15, 4)] {
            let sid = sid_of(sid_len, 0x3c);
            let plain = cfg(1, &sid, nonce_len, None);
            let sealed = cfg(1, &sid, nonce_len, Some(key(VECTOR_KEY)));
            let window = 1..1 + sid_len;

            // Without a key the server ID is right there, in every CID.
            let mut generator = QuicLbGenerator::new(&plain).expect("valid");
            let (a, b) = (generator.generate_cid(), generator.generate_cid());
            assert_eq!(&a[window.clone()], &sid[..]);
            assert_eq!(&a[window.clone()], &b[window.clone()]);

            // With one, neither CID shows it, and they share nothing there.
            let mut generator = QuicLbGenerator::new(&sealed).expect("valid");
            let (a, b) = (generator.generate_cid(), generator.generate_cid());
            assert_ne!(a, b);
            for cid in [&a, &b] {
                assert_ne!(
                    &cid[window.clone()],
                    &sid[..],
                    "layout {sid_len}+{nonce_len}"
                );
                assert_eq!(decode(&sealed, cid).expect("decodes").server_id(), &sid[..]);
            }
            assert_ne!(&a[window.clone()], &b[window.clone()]);

            // And for one nonce, the key changes every byte range a reader
            // could use: the encrypted CID is not the plaintext one.
            let nonce = vec![0x42; usize::from(nonce_len)];
            let p = CidCodec::new(&plain).expect("valid").encode(&sid, &nonce);
            let e = CidCodec::new(&sealed).expect("valid").encode(&sid, &nonce);
            assert_eq!(p[0], e[0], "the first octet is never encrypted");
            assert_ne!(&p[window.clone()], &e[window.clone()]);
        }
    }

    #[test]
    fn three_pass_decode_agrees_with_four() {
        let k = key(VECTOR_KEY);
        let cipher = Aes128::new(&Array::from(k.0));
        for len in (5..=MAX_BLOCK_LEN).filter(|&l| l != 16) {
            let plain: Vec<u8> = (0..len as u8).map(|i| i ^ 0x5a).collect();
            let mut block = plain.clone();
            four_pass_encrypt(&cipher, &mut block);
            assert_ne!(block, plain);
            let mut four = block.clone();
            four_pass_decrypt(&cipher, &mut four, 4);
            assert_eq!(four, plain, "length {len}");
            let mut three = block;
            four_pass_decrypt(&cipher, &mut three, 3);
            assert_eq!(three[..len / 2], plain[..len / 2], "length {len}");
        }
    }

    /// The example of docs/OPERATIONS.md, as the gateway will read it.
    const OPERATIONS_EXAMPLE: &str = r#"
[quic.cid]
config_id = 1                                  # 0..=6, the same on every node
server_id = "0a17"                             # hex, 1..=15 bytes, unique per node
nonce_len = 8                                  # 4..=18, the same on every node
key = "8f95f09245765f80256934e50c66207f"       # optional; 32 hex digits, the same on every node
lifetime = "1h"                                # optional; retire and replace CIDs after this long
"#;

    #[derive(Deserialize)]
    struct Root {
        quic: Quic,
    }

    #[derive(Deserialize)]
    struct Quic {
        cid: CidConfig,
    }

    fn parse(toml_text: &str) -> Result<CidConfig, String> {
        toml::from_str::<Root>(toml_text)
            .map(|r| r.quic.cid)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn config_parses_from_toml_and_hides_the_key() {
        let c = parse(OPERATIONS_EXAMPLE).expect("the documented example parses");
        c.validate().expect("the documented example is valid");
        assert_eq!(c.config_id, 1);
        assert_eq!(c.server_id, vec![0x0a, 0x17]);
        assert_eq!(c.nonce_len, 8);
        assert_eq!(c.key.as_ref().map(|k| k.0), Some(key(VECTOR_KEY).0));
        assert_eq!(c.lifetime, Some(Duration::from_secs(3600)));

        let shown = format!("{c:?}");
        assert!(shown.contains("0a17"), "{shown}");
        assert!(!shown.to_lowercase().contains("8f95"), "{shown}");
        assert!(shown.contains("key: Some(<hidden>)"), "{shown}");
        assert!(!format!("{:?}", QuicLbGenerator::new(&c)).contains("8f95"));

        let minimal = parse("[quic.cid]\nconfig_id = 0\nserver_id = \"01\"\nnonce_len = 4\n")
            .expect("key and lifetime are optional");
        assert!(minimal.key.is_none() && minimal.lifetime.is_none());
    }

    #[test]
    fn config_errors_name_the_field() {
        let base = "[quic.cid]\nconfig_id = 0\nnonce_len = 4\n";
        for (extra, needle) in [
            ("server_id = \"01\"\ncolour = 1\n", "colour"),
            ("server_id = \"0g\"\n", "hex"),
            ("server_id = \"012\"\n", "even number"),
            ("server_id = \"01\"\nkey = \"00ff\"\n", "16 bytes"),
            ("server_id = \"01\"\nlifetime = \"soon\"\n", "lifetime"),
        ] {
            let err = parse(&format!("{base}{extra}")).expect_err(extra);
            assert!(err.contains(needle), "{extra}: {err}");
        }

        for (c, field) in [
            (cfg(7, &[1], 4, None), "quic.cid.config_id"),
            (cfg(0, &[], 4, None), "quic.cid.server_id"),
            (cfg(0, &[1; 16], 4, None), "quic.cid.server_id"),
            (cfg(0, &[1], 3, None), "quic.cid.nonce_len"),
            (cfg(0, &[1], 19, None), "quic.cid.nonce_len"),
            (cfg(0, &[1; 2], 18, None), "quic.cid.nonce_len"),
            (
                CidConfig {
                    lifetime: Some(Duration::ZERO),
                    ..cfg(0, &[1], 4, None)
                },
                "quic.cid.lifetime",
            ),
        ] {
            let err = c.validate().expect_err(field).to_string();
            assert!(err.starts_with(field), "{err}");
            assert!(QuicLbGenerator::new(&c).is_err());
            assert!(matches!(
                decode(&c, &[0; 20]),
                Err(CidError::InvalidConfig(_))
            ));
        }
    }

    fn any_config() -> impl Strategy<Value = CidConfig> {
        (
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..24),
            any::<u8>(),
            proptest::option::of(any::<[u8; 16]>()),
        )
            .prop_map(|(config_id, server_id, nonce_len, key)| CidConfig {
                config_id,
                server_id,
                nonce_len,
                key: key.map(CidKey),
                lifetime: None,
            })
    }

    fn valid_config() -> impl Strategy<Value = CidConfig> {
        (0u8..7, 1..=MAX_SERVER_ID_LEN)
            .prop_flat_map(|(config_id, sid_len)| {
                (
                    Just(config_id),
                    proptest::collection::vec(any::<u8>(), sid_len),
                    MIN_NONCE_LEN as u8..=(MAX_BLOCK_LEN - sid_len) as u8,
                    proptest::option::of(any::<[u8; 16]>()),
                )
            })
            .prop_map(|(config_id, server_id, nonce_len, key)| CidConfig {
                config_id,
                server_id,
                nonce_len,
                key: key.map(CidKey),
                lifetime: None,
            })
    }

    proptest! {
        #[test]
        fn decode_never_panics(c in any_config(), cid in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode(&c, &cid);
        }

        #[test]
        fn decode_of_arbitrary_bytes_under_a_valid_config(
            c in valid_config(),
            cid in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            if let Ok(d) = decode(&c, &cid) {
                prop_assert_eq!(d.server_id().len(), c.server_id.len());
                prop_assert_eq!(d.config_id, c.config_id);
                prop_assert_eq!(cid.len(), 1 + c.server_id.len() + usize::from(c.nonce_len));
            }
        }

        #[test]
        fn encode_then_decode_gives_the_server_id(
            c in valid_config(),
            nonce in proptest::collection::vec(any::<u8>(), MAX_BLOCK_LEN),
        ) {
            let codec = CidCodec::new(&c).expect("valid by construction");
            let cid = codec.encode(&c.server_id, &nonce[..usize::from(c.nonce_len)]);
            let d = codec.decode(&cid).expect("own CID decodes");
            prop_assert_eq!(d.server_id(), &c.server_id[..]);
        }
    }
}
