//! `gridforge-coordinator` in the root namespace (API on a free loopback port, state in a temp dir), and
//! `gridctl` against it with `-o json`. With an [`EtcdStore`] several coordinators share one grid view in
//! etcd: each advertises its own listen address, one is elected leader.
//!
//! Roles: `admin` and `viewer` hold certificates from `gridctl pki issue --role` (the role is their OU);
//! `ops`, the operator certificate the tests also use towards agents, is made by `gridforge-agent pki` and
//! mapped by name in `[auth.users]`; `nobody` has neither and gets no role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::bins;
use crate::pki::{Pki, PkiCommands};
use crate::process::{self, Daemon, Outcome};

/// Certificate names of the grid's people, by role.
pub const ADMIN: &str = "admin";
pub const OPERATOR: &str = "ops";
pub const VIEWER: &str = "viewer";
/// A certificate of the grid's CA that no role maps to.
pub const NOBODY: &str = "nobody";
pub const CERT_NAME: &str = "coordinator";

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest any one gridctl call may take (a `--wait` on a create included).
pub const GRIDCTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings a test may change; the rest of the config is fixed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub poll_interval_ms: u64,
    pub unreachable_after: u32,
    pub retry_attempts: u32,
    pub retry_backoff_ms: u64,
    pub call_timeout_secs: u64,
    /// Seconds Unreachable before a node is Lost (and fenced).
    pub lost_after_secs: u64,
    /// The `command` fencing actuator's program and arguments; empty: the `manual` actuator.
    pub fencing_command: Vec<String>,
    /// The grid view in etcd, shared with other coordinators; `None`: the embedded store in `state_dir`.
    pub etcd: Option<EtcdStore>,
    /// `[power] command` (dedicated servers' actuator); empty: none.
    pub power_command: Vec<String>,
    /// `[http]` full scales of the panel's disk and network meters, MiB/s.
    pub disk_meter_mib_per_s: f64,
    pub network_meter_mib_per_s: f64,
}

/// A coordinator's `[store.etcd]`: where the shared grid view lives and who this member is.
#[derive(Clone, Debug)]
pub struct EtcdStore {
    pub endpoints: Vec<String>,
    /// Every key of the grid under it: one per grid, so that grids never share a view.
    pub prefix: String,
    pub lease_ttl_secs: u64,
    /// The member's name; its advertised address is its own listen address.
    pub name: String,
    /// Longest wait for one etcd call.
    pub timeout_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        // Fast polls so that node state changes within a second or two.
        Settings {
            poll_interval_ms: 300,
            unreachable_after: 3,
            retry_attempts: 3,
            retry_backoff_ms: 200,
            call_timeout_secs: 5,
            lost_after_secs: 120,
            fencing_command: Vec::new(),
            etcd: None,
            power_command: Vec::new(),
            disk_meter_mib_per_s: 200.0,
            network_meter_mib_per_s: 119.0,
        }
    }
}

pub struct Coordinator {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// The HTTP/JSON API and panel (`[http] listen`).
    pub http: SocketAddr,
    pub settings: Settings,
    pki: Pki,
    daemon: Option<Daemon>,
    /// The log of the latest start (kept after the process ends).
    log: Option<PathBuf>,
    starts: u32,
}

impl Coordinator {
    /// Certificates for the coordinator and the grid's people, and the config under `dir`; not started.
    pub fn new(dir: &Path, pki: &Pki, settings: Settings) -> Coordinator {
        std::fs::create_dir_all(dir.join("state")).unwrap();
        for name in [CERT_NAME, OPERATOR, NOBODY] {
            if !pki.cert(name).exists() {
                pki.issue(name, &[]);
            }
        }
        for (name, role) in [(ADMIN, "admin"), (VIEWER, "viewer")] {
            if !pki.cert(name).exists() {
                pki.issue_person(name, role);
            }
        }
        let listen: SocketAddr =
            format!("127.0.0.1:{}", gridforge_common::net::unused_loopback_port()).parse().unwrap();
        let http: SocketAddr =
            format!("127.0.0.1:{}", gridforge_common::net::unused_loopback_port()).parse().unwrap();
        let config = dir.join("coordinator.toml");
        let s = &settings;
        let mut text = format!(
            r#"listen = "{listen}"
state_dir = "{state}"

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[agents]
call_timeout_secs = {call_timeout}

[poller]
interval_ms = {interval}
unreachable_after = {unreachable}
lost_after_secs = {lost_after}

[fencing]
actuator = "{actuator}"
command = {command}
timeout_secs = 30

[ops]
retry_attempts = {attempts}
retry_backoff_ms = {backoff}

[auth]
role_from_ou = true
default_role = ""

[http]
listen = "{http}"
disk_meter_mib_per_s = {disk_scale:?}
network_meter_mib_per_s = {network_scale:?}

[auth.users]
{OPERATOR} = "operator"
"#,
            state = dir.join("state").display(),
            ca = pki.ca().display(),
            cert = pki.cert(CERT_NAME).display(),
            key = pki.key(CERT_NAME).display(),
            call_timeout = s.call_timeout_secs,
            interval = s.poll_interval_ms,
            unreachable = s.unreachable_after,
            lost_after = s.lost_after_secs,
            actuator = if s.fencing_command.is_empty() { "manual" } else { "command" },
            command = serde_json::to_string(&s.fencing_command).unwrap(),
            attempts = s.retry_attempts,
            backoff = s.retry_backoff_ms,
            disk_scale = s.disk_meter_mib_per_s,
            network_scale = s.network_meter_mib_per_s,
        );
        if !s.power_command.is_empty() {
            let command = serde_json::to_string(&s.power_command).unwrap();
            text.push_str(&format!("\n[power]\ncommand = {command}\ntimeout_secs = 20\n"));
        }
        if let Some(etcd) = &s.etcd {
            text.push_str(&format!(
                r#"
[store]
backend = "etcd"

[store.etcd]
endpoints = {endpoints}
prefix = "{prefix}"
lease_ttl_secs = {ttl}
name = "{name}"
advertise = "{listen}"
timeout_secs = {timeout}
"#,
                endpoints = serde_json::to_string(&etcd.endpoints).unwrap(),
                prefix = etcd.prefix,
                ttl = etcd.lease_ttl_secs,
                name = etcd.name,
                timeout = etcd.timeout_secs,
            ));
        }
        std::fs::write(&config, text).unwrap();
        Coordinator {
            dir: dir.to_path_buf(),
            config,
            listen,
            http,
            settings,
            pki: pki.clone(),
            daemon: None,
            log: None,
            starts: 0,
        }
    }

    /// The member name of an etcd-backed coordinator ("" with the embedded store).
    pub fn name(&self) -> &str {
        self.settings.etcd.as_ref().map_or("", |e| e.name.as_str())
    }

    /// Start the daemon and wait until `gridctl node list` answers.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Start the daemon without waiting (several coordinators start together, then each is waited for).
    pub fn spawn(&mut self) {
        assert!(self.daemon.is_none(), "the coordinator is already running");
        self.starts += 1;
        let log = self.dir.join(format!("coordinator-{}.log", self.starts));
        let mut cmd = Command::new(bins::path(bins::COORDINATOR));
        cmd.arg("--config").arg(&self.config).env("RUST_LOG", "info");
        self.daemon = Some(Daemon::spawn(&mut cmd, &log));
        self.log = Some(log);
    }

    /// Wait until `gridctl node list` answers (panics if the process exits first).
    pub fn wait_ready(&mut self) {
        if let Some(status) = self.ready_or_exit() {
            panic!("the coordinator exited ({status}) before answering:\n{}", self.log_tail());
        }
    }

    /// Start it as systemd's `Restart=on-failure` would: a start that exits with status 1 before answering
    /// (etcd unavailable while it settles) is made again, at most `tries` times in all.
    pub fn start_supervised(&mut self, tries: u32) {
        for attempt in 1..=tries {
            self.spawn();
            match self.ready_or_exit() {
                None => return,
                Some(status) if status.code() == Some(1) && attempt < tries => {
                    eprintln!(
                        "the coordinator exited ({status}) before answering; started again:\n{}",
                        self.log_tail()
                    );
                    self.daemon = None;
                    std::thread::sleep(Duration::from_secs(1));
                }
                Some(status) => {
                    panic!("the coordinator exited ({status}) before answering:\n{}", self.log_tail())
                }
            }
        }
    }

    /// Wait until `gridctl node list` answers: None, or the process's exit status if it exits first.
    fn ready_or_exit(&mut self) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let ctl = self.gridctl(ADMIN);
        loop {
            if let Some(status) = self.daemon.as_mut().and_then(Daemon::exited) {
                return Some(status);
            }
            let out = ctl.run(&["node", "list"]);
            if out.success() {
                return None;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "the coordinator did not answer within {READY_TIMEOUT:?}: {}\n{}",
                out.describe(),
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL: no shutdown at all.
    pub fn sigkill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.sigkill();
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // A paused process takes the SIGTERM once it runs again.
            d.signal(Signal::SIGTERM);
            d.signal(Signal::SIGCONT);
            d.wait_exit(STOP_GRACE);
        }
    }

    /// SIGSTOP: the process is frozen (its leases run out, its connections stay open) until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        self.daemon.as_ref().expect("a running coordinator").signal(Signal::SIGSTOP);
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.daemon.as_ref().expect("a running coordinator").signal(Signal::SIGCONT);
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(Daemon::pid)
    }

    /// Whether the process runs (a paused one included).
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }

    /// The exit status once the process has ended on its own (it is then no longer running).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.daemon.as_mut()?.exited()?;
        self.daemon = None;
        Some(status)
    }

    /// Wait at most `limit` for the process to end on its own; its status, or `None` if it still ran (it is
    /// then SIGKILLed, so that the caller's failure message is the only outcome).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.sigkill();
        None
    }

    /// Start again on the same config and state directory (after [`sigkill`](Self::sigkill) or
    /// [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// The latest start's log, also after the process ended.
    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default()
    }

    /// The last lines of [`log_text`](Self::log_text), for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `gridctl` as certificate `user`.
    pub fn gridctl(&self, user: &str) -> Gridctl {
        Gridctl {
            server: self.listen.to_string(),
            ca: self.pki.ca(),
            identity: Some((self.pki.cert(user), self.pki.key(user))),
        }
    }

    /// `gridctl` with the CA but no client certificate.
    pub fn gridctl_without_cert(&self) -> Gridctl {
        Gridctl { server: self.listen.to_string(), ca: self.pki.ca(), identity: None }
    }
}

/// Stop every one of `coordinators` at once: SIGTERM to all, then a bounded wait for each (one by one, each
/// leader stopped would make the next member wait out a new election first).
pub fn stop_all(coordinators: &mut [Coordinator]) {
    for d in coordinators.iter().filter_map(|c| c.daemon.as_ref()) {
        d.signal(Signal::SIGTERM);
        d.signal(Signal::SIGCONT);
    }
    for c in coordinators {
        c.stop();
    }
}

/// One way of calling `gridctl`: server and certificates.
#[derive(Clone, Debug)]
pub struct Gridctl {
    pub server: String,
    pub ca: PathBuf,
    /// Client certificate and key; `None` connects with the CA alone.
    identity: Option<(PathBuf, PathBuf)>,
}

impl Gridctl {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bins::path(bins::GRIDCTL));
        for var in ["GRIDCTL_SERVER", "GRIDCTL_CA", "GRIDCTL_CERT", "GRIDCTL_KEY"] {
            cmd.env_remove(var);
        }
        cmd.args(["--server", &self.server]).arg("--ca").arg(&self.ca);
        if let Some((cert, key)) = &self.identity {
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd.args(["-o", "json"]).args(args);
        cmd
    }

    /// Run `gridctl ... -o json ARGS`, whatever the outcome.
    pub fn run(&self, args: &[&str]) -> Outcome {
        self.run_within(args, GRIDCTL_TIMEOUT)
    }

    /// [`run`](Self::run) with a longer bound than [`GRIDCTL_TIMEOUT`] (a `--wait` on real guests).
    pub fn run_within(&self, args: &[&str], limit: Duration) -> Outcome {
        process::run(&mut self.command(args), limit)
    }

    /// Run and require success; stdout parsed as JSON (`null` when empty).
    pub fn json(&self, args: &[&str]) -> Value {
        self.json_within(args, GRIDCTL_TIMEOUT)
    }

    /// [`json`](Self::json) with the bound `limit`.
    pub fn json_within(&self, args: &[&str], limit: Duration) -> Value {
        let out = self.run_within(args, limit);
        assert!(out.success(), "gridctl {args:?} failed: {}", out.describe());
        parse_json(&out.stdout)
    }

    /// Run and require failure; the outcome, for checks of the exit code and message.
    pub fn fails(&self, args: &[&str]) -> Outcome {
        let out = self.run(args);
        assert!(!out.success(), "gridctl {args:?} succeeded but should have failed: {}", out.describe());
        out
    }
}

/// Every JSON value gridctl printed, in order (`--wait` prints one event per line, then the operation).
pub fn json_values(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("gridctl printed no JSON ({e}):\n{text}"))
}

/// The one JSON value gridctl printed (the last, after `--wait`'s events); `null` when it printed none.
pub fn parse_json(text: &str) -> Value {
    json_values(text).pop().unwrap_or(Value::Null)
}
