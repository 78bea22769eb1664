//! Raw-disk images: packing, writing onto files and loop devices, and every way a bad image must fail.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Loop, run};
use gridforge_agent::block::{BlockTarget, MIB, TargetOptions};
use gridforge_agent::pipeline::{PipelineError, RawWriteStats, pack_raw_disk, write_raw_disk};
use gridforge_common::progress::Progress;
use sha2::{Digest, Sha256};

/// 64 MiB + 12 KiB: random and zero regions, whole zero chunks, fragmented blocks, a short last chunk.
const DISK_SIZE: usize = 64 * MIB as usize + 12 * 1024;

fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn disk_bytes() -> Vec<u8> {
    let mib = MIB as usize;
    let mut d = vec![0u8; DISK_SIZE];
    fill_random(&mut d[..512 * 1024], 1);
    // Alternating 4 KiB data and zero blocks, then a long zero gap, then more data.
    for (i, block) in d[mib..3 * mib].chunks_mut(4096).enumerate() {
        if i % 3 != 1 {
            fill_random(block, 10 + i as u64);
        }
    }
    d[mib + 200 * 1024..mib + 400 * 1024].fill(0);
    fill_random(&mut d[12 * mib..16 * mib], 2);
    fill_random(&mut d[40 * mib..41 * mib], 3);
    // Text-like compressible data.
    for (i, b) in d[41 * mib..44 * mib].iter_mut().enumerate() {
        *b = b"gridforge raw disk\n"[i % 19];
    }
    let tail = DISK_SIZE - 12 * 1024;
    fill_random(&mut d[tail + 4096..], 4);
    d
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    disk: Vec<u8>,
    disk_path: PathBuf,
    blob: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk_bytes();
    let disk_path = dir.path().join("disk.raw");
    fs::write(&disk_path, &disk).unwrap();
    let mut blob = Vec::new();
    let info = pack_raw_disk(&disk_path, &mut blob, 3).unwrap();
    assert_eq!(info.disk_size, DISK_SIZE as u64);
    assert_eq!(info.chunks, 17);
    assert!(info.zero_chunks >= 7, "{info:?}");
    assert_eq!(info.compressed_size, blob.len() as u64);
    Fixture { dir: dir.path().to_path_buf(), _dir: dir, disk, disk_path, blob }
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A file target of `size` bytes, filled with `fill` unless it is None (then fresh and sparse).
fn file_target(dir: &Path, name: &str, size: usize, fill: Option<u8>) -> PathBuf {
    let path = dir.join(name);
    match fill {
        Some(byte) => fs::write(&path, vec![byte; size]).unwrap(),
        None => fs::File::create(&path).unwrap().set_len(size as u64).unwrap(),
    }
    path
}

fn write(blob: &[u8], digest: &str, target: &Path) -> Result<RawWriteStats, PipelineError> {
    let t = BlockTarget::open(target, &TargetOptions::default()).unwrap();
    write_raw_disk(blob, digest, &t, &Progress::none())
}

fn assert_head_zero(path: &Path) {
    let data = fs::read(path).unwrap();
    assert!(data[..MIB as usize].iter().all(|&b| b == 0), "first MiB of {} must be zero", path.display());
}

fn stock_decode(tool: &str, args: &[&str], blob: &[u8]) -> Vec<u8> {
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{tool} is required for this test: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = blob.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{tool} {args:?} failed");
    out.stdout
}

#[test]
fn packed_image_round_trips_and_decodes_with_stock_zstd() {
    let f = fixture();
    assert_eq!(stock_decode("zstd", &["-dc"], &f.blob), f.disk, "zstd -dc must reproduce the disk");
    let target = file_target(&f.dir, "target.img", DISK_SIZE, None);
    let stats = write(&f.blob, &sha256(&f.blob), &target).unwrap();
    assert_eq!(fs::read(&target).unwrap(), f.disk);
    assert_eq!(stats.disk_size, DISK_SIZE as u64);
    assert_eq!(stats.compressed_bytes, f.blob.len() as u64);
    assert!(stats.bytes_skipped_zero >= 30 * MIB, "{stats:?}");
    assert_eq!(stats.bytes_written + stats.bytes_skipped_zero, DISK_SIZE as u64, "{stats:?}");
    // Digest comparison ignores hex case.
    let upper = sha256(&f.blob).to_uppercase();
    write(&f.blob, &upper, &target).unwrap();
}

#[test]
fn prefilled_target_gets_zero_runs_really_zeroed() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE, Some(0xFF));
    write(&f.blob, &sha256(&f.blob), &target).unwrap();
    assert_eq!(fs::read(&target).unwrap(), f.disk);
}

#[test]
fn bytes_after_the_image_are_untouched() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE + 8 * MIB as usize, Some(0xAB));
    write(&f.blob, &sha256(&f.blob), &target).unwrap();
    let data = fs::read(&target).unwrap();
    assert_eq!(&data[..DISK_SIZE], &f.disk[..]);
    assert!(data[DISK_SIZE..].iter().all(|&b| b == 0xAB), "tail beyond the image changed");
}

#[test]
fn wrong_digest_names_both_and_zeroes_the_head() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE, Some(0xFF));
    let wrong = "0".repeat(64);
    let err = write(&f.blob, &wrong, &target).unwrap_err();
    let actual = sha256(&f.blob);
    match &err {
        PipelineError::DigestMismatch { expected, actual: got } => {
            assert_eq!(expected, &wrong);
            assert_eq!(got, &actual);
        }
        other => panic!("expected DigestMismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&wrong) && msg.contains(&actual), "{msg}");
    assert_head_zero(&target);
}

#[test]
fn truncated_or_corrupt_image_fails_and_zeroes_the_head() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE, Some(0xFF));
    let cut = &f.blob[..f.blob.len() / 2];
    let err = write(cut, &sha256(cut), &target).unwrap_err();
    assert!(matches!(err, PipelineError::Truncated { .. }), "{err}");
    assert_head_zero(&target);

    let mut corrupt = f.blob.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid..mid + 64].fill(0x5A);
    fs::write(&target, vec![0xFFu8; DISK_SIZE]).unwrap();
    let err = write(&corrupt, &sha256(&corrupt), &target).unwrap_err();
    assert!(matches!(err, PipelineError::CorruptImage { .. }), "{err}");
    assert_head_zero(&target);
}

#[test]
fn trailing_data_is_rejected() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE, None);
    let mut blob = f.blob.clone();
    blob.extend_from_slice(b"garbage after the last frame");
    let err = write(&blob, &sha256(&blob), &target).unwrap_err();
    assert!(matches!(err, PipelineError::TrailingData { .. }), "{err}");
    assert_head_zero(&target);

    // Same for a plain zstd stream.
    let mut plain = stock_decode("zstd", &["-c", "-1"], &f.disk);
    plain.extend_from_slice(b"garbage");
    let err = write(&plain, &sha256(&plain), &target).unwrap_err();
    assert!(matches!(err, PipelineError::TrailingData { .. }), "{err}");
}

#[test]
fn image_larger_than_target_is_refused_before_writing() {
    let f = fixture();
    let target = file_target(&f.dir, "small.img", 32 * MIB as usize, Some(0xFF));
    let err = write(&f.blob, &sha256(&f.blob), &target).unwrap_err();
    assert!(matches!(err, PipelineError::TooLarge { limit } if limit == 32 * MIB), "{err}");
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0xFF), "target must be untouched");

    // A stock zstd stream declares its size in the frame header: also refused before writing.
    let plain = stock_decode("zstd", &["-c", "-1", f.disk_path.to_str().unwrap()], &[]);
    let err = write(&plain, &sha256(&plain), &target).unwrap_err();
    assert!(matches!(err, PipelineError::TooLarge { .. }), "{err}");
    assert!(fs::read(&target).unwrap().iter().all(|&b| b == 0xFF), "target must be untouched");

    // A gzip stream does not: it fails once the data passes the end, and the head is zeroed.
    let gz = stock_decode("gzip", &["-c", "-1"], &f.disk);
    let err = write(&gz, &sha256(&gz), &target).unwrap_err();
    assert!(matches!(err, PipelineError::TooLarge { .. }), "{err}");
    assert_head_zero(&target);
}

#[test]
fn plain_zstd_gzip_and_uncompressed_images_are_written() {
    let f = fixture();
    let zst = stock_decode("zstd", &["-c", "-3"], &f.disk);
    let gz = stock_decode("gzip", &["-c", "-1"], &f.disk);
    // Two concatenated gzip members are one stream.
    let half = DISK_SIZE / 2;
    let mut gz2 = stock_decode("gzip", &["-c", "-1"], &f.disk[..half]);
    gz2.extend(stock_decode("gzip", &["-c", "-1"], &f.disk[half..]));
    for (name, blob) in [("zstd", &zst), ("gzip", &gz), ("gzip members", &gz2), ("raw", &f.disk)] {
        let target = file_target(&f.dir, "target.img", DISK_SIZE, Some(0xFF));
        let stats = write(blob, &sha256(blob), &target).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(stats.disk_size, DISK_SIZE as u64, "{name}");
        assert!(fs::read(&target).unwrap() == f.disk, "{name} image written differently");
    }
    let cut = &gz[..gz.len() - 100];
    let target = file_target(&f.dir, "target.img", DISK_SIZE, Some(0xFF));
    let err = write(cut, &sha256(cut), &target).unwrap_err();
    assert!(matches!(err, PipelineError::Truncated { .. }), "{err}");
    assert_head_zero(&target);
}

#[test]
fn loop_device_with_4096_byte_sectors_round_trips() {
    let f = fixture();
    let backing = file_target(&f.dir, "backing.img", DISK_SIZE + 4 * MIB as usize, Some(0xEE));
    let lo = Loop::attach(&backing, 4096);
    let t = BlockTarget::open(&lo.dev, &TargetOptions::default()).unwrap();
    assert_eq!(t.sector_size(), 4096);
    write_raw_disk(&f.blob[..], &sha256(&f.blob), &t, &Progress::none()).unwrap();
    drop(t);
    let dev = fs::read(&lo.dev).unwrap();
    assert_eq!(&dev[..DISK_SIZE], &f.disk[..]);
    assert!(dev[DISK_SIZE..].iter().all(|&b| b == 0xEE), "device tail changed");
    run("blockdev", &["--flushbufs", lo.path()]);
}

#[test]
fn progress_reaches_the_disk_size() {
    let f = fixture();
    let target = file_target(&f.dir, "target.img", DISK_SIZE, None);
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let progress = Progress::new(move |e| sink.lock().unwrap().push(e.clone()));
    let t = BlockTarget::open(&target, &TargetOptions::default()).unwrap();
    write_raw_disk(&f.blob[..], &sha256(&f.blob), &t, &progress).unwrap();
    let events = events.lock().unwrap();
    assert!(events.iter().all(|e| e.step == "write"));
    let last = events.last().unwrap();
    assert_eq!((last.bytes_done, last.bytes_total), (DISK_SIZE as u64, DISK_SIZE as u64));
}
