//! The engine's Prometheus metrics: jobs by kind and state, bytes written, job durations.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use gridforge_proto::v1::{JobKind, JobState};

/// Steps whose byte progress counts as bytes written to a target.
pub(crate) const WRITE_STEPS: &[&str] = &["write", "wipe", "format", "encrypt", "resize", "receive"];

/// Upper bounds (seconds) of the duration histogram's buckets.
const BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

const KINDS: &[JobKind] = &[
    JobKind::Provision,
    JobKind::Wipe,
    JobKind::Resize,
    JobKind::Snapshot,
    JobKind::Control,
    JobKind::Delete,
    JobKind::MigrateSend,
    JobKind::MigrateReceive,
];
const STATES: &[JobState] = &[
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::Interrupted,
];

#[derive(Default)]
struct Histogram {
    /// Cumulative counts per bucket of `BUCKETS`.
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub(crate) struct Metrics {
    bytes_written: u64,
    durations: BTreeMap<&'static str, Histogram>,
}

fn label(name: &str) -> String {
    name.to_ascii_lowercase()
}

fn kind_label(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Provision => "provision",
        JobKind::Wipe => "wipe",
        JobKind::Resize => "resize",
        JobKind::Snapshot => "snapshot",
        JobKind::Control => "control",
        JobKind::Delete => "delete",
        JobKind::DeleteBase => "delete_base",
        JobKind::MigrateSend => "migrate_send",
        JobKind::MigrateReceive => "migrate_receive",
        JobKind::Unspecified => "unspecified",
    }
}

impl Metrics {
    /// A job ended: `ran` is how long it ran (None if it never started), `written` its bytes written.
    pub(crate) fn observe(&mut self, kind: JobKind, ran: Option<Duration>, written: u64) {
        self.bytes_written += written;
        if let Some(ran) = ran {
            let secs = ran.as_secs_f64();
            let h = self.durations.entry(kind_label(kind)).or_default();
            for (count, bound) in h.buckets.iter_mut().zip(BUCKETS) {
                if secs <= *bound {
                    *count += 1;
                }
            }
            h.sum += secs;
            h.count += 1;
        }
    }

    /// Render with the current jobs' (kind, state) pairs.
    pub(crate) fn render(&self, jobs: impl Iterator<Item = (JobKind, JobState)>, out: &mut String) {
        let mut counts: BTreeMap<(i32, i32), u64> = BTreeMap::new();
        for (kind, state) in jobs {
            *counts.entry((kind as i32, state as i32)).or_default() += 1;
        }
        out.push_str("# HELP gridforge_agent_jobs Jobs in the journal by kind and state.\n");
        out.push_str("# TYPE gridforge_agent_jobs gauge\n");
        for kind in KINDS {
            for state in STATES {
                let n = counts.get(&(*kind as i32, *state as i32)).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "gridforge_agent_jobs{{kind=\"{}\",state=\"{}\"}} {n}",
                    kind_label(*kind),
                    label(state.as_str_name())
                );
            }
        }
        out.push_str(
            "# HELP gridforge_agent_bytes_written_total Bytes written to targets by finished jobs.\n",
        );
        out.push_str("# TYPE gridforge_agent_bytes_written_total counter\n");
        let _ = writeln!(out, "gridforge_agent_bytes_written_total {}", self.bytes_written);
        out.push_str("# HELP gridforge_agent_job_duration_seconds Run time of finished jobs by kind.\n");
        out.push_str("# TYPE gridforge_agent_job_duration_seconds histogram\n");
        for (kind, h) in &self.durations {
            for (count, bound) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "gridforge_agent_job_duration_seconds_bucket{{kind=\"{kind}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "gridforge_agent_job_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "gridforge_agent_job_duration_seconds_sum{{kind=\"{kind}\"}} {}", h.sum);
            let _ =
                writeln!(out, "gridforge_agent_job_duration_seconds_count{{kind=\"{kind}\"}} {}", h.count);
        }
    }
}
