//! The scaling loop on the leader (the design's master decision program): after each poll round, the VMs'
//! observed load (kept in memory over each group's window) and the grid view go to the pure
//! [`crate::scaling::decide`]; each decision becomes an ordinary operation (create, delete, resize)
//! requested by [`SCALER`], and is logged with its reason. A group with an operation in flight is left alone,
//! so a decision is never taken twice, also across a change of leader (the operation is in the store).

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use gridforge_proto::v1::{
    CreateVmRequest, Decision, DeleteVmRequest, GroupStatus, MigrateVmRequest, NodeStatsReport,
    ResizeVmRequest, Resources, decision::Action,
};

use super::{Engine, OpError, group_of, lock};
use crate::grid::{Change, DepartureCursor, GridState, Vm, VmState, now};
use crate::scaling::{self as pure, GroupInput, Member, SnapshotRoom};

/// Decisions kept for `gridctl scaling log`.
pub const KEPT_DECISIONS: usize = 1000;
/// The requester named on the operations scaling starts.
pub const SCALER: &str = "scaling";

/// The VMs' observed load, and how far the grid's departures were followed to forget the VMs that left.
#[derive(Debug, Default)]
pub(super) struct Usage {
    windows: pure::UsageWindows,
    /// The departures before this are forgotten (`None`: none followed yet).
    forgotten: Option<DepartureCursor>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The window `g`'s load is averaged over.
fn group_window(g: &crate::grid::Group) -> u32 {
    pure::effective_window(g.scaling.map_or(0, |p| p.window_secs))
}

/// The window a VM's load is shown over: its group's, its own policy's, or the default.
fn window_of(s: &GridState, v: &Vm) -> u32 {
    group_of(s, &v.tenant, &v.group)
        .map_or_else(|| pure::effective_window(v.scaling.map_or(0, |p| p.window_secs)), group_window)
}

/// The members of `tenant`/`group` (not deleted) oldest first, as the pure loop takes them.
fn members(
    s: &GridState,
    usage: &pure::UsageWindows,
    tenant: &str,
    group: &str,
    window: u32,
    at: u64,
) -> Vec<Member> {
    in_order(s, usage, s.tenant_vms(tenant, group).collect(), window, at)
}

/// `vms` as the pure loop takes a group's members: oldest first.
fn in_order(
    s: &GridState,
    usage: &pure::UsageWindows,
    mut vms: Vec<&Vm>,
    window: u32,
    at: u64,
) -> Vec<Member> {
    vms.sort_by_key(|v| (v.created.map_or(0, |t| t.seconds), v.name.clone()));
    vms.into_iter().map(|v| member(s, usage, v, window, at)).collect()
}

/// `v` with its load over its window at `at` filled in.
fn annotated(usage: &pure::UsageWindows, s: &GridState, mut v: Vm, at: u64) -> Vm {
    v.usage = usage.usage(&v.name, window_of(s, &v), at);
    v
}

fn member(s: &GridState, usage: &pure::UsageWindows, v: &Vm, window: u32, at: u64) -> Member {
    Member {
        name: v.name.clone(),
        node: v.node.clone(),
        running: v.state() == VmState::Running,
        resources: v.resources.unwrap_or_default(),
        created_secs: v.created.map_or(0, |t| u64::try_from(t.seconds).unwrap_or(0)),
        usage: usage.usage(&v.name, window, at),
        busy: s.lock_holder(&v.name).is_some(),
    }
}

/// A VM outside a group with thresholds of its own, as the pure loop takes it: a group of one, named "",
/// with the VM's policy (vertical only) and cooldown.
fn solo_group(v: &Vm) -> Option<crate::grid::Group> {
    let policy = v.scaling.filter(|_| crate::grid::scales_alone(v))?;
    Some(crate::grid::Group {
        tenant: v.tenant.clone(),
        scaling: Some(gridforge_proto::v1::ScalingPolicy { horizontal: false, ..policy }),
        last_scaled: v.last_scaled,
        ..Default::default()
    })
}

impl Engine {
    /// Keep the load each VM of a poll showed (CPU as a share of its vCPUs, memory of its own, disk and
    /// network traffic as the agent measured it).
    pub fn record_usage(&self, stats: &NodeStatsReport) {
        self.record_usage_at(stats, now_secs());
    }

    /// Only VMs in the grid (not DELETED) are kept, and under the view's lock: a VM that leaves meanwhile
    /// departs after its last sample, so [`Engine::forget_gone_usage`] forgets it.
    pub fn record_usage_at(&self, stats: &NodeStatsReport, at: u64) {
        self.view().read(|s| {
            let mut usage = lock(&self.inner.usage);
            for d in &stats.vms {
                let Some(r) =
                    s.vms.get(&d.name).filter(|v| v.state() != VmState::Deleted).and_then(|v| v.resources)
                else {
                    continue;
                };
                let cpu = if r.vcpus > 0 { d.cpu_cores / f64::from(r.vcpus) * 100.0 } else { 0.0 };
                let total = r.memory_mib as f64 * 1024.0 * 1024.0;
                let memory = if total > 0.0 { d.memory_bytes as f64 / total * 100.0 } else { 0.0 };
                let load = pure::VmLoad {
                    cpu_percent: cpu,
                    memory_percent: memory,
                    disk_bytes_per_sec: d.disk_bytes_per_sec,
                    network_bytes_per_sec: d.net_bytes_per_sec,
                };
                usage.windows.record(&d.name, at, load);
            }
        });
    }

    /// `v` with its observed load filled in (`s` is the view it was read from).
    pub fn with_usage(&self, s: &GridState, v: Vm) -> Vm {
        annotated(&lock(&self.inner.usage).windows, s, v, now_secs())
    }

    /// [`Engine::with_usage`] of each of `vms`, read under one lock.
    pub fn with_usages(&self, s: &GridState, vms: impl IntoIterator<Item = Vm>) -> Vec<Vm> {
        let usage = lock(&self.inner.usage);
        let at = now_secs();
        vms.into_iter().map(|v| annotated(&usage.windows, s, v, at)).collect()
    }

    /// The group with its members, their load, and whether its service level is met.
    pub fn group_status(&self, tenant: &str, name: &str) -> Result<GroupStatus, OpError> {
        let at = now_secs();
        self.view().read(|s| {
            super::tenants::tenant_of(s, tenant)?;
            let g = group_of(s, tenant, name)
                .ok_or_else(|| OpError::NotFound(format!("tenant {tenant} has no group {name:?}")))?;
            let window = group_window(g);
            let usage = &lock(&self.inner.usage).windows;
            let ms = members(s, usage, tenant, name, window, at);
            let verdict = pure::service_level(g, &ms);
            let mut vms: Vec<Vm> = ms.iter().filter_map(|m| s.vms.get(&m.name).cloned()).collect();
            for v in &mut vms {
                v.usage = usage.usage(&v.name, window, at);
            }
            Ok(GroupStatus {
                group: Some(g.clone()),
                members: vms,
                running: verdict.running,
                avg_cpu_percent: verdict.avg_cpu_percent,
                avg_memory_percent: verdict.avg_memory_percent,
                meets_service_level: verdict.meets,
                service_level_reason: verdict.reason,
            })
        })
    }

    /// What one round would decide at `at` (seconds since the epoch), taking nothing. Only the VMs that can
    /// take part are read: those of tenants with groups (each tenant's once), and those with thresholds of
    /// their own (the view's index of them).
    pub fn plan_at(&self, at: u64) -> Vec<Decision> {
        self.view().read(|s| {
            let usage = &lock(&self.inner.usage).windows;
            let mut groups: Vec<GroupInput<'_>> = Vec::new();
            for t in s.tenants.values().filter(|t| !t.groups.is_empty()) {
                let mut by_group: HashMap<&str, Vec<&Vm>> = HashMap::new();
                for v in s.tenant_vms(&t.name, "") {
                    by_group.entry(v.group.as_str()).or_default().push(v);
                }
                for g in &t.groups {
                    let vms = by_group.get(g.name.as_str()).cloned().unwrap_or_default();
                    groups
                        .push(GroupInput { group: g, members: in_order(s, usage, vms, group_window(g), at) });
                }
            }
            let solos: Vec<(crate::grid::Group, &Vm)> = s
                .scaled_alone
                .iter()
                .filter_map(|name| s.vms.get(name))
                .filter_map(|v| solo_group(v).map(|g| (g, v)))
                .collect();
            for (g, v) in &solos {
                groups.push(GroupInput { group: g, members: vec![member(s, usage, v, group_window(g), at)] });
            }
            let mut snapshot = s.snapshot.clone();
            let mut room = SnapshotRoom::new(&mut snapshot);
            // A member whose node has no room to grow moves first (see `act`).
            pure::decide_with(&groups, &mut room, at, &pure::DecideOptions { migrate_allowed: true })
        })
    }

    /// The decisions taken, newest first (only `tenant`'s, unless empty; at most `limit`, 0: all kept), or
    /// with `plan` what a round would decide now.
    pub fn decisions(&self, plan: bool, tenant: &str, limit: usize) -> Vec<Decision> {
        let all: Vec<Decision> = if plan {
            self.plan_at(now_secs())
        } else {
            lock(&self.inner.decisions).iter().rev().cloned().collect()
        };
        all.into_iter()
            .filter(|d| tenant.is_empty() || d.tenant == tenant)
            .take(if limit == 0 { usize::MAX } else { limit })
            .collect()
    }

    /// One round of the loop now; the decisions it took.
    pub async fn scaling_round(&self) -> Vec<Decision> {
        self.scaling_round_at(now_secs()).await
    }

    /// One round as at `at`: decide, start an operation for each decision, log them. Only the leader acts.
    pub async fn scaling_round_at(&self, at: u64) -> Vec<Decision> {
        if !self.cluster().is_leader() {
            return Vec::new();
        }
        self.forget_gone_usage();
        let mut taken = Vec::new();
        for mut d in self.plan_at(at) {
            if let Err(e) = self.act(&mut d).await {
                d.error = e.to_string();
                tracing::warn!(action = d.action().as_str_name(), tenant = %d.tenant, group = %d.group, vm = %d.vm, "scaling step failed: {e}");
            }
            self.log_decision(d.clone());
            taken.push(d);
        }
        taken
    }

    /// Samples of VMs no longer in the grid (removed or DELETED) are dropped: those of the VMs that
    /// departed since the last call (see [`crate::grid::Departures`]), or, the first time and when the view
    /// was rebuilt or its log no longer reaches back, those of every VM not in the grid. Each round does this
    /// first.
    pub fn forget_gone_usage(&self) {
        self.view().read(|s| {
            let mut usage = lock(&self.inner.usage);
            let Usage { windows, forgotten } = &mut *usage;
            let gone = |name: &str| s.vms.get(name).is_none_or(|v| v.state() == VmState::Deleted);
            match forgotten.and_then(|c| s.departures.since(c)) {
                Some(departed) => departed.filter(|name| gone(name)).for_each(|name| windows.forget(name)),
                None => windows.retain(|name| !gone(name)),
            }
            *forgotten = Some(s.departures.end());
        });
    }

    fn log_decision(&self, d: Decision) {
        let mut log = lock(&self.inner.decisions);
        // A group held round after round is logged once, until it takes a step (its reason's figures
        // change every round; the plan shows the current one).
        if d.action() == Action::Hold
            && log
                .iter()
                .rev()
                .find(|x| x.tenant == d.tenant && x.group == d.group && (!d.group.is_empty() || x.vm == d.vm))
                .is_some_and(|x| x.action() == Action::Hold)
        {
            return;
        }
        tracing::info!(
            action = d.action().as_str_name(),
            tenant = %d.tenant,
            group = %d.group,
            vm = %d.vm,
            for_group = %d.for_group,
            operation = %d.operation,
            "scaling: {}",
            d.reason
        );
        log.push_back(d);
        while log.len() > KEPT_DECISIONS {
            log.pop_front();
        }
    }

    /// Start the operation of decision `d` (its id goes into `d.operation`); the group's cooldown starts.
    async fn act(&self, d: &mut Decision) -> Result<(), OpError> {
        let action = d.action();
        if action == Action::Hold {
            return Ok(());
        }
        self.mark_scaled(d, action == Action::ScaleOut).await?;
        let op = match action {
            Action::ScaleOut => {
                let (spec, placement) = self.view().read(|s| {
                    let g = group_of(s, &d.tenant, &d.group);
                    (g.and_then(|g| g.template.clone()), g.and_then(|g| g.placement.clone()))
                });
                let mut spec = spec.ok_or_else(|| {
                    OpError::Precondition(format!("group {}/{} has no template", d.tenant, d.group))
                })?;
                spec.name = d.vm.clone();
                let req = CreateVmRequest {
                    spec: Some(spec),
                    placement,
                    tenant: d.tenant.clone(),
                    group: d.group.clone(),
                    ..Default::default()
                };
                self.create_vm(req, SCALER).await?.operation.unwrap_or_default()
            }
            Action::ScaleIn | Action::Reclaim => {
                self.delete_vm(DeleteVmRequest { name: d.vm.clone(), ..Default::default() }, SCALER).await?
            }
            Action::ScaleUp | Action::ScaleDown => {
                let r = d.resources.unwrap_or_default();
                let req = ResizeVmRequest {
                    name: d.vm.clone(),
                    vcpus: r.vcpus,
                    memory_mib: r.memory_mib,
                    restart: true,
                    ..Default::default()
                };
                match self.resize_vm(req, SCALER).await {
                    // No room where it is: it moves to a node with room for its new size; a later round
                    // grows it there.
                    Err(OpError::Unschedulable(_)) if action == Action::ScaleUp => {
                        let room_for = Resources { vcpus: r.vcpus, memory_mib: r.memory_mib, disk_mib: 0 };
                        let req = MigrateVmRequest {
                            name: d.vm.clone(),
                            room_for: Some(room_for),
                            ..Default::default()
                        };
                        let op = self.migrate_vm(req, SCALER).await?;
                        d.reason = format!("{}; {}", d.reason, op.summary);
                        op
                    }
                    other => other?,
                }
            }
            Action::Hold | Action::Unspecified => return Ok(()),
        };
        d.operation = op.id;
        Ok(())
    }

    /// The group's (or a VM's own) cooldown starts now; a scale-out takes the next member number.
    async fn mark_scaled(&self, d: &Decision, take_number: bool) -> Result<(), OpError> {
        let (tenant, group, vm) = (d.tenant.as_str(), d.group.as_str(), d.vm.as_str());
        self.view()
            .update(|s| {
                if group.is_empty() {
                    let Some(mut v) = s.vms.get(vm).cloned() else { return Ok(((), vec![])) };
                    v.last_scaled = Some(now());
                    return Ok(((), vec![Change::PutVm(v)]));
                }
                let Some(mut t) = s.tenants.get(tenant).cloned() else { return Ok(((), vec![])) };
                let Some(g) = t.groups.iter_mut().find(|g| g.name == group) else { return Ok(((), vec![])) };
                g.last_scaled = Some(now());
                if take_number {
                    g.next_member = g.next_member.max(1) + 1;
                }
                Ok::<_, OpError>(((), vec![Change::PutTenant(t)]))
            })
            .await
    }

    /// Set (or with `None` remove) the thresholds of VM `name`, outside a group.
    pub async fn set_vm_scaling(
        &self,
        name: &str,
        scaling: Option<gridforge_proto::v1::ScalingPolicy>,
    ) -> Result<Vm, OpError> {
        if let Some(p) = &scaling {
            if p.horizontal {
                return Err(OpError::Invalid(format!(
                    "vm {name}: a VM's own thresholds scale it vertically only (members are added to groups)"
                )));
            }
            let probe = crate::grid::Group {
                name: name.into(),
                scaling: Some(gridforge_proto::v1::ScalingPolicy { vertical: true, ..*p }),
                ..Default::default()
            };
            super::tenants::check_policy(&probe)?;
        }
        self.view()
            .update(|s| {
                let mut v = s
                    .vms
                    .get(name)
                    .filter(|v| v.state() != VmState::Deleted)
                    .cloned()
                    .ok_or_else(|| OpError::NotFound(format!("no vm {name:?}")))?;
                if !v.group.is_empty() {
                    return Err(OpError::Precondition(format!(
                        "vm {name} is a member of group {}/{}: it follows the group's thresholds",
                        v.tenant, v.group
                    )));
                }
                v.scaling = scaling.map(|p| gridforge_proto::v1::ScalingPolicy { vertical: true, ..p });
                v.updated = Some(now());
                Ok((v.clone(), vec![Change::PutVm(v)]))
            })
            .await
    }
}
