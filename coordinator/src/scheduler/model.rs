//! The scheduler's own plain types: what it knows of a node and what a request asks for. The rest of the
//! coordinator fills them from the grid view; nothing here reads a store or talks to an agent.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{AddAssign, SubAssign};

use serde::Serialize;

/// An amount of the three resources placement accounts for. Memory and disk in MiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

impl AddAssign for Resources {
    fn add_assign(&mut self, r: Resources) {
        self.vcpus = self.vcpus.saturating_add(r.vcpus);
        self.memory_mib = self.memory_mib.saturating_add(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_add(r.disk_mib);
    }
}

/// Saturating: releasing more than was reserved leaves zero, never wraps.
impl SubAssign for Resources {
    fn sub_assign(&mut self, r: Resources) {
        self.vcpus = self.vcpus.saturating_sub(r.vcpus);
        self.memory_mib = self.memory_mib.saturating_sub(r.memory_mib);
        self.disk_mib = self.disk_mib.saturating_sub(r.disk_mib);
    }
}

/// A node's health as the poller sees it. Cordoning is a separate flag: a cordoned node stays `Ready`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    #[default]
    Ready,
    /// A diagnostic failed.
    NotReady,
    /// Missed polls.
    Unreachable,
}

#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    pub cordoned: bool,
    /// A dedicated (bare-metal) server: provisioned whole for one tenant, never a VM host.
    pub dedicated: bool,
    pub datacenter: String,
    pub labels: BTreeMap<String, String>,
    /// Hypervisor kinds the node runs, e.g. "kvm", "qemu" (TCG), "test".
    pub hypervisors: Vec<String>,
    pub arch: String,
    pub capacity: Resources,
    /// Schedulable vCPUs are `capacity.vcpus * overcommit_cpu`.
    pub overcommit_cpu: f64,
    /// Schedulable memory is `capacity.memory_mib * overcommit_memory`. Pool disk is never overcommitted.
    pub overcommit_memory: f64,
    pub allocated: Resources,
    /// Images ("name:version") the node holds or can reach from its image store: the image filter.
    pub images: BTreeSet<String>,
    /// Images already in the node's cache (a subset of `images`): the locality score.
    pub cached_images: BTreeSet<String>,
    pub licenses: BTreeSet<String>,
    /// Observed CPU load, 0.0..=1.0 of the whole node.
    pub cpu_load: f64,
    /// Spread (anti-affinity / tenant) group -> number of that group's VMs on this node.
    pub groups: BTreeMap<String, u32>,
    /// Disk-heavy operations placed on the node and not finished (queued or running).
    pub disk_jobs: u32,
    /// Disk-heavy jobs the node runs at once (the coordinator's per-node limit); 0 means no limit.
    pub disk_slots: u32,
}

impl NodeInfo {
    /// Ready, not cordoned, not a dedicated server: the only nodes the placement index holds.
    pub fn schedulable(&self) -> bool {
        self.state == NodeState::Ready && !self.cordoned && !self.dedicated
    }

    /// What is left after overcommit: `capacity * ratio - allocated`, never below zero.
    pub fn free(&self) -> Resources {
        let vcpus = (f64::from(self.capacity.vcpus) * self.overcommit_cpu) as u64;
        let memory = (self.capacity.memory_mib as f64 * self.overcommit_memory) as u64;
        Resources {
            vcpus: vcpus.saturating_sub(u64::from(self.allocated.vcpus)).min(u64::from(u32::MAX)) as u32,
            memory_mib: memory.saturating_sub(self.allocated.memory_mib),
            disk_mib: self.capacity.disk_mib.saturating_sub(self.allocated.disk_mib),
        }
    }

    /// Whether one more disk-heavy job would start at once rather than wait for a slot.
    pub fn has_free_slot(&self) -> bool {
        self.disk_slots == 0 || self.disk_jobs < self.disk_slots
    }

    /// How many VMs of `group` this node holds.
    pub fn group_count(&self, group: &str) -> u32 {
        self.groups.get(group).copied().unwrap_or(0)
    }
}

/// A VM's workload class, which makes some hypervisor kinds preferable (a soft score, never a filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// No preference.
    General,
    /// Disk and network bound: wants a type-1 hypervisor (virtio on KVM or Xen), not emulated I/O under TCG.
    IoHeavy,
    /// CPU bound: wants hardware virtualization (KVM or Xen), not TCG's binary translation.
    CpuHeavy,
}

impl Workload {
    /// The hypervisor kinds this workload prefers. "qemu" (TCG) and "test" are never preferred.
    pub fn preferred_hypervisors(self) -> &'static [&'static str] {
        match self {
            Workload::General => &[],
            Workload::IoHeavy | Workload::CpuHeavy => &["kvm", "xen"],
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub vm: String,
    pub resources: Resources,
    /// "name:version"; empty for a VM that needs no image (a blank disk).
    pub image: String,
    /// Layer images ("name:version") overlaid on `image`: the node must reach them too.
    pub layers: Vec<String>,
    pub datacenter: Option<String>,
    /// Pinned node.
    pub node: Option<String>,
    /// Labels the node must carry with exactly these values.
    pub selector: BTreeMap<String, String>,
    pub hypervisor: Option<String>,
    pub arch: Option<String>,
    /// Licenses the node must have, all of them.
    pub licenses: BTreeSet<String>,
    /// Anti-affinity: spread this group's VMs over as many nodes as possible.
    pub spread_group: Option<String>,
    pub workload: Option<Workload>,
    /// Nodes never to use (e.g. a migration's source).
    pub exclude: BTreeSet<String>,
}

impl Request {
    /// The images the node must reach: the OS image (when there is one), then the layers.
    pub fn needed_images(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.image).filter(|i| !i.is_empty()).chain(&self.layers)
    }
}
