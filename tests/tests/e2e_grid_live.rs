//! Live migration through the coordinator between two real libvirtd nodes. Each agent runs on a private
//! libvirtd of its own (its own mount and network namespaces and host UUID, listening on TCP inside its
//! namespace), the two namespaces linked by a veth pair, so that the source's libvirtd reaches the
//! destination's peer to peer and QEMU streams memory and disk between them. A running VM moves with plain
//! `gridctl vm migrate` (live, both nodes offering it): it runs on the destination, persistently defined, on
//! the same disk bytes; the source has no domain left and its copy is wiped with a report that verifies; the
//! downtime libvirt measured is on the operation beside QEMU's and Proxmox's ceilings. `virsh` against each
//! daemon is the oracle.

#[path = "../../agent/tests/common_libvirtd/mod.rs"]
mod common_libvirtd;
#[path = "../../agent/tests/common_vm/mod.rs"]
mod common_vm;

use std::time::{Duration, Instant};

use common_libvirtd::Libvirtd;
use common_vm::EmulatorLock;
use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, Shape, first};
use gridforge_tests::images::ImageStore;
use gridforge_tests::{json_str as s, json_u64 as n};
use gridforge_tests::{sha256_file, verify_wipe_report, wait_for};

const VM: &str = "roamer";
/// The two daemons' namespaces, linked (nothing else sees these addresses).
const ADDR_A: &str = "10.234.0.1";
const ADDR_B: &str = "10.234.0.2";

fn domstate(daemon: &Libvirtd) -> String {
    daemon.virsh(&["domstate", VM]).trim().to_string()
}

#[test]
fn a_running_vm_migrates_live_between_two_real_libvirtd_nodes() {
    let _lock = EmulatorLock::acquire("live migration between two libvirtd");
    let dir = tempfile::Builder::new().prefix("gridforge-live-").tempdir().unwrap();
    let a = Libvirtd::start_peer(&dir.path().join("libvirtd-a"), "6a0d7f52-5c1e-4a8e-9d3b-00000000000a");
    let b = Libvirtd::start_peer(&dir.path().join("libvirtd-b"), "6a0d7f52-5c1e-4a8e-9d3b-00000000000b");
    a.link(&b, "gflm", ADDR_A, ADDR_B);
    let daemons = [(&a, ADDR_A), (&b, ADDR_B)];
    let mut grid = Grid::build_with(2, ImageStore::tiny, |i, agent| {
        let (daemon, addr) = daemons[i];
        agent.use_libvirt(&daemon.uri);
        agent.set_libvirt("peer_uri", &format!("qemu+tcp://{addr}/system"));
    });
    grid.start_coordinator(Settings::default());
    let ctl = grid.admin();
    for node in ["node-a", "node-b"] {
        let enrolled = grid.enroll(node, Shape { vcpus: 4, memory_mib: 2048 }, &[]);
        assert_eq!(enrolled["liveMigration"], true, "{node} offers live migration: {enrolled}");
    }
    let spec = grid.spec_file(VM, 1, 256, 64);
    let op = ctl.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--node", "node-a", "--wait"]);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    assert_eq!(domstate(&a), "running");
    let pool =
        |node: &str| grid.agents.iter().find(|g| g.name == node).unwrap().dir.join(format!("pool/{VM}.raw"));
    let before = sha256_file(&pool("node-a"));

    // The destination's libvirtd cut off from the source's: the migration fails, the VM runs on where it
    // was, and the destination keeps nothing of it (no domain, no volume, no reservation).
    a.netns_command("ip").args(["link", "set", "gflm-a", "down"]).status().unwrap();
    let started = first(ctl.json(&["vm", "migrate", VM, "--live"]));
    let op = wait_for(
        "the cut-off migration to end",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let op = ctl.json(&["op", "show", s(&started, "id")]);
            matches!(s(&op, "state"), "SUCCEEDED" | "FAILED").then_some(op)
        },
    );
    eprintln!("cut off: {}", s(&op, "error"));
    assert_eq!(s(&op, "state"), "FAILED", "{op}");
    assert!(s(&op, "error").contains("the VM keeps running on this node"), "{op}");
    assert_eq!(domstate(&a), "running");
    assert!(!b.virsh(&["list", "--all", "--name"]).lines().any(|l| l.trim() == VM), "no domain on node-b");
    assert!(!pool("node-b").exists(), "node-b removed the volume it allocated");
    let kept = ctl.json(&["vm", "show", VM]);
    assert_eq!((s(&kept, "node"), s(&kept, "state")), ("node-a", "RUNNING"), "{kept}");
    let node_b = ctl.json(&["node", "show", "node-b"]);
    assert!(node_b["allocated"].get("memoryMib").is_none(), "node-b's reservation released: {node_b}");
    assert_eq!(sha256_file(&pool("node-a")), before, "the source's disk is untouched");
    a.netns_command("ip").args(["link", "set", "gflm-a", "up"]).status().unwrap();

    let t = Instant::now();
    let op = ctl.json(&["vm", "migrate", VM, "--wait"]);
    eprintln!("vm migrate --wait: {:.1} s; {}", t.elapsed().as_secs_f64(), s(&op, "result"));
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    assert!(s(&op, "result").starts_with("live migration from node-a to node-b"), "{op}");
    assert_eq!(s(&op["params"], "mode"), "live", "{op}");
    let steps: Vec<&str> = op["steps"].as_array().unwrap().iter().map(|st| s(st, "name")).collect();
    assert_eq!(steps, ["receive", "send"], "no stop step: the VM ran throughout: {op}");
    let downtime = n(&op, &["downtimeMs"]);
    assert!((1..10_000).contains(&downtime), "libvirt's measured downtime is kept: {op}");

    // The destination runs it, persistently defined; the source has nothing of it.
    assert_eq!(domstate(&b), "running");
    let info = b.virsh(&["dominfo", VM]);
    assert!(info.lines().any(|l| l.starts_with("Persistent:") && l.contains("yes")), "{info}");
    assert!(
        !a.virsh(&["list", "--all", "--name"]).lines().any(|l| l.trim() == VM),
        "undefined on the source"
    );
    let xml = b.virsh(&["dumpxml", VM]);
    let dest_disk = pool("node-b");
    assert!(xml.contains(&format!("'{}'", dest_disk.display())), "the destination's own disk: {xml}");
    // The guest (firmware without a bootable system) writes nothing to its disk: the bytes are the same.
    // Read once the domain is paused, so that nothing moves underneath.
    b.virsh(&["suspend", VM]);
    assert_eq!(sha256_file(&dest_disk), before, "the destination holds the source's bytes");
    b.virsh(&["resume", VM]);
    assert!(!pool("node-a").exists(), "the source's volume is deleted");
    let moved = ctl.json(&["vm", "show", VM]);
    assert_eq!((s(&moved, "node"), s(&moved, "state")), ("node-b", "RUNNING"), "{moved}");
    let node_a = ctl.json(&["node", "show", "node-a"]);
    assert!(node_a["allocated"].get("memoryMib").is_none(), "the source's allocation released: {node_a}");
    let source_dir = grid.agents.iter().find(|g| g.name == "node-a").unwrap().dir.clone();
    verify_wipe_report(
        s(&op["params"], "wipe_report"),
        &source_dir,
        &grid.path().join("live-wipe-report.json"),
    );

    // It runs on there: the coordinator's poller sees it running on node-b, without drift.
    wait_for(
        "node-b's poll to see the VM running",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let v = ctl.json(&["vm", "show", VM]);
            (s(&v, "observedState") == "running" && s(&v, "drift").is_empty()).then_some(())
        },
    );

    ctl.json(&["vm", "delete", VM, "--wait"]);
    drop(grid);
}
