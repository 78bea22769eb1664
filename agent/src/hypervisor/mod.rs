//! The hypervisor behind a trait: storage pool volumes for guest disks and domains built from a `VmSpec`.
//! The libvirt implementation (`libvirt` module, the `virt` crate) is the real one; jobs only see the trait.

use std::path::PathBuf;

pub mod detect;
pub mod libvirt;
pub mod ovs;
pub mod xml;

pub use detect::{detect_domain_type, kvm_probe_failure};
pub use libvirt::Libvirt;
pub use xml::domain_xml;
pub use xml::retarget;

/// What a domain runs on: `Kvm` when a KVM guest actually runs on this node, else `Qemu` (TCG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainType {
    Kvm,
    Qemu,
}

impl DomainType {
    /// The libvirt `<domain type=…>` value.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The hypervisor cannot be reached (libvirtd down, no URI configured).
    #[error("hypervisor unavailable ({uri}): {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("no domain named {0:?}")]
    NoDomain(String),
    #[error("no volume named {0:?} in pool {1:?}")]
    NoVolume(String, String),
    #[error("domain {name:?} is {state}: {what}")]
    WrongState { name: String, state: String, what: &'static str },
    #[error("invalid machine: {0}")]
    Invalid(String),
    /// libvirt refused an operation.
    #[error("{op}: {message}")]
    Libvirt { op: String, message: String },
    /// The node's switch (Open vSwitch, its tap devices) refused a change.
    #[error("{op}: {message}")]
    Switch { op: String, message: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A pool volume: a guest disk the hypervisor manages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub name: String,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub allocation_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub path: PathBuf,
    pub capacity_bytes: u64,
    pub allocation_bytes: u64,
    pub available_bytes: u64,
}

/// A NIC of a domain, resolved (MAC always set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicDef {
    pub network: Option<String>,
    pub bridge: Option<String>,
    pub mac: String,
    pub vlan: Option<u16>,
    /// The network's ID on this node's uplink where it differs from `vlan` (translated by the switch).
    pub uplink_vlan: Option<u16>,
    /// The tap device the agent plumbed on an Open vSwitch bridge; the domain then attaches to it.
    pub tap: Option<String>,
}

/// Everything needed to define a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDef {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The guest disk (a pool volume's path or a block device).
    pub disk: PathBuf,
    /// What the disk holds: the guest's raw disk, or a qcow2 overlay the agent made on a base.
    pub disk_format: DiskFormat,
    pub nics: Vec<NicDef>,
}

/// The format of a domain's disk. Never probed from the disk's bytes (a raw guest disk may hold anything):
/// an overlay is known from the agent's own records of the overlays it made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The files of a domain on one node besides its disk: they move with a live migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFiles {
    /// The per-VM copy of the UEFI variable store.
    pub nvram: PathBuf,
    /// The serial console's log.
    pub console: PathBuf,
    /// The UEFI firmware code.
    pub loader: PathBuf,
    /// The emulator binary.
    pub emulator: PathBuf,
}

/// Where a live migration goes: the destination's libvirt and the paths its definition uses there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LivePlan {
    /// The destination libvirtd's URI, which this node's libvirtd connects to (peer to peer).
    pub libvirt_uri: String,
    /// Where QEMU sends memory and disks (tcp://host).
    pub migration_uri: String,
    /// The guest disk there (allocated, the source's size).
    pub disk: PathBuf,
    pub files: DomainFiles,
}

/// Progress of a live migration: bytes of memory and disk processed and the total known so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveProgress {
    pub processed: u64,
    pub total: u64,
}

/// Domain state names as the contract reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainState {
    Running,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
    Suspended,
    Other,
}

impl DomainState {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "shutting-down",
            DomainState::Shutoff => "shutoff",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "suspended",
            DomainState::Other => "other",
        }
    }
}

/// Cumulative counters of one domain; rates are computed by sampling twice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DomainStats {
    pub name: String,
    pub state: String,
    pub vcpus: u32,
    /// Total guest CPU time in nanoseconds.
    pub cpu_time_ns: u64,
    pub memory_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// The operations jobs, diagnostics and stats need from a hypervisor. Calls block; run them off the async
/// runtime. Implementations reconnect by themselves when the hypervisor comes back.
pub trait Hypervisor: Send + Sync {
    /// The connection URI (for messages).
    fn uri(&self) -> String;
    /// Check the connection now; Ok with the domain type guests get.
    fn ping(&self) -> Result<DomainType, HypervisorError>;
    /// Library and hypervisor versions, e.g. "libvirt 9.0.0, QEMU 7.2.0".
    fn version(&self) -> Result<String, HypervisorError>;

    /// The storage pool for guest disks (created and started if missing).
    fn pool(&self) -> Result<PoolInfo, HypervisorError>;
    /// Create a sparse raw volume; an existing volume of that name is an error.
    fn create_volume(&self, name: &str, capacity_bytes: u64) -> Result<Volume, HypervisorError>;
    fn volume(&self, name: &str) -> Result<Option<Volume>, HypervisorError>;
    /// Grow a volume to `capacity_bytes` (never shrinks).
    fn resize_volume(&self, name: &str, capacity_bytes: u64) -> Result<Volume, HypervisorError>;
    fn delete_volume(&self, name: &str) -> Result<(), HypervisorError>;

    /// Define (or redefine) a persistent domain; copies the NVRAM template on first definition.
    fn define(&self, def: &DomainDef) -> Result<(), HypervisorError>;
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// ACPI shutdown request; returns at once.
    fn shutdown(&self, name: &str) -> Result<(), HypervisorError>;
    /// Immediate power off.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    fn reboot(&self, name: &str) -> Result<(), HypervisorError>;
    fn suspend(&self, name: &str) -> Result<(), HypervisorError>;
    fn resume(&self, name: &str) -> Result<(), HypervisorError>;
    /// Set a shut-off domain's vCPUs and memory in MiB (0 keeps one) in its persistent definition.
    fn set_resources(&self, name: &str, vcpus: u32, memory_mib: u64) -> Result<(), HypervisorError>;
    /// Remove the definition and the per-VM NVRAM; the domain must be shut off.
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// None when no such domain exists.
    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError>;
    /// The disk path of a defined domain.
    fn domain_disk(&self, name: &str) -> Result<PathBuf, HypervisorError>;
    /// Names of every defined domain.
    fn domains(&self) -> Result<Vec<String>, HypervisorError>;
    /// Stats of every domain.
    fn stats(&self) -> Result<Vec<DomainStats>, HypervisorError>;

    /// The paths a domain of this name uses on this node besides its disk.
    fn domain_files(&self, name: &str) -> DomainFiles;
    /// Migrate a running domain live to `plan`, peer to peer, copying its disk: it runs on there, defined
    /// persistently, and is left shut off (still defined) here. `watch` is called about every 250 ms with
    /// the progress; returning false aborts the migration (the domain keeps running here).
    fn migrate_live(
        &self,
        name: &str,
        plan: &LivePlan,
        watch: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<(), HypervisorError>;
    /// The downtime libvirt measured for the domain's last completed migration, in ms.
    fn migration_downtime_ms(&self, name: &str) -> Result<Option<u64>, HypervisorError>;
}
