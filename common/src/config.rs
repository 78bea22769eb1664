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

/// Reads the file at `path` and hands its text to `parse`, which names `path` in its own errors.
pub fn load<C, E: From<ReadError>>(
    path: &Path,
    parse: impl FnOnce(&str, &Path) -> Result<C, E>,
) -> Result<C, E> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ReadError { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// `text` parsed as TOML; an error is one line naming the line, the column and the offending line's text
/// ("line 3, column 8 (listen = 7443): invalid type: integer `7443`, expected a string").
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| one_line(text, &e))
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
