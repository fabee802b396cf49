//! Restore a snapshot (or a sub-path of it) into a local directory.
//!
//! A walker task streams file jobs through a bounded channel; the writer
//! takes them in batches (bounded in files and bytes, so memory stays bounded
//! however large the snapshot) and restores each batch pack by pack: every
//! needed pack is read once, with nearby blobs coalesced into one ranged
//! read, and each blob is written at its offset in every file that uses it.
//! On S3 that is one request per pack region instead of one per blob.
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
use crate::repo::Repository;
use crate::snapshot::SnapshotEntry;
use crate::tree::{Node, NodeKind};

/// Files per restore batch.
const BATCH_FILES: usize = 4096;
/// Files in the first batch (each next one doubles, up to [`BATCH_FILES`]).
const FIRST_BATCH_FILES: usize = 256;
/// Content bytes per restore batch.
const BATCH_BYTES: u64 = 1 << 30;
/// How many packs to read at once from `repo`'s first target.
fn pack_concurrency(repo: &Repository) -> usize {
    repo.primary()
        .map(|t| crate::target::pack_read_concurrency(t.as_ref()))
        .unwrap_or(1)
}
/// Two needed regions of a pack closer than this are read as one range.
const COALESCE_GAP: u64 = 1 << 20;
/// Largest single ranged read.
const MAX_RANGE: u64 = 64 << 20;

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
    rel: String,
    node: Node,
}

struct Ctx {
    repo: Repository,
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
            let mut batch: Vec<FileJob> = Vec::new();
            let (mut bytes, mut limit) = (0u64, FIRST_BATCH_FILES);
            // One batch restores while the walk fills the next, so loading
            // trees does not stall the decode threads between batches.
            let mut running: Option<tokio::task::JoinHandle<()>> = None;
            while let Some(job) = rx.recv().await {
                bytes += job.node.size;
                batch.push(job);
                if batch.len() >= limit || bytes >= BATCH_BYTES {
                    if let Some(prev) = running.take() {
                        joined(&ctx, prev.await);
                    }
                    let (ctx, batch) = (ctx.clone(), std::mem::take(&mut batch));
                    running = Some(tokio::spawn(
                        async move { restore_batch(&ctx, batch).await },
                    ));
                    bytes = 0;
                    // Small first batches start writing sooner.
                    limit = (limit * 2).min(BATCH_FILES);
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
            tx.send(FileJob { path, rel, node })
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

/// One file of a batch being restored.
struct Prepared {
    job: FileJob,
    tmp: PathBuf,
    failed: Mutex<Option<String>>,
    /// Blob writes still to come; the one that brings it to zero finishes the file.
    pending: AtomicUsize,
}

impl Prepared {
    fn fail(&self, msg: String) {
        self.failed.lock().expect("failed lock").get_or_insert(msg);
    }
}

/// A blob needed by the batch: where it is, and where it goes.
struct Want {
    id: Id,
    offset: u32,
    length: u32,
    /// (file index in the batch, offset in that file)
    dests: Vec<(usize, u64)>,
}

async fn restore_batch(ctx: &Arc<Ctx>, jobs: Vec<FileJob>) {
    if jobs.is_empty() {
        return;
    }
    // Files are created by the first blob written into them, not up front:
    // creation then runs on the decode threads, in parallel with the reads.
    let files: Vec<Prepared> = jobs
        .into_iter()
        .map(|job| Prepared {
            tmp: partial_name(&job.path),
            job,
            failed: Mutex::new(None),
            pending: AtomicUsize::new(0),
        })
        .collect();
    // Plan: pack → blobs wanted, each with every (file, offset) it fills.
    let mut plan: std::collections::HashMap<Id, (String, std::collections::HashMap<Id, Want>)> =
        std::collections::HashMap::new();
    for (fi, p) in files.iter().enumerate() {
        let mut off = 0u64;
        let mut pending = 0;
        for blob in &p.job.node.content {
            let Some(loc) = ctx.index.get(blob).filter(|l| l.ty == BlobType::Data) else {
                p.fail(format!("data blob {blob} is not in any index"));
                break;
            };
            let entry = plan
                .entry(loc.pack)
                .or_insert_with(|| (loc.pack_name(), Default::default()));
            entry
                .1
                .entry(*blob)
                .or_insert_with(|| Want {
                    id: *blob,
                    offset: loc.offset,
                    length: loc.length,
                    dests: Vec::new(),
                })
                .dests
                .push((fi, off));
            off += u64::from(loc.raw_length);
            pending += 1;
        }
        p.pending.store(pending, Ordering::Relaxed);
    }
    let files = Arc::new(files);
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
    futures::stream::iter(plan.into_values())
        .for_each_concurrent(pack_concurrency(&ctx.repo), |(pack, wants)| {
            let (ctx, files) = (ctx.clone(), files.clone());
            async move { restore_from_pack(&ctx, &files, pack, wants.into_values().collect()).await }
        })
        .await;
    for p in files.iter() {
        if p.pending.load(Ordering::Acquire) != 0 {
            // Every planned write either happened or failed; a file left
            // pending would be a bug here, and must not pass silently.
            let _ = std::fs::remove_file(&p.tmp);
            ctx.fail(format!("{}: not every blob was written", p.job.rel));
        }
    }
}

/// Open (creating it if needed) the temporary of a file being restored.
/// A missing parent (an attachments folder, the destination of a single
/// file) is created on demand rather than checked for every file.
fn open_tmp(tmp: &Path) -> std::io::Result<std::fs::File> {
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(tmp)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = tmp.parent() {
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
    mut wants: Vec<Want>,
) {
    wants.sort_by_key(|w| w.offset);
    // Coalesce nearby blobs into ranges.
    let mut ranges: Vec<(u64, u64, Vec<Want>)> = Vec::new();
    for w in wants {
        let (start, end) = (
            u64::from(w.offset),
            u64::from(w.offset) + u64::from(w.length),
        );
        match ranges.last_mut() {
            Some((s, e, group)) if start <= *e + COALESCE_GAP && end - *s <= MAX_RANGE => {
                *e = (*e).max(end);
                group.push(w);
            }
            _ => ranges.push((start, end, vec![w])),
        }
    }
    for (start, end, group) in ranges {
        let data = ctx.repo.read_range(&pack, start..end).await;
        if let Ok(d) = &data {
            // Unwrap the data keys this range names (format 2). On failure the
            // blobs fall through to `read_blob` below, which names the error.
            let slices = group.iter().filter_map(|w| {
                let o = (u64::from(w.offset) - start) as usize;
                d.get(o..o + w.length as usize)
            });
            let _ = ctx.repo.ensure_data_keys(slices).await;
        }
        let keys = ctx.repo.keys_arc();
        let (ctx2, files2) = (ctx.clone(), files.clone());
        // Decode and write on the blocking pool; blobs that fail are retried one by one below.
        let retry: Vec<Want> = tokio::task::spawn_blocking(move || {
            let mut retry = Vec::new();
            for w in group {
                let sealed = data.as_ref().ok().and_then(|d| {
                    let o = (u64::from(w.offset) - start) as usize;
                    d.get(o..o + w.length as usize)
                });
                match sealed.map(|s| crate::blob::decode(&keys, BlobType::Data, &w.id, s)) {
                    Some(Ok(plain)) => write_dests(&ctx2, &files2, &w, Ok(&plain)),
                    _ => retry.push(w),
                }
            }
            retry
        })
        .await
        .unwrap_or_default();
        for w in retry {
            // Another target may hold a good copy (read_blob falls back across targets).
            let plain = ctx.repo.read_blob(&ctx.index, BlobType::Data, &w.id).await;
            let plain = plain
                .as_deref()
                .map_err(|e| format!("{pack} (blob {}): {e}", w.id));
            write_dests(ctx, files, &w, plain);
        }
    }
}

/// Write one blob (or its failure) into every file that uses it, finishing
/// each file whose last blob this was.
fn write_dests(ctx: &Ctx, files: &[Prepared], w: &Want, plain: std::result::Result<&[u8], String>) {
    use std::os::unix::fs::FileExt;
    if let (Some(p), Ok(plain)) = (&ctx.progress, &plain) {
        p.bytes
            .fetch_add((plain.len() * w.dests.len()) as u64, Ordering::Relaxed);
    }
    for (fi, off) in &w.dests {
        let p = &files[*fi];
        let mut file = None;
        if p.failed.lock().expect("failed lock").is_none() {
            match &plain {
                Ok(plain) => {
                    match open_tmp(&p.tmp).and_then(|f| f.write_all_at(plain, *off).map(|()| f)) {
                        Ok(f) => file = Some(f),
                        Err(e) => p.fail(format!("{}: {e}", p.tmp.display())),
                    }
                }
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
            let _ = std::fs::remove_file(&p.tmp);
            ctx.fail(format!("{}: {e}", p.job.rel));
        }
    }
}

/// Size, check (with `--verify`), time-stamp and mode a written temporary
/// through its open handle, then rename it into place.
fn finish_file(ctx: &Ctx, p: &Prepared, file: Option<std::fs::File>) -> Result<u64> {
    if let Some(msg) = p.failed.lock().expect("failed lock").take() {
        return Err(Error::Failed(msg));
    }
    let file = match file {
        Some(f) => f,
        None => open_tmp(&p.tmp).map_err(|e| Error::io(&p.tmp, e))?,
    };
    // A temporary left by an interrupted restore may be longer.
    let size = p.job.node.size;
    if file.metadata().map_err(|e| Error::io(&p.tmp, e))?.len() != size {
        file.set_len(size).map_err(|e| Error::io(&p.tmp, e))?;
    }
    if ctx.verify {
        verify_file(ctx.repo.keys(), p, &file)?;
    }
    // Before the mode: a mode like 0o400 must not stop the time being set.
    if let Some(mtime) = p.job.node.mtime {
        let ft =
            filetime::FileTime::from_unix_time(mtime.timestamp(), mtime.timestamp_subsec_nanos());
        if let Err(e) = filetime::set_file_handle_times(&file, None, Some(ft)) {
            ctx.fail(format!("{}: set mtime: {e}", p.job.path.display()));
        }
    }
    if let Some(mode) = p.job.node.mode {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777)) {
            ctx.fail(format!("{}: set mode: {e}", p.job.path.display()));
        }
    }
    drop(file);
    match std::fs::rename(&p.tmp, &p.job.path) {
        // A directory of that name is in the way (restoring over an older tree).
        Err(_) if std::fs::symlink_metadata(&p.job.path).is_ok_and(|m| m.is_dir()) => {
            let _ = std::fs::remove_dir_all(&p.job.path);
            std::fs::rename(&p.tmp, &p.job.path)
        }
        r => r,
    }
    .map_err(|e| Error::io(&p.job.path, e))?;
    Ok(size)
}

/// `restore --verify`: re-read what the file system kept and compare it with
/// the digest recorded at backup.
fn verify_file(keys: &crate::crypto::Keys, p: &Prepared, mut file: &std::fs::File) -> Result<()> {
    use std::io::Seek;
    file.rewind().map_err(|e| Error::io(&p.tmp, e))?;
    let mut hasher = keys.digest_hasher();
    let read = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(&p.tmp, e))?;
    let matches = p
        .job
        .node
        .digest
        .is_none_or(|expected| Id(*hasher.finalize().as_bytes()) == expected);
    if read != p.job.node.size || !matches {
        return Err(Error::corrupt(
            format!("file {}", p.job.rel),
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
        name.push(format!("{:016x}", rand::random::<u64>()));
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
        let tmp = partial_name(&path);
        std::fs::write(&tmp, content).unwrap();
        let mut node = Node::new(b"f.txt", crate::tree::NodeKind::File);
        node.size = content.len() as u64;
        node.digest = Some(digest);
        Prepared {
            job: FileJob {
                path,
                rel: "f.txt".into(),
                node,
            },
            tmp,
            failed: Mutex::new(None),
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
        let f = open_tmp(&p.tmp).unwrap();
        let e = verify_file(&keys, &p, &f).unwrap_err().to_string();
        assert!(e.contains("f.txt") && e.contains("digest"), "{e}");
        // A matching file passes the re-read, from the start whatever the handle's position.
        let q = prepared(dir.path(), b"the original", digest(b"the original"));
        let mut f = open_tmp(&q.tmp).unwrap();
        std::io::Write::write_all(&mut f, b"the").unwrap();
        verify_file(&keys, &q, &f).unwrap();
        // A file cut short fails even if what is there hashes as recorded.
        let mut r = prepared(dir.path(), b"the original", digest(b"the original"));
        r.job.node.size = 20;
        let f = open_tmp(&r.tmp).unwrap();
        assert!(verify_file(&keys, &r, &f).is_err());
    }

    #[test]
    fn open_tmp_creates_a_missing_parent() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("a/b.attachments/.x.custos-partial");
        open_tmp(&tmp).unwrap();
        assert!(tmp.is_file());
    }
}
