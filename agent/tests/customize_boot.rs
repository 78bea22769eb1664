//! Boot files for the ESP: systemd-boot, loader config and entry, kernel and initrd.

mod customize_support;

use std::fs;

use customize_support::debian_tree;
use gridforge_agent::customize::CustomizeError;
use gridforge_agent::customize::boot::install_boot;

const UUID: &str = "0f3a1c6e-8d2b-4c1a-9e7f-5b6d4a3c2e1f";

#[test]
fn newest_kernel_and_given_efi_binary() {
    let t = debian_tree();
    let esp = tempfile::tempdir().unwrap();
    let efi_src = tempfile::NamedTempFile::new().unwrap();
    fs::write(efi_src.path(), b"MZ fake systemd-boot").unwrap();
    let entry =
        install_boot(t.root(), esp.path(), UUID, "quiet net.ifnames=0", Some(efi_src.path())).unwrap();
    assert_eq!(entry.kernel, "/vmlinuz-6.1.0-10-amd64");
    assert_eq!(entry.initrd, "/initrd.img-6.1.0-10-amd64");
    assert_eq!(entry.options, format!("root=UUID={UUID} ro console=ttyS0 quiet net.ifnames=0"));

    let e = esp.path();
    assert_eq!(fs::read(e.join("EFI/BOOT/BOOTX64.EFI")).unwrap(), b"MZ fake systemd-boot");
    assert_eq!(
        fs::read_to_string(e.join("loader/loader.conf")).unwrap(),
        "default gridforge.conf\ntimeout 0\n"
    );
    assert_eq!(
        fs::read_to_string(e.join("loader/entries/gridforge.conf")).unwrap(),
        format!(
            "title Debian GNU/Linux 12 (bookworm)\nlinux /vmlinuz-6.1.0-10-amd64\ninitrd /initrd.img-6.1.0-10-amd64\n\
             options root=UUID={UUID} ro console=ttyS0 quiet net.ifnames=0\n"
        )
    );
    assert_eq!(fs::read_to_string(e.join("vmlinuz-6.1.0-10-amd64")).unwrap(), "KERNEL 6.1.0-10");
    assert_eq!(fs::read_to_string(e.join("initrd.img-6.1.0-10-amd64")).unwrap(), "INITRD 6.1.0-10");
    assert!(!e.join("vmlinuz-6.1.0-9-amd64").exists());
}

#[test]
fn efi_binary_from_the_tree_wins_and_empty_args() {
    let t = debian_tree();
    t.write("/usr/lib/systemd/boot/efi/systemd-bootx64.efi", "MZ from the image", 0o644);
    let esp = tempfile::tempdir().unwrap();
    let other = tempfile::NamedTempFile::new().unwrap();
    let entry = install_boot(t.root(), esp.path(), UUID, "", Some(other.path())).unwrap();
    assert_eq!(fs::read_to_string(esp.path().join("EFI/BOOT/BOOTX64.EFI")).unwrap(), "MZ from the image");
    assert_eq!(entry.options, format!("root=UUID={UUID} ro console=ttyS0"));
}

#[test]
fn kernel_without_initrd_is_skipped() {
    let t = debian_tree();
    t.write("/boot/vmlinuz-6.2.0-1-amd64", "KERNEL 6.2 without initrd", 0o644);
    let esp = tempfile::tempdir().unwrap();
    let efi = tempfile::NamedTempFile::new().unwrap();
    let entry = install_boot(t.root(), esp.path(), UUID, "", Some(efi.path())).unwrap();
    assert_eq!(entry.kernel, "/vmlinuz-6.1.0-10-amd64");
}

#[test]
fn errors() {
    let t = debian_tree();
    let esp = tempfile::tempdir().unwrap();
    let efi = tempfile::NamedTempFile::new().unwrap();
    let err = install_boot(t.root(), esp.path(), UUID, "a\nb", Some(efi.path())).unwrap_err();
    assert!(matches!(&err, CustomizeError::Invalid { field, .. } if field == "kernel_args"), "{err:?}");
    let err = install_boot(t.root(), esp.path(), "not-a-uuid", "", Some(efi.path())).unwrap_err();
    assert!(matches!(&err, CustomizeError::Invalid { field, .. } if field == "root_fs_uuid"), "{err:?}");
    let err =
        install_boot(t.root(), esp.path(), UUID, "", Some(&esp.path().join("missing.efi"))).unwrap_err();
    assert!(matches!(err, CustomizeError::NoEfiBinary { .. }), "{err:?}");

    for name in fs::read_dir(t.p("/boot")).unwrap() {
        fs::remove_file(name.unwrap().path()).unwrap();
    }
    let err = install_boot(t.root(), esp.path(), UUID, "", Some(efi.path())).unwrap_err();
    assert!(matches!(err, CustomizeError::NoKernel));
    assert!(err.to_string().contains("a boot layout needs an image with a kernel"), "{err}");
}
