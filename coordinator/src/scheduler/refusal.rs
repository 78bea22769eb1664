//! Why a node cannot take a request, per node and summed up over the grid.

use std::collections::BTreeSet;
use std::fmt;

use serde::Serialize;
use serde::ser::{SerializeSeq, SerializeStruct, Serializer};

/// The first filter a node fails, in the order the filters run (see [`super::filter`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "filter", rename_all = "snake_case")]
pub enum Refusal {
    NotReady,
    Unreachable,
    Cordoned,
    Dedicated,
    Excluded,
    Datacenter { want: String, have: String },
    NotPinned { want: String },
    Selector { key: String, want: String, have: Option<String> },
    Hypervisor { want: String, have: Vec<String> },
    Arch { want: String, have: String },
    Cpu { need: u32, free: u32 },
    Memory { need: u64, free: u64 },
    Disk { need: u64, free: u64 },
    Image { image: String },
    Licenses { missing: BTreeSet<String> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotReady => f.write_str("not ready"),
            Refusal::Unreachable => f.write_str("unreachable"),
            Refusal::Cordoned => f.write_str("cordoned"),
            Refusal::Dedicated => f.write_str("a dedicated server"),
            Refusal::Excluded => f.write_str("excluded by the request"),
            Refusal::Datacenter { want, have } => write!(f, "in datacenter {have}, not {want}"),
            Refusal::NotPinned { want } => write!(f, "not the requested node {want}"),
            Refusal::Selector { key, want, have: Some(have) } => write!(f, "label {key}={have}, not {want}"),
            Refusal::Selector { key, want, have: None } => write!(f, "no label {key} (want {key}={want})"),
            Refusal::Hypervisor { want, have } => write!(f, "no {want} hypervisor (has {})", list(have)),
            Refusal::Arch { want, have } => write!(f, "arch {have}, not {want}"),
            Refusal::Cpu { need, free } => write!(f, "insufficient vCPUs (need {need}, free {free})"),
            Refusal::Memory { need, free } => write!(f, "insufficient memory (need {need} MiB, free {free})"),
            Refusal::Disk { need, free } => write!(f, "insufficient disk (need {need} MiB, free {free})"),
            Refusal::Image { image } => write!(f, "image {image} not reachable"),
            Refusal::Licenses { missing } => write!(f, "missing licenses {}", list(missing)),
        }
    }
}

fn list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<&str> = items.into_iter().map(String::as_str).collect();
    if items.is_empty() { "none".to_owned() } else { items.join(", ") }
}

impl Refusal {
    /// The refusal as one line of the grid-wide summary: the part every node refused the same way shares
    /// (the request's side), and for resources the node's free amount, of which the summary shows the largest.
    fn summary_part(&self) -> (String, Option<u64>) {
        match self {
            Refusal::Datacenter { want, .. } => (format!("not in datacenter {want}"), None),
            Refusal::Selector { key, want, .. } => (format!("without label {key}={want}"), None),
            Refusal::Hypervisor { want, .. } => (format!("without a {want} hypervisor"), None),
            Refusal::Arch { want, .. } => (format!("not {want}"), None),
            Refusal::Cpu { need, free } => {
                (format!("insufficient vCPUs (need {need}"), Some(u64::from(*free)))
            }
            Refusal::Memory { need, free } => (format!("insufficient memory (need {need} MiB"), Some(*free)),
            Refusal::Disk { need, free } => (format!("insufficient disk (need {need} MiB"), Some(*free)),
            Refusal::NotPinned { .. } => ("not the requested node".to_owned(), None),
            other => (other.to_string(), None),
        }
    }
}

/// No node can take the request. `Display` is the one-line summary an operator sees, e.g.
/// "3 nodes: 2 insufficient memory (need 4096 MiB, max free 2048), 1 cordoned"; `reasons` has every node.
#[derive(Debug, Clone, Serialize)]
pub struct Unschedulable {
    pub nodes_total: usize,
    #[serde(serialize_with = "serialize_reasons")]
    pub reasons: Vec<(String, Refusal)>,
    /// The request's pinned node, whose own refusal the summary leads with.
    pub pinned: Option<String>,
}

impl std::error::Error for Unschedulable {}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(pin) = &self.pinned {
            match self.reasons.iter().find(|(node, _)| node == pin) {
                Some((_, why)) => write!(f, "requested node {pin}: {why}; ")?,
                None => write!(f, "requested node {pin} is not in the grid; ")?,
            }
        }
        if self.nodes_total == 0 {
            return f.write_str("no nodes in the grid");
        }
        // (summary line, nodes, largest free amount), in order of first appearance, then by count.
        let mut tallies: Vec<(String, usize, Option<u64>)> = Vec::new();
        for (_, refusal) in &self.reasons {
            let (line, free) = refusal.summary_part();
            match tallies.iter_mut().find(|(l, ..)| *l == line) {
                Some((_, count, max)) => {
                    *count += 1;
                    *max = (*max).max(free);
                }
                None => tallies.push((line, 1, free)),
            }
        }
        tallies.sort_by_key(|t| std::cmp::Reverse(t.1));
        let plural = if self.nodes_total == 1 { "" } else { "s" };
        write!(f, "{} node{plural}: ", self.nodes_total)?;
        for (i, (line, count, max_free)) in tallies.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match max_free {
                Some(max) => write!(f, "{sep}{count} {line}, max free {max})")?,
                None => write!(f, "{sep}{count} {line}")?,
            }
        }
        Ok(())
    }
}

/// One node's refusal as JSON: `{"node": .., "reason": "<text>", "refusal": {"filter": .., ..}}`.
pub(super) struct NodeRefusal<'a>(pub &'a str, pub &'a Refusal);

impl Serialize for NodeRefusal<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("NodeRefusal", 3)?;
        st.serialize_field("node", self.0)?;
        st.serialize_field("reason", &self.1.to_string())?;
        st.serialize_field("refusal", self.1)?;
        st.end()
    }
}

fn serialize_reasons<S: Serializer>(reasons: &[(String, Refusal)], s: S) -> Result<S::Ok, S::Error> {
    let mut seq = s.serialize_seq(Some(reasons.len()))?;
    for (node, refusal) in reasons {
        seq.serialize_element(&NodeRefusal(node, refusal))?;
    }
    seq.end()
}
