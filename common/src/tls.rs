//! Mutual TLS for gridforge's gRPC services (rustls through tonic). The server presents its certificate and
//! accepts only clients whose certificate chains to the configured CA; the client presents its certificate
//! and trusts only that CA. Every PEM file is read and checked here first, so that a missing or broken file
//! is reported by path before any socket is opened. [`TlsFiles`] is the `[tls]` table of a daemon's
//! config file that names those files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::pem::Pem;

use crate::pki;

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
    /// rustls refused a file that parsed (e.g. a key that does not match its certificate).
    #[error("cannot use the {what} {path}: {reason}")]
    Unusable { what: &'static str, path: PathBuf, reason: String },
}

impl TlsError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            TlsError::Read { path, .. }
            | TlsError::BadPem { path, .. }
            | TlsError::Missing { path, .. }
            | TlsError::BadCertificate { path, .. }
            | TlsError::UnsupportedKey { path, .. }
            | TlsError::Unusable { path, .. } => path,
        }
    }
}

/// The `[tls]` table of a daemon's config file: the files of its side of mutual TLS, or plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA that the certificates of the daemon's clients must chain to (PEM).
    pub ca: PathBuf,
    /// The daemon's certificate chain (PEM).
    pub cert: PathBuf,
    /// The daemon's private key (PEM).
    pub key: PathBuf,
    /// Serve plaintext gRPC without client authentication. Local development only.
    pub insecure: bool,
}

/// The table as written: every key may be left out. A type error says `expected struct TlsConfig`, as it
/// did when each config had a struct of that name.
#[derive(Default, Deserialize)]
#[serde(expecting = "struct TlsConfig", deny_unknown_fields, default)]
struct TlsTable {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    insecure: Option<bool>,
}

impl TlsFiles {
    /// What `pki init` and `pki issue --name NAME` make in `dir`: `ca.pem`, `NAME.pem` and `NAME.key`; TLS
    /// on.
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca: pki::ca_cert_path(dir),
            cert: pki::cert_path(dir, name),
            key: pki::key_path(dir, name),
            insecure: false,
        }
    }

    /// Read a `[tls]` table: a key it leaves out keeps its value in `defaults`, an unknown key is refused.
    /// For a config's `#[serde(deserialize_with = "...")]`, which passes that config's own defaults.
    pub fn deserialize_or<'de, D: Deserializer<'de>>(
        deserializer: D,
        defaults: TlsFiles,
    ) -> Result<TlsFiles, D::Error> {
        let table = TlsTable::deserialize(deserializer)?;
        Ok(TlsFiles {
            ca: table.ca.unwrap_or(defaults.ca),
            cert: table.cert.unwrap_or(defaults.cert),
            key: table.key.unwrap_or(defaults.key),
            insecure: table.insecure.unwrap_or(defaults.insecure),
        })
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

/// The client side of mutual TLS as a rustls config, for a connector of our own ([`crate::client::connect_peer`]):
/// trust only `ca`, present `cert` and `key`, speak HTTP/2. The same files and checks as [`client_config`].
pub fn rustls_client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>, TlsError> {
    use tokio_rustls::rustls::ClientConfig;
    let files = RustlsFiles::read(ca, ("client certificate", cert), ("client private key", key))?;
    let mut config = ClientConfig::builder_with_provider(files.provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable("client certificate", cert, e.to_string()))?
        .with_root_certificates(files.roots)
        .with_client_auth_cert(files.chain, files.key)
        .map_err(|e| unusable("client private key", key, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// The server side of TLS for a server of our own (the coordinator's HTTP/JSON API): present `cert` and
/// `key`, ask for a client certificate chaining to `ca` but also take clients without one (they must then
/// authenticate otherwise: a bearer token). HTTP/2 and HTTP/1.1.
pub fn rustls_server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, TlsError> {
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::rustls::server::WebPkiClientVerifier;
    let files = RustlsFiles::read(ca, ("server certificate", cert), ("server private key", key))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(files.roots.into(), files.provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| unusable("client CA certificate", ca, e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(files.provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable("server certificate", cert, e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(files.chain, files.key)
        .map_err(|e| unusable("server private key", key, e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

fn unusable(what: &'static str, path: &Path, reason: String) -> TlsError {
    TlsError::Unusable { what, path: path.to_path_buf(), reason }
}

/// A CA, a certificate chain and its key, read and parsed for rustls.
struct RustlsFiles {
    roots: tokio_rustls::rustls::RootCertStore,
    chain: Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
    key: tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
    provider: std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider>,
}

impl RustlsFiles {
    fn read(
        ca: &Path,
        (cert_what, cert): (&'static str, &Path),
        (key_what, key): (&'static str, &Path),
    ) -> Result<RustlsFiles, TlsError> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls::{RootCertStore, crypto};
        let ca_pem = read_certificates("CA certificate", ca)?;
        let cert_pem = read_certificates(cert_what, cert)?;
        let key_pem = read_private_key(key_what, key)?;
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(&ca_pem) {
            let der = der.map_err(|e| unusable("CA certificate", ca, e.to_string()))?;
            roots.add(der).map_err(|e| unusable("CA certificate", ca, e.to_string()))?;
        }
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unusable(cert_what, cert, e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| unusable(key_what, key, e.to_string()))?;
        Ok(RustlsFiles { roots, chain, key, provider: std::sync::Arc::new(crypto::ring::default_provider()) })
    }
}

/// The subject common name of a DER certificate, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        #[serde(deserialize_with = "tls", default = "defaults")]
        tls: TlsFiles,
    }

    fn defaults() -> TlsFiles {
        TlsFiles::in_dir(Path::new("/etc/t"), "node")
    }

    fn tls<'de, D: Deserializer<'de>>(d: D) -> Result<TlsFiles, D::Error> {
        TlsFiles::deserialize_or(d, defaults())
    }

    fn parse(text: &str) -> Result<TlsFiles, String> {
        toml::from_str::<Config>(text).map(|c| c.tls).map_err(|e| e.message().to_string())
    }

    #[test]
    fn keys_left_out_keep_the_defaults() {
        let d = defaults();
        assert_eq!(d.ca, Path::new("/etc/t/ca.pem"));
        assert_eq!(
            (d.cert.as_path(), d.key.as_path()),
            (Path::new("/etc/t/node.pem"), Path::new("/etc/t/node.key"))
        );
        assert_eq!(parse("").unwrap(), d);
        assert_eq!(parse("[tls]\n").unwrap(), d);
        let t = parse("[tls]\ncert = \"/x.pem\"\ninsecure = true\n").unwrap();
        assert_eq!(t, TlsFiles { cert: "/x.pem".into(), insecure: true, ..d });
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let e = parse("[tls]\nsurplus = 1\n").unwrap_err();
        assert!(
            e.starts_with("unknown field `surplus`, expected one of `ca`, `cert`, `key`, `insecure`"),
            "{e}"
        );
        let e = parse("tls = 1\n").unwrap_err();
        assert!(e.contains("expected struct TlsConfig"), "{e}");
        let e = parse("[tls]\ninsecure = \"yes\"\n").unwrap_err();
        assert!(e.contains("expected a boolean"), "{e}");
    }
}
