//! Disk encryption in userspace: AES-XTS sectors and LUKS2 volumes that stock cryptsetup reads and writes,
//! without device-mapper (the payload is encrypted and decrypted here, not by dm-crypt).

pub mod af;
pub mod luks2;
pub mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;

use std::io;

/// A LUKS2 or encryption failure.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("no valid LUKS2 header at offset {offset}")]
    NotLuks { offset: u64 },
    #[error("invalid LUKS2 metadata: {0}")]
    BadMetadata(String),
    #[error("unsupported LUKS2 feature: {0}")]
    Unsupported(String),
    #[error("no keyslot opens with this passphrase")]
    WrongPassphrase,
    #[error("refusing to remove the last keyslot")]
    LastKeyslot,
    #[error("no room for another keyslot")]
    NoFreeKeyslot,
    #[error("{0}")]
    InvalidArgument(String),
    #[error("deriving a keyslot key with argon2")]
    Argon2(#[source] argon2::Error),
    #[error("reading the system random generator")]
    Random(#[source] rand::rngs::SysError),
    #[error("bad XTS key")]
    XtsKey(#[source] xts::BadXtsKey),
}

impl CryptError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> CryptError {
        let what = what.into();
        move |source| CryptError::Io { what, source }
    }
}

/// Fills `buf` from the operating system's random generator.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), CryptError> {
    use rand::TryRng;
    rand::rngs::SysRng.try_fill_bytes(buf).map_err(CryptError::Random)
}
