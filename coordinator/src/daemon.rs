//! The coordinator daemon: the grid view opened from `state_dir/grid.redb` (or etcd, where this coordinator
//! is one of several and leads only once elected: see `ha`), unfinished operations resumed and the status
//! poller started once it leads, and the gRPC `Coordinator` service with mutual TLS, `grpc.health.v1` and reflection
//! (and, with `[http] listen`, the same service over HTTP/JSON with the web panel);
//! systemd readiness, watchdog and stop notifications; a graceful stop on SIGTERM or SIGINT.
//!
//! Stopping needs no drain: every operation is in the store and its agent job keeps running on the node,
//! so the next start re-attaches to it by its idempotency key.

use std::sync::Arc;
use std::time::Duration;

use gridforge_common::systemd;
use gridforge_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::server::TcpIncoming;

use crate::agents::AgentPool;
use crate::api::CoordinatorService;
use crate::config::Config;
use crate::grid::Defaults;
use crate::ha::{Cluster, Member};
use crate::ops::Engine;
use crate::store::{EtcdStore, GridView, RedbStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Tls(#[from] gridforge_common::tls::TlsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed: {0}")]
    Serve(String),
}

pub fn run(config: Config) -> Result<(), DaemonError> {
    gridforge_common::run_daemon("coordinator-rt", serve(config))
        .map_err(|source| DaemonError::Io { what: "start the async runtime".into(), source })?
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let io = |what: String| move |source| DaemonError::Io { what, source };
    let mut term = signal(SignalKind::terminate()).map_err(io("catch SIGTERM".into()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io("catch SIGINT".into()))?;

    let server_tls = if config.tls.insecure {
        tracing::warn!(listen = %config.listen, "TLS IS DISABLED (tls.insecure = true): plaintext, every caller is admin. Development only.");
        None
    } else {
        Some(gridforge_common::tls::server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?)
    };
    let agent_tls =
        if config.tls.insecure && config.agents.cert.is_none() { None } else { Some(config.agent_tls()) };

    let defaults = Defaults {
        overcommit_cpu: config.scheduler.overcommit_cpu,
        overcommit_memory: config.scheduler.overcommit_memory,
        disk_slots: u32::try_from(config.ops.max_disk_jobs_per_node).unwrap_or(u32::MAX),
    };
    let agents = AgentPool::new(agent_tls, Duration::from_secs(config.agents.call_timeout_secs));
    let me = Member { name: config.member_name(), address: config.advertise_address() };
    let (engine, etcd) = if config.store.backend == "etcd" {
        let e = &config.store.etcd;
        let timeout = Duration::from_secs(e.timeout_secs.max(1));
        let store = Arc::new(EtcdStore::connect(&e.endpoints, &e.prefix, timeout, e.max_txn_ops).await?);
        let opened = store.clone();
        let view = tokio::task::spawn_blocking(move || GridView::open(Box::new(opened), defaults))
            .await
            .map_err(|e| DaemonError::Serve(e.to_string()))??;
        let loaded_at = store.revision();
        let cluster = Arc::new(Cluster::etcd(me, store.clone()));
        let engine = Engine::in_cluster(view, agents, config.ops.clone(), config.fencing.clone(), cluster);
        (engine, Some((store, loaded_at)))
    } else {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(io(format!("create the state directory {}", config.state_dir.display())))?;
        let path = config.store_path();
        let store = tokio::task::spawn_blocking(move || RedbStore::open(&path))
            .await
            .map_err(|e| DaemonError::Serve(e.to_string()))??;
        let view = GridView::open(Box::new(store), defaults)?;
        let cluster = Arc::new(Cluster::embedded(me));
        (Engine::in_cluster(view, agents, config.ops.clone(), config.fencing.clone(), cluster), None)
    };
    let (nodes, vms) = engine.view().read(|s| (s.nodes.len(), s.vms.len()));
    tracing::info!(nodes, vms, store = %config.store_description(), "grid view loaded");
    // The leader's work: resume what is in flight, poll the nodes, purge old operations.
    let lead: crate::ha::OnLeading = {
        let (engine, poller, keep_hours) =
            (engine.clone(), config.poller.clone(), config.ops.keep_finished_hours);
        Box::new(move || {
            let resumed = engine.resume();
            tracing::info!(
                resumed,
                term = engine.cluster().term(),
                "leading: operations resumed, polling nodes"
            );
            tokio::spawn(crate::poller::run(engine.clone(), poller));
            if keep_hours > 0 {
                tokio::spawn(purge_operations(engine, Duration::from_secs(keep_hours.saturating_mul(3600))));
            }
        })
    };
    match etcd {
        None => lead(),
        Some((store, loaded_at)) => {
            let ttl = Duration::from_secs(config.store.etcd.lease_ttl_secs);
            let engine = engine.clone();
            tokio::spawn(async move {
                let reason = crate::ha::run_etcd(store, engine, ttl, loaded_at, lead).await;
                tracing::error!(
                    "leadership lost: {reason}; exiting so that this coordinator restarts as a follower and \
                     nothing of its term acts again"
                );
                systemd::notify_stopping("leadership lost");
                std::process::exit(1);
            });
        }
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        b.register_encoded_file_descriptor_set(gridforge_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
        .build_v1()
        .map_err(|e| DaemonError::Serve(format!("building the reflection service: {e}")))?;
    let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
        .build_v1alpha()
        .map_err(|e| DaemonError::Serve(format!("building the reflection service: {e}")))?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).map_err(|e| DaemonError::Serve(crate::error_chain(&e)))?;
    }
    let service = CoordinatorService::new(engine.clone(), config.auth.clone(), !config.tls.insecure);
    let http = match config.http.listen {
        None => None,
        Some(listen) => Some(start_http(&config, listen, &engine).await?),
    };
    // Answers from a view that may be out of date say so in their metadata (gridctl warns).
    let cluster = engine.cluster().clone();
    let stale = tower::util::MapResponseLayer::new(
        move |mut resp: tonic::codegen::http::Response<tonic::body::Body>| {
            if let Some(reason) = cluster.stale()
                && let Ok(value) = reason.replace(['\r', '\n'], " ").parse()
            {
                resp.headers_mut().insert(crate::ha::STALE_HEADER, value);
            }
            resp
        },
    );
    let router = builder
        .layer(stale)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(service));
    let listener =
        TcpListener::bind(config.listen).await.map_err(io(format!("listen on {}", config.listen)))?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stop_rx.await;
    }));
    tracing::info!(listen = %addr, tls = !config.tls.insecure, version = env!("CARGO_PKG_VERSION"), "gridforge-coordinator serving");
    systemd::notify_ready(&addr);
    // Pings while the grid view answers (its lock is not wedged).
    systemd::spawn_watchdog("the grid view", {
        let engine = engine.clone();
        move || engine.view().read(|s| s.nodes.len())
    });
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
        result = &mut server => {
            systemd::notify_stopping("the gRPC server failed");
            return Err(DaemonError::Serve(match result {
                Ok(Ok(())) => "it stopped unexpectedly".into(),
                Ok(Err(e)) => crate::error_chain(&e),
                Err(e) => e.to_string(),
            }));
        }
    }
    if let Some(http) = http {
        http.abort();
    }
    systemd::notify_stopping("stopping");
    health.set_not_serving::<CoordinatorServer<CoordinatorService>>().await;
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(5), &mut server).await.is_err() {
        tracing::warn!("calls still open after 5 s; closing them");
        server.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The HTTP/JSON API and the panel on `listen`, over the same service as gRPC, with the same TLS files.
async fn start_http(
    config: &Config,
    listen: std::net::SocketAddr,
    engine: &Engine,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let insecure = config.tls.insecure;
    let tls = if insecure {
        None
    } else {
        Some(gridforge_common::tls::rustls_server_config(&config.tls.ca, &config.tls.cert, &config.tls.key)?)
    };
    let service = CoordinatorService::new(engine.clone(), config.auth.clone(), !insecure);
    let api = Arc::new(crate::http::HttpApi::new(service, &config.http, insecure));
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Io { what: format!("listen on {listen}"), source })?;
    let addr = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %addr, tls = !insecure, "HTTP API and panel serving");
    let router = crate::http::router(api);
    Ok(tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, tls, router).await {
            tracing::error!("the HTTP API stopped: {e}");
        }
    }))
}

/// Every hour (and at start), forget the finished operations older than `keep`, in transactions of at most
/// 10,000 so that a long history does not hold the view's lock for long.
async fn purge_operations(engine: Engine, keep: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let before = std::time::SystemTime::now().checked_sub(keep).unwrap_or(std::time::UNIX_EPOCH);
        // On etcd a transaction takes at most store.etcd.max_txn_ops records.
        let limit = engine.view().max_changes().unwrap_or(10_000).min(10_000);
        loop {
            match engine.purge_operations(before, limit).await {
                Ok(0) => break,
                Ok(n) => tracing::info!(operations = n, "purged finished operations"),
                Err(e) => {
                    tracing::error!("cannot purge finished operations: {e}");
                    break;
                }
            }
        }
    }
}
