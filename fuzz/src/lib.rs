//! Scratch files for the fuzz targets: every input becomes the contents of a file (the parsers read
//! files and devices), kept on tmpfs where there is one and removed when the fuzzer exits.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// This process's scratch directory (`/dev/shm/gridforge-fuzz-<pid>`, else under the temp dir).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("gridforge-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the scratch directory");
        extern "C" fn remove_scratch() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain extern "C" function with no arguments; it only touches a OnceLock.
        unsafe { libc::atexit(remove_scratch) };
        dir
    })
}

/// A path in the scratch directory.
pub fn scratch_path(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

/// The scratch file `name` holding exactly `data`, then zeros up to `len` (at least `data.len()`).
pub fn file_with(name: &str, data: &[u8], len: u64) -> File {
    let path = scratch_path(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("opening a scratch file");
    file.write_all_at(data, 0).expect("writing a scratch file");
    file.set_len(len.max(data.len() as u64)).expect("sizing a scratch file");
    file
}

/// An empty directory `name` in the scratch directory (whatever an earlier input left there removed).
pub fn empty_dir(name: &str) -> PathBuf {
    let path = scratch_path(name);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("clearing {}: {e}", path.display()),
    }
    std::fs::create_dir(&path).expect("creating a scratch directory");
    path
}
