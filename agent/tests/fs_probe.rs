//! Probing ranges: LUKS made by cryptsetup, nothing, and a range overwritten by another kind.

mod common;
mod fs_support;

use std::fs;

use fs_support::{LoopDevice, MIB, sparse_disk};
use gridforge_agent::fs::{Probed, probe, swap, vfat};
use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

#[test]
fn probe_reads_luks2_made_by_cryptsetup() {
    let disk = sparse_disk(40 * MIB);
    let key = disk.dir.path().join("key");
    fs::write(&key, "passphrase").unwrap();
    let device = LoopDevice::attach(&disk.path, MIB, Some(32 * MIB), 512);
    let uuid = Uuid::new_v4().to_string();
    common::luks_format_fast(
        device.path_str(),
        key.to_str().unwrap(),
        &["--uuid", &uuid, "--label", "crypt-root"],
    );
    drop(device);
    assert_eq!(
        probe(&disk.file, MIB, 32 * MIB).unwrap(),
        Some(Probed::Luks { version: 2, uuid, label: "crypt-root".into() })
    );
}

#[test]
fn probe_finds_nothing_in_zeros_and_follows_reformatting() {
    let disk = sparse_disk(48 * MIB);
    assert_eq!(probe(&disk.file, MIB, 40 * MIB).unwrap(), None);

    let swap_info = swap::make(&disk.file, MIB, 40 * MIB, Uuid::new_v4(), "old").unwrap();
    assert_eq!(probe(&disk.file, MIB, 40 * MIB).unwrap(), Some(Probed::Filesystem(swap_info)));
    let fat_info = vfat::format(&disk.file, MIB, 40 * MIB, 512, "NEW", None).unwrap();
    assert_eq!(fat_info.kind, Filesystem::Vfat);
    assert_eq!(probe(&disk.file, MIB, 40 * MIB).unwrap(), Some(Probed::Filesystem(fat_info)));
    // A range too short for any signature.
    assert_eq!(probe(&disk.file, MIB, 100).unwrap(), None);
}
