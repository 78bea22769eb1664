//! NICs on an Open vSwitch bridge: the agent plumbs each one itself, so the tag holds whatever the
//! hypervisor driver does and the port goes when the domain goes.
//!
//! Per NIC on a bridge: a persistent tap device named from the domain and the NIC's index (`gf` and 12 hex
//! digits), added to the bridge as an access port with the NIC's VLAN tag and the domain's name in its
//! `external-ids:gridforge-domain`; the domain gets `<interface type='ethernet'>` on that tap
//! (`managed='no'`). QEMU attaches to the tap as it finds it.
//!
//! VLAN translation (a network has ID `inner` on the node's bridge and `outer` on its uplink): the uplink is
//! a second bridge (`[network] uplink_bridge`, holding the physical port) joined to the tenant bridge by a
//! pair of patch ports, and the translation is a set of OpenFlow rules on the uplink bridge, cookie `inner`:
//!
//! | priority | match                                   | actions                         |
//! |----------|-----------------------------------------|---------------------------------|
//! | 20       | from the tenant bridge, VLAN inner      | set VLAN outer, NORMAL          |
//! | 15       | from the tenant bridge (any other)      | NORMAL                          |
//! | 12       | VLAN inner from the uplink              | drop (only `outer` reaches it)  |
//! | 10       | VLAN outer from the uplink              | set VLAN inner, NORMAL          |
//!
//! The rules of a VLAN are removed with its last port on the node, so an ID freed in the grid and given to
//! another tenant's network never inherits an old translation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::{HypervisorError, NicDef};

/// The tenant bridge's patch port towards the uplink bridge, and its peer there (OpenFlow port names are
/// at most 15 bytes).
const TO_UPLINK: &str = "gf-to-uplink";
const TO_TENANT: &str = "gf-to-tenants";
/// External id that names a port's domain.
const DOMAIN_ID: &str = "gridforge-domain";
/// Seconds ovs-vsctl and ovs-ofctl wait for the database or the switch.
const TIMEOUT_SECS: &str = "10";

/// The switch the node's NICs go on and how to reach it.
#[derive(Clone, Debug)]
pub struct Ovs {
    /// Open vSwitch's run directory (its `db.sock` and the bridges' management sockets).
    pub rundir: PathBuf,
    /// The bridge holding the physical uplink; empty: no translation possible on this node.
    pub uplink_bridge: String,
}

/// The tap of NIC `index` of `domain`: at most 15 bytes, as Linux wants, and the same on every node.
pub fn tap_name(domain: &str, index: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{domain}\0{index}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("gf{hex}")
}

impl Ovs {
    fn tool(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("OVS_RUNDIR", &self.rundir).arg(format!("--timeout={TIMEOUT_SECS}"));
        c
    }

    fn vsctl(&self, args: &[&str]) -> Result<String, HypervisorError> {
        let mut c = self.tool("ovs-vsctl");
        c.arg(format!("--db=unix:{}", self.rundir.join("db.sock").display())).args(args);
        checked("ovs-vsctl", args, c.output())
    }

    fn ofctl(&self, args: &[&str]) -> Result<String, HypervisorError> {
        let mut c = self.tool("ovs-ofctl");
        c.args(args);
        checked("ovs-ofctl", args, c.output())
    }

    /// Taps, ports, tags and translations for every bridge NIC of `domain`; the NICs come back with their
    /// tap set. Idempotent: a second call finds everything in place.
    pub fn attach(&self, domain: &str, nics: &[NicDef]) -> Result<Vec<NicDef>, HypervisorError> {
        let mut out = Vec::with_capacity(nics.len());
        for (i, nic) in nics.iter().enumerate() {
            let mut nic = nic.clone();
            let Some(bridge) = nic.bridge.clone() else {
                out.push(nic);
                continue;
            };
            if nic.uplink_vlan.is_some() && self.uplink_bridge.is_empty() {
                return Err(HypervisorError::Invalid(format!(
                    "nic {i}: an uplink VLAN needs an uplink bridge on this node ([network] uplink_bridge)"
                )));
            }
            let tap = tap_name(domain, i);
            ensure_tap(&tap)?;
            let tag = nic.vlan.map(|v| format!("tag={v}"));
            let owner = format!("external-ids:{DOMAIN_ID}=\"{domain}\"");
            let mut args =
                vec!["--", "--may-exist", "add-port", &bridge, &tap, "--", "set", "Interface", &tap, &owner];
            args.extend(["--", "set", "Port", &tap]);
            match &tag {
                Some(t) => args.push(t),
                None => args.push("tag=[]"),
            }
            self.vsctl(&args)?;
            if let (Some(inner), Some(outer)) = (nic.vlan, nic.uplink_vlan) {
                self.translate(&bridge, inner, outer)?;
            }
            nic.tap = Some(tap);
            out.push(nic);
        }
        Ok(out)
    }

    /// The patch ports between `bridge` and the uplink bridge, and the rules mapping `inner` to `outer`.
    fn translate(&self, bridge: &str, inner: u16, outer: u16) -> Result<(), HypervisorError> {
        let up = self.uplink_bridge.as_str();
        let to_tenant = TO_TENANT;
        let peer_up = format!("options:peer={to_tenant}");
        let peer_tenant = format!("options:peer={TO_UPLINK}");
        self.vsctl(&[
            "--",
            "--may-exist",
            "add-port",
            bridge,
            TO_UPLINK,
            "--",
            "set",
            "Interface",
            TO_UPLINK,
            "type=patch",
            &peer_up,
            "--",
            "--may-exist",
            "add-port",
            up,
            to_tenant,
            "--",
            "set",
            "Interface",
            to_tenant,
            "type=patch",
            &peer_tenant,
        ])?;
        let rules = [
            format!(
                "cookie={inner},priority=20,in_port={to_tenant},dl_vlan={inner},actions=mod_vlan_vid:{outer},NORMAL"
            ),
            format!("priority=15,in_port={to_tenant},actions=NORMAL"),
            format!("cookie={inner},priority=12,dl_vlan={inner},actions=drop"),
            format!("cookie={inner},priority=10,dl_vlan={outer},actions=mod_vlan_vid:{inner},NORMAL"),
        ];
        for rule in &rules {
            self.ofctl(&["add-flow", up, rule])?;
        }
        Ok(())
    }

    /// Removes the ports and taps of `domain`, and the translation of every VLAN that lost its last port.
    pub fn detach(&self, domain: &str) -> Result<(), HypervisorError> {
        let filter = format!("external-ids:{DOMAIN_ID}=\"{domain}\"");
        let names = self.vsctl(&["--bare", "--columns=name", "find", "Interface", &filter])?;
        let mut freed = Vec::new();
        for tap in names.split_whitespace() {
            let tag = self.vsctl(&["--if-exists", "get", "Port", tap, "tag"]).unwrap_or_default();
            self.vsctl(&["--if-exists", "del-port", tap])?;
            remove_tap(tap)?;
            if let Ok(v) = tag.trim().parse::<u16>() {
                freed.push(v);
            }
        }
        if self.uplink_bridge.is_empty() {
            return Ok(());
        }
        for v in freed {
            let still = self.vsctl(&["--bare", "--columns=name", "find", "Port", &format!("tag={v}")])?;
            if still.trim().is_empty() {
                self.ofctl(&["del-flows", &self.uplink_bridge, &format!("cookie={v}/-1")])?;
            }
        }
        Ok(())
    }
}

fn checked(program: &str, args: &[&str], out: std::io::Result<Output>) -> Result<String, HypervisorError> {
    let out = out.map_err(|e| HypervisorError::Io {
        what: format!("running {program} (is Open vSwitch installed? package openvswitch-switch)"),
        source: e,
    })?;
    if !out.status.success() {
        return Err(HypervisorError::Switch {
            op: format!("{program} {}", args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn ip(args: &[&str]) -> Result<String, HypervisorError> {
    checked("ip", args, Command::new("ip").args(args).output())
}

fn ensure_tap(name: &str) -> Result<(), HypervisorError> {
    if !link_exists(name) {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    ip(&["link", "set", name, "up"]).map(drop)
}

fn remove_tap(name: &str) -> Result<(), HypervisorError> {
    if link_exists(name) {
        ip(&["tuntap", "del", "dev", name, "mode", "tap"])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_linux_and_differ_per_nic_and_domain() {
        let a0 = tap_name("web-1", 0);
        assert_eq!(a0.len(), 14);
        assert!(a0.starts_with("gf"));
        assert_eq!(a0, tap_name("web-1", 0));
        assert_ne!(a0, tap_name("web-1", 1));
        assert_ne!(a0, tap_name("web-2", 0));
    }
}
