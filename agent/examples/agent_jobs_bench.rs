//! Load on a real agent daemon (`gridforge-agent serve`, started here) over gRPC with mutual TLS:
//!   1. WIPES wipe jobs on 1 MiB file targets, all submitted at once: throughput and submit-to-done latency;
//!   2. PROVISIONS provisions of debian-12-minimal onto 3 GiB file targets, one after another and then all at
//!      once: total times and their ratio.
//!
//! Used by `bench/agent-jobs`.
//!
//! ```text
//! agent_jobs_bench AGENT_BIN WORK_DIR DEBIAN_ROOTFS_TAR [WIPES [PROVISIONS]]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench_support::{Daemon, follow, ready};
use gridforge_common::client::ClientTls;
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{
    DiskTarget, JobState, ProvisionJob, SubmitJobRequest, VmSpec, WipeJob, disk_target, submit_job_request,
};
use tonic::transport::Channel;

mod bench_support;

fn run(agent: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out =
        Command::new(agent).args(args).output().with_context(|| format!("running {}", agent.display()))?;
    if !out.status.success() {
        bail!(
            "gridforge-agent {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn device(path: &Path) -> Option<DiskTarget> {
    Some(DiskTarget { target: Some(disk_target::Target::Device(path.display().to_string())) })
}

/// Submits `req` and follows the job to its end; returns the submit-to-done time.
async fn job(mut client: AgentClient<Channel>, req: SubmitJobRequest) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let id = client.submit_job(req).await?.into_inner().id;
    let last = follow(client, &id, None).await?.pop();
    let done = start.elapsed();
    match last {
        Some(ev) if ev.state == JobState::Succeeded as i32 => Ok(done),
        other => bail!("job {id} did not succeed: {other:?}"),
    }
}

fn provision_request(key: &str, name: &str, target: &Path) -> anyhow::Result<SubmitJobRequest> {
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "image": {"name": "debian-12-minimal", "version": "1"},
        "disk": {"size_mib": 3072, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {"hostname": name}
    }))?;
    Ok(SubmitJobRequest {
        idempotency_key: key.into(),
        job: Some(submit_job_request::Job::Provision(ProvisionJob {
            spec: Some(spec),
            target: device(target),
        })),
        ..Default::default()
    })
}

/// Runs `count` provisions at once (or one after another) onto fresh file targets; returns the total time.
async fn provisions(
    client: &AgentClient<Channel>,
    disks: &Path,
    tag: &str,
    count: usize,
    concurrent: bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let reqs = (0..count)
        .map(|i| {
            provision_request(
                &format!("{tag}-{i}"),
                &format!("vm-{i}"),
                &disks.join(format!("{tag}-{i}.img")),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if concurrent {
        let tasks: Vec<_> = reqs.into_iter().map(|r| tokio::spawn(job(client.clone(), r))).collect();
        for t in tasks {
            t.await??;
        }
    } else {
        for r in reqs {
            job(client.clone(), r).await?;
        }
    }
    let total = start.elapsed();
    for i in 0..count {
        std::fs::remove_file(disks.join(format!("{tag}-{i}.img")))?;
    }
    Ok(total)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [agent, work, rootfs, rest @ ..] = args.as_slice() else {
        bail!("usage: agent_jobs_bench AGENT_BIN WORK_DIR DEBIAN_ROOTFS_TAR [WIPES [PROVISIONS]]");
    };
    let wipes: usize = rest.first().map(|n| n.parse()).transpose()?.unwrap_or(1000);
    let provision_count: usize = rest.get(1).map(|n| n.parse()).transpose()?.unwrap_or(4);
    let (agent, work) = (PathBuf::from(agent), PathBuf::from(work));
    std::fs::create_dir_all(&work)?;
    let work = work.canonicalize()?;

    // Certificates and the store are kept between runs; the node's state starts empty every time.
    let pki = work.join("pki");
    if !pki.join("client.pem").exists() {
        run(&agent, &["pki", "init", "--dir", s(&pki)])?;
        run(&agent, &["pki", "issue", "--dir", s(&pki), "--name", "agent", "--ip", "127.0.0.1"])?;
        run(&agent, &["pki", "issue", "--dir", s(&pki), "--name", "client"])?;
    }
    let store = work.join("store");
    let stamp = work.join(format!(".packed-{}", Path::new(rootfs).file_name().unwrap().to_string_lossy()));
    if !stamp.exists() {
        let _ = std::fs::remove_dir_all(&store);
        let _ = std::fs::remove_file(work.join("store.key"));
        let _ = std::fs::remove_file(work.join("store.key.pub"));
        run(&agent, &["image", "keygen", "--out", s(&work.join("store.key"))])?;
        run(
            &agent,
            &[
                "image",
                "pack",
                "--rootfs",
                rootfs,
                "--name",
                "debian-12-minimal",
                "--version",
                "1",
                "--store",
                s(&store),
                "--key",
                s(&work.join("store.key")),
            ],
        )?;
        std::fs::write(&stamp, "")?;
    }
    let node = work.join("node");
    let _ = std::fs::remove_dir_all(&node);
    let disks = node.join("disks");
    std::fs::create_dir_all(&disks)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"\"\nstate_dir = \"{state}\"\ncache_dir = \"{cache}\"\n\
         work_dir = \"{workdir}\"\n[tls]\nca = \"{pki}/ca.pem\"\ncert = \"{pki}/agent.pem\"\nkey = \"{pki}/agent.key\"\n\
         [images]\nstore = \"{store}\"\ntrusted_key = \"{key}\"\n[libvirt]\nuri = \"\"\n[jobs]\n\
         devices = [\"{disks}\"]\nreport_signing_key = \"{state}/report.key\"\n",
        state = node.join("state").display(),
        cache = node.join("cache").display(),
        workdir = node.join("work").display(),
        pki = pki.display(),
        store = store.display(),
        key = work.join("store.key.pub").display(),
        disks = disks.display(),
    );
    let config_path = node.join("agent.toml");
    std::fs::write(&config_path, config)?;
    let log = std::fs::File::create(node.join("agent.log"))?;
    let mut daemon = Daemon(
        Command::new(&agent)
            .args(["serve", "--config", s(&config_path)])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting gridforge-agent serve")?,
    );
    let tls = ClientTls {
        ca: pki.join("ca.pem"),
        cert: pki.join("client.pem"),
        key: pki.join("client.key"),
        domain: None,
    };
    let endpoint = format!("127.0.0.1:{port}");
    let client = ready(&endpoint, &tls, &mut daemon, &node.join("agent.log")).await?;

    // 1. Small wipes, all at once over one mTLS channel.
    for i in 0..wipes {
        std::fs::File::create(disks.join(format!("w{i}.img")))?.set_len(1 << 20)?;
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..wipes)
        .map(|i| {
            let req = SubmitJobRequest {
                idempotency_key: format!("wipe-{i}"),
                job: Some(submit_job_request::Job::Wipe(WipeJob {
                    target: device(&disks.join(format!("w{i}.img"))),
                    method: "zero".into(),
                    verify: "sample".into(),
                    operator: String::new(),
                })),
                ..Default::default()
            };
            tokio::spawn(job(client.clone(), req))
        })
        .collect();
    let mut latencies = Vec::with_capacity(wipes);
    for t in tasks {
        latencies.push(t.await??);
    }
    let wall = start.elapsed();
    latencies.sort();
    println!(
        "wipe jobs: {wipes} x 1 MiB file targets (zero, sample verification), submitted at once over one mTLS channel"
    );
    println!(
        "  all done in {:.2} s: {:.0} jobs/s; submit-to-done p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        wall.as_secs_f64(),
        wipes as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
    );

    // 2. Provisions: one untimed to fill the image cache, then sequential and concurrent.
    if provision_count > 0 {
        provisions(&client, &disks, "warm", 1, false).await?;
        let seq = provisions(&client, &disks, "seq", provision_count, false).await?;
        let par = provisions(&client, &disks, "par", provision_count, true).await?;
        println!("provisions of debian-12-minimal onto 3 GiB file targets (image cache warm):");
        println!(
            "  {provision_count} sequential {:.1} s, {provision_count} concurrent {:.1} s: concurrent takes {:.2} of \
             sequential ({:.2}x faster)",
            seq.as_secs_f64(),
            par.as_secs_f64(),
            par.as_secs_f64() / seq.as_secs_f64(),
            seq.as_secs_f64() / par.as_secs_f64()
        );
    }
    Ok(())
}
