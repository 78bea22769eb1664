//! Secure wipe of guest disks, verified and certified (NIST SP 800-88 Rev. 2 terms).
//!
//! A wipe runs one or more passes over a [`BlockTarget`], syncs, reads the target back (all of it, or a seeded
//! sample of 1 MiB blocks) against the content the passes must have left, and returns a [`WipeReport`] to
//! sign with [`report::sign`].
//!
//! - `Zero` is a Clear: BLKZEROOUT on a device, `fallocate(FALLOC_FL_ZERO_RANGE)` on a file (the file reads
//!   back as zeroes; the file system does not overwrite the old blocks on its own storage, which the report
//!   says), otherwise O_DIRECT writes of zeroes. `ZeroWrite` always writes.
//! - `Random` writes a ChaCha8 keystream keyed from 32 OS random bytes, generated on two threads. The key lives
//!   in memory only (in [`ExpectedContent`], for verification); it is never written to the report or disk.
//! - `Discard` is accepted only where the device promises discarded blocks read back as zeroes.
//! - `CryptoErase` overwrites both LUKS2 headers and the keyslot area (random, then zeroes): a Purge, provided
//!   the data was always encrypted and no other copy of the volume key exists.
//!
//! A cancelled wipe returns [`WipeError::Cancelled`] with the pass and byte offset reached (everything before
//! it is written and synced; writes in flight may have gone a few chunks past it). Resuming from there ([`Resume`]) runs the rest; a resumed random pass uses a
//! new key from the offset on, so the bytes before the offset cannot be verified and the report lists them
//! as unverified.

pub mod luks;
pub mod report;
pub mod safety;
mod stream;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use chacha20::ChaCha8Rng;
use chacha20::rand_core::SeedableRng;
use gridforge_common::progress::Progress;
use zeroize::Zeroizing;

use crate::block::{self, AlignedBuf, BlockError, BlockTarget, MIB, TargetKind, TargetOptions};

pub use report::WipeReport;
pub use safety::{Refusal, WipePolicy};
use stream::Pattern;

/// Progress step names.
pub const STEP_WIPE: &str = "wipe";
pub const STEP_VERIFY: &str = "verify";

/// Size of the blocks a sample verification picks from.
pub const SAMPLE_BLOCK: u64 = MIB;

/// How to wipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// Zeroes by the cheapest means that makes every byte read back as zero (see the module docs).
    Zero,
    /// Zeroes written with O_DIRECT over every byte, whatever the target supports.
    ZeroWrite,
    /// A ChaCha8 keystream. `seed: None` (the normal case) draws 32 bytes from the OS random source.
    Random { seed: Option<[u8; 32]> },
    /// Several passes in order, e.g. random then zero.
    Passes(Vec<Method>),
    /// BLKDISCARD, only on devices that guarantee discarded blocks read back as zeroes.
    Discard,
    /// Destroy the LUKS2 headers and keyslots (refused on anything else).
    CryptoErase,
}

impl Method {
    /// Parse the CLI form: `zero`, `zero-write`, `random`, `discard`, `crypto-erase`, `passes:random,zero`.
    pub fn parse(text: &str) -> Result<Method, String> {
        if let Some(list) = text.strip_prefix("passes:") {
            let passes = list.split(',').map(|p| Method::parse(p.trim())).collect::<Result<Vec<_>, _>>()?;
            if passes.is_empty() || passes.iter().any(|p| matches!(p, Method::Passes(_))) {
                return Err(format!("invalid pass list {list:?}"));
            }
            return Ok(Method::Passes(passes));
        }
        match text {
            "zero" => Ok(Method::Zero),
            "zero-write" => Ok(Method::ZeroWrite),
            "random" => Ok(Method::Random { seed: None }),
            "discard" => Ok(Method::Discard),
            "crypto-erase" => Ok(Method::CryptoErase),
            _ => Err(format!(
                "unknown wipe method {text:?} (zero, zero-write, random, discard, crypto-erase, passes:A,B,...)"
            )),
        }
    }

    /// The CLI form (never includes a seed).
    pub fn name(&self) -> String {
        match self {
            Method::Zero => "zero".into(),
            Method::ZeroWrite => "zero-write".into(),
            Method::Random { .. } => "random".into(),
            Method::Discard => "discard".into(),
            Method::CryptoErase => "crypto-erase".into(),
            Method::Passes(p) => {
                format!("passes:{}", p.iter().map(Method::name).collect::<Vec<_>>().join(","))
            }
        }
    }

    fn flatten(&self) -> Vec<Method> {
        match self {
            Method::Passes(p) => p.iter().flat_map(Method::flatten).collect(),
            m => vec![m.clone()],
        }
    }
}

/// How to check the result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Read back every byte.
    Full,
    /// Read back a pseudorandom sample of at least 10% of the 1 MiB blocks, always with the first and last.
    /// `seed: None` draws the selection seed from the OS; it is recorded in the report either way.
    Sample {
        seed: Option<u64>,
    },
    None,
}

impl Verify {
    pub fn name(&self) -> &'static str {
        match self {
            Verify::Full => "full",
            Verify::Sample { .. } => "sample",
            Verify::None => "none",
        }
    }
}

/// Cooperative cancellation, checked between chunks.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where to continue an interrupted wipe: the pass index (0-based) and the byte offset within it, as
/// [`WipeError::Cancelled`] reported them. Passes before `pass` are not repeated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resume {
    pub pass: usize,
    pub offset: u64,
}

#[derive(Clone, Debug)]
pub struct WipeRequest {
    pub path: PathBuf,
    pub method: Method,
    pub verify: Verify,
    pub policy: WipePolicy,
    /// Skip the safety checks (mounted, root, holders, swap, pool). The kernel still refuses to let a mounted
    /// device be opened exclusively.
    pub force: bool,
    pub resume: Resume,
    /// Who ordered the wipe, for the report.
    pub operator: String,
    /// Logical sector size of a regular-file target (default 512).
    pub file_sector_size: Option<u32>,
}

impl WipeRequest {
    pub fn new(path: impl Into<PathBuf>, method: Method, verify: Verify) -> Self {
        Self {
            path: path.into(),
            method,
            verify,
            policy: WipePolicy::default(),
            force: false,
            resume: Resume::default(),
            operator: default_operator(),
            file_sector_size: None,
        }
    }
}

/// `$SUDO_USER`, else `$USER`, else `unknown`.
pub fn default_operator() -> String {
    ["SUDO_USER", "USER"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("refusing to wipe {path}")]
    Refused {
        path: PathBuf,
        #[source]
        reason: Refusal,
    },
    #[error("refusing crypto-erase of {path}: not a LUKS2 volume ({reason})")]
    NotLuks { path: PathBuf, reason: String },
    #[error("refusing discard of {path}: {reason}")]
    DiscardUnsafe { path: PathBuf, reason: String },
    #[error("invalid resume point for {path}: {reason}")]
    BadResume { path: PathBuf, reason: String },
    #[error("empty pass list")]
    NoPasses,
    #[error("wipe cancelled in pass {pass} at byte {at} (resume with pass {pass}, offset {at})")]
    Cancelled { pass: usize, at: u64 },
    #[error("verification cancelled at byte {at}")]
    VerifyCancelled { at: u64 },
    #[error("verification of {path} failed: the byte at offset {offset} differs from what the wipe wrote")]
    Mismatch { path: PathBuf, offset: u64 },
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error("{context} {path}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the target must hold after a wipe, for verifying it again later. Holds the random passes' keys in
/// memory (zeroized on drop); it has no serialized form on purpose.
#[derive(Clone, Debug)]
pub struct ExpectedContent {
    size: u64,
    /// Non-overlapping ranges in offset order; `None` where the content is unknown.
    segments: Vec<(u64, u64, Option<Pattern>)>,
}

impl ExpectedContent {
    fn new(size: u64) -> Self {
        Self { size, segments: vec![(0, size, None)] }
    }

    /// Overlay `[start, end)` with `pattern` (a later pass replaces what an earlier one left).
    fn overlay(&mut self, start: u64, end: u64, pattern: Option<Pattern>) {
        if start >= end {
            return;
        }
        let mut next = Vec::new();
        for (s, e, p) in self.segments.drain(..) {
            if s < start {
                next.push((s, e.min(start), p.clone()));
            }
            if e > end {
                next.push((s.max(end), e, p));
            }
        }
        next.push((start, end, pattern));
        next.sort_by_key(|seg| seg.0);
        self.segments = next;
    }

    fn unknown_ranges(&self) -> Vec<[u64; 2]> {
        self.segments.iter().filter(|s| s.2.is_none()).map(|s| [s.0, s.1]).collect()
    }

    pub fn size(&self) -> u64 {
        self.size
    }
}

/// A wipe's result: the (unsigned) certificate, and the expected content for later re-verification.
#[derive(Debug)]
pub struct WipeOutcome {
    pub report: WipeReport,
    pub expected: ExpectedContent,
}

impl WipeOutcome {
    pub fn verified(&self) -> bool {
        self.report.verification.result == "passed"
    }
}

/// The result of a verification that found no difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifySummary {
    pub sample_seed: Option<u64>,
    pub blocks_checked: u64,
    pub bytes_checked: u64,
}

/// One pass, ready to run.
enum Plan {
    Zero { force_write: bool },
    Random(Pattern),
    Discard,
    CryptoErase { key_material_end: u64 },
}

/// Wipe `req.path`, verify it and return the certificate. A verification difference does not make this
/// fail: the report records it (result `failed`, the offset, an error line); check [`WipeOutcome::verified`].
pub fn wipe(req: &WipeRequest, progress: &Progress, cancel: &CancelToken) -> Result<WipeOutcome, WipeError> {
    let path = &req.path;
    safety::check(path, &req.policy, req.force)
        .map_err(|reason| WipeError::Refused { path: path.clone(), reason })?;
    let opts = TargetOptions { sector_size: req.file_sector_size, ..Default::default() };
    let target = BlockTarget::open(path, &opts)?;
    let size = target.size();

    let methods = req.method.flatten();
    if methods.is_empty() {
        return Err(WipeError::NoPasses);
    }
    let bad_resume = |reason: String| WipeError::BadResume { path: path.clone(), reason };
    if req.resume.pass >= methods.len() {
        return Err(bad_resume(format!(
            "pass {} does not exist ({} passes)",
            req.resume.pass,
            methods.len()
        )));
    }
    if req.resume.offset > size || !req.resume.offset.is_multiple_of(u64::from(target.sector_size())) {
        return Err(bad_resume(format!(
            "offset {} is beyond the end ({size}) or not a multiple of the {}-byte sector size",
            req.resume.offset,
            target.sector_size()
        )));
    }
    let mut plans = Vec::new();
    for method in &methods {
        plans.push(match method {
            Method::Zero => Plan::Zero { force_write: false },
            Method::ZeroWrite => Plan::Zero { force_write: true },
            Method::Random { seed: Some(seed) } => Plan::Random(Pattern::Stream(Zeroizing::new(*seed))),
            Method::Random { seed: None } => Plan::Random(Pattern::random()),
            Method::Discard => {
                check_discard(&target)
                    .map_err(|reason| WipeError::DiscardUnsafe { path: path.clone(), reason })?;
                Plan::Discard
            }
            Method::CryptoErase => match luks::probe(&target)? {
                luks::LuksProbe::Luks2 { key_material_end, .. } => Plan::CryptoErase { key_material_end },
                luks::LuksProbe::NotLuks2(reason) => {
                    return Err(WipeError::NotLuks { path: path.clone(), reason });
                }
            },
            Method::Passes(_) => unreachable!("flattened"),
        });
    }
    if matches!(plans[req.resume.pass], Plan::CryptoErase { .. } | Plan::Discard) && req.resume.offset != 0 {
        return Err(bad_resume("crypto-erase and discard passes restart from the beginning".into()));
    }

    let started = SystemTime::now();
    let clock = Instant::now();
    let mut expected = ExpectedContent::new(size);
    let total: u64 = plans
        .iter()
        .enumerate()
        .skip(req.resume.pass)
        .map(|(i, plan)| {
            let from = if i == req.resume.pass { req.resume.offset } else { 0 };
            match plan {
                Plan::CryptoErase { key_material_end } => 2 * key_material_end,
                _ => size - from,
            }
        })
        .sum();
    let mut ctx = PassContext { target: &target, progress, cancel, done: 0, total };
    // A sample verification of a wipe whose last pass writes a keystream over the whole target runs during
    // that pass (O_DIRECT only: buffered reads would see the page cache, not the storage): it checks the same
    // blocks, chosen the same way, as one run after the passes.
    let reader = Reader::new(target.file(), path);
    let last = plans.len() - 1;
    let inline_sample = match (req.verify, &plans[last]) {
        (Verify::Sample { seed }, Plan::Random(pattern))
            if target.is_direct() && (last > req.resume.pass || req.resume.offset == 0) =>
        {
            let seed = seed.unwrap_or_else(rand::random);
            let mut whole = ExpectedContent::new(size);
            whole.overlay(0, size, Some(pattern.clone()));
            let blocks = sample_blocks(&whole, &[(0, size, pattern)], seed);
            Some((seed, blocks))
        }
        _ => None,
    };
    let mut inline_check = None;
    let mut passes = Vec::new();
    let mut uses_prng = false;
    for (index, (plan, method)) in plans.iter().zip(&methods).enumerate() {
        let range_end = match plan {
            Plan::CryptoErase { key_material_end } => *key_material_end,
            _ => size,
        };
        let mut record = report::PassRecord {
            number: index as u32 + 1,
            method: method.name(),
            pattern: String::new(),
            mechanism: String::new(),
            range_start: 0,
            range_end,
            resumed_from: None,
            bytes_written: 0,
            notes: Vec::new(),
        };
        uses_prng |= matches!(plan, Plan::Random(_) | Plan::CryptoErase { .. });
        if index < req.resume.pass {
            // Done by the interrupted run; its key (if any) is gone.
            record.pattern = "written by an earlier, interrupted run".into();
            record.mechanism = "not repeated (resumed at a later pass)".into();
            expected.overlay(0, range_end, None);
            passes.push(record);
            continue;
        }
        let from = if index == req.resume.pass { req.resume.offset } else { 0 };
        if from > 0 {
            record.resumed_from = Some(from);
        }
        progress.note(STEP_WIPE, format!("pass {}/{}: {}", index + 1, plans.len(), method.name()));
        match plan {
            Plan::Zero { force_write } => {
                let (mechanism, note) = ctx.zero(index, from, size, *force_write)?;
                record.pattern = Pattern::Zero.name().into();
                record.mechanism = mechanism;
                record.notes.extend(note);
                expected.overlay(0, size, Some(Pattern::Zero));
            }
            Plan::Random(pattern) => {
                match &inline_sample {
                    Some((_, blocks)) if index == last => {
                        inline_check = Some(ctx.overwrite_checking(
                            index,
                            pattern,
                            from,
                            size,
                            Some((&reader, blocks)),
                        )?);
                    }
                    _ => ctx.overwrite(index, pattern, from, size)?,
                }
                record.pattern = pattern.name().into();
                record.mechanism = overwrite_mechanism(&target);
                // Bytes before a resume point hold another run's keystream: unknown now.
                expected.overlay(0, from, None);
                expected.overlay(from, size, Some(pattern.clone()));
                if from > 0 {
                    record.notes.push(format!(
                        "resumed at byte {from} with a new key; bytes before it were written by the interrupted \
                         run with a key that was not kept, and cannot be verified"
                    ));
                }
            }
            Plan::Discard => {
                ctx.discard(index, size)?;
                record.pattern = Pattern::Zero.name().into();
                record.mechanism = "BLKDISCARD on a device that reports discard_zeroes_data = 1".into();
                expected.overlay(0, size, Some(Pattern::Zero));
            }
            Plan::CryptoErase { key_material_end } => {
                let end = *key_material_end;
                ctx.overwrite(index, &Pattern::random(), 0, end)?;
                ctx.overwrite(index, &Pattern::Zero, 0, end)?;
                record.pattern = "pseudorandom (ChaCha8 keystream), then zeroes (0x00)".into();
                record.mechanism = format!(
                    "{} of both LUKS2 headers and the keyslot area [0, {end})",
                    overwrite_mechanism(&target)
                );
                record.notes.push(
                    "the encrypted data area is left as ciphertext; without the volume key it is unreadable"
                        .into(),
                );
                expected.overlay(0, end, Some(Pattern::Zero));
            }
        }
        record.bytes_written = record.range_end - from;
        if matches!(plan, Plan::CryptoErase { .. }) {
            record.bytes_written = 2 * range_end;
        }
        target.sync()?;
        passes.push(record);
    }
    target.sync()?;

    let mut errors = Vec::new();
    let mut verification = report::VerificationRecord {
        method: req.verify.name().into(),
        result: "not-performed".into(),
        sample_seed: None,
        sample_block_bytes: matches!(req.verify, Verify::Sample { .. }).then_some(SAMPLE_BLOCK),
        blocks_checked: 0,
        bytes_checked: 0,
        unverified_ranges: expected.unknown_ranges(),
        mismatch_offset: None,
    };
    if let (Some((seed, blocks)), Some(check)) = (&inline_sample, &inline_check) {
        verification.sample_seed = Some(*seed);
        verification.blocks_checked = blocks.len() as u64;
        verification.bytes_checked = check.bytes_checked;
        progress.report(STEP_VERIFY, check.bytes_checked, check.bytes_checked, "checked while writing");
        match check.first_mismatch {
            None => verification.result = "passed".into(),
            Some(offset) => {
                verification.result = "failed".into();
                verification.mismatch_offset = Some(offset);
                errors.push(WipeError::Mismatch { path: path.clone(), offset }.to_string());
            }
        }
    } else if req.verify != Verify::None {
        match verify_with(&reader, &expected, req.verify, progress, cancel) {
            Ok(summary) => {
                verification.result = "passed".into();
                verification.sample_seed = summary.sample_seed;
                verification.blocks_checked = summary.blocks_checked;
                verification.bytes_checked = summary.bytes_checked;
            }
            Err(e @ WipeError::Mismatch { offset, .. }) => {
                verification.result = "failed".into();
                verification.mismatch_offset = Some(offset);
                errors.push(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }

    let crypto = plans.iter().any(|p| matches!(p, Plan::CryptoErase { .. }));
    let (model, serial) = match target.kind() {
        TargetKind::BlockDevice => {
            let rdev = std::fs::metadata(path)
                .map_err(|source| WipeError::Io {
                    context: "reading metadata of",
                    path: path.clone(),
                    source,
                })?
                .rdev();
            safety::model_and_serial(rdev)
        }
        TargetKind::File => (None, None),
    };
    let finished = SystemTime::now();
    let report = WipeReport {
        format: report::FORMAT.into(),
        report_id: uuid::Uuid::new_v4().to_string(),
        device: report::DeviceRecord {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()).display().to_string(),
            kind: match target.kind() {
                TargetKind::File => "file".into(),
                TargetKind::BlockDevice => "block-device".into(),
            },
            model: model.unwrap_or_else(|| "unknown".into()),
            serial: serial.unwrap_or_else(|| "unknown".into()),
            size_bytes: size,
            logical_sector_size: target.sector_size(),
        },
        sanitization: report::SanitizationRecord {
            nist_level: if crypto { "purge" } else { "clear" }.into(),
            standard: "NIST SP 800-88 Rev. 2".into(),
            level_conditions: crypto.then(|| {
                "cryptographic erase is a Purge only if all data on the volume was always written encrypted \
                 under the destroyed volume key, and no other copy of that key or of the LUKS header (header \
                 backups, external key files, escrow) exists"
                    .to_string()
            }),
            method: req.method.name(),
            passes,
            prng: uses_prng.then(|| stream::PRNG_NAME.to_string()),
        },
        verification,
        tool: report::ToolRecord {
            name: "gridforge-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        started: report::rfc3339(started),
        finished: report::rfc3339(finished),
        duration_ms: clock.elapsed().as_millis() as u64,
        bytes_written: 0,
        errors,
        node: report::NodeRecord { hostname: hostname() },
        operator: req.operator.clone(),
        signature: None,
    };
    let mut report = report;
    report.bytes_written = report.sanitization.passes.iter().map(|p| p.bytes_written).sum();
    Ok(WipeOutcome { report, expected })
}

/// Read `path` back against `expected` (from an earlier [`wipe`]). Fails with [`WipeError::Mismatch`] naming
/// the first differing offset found.
pub fn verify_target(
    path: &Path,
    expected: &ExpectedContent,
    verify: Verify,
    progress: &Progress,
    cancel: &CancelToken,
) -> Result<VerifySummary, WipeError> {
    let file = File::open(path).map_err(|source| WipeError::Io {
        context: "opening for verification",
        path: path.to_path_buf(),
        source,
    })?;
    verify_with(&Reader::new(&file, path), expected, verify, progress, cancel)
}

fn hostname() -> String {
    safety::read_trimmed(Path::new("/proc/sys/kernel/hostname")).unwrap_or_else(|| "unknown".into())
}

fn overwrite_mechanism(target: &BlockTarget) -> String {
    if target.is_direct() {
        "O_DIRECT overwrite".into()
    } else {
        "buffered overwrite with fsync (O_DIRECT refused by the file system)".into()
    }
}

/// Why BLKDISCARD would not be a wipe here, or Ok where the device promises zeroes after discard.
fn check_discard(target: &BlockTarget) -> Result<(), String> {
    if target.kind() == TargetKind::File {
        return Err(
            "a regular file has no discard that guarantees zeroes (use zero: fallocate ZERO_RANGE)".into()
        );
    }
    let rdev = target.file().metadata().map_err(|e| format!("reading device metadata: {e}"))?.rdev();
    let sys = safety::sys_block(rdev).ok_or("the device is not in /sys/dev/block")?;
    let disk = if sys.dir.join("partition").exists() {
        sys.dir.parent().unwrap_or(&sys.dir).to_path_buf()
    } else {
        sys.dir
    };
    let queue = disk.join("queue");
    let zeroes = safety::read_trimmed(&queue.join("discard_zeroes_data")).unwrap_or_else(|| "absent".into());
    if zeroes == "1" {
        return Ok(());
    }
    let write_zeroes =
        safety::read_trimmed(&queue.join("write_zeroes_max_bytes")).unwrap_or_else(|| "0".into());
    let hint = if write_zeroes != "0" {
        format!("; the device supports write-zeroes (write_zeroes_max_bytes = {write_zeroes}): use zero")
    } else {
        String::new()
    };
    Err(format!(
        "{} does not guarantee that discarded blocks read back as zeroes (queue/discard_zeroes_data = {zeroes}); \
         BLKDISCARD is only a hint, not a sanitize{hint}",
        sys.name
    ))
}

struct PassContext<'a> {
    target: &'a BlockTarget,
    progress: &'a Progress,
    cancel: &'a CancelToken,
    done: u64,
    total: u64,
}

thread_local! {
    /// Each writer thread's buffer for reading back sampled blocks (allocated on its first sampled block).
    static SAMPLE_BUF: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::new(SAMPLE_BLOCK as usize));
}

/// What a pass that verified its sample while writing found.
struct InlineCheck {
    bytes_checked: u64,
    first_mismatch: Option<u64>,
}

/// Device-side zeroing and fallocate go in larger steps than writes: they cost little per call.
const ZERO_STEP: u64 = 64 * MIB;

impl PassContext<'_> {
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        self.progress.report(STEP_WIPE, self.done, self.total, "");
    }

    /// Stop between chunks, with everything written so far on stable storage.
    fn check_cancel(&self, pass: usize, at: u64) -> Result<(), WipeError> {
        if self.cancel.is_cancelled() {
            self.target.sync()?;
            return Err(WipeError::Cancelled { pass, at });
        }
        Ok(())
    }

    fn overwrite(&mut self, pass: usize, pattern: &Pattern, from: u64, end: u64) -> Result<(), WipeError> {
        self.overwrite_checking(pass, pattern, from, end, None).map(|_| ())
    }

    /// Overwrite `[from, end)`; with `sample` (a reader and sorted 1 MiB block numbers), also read back the
    /// sampled blocks of each chunk as soon as it is written, against the bytes just written, on the same
    /// writer thread: the sample verification overlaps the pass instead of following it.
    fn overwrite_checking(
        &mut self,
        pass: usize,
        pattern: &Pattern,
        from: u64,
        end: u64,
        sample: Option<(&Reader<'_>, &[u64])>,
    ) -> Result<InlineCheck, WipeError> {
        let target = self.target;
        let checked = std::sync::atomic::AtomicU64::new(0);
        let first_mismatch = std::sync::Mutex::new(None::<u64>);
        let write = |offset: u64, chunk: &[u8]| -> Result<(), WipeError> {
            target.write_at(chunk, offset)?;
            let Some((reader, blocks)) = sample else { return Ok(()) };
            let chunk_end = offset + chunk.len() as u64;
            let first = blocks.partition_point(|&b| (b + 1) * SAMPLE_BLOCK <= offset);
            let sampled = blocks[first..].iter().take_while(|&&b| b * SAMPLE_BLOCK < chunk_end);
            SAMPLE_BUF.with_borrow_mut(|back| {
                for &block in sampled {
                    let (p0, p1) =
                        ((block * SAMPLE_BLOCK).max(offset), ((block + 1) * SAMPLE_BLOCK).min(chunk_end));
                    back.set_len((p1 - p0) as usize);
                    reader.read(back, p0)?;
                    let want = &chunk[(p0 - offset) as usize..(p1 - offset) as usize];
                    if let Some(i) = first_difference(back, want) {
                        let at = p0 + i as u64;
                        let mut first = first_mismatch.lock().unwrap_or_else(|e| e.into_inner());
                        *first = Some(first.map_or(at, |f| f.min(at)));
                    }
                    checked.fetch_add(p1 - p0, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(())
            })
        };
        stream::write_chunks(pattern, from, end, write, |offset, len| {
            self.advance(len as u64);
            self.check_cancel(pass, offset + len as u64)
        })?;
        Ok(InlineCheck {
            bytes_checked: checked.into_inner(),
            first_mismatch: first_mismatch.into_inner().unwrap_or_else(|e| e.into_inner()),
        })
    }

    /// Zero `[from, end)`; returns the mechanism used and a note on what it means for the storage.
    fn zero(
        &mut self,
        pass: usize,
        from: u64,
        end: u64,
        force_write: bool,
    ) -> Result<(String, Option<String>), WipeError> {
        let write = |ctx: &mut Self| {
            ctx.overwrite(pass, &Pattern::Zero, from, end).map(|()| overwrite_mechanism(ctx.target))
        };
        if force_write {
            return Ok((write(self)?, None));
        }
        let fd = self.target.file();
        let mut offset = from;
        let mut fast: Option<(&str, Option<&str>)> = None;
        while offset < end {
            self.check_cancel(pass, offset)?;
            let len = (end - offset).min(ZERO_STEP);
            let result = match self.target.kind() {
                TargetKind::BlockDevice => crate::block::ioctl::zero_out(fd, offset, len)
                    .map(|()| ("BLKZEROOUT (device write-zeroes)", None)),
                TargetKind::File => zero_file_range(fd, offset, len),
            };
            match result {
                Ok(how) => fast = Some(how),
                Err(e) if fast.is_none() => {
                    // Not supported here: write the zeroes instead.
                    let mechanism = write(self)?;
                    return Ok((mechanism, Some(format!("fast zeroing unavailable ({e}); zeroes written"))));
                }
                Err(e) => {
                    return Err(BlockError::Io {
                        context: format!("zeroing {len} bytes at offset {offset}"),
                        path: self.target.path().to_path_buf(),
                        source: e.into(),
                    }
                    .into());
                }
            }
            offset += len;
            self.advance(len);
        }
        let (mechanism, note) = fast.unwrap_or(("nothing to zero", None));
        Ok((mechanism.to_string(), note.map(str::to_string)))
    }

    fn discard(&mut self, pass: usize, end: u64) -> Result<(), WipeError> {
        let mut offset = 0;
        while offset < end {
            self.check_cancel(pass, offset)?;
            let len = (end - offset).min(ZERO_STEP);
            crate::block::ioctl::discard(self.target.file(), offset, len).map_err(|e| BlockError::Io {
                context: format!("discarding {len} bytes at offset {offset}"),
                path: self.target.path().to_path_buf(),
                source: e.into(),
            })?;
            offset += len;
            self.advance(len);
        }
        Ok(())
    }
}

/// BLKZEROOUT and BLKDISCARD as <linux/fs.h> defines them: `_IO(0x12, 127)` and `_IO(0x12, 119)`, with no
/// size in the request code (encoding one as `_IOW` yields a request the kernel rejects with EINVAL).
/// `fallocate` ZERO_RANGE, else PUNCH_HOLE; what was done and what it means.
fn zero_file_range(fd: &File, offset: u64, len: u64) -> nix::Result<(&'static str, Option<&'static str>)> {
    use nix::fcntl::{FallocateFlags as F, fallocate};
    let (o, l) = (offset as libc::off_t, len as libc::off_t);
    match fallocate(fd, F::FALLOC_FL_ZERO_RANGE | F::FALLOC_FL_KEEP_SIZE, o, l) {
        Ok(()) => Ok((
            "fallocate(FALLOC_FL_ZERO_RANGE)",
            Some(
                "the file reads back as zeroes; the file system marked its blocks unwritten and did not overwrite \
                 them on its underlying storage (use zero-write to overwrite in place)",
            ),
        )),
        Err(_) => fallocate(fd, F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE, o, l).map(|()| {
            (
                "fallocate(FALLOC_FL_PUNCH_HOLE)",
                Some(
                    "the file reads back as zeroes; its old blocks were deallocated (returned to the file system, \
                     not overwritten; use zero-write to overwrite in place)",
                ),
            )
        }),
    }
}

/// Reads for verification: O_DIRECT where offsets and lengths allow (the device, not the page cache),
/// buffered otherwise.
struct Reader<'a> {
    buffered: &'a File,
    direct: Option<File>,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn new(buffered: &'a File, path: &'a Path) -> Self {
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
        Self { buffered, direct, path }
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), WipeError> {
        let aligned = buf.as_ptr().addr().is_multiple_of(block::DIRECT_ALIGN)
            && buf.len().is_multiple_of(block::DIRECT_ALIGN)
            && offset.is_multiple_of(block::DIRECT_ALIGN as u64);
        let file = match &self.direct {
            Some(direct) if aligned => direct,
            _ => self.buffered,
        };
        file.read_exact_at(buf, offset).map_err(|source| {
            WipeError::Block(BlockError::Io {
                context: format!("reading {} bytes at offset {offset} for verification", buf.len()),
                path: self.path.to_path_buf(),
                source,
            })
        })
    }
}

fn first_difference(actual: &[u8], expected: &[u8]) -> Option<usize> {
    if actual == expected {
        return None;
    }
    actual.iter().zip(expected).position(|(a, e)| a != e)
}

fn verify_with(
    reader: &Reader<'_>,
    expected: &ExpectedContent,
    verify: Verify,
    progress: &Progress,
    cancel: &CancelToken,
) -> Result<VerifySummary, WipeError> {
    let known: Vec<(u64, u64, &Pattern)> =
        expected.segments.iter().filter_map(|(s, e, p)| p.as_ref().map(|p| (*s, *e, p))).collect();
    let mismatch = |offset| WipeError::Mismatch { path: reader.path.to_path_buf(), offset };
    match verify {
        Verify::None => Ok(VerifySummary { sample_seed: None, blocks_checked: 0, bytes_checked: 0 }),
        Verify::Full => {
            let total: u64 = known.iter().map(|(s, e, _)| e - s).sum();
            let mut done = 0u64;
            let mut buf = AlignedBuf::new(stream::CHUNK);
            for (start, end, pattern) in known {
                stream::for_each_chunk(pattern, start, end, |offset, want| {
                    if cancel.is_cancelled() {
                        return Err(WipeError::VerifyCancelled { at: offset });
                    }
                    buf.set_len(want.len());
                    reader.read(&mut buf, offset)?;
                    if let Some(i) = first_difference(&buf, want) {
                        return Err(mismatch(offset + i as u64));
                    }
                    done += want.len() as u64;
                    progress.report(STEP_VERIFY, done, total, "");
                    Ok(())
                })?;
            }
            Ok(VerifySummary {
                sample_seed: None,
                blocks_checked: total.div_ceil(SAMPLE_BLOCK),
                bytes_checked: total,
            })
        }
        Verify::Sample { seed } => {
            let seed = seed.unwrap_or_else(rand::random);
            let blocks = sample_blocks(expected, &known, seed);
            let pieces = |block: u64| {
                let (b0, b1) = (block * SAMPLE_BLOCK, ((block + 1) * SAMPLE_BLOCK).min(expected.size));
                known.iter().filter_map(move |&(s, e, pattern)| {
                    let (p0, p1) = (s.max(b0), e.min(b1));
                    (p0 < p1).then_some((p0, p1, pattern))
                })
            };
            let total: u64 = blocks.iter().flat_map(|&b| pieces(b)).map(|(p0, p1, _)| p1 - p0).sum();
            let mut bytes_checked = 0;
            let mut buf = AlignedBuf::new(SAMPLE_BLOCK as usize);
            let mut want = AlignedBuf::new(SAMPLE_BLOCK as usize);
            for &block in &blocks {
                if cancel.is_cancelled() {
                    return Err(WipeError::VerifyCancelled { at: block * SAMPLE_BLOCK });
                }
                for (p0, p1, pattern) in pieces(block) {
                    let len = (p1 - p0) as usize;
                    buf.set_len(len);
                    want.set_len(len);
                    reader.read(&mut buf, p0)?;
                    pattern.fill(p0, &mut want);
                    if let Some(i) = first_difference(&buf, &want) {
                        return Err(mismatch(p0 + i as u64));
                    }
                    bytes_checked += len as u64;
                }
                progress.report(STEP_VERIFY, bytes_checked, total, "");
            }
            Ok(VerifySummary { sample_seed: Some(seed), blocks_checked: blocks.len() as u64, bytes_checked })
        }
    }
}

/// At least 10% of the target's 1 MiB blocks, chosen by a ChaCha8 stream from `seed`, plus the first and last
/// block and the first and last block holding known content; sorted.
fn sample_blocks(expected: &ExpectedContent, known: &[(u64, u64, &Pattern)], seed: u64) -> Vec<u64> {
    let count = expected.size.div_ceil(SAMPLE_BLOCK);
    if count == 0 {
        return Vec::new();
    }
    let amount = count.div_ceil(10);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut blocks: Vec<u64> = rand::seq::index::sample(&mut rng, count as usize, amount as usize)
        .into_iter()
        .map(|b| b as u64)
        .collect();
    blocks.extend([0, count - 1]);
    if let (Some(first), Some(last)) = (known.first(), known.last()) {
        blocks.extend([first.0 / SAMPLE_BLOCK, (last.1 - 1) / SAMPLE_BLOCK]);
    }
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}
