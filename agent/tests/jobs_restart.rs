//! The journal across restarts: an engine killed (SIGKILL) in the middle of a wipe, in a child process; the
//! reopened engine lists the job INTERRUPTED with the target's first MiB zeroed, and keys stay idempotent.
//! An engine killed in the middle of a snapshot leaves its unfinished blob in the store; the reopened engine
//! removes it and the store is as it was.

mod jobs_support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gridforge_agent::jobs::JobEngine;
use gridforge_proto::v1::{JobState, error::Code};
use jobs_support::*;

/// The state directory the child engine uses (set only for the child).
const CHILD_DIR: &str = "GRIDFORGE_JOBS_TEST_CHILD_DIR";
/// The same, for the child that is killed in the middle of a snapshot.
const SNAPSHOT_CHILD_DIR: &str = "GRIDFORGE_JOBS_TEST_SNAPSHOT_CHILD_DIR";

/// Kills and reaps the child however the test ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Follow a job through the engine API (no server) to its final event.
fn watch_blocking(engine: &JobEngine, id: &str) -> Vec<gridforge_proto::v1::JobEvent> {
    let mut rx = engine.watch(id, 0).unwrap();
    let mut events = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        events.push(ev);
    }
    events
}

/// The child's part (when the test binary is started again with `CHILD_DIR` set): starts a long random wipe,
/// says so on stdout once it has written something, and waits to be killed.
fn child_engine(dir: &Path) -> ! {
    let config = config_in(dir);
    let engine = JobEngine::open(&config, None).unwrap();
    let disk = config.jobs.devices[0].join("big.img");
    let job = engine.submit(wipe_request("killed", &disk, "random"), "child").unwrap();
    report_running_and_wait(&engine, &job.id)
}

/// Prints "RUNNING <id>" once the job has done some of its work, then waits to be killed.
fn report_running_and_wait(engine: &JobEngine, id: &str) -> ! {
    let mut rx = engine.watch(id, 0).unwrap();
    while let Some(ev) = rx.blocking_recv() {
        if ev.bytes_done > 0 {
            println!("RUNNING {id}");
            break;
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn killed_engine_leaves_the_job_interrupted_and_its_target_safe() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        child_engine(Path::new(&dir));
    }
    let node = Node::new();
    let disk = node.sparse_disk("big.img", 64 << 30);
    let (mut child, id) = start_child(
        "killed_engine_leaves_the_job_interrupted_and_its_target_safe",
        CHILD_DIR,
        node.dir.path(),
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert_ne!(head(&disk, MIB as usize), vec![0u8; MIB as usize], "the random pass wrote the head");

    let engine = node.open();
    let job = engine.get(&id).expect("the job is still listed after the restart");
    assert_eq!(job.state(), JobState::Interrupted);
    let error = job_error(&job);
    assert_eq!(error.code(), Code::Interrupted);
    assert!(error.message.contains("restarted"), "{}", error.message);
    assert_eq!(error.step, "wipe");
    assert!(job.finished.is_some());
    assert_eq!(head(&disk, MIB as usize), vec![0u8; MIB as usize], "the target's first MiB is zeroed");

    let events = watch_blocking(&engine, &id);
    assert_eq!(events.first().unwrap().seq, 0);
    assert_eq!(events.last().unwrap().state(), JobState::Interrupted, "{events:?}");
    assert!(events.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    // The key still names that job; a new key may use the (now free) target.
    let same = engine.submit(wipe_request("killed", &disk, "zero"), "local").unwrap();
    assert_eq!(same.id, id);
    // (Shrunk first: zeroing a file allocates its range, and 64 GiB may not fit.)
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(16 * MIB).unwrap();
    let again = engine.submit(wipe_request("retry", &disk, "zero"), "local").unwrap();
    assert_ne!(again.id, id);
    assert_eq!(watch_blocking(&engine, &again.id).last().unwrap().state(), JobState::Succeeded);
}

/// Starts `test` of this binary again as the child engine in `dir` (with `env` set to it) and returns the
/// child with the id of the job it reports running.
fn start_child(test: &str, env: &str, dir: &Path) -> (ChildGuard, String) {
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture"])
            .env(env, dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    let id = stdout
        .lines()
        .map_while(Result::ok)
        // The harness prints "test <name> ... " on the same line first.
        .find_map(|line| line.split_once("RUNNING ").map(|(_, id)| id.trim().to_string()))
        .expect("the child engine reports its running job");
    (child, id)
}

/// A config with a snapshot store and its signing key, under `dir`.
fn snapshot_config(dir: &Path) -> gridforge_agent::config::Config {
    let mut config = config_in(dir);
    config.images.snapshot_store = dir.join("snapshots");
    config.images.snapshot_signing_key = dir.join("snapshots.key");
    config
}

fn temp_blobs(store: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.join("blobs/sha256"))
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.retain(|n| n.starts_with(".add-"));
    names
}

#[test]
fn killed_snapshot_leaves_no_temp_blob_after_the_restart() {
    const TEST: &str = "killed_snapshot_leaves_no_temp_blob_after_the_restart";
    if let Some(dir) = std::env::var_os(SNAPSHOT_CHILD_DIR) {
        let config = snapshot_config(Path::new(&dir));
        let engine = JobEngine::open(&config, None).unwrap();
        let disk = config.jobs.devices[0].join("big.img");
        let req = gridforge_proto::v1::SubmitJobRequest {
            idempotency_key: "snap".into(),
            job: Some(gridforge_proto::v1::submit_job_request::Job::Snapshot(
                gridforge_proto::v1::SnapshotJob {
                    target: device(&disk),
                    image_name: "golden".into(),
                    image_version: "1".into(),
                    notes: String::new(),
                },
            )),
            ..Default::default()
        };
        let job = engine.submit(req, "child").unwrap();
        report_running_and_wait(&engine, &job.id);
    }
    let mut node = Node::new();
    node.config = snapshot_config(node.dir.path());
    gridforge_agent::image::sign::keygen(&node.config.images.snapshot_signing_key).unwrap();
    // Long enough to be read for a while: 64 GiB, sparse, with bytes that do not compress away at its head.
    let disk = node.sparse_disk("big.img", 64 << 30);
    let noise: Vec<u8> = (0..(32 * MIB as usize)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::OpenOptions::new().write(true).open(&disk).and_then(|mut f| f.write_all(&noise)).unwrap();
    let store = node.config.images.snapshot_store.clone();

    let (mut child, id) = start_child(TEST, SNAPSHOT_CHILD_DIR, node.dir.path());
    let left = temp_blobs(&store);
    assert_eq!(left.len(), 1, "the capture writes one temp blob: {left:?}");
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert_eq!(temp_blobs(&store), left, "killed, the capture leaves its temp blob behind");

    let engine = node.open();
    assert_eq!(temp_blobs(&store), Vec::<String>::new(), "the reopened engine removed the unfinished blob");
    let blobs: Vec<_> = std::fs::read_dir(store.join("blobs/sha256")).unwrap().collect();
    assert!(blobs.is_empty(), "nothing else was published: {blobs:?}");
    assert!(!store.join("index.json").exists(), "no index was written");
    let job = engine.get(&id).expect("the job is still listed after the restart");
    assert_eq!(job.state(), JobState::Interrupted);
}

#[test]
fn reopened_journal_keeps_jobs_keys_and_events() {
    let node = Node::new();
    let disk = node.sparse_disk("f.img", 4 * MIB);
    let (id, events) = {
        let engine = node.open();
        let job = engine.submit(wipe_request("durable", &disk, "zero"), "local").unwrap();
        let events = watch_blocking(&engine, &job.id);
        assert_eq!(events.last().unwrap().state(), JobState::Succeeded);
        engine.shutdown(Duration::from_secs(10));
        (job.id, events)
    };
    let engine = node.open();
    let job = engine.get(&id).unwrap();
    assert_eq!(job.state(), JobState::Succeeded);
    assert_eq!(engine.submit(wipe_request("durable", &disk, "zero"), "local").unwrap().id, id);
    assert_eq!(watch_blocking(&engine, &id), events, "the journal replays the same events");
    assert_eq!(engine.list(&Default::default()).len(), 1);
}

#[test]
fn finished_jobs_past_retention_are_purged_on_open() {
    let mut node = Node::new();
    let disk = node.sparse_disk("g.img", 4 * MIB);
    let id = {
        let engine = node.open();
        let job = engine.submit(wipe_request("old", &disk, "zero"), "local").unwrap();
        watch_blocking(&engine, &job.id);
        engine.shutdown(Duration::from_secs(10));
        job.id
    };
    node.config.jobs.retention_hours = 0;
    let engine = node.open();
    assert!(engine.get(&id).is_none(), "a finished job past retention is forgotten");
    let fresh = engine.submit(wipe_request("old", &disk, "zero"), "local").unwrap();
    assert_ne!(fresh.id, id, "its key is free again");
}

#[test]
fn shutdown_interrupts_running_jobs_and_refuses_new_ones() {
    let node = Node::new();
    let disk = node.sparse_disk("h.img", 64 << 30);
    let other = node.sparse_disk("i.img", 4 * MIB);
    let engine = node.open();
    let job = engine.submit(wipe_request("long", &disk, "random"), "local").unwrap();
    let mut rx = engine.watch(&job.id, 0).unwrap();
    while let Some(ev) = rx.blocking_recv() {
        if ev.bytes_done > 0 {
            break;
        }
    }
    engine.shutdown(Duration::from_secs(30));
    let job = engine.get(&job.id).unwrap();
    assert_eq!(job.state(), JobState::Interrupted);
    assert_eq!(job_error(&job).code(), Code::Interrupted);
    let refused = engine.submit(wipe_request("late", &other, "zero"), "local").unwrap_err();
    assert!(refused.to_string().contains("shutting down"), "{refused}");
}
