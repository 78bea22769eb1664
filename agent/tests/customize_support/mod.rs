//! A small Debian-like staging tree for the customize tests, and helpers to inspect it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use base64::Engine;

pub const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
bin:x:2:2:bin:/bin:/usr/sbin/nologin
sys:x:3:3:sys:/dev:/usr/sbin/nologin
sync:x:4:65534:sync:/bin:/bin/sync
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
_apt:x:42:65534::/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin
messagebus:x:100:105::/nonexistent:/usr/sbin/nologin
sshd:x:101:65534::/run/sshd:/usr/sbin/nologin
";

pub const SHADOW: &str = "root:*:20779:0:99999:7:::
daemon:*:20779:0:99999:7:::
bin:*:20779:0:99999:7:::
sys:*:20779:0:99999:7:::
sync:*:20779:0:99999:7:::
www-data:*:20779:0:99999:7:::
_apt:*:20779:0:99999:7:::
nobody:*:20779:0:99999:7:::
systemd-network:!*:20779::::::
messagebus:!:20779::::::
sshd:!:20779::::::
";

pub const GROUP: &str = "root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
sudo:x:27:
audio:x:29:
www-data:x:33:
shadow:x:42:
video:x:44:
plugdev:x:46:
staff:x:50:
users:x:100:
nogroup:x:65534:
systemd-journal:x:999:
systemd-network:x:998:
messagebus:x:105:
_ssh:x:106:
";

pub const GSHADOW: &str = "root:*::
daemon:*::
bin:*::
sys:*::
adm:*::
tty:*::
disk:*::
sudo:*::
audio:*::
www-data:*::
shadow:*::
video:*::
plugdev:*::
staff:*::
users:*::
nogroup:*::
systemd-journal:!*::
systemd-network:!*::
messagebus:!::
_ssh:!::
";

pub const HOSTS: &str = "127.0.0.1\tlocalhost
127.0.1.1\tdebian

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
";

/// A staging tree in a temp dir, laid out like a merged-/usr Debian 12 rootfs (only the files the tests need).
pub struct Tree {
    pub dir: tempfile::TempDir,
}

impl Tree {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn p(&self, guest: &str) -> PathBuf {
        self.root().join(guest.trim_start_matches('/'))
    }

    pub fn read(&self, guest: &str) -> String {
        fs::read_to_string(self.p(guest)).unwrap_or_else(|e| panic!("reading {guest}: {e}"))
    }

    pub fn write(&self, guest: &str, content: &str, mode: u32) {
        let p = self.p(guest);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn mkdir(&self, guest: &str) {
        fs::create_dir_all(self.p(guest)).unwrap();
    }

    pub fn link(&self, guest: &str, target: &str) {
        let p = self.p(guest);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    /// (mode & 07777, uid, gid) of the path itself.
    pub fn stat(&self, guest: &str) -> (u32, u32, u32) {
        let m = fs::symlink_metadata(self.p(guest)).unwrap_or_else(|e| panic!("stat {guest}: {e}"));
        (m.mode() & 0o7777, m.uid(), m.gid())
    }

    pub fn exists(&self, guest: &str) -> bool {
        fs::symlink_metadata(self.p(guest)).is_ok()
    }

    pub fn readlink(&self, guest: &str) -> String {
        fs::read_link(self.p(guest)).unwrap().to_str().unwrap().to_string()
    }
}

pub fn debian_tree() -> Tree {
    let t = Tree { dir: tempfile::Builder::new().prefix("gridforge-customize-").tempdir().unwrap() };
    for d in ["usr/bin", "usr/sbin", "usr/lib/systemd/system", "home", "root", "tmp", "var/tmp", "run", "dev"]
    {
        t.mkdir(d);
    }
    fs::set_permissions(t.p("/root"), fs::Permissions::from_mode(0o700)).unwrap();
    t.link("/bin", "usr/bin");
    t.link("/sbin", "usr/sbin");
    t.link("/lib", "usr/lib");
    t.write("/etc/passwd", PASSWD, 0o644);
    t.write("/etc/shadow", SHADOW, 0o640);
    t.write("/etc/group", GROUP, 0o644);
    t.write("/etc/gshadow", GSHADOW, 0o640);
    for f in ["/etc/shadow", "/etc/gshadow"] {
        std::os::unix::fs::chown(t.p(f), Some(0), Some(42)).unwrap();
    }
    t.write("/etc/hostname", "debian\n", 0o644);
    t.write("/etc/hosts", HOSTS, 0o644);
    t.write("/etc/os-release", "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n", 0o644);
    t.write("/etc/skel/.bashrc", "# ~/.bashrc\n", 0o644);
    t.write("/etc/skel/.profile", "# ~/.profile\n", 0o644);
    t.write("/etc/skel/.bash_logout", "# ~/.bash_logout\n", 0o644);
    t.write("/usr/share/zoneinfo/Europe/Berlin", "TZif2 Berlin\n", 0o644);
    t.write("/usr/share/zoneinfo/Etc/UTC", "TZif2 UTC\n", 0o644);
    t.link("/etc/localtime", "/usr/share/zoneinfo/Etc/UTC");
    t.write("/etc/timezone", "Etc/UTC\n", 0o644);
    t.write("/usr/bin/dash", "#!ELF dash\n", 0o755);
    t.link("/usr/bin/sh", "dash");
    t.write("/usr/bin/sudo", "#!ELF sudo\n", 0o4755);
    t.write("/usr/bin/ssh-keygen", "#!ELF ssh-keygen\n", 0o755);
    t.write("/usr/lib/systemd/systemd", "#!ELF systemd\n", 0o755);
    t.link("/usr/sbin/init", "../lib/systemd/systemd");
    for unit in [
        "systemd-networkd.service",
        "systemd-networkd.socket",
        "systemd-networkd-wait-online.service",
        "ssh.service",
    ] {
        t.write(&format!("/usr/lib/systemd/system/{unit}"), "[Unit]\n", 0o644);
    }
    t.mkdir("/etc/sudoers.d");
    t.mkdir("/etc/systemd/system/multi-user.target.wants");
    t.write("/etc/ssh/sshd_config", "Include /etc/ssh/sshd_config.d/*.conf\n", 0o644);
    t.write("/etc/ssh/ssh_host_ed25519_key", "PRIVATE\n", 0o600);
    t.write("/etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA\n", 0o644);
    t.write("/etc/ssh/ssh_host_rsa_key", "PRIVATE\n", 0o600);
    t.write("/etc/machine-id", "0123456789abcdef0123456789abcdef\n", 0o444);
    t.write("/var/lib/dbus/machine-id", "0123456789abcdef0123456789abcdef\n", 0o644);
    t.link("/etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf");
    t.write("/var/log/dpkg.log", "2026-11-22 install foo\n", 0o644);
    t.write("/var/log/apt/history.log", "Start-Date: 2026-11-22\n", 0o640);
    t.write("/var/log/journal/0123456789abcdef0123456789abcdef/system.journal", "LPKSHHRH", 0o640);
    t.write("/root/.bash_history", "ls\n", 0o600);
    t.write("/var/cache/apt/pkgcache.bin", "cache", 0o644);
    t.write("/var/cache/apt/srcpkgcache.bin", "cache", 0o644);
    t.mkdir("/var/cache/apt/archives/partial");
    t.mkdir("/var/lib/apt/lists/partial");
    t.write("/var/lib/apt/lists/lock", "", 0o640);
    t.write("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease", "release", 0o644);
    t.write("/tmp/leftover", "x", 0o644);
    t.mkdir("/tmp/.X11-unix");
    t.write("/var/tmp/cache.dat", "x", 0o644);
    t.write("/boot/vmlinuz-6.1.0-9-amd64", "KERNEL 6.1.0-9", 0o644);
    t.write("/boot/initrd.img-6.1.0-9-amd64", "INITRD 6.1.0-9", 0o644);
    t.write("/boot/vmlinuz-6.1.0-10-amd64", "KERNEL 6.1.0-10", 0o644);
    t.write("/boot/initrd.img-6.1.0-10-amd64", "INITRD 6.1.0-10", 0o644);
    t.write("/boot/config-6.1.0-10-amd64", "CONFIG", 0o644);
    t
}

fn ssh_string(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An ed25519 authorized_keys line with a deterministic public key.
pub fn ed25519_key(seed: u8, comment: &str) -> String {
    let mut blob = Vec::new();
    ssh_string(&mut blob, b"ssh-ed25519");
    ssh_string(&mut blob, &[seed; 32]);
    format!("ssh-ed25519 {} {comment}", base64::engine::general_purpose::STANDARD.encode(blob))
}

/// A key line whose text says `claimed` but whose blob says `embedded`.
pub fn mismatched_key(claimed: &str, embedded: &str) -> String {
    let mut blob = Vec::new();
    ssh_string(&mut blob, embedded.as_bytes());
    ssh_string(&mut blob, &[7; 32]);
    format!("{claimed} {} x@y", base64::engine::general_purpose::STANDARD.encode(blob))
}

pub fn ecdsa_key() -> String {
    let mut blob = Vec::new();
    ssh_string(&mut blob, b"ecdsa-sha2-nistp256");
    ssh_string(&mut blob, b"nistp256");
    let mut point = vec![4u8];
    point.extend_from_slice(&[9; 64]);
    ssh_string(&mut blob, &point);
    format!("ecdsa-sha2-nistp256 {} ops@example", base64::engine::general_purpose::STANDARD.encode(blob))
}
