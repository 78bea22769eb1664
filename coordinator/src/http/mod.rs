//! The HTTP/JSON API and the web panel, served beside gRPC on a port of their own.
//!
//! `POST /v1/METHOD` takes the method's request message in proto3 JSON and answers its response message;
//! the methods that stream (`WatchOperation`, `WatchVm`) answer server-sent events, one message each. Every
//! call goes to the same [`CoordinatorService`] as gRPC, with the caller's client certificate or bearer token
//! carried in the `tonic::Request`, so authentication, roles and tenant scope are decided in one place. A
//! refusal, whoever makes it (the JSON parser, authentication, a role check, the engine), is one [`ApiError`]
//! body with the HTTP status of its gRPC code ([`http_status`]). `/v1/openapi.json` describes it all,
//! generated from the protobuf descriptors ([`openapi`]). `/` is the panel: static files built into the
//! binary that use this same API.

pub mod openapi;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gridforge_proto::v1::ApiError;
use gridforge_proto::v1::coordinator_server::Coordinator;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::api::{CoordinatorService, PeerCertificate};
use crate::config::HttpConfig;

/// Bytes in a MiB (the meters' full scales are configured in MiB/s).
const MIB: f64 = 1024.0 * 1024.0;
/// Largest request body taken.
const MAX_BODY: usize = 4 << 20;
/// A TLS handshake that has not finished after this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the HTTP front end serves from: the gRPC service implementation and the panel's settings.
pub struct HttpApi {
    service: CoordinatorService,
    /// Plaintext without authentication (`tls.insecure`): every caller is the local admin, as on gRPC.
    insecure: bool,
    panel: PanelSettings,
}

/// What the panel reads at start (`/panel/settings.json`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct PanelSettings {
    amber_percent: f64,
    red_percent: f64,
    /// The full scale of the disk and network meters, in bytes per second.
    disk_meter_bytes_per_sec: f64,
    network_meter_bytes_per_sec: f64,
    /// Whether the panel must ask for a token (false on a plaintext development coordinator).
    needs_token: bool,
}

impl HttpApi {
    pub fn new(service: CoordinatorService, config: &HttpConfig, insecure: bool) -> Self {
        let panel = PanelSettings {
            amber_percent: config.amber_percent,
            red_percent: config.red_percent,
            disk_meter_bytes_per_sec: config.disk_meter_mib_per_s * MIB,
            network_meter_bytes_per_sec: config.network_meter_mib_per_s * MIB,
            needs_token: !insecure,
        };
        HttpApi { service, insecure, panel }
    }
}

/// The client certificate of the connection a request came on.
#[derive(Clone)]
struct Peer(Option<PeerCertificate>);

/// A refusal: its HTTP status and body.
#[derive(Debug)]
pub struct Refusal(StatusCode, ApiError);

impl From<Status> for Refusal {
    fn from(s: Status) -> Refusal {
        let http = http_status(s.code());
        let mut body = error_body(http, s.code(), s.message());
        // A follower's refusal of a write names the leader, as on gRPC.
        let leader = s.metadata().get(crate::ha::LEADER_HEADER).and_then(|v| v.to_str().ok());
        body.leader = leader.unwrap_or_default().to_string();
        Refusal(http, body)
    }
}

fn error_body(http: StatusCode, code: Code, message: &str) -> ApiError {
    let code = format!("{code:?}");
    // "InvalidArgument" -> "INVALID_ARGUMENT", the names gRPC and google.rpc.Code give them.
    let mut name = String::new();
    for (i, ch) in code.char_indices() {
        if ch.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    ApiError {
        code: name,
        status: u32::from(http.as_u16()),
        message: message.to_string(),
        leader: String::new(),
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut r = json_response(self.0, &self.1);
        if let Ok(leader) = HeaderValue::from_str(&self.1.leader)
            && !self.1.leader.is_empty()
        {
            r.headers_mut().insert(crate::ha::LEADER_HEADER, leader);
        }
        r
    }
}

/// The HTTP status of a gRPC status code: the mapping of google.rpc.Code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => Refusal::from(Status::internal(format!("encoding the answer: {e}"))).into_response(),
    }
}

/// One call's request parts, made into the `tonic::Request` of whichever method it names.
struct Call<'a> {
    api: &'a HttpApi,
    peer: &'a Peer,
    headers: &'a HeaderMap,
    authority: Option<&'a str>,
    body: &'a [u8],
}

impl Call<'_> {
    /// The request message, with the caller's certificate and token for the service to authenticate.
    /// UNAUTHENTICATED before the body is read when the call carries neither.
    fn request<T: DeserializeOwned>(&self) -> Result<tonic::Request<T>, Status> {
        // A browser sends the client certificate it holds to any page's requests: a request another site's
        // page makes (its Origin is not this server) is refused, so that such a page cannot act as the user.
        if let Some(origin) = self.headers.get(header::ORIGIN) {
            // HTTP/1.1 names the server in Host, HTTP/2 in the request's :authority.
            let host = self.headers.get(header::HOST).and_then(|h| h.to_str().ok());
            let host = host.or(self.authority).unwrap_or_default();
            let origin = origin.to_str().unwrap_or_default();
            let same = origin.split_once("://").is_some_and(|(_, o)| !host.is_empty() && o == host);
            if !same {
                return Err(Status::permission_denied(format!(
                    "a request from the page of {origin:?}, not of this server, is refused"
                )));
            }
        }
        let authorization = self.headers.get(header::AUTHORIZATION);
        if !self.api.insecure && self.peer.0.is_none() && authorization.is_none() {
            return Err(Status::unauthenticated(
                "no client certificate and no `Authorization: Bearer TOKEN` (gridctl token create)",
            ));
        }
        let body = if self.body.iter().all(u8::is_ascii_whitespace) { &b"{}"[..] } else { self.body };
        let message: T = serde_json::from_slice(body)
            .map_err(|e| Status::invalid_argument(format!("request body: {e}")))?;
        let mut request = tonic::Request::new(message);
        if let Some(value) = authorization {
            let value = value
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Status::unauthenticated("authorization: not a printable ASCII header"))?;
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(cert) = &self.peer.0 {
            request.extensions_mut().insert(cert.clone());
        }
        Ok(request)
    }
}

/// The methods, each routed to the service's own implementation: `unary` answer one JSON message,
/// `streams` server-sent events.
macro_rules! methods {
    (unary { $($name:literal => $method:ident,)* } streams { $($sname:literal => $smethod:ident,)* }) => {
        /// Every method the HTTP API routes, by its name in the Coordinator service.
        pub const METHODS: &[&str] = &[$($name,)* $($sname,)*];
        /// Of those, the ones that answer server-sent events.
        pub const STREAMS: &[&str] = &[$($sname,)*];

        async fn dispatch(method: &str, call: Call<'_>) -> Result<Response, Status> {
            let s = &call.api.service;
            match method {
                $($name => Ok(json_response(StatusCode::OK, s.$method(call.request()?).await?.get_ref())),)*
                $($sname => Ok(events(s.$smethod(call.request()?).await?.into_inner())),)*
                _ => Err(Status::not_found(format!(
                    "no method {method:?} (POST /v1/METHOD, methods in /v1/openapi.json)"
                ))),
            }
        }
    };
}

methods! {
    unary {
        "AddNode" => add_node,
        "RemoveNode" => remove_node,
        "ListNodes" => list_nodes,
        "GetNode" => get_node,
        "CordonNode" => cordon_node,
        "UncordonNode" => uncordon_node,
        "DrainNode" => drain_node,
        "FenceNode" => fence_node,
        "ConfirmFenced" => confirm_fenced,
        "CreateVm" => create_vm,
        "ListVms" => list_vms,
        "GetVm" => get_vm,
        "DeleteVm" => delete_vm,
        "ControlVm" => control_vm,
        "ResizeVm" => resize_vm,
        "SnapshotVm" => snapshot_vm,
        "ExplainVm" => explain_vm,
        "MigrateVm" => migrate_vm,
        "ListOperations" => list_operations,
        "GetOperation" => get_operation,
        "AddUser" => add_user,
        "RemoveUser" => remove_user,
        "ListUsers" => list_users,
        "CreateToken" => create_token,
        "CoordinatorStatus" => coordinator_status,
        "PutTenant" => put_tenant,
        "RemoveTenant" => remove_tenant,
        "ListTenants" => list_tenants,
        "GetTenant" => get_tenant,
        "PutGroup" => put_group,
        "RemoveGroup" => remove_group,
        "GetGroup" => get_group,
        "ListDecisions" => list_decisions,
        "SetVmScaling" => set_vm_scaling,
        "PutNetwork" => put_network,
        "RemoveNetwork" => remove_network,
        "ListNetworks" => list_networks,
    }
    streams {
        "WatchOperation" => watch_operation,
        "WatchVm" => watch_vm,
    }
}

/// A stream of messages as server-sent events: each message one `data:` line of proto3 JSON; a refusal
/// mid-stream one `event: error` with its [`ApiError`], which ends it.
fn events<T, S>(stream: S) -> Response
where
    T: Serialize + Send + 'static,
    S: Stream<Item = Result<T, Status>> + Send + 'static,
{
    let events = stream.map(|item| {
        Ok::<_, Infallible>(match item {
            Ok(message) => Event::default().data(serde_json::to_string(&message).unwrap_or_default()),
            Err(status) => {
                let Refusal(_, body) = Refusal::from(status);
                Event::default().event("error").data(serde_json::to_string(&body).unwrap_or_default())
            }
        })
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

async fn call(
    State(api): State<Arc<HttpApi>>,
    Extension(peer): Extension<Peer>,
    Path(method): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            let message = format!("request body: {e} (at most {MAX_BODY} bytes)");
            let http = StatusCode::PAYLOAD_TOO_LARGE;
            return Refusal(http, error_body(http, Code::InvalidArgument, &message)).into_response();
        }
    };
    let authority = uri.authority().map(|a| a.as_str());
    let call = Call { api: &api, peer: &peer, headers: &headers, authority, body: &body };
    dispatch(&method, call).await.unwrap_or_else(|s| Refusal::from(s).into_response())
}

const INDEX_HTML: &str = include_str!("panel/index.html");
const PANEL_JS: &str = include_str!("panel/panel.js");
const PANEL_CSS: &str = include_str!("panel/panel.css");

/// A file of the panel: no cache (it changes with the binary), nothing loaded from elsewhere.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// The routes: the API under /v1, the panel at /.
pub fn router(api: Arc<HttpApi>) -> Router {
    let refuse = |http: StatusCode, code: Code, message: &'static str| {
        move || async move { Refusal(http, error_body(http, code, message)) }
    };
    let openapi = openapi::document_json();
    Router::new()
        .route(
            "/v1/{method}",
            post(call).fallback(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                Code::Unimplemented,
                "the API's methods take POST",
            )),
        )
        .route(
            "/v1/openapi.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], openapi) }),
        )
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/panel.js", get(|| async { asset("text/javascript; charset=utf-8", PANEL_JS) }))
        .route("/panel.css", get(|| async { asset("text/css; charset=utf-8", PANEL_CSS) }))
        .route(
            "/panel/settings.json",
            get(|State(api): State<Arc<HttpApi>>| async move { json_response(StatusCode::OK, &api.panel) }),
        )
        .fallback(refuse(StatusCode::NOT_FOUND, Code::NotFound, "no such path (the API is under /v1/)"))
        .with_state(api)
}

/// Serves `router` on `listener` until the task is dropped: TLS with `tls` (a client certificate asked
/// for, not required), plaintext without it; HTTP/1.1 and HTTP/2.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    router: Router,
) -> std::io::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let tcp = gridforge_common::net::accept(&listener, "http").await;
        let _ = tcp.set_nodelay(true);
        let (router, acceptor) = (router.clone(), acceptor.clone());
        tokio::spawn(async move {
            match acceptor {
                None => connection(tcp, router, Peer(None)).await,
                Some(acceptor) => {
                    let Ok(Ok(stream)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let peer = Peer(cert.map(|c| PeerCertificate(c.to_vec())));
                    connection(stream, router, peer).await
                }
            }
        });
    }
}

async fn connection<IO>(io: IO, router: Router, peer: Peer)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service = router.map_request(move |mut r: axum::http::Request<hyper::body::Incoming>| {
        r.extensions_mut().insert(peer.clone());
        r
    });
    let service = hyper_util::service::TowerToHyperService::new(service);
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    if let Err(e) = builder.serve_connection(hyper_util::rt::TokioIo::new(io), service).await {
        tracing::debug!("http connection: {e}");
    }
}

#[cfg(test)]
mod tests;
