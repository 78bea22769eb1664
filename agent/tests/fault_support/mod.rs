//! A disk file that misbehaves on purpose, for fault-injection tests: a one-file FUSE file system served
//! from a thread of the test, over a sparse backing file. The agent opens `FaultDisk::path()` like any
//! target; the kernel hands every write to [`serve`], which fails the ones a [`Fault`] names (an errno for
//! writes touching an offset, ENOSPC past an offset) or completes only part of them (short writes). Nothing
//! in the agent knows: the faults come back from `pwrite(2)` exactly as a failing disk's would.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What goes wrong with writes.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The first `times` writes that touch byte `offset` fail with `errno`; later ones succeed.
    FailAt { offset: u64, errno: i32, times: u32 },
    /// Every write that ends past `offset` fails with ENOSPC (a device that is full from there on).
    FullFrom { offset: u64 },
    /// Every write that starts below `below` completes at most `max` bytes (at least one): the caller must
    /// write the rest.
    ShortWrites { max: u32, below: u64 },
}

/// Counts of what the file system saw.
#[derive(Debug, Default)]
pub struct Counters {
    pub writes: AtomicU64,
    pub failed: AtomicU64,
    pub short: AtomicU64,
}

/// The mounted fault disk; unmounted on drop.
pub struct FaultDisk {
    dir: tempfile::TempDir,
    backing: PathBuf,
    mnt: PathBuf,
    pub counters: Arc<Counters>,
    fault: Arc<Mutex<Fault>>,
    server: Option<JoinHandle<()>>,
}

const NAME: &str = "disk";
const ROOT: u64 = 1;
const FILE: u64 = 2;
const MAX_WRITE: u32 = 128 << 10;

// Opcodes and structure sizes of the FUSE protocol (linux/fuse.h, 7.31).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const RELEASEDIR: u32 = 29;
const INTERRUPT: u32 = 36;
const DESTROY: u32 = 38;
const BATCH_FORGET: u32 = 42;
const IN_HEADER: usize = 40;
const ATTR_LEN: usize = 88;
const SETATTR_SIZE: u32 = 1 << 3;

impl FaultDisk {
    /// A `size`-byte disk of zeros with `fault`.
    pub fn new(size: u64, fault: Fault) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("backing");
        File::create(&backing).unwrap().set_len(size).unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let dev = OpenOptions::new().read(true).write(true).open("/dev/fuse").expect("/dev/fuse");
        let options = format!("fd={},rootmode=40000,user_id=0,group_id=0,allow_other", dev.as_raw_fd());
        let (source, fstype, target, data) = (
            CString::new("gridforge-fault").unwrap(),
            CString::new("fuse").unwrap(),
            CString::new(mnt.to_str().unwrap()).unwrap(),
            CString::new(options).unwrap(),
        );
        // SAFETY: all four pointers are NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(rc, 0, "mounting the fault file system: {}", std::io::Error::last_os_error());
        let counters = Arc::new(Counters::default());
        let fault = Arc::new(Mutex::new(fault));
        let server = {
            let file = OpenOptions::new().read(true).write(true).open(&backing).unwrap();
            let (counters, fault) = (counters.clone(), fault.clone());
            std::thread::spawn(move || serve(dev, file, size, &counters, &fault))
        };
        Self { dir, backing, mnt, counters, fault, server: Some(server) }
    }

    /// The disk as the agent sees it.
    pub fn path(&self) -> PathBuf {
        self.mnt.join(NAME)
    }

    /// Change the fault (e.g. none, for a clean read-back).
    pub fn set_fault(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    /// The bytes `[offset, offset + len)` as stored.
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        File::open(&self.backing).unwrap().read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    /// Fill `[0, len)` with `byte` (a previous system on the disk).
    pub fn fill_head(&self, byte: u8, len: usize) {
        OpenOptions::new()
            .write(true)
            .open(&self.backing)
            .unwrap()
            .write_all_at(&vec![byte; len], 0)
            .unwrap();
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }
}

impl Drop for FaultDisk {
    fn drop(&mut self) {
        let target = CString::new(self.mnt.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn attr(ino: u64, size: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(ATTR_LEN);
    let mode: u32 = if ino == ROOT { libc::S_IFDIR | 0o755 } else { libc::S_IFREG | 0o600 };
    for v in [ino, size, size.div_ceil(512), 0, 0, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    let nlink: u32 = if ino == ROOT { 2 } else { 1 };
    for v in [0u32, 0, 0, mode, nlink, 0, 0, 0, 4096, 0] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a
}

fn attr_out(ino: u64, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0u64.to_le_bytes()); // attr_valid: never cache, sizes change
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend(attr(ino, size));
    out
}

/// The write's outcome under `fault`: Ok(bytes completed) or Err(errno).
fn judge(fault: &mut Fault, offset: u64, len: u32) -> Result<u32, i32> {
    let end = offset + u64::from(len);
    match fault {
        Fault::FailAt { offset: at, errno, times } if *times > 0 && (offset..end).contains(at) => {
            *times -= 1;
            Err(*errno)
        }
        Fault::FullFrom { offset: at } if end > *at => Err(libc::ENOSPC),
        Fault::ShortWrites { max, below } if offset < *below => Ok(len.min((*max).max(1))),
        _ => Ok(len),
    }
}

/// Answers the kernel's requests until the file system is unmounted.
fn serve(mut dev: File, disk: File, mut size: u64, counters: &Counters, fault: &Mutex<Fault>) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 4096];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if e.raw_os_error() == Some(libc::ENOENT) || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                continue;
            }
            // ENODEV: unmounted.
            Err(_) => return,
        };
        let req = &buf[..n];
        let (opcode, unique, node) = (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16));
        let body = &req[IN_HEADER..];
        let reply: Result<Vec<u8>, i32> = match opcode {
            INIT => {
                let mut out = Vec::new();
                for v in [7u32, 31, u32_at(body, 8), 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&16u16.to_le_bytes()); // max_background
                out.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
                out.extend_from_slice(&MAX_WRITE.to_le_bytes());
                out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                out.extend_from_slice(&32u16.to_le_bytes()); // max_pages
                out.resize(64, 0);
                Ok(out)
            }
            LOOKUP => {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                if node == ROOT && name == NAME.as_bytes() {
                    let mut out = Vec::new();
                    for v in [FILE, 0, 0, 0] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    out.extend_from_slice(&[0u8; 8]);
                    out.extend(attr(FILE, size));
                    Ok(out)
                } else {
                    Err(libc::ENOENT)
                }
            }
            GETATTR => Ok(attr_out(node, if node == FILE { size } else { 0 })),
            SETATTR => {
                let valid = u32_at(body, 0);
                if node == FILE && valid & SETATTR_SIZE != 0 {
                    size = u64_at(body, 16);
                    disk.set_len(size).map(|()| attr_out(node, size)).map_err(|_| libc::EIO)
                } else {
                    Ok(attr_out(node, if node == FILE { size } else { 0 }))
                }
            }
            OPEN | OPENDIR => {
                let mut out = vec![0u8; 16];
                out[..8].copy_from_slice(&node.to_le_bytes());
                Ok(out)
            }
            READ => {
                let (offset, len) = (u64_at(body, 8), u32_at(body, 16));
                let len = u64::from(len).min(size.saturating_sub(offset)) as usize;
                let mut data = vec![0u8; len];
                disk.read_exact_at(&mut data, offset).map(|()| data).map_err(|_| libc::EIO)
            }
            WRITE => {
                let (offset, len) = (u64_at(body, 8), u32_at(body, 16));
                counters.writes.fetch_add(1, Ordering::Relaxed);
                match judge(&mut fault.lock().unwrap(), offset, len) {
                    Ok(done) => {
                        if done < len {
                            counters.short.fetch_add(1, Ordering::Relaxed);
                        }
                        let data = &body[40..40 + done as usize];
                        disk.write_all_at(data, offset).map_err(|_| libc::EIO).map(|()| {
                            size = size.max(offset + u64::from(done));
                            let mut out = done.to_le_bytes().to_vec();
                            out.extend_from_slice(&[0u8; 4]);
                            out
                        })
                    }
                    Err(errno) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        Err(errno)
                    }
                }
            }
            STATFS => {
                let mut out = Vec::new();
                for v in [size / 4096, 0, 0, 2, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [4096u32, 255, 4096, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.resize(80, 0);
                Ok(out)
            }
            FSYNC => disk.sync_data().map(|()| Vec::new()).map_err(|_| libc::EIO),
            RELEASE | RELEASEDIR | FLUSH => Ok(Vec::new()),
            FORGET | BATCH_FORGET | INTERRUPT => continue,
            DESTROY => Ok(Vec::new()),
            _ => Err(libc::ENOSYS),
        };
        let (error, payload) = match reply {
            Ok(p) => (0, p),
            Err(errno) => (-errno, Vec::new()),
        };
        let mut out = Vec::with_capacity(16 + payload.len());
        out.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
        out.extend_from_slice(&error.to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
        out.extend(payload);
        // ENOENT: the request was interrupted meanwhile; nothing to do.
        let _ = dev.write_all(&out);
        if opcode == DESTROY {
            return;
        }
    }
}
