//! Trusted-group content vs public content between two local p2pd nodes, in
//! one run (issue 14's figure).
//!
//! - Transfer: a 256 MiB item only members of a group may receive, downloaded
//!   into a member's store, vs a public item of the same size from the same
//!   publisher; rounds interleaved, idle and with one core kept busy by a
//!   competing process; CPU seconds per GiB of both nodes beside the ratios.
//! - Set-up: time to the first verified byte on a fresh member node (the
//!   provider refuses, the member shows its certificate, the provider checks
//!   it against the group CA, the clock and its CRL, then serves), vs the
//!   same for a public item.
//!
//! Run: `cargo build --release --bins && cargo bench -p p2pvm-e2e --bench group_transfer`
//! (`P2PVM_BENCH_MIB` changes the item size.)

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::{Client, proto};
use p2pvm_e2e::{CpuHog, NodeOpts, TestNode, cpu_secs};
use tokio::io::AsyncReadExt;

const CONFIG: &str = "[virus]\nenabled = false\n";

async fn node(bootstrap: &[&TestNode]) -> Result<TestNode> {
    TestNode::start(NodeOpts {
        bootstrap: bootstrap.iter().map(|n| n.addr.clone()).collect(),
        config_toml: Some(CONFIG.into()),
        ..Default::default()
    })
    .await
}

async fn member_of(owner: &Client, node: &TestNode) -> Result<()> {
    let inv = owner.group_invite("crew", &node.peer_id, 1).await?;
    node.admin()
        .await?
        .group_join(inv.pem.as_bytes(), "")
        .await?;
    Ok(())
}

async fn publish(c: &Client, path: &std::path::Path, groups: &[&str]) -> Result<String> {
    let meta = proto::ContentPublishRequest {
        name: "bench.bin".into(),
        rights: Some(proto::ContentRights {
            redistribution_allowed: true,
            allowed_groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(c.publish_path(&path.to_string_lossy(), meta)
        .await?
        .content_id)
}

/// Time to the first verified byte of `id` on `c`.
async fn first_byte(c: &Client, id: &str) -> Result<Duration> {
    let t = Instant::now();
    let (_, mut s) = c.fetch_content(id, 0, 64 * 1024, false).await?;
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await?;
    let first = t.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    Ok(first)
}

struct Round {
    busy: bool,
    public: Duration,
    group: Duration,
    cpu_public: [f64; 2],
    cpu_group: [f64; 2],
}

fn spread(v: impl Iterator<Item = f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = p2pvm_e2e::bench_size(256, 8);
    let size = mib << 20;
    let dir = tempfile::tempdir()?;
    let (public_file, group_file) = (dir.path().join("public.bin"), dir.path().join("group.bin"));
    std::fs::write(&public_file, p2pvm_e2e::pseudo_random(size, 61))?;
    std::fs::write(&group_file, p2pvm_e2e::pseudo_random(size, 62))?;

    let a = node(&[]).await?;
    let owner = a.admin().await?;
    owner.group_create("crew", 0).await?;
    let b = node(&[&a]).await?;
    member_of(&owner, &b).await?;
    let public = publish(&owner, &public_file, &[]).await?;
    let group = publish(&owner, &group_file, &["crew"]).await?;
    let viewer = b.admin().await?;
    // Warm-up: connections, the DHT, the membership shown once.
    first_byte(&viewer, &public).await?;
    first_byte(&viewer, &group).await?;

    let (pa, pb) = (a.pid()?, b.pid()?);
    let cpu = || -> Result<[f64; 2]> { Ok([cpu_secs(pa)?, cpu_secs(pb)?]) };
    let timed = |id: String| {
        let viewer = viewer.clone();
        async move {
            let before = cpu()?;
            let t = Instant::now();
            viewer.download_content(&id).await?;
            let took = t.elapsed();
            let after = cpu()?;
            viewer.delete_content(&id).await?;
            Ok::<_, anyhow::Error>((took, [after[0] - before[0], after[1] - before[1]]))
        }
    };
    let rounds = if full { 4 } else { 1 };
    let mut rows = Vec::new();
    for _ in 0..rounds {
        for busy in [false, true] {
            let _hog = busy.then(CpuHog::start).transpose()?;
            let (public_t, cpu_public) = timed(public.clone()).await?;
            let (group_t, cpu_group) = timed(group.clone()).await?;
            rows.push(Round {
                busy,
                public: public_t,
                group: group_t,
                cpu_public,
                cpu_group,
            });
        }
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    for busy in [false, true] {
        let r: Vec<&Round> = rows.iter().filter(|r| r.busy == busy).collect();
        let (mid, lo, hi) = spread(
            r.iter()
                .map(|r| r.public.as_secs_f64() / r.group.as_secs_f64()),
        );
        let mib_s = |d: Duration| size as f64 / d.as_secs_f64() / (1 << 20) as f64;
        let public_t = p2pvm_e2e::median(r.iter().map(|r| r.public).collect());
        let group_t = p2pvm_e2e::median(r.iter().map(|r| r.group).collect());
        println!(
            "download {mib} MiB into a member's store, {} ({} rounds, medians): public {:.1} MiB/s   group {:.1} MiB/s   ratio group/public {mid:.2} (range {lo:.2}-{hi:.2}; target >= 0.8)",
            if busy { "one core busy" } else { "idle" },
            r.len(),
            mib_s(public_t),
            mib_s(group_t),
        );
        let per = |f: &dyn Fn(&Round) -> f64| spread(r.iter().map(|x| f(x) / gib)).0;
        println!(
            "    CPU s per GiB: public: provider {:.2} member {:.2}   group: provider {:.2} member {:.2}",
            per(&|x| x.cpu_public[0]),
            per(&|x| x.cpu_public[1]),
            per(&|x| x.cpu_group[0]),
            per(&|x| x.cpu_group[1]),
        );
    }

    // Set-up on a fresh member each round: the group's first byte includes
    // showing the certificate and its check; the public one does not.
    let mut public_ttfb = Vec::new();
    let mut group_ttfb = Vec::new();
    for _ in 0..if full { 5 } else { 1 } {
        let c = node(&[&a]).await?;
        member_of(&owner, &c).await?;
        let cold = c.admin().await?;
        public_ttfb.push(first_byte(&cold, &public).await?);
        group_ttfb.push(first_byte(&cold, &group).await?);
    }
    let (p, g) = (
        p2pvm_e2e::median(public_ttfb).as_secs_f64() * 1e3,
        p2pvm_e2e::median(group_ttfb).as_secs_f64() * 1e3,
    );
    println!(
        "first verified byte on a fresh member (median): public {p:.1} ms   group {g:.1} ms (membership shown and checked: +{:.1} ms)",
        g - p
    );
    ensure!(g > 0.0 && p > 0.0);
    Ok(())
}
