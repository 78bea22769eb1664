//! `gridforge-agent serve` inside a network namespace: libvirt's in-process test driver (or a real libvirtd
//! by its URI), a dir pool of sparse files and all state in a temp dir, mutual TLS on the namespace's address.
//!
//! The test driver keeps its domains in the agent's memory: a restarted agent has no domains (its job
//! journal and pool files stay).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gridforge_common::client::{ClientTls, connect};
use gridforge_proto::v1::{
    DiagnosticsReport, DiagnosticsRequest, GetJobRequest, Job, JobKind, JobState, ListJobsRequest,
    NodeStatsReport, NodeStatsRequest, SubmitJobRequest,
};
use gridforge_testsupport::AgentConfig;
use serde_json::Value;

use crate::bins;
use crate::images::ImageStore;
use crate::netns::Netns;
use crate::pki::{Pki, PkiCommands};
use crate::process::{self, Daemon};

/// Every agent listens on this port of its own namespace's address.
pub const AGENT_PORT: u16 = 7443;
/// How long an agent may take from spawn to answering ListJobs.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// SIGTERM grace before SIGKILL (the config lets running jobs finish for 2 s).
const STOP_GRACE: Duration = Duration::from_secs(10);
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// libvirt's in-process test driver: domains without guests.
pub const TEST_DRIVER: &str = "test:///default";
/// The dir pool every agent defines in its own directory.
pub const POOL: &str = "gridforge";

/// One node: its namespace, directory, certificate, config and (while running) daemon.
pub struct Agent {
    pub name: String,
    pub ns: Netns,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// How tests talk to the agent directly (an operator certificate of the grid).
    client: ClientTls,
    daemon: Option<Daemon>,
    starts: u32,
}

impl Agent {
    /// Issue the node certificate `name` (DNS name `name`, IP the namespace's address) and write the config
    /// under `dir`; not started. `client` is the certificate tests use to read the agent's own view.
    pub fn new(name: &str, ns: &Netns, pki: &Pki, store: &ImageStore, dir: &Path, client: &str) -> Agent {
        Agent::with_cert(name, name, ns, pki, store, dir, client)
    }

    /// Like [`Agent::new`], but the agent presents certificate `cert_name` (issued for this namespace's
    /// address): an agent whose certificate names another node.
    pub fn with_cert(
        name: &str,
        cert_name: &str,
        ns: &Netns,
        pki: &Pki,
        store: &ImageStore,
        dir: &Path,
        client: &str,
    ) -> Agent {
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        pki.issue(cert_name, &[IpAddr::V4(ns.addr)]);
        let config = dir.join("agent.toml");
        let libvirt =
            format!("pool = \"{POOL}\"\npool_path = \"{}/pool\"\ndomain_type = \"qemu\"", dir.display());
        AgentConfig::new(name, SocketAddr::new(IpAddr::V4(ns.addr), AGENT_PORT), dir, pki, cert_name)
            .images(&store.dir, &store.trusted_key)
            .libvirt(TEST_DRIVER, &libvirt)
            .jobs_extra("shutdown_grace_secs = 2")
            .write(&config);
        Agent {
            name: name.to_string(),
            ns: ns.clone(),
            dir: dir.to_path_buf(),
            config,
            client: pki.client(client),
            daemon: None,
            starts: 0,
        }
    }

    /// Put the agent on the libvirt daemon at `uri` instead of the test driver (a real hypervisor: its
    /// guests boot); before it starts.
    pub fn use_libvirt(&mut self, uri: &str) {
        assert!(self.daemon.is_none(), "agent {} is running", self.name);
        let text = std::fs::read_to_string(&self.config).unwrap();
        let from = format!("uri = \"{TEST_DRIVER}\"\n");
        assert!(text.contains(&from), "{} has no test driver URI", self.config.display());
        std::fs::write(&self.config, text.replace(&from, &format!("uri = \"{uri}\"\n"))).unwrap();
    }

    /// Set `key = "value"` in the agent's `[libvirt]` table; before it starts.
    pub fn set_libvirt(&mut self, key: &str, value: &str) {
        assert!(self.daemon.is_none(), "agent {} is running", self.name);
        let text = std::fs::read_to_string(&self.config).unwrap();
        let table = "[libvirt]\n";
        assert!(text.contains(table), "{} has no [libvirt] table", self.config.display());
        let line = format!("{table}{key} = {}\n", gridforge_testsupport::agent_config::quoted(value));
        std::fs::write(&self.config, text.replacen(table, &line, 1)).unwrap();
    }

    /// Let the agent's jobs target `devices` (block devices or files outside its pool); before it starts.
    pub fn set_devices(&mut self, devices: &[PathBuf]) {
        assert!(self.daemon.is_none(), "agent {} is running", self.name);
        let text = std::fs::read_to_string(&self.config).unwrap();
        let list: Vec<String> = devices.iter().map(|d| format!("{:?}", d.display().to_string())).collect();
        let from = "\ndevices = []\n";
        assert!(text.contains(from), "{} has no empty devices list", self.config.display());
        std::fs::write(&self.config, text.replace(from, &format!("\ndevices = [{}]\n", list.join(", "))))
            .unwrap();
    }

    /// Add table `[name]` with `lines` to the agent's configuration; before it starts.
    pub fn add_table(&mut self, name: &str, lines: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "agent {} is running", self.name);
        let mut text = std::fs::read_to_string(&self.config).unwrap();
        text.push_str(&format!("\n[{name}]\n"));
        for (k, v) in lines {
            text.push_str(&format!("{k} = {}\n", gridforge_testsupport::agent_config::quoted(v)));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// The file the serial console of the agent's domain `vm` is written to.
    pub fn console_log(&self, vm: &str) -> PathBuf {
        self.dir.join("state/console").join(format!("{vm}.log"))
    }

    /// `host:port` the agent serves on.
    pub fn address(&self) -> String {
        format!("{}:{AGENT_PORT}", self.ns.addr)
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ns.addr), AGENT_PORT)
    }

    /// Start the daemon in the namespace (spawned on the calling thread, which it cannot outlive).
    pub fn spawn(&mut self) {
        assert!(self.daemon.is_none(), "agent {} is already running", self.name);
        self.starts += 1;
        let log = self.dir.join(format!("serve-{}.log", self.starts));
        let mut cmd = self.ns.command(bins::path(bins::AGENT));
        cmd.args(["serve", "--config"])
            .arg(&self.config)
            .args(["--log-format", "json"])
            .env("RUST_LOG", "info");
        self.daemon = Some(Daemon::spawn(&mut cmd, &log));
    }

    /// Start the daemon and wait until it answers over mutual TLS.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Wait until ListJobs over mutual TLS succeeds (from the root namespace, as the coordinator dials).
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.daemon_mut().exited() {
                panic!("agent {} exited ({status}) before answering:\n{}", self.name, self.log_tail());
            }
            match self.try_list_jobs() {
                Ok(_) => return,
                Err(e) if start.elapsed() > READY_TIMEOUT => {
                    panic!(
                        "agent {} did not answer within {READY_TIMEOUT:?}: {e}\n{}",
                        self.name,
                        self.log_tail()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn daemon_mut(&mut self) -> &mut Daemon {
        let name = &self.name;
        self.daemon.as_mut().unwrap_or_else(|| panic!("agent {name} is not running"))
    }

    /// Whether the daemon process runs.
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// SIGTERM and wait for the exit (SIGKILL after a bound).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(STOP_GRACE);
        }
    }

    /// SIGKILL: no shutdown at all.
    pub fn sigkill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.sigkill();
        }
    }

    /// Stop (SIGTERM) and start again on the same config and state.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    /// The current daemon's log (all starts' logs stay in the agent's directory).
    pub fn log_tail(&self) -> String {
        self.daemon.as_ref().map(Daemon::log_tail).unwrap_or_default()
    }

    fn try_list_jobs(&self) -> Result<Vec<Job>, String> {
        let endpoint = self.address();
        let tls = self.client.clone();
        crate::block_on(async move {
            let mut client = connect(&endpoint, Some(&tls)).await.map_err(|e| e.to_string())?;
            let req = ListJobsRequest { states: Vec::new(), kind: 0, limit: 0 };
            let resp = tokio::time::timeout(Duration::from_secs(10), client.list_jobs(req))
                .await
                .map_err(|_| "ListJobs timed out".to_string())?
                .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
            Ok(resp.into_inner().jobs)
        })
    }

    /// Every job the agent knows, newest first (ListJobs over mutual TLS).
    pub fn jobs(&self) -> Vec<Job> {
        self.try_list_jobs().unwrap_or_else(|e| panic!("listing the jobs of agent {}: {e}", self.name))
    }

    /// Provision jobs for the VM named `vm` (by domain, or by the pool volume named after it).
    pub fn provision_jobs(&self, vm: &str) -> Vec<Job> {
        self.jobs().into_iter().filter(|j| j.kind() == JobKind::Provision && concerns(j, vm)).collect()
    }

    /// The agent's NodeStats (capacity, usage, domains).
    pub fn stats(&self) -> NodeStatsReport {
        let endpoint = self.address();
        let tls = self.client.clone();
        crate::block_on(async move {
            let mut client = connect(&endpoint, Some(&tls)).await.expect("connecting to the agent");
            client.node_stats(NodeStatsRequest::default()).await.expect("NodeStats").into_inner()
        })
    }

    /// The running agent's Diagnostics report (its checks, and what it knows of the grid's leader).
    pub fn diagnostics(&self) -> DiagnosticsReport {
        let endpoint = self.address();
        let tls = self.client.clone();
        crate::block_on(async move {
            let mut client = connect(&endpoint, Some(&tls)).await.expect("connecting to the agent");
            client.diagnostics(DiagnosticsRequest {}).await.expect("Diagnostics").into_inner()
        })
    }

    /// SubmitJob directly to the agent (not through the coordinator).
    pub fn submit(&self, req: SubmitJobRequest) -> Job {
        let endpoint = self.address();
        let tls = self.client.clone();
        crate::block_on(async move {
            let mut client = connect(&endpoint, Some(&tls)).await.expect("connecting to the agent");
            client.submit_job(req).await.unwrap_or_else(|s| panic!("SubmitJob: {s:?}")).into_inner()
        })
    }

    /// Poll GetJob until job `id` has ended, at most `limit`.
    pub fn wait_job(&self, id: &str, limit: Duration) -> Job {
        let endpoint = self.address();
        let tls = self.client.clone();
        crate::block_on(async move {
            let mut client = connect(&endpoint, Some(&tls)).await.expect("connecting to the agent");
            let start = Instant::now();
            loop {
                let job = client
                    .get_job(GetJobRequest { job_id: id.to_string() })
                    .await
                    .unwrap_or_else(|s| panic!("GetJob {id}: {s:?}"))
                    .into_inner();
                if !matches!(job.state(), JobState::Queued | JobState::Running | JobState::Unspecified) {
                    return job;
                }
                assert!(start.elapsed() < limit, "job {id} did not end within {limit:?}: {job:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    /// `gridforge-agent --json job list` against this agent, as an operator types it: one JSON job each.
    pub fn job_list_cli(&self) -> Vec<Value> {
        let out = process::run_ok(
            Command::new(bins::path(bins::AGENT))
                .args(["--json", "job", "list", "--server", &self.address()])
                .arg("--ca")
                .arg(&self.client.ca)
                .arg("--cert")
                .arg(&self.client.cert)
                .arg("--key")
                .arg(&self.client.key),
            CLI_TIMEOUT,
        );
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }
}

/// Whether job `j` concerns the VM `vm`: its domain, or a target file named after it.
fn concerns(j: &Job, vm: &str) -> bool {
    if j.domain == vm {
        return true;
    }
    Path::new(&j.target)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n == vm || n.strip_suffix(".raw") == Some(vm))
}
