//! Configuration files: TOML parsed with errors that fit on one line.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A configuration file that could not be used; every message starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Not TOML, or a key or type the configuration does not have.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Well-formed, but a value is refused: `field` is its dotted key ("jobs.max_io_jobs").
    #[error("{path}: {field}: {reason}")]
    Invalid { path: PathBuf, field: String, reason: String },
}

impl ConfigError {
    pub fn invalid(path: &Path, field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid { path: path.to_path_buf(), field: field.into(), reason: reason.into() }
    }
}

/// Reads the file at `path` and hands its text to `parse`, which names `path` in its own errors.
pub fn load<C>(
    path: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<C, ConfigError>,
) -> Result<C, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ReadError { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// `text` (the file at `path`) parsed as TOML; an error is one line naming the line, the column and the
/// offending line's text ("line 3, column 8 (listen = 7443): invalid type: integer `7443`, expected a
/// string").
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: one_line(text, &e) })
}

fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            let source: String = text.lines().nth(line - 1).unwrap_or("").trim().chars().take(80).collect();
            format!("line {line}, column {column} ({source}): {message}")
        }
        None => message.to_string(),
    }
}
