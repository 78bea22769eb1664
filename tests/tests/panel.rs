//! The web panel in headless Chromium against a coordinator and two agents on libvirt's test driver: log in
//! with a token, see the grid by datacenter, create a server from the form and watch its operation reach the
//! end, see its CPU meter green and then turn red without a reload when the same load is a larger share of
//! it (resized from 4 vCPUs to 1), read its disk and network meters, find it in its tenant's tier, stop,
//! start, reboot and migrate it, delete it after confirming; on a narrow window nothing scrolls sideways.
//!
//! `GRIDFORGE_SCREENSHOTS=1` writes the screenshots to docs/ (the README shows them); otherwise they go to
//! the grid's temp dir.

use std::path::PathBuf;
use std::time::Duration;

use gridforge_tests::browser::{Browser, ENTER, ESCAPE, WAIT};
use gridforge_tests::coordinator::Settings;
use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::images::vm_spec;
use gridforge_tests::wait_until;
use serde_json::{Value, json};

fn shots(grid: &Grid) -> PathBuf {
    if std::env::var_os("GRIDFORGE_SCREENSHOTS").is_some() {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs"))
    } else {
        grid.path().to_path_buf()
    }
}

/// A meter of the page as a screen reader gets it: its level (`data-level`), value and spoken value.
#[derive(Debug)]
struct Reading {
    level: String,
    percent: f64,
    spoken: String,
}

/// The meter `css` once `ready` holds for it (e.g. a poll's sample has reached it).
fn reading(b: &Browser, css: &str, ready: impl Fn(&Reading) -> bool) -> Reading {
    wait_until(&format!("the meter {css}"), WAIT, Duration::from_millis(200), || {
        let v = b.js(
            "const m = document.querySelector(arguments[0]); \
             return m && [m.getAttribute('role'), m.dataset.level, m.getAttribute('aria-valuenow'), \
             m.getAttribute('aria-valuetext')];",
            json!([css]),
        );
        let field = |i: usize| v[i].as_str().unwrap_or_default().to_string();
        if field(0) != "meter" {
            return Err(format!("not a meter: {v}"));
        }
        let r = Reading { level: field(1), percent: field(2).parse().unwrap_or(-1.0), spoken: field(3) };
        if ready(&r) { Ok(r) } else { Err(format!("{r:?}")) }
    })
}

#[test]
fn log_in_see_the_grid_create_watch_a_meter_turn_red_and_delete() {
    // A disk meter whose full scale the test driver's traffic fills in part: its disk counters grow 75,000
    // bytes a second (libvirt's test driver derives them from the clock).
    let settings =
        Settings { disk_meter_mib_per_s: 0.25, network_meter_mib_per_s: 0.5, ..Default::default() };
    let grid = Grid::with_coordinator(2, settings);
    grid.enroll_in("node-a", "dc1", Shape { vcpus: 8, memory_mib: 2048 }, &[]);
    grid.enroll_in("node-b", "dc2", Shape { vcpus: 8, memory_mib: 2048 }, &[]);
    let admin = grid.admin();
    admin.json(&["tenant", "add", "acme"]);
    let group = json!({"tenant": "acme", "name": "web", "template": vm_spec("unused", 1, 64, 64)});
    let file = grid.path().join("group-web.json");
    std::fs::write(&file, group.to_string()).unwrap();
    admin.json(&["group", "put", "-f", file.to_str().unwrap()]);
    let token: Value = admin.json(&["token", "create", "panel", "--role", "operator"]);
    let token = token["token"].as_str().unwrap().to_string();
    let c = grid.coordinator.as_ref().unwrap();
    let url = format!("https://{}/", c.http);
    let dir = shots(&grid);

    let b = Browser::start(1280, 900);
    b.goto(&url);
    // Not logged in: the login form, used with the keyboard alone (Enter submits).
    b.find("#token");
    b.type_into("#token", "gft_wrong\n");
    b.wait_text("#alert", "Log in failed");
    b.type_into("#token", &format!("{token}\n"));

    // The grid: each datacenter with its nodes and their state.
    let text = b.wait_text("#grid", "Datacenter dc2");
    assert!(text.contains("Datacenter dc1") && text.contains("node-a") && text.contains("node-b"), "{text}");
    b.wait_text("#grid", "ready");
    b.screenshot(&dir.join("panel-grid.png"));

    // Create from the form; the operation's progress to its end.
    b.click("nav a[href='#/create']");
    b.type_into("#vm-name", "web-1");
    b.wait_attribute("#vm-image", "list", "images", Duration::from_secs(5));
    b.type_into("#vm-image", "tiny:1");
    b.type_into("#vm-vcpus", "4");
    b.type_into("#vm-memory", "64");
    b.type_into("#vm-disk", "64");
    b.click("#vm-tenant option[value='acme']");
    b.type_into("#vm-tier", "web");
    b.click("#create");
    let state = b.wait_text("#op-state", "succeeded");
    assert!(state.contains("create web-1"), "{state}");
    b.wait_attribute("#op-progress", "value", "100", Duration::from_secs(5));
    b.js("window.scrollTo(0, 0);", json!([]));
    b.screenshot(&dir.join("panel-create.png"));
    let vm = admin.json(&["vm", "show", "web-1"]);
    assert_eq!((vm["state"].as_str(), vm["group"].as_str()), (Some("RUNNING"), Some("web")), "{vm}");

    // The server's page, running. The test driver's domains use one host core each, whatever their vCPUs
    // (their CPU time is the clock): once the poller's samples arrive, 25 % of 4 vCPUs, green.
    b.click("#create-progress a");
    b.wait_text("#server-state", "running");
    b.js("window.stillThisPage = true;", json!([]));
    let cpu = reading(&b, "#meter-cpu", |r| r.percent > 0.0);
    assert!(cpu.level == "green" && (20.0..=30.0).contains(&cpu.percent), "{cpu:?}");
    assert!(cpu.spoken.ends_with("percent, normal"), "{cpu:?}");
    // Disk: the rate and its share of the configured full scale. Network: the form gives the server no
    // NIC, so nothing, but a reading all the same.
    let disk = reading(&b, "#meter-disk", |r| r.percent > 0.0);
    assert!(disk.spoken.contains("KiB per second, ") && disk.spoken.ends_with("percent, normal"), "{disk:?}");
    assert!((10.0..=50.0).contains(&disk.percent), "{disk:?}");
    b.wait_text(".meters", "KiB/s");
    let net = reading(&b, "#meter-network", |_| true);
    assert_eq!((net.level.as_str(), net.spoken.as_str()), ("green", "0 B per second, 0 percent, normal"));

    // Down to 1 vCPU (shut down, resized and started again, one operation, while the page stays open): the
    // same busy core is now all of its vCPUs, and the meter turns red.
    let op = admin.json(&["vm", "resize", "web-1", "--vcpus", "1", "--restart", "--wait"]);
    assert_eq!(op["state"], "SUCCEEDED", "{op}");
    let cpu = reading(&b, "#meter-cpu", |r| r.level != "green");
    assert_eq!(cpu.level, "red", "{cpu:?}");
    assert!(cpu.percent >= 90.0 && cpu.spoken.ends_with("percent, critical"), "{cpu:?}");
    assert_eq!(admin.json(&["vm", "show", "web-1"])["resources"]["vcpus"], 1);
    // The disk's rate again after the restart (its first window counts nothing).
    reading(&b, "#meter-disk", |r| r.percent > 0.0);
    assert_eq!(b.js("return window.stillThisPage === true", json!([])), true, "the page was reloaded");
    b.screenshot(&dir.join("panel-server.png"));

    // The tenant's tiers with their servers, and the operations.
    b.goto(&format!("{url}#/tenant/acme"));
    let text = b.wait_text("main", "Tier web");
    b.wait_text("main", "web-1");
    assert!(!text.contains("in no tier"), "{text}");
    b.screenshot(&dir.join("panel-tenant.png"));
    b.goto(&format!("{url}#/operations"));
    b.wait_text("main", "create web-1");
    b.screenshot(&dir.join("panel-operations.png"));

    // On a phone-sized window the server page reflows instead of scrolling sideways.
    b.goto(&format!("{url}#/server/web-1"));
    b.wait_text("#server-state", "running");
    b.resize(390, 844);
    std::thread::sleep(Duration::from_millis(300));
    let fits = b.js("return document.documentElement.scrollWidth <= window.innerWidth", json!([]));
    assert_eq!(fits, true, "the page is wider than a narrow window");
    b.screenshot(&dir.join("panel-narrow.png"));
    b.resize(1280, 900);

    // Stop, start and migrate from the page's buttons, each followed to its end.
    b.click("#action-stop");
    b.wait_text("#op-state", "stop web-1");
    b.wait_text("#server-state", "stopped");
    b.click("#action-start");
    b.wait_text("#op-state", "start web-1");
    b.wait_text("#server-state", "running");
    b.click("#action-reboot");
    b.wait_text("#op-state", "reboot web-1");
    b.wait_text("#op-state", "succeeded");
    b.wait_text("#server-state", "running");
    b.click("#migrate-to option[value='node-b']");
    b.click("#action-migrate");
    b.wait_text("#op-state", "succeeded");
    b.wait_text("#facts", "node-b");
    assert_eq!(admin.json(&["vm", "show", "web-1"])["node"], "node-b");

    // Delete: asks first, with the focus on Cancel; Escape (the keyboard) keeps the server, confirming
    // deletes it.
    b.press("#action-delete", ENTER);
    b.wait_text("#confirm-text", "Delete server web-1?");
    assert_eq!(b.focused(), "confirm-cancel");
    b.press("#confirm-cancel", ESCAPE);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(admin.json(&["vm", "show", "web-1"])["state"], "RUNNING");
    b.click("#action-delete");
    b.wait_text("#confirm-text", "Delete server web-1?");
    b.click("#confirm-ok");
    b.wait_text("#server-state", "deleted");
    b.wait_text("#op-state", "succeeded");
    assert_eq!(admin.json(&["vm", "show", "web-1"])["state"], "DELETED");
}
