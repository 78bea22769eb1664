//! The grid store in redb (`state_dir/grid.redb`): one table per record kind, protobuf-encoded values
//! keyed by name or operation id. Each commit is one durable write transaction.

use std::path::Path;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{GridStore, Records, StoreError};
use crate::grid::{Change, GridUser, Node, Operation, Tenant, Vm};

const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const OPS: TableDefinition<&str, &[u8]> = TableDefinition::new("operations");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");

pub struct RedbStore {
    db: Database,
}

fn txn(e: impl std::fmt::Display) -> StoreError {
    StoreError::Txn(e.to_string())
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let open = |e: &dyn std::fmt::Display| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| open(&e))?;
        // Create the tables so that a read of a new store finds them.
        let w = db.begin_write().map_err(|e| open(&e))?;
        for t in [NODES, VMS, OPS, USERS, TENANTS] {
            w.open_table(t).map_err(|e| open(&e))?;
        }
        w.commit().map_err(|e| open(&e))?;
        Ok(RedbStore { db })
    }
}

fn read_table<M: Message + Default>(
    r: &redb::ReadTransaction,
    def: TableDefinition<&str, &[u8]>,
    name: &'static str,
) -> Result<Vec<M>, StoreError> {
    let table = r.open_table(def).map_err(txn)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(txn)? {
        let (k, v) = entry.map_err(txn)?;
        let m = M::decode(v.value()).map_err(|e| StoreError::Decode {
            table: name,
            key: k.value().to_string(),
            reason: e.to_string(),
        })?;
        out.push(m);
    }
    Ok(out)
}

impl GridStore for RedbStore {
    fn load(&self) -> Result<Records, StoreError> {
        let r = self.db.begin_read().map_err(txn)?;
        Ok(Records {
            nodes: read_table::<Node>(&r, NODES, "nodes")?,
            vms: read_table::<Vm>(&r, VMS, "vms")?,
            ops: read_table::<Operation>(&r, OPS, "operations")?,
            users: read_table::<GridUser>(&r, USERS, "users")?,
            tenants: read_table::<Tenant>(&r, TENANTS, "tenants")?,
            revision: 0,
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let w = self.db.begin_write().map_err(txn)?;
        {
            let mut nodes = w.open_table(NODES).map_err(txn)?;
            let mut vms = w.open_table(VMS).map_err(txn)?;
            let mut ops = w.open_table(OPS).map_err(txn)?;
            let mut users = w.open_table(USERS).map_err(txn)?;
            let mut tenants = w.open_table(TENANTS).map_err(txn)?;
            for c in changes {
                match c {
                    Change::PutNode(n) => {
                        drop(nodes.insert(n.name.as_str(), n.encode_to_vec().as_slice()).map_err(txn)?)
                    }
                    Change::RemoveNode(name) => drop(nodes.remove(name.as_str()).map_err(txn)?),
                    Change::PutVm(v) => {
                        drop(vms.insert(v.name.as_str(), v.encode_to_vec().as_slice()).map_err(txn)?)
                    }
                    Change::RemoveVm(name) => drop(vms.remove(name.as_str()).map_err(txn)?),
                    Change::PutOp(o) => {
                        drop(ops.insert(o.id.as_str(), o.encode_to_vec().as_slice()).map_err(txn)?)
                    }
                    Change::RemoveOp(id) => drop(ops.remove(id.as_str()).map_err(txn)?),
                    Change::PutUser(u) => {
                        drop(users.insert(u.name.as_str(), u.encode_to_vec().as_slice()).map_err(txn)?)
                    }
                    Change::RemoveUser(name) => drop(users.remove(name.as_str()).map_err(txn)?),
                    Change::PutTenant(t) => {
                        drop(tenants.insert(t.name.as_str(), t.encode_to_vec().as_slice()).map_err(txn)?)
                    }
                    Change::RemoveTenant(name) => drop(tenants.remove(name.as_str()).map_err(txn)?),
                }
            }
        }
        w.commit().map_err(txn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Resources;

    /// What every store does is in `store::tests::conformance`; redb's own: records survive a reopen.
    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.redb");
        let node = Node {
            name: "n1".into(),
            capacity: Some(Resources { vcpus: 8, ..Default::default() }),
            ..Default::default()
        };
        RedbStore::open(&path).unwrap().commit(&[Change::PutNode(node)]).unwrap();
        let r = RedbStore::open(&path).unwrap().load().unwrap();
        assert_eq!(r.nodes.len(), 1);
        assert_eq!(r.nodes[0].capacity.unwrap().vcpus, 8);
    }
}
