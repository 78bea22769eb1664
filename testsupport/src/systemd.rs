//! Checks of the systemd units the packages install.

use std::path::Path;
use std::process::Command;

/// `systemd-analyze verify` of the unit text `unit`, installed as `unit_name` (`gridforge-agent.service`)
/// but with its ExecStart binary `installed` replaced by the `built` one (verify checks that the binary
/// exists). Panics when verify fails or says anything about this unit or its binary; the other units it
/// names (the dependencies in After=) may be missing on the test host.
pub fn assert_unit_verifies(unit: &str, unit_name: &str, installed: &str, built: &Path) {
    let stem = unit_name.strip_suffix(".service").unwrap_or(unit_name);
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join(unit_name);
    let built = built.to_str().expect("a UTF-8 binary path");
    std::fs::write(&copy, unit.replace(installed, built)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let about_ours: Vec<&str> = stderr.lines().chain(stdout.lines()).filter(|l| l.contains(stem)).collect();
    assert!(out.status.success(), "systemd-analyze verify failed:\n{stdout}\n{stderr}");
    assert!(about_ours.is_empty(), "systemd-analyze verify warns about the unit:\n{}", about_ours.join("\n"));
}
