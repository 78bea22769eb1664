//! A real, private `libvirtd` for tests: the stock daemon with the qemu driver, run as root in its own mount
//! and network namespaces. Its configuration, state, runtime, log and cache directories are temporary
//! directories bind-mounted over `/etc/libvirt`, `/var/lib/libvirt`, `/run/libvirt`, `/var/log/libvirt` and
//! `/var/cache/libvirt` inside that namespace, so it neither sees nor disturbs a libvirtd of the host. It
//! listens on a unix socket in the temporary directory (`qemu+unix:///system?socket=…`); a bridge `gfbr0`
//! exists in its network namespace and the libvirt network `gf-net` attaches guests to it. Stopped on drop,
//! together with any guest it left running.
#![allow(dead_code)]
// Uses `crate::common_vm`: a test using this module declares both.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The libvirt network (bridge mode, over `gfbr0`) guests of the private daemon attach to.
pub const NETWORK: &str = "gf-net";

/// The directories bind-mounted over the daemon's own, by host path.
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("run", "/run/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

pub struct Libvirtd {
    pub dir: PathBuf,
    pub uri: String,
    child: Option<Child>,
    /// Also listening on TCP port 16509 of its namespace, without authentication (a migration peer).
    listen: bool,
}

impl Libvirtd {
    /// Starts the daemon with its files under `dir` (created; kept across [`Libvirtd::restart`]) and waits
    /// until it answers.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None)
    }

    /// Like [`Libvirtd::start`], also listening on TCP (port 16509 of its namespace, no authentication)
    /// under its own host UUID: a daemon another private daemon can migrate domains to, peer to peer, once
    /// their namespaces are linked ([`Libvirtd::link`]).
    pub fn start_peer(dir: &Path, host_uuid: &str) -> Self {
        Self::start_with(dir, Some(host_uuid))
    }

    fn start_with(dir: &Path, host_uuid: Option<&str>) -> Self {
        for (tool, package) in [
            ("libvirtd", "libvirt-daemon and libvirt-daemon-driver-qemu"),
            ("virsh", "libvirt-clients"),
            ("unshare", "util-linux"),
            ("ip", "iproute2"),
        ] {
            crate::common_vm::require_tool(tool, package);
        }
        for (what, check) in
            [("group libvirt-qemu", "getent group libvirt-qemu"), ("user libvirt-qemu", "id libvirt-qemu")]
        {
            let ok = Command::new("sh")
                .arg("-c")
                .arg(check)
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "libvirtd's qemu driver refuses to start without the {what}; scripts/deps creates it"
            );
        }
        std::fs::create_dir_all(dir).unwrap();
        let socket_dir = dir.join("sock");
        for (sub, _) in PRIVATE_DIRS {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::create_dir_all(&socket_dir).unwrap();
        std::fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\n\
                 auth_unix_ro = \"none\"\nlog_outputs = \"2:file:{}\"\n{}",
                socket_dir.display(),
                dir.join("libvirtd.log").display(),
                host_uuid.map_or(String::new(), |u| format!(
                    "listen_tcp = 1\nlisten_tls = 0\nauth_tcp = \"none\"\nhost_uuid = \"{u}\"\n"
                )),
            ),
        )
        .unwrap();
        // Guests run as root with no security driver (nothing to relabel in a test); their stdout and stderr
        // go to files instead of through virtlogd.
        std::fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\nstdio_handler = \"file\"\n",
        )
        .unwrap();
        let uri = format!("qemu+unix:///system?socket={}", socket_dir.join("libvirt-sock").display());
        let mut daemon = Self { dir: dir.to_path_buf(), uri, child: None, listen: host_uuid.is_some() };
        daemon.spawn();
        daemon
    }

    fn spawn(&mut self) {
        let socket = self.dir.join("sock/libvirt-sock");
        let _ = std::fs::remove_file(&socket);
        let mut script = String::from("set -e\n");
        for (sub, target) in PRIVATE_DIRS {
            script.push_str(&format!(
                "mkdir -p {target}\nmount --bind '{}' {target}\n",
                self.dir.join(sub).display()
            ));
        }
        script.push_str("ip link set lo up\nip link add gfbr0 type bridge\nip link set gfbr0 up\n");
        // The default pid file, /run/libvirtd.pid, is outside the private directories: a second private
        // daemon (another test, another checkout) would find it locked and exit.
        script.push_str(&format!(
            "exec libvirtd {}--config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid\n",
            if self.listen { "--listen " } else { "" }
        ));
        let log = std::fs::File::create(self.dir.join("libvirtd.stderr")).unwrap();
        let mut command = Command::new("unshare");
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It makes the kernel kill the
        // daemon (unshare execs the shell, which execs libvirtd: one process) when the spawning thread exits,
        // so a test killed outright leaves no daemon behind.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .args(["--mount", "--net", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("unshare could not run: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if socket.exists() && self.virsh_status(&["version"]) {
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("libvirtd exited ({status}) while starting:\n{}", self.logs());
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "libvirtd did not answer within 60 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        if !self.virsh_status(&["net-info", NETWORK]) {
            let xml = self.dir.join("net.xml");
            std::fs::write(
                &xml,
                format!("<network><name>{NETWORK}</name><forward mode='bridge'/><bridge name='gfbr0'/></network>\n"),
            )
            .unwrap();
            self.virsh(&["net-define", xml.to_str().unwrap()]);
        }
        // After a restart on the same directories libvirt still knows the network as active.
        if !self.virsh(&["net-info", NETWORK]).lines().any(|l| l.starts_with("Active:") && l.contains("yes"))
        {
            self.virsh(&["net-start", NETWORK]);
        }
    }

    /// A command that runs `program` in the daemon's network namespace (where `gfbr0` and the guests' NICs
    /// are). unshare execs the shell, which execs libvirtd: the child's pid is the daemon's.
    pub fn netns_command(&self, program: &str) -> Command {
        let pid = self.child.as_ref().expect("libvirtd is running").id();
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/proc/{pid}/ns/net")).arg(program);
        command
    }

    /// Link this daemon's network namespace with `other`'s by a veth pair named `name`-a / `name`-b, with
    /// `ours` and `theirs` (IPv4, /24) on its ends.
    pub fn link(&self, other: &Libvirtd, name: &str, ours: &str, theirs: &str) {
        let pid = |d: &Libvirtd| d.child.as_ref().expect("libvirtd is running").id().to_string();
        let run = |command: &mut Command| {
            let out = command.output().unwrap_or_else(|e| panic!("{command:?} could not run: {e}"));
            assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let (a, b) = (format!("{name}-a"), format!("{name}-b"));
        run(Command::new("ip")
            .args(["link", "add", &a, "netns", &pid(self), "type", "veth", "peer", "name", &b])
            .args(["netns", &pid(other)]));
        for (daemon, dev, addr) in [(self, &a, ours), (other, &b, theirs)] {
            run(daemon.netns_command("ip").args(["addr", "add", &format!("{addr}/24"), "dev", dev]));
            run(daemon.netns_command("ip").args(["link", "set", dev, "up"]));
        }
    }

    /// The daemon's stderr and the tail of its log.
    pub fn logs(&self) -> String {
        let stderr = std::fs::read_to_string(self.dir.join("libvirtd.stderr")).unwrap_or_default();
        let log = std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!("stderr:\n{stderr}\nlog tail:\n{}", lines[lines.len().saturating_sub(30)..].join("\n"))
    }

    fn virsh_status(&self, args: &[&str]) -> bool {
        Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs virsh against the daemon; panics with its output if it fails.
    pub fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh")
            .args(["-q", "-c", &self.uri])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("virsh could not run: {e}"));
        assert!(
            out.status.success(),
            "virsh {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 10 s) and powers off any guest it left running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: plain kill(2) on the daemon's own pid, which is still our unreaped child.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        while child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        // Guests outlive libvirtd by design; their pid files are in the private runtime directory.
        for entry in std::fs::read_dir(self.dir.join("run/qemu")).into_iter().flatten().flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Some(pid) =
                    std::fs::read_to_string(entry.path()).ok().and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a guest this daemon started (its pid file is ours).
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Stops and starts the daemon again on the same directories (its persistent objects survive).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.stop();
    }
}
