//! An agent's config file for a test: every directory under one root, mutual TLS with a certificate of a
//! test CA, and what the test adds.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::pki::Pki;

/// The settings of a test agent's `agent.toml`: `state_dir`, `cache_dir` and `work_dir` are `ROOT/state`,
/// `ROOT/cache` and `ROOT/work`, the report signing key is in the state directory, and the agent presents
/// one certificate of a [`Pki`]. Built with [`AgentConfig::new`] and the setters; [`AgentConfig::text`]
/// is the file.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    node_name: String,
    listen: SocketAddr,
    metrics_listen: Option<SocketAddr>,
    root: PathBuf,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    images: Option<(PathBuf, PathBuf)>,
    libvirt_uri: String,
    libvirt_extra: String,
    devices: Vec<PathBuf>,
    jobs_extra: String,
}

impl AgentConfig {
    /// Node `node_name` serving gRPC on `listen` with certificate `cert` of `pki`, everything under `root`;
    /// no metrics listener, no image store, no libvirt (disk jobs only) and no devices outside the pool.
    pub fn new(node_name: &str, listen: SocketAddr, root: &Path, pki: &Pki, cert: &str) -> AgentConfig {
        AgentConfig {
            node_name: node_name.to_string(),
            listen,
            metrics_listen: None,
            root: root.to_path_buf(),
            ca: pki.ca(),
            cert: pki.cert(cert),
            key: pki.key(cert),
            images: None,
            libvirt_uri: String::new(),
            libvirt_extra: String::new(),
            devices: Vec::new(),
            jobs_extra: String::new(),
        }
    }

    /// Serve Prometheus metrics on `addr`.
    pub fn metrics_listen(mut self, addr: SocketAddr) -> Self {
        self.metrics_listen = Some(addr);
        self
    }

    /// The image store in directory `store`, whose index is signed by the key in `trusted_key`; the base
    /// store of cached provisions is `<root>/bases`.
    pub fn images(mut self, store: &Path, trusted_key: &Path) -> Self {
        self.images = Some((store.to_path_buf(), trusted_key.to_path_buf()));
        self
    }

    /// `libvirt.uri` (its line in the file is exactly `uri = "URI"`), and further lines of the `[libvirt]`
    /// table in `extra`.
    pub fn libvirt(mut self, uri: &str, extra: &str) -> Self {
        self.libvirt_uri = uri.to_string();
        self.libvirt_extra = extra.to_string();
        self
    }

    /// `jobs.devices`: what jobs may target outside the pool.
    pub fn devices(mut self, devices: &[PathBuf]) -> Self {
        self.devices = devices.to_vec();
        self
    }

    /// Further lines of the `[jobs]` table.
    pub fn jobs_extra(mut self, lines: &str) -> Self {
        self.jobs_extra = lines.to_string();
        self
    }

    /// The config file's text. The `[tls]` table starts with its header line alone, `[tls]\n`.
    pub fn text(&self) -> String {
        let root = &self.root;
        let metrics = self.metrics_listen.map(|a| a.to_string()).unwrap_or_default();
        let mut t = String::new();
        let _ = writeln!(t, "node_name = {}", quoted(&self.node_name));
        let _ = writeln!(t, "listen = \"{}\"", self.listen);
        let _ = writeln!(t, "metrics_listen = \"{metrics}\"");
        let _ = writeln!(t, "state_dir = {}", path(&root.join("state")));
        let _ = writeln!(t, "cache_dir = {}", path(&root.join("cache")));
        let _ = writeln!(t, "work_dir = {}", path(&root.join("work")));
        let _ = writeln!(t, "\n[tls]");
        let _ =
            writeln!(t, "ca = {}\ncert = {}\nkey = {}", path(&self.ca), path(&self.cert), path(&self.key));
        if let Some((store, trusted_key)) = &self.images {
            let _ = writeln!(t, "\n[images]\nstore = {}\ntrusted_key = {}", path(store), path(trusted_key));
            let _ = writeln!(t, "bases_dir = {}", path(&root.join("bases")));
        }
        let _ = writeln!(t, "\n[libvirt]\nuri = {}", quoted(&self.libvirt_uri));
        push_lines(&mut t, &self.libvirt_extra);
        let devices: Vec<String> = self.devices.iter().map(|d| path(d)).collect();
        let _ = writeln!(t, "\n[jobs]\ndevices = [{}]", devices.join(", "));
        let _ = writeln!(t, "report_signing_key = {}", path(&root.join("state/report-signing.key")));
        push_lines(&mut t, &self.jobs_extra);
        t
    }

    /// Write the config file to `file`.
    pub fn write(&self, file: &Path) {
        std::fs::write(file, self.text()).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    }
}

/// `lines`, ended by a newline, unless empty.
fn push_lines(t: &mut String, lines: &str) {
    if !lines.is_empty() {
        t.push_str(lines);
        if !lines.ends_with('\n') {
            t.push('\n');
        }
    }
}

/// `s` as a TOML basic string.
pub fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn path(p: &Path) -> String {
    quoted(p.to_str().expect("a UTF-8 path"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_has_every_setting_the_tests_rely_on() {
        let pki = Pki::at(Path::new("/t/pki"));
        let text =
            AgentConfig::new("n\"1", "127.0.0.1:7443".parse().unwrap(), Path::new("/t"), &pki, "agent")
                .libvirt("test:///default", "pool = \"p\"")
                .devices(&[PathBuf::from("/t/disks")])
                .jobs_extra("shutdown_grace_secs = 2")
                .text();
        assert!(
            text.starts_with("node_name = \"n\\\"1\"\nlisten = \"127.0.0.1:7443\"\nmetrics_listen = \"\"\n")
        );
        assert!(text.contains("\n[tls]\nca = \"/t/pki/ca.pem\"\ncert = \"/t/pki/agent.pem\"\n"), "{text}");
        assert!(text.contains("\nuri = \"test:///default\"\npool = \"p\"\n"), "{text}");
        assert!(text.contains("devices = [\"/t/disks\"]\n"), "{text}");
        assert!(text.ends_with("report-signing.key\"\nshutdown_grace_secs = 2\n"), "{text}");
        assert!(!text.contains("[images]"), "{text}");
    }
}
