//! The write pipeline of one backup run, shared by directory and record sources.
//!
//! [`Session::start`] brings lagging targets up to date, loads snapshots and
//! the index, and starts the uploader task. Producers hand content to the
//! [`Saver`]: chunk (seeded FastCDC) → in parallel on all cores: keyed-BLAKE3
//! id → dedup against the loaded index and the blobs pending in this run →
//! zstd → seal → verify → one of several open packers (random choice) →
//! bounded channel → uploader, which writes each pack to every target
//! concurrently. [`Session::commit`] then writes the index object and the
//! snapshot, each only to targets that hold everything before it; a target
//! that failed is reported as lagging (exit 4). No lock is taken: object names
//! never collide, so concurrent backups into one repository both commit.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use fastcdc::v2020::{FastCDC, Normalization};
use futures::StreamExt;
use rand::Rng;
use rayon::prelude::*;
use tokio::sync::mpsc;

use crate::blob::{encode, encode_group, BlobType, EncodeSettings, EncodedBlob, Member};
use crate::chunker::ChunkerParams;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{FinishedPack, Packer};
use crate::repo::Repository;
use crate::snapshot::{CollectionCursor, Snapshot, SnapshotEntry, CURSOR_INLINE_MAX};
use crate::target::TargetRef;
use crate::tree::{write_tree, write_tree_raw, Node, RawNode};

/// Data packers open at once; blobs go to a random one so placement in packs
/// does not mirror source order (FORMAT.md, "Threat model").
const DATA_PACKERS: usize = 2;
/// Chunk bytes gathered from one stream before they are encoded in parallel.
const BATCH_BYTES: usize = 8 << 20;
/// Packs uploaded concurrently.
const UPLOAD_CONCURRENCY: usize = 3;
/// Content up to this size is read whole and chunked in memory.
const SMALL_CONTENT: u64 = 8 << 20;
/// Data blobs up to this size are sealed in groups (format 3; FORMAT.md,
/// "Groups"): an email or chat message compressed alone gives zstd no
/// history to match against, and each sealed blob pays its own nonce, tag,
/// frame and padding. 64 KiB is the chunker's minimum: whole small files and
/// records, and the tails of large ones.
const GROUP_MEMBER_MAX: usize = 64 << 10;
/// A group is sealed once its plaintext reaches this size: reading one
/// member reads and decompresses at most about this much.
const GROUP_TARGET: usize = 256 << 10;

/// Small data blobs gathered for the next group.
#[derive(Debug, Default)]
struct OpenGroup {
    plain: Vec<u8>,
    members: Vec<Member>,
}

/// Live counters for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    /// Record backups: partitions of the parent snapshot read so far (each
    /// is read only when a change touches it).
    pub partitions_loaded: AtomicU64,
    /// Record backups: partitions parked in the scratch file because the
    /// working state went over its memory budget (counted per collection
    /// when it is written).
    pub partitions_parked: AtomicU64,
}

/// Blob counters of one run.
#[derive(Debug, Default)]
pub struct Counters {
    pub data_blobs: AtomicU64,
    pub tree_blobs: AtomicU64,
    pub bytes_added: AtomicU64,
    pub bytes_stored: AtomicU64,
}

/// Why content could not be saved.
#[derive(Debug)]
pub enum ReadError {
    /// The source failed (unreadable file, broken stream): skip the item, report it.
    Source(String),
    /// The repository side failed: abort the run.
    Repo(Error),
}

/// Content saved as blobs.
#[derive(Debug, Clone)]
pub struct SavedContent {
    pub blobs: Vec<Id>,
    /// Keyed BLAKE3 of the whole content.
    pub digest: Id,
    pub size: u64,
}

/// Plaintext bytes of new trees kept in memory; beyond this the sealed copies
/// go to a temporary file (a million-record collection writes ~800 MB of
/// tree JSON, which must not stay resident until the commit).
const TREE_STASH_MEMORY: usize = 8 << 20;

/// The tree blobs a run wrote, for the commit-time walk. The first
/// [`TREE_STASH_MEMORY`] bytes stay in memory as plaintext; later trees are
/// kept only as their sealed (encrypted, authenticated) bytes in an anonymous
/// temporary file, read back and opened when the walk needs them. If no
/// temporary file can be made, trees stay in memory (slower to fail than to
/// lose a backup over a full /tmp).
struct TreeStash {
    budget: usize,
    mem: std::collections::HashMap<Id, Vec<u8>>,
    mem_bytes: usize,
    file: Option<std::fs::File>,
    file_failed: bool,
    /// id → (offset, length) of its sealed bytes in `file`.
    spilled: std::collections::HashMap<Id, (u64, u32)>,
    file_len: u64,
}

impl Default for TreeStash {
    fn default() -> Self {
        TreeStash::with_budget(TREE_STASH_MEMORY)
    }
}

impl TreeStash {
    fn with_budget(budget: usize) -> Self {
        TreeStash {
            budget,
            mem: Default::default(),
            mem_bytes: 0,
            file: None,
            file_failed: false,
            spilled: Default::default(),
            file_len: 0,
        }
    }

    fn put(&mut self, id: Id, plain: &[u8], sealed: &[u8]) {
        if self.mem_bytes + plain.len() > self.budget && self.spill(id, sealed) {
            return;
        }
        self.mem_bytes += plain.len();
        self.mem.insert(id, plain.to_vec());
    }

    /// Append `sealed` to the temporary file; false if that is impossible.
    fn spill(&mut self, id: Id, sealed: &[u8]) -> bool {
        use std::os::unix::fs::FileExt;
        if self.file_failed {
            return false;
        }
        if self.file.is_none() {
            match tempfile::tempfile() {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::warn!(error = %e, "no temporary file for new trees: keeping them in memory");
                    self.file_failed = true;
                }
            }
        }
        let Some(f) = &self.file else { return false };
        if let Err(e) = f.write_all_at(sealed, self.file_len) {
            // Trees spilled before stay readable; later ones stay in memory.
            tracing::warn!(error = %e, "temporary file for new trees failed: keeping them in memory");
            self.file_failed = true;
            return false;
        }
        self.spilled
            .insert(id, (self.file_len, sealed.len() as u32));
        self.file_len += sealed.len() as u64;
        true
    }

    /// The plaintext of a tree written in this run, if it was.
    fn get(&self, keys: &Keys, id: &Id) -> Option<Result<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        if let Some(p) = self.mem.get(id) {
            return Some(Ok(p.clone()));
        }
        let &(offset, len) = self.spilled.get(id)?;
        let f = self.file.as_ref()?;
        let mut sealed = vec![0; len as usize];
        Some(
            f.read_exact_at(&mut sealed, offset)
                .map_err(|e| {
                    Error::Failed(format!(
                        "reading back new tree {id} from a temporary file: {e}"
                    ))
                })
                .and_then(|()| crate::blob::decode(keys, BlobType::Tree, id, &sealed)),
        )
    }
}

/// Deduplicates, encodes and packs blobs; shared by all producer threads.
pub struct Saver {
    keys: Arc<Keys>,
    settings: EncodeSettings,
    chunker: ChunkerParams,
    known: Arc<Index>,
    pending: Mutex<HashSet<Id>>,
    data_packers: Vec<Mutex<Packer>>,
    tree_packer: Mutex<Packer>,
    /// Group small data blobs (format 3 repositories).
    grouping: bool,
    group: Mutex<OpenGroup>,
    /// Taken (closed) by [`Session::commit`], whoever still holds the saver.
    tx: Mutex<Option<mpsc::Sender<FinishedPack>>>,
    aborted: Arc<AtomicBool>,
    /// The uploader's state, for the reason it aborted.
    upload_state: Arc<Mutex<UploadState>>,
    counters: Counters,
    progress: Arc<Progress>,
    /// Tree blobs written in this run, so the new snapshot can be walked
    /// before its packs are indexed (the commit-time mark check).
    new_trees: Mutex<TreeStash>,
    /// Blobs to store again even though the loaded index has them (prune:
    /// repacking, and blobs whose only copy is in a pack marked for deletion).
    not_known: Mutex<HashSet<Id>>,
}

impl std::fmt::Debug for Saver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Saver").finish_non_exhaustive()
    }
}

impl Saver {
    /// The working keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The index loaded at the start of the run.
    pub fn known(&self) -> &Index {
        &self.known
    }

    /// Store one blob (deduplicated); blocking: call from a blocking thread.
    pub fn save(&self, ty: BlobType, data: &[u8]) -> Result<Id> {
        self.save_blob(ty, data, ty == BlobType::Tree)
    }

    /// [`Saver::save`]; `walkable`: a tree blob the commit may walk (kept
    /// in memory until then), not a cursor blob.
    fn save_blob(&self, ty: BlobType, data: &[u8], walkable: bool) -> Result<Id> {
        let id = self.keys.blob_id(data);
        let known = self.known.contains(&id)
            && !self.not_known.lock().expect("not_known lock").contains(&id);
        if known || !self.pending.lock().expect("pending lock").insert(id) {
            return Ok(id);
        }
        if self.grouping && ty == BlobType::Data && data.len() <= GROUP_MEMBER_MAX {
            self.add_to_group(id, data)?;
            return Ok(id);
        }
        let enc = encode(&self.keys, self.settings, ty, id, data)?;
        if walkable {
            self.new_trees
                .lock()
                .expect("trees lock")
                .put(id, data, &enc.sealed);
        }
        self.counters
            .bytes_added
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.pack(enc)?;
        Ok(id)
    }

    /// Append a small data blob to the open group; seal the group once it
    /// is full (outside the lock: other threads keep adding to the next).
    fn add_to_group(&self, id: Id, data: &[u8]) -> Result<()> {
        self.counters
            .bytes_added
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let full = {
            let mut g = self.group.lock().expect("group lock");
            if g.plain.capacity() == 0 {
                // Once per group, not a doubling per few members.
                g.plain.reserve(GROUP_TARGET + GROUP_MEMBER_MAX);
            }
            let inner = g.plain.len() as u32;
            g.members.push(Member {
                id,
                inner,
                len: data.len() as u32,
            });
            g.plain.extend_from_slice(data);
            (g.plain.len() >= GROUP_TARGET).then(|| std::mem::take(&mut *g))
        };
        match full {
            Some(g) => self.seal_group(g),
            None => Ok(()),
        }
    }

    /// Encode a group and pack it.
    fn seal_group(&self, g: OpenGroup) -> Result<()> {
        if g.members.is_empty() {
            return Ok(());
        }
        let enc = encode_group(&self.keys, self.settings, g.members, &g.plain)?;
        self.pack(enc)
    }

    /// Count an encoded blob (a group: its members) and add it to a packer
    /// of its type (data blobs spread at random over the open data packs);
    /// send a pack that filled.
    fn pack(&self, enc: EncodedBlob) -> Result<()> {
        let blobs = match enc.ty {
            BlobType::Data => &self.counters.data_blobs,
            BlobType::Tree => &self.counters.tree_blobs,
        };
        blobs.fetch_add(enc.members.len().max(1) as u64, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(enc.sealed.len() as u64, Ordering::Relaxed);
        let finished = match enc.ty {
            BlobType::Data => {
                let pick = rand::thread_rng().gen_range(0..self.data_packers.len());
                self.data_packers[pick]
                    .lock()
                    .expect("packer lock")
                    .add(&self.keys, enc)
            }
            BlobType::Tree => self
                .tree_packer
                .lock()
                .expect("packer lock")
                .add(&self.keys, enc),
        };
        if let Some(pack) = finished {
            self.send(pack)?;
        }
        Ok(())
    }

    /// Store a sealed content blob (or group) again as it is (a backup key
    /// cannot decrypt it to re-seal it): `raw_len` and a group's `members`
    /// come from the index and the pack header. A group is copied when any
    /// of its members is not pending yet.
    pub fn save_sealed(
        &self,
        id: Id,
        raw_len: u32,
        sealed: Vec<u8>,
        members: Vec<Member>,
    ) -> Result<()> {
        {
            let mut pending = self.pending.lock().expect("pending lock");
            let new = if members.is_empty() {
                pending.insert(id)
            } else {
                members
                    .iter()
                    .fold(false, |new, m| pending.insert(m.id) | new)
            };
            if !new {
                return Ok(());
            }
        }
        self.pack(EncodedBlob {
            ty: BlobType::Data,
            id,
            raw_len,
            sealed,
            members,
        })
    }

    /// Store these blobs again even though the loaded index has them.
    pub fn forget_known(&self, ids: impl IntoIterator<Item = Id>) {
        self.not_known.lock().expect("not_known lock").extend(ids);
    }

    /// Serialize and store a tree (split when large); returns the top blob id.
    pub fn save_tree(&self, nodes: Vec<Node>) -> Result<Id> {
        write_tree(&self.keys, nodes, &|bytes| {
            self.save(BlobType::Tree, &bytes)
        })
    }

    /// [`Saver::save_tree`] of nodes held serialized (sorted by name in place).
    pub fn save_tree_raw(&self, nodes: &mut [RawNode]) -> Result<Id> {
        write_tree_raw(&self.keys, nodes, &|bytes| {
            self.save(BlobType::Tree, &bytes)
        })
    }

    /// Chunk and store content from `reader` (`len_hint`: expected size).
    pub fn save_content(
        &self,
        mut reader: impl Read,
        len_hint: Option<u64>,
    ) -> std::result::Result<SavedContent, ReadError> {
        let mut hasher = self.keys.digest_hasher();
        let seed = self.keys.chunker_seed();
        let p = self.chunker;
        if len_hint.is_some_and(|l| l <= SMALL_CONTENT) {
            let mut buf = Vec::with_capacity(len_hint.unwrap_or(0) as usize);
            reader
                .read_to_end(&mut buf)
                .map_err(|e| ReadError::Source(e.to_string()))?;
            return self.save_bytes(&buf).map_err(ReadError::Repo);
        }
        let mut blobs = Vec::new();
        let mut size = 0u64;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0usize;
        for chunk in p.stream(reader, seed) {
            let chunk = chunk.map_err(|e| ReadError::Source(e.to_string()))?;
            hasher.update(&chunk.data);
            size += chunk.length as u64;
            batch_bytes += chunk.length;
            self.progress
                .bytes
                .fetch_add(chunk.length as u64, Ordering::Relaxed);
            batch.push(chunk.data);
            if batch_bytes >= BATCH_BYTES {
                blobs.extend(self.save_batch(batch.iter().map(|d| d.as_slice()).collect())?);
                batch.clear();
                batch_bytes = 0;
            }
        }
        blobs.extend(self.save_batch(batch.iter().map(|d| d.as_slice()).collect())?);
        Ok(SavedContent {
            blobs,
            digest: Id(*hasher.finalize().as_bytes()),
            size,
        })
    }

    /// Content-defined cuts (offset, length) of `buf`.
    fn cuts(&self, buf: &[u8]) -> Vec<(usize, usize)> {
        let p = self.chunker;
        if buf.is_empty() {
            Vec::new()
        } else if buf.len() <= p.min_size as usize {
            vec![(0, buf.len())]
        } else {
            FastCDC::with_level_and_seed(
                buf,
                p.min_size as usize,
                p.avg_size as usize,
                p.max_size as usize,
                Normalization::Level1,
                self.keys.chunker_seed(),
            )
            .map(|c| (c.offset, c.length))
            .collect()
        }
    }

    /// Store a collection cursor for a snapshot (blocking): inline when its
    /// JSON is at most [`CURSOR_INLINE_MAX`] bytes, else cut like content
    /// (an appended-to cursor shares most chunks with its predecessor) into
    /// tree blobs, which a backup key can read back (FORMAT.md, "Snapshot
    /// documents"). A cursor already in blobs is returned as it is.
    pub fn save_cursor(&self, mut c: CollectionCursor) -> Result<CollectionCursor> {
        if !c.cursor_blobs.is_empty() {
            return Ok(c);
        }
        let json = serde_json::to_vec(&c.cursor)
            .map_err(|e| Error::Failed(format!("serializing a cursor: {e}")))?;
        if json.len() <= CURSOR_INLINE_MAX {
            return Ok(c);
        }
        c.cursor_blobs = self
            .cuts(&json)
            .into_iter()
            .map(|(o, l)| self.save_blob(BlobType::Tree, &json[o..o + l], false))
            .collect::<Result<Vec<Id>>>()?;
        c.cursor = serde_json::Value::Null;
        Ok(c)
    }

    /// Chunk and store content held in memory.
    pub fn save_bytes(&self, buf: &[u8]) -> Result<SavedContent> {
        let digest = Id(*self.keys.digest_hasher().update(buf).finalize().as_bytes());
        let cuts = self.cuts(buf);
        self.progress
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let blobs = self
            .save_batch(cuts.iter().map(|&(o, l)| &buf[o..o + l]).collect())
            .map_err(|e| match e {
                ReadError::Repo(e) => e,
                ReadError::Source(s) => Error::Failed(s),
            })?;
        Ok(SavedContent {
            blobs,
            digest,
            size: buf.len() as u64,
        })
    }

    fn save_batch(&self, chunks: Vec<&[u8]>) -> std::result::Result<Vec<Id>, ReadError> {
        if chunks.len() == 1 {
            return self
                .save(BlobType::Data, chunks[0])
                .map(|id| vec![id])
                .map_err(ReadError::Repo);
        }
        chunks
            .par_iter()
            .map(|d| self.save(BlobType::Data, d))
            .collect::<Result<Vec<Id>>>()
            .map_err(ReadError::Repo)
    }

    fn send(&self, pack: FinishedPack) -> Result<()> {
        let tx = self.tx.lock().expect("tx lock").clone();
        match tx {
            Some(tx) if !self.aborted.load(Ordering::Relaxed) && tx.blocking_send(pack).is_ok() => {
                Ok(())
            }
            _ => Err(Error::Failed(format!(
                "backup aborted: {}",
                self.upload_state
                    .lock()
                    .expect("upload state")
                    .fatal
                    .as_deref()
                    .unwrap_or("packs could not be stored on any target")
            ))),
        }
    }

    /// Finish the open group and all open packs and close the channel to
    /// the uploader.
    fn flush_and_close(&self) -> Result<()> {
        let open = std::mem::take(&mut *self.group.lock().expect("group lock"));
        self.seal_group(open)?;
        for p in self
            .data_packers
            .iter()
            .chain(std::iter::once(&self.tree_packer))
        {
            let finished = p.lock().expect("packer lock").finish(&self.keys);
            if let Some(pack) = finished {
                self.send(pack)?;
            }
        }
        self.tx.lock().expect("tx lock").take();
        Ok(())
    }
}

#[derive(Default)]
struct UploadState {
    failed: Vec<Option<String>>,
    packs: Vec<IndexPack>,
    fatal: Option<String>,
}

/// This run's wrapped data key (format 2): stored on every target before the
/// first data pack sealed with it, so no target ever holds content whose key
/// it lacks.
struct DataKeyUpload {
    name: String,
    bytes: Bytes,
    stored: tokio::sync::OnceCell<()>,
}

impl DataKeyUpload {
    async fn ensure(&self, targets: &[TargetRef], state: &Mutex<UploadState>) {
        self.stored
            .get_or_init(|| async {
                let alive: Vec<usize> = {
                    let s = state.lock().expect("upload state");
                    (0..targets.len()).filter(|i| s.failed[*i].is_none()).collect()
                };
                let results = futures::future::join_all(
                    alive
                        .iter()
                        .map(|&i| targets[i].put_new(&self.name, self.bytes.clone())),
                )
                .await;
                let mut s = state.lock().expect("upload state");
                for (&i, r) in alive.iter().zip(results) {
                    if let Err(e) = r {
                        tracing::warn!(target = targets[i].name(), object = %self.name, error = %e, "target failed; it will lag");
                        s.failed[i] = Some(e.to_string());
                    }
                }
            })
            .await;
    }
}

async fn upload_one(
    pack: FinishedPack,
    targets: &[TargetRef],
    state: &Mutex<UploadState>,
    aborted: &AtomicBool,
    progress: &Progress,
    data_key: Option<&DataKeyUpload>,
) {
    if let (BlobType::Data, Some(k)) = (pack.ty, data_key) {
        k.ensure(targets, state).await;
    }
    let alive: Vec<usize> = {
        let s = state.lock().expect("upload state");
        (0..targets.len())
            .filter(|i| s.failed[*i].is_none())
            .collect()
    };
    let name = pack.object_name();
    let indexed = IndexPack::from_finished(&pack);
    let size = pack.bytes.len() as u64;
    // Only the puts hold the buffer: it goes back to the pool when the last
    // of them lets go (a local put once written, before its fsync), not when
    // the slowest target has answered.
    let FinishedPack { bytes, .. } = pack;
    let puts: Vec<_> = alive
        .iter()
        .map(|&i| targets[i].put_new(&name, bytes.clone()))
        .collect();
    drop(bytes);
    let results = futures::future::join_all(puts).await;
    let mut s = state.lock().expect("upload state");
    let mut any_ok = false;
    for (&i, r) in alive.iter().zip(results) {
        match r {
            Ok(_) => any_ok = true,
            Err(e) => {
                tracing::warn!(target = targets[i].name(), pack = %name, error = %e, "target failed; it will lag");
                s.failed[i] = Some(e.to_string());
            }
        }
    }
    if any_ok {
        progress.bytes_uploaded.fetch_add(size, Ordering::Relaxed);
        s.packs.push(indexed);
    } else {
        // Name why: each target's error (the first one that made it lag).
        let why: Vec<String> = targets
            .iter()
            .zip(&s.failed)
            .filter_map(|(t, e)| e.as_ref().map(|e| format!("{}: {e}", t.name())))
            .collect();
        s.fatal.get_or_insert(format!(
            "pack {name} could not be stored on any target ({})",
            why.join("; ")
        ));
        aborted.store(true, Ordering::Relaxed);
    }
}

/// What a committed run produced.
#[derive(Debug)]
pub struct Committed {
    pub id: Id,
    pub snapshot: Snapshot,
    /// Targets holding the new snapshot.
    pub committed: Vec<String>,
    /// Targets that failed, with the first error each hit.
    pub lagging: Vec<(String, String)>,
}

/// One backup run's writer.
pub struct Session {
    repo: Repository,
    index: Arc<Index>,
    index_ids: Vec<Id>,
    snapshots: Vec<SnapshotEntry>,
    warnings: Vec<String>,
    saver: Arc<Saver>,
    uploader: Option<tokio::task::JoinHandle<()>>,
    state: Arc<Mutex<UploadState>>,
    started: Instant,
    finished: Option<Finished>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// Sync lagging targets, load snapshots and index, start the uploader.
    pub async fn start(repo: &Repository, progress: Arc<Progress>) -> Result<Session> {
        let started = Instant::now();
        // Bring lagging targets up to date first (the next run repairs what the last one missed).
        let mut repo = repo.clone();
        let synced = crate::sync::sync(&repo, true).await?;
        for (t, e) in &synced.failed {
            repo.mark_unreachable(t, format!("could not be brought up to date: {e}"));
        }
        // Snapshots before the index: a concurrent backup writes its index first,
        // so every snapshot seen here has its index objects in the listing below.
        let (snapshots, mut warnings) = repo.snapshots().await?;
        let (index, index_warnings, index_ids) = repo.load_index_with_ids().await?;
        warnings.extend(index_warnings);
        let index = Arc::new(index);

        let targets: Vec<TargetRef> = repo.targets().to_vec();
        let (tx, mut rx) = mpsc::channel::<FinishedPack>(1);
        let state = Arc::new(Mutex::new(UploadState {
            failed: vec![None; targets.len()],
            ..Default::default()
        }));
        let aborted = Arc::new(AtomicBool::new(false));
        // A fresh data key for this run's content (format 2).
        let keys = Arc::new(repo.keys().with_new_session());
        let data_key = keys.session().map(|s| DataKeyUpload {
            name: s.object_name(),
            bytes: Bytes::copy_from_slice(s.wrapped()),
            stored: tokio::sync::OnceCell::new(),
        });
        let uploader = {
            let (state, aborted, progress) = (state.clone(), aborted.clone(), progress.clone());
            tokio::spawn(async move {
                let packs = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
                let data_key = data_key.as_ref();
                packs
                    .for_each_concurrent(UPLOAD_CONCURRENCY, |p| {
                        upload_one(p, &targets, &state, &aborted, &progress, data_key)
                    })
                    .await;
            })
        };
        let pack_size = repo.config().pack_size as usize;
        let pool = crate::pack::BufPool::default();
        let saver = Arc::new(Saver {
            keys,
            settings: repo.encode_settings(),
            chunker: repo.config().chunker,
            known: index.clone(),
            pending: Mutex::default(),
            data_packers: (0..DATA_PACKERS)
                .map(|_| Mutex::new(Packer::with_pool(BlobType::Data, pack_size, pool.clone())))
                .collect(),
            tree_packer: Mutex::new(Packer::with_pool(BlobType::Tree, pack_size, pool)),
            grouping: repo.config().version >= 3,
            group: Mutex::default(),
            tx: Mutex::new(Some(tx)),
            aborted,
            upload_state: state.clone(),
            counters: Counters::default(),
            progress,
            new_trees: Mutex::default(),
            not_known: Mutex::default(),
        });
        Ok(Session {
            repo,
            index,
            index_ids,
            snapshots,
            warnings,
            saver,
            uploader: Some(uploader),
            state,
            started,
            finished: None,
        })
    }

    /// The repository as this run sees it (lagging targets left out).
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The index loaded at start.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Snapshots present at start.
    pub fn snapshots(&self) -> &[SnapshotEntry] {
        &self.snapshots
    }

    /// Problems with existing metadata met while loading.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The saver producers store content through.
    pub fn saver(&self) -> Arc<Saver> {
        self.saver.clone()
    }

    /// Stop the uploader without committing (the run failed).
    pub async fn abandon(mut self) {
        self.saver.tx.lock().expect("tx lock").take();
        if let Some(up) = self.uploader.take() {
            let _ = up.await;
        }
    }

    /// Flush packs, then write the index and `snapshot` (its blob counters and
    /// duration filled in here) to every target that holds everything before.
    pub async fn commit(mut self, mut snapshot: Snapshot) -> Result<Committed> {
        // Never commit a reference into a pack prune has marked for deletion:
        // store such blobs again (FORMAT.md, "Prune").
        let cursor_blobs: Vec<Id> = snapshot.cursor_blobs().collect();
        self.rescue_marked(snapshot.tree, &cursor_blobs).await?;
        self.finish(Some(snapshot.tree)).await?;
        let Finished {
            healthy,
            mut lagging,
            ..
        } = self.finished.take().expect("finished");
        let c = &self.saver.counters;
        let s = &mut snapshot.summary;
        s.data_blobs_added = c.data_blobs.load(Ordering::Relaxed);
        s.tree_blobs_added = c.tree_blobs.load(Ordering::Relaxed);
        s.bytes_added = c.bytes_added.load(Ordering::Relaxed);
        s.bytes_stored = c.bytes_stored.load(Ordering::Relaxed);
        s.duration_seconds = self.started.elapsed().as_secs_f64();
        // Seal once: the id is the hash of exactly these bytes on every target.
        let (id, bytes) =
            crate::object::seal_object(self.repo.keys(), ObjectKind::Snapshot, &snapshot);
        let results = self
            .repo
            .put_to(&healthy, &ObjectKind::Snapshot.name(&id), &bytes)
            .await;
        let committed = keep_ok(healthy, results, &mut lagging);
        if committed.is_empty() {
            return Err(Error::Failed(format!(
                "snapshot could not be committed on any target: {}",
                lagging
                    .iter()
                    .map(|(t, e)| format!("{t}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Ok(Committed {
            id,
            snapshot,
            committed: committed.iter().map(|t| t.name().to_string()).collect(),
            lagging,
        })
    }

    /// Blobs reachable from `root`, and the snapshot's `cursor_blobs`, whose
    /// only indexed copies are in packs marked for deletion are stored again
    /// in this run.
    async fn rescue_marked(&self, root: Id, cursor_blobs: &[Id]) -> Result<()> {
        let doomed = crate::prune::marked_packs(&self.repo).await?;
        if doomed.is_empty() {
            return Ok(());
        }
        let mut stack = vec![root];
        let mut seen: HashSet<Id> = HashSet::new();
        let mut rescue: Vec<(BlobType, Id)> = Vec::new();
        let in_doomed = |id: &Id| self.index.get(id).is_some_and(|l| doomed.contains(&l.pack));
        {
            let pending = self.saver.pending.lock().expect("pending lock");
            for c in cursor_blobs {
                if in_doomed(c) && !pending.contains(c) && seen.insert(*c) {
                    rescue.push((BlobType::Tree, *c));
                }
            }
        }
        while let Some(t) = stack.pop() {
            if !seen.insert(t) {
                continue;
            }
            if in_doomed(&t)
                && !self
                    .saver
                    .pending
                    .lock()
                    .expect("pending lock")
                    .contains(&t)
            {
                rescue.push((BlobType::Tree, t));
            }
            let cached = self
                .saver
                .new_trees
                .lock()
                .expect("trees lock")
                .get(&self.saver.keys, &t);
            let plain = match cached {
                Some(p) => p?,
                None => self.repo.read_blob(&self.index, BlobType::Tree, &t).await?,
            };
            let nodes = match crate::tree::parse_tree(&t, &plain)? {
                crate::tree::TreeDoc::Leaf { nodes } => nodes,
                crate::tree::TreeDoc::Split { parts } => {
                    stack.extend(parts.iter().map(|p| p.tree));
                    continue;
                }
            };
            for n in nodes {
                for b in &n.content {
                    if in_doomed(b) && seen.insert(*b) {
                        rescue.push((BlobType::Data, *b));
                    }
                }
                stack.extend(n.subtree);
            }
        }
        if rescue.is_empty() {
            return Ok(());
        }
        tracing::info!(
            blobs = rescue.len(),
            "storing again blobs whose packs prune marked for deletion"
        );
        self.saver.forget_known(rescue.iter().map(|(_, id)| *id));
        let raw_copy = !self.repo.role().reads_content();
        let mut groups_copied: HashSet<Id> = HashSet::new();
        for (ty, id) in rescue {
            if raw_copy && ty == BlobType::Data {
                // A backup key cannot open content: copy the sealed bytes
                // (a grouped blob: its whole group, as it is).
                let loc = self.index.get(&id).ok_or_else(|| Error::BlobMissing {
                    id: id.to_hex(),
                    needed_by: "rescue".into(),
                })?;
                if loc.group.is_some_and(|g| !groups_copied.insert(g.id)) {
                    continue;
                }
                let members = self.repo.group_members(&self.index, &loc).await?;
                let (unit, raw_len) = match loc.group {
                    Some(g) => (g.id, members.iter().map(|m| m.len).sum()),
                    None => (id, loc.raw_length),
                };
                let start = u64::from(loc.offset);
                let sealed = self
                    .repo
                    .read_range(&loc.pack_name(), start..start + u64::from(loc.length))
                    .await?;
                let saver = self.saver.clone();
                tokio::task::spawn_blocking(move || {
                    saver.save_sealed(unit, raw_len, sealed.to_vec(), members)
                })
                .await
                .map_err(|e| Error::Failed(format!("save task panicked: {e}")))??;
                continue;
            }
            let data = self.repo.read_blob(&self.index, ty, &id).await?;
            let saver = self.saver.clone();
            tokio::task::spawn_blocking(move || saver.save(ty, &data))
                .await
                .map_err(|e| Error::Failed(format!("save task panicked: {e}")))??;
        }
        Ok(())
    }

    /// Flush packs, await the uploads, and write the index object to every
    /// target that holds everything this run relies on. Used by `commit` and
    /// by prune (which writes no snapshot).
    pub async fn finish(&mut self, _root: Option<Id>) -> Result<()> {
        let saver = self.saver.clone();
        let flushed = tokio::task::spawn_blocking(move || saver.flush_and_close())
            .await
            .map_err(|e| Error::Failed(format!("flush task panicked: {e}")))?;
        if let Some(up) = self.uploader.take() {
            up.await
                .map_err(|e| Error::Failed(format!("upload task panicked: {e}")))?;
        }
        let state = std::mem::take(&mut *self.state.lock().expect("upload state"));
        if let Some(fatal) = state.fatal {
            return Err(Error::Failed(fatal));
        }
        flushed?;

        let targets = self.repo.targets().to_vec();
        let healthy: Vec<TargetRef> = targets
            .iter()
            .zip(&state.failed)
            .filter(|(_, f)| f.is_none())
            .map(|(t, _)| t.clone())
            .collect();
        let mut lagging: Vec<(String, String)> = targets
            .iter()
            .zip(&state.failed)
            .filter_map(|(t, f)| f.as_ref().map(|e| (t.name().to_string(), e.clone())))
            .chain(self.repo.unreachable().iter().cloned())
            .collect();
        // Dedup trusted every index object loaded at start: a target may commit
        // only if it holds them all (else some referenced packs may be missing there).
        let healthy = holding_all(healthy, &self.index_ids, &mut lagging).await;

        // packs → index → snapshot, each only on targets that hold everything before it.
        let new_packs = state.packs.clone();
        let mut healthy = healthy;
        let mut index_ids = Vec::new();
        // Serialized and sealed on all cores: the last step before the
        // snapshot, when nothing else runs (~20 ms per 32 768 blobs).
        let files = index_files(state.packs);
        let keys = self.repo.keys().clone();
        let sealed = tokio::task::spawn_blocking(move || {
            files
                .par_iter()
                .map(|f| crate::object::seal_object(&keys, ObjectKind::Index, f))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Error::Failed(format!("index sealing task panicked: {e}")))?;
        for (id, bytes) in sealed {
            let results = self
                .repo
                .put_to(&healthy, &ObjectKind::Index.name(&id), &bytes)
                .await;
            healthy = keep_ok(healthy, results, &mut lagging);
            index_ids.push(id);
        }
        self.finished = Some(Finished {
            healthy,
            lagging,
            index_ids,
            new_packs,
        });
        Ok(())
    }

    /// After [`Session::finish`]: (targets that hold everything, lagging targets,
    /// the new index objects, the packs they list).
    pub fn finished(&self) -> Option<&Finished> {
        self.finished.as_ref()
    }
}

/// What [`Session::finish`] wrote.
#[derive(Debug)]
pub struct Finished {
    pub healthy: Vec<TargetRef>,
    pub lagging: Vec<(String, String)>,
    /// The index objects written (several when the run stored many blobs).
    pub index_ids: Vec<Id>,
    pub new_packs: Vec<IndexPack>,
}

/// Blobs per index object at most (a pack is never split): readers load
/// index objects whole, so a run that stores a million small records writes
/// ~30 index objects of ~4 MiB of JSON instead of one of ~130 MiB.
const INDEX_FILE_BLOBS: usize = 32_768;

/// The index documents describing `packs`, each listing at most
/// [`INDEX_FILE_BLOBS`] blobs (or a single pack holding more), in as few
/// files as that allows, filled about evenly so they seal in parallel.
fn index_files(packs: Vec<IndexPack>) -> Vec<IndexFile> {
    let total: usize = packs.iter().map(|p| p.blobs.len()).sum();
    let even = total.div_ceil(total.div_ceil(INDEX_FILE_BLOBS).max(1));
    let mut files = Vec::new();
    let mut current = IndexFile::default();
    let mut blobs = 0;
    for p in packs {
        if blobs > 0 && (blobs >= even || blobs + p.blobs.len() > INDEX_FILE_BLOBS) {
            files.push(std::mem::take(&mut current));
            blobs = 0;
        }
        blobs += p.blobs.len();
        current.packs.push(p);
    }
    if !current.packs.is_empty() {
        files.push(current);
    }
    files
}

/// Keep the targets whose write succeeded; the others lag.
fn keep_ok(
    targets: Vec<TargetRef>,
    results: Vec<Result<crate::target::PutOutcome>>,
    lagging: &mut Vec<(String, String)>,
) -> Vec<TargetRef> {
    let mut ok = Vec::new();
    for (t, r) in targets.into_iter().zip(results) {
        match r {
            Ok(_) => ok.push(t),
            Err(e) => lagging.push((t.name().to_string(), e.to_string())),
        }
    }
    ok
}

/// Keep the targets that list every index object that was loaded at start
/// and that some target still holds (prune may have retired some meanwhile);
/// the others lag.
async fn holding_all(
    targets: Vec<TargetRef>,
    ids: &[Id],
    lagging: &mut Vec<(String, String)>,
) -> Vec<TargetRef> {
    let mut listed: Vec<(TargetRef, HashSet<Id>)> = Vec::new();
    for t in targets {
        match t.list("index/").await {
            Ok(list) => {
                let have = list
                    .iter()
                    .filter_map(|m| m.name.rsplit('/').next().and_then(Id::from_hex))
                    .collect();
                listed.push((t, have));
            }
            Err(e) => lagging.push((t.name().to_string(), e.to_string())),
        }
    }
    let still_held: HashSet<Id> = ids
        .iter()
        .filter(|id| listed.iter().any(|(_, have)| have.contains(id)))
        .copied()
        .collect();
    let mut ok = Vec::new();
    for (t, have) in listed {
        let missing = still_held.iter().filter(|id| !have.contains(id)).count();
        if missing == 0 {
            ok.push(t);
        } else {
            lagging.push((
                t.name().to_string(),
                format!("lacks {missing} index object(s) held by other targets; run `custos sync`"),
            ));
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    #[test]
    fn index_files_are_bounded_and_keep_every_pack_once() {
        let pack = |n: u32, blobs: usize| IndexPack {
            id: Id::of_object(&n.to_le_bytes()),
            ty: BlobType::Data,
            size: 1,
            blobs: (0..blobs)
                .map(|b| crate::index::IndexBlob {
                    id: Id::of_object(&[n.to_le_bytes(), (b as u32).to_le_bytes()].concat()),
                    offset: b as u32,
                    length: 1,
                    raw_length: 1,
                    group: None,
                })
                .collect(),
        };
        assert!(index_files(Vec::new()).is_empty());
        let packs: Vec<IndexPack> = (0..10)
            .map(|n| pack(n, 10_000))
            .chain([pack(99, 40_000)])
            .collect();
        let files = index_files(packs.clone());
        assert_eq!(
            files.len(),
            5,
            "3+3+3+1 packs of 10 000, then the 40 000 alone"
        );
        for f in &files {
            let blobs: usize = f.packs.iter().map(|p| p.blobs.len()).sum();
            assert!(blobs <= INDEX_FILE_BLOBS || f.packs.len() == 1, "{blobs}");
        }
        let back: Vec<IndexPack> = files.into_iter().flat_map(|f| f.packs).collect();
        assert_eq!(back, packs);
        // Just over one file's worth: two files of about half each, not a
        // full one and a small rest (they are sealed in parallel).
        let packs: Vec<IndexPack> = (0..40).map(|n| pack(n, 850)).collect();
        let sizes: Vec<usize> = index_files(packs)
            .iter()
            .map(|f| f.packs.iter().map(|p| p.blobs.len()).sum())
            .collect();
        assert_eq!(sizes, vec![17_000, 17_000]);
        let sizes: Vec<usize> = index_files((0..3).map(|n| pack(n, 850)).collect())
            .iter()
            .map(|f| f.packs.len())
            .collect();
        assert_eq!(sizes, vec![3], "a small run writes one index file");
    }

    #[test]
    fn tree_stash_spills_past_its_budget_and_reads_every_tree_back() {
        let keys = Keys::derive(&MasterKey::generate()).with_new_session();
        let settings = EncodeSettings {
            zstd_level: 3,
            padding: true,
        };
        let mut stash = TreeStash::with_budget(10_000);
        let trees: Vec<(Id, Vec<u8>)> = (0..40u32)
            .map(|i| {
                let plain =
                    format!("{{\"nodes\":[{}]}}", "1,".repeat(1000 + i as usize)).into_bytes();
                (keys.blob_id(&plain), plain)
            })
            .collect();
        for (id, plain) in &trees {
            let enc = encode(&keys, settings, BlobType::Tree, *id, plain).unwrap();
            stash.put(*id, plain, &enc.sealed);
        }
        assert!(
            stash.mem_bytes <= 10_000,
            "memory budget kept: {}",
            stash.mem_bytes
        );
        assert!(
            stash.spilled.len() >= 30,
            "most trees spilled: {}",
            stash.spilled.len()
        );
        for (id, plain) in &trees {
            assert_eq!(&stash.get(&keys, id).unwrap().unwrap(), plain);
        }
        assert!(stash.get(&keys, &Id::of_object(b"other")).is_none());
    }
}
