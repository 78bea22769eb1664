//! The installed files: `systemd/gridforge-coordinator.service` passes `systemd-analyze verify`, and
//! `systemd/coordinator.toml` is a valid configuration.

use std::path::Path;

use gridforge_coordinator::config::Config;
use gridforge_testsupport::repo_file;
use gridforge_testsupport::systemd::assert_unit_verifies;

const BIN: &str = env!("CARGO_BIN_EXE_gridforge-coordinator");

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
    assert_unit_verifies(
        &unit,
        "gridforge-coordinator.service",
        "/usr/local/bin/gridforge-coordinator",
        Path::new(BIN),
    );
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
