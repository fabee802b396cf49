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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::{key_of, BlobLocation, Index, IndexBuilder, IndexFile};
use crate::object::ObjectKind;
use crate::pipeline::{Progress, Saver, Session};
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
    /// Counters a progress display polls while blobs are repacked.
    pub progress: Option<Arc<PruneProgress>>,
}

/// What a repack has copied so far, of what it will copy (the totals are
/// set once prune knows which blobs to copy; zero before).
#[derive(Debug, Default)]
pub struct PruneProgress {
    pub blobs_copied: AtomicU64,
    pub blobs_total: AtomicU64,
    /// Sealed bytes of the blobs, as stored in their source packs.
    pub bytes_copied: AtomicU64,
    pub bytes_total: AtomicU64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: Duration::from_secs(24 * 3600),
            repack_threshold: 0.5,
            purge_blobs: HashSet::new(),
            dry_run: false,
            progress: None,
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
    /// Staging files a crashed writer left in a local target (`NAME#N`,
    /// older than the grace period) removed, or found in a dry run.
    pub staging_files: usize,
    pub staging_bytes: u64,
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

/// Blobs in use, keyed like the index by the first 16 bytes of their id:
/// 16 bytes per blob (plus the hash table's ~1 byte of control and its load
/// factor) instead of 32. Two ids sharing those 16 bytes would make an unused
/// blob look used, which only keeps data; the index relies on the same
/// 128-bit uniqueness.
#[derive(Debug, Default)]
pub struct UsedBlobs(HashSet<u128>);

impl UsedBlobs {
    /// Whether `id` is in use.
    pub fn contains(&self, id: &Id) -> bool {
        self.0.contains(&key_of(id))
    }

    /// Add `id`; false when it was there already.
    pub fn insert(&mut self, id: &Id) -> bool {
        self.0.insert(key_of(id))
    }

    /// Number of blobs in use.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No blob in use.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Every blob reachable from `snapshots` (data and tree, and the tree blobs
/// holding their cursors).
pub(crate) async fn used_blobs(
    repo: &Repository,
    index: &Index,
    snapshots: &[SnapshotEntry],
) -> Result<(UsedBlobs, usize)> {
    let mut used = UsedBlobs::default();
    for id in snapshots.iter().flat_map(|s| s.snapshot.cursor_blobs()) {
        used.insert(&id);
    }
    let mut stack: Vec<Id> = snapshots.iter().map(|s| s.snapshot.tree).collect();
    while let Some(t) = stack.pop() {
        if !used.insert(&t) {
            continue;
        }
        let plain = repo.read_blob(index, BlobType::Tree, &t).await?;
        match parse_tree(&t, &plain)? {
            TreeDoc::Split { parts } => stack.extend(parts.iter().map(|p| p.tree)),
            TreeDoc::Leaf { nodes } => {
                for n in nodes {
                    for b in &n.content {
                        used.insert(b);
                    }
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
    sweep_staging(repo, opts, &mut report).await;
    Ok(report)
}

/// The youngest staging file prune removes, whatever its grace period: a
/// live writer fills and publishes one in seconds, and `--prune-grace 0s`
/// (an erasure's) must not pull a file from under a backup running now.
const STAGING_MIN_AGE: Duration = Duration::from_secs(3600);

/// Remove the staging files writers that died left behind, once older than
/// the grace period (at least [`STAGING_MIN_AGE`]): every backup finishes
/// within it, so no live writer is still filling one. A failure is reported
/// and prune goes on: the files take space but no reader sees them.
async fn sweep_staging(repo: &Repository, opts: &PruneOptions, report: &mut PruneReport) {
    let age = opts.grace.max(STAGING_MIN_AGE);
    for t in repo.targets() {
        match t.sweep_staging(age, opts.dry_run).await {
            Ok(found) => {
                for f in &found {
                    tracing::info!(target = t.name(), file = %f.name, bytes = f.size,
                        dry_run = opts.dry_run, "stale staging file");
                }
                report.staging_files += found.len();
                report.staging_bytes += found.iter().map(|f| f.size).sum::<u64>();
            }
            Err(e) => report.errors.push(e.to_string()),
        }
    }
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
    // Where each used blob lives outside the doomed packs (index objects read
    // one at a time; blobs by their 16-byte index key).
    let mut alive_copy: HashSet<u128> = HashSet::new();
    let mut in_doomed: HashMap<Id, Vec<u128>> = HashMap::new();
    let index_ids = repo.list_ids(ObjectKind::Index).await?;
    for_each_index(repo, &index_ids, |_, f| {
        for p in &f.packs {
            for b in &p.blobs {
                if used.contains(&b.id) {
                    if doomed.contains(&p.id) {
                        in_doomed.entry(p.id).or_default().push(key_of(&b.id));
                    } else {
                        alive_copy.insert(key_of(&b.id));
                    }
                }
            }
        }
    })
    .await?;
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
        // The removal record first: a target that is down now must not get
        // these objects back through sync (crate::removals).
        if let Err(e) = crate::removals::record(repo, "prune", &names).await {
            report.errors.push(e.to_string());
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

/// Ranges read at once while repacking: each is at most a pack (~16 MiB),
/// held until its blobs are saved.
const REPACK_READS_IN_FLIGHT: usize = 3;

/// A blob to copy, where its index places it.
struct ToCopy {
    ty: BlobType,
    id: Id,
    loc: BlobLocation,
    /// Sealed bytes it accounts for in the progress: its own, or its group's
    /// for the first member copied from a group (0 for the others).
    stored: u32,
}

impl crate::pack::Placed for ToCopy {
    fn place(&self) -> (u32, u32) {
        (self.loc.offset, self.loc.length)
    }
}

/// Copy `blobs` into new packs through `saver`, reading each source pack in
/// as few ranges as restore would ([`crate::pack::coalesce`]; usually one),
/// a few in flight, each blob authenticated and its id recomputed as it is
/// decoded. A blob whose range could not be read, or that does not decode,
/// is read again on its own from whichever target has it intact
/// ([`Repository::read_blob`]). (One read per blob made a repack from S3 one
/// request per blob, in turn.)
async fn copy_blobs(
    repo: &Repository,
    index: &Index,
    saver: &Arc<Saver>,
    blobs: Vec<(BlobType, Id)>,
    progress: Option<&PruneProgress>,
) -> Result<()> {
    use futures::StreamExt;
    use std::sync::atomic::Ordering::Relaxed;
    let mut by_pack: BTreeMap<Id, Vec<ToCopy>> = BTreeMap::new();
    let mut groups_counted: HashSet<Id> = HashSet::new();
    for (ty, id) in blobs {
        let loc = index.get(&id).ok_or_else(|| Error::BlobMissing {
            id: id.to_hex(),
            needed_by: "repack".into(),
        })?;
        let first = loc.group.is_none_or(|g| groups_counted.insert(g.id));
        let stored = if first { loc.length } else { 0 };
        if let Some(p) = progress {
            p.blobs_total.fetch_add(1, Relaxed);
            p.bytes_total.fetch_add(u64::from(stored), Relaxed);
        }
        by_pack.entry(loc.pack).or_default().push(ToCopy {
            ty,
            id,
            loc,
            stored,
        });
    }
    let ranges = by_pack.into_values().flat_map(|mut blobs| {
        blobs.sort_unstable_by_key(|b| b.loc.offset);
        crate::pack::coalesce(blobs)
    });
    let reads = futures::stream::iter(ranges.map(|(range, group)| async move {
        let bytes = repo
            .read_range(&group[0].loc.pack_name(), range.clone())
            .await;
        (group, range.start, bytes)
    }))
    .buffered(REPACK_READS_IN_FLIGHT);
    futures::pin_mut!(reads);
    while let Some((group, start, bytes)) = reads.next().await {
        for ToCopy {
            ty,
            id,
            loc,
            stored,
        } in group
        {
            let at = (u64::from(loc.offset) - start) as usize;
            let sealed = bytes
                .as_ref()
                .ok()
                .and_then(|b| b.get(at..at + loc.length as usize));
            // A group's members come one after another: the repository keeps
            // the group decoded for the next one.
            let decoded = match sealed {
                Some(sealed) if loc.ty == ty => repo.decode_located(&loc, &id, sealed).await.ok(),
                _ => None,
            };
            let plain = match decoded {
                Some(p) => p,
                None => repo.read_blob(index, ty, &id).await?,
            };
            let s = saver.clone();
            tokio::task::spawn_blocking(move || s.save(ty, &plain))
                .await
                .map_err(|e| Error::Failed(format!("repack task panicked: {e}")))??;
            if let Some(p) = progress {
                p.blobs_copied.fetch_add(1, Relaxed);
                p.bytes_copied.fetch_add(u64::from(stored), Relaxed);
            }
        }
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

/// Load the index objects `ids` and hand each to `f` in order, a few in
/// flight at a time: only those are held parsed, never all of them.
async fn for_each_index(
    repo: &Repository,
    ids: &[Id],
    mut f: impl FnMut(usize, IndexFile),
) -> Result<()> {
    use futures::StreamExt;
    let loaded = futures::stream::iter(
        ids.iter()
            .map(|id| repo.load_object::<IndexFile>(ObjectKind::Index, id)),
    )
    .buffered(8);
    futures::pin_mut!(loaded);
    let mut at = 0;
    while let Some(file) = loaded.next().await {
        f(at, file?);
        at += 1;
    }
    Ok(())
}

/// What `mark` keeps of one pack while deciding (its blob list is not kept:
/// only the used blobs, by 16-byte key and length: 20 bytes each, as a byte
/// array because a `u128` would align the pair to 32).
struct PackPlan {
    id: Id,
    /// Position in the index object list of the object that describes it first.
    file: usize,
    blobs: usize,
    total: u64,
    used: Vec<([u8; 16], u32)>,
    /// Holds an erased blob no snapshot uses.
    purge: bool,
}

impl PackPlan {
    fn used_bytes(&self) -> u64 {
        self.used.iter().map(|(_, l)| u64::from(*l)).sum()
    }
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
    // Index objects are read one at a time (a few in flight), in passes: the
    // compact index first, then per-pack summaries, then again only those
    // needed to repack or replace; never all parsed at once.
    let index_ids = repo.list_ids(ObjectKind::Index).await?;
    let mut builder = IndexBuilder::default();
    for_each_index(repo, &index_ids, |_, f| builder.add_file(&f)).await?;
    let index = builder.build();
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

    // One plan per pack (its first description wins); which packs each index object lists.
    let mut seen_packs = HashSet::new();
    let mut plans: Vec<PackPlan> = Vec::new();
    let mut file_packs: Vec<Vec<Id>> = Vec::with_capacity(index_ids.len());
    for_each_index(repo, &index_ids, |at, f| {
        file_packs.push(f.packs.iter().map(|p| p.id).collect());
        for p in f.packs {
            if pending.contains(&p.id) || !seen_packs.insert(p.id) {
                continue;
            }
            // Grouped blobs count their share of their group's bytes.
            let shares = p.stored_shares();
            let mut in_use: Vec<([u8; 16], u32)> = p
                .blobs
                .iter()
                .zip(&shares)
                .filter(|(b, _)| used.contains(&b.id))
                .map(|(b, share)| (key_of(&b.id).to_be_bytes(), *share as u32))
                .collect();
            in_use.shrink_to_fit();
            plans.push(PackPlan {
                id: p.id,
                file: at,
                blobs: p.blobs.len(),
                total: shares.iter().sum(),
                used: in_use,
                purge: p
                    .blobs
                    .iter()
                    .any(|b| purge_blobs.contains(&b.id) && !used.contains(&b.id)),
            });
        }
    })
    .await?;
    drop(seen_packs);

    // Decide per pack.
    let mut doom: HashSet<Id> = HashSet::new();
    let mut repack: Vec<&PackPlan> = Vec::new();
    // A used blob copied in more than one pack needs only one surviving copy.
    let mut kept_copy: HashSet<u128> = HashSet::new();
    // Keep the packs with the most used bytes first, so duplicates land in doomed packs.
    plans.sort_by_key(|p| std::cmp::Reverse(p.used_bytes()));
    for p in &plans {
        let needed: Vec<_> = p
            .used
            .iter()
            .filter(|(k, _)| !kept_copy.contains(&u128::from_be_bytes(*k)))
            .collect();
        let needed_bytes: u64 = needed.iter().map(|(_, l)| u64::from(*l)).sum();
        let unused = p.total.saturating_sub(needed_bytes);
        report.unused_blobs += p.blobs - needed.len();
        report.unused_bytes += unused;
        if needed.is_empty() {
            doom.insert(p.id);
        } else if (p.total > 0 && unused as f64 / p.total as f64 >= opts.repack_threshold)
            || p.purge
        {
            repack.push(p);
        } else {
            kept_copy.extend(needed.iter().map(|(k, _)| u128::from_be_bytes(*k)));
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
        // The full ids of the blobs to copy, from the index objects that
        // describe the repacked packs.
        let copy_keys: HashMap<Id, HashSet<u128>> = repack
            .iter()
            .map(|p| {
                let keys = p
                    .used
                    .iter()
                    .map(|(k, _)| u128::from_be_bytes(*k))
                    .filter(|k| !kept_copy.contains(k))
                    .collect();
                (p.id, keys)
            })
            .collect();
        let files: Vec<usize> = repack
            .iter()
            .map(|p| p.file)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let file_ids: Vec<Id> = files.iter().map(|i| index_ids[*i]).collect();
        let mut to_copy: Vec<(BlobType, Id)> = Vec::new();
        let mut taken: HashSet<Id> = HashSet::new();
        for_each_index(repo, &file_ids, |_, f| {
            for p in &f.packs {
                let Some(keys) = copy_keys.get(&p.id) else {
                    continue;
                };
                if !taken.insert(p.id) {
                    continue;
                }
                to_copy.extend(
                    p.blobs
                        .iter()
                        .filter(|b| keys.contains(&key_of(&b.id)))
                        .map(|b| (p.ty, b.id)),
                );
            }
        })
        .await?;
        saver.forget_known(to_copy.iter().map(|(_, id)| *id));
        copy_blobs(repo, &index, &saver, to_copy, opts.progress.as_deref()).await?;
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
        new_index_ids.extend(fin.index_ids.iter().copied());
        doom.extend(repack.iter().map(|p| p.id));
    }

    // Replace every index object that mentions a doomed pack. The replacement
    // also leaves out packs of earlier pending marks: those will be deleted,
    // and an index object written now is not on those marks' lists.
    let mut replaced = Vec::new();
    let to_replace: Vec<Id> = index_ids
        .iter()
        .zip(&file_packs)
        .filter(|(_, packs)| packs.iter().any(|p| doom.contains(p)))
        .map(|(id, _)| *id)
        .collect();
    drop(file_packs);
    for id in &to_replace {
        let f: IndexFile = repo.load_object(ObjectKind::Index, id).await?;
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
