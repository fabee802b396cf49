//! Restore a snapshot (or a sub-path of it) into a local directory.
//!
//! A walker task streams file jobs through a bounded channel; the writer
//! plans them into batches (bounded by the plan's memory, so memory stays
//! bounded however large the snapshot) and restores each batch pack by pack:
//! every needed pack is read once, streamed, with nearby blobs coalesced into
//! one ranged read, and each blob is written at its offset in every file that
//! uses it. On S3 that is one request per pack instead of one per blob.
//! Every blob is authenticated and its id recomputed before it is written.
//! A file is written under a temporary name (`.NAME.custos-partial`) by
//! whichever decode thread writes its blobs; the thread that writes its last
//! blob sets its times and mode through the open handle, re-reads it against
//! the content digest recorded at backup time when `--verify` asks, and
//! renames it into place — so a file restores in about six system calls,
//! spread over the decode threads. Failures are collected per file (naming
//! file, blob and pack) and the rest still restores.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use globset::{Glob, GlobSet, GlobSetBuilder};
use tokio::sync::mpsc;

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::pack::Cutter;
use crate::repo::Repository;
use crate::snapshot::SnapshotEntry;
use crate::tree::{Node, NodeKind};

/// Planned memory per restore batch: file records and blob places (see
/// [`Batch::heap_bytes`]). A batch reads each pack region it needs once,
/// but a pack shared by two batches is read by both; blobs are stored in
/// backup order, not walk order, so small batches re-read most packs. On a
/// 1 GiB corpus restored from S3, batches of 256–4096 files sent ~200 GETs
/// and read 1.6x the stored bytes; one batch sends one GET per pack.
const BATCH_PLAN_BYTES: usize = 32 << 20;
/// How many packs to read at once from `repo`'s first target.
fn pack_concurrency(repo: &Repository) -> usize {
    repo.primary()
        .map(|t| crate::target::pack_read_concurrency(t.as_ref()))
        .unwrap_or(1)
}

/// What to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Glob patterns on snapshot-relative paths (`docs/**`, `*.eml`); empty = all.
    pub include: Vec<String>,
    /// Erased customers: records naming them are not restored (an old
    /// snapshot or a target that missed the erasure must not bring them back).
    pub suppressed: crate::customer::Suppressed,
    /// Counters a progress display polls: files finished and content bytes written so far.
    pub progress: Option<Arc<crate::pipeline::Progress>>,
    /// Re-read every restored file and compare it with the digest recorded at
    /// backup (`restore --verify`). Without it every blob is still
    /// authenticated and its id recomputed before it is written; the re-read
    /// checks what the file system kept.
    pub verify: bool,
}

/// What a restore did.
#[derive(Debug, Default, serde::Serialize)]
pub struct RestoreReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Devices, FIFOs and sockets recorded in the snapshot but not recreated.
    pub special_skipped: u64,
    /// Records left out because they name an erased customer.
    #[serde(skip_serializing_if = "is_zero")]
    pub suppressed: u64,
    /// One line per failure, naming the file and the object.
    pub errors: Vec<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

struct FileJob {
    path: PathBuf,
    node: Node,
}

struct Ctx {
    repo: Repository,
    /// The restore destination (file paths are named relative to it).
    dest: PathBuf,
    index: Arc<Index>,
    include: Option<GlobSet>,
    suppressed: crate::customer::Suppressed,
    suppressed_count: AtomicU64,
    /// The snapshot's source (legal holds may name it).
    source: String,
    errors: Mutex<Vec<String>>,
    files: AtomicU64,
    bytes: AtomicU64,
    symlinks: AtomicU64,
    special: AtomicU64,
    progress: Option<Arc<crate::pipeline::Progress>>,
    /// Re-read and digest-check every file ([`RestoreOptions::verify`]).
    verify: bool,
}

impl Ctx {
    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "restore failure");
        self.errors.lock().expect("errors lock").push(msg);
    }
}

/// Refuse names that could escape the destination (hostile or damaged trees).
fn safe_name(node: &Node) -> Result<Vec<u8>> {
    let name = node.name_bytes();
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::Invalid(format!(
            "refusing unsafe entry name {:?} in snapshot tree",
            node.name
        )));
    }
    Ok(name)
}

fn join_rel(rel: &str, name: &[u8]) -> String {
    let n = String::from_utf8_lossy(name);
    if rel.is_empty() {
        n.into_owned()
    } else {
        format!("{rel}/{n}")
    }
}

/// Build the include matcher; errors name the bad pattern.
pub fn build_include(patterns: &[String]) -> Result<Option<GlobSet>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let p = p.trim_start_matches('/');
        b.add(Glob::new(p).map_err(|e| Error::Invalid(format!("--include {p:?}: {e}")))?);
    }
    b.build()
        .map(Some)
        .map_err(|e| Error::Invalid(format!("--include: {e}")))
}

/// Find the tree node at `sub_path` inside the snapshot (None = the root).
async fn resolve_sub_path(
    repo: &Repository,
    index: &Index,
    root: Id,
    sub_path: &str,
) -> Result<Node> {
    let mut node = Node::new(b"", NodeKind::Dir);
    node.subtree = Some(root);
    for part in sub_path.split('/').filter(|p| !p.is_empty()) {
        let Some(tree) = node.subtree.filter(|_| node.kind == NodeKind::Dir) else {
            return Err(Error::Invalid(format!(
                "{sub_path}: {part} is inside a non-directory"
            )));
        };
        let nodes = repo.load_tree(index, &tree).await?;
        node = nodes
            .into_iter()
            .find(|n| n.name_bytes() == part.as_bytes())
            .ok_or_else(|| {
                Error::Invalid(format!("{sub_path}: no entry {part:?} in the snapshot"))
            })?;
    }
    Ok(node)
}

/// The tree blob of the directory at `sub_path` inside a snapshot.
pub async fn subtree_of(repo: &Repository, index: &Index, root: Id, sub_path: &str) -> Result<Id> {
    let node = resolve_sub_path(repo, index, root, sub_path).await?;
    match (node.kind, node.subtree) {
        (NodeKind::Dir, Some(t)) => Ok(t),
        _ => Err(Error::Invalid(format!(
            "{sub_path}: not a directory in the snapshot"
        ))),
    }
}

/// Restore `snapshot` (or `sub_path` inside it) into `dest`.
pub async fn restore(
    repo: &Repository,
    index: Arc<Index>,
    snapshot: &SnapshotEntry,
    sub_path: Option<&str>,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    repo.require(crate::crypto::Role::Restore, "restore")?;
    let start =
        resolve_sub_path(repo, &index, snapshot.snapshot.tree, sub_path.unwrap_or("")).await?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        dest: dest.to_path_buf(),
        index,
        include: build_include(&opts.include)?,
        suppressed: opts.suppressed.clone(),
        suppressed_count: AtomicU64::new(0),
        source: snapshot.snapshot.source.clone(),
        errors: Mutex::default(),
        files: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        symlinks: AtomicU64::new(0),
        special: AtomicU64::new(0),
        progress: opts.progress.clone(),
        verify: opts.verify,
    });
    let (tx, rx) = mpsc::channel::<FileJob>(256);
    let writers = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut rx = rx;
            let mut batch = Batch::default();
            // One batch restores while the walk fills the next, so loading
            // trees does not stall the decode threads between batches.
            let mut running: Option<tokio::task::JoinHandle<()>> = None;
            while let Some(job) = rx.recv().await {
                batch.add(&ctx, job);
                if batch.heap_bytes() >= BATCH_PLAN_BYTES {
                    if let Some(prev) = running.take() {
                        joined(&ctx, prev.await);
                    }
                    let (ctx, batch) = (ctx.clone(), std::mem::take(&mut batch));
                    running = Some(tokio::spawn(
                        async move { restore_batch(&ctx, batch).await },
                    ));
                }
            }
            if let Some(prev) = running.take() {
                joined(&ctx, prev.await);
            }
            restore_batch(&ctx, batch).await;
        })
    };
    let mut dirs: Vec<(PathBuf, Node)> = Vec::new();
    let walk = if start.kind == NodeKind::Dir {
        walk(
            &ctx,
            &tx,
            start.subtree,
            dest.to_path_buf(),
            String::new(),
            false,
            &mut dirs,
        )
        .await
    } else {
        // A single file or record: restored as DEST/<name>.
        let name = safe_name(&start)?;
        let rel = String::from_utf8_lossy(&name).into_owned();
        let path = dest.join(OsStr::from_bytes(&name));
        place(&ctx, &tx, start, path, rel, false, &mut dirs).await
    };
    drop(tx);
    writers
        .await
        .map_err(|e| Error::Failed(format!("restore writer panicked: {e}")))?;
    walk?;
    // Directory times last (writing files inside changes them), deepest first.
    let ndirs = dirs.len() as u64;
    for (path, node) in dirs.iter().rev() {
        apply_meta(&ctx, path, node, false);
    }
    let ctx =
        Arc::try_unwrap(ctx).map_err(|_| Error::Failed("restore tasks still running".into()))?;
    Ok(RestoreReport {
        files: ctx.files.into_inner(),
        dirs: ndirs,
        symlinks: ctx.symlinks.into_inner(),
        bytes: ctx.bytes.into_inner(),
        special_skipped: ctx.special.into_inner(),
        suppressed: ctx.suppressed_count.into_inner(),
        errors: ctx.errors.into_inner().expect("errors lock"),
    })
}

/// A batch task that panicked left files unrestored: say so, never pass silently.
fn joined(ctx: &Ctx, r: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        ctx.fail(format!("restore batch failed: {e}"));
    }
}

/// Walk a tree, creating directories and symlinks and queueing files.
fn walk<'a>(
    ctx: &'a Arc<Ctx>,
    tx: &'a mpsc::Sender<FileJob>,
    tree: Option<Id>,
    dir: PathBuf,
    rel: String,
    included: bool,
    dirs: &'a mut Vec<(PathBuf, Node)>,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        let Some(tree) = tree else { return Ok(()) };
        let nodes = match ctx.repo.load_tree(&ctx.index, &tree).await {
            Ok(n) => n,
            Err(e) => {
                ctx.fail(format!(
                    "{}: tree {}: {e}",
                    if rel.is_empty() { "/" } else { &rel },
                    tree.short()
                ));
                return Ok(());
            }
        };
        for node in nodes {
            let name = match safe_name(&node) {
                Ok(n) => n,
                Err(e) => {
                    ctx.fail(format!("{rel}: {e}"));
                    continue;
                }
            };
            let path = dir.join(OsStr::from_bytes(&name));
            let r = join_rel(&rel, &name);
            place(ctx, tx, node, path, r, included, dirs).await?;
        }
        Ok(())
    })
}

async fn place(
    ctx: &Arc<Ctx>,
    tx: &mpsc::Sender<FileJob>,
    node: Node,
    path: PathBuf,
    rel: String,
    included: bool,
    dirs: &mut Vec<(PathBuf, Node)>,
) -> Result<()> {
    let selected = included || ctx.include.as_ref().is_none_or(|g| g.is_match(&rel));
    match node.kind {
        NodeKind::Dir => {
            if selected {
                if let Err(e) = std::fs::create_dir_all(&path) {
                    ctx.fail(format!("{rel}: {e}"));
                    return Ok(());
                }
                dirs.push((path.clone(), node.clone()));
            }
            walk(ctx, tx, node.subtree, path, rel, selected, dirs).await
        }
        _ if !selected => Ok(()),
        NodeKind::Record if ctx.suppressed.covers(ctx.repo.keys(), &ctx.source, &node) => {
            ctx.suppressed_count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        NodeKind::File | NodeKind::Record | NodeKind::Attachment => {
            // A record's separately stored attachments go beside it, in `<name>.attachments/`.
            let attachments = (node.kind == NodeKind::Record)
                .then_some(node.subtree)
                .flatten();
            let (att_path, att_rel) = (attachments_dir(&path), format!("{rel}.attachments"));
            tx.send(FileJob { path, node })
                .await
                .map_err(|_| Error::Failed("restore writers stopped".into()))?;
            if attachments.is_some() {
                walk(ctx, tx, attachments, att_path, att_rel, true, dirs).await?;
            }
            Ok(())
        }
        NodeKind::Symlink => {
            if let Err(e) = restore_symlink(&path, &node) {
                ctx.fail(format!("{rel}: {e}"));
            } else {
                ctx.symlinks.fetch_add(1, Ordering::Relaxed);
                apply_meta(ctx, &path, &node, true);
            }
            Ok(())
        }
        NodeKind::Special => {
            ctx.special.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }
}

fn attachments_dir(record: &Path) -> PathBuf {
    let mut name = record.file_name().unwrap_or_default().to_os_string();
    name.push(".attachments");
    record.with_file_name(name)
}

fn restore_symlink(path: &Path, node: &Node) -> std::io::Result<()> {
    let target = node
        .link_target_bytes()
        .ok_or_else(|| std::io::Error::other("symlink without target"))?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path)?,
        Ok(_) => std::fs::remove_file(path)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink(OsStr::from_bytes(&target), path)
}

/// One file of a batch being restored: what finishing it needs, not its node.
struct Prepared {
    path: PathBuf,
    size: u64,
    mtime: Option<chrono::DateTime<chrono::Utc>>,
    mode: Option<u32>,
    /// Content digest recorded at backup (`--verify`).
    digest: Option<Id>,
    /// Bytes the planned blobs cover (the size, unless the node is inconsistent).
    planned: u64,
    state: Mutex<FileState>,
    /// Blob writes still to come; the one that brings it to zero finishes the file.
    pending: AtomicUsize,
}

/// How far a file being restored has got.
#[derive(Default)]
struct FileState {
    /// The first failure; the file is then removed, not finished.
    failed: Option<String>,
    /// Where its blobs go, decided by the first one written.
    at: Option<WriteAt>,
}

/// Where a file's blobs are written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WriteAt {
    /// Under its own name: nothing was there, so a failure (the file is then
    /// removed) loses nothing. No temporary and rename: on a fresh
    /// destination those were a third of restore's system time.
    Final,
    /// A temporary renamed over what is there once complete, so a file (or
    /// directory, or symlink) already at that path is kept until then.
    Temporary,
}

impl Prepared {
    fn new(path: PathBuf, node: &Node) -> Self {
        Prepared {
            path,
            size: node.size,
            mtime: node.mtime,
            mode: node.mode,
            digest: node.digest,
            planned: 0,
            state: Mutex::default(),
            pending: AtomicUsize::new(0),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.state.lock().expect("file state lock")
    }

    fn fail(&self, msg: String) {
        self.state().failed.get_or_insert(msg);
    }

    fn failed(&self) -> bool {
        self.state().failed.is_some()
    }

    /// Where the file is written before it is renamed into place.
    fn tmp(&self) -> PathBuf {
        partial_name(&self.path)
    }

    /// The path being written: the file's own, or its temporary.
    fn written(&self) -> PathBuf {
        match self.state().at {
            Some(WriteAt::Final) => self.path.clone(),
            _ => self.tmp(),
        }
    }

    /// Open the file for writing a blob. The first call decides where: the
    /// file's own path when nothing is there (created exclusively, so an
    /// existing file, directory or symlink is never written through),
    /// otherwise the temporary. Later calls open what the first one chose.
    fn open(&self) -> std::io::Result<std::fs::File> {
        let mut st = self.state();
        match st.at {
            Some(WriteAt::Final) => {
                drop(st);
                open_rw(&self.path, true)
            }
            Some(WriteAt::Temporary) => {
                drop(st);
                open_rw(&self.tmp(), true)
            }
            None => match open_rw(&self.path, false) {
                Ok(f) => {
                    st.at = Some(WriteAt::Final);
                    Ok(f)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    st.at = Some(WriteAt::Temporary);
                    open_rw(&self.tmp(), true)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Remove what was written of a file that failed.
    fn discard(&self) {
        if self.state().at.is_some() {
            let _ = std::fs::remove_file(self.written());
        }
    }

    /// The path relative to the destination, for messages.
    fn rel<'a>(&'a self, ctx: &Ctx) -> std::path::Display<'a> {
        self.path
            .strip_prefix(&ctx.dest)
            .unwrap_or(&self.path)
            .display()
    }
}

/// One blob written into one file: where it is read and where it goes.
/// A batch's plan is a flat list of these, sorted by pack and offset when
/// the batch runs (consecutive entries with one offset are one blob read
/// once and written to several places).
///
/// A grouped blob's `offset` and `length` are its group's; consecutive
/// entries of one group are read and decoded once.
struct Place {
    id: Id,
    /// Index into [`Batch::packs`].
    pack: u32,
    offset: u32,
    length: u32,
    /// Index into [`Batch::files`].
    file: u32,
    file_offset: u64,
    /// Index into [`Batch::groups`], or [`NO_GROUP`].
    group: u32,
    /// A grouped blob's offset in its group's plaintext, and its length.
    inner: u32,
    raw_length: u32,
}

/// [`Place::group`] of a blob sealed on its own.
const NO_GROUP: u32 = u32::MAX;

/// Files to restore together, planned as they arrive from the walk.
#[derive(Default)]
struct Batch {
    files: Vec<Prepared>,
    places: Vec<Place>,
    /// Pack ids, and their numbers in `places`.
    packs: Vec<Id>,
    pack_no: std::collections::HashMap<Id, u32>,
    /// Group ids, and their numbers in `places`.
    groups: Vec<Id>,
    group_no: std::collections::HashMap<Id, u32>,
    /// Heap bytes of the paths in `files`.
    path_bytes: usize,
}

impl Batch {
    /// Plan one file: look up its blobs; drop its node.
    fn add(&mut self, ctx: &Ctx, job: FileJob) {
        let fi = self.files.len() as u32;
        let mut p = Prepared::new(job.path, &job.node);
        let (mut off, mut pending) = (0u64, 0);
        for blob in &job.node.content {
            let Some(loc) = ctx.index.get(blob).filter(|l| l.ty == BlobType::Data) else {
                p.fail(format!("data blob {blob} is not in any index"));
                break;
            };
            let next = self.packs.len() as u32;
            let pack = *self.pack_no.entry(loc.pack).or_insert(next);
            if pack == next {
                self.packs.push(loc.pack);
            }
            let (group, inner) = match loc.group {
                None => (NO_GROUP, 0),
                Some(g) => {
                    let next = self.groups.len() as u32;
                    let n = *self.group_no.entry(g.id).or_insert(next);
                    if n == next {
                        self.groups.push(g.id);
                    }
                    (n, g.inner)
                }
            };
            self.places.push(Place {
                id: *blob,
                pack,
                offset: loc.offset,
                length: loc.length,
                file: fi,
                file_offset: off,
                group,
                inner,
                raw_length: loc.raw_length,
            });
            off += u64::from(loc.raw_length);
            pending += 1;
        }
        p.pending.store(pending, Ordering::Relaxed);
        p.planned = off;
        self.path_bytes += p.path.capacity();
        self.files.push(p);
    }

    /// What the plan holds on the heap (the budget of [`BATCH_PLAN_BYTES`]).
    fn heap_bytes(&self) -> usize {
        self.files.capacity() * std::mem::size_of::<Prepared>()
            + self.path_bytes
            + self.places.capacity() * std::mem::size_of::<Place>()
            + self.packs.len() * 64
            + self.groups.len() * 64
    }
}

/// A blob (or group) needed from one pack: where it is, and every (file,
/// offset) it fills; a group's needed members fill theirs.
struct Want {
    /// The blob's id, or the group's.
    id: Id,
    offset: u32,
    length: u32,
    dests: Vec<(usize, u64)>,
    /// A group's members to write (empty for a single blob).
    members: Vec<WantMember>,
}

/// A blob needed from a group.
struct WantMember {
    id: Id,
    inner: u32,
    length: u32,
    dests: Vec<(usize, u64)>,
}

async fn restore_batch(ctx: &Arc<Ctx>, batch: Batch) {
    let Batch {
        files,
        mut places,
        packs,
        groups: group_ids,
        ..
    } = batch;
    if files.is_empty() {
        return;
    }
    let files = Arc::new(files);
    // Files are created by the first blob written into them, not up front:
    // creation then runs on the decode threads, in parallel with the reads.
    // Empty files (and files none of whose blobs are known) finish now.
    {
        let (ctx2, files) = (ctx.clone(), files.clone());
        let r = tokio::task::spawn_blocking(move || {
            for p in files.iter() {
                if p.pending.load(Ordering::Relaxed) == 0 {
                    finish(&ctx2, p, None);
                }
            }
        })
        .await;
        joined(ctx, r);
    }
    places.sort_unstable_by_key(|p| (p.pack, p.offset, p.inner));
    let places = Arc::new(places);
    let group_ids = Arc::new(group_ids);
    let mut groups = Vec::with_capacity(packs.len());
    let mut start = 0;
    while start < places.len() {
        let pack = places[start].pack;
        let end = start + places[start..].partition_point(|p| p.pack == pack);
        groups.push((packs[pack as usize], start..end));
        start = end;
    }
    futures::stream::iter(groups)
        .for_each_concurrent(pack_concurrency(&ctx.repo), |(pack, range)| {
            let (ctx, files, places) = (ctx.clone(), files.clone(), places.clone());
            let group_ids = group_ids.clone();
            async move {
                let name = crate::pack::pack_object_name(BlobType::Data, &pack);
                let wants = wants(&places[range], &group_ids);
                restore_from_pack(&ctx, &files, name, wants).await
            }
        })
        .await;
    for p in files.iter() {
        if p.pending.load(Ordering::Acquire) != 0 {
            // Every planned write either happened or failed; a file left
            // pending would be a bug here, and must not pass silently.
            p.discard();
            ctx.fail(format!("{}: not every blob was written", p.rel(ctx)));
        }
    }
}

/// One pack's places (sorted by offset, then place in the group) as blobs
/// and groups to read, each with its destinations.
fn wants(places: &[Place], group_ids: &[Id]) -> Vec<Want> {
    let mut out: Vec<Want> = Vec::new();
    for p in places {
        let dest = (p.file as usize, p.file_offset);
        let grouped = p.group != NO_GROUP;
        let w = match out.last_mut() {
            Some(w) if w.offset == p.offset => w,
            _ => {
                out.push(Want {
                    id: if grouped {
                        group_ids[p.group as usize]
                    } else {
                        p.id
                    },
                    offset: p.offset,
                    length: p.length,
                    dests: Vec::new(),
                    members: Vec::new(),
                });
                out.last_mut().expect("just pushed")
            }
        };
        if !grouped {
            w.dests.push(dest);
            continue;
        }
        match w.members.last_mut() {
            Some(m) if m.id == p.id => m.dests.push(dest),
            _ => w.members.push(WantMember {
                id: p.id,
                inner: p.inner,
                length: p.raw_length,
                dests: vec![dest],
            }),
        }
    }
    out
}

/// Open a file being restored for reading and writing: an existing one
/// (`existing_ok`, a temporary) or only a new one (its own path, refused
/// with `AlreadyExists` when anything is there). A missing parent (an
/// attachments folder, the destination of a single file) is created on
/// demand rather than checked for every file.
fn open_rw(path: &Path, existing_ok: bool) -> std::io::Result<std::fs::File> {
    let open = || {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        if existing_ok {
            o.create(true).truncate(false);
        } else {
            o.create_new(true);
        }
        o.open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            open()
        }
        r => r,
    }
}

/// Read the needed regions of one pack and write their blobs into the files.
async fn restore_from_pack(
    ctx: &Arc<Ctx>,
    files: &Arc<Vec<Prepared>>,
    pack: String,
    wants: Vec<Want>,
) {
    // Nearby blobs (sorted by offset) read as one range.
    let mut retry = Vec::new();
    for (range, group) in crate::pack::coalesce(wants) {
        retry.extend(restore_range(ctx, files, &pack, range, group).await);
    }
    for w in retry {
        // Another target may hold a good copy (read_blob falls back across
        // targets); a group's members are read one by one.
        let singles = if w.members.is_empty() {
            vec![(w.id, w.dests)]
        } else {
            w.members.into_iter().map(|m| (m.id, m.dests)).collect()
        };
        for (id, dests) in singles {
            let plain = ctx.repo.read_blob(&ctx.index, BlobType::Data, &id).await;
            let plain = plain
                .as_deref()
                .map_err(|e| format!("{pack} (blob {id}): {e}"));
            write_dests(ctx, files, &dests, plain);
        }
    }
}

/// Sealed bytes per decode job: enough to amortize the hop to the blocking
/// pool, little enough that a pack being read holds a few MiB, not the pack.
const DECODE_BYTES: usize = 4 << 20;

/// Stream one range of a pack and decode and write its blobs as they
/// arrive (one decode job runs while the next one's bytes come in).
/// Returns the blobs that could not be read or decoded, to retry one by one.
async fn restore_range(
    ctx: &Arc<Ctx>,
    files: &Arc<Vec<Prepared>>,
    pack: &str,
    range: std::ops::Range<u64>,
    group: Vec<Want>,
) -> Vec<Want> {
    let mut stream = match ctx.repo.read_range_stream(pack, range.clone()).await {
        Ok(s) => s,
        // The retry's read_blob names the error.
        Err(_) => return group,
    };
    let mut wants = group.into_iter().peekable();
    let mut cutter = Cutter::new(range.start);
    let (mut ready, mut ready_bytes) = (Vec::new(), 0usize);
    let mut decoding: Option<tokio::task::JoinHandle<Vec<Want>>> = None;
    let mut retry = Vec::new();
    loop {
        let chunk = match stream.next().await {
            Some(Ok(c)) => Some(c),
            // A failed transfer leaves the blobs not yet cut to the retry.
            Some(Err(_)) | None => None,
        };
        let done = chunk.is_none();
        if let Some(c) = chunk {
            ready_bytes += cutter.push(c, &mut wants, &mut ready);
        }
        if ready_bytes >= DECODE_BYTES || (done && !ready.is_empty()) {
            // Unwrap the data keys these blobs name (format 2). On failure
            // they fall through to the retry, which names the error.
            let _ = (ctx.repo)
                .ensure_data_keys(ready.iter().map(|(_, s)| &s[..]))
                .await;
            if let Some(prev) = decoding.take() {
                retry.extend(prev.await.unwrap_or_default());
            }
            let (ctx, files, job) = (ctx.clone(), files.clone(), std::mem::take(&mut ready));
            ready_bytes = 0;
            decoding = Some(tokio::task::spawn_blocking(move || {
                decode_and_write(&ctx, &files, job)
            }));
        }
        if done {
            break;
        }
    }
    if let Some(prev) = decoding.take() {
        retry.extend(prev.await.unwrap_or_default());
    }
    retry.extend(wants);
    retry
}

/// Decode sealed blobs and write each into its files; returns those that
/// failed to decode.
fn decode_and_write(ctx: &Ctx, files: &[Prepared], job: Vec<(Want, bytes::Bytes)>) -> Vec<Want> {
    let keys = ctx.repo.keys_arc();
    let mut retry = Vec::new();
    for (mut w, sealed) in job {
        if w.members.is_empty() {
            match crate::blob::decode(&keys, BlobType::Data, &w.id, &sealed) {
                Ok(plain) => write_dests(ctx, files, &w.dests, Ok(&plain)),
                Err(_) => retry.push(w),
            }
            continue;
        }
        let Ok(group) = crate::blob::decode_group(&keys, &w.id, &sealed) else {
            retry.push(w);
            continue;
        };
        let mut failed = Vec::new();
        for m in std::mem::take(&mut w.members) {
            match crate::blob::member(&keys, &m.id, &group, m.inner, m.length) {
                Ok(plain) => write_dests(ctx, files, &m.dests, Ok(plain)),
                Err(_) => failed.push(m),
            }
        }
        if !failed.is_empty() {
            w.members = failed;
            retry.push(w);
        }
    }
    retry
}

impl crate::pack::Placed for Want {
    fn place(&self) -> (u32, u32) {
        (self.offset, self.length)
    }
}

/// Write one blob (or its failure) into every file that uses it, finishing
/// each file whose last blob this was.
fn write_dests(
    ctx: &Ctx,
    files: &[Prepared],
    dests: &[(usize, u64)],
    plain: std::result::Result<&[u8], String>,
) {
    use std::os::unix::fs::FileExt;
    if let (Some(p), Ok(plain)) = (&ctx.progress, &plain) {
        p.bytes
            .fetch_add((plain.len() * dests.len()) as u64, Ordering::Relaxed);
    }
    for (fi, off) in dests {
        let p = &files[*fi];
        let mut file = None;
        if !p.failed() {
            match &plain {
                Ok(plain) => match p
                    .open()
                    .and_then(|f| f.write_all_at(plain, *off).map(|()| f))
                {
                    Ok(f) => file = Some(f),
                    Err(e) => p.fail(format!("{}: {e}", p.written().display())),
                },
                Err(msg) => p.fail(msg.clone()),
            }
        }
        // AcqRel: the thread that finishes sees every other thread's writes.
        if p.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            finish(ctx, p, file);
        }
    }
}

/// Finish a file whose every blob is written (or failed): count it, or
/// remove its temporary and report it.
fn finish(ctx: &Ctx, p: &Prepared, file: Option<std::fs::File>) {
    match finish_file(ctx, p, file) {
        Ok(written) => {
            ctx.files.fetch_add(1, Ordering::Relaxed);
            ctx.bytes.fetch_add(written, Ordering::Relaxed);
            if let Some(p) = &ctx.progress {
                // Bytes are counted as blobs are written (write_dests).
                p.files.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            p.discard();
            ctx.fail(format!("{}: {e}", p.rel(ctx)));
        }
    }
}

/// Size, check (with `--verify`), time-stamp and mode a written file
/// through its open handle, then rename a temporary into place.
fn finish_file(ctx: &Ctx, p: &Prepared, file: Option<std::fs::File>) -> Result<u64> {
    if let Some(msg) = p.state().failed.take() {
        return Err(Error::Failed(msg));
    }
    let file = match file {
        Some(f) => f,
        // An empty file (nothing written yet) is created here.
        None => p.open().map_err(|e| Error::io(p.written(), e))?,
    };
    let at = p.state().at.expect("opened above or by a blob write");
    let written = p.written();
    let size = p.size;
    // A new file is as long as its planned blobs; a temporary left by an
    // interrupted restore may be longer.
    let len = match at {
        WriteAt::Final => p.planned,
        WriteAt::Temporary => file.metadata().map_err(|e| Error::io(&written, e))?.len(),
    };
    if len != size {
        file.set_len(size).map_err(|e| Error::io(&written, e))?;
    }
    if ctx.verify {
        verify_file(ctx.repo.keys(), p, &p.rel(ctx), &written, &file)?;
    }
    // Before the mode: a mode like 0o400 must not stop the time being set.
    if let Some(mtime) = p.mtime {
        let ft =
            filetime::FileTime::from_unix_time(mtime.timestamp(), mtime.timestamp_subsec_nanos());
        if let Err(e) = filetime::set_file_handle_times(&file, None, Some(ft)) {
            ctx.fail(format!("{}: set mtime: {e}", p.path.display()));
        }
    }
    if let Some(mode) = p.mode {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)) {
            ctx.fail(format!("{}: set mode: {e}", p.path.display()));
        }
    }
    drop(file);
    if at == WriteAt::Final {
        return Ok(size);
    }
    match std::fs::rename(&written, &p.path) {
        // A directory of that name is in the way (restoring over an older tree).
        Err(_) if std::fs::symlink_metadata(&p.path).is_ok_and(|m| m.is_dir()) => {
            let _ = std::fs::remove_dir_all(&p.path);
            std::fs::rename(&written, &p.path)
        }
        r => r,
    }
    .map_err(|e| Error::io(&p.path, e))?;
    Ok(size)
}

/// `restore --verify`: re-read what the file system kept and compare it with
/// the digest recorded at backup.
fn verify_file(
    keys: &crate::crypto::Keys,
    p: &Prepared,
    name: &dyn std::fmt::Display,
    written: &Path,
    mut file: &std::fs::File,
) -> Result<()> {
    use std::io::Seek;
    file.rewind().map_err(|e| Error::io(written, e))?;
    let mut hasher = keys.digest_hasher();
    let read = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(written, e))?;
    let matches = (p.digest).is_none_or(|expected| Id(*hasher.finalize().as_bytes()) == expected);
    if read != p.size || !matches {
        return Err(Error::corrupt(
            format!("file {name}"),
            "restored content does not match the digest recorded at backup",
        ));
    }
    Ok(())
}

/// `.NAME.custos-partial` beside `path` (a random name when NAME is long).
fn partial_name(path: &Path) -> PathBuf {
    let file = path.file_name().unwrap_or_default();
    let mut name = std::ffi::OsString::from(".");
    if file.len() <= 200 {
        name.push(file);
    } else {
        // Derived from the name, so the file's blobs find the same temporary.
        let h = blake3::hash(file.as_bytes());
        name.push(hex::encode(&h.as_bytes()[..8]));
    }
    name.push(".custos-partial");
    path.with_file_name(name)
}

fn apply_meta(ctx: &Ctx, path: &Path, node: &Node, symlink: bool) {
    use std::os::unix::fs::PermissionsExt;
    // The mtime first: `filetime::set_file_mtime` opens the path, which fails
    // once the recorded mode (say 000 on a directory) is in place for a non-root
    // user; changing the mode afterwards does not touch the mtime.
    if let Some(mtime) = node.mtime {
        let ft =
            filetime::FileTime::from_unix_time(mtime.timestamp(), mtime.timestamp_subsec_nanos());
        let r = if symlink {
            filetime::set_symlink_file_times(path, ft, ft)
        } else {
            filetime::set_file_mtime(path, ft)
        };
        if let Err(e) = r {
            ctx.fail(format!("{}: set mtime: {e}", path.display()));
        }
    }
    if !symlink {
        if let Some(mode) = node.mode {
            if let Err(e) =
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
            {
                ctx.fail(format!("{}: set mode: {e}", path.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Keys, MasterKey};

    fn prepared(dir: &Path, content: &[u8], digest: Id) -> Prepared {
        let path = dir.join("f.txt");
        std::fs::write(partial_name(&path), content).unwrap();
        Prepared {
            path,
            size: content.len() as u64,
            mtime: None,
            mode: None,
            digest: Some(digest),
            planned: content.len() as u64,
            state: Mutex::default(),
            pending: AtomicUsize::new(0),
        }
    }

    #[test]
    fn verify_rereads_and_names_a_file_whose_content_differs() {
        let keys = Keys::derive(&MasterKey::generate());
        let dir = tempfile::tempdir().unwrap();
        let digest = |b: &[u8]| {
            let mut h = keys.digest_hasher();
            h.update(b);
            Id(*h.finalize().as_bytes())
        };
        // What the file system kept differs from what was backed up.
        let p = prepared(dir.path(), b"changed on disk", digest(b"the original"));
        let f = open_rw(&p.tmp(), true).unwrap();
        let e = verify_file(&keys, &p, &"f.txt", &p.tmp(), &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.txt") && e.contains("digest"), "{e}");
        // A matching file passes the re-read, from the start whatever the handle's position.
        let q = prepared(dir.path(), b"the original", digest(b"the original"));
        let mut f = open_rw(&q.tmp(), true).unwrap();
        std::io::Write::write_all(&mut f, b"the").unwrap();
        verify_file(&keys, &q, &"f.txt", &q.tmp(), &f).unwrap();
        // A file cut short fails even if what is there hashes as recorded.
        let mut r = prepared(dir.path(), b"the original", digest(b"the original"));
        r.size = 20;
        let f = open_rw(&r.tmp(), true).unwrap();
        assert!(verify_file(&keys, &r, &"f.txt", &r.tmp(), &f).is_err());
    }

    /// Back up `src` into a fresh memory repository with 1 MiB packs,
    /// reading through a [`Recording`] target.
    async fn backed_up(
        src: &Path,
    ) -> (
        Repository,
        Arc<crate::target::recording::Recording>,
        SnapshotEntry,
    ) {
        use crate::target::recording::Recording;
        let rec = Arc::new(Recording::new(Arc::new(
            crate::target::store::StoreTarget::memory("m"),
        )));
        let opts = crate::repo::InitOptions {
            kdf: crate::keyfile::KdfParams {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
            pack_size: 1 << 20,
            ..Default::default()
        };
        let repo = Repository::init(vec![rec.clone()], b"pw", &opts)
            .await
            .unwrap();
        let opts = crate::backup::BackupOptions {
            source: "files".into(),
            paths: vec![src.to_path_buf()],
            tags: vec![],
            hostname: "h".into(),
            time_zone: "UTC".into(),
            parent: crate::backup::ParentMode::Auto,
            exclude: vec![],
        };
        crate::backup::backup(&repo, &opts, Arc::default())
            .await
            .unwrap();
        let (mut snaps, _) = repo.snapshots().await.unwrap();
        (repo, rec, snaps.pop().unwrap())
    }

    /// `n` files of 10–12 KB of incompressible content in 7 folders.
    fn random_tree(dir: &Path, n: usize) {
        let mut seed = 7u64;
        for i in 0..n {
            let sub = dir.join(format!("d{}", i % 7));
            std::fs::create_dir_all(&sub).unwrap();
            let body: Vec<u8> = (0..10_000 + i * 3)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 33) as u8
                })
                .collect();
            std::fs::write(sub.join(format!("f{i}")), body).unwrap();
        }
    }

    /// Restore `snap` into a fresh directory; every one of the `n` files of
    /// `src` must come back byte for byte, with no error.
    async fn restore_and_compare(repo: &Repository, snap: &SnapshotEntry, src: &Path, n: usize) {
        let (index, _) = repo.load_index().await.unwrap();
        let dest = tempfile::tempdir().unwrap();
        let opts = RestoreOptions::default();
        let report = restore(repo, Arc::new(index), snap, None, dest.path(), &opts)
            .await
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.files, n as u64);
        let root = dest.path().join(src.file_name().unwrap());
        for i in 0..n {
            let rel = format!("d{}/f{i}", i % 7);
            assert_eq!(
                std::fs::read(root.join(&rel)).unwrap(),
                std::fs::read(src.join(&rel)).unwrap(),
                "{rel}"
            );
        }
    }

    #[tokio::test]
    async fn a_restore_reads_each_data_pack_once() {
        // 600 files over ~6 packs, written by parallel workers, so packs do
        // not follow the walk order.
        let src = tempfile::tempdir().unwrap();
        random_tree(src.path(), 600);
        let (repo, rec, snap) = backed_up(src.path()).await;
        let packs = repo.primary().unwrap().list("data/").await.unwrap();
        assert!(packs.len() >= 5, "{} data packs", packs.len());
        rec.take();
        restore_and_compare(&repo, &snap, src.path(), 600).await;
        let mut reads: Vec<_> = (rec.take().into_iter())
            .filter(|c| c.object.starts_with("data/"))
            .map(|c| (c.op, c.object))
            .collect();
        reads.sort();
        let mut want: Vec<_> = (packs.iter())
            .map(|m| ("get_range_stream", m.name.clone()))
            .collect();
        want.sort();
        assert_eq!(reads, want);
    }

    #[tokio::test]
    async fn a_read_broken_midway_is_finished_blob_by_blob() {
        let src = tempfile::tempdir().unwrap();
        random_tree(src.path(), 200);
        let (repo, rec, snap) = backed_up(src.path()).await;
        // Every pack read breaks after 100 kB (of ~1 MiB).
        rec.cut_streams_after(Some(100_000));
        rec.take();
        restore_and_compare(&repo, &snap, src.path(), 200).await;
        // The 10 kB files are sealed in groups of ~256 KiB (~2 MB in all, 8
        // groups): the fallback reads each group the cut left unread once,
        // its members then come from the repository's group cache.
        let singles = (rec.take().iter())
            .filter(|c| c.op == "get_range" && c.object.starts_with("data/"))
            .count();
        assert!(singles >= 5, "only {singles} groups read one by one");
    }

    /// Wants at `(gap before, length)` after `start`, and the bytes of the range.
    fn layout(blobs: &[(u32, u32)], start: u32) -> (Vec<Want>, Vec<u8>) {
        let (mut wants, mut at) = (Vec::new(), start);
        for (i, (gap, len)) in blobs.iter().enumerate() {
            at += gap;
            wants.push(Want {
                id: Id([i as u8; 32]),
                offset: at,
                length: *len,
                dests: vec![],
                members: vec![],
            });
            at += len;
        }
        let bytes = (start..at + 3).map(|b| (b % 251) as u8).collect();
        (wants, bytes)
    }

    proptest::proptest! {
        /// However the range arrives in chunks, every want is cut out whole
        /// and exactly, in order.
        #[test]
        fn cutter_cuts_every_blob_whatever_the_chunks(
            blobs in proptest::collection::vec((0u32..40, 1u32..60), 0..20),
            start in 0u32..100,
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let (wants, bytes) = layout(&blobs, start);
            let expected: Vec<(u32, Vec<u8>)> = (wants.iter())
                .map(|w| {
                    let o = (w.offset - start) as usize;
                    (w.offset, bytes[o..o + w.length as usize].to_vec())
                })
                .collect();
            let mut wants = wants.into_iter().peekable();
            let (mut cutter, mut out) = (Cutter::new(u64::from(start)), Vec::new());
            let (mut pos, mut k) = (0usize, 0usize);
            while pos < bytes.len() {
                let end = (pos + cuts[k % cuts.len()]).min(bytes.len());
                let cut = cutter.push(bytes::Bytes::copy_from_slice(&bytes[pos..end]), &mut wants, &mut out);
                proptest::prop_assert!(cut <= end - pos + 60);
                pos = end;
                k += 1;
            }
            proptest::prop_assert!(wants.next().is_none());
            let got: Vec<(u32, Vec<u8>)> = out.into_iter().map(|(w, b)| (w.offset, b.to_vec())).collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn a_new_file_is_written_under_its_name_anything_there_through_a_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::new(b"x", NodeKind::File);
        // Nothing there, not even the parent: created in place.
        let p = Prepared::new(dir.path().join("a/b.attachments/x"), &node);
        p.open().unwrap();
        assert_eq!(p.state().at, Some(WriteAt::Final));
        assert!(p.path.is_file() && !p.tmp().exists());
        // Later blobs open the same file.
        p.open().unwrap();
        assert!(!p.tmp().exists());
        // A file, a directory or a symlink in the way: the temporary.
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.path().join("l")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), dir.path().join("dangling"))
            .unwrap();
        for name in ["a/b.attachments/x", "d", "l", "dangling"] {
            let q = Prepared::new(dir.path().join(name), &node);
            use std::io::Write;
            q.open().unwrap().write_all(b"new").unwrap();
            assert_eq!(q.state().at, Some(WriteAt::Temporary), "{name}");
            assert_eq!(q.written(), q.tmp());
            assert_eq!(std::fs::read(q.tmp()).unwrap(), b"new", "{name}");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(!dir.path().join("nowhere").exists());
    }

    /// Every `.custos-partial` under `dir`.
    fn temporaries(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() && !path.is_symlink() {
                out.extend(temporaries(&path));
            } else if path.to_string_lossy().ends_with(".custos-partial") {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn restoring_over_a_tree_replaces_files_and_keeps_those_that_fail() {
        let n = 300;
        let src = tempfile::tempdir().unwrap();
        random_tree(src.path(), n);
        let (repo, _rec, snap) = backed_up(src.path()).await;
        let (index, _) = repo.load_index().await.unwrap();
        let index = Arc::new(index);
        let dest = tempfile::tempdir().unwrap();
        let root = dest.path().join(src.path().file_name().unwrap());
        let rel = |i: usize| format!("d{}/f{i}", i % 7);
        let run = || async {
            let opts = RestoreOptions::default();
            restore(&repo, index.clone(), &snap, None, dest.path(), &opts)
                .await
                .unwrap()
        };
        let same = |i: usize| {
            std::fs::read(root.join(rel(i))).ok()
                == Some(std::fs::read(src.path().join(rel(i))).unwrap())
        };
        let report = run().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(temporaries(dest.path()).is_empty());

        // Over a changed tree: a rewritten file, a folder, a symlink to a file
        // outside and a stale, longer temporary where files were.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"outside").unwrap();
        std::fs::write(root.join(rel(0)), b"changed").unwrap();
        std::fs::remove_file(root.join(rel(1))).unwrap();
        std::fs::create_dir_all(root.join(rel(1)).join("sub")).unwrap();
        std::fs::remove_file(root.join(rel(2))).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join(rel(2))).unwrap();
        std::fs::write(partial_name(&root.join(rel(3))), vec![9u8; 50_000]).unwrap();
        let report = run().await;
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!((0..n).all(same));
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"outside");
        assert!(temporaries(dest.path()).is_empty());

        // A pack gone: files already there keep their old content, new ones
        // are not left half-written, and no temporary remains.
        for i in 0..n {
            if i % 2 == 0 {
                std::fs::remove_file(root.join(rel(i))).unwrap();
            } else {
                std::fs::write(root.join(rel(i)), format!("old {i}")).unwrap();
            }
        }
        let target = repo.primary().unwrap();
        let packs = target.list("data/").await.unwrap();
        target.delete(&packs[0].name).await.unwrap();
        let report = run().await;
        let failed: Vec<usize> = (0..n).filter(|i| !same(*i)).collect();
        assert!(
            !failed.is_empty() && failed.len() < n,
            "{} failed",
            failed.len()
        );
        assert_eq!(report.errors.len(), failed.len(), "{:?}", report.errors);
        for i in failed {
            let got = std::fs::read(root.join(rel(i))).ok();
            let want = (i % 2 == 1).then(|| format!("old {i}").into_bytes());
            assert_eq!(got, want, "{}", rel(i));
        }
        assert!(temporaries(dest.path()).is_empty());
    }
}
