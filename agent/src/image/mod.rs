//! Signed image stores: the index and its ed25519 signature, the store client (directory or HTTP(S)), the
//! content-addressed local cache, and the tools that make a store.

pub mod cache;
pub mod index;
pub mod pack;
pub mod sign;
pub mod snapshot;
pub mod store;

use std::io;
use std::path::PathBuf;

pub use cache::Cache;
pub use index::{Compression, Format, Index, IndexEntry, Kind};
pub use store::{Store, Trust};

/// Every failure of the image submodules. Messages name the store, file or blob concerned.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot pack raw disk {what}")]
    RawDisk {
        what: String,
        #[source]
        source: Box<crate::pipeline::PipelineError>,
    },
    #[error("image {name} {version} not found in {store}; available: {}", list_or_none(available))]
    NotFound { store: String, name: String, version: String, available: Vec<String> },

    #[error("image {name} {version} already exists in {store}")]
    Exists { store: String, name: String, version: String },

    #[error("cannot read disk")]
    Disk(#[source] crate::block::BlockError),

    #[error("cancelled")]
    Cancelled,

    #[error("index of store {store} is not signed (no index.json.sig)")]
    Unsigned { store: String },

    #[error("signature of {what} does not verify with the trusted key")]
    BadSignature { what: String },

    #[error("sha256 of {what} is {actual}, expected {expected}")]
    DigestMismatch { what: String, expected: String, actual: String },

    #[error("size of {what} is wrong: read {actual} bytes, expected {expected}")]
    SizeMismatch { what: String, expected: u64, actual: u64 },

    #[error("cannot reach {url}")]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },

    #[error("{url} answered HTTP status {status}")]
    HttpStatus { url: String, status: u16 },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("parsing the index of {store}")]
    BadIndexJson {
        store: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("index of {store} is invalid: {reason}")]
    BadIndex { store: String, reason: String },

    #[error("index of {store} names an unsafe blob path {path:?}: {reason}")]
    UnsafePath { store: String, path: String, reason: &'static str },

    #[error("unsupported store location {location:?} (expected a path, dir://, http:// or https://)")]
    UnsupportedLocation { location: String },

    #[error("{what}: {reason}")]
    BadKey { what: String, reason: &'static str },

    #[error("key file {} already exists; refusing to overwrite it", path.display())]
    KeyExists { path: PathBuf },

    #[error("packing {what}: {reason}")]
    BadSource { what: String, reason: String },
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() { "none".to_string() } else { items.join(", ") }
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}

/// True for a lowercase 64-digit hex string: the only form a sha256 takes in an index, a store or the cache,
/// and so safe to use as a file name.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
