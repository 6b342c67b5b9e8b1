//! `p2pctl credit list|show|history`: the peer credit ledger (admin).

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use guest_api::{Client, proto};
use serde_json::json;

use crate::print;

/// Credit commands.
#[derive(Debug, Subcommand)]
pub enum CreditCmd {
    /// Every peer with a record.
    List {
        /// Sort order.
        #[arg(long, value_enum, default_value_t = SortBy::Score)]
        sort: SortBy,
    },
    /// One peer's record and forecast.
    Show {
        /// Peer id.
        peer: String,
    },
    /// One peer's notable events, newest first.
    History {
        /// Peer id.
        peer: String,
        /// Most events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Columns `list` sorts by (descending).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SortBy {
    /// Credit score.
    Score,
    /// Forecast throughput.
    Speed,
    /// Bytes received from the peer.
    Received,
    /// Bytes served to the peer.
    Served,
}

fn credit_json(c: &proto::PeerCredit) -> serde_json::Value {
    json!({
        "peer_id": c.peer_id, "score": c.score, "standing": c.standing,
        "expected_bytes_per_sec": c.expected_bytes_per_sec, "reliability": c.reliability,
        "bytes_received": c.bytes_received, "bytes_served": c.bytes_served,
        "requests_ok": c.requests_ok, "requests_failed": c.requests_failed,
        "corrupt_blocks": c.corrupt_blocks, "violations": c.violations, "malware": c.malware,
        "drm_passed": c.drm_passed, "drm_failed": c.drm_failed, "uptime_secs": c.uptime_secs,
        "compute_agreed": c.compute_agreed, "compute_disagreed": c.compute_disagreed,
        "expected_fuel_per_sec": c.expected_fuel_per_sec,
        "first_seen_unix": c.first_seen_unix, "last_seen_unix": c.last_seen_unix,
        "banned_until_unix": c.banned_until_unix, "ban_reason": c.ban_reason,
    })
}

fn mib(n: f64) -> String {
    format!("{:.1}", n / 1048576.0)
}

pub async fn run(j: bool, c: &Client, cmd: &CreditCmd) -> Result<()> {
    match cmd {
        CreditCmd::List { sort } => {
            let mut peers = c.credit_list().await?;
            match sort {
                SortBy::Score => peers.sort_by_key(|p| std::cmp::Reverse(p.score)),
                SortBy::Speed => peers.sort_by(|a, b| {
                    b.expected_bytes_per_sec
                        .total_cmp(&a.expected_bytes_per_sec)
                }),
                SortBy::Received => peers.sort_by_key(|p| std::cmp::Reverse(p.bytes_received)),
                SortBy::Served => peers.sort_by_key(|p| std::cmp::Reverse(p.bytes_served)),
            }
            print(
                j,
                json!(peers.iter().map(credit_json).collect::<Vec<_>>()),
                || {
                    let mut s = format!(
                        "{:<54} {:>5} {:<9} {:>9} {:>9} {:>9} {:>7}",
                        "PEER", "SCORE", "STANDING", "MiB/s", "RECV MiB", "SENT MiB", "CORRUPT"
                    );
                    for p in &peers {
                        s.push_str(&format!(
                            "\n{:<54} {:>5} {:<9} {:>9} {:>9} {:>9} {:>7}",
                            p.peer_id,
                            p.score,
                            p.standing,
                            mib(p.expected_bytes_per_sec),
                            mib(p.bytes_received as f64),
                            mib(p.bytes_served as f64),
                            p.corrupt_blocks
                        ));
                    }
                    s
                },
            );
        }
        CreditCmd::Show { peer } => {
            let p = c.credit_show(peer).await?;
            print(j, credit_json(&p), || {
                let mut s = format!(
                    "{}\n  score:        {} ({})\n  forecast:     {} MiB/s, reliability {:.2}\n  received:     {} MiB   served: {} MiB\n  requests:     {} ok, {} failed\n  corrupt:      {} blocks   violations: {}   malware: {}\n  DRM checks:   {} passed, {} failed\n  compute:      {} agreed, {} disagreed, {:.1} M fuel/s\n  connected:    {} s in total",
                    p.peer_id,
                    p.score,
                    p.standing,
                    mib(p.expected_bytes_per_sec),
                    p.reliability,
                    mib(p.bytes_received as f64),
                    mib(p.bytes_served as f64),
                    p.requests_ok,
                    p.requests_failed,
                    p.corrupt_blocks,
                    p.violations,
                    p.malware,
                    p.drm_passed,
                    p.drm_failed,
                    p.compute_agreed,
                    p.compute_disagreed,
                    p.expected_fuel_per_sec / 1e6,
                    p.uptime_secs
                );
                if p.banned_until_unix > 0 {
                    s.push_str(&format!(
                        "\n  BANNED until {} (unix): {}",
                        p.banned_until_unix, p.ban_reason
                    ));
                }
                s
            });
        }
        CreditCmd::History { peer, limit } => {
            let events = c.credit_history(peer, *limit).await?;
            print(
                j,
                json!(events
                    .iter()
                    .map(|e| json!({"at_unix": e.at_unix, "kind": e.kind, "amount": e.amount, "detail": e.detail}))
                    .collect::<Vec<_>>()),
                || {
                    let mut s = format!("{:<14} {:<16} {:>10}  {}", "AT (unix)", "EVENT", "AMOUNT", "DETAIL");
                    for e in &events {
                        s.push_str(&format!(
                            "\n{:<14.0} {:<16} {:>10}  {}",
                            e.at_unix, e.kind, e.amount, e.detail
                        ));
                    }
                    s
                },
            );
        }
    }
    Ok(())
}
