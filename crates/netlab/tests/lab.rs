//! The lab against the real kernel: namespaces, a bridge, veths and `tc tbf`.
//! Needs root; elsewhere it says SKIPPED and passes nothing off as tested.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use p2pvm_netlab::{Host, Lab, LabError, Line};

fn lab() -> Option<Lab> {
    match Lab::new() {
        Ok(lab) => Some(lab),
        Err(e @ (LabError::NotRoot { .. } | LabError::Missing { .. })) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("the lab cannot be built: {e}"),
    }
}

/// Runs `f` on a thread that has entered `host`'s network namespace (a
/// thread's own namespace: the test process is left where it was).
fn inside<T: Send + 'static>(
    host: &Host,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = std::fs::File::open(format!("/run/netns/{}", host.netns)).expect("netns file");
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Sends `bytes` from `from` to `to` over TCP; returns how long it took.
fn transfer(from: &Host, to: &Host, bytes: usize) -> Duration {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let ip = to.ip;
    let server = inside(to, move || {
        let l = TcpListener::bind((ip, 0)).expect("bind");
        ready_tx.send(l.local_addr().expect("addr")).expect("send");
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got.len()
    });
    let at: SocketAddr = ready_rx.recv().expect("listener");
    let client = inside(from, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect(at).expect("connect");
        s.write_all(&vec![7u8; bytes]).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Done when the receiver has it all (it closes after reading).
        let _ = s.read(&mut [0u8; 1]);
        start
    });
    let start = client.join().expect("client");
    assert_eq!(
        server.join().expect("server"),
        bytes,
        "bytes lost on the way"
    );
    start.elapsed()
}

#[test]
fn hosts_reach_each_other_and_a_shaped_line_is_no_faster_than_its_rate() {
    let Some(mut lab) = lab() else { return };
    let fast = lab.add_host(Line::UNSHAPED).expect("host");
    let other = lab.add_host(Line::UNSHAPED).expect("host");
    // 4 Mbit/s down: 1.5 MB needs 3 s, less the bucket's burst.
    let slow = lab.add_host(Line::mbit(100.0, 4.0)).expect("host");
    let bytes = 1_500_000;

    let unshaped = transfer(&fast, &other, bytes);
    let shaped = transfer(&fast, &slow, bytes);
    eprintln!("1.5 MB: unshaped {unshaped:?}, over a 4 Mbit/s line {shaped:?}");
    assert!(
        shaped >= Duration::from_millis(2500),
        "a 4 Mbit/s line carried 1.5 MB in {shaped:?}"
    );

    let t = lab.traffic(&slow).expect("counters");
    assert!(
        t.received >= bytes as u64 && t.sent > 0,
        "the line's counters missed the transfer: {t:?}"
    );
    let o = lab.traffic(&other).expect("counters");
    assert!(o.received >= bytes as u64, "{o:?}");
}

#[test]
fn a_dropped_lab_leaves_no_namespace_behind() {
    let Some(mut lab) = lab() else { return };
    let h = lab.add_host(Line::mbit(2.0, 10.0)).expect("host");
    let path = format!("/run/netns/{}", h.netns);
    assert!(std::path::Path::new(&path).exists());
    drop(lab);
    assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
}

/// A full mesh needs an ARP entry per pair of hosts in the kernel's one
/// table for all namespaces; at the default limit (1024) the hosts added
/// after the 32nd reached nobody.
#[test]
fn every_host_of_a_40_host_lab_reaches_every_other() {
    const HOSTS: usize = 40;
    let Some(mut lab) = lab() else { return };
    let hosts: Vec<Host> = (0..HOSTS)
        .map(|_| lab.add_host(Line::UNSHAPED).expect("host"))
        .collect();
    let listeners: Vec<_> = hosts
        .iter()
        .map(|h| {
            let ip = h.ip;
            inside(h, move || {
                let l = TcpListener::bind((ip, 0)).expect("bind");
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .join()
            .expect("listener")
        })
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let dialers: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let others: Vec<SocketAddr> = addrs
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, a)| *a)
                .collect();
            inside(h, move || {
                others
                    .into_iter()
                    .filter(|a| TcpStream::connect_timeout(a, Duration::from_secs(5)).is_err())
                    .map(|a| format!("{i}->{a}"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let failed: Vec<String> = dialers
        .into_iter()
        .flat_map(|d| d.join().expect("dialer"))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {:?}",
        failed.len(),
        HOSTS * (HOSTS - 1),
        &failed[..failed.len().min(10)]
    ); // The mesh may pass on a machine whose limit an earlier run raised; the
    // limit itself says whether this lab would have raised it.
    let limit = p2pvm_netlab::neighbour_limit().expect("limit");
    assert!(
        limit >= p2pvm_netlab::neighbour_entries(HOSTS),
        "the ARP table holds {limit} entries, too few for {HOSTS} hosts"
    );
}

/// How long a TCP handshake from `from` to `to` takes: one round trip.
fn handshake(from: &Host, to: &Host) -> Duration {
    let ip = to.ip;
    let listener = inside(to, move || TcpListener::bind((ip, 0)).expect("bind"))
        .join()
        .expect("listener");
    let at = listener.local_addr().expect("addr");
    inside(from, move || {
        // The first dial also resolves the address (ARP): not timed.
        drop(TcpStream::connect_timeout(&at, Duration::from_secs(5)).expect("connect"));
        (0..3)
            .map(|_| {
                let start = Instant::now();
                drop(TcpStream::connect_timeout(&at, Duration::from_secs(5)).expect("connect"));
                start.elapsed()
            })
            .min()
            .expect("three dials")
    })
    .join()
    .expect("dialer")
}

/// Delay lines hold each frame for their line's delay both ways, carry whole
/// TCP transfers (checksums completed, no oversize frame), and mix with
/// direct lines on the same bridge.
#[test]
fn a_delayed_line_adds_its_round_trip_and_carries_tcp() {
    let Some(mut lab) = lab() else { return };
    let ms = Duration::from_millis;
    let a = lab
        .add_host(Line::mbit(20.0, 50.0).with_delay(ms(20)))
        .expect("host");
    let b = lab
        .add_host(Line::UNSHAPED.with_delay(ms(30)))
        .expect("host");
    let direct = lab.add_host(Line::UNSHAPED).expect("host");
    let direct2 = lab.add_host(Line::UNSHAPED).expect("host");

    let ab = handshake(&a, &b);
    let direct_b = handshake(&direct, &b);
    let direct_direct = handshake(&direct, &direct2);
    eprintln!("handshakes: a-b {ab:?}, direct-b {direct_b:?}, direct-direct {direct_direct:?}");
    // 2 × (20 + 30) ms; the line rounds its waits up, never down.
    assert!(ab >= ms(100) && ab < ms(200), "a-b round trip {ab:?}");
    assert!(
        direct_b >= ms(60) && direct_b < ms(120),
        "direct-b {direct_b:?}"
    );
    assert!(
        direct_direct < ms(20),
        "a direct line was delayed: {direct_direct:?}"
    );

    let bytes = 1_500_000;
    let took = transfer(&a, &b, bytes);
    eprintln!("1.5 MB over a 20 Mbit/s delayed line: {took:?}");
    assert!(took >= ms(600), "20 Mbit/s carried 1.5 MB in {took:?}");
    let stats = lab.line_stats(&a).expect("a has a delay line");
    assert_eq!(stats.oversize, 0, "{stats:?}");
    assert!(stats.forwarded > 1_000, "{stats:?}");
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert!(lab.line_stats(&direct).is_none());
    let t = lab.traffic(&a).expect("counters");
    assert!(
        t.sent >= bytes as u64,
        "the delayed line's counters missed it: {t:?}"
    );
}

/// A lossy line drops its share of the frames crossing it, and says so.
#[test]
fn a_lossy_line_loses_its_share() {
    let Some(mut lab) = lab() else { return };
    let lossy = lab
        .add_host(Line::UNSHAPED.with_loss_percent(5.0))
        .expect("host");
    let sink = lab.add_host(Line::UNSHAPED).expect("host");
    const SENT: usize = 4_000;
    let ip = sink.ip;
    let socket = inside(&sink, move || {
        let s = std::net::UdpSocket::bind((ip, 0)).expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    })
    .join()
    .expect("sink");
    let at = socket.local_addr().expect("addr");
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut got = 0usize;
        while socket.recv(&mut buf).is_ok() {
            got += 1;
            // Done once the sender has been quiet for a while.
            let _ = socket.set_read_timeout(Some(Duration::from_secs(1)));
        }
        got
    });
    let sender_ip = lossy.ip;
    inside(&lossy, move || {
        let s = std::net::UdpSocket::bind((sender_ip, 0)).expect("bind");
        // Resolve the sink first (ARP may itself be lost), then send at a
        // pace no buffer on the way overflows at.
        for _ in 0..20 {
            s.send_to(b"warm-up", at).expect("send");
            std::thread::sleep(Duration::from_millis(20));
        }
        for i in 0..SENT {
            s.send_to(&(i as u32).to_be_bytes(), at).expect("send");
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
    .join()
    .expect("sender");
    let got = receiver.join().expect("receiver").saturating_sub(20);
    let stats = lab.line_stats(&lossy).expect("delay line");
    let share = got as f64 / SENT as f64;
    eprintln!("{got} of {SENT} datagrams arrived ({share:.4}); line: {stats:?}");
    // 5 % lost: 200 ± 14 (one standard deviation); the bounds are 7 of them.
    assert!((0.925..=0.975).contains(&share), "{got} of {SENT} arrived");
    assert!(stats.lost >= 100, "{stats:?}");
    assert_eq!(stats.overflowed, 0, "{stats:?}");
}

/// The source address a TCP server on `server` sees when `client` connects,
/// once per `connections`.
fn seen_from(client: &Host, server: &Host, connections: usize) -> Vec<SocketAddr> {
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let ip = server.ip;
    let accepting = inside(server, move || {
        let l = TcpListener::bind((ip, 0)).expect("bind");
        ready_tx.send(l.local_addr().expect("addr")).expect("send");
        (0..connections)
            .map(|_| l.accept().expect("accept").1)
            .collect::<Vec<_>>()
    });
    let at: SocketAddr = ready_rx.recv().expect("listener");
    let dialling = inside(client, move || {
        // Held open until every connection is made, so each has a port.
        (0..connections)
            .map(|_| TcpStream::connect(at).expect("connect through the NAT"))
            .collect::<Vec<_>>()
    });
    let seen = accepting.join().expect("server");
    drop(dialling.join().expect("client"));
    seen
}

#[test]
fn hosts_behind_routers_are_translated_and_unreachable_unasked() {
    let Some(mut lab) = lab() else { return };
    let public = lab.add_host(Line::UNSHAPED).expect("host");
    let cone = match lab.add_router(Line::UNSHAPED, p2pvm_netlab::Nat::Cone) {
        Ok(r) => r,
        Err(e @ LabError::Missing { .. }) => {
            eprintln!("SKIPPED: {e}");
            return;
        }
        Err(e) => panic!("router: {e}"),
    };
    let home = lab.add_host_behind(&cone, Line::UNSHAPED).expect("host");
    let seen = seen_from(&home, &public, 2);
    for s in &seen {
        assert_eq!(
            s.ip(),
            std::net::IpAddr::V4(cone.wan.ip),
            "translated to the WAN address"
        );
    }
    // Double NAT: a home router behind a carrier-grade one; the public host
    // sees the outer router.
    let cgnat = lab
        .add_router(Line::UNSHAPED, p2pvm_netlab::Nat::Cone)
        .expect("router");
    let inner = lab
        .add_router_behind(&cgnat, p2pvm_netlab::Nat::Cone)
        .expect("router");
    let deep = lab.add_host_behind(&inner, Line::UNSHAPED).expect("host");
    let seen = seen_from(&deep, &public, 1);
    assert_eq!(seen[0].ip(), std::net::IpAddr::V4(cgnat.wan.ip));
    // Nothing reaches a host behind a router unasked: a connection to the
    // router's WAN address is dropped (no refusal either).
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    let ip = home.ip;
    let _listener = inside(&home, move || {
        let l = TcpListener::bind((ip, 0)).expect("bind");
        ready_tx
            .send(l.local_addr().expect("addr").port())
            .expect("send");
        std::thread::sleep(Duration::from_secs(4));
    });
    let port = ready_rx.recv().expect("port");
    let wan = SocketAddr::from((cone.wan.ip, port));
    let tried = inside(&public, move || {
        TcpStream::connect_timeout(&wan, Duration::from_secs(2)).map_err(|e| e.kind())
    })
    .join()
    .expect("dial");
    assert_eq!(
        tried.as_ref().err(),
        Some(&std::io::ErrorKind::TimedOut),
        "unasked dial: {tried:?}"
    );
    // Symmetric NAT: two connections from one socket's address get two
    // ports; the cone kept the host's own ports where they were free.
    let sym = lab
        .add_router(Line::UNSHAPED, p2pvm_netlab::Nat::Symmetric)
        .expect("router");
    let behind_sym = lab.add_host_behind(&sym, Line::UNSHAPED).expect("host");
    let ports: std::collections::HashSet<u16> = seen_from(&behind_sym, &public, 8)
        .iter()
        .map(|s| s.port())
        .collect();
    assert_eq!(ports.len(), 8, "a port per connection");
}

/// A router's line goes down and comes back with a new address: hosts behind
/// it reach the internet again, now seen at the new address, through a
/// delay line as through a direct one; an address only a host on the hub
/// can be given.
#[test]
fn a_router_back_from_an_outage_with_a_new_address_translates_to_it() {
    let Some(mut lab) = lab() else { return };
    let public = lab.add_host(Line::UNSHAPED).expect("host");
    for line in [
        Line::UNSHAPED,
        Line::UNSHAPED.with_delay(Duration::from_millis(5)),
    ] {
        let router = match lab.add_router(line, p2pvm_netlab::Nat::Cone) {
            Ok(r) => r,
            Err(e @ LabError::Missing { .. }) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
            Err(e) => panic!("router: {e}"),
        };
        let home = lab.add_host_behind(&router, Line::UNSHAPED).expect("host");
        assert_eq!(seen_from(&home, &public, 1)[0].ip(), router.wan.ip);
        lab.cut(&router.wan).expect("cut");
        let wan = lab.renumber(&router.wan).expect("renumber");
        assert_ne!(wan.ip, router.wan.ip);
        lab.restore(&wan).expect("restore");
        assert_eq!(
            seen_from(&home, &public, 1)[0].ip(),
            wan.ip,
            "after the outage, on {line:?}"
        );
        assert!(matches!(lab.renumber(&home), Err(LabError::Unsupported(_))));
    }
}
