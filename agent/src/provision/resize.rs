//! Growing a guest disk in place: the disk itself, its GPT (backup entries and header moved to the new end),
//! the last partition (to the new end, kept on a 1 MiB boundary) and the file system in that partition.
//!
//! Everything is checked before anything changes ([`DiskGrowth::check`]): the table, the room the new size
//! gives the last partition, and its file system. Only then does [`DiskGrowth::apply`] grow the disk, move
//! the table and grow the partition and its contents:
//!
//! - ext2/3/4: checked first with `e2fsck -f -p` (which fixes only what is safe to fix unattended and
//!   refuses the rest), then grown with `resize2fs` to the partition's new end.
//! - swap: the swap header is written again for the new size, with the same UUID and label (so `fstab`
//!   entries by UUID still match).
//! - LUKS: the partition is grown, the volume inside it is not. The agent reads and writes LUKS2 in
//!   userspace and does not open volumes through device-mapper, so it cannot reach the file system inside.
//!   LUKS2 data segments are `dynamic` (they run to the end of the partition), so inside the guest
//!   `cryptsetup resize <name>` and `resize2fs` finish the job. [`ResizeOutcome::filesystem_not_grown`]
//!   says so.
//! - no recognised file system (a raw data partition, a hibernation image in swap): the partition is grown,
//!   its contents are left alone.
//! - FAT: refused. Nothing here grows a FAT file system, and a partition larger than its FAT is no use.
//!
//! A regular file is grown with `set_len`; a block device cannot be grown here and must already be at least
//! the new size (the table and the partition then grow to the device's end). Shrinking is refused.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use gpt::disk::LogicalBlockSize;
use gridforge_common::progress::Progress;
use gridforge_proto::v1::{Filesystem, ResizeResult, error::Code};

use crate::block::{BlockError, BlockTarget, MIB, TargetKind, TargetOptions};
use crate::fs::{self, FsError, FsInfo, Probed};
use crate::partition::{self, PartitionError, TablePartition};

/// The step progress is reported in while checking, and while changing the disk.
const CHECK_STEP: &str = "check";
const RESIZE_STEP: &str = "resize";

/// Why a disk could not be grown. Every variant but the last two is raised before anything was changed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error(transparent)]
    Target(#[from] BlockError),
    #[error(
        "the disk's partition table spans {current} bytes; the new size {requested} bytes must be larger (shrinking is not supported)"
    )]
    NotLarger { current: u64, requested: u64 },
    #[error("{} is {current} bytes, more than the new size {requested} bytes: shrinking is not supported", path.display())]
    Shrink { path: PathBuf, current: u64, requested: u64 },
    #[error(
        "block device {} holds {actual} bytes, less than the new size {requested} bytes (a device cannot be grown here: grow it first)", path.display()
    )]
    DeviceTooSmall { path: PathBuf, actual: u64, requested: u64 },
    #[error("the new size {requested} bytes is not a whole number of {sector_size}-byte sectors")]
    Unaligned { requested: u64, sector_size: u32 },
    #[error("no GPT found on {}: only GPT disks can be resized", path.display())]
    NoTable { path: PathBuf },
    #[error("the GPT on {} is damaged ({detail}); repair it first (sgdisk -v shows the problem)", path.display())]
    DamagedTable { path: PathBuf, detail: String },
    #[error("the GPT on {} has no partitions to grow", path.display())]
    NoPartitions { path: PathBuf },
    #[error(
        "partition {number} already ends at byte {end}; a disk of {requested} bytes leaves it no room to grow on a 1 MiB boundary"
    )]
    NoRoom { number: u32, end: u64, requested: u64 },
    #[error("partition {number} holds a {kind} file system, which cannot be grown: {reason}")]
    UnsupportedFilesystem { number: u32, kind: &'static str, reason: &'static str },
    #[error("the ext4 file system on partition {number} needs repair that is not safe unattended")]
    FilesystemCheck {
        number: u32,
        #[source]
        source: FsError,
    },
    #[error("reading partition {number}")]
    Probe {
        number: u32,
        #[source]
        source: FsError,
    },
    #[error("reading the partition table of {}", path.display())]
    ReadTable {
        path: PathBuf,
        #[source]
        source: PartitionError,
    },
    #[error("growing {} to {size} bytes", path.display())]
    Grow {
        path: PathBuf,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    /// The disk was grown; moving the table failed.
    #[error("moving the GPT to the new end of the disk")]
    MoveTable(#[source] PartitionError),
    /// Disk, table and partition were grown; the file system was not.
    #[error("partition {number} was grown; growing its {kind} file system failed")]
    GrowFilesystem {
        number: u32,
        kind: &'static str,
        #[source]
        source: FsError,
    },
}

impl ResizeError {
    /// The contract's error code for this failure.
    pub fn code(&self) -> Code {
        match self {
            ResizeError::Target(_) | ResizeError::DeviceTooSmall { .. } => Code::Target,
            ResizeError::NotLarger { .. } | ResizeError::Shrink { .. } | ResizeError::Unaligned { .. } => {
                Code::InvalidSpec
            }
            ResizeError::NoTable { .. }
            | ResizeError::DamagedTable { .. }
            | ResizeError::NoPartitions { .. }
            | ResizeError::NoRoom { .. }
            | ResizeError::UnsupportedFilesystem { .. } => Code::Layout,
            ResizeError::FilesystemCheck { .. } | ResizeError::GrowFilesystem { .. } => Code::Tool,
            ResizeError::Probe { .. }
            | ResizeError::ReadTable { .. }
            | ResizeError::Grow { .. }
            | ResizeError::MoveTable(_) => Code::Io,
        }
    }
}

/// What a resize did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResizeOutcome {
    pub disk_size_bytes: u64,
    /// 1-based number of the grown (last) partition.
    pub partition_number: u32,
    pub partition_size_bytes: u64,
    /// Size of the file system in the partition after the resize; 0 when it was not grown.
    pub filesystem_size_bytes: u64,
    /// Why the partition's contents were not grown, when they were not (LUKS, no file system).
    pub filesystem_not_grown: Option<String>,
}

impl ResizeOutcome {
    pub fn to_proto(&self) -> ResizeResult {
        ResizeResult {
            disk_size_bytes: self.disk_size_bytes,
            partition_size_bytes: self.partition_size_bytes,
            filesystem_size_bytes: self.filesystem_size_bytes,
        }
    }
}

/// What the last partition holds, as far as growing it goes.
#[derive(Clone, Debug)]
enum Contents {
    Ext4,
    Swap(FsInfo),
    Luks,
    Unknown,
}

/// A checked resize, holding the target's lock until it is applied or dropped.
#[derive(Debug)]
pub struct DiskGrowth {
    target: BlockTarget,
    sector_size: u32,
    /// Size of the disk after the resize.
    new_size: u64,
    partition: TablePartition,
    contents: Contents,
}

/// Grow the disk at `path` (a regular file or block device) to `new_size_bytes`, then its GPT, its last
/// partition and that partition's file system (see the module docs). Checks everything first.
pub fn grow_disk(
    path: &Path,
    new_size_bytes: u64,
    progress: &Progress,
) -> Result<ResizeOutcome, ResizeError> {
    DiskGrowth::check(path, new_size_bytes, progress)?.apply(progress)
}

impl DiskGrowth {
    /// Open the disk (exclusively) and check that it can be grown to `new_size_bytes`. Nothing is changed,
    /// except that an ext4 file system in the last partition is checked with `e2fsck -f -p`, which fixes only
    /// what is safe to fix unattended.
    pub fn check(path: &Path, new_size_bytes: u64, progress: &Progress) -> Result<DiskGrowth, ResizeError> {
        progress.note(CHECK_STEP, format!("checking {}", path.display()));
        let target = BlockTarget::open(path, &TargetOptions::default())?;
        let sector_size = match target.kind() {
            TargetKind::BlockDevice => target.sector_size(),
            TargetKind::File => file_sector_size(target.file()),
        };
        let sector = u64::from(sector_size);
        if !new_size_bytes.is_multiple_of(sector) {
            return Err(ResizeError::Unaligned { requested: new_size_bytes, sector_size });
        }
        let table = partition::read(target.file(), sector_size).map_err(|source| match source {
            PartitionError::NoTable => ResizeError::NoTable { path: path.to_path_buf() },
            source => ResizeError::ReadTable { path: path.to_path_buf(), source },
        })?;
        if !table.primary_header_valid {
            return Err(ResizeError::DamagedTable {
                path: path.to_path_buf(),
                detail: "the primary header is invalid".into(),
            });
        }
        let header = primary_header(target.file(), sector_size, path)?;
        let table_end = (header.backup_lba + 1) * sector;
        if new_size_bytes <= table_end {
            return Err(ResizeError::NotLarger { current: table_end, requested: new_size_bytes });
        }
        let new_size = match target.kind() {
            TargetKind::File if target.size() > new_size_bytes => {
                return Err(ResizeError::Shrink {
                    path: path.to_path_buf(),
                    current: target.size(),
                    requested: new_size_bytes,
                });
            }
            TargetKind::File => new_size_bytes,
            TargetKind::BlockDevice if target.size() < new_size_bytes => {
                return Err(ResizeError::DeviceTooSmall {
                    path: path.to_path_buf(),
                    actual: target.size(),
                    requested: new_size_bytes,
                });
            }
            TargetKind::BlockDevice => target.size(),
        };
        let last = table
            .partitions
            .iter()
            .max_by_key(|p| p.last_lba)
            .cloned()
            .ok_or_else(|| ResizeError::NoPartitions { path: path.to_path_buf() })?;
        // The end `partition::relocate_backup_and_grow_last` gives the partition: the new last usable LBA
        // (before the backup entries and header), rounded down to the 1 MiB alignment.
        let array_sectors = (u64::from(header.num_parts) * u64::from(header.part_size)).div_ceil(sector);
        let new_last_usable = (new_size / sector).saturating_sub(array_sectors + 2);
        let align = MIB / sector;
        let new_last_lba = ((new_last_usable + 1) / align * align).saturating_sub(1);
        if new_last_lba <= last.last_lba {
            return Err(ResizeError::NoRoom {
                number: last.number,
                end: (last.last_lba + 1) * sector,
                requested: new_size_bytes,
            });
        }
        let number = last.number;
        let probed = fs::probe(target.file(), last.offset_bytes(), last.size_bytes())
            .map_err(|source| ResizeError::Probe { number, source })?;
        let contents = match probed {
            Some(Probed::Filesystem(FsInfo { kind: Filesystem::Ext4, .. })) => {
                progress.note(CHECK_STEP, format!("checking the ext4 file system on partition {number}"));
                fs::ext4::preen(path, last.offset_bytes())
                    .map_err(|source| ResizeError::FilesystemCheck { number, source })?;
                Contents::Ext4
            }
            Some(Probed::Filesystem(info)) if info.kind == Filesystem::Swap => Contents::Swap(info),
            Some(Probed::Filesystem(FsInfo { kind: Filesystem::Vfat, .. })) => {
                return Err(ResizeError::UnsupportedFilesystem {
                    number,
                    kind: "FAT",
                    reason: "growing FAT is not supported (keep the ESP before the partition to grow)",
                });
            }
            Some(Probed::Filesystem(_)) | None => Contents::Unknown,
            Some(Probed::Luks { .. }) => Contents::Luks,
        };
        Ok(DiskGrowth { target, sector_size, new_size, partition: last, contents })
    }

    /// Size of the disk after the resize (a block device keeps its own size).
    pub fn new_size(&self) -> u64 {
        self.new_size
    }

    /// Grow the disk, move the table, grow the last partition and its contents. Not cancellable: once
    /// started, it runs to the end.
    pub fn apply(self, progress: &Progress) -> Result<ResizeOutcome, ResizeError> {
        let DiskGrowth { target, sector_size, new_size, partition: last, contents } = self;
        let path = target.path().to_path_buf();
        let file = target.file();
        let number = last.number;
        if target.kind() == TargetKind::File {
            // A pool volume may already have been grown by the hypervisor.
            let current = file
                .metadata()
                .map_err(|source| ResizeError::Grow { path: path.clone(), size: new_size, source })?
                .len();
            if current > new_size {
                return Err(ResizeError::Shrink { path, current, requested: new_size });
            }
            if current < new_size {
                progress.note(
                    RESIZE_STEP,
                    format!("growing {} from {} to {} MiB", path.display(), current / MIB, new_size / MIB),
                );
                file.set_len(new_size).map_err(|source| ResizeError::Grow {
                    path: path.clone(),
                    size: new_size,
                    source,
                })?;
            }
        }
        progress.note(RESIZE_STEP, format!("moving the GPT to the end and growing partition {number}"));
        let grown =
            partition::relocate_backup_and_grow_last(file, sector_size).map_err(ResizeError::MoveTable)?;
        if grown.partition_number != number || !grown.grown() {
            return Err(ResizeError::MoveTable(PartitionError::CorruptTable {
                detail: format!(
                    "expected partition {number} to grow, the table grew partition {} from LBA {} to {}",
                    grown.partition_number, grown.old_last_lba, grown.new_last_lba
                ),
            }));
        }
        let (offset, len) = (grown.offset_bytes(), grown.new_size_bytes());
        let mut filesystem_size_bytes = 0;
        let mut filesystem_not_grown = None;
        match contents {
            Contents::Ext4 => {
                progress.note(RESIZE_STEP, format!("growing the ext4 file system on partition {number}"));
                let grow_err = |source| ResizeError::GrowFilesystem { number, kind: "ext4", source };
                fs::ext4::grow(&path, offset, len).map_err(grow_err)?;
                filesystem_size_bytes = fs::ext4::filesystem_size(file, offset).map_err(grow_err)?;
            }
            Contents::Swap(info) => {
                progress.note(RESIZE_STEP, format!("writing the swap header of partition {number} again"));
                let uuid = uuid::Uuid::parse_str(&info.uuid).unwrap_or_else(|_| uuid::Uuid::new_v4());
                fs::swap::make(file, offset, len, uuid, &info.label)
                    .map_err(|source| ResizeError::GrowFilesystem { number, kind: "swap", source })?;
                filesystem_size_bytes = len / fs::swap::PAGE_SIZE * fs::swap::PAGE_SIZE;
            }
            Contents::Luks => {
                filesystem_not_grown = Some(format!(
                    "partition {number} holds a LUKS volume: the agent does not open volumes, so the file system \
                     inside was not grown; in the guest, `cryptsetup resize` then `resize2fs` grow it"
                ));
            }
            Contents::Unknown => {
                filesystem_not_grown =
                    Some(format!("partition {number} holds no file system the agent recognises; left as is"));
            }
        }
        if let Some(reason) = &filesystem_not_grown {
            progress.note(RESIZE_STEP, reason.clone());
        }
        target.sync()?;
        progress
            .note(RESIZE_STEP, format!("disk {} MiB, partition {number} {} MiB", new_size / MIB, len / MIB));
        Ok(ResizeOutcome {
            disk_size_bytes: new_size,
            partition_number: number,
            partition_size_bytes: len,
            filesystem_size_bytes,
            filesystem_not_grown,
        })
    }
}

/// The logical sector size a regular file's GPT was written with: where its header is (LBA 1 of 512 or 4096
/// bytes); 512 when neither holds one (reading the table then reports that there is none).
fn file_sector_size(file: &File) -> u32 {
    let signature_at = |offset: u64| {
        let mut sig = [0u8; 8];
        file.read_exact_at(&mut sig, offset).is_ok() && &sig == b"EFI PART"
    };
    if !signature_at(512) && signature_at(4096) { 4096 } else { 512 }
}

fn primary_header(file: &File, sector_size: u32, path: &Path) -> Result<gpt::header::Header, ResizeError> {
    let block_size =
        LogicalBlockSize::try_from(u64::from(sector_size)).map_err(|_| ResizeError::DamagedTable {
            path: path.to_path_buf(),
            detail: format!("unsupported sector size {sector_size}"),
        })?;
    let mut device = file;
    gpt::header::read_header_from_arbitrary_device(&mut device, block_size).map_err(|e| {
        ResizeError::DamagedTable { path: path.to_path_buf(), detail: format!("primary header: {e}") }
    })
}
