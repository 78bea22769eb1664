//! qcow2 overlays on a read-only raw base, and raw views of them.
//!
//! An overlay is made with `qemu-img create -f qcow2 -b BASE -F raw`: it holds only the clusters written to
//! it, everything else reads through to the base. The agent writes raw GPT, FAT and ext4 structures and
//! mounts file systems through loop devices, so it works on an overlay through an [`Export`]: a
//! `qemu-storage-daemon` serving the overlay's guest view as a raw file over FUSE, for as long as the export
//! lives. Whatever the agent writes there lands in the overlay's own clusters; the base is opened read-only.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The overlay's cluster size: the unit a write allocates. 64 KiB is qemu's default and keeps the guest's
/// own I/O fast; an unchanged clone still holds only a few MiB.
pub const CLUSTER_SIZE: u32 = 64 * 1024;

/// How long an export may take to come up or to go away.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(20);

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{tool} is not installed (package {package}); it is needed for qcow2 overlays")]
    Missing { tool: &'static str, package: &'static str },
    #[error("{tool} failed on {path}: {detail}")]
    Tool { tool: &'static str, path: PathBuf, detail: String },
    #[error("{context}: {path}")]
    Io {
        context: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: &str, path: &Path) -> impl FnOnce(io::Error) -> OverlayError {
    let (context, path) = (context.to_string(), path.to_path_buf());
    move |source| OverlayError::Io { context, path, source }
}

fn spawn_error(tool: &'static str, package: &'static str, path: &Path, e: io::Error) -> OverlayError {
    if e.kind() == io::ErrorKind::NotFound {
        OverlayError::Missing { tool, package }
    } else {
        io_err(&format!("running {tool}"), path)(e)
    }
}

/// Make `path` a qcow2 overlay of `size` bytes on the raw disk `base` (an absolute path, recorded in the
/// overlay's header). An existing file at `path` is truncated and reused (same inode).
pub fn create(path: &Path, base: &Path, size: u64) -> Result<(), OverlayError> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg("-o")
        .arg(format!("cluster_size={CLUSTER_SIZE}"))
        .arg(path)
        .arg(size.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error("qemu-img", "qemu-utils", path, e))?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(OverlayError::Tool { tool: "qemu-img", path: path.to_path_buf(), detail });
    }
    Ok(())
}

/// The backing file named in the header of the qcow2 image at `path`, or None when `path` holds no qcow2
/// image (or one without a backing file).
pub fn backing_file(path: &Path) -> io::Result<Option<PathBuf>> {
    let file = File::open(path)?;
    let mut header = [0u8; 20];
    match file.read_exact_at(&mut header, 0) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &header[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    // qemu limits backing file names to 1023 bytes.
    if offset == 0 || len == 0 || len > 1023 {
        return Ok(None);
    }
    let mut name = vec![0u8; len as usize];
    match file.read_exact_at(&mut name, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    use std::os::unix::ffi::OsStringExt;
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(name))))
}

/// The virtual (guest) size of the qcow2 image at `path`, from its header.
pub fn virtual_size(path: &Path) -> io::Result<u64> {
    let mut header = [0u8; 32];
    File::open(path)?.read_exact_at(&mut header, 0)?;
    if &header[..4] != QCOW2_MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a qcow2 image"));
    }
    Ok(u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}

/// The guest view of a qcow2 overlay as a raw file, served by `qemu-storage-daemon` over FUSE while this
/// lives. [`Export::stop`] flushes and unmounts; dropping it does the same, logging what fails.
#[derive(Debug)]
pub struct Export {
    child: Option<Child>,
    mountpoint: PathBuf,
    image: PathBuf,
    /// `<mountpoint>.lock`, locked while this lives: an unlocked one marks an export whose owner died.
    lock: Option<(PathBuf, nix::fcntl::Flock<File>)>,
}

impl Export {
    /// Serve `image` (a qcow2 file) at a new file in `scratch`, writable or read-only.
    pub fn start(image: &Path, scratch: &Path, writable: bool) -> Result<Self, OverlayError> {
        std::fs::create_dir_all(scratch).map_err(io_err("creating the scratch directory", scratch))?;
        remove_stale_exports(scratch);
        let mountpoint = tempfile::Builder::new()
            .prefix("export-")
            .tempfile_in(scratch)
            .map_err(io_err("making an export mount point in", scratch))?
            .into_temp_path()
            .keep()
            .map_err(|e| io_err("making an export mount point in", scratch)(e.error))?;
        let lock_path = lock_path(&mountpoint);
        let lock = File::create(&lock_path).map_err(io_err("creating", &lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io_err("locking", &lock_path)(e.into()))?;
        let parent_dev = std::fs::metadata(scratch).map_err(io_err("reading", scratch))?.dev();
        let file = serde_json::json!({
            "driver": "file", "node-name": "file", "filename": image, "read-only": !writable,
        });
        let disk = serde_json::json!({
            "driver": "qcow2", "node-name": "disk", "file": "file", "read-only": !writable,
        });
        let export = serde_json::json!({
            "type": "fuse", "id": "export", "node-name": "disk", "mountpoint": mountpoint,
            "writable": writable,
        });
        let mut command = Command::new("qemu-storage-daemon");
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The daemon gets SIGTERM
        // (flush, unmount, exit) if the thread that started it dies, e.g. with the agent killed mid-job.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Owned from here: a failure below removes the mount point and its lock.
        let mut this =
            Self { child: None, mountpoint, image: image.to_path_buf(), lock: Some((lock_path, lock)) };
        let child = command
            .arg("--blockdev")
            .arg(file.to_string())
            .arg("--blockdev")
            .arg(disk.to_string())
            .arg("--export")
            .arg(export.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| spawn_error("qemu-storage-daemon", "qemu-system-common", image, e))?;
        this.child = Some(child);
        let start = Instant::now();
        loop {
            let child = this.child.as_mut().expect("running");
            if let Some(status) =
                child.try_wait().map_err(io_err("waiting for qemu-storage-daemon", image))?
            {
                let mut detail = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = err.read_to_string(&mut detail);
                }
                this.child = None;
                return Err(OverlayError::Tool {
                    tool: "qemu-storage-daemon",
                    path: image.to_path_buf(),
                    detail: format!("{status}: {}", detail.trim()),
                });
            }
            // Mounted once the mount point is on another device than its directory.
            if std::fs::metadata(&this.mountpoint).is_ok_and(|m| m.dev() != parent_dev) {
                return Ok(this);
            }
            if start.elapsed() > EXPORT_TIMEOUT {
                return Err(OverlayError::Tool {
                    tool: "qemu-storage-daemon",
                    path: image.to_path_buf(),
                    detail: format!("the export did not come up within {EXPORT_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The raw view: a regular file of the overlay's virtual size.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Flush the overlay and end the export.
    pub fn stop(mut self) -> Result<(), OverlayError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), OverlayError> {
        let Some(mut child) = self.child.take() else {
            let _ = std::fs::remove_file(&self.mountpoint);
            self.unlock();
            return Ok(());
        };
        // SIGTERM: the daemon flushes every node and unmounts before it exits.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        let status = loop {
            match child.try_wait().map_err(io_err("waiting for qemu-storage-daemon", &self.image))? {
                Some(status) => break Some(status),
                None if start.elapsed() > EXPORT_TIMEOUT => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        // A daemon that died without unmounting leaves a dead FUSE mount: detach it.
        let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.mountpoint);
        self.unlock();
        let mut detail = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut detail);
        }
        match status {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(OverlayError::Tool {
                tool: "qemu-storage-daemon",
                path: self.image.clone(),
                detail: format!("{s}: {}", detail.trim()),
            }),
            None => Err(OverlayError::Tool {
                tool: "qemu-storage-daemon",
                path: self.image.clone(),
                detail: format!("did not stop within {EXPORT_TIMEOUT:?}; killed"),
            }),
        }
    }
}

impl Export {
    fn unlock(&mut self) {
        if let Some((path, lock)) = self.lock.take() {
            let _ = std::fs::remove_file(&path);
            drop(lock);
        }
    }
}

fn lock_path(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Exports in `scratch` whose owner died (the agent killed with its daemon): their lock is free. Their mount
/// is detached and their files removed; exports still in use hold their locks and are left alone.
fn remove_stale_exports(scratch: &Path) {
    let Ok(entries) = std::fs::read_dir(scratch) else { return };
    for entry in entries.flatten() {
        let lock_path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(mountpoint) = name.strip_prefix("export-").and_then(|n| n.strip_suffix(".lock")) else {
            continue;
        };
        let Ok(file) = File::open(&lock_path) else { continue };
        let Ok(lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        let mountpoint = scratch.join(format!("export-{mountpoint}"));
        let _ = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&mountpoint);
        let _ = std::fs::remove_file(&lock_path);
        drop(lock);
        tracing::info!("removed the stale export {}", mountpoint.display());
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "ending the export of {}", self.image.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_file_has_no_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert_eq!(backing_file(&raw).unwrap(), None);
        std::fs::write(&raw, b"QFI").unwrap();
        assert_eq!(backing_file(&raw).unwrap(), None, "a short file");
    }

    #[test]
    fn an_overlay_names_its_base_and_reads_through_to_it_in_an_export() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        let mut bytes = vec![0u8; 4 << 20];
        bytes[1 << 20..(1 << 20) + 5].copy_from_slice(b"hello");
        std::fs::write(&base, &bytes).unwrap();
        let overlay = dir.path().join("vm.qcow2");
        create(&overlay, &base, 4 << 20).unwrap();
        assert_eq!(backing_file(&overlay).unwrap(), Some(base.clone()));
        assert_eq!(virtual_size(&overlay).unwrap(), 4 << 20);

        let export = Export::start(&overlay, dir.path(), true).unwrap();
        let view = std::fs::OpenOptions::new().read(true).write(true).open(export.path()).unwrap();
        assert_eq!(view.metadata().unwrap().len(), 4 << 20);
        let mut got = [0u8; 5];
        view.read_exact_at(&mut got, 1 << 20).unwrap();
        assert_eq!(&got, b"hello");
        view.write_all_at(b"world", 2 << 20).unwrap();
        drop(view);
        export.stop().unwrap();

        assert_eq!(std::fs::read(&base).unwrap(), bytes, "the base is never written");
        let export = Export::start(&overlay, dir.path(), false).unwrap();
        let view = File::open(export.path()).unwrap();
        view.read_exact_at(&mut got, 2 << 20).unwrap();
        assert_eq!(&got, b"world", "the write is in the overlay");
        drop(view);
        let mountpoint = export.path().to_path_buf();
        drop(export);
        assert!(!mountpoint.exists(), "the mount point is removed");
        let overlay_bytes = std::fs::metadata(&overlay).unwrap().blocks() * 512;
        assert!(overlay_bytes < 1 << 20, "the overlay holds {overlay_bytes} bytes");
    }

    #[test]
    fn an_export_whose_owner_died_is_removed_and_a_live_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let overlay = dir.path().join("vm.qcow2");
        create(&overlay, &base, 1 << 20).unwrap();
        // What a killed owner leaves: a mount point and its unlocked lock file.
        let stale = dir.path().join("export-dead");
        std::fs::write(&stale, b"").unwrap();
        std::fs::write(dir.path().join("export-dead.lock"), b"").unwrap();
        let live = Export::start(&overlay, dir.path(), false).unwrap();
        assert!(!stale.exists() && !dir.path().join("export-dead.lock").exists(), "the stale export stays");
        let second = dir.path().join("vm2.qcow2");
        create(&second, &base, 1 << 20).unwrap();
        let other = Export::start(&second, dir.path(), false).unwrap();
        assert_eq!(File::open(live.path()).unwrap().metadata().unwrap().len(), 1 << 20, "the live one works");
        let names = |d: &Path| {
            let mut n: Vec<String> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(dir.path()).iter().filter(|n| n.starts_with("export-")).count(), 4);
        drop(other);
        drop(live);
        assert!(names(dir.path()).iter().all(|n| !n.starts_with("export-")), "{:?}", names(dir.path()));
    }

    #[test]
    fn a_missing_image_is_an_error_naming_the_tool() {
        let dir = tempfile::tempdir().unwrap();
        let err = Export::start(&dir.path().join("none.qcow2"), dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("qemu-storage-daemon failed on"), "{err}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "a failed export left {left:?}");
    }
}
