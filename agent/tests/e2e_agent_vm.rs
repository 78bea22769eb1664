//! End to end on a real node: gridforge-agent runs as a systemd service in a utility VM (qemu, UEFI) with a
//! blank second drive, and the test drives it over gRPC with mutual TLS through the forwarded port. One test
//! provisions the drive with a customized Debian guest, boots that guest and sees its login prompt, then has
//! the agent wipe the drive and checks the signed report and the drive's bytes. The other kills the agent
//! with SIGKILL in the middle of a provision and checks what systemd and the agent make of it.

mod common_uvm;
mod common_vm;
mod jobs_support;

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use common_uvm::{DATA_DISK_BYTES, Uvm, blank_disk, image};
use common_vm::{Vm, boot_timeout};
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    JobState, ProvisionJob, SubmitJobRequest, VmSpec, WatchJobRequest, error::Code, job::Outcome,
    submit_job_request,
};
use jobs_support::{device, get, job_error, watch_to_end, wipe_request};
use tonic::transport::Channel;

/// Measured under TCG with one vCPU on an idle two-core machine: the utility VM's agent answers about
/// 45 s after qemu starts, the provisioned guest shows its login prompt after about 30 s.
const AGENT_TYPICAL: Duration = Duration::from_secs(45);
const LOGIN_TYPICAL: Duration = Duration::from_secs(30);
const SHELL_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: usize = 1 << 20;

/// A Debian guest for the whole drive, named `name`.
fn provision_request(key: &str, name: &str) -> SubmitJobRequest {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "image": {"name": "debian-12-minimal", "version": "1"},
        "disk": {"size_mib": DATA_DISK_BYTES >> 20, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {"hostname": name, "network": [{"dhcp": true}]}
    }))
    .unwrap();
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob {
            spec: Some(spec),
            target: device(Path::new("/dev/vdb")),
        })),
        ..Default::default()
    }
}

/// The agent's unit as systemd sees it, from the console.
fn unit_status(uvm: &mut Uvm) -> String {
    uvm.query(
        "systemctl is-active gridforge-agent; systemctl show -p Type -p NRestarts -p MainPID \
         -p UnitFileState gridforge-agent",
        SHELL_TIMEOUT,
    )
}

fn property(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
        .to_string()
}

/// Reads `len` bytes of `path` at `offset`.
fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

async fn submit(client: &mut AgentClient<Channel>, req: SubmitJobRequest) -> String {
    client.submit_job(req).await.expect("SubmitJob").into_inner().id
}

#[tokio::test]
async fn utility_vm_agent_provisions_a_bootable_guest_and_wipes_the_drive() {
    common_vm::require_vm_tools();
    let t0 = Instant::now();
    let image = image();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = blank_disk(&dir.path().join("vdb.img"));

    let mut uvm = Uvm::boot("uvm-a", dir.path(), &data);
    let mut client = uvm.wait_for_agent(boot_timeout(AGENT_TYPICAL)).await;
    let status = unit_status(&mut uvm);
    assert!(status.lines().next().is_some_and(|l| l.trim() == "active"), "the unit is not active:\n{status}");
    assert_eq!(property(&status, "Type"), "notify", "{status}");
    assert_eq!(property(&status, "UnitFileState"), "enabled", "{status}");
    // Compared in the guest: the console has been seen to double a byte of this long path.
    let unit_file = uvm.query(
        "test \"$(systemctl show -p FragmentPath --value gridforge-agent)\" = \
         /etc/systemd/system/gridforge-agent.service && echo unit-file-ok",
        SHELL_TIMEOUT,
    );
    assert!(
        unit_file.contains("unit-file-ok"),
        "the unit is not /etc/systemd/system/gridforge-agent.service: {unit_file}"
    );

    // Provision the drive over gRPC and follow it to the end.
    let t = Instant::now();
    let id = submit(&mut client, provision_request("provision-guest-a", "guest-a")).await;
    let events = watch_to_end(&mut client, &id).await;
    let last = events.last().unwrap();
    let job = get(&mut client, &id).await;
    assert_eq!(last.state, JobState::Succeeded as i32, "provision failed: {job:?}\nevents: {events:?}");
    assert!(
        events.iter().any(|e| e.bytes_total > 0 && e.bytes_done > 0 && e.bytes_done < e.bytes_total),
        "no progress between start and end was reported: {events:?}"
    );
    let Some(Outcome::Provision(result)) = &job.outcome else { panic!("provision outcome: {job:?}") };
    assert_eq!(result.disk_path, "/dev/vdb");
    assert_eq!(result.disk_size_bytes, DATA_DISK_BYTES);
    let root_uuid =
        result.partitions.iter().find(|p| p.label == "root").expect("root partition").fs_uuid.clone();
    eprintln!("provision in the utility VM: {:.1} s ({} events)", t.elapsed().as_secs_f64(), events.len());
    drop(client);
    uvm.power_off(Duration::from_secs(60));
    drop(uvm);

    // The drive boots on its own: the guest reaches its login prompt with its hostname.
    let t = Instant::now();
    let mut guest = Vm::boot("guest-a", &data, "52:54:00:75:76:02", dir.path());
    guest.wait_for_serial("guest-a login:", boot_timeout(LOGIN_TYPICAL));
    let serial = guest.serial();
    assert!(
        serial.contains(&format!("root=UUID={root_uuid}")),
        "the kernel did not boot the provisioned root"
    );
    eprintln!("guest from the provisioned drive: login prompt in {:.1} s", t.elapsed().as_secs_f64());
    drop(guest);

    // Back in the utility VM (same boot disk: the journal still knows the provision), wipe the drive.
    let mut uvm = Uvm::boot("uvm-a", dir.path(), &data);
    let mut client = uvm.wait_for_agent(boot_timeout(AGENT_TYPICAL)).await;
    assert_eq!(
        get(&mut client, &id).await.state,
        JobState::Succeeded as i32,
        "the journal lost the provision"
    );
    let t = Instant::now();
    let wipe = submit(&mut client, wipe_request("wipe-vdb", Path::new("/dev/vdb"), "zero")).await;
    let events = watch_to_end(&mut client, &wipe).await;
    let job = get(&mut client, &wipe).await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded as i32, "wipe failed: {job:?}");
    let Some(Outcome::Wipe(result)) = &job.outcome else { panic!("wipe outcome: {job:?}") };
    assert!(result.verified, "{result:?}");
    assert_eq!(result.bytes, DATA_DISK_BYTES);
    eprintln!("wipe in the utility VM: {:.1} s", t.elapsed().as_secs_f64());
    let report: serde_json::Value = serde_json::from_str(&result.report_json).expect("report JSON");
    let report_file = dir.path().join("wipe-report.json");
    std::fs::write(&report_file, &result.report_json).unwrap();
    common_uvm::agent(&[
        "report",
        "verify",
        report_file.to_str().unwrap(),
        "--key",
        image.report_key_pub.to_str().unwrap(),
    ]);
    assert!(result.report_json.contains("/dev/vdb"), "the report does not name the device:\n{report:#}");
    // A report altered after signing is refused.
    let forged =
        result.report_json.replacen(&DATA_DISK_BYTES.to_string(), &(DATA_DISK_BYTES - 1).to_string(), 1);
    std::fs::write(&report_file, forged).unwrap();
    let out = std::process::Command::new(common_uvm::agent_bin())
        .args([
            "report",
            "verify",
            report_file.to_str().unwrap(),
            "--key",
            image.report_key_pub.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an altered report verified");
    drop(client);
    uvm.power_off(Duration::from_secs(60));
    drop(uvm);

    // From the host: the drive's bytes are zero wherever we look.
    let mut offsets =
        vec![0, 512, MIB as u64, 300 * MIB as u64, DATA_DISK_BYTES / 2, DATA_DISK_BYTES - MIB as u64];
    offsets.extend((1..16u64).map(|i| (DATA_DISK_BYTES / 17 * i) & !4095));
    for off in offsets {
        let bytes = read_at(&data, off, MIB.min((DATA_DISK_BYTES - off) as usize));
        assert!(bytes.iter().all(|&b| b == 0), "the drive is not zero at offset {off}");
    }
    eprintln!("utility VM test: {:.1} s", t0.elapsed().as_secs_f64());
}

#[tokio::test]
async fn agent_killed_mid_provision_is_restarted_by_systemd_and_the_job_is_interrupted() {
    common_vm::require_vm_tools();
    let t0 = Instant::now();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = blank_disk(&dir.path().join("vdb.img"));
    // Something in the first MiB, so that "left safe" is visible: the agent must zero it after the crash.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.write_all(&vec![0xa5; MIB]).unwrap();
    }

    let mut uvm = Uvm::boot("uvm-b", dir.path(), &data);
    let mut client = uvm.wait_for_agent(boot_timeout(AGENT_TYPICAL)).await;
    let before = unit_status(&mut uvm);
    assert_eq!(property(&before, "NRestarts"), "0", "{before}");
    let first_pid = property(&before, "MainPID");

    let id = submit(&mut client, provision_request("provision-guest-b", "guest-b")).await;
    // Wait until the image is being unpacked, then kill the agent outright.
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: id.clone(), from_seq: 0 })
        .await
        .expect("WatchJob")
        .into_inner();
    loop {
        let ev = stream.message().await.expect("WatchJob stream").expect("the job ended before unpacking");
        assert_eq!(ev.state, JobState::Unspecified as i32, "the job ended before unpacking: {ev:?}");
        if ev.step == "build" && ev.bytes_done > 0 {
            break;
        }
    }
    drop(stream);
    drop(client);
    let killed = uvm.shell(
        "kill -KILL $(systemctl show -p MainPID --value gridforge-agent) && echo killed",
        SHELL_TIMEOUT,
    );
    assert!(killed.contains("killed"), "{killed}");

    // systemd brings the agent back (Restart=on-failure); the journal says what happened to the job.
    let mut client = uvm.wait_for_agent(Duration::from_secs(120)).await;
    let after = unit_status(&mut uvm);
    assert_eq!(property(&after, "NRestarts"), "1", "systemd did not restart the agent:\n{after}");
    assert_ne!(property(&after, "MainPID"), first_pid, "{after}");
    let job = get(&mut client, &id).await;
    assert_eq!(job.state, JobState::Interrupted as i32, "{job:?}");
    assert_eq!(job_error(&job).code, Code::Interrupted as i32, "{job:?}");
    let head = uvm.query("cmp -n 1048576 /dev/vdb /dev/zero && echo first-mib-zero", SHELL_TIMEOUT);
    assert!(
        head.contains("first-mib-zero"),
        "the first MiB of /dev/vdb is not zero after the interruption: {head}"
    );

    // A new submission (new key) runs to the end.
    let retry = submit(&mut client, provision_request("provision-guest-b-retry", "guest-b")).await;
    let events = watch_to_end(&mut client, &retry).await;
    let job = get(&mut client, &retry).await;
    assert_eq!(events.last().unwrap().state, JobState::Succeeded as i32, "resubmission failed: {job:?}");
    drop(client);
    uvm.power_off(Duration::from_secs(60));
    drop(uvm);
    assert_eq!(&read_at(&data, 512, 8), b"EFI PART", "no GPT on the drive after the resubmission");
    eprintln!("kill test: {:.1} s", t0.elapsed().as_secs_f64());
}
