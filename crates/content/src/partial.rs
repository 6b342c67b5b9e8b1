//! A download in progress: a sparse file, the hash tree filled in as verified
//! blocks arrive, and a bitmap of the blocks held.
//!
//! Blocks are the transfer unit (256 KiB, aligned to chunk groups). Each block's
//! wire ([`crate::block`]) carries the tree nodes from the root down to it;
//! verifying checks them against the content id and saves them into the
//! shared tree. So a partial
//! download can prove — and therefore serve — every block it holds (swarming),
//! and when the last block lands the tree is complete without a second hashing
//! pass over the file.
//!
//! A download that keeps its item is *resumable*: beside its bytes it writes a
//! checkpoint (which blocks it holds and the tree so far) after syncing them,
//! and it leaves both behind when it ends unfinished or the node dies. The
//! next download of the item reopens them and proves each block again against
//! the content id before holding it, so a stale, torn or forged checkpoint
//! costs blocks, never correctness.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use bao_tree::io::sync::Outboard as OutboardRead;
use bao_tree::{BaoTree, TreeNode};

use crate::block::{block_count, block_range};
use crate::verified::{BLOCK_SIZE, verification};
use crate::{ContentError, ContentId, Outboard};

/// Bytes of the tree allocated at a time (a whole number of node pairs).
const TREE_PAGE: usize = 64 * 1024;

/// The hash tree (outboard) of a partial download, allocated a page at a time
/// as verified blocks fill it in. The whole tree is 1/256 of the item (1 GiB
/// for the largest item allowed by default), but a stream that reads a few
/// blocks touches a few pages.
struct SparseTree {
    pages: Vec<Option<Box<[u8]>>>,
    len: usize,
}

impl SparseTree {
    fn new(len: usize) -> Self {
        Self {
            pages: (0..len.div_ceil(TREE_PAGE)).map(|_| None).collect(),
            len,
        }
    }

    /// The node pair at byte `at` (zeros if never written); `None` outside.
    fn pair(&self, at: usize) -> Option<[u8; 64]> {
        if at + 64 > self.len {
            return None;
        }
        Some(match &self.pages[at / TREE_PAGE] {
            Some(page) => {
                let o = at % TREE_PAGE;
                page[o..o + 64].try_into().expect("64 bytes")
            }
            None => [0; 64],
        })
    }

    /// Writes the node pair at byte `at`; false outside the tree.
    fn set_pair(&mut self, at: usize, pair: &[u8; 64]) -> bool {
        if at + 64 > self.len {
            return false;
        }
        let page_len = TREE_PAGE.min(self.len - at / TREE_PAGE * TREE_PAGE);
        let page =
            self.pages[at / TREE_PAGE].get_or_insert_with(|| vec![0; page_len].into_boxed_slice());
        let o = at % TREE_PAGE;
        page[o..o + 64].copy_from_slice(pair);
        true
    }

    /// Bytes allocated so far.
    fn allocated(&self) -> usize {
        self.pages.iter().flatten().map(|p| p.len()).sum()
    }

    /// A tree from [`SparseTree::to_vec`]'s buffer (pages of zeros stay
    /// unallocated).
    fn from_vec(bytes: &[u8]) -> Self {
        let mut t = Self::new(bytes.len());
        for (i, page) in bytes.chunks(TREE_PAGE).enumerate() {
            if page.iter().any(|b| *b != 0) {
                t.pages[i] = Some(page.into());
            }
        }
        t
    }

    /// The whole tree as one buffer (unwritten parts are zeros).
    fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0; self.len];
        for (i, page) in self.pages.iter().enumerate() {
            if let Some(page) = page {
                out[i * TREE_PAGE..i * TREE_PAGE + page.len()].copy_from_slice(page);
            }
        }
        out
    }
}

/// The tree of a partial download, shared between decoders (writers) and
/// encoders (readers serving other peers).
struct SharedTree<'a> {
    root: blake3::Hash,
    tree: BaoTree,
    data: &'a RwLock<SparseTree>,
}

impl OutboardRead for SharedTree<'_> {
    fn root(&self) -> blake3::Hash {
        self.root
    }
    fn tree(&self) -> BaoTree {
        self.tree
    }
    fn load(&self, node: TreeNode) -> std::io::Result<Option<(blake3::Hash, blake3::Hash)>> {
        let Some(offset) = self.tree.pre_order_offset(node) else {
            return Ok(None);
        };
        let pair = self
            .data
            .read()
            .expect("lock")
            .pair(offset as usize * 64)
            .ok_or_else(|| std::io::Error::other("tree node outside the outboard"))?;
        let left: [u8; 32] = pair[..32].try_into().expect("32 bytes");
        let right: [u8; 32] = pair[32..].try_into().expect("32 bytes");
        Ok(Some((left.into(), right.into())))
    }
}

/// A download in progress.
pub struct Partial {
    id: ContentId,
    size: u64,
    path: PathBuf,
    file: File,
    tree: RwLock<SparseTree>,
    have: Mutex<Vec<bool>>,
    /// The checkpoint file of a resumable download.
    state: Option<PathBuf>,
    /// Set when a resumable download's files are worthless (the item was
    /// refused): dropping it then removes them.
    discard: AtomicBool,
    /// Held while a checkpoint is written; true once the download is
    /// committed or discarded, after which none is (a checkpoint still on its
    /// way must not bring back the file the commit removed).
    closed: Mutex<bool>,
}

/// Opens (creating) a resumable download's file, not through a symbolic
/// link, and takes an exclusive lock on it for as long as it is open; `None`
/// while another download holds the lock.
fn lock_file(path: &Path) -> std::io::Result<Option<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn in_use() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::WouldBlock,
        "another download of the item holds it",
    )
}

/// First bytes of a checkpoint file.
const CHECKPOINT_MAGIC: &[u8; 16] = b"p2pvm partial 1\n";

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Partial {
    /// Creates the (sparse) file for an item of `size` bytes at `path`.
    pub fn create(path: &Path, id: ContentId, size: u64) -> std::io::Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Self::fresh(file, path, None, id, size)
    }

    /// Opens the resumable download of `id` at `path` (its checkpoint at
    /// `state`): the one an earlier download left, if its checkpoint is
    /// usable (see [`Partial::resume`]), else a new one in its place. `None`
    /// while another download of the item holds it (one owner at a time:
    /// the caller then keeps its download elsewhere).
    pub fn open_resumable(
        path: &Path,
        state: &Path,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Option<Self>> {
        let Some(file) = lock_file(path)? else {
            return Ok(None);
        };
        if let Some(p) = Self::resume_locked(file.try_clone()?, path, state, id, size)? {
            return Ok(Some(p));
        }
        Self::fresh_resumable(file, path, state, id, size).map(Some)
    }

    /// Creates a resumable download at `path`, its checkpoint at `state`;
    /// whatever was there before is replaced. Fails (`WouldBlock`) while
    /// another download holds it.
    pub fn create_resumable(
        path: &Path,
        state: &Path,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Self> {
        let file = lock_file(path)?.ok_or_else(in_use)?;
        Self::fresh_resumable(file, path, state, id, size)
    }

    fn fresh_resumable(
        file: File,
        path: &Path,
        state: &Path,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Self> {
        match std::fs::remove_file(state) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        file.set_len(0)?;
        Self::fresh(file, path, Some(state.to_owned()), id, size)
    }

    fn fresh(
        file: File,
        path: &Path,
        state: Option<PathBuf>,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Self> {
        file.set_len(size)?;
        let tree = BaoTree::new(size, BLOCK_SIZE);
        Ok(Self {
            id,
            size,
            path: path.to_owned(),
            file,
            tree: RwLock::new(SparseTree::new(tree.outboard_size() as usize)),
            have: Mutex::new(vec![false; block_count(size) as usize]),
            state,
            discard: AtomicBool::new(false),
            closed: Mutex::new(false),
        })
    }

    /// Reopens the resumable download of `id` that a checkpoint at `state`
    /// describes, holding each block it names that still proves against the
    /// content id. `None` when there is no usable checkpoint (none, another
    /// item or size, torn or altered, the bytes gone) or another download
    /// holds it.
    pub fn resume(
        path: &Path,
        state: &Path,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        match lock_file(path)? {
            Some(file) => Self::resume_locked(file, path, state, id, size),
            None => Ok(None),
        }
    }

    fn resume_locked(
        file: File,
        path: &Path,
        state: &Path,
        id: ContentId,
        size: u64,
    ) -> std::io::Result<Option<Self>> {
        let tree_len = BaoTree::new(size, BLOCK_SIZE).outboard_size() as usize;
        let blocks = block_count(size) as usize;
        let expected =
            (CHECKPOINT_MAGIC.len() + 32 + 8 + blocks.div_ceil(8) + tree_len + 32) as u64;
        // A checkpoint of another length is not read at all.
        match std::fs::metadata(state) {
            Ok(m) if m.len() == expected => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        let saved = std::fs::read(state)?;
        let Some((bits, tree)) = parse_checkpoint(&saved, id, size, blocks, tree_len) else {
            return Ok(None);
        };
        if file.metadata()?.len() != size {
            return Ok(None);
        }
        let partial = Self {
            id,
            size,
            path: path.to_owned(),
            file,
            tree: RwLock::new(SparseTree::from_vec(tree)),
            have: Mutex::new(vec![false; blocks]),
            state: Some(state.to_owned()),
            discard: AtomicBool::new(false),
            closed: Mutex::new(false),
        };
        for k in 0..blocks {
            if bits[k / 8] & (1 << (k % 8)) == 0 {
                continue;
            }
            let k = k as u64;
            let proven = crate::block::encode(&partial.file, partial.shared(), k, false)
                .and_then(|wire| crate::block::verify(id, size, k, &wire, |_, _| {}));
            if proven.is_ok() {
                partial.have.lock().expect("lock")[k as usize] = true;
            }
        }
        Ok(Some(partial))
    }

    /// Makes what is held so far survive a crash: syncs the bytes, then
    /// replaces the checkpoint (a plain sync for a download that is not
    /// resumable).
    pub fn checkpoint(&self) -> std::io::Result<()> {
        let Some(state) = &self.state else {
            return self.sync_written();
        };
        let closed = self.closed.lock().expect("lock");
        if *closed {
            return Ok(());
        }
        // The blocks named are on disk: marked held only after their write,
        // and synced below. The tree holds at least their proofs.
        let bits = self.bitfield();
        self.file.sync_data()?;
        let tree = self.tree.read().expect("lock").to_vec();
        let mut out =
            Vec::with_capacity(CHECKPOINT_MAGIC.len() + 32 + 8 + bits.len() + tree.len() + 32);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&bits);
        out.extend_from_slice(&tree);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        let tmp = state.with_extension("state-new");
        let mut f = File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &out)?;
        f.sync_all()?;
        std::fs::rename(&tmp, state)?;
        drop(closed);
        Ok(())
    }

    /// The item was refused: its files go when the download does.
    pub fn discard(&self) {
        *self.closed.lock().expect("lock") = true;
        self.discard.store(true, Ordering::Relaxed);
    }

    /// Bytes of the item's whole hash tree (what a checkpoint writes, with a
    /// bit per block).
    pub fn tree_len(&self) -> usize {
        self.tree.read().expect("lock").len
    }

    /// Whether this download resumes after a restart.
    pub fn resumable(&self) -> bool {
        self.state.is_some()
    }

    /// Reserves the file's blocks on disk for the whole item (a download
    /// that keeps it): writes then land in allocated space instead of making
    /// the file system allocate on every write-back, and a disk too small
    /// for the item says so now (`StorageFull`), not midway. File systems
    /// that cannot preallocate are left sparse.
    pub fn preallocate(&self) -> std::io::Result<()> {
        match rustix::fs::fallocate(
            &self.file,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            self.size,
        ) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Flushes what was written so far to disk (while writes go on): the
    /// final sync in [`Partial::finish`] then has only the tail left.
    pub fn sync_written(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Content id.
    pub fn id(&self) -> ContentId {
        self.id
    }

    /// Item size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        block_count(self.size)
    }

    fn shared(&self) -> SharedTree<'_> {
        SharedTree {
            root: blake3::Hash::from_bytes(self.id.0),
            tree: BaoTree::new(self.size, BLOCK_SIZE),
            data: &self.tree,
        }
    }

    /// Whether block `k` is held (verified).
    pub fn has(&self, k: u64) -> bool {
        self.have
            .lock()
            .expect("lock")
            .get(k as usize)
            .copied()
            .unwrap_or(false)
    }

    /// One bit per block, least significant bit first.
    pub fn bitfield(&self) -> Vec<u8> {
        let have = self.have.lock().expect("lock");
        let mut bits = vec![0u8; have.len().div_ceil(8)];
        for (i, _) in have.iter().enumerate().filter(|(_, h)| **h) {
            bits[i / 8] |= 1 << (i % 8);
        }
        bits
    }

    /// How many blocks are held.
    pub fn held(&self) -> u64 {
        self.have
            .lock()
            .expect("lock")
            .iter()
            .filter(|h| **h)
            .count() as u64
    }

    /// Whether every block is held.
    pub fn complete(&self) -> bool {
        self.have.lock().expect("lock").iter().all(|h| *h)
    }

    /// Verifies a block's wire against the content id and stores it. On error
    /// nothing is written or marked held.
    pub fn accept(&self, k: u64, wire: &[u8]) -> Result<(), ContentError> {
        let at = self.verify(k, wire)?;
        self.store_verified(k, &wire[at..])
    }

    /// Verifies a block's wire (see [`crate::block`]) against the content id
    /// and returns where its bytes start within it, without storing them (a
    /// download that keeps nothing hands them straight to its readers). The
    /// tree learns the block's proof either way.
    pub fn verify(&self, k: u64, wire: &[u8]) -> Result<usize, ContentError> {
        let tree = BaoTree::new(self.size, BLOCK_SIZE);
        let mut proof = Vec::with_capacity(32);
        let at = crate::block::verify(self.id, self.size, k, wire, |node, pair| {
            if let Some(offset) = tree.pre_order_offset(node) {
                proof.push((offset as usize * 64, *pair));
            }
        })?;
        // One lock per block: readers serving other peers share the tree.
        let mut data = self.tree.write().expect("lock");
        for (at, pair) in proof {
            if !data.set_pair(at, &pair) {
                return Err(verification("tree node outside the outboard"));
            }
        }
        Ok(at)
    }

    /// Stores block `k`'s bytes, which [`Partial::verify`] returned, and marks
    /// it held (it can then be read back and served onwards).
    pub fn store_verified(&self, k: u64, block: &[u8]) -> Result<(), ContentError> {
        let range = block_range(self.size, k);
        if block.len() as u64 != range.end - range.start {
            return Err(ContentError::BadRange {
                start: range.start,
                end: range.start + block.len() as u64,
                size: self.size,
            });
        }
        self.file
            .write_all_at(block, range.start)
            .map_err(ContentError::Write)?;
        self.have.lock().expect("lock")[k as usize] = true;
        Ok(())
    }

    /// Encodes a held block for another peer.
    pub fn encode_block(&self, k: u64) -> Result<Vec<u8>, ContentError> {
        if !self.has(k) {
            return Err(ContentError::NotHeld(k));
        }
        crate::block::encode(&self.file, self.shared(), k, false)
    }

    /// Reads held bytes (the caller checks `has` for the blocks it reads).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Syncs the file and returns its path and the completed tree. The file
    /// stays readable through this handle after the store moves it.
    pub fn finish(&self) -> Result<(PathBuf, Outboard), ContentError> {
        if !self.complete() {
            return Err(ContentError::Incomplete);
        }
        self.file.sync_all().map_err(ContentError::Write)?;
        let tree = self.tree.read().expect("lock").to_vec();
        Ok((
            self.path.clone(),
            Outboard::from_parts(self.id, self.size, tree),
        ))
    }

    /// The item is in the store now: the checkpoint, and the bytes if the
    /// store already held the item and did not take them, go.
    pub fn committed(&self) {
        *self.closed.lock().expect("lock") = true;
        if let Some(state) = &self.state {
            let _ = std::fs::remove_file(state);
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Bytes of hash tree held in memory so far.
    pub fn tree_in_memory(&self) -> usize {
        self.tree.read().expect("lock").allocated()
    }

    /// Where the bytes are being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The held blocks' bits and the tree of a checkpoint of `id`, if it is one
/// (whole, unaltered, of this item and size).
fn parse_checkpoint(
    saved: &[u8],
    id: ContentId,
    size: u64,
    blocks: usize,
    tree_len: usize,
) -> Option<(&[u8], &[u8])> {
    let bits_len = blocks.div_ceil(8);
    let head = CHECKPOINT_MAGIC.len() + 32 + 8;
    if saved.len() != head + bits_len + tree_len + 32 {
        return None;
    }
    let (body, sum) = saved.split_at(saved.len() - 32);
    if blake3::hash(body).as_bytes() != sum
        || &body[..16] != CHECKPOINT_MAGIC
        || body[16..48] != id.0
        || body[48..56] != size.to_le_bytes()
    {
        return None;
    }
    Some(body[head..].split_at(bits_len))
}

impl Drop for Partial {
    fn drop(&mut self) {
        // A resumable download leaves its bytes and checkpoint for the next
        // try, unless the item was refused; any other abandoned download
        // leaves nothing. After a commit the file has been moved and
        // removing it is a no-op.
        if self.state.is_none() || self.discard.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(&self.path);
            if let Some(state) = &self.state {
                let _ = std::fs::remove_file(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Block `k`'s wire as a provider holding all of `data` sends it.
    fn wire(data: &[u8], ob: &Outboard, k: u64) -> Vec<u8> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        ob.encode_block(&f, k, true).unwrap()
    }

    fn item(len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| (i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 53) as u8)
            .collect()
    }

    #[test]
    fn blocks_in_any_order_complete_the_item_and_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(1_000_000);
        let ob = Outboard::compute(&data);
        let p = Partial::create(&dir.path().join("x"), ob.id(), ob.size()).unwrap();
        assert_eq!(p.blocks(), 4);
        for k in [2, 0, 3] {
            let wire = wire(&data, &ob, k);
            p.accept(k, &wire).unwrap();
        }
        assert!(!p.complete());
        assert_eq!(p.bitfield(), vec![0b1101]);
        // A held block can be served onwards and verifies at a third peer.
        let again = p.encode_block(2).unwrap();
        let q = Partial::create(&dir.path().join("y"), ob.id(), ob.size()).unwrap();
        q.accept(2, &again).unwrap();
        assert!(matches!(p.encode_block(1), Err(ContentError::NotHeld(1))));
        let wire = wire(&data, &ob, 1);
        p.accept(1, &wire).unwrap();
        let (path, tree) = p.finish().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), data);
        assert_eq!(tree.tree_bytes(), ob.tree_bytes());
    }

    #[test]
    fn a_corrupt_or_misplaced_block_is_refused_and_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(600_000);
        let ob = Outboard::compute(&data);
        let p = Partial::create(&dir.path().join("x"), ob.id(), ob.size()).unwrap();
        let mut wire = wire(&data, &ob, 1);
        // Block 1's wire offered as block 0.
        assert!(p.accept(0, &wire).is_err());
        let n = wire.len();
        wire[n - 100] ^= 0x40;
        assert!(matches!(
            p.accept(1, &wire),
            Err(ContentError::Verification(_))
        ));
        assert!(p.accept(1, &wire[..n / 2]).is_err());
        assert!(p.accept(9, &wire).is_err());
        assert_eq!(p.held(), 0);
        assert!(matches!(p.finish(), Err(ContentError::Incomplete)));
    }

    #[test]
    fn the_tree_is_allocated_as_blocks_fill_it() {
        let dir = tempfile::tempdir().unwrap();
        // The largest item allowed by default: a 1 GiB tree, none of it up front.
        let huge =
            Partial::create(&dir.path().join("huge"), ContentId([7; 32]), 256 << 30).unwrap();
        assert_eq!(huge.tree_in_memory(), 0);
        // 40 MiB: a 160 KiB tree over three pages; one block touches one.
        let data = item(40 << 20);
        let ob = Outboard::compute(&data);
        let p = Partial::create(&dir.path().join("x"), ob.id(), ob.size()).unwrap();
        p.accept(0, &wire(&data, &ob, 0)).unwrap();
        assert_eq!(p.tree_in_memory(), TREE_PAGE);
        for k in 1..p.blocks() {
            p.accept(k, &wire(&data, &ob, k)).unwrap();
        }
        assert_eq!(p.tree_in_memory(), ob.tree_bytes().len());
        let (_, tree) = p.finish().unwrap();
        assert_eq!(tree.tree_bytes(), ob.tree_bytes());
        // A held block still serves onwards from the sparse tree.
        let q = Partial::create(&dir.path().join("y"), ob.id(), ob.size()).unwrap();
        q.accept(77, &p.encode_block(77).unwrap()).unwrap();
    }

    /// A resumable download of `data` holding `blocks`, checkpointed and
    /// dropped as a dying node would leave it; returns its two paths.
    fn left_behind(dir: &Path, data: &[u8], ob: &Outboard, blocks: &[u64]) -> (PathBuf, PathBuf) {
        let (path, state) = (dir.join("x.data"), dir.join("x.state"));
        let p = Partial::create_resumable(&path, &state, ob.id(), ob.size()).unwrap();
        for k in blocks {
            p.accept(*k, &wire(data, ob, *k)).unwrap();
        }
        p.checkpoint().unwrap();
        // Held after the checkpoint: not named by it, so not resumed.
        p.accept(0, &wire(data, ob, 0)).unwrap();
        drop(p);
        assert!(path.exists() && state.exists());
        (path, state)
    }

    #[test]
    fn a_resumed_download_holds_what_its_checkpoint_names_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(2_000_000);
        let ob = Outboard::compute(&data);
        let (path, state) = left_behind(dir.path(), &data, &ob, &[1, 3, 7]);
        let p = Partial::resume(&path, &state, ob.id(), ob.size())
            .unwrap()
            .expect("resumable");
        assert!(p.resumable());
        assert_eq!(p.bitfield(), vec![0b1000_1010]);
        // A resumed block serves onwards.
        let q = Partial::create(&dir.path().join("q"), ob.id(), ob.size()).unwrap();
        q.accept(3, &p.encode_block(3).unwrap()).unwrap();
        for k in [0, 2, 4, 5, 6] {
            p.accept(k, &wire(&data, &ob, k)).unwrap();
        }
        let (at, tree) = p.finish().unwrap();
        assert_eq!(std::fs::read(at).unwrap(), data);
        assert_eq!(tree.tree_bytes(), ob.tree_bytes());
        p.committed();
        assert!(!state.exists() && !path.exists());
        // One still on its way when the commit came brings nothing back.
        p.checkpoint().unwrap();
        assert!(!state.exists());
    }

    #[test]
    fn blocks_altered_on_disk_are_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(2_000_000);
        let ob = Outboard::compute(&data);
        let (path, state) = left_behind(dir.path(), &data, &ob, &[1, 3, 7]);
        let f = File::options().write(true).open(&path).unwrap();
        f.write_all_at(b"x", block_range(ob.size(), 3).start + 1000)
            .unwrap();
        let p = Partial::resume(&path, &state, ob.id(), ob.size())
            .unwrap()
            .expect("resumable");
        assert_eq!(p.bitfield(), vec![0b1000_0010], "block 3 was altered");
    }

    #[test]
    fn a_checkpoint_that_does_not_check_resumes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(2_000_000);
        let ob = Outboard::compute(&data);
        let (path, state) = left_behind(dir.path(), &data, &ob, &[1, 3]);
        let saved = std::fs::read(&state).unwrap();
        let resume =
            |id: ContentId, size: u64| Partial::resume(&path, &state, id, size).unwrap().is_none();
        // Another item, another size.
        let other = Outboard::compute(&item(1_000));
        assert!(resume(other.id(), ob.size()));
        assert!(resume(ob.id(), ob.size() - 1));
        // A flipped byte, a torn (short) file.
        let mut flipped = saved.clone();
        flipped[60] ^= 1;
        std::fs::write(&state, &flipped).unwrap();
        assert!(resume(ob.id(), ob.size()));
        std::fs::write(&state, &saved[..saved.len() - 1]).unwrap();
        assert!(resume(ob.id(), ob.size()));
        // No checkpoint at all.
        std::fs::remove_file(&state).unwrap();
        assert!(resume(ob.id(), ob.size()));
    }

    #[test]
    fn a_forged_checkpoint_gains_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(2_000_000);
        let ob = Outboard::compute(&data);
        let (path, state) = left_behind(dir.path(), &data, &ob, &[1]);
        // Claims every block, with a trailer that checks: only block 1's
        // bytes and proof are there.
        let mut saved = std::fs::read(&state).unwrap();
        saved.truncate(saved.len() - 32);
        saved[56] = 0xff;
        let sum = blake3::hash(&saved);
        saved.extend_from_slice(sum.as_bytes());
        std::fs::write(&state, &saved).unwrap();
        let p = Partial::resume(&path, &state, ob.id(), ob.size())
            .unwrap()
            .expect("parses");
        assert_eq!(p.bitfield(), vec![0b0000_0010]);
    }

    #[test]
    fn one_download_at_a_time_holds_a_resumable_item() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(600_000);
        let ob = Outboard::compute(&data);
        let (path, state) = (dir.path().join("o.data"), dir.path().join("o.state"));
        let first = Partial::open_resumable(&path, &state, ob.id(), ob.size())
            .unwrap()
            .expect("free");
        first.accept(1, &wire(&data, &ob, 1)).unwrap();
        // A second download of the item neither resumes nor truncates it.
        assert!(
            Partial::open_resumable(&path, &state, ob.id(), ob.size())
                .unwrap()
                .is_none()
        );
        assert!(
            Partial::resume(&path, &state, ob.id(), ob.size())
                .unwrap()
                .is_none()
        );
        assert!(Partial::create_resumable(&path, &state, ob.id(), ob.size()).is_err());
        assert!(first.has(1));
        assert_eq!(first.encode_block(1).unwrap(), wire(&data, &ob, 1));
        first.checkpoint().unwrap();
        drop(first);
        let next = Partial::open_resumable(&path, &state, ob.id(), ob.size())
            .unwrap()
            .expect("free again");
        assert_eq!(next.bitfield(), vec![0b10]);
    }

    #[test]
    fn a_symbolic_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("l.data");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let ob = Outboard::compute(&item(1000));
        assert!(
            Partial::open_resumable(&link, &dir.path().join("l.state"), ob.id(), ob.size())
                .is_err()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn a_refused_download_and_a_plain_one_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = item(600_000);
        let ob = Outboard::compute(&data);
        let (path, state) = (dir.path().join("r.data"), dir.path().join("r.state"));
        let p = Partial::create_resumable(&path, &state, ob.id(), ob.size()).unwrap();
        p.accept(1, &wire(&data, &ob, 1)).unwrap();
        p.checkpoint().unwrap();
        p.discard();
        drop(p);
        assert!(!path.exists() && !state.exists());
        let plain = dir.path().join("plain");
        let p = Partial::create(&plain, ob.id(), ob.size()).unwrap();
        p.checkpoint().unwrap();
        drop(p);
        assert!(!plain.exists());
    }
}
