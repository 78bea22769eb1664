//! A full customization of a real Debian 12 rootfs (GRIDFORGE_DEBIAN_ROOTFS names its tar, else it is built),
//! checked with the stock tools: grpck/pwck on the account files, and mke2fs -d + e2fsck + debugfs on an ext4
//! image of the tree.

mod common_vm;
mod customize_support;

use std::fs;
use std::path::Path;
use std::process::Command;

use customize_support::ed25519_key;
use gridforge_agent::customize::boot::install_boot;
use gridforge_agent::customize::{Context, apply, resolve_in_root};
use gridforge_proto::v1::{Customization, FileOp, NetworkInterface, User, file_op::Action};

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test and could not run: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn full_customization_of_debian_12() {
    // From GRIDFORGE_DEBIAN_ROOTFS (scripts/test sets it), else built by scripts/build-image: never skipped.
    let tar = common_vm::image_rootfs("debian-12-minimal", "GRIDFORGE_DEBIAN_ROOTFS");
    let tar = tar.to_str().expect("UTF-8 path");
    let dir = tempfile::Builder::new().prefix("gridforge-debian-").tempdir().unwrap();
    let root = dir.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    let r = root.to_str().unwrap();
    let (ok, out) = run("tar", &["-xpf", tar, "-C", r, "--numeric-owner"]);
    assert!(ok, "extracting {tar}: {out}");

    let c = Customization {
        hostname: "deb-test".into(),
        timezone: "Europe/Berlin".into(),
        users: vec![User {
            name: "ops".into(),
            groups: vec!["sudo".into(), "systemd-journal".into()],
            ssh_authorized_keys: vec![ed25519_key(5, "ops@example")],
            password: "s3cret".into(),
            sudo: true,
            ..Default::default()
        }],
        root_ssh_authorized_keys: vec![ed25519_key(6, "root@example")],
        network: vec![NetworkInterface {
            match_mac: "52:54:00:12:34:56".into(),
            addresses: vec!["192.0.2.10/24".into()],
            gateway: "192.0.2.1".into(),
            dns: vec!["192.0.2.53".into()],
            ..Default::default()
        }],
        files: vec![FileOp {
            action: Action::Write as i32,
            path: "/etc/motd".into(),
            content: "provisioned by gridforge\n".into(),
            ..Default::default()
        }],
        delete: vec!["/usr/share/doc/*".into()],
        firstboot: vec!["echo hello > /root/firstboot.txt".into()],
        root_lock: true,
        ..Default::default()
    };
    let applied = apply(&root, &c, &Context { vm_name: "deb-test".into() }).unwrap();
    println!("warnings: {:?}", applied.warnings);
    assert_eq!(applied.users, vec![("ops".to_string(), 1000)]);

    let read = |p: &str| fs::read_to_string(resolve_in_root(&root, p).unwrap()).unwrap();
    assert_eq!(read("/etc/hostname"), "deb-test\n");
    assert!(read("/etc/hosts").contains("127.0.1.1\tdeb-test\n"));
    assert_eq!(read("/etc/timezone"), "Europe/Berlin\n");
    assert!(resolve_in_root(&root, "/etc/localtime").unwrap().is_file());
    assert_eq!(fs::metadata(root.join("etc/machine-id")).unwrap().len(), 0);
    assert!(!root.join("etc/ssh/ssh_host_ed25519_key").exists());
    assert!(read("/etc/group").lines().any(|l| l == "sudo:x:27:ops"));
    assert!(read("/etc/shadow").lines().any(|l| l.starts_with("root:!*:")));
    assert!(read("/etc/shadow").lines().any(|l| l.starts_with("ops:$6$")));
    assert!(read("/home/ops/.ssh/authorized_keys").contains("ops@example"));
    assert!(read("/etc/resolv.conf").contains("nameserver 192.0.2.53"));
    assert!(fs::read_dir(root.join("usr/share/doc")).unwrap().next().is_none());
    assert!(read("/usr/local/libexec/gridforge-firstboot").contains("echo hello > /root/firstboot.txt"));

    // The account files pass shadow-utils' own checks.
    let (ok, out) = run("grpck", &["-r", "-R", r]);
    assert!(ok, "grpck: {out}");
    let (_, out) = run("pwck", &["-r", "-R", r]);
    // pwck warns about system users' missing homes in any minimal image; nothing about ours, nothing invalid.
    assert!(!out.contains("'ops'") && !out.contains("invalid") && !out.contains("duplicate"), "pwck: {out}");

    // The tree goes into ext4 as the provisioning does; debugfs sees the owners and modes.
    let img = dir.path().join("root.ext4");
    fs::File::create(&img).unwrap().set_len(1 << 30).unwrap();
    let i = img.to_str().unwrap();
    let (ok, out) = run("mke2fs", &["-q", "-t", "ext4", "-d", r, "-F", i, "1048576k"]);
    assert!(ok, "mke2fs: {out}");
    let (ok, out) = run("e2fsck", &["-fn", i]);
    assert!(ok, "e2fsck: {out}");
    let (_, out) = run("debugfs", &["-R", "stat /home/ops/.ssh/authorized_keys", i]);
    assert!(
        out.contains("User:  1000") && out.contains("Group:  1000") && out.contains("Mode:  0600"),
        "{out}"
    );
    let (_, out) = run("debugfs", &["-R", "stat /etc/sudoers.d/90-gridforge-ops", i]);
    assert!(out.contains("Mode:  0440"), "{out}");

    // Boot files from the image's kernel; systemd-boot from the host (Debian systemd-boot-efi).
    let esp = dir.path().join("esp");
    fs::create_dir(&esp).unwrap();
    let host_efi = Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    assert!(
        host_efi.is_file(),
        "systemd-boot-efi is required for this test (apt-get install systemd-boot-efi)"
    );
    let entry = install_boot(&root, &esp, "0f3a1c6e-8d2b-4c1a-9e7f-5b6d4a3c2e1f", "", None).unwrap();
    assert!(entry.kernel.starts_with("/vmlinuz-6."), "{entry:?}");
    assert!(esp.join(entry.kernel.trim_start_matches('/')).is_file());
    assert!(esp.join(entry.initrd.trim_start_matches('/')).is_file());
    assert_eq!(fs::read(esp.join("EFI/BOOT/BOOTX64.EFI")).unwrap(), fs::read(host_efi).unwrap());
}
