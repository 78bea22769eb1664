//! The grid model: nodes, VMs and operations as the contract's messages, the in-memory grid view built from
//! them once at start, and the changes that move it on. Pure: no I/O.
//!
//! A VM's allocation is its `resources` on its `node` for as long as the VM record exists and is not
//! DELETED, so the reservation commits in the same transaction as the VM record and its operation.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

pub use gridforge_proto::v1::{
    GridUser, Group, Node, Operation, OperationStep, Resources, Tenant, Vm, VmSpec,
};
use gridforge_proto::v1::{node, operation, vm};

use crate::scheduler::{self, NodeInfo, Snapshot};

pub type NodeState = node::State;
pub type VmState = vm::State;
pub type OpState = operation::State;
pub type OpKind = operation::Kind;

/// One change to the grid view. A decision's list of changes is applied to the view and committed, with the
/// other decisions queued meanwhile, in one store transaction.
// Changes live only from a decision to its commit, a few at a time: boxing them would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Change {
    PutNode(Node),
    RemoveNode(String),
    PutVm(Vm),
    RemoveVm(String),
    PutOp(Operation),
    /// Forget a finished operation (the purge of old history).
    RemoveOp(String),
    PutUser(GridUser),
    RemoveUser(String),
    /// A tenant with its quota and groups.
    PutTenant(Tenant),
    RemoveTenant(String),
}

/// Overcommit ratios for nodes that set none.
#[derive(Clone, Copy, Debug)]
pub struct Defaults {
    pub overcommit_cpu: f64,
    pub overcommit_memory: f64,
    /// Disk-heavy jobs a node runs at once (`ops.max_disk_jobs_per_node`): placement prefers a node with one
    /// free. 0: no limit.
    pub disk_slots: u32,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults { overcommit_cpu: 4.0, overcommit_memory: 1.0, disk_slots: 2 }
    }
}

/// The whole grid view in memory, with the indexes reads need. Reads never touch the store.
#[derive(Debug)]
pub struct GridState {
    pub nodes: BTreeMap<String, Node>,
    pub vms: BTreeMap<String, Vm>,
    pub ops: BTreeMap<String, Operation>,
    /// API users by certificate CN (the configuration's [auth] applies to names not here).
    pub users: BTreeMap<String, GridUser>,
    /// Tenants by name, each with its groups.
    pub tenants: BTreeMap<String, Tenant>,
    /// Names of the VMs (DELETED included) of each tenant.
    pub vms_by_tenant: BTreeMap<String, BTreeSet<String>>,
    /// Names of the VMs (not DELETED) placed on each node.
    pub vms_by_node: BTreeMap<String, BTreeSet<String>>,
    /// Names of the VMs outside a group with thresholds of their own (see [`scales_alone`]).
    pub scaled_alone: BTreeSet<String>,
    /// The VMs that left the grid (removed or DELETED) since the view was built, in order.
    pub departures: Departures,
    /// Per node, its unfinished disk-heavy operations (see [`disk_job_node`]).
    pub disk_jobs: BTreeMap<String, u32>,
    /// The scheduler's view of the nodes, kept in step with every change.
    pub snapshot: Snapshot,
    pub defaults: Defaults,
    /// The highest operation number handed out.
    pub op_seq: u64,
}

impl GridState {
    /// The view from the records as loaded from the store.
    pub fn new(nodes: Vec<Node>, vms: Vec<Vm>, ops: Vec<Operation>, defaults: Defaults) -> GridState {
        let mut state = GridState {
            nodes: BTreeMap::new(),
            vms: BTreeMap::new(),
            ops: BTreeMap::new(),
            users: BTreeMap::new(),
            tenants: BTreeMap::new(),
            vms_by_tenant: BTreeMap::new(),
            vms_by_node: BTreeMap::new(),
            scaled_alone: BTreeSet::new(),
            departures: Departures::new(),
            disk_jobs: BTreeMap::new(),
            snapshot: Snapshot::new(Vec::new()),
            defaults,
            op_seq: 0,
        };
        for n in nodes {
            state.nodes.insert(n.name.clone(), n);
        }
        for v in vms {
            state.index_vm(&v);
            state.vms.insert(v.name.clone(), v);
        }
        for o in ops {
            state.op_seq = state.op_seq.max(op_number(&o.id));
            if let Some(node) = disk_job_node(&o) {
                *state.disk_jobs.entry(node.to_owned()).or_default() += 1;
            }
            state.ops.insert(o.id.clone(), o);
        }
        let infos = state.nodes.values().map(|n| state.node_info(n)).collect();
        state.snapshot = Snapshot::new(infos);
        state
    }

    pub fn apply(&mut self, change: &Change) {
        match change {
            Change::PutNode(n) => {
                self.nodes.insert(n.name.clone(), n.clone());
                self.refresh_node(&n.name);
            }
            Change::RemoveNode(name) => {
                self.nodes.remove(name);
                self.snapshot.remove_node(name);
            }
            Change::PutVm(v) => {
                if v.state() == VmState::Deleted {
                    self.departing(&v.name);
                }
                let old = self.unindex_vm(&v.name);
                self.index_vm(v);
                self.vms.insert(v.name.clone(), v.clone());
                let nodes: BTreeSet<String> =
                    old.into_iter().chain(allocation_nodes(v).map(str::to_owned)).collect();
                for node in &nodes {
                    self.refresh_node(node);
                }
            }
            Change::RemoveVm(name) => {
                self.departing(name);
                let old = self.unindex_vm(name);
                self.vms.remove(name);
                for node in &old {
                    self.refresh_node(node);
                }
            }
            Change::RemoveOp(id) => {
                if let Some(node) = self.ops.remove(id).as_ref().and_then(disk_job_node) {
                    let node = node.to_owned();
                    self.count_disk_job(&node, -1);
                }
            }
            Change::PutUser(u) => drop(self.users.insert(u.name.clone(), u.clone())),
            Change::RemoveUser(name) => drop(self.users.remove(name)),
            Change::PutTenant(t) => drop(self.tenants.insert(t.name.clone(), t.clone())),
            Change::RemoveTenant(name) => drop(self.tenants.remove(name)),
            Change::PutOp(o) => {
                self.op_seq = self.op_seq.max(op_number(&o.id));
                let before = self.ops.insert(o.id.clone(), o.clone());
                let old = before.as_ref().and_then(disk_job_node);
                let new = disk_job_node(o);
                if old != new {
                    if let Some(node) = old {
                        self.count_disk_job(node, -1);
                    }
                    if let Some(node) = new {
                        self.count_disk_job(node, 1);
                    }
                }
            }
        }
    }

    /// Logs `name` as departed if it is in the grid now (its record is about to go or become DELETED).
    fn departing(&mut self, name: &str) {
        if self.vms.get(name).is_some_and(|v| v.state() != VmState::Deleted) {
            self.departures.push(name);
        }
    }

    fn count_disk_job(&mut self, node: &str, delta: i32) {
        let count = self.disk_jobs.entry(node.to_owned()).or_default();
        *count = count.saturating_add_signed(delta);
        let count = *count;
        if count == 0 {
            self.disk_jobs.remove(node);
        }
        self.snapshot.set_disk_jobs(node, count);
    }

    /// Takes the VM out of the per-node index; the nodes it was under.
    fn unindex_vm(&mut self, name: &str) -> Vec<String> {
        let Some(old) = self.vms.get(name) else { return Vec::new() };
        let nodes: Vec<String> = allocation_nodes(old).map(str::to_owned).collect();
        for node in &nodes {
            if let Some(set) = self.vms_by_node.get_mut(node) {
                set.remove(name);
            }
        }
        if let Some(set) = self.vms_by_tenant.get_mut(&old.tenant) {
            set.remove(name);
        }
        self.scaled_alone.remove(name);
        nodes
    }

    fn index_vm(&mut self, v: &Vm) {
        for node in allocation_nodes(v) {
            self.vms_by_node.entry(node.to_owned()).or_default().insert(v.name.clone());
        }
        if !v.tenant.is_empty() {
            self.vms_by_tenant.entry(v.tenant.clone()).or_default().insert(v.name.clone());
        }
        if scales_alone(v) {
            self.scaled_alone.insert(v.name.clone());
        }
    }

    /// The VMs of `tenant` that are not DELETED (of one `group` of it, unless empty).
    pub fn tenant_vms<'a>(&'a self, tenant: &str, group: &'a str) -> impl Iterator<Item = &'a Vm> {
        self.vms_by_tenant
            .get(tenant)
            .into_iter()
            .flatten()
            .filter_map(|name| self.vms.get(name))
            .filter(move |v| v.state() != VmState::Deleted && (group.is_empty() || v.group == group))
    }

    /// What `tenant`'s VMs (not DELETED) hold, and how many there are.
    pub fn tenant_usage(&self, tenant: &str) -> (Resources, u32) {
        let mut used = Resources::default();
        let mut count = 0;
        for v in self.tenant_vms(tenant, "") {
            let r = v.resources.unwrap_or_default();
            used.vcpus += r.vcpus;
            used.memory_mib += r.memory_mib;
            used.disk_mib += r.disk_mib;
            count += 1;
        }
        (used, count)
    }

    fn refresh_node(&mut self, name: &str) {
        if let Some(n) = self.nodes.get(name) {
            let info = self.node_info(n);
            self.snapshot.upsert_node(info);
        }
    }

    /// The VMs holding an allocation on `node`.
    pub fn vms_on(&self, node: &str) -> impl Iterator<Item = &Vm> {
        self.vms_by_node.get(node).into_iter().flatten().filter_map(|name| self.vms.get(name))
    }

    /// The sum of the allocations on `node`.
    pub fn allocated(&self, node: &str) -> Resources {
        let mut sum = Resources::default();
        for v in self.vms_on(node) {
            let r = v.resources.unwrap_or_default();
            sum.vcpus += r.vcpus;
            sum.memory_mib += r.memory_mib;
            sum.disk_mib += r.disk_mib;
        }
        sum
    }

    /// The scheduler's record of a node.
    pub fn node_info(&self, n: &Node) -> NodeInfo {
        let mut groups = BTreeMap::new();
        for v in self.vms_on(&n.name) {
            if let Some(p) = &v.placement
                && !p.spread_group.is_empty()
            {
                *groups.entry(p.spread_group.clone()).or_insert(0u32) += 1;
            }
        }
        let allocated = self.allocated(&n.name);
        let capacity = n.capacity.unwrap_or_default();
        NodeInfo {
            name: n.name.clone(),
            state: match n.state() {
                NodeState::Ready => scheduler::NodeState::Ready,
                NodeState::Unreachable | NodeState::Lost => scheduler::NodeState::Unreachable,
                NodeState::NotReady | NodeState::Unspecified => scheduler::NodeState::NotReady,
            },
            cordoned: n.cordoned,
            dedicated: n.dedicated,
            datacenter: n.datacenter.clone(),
            labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            hypervisors: n.hypervisors.clone(),
            arch: n.arch.clone(),
            capacity: to_sched(&capacity),
            overcommit_cpu: ratio(n.overcommit_cpu, self.defaults.overcommit_cpu),
            overcommit_memory: ratio(n.overcommit_memory, self.defaults.overcommit_memory),
            allocated: to_sched(&allocated),
            images: n.images.iter().cloned().collect(),
            cached_images: n.cached_images.iter().cloned().collect(),
            licenses: n.licenses.iter().cloned().collect(),
            cpu_load: n.cpu_load,
            groups,
            disk_jobs: self.disk_jobs.get(&n.name).copied().unwrap_or(0),
            disk_slots: self.defaults.disk_slots,
        }
    }

    /// The operation that holds `vm`'s lock, if one does.
    pub fn lock_holder(&self, vm: &str) -> Option<&Operation> {
        let v = self.vms.get(vm)?;
        if v.operation.is_empty() {
            return None;
        }
        self.ops.get(&v.operation).filter(|o| !is_finished(o))
    }

    /// A new operation id: `op-` and a number that grows with every operation.
    pub fn next_op_id(&mut self) -> String {
        self.op_seq += 1;
        format!("op-{:06}", self.op_seq)
    }
}

/// Departures kept: a reader that falls further behind (or reads a view rebuilt since) looks at every VM
/// instead.
pub const KEPT_DEPARTURES: usize = 4096;

/// Distinguishes the departure logs of successive views (a view rebuilt from the store starts a new one).
static DEPARTURE_EPOCHS: AtomicU64 = AtomicU64::new(0);

/// The names of the VMs that left the grid (their record removed or DELETED), oldest first, the last
/// [`KEPT_DEPARTURES`] of them: what keeps data of its own per VM beside the view (the scaling loop's load
/// windows) follows it with a [`DepartureCursor`] instead of comparing its names with every VM.
#[derive(Debug)]
pub struct Departures {
    epoch: u64,
    /// The position of `names[0]` since the log began.
    first: u64,
    names: VecDeque<String>,
}

/// A reader's position in a view's [`Departures`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DepartureCursor {
    epoch: u64,
    next: u64,
}

impl Departures {
    fn new() -> Departures {
        Departures {
            epoch: DEPARTURE_EPOCHS.fetch_add(1, Ordering::Relaxed),
            first: 0,
            names: VecDeque::new(),
        }
    }

    fn push(&mut self, name: &str) {
        self.names.push_back(name.to_owned());
        if self.names.len() > KEPT_DEPARTURES {
            self.names.pop_front();
            self.first += 1;
        }
    }

    /// The position after the last departure.
    pub fn end(&self) -> DepartureCursor {
        DepartureCursor { epoch: self.epoch, next: self.first + self.names.len() as u64 }
    }

    /// The names that departed from `cursor` on (a name may come more than once); `None` when the log does
    /// not reach back to it (it is of another view, or fell out of the log).
    pub fn since(&self, cursor: DepartureCursor) -> Option<impl Iterator<Item = &str>> {
        let skip = cursor.next.checked_sub(self.first).filter(|_| cursor.epoch == self.epoch)?;
        let skip = usize::try_from(skip).ok().filter(|&n| n <= self.names.len())?;
        Some(self.names.iter().skip(skip).map(String::as_str))
    }
}

/// Whether a VM outside a group is scaled by thresholds of its own (vertically; not DELETED).
pub fn scales_alone(v: &Vm) -> bool {
    v.scaling.is_some_and(|p| p.vertical) && v.group.is_empty() && v.state() != VmState::Deleted
}

fn ratio(value: f64, default: f64) -> f64 {
    if value > 0.0 { value } else { default }
}

pub fn to_sched(r: &Resources) -> scheduler::Resources {
    scheduler::Resources { vcpus: r.vcpus, memory_mib: r.memory_mib, disk_mib: r.disk_mib }
}

/// Whether a VM record reserves capacity on its node.
pub fn holds_allocation(v: &Vm) -> bool {
    !v.node.is_empty() && !matches!(v.state(), VmState::Deleted | VmState::Pending)
}

/// The nodes a VM record reserves capacity on: its node, and while it migrates its destination too.
pub fn allocation_nodes(v: &Vm) -> impl Iterator<Item = &str> {
    let held = holds_allocation(v);
    let node = held.then_some(v.node.as_str());
    let dest = (held && v.state() == VmState::Migrating && !v.migrating_to.is_empty())
        .then_some(v.migrating_to.as_str());
    node.into_iter().chain(dest)
}

pub fn is_finished(o: &Operation) -> bool {
    matches!(o.state(), OpState::Succeeded | OpState::Failed)
}

/// Whether an operation of this kind runs a disk-heavy agent job (one of a node's disk-job slots): all but
/// power control.
pub fn is_disk_heavy(kind: OpKind) -> bool {
    !matches!(kind, OpKind::ControlVm | OpKind::DrainNode | OpKind::FenceNode | OpKind::Unspecified)
}

/// The node whose disk-job slots an operation takes or waits for: an unfinished disk-heavy one's node.
pub fn disk_job_node(o: &Operation) -> Option<&str> {
    (is_disk_heavy(o.kind()) && !is_finished(o) && !o.node.is_empty()).then_some(o.node.as_str())
}

fn op_number(id: &str) -> u64 {
    id.strip_prefix("op-").and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// What a spec reserves: machine vCPUs and memory (the agent's defaults when unset) and the disk.
pub fn spec_resources(spec: &VmSpec) -> Resources {
    let machine = spec.machine.clone().unwrap_or_default();
    Resources {
        vcpus: if machine.vcpus == 0 { 1 } else { machine.vcpus },
        memory_mib: if machine.memory_mib == 0 { 1024 } else { machine.memory_mib },
        disk_mib: spec.disk.as_ref().map_or(0, |d| d.size_mib),
    }
}

/// The pool volume the agent keeps a VM's disk in.
pub fn volume_name(vm: &str) -> String {
    format!("{vm}.raw")
}

pub fn now() -> pbjson_types::Timestamp {
    gridforge_agent::node::timestamp(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gridforge_proto::v1::{DiskLayout, Machine, PlacementConstraints};

    pub fn node(name: &str, vcpus: u32, memory_mib: u64) -> Node {
        Node {
            name: name.into(),
            state: NodeState::Ready as i32,
            capacity: Some(Resources { vcpus, memory_mib, disk_mib: 100_000 }),
            ..Default::default()
        }
    }

    pub fn vm(name: &str, node: &str, memory_mib: u64, group: &str) -> Vm {
        let spec = VmSpec {
            name: name.into(),
            machine: Some(Machine { vcpus: 1, memory_mib, ..Default::default() }),
            disk: Some(DiskLayout { size_mib: 1024, ..Default::default() }),
            ..Default::default()
        };
        Vm {
            name: name.into(),
            node: node.into(),
            resources: Some(spec_resources(&spec)),
            spec: Some(spec),
            state: VmState::Running as i32,
            placement: Some(PlacementConstraints { spread_group: group.into(), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn allocations_follow_vm_records() {
        let mut g = GridState::new(vec![node("n1", 4, 4096)], vec![], vec![], Defaults::default());
        g.apply(&Change::PutVm(vm("a", "n1", 1024, "web")));
        g.apply(&Change::PutVm(vm("b", "n1", 512, "web")));
        assert_eq!(g.allocated("n1").memory_mib, 1536);
        let info = g.snapshot.node("n1").unwrap();
        assert_eq!(info.allocated.memory_mib, 1536);
        assert_eq!(info.groups.get("web"), Some(&2));

        let mut deleted = vm("a", "n1", 1024, "web");
        deleted.state = VmState::Deleted as i32;
        g.apply(&Change::PutVm(deleted));
        assert_eq!(g.snapshot.node("n1").unwrap().allocated.memory_mib, 512);
        g.apply(&Change::RemoveVm("b".into()));
        assert_eq!(g.snapshot.node("n1").unwrap().allocated.memory_mib, 0);
        assert!(g.vms.contains_key("a"), "a deleted VM keeps its record (wipe report)");
    }

    #[test]
    fn op_ids_continue_after_load() {
        let op = Operation { id: "op-000041".into(), ..Default::default() };
        let mut g = GridState::new(vec![], vec![], vec![op], Defaults::default());
        assert_eq!(g.next_op_id(), "op-000042");
    }

    #[test]
    fn a_finished_operation_holds_no_lock() {
        let mut v = vm("a", "n1", 512, "");
        v.operation = "op-000001".into();
        let mut op =
            Operation { id: "op-000001".into(), state: OpState::Running as i32, ..Default::default() };
        let mut g = GridState::new(vec![], vec![v], vec![op.clone()], Defaults::default());
        assert_eq!(g.lock_holder("a").map(|o| o.id.as_str()), Some("op-000001"));
        op.state = OpState::Succeeded as i32;
        g.apply(&Change::PutOp(op));
        assert!(g.lock_holder("a").is_none());
    }

    #[test]
    fn unfinished_disk_heavy_operations_count_against_their_node() {
        let op = |id: &str, kind: OpKind, state: OpState| Operation {
            id: id.into(),
            kind: kind as i32,
            node: "n1".into(),
            state: state as i32,
            ..Default::default()
        };
        let loaded = vec![op("op-000001", OpKind::CreateVm, OpState::Running)];
        let mut g = GridState::new(vec![node("n1", 4, 4096)], vec![], loaded, Defaults::default());
        let jobs = |g: &GridState| g.snapshot.node("n1").unwrap().disk_jobs;
        assert_eq!(jobs(&g), 1, "counted from the operations loaded at start");
        g.apply(&Change::PutOp(op("op-000002", OpKind::DeleteVm, OpState::Queued)));
        g.apply(&Change::PutOp(op("op-000003", OpKind::ControlVm, OpState::Running)));
        assert_eq!(jobs(&g), 2, "power control takes no disk-job slot");
        assert!(!g.snapshot.node("n1").unwrap().has_free_slot());
        g.apply(&Change::PutOp(op("op-000002", OpKind::DeleteVm, OpState::Running)));
        assert_eq!(jobs(&g), 2, "a state change within unfinished counts once");
        g.apply(&Change::PutOp(op("op-000001", OpKind::CreateVm, OpState::Succeeded)));
        g.apply(&Change::PutOp(op("op-000002", OpKind::DeleteVm, OpState::Failed)));
        assert_eq!(jobs(&g), 0);
        assert!(g.disk_jobs.is_empty());
        // A VM change re-reads the node's record: the count must survive it.
        g.apply(&Change::PutOp(op("op-000004", OpKind::SnapshotVm, OpState::Running)));
        g.apply(&Change::PutVm(vm("a", "n1", 512, "")));
        assert_eq!(jobs(&g), 1);
    }

    #[test]
    fn departures_name_each_vm_that_leaves_once_and_readers_behind_the_log_are_told() {
        let mut g = GridState::new(
            vec![node("n1", 4, 4096)],
            vec![vm("kept", "n1", 512, "")],
            vec![],
            Defaults::default(),
        );
        let start = g.departures.end();
        for name in ["a", "b", "c"] {
            g.apply(&Change::PutVm(vm(name, "n1", 512, "")));
        }
        let mut deleted = vm("a", "n1", 512, "");
        deleted.state = VmState::Deleted as i32;
        g.apply(&Change::PutVm(deleted.clone()));
        g.apply(&Change::PutVm(deleted));
        g.apply(&Change::RemoveVm("a".into()));
        g.apply(&Change::RemoveVm("b".into()));
        g.apply(&Change::RemoveVm("never-there".into()));
        g.apply(&Change::PutVm(vm("kept", "n1", 1024, "")));
        let since: Vec<&str> = g.departures.since(start).unwrap().collect();
        assert_eq!(since, ["a", "b"], "a DELETED record leaving again is no second departure");
        let end = g.departures.end();
        assert_eq!(g.departures.since(end).unwrap().count(), 0);

        for i in 0..KEPT_DEPARTURES {
            let name = format!("v{i}");
            g.apply(&Change::PutVm(vm(&name, "n1", 1, "")));
            g.apply(&Change::RemoveVm(name));
        }
        assert!(g.departures.since(start).is_none(), "fell out of the log");
        assert_eq!(g.departures.since(end).unwrap().count(), KEPT_DEPARTURES);
        let rebuilt = GridState::new(vec![], vec![], vec![], Defaults::default());
        assert!(rebuilt.departures.since(g.departures.end()).is_none(), "a cursor of another view");
    }

    #[test]
    fn vms_scaled_alone_are_indexed() {
        let policy = gridforge_proto::v1::ScalingPolicy { vertical: true, ..Default::default() };
        let mut solo = vm("solo", "n1", 512, "");
        solo.scaling = Some(policy);
        let mut member = vm("member", "n1", 512, "web");
        member.group = "web".into();
        member.scaling = Some(policy);
        let mut g = GridState::new(
            vec![node("n1", 4, 4096)],
            vec![solo.clone(), member],
            vec![],
            Defaults::default(),
        );
        assert_eq!(g.scaled_alone.iter().collect::<Vec<_>>(), ["solo"]);
        solo.state = VmState::Deleted as i32;
        g.apply(&Change::PutVm(solo.clone()));
        assert!(g.scaled_alone.is_empty());
        solo.state = VmState::Running as i32;
        g.apply(&Change::PutVm(solo.clone()));
        assert_eq!(g.scaled_alone.len(), 1);
        solo.scaling = None;
        g.apply(&Change::PutVm(solo));
        assert!(g.scaled_alone.is_empty());
    }
}
