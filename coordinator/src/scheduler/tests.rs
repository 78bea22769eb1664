use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

const IMAGE: &str = "debian-12:1";

/// A Ready kvm node in dc1 with `memory_mib` of memory, 8 vCPUs and 100 GiB of pool, no overcommit.
fn node(name: &str, memory_mib: u64) -> NodeInfo {
    NodeInfo {
        name: name.to_owned(),
        state: NodeState::Ready,
        cordoned: false,
        dedicated: false,
        datacenter: "dc1".to_owned(),
        labels: BTreeMap::new(),
        hypervisors: vec!["kvm".to_owned()],
        arch: "x86_64".to_owned(),
        capacity: Resources { vcpus: 8, memory_mib, disk_mib: 100 * 1024 },
        overcommit_cpu: 1.0,
        overcommit_memory: 1.0,
        allocated: Resources::default(),
        images: BTreeSet::from([IMAGE.to_owned()]),
        cached_images: BTreeSet::new(),
        licenses: BTreeSet::new(),
        cpu_load: 0.0,
        groups: BTreeMap::new(),
        disk_jobs: 0,
        disk_slots: 2,
    }
}

fn request(memory_mib: u64) -> Request {
    Request {
        vm: "vm".to_owned(),
        resources: Resources { vcpus: 1, memory_mib, disk_mib: 1024 },
        image: IMAGE.to_owned(),
        ..Request::default()
    }
}

fn chosen(s: &Snapshot, r: &Request) -> String {
    place(s, r).unwrap_or_else(|u| panic!("{}: {u}", r.vm)).node
}

#[test]
fn best_fit_takes_the_tightest_node() {
    // The design's example: 90 MiB goes to the node with 100 MiB free, not the one with 512 MiB.
    let s = Snapshot::new(vec![node("roomy", 512), node("tight", 100)]);
    let p = place(&s, &request(90)).unwrap();
    assert_eq!(p.node, "tight");
    assert!((p.scores.fit - 0.9).abs() < 1e-9, "{p:?}");
    // The same when the free memory comes from allocations on nodes of equal size.
    let mut a = node("a", 4096);
    a.allocated.memory_mib = 4096 - 512;
    let mut b = node("b", 4096);
    b.allocated.memory_mib = 4096 - 100;
    assert_eq!(chosen(&Snapshot::new(vec![a, b]), &request(90)), "b");
}

#[test]
fn a_node_with_a_free_disk_slot_beats_a_tighter_fit_without_one() {
    let mut tight = node("tight", 100);
    tight.disk_jobs = 2;
    let s = Snapshot::new(vec![node("roomy", 512), tight.clone()]);
    let p = place(&s, &request(90)).unwrap();
    assert_eq!(p.node, "roomy", "the tight node's two slots are taken: {p:?}");
    assert_eq!(p.scores.slot, 1.0);
    tight.disk_jobs = 1;
    let s = Snapshot::new(vec![node("roomy", 512), tight]);
    assert_eq!(chosen(&s, &request(90)), "tight", "one slot free: best fit again");
}

#[test]
fn the_walk_goes_past_busy_nodes_to_one_that_can_start_now() {
    // More busy tight fits than a decision scores; the one idle node fits loosest of all.
    let mut nodes: Vec<NodeInfo> = (0..CANDIDATES + 4)
        .map(|i| {
            let mut n = node(&format!("busy-{i:02}"), 1000 + i as u64);
            n.disk_jobs = 2;
            n
        })
        .collect();
    nodes.push(node("idle", 4096));
    let mut s = Snapshot::new(nodes);
    assert_eq!(chosen(&s, &request(900)), "idle");
    assert_eq!(chosen(&s, &request(900)), place_exhaustive(&s, &request(900)).unwrap().node);
    // Once it is busy too, best fit among the busy decides.
    s.set_disk_jobs("idle", 2);
    assert_eq!(chosen(&s, &request(900)), "busy-00");
}

#[test]
fn each_filter_says_why() {
    type Change = fn(&mut NodeInfo, &mut Request);
    let cases: &[(Change, &str)] = &[
        (|n, _| n.state = NodeState::NotReady, "not ready"),
        (|n, _| n.state = NodeState::Unreachable, "unreachable"),
        (|n, _| n.cordoned = true, "cordoned"),
        (|n, r| _ = r.exclude.insert(n.name.clone()), "excluded by the request"),
        (|_, r| r.datacenter = Some("dc2".into()), "in datacenter dc1, not dc2"),
        (|_, r| r.node = Some("n2".into()), "not the requested node n2"),
        (|_, r| drop(r.selector.insert("disk".into(), "ssd".into())), "no label disk (want disk=ssd)"),
        (
            |n, r| {
                n.labels.insert("disk".into(), "hdd".into());
                r.selector.insert("disk".into(), "ssd".into());
            },
            "label disk=hdd, not ssd",
        ),
        (|_, r| r.hypervisor = Some("xen".into()), "no xen hypervisor (has kvm)"),
        (|_, r| r.arch = Some("aarch64".into()), "arch x86_64, not aarch64"),
        (|_, r| r.resources.vcpus = 9, "insufficient vCPUs (need 9, free 8)"),
        (|_, r| r.resources.memory_mib = 5000, "insufficient memory (need 5000 MiB, free 4096)"),
        (|_, r| r.resources.disk_mib = 200 * 1024, "insufficient disk (need 204800 MiB, free 102400)"),
        (|_, r| r.image = "alpine:3".into(), "image alpine:3 not reachable"),
        (|_, r| r.layers = vec![IMAGE.into(), "app:2".into()], "image app:2 not reachable"),
        (
            |n, r| {
                n.licenses.insert("sap".into());
                r.licenses = BTreeSet::from(["sap".into(), "oracle".into(), "windows".into()]);
            },
            "missing licenses oracle, windows",
        ),
    ];
    for (change, want) in cases {
        let (mut n, mut r) = (node("n1", 4096), request(1024));
        change(&mut n, &mut r);
        let refusal = filter(&n, &r).expect_err(want);
        assert_eq!(refusal.to_string(), *want);
        let u = place(&Snapshot::new(vec![n]), &r).expect_err(want);
        assert_eq!(u.reasons[0].1, refusal);
    }
    assert!(filter(&node("n1", 4096), &request(1024)).is_ok());
}

#[test]
fn unschedulable_summary_counts_reasons() {
    let mut cordoned = node("c", 8192);
    cordoned.cordoned = true;
    let s = Snapshot::new(vec![node("a", 1024), node("b", 2048), cordoned]);
    let u = place(&s, &request(4096)).unwrap_err();
    assert_eq!(u.to_string(), "3 nodes: 2 insufficient memory (need 4096 MiB, max free 2048), 1 cordoned");
    assert_eq!(u.nodes_total, 3);
    assert_eq!(place(&Snapshot::new(vec![]), &request(1)).unwrap_err().to_string(), "no nodes in the grid");
    let one = Snapshot::new(vec![node("a", 1024)]);
    assert_eq!(
        place(&one, &request(4096)).unwrap_err().to_string(),
        "1 node: 1 insufficient memory (need 4096 MiB, max free 1024)"
    );
}

#[test]
fn a_full_pinned_node_is_named() {
    let s = Snapshot::new(vec![node("a", 8192), node("b", 8192), node("pinned", 1024)]);
    let r = Request { node: Some("pinned".into()), ..request(4096) };
    assert_eq!(
        place(&s, &r).unwrap_err().to_string(),
        "requested node pinned: insufficient memory (need 4096 MiB, free 1024); \
         3 nodes: 2 not the requested node, 1 insufficient memory (need 4096 MiB, max free 1024)"
    );
    let r = Request { node: Some("gone".into()), ..request(4096) };
    assert_eq!(
        place(&s, &r).unwrap_err().to_string(),
        "requested node gone is not in the grid; 3 nodes: 3 not the requested node"
    );
    let r = Request { node: Some("b".into()), ..request(4096) };
    let p = place(&s, &r).unwrap();
    assert_eq!((p.node.as_str(), p.considered), ("b", 1));
}

#[test]
fn excluded_node_is_never_used() {
    let s = Snapshot::new(vec![node("source", 2048), node("other", 8192)]);
    let r = Request { exclude: BTreeSet::from(["source".into()]), ..request(1024) };
    assert_eq!(chosen(&s, &r), "other");
    let r = Request { exclude: BTreeSet::from(["source".into(), "other".into()]), ..request(1024) };
    assert_eq!(place(&s, &r).unwrap_err().to_string(), "2 nodes: 2 excluded by the request");
}

#[test]
fn spread_group_goes_to_the_emptiest_node_before_the_tightest() {
    let mut s = Snapshot::new(vec![node("a", 4096), node("b", 8192), node("c", 16384)]);
    let mut placed = Vec::new();
    for i in 0..6 {
        let r = Request { vm: format!("web-{i}"), spread_group: Some("web".into()), ..request(512) };
        let node = chosen(&s, &r);
        s.reserve(&node, &r);
        placed.push(node);
    }
    // Each round of three fills a, b, c in best-fit order.
    assert_eq!(placed, ["a", "b", "c", "a", "b", "c"]);
    for name in ["a", "b", "c"] {
        assert_eq!(s.node(name).unwrap().group_count("web"), 2);
    }
    // Without the group, best fit stacks everything on the tightest node.
    let r = request(512);
    assert_eq!(chosen(&s, &r), "a");
    // A node of another group does not count.
    let r = Request { spread_group: Some("db".into()), ..request(512) };
    assert_eq!(chosen(&s, &r), "a");
    // Releases count down: b now has the fewest.
    s.release("b", &request(512).resources, Some("web"));
    let r = Request { spread_group: Some("web".into()), ..request(512) };
    assert_eq!(chosen(&s, &r), "b");
}

#[test]
fn spread_falls_back_to_the_least_populated_level_that_fits() {
    let mut a = node("a", 4096);
    a.groups.insert("web".into(), 1);
    let mut b = node("b", 4096);
    b.groups.insert("web".into(), 3);
    let mut c = node("c", 512);
    c.groups.insert("web".into(), 2);
    let s = Snapshot::new(vec![a, b, c, node("tiny", 256)]);
    let r = Request { spread_group: Some("web".into()), ..request(1024) };
    // tiny has no member but cannot fit; a has fewer members than b.
    let p = place(&s, &r).unwrap();
    assert_eq!(p.node, "a");
    assert_eq!(p.scores.spread, 1.0);
    let e = explain(&s, &r);
    assert_eq!(e.chosen.as_deref(), Some("a"));
    let b_scores = e.nodes.iter().find(|v| v.name == "b").unwrap().verdict.clone().unwrap();
    assert_eq!(b_scores.spread, 1.0 / 3.0);
}

#[test]
fn spread_looks_past_a_long_run_of_unfit_nodes() {
    // More member-free nodes than one walk reads fit in memory but have no disk left; past them is one that
    // fits, and a tighter fit already holds a member.
    let mut nodes: Vec<NodeInfo> = (0..VISITS_PER_CLASS + 8)
        .map(|i| {
            let mut n = node(&format!("full-{i:02}"), 2048);
            n.allocated.disk_mib = n.capacity.disk_mib;
            n
        })
        .collect();
    let mut member = node("member", 1024);
    member.groups.insert("web".into(), 1);
    nodes.extend([member, node("roomy", 8192)]);
    let s = Snapshot::new(nodes);
    let r = Request { spread_group: Some("web".into()), ..request(1024) };
    assert_eq!(chosen(&s, &r), "roomy");
    assert_eq!(place_exhaustive(&s, &r).unwrap().node, "roomy");
}

#[test]
fn a_long_run_of_vcpu_full_tight_fits_is_read_past_without_a_full_scan() {
    // Best fit leaves nodes whose vCPUs ran out before their memory at the tight end of the index; past more of
    // them than one walk reads is one that fits. Nodes too small to fit are never read.
    let mut nodes: Vec<NodeInfo> = (0..VISITS_PER_CLASS + 8)
        .map(|i| {
            let mut n = node(&format!("cpu-full-{i:02}"), 2048);
            n.allocated.vcpus = n.capacity.vcpus;
            n
        })
        .collect();
    nodes.extend((0..50).map(|i| node(&format!("small-{i:02}"), 512)));
    nodes.push(node("roomy", 8192));
    let s = Snapshot::new(nodes);
    let p = place(&s, &request(1024)).unwrap();
    assert_eq!(p.node, "roomy");
    // The first walk's nodes, then the class to its end: the fitting nodes only, never the small ones.
    assert_eq!(p.considered, VISITS_PER_CLASS + (VISITS_PER_CLASS + 8 + 1), "of {}: {p:?}", s.len());
}

#[test]
fn overcommit_counts_against_scaled_capacity() {
    let mut n = node("n", 4096);
    n.capacity.vcpus = 4;
    n.overcommit_cpu = 2.0;
    n.overcommit_memory = 1.5;
    let mut s = Snapshot::new(vec![n]);
    let r = Request { resources: Resources { vcpus: 1, memory_mib: 768, disk_mib: 0 }, ..request(0) };
    for _ in 0..8 {
        let p = place(&s, &r).unwrap();
        s.reserve(&p.node, &r);
    }
    assert_eq!(s.node("n").unwrap().free(), Resources { vcpus: 0, memory_mib: 0, disk_mib: 100 * 1024 });
    assert_eq!(place(&s, &r).unwrap_err().to_string(), "1 node: 1 insufficient vCPUs (need 1, max free 0)");
}

#[test]
fn hypervisor_preference_image_and_load_break_ties() {
    let mut qemu = node("qemu", 1024);
    qemu.hypervisors = vec!["qemu".into()];
    let kvm = node("kvm", 2048);
    let s = Snapshot::new(vec![qemu, kvm]);
    assert_eq!(chosen(&s, &request(512)), "qemu");
    let io = Request { workload: Some(Workload::IoHeavy), ..request(512) };
    assert_eq!(chosen(&s, &io), "kvm");
    let general = Request { workload: Some(Workload::General), ..request(512) };
    assert_eq!(chosen(&s, &general), "qemu");

    let mut cached = node("cached", 4096);
    cached.cached_images.insert(IMAGE.into());
    let s = Snapshot::new(vec![node("plain", 3500), cached]);
    assert_eq!(chosen(&s, &request(2048)), "cached");

    let mut busy = node("a-busy", 4096);
    busy.cpu_load = 0.9;
    let mut idle = node("b-idle", 4096);
    idle.cpu_load = 0.1;
    let s = Snapshot::new(vec![busy, idle]);
    assert_eq!(chosen(&s, &request(1024)), "b-idle");
    // Equal in everything: the first name.
    let s = Snapshot::new(vec![node("y", 4096), node("x", 4096)]);
    assert_eq!(chosen(&s, &request(1024)), "x");
}

#[test]
fn rare_selector_reads_only_the_labelled_nodes() {
    let mut nodes: Vec<NodeInfo> = (0..200).map(|i| node(&format!("n{i:03}"), 4096)).collect();
    for n in nodes.iter_mut().step_by(50) {
        n.labels.insert("gpu".into(), "nvidia".into());
        n.capacity.memory_mib = 16384;
    }
    let s = Snapshot::new(nodes);
    let r = Request { selector: BTreeMap::from([("gpu".into(), "nvidia".into())]), ..request(8192) };
    let p = place(&s, &r).unwrap();
    assert_eq!((p.node.as_str(), p.considered), ("n000", 4));
    let r = Request { selector: BTreeMap::from([("gpu".into(), "amd".into())]), ..request(1024) };
    assert_eq!(place(&s, &r).unwrap_err().to_string(), "200 nodes: 200 without label gpu=amd");
}

#[test]
fn reservations_in_sequence_never_exceed_capacity() {
    let mut rng = StdRng::seed_from_u64(7);
    let nodes = (0..20).map(|i| node(&format!("n{i}"), rng.random_range(1..=16) * 1024)).collect();
    let mut s = Snapshot::new(nodes);
    let mut placed = 0;
    for i in 0..400 {
        let r = Request {
            vm: format!("vm{i}"),
            resources: Resources {
                vcpus: rng.random_range(1..=4),
                memory_mib: rng.random_range(1..=8) * 256,
                disk_mib: rng.random_range(1..=20) * 1024,
            },
            ..request(0)
        };
        if let Ok(p) = place(&s, &r) {
            s.reserve(&p.node, &r);
            placed += 1;
        }
    }
    assert!(placed > 20, "{placed}");
    for n in s.nodes() {
        let (a, c) = (n.allocated, n.capacity);
        assert!(a.vcpus <= c.vcpus && a.memory_mib <= c.memory_mib && a.disk_mib <= c.disk_mib, "{n:?}");
    }
}

/// A random node of a small, varied grid: several datacenters, kinds, arches, labels, states and loads.
fn random_node(rng: &mut StdRng, name: String) -> NodeInfo {
    let mut n = node(&name, rng.random_range(1..=32) * 512);
    n.datacenter = ["dc1", "dc2", "dc3"][rng.random_range(0..3)].into();
    n.hypervisors = [vec!["kvm".to_owned()], vec!["qemu".to_owned()], vec!["kvm".into(), "qemu".into()]]
        [rng.random_range(0..3)]
    .clone();
    n.arch = if rng.random_bool(0.8) { "x86_64" } else { "aarch64" }.into();
    n.capacity.vcpus = rng.random_range(1..=16);
    n.overcommit_cpu = [1.0, 2.0, 4.0][rng.random_range(0..3)];
    n.overcommit_memory = [1.0, 1.25][rng.random_range(0..2)];
    n.state =
        [NodeState::Ready, NodeState::Ready, NodeState::Ready, NodeState::NotReady, NodeState::Unreachable]
            [rng.random_range(0..5)];
    n.cordoned = rng.random_bool(0.1);
    if rng.random_bool(0.5) {
        n.labels.insert("disk".into(), if rng.random_bool(0.5) { "ssd" } else { "hdd" }.into());
    }
    if rng.random_bool(0.3) {
        n.cached_images.insert(IMAGE.into());
    }
    if rng.random_bool(0.2) {
        n.images.insert("alpine:3".into());
    }
    if rng.random_bool(0.2) {
        n.licenses.insert("windows".into());
    }
    n.cpu_load = rng.random_range(0.0..1.0);
    n
}

fn random_request(rng: &mut StdRng, nodes: &[String], i: usize) -> Request {
    let pick = |rng: &mut StdRng, p: f64, options: &[&str]| {
        rng.random_bool(p).then(|| options[rng.random_range(0..options.len())].to_owned())
    };
    let mut r = request(rng.random_range(1..=16) * 256);
    r.vm = format!("vm{i}");
    r.resources.vcpus = rng.random_range(1..=8);
    r.datacenter = pick(rng, 0.3, &["dc1", "dc2", "dc3", "dc9"]);
    r.hypervisor = pick(rng, 0.2, &["kvm", "qemu"]);
    r.arch = pick(rng, 0.2, &["x86_64", "aarch64"]);
    r.spread_group = pick(rng, 0.4, &["web", "db", "cache"]);
    r.workload = [None, Some(Workload::IoHeavy), Some(Workload::CpuHeavy)][rng.random_range(0..3)];
    if let Some(disk) = pick(rng, 0.2, &["ssd", "hdd"]) {
        r.selector.insert("disk".into(), disk);
    }
    if rng.random_bool(0.1) {
        r.image = "alpine:3".into();
    }
    if rng.random_bool(0.1) {
        r.licenses.insert("windows".into());
    }
    if rng.random_bool(0.05) {
        r.node = Some(nodes[rng.random_range(0..nodes.len())].clone());
    }
    if rng.random_bool(0.1) {
        r.exclude.insert(nodes[rng.random_range(0..nodes.len())].clone());
    }
    r
}

/// Seeds of the randomized check below: fixed, so a run decides the same every time. Others can be tried with
/// `SCHED_SEEDS=first..end` (e.g. `SCHED_SEEDS=0..1000`); a failure names its seed.
const SEEDS: std::ops::Range<u64> = 0..8;

#[test]
fn index_agrees_with_a_full_scan_through_changes() {
    let seeds = std::env::var("SCHED_SEEDS").ok().and_then(|v| {
        let (first, end) = v.split_once("..")?;
        Some(first.parse().ok()?..end.parse().ok()?)
    });
    for seed in seeds.unwrap_or(SEEDS) {
        if let Err(panic) = std::panic::catch_unwind(|| index_agrees_through_changes(seed)) {
            eprintln!("index_agrees_with_a_full_scan_through_changes failed with seed {seed}");
            std::panic::resume_unwind(panic);
        }
    }
}

/// One randomized run: if a brute-force scan finds a feasible node, `place` finds one too, through upserts,
/// removals, reservations and releases, and the kept index equals one rebuilt from scratch.
fn index_agrees_through_changes(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = (0..60).map(|i| format!("n{i:02}")).collect();
    let mut s = Snapshot::new(names.iter().map(|name| random_node(&mut rng, name.clone())).collect());
    // Placed VMs, to release later: (node, request).
    let mut live: Vec<(String, Request)> = Vec::new();
    let (mut found, mut refused) = (0, 0);
    for i in 0..1500 {
        match rng.random_range(0..10) {
            0 => {
                // A poll or state change: a fresh node keeps the allocation and groups it had.
                let name = &names[rng.random_range(0..names.len())];
                let mut n = random_node(&mut rng, name.clone());
                if let Some(old) = s.node(name) {
                    (n.allocated, n.groups) = (old.allocated, old.groups.clone());
                } else {
                    live.retain(|(node, _)| node != name);
                }
                s.upsert_node(n);
            }
            1 if rng.random_bool(0.2) => {
                let name = &names[rng.random_range(0..names.len())];
                s.remove_node(name);
                live.retain(|(node, _)| node != name);
            }
            2 | 3 if !live.is_empty() => {
                let (node, r) = live.swap_remove(rng.random_range(0..live.len()));
                s.release(&node, &r.resources, r.spread_group.as_deref());
            }
            _ => {
                let r = random_request(&mut rng, &names, i);
                let fast = place(&s, &r);
                let full = place_exhaustive(&s, &r);
                assert_eq!(
                    fast.is_ok(),
                    full.is_ok(),
                    "seed {seed} step {i}: {r:?}\nindexed {fast:?}\nfull scan {full:?}"
                );
                // A snapshot rebuilt from scratch must decide exactly as the one kept up to date.
                let fresh = Snapshot::new(s.nodes().cloned().collect());
                assert_eq!(s.index_digest(), fresh.index_digest(), "seed {seed} step {i}");
                assert_eq!(
                    place(&fresh, &r).map(|p| p.node).ok(),
                    fast.as_ref().map(|p| p.node.clone()).ok(),
                    "{r:?}"
                );
                if let (Ok(p), Ok(best)) = (&fast, &full) {
                    // Spread is exact: the choice has no more members than the full scan's.
                    if let Some(g) = &r.spread_group {
                        assert_eq!(
                            s.node(&p.node).unwrap().group_count(g),
                            s.node(&best.node).unwrap().group_count(g)
                        );
                    }
                }
                match fast {
                    Ok(p) => {
                        assert!(filter(s.node(&p.node).unwrap(), &r).is_ok());
                        s.reserve(&p.node, &r);
                        live.push((p.node, r));
                        found += 1;
                    }
                    Err(u) => {
                        assert_eq!(u.reasons.len(), s.len(), "{u}");
                        refused += 1;
                    }
                }
            }
        }
    }
    assert!(found > 150 && refused > 150, "seed {seed}: found {found}, refused {refused}");
}

#[test]
fn explanation_serializes_verdicts_and_scores() {
    let mut cordoned = node("b", 8192);
    cordoned.cordoned = true;
    let s = Snapshot::new(vec![node("a", 4096), cordoned, node("c", 1024)]);
    let e = explain(&s, &request(2048));
    assert_eq!(e.chosen.as_deref(), Some("a"));
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["chosen"], "a");
    assert_eq!(json["nodes"][0]["node"], "a");
    assert_eq!(json["nodes"][0]["scores"]["fit"], 0.5);
    assert_eq!(json["nodes"][1]["reason"], "cordoned");
    assert_eq!(json["nodes"][1]["refusal"]["filter"], "cordoned");
    assert_eq!(
        json["nodes"][2]["refusal"],
        serde_json::json!({"filter": "memory", "need": 2048, "free": 1024})
    );
    let u = place(&Snapshot::new(vec![node("c", 1024)]), &request(2048)).unwrap_err();
    let json = serde_json::to_value(&u).unwrap();
    assert_eq!(json["reasons"][0]["reason"], "insufficient memory (need 2048 MiB, free 1024)");
}

/// Records every committed batch; fails the commits it is told to.
struct MemorySink {
    batches: mpsc::Sender<Vec<Reservation>>,
    fail: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("disk full")]
struct DiskFull;

impl ReservationSink for MemorySink {
    type Error = DiskFull;

    fn commit(&mut self, batch: &[Reservation]) -> Result<(), DiskFull> {
        if self.fail {
            return Err(DiskFull);
        }
        self.batches.send(batch.to_vec()).unwrap();
        Ok(())
    }
}

fn run_applier(
    fail: bool,
    requests: usize,
) -> (Vec<Result<Placement, ApplyError>>, Vec<Vec<Reservation>>, Snapshot) {
    let (batches_tx, batches) = mpsc::channel();
    let s = Snapshot::new(vec![node("a", 4096), node("b", 4096)]);
    let (handle, thread) = spawn_applier(s, MemorySink { batches: batches_tx, fail });
    let (tx, rx) = mpsc::channel();
    for i in 0..requests {
        let tx = tx.clone();
        let r = Request { vm: format!("vm{i}"), ..request(1024) };
        handle.place(r, Box::new(move |outcome| tx.send((i, outcome)).unwrap()));
    }
    drop((handle, tx));
    let (snapshot, _) = thread.join().unwrap();
    let mut outcomes: Vec<_> = rx.iter().collect();
    outcomes.sort_by_key(|(i, _)| *i);
    (outcomes.into_iter().map(|(_, o)| o).collect(), batches.iter().collect(), snapshot)
}

#[test]
fn applier_commits_before_answering_and_never_overcommits() {
    let (outcomes, batches, s) = run_applier(false, 10);
    let placed: Vec<&str> =
        outcomes.iter().filter_map(|o| o.as_ref().ok()).map(|p| p.node.as_str()).collect();
    assert_eq!(placed.len(), 8);
    for o in &outcomes[8..] {
        assert!(matches!(o, Err(ApplyError::Unschedulable(_))), "{o:?}");
    }
    let stored: Vec<Reservation> = batches.into_iter().flatten().collect();
    assert_eq!(stored.len(), 8);
    assert!(stored.iter().zip(&placed).all(|(r, node)| r.node == *node));
    assert_eq!(s.node("a").unwrap().allocated.memory_mib, 4096);
    assert_eq!(s.node("b").unwrap().allocated.memory_mib, 4096);
}

#[test]
fn failed_commit_releases_the_batch() {
    let (outcomes, batches, s) = run_applier(true, 3);
    assert!(batches.is_empty());
    for o in &outcomes {
        let Err(ApplyError::Store(e)) = o else { panic!("{o:?}") };
        assert_eq!(e.to_string(), "disk full");
    }
    assert_eq!(s.node("a").unwrap().allocated, Resources::default());
    assert_eq!(s.node("b").unwrap().allocated, Resources::default());
}
