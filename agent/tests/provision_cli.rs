//! The agent CLI end to end on real files and loop devices, every disk checked by stock tools.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Loop, attach_range, blkid_tag, run, small_rootfs, try_run};
use gridforge_proto::v1::{Error as ProtoError, ProvisionResult, error::Code};

const MIB: u64 = 1 << 20;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridforge-agent"))
}

/// A signed store with one small rootfs image, a key, a cache and a work dir.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Self { dir: tempfile::tempdir().unwrap() };
        let out = agent().args(["image", "keygen", "--out"]).arg(f.key()).output().unwrap();
        assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
        let rootfs = f.path("rootfs");
        small_rootfs(&rootfs);
        f.pack(&["--rootfs", rootfs.to_str().unwrap(), "--name", "tiny", "--version", "1"]);
        f
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn key(&self) -> PathBuf {
        self.path("signing.key")
    }
    fn store(&self) -> PathBuf {
        self.path("store")
    }
    fn pack(&self, args: &[&str]) {
        let out = agent()
            .args(["image", "pack", "--store"])
            .arg(self.store())
            .arg("--key")
            .arg(self.key())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "pack {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    /// Run `provision --json`; Ok(result) or Err(structured error).
    fn provision(&self, spec: &str, disk: &Path) -> Result<ProvisionResult, ProtoError> {
        let spec_path = self.path("spec.json");
        std::fs::write(&spec_path, spec).unwrap();
        let out = agent()
            .arg("--json")
            .arg("provision")
            .arg("--spec")
            .arg(&spec_path)
            .arg("--disk")
            .arg(disk)
            .arg("--store")
            .arg(self.store())
            .arg("--trusted-key")
            .arg(self.path("signing.key.pub"))
            .arg("--cache")
            .arg(self.path("cache"))
            .arg("--work-dir")
            .arg(self.path("work"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        if out.status.success() {
            Ok(serde_json::from_str(last).unwrap_or_else(|e| panic!("result line {last:?}: {e}")))
        } else {
            let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| {
                panic!("error line {last:?}: {e}; stderr {}", String::from_utf8_lossy(&out.stderr))
            });
            Err(serde_json::from_value(v["error"].clone()).unwrap())
        }
    }
}

fn two_partition_spec(image: &str, disk_mib: u64, esp_mib: u64) -> String {
    format!(
        r#"{{"name":"web-1","image":{{"name":"{image}","version":"1"}},"disk":{{"size_mib":{disk_mib},"partitions":[
        {{"label":"esp","role":"ESP","size_mib":{esp_mib},"filesystem":"VFAT"}},
        {{"label":"root","role":"ROOT","filesystem":"EXT4"}}]}}}}"#
    )
}

/// The checks a user would run on a provisioned two-partition disk.
fn check_disk(disk: &str, file: &Path, res: &ProvisionResult) {
    let v = run("sgdisk", &["-v", disk]);
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    let mbr = run("sgdisk", &["-O", disk]);
    assert!(mbr.contains("0xEE"), "protective MBR missing: {mbr}");
    assert_eq!(res.partitions.len(), 2);
    for p in &res.partitions {
        assert_eq!(p.offset_bytes % MIB, 0, "partition {} not 1 MiB aligned", p.number);
        let info = run("sgdisk", &["-i", &p.number.to_string(), disk]);
        assert!(info.contains(&p.partition_guid.to_uppercase()), "{info}");
        assert!(info.contains(&format!("'{}'", p.label)), "{info}");
    }
    assert!(run("sgdisk", &["-p", disk]).contains(&res.disk_guid.to_uppercase()));
    let esp = &res.partitions[0];
    let root = &res.partitions[1];
    let esp_dev = attach_range(file, esp.offset_bytes, esp.size_bytes);
    let (ok, out, err) = try_run("fsck.vfat", &["-n", esp_dev.path()]);
    assert!(ok, "fsck.vfat -n: {out}{err}");
    assert_eq!(blkid_tag(esp_dev.path(), "TYPE"), "vfat");
    assert_eq!(blkid_tag(esp_dev.path(), "UUID"), esp.fs_uuid);
    assert_eq!(blkid_tag(esp_dev.path(), "LABEL"), esp.fs_label);
    let root_dev = attach_range(file, root.offset_bytes, root.size_bytes);
    run("e2fsck", &["-fn", root_dev.path()]);
    assert_eq!(blkid_tag(root_dev.path(), "TYPE"), "ext4");
    assert_eq!(blkid_tag(root_dev.path(), "UUID"), root.fs_uuid);
    assert_eq!(blkid_tag(root_dev.path(), "LABEL"), "root");
    let os = run("debugfs", &["-R", "cat /etc/os-release", root_dev.path()]);
    assert_eq!(os, "ID=gridforge-test\n");
    let fstab = run("debugfs", &["-R", "cat /etc/fstab", root_dev.path()]);
    assert!(fstab.contains(&format!("UUID={} / ext4", root.fs_uuid)), "{fstab}");
    assert!(fstab.contains(&format!("UUID={} /boot/efi vfat", esp.fs_uuid)), "{fstab}");
    let stat = run("debugfs", &["-R", "stat /home/user", root_dev.path()]);
    assert!(stat.contains("User:  1000") && stat.contains("Group:  1000"), "ownership kept: {stat}");
    let stat = run("debugfs", &["-R", "stat /usr/bin/tool", root_dev.path()]);
    assert!(stat.contains("Mode:  0755"), "mode kept: {stat}");
    let link = run("debugfs", &["-R", "stat /bin", root_dev.path()]);
    assert!(link.contains("Type: symlink") && link.contains("usr/bin"), "{link}");
}

#[test]
fn rootfs_image_onto_file_with_512_byte_sectors() {
    let f = Fixture::new();
    let disk = f.path("disk.img");
    let res = f.provision(&two_partition_spec("tiny", 256, 64), &disk).unwrap();
    assert_eq!(res.sector_size, 512);
    assert_eq!(res.disk_size_bytes, 256 * MIB);
    check_disk(disk.to_str().unwrap(), &disk, &res);

    // inspect reads back what provision reported.
    let out = agent().args(["--json", "inspect", "--disk"]).arg(&disk).output().unwrap();
    assert!(out.status.success());
    let seen: ProvisionResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen.disk_guid, res.disk_guid);
    for (a, b) in seen.partitions.iter().zip(&res.partitions) {
        assert_eq!(
            (&a.fs_uuid, &a.fs_label, &a.partition_guid),
            (&b.fs_uuid, &b.fs_label, &b.partition_guid)
        );
    }
}

#[test]
fn rootfs_image_onto_loop_device_with_4096_byte_sectors() {
    let f = Fixture::new();
    let file = f.path("disk4k.img");
    std::fs::File::create(&file).unwrap().set_len(640 * MIB).unwrap();
    let lo = Loop::attach(&file, 4096);
    assert_eq!(run("blockdev", &["--getss", lo.path()]).trim(), "4096");
    // FAT32 with 4096-byte sectors needs about 257 MiB.
    let res = f.provision(&two_partition_spec("tiny", 640, 300), &lo.dev).unwrap();
    assert_eq!(res.sector_size, 4096);
    check_disk(lo.path(), &file, &res);
}

/// A raw disk image: GPT with one ext4 partition holding a small tree.
fn make_raw_disk(path: &Path, size_mib: u64, tree: &Path) {
    std::fs::File::create(path).unwrap().set_len(size_mib * MIB).unwrap();
    let p = path.to_str().unwrap();
    run("sgdisk", &["-o", "-n", "1:2048:0", "-t", "1:8300", "-c", "1:root", p]);
    let blocks = (size_mib * MIB - MIB - MIB) / 1024;
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            tree.to_str().unwrap(),
            "-E",
            "offset=1048576",
            p,
            &format!("{blocks}k"),
        ],
    );
}

#[test]
fn raw_disk_image_is_written_byte_for_byte_and_grown_on_a_larger_target() {
    let f = Fixture::new();
    let raw = f.path("raw.img");
    make_raw_disk(&raw, 64, &f.path("rootfs"));
    f.pack(&["--raw-disk", raw.to_str().unwrap(), "--name", "appliance", "--version", "1"]);
    let spec = |mib: u64| {
        format!(r#"{{"name":"a","image":{{"name":"appliance","version":"1"}},"disk":{{"size_mib":{mib}}}}}"#)
    };

    let same = f.path("same.img");
    f.provision(&spec(64), &same).unwrap();
    assert!(
        std::fs::read(&same).unwrap() == std::fs::read(&raw).unwrap(),
        "written disk differs from the image"
    );

    let big = f.path("big.img");
    let res = f.provision(&spec(160), &big).unwrap();
    let v = run("sgdisk", &["-v", big.to_str().unwrap()]);
    assert!(v.contains("No problems found"), "{v}");
    let part = &res.partitions[0];
    assert_eq!(part.offset_bytes, MIB);
    assert!(part.size_bytes >= 150 * MIB, "last partition grown: {} MiB", part.size_bytes / MIB);
    let dev = attach_range(&big, part.offset_bytes, part.size_bytes);
    run("e2fsck", &["-fn", dev.path()]);
    let sb = run("dumpe2fs", &["-h", dev.path()]);
    let blocks: u64 =
        sb.lines().find_map(|l| l.strip_prefix("Block count:")).map(|v| v.trim().parse().unwrap()).unwrap();
    let block_size: u64 =
        sb.lines().find_map(|l| l.strip_prefix("Block size:")).map(|v| v.trim().parse().unwrap()).unwrap();
    assert!(
        blocks * block_size >= 150 * MIB,
        "ext4 grown to the partition: {} MiB",
        blocks * block_size / MIB
    );
    assert_eq!(run("debugfs", &["-R", "cat /etc/os-release", dev.path()]), "ID=gridforge-test\n");

    // Image larger than the target: refused before anything is written past the head.
    let small = f.path("small.img");
    let err = f.provision(&spec(32), &small).unwrap_err();
    assert_eq!(err.code(), Code::Layout, "{err:?}");
    assert!(!small.exists(), "a target file the failed provision created is removed");
}

/// A disk whose head is non-zero, to see the failure path zero it.
fn dirty_disk(path: &Path, mib: u64) {
    std::fs::write(path, vec![0x5Au8; (2 * MIB) as usize]).unwrap();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(mib * MIB).unwrap();
}

fn head_is_zero(path: &Path) -> bool {
    std::fs::read(path).unwrap()[..MIB as usize].iter().all(|&b| b == 0)
}

#[test]
fn wrong_digest_is_reported_and_the_head_zeroed() {
    let f = Fixture::new();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.store().join("index.json")).unwrap()).unwrap();
    let blob = f.store().join(index["images"][0]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&blob, bytes).unwrap();
    let disk = f.path("disk.img");
    dirty_disk(&disk, 256);
    let err = f.provision(&two_partition_spec("tiny", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::DigestMismatch, "{err:?}");
    assert_eq!(err.step, "fetch");
    let expected = index["images"][0]["sha256"].as_str().unwrap();
    assert!(err.message.contains(expected), "names the expected digest: {}", err.message);
    assert!(head_is_zero(&disk));
    assert!(!f.path("cache").join("sha256").join(expected).exists(), "nothing cached");
}

#[test]
fn untrusted_stores_and_unknown_images_are_refused() {
    let f = Fixture::new();
    let disk = f.path("disk.img");
    let err = f.provision(&two_partition_spec("nope", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::ImageNotFound, "{err:?}");
    assert!(err.message.contains("tiny"), "lists what is available: {}", err.message);

    // Signed by another key.
    let other = f.path("other.key");
    assert!(agent().args(["image", "keygen", "--out"]).arg(&other).output().unwrap().status.success());
    std::fs::copy(f.path("other.key.pub"), f.path("signing.key.pub")).unwrap();
    let err = f.provision(&two_partition_spec("tiny", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::ImageUntrusted, "{err:?}");

    // Unsigned.
    std::fs::remove_file(f.store().join("index.json.sig")).unwrap();
    let err = f.provision(&two_partition_spec("tiny", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::ImageUntrusted, "{err:?}");
}

#[test]
fn layouts_that_do_not_fit_or_make_no_sense_are_refused() {
    let f = Fixture::new();
    let disk = f.path("disk.img");
    dirty_disk(&disk, 256);
    let err = f.provision(&two_partition_spec("tiny", 256, 512), &disk).unwrap_err();
    assert_eq!(err.code(), Code::Layout, "{err:?}");
    assert!(err.message.contains("esp") || err.message.contains("MiB"), "{}", err.message);
    assert!(head_is_zero(&disk), "a failed provision zeroes the head");

    let zero = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"esp","role":"ESP","size_mib":0,"filesystem":"VFAT"},{"label":"root","role":"ROOT","filesystem":"EXT4"}]}}"#;
    let err = f.provision(zero, &disk).unwrap_err();
    assert_eq!(err.code(), Code::InvalidSpec);
    assert!(err.message.contains("disk.partitions[0].size_mib"), "{}", err.message);

    let rest_first = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"root","role":"ROOT","filesystem":"EXT4"},{"label":"esp","role":"ESP","size_mib":64,"filesystem":"VFAT"}]}}"#;
    let err = f.provision(rest_first, &disk).unwrap_err();
    assert_eq!(err.code(), Code::Layout, "{err:?}");

    let xfs = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"root","role":"ROOT","filesystem":"XFS"}]}}"#;
    std::fs::write(f.path("xfs.json"), xfs).unwrap();
    let out = agent()
        .args(["provision", "--insecure-images", "--store", "x", "--spec"])
        .arg(f.path("xfs.json"))
        .arg("--disk")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("XFS"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn missing_or_unusable_targets_are_refused() {
    let f = Fixture::new();
    let no_size = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"partitions":[
        {"label":"root","role":"ROOT","filesystem":"EXT4"}]}}"#;
    let err = f.provision(no_size, &f.path("absent.img")).unwrap_err();
    assert_eq!(err.code(), Code::Target);
    assert!(err.message.contains("absent.img"), "{}", err.message);

    let err = f.provision(&two_partition_spec("tiny", 256, 64), f.dir.path()).unwrap_err();
    assert_eq!(err.code(), Code::Target, "a directory is not a disk: {err:?}");
}

#[test]
fn layers_are_overlaid_in_order_then_customization_and_deletes_apply() {
    let f = Fixture::new();
    let layer = f.path("layer");
    std::fs::create_dir_all(layer.join("etc/app")).unwrap();
    std::fs::create_dir_all(layer.join("usr/share/doc/app")).unwrap();
    std::fs::write(layer.join("etc/app/app.conf"), "listen 80\n").unwrap();
    std::fs::write(layer.join("etc/os-release"), "ID=layered\n").unwrap();
    std::fs::write(layer.join("usr/share/doc/app/README"), "docs\n").unwrap();
    f.pack(&["--rootfs", layer.to_str().unwrap(), "--name", "app", "--version", "2", "--kind", "layer"]);
    let spec = r#"{"name":"app-1","image":{"name":"tiny","version":"1"},"layers":[{"name":"app","version":"2"}],
        "disk":{"size_mib":128,"partitions":[{"label":"root","role":"ROOT","filesystem":"EXT4"}]},
        "customize":{"hostname":"app-1","delete":["/usr/share/doc/*"],
          "files":[{"path":"/etc/app/extra.conf","content":"x\n","mode":"0600"}]}}"#;
    let disk = f.path("disk.img");
    let res = f.provision(spec, &disk).unwrap();
    assert_eq!(res.image_digests.len(), 2, "OS image and layer digests reported");
    let root = &res.partitions[0];
    let dev = attach_range(&disk, root.offset_bytes, root.size_bytes);
    run("e2fsck", &["-fn", dev.path()]);
    assert_eq!(run("debugfs", &["-R", "cat /etc/app/app.conf", dev.path()]), "listen 80\n");
    assert_eq!(run("debugfs", &["-R", "cat /etc/os-release", dev.path()]), "ID=layered\n", "layer wins");
    assert_eq!(run("debugfs", &["-R", "cat /usr/bin/tool", dev.path()]), "#!/bin/sh\necho hi\n", "OS kept");
    assert_eq!(run("debugfs", &["-R", "cat /etc/hostname", dev.path()]), "app-1\n");
    let stat = run("debugfs", &["-R", "stat /etc/app/extra.conf", dev.path()]);
    assert!(stat.contains("Mode:  0600"), "{stat}");
    let doc = try_run("debugfs", &["-R", "stat /usr/share/doc/app", dev.path()]);
    assert!(doc.2.contains("not found") || doc.1.contains("not found"), "deleted after overlay: {doc:?}");
}

#[test]
fn a_tar_escaping_the_root_is_refused_and_nothing_lands_outside() {
    use std::io::Write;
    let f = Fixture::new();
    let outside = f.path("escaped");
    // A tar whose entry climbs out of the staging directory, compressed and published with a valid digest.
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let mut h = tar::Header::new_gnu();
        let data = b"owned\n";
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        let name = format!("../../../../../../..{}", outside.display());
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        b.finish().unwrap();
    }
    let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(&raw).unwrap();
    let blob = enc.finish().unwrap();
    let (sha256, size, path) = gridforge_agent::image::pack::add_blob(&f.store(), &blob[..]).unwrap();
    let key = gridforge_agent::image::sign::load_signing_key(&f.key()).unwrap();
    let entry = gridforge_agent::image::IndexEntry {
        name: "evil".into(),
        version: "1".into(),
        kind: gridforge_agent::image::Kind::Os,
        format: gridforge_agent::image::Format::RootfsTar,
        compression: gridforge_agent::image::Compression::Zstd,
        compressed_size: size,
        uncompressed_size: raw.len() as u64,
        sha256,
        path,
        arch: "x86_64".into(),
        min_disk_mib: 1,
        notes: String::new(),
    };
    gridforge_agent::image::pack::publish(&f.store(), entry, &key).unwrap();
    let disk = f.path("disk.img");
    dirty_disk(&disk, 256);
    let err = f.provision(&two_partition_spec("evil", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::CorruptImage, "{err:?}");
    assert!(err.message.contains(".."), "names the path: {}", err.message);
    assert!(!outside.exists(), "nothing written outside the staging directory");
    assert!(head_is_zero(&disk));
}

/// Decrypt an aes-xts-plain64 payload with OpenSSL (through python3-cryptography), given the volume key from
/// `cryptsetup luksDump --dump-volume-key`: IV = payload byte offset / 512, per encryption sector.
fn decrypt_payload(cipher: &[u8], key_hex: &str, sector: usize) -> Vec<u8> {
    use std::io::Write;
    let script = "import sys
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
key, sector = bytes.fromhex(sys.argv[1]), int(sys.argv[2])
data, out = sys.stdin.buffer.read(), bytearray()
for off in range(0, len(data), sector):
    d = Cipher(algorithms.AES(key), modes.XTS((off // 512).to_bytes(16, 'little'))).decryptor()
    out += d.update(data[off:off + sector]) + d.finalize()
sys.stdout.buffer.write(out)
";
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script, key_hex, &sector.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with python3-cryptography is required for this test");
    let mut stdin = child.stdin.take().unwrap();
    let data = cipher.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data).unwrap());
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn encrypted_data_partition_opens_with_stock_cryptsetup_and_decrypts_to_ext4() {
    let f = Fixture::new();
    std::fs::write(f.path("pass"), "tenant secret\n").unwrap();
    let spec = format!(
        r#"{{"name":"vault","image":{{"name":"tiny","version":"1"}},"disk":{{"size_mib":160,"partitions":[
        {{"label":"root","role":"ROOT","size_mib":64,"filesystem":"EXT4"}},
        {{"label":"secure","role":"DATA","filesystem":"EXT4","mount_point":"/srv/data",
          "encryption":{{"passphrase_file":"{}","kdf":"argon2id-fast","sector_size":4096}}}}]}}}}"#,
        f.path("pass").display()
    );
    let disk = f.path("disk.img");
    let res = f.provision(&spec, &disk).unwrap();
    let data = &res.partitions[1];
    assert!(data.luks && !data.luks_uuid.is_empty(), "{data:?}");
    // The partition region, copied out: cryptsetup's dump may touch a writable image.
    let all = std::fs::read(&disk).unwrap();
    let region = &all[data.offset_bytes as usize..(data.offset_bytes + data.size_bytes) as usize];
    let vol = f.path("volume.img");
    std::fs::write(&vol, region).unwrap();
    let v = vol.to_str().unwrap();
    run("cryptsetup", &["isLuks", v]);
    let dump = run("cryptsetup", &["luksDump", v]);
    assert!(dump.contains(&data.luks_uuid), "{dump}");
    assert!(dump.contains("sector: 4096"), "{dump}");
    // The passphrase file's trailing newline is not part of the passphrase.
    std::fs::write(f.path("key"), "tenant secret").unwrap();
    std::fs::write(f.path("wrong"), "tenant secreT").unwrap();
    let key = f.path("key");
    run("cryptsetup", &["open", "--test-passphrase", "--key-file", key.to_str().unwrap(), v]);
    let (ok, _, _) = try_run(
        "cryptsetup",
        &["open", "--test-passphrase", "--key-file", f.path("wrong").to_str().unwrap(), v],
    );
    assert!(!ok, "a wrong passphrase must be rejected");
    let dumped = run(
        "cryptsetup",
        &["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", key.to_str().unwrap(), v],
    );
    let key_hex: String = dumped
        .split("MK dump:")
        .nth(1)
        .expect("volume key in the dump")
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert_eq!(key_hex.len(), 128, "{dumped}");
    let payload_offset = 16 * MIB as usize;
    let plain = decrypt_payload(&region[payload_offset..], &key_hex, 4096);
    let plain_path = f.path("plain.img");
    std::fs::write(&plain_path, &plain).unwrap();
    let p = plain_path.to_str().unwrap();
    run("e2fsck", &["-fn", p]);
    assert_eq!(blkid_tag(p, "TYPE"), "ext4");
    assert_eq!(blkid_tag(p, "UUID"), data.fs_uuid);
    assert_eq!(blkid_tag(p, "LABEL"), "secure");

    // The guest knows the volume but never the key.
    let root = &res.partitions[0];
    let dev = attach_range(&disk, root.offset_bytes, root.size_bytes);
    let crypttab = run("debugfs", &["-R", "cat /etc/crypttab", dev.path()]);
    assert!(crypttab.contains(&format!("secure UUID={} none luks,noauto", data.luks_uuid)), "{crypttab}");
    let fstab = run("debugfs", &["-R", "cat /etc/fstab", dev.path()]);
    assert!(fstab.contains("/dev/mapper/secure /srv/data ext4 noauto,nofail"), "{fstab}");
    assert!(!all.windows(13).any(|w| w == b"tenant secret"), "the passphrase is nowhere on the disk");
}

#[test]
fn boot_layout_without_a_kernel_and_bad_customization_are_refused() {
    let f = Fixture::new();
    let rootfs = f.path("nokernel");
    small_rootfs(&rootfs);
    for k in ["boot/vmlinuz-6.1.0-test", "boot/initrd.img-6.1.0-test"] {
        std::fs::remove_file(rootfs.join(k)).unwrap();
    }
    f.pack(&["--rootfs", rootfs.to_str().unwrap(), "--name", "nokernel", "--version", "1"]);
    let disk = f.path("disk.img");
    dirty_disk(&disk, 256);
    let err = f.provision(&two_partition_spec("nokernel", 256, 64), &disk).unwrap_err();
    assert_eq!(err.code(), Code::InvalidSpec, "{err:?}");
    assert!(err.message.contains("kernel"), "{}", err.message);
    assert!(head_is_zero(&disk), "nothing bootable left behind");

    let bad_host = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"root","role":"ROOT","filesystem":"EXT4"}]},"customize":{"hostname":"-bad_host-"}}"#;
    let err = f.provision(bad_host, &disk).unwrap_err();
    assert_eq!((err.code(), err.step.as_str()), (Code::InvalidSpec, "validate"), "{err:?}");
    assert!(err.message.contains("customize.hostname"), "{}", err.message);
    let bad_key = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"root","role":"ROOT","filesystem":"EXT4"}]},
        "customize":{"users":[{"name":"ops","ssh_authorized_keys":["ssh-ed25519 not-base64 x"]}]}}"#;
    let err = f.provision(bad_key, &disk).unwrap_err();
    assert!(err.message.contains("customize.users[0].ssh_authorized_keys[0]"), "{}", err.message);
    let bad_net = r#"{"name":"x","image":{"name":"tiny","version":"1"},"disk":{"size_mib":256,"partitions":[
        {"label":"root","role":"ROOT","filesystem":"EXT4"}]},
        "customize":{"network":[{"addresses":["10.0.2.300/24"]}]}}"#;
    let err = f.provision(bad_net, &disk).unwrap_err();
    assert!(err.message.contains("customize.network[0].addresses[0]"), "{}", err.message);
}
