//! What the agent's benchmarks share: waiting for a `gridforge-agent serve` they started to answer, and
//! following a job's events to its end.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use gridforge_common::client::{ClientTls, connect};
use gridforge_proto::v1::agent_client::AgentClient;
use gridforge_proto::v1::{JobEvent, ListJobsRequest, WatchJobRequest};
pub use gridforge_testsupport::process::TermOnDrop as Daemon;
use tonic::transport::Channel;

/// A client of the daemon at `endpoint` once it answers ListJobs; fails when the daemon exits or does not
/// answer within 30 s (its log, `log`, says why).
pub async fn ready(
    endpoint: &str,
    tls: &ClientTls,
    daemon: &mut Daemon,
    log: &Path,
) -> anyhow::Result<AgentClient<Channel>> {
    let started = Instant::now();
    loop {
        if let Ok(mut c) = connect(endpoint, Some(tls)).await
            && c.list_jobs(ListJobsRequest::default()).await.is_ok()
        {
            return Ok(c);
        }
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the agent exited ({status}); see {}", log.display());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the agent did not answer on {endpoint} within 30 s; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The events of job `id` from the first, until its last (the one with a final state) or, with `until_step`,
/// until the first event of that step.
pub async fn follow(
    mut client: AgentClient<Channel>,
    id: &str,
    until_step: Option<&str>,
) -> anyhow::Result<Vec<JobEvent>> {
    let mut stream =
        client.watch_job(WatchJobRequest { job_id: id.to_string(), from_seq: 0 }).await?.into_inner();
    let mut events = Vec::new();
    while let Some(ev) = stream.message().await? {
        let reached = until_step.is_some_and(|step| ev.step == step);
        events.push(ev);
        if reached {
            return Ok(events);
        }
    }
    if let Some(step) = until_step {
        bail!("job {id} ended before step {step}: {:?}", events.last());
    }
    Ok(events)
}
