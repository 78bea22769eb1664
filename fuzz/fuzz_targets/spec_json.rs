//! VM specs: JSON as the CLI reads a spec file (and the job request carries it), and the protobuf the
//! daemon receives; both validated as a provision validates them before touching a disk.
#![no_main]

use gridforge_agent::provision::spec;
use gridforge_proto::v1::VmSpec;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = serde_json::from_slice::<VmSpec>(data) {
        let _ = spec::validate(&parsed);
        // What the agent prints back must parse again to the same spec.
        let text = serde_json::to_vec(&parsed).expect("a spec serializes");
        assert_eq!(serde_json::from_slice::<VmSpec>(&text).expect("re-parsing a printed spec"), parsed);
    }
    if let Ok(decoded) = VmSpec::decode(data) {
        let _ = spec::validate(&decoded);
    }
});
