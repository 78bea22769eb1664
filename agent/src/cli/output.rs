//! How the CLI shows things: a progress bar on a terminal, plain lines otherwise, JSON lines with `--json`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gridforge_agent::image::index::IndexEntry;
use gridforge_agent::provision::{BaseEntry, BaseInfo};
use gridforge_common::error_chain;
use gridforge_common::progress::{Progress, ProgressEvent};
use gridforge_proto::v1::{Filesystem, JobEvent, ProvisionResult, partition::Role};
use indicatif::ProgressBar;

fn now() -> pbjson_types::Timestamp {
    gridforge_agent::node::timestamp(std::time::SystemTime::now())
}

pub struct Output {
    json: bool,
}

const MIB: u64 = 1 << 20;

impl Output {
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// A progress handle that renders events for the current output mode.
    pub fn progress(&self) -> Progress {
        if self.json {
            let seq = Mutex::new(0u64);
            return Progress::new(move |ev: &ProgressEvent| {
                let mut seq = seq.lock().expect("progress lock");
                let event = JobEvent {
                    seq: *seq,
                    step: ev.step.to_string(),
                    bytes_done: ev.bytes_done,
                    bytes_total: ev.bytes_total,
                    message: ev.message.clone(),
                    time: Some(now()),
                    ..Default::default()
                };
                *seq += 1;
                println!("{}", serde_json::to_string(&event).expect("event serializes"));
            });
        }
        if std::io::stderr().is_terminal() {
            let bar = Mutex::new((None::<ProgressBar>, ""));
            return Progress::new(move |ev: &ProgressEvent| {
                let mut state = bar.lock().expect("progress lock");
                if !ev.message.is_empty() {
                    if let Some(b) = state.0.take() {
                        b.finish();
                    }
                    eprintln!("{:>9}  {}", ev.step, ev.message);
                    return;
                }
                if state.0.is_none() || state.1 != ev.step {
                    if let Some(b) = state.0.take() {
                        b.finish();
                    }
                    let b = gridforge_common::progress::byte_bar(ev.bytes_total, ev.step.to_string());
                    *state = (Some(b), ev.step);
                }
                if let Some(b) = &state.0 {
                    b.set_position(ev.bytes_done);
                    if ev.bytes_total != 0 && ev.bytes_done >= ev.bytes_total {
                        b.finish();
                    }
                }
            });
        }
        // Plain lines for logs: step changes, messages, and byte progress at most every two seconds.
        let last = Mutex::new((Instant::now() - Duration::from_secs(10), ""));
        Progress::new(move |ev: &ProgressEvent| {
            let mut last = last.lock().expect("progress lock");
            if !ev.message.is_empty() {
                eprintln!("{}: {}", ev.step, ev.message);
                return;
            }
            let done = ev.bytes_total != 0 && ev.bytes_done >= ev.bytes_total;
            if last.1 != ev.step || done || last.0.elapsed() >= Duration::from_secs(2) {
                *last = (Instant::now(), ev.step);
                if ev.bytes_total == 0 {
                    eprintln!("{}: {} MiB", ev.step, ev.bytes_done / MIB);
                } else {
                    eprintln!(
                        "{}: {} / {} MiB ({}%)",
                        ev.step,
                        ev.bytes_done / MIB,
                        ev.bytes_total / MIB,
                        ev.bytes_done * 100 / ev.bytes_total
                    );
                }
            }
        })
    }

    pub fn keygen(&self, path: &Path, public: &str) {
        if self.json {
            println!("{}", serde_json::json!({"private_key": path, "public_key": public}));
        } else {
            eprintln!("wrote {} (private, keep it secret) and {}.pub", path.display(), path.display());
            println!("{public}");
        }
    }

    pub fn bases(&self, bases: &[BaseEntry]) {
        for b in bases {
            if self.json {
                let v = serde_json::json!({"base": b.info, "path": b.path, "clones": b.clones});
                println!("{v}");
            } else {
                println!(
                    "{}  {}  {} MiB  {} clone(s)  {}",
                    b.info.id,
                    b.info.images.join(" + "),
                    b.info.disk_size_bytes >> 20,
                    b.clones.len(),
                    b.path.display()
                );
                for c in &b.clones {
                    println!("    {}", c.display());
                }
            }
        }
    }

    pub fn base_deleted(&self, info: &BaseInfo) {
        if self.json {
            println!("{}", serde_json::json!({"deleted": info}));
        } else {
            println!("deleted base {} ({})", info.id, info.images.join(" + "));
        }
    }

    pub fn packed(&self, entry: &IndexEntry) {
        if self.json {
            println!("{}", serde_json::to_string(entry).expect("entry serializes"));
        } else {
            println!(
                "packed {} {} ({:?}): {} MiB -> {} MiB, sha256 {}",
                entry.name,
                entry.version,
                entry.format,
                entry.uncompressed_size / MIB,
                entry.compressed_size / MIB,
                entry.sha256
            );
        }
    }

    pub fn provision_result(&self, result: &ProvisionResult) {
        if self.json {
            println!("{}", serde_json::to_string(result).expect("result serializes"));
        } else {
            println!("provisioned {}", result.disk_path);
            if !result.base_id.is_empty() {
                println!("cloned from base {} ({})", result.base_id, result.clone_method);
            }
            self.table(result);
        }
    }

    pub fn inspect(&self, table: &ProvisionResult) {
        if self.json {
            println!("{}", serde_json::to_string(table).expect("table serializes"));
        } else {
            self.table(table);
        }
    }

    fn table(&self, t: &ProvisionResult) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "disk {}: {} MiB, {}-byte sectors, GPT disk GUID {}",
            t.disk_path,
            t.disk_size_bytes / MIB,
            t.sector_size,
            t.disk_guid.to_uppercase()
        );
        let _ = writeln!(
            out,
            "{:>2} {:>10} {:>10}  {:<5} {:<12} {:<5} {:<38} {:<16} PARTUUID",
            "#", "START MiB", "SIZE MiB", "ROLE", "NAME", "FS", "FS UUID", "FS LABEL"
        );
        for p in &t.partitions {
            let role = Role::try_from(p.role).map(|r| r.as_str_name()).unwrap_or("?");
            let fs = match Filesystem::try_from(p.filesystem) {
                Ok(Filesystem::Vfat) => "vfat",
                Ok(Filesystem::Ext4) => "ext4",
                Ok(Filesystem::Swap) => "swap",
                _ => "-",
            };
            let _ = writeln!(
                out,
                "{:>2} {:>10} {:>10}  {:<5} {:<12} {:<5} {:<38} {:<16} {}",
                p.number,
                p.offset_bytes / MIB,
                p.size_bytes / MIB,
                if role == "ROLE_UNSPECIFIED" { "-" } else { role },
                p.label,
                fs,
                if p.fs_uuid.is_empty() { "-" } else { &p.fs_uuid },
                if p.fs_label.is_empty() { "-" } else { &p.fs_label },
                p.partition_guid
            );
        }
        if !t.image_digests.is_empty() {
            let _ = writeln!(out, "image sha256: {}", t.image_digests.join(", "));
        }
    }

    /// Report a failure: the whole cause chain on stderr, or a structured error line with `--json`.
    pub fn error(&self, e: &anyhow::Error) {
        let provision = e.downcast_ref::<gridforge_agent::provision::ProvisionError>();
        if self.json {
            let err = match provision {
                Some(p) => p.to_proto(),
                None => gridforge_proto::v1::Error { message: error_chain(e.as_ref()), ..Default::default() },
            };
            println!("{}", serde_json::json!({ "error": err }));
        } else {
            eprintln!("error: {}", error_chain(e.as_ref()));
            if provision.is_some_and(|p| p.target_zeroed) {
                eprintln!("the target's first MiB was zeroed: the disk will not boot half-written");
            }
            if provision.is_some_and(|p| p.target_removed) {
                eprintln!("the target file this provision created was removed");
            }
        }
    }
}
