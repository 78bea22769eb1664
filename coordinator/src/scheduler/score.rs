//! The soft preferences among the nodes that pass every filter: a weighted sum of components, each in 0..=1.
//!
//! | component  | weight | 1.0 means                                                   |
//! |------------|--------|-------------------------------------------------------------|
//! | `spread`   | 6.0    | as few of the request's spread group here as anywhere       |
//! | `slot`     | 1.0    | a disk-job slot is free on the node (the create starts now) |
//! | `fit`      | 1.0    | the VM takes all the free memory left (best fit)            |
//! | `workload` | 0.5    | the node runs a hypervisor kind the workload class prefers |
//! | `image`    | 0.3    | the image is already in the node's cache                    |
//! | `cpu`      | 0.05   | the node's observed CPU is idle (a tie-break)              |
//!
//! `spread` is `1 / (1 + count - min)`, where `count` is the group's VMs on the node and `min` the fewest on any
//! feasible node: a node at the minimum scores 6.0, one VM more scores 3.0 less, more than all other components
//! together (2.85 at most), so spread always wins over best fit when a group is given. Without a group, and for
//! a request without a workload class, those components are 0 on every node.
//!
//! `slot` is 1 while the node's unfinished disk-heavy operations are fewer than its disk-job slots. Best fit
//! alone would send a burst of creates to the one tightest node, to wait there behind its slots while nodes
//! that fit almost as well idle; with `slot`, a node with a free slot beats any fit on a node without one, and
//! among nodes alike in that, best fit decides. When no operation runs every node has a free slot, and
//! placement is pure best fit.
//!
//! `fit` is `need / free` on memory: a 90 MiB VM scores 0.9 on a node with 100 MiB free and 0.18 on one with
//! 512 MiB. Equal totals go to the node whose name sorts first, so a decision is deterministic.

use serde::Serialize;

use super::model::{NodeInfo, Request};

pub const WEIGHT_SPREAD: f64 = 6.0;
pub const WEIGHT_SLOT: f64 = 1.0;
pub const WEIGHT_FIT: f64 = 1.0;
pub const WEIGHT_WORKLOAD: f64 = 0.5;
pub const WEIGHT_IMAGE: f64 = 0.3;
pub const WEIGHT_CPU: f64 = 0.05;

/// Each component (0..=1, before weighting) and the weighted total.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scores {
    pub spread: f64,
    pub slot: f64,
    pub fit: f64,
    pub workload: f64,
    pub image: f64,
    pub cpu: f64,
    pub total: f64,
}

/// Scores `node` for `r`; `min_spread` is the fewest VMs of the request's spread group on any candidate.
pub(super) fn score(node: &NodeInfo, r: &Request, min_spread: u32) -> Scores {
    let spread = match &r.spread_group {
        Some(group) => 1.0 / f64::from(1 + node.group_count(group).saturating_sub(min_spread)),
        None => 0.0,
    };
    let slot = if node.has_free_slot() { 1.0 } else { 0.0 };
    let free = node.free().memory_mib;
    let fit = if free == 0 { 1.0 } else { (r.resources.memory_mib as f64 / free as f64).min(1.0) };
    let preferred = r.workload.map(|w| w.preferred_hypervisors()).unwrap_or_default();
    let runs_preferred = match &r.hypervisor {
        Some(kind) => preferred.contains(&kind.as_str()),
        None => node.hypervisors.iter().any(|kind| preferred.contains(&kind.as_str())),
    };
    let workload = if runs_preferred { 1.0 } else { 0.0 };
    let image = if node.cached_images.contains(&r.image) { 1.0 } else { 0.0 };
    let cpu = 1.0 - node.cpu_load.clamp(0.0, 1.0);
    let total = WEIGHT_SPREAD * spread
        + WEIGHT_SLOT * slot
        + WEIGHT_FIT * fit
        + WEIGHT_WORKLOAD * workload
        + WEIGHT_IMAGE * image
        + WEIGHT_CPU * cpu;
    Scores { spread, slot, fit, workload, image, cpu, total }
}

/// The best of `candidates` (all feasible for `r`) with its scores: highest total, then the first name.
pub(super) fn best<'a>(r: &Request, candidates: &[&'a NodeInfo]) -> Option<(&'a NodeInfo, Scores)> {
    let min_spread = min_spread(r, candidates);
    let mut best: Option<(&NodeInfo, Scores)> = None;
    for &node in candidates {
        let scores = score(node, r, min_spread);
        let better = match &best {
            None => true,
            Some((b, bs)) => scores.total > bs.total || (scores.total == bs.total && node.name < b.name),
        };
        if better {
            best = Some((node, scores));
        }
    }
    best
}

/// The fewest VMs of the request's spread group on any of `candidates` (0 without a group).
pub(super) fn min_spread(r: &Request, candidates: &[&NodeInfo]) -> u32 {
    match &r.spread_group {
        Some(group) => candidates.iter().map(|n| n.group_count(group)).min().unwrap_or(0),
        None => 0,
    }
}
