//! `gridforge-agent pki`: a CA and certificates for the agents' mutual TLS.

use std::time::SystemTime;

use anyhow::Result;
use clap::Subcommand;
use gridforge_common::pki::{CaArgs, CertArgs, Issued};

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Make a new CA: DIR/ca.pem and DIR/ca.key (mode 0600). Existing files are never overwritten.
    Init(CaArgs),
    /// Issue DIR/NAME.pem and DIR/NAME.key (mode 0600), signed by the CA in DIR: subject CN=NAME, usable
    /// as a TLS server and client certificate (a client's CN is the operator named in wipe reports).
    Issue(CertArgs),
}

pub fn run(command: PkiCommand, json: bool) -> Result<()> {
    let issued = match command {
        PkiCommand::Init(a) => a.init()?,
        PkiCommand::Issue(a) => a.issue(None)?,
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
