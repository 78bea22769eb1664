//! The [`Hypervisor`] on libvirt (the `virt` crate). The connection is opened lazily and reopened after it
//! breaks, so the daemon keeps serving while libvirtd is down: calls then fail with `Unavailable`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

use super::xml::{self, DomainFacts};
use super::{
    DomainDef, DomainFiles, DomainState, DomainStats, DomainType, Hypervisor, HypervisorError, LivePlan,
    LiveProgress, PoolInfo, Volume, detect_domain_type,
};
use crate::config::{LibvirtConfig, NetworkConfig, Switch};

/// libvirt through one shared connection.
pub struct Libvirt {
    cfg: LibvirtConfig,
    state_dir: PathBuf,
    conn: Mutex<Option<Connect>>,
    /// Serializes creating the pool, so two first calls do not both define it.
    pool_setup: Mutex<()>,
    /// Set when bridge NICs go on Open vSwitch (plumbed by the agent).
    ovs: Option<super::ovs::Ovs>,
}

impl std::fmt::Debug for Libvirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libvirt").field("uri", &self.cfg.uri).field("state_dir", &self.state_dir).finish()
    }
}

/// What a libvirt error means to a caller.
enum Failure {
    /// The connection is gone or was never made.
    Connection,
    NoDomain,
    NoPool,
    NoVolume,
    VolumeExists,
    WrongState,
    Other,
}

fn classify(e: &VirtError) -> Failure {
    let code = e.code();
    if code.is_any(vec![ErrorNumber::NoConnect, ErrorNumber::InvalidConn, ErrorNumber::AuthFailed])
        || e.domain().is_any(vec![ErrorDomain::Rpc, ErrorDomain::Remote])
            && code.is_any(vec![ErrorNumber::SystemError, ErrorNumber::Rpc, ErrorNumber::InternalError])
    {
        Failure::Connection
    } else if code.is(ErrorNumber::NoDomain) {
        Failure::NoDomain
    } else if code.is(ErrorNumber::NoStoragePool) {
        Failure::NoPool
    } else if code.is(ErrorNumber::NoStorageVolume) {
        Failure::NoVolume
    } else if code.is(ErrorNumber::StorageVolExist) {
        Failure::VolumeExists
    } else if code.is(ErrorNumber::OperationInvalid) {
        Failure::WrongState
    } else {
        Failure::Other
    }
}

impl Libvirt {
    /// No connection is made here: the first call connects, and a call after a connection failure
    /// reconnects. `state_dir` holds the per-VM NVRAM copies (`nvram/`) and console logs (`console/`).
    pub fn new(cfg: &LibvirtConfig, state_dir: &Path) -> Libvirt {
        static QUIET: Once = Once::new();
        // libvirt's default error handler prints every error to stderr; ours are returned instead.
        QUIET.call_once(virt::error::clear_error_callback);
        Libvirt {
            cfg: cfg.clone(),
            state_dir: state_dir.to_path_buf(),
            conn: Mutex::new(None),
            pool_setup: Mutex::new(()),
            ovs: None,
        }
    }

    /// Bridge NICs as the node's `[network]` says: on Open vSwitch, the agent plumbs their ports.
    pub fn with_network(mut self, net: &NetworkConfig) -> Libvirt {
        self.ovs = (net.switch == Switch::Openvswitch).then(|| super::ovs::Ovs {
            rundir: net.ovs_rundir.clone(),
            uplink_bridge: net.uplink_bridge.clone(),
        });
        self
    }

    /// The per-VM copy of the OVMF variable store.
    pub fn nvram_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("nvram").join(format!("{name}_VARS.fd"))
    }

    /// The file the VM's serial console is written to.
    pub fn console_log_path(&self, name: &str) -> PathBuf {
        self.state_dir.join("console").join(format!("{name}.log"))
    }

    fn unavailable(&self, reason: String) -> HypervisorError {
        HypervisorError::Unavailable { uri: self.cfg.uri.clone(), reason }
    }

    /// The live connection, opened now if there is none or the last one died.
    fn conn(&self) -> Result<Connect, HypervisorError> {
        if self.cfg.uri.is_empty() {
            return Err(self.unavailable("no libvirt URI is configured".into()));
        }
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = guard.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            *guard = None;
        }
        let c = Connect::open(Some(&self.cfg.uri))
            .map_err(|e| self.unavailable(format!("cannot connect: {}", e.message())))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Turns a libvirt error of `op` on `subject` into ours; a broken connection is dropped so the next
    /// call reconnects.
    fn fail(&self, op: &str, subject: &str, e: VirtError) -> HypervisorError {
        match classify(&e) {
            Failure::Connection => {
                *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.unavailable(format!("{op} {subject}: {}", e.message()))
            }
            _ => HypervisorError::Libvirt { op: format!("{op} {subject}"), message: e.message().to_string() },
        }
    }

    fn domain(&self, conn: &Connect, name: &str) -> Result<Domain, HypervisorError> {
        conn.lookup_domain_by_name(name).map_err(|e| match classify(&e) {
            Failure::NoDomain => HypervisorError::NoDomain(name.to_string()),
            _ => self.fail("look up domain", name, e),
        })
    }

    /// Runs `action` (named `op`) on domain `name`; libvirt refusing it in the current state becomes
    /// `WrongState` naming that state.
    fn on_domain(
        &self,
        name: &str,
        op: &'static str,
        action: impl FnOnce(&Domain) -> Result<(), VirtError>,
    ) -> Result<(), HypervisorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, name)?;
        action(&dom).map_err(|e| match classify(&e) {
            Failure::WrongState => HypervisorError::WrongState {
                name: name.to_string(),
                state: domain_state(&dom).map_or_else(|_| "unknown".into(), |s| s.as_str().to_string()),
                what: op,
            },
            Failure::NoDomain => HypervisorError::NoDomain(name.to_string()),
            _ => self.fail(op, name, e),
        })
    }

    /// The configured pool, defined (as a dir pool at `pool_path`), built, started and set to autostart if
    /// it does not exist, and started if it is inactive.
    fn storage_pool(&self, conn: &Connect) -> Result<StoragePool, HypervisorError> {
        let name = &self.cfg.pool;
        let _setup = self.pool_setup.lock().unwrap_or_else(|p| p.into_inner());
        let pool = match conn.lookup_storage_pool_by_name(name) {
            Ok(p) => p,
            Err(e) if matches!(classify(&e), Failure::NoPool) => self.create_pool(conn)?,
            Err(e) => return Err(self.fail("look up pool", name, e)),
        };
        if !pool.is_active().map_err(|e| self.fail("check pool", name, e))? {
            pool.create(virt::sys::VIR_STORAGE_POOL_CREATE_NORMAL)
                .map_err(|e| self.fail("start pool", name, e))?;
        }
        Ok(pool)
    }

    fn create_pool(&self, conn: &Connect) -> Result<StoragePool, HypervisorError> {
        let name = &self.cfg.pool;
        if !self.cfg.pool_path.is_absolute() {
            return Err(HypervisorError::Invalid(format!(
                "pool path {} is not an absolute path",
                self.cfg.pool_path.display()
            )));
        }
        tracing::info!(pool = %name, path = %self.cfg.pool_path.display(), "creating the storage pool");
        let pool = conn
            .define_storage_pool_xml(&xml::dir_pool_xml(name, &self.cfg.pool_path), 0)
            .map_err(|e| self.fail("define pool", name, e))?;
        pool.build(0).map_err(|e| self.fail("build pool", name, e))?;
        pool.create(virt::sys::VIR_STORAGE_POOL_CREATE_NORMAL)
            .map_err(|e| self.fail("start pool", name, e))?;
        pool.set_autostart(true).map_err(|e| self.fail("set autostart of pool", name, e))?;
        Ok(pool)
    }

    fn storage_vol(&self, pool: &StoragePool, name: &str) -> Result<Option<StorageVol>, HypervisorError> {
        match pool.lookup_storage_vol_by_name(name) {
            Ok(v) => Ok(Some(v)),
            Err(e) if matches!(classify(&e), Failure::NoVolume) => Ok(None),
            Err(e) => Err(self.fail("look up volume", name, e)),
        }
    }

    fn existing_vol(&self, pool: &StoragePool, name: &str) -> Result<StorageVol, HypervisorError> {
        self.storage_vol(pool, name)?
            .ok_or_else(|| HypervisorError::NoVolume(name.to_string(), self.cfg.pool.clone()))
    }

    fn volume_of(&self, vol: &StorageVol, name: &str) -> Result<Volume, HypervisorError> {
        let info = vol.info().map_err(|e| self.fail("read volume", name, e))?;
        let path = vol.path().map_err(|e| self.fail("read path of volume", name, e))?;
        Ok(Volume {
            name: name.to_string(),
            path: PathBuf::from(path),
            capacity_bytes: info.capacity,
            allocation_bytes: info.allocation,
        })
    }

    fn facts(&self, dom: &Domain, name: &str) -> Result<DomainFacts, HypervisorError> {
        let desc = dom.xml_desc(0).map_err(|e| self.fail("read XML of domain", name, e))?;
        xml::domain_facts(name, &desc)
    }

    fn domain_stats(&self, dom: &Domain) -> Result<DomainStats, HypervisorError> {
        let name = dom.name().map_err(|e| self.fail("read name of domain", "", e))?;
        let info = dom.info().map_err(|e| self.fail("read info of domain", &name, e))?;
        let state = map_state(info.state);
        let mut stats = DomainStats {
            state: state.as_str().to_string(),
            vcpus: info.nr_virt_cpu,
            cpu_time_ns: info.cpu_time,
            memory_bytes: info.memory.saturating_mul(1024),
            ..Default::default()
        };
        // Block and interface counters exist only while the domain runs.
        if matches!(state, DomainState::Running | DomainState::Paused) {
            let facts = self.facts(dom, &name)?;
            for (_, target) in &facts.disks {
                let b =
                    dom.block_stats(target).map_err(|e| self.fail("read disk stats of domain", &name, e))?;
                stats.disk_read_bytes += counter(b.rd_bytes);
                stats.disk_write_bytes += counter(b.wr_bytes);
            }
            for mac in &facts.macs {
                let n =
                    dom.interface_stats(mac).map_err(|e| self.fail("read NIC stats of domain", &name, e))?;
                stats.net_rx_bytes += counter(n.rx_bytes);
                stats.net_tx_bytes += counter(n.tx_bytes);
            }
        }
        stats.name = name;
        Ok(stats)
    }
}

/// libvirt encodes versions as major * 1_000_000 + minor * 1000 + release.
fn dotted_version(v: u32) -> String {
    format!("{}.{}.{}", v / 1_000_000, v / 1000 % 1000, v % 1000)
}

/// libvirt reports an unsupported counter as -1.
fn counter(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn map_state(s: virt::domain::DomainStateEnum) -> DomainState {
    use virt::domain::DomainState as S;
    match s.unwrap_or(S::NoState) {
        S::Running | S::Blocked => DomainState::Running,
        S::Paused => DomainState::Paused,
        S::Shutdown => DomainState::ShuttingDown,
        S::Shutoff => DomainState::Shutoff,
        S::Crashed => DomainState::Crashed,
        S::PMSuspended => DomainState::Suspended,
        S::NoState => DomainState::Other,
    }
}

fn domain_state(dom: &Domain) -> Result<DomainState, VirtError> {
    dom.state().map(|(s, _)| map_state(s))
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> HypervisorError {
    move |source| HypervisorError::Io { what, source }
}

fn remove_if_present(path: &Path) -> Result<(), HypervisorError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(HypervisorError::Io { what: format!("removing {}", path.display()), source: e })
        }
        _ => Ok(()),
    }
}

impl Hypervisor for Libvirt {
    fn uri(&self) -> String {
        self.cfg.uri.clone()
    }

    fn ping(&self) -> Result<DomainType, HypervisorError> {
        let conn = self.conn()?;
        conn.lib_version().map_err(|e| self.fail("ping", "libvirt", e))?;
        Ok(detect_domain_type(&self.cfg))
    }

    fn version(&self) -> Result<String, HypervisorError> {
        let conn = self.conn()?;
        let lib = conn.lib_version().map_err(|e| self.fail("read version of", "libvirt", e))?;
        let driver = conn.driver_type().map_err(|e| self.fail("read driver type of", "libvirt", e))?;
        let hyp = conn.hyp_version().map_err(|e| self.fail("read hypervisor version of", "libvirt", e))?;
        Ok(format!("libvirt {}, {driver} {}", dotted_version(lib), dotted_version(hyp)))
    }

    fn pool(&self) -> Result<PoolInfo, HypervisorError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let name = &self.cfg.pool;
        pool.refresh(0).map_err(|e| self.fail("refresh pool", name, e))?;
        let info = pool.info().map_err(|e| self.fail("read pool", name, e))?;
        let desc = pool.xml_desc(0).map_err(|e| self.fail("read XML of pool", name, e))?;
        Ok(PoolInfo {
            name: name.clone(),
            path: xml::pool_path(name, &desc)?,
            capacity_bytes: info.capacity,
            allocation_bytes: info.allocation,
            available_bytes: info.available,
        })
    }

    fn create_volume(&self, name: &str, capacity_bytes: u64) -> Result<Volume, HypervisorError> {
        xml::check_name("volume", name)?;
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let vol =
            StorageVol::create_xml(&pool, &xml::raw_volume_xml(name, capacity_bytes), 0).map_err(|e| {
                match classify(&e) {
                    Failure::VolumeExists => HypervisorError::Invalid(format!(
                        "volume {name:?} already exists in pool {:?}",
                        self.cfg.pool
                    )),
                    _ => self.fail("create volume", name, e),
                }
            })?;
        self.volume_of(&vol, name)
    }

    fn volume(&self, name: &str) -> Result<Option<Volume>, HypervisorError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        self.storage_vol(&pool, name)?.map(|v| self.volume_of(&v, name)).transpose()
    }

    fn resize_volume(&self, name: &str, capacity_bytes: u64) -> Result<Volume, HypervisorError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let vol = self.existing_vol(&pool, name)?;
        let current = self.volume_of(&vol, name)?;
        if capacity_bytes < current.capacity_bytes {
            return Err(HypervisorError::Invalid(format!(
                "volume {name:?} is {} bytes; shrinking it to {capacity_bytes} bytes is refused",
                current.capacity_bytes
            )));
        }
        if capacity_bytes == current.capacity_bytes {
            return Ok(current);
        }
        vol.resize(capacity_bytes, 0).map_err(|e| self.fail("resize volume", name, e))?;
        self.volume_of(&vol, name)
    }

    fn delete_volume(&self, name: &str) -> Result<(), HypervisorError> {
        let conn = self.conn()?;
        let pool = self.storage_pool(&conn)?;
        let vol = self.existing_vol(&pool, name)?;
        vol.delete(0).map_err(|e| self.fail("delete volume", name, e))
    }

    fn define(&self, def: &DomainDef) -> Result<(), HypervisorError> {
        xml::validate_def(def)?;
        let conn = self.conn()?;
        let nvram = self.nvram_path(&def.name);
        let console = self.console_log_path(&def.name);
        for dir in [nvram.parent(), console.parent()].into_iter().flatten() {
            std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        let fresh_nvram = !nvram.exists();
        if fresh_nvram {
            std::fs::copy(&self.cfg.ovmf_vars, &nvram).map_err(io_err(format!(
                "copying the NVRAM template {} to {}",
                self.cfg.ovmf_vars.display(),
                nvram.display()
            )))?;
        }
        let uuid = match conn.lookup_domain_by_name(&def.name) {
            Ok(existing) => {
                Some(existing.uuid_string().map_err(|e| self.fail("read UUID of domain", &def.name, e))?)
            }
            Err(e) if matches!(classify(&e), Failure::NoDomain) => None,
            Err(e) => return Err(self.fail("look up domain", &def.name, e)),
        };
        let ty = detect_domain_type(&self.cfg);
        let plumbed;
        let def = match &self.ovs {
            Some(ovs) => {
                let nics = ovs.attach(&def.name, &def.nics).inspect_err(|_| {
                    let _ = ovs.detach(&def.name);
                })?;
                plumbed = DomainDef { nics, ..def.clone() };
                &plumbed
            }
            None => def,
        };
        let desc = xml::domain_xml_with_uuid(def, ty, &self.cfg, &nvram, &console, uuid.as_deref());
        if let Err(e) = conn.define_domain_xml(&desc) {
            if fresh_nvram {
                let _ = std::fs::remove_file(&nvram);
            }
            if uuid.is_none()
                && let Some(ovs) = &self.ovs
            {
                let _ = ovs.detach(&def.name);
            }
            return Err(self.fail("define domain", &def.name, e));
        }
        Ok(())
    }

    fn set_resources(&self, name: &str, vcpus: u32, memory_mib: u64) -> Result<(), HypervisorError> {
        if let Some(state) = self.state(name)?
            && state != DomainState::Shutoff
        {
            return Err(HypervisorError::WrongState {
                name: name.to_string(),
                state: state.as_str().to_string(),
                what: "set vCPUs and memory of",
            });
        }
        self.on_domain(name, "set vCPUs and memory of", |d| {
            let config = virt::sys::VIR_DOMAIN_AFFECT_CONFIG;
            if vcpus > 0 {
                // The maximum first: a count above the current maximum is refused.
                d.set_vcpus_flags(vcpus, config | virt::sys::VIR_DOMAIN_VCPU_MAXIMUM)?;
                d.set_vcpus_flags(vcpus, config)?;
            }
            if memory_mib > 0 {
                let kib = memory_mib * 1024;
                d.set_memory_flags(kib, config | virt::sys::VIR_DOMAIN_MEM_MAXIMUM)?;
                d.set_memory_flags(kib, config)?;
            }
            Ok(())
        })
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "start", |d| d.create())
    }

    fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "shut down", |d| d.shutdown())
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "destroy", |d| d.destroy())
    }

    fn reboot(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "reboot", |d| d.reboot(virt::sys::VIR_DOMAIN_REBOOT_DEFAULT))
    }

    fn suspend(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "suspend", |d| d.suspend())
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "resume", |d| d.resume())
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, name)?;
        let state = domain_state(&dom).map_err(|e| self.fail("read state of domain", name, e))?;
        if state != DomainState::Shutoff {
            return Err(HypervisorError::WrongState {
                name: name.to_string(),
                state: state.as_str().to_string(),
                what: "undefine needs a shut-off domain",
            });
        }
        // Drivers without NVRAM support (e.g. the test driver) reject the flag; the file is ours to remove.
        dom.undefine_flags(virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM)
            .or_else(|e| if e.code().is(ErrorNumber::InvalidArg) { dom.undefine() } else { Err(e) })
            .map_err(|e| self.fail("undefine domain", name, e))?;
        if let Some(ovs) = &self.ovs {
            ovs.detach(name)?;
        }
        remove_if_present(&self.nvram_path(name))?;
        remove_if_present(&self.console_log_path(name))
    }

    fn state(&self, name: &str) -> Result<Option<DomainState>, HypervisorError> {
        let conn = self.conn()?;
        let dom = match self.domain(&conn, name) {
            Ok(d) => d,
            Err(HypervisorError::NoDomain(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        domain_state(&dom).map(Some).map_err(|e| self.fail("read state of domain", name, e))
    }

    fn domain_disk(&self, name: &str) -> Result<PathBuf, HypervisorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, name)?;
        let facts = self.facts(&dom, name)?;
        facts
            .disks
            .into_iter()
            .find(|(_, target)| target == xml::DISK_TARGET)
            .map(|(path, _)| path)
            .ok_or_else(|| {
                HypervisorError::Invalid(format!("domain {name:?} has no disk {}", xml::DISK_TARGET))
            })
    }

    fn domains(&self) -> Result<Vec<String>, HypervisorError> {
        let conn = self.conn()?;
        let domains = conn.list_all_domains(0).map_err(|e| self.fail("list", "domains", e))?;
        // A domain undefined while we read it has no name any more: it is simply left out.
        Ok(domains.iter().filter_map(|d| d.name().ok()).collect())
    }

    fn stats(&self) -> Result<Vec<DomainStats>, HypervisorError> {
        let conn = self.conn()?;
        let domains = conn.list_all_domains(0).map_err(|e| self.fail("list", "domains", e))?;
        let mut all = Vec::with_capacity(domains.len());
        for dom in &domains {
            match self.domain_stats(dom) {
                Ok(s) => all.push(s),
                // A domain undefined or stopped while we read it is simply left out.
                Err(HypervisorError::Libvirt { .. } | HypervisorError::NoDomain(_))
                    if !dom.is_active().unwrap_or(false) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(all)
    }

    fn domain_files(&self, name: &str) -> DomainFiles {
        DomainFiles {
            nvram: self.nvram_path(name),
            console: self.console_log_path(name),
            loader: self.cfg.ovmf_code.clone(),
            emulator: self.cfg.emulator.clone(),
        }
    }

    fn migrate_live(
        &self,
        name: &str,
        plan: &LivePlan,
        watch: &mut dyn FnMut(LiveProgress) -> bool,
    ) -> Result<(), HypervisorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, name)?;
        let source = dom
            .xml_desc(virt::sys::VIR_DOMAIN_XML_MIGRATABLE | virt::sys::VIR_DOMAIN_XML_SECURE)
            .map_err(|e| self.fail("read the definition of domain", name, e))?;
        let disk = self.domain_disk(name)?;
        let ours = self.domain_files(name);
        let dest_xml = xml::retarget(
            &source,
            &[
                (&disk, &plan.disk),
                (&ours.nvram, &plan.files.nvram),
                (&ours.console, &plan.files.console),
                (&ours.loader, &plan.files.loader),
                (&ours.emulator, &plan.files.emulator),
            ],
        );
        let params = virt::domain::MigrateParameters {
            dest_xml: Some(dest_xml.clone()),
            persist_xml: Some(dest_xml),
            uri: Some(plan.migration_uri.clone()),
            migrate_disks: vec![xml::DISK_TARGET.to_string()],
            ..Default::default()
        };
        let flags = virt::sys::VIR_MIGRATE_LIVE
            | virt::sys::VIR_MIGRATE_PEER2PEER
            | virt::sys::VIR_MIGRATE_NON_SHARED_DISK
            | virt::sys::VIR_MIGRATE_PERSIST_DEST
            | virt::sys::VIR_MIGRATE_ABORT_ON_ERROR;
        let migrated = std::thread::scope(|scope| {
            let call = scope.spawn(|| dom.migrate_to_uri3(Some(&plan.libvirt_uri), params, flags));
            let mut aborted = false;
            while !call.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(250));
                let progress = dom.job_stats(0).map(|j| LiveProgress {
                    processed: j.data_processed.unwrap_or(0),
                    total: j.data_total.unwrap_or(0),
                });
                if !aborted && !watch(progress.unwrap_or_default()) {
                    aborted = true;
                    // SAFETY: `dom` is a live domain handle for the whole call (borrowed, not freed), and
                    // virDomainAbortJob only reads it; libvirt allows it while another thread migrates.
                    unsafe {
                        virt::sys::virDomainAbortJob(dom.as_ptr());
                    }
                }
            }
            call.join()
        });
        match migrated {
            // An error reaching the destination is not one of this node's connection: it stays.
            Ok(result) => result.map_err(|e| HypervisorError::Libvirt {
                op: format!("migrate domain {name} to {}", plan.libvirt_uri),
                message: e.message().to_string(),
            }),
            Err(_) => Err(HypervisorError::Libvirt {
                op: format!("migrate domain {name}"),
                message: "the migration thread panicked".into(),
            }),
        }
    }

    fn migration_downtime_ms(&self, name: &str) -> Result<Option<u64>, HypervisorError> {
        let conn = self.conn()?;
        let dom = self.domain(&conn, name)?;
        let stats = dom
            .job_stats(virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED)
            .map_err(|e| self.fail("read the completed job of domain", name, e))?;
        Ok(stats.downtime)
    }
}
