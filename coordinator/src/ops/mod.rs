//! Operations: every request that changes a VM becomes an operation stored with its steps; each step that
//! touches an agent is one agent job with the idempotency key `"{op}/{step}"`, so a retry or a coordinator
//! restart re-attaches to the same job and nothing is provisioned twice. An operation holds its VM's lock
//! until it ends; disk-heavy steps take one of a node's slots (the rest wait QUEUED). Unfinished operations
//! are resumed from the store at start.

mod dedicated;
mod drain;
mod fence;
mod migrate;
mod nodes;
mod run;
pub mod scaling;
mod tenants;
#[cfg(test)]
mod tests;
pub mod users;

pub(crate) use run::status_text;
pub use tenants::{group_of, network_view, tenant_view};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridforge_agent::jobs::{scrub_spec, validate_spec};
use gridforge_proto::v1::{
    ControlVmRequest, CreateVmRequest, CreateVmResponse, DeleteVmRequest, Explanation, Machine, NodeVerdict,
    OperationEvent, PlacementConstraints, ResizeVmRequest, SnapshotVmRequest, control_job::Action,
};
use tokio::sync::{Semaphore, broadcast};

pub use nodes::{NodeError, capacity as nodes_capacity, health as nodes_health};

use crate::agents::AgentPool;
use crate::config::OpsConfig;
use crate::grid::{
    Change, GridState, OpKind, OpState, Operation, OperationStep, Resources, Vm, VmSpec, VmState, now,
    spec_resources, volume_name,
};
use crate::scheduler::{self, Request, Workload};
use crate::store::{GridView, Pending, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    /// The VM's lock is held by another operation, or the grid's state forbids the request.
    #[error("{0}")]
    Precondition(String),
    #[error("unschedulable: {0}")]
    Unschedulable(String),
    /// A tenant's quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The operations engine over the grid view. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    view: GridView,
    agents: AgentPool,
    config: OpsConfig,
    fencing: crate::config::FencingConfig,
    /// Progress of running operations, for WatchOperation.
    events: Mutex<HashMap<String, broadcast::Sender<OperationEvent>>>,
    /// Full specs (with secrets) of creates whose agent job is not submitted yet. Never stored.
    secrets: Mutex<HashMap<String, VmSpec>>,
    /// Per node: slots for disk-heavy agent jobs.
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Operations whose starter waits to hear that the first agent job was handed over (see `dispatched`).
    dispatch: Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>,
    /// The coordinators of this grid: whether this one leads, and its term.
    cluster: Arc<crate::ha::Cluster>,
    /// The VMs' observed load over time, for scaling (in memory; a new leader collects its own).
    usage: Mutex<scaling::Usage>,
    /// The scaling loop's decisions, newest last (the last [`scaling::KEPT_DECISIONS`]).
    decisions: Mutex<std::collections::VecDeque<gridforge_proto::v1::Decision>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM name: it names the domain, the pool volume and the operation keys.
fn check_vm_name(name: &str) -> Result<(), OpError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(OpError::Invalid(format!(
            "invalid spec: name: {name:?} must be 1-63 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

/// The resize step that changes a domain's vCPUs and memory (the disk's is "resize").
pub(crate) const RESOURCES_STEP: &str = "resources";
/// The steps of a resize with restart that shut the domain down before and start it after.
pub(crate) const RESIZE_STOP_STEP: &str = "stop";
pub(crate) const RESIZE_START_STEP: &str = "start";
/// Seconds of ACPI grace a resize with restart gives the guest.
const RESIZE_STOP_GRACE_SECS: u32 = 30;

/// A new QUEUED operation of `kind` on `vm` (empty for a node's) at `node`, with its steps.
pub(super) fn new_op(
    id: &str,
    kind: OpKind,
    (vm, node): (&str, &str),
    steps: Vec<OperationStep>,
    who: &str,
    summary: String,
) -> Operation {
    let t = now();
    Operation {
        id: id.to_string(),
        kind: kind as i32,
        vm: vm.to_string(),
        node: node.to_string(),
        state: OpState::Queued as i32,
        steps,
        requested_by: who.to_string(),
        created: Some(t),
        updated: Some(t),
        summary,
        ..Default::default()
    }
}

/// The unfinished operation of `kind` on node `name` (a drain, a fence, a clean-up), if one runs.
pub(super) fn unfinished<'a>(s: &'a GridState, kind: OpKind, node: &str) -> Option<&'a Operation> {
    s.ops.values().find(|o| o.kind() == kind && o.node == node && !crate::grid::is_finished(o))
}

/// The record of node `name`, or NOT_FOUND.
pub(super) fn known_node(s: &GridState, name: &str) -> Result<crate::grid::Node, OpError> {
    s.nodes.get(name).cloned().ok_or_else(|| OpError::NotFound(format!("no node {name:?}")))
}

pub(super) fn step(name: &str, op: &str, node: &str) -> OperationStep {
    OperationStep {
        name: name.to_string(),
        state: OpState::Queued as i32,
        node: node.to_string(),
        idempotency_key: format!("{op}/{name}"),
        ..Default::default()
    }
}

/// The scheduler's request for a spec and its constraints.
/// An image as the agents list it: "name:version".
fn image_key(i: &gridforge_proto::v1::ImageRef) -> String {
    format!("{}:{}", i.name, i.version)
}

pub fn schedule_request(spec: &VmSpec, p: &PlacementConstraints) -> Request {
    let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let workload = match p.workload.as_str() {
        "io-heavy" | "io_heavy" => Some(Workload::IoHeavy),
        "cpu-heavy" | "cpu_heavy" => Some(Workload::CpuHeavy),
        "" => None,
        _ => Some(Workload::General),
    };
    Request {
        vm: spec.name.clone(),
        resources: crate::grid::to_sched(&spec_resources(spec)),
        image: spec.image.as_ref().map(image_key).unwrap_or_default(),
        layers: spec.layers.iter().map(image_key).collect(),
        datacenter: some(&p.datacenter),
        node: some(&p.node),
        selector: p.node_selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        hypervisor: some(&p.hypervisor),
        arch: some(&p.arch),
        licenses: p.licenses.iter().cloned().collect(),
        spread_group: some(&p.spread_group),
        workload,
        exclude: Default::default(),
    }
}

/// The explanation of a decision on `state`, as the contract has it.
pub fn explain(snapshot: &scheduler::Snapshot, req: &Request) -> Explanation {
    let e = scheduler::explain(snapshot, req);
    let summary = match scheduler::place(snapshot, req) {
        Ok(p) => format!("{} nodes: placed on {}", e.nodes.len(), p.node),
        Err(u) => u.to_string(),
    };
    Explanation {
        chosen: e.chosen.clone().unwrap_or_default(),
        nodes: e
            .nodes
            .iter()
            .map(|v| match &v.verdict {
                Ok(scores) => NodeVerdict {
                    node: v.name.clone(),
                    feasible: true,
                    reason: String::new(),
                    score: scores.total,
                },
                Err(why) => {
                    NodeVerdict { node: v.name.clone(), feasible: false, reason: why.to_string(), score: 0.0 }
                }
            })
            .collect(),
        summary,
    }
}

impl Engine {
    /// An engine whose lost nodes wait for `gridctl node fenced` (the manual actuator).
    pub fn new(view: GridView, agents: AgentPool, config: OpsConfig) -> Engine {
        Engine::with_fencing(view, agents, config, crate::config::FencingConfig::default())
    }

    pub fn with_fencing(
        view: GridView,
        agents: AgentPool,
        config: OpsConfig,
        fencing: crate::config::FencingConfig,
    ) -> Engine {
        let me = crate::ha::Member { name: "coordinator".into(), address: String::new() };
        Engine::in_cluster(view, agents, config, fencing, Arc::new(crate::ha::Cluster::embedded(me)))
    }

    /// An engine that is one member of `cluster` (it acts only while it leads).
    pub fn in_cluster(
        view: GridView,
        agents: AgentPool,
        config: OpsConfig,
        fencing: crate::config::FencingConfig,
        cluster: Arc<crate::ha::Cluster>,
    ) -> Engine {
        Engine {
            inner: Arc::new(Inner {
                view,
                agents,
                config,
                fencing,
                events: Mutex::default(),
                secrets: Mutex::default(),
                slots: Mutex::default(),
                dispatch: Mutex::default(),
                cluster,
                usage: Mutex::default(),
                decisions: Mutex::default(),
            }),
        }
    }

    pub fn cluster(&self) -> &Arc<crate::ha::Cluster> {
        &self.inner.cluster
    }

    /// The leader term the agents get with each job and cancel: the election revision this coordinator won
    /// with (0: the embedded store); agents refuse lower ones than they have taken.
    pub fn leader_term(&self) -> u64 {
        self.inner.cluster.term()
    }

    pub fn view(&self) -> &GridView {
        &self.inner.view
    }

    pub fn agents(&self) -> &AgentPool {
        &self.inner.agents
    }

    /// Start the runners of every unfinished operation (after a restart). Needs a tokio runtime.
    pub fn resume(&self) -> usize {
        let ids: Vec<String> = self.view().read(|s| {
            s.ops.values().filter(|o| !crate::grid::is_finished(o)).map(|o| o.id.clone()).collect()
        });
        for id in &ids {
            tracing::info!(op = %id, "resuming operation");
            self.spawn(id.clone());
        }
        ids.len()
    }

    /// Forgets finished operations last updated before `before`, except the latest of each VM (which its
    /// record names), at most `limit` per call, oldest first, in one transaction. Returns how many went.
    pub async fn purge_operations(
        &self,
        before: std::time::SystemTime,
        limit: usize,
    ) -> Result<usize, OpError> {
        let cutoff = gridforge_agent::node::timestamp(before);
        let older = |t: &Option<pbjson_types::Timestamp>| {
            t.as_ref().is_some_and(|t| (t.seconds, t.nanos) < (cutoff.seconds, cutoff.nanos))
        };
        self.view()
            .update(|s| {
                let current: std::collections::HashSet<&str> =
                    s.vms.values().map(|v| v.operation.as_str()).collect();
                let changes: Vec<Change> = s
                    .ops
                    .values()
                    .filter(|o| {
                        crate::grid::is_finished(o) && older(&o.updated) && !current.contains(o.id.as_str())
                    })
                    .take(limit)
                    .map(|o| Change::RemoveOp(o.id.clone()))
                    .collect();
                Ok::<_, OpError>((changes.len(), changes))
            })
            .await
    }

    fn spawn(&self, id: String) {
        let engine = self.clone();
        // Boxed with its Send bound written out: operations start operations (a fence its rebuilds), and the
        // compiler cannot see through that cycle of async fns on its own.
        let run: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move { engine.run(id).await });
        tokio::spawn(run);
    }

    /// Validate, place and store a create; the reservation commits with the VM record and the operation.
    pub async fn create_vm(&self, req: CreateVmRequest, who: &str) -> Result<CreateVmResponse, OpError> {
        let mut spec = req.spec.ok_or_else(|| OpError::Invalid("invalid spec: spec: required".into()))?;
        check_vm_name(&spec.name)?;
        let dedicated = req.dedicated;
        if dedicated {
            self.check_power()?;
            if !req.networks.is_empty() || !req.group.is_empty() {
                return Err(OpError::Invalid(
                    "a dedicated server joins no group or tenant network (those are for VMs)".into(),
                ));
            }
            // The whole server: no domain to define.
            spec.machine = None;
        } else if spec.machine.is_none() {
            spec.machine = Some(Machine { vcpus: 1, memory_mib: 1024, start: true, ..Default::default() });
        }
        // The agent's own checks, so that a spec it would refuse is refused before placement. Its field paths
        // start at the SubmitJobRequest; ours at the spec.
        validate_spec(&spec).map_err(|e| {
            OpError::Invalid(format!("invalid spec: {}", e.to_string().replace("provision.spec.", "spec.")))
        })?;
        let placement = req.placement.unwrap_or_default();
        let sreq = schedule_request(&spec, &placement);
        let (tenant, group, networks) = (req.tenant, req.group, req.networks);
        if tenant.is_empty() && !(group.is_empty() && networks.is_empty()) {
            return Err(OpError::Invalid("a group or tenant network needs its tenant (--tenant)".into()));
        }
        let bridge = self.inner.config.networks.bridge.clone();
        if req.dry_run && !dedicated {
            let explanation = self.view().read(|s| explain(&s.snapshot, &sreq));
            return Ok(CreateVmResponse { operation: None, explanation: Some(explanation) });
        }
        let mut stored = spec.clone();
        scrub_spec(&mut stored);
        let secrets = stored != spec;
        let name = spec.name.clone();
        let pending = self.view().stage(|s| {
            if let Some(v) = s.vms.get(&name)
                && v.state() != VmState::Deleted
            {
                return Err(OpError::AlreadyExists(format!(
                    "vm {name:?} already exists (on node {})",
                    v.node
                )));
            }
            if !networks.is_empty() {
                let nics = tenants::network_nics(s, &bridge, &tenant, &networks)?;
                for st in [&mut stored, &mut spec] {
                    st.machine.get_or_insert_with(Default::default).nics.extend(nics.iter().cloned());
                }
            }
            if dedicated {
                let (node, disk) = dedicated::place(s, &placement)?;
                let whole = s.nodes.get(&node).and_then(|n| n.capacity).unwrap_or_default();
                if !tenant.is_empty() {
                    tenants::check_quota(s, &tenant, &whole, 1)?;
                }
                if req.dry_run {
                    return Err(OpError::Invalid(format!(
                        "dry run: the server would be {node} (disk {disk})"
                    )));
                }
                let id = s.next_op_id();
                let t = now();
                let vm = Vm {
                    name: name.clone(),
                    tenant: tenant.clone(),
                    spec: Some(stored.clone()),
                    placement: Some(placement.clone()),
                    node: node.clone(),
                    volume: disk,
                    resources: Some(whole),
                    state: VmState::Provisioning as i32,
                    desired_state: "running".into(),
                    operation: id.clone(),
                    dedicated: true,
                    created: Some(t),
                    updated: Some(t),
                    ..Default::default()
                };
                let steps = vec![step("provision", &id, &node), step(dedicated::POWER_BOOT_STEP, &id, &node)];
                let summary = format!("create dedicated server {name} on {node}");
                let mut op = new_op(&id, OpKind::CreateVm, (&name, &node), steps, who, summary);
                op.secrets_in_memory = secrets;
                return Ok((op.clone(), vec![Change::PutVm(vm), Change::PutOp(op)]));
            }
            if !tenant.is_empty() {
                if !group.is_empty() && tenants::group_of(s, &tenant, &group).is_none() {
                    return Err(OpError::NotFound(format!("tenant {tenant} has no group {group:?}")));
                }
                tenants::check_quota(s, &tenant, &spec_resources(&stored), 1)?;
            }
            let chosen =
                scheduler::place(&s.snapshot, &sreq).map_err(|u| OpError::Unschedulable(u.to_string()))?;
            let id = s.next_op_id();
            let t = now();
            let vm = Vm {
                name: name.clone(),
                tenant: tenant.clone(),
                group: group.clone(),
                spec: Some(stored.clone()),
                placement: Some(placement.clone()),
                node: chosen.node.clone(),
                volume: volume_name(&name),
                resources: Some(spec_resources(&stored)),
                state: VmState::Provisioning as i32,
                desired_state: if stored.machine.as_ref().is_some_and(|m| m.start) {
                    "running"
                } else {
                    "stopped"
                }
                .into(),
                operation: id.clone(),
                created: Some(t),
                updated: Some(t),
                ..Default::default()
            };
            let steps = vec![step("provision", &id, &chosen.node)];
            let summary = format!("create {name} on {}", chosen.node);
            let mut op = new_op(&id, OpKind::CreateVm, (&name, &chosen.node), steps, who, summary);
            op.secrets_in_memory = secrets;
            Ok((op.clone(), vec![Change::PutVm(vm), Change::PutOp(op)]))
        })?;
        let op = self.start_when_durable(pending, secrets.then_some(spec)).await?;
        tracing::info!(op = %op.id, vm = %name, node = %op.node, by = who, "create placed");
        Ok(CreateVmResponse { operation: Some(op), explanation: None })
    }

    /// Start an operation on an existing VM: take its lock, let `prepare` adjust the VM and the operation,
    /// store both in one transaction, and run it.
    async fn begin(
        &self,
        name: &str,
        kind: OpKind,
        step_name: &str,
        summary: String,
        who: &str,
        prepare: impl FnOnce(&GridState, &mut Vm, &mut Operation) -> Result<(), OpError> + Send,
    ) -> Result<Operation, OpError> {
        let pending = self.view().stage(|s| {
            let mut vm = s
                .vms
                .get(name)
                .filter(|v| v.state() != VmState::Deleted)
                .cloned()
                .ok_or_else(|| OpError::NotFound(format!("no vm {name:?}")))?;
            if vm.dedicated && kind != OpKind::DeleteVm {
                return Err(OpError::Precondition(format!(
                    "{name} is a dedicated server on {}: it is created and released (vm delete), its power is \
                     the actuator's",
                    vm.node
                )));
            }
            if let Some(holder) = s.lock_holder(name) {
                return Err(OpError::Precondition(format!(
                    "vm {name} is busy: operation {} ({}) holds it",
                    holder.id, holder.summary
                )));
            }
            if !s.nodes.contains_key(&vm.node) {
                return Err(OpError::Precondition(format!(
                    "vm {name}'s node {} is not in the grid",
                    vm.node
                )));
            }
            let id = s.next_op_id();
            let t = now();
            let steps = vec![step(step_name, &id, &vm.node)];
            let mut op = new_op(&id, kind, (name, &vm.node), steps, who, summary);
            prepare(s, &mut vm, &mut op)?;
            vm.operation = id;
            vm.updated = Some(t);
            Ok((op.clone(), vec![Change::PutVm(vm), Change::PutOp(op)]))
        })?;
        let op = self.start_when_durable(pending, None).await?;
        tracing::info!(op = %op.id, vm = %name, by = who, "{}", op.summary);
        Ok(op)
    }

    /// Wait until a staged operation is durable, then start its runner (with its secrets, if any). In a task
    /// of its own, so that a caller that goes away meanwhile (a cancelled API call) does not leave a stored
    /// operation without a runner.
    async fn start_when_durable(
        &self,
        pending: Pending<Operation>,
        secrets: Option<VmSpec>,
    ) -> Result<Operation, OpError> {
        let engine = self.clone();
        let (op, handed_over) = tokio::spawn(async move {
            let op = pending.durable().await?;
            if let Some(spec) = secrets {
                lock(&engine.inner.secrets).insert(op.id.clone(), spec);
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            lock(&engine.inner.dispatch).insert(op.id.clone(), tx);
            engine.spawn(op.id.clone());
            Ok::<_, OpError>((op, rx))
        })
        .await
        .map_err(|e| OpError::Unavailable(format!("starting the operation: {e}")))??;
        // Answer once the agent has the job, or the job waits for a slot, or its first try failed, or the
        // bound passed: whichever comes first. Then with the operation as it is now.
        let wait = Duration::from_millis(self.inner.config.dispatch_wait_ms);
        if tokio::time::timeout(wait, handed_over).await.is_err() {
            lock(&self.inner.dispatch).remove(&op.id);
        }
        Ok(self.view().read(|s| s.ops.get(&op.id).cloned()).unwrap_or(op))
    }

    /// The operation's first agent job was handed over (or queued, or its try failed): its starter may answer.
    fn dispatched(&self, id: &str) {
        if let Some(tx) = lock(&self.inner.dispatch).remove(id) {
            let _ = tx.send(());
        }
    }

    pub async fn delete_vm(&self, req: DeleteVmRequest, who: &str) -> Result<Operation, OpError> {
        let summary = format!("delete {}", req.name);
        self.begin(&req.name, OpKind::DeleteVm, "delete", summary, who, |_, vm, op| {
            if !req.wipe_method.is_empty() {
                op.params.insert("wipe_method".into(), req.wipe_method.clone());
            }
            if vm.dedicated {
                // The whole disk is wiped while the server's agent runs, then the server is powered off.
                op.steps = vec![
                    step(dedicated::WIPE_STEP, &op.id, &vm.node),
                    step(dedicated::POWER_OFF_STEP, &op.id, &vm.node),
                ];
                op.summary = format!("release dedicated server {} ({})", vm.name, vm.node);
            }
            vm.state = VmState::Deleting as i32;
            vm.desired_state = "deleted".into();
            Ok(())
        })
        .await
    }

    pub async fn control_vm(&self, req: ControlVmRequest, who: &str) -> Result<Operation, OpError> {
        let action = Action::try_from(req.action).unwrap_or(Action::Unspecified);
        if action == Action::Unspecified {
            return Err(OpError::Invalid(
                "action: required (START, STOP, REBOOT, SUSPEND, RESUME, DESTROY)".into(),
            ));
        }
        let word = action.as_str_name().to_ascii_lowercase();
        let summary = format!("{word} {}", req.name);
        self.begin(&req.name, OpKind::ControlVm, "control", summary, who, |_, vm, op| {
            if vm.state() == VmState::Provisioning || vm.state() == VmState::Deleting {
                return Err(OpError::Precondition(format!("vm {} is {}", vm.name, vm.state().as_str_name())));
            }
            op.action = action as i32;
            if req.grace_seconds > 0 {
                op.params.insert("grace_seconds".into(), req.grace_seconds.to_string());
            }
            vm.desired_state = match action {
                Action::Stop | Action::Destroy => "stopped",
                Action::Suspend => "paused",
                _ => "running",
            }
            .into();
            Ok(())
        })
        .await
    }

    /// Vertical resize on the VM's node when it has room; the new size is reserved with the operation.
    pub async fn resize_vm(&self, req: ResizeVmRequest, who: &str) -> Result<Operation, OpError> {
        let summary = format!("resize {}", req.name);
        self.begin(&req.name, OpKind::ResizeVm, "resize", summary, who, |s, vm, op| {
            let old = vm.resources.unwrap_or_default();
            let mut new = old;
            if req.vcpus > 0 {
                new.vcpus = req.vcpus;
            }
            if req.memory_mib > 0 {
                new.memory_mib = req.memory_mib;
            }
            if req.disk_mib > 0 {
                new.disk_mib = req.disk_mib;
            }
            if new == old {
                return Err(OpError::Invalid(
                    "nothing to change: give --vcpus, --memory-mib or --disk-mib".into(),
                ));
            }
            if new.disk_mib < old.disk_mib {
                return Err(OpError::Invalid(format!(
                    "disk_mib: disks only grow ({} MiB now, {} asked)",
                    old.disk_mib, new.disk_mib
                )));
            }
            if !vm.tenant.is_empty() {
                let grow = Resources {
                    vcpus: new.vcpus.saturating_sub(old.vcpus),
                    memory_mib: new.memory_mib.saturating_sub(old.memory_mib),
                    disk_mib: new.disk_mib.saturating_sub(old.disk_mib),
                };
                tenants::check_quota(s, &vm.tenant, &grow, 0)?;
            }
            let info =
                s.snapshot.node(&vm.node).ok_or_else(|| OpError::Precondition("node unknown".into()))?;
            // Room as the scheduler counts it (capacity after overcommit, less allocations), plus what the
            // VM holds already.
            let free = info.free();
            let mut short = Vec::new();
            if new.vcpus > old.vcpus && new.vcpus - old.vcpus > free.vcpus {
                short.push(format!("{} more vCPUs, {} free", new.vcpus - old.vcpus, free.vcpus));
            }
            if new.memory_mib > old.memory_mib && new.memory_mib - old.memory_mib > free.memory_mib {
                short.push(format!(
                    "{} MiB more memory, {} free",
                    new.memory_mib - old.memory_mib,
                    free.memory_mib
                ));
            }
            if new.disk_mib > old.disk_mib && new.disk_mib - old.disk_mib > free.disk_mib {
                short.push(format!("{} MiB more disk, {} free", new.disk_mib - old.disk_mib, free.disk_mib));
            }
            if !short.is_empty() {
                return Err(OpError::Unschedulable(format!(
                    "node {} has no room to resize {} in place: {} (--allow-migrate moves it to a node with room first)",
                    vm.node,
                    vm.name,
                    short.join("; ")
                )));
            }
            // Each change is one agent job on the shut-off domain: the disk's, then the vCPUs' and memory's.
            let mut steps = Vec::new();
            if new.disk_mib != old.disk_mib {
                steps.push(step("resize", &op.id, &vm.node));
            }
            if new.vcpus != old.vcpus || new.memory_mib != old.memory_mib {
                steps.push(step(RESOURCES_STEP, &op.id, &vm.node));
            }
            if matches!(vm.state(), VmState::Running | VmState::Paused) {
                if !req.restart {
                    return Err(OpError::Precondition(format!(
                        "vm {} is {}: stop it first (gridctl vm stop {}), or resize with --restart",
                        vm.name,
                        vm.state().as_str_name().to_ascii_lowercase(),
                        vm.name
                    )));
                }
                // Shut down, resized, started again: one operation.
                steps.insert(0, step(RESIZE_STOP_STEP, &op.id, &vm.node));
                steps.push(step(RESIZE_START_STEP, &op.id, &vm.node));
                op.params.insert("restart".into(), "true".into());
            }
            op.steps = steps;
            op.previous = Some(old);
            vm.resources = Some(new);
            if let Some(s) = vm.spec.as_mut() {
                if let Some(d) = s.disk.as_mut() {
                    d.size_mib = new.disk_mib;
                }
                if let Some(m) = s.machine.as_mut() {
                    (m.vcpus, m.memory_mib) = (new.vcpus, new.memory_mib);
                }
            }
            Ok(())
        })
        .await
    }

    pub async fn snapshot_vm(&self, req: SnapshotVmRequest, who: &str) -> Result<Operation, OpError> {
        let summary = format!("snapshot {}", req.name);
        self.begin(&req.name, OpKind::SnapshotVm, "snapshot", summary, who, |_, vm, op| {
            let name = if req.image_name.is_empty() { vm.name.clone() } else { req.image_name.clone() };
            let version = if req.image_version.is_empty() {
                now().seconds.to_string()
            } else {
                req.image_version.clone()
            };
            op.params.insert("image_name".into(), name);
            op.params.insert("image_version".into(), version);
            op.params.insert("notes".into(), req.notes.clone());
            Ok(())
        })
        .await
    }

    /// The operation now, and a receiver of its next events while it runs.
    pub fn watch(
        &self,
        id: &str,
    ) -> Result<(Operation, Option<broadcast::Receiver<OperationEvent>>), OpError> {
        let mut events = lock(&self.inner.events);
        let op = self
            .view()
            .read(|s| s.ops.get(id).cloned())
            .ok_or_else(|| OpError::NotFound(format!("no operation {id:?}")))?;
        if crate::grid::is_finished(&op) {
            return Ok((op, None));
        }
        let rx = events.entry(id.to_string()).or_insert_with(|| broadcast::channel(256).0).subscribe();
        Ok((op, Some(rx)))
    }

    fn publish(&self, event: OperationEvent, last: bool) {
        let mut events = lock(&self.inner.events);
        if let Some(tx) = events.get(&event.operation) {
            let _ = tx.send(event.clone());
        }
        if last {
            events.remove(&event.operation);
        }
    }
}
