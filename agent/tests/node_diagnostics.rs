//! Diagnostics and NodeStats over real tonic, with libvirt's in-process test driver (`test:///default`) as the
//! hypervisor, real TLS certificates (rcgen), a real loop device, and the `diagnose` command of the binary.

mod common;
mod image_store_common;
mod jobs_support;
mod serve_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use gridforge_agent::block::{AlignedBuf, BlockTarget, TargetOptions};
use gridforge_agent::config::Config;
use gridforge_agent::hypervisor::{Hypervisor, Libvirt};
use gridforge_agent::node::NodeContext;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    Check, DiagnosticsReport, DiagnosticsRequest, JobState, NodeStatsRequest, check::Status,
};
use jobs_support::*;
use tonic::transport::Channel;

/// Every check, in the order the report lists them.
const CHECKS: [&str; 14] = [
    "agent",
    "libvirt",
    "hypervisor",
    "kvm",
    "cpu",
    "memory",
    "block-devices",
    "pool",
    "image-cache",
    "image-store",
    "tls",
    "clock",
    "state-dir",
    "jobs",
];

/// The checks of `gridforge-agent diagnose`: the configuration file first, then the daemon's.
fn command_checks() -> Vec<&'static str> {
    std::iter::once("config").chain(CHECKS).collect()
}

/// A node whose hypervisor is libvirt at `uri` (the test driver's pool `default-pool`, TCG domains).
fn node_with_libvirt(uri: &str) -> Node {
    let mut node = Node::new();
    node.config.libvirt.uri = uri.to_string();
    node.config.libvirt.pool = "default-pool".into();
    node.config.libvirt.domain_type = "qemu".into();
    node
}

fn context(config: &Config) -> NodeContext {
    let hypervisor = (!config.libvirt.uri.is_empty())
        .then(|| Arc::new(Libvirt::new(&config.libvirt, &config.state_dir)) as Arc<dyn Hypervisor>);
    NodeContext { config: config.clone(), hypervisor }
}

async fn serve_config(config: &Config) -> AgentClient<Channel> {
    let engine = gridforge_agent::jobs::JobEngine::open(config, None).expect("opening the job engine");
    serve_node(engine, context(config)).await.0
}

async fn diagnostics(client: &mut AgentClient<Channel>) -> DiagnosticsReport {
    client.diagnostics(DiagnosticsRequest {}).await.expect("Diagnostics").into_inner()
}

fn find<'a>(report: &'a DiagnosticsReport, name: &str) -> &'a Check {
    report.checks.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no check {name}: {report:#?}"))
}

/// Whether the file system holding `dir` has under 10% or under 1 GiB free, as `df` sees it: the state-dir
/// check's status depends on the machine the tests run on, so the expectation is read from the machine too.
fn space_is_low_per_df(dir: &std::path::Path) -> bool {
    let out =
        std::process::Command::new("df").args(["-B1", "--output=avail,size"]).arg(dir).output().expect("df");
    assert!(out.status.success(), "df {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<u64> = text
        .lines()
        .nth(1)
        .expect("df prints one row")
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    let (free, total) = (fields[0], fields[1]);
    (free as f64) < total as f64 * 0.10 || free < 1 << 30
}

fn names(report: &DiagnosticsReport) -> Vec<&str> {
    report.checks.iter().map(|c| c.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnostics_report_every_check_with_the_test_driver() {
    let node = node_with_libvirt("test:///default");
    let mut client = serve_config(&node.config).await;
    let report = diagnostics(&mut client).await;

    assert_eq!(names(&report), CHECKS);
    assert_eq!(report.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(report.node, node.config.node_name);
    assert_eq!(report.hypervisor_kind, "qemu");
    for c in &report.checks {
        assert_ne!(c.status(), Status::Unspecified, "{c:?}");
        assert!(!c.reason.is_empty() && !c.reason.contains('\n'), "one line of reason: {c:?}");
    }
    let libvirt = find(&report, "libvirt");
    assert_eq!(libvirt.status(), Status::Ok, "{libvirt:?}");
    assert!(libvirt.reason.starts_with("connected to test:///default (libvirt "), "{libvirt:?}");
    let pool = find(&report, "pool");
    assert_eq!(pool.status(), Status::Ok, "{pool:?}");
    assert!(pool.reason.contains("default-pool at /default-pool"), "{pool:?}");
    let tls = find(&report, "tls");
    assert_eq!((tls.status(), tls.reason.as_str()), (Status::Warn, "plaintext gRPC (insecure = true)"));
    let state = find(&report, "state-dir");
    let expected = if space_is_low_per_df(&node.config.state_dir) { Status::Warn } else { Status::Ok };
    assert_eq!(state.status(), expected, "{state:?}");
    assert_eq!(state.reason.ends_with(" (low)"), expected == Status::Warn, "{state:?}");
    assert!(state.reason.contains(&node.config.state_dir.display().to_string()), "{state:?}");
    let devices = find(&report, "block-devices");
    assert_eq!(devices.status(), Status::Ok, "{devices:?}");
    assert!(
        devices.reason.contains(node.disk("").display().to_string().trim_end_matches('/')),
        "{devices:?}"
    );
    let cores = cpuinfo_cores();
    let cpu = find(&report, "cpu");
    assert!(cpu.reason.starts_with(&format!("{cores} cores, ")), "{cpu:?}");
    let jobs = find(&report, "jobs");
    assert_eq!(jobs.status(), Status::Ok, "{jobs:?}");
    assert!(jobs.reason.starts_with("0 running, 0 queued"), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_store_check_lists_the_images_and_those_in_the_cache() {
    use gridforge_agent::image::{Cache, Kind, Store, Trust, pack, sign};
    use gridforge_common::progress::Progress;
    let store = image_store_common::make_store();
    let rootfs = store.tmp.path().join("rootfs");
    std::fs::write(rootfs.join("etc/debian_version"), "13.0\n").unwrap();
    pack::pack_rootfs(&rootfs, &store.store_dir, "debian", "13", Kind::Os, &store.key, 3).unwrap();

    // No store configured: nothing listed, and the check says so.
    let mut node = Node::new();
    let report = gridforge_agent::node::diagnostics(&context(&node.config), &[], 0);
    let c = find(&report, "image-store");
    assert_eq!(c.status(), Status::Ok, "{c:?}");
    assert!(c.reason.starts_with("none configured (images.store)"), "{c:?}");
    assert!(report.images.is_empty() && report.cached_images.is_empty(), "{report:?}");

    // A signed store with two images, one of them fetched into the cache as a provision does.
    node.config.images.store = store.store_dir.display().to_string();
    node.config.images.trusted_key = sign::encode_public(&store.key.verifying_key());
    let opened = Store::open(&node.config.images.store, Trust::Key(store.key.verifying_key())).unwrap();
    let cache = Cache::new(&node.config.cache_dir).unwrap();
    cache.fetch(&opened, opened.find("debian", "12").unwrap(), &Progress::none()).unwrap();
    let report = gridforge_agent::node::diagnostics(&context(&node.config), &[], 0);
    let c = find(&report, "image-store");
    assert_eq!(c.status(), Status::Ok, "{c:?}");
    assert_eq!(
        c.reason,
        format!("{} lists 2 images (signed index verified), 1 of them cached", store.store_dir.display()),
    );
    assert_eq!(report.images, ["debian:12", "debian:13"]);
    assert_eq!(report.cached_images, ["debian:12"]);

    // A store that is not there: FAIL naming it, nothing listed.
    node.config.images.store = store.tmp.path().join("no-such-store").display().to_string();
    let report = gridforge_agent::node::diagnostics(&context(&node.config), &[], 0);
    let c = find(&report, "image-store");
    assert_eq!(c.status(), Status::Fail, "{c:?}");
    assert!(c.reason.starts_with(&node.config.images.store), "{c:?}");
    assert!(report.images.is_empty(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_libvirt_fails_naming_the_uri_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("qemu+unix:///system?socket={}", dir.path().join("no-such-libvirt-sock").display());
    let node = node_with_libvirt(&uri);
    let mut client = serve_config(&node.config).await;
    let report = diagnostics(&mut client).await;

    assert_eq!(names(&report), CHECKS);
    assert_eq!(report.hypervisor_kind, "", "no kind without libvirt");
    let libvirt = find(&report, "libvirt");
    assert_eq!(libvirt.status(), Status::Fail, "{libvirt:?}");
    assert!(libvirt.reason.contains(&uri), "the reason names the URI: {libvirt:?}");
    assert_eq!(find(&report, "pool").status(), Status::Warn);
    assert_eq!(find(&report, "hypervisor").status(), Status::Warn);

    // Stats still answer, without VMs.
    let stats = client.node_stats(NodeStatsRequest { sample_ms: 100 }).await.expect("NodeStats").into_inner();
    assert!(stats.vms.is_empty());
    assert!(!stats.cpu_busy.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_only_node_reports_libvirt_disabled() {
    let node = Node::new();
    let mut client = serve_config(&node.config).await;
    let report = diagnostics(&mut client).await;
    assert_eq!(names(&report), CHECKS);
    let libvirt = find(&report, "libvirt");
    assert_eq!((libvirt.status(), libvirt.reason.as_str()), (Status::Ok, "disabled (disk-only node)"));
    assert_eq!(find(&report, "pool").status(), Status::Ok);
}

/// A self-signed certificate for `agent.test` valid until `not_after` (seconds from now; negative: past),
/// with its key, written as PEM into `dir`; the config's TLS paths point at them (the CA is the certificate).
fn with_certificate(config: &mut Config, dir: &Path, name: &str, not_after: i64) {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["agent.test".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "agent.test");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(u64::try_from(now + not_after).unwrap());
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    config.tls.insecure = false;
    config.tls.ca = cert_path.clone();
    config.tls.cert = cert_path;
    config.tls.key = key_path;
}

const DAY: i64 = 86_400;

#[tokio::test(flavor = "multi_thread")]
async fn tls_check_fails_for_an_expired_certificate_and_warns_before_expiry() {
    let certs = tempfile::tempdir().unwrap();
    let cases = [
        ("expired", -2 * DAY, Status::Fail, "certificate CN=agent.test expired 2 days ago"),
        ("soon", 10 * DAY + 3600, Status::Warn, "certificate CN=agent.test expires in 10 days"),
        ("fine", 365 * DAY + 3600, Status::Ok, "certificate CN=agent.test valid for 365 more days"),
    ];
    for (name, not_after, status, reason) in cases {
        let mut node = Node::new();
        with_certificate(&mut node.config, certs.path(), name, not_after);
        let mut client = serve_config(&node.config).await;
        let tls = find(&diagnostics(&mut client).await, "tls").clone();
        assert_eq!(tls.status(), status, "{name}: {tls:?}");
        assert!(tls.reason.starts_with(reason), "{name}: {tls:?}");
    }

    let mut node = Node::new();
    with_certificate(&mut node.config, certs.path(), "gone", DAY * 100);
    std::fs::write(&node.config.tls.cert, "not a certificate").unwrap();
    let mut client = serve_config(&node.config).await;
    let tls = find(&diagnostics(&mut client).await, "tls").clone();
    assert_eq!(tls.status(), Status::Fail, "{tls:?}");
    assert!(tls.reason.contains(&node.config.tls.cert.display().to_string()), "{tls:?}");
}

/// Submit a wipe that fails (crypto-erase of a disk that holds no LUKS2 volume) and follow it to its end.
async fn failed_wipe(client: &mut AgentClient<Channel>, node: &Node) -> String {
    let disk = node.sparse_disk("plain.img", 4 * MIB);
    let job = client.submit_job(wipe_request("doomed", &disk, "crypto-erase")).await.unwrap().into_inner();
    let events = watch_to_end(client, &job.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Failed, "{events:?}");
    job.id
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_check_warns_after_a_failed_wipe() {
    let node = Node::new();
    let mut client = serve_config(&node.config).await;
    let id = failed_wipe(&mut client, &node).await;
    let jobs = find(&diagnostics(&mut client).await, "jobs").clone();
    assert_eq!(jobs.status(), Status::Warn, "{jobs:?}");
    assert!(jobs.reason.contains("1 failed"), "{jobs:?}");
    assert!(jobs.reason.contains(&format!("last: wipe job {id} on ")), "the last failure is named: {jobs:?}");
    assert!(jobs.reason.contains("LUKS2"), "with its error: {jobs:?}");
}

fn cpuinfo_cores() -> usize {
    std::fs::read_to_string("/proc/cpuinfo").unwrap().lines().filter(|l| l.starts_with("processor")).count()
}

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn node_stats_cover_cpu_memory_a_busy_loop_device_file_systems_and_vms() {
    let node = node_with_libvirt("test:///default");
    let mut client = serve_config(&node.config).await;

    // A loop device written with O_DIRECT for the whole sampling window.
    let backing = node.dir.path().join("loop-backing.img");
    std::fs::File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let lo = common::Loop::attach(&backing, 512);
    let loop_name = lo.dev.file_name().unwrap().to_str().unwrap().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (lo.dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let target = BlockTarget::open(&dev, &TargetOptions::default()).unwrap();
            assert!(target.is_direct(), "O_DIRECT on the loop device");
            let buf = AlignedBuf::new(MIB as usize);
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                target.write_at(&buf, written % (64 * MIB)).unwrap();
                written += MIB;
            }
            written
        })
    };
    let stats =
        client.node_stats(NodeStatsRequest { sample_ms: 1500 }).await.expect("NodeStats").into_inner();
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    drop(lo);
    assert!(written > 0);

    assert_eq!(stats.sample_ms, 1500);
    assert!(stats.time.is_some());
    assert_eq!(stats.cpu_busy.len(), cpuinfo_cores(), "{:?}", stats.cpu_busy);
    assert!(stats.cpu_busy.iter().all(|b| (0.0..=1.0).contains(b)), "{:?}", stats.cpu_busy);

    let memory = stats.memory.expect("memory");
    assert_eq!(memory.total_bytes, meminfo_total_bytes());
    assert!(memory.available_bytes > 0 && memory.available_bytes <= memory.total_bytes, "{memory:?}");
    assert_eq!(memory.used_bytes, memory.total_bytes - memory.available_bytes);

    let disk = stats.disks.iter().find(|d| d.device == loop_name).unwrap_or_else(|| {
        panic!(
            "loop device {loop_name} missing from {:?}",
            stats.disks.iter().map(|d| &d.device).collect::<Vec<_>>()
        )
    });
    assert!(disk.write_bytes_per_sec > 0.0 && disk.write_iops > 0.0, "{disk:?}");
    assert!((0.0..=1.0).contains(&disk.utilization), "{disk:?}");
    assert!(stats.disks.iter().all(|d| !d.device.starts_with("ram")), "RAM disks are left out");

    let state = stats.filesystems.iter().find(|f| f.role == "state").expect("state file system");
    assert_eq!(state.path, node.config.state_dir.display().to_string());
    assert!(state.total_bytes > 0 && state.free_bytes <= state.total_bytes, "{state:?}");
    assert!(stats.filesystems.iter().all(|f| ["pool", "cache", "state"].contains(&f.role.as_str())));

    let vm = stats.vms.iter().find(|v| v.name == "test").expect("the test driver's domain \"test\"");
    assert_eq!(vm.state, "running");
    assert!(vm.vcpus >= 1 && vm.memory_bytes > 0, "{vm:?}");
    // The test driver reports the wall clock as the domain's CPU time: one core busy over the window.
    assert!((0.8..=1.2).contains(&vm.cpu_cores), "{vm:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_stats_refuse_a_window_over_ten_seconds() {
    let node = Node::new();
    let mut client = serve_config(&node.config).await;
    let err = client.node_stats(NodeStatsRequest { sample_ms: 10_001 }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("sample_ms"), "{err:?}");
}

/// The agent's configuration as a TOML file: every path under `dir`, libvirt's test driver.
fn write_config(dir: &Path, config: &Config) -> PathBuf {
    let path = dir.join("agent.toml");
    let text = format!(
        r#"node_name = "diag-node"
state_dir = "{}"
cache_dir = "{}"
work_dir = "{}"

[tls]
ca = "{}"
cert = "{}"
key = "{}"
insecure = {}

[libvirt]
uri = "{}"
pool = "{}"
domain_type = "{}"

[jobs]
devices = ["{}"]
report_signing_key = "{}"
"#,
        config.state_dir.display(),
        config.cache_dir.display(),
        config.work_dir.display(),
        config.tls.ca.display(),
        config.tls.cert.display(),
        config.tls.key.display(),
        config.tls.insecure,
        config.libvirt.uri,
        config.libvirt.pool,
        config.libvirt.domain_type,
        config.jobs.devices[0].display(),
        config.jobs.report_signing_key.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn diagnose(config: &Path, json: bool) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gridforge-agent"));
    cmd.arg("diagnose").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("running gridforge-agent diagnose");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnose_command_prints_json_and_exits_1_on_a_failed_check() {
    let certs = tempfile::tempdir().unwrap();
    let mut node = node_with_libvirt("test:///default");
    with_certificate(&mut node.config, certs.path(), "valid", 90 * DAY);
    let config_file = write_config(node.dir.path(), &node.config);

    // The daemon's engine holds the journal, with one failed job in it, while the command reads it.
    let mut client = serve_config(&node.config).await;
    let id = failed_wipe(&mut client, &node).await;

    let (code, stdout, stderr) = diagnose(&config_file, true);
    let report: DiagnosticsReport =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?} (stderr {stderr})"));
    assert_eq!(names(&report), command_checks());
    assert_eq!(report.node, "diag-node");
    let config = find(&report, "config");
    assert_eq!(
        (config.status(), config.reason.clone()),
        (Status::Ok, format!("loaded {}", config_file.display()))
    );
    assert_eq!(report.hypervisor_kind, "qemu");
    assert!(report.checks.iter().all(|c| c.status() != Status::Fail), "{report:#?}");
    assert_eq!(code, Some(0), "no check failed: {stdout} {stderr}");
    assert_eq!(find(&report, "libvirt").status(), Status::Ok);
    assert_eq!(find(&report, "tls").status(), Status::Ok, "{:?}", find(&report, "tls"));
    let jobs = find(&report, "jobs");
    assert_eq!(jobs.status(), Status::Warn, "the journal is read beside the running engine: {jobs:?}");
    assert!(jobs.reason.contains(&id), "{jobs:?}");
    // proto3 JSON: enum values by name.
    assert!(stdout.contains(r#""status":"OK""#), "{stdout}");

    // Human output: one line per check.
    let (code, stdout, _) = diagnose(&config_file, false);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), CHECKS.len() + 1, "{stdout}");
    for (line, name) in lines.iter().zip(command_checks()) {
        let mut words = line.split_whitespace();
        assert!(matches!(words.next(), Some("OK" | "WARN" | "FAIL")), "{line}");
        assert_eq!(words.next(), Some(name), "{line}");
    }
    assert!(stdout.contains("libvirt       connected to test:///default (libvirt "), "{stdout}");

    // An expired certificate fails the tls check and the command.
    with_certificate(&mut node.config, certs.path(), "expired", -DAY);
    let config_file = write_config(node.dir.path(), &node.config);
    let (code, stdout, stderr) = diagnose(&config_file, true);
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    let report: DiagnosticsReport = serde_json::from_str(stdout.trim()).unwrap();
    let tls = find(&report, "tls");
    assert_eq!(tls.status(), Status::Fail, "{tls:?}");
    assert!(tls.reason.contains("expired"), "{tls:?}");
}

#[test]
fn diagnose_command_points_at_the_rpc_when_the_journal_is_held_exclusively() {
    let node = Node::new();
    std::fs::create_dir_all(&node.config.state_dir).unwrap();
    // A writer that does not share the file (as an agent of an older version holds it).
    let _held = redb::Database::create(node.config.journal_path()).unwrap();
    let config_file = write_config(node.dir.path(), &node.config);
    let (code, stdout, stderr) = diagnose(&config_file, true);
    assert_eq!(code, Some(0), "{stdout} {stderr}");
    let report: DiagnosticsReport = serde_json::from_str(stdout.trim()).unwrap();
    let jobs = find(&report, "jobs");
    assert_eq!(jobs.status(), Status::Warn, "{jobs:?}");
    assert!(jobs.reason.contains(&node.config.journal_path().display().to_string()), "{jobs:?}");
    assert!(jobs.reason.contains("Diagnostics RPC"), "{jobs:?}");
}

/// Human output as (status, check, reason) per line.
fn check_lines(stdout: &str) -> Vec<(&str, &str, &str)> {
    stdout
        .lines()
        .map(|line| {
            let (status, rest) = line.split_once(' ').unwrap_or_else(|| panic!("not a check line: {line:?}"));
            let (name, reason) = rest.trim_start().split_once(' ').unwrap_or((rest.trim_start(), ""));
            (status, name, reason.trim_start())
        })
        .collect()
}

/// Without a usable configuration the command still runs every check, on the defaults, fails the `config`
/// check with the file and the cause, exits 1, and gives the whole report with `--json` too.
fn assert_config_check_fails_and_the_rest_run(config: &Path, cause: &str) {
    let (code, stdout, stderr) = diagnose(config, false);
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    assert!(!stderr.contains("error:"), "the report is the output, not an error: {stderr}");
    let lines = check_lines(&stdout);
    assert_eq!(lines.iter().map(|l| l.1).collect::<Vec<_>>(), command_checks(), "{stdout}");
    let (status, _, reason) = lines[0];
    assert_eq!(status, "FAIL", "{stdout}");
    assert!(reason.contains(&config.display().to_string()), "names the file: {reason}");
    assert!(reason.contains(cause), "names the cause ({cause}): {reason}");
    assert!(reason.ends_with("; the other checks use the defaults"), "{reason}");
    let agent = lines[1];
    assert_eq!(
        (agent.0, agent.2),
        ("OK", &*format!("gridforge-agent {} on {}", env!("CARGO_PKG_VERSION"), Config::default().node_name))
    );
    assert!(
        lines.iter().any(|l| l.1 == "image-cache" && l.2.contains("/var/cache/gridforge-agent")),
        "{stdout}"
    );
    assert!(lines.iter().any(|l| l.1 == "tls" && l.2.contains("/etc/gridforge/tls/")), "{stdout}");

    let (code, stdout, stderr) = diagnose(config, true);
    assert_eq!(code, Some(1), "{stdout} {stderr}");
    let report: DiagnosticsReport =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?} (stderr {stderr})"));
    assert_eq!(names(&report), command_checks());
    let check = find(&report, "config");
    assert_eq!((check.status(), check.reason.as_str()), (Status::Fail, reason), "same reason in JSON");
}

#[test]
fn diagnose_command_without_a_config_file_runs_every_check_on_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("agent.toml");
    assert_config_check_fails_and_the_rest_run(&missing, "No such file or directory (os error 2)");
    // The cause is printed once.
    let (_, stdout, _) = diagnose(&missing, false);
    let first = format!(
        "FAIL  config        cannot read {}: No such file or directory (os error 2); \
         the other checks use the defaults",
        missing.display()
    );
    assert_eq!(stdout.lines().next(), Some(first.as_str()), "{stdout}");
}

#[test]
fn diagnose_command_with_a_config_that_does_not_parse_runs_every_check_on_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "node_name = \"broken\"\nlisten = 7443\n").unwrap();
    assert_config_check_fails_and_the_rest_run(
        &config,
        "line 2, column 10 (listen = 7443): invalid type: integer `7443`",
    );
    std::fs::write(&config, "[tls]\ncert = \"/x.pem\"\nsurplus = true\n").unwrap();
    assert_config_check_fails_and_the_rest_run(
        &config,
        "line 3, column 1 (surplus = true): unknown field `surplus`",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn diagnose_reads_the_journal_of_a_running_daemon_and_agrees_with_its_rpc() {
    let node = serve_support::Node::new("");
    let _daemon = node.start();
    let mut client = node.client().await;
    let disk = node.sparse_disk("plain.img", 4 * MIB);
    let job = client.submit_job(wipe_request("doomed", &disk, "crypto-erase")).await.unwrap().into_inner();
    let events = watch_to_end(&mut client, &job.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Failed, "{events:?}");

    let rpc = diagnostics(&mut client).await;
    assert_eq!(names(&rpc), CHECKS);
    assert_eq!(rpc.node, "test-node");
    let rpc_tls = find(&rpc, "tls");
    assert_ne!(rpc_tls.status(), Status::Fail, "the daemon serves with a certificate from pki: {rpc_tls:?}");
    assert!(rpc_tls.reason.starts_with("certificate CN=agent"), "{rpc_tls:?}");

    let (code, stdout, stderr) = diagnose(&node.config, true);
    let cli: DiagnosticsReport =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?} (stderr {stderr})"));
    assert_eq!(names(&cli), command_checks());
    let failed = cli.checks.iter().any(|c| c.status() == Status::Fail);
    assert_eq!(code, Some(i32::from(failed)), "exit status 1 exactly when a check fails: {cli:#?}");
    for name in ["libvirt", "tls", "jobs"] {
        let (a, b) = (find(&rpc, name), find(&cli, name));
        assert_eq!((a.status(), &a.reason), (b.status(), &b.reason), "{name}: the RPC and the command agree");
    }
    let jobs = find(&cli, "jobs");
    assert_eq!(jobs.status(), Status::Warn, "{jobs:?}");
    assert!(jobs.reason.contains(&format!("last: wipe job {} on ", job.id)), "{jobs:?}");
}
