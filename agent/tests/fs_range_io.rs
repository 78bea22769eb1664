//! RangeIo keeps every read and write inside its range.

mod fs_support;

use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};

use fs_support::{assert_filled, fill, sparse_disk};
use gridforge_agent::fs::RangeIo;

#[test]
fn range_io_stays_inside_its_range() {
    let disk = sparse_disk(64 << 10);
    fill(&disk.file, 0, 64 << 10, 0xAA);
    let (offset, len) = (4096, 8192);
    let mut range = RangeIo::new(&disk.file, offset, len);

    range.write_all(&[1u8; 8000]).unwrap();
    let err = range.write(&[2u8; 193]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    range.write_all(&[3u8; 192]).unwrap();
    assert_eq!(range.stream_position().unwrap(), len);
    assert!(range.write(&[4u8]).is_err(), "write at the end");

    assert_eq!(range.seek(SeekFrom::End(-192)).unwrap(), 8000);
    let mut tail = Vec::new();
    range.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, vec![3u8; 192]);
    assert!(range.seek(SeekFrom::Current(-9000)).is_err());
    assert_eq!(range.seek(SeekFrom::Start(len + 10)).unwrap(), len + 10);
    assert_eq!(range.read(&mut [0u8; 16]).unwrap(), 0);

    assert_filled(&disk.file, 0, offset, 0xAA, "bytes before the range");
    assert_filled(&disk.file, offset + len, (64 << 10) - offset - len, 0xAA, "bytes after the range");
}
