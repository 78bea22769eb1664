//! Dedicated (bare-metal) servers beside VMs. A node enrolled with `--dedicated --disk DEVICE` is never a
//! VM host (the scheduler skips it); `vm create --dedicated` takes a free one whole for one tenant:
//!
//! - create: PROVISION (the agent on the server, e.g. booted from a deploy ramdisk, writes the spec to the
//!   whole disk, a device target; no domain), then POWER-BOOT (the power actuator boots it from that disk);
//! - delete: WIPE (the agent wipes the whole disk, with a signed report), then POWER-OFF.
//!
//! The power actuator is `[power] command`, with `{node}`, `{address}` and `{action}` ("boot", "off")
//! replaced; without one, dedicated servers are refused.

use std::time::Duration;

use gridforge_proto::v1::PlacementConstraints;

use super::{Engine, OpError};
use crate::grid::{GridState, NodeState, OpState, VmState};

pub(super) const POWER_BOOT_STEP: &str = "power-boot";
pub(super) const POWER_OFF_STEP: &str = "power-off";
pub(super) const WIPE_STEP: &str = "wipe";
const DEFAULT_POWER_TIMEOUT_SECS: u64 = 60;

/// The actuator's `{action}` of a power step.
pub(super) fn power_action(step: &str) -> Option<&'static str> {
    match step {
        POWER_BOOT_STEP => Some("boot"),
        POWER_OFF_STEP => Some("off"),
        _ => None,
    }
}

/// A free dedicated server for `p` (its datacenter and node, if set): (node, its disk). Refused with every
/// dedicated node's reason when none is free.
pub(super) fn place(s: &GridState, p: &PlacementConstraints) -> Result<(String, String), OpError> {
    let mut reasons = Vec::new();
    for n in s.nodes.values().filter(|n| n.dedicated) {
        let in_use = s.vms_on(&n.name).find(|v| v.state() != VmState::Deleted);
        let why = if !p.node.is_empty() && p.node != n.name {
            continue;
        } else if !p.datacenter.is_empty() && p.datacenter != n.datacenter {
            format!("in datacenter {}", n.datacenter)
        } else if n.state() != NodeState::Ready {
            n.state().as_str_name().to_ascii_lowercase()
        } else if n.cordoned {
            "cordoned".into()
        } else if let Some(v) = in_use {
            format!("taken by {}", v.name)
        } else {
            return Ok((n.name.clone(), n.disk.clone()));
        };
        reasons.push(format!("{} {why}", n.name));
    }
    Err(OpError::Unschedulable(if reasons.is_empty() {
        "no dedicated server in the grid (gridctl node add NAME --dedicated --disk DEVICE)".into()
    } else {
        format!("no free dedicated server: {}", reasons.join(", "))
    }))
}

impl Engine {
    /// Whether dedicated servers can be powered: Err naming the missing setting.
    pub(super) fn check_power(&self) -> Result<(), OpError> {
        if self.inner.config.power.command.is_empty() {
            return Err(OpError::Precondition(
                "dedicated servers need a power actuator: set [power] command in the coordinator's config"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Runs power step `index` of operation `id` through the actuator; its output becomes the step's note.
    pub(super) async fn power_step(&self, id: &str, index: usize, action: &str) -> Result<(), String> {
        let (node, address) = self
            .view()
            .read(|s| {
                let op = s.ops.get(id)?;
                let node = if op.steps[index].node.is_empty() { &op.node } else { &op.steps[index].node };
                s.nodes.get(node).map(|n| (n.name.clone(), n.address.clone()))
            })
            .ok_or_else(|| format!("operation {id}: its node was removed from the grid"))?;
        let power = &self.inner.config.power;
        let argv: Vec<String> = power
            .command
            .iter()
            .map(|a| a.replace("{node}", &node).replace("{address}", &address).replace("{action}", action))
            .collect();
        if argv.is_empty() {
            return Err("no power actuator ([power] command)".into());
        }
        self.update_op(id, |op| {
            let s = &mut op.steps[index];
            s.state = OpState::Running as i32;
            s.message = format!("running {}", argv.join(" "));
        })
        .await;
        let timeout = Duration::from_secs(if power.timeout_secs == 0 {
            DEFAULT_POWER_TIMEOUT_SECS
        } else {
            power.timeout_secs
        });
        let note = super::fence::run_actuator("power actuator", &argv, timeout)
            .await
            .map_err(|e| format!("node {node}: power {action}: {e}"))?;
        self.update_op(id, |op| {
            let s = &mut op.steps[index];
            s.state = OpState::Succeeded as i32;
            s.message = format!("{} exited 0{note}", argv[0]);
        })
        .await;
        Ok(())
    }
}
