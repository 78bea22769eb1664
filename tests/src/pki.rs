//! A grid CA and certificates, made with the real command-line tool (`gridforge-agent pki`).

use std::net::IpAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub use gridforge_testsupport::Pki;

use crate::bins;
use crate::process::run_ok;

const PKI_TIMEOUT: Duration = Duration::from_secs(30);

/// The `pki` commands of the real programs on a [`Pki`] directory.
pub trait PkiCommands {
    /// `gridforge-agent pki init --dir DIR`: a new CA.
    fn init(dir: &Path) -> Self;
    /// `gridforge-agent pki issue --dir DIR --name NAME [--dns NAME --ip A]...`: with addresses, the
    /// certificate names NAME and those addresses (a node); without, NAME, localhost and 127.0.0.1.
    fn issue(&self, name: &str, ips: &[IpAddr]);
    /// `gridctl pki issue --dir DIR --name NAME --role ROLE`: a person's certificate whose OU is the role.
    fn issue_person(&self, name: &str, role: &str);
}

impl PkiCommands for Pki {
    fn init(dir: &Path) -> Pki {
        let d = dir.to_str().expect("a UTF-8 path");
        run_ok(
            Command::new(bins::path(bins::AGENT)).args(["pki", "init", "--dir", d, "--days", "30"]),
            PKI_TIMEOUT,
        );
        Pki::at(dir)
    }

    fn issue(&self, name: &str, ips: &[IpAddr]) {
        let mut cmd = Command::new(bins::path(bins::AGENT));
        cmd.args(["pki", "issue", "--dir", self.dir.to_str().unwrap(), "--name", name, "--days", "30"]);
        if !ips.is_empty() {
            cmd.args(["--dns", name]);
            for ip in ips {
                cmd.args(["--ip", &ip.to_string()]);
            }
        }
        run_ok(&mut cmd, PKI_TIMEOUT);
    }

    fn issue_person(&self, name: &str, role: &str) {
        run_ok(
            Command::new(bins::path(bins::GRIDCTL)).args([
                "pki",
                "issue",
                "--dir",
                self.dir.to_str().unwrap(),
                "--name",
                name,
                "--role",
                role,
                "--days",
                "30",
            ]),
            PKI_TIMEOUT,
        );
    }
}
