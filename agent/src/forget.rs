//! `forget`: remove snapshots, chosen by id or by a retention policy.
//!
//! The policy itself is a pure function in `custos_schedules::retention`
//! (semantics documented there and in README). This module adapts snapshots
//! to it and deletes the `snapshots/<id>` objects on every target. Data that
//! only forgotten snapshots referenced stays in packs until prune removes it.
//!
//! Legal holds override rotation: [`plan`] keeps every snapshot the policy
//! would remove that holds a record an active hold covers (reason
//! `hold <name>`), and [`select`] refuses snapshots named by id that a hold
//! covers.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use custos_schedules::retention::{self, GroupBy, Policy, Reason, SnapshotInfo};
use futures::future::join_all;

use crate::disposal::{active_holds, held_snapshots};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::ObjectKind;
use crate::repo::Repository;
use crate::snapshot::SnapshotEntry;
use crate::target::{LockedObject, Purge};

/// What the policy needs of a snapshot.
pub fn snapshot_info(s: &SnapshotEntry) -> SnapshotInfo {
    SnapshotInfo {
        id: s.id.to_hex(),
        time: s.snapshot.time,
        time_zone: s.snapshot.time_zone.clone(),
        tags: s.snapshot.tags.clone(),
        source: s.snapshot.source.clone(),
        hostname: s.snapshot.hostname.clone(),
        paths: s.snapshot.paths.clone(),
    }
}

/// Apply `policy` at `now`, then keep what legal holds cover: a snapshot
/// the policy would remove that holds a record an active hold covers is
/// kept with the reason `hold <name>`. Refuses a group left empty unless
/// `allow_empty`.
pub async fn plan(
    repo: &Repository,
    snapshots: &[SnapshotEntry],
    policy: &Policy,
    now: DateTime<Utc>,
    group_by: &[GroupBy],
    allow_empty: bool,
) -> Result<Vec<retention::Group>> {
    let infos: Vec<SnapshotInfo> = snapshots.iter().map(snapshot_info).collect();
    let mut groups = retention::apply(policy, &infos, now, group_by)
        .map_err(|e| Error::Config(format!("retention policy: {e}")))?;
    let holds = active_holds(repo).await?;
    if !holds.is_empty() {
        // Only the snapshots that would otherwise go are examined.
        let doomed: HashSet<String> = groups
            .iter()
            .flat_map(|g| g.removed().map(|d| d.id.clone()))
            .collect();
        let candidates: Vec<&SnapshotEntry> = snapshots
            .iter()
            .filter(|s| doomed.contains(&s.id.to_hex()))
            .collect();
        let held = held_snapshots(repo, &holds, &candidates).await?;
        for d in groups.iter_mut().flat_map(|g| g.decisions.iter_mut()) {
            let Some(names) = Id::from_hex(&d.id).and_then(|id| held.get(&id)) else {
                continue;
            };
            d.keep = true;
            d.reasons
                .extend(names.iter().map(|name| Reason::Hold { name: name.clone() }));
        }
    }
    if !allow_empty {
        if let Some(g) = groups.iter().find(|g| g.keeps_nothing()) {
            return Err(Error::Invalid(format!(
                "the policy would remove every snapshot of group {}: refusing \
                 (add a keep-last rule, or pass --allow-empty-group)",
                g.key
            )));
        }
    }
    Ok(groups)
}

/// Resolve snapshot ids or prefixes for removal (duplicates dropped);
/// refuses, removing nothing, when a legal hold covers a record in one of
/// them, naming the snapshot and the holds.
pub async fn select(
    repo: &Repository,
    snapshots: &[SnapshotEntry],
    specs: &[String],
) -> Result<Vec<Id>> {
    let mut ids: Vec<Id> = Vec::new();
    for spec in specs {
        let id = crate::snapshot::find(snapshots, spec)?.id;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let holds = active_holds(repo).await?;
    let chosen: Vec<&SnapshotEntry> = snapshots.iter().filter(|s| ids.contains(&s.id)).collect();
    let held = held_snapshots(repo, &holds, &chosen).await?;
    if let Some((id, names)) = held.iter().next() {
        return Err(Error::Invalid(format!(
            "snapshot {} is under legal hold {}: refusing to forget it (release the hold first){}",
            id.short(),
            names.join(", "),
            if held.len() > 1 {
                format!("; {} more named snapshot(s) are held", held.len() - 1)
            } else {
                String::new()
            }
        )));
    }
    Ok(ids)
}

/// What [`remove`] did not do.
#[derive(Debug, Default)]
pub struct Removal {
    /// One message per failed deletion.
    pub failures: Vec<String>,
    /// Snapshots an Object Lock keeps (on every target: a locked snapshot is
    /// left everywhere, so the targets keep agreeing), with the retain-until.
    pub locked: Vec<LockedObject>,
}

/// Delete snapshot objects on every target for good (every version on a
/// versioned bucket). A snapshot whose object is locked on some target is
/// skipped and reported, not an error. Before anything is deleted a removal
/// record names the snapshots (`removals/`), so a target that is unreachable
/// now never gets them back through `sync`.
pub async fn remove(repo: &Repository, ids: &[Id]) -> Removal {
    let mut out = Removal::default();
    let now = chrono::Utc::now();
    let mut names = Vec::new();
    for id in ids {
        let name = ObjectKind::Snapshot.name(id);
        let mut locked = Vec::new();
        for t in repo.targets().iter().filter(|t| t.object_lock().is_some()) {
            match t.locked_until(&name).await {
                Ok(Some(until)) if until > now => locked.push(LockedObject {
                    target: t.name().to_string(),
                    object: name.clone(),
                    retain_until: until,
                }),
                Ok(_) => {}
                Err(e) => out.failures.push(e.to_string()),
            }
        }
        if locked.is_empty() {
            names.push(name);
        } else {
            out.locked.extend(locked);
        }
    }
    if names.is_empty() {
        return out;
    }
    if let Err(e) = crate::removals::record(repo, "forget", &names).await {
        out.failures.push(e.to_string());
        return out;
    }
    for name in names {
        let results = join_all(repo.targets().iter().map(|t| t.purge(&name))).await;
        for (t, r) in repo.targets().iter().zip(results) {
            match r {
                Ok(Purge::Removed) => {}
                Ok(Purge::Locked(until)) => out.locked.push(LockedObject {
                    target: t.name().to_string(),
                    object: name.clone(),
                    retain_until: until,
                }),
                Err(e) => out.failures.push(e.to_string()),
            }
        }
    }
    out
}
