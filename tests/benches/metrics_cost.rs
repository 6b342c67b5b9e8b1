//! What `/metrics` and the dashboard cost the node: the same content
//! transfer between two local p2pds (both serving `/metrics` and the
//! dashboard) with nobody looking, with both nodes scraped once a second (as
//! a Prometheus server would, at a short interval), and with that plus the
//! provider's dashboard open (a logged-in client asking for a page's live
//! part every 2 s, as an open tab does, cycling through the pages). Rounds
//! are interleaved so the machine's noise hits all alike (a round streams a
//! 512 MiB item ten times, seconds of transfer). Prints the ratios of the
//! rates (the issue asks for no measurable cost), the CPU seconds per GiB of
//! each node beside them, and how long a scrape and each page take
//! (p50/p95/max).
//!
//! Run: `cargo build --release --bins && P2PVM_BIN_DIR=$CARGO_TARGET_DIR/release
//! cargo bench -p p2pvm-e2e --bench metrics_cost` (`P2PVM_BENCH_MIB`, 512 by
//! default; under `cargo test`, a smoke run of 16 MiB and one round each).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;
use p2pvm_e2e::scrape::{Scrape, config, request};
use p2pvm_e2e::{NodeOpts, TestNode, cpu_secs};

/// Scrapes `ports` once a second until `stop`; each scrape's time.
async fn scraper(ports: [u16; 2], stop: Arc<AtomicBool>) -> Result<Vec<Duration>> {
    let mut took = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for port in ports {
            let t = Instant::now();
            let s = Scrape::of(port).await?;
            took.push(t.elapsed());
            ensure!(!s.0.is_empty(), "an empty scrape");
        }
    }
    Ok(took)
}

/// The dashboard's pages, as an open tab asks for them.
const PAGES: [&str; 5] = [
    "/?live=1",
    "/peers?live=1",
    "/content?live=1",
    "/security?live=1",
    "/compute?live=1",
];

/// Logs in to the dashboard on `port` with `token`; the session cookie.
async fn login(port: u16, token: &str) -> Result<String> {
    let r = request(port, "POST", "/login", &[], Some(&format!("token={token}"))).await?;
    ensure!(r.code == 303, "dashboard login: {}", r.code);
    let set = r.header("set-cookie").unwrap_or_default();
    Ok(set.split(';').next().unwrap_or_default().to_owned())
}

/// Asks for a page's live part every 2 s until `stop`, cycling through
/// [`PAGES`] from page `first` (each round goes on where the last stopped);
/// each page's time.
async fn watcher(
    port: u16,
    cookie: String,
    stop: Arc<AtomicBool>,
    first: usize,
) -> Result<Vec<(usize, Duration)>> {
    let mut took = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut i = first;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let page = i % PAGES.len();
        let t = Instant::now();
        let r = request(port, "GET", PAGES[page], &[("Cookie", &cookie)], None).await?;
        took.push((page, t.elapsed()));
        ensure!(
            r.code == 200 && r.body.contains("Updated"),
            "{}: {}",
            PAGES[page],
            r.code
        );
        i += 1;
    }
    Ok(took)
}

/// How a round was looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Looked {
    Not,
    Scraped,
    Watched,
}

impl Looked {
    fn label(self) -> &'static str {
        match self {
            Looked::Not => "nobody looks",
            Looked::Scraped => "scraped 1/s",
            Looked::Watched => "+ dashboard",
        }
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "none".into();
    }
    v.sort();
    let n = v.len();
    format!(
        "p50 {:.2} ms, p95 {:.2} ms, max {:.2} ms over {n}",
        v[n / 2].as_secs_f64() * 1e3,
        v[(n * 95 / 100).min(n - 1)].as_secs_f64() * 1e3,
        v[n - 1].as_secs_f64() * 1e3
    )
}

struct Round {
    looked: Looked,
    secs: f64,
    /// CPU seconds of the provider and the fetcher.
    cpu: [f64; 2],
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (full, mib) = p2pvm_e2e::bench_size(512, 16);
    let size = mib << 20;
    let data = p2pvm_e2e::pseudo_random(size, 11);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("item.bin");
    std::fs::write(&file, &data)?;
    // The transfer engine alone (the virus filter's cost is its own bench).
    let ((ma, pa), (mb, pb)) = (config()?, config()?);
    let a = TestNode::start(NodeOpts {
        config_toml: Some(format!("{ma}[virus]\nenabled = false\n")),
        ..Default::default()
    })
    .await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        config_toml: Some(format!("{mb}[virus]\nenabled = false\n")),
        ..Default::default()
    })
    .await?;
    let info = a
        .admin()
        .await?
        .publish_path(
            &file.to_string_lossy(),
            proto::ContentPublishRequest {
                name: "bench.bin".into(),
                ..Default::default()
            },
        )
        .await?;
    let viewer = b.admin().await?;
    // Warm-up: connections and the DHT in place.
    let mut s = viewer
        .fetch_content(&info.content_id, 0, 1 << 20, false)
        .await?
        .1;
    p2pvm_e2e::drain(&mut s).await?;

    // A round streams the item `repeats` times: seconds of transfer, so a
    // scraped round holds several scrapes of each node.
    let (rounds, repeats) = if full { (4, 10) } else { (1, 1) };
    let (pid_a, pid_b) = (a.pid()?, b.pid()?);
    let mut rows = Vec::new();
    let mut scrapes = Vec::new();
    let mut pages = Vec::new();
    let cookie = login(pa, &a.admin_token()).await?;
    for _ in 0..rounds {
        for looked in [Looked::Not, Looked::Scraped, Looked::Watched] {
            let stop = Arc::new(AtomicBool::new(false));
            let scraping =
                (looked != Looked::Not).then(|| tokio::spawn(scraper([pa, pb], stop.clone())));
            let watching = (looked == Looked::Watched)
                .then(|| tokio::spawn(watcher(pa, cookie.clone(), stop.clone(), pages.len())));
            let before = [cpu_secs(pid_a)?, cpu_secs(pid_b)?];
            let t = Instant::now();
            for _ in 0..repeats {
                let (_, mut s) = viewer.fetch_content(&info.content_id, 0, 0, false).await?;
                let got = p2pvm_e2e::drain(&mut s).await?;
                ensure!(got == size, "the stream ended after {got} of {size} bytes");
            }
            let secs = t.elapsed().as_secs_f64();
            let after = [cpu_secs(pid_a)?, cpu_secs(pid_b)?];
            stop.store(true, Ordering::Relaxed);
            if let Some(h) = scraping {
                scrapes.extend(h.await??);
            }
            if let Some(h) = watching {
                pages.extend(h.await??);
            }
            rows.push(Round {
                looked,
                secs,
                cpu: [after[0] - before[0], after[1] - before[1]],
            });
        }
    }
    let gib = (size * repeats) as f64 / (1u64 << 30) as f64;
    println!(
        "metrics_cost: {mib} MiB streamed a -> b {repeats} time(s) a round, {rounds} round(s) of each, interleaved"
    );
    let (mut scraped, mut watched) = (Vec::new(), Vec::new());
    for triple in rows.chunks(3) {
        let [quiet, scrape, watch] = triple else {
            continue;
        };
        scraped.push(quiet.secs / scrape.secs);
        watched.push(quiet.secs / watch.secs);
        for r in [quiet, scrape, watch] {
            println!(
                "  {:<14} {:>7.1} MiB/s   CPU s/GiB: provider {:.2}, fetcher {:.2}",
                r.looked.label(),
                (mib * repeats) as f64 / r.secs,
                r.cpu[0] / gib,
                r.cpu[1] / gib,
            );
        }
    }
    let list = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.iter()
            .map(|r| format!("{r:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("rate scraped / nobody looks: {}", list(scraped));
    println!(
        "rate scraped + dashboard open / nobody looks: {}",
        list(watched)
    );
    println!("scrape time: {}", percentiles(scrapes));
    for (i, page) in PAGES.iter().enumerate() {
        let times: Vec<Duration> = pages
            .iter()
            .filter(|(p, _)| *p == i)
            .map(|(_, t)| *t)
            .collect();
        println!("page {page}: {}", percentiles(times));
    }
    Ok(())
}
