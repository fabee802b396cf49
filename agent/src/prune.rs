//! `prune`: remove data no snapshot references, safely while backups run.
//!
//! Two phases (FORMAT.md, "Prune"):
//! 1. **Mark.** Walk every snapshot to find the blobs in use. Packs with no
//!    used blob are doomed; packs whose unused share reaches the repack
//!    threshold have their used blobs copied into new packs first and are
//!    then doomed too. Index objects that describe a doomed pack are replaced
//!    by new index objects listing their surviving packs. A `marks/<id>`
//!    object records the doomed packs and the replaced index objects. Nothing
//!    is deleted yet: readers and running backups still see everything.
//! 2. **Sweep**, on a later run: a mark older than the grace period
//!    (default 24 h, measured by the store's clock: Last-Modified of the mark
//!    against Last-Modified of a probe object written now) is carried out —
//!    after checking again, against the snapshots that exist now, that no
//!    used blob would lose its last copy. If one would, the mark is dropped
//!    and its packs stay (the next prune reconsiders them).
//!
//! A backup that commits while a mark is pending stores again every blob it
//! references whose only copy is in a doomed pack (see
//! `pipeline::Session::commit`), so it never depends on a doomed pack. Any
//! backup must finish within the grace period.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{Index, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::pipeline::{Progress, Session};
use crate::repo::Repository;
use crate::snapshot::SnapshotEntry;
use crate::target::{LockedObject, Purge, TargetRef};
use crate::tree::{parse_tree, TreeDoc};

/// The sealed document of a `marks/<id>` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    /// When prune wrote it (client clock; informational — the grace period
    /// uses the store's Last-Modified).
    pub created: chrono::DateTime<chrono::Utc>,
    /// Packs to delete.
    pub packs: Vec<Id>,
    /// Index objects to delete (replaced by new ones that omit the doomed packs).
    pub index: Vec<Id>,
}

/// Prune settings.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// How long a mark waits before it is carried out.
    pub grace: Duration,
    /// Repack a pack when at least this share (0..=1) of its bytes is unused.
    pub repack_threshold: f64,
    /// Report only.
    pub dry_run: bool,
    /// Blobs that must not outlive their last reference (an erasure's;
    /// every erasure's and retention disposal's are added by prune itself):
    /// a pack holding one unused is repacked whatever the threshold.
    pub purge_blobs: HashSet<Id>,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(24 * 3600),
            repack_threshold: 0.5,
            purge_blobs: HashSet::new(),
            dry_run: false,
        }
    }
}

/// What prune did (or would do).
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub snapshots: usize,
    pub packs: usize,
    pub used_blobs: usize,
    pub unused_blobs: usize,
    pub unused_bytes: u64,
    /// Packs marked now: wholly unused.
    pub packs_marked: usize,
    /// Packs repacked now (used blobs copied, then marked).
    pub packs_repacked: usize,
    /// Packs already marked by an earlier run, waiting for the grace period.
    pub packs_pending: usize,
    /// Packs and index objects deleted now (ripe marks).
    pub packs_deleted: usize,
    pub index_deleted: usize,
    pub bytes_freed: u64,
    /// Marks dropped because a snapshot made meanwhile still needs their data.
    pub marks_dropped: usize,
    /// Ripe marks kept because an Object Lock still protects some of their objects.
    pub marks_locked: usize,
    /// `customers/` objects (customer index) no snapshot names any more, deleted.
    pub customer_objects_deleted: usize,
    /// The locked objects of those marks, with their retain-until (nothing of
    /// such a mark is deleted; a later prune deletes it once the locks ran out).
    pub locked: Vec<LockedObject>,
    pub errors: Vec<String>,
}

/// Pack ids named by every pending mark (union across targets).
pub async fn marked_packs(repo: &Repository) -> Result<HashSet<Id>> {
    let mut out = HashSet::new();
    for (_, mark) in load_marks(repo).await? {
        out.extend(mark.packs);
    }
    Ok(out)
}

pub(crate) async fn load_marks(repo: &Repository) -> Result<Vec<(Id, Mark)>> {
    let mut out = Vec::new();
    for id in repo.list_ids(ObjectKind::Mark).await? {
        match repo.load_object::<Mark>(ObjectKind::Mark, &id).await {
            Ok(m) => out.push((id, m)),
            Err(e) => tracing::warn!(mark = %id, error = %e, "unreadable mark ignored"),
        }
    }
    Ok(out)
}

/// The current snapshots; listed before the index is loaded, because a
/// backup writes its index object before its snapshot: every snapshot seen
/// here then has its index objects in the later listing.
async fn current_snapshots(repo: &Repository) -> Result<Vec<SnapshotEntry>> {
    let (snapshots, warnings) = repo.snapshots().await?;
    if !warnings.is_empty() {
        // A snapshot we cannot read might reference anything: do not guess.
        return Err(Error::Failed(format!(
            "prune refuses to run while a snapshot is unreadable: {}",
            warnings.join("; ")
        )));
    }
    Ok(snapshots)
}

/// Every blob reachable from `snapshots` (data and tree).
pub(crate) async fn used_blobs(
    repo: &Repository,
    index: &Index,
    snapshots: &[SnapshotEntry],
) -> Result<(HashSet<Id>, usize)> {
    let mut used = HashSet::new();
    let mut stack: Vec<Id> = snapshots.iter().map(|s| s.snapshot.tree).collect();
    while let Some(t) = stack.pop() {
        if !used.insert(t) {
            continue;
        }
        let plain = repo.read_blob(index, BlobType::Tree, &t).await?;
        match parse_tree(&t, &plain)? {
            TreeDoc::Split { parts } => stack.extend(parts.iter().map(|p| p.tree)),
            TreeDoc::Leaf { nodes } => {
                for n in nodes {
                    used.extend(n.content.iter().copied());
                    stack.extend(n.subtree);
                }
            }
        }
    }
    Ok((used, snapshots.len()))
}

/// The store's current time on `t`: Last-Modified of a probe object written now.
async fn store_now(t: &TargetRef) -> Result<chrono::DateTime<chrono::Utc>> {
    let name = format!("probes/{}", Id(rand::random()));
    t.put_new(&name, Bytes::from_static(b"custos clock probe"))
        .await?;
    let listed = t.list("probes/").await;
    let _ = t.purge(&name).await;
    listed?
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.modified)
        .ok_or_else(|| Error::Failed(format!("target {}: probe object not listed", t.name())))
}

/// Run prune: sweep ripe marks, then mark what is unused now.
pub async fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    repo.require(crate::crypto::Role::Admin, "prune")?;
    let mut report = PruneReport::default();
    sweep(repo, opts, &mut report).await?;
    mark(repo, opts, &mut report).await?;
    if !opts.dry_run {
        sweep_customer_objects(repo, opts, &mut report).await?;
    }
    Ok(report)
}

/// Delete `customers/` objects no snapshot names any more (customer index
/// documents of forgotten or rewritten snapshots and the parts only they
/// used) once older than the grace period by the store's clock: a running
/// backup writes its index objects before its snapshot.
async fn sweep_customer_objects(
    repo: &Repository,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<()> {
    let snapshots = current_snapshots(repo).await?;
    let mut keep: HashSet<Id> = HashSet::new();
    for s in &snapshots {
        let Some(doc) = s.snapshot.customer_index else {
            continue;
        };
        keep.insert(doc);
        // An unreadable index document keeps everything: never guess.
        let parts = crate::customer::index_parts(repo, Some(doc)).await?;
        keep.extend(parts.into_values());
    }
    let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::Duration::MAX);
    let folder = format!("{}/", ObjectKind::Customer.folder());
    for t in repo.targets() {
        let listed = t.list(&folder).await?;
        if listed.is_empty() {
            continue;
        }
        let now = store_now(t).await?;
        for m in listed {
            let Some(id) = m.name.rsplit('/').next().and_then(Id::from_hex) else {
                continue;
            };
            if keep.contains(&id) || now - m.modified < grace {
                continue;
            }
            match t.purge(&m.name).await {
                Ok(crate::target::Purge::Removed) => report.customer_objects_deleted += 1,
                Ok(crate::target::Purge::Locked(until)) => report.locked.push(LockedObject {
                    target: t.name().to_string(),
                    object: m.name.clone(),
                    retain_until: until,
                }),
                Err(e) => report
                    .errors
                    .push(format!("target {}: {}: {e}", t.name(), m.name)),
            }
        }
    }
    Ok(())
}

/// A mark with its object id.
type IdMark = (Id, Mark);

async fn sweep(repo: &Repository, opts: &PruneOptions, report: &mut PruneReport) -> Result<()> {
    let marks = load_marks(repo).await?;
    if marks.is_empty() {
        return Ok(());
    }
    let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::Duration::MAX);
    // Ripe when old enough on every target that holds it, each by its own clock.
    let mut young: HashSet<Id> = HashSet::new();
    let mut listed: HashSet<Id> = HashSet::new();
    for t in repo.targets() {
        let now = store_now(t).await?;
        for m in t.list("marks/").await? {
            if let Some(id) = m.name.rsplit('/').next().and_then(Id::from_hex) {
                listed.insert(id);
                if now - m.modified < grace {
                    young.insert(id);
                }
            }
        }
    }
    let (ripe, pending): (Vec<IdMark>, Vec<IdMark>) = marks
        .into_iter()
        .partition(|(id, _)| listed.contains(id) && !young.contains(id));
    report.packs_pending = pending.iter().map(|(_, m)| m.packs.len()).sum();
    if ripe.is_empty() {
        return Ok(());
    }
    // Check again against the snapshots that exist now.
    let snapshots = current_snapshots(repo).await?;
    let (index, _) = repo.load_index().await?;
    let (used, _) = used_blobs(repo, &index, &snapshots).await?;
    let doomed: HashSet<Id> = ripe
        .iter()
        .flat_map(|(_, m)| m.packs.iter().copied())
        .collect();
    let files = index_files(repo).await?;
    // Where each used blob lives outside the doomed packs.
    let mut alive_copy: HashSet<Id> = HashSet::new();
    let mut in_doomed: HashMap<Id, Vec<Id>> = HashMap::new();
    for (_, f) in &files {
        for p in &f.packs {
            for b in &p.blobs {
                if used.contains(&b.id) {
                    if doomed.contains(&p.id) {
                        in_doomed.entry(p.id).or_default().push(b.id);
                    } else {
                        alive_copy.insert(b.id);
                    }
                }
            }
        }
    }
    let pack_sizes: HashMap<Id, (BlobType, u64)> = index
        .packs()
        .iter()
        .map(|(id, ty, size)| (*id, (*ty, *size)))
        .collect();
    for (mark_id, mark) in ripe {
        let stranded = mark
            .packs
            .iter()
            .flat_map(|p| in_doomed.get(p).into_iter().flatten())
            .any(|b| !alive_copy.contains(b));
        if stranded {
            // A snapshot made since the mark needs data only these packs hold.
            report.marks_dropped += 1;
            if !opts.dry_run {
                delete_everywhere(repo, &ObjectKind::Mark.name(&mark_id), report).await;
            }
            continue;
        }
        let names: Vec<String> = mark
            .index
            .iter()
            .map(|i| ObjectKind::Index.name(i))
            .chain(mark.packs.iter().flat_map(|p| {
                match pack_sizes.get(p) {
                    Some((ty, _)) => vec![crate::pack::pack_object_name(*ty, p)],
                    None => [BlobType::Data, BlobType::Tree]
                        .iter()
                        .map(|ty| crate::pack::pack_object_name(*ty, p))
                        .collect(),
                }
            }))
            .collect();
        let locked = locked_objects(repo, &names, report).await;
        if !locked.is_empty() {
            // Delete nothing of this mark: an index object kept while its packs
            // go would describe missing packs. The mark stays for a later prune.
            report.marks_locked += 1;
            report.locked.extend(locked);
            continue;
        }
        if opts.dry_run {
            report.packs_deleted += mark.packs.len();
            report.index_deleted += mark.index.len();
            continue;
        }
        // Index objects first (a pack without index is harmless), then packs, then the mark.
        // Counted only when gone from every target (a refused delete is an error, not freed).
        for i in &mark.index {
            if delete_everywhere(repo, &ObjectKind::Index.name(i), report).await {
                report.index_deleted += 1;
            }
        }
        for p in &mark.packs {
            let Some((ty, size)) = pack_sizes.get(p).copied() else {
                // Already gone from every index: delete both possible names.
                let mut gone = true;
                for ty in [BlobType::Data, BlobType::Tree] {
                    gone &= delete_everywhere(repo, &crate::pack::pack_object_name(ty, p), report)
                        .await;
                }
                if gone {
                    report.packs_deleted += 1;
                }
                continue;
            };
            if delete_everywhere(repo, &crate::pack::pack_object_name(ty, p), report).await {
                report.packs_deleted += 1;
                report.bytes_freed += size;
            }
        }
        delete_everywhere(repo, &ObjectKind::Mark.name(&mark_id), report).await;
    }
    Ok(())
}

/// Delete an object on every target for good (every version on versioned
/// buckets). True when it is gone from every target.
async fn delete_everywhere(repo: &Repository, object: &str, report: &mut PruneReport) -> bool {
    let mut gone = true;
    for t in repo.targets() {
        match t.purge(object).await {
            Ok(Purge::Removed) => {}
            Ok(Purge::Locked(until)) => {
                gone = false;
                report.locked.push(LockedObject {
                    target: t.name().to_string(),
                    object: object.to_string(),
                    retain_until: until,
                })
            }
            Err(e) => {
                gone = false;
                report.errors.push(e.to_string())
            }
        }
    }
    gone
}

/// Which of `objects` a lock still protects on a target with `object_lock`.
async fn locked_objects(
    repo: &Repository,
    objects: &[String],
    report: &mut PruneReport,
) -> Vec<LockedObject> {
    let now = chrono::Utc::now();
    let mut out = Vec::new();
    for t in repo.targets().iter().filter(|t| t.object_lock().is_some()) {
        for o in objects {
            match t.locked_until(o).await {
                Ok(Some(until)) if until > now => out.push(LockedObject {
                    target: t.name().to_string(),
                    object: o.clone(),
                    retain_until: until,
                }),
                Ok(_) => {}
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    out
}

pub(crate) async fn index_files(repo: &Repository) -> Result<Vec<(Id, IndexFile)>> {
    let mut out = Vec::new();
    for id in repo.list_ids(ObjectKind::Index).await? {
        let f: IndexFile = repo.load_object(ObjectKind::Index, &id).await?;
        out.push((id, f));
    }
    Ok(out)
}

async fn mark(repo: &Repository, opts: &PruneOptions, report: &mut PruneReport) -> Result<()> {
    let pending = marked_packs(repo).await?;
    let snapshots = current_snapshots(repo).await?;
    let files = index_files(repo).await?;
    let index = Index::from_files(files.iter().map(|(_, f)| f));
    let (used, snapshots) = used_blobs(repo, &index, &snapshots).await?;
    report.snapshots = snapshots;
    report.packs = index.packs().len();
    report.used_blobs = used.len();
    // Blobs of erased records (every erasure so far, and this run's own).
    let mut purge_blobs = opts.purge_blobs.clone();
    for (_, e) in crate::rights::erasure_log(repo).await? {
        purge_blobs.extend(e.blobs);
    }
    // And of records retention disposed of.
    for (_, d) in crate::disposal::disposal_log(repo).await? {
        purge_blobs.extend(d.blobs);
    }

    // Decide per pack (first description of each pack wins).
    let mut seen_packs = HashSet::new();
    let mut doom: HashSet<Id> = HashSet::new();
    let mut repack: Vec<IndexPack> = Vec::new();
    // A used blob copied in more than one pack needs only one surviving copy.
    let mut kept_copy: HashSet<Id> = HashSet::new();
    let mut decisions: Vec<&IndexPack> = Vec::new();
    for (_, f) in &files {
        for p in &f.packs {
            if pending.contains(&p.id) || !seen_packs.insert(p.id) {
                continue;
            }
            decisions.push(p);
        }
    }
    // Keep the packs with the most used bytes first, so duplicates land in doomed packs.
    decisions.sort_by_key(|p| {
        std::cmp::Reverse(
            p.blobs
                .iter()
                .filter(|b| used.contains(&b.id))
                .map(|b| u64::from(b.length))
                .sum::<u64>(),
        )
    });
    for p in decisions {
        let total: u64 = p.blobs.iter().map(|b| u64::from(b.length)).sum();
        let needed: Vec<_> = p
            .blobs
            .iter()
            .filter(|b| used.contains(&b.id) && !kept_copy.contains(&b.id))
            .collect();
        let needed_bytes: u64 = needed.iter().map(|b| u64::from(b.length)).sum();
        let unused = total.saturating_sub(needed_bytes);
        report.unused_blobs += p.blobs.len() - needed.len();
        report.unused_bytes += unused;
        if needed.is_empty() {
            doom.insert(p.id);
        } else if (total > 0 && unused as f64 / total as f64 >= opts.repack_threshold)
            || p.blobs
                .iter()
                .any(|b| purge_blobs.contains(&b.id) && !used.contains(&b.id))
        {
            repack.push(p.clone());
        } else {
            kept_copy.extend(needed.iter().map(|b| b.id));
        }
    }
    report.packs_marked = doom.len();
    report.packs_repacked = repack.len();
    if opts.dry_run || (doom.is_empty() && repack.is_empty()) {
        return Ok(());
    }

    // Repack: copy the needed blobs into new packs (a session without snapshot).
    let mut new_index_ids = Vec::new();
    if !repack.is_empty() {
        let mut session = Session::start(repo, Arc::new(Progress::default())).await?;
        let saver = session.saver();
        let to_copy: Vec<(BlobType, Id)> = repack
            .iter()
            .flat_map(|p| {
                p.blobs
                    .iter()
                    .filter(|b| used.contains(&b.id) && !kept_copy.contains(&b.id))
                    .map(move |b| (p.ty, b.id))
            })
            .collect();
        saver.forget_known(to_copy.iter().map(|(_, id)| *id));
        for (ty, id) in &to_copy {
            let data = repo.read_blob(&index, *ty, id).await?;
            let s = saver.clone();
            let ty = *ty;
            tokio::task::spawn_blocking(move || s.save(ty, &data))
                .await
                .map_err(|e| Error::Failed(format!("repack task panicked: {e}")))??;
        }
        drop(saver);
        session.finish(None).await?;
        let fin = session.finished().expect("finished");
        if !fin.lagging.is_empty() {
            return Err(Error::Failed(format!(
                "repack could not be stored on every target ({}); nothing marked",
                fin.lagging
                    .iter()
                    .map(|(t, e)| format!("{t}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        new_index_ids.extend(fin.index_id);
        doom.extend(repack.iter().map(|p| p.id));
    }

    // Replace every index object that mentions a doomed pack. The replacement
    // also leaves out packs of earlier pending marks: those will be deleted,
    // and an index object written now is not on those marks' lists.
    let mut replaced = Vec::new();
    for (id, f) in &files {
        if !f.packs.iter().any(|p| doom.contains(&p.id)) {
            continue;
        }
        let survivors = IndexFile {
            packs: f
                .packs
                .iter()
                .filter(|p| !doom.contains(&p.id) && !pending.contains(&p.id))
                .cloned()
                .collect(),
        };
        if !survivors.packs.is_empty() {
            let (nid, results) = repo
                .save_object(repo.targets(), ObjectKind::Index, &survivors)
                .await;
            for r in results {
                r?;
            }
            new_index_ids.push(nid);
        }
        replaced.push(*id);
    }
    let mark = Mark {
        created: chrono::Utc::now(),
        packs: doom.into_iter().collect(),
        index: replaced,
    };
    let (_, results) = repo
        .save_object(repo.targets(), ObjectKind::Mark, &mark)
        .await;
    for r in results {
        r?;
    }
    tracing::info!(
        packs = mark.packs.len(),
        index = mark.index.len(),
        new_index = new_index_ids.len(),
        "prune marked data for deletion after the grace period"
    );
    Ok(())
}
