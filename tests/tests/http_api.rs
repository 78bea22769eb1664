//! The HTTP/JSON API over TLS with curl, against a coordinator and two agents: every method, bearer tokens
//! and client certificates, a tenant-scoped token, server-sent events, and every kind of bad input, each
//! refused with one error body and nothing done.

use gridforge_tests::coordinator::{ADMIN, VIEWER};
use gridforge_tests::grid::{Grid, Shape};
use gridforge_tests::http::{Answer, Credential, HttpClient};
use gridforge_tests::images::vm_spec;
use serde_json::{Value, json};

/// The refusal is `status` with the error body of gRPC code `code`, and nothing else in it.
fn refused(a: &Answer, status: u16, code: &str) -> String {
    assert_eq!(a.status, status, "{a}");
    let body = a.body.as_object().unwrap_or_else(|| panic!("not an error body: {a}"));
    let mut keys: Vec<&str> = body.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "status"], "{a}");
    assert_eq!(body["code"], code, "{a}");
    assert_eq!(body["status"], status, "{a}");
    body["message"].as_str().unwrap().to_string()
}

fn finished(ev: &Value) -> bool {
    ["SUCCEEDED", "FAILED"].contains(&ev["snapshot"]["state"].as_str().unwrap_or(""))
}

/// Follows the operation's events to its end; the last event's operation.
fn watch(http: &HttpClient, id: &str) -> Value {
    let (events, names) = http.events("WatchOperation", &json!({"id": id}), finished);
    assert!(names.is_empty(), "error events: {names:?} {events:?}");
    assert_eq!(events[0]["operation"], id, "{events:?}");
    let last = events.last().unwrap();
    assert!(finished(last), "the stream ended before the operation: {events:?}");
    last["snapshot"].clone()
}

fn succeeded(http: &HttpClient, op: &Value) -> Value {
    let done = watch(http, op["id"].as_str().unwrap_or_else(|| panic!("no operation: {op}")));
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    done
}

fn names(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| x["name"].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn every_method_over_http_with_tokens_certificates_and_refusals() {
    let grid = Grid::with_coordinator(2, Default::default());
    grid.enroll("node-a", Shape { vcpus: 8, memory_mib: 4096 }, &[]);
    let c = grid.coordinator.as_ref().unwrap();
    let ca = grid.pki.ca();
    let cert = |name: &str| Credential::Certificate(grid.pki.cert(name), grid.pki.key(name));
    let anonymous = HttpClient::new(c, ca.clone(), Credential::None);
    let admin_cert = HttpClient::new(c, ca.clone(), cert(ADMIN));
    let viewer = HttpClient::new(c, ca.clone(), cert(VIEWER));

    // No credential, a token nobody issued, a header that is not a bearer token: 401, before anything.
    let m = refused(&anonymous.post("ListNodes", &json!({})), 401, "UNAUTHENTICATED");
    assert!(m.contains("no client certificate and no `Authorization: Bearer TOKEN`"), "{m}");
    let forged = HttpClient::new(c, ca.clone(), Credential::Token("gft_forged".into()));
    refused(&forged.post("ListNodes", &json!({})), 401, "UNAUTHENTICATED");

    // CreateToken with the admin's certificate; the token then works alone, and its hash is never shown.
    let created = admin_cert.ok("CreateToken", &json!({"name": "script", "role": "admin"}));
    assert_eq!(created["user"]["name"], "token:script", "{created}");
    let token = created["token"].as_str().unwrap().to_string();
    let admin = HttpClient::new(c, ca.clone(), Credential::Token(token.clone()));
    let users = admin.ok("ListUsers", &json!({}));
    assert!(names(&users["users"]).contains(&"token:script".to_string()), "{users}");
    assert!(!users.to_string().contains("tokenSha256"), "{users}");

    // Every method, as the served document lists them: no credential, malformed JSON, an unknown field and a
    // wrong type are each refused with the one body, before the method runs.
    let doc = admin.get("/v1/openapi.json").body;
    let methods: Vec<String> =
        doc["paths"].as_object().unwrap().keys().map(|p| p.trim_start_matches("/v1/").to_string()).collect();
    assert_eq!(methods.len(), 39, "{methods:?}");
    for m in &methods {
        refused(&anonymous.post(m, &json!({})), 401, "UNAUTHENTICATED");
        let said = refused(&admin.post_raw(m, "{\"name\": "), 400, "INVALID_ARGUMENT");
        assert!(said.starts_with("request body: "), "{m}: {said}");
        let said = refused(&admin.post(m, &json!({"bogus": 1})), 400, "INVALID_ARGUMENT");
        assert!(said.contains("unknown field `bogus`"), "{m}: {said}");
        let said = refused(&admin.post_raw(m, "[]"), 400, "INVALID_ARGUMENT");
        assert!(said.contains("invalid type: sequence"), "{m}: {said}");
    }
    assert_eq!(names(&admin.ok("ListNodes", &json!({}))["nodes"]), ["node-a"], "a node changed on bad input");

    // Nodes: AddNode over HTTP; a second add of the name is a conflict.
    let b = grid.agents.iter().find(|a| a.name == "node-b").unwrap();
    let node_b = json!({"name": "node-b", "address": b.address(), "datacenter": "dc2"});
    assert_eq!(admin.ok("AddNode", &node_b)["datacenter"], "dc2");
    refused(&admin.post("AddNode", &node_b), 409, "ALREADY_EXISTS");
    assert_eq!(names(&admin.ok("ListNodes", &json!({}))["nodes"]), ["node-a", "node-b"]);
    assert_eq!(names(&admin.ok("ListNodes", &json!({"datacenter": "dc2"}))["nodes"]), ["node-b"]);
    assert_eq!(admin.ok("GetNode", &json!({"name": "node-a"}))["state"], "READY");
    assert_eq!(admin.ok("CordonNode", &json!({"name": "node-b"}))["cordoned"], true);
    assert_eq!(admin.ok("GetNode", &json!({"name": "node-b"}))["cordoned"], true);
    assert!(admin.ok("UncordonNode", &json!({"name": "node-b"}))["cordoned"].is_null(), "uncordoned");
    let m = refused(&admin.post("FenceNode", &json!({"name": "node-b"})), 400, "FAILED_PRECONDITION");
    assert!(m.contains("not LOST"), "{m}");
    refused(&admin.post("ConfirmFenced", &json!({"name": "node-b"})), 400, "FAILED_PRECONDITION");
    let drain = admin.ok("DrainNode", &json!({"name": "node-b"}));
    succeeded(&admin, &drain);
    assert_eq!(admin.ok("GetNode", &json!({"name": "node-b"}))["cordoned"], true);
    admin.ok("UncordonNode", &json!({"name": "node-b"}));
    assert_eq!(admin.ok("CoordinatorStatus", &json!({}))["store"], "embedded");

    // Tenants, a tier, a network; a tenant-scoped token from gridctl.
    assert_eq!(admin.ok("PutTenant", &json!({"name": "acme", "quota": {"vcpus": 4}}))["quota"]["vcpus"], 4);
    admin.ok("PutTenant", &json!({"name": "globex"}));
    assert_eq!(names(&admin.ok("ListTenants", &json!({}))["tenants"]), ["acme", "globex"]);
    let group = json!({"group": {"tenant": "acme", "name": "web", "template": vm_spec("unused", 1, 64, 64)}});
    assert_eq!(admin.ok("PutGroup", &group)["name"], "web");
    assert_eq!(admin.ok("GetGroup", &json!({"tenant": "acme", "name": "web"}))["group"]["name"], "web");
    assert_eq!(names(&admin.ok("GetTenant", &json!({"name": "acme"}))["groups"]), ["web"]);
    let net = admin.ok("PutNetwork", &json!({"tenant": "acme", "name": "back"}));
    assert!(net["vlanId"].as_u64().is_some_and(|id| id >= 100), "{net}");
    assert_eq!(names(&admin.ok("ListNetworks", &json!({"tenant": "acme"}))["networks"]), ["back"]);
    admin.ok("RemoveNetwork", &json!({"tenant": "acme", "name": "back"}));
    assert_eq!(admin.ok("ListNetworks", &json!({})), json!({}), "no networks left");
    assert!(admin.ok("ListDecisions", &json!({"plan": true})).is_object());
    let out = grid.admin().run(&["token", "create", "acme-web", "--role", "operator", "--tenant", "acme"]);
    assert!(out.success(), "{}", out.describe());
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(printed["user"]["tenant"], "acme", "{printed}");
    let acme = HttpClient::new(c, ca.clone(), Credential::Token(printed["token"].as_str().unwrap().into()));

    // Bad input: each refused with the one body, and no VM and no agent job comes of any.
    let spec = vm_spec("web-1", 1, 64, 64);
    let bad = [
        ("{\"spec\": ", "request body: EOF while parsing"),
        ("[1, 2]", "request body: invalid type: sequence"),
        (&json!({"spec": spec, "bogus": 1}).to_string(), "request body: unknown field `bogus`"),
        (&json!({"spec": {"name": "web-1", "machine": {"vcpus": "many"}}}).to_string(), "request body: "),
        (&json!({"spec": spec, "dryRun": "yes"}).to_string(), "request body: invalid type: string \"yes\""),
    ];
    for (body, says) in bad {
        let m = refused(&acme.post_raw("CreateVm", body), 400, "INVALID_ARGUMENT");
        assert!(m.starts_with(says), "{body}: {m}");
    }
    refused(&anonymous.post("CreateVm", &json!({"spec": spec})), 401, "UNAUTHENTICATED");
    let m = refused(&viewer.post("CreateVm", &json!({"spec": spec})), 403, "PERMISSION_DENIED");
    assert!(m.contains("viewer is viewer; vm create needs operator"), "{m}");
    let m =
        refused(&acme.post("CreateVm", &json!({"spec": spec, "tenant": "globex"})), 403, "PERMISSION_DENIED");
    assert!(m.contains("scoped to tenant acme"), "{m}");
    refused(&acme.post("CordonNode", &json!({"name": "node-a"})), 403, "PERMISSION_DENIED");
    refused(&acme.post("GetTenant", &json!({"name": "globex"})), 404, "NOT_FOUND");
    refused(&admin.post("NoSuchMethod", &json!({})), 404, "NOT_FOUND");
    // Another site's page in a browser holding the certificate: refused; the panel's own origin is not.
    let body = json!({"name": "node-a"}).to_string();
    let m = refused(
        &admin_cert.post_with("CordonNode", "Origin: https://evil.example", &body),
        403,
        "PERMISSION_DENIED",
    );
    assert!(m.contains("evil.example"), "{m}");
    let own = format!("Origin: {}", admin.base);
    assert_eq!(admin_cert.post_with("GetNode", &own, &body).status, 200);
    assert!(
        admin.ok("GetNode", &json!({"name": "node-a"}))["cordoned"].is_null(),
        "cordoned by another site"
    );
    refused(&admin.get("/v1/ListNodes"), 405, "UNIMPLEMENTED");
    assert_eq!(admin.ok("ListVms", &json!({"all": true})), json!({}), "a VM came of bad input");
    let jobs: usize = grid.agents.iter().map(|a| a.jobs().len()).sum();
    assert_eq!(jobs, 0, "an agent job came of bad input");

    // A VM of the tier: dry run, create, its progress as events, then reads.
    let request = json!({"spec": spec, "group": "web"});
    let dry = acme.ok("CreateVm", &json!({"spec": spec, "dryRun": true}));
    assert!(dry["operation"].is_null() && dry["explanation"]["chosen"].is_string(), "{dry}");
    let created = acme.ok("CreateVm", &request);
    let done = succeeded(&acme, &created["operation"]);
    assert_eq!(done["kind"], "CREATE_VM");
    assert_eq!(done["requestedBy"], "token:acme-web");
    let vm = acme.ok("GetVm", &json!({"name": "web-1"}));
    assert_eq!(
        (vm["state"].as_str(), vm["tenant"].as_str(), vm["group"].as_str()),
        (Some("RUNNING"), Some("acme"), Some("web"))
    );
    let (first, _) = acme.events("WatchVm", &json!({"name": "web-1"}), |_| true);
    assert_eq!(first[0]["state"], "RUNNING", "{first:?}");
    assert_eq!(names(&acme.ok("ListVms", &json!({}))["vms"]), ["web-1"]);
    assert!(
        acme.ok("ExplainVm", &json!({"name": "web-1"}))["summary"]
            .as_str()
            .unwrap()
            .starts_with("web-1 is on")
    );
    let ops = acme.ok("ListOperations", &json!({"vm": "web-1"}));
    assert_eq!(ops["operations"][0]["id"], created["operation"]["id"], "{ops}");
    assert_eq!(acme.ok("GetOperation", &json!({"id": created["operation"]["id"]}))["state"], "SUCCEEDED");

    // Another tenant's VM is, to the scoped token, not there.
    let other = admin.ok("CreateVm", &json!({"spec": vm_spec("globex-1", 1, 64, 64), "tenant": "globex"}));
    succeeded(&admin, &other["operation"]);
    refused(&acme.post("GetVm", &json!({"name": "globex-1"})), 404, "NOT_FOUND");
    refused(&acme.post("DeleteVm", &json!({"name": "globex-1"})), 404, "NOT_FOUND");
    refused(&acme.post("WatchVm", &json!({"name": "globex-1"})), 404, "NOT_FOUND");
    // A VM's own thresholds: refused on a group's member and on another tenant's VM, set on its own.
    let policy = json!({"cpuUpPercent": 80, "cpuDownPercent": 20, "maxVcpus": 4});
    let m = refused(
        &acme.post("SetVmScaling", &json!({"name": "web-1", "scaling": policy})),
        400,
        "FAILED_PRECONDITION",
    );
    assert!(m.contains("acme/web"), "{m}");
    refused(&acme.post("SetVmScaling", &json!({"name": "globex-1", "scaling": policy})), 404, "NOT_FOUND");
    let vm = admin.ok("SetVmScaling", &json!({"name": "globex-1", "scaling": policy}));
    assert_eq!(
        (vm["scaling"]["vertical"].clone(), vm["scaling"]["maxVcpus"].clone()),
        (json!(true), json!(4)),
        "{vm}"
    );
    assert_eq!(names(&acme.ok("ListVms", &json!({}))["vms"]), ["web-1"]);

    // Lifecycle.
    succeeded(&acme, &acme.ok("ControlVm", &json!({"name": "web-1", "action": "STOP", "graceSeconds": 1})));
    assert_eq!(acme.ok("GetVm", &json!({"name": "web-1"}))["state"], "STOPPED");
    succeeded(&acme, &acme.ok("ControlVm", &json!({"name": "web-1", "action": "START"})));
    assert_eq!(acme.ok("GetVm", &json!({"name": "web-1"}))["state"], "RUNNING");
    let m =
        refused(&acme.post("ResizeVm", &json!({"name": "web-1", "vcpus": 2})), 400, "FAILED_PRECONDITION");
    assert!(m.contains("restart"), "{m}");
    refused(&acme.post("SnapshotVm", &json!({"name": "nope"})), 404, "NOT_FOUND");
    refused(&acme.post("MigrateVm", &json!({"name": "nope"})), 404, "NOT_FOUND");
    let moved = succeeded(&admin, &admin.ok("MigrateVm", &json!({"name": "globex-1", "cold": true})));
    assert_eq!(moved["kind"], "MIGRATE_VM");
    let globex = admin.ok("GetVm", &json!({"name": "globex-1"}));
    assert_ne!(globex["node"], other["operation"]["node"], "{globex}");

    // Users.
    admin.ok("AddUser", &json!({"name": "bob", "role": "viewer"}));
    assert!(names(&admin.ok("ListUsers", &json!({}))["users"]).contains(&"bob".to_string()));
    assert_eq!(admin.ok("RemoveUser", &json!({"name": "bob"}))["removed"]["name"], "bob");
    let m = refused(
        &admin.post("AddUser", &json!({"name": "token:x", "role": "viewer"})),
        400,
        "INVALID_ARGUMENT",
    );
    assert!(m.contains("tokens'"), "{m}");

    // Delete; a removed token no longer works.
    succeeded(&acme, &acme.ok("DeleteVm", &json!({"name": "web-1"})));
    succeeded(&admin, &admin.ok("DeleteVm", &json!({"name": "globex-1"})));
    assert_eq!(acme.ok("GetVm", &json!({"name": "web-1"}))["state"], "DELETED");
    assert_eq!(admin.ok("RemoveGroup", &json!({"tenant": "acme", "name": "web"}))["name"], "web");
    assert_eq!(admin.ok("RemoveTenant", &json!({"name": "globex"}))["name"], "globex");
    assert_eq!(admin.ok("RemoveNode", &json!({"name": "node-b"}))["node"]["name"], "node-b");
    admin.ok("RemoveUser", &json!({"name": "token:acme-web"}));
    refused(&acme.post("ListVms", &json!({})), 401, "UNAUTHENTICATED");

    // The document served is the one checked in.
    let served = admin.get("/v1/openapi.json");
    let checked_in: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(served.body, checked_in);
    assert!(served.body["paths"]["/v1/CreateVm"].is_object());
}
