//! Just enough of the LUKS2 on-disk format to find where its key material ends: both binary headers, both
//! JSON areas and the keyslot area. Overwriting `[0, key_material_end)` destroys every on-disk copy of the
//! volume key.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::block::BlockTarget;

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
const BINARY_HEADER: usize = 4096;
/// Where cryptsetup may put the secondary header: right after the primary, whose size is one of these.
const HEADER_SIZES: [u64; 9] =
    [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];

/// What a target holds, as far as crypto-erase cares.
#[derive(Debug, PartialEq, Eq)]
pub enum LuksProbe {
    /// A LUKS2 volume whose key material lies in `[0, key_material_end)`.
    Luks2 { hdr_size: u64, key_material_end: u64, from_secondary: bool },
    /// Not LUKS2, with the reason.
    NotLuks2(String),
}

#[derive(Deserialize)]
struct Metadata {
    config: Config,
    #[serde(default)]
    keyslots: BTreeMap<String, Keyslot>,
    #[serde(default)]
    segments: BTreeMap<String, Segment>,
}

#[derive(Deserialize)]
struct Config {
    keyslots_size: Option<String>,
}

#[derive(Deserialize)]
struct Keyslot {
    area: Option<Area>,
}

#[derive(Deserialize)]
struct Area {
    offset: String,
    size: String,
}

#[derive(Deserialize)]
struct Segment {
    offset: String,
}

/// Read the LUKS2 headers of `target` (the primary, or the secondary if the primary is damaged).
pub fn probe(target: &BlockTarget) -> Result<LuksProbe, crate::block::BlockError> {
    let size = target.size();
    let mut head = vec![0u8; BINARY_HEADER];
    if size < BINARY_HEADER as u64 {
        return Ok(LuksProbe::NotLuks2(format!("the target holds only {size} bytes")));
    }
    target.read_at(&mut head, 0)?;
    let mut why = match parse_binary(&head, MAGIC_PRIMARY) {
        Ok(hdr_size) => match read_json(target, 0, hdr_size)? {
            Ok(end) => {
                return Ok(LuksProbe::Luks2 {
                    hdr_size,
                    key_material_end: end.min(size),
                    from_secondary: false,
                });
            }
            Err(e) => e,
        },
        Err(e) => e,
    };
    for offset in HEADER_SIZES {
        if offset + BINARY_HEADER as u64 > size {
            break;
        }
        target.read_at(&mut head, offset)?;
        if let Ok(hdr_size) = parse_binary(&head, MAGIC_SECONDARY)
            && hdr_size == offset
        {
            match read_json(target, offset, hdr_size)? {
                Ok(end) => {
                    return Ok(LuksProbe::Luks2 {
                        hdr_size,
                        key_material_end: end.min(size),
                        from_secondary: true,
                    });
                }
                Err(e) => why = e,
            }
        }
    }
    Ok(LuksProbe::NotLuks2(why))
}

/// The header size of a binary LUKS2 header with `magic`, or why it is not one.
fn parse_binary(head: &[u8], magic: &[u8; 6]) -> Result<u64, String> {
    if &head[..6] != magic {
        return Err("no LUKS magic (\"LUKS\\xba\\xbe\") at offset 0".to_string());
    }
    let version = u16::from_be_bytes([head[6], head[7]]);
    if version != 2 {
        return Err(format!("LUKS version {version} header; only LUKS2 is supported"));
    }
    let hdr_size = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    if !HEADER_SIZES.contains(&hdr_size) {
        return Err(format!("LUKS2 header size {hdr_size} is not a valid header size"));
    }
    Ok(hdr_size)
}

/// The end of the key material, from the JSON area of the header at `at`.
fn read_json(
    target: &BlockTarget,
    at: u64,
    hdr_size: u64,
) -> Result<Result<u64, String>, crate::block::BlockError> {
    if at + hdr_size > target.size() {
        return Ok(Err(format!(
            "LUKS2 header of {hdr_size} bytes at offset {at} runs past the end of the {}-byte target",
            target.size()
        )));
    }
    let mut area = vec![0u8; hdr_size as usize - BINARY_HEADER];
    target.read_at(&mut area, at + BINARY_HEADER as u64)?;
    let text_len = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let meta: Metadata = match serde_json::from_slice(&area[..text_len]) {
        Ok(m) => m,
        Err(e) => return Ok(Err(format!("LUKS2 JSON area is unreadable: {e}"))),
    };
    let num =
        |s: &str, what: &str| s.parse::<u64>().map_err(|_| format!("LUKS2 {what} {s:?} is not a number"));
    let keyslots_size = match meta.config.keyslots_size.as_deref().map(|s| num(s, "keyslots_size")) {
        Some(Ok(n)) => n,
        Some(Err(e)) => return Ok(Err(e)),
        None => 0,
    };
    // Everything up to the keyslot area's end, and any keyslot area cryptsetup placed beyond it.
    // The numbers are the header's to choose: saturate rather than overflow (the caller caps at the size).
    let mut end = (2 * hdr_size).saturating_add(keyslots_size);
    for slot in meta.keyslots.values() {
        if let Some(area) = &slot.area {
            match (num(&area.offset, "keyslot offset"), num(&area.size, "keyslot size")) {
                (Ok(o), Ok(s)) => end = end.max(o.saturating_add(s)),
                (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
            }
        }
    }
    if keyslots_size == 0 {
        // Without the config value, the data segment start bounds the metadata and keyslots.
        match meta.segments.values().map(|s| num(&s.offset, "segment offset")).collect::<Result<Vec<_>, _>>()
        {
            Ok(offsets) => end = end.max(offsets.into_iter().min().unwrap_or(0)),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::TargetOptions;

    /// Found by the `luks2_header` fuzz target: a primary header whose size runs past the end of the target
    /// made the probe fail with a read error instead of saying it is not a usable LUKS2 header.
    #[test]
    fn header_larger_than_the_target_is_not_luks2() {
        let input = include_bytes!("../../tests/fixtures/fuzz/luks2_header-past-the-end");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut disk = input.to_vec();
        disk.resize(1 << 20, 0);
        std::fs::write(&path, &disk).unwrap();
        let target =
            BlockTarget::open(&path, &TargetOptions { read_only: true, ..Default::default() }).unwrap();
        match probe(&target).unwrap() {
            LuksProbe::NotLuks2(why) => assert!(why.contains("runs past the end"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// Key material that ends past 2^64 bytes (as a hostile header may say) is capped at the target's end.
    #[test]
    fn keyslot_area_past_any_disk_is_capped_at_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        let mut disk = vec![0u8; 1 << 20];
        disk[..6].copy_from_slice(MAGIC_PRIMARY);
        disk[6..8].copy_from_slice(&2u16.to_be_bytes());
        disk[8..16].copy_from_slice(&(16u64 << 10).to_be_bytes());
        let json = br#"{"config":{"keyslots_size":"18446744073709551615"},
            "keyslots":{"0":{"area":{"offset":"18446744073709551615","size":"4096"}}}}"#;
        disk[BINARY_HEADER..BINARY_HEADER + json.len()].copy_from_slice(json);
        std::fs::write(&path, &disk).unwrap();
        let target =
            BlockTarget::open(&path, &TargetOptions { read_only: true, ..Default::default() }).unwrap();
        let probed = probe(&target).unwrap();
        assert_eq!(
            probed,
            LuksProbe::Luks2 { hdr_size: 16 << 10, key_material_end: 1 << 20, from_secondary: false }
        );
    }
}
