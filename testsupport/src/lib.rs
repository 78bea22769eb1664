//! What the tests of several packages share (the agent's, the coordinator's and the cross-program tests in
//! `tests/`): the layout of a CA directory, an agent's config file, and the check of an installed systemd
//! unit, and a guard that stops a daemon started as a child.
//!
//! Helpers panic on failure, as test code does.

pub mod agent_config;
pub mod etcd;
pub mod pki;
pub mod process;
pub mod systemd;

use std::path::{Path, PathBuf};

pub use agent_config::AgentConfig;
pub use pki::Pki;

/// A file of the repository, by its path from the workspace root (`systemd/agent.toml`).
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}
