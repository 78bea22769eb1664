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
    NodeStatsReport, NodeStatsRequest, Partition, ProvisionResult, ResizeVmRequest, SubmitJobRequest,
    WatchJobRequest, WipeResult, job::Outcome, partition::Role, submit_job_request::Job as JobReq,
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
    /// Host cores each named domain uses, as NodeStats reports them.
    load: Mutex<HashMap<String, f64>>,
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
            images: vec!["tiny:1".into()],
            bases: vec![gridforge_proto::v1::BaseDisk {
                id: "0123456789abcdef0123456789abcdef".into(),
                images: vec!["tiny:1".into()],
                disk_size_bytes: 96 << 20,
                allocated_bytes: 3 << 20,
                clones: vec!["/pool/vm-1.qcow2".into()],
            }],
            ..Default::default()
        }))
    }

    async fn node_stats(&self, _r: Request<NodeStatsRequest>) -> Result<Response<NodeStatsReport>, Status> {
        let vms = self
            .load
            .lock()
            .unwrap()
            .iter()
            .map(|(name, cores)| gridforge_proto::v1::VmStats {
                name: name.clone(),
                state: "running".into(),
                cpu_cores: *cores,
                // Traffic in proportion, so that a test can tell it came through.
                disk_bytes_per_sec: *cores * 1e6,
                net_bytes_per_sec: *cores * 1e5,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(NodeStatsReport { vms, ..Default::default() }))
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
    let u = e.add_user("carol", "operator", "", "alice").await.unwrap();
    assert_eq!((u.role.as_str(), u.added_by.as_str()), ("operator", "alice"));
    assert!(
        matches!(e.add_user("carol", "root", "", "alice").await, Err(super::OpError::Invalid(m)) if m.contains("root"))
    );
    assert!(matches!(e.add_user("", "viewer", "", "alice").await, Err(super::OpError::Invalid(_))));
    assert!(matches!(e.add_user("alice", "viewer", "", "alice").await, Err(super::OpError::Precondition(_))));
    assert!(matches!(e.remove_user("carol", "carol").await, Err(super::OpError::Precondition(_))));
    e.add_user("carol", "viewer", "", "alice").await.unwrap();
    assert_eq!(store.load().unwrap().users[0].role, "viewer", "a role change is stored");
    e.remove_user("carol", "alice").await.unwrap();
    assert!(matches!(e.remove_user("carol", "alice").await, Err(super::OpError::NotFound(_))));
    assert!(store.load().unwrap().users.is_empty());
}

#[tokio::test]
async fn a_token_is_kept_only_as_its_hash_and_replacing_or_removing_it_revokes_it() {
    let store = Arc::new(MemoryStore::default());
    let e = engine(store.clone(), 1);
    let (user, token) = e.create_token("deploy", "operator", "", "alice").await.unwrap();
    assert_eq!((user.name.as_str(), user.role.as_str()), ("token:deploy", "operator"));
    assert!(user.token_sha256.is_empty(), "the answer carries no hash");
    let stored = store.load().unwrap().users.remove(0);
    assert_eq!(stored.token_sha256.len(), 64, "a SHA-256 in hex is stored");
    assert!(!format!("{stored:?}").contains(&token), "the token itself is stored nowhere");
    assert_eq!(e.token_user(&token).map(|u| u.name), Some("token:deploy".into()));
    assert!(e.token_user("gft_guessed").is_none());
    assert!(e.token_user(&token[..token.len() - 1]).is_none(), "a token is matched whole");

    // A second token of the name replaces the first.
    let (_, second) = e.create_token("deploy", "viewer", "", "alice").await.unwrap();
    assert!(e.token_user(&token).is_none(), "the replaced token still works");
    assert_eq!(e.token_user(&second).map(|u| u.role), Some("viewer".into()));
    assert!(matches!(
        e.add_user("token:deploy", "admin", "", "alice").await,
        Err(super::OpError::Invalid(m)) if m.contains("tokens'")
    ));
    e.remove_user("token:deploy", "alice").await.unwrap();
    assert!(e.token_user(&second).is_none(), "a removed token still works");
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

fn tenant_engine_parts() -> (Arc<FakeAgent>, Arc<MemoryStore>) {
    (Arc::new(FakeAgent::default()), Arc::new(MemoryStore::default()))
}

fn create_req(name: &str, vcpus: u32, tenant: &str, group: &str) -> CreateVmRequest {
    let mut sp = spec(name);
    sp.machine.as_mut().unwrap().vcpus = vcpus;
    CreateVmRequest { spec: Some(sp), tenant: tenant.into(), group: group.into(), ..Default::default() }
}

#[tokio::test]
async fn a_tenants_quota_refuses_a_create_or_resize_past_it_and_stores_nothing() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    let quota = gridforge_proto::v1::Quota { vcpus: 3, vms: 2, ..Default::default() };
    e.put_tenant("acme", quota).await.unwrap();

    let op = e.create_vm(create_req("a1", 2, "acme", ""), "alice").await.unwrap().operation.unwrap();
    finished(&e, &op.id).await;
    let over = e.create_vm(create_req("a2", 2, "acme", ""), "alice").await;
    match over {
        Err(super::OpError::Quota(m)) => {
            assert!(m.contains("tenant acme") && m.contains("vcpus: 2 used + 2 asked > 3 allowed"), "{m}")
        }
        other => panic!("expected a quota refusal: {other:?}"),
    }
    assert!(e.view().read(|s| !s.vms.contains_key("a2") && s.ops.values().all(|o| o.vm != "a2")));

    let op = e.create_vm(create_req("a2", 1, "acme", ""), "alice").await.unwrap().operation.unwrap();
    finished(&e, &op.id).await;
    let third = e.create_vm(create_req("a3", 0, "acme", ""), "alice").await;
    assert!(
        matches!(&third, Err(super::OpError::Quota(m)) if m.contains("vms: 2 used + 1 asked > 2 allowed")),
        "{third:?}"
    );
    let grow =
        e.resize_vm(ResizeVmRequest { name: "a2".into(), vcpus: 2, ..Default::default() }, "alice").await;
    assert!(matches!(&grow, Err(super::OpError::Quota(m)) if m.contains("vcpus")), "{grow:?}");
    let t = e.view().read(|s| super::tenant_view(s, "acme")).unwrap();
    assert_eq!((t.vms, t.used.unwrap().vcpus), (2, 3));

    // A deleted VM no longer counts.
    let del =
        e.delete_vm(DeleteVmRequest { name: "a1".into(), ..Default::default() }, "alice").await.unwrap();
    finished(&e, &del.id).await;
    let op = e.create_vm(create_req("a3", 1, "acme", ""), "alice").await.unwrap().operation.unwrap();
    assert_eq!(finished(&e, &op.id).await.state(), OpState::Succeeded);

    let unknown = e.create_vm(create_req("b1", 1, "nobody", ""), "alice").await;
    assert!(matches!(&unknown, Err(super::OpError::NotFound(m)) if m.contains("no tenant")), "{unknown:?}");
    let no_group = e.create_vm(create_req("b1", 1, "acme", "db"), "alice").await;
    assert!(matches!(&no_group, Err(super::OpError::NotFound(m)) if m.contains("no group")), "{no_group:?}");
    let busy = e.remove_tenant("acme").await;
    assert!(
        matches!(&busy, Err(super::OpError::Precondition(m)) if m.contains("still has 2 VMs")),
        "{busy:?}"
    );
}

fn scaling_group(
    tenant: &str,
    name: &str,
    min: u32,
    max: u32,
    priority: i32,
    horizontal: bool,
) -> gridforge_proto::v1::Group {
    gridforge_proto::v1::Group {
        tenant: tenant.into(),
        name: name.into(),
        service_level: Some(gridforge_proto::v1::ServiceLevel {
            min_members: min,
            max_members: max,
            priority,
            max_avg_cpu_percent: 70.0,
        }),
        scaling: Some(gridforge_proto::v1::ScalingPolicy {
            horizontal,
            cpu_up_percent: 70.0,
            cpu_down_percent: 30.0,
            window_secs: 25,
            cooldown_secs: 1,
            ..Default::default()
        }),
        template: Some(spec("template")),
        ..Default::default()
    }
}

fn epoch_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Members of `tenant`/`group` that are not deleted.
fn members_of(e: &Engine, tenant: &str, group: &str) -> Vec<String> {
    e.view().read(|s| s.tenant_vms(tenant, group).map(|v| v.name.clone()).collect())
}

/// A round at `at`: every operation it started has finished before it returns.
async fn round(e: &Engine, at: u64) -> Vec<gridforge_proto::v1::Decision> {
    let ds = e.scaling_round_at(at).await;
    for d in &ds {
        assert!(d.error.is_empty(), "{d:?}");
        if !d.operation.is_empty() {
            assert_eq!(finished(e, &d.operation).await.state(), OpState::Succeeded, "{d:?}");
        }
    }
    ds
}

/// The fake agent reports `total` host cores shared by `members`.
fn load(agent: &FakeAgent, members: &[String], total: f64) -> NodeStatsReport {
    let mut l = agent.load.lock().unwrap();
    l.clear();
    for m in members {
        l.insert(m.clone(), total / members.len() as f64);
    }
    let vms = l
        .iter()
        .map(|(name, cores)| gridforge_proto::v1::VmStats {
            name: name.clone(),
            cpu_cores: *cores,
            ..Default::default()
        })
        .collect();
    NodeStatsReport { vms, ..Default::default() }
}

#[tokio::test]
async fn the_scaling_loop_scales_a_group_out_under_load_and_in_after_it_without_flapping() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    e.put_tenant("acme", Default::default()).await.unwrap();
    e.put_group(scaling_group("acme", "web", 1, 4, 0, true)).await.unwrap();

    // Below its minimum: a member at once, named after the tenant and group.
    let base = epoch_secs();
    let ds = round(&e, base).await;
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(
        (ds[0].action(), ds[0].vm.as_str()),
        (gridforge_proto::v1::decision::Action::ScaleOut, "acme-web-1")
    );
    assert!(ds[0].reason.contains("min"), "{}", ds[0].reason);

    // The poller's path: a poll of the fake agent feeds the member's window.
    load(&agent, &members_of(&e, "acme", "web"), 0.1);
    let config = crate::config::PollerConfig::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    crate::poller::poll_all(&e, &config, &slots, Duration::ZERO).await;
    let usage = e.view().read(|s| e.with_usage(s, s.vms["acme-web-1"].clone())).usage.unwrap();
    assert!(usage.samples >= 1 && (usage.cpu_percent - 10.0).abs() < 0.01, "{usage:?}");
    assert_eq!((usage.disk_bytes_per_sec, usage.network_bytes_per_sec), (1e5, 1e4), "{usage:?}");

    // 2.4 cores of load for 12 rounds, then 0.2: out to the bound, then in to the minimum, once each way.
    let mut counts = vec![1usize];
    for i in 1..=40u64 {
        let at = base + i * 10;
        let members = members_of(&e, "acme", "web");
        let total = if i <= 12 { 2.4 } else { 0.2 };
        e.record_usage_at(&load(&agent, &members, total), at);
        round(&e, at).await;
        counts.push(members_of(&e, "acme", "web").len());
    }
    let peak = *counts.iter().max().unwrap();
    assert_eq!(peak, 4, "{counts:?}");
    assert_eq!(*counts.last().unwrap(), 1, "{counts:?}");
    let ups = counts.windows(2).filter(|w| w[1] > w[0]).count();
    let downs = counts.windows(2).filter(|w| w[1] < w[0]).count();
    assert_eq!((ups, downs), (3, 3), "one step at a time, each way once: {counts:?}");
    let first_down = counts.windows(2).position(|w| w[1] < w[0]).unwrap();
    let last_up = counts.windows(2).rposition(|w| w[1] > w[0]).unwrap();
    assert!(last_up < first_down, "no scale-out after the first scale-in (flapping): {counts:?}");
    // Each step is an operation requested by the scaling loop, logged with its reason.
    let log = e.decisions(false, "acme", 0);
    assert_eq!(
        log.iter().filter(|d| d.action() == gridforge_proto::v1::decision::Action::ScaleIn).count(),
        3
    );
    assert!(log.iter().all(|d| !d.reason.is_empty()), "{log:?}");
    let hold = gridforge_proto::v1::decision::Action::Hold;
    assert!(log.iter().filter(|d| d.action() != hold).all(|d| !d.operation.is_empty()), "{log:?}");
    let by = e.view().read(|s| s.ops.get(&log[0].operation).map(|o| o.requested_by.clone()));
    assert_eq!(by.as_deref(), Some(super::scaling::SCALER));
}

#[tokio::test]
async fn a_higher_priority_group_takes_a_lower_ones_spare_member_never_below_its_minimum() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    for t in ["low", "high"] {
        e.put_tenant(t, Default::default()).await.unwrap();
    }
    e.put_group(scaling_group("low", "batch", 6, 8, 0, false)).await.unwrap();
    e.put_group(scaling_group("high", "web", 1, 4, 10, true)).await.unwrap();
    // The node's 8 GiB: seven batch members and one web member of 1 GiB each fill it.
    for i in 1..=7 {
        let op = e.create_vm(create_req(&format!("batch-{i}"), 1, "low", "batch"), "alice").await.unwrap();
        finished(&e, &op.operation.unwrap().id).await;
    }
    let base = epoch_secs();
    round(&e, base).await;
    assert_eq!(members_of(&e, "high", "web"), ["high-web-1"]);
    assert_eq!(e.view().read(|s| s.snapshot.node("n1").unwrap().free().memory_mib), 0);

    let dry = e.plan_at(base + 10);
    assert!(dry.is_empty(), "no load samples yet: {dry:?}");
    let web = members_of(&e, "high", "web");
    e.record_usage_at(&load(&agent, &web, 0.9), base + 10);
    let plan = e.plan_at(base + 10);
    let reclaim = plan.iter().find(|d| d.action() == gridforge_proto::v1::decision::Action::Reclaim);
    let reclaim = reclaim.unwrap_or_else(|| panic!("{plan:?}")).clone();
    assert_eq!(
        (reclaim.tenant.as_str(), reclaim.vm.as_str(), reclaim.for_group.as_str()),
        ("low", "batch-7", "high/web")
    );
    assert!(members_of(&e, "low", "batch").len() == 7, "a plan takes nothing");

    let ds = round(&e, base + 10).await;
    assert!(ds.iter().any(|d| d.action() == gridforge_proto::v1::decision::Action::Reclaim), "{ds:?}");
    assert_eq!(members_of(&e, "low", "batch").len(), 6);
    // The room exists now: the needy group scales out into it.
    e.record_usage_at(&load(&agent, &web, 0.9), base + 20);
    let ds = round(&e, base + 20).await;
    assert!(ds.iter().any(|d| d.action() == gridforge_proto::v1::decision::Action::ScaleOut), "{ds:?}");
    assert_eq!(members_of(&e, "high", "web").len(), 2);
    // Still loaded, but the lower group is at its minimum: held, with the reason, nothing taken.
    let web = members_of(&e, "high", "web");
    for at in [base + 30, base + 40] {
        e.record_usage_at(&load(&agent, &web, 1.9), at);
        let ds = round(&e, at).await;
        assert!(ds.iter().all(|d| d.action() == gridforge_proto::v1::decision::Action::Hold), "{ds:?}");
    }
    assert_eq!(members_of(&e, "low", "batch").len(), 6);
    let holds: Vec<_> = e
        .decisions(false, "high", 0)
        .into_iter()
        .filter(|d| d.action() == gridforge_proto::v1::decision::Action::Hold)
        .collect();
    assert_eq!(holds.len(), 1, "a hold logged once for one reason: {holds:?}");
}

#[tokio::test]
async fn tenant_networks_get_vlan_ids_of_their_own_tag_their_vms_nics_and_free_them() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let view = GridView::open(Box::new(store), Defaults::default()).unwrap();
    let networks = crate::config::NetworksConfig { bridge: "br-t".into(), vlan_first: 100, vlan_last: 101 };
    let config = OpsConfig { retry_attempts: 3, retry_backoff_ms: 10, networks, ..OpsConfig::default() };
    let e = Engine::new(view, AgentPool::new(None, Duration::from_secs(5)), config);
    for t in ["acme", "globex"] {
        e.put_tenant(t, Default::default()).await.unwrap();
    }
    let a = e.put_network("acme", "back", Default::default()).await.unwrap();
    let g = e.put_network("globex", "back", Default::default()).await.unwrap();
    assert_eq!((a.vlan_id, g.vlan_id), (100, 101), "no two networks share an ID");
    let full = e.put_network("acme", "front", Default::default()).await;
    assert!(
        matches!(&full, Err(super::OpError::Quota(m)) if m.contains("no free VLAN ID left in 100-101")),
        "{full:?}"
    );
    // Translations of a known network change; its ID does not.
    let tr: HashMap<String, u32> = [("n1".to_string(), 3001)].into();
    let a2 = e.put_network("acme", "back", tr.clone()).await.unwrap();
    assert_eq!((a2.vlan_id, a2.uplink_vlans), (100, tr));
    let bad: HashMap<String, u32> = [("nowhere".to_string(), 5)].into();
    assert!(matches!(e.put_network("acme", "back", bad).await, Err(super::OpError::NotFound(_))));

    // A VM on it: a NIC on the tenant bridge with the network's tag, in the job the agent gets.
    let mut req = create_req("a1", 1, "acme", "");
    req.networks = vec!["back".into()];
    let op = e.create_vm(req, "alice").await.unwrap().operation.unwrap();
    assert_eq!(finished(&e, &op.id).await.state(), OpState::Succeeded);
    let nics = e.view().read(|s| s.vms["a1"].spec.clone().unwrap().machine.unwrap().nics);
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].vlan, 100);
    assert_eq!(nics[0].attach, Some(gridforge_proto::v1::nic::Attach::Bridge("br-t".into())));
    let mut other = create_req("a2", 1, "acme", "");
    other.networks = vec!["front".into()];
    assert!(
        matches!(e.create_vm(other, "alice").await, Err(super::OpError::NotFound(m)) if m.contains("no network"))
    );
    let used = e.remove_network("acme", "back").await;
    assert!(matches!(&used, Err(super::OpError::Precondition(m)) if m.contains("used by a1")), "{used:?}");

    // Deleted VM, removed network: its ID is free again.
    let del =
        e.delete_vm(DeleteVmRequest { name: "a1".into(), ..Default::default() }, "alice").await.unwrap();
    finished(&e, &del.id).await;
    e.remove_network("acme", "back").await.unwrap();
    assert_eq!(e.put_network("acme", "front", Default::default()).await.unwrap().vlan_id, 100);
}

/// A VM's own thresholds: up above 70% CPU to 3 vCPUs, down below 20% to 1, over 20 s.
fn own_thresholds() -> gridforge_proto::v1::ScalingPolicy {
    gridforge_proto::v1::ScalingPolicy {
        cpu_up_percent: 70.0,
        cpu_down_percent: 20.0,
        min_vcpus: 1,
        max_vcpus: 3,
        window_secs: 20,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_vm_outside_a_group_follows_its_own_thresholds_up_and_down_without_flapping() {
    use gridforge_proto::v1::ScalingPolicy;
    use gridforge_proto::v1::decision::Action;
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    e.put_tenant("acme", Default::default()).await.unwrap();
    e.put_group(scaling_group("acme", "web", 0, 4, 0, false)).await.unwrap();
    for (name, group) in [("solo", ""), ("member", "web")] {
        let op = e.create_vm(create_req(name, 1, "acme", group), "alice").await.unwrap();
        finished(&e, &op.operation.unwrap().id).await;
    }
    let policy = own_thresholds();
    // A group's member follows the group; a VM's own policy is vertical only; thresholds need their gap.
    let err = e.set_vm_scaling("member", Some(policy)).await.unwrap_err();
    assert!(matches!(err, super::OpError::Precondition(_)) && err.to_string().contains("acme/web"), "{err}");
    let err = e.set_vm_scaling("solo", Some(ScalingPolicy { horizontal: true, ..policy })).await.unwrap_err();
    assert!(matches!(err, super::OpError::Invalid(_)), "{err}");
    let err =
        e.set_vm_scaling("solo", Some(ScalingPolicy { cpu_down_percent: 80.0, ..policy })).await.unwrap_err();
    assert!(err.to_string().contains("flapping"), "{err}");
    let vm = e.set_vm_scaling("solo", Some(policy)).await.unwrap();
    assert!(vm.scaling.is_some_and(|p| p.vertical));

    // 0.9 host cores for 10 rounds, then 0.1: up to the bound, then down to the minimum, once each way.
    let vcpus = |e: &Engine| e.view().read(|s| s.vms["solo"].resources.unwrap().vcpus);
    let base = epoch_secs();
    let mut seen = vec![vcpus(&e)];
    for i in 1..=30u64 {
        let at = base + i * 10;
        let cores = if i <= 10 { 2.7 } else { 0.1 };
        e.record_usage_at(&load(&agent, &["solo".to_string()], cores), at);
        let ds = round(&e, at).await;
        assert!(ds.iter().all(|d| d.vm == "solo" && d.group.is_empty()), "only the solo VM scales: {ds:?}");
        seen.push(vcpus(&e));
    }
    assert_eq!(*seen.iter().max().unwrap(), 3, "{seen:?}");
    assert_eq!(*seen.last().unwrap(), 1, "{seen:?}");
    let last_up = seen.windows(2).rposition(|w| w[1] > w[0]).unwrap();
    let first_down = seen.windows(2).position(|w| w[1] < w[0]).unwrap();
    assert!(last_up < first_down, "no step up after the first step down (flapping): {seen:?}");
    let log = e.decisions(false, "acme", 0);
    let ups = log.iter().filter(|d| d.action() == Action::ScaleUp).count();
    let downs = log.iter().filter(|d| d.action() == Action::ScaleDown).count();
    assert_eq!((ups, downs), (2, 2), "{log:?}");
    assert!(e.view().read(|s| s.vms["solo"].last_scaled.is_some()), "the cooldown's start is stored");
    assert_eq!(e.view().read(|s| s.vms["member"].resources.unwrap().vcpus), 1, "the member is the group's");
    // Removed: the VM keeps its size, whatever its load.
    e.set_vm_scaling("solo", None).await.unwrap();
    e.record_usage_at(&load(&agent, &["solo".to_string()], 0.95), base + 400);
    assert!(round(&e, base + 400).await.is_empty());
}

/// A VM record RUNNING on n1 with 1 vCPU and 1 GiB, as committed to the store.
fn running_vm(name: &str) -> Vm {
    Vm {
        name: name.into(),
        node: "n1".into(),
        state: VmState::Running as i32,
        resources: Some(Resources { vcpus: 1, memory_mib: 1024, disk_mib: 64 }),
        ..Default::default()
    }
}

/// Whether the engine keeps load samples of VM `name` (its record may be gone).
fn has_usage(e: &Engine, name: &str) -> bool {
    e.view().read(|s| e.with_usage(s, Vm { name: name.into(), ..Default::default() }).usage.is_some())
}

#[tokio::test]
async fn a_round_forgets_the_load_of_the_vms_that_left_and_only_theirs() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    let names: Vec<String> = ["kept", "deleted", "removed", "back"].map(String::from).into();
    let mut records = vec![Change::PutNode(node(&address))];
    records.extend(names.iter().map(|n| Change::PutVm(running_vm(n))));
    store.commit(&records).unwrap();
    let e = engine(store, 3);
    let base = epoch_secs();
    e.record_usage_at(&load(&agent, &names, 1.0), base);
    round(&e, base).await;
    assert!(names.iter().all(|n| has_usage(&e, n)), "nothing left");

    // One DELETED, one removed, one removed and put back before the round.
    e.view()
        .update(|s| {
            let mut deleted = s.vms["deleted"].clone();
            deleted.state = VmState::Deleted as i32;
            let changes = vec![
                Change::PutVm(deleted),
                Change::RemoveVm("removed".into()),
                Change::RemoveVm("back".into()),
            ];
            Ok::<_, super::OpError>(((), changes))
        })
        .await
        .unwrap();
    e.view()
        .update(|_| Ok::<_, super::OpError>(((), vec![Change::PutVm(running_vm("back"))])))
        .await
        .unwrap();
    round(&e, base + 10).await;
    let kept: Vec<bool> = names.iter().map(|n| has_usage(&e, n)).collect();
    assert_eq!(kept, [true, false, false, true], "{names:?}");
    e.record_usage_at(&load(&agent, &names, 1.0), base + 20);
    assert!(!has_usage(&e, "deleted") && !has_usage(&e, "removed"), "no sample of a VM not in the grid");

    // A view rebuilt from the store starts its departures anew: what left before still goes.
    e.view().update(|_| Ok::<_, super::OpError>(((), vec![Change::RemoveVm("kept".into())]))).await.unwrap();
    e.view().reload_from_store().unwrap();
    round(&e, base + 30).await;
    assert!(!has_usage(&e, "kept") && has_usage(&e, "back"));
}

#[tokio::test]
async fn a_plan_decides_for_every_vm_with_thresholds_of_its_own_and_each_group_on_its_members() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    let policy = gridforge_proto::v1::ScalingPolicy { vertical: true, ..own_thresholds() };
    // One VM with thresholds as loaded from the store; the others get theirs through the engine.
    let loaded = Vm { tenant: "acme".into(), scaling: Some(policy), ..running_vm("loaded") };
    store.commit(&[Change::PutNode(node(&address)), Change::PutVm(loaded)]).unwrap();
    let e = engine(store, 3);
    e.put_tenant("acme", Default::default()).await.unwrap();
    for g in ["web", "db"] {
        e.put_group(scaling_group("acme", g, 0, 4, 0, true)).await.unwrap();
    }
    for (name, group) in [("set", ""), ("off", ""), ("web-1", "web"), ("db-1", "db"), ("db-2", "db")] {
        let op = e.create_vm(create_req(name, 1, "acme", group), "alice").await.unwrap();
        finished(&e, &op.operation.unwrap().id).await;
    }
    e.set_vm_scaling("set", Some(policy)).await.unwrap();
    e.set_vm_scaling("off", Some(policy)).await.unwrap();
    e.set_vm_scaling("off", None).await.unwrap();

    // 90% of their vCPU for the solo VMs and web, 10% for db: web scales out, db in, only if each group's
    // load is its own members'.
    let at = epoch_secs();
    let hot: Vec<String> = ["loaded", "set", "off", "web-1"].map(String::from).into();
    e.record_usage_at(&load(&agent, &hot, 3.6), at);
    e.record_usage_at(&load(&agent, &["db-1".to_string(), "db-2".to_string()], 0.2), at);
    let plan = e.plan_at(at);
    let mut got: Vec<(&str, &str, &str)> =
        plan.iter().map(|d| (d.action().as_str_name(), d.group.as_str(), d.vm.as_str())).collect();
    got.sort_unstable();
    assert_eq!(
        got,
        [
            ("SCALE_IN", "db", "db-2"),
            ("SCALE_OUT", "web", "acme-web-1"),
            ("SCALE_UP", "", "loaded"),
            ("SCALE_UP", "", "set")
        ],
        "{plan:?}"
    );
}

#[tokio::test]
async fn a_poll_keeps_the_base_disks_the_node_reports() {
    let (agent, store) = tenant_engine_parts();
    let address = serve(agent.clone()).await;
    store.commit(&[Change::PutNode(node(&address))]).unwrap();
    let e = engine(store, 3);
    let config = crate::config::PollerConfig::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(4));
    crate::poller::poll_all(&e, &config, &slots, Duration::ZERO).await;
    let bases = e.view().read(|s| s.nodes["n1"].bases.clone());
    assert_eq!(bases.len(), 1, "{bases:?}");
    assert_eq!(bases[0].id, "0123456789abcdef0123456789abcdef");
    assert_eq!(bases[0].clones, ["/pool/vm-1.qcow2"]);
}
