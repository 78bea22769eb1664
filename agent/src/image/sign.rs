//! ed25519 keys and detached signatures for store indexes. Keys and signatures are stored as one line of
//! standard base64: the private key file holds the 32-byte seed, the `.pub` file the 32-byte public key.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use zeroize::Zeroizing;

use super::ImageError;

/// Writes a new private key to `out` (mode 0600, never overwriting) and its public key to `<out>.pub`.
pub fn keygen(out: &Path) -> Result<VerifyingKey, ImageError> {
    let signing_key = SigningKey::generate(&mut rand::rng());
    let verifying_key = signing_key.verifying_key();
    let seed = Zeroizing::new(signing_key.to_bytes());
    let mut line = Zeroizing::new(BASE64.encode(seed.as_slice()));
    line.push('\n');

    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(0o600).open(out).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ImageError::KeyExists { path: out.to_path_buf() }
            } else {
                ImageError::Io { context: format!("creating key file {}", out.display()), source }
            }
        })?;
    file.write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(ImageError::io(format!("writing key file {}", out.display())))?;

    let pub_path = public_key_path(out);
    let pub_line = format!("{}\n", encode_public(&verifying_key));
    std::fs::write(&pub_path, pub_line)
        .map_err(ImageError::io(format!("writing public key file {}", pub_path.display())))?;
    Ok(verifying_key)
}

/// The text form of a public key: one line of standard base64, as in `.pub` files and `--trusted-key`.
pub fn encode_public(key: &VerifyingKey) -> String {
    BASE64.encode(key.as_bytes())
}

/// `<key>.pub`, next to the private key.
pub fn public_key_path(private_key: &Path) -> PathBuf {
    let mut name = private_key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Reads a private key file written by [`keygen`].
pub fn load_signing_key(path: &Path) -> Result<SigningKey, ImageError> {
    let what = || format!("key file {}", path.display());
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(ImageError::io(format!("reading key file {}", path.display())))?,
    );
    let seed = Zeroizing::new(
        BASE64
            .decode(text.trim())
            .map_err(|_| ImageError::BadKey { what: what(), reason: "not base64 text" })?,
    );
    let seed: &[u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| ImageError::BadKey { what: what(), reason: "not a 32-byte ed25519 seed" })?;
    Ok(SigningKey::from_bytes(seed))
}

/// A trusted public key given either inline as base64 or as the path of a `.pub` file.
pub fn parse_trusted_key(s: &str) -> Result<VerifyingKey, ImageError> {
    let s = s.trim();
    if let Ok(bytes) = BASE64.decode(s)
        && bytes.len() == 32
    {
        return verifying_key_from(&bytes, "trusted key".to_string());
    }
    let path = Path::new(s);
    if !path.exists() {
        return Err(ImageError::BadKey {
            what: format!("trusted key {s:?}"),
            reason: "neither a base64 ed25519 public key nor an existing key file",
        });
    }
    let text = std::fs::read_to_string(path)
        .map_err(ImageError::io(format!("reading public key file {}", path.display())))?;
    let what = format!("public key file {}", path.display());
    let bytes = BASE64
        .decode(text.trim())
        .map_err(|_| ImageError::BadKey { what: what.clone(), reason: "not base64 text" })?;
    verifying_key_from(&bytes, what)
}

fn verifying_key_from(bytes: &[u8], what: String) -> Result<VerifyingKey, ImageError> {
    let bytes: &[u8; 32] = bytes
        .try_into()
        .map_err(|_| ImageError::BadKey { what: what.clone(), reason: "not a 32-byte public key" })?;
    VerifyingKey::from_bytes(bytes)
        .map_err(|_| ImageError::BadKey { what, reason: "not a valid ed25519 point" })
}

/// Detached signature over `bytes`, as one line of base64 (no newline).
pub fn sign(key: &SigningKey, bytes: &[u8]) -> String {
    BASE64.encode(key.sign(bytes).to_bytes())
}

/// Checks a detached base64 signature (surrounding whitespace allowed) over exactly `bytes`.
pub fn verify(key: &VerifyingKey, bytes: &[u8], sig_text: &str) -> Result<(), ImageError> {
    verify_named(key, bytes, sig_text, "signed data")
}

/// [`verify`], naming what was signed in the error.
pub(crate) fn verify_named(
    key: &VerifyingKey,
    bytes: &[u8],
    sig_text: &str,
    what: &str,
) -> Result<(), ImageError> {
    let bad = || ImageError::BadSignature { what: what.to_string() };
    let raw = BASE64.decode(sig_text.trim()).map_err(|_| bad())?;
    let raw: [u8; 64] = raw.as_slice().try_into().map_err(|_| bad())?;
    // verify_strict rejects small-order keys and non-canonical signatures that plain verify tolerates.
    key.verify_strict(bytes, &Signature::from_bytes(&raw)).map_err(|_| bad())
}
