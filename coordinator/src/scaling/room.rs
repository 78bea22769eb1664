//! [`Room`] over the scheduler's [`Snapshot`]: the placement a create would get, reserved in the snapshot.

use std::collections::HashMap;

use gridforge_proto::v1::{Group, Resources};

use super::Room;
use crate::grid::to_sched;
use crate::ops::schedule_request;
use crate::scheduler::{self, Request, Snapshot};

/// Room on the nodes of a scheduler snapshot. Reservations change the snapshot: for a dry run, give it a
/// clone.
pub struct SnapshotRoom<'a> {
    snapshot: &'a mut Snapshot,
    /// Each group's request, built once (keyed by the group's address: the groups outlive a round's room).
    requests: HashMap<usize, Request>,
}

impl<'a> SnapshotRoom<'a> {
    pub fn new(snapshot: &'a mut Snapshot) -> Self {
        SnapshotRoom { snapshot, requests: HashMap::new() }
    }

    /// The snapshot with this round's reservations.
    pub fn snapshot(&self) -> &Snapshot {
        self.snapshot
    }
}

/// The scheduler's request for a new member of `group` with resources `r`, as a create would build it
/// (built once per group and room).
fn request<'c>(cache: &'c mut HashMap<usize, Request>, group: &Group, r: &Resources) -> &'c Request {
    let req = cache.entry(std::ptr::from_ref(group) as usize).or_insert_with(|| {
        let spec = group.template.clone().unwrap_or_default();
        let placement = group.placement.clone().unwrap_or_default();
        schedule_request(&spec, &placement)
    });
    req.resources = to_sched(r);
    req
}

impl Room for SnapshotRoom<'_> {
    /// Placement through the snapshot's index (as `place`, without the full scan that builds every node's
    /// refusal when no node fits) with the group's template and constraints; the chosen node's allocation
    /// (and spread group count) grows by `r`.
    fn fits_new(&mut self, group: &Group, r: &Resources) -> bool {
        let req = request(&mut self.requests, group, r);
        match scheduler::place_indexed(self.snapshot, req) {
            Some(p) => {
                self.snapshot.reserve(&p.node, req);
                true
            }
            None => false,
        }
    }

    /// The placement filters for `node` alone (no full scan).
    fn fits_new_on(&mut self, group: &Group, r: &Resources, node: &str) -> bool {
        let req = request(&mut self.requests, group, r);
        let fits = self.snapshot.node(node).is_some_and(|n| scheduler::filter(n, req).is_ok());
        if fits {
            self.snapshot.reserve(node, req);
        }
        fits
    }

    /// The node's free resources (after overcommit) cover `extra`.
    fn fits_on_node(&mut self, node: &str, extra: &Resources) -> bool {
        let extra = to_sched(extra);
        let fits = self.snapshot.node(node).is_some_and(|n| {
            let free = n.free();
            free.vcpus >= extra.vcpus
                && free.memory_mib >= extra.memory_mib
                && free.disk_mib >= extra.disk_mib
        });
        if fits {
            self.snapshot.reserve(node, &Request { resources: extra, ..Default::default() });
        }
        fits
    }

    /// Returns `r` to the node's free resources (the spread group counts are left as they are).
    fn release(&mut self, node: &str, r: &Resources) {
        self.snapshot.release(node, &to_sched(r), None);
    }
}
