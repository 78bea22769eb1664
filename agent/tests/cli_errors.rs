//! The errors the CLI prints, provoked one by one with the built binary: each names what failed and says
//! every cause once (no `: `-separated segment of a message repeats).

use std::path::PathBuf;
use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridforge-agent"))
}

/// The error messages a run printed: `error: ...` lines, `{"error": {"message": ...}}` with `--json`, the
/// daemon's ERROR log lines, and the reasons of failed `diagnose` checks.
fn messages(stdout: &str, stderr: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in stdout.lines().chain(stderr.lines()) {
        if let Some(text) = line.strip_prefix("error: ") {
            found.push(text.to_string());
        } else if let Some(reason) = line.strip_prefix("FAIL ") {
            let (_, reason) = reason.trim_start().split_once(' ').unwrap_or(("", reason));
            found.push(reason.trim_start().to_string());
        } else if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
            if let Some(m) = value.pointer("/error/message").and_then(|m| m.as_str()) {
                found.push(m.to_string());
            }
            if value["level"] == "ERROR"
                && let Some(m) = value.pointer("/fields/message").and_then(|m| m.as_str())
            {
                found.push(m.to_string());
            }
        }
    }
    found
}

/// A segment that appears twice in `message`, split at `: `.
fn repeated_segment(message: &str) -> Option<&str> {
    let segments: Vec<&str> = message.split(": ").map(str::trim).collect();
    segments.iter().enumerate().find(|(i, s)| segments[..*i].contains(s)).map(|(_, s)| *s)
}

/// A scratch directory with the files the cases need.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let s = Scratch { dir: tempfile::tempdir().unwrap() };
        s.write("bad.json", "{not json");
        s.write("no-image.json", r#"{"name": "vm1"}"#);
        s.write("garbage.pem", "this is not PEM\n");
        s.write("bad.toml", "listen = 7443\n");
        // A configuration that reads, with TLS files that are not there.
        let root = s.dir.path().display();
        s.write(
            "no-tls.toml",
            &format!(
                "listen = \"127.0.0.1:0\"\nmetrics_listen = \"\"\nstate_dir = \"{root}/state\"\n\
                 cache_dir = \"{root}/cache\"\nwork_dir = \"{root}/work\"\n\n[tls]\nca = \"{root}/ca.pem\"\n\
                 cert = \"{root}/agent.pem\"\nkey = \"{root}/agent.key\"\n\n[libvirt]\nuri = \"\"\n"
            ),
        );
        let rootfs = s.path("rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/hostname"), "x\n").unwrap();
        s.ok(&["image", "keygen", "--out", &s.arg("signing.key")]);
        s.ok(&["pki", "init", "--dir", &s.arg("pki")]);
        s.ok(&["pki", "issue", "--dir", &s.arg("pki"), "--name", "ops"]);
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.path(name), text).unwrap();
    }

    fn ok(&self, args: &[&str]) {
        let out = agent().args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn every_cli_error_says_each_cause_once() {
    let s = Scratch::new();
    let refused = format!("127.0.0.1:{}", closed_port());
    let (pki, key, rootfs) = (s.arg("pki"), s.arg("signing.key"), s.arg("rootfs"));
    let tls = |ca: &str, cert: &str, key: &str| -> Vec<String> {
        ["job", "list", "--server", &refused, "--ca", ca, "--cert", cert, "--key", key]
            .map(String::from)
            .to_vec()
    };
    let (ca_pem, ops_pem, ops_key) =
        (format!("{pki}/ca.pem"), format!("{pki}/ops.pem"), format!("{pki}/ops.key"));
    let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let provision = |spec: &str| {
        owned(&["provision", "--spec", spec, "--disk", "d.img", "--store", "st", "--insecure-images"])
    };
    let pack = |rootfs: &str, key: &str| {
        owned(&[
            "image",
            "pack",
            "--rootfs",
            rootfs,
            "--name",
            "a",
            "--version",
            "1",
            "--store",
            "st",
            "--key",
            key,
        ])
    };

    // (what is provoked, arguments, a text the message must hold)
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("missing config (serve)", owned(&["serve", "--config", "missing.toml"]), "cannot read missing.toml"),
        ("bad config (serve)", owned(&["serve", "--config", "bad.toml"]), "line 1, column 10"),
        ("missing TLS files (serve)", owned(&["serve", "--config", "no-tls.toml"]), "tls.ca: cannot read"),
        ("missing config (diagnose)", owned(&["diagnose", "--config", "missing.toml"]), "missing.toml"),
        ("bad config (diagnose)", owned(&["diagnose", "--config", "bad.toml"]), "invalid type"),
        ("missing spec file", provision("missing.json"), "missing.json"),
        ("bad spec JSON", provision("bad.json"), "bad.json"),
        ("spec without an image", provision("no-image.json"), "image"),
        ("bad spec JSON (--json)", [owned(&["--json"]), provision("bad.json")].concat(), "bad.json"),
        ("missing disk (inspect)", owned(&["inspect", "--disk", "missing.img"]), "missing.img"),
        (
            "missing disk (wipe)",
            owned(&[
                "wipe",
                "--disk",
                "missing.img",
                "--method",
                "zero",
                "--report",
                "r.json",
                "--signing-key",
                &key,
            ]),
            "missing.img",
        ),
        ("unreadable signing key", pack(&rootfs, "missing.key"), "missing.key"),
        ("signing key that is not one", pack(&rootfs, "garbage.pem"), "garbage.pem"),
        ("missing rootfs", pack("missing-dir", &key), "missing-dir"),
        (
            "missing report",
            owned(&["report", "verify", "missing-report.json", "--key", &format!("{key}.pub")]),
            "missing-report.json",
        ),
        ("bad endpoint scheme", owned(&["job", "list", "--server", "ftp://node:1", "--insecure"]), "ftp://"),
        ("empty endpoint", owned(&["job", "list", "--server", "", "--insecure"]), "empty"),
        ("refused connection", owned(&["job", "list", "--server", &refused, "--insecure"]), "refused"),
        (
            "refused connection (--json)",
            owned(&["--json", "job", "list", "--server", &refused, "--insecure"]),
            "refused",
        ),
        ("refused connection over TLS", tls(&ca_pem, &ops_pem, &ops_key), "refused"),
        ("missing CA file", tls("missing-ca.pem", &ops_pem, &ops_key), "missing-ca.pem"),
        ("CA file that is not PEM", tls("garbage.pem", &ops_pem, &ops_key), "garbage.pem"),
        ("unreadable client key", tls(&ca_pem, &ops_pem, "missing.key"), "missing.key"),
        ("client key that is not PEM", tls(&ca_pem, &ops_pem, "garbage.pem"), "garbage.pem"),
        ("no CA to issue with", owned(&["pki", "issue", "--dir", "no-pki", "--name", "n1"]), "no-pki"),
        ("CA that exists", owned(&["pki", "init", "--dir", &pki]), "already exists"),
        (
            "unreachable store",
            owned(&[
                "provision",
                "--spec",
                &format!("{}/../examples/web-1.json", env!("CARGO_MANIFEST_DIR")),
                "--disk",
                "d.img",
                "--store",
                "http://127.0.0.1:1/store",
                "--insecure-images",
                "--cache",
                "cache",
                "--work-dir",
                "work",
            ]),
            "127.0.0.1:1",
        ),
    ];

    let mut failures = Vec::new();
    for (what, args, expected) in &cases {
        let out = agent().args(args).current_dir(s.dir.path()).env("RUST_LOG", "error").output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        assert!(!out.status.success(), "{what}: {args:?} succeeded: {stdout} {stderr}");
        let found = messages(&stdout, &stderr);
        assert!(!found.is_empty(), "{what}: no error message: stdout {stdout:?} stderr {stderr:?}");
        assert!(
            found.iter().any(|m| m.contains(expected)),
            "{what}: no message holds {expected:?}: {found:#?}"
        );
        for message in &found {
            if let Some(segment) = repeated_segment(message) {
                failures.push(format!("{what}: {segment:?} repeats in {message:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_repeated_segment_is_found() {
    let text =
        "cannot read /x.toml: No such file or directory (os error 2): No such file or directory (os error 2)";
    assert_eq!(repeated_segment(text), Some("No such file or directory (os error 2)"));
    assert_eq!(repeated_segment("cannot read /x.toml: No such file or directory (os error 2)"), None);
}
