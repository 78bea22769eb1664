//! `gridforge-agent diagnose`: the node's checks, run by the CLI itself beside (or without) the daemon.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use gridforge_agent::config::{self, Config};
use gridforge_agent::hypervisor::{Hypervisor, Libvirt};
use gridforge_agent::jobs::{self, JobError};
use gridforge_agent::node::{JobList, NodeContext, diagnostics};
use gridforge_common::error_chain;
use gridforge_proto::v1::Check;
use gridforge_proto::v1::check::Status;

#[derive(Args)]
pub struct DiagnoseArgs {
    /// The agent's configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

/// Print the checks; exits with status 1 when any check fails, 0 otherwise (warnings included). Without a
/// readable configuration (a node not set up yet) the `config` check fails and the rest run on the defaults.
pub fn run(args: &DiagnoseArgs, json: bool) -> Result<()> {
    let (config, config_check) = match Config::load(&args.config) {
        Ok(config) => {
            let reason = format!("loaded {}", args.config.display());
            (config, Check { name: "config".into(), status: Status::Ok as i32, reason })
        }
        Err(e) => {
            let reason = format!("{}; the other checks use the defaults", error_chain(&e));
            (Config::default(), Check { name: "config".into(), status: Status::Fail as i32, reason })
        }
    };
    let hypervisor = (!config.libvirt.uri.is_empty()).then(|| {
        Arc::new(Libvirt::new(&config.libvirt, &config.state_dir).with_network(&config.network))
            as Arc<dyn Hypervisor>
    });
    let journal = config.journal_path();
    // The journal is opened read-only in the mode the daemon shares it in, so this works while it runs.
    let jobs = if journal.exists() {
        jobs::read_journal(&config).map_err(|e| unreadable(&e))
    } else {
        Ok(Vec::new())
    };
    // A term file the daemon cannot read keeps it from starting: the jobs check says why.
    let (jobs, leader_term) = match jobs::read_leader_term(&config) {
        Ok(term) => (jobs, term),
        Err(e) => (Err(error_chain(&e)), 0),
    };
    let ctx = NodeContext { config, hypervisor };
    let mut report = diagnostics::report(
        &ctx,
        match &jobs {
            Ok(list) => JobList::Known(list),
            Err(reason) => JobList::Unknown(reason.clone()),
        },
        leader_term,
    );
    // The daemon's report has no such check: it cannot run without its configuration.
    report.checks.insert(0, config_check);

    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&report).context("encoding the report")?)?;
    } else {
        for c in &report.checks {
            let status = match c.status() {
                Status::Ok => "OK",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
                Status::Unspecified => "?",
            };
            writeln!(out, "{status:<5} {:<13} {}", c.name, c.reason)?;
        }
    }
    out.flush()?;
    if report.checks.iter().any(|c| c.status() == Status::Fail) {
        // The report is the output; the exit status alone says that a check failed.
        std::process::exit(1);
    }
    Ok(())
}

fn unreadable(e: &JobError) -> String {
    format!("{}; ask the running agent with its Diagnostics RPC", error_chain(e))
}
