//! Command-line adapter over the agent engine.

mod diagnose;
mod job;
mod output;
mod pki;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gridforge_agent::block::{BlockTarget, TargetOptions};
use gridforge_agent::crypt::luks2::{self, FormatOptions, Kdf};
use gridforge_agent::image::{self, Trust, index::Kind};
use gridforge_agent::provision::{self, ImageSource, ProvisionRequest};
use gridforge_agent::wipe;
use gridforge_proto::v1::VmSpec;

use output::Output;

/// gridforge node agent: partitions, formats, images and customizes guest disks.
#[derive(Parser)]
#[command(name = "gridforge-agent", version, about, long_about = None)]
struct Cli {
    /// Print machine-readable JSON: one event per line while working, then the result.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make and manage signed image stores.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Write a guest disk from a spec: partition, unpack and verify the image, format.
    Provision(ProvisionArgs),
    /// Show a disk's partition table and file systems (UUIDs and labels as blkid reports them).
    Inspect(InspectArgs),
    /// Securely wipe a disk (NIST SP 800-88 Clear or Purge), verify it and write a signed wipe report.
    Wipe(WipeArgs),
    /// Check wipe reports.
    #[command(subcommand)]
    Report(ReportCommand),
    /// Make and manage LUKS2 volumes (readable by cryptsetup) without device-mapper.
    #[command(subcommand)]
    Luks(LuksCommand),
    /// List or delete the base disks of cached provisions.
    #[command(subcommand)]
    Base(BaseCommand),
    /// Check the node (libvirt, KVM, CPU, memory, devices, pool, cache, TLS certificate, clock, state, jobs);
    /// one line per check: OK, WARN or FAIL and why. Exits 1 when any check fails.
    Diagnose(diagnose::DiagnoseArgs),
    /// Run the node daemon: gRPC jobs over mutual TLS, health, reflection, Prometheus metrics, systemd notify.
    Serve(serve::ServeArgs),
    /// Submit, follow, show, list and cancel an agent's jobs over gRPC.
    Job(job::JobArgs),
    /// Make a CA and certificates for the agents' mutual TLS.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
}

#[derive(Subcommand)]
enum LuksCommand {
    /// Format a LUKS2 volume (aes-xts-plain64, 512-bit key) over the disk from --offset to its end.
    Format(LuksFormatArgs),
    /// Add a keyslot for --new-passphrase-file, unlocking with --passphrase-file.
    AddKey(LuksAddKeyArgs),
    /// Remove the keyslot that --passphrase-file opens (never the last one).
    RemoveKey(LuksArgs),
    /// Show the LUKS2 metadata (no secrets).
    Dump(LuksVolumeArgs),
    /// Check a passphrase; exits 1 if no keyslot opens with it.
    CheckPassphrase(LuksArgs),
}

#[derive(Args)]
struct LuksVolumeArgs {
    /// The disk holding the volume: a block device or a regular file.
    #[arg(long)]
    disk: PathBuf,
    /// Byte offset of the volume in the disk.
    #[arg(long, default_value_t = 0)]
    offset: u64,
}

#[derive(Args)]
struct LuksArgs {
    #[command(flatten)]
    volume: LuksVolumeArgs,
    /// File whose whole content is the passphrase (as cryptsetup --key-file reads it: a trailing newline counts).
    #[arg(long)]
    passphrase_file: PathBuf,
}

#[derive(Args)]
struct LuksFormatArgs {
    #[command(flatten)]
    luks: LuksArgs,
    #[arg(long, value_enum, default_value_t = KdfArg::Argon2id)]
    kdf: KdfArg,
    /// Payload sector size.
    #[arg(long, default_value = "4096", value_parser = ["512", "4096"])]
    sector_size: String,
    /// Volume label (up to 47 bytes).
    #[arg(long, default_value = "")]
    label: String,
    /// Volume UUID [default: random].
    #[arg(long)]
    uuid: Option<uuid::Uuid>,
}

#[derive(Args)]
struct LuksAddKeyArgs {
    #[command(flatten)]
    luks: LuksArgs,
    /// File whose whole content is the new passphrase.
    #[arg(long)]
    new_passphrase_file: PathBuf,
    #[arg(long, value_enum, default_value_t = KdfArg::Argon2id)]
    kdf: KdfArg,
}

/// Keyslot key derivation presets.
#[derive(Clone, Copy, ValueEnum)]
enum KdfArg {
    /// Argon2id, 256 MiB, 4 passes, 2 lanes.
    Argon2id,
    /// Argon2id, 32 MiB, 4 passes, 1 lane (tests only).
    Argon2idFast,
    /// PBKDF2-HMAC-SHA256, 1 000 000 iterations.
    Pbkdf2,
}

impl KdfArg {
    fn kdf(self) -> Kdf {
        match self {
            KdfArg::Argon2id => Kdf::ARGON2ID,
            KdfArg::Argon2idFast => Kdf::ARGON2ID_FAST,
            KdfArg::Pbkdf2 => Kdf::PBKDF2,
        }
    }
}

#[derive(Args)]
struct WipeArgs {
    /// Disk to wipe: a block device or a regular file.
    #[arg(long)]
    disk: PathBuf,
    /// zero, zero-write, random, discard, crypto-erase, or passes:A,B (e.g. passes:random,zero).
    #[arg(long, value_parser = wipe::Method::parse)]
    method: wipe::Method,
    /// Read back every byte (full), a seeded sample of at least 10% of the 1 MiB blocks, or nothing.
    #[arg(long, value_enum, default_value_t = VerifyArg::Sample)]
    verify: VerifyArg,
    /// Where to write the signed report (JSON).
    #[arg(long)]
    report: PathBuf,
    /// Signing key made by `image keygen`.
    #[arg(long)]
    signing_key: PathBuf,
    /// Skip the safety checks (mounted, system root, holders, swap, pool).
    #[arg(long)]
    force: bool,
    /// Allowed targets (repeatable): directories for files, device paths or `/dev/prefix*` for devices.
    #[arg(long)]
    pool: Vec<PathBuf>,
    /// Who ordered the wipe [default: $SUDO_USER or $USER].
    #[arg(long)]
    operator: Option<String>,
    /// Continue an interrupted wipe from this byte offset (as the cancelled run reported it). A random pass
    /// continues with a new key; the bytes before the offset are then listed as unverified.
    #[arg(long, default_value_t = 0)]
    resume_from: u64,
    /// The pass (0-based) the offset belongs to; earlier passes are not repeated.
    #[arg(long, default_value_t = 0)]
    resume_pass: usize,
    /// Logical sector size of a regular file (block devices report their own).
    #[arg(long)]
    sector_size: Option<u32>,
}

#[derive(Clone, Copy, ValueEnum)]
enum VerifyArg {
    Full,
    Sample,
    None,
}

#[derive(Subcommand)]
enum BaseCommand {
    /// Each base: its id, images, size and the disks cloned from it.
    List(BasesArg),
    /// Delete a base; refused while a disk cloned from it still holds the clone.
    Delete {
        /// The base id, as `base list` shows it.
        id: String,
        #[command(flatten)]
        bases: BasesArg,
    },
}

#[derive(Args)]
struct BasesArg {
    /// The base store (as given to `provision --bases`).
    #[arg(long, env = "GRIDFORGE_BASES_DIR", default_value = "/var/lib/gridforge-agent/bases")]
    bases: PathBuf,
}

#[derive(Subcommand)]
enum ReportCommand {
    /// Check a wipe report's signature against a trusted key; exits 0 only for an intact, validly signed report.
    Verify {
        /// The report file.
        file: PathBuf,
        /// Trusted public key: base64, or a path to a .pub file.
        #[arg(long)]
        key: String,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Generate an ed25519 signing key; writes KEY (private, mode 0600) and KEY.pub, prints the public key.
    Keygen {
        /// Where to write the private key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Pack a root file system or a raw disk into a store, add it to the index and re-sign the index.
    Pack(PackArgs),
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").required(true))]
struct PackArgs {
    /// Root file system: a directory or a tar file.
    #[arg(long, group = "source")]
    rootfs: Option<PathBuf>,
    /// Raw disk image file (packed as independent zstd frames, decodable with plain `zstd -d`).
    #[arg(long, group = "source")]
    raw_disk: Option<PathBuf>,
    /// Image name, e.g. debian-12-minimal.
    #[arg(long)]
    name: String,
    /// Image version.
    #[arg(long)]
    version: String,
    /// Store directory (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// Signing key made by `image keygen`.
    #[arg(long)]
    key: PathBuf,
    /// os for a bootable base image, layer for an application layer overlaid on one.
    #[arg(long, value_enum, default_value_t = KindArg::Os)]
    kind: KindArg,
    /// zstd compression level.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Os,
    Layer,
}

#[derive(Args)]
struct ProvisionArgs {
    /// VM spec file (proto3 JSON of VmSpec; snake_case or camelCase field names).
    #[arg(long)]
    spec: PathBuf,
    /// Target: a block device or a regular file (created with the spec's disk size if missing).
    #[arg(long)]
    disk: PathBuf,
    #[command(flatten)]
    images: ImageArgs,
    /// Scratch directory for the staging tree.
    #[arg(long, env = "GRIDFORGE_WORK_DIR", default_value = "/var/tmp/gridforge")]
    work_dir: PathBuf,
    /// systemd-boot EFI binary for images that carry none [default: the host's, from systemd-boot-efi].
    #[arg(long)]
    efi_binary: Option<PathBuf>,
    /// How to make the disk when the spec names no provision_mode: unpack and write everything, or clone a
    /// prepared base disk of the image and layout (made on first use) and customize the clone.
    #[arg(long, value_enum, default_value_t = ModeArg::Full)]
    mode: ModeArg,
    /// How a cached provision clones the base onto a disk file whose file system cannot share extents
    /// (reflinks are used wherever it can): a raw copy of the base's allocated extents, or a qcow2 overlay
    /// on the base that holds only what the VM changes (qemu-img and qemu-storage-daemon needed).
    #[arg(long, value_enum, default_value_t = CloneArg::Copy)]
    clone_fallback: CloneArg,
    #[command(flatten)]
    bases: BasesArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum CloneArg {
    Copy,
    Overlay,
}

impl From<CloneArg> for provision::CloneFallback {
    fn from(c: CloneArg) -> Self {
        match c {
            CloneArg::Copy => Self::Copy,
            CloneArg::Overlay => Self::Overlay,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Full,
    Cached,
}

impl From<ModeArg> for gridforge_proto::v1::ProvisionMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Full => Self::ProvisionFull,
            ModeArg::Cached => Self::ProvisionCached,
        }
    }
}

#[derive(Args)]
struct ImageArgs {
    /// Image store: a directory, dir:///path or an http(s):// base URL.
    #[arg(long)]
    store: String,
    /// Public key the store's index must be signed with (base64, or a path to a .pub file).
    #[arg(long, required_unless_present = "insecure_images")]
    trusted_key: Option<String>,
    /// Accept an unsigned index (development only).
    #[arg(long)]
    insecure_images: bool,
    /// Content-addressed blob cache.
    #[arg(long, env = "GRIDFORGE_CACHE_DIR", default_value = "/var/cache/gridforge/images")]
    cache: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    /// Disk to read: a block device or a regular file.
    #[arg(long)]
    disk: PathBuf,
    /// Logical sector size of a regular file (block devices report their own).
    #[arg(long)]
    sector_size: Option<u32>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        // The daemon logs structured lines of its own, errors included.
        Command::Serve(args) => {
            return if serve::run(args).is_ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
        command => command,
    };
    // Engine log lines (e.g. "O_DIRECT refused; using buffered I/O") go to stderr; RUST_LOG adjusts the level.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    let out = Output::new(cli.json);
    match run(command, &out, cli.json) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, out: &Output, json: bool) -> Result<()> {
    match command {
        Command::Image(ImageCommand::Keygen { out: path }) => {
            let public = image::sign::keygen(&path)?;
            out.keygen(&path, &image::sign::encode_public(&public));
        }
        Command::Image(ImageCommand::Pack(args)) => pack(args, out)?,
        Command::Provision(args) => {
            let text = std::fs::read_to_string(&args.spec)
                .with_context(|| format!("reading spec {}", args.spec.display()))?;
            let spec: VmSpec = serde_json::from_str(&text)
                .with_context(|| format!("invalid spec {}", args.spec.display()))?;
            let trust = match (&args.images.trusted_key, args.images.insecure_images) {
                (Some(k), _) => Trust::Key(image::sign::parse_trusted_key(k)?),
                (None, true) => Trust::Insecure,
                (None, false) => bail!("--trusted-key is required (or --insecure-images for development)"),
            };
            let req = ProvisionRequest {
                spec,
                disk: args.disk,
                images: ImageSource { store: args.images.store, trust, cache_dir: args.images.cache },
                work_dir: args.work_dir,
                efi_binary: args.efi_binary,
                cancel: None,
                default_mode: args.mode.into(),
                bases_dir: args.bases.bases,
                clone_fallback: args.clone_fallback.into(),
            };
            let result = provision::provision(&req, &out.progress())?;
            out.provision_result(&result);
        }
        Command::Inspect(args) => {
            let opts = TargetOptions { sector_size: args.sector_size, read_only: true, ..Default::default() };
            let target = BlockTarget::open(&args.disk, &opts)?;
            let table = provision::describe(&target)?;
            out.inspect(&table);
        }
        Command::Wipe(args) => wipe_disk(args, out, json)?,
        Command::Report(ReportCommand::Verify { file, key }) => {
            let key = image::sign::parse_trusted_key(&key)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading report {}", file.display()))?;
            let report = wipe::report::verify(&text, &key)
                .with_context(|| format!("checking report {}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string(&report).expect("report serializes"));
            } else {
                println!("report {}: signature valid", file.display());
                print_wipe_summary(&report);
            }
        }
        Command::Luks(command) => luks(command, json)?,
        Command::Base(BaseCommand::List(args)) => {
            let bases = provision::BaseStore::new(&args.bases).list()?;
            out.bases(&bases);
        }
        Command::Base(BaseCommand::Delete { id, bases }) => {
            let info = provision::BaseStore::new(&bases.bases).delete(&id)?;
            out.base_deleted(&info.info);
        }
        Command::Diagnose(args) => diagnose::run(&args, json)?,
        Command::Serve(_) => unreachable!("serve is dispatched before logging is set up"),
        Command::Job(args) => job::run(args, json)?,
        Command::Pki(command) => pki::run(command, json)?,
    }
    Ok(())
}

fn read_passphrase(path: &std::path::Path) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading passphrase file {}", path.display()))?;
    Ok(zeroize::Zeroizing::new(bytes))
}

fn open_disk(path: &std::path::Path, write: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn print_result(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

fn luks(command: LuksCommand, json: bool) -> Result<()> {
    use serde_json::json;
    use std::io::{Seek, SeekFrom};
    match command {
        LuksCommand::Format(args) => {
            let v = &args.luks.volume;
            let mut dev = open_disk(&v.disk, true)?;
            let end = dev.seek(SeekFrom::End(0)).with_context(|| format!("sizing {}", v.disk.display()))?;
            let len = end.checked_sub(v.offset).context("--offset is past the end of the disk")?;
            let opts = FormatOptions {
                kdf: args.kdf.kdf(),
                sector_size: args.sector_size.parse().expect("clap allows only 512 or 4096"),
                label: args.label,
                uuid: args.uuid,
                ..Default::default()
            };
            let passphrase = read_passphrase(&args.luks.passphrase_file)?;
            let info = luks2::format(&dev, v.offset, len, &passphrase, &opts)
                .with_context(|| format!("formatting LUKS2 on {}", v.disk.display()))?;
            let text = format!(
                "formatted LUKS2 {} on {}: payload {} bytes at {}, {}-byte sectors",
                info.uuid,
                v.disk.display(),
                info.payload_len,
                info.payload_offset,
                info.sector_size
            );
            let value = serde_json::json!({
                "uuid": info.uuid, "label": info.label, "keyslot": info.keyslot,
                "payload_offset": info.payload_offset, "payload_len": info.payload_len,
                "sector_size": info.sector_size,
            });
            print_result(json, value, text);
        }
        LuksCommand::AddKey(args) => {
            let v = &args.luks.volume;
            let dev = open_disk(&v.disk, true)?;
            let existing = read_passphrase(&args.luks.passphrase_file)?;
            let new = read_passphrase(&args.new_passphrase_file)?;
            let slot = luks2::add_key(&dev, v.offset, &existing, &new, args.kdf.kdf())
                .with_context(|| format!("adding a key to {}", v.disk.display()))?;
            print_result(json, json!({ "keyslot": slot }), format!("added keyslot {slot}"));
        }
        LuksCommand::RemoveKey(args) => {
            let v = &args.volume;
            let dev = open_disk(&v.disk, true)?;
            let passphrase = read_passphrase(&args.passphrase_file)?;
            let slot = luks2::remove_key(&dev, v.offset, &passphrase)
                .with_context(|| format!("removing a key from {}", v.disk.display()))?;
            print_result(json, json!({ "removed_keyslot": slot }), format!("removed keyslot {slot}"));
        }
        LuksCommand::Dump(v) => {
            let dev = open_disk(&v.disk, false)?;
            let dump = luks2::dump(&dev, v.offset)
                .with_context(|| format!("reading LUKS2 on {}", v.disk.display()))?;
            let text = serde_json::to_string_pretty(&dump)?;
            print_result(json, serde_json::to_value(&dump)?, text);
        }
        LuksCommand::CheckPassphrase(args) => {
            let v = &args.volume;
            let dev = open_disk(&v.disk, false)?;
            let passphrase = read_passphrase(&args.passphrase_file)?;
            let slot = luks2::check_passphrase(&dev, v.offset, &passphrase)
                .with_context(|| format!("checking the passphrase of {}", v.disk.display()))?;
            print_result(json, json!({ "keyslot": slot }), format!("passphrase opens keyslot {slot}"));
        }
    }
    Ok(())
}

fn wipe_disk(args: WipeArgs, out: &Output, json: bool) -> Result<()> {
    // Load the key first: a wipe without a way to certify it should not start.
    let key = image::sign::load_signing_key(&args.signing_key)?;
    if args.pool.is_empty() && !args.force {
        eprintln!("warning: no wipe pool configured (--pool): any unmounted, unused target is allowed");
    }
    let req = wipe::WipeRequest {
        path: args.disk,
        method: args.method,
        verify: match args.verify {
            VerifyArg::Full => wipe::Verify::Full,
            VerifyArg::Sample => wipe::Verify::Sample { seed: None },
            VerifyArg::None => wipe::Verify::None,
        },
        policy: wipe::WipePolicy { pool: args.pool },
        force: args.force,
        resume: wipe::Resume { pass: args.resume_pass, offset: args.resume_from },
        operator: args.operator.unwrap_or_else(wipe::default_operator),
        file_sector_size: args.sector_size,
    };
    let cancel = wipe::CancelToken::new();
    cancel_on_interrupt(cancel.clone());
    let outcome = match wipe::wipe(&req, &out.progress(), &cancel) {
        Err(wipe::WipeError::Cancelled { pass, at }) => bail!(
            "wipe interrupted in pass {pass} at byte {at}; continue with --resume-pass {pass} --resume-from {at}"
        ),
        other => other?,
    };
    let mut report = outcome.report;
    wipe::report::sign(&mut report, &key);
    std::fs::write(&args.report, report.to_pretty_json() + "\n")
        .with_context(|| format!("writing report {}", args.report.display()))?;
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serializes"));
    } else {
        print_wipe_summary(&report);
        println!("report: {}", args.report.display());
    }
    if report.verification.result == "failed" {
        bail!("verification failed: {}", report.errors.join("; "));
    }
    Ok(())
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// SIGINT and SIGTERM stop a long job at its next safe point instead of killing it mid-write.
fn cancel_on_interrupt(token: wipe::CancelToken) {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_interrupt), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { sigaction(signal, &action) } {
            eprintln!("warning: cannot handle {signal}: {e}");
        }
    }
    std::thread::spawn(move || {
        while !INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        token.cancel();
    });
}

fn print_wipe_summary(r: &wipe::WipeReport) {
    let d = &r.device;
    println!(
        "device {} ({}, model {}, serial {}): {} bytes, {}-byte sectors",
        d.path, d.kind, d.model, d.serial, d.size_bytes, d.logical_sector_size
    );
    let s = &r.sanitization;
    println!("method {} -> NIST {} ({})", s.method, s.nist_level, s.standard);
    for p in &s.passes {
        println!(
            "  pass {}: {} [{}] via {}, {} bytes",
            p.number, p.method, p.pattern, p.mechanism, p.bytes_written
        );
    }
    let v = &r.verification;
    println!(
        "verification {}: {} ({} blocks, {} bytes checked{})",
        v.method,
        v.result,
        v.blocks_checked,
        v.bytes_checked,
        v.sample_seed.map(|s| format!(", sample seed {s}")).unwrap_or_default()
    );
    println!(
        "{} -> {} ({} ms), {} bytes written, operator {} on {}",
        r.started, r.finished, r.duration_ms, r.bytes_written, r.operator, r.node.hostname
    );
    for e in &r.errors {
        println!("error: {e}");
    }
}

fn pack(args: PackArgs, out: &Output) -> Result<()> {
    let key = image::sign::load_signing_key(&args.key)?;
    let kind = match args.kind {
        KindArg::Os => Kind::Os,
        KindArg::Layer => Kind::Layer,
    };
    let entry = match (&args.rootfs, &args.raw_disk) {
        (Some(src), None) => {
            let packed = image::pack::pack_rootfs(
                src,
                &args.store,
                &args.name,
                &args.version,
                kind,
                &key,
                args.level,
            )?;
            if !packed.left_out.is_empty() {
                // One line for them all: the guest makes its own at boot.
                eprintln!("left out {}", packed.left_out.describe());
            }
            packed.entry
        }
        (None, Some(src)) => {
            image::pack::pack_raw_disk_image(src, &args.store, &args.name, &args.version, &key, args.level)?
        }
        _ => unreachable!("clap requires exactly one source"),
    };
    out.packed(&entry);
    Ok(())
}
