//! Helpers shared by the image store tests: a small root filesystem, a signed store, a loopback HTTP server.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;

use ed25519_dalek::SigningKey;
use gridforge_agent::image::{IndexEntry, Kind, pack, sign};

/// mtime given to every file of the test rootfs (2001-09-09 01:46:40 UTC).
pub const MTIME: u64 = 1_000_000_000;

/// Runs a command and returns its stdout; panics with stderr if it fails or is missing.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn set_mtime(path: &Path) {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(MTIME);
    fs::File::open(path).unwrap().set_modified(time).unwrap();
}

/// A small rootfs: directories, an executable (0755), a file owned by 1000:1000, a symlink and a hardlink.
pub fn make_rootfs(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("home/user")).unwrap();
    fs::write(root.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    fs::set_permissions(root.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("etc/hostname"), b"guest\n").unwrap();
    fs::set_permissions(root.join("etc/hostname"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.link")).unwrap();
    fs::write(root.join("home/user/notes.txt"), vec![b'x'; 70_000]).unwrap();
    fs::set_permissions(root.join("home/user/notes.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(root.join("home/user/notes.txt"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::chown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
    std::os::unix::fs::symlink("tool", root.join("bin/sh")).unwrap();
    for file in ["bin/tool", "etc/hostname", "home/user/notes.txt"] {
        set_mtime(&root.join(file));
    }
}

pub struct TestStore {
    pub tmp: tempfile::TempDir,
    pub store_dir: PathBuf,
    pub key_path: PathBuf,
    pub key: SigningKey,
    pub entry: IndexEntry,
}

/// A temp dir holding a key and a store with one packed rootfs, `debian 12`.
pub fn make_store() -> TestStore {
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    make_rootfs(&rootfs);
    let key_path = tmp.path().join("store.key");
    sign::keygen(&key_path).unwrap();
    let key = sign::load_signing_key(&key_path).unwrap();
    let store_dir = tmp.path().join("store");
    pack::init_store(&store_dir).unwrap();
    let entry = pack::pack_rootfs(&rootfs, &store_dir, "debian", "12", Kind::Os, &key, 3).unwrap().entry;
    TestStore { tmp, store_dir, key_path, key, entry }
}

/// Rewrites the store's index with `edit` applied to its JSON and signs the result with `key`, bypassing
/// the checks `publish` makes (to build indexes a careless or hostile publisher could produce).
pub fn resign_index(store_dir: &Path, key: &SigningKey, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value =
        serde_json::from_slice(&fs::read(store_dir.join("index.json")).unwrap()).unwrap();
    edit(&mut json);
    let bytes = serde_json::to_vec_pretty(&json).unwrap();
    fs::write(store_dir.join("index.json"), &bytes).unwrap();
    fs::write(store_dir.join("index.json.sig"), sign::sign(key, &bytes)).unwrap();
}

/// A loopback HTTP/1.1 file server over a directory that counts GET requests per path.
pub struct FileServer {
    pub port: u16,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl FileServer {
    pub fn start(root: &Path) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let root = root.to_path_buf();
        let counts = requests.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let root = root.clone();
                let counts = counts.clone();
                thread::spawn(move || serve(stream, &root, &counts));
            }
        });
        FileServer { port, requests }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn count(&self, path: &str) -> usize {
        self.requests.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

fn serve(stream: TcpStream, root: &Path, counts: &Mutex<HashMap<String, usize>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    *counts.lock().unwrap().entry(path.clone()).or_default() += 1;
    let mut stream = stream;
    let relative = path.trim_start_matches('/');
    let body = if relative.split('/').any(|s| s == "..") { None } else { fs::read(root.join(relative)).ok() };
    let _ = match body {
        Some(body) => stream
            .write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                    .as_bytes(),
            )
            .and_then(|()| stream.write_all(&body)),
        None => stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    };
}
