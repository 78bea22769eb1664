//! The libvirt hypervisor against a real libvirtd (qemu driver, private to the test): the dir pool and a
//! sparse volume, a UEFI domain with its own NVRAM, a NIC on a libvirt network and the serial console in a
//! file, the whole life cycle with stats, a Control STOP job that destroys a guest ignoring the ACPI request
//! after the grace time, and a daemon restart under a live connection. Every document libvirt stores is
//! checked with `virt-xml-validate`.

mod common_libvirtd;
mod common_vm;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common_libvirtd::{Libvirtd, NETWORK};
use gridforge_agent::config::{Config, JobsConfig, LibvirtConfig};
use gridforge_agent::hypervisor::{
    DomainDef, DomainState, DomainType, Hypervisor, HypervisorError, Libvirt, NicDef,
};
use gridforge_agent::jobs::JobEngine;
use gridforge_proto::v1::{ControlJob, JobState, SubmitJobRequest, control_job, job, submit_job_request};

const GIB: u64 = 1 << 30;
/// From the domain's start to OVMF's first console output and its first reads of the disk, as measured under
/// TCG on a two-core machine (8 s while other builds ran).
const FIRMWARE_START: Duration = Duration::from_secs(8);

/// Saves `xml` and checks it against libvirt's schema for `kind` (domain, pool, vol, network).
fn validate(dir: &Path, kind: &str, name: &str, xml: &str) {
    let file = dir.join(format!("{name}.{kind}.xml"));
    std::fs::write(&file, xml).unwrap();
    let schema = match kind {
        "vol" => "storagevol",
        "pool" => "storagepool",
        other => other,
    };
    let out = std::process::Command::new("virt-xml-validate")
        .arg(&file)
        .arg(schema)
        .output()
        .unwrap_or_else(|e| panic!("virt-xml-validate could not run: {e}"));
    assert!(
        out.status.success(),
        "{kind} {name}: libvirt's XML does not validate:\n{}{}\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `check` every 200 ms until it returns Some; panics naming `what` after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < timeout, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn real_libvirtd_pool_volume_and_domain_life_cycle() {
    common_vm::require_tool("virt-xml-validate", "libvirt-clients");
    let started = Instant::now();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut daemon = Libvirtd::start(&dir.path().join("libvirtd"));
    eprintln!("libvirtd up in {:.1} s", started.elapsed().as_secs_f64());

    let config = Config {
        state_dir: dir.path().join("state"),
        cache_dir: dir.path().join("cache"),
        work_dir: dir.path().join("work"),
        metrics_listen: None,
        libvirt: LibvirtConfig {
            uri: daemon.uri.clone(),
            pool: "gf-pool".into(),
            pool_path: dir.path().join("pool"),
            domain_type: "auto".into(),
            ..Default::default()
        },
        jobs: JobsConfig { report_signing_key: dir.path().join("state/report.key"), ..Default::default() },
        ..Default::default()
    };
    let hv = Arc::new(Libvirt::new(&config.libvirt, &config.state_dir));

    let ty = hv.ping().expect("ping the real libvirtd");
    let expected = if common_vm::accel() == "kvm" { DomainType::Kvm } else { DomainType::Qemu };
    assert_eq!(ty, expected, "domain type auto disagrees with the KVM probe of the test harness");

    // The pool: created as a started, autostarted dir pool at the configured path.
    let pool = hv.pool().expect("pool");
    assert_eq!(pool.path, config.libvirt.pool_path);
    assert!(pool.path.is_dir(), "libvirt did not build the pool directory");
    assert!(pool.capacity_bytes > 0 && pool.available_bytes > 0, "{pool:?}");
    let info = daemon.virsh(&["pool-info", "gf-pool"]);
    assert!(
        info.contains("running") && info.lines().any(|l| l.starts_with("Autostart:") && l.contains("yes")),
        "{info}"
    );
    validate(dir.path(), "pool", "gf-pool", &daemon.virsh(&["pool-dumpxml", "gf-pool"]));

    // A sparse raw volume, grown by libvirt (the test driver cannot resize).
    let vol = hv.create_volume("gf-disk.raw", 2 * GIB).expect("create volume");
    assert_eq!(vol.path, pool.path.join("gf-disk.raw"));
    let meta = std::fs::metadata(&vol.path).expect("the volume's file");
    assert_eq!(meta.len(), 2 * GIB);
    assert!(meta.blocks() * 512 < 1 << 20, "volume is not sparse: {} bytes allocated", meta.blocks() * 512);
    assert!(vol.allocation_bytes < 1 << 20, "{vol:?}");
    validate(
        dir.path(),
        "vol",
        "gf-disk",
        &daemon.virsh(&["vol-dumpxml", "--pool", "gf-pool", "gf-disk.raw"]),
    );
    let grown = hv.resize_volume("gf-disk.raw", 3 * GIB).expect("grow volume");
    assert_eq!(grown.capacity_bytes, 3 * GIB);
    assert_eq!(std::fs::metadata(&vol.path).unwrap().len(), 3 * GIB, "the file did not grow");
    let err = hv.create_volume("gf-disk.raw", GIB).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // A UEFI domain on the volume, its NIC on the libvirt network.
    let name = "gf-vm";
    let mac = "52:54:00:6a:76:01";
    let def = DomainDef {
        name: name.into(),
        vcpus: common_vm::guest_vcpus(),
        memory_mib: 256,
        disk: vol.path.clone(),
        disk_format: Default::default(),
        nics: vec![NicDef {
            network: Some(NETWORK.into()),
            bridge: None,
            mac: mac.into(),
            vlan: None,
            uplink_vlan: None,
            tap: None,
        }],
    };
    hv.define(&def).expect("define");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Shutoff));
    assert_eq!(hv.domain_disk(name).unwrap(), vol.path);
    let nvram = hv.nvram_path(name);
    assert_eq!(std::fs::read(&nvram).unwrap(), std::fs::read(&config.libvirt.ovmf_vars).unwrap());
    let xml = daemon.virsh(&["dumpxml", name]);
    validate(dir.path(), "domain", name, &xml);
    for needle in [
        format!("<domain type='{}'", ty.as_str()),
        format!("type='pflash'>{}</loader>", config.libvirt.ovmf_code.display()),
        format!(">{}</nvram>", nvram.display()),
        "<acpi/>".to_string(),
        format!("<source file='{}'", vol.path.display()),
        "<target dev='vda' bus='virtio'/>".to_string(),
        format!("<mac address='{mac}'/>"),
        format!("<source network='{NETWORK}'"),
        "<model type='virtio'/>".to_string(),
        format!("<source path='{}'/>", hv.console_log_path(name).display()),
    ] {
        assert!(xml.contains(&needle), "the domain XML lacks {needle:?}:\n{xml}");
    }

    // From here until the STOP job has powered it off, an emulated guest runs.
    let guest = common_vm::EmulatorLock::acquire("hypervisor_libvirtd");
    hv.start(name).unwrap_or_else(|e| panic!("start: {e}\n{}", daemon.logs()));
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Running));
    let live = daemon.virsh(&["dumpxml", name]);
    validate(dir.path(), "domain", "gf-vm-live", &live);
    assert!(live.contains("<target dev='vnet"), "the NIC got no tap device:\n{live}");
    // OVMF runs: it reads the (blank) disk and writes its boot manager messages to the console file.
    let console = hv.console_log_path(name);
    let booted = Instant::now();
    wait_for("OVMF output on the serial console file", common_vm::boot_timeout(FIRMWARE_START), || {
        std::fs::metadata(&console).is_ok_and(|m| m.len() > 0).then_some(())
    });
    eprintln!("OVMF output after {:.1} s", booted.elapsed().as_secs_f64());
    let stats = wait_for("disk reads of the running guest", common_vm::boot_timeout(FIRMWARE_START), || {
        let all = hv.stats().expect("stats");
        let s = all.into_iter().find(|s| s.name == name).expect("stats of the domain");
        (s.disk_read_bytes > 0).then_some(s)
    });
    eprintln!("OVMF read the disk after {:.1} s", booted.elapsed().as_secs_f64());
    assert_eq!(stats.state, "running");
    assert_eq!(stats.vcpus, common_vm::guest_vcpus());
    assert_eq!(stats.memory_bytes, 256 << 20);
    assert!(stats.cpu_time_ns > 0, "{stats:?}");
    let err = hv.undefine(name).unwrap_err();
    assert!(matches!(&err, HypervisorError::WrongState { state, .. } if state == "running"), "{err}");

    hv.suspend(name).expect("suspend");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Paused));
    assert!(daemon.virsh(&["domstate", name]).contains("paused"));
    let paused = hv.stats().unwrap().into_iter().find(|s| s.name == name).expect("stats while paused");
    assert_eq!(paused.state, "paused");
    hv.resume(name).expect("resume");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Running));

    // STOP through the job engine: the firmware ignores the ACPI power button, so after the grace time the
    // guest is destroyed.
    let engine = JobEngine::open(&config, Some(hv.clone() as Arc<dyn Hypervisor>)).expect("job engine");
    let stop = SubmitJobRequest {
        idempotency_key: "stop-gf-vm".into(),
        job: Some(submit_job_request::Job::Control(ControlJob {
            domain: name.into(),
            action: control_job::Action::Stop as i32,
            grace_seconds: 3,
            ..Default::default()
        })),
        ..Default::default()
    };
    let t = Instant::now();
    let id = engine.submit(stop, "test").expect("submit STOP").id;
    let job = wait_for("the STOP job to end", Duration::from_secs(60), || {
        engine.get(&id).filter(|j| j.state != JobState::Queued as i32 && j.state != JobState::Running as i32)
    });
    let took = t.elapsed();
    assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
    match &job.outcome {
        Some(job::Outcome::Control(c)) => assert_eq!(c.state, "shutoff", "{c:?}"),
        other => panic!("STOP outcome: {other:?}"),
    }
    assert!(took >= Duration::from_secs(3), "destroyed before the grace time ({took:?})");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let notes: Vec<String> = runtime.block_on(async {
        let mut rx = engine.watch(&id, 0).expect("watch");
        let mut notes = Vec::new();
        while let Some(ev) = rx.recv().await {
            notes.push(ev.message);
        }
        notes
    });
    assert!(notes.iter().any(|m| m.contains("did not power off within 3 s; destroying it")), "{notes:?}");
    engine.shutdown(Duration::from_secs(5));
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Shutoff));
    assert!(daemon.virsh(&["domstate", name]).contains("shut off"));
    drop(guest);
    let err = hv.destroy(name).unwrap_err();
    assert!(matches!(&err, HypervisorError::WrongState { state, .. } if state == "shutoff"), "{err}");

    // libvirtd going away makes calls fail as Unavailable (no hang); the same handle reconnects once it is
    // back, and the persistent definition survived.
    daemon.stop();
    let err = hv.ping().unwrap_err();
    assert!(matches!(err, HypervisorError::Unavailable { .. }), "{err}");
    daemon.restart();
    assert_eq!(hv.state(name).expect("state after libvirtd restarted"), Some(DomainState::Shutoff));

    hv.undefine(name).expect("undefine");
    assert_eq!(hv.state(name).unwrap(), None);
    assert!(!nvram.exists(), "NVRAM copy left behind at {}", nvram.display());
    assert!(!daemon.virsh(&["list", "--all", "--name"]).contains(name));
    hv.delete_volume("gf-disk.raw").expect("delete volume");
    assert_eq!(hv.volume("gf-disk.raw").unwrap(), None);
    assert!(!vol.path.exists(), "the volume's file is still there");
    eprintln!("libvirtd test: {:.1} s", started.elapsed().as_secs_f64());
}
