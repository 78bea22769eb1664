mod common;

use common::Loop;
use gridforge_agent::block::{BlockError, BlockTarget, MIB, TargetKind, TargetOptions};

#[test]
fn missing_target_without_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = BlockTarget::open(&dir.path().join("nope.img"), &TargetOptions::default()).unwrap_err();
    assert!(matches!(err, BlockError::Missing(_)), "{err}");
    assert!(err.to_string().contains("nope.img"));
}

#[test]
fn file_target_is_created_sparse_and_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let opts = TargetOptions { create_size: Some(64 * MIB), ..Default::default() };
    let t = BlockTarget::open(&path, &opts).unwrap();
    assert_eq!(t.size(), 64 * MIB);
    assert_eq!(t.sector_size(), 512);
    assert_eq!(t.kind(), TargetKind::File);
    let err = BlockTarget::open(&path, &opts).unwrap_err();
    assert!(matches!(err, BlockError::Busy(_)), "second open must fail while locked: {err}");
    drop(t);
    BlockTarget::open(&path, &opts).expect("lock released on drop");
}

#[test]
fn unaligned_and_direct_writes_land_and_zero_range_clears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let t = BlockTarget::open(&path, &TargetOptions { create_size: Some(8 * MIB), ..Default::default() })
        .unwrap();
    let mut aligned = gridforge_agent::block::AlignedBuf::new(MIB as usize);
    aligned.fill(0xAB);
    t.write_at(&aligned, MIB).unwrap();
    t.write_at(b"hello", 3).unwrap();
    t.sync().unwrap();
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[3..8], b"hello");
    assert!(data[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0xAB));
    t.zero_range(MIB + 4096, 8192).unwrap();
    t.zero_head().unwrap();
    let data = std::fs::read(&path).unwrap();
    assert!(data[..MIB as usize].iter().all(|&b| b == 0), "first MiB zeroed");
    assert!(data[MIB as usize + 4096..MIB as usize + 12288].iter().all(|&b| b == 0));
    assert_eq!(data[MIB as usize + 12288], 0xAB, "zeroing stops at the range end");
}

#[test]
fn block_device_reports_size_and_4096_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(16 * MIB).unwrap();
    let lo = Loop::attach(&path, 4096);
    let t = BlockTarget::open(&lo.dev, &TargetOptions::default()).unwrap();
    assert_eq!(t.kind(), TargetKind::BlockDevice);
    assert_eq!(t.size(), 16 * MIB);
    assert_eq!(t.sector_size(), 4096);
    let mut buf = gridforge_agent::block::AlignedBuf::new(MIB as usize);
    buf.fill(7);
    t.write_at(&buf, 0).unwrap();
    t.zero_range(4096, 4096).unwrap();
    t.sync().unwrap();
    let mut back = vec![0u8; 3 * 4096];
    t.read_at(&mut back, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 7));
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert!(back[8192..].iter().all(|&b| b == 7));
}

#[test]
fn blkzeroout_really_runs_on_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![0xEEu8; (4 * MIB) as usize]).unwrap();
    let lo = Loop::attach(&path, 512);
    let t = BlockTarget::open(&lo.dev, &TargetOptions::default()).unwrap();
    gridforge_agent::block::ioctl::zero_out(t.file(), MIB, MIB).expect("BLKZEROOUT accepted by the kernel");
    let mut back = vec![0u8; (3 * MIB) as usize];
    t.read_at(&mut back, 0).unwrap();
    assert!(back[..MIB as usize].iter().all(|&b| b == 0xEE));
    assert!(back[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0));
    assert!(back[2 * MIB as usize..].iter().all(|&b| b == 0xEE));
}
