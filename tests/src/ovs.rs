//! Open vSwitch for a node's namespace: its own ovsdb-server and ovs-vswitchd (userspace datapath: this
//! kernel has no openvswitch module) with a private run directory, a tenant bridge and an uplink bridge
//! whose physical port is a tap the test holds, and a way to be a guest on any tap: open it, send and read
//! raw Ethernet frames.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::process;

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// The uplink bridge's physical port (a tap: the test plays the upstream switch on it).
pub const UPLINK_PORT: &str = "gfwire";

/// The daemons of one namespace's switch; stopped on drop.
pub struct Switch {
    pub ns: Netns,
    pub rundir: PathBuf,
}

impl Switch {
    /// Start the daemons in `ns` with their files in `rundir`, and make `tenant_bridge` and
    /// `uplink_bridge` (with [`UPLINK_PORT`] on it).
    pub fn start(ns: &Netns, rundir: &Path, tenant_bridge: &str, uplink_bridge: &str) -> Switch {
        std::fs::create_dir_all(rundir).unwrap();
        let sw = Switch { ns: ns.clone(), rundir: rundir.to_path_buf() };
        let db = rundir.join("conf.db");
        process::run_ok(
            Command::new("ovsdb-tool").arg("create").arg(&db).arg("/usr/share/openvswitch/vswitch.ovsschema"),
            TOOL_TIMEOUT,
        );
        let file = |n: &str| rundir.join(n).display().to_string();
        let mut server = sw.command("ovsdb-server");
        server
            .arg(&db)
            .arg(format!("--remote=punix:{}", file("db.sock")))
            .arg(format!("--pidfile={}", file("ovsdb-server.pid")))
            .arg(format!("--log-file={}", file("ovsdb-server.log")))
            .arg("--detach");
        process::run_ok(&mut server, TOOL_TIMEOUT);
        sw.vsctl(&["--no-wait", "init"]);
        let mut vswitchd = sw.command("ovs-vswitchd");
        vswitchd
            .arg(format!("unix:{}", file("db.sock")))
            .arg(format!("--pidfile={}", file("ovs-vswitchd.pid")))
            .arg(format!("--log-file={}", file("ovs-vswitchd.log")))
            .arg("--detach");
        process::run_ok(&mut vswitchd, TOOL_TIMEOUT);
        for br in [tenant_bridge, uplink_bridge] {
            sw.vsctl(&["add-br", br, "--", "set", "Bridge", br, "datapath_type=netdev"]);
        }
        process::run_ok(
            sw.ns.command("ip").args(["tuntap", "add", "dev", UPLINK_PORT, "mode", "tap"]),
            TOOL_TIMEOUT,
        );
        process::run_ok(sw.ns.command("ip").args(["link", "set", UPLINK_PORT, "up"]), TOOL_TIMEOUT);
        sw.vsctl(&["add-port", uplink_bridge, UPLINK_PORT]);
        sw
    }

    /// `program` in the namespace, with the run directory as Open vSwitch's.
    fn command(&self, program: &str) -> Command {
        let mut c = self.ns.command(program);
        c.env("OVS_RUNDIR", &self.rundir).env("OVS_LOGDIR", &self.rundir).env("OVS_DBDIR", &self.rundir);
        c
    }

    pub fn vsctl(&self, args: &[&str]) -> String {
        let mut c = self.command("ovs-vsctl");
        c.arg(format!("--db=unix:{}", self.rundir.join("db.sock").display())).arg("--timeout=20").args(args);
        process::run_ok(&mut c, TOOL_TIMEOUT)
    }

    pub fn ofctl(&self, args: &[&str]) -> String {
        let mut c = self.command("ovs-ofctl");
        c.args(args);
        process::run_ok(&mut c, TOOL_TIMEOUT)
    }

    /// The name of the interface whose `external-ids:gridforge-domain` is `vm` (its NIC's tap), if any.
    pub fn port_of(&self, vm: &str) -> Option<String> {
        let names = self.vsctl(&[
            "--bare",
            "--columns=name",
            "find",
            "Interface",
            &format!("external-ids:gridforge-domain=\"{vm}\""),
        ]);
        names.split_whitespace().next().map(str::to_string)
    }

    /// The access tag of port `port` (None: untagged).
    pub fn tag(&self, port: &str) -> Option<u16> {
        self.vsctl(&["get", "Port", port, "tag"]).trim().parse().ok()
    }

    /// Become the guest (or the upstream switch) on tap `name` of the namespace.
    pub fn open_tap(&self, name: &str) -> Tap {
        Tap::open(&self.ns, name)
    }

    /// The last lines of the switch daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.rundir.join("ovs-vswitchd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        for pidfile in ["ovs-vswitchd.pid", "ovsdb-server.pid"] {
            let pid = std::fs::read_to_string(self.rundir.join(pidfile)).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let end = Instant::now() + Duration::from_secs(5);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// An open tap: frames written to it enter the switch from that port; frames the switch sends out of it
/// are read from it.
pub struct Tap {
    file: File,
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    pad: [u8; 22],
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

impl Tap {
    fn open(ns: &Netns, name: &str) -> Tap {
        let (ns_path, name) = (format!("/run/netns/{}", ns.name), name.to_string());
        // A thread of its own enters the namespace (setns changes only the calling thread); the open tap
        // then works from any thread.
        std::thread::spawn(move || {
            let target = File::open(&ns_path).unwrap_or_else(|e| panic!("{ns_path}: {e}"));
            nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun");
            let mut req = IfReq {
                name: [0; libc::IFNAMSIZ],
                flags: (libc::IFF_TAP | libc::IFF_NO_PI) as _,
                pad: [0; 22],
            };
            req.name[..name.len()].copy_from_slice(name.as_bytes());
            // SAFETY: TUNSETIFF reads a `struct ifreq` (IfReq has its layout and size) from a pointer that
            // is valid for the call; the fd is an open /dev/net/tun.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
            assert_eq!(rc, 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
            // SAFETY: F_GETFL/F_SETFL on an fd this function owns.
            unsafe {
                let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            Tap { file }
        })
        .join()
        .expect("the tap opener panicked")
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.file.write_all(frame).expect("write a frame to the tap");
    }

    /// Every frame that arrives within `window` and contains `marker`.
    pub fn frames_with(&mut self, marker: &[u8], window: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 2048];
        while Instant::now() < end {
            match self.file.read(&mut buf) {
                Ok(n) if buf[..n].windows(marker.len()).any(|w| w == marker) => out.push(buf[..n].to_vec()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("reading the tap: {e}"),
            }
        }
        out
    }
}

/// A broadcast frame from `src` (experimental EtherType 0x88b5), 802.1Q-tagged with `vlan` if given,
/// carrying `marker`.
pub fn frame(src: [u8; 6], vlan: Option<u16>, marker: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    if let Some(v) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(marker);
    f.resize(f.len().max(60), 0);
    f
}

/// The 802.1Q VLAN ID of a frame (None: untagged).
pub fn vlan_of(frame: &[u8]) -> Option<u16> {
    (frame.len() >= 16 && frame[12..14] == [0x81, 0x00])
        .then(|| u16::from_be_bytes([frame[14], frame[15]]) & 0x0fff)
}
