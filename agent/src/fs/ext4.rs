//! ext4 made, grown, checked and given new UUIDs with e2fsprogs directly inside a byte range of the target.
//!
//! `mke2fs -E offset=` writes into the range; `e2fsck` and `resize2fs` take `"<path>?offset=<bytes>"` (the
//! unix I/O manager's option). resize2fs on a *regular file* then sets the file's length to the file
//! system's size as if it started at byte 0, cutting off everything after it, so [`grow`] attaches a loop
//! device over the partition for regular files and uses `?offset=` only on block devices.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

use super::{FsError, FsInfo, check_range, clear_signatures, run_tool};

pub const BLOCK_SIZE: u64 = 4096;
pub const LABEL_MAX: usize = 16;
pub(crate) const SUPERBLOCK_AT: u64 = 1024;
pub(crate) const SUPERBLOCK_LEN: usize = 1024;
pub(crate) const MAGIC: u16 = 0xEF53;

/// Makes an ext4 file system of `len` bytes (rounded down to 4 KiB blocks) at `offset` in `disk_path`,
/// filled from the directory tree `tree` if given (ownership, modes and symlinks kept, as `mke2fs -d` does).
pub fn make(
    disk_path: &Path,
    offset: u64,
    len: u64,
    tree: Option<&Path>,
    uuid: Uuid,
    label: &str,
) -> Result<FsInfo, FsError> {
    validate_label(label)?;
    {
        let disk = open_target(disk_path, true)?;
        check_range(&disk, offset, len)?;
        clear_signatures(&disk, offset, len)?;
    }
    let mut command = Command::new("mke2fs");
    // metadata_csum_seed: the checksums are seeded from a field of their own, not from the UUID, so a clone
    // of this file system can take a fresh UUID without every metadata checksum being rewritten.
    command
        .args(["-q", "-F", "-t", "ext4", "-O", "metadata_csum_seed", "-b"])
        .arg(BLOCK_SIZE.to_string())
        .arg("-U")
        .arg(uuid.hyphenated().to_string())
        .arg("-L")
        .arg(label);
    if let Some(tree) = tree {
        command.arg("-d").arg(tree);
    }
    // The size argument is what keeps mke2fs inside the partition: without it the file system runs to the
    // end of the target.
    command.arg("-E").arg(format!("offset={offset}")).arg(disk_path).arg(format!("{}k", len / 1024));
    run_tool("mke2fs", &mut command, |code| code == 0)?;
    Ok(FsInfo { kind: Filesystem::Ext4, uuid: uuid.hyphenated().to_string(), label: label.to_owned() })
}

/// Grows the ext file system at `offset` to `new_len` bytes after its partition was enlarged: `e2fsck -fy`
/// then `resize2fs` with an explicit size. Shrinking is refused.
pub fn grow(disk_path: &Path, offset: u64, new_len: u64) -> Result<(), FsError> {
    let disk = open_target(disk_path, false)?;
    check_range(&disk, offset, new_len)?;
    let superblock = read_superblock(&disk, offset)?;
    let current_len = superblock.len();
    if new_len < current_len {
        return Err(FsError::Unsupported(format!("shrinking ext4 from {current_len} to {new_len} bytes")));
    }
    let is_block_device = disk
        .metadata()
        .map_err(|source| FsError::io(format!("reading {}", disk_path.display()), source))?
        .file_type()
        .is_block_device();
    drop(disk);

    let new_size = format!("{}K", new_len / 1024);
    let fsck_accepts = |code| code == 0 || code == 1;
    if is_block_device {
        let target = offset_target(disk_path, offset)?;
        run_tool("e2fsck", Command::new("e2fsck").arg("-fy").arg(&target), fsck_accepts)?;
        run_tool("resize2fs", Command::new("resize2fs").arg(&target).arg(&new_size), |code| code == 0)?;
    } else {
        let loop_device = LoopDevice::attach(disk_path, offset, new_len)?;
        run_tool("e2fsck", Command::new("e2fsck").arg("-fy").arg(loop_device.path()), fsck_accepts)?;
        run_tool("resize2fs", Command::new("resize2fs").arg(loop_device.path()).arg(&new_size), |code| {
            code == 0
        })?;
        loop_device.detach()?;
    }
    Ok(())
}

/// Gives the ext file system at `offset` a new UUID (`tune2fs -U`, every superblock copy). Made by [`make`],
/// it carries `metadata_csum_seed`, so no other metadata changes.
pub fn set_uuid(disk_path: &Path, offset: u64, uuid: Uuid) -> Result<FsInfo, FsError> {
    let disk = open_target(disk_path, false)?;
    let label = read_superblock(&disk, offset)?.label;
    drop(disk);
    let target = offset_target(disk_path, offset)?;
    let uuid_text = uuid.hyphenated().to_string();
    run_tool("tune2fs", Command::new("tune2fs").arg("-U").arg(&uuid_text).arg(target), |code| code == 0)?;
    Ok(FsInfo { kind: Filesystem::Ext4, uuid: uuid_text, label })
}

/// Runs `f` on the ext file system in `[offset, offset + len)` of the regular file `disk_path`, mounted
/// (nodev, nosuid) at a new directory under `scratch` through a loop device; unmounted and detached after,
/// whatever `f` returns. For file systems the agent made itself: the kernel parses them.
pub fn with_mounted<T>(
    disk_path: &Path,
    offset: u64,
    len: u64,
    scratch: &Path,
    f: impl FnOnce(&Path) -> T,
) -> Result<T, FsError> {
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let dir = tempfile::Builder::new()
        .prefix("mount-")
        .tempdir_in(scratch)
        .map_err(|source| FsError::io(format!("making a mount point in {}", scratch.display()), source))?;
    let loop_device = LoopDevice::attach(disk_path, offset, len)?;
    mount(
        Some(loop_device.path()),
        dir.path(),
        Some("ext4"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        None::<&str>,
    )
    .map_err(|e| FsError::io(format!("mounting {}", loop_device.path().display()), e.into()))?;
    let out = f(dir.path());
    umount2(dir.path(), MntFlags::empty())
        .map_err(|e| FsError::io(format!("unmounting {}", dir.path().display()), e.into()))?;
    loop_device.detach()?;
    Ok(out)
}

/// Checks the ext file system at `offset` read-only (`e2fsck -fn`); any problem found is an error carrying
/// e2fsck's report.
pub fn check(disk_path: &Path, offset: u64) -> Result<(), FsError> {
    let target = offset_target(disk_path, offset)?;
    run_tool("e2fsck", Command::new("e2fsck").arg("-fn").arg(target), |code| code == 0)?;
    Ok(())
}

/// Checks the ext file system at `offset` and fixes only what is safe to fix unattended (`e2fsck -f -p`);
/// anything that needs a decision is an error carrying e2fsck's report.
pub fn preen(disk_path: &Path, offset: u64) -> Result<(), FsError> {
    let target = offset_target(disk_path, offset)?;
    run_tool("e2fsck", Command::new("e2fsck").arg("-fp").arg(target), |code| code == 0 || code == 1)?;
    Ok(())
}

fn validate_label(label: &str) -> Result<(), FsError> {
    let reason = if label.len() > LABEL_MAX {
        "longer than 16 bytes"
    } else if label.contains('\0') {
        "contains a NUL byte"
    } else {
        return Ok(());
    };
    Err(FsError::InvalidLabel { kind: "ext4", label: label.to_owned(), reason })
}

fn open_target(disk_path: &Path, write: bool) -> Result<File, FsError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(disk_path)
        .map_err(|source| FsError::io(format!("opening {}", disk_path.display()), source))
}

/// `"<path>?offset=<bytes>"`, the e2fsprogs unix I/O manager's way to address a file system inside a
/// larger target.
fn offset_target(disk_path: &Path, offset: u64) -> Result<PathBuf, FsError> {
    let path = disk_path
        .to_str()
        .ok_or_else(|| FsError::Unsupported(format!("target path not UTF-8: {}", disk_path.display())))?;
    if path.contains('?') {
        return Err(FsError::Unsupported(format!(
            "target path containing '?' (e2fsprogs reads it as an option): {path}"
        )));
    }
    Ok(PathBuf::from(format!("{path}?offset={offset}")))
}

/// The fields of an ext2/3/4 superblock this module needs.
#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub block_size: u64,
    pub blocks: u64,
    pub uuid: Uuid,
    pub label: String,
}

const INCOMPAT_64BIT: u32 = 0x80;

impl Superblock {
    /// Parses the 1024 bytes at +1024 of a range; `None` without the ext magic, or when the block count
    /// and block size it records make a size no disk can hold (more than 2^64 bytes).
    pub fn parse(raw: &[u8]) -> Option<Superblock> {
        let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().expect("4 bytes"));
        if raw.len() < SUPERBLOCK_LEN || u16::from_le_bytes([raw[0x38], raw[0x39]]) != MAGIC {
            return None;
        }
        let log_block_size = u32_at(0x18);
        if log_block_size > 6 {
            return None;
        }
        let feature_incompat = u32_at(0x60);
        let mut blocks = u64::from(u32_at(0x04));
        if feature_incompat & INCOMPAT_64BIT != 0 {
            blocks |= u64::from(u32_at(0x150)) << 32;
        }
        let block_size = 1024u64 << log_block_size;
        blocks.checked_mul(block_size)?;
        let label_raw = &raw[0x78..0x88];
        let label_len = label_raw.iter().position(|&b| b == 0).unwrap_or(label_raw.len());
        Some(Superblock {
            block_size,
            blocks,
            uuid: Uuid::from_slice(&raw[0x68..0x78]).expect("16 bytes"),
            label: String::from_utf8_lossy(&label_raw[..label_len]).into_owned(),
        })
    }

    pub fn len(&self) -> u64 {
        // `parse` checked that this fits.
        self.blocks * self.block_size
    }
}

/// The size in bytes that the ext2/3/4 superblock of the range at `offset` records (blocks × block size):
/// what resizing reads from a guest's disk before growing its file system.
pub fn filesystem_size(disk: &File, offset: u64) -> Result<u64, FsError> {
    Ok(read_superblock(disk, offset)?.len())
}

pub(crate) fn read_superblock(disk: &File, offset: u64) -> Result<Superblock, FsError> {
    let mut raw = [0u8; SUPERBLOCK_LEN];
    disk.read_exact_at(&mut raw, offset + SUPERBLOCK_AT)
        .map_err(|source| FsError::io("reading the ext4 superblock", source))?;
    Superblock::parse(&raw).ok_or_else(|| FsError::Malformed {
        what: "ext4 superblock",
        reason: format!("no ext file system at offset {offset}"),
    })
}

/// A loop device over one byte range of a file, detached on drop.
struct LoopDevice {
    path: PathBuf,
    attached: bool,
}

impl LoopDevice {
    fn attach(file: &Path, offset: u64, len: u64) -> Result<Self, FsError> {
        let output = run_tool(
            "losetup",
            Command::new("losetup")
                .args(["--find", "--show", "--offset"])
                .arg(offset.to_string())
                .arg("--sizelimit")
                .arg(len.to_string())
                .arg(file),
            |code| code == 0,
        )?;
        let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if path.is_empty() {
            return Err(FsError::Malformed {
                what: "losetup output",
                reason: "no device name printed".into(),
            });
        }
        Ok(LoopDevice { path: PathBuf::from(path), attached: true })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn detach(mut self) -> Result<(), FsError> {
        self.attached = false;
        run_tool("losetup", Command::new("losetup").arg("--detach").arg(&self.path), |code| code == 0)?;
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            // Best effort on an error path; the error that got us here is the one worth reporting.
            let _ = Command::new("losetup").arg("--detach").arg(&self.path).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Found by the `fs_probe` fuzz target: a 64-bit superblock whose block count times block size
    /// overflowed u64 in `len()` (a panic where resizing reads a guest's disk).
    #[test]
    fn superblock_with_an_impossible_size_is_not_a_file_system() {
        let input = include_bytes!("../../tests/fixtures/fuzz/fs_probe-ext4-size-overflow");
        let mut disk = tempfile::tempfile().unwrap();
        disk.write_all(input).unwrap();
        assert!(matches!(filesystem_size(&disk, 0), Err(FsError::Malformed { .. })));
        assert!(crate::fs::probe(&disk, 0, input.len() as u64).is_ok());

        let mut raw = [0u8; SUPERBLOCK_LEN];
        raw[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        raw[0x18..0x1C].copy_from_slice(&6u32.to_le_bytes());
        raw[0x04..0x08].copy_from_slice(&u32::MAX.to_le_bytes());
        raw[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
        raw[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Superblock::parse(&raw).is_none());
        raw[0x150..0x154].fill(0);
        assert_eq!(Superblock::parse(&raw).unwrap().len(), u64::from(u32::MAX) * (1024 << 6));
    }
}
