//! End to end through the coordinator: one agent on a private real libvirtd (qemu driver), a store holding
//! the real Debian 12 image, and `gridctl vm create --wait` with a machine on the daemon's bridge. The guest
//! boots from the disk the agent provisioned, reaches its login prompt on the serial console and answers ssh
//! on its static address; `gridctl vm stop` and `vm delete` then leave no domain and no volume behind
//! (`virsh` against the daemon is the oracle) and keep the signed wipe report.
//!
//! The guest's static network (address, gateway, DNS) is checked here; `agent/tests/e2e_boot.rs` boots one
//! guest on DHCP.

#[path = "../../agent/tests/common_libvirtd/mod.rs"]
mod common_libvirtd;
#[path = "../../agent/tests/common_vm/mod.rs"]
mod common_vm;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common_libvirtd::{Libvirtd, NETWORK};
use common_vm::{EmulatorLock, SshKey, boot_timeout};
use gridforge_tests::agent::POOL;
use gridforge_tests::bins;
use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, first};
use gridforge_tests::images::ImageStore;
use gridforge_tests::process::run_ok;
use gridforge_tests::wait_for;
use serde_json::{Value, json};

const VM: &str = "guest-1";
const MAC: &str = "52:54:00:6a:00:0a";
const IMAGE: &str = "debian-12-minimal";
/// The bridge's subnet, inside the daemon's own network namespace (nothing else sees it).
const BRIDGE_ADDR: &str = "10.233.0.1";
const GUEST_ADDR: &str = "10.233.0.10";
/// Provisioning a 2 GiB Debian disk: about 20 s on an idle machine.
const CREATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Stop (ACPI, destroyed after the grace) and delete (wipe of the volume).
const STOP_GRACE_SECS: u32 = 60;
const CONTROL_TIMEOUT: Duration = Duration::from_secs(180);

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn spec(key: &SshKey) -> Value {
    json!({
        "name": VM,
        "image": {"name": IMAGE, "version": "1"},
        "disk": {"size_mib": 2048, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {
            "hostname": VM,
            "root_ssh_authorized_keys": [key.public],
            "network": [{"match_mac": MAC, "addresses": [format!("{GUEST_ADDR}/24")],
                "gateway": BRIDGE_ADDR, "dns": [BRIDGE_ADDR]}]
        },
        "machine": {
            "vcpus": common_vm::guest_vcpus(),
            "memory_mib": 1024,
            "nics": [{"network": NETWORK, "mac": MAC}],
            "start": true
        }
    })
}

/// `ssh root@GUEST COMMAND` from the daemon's network namespace.
fn ssh(libvirtd: &Libvirtd, key: &SshKey, command: &str) -> Output {
    libvirtd
        .netns_command("ssh")
        .arg("-i")
        .arg(&key.private)
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "ConnectTimeout=5", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
        .args(["-o", "IdentitiesOnly=yes", &format!("root@{GUEST_ADDR}"), command])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("nsenter ssh could not run: {e}"))
}

/// Runs named commands in one ssh session (each login costs seconds under TCG); each one's output by name.
fn facts(libvirtd: &Libvirtd, key: &SshKey, commands: &[(&str, &str)]) -> BTreeMap<String, String> {
    let script: String =
        commands.iter().map(|(name, command)| format!("echo '@@ {name}'; {command} 2>&1\n")).collect();
    let out = ssh(libvirtd, key, &script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh {script:?}: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut facts = BTreeMap::new();
    let mut current = None;
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("@@ ") {
            current = Some(name.to_string());
            facts.insert(name.to_string(), String::new());
        } else if let Some(text) = current.as_ref().and_then(|n| facts.get_mut(n)) {
            text.push_str(line);
            text.push('\n');
        }
    }
    facts
}

fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn a_vm_created_through_gridctl_boots_on_a_real_libvirtd_and_answers_ssh() {
    common_vm::require_vm_tools();
    let t0 = Instant::now();
    let rootfs = common_vm::image_rootfs(IMAGE, "GRIDFORGE_DEBIAN_ROOTFS");
    // Declared first, dropped last: the daemon (and any guest it left) outlives the grid's agent.
    let daemon_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let libvirtd = Libvirtd::start(daemon_dir.path());
    let in_netns = |args: &[&str]| {
        let mut ip = libvirtd.netns_command("ip");
        run_ok(ip.args(args), Duration::from_secs(20))
    };
    in_netns(&["addr", "add", &format!("{BRIDGE_ADDR}/24"), "dev", "gfbr0"]);

    let pack = |dir: &Path| ImageStore::pack(dir, &rootfs, IMAGE, "1", Duration::from_secs(300));
    let mut grid = Grid::build(1, pack, &libvirtd.uri);
    grid.start_coordinator(Settings::default());
    let ctl = grid.admin();
    let address = grid.agents[0].address();
    let added = first(ctl.json(&["node", "add", "node-a", "--address", &address, "--datacenter", "dc1"]));
    assert_eq!(s(&added, "state"), "READY", "{added}");
    eprintln!("libvirtd, store, agent and coordinator up: {:.1} s", t0.elapsed().as_secs_f64());

    let key = SshKey::generate(grid.path());
    let spec_file = grid.path().join(format!("{VM}.json"));
    std::fs::write(&spec_file, spec(&key).to_string()).unwrap();
    common_vm::accel();
    let lock = EmulatorLock::acquire(VM);
    let t = Instant::now();
    let op = ctl.json_within(&["vm", "create", "-f", spec_file.to_str().unwrap(), "--wait"], CREATE_TIMEOUT);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "create {VM}: {op}");
    eprintln!("vm create --wait (provision, define, start): {:.1} s", t.elapsed().as_secs_f64());
    let started = Instant::now();

    let shown = ctl.json(&["vm", "show", VM]);
    assert_eq!((s(&shown, "node"), s(&shown, "state")), ("node-a", "RUNNING"), "{shown}");
    let root_uuid = shown["provision"]["partitions"]
        .as_array()
        .and_then(|parts| parts.iter().find(|p| s(p, "role") == "ROOT"))
        .map(|p| s(p, "fsUuid").to_string())
        .unwrap_or_default();
    assert!(!root_uuid.is_empty(), "no root file system UUID in vm show: {shown}");
    assert_eq!(libvirtd.virsh(&["domstate", VM]).trim(), "running");
    let volume = format!("{VM}.raw");
    assert!(libvirtd.virsh(&["vol-list", POOL]).contains(&volume), "the pool has no {volume}");

    // The agent's domain writes its serial console to a file: the guest reaches its login prompt.
    let console = grid.agents[0].console_log(VM);
    let prompt = format!("{VM} login:");
    wait_for("the login prompt", boot_timeout(Duration::from_secs(30)), Duration::from_millis(500), || {
        let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
        if !text.contains(&prompt) && libvirtd.virsh(&["domstate", VM]).trim() != "running" {
            panic!("{VM} stopped before its login prompt:\n{}\n{}", tail(&console, 60), libvirtd.logs());
        }
        text.contains(&prompt).then_some(())
    });
    eprintln!("login prompt {:.1} s after start", started.elapsed().as_secs_f64());
    let serial = String::from_utf8_lossy(&std::fs::read(&console).unwrap()).into_owned();
    assert!(
        serial.contains(&format!("root=UUID={root_uuid}")),
        "the kernel did not boot the provisioned root"
    );

    // ssh from the daemon's network namespace to the guest's static address on the bridge. First boot
    // generates the host keys, so sshd may come up a little after the prompt.
    let ssh_up = Instant::now();
    loop {
        let out = ssh(&libvirtd, &key, "true");
        if out.status.success() {
            break;
        }
        assert!(
            ssh_up.elapsed() < boot_timeout(Duration::from_secs(20)),
            "ssh root@{GUEST_ADDR} did not work: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&console, 60)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("ssh up {:.1} s after start", started.elapsed().as_secs_f64());
    let got = facts(
        &libvirtd,
        &key,
        &[
            ("hostname", "hostname"),
            ("root_uuid", "findmnt -no UUID /"),
            ("addr", "ip -4 -o addr show"),
            ("route", "ip -4 route show default"),
            ("resolv", "cat /etc/resolv.conf"),
        ],
    );
    assert_eq!(got["hostname"].trim(), VM, "{got:?}");
    assert_eq!(got["root_uuid"].trim(), root_uuid, "the file system mounted at / is the provisioned one");
    assert!(got["addr"].contains(&format!("inet {GUEST_ADDR}/24")), "static address missing: {got:?}");
    assert!(got["route"].contains(&format!("via {BRIDGE_ADDR}")), "default route: {got:?}");
    assert!(got["resolv"].contains(&format!("nameserver {BRIDGE_ADDR}")), "resolv.conf: {got:?}");

    // Stop, then delete: no domain, no volume, and the signed wipe report kept in the grid view.
    let t = Instant::now();
    let grace = STOP_GRACE_SECS.to_string();
    ctl.json_within(&["vm", "stop", VM, "--grace", &grace, "--wait"], CONTROL_TIMEOUT);
    assert_eq!(s(&ctl.json(&["vm", "show", VM]), "state"), "STOPPED");
    assert_eq!(libvirtd.virsh(&["domstate", VM]).trim(), "shut off");
    drop(lock);
    eprintln!("vm stop --wait: {:.1} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    ctl.json_within(&["vm", "delete", VM, "--wait"], CONTROL_TIMEOUT);
    eprintln!("vm delete --wait: {:.1} s", t.elapsed().as_secs_f64());
    let domains = libvirtd.virsh(&["list", "--all", "--name"]);
    assert!(!domains.lines().any(|d| d.trim() == VM), "domain {VM} still defined: {domains}");
    let volumes = libvirtd.virsh(&["vol-list", POOL]);
    assert!(!volumes.contains(&volume), "volume {volume} still in the pool: {volumes}");
    let all = ctl.json(&["vm", "list", "--all"]);
    let deleted = all.as_array().and_then(|vms| vms.iter().find(|v| s(v, "name") == VM)).expect("kept");
    assert_eq!(s(deleted, "state"), "DELETED", "{deleted}");
    let report = grid.path().join("wipe-report.json");
    std::fs::write(&report, s(deleted, "wipeReport")).unwrap();
    let agent_key = grid.agents[0].dir.join("state/report-signing.key.pub");
    run_ok(
        Command::new(bins::path(bins::AGENT))
            .args(["report", "verify"])
            .arg(&report)
            .arg("--key")
            .arg(&agent_key),
        Duration::from_secs(30),
    );
    eprintln!("grid boot test: {:.1} s", t0.elapsed().as_secs_f64());
}
