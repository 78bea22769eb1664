//! The bytes a pass writes: zeroes, or a seekable ChaCha8 keystream. [`write_chunks`] generates and writes
//! on several threads at once (generating, writing and reading back overlap across chunks);
//! [`for_each_chunk`] generates on two threads into aligned buffers while the caller reads back and compares
//! the previous chunk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use chacha20::ChaCha8Rng;
use chacha20::rand_core::{Rng, SeedableRng};
use zeroize::Zeroizing;

use crate::block::AlignedBuf;

/// Name of the generator, as written in reports.
pub const PRNG_NAME: &str = "ChaCha8 keystream (chacha20 crate), 256-bit key from the OS random source";

/// Chunk of one write or read: large enough for full device throughput, small enough for prompt cancellation.
pub const CHUNK: usize = 4 << 20;

/// Generator threads: the keystream runs at several GB/s per core, so two keep ahead of any disk here.
const GENERATORS: usize = 2;

/// Threads of [`write_chunks`], each generating and writing its own chunks: up to this many writes in
/// flight, while the others generate.
pub const WRITERS: usize = 4;

/// The content a range must hold after a pass.
#[derive(Clone)]
pub enum Pattern {
    Zero,
    /// The keystream of this key; byte `n` of the target holds byte `n` of the stream (position is absolute,
    /// so any range can be regenerated independently).
    Stream(Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Zero => f.write_str("Zero"),
            Pattern::Stream(_) => f.write_str("Stream(<key withheld>)"),
        }
    }
}

impl Pattern {
    /// A fresh keystream keyed from the OS random source.
    pub fn random() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(&mut key[..]);
        Pattern::Stream(key)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Pattern::Zero => "zeroes (0x00)",
            Pattern::Stream(_) => "pseudorandom (ChaCha8 keystream)",
        }
    }

    /// Fill `buf` with the pattern's bytes for target offset `offset` (a multiple of 4).
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        match self {
            Pattern::Zero => buf.fill(0),
            Pattern::Stream(key) => {
                let mut rng = ChaCha8Rng::from_seed(**key);
                rng.set_word_pos(u128::from(offset / 4));
                rng.fill_bytes(buf);
            }
        }
    }
}

/// Hand `consume` every chunk of `[start, end)` in order, each filled with `pattern`'s bytes for its offset.
/// Keystream chunks are generated ahead on [`GENERATORS`] threads. `consume` returning an error stops
/// everything and returns that error.
pub fn for_each_chunk<E: Send>(
    pattern: &Pattern,
    start: u64,
    end: u64,
    mut consume: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let chunks: Vec<(u64, usize)> = chunk_ranges(start, end).collect();
    match pattern {
        Pattern::Zero => {
            let zeroes = AlignedBuf::new(CHUNK.min(chunks.first().map_or(0, |c| c.1)));
            for &(offset, len) in &chunks {
                consume(offset, &zeroes[..len])?;
            }
            Ok(())
        }
        Pattern::Stream(_) => std::thread::scope(|scope| {
            let mut full_rx = Vec::new();
            let mut empty_tx = Vec::new();
            for worker in 0..GENERATORS {
                let (ftx, frx) = mpsc::sync_channel::<(u64, AlignedBuf)>(1);
                let (etx, erx) = mpsc::channel::<AlignedBuf>();
                for _ in 0..2 {
                    etx.send(AlignedBuf::new(CHUNK)).expect("fresh channel");
                }
                full_rx.push(frx);
                empty_tx.push(etx);
                let mine: Vec<(u64, usize)> =
                    chunks.iter().copied().skip(worker).step_by(GENERATORS).collect();
                scope.spawn(move || {
                    for (offset, len) in mine {
                        let Ok(mut buf) = erx.recv() else { return };
                        buf.set_len(len);
                        pattern.fill(offset, &mut buf);
                        if ftx.send((offset, buf)).is_err() {
                            return;
                        }
                    }
                });
            }
            // Dropping the channel ends on return (error or not) lets the generators stop.
            let mut run = move || {
                for (i, _) in chunks.iter().enumerate() {
                    let worker = i % GENERATORS;
                    let (offset, buf) = full_rx[worker].recv().expect("generator thread ended early");
                    consume(offset, &buf)?;
                    let _ = empty_tx[worker].send(buf);
                }
                Ok(())
            };
            run()
        }),
    }
}

/// Write every chunk of `[start, end)`, filled with `pattern`'s bytes for its offset, by calling `write` on
/// [`WRITERS`] threads (each generates its chunk and then writes it, so generation and several writes
/// overlap). `done` is called on the calling thread for each chunk in order, once it and every chunk before
/// it have been written: it sees a growing prefix of `[start, end)`. An error from either stops everything
/// (writes in flight finish first) and is returned; the first in chunk order wins. When it stops, chunks
/// after the last one `done` saw may have been written too, at most [`WRITERS`] of them.
pub fn write_chunks<E: Send>(
    pattern: &Pattern,
    start: u64,
    end: u64,
    write: impl Fn(u64, &[u8]) -> Result<(), E> + Sync,
    mut done: impl FnMut(u64, usize) -> Result<(), E>,
) -> Result<(), E> {
    let chunks: Vec<(u64, usize)> = chunk_ranges(start, end).collect();
    let Some(&(_, first_len)) = chunks.first() else { return Ok(()) };
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut results = Vec::new();
        for worker in 0..WRITERS.min(chunks.len()) {
            // A rendezvous: a worker starts its next chunk only once its last one is taken, in order, so no
            // write runs more than WRITERS chunks past the written prefix.
            let (tx, rx) = mpsc::sync_channel::<Result<(), E>>(0);
            results.push(rx);
            let mine: Vec<(u64, usize)> = chunks.iter().copied().skip(worker).step_by(WRITERS).collect();
            let (write, stop) = (&write, &stop);
            scope.spawn(move || {
                // Zeroed at allocation: the zero pattern needs no filling.
                let mut buf = AlignedBuf::new(first_len);
                for (offset, len) in mine {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    buf.set_len(len);
                    if let Pattern::Stream(_) = pattern {
                        pattern.fill(offset, &mut buf);
                    }
                    if tx.send(write(offset, &buf)).is_err() {
                        return;
                    }
                }
            });
        }
        let workers = results.len();
        let mut run = || {
            for (i, &(offset, len)) in chunks.iter().enumerate() {
                results[i % workers].recv().expect("writer thread ended early")?;
                done(offset, len)?;
            }
            Ok(())
        };
        let result = run();
        // Workers waiting to hand over a result see the channel closed; the others see `stop`.
        stop.store(true, Ordering::Relaxed);
        drop(results);
        result
    })
}

/// `[start, end)` as (offset, length) chunks of at most [`CHUNK`] bytes.
pub fn chunk_ranges(start: u64, end: u64) -> impl Iterator<Item = (u64, usize)> {
    (start..end).step_by(CHUNK).map(move |offset| (offset, (end - offset).min(CHUNK as u64) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_seekable_and_chunking_does_not_change_it() {
        let pattern = Pattern::Stream(Zeroizing::new([7u8; 32]));
        let mut whole = vec![0u8; 3 * CHUNK + 4096];
        pattern.fill(0, &mut whole);
        let mut joined = Vec::new();
        for_each_chunk::<()>(&pattern, 0, whole.len() as u64, |offset, chunk| {
            assert_eq!(offset as usize, joined.len());
            joined.extend_from_slice(chunk);
            Ok(())
        })
        .unwrap();
        assert!(joined == whole);
        let mut tail = vec![0u8; 8192];
        pattern.fill(CHUNK as u64 + 4096, &mut tail);
        assert!(tail[..] == whole[CHUNK + 4096..CHUNK + 4096 + 8192]);
    }

    #[test]
    fn parallel_writes_cover_the_range_once_and_report_it_in_order() {
        let pattern = Pattern::Stream(Zeroizing::new([9u8; 32]));
        let (start, end) = (8192u64, 9 * CHUNK as u64 + 12288);
        let mut want = vec![0u8; (end - start) as usize];
        pattern.fill(start, &mut want);
        let written = std::sync::Mutex::new(vec![0u8; want.len()]);
        let mut reported = Vec::new();
        write_chunks::<()>(
            &pattern,
            start,
            end,
            |offset, chunk| {
                let at = (offset - start) as usize;
                written.lock().unwrap()[at..at + chunk.len()].copy_from_slice(chunk);
                Ok(())
            },
            |offset, len| {
                reported.push((offset, len));
                Ok(())
            },
        )
        .unwrap();
        assert!(written.into_inner().unwrap() == want);
        assert_eq!(reported, chunk_ranges(start, end).collect::<Vec<_>>());

        // An error stops it: nothing is reported past the failed chunk, and that error is returned.
        let fail_at = start + 3 * CHUNK as u64;
        let mut last = 0;
        let err = write_chunks(
            &Pattern::Zero,
            start,
            end,
            |offset, chunk| {
                assert!(chunk.iter().all(|&b| b == 0));
                if offset == fail_at { Err(offset) } else { Ok(()) }
            },
            |offset, _| {
                last = offset;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!((err, last), (fail_at, fail_at - CHUNK as u64));
    }
}
