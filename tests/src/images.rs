//! Signed directory image stores, packed with `gridforge-agent image pack` and read by every agent by path
//! (the namespaces share the file system): one tiny root file system, so a provision takes well under a
//! second, or a real one from a rootfs tar.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::bins;
use crate::process::run_ok;

pub const TINY_IMAGE: &str = "tiny";
pub const TINY_VERSION: &str = "1";
const PACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ImageStore {
    pub dir: PathBuf,
    /// The index's public key file (`images.trusted_key`).
    pub trusted_key: PathBuf,
}

impl ImageStore {
    /// A store under `dir` holding the image `tiny` version 1.
    pub fn tiny(dir: &Path) -> ImageStore {
        let rootfs = dir.join("rootfs");
        for (path, text) in [
            ("etc/os-release", "ID=tiny\nNAME=\"tiny test image\"\nVERSION_ID=1\n"),
            ("etc/hostname", "tiny\n"),
            ("etc/hosts", "127.0.0.1 localhost\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
            ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
            ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
            ("root/.keep", ""),
            ("usr/share/tiny/README", "a root file system with a few files, for fast test provisions\n"),
        ] {
            let p = rootfs.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
        }
        ImageStore::pack(dir, &rootfs, TINY_IMAGE, TINY_VERSION, PACK_TIMEOUT)
    }

    /// A store under `dir` holding `rootfs` (a directory or a tar) as image `name` version `version`, signed
    /// with a key made for it; `limit` bounds the packing.
    pub fn pack(dir: &Path, rootfs: &Path, name: &str, version: &str, limit: Duration) -> ImageStore {
        std::fs::create_dir_all(dir).unwrap();
        let agent = bins::path(bins::AGENT);
        let key = dir.join("signing.key");
        run_ok(Command::new(&agent).args(["image", "keygen", "--out"]).arg(&key), PACK_TIMEOUT);
        let store = dir.join("store");
        run_ok(
            Command::new(&agent)
                .args(["image", "pack", "--rootfs"])
                .arg(rootfs)
                .args(["--name", name, "--version", version, "--store"])
                .arg(&store)
                .arg("--key")
                .arg(&key),
            limit,
        );
        ImageStore { dir: store, trusted_key: dir.join("signing.key.pub") }
    }
}

/// A VM spec (proto3 JSON of `VmSpec`) on the tiny image: one ext4 root partition on a `disk_mib` disk, a
/// machine of `vcpus` and `memory_mib`, started once defined.
pub fn vm_spec(name: &str, vcpus: u32, memory_mib: u64, disk_mib: u64) -> Value {
    json!({
        "name": name,
        "image": {"name": TINY_IMAGE, "version": TINY_VERSION},
        "disk": {"size_mib": disk_mib, "partitions": [
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "machine": {"vcpus": vcpus, "memory_mib": memory_mib, "start": true}
    })
}
