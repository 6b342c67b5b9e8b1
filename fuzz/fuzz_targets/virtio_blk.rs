//! virtio-blk against a hostile guest: arbitrary descriptor tables, rings
//! and buffers. The device must not panic or loop, must not touch memory
//! outside the guest's (vm-memory refuses; the sanitizer would see it), and
//! must not grow or shrink the disk image.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::virtio_blk(data);
});
