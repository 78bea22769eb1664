//! `bench/dispatch`: the coordinator pushing creates to many agents, and its status poller's idle cost.
//!
//! Usage: dispatch COORDINATOR_BIN DIR [NODES [VMS [IN_FLIGHT [IDLE_SECS [RATE [SLOTS]]]]]]
//! (defaults 1000, 10000, 64, 30, 500, 2; SLOTS is the coordinator's `ops.max_disk_jobs_per_node`; certificates, the coordinator's config, state and log go in DIR)
//!
//! This process runs NODES fake agents (the generated `Agent` service, mutual TLS with certificates from
//! `gridforge_common::pki`, CN = node name) on loopback ports, and the API client. The coordinator is the real
//! `gridforge-coordinator` daemon in a child process, so that its CPU time (/proc/PID/stat) is its own:
//! 1. enroll every node (`AddNode`, 32 at a time);
//! 2. create VMS VMs with IN_FLIGHT calls in flight; each fake agent records when `SubmitJob` arrives,
//!    by idempotency key, and answers with a job already succeeded. The overhead of one create is the time
//!    from the API call to its agent receiving `SubmitJob`, both read from this process's monotonic clock;
//!    then VMS/2 more, one call every 1/RATE s whatever is in flight (an open loop below saturation);
//! 3. once every operation has finished, the coordinator's CPU time over IDLE_SECS of polling alone
//!    (poller.interval_ms = 5000), as a share of one core.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gridforge_common::client::{self, ClientTls};
use gridforge_common::pki::{self, CertRequest};
use gridforge_coordinator::grid::now;
use gridforge_proto::v1::agent_server::{Agent, AgentServer};
use gridforge_proto::v1::coordinator_client::CoordinatorClient;
use gridforge_proto::v1::{
    AddNodeRequest, CancelJobRequest, Check, CoordinatorStatusRequest, CreateVmRequest, DiagnosticsReport,
    DiagnosticsRequest, FsStats, GetJobRequest, Job, JobEvent, JobKind, JobState, JobStep, ListJobsRequest,
    ListJobsResponse, ListOperationsRequest, ListVmsRequest, MemoryStats, NodeStatsReport, NodeStatsRequest,
    ProvisionResult, SubmitJobRequest, VmSpec, VmStats, WatchJobRequest, check, job::Outcome,
    submit_job_request::Job as JobReq,
};
use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

const GIB: u64 = 1 << 30;

/// What every fake agent reports to the driver.
#[derive(Default)]
struct Counters {
    /// Arrival of each SubmitJob, by idempotency key (the first one only).
    received: Mutex<HashMap<String, Instant>>,
    node_stats: AtomicU64,
    diagnostics: AtomicU64,
}

/// One fake agent: a node of `cores` cores and `memory` bytes whose provisions succeed at once.
struct FakeAgent {
    name: String,
    cores: usize,
    memory: u64,
    jobs: Mutex<Vec<Job>>,
    /// Defined domains: name and vCPUs.
    domains: Mutex<Vec<(String, u32)>>,
    counters: Arc<Counters>,
}

impl FakeAgent {
    fn job(&self, id: &str) -> Result<Job, Status> {
        let jobs = self.jobs.lock().unwrap();
        jobs.iter().find(|j| j.id == id).cloned().ok_or_else(|| Status::not_found(format!("no job {id:?}")))
    }
}

type Events = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let at = Instant::now();
        let req = request.into_inner();
        self.counters.received.lock().unwrap().entry(req.idempotency_key.clone()).or_insert(at);
        let mut jobs = self.jobs.lock().unwrap();
        if let Some(j) = jobs.iter().find(|j| j.idempotency_key == req.idempotency_key) {
            return Ok(Response::new(j.clone()));
        }
        let Some(JobReq::Provision(p)) = &req.job else {
            return Err(Status::unimplemented("this fake agent runs provisions only"));
        };
        let spec = p.spec.clone().unwrap_or_default();
        let size = spec.disk.as_ref().map_or(0, |d| d.size_mib) << 20;
        let vcpus = spec.machine.as_ref().map_or(1, |m| m.vcpus.max(1));
        let path = format!("/var/lib/gridforge/pool/{}.raw", spec.name);
        let t = now();
        let job = Job {
            id: format!("{}-job-{}", self.name, jobs.len() + 1),
            idempotency_key: req.idempotency_key.clone(),
            kind: JobKind::Provision as i32,
            state: JobState::Succeeded as i32,
            steps: ["allocate", "fetch", "partition", "build", "define"]
                .iter()
                .map(|s| JobStep {
                    name: s.to_string(),
                    state: JobState::Succeeded as i32,
                    bytes_done: size,
                    bytes_total: size,
                })
                .collect(),
            outcome: Some(Outcome::Provision(ProvisionResult {
                disk_path: path.clone(),
                disk_size_bytes: size,
                sector_size: 512,
                disk_guid: format!("{:08x}-0000-4000-8000-000000000000", jobs.len()),
                partitions: vec![],
                image_digests: vec!["0".repeat(64)],
                ..Default::default()
            })),
            created: Some(t),
            started: Some(t),
            finished: Some(t),
            target: path,
            domain: spec.name.clone(),
            request: Some(req.clone()),
        };
        jobs.push(job.clone());
        self.domains.lock().unwrap().push((spec.name, vcpus));
        Ok(Response::new(job))
    }

    type WatchJobStream = Events;

    async fn watch_job(&self, request: Request<WatchJobRequest>) -> Result<Response<Events>, Status> {
        let job = self.job(&request.into_inner().job_id)?;
        let last = JobEvent {
            job_id: job.id.clone(),
            seq: 0,
            step: "define".into(),
            message: "done".into(),
            time: job.finished,
            state: job.state,
            ..Default::default()
        };
        Ok(Response::new(Box::pin(tokio_stream::iter([Ok(last)]))))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let job = self.job(&request.into_inner().job_id)?;
        Err(Status::failed_precondition(format!("job {} has finished", job.id)))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.job(&request.into_inner().job_id)?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let req = request.into_inner();
        let jobs = self.jobs.lock().unwrap();
        let jobs = jobs
            .iter()
            .rev()
            .filter(|j| req.kind == 0 || j.kind == req.kind)
            .filter(|j| req.states.is_empty() || req.states.contains(&j.state))
            .take(if req.limit == 0 { usize::MAX } else { req.limit as usize })
            .cloned()
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn diagnostics(
        &self,
        _: Request<DiagnosticsRequest>,
    ) -> Result<Response<DiagnosticsReport>, Status> {
        self.counters.diagnostics.fetch_add(1, Ordering::Relaxed);
        let ok = |name: &str, reason: &str| Check {
            name: name.into(),
            status: check::Status::Ok as i32,
            reason: reason.into(),
        };
        Ok(Response::new(DiagnosticsReport {
            agent_version: "0.1.0".into(),
            node: self.name.clone(),
            time: Some(now()),
            hypervisor_kind: "kvm".into(),
            checks: vec![
                ok("libvirt", "qemu:///system answers (libvirt 9.0.0)"),
                ok("kvm", "/dev/kvm usable"),
                ok("pool", "/var/lib/gridforge/pool: 18 TiB free"),
                ok("image-cache", "12 images cached"),
                ok(
                    "image-store",
                    "https://images.example/ lists 2 images (signed index verified), 1 of them cached",
                ),
                ok("tls", "certificate valid for 800 days"),
                ok("clock", "synchronized"),
                ok("jobs", "journal open, 0 running"),
            ],
            arch: "x86_64".into(),
            images: vec!["debian-12-minimal:1".into(), "debian-12-minimal:2".into()],
            cached_images: vec!["debian-12-minimal:1".into()],
            live_migration: false,
            ..Default::default()
        }))
    }

    async fn node_stats(
        &self,
        request: Request<NodeStatsRequest>,
    ) -> Result<Response<NodeStatsReport>, Status> {
        self.counters.node_stats.fetch_add(1, Ordering::Relaxed);
        let domains = self.domains.lock().unwrap();
        let vms: Vec<VmStats> = domains
            .iter()
            .map(|(name, vcpus)| VmStats {
                name: name.clone(),
                state: "running".into(),
                vcpus: *vcpus,
                cpu_cores: 0.1,
                memory_bytes: GIB,
                ..Default::default()
            })
            .collect();
        let used = 8 * GIB + domains.len() as u64 * GIB;
        Ok(Response::new(NodeStatsReport {
            time: Some(now()),
            sample_ms: request.into_inner().sample_ms,
            cpu_busy: vec![0.05; self.cores],
            memory: Some(MemoryStats {
                total_bytes: self.memory,
                available_bytes: self.memory - used,
                used_bytes: used,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            }),
            disks: vec![],
            filesystems: vec![
                FsStats {
                    role: "pool".into(),
                    path: "/var/lib/gridforge/pool".into(),
                    total_bytes: 20 << 40,
                    free_bytes: (20 << 40) - domains.len() as u64 * 10 * GIB,
                },
                FsStats {
                    role: "state".into(),
                    path: "/var/lib/gridforge-agent".into(),
                    total_bytes: 100 * GIB,
                    free_bytes: 90 * GIB,
                },
            ],
            network: vec![],
            vms,
        }))
    }

    async fn receive_disk(
        &self,
        _request: Request<tonic::Streaming<gridforge_proto::v1::DiskChunk>>,
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

/// The coordinator daemon, stopped with SIGTERM when dropped.
use gridforge_testsupport::process::TermOnDrop as Coordinator;

/// The user plus system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// Raise the open-file limit to the hard limit: every agent listens and holds the coordinator's connection.
fn raise_nofile(need: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    if lim.rlim_cur < need {
        eprintln!("warning: open-file limit {} is below the {need} this run needs", lim.rlim_cur);
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:04}")
}

/// VM `i`: mixed sizes, the shape `gridctl vm create -f` takes.
fn spec(i: usize) -> VmSpec {
    let (vcpus, memory_mib) = [(1, 1024), (2, 2048), (2, 4096), (4, 8192)][i % 4];
    let name = format!("vm-{i:05}");
    serde_json::from_value(serde_json::json!({
        "name": name,
        "image": {"name": "debian-12-minimal", "version": "1"},
        "disk": {
            "size_mib": 10240,
            "partitions": [
                {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
                {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
            ]
        },
        "customize": {"hostname": name},
        "machine": {"vcpus": vcpus, "memory_mib": memory_mib, "start": true}
    }))
    .expect("a valid spec")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn start_agents(pki_dir: &Path, nodes: usize, counters: &Arc<Counters>) -> Vec<String> {
    let ca = std::fs::read(pki::ca_cert_path(pki_dir)).expect("reading the CA");
    let mut addresses = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let name = node_name(i);
        let cert = std::fs::read(pki_dir.join(format!("{name}.pem"))).expect("node certificate");
        let key = std::fs::read(pki_dir.join(format!("{name}.key"))).expect("node key");
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(tonic::transport::Certificate::from_pem(&ca))
            .client_auth_optional(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
        addresses.push(listener.local_addr().expect("address").to_string());
        let agent = FakeAgent {
            name,
            cores: [32, 48, 64, 96][i % 4],
            memory: [256, 384, 512, 768][i % 4] * GIB,
            jobs: Mutex::default(),
            domains: Mutex::default(),
            counters: counters.clone(),
        };
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .expect("server TLS")
            .add_service(AgentServer::new(agent));
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(router.serve_with_incoming(incoming));
    }
    addresses
}

async fn connect(address: &str, tls: &ClientTls) -> CoordinatorClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client::channel(address, Some(tls)).await {
            Ok(c) => {
                return CoordinatorClient::new(c)
                    .max_decoding_message_size(gridforge_coordinator::cli::LISTING_LIMIT);
            }
            Err(e) if Instant::now() > deadline => panic!("the coordinator does not answer: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Wait until no operation is active; returns how long it took.
async fn settle(client: &mut CoordinatorClient<Channel>) -> Duration {
    let start = Instant::now();
    loop {
        let req = ListOperationsRequest { active: true, limit: 1, ..Default::default() };
        let active = client.list_operations(req).await.expect("ListOperations").into_inner().operations;
        if active.is_empty() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How the creates of one phase are issued.
#[derive(Clone, Copy)]
enum Pace {
    /// Closed loop: this many calls in flight, each followed by the next as soon as it is answered.
    InFlight(usize),
    /// Open loop: one call every 1/rate seconds, however many are in flight.
    Rate(usize),
}

/// What one phase of creates measured.
struct Phase {
    vms: usize,
    /// From the first call to the last answer.
    api_done: Duration,
    /// From the first call to the last SubmitJob received.
    last_received: Duration,
    /// From the last answer until no operation was active.
    settled: Duration,
    /// API call to answer, sorted.
    answers: Vec<Duration>,
    /// API call to the agent receiving SubmitJob, sorted.
    overhead: Vec<Duration>,
}

impl Phase {
    fn print(&self) {
        let secs = self.api_done.as_secs_f64();
        println!(
            "  API answered all in {secs:.2} s: {:.0} creates/s; answer p50 {:.1} ms, p99 {:.1} ms",
            self.vms as f64 / secs,
            ms(percentile(&self.answers, 0.5)),
            ms(percentile(&self.answers, 0.99)),
        );
        println!(
            "  every SubmitJob received by {:.2} s: {:.0} dispatched/s; all operations finished {:.2} s after \
             the last answer",
            self.last_received.as_secs_f64(),
            self.vms as f64 / self.last_received.as_secs_f64(),
            self.settled.as_secs_f64(),
        );
        println!(
            "  API call -> agent receives SubmitJob ({} of {} matched; monotonic clock, one process): \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.overhead.len(),
            self.vms,
            ms(percentile(&self.overhead, 0.5)),
            ms(percentile(&self.overhead, 0.99)),
            ms(self.overhead.last().copied().unwrap_or_default()),
        );
    }
}

/// One create: its answer time, and the call's instant under its provision step's idempotency key.
async fn create_one(
    mut c: CoordinatorClient<Channel>,
    i: usize,
    called: &Mutex<HashMap<String, Instant>>,
) -> Duration {
    let req = CreateVmRequest { spec: Some(spec(i)), ..Default::default() };
    let t0 = Instant::now();
    let resp = c.create_vm(req).await.unwrap_or_else(|e| panic!("creating vm {i}: {e}"));
    let answered = t0.elapsed();
    let op = resp.into_inner().operation.expect("an operation");
    called.lock().unwrap().insert(format!("{}/provision", op.id), t0);
    answered
}

/// Create the VMs numbered `range`, paced by `pace`, and match each call with its SubmitJob.
async fn creates(
    client: &CoordinatorClient<Channel>,
    range: std::ops::Range<usize>,
    pace: Pace,
    counters: &Counters,
) -> Phase {
    let called: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let vms = range.len();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match pace {
        Pace::InFlight(in_flight) => {
            let next = Arc::new(AtomicUsize::new(range.start));
            for _ in 0..in_flight {
                let (c, next, called, end) = (client.clone(), next.clone(), called.clone(), range.end);
                tasks.spawn(async move {
                    let mut answers = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= end {
                            return answers;
                        }
                        answers.push(create_one(c.clone(), i, &called).await);
                    }
                });
            }
        }
        Pace::Rate(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in range {
                tick.tick().await;
                let (c, called) = (client.clone(), called.clone());
                tasks.spawn(async move { vec![create_one(c, i, &called).await] });
            }
        }
    }
    let mut answers: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    let api_done = start.elapsed();
    let settled = settle(&mut client.clone()).await;
    let received = counters.received.lock().unwrap().clone();
    let called = called.lock().unwrap().clone();
    let mut overhead: Vec<Duration> =
        called.iter().filter_map(|(key, t0)| received.get(key).map(|at| at.duration_since(*t0))).collect();
    let last_received = called
        .keys()
        .filter_map(|key| received.get(key))
        .max()
        .map_or(Duration::ZERO, |at| at.duration_since(start));
    overhead.sort();
    answers.sort();
    Phase { vms, api_done, last_received, settled, answers, overhead }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: dispatch COORDINATOR_BIN DIR [NODES [VMS [IN_FLIGHT [IDLE_SECS [RATE [SLOTS]]]]]]");
        std::process::exit(2);
    }
    let arg = |i: usize, default: usize| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let (bin, dir) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let (nodes, vms, in_flight, idle_secs) = (arg(3, 1000), arg(4, 10_000), arg(5, 64), arg(6, 30));
    let (rate, slots) = (arg(7, 500), arg(8, 2));
    raise_nofile(3 * nodes as u64 + 256);
    let _ = std::fs::remove_dir_all(&dir);
    let pki_dir = dir.join("pki");
    let state_dir = dir.join("state");
    std::fs::create_dir_all(&state_dir).expect("creating the bench directory");

    let t = Instant::now();
    pki::init(&pki_dir, 30).expect("making the CA");
    let issue = |name: &str, ou: Option<&str>| {
        let mut req = CertRequest::new(name);
        req.organizational_unit = ou.map(str::to_string);
        pki::issue(&pki_dir, &req).expect("issuing a certificate")
    };
    let coord_cert = issue("coordinator", None);
    let admin = issue("bench-admin", Some("admin"));
    for i in 0..nodes {
        issue(&node_name(i), None);
    }
    println!("pki: CA and {} certificates in {:.1} s", nodes + 2, t.elapsed().as_secs_f64());

    let counters = Arc::new(Counters::default());
    let addresses = start_agents(&pki_dir, nodes, &counters).await;

    let api = format!("127.0.0.1:{}", gridforge_common::net::unused_loopback_port());
    let config = dir.join("coordinator.toml");
    let ca = pki::ca_cert_path(&pki_dir);
    // With GRIDFORGE_BENCH_ETCD=URL the grid view lives in that etcd (bench/dispatch starts one), under a
    // prefix of this run's, and the coordinator leads once it has won the election.
    let etcd = std::env::var("GRIDFORGE_BENCH_ETCD").ok().filter(|u| !u.is_empty());
    let store = match &etcd {
        Some(url) => format!(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"{url}\"]\nprefix = \"/bench-dispatch/{}\"\n\
             name = \"bench\"\nmax_txn_ops = 1024\n",
            std::process::id()
        ),
        None => String::new(),
    };
    std::fs::write(
        &config,
        format!(
            "listen = \"{api}\"\nstate_dir = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             [poller]\ninterval_ms = 5000\n[ops]\nmax_disk_jobs_per_node = {slots}\n{store}",
            state_dir.display(),
            ca.display(),
            coord_cert.cert.display(),
            coord_cert.key.display()
        ),
    )
    .expect("writing the coordinator's config");
    println!("store: {}", etcd.as_deref().map_or("embedded (redb)".to_string(), |u| format!("etcd at {u}")));
    let log = std::fs::File::create(dir.join("coordinator.log")).expect("creating the log");
    let child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let coordinator = Coordinator(child);
    let pid = coordinator.0.id();
    let tls = ClientTls { ca, cert: admin.cert, key: admin.key, domain: None };
    let client = connect(&api, &tls).await;
    // On etcd: writes are taken once the coordinator leads.
    let mut status = client.clone();
    let t = Instant::now();
    while status.coordinator_status(CoordinatorStatusRequest {}).await.map_or(true, |r| {
        let r = r.into_inner();
        r.leader.is_empty() || r.leader != r.member
    }) {
        assert!(t.elapsed() < Duration::from_secs(60), "the coordinator did not lead within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Enrollment.
    let t = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (mut c, next, addresses) = (client.clone(), next.clone(), addresses.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(address) = addresses.get(i) else { return };
                let req = AddNodeRequest {
                    name: node_name(i),
                    address: address.clone(),
                    datacenter: format!("dc{}", i % 3 + 1),
                    ..Default::default()
                };
                c.add_node(req).await.unwrap_or_else(|e| panic!("enrolling {}: {e}", node_name(i)));
            }
        });
    }
    tasks.join_all().await;
    println!("enrolled {nodes} nodes in {:.1} s (32 at a time)", t.elapsed().as_secs_f64());

    // Creates: as fast as IN_FLIGHT calls allow, then paced at RATE per second (an open loop: each call made at
    // its time, however many are in flight), so that the overhead is seen both at saturation and below it.
    let closed = creates(&client, 0..vms, Pace::InFlight(in_flight), &counters).await;
    println!(
        "creates: {vms} VMs over {nodes} nodes, {in_flight} API calls in flight over one mTLS channel, \
         {slots} disk jobs per node at once"
    );
    closed.print();
    let paced_vms = vms / 2;
    let paced = creates(&client, vms..vms + paced_vms, Pace::Rate(rate), &counters).await;
    println!(
        "creates: {paced_vms} more VMs, one API call every {:.2} ms ({rate}/s) whatever is in flight",
        1e3 / rate as f64
    );
    paced.print();
    let mut client = client;
    let listed = client.list_vms(ListVmsRequest::default()).await.expect("ListVms").into_inner().vms;
    let running =
        listed.iter().filter(|v| v.state() == gridforge_coordinator::grid::VmState::Running).count();
    println!("  vms running in the grid view: {running} of {}", listed.len());

    // Idle polling.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (stats0, diag0) =
        (counters.node_stats.load(Ordering::Relaxed), counters.diagnostics.load(Ordering::Relaxed));
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(idle_secs as u64)).await;
    let (cpu1, wall) = (cpu_time(pid), t0.elapsed());
    let stats = counters.node_stats.load(Ordering::Relaxed) - stats0;
    let diag = counters.diagnostics.load(Ordering::Relaxed) - diag0;
    let cpu = cpu1 - cpu0;
    println!(
        "idle polling: {nodes} nodes every 5 s, {:.0} s: coordinator CPU {:.2} s = {:.1}% of one core \
         ({stats} NodeStats + {diag} Diagnostics answered, {:.2} ms CPU per node poll)",
        wall.as_secs_f64(),
        cpu.as_secs_f64(),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64(),
        ms(cpu) / stats.max(1) as f64,
    );
    drop(coordinator);
}
