//! A `Read + Write + Seek` view of one byte range of a file or block device.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// `Read + Write + Seek` over `[offset, offset + len)` of a `&File`, using positional I/O so the file's own
/// cursor is never used. Reads stop at the end of the range; a write that would cross it fails with
/// `InvalidInput` and writes nothing, so a partition's neighbours can never be touched.
#[derive(Debug)]
pub struct RangeIo<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
    position: u64,
}

impl<'a> RangeIo<'a> {
    /// A range running past the largest file offset is cut short there.
    pub fn new(file: &'a File, offset: u64, len: u64) -> Self {
        RangeIo { file, offset, len: len.min(u64::MAX - offset), position: 0 }
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Read for RangeIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.len.saturating_sub(self.position);
        let n = (buf.len() as u64).min(remaining) as usize;
        if n == 0 {
            return Ok(0);
        }
        let read = self.file.read_at(&mut buf[..n], self.offset + self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

impl Write for RangeIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end =
            self.position.checked_add(buf.len() as u64).filter(|end| *end <= self.len).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "write of {} bytes at {} crosses the end of a {}-byte range",
                        buf.len(),
                        self.position,
                        self.len
                    ),
                )
            })?;
        let written = self.file.write_at(buf, self.offset + self.position)?;
        self.position = end - (buf.len() - written) as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Positional writes go straight to the file; durability is the caller's `sync_all`.
        Ok(())
    }
}

impl Seek for RangeIo<'_> {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        let position = match target {
            SeekFrom::Start(position) => Some(position),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start of the range"))?;
        self.position = position;
        Ok(position)
    }
}
