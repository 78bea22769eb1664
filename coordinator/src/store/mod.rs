//! The durable grid view. `GridStore` is the database (redb by default); `GridView` is the in-memory grid
//! loaded from it once at start and moved on by changes, each list of changes one write transaction that
//! is durable before the view shows it. Nothing but this module touches the database.

mod memory;
mod redb_store;

use std::sync::{Mutex, MutexGuard};

pub use memory::MemoryStore;
pub use redb_store::RedbStore;

use crate::grid::{Change, Defaults, GridState, Node, Operation, Vm};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the grid store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("grid store transaction failed: {0}")]
    Txn(String),
    #[error("grid store record {key:?} in {table} does not decode: {reason}")]
    Decode { table: &'static str, key: String, reason: String },
}

/// Every record, as loaded at start.
#[derive(Debug, Default)]
pub struct Records {
    pub nodes: Vec<Node>,
    pub vms: Vec<Vm>,
    pub ops: Vec<Operation>,
}

pub trait GridStore: Send + Sync {
    /// Read every record (once, at start).
    fn load(&self) -> Result<Records, StoreError>;
    /// Write the changes in one durable transaction: all of them or none.
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
}

impl<T: GridStore> GridStore for std::sync::Arc<T> {
    fn load(&self) -> Result<Records, StoreError> {
        (**self).load()
    }
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        (**self).commit(changes)
    }
}

/// The grid view over a store. Changes are serialized: each is decided on the current view, committed, then
/// applied, all under one lock, so two concurrent decisions never see the same free capacity.
pub struct GridView {
    state: Mutex<GridState>,
    store: Box<dyn GridStore>,
}

impl GridView {
    pub fn open(store: Box<dyn GridStore>, defaults: Defaults) -> Result<GridView, StoreError> {
        let r = store.load()?;
        Ok(GridView { state: Mutex::new(GridState::new(r.nodes, r.vms, r.ops, defaults)), store })
    }

    fn lock(&self) -> MutexGuard<'_, GridState> {
        // A panic while holding the lock leaves the view as it was before the change (changes are applied
        // only after their commit), so the view stays usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Read the view.
    pub fn read<T>(&self, f: impl FnOnce(&GridState) -> T) -> T {
        f(&self.lock())
    }

    /// Decide a change on the view (`f` returns its result and the changes), commit it, then apply it.
    /// `f` may take operation ids (`next_op_id`); nothing else it does to the state outlives an error.
    pub fn update<T, E: From<StoreError>>(
        &self,
        f: impl FnOnce(&mut GridState) -> Result<(T, Vec<Change>), E>,
    ) -> Result<T, E> {
        let mut state = self.lock();
        let (value, changes) = f(&mut state)?;
        if !changes.is_empty() {
            self.store.commit(&changes)?;
            for c in &changes {
                state.apply(c);
            }
        }
        Ok(value)
    }

    /// Change the view without storing it: observations (progress, usage) that the next poll or event
    /// renews anyway.
    pub fn observe(&self, f: impl FnOnce(&mut GridState)) {
        f(&mut self.lock())
    }
}
