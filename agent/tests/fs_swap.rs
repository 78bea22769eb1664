//! Swap headers written natively, read by blkid and swaplabel.

mod fs_support;

use fs_support::{LoopDevice, MIB, assert_filled, blkid, fill, run_ok, sparse_disk};
use gridforge_agent::fs::{FsError, Probed, probe, swap};
use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

#[test]
fn swap_header_is_read_by_blkid_and_swaplabel() {
    let disk = sparse_disk(16 * MIB);
    let (offset, len) = (MIB, 8 * MIB);
    // An old signature at the start of the range must not survive.
    fill(&disk.file, offset, 2 * MIB, 0x77);
    fill(&disk.file, offset + len, MIB, 0xAA);
    let uuid = Uuid::new_v4();

    let info = swap::make(&disk.file, offset, len, uuid, "guest-swap").unwrap();
    assert_eq!(info.kind, Filesystem::Swap);
    assert_eq!(info.uuid, uuid.hyphenated().to_string());

    let tags = blkid(&disk.path, offset);
    assert_eq!(tags["TYPE"], "swap");
    assert_eq!(tags["UUID"], info.uuid);
    assert_eq!(tags["LABEL"], "guest-swap");
    assert_eq!(tags["VERSION"], "1");

    let device = LoopDevice::attach(&disk.path, offset, Some(len), 512);
    let out = run_ok("swaplabel", &[device.path_str()]);
    assert!(out.contains(&format!("UUID:  {uuid}")) || out.contains(&uuid.to_string()), "{out}");
    assert!(out.contains("guest-swap"), "{out}");
    drop(device);

    assert_filled(&disk.file, offset + 4096, 2 * MIB - 4096, 0, "cleared start of the range");
    assert_filled(&disk.file, offset + len, MIB, 0xAA, "bytes after the partition");
    assert_eq!(probe(&disk.file, offset, len).unwrap(), Some(Probed::Filesystem(info)));
}

#[test]
fn swap_refuses_small_ranges_and_long_labels() {
    let disk = sparse_disk(2 * MIB);
    let err = swap::make(&disk.file, MIB, 9 * 4096, Uuid::new_v4(), "").unwrap_err();
    assert!(matches!(err, FsError::TooSmall { needed: 40960, .. }), "{err}");
    let err = swap::make(&disk.file, 0, MIB, Uuid::new_v4(), "seventeen-bytes-x").unwrap_err();
    assert!(matches!(err, FsError::InvalidLabel { .. }), "{err}");
    // Ten pages is the smallest area mkswap makes.
    let info = swap::make(&disk.file, MIB, 10 * 4096, Uuid::new_v4(), "").unwrap();
    assert_eq!(blkid(&disk.path, MIB)["UUID"], info.uuid);
}
