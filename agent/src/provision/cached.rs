//! Cached provisions: one prepared base disk per image version and layout, and per VM a clone of it.
//!
//! The base is made the first time a cached provision needs it, exactly as a full provision makes a disk
//! (the image unpacked as it is, without the VM's customization), checked with `e2fsck -fn` and kept
//! read-only in the base store. A VM's disk is then a clone of the base: a reflink where the pool's file
//! system shares extents (btrfs, xfs), else a copy of the base's allocated extents. On the clone every
//! identifier the base would share is made fresh (GPT disk and partition GUIDs, file system UUIDs and the
//! FAT volume id, the machine-id), the boot entry names the new root UUID, and the VM's customization is
//! applied in place to the clone's root file system.
//!
//! The store, one directory per base:
//!
//! ```text
//! <bases>/<id>/disk.raw       the base disk, mode 0444
//! <bases>/<id>/base.json      what it was made from, and its identifiers
//! <bases>/<id>/clones/<hash>  one per disk cloned from it: the disk's path and its GPT disk GUID
//! <bases>/<id>.lock           shared while a base is cloned, exclusive while it is made or deleted
//! ```
//!
//! A clone record counts while its disk still carries the GUID it was given (a disk wiped, deleted or
//! provisioned again no longer does), so the count cannot go stale; deleting a base is refused while it
//! is above zero.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use gridforge_common::progress::Progress;
use gridforge_proto::v1::{
    Customization, DiskLayout, Filesystem, PartitionResult, ProvisionResult, error::Code, partition::Role,
};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ProvisionError, ProvisionRequest, RemoveOnDrop, partition_result, plan_layout, write_fstab};
use crate::block::{BlockTarget, CloneMethod, TargetKind, TargetOptions, overlay};
use crate::customize;
use crate::fs::{FsError, FsInfo, ext4, swap, vfat};
use crate::image::index::IndexEntry;
use crate::partition;

/// The loader entry `customize::boot::install_boot` writes, relative to the ESP root.
const LOADER_ENTRY: &str = "loader/entries/gridforge.conf";

#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("base {id} is in use by {count} disk(s), e.g. {first}: delete or wipe those first")]
    InUse { id: String, count: usize, first: PathBuf },
    #[error("no base {0} in the store")]
    NotFound(String),
    #[error("base {id} is damaged: {reason}")]
    Damaged { id: String, reason: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> BaseError {
    let context = context.into();
    move |source| BaseError::Io { context, source }
}

/// How a cached provision clones the base onto a regular file where the pool's file system cannot share
/// extents (reflinks are used wherever it can).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CloneFallback {
    /// A copy of the base's allocated extents: a raw disk of its own.
    #[default]
    Copy,
    /// A qcow2 overlay on the base ([`overlay`]): holds only what the VM changes, and needs the base on
    /// this node for as long as it lives.
    Overlay,
}

impl CloneFallback {
    /// "copy" or "overlay", as the agent's config and CLI name it.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "copy" => Some(Self::Copy),
            "overlay" => Some(Self::Overlay),
            _ => None,
        }
    }
}

/// What a base was made from and the identifiers its clones replace.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BaseInfo {
    pub id: String,
    /// `name:version` of the OS image, then of each layer.
    pub images: Vec<String>,
    pub image_digests: Vec<String>,
    pub disk_size_bytes: u64,
    pub sector_size: u32,
    /// The root file system's UUID in the base (named by its boot entry).
    pub root_uuid: String,
    /// The partitions as the base's GPT holds them: (number, offset, size) in bytes.
    pub partitions: Vec<(u32, u64, u64)>,
}

/// A base with its number of disks cloned from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseEntry {
    pub info: BaseInfo,
    pub clones: Vec<PathBuf>,
    pub path: PathBuf,
    /// Bytes the base's disk took on its file system when the entry was read.
    pub allocated_bytes: u64,
}

impl BaseEntry {
    fn new(info: BaseInfo, clones: Vec<PathBuf>, path: PathBuf) -> Self {
        use std::os::unix::fs::MetadataExt;
        let allocated_bytes = fs::metadata(&path).map_or(0, |m| m.blocks() * 512);
        Self { info, clones, path, allocated_bytes }
    }

    /// As the agent's API reports it.
    pub fn to_proto(&self) -> gridforge_proto::v1::BaseDisk {
        gridforge_proto::v1::BaseDisk {
            id: self.info.id.clone(),
            images: self.info.images.clone(),
            disk_size_bytes: self.info.disk_size_bytes,
            allocated_bytes: self.allocated_bytes,
            clones: self.clones.iter().map(|c| c.display().to_string()).collect(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CloneRecord {
    path: PathBuf,
    disk_guid: String,
    sector_size: u32,
    /// The disk is a qcow2 overlay on the base (else a raw disk).
    #[serde(default)]
    overlay: bool,
}

/// The base disks of this agent.
#[derive(Clone, Debug)]
pub struct BaseStore {
    dir: PathBuf,
}

impl BaseStore {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    fn base_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn lock(&self, id: &str, arg: FlockArg) -> Result<Flock<File>, BaseError> {
        fs::create_dir_all(&self.dir).map_err(io_err(format!("creating {}", self.dir.display())))?;
        let path = self.dir.join(format!("{id}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        Flock::lock(file, arg).map_err(|(_, errno)| BaseError::Io {
            context: format!("locking {}", path.display()),
            source: errno.into(),
        })
    }

    /// The base `id`, if the store holds a complete one.
    fn load(&self, id: &str) -> Result<Option<BaseEntry>, BaseError> {
        let dir = self.base_dir(id);
        let text = match fs::read_to_string(dir.join("base.json")) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading base {id}"))(e)),
        };
        let info: BaseInfo = serde_json::from_str(&text)
            .map_err(|e| BaseError::Damaged { id: id.to_string(), reason: format!("base.json: {e}") })?;
        let clones = self.live_clones(id)?;
        Ok(Some(BaseEntry::new(info, clones, dir.join("disk.raw"))))
    }

    /// Every base in the store, with the disks cloned from it.
    pub fn list(&self) -> Result<Vec<BaseEntry>, BaseError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("listing {}", self.dir.display()))(e)),
        };
        let mut bases = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", self.dir.display())))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if name.starts_with('.') || name.ends_with(".lock") {
                continue;
            }
            if let Some(base) = self.load(&name)? {
                bases.push(base);
            }
        }
        bases.sort_by(|a, b| a.info.id.cmp(&b.info.id));
        Ok(bases)
    }

    /// Deletes base `id`; refused while any disk cloned from it still holds its clone. Returns the base as
    /// it was.
    pub fn delete(&self, id: &str) -> Result<BaseEntry, BaseError> {
        if id.is_empty() || id.contains(['/', '.']) {
            return Err(BaseError::NotFound(id.to_string()));
        }
        let _lock = self.lock(id, FlockArg::LockExclusive)?;
        let base = self.load(id)?.ok_or_else(|| BaseError::NotFound(id.to_string()))?;
        if let Some(first) = base.clones.first() {
            return Err(BaseError::InUse {
                id: id.to_string(),
                count: base.clones.len(),
                first: first.clone(),
            });
        }
        // Out of the store's sight first, so that an interruption never leaves half a base listed.
        let (dir, gone) = (self.base_dir(id), self.dir.join(format!(".delete-{id}")));
        let _ = fs::remove_dir_all(&gone);
        fs::rename(&dir, &gone).map_err(io_err(format!("moving {} aside", dir.display())))?;
        fs::remove_dir_all(&gone).map_err(io_err(format!("removing {}", gone.display())))?;
        let _ = fs::remove_file(self.dir.join(format!("{id}.lock")));
        Ok(base)
    }

    /// The disks that still hold a clone of base `id`; records of the others are dropped.
    fn live_clones(&self, id: &str) -> Result<Vec<PathBuf>, BaseError> {
        let base = self.base_dir(id).join("disk.raw");
        let dir = self.base_dir(id).join("clones");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(format!("listing {}", dir.display()))(e)),
        };
        let mut live = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", dir.display())))?;
            let record: Option<CloneRecord> =
                fs::read_to_string(entry.path()).ok().and_then(|t| serde_json::from_str(&t).ok());
            match record {
                Some(r) if holds_clone(&r, &base) => live.push(r.path),
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        live.sort();
        Ok(live)
    }

    fn record_clone(
        &self,
        id: &str,
        disk: &Path,
        disk_guid: &str,
        sector_size: u32,
        overlay: bool,
    ) -> Result<(), BaseError> {
        let dir = self.base_dir(id).join("clones");
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let record =
            CloneRecord { path: disk.to_path_buf(), disk_guid: disk_guid.to_string(), sector_size, overlay };
        let path = dir.join(record_name(disk));
        fs::write(&path, serde_json::to_vec(&record).expect("serializes"))
            .map_err(io_err(format!("writing {}", path.display())))
    }

    /// The base disk that `disk` is a live qcow2 overlay on, from this store's records (never from what
    /// the disk's own bytes claim alone: a raw guest disk may hold anything).
    pub fn overlay_base(&self, disk: &Path) -> Result<Option<PathBuf>, BaseError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("listing {}", self.dir.display()))(e)),
        };
        let name = record_name(disk);
        for entry in entries {
            let entry = entry.map_err(io_err(format!("listing {}", self.dir.display())))?;
            let record: Option<CloneRecord> = fs::read_to_string(entry.path().join("clones").join(&name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let base = entry.path().join("disk.raw");
            if record.is_some_and(|r| r.overlay && r.path == disk && holds_clone(&r, &base)) {
                return Ok(Some(base));
            }
        }
        Ok(None)
    }
}

/// The name of the clone record of `disk` in a base's `clones/`.
fn record_name(disk: &Path) -> String {
    hex(&Sha256::digest(disk.as_os_str().as_encoded_bytes()))[..32].to_string()
}

/// Whether the disk a record names still holds the clone of `base` it was given: the GPT it was given, or
/// for an overlay, a qcow2 header naming the base (a wiped or reprovisioned disk has neither).
fn holds_clone(record: &CloneRecord, base: &Path) -> bool {
    if record.overlay {
        return overlay::backing_file(&record.path).is_ok_and(|b| b.as_deref() == Some(base));
    }
    let Ok(file) = File::open(&record.path) else { return false };
    partition::read(&file, record.sector_size).is_ok_and(|t| t.disk_guid.to_string() == record.disk_guid)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cached provision cannot make what a base cannot hold: encrypted partitions (keys are per VM).
pub(super) fn unsupported(disk: &DiskLayout) -> Option<String> {
    disk.partitions
        .iter()
        .find(|p| p.encryption.is_some())
        .map(|p| format!("partition {} is encrypted, and a base cannot hold a VM's keys", p.label))
}

/// The base for these images on a disk of this size and layout: what decides every byte of it.
fn base_id(req: &ProvisionRequest, entries: &[IndexEntry], target: &BlockTarget) -> String {
    let disk = req.spec.disk.clone().unwrap_or_default();
    let mut h = Sha256::new();
    h.update(b"gridforge base v1\n");
    for e in entries {
        h.update(format!("image {} {} {}\n", e.name, e.version, e.sha256));
    }
    h.update(format!("disk {} {}\n", target.size(), target.sector_size()));
    for p in &disk.partitions {
        h.update(format!(
            "partition {:?} {} {:?} {} {:?}\n",
            p.label, p.role, p.size_mib, p.filesystem, p.mount_point
        ));
    }
    h.update(format!("kernel_args {:?}\n", req.spec.kernel_args));
    h.update(format!("efi {:?}\n", req.efi_binary));
    hex(&h.finalize())[..32].to_string()
}

/// Clone the base of `entries` onto `target` (making the base first if the store lacks it), give the
/// clone fresh identifiers and customize it in place.
pub(super) fn provision_cached(
    req: &ProvisionRequest,
    target: &BlockTarget,
    entries: &[IndexEntry],
    fetch: impl FnOnce() -> Result<Vec<PathBuf>, ProvisionError>,
    progress: &Progress,
) -> Result<ProvisionResult, ProvisionError> {
    let store = BaseStore::new(&req.bases_dir);
    let id = base_id(req, entries, target);
    let base_err = |step| move |e: BaseError| ProvisionError::new(step, Code::Io, e);
    let base = {
        let existing = {
            let _shared = store.lock(&id, FlockArg::LockShared).map_err(base_err("base"))?;
            store.load(&id).map_err(base_err("base"))?
        };
        match existing {
            Some(b) => b,
            None => {
                let _exclusive = store.lock(&id, FlockArg::LockExclusive).map_err(base_err("base"))?;
                match store.load(&id).map_err(base_err("base"))? {
                    Some(b) => b,
                    None => build_base(req, &store, &id, target, entries, fetch()?, progress)?,
                }
            }
        }
    };
    // Shared while cloning: the base cannot be deleted under the clone.
    let _shared = store.lock(&id, FlockArg::LockShared).map_err(base_err("clone"))?;
    req.checkpoint("clone")?;
    progress.note("clone", format!("cloning base {id}"));
    let base_file = File::open(&base.path)
        .map_err(|e| ProvisionError::new("clone", Code::Io, format!("opening base {id}: {e}")))?;
    let target_err = |e| ProvisionError::new("clone", Code::Target, e);
    let method = match req.clone_fallback {
        CloneFallback::Overlay if target.kind() == TargetKind::File => {
            if target.reflink_from(&base_file).map_err(target_err)? {
                CloneMethod::Reflink
            } else {
                CloneMethod::Overlay
            }
        }
        _ => target.clone_from(&base_file).map_err(target_err)?,
    };
    drop(base_file);
    let (disk_guid, mut result) = if method == CloneMethod::Overlay {
        progress.note("clone", format!("making {} a qcow2 overlay on base {id}", target.path().display()));
        let overlay_err = |e| ProvisionError::new("clone", Code::Tool, e);
        overlay::create(target.path(), &base.path, target.size()).map_err(overlay_err)?;
        let export = overlay::Export::start(target.path(), &req.work_dir, true).map_err(overlay_err)?;
        let opts = TargetOptions { sector_size: Some(target.sector_size()), ..Default::default() };
        let view = BlockTarget::open(export.path(), &opts).map_err(target_err)?;
        let done = customize_clone(req, &view, &base.info, progress)?;
        drop(view);
        export.stop().map_err(|e| ProvisionError::new("customize", Code::Tool, e))?;
        target.sync().map_err(|e| ProvisionError::new("customize", Code::Io, e))?;
        done
    } else {
        progress.note("clone", format!("cloned base {id} ({})", method.as_str()));
        customize_clone(req, target, &base.info, progress)?
    };
    let overlay = method == CloneMethod::Overlay;
    store
        .record_clone(&id, target.path(), &disk_guid, target.sector_size(), overlay)
        .map_err(base_err("report"))?;
    result.base_id = id;
    result.clone_method = method.as_str().to_string();
    Ok(result)
}

/// Give the clone on `target` fresh identifiers and the VM's customization, and describe it: its new disk
/// GUID and the provision's result.
fn customize_clone(
    req: &ProvisionRequest,
    target: &BlockTarget,
    base: &BaseInfo,
    progress: &Progress,
) -> Result<(String, ProvisionResult), ProvisionError> {
    let disk_guid = fresh_identity(req, target, base, progress)?;
    target.sync().map_err(|e| ProvisionError::new("customize", Code::Io, e))?;
    let result = super::describe(target).map_err(|e| ProvisionError::new("report", Code::Io, e))?;
    Ok((disk_guid, result))
}

/// Make base `id` as a full provision would make the disk, without the VM's customization; check it and
/// keep it read-only. Made in a scratch directory renamed into place, so a failure leaves no base behind.
fn build_base(
    req: &ProvisionRequest,
    store: &BaseStore,
    id: &str,
    target: &BlockTarget,
    entries: &[IndexEntry],
    blobs: Vec<PathBuf>,
    progress: &Progress,
) -> Result<BaseEntry, ProvisionError> {
    let io = |step| move |e: io::Error| ProvisionError::new(step, Code::Io, e);
    progress.note("base", format!("making base {id}"));
    let scratch = store.dir.join(format!(".build-{id}"));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).map_err(io("base"))?;
    let cleanup = RemoveOnDrop(scratch.clone());
    let disk_path = scratch.join("disk.raw");
    let opts = TargetOptions {
        create_size: Some(target.size()),
        sector_size: Some(target.sector_size()),
        read_only: false,
    };
    let base_target =
        BlockTarget::open(&disk_path, &opts).map_err(|e| ProvisionError::new("base", Code::Target, e))?;
    let plan = plan_layout(&req.spec.disk.clone().unwrap_or_default().partitions, &base_target)?;
    let mut spec = req.spec.clone();
    spec.name = "localhost".to_string();
    spec.customize = Some(Customization { identity_reset: Some(false), ..Default::default() });
    let base_req = ProvisionRequest { spec, disk: disk_path.clone(), ..req.clone() };
    let result = super::build_from_rootfs(&base_req, &base_target, &plan, entries, &blobs, progress)?;
    progress.note("base", format!("checking base {id}"));
    for p in &result.partitions {
        if p.filesystem == Filesystem::Ext4 as i32 {
            ext4::check(&disk_path, p.offset_bytes)
                .map_err(|e| ProvisionError::new("base", Code::Tool, e))?;
        }
    }
    drop(base_target);
    let root_uuid = result
        .partitions
        .iter()
        .find(|p| p.role == Role::Root as i32)
        .map(|p| p.fs_uuid.clone())
        .unwrap_or_default();
    let info = BaseInfo {
        id: id.to_string(),
        images: entries.iter().map(|e| format!("{}:{}", e.name, e.version)).collect(),
        image_digests: entries.iter().map(|e| e.sha256.clone()).collect(),
        disk_size_bytes: result.disk_size_bytes,
        sector_size: result.sector_size,
        root_uuid,
        partitions: result.partitions.iter().map(|p| (p.number, p.offset_bytes, p.size_bytes)).collect(),
    };
    fs::set_permissions(&disk_path, fs::Permissions::from_mode(0o444)).map_err(io("base"))?;
    fs::write(scratch.join("base.json"), serde_json::to_vec_pretty(&info).expect("serializes"))
        .map_err(io("base"))?;
    let dir = store.base_dir(id);
    fs::rename(&scratch, &dir).map_err(io("base"))?;
    std::mem::forget(cleanup);
    progress.note("base", format!("base {id} ready"));
    Ok(BaseEntry::new(info, Vec::new(), dir.join("disk.raw")))
}

/// New GPT GUIDs, file system UUIDs and volume ids on the clone, the boot entry pointed at the new root
/// UUID, and the VM's customization (then a fresh machine-id and fstab) applied to the mounted root.
/// Returns the new disk GUID.
fn fresh_identity(
    req: &ProvisionRequest,
    target: &BlockTarget,
    base: &BaseInfo,
    progress: &Progress,
) -> Result<String, ProvisionError> {
    let disk = req.spec.disk.clone().unwrap_or_default();
    let plan = plan_layout(&disk.partitions, target)?;
    let planned: Vec<(u32, u64, u64)> =
        plan.partitions.iter().map(|p| (p.number, p.offset_bytes(), p.size_bytes())).collect();
    if planned != base.partitions {
        return Err(ProvisionError::new(
            "partition",
            Code::Layout,
            format!("the layout plans {planned:?}, base {} holds {:?}", base.id, base.partitions),
        ));
    }
    req.checkpoint("partition")?;
    progress.note("partition", "writing the GPT with fresh disk and partition GUIDs");
    partition::write(target.file(), &plan).map_err(|e| ProvisionError::new("partition", Code::Io, e))?;

    let fs_err = |e: FsError| {
        let e = crate::Error::from(e);
        ProvisionError::new("format", e.code(), e)
    };
    let root_uuid = uuid::Uuid::new_v4();
    let mut results: Vec<PartitionResult> = Vec::new();
    let mut esp = None;
    let mut root = None;
    for (p, part) in plan.partitions.iter().zip(&disk.partitions) {
        let (offset, len) = (p.offset_bytes(), p.size_bytes());
        let info: Option<FsInfo> = match part.filesystem() {
            Filesystem::Ext4 => {
                let uuid = if p.role == Role::Root { root_uuid } else { uuid::Uuid::new_v4() };
                Some(ext4::set_uuid(target.path(), offset, uuid).map_err(fs_err)?)
            }
            Filesystem::Vfat => Some(vfat::set_volume_id(target.file(), offset, len).map_err(fs_err)?),
            Filesystem::Swap => Some(
                swap::make(target.file(), offset, len, uuid::Uuid::new_v4(), &part.label).map_err(fs_err)?,
            ),
            Filesystem::None | Filesystem::Unspecified => None,
        };
        match p.role {
            Role::Esp => esp = Some((offset, len)),
            Role::Root => root = Some((offset, len)),
            _ => {}
        }
        results.push(partition_result(p, part.filesystem(), info.as_ref()));
    }
    if let Some((offset, len)) = esp {
        let new_root = root_uuid.hyphenated().to_string();
        vfat::edit_file(target.file(), offset, len, LOADER_ENTRY, |text| {
            text.replace(&base.root_uuid, &new_root)
        })
        .map_err(fs_err)?;
    }
    let (offset, len) = root.expect("validated: one ROOT partition");
    req.checkpoint("build")?;
    progress.note("build", "customizing the clone's root file system");
    std::fs::create_dir_all(&req.work_dir).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
    let custom = req.spec.customize.clone().unwrap_or_default();
    let ctx = customize::Context { vm_name: req.spec.name.clone() };
    let applied = ext4::with_mounted(target.path(), offset, len, &req.work_dir, |root| {
        let applied = customize::apply(root, &custom, &ctx).map_err(super::customize_error)?;
        if custom.identity_reset.unwrap_or(true) {
            // An empty machine-id would be filled at first boot; a clone gets its own at once.
            let id = format!("{}\n", uuid::Uuid::new_v4().simple());
            super::write_guest_file(root, "/etc/machine-id", &id)
                .map_err(|e| ProvisionError::new("build", Code::Io, e))?;
        }
        write_fstab(root, &disk, &results).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
        Ok::<_, ProvisionError>(applied)
    })
    .map_err(fs_err)??;
    for warning in &applied.warnings {
        tracing::warn!("{warning}");
        progress.note("build", format!("warning: {warning}"));
    }
    Ok(plan.disk_guid.to_string())
}
