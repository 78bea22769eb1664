//! Provision jobs over real tonic on an agent configured with `images.provision_mode = "cached"`: each job's
//! disk is a clone of one base, with identifiers of its own (checked with sfdisk, blkid, dumpe2fs, e2fsck and
//! debugfs); a spec asking for PROVISION_FULL is provisioned in full.

mod common;
mod jobs_support;

use std::path::Path;

use common::{run, try_run};
use gridforge_agent::image::{index::Kind, pack::pack_rootfs, sign};
use gridforge_proto::v1::{
    DeleteBaseJob, DiagnosticsRequest, ProvisionJob, ProvisionMode, ProvisionResult, SubmitJobRequest,
    VmSpec, job::Outcome, submit_job_request::Job as JobReq,
};
use jobs_support::*;

fn provision_request(name: &str, disk: &Path, mode: Option<&str>) -> SubmitJobRequest {
    request(name, disk, mode, "root")
}

fn request(name: &str, disk: &Path, mode: Option<&str>, root_label: &str) -> SubmitJobRequest {
    let mut spec = serde_json::json!({
        "name": name,
        "image": {"name": "tiny", "version": "1"},
        "disk": {"size_mib": 96, "partitions": [
            {"label": "data", "role": "DATA", "size_mib": 16, "filesystem": "EXT4", "mount_point": "/srv"},
            {"label": root_label, "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {"hostname": name}
    });
    if let Some(mode) = mode {
        spec["provision_mode"] = mode.into();
    }
    let spec: VmSpec = serde_json::from_value(spec).unwrap();
    SubmitJobRequest {
        idempotency_key: format!("provision-{name}"),
        job: Some(JobReq::Provision(ProvisionJob { spec: Some(spec), target: device(disk) })),
        ..Default::default()
    }
}

async fn provision(
    client: &mut gridforge_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    req: SubmitJobRequest,
) -> ProvisionResult {
    let job = client.submit_job(req).await.expect("SubmitJob").into_inner();
    let events = watch_to_end(client, &job.id).await;
    match get(client, &job.id).await.outcome {
        Some(Outcome::Provision(r)) => r,
        other => panic!("provision job: {other:?}\n{events:#?}"),
    }
}

/// The disk's GPT disk GUID and, per partition, its GUID and file system UUID, as the stock tools read them.
fn identifiers(disk: &Path, res: &ProvisionResult) -> Vec<String> {
    let d = disk.to_str().unwrap();
    let dump = run("sfdisk", &["--dump", d]);
    let mut ids = vec![dump.lines().find_map(|l| l.strip_prefix("label-id: ")).unwrap().to_lowercase()];
    assert_eq!(ids[0], res.disk_guid.to_lowercase());
    for p in &res.partitions {
        let target = format!("{d}?offset={}", p.offset_bytes);
        let (ok, out, err) = try_run("e2fsck", &["-fn", &target]);
        assert!(ok, "e2fsck -fn {target}: {out}{err}");
        let dumpe2fs = run("dumpe2fs", &["-h", &target]);
        assert!(dumpe2fs.contains(&format!("Filesystem UUID:          {}", p.fs_uuid)), "{dumpe2fs}");
        let blkid = run("blkid", &["-p", "-o", "value", "-s", "UUID", "-O", &p.offset_bytes.to_string(), d]);
        assert_eq!(blkid.trim(), p.fs_uuid);
        ids.push(p.partition_guid.to_lowercase());
        ids.push(p.fs_uuid.clone());
    }
    assert!(dump.contains(&format!("uuid={}", res.partitions[0].partition_guid.to_uppercase())), "{dump}");
    ids
}

/// A node whose store holds the tiny image (signed with `<dir>/store.key`), configured for cached provisions.
fn tiny_cached_node() -> Node {
    let mut node = Node::new();
    let dir = node.dir.path().to_path_buf();
    common::small_rootfs(&dir.join("tree"));
    let key_path = dir.join("store.key");
    sign::keygen(&key_path).unwrap();
    let key = sign::load_signing_key(&key_path).unwrap();
    pack_rootfs(&dir.join("tree"), &dir.join("store"), "tiny", "1", Kind::Os, &key, 3).unwrap();
    node.config.images.store = dir.join("store").display().to_string();
    node.config.images.trusted_key = sign::public_key_path(&key_path).display().to_string();
    node.config.images.provision_mode = "cached".into();
    node
}

/// [`tiny_cached_node`], serving jobs.
async fn cached_node() -> (Node, gridforge_proto::v1::agent_client::AgentClient<tonic::transport::Channel>) {
    let node = tiny_cached_node();
    let (client, _) = serve(node.open(), &node.config).await;
    (node, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_base_that_cannot_be_made_leaves_no_base_and_an_unbootable_disk() {
    let (node, mut client) = cached_node().await;
    let disk = node.sparse_disk("a.img", 96 * MIB);
    std::fs::write(&disk, vec![0xAB; MIB as usize]).unwrap();
    std::fs::File::options().write(true).open(&disk).unwrap().set_len(96 * MIB).unwrap();
    // mke2fs refuses a label over 16 bytes, which GPT accepts: the base fails at its root file system.
    let req = request("vm-a", &disk, None, "a-root-label-of-26-bytes");
    let job = client.submit_job(req).await.expect("SubmitJob").into_inner();
    watch_to_end(&mut client, &job.id).await;
    let done = get(&mut client, &job.id).await;
    let err = job_error(&done);
    assert_eq!(err.step, "format", "{err:?}");
    assert!(err.message.contains("a-root-label-of-26-bytes"), "{err:?}");
    assert!(head(&disk, MIB as usize).iter().all(|&b| b == 0), "the failed target's first MiB is not zeroed");
    let bases = node.dir.path().join("bases");
    let left: Vec<_> = std::fs::read_dir(&bases)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed base left {left:?} in {}", bases.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_configured_for_cached_provisions_clones_one_base_per_image() {
    let (node, mut client) = cached_node().await;
    let dir = node.dir.path().to_path_buf();
    let (a, b, c) = (
        node.sparse_disk("a.img", 96 * MIB),
        node.sparse_disk("b.img", 96 * MIB),
        node.sparse_disk("c.img", 96 * MIB),
    );
    let ra = provision(&mut client, provision_request("vm-a", &a, None)).await;
    let rb = provision(&mut client, provision_request("vm-b", &b, None)).await;
    for r in [&ra, &rb] {
        assert_eq!(r.mode, ProvisionMode::ProvisionCached as i32, "{r:?}");
    }
    assert!(!ra.base_id.is_empty());
    assert_eq!(ra.base_id, rb.base_id);
    assert!(dir.join("bases").join(&ra.base_id).join("disk.raw").is_file());
    let (ia, ib) = (identifiers(&a, &ra), identifiers(&b, &rb));
    for id in &ia {
        assert!(!ib.contains(id), "{id} is on both clones: {ia:?} {ib:?}");
    }
    for (disk, res, name) in [(&a, &ra, "vm-a"), (&b, &rb, "vm-b")] {
        let root = res.partitions.iter().find(|p| p.label == "root").unwrap();
        let target = format!("{}?offset={}", disk.display(), root.offset_bytes);
        assert_eq!(run("debugfs", &["-R", "cat /etc/hostname", &target]), format!("{name}\n"));
        let fstab = run("debugfs", &["-R", "cat /etc/fstab", &target]);
        assert!(fstab.contains(&format!("UUID={} /srv ext4", res.partitions[0].fs_uuid)), "{fstab}");
    }

    let rc = provision(&mut client, provision_request("vm-c", &c, Some("PROVISION_FULL"))).await;
    assert_eq!(rc.mode, ProvisionMode::ProvisionFull as i32);
    assert!(rc.base_id.is_empty(), "a full provision came from base {}", rc.base_id);
    identifiers(&c, &rc);
}

/// `qemu-img info --output=json` of `path`.
fn qemu_img_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&run("qemu-img", &["info", "--output=json", "-U", path.to_str().unwrap()])).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn overlay_clones_are_defined_as_qcow2_and_grow_and_capture_through_their_raw_view() {
    use gridforge_agent::config::LibvirtConfig;
    use gridforge_agent::hypervisor::{Hypervisor, Libvirt};
    use gridforge_proto::v1::{Machine, ResizeJob, SnapshotJob};
    let mut node = tiny_cached_node();
    let dir = node.dir.path().to_path_buf();
    node.config.images.snapshot_store = dir.join("store");
    node.config.images.snapshot_signing_key = dir.join("store.key");
    node.config.images.clone_fallback = "overlay".into();
    // libvirt's in-process test driver: the domain is defined from the agent's XML without a VM.
    let cfg = LibvirtConfig {
        uri: "test:///default".into(),
        pool: "default-pool".into(),
        domain_type: "qemu".into(),
        ..Default::default()
    };
    let hv = std::sync::Arc::new(Libvirt::new(&cfg, &dir.join("libvirt")));
    let engine = gridforge_agent::jobs::JobEngine::open(&node.config, Some(hv.clone() as _)).unwrap();
    let (mut client, _) = serve(engine, &node.config).await;

    // The base first (a raw clone target), then the overlay with a domain.
    provision(&mut client, provision_request("vm-0", &node.sparse_disk("vm-0.img", 96 * MIB), None)).await;
    let disk = node.sparse_disk("vm-1.qcow2", 96 * MIB);
    let mut req = provision_request("vm-1", &disk, None);
    if let Some(JobReq::Provision(p)) = &mut req.job {
        p.spec.as_mut().unwrap().machine = Some(Machine { vcpus: 1, memory_mib: 256, ..Default::default() });
    }
    let res = provision(&mut client, req).await;
    assert_eq!(res.clone_method, "overlay", "{res:?}");
    let info = qemu_img_info(&disk);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 96 * MIB, "{info}");
    assert_eq!(hv.domain_disk("vm-1").unwrap(), disk, "the domain is defined on the overlay");
    assert!(std::fs::metadata(&disk).unwrap().len() < 8 * MIB, "the overlay file is small");

    // Resize grows the qcow2 image's virtual size, the last partition and its ext4, through the export.
    let resize = SubmitJobRequest {
        idempotency_key: "grow".into(),
        job: Some(JobReq::Resize(ResizeJob { target: device(&disk), size_mib: 160 })),
        ..Default::default()
    };
    let job = client.submit_job(resize).await.expect("SubmitJob").into_inner();
    let events = watch_to_end(&mut client, &job.id).await;
    let done = get(&mut client, &job.id).await;
    assert!(matches!(done.outcome, Some(Outcome::Resize(_))), "{:?}\n{events:#?}", done.outcome);
    assert_eq!(qemu_img_info(&disk)["virtual-size"], 160 * MIB);
    let (ok, out, err) = try_run("qemu-img", &["check", disk.to_str().unwrap()]);
    assert!(ok, "qemu-img check: {out}{err}");
    let raw = dir.join("vm-1.raw");
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", disk.to_str().unwrap(), raw.to_str().unwrap()]);
    assert!(run("sgdisk", &["-v", raw.to_str().unwrap()]).contains("No problems found"));
    let root = res.partitions.iter().find(|p| p.label == "root").unwrap();
    let target = format!("{}?offset={}", raw.display(), root.offset_bytes);
    let (ok, out, err) = try_run("e2fsck", &["-fn", &target]);
    assert!(ok, "e2fsck -fn of the grown root: {out}{err}");
    let blocks = run("dumpe2fs", &["-h", &target]);
    let count: u64 = blocks
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    assert!(count * 4096 > 120 * MIB, "the root ext4 grew: {count} blocks");
    assert_eq!(run("debugfs", &["-R", "cat /etc/hostname", &target]), "vm-1\n");

    // A snapshot captures the guest view (what qemu-img converts it to), not the qcow2 file.
    let snapshot = SubmitJobRequest {
        idempotency_key: "snap".into(),
        job: Some(JobReq::Snapshot(SnapshotJob {
            target: device(&disk),
            image_name: "vm-1-golden".into(),
            image_version: "1".into(),
            notes: String::new(),
        })),
        ..Default::default()
    };
    let job = client.submit_job(snapshot).await.expect("SubmitJob").into_inner();
    let events = watch_to_end(&mut client, &job.id).await;
    let done = get(&mut client, &job.id).await;
    let Some(Outcome::Snapshot(snap)) = &done.outcome else { panic!("{:?}\n{events:#?}", done.outcome) };
    assert_eq!(snap.size_bytes, 160 * MIB);
    let blob = dir.join("store").join("blobs/sha256").join(&snap.sha256);
    let decoded = dir.join("decoded.raw");
    run("zstd", &["-q", "-d", "-f", blob.to_str().unwrap(), "-o", decoded.to_str().unwrap()]);
    assert!(
        std::fs::read(&decoded).unwrap() == std::fs::read(&raw).unwrap(),
        "the snapshot is the guest view"
    );
    hv.undefine("vm-1").unwrap();

    // The base over the API: listed by Diagnostics with its clones, deleted by a job only once none is left.
    let report = client.diagnostics(DiagnosticsRequest::default()).await.unwrap().into_inner();
    assert_eq!(report.bases.len(), 1, "{:?}", report.bases);
    let listed = &report.bases[0];
    assert_eq!(listed.id, res.base_id);
    assert_eq!(listed.images, ["tiny:1"]);
    assert!(listed.allocated_bytes > 0 && listed.disk_size_bytes == 96 * MIB, "{listed:?}");
    let a = node.disk("vm-0.img").display().to_string();
    assert_eq!(listed.clones, [a, disk.display().to_string()]);
    let delete = |key: &str, id: &str| SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(JobReq::DeleteBase(DeleteBaseJob { base_id: id.into() })),
        ..Default::default()
    };
    let err = client.submit_job(delete("bad", "../x")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("delete_base.base_id:"), "{}", err.message());
    let err = client.submit_job(delete("unknown", &"0".repeat(32))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    let job = client.submit_job(delete("in-use", &res.base_id)).await.unwrap().into_inner();
    watch_to_end(&mut client, &job.id).await;
    let err = job_error(&get(&mut client, &job.id).await).clone();
    assert_eq!(err.code(), gridforge_proto::v1::error::Code::Target, "{err:?}");
    assert!(err.message.contains("in use by 2 disk(s)"), "{err:?}");
    assert!(
        dir.join("bases").join(&res.base_id).join("disk.raw").is_file(),
        "a refused delete kept the base"
    );
    std::fs::remove_file(node.disk("vm-0.img")).unwrap();
    std::fs::remove_file(&disk).unwrap();
    let job = client.submit_job(delete("free", &res.base_id)).await.unwrap().into_inner();
    let events = watch_to_end(&mut client, &job.id).await;
    let done = get(&mut client, &job.id).await;
    let Some(Outcome::DeleteBase(gone)) = &done.outcome else { panic!("{:?}\n{events:#?}", done.outcome) };
    assert_eq!(gone.id, res.base_id);
    assert_eq!(gone.allocated_bytes, listed.allocated_bytes, "the outcome is the base as it was");
    assert!(!dir.join("bases").join(&res.base_id).exists(), "the base is gone");
    let report = client.diagnostics(DiagnosticsRequest::default()).await.unwrap().into_inner();
    assert!(report.bases.is_empty(), "{:?}", report.bases);
}
