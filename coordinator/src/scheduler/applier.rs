//! The single writer of the snapshot, which makes decisions durable in batches (Nomad's plan applier, made
//! simpler: with one applier deciding against its own snapshot there is nothing to re-validate).
//!
//! Requests arrive on a channel. The applier takes everything pending (up to [`MAX_BATCH`]), decides each
//! request in arrival order against the snapshot, reserving as it goes so two requests never overcommit a
//! node, and hands the batch to a commit thread, which writes its reservations through a [`ReservationSink`]
//! in one durable transaction and only then answers each request. While one batch commits the next is
//! decided against the snapshot that already holds the first one's reservations (as Nomad's plan applier
//! overlaps a plan's evaluation with the previous plan's Raft commit); the third waits, so batches grow when
//! the store is slow. If a commit fails, every request of the batch gets the error and its reservations are
//! released from the snapshot before the next decision; decisions made meanwhile only saw less free room.
//! Node updates and releases sent on the same handle apply in order with the placements.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel, sync_channel};
use std::thread::JoinHandle;

use super::model::{NodeInfo, Request, Resources};
use super::{Placement, Snapshot, Unschedulable, place};

/// Most requests decided per durable transaction.
pub const MAX_BATCH: usize = 4096;

/// A decided placement as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub vm: String,
    pub node: String,
    pub resources: Resources,
    pub spread_group: Option<String>,
}

/// Where reservations become durable: the coordinator's store, or a test double.
pub trait ReservationSink: Send + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Writes every reservation of `batch` in one transaction and returns once it is durable.
    fn commit(&mut self, batch: &[Reservation]) -> Result<(), Self::Error>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Unschedulable(Unschedulable),
    #[error("storing the reservation")]
    Store(#[source] Arc<dyn std::error::Error + Send + Sync>),
    #[error("the placement applier has stopped")]
    Stopped,
}

/// Called once with a request's outcome, on the applier's thread: it should only hand the result on
/// (send it on a channel), never block.
pub type Reply = Box<dyn FnOnce(Result<Placement, ApplyError>) + Send>;

enum Command {
    Place(Request, Reply),
    Upsert(NodeInfo),
    Remove(String),
    Release { node: String, resources: Resources, spread_group: Option<String> },
    Inspect(Box<dyn FnOnce(&Snapshot) + Send>),
}

/// Sends work to the applier. Cloneable; the applier stops when the last handle is dropped.
#[derive(Clone)]
pub struct ApplierHandle {
    tx: Sender<Command>,
}

impl std::fmt::Debug for ApplierHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApplierHandle")
    }
}

impl ApplierHandle {
    /// Queues a request; `reply` gets the placement once it is durable, or why there is none.
    pub fn place(&self, r: Request, reply: Reply) {
        if let Err(unsent) = self.tx.send(Command::Place(r, reply))
            && let Command::Place(_, reply) = unsent.0
        {
            reply(Err(ApplyError::Stopped));
        }
    }

    pub fn upsert_node(&self, n: NodeInfo) {
        self.send(Command::Upsert(n));
    }

    pub fn remove_node(&self, name: &str) {
        self.send(Command::Remove(name.to_owned()));
    }

    pub fn release(&self, node: &str, resources: &Resources, spread_group: Option<&str>) {
        let spread_group = spread_group.map(str::to_owned);
        self.send(Command::Release { node: node.to_owned(), resources: *resources, spread_group });
    }

    /// Runs `f` on the applier's snapshot (e.g. [`super::explain`] for a dry run). It sees the decisions of
    /// the batch in progress, which may still fail to commit.
    pub fn inspect(&self, f: impl FnOnce(&Snapshot) + Send + 'static) {
        self.send(Command::Inspect(Box::new(f)));
    }

    fn send(&self, command: Command) {
        // A stopped applier has no snapshot left to change.
        let _ = self.tx.send(command);
    }
}

/// Starts the applier on its own thread, owning `snapshot` and `sink`; the thread returns both when the last
/// handle is dropped.
pub fn spawn_applier<S: ReservationSink>(
    snapshot: Snapshot,
    sink: S,
) -> (ApplierHandle, JoinHandle<(Snapshot, S)>) {
    let (tx, rx) = channel();
    let thread = std::thread::Builder::new()
        .name("placement-applier".to_owned())
        .spawn(move || run(snapshot, sink, rx))
        .expect("spawning the placement applier thread");
    (ApplierHandle { tx }, thread)
}

/// A decided batch on its way to the store, with the answers to give once it is durable.
struct Decided {
    batch: Vec<Reservation>,
    outcomes: Vec<(Reply, Result<Placement, Unschedulable>)>,
}

fn run<S: ReservationSink>(mut snapshot: Snapshot, sink: S, rx: Receiver<Command>) -> (Snapshot, S) {
    // One batch commits while the next is decided; a third waits (backpressure: the batch being decided grows).
    let (decided_tx, decided_rx) = sync_channel::<Decided>(0);
    let (undo_tx, undo_rx) = channel::<Vec<Reservation>>();
    let committer = std::thread::Builder::new()
        .name("placement-commit".to_owned())
        .spawn(move || commit_loop(sink, decided_rx, undo_tx))
        .expect("spawning the placement commit thread");
    let undo = |snapshot: &mut Snapshot, failed: Vec<Reservation>| {
        for r in failed {
            snapshot.release(&r.node, &r.resources, r.spread_group.as_deref());
        }
    };
    while let Ok(first) = rx.recv() {
        let mut decided = Decided { batch: Vec::new(), outcomes: Vec::new() };
        let mut next = Some(first);
        while let Some(command) = next.take() {
            while let Ok(failed) = undo_rx.try_recv() {
                undo(&mut snapshot, failed);
            }
            match command {
                Command::Place(r, reply) => {
                    let outcome = place(&snapshot, &r);
                    if let Ok(p) = &outcome {
                        snapshot.reserve(&p.node, &r);
                        let (vm, node, spread_group) = (r.vm, p.node.clone(), r.spread_group);
                        decided.batch.push(Reservation { vm, node, resources: r.resources, spread_group });
                    }
                    decided.outcomes.push((reply, outcome));
                }
                Command::Upsert(n) => snapshot.upsert_node(n),
                Command::Remove(name) => snapshot.remove_node(&name),
                Command::Release { node, resources, spread_group } => {
                    snapshot.release(&node, &resources, spread_group.as_deref())
                }
                Command::Inspect(f) => f(&snapshot),
            }
            if decided.outcomes.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if decided_tx.send(decided).is_err() {
            break;
        }
    }
    drop(decided_tx);
    let sink = committer.join().expect("the placement commit thread");
    undo_rx.try_iter().for_each(|failed| undo(&mut snapshot, failed));
    (snapshot, sink)
}

/// Makes each decided batch durable, then answers its requests; a batch that fails to commit goes back to
/// the applier to be released.
fn commit_loop<S: ReservationSink>(
    mut sink: S,
    decided: Receiver<Decided>,
    undo: Sender<Vec<Reservation>>,
) -> S {
    for Decided { batch, outcomes } in decided {
        let committed = if batch.is_empty() { Ok(()) } else { sink.commit(&batch) };
        let failed = committed.err().map(|e| Arc::new(e) as Arc<dyn std::error::Error + Send + Sync>);
        if failed.is_some() {
            let _ = undo.send(batch);
        }
        for (reply, outcome) in outcomes {
            reply(match (outcome, &failed) {
                (Err(u), _) => Err(ApplyError::Unschedulable(u)),
                (Ok(_), Some(e)) => Err(ApplyError::Store(e.clone())),
                (Ok(p), None) => Ok(p),
            });
        }
    }
    sink
}
