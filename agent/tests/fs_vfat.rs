//! FAT32 written into a partition range, checked with fsck.vfat, blkid and read back with fatfs.

mod fs_support;

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::path::Path;

use fs_support::{LoopDevice, MIB, assert_filled, blkid, fill, pattern, run, run_ok, sparse_disk};
use gridforge_agent::fs::{FsError, Probed, RangeIo, probe, vfat};
use gridforge_proto::v1::Filesystem;

/// An ESP-like tree: systemd-boot layout plus enough entries that `loader/entries` spans several clusters.
fn esp_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_owned(), pattern(300_000, 1)),
        ("loader/loader.conf".to_owned(), b"default a.conf\ntimeout 0\n".to_vec()),
        (
            "loader/entries/a.conf".to_owned(),
            b"title Debian\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=UUID=x ro\n".to_vec(),
        ),
        ("vmlinuz".to_owned(), pattern(1_500_000, 2)),
        ("empty".to_owned(), Vec::new()),
    ];
    for i in 0..20 {
        files.push((format!("loader/entries/entry-with-a-long-name-{i:02}.conf"), pattern(700, i)));
    }
    for (path, data) in &files {
        let host = root.join(path);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(host, data).unwrap();
    }
    fs::create_dir_all(root.join("EFI/Linux")).unwrap();
    files
}

fn read_back(disk: &fs::File, offset: u64, len: u64, path: &str) -> Vec<u8> {
    let fs = fatfs::FileSystem::new(RangeIo::new(disk, offset, len), fatfs::FsOptions::new()).unwrap();
    let mut data = Vec::new();
    fs.root_dir().open_file(path).unwrap().read_to_end(&mut data).unwrap();
    data
}

fn fsck_vfat(device: &LoopDevice) {
    fsck_vfat_at(device.path_str());
}

fn fsck_vfat_at(path: &str) {
    let out = run_ok("fsck.vfat", &["-n", path]);
    // A clean volume prints only the version line and the summary; anything else is a finding.
    for line in out.lines().filter(|line| !line.trim().is_empty()) {
        assert!(line.starts_with("fsck.fat ") || line.contains(" files, "), "fsck.vfat -n reported: {out}");
    }
}

#[test]
fn fat32_with_tree_passes_fsck_and_reads_back() {
    let disk = sparse_disk(64 * MIB);
    let (offset, len) = (MIB, 40 * MIB);
    fill(&disk.file, offset + len, MIB, 0xAA);
    let tree = tempfile::tempdir().unwrap();
    let files = esp_tree(tree.path());

    let info = vfat::format(&disk.file, offset, len, 512, "esp ", Some(tree.path())).unwrap();
    assert_eq!(info.kind, Filesystem::Vfat);
    assert_eq!(info.label, "ESP");
    assert!(
        info.uuid.len() == 9
            && info.uuid.as_bytes()[4] == b'-'
            && info.uuid.chars().all(|c| c == '-' || c.is_ascii_digit() || c.is_ascii_uppercase()),
        "uuid {}",
        info.uuid
    );

    let device = LoopDevice::attach(&disk.path, offset, Some(len), 512);
    fsck_vfat(&device);
    let tags = blkid(&disk.path, offset);
    assert_eq!(tags["TYPE"], "vfat");
    assert_eq!(tags["VERSION"], "FAT32");
    assert_eq!(tags["UUID"], info.uuid);
    assert_eq!(tags["LABEL"], "ESP");

    for (path, data) in &files {
        assert_eq!(&read_back(&disk.file, offset, len, path), data, "{path}");
    }
    let fs = fatfs::FileSystem::new(RangeIo::new(&disk.file, offset, len), fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
    assert!(fs.root_dir().open_dir("EFI/Linux").is_ok());
    drop(fs);

    assert_filled(&disk.file, 0, offset, 0, "bytes before the partition");
    assert_filled(&disk.file, offset + len, MIB, 0xAA, "bytes after the partition");
    assert_eq!(probe(&disk.file, offset, len).unwrap(), Some(Probed::Filesystem(info)));
}

#[test]
fn fat32_on_4096_byte_sectors_passes_fsck() {
    let disk = sparse_disk(300 * MIB);
    let whole = LoopDevice::attach(&disk.path, 0, None, 4096);
    let target = OpenOptions::new().read(true).write(true).open(whole.path()).unwrap();
    let (offset, len) = (MIB, vfat::fat32_min_bytes(4096) + 16 * MIB);
    let tree = tempfile::tempdir().unwrap();
    let files = esp_tree(tree.path());

    let info = vfat::format(&target, offset, len, 4096, "EFI", Some(tree.path())).unwrap();
    target.sync_all().unwrap();

    let partition = LoopDevice::attach(&disk.path, offset, Some(len), 4096);
    fsck_vfat(&partition);
    let tags = blkid(partition.path(), 0);
    assert_eq!(tags["TYPE"], "vfat");
    assert_eq!(tags["UUID"], info.uuid);
    assert_eq!(tags["LABEL"], "EFI");
    let fs = fatfs::FileSystem::new(RangeIo::new(&target, offset, len), fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
    assert_eq!(fs.cluster_size() % 4096, 0);
    drop(fs);
    for (path, data) in &files {
        assert_eq!(&read_back(&target, offset, len, path), data, "{path}");
    }
}

/// The clone's loader-entry edit, growing the text past its cluster so fatfs allocates: the text reads back
/// edited, every other file as it was, the volume passes fsck and nothing outside the range changes.
#[test]
fn edit_file_rewrites_a_loader_entry_and_the_volume_stays_clean() {
    let disk = sparse_disk(64 * MIB);
    let (offset, len) = (MIB, 40 * MIB);
    fill(&disk.file, offset + len, MIB, 0xAA);
    let tree = tempfile::tempdir().unwrap();
    let files = esp_tree(tree.path());
    vfat::format(&disk.file, offset, len, 512, "ESP", Some(tree.path())).unwrap();

    let entry = "loader/entries/a.conf";
    let edit = |text: &str| text.replace("root=UUID=x", "root=UUID=new") + &"# padding\n".repeat(100);
    vfat::edit_file(&disk.file, offset, len, entry, edit).unwrap();
    for (path, data) in &files {
        let expected =
            if path == entry { edit(std::str::from_utf8(data).unwrap()).into_bytes() } else { data.clone() };
        assert_eq!(read_back(&disk.file, offset, len, path), expected, "{path}");
    }
    fsck_vfat(&LoopDevice::attach(&disk.path, offset, Some(len), 512));
    assert_filled(&disk.file, 0, offset, 0, "bytes before the partition");
    assert_filled(&disk.file, offset + len, MIB, 0xAA, "bytes after the partition");
}

/// An ESP made by the stock tools (mkfs.fat names the root 0 in `..`, mtools lays out its own entries) passes
/// the checks `edit_file` makes before fatfs reads it.
#[test]
fn edit_file_edits_an_esp_made_by_mkfs_fat_and_mtools() {
    let disk = sparse_disk(40 * MIB);
    let image = disk.path.to_str().unwrap();
    run_ok("mkfs.fat", &["-F", "32", "-s", "1", "-n", "ESP", image]);
    let text = disk.dir.path().join("gridforge.conf");
    fs::write(&text, "options root=UUID=old ro\n").unwrap();
    run_ok("mmd", &["-i", image, "::loader", "::loader/entries", "::EFI", "::EFI/BOOT"]);
    run_ok("mcopy", &["-i", image, text.to_str().unwrap(), "::loader/entries/gridforge.conf"]);

    let path = "loader/entries/gridforge.conf";
    vfat::edit_file(&disk.file, 0, 40 * MIB, path, |text| text.replace("UUID=old", "UUID=new")).unwrap();
    assert_eq!(read_back(&disk.file, 0, 40 * MIB, path), b"options root=UUID=new ro\n");
    fsck_vfat_at(image);
}

#[test]
fn fat32_at_exactly_the_minimum_size_and_below() {
    let needed = vfat::fat32_min_bytes(512);
    let disk = sparse_disk(MIB + needed + MIB);
    let err = vfat::format(&disk.file, MIB, needed - 512, 512, "", None).unwrap_err();
    assert!(matches!(err, FsError::TooSmall { needed: n, .. } if n == needed), "unexpected error: {err}");
    assert!(err.to_string().contains(&needed.to_string()), "{err}");

    let info = vfat::format(&disk.file, MIB, needed, 512, "", None).unwrap();
    assert_eq!(info.label, "");
    let device = LoopDevice::attach(&disk.path, MIB, Some(needed), 512);
    fsck_vfat(&device);
    assert_eq!(blkid(&disk.path, MIB)["VERSION"], "FAT32");
    drop(device);

    let needed = vfat::fat32_min_bytes(4096);
    let disk = sparse_disk(MIB + needed);
    let err = vfat::format(&disk.file, MIB, needed - 4096, 4096, "", None).unwrap_err();
    assert!(matches!(err, FsError::TooSmall { needed: n, .. } if n == needed), "{err}");
    vfat::format(&disk.file, MIB, needed, 4096, "", None).unwrap();
    let fs = fatfs::FileSystem::new(RangeIo::new(&disk.file, MIB, needed), fatfs::FsOptions::new()).unwrap();
    assert_eq!(fs.fat_type(), fatfs::FatType::Fat32);
}

#[test]
fn bad_labels_and_file_types_are_refused() {
    let disk = sparse_disk(48 * MIB);
    for label in ["TWELVECHARSX", "A/B", "é", " LEADING"] {
        let err = vfat::format(&disk.file, MIB, 40 * MIB, 512, label, None).unwrap_err();
        assert!(matches!(err, FsError::InvalidLabel { .. }), "{label}: {err}");
    }
    let tree = tempfile::tempdir().unwrap();
    fs::create_dir(tree.path().join("dir")).unwrap();
    std::os::unix::fs::symlink("target", tree.path().join("dir/link")).unwrap();
    let err = vfat::format(&disk.file, MIB, 40 * MIB, 512, "ESP", Some(tree.path())).unwrap_err();
    assert!(matches!(err, FsError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("dir/link"), "{err}");

    let err = vfat::format(&disk.file, MIB, 48 * MIB, 512, "ESP", None).unwrap_err();
    assert!(matches!(err, FsError::OutOfRange { .. }), "{err}");
}

#[test]
fn probe_reads_fat_made_by_mkfs_fat() {
    let disk = sparse_disk(80 * MIB);
    for (fat_bits, size) in [("16", 16 * MIB), ("32", 40 * MIB)] {
        let device = LoopDevice::attach(&disk.path, MIB, Some(size), 512);
        let out = run("mkfs.fat", &["-F", fat_bits, "-i", "ABCD1234", "-n", "MKFSLBL", device.path_str()]);
        assert!(out.status.success(), "mkfs.fat: {}", String::from_utf8_lossy(&out.stderr));
        drop(device);
        let tags = blkid(&disk.path, MIB);
        let expected = Probed::Filesystem(gridforge_agent::fs::FsInfo {
            kind: Filesystem::Vfat,
            uuid: "ABCD-1234".into(),
            label: "MKFSLBL".into(),
        });
        assert_eq!(tags["UUID"], "ABCD-1234");
        assert_eq!(probe(&disk.file, MIB, size).unwrap(), Some(expected), "FAT{fat_bits}");
    }
}
