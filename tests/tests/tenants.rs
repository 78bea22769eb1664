//! Tenants, their quotas, a tenant-scoped user, and a group whose minimum the scaling loop keeps, through
//! `gridctl -o json` against a coordinator and agents in network namespaces, with the agents' own job lists
//! as the oracle of what was provisioned.

use std::time::Duration;

use gridforge_tests::coordinator::Gridctl;
use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::pki::PkiCommands;
use gridforge_tests::{json_str as s, json_u64 as n, wait_until};
use serde_json::{Value, json};

/// The tenant-scoped operator's certificate name.
const ACME_OPS: &str = "acme-ops";

fn provisions(grid: &Grid, vm: &str) -> usize {
    grid.agents.iter().map(|a| a.provision_jobs(vm).len()).sum()
}

fn names_of(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(|x| x.as_str().unwrap_or_default().to_string()).collect()
}

fn names(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v.as_array().into_iter().flatten().map(|x| s(x, "name").to_string()).collect();
    out.sort();
    out
}

fn create(grid: &Grid, ctl: &Gridctl, name: &str, vcpus: u32, extra: &[&str]) -> Value {
    let spec = grid.spec_file(name, vcpus, 64, 64);
    let mut args = vec!["vm", "create", "-f", spec.to_str().unwrap(), "--wait"];
    args.extend_from_slice(extra);
    let op = ctl.json(&args);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "create {name}: {op}");
    op
}

#[test]
fn quotas_tenant_scope_and_a_groups_minimum_kept_by_the_scaling_loop() {
    let grid = Grid::with_coordinator(2, Default::default());
    for node in ["node-a", "node-b"] {
        grid.enroll(node, Shape { vcpus: 8, memory_mib: 2048 }, &[]);
    }
    let admin = grid.admin();
    let acme = admin.json(&["tenant", "add", "acme", "--vcpus", "4", "--vms", "4"]);
    assert_eq!(n(&acme[0], &["quota", "vcpus"]), 4, "{acme}");
    admin.json(&["tenant", "add", "globex"]);
    grid.pki.issue(ACME_OPS, &[]);
    let user = admin.json(&["user", "add", ACME_OPS, "--role", "operator", "--tenant", "acme"]);
    assert_eq!(s(&user["users"][0], "tenant"), "acme", "{user}");
    let ops = grid.gridctl_as(ACME_OPS);

    // The scoped operator's VM is its tenant's; another tenant's VM is, to it, not there.
    create(&grid, &ops, "acme-1", 1, &[]);
    create(&grid, &admin, "globex-1", 1, &["--tenant", "globex"]);
    assert_eq!(s(&admin.json(&["vm", "show", "acme-1"]), "tenant"), "acme");
    assert_eq!(names(&ops.json(&["vm", "list"])), ["acme-1"]);
    assert_eq!(names(&admin.json(&["vm", "list", "--tenant", "globex"])), ["globex-1"]);
    assert_eq!(names(&ops.json(&["tenant", "list"])), ["acme"]);
    for args in
        [&["vm", "show", "globex-1"][..], &["vm", "delete", "globex-1"], &["tenant", "show", "globex"]]
    {
        let out = ops.fails(args);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {}", out.describe());
    }
    let out = ops.fails(&["node", "cordon", "node-a"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());
    assert!(out.stderr.contains("scoped to tenant acme"), "{}", out.describe());
    let spec = grid.spec_file("sneaky", 1, 64, 64);
    let out = ops.fails(&["vm", "create", "-f", spec.to_str().unwrap(), "--tenant", "globex"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());
    let node = admin.json(&["node", "show", "node-a"]);
    let seen = ops.json(&["node", "show", "node-a"]);
    assert!(
        seen["vms"].as_array().into_iter().flatten().all(|v| v.as_str().unwrap().starts_with("acme")),
        "{seen} (the admin sees {node})"
    );

    // Past the quota: refused with what is used, asked and allowed; nothing reaches an agent.
    let big = grid.spec_file("acme-big", 4, 64, 64);
    let out = ops.fails(&["vm", "create", "-f", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", out.describe());
    assert!(
        out.stderr.contains("tenant acme's quota")
            && out.stderr.contains("vcpus: 1 used + 4 asked > 4 allowed"),
        "{}",
        out.describe()
    );
    assert_eq!(provisions(&grid, "acme-big"), 0);
    assert!(ops.fails(&["vm", "show", "acme-big"]).status.code() == Some(3));

    // A group with a minimum of two members: the scaling loop adds them from the template. libvirt's test
    // driver reports each domain's CPU as busy all the time (its CPU time runs with the clock): that load,
    // above the group's up threshold, takes the group to its bound, where it is held.
    let template = gridforge_tests::images::vm_spec("unused", 1, 64, 64);
    let group = json!({
        "tenant": "acme",
        "name": "web",
        "serviceLevel": {"minMembers": 2, "maxMembers": 3, "priority": 1, "maxAvgCpuPercent": 80.0},
        "scaling": {"horizontal": true, "cpuUpPercent": 70.0, "cpuDownPercent": 20.0, "windowSecs": 3, "cooldownSecs": 1},
        "template": template,
    });
    let file = grid.path().join("group-web.json");
    std::fs::write(&file, group.to_string()).unwrap();
    ops.json(&["group", "put", "-f", file.to_str().unwrap()]);
    let held = wait_until(
        "the group at its bound, held",
        Duration::from_secs(40),
        Duration::from_millis(300),
        || {
            let log = ops.json(&["scaling", "log"]);
            let at_bound = log.as_array().is_some_and(|a| {
                a.iter().any(|d| s(d, "action") == "HOLD" && s(d, "reason").contains("at max_members 3"))
            });
            if at_bound { Ok(log) } else { Err(log.to_string()) }
        },
    );
    // The load is above the level (a new member's first sample may be 0, so its window takes a moment).
    let status = wait_until(
        "the level missed on the load",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let st = ops.json(&["group", "show", "acme/web"]);
            let missed = st["meetsServiceLevel"].as_bool() != Some(true)
                && s(&st, "serviceLevelReason").contains("over 80.0%");
            if missed { Ok(st) } else { Err(st.to_string()) }
        },
    );
    let members = names(&status["members"]);
    assert_eq!(members, ["acme-web-1", "acme-web-2", "acme-web-3"], "{status}");
    assert_eq!(n(&status, &["running"]), 3, "{status}");
    for m in &members {
        assert_eq!(provisions(&grid, m), 1, "{m} provisioned once");
        let vm = admin.json(&["vm", "show", m]);
        assert_eq!((s(&vm, "tenant"), s(&vm, "group"), s(&vm, "state")), ("acme", "web", "RUNNING"), "{vm}");
        assert!(vm["usage"]["cpuPercent"].as_f64().unwrap() > 70.0, "{vm}");
    }
    // Newest first: the hold at the bound, the scale-out for the load, the two for the minimum (a hold while
    // a new member had no samples yet may stand between them).
    let log = held.as_array().unwrap();
    assert!(s(&log[0], "action") == "HOLD" && s(&log[0], "reason").contains("at max_members 3"), "{held}");
    let outs: Vec<&Value> = log.iter().filter(|d| s(d, "action") == "SCALE_OUT").collect();
    let added: Vec<&str> = outs.iter().map(|d| s(d, "vm")).collect();
    assert_eq!(added, ["acme-web-3", "acme-web-2", "acme-web-1"], "{held}");
    assert!(s(outs[0], "reason").contains("above 70.0% (up threshold)"), "{held}");
    assert!(
        s(outs[1], "reason").contains("min_members") && s(outs[2], "reason").contains("min_members"),
        "{held}"
    );
    assert!(log.iter().all(|d| ["HOLD", "SCALE_OUT"].contains(&s(d, "action"))), "{held}");
    // Held over more rounds: nothing more is created, the hold is logged once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(names(&admin.json(&["vm", "list", "--tenant", "acme", "--group", "web"])), members);
    assert_eq!(ops.json(&["scaling", "log"]).as_array().unwrap().len(), log.len(), "nothing more decided");
    // The members count against the quota: 4 of 4 VMs, 4 of 4 vCPUs.
    let t = ops.json(&["tenant", "show", "acme"]);
    assert_eq!((n(&t[0], &["vms"]), n(&t[0], &["used", "vcpus"])), (4, 4), "{t}");
    let one = grid.spec_file("acme-one-more", 1, 64, 64);
    let out = ops.fails(&["vm", "create", "-f", one.to_str().unwrap()]);
    assert!(
        out.status.code() == Some(5) && out.stderr.contains("vms: 4 used + 1 asked > 4 allowed"),
        "{}",
        out.describe()
    );
    let plan = ops.json(&["scaling", "plan"]);
    assert!(plan.as_array().is_some_and(|a| a.iter().all(|d| s(d, "action") == "HOLD")), "{plan}");
    let out = admin.fails(&["group", "remove", "acme/web"]);
    assert_eq!(out.status.code(), Some(4), "{}", out.describe());

    // Vertical: a database member under the same load grows by a vCPU per step up to its bound, each step a
    // resize with restart of the running VM. Its node is full, so it first moves to a node with room for its
    // new size, and grows there.
    let db = json!({
        "tenant": "globex",
        "name": "db",
        "serviceLevel": {"minMembers": 1},
        "scaling": {"vertical": true, "cpuUpPercent": 70.0, "cpuDownPercent": 20.0, "windowSecs": 3, "cooldownSecs": 1, "maxVcpus": 2},
    });
    let file = grid.path().join("group-db.json");
    std::fs::write(&file, db.to_string()).unwrap();
    admin.json(&["group", "put", "-f", file.to_str().unwrap()]);
    let node_a = admin.json(&["node", "show", "node-a"]);
    let placeable = (n(&node_a, &["capacity", "vcpus"]) as f64 * node_a["overcommitCpu"].as_f64().unwrap())
        .floor() as u64;
    let filler = placeable - n(&node_a, &["allocated", "vcpus"]) - 1;
    if filler > 0 {
        create(&grid, &admin, "filler", u32::try_from(filler).unwrap(), &["--node", "node-a"]);
    }
    create(&grid, &admin, "globex-db-1", 1, &["--tenant", "globex", "--group", "db", "--node", "node-a"]);
    let grown = wait_until(
        "the db member at 2 vCPUs, running",
        Duration::from_secs(60),
        Duration::from_millis(300),
        || {
            let vm = admin.json(&["vm", "show", "globex-db-1"]);
            let done = n(&vm, &["resources", "vcpus"]) == 2
                && s(&vm, "state") == "RUNNING"
                && s(&vm, "operation").is_empty();
            if done { Ok(vm) } else { Err(vm.to_string()) }
        },
    );
    assert_eq!(s(&grown, "node"), "node-b", "moved off the full node: {grown}");
    let node = grid.agents.iter().find(|a| a.name == "node-b").unwrap();
    let domain = node.stats().vms.into_iter().find(|v| v.name == "globex-db-1").unwrap();
    assert_eq!((domain.vcpus, domain.state.as_str()), (2, "running"), "{domain:?}");
    let on_a = grid.agents.iter().find(|a| a.name == "node-a").unwrap().stats();
    assert!(on_a.vms.iter().all(|v| v.name != "globex-db-1"), "no copy left on node-a");
    let log = admin.json(&["scaling", "log", "--tenant", "globex"]);
    let ups: Vec<&Value> = log.as_array().unwrap().iter().filter(|d| s(d, "action") == "SCALE_UP").collect();
    assert_eq!(ups.len(), 2, "a move, then the step: {log}");
    // Newest first: the resize on node-b, then the migration off node-a.
    assert!(s(ups[1], "reason").contains("migrates first"), "{log}");
    let moved = admin.json(&["op", "show", s(ups[1], "operation")]);
    assert_eq!((s(&moved, "kind"), s(&moved, "state")), ("MIGRATE_VM", "SUCCEEDED"), "{moved}");
    let op = admin.json(&["op", "show", s(ups[0], "operation")]);
    let steps: Vec<&str> = op["steps"].as_array().unwrap().iter().map(|st| s(st, "name")).collect();
    assert_eq!(steps, ["stop", "resources", "start"], "{op}");
    assert_eq!((s(&op, "state"), s(&op, "requestedBy")), ("SUCCEEDED", "scaling"), "{op}");

    // A tenant network: a VLAN ID of its own, and the VM's NIC on the tenant bridge tagged with it.
    let net = admin.json(&["network", "create", "globex/back", "--translate", "node-a=3001"]);
    let vlan = n(&net[0], &["vlanId"]);
    assert!((100..=3999).contains(&vlan), "{net}");
    create(&grid, &admin, "globex-web-1", 1, &["--tenant", "globex", "--network", "back"]);
    let vm = admin.json(&["vm", "show", "globex-web-1"]);
    let nic = &vm["spec"]["machine"]["nics"][0];
    assert_eq!((s(nic, "bridge"), n(nic, &["vlan"])), ("br-tenants", vlan), "{vm}");
    let shown = admin.json(&["network", "show", "globex/back"]);
    assert_eq!(names_of(&shown[0]["vms"]), ["globex-web-1"], "{shown}");
    assert_eq!(n(&shown[0], &["uplinkVlans", "node-a"]), 3001, "{shown}");
    let out = admin.fails(&["network", "delete", "globex/back"]);
    assert!(
        out.status.code() == Some(4) && out.stderr.contains("used by globex-web-1"),
        "{}",
        out.describe()
    );
    assert!(
        ops.json(&["network", "list"]).as_array().is_none_or(Vec::is_empty),
        "acme sees no network of globex"
    );
    let other = admin.json(&["network", "create", "acme/back"]);
    assert_ne!(n(&other[0], &["vlanId"]), vlan, "no two networks share an ID: {other}");

    // Nodes by datacenter.
    assert_eq!(names(&admin.json(&["node", "list", "--datacenter", "dc1"])), ["node-a", "node-b"]);
    assert!(admin.json(&["node", "list", "--datacenter", "dc2"]).as_array().is_none_or(Vec::is_empty));
}
