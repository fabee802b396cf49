//! `check`: verify the repository on one target.
//!
//! Structure (always): every index object opens; every pack an index names
//! exists with the indexed size; every snapshot opens; every tree reachable
//! from a snapshot opens and every blob it references is indexed.
//! Data (`--read-data`, or a random subset of packs): every pack's bytes hash
//! to its name, its header authenticates and matches the index, and every
//! blob in it decrypts and hashes to its id. Each problem names the object.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use rand::seq::SliceRandom;

use crate::blob::{self, BlobType};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pack::{parse_pack_name, read_header};
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::tree::NodeKind;

/// How much pack data to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReadData {
    /// Structure only.
    None,
    /// Every pack.
    All,
    /// A random share of packs, in percent (0 < p ≤ 100).
    Subset(f64),
}

/// Result of checking one target.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    pub target: String,
    pub snapshots: usize,
    pub index_objects: usize,
    pub packs: usize,
    pub blobs: usize,
    pub packs_read: usize,
    /// Problems: the repository is damaged.
    pub errors: Vec<String>,
    /// Oddities that do not lose data (unreferenced packs …).
    pub warnings: Vec<String>,
}

/// Pack-reading counters a progress display polls (totals set once the packs
/// to read are chosen).
#[derive(Debug, Default)]
pub struct CheckProgress {
    pub packs_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub packs_read: AtomicU64,
    pub bytes_read: AtomicU64,
}

/// Check the repository on `repo`'s single target.
pub async fn check(repo: &Repository, read: ReadData) -> Result<CheckReport> {
    check_with_progress(repo, read, None).await
}

/// [`check`], counting packs read into `progress`.
pub async fn check_with_progress(
    repo: &Repository,
    read: ReadData,
    progress: Option<Arc<CheckProgress>>,
) -> Result<CheckReport> {
    if !matches!(read, ReadData::None) {
        repo.require(crate::crypto::Role::Restore, "check --read-data")?;
    }
    let target = repo.primary()?.clone();
    let mut report = CheckReport {
        target: target.name().to_string(),
        ..Default::default()
    };

    // Snapshots are listed before the index objects: a backup running meanwhile
    // writes its index object before its snapshot, so every snapshot seen here
    // has its index object in the listing below.
    let snapshot_ids = repo.list_ids(ObjectKind::Snapshot).await?;

    // Index objects, one by one so each failure is named.
    let mut index = crate::index::IndexBuilder::default();
    let mut indexed: HashMap<Id, IndexPack> = HashMap::new();
    for id in repo.list_ids(ObjectKind::Index).await? {
        report.index_objects += 1;
        match repo.load_object::<IndexFile>(ObjectKind::Index, &id).await {
            Ok(file) => {
                index.add_file(&file);
                for p in file.packs {
                    indexed.entry(p.id).or_insert(p);
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    let index = index.build();
    report.blobs = index.blob_count();

    // Packs present vs. packs indexed.
    let mut present: HashMap<Id, (String, u64)> = HashMap::new();
    for prefix in ["data/", "tree/"] {
        for m in target.list(prefix).await? {
            match parse_pack_name(&m.name) {
                Some((_, id)) => {
                    present.insert(id, (m.name, m.size));
                }
                None => report
                    .warnings
                    .push(format!("unexpected object {} (not a pack name)", m.name)),
            }
        }
    }
    report.packs = present.len();
    for (id, p) in &indexed {
        match present.get(id) {
            None => report
                .errors
                .push(format!("pack {} is indexed but missing", p.object_name())),
            Some((_, size)) if *size != p.size => report.errors.push(format!(
                "pack {} has {size} bytes, the index says {}",
                p.object_name(),
                p.size
            )),
            _ => {}
        }
    }
    for (id, (name, _)) in &present {
        if !indexed.contains_key(id) {
            report.warnings.push(format!(
                "pack {name} is not indexed (left by an interrupted backup; harmless, prune removes it)"
            ));
        }
    }

    check_data_keys(repo, &target, &mut report).await?;

    // Snapshots and the trees they reach, each tree pack read once
    // (target/memo.rs) instead of one ranged read per tree.
    let walk = repo.with_targets(vec![crate::target::memo::Memo::wrap(
        target.clone(),
        TREE_MEMO_BUDGET,
    )]);
    let index = Arc::new(index);
    let mut seen_trees: HashSet<Id> = HashSet::new();
    let mut seen_parts: HashSet<Id> = HashSet::new();
    for id in snapshot_ids {
        report.snapshots += 1;
        match walk
            .load_object::<Snapshot>(ObjectKind::Snapshot, &id)
            .await
        {
            Ok(s) => {
                check_tree(
                    &walk,
                    &index,
                    &id,
                    s.tree,
                    String::new(),
                    &mut seen_trees,
                    &mut report.errors,
                )
                .await;
                check_cursors(&walk, &index, &id, &s, &mut seen_trees, &mut report.errors).await;
                check_customer_index(&walk, &id, &s, &mut seen_parts, &mut report.errors).await;
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    // The held tree packs are not needed for reading pack data.
    drop(walk);

    // Pack data.
    let mut to_read: Vec<&IndexPack> = indexed
        .values()
        .filter(|p| present.contains_key(&p.id))
        .collect();
    to_read.sort_by_key(|p| p.id);
    match read {
        ReadData::None => to_read.clear(),
        ReadData::All => {}
        ReadData::Subset(pct) => {
            let n = ((to_read.len() as f64) * pct / 100.0).ceil() as usize;
            to_read.shuffle(&mut rand::thread_rng());
            to_read.truncate(n.min(to_read.len()));
        }
    }
    report.packs_read = to_read.len();
    if let Some(p) = &progress {
        p.packs_total.store(to_read.len() as u64, Ordering::Relaxed);
        p.bytes_total
            .store(to_read.iter().map(|p| p.size).sum(), Ordering::Relaxed);
    }
    let keys = repo.keys_arc();
    let results: Vec<Vec<String>> = futures::stream::iter(to_read)
        .map(|p| {
            let (target, keys, p) = (target.clone(), keys.clone(), p.clone());
            let progress = progress.clone();
            async move {
                let name = p.object_name();
                let size = p.size;
                let done = move || {
                    if let Some(pr) = &progress {
                        pr.packs_read.fetch_add(1, Ordering::Relaxed);
                        pr.bytes_read.fetch_add(size, Ordering::Relaxed);
                    }
                };
                let _counted = Finally(Some(done));
                match target.get(&name).await {
                    Ok(bytes) => {
                        if let Err(e) = load_data_keys(repo, &p, &bytes).await {
                            return vec![format!("pack {name}: {e}")];
                        }
                        tokio::task::spawn_blocking(move || verify_pack(&keys, &p, &bytes))
                            .await
                            .unwrap_or_else(|e| {
                                vec![format!("pack {name}: verifier panicked: {e}")]
                            })
                    }
                    Err(e) => vec![e.to_string()],
                }
            }
        })
        .buffer_unordered(crate::target::pack_read_concurrency(target.as_ref()))
        .collect()
        .await;
    report.errors.extend(results.into_iter().flatten());
    Ok(report)
}

/// Bytes of tree packs held in memory during the tree walk.
const TREE_MEMO_BUDGET: u64 = 64 << 20;

/// Runs its closure when dropped (counts a pack however its check ended).
struct Finally<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Finally<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// A snapshot's cursors stored in blobs: every blob indexed and readable,
/// and together one JSON cursor (a backup key can check this too).
async fn check_cursors(
    repo: &Repository,
    index: &Index,
    snap: &Id,
    s: &Snapshot,
    seen: &mut HashSet<Id>,
    errors: &mut Vec<String>,
) {
    for (coll, c) in &s.cursors {
        if c.cursor_blobs.is_empty() {
            continue;
        }
        let missing: Vec<String> = c
            .cursor_blobs
            .iter()
            .filter(|b| !index.contains(b))
            .map(|b| b.to_hex())
            .collect();
        if !missing.is_empty() {
            errors.push(format!(
                "snapshot {} collection {coll}: cursor blob(s) {} not in any index",
                snap.short(),
                missing.join(", ")
            ));
            continue;
        }
        // Shared blobs were read with an earlier snapshot's cursor.
        if c.cursor_blobs.iter().all(|b| seen.contains(b)) {
            continue;
        }
        match repo.load_cursor(index, c).await {
            Ok(_) => seen.extend(c.cursor_blobs.iter().copied()),
            Err(e) => errors.push(format!(
                "snapshot {} collection {coll}: cursor: {e}",
                snap.short()
            )),
        }
    }
}

fn check_tree<'a>(
    repo: &'a Repository,
    index: &'a Arc<Index>,
    snap: &'a Id,
    tree: Id,
    path: String,
    seen: &'a mut HashSet<Id>,
    errors: &'a mut Vec<String>,
) -> futures::future::BoxFuture<'a, ()> {
    Box::pin(async move {
        if !seen.insert(tree) {
            return;
        }
        let shown = if path.is_empty() {
            "/".to_string()
        } else {
            path.clone()
        };
        let nodes = match repo.load_tree(index, &tree).await {
            Ok(n) => n,
            Err(e) => {
                errors.push(format!(
                    "snapshot {} path {shown}: tree {tree}: {e}",
                    snap.short()
                ));
                return;
            }
        };
        for n in nodes {
            let child = format!("{path}/{}", n.name);
            for id in &n.content {
                if !index.contains(id) {
                    errors.push(format!(
                        "snapshot {} path {child}: data blob {id} is not in any index",
                        snap.short()
                    ));
                }
            }
            if n.kind == NodeKind::Dir {
                if let Some(sub) = n.subtree {
                    check_tree(repo, index, snap, sub, child, seen, errors).await;
                }
            }
        }
    })
}

/// Every `datakeys/` object (format 2) is well formed and, for keys that can
/// read content, unwraps; a damaged one would make content unreadable, so it
/// is an error even without `--read-data`.
async fn check_data_keys(
    repo: &Repository,
    target: &crate::target::TargetRef,
    report: &mut CheckReport,
) -> Result<()> {
    if !repo.keys().wraps_data_keys() {
        return Ok(());
    }
    for m in target.list("datakeys/").await? {
        let Some(id) = crate::crypto::parse_data_key_object(&m.name) else {
            report.warnings.push(format!(
                "unexpected object {} (not a data key name)",
                m.name
            ));
            continue;
        };
        if !repo.role().reads_content() {
            if m.size != crate::crypto::WRAPPED_DATA_KEY_LEN as u64 {
                report.errors.push(format!(
                    "object {} is damaged: {} bytes, a wrapped data key has {}",
                    m.name,
                    m.size,
                    crate::crypto::WRAPPED_DATA_KEY_LEN
                ));
            }
            continue;
        }
        match target.get(&m.name).await {
            Ok(bytes) => {
                if let Err(reason) = repo.keys().load_data_key(&id, &bytes) {
                    report
                        .errors
                        .push(Error::corrupt(&m.name, reason).to_string());
                }
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
    Ok(())
}

/// Unwrap the data keys a data pack's blobs name (format 2), from this
/// check's targets: a missing or damaged `datakeys/` object is an error.
async fn load_data_keys(repo: &Repository, p: &IndexPack, bytes: &[u8]) -> Result<()> {
    if p.ty != BlobType::Data || !repo.keys().wraps_data_keys() {
        return Ok(());
    }
    let slices = p.blobs.iter().filter_map(|b| {
        let start = b.offset as usize;
        bytes.get(start..start + b.length as usize)
    });
    repo.ensure_data_keys(slices).await
}

/// Verify one downloaded pack against its index entry; returns the problems.
fn verify_pack(keys: &crate::crypto::Keys, p: &IndexPack, bytes: &[u8]) -> Vec<String> {
    let name = p.object_name();
    if Id::of_object(bytes) != p.id {
        return vec![Error::corrupt(&name, "bytes do not hash to the pack name").to_string()];
    }
    let entries = match read_header(keys, &name, bytes) {
        Ok(e) => e,
        Err(e) => return vec![e.to_string()],
    };
    let mut errors = Vec::new();
    let header: HashSet<(Id, u32, u32)> =
        entries.iter().map(|e| (e.id, e.offset, e.length)).collect();
    for b in &p.blobs {
        if !header.contains(&(b.id, b.offset, b.length)) {
            errors.push(format!(
                "pack {name}: blob {} is indexed but not in the pack header",
                b.id
            ));
        }
    }
    for e in &entries {
        if e.ty != p.ty {
            errors.push(format!(
                "pack {name}: blob {} has type {:?} in a {:?} pack",
                e.id, e.ty, p.ty
            ));
            continue;
        }
        let sealed = &bytes[e.offset as usize..(e.offset + e.length) as usize];
        if let Err(err) = blob::decode(keys, e.ty, &e.id, sealed) {
            errors.push(format!("pack {name}: {err}"));
        }
    }
    errors
}

/// A record snapshot's customer index: the document and every part it names
/// are readable and describe the partitions they claim.
async fn check_customer_index(
    repo: &Repository,
    snap_id: &Id,
    snap: &Snapshot,
    seen: &mut HashSet<Id>,
    errors: &mut Vec<String>,
) {
    use crate::customer::CustomerObject;
    let Some(doc) = snap.customer_index else {
        return;
    };
    let parts = match repo
        .load_object::<CustomerObject>(ObjectKind::Customer, &doc)
        .await
    {
        Ok(CustomerObject::Index { parts }) => parts,
        Ok(CustomerObject::Part(_)) => {
            errors.push(format!(
                "snapshot {}: its customer index {} is a part, not an index",
                snap_id.short(),
                doc.short()
            ));
            return;
        }
        Err(e) => {
            errors.push(format!("snapshot {}: customer index: {e}", snap_id.short()));
            return;
        }
    };
    for p in parts {
        if !seen.insert(p.part) {
            continue;
        }
        match repo
            .load_object::<CustomerObject>(ObjectKind::Customer, &p.part)
            .await
        {
            Ok(CustomerObject::Part(d)) if d.tree == p.tree => {}
            Ok(_) => errors.push(format!(
                "snapshot {}: customer index part {} does not describe partition {}/{}",
                snap_id.short(),
                p.part.short(),
                p.collection,
                p.partition
            )),
            Err(e) => errors.push(format!(
                "snapshot {}: customer index part for {}/{}: {e}",
                snap_id.short(),
                p.collection,
                p.partition
            )),
        }
    }
}
