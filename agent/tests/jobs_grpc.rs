//! The Agent gRPC service over real tonic on 127.0.0.1, with the job engine on a real redb journal and real
//! file targets.

mod jobs_support;

use gridforge_proto::v1::{
    CancelJobRequest, ControlJob, GetJobRequest, JobKind, JobState, ListJobsRequest, ProvisionJob,
    SubmitJobRequest, VmSpec, WatchJobRequest, error::Code, job::Outcome, submit_job_request,
};
use jobs_support::*;
use tonic::Code as Status;

#[tokio::test(flavor = "multi_thread")]
async fn wipe_of_a_file_succeeds_with_a_signed_report() {
    let node = Node::new();
    let disk = node.sparse_disk("a.img", 8 * MIB);
    std::fs::write(&disk, vec![0xA5u8; MIB as usize]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(8 * MIB).unwrap();
    let engine = node.open();
    let (mut client, _) = serve(engine.clone(), &node.config).await;

    let job = client.submit_job(wipe_request("wipe-a", &disk, "zero-write")).await.unwrap().into_inner();
    assert!(job.id.starts_with("j-"), "{}", job.id);
    assert_eq!(job.kind(), JobKind::Wipe);
    assert_eq!(job.target, std::fs::canonicalize(&disk).unwrap().display().to_string());
    assert!(matches!(job.state(), JobState::Queued | JobState::Running), "{:?}", job.state());

    let events = watch_to_end(&mut client, &job.id).await;
    for (i, ev) in events.iter().enumerate() {
        assert_eq!(ev.seq, i as u64, "events are numbered from 0 without gaps");
        assert_eq!(ev.job_id, job.id);
    }
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded, "{events:?}");
    assert!(events.iter().any(|e| e.step == "wipe" && e.bytes_done == 8 * MIB), "{events:?}");

    // A watch from an offset replays only the rest.
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: job.id.clone(), from_seq: events.len() as u64 - 1 })
        .await
        .unwrap()
        .into_inner();
    let replay = stream.message().await.unwrap().unwrap();
    assert_eq!(replay, *events.last().unwrap());
    assert!(stream.message().await.unwrap().is_none());

    let done = get(&mut client, &job.id).await;
    assert_eq!(done.state(), JobState::Succeeded);
    assert!(done.started.is_some() && done.finished.is_some());
    assert!(
        done.steps.iter().any(|s| s.name == "wipe" && s.state() == JobState::Succeeded),
        "{:?}",
        done.steps
    );
    let Some(Outcome::Wipe(result)) = &done.outcome else { panic!("no wipe outcome: {:?}", done.outcome) };
    assert!(result.verified);
    assert_eq!(result.bytes, 8 * MIB);
    let report = gridforge_agent::wipe::report::verify(&result.report_json, &node.report_key())
        .expect("the report verifies with the agent's report key");
    assert_eq!(report.operator, "local");
    assert_eq!(report.device.size_bytes, 8 * MIB);
    assert_eq!(report.verification.result, "passed");
    assert_eq!(head(&disk, MIB as usize), vec![0u8; MIB as usize]);

    let listed = client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), [job.id.as_str()]);
    let filtered = client
        .list_jobs(ListJobsRequest { states: vec![JobState::Failed as i32], ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(filtered.is_empty());

    let mut metrics = String::new();
    engine.render_metrics(&mut metrics);
    assert!(metrics.contains("# TYPE gridforge_agent_jobs gauge"), "{metrics}");
    assert!(metrics.contains("gridforge_agent_jobs{kind=\"wipe\",state=\"succeeded\"} 1"), "{metrics}");
    assert!(metrics.contains(&format!("gridforge_agent_bytes_written_total {}", 8 * MIB)), "{metrics}");
    assert!(metrics.contains("gridforge_agent_job_duration_seconds_count{kind=\"wipe\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn resubmitting_a_key_returns_the_same_job() {
    let node = Node::new();
    let disk = node.sparse_disk("b.img", 4 * MIB);
    let (mut client, _) = serve(node.open(), &node.config).await;
    let first = client.submit_job(wipe_request("same-key", &disk, "zero")).await.unwrap().into_inner();
    watch_to_end(&mut client, &first.id).await;
    // Even a different request under the same key gets the existing job, unchanged.
    let other = node.sparse_disk("c.img", 4 * MIB);
    let again = client.submit_job(wipe_request("same-key", &other, "random")).await.unwrap().into_inner();
    assert_eq!(again.id, first.id);
    assert_eq!(again.target, first.target);
    assert_eq!(again.state(), JobState::Succeeded);
    assert_eq!(client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_job_per_target_io_limit_and_cancel_of_a_running_wipe() {
    let mut node = Node::new();
    node.config.jobs.max_io_jobs = 1;
    let big = node.sparse_disk("big.img", 64 << 30);
    let small = node.sparse_disk("small.img", 4 * MIB);
    let (mut client, _) = serve(node.open(), &node.config).await;

    let slow = client.submit_job(wipe_request("slow", &big, "random")).await.unwrap().into_inner();
    wait_for_progress(&mut client, &slow.id).await;

    let busy = client.submit_job(wipe_request("second", &big, "zero")).await.unwrap_err();
    assert_eq!(busy.code(), Status::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains(&slow.id), "names the job holding the target: {}", busy.message());
    assert!(busy.message().contains(&slow.target), "names the target: {}", busy.message());

    // Another target waits for the only I/O slot.
    let queued = client.submit_job(wipe_request("other", &small, "zero")).await.unwrap().into_inner();
    assert_eq!(get(&mut client, &queued.id).await.state(), JobState::Queued);

    let cancelling = client
        .cancel_job(CancelJobRequest { job_id: slow.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelling.id, slow.id);
    let events = watch_to_end(&mut client, &slow.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Cancelled, "{events:?}");
    let cancelled = get(&mut client, &slow.id).await;
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert_eq!(job_error(&cancelled).code(), Code::Cancelled);

    let events = watch_to_end(&mut client, &queued.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded, "{events:?}");

    // The target is free again. (Shrunk first: zeroing a file allocates its range, and 64 GiB may not fit.)
    std::fs::OpenOptions::new().write(true).open(&big).unwrap().set_len(16 * MIB).unwrap();
    let third = client.submit_job(wipe_request("third", &big, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &third.id).await.last().unwrap().state(), JobState::Succeeded);

    let finished = client
        .cancel_job(CancelJobRequest { job_id: third.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(finished.code(), Status::FailedPrecondition, "{finished:?}");
    assert!(finished.message().contains("SUCCEEDED"), "{}", finished.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_job_ids_are_not_found() {
    let node = Node::new();
    let (mut client, _) = serve(node.open(), &node.config).await;
    let get = client.get_job(GetJobRequest { job_id: "j-nope".into() }).await.unwrap_err();
    assert_eq!(get.code(), Status::NotFound);
    let cancel = client
        .cancel_job(CancelJobRequest { job_id: "j-nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(cancel.code(), Status::NotFound);
    let watch = client.watch_job(WatchJobRequest { job_id: "j-nope".into(), from_seq: 0 }).await.unwrap_err();
    assert_eq!(watch.code(), Status::NotFound);
    let empty = client.get_job(GetJobRequest { job_id: String::new() }).await.unwrap_err();
    assert_eq!(empty.code(), Status::InvalidArgument);
    assert!(empty.message().starts_with("job_id"), "{}", empty.message());
}

fn provision(key: &str, spec: serde_json::Value) -> SubmitJobRequest {
    let spec: VmSpec = serde_json::from_value(spec).unwrap();
    SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob { spec: Some(spec), target: None })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_name_the_field() {
    let mut node = Node::new();
    node.config.images.store = node.dir.path().join("store").display().to_string();
    node.config.images.insecure_images = true;
    let disk = node.sparse_disk("d.img", 4 * MIB);
    let outside = node.dir.path().join("outside.img");
    std::fs::File::create(&outside).unwrap().set_len(4 * MIB).unwrap();
    let (mut client, _) = serve(node.open(), &node.config).await;

    let cases: Vec<(SubmitJobRequest, Status, &str)> = vec![
        (wipe_request("", &disk, "zero"), Status::InvalidArgument, "idempotency_key:"),
        (wipe_request(&"k".repeat(129), &disk, "zero"), Status::InvalidArgument, "idempotency_key:"),
        (
            SubmitJobRequest { idempotency_key: "no-job".into(), job: None, ..Default::default() },
            Status::InvalidArgument,
            "job:",
        ),
        (wipe_request("outside", &outside, "zero"), Status::InvalidArgument, "wipe.target.device:"),
        (wipe_request("method", &disk, "shred"), Status::InvalidArgument, "wipe.method:"),
        (
            provision("no-name", serde_json::json!({"image": {"name": "x", "version": "1"}, "disk": {}})),
            Status::InvalidArgument,
            "provision.spec.name:",
        ),
        (
            provision(
                "bad-role",
                serde_json::json!({"name": "vm", "image": {"name": "x", "version": "1"},
                    "disk": {"size_mib": 64, "partitions": [{"label": "r", "filesystem": "EXT4"}]}}),
            ),
            Status::InvalidArgument,
            "provision.spec.disk.partitions[0].role:",
        ),
        (
            provision(
                "bad-host",
                serde_json::json!({"name": "vm", "image": {"name": "x", "version": "1"}, "disk": {"size_mib": 64},
                    "customize": {"hostname": "not a host"}}),
            ),
            Status::InvalidArgument,
            "provision.spec.customize.hostname:",
        ),
        (
            // The default target is a pool volume, and this node has no hypervisor.
            provision(
                "no-pool",
                serde_json::json!({"name": "vm", "image": {"name": "x", "version": "1"}, "disk": {}}),
            ),
            Status::Unavailable,
            "provision.target.volume:",
        ),
        (
            SubmitJobRequest {
                idempotency_key: "control".into(),
                job: Some(submit_job_request::Job::Control(ControlJob {
                    domain: "vm".into(),
                    action: 1,
                    grace_seconds: 0,
                    ..Default::default()
                })),
                ..Default::default()
            },
            Status::Unavailable,
            "control:",
        ),
    ];
    for (req, code, prefix) in cases {
        let err = client.submit_job(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().starts_with(prefix), "{prefix} expected in {:?}", err.message());
    }
    assert!(client.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_requests_are_refused_and_the_server_keeps_serving() {
    let mut node = Node::new();
    node.config.jobs.max_request_bytes = 64 << 10;
    let disk = node.sparse_disk("e.img", 4 * MIB);
    let (mut client, _) = serve(node.open(), &node.config).await;
    let huge = provision(
        "huge",
        serde_json::json!({"name": "vm", "image": {"name": "x", "version": "1"}, "disk": {"size_mib": 64},
            "customize": {"firstboot": ["x".repeat(128 << 10)]}}),
    );
    let err = client.submit_job(huge).await.unwrap_err();
    assert_eq!(err.code(), Status::OutOfRange, "{err:?}");
    let job = client.submit_job(wipe_request("after", &disk, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &job.id).await.last().unwrap().state(), JobState::Succeeded);
}
