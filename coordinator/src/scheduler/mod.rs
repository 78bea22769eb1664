//! Placement: which node takes a VM. A pure function of a [`Snapshot`] of the grid view and a [`Request`]:
//! filters ([`filter()`]) decide which nodes can take it, scores ([`score`]) which of those is best.
//!
//! [`place`] reads the snapshot's index and scans the whole grid only when the index finds nothing:
//! - a pinned node is checked alone;
//! - a request whose rarest selector pair or license is on few nodes reads exactly those nodes, so the choice
//!   among them is exact. "Few" is m nodes out of n schedulable with m² ≤ [`CANDIDATES`] · n: a walk would
//!   pass about n / m nodes per match and need [`CANDIDATES`] matches;
//! - otherwise, in every feasibility class the request admits (datacenter, arch, hypervisor kind), nodes are
//!   read in ascending free memory from the request's memory upward, and the first that pass every filter
//!   are scored: [`CANDIDATES`] in all, shared among the classes, at least the best fit of each (so a
//!   workload's preferred hypervisor kind is always among them). Nodes whose disk-job slots are all taken are
//!   scored but not counted, so the walk goes on to nodes that can start the job at once. A class none of whose nodes reaches the
//!   image, has a license or carries a selector label is skipped whole; otherwise a class is left after
//!   [`VISITS_PER_CLASS`] nodes that fit in memory but fail another filter. Best fit on memory is thereby exact among the nodes
//!   that pass the other filters early in their class; the cost is in that and in the other scores:
//!   a node with more free memory that holds the image in cache, or is less loaded, is not seen when enough
//!   tighter fits exist (`bench/schedule` measures what that costs in packing).
//! - With a spread group, the walk skips nodes that already hold members of the group; if no member-free
//!   node fits (every admitted class read to its end), the group's member index is read level by level
//!   (fewest members first) and the first level with a feasible node is scored in full. Spread is thus
//!   exact, at a cost of O(members of the group).
//!
//! When the walk yields no feasible node, the nodes with the request's rarest selector pair or license are
//! read in full; when that yields none and the walk left classes early, the classes are read to their ends
//! (one cheap filter check per node, no per-node reasons: nodes whose vCPUs or disk ran out before their
//! memory crowd the tight end of a class on a grid packed by best fit). When that yields none either, `place`
//! falls back to [`explain`]'s scan of every node (O(n), building every node's refusal), so whenever any node
//! could take the request, `place` finds one, and when none can, it says why, per node.

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

/// Nodes a walk reads in one class before leaving it. When no class yields a feasible node within this
/// many, `place` reads the nodes of the request's rarest label or license, then the classes to their ends,
/// then every node with its reasons (constraints that few nodes with room meet).
pub const VISITS_PER_CLASS: usize = 32;

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
    let chosen =
        explanation.chosen.as_ref().and_then(|name| explanation.nodes.iter().find(|v| v.name == *name));
    match chosen.map(|v| (v.name.clone(), v.verdict.clone())) {
        Some((node, Ok(scores))) => Ok(Placement { node, score: scores.total, scores, considered: s.len() }),
        _ => Err(unschedulable(s, r, explanation)),
    }
}

/// The same decision over every node, without the index: O(n). For comparison and checks.
pub fn place_exhaustive(s: &Snapshot, r: &Request) -> Result<Placement, Unschedulable> {
    let candidates: Vec<&NodeInfo> = s.nodes().filter(|n| filter::check(n, r).is_ok()).collect();
    match score::best(r, &candidates) {
        Some((node, scores)) => Ok(placement(node, scores, s.len())),
        None => Err(unschedulable(s, r, explain(s, r))),
    }
}

/// Every node's filter verdict or scores for `r` (a full scan, for `--dry-run` and `vm why`).
pub fn explain(s: &Snapshot, r: &Request) -> Explanation {
    let mut nodes: Vec<&NodeInfo> = s.nodes().collect();
    nodes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
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

/// The fast path: `None` when it found no feasible node (there may still be one; see [`VISITS_PER_CLASS`]).
pub(crate) fn place_indexed<'a>(s: &'a Snapshot, r: &Request) -> Option<Placement> {
    let mut considered = 0;
    let mut fits = |n: &NodeInfo| {
        considered += 1;
        filter::check(n, r).is_ok()
    };
    let mut candidates: Vec<&NodeInfo> = Vec::new();
    let rarest = s.rarest_attribute(r);
    let scan = |names: &BTreeSet<String>, fits: &mut dyn FnMut(&NodeInfo) -> bool| {
        names.iter().filter_map(|name| s.node(name)).filter(|n| fits(n)).collect::<Vec<_>>()
    };
    if let Some(pin) = &r.node {
        candidates.extend(s.node(pin).filter(|n| fits(n)));
    } else if let Some(names) = rarest.filter(|names| names.len().pow(2) <= CANDIDATES * s.schedulable()) {
        candidates = scan(names, &mut fits);
    } else {
        let group = r.spread_group.as_deref();
        let classes: Vec<_> = s.classes().iter().filter(|c| c.admits(r) && !c.is_empty()).collect();
        let per_class = CANDIDATES.div_ceil(classes.len().max(1));
        // Reads each class up to `limit` nodes; true when every class was read to its end (then no
        // member-free node fits anywhere).
        let walk = |limit: usize,
                    candidates: &mut Vec<&'a NodeInfo>,
                    fits: &mut dyn FnMut(&NodeInfo) -> bool| {
            let mut walked_all = true;
            for class in &classes {
                // Feasible nodes of this class with a free disk-job slot; those without one are scored too but
                // do not end the class's walk, so a burst does not queue on the tightest node while others idle.
                let mut found = 0;
                let fitting = class.fitting(r.resources.memory_mib).filter_map(|name| s.node(name));
                for (visits, n) in fitting.filter(|n| group.is_none_or(|g| n.group_count(g) == 0)).enumerate()
                {
                    if visits == limit {
                        walked_all = false;
                        break;
                    }
                    if fits(n) {
                        candidates.push(n);
                        found += usize::from(n.has_free_slot());
                        if found == per_class {
                            break;
                        }
                    }
                }
            }
            walked_all
        };
        let mut walked_all = walk(VISITS_PER_CLASS, &mut candidates, &mut fits);
        if let Some(names) = rarest
            && candidates.is_empty()
        {
            candidates = scan(names, &mut fits);
        }
        if candidates.is_empty() && !walked_all {
            // Many tight fits refused by another filter (nodes whose vCPUs or disk ran out before their memory):
            // read the classes to their ends, still without building any node's refusal.
            walked_all = walk(usize::MAX, &mut candidates, &mut fits);
        }
        if let Some(group) = group
            && candidates.is_empty()
            && walked_all
        {
            for level in s.group_levels(group) {
                candidates = scan(level, &mut fits);
                if !candidates.is_empty() {
                    break;
                }
            }
        }
    }
    let (node, scores) = score::best(r, &candidates)?;
    Some(placement(node, scores, considered))
}
