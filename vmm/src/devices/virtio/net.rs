//! virtio-net (placeholder while the transport is tested).
