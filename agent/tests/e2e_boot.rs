//! End to end: a real Debian 12 image packed into a signed store, provisioned onto a disk file by the CLI,
//! booted in qemu with UEFI, and checked from inside the guest over ssh. The provision is cached: a first
//! VM's provision makes the base disk, and the guest booted is a second VM cloned from that base as a qcow2
//! overlay. The guest takes its address from
//! DHCP; a static address, gateway and DNS are checked on the guest that `tests/tests/e2e_grid_boot.rs`
//! creates through the coordinator on a real libvirtd (one emulated boot each keeps the test run short).

mod common_store;
mod common_vm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common_store::Store;
use common_vm::{SshKey, Vm, VmOptions};
use gridforge_proto::v1::{ProvisionResult, partition::Role};

/// Measured under TCG with one vCPU on an idle two-core machine: login prompt about 30 s after qemu starts,
/// ssh about 15 s after that.
const LOGIN_TYPICAL: Duration = Duration::from_secs(30);
// First boot generates ssh host keys (RSA included), which takes a while under TCG on a busy host.
const SSH_TYPICAL: Duration = Duration::from_secs(15);

/// The Debian rootfs tar: from GRIDFORGE_DEBIAN_ROOTFS, else built (or found cached) by scripts/build-image.
fn debian_rootfs() -> PathBuf {
    common_vm::image_rootfs("debian-12-minimal", "GRIDFORGE_DEBIAN_ROOTFS")
}

fn spec(name: &str, key: &SshKey, network: serde_json::Value, firstboot: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": {"name": "debian-12-minimal", "version": "1"},
        "provision_mode": "PROVISION_CACHED",
        "disk": {"size_mib": 3072, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {
            "hostname": name,
            "users": [{"name": "ops", "groups": ["sudo"], "ssh_authorized_keys": [key.public], "sudo": true}],
            "root_ssh_authorized_keys": [key.public],
            "network": [network],
            "files": [{"path": "/etc/motd", "content": "hello from gridforge\n", "mode": "0640"}],
            "firstboot": firstboot
        }
    })
}

fn root_uuid(res: &ProvisionResult) -> String {
    let root = res.partitions.iter().find(|p| p.role == Role::Root as i32).expect("a root partition");
    assert!(!root.fs_uuid.is_empty(), "provision reported no root UUID: {res:?}");
    root.fs_uuid.clone()
}

/// Retries `command` (as ops) until it succeeds; panics with its last output after `timeout`.
fn eventually(vm: &Vm, key: &SshKey, command: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = vm.ssh(key, "ops", command);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if start.elapsed() > timeout {
            panic!(
                "{}: {command:?} did not succeed within {timeout:?}: {}{}",
                vm.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What the guest must show from inside, checked in one ssh session as ops (plus one root login); returns
/// the guest's facts by name for the network checks.
fn check_common(vm: &Vm, key: &SshKey, hostname: &str, root_uuid: &str) -> BTreeMap<String, String> {
    let commands = [
        ("hostname", "hostname"),
        ("id", "id ops"),
        ("sudo", "sudo -n true && sudo -n whoami"),
        ("motd_mode", "stat -c %a /etc/motd"),
        ("motd", "sudo -n cat /etc/motd"),
        ("firstboot", "test -e /var/lib/firstboot-ran"),
        ("cmdline", "cat /proc/cmdline"),
        ("root_uuid", "findmnt -no UUID /"),
        ("root_options", "findmnt -no OPTIONS /"),
        ("esp_fstype", "findmnt -no FSTYPE /boot/efi"),
        ("machine_id", "cat /etc/machine-id"),
        ("addr", "ip -4 -o addr show"),
        ("route", "ip -4 route show default"),
        ("failed", "systemctl --failed --no-legend --plain"),
        ("state", "systemctl is-system-running"),
    ];
    let results = vm.run_all(key, "ops", &commands);
    let get = |name: &str| -> String {
        let r = &results[name];
        assert!(
            r.ok || name == "state" || name == "firstboot",
            "{}: {name} failed in the guest: {}",
            vm.name,
            r.output
        );
        r.output.clone()
    };
    assert_eq!(get("hostname").trim(), hostname);
    let id = get("id");
    assert!(id.contains("(sudo)"), "{}: ops is not in group sudo: {id}", vm.name);
    assert_eq!(get("sudo").trim(), "root", "{}: passwordless sudo", vm.name);
    assert_eq!(get("motd_mode").trim(), "640");
    assert_eq!(get("motd"), "hello from gridforge\n");
    if !results["firstboot"].ok {
        // The first-boot unit may still be running when ssh comes up.
        eventually(vm, key, "test -e /var/lib/firstboot-ran", Duration::from_secs(60));
    }
    let cmdline = get("cmdline");
    assert!(cmdline.contains(&format!("root=UUID={root_uuid}")), "{}: /proc/cmdline: {cmdline}", vm.name);
    assert_eq!(get("root_uuid").trim(), root_uuid, "{}: file system mounted at /", vm.name);
    let options = get("root_options");
    assert!(options.starts_with("rw"), "{}: / is not mounted read-write: {options}", vm.name);
    assert_eq!(get("esp_fstype").trim(), "vfat", "{}: ESP at /boot/efi", vm.name);
    let machine_id = get("machine_id").trim().to_string();
    assert!(
        machine_id.len() == 32 && machine_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{}: /etc/machine-id is {machine_id:?}",
        vm.name
    );
    assert_eq!(vm.ssh_ok(key, "root", "id -u").trim(), "0", "{}: root login with the key", vm.name);
    let failed = get("failed");
    eprintln!(
        "{}: system state {}; failed units: {}",
        vm.name,
        results["state"].output.trim(),
        if failed.trim().is_empty() { "none" } else { failed.trim() }
    );
    commands.iter().map(|(name, _)| (name.to_string(), results[*name].output.clone())).collect()
}

fn boot_and_login(vm: &mut Vm, key: &SshKey, hostname: &str) {
    let login = vm.wait_for_serial(&format!("{hostname} login:"), common_vm::boot_timeout(LOGIN_TYPICAL));
    eprintln!("{}: boot to login prompt {:.1} s", vm.name, login.as_secs_f64());
    let ssh = vm.wait_for_ssh(key, "ops", common_vm::boot_timeout(SSH_TYPICAL));
    eprintln!("{}: ssh up {:.1} s after start", vm.name, ssh.as_secs_f64());
}

#[test]
fn a_debian_guest_boots_customized_on_dhcp() {
    common_vm::require_vm_tools();
    let rootfs = debian_rootfs();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let key = SshKey::generate(dir.path());

    let t = Instant::now();
    let store = Store::pack(dir.path(), &rootfs);
    eprintln!("pack: {:.1} s", t.elapsed().as_secs_f64());

    let dhcp_net = serde_json::json!({"match_mac": "52:54:00:12:34:57", "dhcp": true});
    // First-boot commands run once the network is up: what they see of it is recorded and checked below.
    let firstboot =
        ["touch /var/lib/firstboot-ran", "ip -4 -o addr show scope global > /var/lib/firstboot-network"];
    let t = Instant::now();
    let first =
        store.provision(&spec("web-0", &key, dhcp_net.clone(), &firstboot), &dir.path().join("web-0.img"));
    eprintln!("provision web-0 (makes the base): {:.1} s", t.elapsed().as_secs_f64());
    // The guest booted is a qcow2 overlay on the base, the clone that shares the most with it.
    let store = Store { provision_args: vec!["--clone-fallback".into(), "overlay".into()], ..store };
    let disk = dir.path().join("web-1.qcow2");
    let t = Instant::now();
    let res = store.provision(&spec("web-1", &key, dhcp_net, &firstboot), &disk);
    assert_eq!(res.clone_method, "overlay", "{res:?}");
    eprintln!("provision web-1 (cloned, {}): {:.1} s", res.clone_method, t.elapsed().as_secs_f64());
    assert_eq!(res.base_id, first.base_id, "web-1 is not a clone of web-0's base: {res:?}");
    let uuid = root_uuid(&res);
    assert_ne!(uuid, root_uuid(&first), "two clones share a root file system UUID");

    let options = VmOptions { disk_format: "qcow2", ..Default::default() };
    let mut vm = Vm::boot_with("web-1", &disk, "52:54:00:12:34:57", dir.path(), &options);
    boot_and_login(&mut vm, &key, "web-1");
    let facts = check_common(&vm, &key, "web-1", &uuid);
    let route = &facts["route"];
    assert!(route.contains("via 10.0.2.2"), "web-1: default route from DHCP: {route}");
    let addr =
        eventually(&vm, &key, "ip -4 -o addr show | grep 'inet 10\\.0\\.2\\.'", Duration::from_secs(30));
    assert!(addr.contains("dynamic"), "web-1: address not from DHCP: {addr}");
    let seen = vm.ssh_ok(&key, "ops", "cat /var/lib/firstboot-network");
    assert!(
        seen.contains("inet 10.0.2."),
        "web-1: the first-boot commands ran before DHCP configured the network: {seen:?}"
    );
}
