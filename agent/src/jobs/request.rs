//! Submission checks: every request is validated and its target resolved before it is queued, so a bad
//! request fails at once with the field named, and two jobs never hold one disk or domain.

use std::path::{Component, Path, PathBuf};

use gridforge_common::error_chain;
use gridforge_proto::v1::{
    DiskTarget, JobKind, Machine, MigrateReceiveJob, MigrateSendJob, SubmitJobRequest, VmSpec,
    control_job::Action, disk_target, submit_job_request::Job as JobReq,
};
use zeroize::Zeroize;

use super::SubmitError;
use crate::block::MIB;
use crate::hypervisor::{DomainState, Hypervisor, HypervisorError, NicDef};
use crate::wipe;

/// A resolved disk target.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    /// A pool volume; `exists` is false when a Provision is to create it.
    Volume { name: String, path: PathBuf, exists: bool },
    /// A block device or file allowed by `jobs.devices`.
    Device(PathBuf),
}

impl Target {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Target::Volume { path, .. } | Target::Device(path) => path,
        }
    }

    pub(crate) fn volume_name(&self) -> Option<&str> {
        match self {
            Target::Volume { name, .. } => Some(name),
            Target::Device(_) => None,
        }
    }
}

/// What a job does, fully resolved. Holds the request's secrets (in a Provision spec) until dropped.
pub(crate) enum Work {
    Provision { spec: Box<VmSpec>, target: Target, domain: Option<DomainPlan> },
    Wipe { target: Target, method: wipe::Method, verify: wipe::Verify, operator: String },
    Control { domain: String, action: Action, grace_seconds: u32, vcpus: u32, memory_mib: u64 },
    Delete { domain: String, target: Target, method: wipe::Method, operator: String },
    Resize { target: Target, size_bytes: u64 },
    Snapshot { target: Target, name: String, version: String, notes: String },
    MigrateSend(Box<MigrateSend>),
    MigrateReceive(Box<MigrateReceive>),
    DeleteBase { id: String },
}

/// The source side of a cold migration.
#[derive(Clone, Debug)]
pub(crate) struct MigrateSend {
    pub domain: String,
    pub target: Target,
    pub transfer_id: String,
    pub receiver_address: String,
    pub receiver: String,
    pub method: wipe::Method,
    pub operator: String,
    /// Live: libvirt moves the running domain; else the shut-off disk is streamed.
    pub live: bool,
}

/// The destination side of a migration.
#[derive(Clone, Debug)]
pub(crate) struct MigrateReceive {
    pub transfer_id: String,
    pub sender: String,
    pub target: Target,
    pub size_bytes: u64,
    pub domain: Option<DomainPlan>,
    pub timeout: std::time::Duration,
    /// Live: the domain (named `name`) arrives by libvirt's migration; `domain` is None.
    pub live: Option<String>,
}

impl Drop for Work {
    fn drop(&mut self) {
        if let Work::Provision { spec, .. } = self {
            scrub_spec(spec);
        }
    }
}

/// The domain a Provision defines (its disk is the provisioned target).
#[derive(Clone, Debug)]
pub(crate) struct DomainPlan {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<NicDef>,
    pub start: bool,
}

pub(crate) struct Prepared {
    pub kind: JobKind,
    pub target: Option<PathBuf>,
    pub domain: Option<String>,
    /// A further name the job holds while unfinished (a migration's "transfer <id>").
    pub hold: Option<String>,
    pub work: Work,
}

impl Prepared {
    /// Whether the job takes one of the `max_io_jobs` slots.
    pub(crate) fn is_io(&self) -> bool {
        self.kind != JobKind::Control
    }
}

/// Settings submissions are checked against.
pub(crate) struct Checks<'a> {
    pub hypervisor: Option<&'a dyn Hypervisor>,
    pub devices: &'a [PathBuf],
    pub image_store_configured: bool,
    pub default_wipe_method: &'a str,
    /// `images.snapshot_store` and `images.snapshot_signing_key` (empty: not configured).
    pub snapshot_store: &'a Path,
    pub snapshot_signing_key: &'a Path,
    /// Whether the agent has mutual TLS (migrations need it to authenticate the peer agent).
    pub mutual_tls: bool,
    /// Whether the node takes and sends live migrations (`libvirt.peer_uri` set, a real hypervisor).
    pub live_migration: bool,
    /// The base store (`images.bases_dir`), whose records say which disks are qcow2 overlays.
    pub bases_dir: &'a Path,
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> SubmitError {
    SubmitError::Invalid { field: field.into(), reason: reason.into() }
}

/// Check the idempotency key: 1-128 printable ASCII characters.
pub(crate) fn check_key(key: &str) -> Result<(), SubmitError> {
    if key.is_empty() {
        return Err(invalid("idempotency_key", "required (1-128 printable ASCII characters)"));
    }
    if key.len() > 128 || !key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid("idempotency_key", "must be 1-128 printable ASCII characters"));
    }
    Ok(())
}

pub(crate) fn prepare(
    req: &SubmitJobRequest,
    client: &str,
    checks: &Checks<'_>,
) -> Result<Prepared, SubmitError> {
    let job = req.job.as_ref().ok_or_else(|| {
        invalid(
            "job",
            "required: one of provision, wipe, control, resize, snapshot, delete, migrate_send, migrate_receive, \
             delete_base",
        )
    })?;
    match job {
        JobReq::Provision(p) => {
            let spec = p.spec.as_ref().ok_or_else(|| invalid("provision.spec", "required"))?;
            validate_spec(spec)?;
            if !checks.image_store_configured {
                return Err(SubmitError::Precondition(
                    "provision: this agent has no image store configured (images.store)".into(),
                ));
            }
            let default_target =
                DiskTarget { target: Some(disk_target::Target::Volume(format!("{}.raw", spec.name))) };
            let target = resolve_target(
                Some(p.target.as_ref().unwrap_or(&default_target)),
                "provision.target",
                true,
                checks,
            )?;
            let size_mib = spec.disk.as_ref().map_or(0, |d| d.size_mib);
            if let Target::Volume { exists: false, .. } = &target
                && size_mib == 0
            {
                return Err(invalid("provision.spec.disk.size_mib", "required for a new volume"));
            }
            let domain = match &spec.machine {
                Some(machine) => {
                    hypervisor(checks, "provision.spec.machine")?;
                    Some(domain_plan(&spec.name, machine, "provision.spec.machine")?)
                }
                None => None,
            };
            Ok(Prepared {
                kind: JobKind::Provision,
                target: Some(target.path().to_path_buf()),
                domain: domain.as_ref().map(|d| d.name.clone()),
                hold: None,
                work: Work::Provision { spec: Box::new(spec.clone()), target, domain },
            })
        }
        JobReq::Wipe(w) => {
            let target = resolve_target(w.target.as_ref(), "wipe.target", false, checks)?;
            let method = parse_method(&w.method, "wipe.method", checks)?;
            let verify = match w.verify.as_str() {
                "" | "sample" => wipe::Verify::Sample { seed: None },
                "full" => wipe::Verify::Full,
                "none" => wipe::Verify::None,
                other => {
                    return Err(invalid("wipe.verify", format!("{other:?} is not none, sample or full")));
                }
            };
            let operator = if w.operator.is_empty() { client.to_string() } else { w.operator.clone() };
            Ok(Prepared {
                kind: JobKind::Wipe,
                target: Some(target.path().to_path_buf()),
                domain: None,
                hold: None,
                work: Work::Wipe { target, method, verify, operator },
            })
        }
        JobReq::Control(c) => {
            check_domain_name(&c.domain, "control.domain")?;
            let action =
                Action::try_from(c.action).ok().filter(|a| *a != Action::Unspecified).ok_or_else(|| {
                    invalid(
                        "control.action",
                        "required: START, STOP, REBOOT, SUSPEND, RESUME, DESTROY or SET_RESOURCES",
                    )
                })?;
            if action == Action::SetResources && c.vcpus == 0 && c.memory_mib == 0 {
                return Err(invalid("control.vcpus", "SET_RESOURCES needs vcpus or memory_mib"));
            }
            hypervisor(checks, "control")?;
            Ok(Prepared {
                kind: JobKind::Control,
                target: None,
                domain: Some(c.domain.clone()),
                hold: None,
                work: Work::Control {
                    domain: c.domain.clone(),
                    action,
                    grace_seconds: c.grace_seconds,
                    vcpus: c.vcpus,
                    memory_mib: c.memory_mib,
                },
            })
        }
        JobReq::Delete(d) => {
            check_domain_name(&d.domain, "delete.domain")?;
            let hv = hypervisor(checks, "delete")?;
            let method = parse_method(&d.wipe_method, "delete.wipe_method", checks)?;
            let target = match &d.target {
                Some(t) => resolve_target(Some(t), "delete.target", false, checks)?,
                None => domain_disk(hv, &d.domain, "delete.domain")?,
            };
            Ok(Prepared {
                kind: JobKind::Delete,
                target: Some(target.path().to_path_buf()),
                domain: Some(d.domain.clone()),
                hold: None,
                work: Work::Delete { domain: d.domain.clone(), target, method, operator: client.to_string() },
            })
        }
        JobReq::MigrateSend(m) => prepare_migrate_send(m, client, checks),
        JobReq::MigrateReceive(m) => prepare_migrate_receive(m, checks),
        JobReq::DeleteBase(d) => {
            let field = "delete_base.base_id";
            let id = &d.base_id;
            if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return Err(invalid(field, format!("{id:?} is not a base id (32 lowercase hex digits)")));
            }
            let bases = crate::provision::BaseStore::new(checks.bases_dir);
            let known = bases.list().map_err(|e| SubmitError::NotFound(format!("{field}: {e}")))?;
            if !known.iter().any(|b| &b.info.id == id) {
                return Err(SubmitError::NotFound(format!(
                    "{field}: no base {id} in {} on this agent",
                    checks.bases_dir.display()
                )));
            }
            Ok(Prepared {
                kind: JobKind::DeleteBase,
                target: Some(checks.bases_dir.join(id)),
                domain: None,
                hold: None,
                work: Work::DeleteBase { id: id.clone() },
            })
        }
        JobReq::Resize(r) => {
            let target = resolve_target(r.target.as_ref(), "resize.target", false, checks)?;
            let size_bytes = resize_size(r.size_mib, target.path(), checks.bases_dir)?;
            check_not_in_use(checks, target.path(), "resize")?;
            Ok(Prepared {
                kind: JobKind::Resize,
                target: Some(target.path().to_path_buf()),
                domain: None,
                hold: None,
                work: Work::Resize { target, size_bytes },
            })
        }
        JobReq::Snapshot(s) => {
            for (field, text) in
                [("snapshot.image_name", &s.image_name), ("snapshot.image_version", &s.image_version)]
            {
                if let Some(reason) = crate::image::snapshot::label_problem(text) {
                    return Err(invalid(field, reason));
                }
            }
            if checks.snapshot_store.as_os_str().is_empty() {
                return Err(SubmitError::Precondition(
                    "snapshot: this agent has no snapshot store configured (images.snapshot_store)".into(),
                ));
            }
            if checks.snapshot_signing_key.as_os_str().is_empty() {
                return Err(SubmitError::Precondition(
                    "snapshot: this agent has no key to sign the snapshot store with (images.snapshot_signing_key)"
                        .into(),
                ));
            }
            let target = resolve_target(s.target.as_ref(), "snapshot.target", false, checks)?;
            if snapshot_exists(checks.snapshot_store, &s.image_name, &s.image_version) {
                return Err(invalid(
                    "snapshot.image_version",
                    format!(
                        "{} {} already exists in the snapshot store {}",
                        s.image_name,
                        s.image_version,
                        checks.snapshot_store.display()
                    ),
                ));
            }
            check_not_in_use(checks, target.path(), "snapshot")?;
            Ok(Prepared {
                kind: JobKind::Snapshot,
                target: Some(target.path().to_path_buf()),
                domain: None,
                hold: None,
                work: Work::Snapshot {
                    target,
                    name: s.image_name.clone(),
                    version: s.image_version.clone(),
                    notes: s.notes.clone(),
                },
            })
        }
    }
}

/// Longest wait of a MigrateReceive, and its default.
const MAX_RECEIVE_TIMEOUT_SECS: u32 = 7 * 24 * 3600;
const DEFAULT_RECEIVE_TIMEOUT_SECS: u32 = 3600;

fn prepare_migrate_send(
    m: &MigrateSendJob,
    client: &str,
    checks: &Checks<'_>,
) -> Result<Prepared, SubmitError> {
    check_domain_name(&m.domain, "migrate_send.domain")?;
    check_transfer_id(&m.transfer_id, "migrate_send.transfer_id")?;
    check_peer_name(&m.receiver, "migrate_send.receiver")?;
    check_address(&m.receiver_address, "migrate_send.receiver_address")?;
    let method = parse_method(&m.wipe_method, "migrate_send.wipe_method", checks)?;
    require_mutual_tls(checks, "migrate_send")?;
    let hv = hypervisor(checks, "migrate_send")?;
    let what = format!("migrate_send.domain {:?}", m.domain);
    if m.live && !checks.live_migration {
        return Err(SubmitError::Precondition(
            "migrate_send.live: this node sends no live migrations (set libvirt.peer_uri, on a libvirt that runs \
             guests); migrate cold"
                .into(),
        ));
    }
    match hv.state(&m.domain).map_err(|e| hypervisor_error(&what, e))? {
        None => return Err(SubmitError::NotFound(format!("{what}: no such domain on this agent"))),
        Some(DomainState::Running) if m.live => {}
        Some(state) if m.live => {
            return Err(SubmitError::Precondition(format!(
                "migrate_send: domain {} is {}; a live migration needs it running (migrate it cold)",
                m.domain,
                state.as_str()
            )));
        }
        Some(DomainState::Shutoff) => {}
        Some(state) => {
            return Err(SubmitError::Precondition(format!(
                "migrate_send: domain {} is {}; a cold migration needs it shut off (stop it first)",
                m.domain,
                state.as_str()
            )));
        }
    }
    let target = match &m.target {
        Some(t) => resolve_target(Some(t), "migrate_send.target", false, checks)?,
        None => domain_disk(hv, &m.domain, "migrate_send.domain")?,
    };
    Ok(Prepared {
        kind: JobKind::MigrateSend,
        target: Some(target.path().to_path_buf()),
        domain: Some(m.domain.clone()),
        hold: Some(format!("transfer {}", m.transfer_id)),
        work: Work::MigrateSend(Box::new(MigrateSend {
            domain: m.domain.clone(),
            target,
            transfer_id: m.transfer_id.clone(),
            receiver_address: m.receiver_address.clone(),
            receiver: m.receiver.clone(),
            method,
            operator: client.to_string(),
            live: m.live,
        })),
    })
}

fn prepare_migrate_receive(m: &MigrateReceiveJob, checks: &Checks<'_>) -> Result<Prepared, SubmitError> {
    check_transfer_id(&m.transfer_id, "migrate_receive.transfer_id")?;
    check_peer_name(&m.sender, "migrate_receive.sender")?;
    let field = "migrate_receive.size_bytes";
    if m.size_bytes == 0 {
        return Err(invalid(field, "required: the disk's size in bytes"));
    }
    if !m.size_bytes.is_multiple_of(512) {
        return Err(invalid(field, format!("{} is not a multiple of 512", m.size_bytes)));
    }
    let timeout_secs = match m.timeout_seconds {
        0 => DEFAULT_RECEIVE_TIMEOUT_SECS,
        s if s > MAX_RECEIVE_TIMEOUT_SECS => {
            return Err(invalid(
                "migrate_receive.timeout_seconds",
                format!("{s} is more than {MAX_RECEIVE_TIMEOUT_SECS} (7 days)"),
            ));
        }
        s => s,
    };
    require_mutual_tls(checks, "migrate_receive")?;
    let spec = m.spec.as_ref().ok_or_else(|| invalid("migrate_receive.spec", "required: the VM's name"))?;
    check_domain_name(&spec.name, "migrate_receive.spec.name")?;
    if m.live {
        if !checks.live_migration {
            return Err(SubmitError::Precondition(
                "migrate_receive.live: this node takes no live migrations (set libvirt.peer_uri, on a libvirt \
                 that runs guests); migrate cold"
                    .into(),
            ));
        }
        if matches!(&m.target, Some(DiskTarget { target: Some(disk_target::Target::Device(_)) })) {
            return Err(invalid(
                "migrate_receive.target.device",
                "a live migration receives into a pool volume: leave out the target or name a volume",
            ));
        }
        let hv = hypervisor(checks, "migrate_receive.live")?;
        let what = format!("migrate_receive.spec.name {:?}", spec.name);
        if hv.state(&spec.name).map_err(|e| hypervisor_error(&what, e))?.is_some() {
            return Err(SubmitError::Precondition(format!(
                "migrate_receive: domain {} is already defined on this agent",
                spec.name
            )));
        }
    }
    let domain = match &spec.machine {
        _ if m.live => None,
        Some(machine) => {
            let hv = hypervisor(checks, "migrate_receive.spec.machine")?;
            let plan = domain_plan(&spec.name, machine, "migrate_receive.spec.machine")?;
            let what = format!("migrate_receive.spec.name {:?}", spec.name);
            if hv.state(&spec.name).map_err(|e| hypervisor_error(&what, e))?.is_some() {
                return Err(SubmitError::Precondition(format!(
                    "migrate_receive: domain {} is already defined on this agent",
                    spec.name
                )));
            }
            Some(plan)
        }
        None => None,
    };
    let default_target =
        DiskTarget { target: Some(disk_target::Target::Volume(format!("{}.raw", spec.name))) };
    let target = resolve_target(
        Some(m.target.as_ref().unwrap_or(&default_target)),
        "migrate_receive.target",
        true,
        checks,
    )?;
    match &target {
        Target::Volume { name, exists: true, .. } => {
            return Err(invalid(
                "migrate_receive.target.volume",
                format!("volume {name:?} already exists; a migration receives into a new volume"),
            ));
        }
        Target::Volume { .. } => {}
        Target::Device(path) => match disk_size(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SubmitError::NotFound(format!(
                    "migrate_receive.target.device: cannot read the size of {}: {e}",
                    path.display()
                )));
            }
            Ok((_, false)) => {
                return Err(invalid(
                    "migrate_receive.target.device",
                    format!("{} already exists; a migration receives into a new file", path.display()),
                ));
            }
            Ok((size, true)) if size < m.size_bytes => {
                return Err(invalid(
                    "migrate_receive.target.device",
                    format!(
                        "block device {} holds {size} bytes, less than size_bytes {}",
                        path.display(),
                        m.size_bytes
                    ),
                ));
            }
            Ok(_) => check_not_in_use(checks, path, "migrate_receive")?,
        },
    }
    Ok(Prepared {
        kind: JobKind::MigrateReceive,
        target: Some(target.path().to_path_buf()),
        domain: domain.as_ref().map(|d| d.name.clone()).or_else(|| m.live.then(|| spec.name.clone())),
        hold: Some(format!("transfer {}", m.transfer_id)),
        work: Work::MigrateReceive(Box::new(MigrateReceive {
            transfer_id: m.transfer_id.clone(),
            sender: m.sender.clone(),
            target,
            size_bytes: m.size_bytes,
            domain,
            timeout: std::time::Duration::from_secs(timeout_secs.into()),
            live: m.live.then(|| spec.name.clone()),
        })),
    })
}

/// A transfer id: 16-128 characters of `[A-Za-z0-9._-]` (the coordinator makes one per migration).
fn check_transfer_id(id: &str, field: &str) -> Result<(), SubmitError> {
    if id.is_empty() {
        return Err(invalid(field, "required: the one-time id of the transfer"));
    }
    if !(16..=128).contains(&id.len())
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(field, format!("{id:?} is not 16-128 characters of A-Z a-z 0-9 . _ -")));
    }
    Ok(())
}

/// A peer agent's certificate name, as `pki issue --name` takes it.
fn check_peer_name(name: &str, field: &str) -> Result<(), SubmitError> {
    if name.is_empty() {
        return Err(invalid(field, "required: the peer agent's certificate name (CN)"));
    }
    if name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(invalid(
            field,
            format!("{name:?} is not a certificate name (1-64 of A-Z a-z 0-9 . _ -)"),
        ));
    }
    Ok(())
}

/// `host:port` (or `https://host:port`) of a peer agent.
fn check_address(address: &str, field: &str) -> Result<(), SubmitError> {
    if address.is_empty() {
        return Err(invalid(field, "required: host:port of the receiving agent"));
    }
    let rest = address.strip_prefix("https://").unwrap_or(address);
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || rest.contains(['/', ' ']) {
        return Err(invalid(field, format!("{address:?} is not host:port")));
    }
    Ok(())
}

fn require_mutual_tls(checks: &Checks<'_>, what: &str) -> Result<(), SubmitError> {
    if checks.mutual_tls {
        Ok(())
    } else {
        Err(SubmitError::Precondition(format!(
            "{what}: this agent runs without TLS (tls.insecure); a migration needs mutual TLS to \
             authenticate the peer agent"
        )))
    }
}

/// The new size of a Resize in bytes: given, and larger than the disk is now. A block device cannot be grown
/// here, so it must already hold the new size.
fn resize_size(size_mib: u64, path: &Path, bases_dir: &Path) -> Result<u64, SubmitError> {
    let field = "resize.size_mib";
    if size_mib == 0 {
        return Err(invalid(field, "required: the new disk size in MiB"));
    }
    let size_bytes = size_mib
        .checked_mul(MIB)
        .ok_or_else(|| invalid(field, format!("{size_mib} MiB is not a disk size")))?;
    let cannot = |e: &dyn std::fmt::Display| {
        SubmitError::NotFound(format!("resize.target: cannot read the size of {}: {e}", path.display()))
    };
    let (mut current, is_device) = disk_size(path).map_err(|e| cannot(&e))?;
    // An overlay's disk size is its qcow2 image's virtual size, not its file's.
    if crate::provision::BaseStore::new(bases_dir).overlay_base(path).map_err(|e| cannot(&e))?.is_some() {
        current = crate::block::overlay::virtual_size(path).map_err(|e| cannot(&e))?;
    }
    if is_device {
        if size_bytes > current {
            return Err(invalid(
                field,
                format!(
                    "{size_mib} MiB is more than block device {} holds ({} MiB); grow the device first",
                    path.display(),
                    current / MIB
                ),
            ));
        }
    } else if size_bytes <= current {
        return Err(invalid(
            field,
            format!(
                "{size_mib} MiB is not larger than the disk's current {} MiB (disks only grow)",
                current.div_ceil(MIB)
            ),
        ));
    }
    Ok(size_bytes)
}

/// Size in bytes of a regular file or block device, and whether it is a block device.
fn disk_size(path: &Path) -> std::io::Result<(u64, bool)> {
    use std::io::Seek;
    use std::os::unix::fs::FileTypeExt;
    let mut file = std::fs::File::open(path)?;
    let is_device = file.metadata()?.file_type().is_block_device();
    Ok((file.seek(std::io::SeekFrom::End(0))?, is_device))
}

/// Whether the snapshot store's index already lists `name` `version` (a quick check at submission; the
/// snapshot itself checks again against the verified index).
fn snapshot_exists(store_dir: &Path, name: &str, version: &str) -> bool {
    let store = store_dir.display().to_string();
    std::fs::read(store_dir.join("index.json"))
        .ok()
        .and_then(|bytes| crate::image::Index::parse(&bytes, &store).ok())
        .is_some_and(|index| index.find(name, version).is_ok())
}

fn check_not_in_use(checks: &Checks<'_>, disk: &Path, what: &str) -> Result<(), SubmitError> {
    let Some(hv) = checks.hypervisor else { return Ok(()) };
    match domain_using(hv, disk) {
        Ok(None) => Ok(()),
        Ok(Some((domain, state))) => Err(SubmitError::Precondition(format!(
            "{what}: domain {domain} is {} on {}; stop it first",
            state.as_str(),
            disk.display()
        ))),
        Err(e) => Err(SubmitError::Unavailable(format!(
            "{what}: cannot check which domains use {}: {}",
            disk.display(),
            error_chain(&e)
        ))),
    }
}

/// A domain that is not shut off and has `disk` as its disk, with its state.
pub(crate) fn domain_using(
    hv: &dyn Hypervisor,
    disk: &Path,
) -> Result<Option<(String, DomainState)>, HypervisorError> {
    let disk = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    for name in hv.domains()? {
        let state = match hv.state(&name) {
            Ok(Some(state)) if state != DomainState::Shutoff => state,
            Ok(_) | Err(HypervisorError::NoDomain(_)) => continue,
            Err(e) => return Err(e),
        };
        let used = match hv.domain_disk(&name) {
            Ok(path) => std::fs::canonicalize(&path).unwrap_or(path),
            Err(HypervisorError::NoDomain(_)) => continue,
            Err(e) => return Err(e),
        };
        if used == disk {
            return Ok(Some((name, state)));
        }
    }
    Ok(None)
}

/// The spec checks the engine runs again at provision time, with field paths from the request's root.
pub fn validate_spec(spec: &VmSpec) -> Result<(), SubmitError> {
    crate::provision::spec::validate(spec)
        .map_err(|e| invalid(format!("provision.spec.{}", e.field), e.reason))?;
    if let Some(c) = &spec.customize {
        crate::customize::validate(c).map_err(|e| match e {
            crate::customize::CustomizeError::Invalid { field, reason } => {
                invalid(format!("provision.spec.{field}"), reason)
            }
            other => invalid("provision.spec.customize", other.to_string()),
        })?;
    }
    Ok(())
}

fn parse_method(text: &str, field: &str, checks: &Checks<'_>) -> Result<wipe::Method, SubmitError> {
    let text = if text.is_empty() { checks.default_wipe_method } else { text };
    wipe::Method::parse(text).map_err(|reason| invalid(field, reason))
}

fn hypervisor<'a>(checks: &Checks<'a>, what: &str) -> Result<&'a dyn Hypervisor, SubmitError> {
    checks.hypervisor.ok_or_else(|| {
        SubmitError::Unavailable(format!("{what}: no hypervisor is configured on this agent (libvirt.uri)"))
    })
}

fn hypervisor_error(what: &str, e: HypervisorError) -> SubmitError {
    match e {
        HypervisorError::NoDomain(_) | HypervisorError::NoVolume(..) => {
            SubmitError::NotFound(format!("{what}: {}", error_chain(&e)))
        }
        e => SubmitError::Unavailable(format!("{what}: {}", error_chain(&e))),
    }
}

fn check_domain_name(name: &str, field: &str) -> Result<(), SubmitError> {
    if name.is_empty() {
        return Err(invalid(field, "required"));
    }
    if name.len() > 255 || name.contains(['/', '\0']) || name.chars().any(char::is_control) {
        return Err(invalid(field, format!("{name:?} is not a valid domain name")));
    }
    Ok(())
}

/// A volume name: one path component, no hidden or special names.
fn check_volume_name(name: &str, field: &str) -> Result<(), SubmitError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > 255 || name.contains(['/', '\0']) || name.starts_with('.') {
        return Err(invalid(
            field,
            format!("{name:?} is not a valid volume name (one file name, not hidden)"),
        ));
    }
    Ok(())
}

/// The disk of a defined domain, as a volume when it lies in the pool.
fn domain_disk(hv: &dyn Hypervisor, domain: &str, field: &str) -> Result<Target, SubmitError> {
    let what = format!("{field} {domain:?}");
    let disk = hv.domain_disk(domain).map_err(|e| hypervisor_error(&what, e))?;
    let disk = std::fs::canonicalize(&disk).unwrap_or(disk);
    let pool = hv.pool().map_err(|e| hypervisor_error(&what, e))?;
    let pool_dir = std::fs::canonicalize(&pool.path).unwrap_or(pool.path);
    if disk.parent() == Some(pool_dir.as_path())
        && let Some(name) = disk.file_name().and_then(|n| n.to_str())
        && let Ok(Some(_)) = hv.volume(name)
    {
        return Ok(Target::Volume { name: name.to_string(), path: disk, exists: true });
    }
    Ok(Target::Device(disk))
}

/// Resolve a target to its canonical path. `create`: a missing volume or file is one the job creates.
fn resolve_target(
    target: Option<&DiskTarget>,
    field: &str,
    create: bool,
    checks: &Checks<'_>,
) -> Result<Target, SubmitError> {
    match target.and_then(|t| t.target.as_ref()) {
        None => Err(invalid(field, "required: a volume or a device")),
        Some(disk_target::Target::Volume(name)) => {
            let field = format!("{field}.volume");
            check_volume_name(name, &field)?;
            let hv = hypervisor(checks, &field)?;
            match hv.volume(name).map_err(|e| hypervisor_error(&field, e))? {
                Some(v) => {
                    let path = std::fs::canonicalize(&v.path).unwrap_or(v.path);
                    Ok(Target::Volume { name: name.clone(), path, exists: true })
                }
                None if create => {
                    let pool = hv.pool().map_err(|e| hypervisor_error(&field, e))?;
                    let dir = std::fs::canonicalize(&pool.path).unwrap_or(pool.path);
                    Ok(Target::Volume { name: name.clone(), path: dir.join(name), exists: false })
                }
                None => Err(SubmitError::NotFound(format!("{field}: no volume named {name:?} in the pool"))),
            }
        }
        Some(disk_target::Target::Device(device)) => {
            let field = format!("{field}.device");
            let path = Path::new(device);
            if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
                return Err(invalid(field, format!("{device:?} is not an absolute path without ..")));
            }
            let canonical = match std::fs::canonicalize(path) {
                Ok(p) => p,
                Err(_) if create => {
                    // A file the provision creates: its directory must exist.
                    let parent = path.parent().and_then(|p| std::fs::canonicalize(p).ok());
                    match (parent, path.file_name()) {
                        (Some(dir), Some(name)) => dir.join(name),
                        _ => {
                            return Err(SubmitError::NotFound(format!(
                                "{field}: the directory of {device} does not exist"
                            )));
                        }
                    }
                }
                Err(_) => return Err(SubmitError::NotFound(format!("{field}: {device} does not exist"))),
            };
            if !device_allowed(checks.devices, &canonical) {
                return Err(invalid(
                    field,
                    format!("{device} is not allowed on this agent (not listed in jobs.devices)"),
                ));
            }
            Ok(Target::Device(canonical))
        }
    }
}

/// An entry of `jobs.devices` allows that device or file, or, when it is a directory, files beneath it.
fn device_allowed(devices: &[PathBuf], canonical: &Path) -> bool {
    devices.iter().any(|entry| {
        let entry = std::fs::canonicalize(entry).unwrap_or_else(|_| entry.clone());
        if entry.is_dir() { canonical.starts_with(&entry) && canonical != entry } else { entry == canonical }
    })
}

fn domain_plan(name: &str, machine: &Machine, field_prefix: &str) -> Result<DomainPlan, SubmitError> {
    let mut nics = Vec::new();
    for (i, nic) in machine.nics.iter().enumerate() {
        let field = |f: &str| format!("{field_prefix}.nics[{i}].{f}");
        use gridforge_proto::v1::nic::Attach;
        let (network, bridge) = match &nic.attach {
            Some(Attach::Network(n)) if !n.is_empty() => (Some(n.clone()), None),
            Some(Attach::Bridge(b)) if !b.is_empty() => (None, Some(b.clone())),
            _ => return Err(invalid(field("attach"), "required: a network or a bridge name")),
        };
        let mac = if nic.mac.is_empty() {
            generated_mac(name, i)
        } else if is_mac(&nic.mac) {
            nic.mac.to_ascii_lowercase()
        } else {
            return Err(invalid(
                field("mac"),
                format!("{:?} is not a MAC address aa:bb:cc:dd:ee:ff", nic.mac),
            ));
        };
        let vlan = match nic.vlan {
            0 => None,
            v @ 1..=4094 => Some(v as u16),
            v => {
                return Err(invalid(field("vlan"), format!("{v} is not a VLAN tag (1-4094, or 0 for none)")));
            }
        };
        let uplink_vlan = match nic.uplink_vlan {
            0 => None,
            _ if vlan.is_none() => {
                return Err(invalid(field("uplink_vlan"), "a translation needs the NIC's own vlan"));
            }
            v @ 1..=4094 => Some(v as u16),
            v => return Err(invalid(field("uplink_vlan"), format!("{v} is not a VLAN ID (1-4094)"))),
        };
        nics.push(NicDef { network, bridge, mac, vlan, uplink_vlan, tap: None });
    }
    Ok(DomainPlan {
        name: name.to_string(),
        vcpus: if machine.vcpus == 0 { 1 } else { machine.vcpus },
        memory_mib: if machine.memory_mib == 0 { 1024 } else { machine.memory_mib },
        nics,
        start: machine.start,
    })
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A locally administered MAC in QEMU's 52:54:00 range, stable for a VM name and NIC index.
pub(crate) fn generated_mac(vm: &str, index: usize) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{vm}/{index}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", digest[0], digest[1], digest[2])
}

/// Wipe every secret from a spec in place: LUKS passphrases, root and user passwords (plain or hashed).
pub fn scrub_spec(spec: &mut VmSpec) {
    if let Some(disk) = &mut spec.disk {
        for p in &mut disk.partitions {
            if let Some(enc) = &mut p.encryption {
                enc.passphrase.zeroize();
            }
        }
    }
    if let Some(c) = &mut spec.customize {
        c.root_password.zeroize();
        c.root_password_hash.zeroize();
        for u in &mut c.users {
            u.password.zeroize();
            u.password_hash.zeroize();
        }
    }
}

/// The request as journaled and reported: every secret removed.
pub(crate) fn without_secrets(req: &SubmitJobRequest) -> SubmitJobRequest {
    let mut copy = req.clone();
    // A MigrateReceive uses only its spec's name and machine, but a coordinator may pass the VM's whole spec.
    let spec = match &mut copy.job {
        Some(JobReq::Provision(p)) => p.spec.as_mut(),
        Some(JobReq::MigrateReceive(m)) => m.spec.as_mut(),
        _ => None,
    };
    if let Some(spec) = spec {
        scrub_spec(spec);
    }
    copy
}

/// Bytes of a new volume for a spec.
pub(crate) fn volume_size(spec: &VmSpec) -> u64 {
    spec.disk.as_ref().map_or(0, |d| d.size_mib) * MIB
}
