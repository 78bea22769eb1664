//! `gridforge-agent pki`: a CA and certificates for the agents' mutual TLS.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Result;
use clap::{Args, Subcommand};
use gridforge_common::pki::{self, CertRequest, DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS, Issued};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make a new CA: DIR/ca.pem and DIR/ca.key (mode 0600). Existing files are never overwritten.
    Init {
        /// Directory for the CA (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue DIR/NAME.pem and DIR/NAME.key (mode 0600), signed by the CA in DIR: subject CN=NAME, usable
    /// as a TLS server and client certificate. Without --dns and --ip the names are NAME, localhost and
    /// 127.0.0.1.
    Issue(IssueArgs),
}

#[derive(Args)]
pub struct IssueArgs {
    /// Directory holding ca.pem and ca.key (made by `pki init`).
    #[arg(long)]
    dir: PathBuf,
    /// Certificate name: the subject CN (a client's CN is the operator named in wipe reports) and the file
    /// names.
    #[arg(long)]
    name: String,
    /// DNS subject alternative name (repeatable).
    #[arg(long)]
    dns: Vec<String>,
    /// IP address subject alternative name (repeatable).
    #[arg(long)]
    ip: Vec<IpAddr>,
    /// Validity in days.
    #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
    days: u32,
}

pub fn run(command: PkiCommand, json: bool) -> Result<()> {
    let issued = match command {
        PkiCommand::Init { dir, days } => pki::init(&dir, days)?,
        PkiCommand::Issue(a) => {
            let req = CertRequest { dns: a.dns, ips: a.ip, days: a.days, ..CertRequest::new(&a.name) };
            pki::issue(&a.dir, &req)?
        }
    };
    print_issued(&issued, json);
    Ok(())
}

fn print_issued(issued: &Issued, json: bool) {
    let not_after = issued
        .not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default();
    let not_after = serde_json::to_value(pbjson_types::Timestamp { seconds: not_after, nanos: 0 })
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    if json {
        let value = serde_json::json!({
            "cert": issued.cert, "key": issued.key, "not_after": not_after,
        });
        println!("{value}");
    } else {
        println!("certificate: {}", issued.cert.display());
        println!("key:         {} (mode 0600)", issued.key.display());
        println!("valid until: {not_after}");
    }
}
