//! The gRPC `Agent` service: translates requests into job engine calls and engine errors into statuses.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use gridforge_common::error_chain;
use gridforge_proto::v1::agent_server::{Agent, AgentServer};
use gridforge_proto::v1::{
    CancelJobRequest, DiagnosticsReport, DiagnosticsRequest, DiskChunk, GetJobRequest, Job, JobEvent,
    ListJobsRequest, ListJobsResponse, LiveMigrationRequest, LiveMigrationResponse, NodeStatsReport,
    NodeStatsRequest, ReceiveDiskResponse, SubmitJobRequest, WatchJobRequest, disk_chunk,
};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::config::Config;
use crate::jobs::{
    CancelError, DiskSource, JobEngine, ReceiveFailure, SourceError, SubmitError, TransferRefused, WatchError,
};
use crate::node::{self, NodeContext};

/// Caller name for requests without a client certificate (plaintext, local development).
pub const LOCAL_CLIENT: &str = "local";
/// How long a ReceiveDisk caller has to send its first message.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a LiveMigration call waits for its job's answer.
const LIVE_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// NodeStats sampling window when the request gives none, and the longest allowed.
const DEFAULT_SAMPLE_MS: u32 = 500;
const MAX_SAMPLE_MS: u32 = 10_000;

/// The `Agent` service over a job engine and the node's context.
pub struct AgentService {
    engine: JobEngine,
    node: Arc<NodeContext>,
}

impl AgentService {
    pub fn new(engine: JobEngine, node: Arc<NodeContext>) -> Self {
        Self { engine, node }
    }
}

/// The tonic server for `svc`, refusing requests larger than `jobs.max_request_bytes`.
pub fn agent_server(svc: AgentService, config: &Config) -> AgentServer<AgentService> {
    AgentServer::new(svc).max_decoding_message_size(config.jobs.max_request_bytes)
}

impl From<SubmitError> for Status {
    fn from(e: SubmitError) -> Status {
        let message = error_chain(&e);
        match e {
            SubmitError::Invalid { .. } => Status::invalid_argument(message),
            SubmitError::Busy { .. } | SubmitError::Precondition(_) | SubmitError::StaleTerm(_) => {
                Status::failed_precondition(message)
            }
            SubmitError::NotFound(_) => Status::not_found(message),
            SubmitError::Unavailable(_) | SubmitError::ShuttingDown => Status::unavailable(message),
            SubmitError::Unsupported(_) => Status::unimplemented(message),
            SubmitError::Journal(_) => Status::internal(message),
        }
    }
}

impl From<CancelError> for Status {
    fn from(e: CancelError) -> Status {
        match e {
            CancelError::NotFound(_) => Status::not_found(e.to_string()),
            CancelError::Finished { .. } | CancelError::StaleTerm(_) => {
                Status::failed_precondition(e.to_string())
            }
            CancelError::Journal(_) => Status::internal(error_chain(&e)),
        }
    }
}

impl From<WatchError> for Status {
    fn from(e: WatchError) -> Status {
        match e {
            WatchError::NotFound(_) => Status::not_found(e.to_string()),
            WatchError::Journal(_) => Status::internal(error_chain(&e)),
        }
    }
}

impl From<TransferRefused> for Status {
    fn from(e: TransferRefused) -> Status {
        match e {
            TransferRefused::WrongSender { .. } => Status::permission_denied(e.to_string()),
            TransferRefused::Unknown(_)
            | TransferRefused::Used { .. }
            | TransferRefused::WrongSize { .. }
            | TransferRefused::WrongMode { .. } => Status::failed_precondition(e.to_string()),
        }
    }
}

impl From<ReceiveFailure> for Status {
    fn from(e: ReceiveFailure) -> Status {
        match e {
            ReceiveFailure::Invalid(m) => Status::invalid_argument(m),
            ReceiveFailure::Mismatch(m) => Status::data_loss(m),
            ReceiveFailure::Failed(m) => Status::aborted(m),
        }
    }
}

/// A ReceiveDisk stream as the job engine reads it: from the job's thread, driven by the server's runtime.
struct StreamSource {
    stream: Streaming<DiskChunk>,
    runtime: tokio::runtime::Handle,
}

impl DiskSource for StreamSource {
    fn next(&mut self, wait: Duration) -> Result<Option<DiskChunk>, SourceError> {
        // The timer is made inside the runtime's context: block_on enters it, the caller's thread is not in it.
        let stream = &mut self.stream;
        let next = self.runtime.block_on(async move { tokio::time::timeout(wait, stream.message()).await });
        match next {
            Ok(Ok(msg)) => Ok(msg),
            Ok(Err(status)) => Err(SourceError::Broken(format!("{:?}: {}", status.code(), status.message()))),
            // Streaming::message is cancel-safe: a message not yet whole stays buffered for the next call.
            Err(_) => Err(SourceError::Idle),
        }
    }
}

fn require_job_id(id: &str) -> Result<(), Status> {
    if id.is_empty() { Err(Status::invalid_argument("job_id: required")) } else { Ok(()) }
}

/// The caller's name: the common name of its client certificate, or [`LOCAL_CLIENT`] without TLS.
fn client_name<T>(request: &Request<T>) -> String {
    let Some(certs) = request.peer_certs() else { return LOCAL_CLIENT.to_string() };
    let Some(cert) = certs.first() else { return LOCAL_CLIENT.to_string() };
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, cert)) => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| cert.subject().to_string()),
        Err(_) => "unknown client".to_string(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("request handler failed: {e}")))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let client = client_name(&request);
        let req = request.into_inner();
        let engine = self.engine.clone();
        // Submission may ask the hypervisor about volumes and domains: off the async threads.
        let job = blocking(move || engine.submit(req, &client)).await??;
        Ok(Response::new(job))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<EventStream>, Status> {
        let req = request.into_inner();
        require_job_id(&req.job_id)?;
        let rx = self.engine.watch(&req.job_id, req.from_seq)?;
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        require_job_id(&req.job_id)?;
        Ok(Response::new(self.engine.cancel(&req.job_id, req.leader_term)?))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        require_job_id(&req.job_id)?;
        self.engine
            .get(&req.job_id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no job {:?}", req.job_id)))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = request.into_inner();
        Ok(Response::new(ListJobsResponse { jobs: self.engine.list(&req) }))
    }

    async fn diagnostics(
        &self,
        _request: Request<DiagnosticsRequest>,
    ) -> Result<Response<DiagnosticsReport>, Status> {
        let (engine, node) = (self.engine.clone(), self.node.clone());
        let report = blocking(move || {
            node::diagnostics(&node, &engine.list(&ListJobsRequest::default()), engine.leader_term())
        })
        .await?;
        Ok(Response::new(report))
    }

    async fn node_stats(
        &self,
        request: Request<NodeStatsRequest>,
    ) -> Result<Response<NodeStatsReport>, Status> {
        let sample_ms = match request.into_inner().sample_ms {
            0 => DEFAULT_SAMPLE_MS,
            ms if ms > MAX_SAMPLE_MS => {
                return Err(Status::invalid_argument(format!(
                    "sample_ms: {ms} is more than {MAX_SAMPLE_MS}"
                )));
            }
            ms => ms,
        };
        let node = self.node.clone();
        let report =
            blocking(move || node::node_stats(&node, Duration::from_millis(sample_ms.into()))).await?;
        Ok(Response::new(report))
    }

    async fn receive_disk(
        &self,
        request: Request<Streaming<DiskChunk>>,
    ) -> Result<Response<ReceiveDiskResponse>, Status> {
        let client = client_name(&request);
        if client == LOCAL_CLIENT {
            return Err(Status::permission_denied(
                "ReceiveDisk needs the sending agent's client certificate (mutual TLS)",
            ));
        }
        let mut stream = request.into_inner();
        let first = tokio::time::timeout(START_TIMEOUT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no start message within 30 s"))??;
        let Some(DiskChunk { chunk: Some(disk_chunk::Chunk::Start(start)) }) = first else {
            return Err(Status::invalid_argument("the first message of ReceiveDisk must be `start`"));
        };
        let source = StreamSource { stream, runtime: tokio::runtime::Handle::current() };
        let answer = self.engine.receive_disk(start, &client, Box::new(source))?;
        let result = answer.await.map_err(|_| Status::aborted("the receive job ended without an answer"))?;
        Ok(Response::new(result?))
    }

    async fn live_migration(
        &self,
        request: Request<LiveMigrationRequest>,
    ) -> Result<Response<LiveMigrationResponse>, Status> {
        let client = client_name(&request);
        if client == LOCAL_CLIENT {
            return Err(Status::permission_denied(
                "LiveMigration needs the sending agent's client certificate (mutual TLS)",
            ));
        }
        let answer = self.engine.live_migration(request.into_inner(), &client)?;
        match tokio::time::timeout(LIVE_ANSWER_TIMEOUT, answer).await {
            Err(_) => Err(Status::deadline_exceeded("the receive job did not answer within 60 s")),
            Ok(Err(_)) => Err(Status::aborted("the receive job ended without an answer")),
            Ok(Ok(Err(refusal))) => Err(Status::failed_precondition(refusal)),
            Ok(Ok(Ok(response))) => Ok(Response::new(response)),
        }
    }
}
