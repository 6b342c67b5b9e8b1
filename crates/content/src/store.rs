//! The local content store: blob bytes and their hash trees as files, an index
//! in redb (an embedded ACID database).
//!
//! Layout under the store directory:
//! ```text
//!   index.redb            items: content id → (size, pinned, added);
//!                         manifests: content id → signed manifest;
//!                         words: each word an item is found by → its id
//!   blobs/<id>.data       the bytes
//!   blobs/<id>.obao       the pre-order hash tree
//!   tmp/                  imports in progress
//!   partial/<id>.data     a kept download's bytes so far, and beside them
//!   partial/<id>.state    its checkpoint (see `Partial`): resumed by the next
//!                         download of the item, removed after PARTIAL_KEEP
//! ```
//! Crash safety: an import writes to `tmp/`, syncs, hashes, moves the files into
//! `blobs/` and only then commits the index entry. An item is visible exactly when
//! its index entry exists, so a crash at any point leaves no partial item; the
//! next [`Store::open`] deletes what a crash left in `tmp/` and any blob files
//! without an index entry, and drops entries whose files are gone.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::{BTreeSet, HashSet};

use prost::Message;
use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};

use bao_tree::BaoTree;
use bao_tree::io::outboard::PreOrderOutboard;

use crate::verified::BLOCK_SIZE;
use crate::{ContentError, ContentId, Manifest, Outboard, SignedManifest, keywords};

const ITEMS: TableDefinition<&[u8; 32], &[u8; 17]> = TableDefinition::new("items");
/// Signed manifests, committed in the same transaction as their item.
const MANIFESTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("manifests");
/// The search index: every word an item is found by
/// ([`keywords::item_words`]) → the item, kept in the transaction that adds
/// or removes it. A search decodes only the items under its query's longest
/// word, not every manifest.
const WORDS: MultimapTableDefinition<&str, &[u8; 32]> = MultimapTableDefinition::new("words");
/// Store metadata. `words`: the version of the search index (absent in
/// stores from before it, which are indexed when opened).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const WORDS_VERSION: u64 = 1;
/// Items one search decodes at most: a query whose rarest word is common
/// costs a bounded amount, however many items the store holds.
pub const SEARCH_DECODE_LIMIT: usize = 10_000;

/// How many items are indexed under words starting with `prefix`, counted
/// up to `most` (an item under two such words counts twice).
fn postings(
    words: &redb::ReadOnlyMultimapTable<&str, &[u8; 32]>,
    prefix: &str,
    most: usize,
) -> Result<usize, StoreError> {
    let mut n = 0;
    for row in words.range(prefix..).map_err(index)? {
        let (word, ids) = row.map_err(index)?;
        if !word.value().starts_with(prefix) {
            break;
        }
        n += ids.len() as usize;
        if n >= most {
            break;
        }
    }
    Ok(n)
}

/// The manifest inside a stored signed manifest (verified before it was
/// stored).
fn manifest_of(signed: &[u8]) -> Option<Manifest> {
    let sm = SignedManifest::decode(signed).ok()?;
    Manifest::decode(sm.manifest.as_slice()).ok()
}

fn words_of(signed: &[u8]) -> BTreeSet<String> {
    manifest_of(signed)
        .map(|m| keywords::item_words(&m))
        .unwrap_or_default()
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File I/O failed (disk full shows up here, with nothing half-visible).
    #[error("Store I/O on {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The index database failed.
    #[error("Store index")]
    Index(#[source] Box<redb::Error>),
    /// No such item.
    #[error("No content {0}")]
    NotFound(ContentId),
    /// Encoding or verification failed.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// The manifest could not be made.
    #[error(transparent)]
    Manifest(#[from] crate::ManifestError),
    /// The caller declined the item before it became visible (e.g. a scan).
    #[error("Import declined: {0}")]
    Declined(String),
}

fn index<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Index(Box::new(e.into()))
}

/// What the index records per item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemInfo {
    /// Content id.
    pub id: ContentId,
    /// Size in bytes.
    pub size: u64,
    /// Pinned items are never garbage-collected.
    pub pinned: bool,
    /// Seconds since the Unix epoch when it was added.
    pub added_unix: u64,
}

fn encode_info(size: u64, pinned: bool, added: u64) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[..8].copy_from_slice(&size.to_le_bytes());
    v[8] = pinned as u8;
    v[9..].copy_from_slice(&added.to_le_bytes());
    v
}

fn decode_info(id: [u8; 32], v: &[u8; 17]) -> ItemInfo {
    ItemInfo {
        id: ContentId(id),
        size: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
        pinned: v[8] != 0,
        added_unix: u64::from_le_bytes(v[9..].try_into().expect("8 bytes")),
    }
}

/// A content store in one directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db: Database,
    /// Items served most recently, newest first.
    served: std::sync::Mutex<std::collections::VecDeque<(ContentId, std::sync::Arc<Served>)>>,
    /// Bumped by every removal, so a cache fill that raced one is not kept.
    removals: std::sync::atomic::AtomicU64,
}

/// How many items keep their files open (and small trees in memory) for
/// serving: a provider answers block after block of the same item, and
/// opening two files and reading the tree node by node per block cost more
/// than the block.
const SERVE_CACHE: usize = 8;
/// Trees up to this size (items up to 4 GiB) are held in memory for serving.
const TREE_IN_MEMORY: u64 = 16 << 20;

/// What serving an item needs at hand.
#[derive(Debug)]
struct Served {
    data: File,
    tree: ServedTree,
    size: u64,
}

#[derive(Debug)]
enum ServedTree {
    Memory(Vec<u8>),
    File(File),
}

/// How long an unfinished download waits to be resumed before its files are
/// removed (when the store is next opened).
pub const PARTIAL_KEEP: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

impl Store {
    /// Opens (or creates) the store and repairs what a crash left behind.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        for sub in ["blobs", "tmp", "partial"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(io(&dir.join(sub)))?;
        }
        let db = Database::create(dir.join("index.redb")).map_err(index)?;
        let tx = db.begin_write().map_err(index)?;
        tx.open_table(ITEMS).map_err(index)?;
        tx.open_table(MANIFESTS).map_err(index)?;
        {
            let mut meta = tx.open_table(META).map_err(index)?;
            let mut words = tx.open_multimap_table(WORDS).map_err(index)?;
            let indexed = meta.get("words").map_err(index)?.map(|v| v.value());
            if indexed != Some(WORDS_VERSION) {
                let manifests = tx.open_table(MANIFESTS).map_err(index)?;
                for row in manifests.iter().map_err(index)? {
                    let (id, signed) = row.map_err(index)?;
                    for w in words_of(signed.value()) {
                        words.insert(w.as_str(), id.value()).map_err(index)?;
                    }
                }
                meta.insert("words", WORDS_VERSION).map_err(index)?;
            }
        }
        tx.commit().map_err(index)?;
        let store = Self {
            dir: dir.to_owned(),
            db,
            served: Default::default(),
            removals: Default::default(),
        };
        store.recover()?;
        Ok(store)
    }

    /// Where a kept download of `id` keeps its bytes and its checkpoint, so
    /// that the next download of the item resumes it.
    pub fn partial_paths(&self, id: &ContentId) -> (PathBuf, PathBuf) {
        let dir = self.dir.join("partial");
        (
            dir.join(format!("{id}.data")),
            dir.join(format!("{id}.state")),
        )
    }

    fn blob_path(&self, id: &ContentId, ext: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{id}.{ext}"))
    }

    fn recover(&self) -> Result<(), StoreError> {
        let tmp = self.dir.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(|source| StoreError::Io {
            path: tmp.clone(),
            source,
        })? {
            let _ = std::fs::remove_file(
                entry
                    .map_err(|source| StoreError::Io {
                        path: tmp.clone(),
                        source,
                    })?
                    .path(),
            );
        }
        self.sweep_partials()?;
        let known: std::collections::HashSet<String> =
            self.list()?.iter().map(|i| i.id.to_string()).collect();
        let blobs = self.dir.join("blobs");
        for entry in std::fs::read_dir(&blobs)
            .map_err(|source| StoreError::Io {
                path: blobs.clone(),
                source,
            })?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.split('.').next().unwrap_or_default();
            if !known.contains(stem) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let missing: Vec<ContentId> = self
            .list()?
            .into_iter()
            .filter(|i| {
                !self.blob_path(&i.id, "data").exists() || !self.blob_path(&i.id, "obao").exists()
            })
            .map(|i| i.id)
            .collect();
        for id in missing {
            self.remove_entry(&id)?;
        }
        Ok(())
    }

    /// Removes unfinished downloads nobody resumed for [`PARTIAL_KEEP`], and
    /// checkpoints a crash left half-written.
    fn sweep_partials(&self) -> Result<(), StoreError> {
        let dir = self.dir.join("partial");
        let entries = std::fs::read_dir(&dir).map_err(io(&dir))?;
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let half_written = path.extension().is_some_and(|e| e == "state-new");
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() > PARTIAL_KEEP);
            if half_written || stale {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(())
    }

    /// Imports bytes from a reader; returns the item once it is durably visible.
    ///
    /// `manifest` is called with the item's id and size once the bytes are hashed
    /// and returns the signed manifest stored with it in the same transaction.
    pub fn import(
        &self,
        mut data: impl Read,
        manifest: impl FnOnce(ContentId, u64) -> Result<Vec<u8>, StoreError>,
    ) -> Result<ItemInfo, StoreError> {
        let tmp_data = self.tmp_path("data");
        let result = (|| {
            let mut f = File::create(&tmp_data).map_err(io(&tmp_data))?;
            std::io::copy(&mut data, &mut f).map_err(io(&tmp_data))?;
            f.sync_all().map_err(io(&tmp_data))?;
            drop(f);
            let f = File::open(&tmp_data).map_err(io(&tmp_data))?;
            let ob = Outboard::from_reader(std::io::BufReader::with_capacity(1 << 20, f))
                .map_err(io(&tmp_data))?;
            let signed = manifest(ob.id(), ob.size())?;
            self.commit(&tmp_data, &ob, &signed)
        })();
        let _ = std::fs::remove_file(&tmp_data);
        result
    }

    /// A fresh path under `tmp/` (removed on the next open if still there).
    pub fn tmp_path(&self, ext: &str) -> PathBuf {
        self.dir.join("tmp").join(format!("{}.{ext}", unique()))
    }

    /// Makes a finished download a stored item, with its verified manifest.
    pub fn commit_partial(
        &self,
        partial: &crate::Partial,
        manifest: &[u8],
    ) -> Result<ItemInfo, StoreError> {
        let (path, ob) = partial.finish()?;
        let info = self.commit(&path, &ob, manifest)?;
        partial.committed();
        Ok(info)
    }

    fn commit(
        &self,
        tmp_data: &Path,
        ob: &Outboard,
        manifest: &[u8],
    ) -> Result<ItemInfo, StoreError> {
        let id = ob.id();
        if let Some(info) = self.get(&id)? {
            return Ok(info);
        }
        let obao = self.blob_path(&id, "obao");
        let tmp_obao = tmp_data.with_extension("obao");
        let mut f = File::create(&tmp_obao).map_err(io(&tmp_obao))?;
        f.write_all(ob.tree_bytes()).map_err(io(&tmp_obao))?;
        f.sync_all().map_err(io(&tmp_obao))?;
        std::fs::rename(&tmp_obao, &obao).map_err(io(&obao))?;
        let data = self.blob_path(&id, "data");
        std::fs::rename(tmp_data, &data).map_err(io(&data))?;
        let blobs = self.dir.join("blobs");
        File::open(&blobs)
            .and_then(|d| d.sync_all())
            .map_err(io(&blobs))?;
        let added = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let tx = self.db.begin_write().map_err(index)?;
        tx.open_table(ITEMS)
            .map_err(index)?
            .insert(&id.0, &encode_info(ob.size(), false, added))
            .map_err(index)?;
        tx.open_table(MANIFESTS)
            .map_err(index)?
            .insert(&id.0, manifest)
            .map_err(index)?;
        {
            let mut words = tx.open_multimap_table(WORDS).map_err(index)?;
            for w in words_of(manifest) {
                words.insert(w.as_str(), &id.0).map_err(index)?;
            }
        }
        tx.commit().map_err(index)?;
        Ok(ItemInfo {
            id,
            size: ob.size(),
            pinned: false,
            added_unix: added,
        })
    }

    /// The signed manifest stored with an item.
    pub fn manifest(&self, id: &ContentId) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(index)?;
        let table = tx.open_table(MANIFESTS).map_err(index)?;
        Ok(table.get(&id.0).map_err(index)?.map(|v| v.value().to_vec()))
    }

    /// Every stored signed manifest.
    pub fn manifests(&self) -> Result<Vec<(ContentId, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(index)?;
        let table = tx.open_table(MANIFESTS).map_err(index)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(index)? {
            let (k, v) = row.map_err(index)?;
            out.push((ContentId(*k.value()), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Stored items that match every word of `query` (as
    /// [`keywords::matches`]: prefix match) and that `keep` accepts, at most
    /// `limit`, with their signed manifests. Found through the word index:
    /// only the items under the query's rarest word are decoded, at most
    /// [`SEARCH_DECODE_LIMIT`] of them.
    pub fn search(
        &self,
        query: &[String],
        limit: usize,
        mut keep: impl FnMut(&ContentId, &Manifest) -> bool,
    ) -> Result<Vec<(ContentId, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(index)?;
        let words = tx.open_multimap_table(WORDS).map_err(index)?;
        let manifests = tx.open_table(MANIFESTS).map_err(index)?;
        // The rarest word: each is counted only as far as the rarest so far,
        // so a common word costs no more than the rare one beside it.
        let mut rarest: Option<(&String, usize)> = None;
        for q in query {
            let most = rarest.map_or(SEARCH_DECODE_LIMIT, |(_, n)| n);
            let n = postings(&words, q, most)?;
            if n < most || rarest.is_none() {
                rarest = Some((q, n));
            }
        }
        let Some((key, _)) = rarest else {
            return Ok(Vec::new());
        };
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        'words: for row in words.range(key.as_str()..).map_err(index)? {
            let (word, ids) = row.map_err(index)?;
            if !word.value().starts_with(key.as_str()) {
                break;
            }
            for id in ids {
                let id = ContentId(*id.map_err(index)?.value());
                if !seen.insert(id) {
                    continue;
                }
                if seen.len() > SEARCH_DECODE_LIMIT {
                    break 'words;
                }
                let Some(signed) = manifests.get(&id.0).map_err(index)? else {
                    continue;
                };
                let signed = signed.value().to_vec();
                let Some(m) = manifest_of(&signed) else {
                    continue;
                };
                if keywords::matches(&m, query) && keep(&id, &m) {
                    out.push((id, signed));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Opens a stored item's bytes for reading.
    pub fn open_data(&self, id: &ContentId) -> Result<File, StoreError> {
        let path = self.blob_path(id, "data");
        File::open(&path).map_err(io(&path))
    }

    /// The index entry of an item.
    pub fn get(&self, id: &ContentId) -> Result<Option<ItemInfo>, StoreError> {
        let tx = self.db.begin_read().map_err(index)?;
        let table = tx.open_table(ITEMS).map_err(index)?;
        Ok(table
            .get(&id.0)
            .map_err(index)?
            .map(|v| decode_info(id.0, v.value())))
    }

    /// Every item.
    pub fn list(&self) -> Result<Vec<ItemInfo>, StoreError> {
        let tx = self.db.begin_read().map_err(index)?;
        let table = tx.open_table(ITEMS).map_err(index)?;
        let mut out = Vec::with_capacity(table.len().map_err(index)? as usize);
        for row in table.iter().map_err(index)? {
            let (k, v) = row.map_err(index)?;
            out.push(decode_info(*k.value(), v.value()));
        }
        Ok(out)
    }

    /// Marks an item as kept regardless of the quota.
    pub fn set_pinned(&self, id: &ContentId, pinned: bool) -> Result<(), StoreError> {
        let info = self.get(id)?.ok_or(StoreError::NotFound(*id))?;
        let tx = self.db.begin_write().map_err(index)?;
        tx.open_table(ITEMS)
            .map_err(index)?
            .insert(&id.0, &encode_info(info.size, pinned, info.added_unix))
            .map_err(index)?;
        tx.commit().map_err(index)?;
        Ok(())
    }

    fn remove_entry(&self, id: &ContentId) -> Result<bool, StoreError> {
        self.served.lock().expect("lock").retain(|(k, _)| k != id);
        let tx = self.db.begin_write().map_err(index)?;
        let existed = tx
            .open_table(ITEMS)
            .map_err(index)?
            .remove(&id.0)
            .map_err(index)?
            .is_some();
        let signed = tx
            .open_table(MANIFESTS)
            .map_err(index)?
            .remove(&id.0)
            .map_err(index)?
            .map(|v| v.value().to_vec());
        if let Some(signed) = signed {
            let mut words = tx.open_multimap_table(WORDS).map_err(index)?;
            for w in words_of(&signed) {
                words.remove(w.as_str(), &id.0).map_err(index)?;
            }
        }
        tx.commit().map_err(index)?;
        // Under the cache's lock, so a fill that read the index before the
        // commit sees the bump when it comes to insert.
        let mut cache = self.served.lock().expect("lock");
        self.removals
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        cache.retain(|(k, _)| k != id);
        Ok(existed)
    }

    /// Deletes an item: the index entry first (so it is never visible half-deleted),
    /// then its files.
    pub fn delete(&self, id: &ContentId) -> Result<(), StoreError> {
        if !self.remove_entry(id)? {
            return Err(StoreError::NotFound(*id));
        }
        let _ = std::fs::remove_file(self.blob_path(id, "data"));
        let _ = std::fs::remove_file(self.blob_path(id, "obao"));
        Ok(())
    }

    /// Deletes unpinned items, oldest first, until the store holds at most
    /// `quota_bytes`; returns what was removed.
    pub fn gc(&self, quota_bytes: u64) -> Result<Vec<ContentId>, StoreError> {
        let mut items = self.list()?;
        let mut total: u64 = items.iter().map(|i| i.size).sum();
        items.retain(|i| !i.pinned);
        items.sort_by_key(|i| i.added_unix);
        let mut removed = Vec::new();
        for item in items {
            if total <= quota_bytes {
                break;
            }
            self.delete(&item.id)?;
            total -= item.size;
            removed.push(item.id);
        }
        Ok(removed)
    }

    /// Encodes block `k` of a stored item for a peer (see [`crate::block`]).
    /// With `validate`, the stored bytes are re-hashed on the way out, so bit
    /// rot on this disk is caught here instead of being sent.
    pub fn encode_block(
        &self,
        id: &ContentId,
        k: u64,
        validate: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let s = self.served(id)?;
        let root = blake3::Hash::from_bytes(id.0);
        let tree = BaoTree::new(s.size, BLOCK_SIZE);
        let encoded = match &s.tree {
            ServedTree::Memory(t) => {
                let data = t.as_slice();
                crate::block::encode(&s.data, PreOrderOutboard { root, tree, data }, k, validate)
            }
            ServedTree::File(data) => {
                crate::block::encode(&s.data, PreOrderOutboard { root, tree, data }, k, validate)
            }
        };
        Ok(encoded?)
    }

    /// The proof of a stored item's size (see [`crate::size_proof`]), from
    /// its last block (re-hashed with `validate`, as any block served).
    pub fn size_proof(&self, id: &ContentId, validate: bool) -> Result<Vec<u8>, StoreError> {
        let size = self.served(id)?.size;
        if size == 0 {
            return Ok(Vec::new());
        }
        let last = self.encode_block(id, crate::block_count(size) - 1, validate)?;
        Ok(crate::size_proof::from_last_block(size, &last)?)
    }

    /// The open files (and tree) of an item being served.
    fn served(&self, id: &ContentId) -> Result<std::sync::Arc<Served>, StoreError> {
        let mut cache = self.served.lock().expect("lock");
        if let Some(i) = cache.iter().position(|(k, _)| k == id) {
            let hit = cache.remove(i).expect("present");
            let s = hit.1.clone();
            cache.push_front(hit);
            return Ok(s);
        }
        drop(cache);
        let removals = self.removals.load(std::sync::atomic::Ordering::Acquire);
        let info = self.get(id)?.ok_or(StoreError::NotFound(*id))?;
        let obao_path = self.blob_path(id, "obao");
        let tree = File::open(&obao_path).map_err(io(&obao_path))?;
        let len = tree.metadata().map_err(io(&obao_path))?.len();
        let tree = if len <= TREE_IN_MEMORY {
            let mut bytes = Vec::with_capacity(len as usize);
            (&tree).read_to_end(&mut bytes).map_err(io(&obao_path))?;
            ServedTree::Memory(bytes)
        } else {
            ServedTree::File(tree)
        };
        let s = std::sync::Arc::new(Served {
            data: self.open_data(id)?,
            tree,
            size: info.size,
        });
        let mut cache = self.served.lock().expect("lock");
        if self.removals.load(std::sync::atomic::Ordering::Acquire) == removals {
            cache.retain(|(k, _)| k != id);
            cache.push_front((*id, s.clone()));
            cache.truncate(SERVE_CACHE);
        }
        Ok(s)
    }

    /// Total bytes of all items.
    pub fn total_bytes(&self) -> Result<u64, StoreError> {
        Ok(self.list()?.iter().map(|i| i.size).sum())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { path, source }
}

/// A name no other work file of this process (or an earlier one) has: the
/// clock alone repeats when two downloads finish in the same instant.
fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_manifest(_: ContentId, _: u64) -> Result<Vec<u8>, StoreError> {
        Ok(Vec::new())
    }

    fn item(len: usize, seed: u64) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((i ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect()
    }

    /// A signed manifest (unsigned: the store does not check signatures)
    /// naming an item `name` with `tags`.
    fn named(
        name: &str,
        tags: &[&str],
    ) -> impl FnOnce(ContentId, u64) -> Result<Vec<u8>, StoreError> {
        let m = Manifest {
            name: name.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        };
        move |_, _| {
            Ok(SignedManifest {
                manifest: m.encode_to_vec(),
                signature: Vec::new(),
            }
            .encode_to_vec())
        }
    }

    fn found(store: &Store, query: &str) -> Vec<ContentId> {
        let q = keywords::query_keywords(query);
        let mut ids: Vec<ContentId> = store
            .search(&q, 100, |_, _| true)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn search_finds_items_through_the_word_index_and_forgets_deleted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sintel = store
            .import(
                &item(1000, 1)[..],
                named("Sintel Trailer.mp4", &["blender", "sci-fi"]),
            )
            .unwrap()
            .id;
        let bunny = store
            .import(
                &item(1000, 2)[..],
                named("Big Buck Bunny.mp4", &["blender"]),
            )
            .unwrap()
            .id;
        let _plain = store.import(&item(1000, 3)[..], no_manifest).unwrap().id;
        let mut both = vec![sintel, bunny];
        both.sort();
        assert_eq!(found(&store, "sint"), vec![sintel], "prefix of a name word");
        assert_eq!(found(&store, "blender"), both);
        assert_eq!(found(&store, "blender sintel"), vec![sintel], "every word");
        assert_eq!(found(&store, "sci-fi"), vec![sintel], "a whole tag");
        assert!(found(&store, "blender dragon").is_empty());
        // A filter and a limit.
        let q = keywords::query_keywords("mp4");
        assert_eq!(store.search(&q, 1, |_, _| true).unwrap().len(), 1);
        let no_bunny = store.search(&q, 10, |id, _| *id != bunny).unwrap();
        assert_eq!(no_bunny.len(), 1);
        assert_eq!(no_bunny[0].0, sintel);
        store.delete(&sintel).unwrap();
        assert!(found(&store, "sintel").is_empty());
        assert_eq!(found(&store, "blender"), vec![bunny]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(found(&store, "bunny"), vec![bunny], "across a reopen");
    }

    #[test]
    fn a_store_from_before_the_index_is_indexed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let store = Store::open(dir.path()).unwrap();
            let id = store
                .import(&item(1000, 4)[..], named("Elephants Dream", &[]))
                .unwrap()
                .id;
            // As an older version left it: no index, no version.
            let tx = store.db.begin_write().unwrap();
            tx.delete_multimap_table(WORDS).unwrap();
            tx.open_table(META).unwrap().remove("words").unwrap();
            tx.commit().unwrap();
            id
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(found(&store, "eleph dream"), vec![id]);
    }

    #[test]
    fn import_serves_verified_ranges_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(300_000, 1);
        let id = {
            let store = Store::open(dir.path()).unwrap();
            let info = store.import(&data[..], no_manifest).unwrap();
            assert_eq!(info.id, ContentId::from(blake3::hash(&data)));
            info.id
        };
        let store = Store::open(dir.path()).unwrap();
        let wire = store.encode_block(&id, 1, true).unwrap();
        let at = crate::block::verify(id, 300_000, 1, &wire, |_, _| {}).unwrap();
        assert_eq!(&wire[at..], &data[262_144..]);
        assert!(matches!(
            store.encode_block(&ContentId([9; 32]), 0, true),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn crash_leftovers_are_cleaned_and_invisible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kept = store.import(&item(5_000, 2)[..], no_manifest).unwrap();
        drop(store);
        // What a crash can leave: a partial import in tmp/, blob files whose index
        // entry was never committed, and an entry whose data file is gone.
        std::fs::write(dir.path().join("tmp/123-1.data"), b"partial").unwrap();
        let orphan = ContentId([7; 32]);
        std::fs::write(dir.path().join(format!("blobs/{orphan}.data")), b"x").unwrap();
        std::fs::write(dir.path().join(format!("blobs/{orphan}.obao")), b"").unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lost = store.import(&item(6_000, 3)[..], no_manifest).unwrap();
        drop(store);
        std::fs::remove_file(dir.path().join(format!("blobs/{}.data", lost.id))).unwrap();

        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<_> = store.list().unwrap().iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![kept.id]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(!dir.path().join(format!("blobs/{orphan}.data")).exists());
    }

    #[test]
    fn gc_respects_pins_and_quota_and_delete_is_typed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.import(&item(10_000, 4)[..], no_manifest).unwrap();
        let b = store.import(&item(10_000, 5)[..], no_manifest).unwrap();
        let c = store.import(&item(10_000, 6)[..], no_manifest).unwrap();
        store.set_pinned(&a.id, true).unwrap();
        let removed = store.gc(15_000).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!removed.contains(&a.id) && removed.contains(&b.id) && removed.contains(&c.id));
        assert!(store.get(&a.id).unwrap().unwrap().pinned);
        assert!(matches!(store.delete(&b.id), Err(StoreError::NotFound(_))));
        store.delete(&a.id).unwrap();
        assert!(store.list().unwrap().is_empty());
        // Importing the same bytes twice yields one item.
        let x = store.import(&item(1_000, 8)[..], no_manifest).unwrap();
        let y = store.import(&item(1_000, 8)[..], no_manifest).unwrap();
        assert_eq!(x.id, y.id);
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[test]
    fn unfinished_downloads_wait_to_be_resumed_then_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (fresh, fresh_state) = store.partial_paths(&ContentId([1; 32]));
        let (old, _) = store.partial_paths(&ContentId([2; 32]));
        drop(store);
        std::fs::write(&fresh, b"bytes").unwrap();
        std::fs::write(&fresh_state, b"checkpoint").unwrap();
        std::fs::write(&old, b"bytes").unwrap();
        let long_ago = SystemTime::now() - PARTIAL_KEEP - std::time::Duration::from_secs(60);
        File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        let torn = fresh_state.with_extension("state-new");
        std::fs::write(&torn, b"half").unwrap();
        let _store = Store::open(dir.path()).unwrap();
        assert!(fresh.exists() && fresh_state.exists());
        assert!(
            !old.exists(),
            "a download left for longer than PARTIAL_KEEP"
        );
        assert!(!torn.exists(), "a half-written checkpoint");
    }
}
