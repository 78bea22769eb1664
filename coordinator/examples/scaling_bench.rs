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

use std::time::Instant;

use gridforge_coordinator::scaling::{GroupInput, Member, SnapshotRoom, UsageWindows, VmLoad, decide};
use gridforge_coordinator::scheduler::{
    NodeInfo, NodeState, Request, Resources as SchedResources, Snapshot, place,
};
use gridforge_proto::v1::decision::Action;
use gridforge_proto::v1::{
    DiskLayout, Group, Machine, PlacementConstraints, Resources, ScalingPolicy, ServiceLevel, VmSpec,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const GIB: u64 = 1024;
const WINDOW_SECS: u32 = 60;
const SAMPLE_EVERY: u64 = 10;

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

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (nodes, groups, members, rounds) = (arg(0, 2000), arg(1, 1000), arg(2, 10), arg(3, 50));
    let mut rng = StdRng::seed_from_u64(7);
    let mut snapshot = Snapshot::new((0..nodes).map(|i| node(&mut rng, i)).collect());
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
    for v in [&mut totals, &mut decides] {
        v.sort_by(f64::total_cmp);
    }
    let row = |label: &str, v: &[f64]| {
        println!(
            "{label:<34} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            v[0],
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        )
    };
    println!("{rounds} rounds, ms per round                  min   median      p99      max");
    row("inputs + snapshot clone + decide", &totals);
    row("decide alone", &decides);
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
}
