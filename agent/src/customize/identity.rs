//! Identity reset (what virt-sysprep calls machine-id, ssh-hostkeys, logfiles, bash-history, package caches,
//! tmp-files): a cloned image must not share identifiers, host keys or history with its source.

use super::path::{Guest, Perm, join_guest};
use super::units::enable_unit;
use super::{Applied, CustomizeError};

pub const SSH_HOSTKEYS_UNIT: &str = "/etc/systemd/system/gridforge-ssh-hostkeys.service";

/// Regenerates the host keys before sshd starts; skipped once keys exist.
pub fn ssh_hostkeys_unit() -> String {
    "# Written by gridforge: fresh SSH host keys on the first boot of a cloned image.\n\
     [Unit]\n\
     Description=Generate SSH host keys\n\
     Before=ssh.service ssh.socket\n\
     ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key\n\
     \n\
     [Service]\n\
     Type=oneshot\n\
     ExecStart=/usr/bin/ssh-keygen -A\n\
     RemainAfterExit=yes\n\
     \n\
     [Install]\n\
     WantedBy=multi-user.target\n"
        .to_string()
}

pub(crate) fn reset_identity(guest: &Guest<'_>, applied: &mut Applied) -> Result<(), CustomizeError> {
    // systemd fills an empty machine-id at first boot (and treats it as "first boot" for presets).
    guest.write_file("/etc/machine-id", b"", Perm::root(0o444))?;
    if guest.lstat("/var/lib/dbus/machine-id")?.is_some_and(|m| m.is_file()) {
        guest.remove("/var/lib/dbus/machine-id")?;
        // Debian's dbus links it to the systemd one.
        guest.symlink("/var/lib/dbus/machine-id", "/etc/machine-id")?;
    }

    for name in guest.list_dir("/etc/ssh")? {
        if name.starts_with("ssh_host_") {
            guest.remove(&join_guest("/etc/ssh", &name))?;
        }
    }
    if guest.stat("/etc/ssh")?.is_some_and(|m| m.is_dir()) {
        guest.write_file(SSH_HOSTKEYS_UNIT, ssh_hostkeys_unit().as_bytes(), Perm::root(0o644))?;
        enable_unit(guest, "gridforge-ssh-hostkeys.service", "multi-user.target")?;
        enable_unit(guest, "gridforge-ssh-hostkeys.service", "ssh.service")?;
        if guest.stat("/usr/bin/ssh-keygen")?.is_none() {
            applied.warnings.push(
                "/usr/bin/ssh-keygen is missing in the image: ssh host keys cannot be generated at first boot".into(),
            );
        }
    }

    truncate_logs(guest, "/var/log")?;

    let mut histories = vec!["/root/.bash_history".to_string()];
    for home in guest.list_dir("/home")? {
        histories.push(format!("/home/{home}/.bash_history"));
    }
    for h in histories {
        guest.remove(&h)?;
    }

    for name in guest.list_dir("/var/cache/apt")? {
        if name.ends_with(".bin") {
            guest.remove(&join_guest("/var/cache/apt", &name))?;
        }
    }
    // Package lists are files; the `partial` directory and `lock` stay as apt expects them.
    for name in guest.list_dir("/var/lib/apt/lists")? {
        let path = join_guest("/var/lib/apt/lists", &name);
        if name != "lock" && !guest.lstat(&path)?.is_some_and(|m| m.is_dir()) {
            guest.remove(&path)?;
        }
    }
    for dir in ["/tmp", "/var/tmp"] {
        for name in guest.list_dir(dir)? {
            guest.remove(&join_guest(dir, &name))?;
        }
    }
    Ok(())
}

/// Empties every regular log file (keeping it, its mode and owner) and removes the journal's files, which
/// journald cannot read once truncated.
fn truncate_logs(guest: &Guest<'_>, dir: &str) -> Result<(), CustomizeError> {
    for name in guest.list_dir(dir)? {
        let path = join_guest(dir, &name);
        let Some(meta) = guest.lstat(&path)? else { continue };
        if meta.is_dir() {
            if path == "/var/log/journal" {
                for machine in guest.list_dir(&path)? {
                    let m = join_guest(&path, &machine);
                    if guest.lstat(&m)?.is_some_and(|m| m.is_dir()) {
                        for f in guest.list_dir(&m)? {
                            guest.remove(&join_guest(&m, &f))?;
                        }
                    } else {
                        guest.remove(&m)?;
                    }
                }
            } else {
                truncate_logs(guest, &path)?;
            }
        } else if meta.is_file() && meta.len() > 0 {
            guest.rewrite_file(&path, b"", Perm::root(0o640))?;
        }
    }
    Ok(())
}
