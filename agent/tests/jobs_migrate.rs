//! Cold migration between two `gridforge-agent serve` daemons on 127.0.0.1, each with its own node
//! certificate from one CA (made by `gridforge-agent pki`) and its own libvirt test driver (a custom
//! `test:///FILE` state with the agent's pool; the source's holds volume and domain `vm1` on a sparse file).
//! MIGRATE_RECEIVE on B and MIGRATE_SEND on A move the disk: B's new volume has the same bytes and stays
//! sparse, B defines the domain, A undefines it, wipes its disk with a report that `gridforge-agent report
//! verify` accepts and frees the volume. Streams with a wrong transfer id, from the wrong certificate, a second
//! stream, a stream whose digest does not match and a stream cut off halfway are refused or fail with nothing
//! defined on B and the disk removed, as are a cancelled and a timed-out receive; a running domain and a
//! receiver whose certificate has another name are not sent to.

mod common;
mod jobs_support;
mod serve_support;

use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gridforge_common::client::connect;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    CancelJobRequest, ControlJob, Customization, DiskChunk, DiskExtent, DiskStreamEnd, DiskStreamStart,
    DiskTarget, JobState, Machine, MigrateReceiveJob, MigrateSendJob, NodeStatsRequest, SubmitJobRequest,
    VmSpec, WatchJobRequest, WipeJob, control_job::Action, disk_chunk, disk_target, error::Code,
    job::Outcome, submit_job_request,
};
use gridforge_testsupport::{AgentConfig, Pki};
use jobs_support::{job_error, run_job};
use serve_support::{BIN, Daemon, MIB, agent_ok, free_port};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code as Status;
use tonic::transport::Channel;

const DISK_BYTES: u64 = 64 * MIB;
const JOB_LIMIT: Duration = Duration::from_secs(20);

/// One agent: its directory, gRPC address and running daemon.
struct Agent {
    root: PathBuf,
    grpc: SocketAddr,
    _daemon: Daemon,
}

impl Agent {
    /// Start an agent named `name` (its certificate's name) whose libvirt is the test driver on `state`.
    fn start(pki: &Pki, root: &Path, name: &str, state: &str) -> Agent {
        Self::start_with(pki, root, name, state, |c| c)
    }

    /// [`Agent::start`] with more configuration.
    fn start_with(
        pki: &Pki,
        root: &Path,
        name: &str,
        state: &str,
        configure: impl FnOnce(AgentConfig) -> AgentConfig,
    ) -> Agent {
        std::fs::create_dir_all(root.join("disks")).unwrap();
        let driver = root.join("libvirt.xml");
        std::fs::write(&driver, state).unwrap();
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = root.join("agent.toml");
        configure(
            AgentConfig::new(name, grpc, root, pki, name)
                .libvirt(&format!("test://{}", driver.display()), "domain_type = \"qemu\"")
                .devices(&[root.join("disks")]),
        )
        .write(&config);
        let log = root.join("serve.log");
        let child = Command::new(BIN)
            .args(["serve", "--config", config.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&grpc, Duration::from_millis(200)).is_err() {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("agent {name} exited ({status}):\n{}", daemon.log_text());
            }
            assert!(Instant::now() < deadline, "agent {name} did not listen:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        Agent { root: root.to_path_buf(), grpc, _daemon: daemon }
    }

    fn disk(&self, name: &str) -> PathBuf {
        self.root.join("disks").join(name)
    }

    /// A client presenting certificate `cert` of `pki`.
    async fn client(&self, pki: &Pki, cert: &str) -> AgentClient<Channel> {
        connect(&format!("https://{}", self.grpc), Some(&pki.client(cert))).await.expect("connecting")
    }
}

/// Libvirt test driver state: the agent's pool `gridforge` in `pool` (the test driver only records its
/// volumes; the files are the test's and the agent's), with volume and domain `vm` (running) when given.
fn driver_state(pool: &Path, vm: Option<&str>) -> String {
    let pool_dir = pool.display();
    let (volume, domain) = match vm {
        None => (String::new(), String::new()),
        Some(vm) => (
            format!("<volume type='file'><name>{vm}.raw</name><capacity>{DISK_BYTES}</capacity></volume>"),
            format!(
                "<domain type='test'><name>{vm}</name><memory>524288</memory><vcpu>1</vcpu>\
                 <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
                 <source file='{pool_dir}/{vm}.raw'/><target dev='vda' bus='virtio'/></disk></devices>\
                 </domain>"
            ),
        ),
    };
    format!(
        "<node>{domain}<pool type='dir'><name>gridforge</name><target><path>{pool_dir}</path></target>\
         {volume}</pool></node>"
    )
}

fn volume(name: &str) -> Option<DiskTarget> {
    Some(DiskTarget { target: Some(disk_target::Target::Volume(name.to_string())) })
}

fn sha256_file(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn device(path: &Path) -> Option<DiskTarget> {
    Some(DiskTarget { target: Some(disk_target::Target::Device(path.display().to_string())) })
}

fn receive_request(key: &str, transfer_id: &str, target: Option<DiskTarget>, vm: &str) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.to_string(),
        job: Some(submit_job_request::Job::MigrateReceive(MigrateReceiveJob {
            transfer_id: transfer_id.to_string(),
            sender: "node-a".to_string(),
            target,
            size_bytes: DISK_BYTES,
            spec: Some(VmSpec {
                name: vm.to_string(),
                machine: Some(Machine { vcpus: 1, memory_mib: 512, ..Default::default() }),
                // The VM's whole spec may come along; its secrets are never kept.
                customize: Some(Customization { root_password: "secret-pw".into(), ..Default::default() }),
                ..Default::default()
            }),
            timeout_seconds: 60,
            live: false,
        })),
        ..Default::default()
    }
}

fn send_request(key: &str, transfer_id: &str, receiver: SocketAddr) -> SubmitJobRequest {
    SubmitJobRequest {
        idempotency_key: key.to_string(),
        job: Some(submit_job_request::Job::MigrateSend(MigrateSendJob {
            domain: "vm1".to_string(),
            target: None,
            transfer_id: transfer_id.to_string(),
            receiver_address: receiver.to_string(),
            receiver: "node-b".to_string(),
            wipe_method: String::new(),
            live: false,
        })),
        ..Default::default()
    }
}

/// Names of the domains an agent's hypervisor has defined (NodeStats lists every one).
async fn domains(client: &mut AgentClient<Channel>) -> Vec<String> {
    let stats = client.node_stats(NodeStatsRequest { sample_ms: 20 }).await.unwrap().into_inner();
    stats.vms.into_iter().map(|v| v.name).collect()
}

/// Follow a job's events until one in `step` (it got there).
async fn wait_for_step(client: &mut AgentClient<Channel>, id: &str, step: &str) {
    let mut stream =
        client.watch_job(WatchJobRequest { job_id: id.to_string(), from_seq: 0 }).await.unwrap().into_inner();
    let wait = async {
        while let Some(ev) = stream.message().await.unwrap() {
            assert_eq!(ev.state(), JobState::Unspecified, "job {id} ended before step {step}: {ev:?}");
            if ev.step == step {
                return;
            }
        }
        panic!("events of {id} ended before step {step}");
    };
    tokio::time::timeout(JOB_LIMIT, wait).await.unwrap_or_else(|_| panic!("{id} never reached {step}"));
}

/// A ReceiveDisk call fed message by message from the test.
struct Stream {
    tx: mpsc::Sender<DiskChunk>,
    call: tokio::task::JoinHandle<
        Result<tonic::Response<gridforge_proto::v1::ReceiveDiskResponse>, tonic::Status>,
    >,
}

fn open_stream(mut client: AgentClient<Channel>) -> Stream {
    let (tx, rx) = mpsc::channel(8);
    let call = tokio::spawn(async move { client.receive_disk(ReceiverStream::new(rx)).await });
    Stream { tx, call }
}

impl Stream {
    async fn push(&self, chunk: disk_chunk::Chunk) {
        self.tx.send(DiskChunk { chunk: Some(chunk) }).await.expect("the call is open");
    }

    async fn answer(self) -> Result<gridforge_proto::v1::ReceiveDiskResponse, tonic::Status> {
        drop(self.tx);
        tokio::time::timeout(JOB_LIMIT, self.call)
            .await
            .expect("ReceiveDisk answers")
            .unwrap()
            .map(|r| r.into_inner())
    }
}

fn start(transfer_id: &str) -> disk_chunk::Chunk {
    disk_chunk::Chunk::Start(DiskStreamStart {
        transfer_id: transfer_id.to_string(),
        size_bytes: DISK_BYTES,
        data_bytes: MIB,
    })
}

fn extent(offset: u64) -> disk_chunk::Chunk {
    disk_chunk::Chunk::Extent(DiskExtent { offset, data: vec![0x5a; MIB as usize] })
}

/// A whole stream to `transfer_id` as certificate `cert`: start, one extent, end with `sha256`.
async fn send_one(agent: &Agent, pki: &Pki, cert: &str, transfer_id: &str, sha256: &str) -> tonic::Status {
    let s = open_stream(agent.client(pki, cert).await);
    s.push(start(transfer_id)).await;
    // The server may refuse at the start and close the call: later messages then find it gone.
    let _ = s.tx.send(DiskChunk { chunk: Some(extent(0)) }).await;
    let end = DiskStreamEnd { sha256: sha256.to_string(), extents: 1, bytes: MIB };
    let _ = s.tx.send(DiskChunk { chunk: Some(disk_chunk::Chunk::End(end)) }).await;
    s.answer().await.expect_err("the stream is refused")
}

/// Stop vm1 at once (a Control job), so it can be migrated cold.
async fn destroy_vm1(client: &mut AgentClient<Channel>) {
    let destroy = SubmitJobRequest {
        idempotency_key: "destroy-vm1".into(),
        job: Some(submit_job_request::Job::Control(ControlJob {
            domain: "vm1".into(),
            action: Action::Destroy as i32,
            ..Default::default()
        })),
        ..Default::default()
    };
    let (job, _) = run_job(client, destroy, JOB_LIMIT).await;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
}

/// A temporary directory with a CA holding certificates for node-a, node-b and ops.
fn two_node_pki() -> (tempfile::TempDir, Pki) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::at(&dir.path().join("pki"));
    let d = pki.dir.to_str().unwrap();
    agent_ok(&["pki", "init", "--dir", d, "--days", "30"]);
    for name in ["node-a", "node-b", "ops"] {
        agent_ok(&["pki", "issue", "--dir", d, "--name", name]);
    }
    (dir, pki)
}

/// Node `name`'s root under `dir` and its pool directory (made).
fn node_dirs(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("pool")).unwrap();
    (root.clone(), root.join("pool"))
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_migration_between_two_agents() {
    let (dir, pki) = two_node_pki();

    // A's disk: 64 MiB with three allocated extents, the rest holes.
    let [(a_root, a_pool), (b_root, b_pool)] = ["a", "b"].map(|n| node_dirs(dir.path(), n));
    let a_disk = a_pool.join("vm1.raw");
    let file = std::fs::File::create(&a_disk).unwrap();
    file.set_len(DISK_BYTES).unwrap();
    let pattern: Vec<u8> = (0..3 * MIB as usize / 2).map(|i| (i * 7 % 251) as u8).collect();
    file.write_all_at(&pattern, 0).unwrap();
    file.write_all_at(b"the middle of the disk", 20 * MIB + 3).unwrap();
    file.write_all_at(&pattern[..4096], DISK_BYTES - 4096).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let original = sha256_file(&a_disk);

    let a = Agent::start(&pki, &a_root, "node-a", &driver_state(&a_pool, Some("vm1")));
    let b = Agent::start(&pki, &b_root, "node-b", &driver_state(&b_pool, None));
    let mut ca = a.client(&pki, "ops").await;
    let mut cb = b.client(&pki, "ops").await;

    // Requests are checked field by field.
    let mut bad = receive_request("bad-id", "short", device(&b.disk("x.img")), "vmx");
    let e = cb.submit_job(bad.clone()).await.unwrap_err();
    assert_eq!(e.code(), Status::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("migrate_receive.transfer_id: "), "{}", e.message());
    if let Some(submit_job_request::Job::MigrateReceive(m)) = &mut bad.job {
        m.transfer_id = "t-0123456789abcdef-x".into();
        m.size_bytes = 1000;
    }
    let e = cb.submit_job(bad).await.unwrap_err();
    assert!(e.message().starts_with("migrate_receive.size_bytes: "), "{}", e.message());
    let mut bad = send_request("bad-addr", "t-0123456789abcdef-x", b.grpc);
    if let Some(submit_job_request::Job::MigrateSend(m)) = &mut bad.job {
        m.receiver_address = "nowhere".into();
    }
    let e = ca.submit_job(bad).await.unwrap_err();
    assert!(e.message().starts_with("migrate_send.receiver_address: "), "{}", e.message());
    let mut bad = send_request("bad-receiver", "t-0123456789abcdef-x", b.grpc);
    if let Some(submit_job_request::Job::MigrateSend(m)) = &mut bad.job {
        m.receiver = "node b".into();
    }
    let e = ca.submit_job(bad).await.unwrap_err();
    assert!(e.message().starts_with("migrate_send.receiver: "), "{}", e.message());

    // A running domain is not migrated.
    let e = ca.submit_job(send_request("send-running", "t-running-0123456789", b.grpc)).await.unwrap_err();
    assert_eq!(e.code(), Status::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("vm1 is running") && e.message().contains("shut off"), "{}", e.message());
    destroy_vm1(&mut ca).await;

    // A receive waiting for its stream: wrong id, wrong certificate, a second stream, a wrong digest.
    let t1 = "t1-digest-mismatch-0001";
    let bad1 = b.disk("bad1.img");
    let r1 = cb.submit_job(receive_request("r1", t1, device(&bad1), "vm-bad1")).await.unwrap().into_inner();
    wait_for_step(&mut cb, &r1.id, "wait").await;
    assert!(bad1.exists(), "the receive allocates its disk first");
    let e = send_one(&b, &pki, "node-a", "t-no-such-transfer-000", "00").await;
    assert_eq!(e.code(), Status::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("no migrate-receive job"), "{}", e.message());
    let e = send_one(&b, &pki, "ops", t1, "00").await;
    assert_eq!(e.code(), Status::PermissionDenied, "{e:?}");
    assert!(e.message().contains("for sender \"node-a\", not \"ops\""), "{}", e.message());
    let first = open_stream(b.client(&pki, "node-a").await);
    first.push(start(t1)).await;
    first.push(extent(0)).await;
    wait_for_step(&mut cb, &r1.id, "receive").await;
    let e = send_one(&b, &pki, "node-a", t1, "00").await;
    assert_eq!(e.code(), Status::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("already has its stream"), "{}", e.message());
    first
        .push(disk_chunk::Chunk::End(DiskStreamEnd { sha256: "0".repeat(64), extents: 1, bytes: MIB }))
        .await;
    let e = first.answer().await.expect_err("a wrong digest is refused");
    assert_eq!(e.code(), Status::DataLoss, "{e:?}");
    assert!(e.message().contains("digest mismatch"), "{}", e.message());
    let (r1, _) = run_job(&mut cb, receive_request("r1", t1, device(&bad1), "vm-bad1"), JOB_LIMIT).await;
    assert_eq!(r1.state(), JobState::Failed);
    assert_eq!(job_error(&r1).code(), Code::DigestMismatch, "{r1:?}");
    assert!(!bad1.exists(), "the failed receive removed the file it created");

    // A stream cut off halfway, into a new volume.
    let t2 = "t2-broken-stream-00002";
    let bad2 = b_pool.join("bad2.raw");
    let r2 =
        cb.submit_job(receive_request("r2", t2, volume("bad2.raw"), "vm-bad2")).await.unwrap().into_inner();
    wait_for_step(&mut cb, &r2.id, "wait").await;
    let cut = open_stream(b.client(&pki, "node-a").await);
    cut.push(start(t2)).await;
    cut.push(extent(0)).await;
    wait_for_step(&mut cb, &r2.id, "receive").await;
    cut.call.abort();
    let (r2, _) = run_job(&mut cb, receive_request("r2", t2, volume("bad2.raw"), "vm-bad2"), JOB_LIMIT).await;
    assert_eq!(r2.state(), JobState::Failed, "{r2:?}");
    assert!(!bad2.exists(), "the failed receive removed the volume it created");
    assert!(domains(&mut cb).await.is_empty(), "nothing was defined on B");

    // A receive that is cancelled, or whose sender never comes, removes its disk too.
    let r4 =
        cb.submit_job(receive_request("r4", "t4-cancelled-00000004", device(&b.disk("c.img")), "vm-c")).await;
    let r4 = r4.unwrap().into_inner();
    wait_for_step(&mut cb, &r4.id, "wait").await;
    cb.cancel_job(CancelJobRequest { job_id: r4.id.clone(), ..Default::default() }).await.unwrap();
    let (r4, _) = run_job(
        &mut cb,
        receive_request("r4", "t4-cancelled-00000004", device(&b.disk("c.img")), "vm-c"),
        JOB_LIMIT,
    )
    .await;
    assert_eq!(r4.state(), JobState::Cancelled, "{r4:?}");
    let mut late = receive_request("r5", "t5-timed-out-00000005", device(&b.disk("t.img")), "vm-t");
    if let Some(submit_job_request::Job::MigrateReceive(m)) = &mut late.job {
        m.timeout_seconds = 1;
    }
    let (r5, _) = run_job(&mut cb, late, JOB_LIMIT).await;
    assert_eq!(r5.state(), JobState::Failed, "{r5:?}");
    assert!(job_error(&r5).message.contains("no stream from node-a arrived within 1 s"), "{r5:?}");
    assert!(!b.disk("c.img").exists() && !b.disk("t.img").exists(), "both disks were removed");

    // The sender checks the receiver's CN: another node's certificate is refused, the source kept.
    let mut wrong = send_request("s-wrong", "t-wrong-receiver-0000", b.grpc);
    if let Some(submit_job_request::Job::MigrateSend(m)) = &mut wrong.job {
        m.receiver = "ops".into();
    }
    let (wrong, _) = run_job(&mut ca, wrong, JOB_LIMIT).await;
    assert_eq!(wrong.state(), JobState::Failed, "{wrong:?}");
    let message = &job_error(&wrong).message;
    assert!(message.contains("connecting to the receiver ops"), "{message}");
    assert!(message.contains("the peer's certificate is for \"node-b\", not \"ops\""), "{message}");
    assert_eq!(sha256_file(&a_disk), original, "the source is untouched");
    // A receiver with no job for the transfer refuses the stream (offered for 10 s); the source is kept.
    let (refused, _) =
        run_job(&mut ca, send_request("s-refused", "t-nobody-waits-00000", b.grpc), JOB_LIMIT).await;
    assert_eq!(refused.state(), JobState::Failed, "{refused:?}");
    let message = &job_error(&refused).message;
    assert!(message.contains("the receiver node-b refused the disk (FailedPrecondition)"), "{message}");
    assert!(message.contains("the source on this node is kept"), "{message}");
    assert_eq!(sha256_file(&a_disk), original, "the source is untouched");
    assert_eq!(domains(&mut ca).await, ["vm1"]);

    // The migration.
    let t3 = "t3-migration-vm1-00003";
    // The default target: a new volume "vm1.raw" in B's pool.
    let b_disk = b_pool.join("vm1.raw");
    let receive = cb.submit_job(receive_request("r3", t3, None, "vm1")).await.unwrap().into_inner();
    let again = cb.submit_job(receive_request("r3", t3, None, "vm1")).await.unwrap().into_inner();
    assert_eq!(again.id, receive.id, "the idempotency key returns the same job");
    let e = cb
        .submit_job(receive_request("r3-again", t3, device(&b.disk("other.img")), "vm9"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Status::FailedPrecondition, "{e:?}");
    wait_for_step(&mut cb, &receive.id, "wait").await;
    let (send, send_events) = run_job(&mut ca, send_request("s3", t3, b.grpc), JOB_LIMIT).await;
    assert_eq!(send.state(), JobState::Succeeded, "{send:?}");
    let (receive, _) = run_job(&mut cb, receive_request("r3", t3, None, "vm1"), JOB_LIMIT).await;
    assert_eq!(receive.state(), JobState::Succeeded, "{receive:?}");
    assert!(!format!("{:?}", receive.request).contains("secret-pw"), "{:?}", receive.request);

    let Some(Outcome::MigrateSend(sent)) = &send.outcome else { panic!("{:?}", send.outcome) };
    let Some(Outcome::MigrateReceive(got)) = &receive.outcome else { panic!("{:?}", receive.outcome) };
    assert_eq!((sent.mode.as_str(), got.mode.as_str()), ("cold", "cold"));
    assert_eq!(sent.sha256, got.sha256);
    assert_eq!(sent.extents_sent, 3, "{sent:?}");
    assert_eq!((sent.bytes_sent, sent.extents_sent), (got.bytes_received, got.extents_received));
    assert!(sent.bytes_sent < 4 * MIB, "only allocated extents are sent: {sent:?}");
    assert!(
        send_events
            .iter()
            .any(|e| e.step == "send" && e.bytes_total == sent.bytes_sent && e.bytes_done == e.bytes_total),
        "{send_events:?}"
    );
    assert!(receive.steps.iter().any(|s| s.name == "receive" && s.bytes_done == got.bytes_received));

    // B: the same bytes, still sparse, and the domain.
    assert_eq!(sha256_file(&b_disk), original);
    let meta = std::fs::metadata(&b_disk).unwrap();
    assert_eq!(meta.len(), DISK_BYTES);
    assert!(meta.blocks() * 512 < 8 * MIB, "B's disk stays sparse: {} bytes allocated", meta.blocks() * 512);
    assert_eq!(domains(&mut cb).await, ["vm1"]);

    // A: the domain gone, the disk wiped, the report signed.
    assert!(domains(&mut ca).await.is_empty(), "A undefined vm1");
    let wipe = sent.wipe.as_ref().expect("the send result carries the wipe");
    assert!(wipe.verified);
    let zeros = vec![0u8; 3 * MIB as usize / 2];
    assert_eq!(jobs_support::head(&a_disk, zeros.len()), zeros, "A's disk is wiped");
    let gone = SubmitJobRequest {
        idempotency_key: "wipe-gone".into(),
        job: Some(submit_job_request::Job::Wipe(WipeJob { target: volume("vm1.raw"), ..Default::default() })),
        ..Default::default()
    };
    let e = ca.submit_job(gone).await.unwrap_err();
    assert_eq!(e.code(), Status::NotFound, "A's pool no longer has the volume: {e:?}");
    let report = dir.path().join("report.json");
    std::fs::write(&report, &wipe.report_json).unwrap();
    let key = a_root.join("state/report-signing.key.pub");
    let out = agent_ok(&["report", "verify", report.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(out.contains("signature valid"), "{out}");

    // The transfer is spent.
    let e = send_one(&b, &pki, "node-a", t3, &got.sha256).await;
    assert_eq!(e.code(), Status::FailedPrecondition, "{e:?}");
}

/// A domain whose disk is a qcow2 overlay on a base of A's: the cold migration sends the overlay's raw guest
/// view (what `qemu-img convert` makes of it), so B gets a raw disk of its own and needs no base; A's overlay
/// is wiped and removed, and its base is left as it was, held by no disk.
#[tokio::test(flavor = "multi_thread")]
async fn an_overlay_disk_is_migrated_cold_as_its_raw_guest_view() {
    use gridforge_agent::image::{index::Kind, pack::pack_rootfs, sign};
    let (dir, pki) = two_node_pki();
    let [(a_root, a_pool), (b_root, b_pool)] = ["a", "b"].map(|n| node_dirs(dir.path(), n));

    // A's vm1: a cached provision of a small image onto the pool, cloned as an overlay.
    common::small_rootfs(&dir.path().join("tree"));
    let key_path = dir.path().join("store.key");
    sign::keygen(&key_path).unwrap();
    let key = sign::load_signing_key(&key_path).unwrap();
    let store = dir.path().join("store");
    pack_rootfs(&dir.path().join("tree"), &store, "tiny", "1", Kind::Os, &key, 3).unwrap();
    let public = sign::public_key_path(&key_path);
    let spec = dir.path().join("vm1.json");
    let size_mib = DISK_BYTES / MIB;
    std::fs::write(
        &spec,
        format!(
            r#"{{"name": "vm1", "image": {{"name": "tiny", "version": "1"}}, "provision_mode": "PROVISION_CACHED",
                "disk": {{"size_mib": {size_mib}, "partitions": [{{"label": "root", "role": "ROOT", "filesystem": "EXT4"}}]}},
                "customize": {{"hostname": "vm1"}}}}"#
        ),
    )
    .unwrap();
    let a_disk = a_pool.join("vm1.raw");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    agent_ok(&[
        "provision",
        "--spec",
        &p(&spec),
        "--disk",
        &p(&a_disk),
        "--store",
        &p(&store),
        "--trusted-key",
        &p(&public),
        "--cache",
        &p(&a_root.join("cache")),
        "--work-dir",
        &p(&a_root.join("work")),
        "--bases",
        &p(&a_root.join("bases")),
        "--clone-fallback",
        "overlay",
    ]);
    let info = std::process::Command::new("qemu-img").args(["info", &p(&a_disk)]).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("file format: qcow2"), "{info:?}");
    let view = dir.path().join("view.raw");
    let converted = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", &p(&a_disk), &p(&view)])
        .status()
        .unwrap();
    assert!(converted.success());
    let expected = sha256_file(&view);
    let base = std::fs::read_dir(a_root.join("bases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|e| e.join("disk.raw").is_file())
        .expect("A's base")
        .join("disk.raw");
    let base_digest = sha256_file(&base);

    let a = Agent::start_with(&pki, &a_root, "node-a", &driver_state(&a_pool, Some("vm1")), |c| {
        c.images(&store, &public)
    });
    let b = Agent::start(&pki, &b_root, "node-b", &driver_state(&b_pool, None));
    let mut ca = a.client(&pki, "ops").await;
    let mut cb = b.client(&pki, "ops").await;
    destroy_vm1(&mut ca).await;

    let t = "t-overlay-vm1-000001";
    let receive = cb.submit_job(receive_request("r", t, None, "vm1")).await.unwrap().into_inner();
    wait_for_step(&mut cb, &receive.id, "wait").await;
    let (send, events) = run_job(&mut ca, send_request("s", t, b.grpc), JOB_LIMIT).await;
    assert_eq!(send.state(), JobState::Succeeded, "{send:?}\n{events:#?}");
    assert!(events.iter().any(|e| e.message.contains("is a qcow2 overlay")), "{events:#?}");
    let (receive, _) = run_job(&mut cb, receive_request("r", t, None, "vm1"), JOB_LIMIT).await;
    assert_eq!(receive.state(), JobState::Succeeded, "{receive:?}");

    let b_disk = b_pool.join("vm1.raw");
    assert_eq!(sha256_file(&b_disk), expected, "B holds the overlay's guest view");
    let mut magic = [0u8; 4];
    std::fs::File::open(&b_disk).unwrap().read_exact_at(&mut magic, 0).unwrap();
    assert_ne!(&magic, b"QFI\xfb", "B's disk is raw");
    // (The test driver only records volumes: the wiped file stays.)
    let head = jobs_support::head(&a_disk, 64 * 1024);
    assert!(head.iter().all(|&b| b == 0), "A's overlay was wiped");
    assert_eq!(sha256_file(&base), base_digest, "A's base is unchanged");
    let listing = agent_ok(&["base", "list", "--bases", &p(&a_root.join("bases"))]);
    assert!(listing.contains("0 clone(s)"), "{listing}");
}
