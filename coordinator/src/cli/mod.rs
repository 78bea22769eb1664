//! `gridctl`: the grid's command line. A thin adapter: arguments become Coordinator calls, answers become
//! tables, JSON or progress.

mod output;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use gridforge_common::client::{self, ClientTls};
use gridforge_common::pki::{CaArgs, CertArgs};
use gridforge_proto::v1::coordinator_client::CoordinatorClient;
use gridforge_proto::v1::{
    AddNodeRequest, AddUserRequest, ControlVmRequest, CoordinatorStatusRequest, CordonNodeRequest,
    CreateTokenRequest, CreateVmRequest, DeleteVmRequest, DrainNodeRequest, ExplainVmRequest,
    FenceNodeRequest, GetNodeRequest, GetOperationRequest, GetVmRequest, ListNodesRequest,
    ListOperationsRequest, ListUsersRequest, ListUsersResponse, ListVmsRequest, MigrateVmRequest, Operation,
    PlacementConstraints, RemoveNodeRequest, RemoveUserRequest, ResizeVmRequest, Resources,
    SnapshotVmRequest, VmSpec, WatchOperationRequest, control_job::Action, operation,
};
use gridforge_proto::v1::{
    GetGroupRequest, GetTenantRequest, Group, ListDecisionsRequest, ListNetworksRequest, ListTenantsRequest,
    PutGroupRequest, PutNetworkRequest, PutTenantRequest, Quota, RemoveGroupRequest, RemoveNetworkRequest,
    RemoveTenantRequest,
};
use tonic::Code;
use tonic::transport::Channel;

pub use output::Format;

const EXIT_HELP: &str = "\
Exit codes:
  0  success
  1  failed (an operation failed, or an internal error)
  2  usage error or invalid request (bad flag, invalid spec)
  3  not found (no such node, VM or operation)
  4  refused (already exists, busy, precondition, permission denied)
  5  unschedulable (no node fits; the message says why, node by node)
  6  the coordinator cannot be reached";

#[derive(Parser)]
#[command(
    name = "gridctl",
    version,
    about = "Run a gridforge grid: enroll nodes, create and control VMs, follow operations",
    long_about = "Run a gridforge grid: enroll nodes, create and control VMs, follow operations.\n\n\
                  gridctl talks to gridforge-coordinator over mutual TLS with your certificate (made by \
                  `gridctl pki issue`); its role (admin, operator, viewer) comes from the certificate.",
    after_help = EXIT_HELP
)]
pub struct Cli {
    /// Coordinator address, host:port.
    #[arg(long, global = true, env = "GRIDCTL_SERVER", default_value = "127.0.0.1:7444")]
    server: String,
    /// CA certificate the coordinator's certificate must chain to.
    #[arg(long, global = true, env = "GRIDCTL_CA")]
    ca: Option<PathBuf>,
    /// Your client certificate (`gridctl pki issue`; its OU or CN gives your role). Without --ca, --cert and
    /// --key the connection is plaintext (a coordinator with tls.insecure on loopback only).
    #[arg(long, global = true, env = "GRIDCTL_CERT")]
    cert: Option<PathBuf>,
    /// Your client certificate's private key.
    #[arg(long, global = true, env = "GRIDCTL_KEY")]
    key: Option<PathBuf>,
    /// Output: table, wide (more columns) or json (proto3 JSON).
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Nodes: enroll, list, show, remove, cordon.
    #[command(subcommand)]
    Node(NodeCommand),
    /// VMs: create, list, show, delete, control, resize, snapshot, explain placement.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Operations: what the coordinator is doing and did.
    #[command(subcommand)]
    Op(OpCommand),
    /// Certificates for a grid: the CA, the coordinator's, each node's and each person's.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Who may use the coordinator: certificate names and their roles, kept in the grid view (checked
    /// before the configuration's [auth]).
    #[command(subcommand)]
    User(UserCommand),
    /// Bearer tokens for the HTTP/JSON API and the web panel: each a user "token:NAME" with a role
    /// (`user list` shows them, `user remove token:NAME` revokes one).
    #[command(subcommand)]
    Token(TokenCommand),
    /// The coordinators sharing this grid (on etcd): members, leader, term, store revision and lag.
    #[command(subcommand)]
    Coordinator(CoordinatorCommand),
    /// Tenants (customers): quotas on what their VMs hold together, and their groups.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Groups of a tenant's VMs (a web tier, a database tier): service level, scaling policy, template.
    #[command(subcommand)]
    Group(GroupCommand),
    /// The scaling loop: the decisions it took, with their reasons, or what it would decide now.
    #[command(subcommand)]
    Scaling(ScalingCommand),
    /// Tenant networks: each a VLAN ID of its own on the nodes' tenant bridge, with uplink translations.
    #[command(subcommand)]
    Network(NetworkCommand),
}

#[derive(Subcommand)]
enum NetworkCommand {
    /// Add the network TENANT/NAME (the lowest free VLAN ID of [networks] is its own), or set a known
    /// network's uplink translations.
    Create {
        network: String,
        /// On node NODE's uplink the network has VLAN ID (translated to its own on the bridge), NODE=ID;
        /// repeatable.
        #[arg(long = "translate", value_parser = parse_kv)]
        translate: Vec<(String, String)>,
    },
    /// Networks with their VLAN IDs, translations and VMs.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    Show {
        network: String,
    },
    /// Remove a network no VM uses (its VLAN ID is free again).
    #[command(alias = "rm")]
    Delete {
        network: String,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Add a tenant, or change a known tenant's quota (0 or absent: no limit). Admin.
    Add {
        name: String,
        /// vCPUs its VMs may hold together.
        #[arg(long, default_value_t = 0)]
        vcpus: u32,
        #[arg(long, default_value_t = 0)]
        memory_mib: u64,
        #[arg(long, default_value_t = 0)]
        disk_mib: u64,
        /// VMs it may have.
        #[arg(long, default_value_t = 0)]
        vms: u32,
    },
    /// Tenants with what they use of their quotas.
    #[command(alias = "ls")]
    List,
    Show {
        name: String,
    },
    /// Remove a tenant without VMs (its groups go with it). Admin.
    #[command(alias = "rm")]
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
enum GroupCommand {
    /// Add or change a group from a file: a Group as JSON (tenant, name, serviceLevel, scaling, template,
    /// placement), e.g. examples/group-web.json.
    Put {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// The group TENANT/NAME: its service level and whether it is met, its scaling policy, its members and
    /// their load.
    Show { group: String },
    /// Remove a group without members.
    #[command(alias = "rm")]
    Remove { group: String },
}

#[derive(Subcommand)]
enum ScalingCommand {
    /// Decisions taken, newest first.
    Log {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// What one round would decide now (a dry run: nothing is taken).
    Plan {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Members, the leader and its term, the store's revision and how far this member's view lags.
    Status,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Give the certificate named NAME (its CN) a role; for a known user, change it. Admin only.
    Add {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Scope the user to this tenant: it sees and changes only the tenant's VMs and groups.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The users of the grid view, then the names the configuration's [auth.users] adds.
    #[command(alias = "ls")]
    List,
    /// Take NAME out of the grid view (its certificate then gets what the configuration gives it).
    #[command(alias = "rm")]
    Remove { name: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token named NAME with a role and print it (only its hash is kept: it is shown this once).
    /// Creating a known name replaces its token. Admin only.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Scope the token to this tenant: it sees and changes only the tenant's VMs and groups.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Enroll a node: the coordinator dials its agent, refuses a certificate whose CN is not NAME, and reads
    /// its hypervisor, arch and capacity.
    Add {
        name: String,
        /// The agent's gRPC address, host:port.
        #[arg(long)]
        address: String,
        #[arg(long, default_value = "default")]
        datacenter: String,
        /// Label k=v (repeatable), matched by a VM's node selector.
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        /// Placeable vCPUs per core on this node [default: scheduler.overcommit_cpu].
        #[arg(long)]
        overcommit_cpu: Option<f64>,
        /// Placeable memory per MiB on this node [default: scheduler.overcommit_memory].
        #[arg(long)]
        overcommit_memory: Option<f64>,
        /// Licensed component the node offers (repeatable).
        #[arg(long = "license")]
        licenses: Vec<String>,
        /// A dedicated (bare-metal) server, never a VM host: `vm create --dedicated` provisions its whole
        /// --disk for one tenant and boots it through the power actuator ([power] command).
        #[arg(long, requires = "disk")]
        dedicated: bool,
        /// The dedicated server's whole disk as its agent names it (listed in the agent's jobs.devices).
        #[arg(long, requires = "dedicated", value_name = "DEVICE")]
        disk: Option<String>,
    },
    /// List nodes.
    #[command(alias = "ls")]
    List {
        /// Only the nodes of this datacenter.
        #[arg(long)]
        datacenter: Option<String>,
    },
    /// A node in detail: capacity, allocation, checks, VMs, drift.
    Show {
        name: String,
    },
    /// Forget a node. Refused while VMs live there, unless --force (which forgets those VMs too).
    #[command(alias = "rm")]
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// No new VMs on the node; those there stay.
    Cordon {
        name: String,
    },
    /// Fence a LOST node through the configured actuator (again, after a failed try).
    Fence {
        name: String,
    },
    /// Confirm that a LOST node is powered off (what the manual actuator waits for): its VMs are then
    /// rebuilt elsewhere. Say so only when it is true: a VM must never run twice.
    Fenced {
        name: String,
    },
    /// Cordon the node, then migrate every VM off it (placement picks each destination); the operation
    /// reports what moved where and what could not, and why. A drained node shows Drained.
    Drain {
        name: String,
        /// Deadline after which no further migration starts, e.g. 90s, 10m, 1h.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        deadline: std::time::Duration,
        /// Migrations at once.
        #[arg(long, default_value_t = 2)]
        max_parallel: u32,
        #[command(flatten)]
        wait: WaitArg,
    },
    Uncordon {
        name: String,
    },
}

#[derive(Args)]
struct WaitArg {
    /// Follow the operation until it ends (progress bars on a terminal); exit 1 if it fails.
    #[arg(long)]
    wait: bool,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Create a VM from a spec file (the agent's VmSpec as JSON, e.g. examples/web-1.json, or a
    /// CreateVmRequest with "spec" and "placement").
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Only nodes of this datacenter.
        #[arg(long)]
        datacenter: Option<String>,
        /// Only nodes with this label k=v (repeatable).
        #[arg(long = "selector", value_parser = parse_kv)]
        selector: Vec<(String, String)>,
        /// Anti-affinity group: VMs of one group spread across nodes.
        #[arg(long)]
        spread_group: Option<String>,
        /// Workload class (io-heavy, cpu-heavy, general).
        #[arg(long)]
        workload: Option<String>,
        /// The tenant it belongs to (counted against its quota; a tenant-scoped user's own by default).
        #[arg(long)]
        tenant: Option<String>,
        /// The tenant's group it joins.
        #[arg(long)]
        group: Option<String>,
        /// A network of the tenant it gets a NIC on, tagged with the network's VLAN (repeatable).
        #[arg(long = "network")]
        networks: Vec<String>,
        /// Show where it would go and why, node by node; create nothing.
        #[arg(long)]
        dry_run: bool,
        /// A dedicated server instead of a VM: a free dedicated node (--node, --datacenter apply) gets the
        /// spec's image on its whole disk and is booted through the power actuator.
        #[arg(long, conflicts_with_all = ["group", "networks"])]
        dedicated: bool,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        node: Option<String>,
        /// Include deleted VMs.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        group: Option<String>,
    },
    /// A VM in detail, with its wipe report once deleted.
    Show { name: String },
    /// Stop, undefine and wipe the VM's disk (signed wipe report kept in the VM record).
    #[command(alias = "rm")]
    Delete {
        name: String,
        /// Wipe method (zero, random, discard, crypto-erase, passes:A,B) [default: the agent's].
        #[arg(long)]
        wipe_method: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    Start {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// ACPI shutdown; destroyed after --grace seconds.
    Stop {
        name: String,
        #[arg(long)]
        grace: Option<u32>,
        #[command(flatten)]
        wait: WaitArg,
    },
    Reboot {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    Suspend {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    Resume {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// A VM's own thresholds, for a VM outside a group: above --cpu-up (percent of its vCPUs, averaged over
    /// --window seconds) it gets a vCPU, below --cpu-down it gives one back (within --min-vcpus and
    /// --max-vcpus, and memory likewise with --memory-up/--max-memory-mib), by resize operations (restarting
    /// it) with --cooldown seconds between steps; where its node has no room it is migrated first.
    /// --off removes them. Shown by `vm show`; the decisions by `scaling log`.
    Scaling {
        name: String,
        #[arg(long, value_name = "PERCENT")]
        cpu_up: Option<f64>,
        #[arg(long, value_name = "PERCENT")]
        cpu_down: Option<f64>,
        #[arg(long)]
        min_vcpus: Option<u32>,
        #[arg(long)]
        max_vcpus: Option<u32>,
        #[arg(long, value_name = "PERCENT")]
        memory_up: Option<f64>,
        #[arg(long, value_name = "PERCENT")]
        memory_down: Option<f64>,
        #[arg(long)]
        min_memory_mib: Option<u64>,
        #[arg(long)]
        max_memory_mib: Option<u64>,
        /// Seconds the load is averaged over [default: 60].
        #[arg(long, value_name = "SECS")]
        window: Option<u32>,
        /// Seconds between two steps [default: none].
        #[arg(long, value_name = "SECS")]
        cooldown: Option<u32>,
        #[arg(long, conflicts_with_all = ["cpu_up", "cpu_down", "memory_up", "memory_down"])]
        off: bool,
    },
    /// Immediate power off.
    Destroy {
        name: String,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Move the VM to another node: placement picks it (never the source) unless --to names it. Live where
    /// the VM runs and both nodes offer it (libvirt peer to peer, memory and disk copied while it runs),
    /// else cold: a running VM is shut down, its disk streamed (holes stay holes) and verified on the
    /// destination, started there. Either way the source's copy is wiped only at the end (the signed report
    /// kept on the operation), and the downtime is measured and shown with the mode.
    Migrate {
        name: String,
        /// Destination node.
        #[arg(long)]
        to: Option<String>,
        /// Require a live migration (refused, with the reason, where it is not possible).
        #[arg(long, conflicts_with = "cold")]
        live: bool,
        /// Shut the VM down for the move even where it could move live.
        #[arg(long)]
        cold: bool,
        /// Wipe method for the source's copy (default: the agent's).
        #[arg(long)]
        wipe_method: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Grow the VM in place when its node has room (the disk: the domain must be stopped).
    Resize {
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_mib: Option<u64>,
        /// When the VM's node has no room, migrate it first to a node that has (then resize there).
        #[arg(long)]
        allow_migrate: bool,
        /// A running VM is shut down, resized and started again (otherwise it must be stopped first).
        #[arg(long)]
        restart: bool,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Capture the VM's disk as a signed image in its agent's snapshot store (the domain must be stopped).
    Snapshot {
        name: String,
        #[arg(long)]
        image_name: Option<String>,
        #[arg(long)]
        image_version: Option<String>,
        #[command(flatten)]
        wait: WaitArg,
    },
    /// Why the VM is where it is: per node, the filter that refused it or its score.
    Why { name: String },
}

#[derive(Subcommand)]
enum OpCommand {
    /// List operations, oldest first.
    #[command(alias = "ls")]
    List {
        #[arg(long)]
        vm: Option<String>,
        /// Only unfinished operations (queued or running).
        #[arg(long)]
        active: bool,
        /// Only the newest N.
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    Show {
        id: String,
    },
    /// Follow an operation until it ends.
    Watch {
        id: String,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make the grid CA: DIR/ca.pem and DIR/ca.key (mode 0600). Existing files are never overwritten.
    Init(CaArgs),
    /// Issue DIR/NAME.pem and DIR/NAME.key signed by the CA in DIR (CN=NAME; server and client use): for
    /// the coordinator, a node (NAME = the node name) or a person (with --role).
    Issue {
        #[command(flatten)]
        cert: CertArgs,
        /// Role granted to the holder (the certificate's OU).
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Admin,
    Operator,
    Viewer,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Admin => "admin",
            RoleArg::Operator => "operator",
            RoleArg::Viewer => "viewer",
        }
    }
}

/// "90s", "10m", "1h" or plain seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration such as 90s, 10m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not k=v")),
    }
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    message: String,
    /// A follower's refusal of a write: the leader's address.
    leader: Option<String>,
    /// No connection could be made: nothing was sent.
    unreachable: bool,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        let code = match s.code() {
            Code::InvalidArgument => 2,
            Code::NotFound => 3,
            Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::Unauthenticated => 4,
            Code::ResourceExhausted => 5,
            Code::Unavailable => 6,
            _ => 1,
        };
        let message = if s.message().is_empty() { s.code().to_string() } else { s.message().to_string() };
        let leader =
            s.metadata().get(crate::ha::LEADER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        Failure { code, message, leader, unreachable: false }
    }
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure { code, message: message.into(), leader: None, unreachable: false }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gridctl: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gridctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The coordinator's client: every answer passes [`warn_if_stale`].
type Client = CoordinatorClient<
    tower::util::MapResponse<
        Channel,
        fn(
            tonic::codegen::http::Response<tonic::body::Body>,
        ) -> tonic::codegen::http::Response<tonic::body::Body>,
    >,
>;

/// Says once, on stderr, that an answer came from a view that may be out of date (the coordinator's store
/// does not answer).
fn warn_if_stale(
    resp: tonic::codegen::http::Response<tonic::body::Body>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Some(reason) = resp.headers().get(crate::ha::STALE_HEADER).and_then(|v| v.to_str().ok()) {
        WARNED.call_once(|| eprintln!("gridctl: warning: the coordinator's view may be stale: {reason}"));
    }
    resp
}

/// Times a write refused by a coordinator that does not lead is sent again (at the leader it names, or
/// after 500 ms while none is known).
const NOT_LEADER_RETRIES: usize = 12;

/// The largest answer gridctl accepts.
pub const LISTING_LIMIT: usize = 1 << 30;

async fn connect(cli: &Cli, server: &str) -> Result<Client, Failure> {
    let tls = match (&cli.ca, &cli.cert, &cli.key) {
        (Some(ca), Some(cert), Some(key)) => {
            Some(ClientTls { ca: ca.clone(), cert: cert.clone(), key: key.clone(), domain: None })
        }
        (None, None, None) => None,
        _ => {
            return Err(fail(
                2,
                "give all of --ca, --cert and --key (or GRIDCTL_CA, GRIDCTL_CERT, GRIDCTL_KEY)",
            ));
        }
    };
    let channel = client::channel(server, tls.as_ref())
        .await
        .map_err(|e| Failure { unreachable: true, ..fail(6, crate::error_chain(&e)) })?;
    let channel = tower::ServiceExt::map_response(channel, warn_if_stale as fn(_) -> _);
    // A whole grid's listing (`vm list` of tens of thousands of VMs) is past tonic's 4 MiB default.
    Ok(CoordinatorClient::new(channel).max_decoding_message_size(LISTING_LIMIT))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = output::Output::new(cli.output);
    if let Command::Pki(p) = &cli.command {
        return run_pki(p, &out);
    }
    let mut result = run_at(&cli, &cli.server, &out).await;
    // A follower refuses a write before doing anything, naming the leader: the command runs again there.
    // While no leader is known (an election, a take-over), again after a pause, for a few seconds.
    let mut server = cli.server.clone();
    // A leader named that cannot be reached has gone since it was named: the member first asked names the
    // next one.
    for _ in 0..NOT_LEADER_RETRIES {
        match &result {
            Err(Failure { leader: Some(leader), .. }) if !leader.is_empty() && *leader != server => {
                server = leader.clone();
            }
            Err(Failure { leader: Some(_), .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(Failure { unreachable: true, .. }) if server != cli.server => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                server = cli.server.clone();
            }
            _ => break,
        }
        result = run_at(&cli, &server, &out).await;
    }
    result.map_err(|mut f| {
        if cli.cert.is_none()
            && (f.message.contains("h2 protocol error") || f.message.contains("transport error"))
        {
            f.code = 6;
            f.message.push_str(" (plaintext to a TLS coordinator? give --ca, --cert and --key)");
        }
        f
    })
}

async fn run_at(cli: &Cli, server: &str, out: &output::Output) -> Result<(), Failure> {
    let mut c = connect(cli, server).await?;
    match &cli.command {
        Command::Node(n) => run_node(&mut c, n, out).await,
        Command::Vm(v) => run_vm(&mut c, v, out).await,
        Command::Op(o) => run_op(&mut c, o, out).await,
        Command::User(u) => run_user(&mut c, u, out).await,
        Command::Token(TokenCommand::Create { name, role, tenant }) => {
            let req = CreateTokenRequest {
                name: name.clone(),
                role: role.as_str().into(),
                tenant: tenant.clone().unwrap_or_default(),
            };
            out.token(&c.create_token(req).await?.into_inner());
            Ok(())
        }
        Command::Coordinator(CoordinatorCommand::Status) => {
            out.coordinator_status(&c.coordinator_status(CoordinatorStatusRequest {}).await?.into_inner());
            Ok(())
        }
        Command::Tenant(t) => run_tenant(&mut c, t, out).await,
        Command::Group(g) => run_group(&mut c, g, out).await,
        Command::Network(n) => run_network(&mut c, n, out).await,
        Command::Scaling(x) => {
            let req = match x {
                ScalingCommand::Log { tenant, limit } => ListDecisionsRequest {
                    plan: false,
                    tenant: tenant.clone().unwrap_or_default(),
                    limit: *limit,
                },
                ScalingCommand::Plan { tenant } => {
                    ListDecisionsRequest { plan: true, tenant: tenant.clone().unwrap_or_default(), limit: 0 }
                }
            };
            out.decisions(&c.list_decisions(req).await?.into_inner().decisions);
            Ok(())
        }
        Command::Pki(_) => Ok(()),
    }
}

async fn run_tenant(c: &mut Client, cmd: &TenantCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        TenantCommand::Add { name, vcpus, memory_mib, disk_mib, vms } => {
            let quota = Quota { vcpus: *vcpus, memory_mib: *memory_mib, disk_mib: *disk_mib, vms: *vms };
            let t = c.put_tenant(PutTenantRequest { name: name.clone(), quota: Some(quota) }).await?;
            out.tenants(&[t.into_inner()]);
        }
        TenantCommand::List => {
            out.tenants(&c.list_tenants(ListTenantsRequest {}).await?.into_inner().tenants)
        }
        TenantCommand::Show { name } => {
            out.tenants(&[c.get_tenant(GetTenantRequest { name: name.clone() }).await?.into_inner()])
        }
        TenantCommand::Remove { name } => {
            c.remove_tenant(RemoveTenantRequest { name: name.clone() }).await?;
            if !out.is_json() {
                println!("tenant {name} removed");
            }
        }
    }
    Ok(())
}

async fn run_network(c: &mut Client, cmd: &NetworkCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        NetworkCommand::Create { network, translate } => {
            let (tenant, name) = group_name(network)?;
            let mut uplink_vlans = HashMap::new();
            for (node, id) in translate {
                let id: u32 =
                    id.parse().map_err(|_| fail(2, format!("--translate {node}={id}: not a VLAN ID")))?;
                uplink_vlans.insert(node.clone(), id);
            }
            let n = c.put_network(PutNetworkRequest { tenant, name, uplink_vlans }).await?.into_inner();
            out.networks(&[n]);
        }
        NetworkCommand::List { tenant } => {
            let req = ListNetworksRequest { tenant: tenant.clone().unwrap_or_default() };
            out.networks(&c.list_networks(req).await?.into_inner().networks);
        }
        NetworkCommand::Show { network } => {
            let (tenant, name) = group_name(network)?;
            let all = c.list_networks(ListNetworksRequest { tenant: tenant.clone() }).await?.into_inner();
            let n = all.networks.into_iter().find(|n| n.name == name);
            let n = n.ok_or_else(|| fail(3, format!("tenant {tenant} has no network {name:?}")))?;
            out.networks(&[n]);
        }
        NetworkCommand::Delete { network } => {
            let (tenant, name) = group_name(network)?;
            c.remove_network(RemoveNetworkRequest { tenant, name }).await?;
            if !out.is_json() {
                println!("network {network} removed");
            }
        }
    }
    Ok(())
}

/// "TENANT/NAME" as its two parts.
fn group_name(s: &str) -> Result<(String, String), Failure> {
    match s.split_once('/') {
        Some((t, g)) if !t.is_empty() && !g.is_empty() => Ok((t.into(), g.into())),
        _ => Err(fail(2, format!("{s:?}: name it as TENANT/NAME"))),
    }
}

async fn run_group(c: &mut Client, cmd: &GroupCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        GroupCommand::Put { file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
            let group: Group = serde_json::from_str(&text)
                .map_err(|e| fail(2, format!("{}: not a group (JSON): {e}", file.display())))?;
            out.group(&c.put_group(PutGroupRequest { group: Some(group) }).await?.into_inner());
        }
        GroupCommand::Show { group } => {
            let (tenant, name) = group_name(group)?;
            out.group_status(&c.get_group(GetGroupRequest { tenant, name }).await?.into_inner());
        }
        GroupCommand::Remove { group } => {
            let (tenant, name) = group_name(group)?;
            c.remove_group(RemoveGroupRequest { tenant, name }).await?;
            if !out.is_json() {
                println!("group {group} removed");
            }
        }
    }
    Ok(())
}

fn run_pki(p: &PkiCommand, out: &output::Output) -> Result<(), Failure> {
    let issued = match p {
        PkiCommand::Init(ca) => ca.init(),
        PkiCommand::Issue { cert, role } => cert.issue(role.map(RoleArg::as_str)),
    }
    .map_err(|e| fail(1, crate::error_chain(&e)))?;
    out.issued(&issued);
    Ok(())
}

async fn run_node(c: &mut Client, cmd: &NodeCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        NodeCommand::Add {
            name,
            address,
            datacenter,
            labels,
            overcommit_cpu,
            overcommit_memory,
            licenses,
            dedicated,
            disk,
        } => {
            let req = AddNodeRequest {
                dedicated: *dedicated,
                disk: disk.clone().unwrap_or_default(),
                name: name.clone(),
                address: address.clone(),
                datacenter: datacenter.clone(),
                labels: labels.iter().cloned().collect::<HashMap<_, _>>(),
                overcommit_cpu: overcommit_cpu.unwrap_or(0.0),
                overcommit_memory: overcommit_memory.unwrap_or(0.0),
                licenses: licenses.clone(),
            };
            let node = c.add_node(req).await?.into_inner();
            out.nodes(&[node]);
        }
        NodeCommand::List { datacenter } => {
            let req = ListNodesRequest { datacenter: datacenter.clone().unwrap_or_default() };
            out.nodes(&c.list_nodes(req).await?.into_inner().nodes)
        }
        NodeCommand::Show { name } => {
            out.node(&c.get_node(GetNodeRequest { name: name.clone() }).await?.into_inner())
        }
        NodeCommand::Remove { name, force } => {
            let r =
                c.remove_node(RemoveNodeRequest { name: name.clone(), force: *force }).await?.into_inner();
            out.removed(&r);
        }
        NodeCommand::Drain { name, deadline, max_parallel, wait } => {
            let req = DrainNodeRequest {
                name: name.clone(),
                max_parallel: *max_parallel,
                deadline_seconds: u32::try_from(deadline.as_secs().max(1)).unwrap_or(u32::MAX),
            };
            let op = c.drain_node(req).await?.into_inner();
            if wait.wait {
                return follow(c, &op.id, out).await;
            }
            out.operations(&[op]);
        }
        NodeCommand::Fence { name } => {
            out.operations(&[c.fence_node(FenceNodeRequest { name: name.clone() }).await?.into_inner()])
        }
        NodeCommand::Fenced { name } => {
            out.nodes(&[c.confirm_fenced(FenceNodeRequest { name: name.clone() }).await?.into_inner()])
        }
        NodeCommand::Cordon { name } => {
            out.nodes(&[c.cordon_node(CordonNodeRequest { name: name.clone() }).await?.into_inner()])
        }
        NodeCommand::Uncordon { name } => {
            out.nodes(&[c.uncordon_node(CordonNodeRequest { name: name.clone() }).await?.into_inner()])
        }
    }
    Ok(())
}

fn read_create(file: &PathBuf) -> Result<CreateVmRequest, Failure> {
    let text =
        std::fs::read_to_string(file).map_err(|e| fail(2, format!("cannot read {}: {e}", file.display())))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| fail(2, format!("{}: not JSON: {e}", file.display())))?;
    let bad = |e: serde_json::Error| fail(2, format!("{}: {e}", file.display()));
    if value.get("spec").is_some() {
        serde_json::from_value(value).map_err(bad)
    } else {
        let spec: VmSpec = serde_json::from_value(value).map_err(bad)?;
        Ok(CreateVmRequest { spec: Some(spec), ..Default::default() })
    }
}

async fn run_vm(c: &mut Client, cmd: &VmCommand, out: &output::Output) -> Result<(), Failure> {
    let (op, wait) = match cmd {
        VmCommand::Create {
            file,
            node,
            datacenter,
            selector,
            spread_group,
            workload,
            tenant,
            group,
            networks,
            dry_run,
            dedicated,
            wait,
        } => {
            let mut req = read_create(file)?;
            req.dedicated |= *dedicated;
            let p = req.placement.get_or_insert_with(PlacementConstraints::default);
            if let Some(n) = node {
                p.node = n.clone();
            }
            if let Some(d) = datacenter {
                p.datacenter = d.clone();
            }
            p.node_selector.extend(selector.iter().cloned());
            if let Some(g) = spread_group {
                p.spread_group = g.clone();
            }
            if let Some(w) = workload {
                p.workload = w.clone();
            }
            if let Some(t) = tenant {
                req.tenant = t.clone();
            }
            if let Some(g) = group {
                req.group = g.clone();
            }
            req.networks.extend(networks.iter().cloned());
            req.dry_run = *dry_run;
            let resp = c.create_vm(req).await?.into_inner();
            if *dry_run {
                out.explanation(&resp.explanation.unwrap_or_default());
                return Ok(());
            }
            (resp.operation.unwrap_or_default(), wait.wait)
        }
        VmCommand::List { node, all, tenant, group } => {
            let req = ListVmsRequest {
                node: node.clone().unwrap_or_default(),
                all: *all,
                tenant: tenant.clone().unwrap_or_default(),
                group: group.clone().unwrap_or_default(),
            };
            out.vms(&c.list_vms(req).await?.into_inner().vms);
            return Ok(());
        }
        VmCommand::Show { name } => {
            out.vm(&c.get_vm(GetVmRequest { name: name.clone() }).await?.into_inner());
            return Ok(());
        }
        VmCommand::Scaling {
            name,
            cpu_up,
            cpu_down,
            min_vcpus,
            max_vcpus,
            memory_up,
            memory_down,
            min_memory_mib,
            max_memory_mib,
            window,
            cooldown,
            off,
        } => {
            let scaling = (!*off).then(|| gridforge_proto::v1::ScalingPolicy {
                vertical: true,
                cpu_up_percent: cpu_up.unwrap_or(0.0),
                cpu_down_percent: cpu_down.unwrap_or(0.0),
                memory_up_percent: memory_up.unwrap_or(0.0),
                memory_down_percent: memory_down.unwrap_or(0.0),
                min_vcpus: min_vcpus.unwrap_or(0),
                max_vcpus: max_vcpus.unwrap_or(0),
                min_memory_mib: min_memory_mib.unwrap_or(0),
                max_memory_mib: max_memory_mib.unwrap_or(0),
                window_secs: window.unwrap_or(0),
                cooldown_secs: cooldown.unwrap_or(0),
                ..Default::default()
            });
            let req = gridforge_proto::v1::SetVmScalingRequest { name: name.clone(), scaling };
            out.vm(&c.set_vm_scaling(req).await?.into_inner());
            return Ok(());
        }
        VmCommand::Why { name } => {
            out.explanation(&c.explain_vm(ExplainVmRequest { name: name.clone() }).await?.into_inner());
            return Ok(());
        }
        VmCommand::Delete { name, wipe_method, wait } => {
            let req =
                DeleteVmRequest { name: name.clone(), wipe_method: wipe_method.clone().unwrap_or_default() };
            (c.delete_vm(req).await?.into_inner(), wait.wait)
        }
        VmCommand::Start { name, wait } => (control(c, name, Action::Start, 0).await?, wait.wait),
        VmCommand::Stop { name, grace, wait } => {
            (control(c, name, Action::Stop, grace.unwrap_or(0)).await?, wait.wait)
        }
        VmCommand::Reboot { name, wait } => (control(c, name, Action::Reboot, 0).await?, wait.wait),
        VmCommand::Suspend { name, wait } => (control(c, name, Action::Suspend, 0).await?, wait.wait),
        VmCommand::Resume { name, wait } => (control(c, name, Action::Resume, 0).await?, wait.wait),
        VmCommand::Destroy { name, wait } => (control(c, name, Action::Destroy, 0).await?, wait.wait),
        VmCommand::Resize { name, vcpus, memory_mib, disk_mib, allow_migrate, restart, wait } => {
            let req = ResizeVmRequest {
                name: name.clone(),
                vcpus: vcpus.unwrap_or(0),
                memory_mib: memory_mib.unwrap_or(0),
                disk_mib: disk_mib.unwrap_or(0),
                restart: *restart,
            };
            match c.resize_vm(req.clone()).await {
                Err(status) if *allow_migrate && status.code() == Code::ResourceExhausted => {
                    eprintln!("gridctl: {}: migrating first", status.message());
                    let room_for =
                        Resources { vcpus: req.vcpus, memory_mib: req.memory_mib, disk_mib: req.disk_mib };
                    let migrate = MigrateVmRequest {
                        name: name.clone(),
                        room_for: Some(room_for),
                        ..Default::default()
                    };
                    let op = c.migrate_vm(migrate).await?.into_inner();
                    follow(c, &op.id, out).await?;
                    (c.resize_vm(req).await?.into_inner(), wait.wait)
                }
                answer => (answer?.into_inner(), wait.wait),
            }
        }
        VmCommand::Migrate { name, to, live, cold, wipe_method, wait } => {
            let req = MigrateVmRequest {
                name: name.clone(),
                to: to.clone().unwrap_or_default(),
                live: *live,
                cold: *cold,
                wipe_method: wipe_method.clone().unwrap_or_default(),
                room_for: None,
            };
            (c.migrate_vm(req).await?.into_inner(), wait.wait)
        }
        VmCommand::Snapshot { name, image_name, image_version, wait } => {
            let req = SnapshotVmRequest {
                name: name.clone(),
                image_name: image_name.clone().unwrap_or_default(),
                image_version: image_version.clone().unwrap_or_default(),
                notes: String::new(),
            };
            (c.snapshot_vm(req).await?.into_inner(), wait.wait)
        }
    };
    if wait {
        follow(c, &op.id, out).await
    } else {
        out.operations(&[op]);
        Ok(())
    }
}

async fn control(c: &mut Client, name: &str, action: Action, grace: u32) -> Result<Operation, Failure> {
    let req = ControlVmRequest { name: name.to_string(), action: action as i32, grace_seconds: grace };
    Ok(c.control_vm(req).await?.into_inner())
}

/// Follow an operation to its end; a failed operation exits 1.
async fn follow(c: &mut Client, id: &str, out: &output::Output) -> Result<(), Failure> {
    let mut stream = c.watch_operation(WatchOperationRequest { id: id.to_string() }).await?.into_inner();
    let mut progress = out.progress();
    let mut last: Option<Operation> = None;
    while let Some(ev) = stream.message().await? {
        progress.event(&ev);
        if let Some(op) = ev.snapshot {
            last = Some(op);
        }
    }
    progress.finish();
    // The stream ends after the last event; if it broke early, ask for the operation as it stands.
    let op = match last {
        Some(op) if crate::grid::is_finished(&op) => op,
        _ => c.get_operation(GetOperationRequest { id: id.to_string() }).await?.into_inner(),
    };
    out.operation_done(&op);
    match op.state() {
        operation::State::Succeeded => Ok(()),
        operation::State::Failed => Err(fail(1, format!("operation {} failed: {}", op.id, op.error))),
        s => Err(fail(1, format!("operation {} is still {}", op.id, s.as_str_name()))),
    }
}

async fn run_op(c: &mut Client, cmd: &OpCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        OpCommand::List { vm, active, limit } => {
            let req =
                ListOperationsRequest { vm: vm.clone().unwrap_or_default(), active: *active, limit: *limit };
            out.operations(&c.list_operations(req).await?.into_inner().operations);
        }
        OpCommand::Show { id } => {
            out.operation(&c.get_operation(GetOperationRequest { id: id.clone() }).await?.into_inner())
        }
        OpCommand::Watch { id } => return follow(c, id, out).await,
    }
    Ok(())
}

async fn run_user(c: &mut Client, cmd: &UserCommand, out: &output::Output) -> Result<(), Failure> {
    match cmd {
        UserCommand::Add { name, role, tenant } => {
            let req = AddUserRequest {
                name: name.clone(),
                role: role.as_str().into(),
                tenant: tenant.clone().unwrap_or_default(),
            };
            out.users(&ListUsersResponse {
                users: vec![c.add_user(req).await?.into_inner()],
                ..Default::default()
            })
        }
        UserCommand::List => out.users(&c.list_users(ListUsersRequest {}).await?.into_inner()),
        UserCommand::Remove { name } => {
            let r = c.remove_user(RemoveUserRequest { name: name.clone() }).await?.into_inner();
            out.user_removed(&r);
        }
    }
    Ok(())
}
