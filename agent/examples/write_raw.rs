//! Pack a raw disk, or write a raw-disk image onto a target (for measuring the write path).
//!
//! ```text
//! write_raw pack DISK OUT.zst [LEVEL]
//! write_raw write BLOB TARGET SHA256 [SIZE]   (SIZE creates or grows a file target)
//! ```

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use gridforge_agent::block::{BlockTarget, TargetOptions};
use gridforge_agent::pipeline::{pack_raw_disk, write_raw_disk};
use gridforge_common::progress::Progress;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let start = Instant::now();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["pack", disk, out, rest @ ..] => {
            let level = rest.first().map(|l| l.parse()).transpose().context("zstd level")?.unwrap_or(3);
            let mut out = BufWriter::new(File::create(out).with_context(|| format!("creating {out}"))?);
            let info = pack_raw_disk(Path::new(disk), &mut out, level)?;
            println!("{info:?} in {:.3} s", start.elapsed().as_secs_f64());
        }
        ["write", blob, target, sha, rest @ ..] => {
            let create_size = rest.first().map(|s| s.parse()).transpose().context("target size")?;
            let target =
                BlockTarget::open(Path::new(target), &TargetOptions { create_size, ..Default::default() })?;
            let blob = File::open(blob).with_context(|| format!("opening {blob}"))?;
            let stats = write_raw_disk(blob, sha, &target, &Progress::none())?;
            let secs = start.elapsed().as_secs_f64();
            println!("{stats:?} in {secs:.3} s ({:.0} MB/s of disk)", stats.disk_size as f64 / secs / 1e6);
        }
        _ => bail!("usage: write_raw pack DISK OUT [LEVEL] | write_raw write BLOB TARGET SHA256 [SIZE]"),
    }
    Ok(())
}
