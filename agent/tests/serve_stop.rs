//! The daemon's lifecycle as systemd sees it: READY=1 once listening, WATCHDOG=1 pings, STOPPING=1 and a
//! graceful stop on SIGTERM that interrupts a long job safely; the journal survives into the next start.

mod jobs_support;
mod serve_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use gridforge_proto::v1::{JobState, ListJobsRequest, job::Outcome};
use jobs_support::{get, head, wait_for_progress, watch_to_end, wipe_request};
use nix::sys::signal::Signal;
use serve_support::*;

/// Grace given to running jobs in these tests (`jobs.shutdown_grace_secs`).
const GRACE_SECS: u64 = 3;

/// Messages received on a notify socket until `until` is among them or `limit` passes.
fn receive_until(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)),
        ))
        .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = msg.lines().any(|l| l == until);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                break;
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    got
}

fn has(messages: &[String], line: &str) -> bool {
    messages.iter().any(|m| m.lines().any(|l| l == line))
}

#[test]
fn notifies_systemd_ready_watchdog_and_stopping() {
    let node = Node::new("");
    let sock_path = node.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut daemon = node.start_with(|cmd| {
        cmd.env("NOTIFY_SOCKET", &sock_path).env("WATCHDOG_USEC", "200000");
    });
    let got = receive_until(&sock, "READY=1", Duration::from_secs(20));
    assert!(has(&got, "READY=1"), "no READY=1: {got:?}\n{}", daemon.log_text());
    assert!(got.iter().any(|m| m.contains(&format!("STATUS=serving on {}", node.grpc))), "{got:?}");
    // Pings at half of WATCHDOG_USEC: several within a second.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        pings += receive_until(&sock, "WATCHDOG=1", Duration::from_millis(500))
            .iter()
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count();
    }
    assert!(pings >= 3, "{pings} watchdog pings in 1 s with WATCHDOG_USEC=200000");

    daemon.signal(Signal::SIGTERM);
    let got = receive_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(has(&got, "STOPPING=1"), "no STOPPING=1: {got:?}");
    let (status, _) = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}\n{}", daemon.log_text());
}

#[test]
fn no_watchdog_pings_when_the_watchdog_is_for_another_process() {
    let node = Node::new("");
    let sock_path = node.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut daemon = node.start_with(|cmd| {
        cmd.env("NOTIFY_SOCKET", &sock_path).env("WATCHDOG_USEC", "200000").env("WATCHDOG_PID", "1");
    });
    let got = receive_until(&sock, "READY=1", Duration::from_secs(20));
    assert!(has(&got, "READY=1"), "{got:?}");
    let got = receive_until(&sock, "WATCHDOG=1", Duration::from_millis(700));
    assert!(!has(&got, "WATCHDOG=1"), "{got:?}");
    daemon.signal(Signal::SIGINT);
    let (status, _) = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_interrupts_a_long_wipe_safely_and_the_journal_survives() {
    let node = Node::new(&format!("shutdown_grace_secs = {GRACE_SECS}"));
    let mut daemon = node.start();
    let disk = node.sparse_disk("long.img", 16 << 30);
    let small = node.sparse_disk("small.img", MIB);
    let mut client = node.client().await;

    let done = client.submit_job(wipe_request("small", &small, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &done.id).await.last().unwrap().state(), JobState::Succeeded);
    let long = client.submit_job(wipe_request("long", &disk, "random")).await.unwrap().into_inner();
    wait_for_progress(&mut client, &long.id).await;

    // A watcher sees the job's end as the daemon stops.
    let mut watcher = node.client().await;
    let watch = tokio::spawn({
        let id = long.id.clone();
        async move { watch_to_end(&mut watcher, &id).await }
    });

    daemon.signal(Signal::SIGTERM);
    let stopping = Instant::now();
    // While the running job has its grace, the agent answers NOT_SERVING and refuses new jobs.
    while health(&node, "").await == ServingStatus::Serving {
        assert!(stopping.elapsed() < Duration::from_secs(GRACE_SECS), "still SERVING after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&node, "gridforge.v1.Agent").await, ServingStatus::NotServing);
    let err = client.submit_job(wipe_request("late", &small, "zero")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("shutting down"), "{}", err.message());
    assert_eq!(get(&mut client, &long.id).await.state(), JobState::Running, "the running job goes on");

    let ((status, _), daemon) = tokio::task::spawn_blocking(move || {
        let exit = daemon.wait_exit(Duration::from_secs(GRACE_SECS + 30));
        (exit, daemon)
    })
    .await
    .unwrap();
    let took = stopping.elapsed();
    assert!(status.success(), "exit status {status}\n{}", daemon.log_text());
    assert!(
        took < Duration::from_secs(GRACE_SECS + 8),
        "stopping took {took:?} with a grace of {GRACE_SECS} s"
    );
    assert!(
        took >= Duration::from_secs(GRACE_SECS) - Duration::from_millis(100),
        "the grace was not given: {took:?}"
    );
    let events = watch.await.unwrap();
    let last = events.last().unwrap();
    assert!(
        matches!(last.state(), JobState::Interrupted | JobState::Cancelled),
        "the watcher saw the job end {:?}: {last:?}",
        last.state()
    );

    // The next start reads the same journal: both jobs are listed, the long one ended safely.
    let daemon = node.start();
    let mut client = node.client().await;
    let jobs = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let job = get(&mut client, &long.id).await;
    assert!(matches!(job.state(), JobState::Interrupted | JobState::Cancelled), "{job:?}");
    let Some(Outcome::Error(e)) = &job.outcome else { panic!("no error outcome: {job:?}") };
    assert!(e.message.contains("stopped"), "{e:?}");
    assert_eq!(get(&mut client, &done.id).await.state(), JobState::Succeeded);
    // The wipe runs from the start of the disk: what it left at the head is no longer the old data, and the
    // target is free for a new job.
    let again = client.submit_job(wipe_request("again", &disk, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &again.id).await.last().unwrap().state(), JobState::Succeeded);
    assert!(head(&disk, MIB as usize).iter().all(|b| *b == 0));
    drop(daemon);
}
