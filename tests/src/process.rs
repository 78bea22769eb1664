//! Child processes that cannot outlive the test: daemons killed on drop and when the spawning thread dies,
//! commands run with a time limit.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Make the kernel SIGKILL the child when the thread that spawned it exits: a test killed outright (where
/// no destructor runs) leaves no process behind. A daemon must therefore be spawned on the test's own thread.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A description for assertion messages.
    pub fn describe(&self) -> String {
        format!("{}\nstdout: {}\nstderr: {}", self.status, self.stdout, self.stderr)
    }
}

/// Run `cmd` to completion, killing it after `limit`; stdout and stderr go through files so a chatty child
/// never blocks on a full pipe.
pub fn run(cmd: &mut Command, limit: Duration) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir for a command's output");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = die_with_parent(cmd)
        .stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}\nstdout: {}\nstderr: {}", read(&out), read(&err));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome { status, stdout: read(&out), stderr: read(&err) }
}

/// Run `cmd` and require success; its stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let out = run(cmd, limit);
    assert!(out.success(), "{cmd:?} failed: {}", out.describe());
    out.stdout
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A long-running child with its stderr in a log file; killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Spawn `cmd` with stdout discarded and stderr appended to `log`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Daemon {
        let log_file = File::options().create(true).append(true).open(log).expect("opening a daemon log");
        let child = die_with_parent(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Daemon { child, log: log.to_path_buf() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waiting for a daemon")
    }

    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn signal(&self, sig: Signal) {
        // The process may have exited already; the caller waits for the exit either way.
        let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Wait for the exit, at most `limit`, then SIGKILL; the status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                return self.child.wait().expect("waiting for a killed daemon");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, a bounded wait for a clean exit, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(grace)
    }

    /// SIGKILL and reap.
    pub fn sigkill(&mut self) -> ExitStatus {
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
