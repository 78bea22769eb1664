//! Cached provisions of the real Debian 12 image through the CLI: two VMs cloned from one base, checked with
//! the stock tools (sfdisk, sgdisk, blkid, dumpe2fs, e2fsck, debugfs, fsck.vfat) for identifiers of their
//! own; the base kept while clones use it; a failed clone left unbootable; reflink clones on an XFS pool.

mod common;
mod common_store;
mod common_vm;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common_store::{Store, agent, output_text as text};
use gridforge_proto::v1::{ProvisionMode, ProvisionResult, partition::Role};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

fn output(cmd: &mut Command) -> Output {
    cmd.output().expect("gridforge-agent runs")
}

fn base(store: &Store, args: &[&str]) -> Output {
    output(agent().arg("base").args(args).arg("--bases").arg(&store.bases))
}

fn debian(dir: &Path, bases: &Path) -> Store {
    let rootfs = common_vm::image_rootfs("debian-12-minimal", "GRIDFORGE_DEBIAN_ROOTFS");
    Store { bases: bases.to_path_buf(), ..Store::pack(dir, &rootfs) }
}

fn spec(name: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": {"name": "debian-12-minimal", "version": "1"},
        "provision_mode": "PROVISION_CACHED",
        "disk": {"size_mib": 3072, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "swap", "role": "SWAP", "size_mib": 64, "filesystem": "SWAP"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {
            "hostname": name,
            "users": [{"name": "ops", "groups": ["sudo"]}],
            "files": [{"path": "/etc/motd", "content": format!("this is {name}\n"), "mode": "0644"}]
        }
    })
}

fn part(res: &ProvisionResult, role: Role) -> &gridforge_proto::v1::PartitionResult {
    res.partitions.iter().find(|p| p.role == role as i32).unwrap_or_else(|| panic!("no {role:?} in {res:?}"))
}

/// `debugfs -R "cat PATH"` on the root file system of a disk.
fn guest_file(disk: &Path, root_offset: u64, path: &str) -> String {
    let target = format!("{}?offset={root_offset}", disk.display());
    common::run("debugfs", &["-R", &format!("cat {path}"), &target])
}

fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the stock tools say identifies a disk and its file systems.
#[derive(Debug)]
struct Identity {
    disk_guid: String,
    part_guids: Vec<String>,
    fs_ids: Vec<String>,
    machine_id: String,
}

fn identity_of(disk: &Path, res: &ProvisionResult) -> Identity {
    let d = disk.to_str().unwrap();
    let dump = common::run("sfdisk", &["--dump", d]);
    let disk_guid = dump.lines().find_map(|l| l.strip_prefix("label-id: ")).expect("label-id").to_lowercase();
    let part_guids: Vec<String> = dump
        .lines()
        .filter_map(|l| l.split("uuid=").nth(1))
        .map(|s| s.split(',').next().unwrap().trim().to_lowercase())
        .collect();
    assert_eq!(part_guids.len(), 3, "{dump}");
    let sgdisk = common::run("sgdisk", &["-v", d]);
    assert!(sgdisk.contains("No problems found"), "sgdisk -v {d}: {sgdisk}");
    assert_eq!(disk_guid, res.disk_guid.to_lowercase());

    let mut fs_ids = Vec::new();
    for p in &res.partitions {
        let blkid =
            common::run("blkid", &["-p", "-o", "value", "-s", "UUID", "-O", &p.offset_bytes.to_string(), d]);
        assert_eq!(blkid.trim(), p.fs_uuid, "blkid of partition {} of {d}", p.number);
        fs_ids.push(p.fs_uuid.clone());
    }
    let root = part(res, Role::Root);
    let target = format!("{d}?offset={}", root.offset_bytes);
    let e2fsck = common::try_run("e2fsck", &["-fn", &target]);
    assert!(e2fsck.0, "e2fsck -fn {target}: {}{}", e2fsck.1, e2fsck.2);
    let dumpe2fs = common::run("dumpe2fs", &["-h", &target]);
    assert!(dumpe2fs.contains(&format!("Filesystem UUID:          {}", root.fs_uuid)), "{dumpe2fs}");
    let esp = part(res, Role::Esp);
    let esp_dev = common::attach_range(disk, esp.offset_bytes, esp.size_bytes);
    let fsck = common::try_run("fsck.vfat", &["-n", esp_dev.path()]);
    assert!(fsck.0, "fsck.vfat -n: {}{}", fsck.1, fsck.2);

    let machine_id = guest_file(disk, root.offset_bytes, "/etc/machine-id").trim().to_string();
    assert!(
        machine_id.len() == 32 && machine_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "machine-id of {d}: {machine_id:?}"
    );
    let ssh = common::run("debugfs", &["-R", "ls /etc/ssh", &target]);
    assert!(!ssh.contains("ssh_host_"), "{d} carries ssh host keys (they must be made at first boot): {ssh}");
    let fstab = guest_file(disk, root.offset_bytes, "/etc/fstab");
    for p in &res.partitions {
        assert!(fstab.contains(&format!("UUID={} ", p.fs_uuid)), "fstab of {d} lacks {}: {fstab}", p.fs_uuid);
    }
    Identity { disk_guid, part_guids, fs_ids, machine_id }
}

#[test]
fn two_vms_cloned_from_one_base_have_identifiers_of_their_own() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let site = debian(dir.path(), &dir.path().join("bases"));
    let (a, b) = (dir.path().join("vm-a.img"), dir.path().join("vm-b.img"));
    let ra = site.provision(&spec("vm-a"), &a);
    let rb = site.provision(&spec("vm-b"), &b);
    for r in [&ra, &rb] {
        assert_eq!(r.mode, ProvisionMode::ProvisionCached as i32);
        assert!(!r.base_id.is_empty() && !r.clone_method.is_empty(), "{r:?}");
    }
    assert_eq!(ra.base_id, rb.base_id, "one base for one image and layout");

    let (ia, ib) = (identity_of(&a, &ra), identity_of(&b, &rb));
    assert_ne!(ia.disk_guid, ib.disk_guid);
    assert_ne!(ia.machine_id, ib.machine_id);
    let mut all = BTreeSet::new();
    for id in ia.part_guids.iter().chain(&ib.part_guids).chain(&ia.fs_ids).chain(&ib.fs_ids) {
        assert!(all.insert(id.clone()), "{id} appears twice: {ia:?} {ib:?}");
    }
    // The same partitions in the same places: only identifiers differ.
    let places =
        |r: &ProvisionResult| r.partitions.iter().map(|p| (p.offset_bytes, p.size_bytes)).collect::<Vec<_>>();
    assert_eq!(places(&ra), places(&rb));
    let root_a = part(&ra, Role::Root).offset_bytes;
    assert_eq!(guest_file(&a, root_a, "/etc/hostname"), "vm-a\n");
    assert_eq!(guest_file(&b, root_a, "/etc/hostname"), "vm-b\n");
    assert_eq!(guest_file(&b, root_a, "/etc/motd"), "this is vm-b\n");
    assert!(guest_file(&b, root_a, "/etc/passwd").contains("\nops:x:1000:"));

    // The base is read-only, unchanged by its clones, and cannot be deleted while they hold it.
    let list = base(&site, &["list"]);
    let listing = text(&list);
    assert!(listing.contains(&ra.base_id) && listing.contains("2 clone(s)"), "{listing}");
    let base_disk = dir.path().join("bases").join(&ra.base_id).join("disk.raw");
    assert_eq!(std::fs::metadata(&base_disk).unwrap().mode() & 0o777, 0o444);
    let base_digest = sha256_file(&base_disk);
    let refused = base(&site, &["delete", &ra.base_id]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("in use by 2 disk(s)"), "{}", text(&refused));

    // Wiping a clone wipes that VM's disk only.
    let key = dir.path().join("signing.key");
    let report = dir.path().join("wipe-a.json");
    let wiped = output(
        agent()
            .args(["wipe", "--method", "zero", "--verify", "full", "--disk"])
            .arg(&a)
            .arg("--report")
            .arg(&report)
            .arg("--signing-key")
            .arg(&key)
            .arg("--pool")
            .arg(dir.path()),
    );
    assert!(wiped.status.success(), "wipe: {}", text(&wiped));
    let mut head = vec![0u8; MIB as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&a).unwrap(), &mut head, root_a).unwrap();
    assert!(head.iter().all(|&b| b == 0), "the wiped clone still holds its root file system");
    assert_eq!(sha256_file(&base_disk), base_digest, "wiping a clone changed the base");
    let e2fsck = common::try_run("e2fsck", &["-fn", &format!("{}?offset={root_a}", base_disk.display())]);
    assert!(e2fsck.0, "the base after wiping a clone: {}", e2fsck.1);

    let refused = base(&site, &["delete", &ra.base_id]);
    assert!(text(&refused).contains("in use by 1 disk(s)"), "{}", text(&refused));
    std::fs::remove_file(&b).unwrap();
    let deleted = base(&site, &["delete", &ra.base_id]);
    assert!(deleted.status.success(), "{}", text(&deleted));
    assert!(!base_disk.exists());
}

/// Provisions a spec whose user is in a missing group onto the existing `disk`: the provision fails naming
/// the group and leaves the disk's first MiB zero. Returns the spec.
fn fails_with_no_such_group(site: &Store, disk: &Path) -> serde_json::Value {
    let mut bad = spec("vm-bad");
    bad["customize"]["users"] = serde_json::json!([{"name": "ops", "groups": ["no-such-group"]}]);
    let out = site.provision_output(&bad, disk);
    assert!(!out.status.success(), "a user in a missing group must fail the provision");
    assert!(text(&out).contains("no-such-group"), "{}", text(&out));
    let mut head = vec![1u8; MIB as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(disk).unwrap(), &mut head, 0).unwrap();
    assert!(head.iter().all(|&b| b == 0), "the failed target {} has a non-zero first MiB", disk.display());
    bad
}

#[test]
fn a_failed_cached_provision_leaves_no_bootable_disk() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let site = debian(dir.path(), &dir.path().join("bases"));
    // An existing disk holding something bootable-looking: after the failure its first MiB must be zero.
    let disk = dir.path().join("old.img");
    std::fs::write(&disk, vec![0xAB; 2 * MIB as usize]).unwrap();
    std::fs::File::options().write(true).open(&disk).unwrap().set_len(3072 * MIB).unwrap();
    let bad = fails_with_no_such_group(&site, &disk);
    // A disk the provision created is removed; the base stays complete and usable.
    let fresh = dir.path().join("fresh.img");
    assert!(!site.provision_output(&bad, &fresh).status.success());
    assert!(!fresh.exists(), "the failed provision left {fresh:?} behind");
    let good = site.provision(&spec("vm-good"), &fresh);
    identity_of(&fresh, &good);

    // What a base cannot hold is refused up front when the spec asks for a cached provision.
    let mut encrypted = spec("vm-crypt");
    encrypted["disk"]["partitions"][1] = serde_json::json!({"label": "data", "role": "DATA", "size_mib": 64,
        "filesystem": "EXT4", "encryption": {"passphrase": "pw", "kdf": "argon2id-fast"}});
    let out = site.provision_output(&encrypted, &dir.path().join("crypt.img"));
    assert!(!out.status.success());
    assert!(text(&out).contains("a base cannot hold a VM's keys"), "{}", text(&out));
}

/// Bytes allocated on the file system holding `dir` (statvfs).
fn used_bytes(dir: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(dir).unwrap();
    (s.blocks() - s.blocks_free()) * s.fragment_size()
}

#[test]
fn clones_on_an_xfs_pool_are_reflinks_that_use_a_few_percent_of_the_base() {
    common_vm::require_tool("mkfs.xfs", "xfsprogs");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = dir.path().join("pool.xfs");
    std::fs::File::create(&image).unwrap().set_len(6 << 30).unwrap();
    common::run("mkfs.xfs", &["-q", "-m", "reflink=1", image.to_str().unwrap()]);
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    let dev = common::attach_range(&image, 0, 6 << 30);
    common::run("mount", &[dev.path(), pool.to_str().unwrap()]);
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&pool);

    let site = debian(dir.path(), &pool.join(".bases"));
    let first = site.provision(&spec("vm-1"), &pool.join("vm-1.img"));
    assert_eq!(first.clone_method, "reflink");
    let base_disk = pool.join(".bases").join(&first.base_id).join("disk.raw");
    let base_used = std::fs::metadata(&base_disk).unwrap().blocks() * 512;
    common::run("sync", &[]);
    let before = used_bytes(&pool);
    let second = site.provision(&spec("vm-2"), &pool.join("vm-2.img"));
    common::run("sync", &[]);
    let per_vm = used_bytes(&pool) - before;
    assert_eq!(second.clone_method, "reflink");
    identity_of(&pool.join("vm-2.img"), &second);
    eprintln!("base {} MiB allocated, one more clone {} KiB", base_used / MIB, per_vm / 1024);
    assert!(
        per_vm * 20 <= base_used,
        "a clone took {per_vm} bytes of the pool, more than 5% of the base's {base_used}"
    );

    // Wiping the clone overwrites the VM's own blocks on the pool (O_DIRECT zero-write: XFS overwrites an
    // extent no longer shared in place) and never the base's.
    let base_digest = sha256_file(&base_disk);
    let pool_image = image.to_str().unwrap().to_string();
    let marker = "this is vm-2";
    common::run("sync", &[]);
    assert!(
        common::try_run("grep", &["-qa", marker, &pool_image]).0,
        "the clone's own data is not on the pool"
    );
    let wiped = output(
        agent()
            .args(["wipe", "--method", "zero-write", "--verify", "sample", "--disk"])
            .arg(pool.join("vm-2.img"))
            .arg("--report")
            .arg(dir.path().join("wipe.json"))
            .arg("--signing-key")
            .arg(dir.path().join("signing.key"))
            .arg("--pool")
            .arg(&pool),
    );
    assert!(wiped.status.success(), "wipe: {}", text(&wiped));
    common::run("sync", &[]);
    assert!(
        !common::try_run("grep", &["-qa", marker, &pool_image]).0,
        "the wiped clone's data is still on the pool"
    );
    assert_eq!(sha256_file(&base_disk), base_digest, "wiping a clone changed the base");
    let listing = text(&base(&site, &["list"]));
    assert!(listing.contains("1 clone(s)"), "after wiping vm-2 only vm-1 holds the base: {listing}");
}

#[test]
fn a_block_device_gets_the_base_copied_and_everything_else_zeroed() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let site = debian(dir.path(), &dir.path().join("bases"));
    let first = site.provision(&spec("vm-file"), &dir.path().join("vm-file.img"));
    // A device that held something else: random bytes at its start and in the middle of the root partition,
    // where the base has a hole.
    let backing = dir.path().join("device.img");
    let file = std::fs::File::create(&backing).unwrap();
    file.set_len(3072 * MIB).unwrap();
    let junk: Vec<u8> = (0..MIB).map(|i| (i * 7 + 3) as u8).collect();
    let root = part(&first, Role::Root);
    let middle = root.offset_bytes + root.size_bytes / 2;
    for at in [0, middle] {
        std::os::unix::fs::FileExt::write_all_at(&file, &junk, at).unwrap();
    }
    drop(file);
    let dev = common::Loop::attach(&backing, 512);
    let res = site.provision(&spec("vm-dev"), &dev.dev);
    assert_eq!(res.clone_method, "copy");
    assert_eq!(res.base_id, first.base_id);
    identity_of(&dev.dev, &res);
    let mut back = vec![1u8; MIB as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&dev.dev).unwrap(), &mut back, middle)
        .unwrap();
    assert!(back.iter().all(|&b| b == 0), "the device's old bytes survived where the base has none");
}

/// `qemu-img info --output=json` of `path`.
fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = common::run("qemu-img", &["info", "--output=json", "-U", path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap()
}

/// A raw copy of the guest view of an overlay, made by qemu-img, for the raw-disk tools.
fn raw_copy(overlay: &Path, raw: &Path) {
    common::run(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", overlay.to_str().unwrap(), raw.to_str().unwrap()],
    );
}

#[test]
fn overlay_clones_on_a_pool_without_reflinks_hold_a_few_percent_of_the_base() {
    common_vm::require_tool("qemu-storage-daemon", "qemu-system-common");
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut site = debian(dir.path(), &dir.path().join("bases"));
    site.provision_args = vec!["--clone-fallback".into(), "overlay".into()];
    let (a, b) = (dir.path().join("vm-a.qcow2"), dir.path().join("vm-b.qcow2"));
    let ra = site.provision(&spec("vm-a"), &a);
    let rb = site.provision(&spec("vm-b"), &b);
    assert_eq!(ra.base_id, rb.base_id);
    let base_disk = dir.path().join("bases").join(&ra.base_id).join("disk.raw");
    for (r, disk) in [(&ra, &a), (&rb, &b)] {
        assert_eq!(r.clone_method, "overlay", "{r:?}");
        let info = qemu_img_info(disk);
        assert_eq!(info["format"], "qcow2", "{info}");
        assert_eq!(info["backing-filename"], base_disk.to_str().unwrap(), "{info}");
        assert_eq!(info["backing-filename-format"], "raw", "{info}");
        assert_eq!(info["virtual-size"], 3072 * MIB, "{info}");
        let check = common::try_run("qemu-img", &["check", disk.to_str().unwrap()]);
        assert!(check.0, "qemu-img check {}: {}{}", disk.display(), check.1, check.2);
    }

    // What an unchanged (customized only) VM adds to the pool: its overlay's allocated blocks.
    let base_used = std::fs::metadata(&base_disk).unwrap().blocks() * 512;
    let per_vm = std::fs::metadata(&b).unwrap().blocks() * 512;
    eprintln!("base {} MiB allocated, one overlay clone {} KiB", base_used / MIB, per_vm / 1024);
    assert!(
        per_vm * 20 <= base_used,
        "an overlay holds {per_vm} bytes, more than 5% of the base's {base_used}"
    );

    // The guest views, checked with the raw-disk tools: identifiers of their own, customized.
    let (raw_a, raw_b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
    raw_copy(&a, &raw_a);
    raw_copy(&b, &raw_b);
    let (ia, ib) = (identity_of(&raw_a, &ra), identity_of(&raw_b, &rb));
    assert_ne!(ia.disk_guid, ib.disk_guid);
    assert_ne!(ia.machine_id, ib.machine_id);
    let mut all = BTreeSet::new();
    for id in ia.part_guids.iter().chain(&ib.part_guids).chain(&ia.fs_ids).chain(&ib.fs_ids) {
        assert!(all.insert(id.clone()), "{id} appears twice: {ia:?} {ib:?}");
    }
    let root = part(&rb, Role::Root).offset_bytes;
    assert_eq!(guest_file(&raw_b, root, "/etc/hostname"), "vm-b\n");
    assert_eq!(guest_file(&raw_b, root, "/etc/motd"), "this is vm-b\n");
    std::fs::remove_file(&raw_a).unwrap();
    std::fs::remove_file(&raw_b).unwrap();

    // The base is never written by its overlays; it cannot go while they use it; wiping an overlay
    // overwrites that VM's own clusters only, and then it no longer holds the base.
    let base_digest = sha256_file(&base_disk);
    assert_eq!(std::fs::metadata(&base_disk).unwrap().mode() & 0o777, 0o444);
    let refused = base(&site, &["delete", &ra.base_id]);
    assert!(text(&refused).contains("in use by 2 disk(s)"), "{}", text(&refused));
    let marker = "this is vm-a";
    assert!(
        common::try_run("grep", &["-qa", marker, a.to_str().unwrap()]).0,
        "vm-a's motd is in its overlay"
    );
    let wiped = output(
        agent()
            .args(["wipe", "--method", "random", "--verify", "sample", "--disk"])
            .arg(&a)
            .arg("--report")
            .arg(dir.path().join("wipe-a.json"))
            .arg("--signing-key")
            .arg(dir.path().join("signing.key"))
            .arg("--pool")
            .arg(dir.path()),
    );
    assert!(wiped.status.success(), "wipe: {}", text(&wiped));
    assert!(
        !common::try_run("grep", &["-qa", marker, a.to_str().unwrap()]).0,
        "the wiped overlay keeps vm-a's data"
    );
    assert_eq!(sha256_file(&base_disk), base_digest, "wiping an overlay changed the base");
    let listing = text(&base(&site, &["list"]));
    assert!(listing.contains("1 clone(s)"), "after wiping vm-a only vm-b holds the base: {listing}");

    // A failure while the overlay is customized leaves it unbootable (its qcow2 header zeroed) and no export.
    fails_with_no_such_group(&site, &b);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let work = dir.path().join("work");
    assert!(!mounts.contains(work.to_str().unwrap()), "an export is still mounted in {}", work.display());
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with("export-")), "left in work: {left:?}");

    let listing = text(&base(&site, &["list"]));
    assert!(listing.contains("0 clone(s)"), "no disk holds the base now: {listing}");
    std::fs::remove_file(&b).unwrap();
    let deleted = base(&site, &["delete", &ra.base_id]);
    assert!(deleted.status.success(), "{}", text(&deleted));
}
