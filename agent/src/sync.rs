//! `sync`: make every target hold every object that any target holds.
//!
//! Objects are immutable and named by the hash of their bytes, so copying is
//! safe at any time, even while backups run: a copy is verified against its
//! name before it is written, and a create-only write of an object that
//! appeared meanwhile is a no-op. Order per target: keys, data packs, tree
//! packs, index objects, snapshots newest first — so a target never holds an
//! index object whose packs it lacks, nor a snapshot whose index it lacks. A
//! target whose copy fails stops there (it stays consistent, just behind).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;

use crate::error::Result;
use crate::id::Id;
use crate::index::{IndexBuilder, IndexFile, IndexPack};
use crate::object::ObjectKind;
use crate::repo::Reached;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::target::{LockedObject, Purge, TargetRef};

/// Folders that replicate, in copy order.
const FOLDERS: [&str; 15] = [
    "keys/",
    // Before data/: a data pack is never on a target without its data key.
    "datakeys/",
    "data/",
    "tree/",
    "index/",
    // Before snapshots: a snapshot names its customer index.
    "customers/",
    "snapshots/",
    "marks/",
    "verifications/",
    "holds/",
    "disposals/",
    "suppressions/",
    "erasures/",
    "audit/",
    "removals/",
];
/// Folders compared by the quick check: when they agree, the packs do too
/// (an index object is only ever written after its packs).
const QUICK: [&str; 13] = [
    "keys/",
    "datakeys/",
    "index/",
    "customers/",
    "snapshots/",
    "marks/",
    "verifications/",
    "holds/",
    "disposals/",
    "suppressions/",
    "erasures/",
    "audit/",
    "removals/",
];
/// Objects copied concurrently per target.
const COPY_CONCURRENCY: usize = 4;

/// What a sync did per target.
#[derive(Debug, Default, serde::Serialize)]
pub struct SyncReport {
    /// (target, objects copied, bytes copied) for every target that received objects.
    pub copied: Vec<(String, usize, u64)>,
    /// (target, error) for every target that could not be brought up to date.
    pub failed: Vec<(String, String)>,
    /// (target, objects deleted): removed objects (removal records, superseded
    /// snapshots) a target still held.
    pub deleted: Vec<(String, usize)>,
    /// Removed objects an Object Lock keeps on a target.
    pub locked: Vec<LockedObject>,
    /// (target, error) for removed objects that could not be deleted.
    pub delete_failed: Vec<(String, String)>,
    /// Problems that did not stop the sync (unreadable removal records, …).
    pub warnings: Vec<String>,
}

impl SyncReport {
    /// Was `target` left behind?
    pub fn failed_target(&self, target: &str) -> bool {
        self.failed.iter().any(|(t, _)| t == target)
    }
}

type Listing = BTreeSet<String>;

async fn list_folders(t: &TargetRef, folders: &[&str]) -> Result<Listing> {
    let mut names = Listing::new();
    for f in folders {
        names.extend(t.list(f).await?.into_iter().map(|m| m.name));
    }
    Ok(names)
}

/// The hash id at the end of an object name.
fn name_id(name: &str) -> Option<Id> {
    // `audit/<seq>-<hash>`: the hash follows the sequence number.
    let last = name.rsplit('/').next()?;
    Id::from_hex(last.rsplit('-').next()?)
}

/// Copy what is missing where, and delete what was removed. With `quick`,
/// targets whose key, index and snapshot listings already agree are not
/// listed further.
pub async fn sync(repo: &Repository, quick: bool) -> Result<SyncReport> {
    sync_with_progress(repo, quick, None).await
}

/// Objects copied so far, of the objects found missing (totals grow as
/// each target's plan is made), and their bytes.
#[derive(Debug, Default)]
pub struct SyncProgress {
    pub objects_copied: AtomicU64,
    pub objects_total: AtomicU64,
    pub bytes_copied: AtomicU64,
}

/// [`sync`], counting into `progress` for a display to poll.
pub async fn sync_with_progress(
    repo: &Repository,
    quick: bool,
    progress: Option<Arc<SyncProgress>>,
) -> Result<SyncReport> {
    let targets = repo.targets();
    let mut report = SyncReport::default();
    if targets.len() < 2 {
        return Ok(report);
    }
    let folders: &[&str] = if quick { &QUICK } else { &FOLDERS };
    let mut listings: Vec<Option<Listing>> = Vec::new();
    for t in targets {
        match list_folders(t, folders).await {
            Ok(l) => listings.push(Some(l)),
            Err(e) => {
                report.failed.push((t.name().to_string(), e.to_string()));
                listings.push(None);
            }
        }
    }
    let ok: Vec<&Listing> = listings.iter().flatten().collect();
    if quick && ok.windows(2).all(|w| w[0] == w[1]) {
        return Ok(report);
    }
    if quick {
        // Something differs: list everything (packs too) on the reachable targets.
        for (t, l) in targets.iter().zip(listings.iter_mut()) {
            if l.is_some() {
                match list_folders(t, &FOLDERS).await {
                    Ok(full) => *l = Some(full),
                    Err(e) => {
                        report.failed.push((t.name().to_string(), e.to_string()));
                        *l = None;
                    }
                }
            }
        }
    }
    // Who holds what.
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, l) in listings.iter().enumerate() {
        for name in l.iter().flatten() {
            holders.entry(name.clone()).or_default().push(i);
        }
    }
    // What forget, prune, erasures and retention removed stays removed.
    let (removed, warnings) = crate::removals::removed(repo).await?;
    for w in warnings {
        tracing::warn!(error = %w, "unreadable removal record");
        report.warnings.push(w);
    }
    let reachable = listings.iter().flatten().count();
    let plan = plan(repo, &holders, &removed, reachable).await;
    report.warnings.extend(plan.warnings.iter().cloned());
    for (i, t) in targets.iter().enumerate() {
        let Some(have) = &listings[i] else { continue };
        // Deletions first: a removed snapshot must not outlive the others' copy.
        // Only with an admin key: backup and restore keys (and their storage
        // identities) never delete; they just do not copy removed objects.
        let doomed: Vec<&String> = have
            .iter()
            .filter(|n| removed.contains(*n) && !plan.exempt.contains(*n))
            .collect();
        if !doomed.is_empty() && repo.role() != crate::crypto::Role::Admin {
            report.warnings.push(format!(
                "target {} still holds {} removed object(s); a sync with an admin key deletes them",
                t.name(),
                doomed.len()
            ));
        }
        let mut deleted = 0usize;
        for name in doomed
            .into_iter()
            .filter(|_| repo.role() == crate::crypto::Role::Admin)
        {
            match t.purge(name).await {
                Ok(Purge::Removed) => deleted += 1,
                Ok(Purge::Locked(until)) => report.locked.push(LockedObject {
                    target: t.name().to_string(),
                    object: name.clone(),
                    retain_until: until,
                }),
                Err(e) => report
                    .delete_failed
                    .push((t.name().to_string(), e.to_string())),
            }
        }
        if deleted > 0 {
            report.deleted.push((t.name().to_string(), deleted));
        }
        let steps: Vec<Vec<&String>> = plan
            .steps
            .iter()
            .map(|s| s.iter().filter(|n| !have.contains(*n)).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .collect();
        if steps.is_empty() {
            continue;
        }
        if let Some(p) = &progress {
            let n: usize = steps.iter().map(Vec::len).sum();
            p.objects_total.fetch_add(n as u64, Relaxed);
        }
        match copy_to(targets, t, &steps, &holders, progress.as_deref()).await {
            Ok((n, bytes)) => report.copied.push((t.name().to_string(), n, bytes)),
            Err((n, bytes, e)) => {
                if n > 0 {
                    report.copied.push((t.name().to_string(), n, bytes));
                }
                report.failed.push((t.name().to_string(), e));
            }
        }
    }
    Ok(report)
}

/// The copy plan: steps run one after the other (the objects of one step
/// concurrently), and removed objects a live snapshot still needs.
#[derive(Debug, Default)]
struct Plan {
    steps: Vec<Vec<String>>,
    /// Named in a removal record, but the only copy of data a snapshot that
    /// some target lacks still needs: copied and kept, not deleted.
    exempt: HashSet<String>,
    warnings: Vec<String>,
}

/// A snapshot object: its time and document (None when unreadable) and name.
type Timed = (Option<DateTime<Utc>>, String, Option<Snapshot>);

/// The snapshots (newest first) and their times.
async fn snapshot_times(repo: &Repository, names: &[&String]) -> Vec<Timed> {
    let mut timed = Vec::new();
    for n in names {
        let snap = match name_id(n) {
            Some(id) => repo
                .load_object::<Snapshot>(ObjectKind::Snapshot, &id)
                .await
                .ok(),
            None => None,
        };
        timed.push((snap.as_ref().map(|s| s.time), (*n).clone(), snap));
    }
    timed.sort_by_key(|t| std::cmp::Reverse(t.0));
    timed
}

/// Copy order: keys and data keys; then, newest snapshot first, for each
/// snapshot some target lacks: the packs it needs (and every other pack the
/// index objects describing them list), those index objects, its customer
/// index objects, and the snapshot itself — so an interrupted catch-up
/// leaves complete newest snapshots; then everything else in [`FOLDERS`]
/// order (older snapshots newest first). Removed objects are left out.
async fn plan(
    repo: &Repository,
    holders: &BTreeMap<String, Vec<usize>>,
    removed: &HashSet<String>,
    reachable: usize,
) -> Plan {
    let mut plan = Plan::default();
    let mut scheduled: HashSet<String> = HashSet::new();
    let push = |plan: &mut Plan, scheduled: &mut HashSet<String>, step: Vec<String>| {
        let step: Vec<String> = step
            .into_iter()
            .filter(|n| holders.contains_key(n) && scheduled.insert(n.clone()))
            .collect();
        if !step.is_empty() {
            plan.steps.push(step);
        }
    };
    for f in ["keys/", "datakeys/"] {
        let names = holders
            .keys()
            .filter(|n| n.starts_with(f))
            .cloned()
            .collect();
        push(&mut plan, &mut scheduled, names);
    }
    let snapshot_names: Vec<&String> = holders
        .keys()
        .filter(|n| n.starts_with("snapshots/") && !removed.contains(*n))
        .collect();
    let timed = snapshot_times(repo, &snapshot_names).await;
    let lacking: Vec<&Timed> = timed
        .iter()
        .filter(|(_, n, s)| s.is_some() && holders.get(n).map_or(0, |h| h.len()) < reachable)
        .collect();
    if !lacking.is_empty() {
        match snapshot_steps(repo, holders, removed, &lacking).await {
            Ok((steps, exempt)) => {
                plan.exempt = exempt;
                for step in steps {
                    push(&mut plan, &mut scheduled, step);
                }
            }
            Err(e) => plan.warnings.push(format!(
                "copying in folder order, not snapshot by snapshot: {e}"
            )),
        }
    }
    let keep = |n: &String| !removed.contains(n) || plan.exempt.contains(n);
    let mut rest: Vec<Vec<String>> = Vec::new();
    for f in FOLDERS {
        if f == "snapshots/" {
            rest.push(timed.iter().map(|(_, n, _)| n.clone()).collect());
        } else {
            rest.push(
                holders
                    .keys()
                    .filter(|n| n.starts_with(f) && keep(n))
                    .cloned()
                    .collect(),
            );
        }
    }
    for step in rest {
        push(&mut plan, &mut scheduled, step);
    }
    plan
}

type Steps = (Vec<Vec<String>>, HashSet<String>);

/// Steps per lacking snapshot (see [`plan`]).
async fn snapshot_steps(
    repo: &Repository,
    holders: &BTreeMap<String, Vec<usize>>,
    removed: &HashSet<String>,
    lacking: &[&Timed],
) -> Result<Steps> {
    // Every index object any target holds, removed ones too (they may be the
    // only description of data a lacking snapshot needs).
    let ids: Vec<Id> = holders
        .keys()
        .filter(|n| n.starts_with("index/"))
        .filter_map(|n| name_id(n))
        .collect();
    let loaded: Vec<Result<IndexFile>> = futures::stream::iter(
        ids.iter()
            .map(|id| repo.load_object::<IndexFile>(ObjectKind::Index, id)),
    )
    .buffered(16)
    .collect()
    .await;
    let mut files: HashMap<Id, IndexFile> = HashMap::new();
    for (id, f) in ids.iter().zip(loaded) {
        files.insert(*id, f?);
    }
    let removed_pack = |p: &IndexPack| removed.contains(&p.object_name());
    let mut builder = IndexBuilder::default();
    let mut avoid = HashSet::new();
    // pack -> index objects listing it, live ones first.
    let mut describing: HashMap<Id, Vec<Id>> = HashMap::new();
    for (iid, f) in &files {
        builder.add_file(f);
        let dead = removed.contains(&ObjectKind::Index.name(iid));
        for p in &f.packs {
            if dead || removed_pack(p) {
                avoid.insert(p.id);
            }
            let v = describing.entry(p.id).or_default();
            if dead {
                v.push(*iid);
            } else {
                v.insert(0, *iid);
            }
        }
    }
    let index = builder.build_avoiding(&avoid);
    let mut steps = Vec::new();
    let mut exempt = HashSet::new();
    let mut visited: HashSet<Id> = HashSet::new();
    let mut index_done: HashSet<Id> = HashSet::new();
    for (_, name, snap) in lacking {
        let Some(snap) = snap else { continue };
        // The blobs this snapshot needs that no earlier step covers.
        let mut packs: HashSet<Id> = HashSet::new();
        repo.walk_reachable(&index, snap.tree, |reached| {
            let (Reached::Tree(id) | Reached::Content(id)) = reached;
            let new = visited.insert(*id);
            if new {
                if let Some(loc) = index.get(id) {
                    packs.insert(loc.pack);
                }
            }
            new
        })
        .await?;
        // One index object per pack (a live one when there is one), and
        // every pack those index objects list.
        let mut index_step = Vec::new();
        let mut pack_step = Vec::new();
        for p in &packs {
            let Some(iid) = describing.get(p).and_then(|v| v.first()) else {
                continue;
            };
            if !index_done.insert(*iid) {
                continue;
            }
            let iname = ObjectKind::Index.name(iid);
            if removed.contains(&iname) {
                exempt.insert(iname.clone());
            }
            index_step.push(iname);
            for lp in &files[iid].packs {
                let pname = lp.object_name();
                if removed.contains(&pname) {
                    exempt.insert(pname.clone());
                }
                pack_step.push(pname);
            }
        }
        let mut customer_step = Vec::new();
        if let Some(doc) = snap.customer_index {
            customer_step.push(ObjectKind::Customer.name(&doc));
            let parts = crate::customer::index_parts(repo, Some(doc)).await?;
            customer_step.extend(parts.values().map(|p| ObjectKind::Customer.name(p)));
        }
        pack_step.sort();
        index_step.sort();
        steps.push(pack_step);
        steps.push(index_step);
        steps.push(customer_step);
        steps.push(vec![name.clone()]);
    }
    Ok((steps, exempt))
}

/// Copy the objects of `steps` (in order, each step's objects concurrently)
/// to `dest`; stops at the first failure, returning what was copied and the
/// error.
async fn copy_to(
    targets: &[TargetRef],
    dest: &TargetRef,
    steps: &[Vec<&String>],
    holders: &BTreeMap<String, Vec<usize>>,
    progress: Option<&SyncProgress>,
) -> std::result::Result<(usize, u64), (usize, u64, String)> {
    let (mut n, mut bytes) = (0usize, 0u64);
    for names in steps {
        let results: Vec<std::result::Result<u64, String>> = futures::stream::iter(names.iter())
            .map(|name| async move {
                let copied = copy_one(
                    targets,
                    dest,
                    name,
                    holders.get(*name).map(|v| v.as_slice()).unwrap_or(&[]),
                )
                .await;
                if let (Some(p), Ok(b)) = (progress, &copied) {
                    p.objects_copied.fetch_add(1, Relaxed);
                    p.bytes_copied.fetch_add(*b, Relaxed);
                }
                copied
            })
            .buffered(COPY_CONCURRENCY)
            .collect()
            .await;
        for r in results {
            match r {
                Ok(b) => {
                    n += 1;
                    bytes += b;
                }
                Err(e) => return Err((n, bytes, e)),
            }
        }
    }
    Ok((n, bytes))
}

async fn copy_one(
    targets: &[TargetRef],
    dest: &TargetRef,
    name: &str,
    holders: &[usize],
) -> std::result::Result<u64, String> {
    // Data keys (format 2) are named by their random id, not by a hash: a
    // copy is checked by its length (a wrapped key has a fixed size).
    let data_key = crate::crypto::parse_data_key_object(name).is_some();
    let want = match name_id(name) {
        Some(id) => Some(id),
        None if data_key => None,
        None => return Err(format!("{name}: not a content-addressed name")),
    };
    let good = |data: &[u8]| match want {
        Some(id) => Id::of_object(data) == id,
        None => data.len() == crate::crypto::WRAPPED_DATA_KEY_LEN,
    };
    let mut last = format!("{name}: no target holds a copy");
    for &h in holders {
        match targets[h].get(name).await {
            Ok(data) if good(&data) => {
                let len = data.len() as u64;
                return dest
                    .put_new(name, data)
                    .await
                    .map(|_| len)
                    .map_err(|e| e.to_string());
            }
            Ok(_) => {
                last = format!(
                    "{name} on target {}: bytes do not hash to the name",
                    targets[h].name()
                );
                tracing::warn!(
                    object = name,
                    target = targets[h].name(),
                    "damaged copy; trying another target"
                );
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// What `check --repair-from` did on one target.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub target: String,
    /// Objects copied because the target lacked them.
    pub copied: Vec<String>,
    /// Objects rewritten because the target's copy was damaged (wrong size or hash).
    pub replaced: Vec<String>,
    pub errors: Vec<String>,
}

/// Replace what `dest` lacks or holds damaged with verified copies from `source`.
/// With `read_data` every object on `dest` is downloaded and hashed; without,
/// only missing objects and wrong sizes are found.
pub async fn repair_from(
    source: &TargetRef,
    dest: &TargetRef,
    read_data: bool,
) -> Result<RepairReport> {
    let mut report = RepairReport {
        target: dest.name().to_string(),
        ..Default::default()
    };
    for folder in FOLDERS {
        let theirs = source.list(folder).await?;
        let ours: HashMap<String, u64> = dest
            .list(folder)
            .await?
            .into_iter()
            .map(|m| (m.name, m.size))
            .collect();
        for m in theirs {
            let Some(want) = name_id(&m.name) else {
                continue;
            };
            let damaged = match ours.get(&m.name) {
                None => false,
                Some(size) if *size != m.size => true,
                Some(_) if read_data => match dest.get(&m.name).await {
                    Ok(bytes) => Id::of_object(&bytes) != want,
                    Err(_) => true,
                },
                Some(_) => continue,
            };
            if !damaged && ours.contains_key(&m.name) {
                continue;
            }
            let good = match source.get(&m.name).await {
                Ok(b) if Id::of_object(&b) == want => b,
                Ok(_) => {
                    report.errors.push(format!(
                        "{} on {}: the source copy is damaged too",
                        m.name,
                        source.name()
                    ));
                    continue;
                }
                Err(e) => {
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            let r = if damaged {
                dest.overwrite(&m.name, good).await.map(|_| ())
            } else {
                dest.put_new(&m.name, good).await.map(|_| ())
            };
            match r {
                Ok(()) if damaged => report.replaced.push(m.name),
                Ok(()) => report.copied.push(m.name),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    Ok(report)
}

/// Per-target inventory for `custos targets`.
#[derive(Debug, Default, serde::Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub location: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub snapshots: usize,
    pub objects: usize,
    pub bytes: u64,
    /// Objects other targets hold and this one lacks.
    pub missing: usize,
    /// Objects only this target holds.
    pub extra: usize,
    /// Objects this target still holds that forget, prune, an erasure or
    /// record retention removed (the next sync deletes them; not in `missing`
    /// of the others).
    pub removed: usize,
}

/// Bytes stored in `target` (every repository folder listed).
pub async fn stored_bytes(target: &TargetRef) -> Result<u64> {
    let mut total = 0;
    for f in FOLDERS {
        total += target.list(f).await?.iter().map(|m| m.size).sum::<u64>();
    }
    Ok(total)
}

/// List every target and compare their objects.
pub async fn status(repo: &Repository) -> Vec<TargetStatus> {
    let mut rows = Vec::new();
    let mut listings: Vec<Option<BTreeSet<String>>> = Vec::new();
    for t in repo.targets() {
        let mut row = TargetStatus {
            target: t.name().to_string(),
            location: t.location().to_string(),
            ..Default::default()
        };
        let mut names = BTreeSet::new();
        let mut ok = true;
        for f in FOLDERS {
            match t.list(f).await {
                Ok(list) => {
                    for m in list {
                        row.objects += 1;
                        row.bytes += m.size;
                        if f == "snapshots/" {
                            row.snapshots += 1;
                        }
                        names.insert(m.name);
                    }
                }
                Err(e) => {
                    row.error = Some(e.to_string());
                    ok = false;
                    break;
                }
            }
        }
        row.reachable = ok;
        listings.push(ok.then_some(names));
        rows.push(row);
    }
    let removed = match crate::removals::removed(repo).await {
        Ok((r, _)) => r,
        Err(e) => {
            tracing::warn!(error = %e, "removal records unknown");
            HashSet::new()
        }
    };
    for (i, row) in rows.iter_mut().enumerate() {
        let Some(mine) = &listings[i] else { continue };
        row.removed = mine.iter().filter(|n| removed.contains(*n)).count();
        let others: Vec<&BTreeSet<String>> = listings
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, l)| l.as_ref())
            .collect();
        row.missing = others
            .iter()
            .flat_map(|o| o.iter())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| !mine.contains(*n) && !removed.contains(*n))
            .count();
        row.extra = mine
            .iter()
            .filter(|n| !others.iter().any(|o| o.contains(*n)))
            .count();
    }
    for (name, e) in repo.unreachable() {
        rows.push(TargetStatus {
            target: name.clone(),
            error: Some(e.clone()),
            ..Default::default()
        });
    }
    rows
}
