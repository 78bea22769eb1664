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
