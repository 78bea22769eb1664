//! FAT metadata the agent reads back and rewrites with its own code: the boot sector and its backup (a
//! clone's new volume id) and the directory fix-up after formatting (cluster chains, `.`/`..` entries).
//! `vfat::edit_file` is left out: it hands the volume to fatfs 0.3.6, which still panics on overflowing
//! cluster arithmetic for corrupt directory entries (with debug assertions; it wraps in release builds),
//! and the agent only edits the ESP of a base it made and verified itself.
#![no_main]

use gridforge_agent::fs::vfat;
use gridforge_agent_fuzz::file_with;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if len < 512 {
        return;
    }
    let file = file_with("fat.img", data, len);
    let _ = vfat::set_volume_id(&file, 0, len);
    let file = file_with("fat.img", data, len);
    let _ = vfat::fix_directories(&file, 0, len);
});
