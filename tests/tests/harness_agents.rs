//! The multi-node harness itself: three agents in three network namespaces, each answering over mutual TLS
//! from the root namespace (where the coordinator runs), provisioning from the tiny store, killed and
//! restarted, and nothing of the test's left afterwards.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use gridforge_proto::v1::{JobKind, JobState, ProvisionJob, SubmitJobRequest, VmSpec, submit_job_request};
use gridforge_tests::grid::Grid;
use gridforge_tests::images::vm_spec;
use gridforge_tests::netns::{self, Network, ip};
use gridforge_tests::process;

fn provision_request(key: &str, spec: serde_json::Value) -> SubmitJobRequest {
    let spec: VmSpec = serde_json::from_value(spec).expect("a VmSpec");
    SubmitJobRequest {
        idempotency_key: key.to_string(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob { spec: Some(spec), target: None })),
        ..Default::default()
    }
}

#[test]
fn three_agents_in_three_namespaces_answer_over_mutual_tls_and_leave_nothing_behind() {
    let t0 = Instant::now();
    {
        let mut grid = Grid::agents(3);
        eprintln!("three agents ready in {:?}", t0.elapsed());
        let names: Vec<String> = grid.agents.iter().map(|a| a.ns.name.clone()).collect();
        assert_eq!(netns::own_namespaces().len(), 3, "{:?}", netns::own_namespaces());
        let mut addrs: Vec<_> = grid.agents.iter().map(|a| a.ns.addr).collect();
        addrs.dedup();
        assert_eq!(addrs.len(), 3, "one address per agent: {addrs:?}");

        for agent in &grid.agents {
            // The daemon runs inside its namespace...
            let pid = agent.pid().unwrap().to_string();
            let identified = ip(&["netns", "identify", &pid]);
            assert_eq!(identified.trim(), agent.ns.name, "agent {} runs in its namespace", agent.name);
            // ...so the root namespace's loopback does not reach it, the bridge does.
            let loopback: SocketAddr = format!("127.0.0.1:{}", agent.socket_addr().port()).parse().unwrap();
            assert!(TcpStream::connect_timeout(&loopback, Duration::from_millis(200)).is_err());
            assert!(TcpStream::connect_timeout(&agent.socket_addr(), Duration::from_secs(2)).is_ok());
            assert!(agent.jobs().is_empty());
            // The operator's CLI reads the same view.
            assert!(agent.job_list_cli().is_empty());
            let stats = agent.stats();
            // The test driver starts with its own domain "test" only.
            let vms: Vec<&str> = stats.vms.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(vms, ["test"], "a fresh test driver has no domains of ours");
        }
        // Each namespace sees the others' agents on the bridge, and nothing beyond it.
        let a = &grid.agents[0];
        let out = process::run(a.ns.command("ip").args(["route", "show"]), Duration::from_secs(10));
        assert!(!out.stdout.contains("default"), "no default route in a node namespace: {}", out.stdout);

        // A provision from the tiny store takes well under a second.
        let t = Instant::now();
        let job = a.submit(provision_request("harness-vm-1", vm_spec("harness-vm-1", 1, 128, 64)));
        let job = a.wait_job(&job.id, Duration::from_secs(30));
        assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
        eprintln!("one provision from the tiny store: {:?}", t.elapsed());
        let provisions = a.provision_jobs("harness-vm-1");
        assert_eq!(provisions.len(), 1, "{provisions:?}");
        assert_eq!(provisions[0].kind(), JobKind::Provision);
        let stats = a.stats();
        let vm = stats.vms.iter().find(|v| v.name == "harness-vm-1").expect("the domain is defined");
        assert_eq!(vm.state, "running", "{vm:?}");
        let volume = a.dir.join("pool/harness-vm-1.raw");
        let len = std::fs::metadata(&volume).map(|m| m.len()).unwrap_or_default();
        assert_eq!(len, 64 << 20, "the pool volume is a file in the agent's directory: {}", volume.display());

        // SIGKILL: the agent stops answering; restarted on the same state it answers again and still knows
        // the job from its journal.
        let b = grid.agent("node-b");
        b.sigkill();
        assert!(TcpStream::connect_timeout(&b.socket_addr(), Duration::from_millis(500)).is_err());
        let t = Instant::now();
        b.start();
        eprintln!("agent restart: {:?}", t.elapsed());
        let a = grid.agent("node-a");
        let t = Instant::now();
        a.restart();
        eprintln!("agent stop (SIGTERM) and start: {:?}", t.elapsed());
        assert_eq!(a.provision_jobs("harness-vm-1").len(), 1, "the journal survives a restart");

        drop(grid);
        for ns in &names {
            assert!(!netns::own_namespaces().contains(ns), "{ns} removed");
        }
    }
    assert!(netns::own_namespaces().is_empty(), "namespaces left: {:?}", netns::own_namespaces());
    assert!(netns::own_links().is_empty(), "links left: {:?}", netns::own_links());
    let listed = ip(&["netns", "list"]);
    let prefix = format!("gft-{}-", std::process::id());
    assert!(!listed.contains(&prefix), "ip netns list still shows ours: {listed}");
    eprintln!("whole harness test: {:?}", t0.elapsed());
}

#[test]
fn parallel_networks_get_their_own_subnets_and_stale_ones_are_removed() {
    let one = Network::new(1);
    let two = Network::new(1);
    assert_ne!(one.cidr(), two.cidr());
    assert_ne!(one.bridge, two.bridge);
    // A node has a route to its own bridge and none to the other network or anywhere else.
    let route = |from: &Network, to: &str| {
        process::run(from.nodes[0].command("ip").args(["route", "get", to]), Duration::from_secs(10))
    };
    let own = route(&one, &one.host_addr.to_string());
    assert!(own.success() && own.stdout.contains("dev eth0"), "{}", own.describe());
    assert!(!route(&one, &two.nodes[0].addr.to_string()).success(), "networks are separate");
    assert!(!route(&one, "192.0.2.1").success(), "no way out of the test network");

    // What a killed run leaves (names with a process id that no longer runs) goes at the next start.
    let dead = dead_pid();
    let ns = format!("gft-{dead}-0");
    let link = format!("gf{dead}b0");
    ip(&["netns", "add", &ns]);
    ip(&["link", "add", &link, "type", "bridge"]);
    netns::remove_stale();
    assert!(!ip(&["netns", "list"]).contains(&ns));
    let out = process::run(Command::new("ip").args(["link", "show", &link]), Duration::from_secs(10));
    assert!(!out.success(), "stale link {link} removed");
}

/// A process id that no process has now.
fn dead_pid() -> u32 {
    (4_000_000..4_100_000)
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .expect("an unused pid")
}
