//! The highest coordinator leader term the engine has taken requests from, in a small file beside the job
//! journal: one decimal number and a newline. It is replaced whole (a temp file, fsynced, renamed, the
//! directory fsynced) before a request from a higher term takes effect, so that after a restart the agent
//! still refuses the deposed leader.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use super::JobError;

/// Longest excerpt of a corrupt file's content quoted in the error.
const QUOTE_MAX: usize = 32;

/// The term recorded at `path`; no file is term 0 (no coordinator with leader election has sent anything).
pub(crate) fn read(path: &Path) -> Result<u64, JobError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(JobError::TermRead { path: path.to_path_buf(), source }),
    };
    parse(&bytes).ok_or_else(|| {
        let text = String::from_utf8_lossy(&bytes);
        JobError::TermCorrupt { path: path.to_path_buf(), found: text.chars().take(QUOTE_MAX).collect() }
    })
}

/// Digits only, with at most one trailing newline (`u64::from_str` alone would take "+5").
fn parse(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Record `term` at `path` durably.
pub(crate) fn write(path: &Path, term: u64) -> Result<(), JobError> {
    let err = |source| JobError::TermWrite { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".leader-term-").tempfile_in(dir).map_err(err)?;
    tmp.write_all(format!("{term}\n").as_bytes()).and_then(|()| tmp.as_file().sync_all()).map_err(err)?;
    // Not secret: `gridforge-agent diagnose` reads it as it reads the journal.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644)).map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_term_0() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&dir.path().join("leader-term")).unwrap(), 0);
    }

    #[test]
    fn a_written_term_reads_back_and_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leader-term");
        write(&path, 5).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "5\n");
        write(&path, u64::MAX).unwrap();
        assert_eq!(read(&path).unwrap(), u64::MAX);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["leader-term"], "no temp file is left behind");
        // Written by hand without the newline, it still reads.
        std::fs::write(&path, "12").unwrap();
        assert_eq!(read(&path).unwrap(), 12);
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leader-term");
        for content in ["", "\n", "seven\n", "+5\n", "-1\n", "5\n\n", " 5\n", "18446744073709551616\n"] {
            std::fs::write(&path, content).unwrap();
            let e = read(&path).unwrap_err();
            assert!(matches!(e, JobError::TermCorrupt { .. }), "{content:?}: {e:?}");
            let text = e.to_string();
            assert!(text.contains(&path.display().to_string()), "names the file: {text}");
        }
        std::fs::write(&path, [0xff, 0xfe, b'\n']).unwrap();
        assert!(matches!(read(&path), Err(JobError::TermCorrupt { .. })));
    }

    #[test]
    fn an_unreadable_path_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails other than NotFound.
        let path = dir.path().join("leader-term");
        std::fs::create_dir(&path).unwrap();
        let e = read(&path).unwrap_err();
        assert!(matches!(e, JobError::TermRead { .. }), "{e:?}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}
