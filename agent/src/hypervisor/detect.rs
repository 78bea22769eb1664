//! KVM or TCG. `/dev/kvm` existing and qemu claiming KVM support are not enough: on some hosts every KVM
//! guest stops at once with "KVM internal error". The only reliable test is to run a tiny guest briefly.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::DomainType;
use crate::config::LibvirtConfig;

/// How long the probe guest must survive under KVM.
const PROBE_TIME: Duration = Duration::from_secs(3);

/// The domain type guests get: `cfg.domain_type` when it is "kvm" or "qemu", else (auto) `Kvm` when a KVM
/// guest really runs here. The probe runs once per process; its answer is cached.
pub fn detect_domain_type(cfg: &LibvirtConfig) -> DomainType {
    match cfg.domain_type.as_str() {
        "kvm" => DomainType::Kvm,
        "qemu" => DomainType::Qemu,
        _ => {
            static DETECTED: OnceLock<DomainType> = OnceLock::new();
            *DETECTED.get_or_init(|| match kvm_usable(&cfg.emulator, &cfg.ovmf_code, &cfg.ovmf_vars) {
                Ok(()) => DomainType::Kvm,
                Err(reason) => {
                    tracing::info!(%reason, "KVM is not usable, guests run under TCG (domain type qemu)");
                    let _ = PROBE_FAILURE.set(reason);
                    DomainType::Qemu
                }
            })
        }
    }
}

static PROBE_FAILURE: OnceLock<String> = OnceLock::new();

/// Why the KVM probe of [`detect_domain_type`] failed in this process, if it ran and failed.
pub fn kvm_probe_failure() -> Option<&'static str> {
    PROBE_FAILURE.get().map(String::as_str)
}

/// Runs OVMF under KVM with no disk and no NIC for a few seconds. Ok when the guest is still running and
/// qemu reported no KVM failure; otherwise the reason it is not usable.
pub fn kvm_usable(emulator: &Path, ovmf_code: &Path, ovmf_vars: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let vars = dir.path().join("vars.fd");
    std::fs::copy(ovmf_vars, &vars).map_err(|e| format!("cannot copy {}: {e}", ovmf_vars.display()))?;
    let stderr_path = dir.path().join("stderr");
    let stderr = File::create(&stderr_path).map_err(|e| format!("cannot create the probe's log: {e}"))?;
    let mut child = Command::new(emulator)
        .args(["-machine", "q35,accel=kvm", "-m", "128", "-nodefaults", "-display", "none", "-nic", "none"])
        .args(["-serial", "null", "-monitor", "none", "-drive"])
        .arg(format!("if=pflash,format=raw,readonly=on,file={}", ovmf_code.display()))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", emulator.display()))?;
    let started = Instant::now();
    let failure = loop {
        std::thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        // qemu may print warnings first: name the line that says what failed.
        let kvm_failure =
            |l: &&str| l.contains("KVM internal error") || l.contains("failed to initialize kvm");
        if let Some(line) = log.lines().find(kvm_failure) {
            break Some(format!("the probe guest failed: {}", line.trim()));
        }
        match child.try_wait() {
            Ok(Some(status)) => {
                break Some(format!("the probe guest exited ({status}): {}", first_line(&log)));
            }
            Ok(None) => {}
            Err(e) => break Some(format!("cannot wait for the probe guest: {e}")),
        }
        if started.elapsed() >= PROBE_TIME {
            break None;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    failure.map_or(Ok(()), Err)
}

fn first_line(log: &str) -> &str {
    log.lines().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim()
}
