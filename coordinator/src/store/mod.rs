//! The durable grid view. `GridStore` is the database (redb by default); `GridView` is the in-memory grid
//! loaded from it once at start and moved on by changes.
//!
//! Writes are group-committed. A change is decided and applied to the view under the view's lock and queued,
//! in decision order, for one committer thread; the lock is released before anything touches the disk. The
//! committer takes everything queued, writes it in ONE store transaction, and only once that is durable
//! answers every caller of the batch, so no caller hears of its change before it is durable. Meanwhile other
//! callers decide against the view that already holds the queued changes (so two decisions never see the same
//! free capacity), and their changes go into the next batch: the slower the disk, the bigger the batches.
//!
//! Readers may see a queued change before it is durable (the view runs a batch ahead of the store). If a
//! commit fails, the committer takes the view's lock, fails every caller of the batch and every caller queued
//! behind it (their decisions may rest on the failed changes), and reloads the view from the store, so the
//! view is again exactly what is durable. Observations made with [`GridView::observe`] are lost with the
//! reload, as after a restart; the next poll renews them. Nothing but this module touches the database.

mod etcd_store;
mod memory;
mod redb_store;

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

pub use etcd_store::{EtcdStore, Fence, etcd_error};
pub use memory::MemoryStore;
pub use redb_store::RedbStore;
use tokio::sync::oneshot;

use crate::grid::{Change, Defaults, GridState, GridUser, Node, Operation, Tenant, Vm};

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the grid store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("grid store transaction failed: {0}")]
    Txn(String),
    #[error("grid store record {key:?} in {table} does not decode: {reason}")]
    Decode { table: &'static str, key: String, reason: String },
    #[error("the grid store's committer has stopped")]
    Stopped,
    /// The store cannot be reached or did not answer in time (etcd without quorum, say): nothing was
    /// written.
    #[error("the grid store is unavailable: {0}")]
    Unavailable(String),
    /// This coordinator is not (or no longer) the leader: the store refused the write.
    #[error("this coordinator is not the leader: {0}")]
    NotLeader(String),
}

/// Every record, as loaded at start.
#[derive(Debug, Default)]
pub struct Records {
    pub nodes: Vec<Node>,
    pub vms: Vec<Vm>,
    pub ops: Vec<Operation>,
    pub users: Vec<GridUser>,
    pub tenants: Vec<Tenant>,
    /// The store's revision these records are at (0 for a store without revisions).
    pub revision: i64,
}

impl Records {
    /// The in-memory grid view of these records.
    pub fn into_state(self, defaults: Defaults) -> GridState {
        let mut state = GridState::new(self.nodes, self.vms, self.ops, defaults);
        state.users = self.users.into_iter().map(|u| (u.name.clone(), u)).collect();
        state.tenants = self.tenants.into_iter().map(|t| (t.name.clone(), t)).collect();
        state
    }
}

pub trait GridStore: Send + Sync {
    /// Read every record (at start, and after a failed commit).
    fn load(&self) -> Result<Records, StoreError>;
    /// Write the changes in one durable transaction: all of them or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
    /// Most changes one transaction takes (the committer batches callers within it); None: no limit.
    fn max_changes(&self) -> Option<usize> {
        None
    }
}

impl<T: GridStore> GridStore for std::sync::Arc<T> {
    fn load(&self) -> Result<Records, StoreError> {
        (**self).load()
    }
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        (**self).commit(changes)
    }
    fn max_changes(&self) -> Option<usize> {
        (**self).max_changes()
    }
}

/// Most callers' changes written per transaction.
const MAX_BATCH: usize = 4096;

/// One caller's changes on their way to the store.
struct Queued {
    changes: Vec<Change>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

struct Shared {
    state: Mutex<GridState>,
    store: Arc<dyn GridStore>,
    defaults: Defaults,
    /// A failed commit could not reload the view (the store did not answer): it may hold changes that are
    /// not durable, so no decision is made on it until a reload succeeds.
    dirty: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, GridState> {
        // A panic while holding the lock leaves at worst a change applied and not queued; the view stays
        // usable, and the next failed commit or restart reloads it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The grid view over a store, with its committer thread (stopped and joined when the view is dropped).
pub struct GridView {
    shared: Arc<Shared>,
    queue: Option<Sender<Queued>>,
    committer: Option<JoinHandle<()>>,
}

/// A change applied to the view and queued for the store: [`Pending::durable`] (async) or [`Pending::wait`]
/// (blocking) returns the caller's value once the change is durable, or the commit's error.
#[must_use = "a change is not durable until its Pending is awaited"]
pub struct Pending<T> {
    value: T,
    done: Option<oneshot::Receiver<Result<(), StoreError>>>,
}

impl<T> Pending<T> {
    pub async fn durable(self) -> Result<T, StoreError> {
        if let Some(rx) = self.done {
            rx.await.map_err(|_| StoreError::Stopped)??;
        }
        Ok(self.value)
    }

    /// Blocks the thread until the change is durable: not for a tokio worker.
    pub fn wait(self) -> Result<T, StoreError> {
        if let Some(rx) = self.done {
            rx.blocking_recv().map_err(|_| StoreError::Stopped)??;
        }
        Ok(self.value)
    }
}

impl GridView {
    pub fn open(store: Box<dyn GridStore>, defaults: Defaults) -> Result<GridView, StoreError> {
        let store: Arc<dyn GridStore> = Arc::from(store);
        let r = store.load()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(r.into_state(defaults)),
            store,
            defaults,
            dirty: std::sync::atomic::AtomicBool::new(false),
        });
        let (tx, rx) = channel();
        let s = shared.clone();
        let committer = std::thread::Builder::new()
            .name("grid-store-commit".into())
            .spawn(move || commit_loop(&s, &rx))
            .map_err(|e| StoreError::Txn(format!("cannot start the store's committer thread: {e}")))?;
        Ok(GridView { shared, queue: Some(tx), committer: Some(committer) })
    }

    fn lock(&self) -> MutexGuard<'_, GridState> {
        self.shared.lock()
    }

    /// Read the view (queued changes included).
    pub fn read<T>(&self, f: impl FnOnce(&GridState) -> T) -> T {
        f(&self.lock())
    }

    /// Decide a change on the view (`f` returns its result and the changes), apply it and queue it for the
    /// store, all under the view's lock; the returned [`Pending`] answers once it is durable. `f` may take
    /// operation ids (`next_op_id`); nothing else it does to the state outlives an error.
    pub fn stage<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut GridState) -> Result<(T, Vec<Change>), E>,
    ) -> Result<Pending<T>, E> {
        if self.shared.dirty.load(std::sync::atomic::Ordering::SeqCst) && !reload(&self.shared) {
            return Err(StoreError::Unavailable(
                "the last write failed and the store cannot be read back yet; nothing was decided".into(),
            )
            .into());
        }
        let mut state = self.lock();
        let (value, changes) = f(&mut state)?;
        if changes.is_empty() {
            return Ok(Pending { value, done: None });
        }
        let queue = self.queue.as_ref().ok_or(StoreError::Stopped)?;
        let (done, rx) = oneshot::channel();
        for c in &changes {
            state.apply(c);
        }
        // Queued under the lock, so the queue's order is the order of the decisions.
        if queue.send(Queued { changes, done }).is_err() {
            self.shared.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(state);
            reload(&self.shared);
            return Err(StoreError::Stopped.into());
        }
        Ok(Pending { value, done: Some(rx) })
    }

    /// [`stage`](Self::stage), then wait (without blocking the thread) until the change is durable.
    pub async fn update<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut GridState) -> Result<(T, Vec<Change>), E>,
    ) -> Result<T, E> {
        Ok(self.stage(f)?.durable().await?)
    }

    /// [`stage`](Self::stage), then block the thread until the change is durable: for callers outside tokio.
    pub fn update_blocking<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut GridState) -> Result<(T, Vec<Change>), E>,
    ) -> Result<T, E> {
        Ok(self.stage(f)?.wait()?)
    }

    /// Returns once every change staged before the call is durable (changes commit in the order staged).
    pub async fn flushed(&self) -> Result<(), StoreError> {
        let queue = self.queue.as_ref().ok_or(StoreError::Stopped)?;
        let (done, rx) = oneshot::channel();
        queue.send(Queued { changes: Vec::new(), done }).map_err(|_| StoreError::Stopped)?;
        Pending { value: (), done: Some(rx) }.durable().await
    }

    /// Change the view without storing it: observations (progress, usage) that the next poll or event
    /// renews anyway.
    pub fn observe(&self, f: impl FnOnce(&mut GridState)) {
        f(&mut self.lock())
    }

    /// Replace the view with what the store holds now (a coordinator that just became the leader); the
    /// store's revision it is at.
    pub fn reload_from_store(&self) -> Result<i64, StoreError> {
        let r = self.shared.store.load()?;
        let revision = r.revision;
        let mut state = self.lock();
        let op_seq = state.op_seq;
        *state = r.into_state(self.shared.defaults);
        state.op_seq = state.op_seq.max(op_seq);
        Ok(revision)
    }

    /// Apply changes another coordinator made (read from the store's watch) without storing them again.
    pub fn apply_external(&self, changes: &[Change]) {
        let mut state = self.lock();
        for c in changes {
            state.apply(c);
        }
    }

    /// Most changes one transaction takes: a caller must not stage more at once.
    pub fn max_changes(&self) -> Option<usize> {
        self.shared.store.max_changes()
    }
}

impl Drop for GridView {
    fn drop(&mut self) {
        // The committer writes what is queued, answers it and stops once the queue is closed.
        drop(self.queue.take());
        if let Some(t) = self.committer.take() {
            let _ = t.join();
        }
    }
}

/// Replace the view with what the store holds, read without holding the view's lock (a store that does not
/// answer must not stall readers); true once replaced. Operation ids handed out stay handed out. The view
/// is dirty from a failed commit until this succeeds: no decision is made on it meanwhile.
fn reload(shared: &Shared) -> bool {
    match shared.store.load() {
        Ok(r) => {
            let mut state = shared.lock();
            let op_seq = state.op_seq;
            *state = r.into_state(shared.defaults);
            state.op_seq = state.op_seq.max(op_seq);
            shared.dirty.store(false, std::sync::atomic::Ordering::SeqCst);
            true
        }
        Err(e) => {
            tracing::error!(
                "cannot reload the grid view from the store: {e}; it may show changes that are not durable, \
                 and no change is decided on it until it reloads"
            );
            false
        }
    }
}

fn commit_loop(shared: &Shared, queue: &Receiver<Queued>) {
    let mut batch = Vec::new();
    let mut changes = Vec::new();
    let max_changes = shared.store.max_changes().unwrap_or(usize::MAX);
    // A caller taken from the queue that did not fit the last transaction: the first of the next.
    let mut held: Option<Queued> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match queue.recv() {
                Ok(q) => q,
                Err(_) => break,
            },
        };
        let mut count = first.changes.len();
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(q) if count + q.changes.len() > max_changes => {
                    held = Some(q);
                    break;
                }
                Ok(q) => {
                    count += q.changes.len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        for q in &mut batch {
            changes.append(&mut q.changes);
        }
        let result = shared.store.commit(&changes);
        changes.clear();
        match result {
            Ok(()) => {
                for q in batch.drain(..) {
                    let _ = q.done.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(callers = batch.len(), "grid store commit failed: {e}");
                // From here no decision is made until the view is reloaded: everything queued now was decided
                // on the view with the failed changes in it, and fails with them; later decisions see the
                // reloaded view. (Nothing commits meanwhile: this thread is the only committer.)
                shared.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
                batch.extend(held.take());
                while let Ok(q) = queue.try_recv() {
                    batch.push(q);
                }
                reload(shared);
                while let Ok(q) = queue.try_recv() {
                    batch.push(q);
                }
                for q in batch.drain(..) {
                    let _ = q.done.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
