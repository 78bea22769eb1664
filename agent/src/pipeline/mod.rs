//! The image write path: verified, decompressed streams onto block targets (raw-disk images) and into staging
//! directories (rootfs tarballs).
//!
//! Everything is built from small `Read` adapters in [`stream`] (hashing, format sniffing and decompression
//! with trailing-data checks, byte limits). [`rawdisk`] defines the raw-disk image format (a zstd stream of
//! independent per-chunk frames behind a manifest) and its parallel, sparse writer; [`unpack`] extracts a
//! rootfs tarball without ever leaving the staging directory.

pub mod rawdisk;
pub mod stream;
pub mod unpack;

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::block::BlockError;

pub use rawdisk::{RawDiskInfo, RawWriteStats, pack_raw_disk, pack_raw_disk_with, write_raw_disk};
pub use stream::{Compression, HashingReader, LimitedReader, decoder, sniff};
pub use unpack::{UnpackOptions, UnpackStats, unpack_rootfs};

/// Device nodes, fifos (and sockets) a root file system carried and that were left out: how many, and the
/// first few paths. The guest's devtmpfs makes its device nodes and systemd its fifos at boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftOut {
    pub count: u64,
    /// The first paths left out, as absolute guest paths (`/dev/null`).
    pub examples: Vec<String>,
    pub sockets: bool,
}

impl LeftOut {
    const EXAMPLES: usize = 3;

    /// Count `path` (an archive or tree path such as `./dev/null`) as left out.
    pub fn add(&mut self, path: &Path) {
        self.count += 1;
        if self.examples.len() < Self::EXAMPLES {
            let parts: Vec<_> = path
                .components()
                .filter_map(|c| match c {
                    Component::Normal(p) => Some(p.to_string_lossy()),
                    _ => None,
                })
                .collect();
            self.examples.push(format!("/{}", parts.join("/")));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// `8 device nodes and fifos (/dev/null, /dev/zero, /dev/full, …)`.
    pub fn describe(&self) -> String {
        let what = if self.sockets { "device nodes, fifos and sockets" } else { "device nodes and fifos" };
        let more = if self.count > self.examples.len() as u64 { ", …" } else { "" };
        format!("{} {what} ({}{more})", self.count, self.examples.join(", "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("image digest mismatch: expected sha256 {expected}, got {actual}")]
    DigestMismatch { expected: String, actual: String },
    #[error("image stream is truncated: {what} ended early")]
    Truncated { what: String },
    #[error("trailing data after the end of the {what} stream")]
    TrailingData { what: String },
    #[error("image is larger than the {limit} bytes allowed")]
    TooLarge { limit: u64 },
    #[error("corrupt raw-disk image: {reason}")]
    CorruptImage { reason: String },
    #[error("unsafe path {path} in archive: {reason}")]
    UnsafePath { path: PathBuf, reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{context}")]
    Target {
        context: String,
        #[source]
        source: BlockError,
    },
    #[error("{context} {path}")]
    Extract {
        context: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl PipelineError {
    /// Map an I/O error from the adapter stack: faults raised by our own adapters (truncation, trailing data,
    /// size limit, digest) come back as their typed variant, anything else is wrapped with `context`.
    pub fn from_io(context: impl Into<String>, source: io::Error) -> Self {
        if source.get_ref().is_some_and(|inner| inner.is::<stream::StreamFault>()) {
            let inner = source.into_inner().expect("checked above");
            let fault = inner.downcast::<stream::StreamFault>().expect("checked above");
            return fault.into_pipeline_error();
        }
        Self::Io { context: context.into(), source }
    }

    pub(crate) fn target(context: impl Into<String>) -> impl FnOnce(BlockError) -> Self {
        let context = context.into();
        move |source| Self::Target { context, source }
    }
}
