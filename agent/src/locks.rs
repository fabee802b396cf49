//! `custos locks extend`: keep Object Lock retention ahead of what is still needed.
//!
//! The rule (README, "Object Lock"): on a target with `object_lock = { mode,
//! period }` every object an existing snapshot needs — its tree and data
//! packs, the index objects describing them, its customer index objects —
//! however old the snapshot, stays locked; so do `config`, `keys/`,
//! `datakeys/` and the state and log folders (`STATE_FOLDERS`). Each run
//! raises the retain-until of such an object to now + `period` when it would
//! end within half a period, or before the *horizon* (upload time + `period`)
//! of a snapshot needing it; otherwise it is left alone, so each object is
//! extended about twice per period rather than at every run. Locks are never
//! shortened. Snapshot objects keep the lock they were written with: `forget`
//! may remove a snapshot once that ends, and its data is then no longer
//! extended. Run it (daemon job `lock_extend`) much more often than half the
//! period, e.g. daily for `30d`: between runs nothing needed loses its lock.
//!
//! Snapshots an erasure or `retention apply` replaced (superseded) need
//! nothing: extending their data would only postpone the erasure. Packs and
//! index objects of pending prune marks are extended only when a needed blob
//! has no other copy.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::repo::Reached;
use crate::repo::Repository;

/// Folders whose every object is extended: what reading anything needs
/// (keys, data keys) and the repository's state and logs (legal holds, the
/// disposal log, erasure records and progress, the suppression ledger,
/// removal records, the audit trail, verification records).
const STATE_FOLDERS: [&str; 9] = [
    "keys/",
    "datakeys/",
    "holds/",
    "disposals/",
    "erasures/",
    "suppressions/",
    "removals/",
    "audit/",
    "verifications/",
];

/// Per-target outcome of [`extend`].
#[derive(Debug, Default, Serialize)]
pub struct TargetLocks {
    pub target: String,
    /// Objects that need a lock now.
    pub objects: usize,
    /// Objects whose retain-until was raised (or would be, with dry run).
    pub extended: usize,
    /// Objects already locked long enough.
    pub current: usize,
    /// The latest required retain-until (the newest snapshot's horizon).
    pub horizon: Option<DateTime<Utc>>,
    pub errors: Vec<String>,
}

/// What [`extend`] did.
#[derive(Debug, Default, Serialize)]
pub struct LockReport {
    pub dry_run: bool,
    pub targets: Vec<TargetLocks>,
}

impl LockReport {
    pub fn errors(&self) -> usize {
        self.targets.iter().map(|t| t.errors.len()).sum()
    }
}

/// Extend retention on every target with `object_lock` (see the module docs).
pub async fn extend(repo: &Repository, dry_run: bool) -> Result<LockReport> {
    repo.require(crate::crypto::Role::Admin, "locks extend")?;
    let mut report = LockReport {
        dry_run,
        targets: Vec::new(),
    };
    if !repo.targets().iter().any(|t| t.object_lock().is_some()) {
        return Err(Error::Invalid(
            "no target has object_lock configured: nothing to extend".into(),
        ));
    }
    let (snapshots, warnings) = repo.snapshots().await?;
    if !warnings.is_empty() {
        return Err(Error::Failed(format!(
            "locks extend refuses to guess while a snapshot is unreadable: {}",
            warnings.join("; ")
        )));
    }
    // Snapshots an erasure or retention replaced need no lock: extending
    // theirs would only postpone the erasure.
    let superseded = crate::erasures::superseded(repo).await?;
    let files = crate::prune::index_files(repo).await?;
    let index = Index::from_files(files.iter().map(|(_, f)| f));
    let mut pending_packs = HashSet::new();
    let mut pending_index = HashSet::new();
    for (_, m) in crate::prune::load_marks(repo).await? {
        pending_packs.extend(m.packs);
        pending_index.extend(m.index);
    }
    // Blob -> every (pack object, index id) holding it, live copies first.
    let mut copies: HashMap<Id, Vec<(String, Id, bool)>> = HashMap::new();
    for (iid, f) in &files {
        for p in &f.packs {
            let doomed = pending_packs.contains(&p.id) || pending_index.contains(iid);
            for b in &p.blobs {
                copies
                    .entry(b.id)
                    .or_default()
                    .push((p.object_name(), *iid, doomed));
            }
        }
    }
    let now = Utc::now();
    for t in repo.targets() {
        let Some(lock) = t.object_lock() else {
            continue;
        };
        let mut tl = TargetLocks {
            target: t.name().to_string(),
            ..Default::default()
        };
        let period = chrono::Duration::from_std(lock.period).unwrap_or(chrono::Duration::MAX);
        // Every needed object is raised to now + period once its lock would
        // run out within half a period: between runs (much more often than
        // every half period) nothing needed loses its lock, and an object is
        // extended about twice per period, not at every run.
        let until = now + period;
        let renew_before = now + period / 2;
        // Horizon of every snapshot on this target: upload time + period
        // (the lock it was written with).
        let listed = match t.list("snapshots/").await {
            Ok(l) => l,
            Err(e) => {
                tl.errors.push(e.to_string());
                report.targets.push(tl);
                continue;
            }
        };
        // Object -> the latest horizon of a snapshot needing it (its floor).
        let mut need: HashMap<String, DateTime<Utc>> = HashMap::new();
        let mut roots: Vec<(DateTime<Utc>, Id)> = Vec::new();
        let mut cursor_roots: Vec<(DateTime<Utc>, Id)> = Vec::new();
        for m in &listed {
            let Some(id) = m
                .name
                .rsplit('/')
                .next()
                .and_then(Id::from_hex)
                .filter(|id| !superseded.contains(id))
            else {
                continue;
            };
            let horizon = lock.until(m.modified);
            if let Some(s) = snapshots.iter().find(|s| s.id == id) {
                roots.push((horizon, s.snapshot.tree));
                cursor_roots.extend(s.snapshot.cursor_blobs().map(|c| (horizon, c)));
                // Its customer index (record sources) is read with it.
                if let Some(doc) = s.snapshot.customer_index {
                    let mut names = vec![ObjectKind::Customer.name(&doc)];
                    match crate::customer::index_parts(repo, Some(doc)).await {
                        Ok(parts) => {
                            names.extend(parts.values().map(|p| ObjectKind::Customer.name(p)))
                        }
                        Err(e) => tl.errors.push(e.to_string()),
                    }
                    for name in names {
                        let e = need.entry(name).or_insert(horizon);
                        *e = (*e).max(horizon);
                    }
                }
            }
        }
        // Walk trees, latest horizon first: the first visit of a blob carries
        // the latest horizon, so an already visited subtree is done.
        roots.sort_by_key(|r| std::cmp::Reverse(r.0));
        let mut blob_horizon: HashMap<Id, DateTime<Utc>> = HashMap::new();
        // Cursor blobs are leaves: the latest horizon of any snapshot naming one.
        for (horizon, c) in cursor_roots {
            let e = blob_horizon.entry(c).or_insert(horizon);
            *e = (*e).max(horizon);
        }
        for (horizon, root) in roots {
            repo.walk_reachable(&index, root, |reached| match reached {
                Reached::Tree(t) if blob_horizon.contains_key(t) => false,
                Reached::Tree(b) | Reached::Content(b) => {
                    blob_horizon.entry(*b).or_insert(horizon);
                    true
                }
            })
            .await?;
        }
        for (blob, horizon) in &blob_horizon {
            let Some(all) = copies.get(blob) else {
                continue;
            };
            let live: Vec<_> = all.iter().filter(|c| !c.2).collect();
            let chosen: Vec<_> = if live.is_empty() {
                all.iter().collect()
            } else {
                live
            };
            for (pack, iid, _) in chosen {
                for name in [pack.clone(), ObjectKind::Index.name(iid)] {
                    let e = need.entry(name).or_insert(*horizon);
                    *e = (*e).max(*horizon);
                }
            }
        }
        // What reading anything needs (config, keys, data keys) and the
        // repository's state and logs: kept as long as the repository is.
        need.insert("config".into(), now);
        for folder in STATE_FOLDERS {
            match t.list(folder).await {
                Ok(objects) => {
                    for o in objects {
                        need.entry(o.name).or_insert(now);
                    }
                }
                Err(e) => tl.errors.push(e.to_string()),
            }
        }
        tl.objects = need.len();
        tl.horizon = Some(until);
        let mut names: Vec<_> = need.into_iter().collect();
        names.sort();
        // Ask (and extend) a few objects at a time.
        type Asked = (String, Result<Option<DateTime<Utc>>>, DateTime<Utc>);
        let results: Vec<Asked> =
            futures::stream::iter(names.into_iter().map(|(name, floor)| async move {
                let cur = t.locked_until(&name).await;
                (name, cur, floor)
            }))
            .buffered(8)
            .collect()
            .await;
        for (name, cur, floor) in results {
            let required = floor.max(renew_before);
            match cur {
                Ok(Some(cur)) if cur >= required => tl.current += 1,
                Ok(_) if dry_run => tl.extended += 1,
                Ok(_) => match t.extend_lock(&name, until.max(floor)).await {
                    Ok(()) => tl.extended += 1,
                    Err(e) => tl.errors.push(e.to_string()),
                },
                Err(e) if e.is_not_found() => {}
                Err(e) => tl.errors.push(e.to_string()),
            }
        }
        report.targets.push(tl);
    }
    Ok(report)
}
