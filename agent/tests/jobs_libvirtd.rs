//! Hypervisor jobs end to end: the `gridforge-agent serve` binary with mutual TLS, on a private real libvirtd
//! (qemu driver) with a dir pool, driven over gRPC. A Provision defines a VM on a pool volume; every Control
//! action follows, the domain's state checked with `virsh domstate` after each; a Delete removes the domain,
//! wipes the volume with a signed report that `gridforge-agent report verify` accepts, and frees the volume.
//! Provisions naming an unknown image, or from a store nobody answers at, fail with structured errors and
//! leave no volume behind.
//!
//! The guest is OVMF on a disk with a root file system and no boot loader: it stays in the firmware, which
//! is all the control actions need. The firmware ignores ACPI requests, so STOP takes its grace-then-destroy
//! path and REBOOT (an ACPI request) leaves the guest running.

mod common;
mod common_libvirtd;
mod common_vm;
mod jobs_support;
mod serve_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common_libvirtd::{Libvirtd, NETWORK};
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    ControlJob, DeleteJob, DiskLayout, Filesystem, ImageRef, Job, JobEvent, JobState, Machine, Nic,
    Partition, ProvisionJob, SubmitJobRequest, VmSpec, control_job::Action, error::Code, job::Outcome, nic,
    partition::Role, submit_job_request,
};
use jobs_support::{job_error, run_job};
use serve_support::{Daemon, MIB, Node, agent_ok, free_port};
use tonic::transport::Channel;

/// The agent's default pool.
const POOL: &str = "gridforge";
const DISK_MIB: u64 = 64;
/// The slowest job here, measured under TCG on a two-core machine while other builds ran: a STOP with a 3 s
/// grace time (4.3 s). Provisions of the tiny image and the other actions take under 2 s.
const SLOWEST_JOB: Duration = Duration::from_secs(5);

/// A private libvirtd and a node whose agent uses it, with its pool under the node's directory and images
/// from `store` (trusting `trusted_key`, a .pub path).
fn node_on_libvirtd(store: &str, trusted_key: &str) -> (Node, Libvirtd) {
    let node = Node::with_libvirt("", "");
    let libvirtd = Libvirtd::start(&node.dir.path().join("libvirtd"));
    let domain_type = if common_vm::accel() == "kvm" { "kvm" } else { "qemu" };
    let text = std::fs::read_to_string(&node.config).unwrap();
    let libvirt = format!(
        "[libvirt]\nuri = \"{}\"\npool_path = \"{}\"\ndomain_type = \"{domain_type}\"\n",
        libvirtd.uri,
        node.dir.path().join("pool").display()
    );
    let edited = text.replace("[libvirt]\nuri = \"\"\n", &libvirt);
    assert_ne!(edited, text, "the node's config has no empty [libvirt] uri to replace:\n{text}");
    let edited = format!("{edited}\n[images]\nstore = \"{store}\"\ntrusted_key = \"{trusted_key}\"\n");
    std::fs::write(&node.config, edited).unwrap();
    (node, libvirtd)
}

/// A store signing key made by `image keygen` under `dir`: the private key's path.
fn store_key(dir: &Path) -> PathBuf {
    let key = dir.join("store.key");
    agent_ok(&["image", "keygen", "--out", key.to_str().unwrap()]);
    key
}

/// The public half of a key made by [`store_key`], as `images.trusted_key` takes it.
fn public_key(key: &Path) -> String {
    format!("{}.pub", key.display())
}

/// A signed store under `dir` holding one small rootfs image, `tiny 1`: its path and the trusted key.
fn tiny_store(dir: &Path) -> (String, String) {
    let key = store_key(dir);
    let rootfs = dir.join("rootfs");
    common::small_rootfs(&rootfs);
    let store = dir.join("store");
    let (store_arg, key_arg, rootfs_arg) =
        (store.to_str().unwrap(), key.to_str().unwrap(), rootfs.to_str().unwrap());
    agent_ok(&[
        "image",
        "pack",
        "--store",
        store_arg,
        "--key",
        key_arg,
        "--rootfs",
        rootfs_arg,
        "--name",
        "tiny",
        "--version",
        "1",
    ]);
    (store.display().to_string(), public_key(&key))
}

/// A VM of image `image` 1 with one ext4 root partition and a NIC on the private daemon's network, defined
/// and not started.
fn provision(key: &str, name: &str, image: &str) -> SubmitJobRequest {
    let spec = VmSpec {
        name: name.into(),
        image: Some(ImageRef { name: image.into(), version: "1".into() }),
        disk: Some(DiskLayout {
            size_mib: DISK_MIB,
            partitions: vec![Partition {
                label: "root".into(),
                role: Role::Root as i32,
                filesystem: Filesystem::Ext4 as i32,
                ..Default::default()
            }],
            sector_size: 0,
        }),
        machine: Some(Machine {
            vcpus: common_vm::guest_vcpus(),
            memory_mib: 256,
            nics: vec![Nic { attach: Some(nic::Attach::Network(NETWORK.into())), ..Default::default() }],
            start: false,
        }),
        ..Default::default()
    };
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob { spec: Some(spec), target: None })),
        ..Default::default()
    }
}

fn control(key: &str, domain: &str, action: Action, grace_seconds: u32) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(submit_job_request::Job::Control(ControlJob {
            domain: domain.into(),
            action: action as i32,
            grace_seconds,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Runs a job that must succeed; the finished job and its events.
async fn succeed(
    client: &mut AgentClient<Channel>,
    daemon: &Daemon,
    req: SubmitJobRequest,
) -> (Job, Vec<JobEvent>) {
    let (job, events) = run_job(client, req, common_vm::boot_timeout(SLOWEST_JOB)).await;
    assert_eq!(job.state(), JobState::Succeeded, "{:?}\nagent log:\n{}", job.outcome, daemon.log_text());
    (job, events)
}

/// The volumes of the agent's pool, as `virsh vol-list` shows them.
fn volumes(libvirtd: &Libvirtd) -> String {
    libvirtd.virsh(&["vol-list", POOL])
}

#[tokio::test(flavor = "multi_thread")]
async fn control_actions_and_delete_over_grpc_on_a_real_libvirtd() {
    let started = Instant::now();
    let images = tempfile::tempdir().unwrap();
    let (store, trusted_key) = tiny_store(images.path());
    let (node, libvirtd) = node_on_libvirtd(&store, &trusted_key);
    let daemon = node.start();
    let mut client = node.client().await;
    eprintln!("store, libvirtd and agent up in {:.1} s", started.elapsed().as_secs_f64());

    // An image the store does not hold: IMAGE_NOT_FOUND naming it and what the store has; the volume made
    // for it is gone again.
    let (job, _) = run_job(
        &mut client,
        provision("ghost", "ghost", "no-such-image"),
        common_vm::boot_timeout(SLOWEST_JOB),
    )
    .await;
    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    let e = job_error(&job);
    assert_eq!(e.code(), Code::ImageNotFound, "{e:?}");
    assert_eq!(e.step, "fetch", "{e:?}");
    assert!(e.message.contains("no-such-image 1") && e.message.contains("tiny 1"), "{e:?}");
    assert!(!volumes(&libvirtd).contains("ghost.raw"), "{}", volumes(&libvirtd));
    assert!(!libvirtd.virsh(&["list", "--all", "--name"]).contains("ghost"));

    let t = Instant::now();
    let name = "vm-a";
    let (job, _) = succeed(&mut client, &daemon, provision("provision", name, "tiny")).await;
    let Some(Outcome::Provision(result)) = &job.outcome else { panic!("{job:?}") };
    let volume = node.dir.path().join("pool").join(format!("{name}.raw"));
    assert_eq!(result.disk_path, std::fs::canonicalize(&volume).unwrap().display().to_string());
    assert_eq!(result.disk_size_bytes, DISK_MIB * MIB);
    assert!(volumes(&libvirtd).contains(&format!("{name}.raw")), "{}", volumes(&libvirtd));
    assert_eq!(libvirtd.virsh(&["domstate", name]).trim(), "shut off");
    eprintln!("provision: {:.1} s", t.elapsed().as_secs_f64());

    // Every action, the state the job reports and the state virsh sees after it.
    let guest = common_vm::EmulatorLock::acquire("jobs_libvirtd");
    let steps = [
        (Action::Start, "running", "running"),
        (Action::Suspend, "paused", "paused"),
        (Action::Resume, "running", "running"),
        (Action::Reboot, "running", "running"),
        (Action::Stop, "shutoff", "shut off"),
        (Action::Start, "running", "running"),
        (Action::Destroy, "shutoff", "shut off"),
        (Action::Start, "running", "running"),
    ];
    for (i, (action, reported, virsh)) in steps.into_iter().enumerate() {
        let t = Instant::now();
        let req = control(&format!("control-{i}"), name, action, 3);
        let (job, events) = succeed(&mut client, &daemon, req).await;
        let Some(Outcome::Control(c)) = &job.outcome else { panic!("{action:?}: {job:?}") };
        assert_eq!((c.domain.as_str(), c.state.as_str()), (name, reported), "{action:?}");
        assert_eq!(libvirtd.virsh(&["domstate", name]).trim(), virsh, "after {action:?}");
        if action == Action::Stop {
            // The firmware ignores the ACPI power button: destroyed once the grace time is over.
            assert!(
                t.elapsed() >= Duration::from_secs(3),
                "stopped before the grace time: {:?}",
                t.elapsed()
            );
            assert!(
                events.iter().any(|e| e.message.contains("did not power off within 3 s; destroying it")),
                "{events:?}"
            );
        }
        eprintln!("{action:?}: {:.1} s", t.elapsed().as_secs_f64());
    }

    // Delete the running VM: powered off, undefined, its volume wiped with a signed report and freed.
    let t = Instant::now();
    let delete = SubmitJobRequest {
        idempotency_key: "delete".into(),
        job: Some(submit_job_request::Job::Delete(DeleteJob { domain: name.into(), ..Default::default() })),
        ..Default::default()
    };
    let (job, events) = succeed(&mut client, &daemon, delete).await;
    drop(guest);
    for step in ["stop", "undefine", "wipe", "free"] {
        assert!(events.iter().any(|e| e.step == step), "no {step} step: {events:?}");
    }
    assert!(!libvirtd.virsh(&["list", "--all", "--name"]).lines().any(|l| l.trim() == name));
    let Some(Outcome::Wipe(wipe)) = &job.outcome else { panic!("{job:?}") };
    assert!(wipe.verified, "{wipe:?}");
    assert_eq!(wipe.bytes, DISK_MIB * MIB);
    let report_file = node.dir.path().join("delete-report.json");
    std::fs::write(&report_file, &wipe.report_json).unwrap();
    let public = node.dir.path().join("state/report-signing.key.pub");
    let text = agent_ok(&[
        "--json",
        "report",
        "verify",
        report_file.to_str().unwrap(),
        "--key",
        public.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(report["verification"]["result"], "passed", "{report}");
    assert_eq!(report["device"]["path"], result.disk_path.as_str(), "{report}");
    assert_eq!(report["operator"], "ops", "{report}");
    assert!(!volumes(&libvirtd).contains(&format!("{name}.raw")), "{}", volumes(&libvirtd));
    assert!(!volume.exists(), "the volume's file is still there");
    eprintln!("delete: {:.1} s", t.elapsed().as_secs_f64());
    eprintln!("jobs_libvirtd control and delete: {:.1} s", started.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread")]
async fn provision_from_an_unreachable_store_fails_naming_the_store() {
    let started = Instant::now();
    // Bound and released: nothing listens there.
    let url = format!("http://127.0.0.1:{}/", free_port());
    let images = tempfile::tempdir().unwrap();
    let (node, libvirtd) = node_on_libvirtd(&url, &public_key(&store_key(images.path())));
    let _daemon = node.start();
    let mut client = node.client().await;

    let (job, _) =
        run_job(&mut client, provision("unreachable", "vm-b", "tiny"), common_vm::boot_timeout(SLOWEST_JOB))
            .await;
    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    let e = job_error(&job);
    eprintln!("unreachable store: {e:?}");
    assert_eq!(e.code(), Code::ImageStoreUnavailable, "{e:?}");
    assert_eq!(e.step, "fetch", "{e:?}");
    assert!(e.message.contains(&format!("{url}index.json")), "names the store: {e:?}");
    assert!(e.message.to_lowercase().contains("connection refused"), "says why: {e:?}");
    assert!(!volumes(&libvirtd).contains("vm-b.raw"), "{}", volumes(&libvirtd));
    assert!(!libvirtd.virsh(&["list", "--all", "--name"]).contains("vm-b"));
    eprintln!("jobs_libvirtd unreachable store: {:.1} s", started.elapsed().as_secs_f64());
}
