//! The block-device and file ioctls the agent uses, in one place.

use std::os::fd::AsRawFd;

mod raw {
    // From <linux/fs.h>.
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
    // Defined as _IO(0x12, 127) and _IO(0x12, 119) although they take a pointer to a u64 pair.
    nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
    nix::ioctl_write_ptr_bad!(blkdiscard, nix::request_code_none!(0x12, 119), [u64; 2]);
    // FICLONE is _IOW(0x94, 9, int): the source descriptor is passed as the argument itself.
    nix::ioctl_write_int!(ficlone, 0x94, 9);
}

/// Size of a block device in bytes.
pub fn size_bytes(fd: &impl AsRawFd) -> nix::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    unsafe { raw::blkgetsize64(fd.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Logical sector size of a block device.
pub fn logical_sector_size(fd: &impl AsRawFd) -> nix::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    unsafe { raw::blksszget(fd.as_raw_fd(), &mut size) }?;
    Ok(size as u32)
}

/// Have the device write zeroes over `[offset, offset + len)` (both multiples of 512).
pub fn zero_out(fd: &impl AsRawFd, offset: u64, len: u64) -> nix::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 values through the pointer, which points at a live local array.
    unsafe { raw::blkzeroout(fd.as_raw_fd(), &range) }?;
    Ok(())
}

/// Tell the device that `[offset, offset + len)` is unused. A hint: the data may or may not read back as zero.
pub fn discard(fd: &impl AsRawFd, offset: u64, len: u64) -> nix::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 values through the pointer, which points at a live local array.
    unsafe { raw::blkdiscard(fd.as_raw_fd(), &range) }?;
    Ok(())
}

/// Make `dst` share all of `src`'s extents (a reflink copy, FICLONE): both must be regular files on one file
/// system that supports it (btrfs, xfs with reflink); EOPNOTSUPP, EXDEV or EINVAL where not.
pub fn clone_file(dst: &impl AsRawFd, src: &impl AsRawFd) -> nix::Result<()> {
    // SAFETY: FICLONE takes the source descriptor by value and reads no memory of ours; both descriptors are
    // open for the duration of the call.
    unsafe { raw::ficlone(dst.as_raw_fd(), src.as_raw_fd() as libc::c_ulong) }?;
    Ok(())
}
