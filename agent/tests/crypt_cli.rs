//! The `luks` CLI: exit codes and output, checked against cryptsetup.

mod crypt_support;

use std::process::Command;

use crypt_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_gridforge-agent");

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn luks_format_check_add_remove_dump() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    sparse_file(&image, 20 << 20);
    let key = write_key(dir.path(), "key", b"first\n");
    let second = write_key(dir.path(), "second", b"second");
    let wrong = write_key(dir.path(), "wrong", b"first");
    let disk = s(&image);

    let out = agent(&[
        "--json",
        "luks",
        "format",
        "--disk",
        disk,
        "--passphrase-file",
        s(&key),
        "--kdf",
        "argon2id-fast",
        "--sector-size",
        "512",
        "--label",
        "cli",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["sector_size"], 512);
    let uuid = info["uuid"].as_str().unwrap().to_string();
    assert!(test_passphrase(&image, &key), "cryptsetup takes the key file as is, newline included");

    let ok = agent(&["luks", "check-passphrase", "--disk", disk, "--passphrase-file", s(&key)]);
    assert_eq!(ok.status.code(), Some(0));
    let bad = agent(&["luks", "check-passphrase", "--disk", disk, "--passphrase-file", s(&wrong)]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no keyslot opens with this passphrase"));

    let add = agent(&[
        "luks",
        "add-key",
        "--disk",
        disk,
        "--passphrase-file",
        s(&key),
        "--new-passphrase-file",
        s(&second),
        "--kdf",
        "argon2id-fast",
    ]);
    assert!(add.status.success(), "{}", String::from_utf8_lossy(&add.stderr));
    assert!(test_passphrase(&image, &second));
    let remove = agent(&["luks", "remove-key", "--disk", disk, "--passphrase-file", s(&key)]);
    assert!(remove.status.success(), "{}", String::from_utf8_lossy(&remove.stderr));
    assert!(!test_passphrase(&image, &key));
    let last = agent(&["luks", "remove-key", "--disk", disk, "--passphrase-file", s(&second)]);
    assert_eq!(last.status.code(), Some(1));

    let dump = agent(&["--json", "luks", "dump", "--disk", disk]);
    assert!(dump.status.success());
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
    assert_eq!(dump["uuid"], uuid.as_str());
    assert_eq!(dump["label"], "cli");
    assert_eq!(dump["keyslots"].as_array().unwrap().len(), 1);
}
