//! A swarm: one publisher, many downloaders of one item at once (a flash
//! crowd), each a real `p2pd`, on loopback or each in a host of a network
//! lab with a shaped line of its own. The end-to-end swarm tests and the
//! swarm benchmark share it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;

use p2pvm_netlab::{Lab, Line};

use crate::playback::{ApiSource, Playback, Streaming};
use crate::{NodeOpts, TestNode};

/// How a swarm is set up.
#[derive(Debug, Clone)]
pub struct SwarmSpec {
    /// Nodes in all, the publisher included.
    pub nodes: usize,
    /// The item's size.
    pub bytes: usize,
    /// Every node's TOML config.
    pub config: String,
    /// Capture every node's log at this filter (`P2PD_LOG` syntax), for
    /// [`TestNode::log`]; `None` leaves warnings on stderr.
    pub log: Option<String>,
}

/// A publisher that published its item before any peer joined, and the
/// downloaders that joined afterwards, each bootstrapped from the publisher
/// (as everyone would from a well-known node).
#[derive(Debug)]
pub struct Swarm {
    /// The publisher.
    pub publisher: TestNode,
    /// The downloaders, in the order they joined.
    pub downloaders: Vec<TestNode>,
    /// The item's content id.
    pub id: String,
    /// The item's bytes.
    pub data: Vec<u8>,
}

/// What a flash crowd came to.
#[derive(Debug, Default)]
pub struct CrowdOutcome {
    /// Time from the common start to each finished download, sorted.
    pub done: Vec<Duration>,
    /// Failed downloads, counted by their error's text.
    pub failures: BTreeMap<String, usize>,
}

impl CrowdOutcome {
    /// Fails with every distinct error and its count if any download failed.
    pub fn all_done(&self) -> Result<()> {
        let failed: usize = self.failures.values().sum();
        let why: Vec<String> = self
            .failures
            .iter()
            .map(|(e, n)| format!("{n} x {e}"))
            .collect();
        ensure!(
            failed == 0,
            "{failed} of {} downloads failed: {}",
            failed + self.done.len(),
            why.join("; ")
        );
        Ok(())
    }
}

impl Swarm {
    /// Starts the publisher, publishes an item of `spec.bytes` pseudo-random
    /// bytes, then starts the downloaders: on loopback, or node `i` on
    /// `lab`'s host `i` (the lab outlives the swarm).
    pub async fn start(spec: &SwarmSpec, lab: Option<&Lab>) -> Result<Self> {
        if let Some(lab) = lab {
            ensure!(lab.hosts().len() >= spec.nodes, "a lab host per node");
        }
        let host = |i: usize| lab.map(|l| l.hosts()[i].clone());
        let opts = NodeOpts {
            config_toml: Some(spec.config.clone()),
            capture_log: spec.log.is_some(),
            log_filter: spec.log.clone(),
            ..Default::default()
        };
        let publisher = TestNode::start(NodeOpts {
            host: host(0),
            ..opts.clone()
        })
        .await?;
        let data = crate::pseudo_random(spec.bytes, spec.nodes as u64);
        let info = publisher
            .admin()
            .await?
            .publish_content(
                proto::ContentPublishRequest {
                    name: "swarm.bin".into(),
                    ..Default::default()
                },
                &data[..],
            )
            .await?;
        let mut downloaders = Vec::with_capacity(spec.nodes.saturating_sub(1));
        for i in 1..spec.nodes {
            downloaders.push(
                TestNode::start(NodeOpts {
                    bootstrap: vec![publisher.addr.clone()],
                    host: host(i),
                    ..opts.clone()
                })
                .await?,
            );
        }
        Ok(Self {
            publisher,
            downloaders,
            id: info.content_id,
            data,
        })
    }

    /// Scenario 2 (streaming in the swarm), as `plan` says; node `i`'s
    /// bitrate follows `lines[i]` (the publisher's first).
    pub async fn stream(&self, lines: &[Line], plan: &Streaming) -> Result<Vec<Playback>> {
        ensure!(
            plan.holders < self.downloaders.len() && lines.len() > self.downloaders.len(),
            "a line per node and at least one viewer"
        );
        let holding = self.downloaders[..plan.holders].iter().map(|d| async move {
            d.admin().await?.download_content(&self.id).await?;
            Ok::<_, anyhow::Error>(())
        });
        futures::future::try_join_all(holding).await?;
        let mut clients = Vec::new();
        for (i, d) in self.downloaders.iter().enumerate().skip(plan.holders) {
            clients.push((d.admin().await?, plan.rate(&lines[i + 1])?));
        }
        let viewers = clients
            .iter()
            .map(|(client, rate)| {
                let source = ApiSource {
                    client,
                    id: &self.id,
                };
                (source, *rate)
            })
            .collect();
        plan.view_all(viewers, self.data.len() as u64).await
    }

    /// Starts `rotten` + `silent` [`BadPeers`] (on `lab`'s hosts from
    /// `first_host` on, if any), bootstrapped from the publisher. Each
    /// publishes the item's very bytes itself (the same content id), so it
    /// holds the item and announces it as any provider does; the rotten ones
    /// are then stopped, their store rotted, and started again.
    pub async fn add_bad_peers(
        &self,
        lab: Option<&Lab>,
        first_host: usize,
        rotten: usize,
        silent: usize,
        config: &str,
    ) -> Result<BadPeers> {
        let mut bad = BadPeers::default();
        for i in 0..rotten + silent {
            let is_rotten = i < rotten;
            let fault = if is_rotten {
                "verify_on_serve = false"
            } else {
                "test_silent_server = true"
            };
            let mut node = TestNode::start(NodeOpts {
                bootstrap: vec![self.publisher.addr.clone()],
                config_toml: Some(format!("{config}\n[content]\n{fault}\n")),
                host: lab.map(|l| l.hosts()[first_host + i].clone()),
                ..Default::default()
            })
            .await?;
            let id = crate::publish_named(&node.admin().await?, "claimed.bin", &self.data).await?;
            ensure!(id == self.id, "the same bytes gave another content id");
            if is_rotten {
                node.stop().await?;
                ensure!(crate::rot_store(&node)? == 1, "one item to rot");
                node.restart().await?;
                bad.rotten.push(node);
            } else {
                bad.silent.push(node);
            }
        }
        Ok(bad)
    }

    /// Copies every node's captured log out of its data directory (which
    /// the swarm deletes) to `dir/<index>.log`, the publisher's as `0.log`,
    /// for a run to be read block by block afterwards.
    pub fn keep_logs(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        for (i, n) in self.nodes().enumerate() {
            std::fs::write(dir.join(format!("{i}.log")), n.log())?;
        }
        println!("p2pd logs kept in {}", dir.display());
        Ok(())
    }

    /// Every node, the publisher first.
    pub fn nodes(&self) -> impl Iterator<Item = &TestNode> {
        std::iter::once(&self.publisher).chain(&self.downloaders)
    }

    /// Every downloader downloads the item at the same moment.
    pub async fn flash_crowd(&self) -> Result<CrowdOutcome> {
        let mut clients = Vec::with_capacity(self.downloaders.len());
        for d in &self.downloaders {
            clients.push(d.admin().await?);
        }
        let start = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                let id = self.id.clone();
                tokio::spawn(async move {
                    c.download_content(&id).await?;
                    Ok::<_, anyhow::Error>(start.elapsed())
                })
            })
            .collect();
        let mut out = CrowdOutcome::default();
        for t in tasks {
            match t.await? {
                Ok(d) => out.done.push(d),
                Err(e) => *out.failures.entry(format!("{e:#}")).or_default() += 1,
            }
        }
        out.done.sort();
        Ok(out)
    }

    /// A flash crowd under churn: every downloader starts at once, then
    /// `churn.killed` of them are killed at random moments; the first
    /// `churn.returning` of those killed restart after `churn.away` and ask
    /// for the item again (resuming what their store kept). Every node alive
    /// at the end must finish; the outcome times them from the common start.
    pub async fn flash_crowd_with_churn(&mut self, churn: &Churn) -> Result<ChurnOutcome> {
        let plan = churn_plan(
            churn.killed,
            self.downloaders.len(),
            churn.kill_within,
            churn.seed,
        );
        let mut clients = Vec::with_capacity(self.downloaders.len());
        for d in &self.downloaders {
            clients.push(d.admin().await?);
        }
        let start = Instant::now();
        let download = |c: guest_api::Client, id: String| {
            tokio::spawn(async move {
                c.download_content(&id).await?;
                Ok::<_, anyhow::Error>(start.elapsed())
            })
        };
        let mut tasks: Vec<_> = clients
            .into_iter()
            .map(|c| Some(download(c, self.id.clone())))
            .collect();
        // Kills in time order; each returner's restart after its kill.
        let mut events: Vec<(Duration, usize, bool)> = plan
            .iter()
            .map(|(i, at)| (*at, *i, false))
            .chain(
                plan.iter()
                    .take(churn.returning)
                    .map(|(i, at)| (*at + churn.away, *i, true)),
            )
            .collect();
        events.sort_by_key(|(at, _, _)| *at);
        let mut out = ChurnOutcome::default();
        for (at, i, back) in events {
            tokio::time::sleep(at.saturating_sub(start.elapsed())).await;
            if back {
                self.downloaders[i].restart().await?;
                let c = self.downloaders[i].admin().await?;
                tasks[i] = Some(download(c, self.id.clone()));
                out.returned.push(i);
            } else {
                self.downloaders[i].kill().await?;
                out.killed.push((i, start.elapsed()));
                let partial = self.downloaders[i].data_dir().join("content/partial");
                let left_state = std::fs::read_dir(&partial).is_ok_and(|d| {
                    d.flatten()
                        .any(|e| e.path().extension().is_some_and(|x| x == "state"))
                });
                if left_state {
                    out.checkpointed.push(i);
                }
                if let Some(t) = tasks[i].take() {
                    // Its API connection died with it: finished or not.
                    match t.await? {
                        Ok(_) => out.finished_before_kill.push(i),
                        // What it says when its node dies under it; anything
                        // else failed before the kill.
                        Err(e) if out.checkpointed.contains(&i) || is_disconnect(&e) => {}
                        Err(e) => {
                            *out.crowd.failures.entry(format!("{e:#}")).or_default() += 1;
                        }
                    }
                }
            }
        }
        for t in tasks.into_iter().flatten() {
            match t.await? {
                Ok(d) => out.crowd.done.push(d),
                Err(e) => *out.crowd.failures.entry(format!("{e:#}")).or_default() += 1,
            }
        }
        out.crowd.done.sort();
        Ok(out)
    }
}

/// Churn during a flash crowd: some downloaders are killed (`kill -9`) at
/// random moments, and some of those come back a while later on the same
/// data directory and ask for the item again.
#[derive(Debug, Clone)]
pub struct Churn {
    /// Downloaders killed.
    pub killed: usize,
    /// Of those, how many come back.
    pub returning: usize,
    /// Kills happen at random moments within this time from the start.
    pub kill_within: Duration,
    /// How long a returning node stays away.
    pub away: Duration,
    /// Seed for who is killed and when.
    pub seed: u64,
}

/// What a flash crowd under churn came to.
#[derive(Debug, Default)]
pub struct ChurnOutcome {
    /// Downloads of the nodes alive at the end (never killed, or back),
    /// timed from the common start.
    pub crowd: CrowdOutcome,
    /// Downloaders killed, by index, with when.
    pub killed: Vec<(usize, Duration)>,
    /// Those that came back, by index.
    pub returned: Vec<usize>,
    /// Killed downloaders whose download had finished before they died.
    pub finished_before_kill: Vec<usize>,
    /// Killed downloaders that left a checkpoint of their download behind
    /// (so a return must resume it).
    pub checkpointed: Vec<usize>,
}

/// Peers that claim the swarm's item and misbehave: `rotten` ones hold a
/// copy whose disk rotted and serve it unchecked (every block fails
/// verification), `silent` ones accept content requests and never answer.
#[derive(Debug, Default)]
pub struct BadPeers {
    /// Serve corrupt blocks.
    pub rotten: Vec<TestNode>,
    /// Never answer.
    pub silent: Vec<TestNode>,
}

impl BadPeers {
    /// Every bad peer, the rotten ones first.
    pub fn all(&self) -> impl Iterator<Item = &TestNode> {
        self.rotten.iter().chain(&self.silent)
    }

    /// What the downloaders' credit ledgers say of the bad peers they met
    /// (and of the honest nodes of `swarm`).
    pub async fn tally(&self, swarm: &Swarm) -> Result<BadPeerTally> {
        let honest: Vec<&str> = swarm.nodes().map(|n| n.peer_id.as_str()).collect();
        let mut t = BadPeerTally::default();
        for d in &swarm.downloaders {
            let admin = d.admin().await?;
            for c in admin.credit_list().await? {
                if honest.contains(&c.peer_id.as_str())
                    && (c.standing == "refused" || c.standing == "banned")
                {
                    t.wronged
                        .push(format!("{} by {}: {c:?}", c.peer_id, d.peer_id));
                }
            }
            for (b, peer) in self.all().enumerate() {
                let c = admin.credit_show(&peer.peer_id).await?;
                let rotten = b < self.rotten.len();
                // What each kind of bad peer shows a downloader that met it: a
                // rotten one, corrupt blocks; a silent one, requests left
                // unanswered. A rotten peer that only failed a request (its
                // connection broke before any block) showed nothing an honest
                // peer does not, and is not counted as met.
                let evidence = if rotten {
                    c.corrupt_blocks
                } else {
                    c.requests_failed
                };
                if evidence == 0 {
                    if rotten && c.requests_failed > 0 {
                        t.touched_rotten += 1;
                    }
                    continue;
                }
                if rotten {
                    t.met_rotten += 1;
                } else {
                    t.met_silent += 1;
                }
                t.corrupt_blocks += c.corrupt_blocks;
                t.failed_requests += c.requests_failed;
                if c.standing == "refused" || c.standing == "banned" {
                    t.refused += 1;
                } else {
                    t.lenient.push(format!(
                        "{} {b}: {} (score {}, {} corrupt, {} failed requests)",
                        if rotten { "rotten" } else { "silent" },
                        c.standing,
                        c.score,
                        c.corrupt_blocks,
                        c.requests_failed
                    ));
                }
            }
        }
        Ok(t)
    }
}

/// The downloaders' ledgers on the bad peers they met ([`BadPeers::tally`]).
#[derive(Debug, Default)]
pub struct BadPeerTally {
    /// Downloader-rotten peer and downloader-silent peer meetings.
    pub met_rotten: usize,
    pub met_silent: usize,
    /// Meetings that ended with the bad peer refused (or banned).
    pub refused: usize,
    /// Corrupt blocks received from bad peers, all downloaders together.
    pub corrupt_blocks: u64,
    /// Requests bad peers took and left unanswered.
    pub failed_requests: u64,
    /// Downloader-rotten peer pairs with failed requests and no corrupt
    /// block: no evidence of rot, so no refusal is owed.
    pub touched_rotten: usize,
    /// Bad peers a downloader met and did not refuse.
    pub lenient: Vec<String>,
    /// Honest nodes some downloader refused.
    pub wronged: Vec<String>,
}

impl BadPeerTally {
    /// Bytes of corrupt blocks received (256 KiB each).
    pub fn wasted_bytes(&self) -> u64 {
        self.corrupt_blocks * (256 << 10)
    }
}

impl std::fmt::Display for BadPeerTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} downloader-bad peer meetings ({} rotten, {} silent), {} refused; {} corrupt blocks \
             ({:.1} MiB wasted), {} requests unanswered; {} more rotten-peer contacts without a corrupt block; \
             not refused: {:?}; honest nodes refused: {:?}",
            self.met_rotten + self.met_silent,
            self.met_rotten,
            self.met_silent,
            self.refused,
            self.corrupt_blocks,
            self.wasted_bytes() as f64 / f64::from(1u32 << 20),
            self.failed_requests,
            self.touched_rotten,
            self.lenient,
            self.wronged,
        )
    }
}

/// The round trip a home line adds, spread over the nodes: a frame between
/// two nodes crosses both lines, so their round trip is the sum of the two
/// (40–300 ms).
pub const LINE_RTT_MS: (f64, f64) = (20.0, 150.0);
/// Frames lost per crossing of a line, in each direction: a path between
/// two nodes crosses two lines and loses about 0.5 %.
pub const LINE_LOSS_PERCENT: f64 = 0.25;

/// Whether a download's error is its API connection going away (its node
/// was killed), not a failure of the download.
fn is_disconnect(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_lowercase();
    [
        "connection",
        "closed",
        "broken pipe",
        "reset",
        "eof",
        "disconnected",
        // guest-api's error when the node's API socket went away mid-call.
        "not connected",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// `n` distinct indices below `of`, and `n` moments within `within`, from a
/// small deterministic generator (the same seed, the same churn).
pub fn churn_plan(n: usize, of: usize, within: Duration, seed: u64) -> Vec<(usize, Duration)> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pool: Vec<usize> = (0..of).collect();
    let mut plan: Vec<(usize, Duration)> = (0..n.min(of))
        .map(|_| {
            let i = pool.swap_remove((next() % pool.len() as u64) as usize);
            // Not in the first fifth: every download holds blocks by then.
            let at = within.mul_f64(0.2 + 0.8 * (next() % 1000) as f64 / 1000.0);
            (i, at)
        })
        .collect();
    plan.sort_by_key(|(_, at)| *at);
    plan
}

/// A bench's numeric setting from the environment (`P2PVM_LAB_NODES`, ...),
/// or `default`.
pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether a lab bench can run here (root for the lab; libtorrent too when
/// `with_libtorrent`); prints `SKIPPED` and the reason when not.
pub fn lab_bench_can_run(bench: &str, with_libtorrent: bool) -> bool {
    let ready = Lab::check().map_err(anyhow::Error::from).and_then(|()| {
        if with_libtorrent {
            crate::torrent::available()
        } else {
            Ok(())
        }
    });
    match ready {
        Ok(()) => true,
        Err(e) => {
            println!("SKIPPED: the {bench} bench cannot run here: {e:#}");
            false
        }
    }
}

/// Lines like home broadband for `n` nodes: uploads spread evenly over 2 to
/// 20 Mbit/s, downloads five times the upload (at most 100 Mbit/s), round
/// trips spread over [`LINE_RTT_MS`] and [`LINE_LOSS_PERCENT`] loss, speeds
/// and latencies in orders unrelated to each other and to when a node joins.
/// The publisher (node 0) gets the middle of each range.
pub fn home_lines(n: usize) -> Vec<Line> {
    let (lo, hi) = (2.0, 20.0);
    let (rtt_lo, rtt_hi) = LINE_RTT_MS;
    let steps = n.saturating_sub(2).max(1) as f64;
    let line = |up: f64, rtt_ms: f64| {
        Line::mbit(up, (up * 5.0).min(100.0))
            .with_delay(Duration::from_secs_f64(rtt_ms / 2000.0))
            .with_loss_percent(LINE_LOSS_PERCENT)
    };
    let mut lines = vec![line((lo + hi) / 2.0, (rtt_lo + rtt_hi) / 2.0)];
    for i in 1..n {
        // Strides coprime with most sizes shuffle speeds and latencies
        // against join order and against each other.
        let rank = ((i - 1) * 7 % (n - 1)) as f64;
        let rtt_rank = ((i - 1) * 13 % (n - 1)) as f64;
        let up = lo + (hi - lo) * rank / steps;
        lines.push(line(up, rtt_lo + (rtt_hi - rtt_lo) * rtt_rank / steps));
    }
    lines
}

/// The same lines without latency or loss (rates only, as before the lab
/// had delay lines), for comparison.
pub fn without_delay(lines: &[Line]) -> Vec<Line> {
    lines
        .iter()
        .map(|l| Line {
            delay: Duration::ZERO,
            loss_ppm: 0,
            ..*l
        })
        .collect()
}

/// The shortest time in which every downloader can hold `bytes` over
/// `lines` (the publisher's first), whatever the engine: the publisher must
/// send every byte once; the downloaders' `n-1` copies must cross the sum of
/// all uploads; each downloader must receive the whole item over its own
/// download. (Line rates count frame bytes, so a real transfer, with its
/// headers, needs a few percent more.)
pub fn lower_bound(lines: &[Line], bytes: u64) -> Duration {
    let bits = bytes as f64 * 8.0;
    let rate = |r: Option<u64>| r.map_or(f64::INFINITY, |r| r as f64);
    let Some((publisher, downloaders)) = lines.split_first() else {
        return Duration::ZERO;
    };
    let seed = bits / rate(publisher.up_bps);
    let total_up: f64 = lines.iter().map(|l| rate(l.up_bps)).sum();
    let swarm = downloaders.len() as f64 * bits / total_up;
    let slowest = downloaders
        .iter()
        .map(|l| bits / rate(l.down_bps))
        .fold(0.0, f64::max);
    Duration::from_secs_f64(seed.max(swarm).max(slowest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_churn_plan_picks_distinct_nodes_at_ordered_moments() {
        let within = Duration::from_secs(40);
        let plan = churn_plan(18, 59, within, 7);
        assert_eq!(plan.len(), 18);
        let mut who: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
        who.sort();
        who.dedup();
        assert_eq!(who.len(), 18);
        assert!(who.iter().all(|i| *i < 59));
        assert!(plan.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(
            plan.iter()
                .all(|(_, at)| *at >= within / 5 && *at <= within)
        );
        assert_eq!(plan, churn_plan(18, 59, within, 7));
        assert_ne!(plan, churn_plan(18, 59, within, 8));
        assert_eq!(churn_plan(5, 3, within, 1).len(), 3);
    }

    #[test]
    fn home_lines_span_the_range_with_asymmetric_downloads() {
        let lines = home_lines(60);
        assert_eq!(lines.len(), 60);
        let ups: Vec<u64> = lines.iter().map(|l| l.up_bps.unwrap()).collect();
        assert_eq!(*ups.iter().min().unwrap(), 2_000_000);
        assert_eq!(*ups.iter().max().unwrap(), 20_000_000);
        assert!(
            lines
                .iter()
                .all(|l| l.down_bps.unwrap() > l.up_bps.unwrap())
        );
        let rtts: Vec<u128> = lines.iter().map(|l| l.delay.as_millis() * 2).collect();
        assert_eq!(*rtts.iter().min().unwrap(), 20);
        assert_eq!(*rtts.iter().max().unwrap(), 150);
        assert!(lines.iter().all(|l| l.loss_ppm == 2_500));
        // Latency is not tied to speed: the fastest uploads are not all near.
        let fast_rtts: Vec<u128> = lines
            .iter()
            .filter(|l| l.up_bps.unwrap() >= 15_000_000)
            .map(|l| l.delay.as_millis() * 2)
            .collect();
        let spread = fast_rtts.iter().max().unwrap() - fast_rtts.iter().min().unwrap();
        assert!(spread >= 80, "{fast_rtts:?}");
        assert!(without_delay(&lines).iter().all(|l| !l.delayed()));
        // Not sorted by join order.
        assert!(ups[1..].windows(2).any(|w| w[0] > w[1]));
        assert!(ups[1..].windows(2).any(|w| w[0] < w[1]));
    }

    #[test]
    fn the_bound_is_the_tightest_of_seed_swarm_and_slowest_line() {
        let mib = 1 << 20;
        // Publisher 8 Mbit/s up: 1 MiB takes 1.048576 s from it alone.
        let seed_bound = vec![Line::mbit(8.0, 80.0), Line::mbit(80.0, 800.0)];
        assert!((lower_bound(&seed_bound, mib).as_secs_f64() - 1.048576).abs() < 1e-6);
        // Nine downloaders 8 Mbit/s up, the publisher 16: 9 copies over 88
        // Mbit/s take longer than the publisher's one (0.52 s).
        let mut swarm_bound = vec![Line::mbit(8.0, 1000.0); 10];
        swarm_bound[0] = Line::mbit(16.0, 1000.0);
        let copies = 9.0 * 8.0 * mib as f64 / 88e6;
        assert!((lower_bound(&swarm_bound, mib).as_secs_f64() - copies).abs() < 1e-6);
        // A downloader with a 4 Mbit/s download line.
        let mut slow = swarm_bound.clone();
        slow[3] = Line::mbit(8.0, 4.0);
        assert!((lower_bound(&slow, mib).as_secs_f64() - 2.097152).abs() < 1e-6);
    }
}
