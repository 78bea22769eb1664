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

/// Replaces the text of the existing file `path` (relative to the root) of the FAT32 volume at `offset` with
/// `edit` of its current text.
///
/// fatfs 0.3.6 trusts the volume: it does `u32` arithmetic on the boot sector's geometry without overflow
/// checks, subtracts 2 from every cluster number it follows (a directory entry's first cluster, a FAT link,
/// the root cluster) without checking it, and follows chains without looking for loops. So before fatfs reads
/// anything, the boot sector and the whole directory tree are checked here (`Fat32Layout::read` and
/// `read_tree`): every cluster fatfs can reach from the root is on the volume and in one chain only. A volume failing that is refused with [`FsError::Malformed`] naming the problem.
pub fn edit_file(
    disk: &File,
    offset: u64,
    len: u64,
    path: &str,
    edit: impl FnOnce(&str) -> String,
) -> Result<(), FsError> {
    use std::io::{Read, Seek, SeekFrom};
    check_range(disk, offset, len)?;
    Fat32Layout::read(disk, offset, len)?.read_tree(disk, offset)?;
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

/// Where a FAT32 volume keeps its FAT, its data and its root directory, read from the boot sector the way fatfs
/// reads it.
struct Fat32Layout {
    cluster_bytes: u64,
    /// The FAT fatfs reads: the first, or the active one when mirroring is off.
    fat_start: u64,
    fat_bytes: u64,
    data_start: u64,
    root_cluster: u32,
    /// Clusters whose data lies inside the range (fewer than the boot sector counts if the range is cut short).
    cluster_count: u32,
}

/// One directory of the tree, as [`Fat32Layout::read_tree`] found it.
struct TreeDir {
    cluster: u32,
    /// The cluster its `..` entry should name: `None` for the root itself, 0 for the root's children.
    parent: Option<u32>,
    chain: Vec<u32>,
    data: Vec<u8>,
}

impl Fat32Layout {
    /// Reads and checks the boot sector of the FAT32 volume in `[offset, offset + len)`. fatfs 0.3.6 computes
    /// the geometry in `u32` without overflow checks (the sectors of all FATs, the FAT entries they hold) and
    /// reads the FAT the boot sector names as active without checking that it exists. Refused here: a boot
    /// sector that is not FAT32's, whose FATs do not fit the range or hold more entries than a `u32` counts,
    /// whose FAT cannot map all its clusters, or whose active FAT is not one of its FATs.
    fn read(disk: &File, offset: u64, len: u64) -> Result<Self, FsError> {
        let mut boot = [0u8; 512];
        disk.read_exact_at(&mut boot, offset)
            .map_err(|source| FsError::io("reading the FAT boot sector", source))?;
        let u16_at = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
        let u32_at = |at: usize| u32::from_le_bytes(boot[at..at + 4].try_into().expect("4 bytes"));
        let malformed = |reason: String| FsError::Malformed { what: "FAT32 boot sector", reason };
        let bytes_per_sector = u16_at(0x0B);
        if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
            return Err(malformed(format!("{bytes_per_sector}-byte sectors")));
        }
        let sectors_per_cluster = u64::from(boot[0x0D]);
        if !sectors_per_cluster.is_power_of_two() || sectors_per_cluster > 128 {
            return Err(malformed(format!("{sectors_per_cluster} sectors per cluster")));
        }
        // The root directory entries, 16-bit sector count and 16-bit FAT size of FAT12/16 are 0 on FAT32.
        if u16_at(0x11) != 0 || u16_at(0x13) != 0 || u16_at(0x16) != 0 {
            return Err(malformed("fields of a FAT12 or FAT16 volume are set".into()));
        }
        let reserved_sectors = u16_at(0x0E);
        let fats = u64::from(boot[0x10]);
        if reserved_sectors == 0 || fats == 0 {
            return Err(malformed(format!("{reserved_sectors} reserved sectors and {fats} FATs")));
        }
        let sectors_per_fat = u64::from(u32_at(0x24));
        let fat_bytes = sectors_per_fat * bytes_per_sector;
        let data_start = (reserved_sectors + fats * sectors_per_fat) * bytes_per_sector;
        if data_start > len || fat_bytes * 8 > u64::from(u32::MAX) {
            return Err(malformed(format!(
                "{fats} FATs of {sectors_per_fat} sectors do not fit the {len}-byte volume"
            )));
        }
        // Bit 7 of the extended flags turns mirroring off: then only the FAT that bits 0-3 number is used.
        let flags = u16_at(0x28);
        let active_fat = if flags & 0x80 == 0 { 0 } else { flags & 0x0F };
        if active_fat >= fats {
            return Err(malformed(format!("the active FAT is number {active_fat} of {fats}")));
        }
        let cluster_bytes = sectors_per_cluster * bytes_per_sector;
        let volume_bytes = u64::from(u32_at(0x20)) * bytes_per_sector;
        let volume_clusters = volume_bytes.saturating_sub(data_start) / cluster_bytes;
        let fat_entries = fat_bytes / 4;
        if volume_clusters + 2 > fat_entries {
            return Err(malformed(format!(
                "a FAT of {fat_entries} entries cannot map {volume_clusters} clusters"
            )));
        }
        let cluster_count = volume_bytes.min(len).saturating_sub(data_start) / cluster_bytes;
        if cluster_count == 0 {
            return Err(malformed("no data area".into()));
        }
        Ok(Fat32Layout {
            cluster_bytes,
            fat_start: (reserved_sectors + active_fat * sectors_per_fat) * bytes_per_sector,
            fat_bytes,
            data_start,
            root_cluster: u32_at(0x2C),
            // At most `fat_entries`, which the size check above keeps below 2^27.
            cluster_count: cluster_count as u32,
        })
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_start + u64::from(cluster - 2) * self.cluster_bytes
    }

    /// Reads the directory tree from the root and checks everything fatfs may follow in it, which is more than
    /// the path it is asked for: every chain (the root's, each directory's and each file's) by
    /// [`ChainWalker::chain`], which also refuses a directory reached twice; no subdirectory at cluster 0, no
    /// file with bytes but no cluster or with fewer clusters than its size needs; `.` and `..` naming only 0
    /// (fatfs takes it for the root) or a directory of the tree. Returns the directories, the root first and
    /// each before its subdirectories.
    fn read_tree(&self, disk: &File, offset: u64) -> Result<Vec<TreeDir>, FsError> {
        let malformed = |reason: String| FsError::Malformed { what: "FAT directory tree", reason };
        let mut walker = ChainWalker::new(self, disk, offset);
        let mut dirs = Vec::new();
        // (path, first cluster, cluster `..` should name); the root's path is empty.
        let mut pending = vec![(String::new(), self.root_cluster, None)];
        let mut dot_links = Vec::new();
        while let Some((path, cluster, parent)) = pending.pop() {
            let owner =
                if path.is_empty() { "the root directory".to_owned() } else { format!("directory {path}") };
            let chain = walker.chain(cluster, &owner)?;
            let data = self.read_chain(disk, offset, &chain)?;
            for entry in visible_entries(&data) {
                let entry_path = format!("{path}/{}", short_name(entry));
                let first = entry_cluster(entry);
                if entry[11] & ATTR_DIRECTORY == 0 {
                    let size = u32::from_le_bytes(entry[28..32].try_into().expect("4 bytes"));
                    let clusters = match first {
                        0 => 0,
                        _ => walker.chain(first, &format!("file {entry_path}"))?.len() as u64,
                    };
                    if clusters * self.cluster_bytes < u64::from(size) {
                        return Err(malformed(format!(
                            "file {entry_path} holds {size} bytes in {clusters} clusters of {} bytes",
                            self.cluster_bytes
                        )));
                    }
                } else if &entry[..11] == DOT_NAME || &entry[..11] == DOTDOT_NAME {
                    if first != 0 {
                        dot_links.push((entry_path, first));
                    }
                } else if first == 0 {
                    return Err(malformed(format!("directory {entry_path} starts at cluster 0")));
                } else {
                    pending.push((entry_path, first, Some(if parent.is_none() { 0 } else { cluster })));
                }
            }
            dirs.push(TreeDir { cluster, parent, chain, data });
        }
        let dir_clusters: HashSet<u32> = dirs.iter().map(|dir| dir.cluster).collect();
        if let Some((path, first)) = dot_links.into_iter().find(|(_, first)| !dir_clusters.contains(first)) {
            return Err(malformed(format!("{path} names cluster {first}, where no directory starts")));
        }
        Ok(dirs)
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

/// Follows cluster chains through the FAT of a [`Fat32Layout`], remembering every cluster it has passed.
struct ChainWalker<'a> {
    layout: &'a Fat32Layout,
    disk: &'a File,
    /// Where the FAT starts on `disk`.
    fat_at: u64,
    /// The block of the FAT last read (chains mostly run through consecutive clusters) and its offset in the FAT.
    block: Vec<u8>,
    block_start: u64,
    /// One bit per cluster number, set once a chain has passed it.
    seen: Vec<u64>,
}

impl<'a> ChainWalker<'a> {
    const BLOCK_BYTES: u64 = 4096;

    fn new(layout: &'a Fat32Layout, disk: &'a File, offset: u64) -> Self {
        ChainWalker {
            layout,
            disk,
            fat_at: offset + layout.fat_start,
            block: Vec::new(),
            block_start: 0,
            seen: vec![0; (layout.cluster_count as usize + 2).div_ceil(64)],
        }
    }

    /// The clusters of `owner`'s chain from `first`. Each must be a cluster of the volume that no chain walked
    /// before passed: a first cluster or a link that is 0, 1, a bad or reserved cluster or past the end is
    /// refused, and so is a loop or a cluster shared with another chain.
    fn chain(&mut self, first: u32, owner: &str) -> Result<Vec<u32>, FsError> {
        let mut chain = Vec::new();
        let mut cluster = first;
        loop {
            let reached = if chain.is_empty() { "starts at" } else { "links to" };
            if cluster < 2 || cluster - 2 >= self.layout.cluster_count {
                return Err(FsError::Malformed {
                    what: "FAT32 cluster chain",
                    reason: format!(
                        "{owner} {reached} cluster {cluster}, outside the volume's clusters 2 to {}",
                        self.layout.cluster_count + 1
                    ),
                });
            }
            let (word, bit) = (cluster as usize / 64, 1u64 << (cluster % 64));
            if self.seen[word] & bit != 0 {
                return Err(FsError::Malformed {
                    what: "FAT32 cluster chain",
                    reason: format!(
                        "{owner} {reached} cluster {cluster}, which a chain has reached before (a loop, or \
                         clusters shared with another file or directory)"
                    ),
                });
            }
            self.seen[word] |= bit;
            chain.push(cluster);
            let next = self.fat_entry(cluster)? & 0x0FFF_FFFF;
            if next >= 0x0FFF_FFF8 {
                return Ok(chain);
            }
            cluster = next;
        }
    }

    /// The FAT entry of `cluster`, a cluster of the volume (so inside the FAT: [`Fat32Layout::read`] checks
    /// that the FAT maps every cluster).
    fn fat_entry(&mut self, cluster: u32) -> Result<u32, FsError> {
        let at = u64::from(cluster) * 4;
        let end = self.block_start + self.block.len() as u64;
        if at < self.block_start || at + 4 > end {
            self.block_start = at - at % Self::BLOCK_BYTES;
            let block_bytes = Self::BLOCK_BYTES.min(self.layout.fat_bytes - self.block_start);
            self.block.resize(block_bytes as usize, 0);
            self.disk
                .read_exact_at(&mut self.block, self.fat_at + self.block_start)
                .map_err(|source| FsError::io("reading the FAT", source))?;
        }
        let i = (at - self.block_start) as usize;
        Ok(u32::from_le_bytes(self.block[i..i + 4].try_into().expect("4 bytes")))
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

/// The entries of a directory's raw data that fatfs lists: those before the end marker that are neither
/// deleted, nor parts of a long name, nor the volume label.
fn visible_entries(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.chunks_exact(DIR_ENTRY_SIZE).take_while(|entry| entry[0] != 0).filter(|entry| {
        entry[0] != DELETED_ENTRY
            && entry[11] & ATTR_LONG_NAME != ATTR_LONG_NAME
            && entry[11] & ATTR_VOLUME_ID == 0
    })
}

/// An entry's 8.3 name the way `ls` on FAT shows it (`NAME.EXT`), for messages.
fn short_name(entry: &[u8]) -> String {
    let base = String::from_utf8_lossy(&entry[..8]).trim_end().to_owned();
    let extension = String::from_utf8_lossy(&entry[8..11]).trim_end().to_owned();
    if extension.is_empty() { base } else { format!("{base}.{extension}") }
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
    for dir in layout.read_tree(disk, offset)? {
        let Some(parent) = dir.parent else { continue };
        let rebuilt = rebuild_directory(&dir.data, dir.cluster, parent)?;
        if rebuilt != dir.data {
            layout.write_chain(disk, offset, &dir.chain, &rebuilt)?;
        }
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
        assert!(matches!(edited, Err(FsError::Malformed { what: "FAT32 boot sector", .. })), "{edited:?}");
    }

    const ENTRY: &str = "loader/entries/gridforge.conf";

    /// A freshly formatted ESP holding `loader/entries/gridforge.conf` and a few other files, at offset 0 of a
    /// scratch file, with its length.
    fn esp() -> (File, u64) {
        let tree = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tree.path().join("loader/entries")).unwrap();
        std::fs::create_dir_all(tree.path().join("EFI/BOOT")).unwrap();
        std::fs::write(tree.path().join(ENTRY), "title Debian\noptions root=UUID=old ro\n").unwrap();
        std::fs::write(tree.path().join("loader/loader.conf"), "default gridforge.conf\n").unwrap();
        std::fs::write(tree.path().join("EFI/BOOT/BOOTX64.EFI"), vec![0x5A; 3000]).unwrap();
        let len = fat32_min_bytes(512);
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(len).unwrap();
        format(&disk, 0, len, 512, "ESP", Some(tree.path())).unwrap();
        (disk, len)
    }

    fn edit(disk: &File, len: u64) -> Result<(), FsError> {
        edit_file(disk, 0, len, ENTRY, |text| text.replace("UUID=old", "UUID=new"))
    }

    /// The text of `ENTRY`, read back with fatfs.
    fn entry_text(disk: &File, len: u64) -> String {
        use std::io::Read;
        let fs = fatfs::FileSystem::new(RangeIo::new(disk, 0, len), FsOptions::new()).unwrap();
        let mut text = String::new();
        fs.root_dir().open_file(ENTRY).unwrap().read_to_string(&mut text).unwrap();
        text
    }

    /// Where on the disk the directory entry at `path` (8.3 names, the last one matched by its start) is.
    fn entry_offset(disk: &File, len: u64, path: &[&str]) -> u64 {
        let layout = Fat32Layout::read(disk, 0, len).unwrap();
        let mut walker = ChainWalker::new(&layout, disk, 0);
        let mut cluster = layout.root_cluster;
        let mut found = None;
        for name in path {
            let chain = walker.chain(cluster, "a test path").unwrap();
            let data = layout.read_chain(disk, 0, &chain).unwrap();
            let index = data
                .chunks_exact(DIR_ENTRY_SIZE)
                .position(|entry| {
                    entry[11] & ATTR_LONG_NAME != ATTR_LONG_NAME && short_name(entry).starts_with(name)
                })
                .unwrap_or_else(|| panic!("no {name} in {path:?}"));
            let per_cluster = layout.cluster_bytes as usize / DIR_ENTRY_SIZE;
            found = Some(
                layout.cluster_offset(chain[index / per_cluster])
                    + (index % per_cluster * DIR_ENTRY_SIZE) as u64,
            );
            cluster = entry_cluster(&data[index * DIR_ENTRY_SIZE..]);
        }
        found.unwrap()
    }

    fn read_entry(disk: &File, at: u64) -> [u8; DIR_ENTRY_SIZE] {
        let mut entry = [0u8; DIR_ENTRY_SIZE];
        disk.read_exact_at(&mut entry, at).unwrap();
        entry
    }

    fn set_first_cluster(disk: &File, at: u64, cluster: u32) {
        let mut entry = read_entry(disk, at);
        set_entry_cluster(&mut entry, cluster);
        disk.write_all_at(&entry, at).unwrap();
    }

    /// Sets the FAT entry of `cluster` in every FAT.
    fn set_fat_entry(disk: &File, len: u64, cluster: u32, value: u32) {
        let layout = Fat32Layout::read(disk, 0, len).unwrap();
        let mut at = layout.fat_start;
        while at < layout.data_start {
            disk.write_all_at(&value.to_le_bytes(), at + u64::from(cluster) * 4).unwrap();
            at += layout.fat_bytes;
        }
    }

    #[track_caller]
    fn assert_refused(result: Result<(), FsError>, what: &str, reason_has: &str) {
        match result {
            Err(FsError::Malformed { what: got, reason }) if got == what && reason.contains(reason_has) => {}
            other => panic!("expected malformed {what} mentioning {reason_has:?}, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_esp_is_edited() {
        let (disk, len) = esp();
        edit(&disk, len).unwrap();
        assert_eq!(entry_text(&disk, len), "title Debian\noptions root=UUID=new ro\n");
        // A text growing past its cluster gets more clusters, and the tree still checks out.
        edit_file(&disk, 0, len, ENTRY, |text| text.repeat(40)).unwrap();
        assert_eq!(entry_text(&disk, len), "title Debian\noptions root=UUID=new ro\n".repeat(40));
        Fat32Layout::read(&disk, 0, len).unwrap().read_tree(&disk, 0).unwrap();
    }

    #[test]
    fn directory_entries_at_cluster_0_1_or_past_the_end_are_refused() {
        let (disk, len) = esp();
        let past_the_end = Fat32Layout::read(&disk, 0, len).unwrap().cluster_count + 2;
        for (cluster, what, reason) in [
            (0, "FAT directory tree", "directory /LOADER/ENTRIES starts at cluster 0"),
            (1, "FAT32 cluster chain", "directory /LOADER/ENTRIES starts at cluster 1, outside"),
            (past_the_end, "FAT32 cluster chain", &format!("starts at cluster {past_the_end}, outside")),
            (u32::MAX, "FAT32 cluster chain", "starts at cluster 4294967295, outside"),
        ] {
            let (disk, len) = esp();
            set_first_cluster(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES"]), cluster);
            assert_refused(edit(&disk, len), what, reason);
        }
        for cluster in [1, past_the_end] {
            let (disk, len) = esp();
            set_first_cluster(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES", "GRIDFO"]), cluster);
            assert_refused(edit(&disk, len), "FAT32 cluster chain", &format!("starts at cluster {cluster}"));
        }
        // A file with bytes but no cluster.
        let (disk, len) = esp();
        set_first_cluster(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES", "GRIDFO"]), 0);
        assert_refused(edit(&disk, len), "FAT directory tree", "bytes in 0 clusters");
    }

    #[test]
    fn a_root_cluster_off_the_volume_is_refused() {
        for cluster in [0, 1, 0x0FFF_FFF0] {
            let (disk, len) = esp();
            disk.write_all_at(&u32::to_le_bytes(cluster), 0x2C).unwrap();
            assert_refused(
                edit(&disk, len),
                "FAT32 cluster chain",
                &format!("the root directory starts at cluster {cluster}"),
            );
        }
    }

    #[test]
    fn fat_chains_that_loop_or_leave_the_volume_are_refused() {
        let (disk, len) = esp();
        let count = Fat32Layout::read(&disk, 0, len).unwrap().cluster_count;
        let file =
            entry_cluster(&read_entry(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES", "GRIDFO"])));
        let dir = entry_cluster(&read_entry(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES"])));
        for (cluster, link, reason) in [
            (file, file, format!("links to cluster {file}, which a chain has reached before")),
            (dir, dir, format!("links to cluster {dir}, which a chain has reached before")),
            (file, 2, "links to cluster 2, which a chain has reached before".to_owned()),
            (file, 0, "links to cluster 0, outside".to_owned()),
            (file, 1, "links to cluster 1, outside".to_owned()),
            (dir, count + 2, format!("links to cluster {}, outside", count + 2)),
            (dir, 0x0FFF_FFF7, "links to cluster 268435447, outside".to_owned()),
        ] {
            let (disk, len) = esp();
            set_fat_entry(&disk, len, cluster, link);
            assert_refused(edit(&disk, len), "FAT32 cluster chain", &reason);
        }
    }

    #[test]
    fn dot_entries_naming_no_directory_are_refused() {
        let (disk, len) = esp();
        let file =
            entry_cluster(&read_entry(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES", "GRIDFO"])));
        set_first_cluster(&disk, entry_offset(&disk, len, &["LOADER", "ENTRIES", ".."]), file);
        assert_refused(
            edit(&disk, len),
            "FAT directory tree",
            &format!("names cluster {file}, where no directory"),
        );
    }

    #[test]
    fn boot_sectors_whose_fat_cannot_serve_fatfs_are_refused() {
        // The active FAT (mirroring off) is not one of the two.
        let (disk, len) = esp();
        disk.write_all_at(&u16::to_le_bytes(0x80 | 2), 0x28).unwrap();
        assert_refused(edit(&disk, len), "FAT32 boot sector", "active FAT is number 2 of 2");
        // A FAT too small for the volume's clusters.
        let (disk, len) = esp();
        let layout = Fat32Layout::read(&disk, 0, len).unwrap();
        disk.write_all_at(&u32::to_le_bytes((layout.fat_bytes / 512 / 2) as u32), 0x24).unwrap();
        assert_refused(edit(&disk, len), "FAT32 boot sector", "cannot map");
        // FAT16 fields.
        let (disk, len) = esp();
        disk.write_all_at(&u16::to_le_bytes(512), 0x11).unwrap();
        assert_refused(edit(&disk, len), "FAT32 boot sector", "FAT12 or FAT16");
    }
}
