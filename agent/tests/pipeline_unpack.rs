//! Rootfs extraction: compressed tarballs into a staging directory, and archives that try to escape it.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use gridforge_agent::pipeline::{PipelineError, UnpackOptions, UnpackStats, unpack_rootfs};
use gridforge_common::progress::Progress;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// One archive entry, written with raw header bytes so hostile names (absolute, `..`) survive.
struct Entry<'a> {
    name: &'a str,
    kind: EntryType,
    link: Option<&'a str>,
    data: &'a [u8],
    mode: u32,
    uid: u64,
}

fn file<'a>(name: &'a str, data: &'a [u8]) -> Entry<'a> {
    Entry { name, kind: EntryType::Regular, link: None, data, mode: 0o644, uid: 0 }
}
fn dir(name: &str) -> Entry<'_> {
    Entry { name, kind: EntryType::Directory, link: None, data: b"", mode: 0o755, uid: 0 }
}
fn symlink<'a>(name: &'a str, target: &'a str) -> Entry<'a> {
    Entry { name, kind: EntryType::Symlink, link: Some(target), data: b"", mode: 0o777, uid: 0 }
}

fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..e.name.len()].copy_from_slice(e.name.as_bytes());
        if let Some(link) = e.link {
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.uid);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        builder.append(&h, e.data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn unpack(blob: &[u8], staging: &Path, opts: &UnpackOptions) -> Result<UnpackStats, PipelineError> {
    unpack_rootfs(blob, &sha256(blob), staging, opts, &Progress::none())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn path_traversal_and_symlink_escapes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let abs = format!("{}/abs", outside.display());
    let outside_str = outside.to_str().unwrap().to_string();
    let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
        ("parent", vec![file("../evil", b"x")]),
        ("nested parent", vec![dir("a"), file("a/../../evil", b"x")]),
        ("absolute", vec![file(&abs, b"x")]),
        ("symlink parent", vec![symlink("link", &outside_str), file("link/file", b"x")]),
        (
            "hard link out",
            vec![Entry {
                name: "hl",
                kind: EntryType::Link,
                link: Some("../evil"),
                data: b"",
                mode: 0o644,
                uid: 0,
            }],
        ),
    ];
    for (case, entries) in cases {
        let staging = tmp.path().join(format!("root-{}", case.replace(' ', "-")));
        fs::create_dir(&staging).unwrap();
        let blob = tar_of(&entries);
        let err = unpack(&blob, &staging, &UnpackOptions::default()).unwrap_err();
        assert!(matches!(err, PipelineError::UnsafePath { .. }), "{case}: {err}");
        assert!(!tmp.path().join("evil").exists(), "{case}: wrote outside the staging dir");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{case}: wrote through the symlink");
    }
}

#[test]
fn ownership_modes_symlinks_and_hard_links_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let blob = tar_of(&[
        Entry { name: "./", kind: EntryType::Directory, link: None, data: b"", mode: 0o755, uid: 0 },
        dir("usr/"),
        Entry { name: "usr/bin/", kind: EntryType::Directory, link: None, data: b"", mode: 0o750, uid: 1000 },
        Entry {
            name: "usr/bin/tool",
            kind: EntryType::Regular,
            link: None,
            data: b"#!/bin/sh\n",
            mode: 0o755,
            uid: 1000,
        },
        Entry {
            name: "usr/bin/suid",
            kind: EntryType::Regular,
            link: None,
            data: b"s",
            mode: 0o4755,
            uid: 0,
        },
        symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        Entry {
            name: "usr/bin/tool2",
            kind: EntryType::Link,
            link: Some("usr/bin/tool"),
            data: b"",
            mode: 0,
            uid: 0,
        },
    ]);
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let stats = unpack(&blob, &root, &UnpackOptions::default()).unwrap();
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.bytes, 11);
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!((tool.uid(), tool.gid()), (1000, 1000));
    assert_eq!(tool.permissions().mode() & 0o7777, 0o755);
    assert_eq!(tool.mtime(), 1_700_000_000);
    assert_eq!(tool.nlink(), 2, "hard link shares the inode");
    assert_eq!(fs::read(root.join("usr/bin/tool2")).unwrap(), b"#!/bin/sh\n");
    let bin = fs::metadata(root.join("usr/bin")).unwrap();
    assert_eq!((bin.uid(), bin.permissions().mode() & 0o7777, bin.mtime()), (1000, 0o750, 1_700_000_000));
    assert_eq!(fs::metadata(root.join("usr/bin/suid")).unwrap().permissions().mode() & 0o7777, 0o4755);
    let lt = root.join("etc/localtime");
    assert!(fs::symlink_metadata(&lt).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(&lt).unwrap(), Path::new("/usr/share/zoneinfo/UTC"));
}

#[test]
fn gzip_zstd_and_plain_tars_unpack_and_wrong_digest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tar = tar_of(&[dir("etc"), file("etc/hostname", b"node1\n")]);
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, blob) in [("plain", tar.clone()), ("gzip", gzip(&tar)), ("zstd", zst.clone())] {
        let root = tmp.path().join(name);
        fs::create_dir(&root).unwrap();
        let stats = unpack(&blob, &root, &UnpackOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(stats.compressed_bytes, blob.len() as u64);
        assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"node1\n", "{name}");
    }
    let root = tmp.path().join("wrong");
    fs::create_dir(&root).unwrap();
    let err = unpack_rootfs(&zst[..], &"ab".repeat(32), &root, &UnpackOptions::default(), &Progress::none())
        .unwrap_err();
    match err {
        PipelineError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, "ab".repeat(32));
            assert_eq!(actual, sha256(&zst));
        }
        other => panic!("expected DigestMismatch, got {other}"),
    }
    let mut trailing = zst.clone();
    trailing.extend_from_slice(b"junk");
    let root = tmp.path().join("trailing");
    fs::create_dir(&root).unwrap();
    let err = unpack(&trailing, &root, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, PipelineError::TrailingData { .. }), "{err}");
    let cut = &zst[..zst.len() - 8];
    let err = unpack(cut, &root, &UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, PipelineError::Truncated { .. }), "{err}");
}

#[test]
fn later_layers_replace_files_and_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let base = tar_of(&[file("a", b"file"), dir("d"), file("d/inner", b"x"), file("f", b"old"), dir("keep")]);
    unpack(&base, &root, &UnpackOptions::default()).unwrap();
    let layer = tar_of(&[
        dir("a"),
        file("a/x", b"now a dir"),
        file("d", b"now a file"),
        file("f", b"new"),
        Entry { name: "keep", kind: EntryType::Directory, link: None, data: b"", mode: 0o700, uid: 0 },
    ]);
    unpack(&layer, &root, &UnpackOptions::default()).unwrap();
    assert_eq!(fs::read(root.join("a/x")).unwrap(), b"now a dir");
    assert_eq!(fs::read(root.join("d")).unwrap(), b"now a file");
    assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
    assert_eq!(fs::metadata(root.join("keep")).unwrap().permissions().mode() & 0o7777, 0o700);
}

/// Log lines written while `f` runs on this thread. One subscriber for the whole test binary (a scoped one
/// misses events of callsites it did not see register), its lines told apart by thread.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static LOG: OnceLock<Buffer> = OnceLock::new();
    let buffer = LOG.get_or_init(|| {
        let buffer = Buffer(Arc::default());
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_thread_ids(true)
            .with_max_level(tracing::Level::INFO)
            .init();
        buffer
    });
    let start = buffer.0.lock().unwrap().len();
    let result = f();
    // "ThreadId(2)" here, "ThreadId(02)" in the log.
    let number = |id: &str| id.trim_start_matches("ThreadId(").trim_end_matches(')').parse::<u64>().ok();
    let thread = number(&format!("{:?}", std::thread::current().id()));
    let text = String::from_utf8(buffer.0.lock().unwrap()[start..].to_vec()).unwrap();
    let mine: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w.starts_with("ThreadId(") && number(w) == thread))
        .collect();
    (result, mine.iter().map(|l| format!("{l}\n")).collect())
}

#[test]
fn an_untrusted_image_with_device_nodes_warns_once_with_the_count() {
    let tmp = tempfile::tempdir().unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let header = |kind, mode, size| {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    };
    let mut h = header(EntryType::Directory, 0o755, 0);
    builder.append_data(&mut h, "dev", &b""[..]).unwrap();
    for (name, kind, major, minor) in [
        ("dev/null", EntryType::Char, 1, 3),
        ("dev/zero", EntryType::Char, 1, 5),
        ("dev/sda", EntryType::Block, 8, 0),
        ("dev/loop0", EntryType::Block, 7, 0),
        ("run/initctl", EntryType::Fifo, 0, 0),
    ] {
        let mut h = header(kind, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        builder.append_data(&mut h, name, &b""[..]).unwrap();
    }
    let mut h = header(EntryType::Regular, 0o644, 3);
    builder.append_data(&mut h, "etc/hostname", &b"vm\n"[..]).unwrap();
    let blob = builder.into_inner().unwrap();

    let root = tmp.path().join("untrusted");
    fs::create_dir(&root).unwrap();
    let (stats, log) = logged(|| unpack(&blob, &root, &UnpackOptions::default()).unwrap());
    assert_eq!(stats.left_out.count, 5);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 1, "one line for the image: {log}");
    assert!(lines[0].trim_start().starts_with("WARN"), "{log}");
    assert!(
        lines[0].contains(
            "left out 5 device nodes and fifos (/dev/null, /dev/zero, /dev/sda, …) of an untrusted image"
        ),
        "{log}"
    );
    assert!(lines[0].contains(&sha256(&blob)), "names the image by its digest: {log}");
    assert_eq!(fs::read_dir(root.join("dev")).unwrap().count(), 0);
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"vm\n");

    // A trusted image creates them, without a word.
    let root = tmp.path().join("trusted");
    fs::create_dir(&root).unwrap();
    let (stats, log) = logged(|| unpack(&blob, &root, &UnpackOptions { allow_devices: true }).unwrap());
    assert_eq!(stats.left_out.count, 0);
    assert_eq!(log, "");
    assert!(fs::symlink_metadata(root.join("dev/sda")).unwrap().file_type().is_block_device());
    assert!(fs::symlink_metadata(root.join("run/initctl")).unwrap().file_type().is_fifo());
}

#[test]
fn device_nodes_only_when_allowed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = Header::new_gnu();
    h.set_path("dev/null").unwrap();
    h.set_entry_type(EntryType::Char);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_mode(0o666);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(0);
    h.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&h, &b""[..]).unwrap();
    let blob = builder.into_inner().unwrap();

    let root = tmp.path().join("untrusted");
    fs::create_dir(&root).unwrap();
    let stats = unpack(&blob, &root, &UnpackOptions::default()).unwrap();
    assert_eq!(stats.left_out.count, 1);
    assert!(fs::symlink_metadata(root.join("dev/null")).is_err());

    let root = tmp.path().join("trusted");
    fs::create_dir(&root).unwrap();
    let stats = unpack(&blob, &root, &UnpackOptions { allow_devices: true }).unwrap();
    assert_eq!(stats.left_out.count, 0);
    let meta = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), nix::sys::stat::makedev(1, 3));
}
