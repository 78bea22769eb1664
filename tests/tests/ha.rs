//! Several coordinators sharing one grid view in etcd, driven through `gridctl -o json` pointed at any of
//! them, with the agents' own view (ListJobs, Diagnostics, NodeStats) as the oracle: one leader and one term
//! seen from every member, writes sent to a follower taken by the leader, a leader killed or paused replaced
//! within its lease without a VM created twice or an operation lost, and etcd losing one member, then its
//! quorum, then getting it back.
//!
//! Each test has a grid of its own: three agents on libvirt's test driver, a three-member etcd cluster and
//! three coordinators with a lease of a few seconds. The tests time take-overs, so they run one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gridforge_common::client;
use gridforge_proto::v1::coordinator_client::CoordinatorClient;
use gridforge_proto::v1::{CordonNodeRequest, Job};
use gridforge_tests::agent::Agent;
use gridforge_tests::coordinator::{self, Gridctl, Settings, parse_json};
use gridforge_tests::grid::{Grid, Shape, first};
use gridforge_tests::{block_on, wait_until};
use gridforge_tests::{json_str as s, json_u64 as n};
use serde_json::Value;
use tonic::Code;

/// The leader's lease: short, so that a take-over takes seconds.
const LEASE_TTL_SECS: u64 = 3;
const POLL_MS: u64 = 300;
const MEMBERS: [&str; 3] = ["c1", "c2", "c3"];
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
/// Most revisions an idle member's view may trail the store by.
const MAX_LAG: u64 = 10;
/// Longest one `coordinator status` (or a read) may take.
const READ_LIMIT: Duration = Duration::from_secs(10);
/// Longest a write may take to be refused while etcd has no quorum.
const REFUSAL_LIMIT: Duration = Duration::from_secs(15);
/// Longest a `vm create --wait` may take (a VM on the test driver is up in well under a second).
const CREATE_LIMIT: Duration = Duration::from_secs(20);
/// How soon a leader that ran again after its lease ran out must have exited.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

/// The lease running out, the next poll, and two seconds for the election and for gridctl to see it.
fn takeover_limit() -> Duration {
    Duration::from_secs(LEASE_TTL_SECS) + Duration::from_millis(POLL_MS) + Duration::from_secs(2)
}

/// Held for a whole test, grid included: on a small machine, parallel grids would time each other's load.
fn one_grid_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_GRID: Mutex<()> = Mutex::new(());
    ONE_GRID.lock().unwrap_or_else(|p| p.into_inner())
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// Three agents, a three-member etcd cluster, coordinators c1, c2 and c3 on it with a leader elected, and
/// the three nodes enrolled.
fn ha_grid() -> Grid {
    let t = Instant::now();
    let mut grid = Grid::agents(NODES.len());
    grid.start_etcd(3);
    let settings = MEMBERS
        .iter()
        .map(|name| Settings {
            poll_interval_ms: POLL_MS,
            etcd: Some(grid.etcd_store(name, LEASE_TTL_SECS)),
            ..Settings::default()
        })
        .collect();
    grid.start_coordinators(settings);
    agreed(&grid, &MEMBERS, None, Duration::from_secs(30));
    for node in NODES {
        grid.enroll(node, Shape { vcpus: 16, memory_mib: 4096 }, &[]);
    }
    eprintln!("agents, etcd and coordinators up, nodes enrolled: {:.1} s", t.elapsed().as_secs_f64());
    grid
}

/// `gridctl` as the admin against the member `name`.
fn ctl(grid: &Grid, name: &str) -> Gridctl {
    let c = grid.members.iter().find(|c| c.name() == name).unwrap_or_else(|| panic!("no coordinator {name}"));
    c.gridctl(coordinator::ADMIN)
}

/// `gridctl coordinator status` through `ctl`: the response, or what went wrong.
fn status(ctl: &Gridctl) -> Result<Value, String> {
    let out = ctl.run_within(&["coordinator", "status"], READ_LIMIT);
    if out.success() { Ok(parse_json(&out.stdout)) } else { Err(out.describe()) }
}

fn leader(status: &Value) -> &str {
    s(status, "leader")
}

fn term(status: &Value) -> u64 {
    n(status, &["term"])
}

/// Wait until every member of `ask` names the same leader (not `not`) in the same term; the first one's
/// status.
fn agreed(grid: &Grid, ask: &[&str], not: Option<&str>, limit: Duration) -> Value {
    wait_until("the members to agree on a leader", limit, Duration::from_millis(100), || {
        let statuses = ask
            .iter()
            .map(|m| status(&ctl(grid, m)).map_err(|e| format!("{m}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let head = &statuses[0];
        let agree = !leader(head).is_empty()
            && Some(leader(head)) != not
            && term(head) > 0
            && statuses.iter().all(|st| leader(st) == leader(head) && term(st) == term(head));
        if agree { Ok(head.clone()) } else { Err(format!("{statuses:?}")) }
    })
}

/// Poll `ctl`'s status until it names a leader other than `old` in a term above `old_term`.
fn new_leader(ctl: &Gridctl, old: &str, old_term: u64, limit: Duration) -> Value {
    wait_until("a new leader", limit, Duration::from_millis(50), || {
        let st = status(ctl)?;
        let taken = !leader(&st).is_empty() && leader(&st) != old && term(&st) > old_term;
        if taken { Ok(st) } else { Err(st.to_string()) }
    })
}

/// The VMs `vm list` through `ctl` shows: name → (node, state).
fn vms(ctl: &Gridctl) -> BTreeMap<String, (String, String)> {
    let listed = ctl.json(&["vm", "list"]);
    let listed = listed.as_array().cloned().unwrap_or_default();
    let map: BTreeMap<String, (String, String)> = listed
        .iter()
        .map(|v| (s(v, "name").to_string(), (s(v, "node").to_string(), s(v, "state").to_string())))
        .collect();
    assert_eq!(map.len(), listed.len(), "a VM listed twice: {listed:?}");
    map
}

fn names(listed: &str) -> BTreeSet<String> {
    let v = parse_json(listed);
    v.as_array().into_iter().flatten().map(|x| s(x, "name").to_string()).collect()
}

/// `vm create -f SPEC --wait` through `ctl`; the finished operation, which must have succeeded.
fn create(grid: &Grid, ctl: &Gridctl, name: &str, extra: &[&str]) -> Value {
    let spec = grid.spec_file(name, 1, 64, 64);
    let mut args = vec!["vm", "create", "-f", spec.to_str().unwrap(), "--wait"];
    args.extend_from_slice(extra);
    let op = ctl.json_within(&args, CREATE_LIMIT);
    assert_eq!(s(&op, "state"), "SUCCEEDED", "create {name}: {op}");
    op
}

/// `vm create -f SPEC` (no --wait) through `ctl`, tried again while no leader takes writes (gridctl exits 6,
/// UNAVAILABLE), at most `limit`. The operation's id ("" when a try that seemed to fail had been taken: the
/// next one finds the VM there already) and the refusals met on the way.
fn create_retrying(ctl: &Gridctl, spec: &Path, limit: Duration) -> (String, Vec<String>) {
    let start = Instant::now();
    let mut refusals = Vec::new();
    loop {
        let out = ctl.run(&["vm", "create", "-f", spec.to_str().unwrap()]);
        if out.success() {
            return (s(&first(parse_json(&out.stdout)), "id").to_string(), refusals);
        }
        if !refusals.is_empty() && out.status.code() == Some(4) && out.stderr.contains("already") {
            return (String::new(), refusals);
        }
        assert_eq!(
            out.status.code(),
            Some(6),
            "a create refused other than for want of a leader: {}",
            out.describe()
        );
        assert!(start.elapsed() < limit, "no leader took the create within {limit:?}: {}", out.describe());
        refusals.push(out.stderr.trim().to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ops(ctl: &Gridctl) -> Vec<Value> {
    ctl.json(&["op", "list"]).as_array().cloned().unwrap_or_default()
}

fn ended(op: &Value) -> bool {
    matches!(s(op, "state"), "SUCCEEDED" | "FAILED")
}

fn agent<'g>(grid: &'g Grid, name: &str) -> &'g Agent {
    grid.agents.iter().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"))
}

/// Provision jobs for `vm` over all agents.
fn provisions(grid: &Grid, vm: &str) -> usize {
    grid.agents.iter().map(|a| a.provision_jobs(vm).len()).sum()
}

/// The domain `name` as the agent sees it: its state, or None.
fn domain_state(agent: &Agent, name: &str) -> Option<String> {
    agent.stats().vms.into_iter().find(|v| v.name == name).map(|v| v.state)
}

/// The highest leader term the agent has seen, from its Diagnostics report.
fn leader_term(agent: &Agent) -> u64 {
    n(&serde_json::to_value(agent.diagnostics()).expect("the report as JSON"), &["leaderTerm"])
}

/// The term of the leader that submitted `job`, as its request carries it.
fn job_term(job: &Job) -> u64 {
    job.request.as_ref().map_or(0, |r| r.leader_term)
}

/// The agent's jobs, in the order it took them, each carry a term and never one below a job before them;
/// the last one's is `newest`.
fn assert_terms_only_go_up(agent: &Agent, newest: u64) {
    let mut jobs = agent.jobs();
    jobs.sort_by_key(|j| j.created.as_ref().map(|t| (t.seconds, t.nanos)));
    let mut highest = 0;
    for j in &jobs {
        let t = job_term(j);
        assert!(t > 0, "job {} on {} carries no term: {j:?}", j.id, agent.name);
        assert!(t >= highest, "{} took job {} of term {t} after a job of term {highest}", agent.name, j.id);
        highest = t;
    }
    assert_eq!(highest, newest, "the newest job on {} is of the new term", agent.name);
}

/// Every node's allocation is what the VMs listed on it hold.
fn assert_allocations(ctl: &Gridctl) {
    let listed = ctl.json(&["vm", "list"]);
    for node in NODES {
        let held: u64 = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| s(v, "node") == node)
            .map(|v| n(v, &["resources", "memoryMib"]))
            .sum();
        let shown = ctl.json(&["node", "show", node]);
        assert_eq!(n(&shown, &["allocated", "memoryMib"]), held, "{node}'s allocation: {shown}\n{listed}");
    }
}

/// Members whose process runs; one that exited on its own is put in `exits`.
fn live_members(grid: &mut Grid, exits: &mut BTreeMap<String, ExitStatus>) -> Vec<String> {
    for c in &mut grid.members {
        if let Some(status) = c.exited() {
            exits.insert(c.name().to_string(), status);
        }
    }
    grid.members.iter().filter(|c| c.pid().is_some()).map(|c| c.name().to_string()).collect()
}

/// Start again every member that exited on its own (status 1: its lease lost), as a supervisor would.
fn restart_exited(grid: &mut Grid) {
    let mut exits = BTreeMap::new();
    live_members(grid, &mut exits);
    for (name, status) in exits {
        let member = grid.member(&name);
        eprintln!("{name} exited ({status}), started again; its log ends:\n{}", member.log_tail());
        assert_eq!(status.code(), Some(1), "{name} exited with status 1 (its lease lost): {status}");
        member.start_supervised(3);
    }
}

/// Each member: running or not, its status, the end of its log (for a failure message).
fn members_report(grid: &mut Grid) -> String {
    let mut report = String::new();
    for name in MEMBERS {
        let running = grid.member(name).running();
        let st = match running {
            true => status(&ctl(grid, name)).map_or_else(|e| e, |st| st.to_string()),
            false => String::new(),
        };
        let tail = grid.member(name).log_tail();
        report.push_str(&format!("--- {name} (running: {running}) {st}\n{tail}\n"));
    }
    report
}

/// The other follower's view comes to show `shown`, and the old leader, started again as a supervisor would,
/// follows the new leader `new` in its term.
fn others_follow(
    grid: &mut Grid,
    shown: &BTreeMap<String, (String, String)>,
    rest: &[&str],
    old: &str,
    new: &str,
    new_term: u64,
) {
    let other = ctl(grid, rest.iter().find(|m| **m != new).unwrap());
    wait_until("the other follower's view to match", READ_LIMIT, Duration::from_millis(200), || {
        let theirs = vms(&other);
        if theirs == *shown { Ok(()) } else { Err(format!("{theirs:?}")) }
    });
    grid.member(old).start();
    let rejoined = agreed(grid, &MEMBERS, None, Duration::from_secs(15));
    assert_eq!((leader(&rejoined), term(&rejoined)), (new, new_term), "{rejoined}");
}

#[test]
fn every_member_shows_one_leader_and_term_and_a_follower_forwards_writes() {
    let _one = one_grid_at_a_time();
    let grid = ha_grid();
    let head = agreed(&grid, &MEMBERS, None, Duration::from_secs(10));
    let (leader_name, leader_term) = (leader(&head).to_string(), term(&head));
    let addresses: BTreeMap<String, String> =
        grid.members.iter().map(|c| (c.name().to_string(), c.listen.to_string())).collect();
    let leader_address = addresses.get(&leader_name).cloned().expect("the leader is one of the members");

    for name in MEMBERS {
        let st =
            wait_until(&format!("{name}'s view to catch up"), READ_LIMIT, Duration::from_millis(100), || {
                let st = status(&ctl(&grid, name))?;
                if n(&st, &["lag"]) <= MAX_LAG { Ok(st) } else { Err(st.to_string()) }
            });
        eprintln!(
            "{name}: leader {} term {} revision {} applied {} lag {}",
            leader(&st),
            term(&st),
            n(&st, &["storeRevision"]),
            n(&st, &["appliedRevision"]),
            n(&st, &["lag"])
        );
        assert_eq!(s(&st, "store"), "etcd", "{st}");
        assert_eq!(s(&st, "member"), name, "the member that answered: {st}");
        assert_eq!((leader(&st), term(&st)), (leader_name.as_str(), leader_term), "{st}");
        assert_eq!(s(&st, "leaderAddress"), leader_address, "{st}");
        let members = st["members"].as_array().cloned().unwrap_or_default();
        let listed: BTreeMap<String, String> =
            members.iter().map(|m| (s(m, "name").to_string(), s(m, "address").to_string())).collect();
        assert_eq!(listed, addresses, "three members, each at its own address: {st}");
        let leaders: Vec<&str> = members.iter().filter(|m| flag(m, "leader")).map(|m| s(m, "name")).collect();
        assert_eq!(leaders, [leader_name.as_str()], "{st}");
        let (revision, applied) = (n(&st, &["storeRevision"]), n(&st, &["appliedRevision"]));
        assert!(applied > 0 && applied <= revision, "enrollment was written and applied: {st}");
        assert!(!flag(&st, "stale"), "{st}");
    }

    // What an operator reads.
    let follower = MEMBERS.into_iter().find(|m| *m != leader_name).unwrap();
    let fctl = ctl(&grid, follower);
    let table = fctl.run(&["coordinator", "status", "-o", "table"]);
    assert!(table.success(), "{}", table.describe());
    for m in MEMBERS {
        assert!(table.stdout.contains(m), "the table lists {m}:\n{}", table.stdout);
    }
    assert!(table.stdout.contains(&leader_term.to_string()), "the table shows the term:\n{}", table.stdout);

    // A create sent to a follower: the leader takes it and every member then shows the VM.
    let op = create(&grid, &fctl, "via-follower", &[]);
    assert_eq!(s(&op, "requestedBy"), coordinator::ADMIN, "the leader knows who asked: {op}");
    let shown = ctl(&grid, &leader_name).json(&["vm", "show", "via-follower"]);
    let node = s(&shown, "node").to_string();
    assert_eq!(s(&shown, "state"), "RUNNING", "{shown}");
    for name in MEMBERS {
        wait_until(&format!("{name} to show via-follower"), READ_LIMIT, Duration::from_millis(100), || {
            let v = ctl(&grid, name).json(&["vm", "show", "via-follower"]);
            if (s(&v, "node"), s(&v, "state")) == (node.as_str(), "RUNNING") {
                Ok(())
            } else {
                Err(v.to_string())
            }
        });
    }
    assert_eq!(provisions(&grid, "via-follower"), 1, "provisioned once");
    assert_eq!(domain_state(agent(&grid, &node), "via-follower").as_deref(), Some("running"));

    // Asked directly, without gridctl's retry, the follower refuses a write, names the leader, does nothing.
    let (tls, at) = (grid.pki.client(coordinator::ADMIN), addresses[follower].clone());
    let refusal = block_on(async move {
        let channel = client::channel(&at, Some(&tls)).await.expect("connecting to the follower");
        let req = CordonNodeRequest { name: "node-c".into() };
        CoordinatorClient::new(channel).cordon_node(req).await.expect_err("a follower cordoned a node itself")
    });
    assert_eq!(refusal.code(), Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("not the leader") && refusal.message().contains(&leader_address),
        "the refusal names the leader's address: {refusal:?}"
    );
    let lctl = ctl(&grid, &leader_name);
    assert!(!flag(&lctl.json(&["node", "show", "node-c"]), "cordoned"), "the refused cordon did nothing");
    // Through gridctl the same cordon is taken by the leader.
    fctl.json(&["node", "cordon", "node-c"]);
    assert!(flag(&lctl.json(&["node", "show", "node-c"]), "cordoned"));
    fctl.json(&["node", "uncordon", "node-c"]);
}

#[test]
fn a_leader_killed_mid_burst_is_replaced_within_its_lease_and_every_vm_is_created_once() {
    let _one = one_grid_at_a_time();
    let mut grid = ha_grid();
    let before = agreed(&grid, &MEMBERS, None, Duration::from_secs(10));
    let (old, old_term) = (leader(&before).to_string(), term(&before));
    let rest: Vec<&str> = MEMBERS.into_iter().filter(|m| *m != old).collect();
    let names: Vec<String> = (0..10).map(|i| format!("burst-{i:02}")).collect();
    let specs: Vec<PathBuf> = names.iter().map(|name| grid.spec_file(name, 1, 64, 64)).collect();

    // Four creates taken by the leader, then it is killed with them in flight; the other six go to a
    // follower meanwhile, retried while there is no leader, as the take-over is timed.
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let old_ctl = ctl(&grid, &old);
    for (name, spec) in names.iter().zip(&specs).take(4) {
        let op = first(old_ctl.json(&["vm", "create", "-f", spec.to_str().unwrap()]));
        ids.insert(name.clone(), s(&op, "id").to_string());
    }
    let killed = Instant::now();
    grid.member(&old).sigkill();
    let follower = ctl(&grid, rest[0]);
    let (took, after, burst) = std::thread::scope(|scope| {
        let burst = scope.spawn(|| {
            let rest_of_burst = names.iter().zip(&specs).skip(4);
            rest_of_burst
                .map(|(name, spec)| (name.clone(), create_retrying(&follower, spec, Duration::from_secs(30))))
                .collect::<Vec<_>>()
        });
        let after = new_leader(&follower, &old, old_term, takeover_limit() + Duration::from_secs(10));
        let took = killed.elapsed();
        (took, after, burst.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    });
    let (new, new_term) = (leader(&after).to_string(), term(&after));
    eprintln!(
        "leader {old} (term {old_term}) SIGKILLed: {new} leads in term {new_term} after {:.2} s (limit {:.2} s)",
        took.as_secs_f64(),
        takeover_limit().as_secs_f64()
    );
    assert!(took <= takeover_limit(), "the take-over took {took:?}");
    assert!(new_term > old_term, "the term went up: {after}");
    for (name, (id, refusals)) in burst {
        if let Some(r) = refusals.first() {
            eprintln!("{name}: refused {} times before a leader took it, first: {r}", refusals.len());
        }
        if !id.is_empty() {
            ids.insert(name, id);
        }
    }

    // Every create ends, once; the VMs that succeeded were provisioned once each and run where shown.
    let new_ctl = ctl(&grid, &new);
    let creates =
        wait_until("every create to end", Duration::from_secs(60), Duration::from_millis(200), || {
            let creates: Vec<Value> = ops(&new_ctl)
                .into_iter()
                .filter(|o| s(o, "kind") == "CREATE_VM" && s(o, "vm").starts_with("burst-"))
                .collect();
            let done = creates.len() >= names.len() && creates.iter().all(ended);
            let states: Vec<String> =
                creates.iter().map(|o| format!("{} {}", s(o, "vm"), s(o, "state"))).collect();
            if done { Ok(creates) } else { Err(format!("{states:?}")) }
        });
    let shown = vms(&new_ctl);
    let mut succeeded = 0;
    for name in &names {
        let mine: Vec<&Value> = creates.iter().filter(|o| s(o, "vm") == name).collect();
        assert_eq!(mine.len(), 1, "one create operation for {name}: {mine:?}");
        let op = mine[0];
        if let Some(id) = ids.get(name) {
            assert_eq!(s(op, "id"), id, "the operation gridctl was given is the one that ran: {op}");
        }
        let count = provisions(&grid, name);
        if s(op, "state") == "SUCCEEDED" {
            succeeded += 1;
            assert_eq!(count, 1, "{name} provisioned exactly once: {op}");
            let (node, state) = shown.get(name).cloned().unwrap_or_default();
            assert_eq!(state, "RUNNING", "{name}: {shown:?}");
            assert_eq!(
                domain_state(agent(&grid, &node), name).as_deref(),
                Some("running"),
                "{name} on {node}"
            );
        } else {
            assert!(!s(op, "error").is_empty(), "a failed create says why: {op}");
            assert!(count <= 1, "{name} provisioned {count} times");
            assert_ne!(shown.get(name).map(|(_, st)| st.as_str()), Some("RUNNING"), "{name} failed yet runs");
            eprintln!("{name} failed: {}", s(op, "error"));
        }
    }
    eprintln!("{succeeded} of {} creates succeeded", names.len());
    assert!(ops(&new_ctl).iter().all(ended), "nothing left running");
    assert_allocations(&new_ctl);
    others_follow(&mut grid, &shown, &rest, &old, &new, new_term);
}

#[test]
fn a_leader_paused_past_its_lease_does_not_act_and_exits_when_it_runs_again() {
    let _one = one_grid_at_a_time();
    let mut grid = ha_grid();
    let before = agreed(&grid, &MEMBERS, None, Duration::from_secs(10));
    let (old, old_term) = (leader(&before).to_string(), term(&before));
    let rest: Vec<&str> = MEMBERS.into_iter().filter(|m| *m != old).collect();
    let follower = ctl(&grid, rest[0]);

    // Frozen right after taking a create, so that the operation is its own and in flight.
    let spec = grid.spec_file("in-flight", 1, 64, 64);
    let op = first(ctl(&grid, &old).json(&["vm", "create", "-f", spec.to_str().unwrap()]));
    let id = s(&op, "id").to_string();
    grid.member(&old).pause();
    let paused = Instant::now();
    let seen = follower.run(&["op", "show", &id]);
    eprintln!("{old} paused with {id} at: {}", s(&parse_json(&seen.stdout), "state"));
    let after = new_leader(&follower, &old, old_term, takeover_limit() + Duration::from_secs(10));
    let took = paused.elapsed();
    let (new, new_term) = (leader(&after).to_string(), term(&after));
    eprintln!(
        "leader {old} (term {old_term}) SIGSTOPped: {new} leads in term {new_term} after {:.2} s",
        took.as_secs_f64()
    );
    assert!(took <= takeover_limit(), "the take-over took {took:?}");
    assert!(new_term > old_term, "{after}");

    // The new leader finishes the frozen one's operation.
    let new_ctl = ctl(&grid, &new);
    let done = wait_until(
        "the in-flight create to end",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            let op = new_ctl.json(&["op", "show", &id]);
            if ended(&op) { Ok(op) } else { Err(op.to_string()) }
        },
    );
    eprintln!("in-flight create: {} {}", s(&done, "state"), s(&done, "error"));
    match s(&done, "state") {
        "SUCCEEDED" => assert_eq!(provisions(&grid, "in-flight"), 1, "{done}"),
        _ => {
            assert!(!s(&done, "error").is_empty(), "{done}");
            assert!(provisions(&grid, "in-flight") <= 1);
        }
    }

    // A VM on every node through the new leader: each agent has a job of the new term.
    for node in NODES {
        create(&grid, &new_ctl, &format!("new-term-{node}"), &["--node", node]);
    }
    for a in &grid.agents {
        assert_eq!(leader_term(a), new_term, "{} saw the new term", a.name);
    }
    let jobs_before: Vec<BTreeSet<String>> =
        grid.agents.iter().map(|a| a.jobs().into_iter().map(|j| j.id).collect()).collect();

    // Running again, the old leader finds its lease gone and exits, having got nothing done.
    let resumed = Instant::now();
    grid.member(&old).resume();
    let exit = grid.member(&old).wait_exit(EXIT_LIMIT);
    eprintln!("{old} resumed: exited {exit:?} after {:.2} s", resumed.elapsed().as_secs_f64());
    let log = grid.member(&old).log_tail();
    assert_eq!(exit.and_then(|e| e.code()), Some(1), "the old leader exits with status 1: {exit:?}\n{log}");
    assert!(log.to_lowercase().contains("lease"), "its log says that it lost its lease:\n{log}");
    for (a, before) in grid.agents.iter().zip(&jobs_before) {
        assert_eq!(leader_term(a), new_term, "{} still at the new term", a.name);
        let ids: BTreeSet<String> = a.jobs().into_iter().map(|j| j.id).collect();
        assert_eq!(&ids, before, "{} took no job once the old leader ran again", a.name);
        assert_terms_only_go_up(a, new_term);
    }

    // One state, seen alike from both live members.
    assert!(ops(&new_ctl).iter().all(ended), "nothing left running");
    assert_allocations(&new_ctl);
    let shown = vms(&new_ctl);
    for name in shown.keys() {
        assert_eq!(provisions(&grid, name), 1, "{name} provisioned once");
    }
    others_follow(&mut grid, &shown, &rest, &old, &new, new_term);
}

#[test]
fn without_an_etcd_quorum_writes_are_refused_whole_reads_go_stale_and_a_returning_member_heals() {
    let _one = one_grid_at_a_time();
    let mut grid = ha_grid();
    let head = agreed(&grid, &MEMBERS, None, Duration::from_secs(10));
    let follower = MEMBERS.into_iter().find(|m| *m != leader(&head)).unwrap();
    create(&grid, &ctl(&grid, follower), "before-loss", &[]);

    // One etcd member down: the other two keep a quorum (electing an etcd leader first if it led); status
    // and creates work as before.
    grid.etcd().kill(2);
    grid.etcd().wait_healthy();
    agreed(&grid, &MEMBERS, None, Duration::from_secs(10));
    // A member whose watch ran through the killed member follows again through another within seconds.
    wait_until("every member current on two etcd members", READ_LIMIT, Duration::from_millis(100), || {
        for name in MEMBERS {
            let st = status(&ctl(&grid, name)).map_err(|e| format!("{name}: {e}"))?;
            if flag(&st, "stale") {
                return Err(format!("{name}: {st}"));
            }
        }
        Ok(())
    });
    create(&grid, &ctl(&grid, follower), "one-etcd-down", &[]);
    let known: BTreeSet<String> = ["before-loss", "one-etcd-down"].map(String::from).into();
    wait_until("every member to show both VMs", READ_LIMIT, Duration::from_millis(100), || {
        for name in MEMBERS {
            let listed = names(&ctl(&grid, name).run(&["vm", "list"]).stdout);
            if listed != known {
                return Err(format!("{name}: {listed:?}"));
            }
        }
        Ok(())
    });

    // Two down: no quorum. Past a lease and an etcd call's timeout every member knows it (a leader may
    // have exited on its lease); past etcd's election timeout no write can land in the last member's log.
    grid.etcd().kill(1);
    std::thread::sleep(Duration::from_secs(2 * LEASE_TTL_SECS + 2));
    let mut exits = BTreeMap::new();
    let live = live_members(&mut grid, &mut exits);
    eprintln!("without a quorum: {live:?} run, exited: {exits:?}");
    assert!(!live.is_empty(), "some member still serves");
    wait_until("reads marked stale on every live member", READ_LIMIT, Duration::from_millis(200), || {
        for name in &live {
            for args in [["vm", "list"], ["node", "list"]] {
                let out = ctl(&grid, name).run_within(&args, READ_LIMIT);
                if !out.success() || !out.stderr.contains("stale") {
                    return Err(format!("{name} {args:?}: {}", out.describe()));
                }
            }
        }
        Ok(())
    });
    for name in &live {
        let c = ctl(&grid, name);
        let out = c.run_within(&["vm", "list"], READ_LIMIT);
        assert_eq!(names(&out.stdout), known, "{name} answers from its last view: {}", out.describe());
        let out = c.run_within(&["node", "list"], READ_LIMIT);
        assert_eq!(names(&out.stdout), BTreeSet::from(NODES.map(String::from)), "{name}: {}", out.describe());
        let st = status(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            flag(&st, "stale") && !s(&st, "staleReason").is_empty(),
            "{name} says its view is stale: {st}"
        );
        eprintln!("{name}: stale: {}", s(&st, "staleReason"));
    }

    // Writes are refused, naming etcd, within a bound, by every member.
    let spec = grid.spec_file("never-written", 1, 64, 64);
    let create_args = ["vm", "create", "-f", spec.to_str().unwrap()];
    let cordon_args = ["node", "cordon", "node-b"];
    for name in &live {
        for args in [&create_args[..], &cordon_args[..]] {
            let t = Instant::now();
            let out = ctl(&grid, name).run_within(args, 2 * REFUSAL_LIMIT);
            let took = t.elapsed();
            eprintln!("{name} {args:?} without a quorum: {:.1} s: {}", took.as_secs_f64(), out.stderr.trim());
            assert_eq!(out.status.code(), Some(6), "refused as UNAVAILABLE: {}", out.describe());
            // The error itself, not only the stale warning beside it.
            let error: Vec<&str> = out.stderr.lines().filter(|l| !l.contains("warning")).collect();
            assert!(error.iter().any(|l| l.contains("etcd")), "the refusal names etcd: {}", out.describe());
            assert!(took <= REFUSAL_LIMIT, "refused only after {took:?}");
        }
    }

    // A member back: a quorum again. Members that exited are started again, as a supervisor would.
    let t = Instant::now();
    grid.etcd().restart(1);
    grid.etcd().wait_healthy();
    live_members(&mut grid, &mut exits);
    for (name, status) in &exits {
        assert_eq!(status.code(), Some(1), "{name} exited with status 1 (its lease lost): {status}");
        grid.member(name).start_supervised(3);
    }
    let healed = agreed(&grid, &MEMBERS, None, takeover_limit() + Duration::from_secs(15));
    eprintln!(
        "quorum back: {} leads in term {} after {:.1} s",
        leader(&healed),
        term(&healed),
        t.elapsed().as_secs_f64()
    );
    for name in MEMBERS {
        wait_until(&format!("{name}'s view to be current"), READ_LIMIT, Duration::from_millis(200), || {
            let st = status(&ctl(&grid, name))?;
            if !flag(&st, "stale") && n(&st, &["lag"]) <= MAX_LAG { Ok(()) } else { Err(st.to_string()) }
        });
    }

    // Nothing of the refused writes anywhere: not in any member's view, not on an agent, not in etcd.
    for name in MEMBERS {
        let c = ctl(&grid, name);
        let out = c.run(&["vm", "show", "never-written"]);
        assert_eq!(out.status.code(), Some(3), "{name}: no such VM: {}", out.describe());
        assert!(ops(&c).iter().all(|o| s(o, "vm") != "never-written"), "{name}: no operation for it");
        assert!(!flag(&c.json(&["node", "show", "node-b"]), "cordoned"), "{name}: node-b not cordoned");
        assert_eq!(names(&c.run(&["vm", "list"]).stdout), known, "{name}");
    }
    assert_eq!(provisions(&grid, "never-written"), 0);
    let prefix = grid.etcd_prefix();
    let dump = grid.etcd().etcdctl(&["get", &prefix, "--prefix"]);
    assert!(dump.success(), "{}", dump.describe());
    assert!(!dump.stdout.contains("never-written"), "a record of the refused create in etcd");

    // Writes are taken again. While etcd settles, a member may lose its new lease and exit (status 1): the
    // test starts it again, as a supervisor would, and says so.
    let c = ctl(&grid, follower);
    let limit = 2 * takeover_limit() + Duration::from_secs(20);
    let mut last;
    let cordoned = loop {
        restart_exited(&mut grid);
        let out = c.run(&cordon_args);
        match out.status.code() {
            Some(0) => break t.elapsed(),
            Some(6) => last = out.describe(),
            _ => panic!("the cordon failed: {}", out.describe()),
        }
        assert!(
            t.elapsed() < limit,
            "no write taken {limit:?} after the quorum came back; last: {last}\n{}",
            members_report(&mut grid)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("writes taken {:.1} s after the member's restart", cordoned.as_secs_f64());
    assert!(flag(&c.json(&["node", "show", "node-b"]), "cordoned"));
    create(&grid, &c, "after-recovery", &[]);
    c.json(&["node", "uncordon", "node-b"]);
    assert_eq!(provisions(&grid, "after-recovery"), 1);
    assert_allocations(&c);

    grid.etcd().restart(2);
    grid.etcd().wait_healthy();
}
