//! The receipts a node holds (redb), and the balances derived from them.
//!
//! A balance is never stored: it is recomputed from receipts whose two
//! signatures verified when they were added, so it cannot drift from them
//! and no node can raise its own without a counterparty's signature.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use libp2p_identity::PeerId;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Receipt, ReceiptError};

const RECEIPTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("receipts");

/// Why the receipt store failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptsError {
    /// The database failed.
    #[error("receipt database: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A stored receipt no longer verifies (the file was altered).
    #[error("stored receipt {id} does not verify: {source}")]
    Corrupt {
        /// Its id.
        id: String,
        /// Why.
        source: ReceiptError,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> ReceiptsError {
    ReceiptsError::Db(Box::new(e.into()))
}

/// A node's standing in credits, from the receipts held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Balance {
    /// Credits earned as a provider.
    pub earned: u64,
    /// Credits spent as a requester.
    pub spent: u64,
    /// Receipts naming the node.
    pub receipts: u64,
}

impl Balance {
    /// Earned minus spent.
    pub fn net(&self) -> i64 {
        self.earned as i64 - self.spent as i64
    }
}

/// The store. Calls block on disk: use from a blocking task.
#[derive(Debug)]
pub struct Receipts {
    db: Database,
    /// Every receipt, in the order added (verified once, at open or add).
    all: Mutex<Vec<Receipt>>,
}

impl Receipts {
    /// Opens (or creates) the store at `path`, verifying every receipt in it.
    pub fn open(path: &Path) -> Result<Self, ReceiptsError> {
        let database = Database::create(path).map_err(db)?;
        let tx = database.begin_write().map_err(db)?;
        tx.open_table(RECEIPTS).map_err(db)?;
        tx.commit().map_err(db)?;
        let mut all = Vec::new();
        {
            let tx = database.begin_read().map_err(db)?;
            for row in tx.open_table(RECEIPTS).map_err(db)?.iter().map_err(db)? {
                let (id, bytes) = row.map_err(db)?;
                let receipt =
                    Receipt::decode(bytes.value()).map_err(|source| ReceiptsError::Corrupt {
                        id: hex(id.value()),
                        source,
                    })?;
                all.push(receipt);
            }
        }
        all.sort_by_key(|r| (r.body.completed_unix, r.id));
        Ok(Self {
            db: database,
            all: Mutex::new(all),
        })
    }

    /// Adds a verified receipt; `false` if it was already held.
    pub fn add(&self, receipt: &Receipt) -> Result<bool, ReceiptsError> {
        let mut all = self.all.lock().expect("lock");
        if all.iter().any(|r| r.id == receipt.id) {
            return Ok(false);
        }
        let tx = self.db.begin_write().map_err(db)?;
        tx.open_table(RECEIPTS)
            .map_err(db)?
            .insert(&receipt.id, receipt.signed.encode_to_vec().as_slice())
            .map_err(db)?;
        tx.commit().map_err(db)?;
        all.push(receipt.clone());
        Ok(true)
    }

    /// The newest `limit` receipts, newest first.
    pub fn list(&self, limit: usize) -> Vec<Receipt> {
        let all = self.all.lock().expect("lock");
        all.iter().rev().take(limit).cloned().collect()
    }

    /// `peer`'s balance from the receipts held.
    pub fn balance(&self, peer: &PeerId) -> Balance {
        self.balances().remove(peer).unwrap_or_default()
    }

    /// Every party's balance from the receipts held.
    pub fn balances(&self) -> HashMap<PeerId, Balance> {
        let mut out: HashMap<PeerId, Balance> = HashMap::new();
        for r in self.all.lock().expect("lock").iter() {
            let p = out.entry(r.provider).or_default();
            p.earned += r.body.credits;
            p.receipts += 1;
            let q = out.entry(r.requester).or_default();
            q.spent += r.body.credits;
            q.receipts += 1;
        }
        out
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ReceiptBody, credits_for};
    use libp2p_identity::Keypair;

    fn receipt(req: &Keypair, prov: &Keypair, job: u8, work: u64) -> Receipt {
        ReceiptBody {
            job_id: vec![job; 16],
            module_id: "aa".repeat(32),
            input_id: String::new(),
            requester_key: req.public().encode_protobuf(),
            provider_key: prov.public().encode_protobuf(),
            work_units: work,
            credits: credits_for(work, 2),
            result_id: "cc".repeat(32),
            completed_unix: 1_700_000_000 + job as u64,
        }
        .sign_as_provider(prov)
        .unwrap()
        .countersign(req)
        .unwrap()
    }

    #[test]
    fn balances_follow_receipts_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receipts.redb");
        let (a, b, c) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let (pa, pb, pc) = (
            a.public().to_peer_id(),
            b.public().to_peer_id(),
            c.public().to_peer_id(),
        );
        {
            let store = Receipts::open(&path).unwrap();
            assert!(store.add(&receipt(&a, &b, 1, 3_000_000)).unwrap());
            assert!(store.add(&receipt(&a, &c, 1, 3_000_000)).unwrap());
            let dup = receipt(&a, &b, 1, 3_000_000);
            assert!(!store.add(&dup).unwrap(), "a receipt counts once");
            assert!(store.add(&receipt(&b, &a, 2, 1_000_000)).unwrap());
        }
        let store = Receipts::open(&path).unwrap();
        assert_eq!(store.list(10).len(), 3);
        assert_eq!(store.list(1)[0].job.0, [2; 16], "newest first");
        let (ba, bb, bc) = (store.balance(&pa), store.balance(&pb), store.balance(&pc));
        assert_eq!((ba.earned, ba.spent, ba.net()), (2, 12, -10));
        assert_eq!((bb.earned, bb.spent, bb.net()), (6, 2, 4));
        assert_eq!((bc.earned, bc.spent, bc.net()), (6, 0, 6));
        assert_eq!(ba.net() + bb.net() + bc.net(), 0, "credit is conserved");
    }

    #[test]
    fn an_altered_store_is_refused_not_believed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("receipts.redb");
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let r = receipt(&a, &b, 1, 5_000_000);
        Receipts::open(&path).unwrap().add(&r).unwrap();
        // Rewrite the stored receipt with ten times the credits.
        {
            let database = Database::create(&path).unwrap();
            let tx = database.begin_write().unwrap();
            let mut signed = r.signed.clone();
            let mut body = r.body.clone();
            body.credits *= 10;
            signed.body = body.encode_to_vec();
            tx.open_table(RECEIPTS)
                .unwrap()
                .insert(&r.id, signed.encode_to_vec().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        assert!(matches!(
            Receipts::open(&path),
            Err(ReceiptsError::Corrupt { .. })
        ));
    }
}
