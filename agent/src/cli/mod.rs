//! Command-line adapter over the agent engine.

mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use gridforge_agent::block::{BlockTarget, TargetOptions};
use gridforge_agent::image::{self, Trust, index::Kind};
use gridforge_agent::provision::{self, ImageSource, ProvisionRequest};
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
    let out = Output::new(cli.json);
    match run(cli.command, &out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            out.error(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, out: &Output) -> Result<()> {
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
    }
    Ok(())
}

fn pack(args: PackArgs, out: &Output) -> Result<()> {
    let key = image::sign::load_signing_key(&args.key)?;
    let kind = match args.kind {
        KindArg::Os => Kind::Os,
        KindArg::Layer => Kind::Layer,
    };
    let entry = match (&args.rootfs, &args.raw_disk) {
        (Some(src), None) => {
            image::pack::pack_rootfs(src, &args.store, &args.name, &args.version, kind, &key, args.level)?
        }
        (None, Some(src)) => {
            image::pack::pack_raw_disk_image(src, &args.store, &args.name, &args.version, &key, args.level)?
        }
        _ => unreachable!("clap requires exactly one source"),
    };
    out.packed(&entry);
    Ok(())
}
