//! One Provision job: allocate the target, fetch and verify images, partition, build the guest tree, format
//! and write file systems, report. On any failure after the disk was touched its first MiB is zeroed, so a
//! half-written disk can never boot, and the error names the step and the cause.

pub mod cached;
mod encrypted;
pub mod resize;
pub mod spec;

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use gridforge_common::error_chain;
use gridforge_common::progress::Progress;
use gridforge_proto::v1::{
    Filesystem, PartitionResult, ProvisionMode, ProvisionResult, VmSpec, error::Code, partition::Role,
};

use crate::block::{BlockTarget, MIB, TargetOptions};
use crate::customize;
use crate::fs::{self, FsInfo};
use crate::image::index::{Format, IndexEntry};
use crate::image::{Cache, Store, Trust};
use crate::partition::{self, GptPlan, PartitionRequest};
use crate::pipeline::{rawdisk, unpack};
use crate::wipe::CancelToken;

pub use cached::{BaseEntry, BaseError, BaseInfo, BaseStore, CloneFallback};
pub use spec::SpecError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failed provision: which step, what kind of failure, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{step} failed")]
pub struct ProvisionError {
    pub step: &'static str,
    pub code: Code,
    /// The target's first MiB was zeroed after the failure.
    pub target_zeroed: bool,
    /// The target was a file this provision created; it was removed after the failure.
    pub target_removed: bool,
    #[source]
    pub source: BoxError,
}

impl ProvisionError {
    fn new(step: &'static str, code: Code, source: impl Into<BoxError>) -> Self {
        Self { step, code, target_zeroed: false, target_removed: false, source: source.into() }
    }

    /// The structured error of the contract: code, step and the whole cause chain as the message.
    pub fn to_proto(&self) -> gridforge_proto::v1::Error {
        let message = error_chain(&*self.source);
        gridforge_proto::v1::Error { code: self.code as i32, step: self.step.to_string(), message }
    }
}

/// Where a provision gets its images and does its scratch work.
#[derive(Clone, Debug)]
pub struct ImageSource {
    /// Store location: a directory, dir:///path or http(s):// base URL.
    pub store: String,
    pub trust: Trust,
    /// Content-addressed blob cache.
    pub cache_dir: PathBuf,
}

/// One provision request, fully described.
#[derive(Clone, Debug)]
pub struct ProvisionRequest {
    pub spec: VmSpec,
    pub disk: PathBuf,
    pub images: ImageSource,
    /// Directory for the staging tree (must keep ownership and modes: not a FAT or NFS mount).
    pub work_dir: PathBuf,
    /// systemd-boot EFI binary for images that do not carry one (default: the host's systemd-boot-efi).
    pub efi_binary: Option<PathBuf>,
    /// Checked between steps: once cancelled, the provision stops at the next one with code CANCELLED (and
    /// the target's head zeroed, like any failure).
    pub cancel: Option<CancelToken>,
    /// The mode of a spec that names none (PROVISION_FULL or PROVISION_CACHED).
    pub default_mode: ProvisionMode,
    /// The base store of cached provisions (see [`cached`]).
    pub bases_dir: PathBuf,
    /// How a cached provision clones onto a file where reflinks cannot be made.
    pub clone_fallback: CloneFallback,
}

impl ProvisionRequest {
    /// A safe point: fail with CANCELLED in `step` if the request was cancelled.
    fn checkpoint(&self, step: &'static str) -> Result<(), ProvisionError> {
        match &self.cancel {
            Some(c) if c.is_cancelled() => Err(ProvisionError::new(step, Code::Cancelled, "cancelled")),
            _ => Ok(()),
        }
    }
}

pub fn provision(req: &ProvisionRequest, progress: &Progress) -> Result<ProvisionResult, ProvisionError> {
    spec::validate(&req.spec).map_err(|e| ProvisionError::new("validate", Code::InvalidSpec, e))?;
    if let Some(c) = &req.spec.customize {
        customize::validate(c).map_err(|e| ProvisionError::new("validate", Code::InvalidSpec, e))?;
    }
    let disk_spec = req.spec.disk.clone().unwrap_or_default();
    req.checkpoint("allocate")?;

    progress.note("allocate", format!("opening {}", req.disk.display()));
    let opts = TargetOptions {
        create_size: (disk_spec.size_mib > 0).then(|| disk_spec.size_mib * MIB),
        sector_size: (disk_spec.sector_size != 0).then_some(disk_spec.sector_size),
        read_only: false,
    };
    let target =
        BlockTarget::open(&req.disk, &opts).map_err(|e| ProvisionError::new("allocate", Code::Target, e))?;
    if target.size() < disk_spec.size_mib * MIB {
        return Err(ProvisionError::new(
            "allocate",
            Code::Target,
            format!(
                "{} holds {} MiB, the spec asks for {} MiB",
                req.disk.display(),
                target.size() / MIB,
                disk_spec.size_mib
            ),
        ));
    }

    // The target now belongs to this provision: whatever fails from here leaves its head zeroed, so no
    // half-written (or previous) system on it can boot.
    match provision_onto(req, &target, &disk_spec, progress) {
        Ok(res) => {
            progress.note("report", "done");
            Ok(res)
        }
        Err(mut e) => {
            if target.created() {
                // Nothing was there before: leave nothing behind.
                drop(target);
                match std::fs::remove_file(&req.disk) {
                    Ok(()) => e.target_removed = true,
                    Err(r) => tracing::error!(error = %r, "could not remove the failed target file"),
                }
            } else {
                match target.zero_head() {
                    Ok(()) => e.target_zeroed = true,
                    Err(z) => tracing::error!(error = %z, "could not zero the head of the failed target"),
                }
            }
            Err(e)
        }
    }
}

fn provision_onto(
    req: &ProvisionRequest,
    target: &BlockTarget,
    disk_spec: &gridforge_proto::v1::DiskLayout,
    progress: &Progress,
) -> Result<ProvisionResult, ProvisionError> {
    let (store, entries) = resolve_images(&req.spec, &req.images)?;
    req.checkpoint("fetch")?;
    let os = &entries[0];
    let mode = provision_mode(req, os, disk_spec, progress)?;
    let plan = match os.format {
        Format::RootfsTar => Some(plan_layout(&disk_spec.partitions, target)?),
        Format::RawDisk => {
            if !disk_spec.partitions.is_empty() {
                return Err(ProvisionError::new(
                    "validate",
                    Code::InvalidSpec,
                    SpecError {
                        field: "disk.partitions".into(),
                        reason: format!(
                            "image {} is a raw disk with its own partitions; leave this empty",
                            os.name
                        ),
                    },
                ));
            }
            if entries.len() > 1 {
                return Err(ProvisionError::new(
                    "validate",
                    Code::InvalidSpec,
                    SpecError { field: "layers".into(), reason: "layers need a rootfs-tar OS image".into() },
                ));
            }
            None
        }
    };
    let fetch = || {
        let cache = Cache::new(&req.images.cache_dir).map_err(|e| fetch_error(e.into()))?;
        let mut blobs = Vec::with_capacity(entries.len());
        for entry in &entries {
            blobs.push(cache.fetch(&store, entry, progress).map_err(|e| fetch_error(e.into()))?);
            req.checkpoint("fetch")?;
        }
        Ok(blobs)
    };
    let mut result = match (plan, mode) {
        (Some(_), ProvisionMode::ProvisionCached) => {
            cached::provision_cached(req, target, &entries, fetch, progress)?
        }
        (None, _) => write_raw(target, os, &fetch()?[0], progress)?,
        (Some(plan), _) => build_from_rootfs(req, target, &plan, &entries, &fetch()?, progress)?,
    };
    result.mode = mode as i32;
    result.image_digests = entries.iter().map(|e| e.sha256.clone()).collect();
    Ok(result)
}

/// The spec's mode, else the agent's. A cached provision needs a rootfs image and a layout a base can hold:
/// asked for by the spec, anything else is refused; by the agent's default, it is provisioned in full.
fn provision_mode(
    req: &ProvisionRequest,
    os: &IndexEntry,
    disk: &gridforge_proto::v1::DiskLayout,
    progress: &Progress,
) -> Result<ProvisionMode, ProvisionError> {
    let asked = req.spec.provision_mode();
    let mode = if asked == ProvisionMode::Unspecified { req.default_mode } else { asked };
    if mode != ProvisionMode::ProvisionCached {
        return Ok(ProvisionMode::ProvisionFull);
    }
    let why_not = match os.format {
        Format::RawDisk => Some(format!("image {} is a raw disk, provisioned as it is", os.name)),
        Format::RootfsTar => cached::unsupported(disk),
    };
    match why_not {
        None => Ok(ProvisionMode::ProvisionCached),
        Some(reason) if asked == ProvisionMode::ProvisionCached => Err(ProvisionError::new(
            "validate",
            Code::InvalidSpec,
            SpecError { field: "provision_mode".into(), reason: format!("PROVISION_CACHED: {reason}") },
        )),
        Some(reason) => {
            progress.note("validate", format!("provisioning in full: {reason}"));
            Ok(ProvisionMode::ProvisionFull)
        }
    }
}

fn resolve_images(spec: &VmSpec, src: &ImageSource) -> Result<(Store, Vec<IndexEntry>), ProvisionError> {
    let store = Store::open(&src.store, src.trust.clone()).map_err(|e| fetch_error(e.into()))?;
    let refs = spec.image.iter().chain(spec.layers.iter());
    let mut entries = Vec::new();
    for r in refs {
        let entry = store.find(&r.name, &r.version).map_err(|e| fetch_error(e.into()))?;
        entries.push(entry.clone());
    }
    Ok((store, entries))
}

fn fetch_error(e: crate::Error) -> ProvisionError {
    let code = e.code();
    ProvisionError::new("fetch", code, e)
}

fn plan_layout(
    partitions: &[gridforge_proto::v1::Partition],
    target: &BlockTarget,
) -> Result<GptPlan, ProvisionError> {
    let requests: Vec<PartitionRequest> = partitions
        .iter()
        .map(|p| PartitionRequest {
            label: p.label.clone(),
            role: p.role(),
            size_bytes: p.size_mib.map(|m| m * MIB),
        })
        .collect();
    partition::plan(&requests, target.size(), target.sector_size())
        .map_err(|e| ProvisionError::new("partition", Code::Layout, e))
}

fn write_raw(
    target: &BlockTarget,
    entry: &IndexEntry,
    blob: &Path,
    progress: &Progress,
) -> Result<ProvisionResult, ProvisionError> {
    let file = File::open(blob).map_err(|e| ProvisionError::new("write", Code::Io, e))?;
    rawdisk::write_raw_disk(BufReader::with_capacity(MIB as usize, file), &entry.sha256, target, progress)
        .map_err(|e| {
            let code = crate::Error::from(e);
            ProvisionError::new("write", code.code(), code)
        })?;
    progress.note("partition", "moving the backup GPT to the end of the disk");
    let grown = partition::relocate_backup_and_grow_last(target.file(), target.sector_size())
        .map_err(|e| ProvisionError::new("partition", Code::Layout, e))?;
    if grown.grown() {
        let (offset, len) = (grown.offset_bytes(), grown.new_size_bytes());
        let probe =
            fs::probe(target.file(), offset, len).map_err(|e| ProvisionError::new("format", Code::Io, e))?;
        if matches!(probe, Some(fs::Probed::Filesystem(FsInfo { kind: Filesystem::Ext4, .. }))) {
            progress.note("format", format!("growing ext4 on partition {}", grown.partition_number));
            fs::ext4::grow(target.path(), offset, len)
                .map_err(|e| ProvisionError::new("format", Code::Tool, e))?;
        }
    }
    target.sync().map_err(|e| ProvisionError::new("write", Code::Io, e))?;
    describe(target).map_err(|e| ProvisionError::new("report", Code::Io, e))
}

fn build_from_rootfs(
    req: &ProvisionRequest,
    target: &BlockTarget,
    plan: &GptPlan,
    entries: &[IndexEntry],
    blobs: &[PathBuf],
    progress: &Progress,
) -> Result<ProvisionResult, ProvisionError> {
    std::fs::create_dir_all(&req.work_dir).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
    let staging = tempfile::Builder::new()
        .prefix("staging-")
        .tempdir_in(&req.work_dir)
        .map_err(|e| ProvisionError::new("build", Code::Io, e))?;
    let root = staging.path();
    for (entry, blob) in entries.iter().zip(blobs) {
        req.checkpoint("build")?;
        progress.note("build", format!("unpacking {} {}", entry.name, entry.version));
        let file = File::open(blob).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
        let opts = unpack::UnpackOptions::default();
        unpack::unpack_rootfs(
            BufReader::with_capacity(MIB as usize, file),
            &entry.sha256,
            root,
            &opts,
            progress,
        )
        .map_err(|e| {
            let e = crate::Error::from(e);
            ProvisionError::new("build", e.code(), e)
        })?;
    }

    let disk = req.spec.disk.as_ref().expect("validated");
    let custom = req.spec.customize.clone().unwrap_or_default();
    req.checkpoint("build")?;
    progress.note("build", "customizing the guest tree");
    let applied = customize::apply(root, &custom, &customize::Context { vm_name: req.spec.name.clone() })
        .map_err(customize_error)?;
    for warning in &applied.warnings {
        tracing::warn!("{warning}");
        progress.note("build", format!("warning: {warning}"));
    }
    // The root file system's UUID is chosen now: the boot entry and fstab name it before mke2fs writes it.
    let root_uuid = uuid::Uuid::new_v4();
    let esp_tree = staging.path().with_extension("esp");
    let _esp_cleanup = RemoveOnDrop(esp_tree.clone());
    if plan.partitions.iter().any(|p| p.role == Role::Esp) {
        std::fs::create_dir_all(&esp_tree).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
        let entry = customize::boot::install_boot(
            root,
            &esp_tree,
            &root_uuid.to_string(),
            &req.spec.kernel_args,
            req.efi_binary.as_deref(),
        )
        .map_err(customize_error)?;
        progress.note("build", format!("boot entry: {} {}", entry.kernel, entry.options));
    }

    req.checkpoint("partition")?;
    progress.note("partition", format!("writing GPT with {} partitions", plan.partitions.len()));
    target.zero_head().map_err(|e| ProvisionError::new("partition", Code::Io, e))?;
    partition::write(target.file(), plan).map_err(|e| ProvisionError::new("partition", Code::Io, e))?;

    let mut results: Vec<PartitionResult> = Vec::new();
    let mut root_index = None;
    // Everything but the root first: the root's fstab needs the other file systems' UUIDs.
    for (planned, part) in plan.partitions.iter().zip(&disk.partitions) {
        req.checkpoint("format")?;
        let (offset, len) = (planned.offset_bytes(), planned.size_bytes());
        if planned.role == Role::Root {
            root_index = Some(results.len());
            results.push(partition_result(planned, part.filesystem(), None));
            continue;
        }
        let tree = (planned.role == Role::Esp).then_some(esp_tree.as_path());
        let result = match &part.encryption {
            Some(enc) => {
                progress.note(
                    "encrypt",
                    format!("LUKS2 volume on partition {} ({})", planned.number, part.label),
                );
                let (info, luks_uuid) = encrypted::make(target, offset, len, part, enc, tree, &req.work_dir)?;
                let mut r = partition_result(planned, part.filesystem(), info.as_ref());
                r.luks = true;
                r.luks_uuid = luks_uuid;
                r
            }
            None => {
                let info =
                    make_fs(target.path(), target.file(), offset, len, target.sector_size(), part, tree)?;
                partition_result(planned, part.filesystem(), info.as_ref())
            }
        };
        results.push(result);
    }

    let root_index = root_index.expect("validated: one ROOT partition");
    let planned = &plan.partitions[root_index];
    results[root_index].fs_uuid = root_uuid.to_string();
    write_fstab(root, disk, &results).map_err(|e| ProvisionError::new("build", Code::Io, e))?;
    req.checkpoint("format")?;
    progress.note("format", format!("writing ext4 root ({} MiB)", planned.size_bytes() / MIB));
    let info = fs::ext4::make(
        target.path(),
        planned.offset_bytes(),
        planned.size_bytes(),
        Some(root),
        root_uuid,
        &disk.partitions[root_index].label,
    )
    .map_err(|e| ProvisionError::new("format", Code::Tool, e))?;
    results[root_index] = partition_result(planned, Filesystem::Ext4, Some(&info));
    target.sync().map_err(|e| ProvisionError::new("format", Code::Io, e))?;

    Ok(ProvisionResult {
        disk_path: target.path().display().to_string(),
        disk_size_bytes: target.size(),
        sector_size: target.sector_size(),
        disk_guid: plan.disk_guid.to_string(),
        partitions: results,
        ..Default::default()
    })
}

/// Make the partition's file system in `[offset, offset + len)` of `file` (at `path`, for mke2fs).
fn make_fs(
    path: &Path,
    file: &File,
    offset: u64,
    len: u64,
    sector_size: u32,
    part: &gridforge_proto::v1::Partition,
    tree: Option<&Path>,
) -> Result<Option<FsInfo>, ProvisionError> {
    let info = match part.filesystem() {
        Filesystem::Ext4 => fs::ext4::make(path, offset, len, tree, uuid::Uuid::new_v4(), &part.label),
        Filesystem::Vfat => fs::vfat::format(file, offset, len, sector_size, &part.label, tree),
        Filesystem::Swap => fs::swap::make(file, offset, len, uuid::Uuid::new_v4(), &part.label),
        Filesystem::None | Filesystem::Unspecified => return Ok(None),
    };
    info.map(Some).map_err(|e| {
        let e = crate::Error::from(e);
        ProvisionError::new("format", e.code(), e)
    })
}

fn partition_result(
    planned: &partition::PlannedPartition,
    filesystem: Filesystem,
    info: Option<&FsInfo>,
) -> PartitionResult {
    PartitionResult {
        number: planned.number,
        label: planned.label.clone(),
        role: planned.role as i32,
        filesystem: filesystem as i32,
        partition_guid: planned.part_guid.to_string(),
        type_guid: planned.type_guid.to_string(),
        first_lba: planned.first_lba,
        last_lba: planned.last_lba,
        offset_bytes: planned.offset_bytes(),
        size_bytes: planned.size_bytes(),
        fs_uuid: info.map(|i| i.uuid.clone()).unwrap_or_default(),
        fs_label: info.map(|i| i.label.clone()).unwrap_or_default(),
        luks: false,
        luks_uuid: String::new(),
    }
}

/// Removes a scratch directory when the provision ends, whichever way.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn customize_error(e: customize::CustomizeError) -> ProvisionError {
    use customize::CustomizeError as C;
    let code = match &e {
        C::Io { .. } => Code::Io,
        _ => Code::InvalidSpec,
    };
    ProvisionError::new("build", code, e)
}

/// `/etc/fstab` by UUID for every file system on the disk, and the mount points in the tree.
fn write_fstab(
    root: &Path,
    disk: &gridforge_proto::v1::DiskLayout,
    results: &[PartitionResult],
) -> std::io::Result<()> {
    let mut fstab = String::from(
        "# Written by gridforge at provisioning. <file system> <mount point> <type> <options> <dump> <pass>\n",
    );
    let mut crypttab = String::new();
    for (part, res) in disk.partitions.iter().zip(results) {
        if res.luks {
            // Unlocked by the tenant (the key is never on the disk): listed, not opened at boot.
            crypttab.push_str(&format!("{} UUID={} none luks,noauto\n", part.label, res.luks_uuid));
        }
        let source =
            if res.luks { format!("/dev/mapper/{}", part.label) } else { format!("UUID={}", res.fs_uuid) };
        let data_opts = if res.luks { "noauto,nofail 0 0" } else { "defaults 0 2" };
        let line = match (part.role(), part.filesystem()) {
            (Role::Root, _) => format!("{source} / ext4 errors=remount-ro 0 1"),
            (Role::Esp, _) => format!("{source} /boot/efi vfat umask=0077 0 2"),
            (Role::Swap, _) if res.luks => format!("{source} none swap sw,noauto,nofail 0 0"),
            (Role::Swap, _) => format!("{source} none swap sw 0 0"),
            (Role::Data, Filesystem::Ext4) if !part.mount_point.is_empty() => {
                format!("{source} {} ext4 {data_opts}", part.mount_point)
            }
            (Role::Data, Filesystem::Vfat) if !part.mount_point.is_empty() => {
                format!("{source} {} vfat {data_opts}", part.mount_point)
            }
            _ => continue,
        };
        let mount = line.split_whitespace().nth(1).unwrap_or("none");
        if mount.starts_with('/') {
            let dir = customize::resolve_in_root(root, mount).map_err(std::io::Error::other)?;
            std::fs::create_dir_all(dir)?;
        }
        fstab.push_str(&line);
        fstab.push('\n');
    }
    if !crypttab.is_empty() {
        write_guest_file(root, "/etc/crypttab", &format!("# <name> <device> <key> <options>\n{crypttab}"))?;
    }
    write_guest_file(root, "/etc/fstab", &fstab)
}

/// Replace a guest file (never writing through a symlink that the image put there).
fn write_guest_file(root: &Path, guest_path: &str, content: &str) -> std::io::Result<()> {
    let path =
        customize::resolve(root, guest_path, customize::FinalLink::Keep).map_err(std::io::Error::other)?;
    if path.is_symlink() {
        std::fs::remove_file(&path)?;
    }
    std::fs::write(path, content)
}

/// Read back what is on the disk: the GPT and each partition's file system.
pub fn describe(target: &BlockTarget) -> Result<ProvisionResult, crate::Error> {
    let table = partition::read(target.file(), target.sector_size())?;
    let mut partitions = Vec::new();
    for p in &table.partitions {
        let (info, luks) = match fs::probe(target.file(), p.offset_bytes(), p.size_bytes())? {
            Some(fs::Probed::Filesystem(info)) => (Some(info), None),
            Some(fs::Probed::Luks { uuid, label, .. }) => {
                (Some(FsInfo { kind: Filesystem::None, uuid: String::new(), label }), Some(uuid))
            }
            None => (None, None),
        };
        partitions.push(PartitionResult {
            luks: luks.is_some(),
            luks_uuid: luks.unwrap_or_default(),
            number: p.number,
            label: p.label.clone(),
            role: p.role.map(|r| r as i32).unwrap_or_default(),
            filesystem: info.as_ref().map(|i| i.kind as i32).unwrap_or(Filesystem::None as i32),
            partition_guid: p.part_guid.to_string(),
            type_guid: p.type_guid.to_string(),
            first_lba: p.first_lba,
            last_lba: p.last_lba,
            offset_bytes: p.offset_bytes(),
            size_bytes: p.size_bytes(),
            fs_uuid: info.as_ref().map(|i| i.uuid.clone()).unwrap_or_default(),
            fs_label: info.map(|i| i.label).unwrap_or_default(),
        });
    }
    Ok(ProvisionResult {
        disk_path: target.path().display().to_string(),
        disk_size_bytes: target.size(),
        sector_size: target.sector_size(),
        disk_guid: table.disk_guid.to_string(),
        partitions,
        ..Default::default()
    })
}
