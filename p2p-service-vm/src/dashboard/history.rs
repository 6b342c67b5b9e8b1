//! The overview's bandwidth chart: the node's verified content bytes in and
//! out (every peer's, as the credit ledger counts them, whatever the
//! transport), sampled every [`EVERY`] for the last hour.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maud::{Markup, html};
use p2pvm_security::Ledger;
use tokio_util::sync::CancellationToken;

/// Time between samples.
pub(super) const EVERY: Duration = Duration::from_secs(10);
/// Samples kept: an hour's worth, and the one before it.
const KEEP: usize = 361;

/// Cumulative bytes at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Instant,
    received: u64,
    served: u64,
}

/// The last hour's samples.
#[derive(Debug, Default)]
pub(super) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

/// Bytes per second over one interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Rate {
    pub received: f64,
    pub served: f64,
}

impl History {
    fn push(&self, s: Sample) {
        let mut samples = self.samples.lock().expect("lock");
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(s);
    }

    /// The rate in each interval, oldest first, over the time it really
    /// lasted (a late sample makes a longer one). A total that went down
    /// (the ledger forgot a peer) counts as nothing moved.
    pub(super) fn rates(&self) -> Vec<Rate> {
        let samples = self.samples.lock().expect("lock");
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                Rate {
                    received: b.received.saturating_sub(a.received) as f64 / secs,
                    served: b.served.saturating_sub(a.served) as f64 / secs,
                }
            })
            .collect()
    }

    /// The chart: an inline SVG, two lines, scaled to the busiest interval.
    pub(super) fn chart(&self) -> Markup {
        let rates = self.rates();
        let (w, h) = (720.0_f64, 160.0_f64);
        let top = rates
            .iter()
            .map(|r| r.received.max(r.served))
            .fold(1.0_f64, f64::max);
        let step = w / (KEEP - 2) as f64;
        // The newest interval sits at the right edge.
        let x0 = w - step * rates.len().saturating_sub(1) as f64;
        let line = |pick: fn(&Rate) -> f64| {
            rates
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    format!(
                        "{:.1},{:.1}",
                        x0 + step * i as f64,
                        h - pick(r) / top * (h - 4.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        html! {
            figure.chart {
                svg viewBox=(format!("0 0 {w} {h}")) role="img" aria-label="Content bytes per second, last hour" {
                    line x1="0" y1=(h) x2=(w) y2=(h) stroke="#888" {}
                    polyline.in points=(line(|r| r.received)) fill="none" stroke="#1f77b4" stroke-width="2" {}
                    polyline.out points=(line(|r| r.served)) fill="none" stroke="#ff7f0e" stroke-width="2" {}
                }
                figcaption {
                    "Last hour, every " (EVERY.as_secs()) " s; top of the scale "
                    (super::pages::rate(top)) ". "
                    span.in { "■ in" } " " span.out { "■ out" }
                }
            }
        }
    }
}

/// Samples the ledger's totals every [`EVERY`] until `shutdown`.
pub(super) async fn sample(
    history: Arc<History>,
    ledger: Arc<Ledger>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (received, served) = ledger.byte_totals();
        history.push(Sample {
            at: Instant::now(),
            received,
            served,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let h = History::default();
        let t0 = Instant::now();
        for (i, (r, s)) in [(0, 0), (10_000, 0), (30_000, 5_000), (20_000, 5_000)]
            .into_iter()
            .enumerate()
        {
            h.push(Sample {
                at: t0 + EVERY * i as u32,
                received: r,
                served: s,
            });
        }
        let rates = h.rates();
        assert_eq!(rates.len(), 3);
        assert_eq!(rates[0].received, 1_000.0);
        assert_eq!(rates[1].received, 2_000.0);
        assert_eq!(rates[1].served, 500.0);
        assert_eq!(
            rates[2].received, 0.0,
            "a forgotten peer is not negative traffic"
        );
    }

    #[test]
    fn an_hour_is_kept() {
        let h = History::default();
        let t0 = Instant::now();
        for i in 0..KEEP as u64 + 50 {
            h.push(Sample {
                at: t0 + EVERY * i as u32,
                received: i,
                served: 0,
            });
        }
        assert_eq!(h.rates().len(), KEEP - 1);
        assert!(h.chart().into_string().contains("polyline"));
    }
}
