//! GPT partitioning of guest disks.
//!
//! [`plan`] turns a list of [`PartitionRequest`]s into a [`GptPlan`] (pure: no I/O, 1 MiB alignment,
//! random GUIDs); [`write`] puts that plan on a disk (protective MBR, primary and backup GPT);
//! [`read`] reads a table back for inspection; [`relocate_backup_and_grow_last`] fixes up a raw-disk
//! image written onto a larger disk. Everything works on an open `std::fs::File` (regular file or block
//! device) with the logical sector size given by the caller.

mod layout;
mod table;

use gridforge_proto::v1::partition::Role;
use uuid::Uuid;

pub use layout::plan;
pub use table::{read, relocate_backup_and_grow_last, write};

/// Partitions start on 1 MiB boundaries, like every current partitioning tool.
const ALIGNMENT_BYTES: u64 = 1 << 20;
/// Entries in the partition array (the minimum the UEFI spec allows and what every tool writes).
const ENTRY_COUNT: u64 = 128;
/// Size of one partition entry.
const ENTRY_SIZE: u64 = 128;
/// The GPT name field holds 36 UTF-16 code units.
const MAX_LABEL_UTF16_UNITS: usize = 36;
/// Largest partition array `read` and `relocate_backup_and_grow_last` accept from a disk, so a corrupt
/// header cannot make us allocate gigabytes.
const MAX_ENTRY_COUNT_ON_DISK: u32 = 16384;

/// One partition asked for by a layout, in disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRequest {
    /// GPT partition name (at most 36 UTF-16 code units).
    pub label: String,
    pub role: Role,
    /// Size in bytes, a whole multiple of the sector size; `None` means the rest of the disk and is
    /// allowed only on the last partition.
    pub size_bytes: Option<u64>,
}

/// A complete GPT layout for one disk, ready for [`write`]. The GUIDs here are the ones written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPlan {
    pub disk_guid: Uuid,
    pub sector_size: u32,
    pub disk_size: u64,
    pub partitions: Vec<PlannedPartition>,
}

/// One partition of a [`GptPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPartition {
    /// 1-based GPT partition number.
    pub number: u32,
    pub label: String,
    pub role: Role,
    pub type_guid: Uuid,
    pub part_guid: Uuid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    pub sector_size: u32,
}

impl PlannedPartition {
    /// Byte offset of the partition from the start of the disk.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * u64::from(self.sector_size)
    }

    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * u64::from(self.sector_size)
    }
}

impl GptPlan {
    /// First LBA a partition may use (after the protective MBR, primary header and entry array).
    pub fn first_usable_lba(&self) -> u64 {
        first_usable_lba(u64::from(self.sector_size))
    }

    /// Last LBA a partition may use (before the backup entry array and header).
    pub fn last_usable_lba(&self) -> u64 {
        let sector_size = u64::from(self.sector_size);
        (self.disk_size / sector_size).saturating_sub(backup_area_sectors(sector_size) + 1)
    }
}

/// A GPT as found on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTable {
    pub disk_guid: Uuid,
    /// Size of the disk (file length or device size) in bytes.
    pub disk_size: u64,
    pub sector_size: u32,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// Used entries, by partition number.
    pub partitions: Vec<TablePartition>,
    /// Whether the primary header at LBA 1 is valid.
    pub primary_header_valid: bool,
    /// Whether a valid backup header sits in the last sector of the disk. False for a raw-disk image
    /// written onto a larger disk until [`relocate_backup_and_grow_last`] has run.
    pub backup_at_end: bool,
}

/// One used entry of a [`DiskTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePartition {
    /// 1-based GPT partition number (entry index + 1).
    pub number: u32,
    pub label: String,
    pub type_guid: Uuid,
    pub part_guid: Uuid,
    pub first_lba: u64,
    /// Inclusive.
    pub last_lba: u64,
    /// The role whose type GUID this entry carries, if any.
    pub role: Option<Role>,
    pub sector_size: u32,
}

impl TablePartition {
    /// Byte offset of the partition from the start of the disk.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * u64::from(self.sector_size)
    }

    /// Size of the partition in bytes.
    pub fn size_bytes(&self) -> u64 {
        (self.last_lba.saturating_sub(self.first_lba) + 1) * u64::from(self.sector_size)
    }
}

/// What [`relocate_backup_and_grow_last`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowOutcome {
    /// Number of the partition with the highest end LBA (the one grown).
    pub partition_number: u32,
    pub sector_size: u32,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
    /// Whether the backup header and entries were moved to the end of the disk.
    pub backup_moved: bool,
}

impl GrowOutcome {
    /// Byte offset of the grown partition.
    pub fn offset_bytes(&self) -> u64 {
        self.first_lba * u64::from(self.sector_size)
    }

    pub fn old_size_bytes(&self) -> u64 {
        (self.old_last_lba - self.first_lba + 1) * u64::from(self.sector_size)
    }

    pub fn new_size_bytes(&self) -> u64 {
        (self.new_last_lba - self.first_lba + 1) * u64::from(self.sector_size)
    }

    /// Whether the partition got larger (so its filesystem can be grown).
    pub fn grown(&self) -> bool {
        self.new_last_lba > self.old_last_lba
    }
}

/// A layout that cannot be planned. Partition numbers are 1-based, in request order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("unsupported sector size {sector_size} (must be 512 or 4096)")]
    UnsupportedSectorSize { sector_size: u32 },
    #[error("layout has no partitions")]
    NoPartitions,
    #[error("layout has {count} partitions, a GPT holds at most {max}")]
    TooManyPartitions { count: usize, max: u64 },
    #[error("partition {number} ({label:?}) has no role")]
    UnspecifiedRole { number: u32, label: String },
    #[error("partition {number} ({label:?}) has size 0")]
    ZeroSize { number: u32, label: String },
    #[error(
        "partition {number} ({label:?}) size {size_bytes} bytes is not a multiple of the {sector_size}-byte sector"
    )]
    SizeNotSectorMultiple { number: u32, label: String, size_bytes: u64, sector_size: u32 },
    #[error("partition {number} ({label:?}) takes the rest of the disk but is not the last partition")]
    RestNotLast { number: u32, label: String },
    #[error(
        "partition {number} ({label:?}) takes the rest of the disk, but partition {first_number} already does"
    )]
    MultipleRest { number: u32, label: String, first_number: u32 },
    #[error(
        "partition {number} ({label:?}) label is {units} UTF-16 units long, at most 36 fit in a GPT entry"
    )]
    LabelTooLong { number: u32, label: String, units: usize },
    #[error("partition {number} ({label:?}) has the same label as partition {first_number}")]
    DuplicateLabel { number: u32, label: String, first_number: u32 },
    #[error(
        "partition {number} ({label:?}) does not fit: the layout needs a disk of at least {needed_mib} MiB, the disk has {available_mib} MiB"
    )]
    DoesNotFit { number: u32, label: String, needed_mib: u64, available_mib: u64 },
    #[error(
        "disk of {disk_size} bytes is too small for a GPT with 1 MiB alignment (needs at least {minimum_size} bytes)"
    )]
    DiskTooSmall { disk_size: u64, minimum_size: u64 },
}

/// Reading or writing a partition table failed.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("{context}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Gpt {
        context: &'static str,
        #[source]
        source: gpt::GptError,
    },
    #[error("{context}")]
    Header {
        context: &'static str,
        #[source]
        source: gpt::header::HeaderError,
    },
    #[error("{context}")]
    Mbr {
        context: &'static str,
        #[source]
        source: gpt::mbr::MBRError,
    },
    #[error("no GPT found on the disk")]
    NoTable,
    #[error("unsupported sector size {sector_size} (must be 512 or 4096)")]
    UnsupportedSectorSize { sector_size: u32 },
    #[error("plan is for a disk of {planned} bytes, the disk has {actual} bytes")]
    DiskSizeMismatch { planned: u64, actual: u64 },
    #[error("invalid plan: {detail}")]
    InvalidPlan { detail: String },
    #[error(
        "GPT partition array of {entry_count} entries of {entry_size} bytes is not supported (entries must be 128 bytes, at most {MAX_ENTRY_COUNT_ON_DISK} of them)"
    )]
    UnsupportedEntryArray { entry_count: u32, entry_size: u32 },
    #[error(
        "GPT describes a disk of {table_sectors} sectors, the disk has only {disk_sectors}: the image is larger than the disk"
    )]
    DiskSmallerThanTable { table_sectors: u64, disk_sectors: u64 },
    #[error("GPT has no partitions to grow")]
    NothingToGrow,
    #[error("corrupt GPT: {detail}")]
    CorruptTable { detail: String },
}

/// The GPT type GUID written for a role.
pub fn type_guid_for_role(role: Role) -> Option<Uuid> {
    match role {
        Role::Esp => Some(gpt::partition_types::EFI.guid),
        Role::Root => Some(gpt::partition_types::LINUX_ROOT_X64.guid),
        Role::Swap => Some(gpt::partition_types::LINUX_SWAP.guid),
        Role::Data => Some(gpt::partition_types::LINUX_FS.guid),
        Role::Unspecified => None,
    }
}

/// The role whose type GUID this is, if any.
pub fn role_for_type_guid(type_guid: Uuid) -> Option<Role> {
    [Role::Esp, Role::Root, Role::Swap, Role::Data]
        .into_iter()
        .find(|role| type_guid_for_role(*role) == Some(type_guid))
}

/// Sectors taken by one copy of the 128 × 128-byte entry array.
fn entry_array_sectors(sector_size: u64) -> u64 {
    (ENTRY_COUNT * ENTRY_SIZE).div_ceil(sector_size)
}

/// Protective MBR + primary header + primary entry array.
fn first_usable_lba(sector_size: u64) -> u64 {
    2 + entry_array_sectors(sector_size)
}

/// Backup entry array + backup header, at the end of the disk.
fn backup_area_sectors(sector_size: u64) -> u64 {
    entry_array_sectors(sector_size) + 1
}

fn alignment_sectors(sector_size: u64) -> u64 {
    ALIGNMENT_BYTES / sector_size
}

fn is_supported_sector_size(sector_size: u32) -> bool {
    matches!(sector_size, 512 | 4096)
}
