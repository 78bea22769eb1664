//! The daemon's configuration: one TOML file (default `/etc/gridforge/agent.toml`). Every setting has a
//! default suited to a node; `docs/agent-config.toml` is the annotated reference.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gridforge_common::tls::TlsFiles;
use serde::Deserialize;

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/gridforge/agent.toml";

pub use gridforge_common::config::ConfigError;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node name reported in diagnostics and wipe reports (default: the host name).
    pub node_name: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address; empty disables it.
    #[serde(deserialize_with = "empty_is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Journal and per-job state (`journal.redb`, wipe signing key, NVRAM copies, console logs).
    pub state_dir: PathBuf,
    /// Content-addressed image blob cache.
    pub cache_dir: PathBuf,
    /// Staging trees for provisions (must keep ownership and modes: not FAT or NFS).
    pub work_dir: PathBuf,
    /// Mutual TLS of the gRPC service: `ca` is the CA whose certificates clients must present (the
    /// coordinator's CA), `cert` and `key` the agent's certificate chain and key.
    #[serde(deserialize_with = "tls_files")]
    pub tls: TlsFiles,
    pub images: ImagesConfig,
    pub libvirt: LibvirtConfig,
    pub network: NetworkConfig,
    pub jobs: JobsConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Image store: a directory or http(s):// base URL holding index.json and index.json.sig.
    pub store: String,
    /// Trusted ed25519 public key of the store (base64, or a path to a .pub file).
    pub trusted_key: String,
    /// Accept unsigned indexes. Development only.
    pub insecure_images: bool,
    /// Writable directory store that Snapshot jobs publish to (empty: snapshots are refused).
    pub snapshot_store: PathBuf,
    /// ed25519 signing key for the snapshot store's index (as `gridforge-agent image keygen` writes it).
    pub snapshot_signing_key: PathBuf,
    /// systemd-boot EFI binary for images that do not carry one.
    pub efi_binary: Option<PathBuf>,
    /// How provisions whose spec names no mode make disks: "full" (unpack and write every file system) or
    /// "cached" (clone a prepared base disk per image and layout, kept in `bases_dir`).
    pub provision_mode: String,
    /// Where cached provisions keep their base disks: on the pool's file system, so that clones are reflinks
    /// where it supports them (btrfs, xfs), but not inside the pool directory (libvirt would list it).
    pub bases_dir: PathBuf,
    /// How cached provisions clone the base onto a disk file where the pool's file system cannot share
    /// extents: "copy" (a raw copy of the base's allocated extents) or "overlay" (a qcow2 overlay on the
    /// base, holding only what the VM changes).
    pub clone_fallback: String,
}

impl ImagesConfig {
    /// The mode of provisions whose spec names none (checked at load: "full" or "cached").
    pub fn default_provision_mode(&self) -> gridforge_proto::v1::ProvisionMode {
        use gridforge_proto::v1::ProvisionMode;
        if self.provision_mode == "cached" {
            ProvisionMode::ProvisionCached
        } else {
            ProvisionMode::ProvisionFull
        }
    }

    /// How cached provisions clone where reflinks cannot be made (checked at load).
    pub fn clone_fallback(&self) -> crate::provision::CloneFallback {
        crate::provision::CloneFallback::parse(&self.clone_fallback).unwrap_or_default()
    }

    /// How the store's index is checked: the trusted key, or no check where `insecure_images` allows it.
    pub fn trust(&self) -> Result<crate::image::Trust, UntrustedStore> {
        if !self.trusted_key.is_empty() {
            return crate::image::sign::parse_trusted_key(&self.trusted_key)
                .map(crate::image::Trust::Key)
                .map_err(UntrustedStore::Key);
        }
        if self.insecure_images { Ok(crate::image::Trust::Insecure) } else { Err(UntrustedStore::NoKey) }
    }
}

/// Why the image store cannot be trusted as configured.
#[derive(Debug, thiserror::Error)]
pub enum UntrustedStore {
    #[error("images.trusted_key")]
    Key(#[source] crate::image::ImageError),
    #[error("no trusted key configured (images.trusted_key)")]
    NoKey,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// libvirt connection URI; empty disables the hypervisor (disk-only node, e.g. a utility VM).
    pub uri: String,
    /// Storage pool for guest disks (a dir pool, created if missing).
    pub pool: String,
    /// Directory of the pool when the agent creates it.
    pub pool_path: PathBuf,
    /// Domain type: "auto" (kvm when a KVM guest actually runs, else qemu/TCG), "kvm" or "qemu".
    pub domain_type: String,
    /// OVMF firmware code and the NVRAM template copied per VM.
    pub ovmf_code: PathBuf,
    pub ovmf_vars: PathBuf,
    /// Emulator binary for domains.
    pub emulator: PathBuf,
    /// The URI other nodes' libvirtd use to reach this node's libvirtd for a live migration (peer to peer),
    /// e.g. "qemu+tls://node-1.example/system"; empty: this node takes no live migrations.
    pub peer_uri: String,
    /// Host (name or address) other nodes' QEMU send a live migration's memory and disk streams to;
    /// empty: the host of `peer_uri`.
    pub migration_address: String,
}

/// How NICs on a bridge reach it.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// libvirt attaches the NIC to a Linux bridge (with a VLAN tag only where the bridge filters VLANs).
    #[default]
    Linux,
    /// The agent plumbs a tap per NIC on an Open vSwitch bridge, as an access port with the NIC's tag, and
    /// applies uplink VLAN translations on `uplink_bridge`.
    Openvswitch,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub switch: Switch,
    /// Open vSwitch's run directory (its db.sock and the bridges' management sockets).
    pub ovs_rundir: PathBuf,
    /// The Open vSwitch bridge that holds the node's physical uplink, patched to the tenant bridge; VLAN
    /// translations go on it. Empty: NICs with an uplink translation are refused on this node.
    pub uplink_bridge: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            switch: Switch::Linux,
            ovs_rundir: PathBuf::from("/run/openvswitch"),
            uplink_bridge: String::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs doing disk I/O at once (Provision, Wipe, Resize, Snapshot, Delete); others wait queued.
    pub max_io_jobs: usize,
    /// Finished jobs are kept in the journal this long, then forgotten.
    pub retention_hours: u64,
    /// Block devices or files outside the pool that jobs may target, e.g. ["/dev/vdb"].
    pub devices: Vec<PathBuf>,
    /// Wipe method of Delete jobs and of Wipe jobs that name none.
    pub default_wipe_method: String,
    /// ed25519 key that signs wipe reports (created on first use).
    pub report_signing_key: PathBuf,
    /// Largest accepted request in bytes.
    pub max_request_bytes: usize,
    /// On stop (SIGTERM), how long running jobs may go on to finish before they are cancelled at a safe
    /// point and recorded INTERRUPTED.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        let state_dir = PathBuf::from("/var/lib/gridforge-agent");
        Self {
            node_name: host_name(),
            listen: "0.0.0.0:7443".parse().expect("valid address"),
            metrics_listen: Some("127.0.0.1:9464".parse().expect("valid address")),
            cache_dir: PathBuf::from("/var/cache/gridforge-agent"),
            work_dir: state_dir.join("work"),
            tls: default_tls(),
            images: ImagesConfig::default(),
            libvirt: LibvirtConfig::default(),
            network: NetworkConfig::default(),
            jobs: JobsConfig {
                report_signing_key: state_dir.join("report-signing.key"),
                ..Default::default()
            },
            state_dir,
        }
    }
}

impl Default for ImagesConfig {
    fn default() -> Self {
        Self {
            store: String::new(),
            trusted_key: String::new(),
            insecure_images: false,
            snapshot_store: PathBuf::new(),
            snapshot_signing_key: PathBuf::new(),
            efi_binary: None,
            provision_mode: "full".to_string(),
            bases_dir: PathBuf::from("/var/lib/gridforge-agent/bases"),
            clone_fallback: "copy".to_string(),
        }
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        Self {
            uri: "qemu:///system".to_string(),
            pool: "gridforge".to_string(),
            pool_path: PathBuf::from("/var/lib/gridforge-agent/pool"),
            domain_type: "auto".to_string(),
            ovmf_code: PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            ovmf_vars: PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"),
            emulator: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            peer_uri: String::new(),
            migration_address: String::new(),
        }
    }
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_io_jobs: 4,
            retention_hours: 168,
            devices: Vec::new(),
            default_wipe_method: "zero".to_string(),
            report_signing_key: PathBuf::from("/var/lib/gridforge-agent/report-signing.key"),
            max_request_bytes: 4 << 20,
            shutdown_grace_secs: 30,
        }
    }
}

impl Config {
    /// Read and check a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        gridforge_common::config::load(path, Self::parse)
    }

    /// Parse configuration text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = gridforge_common::config::parse_toml(text, path)?;
        let invalid = |field: &str, reason: &str| ConfigError::invalid(path, field, reason);
        if cfg.jobs.max_io_jobs == 0 {
            return Err(invalid("jobs.max_io_jobs", "must be at least 1"));
        }
        if !matches!(cfg.libvirt.domain_type.as_str(), "auto" | "kvm" | "qemu") {
            return Err(invalid("libvirt.domain_type", "must be \"auto\", \"kvm\" or \"qemu\""));
        }
        if !matches!(cfg.images.provision_mode.as_str(), "full" | "cached") {
            return Err(invalid("images.provision_mode", "must be \"full\" or \"cached\""));
        }
        if crate::provision::CloneFallback::parse(&cfg.images.clone_fallback).is_none() {
            return Err(invalid("images.clone_fallback", "must be \"copy\" or \"overlay\""));
        }
        if cfg.images.store.is_empty() && !cfg.images.trusted_key.is_empty() {
            return Err(invalid("images.trusted_key", "set without images.store"));
        }
        if !cfg.images.store.is_empty() && cfg.images.trusted_key.is_empty() && !cfg.images.insecure_images {
            return Err(invalid("images.trusted_key", "required for a store unless insecure_images = true"));
        }
        if !cfg.libvirt.peer_uri.is_empty() && uri_host(&cfg.libvirt.peer_uri).is_none() {
            return Err(invalid(
                "libvirt.peer_uri",
                "must name a host, e.g. qemu+tls://node-1.example/system",
            ));
        }
        for d in &cfg.jobs.devices {
            if !d.is_absolute() {
                return Err(invalid("jobs.devices", &format!("{} is not an absolute path", d.display())));
            }
        }
        Ok(cfg)
    }

    /// The redb job journal.
    pub fn journal_path(&self) -> PathBuf {
        self.state_dir.join("journal.redb")
    }

    /// The highest coordinator leader term the job engine has taken jobs from.
    pub fn leader_term_path(&self) -> PathBuf {
        self.state_dir.join("leader-term")
    }
}

/// How other nodes reach this node for a live migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveEndpoint {
    /// libvirt's URI (peer to peer).
    pub libvirt_uri: String,
    /// QEMU's migration and disk streams: tcp://host.
    pub migration_uri: String,
}

impl LibvirtConfig {
    /// Where this node takes live migrations: None without `peer_uri`, or on libvirt's test driver (its
    /// domains run nothing that could move).
    pub fn live_endpoint(&self) -> Option<LiveEndpoint> {
        if self.peer_uri.is_empty() || self.uri.is_empty() || self.uri.starts_with("test:") {
            return None;
        }
        let host = if self.migration_address.is_empty() {
            uri_host(&self.peer_uri)?.to_string()
        } else {
            self.migration_address.clone()
        };
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
        Some(LiveEndpoint { libvirt_uri: self.peer_uri.clone(), migration_uri: format!("tcp://{host}") })
    }
}

/// The host of a URI such as qemu+tls://host:port/system (brackets kept around an IPv6 address).
fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if authority.starts_with('[') {
        &authority[..=authority.find(']')?]
    } else {
        authority.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// `/etc/gridforge/tls/ca.pem`, `agent.pem` and `agent.key`.
fn default_tls() -> TlsFiles {
    TlsFiles::in_dir(Path::new("/etc/gridforge/tls"), "agent")
}

/// The `[tls]` table over the agent's defaults.
fn tls_files<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TlsFiles, D::Error> {
    TlsFiles::deserialize_or(d, default_tls())
}

/// An address, or none for an empty string.
fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() { Ok(None) } else { text.parse().map(Some).map_err(serde::de::Error::custom) }
}

fn host_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_endpoint_comes_from_peer_uri_or_migration_address() {
        let mut cfg = LibvirtConfig::default();
        assert_eq!(cfg.live_endpoint(), None, "no peer_uri: cold only");
        cfg.peer_uri = "qemu+tls://node-1.example:16514/system".into();
        let live = cfg.live_endpoint().unwrap();
        assert_eq!(live.libvirt_uri, "qemu+tls://node-1.example:16514/system");
        assert_eq!(live.migration_uri, "tcp://node-1.example");
        cfg.migration_address = "fd00::7".into();
        assert_eq!(cfg.live_endpoint().unwrap().migration_uri, "tcp://[fd00::7]");
        cfg.uri = "test:///default".into();
        assert_eq!(cfg.live_endpoint(), None, "the test driver runs no guests");
        assert_eq!(uri_host("qemu+tcp://[fd00::1]:16509/system"), Some("[fd00::1]"));
        assert_eq!(uri_host("qemu+ssh://root@h/system"), Some("h"));
        assert_eq!(uri_host("qemu:///system"), None);
    }
}
