//! The etcd harness itself: a three-member cluster on loopback that keeps answering with one member killed,
//! refuses writes without a quorum, takes them again once a member is back on its own data, and leaves no
//! process or port behind.

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use gridforge_tests::etcd::EtcdCluster;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::Value;

/// What `etcdctl get KEY --print-value-only` printed, trimmed.
fn get(etcd: &EtcdCluster, key: &str) -> String {
    let out = etcd.etcdctl(&["get", key, "--print-value-only"]);
    assert!(out.success(), "get {key}: {}", out.describe());
    out.stdout.trim().to_string()
}

fn put(etcd: &EtcdCluster, key: &str, value: &str) {
    let out = etcd.etcdctl(&["put", key, value]);
    assert!(out.success(), "put {key}: {}\n{}", out.describe(), etcd.log_tail());
}

/// Member `i`'s id as it reports it itself (hex, as etcdctl prints member ids).
fn member_id(etcd: &EtcdCluster, i: usize) -> String {
    let out = etcd.etcdctl_at(i, &["endpoint", "status", "-w", "json"]);
    assert!(out.success(), "endpoint status of member {i}: {}", out.describe());
    let status: Value = serde_json::from_str(&out.stdout).unwrap();
    let id = status[0]["Status"]["header"]["member_id"].as_u64().expect("a member id");
    format!("{id:x}")
}

#[test]
fn three_etcd_members_keep_a_quorum_lose_it_regain_it_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut pids = Vec::new();
    let endpoints;
    {
        let t = Instant::now();
        let mut etcd = EtcdCluster::start(3, dir.path());
        eprintln!("three members healthy in {:?}", t.elapsed());
        endpoints = etcd.endpoints();
        let distinct: BTreeSet<&String> = endpoints.iter().collect();
        assert_eq!(distinct.len(), 3, "{endpoints:?}");
        assert!(endpoints.iter().all(|e| e.starts_with("http://127.0.0.1:")), "loopback only: {endpoints:?}");
        pids.extend((0..3).map(|i| etcd.pid(i).unwrap()));
        for i in 0..3 {
            assert!(dir.path().join(format!("etcd-{i}/data/member")).is_dir(), "member {i}'s data dir");
        }

        // One cluster of three started members, reachable at the URLs the harness gives out.
        let out = etcd.etcdctl(&["member", "list", "-w", "json"]);
        assert!(out.success(), "{}", out.describe());
        let list: Value = serde_json::from_str(&out.stdout).unwrap();
        let urls: BTreeSet<String> = list["members"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|m| m["clientURLs"].as_array().cloned().unwrap_or_default())
            .map(|u| u.as_str().unwrap().to_string())
            .collect();
        assert_eq!(urls, endpoints.iter().cloned().collect(), "{list}");

        // A second cluster in the same test joins nothing of the first (its own token and ports).
        let other_dir = tempfile::tempdir().unwrap();
        let other = EtcdCluster::start(1, other_dir.path());
        let out = other.etcdctl(&["member", "list", "-w", "json"]);
        let members: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(members["members"].as_array().map(Vec::len), Some(1), "{members}");
        drop(other);

        put(&etcd, "k1", "v1");
        let id0 = member_id(&etcd, 0);

        // One member killed: the other two keep a quorum (and elect a leader among them if it led).
        etcd.kill(0);
        assert!(!etcd.running(0));
        etcd.wait_healthy();
        assert!(TcpStream::connect(endpoints[0].trim_start_matches("http://")).is_err(), "member 0 is gone");
        put(&etcd, "k2", "v2");
        assert_eq!(get(&etcd, "k1"), "v1");

        // Two killed: the last one has no quorum. Past an election timeout it has no leader either, so a
        // write is refused outright rather than left in its log.
        etcd.kill(1);
        std::thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let out = etcd.etcdctl(&["put", "k3", "v3"]);
        eprintln!("a write without a quorum: {:?}: {}", t.elapsed(), out.stderr.trim());
        assert!(!out.success(), "a write without a quorum succeeded: {}", out.describe());
        assert!(t.elapsed() < Duration::from_secs(10), "refused within etcdctl's command timeout");
        let out = etcd.etcdctl(&["endpoint", "health"]);
        assert!(!out.success(), "healthy without a quorum: {}", out.describe());

        // Member 0 back on its data dir and ports: a quorum again, as the same member, with the writes it
        // missed while it was down, and without the refused one.
        let t = Instant::now();
        etcd.restart(0);
        etcd.wait_healthy();
        eprintln!("quorum back {:?} after member 0's restart", t.elapsed());
        assert_eq!(member_id(&etcd, 0), id0, "member 0 rejoined as itself");
        let out = etcd.etcdctl_at(0, &["get", "k2", "--print-value-only"]);
        assert_eq!(out.stdout.trim(), "v2", "member 0 caught up: {}", out.describe());
        assert_eq!(get(&etcd, "k3"), "", "the refused write left nothing");
        put(&etcd, "k4", "v4");

        etcd.restart(1);
        etcd.wait_healthy();
        assert!(etcd.etcdctl(&["endpoint", "health"]).success());
        assert_eq!(get(&etcd, "k4"), "v4");
        pids.extend((0..3).map(|i| etcd.pid(i).unwrap()));
    }

    // Dropped: every member's process is gone and its client port closed.
    for pid in pids {
        let gone = kill(Pid::from_raw(pid as i32), None).is_err();
        assert!(gone, "etcd process {pid} outlived its cluster");
    }
    for e in &endpoints {
        assert!(TcpStream::connect(e.trim_start_matches("http://")).is_err(), "{e} still answers");
    }
}
