//! clamd's replies: a verdict is only ever what clamd said.
//! The body is `p2p_service_vm::content::fuzzing::clamd_reply`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2p_service_vm::content::fuzzing::clamd_reply(input));
