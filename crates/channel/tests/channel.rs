//! The channel end to end inside one process: a real region (sealed memfd),
//! real eventfds from the broker, the device pump on `virtio-queue` and our
//! driver pump — plus a hostile front-end that writes the region by hand.

use std::time::Duration;

use p2pvm_channel::layout::{Status, TO_DEVICE, field};
use p2pvm_channel::{Acceptor, Broker, Connector, Layout, LinkState, Region, Side};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vm_memory::{Bytes, GuestAddress};

const WAIT: Duration = Duration::from_secs(10);

/// A broker serving on a socketpair-less path: answers each attach inline.
struct Setup {
    broker: Broker,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(layout: Layout) -> Self {
        Self {
            broker: Broker::new(layout).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn endpoint(&self, side: Side) -> p2pvm_channel::Endpoint {
        let path = self.dir.path().join("broker.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let client = std::thread::spawn(move || p2pvm_channel::attach(&path, side).unwrap());
        let (conn, _) = listener.accept().unwrap();
        assert_eq!(self.broker.answer(conn).unwrap(), side);
        client.join().unwrap()
    }

    fn device(&self, shutdown: &CancellationToken) -> Acceptor {
        let ep = self.endpoint(Side::Device);
        let (pump, acceptor) = p2pvm_channel::device(ep.region.clone(), ep.events().unwrap());
        tokio::spawn(pump.run(shutdown.clone()));
        acceptor
    }

    fn driver(&self, shutdown: &CancellationToken) -> Connector {
        let ep = self.endpoint(Side::Driver);
        let (pump, connector) = p2pvm_channel::driver(ep.region.clone(), ep.events().unwrap());
        tokio::spawn(pump.run(shutdown.clone()));
        connector
    }
}

fn spawn_echo(mut acc: Acceptor) {
    tokio::spawn(async move {
        while let Some(s) = acc.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
}

async fn wait_state(
    mut rx: tokio::sync::watch::Receiver<LinkState>,
    f: impl Fn(&LinkState) -> bool,
) -> LinkState {
    tokio::time::timeout(WAIT, async {
        loop {
            let s = rx.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
            rx.changed().await.expect("pump alive");
        }
    })
    .await
    .expect("link state reached in time")
}

async fn echo_roundtrip(c: &Connector, data: &[u8]) -> Vec<u8> {
    let s = c.open();
    let (mut r, mut w) = tokio::io::split(s);
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .unwrap();
    writer.await.unwrap();
    back
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_echo_small_and_large() {
    let setup = Setup::new(Layout::new(64, 16384).unwrap());
    let stop = CancellationToken::new();
    spawn_echo(setup.device(&stop));
    let c = setup.driver(&stop);
    assert_eq!(echo_roundtrip(&c, b"hello").await, b"hello");
    // Far more than one buffer, one window and one ring's worth of buffers.
    let big = pattern(9 << 20, 7);
    assert!(echo_roundtrip(&c, &big).await == big, "large echo differs");
    // Many sessions at once.
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let d = pattern(100_000 + usize::from(i) * 1000, i);
            assert!(echo_roundtrip(&c, &d).await == d, "session {i} differs");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_indices_wrap() {
    // 70,000 messages each way pass the u16 ring indices' wrap point.
    let setup = Setup::new(Layout::new(8, 4096).unwrap());
    let stop = CancellationToken::new();
    spawn_echo(setup.device(&stop));
    let c = setup.driver(&stop);
    let s = c.open();
    let (mut r, mut w) = tokio::io::split(s);
    let n = 70_000usize;
    let writer = tokio::spawn(async move {
        for i in 0..n {
            w.write_all(&(i as u32).to_le_bytes()).await.unwrap();
            // Yield so each write becomes its own message most of the time.
            if i % 2 == 0 {
                tokio::task::yield_now().await;
            }
        }
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), n * 4);
    for (i, c) in back.chunks(4).enumerate() {
        assert_eq!(u32::from_le_bytes(c.try_into().unwrap()), i as u32);
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_stream_does_not_starve_small_requests() {
    let setup = Setup::new(Layout::new(32, 65536).unwrap());
    let stop = CancellationToken::new();
    let mut acc = setup.device(&stop);
    // Device: session 1 gets an endless firehose; others are echoed.
    tokio::spawn(async move {
        let mut first = true;
        while let Some(mut s) = acc.accept().await {
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let chunk = vec![0x55u8; 1 << 20];
                    while s.write_all(&chunk).await.is_ok() {}
                });
            } else {
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(s);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }
    });
    let c = setup.driver(&stop);
    let film = c.open();
    // The film's reader is slow: it drains 64 KiB every millisecond.
    let (mut fr, _fw) = tokio::io::split(film);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            if fr.read(&mut buf).await.unwrap_or(0) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20u8 {
        let d = pattern(64, i);
        let t = std::time::Instant::now();
        assert_eq!(echo_roundtrip(&c, &d).await, d);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            t.elapsed()
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_restart_resets_sessions_and_the_channel_comes_back() {
    let setup = Setup::new(Layout::new(16, 8192).unwrap());
    let dev_stop = CancellationToken::new();
    spawn_echo(setup.device(&dev_stop));
    let stop = CancellationToken::new();
    let c = setup.driver(&stop);
    assert_eq!(echo_roundtrip(&c, b"one").await, b"one");
    let mut live = c.open();
    live.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    live.read_exact(&mut b).await.unwrap();
    // The service side dies and a new one starts on the same region.
    dev_stop.cancel();
    let err = tokio::time::timeout(WAIT, live.read(&mut b))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    let dev2 = CancellationToken::new();
    spawn_echo(setup.device(&dev2));
    let st = wait_state(
        c.state(),
        |s| matches!(s, LinkState::Up { resets } if *resets >= 1),
    )
    .await;
    assert!(matches!(st, LinkState::Up { .. }));
    assert_eq!(echo_roundtrip(&c, b"two").await, b"two");
    stop.cancel();
    dev2.cancel();
}

/// A front-end that speaks the handshake by hand and then misbehaves.
struct Hostile {
    region: Region,
    ep: p2pvm_channel::Endpoint,
    generation: u32,
}

impl Hostile {
    fn new(setup: &Setup) -> Self {
        let ep = setup.endpoint(Side::Driver);
        Self {
            region: ep.region.clone(),
            generation: ep.region.load_u32(field::DRIVER_GEN),
            ep,
        }
    }

    fn kick(&self) {
        rustix::io::write(&self.ep.peer, &1u64.to_ne_bytes()).unwrap();
    }

    /// Re-initialises with zeroed rings and waits for the device to attach.
    async fn attach(&mut self) {
        let r = &self.region;
        let l = *r.layout();
        r.store_u32(field::DRIVER_STATUS, Status::Resetting as u32);
        self.generation += 1;
        r.store_u32(field::DRIVER_GEN, self.generation);
        self.kick();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for q in l.queues {
            let span = q.used + 6 + 8 * u64::from(l.queue_size) - q.desc;
            r.mem()
                .write_slice(&vec![0u8; span as usize], GuestAddress(q.desc))
                .unwrap();
        }
        r.store_u32(field::DRIVER_STATUS, Status::Ready as u32);
        self.kick();
        let g = self.generation;
        tokio::time::timeout(WAIT, async {
            while r.load_u32(field::DEVICE_ATTACHED) != g {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("device attached to the hostile front-end");
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let q = self.region.layout().queues[TO_DEVICE];
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.region
            .mem()
            .write_slice(&d, GuestAddress(q.desc_entry(i)))
            .unwrap();
    }

    fn offer(&self, heads: &[u16], idx: u16) {
        let q = self.region.layout().queues[TO_DEVICE];
        for (k, h) in heads.iter().enumerate() {
            self.region
                .mem()
                .write_obj(*h, GuestAddress(q.avail_entry(k as u16)))
                .unwrap();
        }
        self.region
            .mem()
            .write_obj(idx, GuestAddress(q.avail_idx()))
            .unwrap();
        self.kick();
    }

    /// Waits for the device to give up on this generation; returns its reason code.
    async fn expect_reset(&self) -> u32 {
        let r = &self.region;
        let g = self.generation;
        tokio::time::timeout(WAIT, async {
            while r.load_u32(field::DEVICE_ATTACHED) == g {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the device reset the channel");
        r.load_u32(field::DEVICE_REASON)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_front_end_is_reset_and_a_good_one_is_served_again() {
    use p2pvm_channel::layout::ResetReason;
    let layout = Layout::new(16, 4096).unwrap();
    let setup = Setup::new(layout);
    let stop = CancellationToken::new();
    let acc = setup.device(&stop);
    let device_state = acc.state();
    spawn_echo(acc);
    let mut h = Hostile::new(&setup);
    let buf0 = layout.buffer(TO_DEVICE, 0);
    type Case = (&'static str, Box<dyn Fn(&Hostile)>, ResetReason);
    let cases: Vec<Case> = vec![
        (
            "avail index far ahead",
            Box::new(|h| h.offer(&[], 1000)),
            ResetReason::BadRing,
        ),
        (
            "descriptor past the region",
            Box::new(move |h| {
                h.desc(0, layout.size + 4096, 64, 0, 0);
                h.offer(&[0], 1);
            }),
            ResetReason::BadRing,
        ),
        (
            "huge length",
            Box::new(move |h| {
                h.desc(0, buf0, u32::MAX, 0, 0);
                h.offer(&[0], 1);
            }),
            ResetReason::BadRing,
        ),
        (
            "descriptor loop of garbage",
            Box::new(move |h| {
                h.region
                    .mem()
                    .write_slice(&[0xffu8; 16], GuestAddress(buf0))
                    .unwrap();
                h.desc(0, buf0, 16, 1, 1);
                h.desc(1, buf0, 16, 1, 0);
                h.offer(&[0], 1);
            }),
            ResetReason::BadRing,
        ),
        (
            "indirect descriptor table",
            Box::new(move |h| {
                // VIRTQ_DESC_F_INDIRECT: never offered, so never walked.
                h.desc(0, buf0, 16 * 16, 4, 0);
                h.offer(&[0], 1);
            }),
            ResetReason::BadRing,
        ),
        (
            "empty DATA",
            Box::new(move |h| {
                use p2pvm_channel::wire::{Header, Kind};
                let b1 = layout.buffer(TO_DEVICE, 1);
                let mem = h.region.mem();
                mem.write_slice(
                    &Header::control(Kind::Open, 3, 0).encode(),
                    GuestAddress(buf0),
                )
                .unwrap();
                let empty = Header {
                    kind: Kind::Data,
                    session: 3,
                    len: 0,
                    value: 0,
                };
                mem.write_slice(&empty.encode(), GuestAddress(b1)).unwrap();
                h.desc(0, buf0, 16, 0, 0);
                h.desc(1, b1, 16, 0, 0);
                h.offer(&[0, 1], 2);
            }),
            ResetReason::BadMessage,
        ),
        (
            "head index out of range",
            Box::new(|h| h.offer(&[999], 1)),
            ResetReason::BadMessage,
        ),
        (
            "payload longer than the chain",
            Box::new(move |h| {
                let hdr = p2pvm_channel::wire::Header {
                    kind: p2pvm_channel::wire::Kind::Data,
                    session: 1,
                    len: 4000,
                    value: 0,
                };
                h.region
                    .mem()
                    .write_slice(&hdr.encode(), GuestAddress(buf0))
                    .unwrap();
                h.desc(0, buf0, 100, 0, 0);
                h.offer(&[0], 1);
            }),
            ResetReason::BadMessage,
        ),
    ];
    for (name, act, want) in cases {
        h.attach().await;
        act(&h);
        let reason = h.expect_reset().await;
        assert_eq!(reason, want as u32, "case {name}: reason {reason}");
    }
    // A session that sends beyond its window: OPEN, then full buffers offered
    // one batch at a time until the device has seen more than 1 MiB.
    {
        use p2pvm_channel::wire::{Header, Kind};
        h.attach().await;
        let q = layout.queues[TO_DEVICE];
        let mem = h.region.mem();
        mem.write_slice(
            &Header::control(Kind::Open, 7, 0).encode(),
            GuestAddress(buf0),
        )
        .unwrap();
        h.desc(0, buf0, 16, 0, 0);
        let b1 = layout.buffer(TO_DEVICE, 1);
        let data = Header {
            kind: Kind::Data,
            session: 7,
            len: 4080,
            value: 0,
        };
        mem.write_slice(&data.encode(), GuestAddress(b1)).unwrap();
        h.desc(1, b1, 4096, 0, 0);
        h.offer(&[0], 1);
        let mut idx: u16 = 1;
        while h.region.load_u32(field::DEVICE_ATTACHED) == h.generation && idx < 2000 {
            // Wait for the device to consume what was offered, then offer more.
            let used: u16 = mem.read_obj(GuestAddress(q.used_idx())).unwrap();
            if used == idx {
                for _ in 0..8 {
                    mem.write_obj(1u16, GuestAddress(q.avail_entry(idx % layout.queue_size)))
                        .unwrap();
                    idx = idx.wrapping_add(1);
                }
                mem.write_obj(idx, GuestAddress(q.avail_idx())).unwrap();
                h.kick();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(h.expect_reset().await, ResetReason::FlowControl as u32);
        assert!(
            u64::from(idx) * 4080 > p2pvm_channel::DEVICE_WINDOW,
            "reset only after the window was exceeded"
        );
    }
    // OPENs beyond the session limit while no receive buffer is ever posted:
    // the refusals cannot be sent, and once too many are owed the device
    // resets instead of queueing them without end.
    {
        use p2pvm_channel::wire::{Header, Kind};
        h.attach().await;
        let q = layout.queues[TO_DEVICE];
        let mem = h.region.mem();
        let qs = layout.queue_size;
        let mut next_session = 1u32;
        let mut idx: u16 = 0;
        let target = p2pvm_channel::MAX_SESSIONS as u32 + 1100;
        while h.region.load_u32(field::DEVICE_ATTACHED) == h.generation && next_session < target {
            let used: u16 = mem.read_obj(GuestAddress(q.used_idx())).unwrap();
            if used == idx {
                for slot in 0..qs {
                    let b = layout.buffer(TO_DEVICE, slot);
                    let open = Header::control(Kind::Open, next_session, 0);
                    mem.write_slice(&open.encode(), GuestAddress(b)).unwrap();
                    h.desc(slot, b, 16, 0, 0);
                    mem.write_obj(slot, GuestAddress(q.avail_entry(idx % qs)))
                        .unwrap();
                    idx = idx.wrapping_add(1);
                    next_session += 1;
                }
                mem.write_obj(idx, GuestAddress(q.avail_idx())).unwrap();
                h.kick();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(h.expect_reset().await, ResetReason::FlowControl as u32);
        assert!(
            next_session > p2pvm_channel::MAX_SESSIONS as u32 + 1000,
            "reset only once the owed refusals piled up ({next_session} opens)"
        );
    }
    // The device logged every reset and still serves a well-behaved front-end.
    let st = device_state.borrow().clone();
    assert!(
        matches!(st, LinkState::Down { resets, .. } | LinkState::Up { resets } if resets >= 7),
        "{st:?}"
    );
    let c = setup.driver(&stop);
    assert_eq!(echo_roundtrip(&c, b"still serving").await, b"still serving");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_is_delivered_whole_to_a_late_reader() {
    // The writer writes more than the reader's window, shuts down and drops
    // its stream while the window is closed; a reader that starts late still
    // gets every byte and then the end of the stream.
    let setup = Setup::new(Layout::new(16, 8192).unwrap());
    let stop = CancellationToken::new();
    let mut acc = setup.device(&stop);
    let c = setup.driver(&stop);
    let s = c.open();
    let data = pattern(10 << 20, 3);
    let sent = data.clone();
    let (mut r, _w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut served = acc.accept().await.unwrap();
        served.write_all(&sent).await.unwrap();
        served.shutdown().await.unwrap();
        drop(served);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut got))
        .await
        .expect("in time")
        .expect("no reset");
    writer.await.unwrap();
    assert!(got == data, "got {} of {} bytes", got.len(), data.len());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_session_facing_a_closed_window_is_reset() {
    // The writer drops without shutting down while the reader does not read:
    // the reader is told (reset) instead of waiting for bytes that cannot come.
    let setup = Setup::new(Layout::new(16, 8192).unwrap());
    let stop = CancellationToken::new();
    let mut acc = setup.device(&stop);
    let c = setup.driver(&stop);
    let mut s = c.open();
    s.write_all(b"hi").await.unwrap();
    let mut served = acc.accept().await.unwrap();
    let big = pattern(6 << 20, 9);
    // Fills the 4 MiB window and the local queue, then gives up.
    let _ = tokio::time::timeout(Duration::from_millis(500), served.write_all(&big)).await;
    drop(served);
    let mut sink = vec![0u8; 1 << 20];
    let err = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .expect("the reader is not left hanging");
    let err = err.expect("an abandoned session ends in a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    stop.cancel();
}
