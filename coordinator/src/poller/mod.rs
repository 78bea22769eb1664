//! The status poller: every interval, NodeStats and Diagnostics of each node with bounded fan-out, the calls
//! spread over half the interval. A node that answers is Ready, or NotReady while a check FAILs; one that misses `unreachable_after` polls in a
//! row is Unreachable. The domains an agent reports are compared with the VMs the grid places there: drift
//! is shown on the node and the VM, never "fixed". Only state changes are stored; usage stays in memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use gridforge_proto::v1::{
    DiagnosticsReport, DiagnosticsRequest, Drift, NodeStatsReport, NodeStatsRequest, drift,
};
use tokio::sync::Semaphore;

use crate::config::PollerConfig;
use crate::grid::{Change, GridState, NodeState, VmState, now};
use crate::ops::Engine;
use crate::ops::nodes_health;
use crate::store::Pending;

/// Poll every datacenter in a loop of its own (its own interval, its own `concurrency` slots), so that a
/// datacenter whose nodes are slow or cut off delays only its own polls; run the scaling loop every interval
/// on what they observed.
pub async fn run(engine: Engine, config: PollerConfig) {
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loops: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tick.tick().await;
        let datacenters: BTreeSet<String> =
            engine.view().read(|s| s.nodes.values().map(|n| n.datacenter.clone()).collect());
        loops.retain(|_, task| !task.is_finished());
        for dc in datacenters {
            if let std::collections::hash_map::Entry::Vacant(slot) = loops.entry(dc) {
                let dc = slot.key().clone();
                slot.insert(tokio::spawn(datacenter_loop(engine.clone(), config.clone(), dc)));
            }
        }
        engine.scaling_round().await;
    }
}

/// Rounds over the nodes of datacenter `dc` until it has none.
async fn datacenter_loop(engine: Engine, config: PollerConfig, dc: String) {
    let mut tick = tokio::time::interval(Duration::from_millis(config.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let spread = Duration::from_millis(config.interval_ms / 2);
    loop {
        tick.tick().await;
        if !engine.view().read(|s| s.nodes.values().any(|n| n.datacenter == dc)) {
            return;
        }
        poll_nodes(&engine, &config, &slots, spread, Some(&dc)).await;
    }
}

/// One round over every node (see [`poll_nodes`]).
pub async fn poll_all(engine: &Engine, config: &PollerConfig, slots: &Arc<Semaphore>, spread: Duration) {
    poll_nodes(engine, config, slots, spread, None).await;
}

/// One round over the nodes of datacenter `dc` (every node for `None`); returns when each node has answered
/// or timed out. The polls start in waves evenly spread over `spread` (half the interval in the daemon), so
/// that a thousand nodes are not a burst of two thousand calls every interval that delays the operations'
/// agent calls meanwhile.
pub async fn poll_nodes(
    engine: &Engine,
    config: &PollerConfig,
    slots: &Arc<Semaphore>,
    spread: Duration,
    dc: Option<&str>,
) {
    let nodes: Vec<(String, String)> = engine.view().read(|s| {
        s.nodes
            .values()
            .filter(|n| dc.is_none_or(|dc| n.datacenter == dc))
            .map(|n| (n.name.clone(), n.address.clone()))
            .collect()
    });
    let timeout =
        Duration::from_millis(config.interval_ms.max(1000)) + Duration::from_millis(config.sample_ms.into());
    let mut tasks = Vec::with_capacity(nodes.len());
    // In waves of `concurrency` nodes: a wave's calls share wake-ups and writes, which spreading every call
    // on its own would cost in CPU.
    let start = tokio::time::Instant::now();
    let wave = config.concurrency.max(1);
    let waves = u32::try_from(nodes.len().div_ceil(wave)).unwrap_or(u32::MAX).max(1);
    for (i, (name, address)) in nodes.into_iter().enumerate() {
        let w = u32::try_from(i / wave).unwrap_or(u32::MAX);
        tokio::time::sleep_until(start + spread / waves * w).await;
        let permit = slots.clone().acquire_owned().await.expect("poller semaphore");
        let (engine, sample_ms) = (engine.clone(), config.sample_ms);
        tasks.push(tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, poll_one(&engine, &address, sample_ms)).await;
            drop(permit);
            let result = result.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
            (name, result)
        }));
    }
    // Recorded as they come, made durable together (the node state changes of one round share transactions).
    let mut pending = Vec::new();
    for t in tasks {
        if let Ok((name, result)) = t.await
            && let Some(p) = record(engine, &name, result, config)
        {
            pending.push((name, p));
        }
    }
    for (name, p) in pending {
        if let Err(e) = p.durable().await {
            tracing::error!(node = %name, "cannot store the poll: {e}");
        }
    }
    recover(engine).await;
}

/// After a round: fence the nodes that became LOST (once per loss), clean the fenced ones that answer again,
/// and rebuild what a fenced node held or what waits PENDING.
async fn recover(engine: &Engine) {
    let (lost, back, rebuild) = engine.view().read(|s| {
        // When an operation of `kind` last started on `node`.
        let newest = |kind: crate::grid::OpKind, node: &str| {
            s.ops
                .values()
                .filter(|o| o.kind() == kind && o.node == node)
                .filter_map(|o| o.created.as_ref().map(|t| (t.seconds, t.nanos)))
                .max()
        };
        let lost: Vec<String> = s
            .nodes
            .values()
            .filter(|n| n.state() == NodeState::Lost && !n.fenced)
            // Fenced once per loss: no fence started since the node became unreachable.
            .filter(|n| {
                newest(crate::grid::OpKind::FenceNode, &n.name)
                    < n.unreachable_since.as_ref().map(|t| (t.seconds, t.nanos))
            })
            .map(|n| n.name.clone())
            .collect();
        let back: Vec<(String, Vec<String>)> = s
            .nodes
            .values()
            .filter(|n| n.fenced && n.state() != NodeState::Lost)
            // One clean per return: none since the node's latest fencing.
            .filter(|n| {
                newest(crate::grid::OpKind::CleanNode, &n.name)
                    < newest(crate::grid::OpKind::FenceNode, &n.name)
            })
            .map(|n| {
                // Only the domains of VMs the grid now places elsewhere: a domain it does not know is shown
                // as drift, never wiped.
                let stale = n.drift.iter().filter(|d| {
                    d.kind() == drift::Kind::UnknownDomain
                        && s.vms.get(&d.vm).is_some_and(|v| v.node != n.name)
                });
                (n.name.clone(), stale.map(|d| d.vm.clone()).collect())
            })
            .collect();
        // A fenced node's VMs, or any waiting PENDING (rebuild_pending picks which).
        let rebuild =
            s.nodes.values().any(|n| n.fenced) || s.vms.values().any(|v| v.state() == VmState::Pending);
        (lost, back, rebuild)
    });
    for name in lost {
        if let Err(e) = engine.fence_node(&name, "poller").await {
            tracing::error!(node = %name, "cannot start fencing: {e}");
        }
    }
    for (name, stale) in back {
        if let Err(e) = engine.clean_node(&name, stale).await {
            tracing::error!(node = %name, "cannot clean the node: {e}");
        }
    }
    if rebuild {
        engine.rebuild_pending().await;
    }
}

async fn poll_one(
    engine: &Engine,
    address: &str,
    sample_ms: u32,
) -> Result<(NodeStatsReport, DiagnosticsReport), String> {
    let mut client = engine.agents().client(address).await.map_err(|e| e.to_string())?;
    let text = |s: tonic::Status| crate::ops::status_text(&s);
    let stats = client.node_stats(NodeStatsRequest { sample_ms }).await.map_err(text)?;
    let diag = client.diagnostics(DiagnosticsRequest {}).await.map_err(text)?;
    Ok((stats.into_inner(), diag.into_inner()))
}

/// Drift on one node: the domains the agent reports vs. the VMs the grid places there.
pub fn drift_of(state: &GridState, node: &str, stats: &NodeStatsReport) -> Vec<Drift> {
    let domains: BTreeMap<&str, &str> =
        stats.vms.iter().map(|v| (v.name.as_str(), v.state.as_str())).collect();
    let vcpus: BTreeMap<&str, u32> = stats.vms.iter().map(|v| (v.name.as_str(), v.vcpus)).collect();
    let mut out = Vec::new();
    for vm in state.vms_on(node) {
        if matches!(
            vm.state(),
            VmState::Provisioning | VmState::Deleting | VmState::Failed | VmState::Migrating
        ) {
            continue;
        }
        match domains.get(vm.name.as_str()) {
            None => out.push(Drift {
                kind: drift::Kind::MissingDomain as i32,
                vm: vm.name.clone(),
                detail: "the agent reports no such domain".into(),
            }),
            Some(actual) if !vm.desired_state.is_empty() && !state_matches(&vm.desired_state, actual) => out
                .push(Drift {
                    kind: drift::Kind::State as i32,
                    vm: vm.name.clone(),
                    detail: format!("desired {}, domain {actual}", vm.desired_state),
                }),
            Some(actual) => {
                let want = vm.resources.unwrap_or_default().vcpus;
                let have = vcpus.get(vm.name.as_str()).copied().unwrap_or(0);
                if *actual == "running" && have > 0 && have != want {
                    out.push(Drift {
                        kind: drift::Kind::State as i32,
                        vm: vm.name.clone(),
                        detail: format!("domain runs {have} vCPUs, the grid gives it {want}"),
                    });
                }
            }
        }
    }
    for name in domains.keys() {
        let ours = state.vms.get(*name).is_some_and(|v| v.node == node && crate::grid::holds_allocation(v));
        if !ours {
            out.push(Drift {
                kind: drift::Kind::UnknownDomain as i32,
                vm: name.to_string(),
                detail: "a domain the grid does not place on this node".into(),
            });
        }
    }
    out
}

fn state_matches(desired: &str, actual: &str) -> bool {
    match desired {
        "running" => actual == "running",
        "stopped" => matches!(actual, "shutoff" | "shutdown" | "crashed"),
        "paused" => actual == "paused",
        _ => true,
    }
}

fn record(
    engine: &Engine,
    name: &str,
    result: Result<(NodeStatsReport, DiagnosticsReport), String>,
    config: &PollerConfig,
) -> Option<Pending<()>> {
    if let Ok((stats, _)) = &result {
        engine.record_usage(stats);
    }
    let outcome = engine.view().stage::<_, crate::ops::OpError>(|s| {
        let Some(mut node) = s.nodes.get(name).cloned() else { return Ok(((), vec![])) };
        let before = (node.state, node.state_reason.clone());
        let mut images_changed = false;
        let mut vm_changes = Vec::new();
        match &result {
            Ok((stats, diag)) => {
                let (state, reason) = nodes_health(diag);
                node.state = state as i32;
                node.state_reason = reason;
                node.missed_polls = 0;
                node.unreachable_since = None;
                node.last_seen = Some(now());
                node.checks = diag.checks.clone();
                node.agent_version = diag.agent_version.clone();
                node.live_migration = diag.live_migration;
                node.bases = diag.bases.clone();
                if node.images != diag.images || node.cached_images != diag.cached_images {
                    images_changed = true;
                    node.images = diag.images.clone();
                    node.cached_images = diag.cached_images.clone();
                }
                let n = stats.cpu_busy.len().max(1) as f64;
                node.cpu_load = stats.cpu_busy.iter().sum::<f64>() / n;
                node.memory_used_bytes = stats.memory.map_or(0, |m| m.used_bytes);
                node.pool_free_bytes = stats.filesystems.iter().find(|f| f.role == "pool").map_or(0, |f| f.free_bytes);
                node.drift = drift_of(s, name, stats);
                node.vms = s.vms_on(name).map(|v| v.name.clone()).collect();
                for vm in s.vms_on(name) {
                    let observed = stats.vms.iter().find(|d| d.name == vm.name).map(|d| d.state.clone()).unwrap_or_default();
                    let drift = node.drift.iter().find(|d| d.vm == vm.name).map(|d| d.detail.clone()).unwrap_or_default();
                    if vm.observed_state != observed || vm.drift != drift {
                        let mut v = vm.clone();
                        v.observed_state = observed;
                        v.drift = drift;
                        vm_changes.push(v);
                    }
                }
            }
            Err(e) => {
                node.missed_polls += 1;
                let t = now();
                let since = *node.unreachable_since.get_or_insert(t);
                let for_secs = u64::try_from(t.seconds - since.seconds).unwrap_or(0);
                if node.state() == NodeState::Lost {
                    // Stays LOST (its reason, stored once, says since when).
                } else if node.missed_polls >= config.unreachable_after && for_secs >= config.lost_after_secs {
                    node.state = NodeState::Lost as i32;
                    node.state_reason = format!("unreachable for {for_secs} s, missed {} polls: {e}", node.missed_polls);
                } else if node.missed_polls >= config.unreachable_after {
                    node.state = NodeState::Unreachable as i32;
                    node.state_reason = format!("missed {} polls: {e}", node.missed_polls);
                }
            }
        }
        // VM observations are kept in memory only, renewed by the next poll.
        for v in vm_changes {
            s.vms.insert(v.name.clone(), v);
        }
        if images_changed || before != (node.state, node.state_reason.clone()) {
            tracing::info!(node = %name, state = node.state().as_str_name(), reason = %node.state_reason, "node state");
            return Ok(((), vec![Change::PutNode(node)]));
        }
        s.nodes.insert(name.to_string(), node);
        if let Some(info) = s.nodes.get(name).map(|n| s.node_info(n)) {
            s.snapshot.upsert_node(info);
        }
        Ok(((), vec![]))
    });
    match outcome {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!(node = %name, "cannot record the poll: {e}");
            None
        }
    }
}
