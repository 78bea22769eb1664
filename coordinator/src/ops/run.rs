//! Running an operation: its agent step (submit with the step's idempotency key, follow WatchJob, relay the
//! events), retries while the agent is unreachable, and the one transaction that records the outcome.

use std::sync::Arc;
use std::time::Duration;

use gridforge_proto::v1::{
    ControlJob, DeleteJob, DiskTarget, GetJobRequest, Job, JobKind, JobState, ListJobsRequest,
    OperationEvent, ProvisionJob, ResizeJob, SnapshotJob, SubmitJobRequest, WatchJobRequest, WipeJob,
    control_job::Action, disk_target, job::Outcome, submit_job_request::Job as JobReq,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Code;

use super::{Engine, RESIZE_START_STEP, RESIZE_STOP_STEP, RESOURCES_STEP, lock};
use crate::grid::{Change, OpKind, OpState, Operation, VmState, is_disk_heavy, is_finished, now};

/// Why one try of a step did not end with a finished job.
enum StepError {
    /// The agent could not be reached or the stream broke: try again.
    Retry(String),
    /// The agent refused the job: the operation fails.
    Fatal(String),
}

/// A status's message with its causes ("tcp connect error: Connection refused (os error 111)").
pub(crate) fn status_text(status: &tonic::Status) -> String {
    let mut text =
        if status.message().is_empty() { status.code().to_string() } else { status.message().to_string() };
    if let Some(cause) = std::error::Error::source(status) {
        let chain = crate::error_chain(cause);
        if !text.contains(&chain) {
            text = format!("{text}: {chain}");
        }
    }
    text
}

fn classify(status: &tonic::Status) -> StepError {
    let text = status_text(status);
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
            StepError::Retry(text)
        }
        _ => StepError::Fatal(text),
    }
}

pub(super) fn terminal(state: JobState) -> bool {
    matches!(state, JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Interrupted)
}

pub(super) fn volume(name: &str) -> Option<DiskTarget> {
    Some(DiskTarget { target: Some(disk_target::Target::Volume(name.to_string())) })
}

/// The disk of `vm`: its pool volume, or a dedicated server's whole disk (a device).
fn disk_target(vm: &crate::grid::Vm) -> Option<DiskTarget> {
    if vm.dedicated {
        return Some(DiskTarget { target: Some(disk_target::Target::Device(vm.volume.clone())) });
    }
    volume(&vm.volume)
}

impl Engine {
    pub(super) async fn run(&self, id: String) {
        let outcome = self.run_steps(&id).await;
        self.dispatched(&id);
        if let Err(e) = &outcome {
            tracing::warn!(op = %id, "operation failed: {e}");
        }
        if let Err(e) = self.finish(&id, outcome).await {
            tracing::error!(op = %id, "cannot record the end of the operation: {}", crate::error_chain(&e));
        }
    }

    /// Run the steps not yet done; the last agent job on success.
    async fn run_steps(&self, id: &str) -> Result<Job, String> {
        let Some(op) = self.view().read(|s| s.ops.get(id).cloned()) else {
            return Err(format!("operation {id} vanished"));
        };
        match op.kind() {
            OpKind::MigrateVm => return self.run_migration(id).await,
            OpKind::DrainNode => return self.run_drain(id).await,
            OpKind::FenceNode => return self.run_fence(id).await,
            _ => {}
        }
        let mut last = Err("the operation has no step".to_string());
        for index in 0..op.steps.len() {
            if op.steps[index].state() == OpState::Succeeded {
                continue;
            }
            if let Some(action) = super::dedicated::power_action(&op.steps[index].name) {
                self.power_step(id, index, action).await?;
                // The operation's outcome stays the last agent job's (an operation resumed here has none
                // in hand: it ends with the power step's success).
                if last.is_err() {
                    last = Ok(Job { state: JobState::Succeeded as i32, ..Default::default() });
                }
                continue;
            }
            let req = self.agent_request(id, index)?;
            last = self.agent_step(id, index, req, true).await;
            match &last {
                // The last step's success is stored by `finish`, right after.
                Ok(job) if job.state() == JobState::Succeeded && index + 1 == op.steps.len() => {
                    self.note_op(id, |op| op.steps[index].state = OpState::Succeeded as i32);
                }
                Ok(job) if job.state() == JobState::Succeeded => {
                    self.update_op(id, |op| op.steps[index].state = OpState::Succeeded as i32).await;
                }
                Ok(job) => return Err(job_failure(&op.node, &op.steps[index].name, job)),
                Err(_) => return last,
            }
        }
        if op.kind() == OpKind::CleanNode && last.is_ok() {
            self.unfence(&op.node).await;
        }
        last
    }

    /// The agent job of step `index`, from the operation and its VM record.
    pub(super) fn agent_request(&self, id: &str, index: usize) -> Result<SubmitJobRequest, String> {
        let (op, vm) = self
            .view()
            .read(|s| s.ops.get(id).cloned().map(|o| (s.vms.get(&o.vm).cloned(), o)))
            .map(|(v, o)| (o, v))
            .ok_or_else(|| format!("operation {id} vanished"))?;
        let step = &op.steps[index];
        if matches!(op.kind(), OpKind::RebuildVm | OpKind::CleanNode) {
            let job = self.recovery_job(&op, vm.as_ref(), &step.name)?;
            return Ok(SubmitJobRequest {
                idempotency_key: step.idempotency_key.clone(),
                job: Some(job),
                leader_term: self.leader_term(),
            });
        }
        let vm = vm.ok_or_else(|| format!("vm {} is no longer in the grid", op.vm))?;
        let param = |k: &str| op.params.get(k).cloned().unwrap_or_default();
        let job = match op.kind() {
            OpKind::CreateVm => {
                let spec = match lock(&self.inner.secrets).get(id).cloned() {
                    Some(spec) => spec,
                    // Without secrets the stored spec is the spec; with them, only an already submitted job
                    // (found by its key in resume_key) may go on.
                    None => vm.spec.clone().unwrap_or_default(),
                };
                JobReq::Provision(ProvisionJob { spec: Some(spec), target: disk_target(&vm) })
            }
            OpKind::DeleteVm if vm.dedicated => JobReq::Wipe(WipeJob {
                target: disk_target(&vm),
                method: param("wipe_method"),
                ..Default::default()
            }),
            OpKind::DeleteVm => JobReq::Delete(DeleteJob {
                domain: vm.name.clone(),
                target: volume(&vm.volume),
                wipe_method: param("wipe_method"),
            }),
            OpKind::ControlVm => JobReq::Control(ControlJob {
                domain: vm.name.clone(),
                action: op.action,
                grace_seconds: param("grace_seconds").parse().unwrap_or(0),
                ..Default::default()
            }),
            OpKind::ResizeVm if step.name == RESIZE_STOP_STEP || step.name == RESIZE_START_STEP => {
                let stop = step.name == RESIZE_STOP_STEP;
                JobReq::Control(ControlJob {
                    domain: vm.name.clone(),
                    action: if stop { Action::Stop } else { Action::Start } as i32,
                    grace_seconds: if stop { super::RESIZE_STOP_GRACE_SECS } else { 0 },
                    ..Default::default()
                })
            }
            OpKind::ResizeVm if step.name == RESOURCES_STEP => {
                let r = vm.resources.unwrap_or_default();
                JobReq::Control(ControlJob {
                    domain: vm.name.clone(),
                    action: Action::SetResources as i32,
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    ..Default::default()
                })
            }
            OpKind::ResizeVm => JobReq::Resize(ResizeJob {
                target: volume(&vm.volume),
                size_mib: vm.resources.unwrap_or_default().disk_mib,
            }),
            OpKind::SnapshotVm => JobReq::Snapshot(SnapshotJob {
                target: volume(&vm.volume),
                image_name: param("image_name"),
                image_version: param("image_version"),
                notes: param("notes"),
            }),
            OpKind::MigrateVm => self.migrate_job(&op, &vm, &step.name)?,
            OpKind::DrainNode | OpKind::FenceNode => return Err("this operation runs no agent job".into()),
            OpKind::RebuildVm | OpKind::CleanNode => unreachable!("handled above"),
            OpKind::Unspecified => return Err("operation of no kind".into()),
        };
        Ok(SubmitJobRequest {
            idempotency_key: step.idempotency_key.clone(),
            job: Some(job),
            leader_term: self.leader_term(),
        })
    }

    pub(super) async fn update_op(&self, id: &str, f: impl FnOnce(&mut Operation) + Send) {
        self.update_op_returning(id, f).await;
    }

    /// [`update_op`](Self::update_op), returning what `f` returns (its default if the operation is gone).
    pub(super) async fn update_op_returning<T: Default + Send>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Operation) -> T + Send,
    ) -> T {
        let result = self
            .view()
            .update::<_, super::OpError>(|s| {
                let Some(mut op) = s.ops.get(id).cloned() else { return Ok((T::default(), vec![])) };
                let value = f(&mut op);
                op.updated = Some(now());
                Ok((value, vec![Change::PutOp(op)]))
            })
            .await;
        result.unwrap_or_else(|e| {
            tracing::error!(op = %id, "cannot store the operation: {e}");
            T::default()
        })
    }

    /// Change the operation in the view only; its next stored change (at the latest `finish`) stores it too.
    /// For what a restart may lose: it re-attaches to the agent job by the step's idempotency key anyway.
    pub(super) fn note_op(&self, id: &str, f: impl FnOnce(&mut Operation)) {
        self.view().observe(|s| {
            if let Some(op) = s.ops.get_mut(id) {
                f(op);
                op.updated = Some(now());
            }
        });
    }

    async fn node_slot(&self, id: &str, node: &str) -> OwnedSemaphorePermit {
        let sem = lock(&self.inner.slots)
            .entry(node.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.inner.config.max_disk_jobs_per_node)))
            .clone();
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return p;
        }
        let limit = self.inner.config.max_disk_jobs_per_node;
        self.note_op(id, |op| {
            op.state = OpState::Queued as i32;
            if let Some(s) = op.steps.first_mut() {
                s.message = format!("waiting: node {node} runs {limit} disk jobs already");
            }
        });
        self.publish(self.event(id, "queued", format!("waiting for a disk job slot on {node}")), false);
        self.dispatched(id);
        sem.acquire_owned().await.expect("slot semaphores are never closed")
    }

    /// Runs step `index` as one agent job on the step's node: submitted, then (with `follow`) followed to its
    /// end. Without `follow`, the job as the agent accepted it.
    pub(super) async fn agent_step(
        &self,
        id: &str,
        index: usize,
        req: SubmitJobRequest,
        follow: bool,
    ) -> Result<Job, String> {
        let (node, step_name, secrets_lost, disk_heavy) = self
            .view()
            .read(|s| {
                s.ops.get(id).map(|o| {
                    let lost = o.secrets_in_memory && !lock(&self.inner.secrets).contains_key(id);
                    let step = &o.steps[index];
                    let node = if step.node.is_empty() { o.node.clone() } else { step.node.clone() };
                    (node, step.name.clone(), lost, is_disk_heavy(o.kind()))
                })
            })
            .ok_or_else(|| format!("operation {id} vanished"))?;
        let mut req = req;
        self.view().read(|s| super::tenants::localize_nics(s, &node, &mut req));
        let _permit = if disk_heavy { Some(self.node_slot(id, &node).await) } else { None };
        // Not stored on its own: a durable write here would sit between the API's answer and the agent
        // receiving the job. The job id, or the end, stores it.
        self.note_op(id, |op| {
            op.state = OpState::Running as i32;
            let s = &mut op.steps[index];
            s.state = OpState::Running as i32;
            s.message.clear();
        });
        let attempts = self.inner.config.retry_attempts.max(1);
        let mut backoff = Duration::from_millis(self.inner.config.retry_backoff_ms);
        let mut tries = 0;
        loop {
            tries += 1;
            let address = self
                .view()
                .read(|s| s.nodes.get(&node).map(|n| n.address.clone()))
                .ok_or_else(|| format!("node {node} was removed from the grid"))?;
            let outcome = if secrets_lost {
                self.attach_only(id, index, &address, &req).await
            } else {
                self.submit_and_follow(id, index, &address, req.clone(), follow).await
            };
            if outcome.is_err() {
                self.dispatched(id);
            }
            match outcome {
                Ok(job) => return Ok(job),
                Err(StepError::Fatal(m)) => return Err(format!("node {node}: {step_name}: {m}")),
                Err(StepError::Retry(m)) if tries >= attempts => {
                    return Err(format!("node {node} unreachable after {tries} tries: {step_name}: {m}"));
                }
                Err(StepError::Retry(m)) => {
                    let note = format!(
                        "node {node} unreachable (try {tries} of {attempts}), retrying in {backoff:?}: {m}"
                    );
                    tracing::warn!(op = %id, "{note}");
                    self.update_op(id, |op| {
                        op.steps[index].attempts = tries;
                        op.steps[index].message = note.clone();
                    })
                    .await;
                    self.publish(self.event(id, &step_name, note), false);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// After a restart that lost a create's secrets: re-attach to the agent job already submitted under the
    /// step's key, or fail (never submit the spec without its secrets).
    async fn attach_only(
        &self,
        id: &str,
        index: usize,
        address: &str,
        req: &SubmitJobRequest,
    ) -> Result<Job, StepError> {
        let mut client = self.agents().client(address).await.map_err(|e| StepError::Retry(e.to_string()))?;
        let list = ListJobsRequest { kind: JobKind::Provision as i32, ..Default::default() };
        let jobs = client.list_jobs(list).await.map_err(|s| classify(&s))?.into_inner().jobs;
        if jobs.iter().any(|j| j.idempotency_key == req.idempotency_key) {
            return self.submit_and_follow(id, index, address, req.clone(), true).await;
        }
        Err(StepError::Fatal(
            "the coordinator restarted before this create reached its agent, and its secrets (passwords, \
             passphrases) are never stored: create the VM again"
                .into(),
        ))
    }

    async fn submit_and_follow(
        &self,
        id: &str,
        index: usize,
        address: &str,
        req: SubmitJobRequest,
        follow: bool,
    ) -> Result<Job, StepError> {
        let timeout = self.agents().call_timeout;
        let mut client = self.agents().client(address).await.map_err(|e| StepError::Retry(e.to_string()))?;
        let submitted = tokio::time::timeout(timeout, client.submit_job(req)).await;
        self.dispatched(id);
        let job = submitted
            .map_err(|_| StepError::Retry(format!("SubmitJob took more than {timeout:?}")))?
            .map_err(|s| classify(&s))?
            .into_inner();
        // The job is the agent's now: the secrets are no longer needed.
        lock(&self.inner.secrets).remove(id);
        let known = self.view().read(|s| s.ops.get(id).map(|o| o.steps[index].agent_job_id.clone()));
        if known.as_deref() != Some(job.id.as_str()) {
            let job_id = job.id.clone();
            // A job that has already ended is stored with the operation's end, right after.
            if terminal(job.state()) {
                self.note_op(id, |op| op.steps[index].agent_job_id = job_id);
            } else {
                self.update_op(id, |op| op.steps[index].agent_job_id = job_id).await;
            }
        }
        if terminal(job.state()) || !follow {
            return Ok(job);
        }
        let step_name =
            self.view().read(|s| s.ops.get(id).map(|o| o.steps[index].name.clone())).unwrap_or_default();
        let mut stream = client
            .watch_job(WatchJobRequest { job_id: job.id.clone(), from_seq: 0 })
            .await
            .map_err(|s| classify(&s))?
            .into_inner();
        loop {
            match stream.message().await {
                Ok(Some(ev)) => {
                    let (done, total, agent_step) = (ev.bytes_done, ev.bytes_total, ev.step.clone());
                    self.view().observe(|s| {
                        if let Some(op) = s.ops.get_mut(id) {
                            let st = &mut op.steps[index];
                            st.bytes_done = done;
                            st.bytes_total = total;
                            st.message = if ev.message.is_empty() {
                                agent_step.clone()
                            } else {
                                format!("{agent_step}: {}", ev.message)
                            };
                        }
                    });
                    let mut e = self.event(id, &step_name, ev.message.clone());
                    e.agent_step = agent_step;
                    e.bytes_done = done;
                    e.bytes_total = total;
                    self.publish(e, false);
                }
                Ok(None) => break,
                Err(s) => return Err(classify(&s)),
            }
        }
        let job = client
            .get_job(GetJobRequest { job_id: job.id.clone() })
            .await
            .map_err(|s| classify(&s))?
            .into_inner();
        if terminal(job.state()) {
            Ok(job)
        } else {
            Err(StepError::Retry("the job's event stream ended before the job did".into()))
        }
    }

    pub(super) fn event(&self, id: &str, step: &str, message: String) -> OperationEvent {
        let state = self.view().read(|s| s.ops.get(id).map(|o| o.state)).unwrap_or_default();
        OperationEvent {
            operation: id.to_string(),
            step: step.to_string(),
            state,
            message,
            time: Some(now()),
            ..Default::default()
        }
    }

    /// Record the outcome in one transaction: the operation's end, the VM's new state, the lock and (for
    /// a failed create or a delete) the allocation released.
    async fn finish(&self, id: &str, outcome: Result<Job, String>) -> Result<(), super::OpError> {
        let op = self.view().update::<_, super::OpError>(|s| {
            let Some(mut op) = s.ops.get(id).cloned() else { return Ok((None, vec![])) };
            if is_finished(&op) {
                return Ok((None, vec![]));
            }
            let mut changes = Vec::new();
            let t = now();
            let vm = s.vms.get(&op.vm).cloned();
            match (&outcome, vm) {
                (Ok(job), Some(mut vm)) => {
                    op.state = OpState::Succeeded as i32;
                    vm.error.clear();
                    match (op.kind(), &job.outcome) {
                        (OpKind::CreateVm | OpKind::RebuildVm, outcome) => {
                            if let Some(Outcome::Provision(p)) = outcome {
                                vm.provision = Some(p.clone());
                            }
                            let start = vm.dedicated
                                || vm.spec.as_ref().and_then(|s| s.machine.as_ref()).is_some_and(|m| m.start);
                            vm.state = if start { VmState::Running } else { VmState::Stopped } as i32;
                            op.result = if op.kind() == OpKind::RebuildVm {
                                format!(
                                    "rebuilt on {} from its spec (a fresh disk: the old one went with node {}; \
                                     passwords are never stored, so accounts have none)",
                                    vm.node, vm.rebuilt_from
                                )
                            } else {
                                format!("provisioned on {}", vm.node)
                            };
                        }
                        (OpKind::DeleteVm, outcome) => {
                            if let Some(Outcome::Wipe(w)) = outcome {
                                vm.wipe_report = w.report_json.clone();
                                op.result = format!("wiped {} bytes, verified {}", w.bytes, w.verified);
                            }
                            vm.state = VmState::Deleted as i32;
                            vm.observed_state.clear();
                        }
                        (OpKind::ControlVm, outcome) => {
                            let observed = match outcome {
                                Some(Outcome::Control(c)) => c.state.clone(),
                                _ => String::new(),
                            };
                            vm.state = match Action::try_from(op.action).unwrap_or(Action::Unspecified) {
                                Action::Stop | Action::Destroy => VmState::Stopped,
                                Action::Suspend => VmState::Paused,
                                _ => VmState::Running,
                            } as i32;
                            op.result = format!("domain {observed}");
                            vm.observed_state = observed;
                        }
                        (OpKind::ResizeVm, _) => {
                            let r = vm.resources.unwrap_or_default();
                            let when = if op.params.contains_key("restart") {
                                vm.state = VmState::Running as i32;
                                "restarted with them"
                            } else {
                                "vCPUs and memory from the next start"
                            };
                            op.result = format!(
                                "{} vCPUs, {} MiB memory, {} MiB disk ({when})",
                                r.vcpus, r.memory_mib, r.disk_mib
                            );
                        }
                        (OpKind::SnapshotVm, outcome) => {
                            if let Some(Outcome::Snapshot(r)) = outcome {
                                op.result = format!(
                                    "image {}:{} sha256 {} in {}",
                                    r.name, r.version, r.sha256, r.store
                                );
                            }
                        }
                        (OpKind::MigrateVm, _) => {
                            let from = vm.node.clone();
                            super::migrate::settle(&op, &mut vm, true);
                            op.result = super::migrate::result_line(&op, &from);
                        }
                        (OpKind::DrainNode | OpKind::FenceNode | OpKind::CleanNode | OpKind::Unspecified, _) => {}
                    }
                    if vm.operation == op.id {
                        vm.operation.clear();
                    }
                    vm.updated = Some(t);
                    changes.push(Change::PutVm(vm));
                }
                (Err(e), Some(mut vm)) => {
                    op.state = OpState::Failed as i32;
                    op.error = e.clone();
                    match op.kind() {
                        // Nothing half-done: the VM record, and so its allocation, goes.
                        OpKind::CreateVm => changes.push(Change::RemoveVm(vm.name.clone())),
                        kind => {
                            if kind == OpKind::ResizeVm
                                && let Some(prev) = op.previous
                            {
                                // Only what did not change on the agent goes back.
                                let mut r = vm.resources.unwrap_or_default();
                                for st in op.steps.iter().filter(|st| st.state() != OpState::Succeeded) {
                                    if st.name == RESOURCES_STEP {
                                        (r.vcpus, r.memory_mib) = (prev.vcpus, prev.memory_mib);
                                    } else if st.name != RESIZE_STOP_STEP && st.name != RESIZE_START_STEP {
                                        r.disk_mib = prev.disk_mib;
                                    }
                                }
                                vm.resources = Some(r);
                                // A restart that shut the domain down but did not start it again leaves
                                // it stopped, as it is.
                                let done = |name: &str| {
                                    op.steps.iter().any(|st| st.name == name && st.state() == OpState::Succeeded)
                                };
                                if done(RESIZE_STOP_STEP) && !done(RESIZE_START_STEP) {
                                    vm.state = VmState::Stopped as i32;
                                }
                                if let Some(s) = vm.spec.as_mut() {
                                    if let Some(d) = s.disk.as_mut() {
                                        d.size_mib = r.disk_mib;
                                    }
                                    if let Some(m) = s.machine.as_mut() {
                                        (m.vcpus, m.memory_mib) = (r.vcpus, r.memory_mib);
                                    }
                                }
                            }
                            if kind == OpKind::DeleteVm {
                                vm.state = VmState::Failed as i32;
                            }
                            // Placed again when room appears (the next poll round tries).
                            if kind == OpKind::RebuildVm {
                                vm.state = VmState::Pending as i32;
                            }
                            if kind == OpKind::MigrateVm {
                                super::migrate::settle(&op, &mut vm, false);
                            }
                            vm.error = e.clone();
                            if vm.operation == op.id {
                                vm.operation.clear();
                            }
                            vm.updated = Some(t);
                            changes.push(Change::PutVm(vm));
                        }
                    }
                }
                (Ok(_), None) => op.state = OpState::Succeeded as i32,
                (Err(e), None) => {
                    op.state = OpState::Failed as i32;
                    op.error = e.clone();
                }
            }
            // A drain's steps say per VM how it ended already.
            if op.kind() != OpKind::DrainNode
                && let Some(step) = op.steps.iter_mut().find(|s| s.state() != OpState::Succeeded)
            {
                step.state = op.state;
                if let Err(e) = &outcome {
                    step.message = e.clone();
                }
            }
            op.finished = Some(t);
            op.updated = Some(t);
            changes.push(Change::PutOp(op.clone()));
            Ok((Some(op), changes))
        })
        .await?;
        lock(&self.inner.secrets).remove(id);
        if let Some(op) = op {
            let message = if op.error.is_empty() { op.result.clone() } else { op.error.clone() };
            let mut e = self.event(id, "done", message);
            e.snapshot = Some(op);
            self.publish(e, true);
        }
        Ok(())
    }
}

/// "node n1: provision: fetch: image debian:12 not found (IMAGE_NOT_FOUND)" for a job that did not succeed.
pub(super) fn job_failure(node: &str, step: &str, job: &Job) -> String {
    match &job.outcome {
        Some(Outcome::Error(e)) => {
            let code =
                gridforge_proto::v1::error::Code::try_from(e.code).map(|c| c.as_str_name()).unwrap_or("");
            // The agent's step is worth saying only when it is not the operation step's own name.
            let agent_step =
                if e.step.is_empty() || e.step == step { String::new() } else { format!("{}: ", e.step) };
            format!("node {node}: {step}: {agent_step}{} ({code})", e.message)
        }
        _ => format!("node {node}: {step}: agent job {} ended {}", job.id, job.state().as_str_name()),
    }
}
