//! Small `Read` adapters, each doing one job: hashing, format sniffing and decompression (with truncation and
//! trailing-data checks), byte limits, and a channel-backed reader that moves blob reading and hashing onto
//! its own thread.

use std::io::{self, BufRead, Cursor, Read};
use std::sync::mpsc::{Receiver, SyncSender};

use sha2::{Digest, Sha256};
use zstd_safe::{DCtx, InBuffer, OutBuffer};

use super::PipelineError;

/// Faults our adapters raise inside `io::Error`, turned back into typed errors by [`PipelineError::from_io`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamFault {
    #[error("{0} stream ended early")]
    Truncated(&'static str),
    #[error("trailing data after the {0} stream")]
    TrailingData(&'static str),
    #[error("stream is larger than {0} bytes")]
    TooLarge(u64),
}

impl StreamFault {
    pub(crate) fn into_io(self) -> io::Error {
        let kind = match self {
            Self::Truncated(_) => io::ErrorKind::UnexpectedEof,
            Self::TrailingData(_) | Self::TooLarge(_) => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    pub(crate) fn into_pipeline_error(self) -> PipelineError {
        match self {
            Self::Truncated(what) => PipelineError::Truncated { what: format!("{what} stream") },
            Self::TrailingData(what) => PipelineError::TrailingData { what: what.to_string() },
            Self::TooLarge(limit) => PipelineError::TooLarge { limit },
        }
    }
}

/// SHA-256 of every byte read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Bytes read (and hashed) so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// The lowercase hex sha256 of everything read.
    pub fn finish(self) -> String {
        self.into_parts().1
    }

    pub fn into_parts(self) -> (R, String) {
        (self.inner, hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Compression of a stream, recognised from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Whether `b` starts a zstd frame or a zstd skippable frame (magic 0x184D2A50..=0x184D2A5F).
fn is_zstd_magic(b: &[u8]) -> bool {
    b.len() >= 4 && (b[..4] == ZSTD_MAGIC || (b[0] & 0xF0 == 0x50 && b[1..4] == [0x2A, 0x4D, 0x18]))
}

/// Recognise the compression from the magic bytes at the start of a stream.
pub fn sniff(peek: &[u8]) -> Compression {
    if is_zstd_magic(peek) {
        Compression::Zstd
    } else if peek.starts_with(&[0x1F, 0x8B]) {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// A reader of the decompressed content of `r`, whose format is sniffed from its magic bytes. The decoder
/// fails with `Truncated` when the stream ends inside a frame or member and with `TrailingData` when anything
/// but the end of the stream follows the last frame or member.
pub fn decoder<R: BufRead + Send + 'static>(mut r: R) -> Result<Box<dyn Read + Send>, PipelineError> {
    let peek = r.fill_buf().map_err(|e| PipelineError::from_io("reading the start of the image", e))?;
    if peek.len() >= 4 || peek.is_empty() {
        let kind = sniff(peek);
        return Ok(boxed_decoder(kind, r));
    }
    // A short first read: collect the magic bytes and put them back in front of the stream.
    let mut prefix = Vec::with_capacity(4);
    (&mut r)
        .take(4)
        .read_to_end(&mut prefix)
        .map_err(|e| PipelineError::from_io("reading the start of the image", e))?;
    let kind = sniff(&prefix);
    Ok(boxed_decoder(kind, Cursor::new(prefix).chain(r)))
}

fn boxed_decoder<R: BufRead + Send + 'static>(kind: Compression, r: R) -> Box<dyn Read + Send> {
    match kind {
        Compression::Zstd => Box::new(ZstdReader::new(r)),
        Compression::Gzip => Box::new(GzipReader::new(r)),
        Compression::None => Box::new(r),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FrameState {
    /// Between frames: the next bytes must be a frame magic or the end of the stream.
    Boundary,
    InFrame,
    Done,
}

/// Streaming zstd decoder over any number of concatenated frames (skippable frames included) that rejects
/// truncation and trailing bytes, which the stock streaming decoder would report only as a corrupt frame.
struct ZstdReader<R> {
    inner: R,
    dctx: DCtx<'static>,
    state: FrameState,
}

impl<R: BufRead> ZstdReader<R> {
    fn new(inner: R) -> Self {
        Self { inner, dctx: DCtx::create(), state: FrameState::Boundary }
    }

    /// Check the next frame's magic and hand it to the decoder context; false at a clean end of stream.
    fn start_frame(&mut self, out: &mut [u8]) -> io::Result<bool> {
        let mut magic = [0u8; 4];
        let mut have = 0;
        while have < 4 {
            let avail = self.inner.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            let n = avail.len().min(4 - have);
            magic[have..have + n].copy_from_slice(&avail[..n]);
            self.inner.consume(n);
            have += n;
        }
        if have == 0 {
            return Ok(false);
        }
        if !is_zstd_magic(&magic[..have]) {
            return Err(StreamFault::TrailingData("zstd").into_io());
        }
        let mut input = InBuffer::around(&magic);
        while input.pos() < magic.len() {
            let mut output = OutBuffer::around(&mut *out);
            self.dctx.decompress_stream(&mut output, &mut input).map_err(zstd_error)?;
        }
        Ok(true)
    }
}

fn zstd_error(code: usize) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {}", zstd_safe::get_error_name(code)))
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                FrameState::Done => return Ok(0),
                FrameState::Boundary => {
                    if self.start_frame(buf)? {
                        self.state = FrameState::InFrame;
                    } else {
                        self.state = FrameState::Done;
                    }
                }
                FrameState::InFrame => {
                    let avail = self.inner.fill_buf()?;
                    let at_eof = avail.is_empty();
                    let mut input = InBuffer::around(avail);
                    let mut output = OutBuffer::around(&mut *buf);
                    let hint = self.dctx.decompress_stream(&mut output, &mut input).map_err(zstd_error)?;
                    let (consumed, produced) = (input.pos(), output.pos());
                    self.inner.consume(consumed);
                    if hint == 0 {
                        self.state = FrameState::Boundary;
                    } else if at_eof && produced == 0 {
                        return Err(StreamFault::Truncated("zstd").into_io());
                    }
                    if produced > 0 {
                        return Ok(produced);
                    }
                }
            }
        }
    }
}

/// Gzip decoder over one or more concatenated members that rejects truncation and trailing non-gzip bytes.
struct GzipReader<R: BufRead> {
    member: Option<flate2::bufread::GzDecoder<R>>,
}

impl<R: BufRead> GzipReader<R> {
    fn new(inner: R) -> Self {
        Self { member: Some(flate2::bufread::GzDecoder::new(inner)) }
    }
}

impl<R: BufRead> Read for GzipReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while let Some(member) = &mut self.member {
            let n = member.read(buf).map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => StreamFault::Truncated("gzip").into_io(),
                _ => e,
            })?;
            if n > 0 {
                return Ok(n);
            }
            // The member ended: what follows must be another member or nothing.
            let mut inner = self.member.take().expect("member present").into_inner();
            let next = inner.fill_buf()?;
            if next.is_empty() {
                return Ok(0);
            }
            if next[0] != 0x1F || next.get(1).is_some_and(|&b| b != 0x8B) {
                return Err(StreamFault::TrailingData("gzip").into_io());
            }
            self.member = Some(flate2::bufread::GzDecoder::new(inner));
        }
        Ok(0)
    }
}

/// Passes at most `limit` bytes and fails with `TooLarge` (instead of stopping quietly) when more arrive.
pub struct LimitedReader<R> {
    inner: R,
    limit: u64,
    count: u64,
}

impl<R: Read> LimitedReader<R> {
    pub fn new(inner: R, limit: u64) -> Self {
        Self { inner, limit, count: 0 }
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(StreamFault::TooLarge(self.limit).into_io());
        }
        Ok(n)
    }
}

/// Size of the pieces the feeder thread reads and hashes.
const FEED_PIECE: usize = 1 << 20;

/// The reading end of a blob that a feeder thread reads and hashes (see [`feed`]): a `'static` `BufRead`
/// that a decoder can own while the blob itself is only borrowed.
pub(crate) struct ChannelReader {
    pieces: Receiver<io::Result<Vec<u8>>>,
    recycle: SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

/// Channel ends for a feeder thread and its [`ChannelReader`].
pub(crate) struct Feeder {
    pieces: SyncSender<io::Result<Vec<u8>>>,
    recycle: Receiver<Vec<u8>>,
}

pub(crate) fn channel_reader() -> (Feeder, ChannelReader) {
    let (pieces_tx, pieces_rx) = std::sync::mpsc::sync_channel(8);
    let (recycle_tx, recycle_rx) = std::sync::mpsc::sync_channel(16);
    let feeder = Feeder { pieces: pieces_tx, recycle: recycle_rx };
    let reader = ChannelReader { pieces: pieces_rx, recycle: recycle_tx, current: Vec::new(), pos: 0 };
    (feeder, reader)
}

impl Feeder {
    /// Read `blob` to its end (or until the reader hangs up), hashing every byte; returns the hex sha256 and
    /// the byte count. Read errors are passed on to the reader.
    pub(crate) fn feed(self, blob: impl Read) -> (String, u64) {
        let mut hashing = HashingReader::new(blob);
        loop {
            let mut piece = self.recycle.try_recv().unwrap_or_default();
            piece.resize(FEED_PIECE, 0);
            match hashing.read(&mut piece) {
                Ok(0) => break,
                Ok(n) => {
                    piece.truncate(n);
                    if self.pieces.send(Ok(piece)).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = self.pieces.send(Err(e));
                    break;
                }
            }
        }
        let bytes = hashing.bytes_read();
        (hashing.finish(), bytes)
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.current.len() {
            match self.pieces.recv() {
                Ok(Ok(piece)) => {
                    let used = std::mem::replace(&mut self.current, piece);
                    self.pos = 0;
                    if used.capacity() > 0 {
                        let _ = self.recycle.try_send(used);
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.current.len());
    }
}
