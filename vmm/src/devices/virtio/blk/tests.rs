//! virtio-blk requests against a real image file and plain guest memory,
//! honest and hostile.

use super::*;
use crate::devices::virtio::testing::{Driver, R, W};
use vm_memory::{Bytes, GuestAddress};

const STATUS: u64 = 0x9_0000;
const HDR: u64 = 0xa_0000;
const DATA: u64 = 0xb_0000;

fn disk(sectors: u64, read_only: bool) -> (Block, tempfile::NamedTempFile) {
    let f = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..sectors * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    std::fs::write(f.path(), &pattern).unwrap();
    (Block::open(f.path(), read_only).unwrap(), f)
}

fn header(d: &Driver, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn status(d: &Driver) -> u8 {
    d.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn write_fsync_read_round_trip() {
    let (mut blk, file) = disk(64, false);
    let mut d = Driver::new(256);
    let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    d.mem.write_slice(&payload, GuestAddress(DATA)).unwrap();
    header(&d, VIRTIO_BLK_T_OUT, 8);
    // Data split over two descriptors, as the block layer does.
    d.push(&[
        R(HDR, 16),
        R(DATA, 1000),
        R(DATA + 1000, 3096),
        W(STATUS, 1),
    ]);
    d.run(&mut blk);
    assert_eq!(status(&d), VIRTIO_BLK_S_OK);
    assert_eq!(d.used(0), 1, "only the status byte was written");
    header(&d, VIRTIO_BLK_T_FLUSH, 0);
    d.push(&[R(HDR, 16), W(STATUS, 1)]);
    d.run(&mut blk);
    assert_eq!((status(&d), blk.stats.flushes), (VIRTIO_BLK_S_OK, 1));
    // On disk, at sector 8.
    let on_disk = std::fs::read(file.path()).unwrap();
    assert_eq!(&on_disk[4096..8192], &payload[..]);
    // Read back into other buffers.
    header(&d, VIRTIO_BLK_T_IN, 8);
    d.push(&[
        R(HDR, 16),
        W(DATA + 0x10000, 512),
        W(DATA + 0x20000, 3584),
        W(STATUS, 1),
    ]);
    d.run(&mut blk);
    assert_eq!(status(&d), VIRTIO_BLK_S_OK);
    assert_eq!(d.used(2), 4097);
    let mut back = vec![0u8; 4096];
    d.mem
        .read_slice(&mut back[..512], GuestAddress(DATA + 0x10000))
        .unwrap();
    d.mem
        .read_slice(&mut back[512..], GuestAddress(DATA + 0x20000))
        .unwrap();
    assert_eq!(back, payload);
    assert_eq!(blk.stats.ok, 3);
    // The figures count the data, not headers or status bytes.
    assert_eq!(blk.bytes(), (4096, 4096));
}

#[test]
fn config_and_features() {
    let (blk, _f) = disk(100, true);
    let mut cap = [0u8; 8];
    blk.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 100);
    let mut seg = [0u8; 4];
    blk.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    let mut past = [0xffu8; 4];
    blk.read_config(0x100, &mut past);
    assert_eq!(past, [0; 4]);
    assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn refused_requests_get_error_status_and_leave_the_disk_alone() {
    let (mut blk, file) = disk(16, false);
    let before = std::fs::read(file.path()).unwrap();
    let mut d = Driver::new(256);
    let cases: &[(u32, u64, u32, u8)] = &[
        // Past the end; overflowing sector arithmetic; not a whole sector.
        (VIRTIO_BLK_T_OUT, 16, 512, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_OUT, u64::MAX, 512, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_OUT, 0, 100, VIRTIO_BLK_S_IOERR),
        (VIRTIO_BLK_T_IN, 15, 1024, VIRTIO_BLK_S_IOERR),
        // Unknown request types.
        (11, 0, 512, VIRTIO_BLK_S_UNSUPP),
        (0xdead_beef, 0, 512, VIRTIO_BLK_S_UNSUPP),
    ];
    for &(kind, sector, len, want) in cases {
        header(&d, kind, sector);
        if kind == VIRTIO_BLK_T_IN {
            d.push(&[R(HDR, 16), W(DATA, len), W(STATUS, 1)]);
        } else {
            d.push(&[R(HDR, 16), R(DATA, len), W(STATUS, 1)]);
        }
        d.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
        d.run(&mut blk);
        assert_eq!(status(&d), want, "kind {kind:#x} sector {sector} len {len}");
    }
    assert_eq!(std::fs::read(file.path()).unwrap(), before);
    // A read-only disk refuses writes.
    let (mut ro, ro_file) = disk(16, true);
    let ro_before = std::fs::read(ro_file.path()).unwrap();
    header(&d, VIRTIO_BLK_T_OUT, 0);
    d.push(&[R(HDR, 16), R(DATA, 512), W(STATUS, 1)]);
    d.run(&mut ro);
    assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(ro_file.path()).unwrap(), ro_before);
}

#[test]
fn hostile_chains_are_survived() {
    let (mut blk, file) = disk(16, false);
    let before = std::fs::read(file.path()).unwrap();
    let mut d = Driver::new(16);
    header(&d, VIRTIO_BLK_T_OUT, 0);
    // No status byte at all; status only readable; header too short.
    d.push(&[R(HDR, 16), R(DATA, 512)]);
    d.push(&[R(HDR, 16), R(STATUS, 1)]);
    d.run(&mut blk);
    assert_eq!(blk.stats.malformed, 2);
    header(&d, VIRTIO_BLK_T_IN, 0);
    d.push(&[R(HDR, 8), W(DATA, 512), W(STATUS, 1)]);
    d.run(&mut blk);
    assert_eq!(status(&d), VIRTIO_BLK_S_IOERR);
    // Buffers outside guest memory, or huge: no I/O happens.
    header(&d, VIRTIO_BLK_T_OUT, 0);
    d.push(&[R(HDR, 16), R(0xffff_0000, 512), W(STATUS, 1)]);
    d.push(&[R(HDR, 16), R(DATA, u32::MAX), W(STATUS, 1)]);
    // Writable then readable.
    d.push(&[R(HDR, 16), W(DATA, 512), R(DATA, 512), W(STATUS, 1)]);
    // A descriptor whose `next` points back at itself.
    d.push_looping(R(HDR, 16));
    d.run(&mut blk);
    assert_eq!(blk.stats.malformed, 2 + 4);
    // Every chain was returned, the disk is untouched, and the device still
    // serves an honest request.
    assert_eq!(std::fs::read(file.path()).unwrap(), before);
    header(&d, VIRTIO_BLK_T_IN, 1);
    d.push(&[R(HDR, 16), W(DATA, 512), W(STATUS, 1)]);
    d.run(&mut blk);
    assert_eq!(status(&d), VIRTIO_BLK_S_OK);
    let mut first = [0u8; 4];
    d.mem.read_slice(&mut first, GuestAddress(DATA)).unwrap();
    assert_eq!(
        first,
        [
            (512 % 251) as u8,
            (513 % 251) as u8,
            (514 % 251) as u8,
            (515 % 251) as u8
        ]
    );
    assert_eq!(d.used_idx(), d.pushed());
}

#[test]
fn get_id_names_the_image() {
    let (mut blk, f) = disk(1, false);
    let mut d = Driver::new(16);
    header(&d, VIRTIO_BLK_T_GET_ID, 0);
    d.push(&[R(HDR, 16), W(DATA, 20), W(STATUS, 1)]);
    d.run(&mut blk);
    let mut id = [0u8; 20];
    d.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    let name = f.path().file_name().unwrap().to_string_lossy().into_owned();
    let n = name.len().min(20);
    assert_eq!(&id[..n], &name.as_bytes()[..n]);
}
