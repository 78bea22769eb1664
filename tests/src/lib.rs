//! Support for the tests that span programs: agents in network namespaces, a coordinator (or several, on an
//! etcd cluster on loopback) in the root namespace reaching them over a private bridge, certificates and a
//! tiny image store made with the real command-line tools.
//!
//! Everything a test starts is owned by a value that removes it on drop; processes also die with the test
//! thread that started them (`PR_SET_PDEATHSIG`), so a test killed outright leaves no daemon behind, and the
//! next run removes the namespaces and links of a killed earlier run.

pub mod agent;
pub mod bins;
pub mod browser;
pub mod coordinator;
pub mod etcd;
pub mod grid;
pub mod http;
pub mod images;
pub mod netns;
pub mod ovs;
pub mod pki;
pub mod process;

use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// The string at `key` of a proto3 JSON object ("" when absent: proto3 JSON leaves defaults out).
pub fn json_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v.get(key).and_then(serde_json::Value::as_str).unwrap_or("")
}

/// The number at `path` (proto3 JSON writes 64-bit integers as strings and leaves zeros out).
pub fn json_u64(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for k in path {
        match cur.get(k) {
            Some(next) => cur = next,
            None => return 0,
        }
    }
    cur.as_u64().or_else(|| cur.as_str().and_then(|t| t.parse().ok())).unwrap_or(0)
}

/// The sha256 (hex) of a file's bytes.
pub fn sha256_file(path: &std::path::Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// Check a signed wipe report (as an operation keeps it) with `gridforge-agent report verify` against the
/// public key of the agent whose directory is `agent_dir`; `scratch` is where the report is written.
pub fn verify_wipe_report(report_json: &str, agent_dir: &std::path::Path, scratch: &std::path::Path) {
    assert!(!report_json.is_empty(), "no wipe report");
    std::fs::write(scratch, report_json).unwrap();
    let key = agent_dir.join("state/report-signing.key.pub");
    let mut verify = std::process::Command::new(bins::path(bins::AGENT));
    verify.args(["report", "verify"]).arg(scratch).arg("--key").arg(&key);
    process::run_ok(&mut verify, Duration::from_secs(30));
}

/// Poll `check` every `every` until it returns `Some`, at most `limit`; `what` names the wait in the panic.
pub fn wait_for<T>(what: &str, limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    wait_until(what, limit, every, || check().ok_or_else(String::new))
}

/// Like [`wait_for`], `check` saying what it saw while not done: the last of that is in the panic.
pub fn wait_until<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        let seen = match check() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        let seen = if seen.is_empty() { seen } else { format!("; last seen: {seen}") };
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}{seen}");
        std::thread::sleep(every);
    }
}

/// Run a future to completion on a runtime of its own (the support library is synchronous so that every
/// process is spawned from the test's own thread).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building a tokio runtime")
        .block_on(f)
}
