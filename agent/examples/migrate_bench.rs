//! Cold migration of a shut-off VM between two real agent daemons (`gridforge-agent serve` as node-a and
//! node-b on 127.0.0.1, node certificates from one CA, each with a libvirt test-driver state and a pool),
//! against what an operator would otherwise do: copy the raw disk file over loopback TCP with `dd | nc`.
//!
//! Each round starts both daemons afresh and writes node-a's disk: a 4 GiB sparse file holding 1 GiB of data
//! (64 extents of 16 MiB of ChaCha8 output, one every 64 MiB). Caches are dropped before each timed side
//! when this runs as root. The migration is timed from submitting MIGRATE_SEND on node-a (MIGRATE_RECEIVE
//! already waits on node-b) to the receive job having succeeded; the copy from starting `dd` to the
//! destination's last byte fsynced. Both destinations are checked against the source's sha256, the
//! migrated one also for staying sparse.
//!
//! Used by `bench/migrate`.
//!
//! ```text
//! migrate_bench AGENT_BIN WORK_DIR [ROUNDS]
//! ```

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bench_support::{Daemon, follow, ready};
use chacha20::ChaCha8Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use gridforge_common::net::unused_loopback_port;
use gridforge_common::pki::{self, CertRequest};
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    ControlJob, GetJobRequest, JobEvent, JobState, Machine, MigrateReceiveJob, MigrateSendJob,
    SubmitJobRequest, VmSpec, control_job::Action, job::Outcome, submit_job_request,
};
use gridforge_testsupport::{AgentConfig, Pki};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

mod bench_support;

const MIB: u64 = 1 << 20;
const DISK_BYTES: u64 = 4096 * MIB;
const EXTENTS: u64 = 64;
const EXTENT_BYTES: u64 = 16 * MIB;
const DATA_BYTES: u64 = EXTENTS * EXTENT_BYTES;
const VM: &str = "vm1";

/// One agent daemon: its directory, pool, gRPC address and client.
struct Agent {
    pool: PathBuf,
    grpc: SocketAddr,
    client: AgentClient<Channel>,
    _daemon: Daemon,
}

/// Libvirt test-driver state: the agent's pool `gridforge` in `pool`, with the shut-off domain `vm1` on
/// volume `vm1.raw` when `with_vm`.
fn driver_state(pool: &Path, with_vm: bool) -> String {
    let pool_dir = pool.display();
    let (volume, domain) = if with_vm {
        (
            format!("<volume type='file'><name>{VM}.raw</name><capacity>{DISK_BYTES}</capacity></volume>"),
            format!(
                "<domain type='test'><name>{VM}</name><memory>524288</memory><vcpu>1</vcpu>\
                 <os><type>hvm</type></os><devices><disk type='file' device='disk'>\
                 <source file='{pool_dir}/{VM}.raw'/><target dev='vda' bus='virtio'/></disk></devices>\
                 </domain>"
            ),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "<node>{domain}<pool type='dir'><name>gridforge</name><target><path>{pool_dir}</path></target>\
         {volume}</pool></node>"
    )
}

impl Agent {
    /// Start `gridforge-agent serve` as node `name` under `root`, its libvirt the test driver on `state`.
    async fn start(
        agent_bin: &Path,
        pki: &Pki,
        root: &Path,
        name: &str,
        with_vm: bool,
    ) -> anyhow::Result<Agent> {
        let pool = root.join("pool");
        std::fs::create_dir_all(&pool)?;
        let driver = root.join("libvirt.xml");
        std::fs::write(&driver, driver_state(&pool, with_vm))?;
        let grpc: SocketAddr = ([127, 0, 0, 1], unused_loopback_port()).into();
        let config = root.join("agent.toml");
        AgentConfig::new(name, grpc, root, pki, name)
            .libvirt(&format!("test://{}", driver.display()), "domain_type = \"qemu\"")
            .write(&config);
        let log_path = root.join("agent.log");
        let log = File::create(&log_path)?;
        let mut daemon = Daemon(
            Command::new(agent_bin)
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .env_remove("NOTIFY_SOCKET")
                .env_remove("WATCHDOG_USEC")
                .spawn()
                .context("starting gridforge-agent serve")?,
        );
        let client = ready(&format!("https://{grpc}"), &pki.client("ops"), &mut daemon, &log_path).await?;
        Ok(Agent { pool, grpc, client, _daemon: daemon })
    }

    /// Power off domain `vm1`: the test driver starts the domains of its state file, and a cold migration
    /// takes a shut-off one.
    async fn shut_off(&mut self) -> anyhow::Result<()> {
        let destroy = SubmitJobRequest {
            idempotency_key: format!("destroy-{VM}"),
            job: Some(submit_job_request::Job::Control(ControlJob {
                domain: VM.into(),
                action: Action::Destroy as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let id = self.client.submit_job(destroy).await?.into_inner().id;
        let events = follow(self.client.clone(), &id, None).await?;
        let last = events.last().context("no events")?;
        ensure!(last.state() == JobState::Succeeded, "powering off {VM} failed: {last:?}");
        Ok(())
    }
}

/// The CA and the certificates of both nodes and of the operator (`ops`), made once and kept.
fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    let pki = Pki::at(dir);
    if !pki.cert("ops").exists() {
        let _ = std::fs::remove_dir_all(dir);
        pki::init(dir, pki::DEFAULT_CA_DAYS)?;
        for name in ["node-a", "node-b", "ops"] {
            pki::issue(dir, &CertRequest::new(name))?;
        }
    }
    Ok(pki)
}

/// Write the source disk: `DISK_BYTES` sparse with `EXTENTS` extents of random data spread evenly, synced.
fn write_source(path: &Path, seed: u64) -> anyhow::Result<()> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.set_len(DISK_BYTES)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut buf = vec![0u8; EXTENT_BYTES as usize];
    for i in 0..EXTENTS {
        rng.fill_bytes(&mut buf);
        file.write_all_at(&buf, i * (DISK_BYTES / EXTENTS)).context("writing the source disk")?;
    }
    file.sync_all()?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 * MIB as usize];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn allocated_bytes(path: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Write back dirty pages and drop the page cache, so that each side reads its source from the disk; false
/// when not allowed (not root).
fn drop_caches() -> bool {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// CPU seconds (user + system) of the children of this process that were waited for.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain integers, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes only the struct it is given, which outlives the call.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn fsync(path: &Path) -> anyhow::Result<()> {
    File::open(path)?.sync_all().with_context(|| format!("syncing {}", path.display()))
}

fn wait_ok(child: &mut std::process::Child, what: &str) -> anyhow::Result<()> {
    let status = child.wait()?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}

/// Whether something listens on TCP `port` (IPv4), from /proc/net/tcp: probing with a connection would use
/// up the one connection `nc -l` takes.
fn listening(port: u16) -> anyhow::Result<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let local = format!(":{port:04X}");
    Ok(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "0A"
    }))
}

/// Copy `src` to `dst` the operator's way: `nc -l` writing `dst`, fed by `dd if=src bs=1M | nc -N`, over
/// loopback TCP. Timed from starting `dd` to `dst` fsynced.
fn raw_copy(src: &Path, dst: &Path) -> anyhow::Result<Duration> {
    let port = unused_loopback_port().to_string();
    let mut listener = Command::new("nc")
        .args(["-l", "-p", &port])
        .stdin(Stdio::null())
        .stdout(File::create(dst)?)
        .spawn()
        .context("starting nc -l")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(port.parse()?)? {
        if let Some(status) = listener.try_wait()? {
            bail!("nc -l -p {port} exited ({status})");
        }
        ensure!(Instant::now() < deadline, "nc -l -p {port} did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut dd = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .args(["bs=1M", "status=none"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting dd")?;
    let pipe = dd.stdout.take().context("dd's stdout")?;
    let mut sender = Command::new("nc")
        .args(["-N", "127.0.0.1", &port])
        .stdin(pipe)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nc")?;
    wait_ok(&mut dd, "dd")?;
    wait_ok(&mut sender, "nc (sending)")?;
    wait_ok(&mut listener, "nc -l (receiving)")?;
    fsync(dst)?;
    Ok(start.elapsed())
}

/// `cp --sparse=always src dst` on this node, then fsync: what a copy that knows about holes costs locally.
fn sparse_copy(src: &Path, dst: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut cp =
        Command::new("cp").arg("--sparse=always").arg(src).arg(dst).spawn().context("starting cp")?;
    wait_ok(&mut cp, "cp --sparse=always")?;
    fsync(dst)?;
    Ok(start.elapsed())
}

/// Seconds since the epoch of an event's time.
fn at(ev: &JobEvent) -> f64 {
    ev.time.as_ref().map_or(0.0, |t| t.seconds as f64 + f64::from(t.nanos) * 1e-9)
}

/// Seconds from the first event of step `from` to the first event of step `to`.
fn between(events: &[JobEvent], from: &str, to: &str) -> Option<f64> {
    let first = |step: &str| events.iter().find(|e| e.step == step).map(at);
    Some(first(to)? - first(from)?)
}

struct Migration {
    took: Duration,
    /// Submit to the send job's end (the source undefined, wiped and its volume deleted after the receive).
    send_ended: Duration,
    extents: u64,
    bytes: u64,
    /// From the receive job's events: streaming the extents, then checking the digest and syncing.
    stream_secs: f64,
    verify_secs: f64,
}

async fn migrate(a: &mut Agent, b: &mut Agent, round: usize) -> anyhow::Result<Migration> {
    let transfer_id = format!("t-bench-migrate-{}-{round}", std::process::id());
    let receive = SubmitJobRequest {
        idempotency_key: format!("receive-{transfer_id}"),
        job: Some(submit_job_request::Job::MigrateReceive(MigrateReceiveJob {
            transfer_id: transfer_id.clone(),
            sender: "node-a".into(),
            target: None,
            size_bytes: DISK_BYTES,
            spec: Some(VmSpec {
                name: VM.into(),
                machine: Some(Machine { vcpus: 1, memory_mib: 512, ..Default::default() }),
                ..Default::default()
            }),
            timeout_seconds: 600,
            live: false,
        })),
        ..Default::default()
    };
    let receive_id = b.client.submit_job(receive).await?.into_inner().id;
    follow(b.client.clone(), &receive_id, Some("wait")).await?;

    let send = SubmitJobRequest {
        idempotency_key: format!("send-{transfer_id}"),
        job: Some(submit_job_request::Job::MigrateSend(MigrateSendJob {
            domain: VM.into(),
            target: None,
            transfer_id,
            receiver_address: b.grpc.to_string(),
            receiver: "node-b".into(),
            wipe_method: String::new(),
            live: false,
        })),
        ..Default::default()
    };
    let start = Instant::now();
    let send_id = a.client.submit_job(send).await?.into_inner().id;
    let received = follow(b.client.clone(), &receive_id, None).await?;
    let took = start.elapsed();
    let last = received.last().context("no events")?;
    ensure!(last.state() == JobState::Succeeded, "the receive did not succeed: {last:?}");
    let sent = follow(a.client.clone(), &send_id, None).await?;
    let send_ended = start.elapsed();
    let send_job = a.client.get_job(GetJobRequest { job_id: send_id }).await?.into_inner();
    ensure!(
        send_job.state() == JobState::Succeeded,
        "the send did not succeed: {send_job:?} {:?}",
        sent.last()
    );
    let Some(Outcome::MigrateSend(result)) = send_job.outcome else {
        bail!("the send job has no migrate-send result: {:?}", send_job.outcome)
    };
    Ok(Migration {
        took,
        send_ended,
        extents: result.extents_sent,
        bytes: result.bytes_sent,
        stream_secs: between(&received, "receive", "verify").unwrap_or(f64::NAN),
        verify_secs: between(&received, "verify", "define").unwrap_or(f64::NAN),
    })
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent_bin, work, rest @ ..] = args.as_slice() else {
        bail!("usage: migrate_bench AGENT_BIN WORK_DIR [ROUNDS]");
    };
    let rounds: usize = rest.first().map(|n| n.parse()).transpose()?.unwrap_or(2);
    let agent_bin = PathBuf::from(agent_bin);
    std::fs::create_dir_all(work)?;
    let work = Path::new(work).canonicalize()?;
    let pki = make_pki(&work.join("pki"))?;

    let cold = drop_caches();
    println!(
        "disk: {} GiB sparse raw file, {} MiB of data in {EXTENTS} extents of {} MiB; {rounds} rounds; page cache \
         {} before each timed side",
        DISK_BYTES / 1024 / MIB,
        DATA_BYTES / MIB,
        EXTENT_BYTES / MIB,
        if cold { "dropped" } else { "NOT dropped (not root): figures include cached reads" }
    );
    println!(
        "virsh migrate --copy-storage-all: measured after these rounds (bench/migrate-virsh: a running guest \
         between two private libvirtd, the agents here being on libvirt's test driver)"
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let nodes = work.join("nodes");
        let _ = std::fs::remove_dir_all(&nodes);
        let (a_root, b_root) = (nodes.join("node-a"), nodes.join("node-b"));
        std::fs::create_dir_all(a_root.join("pool"))?;
        let source = a_root.join("pool").join(format!("{VM}.raw"));
        write_source(&source, round as u64)?;
        let source_sha = sha256_file(&source)?;
        let source_allocated = allocated_bytes(&source)?;
        let mut a = Agent::start(&agent_bin, &pki, &a_root, "node-a", true).await?;
        let mut b = Agent::start(&agent_bin, &pki, &b_root, "node-b", false).await?;
        a.shut_off().await?;
        println!(
            "round {round}: source {} bytes allocated of {DISK_BYTES}, sha256 {}…",
            source_allocated,
            &source_sha[..16]
        );

        // The operator's copy: every byte of the raw file over loopback TCP.
        let raw_dst = b_root.join("copy.raw");
        drop_caches();
        let cpu = children_cpu();
        let raw = raw_copy(&source, &raw_dst)?;
        let raw_cpu = children_cpu() - cpu;
        ensure!(std::fs::metadata(&raw_dst)?.len() == DISK_BYTES, "the raw copy is short");
        ensure!(sha256_file(&raw_dst)? == source_sha, "the raw copy differs from the source");
        println!(
            "  raw copy, dd bs=1M | nc over loopback TCP, fsynced   {:6.2} s  {:6.0} MB/s of the file, {:4.0} MB/s of \
             data  (sha256 ok, {} MiB allocated; dd + nc CPU {:.2} s)",
            raw.as_secs_f64(),
            mb_per_s(DISK_BYTES, raw),
            mb_per_s(DATA_BYTES, raw),
            allocated_bytes(&raw_dst)? / MIB,
            raw_cpu
        );
        std::fs::remove_file(&raw_dst)?;

        // For context: a local copy that skips holes.
        let sparse_dst = b_root.join("sparse-copy.raw");
        drop_caches();
        let sparse = sparse_copy(&source, &sparse_dst)?;
        println!(
            "  local cp --sparse=always, fsynced (context)          {:6.2} s  {:6.0} MB/s of data",
            sparse.as_secs_f64(),
            mb_per_s(DATA_BYTES, sparse)
        );
        std::fs::remove_file(&sparse_dst)?;

        // The migration.
        drop_caches();
        let m = migrate(&mut a, &mut b, round).await?;
        let dst = b.pool.join(format!("{VM}.raw"));
        let dst_sha = sha256_file(&dst)?;
        let dst_allocated = allocated_bytes(&dst)?;
        let sparse_ok = (DATA_BYTES..=DATA_BYTES + DATA_BYTES / 20).contains(&dst_allocated);
        println!(
            "  migration, MIGRATE_SEND to RECEIVE succeeded (mTLS)  {:6.2} s  {:6.0} MB/s of data  ({} extents, {} \
             MiB sent; receive: streaming {:.2} s, digest check + fsync {:.2} s; send job ended after {:.2} s, \
             source wiped)",
            m.took.as_secs_f64(),
            mb_per_s(m.bytes, m.took),
            m.extents,
            m.bytes / MIB,
            m.stream_secs,
            m.verify_secs,
            m.send_ended.as_secs_f64()
        );
        println!(
            "    destination: sha256 {}, {} MiB allocated of {} MiB ({})",
            if dst_sha == source_sha { "matches the source" } else { "DIFFERS from the source" },
            dst_allocated / MIB,
            DISK_BYTES / MIB,
            if sparse_ok { "sparse" } else { "NOT sparse as the source" }
        );
        let cpu = children_cpu();
        drop((a, b));
        println!(
            "    both agent daemons' CPU from start to stop (mostly the migration): {:.2} s",
            children_cpu() - cpu
        );
        ensure!(dst_sha == source_sha, "the migrated disk differs from the source");
        ensure!(
            sparse_ok,
            "the migrated disk has {dst_allocated} bytes allocated, the source {source_allocated}"
        );
        ensure!(m.bytes == DATA_BYTES, "the send moved {} bytes, not the {DATA_BYTES} of data", m.bytes);
        let ratio = raw.as_secs_f64() / m.took.as_secs_f64();
        println!("  raw copy seconds / migration seconds: {ratio:.2}x");
        ratios.push(ratio);
    }
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "migration vs raw copy over all rounds: {} (target >= 1.5x faster: {})",
        ratios.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", "),
        if worst >= 1.5 { "met in every round" } else { "NOT met in every round" }
    );
    Ok(())
}
