//! Making a store: blobs in, entries published into a re-signed index, root filesystems packed as
//! zstd-compressed tar archives.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use super::index::{Compression, Format, Index, IndexEntry, Kind, check_relative_path};
use super::{ImageError, is_sha256_hex, sign};
use crate::pipeline::LeftOut;

/// zstd worker threads used when packing (the nodes that pack have two cores).
const ZSTD_WORKERS: u32 = 2;

/// Creates an empty store layout (`blobs/sha256/`) in `dir`; existing contents are kept.
pub fn init_store(dir: &Path) -> Result<(), ImageError> {
    let blobs = blobs_dir(dir);
    fs::create_dir_all(&blobs)
        .map_err(ImageError::io(format!("creating store directory {}", blobs.display())))
}

fn blobs_dir(store_dir: &Path) -> PathBuf {
    store_dir.join("blobs").join("sha256")
}

/// Copies `src` into the store as `blobs/sha256/<hex>`; returns (sha256 hex, size, path relative to the index).
pub fn add_blob(store_dir: &Path, mut src: impl Read) -> Result<(String, u64, String), ImageError> {
    let mut writer = BlobWriter::new(store_dir)?;
    io::copy(&mut src, &mut writer)
        .map_err(ImageError::io(format!("adding a blob to store {}", store_dir.display())))?;
    writer.finish()
}

/// Prefix of the temp files blobs are written to before they are renamed to their digest.
const TEMP_BLOB_PREFIX: &str = ".add-";

/// A blob being written into a store: hashes and counts what is written to a temp file in the blob
/// directory, and [`finish`](BlobWriter::finish) renames it to its digest. Dropped unfinished, the temp
/// file is removed; a writer killed before that leaves it behind, locked until the process is gone, for
/// [`remove_temp_blobs`] to find. Packers write their compressed output straight into one of these.
#[derive(Debug)]
pub struct BlobWriter {
    store_dir: PathBuf,
    tmp: NamedTempFile,
    hasher: Sha256,
    size: u64,
    /// An exclusive flock on the temp file, held while it is written: it tells a live writer's temp file
    /// from one whose writer was killed.
    _lock: Flock<File>,
}

impl BlobWriter {
    pub fn new(store_dir: &Path) -> Result<BlobWriter, ImageError> {
        init_store(store_dir)?;
        let blobs = blobs_dir(store_dir);
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_BLOB_PREFIX)
            .tempfile_in(&blobs)
            .map_err(ImageError::io(format!("creating temp file in {}", blobs.display())))?;
        let context = || format!("locking temp file {}", tmp.path().display());
        let dup = tmp.as_file().try_clone().map_err(ImageError::io(context()))?;
        // Nobody else knows the new file's name yet, so the lock is free.
        let _lock = Flock::lock(dup, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| ImageError::Io { context: context(), source: io::Error::from(errno) })?;
        Ok(BlobWriter { store_dir: store_dir.to_path_buf(), tmp, hasher: Sha256::new(), size: 0, _lock })
    }

    /// Syncs and renames the blob into place; returns (sha256 hex, size, path relative to the index).
    pub fn finish(self) -> Result<(String, u64, String), ImageError> {
        self.finish_added().map(|added| (added.sha256, added.size, added.path))
    }

    /// [`finish`](BlobWriter::finish), also telling whether the store already held a blob with these bytes
    /// (so that a caller undoing its addition removes only a blob it added).
    pub fn finish_added(self) -> Result<AddedBlob, ImageError> {
        let BlobWriter { store_dir, tmp, hasher, size, _lock } = self;
        let sha256 = hex::encode(hasher.finalize());
        let relative = format!("blobs/sha256/{sha256}");
        let dest = store_dir.join(&relative);
        let existed = dest.exists();
        tmp.as_file().sync_all().map_err(ImageError::io(format!("syncing {}", tmp.path().display())))?;
        // Same digest means same bytes: replacing an existing blob is harmless.
        tmp.persist(&dest).map_err(|e| ImageError::Io {
            context: format!("moving blob into {}", dest.display()),
            source: e.error,
        })?;
        sync_dir(&blobs_dir(&store_dir))?;
        Ok(AddedBlob { sha256, size, path: relative, existed })
    }
}

/// Removes the temp files that blob writers killed mid-write (a snapshot or pack cut off by SIGKILL or a
/// crash) left in `store_dir`'s blob directory, and returns their paths. A temp file a live writer still
/// holds is left alone. A store that does not exist yet has none.
pub fn remove_temp_blobs(store_dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let blobs = blobs_dir(store_dir);
    let entries = match fs::read_dir(&blobs) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::Io { context: format!("listing {}", blobs.display()), source: e }),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(ImageError::io(format!("listing {}", blobs.display())))?;
        if !entry.file_name().as_bytes().starts_with(TEMP_BLOB_PREFIX.as_bytes()) {
            continue;
        }
        let path = entry.path();
        let file = match File::open(&path) {
            Ok(file) => file,
            // Finished or dropped by its writer meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(ImageError::Io { context: format!("opening {}", path.display()), source: e });
            }
        };
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(_lock) => match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ImageError::Io {
                        context: format!("removing {}", path.display()),
                        source: e,
                    });
                }
            },
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, errno)) => {
                return Err(ImageError::Io {
                    context: format!("locking {}", path.display()),
                    source: io::Error::from(errno),
                });
            }
        }
    }
    if !removed.is_empty() {
        sync_dir(&blobs)?;
    }
    Ok(removed)
}

/// A blob [`BlobWriter::finish_added`] put in a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedBlob {
    pub sha256: String,
    pub size: u64,
    /// Path relative to the index.
    pub path: String,
    /// The store already held these bytes before.
    pub existed: bool,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.tmp.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.flush()
    }
}

/// Adds `entry` to the store's index (replacing the entry with the same name and version), then rewrites
/// `index.json` atomically and re-signs it with `key`. An existing index must verify with `key`'s public
/// half, so a store is never silently re-signed over content someone else published.
pub fn publish(store_dir: &Path, entry: IndexEntry, key: &SigningKey) -> Result<(), ImageError> {
    publish_entry(store_dir, entry, key, true)
}

/// [`publish`], refusing (with [`ImageError::Exists`]) an entry whose name and version the index already
/// holds.
pub fn publish_new(store_dir: &Path, entry: IndexEntry, key: &SigningKey) -> Result<(), ImageError> {
    publish_entry(store_dir, entry, key, false)
}

fn publish_entry(
    store_dir: &Path,
    entry: IndexEntry,
    key: &SigningKey,
    replace: bool,
) -> Result<(), ImageError> {
    init_store(store_dir)?;
    let store = store_dir.display().to_string();
    check_relative_path(&entry.path, &store)?;
    if !is_sha256_hex(&entry.sha256) {
        return Err(ImageError::BadIndex {
            store,
            reason: format!(
                "{} {} has sha256 {:?}, not 64 lowercase hex digits",
                entry.name, entry.version, entry.sha256
            ),
        });
    }
    let blob = store_dir.join(&entry.path);
    let blob_size =
        fs::metadata(&blob).map_err(ImageError::io(format!("checking blob {}", blob.display())))?.len();
    if blob_size != entry.compressed_size {
        return Err(ImageError::SizeMismatch {
            what: format!("blob {}", blob.display()),
            expected: entry.compressed_size,
            actual: blob_size,
        });
    }

    // Serializes publishers on this store so one does not drop another's entry.
    let lock_path = store_dir.join(".publish.lock");
    let lock_file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(ImageError::io(format!("opening {}", lock_path.display())))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
        context: format!("locking {}", lock_path.display()),
        source: io::Error::from(errno),
    })?;

    let mut index = read_index(store_dir, key)?;
    if !replace && index.find(&entry.name, &entry.version).is_ok() {
        return Err(ImageError::Exists { store, name: entry.name, version: entry.version });
    }
    index.upsert(entry);
    index.validate(&store)?;

    let bytes = index.to_bytes();
    let signature = format!("{}\n", sign::sign(key, &bytes));
    // Index first, then signature: a reader in between sees a bad signature and is refused, never an
    // unverified index accepted.
    write_atomic(store_dir, &store_dir.join("index.json"), &bytes)?;
    write_atomic(store_dir, &store_dir.join("index.json.sig"), signature.as_bytes())?;
    Ok(())
}

/// The store's index, which must verify with `key`'s public half; an empty one when the store has none yet.
pub(crate) fn read_index(store_dir: &Path, key: &SigningKey) -> Result<Index, ImageError> {
    let store = store_dir.display().to_string();
    let index_path = store_dir.join("index.json");
    let sig_path = store_dir.join("index.json.sig");
    let index = match fs::read(&index_path) {
        Ok(bytes) => {
            let sig = match fs::read_to_string(&sig_path) {
                Ok(sig) => sig,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ImageError::Unsigned { store }),
                Err(source) => {
                    return Err(ImageError::Io {
                        context: format!("reading {}", sig_path.display()),
                        source,
                    });
                }
            };
            sign::verify_named(&key.verifying_key(), &bytes, &sig, &format!("index of store {store}"))?;
            Index::parse(&bytes, &store)?
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Index::new(),
        Err(source) => {
            return Err(ImageError::Io { context: format!("reading {}", index_path.display()), source });
        }
    };
    Ok(index)
}

fn write_atomic(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let context = || format!("writing {}", dest.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".publish-")
        .tempfile_in(dir)
        .map_err(|source| ImageError::Io { context: context(), source })?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|source| ImageError::Io { context: context(), source })?;
    // Stores are served to readers other than root: index and signature are world-readable.
    fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|source| ImageError::Io { context: context(), source })?;
    tmp.persist(dest).map_err(|e| ImageError::Io { context: context(), source: e.error })?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ImageError::io(format!("syncing directory {}", dir.display())))
}

/// Packs a root filesystem (a directory, or an uncompressed `.tar` file) as a zstd-compressed tar blob in
/// `store_dir`, publishes it as `name` `version` signed with `key`, and returns the published entry.
///
/// From a directory, entries are written in sorted order with paths relative to it, keeping numeric
/// owners, modes, mtimes, symlinks and hardlinks; a tar file is copied member by member as it is. Device
/// nodes, fifos and sockets are left out of both (the guest's devtmpfs and systemd make them at boot, and an
/// untrusted image may not carry them); the result says how many.
pub fn pack_rootfs(
    source: &Path,
    store_dir: &Path,
    name: &str,
    version: &str,
    kind: Kind,
    key: &SigningKey,
    level: i32,
) -> Result<PackedRootfs, ImageError> {
    let meta = fs::metadata(source)
        .map_err(ImageError::io(format!("reading rootfs source {}", source.display())))?;
    let blob = BlobWriter::new(store_dir)?;
    let zstd_context = || format!("setting up zstd compression for {}", source.display());
    let mut encoder = zstd::Encoder::new(blob, level).map_err(ImageError::io(zstd_context()))?;
    encoder.multithread(ZSTD_WORKERS).map_err(ImageError::io(zstd_context()))?;
    encoder.include_checksum(true).map_err(ImageError::io(zstd_context()))?;
    let mut counter = CountingWriter { inner: encoder, count: 0 };

    let left_out = if meta.is_dir() {
        write_tree_tar(source, &mut counter)?
    } else {
        check_tar_file(source)?;
        let file = File::open(source).map_err(ImageError::io(format!("opening {}", source.display())))?;
        copy_tar_without_special_files(io::BufReader::with_capacity(1 << 20, file), &mut counter)
            .map_err(ImageError::io(format!("compressing {}", source.display())))?
    };

    let CountingWriter { inner: encoder, count: uncompressed_size } = counter;
    let blob =
        encoder.finish().map_err(ImageError::io(format!("finishing zstd stream of {}", source.display())))?;
    let (sha256, compressed_size, path) = blob.finish()?;
    let entry = IndexEntry {
        name: name.to_string(),
        version: version.to_string(),
        kind,
        format: Format::RootfsTar,
        compression: Compression::Zstd,
        compressed_size,
        uncompressed_size,
        sha256,
        path,
        arch: std::env::consts::ARCH.to_string(),
        // Tree size plus a quarter for filesystem metadata and first-boot growth.
        min_disk_mib: (uncompressed_size + uncompressed_size / 4).div_ceil(1 << 20).max(1),
        notes: String::new(),
    };
    publish(store_dir, entry.clone(), key)?;
    Ok(PackedRootfs { entry, left_out })
}

/// A packed root file system: its published entry, and the special files left out of it.
#[derive(Clone, Debug)]
pub struct PackedRootfs {
    pub entry: IndexEntry,
    pub left_out: LeftOut,
}

/// Packs a raw disk image as independent zstd frames with a chunk manifest (see `pipeline::rawdisk`),
/// publishes it as `name` `version` (kind os) signed with `key`, and returns the published entry.
pub fn pack_raw_disk_image(
    source: &Path,
    store_dir: &Path,
    name: &str,
    version: &str,
    key: &SigningKey,
    level: i32,
) -> Result<IndexEntry, ImageError> {
    let mut blob = BlobWriter::new(store_dir)?;
    let info = crate::pipeline::rawdisk::pack_raw_disk(source, &mut blob, level)
        .map_err(|e| ImageError::RawDisk { what: source.display().to_string(), source: Box::new(e) })?;
    let (sha256, compressed_size, path) = blob.finish()?;
    let entry = raw_disk_entry(name, version, &info, sha256, compressed_size, path);
    publish(store_dir, entry.clone(), key)?;
    Ok(entry)
}

/// The index entry of a packed raw disk (kind os; its minimum disk size is the disk's size).
pub(crate) fn raw_disk_entry(
    name: &str,
    version: &str,
    info: &crate::pipeline::RawDiskInfo,
    sha256: String,
    compressed_size: u64,
    path: String,
) -> IndexEntry {
    IndexEntry {
        name: name.to_string(),
        version: version.to_string(),
        kind: Kind::Os,
        format: Format::RawDisk,
        compression: Compression::Zstd,
        compressed_size,
        uncompressed_size: info.disk_size,
        sha256,
        path,
        arch: std::env::consts::ARCH.to_string(),
        min_disk_mib: info.disk_size.div_ceil(1 << 20),
        notes: String::new(),
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads every header of `path` so that a file that is not a plain tar archive is refused up front.
fn check_tar_file(path: &Path) -> Result<(), ImageError> {
    let bad = |reason: String| ImageError::BadSource { what: path.display().to_string(), reason };
    let file = File::open(path).map_err(ImageError::io(format!("opening {}", path.display())))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut entries = 0usize;
    let iter = archive.entries().map_err(|e| bad(format!("not a tar archive ({e})")))?;
    for entry in iter {
        entry.map_err(|e| bad(format!("not a valid uncompressed tar archive ({e})")))?;
        entries += 1;
    }
    if entries == 0 {
        return Err(bad("the tar archive is empty".to_string()));
    }
    Ok(())
}

/// Copies the tar archive `src` to `out` member by member, byte for byte, except device nodes and fifos,
/// which are left out with the extension members (long names, PAX records) that describe them.
fn copy_tar_without_special_files(mut src: impl Read, mut out: impl Write) -> io::Result<LeftOut> {
    const BLOCK: usize = 512;
    let mut left_out = LeftOut::default();
    // Extension members (GNU long name or link, PAX local records) waiting for the member they describe.
    let mut pending = Vec::new();
    let (mut long_name, mut pax_path, mut pax_size) = (None::<Vec<u8>>, None::<Vec<u8>>, None::<u64>);
    let mut block = [0u8; BLOCK];
    loop {
        if !read_block(&mut src, &mut block)? {
            break;
        }
        if block.iter().all(|&b| b == 0) {
            // The end-of-archive blocks, and whatever padding follows them, as they are.
            out.write_all(&pending)?;
            out.write_all(&block)?;
            io::copy(&mut src, &mut out)?;
            return Ok(left_out);
        }
        let header = tar::Header::from_byte_slice(&block);
        let kind = header.entry_type();
        let extension = kind.is_gnu_longname() || kind.is_gnu_longlink() || kind.is_pax_local_extensions();
        let size = match pax_size {
            Some(size) if !extension => size,
            _ => header.entry_size()?,
        };
        let padded = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        if extension {
            let mut data = Vec::new();
            (&mut src).take(padded).read_to_end(&mut data)?;
            if data.len() as u64 != padded {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar archive ends inside a member"));
            }
            let value = &data[..size as usize];
            if kind.is_gnu_longname() {
                long_name = Some(value.split(|&b| b == 0).next().unwrap_or_default().to_vec());
            } else if kind.is_pax_local_extensions() {
                for (key, value) in pax_records(value) {
                    match key {
                        b"path" => pax_path = Some(value.to_vec()),
                        b"size" => pax_size = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()),
                        _ => {}
                    }
                }
            }
            pending.extend_from_slice(&block);
            pending.extend_from_slice(&data);
            continue;
        }
        if matches!(kind, tar::EntryType::Block | tar::EntryType::Char | tar::EntryType::Fifo) {
            let path =
                pax_path.take().or(long_name.take()).unwrap_or_else(|| header.path_bytes().into_owned());
            left_out.add(Path::new(std::ffi::OsStr::from_bytes(&path)));
            io::copy(&mut (&mut src).take(padded), &mut io::sink())?;
        } else {
            out.write_all(&pending)?;
            out.write_all(&block)?;
            // A GNU sparse member's map may go on in extension blocks after its header.
            let mut extended = kind.is_gnu_sparse() && block[482] != 0;
            while extended {
                if !read_block(&mut src, &mut block)? {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "tar archive ends in a sparse map",
                    ));
                }
                out.write_all(&block)?;
                extended = block[504] != 0;
            }
            let copied = io::copy(&mut (&mut src).take(padded), &mut out)?;
            if copied != padded {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar archive ends inside a member"));
            }
        }
        pending.clear();
        (long_name, pax_path, pax_size) = (None, None, None);
    }
    // An archive without end-of-archive blocks: ended as it was.
    out.write_all(&pending)?;
    Ok(left_out)
}

/// Reads one 512-byte tar block; false at the end of the input, an error inside a block.
fn read_block(src: &mut impl Read, block: &mut [u8; 512]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < block.len() {
        match src.read(&mut block[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar archive ends inside a block"));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The `key=value` records of a PAX extended header (`<length> <key>=<value>\n` each).
fn pax_records(mut data: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    std::iter::from_fn(move || {
        let space = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..space]).ok()?.parse().ok()?;
        if len <= space || len > data.len() {
            return None;
        }
        let record = &data[space + 1..len];
        data = &data[len..];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        let eq = record.iter().position(|&b| b == b'=')?;
        Some((&record[..eq], &record[eq + 1..]))
    })
}

/// Writes the tree under `root` as a tar stream (sorted, relative paths, numeric owners), leaving out
/// device nodes, fifos and sockets.
fn write_tree_tar<W: Write>(root: &Path, out: W) -> Result<LeftOut, ImageError> {
    let mut paths = Vec::new();
    collect_sorted(root, Path::new(""), &mut paths)?;

    let mut builder = tar::Builder::new(out);
    // (device, inode) of multiply-linked files already archived, and the archive path they went in as.
    let mut first_links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut left_out = LeftOut::default();
    for rel in &paths {
        let full = root.join(rel);
        let context = || format!("archiving {}", full.display());
        let meta = fs::symlink_metadata(&full).map_err(ImageError::io(context()))?;
        let file_type = meta.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        header.set_mode(meta.mode() & 0o7777);

        if file_type.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, rel, io::empty()).map_err(ImageError::io(context()))?;
        } else if file_type.is_symlink() {
            let target = fs::read_link(&full).map_err(ImageError::io(context()))?;
            header.set_size(0);
            builder.append_link(&mut header, rel, &target).map_err(ImageError::io(context()))?;
        } else if file_type.is_file() {
            if meta.nlink() > 1 {
                if let Some(first) = first_links.get(&(meta.dev(), meta.ino())) {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder.append_link(&mut header, rel, first).map_err(ImageError::io(context()))?;
                    continue;
                }
                first_links.insert((meta.dev(), meta.ino()), rel.clone());
            }
            let file = File::open(&full).map_err(ImageError::io(context()))?;
            builder.append_data(&mut header, rel, file).map_err(ImageError::io(context()))?;
        } else {
            left_out.sockets |= file_type.is_socket();
            left_out.add(rel);
        }
    }
    builder.into_inner().map_err(ImageError::io(format!("finishing tar archive of {}", root.display())))?;
    Ok(left_out)
}

/// Depth-first list of every path under `dir` (relative to the walk root), parents before children,
/// siblings in byte order of their names. Symlinks are listed, never followed.
fn collect_sorted(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut names = fs::read_dir(&dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<_>>>())
        .map_err(ImageError::io(format!("listing {}", dir.display())))?;
    names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
    for name in names {
        let child = rel.join(&name);
        let is_dir = fs::symlink_metadata(root.join(&child))
            .map_err(ImageError::io(format!("reading {}", root.join(&child).display())))?
            .is_dir();
        out.push(child.clone());
        if is_dir {
            collect_sorted(root, &child, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_blobs_of_live_writers_are_kept_and_abandoned_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        assert_eq!(remove_temp_blobs(&store).unwrap(), Vec::<PathBuf>::new(), "no store yet, nothing to do");
        let mut live = BlobWriter::new(&store).unwrap();
        live.write_all(b"still being written").unwrap();
        let abandoned = blobs_dir(&store).join(format!("{TEMP_BLOB_PREFIX}killed"));
        fs::write(&abandoned, b"half a blob").unwrap();
        let finished = add_blob(&store, &b"done"[..]).unwrap();

        assert_eq!(remove_temp_blobs(&store).unwrap(), vec![abandoned.clone()]);
        assert!(!abandoned.exists());
        assert!(store.join(&finished.2).exists(), "finished blobs are not touched");
        let (_, size, path) = live.finish().unwrap();
        assert_eq!((size, fs::read(store.join(path)).unwrap()), (19, b"still being written".to_vec()));
        assert_eq!(remove_temp_blobs(&store).unwrap(), Vec::<PathBuf>::new());
    }
}
