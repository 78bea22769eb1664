//! Keys, packing and publishing, checked with zstd, tar and the signature verifier.

mod image_store_common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use gridforge_agent::image::{Compression, Format, ImageError, Index, Kind, pack, sign};
use image_store_common::{make_store, run};

#[test]
fn keygen_writes_private_and_public_key_files() {
    let tmp = tempfile::tempdir().unwrap();
    let key_path = tmp.path().join("signing.key");
    let public = sign::keygen(&key_path).unwrap();

    let mode = fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key file mode");
    let private_text = fs::read_to_string(&key_path).unwrap();
    assert_eq!(private_text.lines().count(), 1);
    let pub_path = tmp.path().join("signing.key.pub");
    let pub_text = fs::read_to_string(&pub_path).unwrap();
    assert_eq!(pub_text.lines().count(), 1);

    let signing = sign::load_signing_key(&key_path).unwrap();
    assert_eq!(signing.verifying_key(), public);
    assert_eq!(sign::parse_trusted_key(pub_text.trim()).unwrap(), public, "inline base64 key");
    assert_eq!(sign::parse_trusted_key(pub_path.to_str().unwrap()).unwrap(), public, "path to .pub file");

    let sig = sign::sign(&signing, b"payload");
    sign::verify(&public, b"payload", &sig).unwrap();
    assert!(matches!(sign::verify(&public, b"payloaD", &sig), Err(ImageError::BadSignature { .. })));

    let err = sign::keygen(&key_path).unwrap_err();
    assert!(matches!(err, ImageError::KeyExists { .. }), "{err}");
    assert_eq!(fs::read_to_string(&key_path).unwrap(), private_text, "existing key untouched");
}

#[test]
fn parse_trusted_key_rejects_garbage() {
    let err = sign::parse_trusted_key("not-a-key-and-not-a-file").unwrap_err();
    assert!(matches!(err, ImageError::BadKey { .. }), "{err}");
}

#[test]
fn packed_rootfs_is_a_valid_zstd_tar_with_owners_modes_and_links() {
    let store = make_store();
    let blob = store.store_dir.join(&store.entry.path);
    assert_eq!(store.entry.path, format!("blobs/sha256/{}", store.entry.sha256));
    assert_eq!(fs::metadata(&blob).unwrap().len(), store.entry.compressed_size);
    assert_eq!(
        run(Command::new("sha256sum").arg(&blob)).split_whitespace().next(),
        Some(&*store.entry.sha256)
    );

    run(Command::new("zstd").arg("-q").arg("-t").arg(&blob));
    let tar_bytes = run_bytes(Command::new("zstd").arg("-dc").arg(&blob));
    assert_eq!(tar_bytes.len() as u64, store.entry.uncompressed_size);

    let listing =
        pipe_into(&tar_bytes, Command::new("tar").args(["--numeric-owner", "-tvf", "-"]).env("TZ", "UTC"));
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(5) == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed in:\n{listing}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(line("bin/tool").starts_with("-rwxr-xr-x 0/0 "), "{}", line("bin/tool"));
    assert!(line("bin/tool").contains("2001-09-09 01:46"), "mtime kept: {}", line("bin/tool"));
    assert!(line("bin/sh").starts_with("lrwxrwxrwx 0/0 "), "{}", line("bin/sh"));
    assert!(line("bin/sh").ends_with("bin/sh -> tool"), "{}", line("bin/sh"));
    assert!(
        line("home/user/notes.txt").starts_with("-rw------- 1000/1000 70000 "),
        "{}",
        line("home/user/notes.txt")
    );
    assert!(line("home/user").starts_with("drwxr-xr-x 1000/1000 "), "{}", line("home/user"));
    assert!(line("etc/hostname.link").starts_with("hrw-r--r-- 0/0 "), "{}", line("etc/hostname.link"));
    assert!(line("etc/hostname.link").ends_with("link to etc/hostname"), "{}", line("etc/hostname.link"));

    let names: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().nth(5)).collect();
    assert!(names.iter().all(|n| !n.starts_with('/')), "relative paths only: {names:?}");
    assert_eq!(
        names,
        [
            "bin",
            "bin/sh",
            "bin/tool",
            "etc",
            "etc/hostname",
            "etc/hostname.link",
            "home",
            "home/user",
            "home/user/notes.txt"
        ],
        "sorted, parents first"
    );

    // The archive extracts with stock tar to the same bytes.
    let out = store.tmp.path().join("extracted");
    fs::create_dir(&out).unwrap();
    pipe_into(&tar_bytes, Command::new("tar").arg("-xf").arg("-").arg("-C").arg(&out));
    assert_eq!(fs::read(out.join("bin/tool")).unwrap(), b"#!/bin/sh\necho tool\n");
    assert_eq!(fs::read_link(out.join("bin/sh")).unwrap().to_str(), Some("tool"));
}

/// A rootfs with a device node of each kind and fifos, one of them under a path too long for a tar header.
fn rootfs_with_special_files(root: &Path) -> String {
    let deep = format!("var/{}/{}", "d".repeat(60), "e".repeat(60));
    for dir in ["dev", "run/systemd", &deep] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("dev/README"), b"devtmpfs provides these\n").unwrap();
    fs::write(root.join(&deep).join("kept.txt"), b"a long path\n").unwrap();
    run(Command::new("mknod").arg(root.join("dev/null")).args(["c", "1", "3"]));
    run(Command::new("mknod").arg(root.join("dev/sda")).args(["b", "8", "0"]));
    run(Command::new("mkfifo").arg(root.join("run/systemd/initctl")));
    run(Command::new("mkfifo").arg(root.join(&deep).join("queue")));
    deep
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gridforge-agent"))
}

#[test]
fn pack_leaves_device_nodes_and_fifos_out_with_one_summary_line() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    let deep = rootfs_with_special_files(&rootfs);
    let key = tmp.path().join("signing.key");
    let out = agent().args(["image", "keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The same tree as a directory, a GNU tar (long names as GNU members) and a POSIX tar (PAX records).
    let gnu = tmp.path().join("gnu.tar");
    let posix = tmp.path().join("posix.tar");
    run(Command::new("tar").arg("--format=gnu").arg("-cf").arg(&gnu).arg("-C").arg(&rootfs).arg("."));
    run(Command::new("tar").arg("--format=posix").arg("-cf").arg(&posix).arg("-C").arg(&rootfs).arg("."));
    let special = ["dev/null", "dev/sda", "run/systemd/initctl", &format!("{deep}/queue")].map(String::from);

    for (n, source) in [&rootfs, &gnu, &posix].into_iter().enumerate() {
        let store = tmp.path().join(format!("store{n}"));
        let out = agent()
            .args(["--json", "image", "pack", "--name", "special", "--version", "1", "--rootfs"])
            .arg(source)
            .arg("--store")
            .arg(&store)
            .arg("--key")
            .arg(&key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{}: {stderr}", source.display());
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{}: one summary line and nothing else: {stderr}", source.display());
        assert!(
            lines[0].starts_with("left out 4 device nodes and fifos (/"),
            "{}: {stderr}",
            source.display()
        );
        assert!(lines[0].ends_with(", …)"), "three examples of four: {stderr}");
        for example in
            lines[0]["left out 4 device nodes and fifos (".len()..].trim_end_matches(", …)").split(", ")
        {
            assert!(special.iter().any(|s| example == format!("/{s}")), "{example:?} in {stderr}");
        }

        let entry: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let blob = store.join(entry["path"].as_str().unwrap());
        let tar_bytes = run_bytes(Command::new("zstd").arg("-dc").arg(&blob));
        let listing = pipe_into(&tar_bytes, Command::new("tar").arg("-tf").arg("-"));
        let names: Vec<&str> =
            listing.lines().map(|l| l.trim_start_matches("./").trim_end_matches('/')).collect();
        for s in &special {
            assert!(!names.contains(&s.as_str()), "{}: {s} left in the blob: {names:?}", source.display());
        }
        for kept in ["dev/README", "run/systemd", &format!("{deep}/kept.txt")] {
            assert!(names.contains(&kept), "{}: {kept} missing from the blob: {names:?}", source.display());
        }
        if source != &rootfs {
            // Everything else goes in as it was: the archive lists as the source minus the special files.
            let original = run(Command::new("tar").arg("-tf").arg(source));
            let expected: Vec<&str> = original
                .lines()
                .map(|l| l.trim_start_matches("./").trim_end_matches('/'))
                .filter(|n| !special.iter().any(|s| s == n))
                .collect();
            assert_eq!(names, expected, "{}", source.display());
            let extracted = tmp.path().join(format!("extracted{n}"));
            fs::create_dir(&extracted).unwrap();
            pipe_into(&tar_bytes, Command::new("tar").arg("-xf").arg("-").arg("-C").arg(&extracted));
            assert_eq!(fs::read(extracted.join(&deep).join("kept.txt")).unwrap(), b"a long path\n");
        }
    }

    // Without special files, no line at all.
    let tree = tmp.path().join("plain");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), b"x\n").unwrap();
    let out = agent()
        .args(["image", "pack", "--name", "plain", "--version", "1", "--rootfs"])
        .arg(&tree)
        .arg("--store")
        .arg(tmp.path().join("store-plain"))
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

#[test]
fn pack_from_a_directory_reports_what_it_left_out() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    rootfs_with_special_files(&rootfs);
    let key = signing_key(tmp.path());
    let packed =
        pack::pack_rootfs(&rootfs, &tmp.path().join("store"), "dev", "1", Kind::Layer, &key, 1).unwrap();
    assert_eq!(packed.left_out.count, 4);
    // Sorted tree order: the first three.
    assert_eq!(packed.left_out.examples, ["/dev/null", "/dev/sda", "/run/systemd/initctl"]);
    let blob = tmp.path().join("store").join(&packed.entry.path);
    let listing = run(Command::new("tar").arg("--zstd").arg("-tf").arg(&blob));
    assert!(
        !listing.contains("dev/null") && !listing.contains("initctl") && !listing.contains("queue"),
        "{listing}"
    );
}

#[test]
fn publish_writes_a_signed_index_and_replaces_by_name_and_version() {
    let store = make_store();
    let index_bytes = fs::read(store.store_dir.join("index.json")).unwrap();
    let sig = fs::read_to_string(store.store_dir.join("index.json.sig")).unwrap();
    sign::verify(&store.key.verifying_key(), &index_bytes, &sig).unwrap();

    let json: serde_json::Value = serde_json::from_slice(&index_bytes).unwrap();
    assert_eq!(json["format_version"], 1);
    let image = &json["images"][0];
    assert_eq!(image["name"], "debian");
    assert_eq!(image["version"], "12");
    assert_eq!(image["kind"], "os");
    assert_eq!(image["format"], "rootfs-tar");
    assert_eq!(image["compression"], "zstd");
    assert_eq!(image["sha256"], store.entry.sha256.as_str());

    // Same name and version again: replaced, not duplicated. Another version: added.
    let mut newer = store.entry.clone();
    newer.notes = "rebuilt".to_string();
    pack::publish(&store.store_dir, newer, &store.key).unwrap();
    let mut other = store.entry.clone();
    other.version = "13".to_string();
    pack::publish(&store.store_dir, other, &store.key).unwrap();

    let index_bytes = fs::read(store.store_dir.join("index.json")).unwrap();
    let sig = fs::read_to_string(store.store_dir.join("index.json.sig")).unwrap();
    sign::verify(&store.key.verifying_key(), &index_bytes, &sig).unwrap();
    let index = Index::parse(&index_bytes, "test").unwrap();
    assert_eq!(index.images.len(), 2);
    assert_eq!(index.find("debian", "12").unwrap().notes, "rebuilt");
    assert_eq!(index.find("debian", "13").unwrap().format, Format::RootfsTar);
    assert_eq!(index.find("debian", "13").unwrap().compression, Compression::Zstd);
}

#[test]
fn publish_refuses_a_store_signed_by_another_key() {
    let store = make_store();
    let other_key = signing_key(store.tmp.path());
    let err = pack::publish(&store.store_dir, store.entry.clone(), &other_key).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
}

#[test]
fn publish_refuses_an_entry_whose_blob_is_missing() {
    let store = make_store();
    let mut entry = store.entry.clone();
    entry.sha256 = "0".repeat(64);
    entry.path = format!("blobs/sha256/{}", entry.sha256);
    let err = pack::publish(&store.store_dir, entry, &store.key).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
}

#[test]
fn pack_from_a_tar_file_compresses_it_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    image_store_common::make_rootfs(&rootfs);
    let tar_path = tmp.path().join("rootfs.tar");
    run(Command::new("tar").arg("-cf").arg(&tar_path).arg("-C").arg(&rootfs).arg("."));
    let key = signing_key(tmp.path());
    let store_dir = tmp.path().join("store");
    let entry = pack::pack_rootfs(&tar_path, &store_dir, "fromtar", "1", Kind::Os, &key, 3).unwrap().entry;
    let original = fs::read(&tar_path).unwrap();
    assert_eq!(entry.uncompressed_size, original.len() as u64);
    assert_eq!(run_bytes(Command::new("zstd").arg("-dc").arg(store_dir.join(&entry.path))), original);

    let not_tar = tmp.path().join("not.tar");
    fs::write(&not_tar, vec![0x5a; 4096]).unwrap();
    let err = pack::pack_rootfs(&not_tar, &store_dir, "bad", "1", Kind::Os, &key, 3).unwrap_err();
    assert!(matches!(err, ImageError::BadSource { .. }), "{err}");
}

#[test]
fn add_blob_names_the_blob_by_its_digest() {
    let tmp = tempfile::tempdir().unwrap();
    let (sha256, size, path) = pack::add_blob(tmp.path(), &b"hello blob\n"[..]).unwrap();
    assert_eq!(size, 11);
    assert_eq!(path, format!("blobs/sha256/{sha256}"));
    let file = tmp.path().join(&path);
    assert_eq!(run(Command::new("sha256sum").arg(&file)).split_whitespace().next(), Some(&*sha256));
    let leftovers: Vec<_> = fs::read_dir(tmp.path().join("blobs/sha256")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temp files left");
}

fn signing_key(dir: &std::path::Path) -> ed25519_dalek::SigningKey {
    let path = dir.join(format!("key-{}", uuid::Uuid::new_v4()));
    sign::keygen(&path).unwrap();
    sign::load_signing_key(&path).unwrap()
}

fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn pipe_into(input: &[u8], cmd: &mut Command) -> String {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
