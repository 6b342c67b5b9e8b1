//! X.509 certificates from strangers (publisher chains in manifests, trust
//! files): arbitrary bytes, or the test leaf with edits. Nothing panics, and
//! nothing verifies for a peer it does not name.
//! The body is `p2pvm_security::fuzzing::certificate`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2pvm_security::fuzzing::certificate(input));
