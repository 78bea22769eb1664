//! The job engine: validated submissions, one unfinished job per disk and per domain, an I/O concurrency
//! limit, cancellation at safe points, and a durable journal so that after a restart every job is still
//! listed and one that was running is `INTERRUPTED` with its target made safe.
//!
//! Jobs run on their own threads (the engine is blocking code). Each job's events go to an in-memory log
//! that watchers follow, and to the journal; byte progress is thinned to a few events per second, step
//! starts and ends and the final event always get through. Secrets in a request (passphrases, passwords)
//! live only in memory while the job is queued or running; the journal and every answer carry the request
//! without them.
//!
//! Each SubmitJob and CancelJob carries its coordinator's leader term. The engine keeps the highest term it
//! has taken a request from (durably, see `term`) and refuses requests from lower ones, so that a deposed
//! leader that still believes it leads cannot act on the node.

mod journal;
mod metrics;
mod migrate;
mod request;
mod run;
mod term;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::SigningKey;
use gridforge_common::progress::{Progress, ProgressEvent};
use gridforge_proto::v1::{
    Error as JobFailure, Job, JobEvent, JobKind, JobState, JobStep, ListJobsRequest, SubmitJobRequest,
    error::Code, job::Outcome,
};

use crate::block::{BlockError, BlockTarget, MIB, TargetOptions};
use crate::config::Config;
use crate::hypervisor::Hypervisor;
use crate::node::timestamp;
use crate::wipe::CancelToken;

use journal::Journal;
use metrics::Metrics;
pub use migrate::{DiskSource, ReceiveFailure, Receiving, SourceError, StreamDigest, TransferRefused};
use request::{Prepared, Work};
pub use request::{scrub_spec, validate_spec};

/// Byte-progress events per job are thinned to at most one per this interval.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How often finished jobs past their retention are purged while the agent runs.
const PURGE_INTERVAL: Duration = Duration::from_secs(300);
/// Events a watcher may have in flight before the forwarder waits for it.
const WATCH_BUFFER: usize = 256;

/// Engine failures (opening the journal, writing it; reading and writing the leader term file).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the job journal {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("job journal {path}: {what}")]
    Journal {
        path: PathBuf,
        what: String,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("job journal {path}: write failed: {message}")]
    Write { path: PathBuf, message: String },
    #[error("cannot read the leader term file {path}")]
    TermRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the leader term file {path} is corrupt: {found:?} is not one decimal number")]
    TermCorrupt { path: PathBuf, found: String },
    #[error("cannot write the leader term file {path}")]
    TermWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {what}")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A request from an older coordinator leader term than one this agent has taken requests from
/// (FAILED_PRECONDITION): its sender has been replaced by a newer leader and must not act.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused: this {request} comes from coordinator term {term}, but this agent has already taken requests \
     from term {highest} (a newer leader); the sender is no longer the leader"
)]
pub struct StaleTerm {
    /// What was refused: "job" or "cancel request".
    pub request: &'static str,
    pub term: u64,
    pub highest: u64,
}

/// Why a submission was refused. Each maps to one gRPC status (see `server`).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// A field is missing or wrong (INVALID_ARGUMENT).
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Another unfinished job holds the target or domain (FAILED_PRECONDITION).
    #[error("{what} is busy: job {job} ({state}) holds it")]
    Busy { what: String, job: String, state: String },
    /// The node cannot take this job as configured (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// A named volume, device or domain does not exist (NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// The hypervisor is not configured or unreachable (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A job kind this agent does not run (UNIMPLEMENTED).
    #[error("{0} jobs are not supported by this agent")]
    Unsupported(&'static str),
    /// The agent is stopping (UNAVAILABLE).
    #[error("the agent is shutting down and accepts no new jobs")]
    ShuttingDown,
    /// The sender is no longer the leader (FAILED_PRECONDITION).
    #[error(transparent)]
    StaleTerm(#[from] StaleTerm),
    #[error(transparent)]
    Journal(#[from] JobError),
}

#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error("job {id} has already finished ({})", state.as_str_name())]
    Finished { id: String, state: JobState },
    #[error(transparent)]
    StaleTerm(#[from] StaleTerm),
    /// Recording a newer leader term failed.
    #[error(transparent)]
    Journal(#[from] JobError),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("no job {0:?}")]
    NotFound(String),
    #[error(transparent)]
    Journal(#[from] JobError),
}

/// The job engine. Cheap to clone; all clones share one engine.
#[derive(Clone)]
pub struct JobEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for JobEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobEngine")
            .field("journal", &self.inner.config.journal_path())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    config: Config,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    journal: Journal,
    state: Mutex<State>,
    /// Signalled whenever a job finishes (shutdown waits on it).
    finished: Condvar,
    signing_key: Mutex<Option<Arc<SigningKey>>>,
    /// MigrateReceive jobs waiting for (or reading) their disk stream, by transfer id.
    transfers: migrate::Transfers,
}

#[derive(Default)]
struct State {
    jobs: HashMap<String, Entry>,
    /// Idempotency key -> job id.
    keys: HashMap<String, String>,
    /// Queued job ids, oldest first.
    queue: VecDeque<String>,
    running: HashSet<String>,
    running_io: usize,
    /// "target <path>" or "domain <name>" -> the unfinished job holding it.
    holders: HashMap<String, String>,
    stopping: bool,
    /// The highest coordinator leader term a request was taken from; as in the leader term file.
    leader_term: u64,
    metrics: Metrics,
    /// Job threads not yet joined.
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct Entry {
    job: Job,
    /// The event log while it is in memory (unfinished jobs and the moment after); else read from the journal.
    log: Option<Arc<EventLog>>,
    /// Sequence number of the job's next event.
    next_seq: u64,
    live: Option<Live>,
}

/// What only an unfinished job has.
struct Live {
    work: Option<Work>,
    cancel: CancelToken,
    cancelled_by_user: bool,
    io: bool,
    holds: Vec<String>,
    last_progress: Option<Instant>,
    started: Option<Instant>,
}

/// A job's events in order, and a signal for followers.
pub(crate) struct EventLog {
    events: Mutex<Vec<JobEvent>>,
    len: tokio::sync::watch::Sender<usize>,
}

impl EventLog {
    fn new(events: Vec<JobEvent>) -> Self {
        let len = events.len();
        Self { events: Mutex::new(events), len: tokio::sync::watch::Sender::new(len) }
    }

    fn push(&self, ev: JobEvent) {
        let mut events = lock(&self.events);
        events.push(ev);
        self.len.send_replace(events.len());
    }

    /// Events with seq >= `from`, and whether the log already holds the final event.
    fn since(&self, from: u64) -> (Vec<JobEvent>, bool) {
        let events = lock(&self.events);
        let done = events.last().is_some_and(|e| e.state != JobState::Unspecified as i32);
        (events.iter().filter(|e| e.seq >= from).cloned().collect(), done)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking job thread must not take the engine down with it: the state stays usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn is_final(state: JobState) -> bool {
    !matches!(state, JobState::Queued | JobState::Running | JobState::Unspecified)
}

/// Make an interrupted job's target safe and say what was done, for the job's final message. Provision, Wipe,
/// Delete and MigrateReceive targets hold nothing worth keeping half-done: their first MiB is zeroed (a
/// MigrateSend only reads its disk until the receiver verified it, and its wipe is a Delete's). A Resize's disk holds
/// the tenant's data, which an interrupted grow keeps; Control and Snapshot do not write to a disk.
fn secure_interrupted(kind: JobKind, target: &str) -> String {
    if target.is_empty() {
        return String::new();
    }
    match kind {
        JobKind::Provision | JobKind::Wipe | JobKind::Delete | JobKind::MigrateReceive => {
            match make_safe(Path::new(target)) {
                Ok(()) => "; the target's first MiB was zeroed".to_string(),
                Err(e) => {
                    tracing::error!(target, "cannot make the target safe: {e}");
                    format!("; zeroing the target's first MiB failed: {e}")
                }
            }
        }
        JobKind::Resize => {
            "; the disk keeps its data: check its last file system (e2fsck -f) and resubmit the resize"
                .to_string()
        }
        _ => String::new(),
    }
}

fn new_job_id() -> String {
    format!("j-{}", uuid::Uuid::new_v4().simple())
}

/// Zero the first MiB of an interrupted job's target, so nothing half-written on it can boot. A missing
/// target (a file that was never created, or was removed) is already safe. When a job thread of this process
/// still holds the target's lock, the head is overwritten without the lock.
fn make_safe(path: &Path) -> Result<(), String> {
    match BlockTarget::open(path, &TargetOptions::default()) {
        Ok(t) => t.zero_head().map_err(|e| e.to_string()),
        Err(BlockError::Missing(_)) => Ok(()),
        Err(BlockError::Busy(_)) => {
            use std::os::unix::fs::FileExt;
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let len = crate::block::ioctl::size_bytes(&file)
                .map(Some)
                .unwrap_or_else(|_| file.metadata().ok().map(|m| m.len()))
                .unwrap_or(MIB);
            let zeros = vec![0u8; MIB.min(len) as usize];
            file.write_all_at(&zeros, 0)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("zeroing the head of {}: {e}", path.display()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The jobs in `config`'s journal, read without opening the engine: beside a running agent, or while none
/// runs (`gridforge-agent diagnose`).
pub fn read_journal(config: &Config) -> Result<Vec<Job>, JobError> {
    journal::read_jobs_shared(&config.journal_path())
}

/// The highest leader term in `config`'s state directory (0 without a file), read without opening the engine.
pub fn read_leader_term(config: &Config) -> Result<u64, JobError> {
    term::read(&config.leader_term_path())
}

impl JobEngine {
    /// Open (create) the journal at `config.journal_path()`. Jobs found queued or running are recorded
    /// INTERRUPTED (a running one's target gets its first MiB zeroed); finished jobs past
    /// `jobs.retention_hours` are purged, now and periodically. A leader term file that cannot be read is an
    /// error: starting at term 0 would let a deposed coordinator act again.
    pub fn open(config: &Config, hypervisor: Option<Arc<dyn Hypervisor>>) -> Result<JobEngine, JobError> {
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|source| JobError::StateDir { path: config.state_dir.clone(), source })?;
        let leader_term = read_leader_term(config)?;
        let journal = Journal::open(&config.journal_path())?;
        let mut state = State { leader_term, ..State::default() };
        for mut job in journal.load_jobs()? {
            if !is_final(job.state()) {
                let was_running = job.state() == JobState::Running;
                let mut message = "the agent restarted while the job was ".to_string();
                message.push_str(if was_running { "running" } else { "queued" });
                if was_running {
                    message.push_str(&secure_interrupted(job.kind(), &job.target));
                }
                let step = job.steps.last().map(|s| s.name.clone()).unwrap_or_default();
                interrupt_steps(&mut job.steps);
                job.state = JobState::Interrupted as i32;
                job.finished = Some(timestamp(SystemTime::now()));
                job.outcome = Some(Outcome::Error(JobFailure {
                    code: Code::Interrupted as i32,
                    step: step.clone(),
                    message: message.clone(),
                }));
                let seq = journal.next_seq(&job.id)?;
                journal.put_event(&JobEvent {
                    job_id: job.id.clone(),
                    seq,
                    step,
                    message,
                    time: job.finished,
                    state: JobState::Interrupted as i32,
                    ..Default::default()
                });
                journal.put_job(&job);
                tracing::warn!(job = %job.id, "job interrupted by the agent's restart");
            }
            if !job.idempotency_key.is_empty() {
                state.keys.insert(job.idempotency_key.clone(), job.id.clone());
            }
            state.jobs.insert(job.id.clone(), Entry { job, log: None, next_seq: 0, live: None });
        }
        journal.flush()?;
        remove_temp_blobs(&config.images.snapshot_store);
        let inner = Arc::new(Inner {
            config: config.clone(),
            hypervisor,
            journal,
            state: Mutex::new(state),
            finished: Condvar::new(),
            signing_key: Mutex::new(None),
            transfers: migrate::Transfers::default(),
        });
        inner.purge_expired();
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("job-purge".into())
            .spawn(move || purge_loop(weak))
            .map_err(|source| JobError::Thread { what: "the job purge thread", source })?;
        Ok(JobEngine { inner })
    }

    /// Validate and queue a job. `client` names the caller (client certificate CN, or "local"): the default
    /// operator of wipe reports. The same idempotency key again returns the existing job unchanged. A job
    /// from an older leader term than the highest taken is refused before anything else; a newer term is
    /// recorded first.
    pub fn submit(&self, req: SubmitJobRequest, client: &str) -> Result<Job, SubmitError> {
        request::check_key(&req.idempotency_key)?;
        if let Some(job) = self.inner.job_for_key(&req)? {
            return Ok(job);
        }
        if lock(&self.inner.state).stopping {
            return Err(SubmitError::ShuttingDown);
        }
        let config = &self.inner.config;
        let checks = request::Checks {
            hypervisor: self.inner.hypervisor.as_deref(),
            devices: &config.jobs.devices,
            image_store_configured: !config.images.store.is_empty(),
            default_wipe_method: &config.jobs.default_wipe_method,
            snapshot_store: &config.images.snapshot_store,
            snapshot_signing_key: &config.images.snapshot_signing_key,
            mutual_tls: !config.tls.insecure,
            live_migration: config.libvirt.live_endpoint().is_some(),
            bases_dir: &config.images.bases_dir,
        };
        let prepared = request::prepare(&req, client, &checks)?;
        self.inner.enqueue(&req, prepared)
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        lock(&self.inner.state).jobs.get(id).map(|e| e.job.clone())
    }

    /// Jobs matching the request's filters, newest first.
    pub fn list(&self, req: &ListJobsRequest) -> Vec<Job> {
        let st = lock(&self.inner.state);
        let mut jobs: Vec<Job> = st
            .jobs
            .values()
            .map(|e| &e.job)
            .filter(|j| req.states.is_empty() || req.states.contains(&j.state))
            .filter(|j| req.kind == JobKind::Unspecified as i32 || req.kind == j.kind)
            .cloned()
            .collect();
        drop(st);
        let key = |j: &Job| j.created.map(|t| (t.seconds, t.nanos)).unwrap_or_default();
        jobs.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| b.id.cmp(&a.id)));
        if req.limit > 0 {
            jobs.truncate(req.limit as usize);
        }
        jobs
    }

    /// Cancel a queued job at once, or ask a running one to stop at its next safe point. A request from an
    /// older leader term than the highest taken is refused before anything else; a newer term is recorded
    /// first.
    pub fn cancel(&self, id: &str, leader_term: u64) -> Result<Job, CancelError> {
        let inner = &self.inner;
        let mut st = lock(&inner.state);
        inner.take_term::<CancelError>(&mut st, leader_term, CANCEL, id)?;
        let entry = st.jobs.get_mut(id).ok_or_else(|| CancelError::NotFound(id.to_string()))?;
        let state = entry.job.state();
        let Some(live) = entry.live.as_mut().filter(|_| !is_final(state)) else {
            return Err(CancelError::Finished { id: id.to_string(), state });
        };
        live.cancelled_by_user = true;
        live.cancel.cancel();
        if state == JobState::Queued {
            st.queue.retain(|q| q != id);
            let failure = JobFailure {
                code: Code::Cancelled as i32,
                step: String::new(),
                message: "cancelled before it started".into(),
            };
            let done = inner.conclude(&mut st, id, JobState::Cancelled, Outcome::Error(failure));
            drop(st);
            inner.after_conclude(id, done);
            return Ok(self.get(id).expect("job exists"));
        }
        let job = entry.job.clone();
        drop(st);
        inner.note(id, "", "cancel requested; stopping at the next safe point");
        Ok(job)
    }

    /// The job's events from `from_seq` (replayed), then live ones; the channel closes after the final event.
    pub fn watch(
        &self,
        id: &str,
        from_seq: u64,
    ) -> Result<tokio::sync::mpsc::Receiver<JobEvent>, WatchError> {
        let log = {
            let st = lock(&self.inner.state);
            let entry = st.jobs.get(id).ok_or_else(|| WatchError::NotFound(id.to_string()))?;
            entry.log.clone()
        };
        let log = match log {
            Some(log) => log,
            None => Arc::new(EventLog::new(self.inner.journal.events(id, from_seq)?)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let forward = async move {
            let mut changed = log.len.subscribe();
            let mut next = from_seq;
            loop {
                let (events, done) = log.since(next);
                for ev in events {
                    next = ev.seq + 1;
                    let last = ev.state != JobState::Unspecified as i32;
                    if tx.send(ev).await.is_err() || last {
                        return;
                    }
                }
                if done || changed.changed().await.is_err() {
                    return;
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(forward);
            }
            Err(_) => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(|source| JobError::Thread { what: "a watch runtime", source })?;
                std::thread::Builder::new()
                    .name(format!("watch-{id}"))
                    .spawn(move || rt.block_on(forward))
                    .map_err(|source| JobError::Thread { what: "a watch thread", source })?;
            }
        }
        Ok(rx)
    }

    /// Stop accepting and starting jobs, and wait up to `grace` for the running ones to end by themselves.
    /// Returns whether none runs any more; [`JobEngine::shutdown`] then settles the queued and running ones.
    pub fn drain(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut st = lock(&self.inner.state);
        st.stopping = true;
        while !st.running.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self.inner.finished.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Stop accepting jobs; queued jobs are recorded INTERRUPTED, running ones are cancelled at their next
    /// safe point and waited for up to `grace`; whatever still runs then is recorded INTERRUPTED with its
    /// target made safe.
    pub fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        let deadline = Instant::now() + grace;
        let mut st = lock(&inner.state);
        st.stopping = true;
        let queued: Vec<String> = st.queue.drain(..).collect();
        let mut concluded = Vec::new();
        for id in queued {
            let failure = JobFailure {
                code: Code::Interrupted as i32,
                step: String::new(),
                message: "the agent stopped before the job started".into(),
            };
            concluded.push((
                id.clone(),
                inner.conclude(&mut st, &id, JobState::Interrupted, Outcome::Error(failure)),
            ));
        }
        for id in &st.running.clone() {
            if let Some(live) = st.jobs.get(id).and_then(|e| e.live.as_ref()) {
                live.cancel.cancel();
            }
        }
        while !st.running.is_empty() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = inner.finished.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        let still_running = !st.running.is_empty();
        for id in st.running.clone() {
            let Some(entry) = st.jobs.get(&id) else { continue };
            let (kind, target) = (entry.job.kind(), entry.job.target.clone());
            let mut message = "the agent stopped while the job was running".to_string();
            message.push_str(&secure_interrupted(kind, &target));
            let step = entry.job.steps.last().map(|s| s.name.clone()).unwrap_or_default();
            let failure = JobFailure { code: Code::Interrupted as i32, step, message };
            concluded.push((
                id.clone(),
                inner.conclude(&mut st, &id, JobState::Interrupted, Outcome::Error(failure)),
            ));
        }
        // Threads of jobs that ended are joined, so that they no longer hold the engine (and its journal)
        // once the caller drops it; one still stuck in a blocking call is left behind.
        let threads: Vec<_> = std::mem::take(&mut st.threads);
        drop(st);
        for (id, done) in concluded {
            inner.after_conclude(&id, done);
        }
        for t in threads {
            if t.is_finished() || !still_running {
                let _ = t.join();
            }
        }
        if let Err(e) = inner.journal.flush() {
            tracing::error!("{e}");
        }
    }

    /// The highest coordinator leader term a SubmitJob or CancelJob was taken from (0: none yet).
    pub fn leader_term(&self) -> u64 {
        lock(&self.inner.state).leader_term
    }

    /// Prometheus text exposition of the engine's metrics.
    pub fn render_metrics(&self, out: &mut String) {
        let st = lock(&self.inner.state);
        let counts = st.jobs.values().map(|e| (e.job.kind(), e.job.state()));
        st.metrics.render(counts, out);
    }
}

/// A job that just reached its final state: its log may be dropped once the journal holds its events.
#[must_use]
struct Concluded(bool);

/// What a refusal names, in [`StaleTerm`].
const JOB: &str = "job";
const CANCEL: &str = "cancel request";

impl State {
    /// Refuse a request from an older leader term than the highest taken. `subject` (a key, a job id) is
    /// for the log.
    fn check_term(&self, term: u64, request: &'static str, subject: &str) -> Result<(), StaleTerm> {
        if term >= self.leader_term {
            return Ok(());
        }
        let refusal = StaleTerm { request, term, highest: self.leader_term };
        tracing::warn!(subject, term, highest = self.leader_term, "{refusal}");
        Err(refusal)
    }

    /// The job known by the request's idempotency key.
    fn keyed(&self, req: &SubmitJobRequest) -> Option<Job> {
        self.keys.get(&req.idempotency_key).and_then(|id| self.jobs.get(id)).map(|e| e.job.clone())
    }
}

impl Inner {
    /// [`State::check_term`]; a higher term is recorded durably before the request has any effect, under the
    /// state lock, so that no request of an older term is taken once a newer one was.
    fn take_term<E: From<StaleTerm> + From<JobError>>(
        &self,
        st: &mut State,
        term: u64,
        request: &'static str,
        subject: &str,
    ) -> Result<(), E> {
        st.check_term(term, request, subject)?;
        if term > st.leader_term {
            term::write(&self.config.leader_term_path(), term)?;
            tracing::info!(
                subject,
                term,
                previous = st.leader_term,
                "taking requests from a newer leader term"
            );
            st.leader_term = term;
        }
        Ok(())
    }

    /// Refuse a stale submission and record a newer term, then the job already submitted under its key.
    fn job_for_key(&self, req: &SubmitJobRequest) -> Result<Option<Job>, SubmitError> {
        let mut st = lock(&self.state);
        self.take_term::<SubmitError>(&mut st, req.leader_term, JOB, &req.idempotency_key)?;
        Ok(st.keyed(req))
    }

    fn enqueue(self: &Arc<Self>, req: &SubmitJobRequest, prepared: Prepared) -> Result<Job, SubmitError> {
        let mut st = lock(&self.state);
        // Checked again under the lock: a newer leader's request may have come in since.
        st.check_term(req.leader_term, JOB, &req.idempotency_key)?;
        // And the key: two submissions with one key may race.
        if let Some(job) = st.keyed(req) {
            return Ok(job);
        }
        if st.stopping {
            return Err(SubmitError::ShuttingDown);
        }
        let mut holds = Vec::new();
        if let Some(t) = &prepared.target {
            holds.push(format!("target {}", t.display()));
        }
        if let Some(d) = &prepared.domain {
            holds.push(format!("domain {d}"));
        }
        holds.extend(prepared.hold.clone());
        if let Some(id) = migrate::receive_transfer_id(req)
            && let Some(used) = st.jobs.values().find(|e| migrate::receive_transfer_id_of(&e.job) == Some(id))
        {
            return Err(SubmitError::Precondition(format!(
                "migrate_receive.transfer_id: {id} was already used by job {} ({}); transfer ids are one-time",
                used.job.id,
                used.job.state().as_str_name()
            )));
        }
        for h in &holds {
            if let Some(holder) = st.holders.get(h).and_then(|id| st.jobs.get(id)) {
                return Err(SubmitError::Busy {
                    what: h.clone(),
                    job: holder.job.id.clone(),
                    state: holder.job.state().as_str_name().to_string(),
                });
            }
        }
        let id = new_job_id();
        let now = SystemTime::now();
        let job = Job {
            id: id.clone(),
            idempotency_key: req.idempotency_key.clone(),
            kind: prepared.kind as i32,
            state: JobState::Queued as i32,
            created: Some(timestamp(now)),
            target: prepared.target.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            domain: prepared.domain.clone().unwrap_or_default(),
            request: Some(request::without_secrets(req)),
            ..Default::default()
        };
        for h in &holds {
            st.holders.insert(h.clone(), id.clone());
        }
        let io = prepared.is_io();
        st.keys.insert(req.idempotency_key.clone(), id.clone());
        st.jobs.insert(
            id.clone(),
            Entry {
                job: job.clone(),
                log: Some(Arc::new(EventLog::new(Vec::new()))),
                next_seq: 0,
                live: Some(Live {
                    work: Some(prepared.work),
                    cancel: CancelToken::new(),
                    cancelled_by_user: false,
                    io,
                    holds,
                    last_progress: None,
                    started: None,
                }),
            },
        );
        self.journal.put_job(&job);
        self.emit(&mut st, &id, "queue", (0, 0), "queued".into(), JobState::Unspecified);
        st.queue.push_back(id.clone());
        drop(st);
        if let Err(e) = self.journal.flush() {
            // Not durable: forget the job rather than run one that a restart would not know.
            let mut st = lock(&self.state);
            st.queue.retain(|q| *q != id);
            if let Some(entry) = st.jobs.remove(&id)
                && let Some(live) = entry.live
            {
                for h in live.holds {
                    st.holders.remove(&h);
                }
            }
            st.keys.remove(&req.idempotency_key);
            return Err(e.into());
        }
        tracing::info!(job = %id, kind = job.kind().as_str_name(), target = %job.target, domain = %job.domain, "job queued");
        let mut st = lock(&self.state);
        self.schedule(&mut st);
        Ok(st.jobs.get(&id).map(|e| e.job.clone()).unwrap_or(job))
    }

    /// Append an event to the job's log and the journal; `bytes` is (done, total) of the step.
    fn emit(
        &self,
        st: &mut State,
        id: &str,
        step: &str,
        (bytes_done, bytes_total): (u64, u64),
        message: String,
        state: JobState,
    ) {
        let Some(entry) = st.jobs.get_mut(id) else { return };
        let ev = JobEvent {
            job_id: id.to_string(),
            seq: entry.next_seq,
            step: step.to_string(),
            bytes_done,
            bytes_total,
            message,
            time: Some(timestamp(SystemTime::now())),
            state: state as i32,
        };
        entry.next_seq += 1;
        self.journal.put_event(&ev);
        if let Some(log) = &entry.log {
            log.push(ev);
        }
    }

    /// A message event in the job's current step.
    fn note(&self, id: &str, step: &str, message: &str) {
        let mut st = lock(&self.state);
        let step = match step {
            "" => {
                st.jobs.get(id).and_then(|e| e.job.steps.last()).map(|s| s.name.clone()).unwrap_or_default()
            }
            s => s.to_string(),
        };
        self.emit(&mut st, id, &step, (0, 0), message.to_string(), JobState::Unspecified);
    }

    /// Start queued jobs while I/O slots are free (Control jobs need none).
    fn schedule(self: &Arc<Self>, st: &mut State) {
        if st.stopping {
            return;
        }
        let max_io = self.config.jobs.max_io_jobs.max(1);
        let mut i = 0;
        while i < st.queue.len() {
            let id = st.queue[i].clone();
            let io = st.jobs.get(&id).and_then(|e| e.live.as_ref()).is_some_and(|l| l.io);
            if io && st.running_io >= max_io {
                i += 1;
                continue;
            }
            st.queue.remove(i);
            self.start(st, &id, io);
        }
    }

    fn start(self: &Arc<Self>, st: &mut State, id: &str, io: bool) {
        let Some(entry) = st.jobs.get_mut(id) else { return };
        let Some(live) = entry.live.as_mut() else { return };
        let Some(work) = live.work.take() else { return };
        let cancel = live.cancel.clone();
        live.started = Some(Instant::now());
        entry.job.state = JobState::Running as i32;
        entry.job.started = Some(timestamp(SystemTime::now()));
        self.journal.put_job(&entry.job);
        if io {
            st.running_io += 1;
        }
        st.running.insert(id.to_string());
        self.emit(st, id, "start", (0, 0), "running".into(), JobState::Unspecified);
        let inner = self.clone();
        let job_id = id.to_string();
        st.threads.retain(|t| !t.is_finished());
        let spawned = std::thread::Builder::new().name(format!("job-{id}")).spawn(move || {
            let progress = {
                let inner = Arc::downgrade(&inner);
                let id = job_id.clone();
                Progress::new(move |ev| {
                    if let Some(inner) = inner.upgrade() {
                        inner.on_progress(&id, ev);
                    }
                })
            };
            let ctx = run::JobContext { inner: &inner, id: &job_id, progress, cancel };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::run(&ctx, work)))
                .unwrap_or_else(|_| {
                    Err(run::Failure::new(Code::Internal, "the job panicked; see the agent's log"))
                });
            inner.finish(&job_id, result);
        });
        match spawned {
            Ok(handle) => st.threads.push(handle),
            Err(e) => {
                let failure = JobFailure {
                    code: Code::Internal as i32,
                    step: String::new(),
                    message: format!("cannot start a job thread: {e}"),
                };
                // The journal is flushed by the next job's end or by shutdown; the log stays in memory.
                let Concluded(_) = self.conclude(st, id, JobState::Failed, Outcome::Error(failure));
            }
        }
    }

    /// Turn a progress report into a step update and (thinned) events.
    fn on_progress(&self, id: &str, ev: &ProgressEvent) {
        let mut st = lock(&self.state);
        let Some(entry) = st.jobs.get_mut(id) else { return };
        if is_final(entry.job.state()) {
            return;
        }
        let steps = &mut entry.job.steps;
        let new_step = steps.last().is_none_or(|s| s.name != ev.step);
        if new_step {
            if let Some(last) = steps.last_mut()
                && last.state == JobState::Running as i32
            {
                last.state = JobState::Succeeded as i32;
            }
            steps.push(JobStep {
                name: ev.step.to_string(),
                state: JobState::Running as i32,
                ..Default::default()
            });
        }
        let is_bytes = ev.message.is_empty();
        if is_bytes && let Some(step) = steps.last_mut() {
            step.bytes_done = ev.bytes_done;
            step.bytes_total = ev.bytes_total;
        }
        let Some(live) = entry.live.as_mut() else { return };
        let now = Instant::now();
        let due = live.last_progress.is_none_or(|t| now.duration_since(t) >= PROGRESS_INTERVAL)
            || (ev.bytes_total > 0 && ev.bytes_done >= ev.bytes_total);
        if !is_bytes || new_step || due {
            if is_bytes {
                live.last_progress = Some(now);
            }
            if new_step || !is_bytes {
                self.journal.put_job(&entry.job);
            }
            self.emit(
                &mut st,
                id,
                ev.step,
                (ev.bytes_done, ev.bytes_total),
                ev.message.clone(),
                JobState::Unspecified,
            );
        }
    }

    /// A job thread ended.
    fn finish(self: &Arc<Self>, id: &str, result: Result<Outcome, run::Failure>) {
        let mut st = lock(&self.state);
        let Some(entry) = st.jobs.get(id) else { return };
        let Some(live) = entry.live.as_ref() else {
            // Already recorded INTERRUPTED by a shutdown that stopped waiting.
            return;
        };
        let (cancelled, by_user) = (live.cancel.is_cancelled(), live.cancelled_by_user);
        let current_step = entry.job.steps.last().map(|s| s.name.clone()).unwrap_or_default();
        let (state, outcome) = match result {
            Ok(outcome) => (JobState::Succeeded, outcome),
            Err(f) => {
                let mut failure = f.into_proto(&current_step);
                let state = if cancelled && !by_user && st.stopping {
                    failure.code = Code::Interrupted as i32;
                    failure.message =
                        format!("the agent stopped while the job was running: {}", failure.message);
                    JobState::Interrupted
                } else if cancelled {
                    failure.code = Code::Cancelled as i32;
                    JobState::Cancelled
                } else {
                    JobState::Failed
                };
                (state, Outcome::Error(failure))
            }
        };
        let done = self.conclude(&mut st, id, state, outcome);
        self.schedule(&mut st);
        drop(st);
        self.after_conclude(id, done);
    }

    /// Record a job's final state, release what it held, emit its final event. Call with the state locked,
    /// then [`Inner::after_conclude`] without it.
    fn conclude(&self, st: &mut State, id: &str, state: JobState, outcome: Outcome) -> Concluded {
        let Some(entry) = st.jobs.get_mut(id) else { return Concluded(false) };
        let Some(live) = entry.live.take() else { return Concluded(false) };
        let job = &mut entry.job;
        for step in &mut job.steps {
            if step.state == JobState::Running as i32 {
                step.state = state as i32;
            }
        }
        job.state = state as i32;
        let message = match &outcome {
            Outcome::Error(e) => e.message.clone(),
            _ => "succeeded".to_string(),
        };
        let step = match &outcome {
            Outcome::Error(e) if !e.step.is_empty() => e.step.clone(),
            _ => job.steps.last().map(|s| s.name.clone()).unwrap_or_default(),
        };
        job.outcome = Some(outcome);
        job.finished = Some(timestamp(SystemTime::now()));
        let kind = job.kind();
        let written: u64 = job
            .steps
            .iter()
            .filter(|s| metrics::WRITE_STEPS.contains(&s.name.as_str()))
            .map(|s| s.bytes_done)
            .sum();
        match state {
            JobState::Succeeded => tracing::info!(job = %id, "job succeeded"),
            _ => tracing::warn!(job = %id, state = state.as_str_name(), "job ended: {message}"),
        }
        self.journal.put_job(job);
        // The job's end is durable before any watcher hears of it: a client told "succeeded" must never
        // find the job running (or interrupted, after a crash) when it reads the journal or asks again.
        if let Err(e) = self.journal.flush() {
            tracing::error!(job = %id, "{}", gridforge_common::error_chain(&e));
        }
        if live.started.is_some() {
            st.running.remove(id);
            if live.io {
                st.running_io -= 1;
            }
        }
        for h in &live.holds {
            if st.holders.get(h).is_some_and(|holder| holder == id) {
                st.holders.remove(h);
            }
        }
        st.metrics.observe(kind, live.started.map(|t| t.elapsed()), written);
        self.emit(st, id, &step, (0, 0), message, state);
        self.finished.notify_all();
        Concluded(true)
    }

    /// After a job concluded: make its end durable, then let its events be read from the journal.
    fn after_conclude(&self, id: &str, done: Concluded) {
        if !done.0 {
            return;
        }
        match self.journal.flush() {
            Ok(()) => {
                if let Some(entry) = lock(&self.state).jobs.get_mut(id) {
                    entry.log = None;
                }
            }
            Err(e) => tracing::error!(job = %id, "{e}"),
        }
    }

    /// Forget finished jobs older than the retention time.
    fn purge_expired(&self) {
        let retention = Duration::from_secs(self.config.jobs.retention_hours.saturating_mul(3600));
        let Some(cutoff) = SystemTime::now().checked_sub(retention) else { return };
        let cutoff = timestamp(cutoff);
        let mut st = lock(&self.state);
        let expired: Vec<(String, String)> = st
            .jobs
            .values()
            .filter(|e| {
                e.live.is_none()
                    && e.job.finished.is_some_and(|f| (f.seconds, f.nanos) < (cutoff.seconds, cutoff.nanos))
            })
            .map(|e| (e.job.id.clone(), e.job.idempotency_key.clone()))
            .collect();
        for (id, key) in &expired {
            st.jobs.remove(id);
            if st.keys.get(key).is_some_and(|k| k == id) {
                st.keys.remove(key);
            }
        }
        drop(st);
        if !expired.is_empty() {
            tracing::info!(jobs = expired.len(), "purged finished jobs past their retention");
        }
        self.journal.purge(expired);
    }

    /// The wipe report signing key, created (with its .pub) on first use.
    fn signing_key(&self) -> Result<Arc<SigningKey>, crate::image::ImageError> {
        let mut cached = lock(&self.signing_key);
        if let Some(key) = cached.as_ref() {
            return Ok(key.clone());
        }
        let path = &self.config.jobs.report_signing_key;
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| crate::image::ImageError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
            }
            match crate::image::sign::keygen(path) {
                Ok(_) => tracing::info!(key = %path.display(), "created the wipe report signing key"),
                Err(crate::image::ImageError::KeyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let key = Arc::new(crate::image::sign::load_signing_key(path)?);
        *cached = Some(key.clone());
        Ok(key)
    }
}

/// Removes what snapshots killed mid-capture left in the snapshot store (their unfinished blobs). A store
/// that cannot be cleaned is logged, not fatal: captures still work, the files only take space.
fn remove_temp_blobs(snapshot_store: &Path) {
    if snapshot_store.as_os_str().is_empty() {
        return;
    }
    match crate::image::pack::remove_temp_blobs(snapshot_store) {
        Ok(removed) => {
            for path in removed {
                tracing::warn!(blob = %path.display(), "removed the unfinished blob of an interrupted snapshot");
            }
        }
        Err(e) => tracing::error!(
            store = %snapshot_store.display(),
            "cannot remove unfinished snapshot blobs: {}",
            gridforge_common::error_chain(&e)
        ),
    }
}

fn interrupt_steps(steps: &mut [JobStep]) {
    for s in steps {
        if s.state == JobState::Running as i32 {
            s.state = JobState::Interrupted as i32;
        }
    }
}

fn purge_loop(inner: Weak<Inner>) {
    loop {
        std::thread::sleep(PURGE_INTERVAL);
        match inner.upgrade() {
            Some(inner) => inner.purge_expired(),
            None => return,
        }
    }
}
