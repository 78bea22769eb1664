//! Helpers shared by the integration tests: running stock tools and loop devices.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run a command, panic with its output if it fails, return stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A loop device over a file, detached on drop.
pub struct Loop {
    pub dev: PathBuf,
}

impl Loop {
    pub fn attach(file: &Path, sector_size: u32) -> Self {
        let ss = sector_size.to_string();
        let dev = run("losetup", &["-f", "--show", "--sector-size", &ss, file.to_str().unwrap()]);
        Self { dev: PathBuf::from(dev.trim()) }
    }
    pub fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Run a command and return (success, stdout, stderr) without panicking.
pub fn try_run(cmd: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loop device over a byte range of a file (one partition), detached on drop.
pub fn attach_range(file: &Path, offset: u64, size: u64) -> Loop {
    let dev = run(
        "losetup",
        &[
            "-f",
            "--show",
            "-o",
            &offset.to_string(),
            "--sizelimit",
            &size.to_string(),
            file.to_str().unwrap(),
        ],
    );
    Loop { dev: PathBuf::from(dev.trim()) }
}

/// blkid's value of one tag for a device, probing the device itself (no cache).
pub fn blkid_tag(dev: &str, tag: &str) -> String {
    run("blkid", &["-p", "-o", "value", "-s", tag, dev]).trim().to_string()
}

/// A small root file system tree: a few files, a symlink, a directory owned by uid 1000.
pub fn small_rootfs(dir: &Path) {
    use std::os::unix::fs::{PermissionsExt, symlink};
    for d in ["etc", "usr/bin", "home/user", "boot", "var/log"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("etc/hostname"), "template\n").unwrap();
    std::fs::write(dir.join("etc/os-release"), "ID=gridforge-test\n").unwrap();
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
    // Stand-ins for a kernel and initrd: enough for the boot entry, not for booting.
    std::fs::write(dir.join("boot/vmlinuz-6.1.0-test"), "kernel").unwrap();
    std::fs::write(dir.join("boot/initrd.img-6.1.0-test"), "initrd").unwrap();
    std::fs::write(dir.join("usr/bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(dir.join("usr/bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.join("home/user"), Some(1000), Some(1000)).unwrap();
    symlink("usr/bin", dir.join("bin")).unwrap();
}

/// Cheap Argon2id for stock cryptsetup, as cryptsetup's own tests use it.
pub const CRYPTSETUP_FAST_KDF: &[&str] = &[
    "--pbkdf",
    "argon2id",
    "--pbkdf-memory",
    "32768",
    "--pbkdf-force-iterations",
    "4",
    "--pbkdf-parallel",
    "1",
];

/// Stock `cryptsetup luksFormat` (LUKS2) with [`CRYPTSETUP_FAST_KDF`].
pub fn luks_format_fast(device: &str, keyfile: &str, extra: &[&str]) {
    let mut args = vec!["luksFormat", "--batch-mode", "--type", "luks2", "--key-file", keyfile];
    args.extend_from_slice(CRYPTSETUP_FAST_KDF);
    args.extend_from_slice(extra);
    args.push(device);
    run("cryptsetup", &args);
}
