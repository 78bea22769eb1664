//! Shared by the job engine tests: an engine on a temporary state directory, served over real tonic on
//! 127.0.0.1, and helpers to follow jobs to their end.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gridforge_agent::config::{Config, ImagesConfig, JobsConfig, LibvirtConfig};
use gridforge_agent::jobs::JobEngine;
use gridforge_agent::node::NodeContext;
use gridforge_agent::server::{AgentService, agent_server};
use gridforge_common::tls::TlsFiles;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    DiskTarget, GetJobRequest, Job, JobEvent, JobState, SubmitJobRequest, WatchJobRequest, WipeJob,
    disk_target, submit_job_request,
};
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// A node's directories under one temp dir; `disks/` is the allowed device directory.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: Config,
}

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        std::fs::create_dir_all(config.jobs.devices[0].clone()).unwrap();
        Self { dir, config }
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.config.jobs.devices[0].join(name)
    }

    /// A sparse file of `size` bytes in the allowed directory.
    pub fn sparse_disk(&self, name: &str, size: u64) -> PathBuf {
        let path = self.disk(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    pub fn open(&self) -> JobEngine {
        JobEngine::open(&self.config, None).expect("opening the job engine")
    }

    /// The wipe report signing key's public half, as the engine wrote it.
    pub fn report_key(&self) -> ed25519_dalek::VerifyingKey {
        let public = gridforge_agent::image::sign::public_key_path(&self.config.jobs.report_signing_key);
        gridforge_agent::image::sign::parse_trusted_key(public.to_str().unwrap()).unwrap()
    }
}

/// A config whose every path lies under `dir`, without a hypervisor or TLS.
pub fn config_in(dir: &Path) -> Config {
    let defaults = Config::default();
    Config {
        state_dir: dir.join("state"),
        cache_dir: dir.join("cache"),
        work_dir: dir.join("work"),
        metrics_listen: None,
        libvirt: LibvirtConfig { uri: String::new(), ..defaults.libvirt },
        images: ImagesConfig { bases_dir: dir.join("bases"), ..defaults.images },
        tls: TlsFiles { insecure: true, ..defaults.tls },
        jobs: JobsConfig {
            devices: vec![dir.join("disks")],
            report_signing_key: dir.join("state/report-signing.key"),
            ..defaults.jobs
        },
        ..defaults
    }
}

/// Serve `engine` on 127.0.0.1 (plaintext) and return a connected client.
pub async fn serve(engine: JobEngine, config: &Config) -> (AgentClient<Channel>, SocketAddr) {
    serve_node(engine, NodeContext { config: config.clone(), hypervisor: None }).await
}

/// Serve `engine` on 127.0.0.1 (plaintext) with `node` (e.g. with a hypervisor) for diagnostics and stats.
pub async fn serve_node(engine: JobEngine, node: NodeContext) -> (AgentClient<Channel>, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = node.config.clone();
    let svc = agent_server(AgentService::new(engine, Arc::new(node)), &config);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let client = AgentClient::connect(format!("http://{addr}")).await.unwrap();
    (client, addr)
}

pub fn device(path: &Path) -> Option<DiskTarget> {
    Some(DiskTarget { target: Some(disk_target::Target::Device(path.display().to_string())) })
}

pub fn wipe_request(key: &str, path: &Path, method: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.to_string(),
        job: Some(submit_job_request::Job::Wipe(WipeJob {
            target: device(path),
            method: method.to_string(),
            verify: String::new(),
            operator: String::new(),
        })),
        ..Default::default()
    }
}

/// Every event of a job until its final one, over WatchJob.
pub async fn watch_to_end(client: &mut AgentClient<Channel>, id: &str) -> Vec<JobEvent> {
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: id.to_string(), from_seq: 0 })
        .await
        .expect("WatchJob")
        .into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await.expect("WatchJob stream") {
        events.push(ev);
    }
    let last = events.last().expect("at least one event");
    assert_ne!(
        last.state,
        JobState::Unspecified as i32,
        "the stream ended without a final event: {events:?}"
    );
    events
}

/// Submit `req` and follow the job to its end, at most `limit`: the finished job and its events.
pub async fn run_job(
    client: &mut AgentClient<Channel>,
    req: SubmitJobRequest,
    limit: Duration,
) -> (Job, Vec<JobEvent>) {
    let key = req.idempotency_key.clone();
    let job = client.submit_job(req).await.unwrap_or_else(|e| panic!("SubmitJob {key}: {e:?}")).into_inner();
    let events = tokio::time::timeout(limit, watch_to_end(client, &job.id))
        .await
        .unwrap_or_else(|_| panic!("job {} ({key}) did not end within {limit:?}", job.id));
    (get(client, &job.id).await, events)
}

/// Watch until the first byte-progress event of the job (it is running and has written something).
pub async fn wait_for_progress(client: &mut AgentClient<Channel>, id: &str) {
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: id.to_string(), from_seq: 0 })
        .await
        .expect("WatchJob")
        .into_inner();
    while let Some(ev) = stream.message().await.expect("WatchJob stream") {
        assert_eq!(ev.state, JobState::Unspecified as i32, "job ended before making progress: {ev:?}");
        if ev.bytes_done > 0 {
            return;
        }
    }
    panic!("the event stream ended before any progress");
}

pub async fn get(client: &mut AgentClient<Channel>, id: &str) -> Job {
    client.get_job(GetJobRequest { job_id: id.to_string() }).await.expect("GetJob").into_inner()
}

/// The job's error (panics when it has none).
pub fn job_error(job: &Job) -> &gridforge_proto::v1::Error {
    match &job.outcome {
        Some(gridforge_proto::v1::job::Outcome::Error(e)) => e,
        other => panic!("job {} has no error outcome: {other:?}", job.id),
    }
}

/// The first `len` bytes of a file.
pub fn head(path: &Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path).unwrap().read_exact(&mut buf).unwrap();
    buf
}
