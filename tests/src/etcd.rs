//! A real etcd cluster for the coordinators that share a grid view: one `/usr/bin/etcd` process per member
//! (Debian's etcd-server), on loopback with ports picked here, data under the test's directory.
//!
//! Members are [`Daemon`]s: killed on drop and with the test thread. A member killed with
//! [`EtcdCluster::kill`] comes back with [`EtcdCluster::restart`] on the same data directory and ports, so it
//! rejoins as itself.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::process::{self, Daemon, Outcome};

pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

/// How long a cluster may take to elect a leader and answer a linearizable read.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one etcdctl call may take (its own --command-timeout is shorter).
const ETCDCTL_LIMIT: Duration = Duration::from_secs(15);

/// One member: its name, ports, data directory and (while it runs) process.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: PathBuf,
    dir: PathBuf,
    daemon: Option<Daemon>,
    /// The log of the latest start.
    log: Option<PathBuf>,
    starts: u32,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }
}

pub struct EtcdCluster {
    members: Vec<Member>,
    /// `name=peer-url,...` of every member, as each was started with.
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// Start `members` members under `dir` (one subdirectory each) and wait until the cluster is healthy.
    pub fn start(members: usize, dir: &Path) -> EtcdCluster {
        assert!(members >= 1, "an etcd cluster has at least one member");
        assert!(Path::new(ETCD).is_file(), "{ETCD} is missing: scripts/deps installs etcd-server");
        let members: Vec<Member> = (0..members)
            .map(|i| {
                let name = format!("etcd-{i}");
                let member_dir = dir.join(&name);
                std::fs::create_dir_all(&member_dir).unwrap();
                Member {
                    client: loopback(),
                    peer: loopback(),
                    data_dir: member_dir.join("data"),
                    dir: member_dir,
                    name,
                    daemon: None,
                    log: None,
                    starts: 0,
                }
            })
            .collect();
        let initial_cluster =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url())).collect::<Vec<_>>().join(",");
        let mut cluster = EtcdCluster { members, initial_cluster, token: unique_token() };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        cluster
    }

    /// Client URLs of every member (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether member `i`'s process runs.
    pub fn running(&mut self, i: usize) -> bool {
        self.members[i].running()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].daemon.as_ref().map(Daemon::pid)
    }

    /// SIGKILL member `i`: no shutdown at all.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut d) = self.members[i].daemon.take() {
            d.sigkill();
        }
    }

    /// Start member `i` again on its data directory and ports (killing it first if it runs). It does not
    /// wait: a member alone without a quorum is never healthy; [`wait_healthy`](Self::wait_healthy) does.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    fn spawn(&mut self, i: usize) {
        let (initial_cluster, token) = (self.initial_cluster.clone(), self.token.clone());
        let m = &mut self.members[i];
        assert!(m.daemon.is_none(), "etcd member {} is already running", m.name);
        m.starts += 1;
        let log = m.dir.join(format!("etcd-{}.log", m.starts));
        let mut cmd = Command::new(ETCD);
        clear_env(&mut cmd);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &m.client_url(), "--advertise-client-urls", &m.client_url()])
            .args(["--listen-peer-urls", &m.peer_url(), "--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &token])
            .args(["--max-txn-ops", "1024"])
            // A killed member is noticed within a second and a new etcd leader elected soon after.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        m.daemon = Some(Daemon::spawn(&mut cmd, &log));
        m.log = Some(log);
    }

    /// Wait until every running member answers a linearizable read (so the cluster has a quorum and a
    /// leader), at most [`HEALTHY_TIMEOUT`].
    pub fn wait_healthy(&mut self) {
        let start = Instant::now();
        loop {
            let exited = self.members.iter_mut().find_map(|m| {
                let status = m.daemon.as_mut().and_then(Daemon::exited)?;
                Some((m.name.clone(), status))
            });
            if let Some((name, status)) = exited {
                panic!("etcd member {name} exited ({status}):\n{}", self.log_tail());
            }
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.success() {
                return;
            }
            assert!(
                start.elapsed() < HEALTHY_TIMEOUT,
                "etcd not healthy within {HEALTHY_TIMEOUT:?}: {}\n{}",
                out.describe(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl ARGS` against the running members, with short dial and command timeouts.
    pub fn etcdctl(&self, args: &[&str]) -> Outcome {
        let endpoints: Vec<String> =
            self.members.iter().filter(|m| m.daemon.is_some()).map(Member::client_url).collect();
        assert!(!endpoints.is_empty(), "no etcd member runs");
        etcdctl(&endpoints, args)
    }

    /// `etcdctl ARGS` against member `i` alone.
    pub fn etcdctl_at(&self, i: usize, args: &[&str]) -> Outcome {
        etcdctl(&[self.members[i].client_url()], args)
    }

    /// The last lines of every member's latest log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        for m in &self.members {
            let Some(log) = &m.log else { continue };
            let content = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            text.push_str(&format!("--- {} ({})\n", m.name, log.display()));
            text.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
            text.push('\n');
        }
        text
    }
}

/// `etcdctl ARGS` against `endpoints`, with short dial and command timeouts.
fn etcdctl(endpoints: &[String], args: &[&str]) -> Outcome {
    let mut cmd = Command::new(ETCDCTL);
    clear_env(&mut cmd);
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["--dial-timeout=1s", "--command-timeout=3s"])
        .args(args);
    process::run(&mut cmd, ETCDCTL_LIMIT)
}

/// A free loopback address.
fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], gridforge_common::net::unused_loopback_port()))
}

/// etcd and etcdctl read every flag from an `ETCD_`/`ETCDCTL_` variable too: none of the caller's apply.
fn clear_env(cmd: &mut Command) {
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("ETCD") {
            cmd.env_remove(&var);
        }
    }
}

/// A token no other cluster uses, so that members of two tests never join each other.
fn unique_token() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("gridforge-test-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
