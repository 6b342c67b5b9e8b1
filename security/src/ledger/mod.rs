//! The peer credit ledger: per-peer records of what this node observed,
//! persisted in redb in p2pd's data directory.
//!
//! Observations arrive at block rate, so they update an in-memory copy and
//! [`Ledger::flush`] writes the changed records and new history rows in one
//! transaction (p2pd flushes every second and at shutdown). Bans are written at
//! once: they must survive a crash.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use libp2p_identity::PeerId;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

mod events;

pub use events::{Ban, Event, EventKind, PeerCredit};

use crate::score::{self, Policy, Standing, Weights};

const PEERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peers");
const HISTORY: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("history");
const BANS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("bans");

/// History rows kept per peer.
const HISTORY_PER_PEER: u64 = 1000;
/// Peers the ledger remembers at most. Every peer that connects gets a
/// record, so without a bound a stream of throwaway identities would grow
/// memory and the file for good.
const MAX_RECORDS: usize = 50_000;
/// Decayed bad evidence below which a record says nothing against its peer,
/// and can be forgotten without letting a misbehaving peer start afresh.
const FORGETTABLE_BAD: f64 = 0.25;

/// Why the ledger failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database failed.
    #[error("Credit ledger database")]
    Db(#[source] Box<redb::Error>),
    /// A stored record does not decode.
    #[error("Credit ledger record is corrupt")]
    Corrupt(#[source] prost::DecodeError),
}

fn db<E: Into<redb::Error>>(e: E) -> LedgerError {
    LedgerError::Db(Box::new(e.into()))
}

/// A smoothed rate: the first sample as it is, then a fifth of each new one.
fn ewma(old: f64, sample: f64) -> f64 {
    if old == 0.0 {
        sample
    } else {
        0.8 * old + 0.2 * sample
    }
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The stored record of one peer.
#[derive(Clone, PartialEq, Message)]
struct Record {
    #[prost(uint64, tag = "1")]
    bytes_received: u64,
    #[prost(uint64, tag = "2")]
    bytes_served: u64,
    #[prost(uint64, tag = "3")]
    requests_ok: u64,
    #[prost(uint64, tag = "4")]
    requests_failed: u64,
    #[prost(uint64, tag = "5")]
    corrupt_blocks: u64,
    #[prost(uint64, tag = "6")]
    violations: u64,
    #[prost(uint64, tag = "7")]
    malware: u64,
    #[prost(uint64, tag = "8")]
    drm_passed: u64,
    #[prost(uint64, tag = "9")]
    drm_failed: u64,
    #[prost(uint64, tag = "10")]
    uptime_secs: u64,
    #[prost(double, tag = "11")]
    first_seen: f64,
    #[prost(double, tag = "12")]
    last_seen: f64,
    /// Decayed good evidence, as of `decayed_at`.
    #[prost(double, tag = "13")]
    good: f64,
    /// Decayed bad evidence, as of `decayed_at`.
    #[prost(double, tag = "14")]
    bad: f64,
    #[prost(double, tag = "15")]
    decayed_at: f64,
    /// Smoothed delivery rate, bytes per second (0 = never measured).
    #[prost(double, tag = "16")]
    rate_bps: f64,
    #[prost(uint64, tag = "17")]
    compute_agreed: u64,
    #[prost(uint64, tag = "18")]
    compute_disagreed: u64,
    /// Smoothed compute rate, fuel per second (0 = never measured).
    #[prost(double, tag = "19")]
    compute_fuel_per_sec: f64,
}

#[derive(Debug, Default)]
struct State {
    records: HashMap<PeerId, Record>,
    bans: HashMap<PeerId, Ban>,
    dirty: HashSet<PeerId>,
    /// Records forgotten since the last flush (deleted from the file then).
    forgotten: HashSet<PeerId>,
    history: Vec<(PeerId, Event)>,
    next_seq: u64,
}

/// The ledger. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Ledger {
    db: Database,
    state: Mutex<State>,
    weights: Weights,
    policy: Policy,
    half_life_secs: f64,
    max_records: usize,
}

impl Ledger {
    /// Opens (or creates) the ledger file and loads it.
    pub fn open(
        path: &Path,
        weights: Weights,
        policy: Policy,
        half_life_secs: f64,
    ) -> Result<Self, LedgerError> {
        let database = Database::create(path).map_err(db)?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(PEERS).map_err(db)?;
        tx.open_table(HISTORY).map_err(db)?;
        tx.open_table(BANS).map_err(db)?;
        tx.commit().map_err(db)?;
        let mut state = State::default();
        {
            let tx = database.begin_read().map_err(db)?;
            for row in tx.open_table(PEERS).map_err(db)?.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if let Ok(peer) = PeerId::from_bytes(k.value()) {
                    let r = Record::decode(v.value()).map_err(LedgerError::Corrupt)?;
                    state.records.insert(peer, r);
                }
            }
            for row in tx.open_table(BANS).map_err(db)?.iter().map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if let Ok(peer) = PeerId::from_bytes(k.value()) {
                    let b = Ban::decode(v.value()).map_err(LedgerError::Corrupt)?;
                    state.bans.insert(peer, b);
                }
            }
            let history = tx.open_table(HISTORY).map_err(db)?;
            if let Some(last) = history.last().map_err(db)? {
                state.next_seq = last.0.value().1 + 1;
            }
            // Sequence numbers are global, so the largest may sit under any peer.
            for row in history.iter().map_err(db)? {
                let (k, _) = row.map_err(db)?;
                state.next_seq = state.next_seq.max(k.value().1 + 1);
            }
        }
        Ok(Self {
            db: database,
            state: Mutex::new(state),
            weights,
            policy,
            half_life_secs,
            max_records: MAX_RECORDS,
        })
    }

    /// Forgets records beyond the bound, a tenth of it at a time: first
    /// those with nothing against their peer, least recently seen first;
    /// records of banned peers never. Only if that is not enough do records
    /// with bad evidence go too, oldest first.
    fn forget_beyond_bound(&self, st: &mut State, now: f64) {
        if st.records.len() <= self.max_records {
            return;
        }
        let target = self.max_records - self.max_records / 10;
        let half_life = self.half_life_secs;
        // Forgotten first: no evidence either way; then good credit (a
        // stream of fresh identities must not erase what honest peers
        // earned before them); bad evidence last. Least recently seen
        // first within each.
        let mut victims: Vec<(u8, f64, PeerId)> = st
            .records
            .iter()
            .filter(|(p, _)| !st.bans.contains_key(*p))
            .map(|(p, r)| {
                let dt = now - r.decayed_at;
                let bad = score::decay(r.bad, dt, half_life);
                let good = score::decay(r.good, dt, half_life);
                let rank = if bad >= FORGETTABLE_BAD {
                    2
                } else if good >= FORGETTABLE_BAD {
                    1
                } else {
                    0
                };
                (rank, r.last_seen, *p)
            })
            .collect();
        victims.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let excess = st.records.len() - target;
        for (_, _, p) in victims.into_iter().take(excess) {
            st.records.remove(&p);
            st.dirty.remove(&p);
            st.forgotten.insert(p);
        }
    }

    /// Records an observation now.
    pub fn record(&self, peer: PeerId, kind: EventKind) {
        self.record_at(peer, kind, now_secs());
    }

    /// Records an observation at `now` (Unix seconds).
    pub fn record_at(&self, peer: PeerId, kind: EventKind, now: f64) {
        let w = &self.weights;
        let mut st = self.state.lock().expect("lock");
        if !st.records.contains_key(&peer) {
            st.forgotten.remove(&peer);
            self.forget_beyond_bound(&mut st, now);
        }
        let r = st.records.entry(peer).or_insert_with(|| Record {
            first_seen: now,
            decayed_at: now,
            ..Default::default()
        });
        let dt = now - r.decayed_at;
        r.good = score::decay(r.good, dt, self.half_life_secs);
        r.bad = score::decay(r.bad, dt, self.half_life_secs);
        r.decayed_at = now.max(r.decayed_at);
        r.last_seen = now.max(r.last_seen);
        let (mut amount, mut detail) = (0, String::new());
        match &kind {
            EventKind::Received { bytes, secs } => {
                r.bytes_received += bytes;
                r.good += *bytes as f64 / 1048576.0 * w.good_per_mib;
                if *secs > 0.0 && *bytes > 0 {
                    r.rate_bps = ewma(r.rate_bps, *bytes as f64 / secs);
                }
                amount = *bytes;
            }
            EventKind::Served { bytes } => {
                r.bytes_served += bytes;
                amount = *bytes;
            }
            EventKind::RequestOk => {
                r.requests_ok += 1;
                r.good += w.good_per_request;
            }
            EventKind::RequestFailed => {
                r.requests_failed += 1;
                r.bad += w.bad_per_failed_request;
            }
            EventKind::Unanswered => {
                r.requests_failed += 1;
                r.bad += w.bad_per_unanswered;
            }
            EventKind::CorruptBlock => {
                r.corrupt_blocks += 1;
                r.bad += w.bad_per_corrupt_block;
            }
            EventKind::Violation => {
                r.violations += 1;
                r.bad += w.bad_per_violation;
            }
            EventKind::Malware { signature } => {
                r.malware += 1;
                r.bad += w.bad_per_malware;
                detail = signature.clone();
            }
            EventKind::DrmPassed => r.drm_passed += 1,
            EventKind::DrmFailed => {
                r.drm_failed += 1;
                r.bad += w.bad_per_drm_failure;
            }
            EventKind::ComputeAgreed { fuel, secs } => {
                r.compute_agreed += 1;
                r.good += w.good_per_compute_job;
                if *secs > 0.0 && *fuel > 0 {
                    r.compute_fuel_per_sec = ewma(r.compute_fuel_per_sec, *fuel as f64 / secs);
                }
                amount = *fuel;
            }
            EventKind::ComputeDisagreed => {
                r.compute_disagreed += 1;
                r.bad += w.bad_per_wrong_result;
            }
            EventKind::Seen { secs } => {
                r.uptime_secs += secs;
                amount = *secs;
            }
        }
        st.dirty.insert(peer);
        // Bulk transfer observations are summarised by the counters; history keeps
        // the events an operator investigates.
        if !matches!(
            kind,
            EventKind::Received { .. } | EventKind::Served { .. } | EventKind::RequestOk
        ) {
            st.history.push((
                peer,
                Event {
                    at_unix: now,
                    kind: kind.name().into(),
                    amount,
                    detail,
                },
            ));
        }
    }

    fn view(&self, peer: PeerId, r: &Record, ban: Option<&Ban>, now: f64) -> PeerCredit {
        let dt = now - r.decayed_at;
        let good = score::decay(r.good, dt, self.half_life_secs);
        let bad = score::decay(r.bad, dt, self.half_life_secs);
        let trust = score::trust(good, bad);
        let score = (trust * 100.0).round().clamp(0.0, 100.0) as u8;
        let ban = ban.filter(|b| b.until_unix as f64 > now).cloned();
        let standing = if ban.is_some() {
            Standing::Banned
        } else {
            self.policy.standing(score)
        };
        PeerCredit {
            peer,
            score,
            standing,
            expected_bps: r.rate_bps,
            reliability: trust,
            bytes_received: r.bytes_received,
            bytes_served: r.bytes_served,
            requests_ok: r.requests_ok,
            requests_failed: r.requests_failed,
            corrupt_blocks: r.corrupt_blocks,
            violations: r.violations,
            malware: r.malware,
            drm_passed: r.drm_passed,
            drm_failed: r.drm_failed,
            compute_agreed: r.compute_agreed,
            compute_disagreed: r.compute_disagreed,
            expected_fuel_per_sec: r.compute_fuel_per_sec,
            uptime_secs: r.uptime_secs,
            first_seen_unix: r.first_seen as u64,
            last_seen_unix: r.last_seen as u64,
            ban,
        }
    }

    /// A peer's credit now (a stranger's when never observed).
    pub fn credit(&self, peer: &PeerId) -> PeerCredit {
        self.credit_at(peer, now_secs())
    }

    /// A peer's credit at `now`.
    pub fn credit_at(&self, peer: &PeerId, now: f64) -> PeerCredit {
        let st = self.state.lock().expect("lock");
        let stranger = Record {
            decayed_at: now,
            ..Default::default()
        };
        let r = st.records.get(peer).unwrap_or(&stranger);
        self.view(*peer, r, st.bans.get(peer), now)
    }

    /// What the node does with a peer now.
    pub fn standing(&self, peer: &PeerId) -> Standing {
        self.credit(peer).standing
    }

    /// Every known peer, best score first.
    pub fn list(&self) -> Vec<PeerCredit> {
        let now = now_secs();
        let st = self.state.lock().expect("lock");
        let mut peers: HashSet<PeerId> = st.records.keys().copied().collect();
        peers.extend(st.bans.keys().copied());
        let stranger = Record {
            decayed_at: now,
            ..Default::default()
        };
        let mut out: Vec<PeerCredit> = peers
            .iter()
            .map(|p| {
                let r = st.records.get(p).unwrap_or(&stranger);
                self.view(*p, r, st.bans.get(p), now)
            })
            .collect();
        out.sort_by(|a, b| b.score.cmp(&a.score).then(a.peer.cmp(&b.peer)));
        out
    }

    /// Verified content bytes received from and served to every peer the
    /// ledger holds (no forecasts computed: cheap enough to sample often).
    pub fn byte_totals(&self) -> (u64, u64) {
        let st = self.state.lock().expect("lock");
        st.records.values().fold((0, 0), |(r, s), rec| {
            (
                r.saturating_add(rec.bytes_received),
                s.saturating_add(rec.bytes_served),
            )
        })
    }

    /// The peers banned now, with their bans.
    pub fn banned(&self) -> Vec<(PeerId, Ban)> {
        let now = now_secs();
        let st = self.state.lock().expect("lock");
        st.bans
            .iter()
            .filter(|(_, b)| b.until_unix as f64 > now)
            .map(|(p, b)| (*p, b.clone()))
            .collect()
    }

    /// Bans a peer until `until_unix`; written at once.
    pub fn ban(&self, peer: PeerId, until_unix: u64, reason: &str) -> Result<(), LedgerError> {
        let ban = Ban {
            until_unix,
            reason: reason.into(),
        };
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(BANS)
            .map_err(db)?
            .insert(peer.to_bytes().as_slice(), ban.encode_to_vec().as_slice())
            .map_err(db)?;
        tx.commit().map_err(db)?;
        self.state.lock().expect("lock").bans.insert(peer, ban);
        Ok(())
    }

    /// Lifts a peer's ban (the operator's call); written at once. Lifting
    /// no ban is not an error: the peer is let in either way.
    pub fn unban(&self, peer: &PeerId) -> Result<bool, LedgerError> {
        let tx = self.db.begin_write().map_err(db)?;
        let removed = tx
            .open_table(BANS)
            .map_err(db)?
            .remove(peer.to_bytes().as_slice())
            .map_err(db)?
            .is_some();
        tx.commit().map_err(db)?;
        self.state.lock().expect("lock").bans.remove(peer);
        Ok(removed)
    }

    /// Writes changed records and new history rows in one transaction.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let (records, history, first_seq, forgotten) = {
            let mut st = self.state.lock().expect("lock");
            if st.dirty.is_empty() && st.history.is_empty() && st.forgotten.is_empty() {
                return Ok(());
            }
            let forgotten: Vec<PeerId> = st.forgotten.drain().collect();
            let dirty: Vec<PeerId> = st.dirty.drain().collect();
            let records: Vec<(PeerId, Vec<u8>)> = dirty
                .into_iter()
                .filter_map(|p| st.records.get(&p).map(|r| (p, r.encode_to_vec())))
                .collect();
            let history = std::mem::take(&mut st.history);
            let first = st.next_seq;
            st.next_seq += history.len() as u64;
            (records, history, first, forgotten)
        };
        let tx = self.db.begin_write().map_err(db)?;
        {
            let mut peers = tx.open_table(PEERS).map_err(db)?;
            for (p, bytes) in &records {
                peers
                    .insert(p.to_bytes().as_slice(), bytes.as_slice())
                    .map_err(db)?;
            }
            let mut hist = tx.open_table(HISTORY).map_err(db)?;
            for (i, (p, e)) in history.iter().enumerate() {
                let key = p.to_bytes();
                let seq = first_seq + i as u64;
                hist.insert((key.as_slice(), seq), e.encode_to_vec().as_slice())
                    .map_err(db)?;
                if seq >= HISTORY_PER_PEER {
                    // Trim this peer's rows older than the newest HISTORY_PER_PEER
                    // sequence numbers (a cheap bound, exact for a busy peer).
                    let old: Vec<u64> = hist
                        .range((key.as_slice(), 0)..(key.as_slice(), seq - HISTORY_PER_PEER))
                        .map_err(db)?
                        .filter_map(|r| r.ok().map(|(k, _)| k.value().1))
                        .collect();
                    for s in old {
                        hist.remove((key.as_slice(), s)).map_err(db)?;
                    }
                }
            }
            // After the new rows: those of a forgotten peer go with it.
            for p in &forgotten {
                let key = p.to_bytes();
                peers.remove(key.as_slice()).map_err(db)?;
                hist.retain_in((key.as_slice(), 0)..=(key.as_slice(), u64::MAX), |_, _| {
                    false
                })
                .map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// A peer's history, newest first (flushes first).
    pub fn history(&self, peer: &PeerId, limit: usize) -> Result<Vec<Event>, LedgerError> {
        self.flush()?;
        let key = peer.to_bytes();
        let tx = self.db.begin_read().map_err(db)?;
        let hist = tx.open_table(HISTORY).map_err(db)?;
        let mut out = Vec::new();
        for row in hist
            .range((key.as_slice(), 0)..=(key.as_slice(), u64::MAX))
            .map_err(db)?
            .rev()
        {
            let (_, v) = row.map_err(db)?;
            out.push(Event::decode(v.value()).map_err(LedgerError::Corrupt)?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(dir: &Path) -> Ledger {
        Ledger::open(
            &dir.join("credit.redb"),
            Weights::default(),
            Policy::default(),
            7.0 * 86400.0,
        )
        .unwrap()
    }

    #[test]
    fn clean_transfers_raise_and_corrupt_blocks_lower_the_score() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let (good, bad) = (PeerId::random(), PeerId::random());
        assert_eq!(l.credit(&good).score, 50);
        l.record(
            good,
            EventKind::Received {
                bytes: 64 << 20,
                secs: 0.5,
            },
        );
        l.record(
            bad,
            EventKind::Received {
                bytes: 4 << 20,
                secs: 2.0,
            },
        );
        l.record(bad, EventKind::CorruptBlock);
        l.record(bad, EventKind::CorruptBlock);
        let (g, b) = (l.credit(&good), l.credit(&bad));
        assert!(g.score > 90, "{g:?}");
        assert!(b.score < 15 && b.standing == Standing::Refused, "{b:?}");
        assert!(g.expected_bps > b.expected_bps);
        let list = l.list();
        assert_eq!(list[0].peer, good);
        assert_eq!(list[1].peer, bad);
    }

    #[test]
    fn compute_results_move_the_score_and_the_speed_forecast() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let (honest, liar) = (PeerId::random(), PeerId::random());
        for secs in [2.0, 4.0] {
            l.record(
                honest,
                EventKind::ComputeAgreed {
                    fuel: 8_000_000,
                    secs,
                },
            );
        }
        l.record(liar, EventKind::ComputeDisagreed);
        let h = l.credit(&honest);
        assert_eq!((h.compute_agreed, h.compute_disagreed), (2, 0));
        assert!(h.score > 50, "{h:?}");
        // 4 M/s first, then a fifth of the way to 2 M/s.
        assert!((h.expected_fuel_per_sec - 3_600_000.0).abs() < 1.0, "{h:?}");
        let b = l.credit(&liar);
        assert_eq!((b.compute_agreed, b.compute_disagreed), (0, 1));
        assert!(
            b.score < 15,
            "one wrong answer outweighs a stranger's doubt: {b:?}"
        );
        assert_eq!(b.expected_fuel_per_sec, 0.0);
    }

    #[test]
    fn evidence_decays_towards_neutral() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let p = PeerId::random();
        let t0 = 1_000_000.0;
        l.record_at(p, EventKind::CorruptBlock, t0);
        assert!(l.credit_at(&p, t0).score < 10);
        let later = l.credit_at(&p, t0 + 10.0 * 7.0 * 86400.0);
        assert!(later.score >= 49, "{later:?}");
    }

    #[test]
    fn throwaway_identities_cannot_grow_the_ledger_nor_wash_a_bad_record() {
        let dir = tempfile::tempdir().unwrap();
        let (cheat, banned, regular) = (PeerId::random(), PeerId::random(), PeerId::random());
        let earner = PeerId::random();
        let churn: Vec<PeerId> = (0..300).map(|_| PeerId::random()).collect();
        {
            let mut l = ledger(dir.path());
            l.max_records = 100;
            l.record_at(cheat, EventKind::CorruptBlock, 1000.0);
            l.record_at(
                earner,
                EventKind::Received {
                    bytes: 64 << 20,
                    secs: 1.0,
                },
                1000.0,
            );
            l.record_at(banned, EventKind::Seen { secs: 1 }, 1000.0);
            l.ban(banned, u64::MAX / 2, "malware").unwrap();
            l.record_at(regular, EventKind::Seen { secs: 1 }, 1000.0);
            l.flush().unwrap();
            for (i, p) in churn.iter().enumerate() {
                let at = 2000.0 + i as f64;
                l.record_at(*p, EventKind::Seen { secs: 1 }, at);
                // A peer seen now and then through the churn is kept.
                if i % 50 == 0 {
                    l.record_at(regular, EventKind::Seen { secs: 1 }, at);
                }
            }
            assert!(l.list().len() <= 100, "{} records", l.list().len());
            assert_eq!(l.credit(&regular).uptime_secs, 7, "forgotten while active");
            l.flush().unwrap();
        }
        // What was forgotten is gone from the file too; what counts stayed.
        let l = ledger(dir.path());
        assert!(
            l.list().len() <= 100,
            "{} records after reopen",
            l.list().len()
        );
        assert_eq!(
            l.credit(&cheat).corrupt_blocks,
            1,
            "a bad record was washed"
        );
        assert_eq!(
            l.credit(&earner).bytes_received,
            64 << 20,
            "churn erased a peer's good credit"
        );
        assert_eq!(l.credit(&banned).standing, Standing::Banned);
        assert_eq!(l.credit(&churn[0]).uptime_secs, 0, "the oldest stayed");
        assert!(l.history(&churn[0], 10).unwrap().is_empty());
        assert_eq!(l.credit(&churn[299]).uptime_secs, 1);
    }

    #[test]
    fn records_history_and_bans_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = PeerId::random();
        {
            let l = ledger(dir.path());
            l.record(
                p,
                EventKind::Received {
                    bytes: 1 << 20,
                    secs: 0.1,
                },
            );
            l.record(
                p,
                EventKind::Malware {
                    signature: "Eicar-Test-Signature".into(),
                },
            );
            l.ban(p, u64::MAX / 2, "malware").unwrap();
            l.flush().unwrap();
        }
        let l = ledger(dir.path());
        let c = l.credit(&p);
        assert_eq!(c.bytes_received, 1 << 20);
        assert_eq!(l.byte_totals(), (1 << 20, 0));
        assert_eq!(c.malware, 1);
        assert_eq!(c.standing, Standing::Banned);
        let h = l.history(&p, 10).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].kind, "malware");
        assert_eq!(h[0].detail, "Eicar-Test-Signature");
        // New rows after a reopen do not overwrite old ones.
        l.record(p, EventKind::Violation);
        assert_eq!(l.history(&p, 10).unwrap().len(), 2);
    }

    #[test]
    fn an_expired_ban_lifts() {
        let dir = tempfile::tempdir().unwrap();
        let l = ledger(dir.path());
        let p = PeerId::random();
        l.ban(p, 10, "old").unwrap();
        assert_ne!(l.credit(&p).standing, Standing::Banned);
    }

    #[test]
    fn an_operators_unban_lifts_the_ban_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let p = PeerId::random();
        {
            let l = ledger(dir.path());
            l.ban(p, u64::MAX / 2, "by the operator").unwrap();
            assert_eq!(l.credit(&p).standing, Standing::Banned);
            assert_eq!(l.banned().len(), 1);
            assert!(l.unban(&p).unwrap());
            assert!(l.banned().is_empty());
            assert_ne!(l.credit(&p).standing, Standing::Banned);
            assert!(!l.unban(&p).unwrap(), "a second unban finds no ban");
        }
        let l = ledger(dir.path());
        assert_ne!(
            l.credit(&p).standing,
            Standing::Banned,
            "the unban was written"
        );
    }
}
