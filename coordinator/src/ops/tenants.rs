//! Tenants (customers) and their groups of VMs in the grid view. A tenant has quotas on what its VMs hold
//! together; each group a service level and a scaling policy, and the template its new members are made
//! from. Every VM of a tenant counts against its quota from the moment it is placed.

use gridforge_proto::v1::{Nic, Quota, ScalingPolicy, TenantNetwork, nic};

use crate::grid::{Change, GridState, Group, Resources, Tenant, now};

use super::{Engine, OpError, check_vm_name};

/// A tenant's or group's name: it prefixes the names of the VMs scaling adds, so it follows the VM names'
/// rules, a little shorter.
fn check_name(what: &str, name: &str) -> Result<(), OpError> {
    if name.len() > 40 {
        return Err(OpError::Invalid(format!("{what} name {name:?}: at most 40 characters")));
    }
    check_vm_name(name).map_err(|_| {
        OpError::Invalid(format!(
            "{what} name {name:?}: 1-40 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        ))
    })
}

/// The tenant `name`, or NOT_FOUND naming it.
pub(crate) fn tenant_of<'s>(s: &'s GridState, name: &str) -> Result<&'s Tenant, OpError> {
    s.tenants.get(name).ok_or_else(|| OpError::NotFound(format!("no tenant {name:?} (gridctl tenant list)")))
}

/// Refuse `extra` (more VMs: `new_vms`) when it would take `tenant` past its quota; the error names the
/// tenant, the resource, what is used, asked and allowed.
pub(crate) fn check_quota(
    s: &GridState,
    tenant: &str,
    extra: &Resources,
    new_vms: u32,
) -> Result<(), OpError> {
    let q = tenant_of(s, tenant)?.quota.unwrap_or_default();
    let (used, count) = s.tenant_usage(tenant);
    let mut over = Vec::new();
    let mut check = |what: &str, used: u64, asked: u64, limit: u64, unit: &str| {
        if limit > 0 && asked > 0 && used + asked > limit {
            over.push(format!("{what}: {used}{unit} used + {asked}{unit} asked > {limit}{unit} allowed"));
        }
    };
    check("vcpus", used.vcpus.into(), extra.vcpus.into(), q.vcpus.into(), "");
    check("memory", used.memory_mib, extra.memory_mib, q.memory_mib, " MiB");
    check("disk", used.disk_mib, extra.disk_mib, q.disk_mib, " MiB");
    check("vms", count.into(), new_vms.into(), q.vms.into(), "");
    if over.is_empty() {
        Ok(())
    } else {
        Err(OpError::Quota(format!("tenant {tenant}'s quota would be exceeded: {}", over.join("; "))))
    }
}

/// The tenant as a read shows it: with what its VMs hold now.
pub fn tenant_view(s: &GridState, name: &str) -> Option<Tenant> {
    let mut t = s.tenants.get(name)?.clone();
    let (used, count) = s.tenant_usage(name);
    t.used = Some(used);
    t.vms = count;
    Some(t)
}

pub(super) fn check_policy(g: &Group) -> Result<(), OpError> {
    let sl = g.service_level.unwrap_or_default();
    let p = g.scaling.unwrap_or_default();
    let bad = |m: String| Err(OpError::Invalid(format!("group {}: {m}", g.name)));
    if sl.max_members > 0 && sl.min_members > sl.max_members {
        return bad(format!("min_members {} above max_members {}", sl.min_members, sl.max_members));
    }
    for (what, v) in [
        ("max_avg_cpu_percent", sl.max_avg_cpu_percent),
        ("cpu_up_percent", p.cpu_up_percent),
        ("cpu_down_percent", p.cpu_down_percent),
        ("memory_up_percent", p.memory_up_percent),
        ("memory_down_percent", p.memory_down_percent),
    ] {
        if !(0.0..=100.0).contains(&v) {
            return bad(format!("{what} {v} is not a percentage (0-100)"));
        }
    }
    if p.horizontal || p.vertical {
        if p.cpu_up_percent <= 0.0 {
            return bad("scaling needs cpu_up_percent (the threshold to scale up at)".into());
        }
        // The gap between the thresholds is what keeps scaling from flapping.
        if p.cpu_down_percent >= p.cpu_up_percent {
            return bad(format!(
                "cpu_down_percent {} must be below cpu_up_percent {} (the gap keeps it from flapping)",
                p.cpu_down_percent, p.cpu_up_percent
            ));
        }
        if p.memory_up_percent > 0.0 && p.memory_down_percent >= p.memory_up_percent {
            return bad(format!(
                "memory_down_percent {} must be below memory_up_percent {}",
                p.memory_down_percent, p.memory_up_percent
            ));
        }
    }
    if p.max_vcpus > 0 && p.min_vcpus > p.max_vcpus {
        return bad(format!("min_vcpus {} above max_vcpus {}", p.min_vcpus, p.max_vcpus));
    }
    if p.max_memory_mib > 0 && p.min_memory_mib > p.max_memory_mib {
        return bad(format!("min_memory_mib {} above max_memory_mib {}", p.min_memory_mib, p.max_memory_mib));
    }
    if p.horizontal {
        let Some(spec) = g.template.as_ref() else {
            return bad("horizontal scaling needs a template (the spec new members are made from)".into());
        };
        let mut named = spec.clone();
        named.name = format!("{}-1", g.name);
        gridforge_agent::jobs::validate_spec(&named).map_err(|e| {
            OpError::Invalid(format!(
                "group {}: template: {}",
                g.name,
                e.to_string().replace("provision.spec.", "template.")
            ))
        })?;
    }
    Ok(())
}

/// Defaults for a policy's unset fields: a window of a minute, a cooldown of two.
fn with_defaults(mut p: ScalingPolicy) -> ScalingPolicy {
    if p.window_secs == 0 {
        p.window_secs = 60;
    }
    if p.cooldown_secs == 0 {
        p.cooldown_secs = 120;
    }
    if p.min_vcpus == 0 {
        p.min_vcpus = 1;
    }
    p
}

impl Engine {
    /// Add a tenant, or change a known tenant's quota.
    pub async fn put_tenant(&self, name: &str, quota: Quota) -> Result<Tenant, OpError> {
        check_name("tenant", name)?;
        self.view()
            .update(|s| {
                let t = now();
                let tenant = match s.tenants.get(name) {
                    Some(old) => Tenant { quota: Some(quota), updated: Some(t), ..old.clone() },
                    None => Tenant {
                        name: name.into(),
                        quota: Some(quota),
                        created: Some(t),
                        updated: Some(t),
                        ..Default::default()
                    },
                };
                let shown = Tenant { used: None, vms: 0, ..tenant.clone() };
                Ok((shown, vec![Change::PutTenant(tenant)]))
            })
            .await
            .map(|t| self.view().read(|s| tenant_view(s, &t.name)).unwrap_or(t))
    }

    /// Remove a tenant that has no VMs (its groups go with it).
    pub async fn remove_tenant(&self, name: &str) -> Result<Tenant, OpError> {
        self.view()
            .update(|s| {
                let t = tenant_view(s, name)
                    .ok_or_else(|| OpError::NotFound(format!("no tenant {name:?} (gridctl tenant list)")))?;
                if t.vms > 0 {
                    return Err(OpError::Precondition(format!(
                        "tenant {name} still has {} VMs: delete them first",
                        t.vms
                    )));
                }
                Ok((t, vec![Change::RemoveTenant(name.into())]))
            })
            .await
    }

    /// Add or change a group of a tenant; its scaling state (last step, member numbers) is kept.
    pub async fn put_group(&self, mut g: Group) -> Result<Group, OpError> {
        check_name("group", &g.name)?;
        g.service_level = Some(g.service_level.unwrap_or_default());
        g.scaling = Some(with_defaults(g.scaling.unwrap_or_default()));
        check_policy(&g)?;
        if let Some(t) = g.template.as_mut() {
            // The stored template holds no secrets, like every stored spec.
            gridforge_agent::jobs::scrub_spec(t);
        }
        self.view()
            .update(|s| {
                let mut tenant = tenant_of(s, &g.tenant)?.clone();
                match tenant.groups.iter_mut().find(|x| x.name == g.name) {
                    Some(old) => {
                        g.last_scaled = old.last_scaled;
                        g.next_member = old.next_member;
                        *old = g.clone();
                    }
                    None => {
                        g.last_scaled = None;
                        g.next_member = 1;
                        tenant.groups.push(g.clone());
                    }
                }
                tenant.updated = Some(now());
                Ok((g.clone(), vec![Change::PutTenant(tenant)]))
            })
            .await
    }

    /// Remove a group without members.
    pub async fn remove_group(&self, tenant: &str, name: &str) -> Result<Group, OpError> {
        self.view()
            .update(|s| {
                let mut t = tenant_of(s, tenant)?.clone();
                let at = t
                    .groups
                    .iter()
                    .position(|g| g.name == name)
                    .ok_or_else(|| OpError::NotFound(format!("tenant {tenant} has no group {name:?}")))?;
                let members = s.tenant_vms(tenant, name).count();
                if members > 0 {
                    return Err(OpError::Precondition(format!(
                        "group {tenant}/{name} still has {members} members: delete them first"
                    )));
                }
                let g = t.groups.remove(at);
                t.updated = Some(now());
                Ok((g, vec![Change::PutTenant(t)]))
            })
            .await
    }
}

/// The group `tenant`/`name`, if both exist.
pub fn group_of<'a>(s: &'a GridState, tenant: &str, name: &str) -> Option<&'a Group> {
    s.tenants.get(tenant)?.groups.iter().find(|g| g.name == name)
}

/// The network `tenant`/`name`, with the VMs that have a NIC on it.
pub fn network_view(s: &GridState, bridge: &str, n: &TenantNetwork) -> TenantNetwork {
    let mut n = n.clone();
    n.vms = s
        .tenant_vms(&n.tenant, "")
        .filter(|v| on_network(v, bridge, n.vlan_id))
        .map(|v| v.name.clone())
        .collect();
    n
}

/// Whether VM `v` has a NIC on the tenant bridge with tag `vlan`.
fn on_network(v: &crate::grid::Vm, bridge: &str, vlan: u32) -> bool {
    let nics =
        v.spec.as_ref().and_then(|s| s.machine.as_ref()).map(|m| m.nics.as_slice()).unwrap_or_default();
    nics.iter()
        .any(|nic| nic.vlan == vlan && matches!(&nic.attach, Some(nic::Attach::Bridge(b)) if b == bridge))
}

/// The NICs a VM of `tenant` gets on its `networks`: on the tenant bridge, tagged with each one's VLAN ID.
pub(crate) fn network_nics(
    s: &GridState,
    bridge: &str,
    tenant: &str,
    networks: &[String],
) -> Result<Vec<Nic>, OpError> {
    let t = s.tenants.get(tenant);
    networks
        .iter()
        .map(|name| {
            let n = t.and_then(|t| t.networks.iter().find(|n| &n.name == name)).ok_or_else(|| {
                OpError::NotFound(format!("tenant {tenant} has no network {name:?} (gridctl network list)"))
            })?;
            Ok(Nic {
                attach: Some(nic::Attach::Bridge(bridge.into())),
                vlan: n.vlan_id,
                ..Default::default()
            })
        })
        .collect()
}

/// Why network `tenant`/`name` with ID `vlan_id` and translations `uplink` cannot be: on some node, an ID
/// it holds on the uplink is another network's there (their frames would mix, or be dropped). A network
/// holds its uplink ID there and, where translated, its own ID too (the uplink bridge drops it).
fn uplink_clash(
    s: &GridState,
    tenant: &str,
    name: &str,
    vlan_id: u32,
    uplink: &std::collections::HashMap<String, u32>,
) -> Option<String> {
    let held =
        |inner: u32, uplink: &std::collections::HashMap<String, u32>, node: &str| match uplink.get(node) {
            Some(&outer) if outer != inner => vec![outer, inner],
            _ => vec![inner],
        };
    let others: Vec<&TenantNetwork> = s
        .tenants
        .values()
        .flat_map(|t| t.networks.iter())
        .filter(|n| !(n.tenant == tenant && n.name == name))
        .collect();
    s.nodes.keys().find_map(|node| {
        let mine = held(vlan_id, uplink, node);
        others.iter().find_map(|o| {
            let theirs = held(o.vlan_id, &o.uplink_vlans, node);
            mine.iter().find(|v| theirs.contains(v)).map(|v| {
                format!(
                    "on node {node}'s uplink, VLAN {v} is already network {}/{}'s: pick another uplink ID",
                    o.tenant, o.name
                )
            })
        })
    })
}

/// The NICs of job `req`'s spec with the uplink ID their network has on `node`, where it is translated.
pub(crate) fn localize_nics(s: &GridState, node: &str, req: &mut gridforge_proto::v1::SubmitJobRequest) {
    use gridforge_proto::v1::submit_job_request::Job as JobReq;
    let spec = match &mut req.job {
        Some(JobReq::Provision(p)) => p.spec.as_mut(),
        Some(JobReq::MigrateReceive(m)) => m.spec.as_mut(),
        _ => None,
    };
    let Some(machine) = spec.and_then(|s| s.machine.as_mut()) else { return };
    for nic in machine.nics.iter_mut().filter(|n| n.vlan != 0) {
        let network = s.tenants.values().flat_map(|t| t.networks.iter()).find(|n| n.vlan_id == nic.vlan);
        nic.uplink_vlan = network.and_then(|n| n.uplink_vlans.get(node)).copied().unwrap_or(0);
    }
}

impl Engine {
    /// Add a network to a tenant with the lowest VLAN ID of the configured range that no network has; for a
    /// known network, set its uplink translations.
    pub async fn put_network(
        &self,
        tenant: &str,
        name: &str,
        uplink_vlans: std::collections::HashMap<String, u32>,
    ) -> Result<TenantNetwork, OpError> {
        check_name("network", name)?;
        if let Some((node, v)) = uplink_vlans.iter().find(|(_, v)| !(1..=4094).contains(*v)) {
            return Err(OpError::Invalid(format!("uplink VLAN {v} for node {node}: not a VLAN ID (1-4094)")));
        }
        let range = &self.inner.config.networks;
        let (first, last) = (range.vlan_first, range.vlan_last);
        self.view()
            .update(|s| {
                let mut t = tenant_of(s, tenant)?.clone();
                if let Some(unknown) = uplink_vlans.keys().find(|n| !s.nodes.contains_key(*n)) {
                    return Err(OpError::NotFound(format!("uplink VLAN for node {unknown:?}: no such node")));
                }
                let network = match t.networks.iter_mut().find(|n| n.name == name) {
                    Some(n) => {
                        if let Some(clash) = uplink_clash(s, tenant, name, n.vlan_id, &uplink_vlans) {
                            return Err(OpError::AlreadyExists(clash));
                        }
                        n.uplink_vlans = uplink_vlans.clone();
                        n.clone()
                    }
                    None => {
                        let taken: std::collections::BTreeSet<u32> =
                            s.tenants.values().flat_map(|t| t.networks.iter().map(|n| n.vlan_id)).collect();
                        let free = (first..=last).filter(|v| !taken.contains(v));
                        let mut clash = None;
                        let vlan_id = free
                            .into_iter()
                            .find(|v| {
                                clash = uplink_clash(s, tenant, name, *v, &uplink_vlans);
                                clash.is_none()
                            })
                            .ok_or_else(|| {
                                if let Some(c) = &clash {
                                    return OpError::AlreadyExists(c.clone());
                                }
                                OpError::Quota(format!(
                                    "no free VLAN ID left in {first}-{last} ([networks] vlan_first, vlan_last): \
                                     {} networks use them all",
                                    taken.len()
                                ))
                            })?;
                        let n = TenantNetwork {
                            tenant: tenant.into(),
                            name: name.into(),
                            vlan_id,
                            uplink_vlans: uplink_vlans.clone(),
                            created: Some(now()),
                            vms: Vec::new(),
                        };
                        t.networks.push(n.clone());
                        n
                    }
                };
                t.updated = Some(now());
                Ok((network, vec![Change::PutTenant(t)]))
            })
            .await
    }

    /// Remove a network no VM uses; its VLAN ID is free again.
    pub async fn remove_network(&self, tenant: &str, name: &str) -> Result<TenantNetwork, OpError> {
        let bridge = self.inner.config.networks.bridge.clone();
        self.view()
            .update(|s| {
                let mut t = tenant_of(s, tenant)?.clone();
                let at =
                    t.networks.iter().position(|n| n.name == name).ok_or_else(|| {
                        OpError::NotFound(format!("tenant {tenant} has no network {name:?}"))
                    })?;
                let shown = network_view(s, &bridge, &t.networks[at]);
                if !shown.vms.is_empty() {
                    return Err(OpError::Precondition(format!(
                        "network {tenant}/{name} is used by {}: delete them first",
                        shown.vms.join(", ")
                    )));
                }
                t.networks.remove(at);
                t.updated = Some(now());
                Ok((shown, vec![Change::PutTenant(t)]))
            })
            .await
    }

    /// The tenant bridge NICs attach to (`[networks] bridge`).
    pub fn tenant_bridge(&self) -> &str {
        &self.inner.config.networks.bridge
    }
}
