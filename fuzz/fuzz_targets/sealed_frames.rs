//! Sealed frames of the content fast path as a downloader receives them: arbitrary
//! bytes, or honest frames with edits. Only honest plaintexts ever open, in order.
//! The body is `p2p_service_vm::content::fuzzing::sealed_frames`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2p_service_vm::content::fuzzing::sealed_frames(input));
