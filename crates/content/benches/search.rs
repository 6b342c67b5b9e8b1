//! Keyword search over a store of many items: the word index
//! (`Store::search`) beside the full scan it replaced (decode every stored
//! manifest, match each), in the same run, on the same store.
//!
//!   cargo bench -p p2pvm-content --bench search [-- ITEMS]
//!
//! Prints, per query, the wall time and CPU time per search of each, and
//! the ratio, over several rounds (min–max).

use std::time::{Duration, Instant};

use p2pvm_content::{Manifest, SignedManifest, Store, keywords};
use prost::Message;

fn cpu() -> Duration {
    cpu_time::ProcessTime::now().as_duration()
}

/// What the server did before the index: every manifest decoded and matched.
fn full_scan(store: &Store, query: &[String], limit: usize) -> usize {
    let mut n = 0;
    for (_, signed) in store.manifests().unwrap() {
        let Some(m) = SignedManifest::decode(signed.as_slice())
            .ok()
            .and_then(|sm| Manifest::decode(sm.manifest.as_slice()).ok())
        else {
            continue;
        };
        if keywords::matches(&m, query) {
            n += 1;
            if n >= limit {
                break;
            }
        }
    }
    n
}

fn time(rounds: u32, mut f: impl FnMut() -> usize) -> (Duration, Duration, usize) {
    let (wall, cpu0) = (Instant::now(), cpu());
    let mut hits = 0;
    for _ in 0..rounds {
        hits = f();
    }
    (wall.elapsed() / rounds, (cpu() - cpu0) / rounds, hits)
}

fn main() {
    let items: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let started = Instant::now();
    for i in 0..items {
        let m = Manifest {
            name: format!("episode {i} of the show {}.mkv", i % 97),
            tags: vec![format!("series-{}", i % 13), "video".into()],
            ..Default::default()
        };
        let signed = SignedManifest {
            manifest: m.encode_to_vec(),
            signature: vec![0; 64],
        }
        .encode_to_vec();
        store
            .import(&(i as u64).to_le_bytes()[..], |_, _| Ok(signed))
            .unwrap();
    }
    println!(
        "{items} items stored in {:.1} s; load average {}",
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let queries = [
        ("one item (\"episode 4711\")", "episode 4711", 50),
        ("1/97 of the items (\"show 42\")", "show 42", 50),
        ("every item, 50 wanted (\"video\")", "video", 50),
        ("no item (\"dragon\")", "dragon", 50),
    ];
    println!(
        "{:<36} {:>12} {:>12} {:>10} {:>12} {:>12}",
        "query", "scan wall", "index wall", "ratio", "scan CPU", "index CPU"
    );
    for (what, q, limit) in queries {
        let query = keywords::query_keywords(q);
        let mut ratios = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let scan = time(3, || full_scan(&store, &query, limit));
            let idx = time(3, || {
                store.search(&query, limit, |_, _| true).unwrap().len()
            });
            assert_eq!(scan.2, idx.2, "{what}: both find the same number");
            ratios.push(scan.0.as_secs_f64() / idx.0.as_secs_f64().max(1e-9));
            last = Some((scan, idx));
        }
        let (scan, idx) = last.unwrap();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
        println!(
            "{what:<36} {:>10.2}ms {:>10.3}ms {:>5.0}-{:<4.0}x {:>10.2}ms {:>10.3}ms",
            scan.0.as_secs_f64() * 1e3,
            idx.0.as_secs_f64() * 1e3,
            lo,
            hi,
            scan.1.as_secs_f64() * 1e3,
            idx.1.as_secs_f64() * 1e3,
        );
    }
}
