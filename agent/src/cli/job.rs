//! `gridforge-agent job`: submit, follow, inspect and cancel an agent's jobs over gRPC, for ops without
//! grpcurl.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use gridforge_common::client::{self, ClientTls};
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    CancelJobRequest, GetJobRequest, Job, JobEvent, JobKind, JobState, ListJobsRequest, SubmitJobRequest,
    WatchJobRequest, job::Outcome,
};
use tonic::transport::Channel;

#[derive(Args)]
pub struct JobArgs {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: JobCommand,
}

/// Where the agent is and how to authenticate to it.
#[derive(Args)]
struct ConnArgs {
    /// Agent endpoint: host:port or https://host:port (http://host:port with --insecure).
    #[arg(long, global = true, env = "GRIDFORGE_SERVER")]
    server: Option<String>,
    /// CA certificate the agent's certificate must chain to.
    #[arg(long, global = true, env = "GRIDFORGE_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (its CN is the caller's name, e.g. the operator of wipe reports).
    #[arg(long, global = true, env = "GRIDFORGE_CERT")]
    cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long, global = true, env = "GRIDFORGE_KEY")]
    key: Option<PathBuf>,
    /// Name to check the agent's certificate against [default: the endpoint's host].
    #[arg(long, global = true, env = "GRIDFORGE_TLS_DOMAIN")]
    domain: Option<String>,
    /// Plaintext without certificates, for an agent with `tls.insecure = true` (development only).
    #[arg(long, global = true)]
    insecure: bool,
}

#[derive(Subcommand)]
enum JobCommand {
    /// Submit a job from a SubmitJobRequest in proto3 JSON (an idempotency_key is generated if the file has
    /// none) and print its id; with --watch, follow it to its end.
    Submit {
        /// The request file ("-" reads standard input).
        #[arg(long)]
        file: PathBuf,
        /// Follow the job's progress; exit 0 only if it succeeds.
        #[arg(long)]
        watch: bool,
    },
    /// Print a job's progress until it ends; exit 0 only if it succeeded.
    Watch {
        /// Job id.
        id: String,
        /// First event to show (events are numbered from 0).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Show a job: state, steps, outcome (--json: the whole Job in proto3 JSON).
    Get {
        /// Job id.
        id: String,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (repeatable).
        #[arg(long, value_enum)]
        state: Vec<StateArg>,
        /// Only jobs of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// At most this many jobs (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Cancel a queued job, or stop a running one at its next safe point.
    Cancel {
        /// Job id.
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Interrupted,
}

impl StateArg {
    fn state(self) -> JobState {
        match self {
            StateArg::Queued => JobState::Queued,
            StateArg::Running => JobState::Running,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Failed => JobState::Failed,
            StateArg::Cancelled => JobState::Cancelled,
            StateArg::Interrupted => JobState::Interrupted,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Provision,
    Wipe,
    Resize,
    Snapshot,
    Control,
    Delete,
}

impl KindArg {
    fn kind(self) -> JobKind {
        match self {
            KindArg::Provision => JobKind::Provision,
            KindArg::Wipe => JobKind::Wipe,
            KindArg::Resize => JobKind::Resize,
            KindArg::Snapshot => JobKind::Snapshot,
            KindArg::Control => JobKind::Control,
            KindArg::Delete => JobKind::Delete,
        }
    }
}

pub fn run(args: JobArgs, json: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(args, json))
}

async fn run_async(args: JobArgs, json: bool) -> Result<()> {
    // Read the request before connecting: a bad file is reported as such, whatever the network does.
    let submit = match &args.command {
        JobCommand::Submit { file, .. } => Some(read_request(file)?),
        _ => None,
    };
    let mut client = connect(&args.conn).await?;
    match args.command {
        JobCommand::Submit { watch, .. } => {
            let req = submit.expect("read above");
            let job = client.submit_job(req).await.map_err(status("submitting the job"))?.into_inner();
            if json {
                println!("{}", serde_json::to_string(&job)?);
            } else {
                println!("submitted job {} ({}, {})", job.id, kind_name(&job), state_name(job.state()));
            }
            if watch {
                follow(&mut client, &job.id, 0, json).await?;
            }
        }
        JobCommand::Watch { id, from } => follow(&mut client, &id, from, json).await?,
        JobCommand::Get { id } => {
            let job = client
                .get_job(GetJobRequest { job_id: id.clone() })
                .await
                .map_err(status(&format!("getting job {id}")))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print_job(&job);
            }
        }
        JobCommand::List { state, kind, limit } => {
            let req = ListJobsRequest {
                states: state.iter().map(|s| s.state() as i32).collect(),
                kind: kind.map(|k| k.kind() as i32).unwrap_or_default(),
                limit,
            };
            let jobs = client.list_jobs(req).await.map_err(status("listing jobs"))?.into_inner().jobs;
            if json {
                for job in &jobs {
                    println!("{}", serde_json::to_string(job)?);
                }
            } else {
                for job in &jobs {
                    println!(
                        "{:<34} {:<10} {:<12} {:<22} {}",
                        job.id,
                        kind_name(job),
                        state_name(job.state()),
                        time_text(job.created.as_ref()),
                        if job.target.is_empty() { &job.domain } else { &job.target }
                    );
                }
                if jobs.is_empty() {
                    eprintln!("no jobs");
                }
            }
        }
        JobCommand::Cancel { id } => {
            let job = client
                // Sent as from a coordinator without leader election: once an elected leader has sent jobs
                // to the agent, it refuses this (FAILED_PRECONDITION, naming both terms).
                .cancel_job(CancelJobRequest { job_id: id.clone(), leader_term: 0 })
                .await
                .map_err(status(&format!("cancelling job {id}")))?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string(&job)?);
            } else if job.state() == JobState::Cancelled {
                println!("job {} cancelled", job.id);
            } else {
                println!(
                    "job {} ({}): cancel requested; it stops at its next safe point",
                    job.id,
                    state_name(job.state())
                );
            }
        }
    }
    Ok(())
}

async fn connect(conn: &ConnArgs) -> Result<AgentClient<Channel>> {
    let Some(server) = conn.server.as_deref() else {
        bail!("no agent given: pass --server HOST:PORT or set GRIDFORGE_SERVER");
    };
    let tls = if conn.insecure {
        None
    } else {
        match (&conn.ca, &conn.cert, &conn.key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                domain: conn.domain.clone(),
            }),
            _ => bail!(
                "mutual TLS needs --ca, --cert and --key (or GRIDFORGE_CA, GRIDFORGE_CERT, GRIDFORGE_KEY); \
                 --insecure talks plaintext to an agent with tls.insecure = true"
            ),
        }
    };
    Ok(client::connect(server, tls.as_ref()).await?)
}

fn read_request(file: &PathBuf) -> Result<SubmitJobRequest> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the request from standard input")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading request {}", file.display()))?
    };
    let mut req: SubmitJobRequest = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a SubmitJobRequest in proto3 JSON", file.display()))?;
    if req.idempotency_key.is_empty() {
        req.idempotency_key = format!("cli-{}", uuid::Uuid::new_v4().simple());
        eprintln!("idempotency_key: {} (generated)", req.idempotency_key);
    }
    Ok(req)
}

/// Print a job's events until its final one; succeed only if it succeeded.
async fn follow(client: &mut AgentClient<Channel>, id: &str, from: u64, json: bool) -> Result<()> {
    let mut stream = client
        .watch_job(WatchJobRequest { job_id: id.to_string(), from_seq: from })
        .await
        .map_err(status(&format!("watching job {id}")))?
        .into_inner();
    let mut last = None;
    while let Some(ev) = stream.message().await.map_err(status(&format!("watching job {id}")))? {
        if json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            println!("{}", event_line(&ev));
        }
        if ev.state != JobState::Unspecified as i32 {
            last = Some(ev.state());
        }
    }
    let job = client
        .get_job(GetJobRequest { job_id: id.to_string() })
        .await
        .map_err(status(&format!("getting job {id}")))?
        .into_inner();
    match (last, job.state()) {
        (_, JobState::Succeeded) => Ok(()),
        (None, state) if !is_final(state) => {
            bail!("the event stream of job {id} ended while it is {}", state_name(state))
        }
        (_, state) => bail!("job {id} ended {}{}", state_name(state), error_text(&job)),
    }
}

fn is_final(state: JobState) -> bool {
    !matches!(state, JobState::Queued | JobState::Running | JobState::Unspecified)
}

fn event_line(ev: &JobEvent) -> String {
    let time = time_text(ev.time.as_ref());
    let step = if ev.step.is_empty() { "-" } else { &ev.step };
    if ev.state != JobState::Unspecified as i32 {
        return format!("{time} [{step}] {}: {}", state_name(ev.state()), ev.message);
    }
    if ev.message.is_empty() && ev.bytes_total > 0 {
        let pct = ev.bytes_done as f64 * 100.0 / ev.bytes_total as f64;
        return format!("{time} [{step}] {} / {} ({pct:.1}%)", size(ev.bytes_done), size(ev.bytes_total));
    }
    if ev.message.is_empty() {
        return format!("{time} [{step}] {}", size(ev.bytes_done));
    }
    format!("{time} [{step}] {}", ev.message)
}

fn print_job(job: &Job) {
    println!("job:      {}", job.id);
    println!("kind:     {}", kind_name(job));
    println!("state:    {}", state_name(job.state()));
    if !job.target.is_empty() {
        println!("target:   {}", job.target);
    }
    if !job.domain.is_empty() {
        println!("domain:   {}", job.domain);
    }
    println!("key:      {}", job.idempotency_key);
    println!("created:  {}", time_text(job.created.as_ref()));
    if job.started.is_some() {
        println!("started:  {}", time_text(job.started.as_ref()));
    }
    if job.finished.is_some() {
        println!("finished: {}", time_text(job.finished.as_ref()));
    }
    for s in &job.steps {
        let bytes = if s.bytes_total > 0 {
            format!(" {} / {}", size(s.bytes_done), size(s.bytes_total))
        } else {
            String::new()
        };
        println!("  step {:<12} {}{bytes}", s.name, state_name(s.state()));
    }
    match &job.outcome {
        None => {}
        Some(Outcome::Error(_)) => println!("error:    {}", error_text(job).trim_start_matches(": ").trim()),
        Some(Outcome::Wipe(w)) => {
            println!("wiped:    {} bytes, verified: {}", w.bytes, w.verified);
            let report: serde_json::Value = serde_json::from_str(&w.report_json).unwrap_or_default();
            println!(
                "report:   method {}, operator {} (the signed report: `job get {} --json`)",
                report["sanitization"]["method"].as_str().unwrap_or("?"),
                report["operator"].as_str().unwrap_or("?"),
                job.id
            );
        }
        Some(other) => {
            let value = match other {
                Outcome::Provision(r) => serde_json::to_string(r),
                Outcome::Snapshot(r) => serde_json::to_string(r),
                Outcome::Resize(r) => serde_json::to_string(r),
                Outcome::Control(r) => serde_json::to_string(r),
                Outcome::MigrateSend(r) => serde_json::to_string(r),
                Outcome::MigrateReceive(r) => serde_json::to_string(r),
                Outcome::DeleteBase(r) => serde_json::to_string(r),
                Outcome::Error(_) | Outcome::Wipe(_) => unreachable!("handled above"),
            };
            println!("result:   {}", value.unwrap_or_default());
        }
    }
}

fn error_text(job: &Job) -> String {
    match &job.outcome {
        Some(Outcome::Error(e)) => {
            let code = gridforge_proto::v1::error::Code::try_from(e.code)
                .map(|c| c.as_str_name().to_string())
                .unwrap_or_else(|_| e.code.to_string());
            let step = if e.step.is_empty() { String::new() } else { format!(" in step {}", e.step) };
            format!(": {code}{step}: {}", e.message)
        }
        _ => String::new(),
    }
}

fn kind_name(job: &Job) -> &'static str {
    job.kind().as_str_name()
}

fn state_name(state: JobState) -> &'static str {
    state.as_str_name()
}

/// RFC 3339, as the proto3 JSON mapping writes timestamps.
fn time_text(t: Option<&pbjson_types::Timestamp>) -> String {
    t.and_then(|t| serde_json::to_value(t).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".to_string())
}

fn size(bytes: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// A gRPC failure as an error naming what was being done, the status code and the server's message.
fn status(what: &str) -> impl FnOnce(tonic::Status) -> anyhow::Error + '_ {
    move |s| {
        // A transport failure carries its causes; the status message often already holds some of them.
        let message = format!("{what}: {:?}: {}", s.code(), s.message());
        anyhow::anyhow!(gridforge_common::with_causes(message, std::error::Error::source(&s)))
    }
}
