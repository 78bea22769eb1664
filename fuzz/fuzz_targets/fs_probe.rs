//! File-system metadata read back from disks: the signature probe (ext2/3/4 superblock, FAT boot sector and
//! root directory, swap header, LUKS) and the ext4 superblock as resizing reads it, at offset 0 and inside a
//! range that starts one sector in.
#![no_main]

use gridforge_agent::fs::{ext4, probe};

use gridforge_agent_fuzz::file_with;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let file = file_with("fs.img", data, len);
    let _ = probe(&file, 0, len);
    let _ = ext4::filesystem_size(&file, 0);
    if len > 512 {
        let _ = probe(&file, 512, len - 512);
    }
});
