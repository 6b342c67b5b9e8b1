//! virtio-net against a hostile guest (both queues, arbitrary memory) and an
//! arbitrary packet from the host side. No panic, no loop, no access outside
//! guest memory, and nothing shorter than a virtio-net header reaches the host.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::fuzzing::virtio_net(data);
});
