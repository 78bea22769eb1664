//! The durable job journal (redb): job records, the idempotency index and job events.
//!
//! Writes go through one writer thread that commits whatever has queued up in a single transaction, so a
//! burst of submissions or progress events costs one fsync, not one each. Callers that need a write to be
//! durable before they answer (a submission, a job's end) wait for [`Journal::flush`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use gridforge_proto::v1::{Job, JobEvent};
use prost::Message;
use redb::{Builder, ConcurrencyMode, Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::JobError;

/// Job id -> encoded `Job` (its request already stripped of secrets).
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Idempotency key -> job id.
const IDEMPOTENCY: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// (job id, seq) -> encoded `JobEvent`.
const EVENTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("events");

/// One writer (the agent) while other processes (`gridforge-agent diagnose`) may read the journal at the same
/// time; every handle must open it in this mode.
const SHARING: ConcurrencyMode = ConcurrencyMode::SingleWriter;

/// Writes batched into one transaction at most.
const MAX_BATCH: usize = 4096;

enum Op {
    Job(Box<Job>),
    Event(JobEvent),
    /// Forget these jobs: (id, idempotency key).
    Purge(Vec<(String, String)>),
    Flush(SyncSender<Result<(), String>>),
}

pub(crate) struct Journal {
    path: PathBuf,
    db: Arc<Database>,
    tx: Option<Sender<Op>>,
    writer: Option<JoinHandle<()>>,
}

fn journal_err(path: &Path, what: &str) -> impl FnOnce(redb::Error) -> JobError {
    let (path, what) = (path.to_path_buf(), what.to_string());
    move |source| JobError::Journal { path, what, source: Box::new(source) }
}

impl Journal {
    pub(crate) fn open(path: &Path) -> Result<Journal, JobError> {
        let db = Builder::new()
            .set_concurrency_mode(SHARING)
            .create(path)
            .map_err(|source| JobError::Open { path: path.to_path_buf(), source: Box::new(source) })?;
        // Create the tables, so that read transactions find them even in a new journal.
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(JOBS)?;
            txn.open_table(IDEMPOTENCY)?;
            txn.open_table(EVENTS)?;
            txn.commit()?;
            Ok(())
        };
        init().map_err(journal_err(path, "creating tables"))?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("job-journal".into())
            .spawn(move || write_loop(&writer_db, rx))
            .map_err(|source| JobError::Thread { what: "the journal writer", source })?;
        Ok(Journal { path: path.to_path_buf(), db, tx: Some(tx), writer: Some(writer) })
    }

    /// Every job record, in no particular order.
    pub(crate) fn load_jobs(&self) -> Result<Vec<Job>, JobError> {
        read_jobs(&*self.db, &self.path)
    }

    /// The job's journaled events from `from_seq` on.
    pub(crate) fn events(&self, id: &str, from_seq: u64) -> Result<Vec<JobEvent>, JobError> {
        let read = || -> Result<Vec<JobEvent>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let mut events = Vec::new();
            for row in table.range((id, from_seq)..=(id, u64::MAX))? {
                let (_, bytes) = row?;
                match JobEvent::decode(bytes.value()) {
                    Ok(ev) => events.push(ev),
                    Err(e) => tracing::error!(job = id, "skipping corrupt job event: {e}"),
                }
            }
            Ok(events)
        };
        read().map_err(journal_err(&self.path, "reading events"))
    }

    /// The sequence number the job's next event gets.
    pub(crate) fn next_seq(&self, id: &str) -> Result<u64, JobError> {
        let read = || -> Result<u64, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(EVENTS)?;
            let last = table.range((id, 0)..=(id, u64::MAX))?.next_back().transpose()?;
            Ok(last.map_or(0, |(k, _)| k.value().1 + 1))
        };
        read().map_err(journal_err(&self.path, "reading events"))
    }

    fn send(&self, op: Op) {
        if let Some(tx) = &self.tx
            && tx.send(op).is_err()
        {
            tracing::error!(journal = %self.path.display(), "the journal writer has stopped; a write was lost");
        }
    }

    /// Record (or replace) a job and its idempotency key.
    pub(crate) fn put_job(&self, job: &Job) {
        self.send(Op::Job(Box::new(job.clone())));
    }

    pub(crate) fn put_event(&self, event: &JobEvent) {
        self.send(Op::Event(event.clone()));
    }

    pub(crate) fn purge(&self, jobs: Vec<(String, String)>) {
        if !jobs.is_empty() {
            self.send(Op::Purge(jobs));
        }
    }

    /// Wait until everything written so far is committed.
    pub(crate) fn flush(&self) -> Result<(), JobError> {
        let (ack, done) = mpsc::sync_channel(1);
        self.send(Op::Flush(ack));
        match done.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(JobError::Write { path: self.path.clone(), message }),
            Err(_) => Err(JobError::Write {
                path: self.path.clone(),
                message: "the journal writer has stopped".into(),
            }),
        }
    }
}

/// Every job record of the journal at `path`, opened read-only beside the agent that may be writing it.
pub(crate) fn read_jobs_shared(path: &Path) -> Result<Vec<Job>, JobError> {
    let db = Builder::new()
        .set_concurrency_mode(SHARING)
        .open_read_only(path)
        .map_err(|source| JobError::Open { path: path.to_path_buf(), source: Box::new(source) })?;
    read_jobs(&db, path)
}

fn read_jobs(db: &impl ReadableDatabase, path: &Path) -> Result<Vec<Job>, JobError> {
    let read = || -> Result<Vec<Result<Job, String>>, redb::Error> {
        let txn = db.begin_read()?;
        let table = txn.open_table(JOBS)?;
        let mut jobs = Vec::new();
        for row in table.iter()? {
            let (id, bytes) = row?;
            jobs.push(Job::decode(bytes.value()).map_err(|e| format!("job {}: {e}", id.value())));
        }
        Ok(jobs)
    };
    let rows = read().map_err(journal_err(path, "reading jobs"))?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        match row {
            Ok(job) => jobs.push(job),
            // One damaged record must not keep the agent from starting: skip it loudly.
            Err(e) => tracing::error!(journal = %path.display(), "skipping corrupt job record: {e}"),
        }
    }
    Ok(jobs)
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it has committed what is queued; joining it closes the
        // database before the journal is gone, so the file can be opened again at once.
        self.tx.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_loop(db: &Database, rx: Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = apply(db, &batch).map_err(|e| e.to_string());
        if let Err(e) = &result {
            tracing::error!("job journal write failed: {e}");
        }
        for op in batch {
            if let Op::Flush(ack) = op {
                let _ = ack.send(result.clone());
            }
        }
    }
}

fn apply(db: &Database, batch: &[Op]) -> Result<(), redb::Error> {
    if batch.iter().all(|op| matches!(op, Op::Flush(_))) {
        return Ok(());
    }
    let txn = db.begin_write()?;
    {
        let mut jobs = txn.open_table(JOBS)?;
        let mut keys = txn.open_table(IDEMPOTENCY)?;
        let mut events = txn.open_table(EVENTS)?;
        for op in batch {
            match op {
                Op::Job(job) => {
                    jobs.insert(job.id.as_str(), job.encode_to_vec().as_slice())?;
                    if !job.idempotency_key.is_empty() {
                        keys.insert(job.idempotency_key.as_str(), job.id.as_str())?;
                    }
                }
                Op::Event(ev) => {
                    events.insert((ev.job_id.as_str(), ev.seq), ev.encode_to_vec().as_slice())?;
                }
                Op::Purge(list) => {
                    for (id, key) in list {
                        jobs.remove(id.as_str())?;
                        if keys.get(key.as_str())?.is_some_and(|v| v.value() == id) {
                            keys.remove(key.as_str())?;
                        }
                        events.retain_in((id.as_str(), 0)..=(id.as_str(), u64::MAX), |_, _| false)?;
                    }
                }
                Op::Flush(_) => {}
            }
        }
    }
    txn.commit()?;
    Ok(())
}
