//! `[api]`: the HTTP API on the admin listener (`/api/v1/`), and the keys
//! that open it.

use serde::{Deserialize, Serialize};

/// Shortest key taken: 16 bytes, as for the other shared secrets.
pub const MIN_KEY_LEN: usize = 16;
/// Longest key taken, so that a header bound holds it.
pub const MAX_KEY_LEN: usize = 512;

/// `[api]`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer keys, any of which opens the API. Empty: the API is off (it
    /// answers 403); `/metrics` and the status page do not need a key.
    /// `TETHER_API_KEYS` (comma-separated) replaces them when set (one line
    /// of the environment's table, `config/env.rs`).
    pub keys: Vec<String>,
    /// Largest request body, in bytes; a larger one is refused with 413.
    pub max_body: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            max_body: 1024 * 1024,
        }
    }
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("keys", &format_args!("<{} hidden>", self.keys.len()))
            .field("max_body", &self.max_body)
            .finish()
    }
}

impl ApiConfig {
    /// Checks the section.
    ///
    /// # Errors
    /// The offending key's name and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1024..=64 * 1024 * 1024).contains(&self.max_body) {
            return Err(("api.max_body", "must be 1024..=67108864 bytes".into()));
        }
        for (i, k) in self.keys.iter().enumerate() {
            if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&k.len()) {
                return Err((
                    "api.keys",
                    format!("key {} must be {MIN_KEY_LEN}..={MAX_KEY_LEN} bytes", i + 1),
                ));
            }
            // What a Bearer credential may hold (RFC 6750's b64token).
            let token = |b: u8| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b);
            if !k.bytes().all(token) {
                return Err((
                    "api.keys",
                    format!(
                        "key {} may hold only letters, digits and - . _ ~ + / =",
                        i + 1
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `TETHER_API_KEYS`: keys separated by commas, spaces around each trimmed.
pub(super) fn split_keys(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_from_the_environment_are_split_at_commas() {
        assert_eq!(
            split_keys(" aaaaaaaaaaaaaaaa , bbbbbbbbbbbbbbbb,,"),
            ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]
        );
    }

    #[test]
    fn short_or_odd_keys_are_refused() {
        let mut c = ApiConfig {
            keys: vec!["short".into()],
            ..ApiConfig::default()
        };
        assert_eq!(c.check().unwrap_err().0, "api.keys");
        c.keys = vec!["a key with spaces in it".into()];
        assert_eq!(c.check().unwrap_err().0, "api.keys");
        c.keys = vec!["0123456789abcdef".into()];
        assert!(c.check().is_ok());
        c.max_body = 10;
        assert_eq!(c.check().unwrap_err().0, "api.max_body");
    }

    #[test]
    fn keys_are_hidden_in_debug() {
        let c = ApiConfig {
            keys: vec!["0123456789abcdef".into()],
            ..ApiConfig::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("0123456789abcdef"), "{d}");
    }
}
