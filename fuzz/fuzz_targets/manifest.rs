//! Manifests from peers: arbitrary bytes, or an honest signed manifest with
//! edits. Nothing verifies that its publisher did not sign.
//! The body is `p2p_service_vm::content::fuzzing::manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2p_service_vm::content::fuzzing::manifest(input));
