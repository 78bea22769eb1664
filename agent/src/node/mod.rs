//! What ops ask a node: diagnostics (checks with OK/WARN/FAIL and a one-line reason) and usage stats.

pub mod diagnostics;
pub mod stats;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gridforge_proto::v1::{DiagnosticsReport, Job, NodeStatsReport};

use crate::config::Config;
use crate::hypervisor::Hypervisor;

pub use diagnostics::JobList;

/// What diagnostics and stats look at: the configuration and the hypervisor, if one is configured.
pub struct NodeContext {
    pub config: Config,
    pub hypervisor: Option<Arc<dyn Hypervisor>>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext").field("config", &self.config).finish_non_exhaustive()
    }
}

/// The diagnostics report; `jobs` is the journal's current list (running and failed jobs are checked),
/// `leader_term` the job engine's highest coordinator leader term.
pub fn diagnostics(ctx: &NodeContext, jobs: &[Job], leader_term: u64) -> DiagnosticsReport {
    diagnostics::report(ctx, JobList::Known(jobs), leader_term)
}

/// Node and VM usage sampled over `sample`.
pub fn node_stats(ctx: &NodeContext, sample: Duration) -> NodeStatsReport {
    stats::sample(ctx, sample)
}

/// A protobuf timestamp.
pub fn timestamp(t: SystemTime) -> pbjson_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    pbjson_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}
