//! Each customization operation applied to a small Debian-like staging tree, inspected file by file.

mod customize_support;

use std::fs;
use std::process::Command;

use customize_support::{debian_tree, ecdsa_key, ed25519_key};
use gridforge_agent::customize::{
    Context, CustomizeError, FIRSTBOOT_DONE, apply, firstboot_script, sha512_crypt, ssh_hostkeys_unit,
};
use gridforge_proto::v1::{Customization, FileOp, NetworkInterface, User, file_op::Action};
use sha_crypt::{PasswordHash, PasswordVerifier, ShaCrypt};

fn quiet() -> Customization {
    Customization { identity_reset: Some(false), ..Default::default() }
}

fn ctx(name: &str) -> Context {
    Context { vm_name: name.into() }
}

fn line<'a>(text: &'a str, name: &str) -> &'a str {
    text.lines().find(|l| l.split(':').next() == Some(name)).unwrap_or_else(|| panic!("no line for {name}"))
}

#[test]
fn hostname_and_hosts() {
    let t = debian_tree();
    apply(t.root(), &Customization { hostname: "web01.example.org".into(), ..quiet() }, &ctx("vm")).unwrap();
    assert_eq!(t.read("/etc/hostname"), "web01.example.org\n");
    let hosts = t.read("/etc/hosts");
    assert!(hosts.starts_with("127.0.0.1\tlocalhost\n127.0.1.1\tweb01.example.org web01\n"), "{hosts}");
    assert!(!hosts.contains("debian"));
    assert!(hosts.contains("::1     localhost ip6-localhost ip6-loopback\n"));
    assert_eq!(hosts.matches("127.0.1.1").count(), 1);

    // No host name: the VM name, made valid.
    apply(t.root(), &quiet(), &ctx("Build_Agent 7")).unwrap();
    assert_eq!(t.read("/etc/hostname"), "build-agent-7\n");
    assert!(t.read("/etc/hosts").contains("127.0.1.1\tbuild-agent-7\n"));
}

#[test]
fn hosts_is_created_when_missing() {
    let t = debian_tree();
    fs::remove_file(t.p("/etc/hosts")).unwrap();
    apply(t.root(), &quiet(), &ctx("vm1")).unwrap();
    let hosts = t.read("/etc/hosts");
    assert!(hosts.starts_with("127.0.0.1\tlocalhost\n127.0.1.1\tvm1\n"), "{hosts}");
}

#[test]
fn timezone() {
    let t = debian_tree();
    apply(t.root(), &Customization { timezone: "Europe/Berlin".into(), ..quiet() }, &ctx("vm")).unwrap();
    assert_eq!(t.readlink("/etc/localtime"), "/usr/share/zoneinfo/Europe/Berlin");
    // The absolute link resolves inside the tree, as it will in the guest.
    let zone = gridforge_agent::customize::resolve_in_root(t.root(), "/etc/localtime").unwrap();
    assert_eq!(fs::read_to_string(zone).unwrap(), "TZif2 Berlin\n");
    assert_eq!(t.read("/etc/timezone"), "Europe/Berlin\n");

    let err = apply(t.root(), &Customization { timezone: "Mars/Olympus".into(), ..quiet() }, &ctx("vm"))
        .unwrap_err();
    assert!(
        matches!(&err, CustomizeError::NotInImage { field, .. } if field == "customize.timezone"),
        "{err:?}"
    );
}

#[test]
fn network_static_dhcp_and_mac_match() {
    let t = debian_tree();
    let c = Customization {
        network: vec![
            NetworkInterface {
                match_mac: "52:54:00:AB:CD:01".into(),
                addresses: vec!["10.0.2.15/24".into(), "2001:db8::5/64".into()],
                gateway: "10.0.2.2".into(),
                dns: vec!["10.0.2.3".into(), "1.1.1.1".into()],
                ..Default::default()
            },
            NetworkInterface { dhcp: true, ..Default::default() },
            NetworkInterface {
                match_name: "ens4".into(),
                dhcp: true,
                dns: vec!["1.1.1.1".into()],
                ..Default::default()
            },
        ],
        ..quiet()
    };
    apply(t.root(), &c, &ctx("vm")).unwrap();
    assert_eq!(
        t.read("/etc/systemd/network/10-gridforge-0.network"),
        "# Written by gridforge.\n[Match]\nMACAddress=52:54:00:ab:cd:01\n\n[Network]\nAddress=10.0.2.15/24\n\
         Address=2001:db8::5/64\nGateway=10.0.2.2\nDNS=10.0.2.3\nDNS=1.1.1.1\n"
    );
    assert_eq!(
        t.read("/etc/systemd/network/10-gridforge-1.network"),
        "# Written by gridforge.\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
    );
    assert!(t.read("/etc/systemd/network/10-gridforge-2.network").contains("[Match]\nName=ens4\n"));
    assert_eq!(t.stat("/etc/systemd/network/10-gridforge-0.network"), (0o644, 0, 0));
    assert_eq!(
        t.readlink("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"),
        "/lib/systemd/system/systemd-networkd.service"
    );
    assert_eq!(
        t.readlink("/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"),
        "/lib/systemd/system/systemd-networkd.socket"
    );
    let unit = gridforge_agent::customize::resolve_in_root(
        t.root(),
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
    )
    .unwrap();
    assert_eq!(unit, t.p("/usr/lib/systemd/system/systemd-networkd.service"));
    // No systemd-resolved in the tree: resolv.conf (a dangling link before) becomes a file, DNS deduplicated.
    assert!(fs::symlink_metadata(t.p("/etc/resolv.conf")).unwrap().is_file());
    assert_eq!(
        t.read("/etc/resolv.conf"),
        "# Written by gridforge.\nnameserver 10.0.2.3\nnameserver 1.1.1.1\n"
    );
}

#[test]
fn network_with_resolved_keeps_resolv_conf() {
    let t = debian_tree();
    t.write("/usr/lib/systemd/system/systemd-resolved.service", "[Unit]\n", 0o644);
    let c = Customization {
        network: vec![NetworkInterface { dhcp: true, dns: vec!["9.9.9.9".into()], ..Default::default() }],
        ..quiet()
    };
    apply(t.root(), &c, &ctx("vm")).unwrap();
    assert_eq!(t.readlink("/etc/resolv.conf"), "../run/systemd/resolve/stub-resolv.conf");
}

#[test]
fn users_groups_homes_keys_and_sudo() {
    let t = debian_tree();
    let c = Customization {
        users: vec![
            User {
                name: "alice".into(),
                groups: vec!["sudo".into(), "adm".into()],
                ssh_authorized_keys: vec![ed25519_key(1, "alice@laptop"), ecdsa_key()],
                password: "correct horse".into(),
                sudo: true,
                comment: "Alice Admin".into(),
                ..Default::default()
            },
            User {
                name: "bob".into(),
                uid: Some(2000),
                shell: "/bin/sh".into(),
                // A group made by the earlier user entry.
                groups: vec!["alice".into(), "adm".into()],
                ..Default::default()
            },
            User {
                name: "carol".into(),
                password_hash: format!("$6$abc${}", "x".repeat(86)),
                ..Default::default()
            },
        ],
        ..quiet()
    };
    let applied = apply(t.root(), &c, &ctx("vm")).unwrap();
    assert_eq!(applied.users, vec![("alice".into(), 1000), ("bob".into(), 2000), ("carol".into(), 1001)]);

    let passwd = t.read("/etc/passwd");
    assert!(passwd.starts_with(customize_support::PASSWD), "existing lines kept");
    assert_eq!(line(&passwd, "alice"), "alice:x:1000:1000:Alice Admin:/home/alice:/bin/bash");
    assert_eq!(line(&passwd, "bob"), "bob:x:2000:2000::/home/bob:/bin/sh");
    assert_eq!(line(&passwd, "carol"), "carol:x:1001:1001::/home/carol:/bin/bash");
    let group = t.read("/etc/group");
    assert_eq!(line(&group, "alice"), "alice:x:1000:bob");
    assert_eq!(line(&group, "bob"), "bob:x:2000:");
    assert_eq!(line(&group, "sudo"), "sudo:x:27:alice");
    assert_eq!(line(&group, "adm"), "adm:x:4:alice,bob");
    let gshadow = t.read("/etc/gshadow");
    assert_eq!(line(&gshadow, "alice"), "alice:!::bob");
    assert_eq!(line(&gshadow, "adm"), "adm:*::alice,bob");
    let shadow = t.read("/etc/shadow");
    let bob: Vec<&str> = line(&shadow, "bob").split(':').collect();
    assert_eq!(bob[1], "!", "no password: locked");
    assert_eq!(bob.len(), 9);
    assert_eq!(line(&shadow, "carol").split(':').nth(1).unwrap(), format!("$6$abc${}", "x".repeat(86)));
    // Ownership and modes of the databases are kept.
    assert_eq!(t.stat("/etc/shadow"), (0o640, 0, 42));
    assert_eq!(t.stat("/etc/passwd"), (0o644, 0, 0));

    // alice's hash is SHA-512 crypt of her password, checked by openssl and by the crate.
    let hash = line(&shadow, "alice").split(':').nth(1).unwrap().to_string();
    check_sha512(&hash, "correct horse");

    assert_eq!(t.stat("/home/alice"), (0o700, 1000, 1000));
    assert_eq!(t.stat("/home/alice/.bashrc"), (0o644, 1000, 1000));
    assert_eq!(t.read("/home/alice/.profile"), "# ~/.profile\n");
    assert_eq!(t.stat("/home/alice/.ssh"), (0o700, 1000, 1000));
    assert_eq!(t.stat("/home/alice/.ssh/authorized_keys"), (0o600, 1000, 1000));
    assert_eq!(
        t.read("/home/alice/.ssh/authorized_keys"),
        format!("{}\n{}\n", ed25519_key(1, "alice@laptop"), ecdsa_key())
    );
    assert_eq!(t.stat("/home/bob"), (0o700, 2000, 2000));
    assert!(!t.exists("/home/bob/.ssh"));
    assert_eq!(t.read("/etc/sudoers.d/90-gridforge-alice"), "alice ALL=(ALL) NOPASSWD:ALL\n");
    assert_eq!(t.stat("/etc/sudoers.d/90-gridforge-alice"), (0o440, 0, 0));
    assert!(!t.exists("/etc/sudoers.d/90-gridforge-bob"));
}

fn check_sha512(hash: &str, password: &str) {
    let parts: Vec<&str> = hash.split('$').collect();
    assert_eq!(parts.len(), 4, "$6$salt$hash: {hash}");
    assert_eq!(parts[1], "6");
    assert_eq!(parts[2].len(), 16, "16-character salt");
    let out = Command::new("openssl")
        .args(["passwd", "-6", "-salt", parts[2], password])
        .output()
        .expect("openssl is required for this test (apt-get install openssl)");
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), hash);
    let parsed = PasswordHash::new(hash).unwrap();
    ShaCrypt::SHA512.verify_password(password.as_bytes(), &parsed).unwrap();
    assert!(ShaCrypt::SHA512.verify_password(b"wrong", &parsed).is_err());
}

#[test]
fn generated_hashes_have_random_salts() {
    let a = sha512_crypt("pw").unwrap();
    let b = sha512_crypt("pw").unwrap();
    assert_ne!(a, b);
    check_sha512(&a, "pw");
}

#[test]
fn user_errors() {
    let t = debian_tree();
    let c = Customization {
        users: vec![User {
            name: "dave".into(),
            groups: vec!["sudo".into(), "wheel".into()],
            ..Default::default()
        }],
        ..quiet()
    };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    match err {
        CustomizeError::UnknownGroup { field, name } => {
            assert_eq!(field, "customize.users[0].groups[1]");
            assert_eq!(name, "wheel");
        }
        other => panic!("{other:?}"),
    }
    assert!(!t.read("/etc/passwd").contains("dave"), "nothing half-done");

    let c = Customization { users: vec![User { name: "www-data".into(), ..Default::default() }], ..quiet() };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    assert!(
        matches!(&err, CustomizeError::Invalid { field, .. } if field == "customize.users[0].name"),
        "{err:?}"
    );
    let c = Customization {
        users: vec![User { name: "eve".into(), uid: Some(998), ..Default::default() }],
        ..quiet()
    };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    assert!(
        matches!(&err, CustomizeError::Invalid { field, .. } if field == "customize.users[0].uid"),
        "{err:?}"
    );
}

#[test]
fn root_keys_and_passwords() {
    let t = debian_tree();
    t.write("/root/.ssh/authorized_keys", &format!("{}\n", ed25519_key(9, "existing")), 0o600);
    let c = Customization {
        root_ssh_authorized_keys: vec![ed25519_key(9, "existing"), ed25519_key(2, "ops")],
        root_password: "toor".into(),
        ..quiet()
    };
    apply(t.root(), &c, &ctx("vm")).unwrap();
    assert_eq!(
        t.read("/root/.ssh/authorized_keys"),
        format!("{}\n{}\n", ed25519_key(9, "existing"), ed25519_key(2, "ops"))
    );
    assert_eq!(t.stat("/root/.ssh"), (0o700, 0, 0));
    assert_eq!(t.stat("/root/.ssh/authorized_keys"), (0o600, 0, 0));
    let root_hash = line(&t.read("/etc/shadow"), "root").split(':').nth(1).unwrap().to_string();
    check_sha512(&root_hash, "toor");

    // Lock: the hash stays, prefixed with `!`.
    let given = format!("$6$saltsalt${}", "z".repeat(86));
    apply(
        t.root(),
        &Customization { root_password_hash: given.clone(), root_lock: true, ..quiet() },
        &ctx("vm"),
    )
    .unwrap();
    assert_eq!(line(&t.read("/etc/shadow"), "root"), format!("root:!{given}:20779:0:99999:7:::"));
}

#[test]
fn root_lock_alone() {
    let t = debian_tree();
    apply(t.root(), &Customization { root_lock: true, ..quiet() }, &ctx("vm")).unwrap();
    assert_eq!(line(&t.read("/etc/shadow"), "root"), "root:!*:20779:0:99999:7:::");
}

#[test]
fn file_operations() {
    let t = debian_tree();
    let c = Customization {
        users: vec![User { name: "app".into(), ..Default::default() }],
        files: vec![
            FileOp {
                action: Action::Write as i32,
                path: "/etc/app/config.toml".into(),
                content: "port = 80\n".into(),
                mode: "0640".into(),
                owner: "app".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::Write as i32,
                path: "/etc/motd".into(),
                content: "hi\n".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::AppendLine as i32,
                path: "/etc/hosts".into(),
                content: "10.0.0.5 db".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::AppendLine as i32,
                path: "/etc/new.list".into(),
                content: "first".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::Mkdir as i32,
                path: "/srv/data/cache".into(),
                mode: "2770".into(),
                owner: "app".into(),
                group: "www-data".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::Symlink as i32,
                path: "/usr/local/bin/app".into(),
                target: "/opt/app/bin/app".into(),
                ..Default::default()
            },
            FileOp {
                action: Action::Chmod as i32,
                path: "/usr/bin/sudo".into(),
                mode: "0755".into(),
                group: "adm".into(),
                ..Default::default()
            },
        ],
        ..quiet()
    };
    apply(t.root(), &c, &ctx("vm")).unwrap();
    assert_eq!(t.read("/etc/app/config.toml"), "port = 80\n");
    assert_eq!(t.stat("/etc/app/config.toml"), (0o640, 1000, 1000));
    assert_eq!(t.stat("/etc/app"), (0o755, 0, 0));
    assert_eq!(t.stat("/etc/motd"), (0o644, 0, 0));
    assert!(t.read("/etc/hosts").ends_with("ff02::2 ip6-allrouters\n10.0.0.5 db\n"));
    assert_eq!(t.read("/etc/new.list"), "first\n");
    assert_eq!(t.stat("/srv/data/cache"), (0o2770, 1000, 33));
    assert_eq!(t.stat("/srv/data"), (0o755, 0, 0));
    assert_eq!(t.readlink("/usr/local/bin/app"), "/opt/app/bin/app");
    assert_eq!(t.stat("/usr/bin/sudo"), (0o755, 0, 4));
}

#[test]
fn file_owner_errors() {
    let t = debian_tree();
    let c = Customization {
        files: vec![
            FileOp { path: "/etc/a".into(), ..Default::default() },
            FileOp { path: "/etc/b".into(), owner: "nosuchuser".into(), ..Default::default() },
        ],
        ..quiet()
    };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    assert!(
        matches!(&err, CustomizeError::UnknownUser { field, name } if field == "customize.files[1].owner" && name == "nosuchuser"),
        "{err:?}"
    );
    let c = Customization {
        files: vec![FileOp { path: "/etc/b".into(), group: "nosuchgroup".into(), ..Default::default() }],
        ..quiet()
    };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    assert!(
        matches!(&err, CustomizeError::UnknownGroup { field, .. } if field == "customize.files[0].group"),
        "{err:?}"
    );
}

#[test]
fn delete_globs_and_essential_warnings() {
    let t = debian_tree();
    t.write("/var/log/a.log", "x", 0o644);
    t.write("/var/log/b.log", "x", 0o644);
    t.write("/var/log/.hidden.log", "x", 0o644);
    t.write("/opt/tool/bin/tool", "x", 0o755);
    let c = Customization {
        delete: vec![
            "/var/log/*.log".into(),
            "/opt/tool".into(),
            "/nonexistent/*".into(),
            "/boot/vmlinuz-*".into(),
        ],
        ..quiet()
    };
    let applied = apply(t.root(), &c, &ctx("vm")).unwrap();
    assert!(!t.exists("/var/log/a.log") && !t.exists("/var/log/b.log") && !t.exists("/var/log/dpkg.log"));
    assert!(t.exists("/var/log/.hidden.log"), "like the shell, * does not match a leading dot");
    assert!(!t.exists("/opt/tool"));
    assert!(!t.exists("/boot/vmlinuz-6.1.0-9-amd64") && !t.exists("/boot/vmlinuz-6.1.0-10-amd64"));
    assert!(t.exists("/boot/initrd.img-6.1.0-10-amd64"));
    assert_eq!(applied.warnings.len(), 2, "{:?}", applied.warnings);
    assert!(applied.warnings.iter().all(|w| w.contains("/boot/vmlinuz-")), "{:?}", applied.warnings);

    // Deleting through the /bin link reaches /usr/bin/sh: still done, with a warning.
    let applied = apply(
        t.root(),
        &Customization { delete: vec!["/bin/s?".into(), "/etc".into()], ..quiet() },
        &ctx("vm"),
    );
    // /etc holds /etc/passwd, and later steps need /etc/hostname: the deletion runs after them.
    let applied = applied.unwrap();
    assert!(!t.exists("/usr/bin/sh") && !t.exists("/etc"));
    assert!(applied.warnings.iter().any(|w| w.contains("/bin/sh")), "{:?}", applied.warnings);
    assert!(applied.warnings.iter().any(|w| w.contains("removes /etc,")), "{:?}", applied.warnings);
}

#[test]
fn firstboot_unit_and_script() {
    let t = debian_tree();
    let commands = vec!["apt-get update".to_string(), "echo 'it''s done' > /root/done".to_string()];
    apply(t.root(), &Customization { firstboot: commands.clone(), ..quiet() }, &ctx("vm")).unwrap();
    let unit = t.read("/etc/systemd/system/gridforge-firstboot.service");
    for want in [
        "Type=oneshot",
        // Wants= alone pulls the target in without waiting for it; commands such as apt-get need the network.
        "After=network-online.target systemd-networkd.service",
        "Wants=network-online.target",
        &format!("ConditionPathExists=!{FIRSTBOOT_DONE}"),
        "ExecStart=/usr/local/libexec/gridforge-firstboot",
        "StandardOutput=journal+console",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit.lines().any(|l| l == want), "missing {want:?} in\n{unit}");
    }
    assert_eq!(
        t.readlink("/etc/systemd/system/multi-user.target.wants/gridforge-firstboot.service"),
        "/etc/systemd/system/gridforge-firstboot.service"
    );
    assert_eq!(t.stat("/usr/local/libexec/gridforge-firstboot"), (0o755, 0, 0));
    assert_eq!(t.read("/usr/local/libexec/gridforge-firstboot"), firstboot_script(&commands));
}

#[test]
fn firstboot_script_runs_in_order_and_stops_at_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let l = log.display();
    let commands = vec![
        format!("echo one >> {l}"),
        format!("printf '%s\\n' \"two 'quoted'\" >> {l}"),
        "exit 3".to_string(),
        format!("echo never >> {l}"),
    ];
    // The script with its done file moved into the temp dir, run by the real /bin/sh.
    let done = dir.path().join("state/firstboot.done");
    let script = firstboot_script(&commands)
        .replace(FIRSTBOOT_DONE, done.to_str().unwrap())
        .replace("mkdir -p /var/lib/gridforge", &format!("mkdir -p {}", dir.path().join("state").display()));
    let path = dir.path().join("firstboot");
    fs::write(&path, script).unwrap();
    let out = Command::new("/bin/sh").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo 'quoted'\n");
    assert!(!done.exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("[3] failed with exit status 3"));

    let ok = firstboot_script(&commands[..2])
        .replace(FIRSTBOOT_DONE, done.to_str().unwrap())
        .replace("mkdir -p /var/lib/gridforge", &format!("mkdir -p {}", dir.path().join("state").display()));
    fs::write(&path, ok).unwrap();
    assert!(Command::new("/bin/sh").arg(&path).status().unwrap().success());
    assert!(done.exists());
}

#[test]
fn identity_reset() {
    let t = debian_tree();
    t.write("/home/olduser/.bash_history", "secret\n", 0o600);
    let applied = apply(t.root(), &Customization::default(), &ctx("vm")).unwrap();
    assert!(applied.warnings.is_empty(), "{:?}", applied.warnings);
    assert_eq!(t.read("/etc/machine-id"), "");
    assert_eq!(t.stat("/etc/machine-id"), (0o444, 0, 0));
    assert_eq!(t.readlink("/var/lib/dbus/machine-id"), "/etc/machine-id");
    assert!(!t.exists("/etc/ssh/ssh_host_ed25519_key") && !t.exists("/etc/ssh/ssh_host_ed25519_key.pub"));
    assert!(!t.exists("/etc/ssh/ssh_host_rsa_key"));
    assert!(t.exists("/etc/ssh/sshd_config"));
    assert_eq!(t.read("/etc/systemd/system/gridforge-ssh-hostkeys.service"), ssh_hostkeys_unit());
    let unit = ssh_hostkeys_unit();
    for want in [
        "Before=ssh.service ssh.socket",
        "ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key",
        "ExecStart=/usr/bin/ssh-keygen -A",
        "Type=oneshot",
    ] {
        assert!(unit.lines().any(|l| l == want), "{want}");
    }
    for wants in ["multi-user.target.wants", "ssh.service.wants"] {
        assert_eq!(
            t.readlink(&format!("/etc/systemd/system/{wants}/gridforge-ssh-hostkeys.service")),
            "/etc/systemd/system/gridforge-ssh-hostkeys.service"
        );
    }
    assert_eq!(t.read("/var/log/dpkg.log"), "");
    assert_eq!(t.read("/var/log/apt/history.log"), "");
    assert_eq!(t.stat("/var/log/apt/history.log"), (0o640, 0, 0));
    assert!(!t.exists("/var/log/journal/0123456789abcdef0123456789abcdef/system.journal"));
    assert!(t.exists("/var/log/journal/0123456789abcdef0123456789abcdef"));
    assert!(!t.exists("/root/.bash_history") && !t.exists("/home/olduser/.bash_history"));
    assert!(!t.exists("/var/cache/apt/pkgcache.bin") && !t.exists("/var/cache/apt/srcpkgcache.bin"));
    assert!(t.exists("/var/cache/apt/archives/partial"));
    assert!(!t.exists("/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease"));
    assert!(t.exists("/var/lib/apt/lists/partial") && t.exists("/var/lib/apt/lists/lock"));
    assert_eq!(fs::read_dir(t.p("/tmp")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(t.p("/var/tmp")).unwrap().count(), 0);
    assert!(t.exists("/tmp") && t.exists("/var/tmp"));

    // Off: nothing of it happens.
    let t = debian_tree();
    apply(t.root(), &quiet(), &ctx("vm")).unwrap();
    assert!(t.exists("/etc/ssh/ssh_host_ed25519_key") && t.read("/etc/machine-id").len() == 33);
    assert!(!t.exists("/etc/systemd/system/gridforge-ssh-hostkeys.service"));
}

#[test]
fn invalid_input_changes_nothing() {
    let t = debian_tree();
    let c = Customization {
        hostname: "new".into(),
        users: vec![User { name: "Bad".into(), ..Default::default() }],
        ..Default::default()
    };
    let err = apply(t.root(), &c, &ctx("vm")).unwrap_err();
    assert!(err.to_string().starts_with("customize.users[0].name: "), "{err}");
    assert_eq!(t.read("/etc/hostname"), "debian\n");
    assert!(t.exists("/etc/ssh/ssh_host_ed25519_key"));
}
