//! A whole test grid: a private network with one namespace per node, a CA, the tiny image store, the
//! agents (started in parallel) and, when asked for, the coordinator, or several coordinators sharing one
//! grid view on an etcd cluster of the grid's own.
//!
//! Dropping it stops the coordinators and the agents, then etcd, then removes the namespaces and the bridge,
//! then the temp dir (kept, and its path printed, when the test failed, for the daemons' logs).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::agent::{self, Agent};
use crate::coordinator::{self, Coordinator, EtcdStore, Gridctl, Settings};
use crate::etcd::EtcdCluster;
use crate::images::{ImageStore, vm_spec};
use crate::netns::Network;
use crate::pki::{Pki, PkiCommands};

/// Names of the nodes, in namespace order.
pub const NODE_NAMES: [&str; 8] =
    ["node-a", "node-b", "node-c", "node-d", "node-e", "node-f", "node-g", "node-h"];

pub struct Grid {
    // Field order is drop order: processes first, then the network they live in, then their files.
    pub coordinator: Option<Coordinator>,
    /// Coordinators sharing one grid view in etcd, in start order ([`Grid::start_coordinators`]).
    pub members: Vec<Coordinator>,
    pub agents: Vec<Agent>,
    pub etcd: Option<EtcdCluster>,
    pub network: Network,
    pub pki: Pki,
    pub store: ImageStore,
    dir: Option<tempfile::TempDir>,
}

impl Grid {
    /// `nodes` agents, each in its own namespace, running and answering over mutual TLS; no coordinator.
    pub fn agents(nodes: usize) -> Grid {
        Grid::build(nodes, ImageStore::tiny, agent::TEST_DRIVER)
    }

    /// Like [`Grid::agents`], with the image store `store` makes in the directory it is given, and every
    /// agent on the libvirt daemon at `libvirt_uri`.
    pub fn build(nodes: usize, store: impl FnOnce(&Path) -> ImageStore, libvirt_uri: &str) -> Grid {
        Grid::build_with(nodes, store, |_, a| {
            if libvirt_uri != agent::TEST_DRIVER {
                a.use_libvirt(libvirt_uri);
            }
        })
    }

    /// Like [`Grid::build`], each agent's configuration changed by `configure` (with its index) before it
    /// starts.
    pub fn build_with(
        nodes: usize,
        store: impl FnOnce(&Path) -> ImageStore,
        mut configure: impl FnMut(usize, &mut Agent),
    ) -> Grid {
        assert!(nodes <= NODE_NAMES.len());
        let dir = tempfile::Builder::new().prefix("gridforge-grid-").tempdir().expect("a temp dir");
        let pki = Pki::init(&dir.path().join("pki"));
        pki.issue(coordinator::OPERATOR, &[]);
        let store = store(&dir.path().join("images"));
        let network = Network::new(nodes);
        let mut agents: Vec<Agent> = network
            .nodes
            .iter()
            .zip(NODE_NAMES)
            .map(|(ns, name)| {
                Agent::new(name, ns, &pki, &store, &dir.path().join(name), coordinator::OPERATOR)
            })
            .collect();
        for (i, a) in agents.iter_mut().enumerate() {
            configure(i, a);
            a.spawn();
        }
        for a in &mut agents {
            a.wait_ready();
        }
        Grid {
            coordinator: None,
            members: Vec::new(),
            agents,
            etcd: None,
            network,
            pki,
            store,
            dir: Some(dir),
        }
    }

    /// [`Grid::agents`] and a running coordinator with `settings` (nodes not enrolled).
    pub fn with_coordinator(nodes: usize, settings: Settings) -> Grid {
        let mut grid = Grid::agents(nodes);
        grid.start_coordinator(settings);
        grid
    }

    /// Start a coordinator with `settings` (nodes not enrolled).
    pub fn start_coordinator(&mut self, settings: Settings) {
        assert!(self.coordinator.is_none(), "the grid has a coordinator already");
        let mut c = Coordinator::new(&self.path().join("coordinator"), &self.pki, settings);
        c.start();
        self.coordinator = Some(c);
    }

    /// An etcd cluster of `members` members for the grid's coordinators, on loopback.
    pub fn start_etcd(&mut self, members: usize) {
        assert!(self.etcd.is_none(), "the grid has an etcd cluster already");
        self.etcd = Some(EtcdCluster::start(members, &self.path().join("etcd")));
    }

    pub fn etcd(&mut self) -> &mut EtcdCluster {
        self.etcd.as_mut().expect("a grid with an etcd cluster")
    }

    /// The etcd prefix of the grid's view: one no other grid uses.
    pub fn etcd_prefix(&self) -> String {
        let grid = self.path().file_name().and_then(|n| n.to_str()).expect("the grid's directory name");
        format!("/gridforge-test/{grid}")
    }

    /// The `[store.etcd]` of the coordinator named `name` on the grid's etcd cluster, under
    /// [`Grid::etcd_prefix`].
    pub fn etcd_store(&self, name: &str, lease_ttl_secs: u64) -> EtcdStore {
        let etcd = self.etcd.as_ref().expect("a grid with an etcd cluster");
        EtcdStore {
            endpoints: etcd.endpoints(),
            prefix: self.etcd_prefix(),
            lease_ttl_secs,
            name: name.to_string(),
            timeout_secs: 2,
        }
    }

    /// Start a coordinator for each of `settings` (each naming its etcd store, e.g. from
    /// [`Grid::etcd_store`]) together, and wait until every one answers.
    pub fn start_coordinators(&mut self, settings: Vec<Settings>) {
        assert!(self.coordinator.is_none(), "the grid has a coordinator of its own");
        let first = self.members.len();
        for s in settings {
            let name = s.etcd.as_ref().expect("a coordinator with an etcd store").name.clone();
            assert!(self.members.iter().all(|m| m.name() != name), "two coordinators named {name}");
            let mut c = Coordinator::new(&self.path().join(format!("coordinator-{name}")), &self.pki, s);
            c.spawn();
            self.members.push(c);
        }
        for c in &mut self.members[first..] {
            c.wait_ready();
        }
    }

    /// The member coordinator named `name`.
    pub fn member(&mut self, name: &str) -> &mut Coordinator {
        self.members.iter_mut().find(|c| c.name() == name).unwrap_or_else(|| panic!("no coordinator {name}"))
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("the grid's directory").path()
    }

    pub fn coordinator(&mut self) -> &mut Coordinator {
        self.coordinator.as_mut().expect("a grid with a coordinator")
    }

    pub fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"))
    }
}

/// What the scheduler may place on a node: all the agents share this machine's cores and memory, so each
/// node is given its own capacity through its overcommit ratios at enrollment.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl Grid {
    /// `gridctl` as the grid's admin: against the coordinator, or the first member that has a process.
    pub fn admin(&self) -> Gridctl {
        self.gridctl_as(coordinator::ADMIN)
    }

    /// `gridctl` as the holder of certificate `user` of the grid's CA, against the coordinator (or the first
    /// member that has a process).
    pub fn gridctl_as(&self, user: &str) -> Gridctl {
        let c = self.coordinator.as_ref().or_else(|| self.members.iter().find(|m| m.pid().is_some()));
        c.expect("a grid with a coordinator").gridctl(user)
    }

    /// `gridctl node add NAME --address … --datacenter dc1` with overcommit ratios that make the node's
    /// placeable capacity `shape` (from the cores and memory the agent reports); the node as JSON.
    pub fn enroll(&self, name: &str, shape: Shape, extra: &[&str]) -> Value {
        self.enroll_in(name, "dc1", shape, extra)
    }

    /// [`enroll`](Self::enroll) into datacenter `dc`.
    pub fn enroll_in(&self, name: &str, dc: &str, shape: Shape, extra: &[&str]) -> Value {
        let agent = self.agents.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"));
        let stats = agent.stats();
        let cores = stats.cpu_busy.len() as f64;
        let memory_mib = (stats.memory.expect("memory stats").total_bytes >> 20) as f64;
        // Half a unit above the target, so float rounding never takes the last vCPU or MiB away.
        let cpu_ratio = format!("{}", (f64::from(shape.vcpus) + 0.5) / cores);
        let memory_ratio = format!("{}", (shape.memory_mib as f64 + 0.5) / memory_mib);
        let address = agent.address();
        let mut args = vec!["node", "add", name, "--address", &address, "--datacenter", dc];
        args.extend(["--overcommit-cpu", &cpu_ratio, "--overcommit-memory", &memory_ratio]);
        args.extend_from_slice(extra);
        let added = self.admin().json(&args);
        first(added)
    }

    /// A spec file for [`vm_spec`] in the grid's directory.
    pub fn spec_file(&self, name: &str, vcpus: u32, memory_mib: u64, disk_mib: u64) -> PathBuf {
        let path = self.path().join(format!("{name}.json"));
        std::fs::write(&path, vm_spec(name, vcpus, memory_mib, disk_mib).to_string()).unwrap();
        path
    }
}

/// The first element of a JSON array, or the value itself.
pub fn first(v: Value) -> Value {
    match v {
        Value::Array(mut items) if !items.is_empty() => items.swap_remove(0),
        other => other,
    }
}

impl Drop for Grid {
    fn drop(&mut self) {
        if let Some(c) = &mut self.coordinator {
            c.stop();
        }
        coordinator::stop_all(&mut self.members);
        for a in &mut self.agents {
            a.kill();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test failed: logs and state kept in {}", dir.keep().display());
        }
    }
}
