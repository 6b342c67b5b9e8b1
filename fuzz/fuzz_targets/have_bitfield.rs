//! `Have` bitfields from providers, and the schedule's rarity counts built from
//! them.
//! The body is `p2p_service_vm::content::fuzzing::have_bitfield`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| p2p_service_vm::content::fuzzing::have_bitfield(input));
