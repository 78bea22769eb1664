//! A whole test grid: a private network with one namespace per node, a CA, the tiny image store, the
//! agents (started in parallel) and, when asked for, the coordinator.
//!
//! Dropping it stops the coordinator and the agents, then removes the namespaces and the bridge, then the
//! temp dir (kept, and its path printed, when the test failed, for the daemons' logs).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::agent::{self, Agent};
use crate::coordinator::{self, Coordinator, Gridctl, Settings};
use crate::images::{ImageStore, vm_spec};
use crate::netns::Network;
use crate::pki::{Pki, PkiCommands};

/// Names of the nodes, in namespace order.
pub const NODE_NAMES: [&str; 8] =
    ["node-a", "node-b", "node-c", "node-d", "node-e", "node-f", "node-g", "node-h"];

pub struct Grid {
    // Field order is drop order: processes first, then the network they live in, then their files.
    pub coordinator: Option<Coordinator>,
    pub agents: Vec<Agent>,
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
        Grid { coordinator: None, agents, network, pki, store, dir: Some(dir) }
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
    /// `gridctl` as the grid's admin.
    pub fn admin(&self) -> Gridctl {
        self.coordinator.as_ref().expect("a grid with a coordinator").gridctl(coordinator::ADMIN)
    }

    /// `gridctl node add NAME --address … --datacenter dc1` with overcommit ratios that make the node's
    /// placeable capacity `shape` (from the cores and memory the agent reports); the node as JSON.
    pub fn enroll(&self, name: &str, shape: Shape, extra: &[&str]) -> Value {
        let agent = self.agents.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"));
        let stats = agent.stats();
        let cores = stats.cpu_busy.len() as f64;
        let memory_mib = (stats.memory.expect("memory stats").total_bytes >> 20) as f64;
        // Half a unit above the target, so float rounding never takes the last vCPU or MiB away.
        let cpu_ratio = format!("{}", (f64::from(shape.vcpus) + 0.5) / cores);
        let memory_ratio = format!("{}", (shape.memory_mib as f64 + 0.5) / memory_mib);
        let address = agent.address();
        let mut args = vec!["node", "add", name, "--address", &address, "--datacenter", "dc1"];
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
