//! Enrollment and removal of nodes, and cordons.

use gridforge_proto::v1::{
    AddNodeRequest, DiagnosticsReport, DiagnosticsRequest, NodeStatsReport, NodeStatsRequest,
    RemoveNodeResponse, check,
};

use super::{Engine, OpError};
use crate::grid::{Change, Node, NodeState, Resources, now};

pub type NodeError = OpError;

const MIB: u64 = 1 << 20;

fn check_node_name(name: &str) -> Result<(), OpError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(OpError::Invalid(format!("invalid node name {name:?}: use letters, digits, '-', '_' and '.'")))
    }
}

/// The node's health from its diagnostics: NotReady with the failing checks named, else Ready.
pub fn health(diag: &DiagnosticsReport) -> (NodeState, String) {
    let failing: Vec<String> = diag
        .checks
        .iter()
        .filter(|c| c.status() == check::Status::Fail)
        .map(|c| format!("{}: {}", c.name, c.reason))
        .collect();
    if failing.is_empty() {
        (NodeState::Ready, String::new())
    } else {
        (NodeState::NotReady, failing.join("; "))
    }
}

/// Capacity from the agent's stats: cores, memory, pool file system size.
pub fn capacity(stats: &NodeStatsReport) -> Resources {
    Resources {
        vcpus: stats.cpu_busy.len() as u32,
        memory_mib: stats.memory.map_or(0, |m| m.total_bytes / MIB),
        disk_mib: stats.filesystems.iter().find(|f| f.role == "pool").map_or(0, |f| f.total_bytes / MIB),
    }
}

impl Engine {
    /// Dial the agent, check its identity, read what it is, and store the node.
    pub async fn add_node(&self, req: AddNodeRequest) -> Result<Node, OpError> {
        check_node_name(&req.name)?;
        if req.address.is_empty() {
            return Err(OpError::Invalid("address: required (host:port of the agent)".into()));
        }
        if req.dedicated == req.disk.is_empty() {
            return Err(OpError::Invalid(
                "a dedicated server needs its whole disk (--dedicated with --disk DEVICE), and only it"
                    .into(),
            ));
        }
        if self.view().read(|s| s.nodes.contains_key(&req.name)) {
            return Err(OpError::AlreadyExists(format!("node {:?} is already in the grid", req.name)));
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            OpError::Unavailable(format!("cannot reach the agent of {} at {}: {e}", req.name, req.address))
        };
        match self.agents().peer_name(&req.address).await.map_err(|e| unreachable(&e))? {
            Some(cn) if cn != req.name => {
                return Err(OpError::Precondition(format!(
                    "the agent at {} presents a certificate for {cn:?}, not {:?}: refusing to enroll it",
                    req.address, req.name
                )));
            }
            _ => {}
        }
        self.agents().forget(&req.address);
        let mut client = self.agents().client(&req.address).await.map_err(|e| unreachable(&e))?;
        let diag = client
            .diagnostics(DiagnosticsRequest {})
            .await
            .map_err(|e| unreachable(&super::status_text(&e)))?
            .into_inner();
        let stats = client
            .node_stats(NodeStatsRequest { sample_ms: 100 })
            .await
            .map_err(|e| unreachable(&super::status_text(&e)))?
            .into_inner();
        let (state, reason) = health(&diag);
        let t = now();
        let node = Node {
            name: req.name.clone(),
            address: req.address.clone(),
            datacenter: if req.datacenter.is_empty() { "default".into() } else { req.datacenter.clone() },
            labels: req.labels.clone(),
            state: state as i32,
            state_reason: reason,
            hypervisors: if diag.hypervisor_kind.is_empty() {
                vec![]
            } else {
                vec![diag.hypervisor_kind.clone()]
            },
            arch: diag.arch.clone(),
            images: diag.images.clone(),
            cached_images: diag.cached_images.clone(),
            bases: diag.bases.clone(),
            live_migration: diag.live_migration,
            dedicated: req.dedicated,
            disk: req.disk.clone(),
            capacity: Some(capacity(&stats)),
            overcommit_cpu: req.overcommit_cpu,
            overcommit_memory: req.overcommit_memory,
            agent_version: diag.agent_version.clone(),
            checks: diag.checks.clone(),
            last_seen: Some(t),
            created: Some(t),
            licenses: req.licenses.clone(),
            ..Default::default()
        };
        self.view()
            .update(|s| {
                if s.nodes.contains_key(&node.name) {
                    return Err(OpError::AlreadyExists(format!(
                        "node {:?} is already in the grid",
                        node.name
                    )));
                }
                Ok(((), vec![Change::PutNode(node.clone())]))
            })
            .await?;
        tracing::info!(node = %node.name, address = %node.address, "node enrolled");
        Ok(node)
    }

    pub async fn remove_node(&self, name: &str, force: bool) -> Result<RemoveNodeResponse, OpError> {
        let resp = self
            .view()
            .update(|s| {
                let node = super::known_node(s, name)?;
                let vms: Vec<String> = s.vms_on(name).map(|v| v.name.clone()).collect();
                if !vms.is_empty() && !force {
                    return Err(OpError::Precondition(format!(
                        "node {name} still holds {} VM(s): {}; delete them first, or --force to forget them",
                        vms.len(),
                        vms.join(", ")
                    )));
                }
                let mut changes: Vec<Change> = vms.iter().map(|v| Change::RemoveVm(v.clone())).collect();
                changes.push(Change::RemoveNode(name.to_string()));
                Ok((RemoveNodeResponse { node: Some(node), orphaned_vms: vms }, changes))
            })
            .await?;
        if let Some(n) = &resp.node {
            self.agents().forget(&n.address);
        }
        Ok(resp)
    }

    pub async fn set_cordon(&self, name: &str, cordoned: bool) -> Result<Node, OpError> {
        self.view()
            .update(|s| {
                let mut node = super::known_node(s, name)?;
                node.cordoned = cordoned;
                Ok((node.clone(), vec![Change::PutNode(node)]))
            })
            .await
    }
}
