//! A grid CA and certificates, made with the real command-line tool (`gridforge-agent pki`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gridforge_common::client::ClientTls;

use crate::bins;
use crate::process::run_ok;

const PKI_TIMEOUT: Duration = Duration::from_secs(30);

/// A CA in a directory; certificate `NAME` is `DIR/NAME.pem` + `DIR/NAME.key`.
#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// `pki init --dir DIR`.
    pub fn init(dir: &Path) -> Pki {
        let d = dir.to_str().expect("a UTF-8 path");
        run_ok(
            Command::new(bins::path(bins::AGENT)).args(["pki", "init", "--dir", d, "--days", "30"]),
            PKI_TIMEOUT,
        );
        Pki { dir: dir.to_path_buf() }
    }

    /// `pki issue --dir DIR --name NAME [--dns NAME --ip A]...`: with addresses, the certificate names NAME
    /// and those addresses (a node); without, NAME, localhost and 127.0.0.1.
    pub fn issue(&self, name: &str, ips: &[IpAddr]) {
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

    /// `gridctl pki issue --dir DIR --name NAME --role ROLE`: a person's certificate whose OU is the role.
    pub fn issue_person(&self, name: &str, role: &str) {
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

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// Client TLS as certificate `name`.
    pub fn client(&self, name: &str) -> ClientTls {
        ClientTls { ca: self.ca(), cert: self.cert(name), key: self.key(name), domain: None }
    }
}
