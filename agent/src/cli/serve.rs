//! `gridforge-agent serve`: run the node daemon.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use gridforge_agent::config::{self, Config};
use gridforge_common::error_chain;
use tracing_subscriber::EnvFilter;

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (TOML) [default: /etc/gridforge/agent.toml; built-in defaults if that file does not
    /// exist].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Log format: JSON lines (the default when standard error is not a terminal, e.g. under systemd) or
    /// human-readable text. RUST_LOG sets the level (default info).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let json = match args.log_format {
        Some(f) => f == LogFormat::Json,
        None => !std::io::stderr().is_terminal(),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    if json {
        // Event fields stay under "fields": a field named like a top-level key (target) must not clash.
        builder.json().with_current_span(false).init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }

    let result = load(args.config.as_deref())
        .and_then(|config| gridforge_agent::daemon::run(config).context("the agent stopped with an error"));
    if let Err(e) = &result {
        tracing::error!("{}", error_chain(e.as_ref()));
    }
    result
}

fn load(path: Option<&std::path::Path>) -> Result<Config> {
    let config = match path {
        Some(path) => Config::load(path)?,
        None => {
            let path = std::path::Path::new(config::DEFAULT_PATH);
            if !path.exists() {
                tracing::warn!("{} does not exist; running with the built-in defaults", path.display());
                return Ok(Config::default());
            }
            Config::load(path)?
        }
    };
    let path = path.unwrap_or(std::path::Path::new(config::DEFAULT_PATH));
    tracing::info!(config = %path.display(), "configuration loaded");
    Ok(config)
}
