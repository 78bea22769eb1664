mod common;
mod wipe_support;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Loop;
use gridforge_agent::wipe::safety::{self, Refusal};
use gridforge_agent::wipe::{self, CancelToken, Method, Verify, WipeError, WipePolicy, WipeRequest};
use gridforge_common::progress::Progress;
use wipe_support::*;

fn refusal(req: &WipeRequest) -> Refusal {
    match wipe::wipe(req, &Progress::none(), &CancelToken::new()) {
        Err(WipeError::Refused { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_mounted_loop_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("fs.img");
    std::fs::File::create(&backing).unwrap().set_len(32 * MIB).unwrap();
    let lo = Loop::attach(&backing, 512);
    common::run("mkfs.ext4", &["-q", "-F", lo.path()]);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    common::run("mount", &[lo.path(), mnt.to_str().unwrap()]);
    let _guard = Mounted(mnt.clone());
    std::fs::write(mnt.join("tenant.txt"), SECRET).unwrap();

    let reason = refusal(&WipeRequest::new(&lo.dev, Method::Zero, Verify::None));
    let Refusal::Mounted { mount_point, .. } = &reason else { panic!("{reason:?}") };
    assert_eq!(Path::new(mount_point), mnt);
    // The file backing it is refused as well.
    let reason = refusal(&WipeRequest::new(&backing, Method::Zero, Verify::None));
    assert!(matches!(reason, Refusal::LoopBacking { .. }), "{reason:?}");
    assert_eq!(std::fs::read(mnt.join("tenant.txt")).unwrap(), SECRET);
}

#[test]
fn the_device_holding_root_is_refused() {
    let (major, minor) = safety::root_device().expect("/ in /proc/self/mountinfo");
    let node = std::fs::read_dir("/dev").unwrap().flatten().map(|e| e.path()).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| {
            m.file_type().is_block_device()
                && (libc::major(m.rdev()), libc::minor(m.rdev())) == (major, minor)
        })
    });
    let Some(node) = node else {
        eprintln!(
            "notice: / is on {major}:{minor}, which has no node in /dev here; root refusal not exercised"
        );
        return;
    };
    // Only the check itself: never hand the root device to the wipe.
    let reason = safety::check(&node, &WipePolicy::default(), false).unwrap_err();
    assert!(
        matches!(reason, Refusal::HoldsRoot { .. }),
        "{} must be refused as root: {reason:?}",
        node.display()
    );
    assert!(reason.to_string().contains("root"));
}

#[test]
fn a_file_outside_the_pool_is_refused_and_inside_it_allowed() {
    let pool = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("disk.img");
    planted_file(&outside, 16 * MIB);
    let policy = WipePolicy { pool: vec![pool.path().to_path_buf()] };
    let req =
        WipeRequest { policy: policy.clone(), ..WipeRequest::new(&outside, Method::Zero, Verify::None) };
    let reason = refusal(&req);
    assert!(matches!(reason, Refusal::OutsidePool { .. }), "{reason:?}");
    assert!(secret_survives(&outside));

    let inside = pool.path().join("disk.img");
    planted_file(&inside, 16 * MIB);
    let req = WipeRequest { policy, ..WipeRequest::new(&inside, Method::Zero, Verify::Full) };
    assert!(wipe::wipe(&req, &Progress::none(), &CancelToken::new()).unwrap().verified());

    let devices = WipePolicy { pool: vec![PathBuf::from("/dev/nonexistent*")] };
    let lo = Loop::attach(&outside, 512);
    assert!(matches!(safety::check(&lo.dev, &devices, false), Err(Refusal::OutsidePool { .. })));
    let loops = WipePolicy { pool: vec![PathBuf::from("/dev/loop*")] };
    safety::check(&lo.dev, &loops, false).expect("a loop device matches /dev/loop*");
}
