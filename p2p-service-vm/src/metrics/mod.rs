//! The node's figures in Prometheus' text format, for a monitoring system
//! to scrape at `GET /metrics` ([`server`]; off unless `[metrics] listen`
//! names an address).
//!
//! ```text
//!   node::Node ── libp2p-metrics (swarm, kad, identify, gossipsub, ping,
//!        │        relay, dcutr; bytes by transport) ──┐
//!   api, content ── counters, gauges, histograms ─────┼─► Registry ─► GET /metrics
//!   credit ledger, virus filter ── read at scrape ────┘   (Collector)
//! ```
//!
//! Counters on a hot path are plain atomics (`prometheus-client`'s), so a
//! node nobody scrapes pays an increment per event; what the ledger and the
//! virus filter already count is read only when a scrape asks
//! ([`Snapshot`]).

pub mod server;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use p2pvm_channel::PumpStats;
use p2pvm_security::{Ledger, Standing, VirusFilter};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric of the node, registered once at start.
pub struct Metrics {
    registry: Registry,
    /// The API's sessions and requests.
    pub api: ApiMetrics,
    /// Content transfers.
    pub content: ContentMetrics,
    drm_refusals: Family<DrmLabels, Counter>,
    /// The latest DRM refusals, for the dashboard (the counts above are
    /// for monitoring; a person wants to see what was refused and why).
    recent_drm: std::sync::Mutex<std::collections::VecDeque<DrmRefusal>>,
    compute_runs: Family<Outcome, Counter>,
    compute_fuel: Counter,
    compute_jobs: Family<Outcome, Counter>,
    compute_spent: Counter,
    /// The channel back-end's pump, once it runs (the split platform only).
    channel: Arc<OnceLock<Arc<PumpStats>>>,
}

/// How many DRM refusals [`Metrics::recent_drm_refusals`] remembers.
const RECENT_DRM: usize = 64;
/// The longest detail kept of one.
const DRM_DETAIL_CHARS: usize = 512;

/// One DRM refusal, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrmRefusal {
    /// Seconds since the epoch.
    pub at_unix: u64,
    /// `publish`, `serve` or `accept`.
    pub stage: &'static str,
    /// The checker's code.
    pub reason: &'static str,
    /// The checker's explanation.
    pub detail: String,
}

/// A DRM refusal's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DrmLabels {
    /// `publish`, `serve` (to a peer) or `accept` (from a provider).
    pub stage: &'static str,
    /// The checker's code (`DRM_EXPIRED`, ...).
    pub reason: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// An API operation's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation, as the protocol names it (`ContentFetch`, ...).
    pub op: &'static str,
    /// `ok`, or the error code the app was answered with.
    pub result: &'static str,
}

/// An API operation's name alone (for its latency).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpName {
    /// The operation.
    pub op: &'static str,
}

/// How a download or a compute run ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// A download: `complete`, `ended` (a stream whose readers were done)
    /// or `failed`; a compute run: `done`, `out_of_fuel`, `failed`,
    /// `cancelled`.
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// API sessions and requests.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    /// Sessions open now.
    pub sessions: Gauge,
    /// Requests answered, by operation and result.
    pub requests: Family<OpLabels, Counter>,
    /// Seconds from a request to its answer (for one that opens a stream,
    /// to the stream's opening or refusal).
    pub latency: Histograms<OpName>,
    /// Streams ended, by the operation that opened them and how they ended.
    pub streams_ended: Family<OpLabels, Counter>,
}

/// Content transfers.
#[derive(Debug, Clone)]
pub struct ContentMetrics {
    /// Downloads running now.
    pub transfers: Gauge,
    /// Downloads ended, by outcome.
    pub finished: Family<Outcome, Counter>,
    /// Seconds from a download's start to its first verified block.
    pub first_byte: Histogram,
    /// Blocks that failed verification (their provider is dropped).
    pub corrupt_blocks: Counter,
    /// Virus verdicts found in the verdict cache (no scan needed).
    pub verdict_cache_hits: Counter,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 2 minutes: a node-info round trip to a slow DHT query.
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

impl Metrics {
    /// Registers ours beside what `registry` holds already (libp2p's, from
    /// the node), and the scrape-time figures of `ledger` and `virus`.
    pub fn new(mut registry: Registry, ledger: Arc<Ledger>, virus: VirusFilter) -> Self {
        let api = ApiMetrics {
            sessions: Gauge::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            streams_ended: Family::default(),
        };
        let content = ContentMetrics {
            transfers: Gauge::default(),
            finished: Family::default(),
            // 10 ms to about 3 minutes.
            first_byte: Histogram::new(exponential_buckets(0.01, 3.0, 10)),
            corrupt_blocks: Counter::default(),
            verdict_cache_hits: Counter::default(),
        };
        let ours = registry.sub_registry_with_prefix("p2pvm");
        let a = ours.sub_registry_with_prefix("api");
        a.register("sessions", "API sessions open", api.sessions.clone());
        a.register("requests", "API requests answered", api.requests.clone());
        a.register(
            "request_seconds",
            "Seconds from an API request to its answer",
            api.latency.clone(),
        );
        a.register(
            "streams_ended",
            "API streams ended, by the operation that opened them and how (ok, reset, session_ended, or the error code)",
            api.streams_ended.clone(),
        );
        let c = ours.sub_registry_with_prefix("content");
        c.register("transfers", "Downloads running", content.transfers.clone());
        c.register(
            "transfers_finished",
            "Downloads ended, by outcome",
            content.finished.clone(),
        );
        c.register(
            "first_block_seconds",
            "Seconds from a download's start to its first verified block",
            content.first_byte.clone(),
        );
        c.register(
            "corrupt_blocks",
            "Blocks that failed verification",
            content.corrupt_blocks.clone(),
        );
        c.register(
            "verdict_cache_hits",
            "Virus verdicts taken from the cache instead of a scan",
            content.verdict_cache_hits.clone(),
        );
        let drm_refusals = Family::<DrmLabels, Counter>::default();
        ours.sub_registry_with_prefix("drm").register(
            "refusals",
            "DRM refusals by stage and the checker's reason",
            drm_refusals.clone(),
        );
        let compute_runs = Family::<Outcome, Counter>::default();
        let compute_fuel = Counter::default();
        let k = ours.sub_registry_with_prefix("compute");
        k.register(
            "runs",
            "Compute jobs this node ran for others, by outcome",
            compute_runs.clone(),
        );
        k.register(
            "fuel",
            "Fuel (metered WebAssembly work) this node's runs burnt",
            compute_fuel.clone(),
        );
        let compute_jobs = Family::<Outcome, Counter>::default();
        let compute_spent = Counter::default();
        k.register(
            "jobs",
            "Compute jobs this node's apps submitted, by how they ended",
            compute_jobs.clone(),
        );
        k.register(
            "credits_spent",
            "Credits this node's jobs paid providers",
            compute_spent.clone(),
        );
        let channel = Arc::new(OnceLock::new());
        ours.register_collector(Box::new(Snapshot {
            ledger,
            virus,
            channel: channel.clone(),
        }));
        Self {
            registry,
            api,
            content,
            drm_refusals,
            recent_drm: Default::default(),
            compute_runs,
            compute_fuel,
            compute_jobs,
            compute_spent,
            channel,
        }
    }

    /// The whole registry in Prometheus' text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Reports the channel back-end's pump (the first one set stays).
    pub fn set_channel(&self, stats: Arc<PumpStats>) {
        let _ = self.channel.set(stats);
    }

    /// Counts a compute run this node did for a requester, and its fuel.
    pub fn compute_ran(&self, outcome: &'static str, fuel: u64) {
        self.compute_runs.get_or_create(&Outcome { outcome }).inc();
        self.compute_fuel.inc_by(fuel);
    }

    /// Counts a job this node's apps submitted as it ends (`done`,
    /// `failed`, `cancelled`), and the credits it paid.
    pub fn compute_job_ended(&self, outcome: &'static str, credits: u64) {
        self.compute_jobs.get_or_create(&Outcome { outcome }).inc();
        self.compute_spent.inc_by(credits);
    }

    /// Counts a DRM refusal and keeps it among the latest (its detail cut
    /// to [`DRM_DETAIL_CHARS`]: a manifest's group list can be long).
    pub fn drm_refused(&self, stage: &'static str, reason: &'static str, mut detail: String) {
        if let Some((cut, _)) = detail.char_indices().nth(DRM_DETAIL_CHARS) {
            detail.truncate(cut);
            detail.push('…');
        }
        self.drm_refusals
            .get_or_create(&DrmLabels { stage, reason })
            .inc();
        let mut recent = self.recent_drm.lock().expect("lock");
        if recent.len() == RECENT_DRM {
            recent.pop_front();
        }
        recent.push_back(DrmRefusal {
            at_unix: crate::clock::now_unix(),
            stage,
            reason,
            detail,
        });
    }

    /// The latest DRM refusals, newest first.
    pub fn recent_drm_refusals(&self) -> Vec<DrmRefusal> {
        self.recent_drm
            .lock()
            .expect("lock")
            .iter()
            .rev()
            .cloned()
            .collect()
    }

    /// Records how an API stream ended.
    pub fn api_stream_ended(&self, op: &'static str, result: &'static str) {
        self.api
            .streams_ended
            .get_or_create(&OpLabels { op, result })
            .inc();
    }

    /// Records one answered API request.
    pub fn api_request(&self, op: &'static str, result: &'static str, took: Duration) {
        self.api
            .requests
            .get_or_create(&OpLabels { op, result })
            .inc();
        self.api
            .latency
            .get_or_create(&OpName { op })
            .observe(took.as_secs_f64());
    }
}

/// One unit of a gauge for as long as it lives (a session, a transfer).
#[derive(Debug)]
pub struct Held(Gauge);

impl Held {
    /// Adds one to `gauge` until dropped.
    pub fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the credit ledger and the virus filter already count, read when a
/// scrape asks.
#[derive(Debug)]
struct Snapshot {
    ledger: Arc<Ledger>,
    virus: VirusFilter,
    channel: Arc<OnceLock<Arc<PumpStats>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The channel back-end's counts, when there is a channel.
fn encode_channel(
    stats: &PumpStats,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::metrics::MetricType;
    let c = stats.counts();
    for (name, help, v) in [
        (
            "channel_doorbells",
            "Doorbells the back-end rang (in VM mode, each an exit of the service VM)",
            c.doorbells,
        ),
        (
            "channel_wakeups",
            "Times the front-end's doorbell woke the back-end",
            c.wakeups,
        ),
        (
            "channel_receive_batches",
            "Looks at the ring that found messages (received / batches: messages waiting per look)",
            c.batches,
        ),
        ("channel_resets", "Times the channel went down", c.resets),
    ] {
        let e = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        ConstCounter::new(v).encode(e)?;
    }
    let mut messages = encoder.encode_descriptor(
        "channel_messages",
        "Channel messages, by direction",
        None,
        MetricType::Counter,
    )?;
    for (direction, v) in [("in", c.received), ("out", c.sent)] {
        ConstCounter::new(v).encode(messages.encode_family(&DirectionLabel { direction })?)?;
    }
    let e = encoder.encode_descriptor(
        "channel_sessions",
        "App sessions open over the channel",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(c.sessions as i64).encode(e)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StandingLabel {
    standing: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    standing: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

const STANDINGS: [(Standing, &str); 4] = [
    (Standing::Good, "good"),
    (Standing::Throttled, "throttled"),
    (Standing::Refused, "refused"),
    (Standing::Banned, "banned"),
];

/// Totals over the ledger's peers, by standing.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ByStanding {
    peers: u64,
    received: u64,
    served: u64,
}

fn by_standing(ledger: &Ledger) -> [ByStanding; 4] {
    let mut out = [ByStanding::default(); 4];
    for p in ledger.list() {
        let i = STANDINGS
            .iter()
            .position(|(s, _)| *s == p.standing)
            .unwrap_or(0);
        out[i].peers += 1;
        out[i].received += p.bytes_received;
        out[i].served += p.bytes_served;
    }
    out
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = by_standing(&self.ledger);
        // Gauges, not counters: a peer's bytes move with it when its
        // standing changes.
        let mut peers = encoder.encode_descriptor(
            "credit_peers",
            "Peers the credit ledger knows, by standing",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((_, name), t) in STANDINGS.iter().zip(&totals) {
            ConstGauge::new(t.peers as i64)
                .encode(peers.encode_family(&StandingLabel { standing: name })?)?;
        }
        let mut bytes = encoder.encode_descriptor(
            "credit_bytes",
            "Verified content bytes exchanged with the ledger's peers, by their standing now",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((_, name), t) in STANDINGS.iter().zip(&totals) {
            for (direction, v) in [("in", t.received), ("out", t.served)] {
                ConstGauge::new(v as i64).encode(bytes.encode_family(&BytesLabels {
                    direction,
                    standing: name,
                })?)?;
            }
        }
        let scans = self.virus.stats();
        let mut verdicts = encoder.encode_descriptor(
            "virus_scans",
            "Virus scans by verdict (error: clamd could not answer)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (verdict, n) in [
            ("clean", scans.clean),
            ("infected", scans.infected),
            ("error", scans.failed),
        ] {
            ConstCounter::new(n).encode(verdicts.encode_family(&VerdictLabel { verdict })?)?;
        }
        if let Some(stats) = self.channel.get() {
            encode_channel(stats, &mut encoder)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p2pvm_security::{EventKind, Policy, Weights};

    fn ledger(dir: &std::path::Path) -> Arc<Ledger> {
        Arc::new(
            Ledger::open(
                &dir.join("credit.redb"),
                Weights::default(),
                Policy::default(),
                3600.0,
            )
            .expect("ledger"),
        )
    }

    #[test]
    fn a_scrape_names_every_family_and_counts_what_happened() {
        let dir = tempfile::tempdir().expect("tmp");
        let ledger = ledger(dir.path());
        let peer = libp2p::PeerId::random();
        ledger.record(
            peer,
            EventKind::Received {
                bytes: 4096,
                secs: 1.0,
            },
        );
        let m = Metrics::new(Registry::default(), ledger, VirusFilter::off());
        m.api_request("NodeInfo", "ok", Duration::from_millis(2));
        m.content.transfers.inc();
        m.drm_refused("serve", "DRM_EXPIRED", "expired at 10".into());
        m.compute_ran("done", 5_000);
        m.compute_job_ended("done", 12);
        let text = m.encode().expect("encode");
        for line in [
            "p2pvm_api_requests_total{op=\"NodeInfo\",result=\"ok\"} 1",
            "p2pvm_api_request_seconds_count{op=\"NodeInfo\"} 1",
            "p2pvm_content_transfers 1",
            "p2pvm_credit_peers{standing=\"good\"} 1",
            "p2pvm_credit_bytes{direction=\"in\",standing=\"good\"} 4096",
            "p2pvm_virus_scans_total{verdict=\"clean\"} 0",
            "p2pvm_drm_refusals_total{stage=\"serve\",reason=\"DRM_EXPIRED\"} 1",
            "p2pvm_compute_runs_total{outcome=\"done\"} 1",
            "p2pvm_compute_fuel_total 5000",
            "p2pvm_compute_jobs_total{outcome=\"done\"} 1",
            "p2pvm_compute_credits_spent_total 12",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        m.drm_refused("accept", "DRM_NOT_GROUP_MEMBER", "g".repeat(10_000));
        let recent = m.recent_drm_refusals();
        assert_eq!(recent.len(), 2);
        assert_eq!(recent[0].detail.chars().count(), DRM_DETAIL_CHARS + 1);
        let recent = &recent[1..];
        assert_eq!(
            (recent[0].stage, recent[0].reason, recent[0].detail.as_str()),
            ("serve", "DRM_EXPIRED", "expired at 10")
        );
    }
}
