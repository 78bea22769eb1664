//! Connections to the node agents: one mutual-TLS channel per node, made on first use and kept (tonic
//! reconnects a broken channel by itself), and the identity check of enrollment.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridforge_agent::client::{self, ClientError, ClientTls};
use gridforge_proto::v1::agent_client::AgentClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tonic::transport::Channel;

use crate::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read {what} {path}: {reason}")]
    Pem { what: &'static str, path: String, reason: String },
    #[error("TLS handshake with {address} failed: {reason}")]
    Handshake { address: String, reason: String },
    #[error("the agent at {address} presents no certificate with a common name")]
    NoName { address: String },
}

/// The coordinator's client side towards every agent.
#[derive(Clone)]
pub struct AgentPool {
    tls: Option<ClientTls>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    pub call_timeout: Duration,
}

impl AgentPool {
    /// `tls` None: plaintext agents (local development only).
    pub fn new(tls: Option<ClientTls>, call_timeout: Duration) -> AgentPool {
        AgentPool { tls, channels: Arc::default(), call_timeout }
    }

    /// A client of the agent at `address`.
    pub async fn client(&self, address: &str) -> Result<AgentClient<Channel>, AgentError> {
        let cached = self.channels.lock().unwrap_or_else(|p| p.into_inner()).get(address).cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = client::channel(address, self.tls.as_ref()).await?;
                self.channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(AgentClient::new(channel).max_decoding_message_size(64 << 20))
    }

    /// Forget the channel to `address` (after the node is removed, or its address changed).
    pub fn forget(&self, address: &str) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(address);
    }

    /// The common name of the certificate the agent at `address` presents, after a full mutual-TLS
    /// handshake that checks it chains to the CA (and names the address). None without TLS.
    pub async fn peer_name(&self, address: &str) -> Result<Option<String>, AgentError> {
        let Some(tls) = &self.tls else { return Ok(None) };
        let hostport = address.strip_prefix("https://").unwrap_or(address);
        let host = host_of(hostport);
        let config = rustls_config(tls)?;
        let fail = |reason: String| AgentError::Handshake { address: address.to_string(), reason };
        let name = ServerName::try_from(host.to_string()).map_err(|e| fail(e.to_string()))?;
        let tcp = tokio::time::timeout(self.call_timeout, tokio::net::TcpStream::connect(hostport))
            .await
            .map_err(|_| fail("timed out connecting".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = tokio::time::timeout(self.call_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| fail("timed out".into()))?
            .map_err(|e| fail(error_chain(&e)))?;
        let (_, conn) = stream.get_ref();
        let der = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| AgentError::NoName { address: address.to_string() })?;
        let cn = x509_parser::parse_x509_certificate(der.as_ref()).ok().and_then(|(_, c)| {
            c.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string)
        });
        cn.map(Some).ok_or_else(|| AgentError::NoName { address: address.to_string() })
    }
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

fn rustls_config(tls: &ClientTls) -> Result<ClientConfig, AgentError> {
    let pem = |what: &'static str, path: &std::path::Path, e: &dyn std::fmt::Display| AgentError::Pem {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&tls.ca).map_err(|e| pem("the CA", &tls.ca, &e))? {
        roots.add(c.map_err(|e| pem("the CA", &tls.ca, &e))?).map_err(|e| pem("the CA", &tls.ca, &e))?;
    }
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .map_err(|e| pem("the client certificate", &tls.cert, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem("the client certificate", &tls.cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| pem("the client key", &tls.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_root_certificates(roots).with_client_auth_cert(certs, key))
        .map_err(|e| pem("the client certificate", &tls.cert, &e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_of_addresses() {
        assert_eq!(super::host_of("node1:7443"), "node1");
        assert_eq!(super::host_of("10.0.0.2:7443"), "10.0.0.2");
        assert_eq!(super::host_of("[::1]:7443"), "::1");
    }
}
