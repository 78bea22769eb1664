//! A real one-member etcd (Debian's etcd-server, `/usr/bin/etcd`) on free loopback ports, its data in a
//! directory of the test's: for the coordinator's store tests. Killed when dropped, and by the kernel when
//! the thread that started it exits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the caller to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("its address").port()
}

pub struct Etcd {
    /// The client URL, http://127.0.0.1:PORT.
    pub url: String,
    log: PathBuf,
    child: Child,
}

impl Etcd {
    /// Start etcd with its data under `dir` and wait (at most 30 s) until it answers.
    pub fn start(dir: &Path) -> Etcd {
        let binary = Path::new("/usr/bin/etcd");
        assert!(binary.exists(), "/usr/bin/etcd is missing: scripts/deps installs Debian's etcd-server");
        std::fs::create_dir_all(dir).unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(binary);
        command
            .args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--max-txn-ops", "1024"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent: the kernel kills etcd when
        // the spawning thread exits, so a test killed outright leaves no etcd behind.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("starting etcd: {e}"));
        let mut etcd = Etcd { url, log, child };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited ({status}):\n{}", etcd.log_tail());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "etcd did not listen within 30 s:\n{}",
                etcd.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }

    /// The last lines etcd logged.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
