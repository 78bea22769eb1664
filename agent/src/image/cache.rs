//! Content-addressed local blob cache: `<dir>/sha256/<hex>`. A blob enters the cache only after its size and
//! sha256 matched the index while it streamed in; concurrent fetches of one blob (threads or processes)
//! download it once, serialized by an flock on `<dir>/sha256/<hex>.lock`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use gridforge_common::progress::{Progress, ProgressReader};
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::index::IndexEntry;
use super::store::Store;
use super::{ImageError, is_sha256_hex};

const COPY_CHUNK: usize = 1 << 20;

/// Where the blob with this digest lives in the cache rooted at `dir` (without opening, so creating, it).
pub fn blob_path_in(dir: &Path, sha256: &str) -> PathBuf {
    dir.join("sha256").join(sha256)
}

#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    blobs: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) a cache rooted at `dir`.
    pub fn new(dir: &Path) -> Result<Cache, ImageError> {
        let blobs = dir.join("sha256");
        fs::create_dir_all(&blobs)
            .map_err(ImageError::io(format!("creating cache directory {}", blobs.display())))?;
        Ok(Cache { dir: dir.to_path_buf(), blobs })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob with this digest lives (or would live) in the cache.
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.blobs.join(sha256)
    }

    /// Returns the cached path of `entry`'s blob, downloading and verifying it first if it is not cached.
    pub fn fetch(
        &self,
        store: &Store,
        entry: &IndexEntry,
        progress: &Progress,
    ) -> Result<PathBuf, ImageError> {
        let what = store.describe_blob(entry);
        if !is_sha256_hex(&entry.sha256) {
            return Err(ImageError::BadIndex {
                store: store.location().to_string(),
                reason: format!("{} {} has a malformed sha256", entry.name, entry.version),
            });
        }
        let path = self.blob_path(&entry.sha256);
        if self.is_cached(&path, entry.compressed_size)? {
            progress.note("fetch", format!("{what}: cached"));
            return Ok(path);
        }

        let lock_path = self.blobs.join(format!("{}.lock", entry.sha256));
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(ImageError::io(format!("opening cache lock {}", lock_path.display())))?;
        // flock locks belong to the open file description, so this excludes other threads of this process
        // (each opens its own description) as well as other processes.
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| ImageError::Io {
            context: format!("locking cache lock {}", lock_path.display()),
            source: io::Error::from(errno),
        })?;

        // Whoever held the lock before us may have fetched it.
        if self.is_cached(&path, entry.compressed_size)? {
            progress.note("fetch", format!("{what}: cached"));
            return Ok(path);
        }
        match fs::remove_file(&path) {
            Ok(()) => tracing::warn!(blob = %path.display(), "removed cached blob of the wrong size"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ImageError::Io {
                    context: format!("removing bad cached blob {}", path.display()),
                    source,
                });
            }
        }

        progress.note("fetch", format!("fetching {what}"));
        self.download(store, entry, &path, &what, progress)?;
        progress.note("fetch", format!("{what}: verified"));
        Ok(path)
    }

    fn is_cached(&self, path: &Path, size: u64) -> Result<bool, ImageError> {
        match fs::metadata(path) {
            Ok(meta) => Ok(meta.is_file() && meta.len() == size),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => {
                Err(ImageError::Io { context: format!("checking cached blob {}", path.display()), source })
            }
        }
    }

    /// Streams the blob into a temp file beside `dest` while hashing and counting, and renames it into
    /// place only when size and digest match. On any error the temp file is removed.
    fn download(
        &self,
        store: &Store,
        entry: &IndexEntry,
        dest: &Path,
        what: &str,
        progress: &Progress,
    ) -> Result<(), ImageError> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempfile_in(&self.blobs)
            .map_err(ImageError::io(format!("creating temp file in {}", self.blobs.display())))?;
        let mut source =
            ProgressReader::new(store.open_blob(entry)?, progress.clone(), "fetch", entry.compressed_size);
        let expected = entry.compressed_size;
        let mut hasher = Sha256::new();
        let mut done: u64 = 0;
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(ImageError::Io { context: format!("reading {what}"), source }),
            };
            done += n as u64;
            if done > expected {
                return Err(ImageError::SizeMismatch { what: what.to_string(), expected, actual: done });
            }
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(ImageError::io(format!("writing {}", tmp.path().display())))?;
        }
        if done != expected {
            return Err(ImageError::SizeMismatch { what: what.to_string(), expected, actual: done });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != entry.sha256 {
            return Err(ImageError::DigestMismatch {
                what: what.to_string(),
                expected: entry.sha256.clone(),
                actual,
            });
        }
        tmp.as_file().sync_all().map_err(ImageError::io(format!("syncing {}", tmp.path().display())))?;
        tmp.persist(dest).map_err(|e| ImageError::Io {
            context: format!("moving fetched blob into {}", dest.display()),
            source: e.error,
        })?;
        File::open(&self.blobs)
            .and_then(|dir| dir.sync_all())
            .map_err(ImageError::io(format!("syncing cache directory {}", self.blobs.display())))?;
        Ok(())
    }
}
