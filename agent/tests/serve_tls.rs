//! `gridforge-agent serve` as a child process with mutual TLS from `gridforge-agent pki`: a wipe job end to
//! end, health, reflection, metrics; clients without a trusted certificate refused; bad requests answered
//! with clear statuses while the daemon keeps serving.

mod jobs_support;
mod serve_support;

use gridforge_proto::v1::{
    CancelJobRequest, ControlJob, DeleteJob, GetJobRequest, JobState, ProvisionJob, SubmitJobRequest,
    WatchJobRequest, control_job, job::Outcome, submit_job_request,
};
use jobs_support::{get, head, wait_for_progress, watch_to_end, wipe_request};
use serve_support::*;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;

/// One reflection request and its answer, as `grpcurl list` and `grpcurl describe` send them.
async fn reflect(
    node: &Node,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::server_reflection_response::MessageResponse {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    let tls = node.pki.client("ops");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&tls.ca).unwrap()))
        .identity(Identity::from_pem(std::fs::read(&tls.cert).unwrap(), std::fs::read(&tls.key).unwrap()));
    let channel =
        Endpoint::from_shared(node.endpoint()).unwrap().tls_config(tls).unwrap().connect().await.unwrap();
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(request) };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.unwrap().expect("a reflection response");
    resp.message_response.expect("a reflection answer")
}

/// The services the reflection service lists (as `grpcurl list` shows them).
async fn reflected_services(node: &Node) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    match reflect(node, MessageRequest::ListServices(String::new())).await {
        MessageResponse::ListServicesResponse(list) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection response: {other:?}"),
    }
}

/// The names of the files (the one defining `symbol` and what it imports) reflection serves for it, as
/// `grpcurl describe` needs them.
async fn reflected_files(node: &Node, symbol: &str) -> Vec<String> {
    use prost::Message;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    match reflect(node, MessageRequest::FileContainingSymbol(symbol.to_string())).await {
        MessageResponse::FileDescriptorResponse(files) => files
            .file_descriptor_proto
            .iter()
            .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
            .flat_map(|f| std::iter::once(f.name().to_string()).chain(f.dependency))
            .collect(),
        other => panic!("unexpected reflection response: {other:?}"),
    }
}

/// A metric's value from Prometheus text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_wipe_job_health_reflection_and_metrics() {
    let node = Node::new("");
    let daemon = node.start();
    let disk = node.sparse_disk("one.img", MIB);
    std::fs::write(&disk, vec![0x5Au8; MIB as usize]).unwrap();

    assert_eq!(health(&node, "").await, ServingStatus::Serving);
    assert_eq!(health(&node, "gridforge.v1.Agent").await, ServingStatus::Serving);
    let services = reflected_services(&node).await;
    assert!(services.iter().any(|s| s == "gridforge.v1.Agent"), "{services:?}");
    assert!(services.iter().any(|s| s == "grpc.health.v1.Health"), "{services:?}");
    let files = reflected_files(&node, "gridforge.v1.Agent").await;
    assert!(files.iter().any(|f| f == "gridforge/v1/agent.proto"), "{files:?}");
    let imports = reflected_files(&node, "google.protobuf.Timestamp").await;
    assert!(imports.iter().any(|f| f == "google/protobuf/timestamp.proto"), "imports resolve: {imports:?}");

    let mut client = node.client().await;
    let job = client.submit_job(wipe_request("wipe-one", &disk, "zero-write")).await.unwrap().into_inner();
    let events = watch_to_end(&mut client, &job.id).await;
    assert_eq!(events.last().unwrap().state(), JobState::Succeeded, "{events:?}");
    assert!(events.iter().any(|e| e.step == "wipe" && e.bytes_done == MIB), "{events:?}");
    assert!(head(&disk, MIB as usize).iter().all(|b| *b == 0), "the file is zeroed");

    // The signed report names the client certificate's CN as the operator, and verifies with the stock
    // command against the agent's public key.
    let job = get(&mut client, &job.id).await;
    let Some(Outcome::Wipe(result)) = &job.outcome else { panic!("no wipe result: {job:?}") };
    let report: serde_json::Value = serde_json::from_str(&result.report_json).unwrap();
    assert_eq!(report["operator"], "ops", "{report}");
    let report_file = node.dir.path().join("report.json");
    std::fs::write(&report_file, &result.report_json).unwrap();
    let public = node.dir.path().join("state/report-signing.key.pub");
    let out =
        agent_ok(&["report", "verify", report_file.to_str().unwrap(), "--key", public.to_str().unwrap()]);
    assert!(out.contains("signature valid"), "{out}");

    let (status, text) = node.http_get("/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(metric(&text, r#"gridforge_agent_jobs{kind="wipe",state="succeeded"}"#), 1.0);
    assert_eq!(metric(&text, r#"gridforge_agent_jobs{kind="wipe",state="failed"}"#), 0.0);
    assert!(metric(&text, "gridforge_agent_bytes_written_total") >= MIB as f64, "{text}");
    assert_eq!(metric(&text, r#"gridforge_agent_job_duration_seconds_count{kind="wipe"}"#), 1.0);
    assert_eq!(
        metric(
            &text,
            &format!(r#"gridforge_agent_info{{version="{}",node="test-node"}}"#, env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );
    let (status, _) = node.http_get("/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // The log is JSON lines (structured logs).
    drop(client);
    let log = daemon.log_text();
    let first = log.lines().next().expect("a log line");
    let line: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(line.get("level").is_some(), "{first}");
    assert!(log.contains("job succeeded"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_trusted_certificate_are_refused() {
    let node = Node::new("");
    let daemon = node.start();
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    let ca = std::fs::read(node.pki.ca()).unwrap();

    // TLS that trusts the agent but presents no certificate: the handshake is refused.
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
    let refused = async {
        let channel =
            Endpoint::from_shared(node.endpoint()).unwrap().tls_config(tls).unwrap().connect().await?;
        let mut c = gridforge_proto::v1::agent_client::AgentClient::new(channel);
        c.get_job(GetJobRequest { job_id: "j-x".into() })
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    };
    let err = refused.await.expect_err("a client without a certificate is refused");
    let text = gridforge_common::error_chain(err.as_ref());
    assert!(!text.contains("NotFound"), "refused before any call is served: {text}");

    // A certificate from another CA (the client trusts the agent's CA, so only the server can refuse).
    let foreign = gridforge_common::client::ClientTls {
        ca: node.pki.ca(),
        cert: other_pki.cert("ops"),
        key: other_pki.key("ops"),
        domain: None,
    };
    let err = async {
        let mut c = gridforge_common::client::connect(&node.endpoint(), Some(&foreign)).await?;
        c.get_job(GetJobRequest { job_id: "j-x".into() })
            .await
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error>)?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await
    .expect_err("a certificate from another CA is refused");
    let text = gridforge_common::error_chain(err.as_ref());
    assert!(!text.contains("NotFound"), "refused before any call is served: {text}");

    // The same refusals as openssl sees them: the server ends the handshake with an alert.
    let s_client = |cert: Option<(&std::path::Path, &std::path::Path)>| {
        let mut cmd = std::process::Command::new("timeout");
        cmd.args([
            "20",
            "openssl",
            "s_client",
            "-connect",
            &node.grpc.to_string(),
            "-alpn",
            "h2",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(node.pki.ca());
        if let Some((cert, key)) = cert {
            cmd.arg("-cert").arg(cert).arg("-key").arg(key);
        }
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout)
    };
    let text = s_client(None);
    assert!(text.contains("alert certificate required"), "openssl s_client without a certificate:\n{text}");
    let text = s_client(Some((&other_pki.cert("ops"), &other_pki.key("ops"))));
    assert!(text.contains("SSL alert number"), "openssl s_client with a foreign certificate:\n{text}");

    // Plaintext gRPC gets nothing either.
    let plain = gridforge_common::client::connect(&format!("http://{}", node.grpc), None).await;
    if let Ok(mut c) = plain {
        assert!(c.get_job(GetJobRequest { job_id: "j-x".into() }).await.is_err());
    }

    // And the daemon still serves a trusted client.
    let mut client = node.client().await;
    let err = client.get_job(GetJobRequest { job_id: "j-none".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    drop(daemon);
}

fn huge_provision() -> SubmitJobRequest {
    let spec = serde_json::json!({"name": "vm", "image": {"name": "x", "version": "1"}, "disk": {"size_mib": 64},
        "customize": {"firstboot": ["x".repeat(128 << 10)]}});
    SubmitJobRequest {
        idempotency_key: "huge".into(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob {
            spec: Some(serde_json::from_value(spec).unwrap()),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_statuses_and_the_daemon_keeps_serving() {
    let node = Node::new("max_request_bytes = 65536");
    let _daemon = node.start();
    let mut client = node.client().await;
    let big = node.sparse_disk("big.img", 64 << 30);
    let small = node.sparse_disk("small.img", MIB);

    let still_serving = |node: &Node| {
        let endpoint = node.endpoint();
        let tls = node.pki.client("ops");
        async move {
            let mut c = gridforge_common::client::connect(&endpoint, Some(&tls)).await.expect("reconnect");
            c.list_jobs(gridforge_proto::v1::ListJobsRequest::default())
                .await
                .expect("ListJobs after a bad request");
        }
    };

    for (what, err) in [
        ("get", client.get_job(GetJobRequest { job_id: "j-unknown".into() }).await.unwrap_err()),
        (
            "cancel",
            client
                .cancel_job(CancelJobRequest { job_id: "j-unknown".into(), ..Default::default() })
                .await
                .unwrap_err(),
        ),
        (
            "watch",
            client.watch_job(WatchJobRequest { job_id: "j-unknown".into(), from_seq: 0 }).await.unwrap_err(),
        ),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
        assert!(err.message().contains("j-unknown"), "{what}: {}", err.message());
    }
    still_serving(&node).await;

    let err = client.submit_job(huge_provision()).await.unwrap_err();
    assert!(matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted), "{err:?}");
    still_serving(&node).await;

    let slow = client.submit_job(wipe_request("slow", &big, "random")).await.unwrap().into_inner();
    wait_for_progress(&mut client, &slow.id).await;
    let busy = client.submit_job(wipe_request("again", &big, "zero")).await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains(&slow.id), "{}", busy.message());
    still_serving(&node).await;
    client.cancel_job(CancelJobRequest { job_id: slow.id.clone(), ..Default::default() }).await.unwrap();
    assert_eq!(watch_to_end(&mut client, &slow.id).await.last().unwrap().state(), JobState::Cancelled);

    let done = client.submit_job(wipe_request("small", &small, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &done.id).await.last().unwrap().state(), JobState::Succeeded);
    let err = client
        .cancel_job(CancelJobRequest { job_id: done.id.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("SUCCEEDED"), "{}", err.message());
    still_serving(&node).await;
}

#[test]
fn missing_or_broken_certificates_stop_the_daemon_with_the_file_named() {
    let node = Node::new("");
    std::fs::remove_file(node.pki.key("agent")).unwrap();
    let out = agent(&["serve", "--config", node.config.to_str().unwrap(), "--log-format", "text"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(node.pki.key("agent").to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("tls.key"), "{stderr}");

    std::fs::write(node.pki.key("agent"), "not a key\n").unwrap();
    std::fs::write(node.pki.ca(), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let out = agent(&["serve", "--config", node.config.to_str().unwrap(), "--log-format", "text"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(node.pki.ca().to_str().unwrap()), "{stderr}");

    // A key that does not belong to the certificate.
    let node2 = Node::new("");
    std::fs::copy(node2.pki.key("ops"), node2.pki.key("agent")).unwrap();
    let out = agent(&["serve", "--config", node2.config.to_str().unwrap(), "--log-format", "text"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(node2.pki.cert("agent").to_str().unwrap()), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_libvirt_down_the_daemon_serves_and_hypervisor_jobs_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("qemu+unix:///system?socket={}/no-libvirtd.sock", dir.path().display());
    let node = Node::with_libvirt(&uri, "");
    let daemon = node.start();
    let mut client = node.client().await;
    assert_eq!(health(&node, "gridforge.v1.Agent").await, ServingStatus::Serving);

    // A Delete needs the domain's disk at submission: refused UNAVAILABLE, naming the connection.
    let delete = SubmitJobRequest {
        idempotency_key: "delete-vm".into(),
        job: Some(submit_job_request::Job::Delete(DeleteJob { domain: "vm1".into(), ..Default::default() })),
        ..Default::default()
    };
    let err = client.submit_job(delete).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no-libvirtd.sock"), "names the connection: {}", err.message());

    // A Control job is queued, and fails with the hypervisor unavailable.
    let control = SubmitJobRequest {
        idempotency_key: "start-vm".into(),
        job: Some(submit_job_request::Job::Control(ControlJob {
            domain: "vm1".into(),
            action: control_job::Action::Start as i32,
            ..Default::default()
        })),
        ..Default::default()
    };
    let job = client.submit_job(control).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &job.id).await.last().unwrap().state(), JobState::Failed);
    let job = get(&mut client, &job.id).await;
    let Some(Outcome::Error(e)) = &job.outcome else { panic!("{job:?}") };
    assert_eq!(e.code(), gridforge_proto::v1::error::Code::Hypervisor, "{e:?}");
    assert!(e.message.contains("unavailable"), "{e:?}");

    // Disk jobs still run.
    let disk = node.sparse_disk("d.img", MIB);
    let job = client.submit_job(wipe_request("disk", &disk, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &job.id).await.last().unwrap().state(), JobState::Succeeded);
    assert!(daemon.log_text().contains("libvirt is not reachable"), "{}", daemon.log_text());
}

#[tokio::test(flavor = "multi_thread")]
async fn insecure_mode_serves_plaintext_with_a_loud_warning() {
    let node = Node::new("");
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, text.replace("[tls]\n", "[tls]\ninsecure = true\n")).unwrap();
    let daemon = node.start();
    let endpoint = format!("http://{}", node.grpc);
    let mut client = gridforge_common::client::connect(&endpoint, None).await.expect("plaintext connect");
    let disk = node.sparse_disk("p.img", MIB);
    let job = client.submit_job(wipe_request("plain", &disk, "zero")).await.unwrap().into_inner();
    assert_eq!(watch_to_end(&mut client, &job.id).await.last().unwrap().state(), JobState::Succeeded);
    let job = get(&mut client, &job.id).await;
    let Some(Outcome::Wipe(result)) = &job.outcome else { panic!("{job:?}") };
    let report: serde_json::Value = serde_json::from_str(&result.report_json).unwrap();
    assert_eq!(report["operator"], "local", "no certificate, no name: {report}");
    let log = daemon.log_text();
    assert!(log.contains("\"level\":\"WARN\"") && log.contains("TLS IS DISABLED"), "{log}");
    let out = agent(&["job", "list", "--insecure", "--server", &node.grpc.to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&job.id), "{out:?}");
}
