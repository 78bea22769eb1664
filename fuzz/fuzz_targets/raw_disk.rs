//! Raw-disk image write: the packed format's manifest and frames (or a plain compressed disk) decoded onto
//! a 4 MiB target. The digest never matches, so the target must end with its first MiB zeroed.
#![no_main]

use std::os::unix::fs::FileExt;

use gridforge_agent::block::{BlockTarget, TargetOptions};
use gridforge_agent::pipeline::write_raw_disk;
use gridforge_agent_fuzz::file_with;
use gridforge_common::progress::Progress;
use libfuzzer_sys::fuzz_target;

const TARGET_LEN: u64 = 4 << 20;

fuzz_target!(|data: &[u8]| {
    let file = file_with("disk.raw", &[0xA5; 4096], TARGET_LEN);
    let path = gridforge_agent_fuzz::scratch_path("disk.raw");
    let target = BlockTarget::open(&path, &TargetOptions::default()).expect("opening the target");
    let result = write_raw_disk(data, &"0".repeat(64), &target, &Progress::none());
    assert!(result.is_err(), "a digest of zeros matched");
    drop(target);
    let mut head = [0u8; 4096];
    file.read_exact_at(&mut head, 0).expect("reading the head back");
    // Either the write never began (the marker is still there) or the head was zeroed.
    assert!(head == [0u8; 4096] || head == [0xA5; 4096], "failed write left data in the first MiB");
});
