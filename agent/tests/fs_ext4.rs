//! ext4 made by mke2fs inside a partition range, checked with e2fsck, blkid and debugfs; grown in place.

mod fs_support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use fs_support::{LoopDevice, MIB, assert_filled, blkid, fill, run_ok, sparse_disk};
use gridforge_agent::fs::{FsError, Probed, ext4, probe};
use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

fn offset_path(path: &Path, offset: u64) -> String {
    format!("{}?offset={offset}", path.display())
}

fn debugfs(path: &Path, offset: u64, request: &str) -> String {
    run_ok("debugfs", &["-R", request, &offset_path(path, offset)])
}

/// Block count and block size from `dumpe2fs -h`, as bytes.
fn fs_bytes(target: &str) -> u64 {
    let out = run_ok("dumpe2fs", &["-h", target]);
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in dumpe2fs output"))
            .trim()
            .parse()
            .unwrap()
    };
    field("Block count:") * field("Block size:")
}

fn root_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/default")).unwrap();
    fs::write(root.join("etc/hostname"), "guest-1\n").unwrap();
    fs::write(root.join("etc/default/grub"), "GRUB_TIMEOUT=0\n").unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("etc/secret"), "s3cret\n").unwrap();
    fs::set_permissions(root.join("etc/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("etc/hostname", root.join("hostname-link")).unwrap();
}

#[test]
fn ext4_with_tree_stays_inside_its_range() {
    let disk = sparse_disk(64 * MIB);
    let (offset, len) = (MIB, 32 * MIB);
    fill(&disk.file, offset + len, 4 * MIB, 0xAA);
    fill(&disk.file, 0, offset, 0x55);
    let tree = tempfile::tempdir().unwrap();
    root_tree(tree.path());
    let uuid = Uuid::new_v4();

    let info = ext4::make(&disk.path, offset, len, Some(tree.path()), uuid, "rootfs").unwrap();
    assert_eq!(info.kind, Filesystem::Ext4);
    assert_eq!(info.uuid, uuid.hyphenated().to_string());

    ext4::check(&disk.path, offset).unwrap();
    run_ok("e2fsck", &["-fn", &offset_path(&disk.path, offset)]);
    let tags = blkid(&disk.path, offset);
    assert_eq!(tags["TYPE"], "ext4");
    assert_eq!(tags["UUID"], info.uuid);
    assert_eq!(tags["LABEL"], "rootfs");
    assert_eq!(fs_bytes(&offset_path(&disk.path, offset)), len);

    assert_eq!(debugfs(&disk.path, offset, "cat /etc/hostname"), "guest-1\n");
    assert_eq!(debugfs(&disk.path, offset, "cat /etc/default/grub"), "GRUB_TIMEOUT=0\n");
    let stat = debugfs(&disk.path, offset, "stat /run.sh");
    assert!(stat.contains("Mode:  0755"), "{stat}");
    let stat = debugfs(&disk.path, offset, "stat /etc/secret");
    assert!(stat.contains("Mode:  0600"), "{stat}");
    let stat = debugfs(&disk.path, offset, "stat /hostname-link");
    assert!(stat.contains("Type: symlink") && stat.contains("\"etc/hostname\""), "{stat}");

    assert_filled(&disk.file, 0, offset, 0x55, "bytes before the partition");
    assert_filled(&disk.file, offset + len, 4 * MIB, 0xAA, "bytes after the partition");
    assert_eq!(probe(&disk.file, offset, len).unwrap(), Some(Probed::Filesystem(info)));
}

#[test]
fn ext4_grows_in_a_file_and_on_a_block_device() {
    let disk = sparse_disk(64 * MIB);
    let offset = MIB;
    ext4::make(&disk.path, offset, 16 * MIB, None, Uuid::new_v4(), "grow").unwrap();
    fill(&disk.file, offset + 40 * MIB, 4 * MIB, 0xAA);

    // Regular file: the partition grows from 16 to 24 MiB.
    ext4::grow(&disk.path, offset, 24 * MIB).unwrap();
    assert_eq!(fs::metadata(&disk.path).unwrap().len(), 64 * MIB, "target file length");
    ext4::check(&disk.path, offset).unwrap();
    assert_eq!(fs_bytes(&offset_path(&disk.path, offset)), 24 * MIB);

    // Block device: grows again to 40 MiB through `?offset=`.
    let whole = LoopDevice::attach(&disk.path, 0, None, 512);
    ext4::grow(whole.path(), offset, 40 * MIB).unwrap();
    ext4::check(whole.path(), offset).unwrap();
    assert_eq!(fs_bytes(&offset_path(whole.path(), offset)), 40 * MIB);
    drop(whole);

    assert_filled(&disk.file, offset + 40 * MIB, 4 * MIB, 0xAA, "bytes after the grown partition");
    let err = ext4::grow(&disk.path, offset, 20 * MIB).unwrap_err();
    assert!(matches!(err, FsError::Unsupported(_)), "{err}");
}

#[test]
fn mke2fs_failure_carries_its_stderr() {
    let disk = sparse_disk(40 * MIB);
    let missing = disk.dir.path().join("no-such-tree");
    let err = ext4::make(&disk.path, MIB, 32 * MIB, Some(&missing), Uuid::new_v4(), "x").unwrap_err();
    match &err {
        FsError::Tool { tool, stderr, .. } => {
            assert_eq!(*tool, "mke2fs");
            assert!(stderr.contains("no-such-tree"), "stderr: {stderr}");
        }
        other => panic!("expected a tool error, got {other}"),
    }
    assert!(err.to_string().contains("no-such-tree"), "{err}");

    let err = ext4::make(&disk.path, MIB, 32 * MIB, None, Uuid::new_v4(), "seventeen-bytes-x").unwrap_err();
    assert!(matches!(err, FsError::InvalidLabel { .. }), "{err}");
    let err = ext4::make(&disk.path, MIB, 40 * MIB, None, Uuid::new_v4(), "x").unwrap_err();
    assert!(matches!(err, FsError::OutOfRange { .. }), "{err}");
}

#[test]
fn check_reports_a_damaged_file_system() {
    let disk = sparse_disk(40 * MIB);
    ext4::make(&disk.path, MIB, 32 * MIB, None, Uuid::new_v4(), "").unwrap();
    // Zero the block group descriptors (block 1 of a 4 KiB-block file system).
    fill(&disk.file, MIB + 4096, 4096, 0);
    let err = ext4::check(&disk.path, MIB).unwrap_err();
    assert!(matches!(err, FsError::Tool { tool: "e2fsck", .. }), "{err}");
}

#[test]
fn ext4_on_a_block_device_stays_inside_its_range() {
    // mke2fs discards the blocks it formats; on a block device that must stay inside the range too.
    let disk = sparse_disk(48 * MIB);
    let (offset, len) = (MIB, 32 * MIB);
    fill(&disk.file, 0, offset, 0x55);
    fill(&disk.file, offset + len, 8 * MIB, 0xAA);
    let whole = LoopDevice::attach(&disk.path, 0, None, 512);
    let info = ext4::make(whole.path(), offset, len, None, Uuid::new_v4(), "blk").unwrap();
    ext4::check(whole.path(), offset).unwrap();
    assert_eq!(blkid(whole.path(), offset)["UUID"], info.uuid);
    drop(whole);
    assert_filled(&disk.file, 0, offset, 0x55, "bytes before the partition");
    assert_filled(&disk.file, offset + len, 8 * MIB, 0xAA, "bytes after the partition");
}
