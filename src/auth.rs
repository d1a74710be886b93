//! Token verification (JWT via `jsonwebtoken`) and development token minting.
//!
//! Owns the mapping from token failures to wire codes: expired, badly signed and
//! malformed tokens each get their own code. It does no IO after construction.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{AuthConfig, JwtAlgorithm};
use crate::ids::{DeviceId, RoomId, UserId};
use crate::wire::Code;

/// The claims Tether reads from a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// When present, the only device id this token may log in as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Rooms the user may join from the client (`*` = any; `prefix*` = any room starting with `prefix`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("token refused: {0}")]
    Invalid(String),
    #[error("token is bound to another device")]
    DeviceMismatch,
}

impl AuthError {
    /// The wire code for this refusal.
    pub fn code(&self) -> Code {
        match self {
            AuthError::Expired => Code::TokenExpired,
            AuthError::BadSignature => Code::TokenBadSignature,
            AuthError::Malformed(_) => Code::TokenMalformed,
            AuthError::Invalid(_) => Code::TokenInvalid,
            AuthError::DeviceMismatch => Code::DeviceMismatch,
        }
    }
}

/// Who a verified token says the peer is.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub user: UserId,
    pub device: DeviceId,
    /// Room patterns the user may join (from the `rooms` claim).
    pub rooms: Box<[Box<str>]>,
}

impl Identity {
    /// Whether the `rooms` claim lets this user join `room`.
    pub fn may_join(&self, room: &RoomId) -> bool {
        room_allowed(&self.rooms, room)
    }
}

/// Whether any of the `rooms` claim patterns admits `room`: `*` admits every
/// room, `prefix*` every room that starts with `prefix`, anything else itself.
pub fn room_allowed(patterns: &[Box<str>], room: &RoomId) -> bool {
    patterns.iter().any(|p| {
        let p: &str = p;
        p == "*"
            || p == room.as_str()
            || p.strip_suffix('*')
                .is_some_and(|prefix| room.as_str().starts_with(prefix))
    })
}

/// Errors building a verifier from config.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read auth.public_key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse auth.public_key {path}: {message}")]
    Parse { path: String, message: String },
}

/// Verifies login tokens. Cheap to share behind an `Arc`.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// Builds a verifier; reads the public key file for RS256/EdDSA.
    ///
    /// # Errors
    /// [`AuthConfigError`] naming the key file.
    pub fn new(cfg: &AuthConfig) -> Result<Self, AuthConfigError> {
        let (alg, key) = match cfg.algorithm {
            JwtAlgorithm::HS256 => (
                Algorithm::HS256,
                DecodingKey::from_secret(cfg.secret.as_bytes()),
            ),
            JwtAlgorithm::RS256 | JwtAlgorithm::EdDSA => {
                let path = cfg.public_key.clone().unwrap_or_default();
                let shown = path.display().to_string();
                let pem = std::fs::read(&path).map_err(|source| AuthConfigError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let parsed = if cfg.algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem).map(|k| (Algorithm::RS256, k))
                } else {
                    DecodingKey::from_ed_pem(&pem).map(|k| (Algorithm::EdDSA, k))
                };
                parsed.map_err(|e| AuthConfigError::Parse {
                    path: shown,
                    message: e.to_string(),
                })?
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway.as_secs();
        let mut required = vec!["exp", "sub"];
        validation.validate_nbf = true;
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &cfg.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self { key, validation })
    }

    /// Verifies `token` for a login as `device`.
    ///
    /// # Errors
    /// [`AuthError`]; each variant maps to its own wire code.
    pub fn verify(&self, token: &str, device: &DeviceId) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => AuthError::Malformed(e.to_string()),
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 128 || c.sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid(
                "sub must be 1..=128 printable bytes".into(),
            ));
        }
        if let Some(dev) = &c.dev {
            if dev != device.as_str() {
                return Err(AuthError::DeviceMismatch);
            }
        }
        Ok(Identity {
            user: UserId::new(&c.sub),
            device: device.clone(),
            rooms: c.rooms.into_iter().map(String::into_boxed_str).collect(),
        })
    }
}

/// Mints an HS256 development token.
///
/// # Errors
/// When the claims cannot be encoded (does not happen with valid input).
pub fn mint_hs256(
    secret: &str,
    user: &str,
    device: Option<&str>,
    ttl: Duration,
    rooms: Vec<String>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = crate::unix_ms() / 1000;
    let claims = Claims {
        sub: user.to_owned(),
        dev: device.map(str::to_owned),
        exp: now + ttl.as_secs(),
        iat: Some(now),
        rooms,
    };
    mint_claims(secret, &claims)
}

/// Signs arbitrary claims with HS256 (tests use it for expired tokens).
///
/// # Errors
/// When the claims cannot be encoded.
pub fn mint_claims(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        Verifier::new(&AuthConfig {
            leeway: Duration::ZERO,
            ..AuthConfig::default()
        })
        .unwrap()
    }

    const S: &str = crate::config::DEV_SECRET;

    #[test]
    fn ok_expired_badsig_malformed_have_distinct_codes() {
        let v = verifier();
        let dev = DeviceId::new("phone");
        let ok = mint_hs256(S, "alice", Some("phone"), Duration::from_secs(60), vec![]).unwrap();
        assert_eq!(v.verify(&ok, &dev).unwrap().user.as_str(), "alice");

        let expired = mint_claims(
            S,
            &Claims {
                sub: "alice".into(),
                dev: None,
                exp: crate::unix_ms() / 1000 - 3600,
                iat: None,
                rooms: vec![],
            },
        )
        .unwrap();
        let other = mint_hs256(
            "another-secret-of-enough-length",
            "alice",
            None,
            Duration::from_secs(60),
            vec![],
        )
        .unwrap();
        let codes = [
            v.verify(&expired, &dev).unwrap_err().code(),
            v.verify(&other, &dev).unwrap_err().code(),
            v.verify("not.a.jwt", &dev).unwrap_err().code(),
            v.verify(&ok, &DeviceId::new("tablet")).unwrap_err().code(),
        ];
        assert_eq!(
            codes,
            [
                Code::TokenExpired,
                Code::TokenBadSignature,
                Code::TokenMalformed,
                Code::DeviceMismatch
            ]
        );
    }

    #[test]
    fn eddsa_public_key_verifies_and_other_keys_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let pub_path = dir.path().join("jwt.pub.pem");
        std::fs::write(&pub_path, key.public_key_pem()).unwrap();
        let v = Verifier::new(&AuthConfig {
            algorithm: JwtAlgorithm::EdDSA,
            public_key: Some(pub_path),
            leeway: Duration::ZERO,
            ..AuthConfig::default()
        })
        .unwrap();
        let claims = Claims {
            sub: "carol".into(),
            dev: None,
            exp: crate::unix_ms() / 1000 + 60,
            iat: None,
            rooms: vec![],
        };
        let sign = |k: &rcgen::KeyPair| {
            let ek = EncodingKey::from_ed_pem(k.serialize_pem().as_bytes()).unwrap();
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &ek).unwrap()
        };
        let dev = DeviceId::new("d");
        assert_eq!(v.verify(&sign(&key), &dev).unwrap().user.as_str(), "carol");
        assert_eq!(
            v.verify(&sign(&other), &dev).unwrap_err().code(),
            Code::TokenBadSignature
        );
        // An HS256 token is refused by an EdDSA verifier (algorithm confusion).
        let hs = mint_hs256(S, "carol", None, Duration::from_secs(60), vec![]).unwrap();
        assert_eq!(v.verify(&hs, &dev).unwrap_err().code(), Code::TokenInvalid);
    }

    #[test]
    fn unreadable_or_bad_public_key_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let cfg = AuthConfig {
            algorithm: JwtAlgorithm::RS256,
            public_key: Some(missing.clone()),
            ..AuthConfig::default()
        };
        let e = Verifier::new(&cfg).err().unwrap().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a key").unwrap();
        let e = Verifier::new(&AuthConfig {
            public_key: Some(garbage),
            ..cfg
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("garbage.pem"), "{e}");
    }

    #[test]
    fn configured_issuer_and_audience_are_required() {
        let v = Verifier::new(&AuthConfig {
            issuer: Some("chat-auth".into()),
            audience: Some("tether".into()),
            ..AuthConfig::default()
        })
        .unwrap();
        let plain = mint_hs256(S, "alice", None, Duration::from_secs(60), vec![]).unwrap();
        assert_eq!(
            v.verify(&plain, &DeviceId::new("d")).unwrap_err().code(),
            Code::TokenInvalid,
            "a token without iss/aud is refused when they are configured"
        );
    }

    #[test]
    fn room_patterns() {
        let id = Identity {
            user: UserId::new("u"),
            device: DeviceId::new("d"),
            rooms: vec!["lobby".into(), "team.*".into()].into_boxed_slice(),
        };
        assert!(id.may_join(&RoomId::new("lobby")));
        assert!(id.may_join(&RoomId::new("team.blue")));
        assert!(!id.may_join(&RoomId::new("lobby2")));
        assert!(!id.may_join(&RoomId::new("teams")));
    }
}
