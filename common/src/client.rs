//! Connecting to a gridforge gRPC service (an agent's, a coordinator's), with mutual TLS or (for local
//! development) plaintext. [`channel`] holds the endpoint and TLS rules; [`connect`] is the agent client over it.

use std::path::PathBuf;
use std::time::Duration;

use gridforge_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::error_chain;
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

/// Connect to the peer agent at `endpoint` (`host:port` or `https://host:port`) with mutual TLS as `tls`, and
/// require the peer's certificate to have the common name `peer`. The certificate is first verified as
/// [`channel`] verifies it (chained to the CA, issued for the endpoint's host or `tls.domain`); a certificate
/// for another name fails the connection with an error naming both. For agents dialing each other (a
/// migration's sender checks that it reached the receiver the job names).
pub async fn connect_peer(
    endpoint: &str,
    tls: &ClientTls,
    peer: &str,
) -> Result<AgentClient<Channel>, ClientError> {
    use hyper_util::rt::TokioIo;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::ServerName;

    let url = endpoint_url(endpoint, true)?;
    let bad = |reason: String| ClientError::Endpoint { endpoint: endpoint.to_string(), reason };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let authority = uri.authority().ok_or_else(|| bad("no host:port".into()))?.clone();
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
    let name = tls.domain.clone().unwrap_or_else(|| host.clone());
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| bad(format!("{name:?} is not a host name or address: {e}")))?;
    let config = tls::rustls_client_config(&tls.ca, &tls.cert, &tls.key)?;
    let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(443));
    let (peer, conn_addr) = (peer.to_string(), addr.clone());
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let (config, server_name, peer, addr) =
            (config.clone(), server_name.clone(), peer.clone(), conn_addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(config).connect(server_name, tcp).await?;
            let found = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| tls::common_name(der));
            if found.as_deref() != Some(peer.as_str()) {
                let found = found.map_or_else(|| "no common name".to_string(), |cn| format!("{cn:?}"));
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("the peer's certificate is for {found}, not {peer:?}"),
                ));
            }
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The connector does TLS: the channel itself speaks HTTP/2 over what it hands back.
    let plain = format!("http://{authority}");
    let channel = Endpoint::from_shared(plain)
        .map_err(|e| bad(error_chain(&e)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|e| ClientError::Connect { endpoint: url, reason: error_chain(&e) })?;
    Ok(AgentClient::new(channel))
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
