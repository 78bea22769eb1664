//! LUKS2 headers: binary headers and JSON areas, both copies, as `luks2::dump`, `luks2::open` and the
//! crypto-erase probe read them. The input is the start of the device; the harness fills in each copy's
//! SHA-256 checksum so that inputs get past it to the JSON. `open` runs only where the header's key
//! derivation costs are small (the KDF's cost is the header's to choose and bounded elsewhere).
#![no_main]

use gridforge_agent::block::{BlockTarget, TargetOptions};
use gridforge_agent::crypt::luks2;
use gridforge_agent::wipe::luks;
use gridforge_agent_fuzz::{file_with, scratch_path};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const HDR_SIZES: [u64; 9] =
    [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];
const CSUM_AT: usize = 448;

/// Writes the checksum of the copy at `at` when it names a valid size and fits the input.
fn fix_checksum(data: &mut [u8], at: usize) -> Option<u64> {
    let bin = data.get(at..at + 4096)?;
    let hdr_size = u64::from_be_bytes(bin[8..16].try_into().expect("8 bytes"));
    if !HDR_SIZES.contains(&hdr_size) {
        return None;
    }
    let copy = data.get_mut(at..at + hdr_size as usize)?;
    copy[CSUM_AT..CSUM_AT + 64].fill(0);
    let sum = Sha256::digest(&*copy);
    copy[CSUM_AT..CSUM_AT + 32].copy_from_slice(&sum);
    Some(hdr_size)
}

/// Whether every keyslot's and digest's key derivation is cheap enough to run per input.
fn cheap_kdfs(data: &[u8]) -> bool {
    let Some(json) =
        data.get(4096..).map(|area| &area[..area.iter().position(|&b| b == 0).unwrap_or(area.len())])
    else {
        return false;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else { return true };
    let small = |v: &serde_json::Value, key: &str, max: u64| {
        v.get(key).and_then(|n| n.as_u64()).is_none_or(|n| n <= max)
    };
    let keyslots = value.get("keyslots").and_then(|k| k.as_object()).into_iter().flatten();
    let kdfs_cheap = keyslots.filter_map(|(_, ks)| ks.get("kdf")).all(|kdf| {
        small(kdf, "iterations", 1000)
            && small(kdf, "memory", 64)
            && small(kdf, "time", 4)
            && small(kdf, "cpus", 4)
    });
    let digests = value.get("digests").and_then(|d| d.as_object()).into_iter().flatten();
    kdfs_cheap && digests.map(|(_, d)| d).all(|d| small(d, "iterations", 1000))
}

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    if let Some(hdr_size) = fix_checksum(&mut data, 0) {
        fix_checksum(&mut data, hdr_size as usize);
    } else {
        for size in HDR_SIZES {
            fix_checksum(&mut data, size as usize);
        }
    }
    // Room past the headers for keyslot areas and a payload, rounded to whole sectors.
    let len = (data.len() as u64 + (1 << 20)).div_ceil(4096) * 4096;
    let file = file_with("luks.img", &data, len);
    let _ = luks2::dump(&file, 0);
    if cheap_kdfs(&data) {
        let _ = luks2::open(&file, 0, b"fuzz");
    }
    drop(file);
    let target = BlockTarget::open(
        &scratch_path("luks.img"),
        &TargetOptions { read_only: true, ..Default::default() },
    )
    .expect("opening the scratch target");
    if let luks::LuksProbe::Luks2 { key_material_end, .. } = luks::probe(&target).expect("probing") {
        assert!(key_material_end <= target.size());
    }
});
