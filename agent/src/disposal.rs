//! Record retention and legal holds.
//!
//! `retention apply` removes records past their retention (rules in
//! `custos_schedules::record_retention`, most specific wins, age from the
//! record's own creation time) from every retained snapshot of a record
//! source: the affected partitions, collection lists and root are rewritten,
//! a new snapshot object replaces the old one, and an entry is appended to
//! the disposal log (`disposals/`: what class, how many, when, under which
//! rule). The data itself goes with the next `prune`, which forces the
//! disposed blobs out of mixed packs (as for an erasure). When an Object
//! Lock keeps a replaced snapshot (or a pack holding disposed data), the
//! entry lists it as `pending` and every prune retries it until it is gone
//! (`crate::erasures`, progress documents in `disposals/`).
//!
//! Legal holds (`holds/`) override every rule: a record a hold matches is
//! never removed, whatever its age. Holds are immutable objects: placing and
//! releasing are two documents; a hold is active while its latest document
//! places it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use custos_schedules::record_retention::{decide, RecordFacts, RecordPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::find::Filter;
use crate::id::Id;
use crate::object::ObjectKind;
use crate::pipeline::{Progress, Saver, Session};
use crate::records::keys;
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SnapshotEntry};
use crate::tree::{Node, NodeKind};

/// Place or release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldAction {
    Place,
    Release,
}

/// The sealed document of a `holds/<id>` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldDoc {
    /// Hold name (unique among active holds).
    pub name: String,
    pub action: HoldAction,
    pub time: DateTime<Utc>,
    /// Why (case number, request).
    pub reason: String,
    /// Records naming this customer identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Records of this source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Records of this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Records of this collection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Records created at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    /// Records created before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

impl HoldDoc {
    /// Does this hold cover the record `node` of `source`/`collection`?
    /// With a time range, a record without a creation time is covered (it
    /// cannot be shown to lie outside the range).
    pub fn covers(&self, source: &str, collection: &str, node: &Node) -> bool {
        let in_range = || {
            let Some(created) = node
                .meta
                .get(keys::CREATED)
                .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
                .map(|t| t.with_timezone(&Utc))
            else {
                return true;
            };
            self.from.is_none_or(|f| created >= f) && self.until.is_none_or(|u| created < u)
        };
        self.source.as_deref().is_none_or(|s| s == source)
            && self.collection.as_deref().is_none_or(|c| c == collection)
            && Filter {
                customer: self.customer.clone(),
                kind: self.kind.clone(),
                ..Filter::default()
            }
            .matches(node)
            && in_range()
    }

    /// True when the hold names no record criterion (customer, kind,
    /// collection, time): it covers every record of its source (of every
    /// source when it names none), so a snapshot is matched without reading
    /// its tree.
    fn whole_source(&self) -> bool {
        self.customer.is_none()
            && self.kind.is_none()
            && self.collection.is_none()
            && self.from.is_none()
            && self.until.is_none()
    }
}

/// Which of `snapshots` hold a record one of `holds` covers: snapshot id →
/// the names of those holds (sorted). Only record snapshots hold records.
/// A hold that names no record criterion covers every record snapshot of
/// its source without a tree being read; the others are matched against
/// the record metadata in the trees (no body is read), and a partition tree
/// that several snapshots share is read once.
pub async fn held_snapshots(
    repo: &Repository,
    holds: &[HoldDoc],
    snapshots: &[&SnapshotEntry],
) -> Result<BTreeMap<Id, Vec<String>>> {
    let mut out = BTreeMap::new();
    if holds.is_empty() {
        return Ok(out);
    }
    let mut index = None;
    // (source, collection, partition tree) → indexes of the holds covering a record in it.
    let mut memo: HashMap<(String, String, Id), BTreeSet<usize>> = HashMap::new();
    for s in snapshots {
        let snap = &s.snapshot;
        if snap.cursors.is_empty() {
            continue;
        }
        let of_source: Vec<usize> = (0..holds.len())
            .filter(|&i| holds[i].source.as_deref().is_none_or(|h| h == snap.source))
            .collect();
        let mut hit: BTreeSet<usize> = of_source
            .iter()
            .copied()
            .filter(|&i| holds[i].whole_source())
            .collect();
        let to_walk: Vec<usize> = of_source
            .iter()
            .copied()
            .filter(|i| !hit.contains(i))
            .collect();
        if !to_walk.is_empty() {
            if index.is_none() {
                index = Some(repo.load_index().await?.0);
            }
            let index = index.as_ref().expect("loaded");
            'colls: for coll in repo.load_tree(index, &snap.tree).await? {
                let Some(ct) = coll.subtree.filter(|_| coll.kind == NodeKind::Dir) else {
                    continue;
                };
                let here: Vec<usize> = to_walk
                    .iter()
                    .copied()
                    .filter(|&i| {
                        holds[i]
                            .collection
                            .as_deref()
                            .is_none_or(|c| c == coll.name)
                    })
                    .collect();
                if here.iter().all(|i| hit.contains(i)) {
                    continue;
                }
                for part in repo.load_tree(index, &ct).await? {
                    let Some(pt) = part.subtree.filter(|_| part.kind == NodeKind::Dir) else {
                        continue;
                    };
                    let key = (snap.source.clone(), coll.name.clone(), pt);
                    if !memo.contains_key(&key) {
                        let nodes = repo.load_tree(index, &pt).await?;
                        let covering: BTreeSet<usize> = here
                            .iter()
                            .copied()
                            .filter(|&i| {
                                nodes.iter().any(|n| {
                                    n.kind == NodeKind::Record
                                        && holds[i].covers(&snap.source, &coll.name, n)
                                })
                            })
                            .collect();
                        memo.insert(key.clone(), covering);
                    }
                    hit.extend(memo[&key].iter().copied());
                    if to_walk.iter().all(|i| hit.contains(i)) {
                        break 'colls;
                    }
                    if here.iter().all(|i| hit.contains(i)) {
                        continue 'colls;
                    }
                }
            }
        }
        if !hit.is_empty() {
            let mut names: Vec<String> = hit.into_iter().map(|i| holds[i].name.clone()).collect();
            names.sort();
            out.insert(s.id, names);
        }
    }
    Ok(out)
}

/// Active holds: for each name, its latest document, when that places it.
pub async fn active_holds(repo: &Repository) -> Result<Vec<HoldDoc>> {
    let mut latest: BTreeMap<String, HoldDoc> = BTreeMap::new();
    for id in repo.list_ids(ObjectKind::Hold).await? {
        // An unreadable hold must not silently stop protecting data.
        let doc: HoldDoc = repo.load_object(ObjectKind::Hold, &id).await?;
        match latest.get(&doc.name) {
            Some(prev) if prev.time > doc.time => {}
            _ => {
                latest.insert(doc.name.clone(), doc);
            }
        }
    }
    Ok(latest
        .into_values()
        .filter(|h| h.action == HoldAction::Place)
        .collect())
}

/// Write a hold document to every target.
pub async fn write_hold(repo: &Repository, doc: &HoldDoc) -> Result<Id> {
    repo.require(crate::crypto::Role::Admin, "hold set/release")?;
    if doc.name.trim().is_empty() {
        return Err(Error::Invalid("a hold needs a name".into()));
    }
    let active = active_holds(repo).await?;
    let exists = active.iter().any(|h| h.name == doc.name);
    match doc.action {
        HoldAction::Place if exists => {
            return Err(Error::Invalid(format!(
                "hold {:?} is already active",
                doc.name
            )))
        }
        HoldAction::Release if !exists => {
            return Err(Error::Invalid(format!(
                "no active hold named {:?}",
                doc.name
            )))
        }
        _ => {}
    }
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Hold, doc)
        .await;
    for r in results {
        r?;
    }
    Ok(id)
}

/// One line of the disposal log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DisposalCount {
    pub rule: String,
    pub kind: String,
    pub source: String,
    pub records: u64,
}

/// The sealed document of a `disposals/<id>` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisposalDoc {
    pub time: DateTime<Utc>,
    /// Record copies removed, by rule, kind and source (a record present in
    /// several snapshots counts once per snapshot).
    pub removed: Vec<DisposalCount>,
    /// Expired records kept because a hold covers them.
    pub held: u64,
    /// (old snapshot id, new snapshot id).
    pub snapshots: Vec<(Id, Id)>,
    /// Blobs of the removed records and of the replaced partition trees:
    /// every prune repacks a pack still holding one unused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<Id>,
    /// Objects an Object Lock kept (replaced snapshots) with their
    /// retain-until: retried by every prune ([`crate::erasures::retry`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<crate::target::LockedObject>,
}

/// What a `disposals/` object holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DisposalObject {
    /// The entry `retention apply` writes.
    Disposal(DisposalDoc),
    /// A later retry of it (an entry a lock held back).
    Progress(crate::erasures::ErasureProgress),
}

/// What `retention apply` did (or would do).
#[derive(Debug, Default, Serialize)]
pub struct ApplyReport {
    pub dry_run: bool,
    pub snapshots_checked: usize,
    pub snapshots_rewritten: usize,
    pub removed: Vec<DisposalCount>,
    pub held: u64,
    /// Records without a creation time under a rule that would expire them.
    pub undated: u64,
    pub disposal_log: Option<Id>,
    /// Dry run only: each record that would go (no body, no address), once
    /// however many snapshots hold a copy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<ExpiredRecord>,
    /// Replaced snapshots (or packs holding disposed data) an Object Lock
    /// keeps until their retain-until: the disposal is pending, and every
    /// prune retries it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locked: Vec<crate::target::LockedObject>,
    /// The progress document listing locked packs, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Id>,
}

/// A record past its retention, as a dry run lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExpiredRecord {
    pub source: String,
    pub collection: String,
    /// The record's id at its source.
    pub record_id: String,
    pub kind: String,
    /// The rule it expires under.
    pub rule: String,
    /// The record's creation time.
    pub created: Option<DateTime<Utc>>,
    /// Snapshots holding a copy.
    pub snapshots: u64,
}

struct Walk<'a> {
    policy: &'a RecordPolicy,
    holds: &'a [HoldDoc],
    now: DateTime<Utc>,
    counts: BTreeMap<(String, String, String), u64>,
    held: u64,
    undated: u64,
    /// Dry run: (source, collection, record id) → the record.
    records: Option<BTreeMap<(String, String, String), ExpiredRecord>>,
    /// Blobs of removed records (payloads, attachment trees' content).
    purge: HashSet<Id>,
    /// Attachment trees of removed records: every blob of them goes too.
    gone_trees: BTreeSet<Id>,
}

impl Walk<'_> {
    /// Split a partition's records into kept and removed.
    fn filter(
        &mut self,
        snap: &Snapshot,
        collection: &str,
        nodes: Vec<Node>,
    ) -> (Vec<Node>, usize) {
        let mut kept = Vec::with_capacity(nodes.len());
        let mut removed = 0;
        for n in nodes {
            if n.kind != NodeKind::Record {
                kept.push(n);
                continue;
            }
            let created = n
                .meta
                .get(keys::CREATED)
                .and_then(|c| DateTime::parse_from_rfc3339(c).ok())
                .map(|t| t.with_timezone(&Utc));
            let kind = n.meta.get(keys::KIND).cloned().unwrap_or_default();
            let facts = RecordFacts {
                kind: &kind,
                source: &snap.source,
                collection,
                jurisdiction: n.meta.get(keys::JURISDICTION).map(String::as_str),
                tags: &snap.tags,
                created,
            };
            let d = decide(self.policy, &facts, self.now);
            self.undated += u64::from(d.undated);
            if !d.expired {
                kept.push(n);
            } else if self
                .holds
                .iter()
                .any(|h| h.covers(&snap.source, collection, &n))
            {
                self.held += 1;
                kept.push(n);
            } else {
                if let Some(records) = &mut self.records {
                    let id = n
                        .meta
                        .get(keys::RECORD_ID)
                        .cloned()
                        .unwrap_or_else(|| n.name.clone());
                    records
                        .entry((snap.source.clone(), collection.to_string(), id.clone()))
                        .or_insert_with(|| ExpiredRecord {
                            source: snap.source.clone(),
                            collection: collection.to_string(),
                            record_id: id,
                            kind: kind.clone(),
                            rule: d.rule.clone(),
                            created,
                            snapshots: 0,
                        })
                        .snapshots += 1;
                }
                *self
                    .counts
                    .entry((d.rule, kind, snap.source.clone()))
                    .or_default() += 1;
                self.purge.extend(n.content.iter().copied());
                self.gone_trees.extend(n.subtree);
                removed += 1;
            }
        }
        (kept, removed)
    }
}

async fn save_tree(saver: &Arc<Saver>, nodes: Vec<Node>) -> Result<Id> {
    let saver = saver.clone();
    tokio::task::spawn_blocking(move || saver.save_tree(nodes))
        .await
        .map_err(|e| Error::Failed(format!("tree task panicked: {e}")))?
}

/// Splits a partition's record nodes into kept and removed: `(snapshot,
/// collection, nodes) → (kept, number removed)`.
pub type PartitionFilter<'f> =
    dyn FnMut(&Snapshot, &str, Vec<Node>) -> (Vec<Node>, usize) + Send + 'f;

/// A snapshot's tree with records removed.
pub struct Rewritten {
    /// The new root tree (None on a dry run).
    pub tree: Option<Id>,
    /// Records removed.
    pub removed: u64,
    /// The partitions of the new tree, for its customer index.
    pub parts: Vec<crate::customer::PartInput>,
}

/// Rewrite `snap` without the records `filter` removes (None when it removes
/// none); `saver` None is a dry run.
pub async fn rewrite(
    repo: &Repository,
    index: &crate::index::Index,
    saver: Option<&Arc<Saver>>,
    snap: &Snapshot,
    filter: &mut PartitionFilter<'_>,
) -> Result<Option<Rewritten>> {
    let mut root = Vec::new();
    let mut total_removed = 0u64;
    let mut inputs = Vec::new();
    for mut coll in repo.load_tree(index, &snap.tree).await? {
        let Some(ct) = coll.subtree.filter(|_| coll.kind == NodeKind::Dir) else {
            root.push(coll);
            continue;
        };
        let mut parts = Vec::new();
        let mut coll_removed = 0usize;
        for mut part in repo.load_tree(index, &ct).await? {
            let Some(pt) = part.subtree.filter(|_| part.kind == NodeKind::Dir) else {
                parts.push(part);
                continue;
            };
            let nodes = repo.load_tree(index, &pt).await?;
            let (kept, removed) = filter(snap, &coll.name, nodes);
            if removed == 0 {
                inputs.push(crate::customer::PartInput {
                    collection: coll.name.clone(),
                    partition: part.name.clone(),
                    tree: pt,
                    nodes: None,
                    records: None,
                });
                parts.push(part);
                continue;
            }
            coll_removed += removed;
            if kept.is_empty() {
                continue;
            }
            if let Some(s) = saver {
                let tree = save_tree(s, kept.clone()).await?;
                part.subtree = Some(tree);
                inputs.push(crate::customer::PartInput {
                    collection: coll.name.clone(),
                    partition: part.name.clone(),
                    tree,
                    nodes: Some(kept),
                    records: None,
                });
            }
            parts.push(part);
        }
        if coll_removed > 0 {
            total_removed += coll_removed as u64;
            if let Some(n) = coll
                .meta
                .get("records")
                .and_then(|v| v.parse::<usize>().ok())
            {
                coll.meta
                    .insert("records".into(), n.saturating_sub(coll_removed).to_string());
            }
            if let Some(s) = saver {
                coll.subtree = Some(save_tree(s, parts).await?);
            }
        }
        root.push(coll);
    }
    if total_removed == 0 {
        return Ok(None);
    }
    let tree = match saver {
        Some(s) => Some(save_tree(s, root).await?),
        None => None,
    };
    Ok(Some(Rewritten {
        tree,
        removed: total_removed,
        parts: inputs,
    }))
}

/// Store rewritten snapshots in place of the old ones on every target (the
/// session holds their new trees): trees and index first, then each new
/// snapshot (with its customer index), then the old snapshot is deleted.
/// Returns (old id, new id) pairs, and the old snapshots an Object Lock
/// kept (they stay until their retain-until; a later run removes them).
pub async fn replace_snapshots(
    repo: &Repository,
    mut session: Session,
    rewritten: Vec<(Id, Snapshot, Vec<crate::customer::PartInput>)>,
    what: &str,
) -> Result<(Vec<(Id, Id)>, Vec<crate::target::LockedObject>)> {
    session.finish(None).await?;
    let healthy = session.finished().expect("finished").healthy.clone();
    if healthy.len() < repo.targets().len() {
        return Err(Error::Failed(format!(
            "{what} could not store the rewritten trees on every target; nothing replaced"
        )));
    }
    // The new partition trees are readable now: index them (parts of
    // unchanged partitions are reused from the old snapshot's index).
    let (blob_index, _) = repo.load_index().await?;
    let mut pairs = Vec::new();
    let mut locked = Vec::new();
    for (old, mut snap, parts) in rewritten {
        let previous = crate::customer::index_parts(repo, snap.customer_index)
            .await
            .unwrap_or_default();
        if snap.source_type.is_some() {
            let (ci, _warnings) =
                crate::customer::write_index(repo, &blob_index, parts, &previous).await?;
            snap.customer_index = Some(ci);
        }
        let (new_id, bytes) = crate::object::seal_object(repo.keys(), ObjectKind::Snapshot, &snap);
        for r in repo
            .put_to(&healthy, &ObjectKind::Snapshot.name(&new_id), &bytes)
            .await
        {
            r?;
        }
        let name = ObjectKind::Snapshot.name(&old);
        for t in repo.targets() {
            // Every version on a versioned bucket, not just a delete marker.
            if let crate::target::Purge::Locked(until) = t.purge(&name).await? {
                locked.push(crate::target::LockedObject {
                    target: t.name().to_string(),
                    object: name.clone(),
                    retain_until: until,
                });
            }
        }
        pairs.push((old, new_id));
    }
    Ok((pairs, locked))
}

/// Apply record retention to every snapshot of every record source.
pub async fn apply(
    repo: &Repository,
    policy: &RecordPolicy,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<ApplyReport> {
    repo.require(crate::crypto::Role::Admin, "retention apply")?;
    let holds = active_holds(repo).await?;
    let (snapshots, warnings) = repo.snapshots().await?;
    if !warnings.is_empty() {
        return Err(Error::Failed(format!(
            "retention apply refuses to run while a snapshot is unreadable: {}",
            warnings.join("; ")
        )));
    }
    let mut report = ApplyReport {
        dry_run,
        ..Default::default()
    };
    let mut walk = Walk {
        policy,
        holds: &holds,
        now,
        counts: BTreeMap::new(),
        held: 0,
        undated: 0,
        records: dry_run.then(BTreeMap::new),
        purge: HashSet::new(),
        gone_trees: BTreeSet::new(),
    };
    let record_snaps: Vec<&SnapshotEntry> = snapshots
        .iter()
        .filter(|s| !s.snapshot.cursors.is_empty())
        .collect();
    report.snapshots_checked = record_snaps.len();
    let mut session = if dry_run {
        None
    } else {
        Some(Session::start(repo, Arc::new(Progress::default())).await?)
    };
    let (index, _) = repo.load_index().await?;
    let saver = session.as_ref().map(|s| s.saver());
    let mut rewritten: Vec<(Id, Snapshot, Vec<crate::customer::PartInput>)> = Vec::new();
    for s in record_snaps {
        let mut filter =
            |snap: &Snapshot, coll: &str, nodes: Vec<Node>| walk.filter(snap, coll, nodes);
        if let Some(r) = rewrite(repo, &index, saver.as_ref(), &s.snapshot, &mut filter).await? {
            report.snapshots_rewritten += 1;
            if !dry_run {
                // The old partition trees no longer used list the removed records.
                let kept: BTreeSet<Id> = r.parts.iter().map(|p| p.tree).collect();
                for p in crate::customer::partitions(repo, &index, &s.snapshot.tree).await? {
                    if !kept.contains(&p.tree) {
                        walk.gone_trees.insert(p.tree);
                    }
                }
            }
            if let Some(tree) = r.tree {
                let mut new = s.snapshot.clone();
                new.tree = tree;
                new.summary.records_total = new.summary.records_total.saturating_sub(r.removed);
                rewritten.push((s.id, new, r.parts));
            }
        }
    }
    report.removed = walk
        .counts
        .into_iter()
        .map(|((rule, kind, source), records)| DisposalCount {
            rule,
            kind,
            source,
            records,
        })
        .collect();
    report.held = walk.held;
    report.undated = walk.undated;
    report.records = walk.records.unwrap_or_default().into_values().collect();
    drop(saver);
    let Some(session) = session.take() else {
        return Ok(report);
    };
    if rewritten.is_empty() {
        session.abandon().await;
        return Ok(report);
    }
    // New trees → index (finish) → new snapshots → old snapshots deleted → log.
    let (pairs, locked) = replace_snapshots(repo, session, rewritten, "retention apply").await?;
    report.locked = locked;
    let mut blobs = walk.purge;
    for t in &walk.gone_trees {
        blobs.extend(crate::rights::tree_blobs(repo, &index, t).await?);
    }
    let mut blobs: Vec<Id> = blobs.into_iter().collect();
    blobs.sort();
    let log = DisposalDoc {
        time: now,
        removed: report.removed.clone(),
        held: report.held,
        snapshots: pairs,
        blobs,
        pending: report.locked.clone(),
    };
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Disposal, &log)
        .await;
    for r in results {
        r?;
    }
    report.disposal_log = Some(id);
    // Packs a lock keeps although no replaced snapshot is locked: pending too.
    report.progress = crate::erasures::after_replace(
        repo,
        crate::erasures::Tracked::Disposal,
        id,
        &log.pending,
        &log.blobs,
        now,
    )
    .await?;
    if report.progress.is_some() {
        report.locked = crate::erasures::disposal_statuses(repo)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.pending)
            .unwrap_or_default();
    }
    Ok(report)
}

/// Every `disposals/` object: (log entries oldest first, progress documents oldest first).
pub async fn load_all(
    repo: &Repository,
) -> Result<(
    Vec<(Id, DisposalDoc)>,
    Vec<(Id, crate::erasures::ErasureProgress)>,
)> {
    let mut records = Vec::new();
    let mut progress = Vec::new();
    for id in repo.list_ids(ObjectKind::Disposal).await? {
        match repo
            .load_object::<DisposalObject>(ObjectKind::Disposal, &id)
            .await?
        {
            DisposalObject::Disposal(d) => records.push((id, d)),
            DisposalObject::Progress(p) => progress.push((id, p)),
        }
    }
    records.sort_by_key(|(_, d)| d.time);
    progress.sort_by_key(|(_, p)| p.time);
    Ok((records, progress))
}

/// The disposal log (the entries, without their progress documents), oldest first.
pub async fn disposal_log(repo: &Repository) -> Result<Vec<(Id, DisposalDoc)>> {
    Ok(load_all(repo).await?.0)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use custos_connectors::{
        Capabilities, Change, ChangeSink, Collection, Connector, Cursor, Health, Payload, Record,
        RecordKind,
    };
    use custos_schedules::record_retention::{Keep, Rule};
    use custos_schedules::retention::{GroupBy, Policy, Reason};

    use super::*;
    use crate::erasures::tests::repo_on;
    use crate::target::store::StoreTarget;
    use crate::target::TargetRef;

    /// What the test source holds of one record.
    #[derive(Clone)]
    struct Spec {
        collection: &'static str,
        id: &'static str,
        kind: RecordKind,
        created: &'static str,
        jurisdiction: Option<&'static str>,
        customer: &'static str,
    }

    fn spec(
        collection: &'static str,
        id: &'static str,
        kind: RecordKind,
        created: &'static str,
        jurisdiction: Option<&'static str>,
        customer: &'static str,
    ) -> Spec {
        Spec {
            collection,
            id,
            kind,
            created,
            jurisdiction,
            customer,
        }
    }

    /// A source whose every sync lists a collection in full (`Reset`), from
    /// a list the test edits: with mirror mode, a record taken off the list
    /// is gone from the next snapshot.
    struct Listed {
        records: Mutex<Vec<Spec>>,
    }

    #[async_trait]
    impl Connector for Listed {
        fn name(&self) -> &str {
            "support"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
        async fn check(&self) -> custos_connectors::Result<Health> {
            Ok(Health {
                summary: "ok".into(),
            })
        }
        async fn collections(&self) -> custos_connectors::Result<Vec<Collection>> {
            let mut c: Vec<String> = self
                .records
                .lock()
                .unwrap()
                .iter()
                .map(|r| r.collection.to_string())
                .collect();
            c.sort();
            c.dedup();
            Ok(c.into_iter()
                .map(|id| Collection {
                    name: id.clone(),
                    id,
                })
                .collect())
        }
        async fn sync(
            &self,
            coll: &Collection,
            _cursor: Option<&Cursor>,
            sink: &mut dyn ChangeSink,
        ) -> custos_connectors::Result<Cursor> {
            let specs: Vec<Spec> = self
                .records
                .lock()
                .unwrap()
                .iter()
                .filter(|r| r.collection == coll.id)
                .cloned()
                .collect();
            sink.push(Change::Reset).await?;
            for r in specs {
                sink.push(Change::Upsert(Record {
                    id: r.id.into(),
                    collection: r.collection.into(),
                    kind: r.kind.clone(),
                    created: Some(t(r.created)),
                    updated: None,
                    participants: vec![r.customer.into()],
                    customer_ids: vec![format!("email:{}", r.customer)],
                    jurisdiction: r.jurisdiction.map(Into::into),
                    subject: Some(format!("subject {}", r.id)),
                    text: None,
                    attachments: vec![],
                    payload: Payload::Bytes(format!("body of {}", r.id).into_bytes()),
                    payload_ext: "txt".into(),
                    deleted: false,
                    meta: BTreeMap::new(),
                }))
                .await?;
            }
            Ok(serde_json::json!(1))
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    async fn backup(repo: &Repository, source: &Listed) {
        let opts = crate::records::RecordBackupOptions {
            source: "support".into(),
            source_type: "test".into(),
            mode: crate::records::Mode::Mirror,
            tags: Vec::new(),
            hostname: "test".into(),
            time_zone: "UTC".into(),
            reconcile_every: None,
            full: true,
            index_mentions: false,
            jurisdiction: None,
            state_memory: crate::records::STATE_MEMORY,
        };
        crate::records::backup_records(repo, source, &opts, Default::default())
            .await
            .unwrap();
    }

    /// Snapshots, oldest first.
    async fn snapshots(repo: &Repository) -> Vec<SnapshotEntry> {
        let (mut snaps, warnings) = repo.snapshots().await.unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        snaps.sort_by_key(|s| s.snapshot.time);
        snaps
    }

    /// The record ids of every snapshot, oldest snapshot first.
    async fn record_ids(repo: &Repository) -> Vec<Vec<String>> {
        let (index, _) = repo.load_index().await.unwrap();
        let mut out = Vec::new();
        for s in snapshots(repo).await {
            let mut ids: Vec<String> =
                crate::find::records(repo, &index, s.snapshot.tree, &Filter::default())
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|(_, n)| n.meta[keys::RECORD_ID].clone())
                    .collect();
            ids.sort();
            out.push(ids);
        }
        out
    }

    fn hold(name: &str, time: &str) -> HoldDoc {
        HoldDoc {
            name: name.into(),
            action: HoldAction::Place,
            time: t(time),
            reason: "case".into(),
            customer: None,
            source: None,
            kind: None,
            collection: None,
            from: None,
            until: None,
        }
    }

    fn rule(name: &str, kind: &str, jurisdiction: Option<&str>, keep: &str) -> Rule {
        Rule {
            name: name.into(),
            kind: Some(kind.into()),
            source: None,
            collection: None,
            jurisdiction: jurisdiction.map(Into::into),
            tag: None,
            keep: Keep::try_from(keep.to_string()).unwrap(),
        }
    }

    fn count(rule: &str, kind: &str, records: u64) -> DisposalCount {
        DisposalCount {
            rule: rule.into(),
            kind: kind.into(),
            source: "support".into(),
            records,
        }
    }

    /// A fake clock stepping through the years: each record goes in the
    /// year its most specific rule says, held records survive every step,
    /// and go at the first apply after the hold is released; the disposal
    /// log says what went, when, under which rule.
    #[tokio::test]
    async fn retention_and_holds_across_years_with_a_fake_clock() {
        let repo = repo_on(Arc::new(StoreTarget::memory("m")) as TargetRef).await;
        let created = "2020-01-15T10:00:00Z";
        let chat = RecordKind::ChatMessage;
        let source = Listed {
            records: Mutex::new(vec![
                spec(
                    "chat",
                    "c-us",
                    chat.clone(),
                    created,
                    Some("US"),
                    "al@example.org",
                ),
                spec(
                    "chat",
                    "c-de",
                    chat.clone(),
                    created,
                    Some("DE"),
                    "bo@example.org",
                ),
                spec(
                    "chat",
                    "c-held",
                    chat.clone(),
                    created,
                    Some("DE"),
                    "cy@example.org",
                ),
                spec(
                    "mail",
                    "e-pt",
                    RecordKind::Email,
                    created,
                    Some("PT"),
                    "al@example.org",
                ),
                spec(
                    "mail",
                    "e-held",
                    RecordKind::Email,
                    created,
                    None,
                    "cy@example.org",
                ),
                spec(
                    "tickets",
                    "t-1",
                    RecordKind::Ticket,
                    created,
                    None,
                    "al@example.org",
                ),
            ]),
        };
        // Two snapshots of the same state: each record copy counts.
        backup(&repo, &source).await;
        backup(&repo, &source).await;
        let policy = RecordPolicy {
            default: Keep::Forever,
            rules: vec![
                rule("chat 3y", "chat_message", None, "3y"),
                rule("EU chat 2y", "chat_message", Some("EU"), "2y"),
                rule("email 6y", "email", None, "6y"),
            ],
        };
        let mut case = hold("case-cy", "2021-01-01T00:00:00Z");
        case.customer = Some("cy@example.org".into());
        write_hold(&repo, &case).await.unwrap();

        let all = ["c-de", "c-held", "c-us", "e-held", "e-pt", "t-1"];
        // (year, expected removals, expected held copies, ids left)
        let steps: Vec<(i32, Vec<DisposalCount>, u64, Vec<&str>)> = vec![
            (2021, vec![], 0, all.to_vec()),
            (
                2022,
                vec![count("EU chat 2y", "chat_message", 2)],
                2,
                vec!["c-held", "c-us", "e-held", "e-pt", "t-1"],
            ),
            (
                2023,
                vec![count("chat 3y", "chat_message", 2)],
                2,
                vec!["c-held", "e-held", "e-pt", "t-1"],
            ),
            (2024, vec![], 2, vec!["c-held", "e-held", "e-pt", "t-1"]),
            (2025, vec![], 2, vec!["c-held", "e-held", "e-pt", "t-1"]),
            (
                2026,
                vec![count("email 6y", "email", 2)],
                4,
                vec!["c-held", "e-held", "t-1"],
            ),
            (2027, vec![], 4, vec!["c-held", "e-held", "t-1"]),
        ];
        let mut logged = 0;
        for (year, removed, held, left) in steps {
            let now = t(&format!("{year}-06-01T00:00:00Z"));
            // The dry run names each record that would go, and changes nothing.
            let dry = apply(&repo, &policy, now, true).await.unwrap();
            assert_eq!(dry.removed, removed, "{year} dry run");
            let listed: Vec<(String, String, String, String, u64)> = dry
                .records
                .iter()
                .map(|r| {
                    (
                        r.collection.clone(),
                        r.record_id.clone(),
                        r.kind.clone(),
                        r.rule.clone(),
                        r.snapshots,
                    )
                })
                .collect();
            assert_eq!(
                listed.len() as u64 * 2,
                removed.iter().map(|c| c.records).sum::<u64>(),
                "{year}: {listed:?}"
            );
            for (_, id, kind, rule, snaps) in &listed {
                assert!(!left.contains(&id.as_str()), "{year}: {id} listed");
                assert!(
                    removed.iter().any(|c| &c.rule == rule && &c.kind == kind),
                    "{year}: {id} under {rule}"
                );
                assert_eq!(*snaps, 2);
            }
            let report = apply(&repo, &policy, now, false).await.unwrap();
            assert_eq!(report.removed, removed, "{year}");
            assert_eq!(report.held, held, "{year}");
            assert!(report.records.is_empty(), "only a dry run lists records");
            for ids in record_ids(&repo).await {
                assert_eq!(ids, left, "{year}");
            }
            let log = disposal_log(&repo).await.unwrap();
            if removed.is_empty() {
                assert_eq!(log.len(), logged, "{year}: nothing removed, nothing logged");
                assert!(report.disposal_log.is_none());
            } else {
                logged += 1;
                assert_eq!(log.len(), logged, "{year}");
                let (id, entry) = log.last().unwrap();
                assert_eq!(Some(*id), report.disposal_log);
                assert_eq!(entry.time, now);
                assert_eq!(entry.removed, removed);
                assert_eq!(entry.held, held);
                assert_eq!(entry.snapshots.len(), 2, "both snapshots replaced");
            }
        }

        // Released in mid-2027: both held records go at the next apply,
        // each under its own rule.
        let mut release = hold("case-cy", "2027-07-01T00:00:00Z");
        release.action = HoldAction::Release;
        write_hold(&repo, &release).await.unwrap();
        let now = t("2028-01-01T00:00:00Z");
        let report = apply(&repo, &policy, now, false).await.unwrap();
        assert_eq!(
            report.removed,
            vec![
                count("EU chat 2y", "chat_message", 2),
                count("email 6y", "email", 2)
            ]
        );
        assert_eq!(report.held, 0);
        for ids in record_ids(&repo).await {
            assert_eq!(ids, ["t-1"]);
        }
        let log = disposal_log(&repo).await.unwrap();
        assert_eq!(log.len(), logged + 1);
        assert_eq!(log.last().unwrap().1.time, now);
        // Tickets have no rule: the default keeps them forever.
        let far = apply(&repo, &policy, t("2100-01-01T00:00:00Z"), false)
            .await
            .unwrap();
        assert!(far.removed.is_empty());
        assert_eq!(record_ids(&repo).await[0], ["t-1"]);
    }

    /// `retention apply` on a target whose Object Lock keeps the replaced
    /// snapshot: the disposal is pending (with the retain-until) and the
    /// expired record's data stays; a prune before the retain-until (by the
    /// clock passed in) changes nothing; prunes after it delete the old
    /// snapshot (every version), force the disposed data out, and complete
    /// the disposal — the record kept by no rule is untouched.
    #[tokio::test]
    async fn a_locked_disposal_is_pending_until_the_lock_runs_out_then_completes() {
        use crate::erasures::tests::{hits, Locking};
        use crate::erasures::{disposal_statuses, prune_completing, State};
        let t0 = Utc::now();
        let hour = chrono::Duration::hours(1);
        let lock = Locking::new(t0, std::time::Duration::from_secs(3600));
        let tr: TargetRef = lock.clone();
        let repo = repo_on(tr.clone()).await;
        let source = Listed {
            records: Mutex::new(vec![
                spec(
                    "chat",
                    "c-old",
                    RecordKind::ChatMessage,
                    "2020-01-15T10:00:00Z",
                    None,
                    "al@example.org",
                ),
                spec(
                    "tickets",
                    "t-1",
                    RecordKind::Ticket,
                    "2020-01-15T10:00:00Z",
                    None,
                    "al@example.org",
                ),
            ]),
        };
        backup(&repo, &source).await;
        let old = snapshots(&repo).await[0].id;
        let old_name = ObjectKind::Snapshot.name(&old);
        const GONE: &[u8] = b"body of c-old";
        assert!(!hits(&repo, &tr, GONE).await.is_empty());
        let policy = RecordPolicy {
            default: Keep::Forever,
            rules: vec![rule("chat 1y", "chat_message", None, "1y")],
        };
        let report = apply(&repo, &policy, t0, false).await.unwrap();
        assert_eq!(report.removed, vec![count("chat 1y", "chat_message", 1)]);
        assert_eq!(report.locked.len(), 1, "{:?}", report.locked);
        assert_eq!(report.locked[0].object, old_name);
        assert_eq!(report.locked[0].retain_until, t0 + hour);
        let id = report.disposal_log.unwrap();
        let st = disposal_statuses(&repo).await.unwrap();
        assert_eq!(st.len(), 1);
        assert_eq!((st[0].id, st[0].state), (id, State::Pending));
        assert_eq!(st[0].pending, report.locked);
        assert!(
            !st[0].entry.blobs.is_empty(),
            "the disposed blobs are recorded"
        );
        assert_eq!(disposal_log(&repo).await.unwrap().len(), 1);
        // The locked old snapshot is still there (with the expired record)
        // beside its replacement.
        let mut ids = record_ids(&repo).await;
        ids.sort();
        assert_eq!(ids, vec![vec!["c-old", "t-1"], vec!["t-1"]]);
        assert!(tr.get(&old_name).await.is_ok());

        let grace0 = crate::prune::PruneOptions {
            grace: std::time::Duration::ZERO,
            ..Default::default()
        };
        // Before the retain-until: the prune retries nothing.
        lock.set_clock(t0 + hour / 2);
        let (_, r) = prune_completing(&repo, &grace0, t0 + hour / 2)
            .await
            .unwrap();
        assert_eq!((r.open, r.disposals_open), (0, 1));
        assert!(r.disposals[0].not_due, "{r:?}");
        assert!(r.disposals_completed.is_empty());
        assert!(tr.get(&old_name).await.is_ok());
        assert!(!hits(&repo, &tr, GONE).await.is_empty());
        assert_eq!(
            disposal_statuses(&repo).await.unwrap()[0].state,
            State::Pending
        );

        // After it: the old snapshot goes, then the disposed data.
        lock.set_clock(t0 + hour * 2);
        let (_, r) = prune_completing(&repo, &grace0, t0 + hour * 2)
            .await
            .unwrap();
        assert_eq!(r.disposals[0].removed.len(), 1, "{r:?}");
        assert_eq!(r.disposals[0].removed[0].object, old_name);
        assert!(tr.get(&old_name).await.is_err());
        let mut now = t0 + hour * 2;
        let mut rounds = 1;
        while disposal_statuses(&repo).await.unwrap()[0].state == State::Pending && rounds < 3 {
            now += hour;
            lock.set_clock(now);
            let (_, r) = prune_completing(&repo, &grace0, now).await.unwrap();
            assert!(r.errors.is_empty(), "{r:?}");
            rounds += 1;
        }
        let st = disposal_statuses(&repo).await.unwrap();
        assert_eq!(
            st[0].state,
            State::Complete,
            "after {rounds} prunes: {st:?}"
        );
        assert_eq!(st[0].completed, Some(now));
        assert_eq!(hits(&repo, &tr, GONE).await, Vec::<String>::new());
        // The progress documents are not log entries; nothing is open now.
        assert_eq!(disposal_log(&repo).await.unwrap().len(), 1);
        let (_, r) = prune_completing(&repo, &grace0, now + hour).await.unwrap();
        assert_eq!(r.disposals_open, 0);
        assert_eq!(record_ids(&repo).await, vec![vec!["t-1"]]);
        // The erasure side saw none of it.
        assert!(crate::erasures::statuses(&repo).await.unwrap().is_empty());
    }

    /// Forget keeps a snapshot holding a held record that newer snapshots
    /// no longer have (policy and explicit ids), and forgets it once the
    /// hold is released; holds by source, kind, collection and time range
    /// select the right snapshots.
    #[tokio::test]
    async fn holds_stop_rotation() {
        let repo = repo_on(Arc::new(StoreTarget::memory("m")) as TargetRef).await;
        let source = Listed {
            records: Mutex::new(vec![
                spec(
                    "chat",
                    "ana-1",
                    RecordKind::ChatMessage,
                    "2024-03-01T00:00:00Z",
                    None,
                    "ana@example.org",
                ),
                spec(
                    "mail",
                    "bo-1",
                    RecordKind::Email,
                    "2025-05-01T00:00:00Z",
                    None,
                    "bo@example.org",
                ),
            ]),
        };
        backup(&repo, &source).await;
        // Ana's message is deleted at the source: the mirror snapshot lacks it.
        source.records.lock().unwrap().remove(0);
        backup(&repo, &source).await;
        let snaps = snapshots(&repo).await;
        let (old, new) = (snaps[0].id, snaps[1].id);
        assert_eq!(
            record_ids(&repo).await,
            vec![vec!["ana-1", "bo-1"], vec!["bo-1"]]
        );
        let mut policy = Policy::default();
        policy.set_option("keep-last", "1").unwrap();
        let now = Utc::now();
        let removed = |groups: &[custos_schedules::retention::Group]| -> Vec<Id> {
            groups
                .iter()
                .flat_map(|g| g.removed().filter_map(|d| Id::from_hex(&d.id)))
                .collect()
        };

        // No hold: the old snapshot goes.
        let groups = crate::forget::plan(&repo, &snaps, &policy, now, GroupBy::DEFAULT, false)
            .await
            .unwrap();
        assert_eq!(removed(&groups), vec![old]);

        let mut case = hold("case-ana", "2026-01-01T00:00:00Z");
        case.customer = Some("ana@example.org".into());
        write_hold(&repo, &case).await.unwrap();
        let groups = crate::forget::plan(&repo, &snaps, &policy, now, GroupBy::DEFAULT, false)
            .await
            .unwrap();
        assert!(removed(&groups).is_empty(), "{groups:?}");
        let d = groups[0]
            .decisions
            .iter()
            .find(|d| d.id == old.to_hex())
            .unwrap();
        assert!(d.keep);
        assert_eq!(
            d.reasons,
            vec![Reason::Hold {
                name: "case-ana".into()
            }]
        );
        assert!(d.explain().contains("hold case-ana"), "{}", d.explain());
        // Named by id: refused, naming the hold and the snapshot.
        let err = crate::forget::select(&repo, &snaps, &[old.to_hex()])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("case-ana") && err.contains(&old.short()),
            "{err}"
        );
        assert_eq!(
            crate::forget::select(&repo, &snaps, &[new.to_hex()[..8].to_string()])
                .await
                .unwrap(),
            vec![new]
        );

        // Other hold scopes, matched against both snapshots.
        let both: Vec<&SnapshotEntry> = snaps.iter().collect();
        let check = |h: HoldDoc, want: Vec<Id>| {
            let repo = &repo;
            let both = &both;
            async move {
                let got = held_snapshots(repo, std::slice::from_ref(&h), both)
                    .await
                    .unwrap();
                let ids: Vec<Id> = got.keys().copied().collect();
                let mut want = want;
                want.sort();
                assert_eq!(ids, want, "{h:?}");
                for names in got.values() {
                    assert_eq!(names, &vec![h.name.clone()]);
                }
            }
        };
        let mut h = hold("by-source", "2026-01-01T00:00:00Z");
        h.source = Some("support".into());
        check(h.clone(), vec![old, new]).await;
        h.source = Some("elsewhere".into());
        check(h, vec![]).await;
        let mut h = hold("by-kind", "2026-01-01T00:00:00Z");
        h.kind = Some("chat_message".into());
        check(h.clone(), vec![old]).await;
        h.kind = Some("email".into());
        check(h.clone(), vec![old, new]).await;
        h.kind = Some("ticket".into());
        check(h, vec![]).await;
        let mut h = hold("by-collection", "2026-01-01T00:00:00Z");
        h.collection = Some("chat".into());
        check(h, vec![old]).await;
        let mut h = hold("by-time", "2026-01-01T00:00:00Z");
        h.from = Some(t("2024-01-01T00:00:00Z"));
        h.until = Some(t("2025-01-01T00:00:00Z"));
        check(h.clone(), vec![old]).await;
        h.until = Some(t("2024-03-01T00:00:00Z")); // exclusive
        check(h.clone(), vec![]).await;
        h.from = Some(t("2025-05-01T00:00:00Z")); // inclusive
        h.until = None;
        check(h, vec![old, new]).await;

        // Released: the old snapshot goes.
        let mut release = hold("case-ana", "2026-02-01T00:00:00Z");
        release.action = HoldAction::Release;
        write_hold(&repo, &release).await.unwrap();
        let groups = crate::forget::plan(&repo, &snaps, &policy, now, GroupBy::DEFAULT, false)
            .await
            .unwrap();
        assert_eq!(removed(&groups), vec![old]);
        assert_eq!(
            crate::forget::select(&repo, &snaps, &[old.to_hex()])
                .await
                .unwrap(),
            vec![old]
        );
    }
}
