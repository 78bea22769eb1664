//! Network configuration as systemd-networkd `.network` files, with networkd enabled the way
//! `systemctl enable systemd-networkd` would.

use gridforge_proto::v1::{Customization, NetworkInterface};

use super::path::{Guest, Perm};
use super::units::{enable_unit, unit_exists};
use super::{Applied, CustomizeError};

/// The file name of the n-th interface entry.
pub fn network_file(n: usize) -> String {
    format!("/etc/systemd/network/10-gridforge-{n}.network")
}

/// The `.network` file text of one entry.
pub fn network_unit(iface: &NetworkInterface) -> String {
    let mut s = String::from("# Written by gridforge.\n[Match]\n");
    if !iface.match_mac.is_empty() {
        s.push_str(&format!("MACAddress={}\n", iface.match_mac.to_ascii_lowercase()));
    }
    if !iface.match_name.is_empty() {
        s.push_str(&format!("Name={}\n", iface.match_name));
    }
    if iface.match_mac.is_empty() && iface.match_name.is_empty() {
        s.push_str("Name=en* eth*\n");
    }
    s.push_str("\n[Network]\n");
    if iface.dhcp {
        s.push_str("DHCP=yes\n");
    }
    for addr in &iface.addresses {
        s.push_str(&format!("Address={addr}\n"));
    }
    if !iface.gateway.is_empty() {
        s.push_str(&format!("Gateway={}\n", iface.gateway));
    }
    for dns in &iface.dns {
        s.push_str(&format!("DNS={dns}\n"));
    }
    s
}

pub(crate) fn apply_network(
    guest: &Guest<'_>,
    c: &Customization,
    applied: &mut Applied,
) -> Result<(), CustomizeError> {
    if c.network.is_empty() {
        return Ok(());
    }
    for (n, iface) in c.network.iter().enumerate() {
        guest.write_file(&network_file(n), network_unit(iface).as_bytes(), Perm::root(0o644))?;
    }
    if unit_exists(guest, "systemd-networkd.service")? {
        enable_unit(guest, "systemd-networkd.service", "multi-user.target")?;
        // What the unit's [Install] section asks for besides (Also=, Alias=).
        if unit_exists(guest, "systemd-networkd.socket")? {
            enable_unit(guest, "systemd-networkd.socket", "sockets.target")?;
        }
        if unit_exists(guest, "systemd-networkd-wait-online.service")? {
            enable_unit(guest, "systemd-networkd-wait-online.service", "network-online.target")?;
        }
        let alias = "/etc/systemd/system/dbus-org.freedesktop.network1.service";
        if guest.lstat(alias)?.is_none() {
            guest.symlink(alias, &super::units::unit_target(guest, "systemd-networkd.service")?)?;
        }
    } else {
        applied.warnings.push(
            "systemd-networkd is not installed in the image: the .network files were written but nothing \
             will apply them"
                .into(),
        );
    }
    let dns: Vec<&str> = {
        let mut all: Vec<&str> = Vec::new();
        for d in c.network.iter().flat_map(|i| i.dns.iter()) {
            if !all.contains(&d.as_str()) {
                all.push(d);
            }
        }
        all
    };
    // With systemd-resolved the DNS= lines reach /etc/resolv.conf through its stub; without it, write it.
    if !dns.is_empty() && !unit_exists(guest, "systemd-resolved.service")? {
        let mut text = String::from("# Written by gridforge.\n");
        for d in dns {
            text.push_str(&format!("nameserver {d}\n"));
        }
        // write_file replaces a symlink at /etc/resolv.conf rather than writing through it.
        guest.write_file("/etc/resolv.conf", text.as_bytes(), Perm::root(0o644))?;
    }
    Ok(())
}
