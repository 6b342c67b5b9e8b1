//! virtio-net against a datagram socket standing in for the TAP (one packet
//! per read and write, as a TAP behaves).

use super::*;
use crate::devices::virtio::testing::{Driver, R, W, within_5s};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fn device(mergeable: bool) -> (Net, UnixDatagram, Driver) {
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut net = Net::with_host_end(File::from(OwnedFd::from(ours)), MAC, false);
    let mut features = 1 << VIRTIO_NET_F_MAC;
    if mergeable {
        features |= 1 << VIRTIO_NET_F_MRG_RXBUF;
    }
    net.activate(features).unwrap();
    (net, theirs, Driver::with_queues(64, 2))
}

fn packet(len: usize, seed: u8) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    p
}

fn ready(net: &mut Net, d: &mut Driver, events: EventSet) -> QueueMask {
    let fd = net.tap.as_raw_fd();
    let mem = d.mem.clone();
    net.host_fd_ready(fd, events, d.queues(), &mem).unwrap()
}

#[test]
fn transmit_sends_each_packet_whole() {
    let (mut net, peer, mut d) = device(true);
    let p = packet(3000, 1);
    d.mem
        .write_slice(&p[..100], GuestAddress(0x10_0000))
        .unwrap();
    d.mem
        .write_slice(&p[100..], GuestAddress(0x20_0000))
        .unwrap();
    d.push_to(
        1,
        &[R(0x10_0000, 100), R(0x20_0000, (p.len() - 100) as u32)],
    );
    assert_eq!(d.run_queue(&mut net, 1).unwrap(), 1 << TX);
    let mut got = vec![0u8; 70_000];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &p[..]);
    assert_eq!(d.used_idx_of(1), 1);
    assert_eq!(net.stats.tx_packets, 1);
    assert_eq!(net.bytes(), (0, 3000), "payload bytes, not the header");
}

#[test]
fn receive_merges_buffers() {
    let (mut net, peer, mut d) = device(true);
    for i in 0..3 {
        d.push_to(0, &[W(0x30_0000 + i * 0x1000, 1526)]);
    }
    let p = packet(2988, 7);
    peer.send(&p).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(d.used_idx_of(0), 2, "two buffers used");
    assert_eq!(
        (d.used_len_of(0, 0), d.used_len_of(0, 1)),
        (1526, 3000 - 1526)
    );
    let mut got = vec![0u8; 3000];
    d.mem
        .read_slice(&mut got[..1526], GuestAddress(0x30_0000))
        .unwrap();
    d.mem
        .read_slice(&mut got[1526..], GuestAddress(0x30_1000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
}

#[test]
fn a_starved_guest_stops_polling_until_it_posts_buffers() {
    let (mut net, peer, mut d) = device(true);
    peer.send(&packet(100, 2)).unwrap();
    peer.send(&packet(200, 3)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0);
    assert!(
        net.host_fds()[0].1.is_empty(),
        "no IN interest while starved"
    );
    // The guest posts one buffer: one packet goes, the other waits.
    d.push_to(0, &[W(0x30_0000, 2048)]);
    assert_eq!(d.run_queue(&mut net, 0).unwrap(), 1 << RX);
    assert_eq!(d.used_idx_of(0), 1);
    assert_eq!(d.used_len_of(0, 0), 112);
    assert!(net.host_fds()[0].1.is_empty());
    d.push_to(0, &[W(0x30_1000, 2048)]);
    d.run_queue(&mut net, 0).unwrap();
    assert_eq!(d.used_len_of(0, 1), 212);
    assert_eq!(net.stats.rx_packets, 2);
    assert_eq!(net.bytes(), (300, 0));
    assert!(net.host_fds()[0].1.contains(EventSet::IN));
}

#[test]
fn without_mergeable_buffers_a_packet_needs_one_buffer() {
    let (mut net, peer, mut d) = device(false);
    d.push_to(0, &[W(0x30_0000, 1000)]);
    d.push_to(0, &[W(0x31_0000, 9000)]);
    peer.send(&packet(1500, 4)).unwrap();
    peer.send(&packet(1500, 5)).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!(net.stats.rx_dropped, 1);
    assert_eq!(net.stats.rx_packets, 1);
    assert_eq!((d.used_len_of(0, 0), d.used_len_of(0, 1)), (0, 1512));
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    let (mut net, peer, mut d) = device(true);
    // Shorter than a header; writable only; outside memory; absurdly long.
    d.push_to(1, &[R(0x10_0000, 4)]);
    d.push_to(1, &[W(0x10_0000, 64)]);
    d.push_to(1, &[R(0xfff0_0000, 64)]);
    d.push_to(1, &[R(0x10_0000, 0x10_0000)]);
    d.run_queue(&mut net, 1).unwrap();
    assert_eq!(net.stats.tx_dropped, 4);
    assert_eq!(d.used_idx_of(1), 4);
    let mut buf = [0u8; 64];
    assert!(peer.recv(&mut buf).is_err(), "nothing reached the host");
    // An honest packet still goes through.
    d.mem
        .write_slice(&packet(20, 9), GuestAddress(0x10_0000))
        .unwrap();
    d.push_to(1, &[R(0x10_0000, 32)]);
    d.run_queue(&mut net, 1).unwrap();
    assert_eq!(peer.recv(&mut buf).unwrap(), 32);
}

#[test]
fn runt_host_packets_are_dropped() {
    let (mut net, peer, mut d) = device(true);
    d.push_to(0, &[W(0x30_0000, 2048)]);
    peer.send(&[1, 2, 3]).unwrap();
    peer.send(&packet(10, 1)).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!((net.stats.rx_dropped, net.stats.rx_packets), (1, 1));
}

#[test]
fn config_is_the_mac() {
    let (net, _, _) = device(true);
    let mut m = [0u8; 8];
    net.read_config(0, &mut m);
    assert_eq!(&m[..6], &MAC);
    assert_eq!(&m[6..], &[0, 0]);
}

#[test]
fn unusable_buffers_are_returned_once_and_nothing_is_lost_while_waiting() {
    // A good buffer, then one the device cannot write (readable): a packet
    // too big for what is there waits, and nothing is completed twice.
    let (mut net, peer, mut d) = device(true);
    d.enable_event_idx();
    d.push_to(0, &[W(0x30_0000, 512)]);
    d.push_to(0, &[R(0x31_0000, 512)]);
    peer.send(&packet(2000, 3)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0);
    assert_eq!(
        d.used_idx_of(0),
        0,
        "nothing completed while the packet waits"
    );
    // The driver gets a kick point at the ring's end: its next buffer kicks.
    assert_eq!(d.avail_event(0), 2);
    assert!(
        net.host_fds()[0].1.is_empty(),
        "starved: the TAP is not polled"
    );
    d.push_to(0, &[W(0x32_0000, 4096)]);
    d.run_queue(&mut net, 0).unwrap();
    // Delivered over the two usable buffers; the readable one came back empty.
    assert_eq!(d.used_idx_of(0), 3);
    let lens: Vec<u32> = (0..3).map(|i| d.used_len_of(0, i)).collect();
    assert_eq!(lens, vec![512, 2012 - 512, 0]);
    assert_eq!(net.stats.rx_packets, 1);
}

#[test]
fn a_packet_the_whole_ring_cannot_hold_is_dropped() {
    let (mut net, peer, mut d) = device(true);
    // 64 entries of 64 bytes: 4 KiB in all, less than the packet.
    for i in 0..64 {
        d.push_to(0, &[W(0x30_0000 + i * 0x100, 64)]);
    }
    peer.send(&packet(6000, 1)).unwrap();
    peer.send(&packet(100, 2)).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!(net.stats.rx_dropped, 1);
    assert_eq!(d.used_idx_of(0), 64, "every buffer came back, empty");
    // The next packet fits once buffers are posted again.
    for i in 0..4 {
        d.push_to(0, &[W(0x40_0000 + i * 0x100, 64)]);
    }
    d.run_queue(&mut net, 0).unwrap();
    assert_eq!(net.stats.rx_packets, 1);
}

#[test]
fn a_failed_tap_stops_the_device() {
    let (mut net, _peer, mut d) = device(true);
    let fd = net.tap.as_raw_fd();
    let mem = d.mem.clone();
    assert!(
        net.host_fd_ready(fd, EventSet::ERROR, d.queues(), &mem)
            .is_err()
    );
}

/// Whether `fd` becomes readable within `ms`.
fn readable_within(fd: &OwnedFd, ms: u16) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap() == 1
}

/// The receive queue's moderation timer (a duplicate: same timer).
fn rx_timer(net: &Net) -> OwnedFd {
    net.moderation[RX]
        .as_ref()
        .unwrap()
        .timer()
        .try_clone_to_owned()
        .unwrap()
}

/// A moderated device whose receive queue has seen a stream 2 ms apart, so
/// that its next packet is held.
fn moderated_in_a_stream(buffers: u64) -> (Net, UnixDatagram, Driver) {
    let (net, peer, mut d) = device(true);
    let mut net = net.with_moderation().unwrap();
    for i in 0..buffers {
        d.push_to(0, &[W(0x30_0000 + i * 0x1000, 2048)]);
    }
    peer.send(&packet(100, 1)).unwrap();
    assert_eq!(
        ready(&mut net, &mut d, EventSet::IN),
        1 << RX,
        "a quiet link"
    );
    std::thread::sleep(std::time::Duration::from_millis(2));
    (net, peer, d)
}

#[test]
fn moderated_packets_reach_the_ring_at_once_and_are_signalled_together() {
    let (mut net, peer, mut d) = moderated_in_a_stream(4);
    assert_eq!(
        net.host_fds()[1],
        (net.moderation[RX].as_ref().unwrap().fd(), EventSet::IN),
        "the timer is watched"
    );
    peer.send(&packet(100, 2)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0, "held");
    peer.send(&packet(100, 3)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0, "joins the hold");
    assert_eq!(d.used_idx_of(0), 3, "held packets are in the ring already");
    assert_eq!(
        hold_ends(&mut net, &mut d, RX),
        1 << RX,
        "one interrupt for both"
    );
}

/// Waits for queue `q`'s hold to end and hands the device its timer.
fn hold_ends(net: &mut Net, d: &mut Driver, q: usize) -> QueueMask {
    let m = net.moderation[q].as_ref().unwrap();
    let timer = m.timer().try_clone_to_owned().unwrap();
    let fd = m.fd();
    assert!(readable_within(&timer, 10_000), "the hold ends");
    let mem = d.mem.clone();
    net.host_fd_ready(fd, EventSet::IN, d.queues(), &mem)
        .unwrap()
}

#[test]
fn a_guest_out_of_receive_buffers_is_told_at_once() {
    let (mut net, peer, mut d) = moderated_in_a_stream(2);
    // The second packet takes the last buffer, the third finds none.
    peer.send(&packet(100, 2)).unwrap();
    peer.send(&packet(100, 3)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(d.used_idx_of(0), 2);
}

#[test]
fn half_a_transmit_ring_waiting_is_signalled_at_once() {
    let (net, _peer, mut d) = device(true);
    let mut net = net.with_moderation().unwrap();
    let p = packet(64, 1);
    d.mem.write_slice(&p, GuestAddress(0x10_0000)).unwrap();
    let send = |d: &mut Driver, net: &mut Net, n: usize| {
        for _ in 0..n {
            d.push_to(1, &[R(0x10_0000, p.len() as u32)]);
        }
        d.run_queue(net, 1).unwrap()
    };
    assert_eq!(send(&mut d, &mut net, 1), 1 << TX);
    std::thread::sleep(std::time::Duration::from_millis(2));
    assert_eq!(send(&mut d, &mut net, 1), 0, "held");
    // Queues are 64 long here: 32 waiting is half the ring.
    assert_eq!(send(&mut d, &mut net, 31), 1 << TX);
    assert_eq!(net.stats.tx_packets, 33);
}

#[test]
fn a_reset_forgets_a_running_hold() {
    let (mut net, peer, mut d) = moderated_in_a_stream(3);
    let timer = rx_timer(&net);
    peer.send(&packet(100, 2)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0, "held");
    net.reset();
    assert!(!readable_within(&timer, 20), "the reset disarmed the timer");
    net.activate(1 << VIRTIO_NET_F_MRG_RXBUF).unwrap();
    peer.send(&packet(100, 3)).unwrap();
    assert_eq!(
        ready(&mut net, &mut d, EventSet::IN),
        1 << RX,
        "after a reset the next packet goes at once"
    );
}

#[test]
fn unmoderated_devices_watch_no_timer() {
    let (net, _peer, _d) = device(true);
    assert_eq!(net.host_fds().len(), 1);
    assert_eq!(net.with_moderation().unwrap().host_fds().len(), 3);
}

#[test]
fn during_a_transmit_hold_kicks_stay_off_and_the_timer_sends_what_came() {
    let (net, peer, mut d) = device(true);
    let mut net = net.with_moderation().unwrap();
    d.enable_event_idx();
    let p = packet(64, 1);
    d.mem.write_slice(&p, GuestAddress(0x10_0000)).unwrap();
    let chain = [R(0x10_0000, p.len() as u32)];
    d.push_to(1, &chain);
    assert_eq!(d.run_queue(&mut net, 1).unwrap(), 1 << TX, "quiet: at once");
    assert_eq!(d.avail_event(1), 1, "kicks on for the next packet");
    std::thread::sleep(std::time::Duration::from_millis(2));
    d.push_to(1, &chain);
    assert_eq!(d.run_queue(&mut net, 1).unwrap(), 0, "held");
    assert_eq!(d.avail_event(1), 1, "kicks stay off while held");
    // The driver adds a packet and, by event-index, does not kick.
    d.push_to(1, &chain);
    assert_eq!(hold_ends(&mut net, &mut d, TX), 1 << TX);
    assert_eq!(net.stats.tx_packets, 3, "the unkicked packet went too");
    assert_eq!(d.used_idx_of(1), 3);
    assert_eq!(d.avail_event(1), 3, "kicks back on after the hold");
    let mut got = [0u8; 256];
    for _ in 0..3 {
        assert_eq!(peer.recv(&mut got).unwrap(), p.len());
    }
}

/// A device in a stream of large packets, with `chains` receive buffers of
/// 4 KiB from 0x40_0000.
fn streaming(chains: u64) -> (Net, UnixDatagram, Driver) {
    let (mut net, peer, mut d) = device(true);
    net.rx_last_len = DIRECT_FROM;
    for i in 0..chains {
        d.push_to(0, &[W(0x40_0000 + i * 0x1000, 4096)]);
    }
    (net, peer, d)
}

fn guest_bytes(d: &Driver, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    d.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
fn large_packets_go_straight_into_guest_buffers_and_unfilled_ones_go_back() {
    let (mut net, peer, mut d) = streaming(40);
    let p = packet(10_000, 9);
    peer.send(&p).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(d.used_idx_of(0), 3, "three 4 KiB buffers for 10,012 bytes");
    assert_eq!(
        (0..3).map(|n| d.used_len_of(0, n)).collect::<Vec<_>>(),
        [4096, 4096, 10_012 - 8192]
    );
    let got = guest_bytes(&d, 0x40_0000, p.len());
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
    // The chains it did not fill were put back: the next packet starts in
    // the fourth buffer.
    let q = packet(20_000, 4);
    peer.send(&q).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!(d.used_idx_of(0), 3 + 5);
    let got = guest_bytes(&d, 0x40_3000, q.len());
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 5);
    assert_eq!(&got[VNET_HDR_LEN..], &q[VNET_HDR_LEN..]);
    assert_eq!(net.stats.rx_packets, 2);
}

#[test]
fn with_too_few_buffers_for_the_largest_packet_it_goes_the_buffered_way() {
    let (mut net, peer, mut d) = streaming(3);
    let p = packet(3000, 5);
    peer.send(&p).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(d.used_idx_of(0), 1);
    assert_eq!(d.used_len_of(0, 0), 3012);
    assert_eq!(
        &guest_bytes(&d, 0x40_0000, p.len())[VNET_HDR_LEN..],
        &p[VNET_HDR_LEN..]
    );
}

#[test]
fn nothing_to_read_puts_every_chain_back() {
    let (mut net, peer, mut d) = streaming(20);
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 0);
    assert_eq!(d.used_idx_of(0), 0);
    let p = packet(100, 6);
    peer.send(&p).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!(d.used_idx_of(0), 1);
    assert_eq!(
        &guest_bytes(&d, 0x40_0000, p.len())[VNET_HDR_LEN..],
        &p[VNET_HDR_LEN..],
        "the first buffer is still the first"
    );
    assert_eq!(
        net.rx_last_len,
        p.len(),
        "small packets: back to the buffered way"
    );
}

#[test]
fn a_runt_read_straight_in_is_dropped_and_its_chains_go_back() {
    let (mut net, peer, mut d) = streaming(20);
    peer.send(&[0u8; 5]).unwrap();
    peer.send(&packet(100, 7)).unwrap();
    ready(&mut net, &mut d, EventSet::IN);
    assert_eq!(net.stats.rx_dropped, 1);
    assert_eq!(net.stats.rx_packets, 1);
    assert_eq!(d.used_idx_of(0), 1);
    assert_eq!(d.used_len_of(0, 0), 112);
}

#[test]
fn held_packets_are_signalled_at_once_when_the_guest_runs_out_of_buffers() {
    let (mut net, peer, mut d) = moderated_in_a_stream(2);
    peer.send(&packet(100, 2)).unwrap();
    assert_eq!(
        ready(&mut net, &mut d, EventSet::IN),
        0,
        "held; no buffer left"
    );
    // The next packet finds no buffer: nothing new is delivered, but the
    // guest must hear of the held one now to post more.
    peer.send(&packet(100, 3)).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(d.used_idx_of(0), 2);
}

#[test]
fn an_unreadable_transmit_ring_entry_is_an_error_not_a_spin() {
    let (mut net, _peer, mut d) = device(true);
    d.put_avail_ring_past_the_end(TX);
    let r = within_5s(move || d.run_queue(&mut net, TX));
    assert!(
        matches!(r, Err(DeviceError::Queue { queue: TX, .. })),
        "{r:?}"
    );
}

#[test]
fn an_unreadable_receive_ring_entry_is_an_error_not_a_spin() {
    for streaming in [false, true] {
        let (mut net, peer, mut d) = device(true);
        if streaming {
            // Through `receive_direct` first.
            net.rx_last_len = DIRECT_FROM;
        }
        d.put_avail_ring_past_the_end(RX);
        peer.send(&packet(100, 1)).unwrap();
        let r = within_5s(move || {
            let fd = net.tap.as_raw_fd();
            let mem = d.mem.clone();
            net.host_fd_ready(fd, EventSet::IN, d.queues(), &mem)
        });
        assert!(
            matches!(r, Err(DeviceError::Queue { queue: RX, .. })),
            "streaming {streaming}: {r:?}"
        );
    }
}

#[test]
fn buffers_too_fragmented_for_one_readv_go_the_buffered_way() {
    // 20 chains of 512 descriptors of 8 bytes: enough room for the largest
    // packet, in far more pieces than one readv takes (UIO_MAXIOV).
    let (mut net, peer, mut d) = device(true);
    net.rx_last_len = DIRECT_FROM;
    for c in 0..20u64 {
        let data = 0x40_0000 + c * 0x1000;
        let bufs: Vec<_> = (0..512u64).map(|i| W(data + i * 8, 8)).collect();
        d.push_indirect_to(RX, 0x80_0000 + c * 0x2000, &bufs);
    }
    let p = packet(20 << 10, 3);
    peer.send(&p).unwrap();
    assert_eq!(ready(&mut net, &mut d, EventSet::IN), 1 << RX);
    assert_eq!(net.stats.rx_packets, 1);
    let chains = p.len().div_ceil(4096) as u16;
    assert_eq!(d.used_idx_of(0), chains);
    let got = guest_bytes(&d, 0x40_0000, p.len());
    assert_eq!(
        u16::from_le_bytes([got[10], got[11]]),
        chains,
        "num_buffers"
    );
    assert_eq!(&got[VNET_HDR_LEN..], &p[VNET_HDR_LEN..]);
}
