//! Opening stores: signature checks before parsing, lookups, and blob paths that must stay in the store.

mod image_store_common;

use std::fs;
use std::io::Read;

use gridforge_agent::image::{ImageError, Store, Trust, sign};
use image_store_common::{make_store, resign_index};

fn trust(store: &image_store_common::TestStore) -> Trust {
    Trust::Key(store.key.verifying_key())
}

#[test]
fn open_with_the_right_key_reads_the_index() {
    let store = make_store();
    let opened = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap();
    assert_eq!(opened.index().images, vec![store.entry.clone()]);
    assert_eq!(opened.find("debian", "12").unwrap(), &store.entry);

    let mut blob = Vec::new();
    opened.open_blob(&store.entry).unwrap().read_to_end(&mut blob).unwrap();
    assert_eq!(blob, fs::read(store.store_dir.join(&store.entry.path)).unwrap());

    let with_scheme = format!("dir://{}", store.store_dir.display());
    let opened = Store::open(&with_scheme, trust(&store)).unwrap();
    assert_eq!(opened.location(), store.store_dir.canonicalize().unwrap().to_str().unwrap());
}

#[test]
fn open_with_a_public_key_file_as_trust() {
    let store = make_store();
    let pub_path = sign::public_key_path(&store.key_path);
    let key = sign::parse_trusted_key(pub_path.to_str().unwrap()).unwrap();
    Store::open(store.store_dir.to_str().unwrap(), Trust::Key(key)).unwrap();
}

#[test]
fn open_with_a_wrong_key_is_a_bad_signature() {
    let store = make_store();
    let other = store.tmp.path().join("other.key");
    let other_public = sign::keygen(&other).unwrap();
    let err = Store::open(store.store_dir.to_str().unwrap(), Trust::Key(other_public)).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains(store.store_dir.to_str().unwrap()), "names the store: {err}");
}

#[test]
fn missing_signature_is_unsigned_unless_insecure() {
    let store = make_store();
    fs::remove_file(store.store_dir.join("index.json.sig")).unwrap();
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::Unsigned { .. }), "{err}");
    assert!(err.to_string().contains(store.store_dir.to_str().unwrap()), "names the store: {err}");

    let opened = Store::open(store.store_dir.to_str().unwrap(), Trust::Insecure).unwrap();
    assert_eq!(opened.find("debian", "12").unwrap(), &store.entry);
}

#[test]
fn a_single_changed_byte_in_the_index_is_a_bad_signature() {
    let store = make_store();
    let index_path = store.store_dir.join("index.json");
    let mut bytes = fs::read(&index_path).unwrap();
    // Change a digit of the compressed size: still valid JSON, different meaning.
    let at = bytes.windows(18).position(|w| w == b"\"compressed_size\":").unwrap() + 19;
    bytes[at] = if bytes[at] == b'9' { b'1' } else { bytes[at] + 1 };
    fs::write(&index_path, &bytes).unwrap();
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
}

#[test]
fn a_garbled_signature_is_a_bad_signature() {
    let store = make_store();
    fs::write(store.store_dir.join("index.json.sig"), "this is not base64!\n").unwrap();
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
}

#[test]
fn signature_is_checked_before_the_index_is_parsed() {
    let store = make_store();
    fs::write(store.store_dir.join("index.json"), b"{ not json").unwrap();
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::BadSignature { .. }), "{err}");
}

#[test]
fn unknown_image_is_not_found_and_lists_what_is_available() {
    let store = make_store();
    let opened = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap();
    let err = opened.find("ubuntu", "24.04").unwrap_err();
    match &err {
        ImageError::NotFound { name, version, available, .. } => {
            assert_eq!((name.as_str(), version.as_str()), ("ubuntu", "24.04"));
            assert_eq!(available, &vec!["debian 12".to_string()]);
        }
        other => panic!("expected NotFound, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("debian 12") && message.contains(store.store_dir.to_str().unwrap()),
        "{message}"
    );
}

#[test]
fn blob_paths_leaving_the_store_are_refused() {
    for bad_path in [
        "../outside".to_string(),
        "blobs/../../etc/passwd".to_string(),
        "/etc/passwd".to_string(),
        "http://evil.example/blob".to_string(),
        "//evil.example/blob".to_string(),
        "blobs/sha256/%2e%2e/x".to_string(),
    ] {
        let store = make_store();
        resign_index(&store.store_dir, &store.key, |json| {
            json["images"][0]["path"] = bad_path.clone().into()
        });
        let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
        assert!(matches!(err, ImageError::UnsafePath { .. }), "{bad_path}: {err}");
        assert!(err.to_string().contains(&bad_path), "names the path: {err}");
    }
}

#[test]
fn a_symlink_out_of_the_store_is_refused_when_opening_the_blob() {
    let store = make_store();
    let outside = store.tmp.path().join("outside-blob");
    fs::write(&outside, b"not from the store").unwrap();
    let link = store.store_dir.join("blobs/sha256/escape");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    resign_index(&store.store_dir, &store.key, |json| {
        json["images"][0]["path"] = "blobs/sha256/escape".into()
    });
    let opened = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap();
    let entry = opened.find("debian", "12").unwrap();
    let err = opened.open_blob(entry).err().expect("symlink escape must be refused");
    assert!(matches!(err, ImageError::UnsafePath { .. }), "{err}");
}

#[test]
fn malformed_digest_and_unknown_format_version_are_refused() {
    let store = make_store();
    resign_index(&store.store_dir, &store.key, |json| json["images"][0]["sha256"] = "ABC".into());
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::BadIndex { .. }), "{err}");

    let store = make_store();
    resign_index(&store.store_dir, &store.key, |json| json["format_version"] = 2.into());
    let err = Store::open(store.store_dir.to_str().unwrap(), trust(&store)).unwrap_err();
    assert!(matches!(err, ImageError::BadIndex { .. }), "{err}");
}

#[test]
fn missing_store_and_unknown_scheme_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let err = Store::open(missing.to_str().unwrap(), Trust::Insecure).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    assert!(err.to_string().contains(missing.to_str().unwrap()), "{err}");

    let err = Store::open("ftp://example.org/store", Trust::Insecure).unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedLocation { .. }), "{err}");

    let err = Store::open(tmp.path().to_str().unwrap(), Trust::Insecure).unwrap_err();
    assert!(err.to_string().contains("index.json"), "names the missing file: {err}");
}
