//! The libvirt hypervisor against libvirt's in-process test driver (`test:///default`): pools, volumes,
//! the domain life cycle, stats and errors, with no daemon.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use gridforge_agent::config::LibvirtConfig;
use gridforge_agent::hypervisor::{DomainDef, DomainState, Hypervisor, HypervisorError, Libvirt, NicDef};

fn config(pool: &str, pool_path: &Path) -> LibvirtConfig {
    LibvirtConfig {
        uri: "test:///default".into(),
        pool: pool.into(),
        pool_path: pool_path.to_path_buf(),
        domain_type: "qemu".into(),
        ..Default::default()
    }
}

fn def(name: &str) -> DomainDef {
    DomainDef {
        name: name.into(),
        vcpus: 2,
        memory_mib: 512,
        disk: PathBuf::from(format!("/default-pool/{name}.img")),
        disk_format: Default::default(),
        nics: vec![NicDef {
            network: Some("default".into()),
            bridge: None,
            mac: "52:54:00:aa:bb:01".into(),
            vlan: None,
            uplink_vlan: None,
            tap: None,
        }],
    }
}

#[test]
fn existing_pool_and_volume_life_cycle() {
    let state = tempfile::tempdir().unwrap();
    let hv = Libvirt::new(&config("default-pool", Path::new("/unused")), state.path());
    assert_eq!(hv.uri(), "test:///default");

    let pool = hv.pool().expect("pool info");
    assert_eq!(pool.name, "default-pool");
    assert_eq!(pool.path, PathBuf::from("/default-pool"));
    assert!(pool.capacity_bytes > 0 && pool.available_bytes > 0, "{pool:?}");

    let gib = 1 << 30;
    let vol = hv.create_volume("lifecycle-disk", 4 * gib).expect("create volume");
    assert_eq!(vol.name, "lifecycle-disk");
    assert_eq!(vol.capacity_bytes, 4 * gib);
    assert_eq!(vol.path, PathBuf::from("/default-pool/lifecycle-disk"));
    assert_eq!(hv.volume("lifecycle-disk").unwrap(), Some(vol.clone()));

    let err = hv.create_volume("lifecycle-disk", gib).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // Growing is covered against a real libvirtd (the test driver cannot resize); the checks are ours.
    assert_eq!(hv.resize_volume("lifecycle-disk", 4 * gib).expect("same size"), vol);
    let err = hv.resize_volume("lifecycle-disk", 2 * gib).unwrap_err();
    assert!(matches!(err, HypervisorError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("lifecycle-disk") && err.to_string().contains("shrink"), "{err}");
    assert_eq!(hv.volume("lifecycle-disk").unwrap().unwrap().capacity_bytes, 4 * gib, "shrink refused");

    hv.delete_volume("lifecycle-disk").expect("delete volume");
    assert_eq!(hv.volume("lifecycle-disk").unwrap(), None);
    let err = hv.delete_volume("lifecycle-disk").unwrap_err();
    assert!(
        matches!(&err, HypervisorError::NoVolume(v, p) if v == "lifecycle-disk" && p == "default-pool"),
        "{err}"
    );
    let err = hv.resize_volume("no-such-volume", gib).unwrap_err();
    assert!(matches!(err, HypervisorError::NoVolume(..)), "{err}");
}

#[test]
fn missing_pool_is_created_as_a_started_dir_pool() {
    let state = tempfile::tempdir().unwrap();
    let pool_dir = state.path().join("pool");
    let hv = Libvirt::new(&config("gridforge-created", &pool_dir), state.path());
    let pool = hv.pool().expect("pool created");
    assert_eq!(pool.name, "gridforge-created");
    assert_eq!(pool.path, pool_dir);
    // The test driver keeps its pools for the process: check what virsh would show through a new handle.
    let again = Libvirt::new(&config("gridforge-created", &pool_dir), state.path());
    assert_eq!(again.pool().unwrap().path, pool_dir);
    let vol = again.create_volume("in-new-pool", 1 << 20).expect("volume in the new pool");
    assert!(vol.path.starts_with(&pool_dir), "{vol:?}");
    again.delete_volume("in-new-pool").unwrap();
}

#[test]
fn domain_life_cycle() {
    let state = tempfile::tempdir().unwrap();
    let hv = Libvirt::new(&config("default-pool", Path::new("/unused")), state.path());
    let name = "gf-life";
    assert_eq!(hv.state(name).unwrap(), None);

    hv.define(&def(name)).expect("define");
    let nvram = state.path().join("nvram").join(format!("{name}_VARS.fd"));
    assert_eq!(
        std::fs::read(&nvram).expect("per-VM NVRAM copy"),
        std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.fd").unwrap()
    );
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Shutoff));
    assert_eq!(hv.domain_disk(name).unwrap(), PathBuf::from(format!("/default-pool/{name}.img")));
    // Redefining keeps the VM's NVRAM (it may hold boot entries by now).
    std::fs::write(&nvram, b"vars written by the guest").unwrap();
    hv.define(&DomainDef { memory_mib: 1024, ..def(name) }).expect("redefine");
    assert_eq!(std::fs::read(&nvram).unwrap(), b"vars written by the guest");

    hv.start(name).expect("start");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Running));
    let err = hv.undefine(name).unwrap_err();
    assert!(matches!(&err, HypervisorError::WrongState { state, .. } if state == "running"), "{err}");

    let stats = hv.stats().expect("stats");
    let s = stats.iter().find(|s| s.name == name).expect("stats of the domain");
    assert_eq!(s.state, "running");
    assert_eq!(s.vcpus, 2);
    assert_eq!(s.memory_bytes, 1024 << 20);
    assert!(s.cpu_time_ns > 0 && s.disk_read_bytes > 0 && s.net_rx_bytes > 0, "{s:?}");

    hv.suspend(name).expect("suspend");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Paused));
    hv.resume(name).expect("resume");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Running));
    hv.reboot(name).expect("reboot");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Running));
    hv.shutdown(name).expect("shutdown");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Shutoff));
    hv.start(name).expect("start again");
    hv.destroy(name).expect("destroy");
    assert_eq!(hv.state(name).unwrap(), Some(DomainState::Shutoff));
    let err = hv.destroy(name).unwrap_err();
    assert!(
        matches!(&err, HypervisorError::WrongState { name: n, state, what } if n == name && state == "shutoff" && *what == "destroy"),
        "destroy of a stopped domain: {err}"
    );

    hv.undefine(name).expect("undefine");
    assert_eq!(hv.state(name).unwrap(), None);
    assert!(!nvram.exists(), "NVRAM copy left behind at {}", nvram.display());
    assert!(hv.stats().unwrap().iter().all(|s| s.name != name));
}

#[test]
fn resources_of_a_shut_off_domain_change_from_its_next_start() {
    let state = tempfile::tempdir().unwrap();
    let hv = Libvirt::new(&config("default-pool", Path::new("/unused")), state.path());
    let name = "gf-grow";
    hv.define(&def(name)).expect("define");
    hv.start(name).expect("start");
    let err = hv.set_resources(name, 4, 2048).unwrap_err();
    assert!(matches!(&err, HypervisorError::WrongState { state, .. } if state == "running"), "{err}");
    hv.destroy(name).expect("destroy");
    hv.set_resources(name, 4, 2048).expect("set vCPUs and memory");
    hv.start(name).expect("start grown");
    let stats = hv.stats().expect("stats");
    let s = stats.iter().find(|s| s.name == name).expect("stats of the domain");
    assert_eq!((s.vcpus, s.memory_bytes), (4, 2048 << 20), "{s:?}");
    hv.destroy(name).unwrap();
    // 0 keeps a value.
    hv.set_resources(name, 0, 1024).expect("memory only");
    hv.start(name).unwrap();
    let s = hv.stats().unwrap().into_iter().find(|s| s.name == name).unwrap();
    assert_eq!((s.vcpus, s.memory_bytes), (4, 1024 << 20), "{s:?}");
    hv.destroy(name).unwrap();
    hv.undefine(name).unwrap();
}

#[test]
fn unknown_domain_and_bad_definitions_are_named() {
    let state = tempfile::tempdir().unwrap();
    let hv = Libvirt::new(&config("default-pool", Path::new("/unused")), state.path());
    for (op, result) in [
        ("start", hv.start("gf-nobody")),
        ("shutdown", hv.shutdown("gf-nobody")),
        ("undefine", hv.undefine("gf-nobody")),
        ("domain_disk", hv.domain_disk("gf-nobody").map(drop)),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(&err, HypervisorError::NoDomain(n) if n == "gf-nobody"), "{op}: {err}");
        assert!(err.to_string().contains("gf-nobody"), "{op}: {err}");
    }
    assert_eq!(hv.volume("no-such-volume").unwrap(), None);

    let mut bad = def("gf-bad");
    bad.nics[0].bridge = Some("br0".into());
    let err = hv.define(&bad).unwrap_err();
    assert!(err.to_string().contains("gf-bad") && err.to_string().contains("network or bridge"), "{err}");
    let mut bad = def("gf-bad");
    bad.nics[0].mac = "not-a-mac".into();
    assert!(hv.define(&bad).unwrap_err().to_string().contains("not-a-mac"));
    let err = hv.define(&def("a/b")).unwrap_err();
    assert!(matches!(err, HypervisorError::Invalid(_)), "{err}");
    assert_eq!(hv.state("gf-bad").unwrap(), None, "an invalid definition reached libvirt");
    assert!(!state.path().join("nvram/gf-bad_VARS.fd").exists());
}

/// Runs `f` on a thread and waits at most a minute for it: a call that hangs fails the test instead.
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the call hung instead of failing")
}

#[test]
fn unreachable_libvirt_is_unavailable_and_not_a_hang() {
    let state = tempfile::tempdir().unwrap();
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    let cfg = LibvirtConfig { uri: uri.into(), ..config("gridforge", Path::new("/unused")) };
    let hv = Libvirt::new(&cfg, state.path());
    let (pool, ping, st) = within_a_minute(move || (hv.pool(), hv.ping(), hv.state("vm")));
    for (op, err) in [("pool", pool.unwrap_err()), ("ping", ping.unwrap_err()), ("state", st.unwrap_err())] {
        match &err {
            HypervisorError::Unavailable { uri: u, reason } => {
                assert_eq!(u, uri, "{op}");
                assert!(reason.contains("connect"), "{op}: {reason}");
            }
            other => panic!("{op}: expected Unavailable, got {other:?}"),
        }
    }

    let cfg = LibvirtConfig { uri: String::new(), ..config("gridforge", Path::new("/unused")) };
    let err = Libvirt::new(&cfg, state.path()).ping().unwrap_err();
    assert!(matches!(err, HypervisorError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("no libvirt URI"), "{err}");
}
