//! Support for the tests that span programs: agents in network namespaces, a coordinator in the root
//! namespace reaching them over a private bridge, certificates and a tiny image store made with the real
//! command-line tools.
//!
//! Everything a test starts is owned by a value that removes it on drop; processes also die with the test
//! thread that started them (`PR_SET_PDEATHSIG`), so a test killed outright leaves no daemon behind, and the
//! next run removes the namespaces and links of a killed earlier run.

pub mod agent;
pub mod bins;
pub mod coordinator;
pub mod grid;
pub mod images;
pub mod netns;
pub mod pki;
pub mod process;

use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;

/// Poll `check` every `every` until it returns `Some`, at most `limit`; `what` names the wait in the panic.
pub fn wait_for<T>(what: &str, limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
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
