//! `gridforge-coordinator` in the root namespace (API on a free loopback port, state in a temp dir), and
//! `gridctl` against it with `-o json`.
//!
//! Roles: `admin` and `viewer` hold certificates from `gridctl pki issue --role` (the role is their OU);
//! `ops`, the operator certificate the tests also use towards agents, is made by `gridforge-agent pki` and
//! mapped by name in `[auth.users]`; `nobody` has neither and gets no role.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
        }
    }
}

pub struct Coordinator {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub settings: Settings,
    pki: Pki,
    daemon: Option<Daemon>,
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
        let config = dir.join("coordinator.toml");
        let s = &settings;
        let text = format!(
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
        );
        std::fs::write(&config, text).unwrap();
        Coordinator {
            dir: dir.to_path_buf(),
            config,
            listen,
            settings,
            pki: pki.clone(),
            daemon: None,
            starts: 0,
        }
    }

    /// Start the daemon and wait until `gridctl node list` answers.
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "the coordinator is already running");
        self.starts += 1;
        let log = self.dir.join(format!("coordinator-{}.log", self.starts));
        let mut cmd = Command::new(bins::path(bins::COORDINATOR));
        cmd.arg("--config").arg(&self.config).env("RUST_LOG", "info");
        self.daemon = Some(Daemon::spawn(&mut cmd, &log));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        let ctl = self.gridctl(ADMIN);
        loop {
            if let Some(status) = self.daemon.as_mut().and_then(Daemon::exited) {
                panic!("the coordinator exited ({status}) before answering:\n{}", self.log_tail());
            }
            let out = ctl.run(&["node", "list"]);
            if out.success() {
                return;
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
            d.stop(STOP_GRACE);
        }
    }

    /// Start again on the same config and state directory (after [`sigkill`](Self::sigkill) or
    /// [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    pub fn log_tail(&self) -> String {
        self.daemon.as_ref().map(Daemon::log_tail).unwrap_or_default()
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
