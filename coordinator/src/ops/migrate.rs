//! Moving a VM to another node through the agents' MIGRATE_RECEIVE / MIGRATE_SEND jobs: live (the domain
//! runs on while libvirt copies its memory and disk, peer to peer) where the VM runs and both nodes offer
//! it, else cold.
//!
//! The destination is chosen (or checked, with `--to`) by placement with the source excluded and reserved in
//! the transaction that starts the operation: the VM is MIGRATING and holds its allocation on both nodes
//! until the end. Steps, each one agent job with its own idempotency key:
//! 1. `stop` (a running VM migrating cold only): ACPI shutdown on the source;
//! 2. `receive` on the destination: submitted, not awaited; it allocates the volume and waits for the
//!    one-time stream of `transfer_id` from the source's certificate;
//! 3. `send` on the source: streams the allocated extents (live: has libvirt migrate the domain); only after
//!    the destination has verified its copy and defined (and, for a VM that ran, started) the domain (live:
//!    the domain runs there) does the source wipe its copy;
//! 4. the `receive` job followed to its end.
//!
//! A failure before the destination verified leaves the VM on the source (started again if the migration
//! stopped it, as the step `start-source`), the destination's job cancelled and its reservation released.
//! A restart of the coordinator re-attaches to each job by its key.

use std::time::Instant;

use gridforge_proto::v1::{
    CancelJobRequest, ControlJob, Job, JobState, MigrateReceiveJob, MigrateSendJob, MigrateVmRequest,
    Operation, control_job::Action, job::Outcome, submit_job_request::Job as JobReq,
};

use super::{Engine, OpError, step};
use crate::grid::{OpKind, OpState, Vm, VmState, now};
use crate::scheduler;

pub(crate) const STOP_STEP: &str = "stop";
pub(crate) const RECEIVE_STEP: &str = "receive";
pub(crate) const SEND_STEP: &str = "send";
pub(crate) const START_SOURCE_STEP: &str = "start-source";

/// How long the destination waits for the source's stream (the agent's bound is 7 days).
const RECEIVE_TIMEOUT_SECS: u32 = 6 * 3600;

/// The ceilings a user compares a migration's downtime with: QEMU's default for live migration, and what
/// Proxmox asks QEMU for.
pub const QEMU_DEFAULT_DOWNTIME_MS: u64 = 300;
pub const PROXMOX_DOWNTIME_MS: u64 = 100;

impl Engine {
    pub async fn migrate_vm(&self, req: MigrateVmRequest, who: &str) -> Result<Operation, OpError> {
        if req.live && req.cold {
            return Err(OpError::Invalid("--live and --cold exclude each other".into()));
        }
        let summary = format!("migrate {}", req.name);
        self.begin(&req.name, OpKind::MigrateVm, SEND_STEP, summary, who, |s, vm, op| {
            let was_running = match vm.state() {
                VmState::Running => true,
                VmState::Stopped => false,
                other => {
                    return Err(OpError::Precondition(format!(
                        "vm {} is {}: only a running or stopped VM moves",
                        vm.name,
                        other.as_str_name()
                    )));
                }
            };
            if req.to == vm.node {
                return Err(OpError::Invalid(format!("vm {} is already on node {}", vm.name, vm.node)));
            }
            let mut r = super::schedule_request(
                &vm.spec.clone().unwrap_or_default(),
                &vm.placement.clone().unwrap_or_default(),
            );
            // Its disk comes from the source: the destination needs no image.
            r.image.clear();
            r.layers.clear();
            let (own, room) = (vm.resources.unwrap_or_default(), req.room_for.unwrap_or_default());
            r.resources = scheduler::Resources {
                vcpus: own.vcpus.max(room.vcpus),
                memory_mib: own.memory_mib.max(room.memory_mib),
                disk_mib: own.disk_mib.max(room.disk_mib),
            };
            r.node = (!req.to.is_empty()).then(|| req.to.clone());
            r.exclude.insert(vm.node.clone());
            let placed =
                scheduler::place(&s.snapshot, &r).map_err(|u| OpError::Unschedulable(u.to_string()))?;
            let (src, dst) = (vm.node.clone(), placed.node.clone());
            let live = match live_refusal(s, vm, was_running, &dst) {
                None if !req.cold => true,
                Some(why) if req.live => {
                    return Err(OpError::Precondition(format!("vm {} cannot migrate live: {why}", vm.name)));
                }
                _ => false,
            };
            let mode = if live { "live" } else { "cold" };
            let mut steps = Vec::new();
            if was_running && !live {
                steps.push(step(STOP_STEP, &op.id, &src));
            }
            steps.push(step(RECEIVE_STEP, &op.id, &dst));
            steps.push(step(SEND_STEP, &op.id, &src));
            op.steps = steps;
            op.summary = format!("migrate {} from {src} to {dst} ({mode})", vm.name);
            op.params.insert("to".into(), dst.clone());
            op.params.insert("mode".into(), mode.into());
            op.params.insert("was_running".into(), was_running.to_string());
            op.params.insert("transfer_id".into(), uuid::Uuid::new_v4().simple().to_string());
            if !req.wipe_method.is_empty() {
                op.params.insert("wipe_method".into(), req.wipe_method.clone());
            }
            vm.state = VmState::Migrating as i32;
            vm.migrating_to = dst;
            Ok(())
        })
        .await
    }

    /// The agent job of a migration's step.
    pub(super) fn migrate_job(&self, op: &Operation, vm: &Vm, step: &str) -> Result<JobReq, String> {
        let param = |k: &str| op.params.get(k).cloned().unwrap_or_default();
        let (src, dst) = (op.node.clone(), param("to"));
        let live = param("mode") == "live";
        let volume = super::run::volume(&vm.volume);
        Ok(match step {
            STOP_STEP => JobReq::Control(ControlJob {
                domain: vm.name.clone(),
                action: Action::Stop as i32,
                ..Default::default()
            }),
            START_SOURCE_STEP => JobReq::Control(ControlJob {
                domain: vm.name.clone(),
                action: Action::Start as i32,
                ..Default::default()
            }),
            RECEIVE_STEP => {
                let mut spec = vm.spec.clone().unwrap_or_default();
                let machine = spec.machine.get_or_insert_with(Default::default);
                machine.start = param("was_running") == "true";
                let r = vm.resources.unwrap_or_default();
                (machine.vcpus, machine.memory_mib) = (r.vcpus, r.memory_mib);
                JobReq::MigrateReceive(MigrateReceiveJob {
                    transfer_id: param("transfer_id"),
                    sender: src,
                    target: volume,
                    size_bytes: r.disk_mib << 20,
                    spec: Some(spec),
                    timeout_seconds: RECEIVE_TIMEOUT_SECS,
                    live,
                })
            }
            SEND_STEP => {
                let receiver_address = self
                    .view()
                    .read(|s| s.nodes.get(&dst).map(|n| n.address.clone()))
                    .ok_or_else(|| format!("destination node {dst} was removed from the grid"))?;
                JobReq::MigrateSend(MigrateSendJob {
                    domain: vm.name.clone(),
                    target: volume,
                    transfer_id: param("transfer_id"),
                    receiver_address,
                    receiver: dst,
                    wipe_method: param("wipe_method"),
                    live,
                })
            }
            other => return Err(format!("a migration has no step {other:?}")),
        })
    }

    /// Runs a migration's steps (see the module documentation); the receive job on success.
    pub(super) async fn run_migration(&self, id: &str) -> Result<Job, String> {
        let op =
            self.view().read(|s| s.ops.get(id).cloned()).ok_or_else(|| format!("operation {id} vanished"))?;
        let index = |name: &str| op.steps.iter().position(|s| s.name == name);
        let done = |i: usize| op.steps[i].state() == OpState::Succeeded;
        let (Some(recv), Some(send)) = (index(RECEIVE_STEP), index(SEND_STEP)) else {
            return Err(format!("operation {id} lacks its receive or send step"));
        };
        let mut down_since = None;
        if let Some(stop) = index(STOP_STEP)
            && !done(stop)
        {
            self.step_to_success(id, stop).await?;
            down_since = Some(Instant::now());
        }
        if !done(send) {
            let received = self.submit_step(id, recv).await;
            let sent = match received {
                Ok(job) if job.state() == JobState::Failed || job.state() == JobState::Cancelled => {
                    Err(super::run::job_failure(&op.params["to"], RECEIVE_STEP, &job))
                }
                Ok(_) => self.step_to_success(id, send).await,
                Err(e) => Err(e),
            };
            if let Err(e) = sent {
                return Err(self.migration_failed(id, recv, e).await);
            }
        }
        let job = self.step_to_success(id, recv).await?;
        // Live: libvirt's own measure of the switch-over; cold: from the domain's stop to its start there.
        let downtime = match &job.outcome {
            Some(Outcome::MigrateReceive(r)) if r.mode == "live" => Some(r.downtime_ms),
            _ => down_since.map(|t| t.elapsed().as_millis() as u64),
        };
        self.note_op(id, |op| op.downtime_ms = downtime.unwrap_or(0));
        Ok(job)
    }

    /// Runs step `index` and follows its job to the end; Err unless it succeeded. Marks it succeeded.
    async fn step_to_success(&self, id: &str, index: usize) -> Result<Job, String> {
        let req = self.agent_request(id, index)?;
        let job = self.agent_step(id, index, req, true).await?;
        let (node, name) = self
            .view()
            .read(|s| s.ops.get(id).map(|o| (o.steps[index].node.clone(), o.steps[index].name.clone())))
            .unwrap_or_default();
        if job.state() != JobState::Succeeded {
            return Err(super::run::job_failure(&node, &name, &job));
        }
        if let Some(Outcome::MigrateSend(r)) = &job.outcome {
            let (bytes, extents, sha) = (r.bytes_sent, r.extents_sent, r.sha256.clone());
            let report = r.wipe.as_ref().map(|w| w.report_json.clone()).unwrap_or_default();
            self.note_op(id, |op| {
                op.params.insert("bytes_sent".into(), bytes.to_string());
                op.params.insert("extents_sent".into(), extents.to_string());
                op.params.insert("sha256".into(), sha);
                op.params.insert("wipe_report".into(), report);
            });
        }
        self.update_op(id, |op| op.steps[index].state = OpState::Succeeded as i32).await;
        Ok(job)
    }

    /// Submits step `index` without waiting for its job to end.
    async fn submit_step(&self, id: &str, index: usize) -> Result<Job, String> {
        let req = self.agent_request(id, index)?;
        self.agent_step(id, index, req, false).await
    }

    /// After a failed send: when the destination verified its copy anyway, the VM is there (said in the
    /// error, and `moved` set for `finish`); otherwise its receive job is cancelled and a VM the migration
    /// stopped is started again on the source. Returns the operation's error.
    async fn migration_failed(&self, id: &str, recv: usize, error: String) -> String {
        let (dst, job_id, stopped) = self
            .view()
            .read(|s| {
                s.ops.get(id).map(|o| {
                    let stopped =
                        o.steps.iter().any(|st| st.name == STOP_STEP && st.state() == OpState::Succeeded);
                    (
                        o.params.get("to").cloned().unwrap_or_default(),
                        o.steps[recv].agent_job_id.clone(),
                        stopped,
                    )
                })
            })
            .unwrap_or_default();
        let address = self.view().read(|s| s.nodes.get(&dst).map(|n| n.address.clone()));
        if let (Some(address), false) = (address, job_id.is_empty())
            && let Ok(mut client) = self.agents().client(&address).await
        {
            let job = client.get_job(gridforge_proto::v1::GetJobRequest { job_id: job_id.clone() }).await;
            let receive_state = job.ok().map(|j| j.into_inner().state());
            if receive_state == Some(JobState::Succeeded) {
                self.note_op(id, |op| drop(op.params.insert("moved".into(), "true".into())));
                return format!(
                    "{error}; the destination {dst} verified its copy and holds the VM, but the source's copy \
                     may not be wiped: check the send job on the source"
                );
            }
            if !receive_state.is_some_and(super::run::terminal) {
                let _ = client.cancel_job(CancelJobRequest { job_id, leader_term: self.leader_term() }).await;
            }
        }
        let mut error = format!("{error}; the VM stays on the source");
        if stopped {
            let source = self.view().read(|s| s.ops.get(id).map(|o| o.node.clone())).unwrap_or_default();
            let index = self
                .update_op_returning(id, |op| {
                    op.steps.push(step(START_SOURCE_STEP, &op.id, &source));
                    op.steps.len() - 1
                })
                .await;
            match self.step_to_success(id, index).await {
                Ok(_) => {
                    error.push_str(", started again");
                    self.note_op(id, |op| drop(op.params.insert("source_state".into(), "running".into())));
                }
                Err(e) => error.push_str(&format!(", and could not be started again: {e}")),
            }
        }
        error
    }
}

/// Why `vm` cannot migrate live to `dst` (None: it can): it must run, and both nodes offer live migration.
fn live_refusal(s: &crate::grid::GridState, vm: &Vm, was_running: bool, dst: &str) -> Option<String> {
    if !was_running {
        return Some("it is stopped (a stopped VM migrates cold)".into());
    }
    for node in [vm.node.as_str(), dst] {
        if !s.nodes.get(node).is_some_and(|n| n.live_migration) {
            return Some(format!(
                "node {node} offers no live migration (its agent has no libvirt.peer_uri, or runs libvirt's test \
                 driver)"
            ));
        }
    }
    None
}

/// The one-line result of a migration that succeeded, from its operation's parameters.
pub(super) fn result_line(op: &Operation, from: &str) -> String {
    let param = |k: &str| op.params.get(k).cloned().unwrap_or_default();
    let mib = param("bytes_sent").parse::<u64>().unwrap_or(0) >> 20;
    if param("mode") == "live" {
        return format!(
            "live migration from {from} to {}: {mib} MiB of memory and disk copied while it ran; downtime {} ms \
             (QEMU's default live-migration ceiling {QEMU_DEFAULT_DOWNTIME_MS} ms, Proxmox asks \
             {PROXMOX_DOWNTIME_MS} ms); source wiped",
            param("to"),
            op.downtime_ms
        );
    }
    let downtime = if param("was_running") == "true" {
        if op.downtime_ms > 0 {
            format!(
                "; downtime {} ms (QEMU's default live-migration ceiling {QEMU_DEFAULT_DOWNTIME_MS} ms, \
                 Proxmox asks {PROXMOX_DOWNTIME_MS} ms)",
                op.downtime_ms
            )
        } else {
            "; downtime not measured (the coordinator restarted during it)".into()
        }
    } else {
        String::new()
    };
    format!(
        "cold migration from {from} to {}: {mib} MiB in {} extents sent, sha256 {} verified; source wiped{downtime}",
        param("to"),
        param("extents_sent"),
        param("sha256"),
    )
}

/// When the migration is recorded as ended: the VM's node and state.
pub(super) fn settle(op: &Operation, vm: &mut Vm, succeeded: bool) {
    let moved = succeeded || op.params.get("moved").is_some_and(|m| m == "true");
    let was_running = op.params.get("was_running").is_some_and(|r| r == "true");
    if moved {
        vm.node = op.params.get("to").cloned().unwrap_or_default();
        vm.state = if was_running { VmState::Running } else { VmState::Stopped } as i32;
    } else {
        let running = op.params.get("source_state").is_some_and(|s| s == "running") || {
            // Not stopped by the migration: as it was.
            was_running && !op.steps.iter().any(|s| s.name == STOP_STEP && s.state() == OpState::Succeeded)
        };
        vm.state = if running { VmState::Running } else { VmState::Stopped } as i32;
    }
    vm.migrating_to.clear();
    vm.updated = Some(now());
}
