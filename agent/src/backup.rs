//! Backup of directory sources into a snapshot.
//!
//! The walker runs on the blocking pool and recurses with rayon over directory
//! entries; files unchanged since the parent snapshot (size, mtime, ctime,
//! inode and mode equal, all blobs indexed) are carried forward without being
//! read. Content goes through the shared write pipeline ([`crate::pipeline`]).

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
pub use crate::pipeline::Progress;
use crate::pipeline::{ReadError, Saver, Session};
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SnapshotEntry, Summary};
use crate::tree::{Node, NodeKind};

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

#[derive(Default)]
struct FileCounters {
    files_new: AtomicU64,
    files_changed: AtomicU64,
    files_unmodified: AtomicU64,
    dirs: AtomicU64,
    total_bytes: AtomicU64,
}

/// Walks the source and builds tree nodes.
struct Walker {
    saver: Arc<Saver>,
    repo: Repository,
    index: Arc<Index>,
    handle: tokio::runtime::Handle,
    counters: FileCounters,
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
        self.counters.dirs.fetch_add(1, Ordering::Relaxed);
        Ok(node)
    }

    fn write_tree(&self, nodes: Vec<Node>) -> Result<Id> {
        self.saver.save_tree(nodes)
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
        let c = &self.counters;
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
            Ok(f) => self.saver.save_content(f, Some(md.len())),
            Err(e) => Err(ReadError::Source(e.to_string())),
        };
        match read {
            Ok(saved) => {
                node.content = saved.blobs;
                node.digest = Some(saved.digest);
                node.size = saved.size;
                if parent.is_some() {
                    c.files_changed.fetch_add(1, Ordering::Relaxed);
                } else {
                    c.files_new.fetch_add(1, Ordering::Relaxed);
                }
                c.total_bytes.fetch_add(saved.size, Ordering::Relaxed);
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
    let time = chrono::Utc::now();
    let roots = resolve_paths(&opts.paths)?;
    let path_strings: Vec<String> = roots.iter().map(|(p, _)| p.display().to_string()).collect();
    let excludes = Excludes::new(&opts.exclude)?;
    let session = Session::start(repo, progress.clone()).await?;
    let parent = match choose_parent(session.snapshots(), opts, &path_strings) {
        Ok(p) => p.cloned(),
        Err(e) => {
            session.abandon().await;
            return Err(e);
        }
    };
    let walker = Walker {
        saver: session.saver(),
        repo: session.repo().clone(),
        index: session.index().clone(),
        handle: tokio::runtime::Handle::current(),
        counters: FileCounters::default(),
        unreadable: Mutex::default(),
        progress,
        excludes,
    };
    let parent_tree = parent.as_ref().map(|p| p.snapshot.tree);
    let walked = tokio::task::spawn_blocking(move || {
        let parent_root = walker.parent_nodes(parent_tree);
        let tree = roots
            .iter()
            .map(|(path, name)| walker.entry(path, name, parent_root.get(name)))
            .collect::<Result<Vec<Option<Node>>>>()
            .and_then(|nodes| walker.write_tree(nodes.into_iter().flatten().collect()));
        let unreadable = std::mem::take(&mut *walker.unreadable.lock().expect("unreadable lock"));
        tree.map(|tree| (tree, unreadable, walker.counters))
    })
    .await
    .map_err(|e| Error::Failed(format!("backup worker panicked: {e}")));
    let (tree, unreadable, c) = match walked.and_then(|r| r) {
        Ok(v) => v,
        Err(e) => {
            session.abandon().await;
            return Err(e);
        }
    };
    let warnings = session.warnings().to_vec();
    let snapshot = Snapshot {
        customer_index: None,
        time,
        time_zone: opts.time_zone.clone(),
        source: opts.source.clone(),
        paths: path_strings,
        hostname: opts.hostname.clone(),
        username: std::env::var("USER").unwrap_or_default(),
        tags: opts.tags.clone(),
        tree,
        parent: parent.map(|p| p.id),
        summary: Summary {
            files_new: c.files_new.into_inner(),
            files_changed: c.files_changed.into_inner(),
            files_unmodified: c.files_unmodified.into_inner(),
            dirs: c.dirs.into_inner(),
            total_bytes: c.total_bytes.into_inner(),
            unreadable: unreadable.len() as u64,
            ..Summary::default()
        },
        program: format!("custos {}", env!("CARGO_PKG_VERSION")),
        source_type: Some("directory".into()),
        cursors: Default::default(),
    };
    let mut snapshot = snapshot;
    let s = &mut snapshot.summary;
    s.total_files = s.files_new + s.files_changed + s.files_unmodified;
    let done = session.commit(snapshot).await?;
    Ok(BackupReport {
        id: done.id,
        snapshot: done.snapshot,
        committed: done.committed,
        lagging: done.lagging,
        unreadable,
        warnings,
    })
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
