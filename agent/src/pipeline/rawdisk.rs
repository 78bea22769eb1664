//! Raw-disk images: packing a disk into a zstd stream of independent per-chunk frames behind a manifest, and
//! writing such a stream (or any plain zstd/gzip/uncompressed raw disk) onto a block target.
//!
//! Layout of a packed image, a standard zstd stream that `zstd -dc` turns back into the exact disk bytes:
//!
//! ```text
//! skippable frame: u32 LE 0x184D2A50, u32 LE payload length, manifest payload
//!   manifest: b"GFRAWv1\0", u64 LE chunk size, u64 LE disk size, u64 LE chunk count,
//!             per chunk: u32 LE compressed frame length, u8 flags (bit 0: the chunk is all zero)
//! one zstd frame per chunk, in disk order (the last chunk may be short)
//! ```
//!
//! The manifest lets the writer decode frames on several threads and skip all-zero chunks without decoding
//! them. Every byte of the blob is hashed as it is read; the first MiB of the disk is held back until the
//! digest matched, so a disk written from a bad image never boots.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Mutex, OnceLock};

use gridforge_common::progress::Progress;
use zstd_safe::DCtx;

use super::PipelineError;
use super::stream::{self, HashingReader, LimitedReader};

use crate::block::{AlignedBuf, BlockTarget, MIB, TargetKind};
use crate::wipe::CancelToken;

/// Disk bytes per independent frame.
pub const CHUNK_SIZE: u64 = 4 * MIB;
const MANIFEST_MAGIC: &[u8; 8] = b"GFRAWv1\0";
const SKIPPABLE_MAGIC: u32 = 0x184D_2A50;
const MANIFEST_FIXED: usize = 32;
const MANIFEST_ENTRY: usize = 5;
const FLAG_ZERO: u8 = 1;
/// Largest manifest accepted (about 13 million chunks, 50 TiB at 4 MiB).
const MANIFEST_MAX: usize = 64 << 20;
/// Granularity of the zero scan.
const ZERO_BLOCK: usize = 4096;
/// Zero gaps shorter than this between data blocks are written as data: one larger write is cheaper than
/// two writes and a zeroing call.
const MERGE_GAP: usize = 64 << 10;
/// The held-back head of the disk.
const HEAD_LEN: u64 = MIB;
/// Decode-and-write threads beside the reader. Three on two cores: while one waits in an O_DIRECT write,
/// two decode (measured faster than two workers).
const WORKERS: usize = 3;
/// Decoded or compressed chunks in flight between the reader and the workers.
const QUEUE_DEPTH: usize = 6;
const PROGRESS_EVERY: u64 = 64 * MIB;
const STEP: &str = "write";
/// Step the packer reports reading the disk in.
const PACK_STEP: &str = "read";

/// What [`pack_raw_disk`] produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDiskInfo {
    pub disk_size: u64,
    pub chunk_size: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Bytes of the whole packed stream (manifest included).
    pub compressed_size: u64,
}

/// What [`write_raw_disk`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawWriteStats {
    pub disk_size: u64,
    pub bytes_written: u64,
    pub bytes_skipped_zero: u64,
    pub compressed_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct ChunkEntry {
    frame_len: u32,
    zero: bool,
}

#[derive(Debug)]
struct Manifest {
    chunk_size: u64,
    disk_size: u64,
    chunks: Vec<ChunkEntry>,
}

impl Manifest {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MANIFEST_FIXED + MANIFEST_ENTRY * self.chunks.len());
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.frame_len.to_le_bytes());
            out.push(if chunk.zero { FLAG_ZERO } else { 0 });
        }
        out
    }

    fn decode(payload: &[u8]) -> Result<Self, PipelineError> {
        let corrupt = |reason: String| PipelineError::CorruptImage { reason };
        if payload.len() < MANIFEST_FIXED || &payload[..8] != MANIFEST_MAGIC {
            return Err(corrupt("manifest header is missing".into()));
        }
        let u64_at = |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        let (chunk_size, disk_size, count) = (u64_at(8), u64_at(16), u64_at(24));
        if !chunk_size.is_power_of_two() || !(MIB..=64 * MIB).contains(&chunk_size) {
            return Err(corrupt(format!("unsupported chunk size {chunk_size}")));
        }
        if disk_size == 0 || count != disk_size.div_ceil(chunk_size) {
            return Err(corrupt(format!("{count} chunks do not cover a disk of {disk_size} bytes")));
        }
        let entries = &payload[MANIFEST_FIXED..];
        if entries.len() as u64 != count * MANIFEST_ENTRY as u64 {
            return Err(corrupt(format!(
                "manifest holds {} bytes of entries for {count} chunks",
                entries.len()
            )));
        }
        let max_frame = zstd_safe::compress_bound(chunk_size as usize) as u32;
        let chunks = entries
            .chunks_exact(MANIFEST_ENTRY)
            .enumerate()
            .map(|(i, e)| {
                let frame_len = u32::from_le_bytes(e[..4].try_into().expect("4 bytes"));
                if frame_len == 0 || frame_len > max_frame {
                    return Err(corrupt(format!("chunk {i} has an impossible frame length {frame_len}")));
                }
                Ok(ChunkEntry { frame_len, zero: e[4] & FLAG_ZERO != 0 })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { chunk_size, disk_size, chunks })
    }
}

/// Whether a block holds only zero bytes; compares eight bytes at a time so the loop vectorises.
fn is_zero(block: &[u8]) -> bool {
    // Data blocks almost always differ from zero in their first bytes: answer those without a full scan.
    if block.iter().take(16).any(|&b| b != 0) {
        return false;
    }
    let mut words = block.chunks_exact(64);
    let any = words.by_ref().fold(0u64, |acc, w| {
        acc | w.chunks_exact(8).fold(0u64, |a, b| a | u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    });
    any == 0 && words.remainder().iter().all(|&b| b == 0)
}

/// Pack the disk (regular file or block device) at `src` into a raw-disk image on `out` (see the module
/// docs), compressing chunks on worker threads at zstd `level`.
pub fn pack_raw_disk(src: &Path, out: &mut impl Write, level: i32) -> Result<RawDiskInfo, PipelineError> {
    pack_raw_disk_with(src, out, level, &Progress::none(), None)
}

/// [`pack_raw_disk`], reporting the bytes read in step `read` and stopping with [`PipelineError::Cancelled`]
/// between batches of chunks once `cancel` is set (nothing is written to `out` before the whole disk is read).
pub fn pack_raw_disk_with(
    src: &Path,
    out: &mut impl Write,
    level: i32,
    progress: &Progress,
    cancel: Option<&CancelToken>,
) -> Result<RawDiskInfo, PipelineError> {
    let src_err = |context: &str| {
        let context = format!("{context} {}", src.display());
        move |source| PipelineError::Io { context, source }
    };
    let mut disk = File::open(src).map_err(src_err("opening disk image"))?;
    let disk_size = disk.seek(SeekFrom::End(0)).map_err(src_err("measuring disk image"))?;
    if disk_size == 0 {
        return Err(PipelineError::CorruptImage { reason: format!("{} is empty", src.display()) });
    }
    let count = disk_size.div_ceil(CHUNK_SIZE);
    let spool_err =
        |context: &'static str| move |source| PipelineError::Io { context: context.into(), source };
    let mut spool = io::BufWriter::new(tempfile::tempfile().map_err(spool_err("creating pack spool file"))?);
    let mut chunks = Vec::with_capacity(count as usize);
    // Frame of a full all-zero chunk, compressed once and reused.
    let zero_frame: OnceLock<Vec<u8>> = OnceLock::new();
    const BATCH: u64 = 16;
    let mut batch_start = 0;
    progress.report(PACK_STEP, 0, disk_size, "reading the disk");
    while batch_start < count {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(PipelineError::Cancelled);
        }
        let batch_end = (batch_start + BATCH).min(count);
        let next = AtomicU64::new(batch_start);
        let mut done: Vec<(u64, Vec<u8>, bool)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..WORKERS)
                .map(|_| {
                    s.spawn(|| -> Result<Vec<(u64, Vec<u8>, bool)>, PipelineError> {
                        let compressor_err =
                            |source| PipelineError::Io { context: "creating zstd compressor".into(), source };
                        let mut compressor = zstd::bulk::Compressor::new(level).map_err(compressor_err)?;
                        // Per-frame checksums catch a corrupt chunk at decode time, before the blob digest can.
                        compressor
                            .set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                            .map_err(compressor_err)?;
                        let mut buf = vec![0u8; CHUNK_SIZE as usize];
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= batch_end {
                                return Ok(out);
                            }
                            let offset = i * CHUNK_SIZE;
                            let len = CHUNK_SIZE.min(disk_size - offset) as usize;
                            disk.read_exact_at(&mut buf[..len], offset).map_err(|source| {
                                PipelineError::Io {
                                    context: format!("reading {} at offset {offset}", src.display()),
                                    source,
                                }
                            })?;
                            let data = &buf[..len];
                            let zero = is_zero(data);
                            let mut compress = |data: &[u8]| {
                                compressor.compress(data).map_err(|source| PipelineError::Io {
                                    context: format!("compressing chunk {i}"),
                                    source,
                                })
                            };
                            let frame = match zero_frame.get() {
                                Some(frame) if zero && len as u64 == CHUNK_SIZE => frame.clone(),
                                _ => {
                                    let frame = compress(data)?;
                                    if zero && len as u64 == CHUNK_SIZE {
                                        let _ = zero_frame.set(frame.clone());
                                    }
                                    frame
                                }
                            };
                            out.push((i, frame, zero));
                        }
                    })
                })
                .collect();
            let mut all = Vec::new();
            for worker in workers {
                all.extend(worker.join().expect("pack worker panicked")?);
            }
            Ok::<_, PipelineError>(all)
        })?;
        done.sort_unstable_by_key(|(i, _, _)| *i);
        for (_, frame, zero) in done {
            spool.write_all(&frame).map_err(spool_err("writing pack spool file"))?;
            chunks.push(ChunkEntry { frame_len: frame.len() as u32, zero });
        }
        batch_start = batch_end;
        progress.report(PACK_STEP, (batch_end * CHUNK_SIZE).min(disk_size), disk_size, "");
    }
    let mut spool = spool.into_inner().map_err(|e| spool_err("writing pack spool file")(e.into_error()))?;
    spool.seek(SeekFrom::Start(0)).map_err(spool_err("rewinding pack spool file"))?;
    let zero_chunks = chunks.iter().filter(|c| c.zero).count() as u64;
    let payload = Manifest { chunk_size: CHUNK_SIZE, disk_size, chunks }.encode();
    let out_err = spool_err("writing packed image");
    let mut header = Vec::with_capacity(8 + payload.len());
    header.extend_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
    header.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    header.extend_from_slice(&payload);
    out.write_all(&header).map_err(out_err)?;
    let frames = io::copy(&mut spool, out).map_err(spool_err("writing packed image"))?;
    out.flush().map_err(spool_err("writing packed image"))?;
    Ok(RawDiskInfo {
        disk_size,
        chunk_size: CHUNK_SIZE,
        chunks: count,
        zero_chunks,
        compressed_size: header.len() as u64 + frames,
    })
}

/// Writes decoded chunks onto the target: skips zero blocks (zeroing them only where the target may hold old
/// data), holds back the head, counts and reports progress. Shared by the worker threads.
struct DiskWriter<'a> {
    target: &'a BlockTarget,
    /// False when the target span already reads as zero (a fresh sparse file): skipped runs need no call.
    zero_needed: bool,
    head: Mutex<AlignedBuf>,
    head_len: u64,
    progress_total: u64,
    progress: &'a Progress,
    written: AtomicU64,
    skipped: AtomicU64,
    done: AtomicU64,
}

impl<'a> DiskWriter<'a> {
    fn new(target: &'a BlockTarget, span: u64, progress_total: u64, progress: &'a Progress) -> Self {
        let head_len = HEAD_LEN.min(span);
        Self {
            target,
            zero_needed: !reads_as_zero(target, span),
            head: Mutex::new(AlignedBuf::new(head_len as usize)),
            head_len,
            progress_total,
            progress,
            written: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            done: AtomicU64::new(0),
        }
    }

    /// Clear the head before anything else is written, so an interrupted write never leaves a bootable mix.
    fn clear_head(&self) -> Result<(), PipelineError> {
        if self.zero_needed {
            self.target
                .zero_range(0, self.head_len)
                .map_err(PipelineError::target("zeroing the target's head"))?;
        }
        Ok(())
    }

    /// Write `data` (decoded disk bytes, starting at an aligned address) at disk `offset`.
    fn write_chunk(&self, offset: u64, data: &[u8]) -> Result<(), PipelineError> {
        let mut pos = 0;
        if offset < self.head_len {
            let n = ((self.head_len - offset) as usize).min(data.len());
            self.head.lock().expect("head lock")[offset as usize..offset as usize + n]
                .copy_from_slice(&data[..n]);
            pos = n;
        }
        let len = data.len();
        let block_end = |p: usize| (p + ZERO_BLOCK).min(len);
        while pos < len {
            let zero_start = pos;
            while pos < len && is_zero(&data[pos..block_end(pos)]) {
                pos = block_end(pos);
            }
            self.skip_zero(offset + zero_start as u64, (pos - zero_start) as u64)?;
            if pos >= len {
                break;
            }
            let data_start = pos;
            let mut data_end;
            loop {
                while pos < len && !is_zero(&data[pos..block_end(pos)]) {
                    pos = block_end(pos);
                }
                data_end = pos;
                let gap_start = pos;
                while pos < len && pos - gap_start < MERGE_GAP && is_zero(&data[pos..block_end(pos)]) {
                    pos = block_end(pos);
                }
                if pos >= len || pos - gap_start >= MERGE_GAP {
                    break;
                }
            }
            let at = offset + data_start as u64;
            self.target
                .write_at(&data[data_start..data_end], at)
                .map_err(PipelineError::target("writing image data to the target"))?;
            self.written.fetch_add((data_end - data_start) as u64, Ordering::Relaxed);
            pos = data_end;
        }
        self.chunk_done(len as u64);
        Ok(())
    }

    fn skip_zero(&self, offset: u64, len: u64) -> Result<(), PipelineError> {
        if len == 0 {
            return Ok(());
        }
        if self.zero_needed {
            self.target
                .zero_range(offset, len)
                .map_err(PipelineError::target("zeroing a zero run on the target"))?;
        }
        self.skipped.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// A run of whole all-zero chunks.
    fn zero_span(&self, offset: u64, len: u64) -> Result<(), PipelineError> {
        self.skip_zero(offset, len)?;
        self.chunk_done(len);
        Ok(())
    }

    fn chunk_done(&self, len: u64) {
        let before = self.done.fetch_add(len, Ordering::Relaxed);
        let after = before + len;
        if before / PROGRESS_EVERY != after / PROGRESS_EVERY {
            self.progress.report(STEP, after, self.progress_total, "");
        }
    }

    /// Write the held-back head (after the digest matched).
    fn write_head(&self) -> Result<(), PipelineError> {
        let head = self.head.lock().expect("head lock");
        self.target
            .write_at(&head[..self.head_len as usize], 0)
            .map_err(PipelineError::target("writing the image head to the target"))?;
        self.written.fetch_add(self.head_len, Ordering::Relaxed);
        Ok(())
    }
}

/// Whether `[0, span)` of the target already reads as zero: a regular file with no data there (fresh, sparse).
fn reads_as_zero(target: &BlockTarget, span: u64) -> bool {
    if target.kind() != TargetKind::File {
        return false;
    }
    match nix::unistd::lseek(target.file(), 0, nix::unistd::Whence::SeekData) {
        Ok(data) => data as u64 >= span,
        Err(nix::errno::Errno::ENXIO) => true,
        Err(_) => false,
    }
}

/// First error raised by any thread of a write; setting it stops the others.
#[derive(Default)]
struct Failure {
    stop: AtomicBool,
    first: Mutex<Option<PipelineError>>,
}

impl Failure {
    fn set(&self, e: PipelineError) {
        self.first.lock().expect("failure lock").get_or_insert(e);
        self.stop.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    fn take(&self) -> Option<PipelineError> {
        self.first.lock().expect("failure lock").take()
    }
}

/// Write a raw-disk image read from `blob` onto `target`, verifying the blob's sha256 against
/// `expected_sha256`. Accepts the packed format (manifest + per-chunk frames, decoded on worker threads) and any
/// plain zstd, gzip or uncompressed raw disk (decoded sequentially). On any failure after writing began, the
/// target's first MiB is zeroed.
pub fn write_raw_disk(
    blob: impl Read + Send,
    expected_sha256: &str,
    target: &BlockTarget,
    progress: &Progress,
) -> Result<RawWriteStats, PipelineError> {
    let mut input = BufReader::with_capacity(256 << 10, HashingReader::new(blob));
    let mut peek = Vec::with_capacity(32);
    (&mut input)
        .take(32)
        .read_to_end(&mut peek)
        .map_err(|e| PipelineError::from_io("reading the image", e))?;
    if peek.is_empty() {
        return Err(PipelineError::CorruptImage { reason: "the image is empty".into() });
    }
    let packed =
        peek.len() >= 16 && peek[..4] == SKIPPABLE_MAGIC.to_le_bytes() && &peek[8..16] == MANIFEST_MAGIC;
    let expected = expected_sha256.to_ascii_lowercase();
    let result = if packed {
        write_packed(peek, input, &expected, target, progress)
    } else {
        write_stream(peek, input, &expected, target, progress)
    };
    match result {
        Ok(stats) => Ok(stats),
        Err(Outcome::Untouched(e)) => Err(e),
        Err(Outcome::Started(e)) => {
            if let Err(zero_err) = target.zero_head() {
                tracing::error!(target = %target.path().display(), error = %zero_err, "zeroing the head after a failed image write");
            }
            Err(e)
        }
    }
}

/// A failed write: whether the target was touched (and its head must be zeroed).
enum Outcome {
    Untouched(PipelineError),
    Started(PipelineError),
}

enum Job {
    Frame { offset: u64, len: usize, frame: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

fn write_packed<R: Read + Send>(
    peek: Vec<u8>,
    input: BufReader<HashingReader<R>>,
    expected: &str,
    target: &BlockTarget,
    progress: &Progress,
) -> Result<RawWriteStats, Outcome> {
    let read_err = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => PipelineError::Truncated { what: "raw-disk image".into() },
        _ => PipelineError::from_io("reading the image", e),
    };
    let payload_len = u32::from_le_bytes(peek[4..8].try_into().expect("4 bytes")) as usize;
    if payload_len > MANIFEST_MAX {
        return Err(Outcome::Untouched(PipelineError::CorruptImage {
            reason: format!("manifest of {payload_len} bytes is too large"),
        }));
    }
    let mut input = Cursor::new(peek[8..].to_vec()).chain(input);
    let mut payload = vec![0u8; payload_len];
    input.read_exact(&mut payload).map_err(|e| Outcome::Untouched(read_err(e)))?;
    let manifest = Manifest::decode(&payload).map_err(Outcome::Untouched)?;
    if manifest.disk_size > target.size() {
        return Err(Outcome::Untouched(PipelineError::TooLarge { limit: target.size() }));
    }
    let disk_size = manifest.disk_size;
    let writer = DiskWriter::new(target, disk_size, disk_size, progress);
    progress.report(STEP, 0, disk_size, "writing raw-disk image");
    writer.clear_head().map_err(Outcome::Started)?;

    let failure = Failure::default();
    let (jobs_tx, jobs_rx) = sync_channel::<Job>(QUEUE_DEPTH);
    let jobs_rx = Mutex::new(jobs_rx);
    let (spare_tx, spare_rx) = sync_channel::<Vec<u8>>(QUEUE_DEPTH + WORKERS + 1);
    let chunk_size = manifest.chunk_size as usize;
    let read_result = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| s.spawn(|| decode_worker(&jobs_rx, &spare_tx, chunk_size, &writer, &failure)))
            .collect();
        let result = read_frames(&mut input, &manifest, &jobs_tx, &spare_rx, &failure);
        drop(jobs_tx);
        join_all(workers);
        result
    });
    if let Err(e) = read_result {
        return Err(Outcome::Started(read_err_or(e, &failure)));
    }
    if let Some(e) = failure.take() {
        return Err(Outcome::Started(e));
    }
    let (_, hashing) = input.into_inner();
    let compressed_bytes = hashing.get_ref().bytes_read();
    let actual = hashing.into_inner().finish();
    finish(&writer, expected, actual, disk_size, compressed_bytes)
}

/// The reader's error, unless a worker failed first (then the reader only saw the shutdown).
fn read_err_or(e: PipelineError, failure: &Failure) -> PipelineError {
    failure.take().unwrap_or(e)
}

/// Check the digest, then write the head and sync.
fn finish(
    writer: &DiskWriter<'_>,
    expected: &str,
    actual: String,
    disk_size: u64,
    compressed_bytes: u64,
) -> Result<RawWriteStats, Outcome> {
    if actual != expected {
        return Err(Outcome::Started(PipelineError::DigestMismatch {
            expected: expected.to_string(),
            actual,
        }));
    }
    writer.write_head().map_err(Outcome::Started)?;
    writer.target.sync().map_err(|e| Outcome::Started(PipelineError::target("syncing the target")(e)))?;
    writer.progress.report(STEP, disk_size, writer.progress_total.max(disk_size), "raw-disk image written");
    Ok(RawWriteStats {
        disk_size,
        bytes_written: writer.written.load(Ordering::Relaxed),
        bytes_skipped_zero: writer.skipped.load(Ordering::Relaxed),
        compressed_bytes,
    })
}

/// Read every chunk's frame in order (hashing it), queue non-zero frames for the workers, coalesce all-zero
/// chunks into zero jobs, and require the end of the stream after the last frame.
fn read_frames(
    input: &mut impl BufRead,
    manifest: &Manifest,
    jobs: &SyncSender<Job>,
    spare: &Receiver<Vec<u8>>,
    failure: &Failure,
) -> Result<(), PipelineError> {
    let read_err = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => PipelineError::Truncated { what: "raw-disk image".into() },
        _ => PipelineError::from_io("reading the image", e),
    };
    let mut zero_run: Option<(u64, u64)> = None;
    let mut scratch = Vec::new();
    let send = |job: Job| jobs.send(job).is_ok();
    for (i, chunk) in manifest.chunks.iter().enumerate() {
        if failure.stopped() {
            return Ok(());
        }
        let offset = i as u64 * manifest.chunk_size;
        let len = manifest.chunk_size.min(manifest.disk_size - offset);
        if chunk.zero {
            // Hashed but never decoded.
            scratch.resize(chunk.frame_len as usize, 0);
            input.read_exact(&mut scratch).map_err(read_err)?;
            zero_run = match zero_run {
                Some((start, run)) if start + run == offset => Some((start, run + len)),
                Some((start, run)) => {
                    if !send(Job::Zero { offset: start, len: run }) {
                        return Ok(());
                    }
                    Some((offset, len))
                }
                None => Some((offset, len)),
            };
            continue;
        }
        if let Some((start, run)) = zero_run.take()
            && !send(Job::Zero { offset: start, len: run })
        {
            return Ok(());
        }
        let mut frame = spare.try_recv().unwrap_or_default();
        frame.resize(chunk.frame_len as usize, 0);
        input.read_exact(&mut frame).map_err(read_err)?;
        if !send(Job::Frame { offset, len: len as usize, frame }) {
            return Ok(());
        }
    }
    if let Some((start, run)) = zero_run.take() {
        send(Job::Zero { offset: start, len: run });
    }
    let rest = input.fill_buf().map_err(read_err)?;
    if !rest.is_empty() {
        return Err(PipelineError::TrailingData { what: "raw-disk image".into() });
    }
    Ok(())
}

fn decode_worker(
    jobs: &Mutex<Receiver<Job>>,
    spare: &SyncSender<Vec<u8>>,
    chunk_size: usize,
    writer: &DiskWriter<'_>,
    failure: &Failure,
) {
    let mut dctx = DCtx::create();
    let mut buf = AlignedBuf::new(chunk_size);
    loop {
        let job = match jobs.lock().expect("job queue lock").recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        // After a failure keep draining so the reader never blocks on a full queue.
        if failure.stopped() {
            continue;
        }
        let result = match job {
            Job::Zero { offset, len } => writer.zero_span(offset, len),
            Job::Frame { offset, len, frame } => {
                let decoded = dctx.decompress(&mut buf.spare_mut()[..len], &frame);
                let _ = spare.try_send(frame);
                match decoded {
                    Ok(n) if n == len => writer.write_chunk(offset, &buf.spare_mut()[..len]),
                    Ok(n) => Err(PipelineError::CorruptImage {
                        reason: format!("chunk at offset {offset} decodes to {n} bytes instead of {len}"),
                    }),
                    Err(code) => Err(PipelineError::CorruptImage {
                        reason: format!(
                            "chunk at offset {offset} does not decode: {}",
                            zstd_safe::get_error_name(code)
                        ),
                    }),
                }
            }
        };
        if let Err(e) = result {
            failure.set(e);
        }
    }
}

/// A plain compressed (or uncompressed) raw disk: the blob is read and hashed on a feeder thread, decoded
/// sequentially here into aligned chunks, and the chunks are zero-scanned and written by worker threads.
fn write_stream<R: Read + Send>(
    peek: Vec<u8>,
    input: BufReader<HashingReader<R>>,
    expected: &str,
    target: &BlockTarget,
    progress: &Progress,
) -> Result<RawWriteStats, Outcome> {
    let limit = target.size();
    // A zstd frame header may declare the content size: refuse an oversized image before writing.
    if stream::sniff(&peek) == stream::Compression::Zstd
        && let Ok(Some(size)) = zstd_safe::get_frame_content_size(&peek)
        && size > limit
    {
        return Err(Outcome::Untouched(PipelineError::TooLarge { limit }));
    }
    let writer = DiskWriter::new(target, limit, limit, progress);
    progress.report(STEP, 0, limit, "writing raw-disk image");
    writer.clear_head().map_err(Outcome::Started)?;

    let failure = Failure::default();
    let (feeder, reader) = stream::channel_reader();
    let (jobs_tx, jobs_rx) = sync_channel::<(u64, AlignedBuf)>(QUEUE_DEPTH);
    let jobs_rx = Mutex::new(jobs_rx);
    // Chunk buffers are made as the stream needs them, up to this many (a small image needs one or two),
    // and come back through the free list once written.
    const BUFFERS: usize = QUEUE_DEPTH + WORKERS + 1;
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(BUFFERS);
    let decoded_total = AtomicUsize::new(0);
    let outcome = std::thread::scope(|s| {
        let feed = s.spawn(move || {
            let (prefix, rest) = (Cursor::new(peek), input);
            feeder.feed(prefix.chain(rest))
        });
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                s.spawn(|| {
                    loop {
                        let (offset, buf) = match jobs_rx.lock().expect("job queue lock").recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        };
                        if !failure.stopped()
                            && let Err(e) = writer.write_chunk(offset, &buf)
                        {
                            failure.set(e);
                        }
                        let _ = free_tx.send(buf);
                    }
                })
            })
            .collect();
        let result = (|| -> Result<(), PipelineError> {
            let decoded = stream::decoder(reader)?;
            let mut decoded = LimitedReader::new(decoded, limit);
            let (mut offset, mut made) = (0u64, 0);
            loop {
                if failure.stopped() {
                    return Ok(());
                }
                let mut buf = match free_rx.try_recv() {
                    Ok(buf) => buf,
                    Err(TryRecvError::Empty) if made < BUFFERS => {
                        made += 1;
                        AlignedBuf::new(CHUNK_SIZE as usize)
                    }
                    Err(TryRecvError::Empty) => match free_rx.recv() {
                        Ok(buf) => buf,
                        Err(_) => return Ok(()),
                    },
                    Err(TryRecvError::Disconnected) => return Ok(()),
                };
                let n = fill(&mut decoded, buf.spare_mut())
                    .map_err(|e| PipelineError::from_io("decompressing the image", e))?;
                if n == 0 {
                    return Ok(());
                }
                buf.set_len(n);
                decoded_total.fetch_add(n, Ordering::Relaxed);
                if jobs_tx.send((offset, buf)).is_err() {
                    return Ok(());
                }
                offset += n as u64;
            }
        })();
        drop(jobs_tx);
        join_all(workers);
        let (digest, bytes) = feed.join().expect("feeder thread panicked");
        (result, digest, bytes)
    });
    let (result, actual, compressed_bytes) = outcome;
    if let Err(e) = result {
        return Err(Outcome::Started(read_err_or(e, &failure)));
    }
    if let Some(e) = failure.take() {
        return Err(Outcome::Started(e));
    }
    let disk_size = decoded_total.load(Ordering::Relaxed) as u64;
    if disk_size == 0 {
        return Err(Outcome::Started(PipelineError::CorruptImage {
            reason: "the image decodes to nothing".into(),
        }));
    }
    finish(&writer, expected, actual, disk_size, compressed_bytes)
}

/// Join the writer threads explicitly: a scope only waits for their closures, and a thread still running
/// its thread-local destructors after the scope ends would outlive the write.
fn join_all(workers: Vec<std::thread::ScopedJoinHandle<'_, ()>>) {
    for w in workers {
        if let Err(panic) = w.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Read until `buf` is full or the stream ends.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
