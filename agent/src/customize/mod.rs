//! Guest customization: typed operations applied to a staging tree by editing its files, with no chroot and
//! no guest code run (virt-customize without an appliance VM).
//!
//! Order: identity reset, hostname, timezone, network, users, root ssh keys, files, delete, firstboot, and
//! passwords last. Every guest path goes through [`resolve_in_root`], so symlinks in the image can never make
//! an operation reach outside the staging root.

mod accounts;
pub mod boot;
mod firstboot;
mod glob;
mod identity;
mod network;
mod path;
mod units;
mod validate;

use std::io;
use std::path::Path;

use gridforge_proto::v1::{Customization, FileOp, User, file_op::Action};

pub use accounts::sha512_crypt;
pub use firstboot::{FIRSTBOOT_DONE, FIRSTBOOT_SCRIPT, FIRSTBOOT_UNIT, firstboot_script, firstboot_unit};
pub use identity::{SSH_HOSTKEYS_UNIT, ssh_hostkeys_unit};
pub use network::{network_file, network_unit};
pub use path::{FinalLink, MAX_SYMLINKS, resolve, resolve_in_root};
pub use validate::validate;

use accounts::{Account, Accounts};
use path::{Guest, Perm, copy_tree};

#[derive(Debug, thiserror::Error)]
pub enum CustomizeError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: user {name} does not exist in the image")]
    UnknownUser { field: String, name: String },
    #[error("{field}: group {name} does not exist in the image")]
    UnknownGroup { field: String, name: String },
    #[error("{field}: {path} does not exist in the image")]
    NotInImage { field: String, path: String },
    #[error("guest path {path} resolves outside the staging root")]
    Escape { path: String },
    #[error("too many levels of symbolic links resolving guest path {path}")]
    SymlinkLoop { path: String },
    #[error(
        "no kernel with its initrd in /boot: a boot layout needs an image with a kernel (/boot/vmlinuz-*)"
    )]
    NoKernel,
    #[error("no systemd-boot EFI binary found (searched {searched}); install systemd-boot-efi")]
    NoEfiBinary { searched: String },
    #[error("hashing a password")]
    PasswordHash(#[source] sha_crypt::password_hash::Error),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// What the caller knows about the VM.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The VM's name: the host name when the customization gives none.
    pub vm_name: String,
}

/// The outcome of `apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Things done that the caller should show (deleting essential files, missing optional tools).
    pub warnings: Vec<String>,
    /// Users created, with their uids.
    pub users: Vec<(String, u32)>,
}

/// Validates `c` and applies it to the staging tree at `root`.
pub fn apply(root: &Path, c: &Customization, ctx: &Context) -> Result<Applied, CustomizeError> {
    validate(c)?;
    let hostname =
        if c.hostname.is_empty() { hostname_from_vm_name(&ctx.vm_name)? } else { c.hostname.clone() };
    let meta = std::fs::metadata(root)
        .map_err(path::io_context(format!("opening staging root {}", root.display())))?;
    if !meta.is_dir() {
        return Err(CustomizeError::Io {
            context: format!("opening staging root {}", root.display()),
            source: io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    let guest = Guest::new(root);
    let mut applied = Applied::default();

    if c.identity_reset.unwrap_or(true) {
        identity::reset_identity(&guest, &mut applied)?;
    }
    set_hostname(&guest, &hostname)?;
    if !c.timezone.is_empty() {
        set_timezone(&guest, &c.timezone)?;
    }
    network::apply_network(&guest, c, &mut applied)?;
    add_users(&guest, c, &mut applied)?;
    if !c.root_ssh_authorized_keys.is_empty() {
        let accounts = Accounts::load(&guest)?;
        let root_account = accounts.user("root").unwrap_or(Account { uid: 0, gid: 0, home: "/root".into() });
        let home =
            if root_account.home.starts_with('/') { root_account.home.clone() } else { "/root".into() };
        install_keys(&guest, &home, &c.root_ssh_authorized_keys, &root_account, true)?;
    }
    for (i, op) in c.files.iter().enumerate() {
        apply_file_op(&guest, &format!("customize.files[{i}]"), op)?;
    }
    for pattern in &c.delete {
        delete_glob(&guest, pattern, &mut applied)?;
    }
    firstboot::apply_firstboot(&guest, c)?;
    accounts::apply_passwords(&guest, c)?;
    Ok(applied)
}

/// A host name from a VM name: lowercase, runs of other characters as `-`, cut to one 63-character label.
fn hostname_from_vm_name(vm_name: &str) -> Result<String, CustomizeError> {
    let mut name = String::new();
    for c in vm_name.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        return Err(CustomizeError::Invalid {
            field: "customize.hostname".into(),
            reason: format!("empty, and the VM name {vm_name:?} gives no valid host name"),
        });
    }
    Ok(name)
}

const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n\
                             ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n";

/// /etc/hostname, and in /etc/hosts the Debian `127.0.1.1 <name>` line (other lines kept).
fn set_hostname(guest: &Guest<'_>, hostname: &str) -> Result<(), CustomizeError> {
    guest.rewrite_file("/etc/hostname", format!("{hostname}\n").as_bytes(), Perm::root(0o644))?;
    let hosts = guest.read_string("/etc/hosts")?.unwrap_or_else(|| DEFAULT_HOSTS.to_string());
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names = if short == hostname { hostname.to_string() } else { format!("{hostname} {short}") };
    let own_line = format!("127.0.1.1\t{names}");
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for line in hosts.lines() {
        if line.split_whitespace().next() == Some("127.0.1.1") {
            continue;
        }
        out.push(line.to_string());
        if !placed && line.split_whitespace().next() == Some("127.0.0.1") {
            out.push(own_line.clone());
            placed = true;
        }
    }
    if !placed {
        out.insert(0, own_line);
    }
    let mut text = out.join("\n");
    text.push('\n');
    guest.rewrite_file("/etc/hosts", text.as_bytes(), Perm::root(0o644))
}

fn set_timezone(guest: &Guest<'_>, tz: &str) -> Result<(), CustomizeError> {
    let zone = format!("/usr/share/zoneinfo/{tz}");
    if !guest.is_file(&zone)? {
        return Err(CustomizeError::NotInImage { field: "customize.timezone".into(), path: zone });
    }
    guest.symlink("/etc/localtime", &zone)?;
    guest.rewrite_file("/etc/timezone", format!("{tz}\n").as_bytes(), Perm::root(0o644))
}

fn add_users(guest: &Guest<'_>, c: &Customization, applied: &mut Applied) -> Result<(), CustomizeError> {
    if c.users.is_empty() {
        return Ok(());
    }
    let mut accounts = Accounts::load(guest)?;
    let mut created = Vec::new();
    for (i, user) in c.users.iter().enumerate() {
        let account = accounts.add_user(&format!("customize.users[{i}]"), user)?;
        created.push((user, account));
    }
    // The databases are written before the homes, so a failure leaves no home without its owner's entry.
    accounts.save(guest)?;
    for (user, account) in created {
        make_home(guest, user, &account, applied)?;
        applied.users.push((user.name.clone(), account.uid));
    }
    Ok(())
}

fn make_home(
    guest: &Guest<'_>,
    user: &User,
    account: &Account,
    applied: &mut Applied,
) -> Result<(), CustomizeError> {
    let home = &account.home;
    if guest.lstat(home)?.is_none() {
        guest.mkdir_p("/home", 0o755)?;
        let skel = guest.path("/etc/skel")?;
        let home_host = guest.path(home)?;
        if skel.is_dir() {
            copy_tree(&skel, &home_host, account.uid, account.gid)?;
        } else {
            guest.mkdir_p(home, 0o700)?;
        }
        // Debian's adduser default (DIR_MODE 0700 since bookworm).
        guest.set_perm(home, Some(0o700), Some((account.uid, account.gid)))?;
    } else {
        applied
            .warnings
            .push(format!("home {home} of user {} existed already and was kept as is", user.name));
    }
    if !user.ssh_authorized_keys.is_empty() {
        install_keys(guest, home, &user.ssh_authorized_keys, account, false)?;
    }
    if guest.stat(&format!("{home}/.ssh"))?.is_some() {
        guest.set_perm(&format!("{home}/.ssh"), Some(0o700), Some((account.uid, account.gid)))?;
    }
    if user.sudo {
        if guest.stat("/usr/bin/sudo")?.is_none() {
            applied
                .warnings
                .push(format!("user {} was given sudo, but sudo is not installed in the image", user.name));
        }
        guest.write_file(
            &format!("/etc/sudoers.d/90-gridforge-{}", user.name),
            format!("{} ALL=(ALL) NOPASSWD:ALL\n", user.name).as_bytes(),
            Perm::root(0o440),
        )?;
    }
    Ok(())
}

/// Writes `~/.ssh/authorized_keys` (0700/0600, owned by the account). With `keep_existing`, keys already in
/// the file stay and only new ones are added.
fn install_keys(
    guest: &Guest<'_>,
    home: &str,
    keys: &[String],
    account: &Account,
    keep_existing: bool,
) -> Result<(), CustomizeError> {
    let ssh_dir = format!("{home}/.ssh");
    let file = format!("{ssh_dir}/authorized_keys");
    let owner = Some((account.uid, account.gid));
    if guest.stat(&ssh_dir)?.is_none() {
        guest.mkdir_p(&ssh_dir, 0o700)?;
    }
    guest.set_perm(&ssh_dir, Some(0o700), owner)?;
    let mut lines: Vec<String> = if keep_existing {
        guest.read_string(&file)?.unwrap_or_default().lines().map(str::to_string).collect()
    } else {
        Vec::new()
    };
    for key in keys {
        let key = key.trim().to_string();
        if !lines.contains(&key) {
            lines.push(key);
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    guest.write_file(&file, text.as_bytes(), Perm { mode: 0o600, uid: account.uid, gid: account.gid })
}

/// Owner and group of a file operation; defaults: root, and the owner's primary group.
fn file_owner(guest: &Guest<'_>, field: &str, op: &FileOp) -> Result<Option<(u32, u32)>, CustomizeError> {
    if op.owner.is_empty() && op.group.is_empty() {
        return Ok(None);
    }
    let accounts = Accounts::load(guest)?;
    let (uid, primary_gid) = if op.owner.is_empty() {
        (0, 0)
    } else {
        let a = accounts.user(&op.owner).ok_or_else(|| CustomizeError::UnknownUser {
            field: format!("{field}.owner"),
            name: op.owner.clone(),
        })?;
        (a.uid, a.gid)
    };
    let gid = if op.group.is_empty() {
        primary_gid
    } else {
        accounts.group_gid(&op.group).ok_or_else(|| CustomizeError::UnknownGroup {
            field: format!("{field}.group"),
            name: op.group.clone(),
        })?
    };
    Ok(Some((uid, gid)))
}

fn apply_file_op(guest: &Guest<'_>, field: &str, op: &FileOp) -> Result<(), CustomizeError> {
    let action = Action::try_from(op.action).map_err(|_| CustomizeError::Invalid {
        field: format!("{field}.action"),
        reason: format!("unknown action {}", op.action),
    })?;
    let mode = if op.mode.is_empty() {
        None
    } else {
        Some(
            validate::parse_mode(&op.mode)
                .map_err(|reason| CustomizeError::Invalid { field: format!("{field}.mode"), reason })?,
        )
    };
    let owner = file_owner(guest, field, op)?;
    let (uid, gid) = owner.unwrap_or((0, 0));
    match action {
        Action::Write => {
            guest.write_file(&op.path, op.content.as_bytes(), Perm { mode: mode.unwrap_or(0o644), uid, gid })
        }
        Action::AppendLine => {
            guest.append_line(&op.path, &op.content, Perm { mode: mode.unwrap_or(0o644), uid, gid })?;
            guest.set_perm(&op.path, mode, owner)
        }
        Action::Mkdir => {
            guest.mkdir_p(&op.path, 0o755)?;
            guest.set_perm(&op.path, Some(mode.unwrap_or(0o755)), owner)
        }
        Action::Symlink => {
            guest.symlink(&op.path, &op.target)?;
            match owner {
                Some((uid, gid)) => guest.lchown(&op.path, uid, gid),
                None => Ok(()),
            }
        }
        Action::Chmod => {
            if guest.stat(&op.path)?.is_none() {
                return Err(CustomizeError::NotInImage {
                    field: format!("{field}.path"),
                    path: op.path.clone(),
                });
            }
            guest.set_perm(&op.path, mode, owner)
        }
    }
}

/// Paths whose deletion leaves a guest that cannot boot or log in.
const ESSENTIAL_PATHS: &[&str] = &[
    "/etc/passwd",
    "/etc/shadow",
    "/etc/group",
    "/bin/sh",
    "/sbin/init",
    "/lib/systemd/systemd",
    "/etc/fstab",
];

fn delete_glob(guest: &Guest<'_>, pattern: &str, applied: &mut Applied) -> Result<(), CustomizeError> {
    let matched = glob::glob(guest, pattern)?;
    let mut essential_hosts = Vec::new();
    for e in ESSENTIAL_PATHS {
        essential_hosts.push(guest.link_path(e)?);
        essential_hosts.push(guest.path(e)?);
    }
    for name in guest.list_dir("/boot")? {
        if name.starts_with("vmlinuz-") {
            essential_hosts.push(guest.link_path(&format!("/boot/{name}"))?);
        }
    }
    for path in matched {
        let host = guest.link_path(&path)?;
        if essential_hosts.iter().any(|e| e.starts_with(&host)) {
            applied
                .warnings
                .push(format!("delete {pattern:?} removes {path}, which the guest needs to boot or log in"));
        }
        guest.remove(&path)?;
    }
    Ok(())
}
