//! FAT32 (an EFI system partition) written in-process with the `fatfs` crate.
//!
//! fatfs 0.3.6 writes new directories in a shape `fsck.vfat` rejects: `create_dir` stores a long-name entry
//! before each of `.` and `..` (so `.` is not the first slot), and on FAT32 it points `..` of a first-level
//! directory at the root's cluster (2) where the FAT specification wants 0. [`format()`] therefore rewrites
//! every directory after unmounting: `.` and `..` become the first two slots with the right clusters and the
//! stray long-name entries are dropped.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use fatfs::{FatType, FormatVolumeOptions, FsOptions};
use gridforge_proto::v1::Filesystem;

use super::{FsError, FsInfo, RangeIo, check_range, clear_signatures};

/// FAT32 needs at least this many clusters; below it a volume is FAT16 by definition.
const FAT32_MIN_CLUSTERS: u64 = 65525;
/// Reserved sectors fatfs puts before the first FAT on FAT32 (boot sector, FSInfo, backup boot sector).
const FATFS_FAT32_RESERVED_SECTORS: u64 = 8;
const DIR_ENTRY_SIZE: usize = 32;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_LONG_NAME: u8 = 0x0F;
const DELETED_ENTRY: u8 = 0xE5;
const DOT_NAME: &[u8; 11] = b".          ";
const DOTDOT_NAME: &[u8; 11] = b"..         ";

/// Formats `[offset, offset + len)` of `disk` as FAT32 with logical sectors of `sector_size` bytes (use the
/// disk's logical sector size: 512 or 4096), a random volume id and `label` (upper-cased, at most 11
/// characters, empty for none), then copies the directory tree `tree` into it if given.
///
/// The result passes `fsck.vfat -n`. Nothing outside the range is written. Data is written with ordinary
/// positional writes: syncing the target is the caller's job.
pub fn format(
    disk: &File,
    offset: u64,
    len: u64,
    sector_size: u32,
    label: &str,
    tree: Option<&Path>,
) -> Result<FsInfo, FsError> {
    if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
        return Err(FsError::Unsupported(format!(
            "FAT sector size {sector_size} (use 512, 1024, 2048 or 4096)"
        )));
    }
    let sector = u64::from(sector_size);
    if !offset.is_multiple_of(sector) {
        return Err(FsError::Unsupported(format!(
            "FAT partition offset {offset} not aligned to {sector_size}-byte sectors"
        )));
    }
    let label_bytes = volume_label(label)?;
    check_range(disk, offset, len)?;
    let needed = fat32_min_bytes(sector_size);
    if len < needed {
        return Err(FsError::TooSmall { what: "FAT32", needed, got: len });
    }
    let total_sectors = u32::try_from(len / sector).map_err(|_| {
        FsError::Unsupported(format!(
            "FAT32 volume of {len} bytes has more than 2^32 {sector_size}-byte sectors"
        ))
    })?;
    let volume_len = u64::from(total_sectors) * sector;

    clear_signatures(disk, offset, volume_len)?;
    let volume_id: u32 = rand::random();
    let mut options = FormatVolumeOptions::new()
        .fat_type(FatType::Fat32)
        .bytes_per_sector(sector_size as u16)
        .total_sectors(total_sectors)
        .volume_id(volume_id);
    if let Some(label_bytes) = label_bytes {
        options = options.volume_label(label_bytes);
    }
    fatfs::format_volume(RangeIo::new(disk, offset, volume_len), options)
        .map_err(|source| FsError::io("formatting FAT32", source))?;

    let fs = fatfs::FileSystem::new(RangeIo::new(disk, offset, volume_len), FsOptions::new())
        .map_err(|source| FsError::io("opening the new FAT file system", source))?;
    if fs.fat_type() != FatType::Fat32 {
        // fatfs silently falls back to FAT16 when the geometry does not give enough clusters; the size
        // check above is meant to rule that out.
        return Err(FsError::Unsupported(format!(
            "fatfs laid out {len} bytes as {:?} instead of FAT32",
            fs.fat_type()
        )));
    }
    if let Some(tree) = tree {
        copy_tree(tree, &fs.root_dir())?;
    }
    // The FSInfo sector's free-cluster count starts out "unknown"; counting once makes fatfs record it.
    fs.stats().map_err(|source| FsError::io("counting free FAT clusters", source))?;
    fs.unmount().map_err(|source| FsError::io("unmounting the new FAT file system", source))?;
    fix_directories(disk, offset, volume_len)?;

    Ok(FsInfo {
        kind: Filesystem::Vfat,
        uuid: volume_id_string(volume_id),
        label: label.trim_end().to_ascii_uppercase(),
    })
}

/// Gives the FAT32 volume at `offset` a new random volume id, in its boot sector and the backup copy, and
/// returns the volume as blkid now names it.
pub fn set_volume_id(disk: &File, offset: u64, len: u64) -> Result<FsInfo, FsError> {
    check_range(disk, offset, len)?;
    let mut boot = [0u8; 512];
    disk.read_exact_at(&mut boot, offset)
        .map_err(|source| FsError::io("reading the FAT boot sector", source))?;
    let u16_at = |at: usize| u16::from_le_bytes([boot[at], boot[at + 1]]);
    if u16_at(0x16) != 0 || boot[0x42] != 0x29 || boot[510..512] != [0x55, 0xAA] {
        return Err(FsError::Malformed {
            what: "FAT32 boot sector",
            reason: format!("no FAT32 volume with an extended boot signature at offset {offset}"),
        });
    }
    let volume_id: u32 = rand::random();
    let mut copies = vec![offset];
    let backup = u64::from(u16_at(0x32)) * u64::from(u16_at(0x0B));
    if backup > 0 && backup < len && u16_at(0x32) != 0xFFFF {
        copies.push(offset + backup);
    }
    for at in copies {
        disk.write_all_at(&volume_id.to_le_bytes(), at + 0x43)
            .map_err(|source| FsError::io("writing the FAT volume id", source))?;
    }
    match super::probe(disk, offset, len)? {
        Some(super::Probed::Filesystem(info)) if info.uuid == volume_id_string(volume_id) => Ok(info),
        other => Err(FsError::Malformed {
            what: "FAT32 volume",
            reason: format!("reads back as {other:?} after setting its volume id"),
        }),
    }
}

/// Replaces the text of the existing file `path` (relative to the root) of the FAT volume at `offset` with
/// `edit` of its current text.
pub fn edit_file(
    disk: &File,
    offset: u64,
    len: u64,
    path: &str,
    edit: impl FnOnce(&str) -> String,
) -> Result<(), FsError> {
    use std::io::{Read, Seek, SeekFrom};
    check_range(disk, offset, len)?;
    check_geometry(disk, offset, len)?;
    let fs = fatfs::FileSystem::new(RangeIo::new(disk, offset, len), FsOptions::new())
        .map_err(|source| FsError::io("opening the FAT file system", source))?;
    {
        let mut file =
            fs.root_dir().open_file(path).map_err(|source| FsError::io(format!("opening {path}"), source))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|source| FsError::io(format!("reading {path}"), source))?;
        let new_text = edit(&text);
        file.seek(SeekFrom::Start(0)).map_err(|source| FsError::io(format!("rewinding {path}"), source))?;
        file.truncate().map_err(|source| FsError::io(format!("truncating {path}"), source))?;
        file.write_all(new_text.as_bytes())
            .map_err(|source| FsError::io(format!("writing {path}"), source))?;
        file.flush().map_err(|source| FsError::io(format!("writing {path}"), source))?;
    }
    fs.unmount().map_err(|source| FsError::io("unmounting the FAT file system", source))
}

/// fatfs 0.3.6 computes the volume's geometry from the boot sector in `u32` without overflow checks (the
/// sectors of all FATs, the FAT entries they hold). Refuses a boot sector whose FATs and root directory do
/// not fit the range, or whose FAT holds more entries than a `u32` counts, before fatfs reads it.
fn check_geometry(disk: &File, offset: u64, len: u64) -> Result<(), FsError> {
    let mut boot = [0u8; 512];
    disk.read_exact_at(&mut boot, offset)
        .map_err(|source| FsError::io("reading the FAT boot sector", source))?;
    let u16_at = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
    let bytes_per_sector = u16_at(0x0B);
    let sectors_per_fat = match u16_at(0x16) {
        0 => u64::from(u32::from_le_bytes(boot[0x24..0x28].try_into().expect("4 bytes"))),
        n => n,
    };
    let malformed = |reason: String| FsError::Malformed { what: "FAT boot sector", reason };
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
        return Err(malformed(format!("{bytes_per_sector}-byte sectors")));
    }
    let root_dir_sectors = (u16_at(0x11) * DIR_ENTRY_SIZE as u64).div_ceil(bytes_per_sector);
    let metadata_sectors = u16_at(0x0E) + u64::from(boot[0x10]) * sectors_per_fat + root_dir_sectors;
    if metadata_sectors * bytes_per_sector > len
        || sectors_per_fat * bytes_per_sector * 8 > u64::from(u32::MAX)
    {
        return Err(malformed(format!(
            "{} FATs of {sectors_per_fat} sectors do not fit the {len}-byte volume",
            boot[0x10]
        )));
    }
    Ok(())
}

/// The smallest range that holds a FAT32 volume with `sector_size` sectors: the reserved sectors, two FATs
/// and 65525 one-sector clusters (fatfs uses one-sector clusters at this size).
pub fn fat32_min_bytes(sector_size: u32) -> u64 {
    let sector = u64::from(sector_size);
    let fat_sectors = ((FAT32_MIN_CLUSTERS + 2) * 4).div_ceil(sector);
    (FATFS_FAT32_RESERVED_SECTORS + 2 * fat_sectors + FAT32_MIN_CLUSTERS) * sector
}

/// A FAT volume id the way blkid prints it.
pub fn volume_id_string(volume_id: u32) -> String {
    format!("{:04X}-{:04X}", volume_id >> 16, volume_id & 0xFFFF)
}

/// Validates and pads a label; `None` for an empty label.
fn volume_label(label: &str) -> Result<Option<[u8; 11]>, FsError> {
    let invalid = |reason| FsError::InvalidLabel { kind: "FAT", label: label.to_owned(), reason };
    if label.is_empty() {
        return Ok(None);
    }
    if label.len() > 11 {
        return Err(invalid("longer than 11 characters"));
    }
    if label.starts_with(' ') {
        return Err(invalid("starts with a space"));
    }
    let mut padded = [b' '; 11];
    for (slot, byte) in padded.iter_mut().zip(label.bytes()) {
        if !byte.is_ascii() || byte.is_ascii_control() || b"\"*+,./:;<=>?[\\]|".contains(&byte) {
            return Err(invalid("only ASCII letters, digits, spaces and !#$%&'()-@^_`{}~ are allowed"));
        }
        *slot = byte.to_ascii_uppercase();
    }
    Ok(Some(padded))
}

type FatDir<'a, 'b> = fatfs::Dir<'a, RangeIo<'b>>;

/// Copies regular files and directories under `host_dir` into `fat_dir`, recursively.
fn copy_tree(host_dir: &Path, fat_dir: &FatDir<'_, '_>) -> Result<(), FsError> {
    let reading = |source| FsError::io(format!("reading directory {}", host_dir.display()), source);
    let mut entries =
        std::fs::read_dir(host_dir).map_err(reading)?.collect::<Result<Vec<_>, _>>().map_err(reading)?;
    entries.sort_by_key(|entry| entry.file_name());

    // FAT names are case-insensitive: two host names differing only in case would land on one entry.
    let mut names_seen = HashSet::new();
    for entry in entries {
        let host_path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|_| FsError::Unsupported(format!("file name not UTF-8: {}", host_path.display())))?;
        if !names_seen.insert(name.to_uppercase()) {
            return Err(FsError::Unsupported(format!(
                "{} differs only in case from another name in its directory, which FAT cannot hold",
                host_path.display()
            )));
        }
        let file_type = entry
            .file_type()
            .map_err(|source| FsError::io(format!("reading {}", host_path.display()), source))?;
        let copying =
            |source| FsError::io(format!("copying {} into the FAT file system", host_path.display()), source);
        if file_type.is_dir() {
            let fat_subdir = fat_dir.create_dir(&name).map_err(copying)?;
            copy_tree(&host_path, &fat_subdir)?;
        } else if file_type.is_file() {
            let mut host_file = File::open(&host_path)
                .map_err(|source| FsError::io(format!("opening {}", host_path.display()), source))?;
            let mut fat_file = fat_dir.create_file(&name).map_err(copying)?;
            io::copy(&mut host_file, &mut fat_file).map_err(copying)?;
            // The size reaches the directory entry only on flush; drop would swallow an error.
            fat_file.flush().map_err(copying)?;
        } else {
            return Err(FsError::Unsupported(format!(
                "{} is neither a regular file nor a directory; FAT holds only those",
                host_path.display()
            )));
        }
    }
    Ok(())
}

/// The FAT32 layout facts the directory fix-up needs, read from the boot sector.
struct Fat32Layout {
    cluster_bytes: u64,
    fat_start: u64,
    data_start: u64,
    root_cluster: u32,
    cluster_count: u32,
}

impl Fat32Layout {
    fn read(disk: &File, offset: u64, len: u64) -> Result<Self, FsError> {
        let mut boot = [0u8; 512];
        disk.read_exact_at(&mut boot, offset)
            .map_err(|source| FsError::io("reading the FAT boot sector", source))?;
        let u16_at = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
        let u32_at = |at: usize| u32::from_le_bytes(boot[at..at + 4].try_into().expect("4 bytes"));
        let bytes_per_sector = u16_at(0x0B);
        let sectors_per_cluster = u64::from(boot[0x0D]);
        let reserved_sectors = u16_at(0x0E);
        let fats = u64::from(boot[0x10]);
        let sectors_per_fat = u64::from(u32_at(0x24));
        let total_sectors = u64::from(u32_at(0x20));
        let fat_start = reserved_sectors * bytes_per_sector;
        let data_start = fat_start + fats * sectors_per_fat * bytes_per_sector;
        let cluster_bytes = sectors_per_cluster * bytes_per_sector;
        let data_bytes = (total_sectors * bytes_per_sector).min(len).saturating_sub(data_start);
        if cluster_bytes == 0 || data_bytes == 0 {
            return Err(FsError::Malformed {
                what: "FAT32 boot sector",
                reason: "zero cluster size or no data area".into(),
            });
        }
        Ok(Fat32Layout {
            cluster_bytes,
            fat_start,
            data_start,
            root_cluster: u32_at(0x2C),
            cluster_count: (data_bytes / cluster_bytes) as u32,
        })
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_start + u64::from(cluster - 2) * self.cluster_bytes
    }

    /// The clusters of the chain starting at `first`, checked against loops and out-of-range links.
    fn chain(&self, disk: &File, offset: u64, first: u32) -> Result<Vec<u32>, FsError> {
        let mut chain = Vec::new();
        let mut cluster = first;
        loop {
            if cluster < 2 || cluster - 2 >= self.cluster_count || chain.len() as u32 > self.cluster_count {
                return Err(FsError::Malformed {
                    what: "FAT32 cluster chain",
                    reason: format!("bad link to cluster {cluster} in chain from {first}"),
                });
            }
            chain.push(cluster);
            let mut entry = [0u8; 4];
            disk.read_exact_at(&mut entry, offset + self.fat_start + u64::from(cluster) * 4)
                .map_err(|source| FsError::io("reading the FAT", source))?;
            let next = u32::from_le_bytes(entry) & 0x0FFF_FFFF;
            if next >= 0x0FFF_FFF8 {
                return Ok(chain);
            }
            cluster = next;
        }
    }

    fn read_chain(&self, disk: &File, offset: u64, chain: &[u32]) -> Result<Vec<u8>, FsError> {
        let mut data = vec![0u8; chain.len() * self.cluster_bytes as usize];
        for (piece, &cluster) in data.chunks_mut(self.cluster_bytes as usize).zip(chain) {
            disk.read_exact_at(piece, offset + self.cluster_offset(cluster))
                .map_err(|source| FsError::io("reading a FAT directory", source))?;
        }
        Ok(data)
    }

    fn write_chain(&self, disk: &File, offset: u64, chain: &[u32], data: &[u8]) -> Result<(), FsError> {
        for (piece, &cluster) in data.chunks(self.cluster_bytes as usize).zip(chain) {
            disk.write_all_at(piece, offset + self.cluster_offset(cluster))
                .map_err(|source| FsError::io("writing a FAT directory", source))?;
        }
        Ok(())
    }
}

fn entry_cluster(entry: &[u8]) -> u32 {
    u32::from(u16::from_le_bytes([entry[20], entry[21]])) << 16
        | u32::from(u16::from_le_bytes([entry[26], entry[27]]))
}

fn set_entry_cluster(entry: &mut [u8], cluster: u32) {
    entry[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    entry[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
}

/// Subdirectories listed in a directory's raw entries (their first clusters), skipping `.` and `..`.
fn subdirectories(data: &[u8]) -> Vec<u32> {
    data.chunks_exact(DIR_ENTRY_SIZE)
        .take_while(|entry| entry[0] != 0)
        .filter(|entry| {
            entry[0] != DELETED_ENTRY
                && entry[11] != ATTR_LONG_NAME
                && entry[11] & ATTR_DIRECTORY != 0
                && entry[11] & ATTR_VOLUME_ID == 0
                && &entry[..11] != DOT_NAME
                && &entry[..11] != DOTDOT_NAME
        })
        .map(entry_cluster)
        .collect()
}

/// Rewrites one directory's entries: `.` (pointing at `own_cluster`) and `..` (at `parent_cluster`, 0 for
/// the root) first, without long-name entries, then every other entry in its original order.
fn rebuild_directory(data: &[u8], own_cluster: u32, parent_cluster: u32) -> Result<Vec<u8>, FsError> {
    let mut dot = None;
    let mut dotdot = None;
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut pending_long_names: Vec<&[u8]> = Vec::new();
    for entry in data.chunks_exact(DIR_ENTRY_SIZE) {
        if entry[0] == 0 {
            break;
        }
        if entry[0] == DELETED_ENTRY {
            pending_long_names.clear();
        } else if entry[11] == ATTR_LONG_NAME {
            pending_long_names.push(entry);
        } else if &entry[..11] == DOT_NAME {
            dot = Some(entry);
            pending_long_names.clear();
        } else if &entry[..11] == DOTDOT_NAME {
            dotdot = Some(entry);
            pending_long_names.clear();
        } else {
            kept.append(&mut pending_long_names);
            kept.push(entry);
        }
    }
    let (Some(dot), Some(dotdot)) = (dot, dotdot) else {
        return Err(FsError::Malformed {
            what: "FAT directory",
            reason: format!("directory at cluster {own_cluster} lacks '.' or '..'"),
        });
    };
    let mut rebuilt = vec![0u8; data.len()];
    let mut slots = rebuilt.chunks_exact_mut(DIR_ENTRY_SIZE);
    for (source, cluster) in [(dot, own_cluster), (dotdot, parent_cluster)] {
        let slot = slots.next().expect("a directory cluster holds at least two entries");
        slot.copy_from_slice(source);
        set_entry_cluster(slot, cluster);
    }
    for (slot, entry) in slots.zip(kept) {
        slot.copy_from_slice(entry);
    }
    Ok(rebuilt)
}

/// Puts `.` and `..` of every directory right (see the module comment). Runs on an unmounted volume; `format`
/// calls it, and it is public for the fuzz targets, which feed it hostile boot sectors and directories.
pub fn fix_directories(disk: &File, offset: u64, len: u64) -> Result<(), FsError> {
    let layout = Fat32Layout::read(disk, offset, len)?;
    let root_chain = layout.chain(disk, offset, layout.root_cluster)?;
    let root = layout.read_chain(disk, offset, &root_chain)?;
    // (directory cluster, parent cluster as `..` must name it); the root's children name 0.
    let mut pending: Vec<(u32, u32)> = subdirectories(&root).into_iter().map(|dir| (dir, 0)).collect();
    let mut visited = HashSet::new();
    while let Some((dir_cluster, parent_cluster)) = pending.pop() {
        if !visited.insert(dir_cluster) {
            return Err(FsError::Malformed {
                what: "FAT directory tree",
                reason: format!("directory cluster {dir_cluster} reached twice"),
            });
        }
        let chain = layout.chain(disk, offset, dir_cluster)?;
        let data = layout.read_chain(disk, offset, &chain)?;
        let rebuilt = rebuild_directory(&data, dir_cluster, parent_cluster)?;
        if rebuilt != data {
            layout.write_chain(disk, offset, &chain, &rebuilt)?;
        }
        pending.extend(subdirectories(&rebuilt).into_iter().map(|child| (child, dir_cluster)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `vfat_metadata` fuzz target: FATs whose sector count overflowed fatfs's `u32`
    /// arithmetic (a panic in fatfs's boot-sector check) are refused before fatfs reads them.
    #[test]
    fn fats_larger_than_the_volume_are_refused_before_fatfs_reads_them() {
        let input = include_bytes!("../../tests/fixtures/fuzz/vfat_metadata-fat-size-overflow");
        let disk = tempfile::tempfile().unwrap();
        disk.write_all_at(input, 0).unwrap();
        let len = input.len() as u64;
        let edited = edit_file(&disk, 0, len, "loader/entries/gridforge.conf", str::to_owned);
        assert!(matches!(edited, Err(FsError::Malformed { what: "FAT boot sector", .. })), "{edited:?}");
    }
}
