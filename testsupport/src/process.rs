//! Child processes that tests and benchmarks start.

use std::process::Child;

/// A daemon started as a child: sent SIGTERM and reaped when dropped, so it can shut down as in production.
pub struct TermOnDrop(pub Child);

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not yet reaped (so its pid cannot have been reused).
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}
