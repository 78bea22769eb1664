//! A dedicated (bare-metal) server beside VMs: a node enrolled `--dedicated` never hosts a VM; `vm create
//! --dedicated` takes it whole for a tenant (the image on its whole disk, written by its agent), boots it
//! through the power actuator, and the release wipes the whole disk and powers it off. The disk is a file
//! the node's agent may target (as a real one would be /dev/sda); the actuator is a script that logs.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::images::ImageStore;
use gridforge_tests::json_str as s;
use serde_json::Value;

const DISK_BYTES: u64 = 128 << 20;

fn steps(op: &Value) -> Vec<String> {
    op["steps"].as_array().into_iter().flatten().map(|st| s(st, "name").to_string()).collect()
}

fn power_log(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn a_dedicated_server_is_provisioned_whole_booted_by_its_actuator_and_wiped_on_release() {
    let dir = tempfile::Builder::new().prefix("gridforge-dedicated-").tempdir().unwrap();
    let disk = dir.path().join("bm-disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK_BYTES).unwrap();
    let log = dir.path().join("power.log");
    let script = dir.path().join("power.sh");
    std::fs::write(&script, format!("#!/bin/sh\necho \"$1 $2\" >> '{}'\n", log.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut grid = Grid::build_with(2, ImageStore::tiny, |i, agent| {
        if i == 1 {
            agent.set_devices(std::slice::from_ref(&disk));
        }
    });
    let power = vec![script.display().to_string(), "{node}".into(), "{action}".into()];
    grid.start_coordinator(Settings { power_command: power, ..Settings::default() });
    let shape = Shape { vcpus: 8, memory_mib: 4096 };
    grid.enroll("node-a", shape, &[]);
    let disk_arg = disk.display().to_string();
    let bm = grid.enroll("node-b", shape, &["--dedicated", "--disk", &disk_arg]);
    assert_eq!(bm["dedicated"], true, "{bm}");
    let admin = grid.admin();
    admin.json(&["tenant", "add", "acme"]);

    // VMs never land on the dedicated server, and saying why names it.
    for i in 1..=3 {
        let spec = grid.spec_file(&format!("web-{i}"), 1, 64, 64);
        let op = admin.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--wait"]);
        assert_eq!(s(&op, "node"), "node-a", "{op}");
    }
    let spec = grid.spec_file("pinned", 1, 64, 64);
    let out = admin.fails(&["vm", "create", "-f", spec.to_str().unwrap(), "--node", "node-b"]);
    assert!(out.stderr.contains("a dedicated server"), "{}", out.describe());

    // The server: provisioned whole by its own agent (no domain), then booted by the actuator.
    let spec = grid.spec_file("bm-1", 1, 64, 64);
    let op = admin.json(&[
        "vm",
        "create",
        "-f",
        spec.to_str().unwrap(),
        "--dedicated",
        "--tenant",
        "acme",
        "--wait",
    ]);
    assert_eq!((s(&op, "state"), s(&op, "node")), ("SUCCEEDED", "node-b"), "{op}");
    assert_eq!(steps(&op), ["provision", "power-boot"]);
    assert_eq!(power_log(&log), ["node-b boot"]);
    let vm = admin.json(&["vm", "show", "bm-1"]);
    assert_eq!((vm["dedicated"].clone(), s(&vm, "state")), (Value::Bool(true), "RUNNING"), "{vm}");
    let table = Command::new("sfdisk").arg("--dump").arg(&disk).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("label: gpt") && table.contains("start="), "no partition table written:\n{table}");
    let blkid = Command::new("blkid").arg("--probe").arg(&disk).output().unwrap();
    assert!(String::from_utf8_lossy(&blkid.stdout).contains("PTTYPE=\"gpt\""), "{blkid:?}");

    // Taken: a second server is refused with the reason; the server is not resized or moved like a VM.
    let spec = grid.spec_file("bm-2", 1, 64, 64);
    let out = admin.fails(&["vm", "create", "-f", spec.to_str().unwrap(), "--dedicated"]);
    assert!(out.stderr.contains("node-b taken by bm-1"), "{}", out.describe());
    let out = admin.fails(&["vm", "resize", "bm-1", "--vcpus", "2"]);
    assert!(out.stderr.contains("dedicated server"), "{}", out.describe());

    // Released: the whole disk wiped by the server's agent (signed report), then powered off.
    let op = admin.json(&["vm", "delete", "bm-1", "--wait"]);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    assert_eq!(steps(&op), ["wipe", "power-off"]);
    assert!(s(&op, "result").contains(&format!("wiped {DISK_BYTES} bytes")), "{op}");
    assert_eq!(power_log(&log), ["node-b boot", "node-b off"]);
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(bytes.len() as u64, DISK_BYTES);
    assert!(bytes.iter().all(|b| *b == 0), "the released server's disk still holds data");
    let again = admin.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--dedicated", "--wait"]);
    assert_eq!(s(&again, "node"), "node-b", "free again after the release: {again}");
}
