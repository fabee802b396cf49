//! `custos locks extend`: keep Object Lock retention ahead of what is still needed.
//!
//! The rule (README, "Object Lock"): on a target with `object_lock = { mode,
//! period }` every snapshot is immutable until its *horizon*, the later of
//! its own retain-until and its upload time + `period`. Every object a
//! snapshot needs must stay locked at least until that snapshot's horizon:
//! its tree and data packs, the index objects describing those packs, and
//! the repository's `config` and `keys/` (needed to read anything). So each
//! object's required retain-until is the latest horizon among the snapshots
//! that still need it; `locks extend` raises every retain-until below that
//! (never shortens). Objects written with the lock already carry upload time
//! plus `period`; extension matters for data a newer snapshot deduplicated
//! against, whose original lock runs out before the newer snapshot's.
//!
//! Snapshots whose horizon has passed need nothing (they may be forgotten),
//! nor do snapshots an erasure or `retention apply` replaced (superseded,
//! kept only by their own lock).
//! Packs and index objects of pending prune marks are extended only when a
//! needed blob has no other copy. Between two runs an object's lock can lapse
//! only if it was deduplicated by a snapshot made less than one run interval
//! before its original lock ends: run it (daemon job `lock_extend`) at an
//! interval much shorter than `period`, e.g. daily for `30d`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::blob::BlobType;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::repo::Repository;
use crate::tree::{parse_tree, TreeDoc};

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
        // Horizon of every snapshot on this target.
        let listed = match t.list("snapshots/").await {
            Ok(l) => l,
            Err(e) => {
                tl.errors.push(e.to_string());
                report.targets.push(tl);
                continue;
            }
        };
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
            let own = match t.locked_until(&m.name).await {
                Ok(v) => v,
                Err(e) => {
                    tl.errors.push(e.to_string());
                    None
                }
            };
            let horizon = own.max(Some(lock.until(m.modified))).expect("some");
            if horizon <= now {
                continue;
            }
            if let Some(s) = snapshots.iter().find(|s| s.id == id) {
                need.insert(m.name.clone(), horizon);
                roots.push((horizon, s.snapshot.tree));
                cursor_roots.extend(s.snapshot.cursor_blobs().map(|c| (horizon, c)));
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
            let mut stack = vec![root];
            while let Some(tree) = stack.pop() {
                if blob_horizon.contains_key(&tree) {
                    continue;
                }
                blob_horizon.insert(tree, horizon);
                let plain = repo.read_blob(&index, BlobType::Tree, &tree).await?;
                match parse_tree(&tree, &plain)? {
                    TreeDoc::Split { parts } => stack.extend(parts.iter().map(|p| p.tree)),
                    TreeDoc::Leaf { nodes } => {
                        for n in nodes {
                            for c in &n.content {
                                blob_horizon.entry(*c).or_insert(horizon);
                            }
                            stack.extend(n.subtree);
                        }
                    }
                }
            }
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
        // What reading anything needs: config and keys, until the latest horizon.
        let latest = need.values().max().copied();
        tl.horizon = latest;
        if let Some(latest) = latest {
            need.insert("config".into(), latest);
            // Data keys too (format 2): without them no content opens.
            for folder in ["keys/", "datakeys/"] {
                match t.list(folder).await {
                    Ok(keys) => {
                        for k in keys {
                            need.insert(k.name, latest);
                        }
                    }
                    Err(e) => tl.errors.push(e.to_string()),
                }
            }
        }
        tl.objects = need.len();
        let mut names: Vec<_> = need.into_iter().collect();
        names.sort();
        for (name, until) in names {
            match t.locked_until(&name).await {
                Ok(Some(cur)) if cur >= until => tl.current += 1,
                Ok(_) if dry_run => tl.extended += 1,
                Ok(_) => match t.extend_lock(&name, until).await {
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
