//! Group session set-up: the mutual-TLS handshake with member certificates
//! (chain to the group CA, the group's CRL checked, the certificate's key the
//! peer's own, on both sides) against libp2p's own TLS handshake
//! (libp2p-tls: self-signed certificates carrying the host key's signature),
//! the one every public fast-path connection and libp2p TLS connection pays.
//!
//! Both handshakes run in memory, both ends on this thread, so the figure is
//! the CPU both ends spend, without the network; rounds interleave the two
//! kinds, idle and then with one core kept busy by another process.
//!
//! `cargo bench -p p2pvm-e2e --bench group_session` (5 rounds of 200 each;
//! under `cargo test --all-targets`, a smoke run of 1 round of 10: a debug
//! build's libp2p-tls handshake takes ~50 ms).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use libp2p_identity::Keypair;
use p2pvm_security::group_tls::handshake_in_memory;
use p2pvm_security::{GroupTls, Groups};
use rustls::pki_types::ServerName;

/// Handshakes of each kind a round, and rounds: a full run's, and a smoke
/// run's.
const FULL: (u32, usize) = (200, 5);
const SMOKE: (u32, usize) = (10, 1);

struct Member {
    tls: GroupTls,
    key: Keypair,
    _dir: tempfile::TempDir,
}

fn member(provider: &Arc<rustls::crypto::CryptoProvider>) -> Result<(Member, Arc<Groups>)> {
    let dir = tempfile::tempdir()?;
    let key = Keypair::generate_ed25519();
    let groups = Arc::new(Groups::open(dir.path(), key.public().to_peer_id())?);
    let tls = GroupTls::new(groups.clone(), &key, provider.clone())?;
    Ok((
        Member {
            tls,
            key,
            _dir: dir,
        },
        groups,
    ))
}

/// `n` group-session handshakes, client `c` to server `s`: seconds per one.
fn group_round(c: &Member, s: &Member, g: p2pvm_security::GroupId, n: u32) -> Result<f64> {
    let server = s.key.public().to_peer_id();
    let start = Instant::now();
    for _ in 0..n {
        let cc = c.tls.client_config(g, server)?;
        let sc = s.tls.server_config(g)?;
        let mut client = rustls::ClientConnection::new(cc, ServerName::try_from("group.p2pvm")?)?;
        let mut srv = rustls::ServerConnection::new(sc)?;
        handshake_in_memory(&mut client, &mut srv)?;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(n))
}

/// `n` libp2p-tls handshakes between the same two keys.
fn libp2p_round(c: &Keypair, s: &Keypair, n: u32) -> Result<f64> {
    let server = s.public().to_peer_id();
    let start = Instant::now();
    for _ in 0..n {
        let cc = Arc::new(libp2p_tls::make_client_config(c, Some(server))?);
        let sc = Arc::new(libp2p_tls::make_server_config(s)?);
        let mut client = rustls::ClientConnection::new(cc, ServerName::try_from("p2p.libp2p")?)?;
        let mut srv = rustls::ServerConnection::new(sc)?;
        handshake_in_memory(&mut client, &mut srv)?;
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(n))
}

fn cpu_now() -> Result<f64> {
    p2pvm_e2e::cpu_secs(std::process::id())
}

fn measure(
    label: &str,
    (per_round, rounds): (u32, usize),
    owner: &Member,
    m: &Member,
    g: p2pvm_security::GroupId,
) -> Result<()> {
    let mut ratios = Vec::new();
    let (mut group_us, mut plain_us) = (Vec::new(), Vec::new());
    let (mut group_cpu, mut plain_cpu) = (0.0, 0.0);
    for _ in 0..rounds {
        let c0 = cpu_now()?;
        let gs = group_round(m, owner, g, per_round)?;
        let c1 = cpu_now()?;
        let ps = libp2p_round(&m.key, &owner.key, per_round)?;
        let c2 = cpu_now()?;
        group_cpu += c1 - c0;
        plain_cpu += c2 - c1;
        group_us.push(gs * 1e6);
        plain_us.push(ps * 1e6);
        ratios.push(gs / ps);
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{lo:.0}-{hi:.0}")
    };
    let n = f64::from(per_round) * rounds as f64;
    println!(
        "{label}: group session {} us per handshake (CPU {:.0} us), libp2p-tls {} us (CPU {:.0} us); group/libp2p {:.2}-{:.2}x over {rounds} rounds of {per_round}",
        range(&group_us),
        group_cpu / n * 1e6,
        range(&plain_us),
        plain_cpu / n * 1e6,
        ratios.iter().cloned().fold(f64::INFINITY, f64::min),
        ratios.iter().cloned().fold(0.0, f64::max),
    );
    Ok(())
}

fn main() -> Result<()> {
    let sizes = if std::env::args().any(|a| a == "--bench") {
        FULL
    } else {
        SMOKE
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (owner, og) = member(&provider)?;
    let (m, mg) = member(&provider)?;
    let g = og.create("bench", 86_400)?;
    let inv = og.invite("bench", &m.key.public().to_peer_id(), 3600)?;
    mg.join(inv.as_bytes(), None)?;
    // A CRL with entries, as a group that has revoked members holds.
    for _ in 0..16 {
        let gone = Keypair::generate_ed25519().public().to_peer_id();
        og.invite("bench", &gone, 3600)?;
        og.revoke("bench", &gone)?;
    }
    println!(
        "group session handshake (mutual TLS 1.3, member certificates, CRL of {} entries) vs libp2p-tls; both ends in one thread, in memory",
        16
    );
    // Warm up both paths once.
    group_round(&m, &owner, g.id, 20)?;
    libp2p_round(&m.key, &owner.key, 20)?;
    measure("idle", sizes, &owner, &m, g.id)?;
    let hog = p2pvm_e2e::CpuHog::start().context("a busy core")?;
    measure("one core busy", sizes, &owner, &m, g.id)?;
    drop(hog);
    Ok(())
}
