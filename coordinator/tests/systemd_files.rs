//! The installed files: `systemd/gridforge-coordinator.service` passes `systemd-analyze verify`, and
//! `systemd/coordinator.toml` is a valid configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use gridforge_coordinator::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_gridforge-coordinator");

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo_file("systemd/gridforge-coordinator.service")).unwrap();
    let exec = "ExecStart=/usr/local/bin/gridforge-coordinator --config /etc/gridforge/coordinator.toml";
    assert!(unit.lines().any(|l| l == exec), "ExecStart is the documented one");
    for line in
        ["Type=notify", "WatchdogSec=30", "DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes"]
    {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gridforge-coordinator.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/gridforge-coordinator", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let about_ours: Vec<&str> =
        stderr.lines().chain(stdout.lines()).filter(|l| l.contains("gridforge-coordinator")).collect();
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stdout}\n{stderr}");
    assert!(about_ours.is_empty(), "systemd-analyze verify warns about the unit:\n{}", about_ours.join("\n"));
}

#[test]
fn documented_config_is_valid_and_names_the_unit_credentials() {
    let path = repo_file("systemd/coordinator.toml");
    let c = Config::load(&path).unwrap();
    let defaults = Config::parse("", &path).unwrap();
    assert_eq!(c.listen, defaults.listen);
    assert_eq!(c.state_dir, defaults.state_dir);
    assert_eq!(c.poller.interval_ms, 5000);
    assert_eq!(c.ops.max_disk_jobs_per_node, defaults.ops.max_disk_jobs_per_node);
    assert!(c.tls.key.starts_with("/run/credentials/gridforge-coordinator.service"));
}
