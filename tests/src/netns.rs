//! A private network: one bridge in the root namespace holding the subnet's first address, and one network
//! namespace per node joined to it by a veth pair.
//!
//! The coordinator and `gridctl` run in the root namespace: the bridge's address gives them a route to every
//! node, and nothing has to be started inside a namespace but the agents. The namespaces get no default
//! route, so all traffic stays on loopback or between addresses of this network.
//!
//! Names carry the test process id: namespaces `gft-<pid>-<n>`, links `gf<pid>b<n>` (bridge), `gf<pid>h<n>`
//! (root end of a veth). Subnets are `10.231.X.0/24`, X chosen under a machine-wide lock as one no address in
//! the root namespace uses, so test binaries run in parallel. The first network of a process removes the
//! namespaces and links whose process is gone (a test killed before its destructors ran).

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::process::{self, Outcome};

/// Second octet of every test subnet: 10.231.0.0/16 is reserved for these tests.
const SUBNET_OCTET: u8 = 231;
const NETNS_PREFIX: &str = "gft-";
const LINK_PREFIX: &str = "gf";
const LOCK_FILE: &str = "/run/lock/gridforge-tests-net.lock";
const IP_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `ip ARGS`, required to succeed.
pub fn ip(args: &[&str]) -> String {
    process::run_ok(Command::new("ip").args(args), IP_TIMEOUT)
}

/// `ip ARGS`, whatever the outcome (cleanup of what may already be gone).
fn ip_try(args: &[&str]) -> Outcome {
    process::run(Command::new("ip").args(args), IP_TIMEOUT)
}

/// One node's namespace.
#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
    pub addr: Ipv4Addr,
    /// Root end of the veth pair (deleting it deletes both ends).
    host_link: String,
}

impl Netns {
    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

/// The bridge, its subnet and the namespaces on it; all removed on drop.
#[derive(Debug)]
pub struct Network {
    pub bridge: String,
    /// The root namespace's address on the bridge (the subnet's first address).
    pub host_addr: Ipv4Addr,
    pub nodes: Vec<Netns>,
    subnet: u8,
}

impl Network {
    /// A bridge and `count` namespaces, node i at the subnet's address i + 2.
    pub fn new(count: usize) -> Network {
        assert!(count <= 250, "at most 250 nodes on one test network");
        let lock = NetLock::acquire();
        static CLEAN: Once = Once::new();
        CLEAN.call_once(remove_stale);
        let pid = std::process::id();
        let subnet = free_subnet();
        let host_addr = Ipv4Addr::new(10, SUBNET_OCTET, subnet, 1);
        let bridge = format!("{LINK_PREFIX}{pid}b{}", NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let mut net = Network { bridge: bridge.clone(), host_addr, nodes: Vec::new(), subnet };
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        drop(lock);
        for i in 0..count {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let addr = Ipv4Addr::new(10, SUBNET_OCTET, subnet, i as u8 + 2);
            let ns = Netns {
                name: format!("{NETNS_PREFIX}{pid}-{n}"),
                addr,
                host_link: format!("{LINK_PREFIX}{pid}h{n}"),
            };
            let peer = format!("{LINK_PREFIX}{pid}g{n}");
            ip(&["netns", "add", &ns.name]);
            net.nodes.push(ns.clone());
            ip(&["link", "add", &ns.host_link, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &ns.host_link, "master", &bridge]);
            ip(&["link", "set", &ns.host_link, "up"]);
            ip(&["link", "set", &peer, "netns", &ns.name]);
            let inside = |args: &[&str]| {
                let mut all = vec!["-n", ns.name.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["link", "set", &peer, "name", "eth0"]);
            inside(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
        }
        net
    }

    /// The subnet in CIDR form.
    pub fn cidr(&self) -> String {
        format!("10.{SUBNET_OCTET}.{}.0/24", self.subnet)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self.nodes.iter().rev() {
            ip_try(&["link", "del", &ns.host_link]);
            ip_try(&["netns", "del", &ns.name]);
        }
        ip_try(&["link", "del", &self.bridge]);
    }
}

/// Names of this process's namespaces that exist now (for checks that everything was removed).
pub fn own_namespaces() -> Vec<String> {
    let prefix = format!("{NETNS_PREFIX}{}-", std::process::id());
    namespaces().into_iter().filter(|n| n.starts_with(&prefix)).collect()
}

/// Names of this process's links that exist now in the root namespace.
pub fn own_links() -> Vec<String> {
    let pid = std::process::id();
    links().into_iter().filter(|l| link_pid(l) == Some(pid)).collect()
}

fn namespaces() -> Vec<String> {
    ip(&["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

fn links() -> Vec<String> {
    ip(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .collect()
}

/// The process id in a link name `gf<pid><b|h|g><n>`.
fn link_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(LINK_PREFIX)?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    let (pid, tail) = rest.split_at(end);
    let mut tail = tail.chars();
    let kind = tail.next()?;
    let n: String = tail.collect();
    (matches!(kind, 'b' | 'h' | 'g') && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        .then(|| pid.parse().ok())
        .flatten()
}

fn netns_pid(name: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(NETNS_PREFIX)?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove namespaces and links left by test processes that no longer run.
pub fn remove_stale() {
    for ns in namespaces() {
        if netns_pid(&ns).is_some_and(|p| !alive(p)) {
            ip_try(&["netns", "del", &ns]);
        }
    }
    for link in links() {
        if link_pid(&link).is_some_and(|p| !alive(p)) {
            ip_try(&["link", "del", &link]);
        }
    }
}

/// A third octet no address in the root namespace uses.
fn free_subnet() -> u8 {
    let used = ip(&["-o", "-4", "addr", "show"]);
    (0..=255u8)
        .find(|x| !used.contains(&format!(" 10.{SUBNET_OCTET}.{x}.")))
        .expect("a free 10.231.X.0/24 subnet")
}

/// Machine-wide lock around subnet choice and stale cleanup (flock: released when the file closes).
struct NetLock {
    _file: std::fs::File,
}

impl NetLock {
    fn acquire() -> NetLock {
        let _ = std::fs::create_dir_all("/run/lock");
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .unwrap_or_else(|e| panic!("opening {LOCK_FILE}: {e}"));
        crate::wait_for("the test network lock", Duration::from_secs(60), Duration::from_millis(20), || {
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            (unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(())
        });
        NetLock { _file: file }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_process_id() {
        assert_eq!(link_pid("gf1234b0"), Some(1234));
        assert_eq!(link_pid("gf77h12"), Some(77));
        assert_eq!(link_pid("gf77x12"), None);
        assert_eq!(link_pid("gf77b"), None);
        assert_eq!(link_pid("eth0"), None);
        assert_eq!(netns_pid("gft-55-3"), Some(55));
        assert_eq!(netns_pid("gft-55"), None);
        assert_eq!(netns_pid("other-55-3"), None);
    }
}
