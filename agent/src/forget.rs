//! `forget`: remove snapshots, chosen by id or by a retention policy.
//!
//! The policy itself is a pure function in `custos_schedules::retention`
//! (semantics documented there and in README). This module adapts snapshots
//! to it and deletes the `snapshots/<id>` objects on every target. Data that
//! only forgotten snapshots referenced stays in packs until prune removes it.

use chrono::{DateTime, Utc};
use custos_schedules::retention::{self, GroupBy, Policy, SnapshotInfo};
use futures::future::join_all;

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

/// Apply `policy` at `now`; refuses a group the policy would empty unless `allow_empty`.
pub fn plan(
    snapshots: &[SnapshotEntry],
    policy: &Policy,
    now: DateTime<Utc>,
    group_by: &[GroupBy],
    allow_empty: bool,
) -> Result<Vec<retention::Group>> {
    let infos: Vec<SnapshotInfo> = snapshots.iter().map(snapshot_info).collect();
    let groups = retention::apply(policy, &infos, now, group_by)
        .map_err(|e| Error::Config(format!("retention policy: {e}")))?;
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
