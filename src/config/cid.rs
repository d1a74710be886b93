//! The `[quic.cid]` settings: how this node writes its server ID into the
//! QUIC connection IDs it issues (QUIC-LB, draft-ietf-quic-load-balancers-21).
//! Plain, validated data: the config layer owns it so that it needs nothing
//! of the QUIC layer; `quic::cid` encodes and decodes connection IDs with it.

use std::fmt;
use std::time::Duration;

use serde::ser::SerializeStruct as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Config id codepoint that marks a connection ID as unroutable (draft
/// section "Configuration Failover"); a configuration never uses it.
pub const UNROUTABLE_CONFIG_ID: u8 = 0b111;
/// Server ID bytes, at most. The draft sets no limit of its own; 15 leaves the
/// minimum nonce of 4 in the 19 bytes that follow the first octet.
pub const MAX_SERVER_ID_LEN: usize = 15;
/// The draft's minimum nonce: fewer bytes would repeat too soon.
pub const MIN_NONCE_LEN: usize = 4;
/// Server ID plus nonce, at most: QUIC v1 connection IDs are at most 20 bytes,
/// and the first octet takes one.
pub const MAX_BLOCK_LEN: usize = 19;

/// The `[quic.cid]` configuration: how this node encodes its connection IDs.
///
/// All nodes behind one load balancer share `config_id`, `nonce_len`, the
/// server ID length and `key`; each has its own `server_id`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidConfig {
    /// Config rotation codepoint written in the top 3 bits of the first octet,
    /// 0..=6 (7 marks unroutable connection IDs). Changing it with the key lets
    /// the load balancer hold the old and the new configuration at once.
    pub config_id: u8,
    /// This node's server ID, 1..=15 bytes, given as hex. Unique among the
    /// nodes behind one load balancer; all of them use the same length.
    #[serde(deserialize_with = "de_hex")]
    pub server_id: Vec<u8>,
    /// Random bytes after the server ID, 4..=18; server ID plus nonce at most
    /// 19. Random nonces repeat after about 2^(4 * nonce_len) connection IDs.
    pub nonce_len: u8,
    /// AES-128 key, 16 bytes as 32 hex digits. Without it connection IDs are
    /// plaintext and an observer can link every connection ID to its node.
    #[serde(default)]
    pub key: Option<CidKey>,
    /// Connection IDs are retired and replaced after this long, if set.
    #[serde(default, with = "humantime_serde")]
    pub lifetime: Option<Duration>,
}

impl fmt::Debug for CidConfig {
    // Written by hand so that the key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CidConfig")
            .field("config_id", &self.config_id)
            .field("server_id", &Hex(&self.server_id))
            .field("nonce_len", &self.nonce_len)
            .field("key", &self.key)
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

impl Serialize for CidConfig {
    // By hand: `server_id` and `key` as the hex the file takes, so that
    // `print-config --config` writes what would be read back (the key
    // redacted there, see `config::env`).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("CidConfig", 5)?;
        st.serialize_field("config_id", &self.config_id)?;
        st.serialize_field("server_id", &format!("{:?}", Hex(&self.server_id)))?;
        st.serialize_field("nonce_len", &self.nonce_len)?;
        match &self.key {
            Some(k) => st.serialize_field("key", &format!("{:?}", Hex(&k.0)))?,
            None => st.skip_field("key")?,
        }
        match self.lifetime {
            Some(d) => {
                st.serialize_field("lifetime", &humantime::format_duration(d).to_string())?
            }
            None => st.skip_field("lifetime")?,
        }
        st.end()
    }
}

impl CidConfig {
    /// Checks every range the draft and QUIC v1 impose; the message names the
    /// field as it is written in the config file.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.config_id >= UNROUTABLE_CONFIG_ID {
            anyhow::bail!(
                "quic.cid.config_id: must be 0..=6 (7 marks unroutable connection IDs), got {}",
                self.config_id
            );
        }
        let sid = self.server_id.len();
        if !(1..=MAX_SERVER_ID_LEN).contains(&sid) {
            anyhow::bail!(
                "quic.cid.server_id: must be 1..=15 bytes (2..=30 hex digits), got {sid} bytes"
            );
        }
        let nonce = usize::from(self.nonce_len);
        if !(MIN_NONCE_LEN..=MAX_BLOCK_LEN - 1).contains(&nonce) {
            anyhow::bail!("quic.cid.nonce_len: must be 4..=18, got {nonce}");
        }
        if sid + nonce > MAX_BLOCK_LEN {
            anyhow::bail!(
                "quic.cid.nonce_len: server_id ({sid} bytes) + nonce_len ({nonce}) must be at most 19, got {}",
                sid + nonce
            );
        }
        if self.lifetime.is_some_and(|d| d.is_zero()) {
            anyhow::bail!("quic.cid.lifetime: must be greater than zero when set");
        }
        Ok(())
    }
}

/// A 16-byte AES-128 key. Its `Debug` does not show it.
#[derive(Clone, PartialEq)]
pub struct CidKey(pub(crate) [u8; 16]);

impl From<[u8; 16]> for CidKey {
    fn from(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for CidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

impl<'de> Deserialize<'de> for CidKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = de_hex(d)?;
        let key: [u8; 16] = bytes.try_into().map_err(|b: Vec<u8>| {
            serde::de::Error::custom(format!(
                "an AES-128 key is 16 bytes (32 hex digits), got {} bytes",
                b.len()
            ))
        })?;
        Ok(Self(key))
    }
}

fn de_hex<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    parse_hex(&s).map_err(serde::de::Error::custom)
}

/// Hex digits, either case, no separators or prefix. A hand-written loop
/// rather than a crate: it is the only hex the gateway reads.
pub(crate) fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(2) {
        return Err(format!(
            "expected an even number of hex digits, got {}",
            s.len()
        ));
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
            _ => Err(format!(
                "`{}` is not a hex byte",
                String::from_utf8_lossy(pair)
            )),
        })
        .collect()
}

/// Bytes shown as hex in `Debug` output.
pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}
