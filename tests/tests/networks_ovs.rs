//! Tenant networks on a real Open vSwitch: a node's agent puts each VM's NIC on the tenant bridge as an access
//! port with its network's VLAN tag, translates a network's ID on the node's uplink, and removes ports and
//! translations with the VMs. The test is every guest and the upstream switch: it holds the taps and sends
//! and reads raw Ethernet frames, so isolation is checked on what crosses the switch.

use std::time::Duration;

use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::images::ImageStore;
use gridforge_tests::json_u64 as n;
use gridforge_tests::ovs::{Switch, UPLINK_PORT, frame, vlan_of};
use serde_json::Value;

const TENANT_BRIDGE: &str = "br-tenants";
const UPLINK_BRIDGE: &str = "br-uplink";
/// The ID the first tenant's network has on node-a's uplink.
const OUTER: u16 = 2101;
/// How long a frame that should not arrive is waited for.
const QUIET: Duration = Duration::from_millis(800);

fn vlan(net: &Value) -> u16 {
    n(&net[0], &["vlanId"]) as u16
}

#[test]
fn each_tenant_on_its_own_vlan_translated_on_the_uplink_and_isolated_from_the_other() {
    let dir = tempfile::Builder::new().prefix("gridforge-ovs-").tempdir().unwrap();
    let mut switches = Vec::new();
    let grid = Grid::build_with(1, ImageStore::tiny, |i, agent| {
        let rundir = dir.path().join(format!("ovs-{i}"));
        switches.push(Switch::start(&agent.ns, &rundir, TENANT_BRIDGE, UPLINK_BRIDGE));
        let rundir = rundir.display().to_string();
        agent.add_table(
            "network",
            &[("switch", "openvswitch"), ("ovs_rundir", &rundir), ("uplink_bridge", UPLINK_BRIDGE)],
        );
    });
    let mut grid = grid;
    grid.start_coordinator(Default::default());
    let sw = &switches[0];
    grid.enroll("node-a", Shape { vcpus: 8, memory_mib: 4096 }, &[]);
    let admin = grid.admin();
    for t in ["acme", "globex"] {
        admin.json(&["tenant", "add", t]);
    }
    let acme_net =
        vlan(&admin.json(&["network", "create", "acme/front", "--translate", &format!("node-a={OUTER}")]));
    let globex_net = vlan(&admin.json(&["network", "create", "globex/front"]));
    assert_ne!(acme_net, globex_net);
    // An uplink ID another network already has on that node is refused (their frames would mix).
    let out =
        admin.fails(&["network", "create", "globex/clash", "--translate", &format!("node-a={acme_net}")]);
    assert!(out.stderr.contains("already network acme/front"), "{}", out.describe());

    for (vm, tenant) in [("acme-1", "acme"), ("acme-2", "acme"), ("globex-1", "globex")] {
        let spec = grid.spec_file(vm, 1, 64, 64);
        let op = admin.json(&[
            "vm",
            "create",
            "-f",
            spec.to_str().unwrap(),
            "--tenant",
            tenant,
            "--network",
            "front",
            "--wait",
        ]);
        assert_eq!(op["state"], "SUCCEEDED", "create {vm}: {op}\n{}", grid.agents[0].log_tail());
    }

    // Each VM's port carries its tenant's tag.
    let port =
        |vm: &str| sw.port_of(vm).unwrap_or_else(|| panic!("no port of {vm}:\n{}", sw.vsctl(&["show"])));
    let (a1, a2, g1) = (port("acme-1"), port("acme-2"), port("globex-1"));
    assert_eq!(sw.tag(&a1), Some(acme_net));
    assert_eq!(sw.tag(&a2), Some(acme_net));
    assert_eq!(sw.tag(&g1), Some(globex_net));
    let flows = sw.ofctl(&["dump-flows", UPLINK_BRIDGE, &format!("cookie={acme_net}/-1")]);
    assert!(
        flows.contains(&format!("mod_vlan_vid:{OUTER}")),
        "no translation on the uplink bridge:\n{flows}"
    );

    let (mut t_a1, mut t_a2, mut t_g1) = (sw.open_tap(&a1), sw.open_tap(&a2), sw.open_tap(&g1));
    let mut wire = sw.open_tap(UPLINK_PORT);
    std::thread::sleep(Duration::from_millis(300));

    // A broadcast of acme-1 reaches acme-2 untagged, leaves the uplink with acme's uplink ID, and never
    // reaches globex-1.
    t_a1.send(&frame([0x52, 0x54, 0, 0, 0, 1], None, b"from-acme-1"));
    let got = t_a2.frames_with(b"from-acme-1", QUIET);
    assert_eq!(got.len(), 1, "acme-2 did not get acme-1's broadcast\n{}", sw.log_tail());
    assert_eq!(vlan_of(&got[0]), None, "an access port delivers untagged frames");
    let up = wire.frames_with(b"from-acme-1", Duration::from_millis(100));
    assert_eq!(up.iter().map(|f| vlan_of(f)).collect::<Vec<_>>(), [Some(OUTER)], "on the uplink");
    assert!(
        t_g1.frames_with(b"from-acme-1", Duration::from_millis(100)).is_empty(),
        "globex saw acme's frame"
    );

    // globex-1's broadcast reaches no acme VM.
    t_g1.send(&frame([0x52, 0x54, 0, 0, 0, 3], None, b"from-globex-1"));
    let up = wire.frames_with(b"from-globex-1", QUIET);
    assert_eq!(up.iter().map(|f| vlan_of(f)).collect::<Vec<_>>(), [Some(globex_net)], "untranslated");
    for tap in [&mut t_a1, &mut t_a2] {
        assert!(tap.frames_with(b"from-globex-1", Duration::from_millis(100)).is_empty(), "acme saw globex");
    }

    // From the uplink: acme's uplink ID reaches acme's VMs only; its bridge ID does not pass the uplink.
    let upstream = [0x52, 0x54, 0, 0, 0, 0x99];
    wire.send(&frame(upstream, Some(OUTER), b"to-acme"));
    assert_eq!(t_a1.frames_with(b"to-acme", QUIET).len(), 1, "acme-1 from the uplink");
    assert_eq!(t_a2.frames_with(b"to-acme", Duration::from_millis(100)).len(), 1, "acme-2 from the uplink");
    assert!(t_g1.frames_with(b"to-acme", Duration::from_millis(100)).is_empty());
    wire.send(&frame(upstream, Some(acme_net), b"inner-id"));
    for tap in [&mut t_a1, &mut t_a2, &mut t_g1] {
        assert!(tap.frames_with(b"inner-id", QUIET).is_empty(), "the bridge-side ID passed the uplink");
    }

    // Deleting the VMs removes their ports and taps, and acme's translation with its last port.
    drop((t_a1, t_a2, t_g1));
    for vm in ["acme-1", "acme-2", "globex-1"] {
        let op = admin.json(&["vm", "delete", vm, "--wait"]);
        assert_eq!(op["state"], "SUCCEEDED", "delete {vm}: {op}");
        assert_eq!(sw.port_of(vm), None, "{vm}'s port stayed");
    }
    let left = sw.vsctl(&["list-ports", TENANT_BRIDGE]);
    assert_eq!(left.split_whitespace().collect::<Vec<_>>(), ["gf-to-uplink"], "ports left on the bridge");
    let flows = sw.ofctl(&["dump-flows", UPLINK_BRIDGE, &format!("cookie={acme_net}/-1")]);
    assert!(!flows.contains("mod_vlan_vid"), "the translation outlived the network's last port:\n{flows}");
    let links = std::process::Command::new("ip")
        .args(["netns", "exec", &sw.ns.name, "ip", "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    for p in [&a1, &a2, &g1] {
        assert!(!links.contains(p.as_str()), "tap {p} left on the node:\n{links}");
    }
    drop(switches);
}
