//! The installed files: `systemd/gridforge-agent.service` passes `systemd-analyze verify` and keeps its
//! contract, and `systemd/agent.toml` is a valid configuration equal to the built-in defaults it documents.

use std::path::Path;

use gridforge_agent::config::Config;
use gridforge_testsupport::repo_file;
use gridforge_testsupport::systemd::assert_unit_verifies;

const BIN: &str = env!("CARGO_BIN_EXE_gridforge-agent");

fn unit_text() -> String {
    std::fs::read_to_string(repo_file("systemd/gridforge-agent.service")).unwrap()
}

/// `Key=value` lines of the unit (all values of a repeated key).
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string).collect()
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = unit_text();
    let exec = "ExecStart=/usr/local/bin/gridforge-agent serve --config /etc/gridforge/agent.toml";
    assert!(unit.lines().any(|l| l == exec), "ExecStart is the documented one");
    assert_unit_verifies(&unit, "gridforge-agent.service", "/usr/local/bin/gridforge-agent", Path::new(BIN));
}

#[test]
fn unit_keeps_its_contract() {
    let unit = unit_text();
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("Restart", "on-failure"),
        ("StateDirectory", "gridforge-agent"),
        ("CacheDirectory", "gridforge-agent"),
        ("ConfigurationDirectory", "gridforge"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("Wants", "network-online.target"),
        ("After", "network-online.target libvirtd.service"),
    ] {
        assert_eq!(values(&unit, key), vec![want.to_string()], "{key}");
    }
    assert!(values(&unit, "RestrictSUIDSGID").is_empty(), "provisioning creates setuid files");
    let rw = values(&unit, "ReadWritePaths").join(" ");
    for p in ["/var/lib/gridforge-agent", "/var/cache/gridforge-agent"] {
        assert!(rw.split_whitespace().any(|w| w == p), "{p} writable: {rw}");
    }
    let caps = values(&unit, "CapabilityBoundingSet").join(" ");
    for cap in ["CAP_SYS_ADMIN", "CAP_CHOWN", "CAP_FOWNER", "CAP_FSETID", "CAP_DAC_OVERRIDE", "CAP_MKNOD"] {
        assert!(caps.split_whitespace().any(|c| c == cap), "{cap} in {caps}");
    }
    let devices = values(&unit, "DeviceAllow").join(" ");
    for d in ["block-loop", "block-virtblk", "block-sd", "block-blkext", "/dev/kvm", "/dev/loop-control"] {
        assert!(devices.split_whitespace().any(|x| x == d), "{d} allowed: {devices}");
    }
    // The stop timeout leaves room for the default grace and the cancel wait.
    let stop: u64 = values(&unit, "TimeoutStopSec")[0].parse().unwrap();
    assert!(stop >= Config::default().jobs.shutdown_grace_secs + 20, "TimeoutStopSec={stop}");
}

#[test]
fn installed_config_is_valid_and_matches_the_defaults() {
    let path = repo_file("systemd/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let config = Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    let defaults = Config::default();
    // The file sets the defaults explicitly (minus node_name): it documents them.
    assert_eq!(
        format!("{:?}", Config { node_name: defaults.node_name.clone(), ..config }),
        format!("{defaults:?}")
    );
    // And it configures mutual TLS.
    let config = Config::parse(&text, &path).unwrap();
    assert!(!config.tls.insecure);
    assert_eq!(config.tls.ca, Path::new("/etc/gridforge/tls/ca.pem"));
}

#[test]
fn metrics_can_be_disabled_and_the_stop_grace_set() {
    let path = Path::new("agent.toml");
    let config = Config::parse("metrics_listen = \"\"\n[jobs]\nshutdown_grace_secs = 5\n", path).unwrap();
    assert_eq!(config.metrics_listen, None);
    assert_eq!(config.jobs.shutdown_grace_secs, 5);
    let config = Config::parse("metrics_listen = \"127.0.0.1:9100\"\n", path).unwrap();
    assert_eq!(config.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(config.jobs.shutdown_grace_secs, 30);
    let err = Config::parse("metrics_listen = \"nowhere\"\n", path).unwrap_err().to_string();
    assert!(err.contains("metrics_listen"), "{err}");
}
