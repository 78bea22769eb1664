//! Fault injection in the write pipeline: provision jobs onto disks whose writes fail at chosen offsets,
//! come back short, or run out of space (a FUSE disk from `fault_support`, and a real full tmpfs). A failed
//! job names the fault and leaves the target in the documented safe state, its first MiB zeroed; short
//! writes are completed, so the job succeeds and the disk holds exactly the image.

mod common;
mod fault_support;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use fault_support::{Fault, FaultDisk};
use gridforge_agent::block::MIB;
use gridforge_agent::image::{Kind, Trust, pack};
use gridforge_agent::provision::{ImageSource, ProvisionError, ProvisionRequest, provision};
use gridforge_common::progress::Progress;
use gridforge_proto::v1::{ProvisionMode, VmSpec};

const RAW_MIB: u64 = 16;
const ROOTFS_DISK_MIB: u64 = 128;
const ESP_MIB: u64 = 64;

/// A signed store with a 16 MiB raw disk (a GPT and one partition of pseudo-random bytes) and a small
/// rootfs.
struct Fixture {
    dir: tempfile::TempDir,
    raw: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[3; 32]);
        let store = dir.path().join("store");
        let raw_path = dir.path().join("raw.img");
        std::fs::File::create(&raw_path).unwrap().set_len(RAW_MIB * MIB).unwrap();
        common::run("sgdisk", &["-o", "-n", "1:2048:0", "-t", "1:8300", raw_path.to_str().unwrap()]);
        let mut raw = std::fs::read(&raw_path).unwrap();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for word in raw[MIB as usize..((RAW_MIB - 1) * MIB) as usize].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(&raw_path, &raw).unwrap();
        pack::pack_raw_disk_image(&raw_path, &store, "appliance", "1", &key, 1).unwrap();
        let rootfs = dir.path().join("rootfs");
        common::small_rootfs(&rootfs);
        pack::pack_rootfs(&rootfs, &store, "tiny", "1", Kind::Os, &key, 1).unwrap();
        Self { dir, raw }
    }

    fn request(&self, spec: &str, disk: &Path) -> ProvisionRequest {
        let key = SigningKey::from_bytes(&[3; 32]);
        let spec: VmSpec = serde_json::from_str(spec).unwrap();
        ProvisionRequest {
            spec,
            disk: disk.to_path_buf(),
            images: ImageSource {
                store: self.dir.path().join("store").to_str().unwrap().to_string(),
                trust: Trust::Key(key.verifying_key()),
                cache_dir: self.dir.path().join("cache"),
            },
            work_dir: self.dir.path().join("work"),
            efi_binary: None,
            cancel: None,
            default_mode: ProvisionMode::ProvisionFull,
            bases_dir: self.dir.path().join("bases"),
            clone_fallback: Default::default(),
        }
    }

    fn provision_raw(&self, disk: &Path) -> Result<(), ProvisionError> {
        let spec = format!(
            r#"{{"name":"a","image":{{"name":"appliance","version":"1"}},"disk":{{"size_mib":{RAW_MIB}}}}}"#
        );
        provision(&self.request(&spec, disk), &Progress::none()).map(drop)
    }

    fn provision_rootfs(&self, disk: &Path) -> Result<(), ProvisionError> {
        let spec = format!(
            r#"{{"name":"web-1","image":{{"name":"tiny","version":"1"}},"disk":{{"size_mib":{ROOTFS_DISK_MIB},"partitions":[
            {{"label":"esp","role":"ESP","size_mib":{ESP_MIB},"filesystem":"VFAT"}},
            {{"label":"root","role":"ROOT","filesystem":"EXT4"}}]}}}}"#
        );
        provision(&self.request(&spec, disk), &Progress::none()).map(drop)
    }
}

/// The whole cause chain, as the job reports it.
fn message(e: &ProvisionError) -> String {
    e.to_proto().message
}

/// A disk that held a system: its first 2 MiB are 0x5A.
fn dirty_fault_disk(size_mib: u64, fault: Fault) -> FaultDisk {
    let disk = FaultDisk::new(size_mib * MIB, fault);
    disk.fill_head(0x5A, 2 * MIB as usize);
    disk
}

fn assert_safe(disk: &FaultDisk, e: &ProvisionError, what: &str) {
    assert!(e.target_zeroed, "{what}: the job says the head was not zeroed: {e:?}");
    assert!(disk.read(0, MIB as usize).iter().all(|&b| b == 0), "{what}: the first MiB is not zero");
}

#[test]
fn raw_disk_write_failing_at_an_offset_fails_naming_the_error_and_zeroes_the_head() {
    let f = Fixture::new();
    // In the first data chunk, mid-image at an odd byte, near the end, and the held-back head itself
    // (once: zeroing it afterwards must work).
    let faults =
        [(MIB + 4096, u32::MAX), (5 * MIB + 123, u32::MAX), ((RAW_MIB - 1) * MIB - 1, u32::MAX), (512, 1)];
    for (offset, times) in faults {
        let disk = dirty_fault_disk(RAW_MIB, Fault::FailAt { offset, errno: libc::EIO, times });
        let e = f.provision_raw(&disk.path()).unwrap_err();
        let text = message(&e);
        assert!(text.contains("Input/output error"), "fault at {offset}: {text}");
        assert!(text.contains("writing") && text.contains("at offset"), "fault at {offset}: {text}");
        assert!(disk.counters.failed.load(std::sync::atomic::Ordering::Relaxed) >= 1);
        assert_safe(&disk, &e, &format!("fault at {offset}"));
    }
}

#[test]
fn raw_disk_write_onto_a_disk_that_fills_up_fails_with_enospc_and_zeroes_the_head() {
    let f = Fixture::new();
    for full_from in [2 * MIB, 9 * MIB + 512, (RAW_MIB - 1) * MIB] {
        let disk = dirty_fault_disk(RAW_MIB, Fault::FullFrom { offset: full_from });
        let e = f.provision_raw(&disk.path()).unwrap_err();
        let text = message(&e);
        assert!(text.contains("No space left on device"), "full from {full_from}: {text}");
        assert_safe(&disk, &e, &format!("full from {full_from}"));
    }
}

/// A tmpfs of `size_mib`, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        common::run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs", dir.path().to_str().unwrap()],
        );
        Self { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn raw_disk_write_onto_a_full_tmpfs_fails_with_enospc_and_zeroes_the_head() {
    let f = Fixture::new();
    // The sparse target file is larger than the file system holding it: writing the image fills it up.
    let fs = Tmpfs::mount(8);
    let disk = fs.path("disk.img");
    std::fs::write(&disk, vec![0x5Au8; 2 * MIB as usize]).unwrap();
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(RAW_MIB * MIB).unwrap();
    let e = f.provision_raw(&disk).unwrap_err();
    let text = message(&e);
    assert!(text.contains("No space left on device"), "{text}");
    assert!(e.target_zeroed, "{e:?}");
    let head = std::fs::read(&disk).unwrap();
    assert!(head[..MIB as usize].iter().all(|&b| b == 0), "the first MiB is not zero");
}

#[test]
fn rootfs_provision_failing_in_each_step_fails_naming_the_error_and_zeroes_the_head() {
    let f = Fixture::new();
    // The GPT's backup at the disk's end, then the start of the ESP and of the root partition (where the
    // old signatures are cleared before the file systems are made).
    let faults = [
        ("backup GPT", ROOTFS_DISK_MIB * MIB - 4096),
        ("ESP", MIB + 64 * 1024),
        ("root partition", (ESP_MIB + 1) * MIB + 1024),
    ];
    for (what, offset) in faults {
        let disk =
            dirty_fault_disk(ROOTFS_DISK_MIB, Fault::FailAt { offset, errno: libc::EIO, times: u32::MAX });
        let e = f.provision_rootfs(&disk.path()).unwrap_err();
        let text = message(&e);
        eprintln!("{what}: {}: {text}", e.step);
        // The agent's own writes name the errno; mke2fs reports it in its own words.
        assert!(
            text.contains("Input/output error") || (e.step == "format" && text.contains("mke2fs")),
            "{what}: {text}"
        );
        assert_safe(&disk, &e, what);
    }
}

#[test]
fn short_writes_are_completed_and_the_raw_disk_is_written_exactly() {
    let f = Fixture::new();
    for max in [1000, 4096 + 512, 100 * 1024] {
        let disk = dirty_fault_disk(RAW_MIB, Fault::ShortWrites { max, below: u64::MAX });
        f.provision_raw(&disk.path()).unwrap_or_else(|e| panic!("short writes of {max}: {}", message(&e)));
        assert!(
            disk.counters.short.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "no short write happened"
        );
        assert!(disk.read(0, f.raw.len()) == f.raw, "short writes of {max}: the disk differs from the image");
    }
}

#[test]
fn short_writes_in_the_gpt_and_esp_are_completed() {
    let f = Fixture::new();
    // mke2fs treats a short write as an error of its own, so the root partition writes in full.
    let disk = dirty_fault_disk(ROOTFS_DISK_MIB, Fault::ShortWrites { max: 700, below: (ESP_MIB + 1) * MIB });
    f.provision_rootfs(&disk.path()).unwrap_or_else(|e| panic!("{}", message(&e)));
    assert!(disk.counters.short.load(std::sync::atomic::Ordering::Relaxed) > 0, "no short write happened");
    disk.set_fault(Fault::ShortWrites { max: u32::MAX, below: 0 });
    let image = disk.backing().to_str().unwrap().to_string();
    let v = common::run("sgdisk", &["-v", &image]);
    assert!(v.contains("No problems found"), "sgdisk -v: {v}");
    let esp = common::attach_range(disk.backing(), MIB, ESP_MIB * MIB);
    common::run("fsck.vfat", &["-n", esp.path()]);
}
