//! A lost node: fence it, rebuild its VMs elsewhere, and clean it when it comes back.
//!
//! - A node Unreachable for `poller.lost_after_secs` is LOST (the poller). It is cordoned and fenced by a
//!   FENCE_NODE operation through the configured actuator: `command` runs a program (IPMI, a PDU, ...) with a
//!   timeout, exit status 0 meaning powered off; `manual` waits for `gridctl node fenced NODE`. A failed or
//!   timed-out actuator fails the operation, the node stays LOST and nothing is rebuilt (`gridctl node fence`
//!   tries again). No VM is ever rebuilt while its old copy might still run.
//! - Once fenced, each of its VMs is rebuilt by a REBUILD_VM operation: a fresh disk provisioned from the
//!   stored spec on a node placement picks, highest `placement.priority` first. A VM no node has room for is
//!   PENDING with the reason, holds no allocation, and is placed when room appears (every poll round). A VM
//!   whose disk was encrypted stays PENDING: its passphrase is never stored.
//! - When a fenced node answers again, its domains for VMs that now live elsewhere are wiped by a CLEAN_NODE
//!   operation (the agent's Delete job per domain) before the node is unfenced; it stays cordoned until an
//!   operator uncordons it.

use std::process::Stdio;
use std::time::Duration;

use gridforge_proto::v1::{
    DeleteJob, Job, JobState, Node, Operation, ProvisionJob, submit_job_request::Job as JobReq,
};

use super::{Engine, OpError, new_op, step};
use crate::grid::{Change, NodeState, OpKind, Vm, VmState, now, volume_name};
use crate::scheduler;

pub(crate) const FENCE_STEP: &str = "fence";
pub(crate) const PROVISION_STEP: &str = "provision";

/// How often a manual fence looks for the operator's confirmation.
const CONFIRM_POLL: Duration = Duration::from_millis(250);

impl Engine {
    /// Starts fencing a LOST node (the poller, or `gridctl node fence` after a failed try).
    pub async fn fence_node(&self, name: &str, who: &str) -> Result<Operation, OpError> {
        let pending = self.view().stage(|s| {
            let mut node = super::known_node(s, name)?;
            if node.state() != NodeState::Lost {
                return Err(OpError::Precondition(format!(
                    "node {name} is {}, not LOST: only a lost node is fenced",
                    node.state().as_str_name()
                )));
            }
            if node.fenced {
                return Err(OpError::Precondition(format!("node {name} is fenced already")));
            }
            if let Some(o) = super::unfinished(s, OpKind::FenceNode, name) {
                return Err(OpError::Precondition(format!("node {name} is being fenced by {}", o.id)));
            }
            let id = s.next_op_id();
            let summary = format!("fence {name} ({})", self.inner.fencing.actuator);
            let op =
                new_op(&id, OpKind::FenceNode, ("", name), vec![step(FENCE_STEP, &id, name)], who, summary);
            node.cordoned = true;
            Ok((op.clone(), vec![Change::PutNode(node), Change::PutOp(op)]))
        })?;
        let op = self.start_when_durable(pending, None).await?;
        tracing::warn!(op = %op.id, node = %name, by = who, "{}", op.summary);
        Ok(op)
    }

    /// An operator's word that a LOST node is off (what the manual actuator waits for).
    pub async fn confirm_fenced(&self, name: &str) -> Result<Node, OpError> {
        self.view()
            .update(|s| {
                let mut node = s
                    .nodes
                    .get(name)
                    .cloned()
                    .ok_or_else(|| OpError::NotFound(format!("no node {name:?}")))?;
                if node.state() != NodeState::Lost {
                    return Err(OpError::Precondition(format!(
                        "node {name} is {}, not LOST: nothing to confirm",
                        node.state().as_str_name()
                    )));
                }
                node.fenced = true;
                node.cordoned = true;
                Ok((node.clone(), vec![Change::PutNode(node)]))
            })
            .await
    }

    /// Runs a FENCE_NODE operation's actuator; on success the node is fenced and its VMs rebuilt.
    pub(super) async fn run_fence(&self, id: &str) -> Result<Job, String> {
        let (node, address) = self
            .view()
            .read(|s| {
                s.ops.get(id).and_then(|o| s.nodes.get(&o.node)).map(|n| (n.name.clone(), n.address.clone()))
            })
            .ok_or_else(|| format!("operation {id}: its node was removed from the grid"))?;
        self.dispatched(id);
        let fencing = &self.inner.fencing;
        let message = match fencing.actuator.as_str() {
            "command" => {
                let argv: Vec<String> = fencing
                    .command
                    .iter()
                    .map(|a| a.replace("{node}", &node).replace("{address}", &address))
                    .collect();
                self.note_op(id, |o| o.steps[0].message = format!("running {}", argv.join(" ")));
                let text = run_actuator("fencing actuator", &argv, Duration::from_secs(fencing.timeout_secs))
                    .await
                    .map_err(|e| format!("{e}: the node stays LOST"))?;
                self.mark_fenced(&node, true).await?;
                format!("{} exited 0{text}", argv[0])
            }
            "libvirt" => {
                let (uri, domain) = (fencing.libvirt_uri.clone(), fencing.domain.replace("{node}", &node));
                self.note_op(id, |o| o.steps[0].message = format!("destroying domain {domain} at {uri}"));
                let timeout = Duration::from_secs(fencing.timeout_secs);
                let off = tokio::task::spawn_blocking(move || destroy_domain(&uri, &domain));
                let text = tokio::time::timeout(timeout, off)
                    .await
                    .map_err(|_| {
                        format!("libvirt actuator: no answer within {timeout:?}: the node stays LOST")
                    })?
                    .map_err(|e| format!("libvirt actuator: {e}"))??;
                self.mark_fenced(&node, true).await?;
                text
            }
            _ => {
                let waiting =
                    format!("waiting for an operator: power {node} off, then `gridctl node fenced {node}`");
                self.note_op(id, |o| o.steps[0].message = waiting.clone());
                loop {
                    match self.view().read(|s| s.nodes.get(&node).map(|n| (n.fenced, n.state()))) {
                        Some((true, _)) => break,
                        Some((false, NodeState::Lost)) => tokio::time::sleep(CONFIRM_POLL).await,
                        Some((false, state)) => {
                            return Err(format!("node {node} is {} again: not fenced", state.as_str_name()));
                        }
                        None => return Err(format!("node {node} was removed from the grid")),
                    }
                }
                "confirmed by an operator".into()
            }
        };
        self.note_op(id, |o| o.result = format!("{node} fenced: {message}"));
        let engine = self.clone();
        let rebuild: std::pin::Pin<Box<dyn std::future::Future<Output = usize> + Send>> =
            Box::pin(async move { engine.rebuild_pending().await });
        tokio::spawn(rebuild);
        Ok(Job { state: JobState::Succeeded as i32, ..Default::default() })
    }

    /// Rebuilds, highest priority first, every VM of a fenced node and every PENDING VM that now fits.
    pub async fn rebuild_pending(&self) -> usize {
        let mut names: Vec<(i32, String)> = self.view().read(|s| {
            s.vms
                .values()
                .filter(|v| {
                    v.state() == VmState::Pending
                        || (crate::grid::holds_allocation(v)
                            && v.state() != VmState::Migrating
                            && s.nodes.get(&v.node).is_some_and(|n| n.fenced))
                })
                .filter(|v| s.lock_holder(&v.name).is_none())
                .map(|v| (v.placement.as_ref().map_or(0, |p| p.priority), v.name.clone()))
                .collect()
        });
        names.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut started = 0;
        for (_, name) in names {
            match self.rebuild_vm(&name).await {
                Ok(Some(_)) => started += 1,
                Ok(None) => {}
                Err(e) => tracing::warn!(vm = %name, "cannot rebuild: {e}"),
            }
        }
        started
    }

    /// Places the VM anew and starts its REBUILD_VM operation; `None` when it stays (or became) PENDING.
    async fn rebuild_vm(&self, name: &str) -> Result<Option<Operation>, OpError> {
        let pending = self.view().stage::<_, OpError>(|s| {
            let Some(mut vm) = s.vms.get(name).cloned() else { return Ok((None, vec![])) };
            if s.lock_holder(name).is_some() {
                return Ok((None, vec![]));
            }
            let lost = vm.node.clone();
            let spec = vm.spec.clone().unwrap_or_default();
            let encrypted =
                spec.disk.as_ref().is_some_and(|d| d.partitions.iter().any(|p| p.encryption.is_some()));
            let why = if encrypted {
                Some("its disk was encrypted and its passphrase is never stored: create it again".to_string())
            } else {
                let mut r = super::schedule_request(&spec, &vm.placement.clone().unwrap_or_default());
                r.node = None;
                r.exclude.insert(lost.clone());
                r.resources = crate::grid::to_sched(&vm.resources.unwrap_or_default());
                match scheduler::place(&s.snapshot, &r) {
                    Ok(p) => {
                        let id = s.next_op_id();
                        let t = now();
                        if vm.state() != VmState::Pending {
                            vm.rebuilt_from = lost.clone();
                        }
                        vm.node = p.node.clone();
                        vm.state = VmState::Provisioning as i32;
                        vm.error.clear();
                        vm.operation = id.clone();
                        vm.updated = Some(t);
                        let summary = format!("rebuild {name} on {} (node {} lost)", p.node, vm.rebuilt_from);
                        let steps = vec![step(PROVISION_STEP, &id, &p.node)];
                        let op = new_op(&id, OpKind::RebuildVm, (name, &p.node), steps, "rebuild", summary);
                        return Ok((Some(op.clone()), vec![Change::PutVm(vm), Change::PutOp(op)]));
                    }
                    Err(u) => Some(format!("no node can take it: {u}")),
                }
            };
            let why = why.unwrap_or_default();
            if vm.state() == VmState::Pending && vm.error == why {
                return Ok((None, vec![]));
            }
            if vm.state() != VmState::Pending {
                vm.rebuilt_from = lost;
            }
            vm.state = VmState::Pending as i32;
            vm.error = why;
            vm.updated = Some(now());
            tracing::warn!(vm = %name, "pending: {}", vm.error);
            Ok((None, vec![Change::PutVm(vm)]))
        })?;
        match pending.durable().await? {
            None => Ok(None),
            Some(op) => {
                self.spawn(op.id.clone());
                tracing::warn!(op = %op.id, vm = %name, "{}", op.summary);
                Ok(Some(op))
            }
        }
    }

    /// The agent job of a rebuild (a Provision from the stored spec) or of a clean step (a Delete).
    pub(super) fn recovery_job(&self, op: &Operation, vm: Option<&Vm>, step: &str) -> Result<JobReq, String> {
        match op.kind() {
            OpKind::RebuildVm => {
                let vm = vm.ok_or_else(|| format!("vm {} is no longer in the grid", op.vm))?;
                Ok(JobReq::Provision(ProvisionJob {
                    spec: vm.spec.clone(),
                    target: super::run::volume(&vm.volume),
                }))
            }
            OpKind::CleanNode => {
                let volume = self.view().read(|s| s.vms.get(step).map(|v| v.volume.clone()));
                Ok(JobReq::Delete(DeleteJob {
                    domain: step.to_string(),
                    target: super::run::volume(&volume.unwrap_or_else(|| volume_name(step))),
                    wipe_method: String::new(),
                }))
            }
            _ => Err("not a recovery operation".into()),
        }
    }

    /// Wipes the stale domains of a fenced node that answers again, then unfences it (it stays cordoned).
    pub async fn clean_node(&self, name: &str, stale: Vec<String>) -> Result<Option<Operation>, OpError> {
        let pending = self.view().stage::<_, OpError>(|s| {
            let Some(mut node) = s.nodes.get(name).cloned() else { return Ok((None, vec![])) };
            if !node.fenced
                || node.state() == NodeState::Lost
                || super::unfinished(s, OpKind::CleanNode, name).is_some()
            {
                return Ok((None, vec![]));
            }
            if stale.is_empty() {
                node.fenced = false;
                return Ok((None, vec![Change::PutNode(node)]));
            }
            let id = s.next_op_id();
            let summary = format!("wipe {} stale domains on {name}, back after it was fenced", stale.len());
            let steps = stale.iter().map(|d| step(d, &id, name)).collect();
            let op = new_op(&id, OpKind::CleanNode, ("", name), steps, "poller", summary);
            Ok((Some(op.clone()), vec![Change::PutOp(op)]))
        })?;
        let Some(op) = pending.durable().await? else { return Ok(None) };
        self.spawn(op.id.clone());
        tracing::warn!(op = %op.id, node = %name, "{}", op.summary);
        Ok(Some(op))
    }

    async fn mark_fenced(&self, node: &str, fenced: bool) -> Result<(), String> {
        self.view()
            .update::<_, OpError>(|s| {
                let Some(mut n) = s.nodes.get(node).cloned() else { return Ok(((), vec![])) };
                n.fenced = fenced;
                Ok(((), vec![Change::PutNode(n)]))
            })
            .await
            .map_err(|e| e.to_string())
    }

    /// After a CLEAN_NODE operation's steps: the node is unfenced.
    pub(super) async fn unfence(&self, node: &str) {
        if let Err(e) = self.mark_fenced(node, false).await {
            tracing::error!(node, "cannot unfence: {e}");
        }
    }
}

/// Runs an actuator program (`label` names it in errors); Ok with a note of its output when it exits 0,
/// else why not.
pub(super) async fn run_actuator(label: &str, argv: &[String], timeout: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{label} {}: cannot start: {e}", argv[0]))?;
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let t = text.trim();
        if t.is_empty() { String::new() } else { format!(": {}", t.lines().last().unwrap_or(t)) }
    };
    // On timeout the dropped future drops the child, which kill_on_drop kills.
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(format!("{label} {} did not exit within {timeout:?}", argv[0])),
        Ok(Err(e)) => Err(format!("{label} {}: {e}", argv[0])),
        Ok(Ok(out)) if out.status.success() => Ok(tail(&out.stdout)),
        Ok(Ok(out)) => Err(format!("{label} {} failed ({}){}", argv[0], out.status, tail(&out.stderr))),
    }
}

/// Powers off the libvirt domain of a node that is itself a VM, through the agent's own libvirt layer;
/// a domain already shut off counts as fenced.
fn destroy_domain(uri: &str, domain: &str) -> Result<String, String> {
    use gridforge_agent::hypervisor::{DomainState, Hypervisor, HypervisorError, Libvirt};
    let cfg = gridforge_agent::config::LibvirtConfig { uri: uri.to_string(), ..Default::default() };
    let libvirt = Libvirt::new(&cfg, &std::env::temp_dir());
    let fail = |e: HypervisorError| {
        format!("domain {domain} at {uri}: {}: the node stays LOST", crate::error_chain(&e))
    };
    match libvirt.state(domain).map_err(fail)? {
        None => Err(format!("no domain {domain} at {uri}: the node stays LOST")),
        Some(DomainState::Shutoff) => Ok(format!("domain {domain} was shut off already")),
        Some(_) => {
            libvirt.destroy(domain).map_err(fail)?;
            match libvirt.state(domain).map_err(fail)? {
                Some(DomainState::Shutoff) => Ok(format!("domain {domain} destroyed")),
                other => Err(format!(
                    "domain {domain} at {uri} is {} after destroy: the node stays LOST",
                    other.map_or("gone", DomainState::as_str)
                )),
            }
        }
    }
}
