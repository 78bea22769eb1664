//! The grid store in etcd, for several coordinators sharing one grid view. Records live under the
//! configured prefix as `PREFIX/nodes/NAME`, `PREFIX/vms/NAME`, `PREFIX/ops/ID`, `PREFIX/users/NAME` and `PREFIX/tenants/NAME`,
//! protobuf-encoded as in the embedded store. Each commit is one etcd transaction guarded by the leader's
//! [`Fence`]: it applies only while this coordinator's election key still exists with the revision it won
//! with, so a deposed leader can never write, and two coordinators never both apply a change.
//!
//! The trait's calls are blocking (the committer is a thread of its own); they run the async client on the
//! runtime the store was opened on and wait for it, each bounded by the configured timeout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, KeyValue, Txn, TxnOp, WatchOptions};
use prost::Message;

use super::{GridStore, Records, StoreError};
use crate::grid::{Change, GridUser, Node, Operation, Tenant, Vm};

/// Pause between attempts of a call that found etcd unavailable.
const RETRY: Duration = Duration::from_millis(200);
/// Keys per page when loading (etcd answers in one message per page).
const PAGE: i64 = 500;

/// The record kinds and their key segment.
const NODES: &str = "nodes";
const VMS: &str = "vms";
const OPS: &str = "ops";
const USERS: &str = "users";
const TENANTS: &str = "tenants";

/// The leader's proof of leadership: its election key and that key's creation revision (its term).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    pub revision: i64,
}

pub struct EtcdStore {
    client: Client,
    runtime: tokio::runtime::Handle,
    prefix: String,
    timeout: Duration,
    max_txn_ops: usize,
    fence: Mutex<Option<Fence>>,
    /// The highest store revision seen in any answer.
    revision: AtomicI64,
}

/// `e` as the store's error: a call that did not reach a quorum is "unavailable".
fn unavailable(what: &str, e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(format!("etcd {what}: {}", etcd_error(&e)))
}

/// An etcd client error in one line: gRPC's message and the innermost cause (not the transport's debug
/// dump).
pub fn etcd_error(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let mut root: Option<&dyn std::error::Error> = std::error::Error::source(status);
            while let Some(next) = root.and_then(std::error::Error::source) {
                root = Some(next);
            }
            match root {
                Some(cause) => format!("{} ({cause})", status.message()),
                None => status.message().to_string(),
            }
        }
        other => other.to_string(),
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connect to `endpoints` (on `runtime`, which must outlive the store). Nothing is read yet.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        max_txn_ops: usize,
    ) -> Result<EtcdStore, StoreError> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout)
            .with_require_leader(true);
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| StoreError::Open {
                path: endpoints.join(","),
                reason: format!("no etcd member answered within {} s", timeout.as_secs()),
            })?
            .map_err(|e| StoreError::Open { path: endpoints.join(","), reason: e.to_string() })?;
        Ok(EtcdStore {
            client,
            runtime: tokio::runtime::Handle::current(),
            prefix: prefix.trim_end_matches('/').to_string(),
            timeout,
            max_txn_ops,
            fence: Mutex::new(None),
            revision: AtomicI64::new(0),
        })
    }

    /// A client for the election, leases and watches (the same connection).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The highest store revision seen so far.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Relaxed)
    }

    pub fn note_revision(&self, revision: i64) {
        self.revision.fetch_max(revision, Ordering::Relaxed);
    }

    /// Commits from now on apply only while `fence` holds; None refuses every commit (a follower).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.prefix)
    }

    /// The record kind and name of one of our keys.
    fn parse_key<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (kind, name) = rest.split_once('/')?;
        matches!(kind, NODES | VMS | OPS | USERS | TENANTS).then_some((kind, name))
    }

    /// Run the future `make` gives on the store's runtime and wait for it, from any thread (a runtime worker
    /// included). An attempt that finds etcd unavailable (a member gone, an election under way) is made
    /// again until the store's timeout: every call here is idempotent (reads, and a fenced transaction of
    /// puts and deletes that writes the same thing twice).
    fn block<T: Send + 'static, F>(&self, make: impl Fn() -> F + Send + 'static) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        let timeout = self.timeout;
        self.runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let attempt = (timeout / 3).max(Duration::from_secs(1));
            let r = loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let r = tokio::time::timeout(attempt.min(left), make()).await.unwrap_or_else(|_| {
                    Err(StoreError::Unavailable(format!(
                        "etcd did not answer within {} s",
                        timeout.as_secs()
                    )))
                });
                match r {
                    Err(StoreError::Unavailable(_)) if deadline > tokio::time::Instant::now() + RETRY => {
                        tokio::time::sleep(RETRY).await;
                    }
                    r => break r,
                }
            };
            let _ = tx.send(r);
        });
        let wait = || rx.recv().map_err(|_| StoreError::Stopped);
        // A runtime worker hands its other tasks to another worker while it waits.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait)?,
            _ => wait()?,
        }
    }

    /// Every key-value of one record kind at `revision` (0: the newest), page by page.
    async fn range(
        mut client: Client,
        prefix: String,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let (mut out, mut from, mut at) = (Vec::new(), prefix.into_bytes(), revision);
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                options = options.with_revision(at);
            }
            let mut resp =
                client.get(from.clone(), Some(options)).await.map_err(|e| unavailable("range", e))?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            if let Some(last) = kvs.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            out.extend(kvs);
            if !more {
                return Ok((out, at));
            }
        }
    }

    /// One watched or loaded record as a change: a put decodes its value, a delete names its key.
    pub fn change_of(&self, key: &[u8], value: Option<&[u8]>) -> Result<Option<Change>, StoreError> {
        let key_text = String::from_utf8_lossy(key);
        let Some((kind, name)) = self.parse_key(&key_text) else { return Ok(None) };
        let decode_err = |table: &'static str, e: prost::DecodeError| StoreError::Decode {
            table,
            key: name.to_string(),
            reason: e.to_string(),
        };
        let name = name.to_string();
        Ok(Some(match (kind, value) {
            (NODES, Some(v)) => Change::PutNode(Node::decode(v).map_err(|e| decode_err("nodes", e))?),
            (VMS, Some(v)) => Change::PutVm(Vm::decode(v).map_err(|e| decode_err("vms", e))?),
            (OPS, Some(v)) => Change::PutOp(Operation::decode(v).map_err(|e| decode_err("ops", e))?),
            (USERS, Some(v)) => Change::PutUser(GridUser::decode(v).map_err(|e| decode_err("users", e))?),
            (TENANTS, Some(v)) => Change::PutTenant(Tenant::decode(v).map_err(|e| decode_err("tenants", e))?),
            (NODES, None) => Change::RemoveNode(name),
            (VMS, None) => Change::RemoveVm(name),
            (OPS, None) => Change::RemoveOp(name),
            (TENANTS, None) => Change::RemoveTenant(name),
            (_, None) => Change::RemoveUser(name),
            _ => return Ok(None),
        }))
    }

    /// Follow the store from `from_revision` (exclusive) on, calling `apply` with the changes of each
    /// revision and that revision, until the watch breaks (Err) or `apply` returns false (Ok).
    pub async fn watch(
        &self,
        from_revision: i64,
        mut apply: impl FnMut(Vec<Change>, i64) -> bool,
    ) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let prefix = format!("{}/", self.prefix);
        let options =
            WatchOptions::new().with_prefix().with_start_revision(from_revision + 1).with_progress_notify();
        let mut stream = client.watch(prefix, Some(options)).await.map_err(|e| unavailable("watch", e))?;
        while let Some(resp) = stream.message().await.map_err(|e| unavailable("watch", e))? {
            if resp.canceled() {
                return Err(StoreError::Unavailable(format!(
                    "etcd cancelled the watch: {} (compacted at {})",
                    resp.cancel_reason(),
                    resp.compact_revision()
                )));
            }
            let revision = resp.header().map_or(0, |h| h.revision());
            self.note_revision(revision);
            let mut changes = Vec::new();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let value = (event.event_type() == EventType::Put).then(|| kv.value());
                if let Some(change) = self.change_of(kv.key(), value)? {
                    changes.push(change);
                }
            }
            if !apply(changes, revision) {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable("etcd closed the watch".into()))
    }

    /// The key and encoded value (None: delete) each change writes; the last change of a key wins (one etcd
    /// transaction writes each key once).
    fn writes(&self, changes: &[Change]) -> Vec<(String, Option<Vec<u8>>)> {
        let mut order = Vec::new();
        let mut last: HashMap<String, Option<Vec<u8>>> = HashMap::new();
        for c in changes {
            let (key, value) = match c {
                Change::PutNode(n) => (self.key(NODES, &n.name), Some(n.encode_to_vec())),
                Change::RemoveNode(name) => (self.key(NODES, name), None),
                Change::PutVm(v) => (self.key(VMS, &v.name), Some(v.encode_to_vec())),
                Change::RemoveVm(name) => (self.key(VMS, name), None),
                Change::PutOp(o) => (self.key(OPS, &o.id), Some(o.encode_to_vec())),
                Change::RemoveOp(id) => (self.key(OPS, id), None),
                Change::PutUser(u) => (self.key(USERS, &u.name), Some(u.encode_to_vec())),
                Change::RemoveUser(name) => (self.key(USERS, name), None),
                Change::PutTenant(t) => (self.key(TENANTS, &t.name), Some(t.encode_to_vec())),
                Change::RemoveTenant(name) => (self.key(TENANTS, name), None),
            };
            if last.insert(key.clone(), value).is_none() {
                order.push(key);
            }
        }
        order
            .into_iter()
            .map(|k| {
                let v = last.remove(&k).flatten();
                (k, v)
            })
            .collect()
    }
}

impl GridStore for EtcdStore {
    fn load(&self) -> Result<Records, StoreError> {
        let (client, prefix) = (self.client.clone(), self.prefix.clone());
        let (kvs, revision) = self.block(move || {
            let (client, prefix) = (client.clone(), prefix.clone());
            async move {
                // Every kind at the revision the first range was read at: one consistent view.
                let (mut all, at) = EtcdStore::range(client.clone(), format!("{prefix}/{NODES}/"), 0).await?;
                for kind in [VMS, OPS, USERS, TENANTS] {
                    all.extend(EtcdStore::range(client.clone(), format!("{prefix}/{kind}/"), at).await?.0);
                }
                Ok((all, at))
            }
        })?;
        self.note_revision(revision);
        let mut r = Records { revision, ..Default::default() };
        for kv in &kvs {
            match self.change_of(kv.key(), Some(kv.value()))? {
                Some(Change::PutNode(n)) => r.nodes.push(n),
                Some(Change::PutVm(v)) => r.vms.push(v),
                Some(Change::PutOp(o)) => r.ops.push(o),
                Some(Change::PutUser(u)) => r.users.push(u),
                Some(Change::PutTenant(t)) => r.tenants.push(t),
                _ => {}
            }
        }
        Ok(r)
    }

    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        let Some(fence) = self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Err(StoreError::NotLeader("it holds no leadership, so it writes nothing".into()));
        };
        let writes = self.writes(changes);
        if writes.len() > self.max_txn_ops {
            return Err(StoreError::Txn(format!(
                "one change of {} records is more than store.etcd.max_txn_ops ({})",
                writes.len(),
                self.max_txn_ops
            )));
        }
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            })
            .collect();
        let txn = Txn::new()
            .when([Compare::create_revision(fence.key.clone(), CompareOp::Equal, fence.revision)])
            .and_then(ops);
        let client = self.client.clone();
        let resp = self.block(move || {
            let (mut client, txn) = (client.clone(), txn.clone());
            async move { client.txn(txn).await.map_err(|e| unavailable("transaction", e)) }
        })?;
        if let Some(h) = resp.header() {
            self.note_revision(h.revision());
        }
        if !resp.succeeded() {
            return Err(StoreError::NotLeader(format!(
                "its election key (term {}) is gone: a newer leader holds the grid",
                fence.revision
            )));
        }
        Ok(())
    }

    fn max_changes(&self) -> Option<usize> {
        Some(self.max_txn_ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/g/"), b"/g0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
