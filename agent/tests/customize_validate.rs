//! Validation of a Customization without a tree: each error names the field with its index.

mod customize_support;

use customize_support::{ecdsa_key, ed25519_key, mismatched_key};
use gridforge_agent::customize::{CustomizeError, validate};
use gridforge_proto::v1::{Customization, FileOp, NetworkInterface, User, file_op::Action};

fn field_of(c: &Customization) -> String {
    match validate(c) {
        Err(CustomizeError::Invalid { field, .. }) => field,
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

fn user(name: &str) -> User {
    User { name: name.into(), ..Default::default() }
}

#[test]
fn a_full_valid_customization_passes() {
    let c = Customization {
        hostname: "web-01.example.org".into(),
        timezone: "America/Argentina/Buenos_Aires".into(),
        users: vec![User {
            name: "ops".into(),
            groups: vec!["sudo".into(), "systemd-journal".into()],
            ssh_authorized_keys: vec![ed25519_key(1, "ops@laptop"), ecdsa_key()],
            password_hash: format!("$6${}${}", "saltsalt", "a".repeat(86)),
            ..Default::default()
        }],
        root_ssh_authorized_keys: vec![format!(
            "from=\"10.0.0.0/8,192.168.1.1\",no-pty {}",
            ed25519_key(2, "c")
        )],
        network: vec![NetworkInterface {
            match_mac: "52:54:00:AB:cd:01".into(),
            addresses: vec!["10.0.2.15/24".into(), "2001:db8::5/64".into()],
            gateway: "10.0.2.2".into(),
            dns: vec!["1.1.1.1".into(), "2606:4700::1111".into()],
            ..Default::default()
        }],
        files: vec![FileOp {
            action: Action::Write as i32,
            path: "/etc/motd".into(),
            content: "hi\n".into(),
            mode: "0644".into(),
            ..Default::default()
        }],
        delete: vec!["/var/log/*.log".into()],
        firstboot: vec!["echo hi".into()],
        root_lock: true,
        ..Default::default()
    };
    validate(&c).unwrap();
}

#[test]
fn hostnames() {
    for bad in
        ["-web", "web-", "we_b", "a..b", &"a".repeat(64), &format!("{}.x", vec!["a".repeat(63); 4].join("."))]
    {
        let c = Customization { hostname: bad.to_string(), ..Default::default() };
        assert_eq!(field_of(&c), "customize.hostname", "{bad}");
    }
    for good in ["a", "Web-01", "x1.example.com", &"a".repeat(63)] {
        validate(&Customization { hostname: good.to_string(), ..Default::default() }).unwrap();
    }
}

#[test]
fn timezones() {
    for bad in ["/Europe/Berlin", "../etc/shadow", "Europe/../../x", "Europe//Berlin", "Europe/Ber lin"] {
        let c = Customization { timezone: bad.into(), ..Default::default() };
        assert_eq!(field_of(&c), "customize.timezone", "{bad}");
    }
}

#[test]
fn network_fields() {
    let net = |iface: NetworkInterface| Customization {
        network: vec![NetworkInterface::default(), iface],
        ..Default::default()
    };
    let f = |i: NetworkInterface| field_of(&net(i));
    assert_eq!(
        f(NetworkInterface { match_mac: "52:54:00:ab:cd".into(), ..Default::default() }),
        "customize.network[1].match_mac"
    );
    assert_eq!(
        f(NetworkInterface { match_mac: "52-54-00-ab-cd-ef".into(), ..Default::default() }),
        "customize.network[1].match_mac"
    );
    assert_eq!(
        f(NetworkInterface {
            addresses: vec!["10.0.0.1/24".into(), "10.0.0.2".into()],
            ..Default::default()
        }),
        "customize.network[1].addresses[1]"
    );
    assert_eq!(
        f(NetworkInterface { addresses: vec!["10.0.0.1/33".into()], ..Default::default() }),
        "customize.network[1].addresses[0]"
    );
    assert_eq!(
        f(NetworkInterface { addresses: vec!["2001:db8::1/129".into()], ..Default::default() }),
        "customize.network[1].addresses[0]"
    );
    validate(&net(NetworkInterface { addresses: vec!["2001:db8::1/128".into()], ..Default::default() }))
        .unwrap();
    assert_eq!(
        f(NetworkInterface { gateway: "10.0.0".into(), ..Default::default() }),
        "customize.network[1].gateway"
    );
    assert_eq!(
        f(NetworkInterface { dns: vec!["1.1.1.1".into(), "dns.google".into()], ..Default::default() }),
        "customize.network[1].dns[1]"
    );
    assert_eq!(
        f(NetworkInterface { dhcp: true, addresses: vec!["10.0.0.1/24".into()], ..Default::default() }),
        "customize.network[1].dhcp"
    );
}

#[test]
fn user_fields() {
    let users = |u: User| Customization { users: vec![user("alice"), u], ..Default::default() };
    let f = |u: User| field_of(&users(u));
    for bad in ["Bob", "1bob", "bob smith", "bob:x", &"b".repeat(33), ""] {
        assert_eq!(f(user(bad)), "customize.users[1].name", "{bad:?}");
    }
    assert_eq!(f(user("alice")), "customize.users[1].name", "duplicate user");
    assert_eq!(f(user("root")), "customize.users[1].name");
    assert_eq!(
        f(User { groups: vec!["sudo".into(), "bad:group".into()], ..user("bob") }),
        "customize.users[1].groups[1]"
    );
    assert_eq!(
        f(User {
            ssh_authorized_keys: vec![ed25519_key(1, "ok"), "ssh-ed25519 not-base64!".into()],
            ..user("bob")
        }),
        "customize.users[1].ssh_authorized_keys[1]"
    );
    assert_eq!(
        f(User { ssh_authorized_keys: vec![mismatched_key("ssh-rsa", "ssh-ed25519")], ..user("bob") }),
        "customize.users[1].ssh_authorized_keys[0]"
    );
    assert_eq!(
        f(User {
            ssh_authorized_keys: vec![ed25519_key(1, "a").replace("ssh-ed25519", "ssh-dss")],
            ..user("bob")
        }),
        "customize.users[1].ssh_authorized_keys[0]"
    );
    assert_eq!(
        f(User {
            ssh_authorized_keys: vec![format!("{}\n{}", ed25519_key(1, "a"), ed25519_key(2, "b"))],
            ..user("bob")
        }),
        "customize.users[1].ssh_authorized_keys[0]"
    );
    assert_eq!(f(User { password_hash: "secret".into(), ..user("bob") }), "customize.users[1].password_hash");
    assert_eq!(
        f(User { password_hash: "$1$abc$def".into(), ..user("bob") }),
        "customize.users[1].password_hash"
    );
    assert_eq!(
        f(User { password_hash: "!".into(), password: "pw".into(), ..user("bob") }),
        "customize.users[1].password_hash"
    );
    for ok in ["!", "*", "!*", "$y$j9T$salt$abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ"] {
        validate(&users(User { password_hash: ok.into(), ..user("bob") }))
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    assert_eq!(f(User { uid: Some(0), ..user("bob") }), "customize.users[1].uid");
    assert_eq!(f(User { shell: "bash".into(), ..user("bob") }), "customize.users[1].shell");
    assert_eq!(f(User { comment: "a:b".into(), ..user("bob") }), "customize.users[1].comment");
}

#[test]
fn root_fields() {
    let c = Customization {
        root_ssh_authorized_keys: vec![ed25519_key(3, "x"), "garbage".into()],
        ..Default::default()
    };
    assert_eq!(field_of(&c), "customize.root_ssh_authorized_keys[1]");
    let c = Customization { root_password_hash: "plain".into(), ..Default::default() };
    assert_eq!(field_of(&c), "customize.root_password_hash");
}

#[test]
fn file_fields() {
    let files = |op: FileOp| Customization {
        files: vec![FileOp { path: "/ok".into(), ..Default::default() }, op],
        ..Default::default()
    };
    let f = |op: FileOp| field_of(&files(op));
    let w = |path: &str| FileOp { path: path.into(), ..Default::default() };
    assert_eq!(f(w("etc/motd")), "customize.files[1].path");
    assert_eq!(f(w("/etc/../../motd")), "customize.files[1].path");
    assert_eq!(f(w("/")), "customize.files[1].path");
    assert_eq!(f(FileOp { mode: "0888".into(), ..w("/a") }), "customize.files[1].mode");
    assert_eq!(f(FileOp { mode: "17777".into(), ..w("/a") }), "customize.files[1].mode");
    assert_eq!(f(FileOp { mode: "rw-r--r--".into(), ..w("/a") }), "customize.files[1].mode");
    validate(&files(FileOp { mode: "04755".into(), ..w("/a") })).unwrap();
    assert_eq!(f(FileOp { action: Action::Symlink as i32, ..w("/a") }), "customize.files[1].target");
    assert_eq!(f(FileOp { action: 42, ..w("/a") }), "customize.files[1].action");
    assert_eq!(f(FileOp { action: Action::Chmod as i32, ..w("/a") }), "customize.files[1].mode");
    assert_eq!(
        f(FileOp { action: Action::AppendLine as i32, content: "a\nb".into(), ..w("/a") }),
        "customize.files[1].content"
    );
    assert_eq!(f(FileOp { owner: "a b".into(), ..w("/a") }), "customize.files[1].owner");
}

#[test]
fn delete_and_firstboot_fields() {
    let c = Customization { delete: vec!["/tmp/*".into(), "var/log".into()], ..Default::default() };
    assert_eq!(field_of(&c), "customize.delete[1]");
    let c = Customization { delete: vec!["/".into()], ..Default::default() };
    assert_eq!(field_of(&c), "customize.delete[0]");
    let c = Customization { delete: vec!["/var/../etc".into()], ..Default::default() };
    assert_eq!(field_of(&c), "customize.delete[0]");
    let c = Customization { firstboot: vec!["true".into(), "  ".into()], ..Default::default() };
    assert_eq!(field_of(&c), "customize.firstboot[1]");
}

#[test]
fn error_messages_name_the_field() {
    let c = Customization {
        users: vec![user("a"), User { ssh_authorized_keys: vec!["nope".into()], ..user("b") }],
        ..Default::default()
    };
    let msg = validate(&c).unwrap_err().to_string();
    assert!(msg.starts_with("customize.users[1].ssh_authorized_keys[0]: "), "{msg}");
}
