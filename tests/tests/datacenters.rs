//! Datacenters polled apart: one datacenter's agents frozen (SIGSTOP: connections are taken by the kernel,
//! nothing answers, so each poll waits out its timeout) slows neither the polls of another nor its creates.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::{json_str as s, wait_until};

#[test]
fn a_frozen_datacenter_delays_neither_the_polls_nor_the_creates_of_another() {
    let settings = Settings { poll_interval_ms: 300, ..Settings::default() };
    let mut grid = Grid::with_coordinator(4, settings);
    let shape = Shape { vcpus: 8, memory_mib: 2048 };
    grid.enroll_in("node-a", "dc1", shape, &[]);
    grid.enroll_in("node-b", "dc1", shape, &[]);
    grid.enroll_in("node-c", "dc2", shape, &[]);
    grid.enroll_in("node-d", "dc2", shape, &[]);
    let ctl = grid.admin();

    // dc2's agents frozen: each of their polls waits out its timeout.
    let signal = |sig: &str| {
        for agent in &grid.agents[2..] {
            let pid = agent.pid().expect("a running agent").to_string();
            gridforge_tests::process::run_ok(
                std::process::Command::new("kill").args([sig, &pid]),
                Duration::from_secs(10),
            );
        }
    };
    signal("-STOP");
    let t = Instant::now();
    // dc1 is polled every interval meanwhile: its nodes' last poll time moves on several times a second.
    let mut seen = BTreeSet::new();
    while t.elapsed() < Duration::from_secs(4) {
        let node = ctl.json(&["node", "show", "node-a"]);
        assert_eq!(s(&node, "state"), "READY", "{node}");
        seen.insert(s(&node, "lastSeen").to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(seen.len() >= 8, "node-a polled only {} times in 4 s while dc2 was frozen: {seen:?}", seen.len());

    // Creates in dc1 go on at full speed.
    for i in 0..6 {
        let name = format!("dc1-vm-{i}");
        let spec = grid.spec_file(&name, 1, 64, 64);
        let start = Instant::now();
        let op = ctl.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--datacenter", "dc1", "--wait"]);
        assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
        assert!(start.elapsed() < Duration::from_secs(5), "create {name} took {:?}", start.elapsed());
        assert!(["node-a", "node-b"].contains(&s(&op, "node")), "{op}");
    }
    // And dc2's nodes were found unreachable, by their own loop.
    wait_until("dc2's nodes unreachable", Duration::from_secs(30), Duration::from_millis(200), || {
        let nodes = ctl.json(&["node", "list", "--datacenter", "dc2"]);
        let states: Vec<&str> = nodes.as_array().unwrap().iter().map(|n| s(n, "state")).collect();
        if states == ["UNREACHABLE", "UNREACHABLE"] { Ok(()) } else { Err(format!("{states:?}")) }
    });
    eprintln!(
        "dc1 polled {} times in 4 s; dc2 unreachable after {:.1} s",
        seen.len(),
        t.elapsed().as_secs_f64()
    );
    signal("-CONT");
    // The coordinator first: the thawed agents' shutdown would otherwise wait for its connections.
    grid.coordinator().stop();
}
