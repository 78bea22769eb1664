//! Draining a node: cordon it in the transaction that starts the operation, then migrate each of its VMs
//! off (placement picks each destination), at most `max_parallel` at a time, until the deadline. The drain
//! is an operation with one step per VM: the step's `agent_job_id` is the VM's migration, its message where
//! the VM went or why it could not move. A restarted coordinator resumes the drain: VMs already gone are
//! done, migrations already started are waited for, the rest are started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gridforge_proto::v1::{DrainNodeRequest, Job, JobState, MigrateVmRequest, Operation, OperationStep};
use tokio::sync::Semaphore;

use super::{Engine, OpError};
use crate::grid::{Change, OpKind, OpState, is_finished};

const DEFAULT_PARALLEL: u32 = 2;
const DEFAULT_DEADLINE_SECS: u32 = 600;
/// How often a drain looks at the migrations it waits for.
const POLL: Duration = Duration::from_millis(100);

impl Engine {
    pub async fn drain_node(&self, req: DrainNodeRequest, who: &str) -> Result<Operation, OpError> {
        let name = req.name.clone();
        let pending = self.view().stage(|s| {
            let mut node = super::known_node(s, &name)?;
            if let Some(o) = super::unfinished(s, OpKind::DrainNode, &name) {
                return Err(OpError::Precondition(format!("node {name} is being drained by {}", o.id)));
            }
            let id = s.next_op_id();
            let steps: Vec<OperationStep> = s
                .vms_on(&name)
                .filter(|v| v.node == name)
                .map(|v| super::step(&v.name, &id, &name))
                .collect();
            let summary = format!("drain {name} ({} VMs)", steps.len());
            let mut op = super::new_op(&id, OpKind::DrainNode, ("", &name), steps, who, summary);
            let parallel = if req.max_parallel == 0 { DEFAULT_PARALLEL } else { req.max_parallel };
            let deadline =
                if req.deadline_seconds == 0 { DEFAULT_DEADLINE_SECS } else { req.deadline_seconds };
            op.params.insert("max_parallel".into(), parallel.to_string());
            op.params.insert("deadline_seconds".into(), deadline.to_string());
            node.cordoned = true;
            Ok((op.clone(), vec![Change::PutNode(node), Change::PutOp(op)]))
        })?;
        let op = self.start_when_durable(pending, None).await?;
        tracing::info!(op = %op.id, node = %name, by = who, "{}", op.summary);
        Ok(op)
    }

    /// Runs a drain's steps; Ok when every VM moved, else the list of those that could not.
    pub(super) async fn run_drain(&self, id: &str) -> Result<Job, String> {
        let op =
            self.view().read(|s| s.ops.get(id).cloned()).ok_or_else(|| format!("operation {id} vanished"))?;
        self.dispatched(id);
        let param = |k: &str, default: u32| op.params.get(k).and_then(|v| v.parse().ok()).unwrap_or(default);
        let slots = Arc::new(Semaphore::new(param("max_parallel", DEFAULT_PARALLEL).max(1) as usize));
        let deadline =
            Instant::now() + Duration::from_secs(param("deadline_seconds", DEFAULT_DEADLINE_SECS).into());
        let mut tasks = Vec::new();
        for (index, st) in op.steps.iter().enumerate() {
            if matches!(st.state(), OpState::Succeeded | OpState::Failed) {
                continue;
            }
            let (engine, id, slots) = (self.clone(), id.to_string(), slots.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = slots.acquire_owned().await.expect("drain semaphore");
                let outcome = engine.drain_one(&id, index, deadline).await;
                let state = if outcome.is_ok() { OpState::Succeeded } else { OpState::Failed };
                let message = outcome.unwrap_or_else(|e| e);
                engine
                    .update_op(&id, |op| {
                        op.steps[index].state = state as i32;
                        op.steps[index].message = message.clone();
                    })
                    .await;
                let step = engine.view().read(|s| s.ops.get(&id).map(|o| o.steps[index].name.clone()));
                engine.publish(engine.event(&id, &step.unwrap_or_default(), message), false);
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        let op =
            self.view().read(|s| s.ops.get(id).cloned()).ok_or_else(|| format!("operation {id} vanished"))?;
        let line = |st: &OperationStep| format!("{}: {}", st.name, st.message);
        let moved: Vec<String> =
            op.steps.iter().filter(|s| s.state() == OpState::Succeeded).map(line).collect();
        let stuck: Vec<String> =
            op.steps.iter().filter(|s| s.state() != OpState::Succeeded).map(line).collect();
        let result = format!("{} of {} VMs moved off {}", moved.len(), op.steps.len(), op.node);
        let detail = if moved.is_empty() { String::new() } else { format!(" ({})", moved.join("; ")) };
        self.note_op(id, |o| o.result = format!("{result}{detail}"));
        if stuck.is_empty() {
            Ok(Job { state: JobState::Succeeded as i32, ..Default::default() })
        } else {
            Err(format!("{result}; could not move {}: {}", stuck.len(), stuck.join("; ")))
        }
    }

    /// Moves the VM of step `index` off the drained node: "moved to node-b by op-…", or why not.
    async fn drain_one(&self, id: &str, index: usize, deadline: Instant) -> Result<String, String> {
        let (node, vm, mut migration) = self
            .view()
            .read(|s| {
                s.ops.get(id).map(|o| {
                    (o.node.clone(), o.steps[index].name.clone(), o.steps[index].agent_job_id.clone())
                })
            })
            .ok_or_else(|| format!("operation {id} vanished"))?;
        loop {
            if migration.is_empty() {
                let here = self.view().read(|s| {
                    s.vms.get(&vm).filter(|v| crate::grid::holds_allocation(v)).map(|v| v.node == node)
                });
                match here {
                    None => return Ok("deleted meanwhile".into()),
                    Some(false) => return Ok("not on the node any more".into()),
                    Some(true) => {}
                }
                if Instant::now() >= deadline {
                    return Err("the drain's deadline passed before its migration could start".into());
                }
                let req = MigrateVmRequest { name: vm.clone(), ..Default::default() };
                match self.migrate_vm(req, &format!("drain {id}")).await {
                    Ok(op) => {
                        migration = op.id.clone();
                        let m = migration.clone();
                        self.update_op(id, |o| {
                            o.steps[index].agent_job_id = m.clone();
                            o.steps[index].state = OpState::Running as i32;
                            o.steps[index].message = format!("migrating ({m})");
                        })
                        .await;
                    }
                    // Busy with another operation: wait for it, then try again.
                    Err(OpError::Precondition(m)) if m.contains("is busy") => tokio::time::sleep(POLL).await,
                    Err(e) => return Err(e.to_string()),
                }
                continue;
            }
            let done = self.view().read(|s| s.ops.get(&migration).filter(|o| is_finished(o)).cloned());
            match done {
                Some(m) if m.state() == OpState::Succeeded => {
                    let to = m.params.get("to").cloned().unwrap_or_default();
                    return Ok(format!("moved to {to} by {migration}"));
                }
                Some(m) => return Err(format!("{migration} failed: {}", m.error)),
                None if self.view().read(|s| !s.ops.contains_key(&migration)) => {
                    return Err(format!("its migration {migration} is gone"));
                }
                None => tokio::time::sleep(POLL).await,
            }
        }
    }
}
