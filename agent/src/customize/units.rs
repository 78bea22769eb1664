//! Enabling systemd units by creating the symlinks `systemctl enable` would.

use super::CustomizeError;
use super::path::Guest;

const UNIT_DIRS: &[&str] = &["/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"];

/// Whether a unit file exists in the tree.
pub(crate) fn unit_exists(guest: &Guest<'_>, unit: &str) -> Result<bool, CustomizeError> {
    for dir in UNIT_DIRS {
        if guest.stat(&format!("{dir}/{unit}"))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The path a `.wants` symlink should point to: the unit in /etc if it is there, else in /lib (Debian's
/// `systemctl enable` writes `/lib/systemd/system/...`).
pub(crate) fn unit_target(guest: &Guest<'_>, unit: &str) -> Result<String, CustomizeError> {
    for dir in ["/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system"] {
        let path = format!("{dir}/{unit}");
        if guest.stat(&path)?.is_some() {
            return Ok(path);
        }
    }
    Ok(format!("/lib/systemd/system/{unit}"))
}

/// `<target>.wants/<unit>` in /etc/systemd/system, pointing to the unit file.
pub(crate) fn enable_unit(guest: &Guest<'_>, unit: &str, wanted_by: &str) -> Result<(), CustomizeError> {
    let target = unit_target(guest, unit)?;
    guest.symlink(&format!("/etc/systemd/system/{wanted_by}.wants/{unit}"), &target)
}
