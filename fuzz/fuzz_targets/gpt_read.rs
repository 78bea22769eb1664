//! GPT read-back: the table of a disk the agent inspects or resizes, and the fix-up after a raw-disk image
//! is written (the backup moved to the end of a larger disk, the last partition grown). The first input
//! byte picks the sector size (512 or 4096); the rest is the start of the disk.
#![no_main]

use gridforge_agent::partition as table;
use gridforge_agent_fuzz::file_with;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, disk)) = data.split_first() else { return };
    let sector_size: u32 = if selector & 1 == 0 { 512 } else { 4096 };
    let len = (disk.len() as u64).div_ceil(u64::from(sector_size)) * u64::from(sector_size);
    let file = file_with("gpt.img", disk, len);
    let before = table::read(&file, sector_size);
    // As a raw-disk image written onto a disk 1 MiB larger than itself.
    file.set_len(len + (1 << 20)).expect("growing the scratch disk");
    if table::relocate_backup_and_grow_last(&file, sector_size).is_ok() {
        let after = table::read(&file, sector_size);
        if before.is_ok() {
            assert!(after.is_ok(), "the table no longer reads after the fix-up: {after:?}");
        }
    }
});
