//! `bench/schedule`: placement speed and packing quality on a synthetic grid.
//!
//! Usage: schedule_bench DIR [NODES [VMS [ROUNDS]]]   (defaults 10000, 100000, 3; the redb file goes in DIR)
//! With GRIDFORGE_BENCH_ETCD=URL (bench/schedule starts a local etcd), run 2 also writes through the
//! coordinator's etcd store (`EtcdStore`, each batch in transactions of at most its max_txn_ops records,
//! fenced by an election key as a leader's are), side by side with redb in each round.
//!
//! Runs 1 and 2 repeat ROUNDS times (the machine is shared: compare within a run); 3 and 4 run once, last.
//!
//! One seeded grid of heterogeneous nodes and one seeded list of mixed VM requests, placed one by one:
//! 1. through `place` + `Snapshot::reserve` (decisions/s);
//! 2. through the group-commit applier with every batch written to redb in one durable transaction, with a
//!    window of requests in flight as concurrent API calls would be (durable placements/s, answer latency);
//! 3. offline first-fit decreasing: all requests sorted by memory, largest first, each on the first node in
//!    name order that passes the same filters (a packing bound that knows the future, ignoring soft scores);
//! 4. through `place_exhaustive` (the same scores over every node: the quality a full scan would reach).
//!
//! Quality: memory stranded = free memory on schedulable nodes that can no longer fit the smallest request
//! (vCPUs, memory or disk short), as a share of all schedulable memory; and how many requests found no node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gridforge_coordinator::grid::{Change, Vm};
use gridforge_coordinator::scheduler::{
    NodeInfo, NodeState, Placement, Request, Reservation, ReservationSink, Resources, Snapshot,
    Unschedulable, Workload, filter, place, place_exhaustive, spawn_applier,
};
use gridforge_coordinator::store::{EtcdStore, Fence, GridStore, StoreError};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const GIB: u64 = 1024;
/// Requests in flight at once in the durable run, as if from that many concurrent API calls.
const WINDOW: usize = 1024;
const IMAGES: [&str; 8] = [
    "debian-12:1",
    "debian-13:1",
    "ubuntu-24.04:2",
    "rocky-9:3",
    "alpine-3.20:1",
    "fedora-41:1",
    "windows-2022:1",
    "windows-2025:1",
];

/// Picks an item by weight.
fn weighted<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let mut roll = rng.random_range(0..items.iter().map(|(_, w)| w).sum::<u32>());
    for &(item, w) in items {
        if roll < w {
            return item;
        }
        roll -= w;
    }
    unreachable!("roll below the total weight")
}

/// ((vCPUs, memory GiB, disk GiB), weight)
type Shapes = &'static [((u32, u64, u64), u32)];
const NODE_SHAPES: Shapes = &[
    ((16, 48, 500), 30),
    ((32, 96, 1000), 35),
    ((48, 160, 1500), 15),
    ((64, 256, 2000), 15),
    ((96, 512, 4000), 5),
];
const VM_SHAPES: Shapes = &[
    ((1, 1, 10), 20),
    ((2, 4, 20), 30),
    ((4, 8, 40), 25),
    ((8, 16, 80), 15),
    ((16, 32, 160), 7),
    ((32, 128, 500), 3),
];

fn shape(rng: &mut StdRng, shapes: Shapes) -> Resources {
    let (vcpus, memory, disk) = weighted(rng, shapes);
    Resources { vcpus, memory_mib: memory * GIB, disk_mib: disk * GIB }
}

fn datacenter(rng: &mut StdRng) -> &'static str {
    weighted(rng, &[("dc1", 5), ("dc2", 3), ("dc3", 2)])
}

fn grid_node(rng: &mut StdRng, i: usize) -> NodeInfo {
    let capacity = shape(rng, NODE_SHAPES);
    let kvm = rng.random_bool(0.7);
    let arch = if rng.random_bool(0.9) { "x86_64" } else { "aarch64" };
    let mut labels = BTreeMap::from([
        ("zone".to_owned(), ["a", "b", "c"][rng.random_range(0..3)].to_owned()),
        ("disk".to_owned(), if rng.random_bool(0.6) { "ssd" } else { "hdd" }.to_owned()),
    ]);
    if rng.random_bool(0.03) {
        labels.insert("gpu".into(), "nvidia".into());
    }
    // An aarch64 node runs the arm64 builds of the Linux images, an x86_64 node the rest.
    let images: BTreeSet<String> = match arch {
        "x86_64" => IMAGES.iter().map(|i| i.to_string()).collect(),
        _ => IMAGES[..IMAGES.len() - 2].iter().map(|i| i.replace(':', "-arm64:")).collect(),
    };
    let cached = images.iter().filter(|_| rng.random_bool(0.3)).cloned().collect();
    let mut licenses = BTreeSet::new();
    if rng.random_bool(0.1) {
        licenses.insert("windows-server".to_owned());
    }
    if rng.random_bool(0.03) {
        licenses.insert("oracle-db".to_owned());
    }
    let state =
        weighted(rng, &[(NodeState::Ready, 992), (NodeState::NotReady, 5), (NodeState::Unreachable, 3)]);
    NodeInfo {
        name: format!("node-{i:05}"),
        state,
        cordoned: rng.random_bool(0.01),
        dedicated: false,
        datacenter: datacenter(rng).to_owned(),
        labels,
        hypervisors: if kvm { vec!["kvm".into(), "qemu".into()] } else { vec!["qemu".into()] },
        arch: arch.to_owned(),
        capacity,
        overcommit_cpu: if kvm { 4.0 } else { 2.0 },
        overcommit_memory: if rng.random_bool(0.2) { 1.25 } else { 1.0 },
        allocated: Resources::default(),
        images,
        cached_images: cached,
        licenses,
        cpu_load: rng.random_range(0.0..1.0),
        groups: BTreeMap::new(),
        disk_jobs: 0,
        disk_slots: 2,
    }
}

fn grid_request(rng: &mut StdRng, i: usize) -> Request {
    let mut r = Request {
        vm: format!("vm-{i:06}"),
        resources: shape(rng, VM_SHAPES),
        image: IMAGES[rng.random_range(0..IMAGES.len() - 2)].to_owned(),
        ..Request::default()
    };
    if rng.random_bool(0.4) {
        r.datacenter = Some(datacenter(rng).to_owned());
    }
    if rng.random_bool(0.05) {
        r.arch = Some("aarch64".into());
        r.image = r.image.replace(':', "-arm64:");
    } else if rng.random_bool(0.05) {
        r.image = IMAGES[rng.random_range(IMAGES.len() - 2..IMAGES.len())].to_owned();
        r.licenses.insert("windows-server".into());
    }
    if rng.random_bool(0.1) {
        r.hypervisor = Some("kvm".into());
    }
    r.workload = weighted(rng, &[(None, 7), (Some(Workload::IoHeavy), 2), (Some(Workload::CpuHeavy), 1)]);
    if rng.random_bool(0.15) {
        r.selector.insert("disk".into(), "ssd".into());
    }
    if rng.random_bool(0.05) {
        r.selector.insert("zone".into(), ["a", "b", "c"][rng.random_range(0..3)].into());
    }
    if rng.random_bool(0.005) {
        r.selector.insert("gpu".into(), "nvidia".into());
    }
    if rng.random_bool(0.01) {
        r.licenses.insert("oracle-db".into());
    }
    if rng.random_bool(0.25) {
        r.spread_group = Some(format!("app-{}", rng.random_range(0..2500)));
    }
    r
}

/// How full the grid ended: (stranded MiB, free MiB, schedulable MiB) of memory after overcommit.
fn memory_left<'a>(nodes: impl Iterator<Item = &'a NodeInfo>, smallest: Resources) -> (u64, u64, u64) {
    let (mut stranded, mut free, mut total) = (0, 0, 0);
    for n in nodes.filter(|n| n.schedulable()) {
        let left = n.free();
        total += (n.capacity.memory_mib as f64 * n.overcommit_memory) as u64;
        free += left.memory_mib;
        if left.vcpus < smallest.vcpus
            || left.memory_mib < smallest.memory_mib
            || left.disk_mib < smallest.disk_mib
        {
            stranded += left.memory_mib;
        }
    }
    (stranded, free, total)
}

struct Run {
    name: &'static str,
    seconds: f64,
    decisions: usize,
    unschedulable: usize,
    /// Stranded and free memory, shares of schedulable memory.
    stranded: f64,
    free: f64,
}

impl Run {
    fn new<'a>(
        name: &'static str,
        started: Instant,
        outcomes: &[bool],
        nodes: impl Iterator<Item = &'a NodeInfo>,
        smallest: Resources,
    ) -> Run {
        let seconds = started.elapsed().as_secs_f64();
        let (stranded, free, total) = memory_left(nodes, smallest);
        Run {
            name,
            seconds,
            decisions: outcomes.len(),
            unschedulable: outcomes.iter().filter(|ok| !**ok).count(),
            stranded: stranded as f64 / total as f64,
            free: free as f64 / total as f64,
        }
    }

    fn print(&self, timed: bool) {
        let rate =
            if timed { format!("{:.0}", self.decisions as f64 / self.seconds) } else { "-".to_owned() };
        println!(
            "{:<32} {:>8.2} {:>12} {:>8} {:>14} {:>8.2}% {:>6.1}%",
            self.name,
            self.seconds,
            rate,
            self.decisions - self.unschedulable,
            self.unschedulable,
            100.0 * self.stranded,
            100.0 * self.free
        );
    }
}

/// Seconds this thread has spent on a CPU (the first field of /proc/thread-self/schedstat, in ns): on a
/// shared machine, the rate per on-CPU second says what a core would do alone.
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(f64::NAN) / 1e9
}

/// What a sequential run spent where.
#[derive(Default)]
struct Effort {
    /// On-CPU seconds of the deciding thread.
    cpu: f64,
    /// Nodes filtered, over all placements.
    considered: usize,
    /// Placements found only by the scan of every node.
    full_scans: usize,
    /// Seconds spent on the requests that found no node (each a full scan plus the per-node reasons).
    refusing: f64,
}

/// Places every request in order with `decide`, reserving each placement.
fn sequential(
    name: &'static str,
    nodes: &[NodeInfo],
    requests: &[Request],
    smallest: Resources,
    decide: fn(&Snapshot, &Request) -> Result<Placement, Unschedulable>,
) -> (Run, Effort) {
    let mut s = Snapshot::new(nodes.to_vec());
    let mut effort = Effort::default();
    let cpu_before = thread_cpu_seconds();
    let started = Instant::now();
    let outcomes: Vec<bool> = requests
        .iter()
        .map(|r| {
            let asked = Instant::now();
            match decide(&s, r) {
                Ok(p) => {
                    s.reserve(&p.node, r);
                    effort.considered += p.considered;
                    effort.full_scans += usize::from(p.considered == s.len());
                    true
                }
                Err(_) => {
                    effort.refusing += asked.elapsed().as_secs_f64();
                    false
                }
            }
        })
        .collect();
    effort.cpu = thread_cpu_seconds() - cpu_before;
    (Run::new(name, started, &outcomes, s.nodes(), smallest), effort)
}

const RESERVATIONS: TableDefinition<&str, (&str, u32, u64, u64)> = TableDefinition::new("reservations");

/// Each batch in one durable (fsynced) redb write transaction: vm -> (node, vCPUs, memory MiB, disk MiB).
struct RedbSink {
    db: Database,
    commits: usize,
    /// Seconds inside `commit`.
    busy: f64,
}

impl ReservationSink for RedbSink {
    type Error = redb::Error;

    fn commit(&mut self, batch: &[Reservation]) -> Result<(), redb::Error> {
        let started = Instant::now();
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(RESERVATIONS)?;
            for r in batch {
                let res = r.resources;
                table.insert(r.vm.as_str(), (r.node.as_str(), res.vcpus, res.memory_mib, res.disk_mib))?;
            }
        }
        txn.commit()?;
        self.commits += 1;
        self.busy += started.elapsed().as_secs_f64();
        Ok(())
    }
}

/// Each batch through the coordinator's etcd store: one VM record per reservation, in transactions of at
/// most the store's max_txn_ops records (the committer's batching), each fenced by an election key.
struct EtcdSink {
    store: std::sync::Arc<EtcdStore>,
    commits: usize,
    busy: f64,
}

impl ReservationSink for EtcdSink {
    type Error = StoreError;

    fn commit(&mut self, batch: &[Reservation]) -> Result<(), StoreError> {
        let started = Instant::now();
        let max = self.store.max_changes().unwrap_or(usize::MAX);
        for chunk in batch.chunks(max) {
            let changes: Vec<Change> = chunk
                .iter()
                .map(|r| {
                    let res = r.resources;
                    Change::PutVm(Vm {
                        name: r.vm.clone(),
                        node: r.node.clone(),
                        resources: Some(gridforge_proto::v1::Resources {
                            vcpus: res.vcpus,
                            memory_mib: res.memory_mib,
                            disk_mib: res.disk_mib,
                        }),
                        ..Default::default()
                    })
                })
                .collect();
            self.store.commit(&changes)?;
            self.commits += 1;
        }
        self.busy += started.elapsed().as_secs_f64();
        Ok(())
    }
}

/// The coordinator's etcd store on `url` under a fresh prefix, fenced as a leader's: the runtime it runs on.
fn etcd_store(url: &str, round: usize) -> (tokio::runtime::Runtime, std::sync::Arc<EtcdStore>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let prefix = format!("/bench-schedule/{}-{round}", std::process::id());
    let store = rt.block_on(async {
        let store = EtcdStore::connect(&[url.to_string()], &prefix, Duration::from_secs(30), ETCD_TXN_OPS)
            .await
            .unwrap_or_else(|e| panic!("etcd at {url}: {e}"));
        let mut client = store.client();
        let key = format!("{prefix}/election/bench");
        let put = client.put(key.clone(), "bench", None).await.expect("the election key");
        let revision = put.header().map_or(0, |h| h.revision());
        store.set_fence(Some(Fence { key: key.into_bytes(), revision }));
        store
    });
    (rt, std::sync::Arc::new(store))
}

/// Records per etcd transaction: the `--max-txn-ops` bench/schedule starts etcd with.
const ETCD_TXN_OPS: usize = 1024;

struct Durable {
    run: Run,
    commits: usize,
    committing: f64,
    stored: u64,
    p50: Duration,
    p99: Duration,
}

/// Where the durable run writes.
enum Sink {
    Redb(PathBuf),
    Etcd(String, usize),
}

fn durable(sink: Sink, nodes: &[NodeInfo], requests: &[Request], smallest: Resources) -> Durable {
    match sink {
        Sink::Redb(path) => {
            let _ = std::fs::remove_file(&path);
            let db = Database::create(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
            let (run, sink, answers) = durable_with(
                "indexed + redb group commit",
                RedbSink { db, commits: 0, busy: 0.0 },
                nodes,
                requests,
                smallest,
            );
            let read = sink.db.begin_read().expect("a read transaction");
            let table = read.open_table(RESERVATIONS).expect("the reservations table");
            let stored = table.iter().expect("reading reservations").count() as u64;
            durable_result(run, sink.commits, sink.busy, stored, answers)
        }
        Sink::Etcd(url, round) => {
            let (_rt, store) = etcd_store(&url, round);
            let sink = EtcdSink { store: store.clone(), commits: 0, busy: 0.0 };
            let (run, sink, answers) =
                durable_with("indexed + etcd group commit", sink, nodes, requests, smallest);
            let stored = store.load().expect("reading back from etcd").vms.len() as u64;
            durable_result(run, sink.commits, sink.busy, stored, answers)
        }
    }
}

fn durable_result(
    run: Run,
    commits: usize,
    committing: f64,
    stored: u64,
    answers: Vec<(bool, Duration)>,
) -> Durable {
    let mut latencies: Vec<Duration> = answers.iter().map(|(_, t)| *t).collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Durable { run, commits, committing, stored, p50: at(0.5), p99: at(0.99) }
}

fn durable_with<S: ReservationSink + Send + 'static>(
    name: &'static str,
    sink: S,
    nodes: &[NodeInfo],
    requests: &[Request],
    smallest: Resources,
) -> (Run, S, Vec<(bool, Duration)>)
where
    S::Error: std::fmt::Display,
{
    let (snapshot, requests) = (Snapshot::new(nodes.to_vec()), requests.to_vec());
    let started = Instant::now();
    let (handle, applier) = spawn_applier(snapshot, sink);
    let (done_tx, done) = mpsc::channel::<(bool, Duration)>();
    let mut answers = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        if i >= WINDOW {
            answers.push(done.recv().expect("an answer"));
        }
        let (done_tx, submitted) = (done_tx.clone(), Instant::now());
        handle.place(r, Box::new(move |outcome| _ = done_tx.send((outcome.is_ok(), submitted.elapsed()))));
    }
    drop((handle, done_tx));
    answers.extend(done.iter());
    let (snapshot, sink) = applier.join().expect("the applier thread");
    let outcomes: Vec<bool> = answers.iter().map(|(ok, _)| *ok).collect();
    (Run::new(name, started, &outcomes, snapshot.nodes(), smallest), sink, answers)
}

/// Maximum free memory over ranges of nodes, to find the first node with enough in O(log n).
struct MaxTree {
    size: usize,
    max: Vec<u64>,
}

impl MaxTree {
    fn new(values: impl ExactSizeIterator<Item = u64>) -> MaxTree {
        let size = values.len().next_power_of_two();
        let mut t = MaxTree { size, max: vec![0; 2 * size] };
        for (i, v) in values.enumerate() {
            t.max[size + i] = v;
        }
        for k in (1..size).rev() {
            t.max[k] = t.max[2 * k].max(t.max[2 * k + 1]);
        }
        t
    }

    fn set(&mut self, i: usize, v: u64) {
        let mut k = self.size + i;
        self.max[k] = v;
        while k > 1 {
            k /= 2;
            self.max[k] = self.max[2 * k].max(self.max[2 * k + 1]);
        }
    }

    /// The first index at or after `from` whose value is at least `need`.
    fn first(&self, from: usize, need: u64) -> Option<usize> {
        self.find(1, 0, self.size, from, need)
    }

    fn find(&self, k: usize, lo: usize, hi: usize, from: usize, need: u64) -> Option<usize> {
        if hi <= from || self.max[k] < need {
            return None;
        }
        if hi - lo == 1 {
            return Some(lo);
        }
        let mid = (lo + hi) / 2;
        self.find(2 * k, lo, mid, from, need).or_else(|| self.find(2 * k + 1, mid, hi, from, need))
    }
}

fn first_fit_decreasing(nodes: &[NodeInfo], requests: &[Request], smallest: Resources) -> Run {
    let mut nodes = nodes.to_vec();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let started = Instant::now();
    let mut order: Vec<&Request> = requests.iter().collect();
    order.sort_by_key(|r| {
        std::cmp::Reverse((r.resources.memory_mib, r.resources.vcpus, r.resources.disk_mib))
    });
    let free = |n: &NodeInfo| if n.schedulable() { n.free().memory_mib } else { 0 };
    let mut tree = MaxTree::new(nodes.iter().map(free));
    let outcomes: Vec<bool> = order
        .into_iter()
        .map(|r| {
            let mut from = 0;
            while let Some(i) = tree.first(from, r.resources.memory_mib.max(1)) {
                if filter(&nodes[i], r).is_ok() {
                    nodes[i].allocated += r.resources;
                    tree.set(i, free(&nodes[i]));
                    return true;
                }
                from = i + 1;
            }
            false
        })
        .collect();
    Run::new("first-fit decreasing (offline)", started, &outcomes, nodes.iter(), smallest)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: schedule_bench DIR [NODES [VMS [ROUNDS]]]"));
    let node_count: usize = args.next().map_or(10_000, |a| a.parse().expect("NODES: a number"));
    let vm_count: usize = args.next().map_or(100_000, |a| a.parse().expect("VMS: a number"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("ROUNDS: a number"));
    let mut fastest = f64::INFINITY;
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));

    let mut rng = StdRng::seed_from_u64(2024);
    let nodes: Vec<NodeInfo> = (0..node_count).map(|i| grid_node(&mut rng, i)).collect();
    let requests: Vec<Request> = (0..vm_count).map(|i| grid_request(&mut rng, i)).collect();
    let smallest =
        requests.iter().map(|r| r.resources).min_by_key(|r| (r.memory_mib, r.vcpus, r.disk_mib)).unwrap();
    let (_, _, schedulable) = memory_left(nodes.iter(), smallest);
    let demand: u64 = requests.iter().map(|r| r.resources.memory_mib).sum();
    let kvm = nodes.iter().filter(|n| n.hypervisors.iter().any(|h| h == "kvm")).count();
    let ready = nodes.iter().filter(|n| n.schedulable()).count();
    println!(
        "grid: {node_count} nodes ({ready} schedulable, {kvm} kvm+qemu, the rest qemu only; 3 datacenters, 2 arches), \
         {vm_count} VMs asking {:.0}% of schedulable memory",
        100.0 * demand as f64 / schedulable as f64
    );
    println!(
        "{:<32} {:>8} {:>12} {:>8} {:>14} {:>9} {:>7}",
        "placement", "seconds", "decisions/s", "placed", "unschedulable", "stranded", "free"
    );
    let etcd = std::env::var("GRIDFORGE_BENCH_ETCD").ok().filter(|u| !u.is_empty());
    for round in 0..rounds {
        let (indexed, effort) = sequential("indexed (place + reserve)", &nodes, &requests, smallest, place);
        indexed.print(true);
        let d = durable(Sink::Redb(dir.join("reservations.redb")), &nodes, &requests, smallest);
        d.run.print(true);
        let placed = d.run.decisions - d.run.unschedulable;
        assert_eq!(d.stored, placed as u64, "every durable placement is in the store");
        assert_eq!(d.run.unschedulable, indexed.unschedulable, "the applier decides as place does");
        if let Some(url) = &etcd {
            let e = durable(Sink::Etcd(url.clone(), round), &nodes, &requests, smallest);
            e.run.print(true);
            let placed = e.run.decisions - e.run.unschedulable;
            assert_eq!(e.stored, placed as u64, "every durable placement is in etcd");
            println!(
                "  etcd: {placed} reservations in {} transactions ({:.0} per transaction, at most {ETCD_TXN_OPS}; \
                 {:.2} s committing); answered after commit p50 {:.1} ms, p99 {:.1} ms; {:.2}x redb's placements/s",
                e.commits,
                placed as f64 / e.commits as f64,
                e.committing,
                e.p50.as_secs_f64() * 1e3,
                e.p99.as_secs_f64() * 1e3,
                d.run.seconds / e.run.seconds
            );
        }
        println!(
            "  indexed: {:.0} decisions per on-CPU second ({:.2} s on CPU); {:.1} nodes filtered per placement, {} \
             placements by full scan; {:.2} s of {:.2} s on the {} unschedulable (full scan + per-node reasons)",
            indexed.decisions as f64 / effort.cpu,
            effort.cpu,
            effort.considered as f64 / (indexed.decisions - indexed.unschedulable) as f64,
            effort.full_scans,
            effort.refusing,
            indexed.seconds,
            indexed.unschedulable,
        );
        println!(
            "  durable: {placed} reservations in {} redb commits ({:.0} per commit, {:.2} s committing, \
             overlapped with deciding; {WINDOW} requests in flight); answered after commit p50 {:.1} ms, p99 {:.1} ms",
            d.commits,
            placed as f64 / d.commits as f64,
            d.committing,
            d.p50.as_secs_f64() * 1e3,
            d.p99.as_secs_f64() * 1e3
        );
        fastest = fastest.min(indexed.seconds);
    }
    first_fit_decreasing(&nodes, &requests, smallest).print(false);
    let (full, _) = sequential("full scan (place_exhaustive)", &nodes, &requests, smallest, place_exhaustive);
    full.print(true);
    println!("indexed (fastest round) vs full scan: {:.1}x the decisions/s", full.seconds / fastest);
}
