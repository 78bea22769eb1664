//! Recognising what a byte range holds, for inspecting disks: the signatures blkid reads, for the kinds
//! gridforge makes (ext, FAT, swap) and LUKS.

use std::fs::File;
use std::os::unix::fs::FileExt;

use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

use super::ext4::{SUPERBLOCK_AT, SUPERBLOCK_LEN, Superblock};
use super::vfat::volume_id_string;
use super::{FsError, FsInfo, check_range, swap};

/// What [`probe`] found in a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probed {
    /// A file system of a kind the proto names. ext2 and ext3 report as `Ext4` (the ext4 driver mounts
    /// them); FAT12/16/32 as `Vfat`.
    Filesystem(FsInfo),
    /// A LUKS container (version 1 or 2). The proto's `Filesystem` has no value for it.
    Luks {
        version: u16,
        /// As blkid prints it (the header's text field).
        uuid: String,
        /// LUKS2 only; empty for LUKS1.
        label: String,
    },
}

/// Bytes read from the start of the range: covers the swap signature for pages up to 64 KiB.
const PROBE_BYTES: u64 = 64 << 10;
const LUKS_MAGIC: &[u8; 6] = b"LUKS\xba\xbe";

/// Recognises ext2/3/4, FAT, swap and LUKS at the start of `[offset, offset + len)`; `None` for anything
/// else (including an empty range).
pub fn probe(disk: &File, offset: u64, len: u64) -> Result<Option<Probed>, FsError> {
    if len == 0 {
        return Ok(None);
    }
    check_range(disk, offset, len)?;
    let mut head = vec![0u8; len.min(PROBE_BYTES) as usize];
    disk.read_exact_at(&mut head, offset)
        .map_err(|source| FsError::io("reading the start of the partition", source))?;

    if let Some(luks) = probe_luks(&head) {
        return Ok(Some(luks));
    }
    if let Some(info) = probe_swap(&head) {
        return Ok(Some(Probed::Filesystem(info)));
    }
    if let Some(info) = probe_ext(&head) {
        return Ok(Some(Probed::Filesystem(info)));
    }
    if let Some(info) = probe_fat(disk, offset, len, &head)? {
        return Ok(Some(Probed::Filesystem(info)));
    }
    Ok(None)
}

/// A NUL-terminated text field.
fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// blkid prints nothing for an all-zero UUID.
fn uuid_string(uuid: Uuid) -> String {
    if uuid.is_nil() { String::new() } else { uuid.hyphenated().to_string() }
}

fn probe_luks(head: &[u8]) -> Option<Probed> {
    if head.len() < 512 || &head[..6] != LUKS_MAGIC {
        return None;
    }
    let version = u16::from_be_bytes([head[6], head[7]]);
    let label = if version == 2 { c_string(&head[24..72]) } else { String::new() };
    Some(Probed::Luks { version, uuid: c_string(&head[168..208]), label })
}

fn probe_swap(head: &[u8]) -> Option<FsInfo> {
    [4096usize, 8192, 16384, 65536].into_iter().find_map(|page| {
        let magic = head.get(page - 10..page)?;
        if magic == b"SWAPSPACE2" {
            let uuid = Uuid::from_slice(&head[swap::UUID_AT..swap::UUID_AT + 16]).ok()?;
            Some(FsInfo {
                kind: Filesystem::Swap,
                uuid: uuid_string(uuid),
                label: c_string(&head[swap::LABEL_AT..swap::LABEL_AT + swap::LABEL_MAX]),
            })
        } else if magic == b"SWAP-SPACE" {
            // Version 0: no UUID, no label.
            Some(FsInfo { kind: Filesystem::Swap, uuid: String::new(), label: String::new() })
        } else {
            None
        }
    })
}

fn probe_ext(head: &[u8]) -> Option<FsInfo> {
    let start = SUPERBLOCK_AT as usize;
    let superblock = Superblock::parse(head.get(start..start + SUPERBLOCK_LEN)?)?;
    Some(FsInfo { kind: Filesystem::Ext4, uuid: uuid_string(superblock.uuid), label: superblock.label })
}

const FAT_NO_NAME: &[u8; 11] = b"NO NAME    ";

fn fat_label(raw: &[u8]) -> Option<String> {
    if raw == FAT_NO_NAME || raw.iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    Some(String::from_utf8_lossy(raw).trim_end_matches([' ', '\0']).to_owned())
}

/// FAT boot sector; the label comes from the root directory's volume entry when there is one, else from
/// the boot sector, as blkid does.
fn probe_fat(disk: &File, offset: u64, len: u64, head: &[u8]) -> Result<Option<FsInfo>, FsError> {
    if head.len() < 512 || head[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    if &head[3..11] == b"NTFS    " || &head[3..11] == b"EXFAT   " {
        return Ok(None);
    }
    let u16_at = |at: usize| u16::from_le_bytes([head[at], head[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().expect("4 bytes"));
    let bytes_per_sector = u64::from(u16_at(0x0B));
    let sectors_per_cluster = u64::from(head[0x0D]);
    let reserved_sectors = u64::from(u16_at(0x0E));
    let fats = u64::from(head[0x10]);
    let root_entries = u64::from(u16_at(0x11));
    let media = head[0x15];
    let sectors_per_fat_16 = u64::from(u16_at(0x16));
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
        || !sectors_per_cluster.is_power_of_two()
        || reserved_sectors == 0
        || fats == 0
        || !(media == 0xF0 || media >= 0xF8)
    {
        return Ok(None);
    }
    let is_fat32 = sectors_per_fat_16 == 0;
    let (signature_at, id_at, label_at) = if is_fat32 { (0x42, 0x43, 0x47) } else { (0x26, 0x27, 0x2B) };
    let has_extended_fields = matches!(head[signature_at], 0x28 | 0x29);
    let uuid = if has_extended_fields { volume_id_string(u32_at(id_at)) } else { String::new() };
    let boot_label =
        if head[signature_at] == 0x29 { fat_label(&head[label_at..label_at + 11]) } else { None };

    let sectors_per_fat = if is_fat32 { u64::from(u32_at(0x24)) } else { sectors_per_fat_16 };
    let fat_end = (reserved_sectors + fats * sectors_per_fat) * bytes_per_sector;
    let (root_start, root_len) = if is_fat32 {
        let cluster_bytes = sectors_per_cluster * bytes_per_sector;
        let root_cluster = u64::from(u32_at(0x2C));
        (fat_end + root_cluster.saturating_sub(2) * cluster_bytes, cluster_bytes)
    } else {
        (fat_end, root_entries * 32)
    };
    let root_label = if root_start < len {
        let mut root = vec![0u8; root_len.min(len - root_start).min(PROBE_BYTES) as usize];
        disk.read_exact_at(&mut root, offset + root_start)
            .map_err(|source| FsError::io("reading the FAT root directory", source))?;
        root.chunks_exact(32)
            .take_while(|entry| entry[0] != 0)
            .find(|entry| entry[0] != 0xE5 && entry[11] != 0x0F && entry[11] & 0x08 != 0)
            .and_then(|entry| fat_label(&entry[..11]))
    } else {
        None
    };
    Ok(Some(FsInfo { kind: Filesystem::Vfat, uuid, label: root_label.or(boot_label).unwrap_or_default() }))
}
