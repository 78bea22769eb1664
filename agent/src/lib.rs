//! The gridforge agent engine: everything that turns an image and a layout into a guest disk.
//! The CLI and the gRPC daemon only translate requests into calls on this library.

pub mod block;
pub mod config;
pub mod crypt;
pub mod customize;
pub mod daemon;
pub mod fs;
pub mod hypervisor;
pub mod image;
pub mod jobs;
pub mod node;
pub mod partition;
pub mod pipeline;
pub mod provision;
pub mod server;
pub mod wipe;

use gridforge_proto::v1::error::Code;

/// Any engine error, for callers that handle them alike (the CLI, the job runner). Each module keeps its own
/// typed error; this only wraps them and maps them to the contract's error codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Layout(#[from] partition::LayoutError),
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    #[error(transparent)]
    Fs(#[from] fs::FsError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    #[error(transparent)]
    Crypt(#[from] crypt::CryptError),
    #[error(transparent)]
    Customize(#[from] customize::CustomizeError),
    #[error(transparent)]
    Wipe(#[from] wipe::WipeError),
}

impl Error {
    /// The contract's error code for this failure.
    pub fn code(&self) -> Code {
        use image::ImageError as I;
        use pipeline::PipelineError as P;
        match self {
            Error::Block(_) => Code::Target,
            Error::Layout(_) => Code::Layout,
            Error::Partition(_) => Code::Io,
            Error::Fs(fs::FsError::Tool { .. }) => Code::Tool,
            Error::Fs(_) => Code::Io,
            Error::Image(I::NotFound { .. }) => Code::ImageNotFound,
            Error::Image(I::Unsigned { .. } | I::BadSignature { .. } | I::UnsafePath { .. }) => {
                Code::ImageUntrusted
            }
            Error::Image(I::DigestMismatch { .. } | I::SizeMismatch { .. }) => Code::DigestMismatch,
            Error::Image(I::BadIndex { .. } | I::BadIndexJson { .. } | I::BadSource { .. }) => {
                Code::CorruptImage
            }
            Error::Image(I::Unreachable { .. } | I::HttpStatus { .. }) => Code::ImageStoreUnavailable,
            Error::Image(I::Exists { .. }) => Code::InvalidSpec,
            Error::Image(I::Disk(_)) => Code::Target,
            Error::Image(I::Cancelled) => Code::Cancelled,
            Error::Image(_) => Code::Io,
            Error::Pipeline(P::Cancelled) => Code::Cancelled,
            Error::Pipeline(P::DigestMismatch { .. }) => Code::DigestMismatch,
            Error::Pipeline(P::TooLarge { .. }) => Code::Layout,
            Error::Pipeline(P::Io { .. }) => Code::Io,
            Error::Pipeline(P::Target { .. }) => Code::Target,
            // Writing a file of the archive failed on our side (permission, space), not because of its bytes.
            Error::Pipeline(P::Extract { source, .. })
                if !matches!(
                    source.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                Code::Io
            }
            Error::Pipeline(_) => Code::CorruptImage,
            Error::Crypt(crypt::CryptError::Io { .. }) => Code::Io,
            Error::Crypt(_) => Code::InvalidSpec,
            Error::Customize(customize::CustomizeError::Io { .. }) => Code::Io,
            Error::Customize(_) => Code::InvalidSpec,
            Error::Wipe(wipe::WipeError::Cancelled { .. }) => Code::Cancelled,
            Error::Wipe(wipe::WipeError::Refused { .. }) => Code::Target,
            Error::Wipe(_) => Code::Io,
        }
    }
}
