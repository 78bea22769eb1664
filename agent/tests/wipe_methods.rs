mod common;
mod wipe_support;

use std::os::unix::fs::FileExt;

use common::{Loop, try_run};
use gridforge_agent::wipe::{self, CancelToken, Method, Resume, Verify, WipeError, WipeRequest};
use gridforge_common::progress::Progress;
use wipe_support::*;

#[test]
fn zero_on_a_file_leaves_only_zeroes_and_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 32 * MIB);
    let outcome = run_wipe(&disk, Method::Zero, Verify::Full);
    assert!(outcome.verified(), "{:?}", outcome.report.verification);
    assert!(all_zero(&disk));
    assert!(!secret_survives(&disk));
    let pass = &outcome.report.sanitization.passes[0];
    assert!(pass.mechanism.starts_with("fallocate"), "{}", pass.mechanism);
    assert!(!pass.notes.is_empty(), "a file zeroed by fallocate must say what that means");
    assert_eq!(outcome.report.sanitization.nist_level, "clear");
    assert_eq!(outcome.report.verification.bytes_checked, 32 * MIB);
}

#[test]
fn zero_write_overwrites_a_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 16 * MIB);
    let outcome = run_wipe(&disk, Method::ZeroWrite, Verify::Sample { seed: Some(7) });
    assert!(outcome.verified());
    assert!(all_zero(&disk));
    assert!(outcome.report.sanitization.passes[0].mechanism.contains("overwrite"));
    let v = &outcome.report.verification;
    assert_eq!(v.sample_seed, Some(7));
    assert!(v.blocks_checked >= 2, "first and last MiB at least: {v:?}");
}

#[test]
fn random_on_a_loop_device_leaves_no_plaintext_and_sample_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    planted_file(&backing, 32 * MIB);
    let lo = Loop::attach(&backing, 4096);
    let outcome = run_wipe(&lo.dev, Method::Random { seed: None }, Verify::Sample { seed: None });
    assert!(outcome.verified(), "{:?}", outcome.report.verification);
    assert!(!secret_survives(&lo.dev));
    let r = &outcome.report;
    assert_eq!(r.device.kind, "block-device");
    assert_eq!(r.device.logical_sector_size, 4096);
    assert_eq!(r.device.size_bytes, 32 * MIB);
    assert!(r.verification.blocks_checked >= 4, "{:?}", r.verification);
    assert!(r.sanitization.prng.as_deref().unwrap().contains("ChaCha8"));
    let text = serde_json::to_string(r).unwrap();
    assert!(!text.contains("seed\":["), "the keystream key must not be in the report");
    // Random data: no long zero runs, and the key is not the all-zero key.
    let data = std::fs::read(&lo.dev).unwrap();
    assert!(data.chunks(4096).all(|c| c.iter().any(|&b| b != 0)));
}

#[test]
fn zero_on_a_loop_device_uses_blkzeroout() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    planted_file(&backing, 16 * MIB);
    let lo = Loop::attach(&backing, 512);
    let outcome = run_wipe(&lo.dev, Method::Zero, Verify::Full);
    assert!(outcome.verified());
    assert_eq!(outcome.report.sanitization.passes[0].mechanism, "BLKZEROOUT (device write-zeroes)");
    assert!(all_zero(&lo.dev));
    assert!(!secret_survives(&backing));
}

#[test]
fn random_then_zero_passes_leave_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 16 * MIB);
    let outcome = run_wipe(&disk, Method::parse("passes:random,zero-write").unwrap(), Verify::Full);
    assert!(outcome.verified());
    assert!(all_zero(&disk));
    let passes = &outcome.report.sanitization.passes;
    assert_eq!(passes.len(), 2);
    assert_eq!(passes[0].method, "random");
    assert_eq!(outcome.report.bytes_written, 32 * MIB);
}

#[test]
fn discard_is_refused_where_it_does_not_guarantee_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 16 * MIB);
    let err = wipe::wipe(
        &WipeRequest::new(&disk, Method::Discard, Verify::Full),
        &Progress::none(),
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(matches!(err, WipeError::DiscardUnsafe { .. }), "{err:?}");
    let lo = Loop::attach(&disk, 512);
    let err = wipe::wipe(
        &WipeRequest::new(&lo.dev, Method::Discard, Verify::Full),
        &Progress::none(),
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("discard_zeroes_data"), "{err}");
    assert!(secret_survives(&disk), "nothing is written when a pass is refused");
}

#[test]
fn crypto_erase_destroys_a_luks2_volume() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("luks.img");
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, "correct horse battery staple").unwrap();
    planted_file(&disk, 32 * MIB);
    let (d, k) = (disk.to_str().unwrap(), keyfile.to_str().unwrap());
    common::luks_format_fast(d, k, &[]);
    common::run("cryptsetup", &["isLuks", d]);
    common::run("cryptsetup", &["open", "--test-passphrase", "--key-file", k, d]);

    let outcome = run_wipe(&disk, Method::CryptoErase, Verify::Full);
    assert!(outcome.verified(), "{:?}", outcome.report.verification);
    let r = &outcome.report;
    assert_eq!(r.sanitization.nist_level, "purge");
    assert!(r.sanitization.level_conditions.as_deref().unwrap().contains("always"));
    let end = r.sanitization.passes[0].range_end;
    assert!(end >= 2 * 16384 + 4096, "headers and keyslots: {end}");
    let data = std::fs::read(&disk).unwrap();
    assert!(data[..end as usize].iter().all(|&b| b == 0), "key material zeroed");
    assert!(!data.windows(4).any(|w| w == b"LUKS" || w == b"SKUL"));
    let (ok, _, _) = try_run("cryptsetup", &["isLuks", d]);
    assert!(!ok, "cryptsetup still sees LUKS after crypto-erase");
    let (ok, _, _) = try_run("cryptsetup", &["open", "--test-passphrase", "--key-file", k, d]);
    assert!(!ok, "the old passphrase still opens the volume");
}

#[test]
fn crypto_erase_followed_by_zero_and_refused_on_plain_data() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    planted_file(&disk, 16 * MIB);
    let err = wipe::wipe(
        &WipeRequest::new(&disk, Method::parse("passes:crypto-erase,zero").unwrap(), Verify::Full),
        &Progress::none(),
        &CancelToken::new(),
    )
    .unwrap_err();
    assert!(matches!(err, WipeError::NotLuks { .. }), "{err:?}");
    assert!(err.to_string().contains("LUKS magic"), "{err}");
    assert!(secret_survives(&disk), "a refused wipe writes nothing");
}

#[test]
fn a_byte_changed_after_the_wipe_fails_verification_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 16 * MIB);
    let outcome = run_wipe(&disk, Method::Random { seed: None }, Verify::Full);
    assert!(outcome.verified());
    let none = (Progress::none(), CancelToken::new());
    wipe::verify_target(&disk, &outcome.expected, Verify::Full, &none.0, &none.1)
        .expect("untouched disk verifies");

    let offset = 5 * MIB + 123;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
    file.sync_all().unwrap();
    let err = wipe::verify_target(&disk, &outcome.expected, Verify::Full, &none.0, &none.1).unwrap_err();
    assert!(matches!(err, WipeError::Mismatch { offset: o, .. } if o == offset), "{err:?}");
    assert!(err.to_string().contains(&offset.to_string()));

    // The sample always includes the first MiB.
    file.write_all_at(b"X", 100).unwrap();
    file.sync_all().unwrap();
    let err =
        wipe::verify_target(&disk, &outcome.expected, Verify::Sample { seed: Some(1) }, &none.0, &none.1)
            .unwrap_err();
    assert!(matches!(err, WipeError::Mismatch { offset: 100, .. }), "{err:?}");
}

/// Cancel once `after` bytes are done.
fn cancelling(after: u64) -> (Progress, CancelToken) {
    let cancel = CancelToken::new();
    let c = cancel.clone();
    let progress = Progress::new(move |ev| {
        if ev.step == wipe::STEP_WIPE && ev.bytes_done >= after {
            c.cancel();
        }
    });
    (progress, cancel)
}

#[test]
fn cancel_stops_early_and_resume_finishes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 32 * MIB);
    let (progress, cancel) = cancelling(8 * MIB);
    let req = WipeRequest::new(&disk, Method::ZeroWrite, Verify::Full);
    let err = wipe::wipe(&req, &progress, &cancel).unwrap_err();
    let WipeError::Cancelled { pass: 0, at } = err else { panic!("expected a cancellation, got {err:?}") };
    assert!((8 * MIB..32 * MIB).contains(&at), "{at}");
    let data = std::fs::read(&disk).unwrap();
    assert!(data[..at as usize].iter().all(|&b| b == 0), "everything before the offset is wiped");
    // Writes in flight when it stopped may have gone past the offset, but not far: the last 8 MiB are as
    // they were.
    let untouched =
        |from: usize| data[from..].iter().enumerate().all(|(i, &b)| b == SECRET[(from + i) % SECRET.len()]);
    assert!(untouched(24 * MIB as usize), "the wipe stopped near the offset");

    let resumed = WipeRequest { resume: Resume { pass: 0, offset: at }, ..req };
    let outcome = wipe::wipe(&resumed, &Progress::none(), &CancelToken::new()).unwrap();
    assert!(outcome.verified(), "zeroes before the offset are verified too");
    assert_eq!(outcome.report.sanitization.passes[0].resumed_from, Some(at));
    assert_eq!(outcome.report.bytes_written, 32 * MIB - at);
    assert!(all_zero(&disk));
}

#[test]
fn a_resumed_random_pass_lists_what_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 32 * MIB);
    let (progress, cancel) = cancelling(8 * MIB);
    let req = WipeRequest::new(&disk, Method::Random { seed: None }, Verify::Full);
    let Err(WipeError::Cancelled { at, .. }) = wipe::wipe(&req, &progress, &cancel) else {
        panic!("not cancelled")
    };
    let resumed = WipeRequest { resume: Resume { pass: 0, offset: at }, ..req };
    let outcome = wipe::wipe(&resumed, &Progress::none(), &CancelToken::new()).unwrap();
    assert!(outcome.verified());
    assert_eq!(outcome.report.verification.unverified_ranges, vec![[0, at]]);
    assert_eq!(outcome.report.verification.bytes_checked, 32 * MIB - at);
    assert!(!secret_survives(&disk));
}

#[test]
fn a_random_pass_checks_the_same_sample_while_writing_as_a_check_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 64 * MIB);
    let steps = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = steps.clone();
    let progress = Progress::new(move |ev| seen.lock().unwrap().push(ev.step));
    let req = WipeRequest::new(&disk, Method::Random { seed: None }, Verify::Sample { seed: Some(42) });
    let outcome = wipe::wipe(&req, &progress, &CancelToken::new()).unwrap();
    assert!(outcome.verified(), "{:?}", outcome.report.verification);
    assert!(!secret_survives(&disk));
    let v = &outcome.report.verification;
    assert_eq!((v.sample_seed, v.result.as_str()), (Some(42), "passed"));
    // 10% of 64 blocks rounded up, and the first and last.
    assert!((7..=9).contains(&v.blocks_checked), "{v:?}");
    assert_eq!(v.bytes_checked, v.blocks_checked * MIB);
    assert!(steps.lock().unwrap().contains(&wipe::STEP_VERIFY), "the check is reported");

    let none = (Progress::none(), CancelToken::new());
    let after =
        wipe::verify_target(&disk, &outcome.expected, Verify::Sample { seed: Some(42) }, &none.0, &none.1)
            .unwrap();
    assert_eq!((after.blocks_checked, after.bytes_checked), (v.blocks_checked, v.bytes_checked));
}
