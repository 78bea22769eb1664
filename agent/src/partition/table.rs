//! On-disk side: protective MBR and GPT through the `gpt` crate.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use gpt::disk::LogicalBlockSize;
use gpt::header::{Header, HeaderBuilder, HeaderError};
use gpt::mbr::{MBRError, PartRecord, ProtectiveMBR};
use gpt::partition::Partition;
use gpt::{GptConfig, GptError};

use super::{
    DiskTable, ENTRY_COUNT, GptPlan, GrowOutcome, MAX_ENTRY_COUNT_ON_DISK, MAX_LABEL_UTF16_UNITS,
    PartitionError, TablePartition, alignment_sectors, is_supported_sector_size, role_for_type_guid,
};

/// MBR partition type of the GPT protective partition.
const PROTECTIVE_MBR_TYPE: u8 = 0xEE;
/// Offsets of the entry count and entry size fields in a GPT header.
const HEADER_ENTRY_COUNT_OFFSET: usize = 80;
const HEADER_ENTRY_SIZE_OFFSET: usize = 84;
/// Offset of the last-LBA field in a partition entry.
const ENTRY_LAST_LBA_OFFSET: usize = 40;

/// Writes the protective MBR and both GPT copies exactly as planned.
///
/// Touches only LBA 0, the primary header and entry array (LBA 1 up to the first usable LBA) and the
/// backup entry array and header at the end of the disk. The disk must be `plan.disk_size` bytes.
/// The data is synced before returning; telling the kernel to re-read the partitions of a block
/// device is left to the caller.
pub fn write(disk: &File, plan: &GptPlan) -> Result<(), PartitionError> {
    let block_size = logical_block_size(plan.sector_size)?;
    let disk_size = disk_size(disk)?;
    if disk_size != plan.disk_size {
        return Err(PartitionError::DiskSizeMismatch { planned: plan.disk_size, actual: disk_size });
    }
    check_plan(plan)?;

    let disk_sectors = disk_size / u64::from(plan.sector_size);
    write_sector0_protective_mbr(disk, plan.sector_size, disk_sectors)?;

    let mut gpt_disk = GptConfig::new()
        .writable(true)
        .logical_block_size(block_size)
        .create_from_device(disk, Some(plan.disk_guid))
        .map_err(|source| PartitionError::Gpt { context: "preparing GPT headers", source })?;
    let entries: BTreeMap<u32, Partition> = plan
        .partitions
        .iter()
        .map(|planned| {
            let entry = Partition {
                part_type_guid: planned.type_guid.into(),
                part_guid: planned.part_guid,
                first_lba: planned.first_lba,
                last_lba: planned.last_lba,
                flags: 0,
                name: planned.label.clone(),
            };
            (planned.number, entry)
        })
        .collect();
    gpt_disk
        .update_partitions(entries)
        .map_err(|source| PartitionError::Gpt { context: "setting GPT partition entries", source })?;
    gpt_disk.write_inplace().map_err(|source| PartitionError::Gpt { context: "writing GPT", source })?;
    disk.sync_all().map_err(|source| PartitionError::Io { context: "syncing disk after writing GPT", source })
}

/// Reads the GPT of a disk for inspection. Uses the backup copy when the primary one is damaged.
pub fn read(disk: &File, sector_size: u32) -> Result<DiskTable, PartitionError> {
    let block_size = logical_block_size(sector_size)?;
    let disk_size = disk_size(disk)?;
    let disk_sectors = disk_size / u64::from(sector_size);
    check_entry_arrays(disk, sector_size, disk_sectors)?;

    let gpt_disk =
        GptConfig::new().writable(false).logical_block_size(block_size).open_from_device(disk).map_err(
            |source| match source {
                GptError::Header(ref header_error) if means_no_table(header_error) => PartitionError::NoTable,
                source => PartitionError::Gpt { context: "reading GPT", source },
            },
        )?;

    let primary = gpt_disk.primary_header().ok();
    let backup = gpt_disk.backup_header().ok();
    // The crate only looks for a backup header in the last sector, so a valid one is at the end; the
    // primary must agree that it is its backup.
    let backup_at_end = match (primary, backup) {
        (Some(primary), Some(_)) => primary.backup_lba + 1 == disk_sectors,
        (None, Some(_)) => true,
        (_, None) => false,
    };
    let header = gpt_disk.header();
    let partitions = gpt_disk
        .partitions()
        .iter()
        .filter(|(_, entry)| entry.is_used())
        .map(|(&number, entry)| TablePartition {
            number,
            label: entry.name.clone(),
            type_guid: entry.part_type_guid.guid,
            part_guid: entry.part_guid,
            first_lba: entry.first_lba,
            last_lba: entry.last_lba,
            role: role_for_type_guid(entry.part_type_guid.guid),
            sector_size,
        })
        .collect();
    Ok(DiskTable {
        disk_guid: *gpt_disk.guid(),
        disk_size,
        sector_size,
        first_usable_lba: header.first_usable,
        last_usable_lba: header.last_usable,
        partitions,
        primary_header_valid: primary.is_some(),
        backup_at_end,
    })
}

/// Fixes up a raw-disk image written onto a disk at least as large as the image.
///
/// Moves the backup entry array and header to the end of the disk, updates the primary header (backup
/// LBA, last usable LBA), grows the partition with the highest end LBA to the last usable LBA rounded
/// down to a 1 MiB boundary, and updates the size of the protective MBR partition. The old backup
/// header is cleared so no stale table stays behind. When the backup header is already in the last
/// sector, nothing is written and the last partition is reported unchanged.
///
/// Partition numbers, attributes and the bytes of every other entry are kept as they are.
pub fn relocate_backup_and_grow_last(disk: &File, sector_size: u32) -> Result<GrowOutcome, PartitionError> {
    let block_size = logical_block_size(sector_size)?;
    let sector = u64::from(sector_size);
    let disk_sectors = disk_size(disk)? / sector;
    check_entry_arrays(disk, sector_size, disk_sectors)?;

    let mut device = disk;
    let primary =
        gpt::header::read_header_from_arbitrary_device(&mut device, block_size).map_err(|source| {
            if means_no_table(&source) {
                PartitionError::NoTable
            } else {
                PartitionError::Header { context: "reading primary GPT header", source }
            }
        })?;
    let entries = gpt::partition::file_read_partitions(&mut device, &primary, block_size)
        .map_err(|source| PartitionError::Io { context: "reading primary GPT entries", source })?;
    let (&number, last) = entries
        .iter()
        .filter(|(_, entry)| entry.is_used())
        .max_by_key(|(_, entry)| entry.last_lba)
        .ok_or(PartitionError::NothingToGrow)?;

    let mut outcome = GrowOutcome {
        partition_number: number,
        sector_size,
        first_lba: last.first_lba,
        old_last_lba: last.last_lba,
        new_last_lba: last.last_lba,
        backup_moved: false,
    };
    let new_backup_lba = disk_sectors.saturating_sub(1);
    if primary.backup_lba >= disk_sectors {
        return Err(PartitionError::DiskSmallerThanTable {
            table_sectors: primary.backup_lba + 1,
            disk_sectors,
        });
    }
    if primary.backup_lba == new_backup_lba {
        return Ok(outcome);
    }

    let new_primary = HeaderBuilder::from_header(&primary)
        .backup_lba(new_backup_lba)
        .primary(true)
        .build(block_size)
        .map_err(|source| PartitionError::Header { context: "building relocated GPT header", source })?;
    let new_backup = HeaderBuilder::from_header(&new_primary)
        .primary(false)
        .build(block_size)
        .map_err(|source| PartitionError::Header { context: "building backup GPT header", source })?;
    if primary.current_lba != 1 || primary.part_start != 2 {
        return Err(PartitionError::CorruptTable {
            detail: format!(
                "primary header at LBA {} with entries at LBA {} (expected 1 and 2)",
                primary.current_lba, primary.part_start
            ),
        });
    }
    if last.last_lba > primary.last_usable || last.first_lba > last.last_lba {
        return Err(PartitionError::CorruptTable {
            detail: format!(
                "partition {number} spans LBA {}..={}, the last usable LBA is {}",
                last.first_lba, last.last_lba, primary.last_usable
            ),
        });
    }
    let align = alignment_sectors(sector);
    let aligned_end = (new_primary.last_usable + 1) / align * align;
    outcome.new_last_lba = last.last_lba.max(aligned_end.saturating_sub(1));

    // Patch only the grown entry's end; every other byte of the array is carried over as is.
    let array_len = u64::from(primary.num_parts) * u64::from(primary.part_size);
    let mut array = vec![0u8; array_len as usize];
    disk.read_exact_at(&mut array, primary.part_start * sector)
        .map_err(|source| PartitionError::Io { context: "reading primary GPT entries", source })?;
    let entry_offset = (number as usize - 1) * primary.part_size as usize + ENTRY_LAST_LBA_OFFSET;
    array[entry_offset..entry_offset + 8].copy_from_slice(&outcome.new_last_lba.to_le_bytes());

    // Backup first: until the primary header is rewritten, it still describes the old, intact layout.
    write_all_at(disk, &array, new_backup.part_start * sector, "writing backup GPT entries")?;
    write_header(disk, new_backup, block_size, false)?;
    write_all_at(disk, &array, new_primary.part_start * sector, "writing primary GPT entries")?;
    write_header(disk, new_primary, block_size, true)?;
    outcome.backup_moved = true;

    clear_old_backup_header(disk, sector_size, primary.backup_lba, &entries)?;
    update_protective_mbr(disk, sector_size, disk_sectors)?;
    disk.sync_all()
        .map_err(|source| PartitionError::Io { context: "syncing disk after moving GPT", source })?;
    Ok(outcome)
}

fn write_header(
    disk: &File,
    mut header: Header,
    block_size: LogicalBlockSize,
    primary: bool,
) -> Result<(), PartitionError> {
    let mut device = disk;
    // Both compute the entry array checksum from what is on the disk, so the array goes first.
    let written = if primary {
        header.write_primary(&mut device, block_size)
    } else {
        header.write_backup(&mut device, block_size)
    };
    written.map(drop).map_err(|source| PartitionError::Header {
        context: if primary { "writing primary GPT header" } else { "writing backup GPT header" },
        source,
    })
}

/// Zeroes the old backup header sector if it holds a GPT header and lies past every partition, so that
/// only one backup header remains on the disk.
fn clear_old_backup_header(
    disk: &File,
    sector_size: u32,
    old_backup_lba: u64,
    entries: &BTreeMap<u32, Partition>,
) -> Result<(), PartitionError> {
    let sector = u64::from(sector_size);
    if entries.values().any(|entry| entry.is_used() && entry.last_lba >= old_backup_lba) {
        return Ok(());
    }
    let mut old_header = vec![0u8; sector_size as usize];
    disk.read_exact_at(&mut old_header, old_backup_lba * sector)
        .map_err(|source| PartitionError::Io { context: "reading old backup GPT header", source })?;
    if old_header.starts_with(b"EFI PART") {
        old_header.fill(0);
        write_all_at(disk, &old_header, old_backup_lba * sector, "clearing old backup GPT header")?;
    }
    Ok(())
}

/// Resizes the 0xEE partition of an existing protective MBR to the new disk, keeping the boot code
/// and disk signature. A hybrid MBR (other partitions beside the 0xEE one) is left alone; a missing
/// MBR is replaced by a fresh protective one.
fn update_protective_mbr(disk: &File, sector_size: u32, disk_sectors: u64) -> Result<(), PartitionError> {
    let mut device = disk;
    let block_size = logical_block_size(sector_size)?;
    let mut mbr = match ProtectiveMBR::from_disk(&mut device, block_size) {
        Ok(mbr) => mbr,
        Err(MBRError::InvalidMBRSignature) => {
            return write_sector0_protective_mbr(disk, sector_size, disk_sectors);
        }
        Err(source) => return Err(PartitionError::Mbr { context: "reading protective MBR", source }),
    };
    let used: Vec<(usize, PartRecord)> = (0..4)
        .filter_map(|index| mbr.partition(index).map(|record| (index, record)))
        .filter(|(_, record)| record.os_type != 0)
        .collect();
    let [(index, mut record)] = used[..] else {
        return Ok(());
    };
    if record.os_type != PROTECTIVE_MBR_TYPE || record.lb_start != 1 {
        return Ok(());
    }
    record.lb_size = protective_size(disk_sectors);
    mbr.set_partition(index, record);
    mbr.update_conservative(&mut device)
        .map(drop)
        .map_err(|source| PartitionError::Mbr { context: "updating protective MBR", source })
}

/// Writes a fresh protective MBR over all of LBA 0 (the MBR is 512 bytes; the rest of a 4096-byte
/// sector is zeroed).
fn write_sector0_protective_mbr(
    disk: &File,
    sector_size: u32,
    disk_sectors: u64,
) -> Result<(), PartitionError> {
    let mbr = ProtectiveMBR::with_lb_size(protective_size(disk_sectors));
    let mut sector0 = vec![0u8; sector_size as usize];
    sector0[..512].copy_from_slice(&mbr.to_bytes());
    write_all_at(disk, &sector0, 0, "writing protective MBR")
}

/// The protective partition covers LBA 1 to the end of the disk, capped at what 32 bits can say.
fn protective_size(disk_sectors: u64) -> u32 {
    u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX)
}

/// Refuses plans whose fields were changed into something that is not a valid GPT, since the `gpt`
/// crate writes whatever it is given.
fn check_plan(plan: &GptPlan) -> Result<(), PartitionError> {
    let invalid = |detail: String| Err(PartitionError::InvalidPlan { detail });
    if plan.partitions.is_empty() || plan.partitions.len() as u64 > ENTRY_COUNT {
        return invalid(format!("{} partitions (must be 1 to {ENTRY_COUNT})", plan.partitions.len()));
    }
    let first_usable = plan.first_usable_lba();
    let last_usable = plan.last_usable_lba();
    let mut previous_end: Option<u64> = None;
    for (index, partition) in plan.partitions.iter().enumerate() {
        let number = partition.number;
        if number as usize != index + 1 {
            return invalid(format!("partition at position {} has number {number}", index + 1));
        }
        if partition.sector_size != plan.sector_size {
            return invalid(format!("partition {number} has sector size {}", partition.sector_size));
        }
        if partition.first_lba < first_usable
            || partition.last_lba > last_usable
            || partition.first_lba > partition.last_lba
        {
            return invalid(format!(
                "partition {number} spans LBA {}..={}, outside the usable LBA {first_usable}..={last_usable}",
                partition.first_lba, partition.last_lba
            ));
        }
        if previous_end.is_some_and(|end| partition.first_lba <= end) {
            return invalid(format!("partition {number} overlaps partition {}", number - 1));
        }
        if partition.type_guid.is_nil() {
            return invalid(format!("partition {number} has a nil type GUID"));
        }
        if partition.label.encode_utf16().count() > MAX_LABEL_UTF16_UNITS {
            return invalid(format!("partition {number} label is longer than 36 UTF-16 units"));
        }
        previous_end = Some(partition.last_lba);
    }
    Ok(())
}

/// The `gpt` crate asserts 128-byte entries and allocates the whole entry array, so headers are checked
/// before it reads them.
fn check_entry_arrays(disk: &File, sector_size: u32, disk_sectors: u64) -> Result<(), PartitionError> {
    let mut header_lbas = vec![1];
    if disk_sectors > 2 {
        header_lbas.push(disk_sectors - 1);
    }
    for lba in header_lbas {
        let mut header = [0u8; 92];
        match disk.read_exact_at(&mut header, lba * u64::from(sector_size)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => continue,
            Err(source) => return Err(PartitionError::Io { context: "reading GPT header", source }),
        }
        if !header.starts_with(b"EFI PART") {
            continue;
        }
        let field =
            |offset: usize| u32::from_le_bytes(header[offset..offset + 4].try_into().expect("4-byte slice"));
        let entry_count = field(HEADER_ENTRY_COUNT_OFFSET);
        let entry_size = field(HEADER_ENTRY_SIZE_OFFSET);
        if entry_size != 128 || entry_count == 0 || entry_count > MAX_ENTRY_COUNT_ON_DISK {
            return Err(PartitionError::UnsupportedEntryArray { entry_count, entry_size });
        }
    }
    Ok(())
}

/// A missing signature or a disk too short to hold a header means there is no table at all.
fn means_no_table(error: &HeaderError) -> bool {
    match error {
        HeaderError::InvalidGptSignature | HeaderError::ToSmallForBackup => true,
        HeaderError::Io(io_error) => io_error.kind() == io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

fn logical_block_size(sector_size: u32) -> Result<LogicalBlockSize, PartitionError> {
    if !is_supported_sector_size(sector_size) {
        return Err(PartitionError::UnsupportedSectorSize { sector_size });
    }
    LogicalBlockSize::try_from(u64::from(sector_size))
        .map_err(|_| PartitionError::UnsupportedSectorSize { sector_size })
}

/// Size in bytes of a regular file or block device (a device's metadata says 0, so seek to the end).
fn disk_size(disk: &File) -> Result<u64, PartitionError> {
    let mut device = disk;
    device
        .seek(SeekFrom::End(0))
        .map_err(|source| PartitionError::Io { context: "reading disk size", source })
}

fn write_all_at(disk: &File, bytes: &[u8], offset: u64, context: &'static str) -> Result<(), PartitionError> {
    disk.write_all_at(bytes, offset).map_err(|source| PartitionError::Io { context, source })
}
