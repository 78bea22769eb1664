//! The programs under test, built by cargo into this workspace's target directory.
//!
//! Cargo gives a test only the binaries of its own package, so the first use of a binary builds it with the
//! same cargo, profile and target directory as the running test (a no-op when it is up to date; `cargo test
//! --workspace` has built it already). `GRIDFORGE_BIN_DIR` points at prebuilt binaries instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

pub const AGENT: &str = "gridforge-agent";
pub const COORDINATOR: &str = "gridforge-coordinator";
pub const GRIDCTL: &str = "gridctl";

/// The package each binary belongs to.
fn package_of(bin: &str) -> &'static str {
    match bin {
        AGENT => "gridforge-agent",
        COORDINATOR | GRIDCTL => "gridforge-coordinator",
        other => panic!("unknown binary {other}"),
    }
}

/// `target/<profile>` of the running test executable (`target/<profile>/deps/NAME-HASH`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the test executable's directory");
    deps.parent().expect("the profile directory").to_path_buf()
}

/// Path of `bin`, built first when needed (once per process and package).
pub fn path(bin: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("GRIDFORGE_BIN_DIR") {
        let p = Path::new(&dir).join(bin);
        assert!(p.is_file(), "GRIDFORGE_BIN_DIR has no {bin}: {}", p.display());
        return p;
    }
    static BUILT: Mutex<Option<HashMap<&'static str, PathBuf>>> = Mutex::new(None);
    let package = package_of(bin);
    let dir = profile_dir();
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if !built.contains_key(package) {
        build(package, &dir);
        built.insert(package, dir.clone());
    }
    let p = dir.join(bin);
    assert!(p.is_file(), "cargo built {package} but {} is missing", p.display());
    p
}

/// Whether the package that holds `bin` exists in this workspace (the coordinator is being built).
pub fn available(bin: &str) -> bool {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let dir = match package_of(bin) {
        "gridforge-agent" => "agent",
        _ => "coordinator",
    };
    root.join(dir).join("Cargo.toml").is_file()
}

fn build(package: &str, profile_dir: &Path) {
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("unexpected profile directory {}", profile_dir.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    let mut cmd = Command::new(cargo);
    // What cargo set for this test (the package's manifest dir and metadata) would make build scripts that
    // watch those variables rerun, and the next `cargo test` rebuild them again.
    for (var, _) in std::env::vars_os() {
        let name = var.to_string_lossy();
        if name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*name,
                "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
            )
        {
            cmd.env_remove(&var);
        }
    }
    let status = cmd
        .args(["build", "--quiet", "--bins", "-p", package, "--profile", profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .status()
        .unwrap_or_else(|e| panic!("running cargo build -p {package}: {e}"));
    assert!(status.success(), "cargo build -p {package} failed: {status}");
}
