//! Rootfs image unpack: a (zstd, gzip or plain) tar stream extracted into a staging directory. The digest
//! never matches, so every input also exercises the error path after a complete archive.
#![no_main]

use gridforge_agent::pipeline::{UnpackOptions, unpack_rootfs};
use gridforge_agent_fuzz::{empty_dir, scratch_dir};
use gridforge_common::progress::Progress;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let staging = empty_dir("staging");
    let _ = unpack_rootfs(data, &"0".repeat(64), &staging, &UnpackOptions::default(), &Progress::none());
    // Nothing may be written outside the staging directory.
    for entry in std::fs::read_dir(scratch_dir()).expect("listing the scratch directory") {
        let name = entry.expect("a scratch entry").file_name();
        assert_eq!(name, "staging", "the archive wrote outside the staging directory");
    }
});
