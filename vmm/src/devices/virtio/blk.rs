//! virtio-blk (placeholder while the transport is tested).
