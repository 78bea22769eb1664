//! The scheduler's view of the grid and the index that lets a decision look at a few nodes, not all.
//!
//! Only schedulable nodes (Ready, not cordoned) are indexed, three ways:
//! - by feasibility class — nodes with the same datacenter, arch and hypervisor kinds — and within a class by
//!   free memory after overcommit, so best fit is a range query from the request's memory upward;
//! - by label (key, value) and by license, so a constraint few nodes meet is answered by reading just those;
//! - by spread group and member count, so the nodes holding the fewest of a group are found without a scan.
//!
//! Every change is O(log n) per index entry the node has (its labels and groups).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use super::model::{NodeInfo, Request, Resources};

#[derive(Debug, Clone)]
pub struct Snapshot {
    nodes: HashMap<String, NodeInfo>,
    index: Index,
}

#[derive(Debug, Clone, Default)]
struct Index {
    classes: Vec<Class>,
    /// label key -> value -> nodes.
    labels: HashMap<String, Postings>,
    /// license -> nodes.
    licenses: Postings,
    /// spread group -> member count (> 0) -> nodes.
    groups: HashMap<String, BTreeMap<u32, BTreeSet<String>>>,
}

/// Nodes that the datacenter, arch and hypervisor filters treat alike.
#[derive(Debug, Clone)]
pub(super) struct Class {
    datacenter: String,
    arch: String,
    hypervisors: Vec<String>,
    /// (free memory MiB after overcommit, node name).
    by_free_memory: BTreeSet<(u64, String)>,
    /// How many of the class's nodes reach each image, have each license, carry each label: a request that
    /// needs what no node here has skips the class without reading a node.
    images: Counts,
    licenses: Counts,
    labels: HashMap<String, Counts>,
}

#[derive(Debug, Clone, Default)]
struct Counts(HashMap<String, usize>);

impl Counts {
    fn add(&mut self, value: &str) {
        *self.0.entry(value.to_owned()).or_default() += 1;
    }

    fn remove(&mut self, value: &str) {
        if let Some(count) = self.0.get_mut(value) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(value);
            }
        }
    }

    fn has(&self, value: &str) -> bool {
        self.0.contains_key(value)
    }
}

impl Class {
    fn new(n: &NodeInfo) -> Class {
        Class {
            datacenter: n.datacenter.clone(),
            arch: n.arch.clone(),
            hypervisors: n.hypervisors.clone(),
            by_free_memory: BTreeSet::new(),
            images: Counts::default(),
            licenses: Counts::default(),
            labels: HashMap::new(),
        }
    }

    fn holds(&self, n: &NodeInfo) -> bool {
        self.datacenter == n.datacenter && self.arch == n.arch && self.hypervisors == n.hypervisors
    }

    fn insert(&mut self, n: &NodeInfo) {
        self.by_free_memory.insert((n.free().memory_mib, n.name.clone()));
        n.images.iter().for_each(|image| self.images.add(image));
        n.licenses.iter().for_each(|license| self.licenses.add(license));
        for (key, value) in &n.labels {
            self.labels.entry(key.clone()).or_default().add(value);
        }
    }

    fn remove(&mut self, n: &NodeInfo) {
        self.by_free_memory.remove(&(n.free().memory_mib, n.name.clone()));
        n.images.iter().for_each(|image| self.images.remove(image));
        n.licenses.iter().for_each(|license| self.licenses.remove(license));
        for (key, value) in &n.labels {
            if let Some(values) = self.labels.get_mut(key) {
                values.remove(value);
            }
        }
    }

    /// Whether some node of the class may take the request: the datacenter, arch and hypervisor kind match,
    /// and the image, each license and each selector label are on at least one node.
    pub(super) fn admits(&self, r: &Request) -> bool {
        r.datacenter.as_ref().is_none_or(|dc| *dc == self.datacenter)
            && r.arch.as_ref().is_none_or(|arch| *arch == self.arch)
            && r.hypervisor.as_ref().is_none_or(|kind| self.hypervisors.contains(kind))
            && r.needed_images().all(|i| self.images.has(i))
            && r.licenses.iter().all(|license| self.licenses.has(license))
            && r.selector
                .iter()
                .all(|(key, value)| self.labels.get(key).is_some_and(|values| values.has(value)))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_free_memory.is_empty()
    }

    /// Node names in ascending free memory, starting at the first with at least `memory_mib` free.
    pub(super) fn fitting(&self, memory_mib: u64) -> impl Iterator<Item = &str> {
        self.by_free_memory
            .range((Bound::Included((memory_mib, String::new())), Bound::Unbounded))
            .map(|(_, name)| name.as_str())
    }
}

static NO_NODES: BTreeSet<String> = BTreeSet::new();

/// Attribute value -> the schedulable nodes that have it.
#[derive(Debug, Clone, Default)]
struct Postings(HashMap<String, BTreeSet<String>>);

impl Postings {
    fn add(&mut self, value: &str, name: &str) {
        self.0.entry(value.to_owned()).or_default().insert(name.to_owned());
    }

    fn remove(&mut self, value: &str, name: &str) {
        if let Some(names) = self.0.get_mut(value) {
            names.remove(name);
            if names.is_empty() {
                self.0.remove(value);
            }
        }
    }

    fn get(&self, value: &str) -> &BTreeSet<String> {
        self.0.get(value).unwrap_or(&NO_NODES)
    }
}

impl Index {
    fn insert(&mut self, n: &NodeInfo) {
        if !n.schedulable() {
            return;
        }
        match self.classes.iter_mut().find(|c| c.holds(n)) {
            Some(class) => class.insert(n),
            None => {
                let mut class = Class::new(n);
                class.insert(n);
                self.classes.push(class);
            }
        }
        for (key, value) in &n.labels {
            self.labels.entry(key.clone()).or_default().add(value, &n.name);
        }
        for license in &n.licenses {
            self.licenses.add(license, &n.name);
        }
        for (group, &count) in n.groups.iter().filter(|(_, c)| **c > 0) {
            let levels = self.groups.entry(group.clone()).or_default();
            levels.entry(count).or_default().insert(n.name.clone());
        }
    }

    /// Removes what `insert(n)` added; `n` must be unchanged since.
    fn remove(&mut self, n: &NodeInfo) {
        if !n.schedulable() {
            return;
        }
        if let Some(class) = self.classes.iter_mut().find(|c| c.holds(n)) {
            class.remove(n);
        }
        for (key, value) in &n.labels {
            if let Some(values) = self.labels.get_mut(key) {
                values.remove(value, &n.name);
            }
        }
        for license in &n.licenses {
            self.licenses.remove(license, &n.name);
        }
        for (group, count) in &n.groups {
            self.remove_member(group, *count, &n.name);
        }
    }

    fn remove_member(&mut self, group: &str, count: u32, name: &str) {
        if let Some(levels) = self.groups.get_mut(group)
            && let Some(names) = levels.get_mut(&count)
        {
            names.remove(name);
            if names.is_empty() {
                levels.remove(&count);
                if levels.is_empty() {
                    self.groups.remove(group);
                }
            }
        }
    }
}

impl Snapshot {
    pub fn new(nodes: Vec<NodeInfo>) -> Self {
        let mut s = Snapshot { nodes: HashMap::with_capacity(nodes.len()), index: Index::default() };
        for n in nodes {
            s.upsert_node(n);
        }
        s
    }

    /// Adds a node or replaces the one of the same name (a poll, a state change, a cordon).
    pub fn upsert_node(&mut self, n: NodeInfo) {
        if let Some(old) = self.nodes.remove(&n.name) {
            self.index.remove(&old);
        }
        self.index.insert(&n);
        self.nodes.insert(n.name.clone(), n);
    }

    pub fn remove_node(&mut self, name: &str) {
        if let Some(old) = self.nodes.remove(name) {
            self.index.remove(&old);
        }
    }

    /// Applies a committed placement: the node's allocation grows by the request's resources and its count of
    /// the request's spread group by one. Unknown nodes are ignored.
    pub fn reserve(&mut self, node: &str, r: &Request) {
        self.update(node, r.spread_group.as_deref(), |n| n.allocated += r.resources, 1);
    }

    /// Undoes a reservation (a VM deleted, a create that failed, a commit that did not happen).
    pub fn release(&mut self, node: &str, resources: &Resources, spread_group: Option<&str>) {
        self.update(node, spread_group, |n| n.allocated -= *resources, -1);
    }

    /// Changes a node's allocation and one group count, moving only the index entries that change.
    fn update(&mut self, node: &str, group: Option<&str>, change: impl FnOnce(&mut NodeInfo), delta: i64) {
        let Some(n) = self.nodes.get_mut(node) else { return };
        let indexed = n.schedulable();
        let old_free = n.free().memory_mib;
        change(n);
        let new_free = n.free().memory_mib;
        if indexed
            && old_free != new_free
            && let Some(class) = self.index.classes.iter_mut().find(|c| c.holds(n))
        {
            class.by_free_memory.remove(&(old_free, n.name.clone()));
            class.by_free_memory.insert((new_free, n.name.clone()));
        }
        let Some(group) = group else { return };
        let old = n.group_count(group);
        let new = (i64::from(old) + delta).clamp(0, i64::from(u32::MAX)) as u32;
        if new == 0 {
            n.groups.remove(group);
        } else {
            n.groups.insert(group.to_owned(), new);
        }
        if indexed && old != new {
            self.index.remove_member(group, old, node);
            if new > 0 {
                let levels = self.index.groups.entry(group.to_owned()).or_default();
                levels.entry(new).or_default().insert(node.to_owned());
            }
        }
    }

    /// Sets how many disk-heavy operations are placed on `node` and not finished (a score, not in the index).
    pub fn set_disk_jobs(&mut self, node: &str, count: u32) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.disk_jobs = count;
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    /// Every node, in no particular order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many nodes are Ready and not cordoned.
    pub fn schedulable(&self) -> usize {
        self.index.classes.iter().map(|c| c.by_free_memory.len()).sum()
    }

    pub(super) fn classes(&self) -> &[Class] {
        &self.index.classes
    }

    /// Of the request's selector pairs and licenses, the one the fewest schedulable nodes meet, and those
    /// nodes in name order; `None` if the request has neither.
    pub(super) fn rarest_attribute(&self, r: &Request) -> Option<&BTreeSet<String>> {
        let labelled = r.selector.iter().map(|(key, value)| match self.index.labels.get(key) {
            Some(values) => values.get(value),
            None => &NO_NODES,
        });
        let licensed = r.licenses.iter().map(|license| self.index.licenses.get(license));
        labelled.chain(licensed).min_by_key(|names| names.len())
    }

    /// Schedulable nodes holding VMs of `group`, by ascending count.
    pub(super) fn group_levels(&self, group: &str) -> impl Iterator<Item = &BTreeSet<String>> {
        self.index.groups.get(group).into_iter().flat_map(|levels| levels.values())
    }
}

#[cfg(test)]
impl Snapshot {
    /// The index in a canonical form (sorted, empty classes left out), to compare two snapshots' indexes.
    pub(super) fn index_digest(&self) -> String {
        fn sorted(c: &Counts) -> BTreeMap<&String, &usize> {
            c.0.iter().collect()
        }
        let classes: BTreeMap<_, _> = (self.index.classes.iter())
            .filter(|c| !c.is_empty() || !c.images.0.is_empty() || !c.licenses.0.is_empty())
            .map(|c| {
                let labels: BTreeMap<_, _> = c.labels.iter().map(|(k, v)| (k, sorted(v))).collect();
                let labels: BTreeMap<_, _> = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
                let key = (&c.datacenter, &c.arch, &c.hypervisors);
                (
                    key,
                    format!(
                        "{:?} {:?} {:?} {labels:?}",
                        c.by_free_memory,
                        sorted(&c.images),
                        sorted(&c.licenses)
                    ),
                )
            })
            .collect();
        let labels: BTreeMap<_, _> =
            self.index.labels.iter().map(|(k, v)| (k, v.0.iter().collect::<BTreeMap<_, _>>())).collect();
        let labels: BTreeMap<_, _> = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        let licenses: BTreeMap<_, _> = self.index.licenses.0.iter().collect();
        let groups: BTreeMap<_, _> = self.index.groups.iter().collect();
        format!("{classes:#?}\n{labels:?}\n{licenses:?}\n{groups:?}")
    }
}
