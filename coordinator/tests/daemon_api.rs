//! The daemon and gridctl as programs: mutual TLS with certificates from `gridctl pki`, grpc.health.v1,
//! roles from the certificate's OU, exit codes, and a clean stop on SIGTERM.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gridforge_common::client::{ClientTls, channel};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const DAEMON: &str = env!("CARGO_BIN_EXE_gridforge-coordinator");
const GRIDCTL: &str = env!("CARGO_BIN_EXE_gridctl");

fn gridctl(pki: &Path, server: &str, who: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(GRIDCTL);
    cmd.args(["--server", server]).args(args).stdin(Stdio::null());
    for v in ["GRIDCTL_CA", "GRIDCTL_CERT", "GRIDCTL_KEY", "GRIDCTL_SERVER"] {
        cmd.env_remove(v);
    }
    if let Some(who) = who {
        cmd.arg("--ca").arg(pki.join("ca.pem"));
        cmd.arg("--cert").arg(pki.join(format!("{who}.pem")));
        cmd.arg("--key").arg(pki.join(format!("{who}.key")));
    }
    cmd.output().expect("running gridctl")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn wait_listening(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "the coordinator does not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon, killed if the test ends without stopping it.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serves_mutual_tls_with_roles_health_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let p = pki.to_str().unwrap();
    ok(gridctl(&pki, "", None, &["pki", "init", "--dir", p]));
    ok(gridctl(&pki, "", None, &["pki", "issue", "--dir", p, "--name", "coordinator"]));
    ok(gridctl(&pki, "", None, &["pki", "issue", "--dir", p, "--name", "ann", "--role", "admin"]));
    ok(gridctl(&pki, "", None, &["pki", "issue", "--dir", p, "--name", "vic", "--role", "viewer"]));
    ok(gridctl(&pki, "", None, &["pki", "issue", "--dir", p, "--name", "nobody"]));

    let port = gridforge_common::net::unused_loopback_port();
    let server = format!("127.0.0.1:{port}");
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{server}\"\nstate_dir = \"{}\"\n[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/coordinator.pem\"\nkey = \"{p}/coordinator.key\"\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon(
        Command::new(DAEMON)
            .arg("--config")
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::fs::File::create(dir.path().join("coordinator.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_listening(port);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let tls = ClientTls {
        ca: pki.join("ca.pem"),
        cert: pki.join("vic.pem"),
        key: pki.join("vic.key"),
        domain: None,
    };
    let status = runtime.block_on(async {
        let mut health = HealthClient::new(channel(&server, Some(&tls)).await.unwrap());
        let service = "gridforge.v1.Coordinator".to_string();
        health.check(HealthCheckRequest { service }).await.unwrap().into_inner().status()
    });
    assert_eq!(status, ServingStatus::Serving);

    assert!(ok(gridctl(&pki, &server, Some("vic"), &["node", "list"])).starts_with("NAME"));
    assert_eq!(ok(gridctl(&pki, &server, Some("vic"), &["vm", "list", "-o", "json"])).trim(), "[]");
    let denied = gridctl(&pki, &server, Some("vic"), &["vm", "delete", "web1"]);
    assert_eq!(denied.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&denied.stderr).contains("vic is viewer; vm delete needs operator"));
    let no_role = gridctl(&pki, &server, Some("nobody"), &["node", "list"]);
    assert_eq!(no_role.status.code(), Some(4), "a certificate without a role is refused");
    assert_eq!(gridctl(&pki, &server, Some("ann"), &["vm", "show", "web1"]).status.code(), Some(3));
    assert_eq!(gridctl(&pki, &server, Some("ann"), &["node", "remove", "n1"]).status.code(), Some(3));
    let spec = dir.path().join("bad.json");
    std::fs::write(&spec, r#"{"name": "web1", "image": {"name": "debian-12-minimal", "version": "1"}}"#)
        .unwrap();
    let bad = gridctl(&pki, &server, Some("ann"), &["vm", "create", "-f", spec.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid spec: spec.disk"), "{bad:?}");
    let plaintext = gridctl(&pki, &server, None, &["node", "list"]);
    assert_eq!(plaintext.status.code(), Some(6), "no client certificate: {plaintext:?}");

    // A graceful stop: the operations are in the store, nothing to drain.
    let term = Command::new("kill").arg("-TERM").arg(daemon.0.id().to_string()).status().unwrap();
    assert!(term.success());
    let t = Instant::now();
    let code = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the coordinator did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code}");
}

#[test]
fn plaintext_is_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "listen = \"0.0.0.0:7444\"\n[tls]\ninsecure = true\n").unwrap();
    let out = Command::new(DAEMON).arg("--config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"), "{out:?}");
}
