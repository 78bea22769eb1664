//! Fetching blobs into the cache from directory and HTTP stores: verification, cleanup, shared downloads.

mod image_store_common;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};

use gridforge_agent::image::{Cache, ImageError, Store, Trust};
use gridforge_common::progress::{Progress, ProgressEvent};
use image_store_common::{FileServer, make_store};

/// Every file in the cache's blob directory except lock files.
fn cache_files(cache_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(cache_dir.join("sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    names.sort();
    names
}

#[test]
fn fetch_from_a_directory_store_copies_the_verified_blob() {
    let store = make_store();
    let opened =
        Store::open(store.store_dir.to_str().unwrap(), Trust::Key(store.key.verifying_key())).unwrap();
    let cache_dir = store.tmp.path().join("cache");
    let cache = Cache::new(&cache_dir).unwrap();
    let events = Arc::new(Mutex::new(Vec::<ProgressEvent>::new()));
    let sink = events.clone();
    let progress = Progress::new(move |e| sink.lock().unwrap().push(e.clone()));

    let path = cache.fetch(&opened, &store.entry, &progress).unwrap();
    assert_eq!(path, cache_dir.join("sha256").join(&store.entry.sha256));
    assert_eq!(fs::read(&path).unwrap(), fs::read(store.store_dir.join(&store.entry.path)).unwrap());
    assert_eq!(cache_files(&cache_dir), vec![store.entry.sha256.clone()]);

    let events = events.lock().unwrap();
    assert!(events.iter().all(|e| e.step == "fetch"));
    assert!(
        events.iter().any(|e| e.bytes_done == store.entry.compressed_size && e.bytes_total == e.bytes_done),
        "final byte count reported: {events:?}"
    );

    // A second fetch finds it cached, even with the store's copy gone.
    fs::remove_file(store.store_dir.join(&store.entry.path)).unwrap();
    assert_eq!(cache.fetch(&opened, &store.entry, &Progress::none()).unwrap(), path);
}

#[test]
fn a_corrupted_blob_is_a_digest_mismatch_and_leaves_nothing_cached() {
    let store = make_store();
    let blob = store.store_dir.join(&store.entry.path);
    let mut bytes = fs::read(&blob).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    fs::write(&blob, &bytes).unwrap();

    let opened =
        Store::open(store.store_dir.to_str().unwrap(), Trust::Key(store.key.verifying_key())).unwrap();
    let cache_dir = store.tmp.path().join("cache");
    let cache = Cache::new(&cache_dir).unwrap();
    let err = cache.fetch(&opened, &store.entry, &Progress::none()).unwrap_err();
    match &err {
        ImageError::DigestMismatch { expected, actual, what } => {
            assert_eq!(expected, &store.entry.sha256);
            assert_ne!(actual, expected);
            assert!(what.contains("debian 12"), "{what}");
        }
        other => panic!("expected DigestMismatch, got {other}"),
    }
    assert!(cache_files(&cache_dir).is_empty(), "left in cache: {:?}", cache_files(&cache_dir));
}

#[test]
fn a_truncated_or_extended_blob_is_a_size_mismatch() {
    let store = make_store();
    let blob = store.store_dir.join(&store.entry.path);
    let original = fs::read(&blob).unwrap();
    let opened =
        Store::open(store.store_dir.to_str().unwrap(), Trust::Key(store.key.verifying_key())).unwrap();
    let cache_dir = store.tmp.path().join("cache");
    let cache = Cache::new(&cache_dir).unwrap();

    fs::write(&blob, &original[..original.len() - 100]).unwrap();
    let err = cache.fetch(&opened, &store.entry, &Progress::none()).unwrap_err();
    assert!(
        matches!(err, ImageError::SizeMismatch { expected, actual, .. }
            if expected == store.entry.compressed_size && actual == expected - 100),
        "{err}"
    );
    assert!(cache_files(&cache_dir).is_empty());

    fs::write(&blob, &original).unwrap();
    OpenOptions::new().append(true).open(&blob).unwrap().write_all(&[0; 4096]).unwrap();
    let err = cache.fetch(&opened, &store.entry, &Progress::none()).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { expected, actual, .. } if actual > expected), "{err}");
    assert!(cache_files(&cache_dir).is_empty());
}

#[test]
fn http_store_opens_and_fetches() {
    let store = make_store();
    let server = FileServer::start(&store.store_dir);
    let opened = Store::open(&server.url(), Trust::Key(store.key.verifying_key())).unwrap();
    assert_eq!(opened.location(), server.url());
    let entry = opened.find("debian", "12").unwrap();
    let cache_dir = store.tmp.path().join("cache");
    let path = Cache::new(&cache_dir).unwrap().fetch(&opened, entry, &Progress::none()).unwrap();
    assert_eq!(fs::read(path).unwrap(), fs::read(store.store_dir.join(&entry.path)).unwrap());
    assert_eq!(server.count("/index.json"), 1);
    assert_eq!(server.count("/index.json.sig"), 1);
}

#[test]
fn http_store_signature_checks_match_the_directory_store() {
    let store = make_store();
    let server = FileServer::start(&store.store_dir);
    let other = sign_key_in(store.tmp.path());
    let err = Store::open(&server.url(), Trust::Key(other)).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains(&server.url()), "names the store: {err}");

    fs::remove_file(store.store_dir.join("index.json.sig")).unwrap();
    let err = Store::open(&server.url(), Trust::Key(store.key.verifying_key())).unwrap_err();
    assert!(matches!(err, ImageError::Unsigned { .. }), "{err}");
    Store::open(&server.url(), Trust::Insecure).unwrap();
}

#[test]
fn http_store_missing_index_and_blob_are_404_errors() {
    let store = make_store();
    let server = FileServer::start(store.tmp.path());
    let err = Store::open(&format!("{}nothing-here", server.url()), Trust::Insecure).unwrap_err();
    assert!(matches!(err, ImageError::HttpStatus { status: 404, .. }), "{err}");
    assert!(err.to_string().contains("nothing-here/index.json"), "{err}");

    let opened =
        Store::open(&format!("{}store", server.url()), Trust::Key(store.key.verifying_key())).unwrap();
    fs::remove_file(store.store_dir.join(&store.entry.path)).unwrap();
    let cache_dir = store.tmp.path().join("cache");
    let err = Cache::new(&cache_dir).unwrap().fetch(&opened, &store.entry, &Progress::none()).unwrap_err();
    assert!(matches!(err, ImageError::HttpStatus { status: 404, .. }), "{err}");
    assert!(cache_files(&cache_dir).is_empty());
}

#[test]
fn concurrent_fetches_of_one_blob_download_it_once() {
    let store = make_store();
    let server = FileServer::start(&store.store_dir);
    let opened = Arc::new(Store::open(&server.url(), Trust::Key(store.key.verifying_key())).unwrap());
    let cache_dir = store.tmp.path().join("cache");
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let opened = opened.clone();
            let cache_dir = cache_dir.clone();
            let entry = store.entry.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                // Each thread has its own Cache handle, as separate jobs would.
                let cache = Cache::new(&cache_dir).unwrap();
                barrier.wait();
                cache.fetch(&opened, &entry, &Progress::none()).unwrap()
            })
        })
        .collect();
    let paths: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(paths.iter().all(|p| p == &paths[0]));
    assert_eq!(fs::read(&paths[0]).unwrap(), fs::read(store.store_dir.join(&store.entry.path)).unwrap());
    assert_eq!(server.count(&format!("/{}", store.entry.path)), 1, "blob downloaded once");
    assert_eq!(cache_files(&cache_dir), vec![store.entry.sha256.clone()]);
}

#[test]
fn unreachable_http_store_is_an_unreachable_error() {
    // Bind and release a loopback port so that nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/store/");
    let err = Store::open(&url, Trust::Insecure).unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&url), "names the URL: {err}");
}

fn sign_key_in(dir: &Path) -> ed25519_dalek::VerifyingKey {
    gridforge_agent::image::sign::keygen(&dir.join(format!("key-{}", uuid::Uuid::new_v4()))).unwrap()
}
