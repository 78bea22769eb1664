//! gridforge-coordinator: the grid manager daemon. `gridforge-coordinator --config PATH` (also accepted:
//! `gridforge-coordinator serve --config PATH`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use gridforge_coordinator::config::Config;

#[derive(Parser)]
#[command(
    name = "gridforge-coordinator",
    version,
    about = "The gridforge coordinator: holds the grid view, places VMs and pushes jobs to the node agents",
    after_help = "Exit codes: 0 stopped cleanly, 1 failed (the reason is logged), 2 usage or config error.\n\
                  Settings: see systemd/coordinator.toml (every key documented)."
)]
struct Args {
    /// `serve` (the only mode; may be left out).
    #[arg(value_parser = ["serve"])]
    mode: Option<String>,
    /// Configuration file.
    #[arg(long, default_value = "/etc/gridforge/coordinator.toml")]
    config: PathBuf,
    /// Log lines as text or JSON (stderr; RUST_LOG filters, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gridforge-coordinator: {}", gridforge_coordinator::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    match gridforge_coordinator::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", gridforge_coordinator::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
