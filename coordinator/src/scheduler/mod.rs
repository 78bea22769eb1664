//! Placement: which node takes a VM. A pure function of a [`Snapshot`] of the grid view and a [`Request`]:
//! filters ([`filter()`]) decide which nodes can take it, scores ([`score`]) which of those is best.
//!
//! [`place`] never scans the whole grid when it succeeds. It reads the snapshot's index:
//! - a pinned node is checked alone;
//! - a selector whose rarest label pair is on few nodes reads exactly those nodes, so the choice among them
//!   is exact. "Few" is m nodes out of n schedulable with m² ≤ [`CANDIDATES`] · n: a walk would pass about
//!   n / m nodes per match and need [`CANDIDATES`] matches;
//! - otherwise, in every feasibility class the request admits (datacenter, arch, hypervisor kind), nodes are
//!   read in ascending free memory from the request's memory upward, and the first that pass every filter
//!   are scored: [`CANDIDATES`] in all, shared among the classes, at least the best fit of each (so a
//!   workload's preferred hypervisor kind is always among them). Best fit on memory is thereby exact; the
//!   cost is in the other scores:
//!   a node with more free memory that holds the image in cache, or is less loaded, is not seen when enough
//!   tighter fits exist (`bench/schedule` measures what that costs in packing).
//! - With a spread group, the walk skips nodes that already hold members of the group; if no member-free
//!   node fits, the group's member index is read level by level (fewest members first) and the first level
//!   with a feasible node is scored in full. Spread is thus exact, at a cost of O(members of the group).
//!
//! A walk stops early only after finding feasible nodes, so whenever any node could take the request, `place`
//! finds one. When none can, it falls back to [`explain`]'s full scan (O(n)) to say why, per node.

mod applier;
mod filter;
mod model;
mod refusal;
pub mod score;
mod snapshot;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

pub use applier::{ApplierHandle, ApplyError, Reply, Reservation, ReservationSink, spawn_applier};
pub use filter::filter;
pub use model::{NodeInfo, NodeState, Request, Resources, Workload};
pub use refusal::{Refusal, Unschedulable};
pub use score::Scores;
pub use snapshot::Snapshot;

/// Feasible nodes scored per decision when the index is walked, shared among the feasibility classes the
/// request admits, at least one per class (its best fit).
pub const CANDIDATES: usize = 16;

/// A decision: the chosen node, its scores, and how many nodes were looked at to make it.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub node: String,
    pub score: f64,
    pub scores: Scores,
    pub considered: usize,
}

/// Every node's verdict on a request, in name order, and the node a full scan would choose.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub chosen: Option<String>,
    pub nodes: Vec<NodeVerdict>,
}

#[derive(Debug, Clone)]
pub struct NodeVerdict {
    pub name: String,
    pub verdict: Result<Scores, Refusal>,
}

/// `{"node": .., "scores": {..}}` or `{"node": .., "reason": "<text>", "refusal": {..}}`.
impl Serialize for NodeVerdict {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.verdict {
            Ok(scores) => {
                let mut st = s.serialize_struct("NodeVerdict", 2)?;
                st.serialize_field("node", &self.name)?;
                st.serialize_field("scores", scores)?;
                st.end()
            }
            Err(refusal) => refusal::NodeRefusal(&self.name, refusal).serialize(s),
        }
    }
}

/// Chooses a node for `r` through the snapshot's index (see the module documentation), or says per node why
/// none can take it.
pub fn place(s: &Snapshot, r: &Request) -> Result<Placement, Unschedulable> {
    if let Some(placement) = place_indexed(s, r) {
        return Ok(placement);
    }
    let explanation = explain(s, r);
    debug_assert!(explanation.chosen.is_none(), "the index missed a feasible node for {}", r.vm);
    match explanation.chosen.clone() {
        // Only if the index and the nodes disagree; the full scan is the truth.
        Some(node) => place_exhaustive(s, r).map(|p| Placement { node, ..p }),
        None => Err(unschedulable(s, r, explanation)),
    }
}

/// The same decision over every node, without the index: O(n). For comparison and checks, not for serving.
pub fn place_exhaustive(s: &Snapshot, r: &Request) -> Result<Placement, Unschedulable> {
    let candidates: Vec<&NodeInfo> = s.nodes().filter(|n| filter(n, r).is_ok()).collect();
    match score::best(r, &candidates) {
        Some((node, scores)) => Ok(placement(node, scores, s.len())),
        None => Err(unschedulable(s, r, explain(s, r))),
    }
}

/// Every node's filter verdict or scores for `r` (a full scan, for `--dry-run` and `vm why`).
pub fn explain(s: &Snapshot, r: &Request) -> Explanation {
    let mut nodes: Vec<&NodeInfo> = s.nodes().collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let verdicts: Vec<(&NodeInfo, Result<(), Refusal>)> =
        nodes.into_iter().map(|n| (n, filter(n, r))).collect();
    let feasible: Vec<&NodeInfo> = verdicts.iter().filter(|(_, v)| v.is_ok()).map(|(n, _)| *n).collect();
    let min_spread = score::min_spread(r, &feasible);
    let chosen = score::best(r, &feasible).map(|(n, _)| n.name.clone());
    let nodes = verdicts
        .into_iter()
        .map(|(n, v)| NodeVerdict {
            name: n.name.clone(),
            verdict: v.map(|()| score::score(n, r, min_spread)),
        })
        .collect();
    Explanation { chosen, nodes }
}

fn placement(node: &NodeInfo, scores: Scores, considered: usize) -> Placement {
    Placement { node: node.name.clone(), score: scores.total, scores, considered }
}

fn unschedulable(s: &Snapshot, r: &Request, explanation: Explanation) -> Unschedulable {
    let reasons =
        explanation.nodes.into_iter().filter_map(|v| v.verdict.err().map(|why| (v.name, why))).collect();
    Unschedulable { nodes_total: s.len(), reasons, pinned: r.node.clone() }
}

static NO_NODES: BTreeSet<String> = BTreeSet::new();

/// The fast path: `None` when no node passes the filters.
fn place_indexed(s: &Snapshot, r: &Request) -> Option<Placement> {
    let mut considered = 0;
    let mut fits = |n: &NodeInfo| {
        considered += 1;
        filter(n, r).is_ok()
    };
    let mut candidates: Vec<&NodeInfo> = Vec::new();
    let rarest_label =
        r.selector.iter().map(|(k, v)| s.labelled(k, v).unwrap_or(&NO_NODES)).min_by_key(|names| names.len());
    if let Some(pin) = &r.node {
        candidates.extend(s.node(pin).filter(|n| fits(n)));
    } else if let Some(names) =
        rarest_label.filter(|names| names.len().pow(2) <= CANDIDATES * s.schedulable())
    {
        candidates.extend(names.iter().filter_map(|name| s.node(name)).filter(|n| fits(n)));
    } else {
        let group = r.spread_group.as_deref();
        let classes: Vec<_> = s.classes().iter().filter(|c| c.admits(r)).collect();
        let per_class = CANDIDATES.div_ceil(classes.len().max(1));
        for class in classes {
            let found = candidates.len();
            for n in class.fitting(r.resources.memory_mib).filter_map(|name| s.node(name)) {
                if group.is_none_or(|g| n.group_count(g) == 0) && fits(n) {
                    candidates.push(n);
                    if candidates.len() - found == per_class {
                        break;
                    }
                }
            }
        }
        if let Some(group) = group
            && candidates.is_empty()
        {
            for level in s.group_levels(group) {
                candidates.extend(level.iter().filter_map(|name| s.node(name)).filter(|n| fits(n)));
                if !candidates.is_empty() {
                    break;
                }
            }
        }
    }
    let (node, scores) = score::best(r, &candidates)?;
    Some(placement(node, scores, considered))
}
