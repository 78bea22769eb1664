//! Running one job of each kind on the engine's functions. Every function here blocks; the engine runs it on
//! the job's own thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gridforge_common::error_chain;
use gridforge_common::progress::Progress;
use gridforge_proto::v1::{
    ControlResult, Error as JobFailure, ResizeResult, SnapshotResult, VmSpec, WipeResult,
    control_job::Action, error::Code, job::Outcome,
};

use super::request::{DomainPlan, Target, Work, scrub_spec, volume_size};
use super::{Inner, make_safe};

use crate::block::overlay;
use crate::hypervisor::{DiskFormat, DomainDef, DomainState, Hypervisor, HypervisorError};
use crate::image::Trust;
use crate::image::snapshot::SnapshotRequest;
use crate::provision::resize::{DiskGrowth, ResizeError};
use crate::provision::{self, BaseStore, ImageSource, ProvisionRequest};
use crate::wipe::{self, CancelToken};

/// Default time a STOP waits for the guest to power off before it is destroyed.
const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(60);
const STOP_POLL: Duration = Duration::from_millis(250);

/// A job's failure before it is put into the contract's form.
#[derive(Debug)]
pub(crate) struct Failure {
    code: Code,
    /// The step it failed in; None: the job's current step.
    step: Option<String>,
    message: String,
}

impl Failure {
    pub(crate) fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, step: None, message: message.into() }
    }

    pub(super) fn at(step: &str, code: Code, message: impl Into<String>) -> Self {
        Self { code, step: Some(step.to_string()), message: message.into() }
    }

    pub(super) fn hypervisor(step: &str, e: HypervisorError) -> Self {
        let code = match e {
            HypervisorError::NoDomain(_) | HypervisorError::NoVolume(..) => Code::NotFound,
            _ => Code::Hypervisor,
        };
        Self::at(step, code, error_chain(&e))
    }

    pub(super) fn message(&self) -> &str {
        &self.message
    }

    /// The same failure, its message followed by what it leaves behind.
    pub(super) fn then(mut self, left: &str) -> Self {
        self.message = format!("{}; {left}", self.message);
        self
    }

    /// The same failure, its message led by what had been done before it.
    pub(super) fn after(mut self, done: &str) -> Self {
        self.message = format!("{done}; {}", self.message);
        self
    }

    pub(crate) fn into_proto(self, current_step: &str) -> JobFailure {
        JobFailure {
            code: self.code as i32,
            step: self.step.unwrap_or_else(|| current_step.to_string()),
            message: self.message,
        }
    }
}

pub(crate) struct JobContext<'a> {
    pub inner: &'a Arc<Inner>,
    pub id: &'a str,
    pub progress: Progress,
    pub cancel: CancelToken,
}

impl JobContext<'_> {
    pub(super) fn hypervisor(&self) -> Result<&dyn Hypervisor, Failure> {
        self.inner.hypervisor.as_deref().ok_or_else(|| {
            Failure::new(Code::Hypervisor, "no hypervisor is configured on this agent (libvirt.uri)")
        })
    }

    /// A safe point: stop here if the job was cancelled.
    pub(super) fn checkpoint(&self, step: &str) -> Result<(), Failure> {
        if self.cancel.is_cancelled() { Err(Failure::at(step, Code::Cancelled, "cancelled")) } else { Ok(()) }
    }
}

pub(crate) fn run(ctx: &JobContext<'_>, work: Work) -> Result<Outcome, Failure> {
    tracing::info!(job = ctx.id, "job started");
    match &work {
        Work::Provision { spec, target, domain } => provision(ctx, spec, target, domain.as_ref()),
        Work::Wipe { target, method, verify, operator } => {
            wipe_target(ctx, target.path(), method, *verify, operator).map(Outcome::Wipe)
        }
        Work::Control { domain, action, grace_seconds, vcpus, memory_mib } => {
            control(ctx, domain, *action, *grace_seconds, (*vcpus, *memory_mib))
        }
        Work::Delete { domain, target, method, operator } => delete(ctx, domain, target, method, operator),
        Work::Resize { target, size_bytes } => resize(ctx, target, *size_bytes).map(Outcome::Resize),
        Work::Snapshot { target, name, version, notes } => {
            snapshot(ctx, target.path(), name, version, notes).map(Outcome::Snapshot)
        }
        Work::MigrateSend(m) => super::migrate::send(ctx, m).map(Outcome::MigrateSend),
        Work::MigrateReceive(m) => super::migrate::receive(ctx, m).map(Outcome::MigrateReceive),
        Work::DeleteBase { id } => delete_base(ctx, id).map(Outcome::DeleteBase),
    }
}

/// Refuse to touch a disk that a domain not shut off uses (the domain may have started while the job was
/// queued). Without a hypervisor there are no domains to ask about.
pub(super) fn check_disk_idle(ctx: &JobContext<'_>, disk: &Path) -> Result<(), Failure> {
    let Some(hv) = ctx.inner.hypervisor.as_deref() else { return Ok(()) };
    match super::request::domain_using(hv, disk) {
        Ok(None) => Ok(()),
        Ok(Some((domain, state))) => Err(Failure::at(
            "check",
            Code::Target,
            format!("domain {domain} is {} on {}; stop it first", state.as_str(), disk.display()),
        )),
        Err(e) => Err(Failure::hypervisor("check", e)),
    }
}

/// Grow a disk, its last partition and that partition's file system. Everything is checked before anything
/// changes; a pool volume is grown by the hypervisor between the checks and the rest.
fn resize(ctx: &JobContext<'_>, target: &Target, size_bytes: u64) -> Result<ResizeResult, Failure> {
    let path = target.path();
    check_disk_idle(ctx, path)?;
    let fail = |step: &str, e: ResizeError| Failure::at(step, e.code(), error_chain(&e));
    // An overlay grows through its export: the qcow2 image's virtual size, not its file.
    let view = RawView::open(ctx, "check", path, true)?;
    let growth = DiskGrowth::check(view.path(), size_bytes, &ctx.progress).map_err(|e| fail("check", e))?;
    ctx.checkpoint("resize")?;
    if let Some(name) = target.volume_name().filter(|_| !view.is_overlay()) {
        let hv = ctx.hypervisor()?;
        ctx.progress
            .note("resize", format!("growing volume {name} to {} MiB", size_bytes / crate::block::MIB));
        hv.resize_volume(name, size_bytes).map_err(|e| Failure::hypervisor("resize", e))?;
    }
    let outcome = growth.apply(&ctx.progress).map_err(|e| fail("resize", e))?;
    view.close("resize")?;
    Ok(outcome.to_proto())
}

/// Capture a disk as a new signed raw-disk image in the snapshot store.
fn snapshot(
    ctx: &JobContext<'_>,
    disk: &Path,
    name: &str,
    version: &str,
    notes: &str,
) -> Result<SnapshotResult, Failure> {
    let images = &ctx.inner.config.images;
    let image_err = |step: &str, e: crate::image::ImageError| {
        let e = crate::Error::from(e);
        Failure::at(step, e.code(), error_chain(&e))
    };
    // The key first: a snapshot that cannot be published should not read the whole disk.
    let signing_key = crate::image::sign::load_signing_key(&images.snapshot_signing_key)
        .map_err(|e| image_err("check", e))?;
    check_disk_idle(ctx, disk)?;
    ctx.checkpoint("read")?;
    let view = RawView::open(ctx, "read", disk, false)?;
    let req = SnapshotRequest {
        disk: view.path().to_path_buf(),
        store_dir: images.snapshot_store.clone(),
        name: name.to_string(),
        version: version.to_string(),
        notes: notes.to_string(),
        signing_key,
        level: crate::image::snapshot::DEFAULT_LEVEL,
        cancel: Some(ctx.cancel.clone()),
    };
    let captured = crate::image::snapshot::capture(&req, &ctx.progress).map_err(|e| {
        let step =
            if matches!(e, crate::image::ImageError::RawDisk { .. } | crate::image::ImageError::Disk(_)) {
                "read"
            } else {
                "publish"
            };
        image_err(step, e)
    })?;
    view.close("read")?;
    Ok(captured)
}

fn provision(
    ctx: &JobContext<'_>,
    spec: &VmSpec,
    target: &Target,
    domain: Option<&DomainPlan>,
) -> Result<Outcome, Failure> {
    let trust = ctx
        .inner
        .config
        .images
        .trust()
        .map_err(|e| Failure::at("fetch", Code::ImageUntrusted, error_chain(&e)))?;
    let created_volume = match target {
        Target::Volume { name, exists: false, .. } => {
            let hv = ctx.hypervisor()?;
            ctx.progress.note("allocate", format!("creating volume {name} in the pool"));
            hv.create_volume(name, volume_size(spec)).map_err(|e| Failure::hypervisor("allocate", e))?;
            Some(name.as_str())
        }
        _ => None,
    };
    let result = provision_onto(ctx, spec, target.path(), trust, domain);
    if result.is_err()
        && let Some(name) = created_volume
        && let Some(hv) = ctx.inner.hypervisor.as_deref()
    {
        // The volume exists only for this provision: nothing half-written stays behind.
        if let Err(e) = hv.delete_volume(name) {
            tracing::error!(
                job = ctx.id,
                volume = name,
                "cannot delete the failed provision's volume: {}",
                error_chain(&e)
            );
        }
    }
    result
}

fn provision_onto(
    ctx: &JobContext<'_>,
    spec: &VmSpec,
    disk: &Path,
    trust: Trust,
    domain: Option<&DomainPlan>,
) -> Result<Outcome, Failure> {
    let config = &ctx.inner.config;
    let mut req = ProvisionRequest {
        spec: spec.clone(),
        disk: disk.to_path_buf(),
        images: ImageSource {
            store: config.images.store.clone(),
            trust,
            cache_dir: config.cache_dir.clone(),
        },
        work_dir: config.work_dir.clone(),
        efi_binary: config.images.efi_binary.clone(),
        cancel: Some(ctx.cancel.clone()),
        default_mode: config.images.default_provision_mode(),
        bases_dir: config.images.bases_dir.clone(),
        clone_fallback: config.images.clone_fallback(),
    };
    let result = provision::provision(&req, &ctx.progress);
    scrub_spec(&mut req.spec);
    let result = result.map_err(|e| {
        let p = e.to_proto();
        Failure { code: p.code(), step: Some(p.step), message: p.message }
    })?;
    if let Some(d) = domain {
        let defined = define_domain(ctx, d, disk);
        if let Err(e) = defined {
            // A disk whose domain could not be made is not handed over: leave it unbootable.
            if let Err(z) = make_safe(disk) {
                tracing::error!(job = ctx.id, "cannot zero the head of {}: {z}", disk.display());
            }
            return Err(e);
        }
    }
    Ok(Outcome::Provision(result))
}

/// The format of `disk`: qcow2 where the base store records it as an overlay the agent made, else raw.
pub(super) fn disk_format(
    ctx: &JobContext<'_>,
    step: &'static str,
    disk: &Path,
) -> Result<DiskFormat, Failure> {
    match overlay_base(ctx, step, disk)? {
        Some(_) => Ok(DiskFormat::Qcow2),
        None => Ok(DiskFormat::Raw),
    }
}

/// The base disk `disk` is a qcow2 overlay on, if it is one.
pub(super) fn overlay_base(
    ctx: &JobContext<'_>,
    step: &'static str,
    disk: &Path,
) -> Result<Option<PathBuf>, Failure> {
    BaseStore::new(&ctx.inner.config.images.bases_dir)
        .overlay_base(disk)
        .map_err(|e| Failure::at(step, Code::Io, error_chain(&e)))
}

/// Delete base `id`; refused while a disk holds a clone of it.
fn delete_base(ctx: &JobContext<'_>, id: &str) -> Result<gridforge_proto::v1::BaseDisk, Failure> {
    let store = BaseStore::new(&ctx.inner.config.images.bases_dir);
    ctx.progress.note("delete", format!("deleting base {id}"));
    let entry = store.delete(id).map_err(|e| {
        let code = match e {
            provision::BaseError::InUse { .. } => Code::Target,
            provision::BaseError::NotFound(_) => Code::NotFound,
            _ => Code::Io,
        };
        Failure::at("delete", code, error_chain(&e))
    })?;
    Ok(entry.to_proto())
}

/// The guest's raw view of a disk for the length of a job: the disk itself, or for a qcow2 overlay the agent
/// made, an export of it (read-only unless `writable`).
pub(super) struct RawView {
    path: PathBuf,
    export: Option<overlay::Export>,
}

impl RawView {
    pub(super) fn open(
        ctx: &JobContext<'_>,
        step: &'static str,
        disk: &Path,
        writable: bool,
    ) -> Result<Self, Failure> {
        if overlay_base(ctx, step, disk)?.is_none() {
            return Ok(Self { path: disk.to_path_buf(), export: None });
        }
        ctx.progress.note(step, format!("{} is a qcow2 overlay: exporting its raw view", disk.display()));
        let export = overlay::Export::start(disk, &ctx.inner.config.work_dir, writable)
            .map_err(|e| Failure::at(step, Code::Tool, error_chain(&e)))?;
        Ok(Self { path: export.path().to_path_buf(), export: Some(export) })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn is_overlay(&self) -> bool {
        self.export.is_some()
    }

    /// End the export (flushing what was written through it).
    pub(super) fn close(self, step: &'static str) -> Result<(), Failure> {
        match self.export {
            Some(export) => export.stop().map_err(|e| Failure::at(step, Code::Tool, error_chain(&e))),
            None => Ok(()),
        }
    }
}

pub(super) fn define_domain(ctx: &JobContext<'_>, d: &DomainPlan, disk: &Path) -> Result<(), Failure> {
    ctx.checkpoint("define")?;
    let hv = ctx.hypervisor()?;
    ctx.progress.note("define", format!("defining domain {}", d.name));
    let def = DomainDef {
        name: d.name.clone(),
        vcpus: d.vcpus,
        memory_mib: d.memory_mib,
        disk: disk.to_path_buf(),
        disk_format: disk_format(ctx, "define", disk)?,
        nics: d.nics.clone(),
    };
    hv.define(&def).map_err(|e| Failure::hypervisor("define", e))?;
    if d.start {
        ctx.progress.note("define", format!("starting domain {}", d.name));
        hv.start(&d.name).map_err(|e| Failure::hypervisor("define", e))?;
    }
    Ok(())
}

/// Wipe, verify and sign. The engine checked at submission that the target is a pool volume or an allowed
/// device, so the wipe's own pool check is not repeated; its safety checks (mounted, in use, root) apply.
fn wipe_target(
    ctx: &JobContext<'_>,
    path: &Path,
    method: &wipe::Method,
    verify: wipe::Verify,
    operator: &str,
) -> Result<WipeResult, Failure> {
    // Load (or create) the key first: a wipe that cannot be certified should not start.
    let key = ctx.inner.signing_key().map_err(|e| Failure::at("wipe", Code::Io, error_chain(&e)))?;
    let req = wipe::WipeRequest {
        path: path.to_path_buf(),
        method: method.clone(),
        verify,
        policy: wipe::WipePolicy::default(),
        force: false,
        resume: wipe::Resume::default(),
        operator: operator.to_string(),
        file_sector_size: None,
    };
    let outcome = wipe::wipe(&req, &ctx.progress, &ctx.cancel).map_err(|e| {
        let e = crate::Error::from(e);
        Failure::new(e.code(), error_chain(&e))
    })?;
    ctx.progress.note("report", "signing the wipe report");
    let verified = outcome.verified();
    let mut report = outcome.report;
    wipe::report::sign(&mut report, &key);
    if report.verification.result == "failed" {
        return Err(Failure::at(
            "verify",
            Code::Io,
            format!("verification failed: {}", report.errors.join("; ")),
        ));
    }
    Ok(WipeResult { report_json: report.to_pretty_json(), verified, bytes: report.bytes_written })
}

fn control(
    ctx: &JobContext<'_>,
    domain: &str,
    action: Action,
    grace_seconds: u32,
    (vcpus, memory_mib): (u32, u64),
) -> Result<Outcome, Failure> {
    let hv = ctx.hypervisor()?;
    let step = "control";
    ctx.progress.note(step, format!("{} {domain}", action.as_str_name().to_ascii_lowercase()));
    let hv_err = |e| Failure::hypervisor(step, e);
    match action {
        Action::Start => hv.start(domain).map_err(hv_err)?,
        Action::Stop => {
            let grace = match grace_seconds {
                0 => DEFAULT_STOP_GRACE,
                s => Duration::from_secs(s.into()),
            };
            stop(ctx, hv, domain, grace)?
        }
        Action::Reboot => hv.reboot(domain).map_err(hv_err)?,
        Action::Suspend => hv.suspend(domain).map_err(hv_err)?,
        Action::Resume => hv.resume(domain).map_err(hv_err)?,
        Action::Destroy => hv.destroy(domain).map_err(hv_err)?,
        Action::SetResources => hv.set_resources(domain, vcpus, memory_mib).map_err(hv_err)?,
        Action::Unspecified => return Err(Failure::at(step, Code::InvalidSpec, "no action given")),
    }
    let state = hv.state(domain).map_err(hv_err)?.map_or("undefined", DomainState::as_str);
    Ok(Outcome::Control(ControlResult { domain: domain.to_string(), state: state.to_string() }))
}

/// ACPI shutdown, then wait for the guest to power off; after `grace` it is destroyed.
fn stop(ctx: &JobContext<'_>, hv: &dyn Hypervisor, domain: &str, grace: Duration) -> Result<(), Failure> {
    let step = "control";
    let hv_err = |e| Failure::hypervisor(step, e);
    let off = |s: Option<DomainState>| matches!(s, None | Some(DomainState::Shutoff));
    if off(hv.state(domain).map_err(hv_err)?) {
        return Ok(());
    }
    hv.shutdown(domain).map_err(hv_err)?;
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if off(hv.state(domain).map_err(hv_err)?) {
            return Ok(());
        }
        ctx.checkpoint(step)?;
        std::thread::sleep(STOP_POLL);
    }
    if off(hv.state(domain).map_err(hv_err)?) {
        return Ok(());
    }
    ctx.progress
        .note(step, format!("{domain} did not power off within {} s; destroying it", grace.as_secs()));
    hv.destroy(domain).map_err(hv_err)
}

fn delete(
    ctx: &JobContext<'_>,
    domain: &str,
    target: &Target,
    method: &wipe::Method,
    operator: &str,
) -> Result<Outcome, Failure> {
    delete_vm(ctx, domain, target, method, operator).map(Outcome::Wipe)
}

/// Power off and undefine `domain`, wipe its disk with a signed report and free the volume: a Delete, and
/// the last part of a MigrateSend.
pub(super) fn delete_vm(
    ctx: &JobContext<'_>,
    domain: &str,
    target: &Target,
    method: &wipe::Method,
    operator: &str,
) -> Result<WipeResult, Failure> {
    let hv = ctx.hypervisor()?;
    match hv.state(domain).map_err(|e| Failure::hypervisor("stop", e))? {
        None => ctx.progress.note("undefine", format!("domain {domain} is not defined (already undefined)")),
        Some(state) => {
            if state != DomainState::Shutoff {
                ctx.progress.note("stop", format!("powering off {domain} ({})", state.as_str()));
                hv.destroy(domain).map_err(|e| Failure::hypervisor("stop", e))?;
            }
            ctx.checkpoint("undefine")?;
            ctx.progress.note("undefine", format!("undefining {domain}"));
            hv.undefine(domain).map_err(|e| Failure::hypervisor("undefine", e))?;
        }
    }
    ctx.checkpoint("wipe")?;
    let result = wipe_target(ctx, target.path(), method, wipe::Verify::Sample { seed: None }, operator)?;
    if let Some(name) = target.volume_name() {
        ctx.progress.note("free", format!("deleting volume {name}"));
        hv.delete_volume(name).map_err(|e| Failure::hypervisor("free", e))?;
    }
    Ok(result)
}
