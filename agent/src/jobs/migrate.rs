//! Migration between two agents. Cold: a MigrateReceive job allocates the disk and waits for one ReceiveDisk
//! stream (the gRPC server hands it over with [`JobEngine::receive_disk`] once the caller's certificate name
//! and the transfer id check out); a MigrateSend job streams the allocated extents of a shut-off domain's
//! disk to it and, only once the receiver has verified its copy and defined the domain, removes the source
//! the way a Delete does.
//!
//! Both sides compute one digest over the stream ([`StreamDigest`]); the receiver compares it with the
//! sender's before it defines anything. A receive that does not end verified removes what it allocated (or
//! zeroes the first MiB of a device it was given) and defines nothing.
//!
//! Live: the MigrateReceive job allocates the volume and answers the source's LiveMigration handshake
//! ([`JobEngine::live_migration`]): PREPARE gives the destination's paths and libvirt endpoint, the source's
//! libvirtd then migrates the running domain peer to peer with a copy of its disk, and SUCCEEDED (checked
//! against the domain running here) or FAILED ends the job. Only after SUCCEEDED does the source remove its
//! copy; a receive that does not end with the domain running here removes what it allocated.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gridforge_common::client::ClientTls;
use gridforge_common::error_chain;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    DiskChunk, DiskExtent, DiskStreamEnd, DiskStreamStart, Job, LiveMigrationRequest, LiveMigrationResponse,
    MigrateReceiveResult, MigrateSendResult, ReceiveDiskResponse, SubmitJobRequest, disk_chunk, error::Code,
    live_migration_request::Phase, submit_job_request::Job as JobReq,
};
use sha2::{Digest, Sha256};

use super::request::{MigrateReceive, MigrateSend, Target};
use super::run::{Failure, JobContext, RawView, check_disk_idle, define_domain, delete_vm};
use super::{JobEngine, lock, make_safe};
use crate::block::data_extents;
use crate::hypervisor::{DomainFiles, DomainState, LivePlan, LiveProgress};

/// The migration modes results report: the domain is shut off for the whole transfer, or it runs on.
const MODE: &str = "cold";
const LIVE: &str = "live";
/// Bytes of disk data per stream message.
const CHUNK: usize = 1 << 20;
/// Stream messages the sender reads ahead of the network.
const SEND_AHEAD: usize = 4;
/// How often a waiting or receiving job looks at its cancel token and deadline.
const POLL: Duration = Duration::from_millis(250);

/// The running sha256 of a disk stream: for each extent message its big-endian u64 offset, big-endian u64
/// length and data, then the big-endian u64 disk size.
pub struct StreamDigest(Sha256);

impl StreamDigest {
    pub fn new() -> Self {
        StreamDigest(Sha256::new())
    }

    pub fn extent(&mut self, offset: u64, data: &[u8]) {
        self.0.update(offset.to_be_bytes());
        self.0.update((data.len() as u64).to_be_bytes());
        self.0.update(data);
    }

    /// The hex digest, after the disk size.
    pub fn finish(mut self, size_bytes: u64) -> String {
        self.0.update(size_bytes.to_be_bytes());
        hex::encode(self.0.finalize())
    }
}

impl Default for StreamDigest {
    fn default() -> Self {
        Self::new()
    }
}

/// The rest of a ReceiveDisk stream after its `start`, as the server reads it.
pub trait DiskSource: Send {
    /// The next message; `Ok(None)` when the stream ended.
    fn next(&mut self, wait: Duration) -> Result<Option<DiskChunk>, SourceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Nothing arrived within the wait; the stream is still open.
    #[error("nothing arrived yet")]
    Idle,
    /// The stream broke (the caller went away, the connection dropped).
    #[error("{0}")]
    Broken(String),
}

/// Why a receive ended without a verified disk, for the stream's answer.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveFailure {
    /// The stream broke the protocol (order, bounds, missing end) (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// The data does not match the sender's digest or counts (DATA_LOSS).
    #[error("{0}")]
    Mismatch(String),
    /// The job failed for another reason: timeout, cancel, I/O, defining the domain (ABORTED).
    #[error("{0}")]
    Failed(String),
}

/// Why a stream was not handed to a job.
#[derive(Debug, thiserror::Error)]
pub enum TransferRefused {
    /// No MigrateReceive job waits for this id (FAILED_PRECONDITION).
    #[error("no migrate-receive job on this agent waits for transfer {0:?}")]
    Unknown(String),
    /// The job already took a stream (FAILED_PRECONDITION).
    #[error("transfer {id:?} of job {job} already has its stream; a transfer takes one")]
    Used { id: String, job: String },
    /// The caller is not the job's sender (PERMISSION_DENIED).
    #[error("transfer {id:?} is for sender {expected:?}, not {client:?}")]
    WrongSender { id: String, expected: String, client: String },
    /// The sender's disk is not the size the job allocated (FAILED_PRECONDITION).
    #[error("transfer {id:?} expects a disk of {expected} bytes, the sender's has {got}")]
    WrongSize { id: String, expected: u64, got: u64 },
    /// A disk stream for a live transfer, or a live handshake for a cold one (FAILED_PRECONDITION).
    #[error("transfer {id:?} is a {mode} migration: it takes no {call}")]
    WrongMode { id: String, mode: &'static str, call: &'static str },
}

/// The answer a live handshake call waits for: the response, or why the job refused the call.
pub type LiveAnswer = tokio::sync::oneshot::Receiver<Result<LiveMigrationResponse, String>>;

/// A live handshake call handed to its job.
struct LiveCall {
    req: LiveMigrationRequest,
    reply: tokio::sync::oneshot::Sender<Result<LiveMigrationResponse, String>>,
}

/// What a registered receive waits for.
enum Waiting {
    /// Cold: the one disk stream, until taken.
    Stream(Option<mpsc::Sender<Incoming>>),
    /// Live: the source's handshake calls.
    Live(mpsc::Sender<LiveCall>),
}

/// The answer a stream's caller waits for: the verified disk, or why not.
pub type Receiving = tokio::sync::oneshot::Receiver<Result<ReceiveDiskResponse, ReceiveFailure>>;

/// A stream handed to its job.
struct Incoming {
    start: DiskStreamStart,
    source: Box<dyn DiskSource>,
    reply: tokio::sync::oneshot::Sender<Result<ReceiveDiskResponse, ReceiveFailure>>,
}

struct Slot {
    job: String,
    sender: String,
    size_bytes: u64,
    waiting: Waiting,
}

/// The receive jobs that wait for a stream, by transfer id.
#[derive(Default)]
pub(super) struct Transfers(Mutex<HashMap<String, Slot>>);

/// A registered transfer; unregistered when dropped.
struct Registration<'a> {
    transfers: &'a Transfers,
    id: String,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        lock(&self.transfers.0).remove(&self.id);
    }
}

/// The transfer id of a MigrateReceive request.
pub(super) fn receive_transfer_id(req: &SubmitJobRequest) -> Option<&str> {
    match &req.job {
        Some(JobReq::MigrateReceive(m)) => Some(&m.transfer_id),
        _ => None,
    }
}

pub(super) fn receive_transfer_id_of(job: &Job) -> Option<&str> {
    job.request.as_ref().and_then(receive_transfer_id)
}

impl Transfers {
    /// The slot of transfer `id` if `client` is its sender.
    fn slot<'a>(
        slots: &'a mut HashMap<String, Slot>,
        id: &str,
        client: &str,
    ) -> Result<&'a mut Slot, TransferRefused> {
        let slot = slots.get_mut(id).ok_or_else(|| TransferRefused::Unknown(id.to_string()))?;
        if slot.sender != client {
            return Err(TransferRefused::WrongSender {
                id: id.to_string(),
                expected: slot.sender.clone(),
                client: client.to_string(),
            });
        }
        Ok(slot)
    }

    fn register(
        &self,
        id: &str,
        ctx: &JobContext<'_>,
        sender: &str,
        size_bytes: u64,
        waiting: Waiting,
    ) -> Registration<'_> {
        lock(&self.0).insert(
            id.to_string(),
            Slot { job: ctx.id.to_string(), sender: sender.to_string(), size_bytes, waiting },
        );
        Registration { transfers: self, id: id.to_string() }
    }
}

impl JobEngine {
    /// Hand a live handshake call to the live MigrateReceive job waiting for `req.transfer_id`, if `client`
    /// is its sender; the job answers on the returned channel.
    pub fn live_migration(
        &self,
        req: LiveMigrationRequest,
        client: &str,
    ) -> Result<LiveAnswer, TransferRefused> {
        let id = req.transfer_id.clone();
        let mut transfers = lock(&self.inner.transfers.0);
        let slot = Transfers::slot(&mut transfers, &id, client)?;
        let Waiting::Live(calls) = &slot.waiting else {
            return Err(TransferRefused::WrongMode { id, mode: MODE, call: "LiveMigration calls" });
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        calls.send(LiveCall { req, reply }).map_err(|_| TransferRefused::Unknown(id.clone()))?;
        Ok(answer)
    }

    /// Hand a ReceiveDisk stream to the MigrateReceive job waiting for `start.transfer_id`, if `client` (the
    /// caller's certificate name) is that job's sender and no stream was handed over before. The job reads
    /// `source` and answers on the returned channel once the disk is verified and its domain defined.
    pub fn receive_disk(
        &self,
        start: DiskStreamStart,
        client: &str,
        source: Box<dyn DiskSource>,
    ) -> Result<Receiving, TransferRefused> {
        let id = start.transfer_id.clone();
        let mut transfers = lock(&self.inner.transfers.0);
        let slot = Transfers::slot(&mut transfers, &id, client)?;
        let Waiting::Stream(stream) = &mut slot.waiting else {
            return Err(TransferRefused::WrongMode { id, mode: LIVE, call: "disk stream" });
        };
        let Some(handoff) = stream.take() else {
            return Err(TransferRefused::Used { id, job: slot.job.clone() });
        };
        if start.size_bytes != slot.size_bytes {
            let expected = slot.size_bytes;
            *stream = Some(handoff);
            return Err(TransferRefused::WrongSize { id, expected, got: start.size_bytes });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = slot.job.clone();
        drop(transfers);
        handoff.send(Incoming { start, source, reply }).map_err(|_| TransferRefused::Unknown(id.clone()))?;
        tracing::info!(job = %job, transfer = %id, sender = client, "disk stream accepted");
        Ok(answer)
    }
}

/// What a receive allocated, to remove again when it fails.
enum Allocated {
    Volume(String),
    File,
    /// A device given to the job: its first MiB is zeroed instead.
    Device,
}

/// Run a MigrateReceive job.
pub(super) fn receive(ctx: &JobContext<'_>, m: &MigrateReceive) -> Result<MigrateReceiveResult, Failure> {
    let deadline = Instant::now() + m.timeout;
    let path = m.target.path();
    let allocated = allocate(ctx, m)?;
    let result = match &m.live {
        Some(name) => receive_live(ctx, m, name, deadline),
        None => receive_onto(ctx, m, deadline),
    };
    if let Err(failure) = &result {
        tracing::warn!(job = ctx.id, "migrate-receive failed; removing what it allocated: {failure:?}");
        if let Some(name) = &m.live {
            discard_live_domain(ctx, name);
        }
        discard(ctx, path, &allocated);
    }
    result
}

/// A live receive: answer the source's handshake (see the module documentation).
fn receive_live(
    ctx: &JobContext<'_>,
    m: &MigrateReceive,
    name: &str,
    deadline: Instant,
) -> Result<MigrateReceiveResult, Failure> {
    let hv = ctx.hypervisor()?;
    let endpoint = ctx.inner.config.libvirt.live_endpoint().ok_or_else(|| {
        Failure::at("wait", Code::Target, "this node takes no live migrations (libvirt.peer_uri is not set)")
    })?;
    let path = m.target.path();
    let (calls, waiting) = mpsc::channel();
    let _registration =
        ctx.inner.transfers.register(&m.transfer_id, ctx, &m.sender, m.size_bytes, Waiting::Live(calls));
    ctx.progress.note("wait", format!("waiting for live migration {} from {}", m.transfer_id, m.sender));
    let prepare = next_call(ctx, m, &waiting, deadline, "wait")?;
    if prepare.req.phase() != Phase::Prepare {
        let msg = format!("the source's first call is {:?}, not PREPARE", prepare.req.phase());
        let _ = prepare.reply.send(Err(msg.clone()));
        return Err(Failure::at("wait", Code::Io, msg));
    }
    if prepare.req.size_bytes != m.size_bytes {
        let msg = format!(
            "transfer {:?} expects a disk of {} bytes, the sender's has {}",
            m.transfer_id, m.size_bytes, prepare.req.size_bytes
        );
        let _ = prepare.reply.send(Err(msg.clone()));
        return Err(Failure::at("wait", Code::Target, msg));
    }
    let files = hv.domain_files(name);
    if let Err(failure) = write_nvram(&files, &prepare.req.nvram) {
        let _ = prepare.reply.send(Err(failure.message().to_string()));
        return Err(failure);
    }
    let text = |p: &Path| p.display().to_string();
    let _ = prepare.reply.send(Ok(LiveMigrationResponse {
        disk_path: text(path),
        nvram_path: if prepare.req.nvram.is_empty() { String::new() } else { text(&files.nvram) },
        console_path: text(&files.console),
        loader_path: text(&files.loader),
        libvirt_uri: endpoint.libvirt_uri.clone(),
        migration_uri: endpoint.migration_uri.clone(),
        ..Default::default()
    }));
    ctx.progress.note("migrate", format!("{} migrates {name} here live", m.sender));
    let end = next_call(ctx, m, &waiting, deadline, "migrate")?;
    let reply = end.reply;
    match end.req.phase() {
        Phase::Succeeded => {}
        Phase::Failed => {
            let _ = reply.send(Ok(LiveMigrationResponse::default()));
            return Err(Failure::at(
                "migrate",
                Code::Io,
                format!("the source {} reports the live migration failed: {}", m.sender, end.req.reason),
            ));
        }
        other => {
            let msg = format!("the source's second call is {other:?}, not SUCCEEDED or FAILED");
            let _ = reply.send(Err(msg.clone()));
            return Err(Failure::at("migrate", Code::Io, msg));
        }
    }
    let state = hv.state(name).map_err(|e| Failure::hypervisor("verify", e));
    if !matches!(state, Ok(Some(DomainState::Running))) {
        let msg = match state {
            Ok(Some(s)) => format!("domain {name} is {} here after the migration, not running", s.as_str()),
            Ok(None) => format!("domain {name} did not arrive here"),
            Err(f) => f.message().to_string(),
        };
        let _ = reply.send(Err(msg.clone()));
        return Err(Failure::at("verify", Code::Target, msg));
    }
    let downtime_ms = hv.migration_downtime_ms(name).ok().flatten().unwrap_or(0);
    let _ = reply.send(Ok(LiveMigrationResponse {
        downtime_ms,
        domain_state: DomainState::Running.as_str().to_string(),
        ..Default::default()
    }));
    ctx.progress.note("verify", format!("domain {name} runs here (downtime {downtime_ms} ms)"));
    Ok(MigrateReceiveResult {
        mode: LIVE.to_string(),
        sender: m.sender.clone(),
        disk_path: text(path),
        size_bytes: m.size_bytes,
        domain: name.to_string(),
        downtime_ms,
        ..Default::default()
    })
}

/// The next handshake call, or a failure at the job's cancel or deadline.
fn next_call(
    ctx: &JobContext<'_>,
    m: &MigrateReceive,
    waiting: &mpsc::Receiver<LiveCall>,
    deadline: Instant,
    step: &str,
) -> Result<LiveCall, Failure> {
    loop {
        match waiting.recv_timeout(POLL) {
            Ok(call) => return Ok(call),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure::at(step, Code::Internal, "the transfer was unregistered"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ctx.checkpoint(step)?;
                if Instant::now() >= deadline {
                    return Err(Failure::at(
                        step,
                        Code::Io,
                        format!(
                            "the live migration from {} did not finish within {} s",
                            m.sender,
                            m.timeout.as_secs()
                        ),
                    ));
                }
            }
        }
    }
}

/// The source's UEFI variable store, written where the arriving domain's definition points (and the
/// directory of its console log made).
fn write_nvram(files: &DomainFiles, nvram: &[u8]) -> Result<(), Failure> {
    let io = |what: &str, path: &Path, e: std::io::Error| {
        Failure::at("wait", Code::Io, format!("{what} {}: {e}", path.display()))
    };
    for path in [&files.console, &files.nvram] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", path, e))?;
        }
    }
    if nvram.is_empty() {
        return Ok(());
    }
    let io = |what: &str, e: std::io::Error| io(what, &files.nvram, e);
    let file = File::create(&files.nvram).map_err(|e| io("creating", e))?;
    file.write_all_at(nvram, 0).and_then(|()| file.sync_all()).map_err(|e| io("writing", e))
}

/// A failed live receive: a domain libvirt left here is powered off and undefined (with its NVRAM).
fn discard_live_domain(ctx: &JobContext<'_>, name: &str) {
    let Some(hv) = ctx.inner.hypervisor.as_deref() else { return };
    match hv.state(name) {
        Ok(Some(state)) => {
            if state != DomainState::Shutoff {
                let _ = hv.destroy(name);
            }
            if let Err(e) = hv.undefine(name) {
                tracing::error!(
                    job = ctx.id,
                    "cannot undefine the half-arrived domain {name}: {}",
                    error_chain(&e)
                );
            }
        }
        Ok(None) => {
            let nvram = hv.domain_files(name).nvram;
            if let Err(e) = std::fs::remove_file(&nvram)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::error!(job = ctx.id, "cannot remove {}: {e}", nvram.display());
            }
        }
        Err(e) => tracing::error!(job = ctx.id, "cannot look up domain {name}: {}", error_chain(&e)),
    }
}

fn allocate(ctx: &JobContext<'_>, m: &MigrateReceive) -> Result<Allocated, Failure> {
    let step = "allocate";
    let path = m.target.path();
    let io = |what: &str, e: std::io::Error| {
        Failure::at(step, Code::Io, format!("{what} {}: {e}", path.display()))
    };
    let allocated = match &m.target {
        Target::Volume { name, .. } => {
            let hv = ctx.hypervisor()?;
            ctx.progress.note(step, format!("creating volume {name} ({} bytes) in the pool", m.size_bytes));
            hv.create_volume(name, m.size_bytes).map_err(|e| Failure::hypervisor(step, e))?;
            Allocated::Volume(name.clone())
        }
        Target::Device(path) if !path.exists() => {
            ctx.progress
                .note(step, format!("creating sparse file {} ({} bytes)", path.display(), m.size_bytes));
            let file = File::create_new(path).map_err(|e| io("creating", e))?;
            file.set_len(m.size_bytes).map_err(|e| io("sizing", e))?;
            Allocated::File
        }
        Target::Device(_) => Allocated::Device,
    };
    // A pool volume's file is made by the hypervisor; a pool that only records volumes (libvirt's test
    // driver) leaves it to us.
    if let Allocated::Volume(_) = allocated {
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path);
        let grow = file
            .and_then(|f| if f.metadata()?.len() < m.size_bytes { f.set_len(m.size_bytes) } else { Ok(()) });
        if let Err(e) = grow {
            let failure = io("opening the new volume", e);
            discard(ctx, path, &allocated);
            return Err(failure);
        }
    }
    Ok(allocated)
}

/// Remove a failed receive's disk: a volume or file it created is deleted, a device has its head zeroed.
fn discard(ctx: &JobContext<'_>, path: &Path, allocated: &Allocated) {
    let removed = match allocated {
        Allocated::Volume(name) => match ctx.inner.hypervisor.as_deref() {
            Some(hv) => hv.delete_volume(name).map_err(|e| error_chain(&e)).and_then(|()| {
                // The file of a pool that only records volumes.
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
                    _ => Ok(()),
                }
            }),
            None => Err("no hypervisor".to_string()),
        },
        Allocated::File => std::fs::remove_file(path).map_err(|e| e.to_string()),
        Allocated::Device => make_safe(path),
    };
    if let Err(e) = removed {
        tracing::error!(job = ctx.id, disk = %path.display(), "cannot remove the failed receive's disk: {e}");
        if let Err(z) = make_safe(path) {
            tracing::error!(job = ctx.id, "cannot zero the head of {}: {z}", path.display());
        }
    }
}

fn receive_onto(
    ctx: &JobContext<'_>,
    m: &MigrateReceive,
    deadline: Instant,
) -> Result<MigrateReceiveResult, Failure> {
    let path = m.target.path();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Failure::at("allocate", Code::Io, format!("opening {}: {e}", path.display())))?;
    let (handoff, waiting) = mpsc::channel();
    let registration = ctx.inner.transfers.register(
        &m.transfer_id,
        ctx,
        &m.sender,
        m.size_bytes,
        Waiting::Stream(Some(handoff)),
    );
    ctx.progress.note("wait", format!("waiting for transfer {} from {}", m.transfer_id, m.sender));
    let incoming = loop {
        match waiting.recv_timeout(POLL) {
            Ok(incoming) => break incoming,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure::at("wait", Code::Internal, "the transfer was unregistered"));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ctx.checkpoint("wait")?;
                if Instant::now() >= deadline {
                    return Err(Failure::at(
                        "wait",
                        Code::Io,
                        format!("no stream from {} arrived within {} s", m.sender, m.timeout.as_secs()),
                    ));
                }
            }
        }
    };
    // A second stream finds the slot used until the job ends, and then no slot.
    let Incoming { start, mut source, reply } = incoming;
    let answer = |result: Result<ReceiveDiskResponse, ReceiveFailure>| {
        // The caller may be gone (its connection broke); the job's own outcome says what happened.
        let _ = reply.send(result);
    };
    let received = match read_stream(ctx, m, &file, &start, source.as_mut(), deadline) {
        Ok(r) => r,
        Err((failure, answer_text)) => {
            answer(Err(answer_text));
            return Err(failure);
        }
    };
    drop(source);
    let defined = m.domain.as_ref().map(|d| d.name.clone()).unwrap_or_default();
    if let Some(d) = &m.domain {
        let hv = ctx.hypervisor()?;
        if let Err(failure) = define_domain(ctx, d, path) {
            // A domain defined but not started as asked is undefined again: nothing half-done stays.
            if matches!(hv.state(&d.name), Ok(Some(_))) {
                let _ = hv.destroy(&d.name);
                if let Err(e) = hv.undefine(&d.name) {
                    tracing::error!(job = ctx.id, "cannot undefine {} again: {}", d.name, error_chain(&e));
                }
            }
            answer(Err(ReceiveFailure::Failed(format!("defining domain {}: {}", d.name, failure.message()))));
            return Err(failure);
        }
    }
    drop(registration);
    let response = ReceiveDiskResponse {
        sha256: received.sha256.clone(),
        bytes: received.bytes,
        disk_path: path.display().to_string(),
        domain: defined.clone(),
    };
    answer(Ok(response));
    ctx.progress.note("define", format!("disk verified ({}); receive done", received.sha256));
    Ok(MigrateReceiveResult {
        mode: MODE.to_string(),
        sender: m.sender.clone(),
        disk_path: path.display().to_string(),
        size_bytes: m.size_bytes,
        bytes_received: received.bytes,
        extents_received: received.extents,
        sha256: received.sha256,
        domain: defined,
        downtime_ms: 0,
    })
}

struct Received {
    bytes: u64,
    extents: u64,
    sha256: String,
}

type StreamError = (Failure, ReceiveFailure);

/// Write the stream's extents to `file` and check its end against what arrived; the disk is synced before
/// it counts as verified.
fn read_stream(
    ctx: &JobContext<'_>,
    m: &MigrateReceive,
    file: &File,
    start: &DiskStreamStart,
    source: &mut dyn DiskSource,
    deadline: Instant,
) -> Result<Received, StreamError> {
    let step = "receive";
    let invalid = |msg: String| (Failure::at(step, Code::Io, msg.clone()), ReceiveFailure::Invalid(msg));
    let failed =
        |code: Code, msg: String| (Failure::at(step, code, msg.clone()), ReceiveFailure::Failed(msg));
    let size = m.size_bytes;
    let total = start.data_bytes;
    let mut digest = StreamDigest::new();
    let (mut bytes, mut extents, mut next_free) = (0u64, 0u64, None::<u64>);
    ctx.progress.report(step, 0, total, "");
    let end = loop {
        if ctx.cancel.is_cancelled() {
            return Err(failed(Code::Cancelled, "cancelled while receiving the disk".into()));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(failed(
                Code::Io,
                format!("the stream from {} did not finish within {} s", m.sender, m.timeout.as_secs()),
            ));
        }
        let msg = match source.next((deadline - now).min(POLL)) {
            Ok(msg) => msg,
            Err(SourceError::Idle) => continue,
            Err(e @ SourceError::Broken(_)) => {
                return Err(failed(Code::Io, format!("the stream from {} broke: {e}", m.sender)));
            }
        };
        let Some(DiskChunk { chunk: Some(chunk) }) = msg else {
            match msg {
                None => {
                    return Err(invalid(format!(
                        "the stream from {} ended after {bytes} bytes without its end message",
                        m.sender
                    )));
                }
                Some(_) => return Err(invalid("an empty stream message".into())),
            }
        };
        match chunk {
            disk_chunk::Chunk::Extent(DiskExtent { offset, data }) => {
                let len = data.len() as u64;
                if len == 0 {
                    return Err(invalid(format!("an empty extent at offset {offset}")));
                }
                if next_free.is_some_and(|free| offset < free) {
                    return Err(invalid(format!(
                        "extent at offset {offset} overlaps or precedes the previous one (ends at {})",
                        next_free.unwrap_or_default()
                    )));
                }
                if offset.checked_add(len).is_none_or(|e| e > size) {
                    return Err(invalid(format!(
                        "extent of {len} bytes at offset {offset} lies beyond the disk's {size} bytes"
                    )));
                }
                file.write_all_at(&data, offset).map_err(|e| {
                    failed(Code::Io, format!("writing {} at offset {offset}: {e}", m.target.path().display()))
                })?;
                if next_free != Some(offset) {
                    extents += 1;
                }
                digest.extent(offset, &data);
                bytes += len;
                next_free = Some(offset + len);
                ctx.progress.report(step, bytes, total.max(bytes), "");
            }
            disk_chunk::Chunk::End(end) => break end,
            disk_chunk::Chunk::Start(_) => return Err(invalid("a second start message".into())),
        }
    };
    let sha256 = digest.finish(size);
    ctx.progress.note("verify", "comparing the stream's digest with the sender's");
    let mismatch = |msg: String| {
        (Failure::at("verify", Code::DigestMismatch, msg.clone()), ReceiveFailure::Mismatch(msg))
    };
    if end.sha256 != sha256 {
        return Err(mismatch(format!(
            "digest mismatch: the sender sent {:?}, the data received hashes to {sha256}",
            end.sha256
        )));
    }
    if end.bytes != bytes || end.extents != extents {
        return Err(mismatch(format!(
            "the sender sent {} bytes in {} extents, {bytes} bytes in {extents} extents arrived",
            end.bytes, end.extents
        )));
    }
    file.sync_all().map_err(|e| {
        let msg = format!("syncing {}: {e}", m.target.path().display());
        (Failure::at("verify", Code::Io, msg.clone()), ReceiveFailure::Failed(msg))
    })?;
    Ok(Received { bytes, extents, sha256 })
}

/// Size in bytes of a file or block device.
fn disk_size(file: &File) -> std::io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(std::io::SeekFrom::End(0))
}

/// Ok when the source's domain is in `wanted`; else the failure says its state and `why`.
fn require_state(
    hv: &dyn crate::hypervisor::Hypervisor,
    domain: &str,
    wanted: DomainState,
    why: &str,
) -> Result<(), Failure> {
    let step = "check";
    match hv.state(domain).map_err(|e| Failure::hypervisor(step, e))? {
        Some(state) if state == wanted => Ok(()),
        None => Err(Failure::at(step, Code::NotFound, format!("no domain {domain:?} on this agent"))),
        Some(state) => {
            Err(Failure::at(step, Code::Target, format!("domain {domain} is {}; {why}", state.as_str())))
        }
    }
}

/// Run a MigrateSend job.
pub(super) fn send(ctx: &JobContext<'_>, m: &MigrateSend) -> Result<MigrateSendResult, Failure> {
    if m.live {
        return send_live(ctx, m);
    }
    let hv = ctx.hypervisor()?;
    let step = "check";
    let path = m.target.path();
    require_state(hv, &m.domain, DomainState::Shutoff, "a cold migration needs it shut off (stop it first)")?;
    check_disk_idle(ctx, path)?;
    // An overlay's guest view is sent: the receiver gets a raw disk of its own, needing no base there.
    let view = RawView::open(ctx, step, path, false)?;
    let io = |what: String, e: std::io::Error| Failure::at(step, Code::Io, format!("{what}: {e}"));
    let file = File::open(view.path()).map_err(|e| io(format!("opening {}", view.path().display()), e))?;
    let size = disk_size(&file).map_err(|e| io(format!("reading the size of {}", path.display()), e))?;
    let extents = data_extents(&file, size)
        .map_err(|e| io(format!("finding the data extents of {}", path.display()), e))?;
    let data_bytes: u64 = extents.iter().map(|(_, len)| len).sum();
    ctx.progress
        .note(step, format!("{} of {} bytes allocated in {} extents", data_bytes, size, extents.len()));
    ctx.checkpoint("send")?;

    let sent = stream_disk(ctx, m, || offer_disk(ctx, m, &file, size, &extents, data_bytes))?;
    drop(file);
    view.close("send")?;

    // The receiver holds a verified copy and its domain: only now is the source removed.
    let done = format!("the receiver {} verified its copy ({})", m.receiver, sent.sha256);
    ctx.progress.note("send", done.clone());
    match hv.state(&m.domain).map_err(|e| Failure::hypervisor("undefine", e).after(&done))? {
        Some(DomainState::Shutoff) | None => {}
        Some(state) => {
            return Err(Failure::at(
                "undefine",
                Code::Target,
                format!(
                    "domain {} was started during the transfer ({}); it and its disk are kept here, so the VM now \
                     exists on both nodes: resolve by hand",
                    m.domain,
                    state.as_str()
                ),
            )
            .after(&done));
        }
    }
    let wipe = delete_vm(ctx, &m.domain, &m.target, &m.method, &m.operator).map_err(|f| f.after(&done))?;
    Ok(MigrateSendResult {
        mode: MODE.to_string(),
        receiver: m.receiver.clone(),
        size_bytes: size,
        bytes_sent: data_bytes,
        extents_sent: extents.len() as u64,
        sha256: sent.sha256,
        wipe: Some(wipe),
        downtime_ms: 0,
    })
}

struct Sent {
    sha256: String,
}

/// A runtime and a client connected to the receiver as this agent (mutual TLS; the receiver's certificate
/// is checked against the address's host, then its CN against `m.receiver`).
fn peer_client(
    ctx: &JobContext<'_>,
    m: &MigrateSend,
    step: &str,
) -> Result<(tokio::runtime::Runtime, AgentClient<tonic::transport::Channel>), Failure> {
    let tls_files = &ctx.inner.config.tls;
    let tls = ClientTls {
        ca: tls_files.ca.clone(),
        cert: tls_files.cert.clone(),
        key: tls_files.key.clone(),
        domain: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("send-{}", ctx.id))
        .enable_all()
        .build()
        .map_err(|e| Failure::at(step, Code::Internal, format!("cannot start the stream's runtime: {e}")))?;
    let client = runtime
        .block_on(gridforge_common::client::connect_peer(&m.receiver_address, &tls, &m.receiver))
        .map_err(|e| {
            Failure::at(
                step,
                Code::Io,
                format!(
                    "connecting to the receiver {} at {}: {}",
                    m.receiver,
                    m.receiver_address,
                    error_chain(&e)
                ),
            )
        })?;
    Ok((runtime, client))
}

/// Run a live MigrateSend job (see the module documentation).
fn send_live(ctx: &JobContext<'_>, m: &MigrateSend) -> Result<MigrateSendResult, Failure> {
    let hv = ctx.hypervisor()?;
    let step = "check";
    require_state(hv, &m.domain, DomainState::Running, "a live migration needs it running")?;
    let path = m.target.path();
    if let Some(base) = super::run::overlay_base(ctx, step, path)? {
        return Err(Failure::at(
            step,
            Code::InvalidSpec,
            format!(
                "the disk {} is a qcow2 overlay on base {} of this node, and a live migration copies raw disks \
                 only: migrate it cold (stopped), which sends its raw guest view",
                path.display(),
                base.display()
            ),
        ));
    }
    let io = |what: String, e: std::io::Error| Failure::at(step, Code::Io, format!("{what}: {e}"));
    let size = File::open(path)
        .and_then(|f| disk_size(&f))
        .map_err(|e| io(format!("reading the size of {}", path.display()), e))?;
    let ours = hv.domain_files(&m.domain);
    let nvram = match std::fs::read(&ours.nvram) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(format!("reading {}", ours.nvram.display()), e)),
    };
    let (runtime, mut client) = peer_client(ctx, m, "prepare")?;
    let call = |client: &mut AgentClient<tonic::transport::Channel>, phase: Phase, reason: String| {
        let req = LiveMigrationRequest {
            transfer_id: m.transfer_id.clone(),
            phase: phase as i32,
            size_bytes: size,
            nvram: if phase == Phase::Prepare { nvram.clone() } else { Vec::new() },
            reason,
        };
        runtime.block_on(client.live_migration(req)).map(tonic::Response::into_inner)
    };
    let refused = |what: &str, status: tonic::Status| {
        format!("the receiver {} refused {what} ({:?}): {}", m.receiver, status.code(), status.message())
    };
    let there = call(&mut client, Phase::Prepare, String::new())
        .map_err(|s| Failure::at("prepare", Code::Io, refused("the live migration", s)))?;
    let plan = LivePlan {
        libvirt_uri: there.libvirt_uri.clone(),
        migration_uri: there.migration_uri.clone(),
        disk: there.disk_path.clone().into(),
        files: DomainFiles {
            nvram: if there.nvram_path.is_empty() {
                ours.nvram.clone()
            } else {
                there.nvram_path.clone().into()
            },
            console: there.console_path.clone().into(),
            loader: there.loader_path.clone().into(),
            emulator: ours.emulator.clone(),
        },
    };
    ctx.progress
        .note("migrate", format!("migrating {} live to {} ({})", m.domain, m.receiver, plan.libvirt_uri));
    let mut moved = 0u64;
    let migrated = hv.migrate_live(&m.domain, &plan, &mut |p: LiveProgress| {
        moved = moved.max(p.processed);
        ctx.progress.report("migrate", p.processed, p.total.max(p.processed), "");
        !ctx.cancel.is_cancelled()
    });
    if let Err(e) = migrated {
        let failure = if ctx.cancel.is_cancelled() {
            Failure::at("migrate", Code::Cancelled, "cancelled during the live migration")
        } else {
            Failure::hypervisor("migrate", e)
        };
        let _ = call(&mut client, Phase::Failed, failure.message().to_string());
        let left = format!("the VM keeps running on this node and {} discards its copy", m.receiver);
        return Err(failure.then(&left));
    }
    let done = match call(&mut client, Phase::Succeeded, String::new()) {
        Ok(done) => done,
        Err(status) => {
            // The receiver does not hold the VM: it runs here again from the disk this node kept.
            let restarted = match hv.start(&m.domain) {
                Ok(()) => "started again on this node".to_string(),
                Err(e) => format!("could not be started again on this node: {}", error_chain(&e)),
            };
            return Err(Failure::at(
                "verify",
                Code::Io,
                format!("{}; the VM {restarted}, its disk kept", refused("the migrated domain", status)),
            ));
        }
    };
    drop(client);
    runtime.shutdown_background();
    let done_text = format!(
        "{} runs the domain (downtime {} ms); removing this node's copy",
        m.receiver, done.downtime_ms
    );
    ctx.progress.note("migrate", done_text.clone());
    let wipe =
        delete_vm(ctx, &m.domain, &m.target, &m.method, &m.operator).map_err(|f| f.after(&done_text))?;
    Ok(MigrateSendResult {
        mode: LIVE.to_string(),
        receiver: m.receiver.clone(),
        size_bytes: size,
        bytes_sent: moved,
        extents_sent: 0,
        sha256: String::new(),
        wipe: Some(wipe),
        downtime_ms: done.downtime_ms,
    })
}

/// How long a sender keeps offering its stream to a receiver whose job does not take the transfer yet (it is
/// submitted just before the send, and may still be allocating its disk).
const RECEIVER_READY_WAIT: Duration = Duration::from_secs(10);
const RECEIVER_READY_POLL: Duration = Duration::from_millis(250);

/// Make `offer` ([`offer_disk`]) until the receiver takes it: Ok once the receiver answered that it verified
/// the disk. A receiver that answers that no job waits for the transfer is offered the stream again until
/// [`RECEIVER_READY_WAIT`].
fn stream_disk(
    ctx: &JobContext<'_>,
    m: &MigrateSend,
    mut offer: impl FnMut() -> Result<Sent, Offer>,
) -> Result<Sent, Failure> {
    let deadline = Instant::now() + RECEIVER_READY_WAIT;
    loop {
        match offer() {
            Err(Offer::NotYet(status)) if Instant::now() < deadline => {
                ctx.progress.note(
                    "send",
                    format!("{} has not taken the transfer yet: {}", m.receiver, status.message()),
                );
                std::thread::sleep(RECEIVER_READY_POLL);
            }
            Err(Offer::NotYet(status)) => return Err(refused(m, &status)),
            Err(Offer::Failed(f)) => return Err(f),
            Ok(sent) => return Ok(sent),
        }
    }
}

/// Why one offer of the stream did not end verified.
enum Offer {
    /// The receiver has no job waiting for the transfer (yet).
    NotYet(tonic::Status),
    Failed(Failure),
}

impl From<Failure> for Offer {
    fn from(f: Failure) -> Offer {
        Offer::Failed(f)
    }
}

fn refused(m: &MigrateSend, status: &tonic::Status) -> Failure {
    Failure::at(
        "send",
        Code::Io,
        format!(
            "the receiver {} refused the disk ({:?}): {}; the source on this node is kept",
            m.receiver,
            status.code(),
            status.message()
        ),
    )
}

/// Connect to the receiver as this agent (mutual TLS, the receiver's certificate CN checked) and stream the
/// extents once.
fn offer_disk(
    ctx: &JobContext<'_>,
    m: &MigrateSend,
    file: &File,
    size: u64,
    extents: &[(u64, u64)],
    data_bytes: u64,
) -> Result<Sent, Offer> {
    let step = "send";
    let (runtime, mut client) = peer_client(ctx, m, step)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<DiskChunk>(SEND_AHEAD);
    let call = runtime
        .spawn(async move { client.receive_disk(tokio_stream::wrappers::ReceiverStream::new(rx)).await });
    let start = DiskStreamStart { transfer_id: m.transfer_id.clone(), size_bytes: size, data_bytes };
    let fed = feed(ctx, file, size, extents, data_bytes, start, &tx);
    // Dropping the sender ends the stream: after `end` the receiver verifies; without it (a read error or a
    // cancel) the receiver discards what it got.
    drop(tx);
    let answer = runtime.block_on(call);
    runtime.shutdown_background();
    let answer = answer
        .map_err(|e| Failure::at(step, Code::Internal, format!("the stream task failed: {e}")))?
        .map(tonic::Response::into_inner);
    let sha256 = match (fed, answer) {
        // Our own failure comes first: the receiver's answer to a cut stream only repeats it.
        (Err(f), _) => {
            return Err(Offer::Failed(
                f.after(&format!("the source on this node is kept; {} discards its copy", m.receiver)),
            ));
        }
        (Ok(_), Err(status))
            if status.code() == tonic::Code::FailedPrecondition
                && status.message().starts_with("no migrate-receive job") =>
        {
            return Err(Offer::NotYet(status));
        }
        (Ok(_), Err(status)) => return Err(refused(m, &status).into()),
        (Ok(ours), Ok(theirs)) => {
            if theirs.sha256 != ours {
                return Err(Offer::Failed(Failure::at(
                    step,
                    Code::DigestMismatch,
                    format!(
                        "the receiver reports digest {}, ours is {ours}; the source is kept",
                        theirs.sha256
                    ),
                )));
            }
            ours
        }
    };
    Ok(Sent { sha256 })
}

/// Read the extents and push the stream's messages; the digest on success. Stops early when the call ended
/// (the receiver refused or broke off): the call's answer says why.
fn feed(
    ctx: &JobContext<'_>,
    file: &File,
    size: u64,
    extents: &[(u64, u64)],
    data_bytes: u64,
    start: DiskStreamStart,
    tx: &tokio::sync::mpsc::Sender<DiskChunk>,
) -> Result<String, Failure> {
    let step = "send";
    let push = |chunk: disk_chunk::Chunk| tx.blocking_send(DiskChunk { chunk: Some(chunk) }).is_ok();
    if !push(disk_chunk::Chunk::Start(start)) {
        return Ok(String::new());
    }
    let mut digest = StreamDigest::new();
    let mut sent = 0u64;
    ctx.progress.report(step, 0, data_bytes, "");
    for &(offset, len) in extents {
        let mut pos = offset;
        while pos < offset + len {
            ctx.checkpoint(step)?;
            let n = CHUNK.min((offset + len - pos) as usize);
            let mut data = vec![0u8; n];
            file.read_exact_at(&mut data, pos)
                .map_err(|e| Failure::at(step, Code::Io, format!("reading the disk at offset {pos}: {e}")))?;
            digest.extent(pos, &data);
            if !push(disk_chunk::Chunk::Extent(DiskExtent { offset: pos, data })) {
                return Ok(String::new());
            }
            pos += n as u64;
            sent += n as u64;
            ctx.progress.report(step, sent, data_bytes, "");
        }
    }
    let sha256 = digest.finish(size);
    let end = DiskStreamEnd { sha256: sha256.clone(), extents: extents.len() as u64, bytes: sent };
    push(disk_chunk::Chunk::End(end));
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_covers_offsets_lengths_data_and_size() {
        let digest = |extents: &[(u64, &[u8])], size| {
            let mut d = StreamDigest::new();
            for (offset, data) in extents {
                d.extent(*offset, data);
            }
            d.finish(size)
        };
        let base = digest(&[(0, b"ab"), (4096, b"c")], 8192);
        assert_eq!(base.len(), 64);
        assert_ne!(base, digest(&[(0, b"ab"), (8192, b"c")], 8192), "offsets count");
        assert_ne!(base, digest(&[(0, b"abc")], 8192), "extent boundaries count");
        assert_ne!(base, digest(&[(0, b"ab"), (4096, b"c")], 16384), "the size counts");
        assert_eq!(base, digest(&[(0, b"ab"), (4096, b"c")], 8192));
    }
}
