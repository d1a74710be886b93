//! Token verification (JWT via `jsonwebtoken`) and development token minting.
//!
//! Owns the mapping from token failures to wire codes: expired, badly signed and
//! malformed tokens each get their own code. Refusals carry fixed texts of our
//! own, never the JWT library's messages: they go to peers that have not
//! logged in. It does no IO after construction.

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

/// Why a token was refused. The texts are fixed and ours: they are sent to
/// the peer, which may not have logged in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// `exp` has passed (allowing for the leeway).
    #[error("token expired")]
    Expired,
    /// The signature does not verify with the configured key.
    #[error("token signature does not verify")]
    BadSignature,
    /// Not a JWS compact serialization, or claims of the wrong shape.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// Well-formed, but refused: algorithm, time, issuer, audience, subject.
    #[error("token refused: {0}")]
    Invalid(&'static str),
    /// The `dev` claim names another device.
    #[error("token is bound to another device")]
    DeviceMismatch,
    /// A refresh token issued to another user than the session's.
    #[error("token was issued to another user")]
    OtherUser,
}

impl AuthError {
    /// The wire code for this refusal.
    pub fn code(&self) -> Code {
        match self {
            AuthError::Expired => Code::TokenExpired,
            AuthError::BadSignature => Code::TokenBadSignature,
            AuthError::Malformed(_) => Code::TokenMalformed,
            AuthError::Invalid(_) | AuthError::OtherUser => Code::TokenInvalid,
            AuthError::DeviceMismatch => Code::DeviceMismatch,
        }
    }

    /// Maps a `jsonwebtoken` failure to a refusal with our own text.
    fn from_jwt(kind: &ErrorKind) -> Self {
        match kind {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::InvalidToken => {
                AuthError::Malformed("not three dot-separated base64url parts")
            }
            ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
                AuthError::Malformed("a part is not valid base64url")
            }
            ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => {
                AuthError::Malformed("the claims are not JSON of the expected shape")
            }
            ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => {
                AuthError::Invalid(ALG_REFUSED)
            }
            ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
            ErrorKind::InvalidIssuer => AuthError::Invalid("iss is not accepted"),
            ErrorKind::InvalidAudience => AuthError::Invalid("aud is not accepted"),
            ErrorKind::MissingRequiredClaim(_) => {
                AuthError::Invalid("a required claim (iss or aud) is missing")
            }
            _ => AuthError::Invalid("not accepted"),
        }
    }
}

const ALG_REFUSED: &str = "its algorithm is not accepted";

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub identity: Identity,
    /// The `exp` claim, seconds since the Unix epoch.
    pub exp: u64,
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
    alg: Algorithm,
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
        Ok(Self {
            key,
            validation,
            alg,
        })
    }

    /// Verifies `token` for a login as `device`.
    ///
    /// # Errors
    /// [`AuthError`]; each variant maps to its own wire code.
    pub fn verify(&self, token: &str, device: &DeviceId) -> Result<Identity, AuthError> {
        self.check(token, device).map(|v| v.identity)
    }

    /// Verifies a token that is to replace the one of a logged-in session of
    /// `user` on `device`: it must name the same user and admit the device.
    ///
    /// # Errors
    /// [`AuthError`], [`AuthError::OtherUser`] for a token of another user.
    pub fn verify_refresh(
        &self,
        token: &str,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Verified, AuthError> {
        let v = self.check(token, device)?;
        if &v.identity.user != user {
            return Err(AuthError::OtherUser);
        }
        Ok(v)
    }

    /// Verifies `token` for `device`, and returns its expiry too.
    ///
    /// # Errors
    /// [`AuthError`]; each variant maps to its own wire code.
    pub fn check(&self, token: &str, device: &DeviceId) -> Result<Verified, AuthError> {
        // The header first: an `alg` the library does not know (`none`
        // included) fails its header parse with a JSON error that lists every
        // algorithm it knows; that is a refused algorithm, not a malformed
        // token, and the list is not ours to send.
        match jsonwebtoken::decode_header(token) {
            Ok(h) if h.alg != self.alg => return Err(AuthError::Invalid(ALG_REFUSED)),
            Ok(_) => {}
            Err(e) => {
                return Err(match e.kind() {
                    ErrorKind::Json(j) if j.classify() == serde_json::error::Category::Data => {
                        AuthError::Invalid(ALG_REFUSED)
                    }
                    ErrorKind::Json(_) => AuthError::Malformed("the header is not JSON"),
                    other => AuthError::from_jwt(other),
                })
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::from_jwt(e.kind()))?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 128 || c.sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid("sub must be 1..=128 printable bytes"));
        }
        if let Some(dev) = &c.dev {
            if dev != device.as_str() {
                return Err(AuthError::DeviceMismatch);
            }
        }
        Ok(Verified {
            identity: Identity {
                user: UserId::new(&c.sub),
                device: device.clone(),
                rooms: c.rooms.into_iter().map(String::into_boxed_str).collect(),
            },
            exp: c.exp,
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

    /// A token with the given header JSON and claims, signed with the dev
    /// secret as HS256 (whatever the header says).
    fn with_header(header: &str) -> String {
        let claims = Claims {
            sub: "alice".into(),
            dev: None,
            exp: crate::unix_ms() / 1000 + 60,
            iat: None,
            rooms: vec![],
        };
        let ok = mint_claims(S, &claims).unwrap();
        let mut parts = ok.splitn(2, '.');
        let _ = parts.next();
        let rest = parts.next().unwrap();
        format!("{}.{rest}", b64url(header.as_bytes()))
    }

    fn b64url(b: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    #[test]
    fn alg_none_and_unknown_algorithms_are_invalid_without_library_text() {
        let v = verifier();
        let dev = DeviceId::new("phone");
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS1024","typ":"JWT"}"#,
            r#"{"typ":"JWT"}"#,
            r#"{"alg":"HS384","typ":"JWT"}"#,
        ] {
            let e = v.verify(&with_header(header), &dev).unwrap_err();
            assert_eq!(e.code(), Code::TokenInvalid, "{header}");
            let text = e.to_string();
            for leak in ["HS256", "RS256", "variant", "expected", "line", "column"] {
                assert!(!text.contains(leak), "{header}: {text:?} leaks {leak}");
            }
        }
        // A header that is not JSON at all is malformed.
        let e = v.verify(&with_header("{not json"), &dev).unwrap_err();
        assert_eq!(e.code(), Code::TokenMalformed);
        // The honest header round-trips through the helper.
        let ok = with_header(r#"{"typ":"JWT","alg":"HS256"}"#);
        assert_eq!(v.verify(&ok, &dev).unwrap().user.as_str(), "alice");
    }

    #[test]
    fn refusal_texts_are_ours() {
        let v = verifier();
        let dev = DeviceId::new("phone");
        let missing_exp = format!(
            "{}.{}.sig",
            b64url(br#"{"alg":"HS256"}"#),
            b64url(br#"{"sub":"a"}"#)
        );
        for t in ["not.a.jwt", "x", "a.b", &missing_exp, "a.!!!.c"] {
            let e = v.verify(t, &dev).unwrap_err();
            let text = e.to_string();
            for leak in [
                "JSON error",
                "missing field",
                "Base64",
                "line",
                "column",
                "Invalid",
            ] {
                assert!(!text.contains(leak), "{t}: {text:?} leaks {leak}");
            }
        }
    }

    #[test]
    fn refresh_needs_the_same_user_and_device() {
        let v = verifier();
        let user = UserId::new("alice");
        let phone = DeviceId::new("phone");
        let t = |u: &str, d: Option<&str>| {
            mint_hs256(S, u, d, Duration::from_secs(60), vec!["lobby".into()]).unwrap()
        };
        let ok = v.verify_refresh(&t("alice", None), &user, &phone).unwrap();
        assert_eq!(ok.identity.user, user);
        assert!(ok.exp > crate::unix_ms() / 1000);
        assert!(v
            .verify_refresh(&t("alice", Some("phone")), &user, &phone)
            .is_ok());
        let other_user = v
            .verify_refresh(&t("bob", None), &user, &phone)
            .unwrap_err();
        assert_eq!(
            (other_user.clone(), other_user.code()),
            (AuthError::OtherUser, Code::TokenInvalid)
        );
        let other_device = v
            .verify_refresh(&t("alice", Some("tablet")), &user, &phone)
            .unwrap_err();
        assert_eq!(other_device.code(), Code::DeviceMismatch);
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
