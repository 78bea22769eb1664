//! File systems written straight into a byte range (a partition) of a target that is a regular file or a
//! block device: no loop device for making them, no mount.
//!
//! - [`vfat`]: FAT32 written in-process with the `fatfs` crate, plus a directory fix-up it needs.
//! - [`ext4`]: `mke2fs -d <tree> -E offset=…` into the target; grow, check and give a new UUID with
//!   e2fsprogs; mounted through a loop device only to customize a clone of the agent's own base in place.
//! - [`swap`]: a Linux swap v1 header written natively.
//! - [`probe()`]: recognises ext2/3/4, FAT, swap and LUKS in a range, for inspecting disks.
//!
//! Targets given as `&File` are accessed with positional I/O only ([`RangeIo`]), so the file's cursor is
//! irrelevant; they must not be opened with `O_DIRECT` (fatfs issues small unaligned writes).

pub mod ext4;
mod probe;
mod range_io;
pub mod swap;
pub mod vfat;

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::process::{Command, ExitStatus, Output, Stdio};

use gridforge_proto::v1::Filesystem;

pub use probe::{Probed, probe};
pub use range_io::RangeIo;

/// What a freshly made (or probed) file system is, as a user would see it with `blkid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsInfo {
    pub kind: Filesystem,
    /// Exactly as blkid prints it: ext4 and swap lowercase hyphenated, vfat `ABCD-1234`.
    pub uuid: String,
    pub label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed with {status}: {}", tool_output(stderr, stdout))]
    Tool { tool: &'static str, status: ExitStatus, stderr: String, stdout: String },
    #[error("partition too small for {what}: {got} bytes, needs at least {needed} bytes")]
    TooSmall { what: &'static str, needed: u64, got: u64 },
    #[error("invalid {kind} label {label:?}: {reason}")]
    InvalidLabel { kind: &'static str, label: String, reason: &'static str },
    #[error("byte range {offset}+{len} is outside the target ({target_size} bytes)")]
    OutOfRange { offset: u64, len: u64, target_size: u64 },
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

impl FsError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        FsError::Io { context: context.into(), source }
    }
}

/// The part of a tool's output worth showing: stderr, or the tail of stdout when stderr is empty
/// (e2fsck reports problems on stdout).
fn tool_output(stderr: &str, stdout: &str) -> String {
    const MAX: usize = 4000;
    let text = if stderr.trim().is_empty() { stdout.trim() } else { stderr.trim() };
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut start = text.len() - MAX;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Runs a tool to completion with no stdin and captured output; a failing exit status is an error.
/// `accept` decides which exit codes count as success (e2fsck uses 1 for "errors corrected").
pub(crate) fn run_tool(
    tool: &'static str,
    command: &mut Command,
    accept: impl Fn(i32) -> bool,
) -> Result<Output, FsError> {
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| FsError::io(format!("running {tool}"), source))?;
    match output.status.code() {
        Some(code) if accept(code) => Ok(output),
        _ => Err(FsError::Tool {
            tool,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        }),
    }
}

/// Size in bytes of a regular file or block device.
pub(crate) fn target_size(disk: &File) -> Result<u64, FsError> {
    let metadata = disk.metadata().map_err(|source| FsError::io("reading target metadata", source))?;
    if metadata.file_type().is_block_device() {
        // Seeking to the end is the portable way to size a block device; put the cursor back since the
        // caller may share this file.
        let mut handle = disk;
        let position =
            handle.stream_position().map_err(|source| FsError::io("reading target position", source))?;
        let size =
            handle.seek(SeekFrom::End(0)).map_err(|source| FsError::io("sizing block device", source))?;
        handle
            .seek(SeekFrom::Start(position))
            .map_err(|source| FsError::io("restoring target position", source))?;
        Ok(size)
    } else {
        Ok(metadata.len())
    }
}

/// Refuses a range that does not lie inside the target (writing past a regular file's end would silently
/// grow it; a partition never extends past its disk).
pub(crate) fn check_range(disk: &File, offset: u64, len: u64) -> Result<(), FsError> {
    let size = target_size(disk)?;
    match offset.checked_add(len) {
        Some(end) if end <= size && len > 0 => Ok(()),
        _ => Err(FsError::OutOfRange { offset, len, target_size: size }),
    }
}

/// Zeroes the start of a range so that no signature of an earlier file system or LUKS header survives
/// next to the new one (blkid refuses to name a range with two signatures). 4 MiB covers every place a
/// LUKS2 secondary header may sit and the ext superblock; the rest of an old file system is unreachable
/// once its superblocks are gone.
pub(crate) fn clear_signatures(disk: &File, offset: u64, len: u64) -> Result<(), FsError> {
    const CLEAR_BYTES: u64 = 4 << 20;
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK];
    let end = offset + len.min(CLEAR_BYTES);
    let mut position = offset;
    while position < end {
        let n = (end - position).min(CHUNK as u64) as usize;
        disk.write_all_at(&zeros[..n], position)
            .map_err(|source| FsError::io("zeroing the start of the partition", source))?;
        position += n as u64;
    }
    Ok(())
}
