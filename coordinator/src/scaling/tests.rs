use std::collections::BTreeMap;

use gridforge_proto::v1::decision::Action;
use gridforge_proto::v1::{
    Decision, DiskLayout, Group, Machine, Resources, ScalingPolicy, ServiceLevel, VmSpec, VmUsage,
};

use super::*;

/// Free resources per node; a new member goes on the first node (by name) with room.
#[derive(Debug, Clone, Default)]
struct FakeRoom {
    free: BTreeMap<String, Resources>,
}

fn covers(free: &Resources, r: &Resources) -> bool {
    free.vcpus >= r.vcpus && free.memory_mib >= r.memory_mib && free.disk_mib >= r.disk_mib
}

impl FakeRoom {
    fn with(nodes: &[(&str, u32, u64)]) -> Self {
        let free = nodes
            .iter()
            .map(|&(n, vcpus, memory_mib)| (n.to_owned(), Resources { vcpus, memory_mib, disk_mib: 1 << 20 }))
            .collect();
        FakeRoom { free }
    }

    fn take(&mut self, node: &str, r: &Resources) {
        let f = self.free.get_mut(node).unwrap();
        f.vcpus -= r.vcpus;
        f.memory_mib -= r.memory_mib;
        f.disk_mib -= r.disk_mib;
    }
}

impl Room for FakeRoom {
    fn fits_new(&mut self, _: &Group, r: &Resources) -> bool {
        let Some(node) = self.free.iter().find(|(_, f)| covers(f, r)).map(|(n, _)| n.clone()) else {
            return false;
        };
        self.take(&node, r);
        true
    }

    fn fits_new_on(&mut self, _: &Group, r: &Resources, node: &str) -> bool {
        self.fits_on_node(node, r)
    }

    fn fits_on_node(&mut self, node: &str, extra: &Resources) -> bool {
        if !self.free.get(node).is_some_and(|f| covers(f, extra)) {
            return false;
        }
        self.take(node, extra);
        true
    }

    fn release(&mut self, node: &str, r: &Resources) {
        let f = self.free.entry(node.to_owned()).or_default();
        f.vcpus += r.vcpus;
        f.memory_mib += r.memory_mib;
        f.disk_mib += r.disk_mib;
    }
}

/// A roomy grid.
fn roomy() -> FakeRoom {
    FakeRoom::with(&[("n1", 1000, 1 << 30)])
}

const NOW: u64 = 1_000_000;

fn policy() -> ScalingPolicy {
    ScalingPolicy {
        horizontal: true,
        cpu_up_percent: 70.0,
        cpu_down_percent: 30.0,
        window_secs: 60,
        cooldown_secs: 300,
        ..Default::default()
    }
}

fn group(name: &str, priority: i32, min: u32, max: u32, scaling: ScalingPolicy) -> Group {
    Group {
        tenant: "t".into(),
        name: name.into(),
        service_level: Some(ServiceLevel {
            min_members: min,
            max_members: max,
            priority,
            ..Default::default()
        }),
        scaling: Some(scaling),
        template: Some(VmSpec {
            name: name.into(),
            machine: Some(Machine { vcpus: 2, memory_mib: 4096, ..Default::default() }),
            disk: Some(DiskLayout { size_mib: 10_240, ..Default::default() }),
            ..Default::default()
        }),
        next_member: 7,
        ..Default::default()
    }
}

fn member(name: &str, node: &str, cpu: f64) -> Member {
    Member {
        name: name.into(),
        node: node.into(),
        running: true,
        resources: Resources { vcpus: 2, memory_mib: 4096, disk_mib: 10_240 },
        usage: Some(VmUsage { avg_cpu_percent: cpu, cpu_percent: cpu, samples: 12, ..Default::default() }),
        ..Default::default()
    }
}

fn members(g: &str, loads: &[f64]) -> Vec<Member> {
    loads.iter().enumerate().map(|(i, &cpu)| member(&format!("{g}-{i}"), "n1", cpu)).collect()
}

fn actions(ds: &[Decision]) -> Vec<(Action, String)> {
    ds.iter().map(|d| (d.action(), d.vm.clone())).collect()
}

fn one(g: &Group, ms: Vec<Member>, room: &mut dyn Room) -> Vec<Decision> {
    decide(&[GroupInput { group: g, members: ms }], room, NOW)
}

#[test]
fn scale_out_above_the_up_threshold_names_the_next_member() {
    let g = group("web", 0, 1, 5, policy());
    let ds = one(&g, members("web", &[80.0, 90.0]), &mut roomy());
    assert_eq!(actions(&ds), vec![(Action::ScaleOut, "t-web-7".to_owned())]);
    let d = &ds[0];
    assert_eq!(d.resources, Some(Resources { vcpus: 2, memory_mib: 4096, disk_mib: 10_240 }));
    assert_eq!((d.tenant.as_str(), d.group.as_str()), ("t", "web"));
    assert_eq!(d.time.as_ref().unwrap().seconds, NOW as i64);
    assert_eq!(d.reason, "average CPU 85.0% over 60 s above 70.0% (up threshold); 2 members, min 1, max 5");
}

#[test]
fn scale_in_removes_the_newest_when_the_projection_stays_below_up() {
    let g = group("web", 0, 1, 5, policy());
    let ds = one(&g, members("web", &[20.0, 20.0, 20.0]), &mut roomy());
    assert_eq!(actions(&ds), vec![(Action::ScaleIn, "web-2".to_owned())]);
    assert!(ds[0].reason.contains("30.0% projected on 2 running"), "{}", ds[0].reason);
}

#[test]
fn hysteresis_no_scale_in_that_would_cross_the_up_threshold() {
    // 65% on 2 members with up 70 / down 30: not below down, and 65 * 2 / 1 = 130 > 70 anyway.
    let g = group("web", 0, 1, 5, policy());
    assert!(one(&g, members("web", &[65.0, 65.0]), &mut roomy()).is_empty());
    // Below the down threshold, the projection is what blocks: 38 * 2 / 1 = 76 > 70.
    let p = ScalingPolicy { cpu_down_percent: 40.0, ..policy() };
    let g = group("web", 0, 1, 5, p);
    assert!(one(&g, members("web", &[38.0, 38.0]), &mut roomy()).is_empty());
    // With 3 members 38 * 3 / 2 = 57 < 70: one goes.
    let ds = one(&g, members("web", &[38.0, 38.0, 38.0]), &mut roomy());
    assert_eq!(actions(&ds), vec![(Action::ScaleIn, "web-2".to_owned())]);
}

#[test]
fn hysteresis_a_load_oscillating_between_the_thresholds_never_steps() {
    let g = group("web", 0, 1, 10, ScalingPolicy { cooldown_secs: 0, ..policy() });
    for round in 0..50u64 {
        let cpu = if round % 2 == 0 { 31.0 } else { 69.0 };
        let ds = decide(
            &[GroupInput { group: &g, members: members("web", &[cpu; 3]) }],
            &mut roomy(),
            NOW + round,
        );
        assert!(ds.is_empty(), "round {round}: {ds:?}");
    }
}

#[test]
fn cooldown_holds_a_second_step_but_not_the_min_members_rule() {
    let mut g = group("web", 0, 2, 5, policy());
    g.last_scaled = Some(pbjson_types::Timestamp { seconds: (NOW - 100) as i64, nanos: 0 });
    assert!(one(&g, members("web", &[90.0, 90.0]), &mut roomy()).is_empty());
    assert!(one(&g, members("web", &[10.0, 10.0, 10.0]), &mut roomy()).is_empty());
    // After the cooldown the step comes.
    g.last_scaled = Some(pbjson_types::Timestamp { seconds: (NOW - 300) as i64, nanos: 0 });
    assert_eq!(one(&g, members("web", &[90.0, 90.0]), &mut roomy())[0].action(), Action::ScaleOut);
    // Below min_members the cooldown does not hold it.
    g.last_scaled = Some(pbjson_types::Timestamp { seconds: (NOW - 10) as i64, nanos: 0 });
    let mut ms = members("web", &[10.0, 10.0]);
    ms[1].running = false;
    let ds = one(&g, ms, &mut roomy());
    assert_eq!(actions(&ds), vec![(Action::ScaleOut, "t-web-7".to_owned())]);
    assert!(ds[0].reason.starts_with("1 of 2 members running, below min_members 2"), "{}", ds[0].reason);
}

#[test]
fn no_samples_no_load_decision_only_min_members() {
    let g = group("web", 0, 2, 5, policy());
    let mut ms = members("web", &[90.0, 90.0]);
    ms[1].usage = None;
    assert!(one(&g, ms.clone(), &mut roomy()).is_empty());
    ms[0].usage.as_mut().unwrap().samples = 0;
    ms[1].running = false;
    assert_eq!(one(&g, ms, &mut roomy())[0].action(), Action::ScaleOut);
}

#[test]
fn bounds_max_members_and_min_members() {
    let g = group("web", 0, 2, 3, policy());
    // At max_members: no SCALE_OUT; the service level holds (no CPU target), so nothing at all.
    assert!(one(&g, members("web", &[90.0; 3]), &mut roomy()).is_empty());
    // With a CPU target that is missed, a HOLD says why.
    let mut g2 = g.clone();
    g2.service_level.as_mut().unwrap().max_avg_cpu_percent = 80.0;
    let ds = one(&g2, members("web", &[90.0; 3]), &mut roomy());
    assert_eq!(ds[0].action(), Action::Hold);
    assert!(ds[0].reason.contains("average CPU 90.0% over 80.0%"), "{}", ds[0].reason);
    assert!(ds[0].reason.contains("at max_members 3"), "{}", ds[0].reason);
    // At min_members: no SCALE_IN however idle.
    assert!(one(&g, members("web", &[1.0; 2]), &mut roomy()).is_empty());
}

fn vertical_policy() -> ScalingPolicy {
    ScalingPolicy {
        horizontal: false,
        vertical: true,
        cpu_up_percent: 70.0,
        cpu_down_percent: 30.0,
        window_secs: 60,
        min_vcpus: 2,
        max_vcpus: 3,
        ..Default::default()
    }
}

#[test]
fn vertical_bounds_max_and_min_vcpus() {
    let g = group("db", 0, 1, 0, vertical_policy());
    let mut ms = members("db", &[90.0, 10.0, 90.0, 50.0]);
    ms[2].resources.vcpus = 3; // at max
    ms[1].resources.vcpus = 2; // at min
    ms[3].resources.vcpus = 3;
    let ds = one(&g, ms.clone(), &mut roomy());
    assert_eq!(actions(&ds), vec![(Action::ScaleUp, "db-0".to_owned())]);
    assert_eq!(ds[0].resources.as_ref().unwrap().vcpus, 3);
    // Down from 3 to 2 when 10% * 3 / 2 = 15% < 70%.
    ms[1].resources.vcpus = 3;
    let ds = one(&g, ms, &mut roomy());
    assert_eq!(
        actions(&ds),
        vec![(Action::ScaleUp, "db-0".to_owned()), (Action::ScaleDown, "db-1".to_owned())]
    );
    assert_eq!(ds[1].resources.as_ref().unwrap().vcpus, 2);
}

#[test]
fn vertical_down_never_crosses_up() {
    let p = ScalingPolicy { cpu_down_percent: 50.0, min_vcpus: 1, ..vertical_policy() };
    let g = group("db", 0, 1, 0, p);
    // 45% on 2 vCPU -> 90% on 1: not taken.
    assert!(one(&g, members("db", &[45.0]), &mut roomy()).is_empty());
}

#[test]
fn vertical_memory_steps_within_bounds() {
    let p = ScalingPolicy {
        memory_up_percent: 80.0,
        memory_down_percent: 20.0,
        max_memory_mib: 4608,
        min_memory_mib: 2048,
        ..vertical_policy()
    };
    let g = group("db", 0, 1, 0, p);
    let mut ms = members("db", &[50.0, 50.0]);
    ms[0].usage.as_mut().unwrap().avg_memory_percent = 90.0;
    ms[1].usage.as_mut().unwrap().avg_memory_percent = 10.0;
    let ds = one(&g, ms, &mut roomy());
    assert_eq!(
        actions(&ds),
        vec![(Action::ScaleUp, "db-0".to_owned()), (Action::ScaleDown, "db-1".to_owned())]
    );
    // +25% would be 5120: clamped to the max; -25% is 3072.
    assert_eq!(ds[0].resources.as_ref().unwrap().memory_mib, 4608);
    assert_eq!(ds[1].resources.as_ref().unwrap().memory_mib, 3072);
}

#[test]
fn vertical_without_room_holds_or_migrates_first() {
    let g = group("db", 0, 1, 0, vertical_policy());
    let mut full = FakeRoom::with(&[("n1", 0, 0)]);
    let ds = one(&g, members("db", &[90.0]), &mut full);
    assert_eq!(ds[0].action(), Action::Hold);
    assert!(ds[0].reason.contains("no room for +1 vCPU"), "{}", ds[0].reason);
    let input = [GroupInput { group: &g, members: members("db", &[90.0]) }];
    let ds = decide_with(&input, &mut full, NOW, &DecideOptions { migrate_allowed: true });
    assert_eq!(ds[0].action(), Action::ScaleUp);
    assert!(ds[0].reason.ends_with("migrates first"), "{}", ds[0].reason);
}

#[test]
fn busy_groups_are_skipped() {
    let g = group("web", 0, 3, 5, policy());
    let mut ms = members("web", &[90.0, 90.0]);
    ms[0].busy = true;
    assert!(one(&g, ms, &mut roomy()).is_empty());
}

#[test]
fn higher_priority_takes_the_room_first() {
    // Room for one new member (2 vCPU); both groups want one.
    let low = group("a-low", 1, 1, 5, policy());
    let high = group("z-high", 9, 1, 5, policy());
    let mut room = FakeRoom::with(&[("n1", 3, 1 << 20)]);
    let inputs = [
        GroupInput { group: &low, members: members("a-low", &[90.0]) },
        GroupInput { group: &high, members: members("z-high", &[90.0]) },
    ];
    let ds = decide(&inputs, &mut room, NOW);
    assert_eq!(ds[0].action(), Action::ScaleOut);
    assert_eq!(ds[0].group, "z-high");
    // The low group has nothing to reclaim from: it holds.
    assert_eq!(ds[1].action(), Action::Hold);
    assert_eq!(ds[1].group, "a-low");
    assert!(
        ds[1].reason.ends_with(
            "no room for a new member (2 vCPU, 4096 MiB, 10240 MiB disk) and no lower-priority spare member"
        ),
        "{}",
        ds[1].reason
    );
}

#[test]
fn reclaim_takes_the_newest_spare_member_of_a_lower_group() {
    let high = group("prod", 10, 1, 5, policy());
    let low = group("batch", 1, 1, 5, ScalingPolicy { horizontal: false, ..policy() });
    let higher = group("core", 20, 0, 5, ScalingPolicy { horizontal: false, ..policy() });
    let mut room = FakeRoom::with(&[("n1", 0, 0), ("n2", 0, 0), ("n3", 0, 0)]);
    let mut batch = members("batch", &[50.0, 50.0, 50.0]);
    batch[0].node = "n1".into();
    batch[1].node = "n2".into();
    batch[2].node = "n2".into();
    let mut core = members("core", &[50.0, 50.0]);
    for m in &mut core {
        m.node = "n3".into();
    }
    let inputs = [
        GroupInput { group: &low, members: batch.clone() },
        GroupInput { group: &high, members: members("prod", &[90.0]) },
        GroupInput { group: &higher, members: core.clone() },
    ];
    let ds = decide(&inputs, &mut room.clone(), NOW);
    assert_eq!(actions(&ds), vec![(Action::Reclaim, "batch-2".to_owned())]);
    let d = &ds[0];
    assert_eq!((d.group.as_str(), d.for_group.as_str()), ("batch", "t/prod"));
    assert!(d.reason.contains("t/prod (priority 10)"), "{}", d.reason);
    assert!(d.reason.contains("taken from t/batch (priority 1, 3 running, min_members 1)"), "{}", d.reason);
    // A bigger need takes two, both on n2, never the minimum one, never core's.
    let mut big = high.clone();
    big.template.as_mut().unwrap().machine.as_mut().unwrap().vcpus = 4;
    let inputs = [
        GroupInput { group: &low, members: batch.clone() },
        GroupInput { group: &big, members: members("prod", &[90.0]) },
        GroupInput { group: &higher, members: core.clone() },
    ];
    let ds = decide(&inputs, &mut room.clone(), NOW);
    assert_eq!(
        actions(&ds),
        vec![(Action::Reclaim, "batch-2".to_owned()), (Action::Reclaim, "batch-1".to_owned())]
    );
    // Needing 6 vCPU: n2 alone cannot give it without going below batch's minimum; core is higher: HOLD.
    big.template.as_mut().unwrap().machine.as_mut().unwrap().vcpus = 6;
    batch[0].node = "n2".into();
    let inputs = [
        GroupInput { group: &low, members: batch.clone() },
        GroupInput { group: &big, members: members("prod", &[90.0]) },
        GroupInput { group: &higher, members: core },
    ];
    let ds = decide(&inputs, &mut room, NOW);
    assert_eq!(actions(&ds), vec![(Action::Hold, String::new())]);
    assert!(ds[0].reason.contains("no lower-priority spare member"), "{}", ds[0].reason);
    // The tentative releases were taken back.
    assert_eq!(room.free["n2"].vcpus, 0);
}

#[test]
fn reclaim_skips_equal_priority_busy_and_minimum_groups() {
    let high = group("prod", 10, 1, 5, policy());
    let equal = group("peer", 10, 1, 5, ScalingPolicy { horizontal: false, ..policy() });
    let at_min = group("small", 1, 2, 5, ScalingPolicy { horizontal: false, ..policy() });
    let busy_low = group("busy", 1, 1, 5, ScalingPolicy { horizontal: false, ..policy() });
    let mut busy = members("busy", &[50.0, 50.0, 50.0]);
    busy[0].busy = true;
    let inputs = [
        GroupInput { group: &high, members: members("prod", &[90.0]) },
        GroupInput { group: &equal, members: members("peer", &[50.0, 50.0, 50.0]) },
        GroupInput { group: &at_min, members: members("small", &[50.0, 50.0]) },
        GroupInput { group: &busy_low, members: busy },
    ];
    let ds = decide(&inputs, &mut FakeRoom::with(&[("n1", 0, 0)]), NOW);
    assert_eq!(actions(&ds), vec![(Action::Hold, String::new())]);
}

#[test]
fn a_reclaimed_group_takes_no_step_in_the_round() {
    let high = group("prod", 10, 1, 5, policy());
    let low = group("batch", 1, 1, 5, policy());
    let inputs = [
        GroupInput { group: &high, members: members("prod", &[90.0]) },
        GroupInput { group: &low, members: members("batch", &[10.0, 10.0, 10.0]) },
    ];
    let ds = decide(&inputs, &mut FakeRoom::with(&[("n1", 0, 0)]), NOW);
    assert_eq!(actions(&ds), vec![(Action::Reclaim, "batch-2".to_owned())]);
}

#[test]
fn service_level_verdicts() {
    let mut g = group("web", 0, 3, 5, policy());
    g.service_level.as_mut().unwrap().max_avg_cpu_percent = 70.0;
    let mut ms = members("web", &[80.0, 86.0, 50.0]);
    ms[2].running = false;
    let v = service_level(&g, &ms);
    assert!(!v.meets);
    assert_eq!((v.running, v.reason.as_str()), (2, "2 of 3 members running"));
    let ms = members("web", &[80.0, 86.0, 83.0]);
    let v = service_level(&g, &ms);
    assert!(!v.meets);
    assert_eq!(v.reason, "average CPU 83.0% over 70.0%");
    let ms = members("web", &[40.0, 50.0, 60.0]);
    let v = service_level(&g, &ms);
    assert!(v.meets);
    assert_eq!(v.reason, "3 members running (min 3); average CPU 50.0% within 70.0%");
}

fn vm_load(cpu_percent: f64, memory_percent: f64) -> VmLoad {
    VmLoad { cpu_percent, memory_percent, ..Default::default() }
}

#[test]
fn windows_keep_the_last_disk_and_network_rates() {
    let mut w = UsageWindows::new();
    let busy = VmLoad { disk_bytes_per_sec: 3e6, network_bytes_per_sec: 1.5e5, ..vm_load(10.0, 20.0) };
    w.record("a", 1000, busy);
    w.record("a", 1010, VmLoad { disk_bytes_per_sec: 1000.0, ..busy });
    let u = w.usage("a", 60, 1010).unwrap();
    assert_eq!((u.disk_bytes_per_sec, u.network_bytes_per_sec, u.samples), (1000.0, 1.5e5, 2));
    // A sample with a value that is not a number is not kept.
    w.record("a", 1020, VmLoad { network_bytes_per_sec: f64::NAN, ..busy });
    assert_eq!(w.usage("a", 60, 1020).unwrap().disk_bytes_per_sec, 1000.0);
}

#[test]
fn windows_average_over_the_window_only() {
    let mut w = UsageWindows::new();
    assert!(w.usage("a", 60, 0).is_none());
    w.record("a", 1000, vm_load(90.0, 10.0));
    w.record("a", 1030, vm_load(50.0, 20.0));
    w.record("a", 1050, vm_load(10.0, 30.0));
    let u = w.usage("a", 60, 1050).unwrap();
    assert_eq!((u.samples, u.avg_cpu_percent, u.cpu_percent), (3, 50.0, 10.0));
    assert_eq!(u.avg_memory_percent, 20.0);
    // At 1070 the first sample is 70 s old: out of the 60 s window.
    let u = w.usage("a", 60, 1070).unwrap();
    assert_eq!((u.samples, u.avg_cpu_percent), (2, 30.0));
    // Long after, none in the window, the last sample kept.
    let u = w.usage("a", 60, 5000).unwrap();
    assert_eq!((u.samples, u.avg_cpu_percent, u.cpu_percent), (0, 0.0, 10.0));
    // Older than the newest: ignored.
    w.record("a", 900, vm_load(100.0, 100.0));
    assert_eq!(w.usage("a", 3600, 1050).unwrap().samples, 3);
    w.forget("a");
    assert!(w.usage("a", 60, 1050).is_none());
}

#[test]
fn windows_are_bounded() {
    let mut w = UsageWindows::new();
    for t in 0..10_000u64 {
        w.record("a", t, vm_load(50.0, 50.0));
    }
    assert_eq!(w.usage("a", 3600, 9_999).unwrap().samples as usize, MAX_SAMPLES);
    let mut w = UsageWindows::new();
    for t in 0..100u64 {
        w.record("a", t * 60, vm_load(50.0, 50.0));
    }
    // Every 60 s over 99 minutes: those within an hour of the newest remain.
    assert_eq!(w.usage("a", 3600, 99 * 60).unwrap().samples, 60);
}

/// A group whose total demand rises then falls over 40 rounds, 30 s apart; each member takes an equal
/// share of it. Decisions are applied at once (a SCALE_OUT adds a member, a SCALE_IN removes the newest).
#[test]
fn simulation_rising_then_falling_load() {
    let mut g = group("web", 0, 1, 10, ScalingPolicy { cooldown_secs: 60, ..policy() });
    let mut windows = UsageWindows::new();
    let mut names: Vec<String> = vec!["web-0".into()];
    g.next_member = 1;
    let mut counts = Vec::new();
    for round in 0..40u64 {
        let now = NOW + round * 30;
        // Demand in percent of one member: 50 up to 400 at round 15, down to 40 at round 27, then flat.
        let r = round as f64;
        let demand = match round {
            0..=15 => 50.0 + 350.0 * r / 15.0,
            16..=27 => 400.0 - 360.0 * (r - 15.0) / 12.0,
            _ => 40.0,
        };
        let share = demand / names.len() as f64;
        for n in &names {
            windows.record(n, now, vm_load(share.min(100.0), 40.0));
        }
        let ms: Vec<Member> = names
            .iter()
            .map(|n| Member { usage: windows.usage(n, 60, now), ..member(n, "n1", 0.0) })
            .collect();
        for d in decide(&[GroupInput { group: &g, members: ms }], &mut roomy(), now) {
            match d.action() {
                Action::ScaleOut => {
                    names.push(d.vm.clone());
                    g.next_member += 1;
                }
                Action::ScaleIn => {
                    assert_eq!(Some(&d.vm), names.last());
                    names.pop();
                    windows.forget(&d.vm);
                }
                other => panic!("round {round}: {other:?}: {}", d.reason),
            }
            g.last_scaled = Some(pbjson_types::Timestamp { seconds: now as i64, nanos: 0 });
        }
        counts.push(names.len());
    }
    let peak = *counts.iter().max().unwrap();
    assert!((6..=7).contains(&peak), "{counts:?}");
    assert_eq!(*counts.last().unwrap(), 1, "{counts:?}");
    let steps: Vec<i64> = counts.windows(2).map(|w| w[1] as i64 - w[0] as i64).filter(|d| *d != 0).collect();
    let changes = steps.windows(2).filter(|w| w[0].signum() != w[1].signum()).count();
    assert!(changes <= 2, "direction changes {changes}: {counts:?}");
}

#[test]
fn snapshot_room_reserves_what_it_finds() {
    use crate::scheduler::{NodeInfo, NodeState, Resources as Sched, Snapshot};
    let node = NodeInfo {
        name: "n1".into(),
        state: NodeState::Ready,
        cordoned: false,
        datacenter: String::new(),
        labels: Default::default(),
        hypervisors: vec!["kvm".into()],
        arch: "x86_64".into(),
        capacity: Sched { vcpus: 4, memory_mib: 9000, disk_mib: 100_000 },
        overcommit_cpu: 1.0,
        overcommit_memory: 1.0,
        ..Default::default()
    };
    let mut snapshot = Snapshot::new(vec![node]);
    let mut room = SnapshotRoom::new(&mut snapshot);
    let g = group("web", 0, 1, 5, policy());
    let r = Resources { vcpus: 2, memory_mib: 4096, disk_mib: 10_240 };
    assert!(room.fits_new(&g, &r));
    assert!(room.fits_new(&g, &r));
    assert!(!room.fits_new(&g, &r));
    assert!(!room.fits_on_node("n1", &Resources { vcpus: 1, ..Default::default() }));
    room.release("n1", &r);
    assert!(room.fits_on_node("n1", &Resources { vcpus: 1, ..Default::default() }));
    assert!(!room.fits_new_on(&g, &r, "n1"));
    room.release("n1", &Resources { vcpus: 1, ..Default::default() });
    assert!(room.fits_new_on(&g, &r, "n1"));
    assert_eq!(room.snapshot().node("n1").unwrap().allocated.vcpus, 4);
}
