//! libvirt XML: domain and storage documents built from our definitions (every string escaped), and the few
//! facts read back from libvirt's own XML (disk source, NIC MACs, pool path).

use std::fmt::Write as _;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{DomainDef, DomainType, HypervisorError, NicDef};
use crate::config::LibvirtConfig;

/// The guest disk's target device name in every domain we define.
pub const DISK_TARGET: &str = "vda";

/// `s` escaped for XML text and attribute values (single- or double-quoted).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// A domain document with each `from` path, as an attribute value or as element text, replaced by its `to`
/// (the paths a live migration's destination uses).
pub fn retarget(xml: &str, paths: &[(&Path, &Path)]) -> String {
    let mut out = xml.to_string();
    for (from, to) in paths {
        if from == to || from.as_os_str().is_empty() {
            continue;
        }
        let (from, to) = (esc_path(from), esc_path(to));
        for (open, close) in [("'", "'"), ("\"", "\""), (">", "<")] {
            out = out.replace(&format!("{open}{from}{close}"), &format!("{open}{to}{close}"));
        }
    }
    out
}

fn esc_path(p: &Path) -> String {
    escape(&p.to_string_lossy())
}

/// Checks a domain definition before it becomes XML: a usable name, at least one vCPU and 1 MiB, a disk
/// path, and each NIC on exactly one of a network or a bridge with a unicast MAC and a valid VLAN id.
pub fn validate_def(def: &DomainDef) -> Result<(), HypervisorError> {
    let invalid = |m: String| Err(HypervisorError::Invalid(format!("domain {:?}: {m}", def.name)));
    check_name("domain", &def.name)?;
    if def.vcpus == 0 {
        return invalid("vcpus must be at least 1".into());
    }
    if def.memory_mib == 0 {
        return invalid("memory must be at least 1 MiB".into());
    }
    if !def.disk.is_absolute() {
        return invalid(format!("disk {} is not an absolute path", def.disk.display()));
    }
    for (i, nic) in def.nics.iter().enumerate() {
        match (&nic.network, &nic.bridge) {
            (Some(n), None) if !n.is_empty() => {}
            (None, Some(b)) if !b.is_empty() => {}
            _ => return invalid(format!("nic {i}: exactly one of network or bridge must be set")),
        }
        if !valid_mac(&nic.mac) {
            return invalid(format!(
                "nic {i}: {:?} is not a unicast MAC address (xx:xx:xx:xx:xx:xx)",
                nic.mac
            ));
        }
        if let Some(v) = nic.vlan
            && !(1..=4094).contains(&v)
        {
            return invalid(format!("nic {i}: VLAN {v} is outside 1-4094"));
        }
    }
    Ok(())
}

/// A domain or volume name libvirt and our file names accept: non-empty, at most 200 bytes, no `/`, no
/// control characters, not `.` or `..`.
pub fn check_name(what: &str, name: &str) -> Result<(), HypervisorError> {
    let bad = name.is_empty()
        || name.len() > 200
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.chars().any(char::is_control);
    if bad {
        return Err(HypervisorError::Invalid(format!(
            "{what} name {name:?} must be 1-200 bytes without '/' or control characters"
        )));
    }
    Ok(())
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

/// How the guest disk is attached: a block device (`<disk type='block'>`) or a file.
fn disk_is_block(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// `cache='none'` (O_DIRECT, no second copy in the host page cache) when the disk accepts O_DIRECT, else
/// `writeback` (e.g. files on tmpfs). A disk that does not exist yet gets `none`.
fn disk_cache(path: &Path) -> &'static str {
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(_) => "none",
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "none",
        Err(_) => "writeback",
    }
}

/// The domain XML for `def` (which must pass [`validate_def`]): UEFI with `cfg.ovmf_code` read-only and the
/// per-VM `nvram` copy, ACPI, one virtio disk (raw, or a qcow2 overlay), virtio NICs, a virtio RNG, and the first serial port
/// (also the console) written to `console_log`.
pub fn domain_xml(
    def: &DomainDef,
    ty: DomainType,
    cfg: &LibvirtConfig,
    nvram: &Path,
    console_log: &Path,
) -> String {
    domain_xml_with_uuid(def, ty, cfg, nvram, console_log, None)
}

/// [`domain_xml`] keeping the UUID of an already defined domain (libvirt refuses a redefinition under
/// another UUID).
pub fn domain_xml_with_uuid(
    def: &DomainDef,
    ty: DomainType,
    cfg: &LibvirtConfig,
    nvram: &Path,
    console_log: &Path,
    uuid: Option<&str>,
) -> String {
    let mut x = String::new();
    // Writing into a String cannot fail.
    let _ = writeln!(x, "<domain type='{}'>", ty.as_str());
    let _ = writeln!(x, "  <name>{}</name>", escape(&def.name));
    if let Some(uuid) = uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", escape(uuid));
    }
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", def.memory_mib);
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", def.vcpus);
    x.push_str("  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n");
    let _ = writeln!(x, "    <loader readonly='yes' type='pflash'>{}</loader>", esc_path(&cfg.ovmf_code));
    let _ = writeln!(x, "    <nvram>{}</nvram>", esc_path(nvram));
    x.push_str("    <boot dev='hd'/>\n  </os>\n");
    x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    if ty == DomainType::Kvm {
        x.push_str("  <cpu mode='host-passthrough'/>\n");
    }
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n");
    x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
    let _ = writeln!(x, "    <emulator>{}</emulator>", esc_path(&cfg.emulator));
    let (kind, attr) = if disk_is_block(&def.disk) { ("block", "dev") } else { ("file", "file") };
    let _ = writeln!(x, "    <disk type='{kind}' device='disk'>");
    let format = def.disk_format.as_str();
    let _ = writeln!(x, "      <driver name='qemu' type='{format}' cache='{}'/>", disk_cache(&def.disk));
    let _ = writeln!(x, "      <source {attr}='{}'/>", esc_path(&def.disk));
    let _ = writeln!(x, "      <target dev='{DISK_TARGET}' bus='virtio'/>\n    </disk>");
    for nic in &def.nics {
        nic_xml(&mut x, nic);
    }
    let log = esc_path(console_log);
    let _ = writeln!(x, "    <serial type='file'>\n      <source path='{log}'/>\n      <target port='0'/>");
    x.push_str("    </serial>\n");
    let _ = writeln!(x, "    <console type='file'>\n      <source path='{log}'/>");
    x.push_str("      <target type='serial' port='0'/>\n    </console>\n");
    x.push_str(
        "    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n",
    );
    x.push_str("  </devices>\n</domain>\n");
    x
}

fn nic_xml(x: &mut String, nic: &NicDef) {
    if let Some(tap) = &nic.tap {
        // Plumbed by the agent on Open vSwitch: the port carries the tag.
        let _ = writeln!(x, "    <interface type='ethernet'>");
        let _ = writeln!(x, "      <mac address='{}'/>", escape(&nic.mac));
        let _ = writeln!(x, "      <target dev='{}' managed='no'/>", escape(tap));
        x.push_str("      <model type='virtio'/>\n    </interface>\n");
        return;
    }
    let (kind, source) = match (&nic.network, &nic.bridge) {
        (Some(n), _) => ("network", format!("<source network='{}'/>", escape(n))),
        (None, Some(b)) => ("bridge", format!("<source bridge='{}'/>", escape(b))),
        (None, None) => return,
    };
    let _ = writeln!(x, "    <interface type='{kind}'>");
    let _ = writeln!(x, "      <mac address='{}'/>", escape(&nic.mac));
    let _ = writeln!(x, "      {source}");
    if let Some(v) = nic.vlan {
        let _ = writeln!(x, "      <vlan>\n        <tag id='{v}'/>\n      </vlan>");
    }
    x.push_str("      <model type='virtio'/>\n    </interface>\n");
}

/// A directory storage pool at `path`.
pub fn dir_pool_xml(name: &str, path: &Path) -> String {
    format!(
        "<pool type='dir'>\n  <name>{}</name>\n  <target>\n    <path>{}</path>\n  </target>\n</pool>\n",
        escape(name),
        esc_path(path)
    )
}

/// A sparse raw volume of `capacity_bytes`.
pub fn raw_volume_xml(name: &str, capacity_bytes: u64) -> String {
    format!(
        "<volume>\n  <name>{}</name>\n  <capacity unit='bytes'>{capacity_bytes}</capacity>\n  \
         <allocation unit='bytes'>0</allocation>\n  <target>\n    <format type='raw'/>\n  </target>\n\
         </volume>\n",
        escape(name)
    )
}

fn parse<'a>(what: &str, xml: &'a str) -> Result<roxmltree::Document<'a>, HypervisorError> {
    roxmltree::Document::parse(xml)
        .map_err(|e| HypervisorError::Invalid(format!("libvirt returned unreadable XML for {what}: {e}")))
}

/// The facts stats and jobs need from a defined domain's XML.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainFacts {
    /// Source of each disk (`file` or `dev`) with its target device name.
    pub disks: Vec<(PathBuf, String)>,
    /// MAC address of each interface.
    pub macs: Vec<String>,
}

/// Reads disks and NIC MACs from libvirt's XML of domain `name`.
pub fn domain_facts(name: &str, xml: &str) -> Result<DomainFacts, HypervisorError> {
    let doc = parse(&format!("domain {name:?}"), xml)?;
    let mut facts = DomainFacts::default();
    let Some(devices) = doc.root_element().children().find(|n| n.has_tag_name("devices")) else {
        return Ok(facts);
    };
    for dev in devices.children().filter(roxmltree::Node::is_element) {
        let child = |tag: &str| dev.children().find(|n| n.has_tag_name(tag));
        if dev.has_tag_name("disk") && dev.attribute("device").unwrap_or("disk") == "disk" {
            let source = child("source").and_then(|s| s.attribute("file").or(s.attribute("dev")));
            let target = child("target").and_then(|t| t.attribute("dev"));
            if let (Some(s), Some(t)) = (source, target) {
                facts.disks.push((PathBuf::from(s), t.to_string()));
            }
        } else if dev.has_tag_name("interface")
            && let Some(mac) = child("mac").and_then(|m| m.attribute("address"))
        {
            facts.macs.push(mac.to_string());
        }
    }
    Ok(facts)
}

/// The target path of a storage pool, from its XML.
pub fn pool_path(name: &str, xml: &str) -> Result<PathBuf, HypervisorError> {
    let doc = parse(&format!("pool {name:?}"), xml)?;
    doc.root_element()
        .children()
        .find(|n| n.has_tag_name("target"))
        .and_then(|t| t.children().find(|n| n.has_tag_name("path")))
        .and_then(|p| p.text())
        .map(|p| PathBuf::from(p.trim()))
        .ok_or_else(|| HypervisorError::Invalid(format!("pool {name:?} has no target path")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_all_markup() {
        assert_eq!(escape(r#"a&b<c>'d"e"#), "a&amp;b&lt;c&gt;&apos;d&quot;e");
    }

    #[test]
    fn macs_must_be_unicast_hex() {
        assert!(valid_mac("52:54:00:12:34:56"));
        assert!(!valid_mac("53:54:00:12:34:56"));
        assert!(!valid_mac("52:54:00:12:34"));
        assert!(!valid_mac("52:54:00:12:34:zz"));
    }

    #[test]
    fn the_disk_driver_names_the_disk_format() {
        let mut def = DomainDef {
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 256,
            disk: PathBuf::from("/nonexistent/pool/vm.img"),
            disk_format: super::super::DiskFormat::Raw,
            nics: Vec::new(),
        };
        let cfg = crate::config::LibvirtConfig::default();
        let xml = |def: &DomainDef| domain_xml(def, DomainType::Qemu, &cfg, Path::new("/n"), Path::new("/c"));
        assert!(xml(&def).contains("<driver name='qemu' type='raw' cache='none'/>"), "{}", xml(&def));
        def.disk_format = super::super::DiskFormat::Qcow2;
        assert!(xml(&def).contains("<driver name='qemu' type='qcow2' cache='none'/>"), "{}", xml(&def));
    }

    #[test]
    fn retarget_replaces_whole_paths_only() {
        let xml = "<disk><source file='/a/pool/vm.raw'/></disk><nvram>/a/nvram/vm_VARS.fd</nvram>\
                   <source file='/a/pool/vm.raw.bak'/><log file=\"/a/console/vm.log\"/>";
        let p = Path::new;
        let out = retarget(
            xml,
            &[
                (p("/a/pool/vm.raw"), p("/b/pool/vm.raw")),
                (p("/a/nvram/vm_VARS.fd"), p("/b/nvram/vm_VARS.fd")),
                (p("/a/console/vm.log"), p("/b/console/vm.log")),
            ],
        );
        assert_eq!(
            out,
            "<disk><source file='/b/pool/vm.raw'/></disk><nvram>/b/nvram/vm_VARS.fd</nvram>\
             <source file='/a/pool/vm.raw.bak'/><log file=\"/b/console/vm.log\"/>"
        );
    }
}
