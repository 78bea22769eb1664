//! A store in memory, for tests: the same transaction semantics as redb, without a file.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prost::Message;

use super::{GridStore, Records, StoreError};
use crate::grid::{Change, GridUser, Node, Operation, Tenant, Vm};

#[derive(Debug, Default)]
pub struct MemoryStore {
    tables: Mutex<[BTreeMap<String, Vec<u8>>; 5]>,
}

impl GridStore for MemoryStore {
    fn load(&self) -> Result<Records, StoreError> {
        let t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        let decode = |what| StoreError::Decode { table: what, key: String::new(), reason: "bad".into() };
        Ok(Records {
            nodes: t[0]
                .values()
                .map(|b| Node::decode(b.as_slice()))
                .collect::<Result<_, _>>()
                .map_err(|_| decode("nodes"))?,
            vms: t[1]
                .values()
                .map(|b| Vm::decode(b.as_slice()))
                .collect::<Result<_, _>>()
                .map_err(|_| decode("vms"))?,
            ops: t[2]
                .values()
                .map(|b| Operation::decode(b.as_slice()))
                .collect::<Result<_, _>>()
                .map_err(|_| decode("ops"))?,
            users: t[3]
                .values()
                .map(|b| GridUser::decode(b.as_slice()))
                .collect::<Result<_, _>>()
                .map_err(|_| decode("users"))?,
            tenants: t[4]
                .values()
                .map(|b| Tenant::decode(b.as_slice()))
                .collect::<Result<_, _>>()
                .map_err(|_| decode("tenants"))?,
            revision: 0,
        })
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for c in changes {
            match c {
                Change::PutNode(n) => drop(t[0].insert(n.name.clone(), n.encode_to_vec())),
                Change::RemoveNode(name) => drop(t[0].remove(name)),
                Change::PutVm(v) => drop(t[1].insert(v.name.clone(), v.encode_to_vec())),
                Change::RemoveVm(name) => drop(t[1].remove(name)),
                Change::PutOp(o) => drop(t[2].insert(o.id.clone(), o.encode_to_vec())),
                Change::RemoveOp(id) => drop(t[2].remove(id)),
                Change::PutUser(u) => drop(t[3].insert(u.name.clone(), u.encode_to_vec())),
                Change::RemoveUser(name) => drop(t[3].remove(name)),
                Change::PutTenant(x) => drop(t[4].insert(x.name.clone(), x.encode_to_vec())),
                Change::RemoveTenant(name) => drop(t[4].remove(name)),
            }
        }
        Ok(())
    }
}
