//! Booting provisioned disks in qemu (UEFI with OVMF) and talking to the guests over ssh, for end-to-end
//! tests.
//!
//! KVM is tried once per test run: on some hosts /dev/kvm exists but every guest stops at once with "KVM
//! internal error" (which `accel=kvm:tcg` does not catch), so a short probe decides between KVM and TCG.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const QEMU: &str = "qemu-system-x86_64";

/// Panics with a clear message unless `tool` is an executable on PATH.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{tool} is required for this test and is not on PATH; install {package} (scripts/deps)")
    })
}

/// Panics with a clear message unless qemu, OVMF, ssh and ssh-keygen are all here.
pub fn require_vm_tools() {
    require_tool(QEMU, "qemu-system-x86");
    require_tool("ssh", "openssh-client");
    require_tool("ssh-keygen", "openssh-client");
    for fw in [OVMF_CODE, OVMF_VARS] {
        assert!(
            Path::new(fw).is_file(),
            "{fw} is required for this test and is missing; install ovmf (scripts/deps)"
        );
    }
}

/// The rootfs tar of image recipe `recipe`: from the environment variable `env` (as scripts/test sets it),
/// else built (or found cached) by `scripts/build-image`.
pub fn image_rootfs(recipe: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} is not a file", p.display());
        return p;
    }
    let top = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = Command::new(top.join("scripts/build-image"))
        .arg(recipe)
        .current_dir(top)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/build-image: {e}"));
    assert!(
        out.status.success(),
        "scripts/build-image {recipe} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The qemu accelerator to use, decided once per test run.
pub fn accel() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        let accel = if kvm_works() { "kvm" } else { "tcg" };
        eprintln!("qemu accelerator: {accel}");
        accel
    })
}

/// Starts OVMF under KVM with no disk for a few seconds: a usable KVM keeps running, a broken one reports
/// "KVM internal error" (and pauses the guest) or exits.
fn kvm_works() -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    let dir = tempfile::tempdir().expect("creating a temp dir for the KVM probe");
    let vars = dir.path().join("vars.fd");
    std::fs::copy(OVMF_VARS, &vars).expect("copying OVMF vars for the KVM probe");
    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new(QEMU)
        .args(["-machine", "q35,accel=kvm", "-m", "256", "-display", "none", "-nic", "none"])
        .args(pflash_args(&vars))
        .args(["-serial", "null", "-monitor", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&stderr_path).expect("creating the KVM probe's stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("{QEMU} could not run: {e}"));
    let started = Instant::now();
    let mut works = true;
    while started.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(200));
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if stderr.contains("KVM internal error") || stderr.contains("failed to initialize kvm") {
            works = false;
            break;
        }
        if child.try_wait().ok().flatten().is_some() {
            works = false;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    works
}

fn pflash_args(vars: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ]
}

/// Held while an emulated guest runs. Every test that boots a guest (qemu directly or through libvirtd) takes
/// it first, in every test binary and every checkout on the machine: two emulated guests on two cores starve
/// each other until the guest kernels report soft lockups. An flock on one file, released on drop (and by
/// the kernel when the process dies).
pub struct EmulatorLock {
    _file: File,
}

/// The lock file every test process on this machine shares.
pub const EMULATOR_LOCK: &str = "/tmp/gridforge-emulated-guest.lock";

impl EmulatorLock {
    /// Blocks until no other test runs an emulated guest; says how long it waited when it did.
    pub fn acquire(who: &str) -> Self {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(EMULATOR_LOCK)
            .unwrap_or_else(|e| panic!("opening {EMULATOR_LOCK}: {e}"));
        let start = Instant::now();
        // SAFETY: flock(2) on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {EMULATOR_LOCK}: {}", std::io::Error::last_os_error());
        if start.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "{who}: waited {:.0} s for another test's guest to finish",
                start.elapsed().as_secs_f64()
            );
        }
        Self { _file: file }
    }
}

/// Virtual CPUs for a test guest: one under TCG (each emulated vCPU takes a host core; the machines that run
/// the tests have two), two with a working KVM.
pub fn guest_vcpus() -> u32 {
    if accel() == "kvm" { 2 } else { 1 }
}

/// How long a boot step may take: `typical` is the time measured for it under TCG on an idle two-core
/// machine; a loaded machine or a slow CI runner gets three times that, plus a fixed margin.
pub fn boot_timeout(typical: Duration) -> Duration {
    typical * 3 + Duration::from_secs(30)
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    gridforge_common::net::unused_loopback_port()
}

/// The outcome of one command of [`Vm::run_all`].
#[derive(Clone, Debug)]
pub struct CommandResult {
    pub ok: bool,
    /// stdout and stderr, as the guest printed them.
    pub output: String,
}

/// An ssh key pair made with ssh-keygen (ed25519, no passphrase).
pub struct SshKey {
    pub private: PathBuf,
    pub public: String,
}

impl SshKey {
    pub fn generate(dir: &Path) -> Self {
        let private = dir.join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "gridforge-test", "-f"])
            .arg(&private)
            .output()
            .unwrap_or_else(|e| panic!("ssh-keygen could not run: {e}"));
        assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        let public = std::fs::read_to_string(private.with_extension("pub")).expect("reading the public key");
        Self { private, public: public.trim().to_string() }
    }
}

/// A UEFI guest running in qemu from one raw disk, with its ssh port forwarded to the loopback interface.
/// Killed on drop.
pub struct Vm {
    pub name: String,
    pub ssh_port: u16,
    pub serial_log: PathBuf,
    serial_socket: Option<PathBuf>,
    stderr_log: PathBuf,
    child: Child,
    pub started: Instant,
    /// Dropped after the child is killed (field order): the next test's guest starts only once this one is
    /// gone.
    _lock: EmulatorLock,
}

/// What a [`Vm`] gets besides its boot disk, its NIC and its ssh port forward.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub memory_mib: u32,
    /// The boot disk's format: "raw", or "qcow2" for an overlay clone.
    pub disk_format: &'static str,
    /// More raw disks, attached as virtio drives after the boot disk (vdb, vdc, ...).
    pub extra_drives: Vec<PathBuf>,
    /// More TCP ports forwarded from 127.0.0.1: (host port, guest port).
    pub forwards: Vec<(u16, u16)>,
    /// Serial console on a unix socket too, so that [`Vm::type_serial`] can type into it (the log file
    /// still records everything).
    pub serial_input: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            disk_format: "raw",
            extra_drives: Vec::new(),
            forwards: Vec::new(),
            serial_input: false,
        }
    }
}

impl Vm {
    /// Boots `disk` with its NIC at `mac` (qemu user networking, 10.0.2.0/24); logs go to `dir`.
    pub fn boot(name: &str, disk: &Path, mac: &str, dir: &Path) -> Self {
        Self::boot_with(name, disk, mac, dir, &VmOptions::default())
    }

    /// [`Vm::boot`] with more drives, forwards or a typeable console.
    pub fn boot_with(name: &str, disk: &Path, mac: &str, dir: &Path, options: &VmOptions) -> Self {
        let lock = EmulatorLock::acquire(name);
        let vars = dir.join(format!("{name}-OVMF_VARS.fd"));
        std::fs::copy(OVMF_VARS, &vars).unwrap_or_else(|e| panic!("copying {OVMF_VARS}: {e}"));
        let serial_log = dir.join(format!("{name}-serial.log"));
        let serial_socket = dir.join(format!("{name}-serial.sock"));
        let stderr_log = dir.join(format!("{name}-qemu.stderr"));
        let ssh_port = free_port();
        let mut command = Command::new(QEMU);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It makes the kernel kill
        // qemu when the spawning thread exits, so a test killed outright (where Drop never runs) leaves no
        // guest behind; a Vm must therefore be used on the thread that booted it.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut netdev = format!("user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22");
        for (host, guest) in &options.forwards {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        command
            .args(["-machine", &format!("q35,accel={}", accel()), "-m", &options.memory_mib.to_string()])
            .args(["-smp", &guest_vcpus().to_string()])
            .args(pflash_args(&vars))
            .arg("-drive")
            .arg(format!("file={},format={},if=virtio", disk.display(), options.disk_format));
        for drive in &options.extra_drives {
            command.arg("-drive").arg(format!("file={},format=raw,if=virtio", drive.display()));
        }
        command.args(["-netdev", &netdev]).args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
        if options.serial_input {
            let _ = std::fs::remove_file(&serial_socket);
            command.arg("-chardev").arg(format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={}",
                serial_socket.display(),
                serial_log.display()
            ));
            command.args(["-serial", "chardev:serial0"]);
        } else {
            command.arg("-serial").arg(format!("file:{}", serial_log.display()));
        }
        let child = command
            .args(["-display", "none", "-monitor", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_log).expect("creating qemu's stderr log"))
            .spawn()
            .unwrap_or_else(|e| panic!("{QEMU} could not run: {e}"));
        Self {
            name: name.to_string(),
            ssh_port,
            serial_log,
            serial_socket: options.serial_input.then_some(serial_socket),
            stderr_log,
            child,
            started: Instant::now(),
            _lock: lock,
        }
    }

    /// Types `text` into the serial console (the VM must have been booted with `serial_input`). Connects
    /// for the typing only: while a client is connected qemu also sends it the console output, and a client
    /// that stays connected is one more way for the guest's serial port to stall. The log file has it all.
    pub fn type_serial(&mut self, text: &str) {
        let socket = self.serial_socket.clone().expect("the VM was booted without serial_input");
        let mut conn = UnixStream::connect(&socket)
            .unwrap_or_else(|e| panic!("{}: connecting to {}: {e}", self.name, socket.display()));
        // A serial line takes input at its own pace: write slowly enough for the tty not to drop bytes.
        for chunk in text.as_bytes().chunks(16) {
            conn.write_all(chunk).unwrap_or_else(|e| panic!("typing into the serial console: {e}"));
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    /// Waits up to `timeout` for qemu to exit (e.g. after the guest powered off); false if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait().expect("polling qemu").is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    pub fn tail(&self, lines: usize) -> String {
        let serial = self.serial();
        let all: Vec<&str> = serial.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the serial console shows `text`; panics with the log's tail on timeout or if qemu exits.
    pub fn wait_for_serial(&mut self, text: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.serial().contains(text) {
                return self.started.elapsed();
            }
            if let Some(status) = self.child.try_wait().expect("polling qemu") {
                panic!(
                    "{}: qemu exited ({status}) before {text:?} appeared\nqemu stderr:\n{}\nserial log tail:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.stderr_log).unwrap_or_default(),
                    self.tail(60)
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: {text:?} did not appear on the serial console within {timeout:?}\nqemu stderr:\n{}\n\
                     last 60 lines of the serial log:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.stderr_log).unwrap_or_default(),
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Runs `command` in the guest as `user` over ssh.
    pub fn ssh(&self, key: &SshKey, user: &str, command: &str) -> Output {
        Command::new("ssh")
            .arg("-i")
            .arg(&key.private)
            .args(["-p", &self.ssh_port.to_string()])
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg(format!("{user}@127.0.0.1"))
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ssh could not run: {e}"))
    }

    /// Runs `command` as `user` and returns its stdout; panics with its output if it fails.
    pub fn ssh_ok(&self, key: &SshKey, user: &str, command: &str) -> String {
        let out = self.ssh(key, user, command);
        assert!(
            out.status.success(),
            "{}: ssh {user}@guest {command:?} failed ({}):\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs several named commands in one ssh session (each ssh login costs seconds under TCG) and returns
    /// each one's outcome by name; stderr is folded into the output.
    pub fn run_all(
        &self,
        key: &SshKey,
        user: &str,
        commands: &[(&str, &str)],
    ) -> BTreeMap<String, CommandResult> {
        let mut script = String::new();
        for (name, command) in commands {
            script.push_str(&format!(
                "echo '@@begin {name}'; ( {command} ) 2>&1; echo; echo \"@@end {name} $?\"\n"
            ));
        }
        let out = self.ssh(key, user, &script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut results = BTreeMap::new();
        let mut current: Option<(String, String)> = None;
        for line in stdout.lines() {
            if let Some(name) = line.strip_prefix("@@begin ") {
                current = Some((name.to_string(), String::new()));
            } else if let Some(rest) = line.strip_prefix("@@end ")
                && let Some((name, mut text)) = current.take()
            {
                // The `echo` before the end marker guarantees a line break; drop it again.
                text.pop();
                let ok = rest.rsplit(' ').next() == Some("0");
                results.insert(name, CommandResult { ok, output: text });
            } else if let Some((_, text)) = current.as_mut() {
                text.push_str(line);
                text.push('\n');
            }
        }
        for (name, _) in commands {
            assert!(
                results.contains_key(*name),
                "{}: ssh {user}@guest gave no result for {name:?} ({}):\n{stdout}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        results
    }

    /// Retries ssh as `user` until `true` runs in the guest; panics with the last error on timeout.
    pub fn wait_for_ssh(&mut self, key: &SshKey, user: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let out = self.ssh(key, user, "true");
            if out.status.success() {
                return self.started.elapsed();
            }
            if let Some(status) = self.child.try_wait().expect("polling qemu") {
                panic!("{}: qemu exited ({status}) while waiting for ssh\n{}", self.name, self.tail(60));
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: ssh {user}@127.0.0.1:{} did not work within {timeout:?}: {}\nserial log tail:\n{}",
                    self.name,
                    self.ssh_port,
                    String::from_utf8_lossy(&out.stderr),
                    self.tail(60)
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
