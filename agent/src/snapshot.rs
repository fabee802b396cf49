//! Snapshots: a named, timed root tree plus summary counts.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::Id;

/// The JSON document of a snapshot object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// When the backup started (UTC).
    pub time: chrono::DateTime<chrono::Utc>,
    /// IANA time zone of the source, used for calendar retention periods.
    pub time_zone: String,
    /// Source name: a configured `[[source]]` name, or `files` for ad-hoc paths.
    pub source: String,
    /// Backed-up paths (directory sources).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Host that made the snapshot.
    pub hostname: String,
    /// User that made the snapshot.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub username: String,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Root tree blob.
    pub tree: Id,
    /// Snapshot this one was made incrementally against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Id>,
    /// Counts.
    pub summary: Summary,
    /// Type of the source (`directory`, `imap`, `mbox` …); absent for ad-hoc paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_type: Option<String>,
    /// Record sources: per collection, the connector's cursor after this
    /// snapshot and when the collection was last listed in full. Committed
    /// with the tree, so the next run continues exactly where this one ended.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub cursors: std::collections::BTreeMap<String, CollectionCursor>,
    /// Record sources: the customer index of this snapshot (`customers/<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_index: Option<Id>,
    /// Program and version that wrote it.
    pub program: String,
}

/// A connector cursor whose JSON is longer than this many bytes is stored in
/// tree blobs ([`CollectionCursor::cursor_blobs`]) instead of inline, so
/// snapshot documents stay small: every command that lists snapshots reads
/// them all, while only the next backup of the source needs the cursor.
pub const CURSOR_INLINE_MAX: usize = 4096;

/// A record collection's sync position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectionCursor {
    /// The connector's own cursor (opaque JSON); `null` when it is stored in
    /// `cursor_blobs`.
    pub cursor: serde_json::Value,
    /// Tree blobs whose plaintexts, concatenated in order, are the cursor's
    /// JSON (cursors longer than [`CURSOR_INLINE_MAX`]); empty when inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cursor_blobs: Vec<Id>,
    /// When the collection was last listed in full (reconciliation).
    pub full_sync: chrono::DateTime<chrono::Utc>,
}

/// Summary counts of a backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Summary {
    pub files_new: u64,
    pub files_changed: u64,
    pub files_unmodified: u64,
    pub dirs: u64,
    pub total_files: u64,
    pub total_bytes: u64,
    pub data_blobs_added: u64,
    pub tree_blobs_added: u64,
    /// Plaintext bytes of new blobs.
    pub bytes_added: u64,
    /// Stored (compressed, sealed) bytes of new blobs.
    pub bytes_stored: u64,
    /// Source items that could not be read (named in the backup output).
    pub unreadable: u64,
    pub duration_seconds: f64,
    /// Record sources: records fetched that were new.
    pub records_new: u64,
    /// Records fetched that replaced a stored version (content or metadata).
    pub records_changed: u64,
    /// Records carried forward from the parent snapshot without being fetched.
    pub records_unchanged: u64,
    /// Records deleted at the source in this run (removed in mirror mode, marked in archive mode).
    pub records_deleted: u64,
    /// Records in the snapshot (archive mode: including those marked deleted).
    pub records_total: u64,
    /// Collections in the snapshot.
    pub collections: u64,
    /// Records not stored because they name a customer in the suppression ledger.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub records_suppressed: u64,
}

impl CollectionCursor {
    /// A cursor held inline (not yet stored; see `Saver::save_cursor`).
    pub fn inline(
        cursor: serde_json::Value,
        full_sync: chrono::DateTime<chrono::Utc>,
    ) -> CollectionCursor {
        CollectionCursor {
            cursor,
            cursor_blobs: Vec::new(),
            full_sync,
        }
    }
}

impl Snapshot {
    /// The tree blobs holding this snapshot's stored cursors: referenced by
    /// the snapshot like its tree (prune, check, locks and the commit's
    /// rescue of marked packs keep them).
    pub fn cursor_blobs(&self) -> impl Iterator<Item = Id> + '_ {
        self.cursors
            .values()
            .flat_map(|c| c.cursor_blobs.iter().copied())
    }

    /// The document as JSON for listings (`snapshots --json`): an inline
    /// cursor longer than [`CURSOR_INLINE_MAX`] (written before cursor
    /// blobs existed) is shown as `null` with its size in `cursor_bytes`.
    pub fn listing_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("snapshot json");
        for (coll, c) in &self.cursors {
            let len = serde_json::to_vec(&c.cursor).map_or(0, |j| j.len());
            if len > CURSOR_INLINE_MAX {
                v["cursors"][coll]["cursor"] = serde_json::Value::Null;
                v["cursors"][coll]["cursor_bytes"] = serde_json::json!(len);
            }
        }
        v
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A snapshot with its id.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub id: Id,
    pub snapshot: Snapshot,
}

/// Find one snapshot by `latest`, a full id or a unique prefix.
pub fn find<'a>(all: &'a [SnapshotEntry], spec: &str) -> Result<&'a SnapshotEntry> {
    if spec == "latest" {
        return all
            .iter()
            .max_by_key(|s| s.snapshot.time)
            .ok_or_else(|| Error::Snapshot("latest: the repository holds no snapshot".into()));
    }
    if spec.len() < 4 || !spec.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::Snapshot(format!(
            "{spec:?}: give `latest`, or at least 4 hex digits of an id"
        )));
    }
    let spec_l = spec.to_ascii_lowercase();
    let mut hits = all.iter().filter(|s| s.id.to_hex().starts_with(&spec_l));
    match (hits.next(), hits.next()) {
        (Some(s), None) => Ok(s),
        (None, _) => Err(Error::Snapshot(format!("{spec} not found"))),
        (Some(_), Some(_)) => Err(Error::Snapshot(format!(
            "{spec} is ambiguous: give more digits"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inline cursors (also those written before `cursor_blobs` existed)
    /// parse as before; a stored one keeps only its blob ids; an unknown
    /// field is still refused.
    #[test]
    fn cursor_entries_inline_and_in_blobs() {
        let old: CollectionCursor = serde_json::from_str(
            r#"{"cursor": {"v": 1, "digests": "00ff"}, "full_sync": "2026-11-22T00:00:00Z"}"#,
        )
        .unwrap();
        assert!(old.cursor_blobs.is_empty());
        assert_eq!(old.cursor["digests"], "00ff");
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("cursor_blobs"), "{json}");
        let id = Id([7; 32]);
        let stored = CollectionCursor {
            cursor: serde_json::Value::Null,
            cursor_blobs: vec![id],
            full_sync: old.full_sync,
        };
        let json = serde_json::to_string(&stored).unwrap();
        assert!(json.contains(&id.to_hex()), "{json}");
        assert_eq!(
            serde_json::from_str::<CollectionCursor>(&json).unwrap(),
            stored
        );
        assert!(serde_json::from_str::<CollectionCursor>(
            r#"{"cursor": null, "cursor_blob": "00", "full_sync": "2026-11-22T00:00:00Z"}"#
        )
        .is_err());
    }

    /// Listings show a large inline cursor by its size, a small one as it is.
    #[test]
    fn listing_json_hides_large_inline_cursors() {
        let full_sync = chrono::Utc::now();
        let big = serde_json::json!({ "digests": "0".repeat(CURSOR_INLINE_MAX) });
        let snap = Snapshot {
            time: full_sync,
            time_zone: "UTC".into(),
            source: "mail".into(),
            paths: vec![],
            hostname: "h".into(),
            username: String::new(),
            tags: vec![],
            tree: Id([1; 32]),
            parent: None,
            summary: Summary::default(),
            source_type: Some("mbox".into()),
            cursors: [
                (
                    "big".to_string(),
                    CollectionCursor::inline(big.clone(), full_sync),
                ),
                (
                    "small".to_string(),
                    CollectionCursor::inline(serde_json::json!(42), full_sync),
                ),
            ]
            .into(),
            customer_index: None,
            program: "custos test".into(),
        };
        let v = snap.listing_json();
        assert_eq!(v["cursors"]["big"]["cursor"], serde_json::Value::Null);
        assert_eq!(
            v["cursors"]["big"]["cursor_bytes"],
            serde_json::to_vec(&big).unwrap().len()
        );
        assert_eq!(v["cursors"]["small"]["cursor"], 42);
        assert!(v["cursors"]["small"].get("cursor_bytes").is_none());
    }
}
