//! Backup of directory sources into a snapshot.
//!
//! Pipeline (ARCHITECTURE.md, "Backup data path"):
//! walk (blocking pool) → per file: chunk (seeded FastCDC) → in parallel on
//! all cores: keyed-BLAKE3 id → dedup against the loaded index and the blobs
//! pending in this run → zstd → seal → verify → one of several open packers
//! (random choice) → bounded channel → uploader task that writes each pack
//! to every target concurrently → index object → snapshot object.
//!
//! Commit rule: the index and snapshot go only to targets that stored every
//! pack of this run; a target that failed is reported as lagging (exit 4).
//! No lock is taken: object names never collide, so concurrent backups into
//! one repository both commit.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use fastcdc::v2020::{FastCDC, Normalization};
use futures::StreamExt;
use rand::Rng;
use rayon::prelude::*;
use tokio::sync::mpsc;

use crate::blob::{encode, BlobType, EncodeSettings};
use crate::chunker::ChunkerParams;
use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{FinishedPack, Packer};
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SnapshotEntry, Summary};
use crate::target::TargetRef;
use crate::tree::{write_tree, Node, NodeKind};

/// Which snapshot to compare against for unchanged files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParentMode {
    /// The latest snapshot of the same source, host and paths.
    Auto,
    /// None: read every file.
    None,
    /// This snapshot.
    Id(Id),
}

/// What to back up and how to label it.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Source name (`files` for ad-hoc paths).
    pub source: String,
    /// Paths; each becomes a top-level entry named by its last component.
    pub paths: Vec<PathBuf>,
    pub tags: Vec<String>,
    pub hostname: String,
    /// IANA time zone recorded with the snapshot.
    pub time_zone: String,
    pub parent: ParentMode,
    /// Glob patterns to leave out: with a `/` matched against the absolute
    /// path, without one against the entry name (`*.tmp`, `/srv/mail/spam/**`).
    pub exclude: Vec<String>,
}

/// Compiled exclude patterns.
#[derive(Debug, Default)]
struct Excludes {
    by_path: Option<globset::GlobSet>,
    by_name: Option<globset::GlobSet>,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Excludes> {
        let mut path = globset::GlobSetBuilder::new();
        let mut name = globset::GlobSetBuilder::new();
        let (mut np, mut nn) = (0, 0);
        for p in patterns {
            let glob = globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Invalid(format!("exclude pattern {p:?}: {e}")))?;
            if p.contains('/') {
                path.add(glob);
                np += 1;
            } else {
                name.add(glob);
                nn += 1;
            }
        }
        let build = |b: globset::GlobSetBuilder, n: usize| -> Result<Option<globset::GlobSet>> {
            if n == 0 {
                return Ok(None);
            }
            b.build()
                .map(Some)
                .map_err(|e| Error::Invalid(format!("exclude patterns: {e}")))
        };
        Ok(Excludes {
            by_path: build(path, np)?,
            by_name: build(name, nn)?,
        })
    }

    fn excluded(&self, path: &Path, name: &[u8]) -> bool {
        self.by_path.as_ref().is_some_and(|g| g.is_match(path))
            || self
                .by_name
                .as_ref()
                .is_some_and(|g| g.is_match(std::ffi::OsStr::from_bytes(name)))
    }
}

/// Live counters for progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub files: AtomicU64,
    pub bytes: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}

/// Outcome of a backup.
#[derive(Debug)]
pub struct BackupReport {
    pub id: Id,
    pub snapshot: Snapshot,
    /// Targets holding the new snapshot.
    pub committed: Vec<String>,
    /// Targets that failed, with the first error each hit.
    pub lagging: Vec<(String, String)>,
    /// Source items that could not be read: (path, error).
    pub unreadable: Vec<(String, String)>,
    /// Problems with existing metadata met on the way (damaged index objects …).
    pub warnings: Vec<String>,
}

/// Packers open per blob type; blobs go to a random one so placement in packs
/// does not mirror file order (FORMAT.md, "Threat model").
const DATA_PACKERS: usize = 2;
/// Chunk bytes gathered from one file before they are encoded in parallel.
const BATCH_BYTES: usize = 8 << 20;
/// Packs uploaded concurrently.
const UPLOAD_CONCURRENCY: usize = 3;
/// Files up to this size are read whole and chunked in memory.
const SMALL_FILE: u64 = 8 << 20;

#[derive(Default)]
struct Counters {
    files_new: AtomicU64,
    files_changed: AtomicU64,
    files_unmodified: AtomicU64,
    dirs: AtomicU64,
    total_bytes: AtomicU64,
    data_blobs: AtomicU64,
    tree_blobs: AtomicU64,
    bytes_added: AtomicU64,
    bytes_stored: AtomicU64,
}

/// Deduplicates, encodes and packs blobs; shared by all worker threads.
struct Saver {
    keys: Arc<Keys>,
    settings: EncodeSettings,
    known: Arc<Index>,
    pending: Mutex<std::collections::HashSet<Id>>,
    data_packers: Vec<Mutex<Packer>>,
    tree_packer: Mutex<Packer>,
    tx: mpsc::Sender<FinishedPack>,
    aborted: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Saver {
    fn save(&self, ty: BlobType, data: &[u8]) -> Result<Id> {
        let id = self.keys.blob_id(data);
        if self.known.contains(&id) || !self.pending.lock().expect("pending lock").insert(id) {
            return Ok(id);
        }
        let enc = encode(&self.keys, self.settings, ty, id, data)?;
        let (blobs, stored) = match ty {
            BlobType::Data => (&self.counters.data_blobs, enc.sealed.len()),
            BlobType::Tree => (&self.counters.tree_blobs, enc.sealed.len()),
        };
        blobs.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_added
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_stored
            .fetch_add(stored as u64, Ordering::Relaxed);
        let finished = match ty {
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
        Ok(id)
    }

    fn send(&self, pack: FinishedPack) -> Result<()> {
        if self.aborted.load(Ordering::Relaxed) || self.tx.blocking_send(pack).is_err() {
            return Err(Error::Failed(
                "backup aborted: packs could not be stored on any target".into(),
            ));
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
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
        Ok(())
    }
}

/// Walks the source and builds tree nodes.
struct Walker {
    saver: Saver,
    repo: Repository,
    index: Arc<Index>,
    handle: tokio::runtime::Handle,
    chunker: ChunkerParams,
    unreadable: Mutex<Vec<(String, String)>>,
    progress: Arc<Progress>,
    excludes: Excludes,
}

fn unchanged(old: &Node, new: &Node) -> bool {
    old.kind == NodeKind::File
        && old.size == new.size
        && old.mtime == new.mtime
        && old.ctime_ns == new.ctime_ns
        && old.inode == new.inode
        && old.mode == new.mode
}

fn base_node(name: &[u8], kind: NodeKind, md: &Metadata) -> Node {
    let mut n = Node::new(name, kind);
    n.mode = Some(md.mode());
    n.mtime = chrono::DateTime::from_timestamp(md.mtime(), md.mtime_nsec() as u32);
    n.ctime_ns = Some(
        md.ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(md.ctime_nsec()),
    );
    n.inode = Some(md.ino());
    n.uid = Some(md.uid());
    n.gid = Some(md.gid());
    n
}

impl Walker {
    fn note_unreadable(&self, path: &Path, e: impl std::fmt::Display) {
        tracing::warn!(path = %path.display(), error = %e, "unreadable source item skipped");
        self.unreadable
            .lock()
            .expect("unreadable lock")
            .push((path.display().to_string(), e.to_string()));
    }

    fn parent_nodes(&self, subtree: Option<Id>) -> HashMap<Vec<u8>, Node> {
        let Some(id) = subtree else {
            return HashMap::new();
        };
        match self.handle.block_on(self.repo.load_tree(&self.index, &id)) {
            Ok(nodes) => nodes.into_iter().map(|n| (n.name_bytes(), n)).collect(),
            Err(e) => {
                tracing::warn!(tree = %id, error = %e, "parent tree unreadable; reading files again");
                HashMap::new()
            }
        }
    }

    fn entry(&self, path: &Path, name: &[u8], parent: Option<&Node>) -> Result<Option<Node>> {
        let md = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                self.note_unreadable(path, e);
                return Ok(None);
            }
        };
        let ft = md.file_type();
        if ft.is_dir() {
            self.dir(path, name, &md, parent).map(Some)
        } else if ft.is_file() {
            self.file(path, name, &md, parent)
        } else if ft.is_symlink() {
            let mut n = base_node(name, NodeKind::Symlink, &md);
            match fs::read_link(path) {
                Ok(t) => {
                    let (s, raw) = crate::tree::encode_name(t.as_os_str().as_bytes());
                    n.link_target = Some(s);
                    n.link_target_raw = raw;
                    Ok(Some(n))
                }
                Err(e) => {
                    self.note_unreadable(path, e);
                    Ok(None)
                }
            }
        } else {
            Ok(Some(base_node(name, NodeKind::Special, &md)))
        }
    }

    fn dir(&self, path: &Path, name: &[u8], md: &Metadata, parent: Option<&Node>) -> Result<Node> {
        let parent_nodes = self.parent_nodes(
            parent
                .filter(|p| p.kind == NodeKind::Dir)
                .and_then(|p| p.subtree),
        );
        let mut entries: Vec<(Vec<u8>, PathBuf)> = Vec::new();
        match fs::read_dir(path) {
            Ok(rd) => {
                for e in rd {
                    match e {
                        Ok(e) => entries.push((e.file_name().as_bytes().to_vec(), e.path())),
                        Err(e) => self.note_unreadable(path, e),
                    }
                }
            }
            Err(e) => self.note_unreadable(path, e),
        }
        entries.retain(|(n, p)| !self.excludes.excluded(p, n));
        entries.sort();
        let nodes: Vec<Option<Node>> = entries
            .par_iter()
            .map(|(n, p)| self.entry(p, n, parent_nodes.get(n)))
            .collect::<Result<_>>()?;
        let mut node = base_node(name, NodeKind::Dir, md);
        node.subtree = Some(self.write_tree(nodes.into_iter().flatten().collect())?);
        self.saver.counters.dirs.fetch_add(1, Ordering::Relaxed);
        Ok(node)
    }

    fn write_tree(&self, nodes: Vec<Node>) -> Result<Id> {
        write_tree(&self.saver.keys, nodes, &|bytes| {
            self.saver.save(BlobType::Tree, &bytes)
        })
    }

    fn file(
        &self,
        path: &Path,
        name: &[u8],
        md: &Metadata,
        parent: Option<&Node>,
    ) -> Result<Option<Node>> {
        let mut node = base_node(name, NodeKind::File, md);
        node.size = md.len();
        let c = &self.saver.counters;
        if let Some(p) = parent {
            if unchanged(p, &node) && p.content.iter().all(|id| self.index.contains(id)) {
                node.content = p.content.clone();
                node.digest = p.digest;
                c.files_unmodified.fetch_add(1, Ordering::Relaxed);
                c.total_bytes.fetch_add(node.size, Ordering::Relaxed);
                self.progress.files.fetch_add(1, Ordering::Relaxed);
                self.progress.bytes.fetch_add(node.size, Ordering::Relaxed);
                return Ok(Some(node));
            }
        }
        let read = match fs::File::open(path) {
            Ok(f) => self.chunk_file(f, md.len()),
            Err(e) => Err(ReadError::Source(e.to_string())),
        };
        match read {
            Ok((content, digest, size)) => {
                node.content = content;
                node.digest = Some(digest);
                node.size = size;
                if parent.is_some() {
                    c.files_changed.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.files_new.fetch_add(1, Ordering::Relaxed);
                }
                c.total_bytes.fetch_add(size, Ordering::Relaxed);
                self.progress.files.fetch_add(1, Ordering::Relaxed);
                Ok(Some(node))
            }
            Err(ReadError::Source(e)) => {
                self.note_unreadable(path, e);
                Ok(None)
            }
            Err(ReadError::Repo(e)) => Err(e),
        }
    }

    /// Chunk a file and save its blobs; returns (blob ids, digest, bytes read).
    fn chunk_file(
        &self,
        mut f: fs::File,
        len_hint: u64,
    ) -> std::result::Result<(Vec<Id>, Id, u64), ReadError> {
        let mut hasher = self.saver.keys.digest_hasher();
        let mut ids = Vec::new();
        let seed = self.saver.keys.chunker_seed();
        let p = self.chunker;
        if len_hint <= SMALL_FILE {
            let mut buf = Vec::with_capacity(len_hint as usize);
            f.read_to_end(&mut buf)
                .map_err(|e| ReadError::Source(e.to_string()))?;
            hasher.update(&buf);
            let cuts: Vec<(usize, usize)> = if buf.len() <= p.min_size as usize {
                vec![(0, buf.len())]
            } else {
                FastCDC::with_level_and_seed(
                    &buf,
                    p.min_size as usize,
                    p.avg_size as usize,
                    p.max_size as usize,
                    Normalization::Level1,
                    seed,
                )
                .map(|c| (c.offset, c.length))
                .collect()
            };
            self.progress
                .bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if !buf.is_empty() {
                ids = self.save_batch(cuts.iter().map(|&(o, l)| &buf[o..o + l]).collect())?;
            }
            return Ok((ids, Id(*hasher.finalize().as_bytes()), buf.len() as u64));
        }
        let mut size = 0u64;
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0usize;
        for chunk in p.stream(f, seed) {
            let chunk = chunk.map_err(|e| ReadError::Source(e.to_string()))?;
            hasher.update(&chunk.data);
            size += chunk.length as u64;
            batch_bytes += chunk.length;
            self.progress
                .bytes
                .fetch_add(chunk.length as u64, Ordering::Relaxed);
            batch.push(chunk.data);
            if batch_bytes >= BATCH_BYTES {
                ids.extend(self.save_batch(batch.iter().map(|d| d.as_slice()).collect())?);
                batch.clear();
                batch_bytes = 0;
            }
        }
        ids.extend(self.save_batch(batch.iter().map(|d| d.as_slice()).collect())?);
        Ok((ids, Id(*hasher.finalize().as_bytes()), size))
    }

    fn save_batch(&self, chunks: Vec<&[u8]>) -> std::result::Result<Vec<Id>, ReadError> {
        chunks
            .par_iter()
            .map(|d| self.saver.save(BlobType::Data, d))
            .collect::<Result<Vec<Id>>>()
            .map_err(ReadError::Repo)
    }
}

enum ReadError {
    /// The source item failed: skip it, report it.
    Source(String),
    /// The repository side failed: abort the backup.
    Repo(Error),
}

#[derive(Default)]
struct UploadState {
    failed: Vec<Option<String>>,
    packs: Vec<IndexPack>,
    fatal: Option<String>,
}

async fn upload_one(
    pack: FinishedPack,
    targets: &[TargetRef],
    state: &Mutex<UploadState>,
    aborted: &AtomicBool,
    progress: &Progress,
) {
    let alive: Vec<usize> = {
        let s = state.lock().expect("upload state");
        (0..targets.len())
            .filter(|i| s.failed[*i].is_none())
            .collect()
    };
    let name = pack.object_name();
    let results = futures::future::join_all(
        alive
            .iter()
            .map(|&i| targets[i].put_new(&name, pack.bytes.clone())),
    )
    .await;
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
        progress
            .bytes_uploaded
            .fetch_add(pack.bytes.len() as u64, Ordering::Relaxed);
        s.packs.push(IndexPack::from_finished(&pack));
    } else {
        s.fatal
            .get_or_insert(format!("pack {name} could not be stored on any target"));
        aborted.store(true, Ordering::Relaxed);
    }
}

/// Choose the parent snapshot.
pub fn choose_parent<'a>(
    all: &'a [SnapshotEntry],
    opts: &BackupOptions,
    paths: &[String],
) -> Result<Option<&'a SnapshotEntry>> {
    match &opts.parent {
        ParentMode::None => Ok(None),
        ParentMode::Id(id) => all
            .iter()
            .find(|s| s.id == *id)
            .map(Some)
            .ok_or_else(|| Error::Snapshot(format!("parent {id} not found"))),
        ParentMode::Auto => Ok(all
            .iter()
            .filter(|s| {
                s.snapshot.source == opts.source
                    && s.snapshot.hostname == opts.hostname
                    && s.snapshot.paths == paths
            })
            .max_by_key(|s| s.snapshot.time)),
    }
}

/// Absolute, normalized paths and their top-level names; errors name a missing path.
fn resolve_paths(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    if paths.is_empty() {
        return Err(Error::Invalid(
            "nothing to back up: give at least one path".into(),
        ));
    }
    let mut out: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    for p in paths {
        let abs = std::path::absolute(p).map_err(|e| Error::io(p, e))?;
        fs::symlink_metadata(&abs).map_err(|e| Error::io(&abs, e))?;
        let name = abs
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_else(|| b"root".to_vec());
        if let Some((other, _)) = out.iter().find(|(_, n)| *n == name) {
            return Err(Error::Invalid(format!(
                "{} and {} would both be stored as {:?}: back them up separately",
                other.display(),
                abs.display(),
                String::from_utf8_lossy(&name)
            )));
        }
        out.push((abs, name));
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(out)
}

/// Run a backup.
pub async fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupReport> {
    let started = Instant::now();
    let time = chrono::Utc::now();
    let roots = resolve_paths(&opts.paths)?;
    let path_strings: Vec<String> = roots.iter().map(|(p, _)| p.display().to_string()).collect();
    // Bring lagging targets up to date first (the next run repairs what the last one missed).
    let mut repo = repo.clone();
    let synced = crate::sync::sync(&repo, true).await?;
    for (t, e) in &synced.failed {
        repo.mark_unreachable(t, format!("could not be brought up to date: {e}"));
    }
    let repo = &repo;
    // Snapshots before the index: a concurrent backup writes its index first,
    // so every snapshot seen here has its index objects in the listing below.
    let (snapshots, mut warnings) = repo.snapshots().await?;
    let (index, index_warnings, index_ids) = repo.load_index_with_ids().await?;
    warnings.extend(index_warnings);
    let parent = choose_parent(&snapshots, opts, &path_strings)?.cloned();
    let index = Arc::new(index);

    let targets: Vec<TargetRef> = repo.targets().to_vec();
    let (tx, mut rx) = mpsc::channel::<FinishedPack>(1);
    let state = Arc::new(Mutex::new(UploadState {
        failed: vec![None; targets.len()],
        ..Default::default()
    }));
    let aborted = Arc::new(AtomicBool::new(false));
    let uploader = {
        let (targets, state, aborted, progress) = (
            targets.clone(),
            state.clone(),
            aborted.clone(),
            progress.clone(),
        );
        tokio::spawn(async move {
            let packs = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            packs
                .for_each_concurrent(UPLOAD_CONCURRENCY, |p| {
                    upload_one(p, &targets, &state, &aborted, &progress)
                })
                .await;
        })
    };

    let counters = Arc::new(Counters::default());
    let pack_size = repo.config().pack_size as usize;
    let walker = Walker {
        saver: Saver {
            keys: repo.keys_arc(),
            settings: repo.encode_settings(),
            known: index.clone(),
            pending: Mutex::default(),
            data_packers: (0..DATA_PACKERS)
                .map(|_| Mutex::new(Packer::new(BlobType::Data, pack_size)))
                .collect(),
            tree_packer: Mutex::new(Packer::new(BlobType::Tree, pack_size)),
            tx,
            aborted: aborted.clone(),
            counters: counters.clone(),
        },
        repo: repo.clone(),
        index: index.clone(),
        handle: tokio::runtime::Handle::current(),
        chunker: repo.config().chunker,
        unreadable: Mutex::default(),
        progress,
        excludes: Excludes::new(&opts.exclude)?,
    };
    let parent_tree = parent.as_ref().map(|p| p.snapshot.tree);
    let walked = tokio::task::spawn_blocking(move || {
        let result = (|| {
            let parent_root = walker.parent_nodes(parent_tree);
            let nodes: Vec<Option<Node>> = roots
                .iter()
                .map(|(path, name)| walker.entry(path, name, parent_root.get(name)))
                .collect::<Result<_>>()?;
            let tree = walker.write_tree(nodes.into_iter().flatten().collect())?;
            walker.saver.flush()?;
            Ok(tree)
        })();
        let unreadable = std::mem::take(&mut *walker.unreadable.lock().expect("unreadable lock"));
        drop(walker); // closes the channel so the uploader finishes
        result.map(|tree| (tree, unreadable))
    })
    .await
    .map_err(|e| Error::Failed(format!("backup worker panicked: {e}")))?;
    uploader
        .await
        .map_err(|e| Error::Failed(format!("upload task panicked: {e}")))?;
    let state = std::mem::take(&mut *state.lock().expect("upload state"));
    if let Some(fatal) = state.fatal {
        return Err(Error::Failed(fatal));
    }
    let (tree, unreadable) = walked?;

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
        .chain(repo.unreachable().iter().cloned())
        .collect();

    // Dedup trusted every index object loaded above: a target may commit only
    // if it holds them all (else some referenced packs may be missing there).
    let healthy = holding_all(healthy, &index_ids, &mut lagging).await;

    // packs → index → snapshot, each only on targets that hold everything before it.
    let healthy = commit_step(repo, healthy, &mut lagging, |r, t| {
        Box::pin(async move {
            if state.packs.is_empty() {
                return vec![];
            }
            let file = IndexFile { packs: state.packs };
            r.save_object(&t, ObjectKind::Index, &file).await.1
        })
    })
    .await;
    let c = &counters;
    let summary = Summary {
        files_new: c.files_new.load(Ordering::Relaxed),
        files_changed: c.files_changed.load(Ordering::Relaxed),
        files_unmodified: c.files_unmodified.load(Ordering::Relaxed),
        dirs: c.dirs.load(Ordering::Relaxed),
        total_files: c.files_new.load(Ordering::Relaxed)
            + c.files_changed.load(Ordering::Relaxed)
            + c.files_unmodified.load(Ordering::Relaxed),
        total_bytes: c.total_bytes.load(Ordering::Relaxed),
        data_blobs_added: c.data_blobs.load(Ordering::Relaxed),
        tree_blobs_added: c.tree_blobs.load(Ordering::Relaxed),
        bytes_added: c.bytes_added.load(Ordering::Relaxed),
        bytes_stored: c.bytes_stored.load(Ordering::Relaxed),
        unreadable: unreadable.len() as u64,
        duration_seconds: started.elapsed().as_secs_f64(),
    };
    let snapshot = Snapshot {
        time,
        time_zone: opts.time_zone.clone(),
        source: opts.source.clone(),
        paths: path_strings,
        hostname: opts.hostname.clone(),
        username: std::env::var("USER").unwrap_or_default(),
        tags: opts.tags.clone(),
        tree,
        parent: parent.map(|p| p.id),
        summary,
        program: format!("custos {}", env!("CARGO_PKG_VERSION")),
    };
    // Seal once: the id is the hash of exactly these bytes on every target.
    let (id, bytes) = crate::object::seal_object(repo.keys(), ObjectKind::Snapshot, &snapshot);
    let name = ObjectKind::Snapshot.name(&id);
    let committed = commit_step(repo, healthy, &mut lagging, move |r, t| {
        Box::pin(async move { r.put_to(&t, &name, &bytes).await })
    })
    .await;
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
    Ok(BackupReport {
        id,
        snapshot,
        committed: committed.iter().map(|t| t.name().to_string()).collect(),
        lagging,
        unreadable,
        warnings,
    })
}

/// Keep the targets that list every index object in `ids`; the others lag.
async fn holding_all(
    targets: Vec<TargetRef>,
    ids: &[Id],
    lagging: &mut Vec<(String, String)>,
) -> Vec<TargetRef> {
    let mut ok = Vec::new();
    for t in targets {
        match t.list("index/").await {
            Ok(list) => {
                let have: std::collections::HashSet<Id> = list
                    .iter()
                    .filter_map(|m| m.name.rsplit('/').next().and_then(Id::from_hex))
                    .collect();
                let missing = ids.iter().filter(|id| !have.contains(id)).count();
                if missing == 0 {
                    ok.push(t);
                } else {
                    lagging.push((
                        t.name().to_string(),
                        format!("lacks {missing} index object(s) held by other targets; run `custos sync`"),
                    ));
                }
            }
            Err(e) => lagging.push((t.name().to_string(), e.to_string())),
        }
    }
    ok
}

type PutResults = Vec<Result<crate::target::PutOutcome>>;

/// Run one write step on `targets`; returns those that succeeded, moving failures to `lagging`.
async fn commit_step<F>(
    repo: &Repository,
    targets: Vec<TargetRef>,
    lagging: &mut Vec<(String, String)>,
    step: F,
) -> Vec<TargetRef>
where
    F: FnOnce(Repository, Vec<TargetRef>) -> futures::future::BoxFuture<'static, PutResults>,
{
    let results = step(repo.clone(), targets.clone()).await;
    if results.is_empty() {
        return targets;
    }
    let mut ok = Vec::new();
    for (t, r) in targets.into_iter().zip(results) {
        match r {
            Ok(_) => ok.push(t),
            Err(e) => lagging.push((t.name().to_string(), e.to_string())),
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_match_names_without_slash_and_paths_with_one() {
        let ex = Excludes::new(&["*.tmp".into(), "/srv/mail/spam/**".into()]).unwrap();
        assert!(ex.excluded(Path::new("/x/y.tmp"), b"y.tmp"));
        assert!(ex.excluded(Path::new("/srv/mail/spam/1.eml"), b"1.eml"));
        assert!(!ex.excluded(Path::new("/srv/mail/inbox/1.eml"), b"1.eml"));
        assert!(!ex.excluded(Path::new("/x/tmp"), b"tmp"));
        let e = Excludes::new(&["a[".into()]).unwrap_err().to_string();
        assert!(e.contains("a["), "{e}");
    }
}
