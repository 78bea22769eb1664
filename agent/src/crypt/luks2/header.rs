//! The LUKS2 binary header and JSON area, both copies.
//!
//! Each copy is `hdr_size` bytes: a 4096-byte big-endian binary header followed by the NUL-padded JSON text.
//! Its checksum is SHA-256 over the whole copy with the checksum field zeroed; each copy has its own salt.

use std::fs::File;
use std::os::unix::fs::FileExt;

use sha2::{Digest, Sha256};

use crate::crypt::{CryptError, fill_random};

pub(crate) const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
pub(crate) const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
pub(crate) const BINARY_LEN: usize = 4096;
/// The copy sizes cryptsetup accepts, and so the offsets where a secondary copy may sit.
pub(crate) const HDR_SIZES: [u64; 9] =
    [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20];

const OFF_VERSION: usize = 6;
const OFF_HDR_SIZE: usize = 8;
const OFF_SEQID: usize = 16;
const OFF_LABEL: usize = 24;
const LABEL_LEN: usize = 48;
const OFF_CSUM_ALG: usize = 72;
const CSUM_ALG_LEN: usize = 32;
const OFF_SALT: usize = 104;
const SALT_LEN: usize = 64;
const OFF_UUID: usize = 168;
const UUID_LEN: usize = 40;
const OFF_SUBSYSTEM: usize = 208;
const SUBSYSTEM_LEN: usize = 48;
const OFF_HDR_OFFSET: usize = 256;
const OFF_CSUM: usize = 448;
const CSUM_LEN: usize = 64;

/// The metadata both copies carry.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    pub hdr_size: u64,
    pub seqid: u64,
    pub label: String,
    pub subsystem: String,
    pub uuid: String,
    pub json: serde_json::Value,
}

/// Which copies were valid when the metadata was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CopiesValid {
    pub primary: bool,
    pub secondary: bool,
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn checksum(copy: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(&copy[..OFF_CSUM]);
    h.update([0u8; CSUM_LEN]);
    h.update(&copy[OFF_CSUM + CSUM_LEN..]);
    h.finalize().into()
}

/// Reads and checks the copy at `at` (absolute), expecting `magic` and a recorded offset of `rel` from the volume
/// start. Returns why it is not valid otherwise.
fn read_copy(dev: &File, at: u64, rel: u64, magic: &[u8; 6]) -> Result<Metadata, String> {
    let mut bin = vec![0u8; BINARY_LEN];
    dev.read_exact_at(&mut bin, at).map_err(|e| format!("reading: {e}"))?;
    if &bin[..6] != magic {
        return Err("no magic".into());
    }
    let version = u16::from_be_bytes([bin[OFF_VERSION], bin[OFF_VERSION + 1]]);
    if version != 2 {
        return Err(format!("version {version}"));
    }
    let hdr_size = be64(&bin, OFF_HDR_SIZE);
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(format!("header size {hdr_size}"));
    }
    if be64(&bin, OFF_HDR_OFFSET) != rel {
        return Err(format!("header offset {} where {rel} was expected", be64(&bin, OFF_HDR_OFFSET)));
    }
    let alg = c_string(&bin[OFF_CSUM_ALG..OFF_CSUM_ALG + CSUM_ALG_LEN]);
    if alg != "sha256" {
        return Err(format!("checksum algorithm {alg:?}"));
    }
    let mut copy = bin;
    copy.resize(hdr_size as usize, 0);
    dev.read_exact_at(&mut copy[BINARY_LEN..], at + BINARY_LEN as u64)
        .map_err(|e| format!("reading: {e}"))?;
    if checksum(&copy)[..] != copy[OFF_CSUM..OFF_CSUM + 32] {
        return Err("checksum mismatch".into());
    }
    let json_area = &copy[BINARY_LEN..];
    let json_end = json_area.iter().position(|&c| c == 0).ok_or("JSON area not NUL-terminated")?;
    let json: serde_json::Value =
        serde_json::from_slice(&json_area[..json_end]).map_err(|e| format!("JSON area: {e}"))?;
    Ok(Metadata {
        hdr_size,
        seqid: be64(&copy, OFF_SEQID),
        label: c_string(&copy[OFF_LABEL..OFF_LABEL + LABEL_LEN]),
        subsystem: c_string(&copy[OFF_SUBSYSTEM..OFF_SUBSYSTEM + SUBSYSTEM_LEN]),
        uuid: c_string(&copy[OFF_UUID..OFF_UUID + UUID_LEN]),
        json,
    })
}

/// Reads the newest valid copy of the metadata of the volume at `offset`, falling back to the secondary copy
/// when the primary is damaged.
pub(crate) fn read(dev: &File, offset: u64) -> Result<(Metadata, CopiesValid), CryptError> {
    let primary = read_copy(dev, offset, 0, MAGIC_PRIMARY);
    let secondary = match &primary {
        Ok(p) => read_copy(dev, offset + p.hdr_size, p.hdr_size, MAGIC_SECONDARY),
        // Without a primary, the secondary may sit after any of the allowed copy sizes.
        Err(_) => HDR_SIZES
            .iter()
            .map(|&size| read_copy(dev, offset + size, size, MAGIC_SECONDARY))
            .find(Result::is_ok)
            .unwrap_or_else(|| Err("not found".into())),
    };
    let valid = CopiesValid { primary: primary.is_ok(), secondary: secondary.is_ok() };
    let chosen = match (primary, secondary) {
        (Ok(p), Ok(s)) => {
            if s.seqid > p.seqid {
                s
            } else {
                p
            }
        }
        (Ok(p), Err(_)) => p,
        (Err(_), Ok(s)) => s,
        (Err(p), Err(_)) => {
            return Err(if p == "no magic" {
                CryptError::NotLuks { offset }
            } else {
                CryptError::BadMetadata(format!("primary header: {p}; no valid secondary header"))
            });
        }
    };
    Ok((chosen, valid))
}

fn put_str(buf: &mut [u8], at: usize, len: usize, s: &str, what: &str) -> Result<(), CryptError> {
    // The field must keep a terminating NUL.
    if s.len() >= len {
        return Err(CryptError::InvalidArgument(format!("{what} {s:?} is longer than {} bytes", len - 1)));
    }
    buf[at..at + s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

/// Builds one copy of the header: `rel` is its offset from the volume start (0 or `hdr_size`).
fn build_copy(meta: &Metadata, json: &[u8], rel: u64, magic: &[u8; 6]) -> Result<Vec<u8>, CryptError> {
    let mut copy = vec![0u8; meta.hdr_size as usize];
    copy[..6].copy_from_slice(magic);
    copy[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&2u16.to_be_bytes());
    copy[OFF_HDR_SIZE..OFF_HDR_SIZE + 8].copy_from_slice(&meta.hdr_size.to_be_bytes());
    copy[OFF_SEQID..OFF_SEQID + 8].copy_from_slice(&meta.seqid.to_be_bytes());
    put_str(&mut copy, OFF_LABEL, LABEL_LEN, &meta.label, "label")?;
    put_str(&mut copy, OFF_CSUM_ALG, CSUM_ALG_LEN, "sha256", "checksum algorithm")?;
    fill_random(&mut copy[OFF_SALT..OFF_SALT + SALT_LEN])?;
    put_str(&mut copy, OFF_UUID, UUID_LEN, &meta.uuid, "UUID")?;
    put_str(&mut copy, OFF_SUBSYSTEM, SUBSYSTEM_LEN, &meta.subsystem, "subsystem")?;
    copy[OFF_HDR_OFFSET..OFF_HDR_OFFSET + 8].copy_from_slice(&rel.to_be_bytes());
    copy[BINARY_LEN..BINARY_LEN + json.len()].copy_from_slice(json);
    let sum = checksum(&copy);
    copy[OFF_CSUM..OFF_CSUM + 32].copy_from_slice(&sum);
    Ok(copy)
}

/// Writes both copies of `meta` (with the seqid it carries) to the volume at `offset` and syncs them.
pub(crate) fn write(dev: &File, offset: u64, meta: &Metadata) -> Result<(), CryptError> {
    let json = serde_json::to_vec(&meta.json).expect("JSON values serialize");
    let json_size = meta.hdr_size as usize - BINARY_LEN;
    if json.len() >= json_size {
        return Err(CryptError::InvalidArgument(format!(
            "LUKS2 metadata of {} bytes does not fit the {json_size}-byte JSON area",
            json.len()
        )));
    }
    let primary = build_copy(meta, &json, 0, MAGIC_PRIMARY)?;
    let secondary = build_copy(meta, &json, meta.hdr_size, MAGIC_SECONDARY)?;
    dev.write_all_at(&primary, offset).map_err(CryptError::io("writing the primary LUKS2 header"))?;
    dev.write_all_at(&secondary, offset + meta.hdr_size)
        .map_err(CryptError::io("writing the secondary LUKS2 header"))?;
    dev.sync_data().map_err(CryptError::io("syncing the LUKS2 headers"))
}
