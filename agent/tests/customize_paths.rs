//! Path safety: symlinks in the image can never make an operation reach outside the staging root.

mod customize_support;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use customize_support::{Tree, debian_tree};
use gridforge_agent::customize::{Context, CustomizeError, FinalLink, apply, resolve, resolve_in_root};
use gridforge_proto::v1::{Customization, FileOp, NetworkInterface, User, file_op::Action};

/// A host directory outside the tree holding a file the tests must never touch.
struct Outside {
    dir: tempfile::TempDir,
}

impl Outside {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("gridforge-outside-").tempdir().unwrap();
        fs::write(dir.path().join("victim"), "untouched\n").unwrap();
        fs::set_permissions(dir.path().join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn s(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }
    fn assert_untouched(&self) {
        let names: Vec<_> = fs::read_dir(self.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["victim"], "something was created outside the root");
        let victim = self.path().join("victim");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched\n");
        assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o644);
    }
}

fn quiet() -> Customization {
    Customization { identity_reset: Some(false), ..Default::default() }
}

fn ctx() -> Context {
    Context { vm_name: "vm1".into() }
}

#[test]
fn absolute_dotdot_link_is_rerooted() {
    let t = debian_tree();
    let name = format!("gridforge-escape-{}", std::process::id());
    t.link("/etc/evil", &format!("/../../../tmp/{name}"));
    assert_eq!(resolve_in_root(t.root(), "/etc/evil").unwrap(), t.root().join("tmp").join(&name));
    assert_eq!(resolve(t.root(), "/etc/evil", FinalLink::Keep).unwrap(), t.root().join("etc/evil"));

    let c = Customization {
        files: vec![FileOp {
            action: Action::AppendLine as i32,
            path: "/etc/evil".into(),
            content: "through the link".into(),
            ..Default::default()
        }],
        ..quiet()
    };
    apply(t.root(), &c, &ctx()).unwrap();
    assert_eq!(t.read(&format!("/tmp/{name}")), "through the link\n");
    assert!(!Path::new("/tmp").join(&name).exists(), "the write landed in the host's /tmp");
}

#[test]
fn relative_link_cannot_climb_above_the_root() {
    let t = debian_tree();
    let outside = Outside::new();
    // From /etc, enough `..` to leave any temp dir on the host, then the outside dir's absolute path.
    let rel = format!("../../../../../../../../..{}/victim", outside.s());
    t.link("/etc/motd", &rel);
    let resolved = resolve_in_root(t.root(), "/etc/motd").unwrap();
    assert_eq!(resolved, t.root().join(outside.s().trim_start_matches('/')).join("victim"));
    let c = Customization {
        files: vec![FileOp {
            action: Action::AppendLine as i32,
            path: "/etc/motd".into(),
            content: "x".into(),
            mode: "0600".into(),
            ..Default::default()
        }],
        ..quiet()
    };
    apply(t.root(), &c, &ctx()).unwrap();
    assert!(resolved.exists());
    outside.assert_untouched();
}

#[test]
fn directory_link_to_host_keeps_network_files_inside() {
    let t = debian_tree();
    let outside = Outside::new();
    t.mkdir("/etc/systemd");
    t.link("/etc/systemd/network", &format!("/../../..{}", outside.s()));
    let c = Customization { network: vec![NetworkInterface { dhcp: true, ..Default::default() }], ..quiet() };
    apply(t.root(), &c, &ctx()).unwrap();
    let inside = t.root().join(outside.s().trim_start_matches('/')).join("10-gridforge-0.network");
    assert!(fs::read_to_string(&inside).unwrap().contains("DHCP=yes"));
    outside.assert_untouched();
}

#[test]
fn write_replaces_a_link_instead_of_writing_through_it() {
    let t = debian_tree();
    t.link("/etc/motd", "/etc/shadow");
    let c = Customization {
        files: vec![FileOp {
            action: Action::Write as i32,
            path: "/etc/motd".into(),
            content: "welcome\n".into(),
            ..Default::default()
        }],
        ..quiet()
    };
    apply(t.root(), &c, &ctx()).unwrap();
    assert!(fs::symlink_metadata(t.p("/etc/motd")).unwrap().is_file());
    assert_eq!(t.read("/etc/motd"), "welcome\n");
    assert_eq!(t.read("/etc/shadow"), customize_support::SHADOW);
    assert_eq!(t.stat("/etc/shadow"), (0o640, 0, 42));
}

#[test]
fn chmod_through_an_absolute_host_link_never_touches_the_host() {
    let t = debian_tree();
    let outside = Outside::new();
    t.link("/etc/x", &format!("{}/victim", outside.s()));
    let c = Customization {
        files: vec![FileOp {
            action: Action::Chmod as i32,
            path: "/etc/x".into(),
            mode: "0600".into(),
            ..Default::default()
        }],
        ..quiet()
    };
    let err = apply(t.root(), &c, &ctx()).unwrap_err();
    assert!(
        matches!(&err, CustomizeError::NotInImage { field, .. } if field == "customize.files[0].path"),
        "{err:?}"
    );
    outside.assert_untouched();
}

#[test]
fn delete_glob_through_a_linked_directory_stays_inside() {
    let t = debian_tree();
    let outside = Outside::new();
    t.link("/srv", &format!("/../../{}", outside.s()));
    let inside = t.root().join(outside.s().trim_start_matches('/'));
    fs::create_dir_all(&inside).unwrap();
    fs::write(inside.join("victim"), "inside copy").unwrap();
    let c = Customization { delete: vec!["/srv/*".into()], ..quiet() };
    apply(t.root(), &c, &ctx()).unwrap();
    assert!(!inside.join("victim").exists());
    outside.assert_untouched();
}

#[test]
fn home_link_to_host_keeps_the_home_inside() {
    let t = debian_tree();
    let outside = Outside::new();
    fs::remove_dir(t.p("/home")).unwrap();
    t.link("/home", outside.s());
    let c = Customization { users: vec![User { name: "alice".into(), ..Default::default() }], ..quiet() };
    apply(t.root(), &c, &ctx()).unwrap();
    let home = t.root().join(outside.s().trim_start_matches('/')).join("alice");
    assert!(home.join(".bashrc").is_file());
    outside.assert_untouched();
}

#[test]
fn resolv_conf_link_is_replaced_not_followed() {
    let t = debian_tree();
    let outside = Outside::new();
    fs::remove_file(t.p("/etc/resolv.conf")).unwrap();
    t.link("/etc/resolv.conf", &format!("{}/victim", outside.s()));
    let c = Customization {
        network: vec![NetworkInterface {
            addresses: vec!["10.0.2.15/24".into()],
            dns: vec!["10.0.2.3".into()],
            ..Default::default()
        }],
        ..quiet()
    };
    apply(t.root(), &c, &ctx()).unwrap();
    assert!(fs::symlink_metadata(t.p("/etc/resolv.conf")).unwrap().is_file());
    assert!(t.read("/etc/resolv.conf").contains("nameserver 10.0.2.3\n"));
    outside.assert_untouched();
}

#[test]
fn symlink_loops_and_the_40_link_limit() {
    let t = debian_tree();
    t.link("/a", "/b");
    t.link("/b", "a");
    let err = resolve_in_root(t.root(), "/a/file").unwrap_err();
    assert!(matches!(err, CustomizeError::SymlinkLoop { .. }), "{err:?}");

    // A chain of exactly 40 links resolves; 41 do not.
    let chain = |t: &Tree, prefix: &str, n: usize| {
        for i in 0..n {
            let target = if i + 1 == n { "/etc/hostname".to_string() } else { format!("{prefix}{}", i + 1) };
            t.link(&format!("{prefix}{i}"), &target);
        }
    };
    chain(&t, "/l", 40);
    assert_eq!(resolve_in_root(t.root(), "/l0").unwrap(), t.root().join("etc/hostname"));
    chain(&t, "/m", 41);
    assert!(matches!(resolve_in_root(t.root(), "/m0"), Err(CustomizeError::SymlinkLoop { .. })));
}

#[test]
fn dotdot_in_guest_paths_stays_at_the_root() {
    let t = debian_tree();
    assert_eq!(resolve_in_root(t.root(), "/../../etc/passwd").unwrap(), t.root().join("etc/passwd"));
    assert_eq!(resolve_in_root(t.root(), "/bin/../etc/passwd").unwrap(), t.root().join("usr/etc/passwd"));
    assert_eq!(resolve_in_root(t.root(), "/sbin/init").unwrap(), t.root().join("usr/lib/systemd/systemd"));
    // Through a regular file: ENOTDIR, not a path.
    assert!(matches!(resolve_in_root(t.root(), "/etc/passwd/x"), Err(CustomizeError::Io { .. })));
}
