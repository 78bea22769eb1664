//! FAT metadata the agent reads back and rewrites: the boot sector and its backup (a clone's new volume id),
//! the directory fix-up after formatting (cluster chains, `.`/`..` entries), and the loader-entry edit, which
//! checks the boot sector and the directory tree itself before handing the volume to fatfs.
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
    // A clone's edit swaps the root UUID; appending makes the text outgrow its cluster, so fatfs allocates.
    let file = file_with("fat.img", data, len);
    let _ = vfat::edit_file(&file, 0, len, "loader/entries/gridforge.conf", |text| {
        text.replace("root=UUID=0", "root=UUID=1") + &"#".repeat(600)
    });
});
