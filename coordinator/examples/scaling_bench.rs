//! `bench/scaling`: the scaling loop's round time on a synthetic grid.
//!
//! Usage: scaling_bench [NODES [GROUPS [MEMBERS [ROUNDS]]]]   (defaults 2000, 1000, 10, 50)
//!
//! A seeded grid of NODES nodes in the scheduler's `Snapshot` (16 vCPU / 48 GiB, 32 / 96, 48 / 128; 2
//! datacenters), GROUPS groups of MEMBERS VMs each placed on it through `place` + `reserve` (the biggest
//! groups first) until the grid is at most 90% full by memory (members that find no node are left out).
//! Groups mix priorities (0 to 3, a tenth at 9 that need a node labelled tier=gold, a tenth of the nodes,
//! which the other groups fill too: they reclaim), policies (horizontal, vertical, both) and loads (hot above
//! the up threshold, cold below the down one, in between). Every VM has a window of samples in `UsageWindows`
//! (one every 10 s over the 60 s window). Each round records one new sample per VM, builds the groups' inputs
//! from the windows, clones the snapshot and runs `decide` with a `SnapshotRoom` on the clone. The decisions
//! are not applied: every round decides on the same grid, with fresh samples.
//!
//! Then the leader's path over the same grid: an `Engine` on a grid view (in memory) holding the nodes, the
//! tenants with their groups and the VMs, fed one sample per VM per round (`record_usage_at`); each round
//! marks a few members DELETED (their records stay, as a delete's do), then times what the scaling round
//! reads (`forget_gone_usage`, then `plan_at`: the groups' inputs from the view, the snapshot's clone and
//! `decide`) and the load of every VM record read at once (`with_usages`, as `vm list --all` does). It prints
//! a digest of the decisions, equal for code that decides the same.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use gridforge_coordinator::agents::AgentPool;
use gridforge_coordinator::config::OpsConfig;
use gridforge_coordinator::grid::{Change, Defaults, VmState};
use gridforge_coordinator::ops::Engine;
use gridforge_coordinator::scaling::{GroupInput, Member, SnapshotRoom, UsageWindows, VmLoad, decide};
use gridforge_coordinator::scheduler::{
    NodeInfo, NodeState, Request, Resources as SchedResources, Snapshot, place,
};
use gridforge_coordinator::store::{GridStore, GridView, MemoryStore, StoreError};
use gridforge_proto::v1::decision::Action;
use gridforge_proto::v1::{
    DiskLayout, Group, Machine, NodeStatsReport, PlacementConstraints, Resources, ScalingPolicy,
    ServiceLevel, Tenant, VmSpec, VmStats,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const GIB: u64 = 1024;
const WINDOW_SECS: u32 = 60;
const SAMPLE_EVERY: u64 = 10;
/// Members the engine rounds mark DELETED per round.
const DELETED_PER_ROUND: usize = 10;

struct Vm {
    name: String,
    node: String,
    resources: Resources,
}

struct Sim {
    group: Group,
    /// The group's base CPU and memory load (percent); each sample adds noise.
    load: f64,
    memory: f64,
    vms: Vec<Vm>,
}

fn node(rng: &mut StdRng, i: usize) -> NodeInfo {
    let (vcpus, memory) = [(16, 48 * GIB), (32, 96 * GIB), (48, 128 * GIB)][rng.random_range(0..3usize)];
    NodeInfo {
        name: format!("node-{i:05}"),
        state: NodeState::Ready,
        cordoned: false,
        datacenter: if i.is_multiple_of(2) { "dc1" } else { "dc2" }.to_owned(),
        labels: if i.is_multiple_of(10) {
            [("tier".to_owned(), "gold".to_owned())].into()
        } else {
            Default::default()
        },
        hypervisors: vec!["kvm".into(), "qemu".into()],
        arch: "x86_64".into(),
        capacity: SchedResources { vcpus, memory_mib: memory, disk_mib: 4000 * GIB },
        overcommit_cpu: 4.0,
        overcommit_memory: 1.0,
        ..Default::default()
    }
}

fn template(name: &str, vcpus: u32, memory_mib: u64) -> VmSpec {
    VmSpec {
        name: name.into(),
        machine: Some(Machine { vcpus, memory_mib, ..Default::default() }),
        disk: Some(DiskLayout { size_mib: 20 * GIB, ..Default::default() }),
        ..Default::default()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(label: &str, v: &mut [f64]) {
    v.sort_by(f64::total_cmp);
    println!(
        "{label:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        v[0],
        percentile(v, 0.5),
        percentile(v, 0.99),
        v[v.len() - 1]
    )
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// The grid's records: nodes, tenants with their groups, the placed members RUNNING.
fn records(nodes: &[NodeInfo], sims: &[Sim]) -> Vec<Change> {
    let mut changes: Vec<Change> = nodes
        .iter()
        .map(|n| {
            let c = n.capacity;
            Change::PutNode(gridforge_proto::v1::Node {
                name: n.name.clone(),
                state: gridforge_proto::v1::node::State::Ready as i32,
                datacenter: n.datacenter.clone(),
                labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                hypervisors: n.hypervisors.clone(),
                arch: n.arch.clone(),
                capacity: Some(Resources { vcpus: c.vcpus, memory_mib: c.memory_mib, disk_mib: c.disk_mib }),
                overcommit_cpu: n.overcommit_cpu,
                overcommit_memory: n.overcommit_memory,
                ..Default::default()
            })
        })
        .collect();
    let mut tenants: std::collections::BTreeMap<String, Tenant> = Default::default();
    for s in sims {
        let t = tenants
            .entry(s.group.tenant.clone())
            .or_insert_with(|| Tenant { name: s.group.tenant.clone(), ..Default::default() });
        t.groups.push(s.group.clone());
        for (i, vm) in s.vms.iter().enumerate() {
            changes.push(Change::PutVm(gridforge_proto::v1::Vm {
                name: vm.name.clone(),
                tenant: s.group.tenant.clone(),
                group: s.group.name.clone(),
                node: vm.node.clone(),
                resources: Some(vm.resources),
                state: VmState::Running as i32,
                placement: s.group.placement.clone(),
                created: Some(pbjson_types::Timestamp { seconds: i as i64, nanos: 0 }),
                ..Default::default()
            }));
        }
    }
    changes.extend(tenants.into_values().map(Change::PutTenant));
    changes
}

/// The leader's rounds over the grid (see the module documentation).
fn engine_rounds(nodes: &[NodeInfo], sims: &[Sim], rng: &mut StdRng, mut now: u64, rounds: usize) {
    let store = MemoryStore::default();
    store.commit(&records(nodes, sims)).expect("the grid's records");
    let view = GridView::open(Box::new(store), Defaults::default()).expect("a grid view");
    let engine = Engine::new(view, AgentPool::new(None, Duration::from_secs(5)), OpsConfig::default());
    let stats = |rng: &mut StdRng| NodeStatsReport {
        vms: sims
            .iter()
            .flat_map(|s| s.vms.iter().map(move |vm| (s, vm)))
            .map(|(s, vm)| {
                let cores = (s.load + rng.random_range(-5.0..5.0)).clamp(0.0, 100.0) / 100.0;
                let memory = (s.memory + rng.random_range(-4.0..4.0)).clamp(0.0, 100.0) / 100.0;
                VmStats {
                    name: vm.name.clone(),
                    cpu_cores: cores * f64::from(vm.resources.vcpus),
                    memory_bytes: (memory * vm.resources.memory_mib as f64 * 1024.0 * 1024.0) as u64,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    };
    for _ in 0..u64::from(WINDOW_SECS) / SAMPLE_EVERY {
        now += SAMPLE_EVERY;
        engine.record_usage_at(&stats(rng), now);
    }
    let members: Vec<&Vm> = sims.iter().flat_map(|s| &s.vms).collect();
    let (mut records, mut forgets, mut plans, mut lists) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut digest, mut decisions) = (DefaultHasher::new(), Vec::new());
    for round in 0..rounds {
        now += SAMPLE_EVERY;
        let report = stats(rng);
        let start = Instant::now();
        engine.record_usage_at(&report, now);
        records.push(ms(start));
        let gone: Vec<Change> = (0..DELETED_PER_ROUND)
            .filter_map(|i| members.get(round * DELETED_PER_ROUND + i))
            .filter_map(|vm| engine.view().read(|s| s.vms.get(&vm.name).cloned()))
            .map(|mut v| {
                v.state = VmState::Deleted as i32;
                Change::PutVm(v)
            })
            .collect();
        engine.view().update_blocking(|_| Ok::<_, StoreError>(((), gone))).expect("the deletions");
        let start = Instant::now();
        engine.forget_gone_usage();
        forgets.push(ms(start));
        let start = Instant::now();
        let plan = engine.plan_at(now);
        plans.push(ms(start));
        let start = Instant::now();
        let listed = engine.view().read(|s| engine.with_usages(s, s.vms.values().cloned()));
        lists.push(ms(start));
        assert_eq!(listed.len(), members.len());
        decisions.push(plan.len());
        for d in &plan {
            format!("{d:?}").hash(&mut digest);
        }
    }
    println!(
        "engine: {} VM records, {DELETED_PER_ROUND} marked DELETED per round; {rounds} rounds, ms    min   median      p99      max",
        members.len()
    );
    row("record one sample per VM", &mut records);
    row("forget_gone_usage", &mut forgets);
    row("plan_at", &mut plans);
    row("with_usages of every VM record", &mut lists);
    decisions.sort_unstable();
    println!(
        "engine decisions per round: median {} (min {}, max {}); digest of all {:016x}",
        decisions[decisions.len() / 2],
        decisions[0],
        decisions[decisions.len() - 1],
        digest.finish()
    );
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (nodes, groups, members, rounds) = (arg(0, 2000), arg(1, 1000), arg(2, 10), arg(3, 50));
    let mut rng = StdRng::seed_from_u64(7);
    let infos: Vec<NodeInfo> = (0..nodes).map(|i| node(&mut rng, i)).collect();
    let mut snapshot = Snapshot::new(infos.clone());
    let capacity: u64 = snapshot.nodes().map(|n| n.capacity.memory_mib).sum();

    // Groups: a tenth high priority with large templates, the rest mixed.
    let mut sims: Vec<Sim> = (0..groups)
        .map(|i| {
            let high = i.is_multiple_of(10);
            let (vcpus, memory_mib) = if high {
                (4, 16 * GIB)
            } else {
                [(2, 4 * GIB), (4, 8 * GIB), (4, 16 * GIB), (8, 16 * GIB)][rng.random_range(0..4usize)]
            };
            let name = format!("g{i:04}");
            let horizontal = high || rng.random_bool(0.8);
            let vertical = !horizontal || rng.random_bool(0.2);
            let (load, memory) = match rng.random_range(0..10u32) {
                0..=2 => (rng.random_range(75.0..95.0), rng.random_range(40.0..80.0)),
                3..=5 => (rng.random_range(5.0..25.0), rng.random_range(5.0..15.0)),
                _ => (rng.random_range(35.0..65.0), rng.random_range(30.0..70.0)),
            };
            let group = Group {
                tenant: format!("tenant{}", i % 50),
                name: name.clone(),
                service_level: Some(ServiceLevel {
                    max_avg_cpu_percent: 80.0,
                    min_members: rng.random_range(2..=5),
                    max_members: members as u32 + 5,
                    priority: if high { 9 } else { rng.random_range(0..=3) },
                }),
                scaling: Some(ScalingPolicy {
                    horizontal,
                    vertical,
                    cpu_up_percent: 70.0,
                    cpu_down_percent: 30.0,
                    memory_up_percent: 85.0,
                    memory_down_percent: 20.0,
                    window_secs: WINDOW_SECS,
                    cooldown_secs: 300,
                    min_vcpus: 1,
                    max_vcpus: 16,
                    min_memory_mib: 2 * GIB,
                    max_memory_mib: 64 * GIB,
                }),
                template: Some(template(&name, vcpus, memory_mib)),
                placement: Some(PlacementConstraints {
                    datacenter: if !high && rng.random_bool(0.3) { "dc1".into() } else { String::new() },
                    node_selector: if high {
                        [("tier".to_owned(), "gold".to_owned())].into()
                    } else {
                        Default::default()
                    },
                    spread_group: if rng.random_bool(0.5) { name.clone() } else { String::new() },
                    ..Default::default()
                }),
                last_scaled: None,
                next_member: members as u32,
            };
            Sim { group, load, memory, vms: Vec::new() }
        })
        .collect();

    // Place the members, biggest templates first, up to 90% of the memory (those that find no node are left
    // out).
    let mut order: Vec<usize> = (0..sims.len()).collect();
    let size =
        |s: &Sim| s.group.template.as_ref().and_then(|t| t.machine.as_ref()).map_or(0, |m| m.memory_mib);
    order.sort_by_key(|&i| std::cmp::Reverse(size(&sims[i])));
    let (mut allocated, mut unplaced) = (0u64, 0usize);
    for m in 0..members {
        for &i in &order {
            let s = &mut sims[i];
            let spec = s.group.template.clone().unwrap_or_default();
            let mut req: Request =
                gridforge_coordinator::ops::schedule_request(&spec, s.group.placement.as_ref().unwrap());
            req.vm = format!("{}-{m}", s.group.name);
            if (allocated + req.resources.memory_mib) as f64 > capacity as f64 * 0.9 {
                unplaced += 1;
                continue;
            }
            match place(&snapshot, &req) {
                Ok(p) => {
                    snapshot.reserve(&p.node, &req);
                    allocated += req.resources.memory_mib;
                    let r = req.resources;
                    let resources =
                        Resources { vcpus: r.vcpus, memory_mib: r.memory_mib, disk_mib: r.disk_mib };
                    s.vms.push(Vm { name: req.vm, node: p.node, resources });
                }
                Err(_) => unplaced += 1,
            }
        }
    }
    let vms: usize = sims.iter().map(|s| s.vms.len()).sum();

    // A window of samples per VM.
    let mut windows = UsageWindows::new();
    let mut now = 1_700_000_000u64;
    let sample = |windows: &mut UsageWindows, rng: &mut StdRng, now: u64| {
        for s in &sims {
            for vm in &s.vms {
                let cpu_percent = (s.load + rng.random_range(-5.0..5.0)).clamp(0.0, 100.0);
                let memory_percent = (s.memory + rng.random_range(-4.0..4.0)).clamp(0.0, 100.0);
                windows.record(&vm.name, now, VmLoad { cpu_percent, memory_percent, ..Default::default() });
            }
        }
    };
    for _ in 0..u64::from(WINDOW_SECS) / SAMPLE_EVERY {
        now += SAMPLE_EVERY;
        sample(&mut windows, &mut rng, now);
    }
    println!(
        "grid: {nodes} nodes, {vms} VMs in {groups} groups ({unplaced} members left unplaced), {:.0}% of the memory \
         allocated; {} samples per VM in a {WINDOW_SECS} s window",
        allocated as f64 * 100.0 / capacity as f64,
        u64::from(WINDOW_SECS) / SAMPLE_EVERY
    );

    let (mut totals, mut decides, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    let mut by_action = [0usize; 7];
    for _ in 0..rounds {
        now += SAMPLE_EVERY;
        sample(&mut windows, &mut rng, now);
        let start = Instant::now();
        let inputs: Vec<GroupInput> = sims
            .iter()
            .map(|s| GroupInput {
                group: &s.group,
                members: s
                    .vms
                    .iter()
                    .map(|vm| Member {
                        name: vm.name.clone(),
                        node: vm.node.clone(),
                        running: true,
                        resources: vm.resources,
                        created_secs: 0,
                        usage: windows.usage(&vm.name, WINDOW_SECS, now),
                        busy: false,
                    })
                    .collect(),
            })
            .collect();
        let mut clone = snapshot.clone();
        let mut room = SnapshotRoom::new(&mut clone);
        let decided = Instant::now();
        let decisions = decide(&inputs, &mut room, now);
        let end = Instant::now();
        totals.push((end - start).as_secs_f64() * 1000.0);
        decides.push((end - decided).as_secs_f64() * 1000.0);
        counts.push(decisions.len());
        for d in &decisions {
            by_action[(d.action as usize).min(6)] += 1;
        }
    }
    println!("{rounds} rounds, ms per round                  min   median      p99      max");
    row("inputs + snapshot clone + decide", &mut totals);
    row("decide alone", &mut decides);
    counts.sort_unstable();
    let per_round = |a: Action| by_action[a as usize] as f64 / rounds as f64;
    println!(
        "decisions per round: median {} (min {}, max {}); per round on average: {:.0} SCALE_OUT, {:.0} SCALE_IN, \
         {:.0} SCALE_UP, {:.0} SCALE_DOWN, {:.0} RECLAIM, {:.0} HOLD",
        counts[counts.len() / 2],
        counts[0],
        counts[counts.len() - 1],
        per_round(Action::ScaleOut),
        per_round(Action::ScaleIn),
        per_round(Action::ScaleUp),
        per_round(Action::ScaleDown),
        per_round(Action::Reclaim),
        per_round(Action::Hold),
    );
    engine_rounds(&infos, &sims, &mut rng, now, rounds);
}
