//! CRLs from anywhere: arbitrary bytes, or the test CRL with edits. Nothing
//! panics.
//! The body is `p2pvm_security::fuzzing::crl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2pvm_security::fuzzing::crl(input));
