//! The channel's back-end against a hostile front-end: arbitrary bytes written
//! into the descriptor tables, rings and buffers of the shared region while
//! the device pump runs. It must never panic, hang or touch memory outside
//! the region (vm-memory would fault the process if it did).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    p2pvm_channel::fuzzing::run_device(data);
});
