//! Resize and Snapshot jobs over real tonic, on disks provisioned by the engine from a real signed store,
//! checked with stock tools (sgdisk, e2fsck, dumpe2fs, blkid, cryptsetup, sha256sum, zstd); and the disk
//! growth underneath them called directly on FAT, swap, LUKS and 4096-byte-sector disks.

mod common;
mod jobs_support;

use std::path::{Path, PathBuf};

use common::{Loop, attach_range, run, try_run};
use gridforge_agent::image::snapshot::{SnapshotRequest, capture};
use gridforge_agent::image::{ImageError, Store, Trust, sign};
use gridforge_agent::provision::resize::{ResizeError, grow_disk};
use gridforge_agent::wipe::CancelToken;
use gridforge_common::progress::Progress;
use gridforge_proto::v1::{
    JobState, ProvisionJob, ResizeJob, SnapshotJob, SubmitJobRequest, VmSpec, error::Code, job::Outcome,
    submit_job_request::Job as JobReq,
};
use jobs_support::*;
use tonic::Code as Status;

/// A raw disk of `size_mib`: GPT with a 4 MiB data partition and an ext4 root holding a small tree
/// (including `/etc/marker`) filling the rest.
fn make_raw_disk(path: &Path, size_mib: u64, tree: &Path) {
    common::small_rootfs(tree);
    std::fs::write(tree.join("etc/marker"), "captured content\n").unwrap();
    std::fs::File::create(path).unwrap().set_len(size_mib * MIB).unwrap();
    let p = path.to_str().unwrap();
    run(
        "sgdisk",
        &["-o", "-n", "1:2048:+4M", "-c", "1:data", "-n", "2:0:0", "-t", "2:8304", "-c", "2:root", p],
    );
    let (first, last) = sectors(p, 2);
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
            &format!("offset={}", first * 512),
            p,
            &format!("{}k", (last - first + 1) * 512 / 1024),
        ],
    );
}

/// First and last sector of a partition, as sgdisk reports them.
fn sectors(disk: &str, number: u32) -> (u64, u64) {
    let info = run("sgdisk", &["-i", &number.to_string(), disk]);
    let field = |name: &str| -> u64 {
        let line = info.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {info}"));
        line[name.len()..].split_whitespace().next().unwrap().parse().unwrap()
    };
    (field("First sector:"), field("Last sector:"))
}

fn partition_guid(disk: &str, number: u32) -> String {
    let info = run("sgdisk", &["-i", &number.to_string(), disk]);
    info.lines().find_map(|l| l.strip_prefix("Partition unique GUID: ")).unwrap().trim().to_string()
}

fn sgdisk_clean(disk: &str) {
    let v = run("sgdisk", &["-v", disk]);
    assert!(v.contains("No problems found"), "sgdisk -v {disk}: {v}");
}

/// Block count times block size of the ext4 file system on `dev`, from `dumpe2fs -h`.
fn ext4_bytes(dev: &str) -> u64 {
    let sb = run("dumpe2fs", &["-h", dev]);
    let field = |name: &str| -> u64 {
        sb.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().parse().unwrap()).unwrap()
    };
    field("Block count:") * field("Block size:")
}

/// A node whose image store holds the raw disk `appliance 1`; its snapshot store is that same store,
/// signed with the same key.
struct Site {
    node: Node,
}

impl Site {
    fn new() -> Self {
        let mut node = Node::new();
        let dir = node.dir.path().to_path_buf();
        let key_path = dir.join("store.key");
        sign::keygen(&key_path).unwrap();
        let key = sign::load_signing_key(&key_path).unwrap();
        let raw = dir.join("appliance.img");
        make_raw_disk(&raw, 32, &dir.join("tree"));
        gridforge_agent::image::pack::pack_raw_disk_image(
            &raw,
            &dir.join("store"),
            "appliance",
            "1",
            &key,
            3,
        )
        .unwrap();
        node.config.images.store = dir.join("store").display().to_string();
        node.config.images.trusted_key = sign::public_key_path(&key_path).display().to_string();
        node.config.images.snapshot_store = dir.join("store");
        node.config.images.snapshot_signing_key = key_path;
        Site { node }
    }

    fn store(&self) -> PathBuf {
        self.node.config.images.snapshot_store.clone()
    }

    fn public_key(&self) -> ed25519_dalek::VerifyingKey {
        sign::parse_trusted_key(&self.node.config.images.trusted_key).unwrap()
    }
}

fn provision_request(key: &str, image: (&str, &str), disk: &Path, size_mib: u64) -> SubmitJobRequest {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": "vm1",
        "image": {"name": image.0, "version": image.1},
        "disk": {"size_mib": size_mib},
    }))
    .unwrap();
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(JobReq::Provision(ProvisionJob { spec: Some(spec), target: device(disk) })),
        ..Default::default()
    }
}

fn resize_request(key: &str, disk: &Path, size_mib: u64) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(JobReq::Resize(ResizeJob { target: device(disk), size_mib })),
        ..Default::default()
    }
}

fn snapshot_request(key: &str, disk: &Path, name: &str, version: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(JobReq::Snapshot(SnapshotJob {
            target: device(disk),
            image_name: name.into(),
            image_version: version.into(),
            notes: "taken by the test".into(),
        })),
        ..Default::default()
    }
}

/// Submit, follow to the end, return the finished job (panics unless it succeeded).
async fn run_job(
    client: &mut gridforge_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    req: SubmitJobRequest,
) -> gridforge_proto::v1::Job {
    let job = client.submit_job(req).await.expect("SubmitJob").into_inner();
    let events = watch_to_end(client, &job.id).await;
    let done = get(client, &job.id).await;
    assert_eq!(done.state(), JobState::Succeeded, "{:?}\n{events:#?}", done.outcome);
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn resize_grows_disk_table_partition_and_ext4() {
    let site = Site::new();
    let (mut client, _) = serve(site.node.open(), &site.node.config).await;
    let disk = site.node.disk("vm1.img");
    let p = disk.to_str().unwrap();
    run_job(&mut client, provision_request("prov", ("appliance", "1"), &disk, 48)).await;
    let data_before = sectors(p, 1);
    let (root_first, root_last_before) = sectors(p, 2);
    let guid_before = partition_guid(p, 2);

    // Not larger, zero, or beyond what a u64 holds: refused at submission, naming the field.
    for (key, mib) in [("same", 48), ("smaller", 32), ("zero", 0), ("huge", u64::MAX)] {
        let err = client.submit_job(resize_request(key, &disk, mib)).await.unwrap_err();
        assert_eq!(err.code(), Status::InvalidArgument, "{mib} MiB: {err:?}");
        assert!(err.message().starts_with("resize.size_mib:"), "{mib} MiB: {}", err.message());
    }

    let done = run_job(&mut client, resize_request("grow", &disk, 96)).await;
    let Some(Outcome::Resize(result)) = &done.outcome else {
        panic!("no resize outcome: {:?}", done.outcome)
    };
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 * MIB);
    assert_eq!(result.disk_size_bytes, 96 * MIB);
    assert!(done.steps.iter().any(|s| s.name == "check"), "{:?}", done.steps);
    assert!(done.steps.iter().any(|s| s.name == "resize"), "{:?}", done.steps);

    sgdisk_clean(p);
    assert!(run("sgdisk", &["-O", p]).contains("0xEE"), "protective MBR kept");
    assert_eq!(sectors(p, 1), data_before, "the first partition is untouched");
    let (first, last) = sectors(p, 2);
    assert_eq!(first, root_first);
    assert!(last > root_last_before);
    // The last partition ends on a 1 MiB boundary within 1 MiB of the disk's end (the backup GPT follows).
    assert_eq!((last + 1) % 2048, 0, "end aligned: {last}");
    let end = (last + 1) * 512;
    assert!((95 * MIB..=96 * MIB - 33 * 512).contains(&end), "ends at {end}");
    assert_eq!(result.partition_size_bytes, (last - first + 1) * 512);
    assert_eq!(partition_guid(p, 2), guid_before, "partition identity kept");

    let dev = attach_range(&disk, first * 512, result.partition_size_bytes);
    run("e2fsck", &["-fn", dev.path()]);
    let fs_bytes = ext4_bytes(dev.path());
    assert_eq!(fs_bytes, result.filesystem_size_bytes);
    assert!(fs_bytes > 88 * MIB && fs_bytes <= result.partition_size_bytes, "ext4 grown: {fs_bytes}");
    assert_eq!(run("debugfs", &["-R", "cat /etc/marker", dev.path()]), "captured content\n");
    drop(dev);

    // Smaller than the disk now is: refused, the disk unchanged.
    let err = client.submit_job(resize_request("shrink", &disk, 64)).await.unwrap_err();
    assert_eq!(err.code(), Status::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("resize.size_mib:"), "{}", err.message());
    assert!(err.message().contains("96 MiB"), "names the current size: {}", err.message());
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 96 * MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_publishes_a_signed_image_that_provisions_the_same_disk() {
    let site = Site::new();
    let (mut client, _) = serve(site.node.open(), &site.node.config).await;
    let disk = site.node.disk("vm1.img");
    let p = disk.to_str().unwrap();
    run_job(&mut client, provision_request("prov", ("appliance", "1"), &disk, 40)).await;

    let done = run_job(&mut client, snapshot_request("snap", &disk, "vm1-golden", "2026.11.29")).await;
    let Some(Outcome::Snapshot(result)) = &done.outcome else {
        panic!("no snapshot outcome: {:?}", done.outcome)
    };
    assert_eq!(result.name, "vm1-golden");
    assert_eq!(result.version, "2026.11.29");
    assert_eq!(result.size_bytes, 40 * MIB);
    assert_eq!(result.store, site.store().display().to_string());
    assert!(done.steps.iter().any(|s| s.name == "read" && s.bytes_done == 40 * MIB), "{:?}", done.steps);

    // The index verifies with the store's public key and lists the snapshot; the blob's digest matches.
    let store = Store::open(site.store().to_str().unwrap(), Trust::Key(site.public_key())).unwrap();
    let entry = store.find("vm1-golden", "2026.11.29").unwrap();
    assert_eq!(entry.sha256, result.sha256);
    assert_eq!(entry.compressed_size, result.compressed_bytes);
    assert_eq!(entry.uncompressed_size, 40 * MIB);
    assert_eq!(entry.notes, "taken by the test");
    assert_eq!(entry.format, gridforge_agent::image::Format::RawDisk);
    assert!(store.find("appliance", "1").is_ok(), "earlier images stay listed");
    let blob = site.store().join(&entry.path);
    let sum = run("sha256sum", &[blob.to_str().unwrap()]);
    assert_eq!(sum.split_whitespace().next().unwrap(), result.sha256);
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), result.compressed_bytes);
    // Plain zstd decodes the blob back to the disk, byte for byte.
    let decoded = site.node.dir.path().join("decoded.img");
    run("zstd", &["-q", "-d", "-f", blob.to_str().unwrap(), "-o", decoded.to_str().unwrap()]);
    assert!(std::fs::read(&decoded).unwrap() == std::fs::read(&disk).unwrap(), "zstd -d gives the disk back");

    // A provision from the snapshot onto a larger disk reproduces it.
    let copy = site.node.disk("vm2.img");
    let c = copy.to_str().unwrap();
    run_job(&mut client, provision_request("prov-copy", ("vm1-golden", "2026.11.29"), &copy, 64)).await;
    sgdisk_clean(c);
    assert_eq!(partition_guid(c, 2), partition_guid(p, 2));
    assert_eq!(sectors(c, 1), sectors(p, 1));
    let (first, last) = sectors(c, 2);
    let original = attach_range(&disk, sectors(p, 2).0 * 512, (sectors(p, 2).1 - sectors(p, 2).0 + 1) * 512);
    let copied = attach_range(&copy, first * 512, (last - first + 1) * 512);
    run("e2fsck", &["-fn", copied.path()]);
    assert_eq!(common::blkid_tag(copied.path(), "UUID"), common::blkid_tag(original.path(), "UUID"));
    assert_eq!(run("debugfs", &["-R", "cat /etc/marker", copied.path()]), "captured content\n");
    assert!(ext4_bytes(copied.path()) > ext4_bytes(original.path()), "grown onto the larger disk");

    // The same name and version again: refused at submission, naming the field.
    let err =
        client.submit_job(snapshot_request("again", &disk, "vm1-golden", "2026.11.29")).await.unwrap_err();
    assert_eq!(err.code(), Status::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("snapshot.image_version:"), "{}", err.message());
    let err = client.submit_job(snapshot_request("bad-name", &disk, "../x", "1")).await.unwrap_err();
    assert_eq!(err.code(), Status::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("snapshot.image_name:"), "{}", err.message());
}

/// Every file under a store with its bytes, to compare a store before and after.
fn store_state(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_refused_or_cancelled_capture_leaves_the_store_as_it_was() {
    let site = Site::new();
    let disk = site.node.sparse_disk("plain.img", 16 * MIB);
    std::fs::write(&disk, vec![0x42u8; MIB as usize]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(16 * MIB).unwrap();
    let key = sign::load_signing_key(&site.node.config.images.snapshot_signing_key).unwrap();
    let before = store_state(&site.store());
    let req = |name: &str, cancel: Option<CancelToken>| SnapshotRequest {
        disk: disk.clone(),
        store_dir: site.store(),
        name: name.into(),
        version: "1".into(),
        notes: String::new(),
        signing_key: key.clone(),
        level: 3,
        cancel,
    };

    let err = capture(&req("appliance", None), &Progress::none()).unwrap_err();
    assert!(matches!(err, ImageError::Exists { .. }), "{err:?}");
    assert!(err.to_string().contains("appliance 1 already exists"), "{err}");
    assert_eq!(store_state(&site.store()), before);

    let cancel = CancelToken::new();
    cancel.cancel();
    let err = capture(&req("new", Some(cancel)), &Progress::none()).unwrap_err();
    assert!(matches!(err, ImageError::Cancelled), "{err:?}");
    assert_eq!(store_state(&site.store()), before, "no blob, temp file or index change left behind");

    // A key that did not sign the store: refused before the disk is read.
    let other = site.node.dir.path().join("other.key");
    sign::keygen(&other).unwrap();
    let mut wrong = req("new", None);
    wrong.signing_key = sign::load_signing_key(&other).unwrap();
    let err = capture(&wrong, &Progress::none()).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err:?}");
    assert_eq!(store_state(&site.store()), before);

    let result = capture(&req("new", None), &Progress::none()).unwrap();
    assert_eq!(result.size_bytes, 16 * MIB);
    assert_eq!(store_state(&site.store()).len(), before.len() + 1, "one new blob");
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_needs_a_configured_store_and_key() {
    let node = Node::new();
    let disk = node.sparse_disk("d.img", 4 * MIB);
    let (mut client, _) = serve(node.open(), &node.config).await;
    let err = client.submit_job(snapshot_request("no-store", &disk, "img", "1")).await.unwrap_err();
    assert_eq!(err.code(), Status::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("images.snapshot_store"), "{}", err.message());

    let mut node = Node::new();
    let disk = node.sparse_disk("d.img", 4 * MIB);
    node.config.images.snapshot_store = node.dir.path().join("snapshots");
    let (mut client, _) = serve(node.open(), &node.config).await;
    let err = client.submit_job(snapshot_request("no-key", &disk, "img", "1")).await.unwrap_err();
    assert_eq!(err.code(), Status::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("images.snapshot_signing_key"), "{}", err.message());
}

// ---- grow_disk directly ----

/// A GPT disk file of `mib` with one partition from 1 MiB to the end; returns the partition's byte range.
fn one_partition_disk(path: &Path, mib: u64, type_code: &str) -> (u64, u64) {
    std::fs::File::create(path).unwrap().set_len(mib * MIB).unwrap();
    let p = path.to_str().unwrap();
    run("sgdisk", &["-o", "-n", "1:2048:0", "-t", &format!("1:{type_code}"), p]);
    let (first, last) = sectors(p, 1);
    (first * 512, (last - first + 1) * 512)
}

#[test]
fn grow_disk_refuses_fat_and_shrinking_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("fat.img");
    let (offset, len) = one_partition_disk(&disk, 40, "ef00");
    {
        let dev = attach_range(&disk, offset, len);
        run("mkfs.fat", &["-F", "32", dev.path()]);
    }
    let before = std::fs::read(&disk).unwrap();
    let err = grow_disk(&disk, 80 * MIB, &Progress::none()).unwrap_err();
    assert!(matches!(err, ResizeError::UnsupportedFilesystem { number: 1, .. }), "{err:?}");
    assert_eq!(err.code(), Code::Layout);
    assert!(err.to_string().contains("FAT"), "{err}");
    assert!(std::fs::read(&disk).unwrap() == before, "the refused disk is unchanged");

    for size in [40 * MIB, 20 * MIB] {
        let err = grow_disk(&disk, size, &Progress::none()).unwrap_err();
        assert!(matches!(err, ResizeError::NotLarger { .. }), "{size}: {err:?}");
        assert_eq!(err.code(), Code::InvalidSpec);
    }
    // Growing by less than the 1 MiB alignment leaves the partition no room: refused before the file grows.
    let err = grow_disk(&disk, 40 * MIB + 4096, &Progress::none()).unwrap_err();
    assert!(matches!(err, ResizeError::NoRoom { .. }), "{err:?}");
    assert!(std::fs::read(&disk).unwrap() == before, "the refused disk is unchanged");
}

#[test]
fn grow_disk_rewrites_swap_and_grows_luks_partitions_only() {
    let dir = tempfile::tempdir().unwrap();
    let swap = dir.path().join("swap.img");
    let (offset, len) = one_partition_disk(&swap, 16, "8200");
    let uuid = "8f4b0a5e-2d53-4d0c-9a57-0c6f0f1e2a3b";
    {
        let dev = attach_range(&swap, offset, len);
        run("mkswap", &["-U", uuid, "-L", "guestswap", dev.path()]);
    }
    let grown = grow_disk(&swap, 48 * MIB, &Progress::none()).unwrap();
    sgdisk_clean(swap.to_str().unwrap());
    assert!(grown.partition_size_bytes > 45 * MIB);
    assert!(grown.filesystem_not_grown.is_none());
    let dev = attach_range(&swap, offset, grown.partition_size_bytes);
    assert_eq!(common::blkid_tag(dev.path(), "UUID"), uuid);
    assert_eq!(common::blkid_tag(dev.path(), "LABEL"), "guestswap");
    assert_eq!(grown.filesystem_size_bytes, grown.partition_size_bytes);
    drop(dev);

    let luks = dir.path().join("luks.img");
    let (offset, len) = one_partition_disk(&luks, 32, "8309");
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, "secret").unwrap();
    {
        let dev = attach_range(&luks, offset, len);
        common::luks_format_fast(dev.path(), keyfile.to_str().unwrap(), &[]);
    }
    let grown = grow_disk(&luks, 64 * MIB, &Progress::none()).unwrap();
    sgdisk_clean(luks.to_str().unwrap());
    assert!(grown.partition_size_bytes > 61 * MIB);
    assert_eq!(grown.filesystem_size_bytes, 0);
    let reason = grown.filesystem_not_grown.expect("says why the volume was not grown");
    assert!(reason.contains("LUKS") && reason.contains("cryptsetup resize"), "{reason}");
    let dev = attach_range(&luks, offset, grown.partition_size_bytes);
    let (ok, out, err) = try_run(
        "cryptsetup",
        &["open", "--test-passphrase", "--key-file", keyfile.to_str().unwrap(), dev.path()],
    );
    assert!(ok, "the LUKS volume still opens: {out}{err}");
}

#[test]
fn grow_disk_on_a_block_device_with_4096_byte_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("4k.img");
    std::fs::File::create(&file).unwrap().set_len(32 * MIB).unwrap();
    let lo = Loop::attach(&file, 4096);
    run("sgdisk", &["-o", "-n", "1:256:0", "-t", "1:8300", lo.path()]);
    let info = run("sgdisk", &["-i", "1", lo.path()]);
    let (first, last) = {
        let f = |name: &str| -> u64 {
            let l = info.lines().find(|l| l.starts_with(name)).unwrap();
            l[name.len()..].split_whitespace().next().unwrap().parse().unwrap()
        };
        (f("First sector:"), f("Last sector:"))
    };
    let len = (last - first + 1) * 4096;
    run(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            &format!("offset={}", first * 4096),
            lo.path(),
            &format!("{}k", len / 1024),
        ],
    );
    // The device must already hold the new size.
    let err = grow_disk(&lo.dev, 64 * MIB, &Progress::none()).unwrap_err();
    assert!(matches!(err, ResizeError::DeviceTooSmall { .. }), "{err:?}");
    assert_eq!(err.code(), Code::Target);

    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(64 * MIB).unwrap();
    run("losetup", &["-c", lo.path()]);
    let grown = grow_disk(&lo.dev, 64 * MIB, &Progress::none()).unwrap();
    assert_eq!(grown.disk_size_bytes, 64 * MIB);
    sgdisk_clean(lo.path());
    assert!(run("sgdisk", &["-O", lo.path()]).contains("0xEE"));
    assert!(grown.partition_size_bytes > 60 * MIB, "{grown:?}");
    let dev = attach_range(&file, first * 4096, grown.partition_size_bytes);
    run("e2fsck", &["-fn", dev.path()]);
    assert_eq!(ext4_bytes(dev.path()), grown.filesystem_size_bytes);
    assert!(grown.filesystem_size_bytes > 60 * MIB);
}

#[tokio::test(flavor = "multi_thread")]
async fn resize_and_snapshot_refuse_the_disk_of_a_running_domain() {
    use gridforge_agent::config::LibvirtConfig;
    use gridforge_agent::hypervisor::{DomainDef, Hypervisor, Libvirt};
    let site = Site::new();
    let disk = site.node.sparse_disk("busy.img", 32 * MIB);
    // libvirt's in-process test driver: the domain "runs" without a VM.
    let cfg = LibvirtConfig {
        uri: "test:///default".into(),
        pool: "default-pool".into(),
        domain_type: "qemu".into(),
        ..Default::default()
    };
    let hv = std::sync::Arc::new(Libvirt::new(&cfg, &site.node.dir.path().join("libvirt")));
    let def = DomainDef {
        name: "busy-vm".into(),
        vcpus: 1,
        memory_mib: 256,
        disk: disk.clone(),
        disk_format: Default::default(),
        nics: Vec::new(),
    };
    hv.define(&def).unwrap();
    hv.start("busy-vm").unwrap();
    let engine = gridforge_agent::jobs::JobEngine::open(
        &site.node.config,
        Some(hv.clone() as std::sync::Arc<dyn Hypervisor>),
    )
    .unwrap();
    let (mut client, _) = serve(engine, &site.node.config).await;

    for req in [resize_request("resize-busy", &disk, 64), snapshot_request("snap-busy", &disk, "busy", "1")] {
        let err = client.submit_job(req).await.unwrap_err();
        assert_eq!(err.code(), Status::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("domain busy-vm is running"), "{}", err.message());
    }

    // Shut off, the same disk can be captured.
    hv.destroy("busy-vm").unwrap();
    let done = run_job(&mut client, snapshot_request("snap-idle", &disk, "idle", "1")).await;
    let Some(Outcome::Snapshot(result)) = &done.outcome else {
        panic!("no snapshot outcome: {:?}", done.outcome)
    };
    assert_eq!(result.size_bytes, 32 * MIB);
    hv.undefine("busy-vm").unwrap();
}
