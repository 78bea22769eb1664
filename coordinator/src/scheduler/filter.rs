//! The hard constraints, one per refusal, run in a fixed order so a node's reason is the first one it fails.

use super::model::{NodeInfo, NodeState, Request};
use super::refusal::Refusal;

/// Whether `node` can take `r`: `Err` names the first filter it fails. Order: state, cordon, exclusion,
/// datacenter, pinned node, selector labels, hypervisor kind, arch, free vCPUs and memory after overcommit,
/// free pool disk, image reachable, licenses.
pub fn filter(node: &NodeInfo, r: &Request) -> Result<(), Refusal> {
    check(node, r).map_err(|failed| refusal(failed, node, r))
}

/// Which filter failed, without the details: what a search needs, at no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failed {
    NotReady,
    Unreachable,
    Cordoned,
    Dedicated,
    Excluded,
    Datacenter,
    NotPinned,
    Selector,
    Hypervisor,
    Arch,
    Cpu,
    Memory,
    Disk,
    Image,
    Licenses,
}

/// The filters themselves, in order.
pub(super) fn check(node: &NodeInfo, r: &Request) -> Result<(), Failed> {
    let fail = |failed: bool, why: Failed| if failed { Err(why) } else { Ok(()) };
    fail(node.state == NodeState::NotReady, Failed::NotReady)?;
    fail(node.state == NodeState::Unreachable, Failed::Unreachable)?;
    fail(node.cordoned, Failed::Cordoned)?;
    fail(node.dedicated, Failed::Dedicated)?;
    fail(r.exclude.contains(&node.name), Failed::Excluded)?;
    fail(r.datacenter.as_ref().is_some_and(|dc| *dc != node.datacenter), Failed::Datacenter)?;
    fail(r.node.as_ref().is_some_and(|pin| *pin != node.name), Failed::NotPinned)?;
    fail(unmatched_label(node, r).is_some(), Failed::Selector)?;
    fail(r.hypervisor.as_ref().is_some_and(|kind| !node.hypervisors.contains(kind)), Failed::Hypervisor)?;
    fail(r.arch.as_ref().is_some_and(|arch| *arch != node.arch), Failed::Arch)?;
    let (free, need) = (node.free(), r.resources);
    fail(need.vcpus > free.vcpus, Failed::Cpu)?;
    fail(need.memory_mib > free.memory_mib, Failed::Memory)?;
    fail(need.disk_mib > free.disk_mib, Failed::Disk)?;
    fail(unreachable_image(node, r).is_some(), Failed::Image)?;
    fail(!r.licenses.is_subset(&node.licenses), Failed::Licenses)
}

/// The first image of the request the node does not reach.
fn unreachable_image<'a>(node: &NodeInfo, r: &'a Request) -> Option<&'a String> {
    r.needed_images().find(|i| !node.images.contains(*i))
}

/// The first selector pair the node's labels do not match.
fn unmatched_label<'a>(node: &NodeInfo, r: &'a Request) -> Option<(&'a String, &'a String)> {
    r.selector.iter().find(|(key, want)| node.labels.get(*key) != Some(*want))
}

/// The details of a failed filter, for people.
fn refusal(failed: Failed, node: &NodeInfo, r: &Request) -> Refusal {
    let want = |v: &Option<String>| v.clone().unwrap_or_default();
    let (free, need) = (node.free(), r.resources);
    match failed {
        Failed::NotReady => Refusal::NotReady,
        Failed::Unreachable => Refusal::Unreachable,
        Failed::Cordoned => Refusal::Cordoned,
        Failed::Dedicated => Refusal::Dedicated,
        Failed::Excluded => Refusal::Excluded,
        Failed::Datacenter => {
            Refusal::Datacenter { want: want(&r.datacenter), have: node.datacenter.clone() }
        }
        Failed::NotPinned => Refusal::NotPinned { want: want(&r.node) },
        Failed::Selector => {
            static NONE: String = String::new();
            let (key, value) = unmatched_label(node, r).unwrap_or((&NONE, &NONE));
            Refusal::Selector { key: key.clone(), want: value.clone(), have: node.labels.get(key).cloned() }
        }
        Failed::Hypervisor => {
            Refusal::Hypervisor { want: want(&r.hypervisor), have: node.hypervisors.clone() }
        }
        Failed::Arch => Refusal::Arch { want: want(&r.arch), have: node.arch.clone() },
        Failed::Cpu => Refusal::Cpu { need: need.vcpus, free: free.vcpus },
        Failed::Memory => Refusal::Memory { need: need.memory_mib, free: free.memory_mib },
        Failed::Disk => Refusal::Disk { need: need.disk_mib, free: free.disk_mib },
        Failed::Image => Refusal::Image { image: unreachable_image(node, r).cloned().unwrap_or_default() },
        Failed::Licenses => {
            Refusal::Licenses { missing: r.licenses.difference(&node.licenses).cloned().collect() }
        }
    }
}
