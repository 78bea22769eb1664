mod wipe_support;

use std::process::Command;

use gridforge_agent::image::sign;
use gridforge_agent::wipe::report::{self, ReportError};
use gridforge_agent::wipe::{Method, Verify};
use wipe_support::*;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridforge-agent"))
}

#[test]
fn signed_report_verifies_and_any_edit_or_other_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    planted_file(&disk, 16 * MIB);
    let key_path = dir.path().join("key");
    let public = sign::keygen(&key_path).unwrap();
    let key = sign::load_signing_key(&key_path).unwrap();
    let mut r = run_wipe(&disk, Method::Zero, Verify::Sample { seed: Some(3) }).report;
    report::sign(&mut r, &key);
    let text = r.to_pretty_json();
    let back = report::verify(&text, &public).expect("intact report verifies");
    assert_eq!(back, r);
    assert_eq!(back.tool.version, env!("CARGO_PKG_VERSION"));
    assert!(back.started.ends_with('Z') && back.started.len() == 20, "{}", back.started);
    // Whitespace is not part of the canonical form.
    report::verify(&serde_json::to_string(&r).unwrap(), &public).expect("compact form verifies");

    for (from, to) in [
        ("\"operator\": \"", "\"operator\": \"x"),
        ("\"nist_level\": \"clear\"", "\"nist_level\": \"purge\""),
        ("\"result\": \"passed\"", "\"result\": \"failed\""),
        (&format!("\"size_bytes\": {}", 16 * MIB), &format!("\"size_bytes\": {}", 32 * MIB)),
    ] {
        assert!(text.contains(from), "{from} in report");
        let edited = text.replacen(from, to, 1);
        let err = report::verify(&edited, &public).unwrap_err();
        assert!(matches!(err, ReportError::BadSignature), "{from}: {err:?}");
    }
    let added = text.replacen("\"operator\"", "\"note\": \"x\", \"operator\"", 1);
    assert!(matches!(report::verify(&added, &public), Err(ReportError::Parse(_))));

    let other = sign::keygen(&dir.path().join("other")).unwrap();
    assert!(matches!(report::verify(&text, &other), Err(ReportError::OtherSigner { .. })));
    let mut unsigned = r.clone();
    unsigned.signature = None;
    assert!(matches!(report::verify(&unsigned.to_pretty_json(), &public), Err(ReportError::Unsigned)));
}

#[test]
fn cli_wipes_writes_a_signed_report_and_checks_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("disk.img");
    planted_file(&disk, 16 * MIB);
    assert!(agent().args(["image", "keygen", "--out"]).arg(d.join("key")).output().unwrap().status.success());
    assert!(
        agent().args(["image", "keygen", "--out"]).arg(d.join("other")).output().unwrap().status.success()
    );
    let out = agent()
        .args(["wipe", "--method", "passes:random,zero", "--verify", "full", "--operator", "alice", "--disk"])
        .arg(&disk)
        .arg("--report")
        .arg(d.join("report.json"))
        .arg("--signing-key")
        .arg(d.join("key"))
        .arg("--pool")
        .arg(d)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verification full: passed"));
    assert!(all_zero(&disk));

    let check = |report: &str, key: &str| {
        agent().args(["report", "verify"]).arg(d.join(report)).arg("--key").arg(d.join(key)).output().unwrap()
    };
    let ok = check("report.json", "key.pub");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("operator alice"));
    assert!(!check("report.json", "other.pub").status.success(), "another key must not verify");

    let text = std::fs::read_to_string(d.join("report.json")).unwrap();
    std::fs::write(d.join("edited.json"), text.replacen("\"alice\"", "\"mallory\"", 1)).unwrap();
    let bad = check("edited.json", "key.pub");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not verify"));
}
