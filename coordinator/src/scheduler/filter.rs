//! The hard constraints, one per refusal, run in a fixed order so a node's reason is the first one it fails.

use super::model::{NodeInfo, NodeState, Request};
use super::refusal::Refusal;

/// Whether `node` can take `r`: `Err` names the first filter it fails. Order: state, cordon, exclusion,
/// datacenter, pinned node, selector labels, hypervisor kind, arch, free vCPUs and memory after overcommit,
/// free pool disk, image reachable, licenses.
pub fn filter(node: &NodeInfo, r: &Request) -> Result<(), Refusal> {
    match node.state {
        NodeState::Ready => {}
        NodeState::NotReady => return Err(Refusal::NotReady),
        NodeState::Unreachable => return Err(Refusal::Unreachable),
    }
    if node.cordoned {
        return Err(Refusal::Cordoned);
    }
    if r.exclude.contains(&node.name) {
        return Err(Refusal::Excluded);
    }
    if let Some(want) = &r.datacenter
        && *want != node.datacenter
    {
        return Err(Refusal::Datacenter { want: want.clone(), have: node.datacenter.clone() });
    }
    if let Some(want) = &r.node
        && *want != node.name
    {
        return Err(Refusal::NotPinned { want: want.clone() });
    }
    for (key, want) in &r.selector {
        let have = node.labels.get(key);
        if have != Some(want) {
            return Err(Refusal::Selector { key: key.clone(), want: want.clone(), have: have.cloned() });
        }
    }
    if let Some(want) = &r.hypervisor
        && !node.hypervisors.contains(want)
    {
        return Err(Refusal::Hypervisor { want: want.clone(), have: node.hypervisors.clone() });
    }
    if let Some(want) = &r.arch
        && *want != node.arch
    {
        return Err(Refusal::Arch { want: want.clone(), have: node.arch.clone() });
    }
    let free = node.free();
    let need = r.resources;
    if need.vcpus > free.vcpus {
        return Err(Refusal::Cpu { need: need.vcpus, free: free.vcpus });
    }
    if need.memory_mib > free.memory_mib {
        return Err(Refusal::Memory { need: need.memory_mib, free: free.memory_mib });
    }
    if need.disk_mib > free.disk_mib {
        return Err(Refusal::Disk { need: need.disk_mib, free: free.disk_mib });
    }
    if !r.image.is_empty() && !node.images.contains(&r.image) {
        return Err(Refusal::Image { image: r.image.clone() });
    }
    if !r.licenses.is_subset(&node.licenses) {
        let missing = r.licenses.difference(&node.licenses).cloned().collect();
        return Err(Refusal::Licenses { missing });
    }
    Ok(())
}
