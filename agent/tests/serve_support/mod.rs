//! Shared by the daemon tests: the built `gridforge-agent` binary run as a child process (`serve`, `pki`,
//! `job`), with certificates made by `pki`, a config on free 127.0.0.1 ports, and mTLS clients.
#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use gridforge_common::client::connect;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_testsupport::AgentConfig;
pub use gridforge_testsupport::Pki;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub const MIB: u64 = 1 << 20;
pub const BIN: &str = env!("CARGO_BIN_EXE_gridforge-agent");
/// How long a daemon may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the binary to completion.
pub fn agent(args: &[&str]) -> Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().expect("running gridforge-agent")
}

/// Run the binary and require success; its stdout.
pub fn agent_ok(args: &[&str]) -> String {
    let out = agent(args);
    assert!(
        out.status.success(),
        "gridforge-agent {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A CA and certificates made by `gridforge-agent pki` in `dir`: `agent` (the server) and `ops` (a client).
pub fn make_pki(dir: &Path) -> Pki {
    let d = dir.to_str().unwrap();
    agent_ok(&["pki", "init", "--dir", d, "--days", "30"]);
    agent_ok(&["pki", "issue", "--dir", d, "--name", "agent"]);
    agent_ok(&["pki", "issue", "--dir", d, "--name", "ops"]);
    Pki::at(dir)
}

/// A free TCP port on 127.0.0.1 (bound and released; the daemon binds it right after).
pub fn free_port() -> u16 {
    gridforge_common::net::unused_loopback_port()
}

/// A node's directories and certificates under one temp dir, and the daemon's config file.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    pub config: PathBuf,
}

impl Node {
    /// A disk-only node (no libvirt); `jobs_extra` is appended to the `[jobs]` table.
    pub fn new(jobs_extra: &str) -> Node {
        Node::with_libvirt("", jobs_extra)
    }

    /// A node whose `libvirt.uri` is `uri`.
    pub fn with_libvirt(uri: &str, jobs_extra: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let pki = make_pki(&dir.path().join("pki"));
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("disks")).unwrap();
        let config = root.join("agent.toml");
        AgentConfig::new("test-node", grpc, root, &pki, "agent")
            .metrics_listen(metrics)
            .libvirt(uri, "")
            .devices(&[root.join("disks")])
            .jobs_extra(jobs_extra)
            .write(&config);
        Node { dir, pki, grpc, metrics, config }
    }

    pub fn disk(&self, name: &str) -> PathBuf {
        self.dir.path().join("disks").join(name)
    }

    /// A sparse file of `size` bytes in the allowed directory.
    pub fn sparse_disk(&self, name: &str, size: u64) -> PathBuf {
        let path = self.disk(name);
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// Start `gridforge-agent serve` on this node's config and wait until it accepts connections.
    pub fn start(&self) -> Daemon {
        self.start_with(|_| {})
    }

    pub fn start_with(&self, setup: impl FnOnce(&mut Command)) -> Daemon {
        let log = self.dir.path().join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", self.config.to_str().unwrap(), "--log-format", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC");
        setup(&mut cmd);
        let child = cmd.spawn().expect("starting gridforge-agent serve");
        let mut daemon = Daemon { child, log };
        daemon.wait_listening(self.grpc);
        daemon
    }

    /// An mTLS client as `ops`.
    pub async fn client(&self) -> AgentClient<Channel> {
        connect(&self.endpoint(), Some(&self.pki.client("ops"))).await.expect("connecting as ops")
    }

    /// GET a path from the metrics listener: (status line, body).
    pub fn http_get(&self, path: &str) -> (String, String) {
        use std::io::Write;
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        (head.lines().next().unwrap().to_string(), body.to_string())
    }
}

/// The `grpc.health.v1` status of `service` ("" for the whole server), over mTLS as `ops`.
pub async fn health(node: &Node, service: &str) -> ServingStatus {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(node.pki.ca()).unwrap()))
        .identity(Identity::from_pem(
            std::fs::read(node.pki.cert("ops")).unwrap(),
            std::fs::read(node.pki.key("ops")).unwrap(),
        ));
    let channel =
        Endpoint::from_shared(node.endpoint()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let resp = HealthClient::new(channel)
        .check(HealthCheckRequest { service: service.to_string() })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
        .into_inner();
    resp.status()
}

/// A running `gridforge-agent serve`; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    fn wait_listening(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the daemon exited ({status}) before listening:\n{}", self.log_text());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen within {START_TIMEOUT:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Wait for the process to exit, at most `limit`; its status and how long it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the daemon did not exit within {limit:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
