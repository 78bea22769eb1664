//! What must never be wiped by accident: mounted devices (or disks with a mounted partition), the disk behind
//! `/`, devices held by another device, active swap, files backing a loop device, anything outside the pool.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Where wipes are allowed. The daemon passes its configured pool; the CLI takes `--pool`.
#[derive(Clone, Debug, Default)]
pub struct WipePolicy {
    /// Allowed targets: for files, directories the file must lie under; for devices, device paths, or
    /// prefixes ending in `*` (`/dev/loop*`). Empty means no pool is configured: every target is allowed
    /// (the safety checks still apply).
    pub pool: Vec<PathBuf>,
}

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it holds the running system's root file system (/ is on device {device})")]
    HoldsRoot { device: String },
    #[error("it is mounted on {mount_point} (device {device})")]
    Mounted { device: String, mount_point: String },
    #[error("it is held by {holders} (see /sys/block/{name}/holders)")]
    Held { name: String, holders: String },
    #[error("it is an active swap area ({swap})")]
    Swap { swap: String },
    #[error("it is the backing file of {loop_device}")]
    LoopBacking { loop_device: String },
    #[error("it is outside the wipe pool ({pool})")]
    OutsidePool { pool: String },
    #[error("it is neither a regular file nor a block device")]
    NotADisk,
}

/// A block device's identity in sysfs.
#[derive(Debug, Clone)]
pub struct SysBlock {
    /// Kernel name: `loop3`, `sda`, `sda1`.
    pub name: String,
    /// `/sys/class/block/<name>`.
    pub dir: PathBuf,
    /// The device and its partitions, as (major, minor).
    pub devices: HashSet<(u32, u32)>,
}

/// sysfs facts about the device with this `st_rdev`.
pub fn sys_block(rdev: u64) -> Option<SysBlock> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let dir = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let mut devices = HashSet::from([(major, minor)]);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let part = entry.path();
            if part.join("partition").exists()
                && let Some(dev) = read_trimmed(&part.join("dev")).and_then(|d| parse_dev(&d))
            {
                devices.insert(dev);
            }
        }
    }
    Some(SysBlock { name, dir, devices })
}

/// Refuse `path` unless it is safe to wipe under `policy`. `force` skips every check; the kernel still
/// refuses to open a mounted device exclusively for writing.
pub fn check(path: &Path, policy: &WipePolicy, force: bool) -> Result<(), Refusal> {
    if force {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|_| Refusal::NotADisk)?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if meta.file_type().is_block_device() {
        if !policy.pool.is_empty() && !policy.pool.iter().any(|p| device_allowed(p, path, &canonical)) {
            return Err(outside(policy));
        }
        check_device(meta.rdev())
    } else if meta.file_type().is_file() {
        if !policy.pool.is_empty() && !policy.pool.iter().any(|p| file_allowed(p, &canonical)) {
            return Err(outside(policy));
        }
        check_file(&canonical, meta.dev(), meta.ino())
    } else {
        Err(Refusal::NotADisk)
    }
}

fn outside(policy: &WipePolicy) -> Refusal {
    let pool = policy.pool.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    Refusal::OutsidePool { pool }
}

fn device_allowed(entry: &Path, path: &Path, canonical: &Path) -> bool {
    let entry_text = entry.to_string_lossy();
    if let Some(prefix) = entry_text.strip_suffix('*') {
        return path.to_string_lossy().starts_with(prefix) || canonical.to_string_lossy().starts_with(prefix);
    }
    let entry_canonical = std::fs::canonicalize(entry).unwrap_or_else(|_| entry.to_path_buf());
    entry == path || entry_canonical == canonical
}

fn file_allowed(entry: &Path, canonical: &Path) -> bool {
    let dir = std::fs::canonicalize(entry).unwrap_or_else(|_| entry.to_path_buf());
    canonical.starts_with(&dir) && canonical != dir
}

fn check_device(rdev: u64) -> Result<(), Refusal> {
    let sys = sys_block(rdev);
    let devices = sys
        .as_ref()
        .map(|s| s.devices.clone())
        .unwrap_or_else(|| HashSet::from([(libc::major(rdev), libc::minor(rdev))]));
    let mounts = mountinfo();
    if let Some(root) = mounts.iter().find(|m| m.mount_point == "/")
        && devices.contains(&root.dev)
    {
        return Err(Refusal::HoldsRoot { device: format!("{}:{}", root.dev.0, root.dev.1) });
    }
    if let Some(m) = mounts.iter().find(|m| devices.contains(&m.dev)) {
        return Err(Refusal::Mounted {
            device: format!("{}:{}", m.dev.0, m.dev.1),
            mount_point: m.mount_point.clone(),
        });
    }
    if let Some(sys) = &sys {
        let mut holders = Vec::new();
        let mut dirs = vec![sys.dir.clone()];
        dirs.extend(
            std::fs::read_dir(&sys.dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("partition").exists()),
        );
        for dir in dirs {
            for holder in std::fs::read_dir(dir.join("holders")).into_iter().flatten().flatten() {
                holders.push(holder.file_name().to_string_lossy().into_owned());
            }
        }
        if !holders.is_empty() {
            return Err(Refusal::Held { name: sys.name.clone(), holders: holders.join(", ") });
        }
    }
    for swap in swaps() {
        if let Ok(meta) = std::fs::metadata(&swap)
            && meta.file_type().is_block_device()
            && devices.contains(&(libc::major(meta.rdev()), libc::minor(meta.rdev())))
        {
            return Err(Refusal::Swap { swap });
        }
    }
    Ok(())
}

fn check_file(canonical: &Path, dev: u64, ino: u64) -> Result<(), Refusal> {
    for swap in swaps() {
        if let Ok(meta) = std::fs::metadata(&swap)
            && meta.dev() == dev
            && meta.ino() == ino
        {
            return Err(Refusal::Swap { swap });
        }
    }
    for entry in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Some(file) = read_trimmed(&backing)
            && Path::new(&file) == canonical
        {
            return Err(Refusal::LoopBacking {
                loop_device: format!("/dev/{}", entry.file_name().to_string_lossy()),
            });
        }
    }
    Ok(())
}

struct Mount {
    dev: (u32, u32),
    mount_point: String,
}

/// `/proc/self/mountinfo`: field 3 is major:minor, field 5 the mount point (octal escapes left as they are).
fn mountinfo() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            Some(Mount { dev: parse_dev(fields.get(2)?)?, mount_point: fields.get(4)?.to_string() })
        })
        .collect()
}

/// Active swap areas from `/proc/swaps` (paths; the header line skipped).
fn swaps() -> Vec<String> {
    let text = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    text.lines().skip(1).filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

fn parse_dev(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// The (major, minor) of the device holding `/`, from `/proc/self/mountinfo`.
pub fn root_device() -> Option<(u32, u32)> {
    mountinfo().into_iter().find(|m| m.mount_point == "/").map(|m| m.dev)
}

/// Model and serial of a block device from sysfs (the parent disk's, for a partition); None where unknown.
pub fn model_and_serial(rdev: u64) -> (Option<String>, Option<String>) {
    let Some(sys) = sys_block(rdev) else { return (None, None) };
    let disk = if sys.dir.join("partition").exists() {
        sys.dir.parent().map(Path::to_path_buf).unwrap_or(sys.dir.clone())
    } else {
        sys.dir.clone()
    };
    let device = disk.join("device");
    let model = read_trimmed(&device.join("model"));
    let serial = read_trimmed(&device.join("serial"))
        .or_else(|| read_trimmed(&device.join("wwid")))
        .or_else(|| read_trimmed(&disk.join("wwid")))
        .or_else(|| read_trimmed(&disk.join("serial")));
    (model, serial)
}
