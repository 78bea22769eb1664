//! The node daemon (`gridforge-agent serve`): the job engine behind the gRPC `Agent` service with mutual
//! TLS, `grpc.health.v1` and server reflection; Prometheus metrics over plain HTTP; systemd readiness,
//! watchdog and stop notifications; and a graceful stop on SIGTERM or SIGINT.
//!
//! Stopping: the agent reports STOPPING to systemd and NOT_SERVING to health checks, refuses new jobs,
//! lets running jobs finish for `jobs.shutdown_grace_secs`, then cancels the rest at their next safe point
//! (they end INTERRUPTED, their targets made safe) and exits. A second signal skips the rest of the grace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gridforge_common::error_chain;
use gridforge_common::systemd;
use gridforge_common::tls::{self, TlsError};
use gridforge_proto::v1::agent_server::AgentServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::jobs::{JobEngine, JobError};
use crate::node::NodeContext;
use crate::server::{AgentService, agent_server};

/// After the grace period, how long cancelled jobs get to reach a safe point before they are recorded
/// INTERRUPTED without it.
const CANCEL_WAIT: Duration = Duration::from_secs(10);
/// How long open calls (event streams) get to end once the jobs are settled.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(5);
/// A metrics request must arrive within this time and this size.
const METRICS_READ_TIMEOUT: Duration = Duration::from_secs(5);
const METRICS_MAX_REQUEST: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file of the `[tls]` settings is missing or broken; `setting` names the key (`tls.cert`).
    #[error("{setting}")]
    Tls {
        setting: &'static str,
        #[source]
        source: TlsError,
    },
    #[error("cannot set up TLS with {cert} and {key}: {reason}")]
    TlsSetup { cert: String, key: String, reason: String },
    #[error(transparent)]
    Jobs(#[from] JobError),
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Start {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed: {0}")]
    Serve(String),
}

/// Run the daemon until SIGTERM or SIGINT, then stop gracefully. Blocks; makes its own async runtime.
pub fn run(config: Config) -> Result<(), DaemonError> {
    gridforge_common::run_daemon("agent-rt", serve(config))
        .map_err(|source| DaemonError::Start { what: "the async runtime", source })?
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let started = SystemTime::now();
    // Signals are caught from the start, so that a stop during startup is graceful too.
    let mut signals = Signals::new()?;

    let tls = if config.tls.insecure {
        tracing::warn!(
            listen = %config.listen,
            "TLS IS DISABLED (tls.insecure = true): the gRPC service is plaintext and accepts ANY client \
             without authentication. Use this for local development only, never on a network."
        );
        None
    } else {
        let t = &config.tls;
        Some(tls::server_config(&t.ca, &t.cert, &t.key).map_err(|source| {
            let settings = [("tls.ca", &t.ca), ("tls.cert", &t.cert), ("tls.key", &t.key)];
            let setting =
                settings.into_iter().find(|(_, p)| p.as_path() == source.path()).map_or("tls", |s| s.0);
            DaemonError::Tls { setting, source }
        })?)
    };

    let hypervisor: Option<Arc<dyn Hypervisor>> = if config.libvirt.uri.is_empty() {
        tracing::info!("no libvirt URI configured: disk jobs only, hypervisor jobs are refused");
        None
    } else {
        Some(Arc::new(Libvirt::new(&config.libvirt, &config.state_dir).with_network(&config.network)))
    };
    if let Some(hv) = hypervisor.clone() {
        // Only for the log: the connection is made on first use and remade whenever it breaks.
        tokio::task::spawn_blocking(move || match hv.ping() {
            Ok(kind) => tracing::info!(uri = %hv.uri(), domain_type = kind.as_str(), "libvirt reachable"),
            Err(e) => {
                tracing::warn!(uri = %hv.uri(), "libvirt is not reachable now; hypervisor jobs fail UNAVAILABLE until it is: {}", error_chain(&e))
            }
        });
    }

    let engine = {
        let (config, hypervisor) = (config.clone(), hypervisor.clone());
        tokio::task::spawn_blocking(move || JobEngine::open(&config, hypervisor))
            .await
            .map_err(|e| DaemonError::Serve(format!("opening the job engine: {e}")))??
    };
    let node = Arc::new(NodeContext { config: config.clone(), hypervisor });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gridforge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Serve(format!("building the reflection service: {e}")))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gridforge_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| DaemonError::Serve(format!("building the reflection service: {e}")))?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(|e| DaemonError::TlsSetup {
            cert: config.tls.cert.display().to_string(),
            key: config.tls.key.display().to_string(),
            reason: error_chain(&e),
        })?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agent_server(AgentService::new(engine.clone(), node), &config));

    let listener = TcpListener::bind(config.listen).await.map_err(|source| DaemonError::Bind {
        what: "gRPC",
        addr: config.listen,
        source,
    })?;
    let grpc_addr = listener.local_addr().unwrap_or(config.listen);
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr).await.map_err(|source| DaemonError::Bind {
                what: "metrics",
                addr,
                source,
            })?;
            Some(l)
        }
        None => None,
    };
    if let Some(l) = metrics {
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(addr = %addr, "serving Prometheus metrics on /metrics");
        tokio::spawn(serve_metrics(l, engine.clone(), config.node_name.clone(), started));
    }

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(
        listen = %grpc_addr,
        tls = !config.tls.insecure,
        node = %config.node_name,
        version = env!("CARGO_PKG_VERSION"),
        "gridforge-agent serving"
    );
    systemd::notify_ready(&grpc_addr);
    // A wedged engine stops the pings and systemd restarts the agent.
    systemd::spawn_watchdog("the job engine", {
        let engine = engine.clone();
        move || engine.get("")
    });

    tokio::select! {
        name = signals.next() => tracing::info!(signal = name, "stopping"),
        result = &mut server => {
            // The server ended by itself: record running jobs INTERRUPTED before reporting why.
            systemd::notify_stopping("the gRPC server failed");
            let _ = tokio::task::spawn_blocking(move || engine.shutdown(CANCEL_WAIT)).await;
            return Err(DaemonError::Serve(match result {
                Ok(Ok(())) => "it stopped unexpectedly".to_string(),
                Ok(Err(e)) => error_chain(&e),
                Err(e) => e.to_string(),
            }));
        }
    }

    systemd::notify_stopping("stopping: waiting for running jobs");
    health.set_not_serving::<AgentServer<AgentService>>().await;
    health.set_service_status("", ServingStatus::NotServing).await;
    let grace = Duration::from_secs(config.jobs.shutdown_grace_secs);
    let drain = {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.drain(grace))
    };
    tracing::info!(grace_secs = grace.as_secs(), "refusing new jobs; letting running jobs finish");
    let finished = tokio::select! {
        done = drain => done.unwrap_or(false),
        name = signals.next() => {
            tracing::warn!(signal = name, "second stop signal: cancelling running jobs now");
            false
        }
    };
    if !finished {
        tracing::warn!(
            "cancelling the jobs still running; they end INTERRUPTED with their targets made safe"
        );
    }
    let settle = tokio::task::spawn_blocking(move || engine.shutdown(CANCEL_WAIT));
    let _ = settle.await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(SERVER_STOP_WAIT, &mut server).await {
        Ok(Ok(Err(e))) => {
            tracing::warn!("the gRPC server stopped with an error: {}", error_chain(&e))
        }
        Ok(_) => {}
        Err(_) => {
            tracing::warn!("calls still open after {SERVER_STOP_WAIT:?}; closing them");
            server.abort();
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self, DaemonError> {
        let install =
            |kind| signal(kind).map_err(|source| DaemonError::Start { what: "signal handling", source });
        Ok(Signals { term: install(SignalKind::terminate())?, int: install(SignalKind::interrupt())? })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Minimal HTTP/1.1 for Prometheus: `GET /metrics`, one response per connection.
async fn serve_metrics(listener: TcpListener, engine: JobEngine, node: String, started: SystemTime) {
    loop {
        let stream = gridforge_common::net::accept(&listener, "metrics listener").await;
        let (engine, node) = (engine.clone(), node.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics_request(stream, engine, &node, started).await {
                tracing::debug!("metrics request: {e}");
            }
        });
    }
}

async fn metrics_request(
    mut stream: TcpStream,
    engine: JobEngine,
    node: &str,
    started: SystemTime,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head_read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
            if buf.len() > METRICS_MAX_REQUEST {
                return Err(std::io::Error::other("request head too large"));
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    let (status, body) = match tokio::time::timeout(METRICS_READ_TIMEOUT, head_read).await {
        Err(_) => ("408 Request Timeout", "request timed out\n".to_string()),
        Ok(Err(_)) => ("431 Request Header Fields Too Large", "request head too large\n".to_string()),
        Ok(Ok(())) => {
            let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = path.split('?').next().unwrap_or("");
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => {
                    let node = node.to_string();
                    let text = tokio::task::spawn_blocking(move || render_metrics(&engine, &node, started))
                        .await
                        .unwrap_or_default();
                    ("200 OK", if method == "HEAD" { String::new() } else { text })
                }
                ("GET" | "HEAD", _) => ("404 Not Found", "only /metrics is served here\n".to_string()),
                _ => ("405 Method Not Allowed", "use GET /metrics\n".to_string()),
            }
        }
    };
    let content_type = if status.starts_with("200") {
        "text/plain; version=0.0.4; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus text exposition: the engine's job metrics and the agent's identity.
pub fn render_metrics(engine: &JobEngine, node: &str, started: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    out.push_str("# HELP gridforge_agent_info The agent's version and node name.\n");
    out.push_str("# TYPE gridforge_agent_info gauge\n");
    let _ = writeln!(
        out,
        "gridforge_agent_info{{version=\"{}\",node=\"{}\"}} 1",
        escape_label(env!("CARGO_PKG_VERSION")),
        escape_label(node)
    );
    out.push_str(
        "# HELP gridforge_agent_start_time_seconds When the agent started, in seconds since the epoch.\n",
    );
    out.push_str("# TYPE gridforge_agent_start_time_seconds gauge\n");
    let start = started.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let _ = writeln!(out, "gridforge_agent_start_time_seconds {start:.3}");
    engine.render_metrics(&mut out);
    out
}

fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
