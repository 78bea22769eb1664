//! Safe rootfs extraction: a (compressed) tarball unpacked into a staging directory, entry by entry, without
//! ever writing outside it.
//!
//! Entry paths must be relative and free of `..`; parent directories are resolved with `lstat` and a symlink
//! among them is refused, so an archive cannot plant `link -> /etc` and then write `link/passwd`. Symlink
//! entries themselves may point anywhere (they are created, never followed). Hard links must name an entry
//! inside the root reached without symlinks. Device nodes and fifos are created only when allowed. Later
//! entries replace earlier ones, so layers can be overlaid into one staging directory.

use std::ffi::CString;
use std::fs::{self, DirBuilder, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use gridforge_common::progress::Progress;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use super::stream;
use super::{LeftOut, PipelineError};

const STEP: &str = "build";
const PROGRESS_EVERY: u64 = 64 << 20;
const XATTR_PREFIX: &str = "SCHILY.xattr.";

#[derive(Clone, Debug, Default)]
pub struct UnpackOptions {
    /// Create device nodes and fifos (trusted images only); otherwise they are left out, with one warning
    /// for the image.
    pub allow_devices: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    /// Archive entries processed (skipped ones included).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Device nodes and fifos left out (an untrusted image).
    pub left_out: LeftOut,
    /// Bytes of the blob (as stored, compressed).
    pub compressed_bytes: u64,
}

/// Unpack the rootfs tarball read from `blob` (zstd, gzip or plain tar, sniffed) into `staging`, verifying
/// the blob's sha256 against `expected_sha256` after the archive ends. On error the caller discards
/// `staging`.
pub fn unpack_rootfs(
    blob: impl Read + Send,
    expected_sha256: &str,
    staging: &Path,
    opts: &UnpackOptions,
    progress: &Progress,
) -> Result<UnpackStats, PipelineError> {
    let (feeder, reader) = stream::channel_reader();
    let (result, actual, compressed_bytes) = std::thread::scope(|s| {
        let feed = s.spawn(move || feeder.feed(blob));
        let result = (|| {
            let decoded = stream::decoder(reader)?;
            let mut archive = tar::Archive::new(decoded);
            let mut stats = UnpackStats::default();
            Extractor { root: staging, opts, progress, dirs: Vec::new() }.run(&mut archive, &mut stats)?;
            // Read what follows the end-of-archive blocks, so the hash covers the whole blob and the
            // decoder checks for trailing data.
            io::copy(&mut archive.into_inner(), &mut io::sink())
                .map_err(|e| PipelineError::from_io("reading the end of the rootfs archive", e))?;
            Ok(stats)
        })();
        let (digest, bytes) = feed.join().expect("feeder thread panicked");
        (result, digest, bytes)
    });
    let mut stats = result?;
    let expected = expected_sha256.to_ascii_lowercase();
    if actual != expected {
        return Err(PipelineError::DigestMismatch { expected, actual });
    }
    if !stats.left_out.is_empty() {
        // One line for the image, however many it carries.
        tracing::warn!(image = %expected, "left out {} of an untrusted image", stats.left_out.describe());
    }
    stats.compressed_bytes = compressed_bytes;
    progress.report(STEP, stats.bytes, stats.bytes, "rootfs unpacked");
    Ok(stats)
}

/// The entry path as plain relative components, or why it is unsafe.
fn safe_relative(path: &Path) -> Result<PathBuf, PipelineError> {
    let unsafe_path =
        |reason: &str| PipelineError::UnsafePath { path: path.to_path_buf(), reason: reason.into() };
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(c) => rel.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_path("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_path("is absolute")),
        }
    }
    Ok(rel)
}

fn extract_err(context: &str, path: &Path) -> impl FnOnce(io::Error) -> PipelineError {
    let context = context.to_string();
    let path = path.to_path_buf();
    move |source| PipelineError::Extract { context, path, source }
}

/// Owner, mode and time of an entry.
#[derive(Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

struct Extractor<'a> {
    root: &'a Path,
    opts: &'a UnpackOptions,
    progress: &'a Progress,
    /// Directories whose mtime is set last (creating entries inside them changes it).
    dirs: Vec<(PathBuf, u64)>,
}

impl Extractor<'_> {
    fn run<R: Read>(
        mut self,
        archive: &mut tar::Archive<R>,
        stats: &mut UnpackStats,
    ) -> Result<(), PipelineError> {
        let read_err = |e| PipelineError::from_io("reading the rootfs archive", e);
        let mut last_report = 0;
        for entry in archive.entries().map_err(read_err)? {
            let mut entry = entry.map_err(read_err)?;
            stats.entries += 1;
            self.entry(&mut entry, stats)?;
            if stats.bytes - last_report >= PROGRESS_EVERY {
                last_report = stats.bytes;
                self.progress.report(STEP, stats.bytes, 0, "");
            }
        }
        for (dir, mtime) in self.dirs.iter().rev() {
            set_mtime_nofollow(dir, *mtime)?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        stats: &mut UnpackStats,
    ) -> Result<(), PipelineError> {
        let read_err = |e| PipelineError::from_io("reading a rootfs archive entry header", e);
        let raw_path = entry.path().map_err(read_err)?.into_owned();
        let rel = safe_relative(&raw_path)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let meta = Meta {
            mode: header.mode().map_err(read_err)? & 0o7777,
            uid: header.uid().map_err(read_err)? as u32,
            gid: header.gid().map_err(read_err)? as u32,
            mtime: header.mtime().map_err(read_err)?,
        };
        if matches!(
            kind,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        if rel.as_os_str().is_empty() {
            // "./": the root itself.
            if kind == EntryType::Directory {
                self.set_owner_mode(self.root, meta)?;
                self.dirs.push((self.root.to_path_buf(), meta.mtime));
            }
            return Ok(());
        }
        self.ensure_parents(&rel, &raw_path)?;
        let dest = self.root.join(&rel);
        let xattrs = pax_xattrs(entry).map_err(read_err)?;
        match kind {
            EntryType::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove_existing(&dest)?;
                        make_dir(&dest)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => make_dir(&dest)?,
                    Err(e) => return Err(extract_err("inspecting", &dest)(e)),
                }
                self.set_owner_mode(&dest, meta)?;
                self.dirs.push((dest.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_existing(&dest)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(extract_err("creating file", &dest))?;
                stats.bytes += io::copy(entry, &mut file).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => {
                        PipelineError::Truncated { what: "rootfs archive".into() }
                    }
                    _ => PipelineError::from_io(format!("extracting {}", raw_path.display()), e),
                })?;
                std::os::unix::fs::fchown(&file, Some(meta.uid), Some(meta.gid))
                    .map_err(extract_err("setting owner of", &dest))?;
                // After chown, which clears set-id bits.
                file.set_permissions(Permissions::from_mode(meta.mode))
                    .map_err(extract_err("setting mode of", &dest))?;
                file.set_times(FileTimes::new().set_modified(UNIX_EPOCH + Duration::from_secs(meta.mtime)))
                    .map_err(extract_err("setting mtime of", &dest))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(read_err)?
                    .ok_or_else(|| PipelineError::UnsafePath {
                        path: raw_path.clone(),
                        reason: "symlink entry without a target".into(),
                    })?
                    .into_owned();
                remove_existing(&dest)?;
                std::os::unix::fs::symlink(&target, &dest).map_err(extract_err("creating symlink", &dest))?;
                std::os::unix::fs::lchown(&dest, Some(meta.uid), Some(meta.gid))
                    .map_err(extract_err("setting owner of", &dest))?;
                set_mtime_nofollow(&dest, meta.mtime)?;
            }
            EntryType::Link => {
                let link = entry.link_name().map_err(read_err)?.map(|l| l.into_owned()).unwrap_or_default();
                let link_rel = safe_relative(&link)?;
                if link_rel.as_os_str().is_empty() {
                    return Err(PipelineError::UnsafePath {
                        path: link,
                        reason: "hard link to the root".into(),
                    });
                }
                self.check_parents(&link_rel, &link)?;
                let source = self.root.join(&link_rel);
                let source_meta = fs::symlink_metadata(&source)
                    .map_err(extract_err("finding hard link target", &source))?;
                if source_meta.is_dir() {
                    return Err(PipelineError::UnsafePath {
                        path: link,
                        reason: "hard link to a directory".into(),
                    });
                }
                if source == dest {
                    return Ok(());
                }
                remove_existing(&dest)?;
                fs::hard_link(&source, &dest).map_err(extract_err("creating hard link", &dest))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if !self.opts.allow_devices {
                    stats.left_out.add(&raw_path);
                    return Ok(());
                }
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let major = header.device_major().map_err(read_err)?.unwrap_or(0);
                        let minor = header.device_minor().map_err(read_err)?.unwrap_or(0);
                        let sflag = if kind == EntryType::Char { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                        (sflag, nix::sys::stat::makedev(major.into(), minor.into()))
                    }
                };
                remove_existing(&dest)?;
                nix::sys::stat::mknod(&dest, sflag, Mode::from_bits_truncate(meta.mode), dev)
                    .map_err(|e| extract_err("creating device node", &dest)(e.into()))?;
                std::os::unix::fs::lchown(&dest, Some(meta.uid), Some(meta.gid))
                    .map_err(extract_err("setting owner of", &dest))?;
                fs::set_permissions(&dest, Permissions::from_mode(meta.mode))
                    .map_err(extract_err("setting mode of", &dest))?;
                set_mtime_nofollow(&dest, meta.mtime)?;
            }
            other => {
                tracing::warn!(path = %raw_path.display(), kind = ?other, "skipping unsupported archive entry");
                return Ok(());
            }
        }
        for (name, value) in xattrs {
            set_xattr(&dest, &name, &value);
        }
        Ok(())
    }

    /// Create missing parent directories of `rel`; refuse a symlink or non-directory among the existing ones.
    fn ensure_parents(&self, rel: &Path, raw: &Path) -> Result<(), PipelineError> {
        self.walk_parents(rel, raw, true)
    }

    /// Like `ensure_parents`, but everything must exist already (hard link targets).
    fn check_parents(&self, rel: &Path, raw: &Path) -> Result<(), PipelineError> {
        self.walk_parents(rel, raw, false)
    }

    fn walk_parents(&self, rel: &Path, raw: &Path, create: bool) -> Result<(), PipelineError> {
        let unsafe_path =
            |reason: &str| PipelineError::UnsafePath { path: raw.to_path_buf(), reason: reason.into() };
        let mut dir = self.root.to_path_buf();
        let Some(parent) = rel.parent() else { return Ok(()) };
        for component in parent.components() {
            dir.push(component);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => return Err(unsafe_path("leads through a symlink")),
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(unsafe_path("a parent is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => make_dir(&dir)?,
                Err(e) => return Err(extract_err("inspecting", &dir)(e)),
            }
        }
        Ok(())
    }

    fn set_owner_mode(&self, dir: &Path, meta: Meta) -> Result<(), PipelineError> {
        std::os::unix::fs::lchown(dir, Some(meta.uid), Some(meta.gid))
            .map_err(extract_err("setting owner of", dir))?;
        fs::set_permissions(dir, Permissions::from_mode(meta.mode))
            .map_err(extract_err("setting mode of", dir))
    }
}

fn make_dir(path: &Path) -> Result<(), PipelineError> {
    DirBuilder::new().mode(0o755).create(path).map_err(extract_err("creating directory", path))
}

/// Remove whatever `path` names (file, symlink, node or whole directory), never following a symlink.
fn remove_existing(path: &Path) -> Result<(), PipelineError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(extract_err("replacing directory", path)),
        Ok(_) => fs::remove_file(path).map_err(extract_err("replacing", path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(extract_err("inspecting", path)(e)),
    }
}

fn set_mtime_nofollow(path: &Path, mtime: u64) -> Result<(), PipelineError> {
    let mtime = TimeSpec::new(mtime as libc::time_t, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| extract_err("setting mtime of", path)(e.into()))
}

/// Extended attributes carried as PAX `SCHILY.xattr.*` records.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for ext in extensions {
            let ext = ext?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix(XATTR_PREFIX)
            {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

/// Best effort: a file system without support for an attribute's namespace is not a reason to fail a build.
fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let (Ok(c_path), Ok(c_name)) = (CString::new(path.as_os_str().as_bytes()), CString::new(name)) else {
        return;
    };
    // SAFETY: both strings are NUL-terminated and live across the call; value points at value.len() bytes.
    let rc =
        unsafe { libc::lsetxattr(c_path.as_ptr(), c_name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        tracing::warn!(path = %path.display(), xattr = name, %error, "could not set extended attribute");
    }
}
