//! Operations against an in-process fake agent: state transitions, allocation release, the per-VM lock,
//! retries against an unreachable agent, and resume after a restart without a second submission.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gridforge_proto::v1::agent_server::{Agent, AgentServer};
use gridforge_proto::v1::{
    CancelJobRequest, CreateVmRequest, DeleteVmRequest, DiagnosticsReport, DiagnosticsRequest, DiskLayout,
    GetJobRequest, ImageRef, Job, JobEvent, JobState, ListJobsRequest, ListJobsResponse, Machine,
    NodeStatsReport, NodeStatsRequest, Partition, ProvisionResult, SubmitJobRequest, WatchJobRequest,
    WipeResult, job::Outcome, partition::Role, submit_job_request::Job as JobReq,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Engine;
use crate::agents::AgentPool;
use crate::config::OpsConfig;
use crate::grid::{Change, Defaults, Node, NodeState, OpKind, OpState, Operation, Resources, Vm, VmState};
use crate::store::{GridStore, GridView, MemoryStore};

/// Jobs by idempotency key; `hold` keeps new jobs RUNNING with an open event stream.
#[derive(Default)]
struct FakeAgent {
    jobs: Mutex<HashMap<String, Job>>,
    submits: Mutex<u32>,
    hold: bool,
}

/// The served handle of a fake agent the test keeps looking at.
struct Fake(Arc<FakeAgent>);

impl std::ops::Deref for Fake {
    type Target = FakeAgent;
    fn deref(&self) -> &FakeAgent {
        &self.0
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Fake {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let req = request.into_inner();
        *self.submits.lock().unwrap() += 1;
        let mut jobs = self.jobs.lock().unwrap();
        if let Some(j) = jobs.get(&req.idempotency_key) {
            return Ok(Response::new(j.clone()));
        }
        let outcome = match req.job {
            Some(JobReq::Provision(_)) => Some(Outcome::Provision(ProvisionResult {
                disk_path: "/pool/x.raw".into(),
                ..Default::default()
            })),
            Some(JobReq::Delete(_)) => Some(Outcome::Wipe(WipeResult {
                report_json: "{\"signed\":true}".into(),
                verified: true,
                bytes: 1,
            })),
            _ => None,
        };
        let job = Job {
            id: format!("j-{}", jobs.len() + 1),
            idempotency_key: req.idempotency_key.clone(),
            state: if self.hold { JobState::Running } else { JobState::Succeeded } as i32,
            outcome: if self.hold { None } else { outcome },
            ..Default::default()
        };
        jobs.insert(req.idempotency_key, job.clone());
        Ok(Response::new(job))
    }

    type WatchJobStream = Events;

    async fn watch_job(&self, _request: Request<WatchJobRequest>) -> Result<Response<Events>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        if self.hold {
            // Keep the stream open for the life of the test.
            std::mem::forget(tx);
        }
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, _r: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Err(Status::unimplemented("cancel"))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        let jobs = self.jobs.lock().unwrap();
        jobs.values().find(|j| j.id == id).cloned().map(Response::new).ok_or_else(|| Status::not_found(id))
    }

    async fn list_jobs(&self, _r: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(ListJobsResponse { jobs: self.jobs.lock().unwrap().values().cloned().collect() }))
    }

    async fn diagnostics(
        &self,
        _r: Request<DiagnosticsRequest>,
    ) -> Result<Response<DiagnosticsReport>, Status> {
        Ok(Response::new(DiagnosticsReport {
            hypervisor_kind: "kvm".into(),
            arch: "x86_64".into(),
            ..Default::default()
        }))
    }

    async fn node_stats(&self, _r: Request<NodeStatsRequest>) -> Result<Response<NodeStatsReport>, Status> {
        Ok(Response::new(NodeStatsReport::default()))
    }

    async fn receive_disk(
        &self,
        _r: Request<tonic::Streaming<gridforge_proto::v1::DiskChunk>>,
    ) -> Result<Response<gridforge_proto::v1::ReceiveDiskResponse>, Status> {
        Err(Status::unimplemented("the fake agent receives no disks"))
    }

    async fn live_migration(
        &self,
        _request: Request<gridforge_proto::v1::LiveMigrationRequest>,
    ) -> Result<Response<gridforge_proto::v1::LiveMigrationResponse>, Status> {
        Err(Status::unimplemented("the fake agent takes no live migrations"))
    }
}

async fn serve(agent: Arc<FakeAgent>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(Fake(agent)))
            .serve_with_incoming(incoming),
    );
    addr.to_string()
}

fn node(address: &str) -> Node {
    Node {
        name: "n1".into(),
        address: address.into(),
        state: NodeState::Ready as i32,
        capacity: Some(Resources { vcpus: 4, memory_mib: 8192, disk_mib: 100_000 }),
        images: vec!["tiny:1".into()],
        ..Default::default()
    }
}

fn spec(name: &str) -> gridforge_proto::v1::VmSpec {
    gridforge_proto::v1::VmSpec {
        name: name.into(),
        image: Some(ImageRef { name: "tiny".into(), version: "1".into() }),
        disk: Some(DiskLayout {
            size_mib: 64,
            partitions: vec![Partition {
                label: "root".into(),
                role: Role::Root as i32,
                filesystem: 2,
                ..Default::default()
            }],
            ..Default::default()
        }),
        machine: Some(Machine { vcpus: 1, memory_mib: 1024, start: true, ..Default::default() }),
        ..Default::default()
    }
}

fn engine(store: Arc<MemoryStore>, attempts: u32) -> Engine {
    let view = GridView::open(Box::new(store), Defaults::default()).unwrap();
    let config = OpsConfig { retry_attempts: attempts, retry_backoff_ms: 10, ..OpsConfig::default() };
    Engine::new(view, AgentPool::new(None, Duration::from_secs(5)), config)
}

async fn finished(e: &Engine, id: &str) -> Operation {
    for _ in 0..500 {
        let op = e.view().read(|s| s.ops.get(id).cloned()).unwrap();
        if crate::grid::is_finished(&op) {
            return op;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("operation {id} did not finish");
}

#[tokio::test]
async fn create_then_delete_moves_states_and_releases_the_allocation() {
    let agent = Arc::new(FakeAgent::default());
    let address = serve(agent.clone()).await;
    let store = Arc::new(MemoryStore::default());
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store.clone(), 3);

    let resp = e
        .create_vm(CreateVmRequest { spec: Some(spec("web1")), ..Default::default() }, "alice")
        .await
        .unwrap();
    let op = resp.operation.unwrap();
    assert_eq!(e.view().read(|s| s.allocated("n1").memory_mib), 1024, "reserved with the operation");
    let op = finished(&e, &op.id).await;
    assert_eq!(op.state(), OpState::Succeeded, "{op:?}");
    assert_eq!(op.steps[0].idempotency_key, format!("{}/provision", op.id));
    assert_eq!(op.steps[0].agent_job_id, "j-1");
    let vm = e.view().read(|s| s.vms.get("web1").cloned()).unwrap();
    assert_eq!(vm.state(), VmState::Running);
    assert!(vm.operation.is_empty(), "lock released");

    let dup = e.create_vm(CreateVmRequest { spec: Some(spec("web1")), ..Default::default() }, "alice").await;
    assert!(matches!(dup, Err(super::OpError::AlreadyExists(_))));

    let del =
        e.delete_vm(DeleteVmRequest { name: "web1".into(), ..Default::default() }, "alice").await.unwrap();
    let del = finished(&e, &del.id).await;
    assert_eq!(del.state(), OpState::Succeeded);
    let vm = e.view().read(|s| s.vms.get("web1").cloned()).unwrap();
    assert_eq!(vm.state(), VmState::Deleted);
    assert_eq!(vm.wipe_report, "{\"signed\":true}");
    assert_eq!(e.view().read(|s| s.allocated("n1")), Resources::default());

    // What the store holds is what the view showed.
    e.view().flushed().await.unwrap();
    let reloaded = engine(store, 3);
    assert_eq!(reloaded.view().read(|s| s.vms.get("web1").map(Vm::state)), Some(VmState::Deleted));
}

#[tokio::test]
async fn an_unreachable_agent_fails_the_create_naming_the_node_and_leaves_no_allocation() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = free.local_addr().unwrap().to_string();
    drop(free);
    let store = Arc::new(MemoryStore::default());
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 2);
    let op = e
        .create_vm(CreateVmRequest { spec: Some(spec("web1")), ..Default::default() }, "alice")
        .await
        .unwrap();
    let op = finished(&e, &op.operation.unwrap().id).await;
    assert_eq!(op.state(), OpState::Failed);
    assert!(op.error.contains("node n1 unreachable after 2 tries"), "{}", op.error);
    assert!(e.view().read(|s| s.vms.is_empty()));
    assert_eq!(e.view().read(|s| s.allocated("n1")), Resources::default());
}

#[tokio::test]
async fn a_busy_vm_refuses_a_second_operation_naming_the_holder() {
    let agent = Arc::new(FakeAgent { hold: true, ..Default::default() });
    let address = serve(agent).await;
    let store = Arc::new(MemoryStore::default());
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    let op = e
        .create_vm(CreateVmRequest { spec: Some(spec("web1")), ..Default::default() }, "alice")
        .await
        .unwrap();
    let id = op.operation.unwrap().id;
    let err =
        e.delete_vm(DeleteVmRequest { name: "web1".into(), ..Default::default() }, "bob").await.unwrap_err();
    assert!(matches!(&err, super::OpError::Precondition(m) if m.contains(&id)), "{err}");
}

#[tokio::test]
async fn resume_after_a_restart_reattaches_to_the_submitted_job() {
    let agent = Arc::new(FakeAgent::default());
    let address = serve(agent.clone()).await;
    // The coordinator stored the create and submitted its job, then died before recording the job id.
    let key = "op-000007/provision".to_string();
    agent.jobs.lock().unwrap().insert(
        key.clone(),
        Job {
            id: "j-already".into(),
            idempotency_key: key.clone(),
            state: JobState::Succeeded as i32,
            ..Default::default()
        },
    );
    let vm = Vm {
        name: "web1".into(),
        node: "n1".into(),
        volume: "web1.raw".into(),
        spec: Some(spec("web1")),
        resources: Some(Resources { vcpus: 1, memory_mib: 1024, disk_mib: 64 }),
        state: VmState::Provisioning as i32,
        operation: "op-000007".into(),
        ..Default::default()
    };
    let op = Operation {
        id: "op-000007".into(),
        kind: OpKind::CreateVm as i32,
        vm: "web1".into(),
        node: "n1".into(),
        state: OpState::Running as i32,
        steps: vec![super::step("provision", "op-000007", "n1")],
        ..Default::default()
    };
    let store = Arc::new(MemoryStore::default());
    store.commit(&[Change::PutNode(node(&address)), Change::PutVm(vm), Change::PutOp(op)]).unwrap();

    let e = engine(store, 3);
    assert_eq!(e.resume(), 1);
    let op = finished(&e, "op-000007").await;
    assert_eq!(op.state(), OpState::Succeeded, "{op:?}");
    assert_eq!(op.steps[0].agent_job_id, "j-already");
    assert_eq!(agent.jobs.lock().unwrap().len(), 1, "provisioned once");
    assert_eq!(e.view().read(|s| s.vms.get("web1").map(Vm::state)), Some(VmState::Running));
    let next = e
        .create_vm(CreateVmRequest { spec: Some(spec("web2")), ..Default::default() }, "alice")
        .await
        .unwrap();
    assert_eq!(next.operation.unwrap().id, "op-000008", "ids go on after the stored ones");
}

#[tokio::test]
async fn disk_jobs_beyond_the_node_limit_wait_queued() {
    let agent = Arc::new(FakeAgent { hold: true, ..Default::default() });
    let address = serve(agent.clone()).await;
    let store = Arc::new(MemoryStore::default());
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let view = GridView::open(Box::new(store), Defaults::default()).unwrap();
    let config = OpsConfig { max_disk_jobs_per_node: 1, ..OpsConfig::default() };
    let e = Engine::new(view, AgentPool::new(None, Duration::from_secs(5)), config);
    let first =
        e.create_vm(CreateVmRequest { spec: Some(spec("a")), ..Default::default() }, "alice").await.unwrap();
    let second =
        e.create_vm(CreateVmRequest { spec: Some(spec("b")), ..Default::default() }, "alice").await.unwrap();
    let (first, second) = (first.operation.unwrap().id, second.operation.unwrap().id);
    let mut states = (OpState::Unspecified, OpState::Unspecified);
    for _ in 0..300 {
        states = e.view().read(|s| (s.ops[&first].state(), s.ops[&second].state()));
        if states == (OpState::Running, OpState::Queued) && *agent.submits.lock().unwrap() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(states, (OpState::Running, OpState::Queued));
    let waiting = e.view().read(|s| s.ops[&second].steps[0].message.clone());
    assert!(waiting.contains("waiting"), "{waiting}");
    assert_eq!(*agent.submits.lock().unwrap(), 1, "the second job is not submitted while the slot is taken");
}

#[tokio::test]
async fn purge_forgets_old_finished_operations_but_each_vms_latest_and_the_unfinished() {
    let store = Arc::new(MemoryStore::default());
    let at = |secs: i64| Some(pbjson_types::Timestamp { seconds: secs, nanos: 0 });
    let op = |id: &str, state: OpState, secs: i64| Operation {
        id: id.into(),
        vm: "web1".into(),
        state: state as i32,
        updated: at(secs),
        ..Default::default()
    };
    let vm = Vm { name: "web1".into(), operation: "op-000003".into(), ..Default::default() };
    store
        .commit(&[
            Change::PutOp(op("op-000001", OpState::Succeeded, 100)),
            Change::PutOp(op("op-000002", OpState::Failed, 100)),
            Change::PutOp(op("op-000003", OpState::Succeeded, 100)),
            Change::PutOp(op("op-000004", OpState::Running, 100)),
            Change::PutOp(op("op-000005", OpState::Succeeded, 5000)),
            Change::PutVm(vm),
        ])
        .unwrap();
    let e = engine(store.clone(), 1);
    let before = std::time::UNIX_EPOCH + Duration::from_secs(1000);
    assert_eq!(e.purge_operations(before, 1).await.unwrap(), 1, "at most the limit per call");
    assert_eq!(e.purge_operations(before, 10).await.unwrap(), 1);
    assert_eq!(e.purge_operations(before, 10).await.unwrap(), 0);
    let kept: Vec<String> = e.view().read(|s| s.ops.keys().cloned().collect());
    assert_eq!(kept, ["op-000003", "op-000004", "op-000005"], "the VM's latest, the running, the recent");
    assert_eq!(store.load().unwrap().ops.len(), 3, "durable");
}

#[tokio::test]
async fn users_are_kept_in_the_grid_view_and_nobody_changes_its_own() {
    let store = Arc::new(MemoryStore::default());
    let e = engine(store.clone(), 1);
    let u = e.add_user("carol", "operator", "alice").await.unwrap();
    assert_eq!((u.role.as_str(), u.added_by.as_str()), ("operator", "alice"));
    assert!(
        matches!(e.add_user("carol", "root", "alice").await, Err(super::OpError::Invalid(m)) if m.contains("root"))
    );
    assert!(matches!(e.add_user("", "viewer", "alice").await, Err(super::OpError::Invalid(_))));
    assert!(matches!(e.add_user("alice", "viewer", "alice").await, Err(super::OpError::Precondition(_))));
    assert!(matches!(e.remove_user("carol", "carol").await, Err(super::OpError::Precondition(_))));
    e.add_user("carol", "viewer", "alice").await.unwrap();
    assert_eq!(store.load().unwrap().users[0].role, "viewer", "a role change is stored");
    e.remove_user("carol", "alice").await.unwrap();
    assert!(matches!(e.remove_user("carol", "alice").await, Err(super::OpError::NotFound(_))));
    assert!(store.load().unwrap().users.is_empty());
}

#[tokio::test]
async fn the_libvirt_actuator_destroys_a_lost_nodes_domain_and_only_then_is_it_fenced() {
    // libvirt's test driver: "test:///default" has one running domain, "test".
    for (domain, fenced) in [("no-such-{node}", false), ("test", true)] {
        let store = Arc::new(MemoryStore::default());
        let mut lost = node("127.0.0.1:1");
        lost.state = NodeState::Lost as i32;
        store.commit(&[Change::PutNode(lost)]).unwrap();
        let view = GridView::open(Box::new(store), Defaults::default()).unwrap();
        let fencing = crate::config::FencingConfig {
            actuator: "libvirt".into(),
            libvirt_uri: "test:///default".into(),
            domain: domain.into(),
            ..Default::default()
        };
        let agents = AgentPool::new(None, Duration::from_secs(5));
        let e = Engine::with_fencing(view, agents, OpsConfig::default(), fencing);
        let op = e.fence_node("n1", "alice").await.unwrap();
        let done = finished(&e, &op.id).await;
        assert_eq!(e.view().read(|s| s.nodes["n1"].fenced), fenced, "{done:?}");
        if fenced {
            assert_eq!(done.state(), OpState::Succeeded, "{done:?}");
            assert!(done.result.contains("domain test destroyed"), "{}", done.result);
        } else {
            assert_eq!(done.state(), OpState::Failed, "{done:?}");
            assert!(
                done.error.contains("no domain no-such-n1") && done.error.contains("stays LOST"),
                "{}",
                done.error
            );
        }
        assert!(e.view().read(|s| s.nodes["n1"].cordoned), "a lost node is cordoned either way");
    }
}
