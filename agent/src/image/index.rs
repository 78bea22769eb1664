//! The store index (`index.json`): which images a store holds and the digest, sizes and path of each blob.

use serde::{Deserialize, Serialize};

use super::{ImageError, is_sha256_hex};

/// The only index format this agent reads and writes.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub format_version: u32,
    pub images: Vec<IndexEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    pub format: Format,
    pub compression: Compression,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Lowercase hex sha256 of the blob as stored (compressed).
    pub sha256: String,
    /// Blob path relative to the index, e.g. `blobs/sha256/<hex>`.
    pub path: String,
    pub arch: String,
    pub min_disk_mib: u64,
    #[serde(default)]
    pub notes: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Os,
    Layer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    RootfsTar,
    RawDisk,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Self {
        Self { format_version: FORMAT_VERSION, images: Vec::new() }
    }

    /// Parses and validates index bytes; `store` names the store in errors. Every entry must have a
    /// well-formed digest and a safe relative path, so an `Index` in hand never points outside its store.
    pub fn parse(bytes: &[u8], store: &str) -> Result<Index, ImageError> {
        let index: Index = serde_json::from_slice(bytes)
            .map_err(|source| ImageError::BadIndexJson { store: store.to_string(), source })?;
        index.validate(store)?;
        Ok(index)
    }

    pub fn validate(&self, store: &str) -> Result<(), ImageError> {
        let bad = |reason: String| ImageError::BadIndex { store: store.to_string(), reason };
        if self.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                self.format_version
            )));
        }
        for (i, entry) in self.images.iter().enumerate() {
            if entry.name.is_empty() || entry.version.is_empty() {
                return Err(bad(format!("entry {i} has an empty name or version")));
            }
            if !is_sha256_hex(&entry.sha256) {
                return Err(bad(format!(
                    "{} {} has sha256 {:?}, not 64 lowercase hex digits",
                    entry.name, entry.version, entry.sha256
                )));
            }
            check_relative_path(&entry.path, store)?;
            if self.images[..i].iter().any(|e| e.name == entry.name && e.version == entry.version) {
                return Err(bad(format!("{} {} is listed twice", entry.name, entry.version)));
            }
        }
        Ok(())
    }

    /// The entry for `name` `version`; the error lists every `name version` the index holds.
    pub fn find(&self, name: &str, version: &str) -> Result<&IndexEntry, ImageError> {
        self.images.iter().find(|e| e.name == name && e.version == version).ok_or_else(|| {
            ImageError::NotFound {
                store: "the index".to_string(),
                name: name.to_string(),
                version: version.to_string(),
                available: self.images.iter().map(|e| format!("{} {}", e.name, e.version)).collect(),
            }
        })
    }

    /// Adds `entry`, replacing any entry with the same name and version; returns the replaced entry.
    pub fn upsert(&mut self, entry: IndexEntry) -> Option<IndexEntry> {
        match self.images.iter_mut().find(|e| e.name == entry.name && e.version == entry.version) {
            Some(slot) => Some(std::mem::replace(slot, entry)),
            None => {
                self.images.push(entry);
                None
            }
        }
    }

    /// Pretty JSON with a trailing newline: the exact bytes that get signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("an index always serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// Blob paths are plain relative paths of simple segments (`[A-Za-z0-9._+-]`, never `.` or `..`), which
/// rules out absolute paths, URLs with a scheme or host, query strings, percent-escapes and backslashes: a
/// path can only name something under the index's own directory or URL.
pub(crate) fn check_relative_path(path: &str, store: &str) -> Result<(), ImageError> {
    let unsafe_path =
        |reason| ImageError::UnsafePath { store: store.to_string(), path: path.to_string(), reason };
    if path.is_empty() {
        return Err(unsafe_path("empty path"));
    }
    if path.starts_with('/') {
        return Err(unsafe_path("absolute path"));
    }
    if path.contains("://") || path.contains(':') {
        return Err(unsafe_path("absolute URL or scheme"));
    }
    for segment in path.split('/') {
        match segment {
            "" => return Err(unsafe_path("empty path segment")),
            "." | ".." => return Err(unsafe_path("dot segment")),
            _ => {}
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b)) {
            return Err(unsafe_path("characters outside [A-Za-z0-9._+-]"));
        }
    }
    Ok(())
}
