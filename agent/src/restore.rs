//! Restore a snapshot (or a sub-path of it) into a local directory.
//!
//! A walker task streams file jobs through a bounded channel to concurrent
//! writers, so memory stays bounded however large the snapshot. Every blob is
//! authenticated and its id recomputed; every restored file is then compared
//! with the content digest recorded at backup time. Failures are collected
//! per file (naming file, blob and pack) and the rest still restores.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Files written concurrently.
const FILE_CONCURRENCY: usize = 8;
/// Blobs of one file fetched ahead.
const BLOB_PREFETCH: usize = 4;

/// What to restore.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Glob patterns on snapshot-relative paths (`docs/**`, `*.eml`); empty = all.
    pub include: Vec<String>,
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
    /// One line per failure, naming the file and the object.
    pub errors: Vec<String>,
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
    errors: Mutex<Vec<String>>,
    files: AtomicU64,
    bytes: AtomicU64,
    symlinks: AtomicU64,
    special: AtomicU64,
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

/// Restore `snapshot` (or `sub_path` inside it) into `dest`.
pub async fn restore(
    repo: &Repository,
    index: Arc<Index>,
    snapshot: &SnapshotEntry,
    sub_path: Option<&str>,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let start =
        resolve_sub_path(repo, &index, snapshot.snapshot.tree, sub_path.unwrap_or("")).await?;
    std::fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let ctx = Arc::new(Ctx {
        repo: repo.clone(),
        index,
        include: build_include(&opts.include)?,
        errors: Mutex::default(),
        files: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        symlinks: AtomicU64::new(0),
        special: AtomicU64::new(0),
    });
    let (tx, rx) = mpsc::channel::<FileJob>(256);
    let writers = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut rx = rx;
            let jobs = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
            jobs.for_each_concurrent(FILE_CONCURRENCY, |job| {
                let ctx = ctx.clone();
                async move {
                    if let Err(e) = restore_file(&ctx, &job).await {
                        ctx.fail(format!("{}: {e}", job.rel));
                    }
                }
            })
            .await;
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
        errors: ctx.errors.into_inner().expect("errors lock"),
    })
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
        NodeKind::File | NodeKind::Record | NodeKind::Attachment => tx
            .send(FileJob { path, rel, node })
            .await
            .map_err(|_| Error::Failed("restore writers stopped".into())),
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

async fn restore_file(ctx: &Ctx, job: &FileJob) -> Result<()> {
    if let Some(parent) = job.path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // Write beside the destination and rename when complete and verified, so a
    // failed file never leaves a truncated copy (or destroys an older one) under its name.
    let tmp = partial_name(&job.path);
    let result = write_verified(ctx, job, &tmp).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let written = result?;
    if std::fs::symlink_metadata(&job.path).is_ok_and(|m| m.is_dir()) {
        let _ = std::fs::remove_dir_all(&job.path);
    }
    std::fs::rename(&tmp, &job.path).map_err(|e| Error::io(&job.path, e))?;
    ctx.files.fetch_add(1, Ordering::Relaxed);
    ctx.bytes.fetch_add(written, Ordering::Relaxed);
    apply_meta(ctx, &job.path, &job.node, false);
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

/// Write the file's content to `tmp`, checking blobs and the whole-file digest.
async fn write_verified(ctx: &Ctx, job: &FileJob, tmp: &Path) -> Result<u64> {
    let file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = ctx.repo.keys().digest_hasher();
    let mut written = 0u64;
    let mut blobs = futures::stream::iter(job.node.content.iter().copied())
        .map(|id| async move { ctx.repo.read_blob(&ctx.index, BlobType::Data, &id).await })
        .buffered(BLOB_PREFETCH);
    while let Some(blob) = blobs.next().await {
        let data = blob?;
        hasher.update(&data);
        out.write_all(&data).map_err(|e| Error::io(tmp, e))?;
        written += data.len() as u64;
    }
    out.flush().map_err(|e| Error::io(tmp, e))?;
    drop(out);
    if let Some(expected) = job.node.digest {
        if Id(*hasher.finalize().as_bytes()) != expected {
            return Err(Error::corrupt(
                format!("file {}", job.rel),
                "restored content does not match the digest recorded at backup",
            ));
        }
    }
    Ok(written)
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
