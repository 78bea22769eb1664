//! Every way a layout can be refused, and the message a user gets for it.

use gridforge_agent::partition::{self, LayoutError, PartitionRequest};
use gridforge_proto::v1::partition::Role;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn request(label: &str, role: Role, size_bytes: Option<u64>) -> PartitionRequest {
    PartitionRequest { label: label.to_owned(), role, size_bytes }
}

fn esp_and_root() -> Vec<PartitionRequest> {
    vec![request("esp", Role::Esp, Some(256 * MIB)), request("root", Role::Root, None)]
}

fn refused(requests: &[PartitionRequest], disk_size: u64, sector_size: u32) -> LayoutError {
    match partition::plan(requests, disk_size, sector_size) {
        Ok(plan) => panic!("layout was accepted: {plan:?}"),
        Err(error) => error,
    }
}

/// Each per-partition message names the partition by number and label.
fn assert_names(error: &LayoutError, number: u32, label: &str) {
    let message = error.to_string();
    assert!(message.contains(&format!("partition {number} (\"{label}\")")), "message: {message}");
}

#[test]
fn no_partitions() {
    let error = refused(&[], GIB, 512);
    assert_eq!(error, LayoutError::NoPartitions);
    assert_eq!(error.to_string(), "layout has no partitions");
}

#[test]
fn zero_size_partition() {
    let requests = [request("esp", Role::Esp, Some(0)), request("root", Role::Root, None)];
    let error = refused(&requests, GIB, 512);
    assert!(matches!(error, LayoutError::ZeroSize { number: 1, .. }), "{error:?}");
    assert_names(&error, 1, "esp");
}

#[test]
fn size_not_a_sector_multiple() {
    // 512-byte multiple, but not a 4096-byte one.
    let requests = [request("esp", Role::Esp, Some(256 * MIB + 512)), request("root", Role::Root, None)];
    assert!(partition::plan(&requests, GIB, 512).is_ok());
    let error = refused(&requests, GIB, 4096);
    assert!(
        matches!(error, LayoutError::SizeNotSectorMultiple { number: 1, sector_size: 4096, .. }),
        "{error:?}"
    );
    assert_names(&error, 1, "esp");
}

#[test]
fn unspecified_role() {
    let requests = [request("esp", Role::Esp, Some(MIB)), request("mystery", Role::Unspecified, None)];
    let error = refused(&requests, GIB, 512);
    assert!(matches!(error, LayoutError::UnspecifiedRole { number: 2, .. }), "{error:?}");
    assert_names(&error, 2, "mystery");
}

#[test]
fn rest_not_last() {
    let requests = [request("root", Role::Root, None), request("swap", Role::Swap, Some(MIB))];
    let error = refused(&requests, GIB, 512);
    assert!(matches!(error, LayoutError::RestNotLast { number: 1, .. }), "{error:?}");
    assert_names(&error, 1, "root");
}

#[test]
fn more_than_one_rest() {
    let requests = [request("root", Role::Root, None), request("data", Role::Data, None)];
    let error = refused(&requests, GIB, 512);
    assert!(matches!(error, LayoutError::MultipleRest { number: 2, first_number: 1, .. }), "{error:?}");
    assert_names(&error, 2, "data");
}

#[test]
fn label_too_long() {
    let fits = "x".repeat(36);
    assert!(partition::plan(&[request(&fits, Role::Root, None)], GIB, 512).is_ok());
    let too_long = "x".repeat(37);
    let error = refused(&[request(&too_long, Role::Root, None)], GIB, 512);
    assert!(matches!(error, LayoutError::LabelTooLong { number: 1, units: 37, .. }), "{error:?}");
    assert_names(&error, 1, &too_long);
    // Counted in UTF-16 units, not chars: 19 characters outside the BMP take 38 units.
    let astral = "\u{1F600}".repeat(19);
    let error = refused(&[request(&astral, Role::Root, None)], GIB, 512);
    assert!(matches!(error, LayoutError::LabelTooLong { units: 38, .. }), "{error:?}");
}

#[test]
fn duplicate_labels() {
    let requests = [
        request("esp", Role::Esp, Some(MIB)),
        request("data", Role::Data, Some(MIB)),
        request("data", Role::Data, None),
    ];
    let error = refused(&requests, GIB, 512);
    assert!(matches!(error, LayoutError::DuplicateLabel { number: 3, first_number: 2, .. }), "{error:?}");
    assert_names(&error, 3, "data");
}

#[test]
fn layout_larger_than_the_disk() {
    let requests = [
        request("esp", Role::Esp, Some(256 * MIB)),
        request("root", Role::Root, Some(GIB)),
        request("data", Role::Data, None),
    ];
    let error = refused(&requests, GIB, 512);
    // 1 MiB head + 256 MiB + 1 GiB + at least 1 MiB for the rest + the backup table.
    assert_eq!(
        error,
        LayoutError::DoesNotFit { number: 2, label: "root".into(), needed_mib: 1283, available_mib: 1024 }
    );
    assert_names(&error, 2, "root");
    let message = error.to_string();
    assert!(message.contains("1283 MiB") && message.contains("1024 MiB"), "{message}");
}

#[test]
fn rest_with_no_room_left() {
    // The fixed partition fills the disk, so the rest partition gets nothing.
    let requests = [request("root", Role::Root, Some(1022 * MIB)), request("data", Role::Data, None)];
    let error = refused(&requests, GIB, 4096);
    assert!(matches!(error, LayoutError::DoesNotFit { number: 2, .. }), "{error:?}");
    assert_names(&error, 2, "data");
}

#[test]
fn disk_too_small_for_a_gpt() {
    let error = refused(&esp_and_root(), MIB, 512);
    assert!(matches!(error, LayoutError::DiskTooSmall { disk_size: MIB, .. }), "{error:?}");
    assert!(error.to_string().contains("too small for a GPT"), "{error}");
    // The smallest disk that holds one 1 MiB partition is accepted.
    let LayoutError::DiskTooSmall { minimum_size, .. } = error else { unreachable!() };
    let plan = partition::plan(&[request("root", Role::Root, None)], minimum_size, 512).unwrap();
    assert_eq!(plan.partitions[0].size_bytes(), MIB);
}

#[test]
fn unsupported_sector_size() {
    for sector_size in [0, 520, 1024, 2048, 8192] {
        let error = refused(&esp_and_root(), GIB, sector_size);
        assert_eq!(error, LayoutError::UnsupportedSectorSize { sector_size });
    }
}

#[test]
fn too_many_partitions() {
    let requests: Vec<_> = (0..129).map(|i| request(&format!("p{i}"), Role::Data, Some(MIB))).collect();
    let error = refused(&requests, 10 * GIB, 512);
    assert!(matches!(error, LayoutError::TooManyPartitions { count: 129, .. }), "{error:?}");
    assert!(partition::plan(&requests[..128], 10 * GIB, 512).is_ok());
}

#[test]
fn plan_assigns_types_guids_and_alignment() {
    let requests = [
        request("esp", Role::Esp, Some(256 * MIB)),
        request("root", Role::Root, Some(2 * GIB)),
        request("swap", Role::Swap, Some(512 * MIB)),
        request("data", Role::Data, None),
    ];
    for sector_size in [512u32, 4096] {
        let disk_size = 4 * GIB;
        let plan = partition::plan(&requests, disk_size, sector_size).unwrap();
        assert_eq!((plan.sector_size, plan.disk_size), (sector_size, disk_size));
        let types: Vec<String> = plan.partitions.iter().map(|p| p.type_guid.to_string()).collect();
        assert_eq!(
            types,
            [
                "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
                "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
                "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f",
                "0fc63daf-8483-4772-8e79-3d69d8477de4",
            ]
        );
        let offsets: Vec<u64> = plan.partitions.iter().map(|p| p.offset_bytes() / MIB).collect();
        assert_eq!(offsets, [1, 257, 2305, 2817]);
        assert_eq!(plan.partitions[3].size_bytes() % MIB, 0);
        assert!(plan.partitions[3].last_lba <= plan.last_usable_lba());
        let mut guids: Vec<_> = plan.partitions.iter().map(|p| p.part_guid).collect();
        guids.push(plan.disk_guid);
        guids.sort();
        guids.dedup();
        assert_eq!(guids.len(), 5, "GUIDs must be distinct");
        assert!(guids.iter().all(|guid| guid.get_version_num() == 4));
    }
}
