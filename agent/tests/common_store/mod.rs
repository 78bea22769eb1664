//! The Debian image packed into a signed store by the CLI, and provisions from it through the CLI, with the
//! store's blob cache, scratch directory and base store beside it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gridforge_proto::v1::ProvisionResult;

pub fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridforge-agent"))
}

/// Runs the agent; panics with its output unless it succeeded. Returns stdout.
pub fn run_agent(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: gridforge-agent could not run: {e}"));
    assert!(out.status.success(), "{what} failed ({}):\n{}", out.status, output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stdout then stderr.
pub fn output_text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub struct Store {
    pub dir: PathBuf,
    /// The base store of cached provisions (default `<dir>/bases`).
    pub bases: PathBuf,
    /// More arguments for every `provision` (e.g. `--clone-fallback overlay`).
    pub provision_args: Vec<String>,
}

impl Store {
    /// Packs `rootfs` as debian-12-minimal 1 into `<dir>/store`, signed with `<dir>/signing.key`.
    pub fn pack(dir: &Path, rootfs: &Path) -> Self {
        let key = dir.join("signing.key");
        run_agent(agent().args(["image", "keygen", "--out"]).arg(&key), "image keygen");
        run_agent(
            agent()
                .args(["image", "pack", "--rootfs"])
                .arg(rootfs)
                .args(["--name", "debian-12-minimal", "--version", "1", "--store"])
                .arg(dir.join("store"))
                .arg("--key")
                .arg(&key),
            "image pack",
        );
        Self { dir: dir.to_path_buf(), bases: dir.join("bases"), provision_args: Vec::new() }
    }

    /// Runs `provision --json` of `spec` onto `disk`, whatever its outcome.
    pub fn provision_output(&self, spec: &serde_json::Value, disk: &Path) -> Output {
        let name = spec["name"].as_str().unwrap();
        let spec_path = self.dir.join(format!("{name}.json"));
        std::fs::write(&spec_path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        agent()
            .args(["--json", "provision", "--spec"])
            .arg(&spec_path)
            .arg("--disk")
            .arg(disk)
            .arg("--store")
            .arg(self.dir.join("store"))
            .arg("--trusted-key")
            .arg(self.dir.join("signing.key.pub"))
            .arg("--cache")
            .arg(self.dir.join("cache"))
            .arg("--work-dir")
            .arg(self.dir.join("work"))
            .arg("--bases")
            .arg(&self.bases)
            .args(&self.provision_args)
            .output()
            .expect("gridforge-agent runs")
    }

    /// Provisions `spec` onto `disk`; panics unless it succeeded. Returns the result.
    pub fn provision(&self, spec: &serde_json::Value, disk: &Path) -> ProvisionResult {
        let name = spec["name"].as_str().unwrap();
        let out = self.provision_output(spec, disk);
        assert!(out.status.success(), "provision {name} failed ({}):\n{}", out.status, output_text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("provision result {last:?}: {e}"))
    }
}
