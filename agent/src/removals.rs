//! Removal records (`removals/<hex>`): what `forget` and `prune` deleted.
//!
//! Deletions reach only the targets that answer. A target that was down
//! still holds what was removed, and `sync` copies whatever any target holds
//! — so without a record, a forgotten snapshot (or a pack prune deleted)
//! would come back from the lagging target. Before deleting, `forget` and
//! `prune` write an immutable record naming every object they remove, to
//! every reachable target (it replicates like everything else). `sync`
//! never copies a removed object and deletes it from a target that still
//! holds it; snapshots an erasure or `retention apply` superseded (named as
//! `old` in their records) count as removed too.
//!
//! Object names are content hashes of sealed bytes with random nonces, so a
//! removed name is never written again: a record stays true for ever.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::object::ObjectKind;
use crate::repo::Repository;

/// The sealed document of a `removals/<id>` object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RemovalRecord {
    /// When it was written (client clock).
    pub time: DateTime<Utc>,
    /// The command that removed the objects: `forget` or `prune`.
    pub command: String,
    /// Object names removed (`snapshots/<hex>`, `index/<hex>`, `data/ab/<hex>`, …).
    pub objects: Vec<String>,
}

/// Write a removal record for `objects` to every reachable target. Fails
/// (naming the target) unless every target stored it: the caller must then
/// not delete anything.
pub async fn record(repo: &Repository, command: &str, objects: &[String]) -> Result<Id> {
    let doc = RemovalRecord {
        time: Utc::now(),
        command: command.to_string(),
        objects: objects.to_vec(),
    };
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Removal, &doc)
        .await;
    for (t, r) in repo.targets().iter().zip(results) {
        if let Err(e) = r {
            return Err(Error::Failed(format!(
                "target {}: the removal record could not be written, nothing was deleted: {e}",
                t.name()
            )));
        }
    }
    Ok(id)
}

/// Every object name removed so far: all removal records, plus the snapshots
/// erasures and record retention superseded. Unreadable records are
/// returned as warnings (their objects are then not known to be removed).
pub async fn removed(repo: &Repository) -> Result<(HashSet<String>, Vec<String>)> {
    let mut out = HashSet::new();
    let mut warnings = Vec::new();
    for id in repo.list_ids(ObjectKind::Removal).await? {
        match repo
            .load_object::<RemovalRecord>(ObjectKind::Removal, &id)
            .await
        {
            Ok(r) => out.extend(r.objects),
            Err(e) => warnings.push(e.to_string()),
        }
    }
    match crate::erasures::superseded(repo).await {
        Ok(ids) => out.extend(ids.iter().map(|id| ObjectKind::Snapshot.name(id))),
        Err(e) => warnings.push(format!("superseded snapshots unknown: {e}")),
    }
    Ok((out, warnings))
}
