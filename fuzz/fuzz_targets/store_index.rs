//! The store index and its signature. Input: the signature text up to the first newline, then the index
//! bytes. The index is parsed directly, opened as a store with the fuzzed signature (which must fail unless
//! it is the real one) and opened again signed by the test key (which must succeed exactly when it parses).
#![no_main]

use ed25519_dalek::SigningKey;
use gridforge_agent::image::index::Index;
use gridforge_agent::image::sign;
use gridforge_agent::image::store::{Store, Trust};
use gridforge_agent_fuzz::empty_dir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let (sig_text, index_bytes) = (&data[..split], data.get(split + 1..).unwrap_or_default());
    let key = SigningKey::from_bytes(&[7; 32]);
    let trusted = key.verifying_key();

    let parsed = Index::parse(index_bytes, "fuzz");
    let real_sig = sign::sign(&key, index_bytes);
    let fuzzed_sig_valid = sign::verify(&trusted, index_bytes, &String::from_utf8_lossy(sig_text)).is_ok();

    let dir = empty_dir("store");
    std::fs::write(dir.join("index.json"), index_bytes).expect("writing index.json");
    std::fs::write(dir.join("index.json.sig"), sig_text).expect("writing index.json.sig");
    let opened = Store::open(dir.to_str().expect("utf-8 path"), Trust::Key(trusted));
    if !fuzzed_sig_valid {
        assert!(opened.is_err(), "a store opened with a signature that does not verify");
    }

    std::fs::write(dir.join("index.json.sig"), &real_sig).expect("writing index.json.sig");
    let opened = Store::open(dir.to_str().expect("utf-8 path"), Trust::Key(trusted));
    assert_eq!(
        opened.is_ok(),
        parsed.is_ok(),
        "a signed store and its index disagree: {opened:?} {parsed:?}"
    );
    if let Ok(index) = parsed {
        // What the agent writes back must parse again to the same index.
        assert_eq!(Index::parse(&index.to_bytes(), "fuzz").expect("re-parsing a written index"), index);
    }
});
