//! A coordinator and agents in network namespaces, driven through `gridctl -o json` as an operator would,
//! with the agents' own view (NodeStats, ListJobs, `gridforge-agent job list`) as the oracle.
//!
//! The three tests run in parallel, each on a grid of its own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gridforge_proto::v1::coordinator_client::CoordinatorClient;
use gridforge_proto::v1::{DeleteVmRequest, JobKind, JobState, ListNodesRequest};
use gridforge_tests::agent::Agent;
use gridforge_tests::coordinator::{self, Gridctl, Settings};
use gridforge_tests::grid::{Grid, Shape, first};
use gridforge_tests::netns::Network;
use gridforge_tests::{block_on, sha256_file, verify_wipe_report, wait_for};
use gridforge_tests::{json_str as s, json_u64 as n};
use serde_json::Value;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn vm(ctl: &Gridctl, name: &str) -> Value {
    ctl.json(&["vm", "show", name])
}

fn node(ctl: &Gridctl, name: &str) -> Value {
    ctl.json(&["node", "show", name])
}

/// `vm create -f SPEC --wait`; the finished operation.
fn create(grid: &Grid, name: &str, vcpus: u32, memory_mib: u64, extra: &[&str]) -> Value {
    let spec = grid.spec_file(name, vcpus, memory_mib, 64);
    let mut args = vec!["vm", "create", "-f", spec.to_str().unwrap(), "--wait"];
    args.extend_from_slice(extra);
    let op = grid.admin().json(&args);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "create {name}: {op}");
    op
}

/// The domain `name` as the agent sees it: its state, or None.
fn domain_state(agent: &Agent, name: &str) -> Option<String> {
    agent.stats().vms.into_iter().find(|v| v.name == name).map(|v| v.state)
}

/// Provision jobs for `vm` over all agents.
fn provisions(grid: &Grid, vm: &str) -> usize {
    grid.agents.iter().map(|a| a.provision_jobs(vm).len()).sum()
}

#[test]
fn placement_lifecycle_cordon_and_an_unreachable_node() {
    let t0 = Instant::now();
    let mut grid = Grid::with_coordinator(3, Settings::default());
    let ctl = grid.admin();
    let shapes = [
        ("node-a", Shape { vcpus: 8, memory_mib: 2048 }),
        ("node-b", Shape { vcpus: 8, memory_mib: 1536 }),
        ("node-c", Shape { vcpus: 4, memory_mib: 1024 }),
    ];
    for (name, shape) in shapes {
        let added = grid.enroll(name, shape, &["--label", &format!("rack={name}")]);
        assert_eq!(s(&added, "name"), name, "{added}");
    }
    let nodes = ctl.json(&["node", "list"]);
    let states: Vec<(&str, &str)> =
        nodes.as_array().unwrap().iter().map(|n| (s(n, "name"), s(n, "state"))).collect();
    assert_eq!(states, [("node-a", "READY"), ("node-b", "READY"), ("node-c", "READY")], "{nodes}");
    eprintln!("grid up and enrolled: {:?}", t0.elapsed());

    // Ten VMs of mixed sizes. The first fits only node-a; the next three form a spread group, placed while
    // every node still has room for one of them.
    let t = Instant::now();
    let sizes: [(&str, u32, u64, Option<&str>); 10] = [
        ("vm-big", 2, 1800, None),
        ("web-1", 1, 128, Some("web")),
        ("web-2", 1, 128, Some("web")),
        ("web-3", 1, 128, Some("web")),
        ("vm-01", 1, 256, None),
        ("vm-02", 2, 512, None),
        ("vm-03", 1, 128, None),
        ("vm-04", 2, 384, None),
        ("vm-05", 1, 256, None),
        ("vm-06", 1, 192, None),
    ];
    for (name, vcpus, mem, group) in sizes {
        let extra: Vec<&str> = group.map(|g| vec!["--spread-group", g]).unwrap_or_default();
        create(&grid, name, vcpus, mem, &extra);
    }
    eprintln!("ten creates with --wait: {:?}", t.elapsed());

    let vms = ctl.json(&["vm", "list"]);
    let vms = vms.as_array().expect("a VM list");
    assert_eq!(vms.len(), 10, "{vms:?}");
    let placed: BTreeMap<&str, &str> = vms.iter().map(|v| (s(v, "name"), s(v, "node"))).collect();
    assert_eq!(placed["vm-big"], "node-a", "1800 MiB fits node-a only");
    // Capacity: what each node holds stays within its shape, in the coordinator's view and the agent's.
    for (name, shape) in shapes {
        let here: Vec<&Value> = vms.iter().filter(|v| s(v, "node") == name).collect();
        let mem: u64 = here.iter().map(|v| n(v, &["resources", "memoryMib"])).sum();
        let cpus: u64 = here.iter().map(|v| n(v, &["resources", "vcpus"])).sum();
        assert!(mem <= shape.memory_mib && cpus <= u64::from(shape.vcpus), "{name} over capacity: {here:?}");
        let shown = node(&ctl, name);
        assert_eq!(n(&shown, &["allocated", "memoryMib"]), mem, "{name} allocation: {shown}");
        let agent = grid.agents.iter().find(|a| a.name == name).unwrap();
        for v in &here {
            assert_eq!(
                domain_state(agent, s(v, "name")).as_deref(),
                Some("running"),
                "{} on {name}",
                s(v, "name")
            );
        }
    }
    // Spread: the group's three VMs on three different nodes.
    let mut web: Vec<&str> = ["web-1", "web-2", "web-3"].iter().map(|w| placed[w]).collect();
    web.sort();
    web.dedup();
    // What issue 12 asks for and the coordinator does not do yet: collected, so that the rest of the life
    // cycle is exercised either way, and failed at the end.
    let mut gaps = Vec::new();
    if web.len() != 3 {
        gaps.push(format!("the spread group web shares a node: {placed:?}"));
    }
    // Each VM provisioned exactly once, by its node's agent.
    for (name, node_name) in &placed {
        let agent = grid.agents.iter().find(|a| a.name == *node_name).unwrap();
        let jobs = agent.provision_jobs(name);
        assert_eq!(jobs.len(), 1, "{name}: {jobs:?}");
        assert_eq!(jobs[0].state(), JobState::Succeeded);
        assert_eq!(provisions(&grid, name), 1, "{name} provisioned on one node only");
    }

    // Stop and start, seen by the coordinator and by the agent.
    let t = Instant::now();
    let node_01 = placed["vm-01"];
    let agent_01 = grid.agents.iter().find(|a| a.name == node_01).unwrap();
    ctl.json(&["vm", "stop", "vm-01", "--wait"]);
    assert_eq!(s(&vm(&ctl, "vm-01"), "state"), "STOPPED");
    assert_eq!(domain_state(agent_01, "vm-01").as_deref(), Some("shutoff"));
    ctl.json(&["vm", "start", "vm-01", "--wait"]);
    assert_eq!(s(&vm(&ctl, "vm-01"), "state"), "RUNNING");
    assert_eq!(domain_state(agent_01, "vm-01").as_deref(), Some("running"));
    let controls: Vec<Value> = agent_01
        .job_list_cli()
        .into_iter()
        .filter(|j| s(j, "kind") == "CONTROL" && s(j, "domain") == "vm-01")
        .collect();
    assert_eq!(controls.len(), 2, "a stop and a start job on the agent: {controls:?}");

    // Resize in place when the node has room; a clear refusal when it has not. The VM to grow is one whose
    // node has a vCPU and 64 MiB to spare.
    let free = |node_name: &str| {
        let shape = shapes.iter().find(|(m, _)| *m == node_name).unwrap().1;
        let shown = node(&ctl, node_name);
        let vcpus = u64::from(shape.vcpus) - n(&shown, &["allocated", "vcpus"]);
        (vcpus, shape.memory_mib - n(&shown, &["allocated", "memoryMib"]))
    };
    let (grow, node_grow) = placed
        .iter()
        .map(|(v, m)| (*v, *m))
        .find(|(v, m)| *v != "vm-01" && free(m).0 >= 1 && free(m).1 >= 64)
        .expect("a node with room to grow a VM");
    let before = vm(&ctl, grow);
    let (vcpus, memory) =
        (n(&before, &["resources", "vcpus"]) + 1, n(&before, &["resources", "memoryMib"]) + 64);
    let disk = n(&before, &["resources", "diskMib"]) + 64;
    ctl.json(&["vm", "stop", grow, "--wait"]);
    let disk_arg = disk.to_string();
    let out = ctl.run(&["vm", "resize", grow, "--disk-mib", &disk_arg, "--wait"]);
    if out.success() {
        assert_eq!(n(&vm(&ctl, grow), &["resources", "diskMib"]), disk);
        let agent_grow = grid.agents.iter().find(|a| a.name == node_grow).unwrap();
        let resized = agent_grow.jobs().into_iter().filter(|j| j.kind() == JobKind::Resize).count();
        assert_eq!(resized, 1, "one Resize job on the agent");
    } else if out.stderr.contains("not supported by the connection driver") {
        // libvirt's test driver cannot resize volumes; disk growth is covered against a real libvirtd.
        eprintln!("disk resize not covered on the test driver: {}", out.stderr.trim());
    } else {
        gaps.push(format!("disk resize of {grow}: {}", out.stderr.trim()));
    }
    let (vcpus_arg, memory_arg) = (vcpus.to_string(), memory.to_string());
    let out = ctl.run(&["vm", "resize", grow, "--vcpus", &vcpus_arg, "--memory-mib", &memory_arg, "--wait"]);
    if out.success() {
        let shown = vm(&ctl, grow);
        assert_eq!(n(&shown, &["resources", "vcpus"]), vcpus, "{shown}");
        assert_eq!(n(&shown, &["resources", "memoryMib"]), memory, "{shown}");
        ctl.json(&["vm", "start", grow, "--wait"]);
        let agent_grow = grid.agents.iter().find(|a| a.name == node_grow).unwrap();
        let domain = agent_grow.stats().vms.into_iter().find(|v| v.name == grow).expect("the domain");
        assert_eq!((domain.state.as_str(), u64::from(domain.vcpus)), ("running", vcpus), "the domain grew");
        assert_eq!(domain.memory_bytes, memory << 20, "the agent's domain grew");
    } else {
        gaps.push(format!("vCPU and memory resize of {grow}: {}", out.stderr.trim()));
        ctl.json(&["vm", "start", grow, "--wait"]);
    }
    let current = n(&vm(&ctl, grow), &["resources", "memoryMib"]);
    let too_much = (current + free(node_grow).1 + 1).to_string();
    let out = ctl.run(&["vm", "resize", grow, "--memory-mib", &too_much, "--wait"]);
    assert_eq!(out.status.code(), Some(5), "a resize beyond the node's room is refused: {}", out.describe());
    assert!(
        out.stderr.contains("no room") && out.stderr.contains(grow),
        "the refusal says why: {}",
        out.stderr
    );
    assert_eq!(
        n(&vm(&ctl, grow), &["resources", "memoryMib"]),
        current,
        "the refused resize changed nothing"
    );

    // Delete: the agent's domain goes, its Delete job leaves a wipe report in the grid view.
    let node_03 = placed["vm-03"];
    ctl.json(&["vm", "delete", "vm-03", "--wait"]);
    let agent_03 = grid.agents.iter().find(|a| a.name == node_03).unwrap();
    assert_eq!(domain_state(agent_03, "vm-03"), None, "domain removed");
    let deletes =
        agent_03.jobs().into_iter().filter(|j| j.kind() == JobKind::Delete && j.domain == "vm-03").count();
    assert_eq!(deletes, 1);
    let listed = ctl.json(&["vm", "list"]);
    assert!(listed.as_array().unwrap().iter().all(|v| s(v, "name") != "vm-03"), "{listed}");
    let gone = ctl.json(&["vm", "list", "--all"]);
    let deleted = gone.as_array().unwrap().iter().find(|v| s(v, "name") == "vm-03").expect("kept with --all");
    assert_eq!(s(deleted, "state"), "DELETED");
    assert!(s(deleted, "wipeReport").contains("signature"), "wipe report kept: {deleted}");
    eprintln!("stop/start/resize/delete: {:?}", t.elapsed());

    // Cordon: nothing new lands there; `vm why` says so.
    ctl.json(&["node", "cordon", "node-c"]);
    for name in ["after-cordon-1", "after-cordon-2", "after-cordon-3"] {
        create(&grid, name, 1, 64, &[]);
        let placed = vm(&ctl, name);
        assert_ne!(s(&placed, "node"), "node-c", "{name} landed on a cordoned node");
    }
    let why = ctl.json(&["vm", "why", "after-cordon-1"]);
    let verdict = why["nodes"].as_array().unwrap().iter().find(|v| s(v, "node") == "node-c").cloned();
    assert!(verdict.is_some_and(|v| s(&v, "reason").contains("cordoned")), "{why}");
    ctl.json(&["node", "uncordon", "node-c"]);

    // An agent killed outright goes Unreachable within the configured polls.
    let settings = grid.coordinator().settings.clone();
    grid.agent("node-b").sigkill();
    let t = Instant::now();
    let limit = Duration::from_millis(settings.poll_interval_ms * u64::from(settings.unreachable_after + 2))
        + Duration::from_secs(settings.call_timeout_secs);
    let shown = wait_for("node-b to go Unreachable", limit, Duration::from_millis(100), || {
        let shown = node(&ctl, "node-b");
        (s(&shown, "state") == "UNREACHABLE").then_some(shown)
    });
    eprintln!("agent killed → Unreachable in {:?} (limit {limit:?})", t.elapsed());
    assert!(n(&shown, &["missedPolls"]) >= u64::from(settings.unreachable_after), "{shown}");
    assert_eq!(s(&node(&ctl, "node-a"), "state"), "READY");
    let out = ctl.run(&[
        "vm",
        "create",
        "-f",
        grid.spec_file("to-b", 1, 64, 64).to_str().unwrap(),
        "--node",
        "node-b",
    ]);
    assert_eq!(out.status.code(), Some(5), "nothing is placed on an unreachable node: {}", out.describe());
    assert!(out.stderr.contains("unreachable"), "{}", out.stderr);
    eprintln!("whole lifecycle test: {:?}", t0.elapsed());
    assert!(gaps.is_empty(), "not as issue 12 asks:\n{}", gaps.join("\n"));
}

#[test]
fn refusals_name_the_cause() {
    let mut grid = Grid::with_coordinator(2, Settings::default());
    let ctl = grid.admin();
    let c = grid.coordinator.as_ref().unwrap();
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 512 }, &[]);

    // An agent whose certificate names another node is refused at enrollment.
    let impostor_net = Network::new(1);
    let mut impostor = Agent::with_cert(
        "node-c",
        "node-x",
        &impostor_net.nodes[0],
        &grid.pki,
        &grid.store,
        &grid.path().join("node-c"),
        coordinator::OPERATOR,
    );
    impostor.start();
    let out = ctl.fails(&["node", "add", "node-c", "--address", &impostor.address(), "--datacenter", "dc1"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());
    assert!(out.stderr.contains("node-x"), "the refusal names the certificate: {}", out.stderr);
    assert!(ctl.fails(&["node", "show", "node-c"]).status.code() == Some(3), "not enrolled");
    impostor.kill();

    // A client without a certificate: the TLS handshake itself is refused.
    let endpoint = format!("https://{}", c.listen);
    let ca = Certificate::from_pem(std::fs::read(grid.pki.ca()).unwrap());
    let refused = block_on(async {
        let tls = ClientTlsConfig::new().ca_certificate(ca.clone()).domain_name("localhost");
        let channel =
            Endpoint::from_shared(endpoint.clone()).unwrap().tls_config(tls).unwrap().connect().await;
        match channel {
            Err(e) => format!("connect: {e:?}"),
            Ok(ch) => match CoordinatorClient::new(ch).list_nodes(ListNodesRequest::default()).await {
                Ok(_) => panic!("a client without a certificate listed the nodes"),
                Err(status) => format!("{status:?}"),
            },
        }
    });
    eprintln!("no client certificate: {refused}");
    let plaintext = c.gridctl_without_cert().run(&["node", "list"]);
    assert!(!plaintext.success(), "{}", plaintext.describe());

    // A certificate of the grid that maps to no role.
    let out = c.gridctl(coordinator::NOBODY).fails(&["node", "list"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());

    // Users in the grid view: an admin gives `nobody` a role, which survives a restart, and takes it away.
    let users = ctl.json(&["user", "add", coordinator::NOBODY, "--role", "viewer"]);
    assert_eq!(s(&users["users"][0], "role"), "viewer", "{users}");
    assert_eq!(s(&users["users"][0], "addedBy"), coordinator::ADMIN, "{users}");
    grid.coordinator().restart();
    let c = grid.coordinator.as_ref().unwrap();
    let nobody = c.gridctl(coordinator::NOBODY);
    assert_eq!(nobody.json(&["node", "list"]).as_array().unwrap().len(), 2, "a viewer now");
    let out = nobody.fails(&["vm", "delete", "no-such-vm"]);
    assert_eq!(out.status.code(), Some(4), "a viewer still: {}", out.describe());
    let listed = ctl.json(&["user", "list"]);
    assert_eq!(s(&listed["users"][0], "name"), coordinator::NOBODY, "{listed}");
    assert_eq!(s(&listed["configured"], coordinator::OPERATOR), "operator", "the configuration's: {listed}");
    let out = nobody.fails(&["user", "add", coordinator::VIEWER, "--role", "admin"]);
    assert!(out.stderr.contains("user add needs admin"), "{}", out.describe());
    let out = ctl.fails(&["user", "add", coordinator::ADMIN, "--role", "viewer"]);
    assert!(out.stderr.contains("cannot change its own role"), "{}", out.describe());
    let out = ctl.fails(&["user", "remove", coordinator::VIEWER]);
    assert_eq!(out.status.code(), Some(3), "viewer's role is its OU, not a grid user: {}", out.describe());
    ctl.json(&["user", "remove", coordinator::NOBODY]);
    let out = c.gridctl(coordinator::NOBODY).fails(&["node", "list"]);
    assert_eq!(out.status.code(), Some(4), "no role again: {}", out.describe());

    // A viewer reads, and is denied a delete.
    create(&grid, "keep-me", 1, 128, &[]);
    let viewer = c.gridctl(coordinator::VIEWER);
    assert_eq!(viewer.json(&["vm", "list"]).as_array().unwrap().len(), 1);
    let out = viewer.fails(&["vm", "delete", "keep-me"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());
    let code = block_on(async {
        let tls =
            ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost").identity(Identity::from_pem(
                std::fs::read(grid.pki.cert(coordinator::VIEWER)).unwrap(),
                std::fs::read(grid.pki.key(coordinator::VIEWER)).unwrap(),
            ));
        let ch = Endpoint::from_shared(endpoint).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
        let req = DeleteVmRequest { name: "keep-me".into(), wipe_method: String::new() };
        CoordinatorClient::new(ch).delete_vm(req).await.expect_err("a viewer's delete").code()
    });
    assert_eq!(code, Code::PermissionDenied);
    assert_eq!(s(&vm(&ctl, "keep-me"), "state"), "RUNNING", "the VM is still there");

    // Unknown names.
    for args in [
        &["vm", "show", "no-such-vm"][..],
        &["vm", "delete", "no-such-vm"],
        &["node", "show", "no-such-node"],
        &["node", "cordon", "no-such-node"],
    ] {
        let out = ctl.fails(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", out.describe());
        assert!(out.stderr.contains("no-such"), "the message names it: {}", out.stderr);
    }

    // A duplicate name.
    let spec = grid.spec_file("keep-me", 1, 64, 64);
    let out = ctl.fails(&["vm", "create", "-f", spec.to_str().unwrap(), "--wait"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());
    assert!(out.stderr.contains("already"), "{}", out.stderr);
    assert_eq!(provisions(&grid, "keep-me"), 1, "the duplicate provisioned nothing");

    // Unschedulable: the per-node summary, and no VM, operation or allocation left.
    ctl.json(&["node", "cordon", "node-b"]);
    let spec = grid.spec_file("too-big", 2, 100_000, 64);
    let dry = ctl.json(&["vm", "create", "-f", spec.to_str().unwrap(), "--dry-run"]);
    let reasons: Vec<&str> = dry["nodes"].as_array().unwrap().iter().map(|v| s(v, "reason")).collect();
    assert_eq!(reasons.len(), 2, "{dry}");
    let out = ctl.fails(&["vm", "create", "-f", spec.to_str().unwrap(), "--wait"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.describe());
    assert!(out.stderr.contains("2 nodes: "), "{}", out.stderr);
    assert!(out.stderr.contains("1 cordoned"), "{}", out.stderr);
    assert!(out.stderr.contains("1 insufficient memory (need 100000 MiB"), "{}", out.stderr);
    assert_eq!(ctl.fails(&["vm", "show", "too-big"]).status.code(), Some(3));
    let allocated: u64 =
        ["node-a", "node-b"].iter().map(|m| n(&node(&ctl, m), &["allocated", "memoryMib"])).sum();
    assert_eq!(allocated, 128, "keep-me's allocation only");
    assert_eq!(provisions(&grid, "too-big"), 0);

    // An image no node's store lists: refused by placement, naming it, before any agent is asked.
    let image = format!("{}:{}", gridforge_tests::images::TINY_IMAGE, gridforge_tests::images::TINY_VERSION);
    let listed = node(&ctl, "node-a");
    assert_eq!(listed["images"], serde_json::json!([image]), "the agent's store listing: {listed}");
    let mut spec = gridforge_tests::images::vm_spec("no-image", 1, 64, 64);
    spec["image"]["version"] = "9".into();
    let path = grid.path().join("no-image.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let out = ctl.fails(&["vm", "create", "-f", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", out.describe());
    assert!(out.stderr.contains("1 image tiny:9 not reachable"), "{}", out.stderr);
    assert_eq!(provisions(&grid, "no-image"), 0);
}

#[test]
fn coordinator_killed_mid_create_finishes_or_fails_cleanly_and_provisions_once() {
    let mut grid = Grid::with_coordinator(2, Settings::default());
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 1024 }, &[]);

    // Killed right after the create is accepted, and killed once the agent has the job.
    for (name, wait_for_agent) in [("crash-early", false), ("crash-late", true)] {
        let spec = grid.spec_file(name, 1, 256, 256);
        let op = first(grid.admin().json(&["vm", "create", "-f", spec.to_str().unwrap()]));
        let id = s(&op, "id").to_string();
        assert!(!id.is_empty(), "{op}");
        if wait_for_agent {
            wait_for(
                "the agent to get the provision",
                Duration::from_secs(20),
                Duration::from_millis(5),
                || (provisions(&grid, name) > 0).then_some(()),
            );
        }
        let t = Instant::now();
        grid.coordinator().sigkill();
        grid.coordinator().start();
        eprintln!("{name}: coordinator SIGKILLed and restarted in {:?}", t.elapsed());
        let ctl = grid.admin();
        let done = wait_for(
            "the operation to end after the restart",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let op = ctl.json(&["op", "show", &id]);
                matches!(s(&op, "state"), "SUCCEEDED" | "FAILED").then_some(op)
            },
        );
        let count = provisions(&grid, name);
        match s(&done, "state") {
            "SUCCEEDED" => {
                assert_eq!(count, 1, "{name} provisioned exactly once: {done}");
                let shown = vm(&ctl, name);
                assert_eq!(s(&shown, "state"), "RUNNING", "{shown}");
                let agent = grid.agents.iter().find(|a| a.name == s(&shown, "node")).unwrap();
                assert_eq!(domain_state(agent, name).as_deref(), Some("running"));
            }
            _ => {
                assert!(!s(&done, "error").is_empty(), "a failed operation says why: {done}");
                assert!(count <= 1, "{name} provisioned {count} times");
                eprintln!("{name} failed cleanly: {}", s(&done, "error"));
            }
        }
        eprintln!("{name}: {} after the restart", s(&done, "state"));
    }
    // No allocation without a live VM behind it.
    let ctl = grid.admin();
    let vms = ctl.json(&["vm", "list"]);
    for name in ["node-a", "node-b"] {
        let held: u64 = vms
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| s(v, "node") == name)
            .map(|v| n(v, &["resources", "memoryMib"]))
            .sum();
        assert_eq!(n(&node(&ctl, name), &["allocated", "memoryMib"]), held, "{name}");
    }
}

#[test]
fn a_vm_migrates_cold_to_the_node_placement_picks_and_the_source_is_wiped() {
    // Nodes stay Ready when their agent dies, so that a migration meets the dead agent itself.
    let mut grid = Grid::with_coordinator(3, Settings { unreachable_after: 1000, ..Settings::default() });
    let ctl = grid.admin();
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    grid.enroll("node-c", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    create(&grid, "mover", 1, 256, &["--node", "node-a"]);
    let agent = |name: &str| grid.agents.iter().find(|a| a.name == name).unwrap();
    assert_eq!(domain_state(agent("node-a"), "mover").as_deref(), Some("running"));

    // Refusals that change nothing.
    let out = ctl.fails(&["vm", "migrate", "mover", "--to", "node-a"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("already on node node-a"), "{}", out.stderr);
    // libvirt's test driver runs no guests: a live migration is refused with the reason, and without
    // --live the running VM migrates cold (below).
    let out = ctl.fails(&["vm", "migrate", "mover", "--live"]);
    assert!(
        out.stderr.contains("cannot migrate live: node node-a offers no live migration"),
        "{}",
        out.describe()
    );
    ctl.json(&["node", "cordon", "node-c"]);
    let out = ctl.fails(&["vm", "migrate", "mover", "--to", "node-c"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.describe());
    assert!(out.stderr.contains("cordoned"), "the refusal names the cause: {}", out.stderr);
    let out = ctl.fails(&["vm", "migrate", "no-such-vm"]);
    assert_eq!(out.status.code(), Some(3), "{}", out.describe());
    assert_eq!(s(&vm(&ctl, "mover"), "state"), "RUNNING");

    // Placement picks the destination: node-b (the source is excluded, node-c cordoned). The disk's bytes
    // are compared file to file, the agents' pools being directories.
    let pool_file = |node: &str| agent(node).dir.join("pool/mover.raw");
    let before = sha256_file(&pool_file("node-a"));
    let t = Instant::now();
    let op = ctl.json(&["vm", "migrate", "mover", "--wait"]);
    eprintln!("vm migrate --wait: {:.1} s; {}", t.elapsed().as_secs_f64(), s(&op, "result"));
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    assert!(s(&op, "result").contains("cold migration from node-a to node-b"), "{op}");
    assert!(n(&op, &["downtimeMs"]) > 0, "the downtime of a running VM is measured: {op}");
    let steps: Vec<&str> = op["steps"].as_array().unwrap().iter().map(|st| s(st, "name")).collect();
    assert_eq!(steps, ["stop", "receive", "send"], "{op}");
    let moved = vm(&ctl, "mover");
    assert_eq!((s(&moved, "node"), s(&moved, "state")), ("node-b", "RUNNING"), "{moved}");
    assert_eq!(s(&moved, "migratingTo"), "", "{moved}");
    assert_eq!(domain_state(agent("node-b"), "mover").as_deref(), Some("running"));
    assert_eq!(domain_state(agent("node-a"), "mover"), None, "undefined on the source");
    assert_eq!(sha256_file(&pool_file("node-b")), before, "the destination holds the same bytes");
    // libvirt's test driver forgets the volume without deleting its file: what is left must be zeroes.
    if let Ok(left) = std::fs::read(pool_file("node-a")) {
        assert!(left.iter().all(|&b| b == 0), "the source's copy is wiped");
    }
    assert_eq!(n(&node(&ctl, "node-a"), &["allocated", "memoryMib"]), 0, "the source's allocation released");
    assert_eq!(n(&node(&ctl, "node-b"), &["allocated", "memoryMib"]), 256);

    // The source's copy was wiped, with a report its agent's key verifies.
    verify_wipe_report(
        s(&op["params"], "wipe_report"),
        &agent("node-a").dir,
        &grid.path().join("migrate-wipe-report.json"),
    );

    // And back, stopped: no stop step, no downtime, stays stopped.
    ctl.json(&["vm", "stop", "mover", "--wait"]);
    let op = ctl.json(&["vm", "migrate", "mover", "--to", "node-a", "--wait"]);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    let steps: Vec<&str> = op["steps"].as_array().unwrap().iter().map(|st| s(st, "name")).collect();
    assert_eq!(steps, ["receive", "send"], "{op}");
    let back = vm(&ctl, "mover");
    assert_eq!((s(&back, "node"), s(&back, "state")), ("node-a", "STOPPED"), "{back}");
    assert_eq!(domain_state(agent("node-a"), "mover").as_deref(), Some("shutoff"));

    // A resize with no room left where the VM is: refused, or with --allow-migrate moved first to a node that
    // has room for the new size, then resized there.
    create(&grid, "filler", 1, 600, &["--node", "node-a"]);
    let out = ctl.fails(&["vm", "resize", "mover", "--memory-mib", "512"]);
    assert_eq!(out.status.code(), Some(5), "{}", out.describe());
    assert!(out.stderr.contains("--allow-migrate"), "the refusal says what would do it: {}", out.stderr);
    let out = ctl.run(&["vm", "resize", "mover", "--memory-mib", "512", "--allow-migrate", "--wait"]);
    assert!(out.success(), "{}", out.describe());
    assert!(out.stderr.contains("migrating first"), "{}", out.describe());
    let resized = vm(&ctl, "mover");
    assert_eq!(s(&resized, "node"), "node-b", "{resized}");
    assert_eq!(n(&resized, &["resources", "memoryMib"]), 512, "{resized}");

    // The destination's agent is down: the migration fails naming it, and nothing is half-done: the VM
    // runs on the source again, with its disk, and the destination's reservation is released.
    ctl.json(&["node", "uncordon", "node-c"]);
    ctl.json(&["vm", "start", "mover", "--wait"]);
    grid.agent("node-c").sigkill();
    let out = ctl.run(&["vm", "migrate", "mover", "--to", "node-c", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("node-c"), "the failure names the node: {}", out.stderr);
    assert!(out.stderr.contains("stays on the source, started again"), "{}", out.stderr);
    let stayed = vm(&ctl, "mover");
    assert_eq!((s(&stayed, "node"), s(&stayed, "state")), ("node-b", "RUNNING"), "{stayed}");
    assert_eq!(domain_state(&grid.agents[1], "mover").as_deref(), Some("running"));
    assert_eq!(n(&node(&ctl, "node-c"), &["allocated", "memoryMib"]), 0, "no phantom reservation");
    assert_eq!(n(&node(&ctl, "node-b"), &["allocated", "memoryMib"]), 512);
}

#[test]
fn a_drain_moves_every_vm_off_and_says_what_could_not_move() {
    let mut grid = Grid::with_coordinator(3, Settings::default());
    let ctl = grid.admin();
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 2048 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 512 }, &[]);
    grid.enroll("node-c", Shape { vcpus: 4, memory_mib: 512 }, &[]);
    for name in ["d1", "d2", "d3"] {
        create(&grid, name, 1, 256, &["--node", "node-a"]);
    }
    // Too big for either other node.
    create(&grid, "big", 1, 1024, &["--node", "node-a"]);

    // The coordinator is SIGKILLed once the drain has started its first migrations: after the restart the
    // drain resumes, waits for the migrations it started and starts the rest; nothing moves twice.
    let started = first(ctl.json(&["node", "drain", "node-a", "--max-parallel", "2", "--deadline", "2m"]));
    let id = s(&started, "id").to_string();
    wait_for("the drain's first migration", Duration::from_secs(20), Duration::from_millis(5), || {
        let op = ctl.json(&["op", "show", &id]);
        op["steps"].as_array().unwrap().iter().any(|st| !s(st, "agentJobId").is_empty()).then_some(())
    });
    grid.coordinator().sigkill();
    grid.coordinator().start();
    let ctl = grid.admin();
    let t = Instant::now();
    let drain = wait_for(
        "the drain to end after the restart",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            let op = ctl.json(&["op", "show", &id]);
            matches!(s(&op, "state"), "SUCCEEDED" | "FAILED").then_some(op)
        },
    );
    eprintln!("drain ended {:.1} s after the restart: {}", t.elapsed().as_secs_f64(), s(&drain, "error"));
    assert_eq!(s(&drain, "state"), "FAILED", "one VM cannot move: {drain}");
    assert!(s(&drain, "error").contains("3 of 4 VMs moved off node-a"), "{drain}");
    assert!(
        s(&drain, "error").contains("big: ") && s(&drain, "error").contains("insufficient memory"),
        "why: {drain}"
    );
    let ops = ctl.json(&["op", "list"]);
    let moves = ops
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| s(o, "kind") == "MIGRATE_VM" && s(o, "state") == "SUCCEEDED");
    assert_eq!(moves.count(), 3, "each VM moved once: {ops}");
    for st in drain["steps"].as_array().unwrap() {
        let want = if s(st, "name") == "big" { "FAILED" } else { "SUCCEEDED" };
        assert_eq!(s(st, "state"), want, "{st}");
    }
    let mut placed = BTreeMap::new();
    for name in ["d1", "d2", "d3"] {
        let v = vm(&ctl, name);
        assert_eq!(s(&v, "state"), "RUNNING", "{v}");
        *placed.entry(s(&v, "node").to_string()).or_insert(0) += 1;
    }
    assert!(!placed.contains_key("node-a"), "{placed:?}");
    assert_eq!(s(&vm(&ctl, "big"), "node"), "node-a");
    assert!(node(&ctl, "node-a")["cordoned"].as_bool().unwrap_or(false), "a drain cordons");

    // Once the last VM is gone the node is Drained; uncordon takes it back.
    ctl.json(&["vm", "delete", "big", "--wait"]);
    let table = ctl.run(&["node", "list", "-o", "table"]);
    let row = table.stdout.lines().find(|l| l.starts_with("node-a")).unwrap_or_default().to_string();
    assert!(row.contains("Ready,Drained"), "{}", table.stdout);
    ctl.json(&["node", "uncordon", "node-a"]);
    assert!(!node(&ctl, "node-a")["cordoned"].as_bool().unwrap_or(false));
}

/// The `command` fencing actuator of the loss test: it waits for the test's go (`gate`) and fails while
/// `fail` exists. It powers nothing off: the node's agent keeps its domains, as a node whose power-off left
/// them defined, so that the test sees them wiped when the node comes back.
const ACTUATOR: &str = r#"#!/bin/sh
dir=$(dirname "$0")
node=$1
while [ ! -e "$dir/gate" ]; do
  if [ -e "$dir/fail" ]; then echo "bmc of $node does not answer" >&2; exit 3; fi
  sleep 0.1
done
echo "$node powered off"
"#;

#[test]
fn a_lost_node_is_fenced_before_its_vms_are_rebuilt_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let actuator = dir.path().join("power-off");
    std::fs::write(&actuator, ACTUATOR).unwrap();
    let fail = dir.path().join("fail");
    std::fs::write(&fail, "").unwrap();
    let settings = Settings {
        lost_after_secs: 2,
        fencing_command: vec!["/bin/sh".into(), actuator.display().to_string(), "{node}".into()],
        ..Settings::default()
    };
    let grid = Grid::with_coordinator(3, settings);
    let ctl = grid.admin();
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 2048 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 512 }, &[]);
    grid.enroll("node-c", Shape { vcpus: 4, memory_mib: 512 }, &[]);
    create(&grid, "keeper", 1, 256, &["--node", "node-a"]);
    create(&grid, "too-big", 1, 1024, &["--node", "node-a"]);

    // Cut node-a off its network: Unreachable, then Lost, then fenced by the actuator, which fails first.
    let cut = |state: &str| {
        let ns = &grid.agents[0].ns;
        gridforge_tests::process::run_ok(
            ns.command("ip").args(["link", "set", "eth0", state]),
            Duration::from_secs(10),
        )
    };
    cut("down");
    let t = Instant::now();
    let failed =
        wait_for("the first fencing to fail", Duration::from_secs(30), Duration::from_millis(100), || {
            let ops = ctl.json(&["op", "list"]);
            ops.as_array()
                .unwrap()
                .iter()
                .find(|o| s(o, "kind") == "FENCE_NODE" && s(o, "state") == "FAILED")
                .cloned()
        });
    eprintln!("cut off -> fencing failed in {:.1} s: {}", t.elapsed().as_secs_f64(), s(&failed, "error"));
    assert!(s(&failed, "error").contains("does not answer"), "the actuator's own words: {failed}");
    let lost = node(&ctl, "node-a");
    assert_eq!(s(&lost, "state"), "LOST", "{lost}");
    assert!(!lost["fenced"].as_bool().unwrap_or(false), "{lost}");
    std::thread::sleep(Duration::from_secs(1));
    let keeper = vm(&ctl, "keeper");
    assert_eq!(s(&keeper, "node"), "node-a", "nothing is rebuilt while the node is not fenced: {keeper}");
    let ops = ctl.json(&["op", "list"]);
    let auto_fences = ops.as_array().unwrap().iter().filter(|o| s(o, "kind") == "FENCE_NODE").count();
    assert_eq!(auto_fences, 1, "fenced once per loss, not every poll: {ops}");

    // Again by hand, with the actuator working: it holds until the gate opens; only then the rebuild.
    std::fs::remove_file(&fail).unwrap();
    let fence = first(ctl.json(&["node", "fence", "node-a"]));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(s(&vm(&ctl, "keeper"), "node"), "node-a", "not before the actuator reports it off");
    std::fs::write(dir.path().join("gate"), "").unwrap();
    let t = Instant::now();
    let rebuilt =
        wait_for("keeper to run elsewhere", Duration::from_secs(30), Duration::from_millis(100), || {
            let v = vm(&ctl, "keeper");
            (s(&v, "state") == "RUNNING" && s(&v, "node") != "node-a").then_some(v)
        });
    eprintln!("fenced -> keeper running on {} in {:.1} s", s(&rebuilt, "node"), t.elapsed().as_secs_f64());
    assert_eq!(s(&rebuilt, "rebuiltFrom"), "node-a", "{rebuilt}");
    let done = ctl.json(&["op", "show", s(&fence, "id")]);
    assert_eq!(s(&done, "state"), "SUCCEEDED", "{done}");
    assert!(s(&done, "result").contains("node-a powered off"), "{done}");
    let on = grid.agents.iter().find(|a| a.name == s(&rebuilt, "node")).unwrap();
    assert_eq!(domain_state(on, "keeper").as_deref(), Some("running"));
    let pending =
        wait_for("too-big to be pending", Duration::from_secs(10), Duration::from_millis(100), || {
            let v = vm(&ctl, "too-big");
            (s(&v, "state") == "PENDING").then_some(v)
        });
    assert!(s(&pending, "error").contains("insufficient memory"), "says why: {pending}");
    assert_eq!(
        n(&node(&ctl, "node-b"), &["allocated", "memoryMib"])
            + n(&node(&ctl, "node-c"), &["allocated", "memoryMib"]),
        256
    );

    // node-a comes back with its old domains: the one of the VM now on another node is wiped (the agent's
    // Delete job) before node-a is unfenced; node-a stays cordoned.
    cut("up");
    let back = wait_for(
        "node-a to be back and unfenced",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let n = node(&ctl, "node-a");
            (s(&n, "state") == "READY" && !n["fenced"].as_bool().unwrap_or(false)).then_some(n)
        },
    );
    assert!(back["cordoned"].as_bool().unwrap_or(false), "{back}");
    assert_eq!(domain_state(&grid.agents[0], "keeper"), None, "the stale copy is gone");
    let ops = ctl.json(&["op", "list"]);
    let clean =
        ops.as_array().unwrap().iter().find(|o| s(o, "kind") == "CLEAN_NODE").expect("a clean").clone();
    assert_eq!(s(&clean, "state"), "SUCCEEDED", "{clean}");
    let steps: Vec<&str> = clean["steps"].as_array().unwrap().iter().map(|st| s(st, "name")).collect();
    assert_eq!(steps, ["keeper"], "only the VM now elsewhere: {clean}");
    let keeper = vm(&ctl, "keeper");
    assert_eq!(
        (s(&keeper, "node"), s(&keeper, "state")),
        (s(&rebuilt, "node"), "RUNNING"),
        "untouched: {keeper}"
    );
}

#[test]
fn a_destination_that_dies_mid_stream_leaves_the_vm_where_it_was() {
    let mut grid = Grid::with_coordinator(2, Settings { unreachable_after: 1000, ..Settings::default() });
    let ctl = grid.admin();
    grid.enroll("node-a", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 4, memory_mib: 1024 }, &[]);
    let spec = grid.spec_file("bulky", 1, 256, 1024);
    let op = grid.admin().json(&["vm", "create", "-f", spec.to_str().unwrap(), "--node", "node-a", "--wait"]);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    // 768 MiB of data in the disk (past its first 128 MiB), so that the stream lasts long enough to be cut.
    let disk = grid.agents[0].dir.join("pool/bulky.raw");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.seek(SeekFrom::Start(128 << 20)).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..768 {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    let before = sha256_file(&disk);

    let op = first(ctl.json(&["vm", "migrate", "bulky", "--to", "node-b"]));
    let id = s(&op, "id").to_string();
    wait_for("the disk to be streaming", Duration::from_secs(30), Duration::from_millis(10), || {
        let op = ctl.json(&["op", "show", &id]);
        let send = op["steps"].as_array().unwrap().iter().find(|st| s(st, "name") == "send").cloned();
        send.filter(|st| n(st, &["bytesDone"]) > 0 && n(st, &["bytesDone"]) < n(st, &["bytesTotal"]))
            .map(|st| eprintln!("cut at {} of {} bytes", n(&st, &["bytesDone"]), n(&st, &["bytesTotal"])))
    });
    grid.agent("node-b").sigkill();
    let done = wait_for("the migration to fail", Duration::from_secs(60), Duration::from_millis(100), || {
        let op = ctl.json(&["op", "show", &id]);
        matches!(s(&op, "state"), "SUCCEEDED" | "FAILED").then_some(op)
    });
    assert_eq!(s(&done, "state"), "FAILED", "{done}");
    assert!(s(&done, "error").contains("stays on the source, started again"), "{done}");
    let stayed = vm(&ctl, "bulky");
    assert_eq!((s(&stayed, "node"), s(&stayed, "state")), ("node-a", "RUNNING"), "{stayed}");
    assert_eq!(domain_state(&grid.agents[0], "bulky").as_deref(), Some("running"));
    assert_eq!(sha256_file(&disk), before, "the source's disk is untouched");
    assert_eq!(n(&node(&ctl, "node-b"), &["allocated", "memoryMib"]), 0, "no phantom reservation");
    // The destination's agent, started again, leaves nothing of the half-received disk readable.
    let partial = grid.agents[1].dir.join("pool/bulky.raw");
    let head = |path: &std::path::Path| {
        std::fs::read(path).ok().map(|b| b.into_iter().take(1 << 20).collect::<Vec<u8>>())
    };
    assert!(
        head(&partial).is_some_and(|h| h.iter().any(|&b| b != 0)),
        "the half-received disk, before the restart"
    );
    grid.agent("node-b").start();
    wait_for(
        "the half-received disk to be cleaned",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || head(&partial).is_none_or(|h| h.iter().all(|&b| b == 0)).then_some(()),
    );
}

#[test]
fn a_rebuild_interrupted_by_a_coordinator_restart_resumes_and_rebuilds_each_vm_once() {
    let settings = Settings {
        lost_after_secs: 2,
        fencing_command: vec!["/bin/true".into(), "{node}".into()],
        ..Settings::default()
    };
    let mut grid = Grid::with_coordinator(2, settings);
    grid.enroll("node-a", Shape { vcpus: 8, memory_mib: 2048 }, &[]);
    grid.enroll("node-b", Shape { vcpus: 8, memory_mib: 2048 }, &[]);
    const VMS: [&str; 3] = ["re-1", "re-2", "re-3"];
    for name in VMS {
        let spec = grid.spec_file(name, 1, 256, 256);
        let op =
            grid.admin().json(&["vm", "create", "-f", spec.to_str().unwrap(), "--node", "node-a", "--wait"]);
        assert_eq!(s(&op, "state"), "SUCCEEDED", "{op}");
    }
    let ns = grid.agents[0].ns.clone();
    gridforge_tests::process::run_ok(
        ns.command("ip").args(["link", "set", "eth0", "down"]),
        Duration::from_secs(10),
    );

    // Killed once a rebuild has reached node-b's agent and before all of them ended.
    let ctl = grid.admin();
    let rebuilds = |ctl: &Gridctl| -> Vec<Value> {
        let ops = ctl.json(&["op", "list"]);
        ops.as_array().unwrap().iter().filter(|o| s(o, "kind") == "REBUILD_VM").cloned().collect()
    };
    let at_kill =
        wait_for("a rebuild on node-b's agent", Duration::from_secs(60), Duration::from_millis(20), || {
            let ops = rebuilds(&ctl);
            let started = ops.iter().any(|o| {
                o["steps"].as_array().is_some_and(|st| st.iter().any(|st| !s(st, "agentJobId").is_empty()))
            });
            let all_done = ops.len() == VMS.len() && ops.iter().all(|o| s(o, "state") == "SUCCEEDED");
            (started && !all_done).then_some(ops)
        });
    grid.coordinator().sigkill();
    let states: Vec<String> = at_kill.iter().map(|o| format!("{} {}", s(o, "vm"), s(o, "state"))).collect();
    eprintln!("coordinator SIGKILLed with the rebuilds at: {states:?}");
    grid.coordinator().start();

    let ctl = grid.admin();
    wait_for("every VM running on node-b", Duration::from_secs(90), Duration::from_millis(200), || {
        VMS.iter()
            .all(|name| {
                let v = vm(&ctl, name);
                s(&v, "node") == "node-b" && s(&v, "state") == "RUNNING"
            })
            .then_some(())
    });
    let node_b = &grid.agents[1];
    for name in VMS {
        assert_eq!(node_b.provision_jobs(name).len(), 1, "{name} is provisioned once on node-b");
        assert_eq!(domain_state(node_b, name).as_deref(), Some("running"));
        assert_eq!(s(&vm(&ctl, name), "rebuiltFrom"), "node-a");
    }
    let ops = rebuilds(&ctl);
    assert_eq!(ops.len(), VMS.len(), "one rebuild operation per VM, resumed rather than repeated: {ops:?}");
    assert!(ops.iter().all(|o| s(o, "state") == "SUCCEEDED"), "{ops:?}");
    assert_eq!(n(&node(&ctl, "node-b"), &["allocated", "memoryMib"]), 3 * 256, "allocated once each");
}
