//! Progress events: every long step reports bytes done and total through a `Progress` handle.

use std::io::{self, Read};
use std::sync::Arc;

/// One progress report from a pipeline step. An event with a message marks a moment (start, end, a warning);
/// byte progress comes with an empty message. `bytes_total` 0 means the total is not known (a stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgressEvent {
    /// Pipeline step: allocate, fetch, partition, build, format, encrypt, define, report.
    pub step: &'static str,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub message: String,
}

type Sink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// A cheap, clonable handle that steps report progress through. `Progress::none()` discards events.
#[derive(Clone, Default)]
pub struct Progress {
    sink: Option<Sink>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("attached", &self.sink.is_some()).finish()
    }
}

impl Progress {
    pub fn none() -> Self {
        Self::default()
    }

    pub fn new(sink: impl Fn(&ProgressEvent) + Send + Sync + 'static) -> Self {
        Self { sink: Some(Arc::new(sink)) }
    }

    pub fn report(&self, step: &'static str, bytes_done: u64, bytes_total: u64, message: impl Into<String>) {
        if let Some(sink) = &self.sink {
            sink(&ProgressEvent { step, bytes_done, bytes_total, message: message.into() });
        }
    }

    /// A message without byte counts (start or end of a step).
    pub fn note(&self, step: &'static str, message: impl Into<String>) {
        self.report(step, 0, 0, message);
    }
}

/// Read adapter that reports the bytes read through it, at most every `every` bytes.
pub struct ProgressReader<R> {
    inner: R,
    progress: Progress,
    step: &'static str,
    done: u64,
    total: u64,
    last: u64,
    every: u64,
}

impl<R: Read> ProgressReader<R> {
    pub fn new(inner: R, progress: Progress, step: &'static str, total: u64) -> Self {
        Self { inner, progress, step, done: 0, total, last: 0, every: 8 << 20 }
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= self.every || (n == 0 && self.done != self.last) {
            self.last = self.done;
            self.progress.report(self.step, self.done, self.total, "");
        }
        Ok(n)
    }
}

/// A terminal progress bar for one step's bytes, prefixed with the step's name. A total of 0 means unknown
/// (a stream being unpacked): a spinner with the bytes so far.
pub fn byte_bar(total: u64, step: String) -> indicatif::ProgressBar {
    let (bar, template) = if total == 0 {
        (indicatif::ProgressBar::no_length(), "{prefix:>9}  {spinner} {bytes} {bytes_per_sec}")
    } else {
        (
            indicatif::ProgressBar::new(total),
            "{prefix:>9}  [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> "),
    );
    bar.set_prefix(step);
    bar
}
