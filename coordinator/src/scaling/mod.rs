//! The scaling loop's decisions: threshold scaling of groups (members added and removed, members' vCPUs and
//! memory changed) and reallocation of capacity from lower-priority groups to higher ones. Pure: the load,
//! the time and the room on the nodes are inputs; the caller starts the operations the decisions call for.
//!
//! # Rules of [`decide`]
//!
//! Loads are the windowed averages of [`VmUsage`] (see [`UsageWindows`]), percentages of each member's own
//! vCPUs and memory. A group's load is the mean of its running members' averages, known only when every
//! running member has samples in the window: without it no load decision is taken, only the
//! `min_members` rule applies. Thresholds of 0 are not set.
//!
//! - **Held groups.** A group with a busy member (an unfinished operation holds it) is skipped. A group
//!   within `cooldown_secs` of `last_scaled` is skipped, unless fewer than `min_members` of its members run.
//!   A skipped group gets no decision at all.
//! - **Order.** Groups are handled by `service_level.priority`, highest first, ties by tenant then name, so
//!   higher ones take room first. Every room found is reserved in the [`Room`] for the rest of the round.
//! - **Horizontal** (`scaling.horizontal`), at most one step per group per round:
//!   - SCALE_OUT when fewer than `min_members` members run, or when the group's CPU load is above
//!     `cpu_up_percent` (or its memory load above `memory_up_percent`), and the group has fewer than
//!     `max_members` members (0: no bound). The new member is `{tenant}-{group}-{next_member}`, sized as the template
//!     ([`spec_resources`]); it needs [`Room::fits_new`], else the group reclaims (below).
//!   - SCALE_IN of the newest member when the CPU load is below `cpu_down_percent` (and the memory load
//!     below `memory_down_percent`, when set), the group has more than `min_members` members, at least two
//!     run, and the load projected on one running member fewer (`avg * n / (n - 1)`) stays below
//!     `cpu_up_percent` (and `memory_up_percent`, when set): a step down never crosses the up threshold.
//!     The removed member's room is not released in the round: it is free only once the removal is done.
//! - **Vertical** (`scaling.vertical`), when the group took no horizontal step: for each running member with
//!   samples, at most one step per member per round, CPU before memory:
//!   - SCALE_UP by one vCPU (up to `max_vcpus`, 0: no bound but the node's room) when the member's CPU
//!     average is above `cpu_up_percent`; SCALE_DOWN by one vCPU (not below `min_vcpus`, at least 1) when
//!     below `cpu_down_percent` and `avg * v / (v - 1)` stays below `cpu_up_percent`.
//!   - Memory likewise where both the threshold and the bound are set (`memory_up_percent` with
//!     `max_memory_mib`, `memory_down_percent` with `min_memory_mib`), by max(256 MiB, 25%) clamped to the
//!     bounds; a step down keeps the projected memory use below `memory_up_percent`.
//!   - A SCALE_UP needs [`Room::fits_on_node`] for the extra on the member's node; without it, it is still
//!     decided when [`DecideOptions::migrate_allowed`] is set (its reason says it "migrates first"),
//!     otherwise the member gets a HOLD saying so.
//! - **Reclaim** (the master decision). When a SCALE_OUT finds no room, spare members of groups of strictly
//!   lower priority are taken: running, not busy, in groups with no busy member and more running members
//!   than their `min_members` (never below it). Lowest priority first, newest member first; since a new
//!   member lands on one node, victims are tried node by node (the node of the most preferred victim
//!   first): the victims on that node are released one by one until [`Room::fits_new_on`] that node
//!   succeeds (the room is then reserved for the needy group); a node where they do not suffice gets its
//!   victims' room back. On success the victims' RECLAIM decisions are emitted (vm = the victim, tenant and
//!   group = its own, `for_group` = "tenant/group" of the needy one), and no SCALE_OUT: that comes in a
//!   later round, once the removals are done. When no victim makes room, the needy group gets a HOLD
//!   ("no room and no lower-priority spare member"). A group that loses a member to a RECLAIM takes no step
//!   of its own in the round.
//! - **HOLD** otherwise only for a group that misses its service level ([`service_level`]) and took no
//!   step: its reason says what misses and why nothing was done (e.g. at `max_members`).
//!
//! Every decision carries the time, the action, tenant, group, vm, the new sizes (SCALE_OUT, SCALE_UP,
//! SCALE_DOWN) and a reason with the numbers, thresholds and window; `operation` and `error` stay empty.
//! A dry run is [`decide`] on a clone of the room (e.g. a [`SnapshotRoom`] over a cloned snapshot).

mod room;
#[cfg(test)]
mod tests;
mod window;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt::Write as _;

use gridforge_proto::v1::decision::Action;
use gridforge_proto::v1::{Decision, Group, Resources, ScalingPolicy, ServiceLevel, VmUsage};

pub use room::SnapshotRoom;
pub use window::{DEFAULT_WINDOW_SECS, MAX_SAMPLES, MAX_WINDOW_SECS, UsageWindows, VmLoad, effective_window};

use crate::grid::spec_resources;

/// Memory step of a vertical change: max(this, 25% of the member's memory).
pub const MEMORY_STEP_MIB: u64 = 256;

/// A group's VM as the loop sees it.
#[derive(Debug, Clone, Default)]
pub struct Member {
    pub name: String,
    pub node: String,
    pub running: bool,
    pub resources: Resources,
    pub created_secs: u64,
    /// Its windowed load (`None`: no samples).
    pub usage: Option<VmUsage>,
    /// An unfinished operation holds it.
    pub busy: bool,
}

/// A group and its members (not deleted), oldest first.
#[derive(Debug, Clone)]
pub struct GroupInput<'a> {
    pub group: &'a Group,
    pub members: Vec<Member>,
}

/// Room on the nodes, reserved as the round finds it, so that two groups never claim the same room.
pub trait Room {
    /// Whether a new member of `group` with resources `r` can be placed (the group's template and
    /// placement constraints); if so, the room is reserved.
    fn fits_new(&mut self, group: &Group, r: &Resources) -> bool;

    /// Whether a new member of `group` with resources `r` can be placed on `node`; if so, the room is
    /// reserved. The default asks [`Room::fits_new`] (anywhere).
    fn fits_new_on(&mut self, group: &Group, r: &Resources, node: &str) -> bool {
        let _ = node;
        self.fits_new(group, r)
    }

    /// Whether `node` has `extra` free; if so, it is reserved.
    fn fits_on_node(&mut self, node: &str, extra: &Resources) -> bool;

    /// Gives `r` back to `node`'s free resources.
    fn release(&mut self, node: &str, r: &Resources);
}

/// Settings of a round beyond the groups' own policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecideOptions {
    /// A SCALE_UP that does not fit on its member's node is still decided (the resize migrates first).
    pub migrate_allowed: bool,
}

/// Whether a group meets its service level now, and why (or why not).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceLevelVerdict {
    pub running: u32,
    /// Mean of the running members' windowed averages (those with samples; 0 when none has).
    pub avg_cpu_percent: f64,
    pub avg_memory_percent: f64,
    pub meets: bool,
    pub reason: String,
}

/// The group's service level against its members: missed when fewer than `min_members` run, or when
/// `max_avg_cpu_percent` is set and the running members' average CPU exceeds it.
pub fn service_level(group: &Group, members: &[Member]) -> ServiceLevelVerdict {
    let level = group.service_level.unwrap_or_default();
    let running = members.iter().filter(|m| m.running).count() as u32;
    let sampled: Vec<&VmUsage> = members
        .iter()
        .filter(|m| m.running)
        .filter_map(|m| m.usage.as_ref())
        .filter(|u| u.samples > 0)
        .collect();
    let mean = |f: fn(&VmUsage) -> f64| {
        if sampled.is_empty() {
            0.0
        } else {
            sampled.iter().map(|u| f(u)).sum::<f64>() / sampled.len() as f64
        }
    };
    let avg_cpu_percent = mean(|u| u.avg_cpu_percent);
    let avg_memory_percent = mean(|u| u.avg_memory_percent);
    let min = level.min_members;
    let target = level.max_avg_cpu_percent;
    let (meets, reason) = if running < min {
        (false, format!("{running} of {min} members running"))
    } else if target > 0.0 && !sampled.is_empty() && avg_cpu_percent > target {
        (false, format!("average CPU {avg_cpu_percent:.1}% over {target:.1}%"))
    } else {
        let cpu = if target <= 0.0 {
            "no CPU target".to_owned()
        } else if sampled.is_empty() {
            format!("no load samples for the CPU target {target:.1}%")
        } else {
            format!("average CPU {avg_cpu_percent:.1}% within {target:.1}%")
        };
        (true, format!("{running} members running (min {min}); {cpu}"))
    };
    ServiceLevelVerdict { running, avg_cpu_percent, avg_memory_percent, meets, reason }
}

/// One round with the default options (no migration for a resize that does not fit).
pub fn decide(groups: &[GroupInput<'_>], room: &mut dyn Room, now_secs: u64) -> Vec<Decision> {
    decide_with(groups, room, now_secs, &DecideOptions::default())
}

/// One round of decisions over all groups (the rules are in the module documentation).
pub fn decide_with(
    groups: &[GroupInput<'_>],
    room: &mut dyn Room,
    now_secs: u64,
    options: &DecideOptions,
) -> Vec<Decision> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&i| {
        let g = groups[i].group;
        (Reverse(priority(g)), g.tenant.as_str(), g.name.as_str())
    });
    // Each member's node as a dense number, hashed once per round: reclaim buckets candidates by node
    // without hashing names again for every group that needs room.
    let mut ids: HashMap<&str, u32> = HashMap::new();
    let node_of: Vec<Vec<u32>> = groups
        .iter()
        .map(|g| {
            g.members
                .iter()
                .map(|m| {
                    let next = ids.len() as u32;
                    *ids.entry(m.node.as_str()).or_insert(next)
                })
                .collect()
        })
        .collect();
    let mut round = Round {
        groups,
        order: &order,
        room,
        now_secs,
        options,
        taken: vec![Vec::new(); groups.len()],
        out: Vec::new(),
        node_of,
        buckets: vec![Vec::new(); ids.len()],
    };
    for &i in &order {
        round.group(i);
    }
    round.out
}

fn priority(g: &Group) -> i32 {
    g.service_level.as_ref().map_or(0, |l| l.priority)
}

fn key(g: &Group) -> String {
    format!("{}/{}", g.tenant, g.name)
}

fn busy(g: &GroupInput<'_>) -> bool {
    g.members.iter().any(|m| m.busy)
}

fn running(g: &GroupInput<'_>) -> u32 {
    g.members.iter().filter(|m| m.running).count() as u32
}

/// "4 vCPU, 8192 MiB, 20480 MiB disk"
fn sizes(r: &Resources) -> String {
    format!("{} vCPU, {} MiB, {} MiB disk", r.vcpus, r.memory_mib, r.disk_mib)
}

/// The group's load: the mean of the running members' averages, when every running member has samples.
#[derive(Debug, Clone, Copy)]
struct Load {
    cpu: f64,
    memory: f64,
}

fn load(members: &[Member]) -> Option<Load> {
    let mut n = 0usize;
    let (mut cpu, mut memory) = (0.0, 0.0);
    for m in members.iter().filter(|m| m.running) {
        let u = m.usage.as_ref().filter(|u| u.samples > 0)?;
        cpu += u.avg_cpu_percent;
        memory += u.avg_memory_percent;
        n += 1;
    }
    (n > 0).then(|| Load { cpu: cpu / n as f64, memory: memory / n as f64 })
}

enum Horizontal {
    Out(String),
    In(String),
    None,
}

struct Round<'r, 'g> {
    groups: &'r [GroupInput<'g>],
    order: &'r [usize],
    room: &'r mut dyn Room,
    now_secs: u64,
    options: &'r DecideOptions,
    /// Members (indexes) of each group taken by a RECLAIM in this round.
    taken: Vec<Vec<usize>>,
    out: Vec<Decision>,
    /// Per group, per member: its node's number (see `decide_with`).
    node_of: Vec<Vec<u32>>,
    /// Per node number: reclaim candidates there (emptied after each reclaim).
    buckets: Vec<Vec<(usize, usize)>>,
}

impl Round<'_, '_> {
    fn decision(&self, action: Action, g: &Group, vm: &str, reason: String) -> Decision {
        Decision {
            time: Some(pbjson_types::Timestamp { seconds: self.now_secs as i64, nanos: 0 }),
            action: action as i32,
            tenant: g.tenant.clone(),
            group: g.name.clone(),
            vm: vm.to_owned(),
            reason,
            ..Default::default()
        }
    }

    fn group(&mut self, i: usize) {
        let input = &self.groups[i];
        let g = input.group;
        if busy(input) || !self.taken[i].is_empty() {
            return;
        }
        let level = g.service_level.unwrap_or_default();
        let policy = g.scaling.unwrap_or_default();
        let running = running(input);
        let below_min = running < level.min_members;
        let cooling = g.last_scaled.as_ref().is_some_and(|t| {
            (t.seconds.max(0) as u64).saturating_add(u64::from(policy.cooldown_secs)) > self.now_secs
        });
        if cooling && !below_min {
            return;
        }
        let before = self.out.len();
        let mut blocked = None;
        if policy.horizontal {
            match horizontal(input, &level, &policy) {
                Horizontal::Out(why) => {
                    let n = input.members.len() as u32;
                    if level.max_members > 0 && n >= level.max_members {
                        blocked = Some(format!("{why}; at max_members {}", level.max_members));
                    } else {
                        self.scale_out(i, &why);
                    }
                }
                Horizontal::In(why) => {
                    if let Some(victim) = input.members.iter().rev().find(|m| !m.busy) {
                        let d = self.decision(Action::ScaleIn, g, &victim.name, why);
                        self.out.push(d);
                    }
                }
                Horizontal::None => {}
            }
        }
        if self.out.len() == before && policy.vertical {
            for m in input.members.iter().filter(|m| m.running && !m.busy) {
                self.vertical(g, &policy, m);
            }
        }
        if self.out.len() == before {
            let verdict = service_level(g, &input.members);
            if !verdict.meets {
                let why = blocked.unwrap_or_else(|| {
                    if !policy.horizontal && !policy.vertical {
                        "scaling is off".to_owned()
                    } else {
                        "no scaling step applies".to_owned()
                    }
                });
                let d = self.decision(
                    Action::Hold,
                    g,
                    "",
                    format!("service level missed: {}; {why}", verdict.reason),
                );
                self.out.push(d);
            }
        }
    }

    fn scale_out(&mut self, i: usize, why: &str) {
        let g = self.groups[i].group;
        let resources = spec_resources(&g.template.clone().unwrap_or_default());
        if self.room.fits_new(g, &resources) {
            let vm = format!("{}-{}-{}", g.tenant, g.name, g.next_member);
            let mut d = self.decision(Action::ScaleOut, g, &vm, why.to_owned());
            d.resources = Some(resources);
            self.out.push(d);
        } else if !self.reclaim(i, &resources, why) {
            let reason = format!(
                "{why}; no room for a new member ({}) and no lower-priority spare member",
                sizes(&resources)
            );
            let d = self.decision(Action::Hold, g, "", reason);
            self.out.push(d);
        }
    }

    /// Frees room for a new member of group `needy` from lower-priority groups' spare members (see the
    /// module documentation). Returns whether it did (the RECLAIMs are pushed, the room reserved).
    fn reclaim(&mut self, needy: usize, need: &Resources, why: &str) -> bool {
        let ng = self.groups[needy].group;
        let needy_priority = priority(ng);
        // Candidates in preference order: lowest priority first, newest first; each group's spare count.
        let mut candidates: Vec<(usize, usize)> = Vec::new();
        let mut spare: HashMap<usize, u32> = HashMap::new();
        for &gi in self.order.iter().rev() {
            let input = &self.groups[gi];
            let level = input.group.service_level.unwrap_or_default();
            if gi == needy || level.priority >= needy_priority || busy(input) {
                continue;
            }
            let left = running(input).saturating_sub(self.taken[gi].len() as u32);
            if left <= level.min_members {
                continue;
            }
            spare.insert(gi, left - level.min_members);
            for (mi, m) in input.members.iter().enumerate().rev() {
                if m.running && !self.taken[gi].contains(&mi) {
                    candidates.push((gi, mi));
                }
            }
        }
        // Candidates by node, nodes in the order of their first candidate.
        let mut nodes: Vec<u32> = Vec::new();
        for &(gi, mi) in &candidates {
            let id = self.node_of[gi][mi];
            let bucket = &mut self.buckets[id as usize];
            if bucket.is_empty() {
                nodes.push(id);
            }
            bucket.push((gi, mi));
        }
        let found = self.reclaim_on(needy, need, why, &nodes, &spare);
        for id in nodes {
            self.buckets[id as usize].clear();
        }
        found
    }

    /// [`reclaim`](Self::reclaim) node by node over the candidates in `buckets` of `nodes`.
    fn reclaim_on(
        &mut self,
        needy: usize,
        need: &Resources,
        why: &str,
        nodes: &[u32],
        spare: &HashMap<usize, u32>,
    ) -> bool {
        let ng = self.groups[needy].group;
        let needy_priority = priority(ng);
        for &id in nodes {
            let on_node = std::mem::take(&mut self.buckets[id as usize]);
            let Some(&(g0, m0)) = on_node.first() else { continue };
            let node = self.groups[g0].members[m0].node.as_str();
            let mut picked: Vec<(usize, usize)> = Vec::new();
            let mut used: HashMap<usize, u32> = HashMap::new();
            let mut fits = false;
            for &(gi, mi) in &on_node {
                let count = used.entry(gi).or_default();
                if *count >= spare[&gi] {
                    continue;
                }
                *count += 1;
                self.room.release(node, &self.groups[gi].members[mi].resources);
                picked.push((gi, mi));
                if self.room.fits_new_on(ng, need, node) {
                    fits = true;
                    break;
                }
            }
            if fits {
                for (gi, mi) in picked {
                    let victim = &self.groups[gi];
                    let vl = victim.group.service_level.unwrap_or_default();
                    let left = running(victim) - self.taken[gi].len() as u32;
                    let reason = format!(
                        "{} (priority {needy_priority}) needs room for a new member ({}) on a full grid: \
                         {why}; taken from {} (priority {}, {left} running, min_members {}) on node {node}",
                        key(ng),
                        sizes(need),
                        key(victim.group),
                        vl.priority,
                        vl.min_members
                    );
                    let mut d =
                        self.decision(Action::Reclaim, victim.group, &victim.members[mi].name, reason);
                    d.for_group = key(ng);
                    self.out.push(d);
                    self.taken[gi].push(mi);
                }
                return true;
            }
            for (gi, mi) in picked {
                self.room.fits_on_node(node, &self.groups[gi].members[mi].resources);
            }
        }
        false
    }

    fn vertical(&mut self, g: &Group, policy: &ScalingPolicy, m: &Member) {
        let Some(u) = m.usage.as_ref().filter(|u| u.samples > 0) else { return };
        let window = effective_window(policy.window_secs);
        let r = m.resources;
        let v = r.vcpus.max(1);
        let (up, down) = (policy.cpu_up_percent, policy.cpu_down_percent);
        let cpu = u.avg_cpu_percent;
        let max_vcpus = if policy.max_vcpus == 0 { u32::MAX } else { policy.max_vcpus };
        if up > 0.0 && cpu > up && v < max_vcpus {
            let reason = format!(
                "CPU {cpu:.1}% over {window} s above {up:.1}% (up threshold) on {v} vCPU; {} to {} (max {})",
                v,
                v + 1,
                bound(policy.max_vcpus)
            );
            let new = Resources { vcpus: v + 1, ..r };
            return self.step_up(g, m, new, Resources { vcpus: 1, ..Default::default() }, "1 vCPU", reason);
        }
        let min_vcpus = policy.min_vcpus.max(1);
        if down > 0.0 && cpu < down && v > min_vcpus {
            let projected = cpu * f64::from(v) / f64::from(v - 1);
            if up <= 0.0 || projected < up {
                let reason = format!(
                    "CPU {cpu:.1}% over {window} s below {down:.1}% (down threshold) on {v} vCPU, \
                     {projected:.1}% projected on {} stays below {up:.1}% (up threshold); min {min_vcpus}",
                    v - 1
                );
                let mut d = self.decision(Action::ScaleDown, g, &m.name, reason);
                d.resources = Some(Resources { vcpus: v - 1, ..r });
                self.out.push(d);
                return;
            }
        }
        let (mup, mdown) = (policy.memory_up_percent, policy.memory_down_percent);
        let mem = u.avg_memory_percent;
        let mib = r.memory_mib;
        let step = MEMORY_STEP_MIB.max(mib / 4);
        if mup > 0.0 && policy.max_memory_mib > 0 && mem > mup && mib < policy.max_memory_mib {
            let new_mib = (mib + step).min(policy.max_memory_mib);
            let reason = format!(
                "memory {mem:.1}% over {window} s above {mup:.1}% (up threshold) of {mib} MiB; {mib} to \
                 {new_mib} MiB (max {})",
                policy.max_memory_mib
            );
            let extra = Resources { memory_mib: new_mib - mib, ..Default::default() };
            let what = format!("{} MiB", new_mib - mib);
            return self.step_up(g, m, Resources { memory_mib: new_mib, ..r }, extra, &what, reason);
        }
        if mdown > 0.0 && policy.min_memory_mib > 0 && mem < mdown && mib > policy.min_memory_mib {
            let new_mib = mib.saturating_sub(step).max(policy.min_memory_mib);
            let projected = mem * mib as f64 / new_mib as f64;
            if mup <= 0.0 || projected < mup {
                let mut reason = format!(
                    "memory {mem:.1}% over {window} s below {mdown:.1}% (down threshold) of {mib} MiB, \
                     {projected:.1}% projected on {new_mib} MiB"
                );
                if mup > 0.0 {
                    let _ = write!(reason, " stays below {mup:.1}% (up threshold)");
                }
                let _ = write!(reason, "; min {} MiB", policy.min_memory_mib);
                let mut d = self.decision(Action::ScaleDown, g, &m.name, reason);
                d.resources = Some(Resources { memory_mib: new_mib, ..r });
                self.out.push(d);
            }
        }
    }

    /// A SCALE_UP to `new` that needs `extra` on the member's node; without room there, a SCALE_UP that
    /// migrates first when allowed, else a HOLD.
    fn step_up(
        &mut self,
        g: &Group,
        m: &Member,
        new: Resources,
        extra: Resources,
        what: &str,
        reason: String,
    ) {
        let d = if self.room.fits_on_node(&m.node, &extra) {
            self.decision(Action::ScaleUp, g, &m.name, reason)
        } else if self.options.migrate_allowed {
            let reason = format!("{reason}; node {} has no room for +{what}: migrates first", m.node);
            self.decision(Action::ScaleUp, g, &m.name, reason)
        } else {
            let reason =
                format!("{reason}; node {} has no room for +{what} and migration is not allowed", m.node);
            self.decision(Action::Hold, g, &m.name, reason)
        };
        let mut d = d;
        if d.action == Action::ScaleUp as i32 {
            d.resources = Some(new);
        }
        self.out.push(d);
    }
}

fn bound(n: u32) -> String {
    if n == 0 { "none".to_owned() } else { n.to_string() }
}

/// What the group's horizontal rule asks for, with the reason.
fn horizontal(input: &GroupInput<'_>, level: &ServiceLevel, policy: &ScalingPolicy) -> Horizontal {
    let n = input.members.len() as u32;
    let running = running(input);
    let min = level.min_members;
    let counts = format!("{n} members, min {min}, max {}", bound(level.max_members));
    if running < min {
        return Horizontal::Out(format!(
            "{running} of {n} members running, below min_members {min}; {counts}"
        ));
    }
    let Some(l) = load(&input.members) else { return Horizontal::None };
    let window = effective_window(policy.window_secs);
    let (up, down, mup, mdown) = (
        policy.cpu_up_percent,
        policy.cpu_down_percent,
        policy.memory_up_percent,
        policy.memory_down_percent,
    );
    if up > 0.0 && l.cpu > up {
        return Horizontal::Out(format!(
            "average CPU {:.1}% over {window} s above {up:.1}% (up threshold); {counts}",
            l.cpu
        ));
    }
    if mup > 0.0 && l.memory > mup {
        return Horizontal::Out(format!(
            "average memory {:.1}% over {window} s above {mup:.1}% (up threshold); {counts}",
            l.memory
        ));
    }
    let cold =
        (down > 0.0 || mdown > 0.0) && (down <= 0.0 || l.cpu < down) && (mdown <= 0.0 || l.memory < mdown);
    if !cold || n <= min || running < 2 {
        return Horizontal::None;
    }
    let r = f64::from(running);
    let (cpu_after, memory_after) = (l.cpu * r / (r - 1.0), l.memory * r / (r - 1.0));
    if (up > 0.0 && cpu_after >= up) || (mup > 0.0 && memory_after >= mup) {
        return Horizontal::None;
    }
    let mut reason = String::new();
    if down > 0.0 {
        let _ = write!(reason, "average CPU {:.1}% over {window} s below {down:.1}% (down threshold)", l.cpu);
        if up > 0.0 {
            let _ = write!(
                reason,
                ", {cpu_after:.1}% projected on {} running stays below {up:.1}% (up threshold)",
                running - 1
            );
        }
    }
    if mdown > 0.0 {
        if !reason.is_empty() {
            reason.push_str("; ");
        }
        let _ = write!(
            reason,
            "average memory {:.1}% over {window} s below {mdown:.1}% (down threshold)",
            l.memory
        );
        if mup > 0.0 {
            let _ = write!(reason, ", {memory_after:.1}% projected stays below {mup:.1}% (up threshold)");
        }
    }
    let _ = write!(reason, "; {counts}");
    Horizontal::In(reason)
}
