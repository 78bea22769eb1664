//! Encrypted partitions: a LUKS2 volume written in userspace, its file system built in plaintext in a scratch
//! file and streamed through the volume's encryption into the payload. No device-mapper involved.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use gridforge_proto::v1::{Encryption, Partition, error::Code};
use zeroize::Zeroizing;

use super::{ProvisionError, make_fs};
use crate::block::{BlockTarget, MIB};
use crate::crypt::luks2::{self, FormatOptions, Kdf};
use crate::fs::FsInfo;

/// The passphrase of an encryption setting: inline, or a file's content without one trailing newline.
pub(super) fn passphrase(enc: &Encryption) -> Result<Zeroizing<Vec<u8>>, std::io::Error> {
    if !enc.passphrase.is_empty() {
        return Ok(Zeroizing::new(enc.passphrase.as_bytes().to_vec()));
    }
    let mut bytes = Zeroizing::new(std::fs::read(&enc.passphrase_file).map_err(|e| {
        std::io::Error::new(e.kind(), format!("reading passphrase file {}: {e}", enc.passphrase_file))
    })?);
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    Ok(bytes)
}

pub(super) fn kdf(enc: &Encryption) -> Option<Kdf> {
    Kdf::preset(if enc.kdf.is_empty() { "argon2id" } else { &enc.kdf })
}

pub(super) fn make(
    target: &BlockTarget,
    offset: u64,
    len: u64,
    part: &Partition,
    enc: &Encryption,
    tree: Option<&Path>,
    work_dir: &Path,
) -> Result<(Option<FsInfo>, String), ProvisionError> {
    let io = |e: std::io::Error| ProvisionError::new("encrypt", Code::Io, e);
    let crypt = |e: crate::crypt::CryptError| {
        let e = crate::Error::from(e);
        ProvisionError::new("encrypt", e.code(), e)
    };
    let pass = passphrase(enc).map_err(io)?;
    let opts = FormatOptions {
        kdf: kdf(enc).expect("validated"),
        sector_size: if enc.sector_size == 0 { 4096 } else { enc.sector_size as usize },
        label: if enc.label.is_empty() { part.label.clone() } else { enc.label.clone() },
        ..FormatOptions::default()
    };
    let volume = luks2::format(target.file(), offset, len, &pass, &opts).map_err(crypt)?;
    drop(pass);

    // The plaintext file system, built in a sparse scratch file of the payload's size.
    let scratch = tempfile::Builder::new().prefix("plain-").tempfile_in(work_dir).map_err(io)?;
    scratch.as_file().set_len(volume.payload_len).map_err(io)?;
    let fs_info = make_fs(scratch.path(), scratch.as_file(), 0, volume.payload_len, 512, part, tree)?;

    // Every payload byte is written, holes included, so the whole volume decrypts to the file system.
    let mut plain = File::open(scratch.path()).map_err(io)?;
    let mut writer = volume.writer(target.file(), 0).map_err(crypt)?;
    let mut buf = vec![0u8; (4 * MIB) as usize];
    loop {
        let n = plain.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        writer.write_all(&buf[..n]).map_err(io)?;
    }
    writer.finish().map_err(crypt)?;
    Ok((fs_info, volume.uuid.clone()))
}
