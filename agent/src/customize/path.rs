//! Guest paths resolved inside the staging root, chroot-style.
//!
//! The staging tree comes from an image and layers, so any of its symlinks may point anywhere: `/etc/motd ->
//! /etc/shadow`, or a directory link `/etc/systemd/network -> /../../../host`. Every file operation of this
//! module resolves its guest path here first: each component is checked with lstat, a symlink is followed
//! with its target interpreted inside the root (absolute targets re-rooted, `..` clamped at the root), so the
//! host path returned always lies under the root and every existing component before the last is a real
//! directory. The tree is not in use by anything else while it is customized, so checking then acting is
//! sound here; opens still use O_NOFOLLOW on the final component.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::CustomizeError;

/// The kernel's limit on symlinks followed in one lookup (ELOOP beyond it).
pub const MAX_SYMLINKS: usize = 40;

/// What to do when the last component of a guest path is a symlink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalLink {
    /// Follow it (inside the root), as opening the path in the guest would.
    Follow,
    /// Return the link itself: for operations on the link (delete, replace, lchown).
    Keep,
}

/// Resolves `guest_path` inside `root`, following a symlink in the last component too.
pub fn resolve_in_root(root: &Path, guest_path: &str) -> Result<PathBuf, CustomizeError> {
    resolve(root, guest_path, FinalLink::Follow)
}

/// Resolves `guest_path` inside `root` chroot-style. A missing last component (or missing directories
/// before it) is returned as is, so the caller can create it.
pub fn resolve(root: &Path, guest_path: &str, final_link: FinalLink) -> Result<PathBuf, CustomizeError> {
    let io_err =
        |source| CustomizeError::Io { context: format!("resolving guest path {guest_path}"), source };
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending = components(Path::new(guest_path));
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            // At the root, `..` stays at the root, as in a chroot.
            resolved.pop();
            continue;
        }
        let host = join(root, &resolved).join(&name);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() && (!is_last || final_link == FinalLink::Follow) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(CustomizeError::SymlinkLoop { path: guest_path.to_string() });
                }
                let target = fs::read_link(&host).map_err(io_err)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                // A relative target continues from the link's directory, which is `resolved` as it stands.
                let mut next = components(&target);
                next.extend(pending.drain(..));
                pending = next;
            }
            Ok(meta) if !is_last && !meta.is_dir() => {
                return Err(io_err(io::Error::from_raw_os_error(libc::ENOTDIR)));
            }
            Ok(_) => resolved.push(name),
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved.push(name),
            Err(e) => return Err(io_err(e)),
        }
    }
    let host = join(root, &resolved);
    // Holds by construction; checked so that a future change cannot silently break the guarantee.
    if !host.starts_with(root) {
        return Err(CustomizeError::Escape { path: guest_path.to_string() });
    }
    Ok(host)
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(name) => Some(name.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn join(root: &Path, names: &[OsString]) -> PathBuf {
    let mut host = root.to_path_buf();
    host.extend(names);
    host
}

/// Mode and ownership of a file written into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Perm {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Perm {
    pub const fn root(mode: u32) -> Self {
        Self { mode, uid: 0, gid: 0 }
    }
}

/// File operations on the staging tree, each through `resolve`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Guest<'a> {
    pub root: &'a Path,
}

pub(crate) fn io_context(context: String) -> impl FnOnce(io::Error) -> CustomizeError {
    move |source| CustomizeError::Io { context, source }
}

impl<'a> Guest<'a> {
    pub fn new(root: &'a Path) -> Self {
        Self { root }
    }

    pub fn path(&self, guest: &str) -> Result<PathBuf, CustomizeError> {
        resolve(self.root, guest, FinalLink::Follow)
    }

    pub fn link_path(&self, guest: &str) -> Result<PathBuf, CustomizeError> {
        resolve(self.root, guest, FinalLink::Keep)
    }

    /// lstat of the path itself (a final symlink is not followed); None when missing.
    pub fn lstat(&self, guest: &str) -> Result<Option<fs::Metadata>, CustomizeError> {
        let host = self.link_path(guest)?;
        match fs::symlink_metadata(&host) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_context(format!("reading metadata of {guest}"))(e)),
        }
    }

    /// stat of what the path means in the guest (a final symlink followed inside the root).
    pub fn stat(&self, guest: &str) -> Result<Option<fs::Metadata>, CustomizeError> {
        let host = self.path(guest)?;
        match fs::symlink_metadata(&host) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_context(format!("reading metadata of {guest}"))(e)),
        }
    }

    pub fn is_file(&self, guest: &str) -> Result<bool, CustomizeError> {
        Ok(self.stat(guest)?.is_some_and(|m| m.is_file()))
    }

    pub fn read_string(&self, guest: &str) -> Result<Option<String>, CustomizeError> {
        let host = self.path(guest)?;
        match open_nofollow(&host, OpenOptions::new().read(true)) {
            Ok(mut f) => {
                let mut s = String::new();
                io::Read::read_to_string(&mut f, &mut s).map_err(io_context(format!("reading {guest}")))?;
                Ok(Some(s))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_context(format!("opening {guest}"))(e)),
        }
    }

    /// `mkdir -p`: missing directories are created root-owned with `mode`; existing ones are left alone.
    pub fn mkdir_p(&self, guest: &str, mode: u32) -> Result<PathBuf, CustomizeError> {
        let host = self.path(guest)?;
        self.create_missing_dirs(&host, mode)?;
        Ok(host)
    }

    /// Creates the missing directories of an already resolved host path, from the root down. Components
    /// that were missing at resolution cannot be symlinks, and existing ones were checked to be directories.
    fn create_missing_dirs(&self, host: &Path, mode: u32) -> Result<(), CustomizeError> {
        let rel = host
            .strip_prefix(self.root)
            .map_err(|_| CustomizeError::Escape { path: host.display().to_string() })?;
        let mut cur = self.root.to_path_buf();
        for name in rel.components() {
            cur.push(name);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(io_context(format!("creating directory {}", cur.display()))(
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(mode)
                        .create(&cur)
                        .map_err(io_context(format!("creating directory {}", cur.display())))?;
                    // The process umask must not decide guest modes.
                    fs::set_permissions(&cur, fs::Permissions::from_mode(mode))
                        .map_err(io_context(format!("setting mode of {}", cur.display())))?;
                }
                Err(e) => return Err(io_context(format!("creating directory {}", cur.display()))(e)),
            }
        }
        Ok(())
    }

    /// Creates the missing parents of a resolved host path (0755).
    fn mkdir_host_parent(&self, host: &Path) -> Result<(), CustomizeError> {
        match host.parent() {
            Some(parent) if parent.starts_with(self.root) => self.create_missing_dirs(parent, 0o755),
            _ => Ok(()),
        }
    }

    /// Writes a regular file with exactly this content, mode and owner. A symlink at `guest` is replaced by
    /// the file (it is never written through); missing parents are created.
    pub fn write_file(&self, guest: &str, data: &[u8], perm: Perm) -> Result<(), CustomizeError> {
        let host = self.link_path(guest)?;
        self.mkdir_host_parent(&host)?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                fs::remove_file(&host).map_err(io_context(format!("replacing symlink {guest}")))?
            }
            Ok(m) if m.is_dir() => {
                return Err(io_context(format!("writing {guest}"))(io::Error::from_raw_os_error(
                    libc::EISDIR,
                )));
            }
            _ => {}
        }
        let mut f =
            open_nofollow(&host, OpenOptions::new().write(true).create(true).truncate(true).mode(perm.mode))
                .map_err(io_context(format!("opening {guest} for writing")))?;
        f.write_all(data).map_err(io_context(format!("writing {guest}")))?;
        set_perm(&f, perm).map_err(io_context(format!("setting mode and owner of {guest}")))
    }

    /// Replaces the content of a file and keeps its mode and owner; a new file gets `new_perm`. A final
    /// symlink is followed inside the root.
    pub fn rewrite_file(&self, guest: &str, data: &[u8], new_perm: Perm) -> Result<(), CustomizeError> {
        let host = self.path(guest)?;
        self.mkdir_host_parent(&host)?;
        let existed = host.exists();
        let mut f = open_nofollow(
            &host,
            OpenOptions::new().write(true).create(true).truncate(true).mode(new_perm.mode),
        )
        .map_err(io_context(format!("opening {guest} for writing")))?;
        f.write_all(data).map_err(io_context(format!("writing {guest}")))?;
        if !existed {
            set_perm(&f, new_perm).map_err(io_context(format!("setting mode and owner of {guest}")))?;
        }
        Ok(())
    }

    /// Appends one line (adding a newline before it if the file does not end with one); creates the file
    /// with `new_perm` if missing. A final symlink is followed inside the root.
    pub fn append_line(&self, guest: &str, line: &str, new_perm: Perm) -> Result<(), CustomizeError> {
        let mut content = self.read_string(guest)?.unwrap_or_default();
        if !content.is_empty() && !content.ends_with('\n') {
            content.push('\n');
        }
        content.push_str(line);
        content.push('\n');
        self.rewrite_file(guest, content.as_bytes(), new_perm)
    }

    /// Creates (or replaces) a symlink at `guest` pointing to `target` (stored as given).
    pub fn symlink(&self, guest: &str, target: &str) -> Result<(), CustomizeError> {
        let host = self.link_path(guest)?;
        self.mkdir_host_parent(&host)?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {
                return Err(io_context(format!("creating symlink {guest}"))(io::Error::from_raw_os_error(
                    libc::EISDIR,
                )));
            }
            Ok(_) => fs::remove_file(&host).map_err(io_context(format!("replacing {guest}")))?,
            Err(_) => {}
        }
        std::os::unix::fs::symlink(target, &host).map_err(io_context(format!("creating symlink {guest}")))
    }

    /// Removes the path itself (a symlink, not its target; a directory recursively). Missing is fine.
    pub fn remove(&self, guest: &str) -> Result<bool, CustomizeError> {
        let host = self.link_path(guest)?;
        if host == self.root {
            return Err(CustomizeError::Escape { path: guest.to_string() });
        }
        let res = match fs::symlink_metadata(&host) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => Err(e),
            // remove_dir_all does not follow symlinks inside the directory.
            Ok(m) if m.is_dir() => fs::remove_dir_all(&host),
            Ok(_) => fs::remove_file(&host),
        };
        res.map_err(io_context(format!("removing {guest}")))?;
        Ok(true)
    }

    /// chmod and chown what the path means in the guest (a final symlink followed inside the root).
    pub fn set_perm(
        &self,
        guest: &str,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> Result<(), CustomizeError> {
        let host = self.path(guest)?;
        if let Some(mode) = mode {
            fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                .map_err(io_context(format!("setting mode of {guest}")))?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
                .map_err(io_context(format!("setting owner of {guest}")))?;
        }
        Ok(())
    }

    /// lchown of the path itself.
    pub fn lchown(&self, guest: &str, uid: u32, gid: u32) -> Result<(), CustomizeError> {
        let host = self.link_path(guest)?;
        std::os::unix::fs::lchown(&host, Some(uid), Some(gid))
            .map_err(io_context(format!("setting owner of {guest}")))
    }

    /// Names in a guest directory (following links inside the root); empty when it is missing.
    pub fn list_dir(&self, guest: &str) -> Result<Vec<String>, CustomizeError> {
        let host = self.path(guest)?;
        let entries = match fs::read_dir(&host) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Ok(Vec::new());
            }
            Err(e) => return Err(io_context(format!("listing {guest}"))(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_context(format!("listing {guest}")))?;
            // Names that are not UTF-8 cannot be named by a guest path string; they are left alone.
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }
}

pub(crate) fn join_guest(dir: &str, name: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

fn open_nofollow(host: &Path, opts: &mut OpenOptions) -> io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(host)
}

fn set_perm(f: &File, perm: Perm) -> io::Result<()> {
    std::os::unix::fs::fchown(f, Some(perm.uid), Some(perm.gid))?;
    // chown clears set-id bits, so the mode goes last.
    f.set_permissions(fs::Permissions::from_mode(perm.mode))
}

/// Copies a host directory tree (regular files, directories and symlinks as links) into `dst`, which must not
/// exist, and gives every copy to `uid`:`gid`. Used for /etc/skel; both sides are already resolved.
pub(crate) fn copy_tree(src: &Path, dst: &Path, uid: u32, gid: u32) -> Result<(), CustomizeError> {
    let ctx = |what: &str, p: &Path| format!("{what} {}", p.display());
    let meta = fs::symlink_metadata(src).map_err(io_context(ctx("reading", src)))?;
    fs::DirBuilder::new().mode(0o700).create(dst).map_err(io_context(ctx("creating", dst)))?;
    std::os::unix::fs::lchown(dst, Some(uid), Some(gid)).map_err(io_context(ctx("setting owner of", dst)))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(meta.permissions().mode() & 0o7777))
        .map_err(io_context(ctx("setting mode of", dst)))?;
    for entry in fs::read_dir(src).map_err(io_context(ctx("listing", src)))? {
        let entry = entry.map_err(io_context(ctx("listing", src)))?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let ft = entry.file_type().map_err(io_context(ctx("reading", &from)))?;
        if ft.is_dir() {
            copy_tree(&from, &to, uid, gid)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&from).map_err(io_context(ctx("reading link", &from)))?;
            std::os::unix::fs::symlink(target, &to).map_err(io_context(ctx("creating symlink", &to)))?;
            std::os::unix::fs::lchown(&to, Some(uid), Some(gid))
                .map_err(io_context(ctx("setting owner of", &to)))?;
        } else if ft.is_file() {
            let mode =
                entry.metadata().map_err(io_context(ctx("reading", &from)))?.permissions().mode() & 0o7777;
            let mut input = open_nofollow(&from, OpenOptions::new().read(true))
                .map_err(io_context(ctx("opening", &from)))?;
            let mut out = open_nofollow(&to, OpenOptions::new().write(true).create_new(true).mode(0o600))
                .map_err(io_context(ctx("creating", &to)))?;
            io::copy(&mut input, &mut out).map_err(io_context(ctx("copying to", &to)))?;
            set_perm(&out, Perm { mode, uid, gid })
                .map_err(io_context(ctx("setting mode and owner of", &to)))?;
        }
        // Device nodes, sockets and fifos in a skeleton are not copied.
    }
    Ok(())
}
