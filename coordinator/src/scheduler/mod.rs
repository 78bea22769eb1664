//! Placement. STAND-IN, to be replaced by the scheduler module (filters, scores, capacity index and the
//! group-commit applier): same names and types, a naive full scan with best fit on memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NodeState {
    Ready,
    NotReady,
    Unreachable,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    pub cordoned: bool,
    pub datacenter: String,
    pub labels: BTreeMap<String, String>,
    pub hypervisors: Vec<String>,
    pub arch: String,
    pub capacity: Resources,
    pub overcommit_cpu: f64,
    pub overcommit_memory: f64,
    pub allocated: Resources,
    pub images: BTreeSet<String>,
    pub licenses: BTreeSet<String>,
    pub cpu_load: f64,
    pub groups: BTreeMap<String, u32>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Request {
    pub vm: String,
    pub resources: Resources,
    /// "name:version".
    pub image: String,
    pub datacenter: Option<String>,
    pub node: Option<String>,
    pub selector: BTreeMap<String, String>,
    pub hypervisor: Option<String>,
    pub arch: Option<String>,
    pub licenses: Vec<String>,
    pub spread_group: Option<String>,
    pub workload: Option<String>,
    pub exclude: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    nodes: BTreeMap<String, NodeInfo>,
}

impl Snapshot {
    pub fn new(nodes: Vec<NodeInfo>) -> Self {
        Snapshot { nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect() }
    }

    pub fn upsert_node(&mut self, node: NodeInfo) {
        self.nodes.insert(node.name.clone(), node);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn reserve(&mut self, node: &str, req: &Request) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.allocated.vcpus += req.resources.vcpus;
            n.allocated.memory_mib += req.resources.memory_mib;
            n.allocated.disk_mib += req.resources.disk_mib;
            if let Some(g) = &req.spread_group {
                *n.groups.entry(g.clone()).or_default() += 1;
            }
        }
    }

    pub fn release(&mut self, node: &str, resources: &Resources, group: Option<&str>) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.allocated.vcpus = n.allocated.vcpus.saturating_sub(resources.vcpus);
            n.allocated.memory_mib = n.allocated.memory_mib.saturating_sub(resources.memory_mib);
            n.allocated.disk_mib = n.allocated.disk_mib.saturating_sub(resources.disk_mib);
            if let Some(g) = group
                && let Some(c) = n.groups.get_mut(g)
            {
                *c = c.saturating_sub(1);
            }
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    pub node: String,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeVerdict {
    pub node: String,
    pub feasible: bool,
    pub reason: String,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub chosen: Option<String>,
    pub nodes: Vec<NodeVerdict>,
}

#[derive(Clone, Debug)]
pub struct Unschedulable {
    pub nodes: usize,
    pub reasons: BTreeMap<String, usize>,
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes == 0 {
            return write!(f, "0 nodes: the grid has no node");
        }
        let parts: Vec<String> = self.reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        write!(f, "{} nodes: {}", self.nodes, parts.join(", "))
    }
}

impl std::error::Error for Unschedulable {}

fn free(n: &NodeInfo) -> (f64, f64, u64) {
    let cpu = f64::from(n.capacity.vcpus) * n.overcommit_cpu - f64::from(n.allocated.vcpus);
    let mem = n.capacity.memory_mib as f64 * n.overcommit_memory - n.allocated.memory_mib as f64;
    (cpu, mem, n.capacity.disk_mib.saturating_sub(n.allocated.disk_mib))
}

/// Why `n` cannot take `req` (a short reason whose counts group well), or its score.
fn verdict(n: &NodeInfo, req: &Request) -> Result<f64, String> {
    if req.exclude.iter().any(|e| e == &n.name) {
        return Err("excluded".into());
    }
    if let Some(want) = &req.node
        && want != &n.name
    {
        return Err(format!("not the requested node {want}"));
    }
    match n.state {
        NodeState::Ready => {}
        NodeState::NotReady => return Err("not ready".into()),
        NodeState::Unreachable => return Err("unreachable".into()),
    }
    if n.cordoned {
        return Err("cordoned".into());
    }
    if let Some(dc) = &req.datacenter
        && dc != &n.datacenter
    {
        return Err(format!("not in datacenter {dc}"));
    }
    for (k, v) in &req.selector {
        if n.labels.get(k) != Some(v) {
            return Err(format!("label {k}={v} missing"));
        }
    }
    if let Some(h) = &req.hypervisor
        && !n.hypervisors.contains(h)
    {
        return Err(format!("no {h} hypervisor"));
    }
    if let Some(a) = &req.arch
        && a != &n.arch
    {
        return Err(format!("arch not {a}"));
    }
    let (cpu, mem, disk) = free(n);
    if f64::from(req.resources.vcpus) > cpu {
        return Err(format!("insufficient vcpus (need {})", req.resources.vcpus));
    }
    if req.resources.memory_mib as f64 > mem {
        return Err(format!("insufficient memory (need {} MiB)", req.resources.memory_mib));
    }
    if req.resources.disk_mib > disk {
        return Err(format!("insufficient disk (need {} MiB)", req.resources.disk_mib));
    }
    // Best fit on memory: less memory left over scores higher.
    let left = mem - req.resources.memory_mib as f64;
    Ok(1.0 / (1.0 + left))
}

pub fn explain(snapshot: &Snapshot, req: &Request) -> Explanation {
    let mut nodes = Vec::new();
    let mut best: Option<(f64, String)> = None;
    for n in snapshot.nodes.values() {
        match verdict(n, req) {
            Ok(score) => {
                if best.as_ref().is_none_or(|(s, _)| score > *s) {
                    best = Some((score, n.name.clone()));
                }
                nodes.push(NodeVerdict {
                    node: n.name.clone(),
                    feasible: true,
                    reason: String::new(),
                    score,
                });
            }
            Err(reason) => {
                nodes.push(NodeVerdict { node: n.name.clone(), feasible: false, reason, score: 0.0 })
            }
        }
    }
    Explanation { chosen: best.map(|(_, n)| n), nodes }
}

pub fn place(snapshot: &Snapshot, req: &Request) -> Result<Placement, Unschedulable> {
    let e = explain(snapshot, req);
    if let Some(node) = e.chosen {
        let score = e.nodes.iter().find(|v| v.node == node).map_or(0.0, |v| v.score);
        return Ok(Placement { node, score });
    }
    let mut reasons = BTreeMap::new();
    for v in &e.nodes {
        *reasons.entry(v.reason.clone()).or_default() += 1;
    }
    Err(Unschedulable { nodes: e.nodes.len(), reasons })
}
