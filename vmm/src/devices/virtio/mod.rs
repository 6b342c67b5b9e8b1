//! virtio.
