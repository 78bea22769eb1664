//! Capturing a disk as a new image: the whole disk packed as a raw-disk image (independent zstd frames per
//! chunk, see `pipeline::rawdisk`) into a directory store, added to its index, and the index re-signed.
//! Provisioning from that image writes the disk back byte for byte (and grows it onto a larger target).
//!
//! A failed or cancelled capture leaves the store exactly as it was: the blob is written to a temp file and
//! renamed into place only once complete, the index is written last, and a blob this capture added is
//! removed again when publishing it fails.

use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use gridforge_common::progress::Progress;
use gridforge_proto::v1::SnapshotResult;

use super::ImageError;
use super::pack::{self, BlobWriter};

use crate::block::{BlockTarget, TargetOptions};
use crate::pipeline::{self, PipelineError};
use crate::wipe::CancelToken;

/// zstd level of captures: fast, and close to the best ratio on disk images.
pub const DEFAULT_LEVEL: i32 = 3;
/// Longest image name or version.
const LABEL_MAX: usize = 128;
const PUBLISH_STEP: &str = "publish";

/// One capture, fully described.
#[derive(Clone, Debug)]
pub struct SnapshotRequest {
    /// The disk to capture: a regular file or a block device. Nothing may write to it meanwhile.
    pub disk: PathBuf,
    /// The directory store to publish into (created if missing).
    pub store_dir: PathBuf,
    pub name: String,
    pub version: String,
    pub notes: String,
    /// Signs the store's index; an existing index must already verify with its public half.
    pub signing_key: SigningKey,
    /// zstd level.
    pub level: i32,
    /// Checked between chunks while reading and before publishing.
    pub cancel: Option<CancelToken>,
}

/// Why `text` cannot be an image name or version (1-128 of `A-Z a-z 0-9 . _ + -`, starting with a letter or
/// digit), or None when it can. The same rule keeps both usable in file names and on command lines.
pub fn label_problem(text: &str) -> Option<String> {
    if text.is_empty() {
        return Some("required".into());
    }
    if text.len() > LABEL_MAX {
        return Some(format!("{} characters, at most {LABEL_MAX}", text.len()));
    }
    if !text.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !text.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return Some(format!(
            "{text:?} must start with a letter or digit and hold only letters, digits and . _ + -"
        ));
    }
    None
}

/// Capture `req.disk` as image `req.name` `req.version` (kind os, format raw-disk, zstd) in `req.store_dir`.
/// A name and version the store already holds is refused before the disk is read, and again when publishing.
pub fn capture(req: &SnapshotRequest, progress: &Progress) -> Result<SnapshotResult, ImageError> {
    for (what, text) in [("name", &req.name), ("version", &req.version)] {
        if let Some(reason) = label_problem(text) {
            return Err(ImageError::BadSource { what: format!("snapshot {what}"), reason });
        }
    }
    let store = req.store_dir.display().to_string();
    let index = pack::read_index(&req.store_dir, &req.signing_key)?;
    if index.find(&req.name, &req.version).is_ok() {
        return Err(ImageError::Exists { store, name: req.name.clone(), version: req.version.clone() });
    }
    let cancelled = || req.cancel.as_ref().is_some_and(CancelToken::is_cancelled);

    // A shared lock: other gridforge writers are kept out while the disk is read.
    let disk = BlockTarget::open(&req.disk, &TargetOptions { read_only: true, ..Default::default() })
        .map_err(ImageError::Disk)?;
    let mut blob = BlobWriter::new(&req.store_dir)?;
    let info = pipeline::pack_raw_disk_with(&req.disk, &mut blob, req.level, progress, req.cancel.as_ref())
        .map_err(|e| match e {
        PipelineError::Cancelled => ImageError::Cancelled,
        e => ImageError::RawDisk { what: req.disk.display().to_string(), source: Box::new(e) },
    })?;
    drop(disk);
    if cancelled() {
        // Dropping the unfinished blob removes its temp file.
        return Err(ImageError::Cancelled);
    }
    progress.note(PUBLISH_STEP, format!("adding {} {} to {store}", req.name, req.version));
    let added = blob.finish_added()?;
    let mut entry = pack::raw_disk_entry(
        &req.name,
        &req.version,
        &info,
        added.sha256.clone(),
        added.size,
        added.path.clone(),
    );
    entry.notes = req.notes.clone();
    if let Err(e) = pack::publish_new(&req.store_dir, entry, &req.signing_key) {
        if !added.existed {
            let path = req.store_dir.join(&added.path);
            if let Err(r) = std::fs::remove_file(&path) {
                tracing::error!(blob = %path.display(), "cannot remove the blob of a failed snapshot: {r}");
            }
        }
        return Err(e);
    }
    progress.note(PUBLISH_STEP, format!("published {} {} (sha256 {})", req.name, req.version, added.sha256));
    Ok(SnapshotResult {
        name: req.name.clone(),
        version: req.version.clone(),
        sha256: added.sha256,
        compressed_bytes: added.size,
        size_bytes: info.disk_size,
        store,
    })
}
