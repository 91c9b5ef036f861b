//! TLS for the streaming server (`[stream] tls_cert`/`tls_key`, PEM) and the trust
//! its clients need (`berthctl --stream-ca`).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsError {
    /// The file at fault.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

fn err(path: &Path, message: impl ToString) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(path, e))?;
    if certs.is_empty() {
        return Err(err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The server's TLS setup from PEM files (HTTP/1.1 only, as upgrades need).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(cert, e))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

static CLIENT: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Trusts the CA certificates in `pem` for `https://` streaming URLs (once per process).
pub fn trust_ca(pem: &Path) -> Result<(), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pem)? {
        roots.add(c).map_err(|e| err(pem, e))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(pem, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = CLIENT.set(Arc::new(cfg));
    Ok(())
}

/// The client TLS setup, if `trust_ca` was called.
pub fn client_config() -> Option<Arc<rustls::ClientConfig>> {
    CLIENT.get().cloned()
}
