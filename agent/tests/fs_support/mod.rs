//! Helpers shared by the file system tests: sparse targets, loop devices, stock tools.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: u64 = 1 << 20;

/// A sparse temporary disk image.
pub struct Disk {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub file: File,
}

pub fn sparse_disk(size: u64) -> Disk {
    let dir = tempfile::tempdir().expect("creating temp dir");
    let path = dir.path().join("disk.img");
    let file =
        OpenOptions::new().read(true).write(true).create_new(true).open(&path).expect("creating disk image");
    file.set_len(size).expect("sizing disk image");
    Disk { dir, path, file }
}

pub fn fill(file: &File, offset: u64, len: u64, byte: u8) {
    file.write_all_at(&vec![byte; len as usize], offset).expect("filling disk range");
}

pub fn assert_filled(file: &File, offset: u64, len: u64, byte: u8, what: &str) {
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, offset).expect("reading disk range");
    if let Some(at) = data.iter().position(|&b| b != byte) {
        panic!("{what}: byte at {} is {:#04x}, expected {byte:#04x}", offset + at as u64, data[at]);
    }
}

/// Runs a stock tool; a missing tool fails the test with the package to install.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|error| {
        panic!("cannot run {program} ({error}); install e2fsprogs dosfstools util-linux cryptsetup-bin")
    })
}

/// Runs a tool that must succeed; returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `blkid -p` of a byte range as a map (TYPE, UUID, LABEL, …).
pub fn blkid(path: &Path, offset: u64) -> HashMap<String, String> {
    let out = run_ok("blkid", &["-p", "-o", "export", "-O", &offset.to_string(), path.to_str().unwrap()]);
    out.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// A loop device detached on drop, even when the test panics.
pub struct LoopDevice(pub PathBuf);

impl LoopDevice {
    pub fn attach(path: &Path, offset: u64, len: Option<u64>, sector_size: u32) -> Self {
        let offset = offset.to_string();
        let sector_size = sector_size.to_string();
        let mut args = vec!["--find", "--show", "--offset", &offset, "--sector-size", &sector_size];
        let len_string;
        if let Some(len) = len {
            len_string = len.to_string();
            args.extend(["--sizelimit", &len_string]);
        }
        args.push(path.to_str().unwrap());
        let device = run_ok("losetup", &args);
        LoopDevice(PathBuf::from(device.trim()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn path_str(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("--detach").arg(&self.0).status();
    }
}

/// Deterministic file contents of a given size.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32 % 32) as u8 ^ seed).collect()
}
