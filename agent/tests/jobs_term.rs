//! Fencing of a deposed coordinator by its leader term, against the real daemon (`gridforge-agent serve` over
//! mTLS): jobs and cancels from a lower term than the highest taken are refused before anything happens, and
//! the highest term survives a SIGKILL and restart, in the leader term file beside the journal.

mod jobs_support;
mod serve_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    CancelJobRequest, DiagnosticsReport, DiagnosticsRequest, JobState, ListJobsRequest, SubmitJobRequest,
};
use jobs_support::{MIB, get, head, wait_for_progress, watch_to_end, wipe_request};
use serve_support::{BIN, Daemon, Node, agent};
use tonic::Code;
use tonic::transport::Channel;

fn wipe(key: &str, disk: &Path, method: &str, leader_term: u64) -> SubmitJobRequest {
    SubmitJobRequest { leader_term, ..wipe_request(key, disk, method) }
}

fn cancel(job_id: &str, leader_term: u64) -> CancelJobRequest {
    CancelJobRequest { job_id: job_id.to_string(), leader_term }
}

/// A disk whose first MiB is 0xA5, to see whether anything touched it.
fn marked_disk(node: &Node, name: &str) -> std::path::PathBuf {
    let disk = node.sparse_disk(name, 4 * MIB);
    std::fs::write(&disk, vec![0xA5u8; MIB as usize]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(4 * MIB).unwrap();
    disk
}

async fn succeeds(client: &mut AgentClient<Channel>, req: SubmitJobRequest) -> String {
    let key = req.idempotency_key.clone();
    let job = client.submit_job(req).await.unwrap_or_else(|e| panic!("SubmitJob {key}: {e:?}")).into_inner();
    let events = watch_to_end(client, &job.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded, "{key}: {events:?}");
    job.id
}

/// The status of a request that must be refused as stale: FAILED_PRECONDITION naming both terms.
fn assert_stale(status: &tonic::Status, request: &str, term: u64, highest: u64) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let expected = format!(
        "refused: this {request} comes from coordinator term {term}, but this agent has already taken requests \
         from term {highest} (a newer leader); the sender is no longer the leader"
    );
    assert_eq!(status.message(), expected);
}

async fn keys(client: &mut AgentClient<Channel>) -> Vec<String> {
    let jobs = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    let mut keys: Vec<String> = jobs.into_iter().map(|j| j.idempotency_key).collect();
    keys.sort();
    keys
}

async fn diagnostics(client: &mut AgentClient<Channel>) -> DiagnosticsReport {
    client.diagnostics(DiagnosticsRequest {}).await.expect("Diagnostics").into_inner()
}

fn jobs_check(report: &DiagnosticsReport) -> String {
    report.checks.iter().find(|c| c.name == "jobs").expect("a jobs check").reason.clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_and_cancels_from_older_terms_are_refused_across_a_restart() {
    let node = Node::new("");
    let term_file = node.dir.path().join("state/leader-term");
    let mut daemon = node.start();
    let mut client = node.client().await;
    assert_eq!(diagnostics(&mut client).await.leader_term, 0, "no term before any was sent");

    let first = succeeds(&mut client, wipe("t5-a", &node.sparse_disk("a.img", 4 * MIB), "zero", 5)).await;
    assert_eq!(std::fs::read_to_string(&term_file).unwrap(), "5\n");

    // An older leader's job: refused before anything is recorded or started.
    let untouched = marked_disk(&node, "b.img");
    let stale = client.submit_job(wipe("t3", &untouched, "zero", 3)).await.unwrap_err();
    assert_stale(&stale, "job", 3, 5);
    assert_eq!(keys(&mut client).await, ["t5-a"], "nothing of the refused job is listed");
    // Even a resubmission of a known key, from the older term...
    let resubmitted = client.submit_job(wipe("t5-a", &untouched, "zero", 3)).await.unwrap_err();
    assert_stale(&resubmitted, "job", 3, 5);
    // The current term is still taken, for new jobs and known keys.
    succeeds(&mut client, wipe("t5-b", &node.sparse_disk("c.img", 4 * MIB), "zero", 5)).await;
    let again = client.submit_job(wipe("t5-a", &untouched, "zero", 5)).await.unwrap().into_inner();
    assert_eq!(again.id, first);
    // A known key from a newer term gets its job too, and the newer term is recorded.
    let again = client.submit_job(wipe("t5-a", &untouched, "zero", 6)).await.unwrap().into_inner();
    assert_eq!(again.id, first);
    assert_eq!(std::fs::read_to_string(&term_file).unwrap(), "6\n");

    // A newer term is taken; then the terms before it are refused.
    succeeds(&mut client, wipe("t7-a", &node.sparse_disk("d.img", 4 * MIB), "zero", 7)).await;
    for term in [6, 5, 0] {
        let stale = client.submit_job(wipe(&format!("t{term}-late"), &untouched, "zero", term)).await;
        assert_stale(&stale.unwrap_err(), "job", term, 7);
    }
    assert_eq!(keys(&mut client).await, ["t5-a", "t5-b", "t7-a"]);
    assert_eq!(head(&untouched, MIB as usize), vec![0xA5u8; MIB as usize], "no refused job ran");

    // A cancel from an older term leaves the job running; one from the current term stops it.
    let slow = client
        .submit_job(wipe("t7-slow", &node.sparse_disk("big.img", 64 << 30), "random", 7))
        .await
        .unwrap()
        .into_inner();
    wait_for_progress(&mut client, &slow.id).await;
    let refused = client.cancel_job(cancel(&slow.id, 5)).await.unwrap_err();
    assert_stale(&refused, "cancel request", 5, 7);
    assert_eq!(get(&mut client, &slow.id).await.state(), JobState::Running);
    client.cancel_job(cancel(&slow.id, 7)).await.unwrap();
    assert_eq!(watch_to_end(&mut client, &slow.id).await.last().unwrap().state(), JobState::Cancelled);

    // Reads stay open to anyone, and say which term the agent is at.
    let report = diagnostics(&mut client).await;
    assert_eq!(report.leader_term, 7);
    assert!(jobs_check(&report).contains("coordinator leader term 7"), "{report:#?}");
    let log = daemon.log_text();
    assert!(
        log.lines().any(|l| l.contains("\"WARN\"") && l.contains("this job comes from coordinator term 3")),
        "the refusal is logged at warn: {log}"
    );

    // Killed and started again, the agent still refuses the old leaders.
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    daemon.wait_exit(Duration::from_secs(10));
    drop(client);
    let _daemon = node.start();
    let mut client = node.client().await;
    assert_eq!(diagnostics(&mut client).await.leader_term, 7);
    let stale = client.submit_job(wipe("t5-b", &untouched, "zero", 5)).await.unwrap_err();
    assert_stale(&stale, "job", 5, 7);
    let stale = client.cancel_job(cancel(&slow.id, 6)).await.unwrap_err();
    assert_stale(&stale, "cancel request", 6, 7);
    succeeds(&mut client, wipe("t7-b", &node.sparse_disk("e.img", 4 * MIB), "zero", 7)).await;
    assert_eq!(keys(&mut client).await, ["t5-a", "t5-b", "t7-a", "t7-b", "t7-slow"]);

    // `gridforge-agent diagnose`, beside the daemon, reads the same term.
    let config = node.config.to_str().unwrap();
    let out = agent(&["diagnose", "--config", config, "--json"]);
    let report: DiagnosticsReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(report.leader_term, 7);
    let out = agent(&["diagnose", "--config", config]);
    let text = String::from_utf8_lossy(&out.stdout);
    let jobs = text.lines().find(|l| l.split_whitespace().nth(1) == Some("jobs")).expect("a jobs line");
    assert!(jobs.contains("coordinator leader term 7"), "{text}");
}

#[test]
fn a_corrupt_term_file_stops_the_daemon_at_start_naming_it() {
    let node = Node::new("");
    let state = node.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let term_file = state.join("leader-term");
    std::fs::write(&term_file, "seven\n").unwrap();

    let log = node.dir.path().join("serve.log");
    let child = Command::new(BIN)
        .args(["serve", "--config", node.config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .unwrap();
    let mut daemon = Daemon { child, log };
    let (status, _) = daemon.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{status}");
    let log = daemon.log_text();
    let error = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no error logged: {log}"));
    let message = error["fields"]["message"].as_str().unwrap();
    let expected = format!(
        "the agent stopped with an error: the leader term file {} is corrupt: \"seven\\n\" is not one decimal \
         number",
        term_file.display()
    );
    assert_eq!(message, expected);

    // `diagnose` says so in its jobs check.
    let out = agent(&["diagnose", "--config", node.config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let jobs = text.lines().find(|l| l.split_whitespace().nth(1) == Some("jobs")).expect("a jobs line");
    assert!(jobs.starts_with("WARN"), "{text}");
    assert!(jobs.contains(&term_file.display().to_string()), "{text}");
}

#[test]
fn under_concurrent_submissions_no_job_of_an_older_term_is_taken_after_a_newer_one() {
    let node = jobs_support::Node::new();
    let engine = node.open();
    let disks: Vec<_> = (0..128).map(|i| node.sparse_disk(&format!("d{i}.img"), MIB)).collect();
    // Eight submitters, each with its own terms rising at its own pace.
    std::thread::scope(|s| {
        for (t, chunk) in disks.chunks(16).enumerate() {
            let engine = &engine;
            s.spawn(move || {
                for (i, disk) in chunk.iter().enumerate() {
                    let term = (i * (t + 1) / 4) as u64;
                    match engine.submit(wipe(&format!("k{t}-{i}"), disk, "zero", term), "local") {
                        Ok(_) | Err(gridforge_agent::jobs::SubmitError::StaleTerm(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    let mut jobs = engine.list(&ListJobsRequest::default());
    jobs.reverse();
    let terms: Vec<u64> = jobs.iter().map(|j| j.request.as_ref().unwrap().leader_term).collect();
    assert!(terms.windows(2).all(|w| w[0] <= w[1]), "in the order taken: {terms:?}");
    assert_eq!(engine.leader_term(), *terms.last().unwrap());
    engine.shutdown(Duration::from_secs(10));
}
