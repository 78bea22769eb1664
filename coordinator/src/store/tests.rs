use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::*;
use crate::grid::Resources;

/// A store that counts its transactions, takes `delay` over each (a slow disk) and fails them on demand.
struct Flaky<S> {
    inner: S,
    fail: AtomicBool,
    commits: AtomicUsize,
    delay: Duration,
}

impl<S: GridStore> GridStore for Flaky<S> {
    fn load(&self) -> Result<Records, StoreError> {
        self.inner.load()
    }
    fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        std::thread::sleep(self.delay);
        self.commits.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Txn("disk full".into()));
        }
        self.inner.commit(changes)
    }
}

fn node(name: &str) -> Node {
    Node {
        name: name.into(),
        capacity: Some(Resources { vcpus: 8, ..Default::default() }),
        ..Default::default()
    }
}

fn put(view: &GridView, name: String) -> Pending<()> {
    view.stage::<_, StoreError>(|_| Ok(((), vec![Change::PutNode(node(&name))]))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_are_durable_when_they_return_and_share_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.redb");
    let store = Arc::new(Flaky {
        inner: RedbStore::open(&path).unwrap(),
        fail: AtomicBool::new(false),
        commits: AtomicUsize::new(0),
        delay: Duration::from_millis(2),
    });
    let view = Arc::new(GridView::open(Box::new(store.clone()), Defaults::default()).unwrap());
    let (callers, each) = (64, 20);
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (view, store) = (view.clone(), store.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let name = format!("n{c}-{i}");
                let n = name.clone();
                view.update::<_, StoreError>(|_| Ok(((), vec![Change::PutNode(node(&n))]))).await.unwrap();
                // Answered only once durable: a fresh read transaction finds it.
                assert!(store.load().unwrap().nodes.iter().any(|x| x.name == name), "{name} not durable");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let commits = store.commits.load(Ordering::SeqCst);
    assert!(commits < callers * each, "{commits} transactions for {} updates", callers * each);
    assert_eq!(view.read(|s| s.nodes.len()), callers * each);
    drop(view);
    drop(store);
    let r = RedbStore::open(&path).unwrap().load().unwrap();
    assert_eq!(r.nodes.len(), callers * each);
}

#[tokio::test]
async fn a_failed_commit_reaches_every_caller_of_its_batch_and_the_view_returns_to_the_store() {
    let store = Arc::new(Flaky {
        inner: MemoryStore::default(),
        fail: AtomicBool::new(false),
        commits: AtomicUsize::new(0),
        delay: Duration::from_millis(20),
    });
    let view = GridView::open(Box::new(store.clone()), Defaults::default()).unwrap();
    put(&view, "kept".into()).durable().await.unwrap();

    store.fail.store(true, Ordering::SeqCst);
    // The first goes to the store alone; the ones queued behind it fail with it even though they never
    // reach a transaction of their own, since they were decided on a view that held it.
    let first = put(&view, "a".into());
    tokio::time::sleep(Duration::from_millis(5)).await;
    for _ in 0..3 {
        view.stage::<_, StoreError>(|s| Ok((s.next_op_id(), vec![]))).unwrap().wait().unwrap();
    }
    let rest: Vec<_> = ["b", "c", "d"].iter().map(|n| put(&view, n.to_string())).collect();
    assert_eq!(view.read(|s| s.nodes.len()), 5, "queued changes are in the view");
    assert!(matches!(first.durable().await, Err(StoreError::Txn(m)) if m == "disk full"));
    for p in rest {
        assert!(matches!(p.durable().await, Err(StoreError::Txn(_))));
    }
    assert_eq!(store.commits.load(Ordering::SeqCst), 2, "one transaction for the failed one");
    let names: Vec<String> = view.read(|s| s.nodes.keys().cloned().collect());
    assert_eq!(names, ["kept"], "the view is what the store holds");
    assert_eq!(view.read(|s| s.op_seq), 3, "handed-out operation ids stay used");

    store.fail.store(false, Ordering::SeqCst);
    let e = view.update::<_, StoreError>(|_| Ok(((), vec![Change::PutNode(node("e"))]))).await;
    assert!(e.is_ok());
    assert_eq!(store.load().unwrap().nodes.len(), 2);
}

/// What every store does the same way: each record kind survives a load, updates and removals apply, and
/// within one commit the last change of a record wins.
fn conformance(store: &dyn GridStore) {
    use crate::grid::{OpState, VmState};
    let vm = |state: VmState| Vm {
        name: "web1".into(),
        node: "n1".into(),
        state: state as i32,
        ..Default::default()
    };
    let op = Operation {
        id: "op-000001".into(),
        vm: "web1".into(),
        state: OpState::Running as i32,
        ..Default::default()
    };
    let user = GridUser { name: "bob".into(), role: "viewer".into(), ..Default::default() };
    let group = crate::grid::Group {
        tenant: "acme".into(),
        name: "web".into(),
        next_member: 3,
        ..Default::default()
    };
    let tenant = crate::grid::Tenant { name: "acme".into(), groups: vec![group], ..Default::default() };
    store
        .commit(&[
            Change::PutNode(node("n1")),
            Change::PutVm(vm(VmState::Provisioning)),
            Change::PutOp(op.clone()),
            Change::PutUser(user.clone()),
            Change::PutTenant(tenant.clone()),
        ])
        .unwrap();
    let r = store.load().unwrap();
    assert_eq!((r.nodes.len(), r.vms.len(), r.ops.len(), r.users.len()), (1, 1, 1, 1));
    assert_eq!(r.tenants, vec![tenant]);
    assert_eq!(r.nodes[0].capacity.unwrap().vcpus, 8);
    assert_eq!(r.vms[0].state(), VmState::Provisioning);
    assert_eq!(r.ops[0], op);
    assert_eq!(r.users[0], user);

    store
        .commit(&[
            Change::PutVm(vm(VmState::Running)),
            Change::RemoveUser("bob".into()),
            Change::RemoveTenant("acme".into()),
        ])
        .unwrap();
    let r = store.load().unwrap();
    assert_eq!(r.vms[0].state(), VmState::Running);
    assert!(r.users.is_empty() && r.tenants.is_empty());

    // The last change of a record in one commit wins.
    let mut n2 = node("n2");
    store.commit(&[Change::PutNode(n2.clone()), Change::RemoveNode("n2".into())]).unwrap();
    assert!(!store.load().unwrap().nodes.iter().any(|n| n.name == "n2"));
    n2.datacenter = "dc2".into();
    store
        .commit(&[Change::PutNode(node("n2")), Change::RemoveNode("n2".into()), Change::PutNode(n2)])
        .unwrap();
    let r = store.load().unwrap();
    assert_eq!(r.nodes.iter().find(|n| n.name == "n2").map(|n| n.datacenter.as_str()), Some("dc2"));

    store.commit(&[Change::RemoveOp("op-000001".into()), Change::RemoveVm("web1".into())]).unwrap();
    let r = store.load().unwrap();
    assert!(r.ops.is_empty() && r.vms.is_empty());
    assert_eq!(r.nodes.len(), 2);
}

#[test]
fn the_memory_store_conforms() {
    conformance(&MemoryStore::default());
}

#[test]
fn the_redb_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&RedbStore::open(&dir.path().join("grid.redb")).unwrap());
}

/// The coordinator's etcd store on a real etcd, under a fresh prefix, fenced as a leader's.
async fn etcd_store(etcd: &gridforge_testsupport::etcd::Etcd, prefix: &str) -> EtcdStore {
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.url), prefix, Duration::from_secs(10), 128)
        .await
        .unwrap();
    let key = format!("{prefix}/election/test");
    let put = store.client().put(key.clone(), "me", None).await.unwrap();
    let revision = put.header().map_or(0, |h| h.revision());
    store.set_fence(Some(Fence { key: key.into_bytes(), revision }));
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_conforms_and_writes_only_while_its_fence_holds() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = gridforge_testsupport::etcd::Etcd::start(dir.path());
    let store = etcd_store(&etcd, "/test-conformance").await;
    conformance(&store);
    assert!(store.load().unwrap().revision > 0, "records carry the store's revision");

    // Another prefix is another grid.
    let other = etcd_store(&etcd, "/test-other").await;
    assert!(other.load().unwrap().nodes.is_empty());

    // Without a fence (a follower) and with a stale one (a deposed leader), nothing is written.
    store.set_fence(None);
    let refused = store.commit(&[Change::PutNode(node("n9"))]);
    assert!(matches!(refused, Err(StoreError::NotLeader(_))), "{refused:?}");
    store.set_fence(Some(Fence { key: b"/test-conformance/election/test".to_vec(), revision: 1 }));
    let refused = store.commit(&[Change::PutNode(node("n9"))]);
    assert!(matches!(&refused, Err(StoreError::NotLeader(m)) if m.contains("term 1")), "{refused:?}");
    assert!(!store.load().unwrap().nodes.iter().any(|n| n.name == "n9"));

    // More records than one transaction takes: refused whole.
    let store = etcd_store(&etcd, "/test-conformance").await;
    let many: Vec<Change> = (0..129).map(|i| Change::PutNode(node(&format!("m{i}")))).collect();
    assert!(matches!(store.commit(&many), Err(StoreError::Txn(m)) if m.contains("max_txn_ops")));
    assert!(!store.load().unwrap().nodes.iter().any(|n| n.name.starts_with('m')));

    // An etcd that is gone: unavailable, promptly.
    drop(etcd);
    let t = std::time::Instant::now();
    let gone = store.commit(&[Change::PutNode(node("late"))]);
    assert!(matches!(gone, Err(StoreError::Unavailable(_))), "{gone:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "bounded by the store's timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_etcd_concurrent_updates_are_durable_when_they_return_batched_and_a_follower_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = gridforge_testsupport::etcd::Etcd::start(dir.path());
    let store = Arc::new(etcd_store(&etcd, "/test-view").await);
    let start = store.load().unwrap().revision;
    let view = Arc::new(GridView::open(Box::new(store.clone()), Defaults::default()).unwrap());

    // A follower's view, kept current by the watch.
    let follower_store = Arc::new(etcd_store(&etcd, "/test-view").await);
    let follower = Arc::new(GridView::open(Box::new(follower_store.clone()), Defaults::default()).unwrap());
    let (f, fs) = (follower.clone(), follower_store.clone());
    let watching = tokio::spawn(async move {
        let _ = fs
            .watch(start, |changes, _| {
                f.apply_external(&changes);
                true
            })
            .await;
    });

    let (callers, each) = (32, 10);
    let mut tasks = Vec::new();
    for c in 0..callers {
        let view = view.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let name = format!("n{c}-{i}");
                view.update::<_, StoreError>(|_| Ok(((), vec![Change::PutNode(node(&name))]))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let durable = store.load().unwrap();
    assert_eq!(durable.nodes.len(), callers * each, "every answered update is in etcd");
    let transactions = durable.revision - start;
    assert!(
        transactions < (callers * each) as i64,
        "{transactions} transactions for {} updates: batched",
        callers * each
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while follower.read(|s| s.nodes.len()) < callers * each {
        assert!(std::time::Instant::now() < deadline, "the follower's view did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watching.abort();
}
