//! Planning a layout: validation, 1 MiB alignment, the rest of the disk, GUIDs. No I/O.

use std::collections::HashMap;

use gridforge_proto::v1::partition::Role;
use uuid::Uuid;

use super::{
    ALIGNMENT_BYTES, ENTRY_COUNT, GptPlan, LayoutError, MAX_LABEL_UTF16_UNITS, PartitionRequest,
    PlannedPartition, alignment_sectors, backup_area_sectors, first_usable_lba, is_supported_sector_size,
    type_guid_for_role,
};

/// Plans a GPT for a disk of `disk_size` bytes with `sector_size`-byte logical sectors.
///
/// Partitions are laid out in request order, each starting on a 1 MiB boundary, the first at 1 MiB.
/// A request without a size takes the rest of the disk up to the last usable LBA, with its end rounded
/// down so its size is a whole number of MiB. Disk and partition GUIDs are fresh random (v4) UUIDs.
pub fn plan(requests: &[PartitionRequest], disk_size: u64, sector_size: u32) -> Result<GptPlan, LayoutError> {
    if !is_supported_sector_size(sector_size) {
        return Err(LayoutError::UnsupportedSectorSize { sector_size });
    }
    validate_requests(requests, sector_size)?;

    let sector = u64::from(sector_size);
    let align = alignment_sectors(sector);
    let backup_area = backup_area_sectors(sector);
    let disk_sectors = disk_size / sector;
    // The smallest useful disk: 1 MiB for the MBR and primary table, one 1 MiB partition, the backup.
    let minimum_sectors = 2 * align + backup_area;
    if disk_sectors < minimum_sectors {
        return Err(LayoutError::DiskTooSmall { disk_size, minimum_size: minimum_sectors * sector });
    }
    let last_usable = disk_sectors - backup_area - 1;
    // Where a "rest" partition ends: last usable LBA, rounded down to a whole MiB.
    let rest_end = (last_usable + 1) / align * align - 1;
    debug_assert!(first_usable_lba(sector) <= align);

    let mut partitions = Vec::with_capacity(requests.len());
    let mut first_overflow: Option<usize> = None;
    let mut next_free = align;
    for (index, request) in requests.iter().enumerate() {
        let first_lba = next_free.div_ceil(align).saturating_mul(align);
        let last_lba = match request.size_bytes {
            Some(size) => first_lba.saturating_add(size / sector - 1),
            // Counted as 1 MiB when it does not fit, to say how much disk the layout needs.
            None if rest_end >= first_lba => rest_end,
            None => first_lba.saturating_add(align - 1),
        };
        let fits = match request.size_bytes {
            Some(_) => last_lba <= last_usable,
            None => rest_end >= first_lba,
        };
        if !fits && first_overflow.is_none() {
            first_overflow = Some(index);
        }
        partitions.push(PlannedPartition {
            number: number_of(index),
            label: request.label.clone(),
            role: request.role,
            type_guid: type_guid_for_role(request.role).expect("roles are checked by validate_requests"),
            part_guid: Uuid::new_v4(),
            first_lba,
            last_lba,
            sector_size,
        });
        next_free = last_lba.saturating_add(1);
    }

    if let Some(index) = first_overflow {
        let layout_end = partitions.last().map_or(0, |p| p.last_lba);
        let needed_bytes = layout_end.saturating_add(1 + backup_area).saturating_mul(sector);
        return Err(LayoutError::DoesNotFit {
            number: number_of(index),
            label: requests[index].label.clone(),
            needed_mib: needed_bytes.div_ceil(ALIGNMENT_BYTES),
            available_mib: disk_size / ALIGNMENT_BYTES,
        });
    }

    Ok(GptPlan { disk_guid: Uuid::new_v4(), sector_size, disk_size, partitions })
}

/// Checks everything about the requests that does not depend on the disk size.
fn validate_requests(requests: &[PartitionRequest], sector_size: u32) -> Result<(), LayoutError> {
    if requests.is_empty() {
        return Err(LayoutError::NoPartitions);
    }
    if requests.len() as u64 > ENTRY_COUNT {
        return Err(LayoutError::TooManyPartitions { count: requests.len(), max: ENTRY_COUNT });
    }

    let mut rest_requests = requests.iter().enumerate().filter(|(_, request)| request.size_bytes.is_none());
    if let (Some((first, _)), Some((second, request))) = (rest_requests.next(), rest_requests.next()) {
        return Err(LayoutError::MultipleRest {
            number: number_of(second),
            label: request.label.clone(),
            first_number: number_of(first),
        });
    }

    let mut numbers_by_label: HashMap<&str, u32> = HashMap::new();
    for (index, request) in requests.iter().enumerate() {
        let number = number_of(index);
        let label = || request.label.clone();
        if request.role == Role::Unspecified {
            return Err(LayoutError::UnspecifiedRole { number, label: label() });
        }
        let units = request.label.encode_utf16().count();
        if units > MAX_LABEL_UTF16_UNITS {
            return Err(LayoutError::LabelTooLong { number, label: label(), units });
        }
        if !request.label.is_empty() {
            if let Some(&first_number) = numbers_by_label.get(request.label.as_str()) {
                return Err(LayoutError::DuplicateLabel { number, label: label(), first_number });
            }
            numbers_by_label.insert(&request.label, number);
        }
        match request.size_bytes {
            Some(0) => return Err(LayoutError::ZeroSize { number, label: label() }),
            Some(size_bytes) if size_bytes % u64::from(sector_size) != 0 => {
                return Err(LayoutError::SizeNotSectorMultiple {
                    number,
                    label: label(),
                    size_bytes,
                    sector_size,
                });
            }
            None if index + 1 != requests.len() => {
                return Err(LayoutError::RestNotLast { number, label: label() });
            }
            _ => {}
        }
    }
    Ok(())
}

/// GPT partition numbers are 1-based; at most 128 partitions are planned, so this cannot truncate.
fn number_of(index: usize) -> u32 {
    index as u32 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn request(label: &str, role: Role, size_bytes: Option<u64>) -> PartitionRequest {
        PartitionRequest { label: label.to_owned(), role, size_bytes }
    }

    #[test]
    fn rest_ends_on_a_mib_boundary() {
        for sector_size in [512u32, 4096] {
            let disk_size = 1000 * MIB + 12345;
            let plan = plan(
                &[request("esp", Role::Esp, Some(256 * MIB)), request("root", Role::Root, None)],
                disk_size,
                sector_size,
            )
            .unwrap();
            let root = &plan.partitions[1];
            assert_eq!(root.offset_bytes(), 257 * MIB);
            assert_eq!(root.size_bytes() % MIB, 0);
            assert!(root.last_lba <= plan.last_usable_lba());
            assert!(plan.last_usable_lba() - root.last_lba < MIB / u64::from(sector_size));
        }
    }

    #[test]
    fn unaligned_sizes_leave_a_gap_to_the_next_mib() {
        let plan = plan(
            &[request("a", Role::Data, Some(MIB + 512)), request("b", Role::Data, Some(MIB))],
            64 * MIB,
            512,
        )
        .unwrap();
        assert_eq!(plan.partitions[0].size_bytes(), MIB + 512);
        assert_eq!(plan.partitions[1].offset_bytes(), 3 * MIB);
    }

    #[test]
    fn a_layout_that_exactly_fills_the_disk_fits() {
        // 1 MiB head + 62 MiB + backup area (33 sectors) = the whole disk.
        let disk_size = 63 * MIB + 33 * 512;
        let plan = plan(&[request("a", Role::Data, Some(62 * MIB))], disk_size, 512).unwrap();
        assert_eq!(plan.partitions[0].last_lba, plan.last_usable_lba());
        let err = super::plan(&[request("a", Role::Data, Some(62 * MIB))], disk_size - 512, 512).unwrap_err();
        assert!(matches!(err, LayoutError::DoesNotFit { number: 1, .. }), "{err}");
    }
}
