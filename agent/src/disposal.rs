//! Record retention and legal holds.
//!
//! `retention apply` removes records past their retention (rules in
//! `custos_schedules::record_retention`, most specific wins, age from the
//! record's own creation time) from every retained snapshot of a record
//! source: the affected partitions, collection lists and root are rewritten,
//! a new snapshot object replaces the old one, and an entry is appended to
//! the disposal log (`disposals/`: what class, how many, when, under which
//! rule). The data itself goes with the next `prune`.
//!
//! Legal holds (`holds/`) override every rule: a record a hold matches is
//! never removed, whatever its age. Holds are immutable objects: placing and
//! releasing are two documents; a hold is active while its latest document
//! places it.

use std::collections::BTreeMap;
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
}

impl HoldDoc {
    /// Does this hold cover the record `node` of `source`/`collection`?
    pub fn covers(&self, source: &str, collection: &str, node: &Node) -> bool {
        self.source.as_deref().is_none_or(|s| s == source)
            && self.collection.as_deref().is_none_or(|c| c == collection)
            && Filter {
                customer: self.customer.clone(),
                kind: self.kind.clone(),
                ..Filter::default()
            }
            .matches(node)
    }
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
    /// Replaced snapshots an Object Lock keeps until their retain-until.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub locked: Vec<crate::target::LockedObject>,
}

struct Walk<'a> {
    policy: &'a RecordPolicy,
    holds: &'a [HoldDoc],
    now: DateTime<Utc>,
    counts: BTreeMap<(String, String, String), u64>,
    held: u64,
    undated: u64,
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
                *self
                    .counts
                    .entry((d.rule, kind, snap.source.clone()))
                    .or_default() += 1;
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
    let log = DisposalDoc {
        time: now,
        removed: report.removed.clone(),
        held: report.held,
        snapshots: pairs,
    };
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Disposal, &log)
        .await;
    for r in results {
        r?;
    }
    report.disposal_log = Some(id);
    Ok(report)
}

/// The disposal log, oldest first.
pub async fn disposal_log(repo: &Repository) -> Result<Vec<(Id, DisposalDoc)>> {
    let mut out = Vec::new();
    for id in repo.list_ids(ObjectKind::Disposal).await? {
        out.push((
            id,
            repo.load_object::<DisposalDoc>(ObjectKind::Disposal, &id)
                .await?,
        ));
    }
    out.sort_by_key(|(_, d)| d.time);
    Ok(out)
}
