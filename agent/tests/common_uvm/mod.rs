//! The utility VM: debian-12-minimal with the agent-node layer, gridforge-agent installed as a systemd
//! service and enabled, booted under qemu with a blank second drive (`/dev/vdb`, the only device the agent
//! may touch) and the agent's gRPC port forwarded to 127.0.0.1. Its boot disk is written by the agent's own
//! provisioning: the freshly built binary goes in as an image layer, the unit, `agent.toml` (made from
//! `systemd/agent.toml`), the TLS files and a signing key for wipe reports as customization file ops. The
//! Debian image the agent provisions from inside the VM is a signed directory store inside the boot disk.
//! The disk is cached under `target/uvm/`, keyed by everything that goes into it.
//!
//! The serial console logs in root automatically, so tests can type commands into it (`Uvm::shell`).
#![allow(dead_code)]
// Uses `crate::common_vm`: a test using this module declares both.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gridforge_common::client::{ClientTls, connect};
use gridforge_proto::v1::ListJobsRequest;
use gridforge_proto::v1::agent_client::AgentClient;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use crate::common_vm::{Vm, VmOptions, free_port, image_rootfs};

/// The agent's gRPC port in the guest.
pub const AGENT_PORT: u16 = 7443;
/// Where the Debian image store lies in the guest.
pub const GUEST_STORE: &str = "/srv/gridforge/store";
/// The wipe report signing key in the guest (its public half is `UvmImage::report_key_pub`).
pub const GUEST_REPORT_KEY: &str = "/etc/gridforge/report-signing.key";
pub const UVM_MAC: &str = "52:54:00:75:76:01";
/// Size of the blank second drive.
pub const DATA_DISK_BYTES: u64 = 3 << 30;
const BOOT_DISK_MIB: u64 = 4096;

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gridforge-agent"))
}

fn top() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root")
}

/// Runs gridforge-agent with `args`; panics with its output if it fails. Returns stdout.
pub fn agent(args: &[&str]) -> String {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("gridforge-agent could not run: {e}"));
    assert!(
        out.status.success(),
        "gridforge-agent {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// The built boot disk and what a client needs to talk to the agent in it.
pub struct UvmImage {
    pub dir: PathBuf,
    pub boot_disk: PathBuf,
    /// `pki/`: ca.pem, agent.pem/.key (the agent's), client.pem/.key (the test's).
    pub pki: PathBuf,
    /// Public key of the wipe report signing key the agent uses.
    pub report_key_pub: PathBuf,
    /// The store the boot disk was provisioned from: it holds debian-12-minimal, signed by `store_key`.
    pub store: PathBuf,
    pub store_key: PathBuf,
}

/// The utility VM's boot disk, built once per test process (and cached across runs).
pub fn image() -> &'static UvmImage {
    static IMAGE: OnceLock<UvmImage> = OnceLock::new();
    IMAGE.get_or_init(build_image)
}

fn file_hash(h: &mut Sha256, path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    h.update(path.as_os_str().as_encoded_bytes());
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes);
}

fn build_image() -> UvmImage {
    let debian = image_rootfs("debian-12-minimal", "GRIDFORGE_DEBIAN_ROOTFS");
    let agent_node = image_rootfs("agent-node", "GRIDFORGE_AGENT_NODE_ROOTFS");
    let unit = top().join("systemd/gridforge-agent.service");
    let toml_template = top().join("systemd/agent.toml");
    // The key covers what the disk is made of: the image tars (their names carry their recipe hash), the
    // agent binary, the unit, the configuration template and this file.
    let mut h = Sha256::new();
    h.update(include_str!("mod.rs").as_bytes());
    for p in [&debian, &agent_node] {
        h.update(p.as_os_str().as_encoded_bytes());
        h.update(std::fs::metadata(p).unwrap().len().to_le_bytes());
    }
    for p in [&agent_bin(), &unit, &toml_template] {
        file_hash(&mut h, p);
    }
    let key: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let cache = top().join("target/uvm");
    let dir = cache.join(&key);
    let image = UvmImage {
        boot_disk: dir.join("boot.img"),
        pki: dir.join("pki"),
        report_key_pub: dir.join("report-signing.key.pub"),
        store: dir.join("store"),
        store_key: dir.join("store-signing.key"),
        dir,
    };
    if image.boot_disk.is_file() {
        eprintln!("utility VM boot disk: cached {}", image.boot_disk.display());
        return image;
    }
    std::fs::create_dir_all(&cache).unwrap();
    // Disks made from an older binary or recipe are of no further use (4 GiB sparse each).
    for entry in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() == 16 && name.chars().all(|c| c.is_ascii_hexdigit()) && name != key {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    // Built in a scratch directory and renamed into place, so an interrupted build is never used.
    let work = tempfile::tempdir_in(&cache).unwrap();
    let w = work.path();
    let t = Instant::now();

    // PKI: a CA, the agent's certificate (for the forwarded port on 127.0.0.1) and the test client's.
    let pki = w.join("pki");
    agent(&["pki", "init", "--dir", s(&pki)]);
    agent(&["pki", "issue", "--dir", s(&pki), "--name", "agent", "--dns", "localhost", "--ip", "127.0.0.1"]);
    agent(&["pki", "issue", "--dir", s(&pki), "--name", "client"]);

    // The store inside the guest: debian-12-minimal, signed.
    let store_key = w.join("store-signing.key");
    agent(&["image", "keygen", "--out", s(&store_key)]);
    let store = w.join("store");
    agent(&[
        "image",
        "pack",
        "--rootfs",
        s(&debian),
        "--name",
        "debian-12-minimal",
        "--version",
        "1",
        "--store",
        s(&store),
        "--key",
        s(&store_key),
    ]);
    let report_key = w.join("report-signing.key");
    agent(&["image", "keygen", "--out", s(&report_key)]);

    // The install layer: the agent binary and a copy of the store.
    let layer = w.join("install-layer");
    let bin_dir = layer.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::copy(agent_bin(), bin_dir.join("gridforge-agent")).unwrap();
    let guest_store = layer.join(GUEST_STORE.trim_start_matches('/'));
    std::fs::create_dir_all(guest_store.parent().unwrap()).unwrap();
    let cp = Command::new("cp").arg("-a").arg(&store).arg(&guest_store).status().unwrap();
    assert!(cp.success(), "copying the store into the install layer");
    // The boot disk's own images go into a second store, so the guest's holds only Debian.
    let boot_store = w.join("boot-store");
    let cp = Command::new("cp").arg("-a").arg(&store).arg(&boot_store).status().unwrap();
    assert!(cp.success(), "copying the store");
    for (name, rootfs) in [("agent-node", agent_node.as_path()), ("gridforge-agent-install", layer.as_path())]
    {
        agent(&[
            "image",
            "pack",
            "--rootfs",
            s(rootfs),
            "--kind",
            "layer",
            "--name",
            name,
            "--version",
            "1",
            "--store",
            s(&boot_store),
            "--key",
            s(&store_key),
        ]);
    }

    let read =
        |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    let store_pub = read(&store_key.with_extension("key.pub")).trim().to_string();
    let config = agent_toml(&read(&toml_template), &store_pub);
    let file = |path: &str, content: String, mode: &str| serde_json::json!({"action": "WRITE", "path": path, "content": content, "mode": mode});
    let spec = serde_json::json!({
        "name": "uvm",
        "image": {"name": "debian-12-minimal", "version": "1"},
        "layers": [{"name": "agent-node", "version": "1"}, {"name": "gridforge-agent-install", "version": "1"}],
        "disk": {"size_mib": BOOT_DISK_MIB, "partitions": [
            {"label": "esp", "role": "ESP", "size_mib": 256, "filesystem": "VFAT"},
            {"label": "root", "role": "ROOT", "filesystem": "EXT4"}
        ]},
        "customize": {
            "hostname": "uvm",
            "network": [{"dhcp": true}],
            "files": [
                file("/etc/systemd/system/gridforge-agent.service", read(&unit), "0644"),
                {"action": "SYMLINK", "path": "/etc/systemd/system/multi-user.target.wants/gridforge-agent.service",
                 "target": "/etc/systemd/system/gridforge-agent.service"},
                file("/etc/gridforge/agent.toml", config, "0640"),
                file("/etc/gridforge/tls/ca.pem", read(&pki.join("ca.pem")), "0644"),
                file("/etc/gridforge/tls/agent.pem", read(&pki.join("agent.pem")), "0644"),
                file("/etc/gridforge/tls/agent.key", read(&pki.join("agent.key")), "0600"),
                file(GUEST_REPORT_KEY, read(&report_key), "0600"),
                file(&format!("{GUEST_REPORT_KEY}.pub"), read(&report_key.with_extension("key.pub")), "0644"),
                // Root is logged in on the serial console, for the tests to type into.
                file(
                    "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
                    "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud \
                     115200,57600,38400,9600 %I $TERM\n".into(),
                    "0644"
                ),
            ]
        }
    });
    let spec_path = w.join("uvm.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let boot_disk = w.join("boot.img");
    agent(&[
        "provision",
        "--spec",
        s(&spec_path),
        "--disk",
        s(&boot_disk),
        "--store",
        s(&boot_store),
        "--trusted-key",
        &store_pub,
        "--cache",
        s(&w.join("cache")),
        "--work-dir",
        s(&w.join("work")),
    ]);
    for scratch in ["cache", "work", "boot-store", "install-layer"] {
        let _ = std::fs::remove_dir_all(w.join(scratch));
    }
    let kept = work.keep();
    std::fs::rename(&kept, &image.dir)
        .unwrap_or_else(|e| panic!("moving the boot disk into {}: {e}", image.dir.display()));
    eprintln!("utility VM boot disk: built in {:.1} s", t.elapsed().as_secs_f64());
    image
}

/// `agent.toml` for the utility VM: the shipped template with a disk-only node's settings.
fn agent_toml(template: &str, store_pub: &str) -> String {
    let mut cfg: toml::Table = template.parse().unwrap_or_else(|e| panic!("systemd/agent.toml: {e}"));
    let table = |cfg: &mut toml::Table, name: &str| -> toml::Table {
        cfg.get(name).and_then(|v| v.as_table()).cloned().unwrap_or_default()
    };
    cfg.insert("listen".into(), format!("0.0.0.0:{AGENT_PORT}").into());
    let mut tls = table(&mut cfg, "tls");
    tls.insert("ca".into(), "/etc/gridforge/tls/ca.pem".into());
    tls.insert("cert".into(), "/etc/gridforge/tls/agent.pem".into());
    tls.insert("key".into(), "/etc/gridforge/tls/agent.key".into());
    tls.insert("insecure".into(), false.into());
    cfg.insert("tls".into(), tls.into());
    let mut images = table(&mut cfg, "images");
    images.insert("store".into(), GUEST_STORE.into());
    images.insert("trusted_key".into(), store_pub.into());
    cfg.insert("images".into(), images.into());
    let mut libvirt = table(&mut cfg, "libvirt");
    libvirt.insert("uri".into(), "".into());
    cfg.insert("libvirt".into(), libvirt.into());
    let mut jobs = table(&mut cfg, "jobs");
    jobs.insert("devices".into(), toml::Value::Array(vec!["/dev/vdb".into()]));
    jobs.insert("report_signing_key".into(), GUEST_REPORT_KEY.into());
    cfg.insert("jobs".into(), jobs.into());
    let text = toml::to_string(&cfg).unwrap();
    // What the daemon would refuse is better found here than on the guest's console.
    gridforge_agent::config::Config::parse(&text, Path::new("agent.toml"))
        .unwrap_or_else(|e| panic!("the utility VM's agent.toml does not load: {e}\n{text}"));
    text
}

/// A blank sparse drive of [`DATA_DISK_BYTES`].
pub fn blank_disk(path: &Path) -> PathBuf {
    std::fs::File::create(path).unwrap().set_len(DATA_DISK_BYTES).unwrap();
    path.to_path_buf()
}

/// A running utility VM.
pub struct Uvm {
    pub vm: Vm,
    /// The host port forwarded to the agent.
    pub port: u16,
    shell_seq: u32,
}

impl Uvm {
    /// Copies the cached boot disk into `dir` (once; later boots reuse the copy) and boots it with `data_disk`
    /// as /dev/vdb.
    pub fn boot(name: &str, dir: &Path, data_disk: &Path) -> Self {
        let image = image();
        let disk = dir.join(format!("{name}-boot.img"));
        if !disk.exists() {
            let cp = Command::new("cp")
                .args(["--sparse=always", "--reflink=auto"])
                .arg(&image.boot_disk)
                .arg(&disk)
                .status()
                .unwrap();
            assert!(cp.success(), "copying the boot disk");
        }
        let port = free_port();
        let options = VmOptions {
            memory_mib: 1024,
            extra_drives: vec![data_disk.to_path_buf()],
            forwards: vec![(port, AGENT_PORT)],
            serial_input: true,
            ..Default::default()
        };
        let vm = Vm::boot_with(name, &disk, UVM_MAC, dir, &options);
        Self { vm, port, shell_seq: 0 }
    }

    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The test client's TLS settings (its certificate is signed by the CA the agent trusts).
    pub fn client_tls() -> ClientTls {
        let pki = &image().pki;
        ClientTls {
            ca: pki.join("ca.pem"),
            cert: pki.join("client.pem"),
            key: pki.join("client.key"),
            domain: Some("localhost".into()),
        }
    }

    /// Waits until the agent answers over mTLS (the VM boots, systemd starts the service); returns a client.
    pub async fn wait_for_agent(&mut self, timeout: Duration) -> AgentClient<Channel> {
        let start = Instant::now();
        let tls = Self::client_tls();
        loop {
            let last = match connect(&self.endpoint(), Some(&tls)).await {
                Ok(mut client) => match client.list_jobs(ListJobsRequest::default()).await {
                    Ok(_) => {
                        eprintln!(
                            "{}: agent answers over mTLS {:.1} s after start",
                            self.vm.name,
                            self.vm.started.elapsed().as_secs_f64()
                        );
                        return client;
                    }
                    Err(e) => format!("ListJobs: {e}"),
                },
                Err(e) => format!("connect: {e}"),
            };
            // systemd reports a unit that fails to start on the console while booting.
            let failed = self.vm.serial().contains("Failed to start gridforge-");
            if failed || start.elapsed() > timeout {
                let journal = self.shell(
                    "systemctl status --no-pager gridforge-agent; journalctl -u gridforge-agent --no-pager | tail -n 30",
                    Duration::from_secs(120),
                );
                panic!(
                    "{}: the agent did not answer on {} (last: {last}; unit failed to start: {failed})\n{journal}",
                    self.vm.name,
                    self.endpoint(),
                );
            }
            assert!(
                !self.vm.wait_exit(Duration::ZERO),
                "{}: qemu exited\n{}",
                self.vm.name,
                self.vm.tail(80)
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Runs `command` in root's shell on the serial console and returns its output (stdout and stderr).
    pub fn shell(&mut self, command: &str, timeout: Duration) -> String {
        // The console logs root in a few seconds before the agent answers (see `wait_for_agent`).
        self.vm.wait_for_serial("(automatic login)", crate::common_vm::boot_timeout(Duration::from_secs(45)));
        self.shell_seq += 1;
        let n = self.shell_seq;
        // The markers are computed by the shell, so the echo of the typed line never matches them.
        let begin = format!("@@begin-{}", 1000 + n);
        let end = format!("@@end-{}", 1000 + n);
        self.vm
            .type_serial(&format!("echo @@begin-$((1000+{n})); {command} 2>&1; echo @@end-$((1000+{n}))\n"));
        let start = Instant::now();
        loop {
            let log = self.vm.serial();
            if let Some(b) = log.rfind(&begin)
                && let Some(e) = log[b..].find(&end)
            {
                let out = &log[b + begin.len()..b + e];
                return out.replace('\r', "").trim().to_string();
            }
            assert!(
                start.elapsed() < timeout,
                "{}: {command:?} on the serial console did not finish within {timeout:?}\n{}",
                self.vm.name,
                self.vm.tail(60)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A read-only `command`'s output, checked against the sha256 the guest computes of it: the serial
    /// console now and then garbles a character (a doubled byte), and messages of the guest's own (systemd,
    /// the kernel) can land in the middle of an answer. An answer whose digest does not match is asked
    /// again, at most 5 times.
    pub fn query(&mut self, command: &str, timeout: Duration) -> String {
        let wrapped = format!(
            "{{ {command}; }} >/tmp/query.out 2>&1; echo @@out; cat /tmp/query.out; echo; \
             echo @@sha256=$(sha256sum </tmp/query.out | cut -c1-64)"
        );
        let mut last = String::new();
        for _ in 0..5 {
            last = self.shell(&wrapped, timeout);
            if let Some(out) = checked_answer(&last) {
                return out.trim().to_string();
            }
            eprintln!(
                "{}: {command:?}: the answer does not match its digest; asking again:\n{last}",
                self.vm.name
            );
        }
        panic!("{}: {command:?} never came back intact on the serial console: {last}", self.vm.name)
    }

    /// Powers the guest off from its console and waits for qemu to exit (killed after `timeout`).
    pub fn power_off(&mut self, timeout: Duration) {
        self.vm.type_serial("systemctl poweroff\n");
        if !self.vm.wait_exit(timeout) {
            eprintln!("{}: did not power off within {timeout:?}; killing qemu", self.vm.name);
        }
    }
}

/// The output in `answer` (`@@out`, the bytes, a newline, `@@sha256=HEX`) when its sha256 is HEX.
fn checked_answer(answer: &str) -> Option<&str> {
    use sha2::Digest;
    let (_, rest) = answer.split_once("@@out\n")?;
    // The marker itself is not covered by the digest, and its first byte is sometimes doubled too.
    let (out, digest) = rest.rsplit_once("@@sha256=")?;
    // The `echo` after `cat` puts the digest on a line of its own: that newline is the separator's.
    let out = out.trim_end_matches('@').strip_suffix('\n')?;
    (hex::encode(sha2::Sha256::digest(out.as_bytes())) == digest.trim()).then_some(out)
}
