//! `bench/loss`: the time from a node cut off its network to each of its VMs running on another node, with
//! small grace periods (polls every 300 ms, Unreachable after 3 missed, Lost after 2 s) and the `command`
//! fencing actuator powering the node off at once (it kills the node's agent). A coordinator and four agents
//! in network namespaces, as the tests run them; the VMs are on libvirt's test driver, so a rebuild's
//! provision is the tiny image's (about a second of disk work), not a boot.
//!
//!   loss_bench [VMS]   (default 6)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, Shape};
use serde_json::Value;

const ACTUATOR: &str = r#"#!/bin/sh
kill -9 "$(cat "$(dirname "$0")/$1.pid")" && echo "$1 powered off"
"#;

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn main() {
    let vms: usize = std::env::args().nth(1).map_or(6, |a| a.parse().expect("VMS: a number"));
    let dir = tempfile::tempdir().unwrap();
    let actuator = dir.path().join("power-off");
    std::fs::write(&actuator, ACTUATOR).unwrap();
    let settings = Settings {
        lost_after_secs: 2,
        fencing_command: vec!["/bin/sh".into(), actuator.display().to_string(), "{node}".into()],
        ..Settings::default()
    };
    let grid = Grid::with_coordinator(4, settings);
    let ctl = grid.admin();
    grid.enroll("node-a", Shape { vcpus: 16, memory_mib: 128 * vms as u64 + 128 }, &[]);
    for n in ["node-b", "node-c", "node-d"] {
        grid.enroll(n, Shape { vcpus: 16, memory_mib: 4096 }, &[]);
    }
    let names: Vec<String> = (0..vms).map(|i| format!("vm-{i}")).collect();
    for name in &names {
        let spec = grid.spec_file(name, 1, 128, 64);
        let op = ctl.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--node", "node-a", "--wait"]);
        assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    }
    std::fs::write(dir.path().join("node-a.pid"), grid.agents[0].pid().unwrap().to_string()).unwrap();
    println!(
        "grid: 4 nodes, {vms} VMs on node-a; polls every 300 ms, Unreachable after 3 missed, Lost after 2 s"
    );

    let ns = &grid.agents[0].ns;
    let cut = ns.command("ip").args(["link", "set", "eth0", "down"]).status().unwrap();
    assert!(cut.success());
    let t0 = Instant::now();
    let mut node_events: Vec<(String, Duration)> = Vec::new();
    let mut running: BTreeMap<String, (Duration, String)> = BTreeMap::new();
    while running.len() < vms {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "not all VMs ran elsewhere within 120 s: {running:?}"
        );
        let node = ctl.json(&["node", "show", "node-a"]);
        let state = format!(
            "{}{}",
            s(&node, "state"),
            if node["fenced"].as_bool() == Some(true) { " fenced" } else { "" }
        );
        if node_events.last().is_none_or(|(last, _)| *last != state) {
            node_events.push((state, t0.elapsed()));
        }
        for v in ctl.json(&["vm", "list"]).as_array().unwrap() {
            let name = s(v, "name").to_string();
            if s(v, "state") == "RUNNING" && s(v, "node") != "node-a" && !running.contains_key(&name) {
                running.insert(name, (t0.elapsed(), s(v, "node").to_string()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (state, at) in &node_events {
        println!("  node-a {state:<18} at {:6.2} s", at.as_secs_f64());
    }
    let mut last = Duration::ZERO;
    for name in &names {
        let (at, node) = &running[name];
        last = last.max(*at);
        println!("  {name:<6} running on {node} at {:6.2} s after the cut", at.as_secs_f64());
    }
    println!("all {vms} VMs running elsewhere {:.2} s after node-a was cut off", last.as_secs_f64());
}
