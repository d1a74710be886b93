//! Secrets from the environment: one table, [`ENV_SECRETS`], of variable →
//! config key, applied after the file and before validation. The
//! environment wins over the file; a variable that is unset or empty leaves
//! the file's value (or the default) alone.
//!
//! The same table says which keys `tether print-config --config` redacts
//! ([`redact`]). Adding a secret is one line in it.
//!
//! It reads no environment itself: the caller passes a lookup, so that
//! tests give a map rather than change the process's environment.

use super::cid::{parse_hex, CidKey};
use super::Config;

/// What `print-config` prints in place of a secret's value.
pub const REDACTED: &str = "<redacted>";

/// One secret the environment may set.
pub struct EnvSecret {
    /// The environment variable, e.g. `TETHER_AUTH_SECRET`.
    pub var: &'static str,
    /// The config key it sets, as written in the file (`auth.secret`).
    pub key: &'static str,
    /// Sets the value on a config; `Err` says why the value is refused.
    set: fn(&mut Config, String) -> Result<(), String>,
}

/// Every secret the environment may set, one a line.
#[rustfmt::skip]
pub static ENV_SECRETS: &[EnvSecret] = &[
    EnvSecret { var: "TETHER_AUTH_SECRET", key: "auth.secret", set: |c, v| { c.auth.secret = v; Ok(()) } },
    EnvSecret { var: "TETHER_UPSTREAM_SECRET", key: "upstream.secret", set: |c, v| { c.upstream.secret = v; Ok(()) } },
    EnvSecret { var: "TETHER_QUIC_CID_KEY", key: "quic.cid.key", set: set_cid_key },
    EnvSecret { var: "TETHER_BUS_PASSWORD", key: "bus.password", set: |c, v| { c.bus.password = Some(v); Ok(()) } },
    EnvSecret { var: "TETHER_BUS_TOKEN", key: "bus.token", set: |c, v| { c.bus.token = Some(v); Ok(()) } },
    EnvSecret { var: "TETHER_RESUME_SECRET", key: "bus.resume_secret", set: |c, v| { c.bus.resume_secret = Some(v); Ok(()) } },
    EnvSecret { var: "TETHER_RESUME_SECRET_PREVIOUS", key: "bus.resume_secret_previous", set: |c, v| { c.bus.resume_secret_previous = Some(v); Ok(()) } },
    EnvSecret { var: "TETHER_API_KEYS", key: "api.keys", set: |c, v| { c.api.keys = super::api::split_keys(&v); Ok(()) } },
];

/// The variables of [`ENV_SECRETS`] that `env` sets (and that are not
/// empty), applied to `cfg` in table order; the entries applied.
///
/// # Errors
/// The first variable whose value is refused, and why.
pub fn apply(
    cfg: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<&'static EnvSecret>, (&'static str, String)> {
    let mut applied = Vec::new();
    for s in ENV_SECRETS {
        let Some(v) = env(s.var).filter(|v| !v.is_empty()) else {
            continue;
        };
        (s.set)(cfg, v).map_err(|reason| (s.var, reason))?;
        applied.push(s);
    }
    Ok(applied)
}

/// Replaces the value of every key of [`ENV_SECRETS`] present in `doc` (a
/// config as a TOML table) with [`REDACTED`]; in a list, each element.
pub fn redact(doc: &mut toml::Table) {
    for s in ENV_SECRETS {
        let mut path = s.key.split('.').peekable();
        let mut table = &mut *doc;
        while let Some(part) = path.next() {
            if path.peek().is_none() {
                if let Some(v) = table.get_mut(part) {
                    hide(v);
                }
                break;
            }
            match table.get_mut(part) {
                Some(toml::Value::Table(t)) => table = t,
                _ => break,
            }
        }
    }
}

fn hide(v: &mut toml::Value) {
    match v {
        toml::Value::Array(items) => items.iter_mut().for_each(hide),
        other => *other = toml::Value::String(REDACTED.into()),
    }
}

/// `TETHER_QUIC_CID_KEY`: 32 hex digits, into the `[quic.cid]` the file
/// configures (the key alone does not make a QUIC-LB configuration).
fn set_cid_key(c: &mut Config, v: String) -> Result<(), String> {
    let Some(cid) = c.quic.cid.as_mut() else {
        return Err("is set, but the config has no [quic.cid] section to use it in".into());
    };
    let bytes = parse_hex(v.trim())?;
    let key: [u8; 16] = bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "an AES-128 key is 16 bytes (32 hex digits), got {} bytes",
            b.len()
        )
    })?;
    cid.key = Some(CidKey::from(key));
    Ok(())
}
