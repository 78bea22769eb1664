//! The checks ops run on a node: each says OK, WARN or FAIL with a one-line reason. The daemon answers the
//! `Diagnostics` RPC with them and `gridforge-agent diagnose` prints them.

use std::path::Path;
use std::time::{Duration, SystemTime};

use gridforge_common::error_chain;
use gridforge_common::tls::TlsFiles;
use gridforge_proto::v1::{Check, DiagnosticsReport, Job, JobState, check::Status, job::Outcome};

use super::stats::{self, Space};
use super::{NodeContext, timestamp};
use crate::hypervisor::{DomainType, HypervisorError, PoolInfo};

/// A file system (pool, cache, state) with less free space than this fraction gets a warning...
const LOW_FREE_FRACTION: f64 = 0.10;
/// ...and so does one with less than this many bytes free.
const LOW_FREE_BYTES: u64 = 1 << 30;
/// Memory available below this fraction of the total gets a warning.
const LOW_MEMORY_FRACTION: f64 = 0.10;
/// A certificate expiring within this many days gets a warning.
const CERT_WARN_DAYS: i64 = 30;
/// Failed jobs this recent get a warning.
const FAILED_JOBS_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The 5-minute load average above this many times the core count gets a warning.
const OVERLOAD_FACTOR: f64 = 2.0;

/// Where the jobs check gets the job list from.
#[derive(Debug)]
pub enum JobList<'a> {
    /// The list the running engine (or the journal) holds.
    Known(&'a [Job]),
    /// The list could not be read; the reason says why and what to do.
    Unknown(String),
}

/// Every check, in a fixed order, the hypervisor kind and the images the node's store lists; `leader_term` is
/// the highest coordinator leader term the job engine has taken requests from.
pub fn report(ctx: &NodeContext, jobs: JobList<'_>, leader_term: u64) -> DiagnosticsReport {
    let libvirt = LibvirtFacts::gather(ctx);
    let (store_check, listing) = image_store_check(&ctx.config.images, &ctx.config.cache_dir);
    let checks = vec![
        check(
            "agent",
            Status::Ok,
            format!("gridforge-agent {} on {}", env!("CARGO_PKG_VERSION"), ctx.config.node_name),
        ),
        libvirt.connection_check(),
        libvirt.hypervisor_check(),
        libvirt.kvm_check(ctx),
        cpu_check(),
        memory_check(),
        block_devices_check(&ctx.config.jobs.devices),
        libvirt.pool_check(),
        image_cache_check(&ctx.config.cache_dir),
        store_check,
        tls_check(&ctx.config.tls),
        clock_check(),
        state_dir_check(&ctx.config.state_dir),
        jobs_check(jobs, leader_term, SystemTime::now()),
    ];
    DiagnosticsReport {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        node: ctx.config.node_name.clone(),
        time: Some(timestamp(SystemTime::now())),
        hypervisor_kind: libvirt.kind().map(|k| k.as_str().to_string()).unwrap_or_default(),
        checks,
        arch: std::env::consts::ARCH.to_string(),
        images: listing.images,
        cached_images: listing.cached,
        live_migration: ctx.config.libvirt.live_endpoint().is_some() && libvirt.kind().is_some(),
        leader_term,
        bases: bases(&ctx.config.images.bases_dir),
    }
}

/// The base disks of cached provisions, each with the disks cloned from it (none where the store cannot be
/// read; the reason is logged).
fn bases(dir: &std::path::Path) -> Vec<gridforge_proto::v1::BaseDisk> {
    match crate::provision::BaseStore::new(dir).list() {
        Ok(bases) => bases.iter().map(|b| b.to_proto()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing the base store {}", dir.display());
            Vec::new()
        }
    }
}

fn check(name: &str, status: Status, reason: impl Into<String>) -> Check {
    Check { name: name.to_string(), status: status as i32, reason: reason.into() }
}

/// Bytes for people: "1.5 GiB".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Whether `free` of `total` is low enough to warn about.
fn space_is_low(s: Space) -> bool {
    (s.free as f64) < s.total as f64 * LOW_FREE_FRACTION || s.free < LOW_FREE_BYTES
}

fn space_text(s: Space) -> String {
    format!("{} free of {}", human(s.free), human(s.total))
}

/// What libvirt answered, asked once for all the checks that need it.
enum LibvirtFacts {
    /// No URI configured: a disk-only node.
    Disabled,
    /// A URI is configured but the agent was started without a hypervisor.
    NotOpened { uri: String },
    /// The connection failed; nothing else was asked.
    Unreachable { uri: String, error: HypervisorError },
    Connected {
        uri: String,
        version: String,
        kind: Result<DomainType, HypervisorError>,
        pool: Result<PoolInfo, HypervisorError>,
    },
}

impl LibvirtFacts {
    fn gather(ctx: &NodeContext) -> LibvirtFacts {
        let Some(hv) = &ctx.hypervisor else {
            let uri = ctx.config.libvirt.uri.clone();
            return if uri.is_empty() { LibvirtFacts::Disabled } else { LibvirtFacts::NotOpened { uri } };
        };
        match hv.version() {
            Ok(version) => {
                LibvirtFacts::Connected { uri: hv.uri(), version, kind: hv.ping(), pool: hv.pool() }
            }
            Err(error) => LibvirtFacts::Unreachable { uri: hv.uri(), error },
        }
    }

    fn kind(&self) -> Option<DomainType> {
        match self {
            LibvirtFacts::Connected { kind: Ok(kind), .. } => Some(*kind),
            _ => None,
        }
    }

    fn connection_check(&self) -> Check {
        match self {
            LibvirtFacts::Disabled => check("libvirt", Status::Ok, "disabled (disk-only node)"),
            LibvirtFacts::NotOpened { uri } => check(
                "libvirt",
                Status::Fail,
                format!("{uri} is configured but the agent runs without a hypervisor"),
            ),
            LibvirtFacts::Connected { uri, version, .. } => {
                check("libvirt", Status::Ok, format!("connected to {uri} ({version})"))
            }
            LibvirtFacts::Unreachable { uri, error: HypervisorError::Unavailable { reason, .. } } => {
                check("libvirt", Status::Fail, format!("cannot reach {uri}: {reason}"))
            }
            LibvirtFacts::Unreachable { uri, error } => {
                check("libvirt", Status::Fail, format!("{uri}: {error}"))
            }
        }
    }

    fn hypervisor_check(&self) -> Check {
        match self {
            LibvirtFacts::Disabled => check("hypervisor", Status::Ok, "none (disk-only node)"),
            LibvirtFacts::NotOpened { .. } | LibvirtFacts::Unreachable { .. } => {
                check("hypervisor", Status::Warn, "unknown while libvirt is unreachable")
            }
            LibvirtFacts::Connected { kind: Ok(DomainType::Kvm), .. } => {
                check("hypervisor", Status::Ok, "kvm: guests run on hardware virtualization")
            }
            LibvirtFacts::Connected { kind: Ok(DomainType::Qemu), .. } => {
                check("hypervisor", Status::Ok, "qemu: guests run under TCG emulation")
            }
            LibvirtFacts::Connected { kind: Err(e), .. } => check("hypervisor", Status::Fail, error_chain(e)),
        }
    }

    fn kvm_check(&self, ctx: &NodeContext) -> Check {
        const TCG: &str = "guests run under TCG emulation (slow)";
        let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
        match (self, self.kind(), dev) {
            (LibvirtFacts::Disabled, _, Ok(_)) => {
                check("kvm", Status::Ok, "/dev/kvm opens (not used: disk-only node)")
            }
            (LibvirtFacts::Disabled, _, Err(e)) => {
                check("kvm", Status::Ok, format!("not needed (disk-only node); /dev/kvm: {e}"))
            }
            (_, _, Err(e)) => check("kvm", Status::Warn, format!("cannot open /dev/kvm ({e}): {TCG}")),
            (_, Some(DomainType::Kvm), Ok(_)) => {
                check("kvm", Status::Ok, "/dev/kvm opens and KVM guests run")
            }
            (_, Some(DomainType::Qemu), Ok(_)) if ctx.config.libvirt.domain_type == "qemu" => check(
                "kvm",
                Status::Warn,
                format!("/dev/kvm opens but libvirt.domain_type = \"qemu\": {TCG}"),
            ),
            (_, Some(DomainType::Qemu), Ok(_)) => {
                let why = crate::hypervisor::kvm_probe_failure().unwrap_or("a KVM guest does not run here");
                check("kvm", Status::Warn, format!("/dev/kvm opens but {why}: {TCG}"))
            }
            (_, None, Ok(_)) => check("kvm", Status::Ok, "/dev/kvm opens"),
        }
    }

    fn pool_check(&self) -> Check {
        let pool = match self {
            LibvirtFacts::Disabled => return check("pool", Status::Ok, "none (disk-only node)"),
            LibvirtFacts::NotOpened { .. } | LibvirtFacts::Unreachable { .. } => {
                return check("pool", Status::Warn, "not checked: libvirt is unreachable");
            }
            LibvirtFacts::Connected { pool: Err(e), .. } => {
                return check("pool", Status::Fail, error_chain(&e));
            }
            LibvirtFacts::Connected { pool: Ok(pool), .. } => pool,
        };
        let s = Space { total: pool.capacity_bytes, free: pool.available_bytes };
        let text = format!("{} at {}: {}", pool.name, pool.path.display(), space_text(s));
        if space_is_low(s) {
            check("pool", Status::Warn, format!("{text} (low)"))
        } else {
            check("pool", Status::Ok, text)
        }
    }
}

fn cpu_check() -> Check {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or("unknown model");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let loads: Vec<f64> = load.split_whitespace().take(3).filter_map(|v| v.parse().ok()).collect();
    if cores == 0 || loads.len() < 3 {
        return check("cpu", Status::Warn, "cannot read /proc/cpuinfo or /proc/loadavg");
    }
    let text = format!("{cores} cores, {model}, load {:.2} {:.2} {:.2}", loads[0], loads[1], loads[2]);
    if loads[1] > cores as f64 * OVERLOAD_FACTOR {
        check("cpu", Status::Warn, format!("{text} (overloaded)"))
    } else {
        check("cpu", Status::Ok, text)
    }
}

fn memory_check() -> Check {
    let m = match stats::read_meminfo() {
        Ok(m) if m.total > 0 => m,
        Ok(_) => return check("memory", Status::Warn, "/proc/meminfo has no MemTotal"),
        Err(e) => return check("memory", Status::Warn, format!("cannot read /proc/meminfo: {e}")),
    };
    let fraction = m.available as f64 / m.total as f64;
    let text = format!("{} available of {} ({:.0}%)", human(m.available), human(m.total), fraction * 100.0);
    if fraction < LOW_MEMORY_FRACTION {
        check("memory", Status::Warn, format!("{text} (low)"))
    } else {
        check("memory", Status::Ok, text)
    }
}

/// Each configured device must be a block device, a file, or a directory of files.
fn block_devices_check(devices: &[std::path::PathBuf]) -> Check {
    use std::os::unix::fs::FileTypeExt;
    if devices.is_empty() {
        return check("block-devices", Status::Ok, "none configured (jobs use pool volumes only)");
    }
    let mut parts = Vec::new();
    let mut failed = false;
    for path in devices {
        let shown = path.display();
        let part = match std::fs::metadata(path) {
            Err(e) => {
                failed = true;
                format!("{shown}: {e}")
            }
            Ok(m) if m.file_type().is_block_device() => match block_device_size(&m) {
                Ok(size) => format!("{shown} {}", human(size)),
                Err(e) => {
                    failed = true;
                    format!("{shown}: {e}")
                }
            },
            Ok(m) if m.is_file() => format!("{shown} file {}", human(m.len())),
            Ok(m) if m.is_dir() => {
                let files = std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0);
                format!("{shown} directory ({files} entries)")
            }
            Ok(_) => {
                failed = true;
                format!("{shown}: not a block device, file or directory")
            }
        };
        parts.push(part);
    }
    check("block-devices", if failed { Status::Fail } else { Status::Ok }, parts.join("; "))
}

/// A block device's size from sysfs, which needs no access to the device itself.
fn block_device_size(meta: &std::fs::Metadata) -> Result<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let (major, minor) = (nix::sys::stat::major(meta.rdev()), nix::sys::stat::minor(meta.rdev()));
    let path = format!("/sys/dev/block/{major}:{minor}/size");
    let sectors = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // sysfs counts 512-byte units whatever the logical sector size.
    sectors.trim().parse::<u64>().map(|s| s * 512).map_err(|e| format!("{path}: {e}"))
}

/// Bytes of the regular files under `dir` (not following symlinks).
fn dir_size(dir: &Path) -> std::io::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        if ty.is_dir() {
            let (b, f) = dir_size(&entry.path())?;
            bytes += b;
            files += f;
        } else if ty.is_file() {
            bytes += entry.metadata()?.len();
            files += 1;
        }
    }
    Ok((bytes, files))
}

fn image_cache_check(cache: &Path) -> Check {
    if !cache.exists() {
        return check("image-cache", Status::Ok, format!("{} is empty (not created yet)", cache.display()));
    }
    let (bytes, files) = match dir_size(cache) {
        Ok(v) => v,
        Err(e) => return check("image-cache", Status::Fail, format!("cannot read {}: {e}", cache.display())),
    };
    let used = format!("{} holds {} in {files} files", cache.display(), human(bytes));
    match stats::space(cache) {
        Ok(s) if space_is_low(s) => {
            check("image-cache", Status::Warn, format!("{used}; {} (low)", space_text(s)))
        }
        Ok(s) => check("image-cache", Status::Ok, format!("{used}; {}", space_text(s))),
        Err(e) => check("image-cache", Status::Warn, format!("{used}; free space unknown: {e}")),
    }
}

/// How long a read of the store's index serves the checks after it (a coordinator asks every few seconds).
const INDEX_TTL: Duration = Duration::from_secs(30);

/// The images a store lists ("name:version") with the sha256 of each blob, or why it cannot be read.
type IndexListing = Result<Vec<(String, String)>, String>;

/// What the image-store check found: every image the store lists, and those whose blob is in the cache.
#[derive(Default)]
struct StoreListing {
    images: Vec<String>,
    cached: Vec<String>,
}

/// The store's index, read and verified at most once per [`INDEX_TTL`] for each store location.
fn store_index(images: &crate::config::ImagesConfig) -> IndexListing {
    type Reads = std::collections::HashMap<String, (std::time::Instant, IndexListing)>;
    static READS: std::sync::Mutex<Option<Reads>> = std::sync::Mutex::new(None);
    let key = format!("{}\n{}\n{}", images.store, images.trusted_key, images.insecure_images);
    let mut reads = READS.lock().unwrap_or_else(|p| p.into_inner());
    let reads = reads.get_or_insert_with(Reads::new);
    if let Some((at, listing)) = reads.get(&key)
        && at.elapsed() < INDEX_TTL
    {
        return listing.clone();
    }
    let listing = images.trust().map_err(|e| error_chain(&e)).and_then(|trust| {
        let store = crate::image::Store::open(&images.store, trust).map_err(|e| error_chain(&e))?;
        Ok(store
            .index()
            .images
            .iter()
            .map(|e| (format!("{}:{}", e.name, e.version), e.sha256.clone()))
            .collect())
    });
    reads.insert(key, (std::time::Instant::now(), listing.clone()));
    listing
}

fn image_store_check(images: &crate::config::ImagesConfig, cache: &Path) -> (Check, StoreListing) {
    if images.store.is_empty() {
        let c = check(
            "image-store",
            Status::Ok,
            "none configured (images.store): provisions from images are refused",
        );
        return (c, StoreListing::default());
    }
    let index = match store_index(images) {
        Ok(index) => index,
        Err(e) => {
            return (
                check("image-store", Status::Fail, format!("{}: {e}", images.store)),
                StoreListing::default(),
            );
        }
    };
    let mut listing = StoreListing::default();
    for (image, sha256) in index {
        if crate::image::is_sha256_hex(&sha256) && crate::image::cache::blob_path_in(cache, &sha256).is_file()
        {
            listing.cached.push(image.clone());
        }
        listing.images.push(image);
    }
    let signed =
        if images.trusted_key.is_empty() { "unsigned index accepted" } else { "signed index verified" };
    let reason = format!(
        "{} lists {} images ({signed}), {} of them cached",
        images.store,
        listing.images.len(),
        listing.cached.len()
    );
    (check("image-store", Status::Ok, reason), listing)
}

fn tls_check(tls: &TlsFiles) -> Check {
    if tls.insecure {
        return check("tls", Status::Warn, "plaintext gRPC (insecure = true)");
    }
    for (what, path) in [("key", &tls.key), ("CA", &tls.ca)] {
        if let Err(e) = std::fs::File::open(path) {
            return check("tls", Status::Fail, format!("cannot read the {what} {}: {e}", path.display()));
        }
    }
    let pem = match std::fs::read(&tls.cert) {
        Ok(p) => p,
        Err(e) => return check("tls", Status::Fail, format!("cannot read {}: {e}", tls.cert.display())),
    };
    let (subject, not_after) = match x509_parser::pem::parse_x509_pem(&pem) {
        Ok((_, pem)) => match pem.parse_x509() {
            Ok(cert) => (cert.subject().to_string(), cert.validity().not_after),
            Err(e) => {
                return check("tls", Status::Fail, format!("{}: not a certificate: {e}", tls.cert.display()));
            }
        },
        Err(e) => return check("tls", Status::Fail, format!("{}: not PEM: {e}", tls.cert.display())),
    };
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let seconds_left = not_after.timestamp() - now;
    let days = seconds_left.abs() / 86_400;
    let expiry = not_after.to_rfc2822().unwrap_or_else(|_| not_after.to_string());
    if seconds_left <= 0 {
        check("tls", Status::Fail, format!("certificate {subject} expired {days} days ago ({expiry})"))
    } else if days < CERT_WARN_DAYS {
        check("tls", Status::Warn, format!("certificate {subject} expires in {days} days ({expiry})"))
    } else {
        check("tls", Status::Ok, format!("certificate {subject} valid for {days} more days ({expiry})"))
    }
}

/// The kernel's NTP view of the system clock, as adjtimex reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ClockState {
    synchronized: bool,
    est_error_us: i64,
    max_error_us: i64,
}

/// systemd-timesyncd creates this once it has synchronized the clock.
const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

fn read_clock_state() -> std::io::Result<ClockState> {
    // SAFETY: `timex` is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: with `modes` 0 adjtimex only reads the kernel's clock state into `tx`, a live, exclusively
    // borrowed struct of the type it expects.
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ClockState {
        synchronized: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        est_error_us: tx.esterror,
        max_error_us: tx.maxerror,
    })
}

fn clock_check() -> Check {
    clock_verdict(read_clock_state(), Path::new(TIMESYNC_FLAG).exists())
}

/// The kernel's state decides; where it cannot be read (a service whose system call filter denies `@clock`,
/// as `ProtectClock=` does, cannot call adjtimex at all) systemd-timesyncd's flag file stands in.
fn clock_verdict(state: std::io::Result<ClockState>, timesync_flag: bool) -> Check {
    match state {
        Ok(s) if s.synchronized => check(
            "clock",
            Status::Ok,
            format!("synchronized (estimated error {} µs, max {} µs)", s.est_error_us, s.max_error_us),
        ),
        Ok(_) => check("clock", Status::Warn, "not synchronized (no NTP service has set the clock)"),
        Err(_) if timesync_flag => check("clock", Status::Ok, "synchronized (systemd-timesyncd)"),
        Err(e) => check(
            "clock",
            Status::Warn,
            format!(
                "unknown: cannot read the kernel clock state ({e}); `gridforge-agent diagnose` run as root \
                 reads it"
            ),
        ),
    }
}

fn state_dir_check(dir: &Path) -> Check {
    if !dir.exists() {
        return check(
            "state-dir",
            Status::Warn,
            format!("{} does not exist yet (the agent creates it when it starts)", dir.display()),
        );
    }
    if let Err(e) = tempfile::Builder::new().prefix(".diagnose-").tempfile_in(dir) {
        return check("state-dir", Status::Fail, format!("{} is not writable: {e}", dir.display()));
    }
    match stats::space(dir) {
        Ok(s) if space_is_low(s) => {
            check("state-dir", Status::Warn, format!("{} writable, {} (low)", dir.display(), space_text(s)))
        }
        Ok(s) => check("state-dir", Status::Ok, format!("{} writable, {}", dir.display(), space_text(s))),
        Err(e) => {
            check("state-dir", Status::Warn, format!("{} writable; free space unknown: {e}", dir.display()))
        }
    }
}

fn seconds(t: &Option<pbjson_types::Timestamp>) -> Option<i64> {
    t.as_ref().map(|t| t.seconds)
}

fn jobs_check(jobs: JobList<'_>, leader_term: u64, now: SystemTime) -> Check {
    let jobs = match jobs {
        JobList::Known(jobs) => jobs,
        JobList::Unknown(reason) => return check("jobs", Status::Warn, reason),
    };
    let count = |state: JobState| jobs.iter().filter(|j| j.state() == state).count();
    let (running, queued) = (count(JobState::Running), count(JobState::Queued));
    let since = now.checked_sub(FAILED_JOBS_WINDOW).unwrap_or(SystemTime::UNIX_EPOCH);
    let since = since.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let failed: Vec<&Job> = jobs
        .iter()
        .filter(|j| matches!(j.state(), JobState::Failed | JobState::Interrupted))
        .filter(|j| seconds(&j.finished).or(seconds(&j.created)).is_some_and(|t| t >= since))
        .collect();
    let mut text = format!("{running} running, {queued} queued");
    // Only coordinators with leader election send a term; without one there is nothing to say.
    if leader_term > 0 {
        text.push_str(&format!(", coordinator leader term {leader_term}"));
    }
    let Some(last) = failed.iter().max_by_key(|j| seconds(&j.finished)).copied() else {
        return check("jobs", Status::Ok, format!("{text}, none failed in the last 24 h"));
    };
    let interrupted = failed.iter().filter(|j| j.state() == JobState::Interrupted).count();
    let message = match &last.outcome {
        Some(Outcome::Error(e)) if !e.step.is_empty() => format!("{}: {}", e.step, e.message),
        Some(Outcome::Error(e)) => e.message.clone(),
        _ => "no error recorded".to_string(),
    };
    let kind = last.kind().as_str_name().to_lowercase();
    let on = if last.target.is_empty() { &last.domain } else { &last.target };
    check(
        "jobs",
        Status::Warn,
        format!(
            "{text}, {} failed and {interrupted} interrupted in the last 24 h; last: {kind} job {} on {on} {}: \
             {message}",
            failed.len() - interrupted,
            last.id,
            last.state().as_str_name().to_lowercase(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_state_decides_and_the_timesyncd_flag_stands_in_when_it_cannot_be_read() {
        let synced = ClockState { synchronized: true, est_error_us: 12, max_error_us: 340 };
        let c = clock_verdict(Ok(synced), false);
        assert_eq!(
            (c.status(), c.reason.as_str()),
            (Status::Ok, "synchronized (estimated error 12 µs, max 340 µs)")
        );
        let unsynced = ClockState { synchronized: false, ..synced };
        assert_eq!(clock_verdict(Ok(unsynced), true).status(), Status::Warn, "the kernel's answer wins");
        let denied = || Err(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(clock_verdict(denied(), true).status(), Status::Ok);
        let c = clock_verdict(denied(), false);
        assert_eq!(c.status(), Status::Warn);
        assert!(
            c.reason.starts_with("unknown: cannot read the kernel clock state (Operation not permitted"),
            "{c:?}"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn low_space_is_a_fraction_or_an_absolute_floor() {
        assert!(!space_is_low(Space { total: 100 << 30, free: 20 << 30 }));
        assert!(space_is_low(Space { total: 100 << 30, free: 5 << 30 }));
        assert!(space_is_low(Space { total: 2 << 30, free: 512 << 20 }));
    }
}
