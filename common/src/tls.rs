//! Mutual TLS for gridforge's gRPC services (rustls through tonic). The server presents its certificate and
//! accepts only clients whose certificate chains to the configured CA; the client presents its certificate
//! and trusts only that CA. Every PEM file is read and checked here first, so that a missing or broken file
//! is reported by path before any socket is opened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::pem::Pem;

/// A TLS handshake that has not finished after this long is dropped (a stalled peer must not hold a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {path} is not valid PEM: {reason}")]
    BadPem { what: &'static str, path: PathBuf, reason: String },
    #[error("the {what} {path} holds no {expected} PEM block")]
    Missing { what: &'static str, path: PathBuf, expected: &'static str },
    #[error("the {what} {path} holds a certificate that does not parse: {reason}")]
    BadCertificate { what: &'static str, path: PathBuf, reason: String },
    #[error("the {what} {path} is not a private key in a form rustls reads ({label})")]
    UnsupportedKey { what: &'static str, path: PathBuf, label: String },
}

impl TlsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::BadPem { path, .. }
            | TlsError::Missing { path, .. }
            | TlsError::BadCertificate { path, .. }
            | TlsError::UnsupportedKey { path, .. } => path,
        }
    }
}

/// PEM blocks of a file, read and decoded; errors name the file by its role (`what`).
fn pem_blocks(what: &'static str, path: &Path) -> Result<(Vec<u8>, Vec<Pem>), TlsError> {
    let bytes =
        std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })?;
    let mut blocks = Vec::new();
    for block in Pem::iter_from_buffer(&bytes) {
        match block {
            Ok(pem) => blocks.push(pem),
            // The iterator ends with an error once no further block starts; a file with blocks is fine.
            Err(_) if !blocks.is_empty() => break,
            Err(e) => {
                return Err(TlsError::BadPem { what, path: path.to_path_buf(), reason: e.to_string() });
            }
        }
    }
    Ok((bytes, blocks))
}

/// A PEM file of one or more X.509 certificates (a chain, or CA roots), checked to parse.
pub fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let (bytes, blocks) = pem_blocks(what, path)?;
    let mut found = 0;
    for pem in blocks.iter().filter(|p| p.label == "CERTIFICATE") {
        pem.parse_x509().map_err(|e| TlsError::BadCertificate {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(TlsError::Missing { what, path: path.to_path_buf(), expected: "CERTIFICATE" });
    }
    Ok(bytes)
}

/// A PEM private key (PKCS#8, SEC1 EC or PKCS#1 RSA, as rustls reads them).
pub fn read_private_key(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let (bytes, blocks) = pem_blocks(what, path)?;
    let Some(key) = blocks.iter().find(|p| p.label.ends_with("PRIVATE KEY")) else {
        return Err(TlsError::Missing { what, path: path.to_path_buf(), expected: "PRIVATE KEY" });
    };
    if !matches!(key.label.as_str(), "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY") {
        return Err(TlsError::UnsupportedKey { what, path: path.to_path_buf(), label: key.label.clone() });
    }
    Ok(bytes)
}

/// The server side of mutual TLS: the server's certificate `cert` and key `key`, and the CA `ca` that client
/// certificates must chain to. A client without such a certificate fails the handshake.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    let ca = read_certificates("client CA certificate", ca)?;
    let cert = read_certificates("server certificate", cert)?;
    let key = read_private_key("server private key", key)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The client side of mutual TLS: trust only `ca`, present `cert` and `key`. `domain` overrides the name
/// the server's certificate is checked against (by default the endpoint's host).
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    domain: Option<&str>,
) -> Result<ClientTlsConfig, TlsError> {
    let ca = read_certificates("CA certificate", ca)?;
    let cert = read_certificates("client certificate", cert)?;
    let key = read_private_key("client private key", key)?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}
