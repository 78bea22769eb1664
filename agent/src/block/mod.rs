//! Block targets: the guest disk the agent writes, a regular file or a block device.
//!
//! A `BlockTarget` holds an exclusive lock on the target for its whole life, knows its size and logical sector
//! size, writes aligned chunks with O_DIRECT (falling back to buffered I/O where the file system refuses it),
//! zeroes ranges cheaply (BLKZEROOUT, hole punching) and syncs at the end.

mod buf;
pub mod ioctl;
pub mod overlay;

pub use buf::{AlignedBuf, DIRECT_ALIGN};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("target {0} does not exist (give a disk size to create a file target)")]
    Missing(PathBuf),
    #[error("target {0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    #[error("cannot open target {path} for writing")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("target {0} is in use by another gridforge job or process")]
    Busy(PathBuf),
    #[error("target {0} is in use by the system (mounted, active swap, or held by another device)")]
    InUse(PathBuf),
    #[error("unsupported logical sector size {size} on {path} (512 or 4096)")]
    SectorSize { path: PathBuf, size: u32 },
    #[error("target {path} holds {size} bytes, which is not a whole number of {sector_size}-byte sectors")]
    Unaligned { path: PathBuf, size: u64, sector_size: u32 },
    #[error("{context} on {path}")]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to open a target.
#[derive(Clone, Debug, Default)]
pub struct TargetOptions {
    /// Create a regular file of this size if the path does not exist; grow a smaller regular file to it.
    pub create_size: Option<u64>,
    /// Logical sector size of a regular-file target (default 512). Block devices report their own.
    pub sector_size: Option<u32>,
    /// Open read-only (inspection): no lock upgrade, no O_DIRECT writer.
    pub read_only: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    File,
    BlockDevice,
}

/// An open, exclusively locked guest disk.
#[derive(Debug)]
pub struct BlockTarget {
    path: PathBuf,
    file: Flock<File>,
    direct: Option<File>,
    size: u64,
    sector_size: u32,
    kind: TargetKind,
    created: bool,
}

impl BlockTarget {
    pub fn open(path: &Path, opts: &TargetOptions) -> Result<Self, BlockError> {
        let io_err = |context: &str| {
            let path = path.to_path_buf();
            let context = context.to_string();
            move |source| BlockError::Io { context, path, source }
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading metadata")(e)),
        };
        let kind = match &meta {
            None if opts.create_size.is_some() && !opts.read_only => TargetKind::File,
            None => return Err(BlockError::Missing(path.to_path_buf())),
            Some(m) if m.file_type().is_block_device() => TargetKind::BlockDevice,
            Some(m) if m.file_type().is_file() => TargetKind::File,
            Some(_) => return Err(BlockError::NotADisk(path.to_path_buf())),
        };
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if kind == TargetKind::File && !opts.read_only {
            oo.create(true);
        }
        if kind == TargetKind::BlockDevice && !opts.read_only {
            ensure_not_in_use(path)?;
        }
        let file = oo.open(path).map_err(|source| BlockError::Open { path: path.to_path_buf(), source })?;
        let lock =
            if opts.read_only { FlockArg::LockSharedNonblock } else { FlockArg::LockExclusiveNonblock };
        let file = Flock::lock(file, lock).map_err(|(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => BlockError::Busy(path.to_path_buf()),
            e => io_err("locking")(io::Error::from(e)),
        })?;

        let (size, sector_size) = match kind {
            TargetKind::BlockDevice => (
                ioctl::size_bytes(&*file).map_err(|e| io_err("reading device size")(e.into()))?,
                ioctl::logical_sector_size(&*file)
                    .map_err(|e| io_err("reading logical sector size")(e.into()))?,
            ),
            TargetKind::File => {
                let mut size = file.metadata().map_err(io_err("reading metadata"))?.len();
                if let Some(want) = opts.create_size.filter(|&w| w > size && !opts.read_only) {
                    file.set_len(want).map_err(io_err("growing target file"))?;
                    size = want;
                }
                (size, opts.sector_size.unwrap_or(512))
            }
        };
        if sector_size != 512 && sector_size != 4096 {
            return Err(BlockError::SectorSize { path: path.to_path_buf(), size: sector_size });
        }
        if size % u64::from(sector_size) != 0 {
            return Err(BlockError::Unaligned { path: path.to_path_buf(), size, sector_size });
        }
        let direct = if opts.read_only { None } else { open_direct(path) };
        let created = meta.is_none();
        Ok(Self { path: path.to_path_buf(), file, direct, size, sector_size, kind, created })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// Whether this open created the (regular file) target.
    pub fn created(&self) -> bool {
        self.created
    }

    /// The buffered file handle (for partition tables, file systems and other small structured writes).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether aligned writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn io_err(&self, context: impl Into<String>) -> impl FnOnce(io::Error) -> BlockError + '_ {
        let context = context.into();
        move |source| BlockError::Io { context, path: self.path.clone(), source }
    }

    /// Write `buf` at `offset`. Uses O_DIRECT when buffer, offset and length are aligned, buffered I/O otherwise.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        let aligned = buf.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && buf.len().is_multiple_of(DIRECT_ALIGN);
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => &*self.file,
        };
        file.write_all_at(buf, offset)
            .map_err(self.io_err(format!("writing {} bytes at offset {offset}", buf.len())))
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(self.io_err(format!("reading {} bytes at offset {offset}", buf.len())))
    }

    /// Make `[offset, offset + len)` read back as zeroes, as cheaply as the target allows: BLKZEROOUT on a
    /// device, hole punching on a file, plain zero writes where neither works.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        let sector = u64::from(self.sector_size);
        let fast = match self.kind {
            TargetKind::BlockDevice if offset.is_multiple_of(sector) && len.is_multiple_of(sector) => {
                ioctl::zero_out(&*self.file, offset, len).is_ok()
            }
            TargetKind::File => nix::fcntl::fallocate(
                &*self.file,
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
            .is_ok(),
            TargetKind::BlockDevice => false,
        };
        if fast {
            return Ok(());
        }
        let chunk = AlignedBuf::new((4 * MIB).min(len.next_multiple_of(DIRECT_ALIGN as u64)) as usize);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(chunk.len() as u64) as usize;
            self.write_at(&chunk[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Make the target's content that of `src`, a regular file of the target's size: a reflink copy
    /// (FICLONE) where the file system shares extents between files, else a copy of `src`'s allocated
    /// extents (SEEK_DATA/SEEK_HOLE; `copy_file_range` between files) with everything else zero.
    pub fn clone_from(&self, src: &File) -> Result<CloneMethod, BlockError> {
        if self.reflink_from(src)? {
            return Ok(CloneMethod::Reflink);
        }
        let src_size = self.size;
        let extents = data_extents(src, src_size).map_err(self.io_err("finding the source's extents"))?;
        let mut pos = 0;
        for (offset, len) in extents {
            if !self.created {
                self.zero_range(pos, offset - pos)?;
            }
            self.copy_range(src, offset, len)?;
            pos = offset + len;
        }
        if !self.created {
            self.zero_range(pos, self.size - pos)?;
        }
        Ok(CloneMethod::Copy)
    }

    /// Make the target share `src`'s extents (FICLONE), `src` being a regular file of the target's size.
    /// False where that cannot be done: a block device, or a file system that does not share extents.
    pub fn reflink_from(&self, src: &File) -> Result<bool, BlockError> {
        let src_size = src.metadata().map_err(self.io_err("reading the clone source"))?.len();
        if src_size != self.size {
            return Err(BlockError::Io {
                context: format!("cloning a {src_size}-byte source onto {} bytes", self.size),
                path: self.path.clone(),
                source: io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(self.kind == TargetKind::File && ioctl::clone_file(&*self.file, src).is_ok())
    }

    /// Copy `[offset, offset + len)` of `src` to the same place here: in the kernel between files, else
    /// through an aligned buffer.
    fn copy_range(&self, src: &File, offset: u64, len: u64) -> Result<(), BlockError> {
        let end = offset + len;
        let mut pos = offset;
        if self.kind == TargetKind::File {
            while pos < end {
                let (mut off_in, mut off_out) = (pos as i64, pos as i64);
                let want = (end - pos).min(1 << 30) as usize;
                match nix::fcntl::copy_file_range(
                    src,
                    Some(&mut off_in),
                    &*self.file,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(0) => break,
                    Ok(n) => pos += n as u64,
                    Err(_) => break,
                }
            }
        }
        let mut buf =
            AlignedBuf::new((4 * MIB).min((end - pos).next_multiple_of(DIRECT_ALIGN as u64)) as usize);
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], pos).map_err(self.io_err("reading the clone source"))?;
            self.write_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Zero the first MiB (partition table and boot code), so a half-written disk can never boot. Through
    /// [`zero_range`](Self::zero_range): punching a hole needs no free space, so a file target whose file
    /// system filled up (the failure being cleaned up after) is zeroed too.
    pub fn zero_head(&self) -> Result<(), BlockError> {
        self.zero_range(0, MIB.min(self.size))?;
        self.sync()
    }

    /// Flush everything written through either handle to stable storage.
    pub fn sync(&self) -> Result<(), BlockError> {
        if let Some(direct) = &self.direct {
            direct.sync_all().map_err(self.io_err("syncing"))?;
        }
        self.file.sync_all().map_err(self.io_err("syncing"))
    }
}

/// How [`BlockTarget::clone_from`] made the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloneMethod {
    /// The target shares the source's extents (FICLONE); blocks are copied only when written.
    Reflink,
    /// The source's allocated extents were copied.
    Copy,
    /// The target is a qcow2 overlay on the source ([`overlay`]): it holds only the clusters written to it.
    Overlay,
}

impl CloneMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
            CloneMethod::Overlay => "overlay",
        }
    }
}

/// The allocated extents of `file` (size `size`), from SEEK_DATA and SEEK_HOLE: (offset, length), in order.
/// A file system or device that does not report holes yields one extent over everything.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) if pos == 0 => return Ok(vec![(0, size)]),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(size),
            Err(nix::errno::Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole > data {
            extents.push((data, hole - data));
        }
        pos = hole;
    }
    Ok(extents)
}

/// O_EXCL on a block device fails while the kernel has it in use (mounted, swap, holders such as
/// device-mapper or md). The probe handle is closed at once: the tools the agent runs on the device (mke2fs,
/// resize2fs) open it exclusively themselves, and other gridforge jobs are kept out by the flock.
fn ensure_not_in_use(path: &Path) -> Result<(), BlockError> {
    match OpenOptions::new().read(true).custom_flags(libc::O_EXCL).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(BlockError::InUse(path.to_path_buf())),
        Err(source) => Err(BlockError::Open { path: path.to_path_buf(), source }),
    }
}

/// A second handle with O_DIRECT, or None with a log line where the file system refuses it (tmpfs, some
/// overlay setups): writes then go through the page cache and are synced at the end.
fn open_direct(path: &Path) -> Option<File> {
    match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(target = %path.display(), error = %e, "O_DIRECT refused; using buffered I/O");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_the_allocated_ranges_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let file =
            OpenOptions::new().read(true).write(true).create_new(true).open(dir.path().join("d")).unwrap();
        let size = 16 << 20;
        file.set_len(size).unwrap();
        assert_eq!(data_extents(&file, size).unwrap(), []);
        file.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        file.write_all_at(&[2u8; 4096], size - 4096).unwrap();
        file.sync_all().unwrap();
        let extents = data_extents(&file, size).unwrap();
        assert_eq!(extents, [(1 << 20, 8192), (size - 4096, 4096)]);
    }
}
