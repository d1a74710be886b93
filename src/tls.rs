//! TLS: loading certificates, generating the development certificate, and
//! building rustls configs with one explicit crypto provider (ring), TLS 1.3 only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// TLS setup failures; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("no certificate found in {0}")]
    NoCert(PathBuf),
    #[error("invalid TLS certificate or key ({path}): {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot generate the development certificate in {path}: {message}")]
    Generate { path: PathBuf, message: String },
}

/// File names of the generated development certificate.
pub const DEV_CERT: &str = "dev-cert.pem";
pub const DEV_KEY: &str = "dev-key.pem";

/// The crypto provider every rustls config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Returns the certificate and key paths to use: the configured ones, or the
/// development pair in `dev_dir`, generated when missing.
///
/// # Errors
/// [`TlsError::Generate`] when the development pair cannot be written.
pub fn resolve_paths(
    cert: Option<&Path>,
    key: Option<&Path>,
    dev_dir: &Path,
) -> Result<(PathBuf, PathBuf), TlsError> {
    if let (Some(c), Some(k)) = (cert, key) {
        return Ok((c.to_owned(), k.to_owned()));
    }
    let (c, k) = (dev_dir.join(DEV_CERT), dev_dir.join(DEV_KEY));
    if !c.exists() || !k.exists() {
        generate_dev_cert(dev_dir)?;
        tracing::warn!(cert = %c.display(), "generated a self-signed development certificate; configure tls.cert and tls.key for production");
    }
    Ok((c, k))
}

/// Writes a self-signed certificate for localhost, 127.0.0.1 and ::1.
///
/// # Errors
/// [`TlsError::Generate`] naming the directory.
pub fn generate_dev_cert(dir: &Path) -> Result<(), TlsError> {
    let err = |message: String| TlsError::Generate {
        path: dir.to_owned(),
        message,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(|e| err(e.to_string()))?;
    std::fs::write(dir.join(DEV_CERT), ck.cert.pem()).map_err(|e| err(e.to_string()))?;
    write_private(
        &dir.join(DEV_KEY),
        ck.signing_key.serialize_pem().as_bytes(),
    )
    .map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(data)
}

/// Reads every certificate in a PEM file.
///
/// # Errors
/// [`TlsError`] naming the file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(path.to_owned()));
    }
    Ok(certs)
}

/// Builds the server config from a certificate chain and key file.
///
/// # Errors
/// [`TlsError`] naming the file that could not be read or parsed.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = load_certs(cert)?;
    let data = std::fs::read(key).map_err(|e| TlsError::Read {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&data).map_err(|e| TlsError::Invalid {
        path: key.to_owned(),
        message: e.to_string(),
    })?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid {
            path: cert.to_owned(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            message: e.to_string(),
        })?;
    Ok(Arc::new(cfg))
}

/// A client config that trusts exactly the certificates in `ca` (pinning the
/// development certificate, or a private CA).
///
/// # Errors
/// [`TlsError`] naming the file.
pub fn client_config_pinned(ca: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Invalid {
            path: ca.to_owned(),
            message: e.to_string(),
        })?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Invalid {
            path: ca.to_owned(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Parses a server name for SNI and verification.
///
/// # Errors
/// When `host` is neither a DNS name nor an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("invalid server name {host}: {e}"))
}

/// A server config (TLS 1.3, ring) around a fresh self-signed certificate
/// for localhost, and a client config that trusts exactly it: for tests
/// that run handshakes in memory.
#[cfg(test)]
pub(crate) fn test_configs() -> (rustls::ServerConfig, Arc<rustls::ClientConfig>) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (server, Arc::new(client))
}
