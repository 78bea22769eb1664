//! Helpers for the LUKS2 tests: stock cryptsetup as the oracle, key files and test data.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gridforge_agent::crypt::luks2::{FormatOptions, Kdf};

/// A cheap PBKDF2 keyslot for tests.
pub const TEST_PBKDF2: Kdf = Kdf::Pbkdf2 { iterations: 10_000 };

pub fn cryptsetup_output(args: &[&str]) -> Output {
    Command::new("cryptsetup")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cryptsetup (Debian cryptsetup-bin) is required for this test: {e}"))
}

/// Runs cryptsetup, panicking with its output when it fails; returns stdout.
pub fn cryptsetup(args: &[&str]) -> String {
    let out = cryptsetup_output(args);
    assert!(
        out.status.success(),
        "cryptsetup {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether cryptsetup accepts `key_file` for the volume at `dev`.
pub fn test_passphrase(dev: &Path, key_file: &Path) -> bool {
    cryptsetup_output(&["open", "--test-passphrase", "--key-file", s(key_file), s(dev)]).status.success()
}

/// The volume key cryptsetup recovers with `key_file`.
pub fn dump_volume_key(dev: &Path, key_file: &Path) -> Vec<u8> {
    let text =
        cryptsetup(&["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", s(key_file), s(dev)]);
    let start = text.find("MK dump:").expect("luksDump prints the volume key") + "MK dump:".len();
    text[start..]
        .split_whitespace()
        .map_while(|tok| if tok.len() == 2 { u8::from_str_radix(tok, 16).ok() } else { None })
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

pub fn write_key(dir: &Path, name: &str, passphrase: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, passphrase).unwrap();
    path
}

/// A sparse file of `len` bytes.
pub fn sparse_file(path: &Path, len: u64) -> File {
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(len).unwrap();
    f
}

pub fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

/// Deterministic, non-repeating test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn options(kdf: Kdf, sector_size: usize, label: &str) -> FormatOptions {
    FormatOptions {
        kdf,
        sector_size,
        label: label.into(),
        uuid: Some(uuid::Uuid::new_v4()),
        ..Default::default()
    }
}

/// Copies `src` to a new file (cryptsetup may repair headers it reads; keep the original untouched).
pub fn copy(src: &Path, dst: &Path) -> PathBuf {
    std::fs::copy(src, dst).unwrap();
    dst.to_path_buf()
}
