//! Helpers for the wipe tests: planting a tenant's plaintext and scanning for it afterwards.
#![allow(dead_code)]

use std::path::Path;

use gridforge_agent::wipe::{self, CancelToken, Method, Verify, WipeOutcome, WipeRequest};
use gridforge_common::progress::Progress;

pub const SECRET: &[u8] = b"TENANT-SECRET";
pub const MIB: u64 = 1 << 20;

/// A file of `size` bytes filled with the secret pattern.
pub fn planted_file(path: &Path, size: u64) {
    let data: Vec<u8> = SECRET.iter().copied().cycle().take(size as usize).collect();
    std::fs::write(path, data).unwrap();
}

/// Whether any piece of the secret survives in `path`: every surviving run of 13 or more bytes of the pattern
/// holds a `-` with "TENANT" before it or "SECRET" after it (a quick scan even in debug builds).
pub fn secret_survives(path: &Path) -> bool {
    let data = std::fs::read(path).unwrap();
    data.iter().enumerate().filter(|&(_, &b)| b == b'-').any(|(i, _)| {
        (i >= 6 && &data[i - 6..i] == b"TENANT") || data.get(i + 1..i + 7) == Some(b"SECRET".as_slice())
    })
}

pub fn all_zero(path: &Path) -> bool {
    std::fs::read(path).unwrap().iter().all(|&b| b == 0)
}

pub fn run_wipe(path: &Path, method: Method, verify: Verify) -> WipeOutcome {
    let req = WipeRequest::new(path, method, verify);
    wipe::wipe(&req, &Progress::none(), &CancelToken::new())
        .unwrap_or_else(|e| panic!("wiping {}: {e:?}", path.display()))
}
