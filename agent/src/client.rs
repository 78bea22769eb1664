//! Connecting to an agent's gRPC service, with mutual TLS or (for local development) plaintext.

use std::path::PathBuf;
use std::time::Duration;

use gridforge_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{self, TlsError};

/// How long establishing the connection (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client's side of mutual TLS: the CA the agent's certificate must chain to, and the client's own
/// certificate and key (made by `gridforge-agent pki issue`).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Name to check the agent's certificate against, when it differs from the endpoint's host.
    pub domain: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
}

/// Connect to the agent at `endpoint` (`host:port`, `https://host:port`, or `http://host:port` without
/// TLS). With `tls` the connection is mutual TLS and an endpoint without a scheme means `https://`; without
/// it, plaintext (`http://`).
pub async fn connect(endpoint: &str, tls: Option<&ClientTls>) -> Result<AgentClient<Channel>, ClientError> {
    Ok(AgentClient::new(channel(endpoint, tls).await?))
}

/// A connected channel to the gRPC server at `endpoint`, for any service's client, with the rules of
/// [`connect`]: mutual TLS with `tls` (no scheme means `https://`), plaintext (`http://`) without it.
pub async fn channel(endpoint: &str, tls: Option<&ClientTls>) -> Result<Channel, ClientError> {
    let url = endpoint_url(endpoint, tls.is_some())?;
    let bad = |reason: String| ClientError::Endpoint { endpoint: endpoint.to_string(), reason };
    let mut ep = Endpoint::from_shared(url.clone()).map_err(|e| bad(error_chain(&e)))?;
    ep = ep.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
    if let Some(t) = tls {
        let config = tls::client_config(&t.ca, &t.cert, &t.key, t.domain.as_deref())?;
        ep = ep.tls_config(config).map_err(|e| bad(error_chain(&e)))?;
    }
    ep.connect().await.map_err(|e| ClientError::Connect { endpoint: url, reason: error_chain(&e) })
}

/// The URL for `endpoint`, refusing a scheme that contradicts the TLS choice.
fn endpoint_url(endpoint: &str, tls: bool) -> Result<String, ClientError> {
    let bad =
        |reason: &str| ClientError::Endpoint { endpoint: endpoint.to_string(), reason: reason.to_string() };
    if endpoint.is_empty() {
        return Err(bad("empty (give host:port)"));
    }
    match endpoint.split_once("://") {
        None if tls => Ok(format!("https://{endpoint}")),
        None => Ok(format!("http://{endpoint}")),
        Some(("https", _)) if tls => Ok(endpoint.to_string()),
        Some(("https", _)) => Err(bad("https:// needs a CA, a client certificate and a key")),
        Some(("http", _)) if tls => Err(bad("http:// is plaintext; use https:// (or host:port) with TLS")),
        Some(("http", _)) => Ok(endpoint.to_string()),
        Some((scheme, _)) => Err(bad(&format!("unknown scheme {scheme}:// (use https://)"))),
    }
}

pub use crate::error_chain;

#[cfg(test)]
mod tests {
    use super::endpoint_url;

    #[test]
    fn endpoints_get_the_scheme_of_the_tls_choice() {
        assert_eq!(endpoint_url("node1:7443", true).unwrap(), "https://node1:7443");
        assert_eq!(endpoint_url("127.0.0.1:7443", false).unwrap(), "http://127.0.0.1:7443");
        assert_eq!(endpoint_url("https://node1:7443", true).unwrap(), "https://node1:7443");
        assert!(endpoint_url("http://node1:7443", true).is_err());
        assert!(endpoint_url("https://node1:7443", false).is_err());
        assert!(endpoint_url("ftp://node1", true).is_err());
        assert!(endpoint_url("", true).is_err());
    }
}
