//! Signed wipe reports as `wipe-report verify` checks them. A report that parses is also signed with the
//! test key and verified again, which must succeed: signing and checking agree on the canonical bytes.
#![no_main]

use ed25519_dalek::SigningKey;
use gridforge_agent::wipe::report;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let key = SigningKey::from_bytes(&[9; 32]);
    let _ = report::verify(text, &key.verifying_key());
    if let Ok(mut parsed) = serde_json::from_str::<report::WipeReport>(text) {
        report::sign(&mut parsed, &key);
        let signed = parsed.to_pretty_json();
        let verified = report::verify(&signed, &key.verifying_key());
        assert!(verified.is_ok(), "a freshly signed report does not verify: {verified:?}");
    }
});
