//! `type = "maildir"`: a Maildir, with Maildir++ subfolders (`.Sent`,
//! `.Archive.2023`) or nested Maildirs (`Sent/cur`, …).
//!
//! - Collections: the root (named `INBOX`) when it has `cur/` or `new/`, and
//!   every folder below with `cur/` or `new/` (Maildir++ names lose their
//!   leading `.`).
//! - Record id: the unique part of the file name, before `:2,` (or before
//!   the first `:`), encoded with [`crate::ids::record_id`]; it survives the
//!   moves from `new/` to `cur/` and flag changes (renames).
//! - Meta: `flags` (IMAP names from the `:2,` suffix: D → `\Draft`,
//!   F → `\Flagged`, P → `$Forwarded`, R → `\Answered`, S → `\Seen`,
//!   T → `\Deleted`; sorted, space-joined), `maildir_flags` (the raw
//!   letters), `subdir` (`cur`/`new`), `folder`, `message_id`,
//!   `internal_date` (the file's mtime, RFC 3339), `size`, `blake3`, and
//!   `parsed_bytes` for a streamed message (below).
//! - Payload: the file's bytes. A file larger than `stream_threshold_mib`
//!   (default 8 MiB; `0` streams every file) is never read into memory: it is
//!   hashed in one streaming pass, its metadata is parsed from its first
//!   MiB only ([`crate::mime::PARSE_PREFIX`]; meta `parsed_bytes` says how
//!   many bytes were parsed), and the open file is handed on as
//!   `Payload::Reader` with its size. What lies beyond that MiB is not
//!   indexed: the text body is cut there, an attachment cut by it is
//!   described with an unknown size, and parts starting after it are not
//!   described (the payload still holds them all, byte-exact). A file
//!   rewritten between the hashing pass and the read would be stored with a
//!   `blake3` that does not match; Maildir files are never rewritten in
//!   place (flag changes are renames).
//! - Sync: full listing each time (`Reset`); files whose mtime and ctime are
//!   older than the previous sync's start are sent as `Keep` without being
//!   read, others (new, rewritten, renamed by a flag change) are read and
//!   sent as `Upsert`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{add_warnings, ctime_ns, io_err, mtime_ns, now_ns, FILE_CURSOR_VERSION};
use crate::ids::{collection_id, record_id};
use crate::mime::Content;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Record, RecordKind, Result,
};

/// A Maildir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaildirConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// The Maildir root (the folder holding `cur/`, `new/` and subfolders).
    pub path: PathBuf,
    /// Messages larger than this many MiB are streamed from the file instead
    /// of being read into memory; default 8.
    #[serde(default)]
    pub stream_threshold_mib: Option<u64>,
}

/// The Maildir connector.
#[derive(Debug)]
pub struct MaildirConnector {
    cfg: MaildirConfig,
}

impl MaildirConnector {
    /// A connector for `cfg`.
    pub fn new(cfg: MaildirConfig) -> MaildirConnector {
        MaildirConnector { cfg }
    }
}

/// Cursor of a listed multi-file collection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListingCursor {
    pub v: u32,
    pub kind: String,
    pub collection: String,
    /// When the previous listing started (ns since the epoch, minus a margin
    /// for coarse file-system clocks): files changed before it are `Keep`.
    pub watermark_ns: i64,
    /// Files that could not be read last time (read again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

/// Margin for kernels whose file timestamps lag the wall clock.
pub(crate) const WATERMARK_MARGIN_NS: i64 = 50_000_000;

impl ListingCursor {
    pub fn load(c: Option<&Cursor>, kind: &str, collection: &str) -> Option<ListingCursor> {
        let c: ListingCursor = serde_json::from_value(c?.clone()).ok()?;
        (c.v == FILE_CURSOR_VERSION && c.kind == kind && c.collection == collection).then_some(c)
    }

    /// Whether the file may be sent as `Keep` (unchanged since the watermark).
    pub fn unchanged(&self, rel: &str, md: &std::fs::Metadata) -> bool {
        mtime_ns(md).max(ctime_ns(md)) < self.watermark_ns && !self.skipped.iter().any(|s| s == rel)
    }
}

/// (unique part, raw flag letters) of a Maildir file name.
pub(crate) fn split_name(name: &str) -> (&str, &str) {
    if let Some((u, f)) = name.split_once(":2,") {
        return (u, f);
    }
    match name.split_once(':') {
        Some((u, _)) => (u, ""),
        None => (name, ""),
    }
}

/// IMAP flag names of Maildir flag letters, sorted and space-joined.
pub(crate) fn flag_names(letters: &str) -> String {
    let mut v: Vec<String> = letters
        .chars()
        .map(|c| match c {
            'D' => "\\Draft".to_string(),
            'F' => "\\Flagged".to_string(),
            'P' => "$Forwarded".to_string(),
            'R' => "\\Answered".to_string(),
            'S' => "\\Seen".to_string(),
            'T' => "\\Deleted".to_string(),
            other => format!("$maildir_{other}"),
        })
        .collect();
    v.sort();
    v.dedup();
    v.join(" ")
}

fn is_maildir(p: &Path) -> bool {
    p.join("cur").is_dir() || p.join("new").is_dir()
}

/// (display name, folder path) of every Maildir folder under `root`.
fn folders(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Err(io_err(
            root,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    if is_maildir(root) {
        out.push(("INBOX".to_string(), root.to_path_buf()));
    }
    let mut stack = vec![(root.to_path_buf(), String::new(), 0)];
    while let Some((dir, prefix, depth)) = stack.pop() {
        let rd = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?;
        for entry in rd.flatten() {
            let p = entry.path();
            if !p.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if matches!(name.as_str(), "cur" | "new" | "tmp") {
                continue;
            }
            let display = if depth == 0 && name.starts_with('.') && name.len() > 1 {
                name[1..].to_string()
            } else if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            if is_maildir(&p) {
                out.push((display.clone(), p.clone()));
            }
            if depth < 4 {
                stack.push((p, display, depth + 1));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Read `path` whole when it is at most `threshold` bytes, else hash it in one
/// streaming pass and keep it open for streaming.
pub(crate) fn read_content(
    path: &Path,
    md: &std::fs::Metadata,
    threshold: u64,
) -> std::io::Result<Content> {
    if md.len() <= threshold {
        return std::fs::read(path).map(Content::Bytes);
    }
    Content::spool(std::fs::File::open(path)?)
}

pub(crate) fn build_email_record(
    source: &str,
    coll: &Collection,
    id: String,
    content: Content,
    mut meta: BTreeMap<String, String>,
    mtime: Option<DateTime<Utc>>,
) -> Record {
    let (info, payload) = content.into_payload(&mut meta);
    if let Some(m) = &info.message_id {
        meta.insert("message_id".into(), m.clone());
    }
    if let Some(t) = mtime {
        meta.insert("internal_date".into(), t.to_rfc3339());
    }
    add_warnings(&mut meta, &info.warnings, source, &coll.id, &id);
    Record {
        id,
        collection: coll.id.clone(),
        kind: RecordKind::Email,
        created: info.created.or(mtime),
        updated: None,
        participants: info.participants,
        customer_ids: info.customer_ids,
        jurisdiction: None,
        subject: info.subject,
        text: info.text,
        attachments: info.attachments,
        payload,
        payload_ext: "eml".into(),
        deleted: false,
        meta,
    }
}

pub(crate) fn file_time(md: &std::fs::Metadata) -> Option<DateTime<Utc>> {
    md.modified().ok().map(DateTime::<Utc>::from)
}

/// Outcome of listing one file of a multi-file collection.
pub(crate) enum Listed {
    Keep,
    Read(Content),
    Skipped,
}

/// Read a file (streamed when over `threshold` bytes, see [`read_content`])
/// unless the cursor says it is unchanged; unreadable → skipped.
pub(crate) fn list_one(
    source: &str,
    coll: &str,
    old: Option<&ListingCursor>,
    rel: &str,
    path: &Path,
    md: &std::fs::Metadata,
    threshold: u64,
) -> Listed {
    if old.is_some_and(|o| o.unchanged(rel, md)) {
        return Listed::Keep;
    }
    match read_content(path, md, threshold) {
        Ok(b) => Listed::Read(b),
        Err(e) => {
            tracing::warn!(source, collection = coll, file = %path.display(), error = %e, "unreadable_file: skipped");
            Listed::Skipped
        }
    }
}

#[async_trait]
impl Connector for MaildirConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: true,
            reports_edits: true,
            has_attachments: true,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        let f = folders(&self.cfg.path)?;
        Ok(Health {
            summary: format!("Maildir {}: {} folders", self.cfg.path.display(), f.len()),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        Ok(folders(&self.cfg.path)?
            .into_iter()
            .map(|(name, _)| Collection {
                id: collection_id(&name),
                name,
            })
            .collect())
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let dir = folders(&self.cfg.path)?
            .into_iter()
            .find(|(n, _)| collection_id(n) == coll.id)
            .map(|(_, p)| p)
            .ok_or_else(|| ConnectorError::Unavailable {
                source_name: self.cfg.name.clone(),
                detail: format!("Maildir folder {:?} not found", coll.name),
            })?;
        let started = now_ns() - WATERMARK_MARGIN_NS;
        let old = ListingCursor::load(cursor, "maildir", &coll.id);
        sink.push(Change::Reset).await?;
        let mut seen_ids = std::collections::BTreeSet::new();
        let mut skipped = Vec::new();
        let (mut kept, mut read) = (0usize, 0usize);
        for sub in ["cur", "new"] {
            let d = dir.join(sub);
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let fname = entry.file_name().to_string_lossy().into_owned();
                if fname.starts_with('.') {
                    continue;
                }
                let Ok(md) = entry.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                let (unique, letters) = split_name(&fname);
                let id = record_id(unique);
                if !seen_ids.insert(id.clone()) {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %fname, "duplicate_maildir_id: a second file with the same unique name skipped");
                    continue;
                }
                let rel = format!("{sub}/{fname}");
                match list_one(
                    &self.cfg.name,
                    &coll.id,
                    old.as_ref(),
                    &rel,
                    &entry.path(),
                    &md,
                    crate::mime::stream_threshold(self.cfg.stream_threshold_mib),
                ) {
                    Listed::Keep => {
                        kept += 1;
                        sink.push(Change::Keep { id }).await?;
                    }
                    Listed::Skipped => skipped.push(rel),
                    Listed::Read(content) => {
                        read += 1;
                        let mut meta = BTreeMap::new();
                        meta.insert("folder".into(), coll.name.clone());
                        meta.insert("subdir".into(), sub.into());
                        meta.insert("flags".into(), flag_names(letters));
                        meta.insert("maildir_flags".into(), letters.to_string());
                        meta.insert("file_name".into(), fname.clone());
                        let rec = build_email_record(
                            &self.cfg.name,
                            coll,
                            id,
                            content,
                            meta,
                            file_time(&md),
                        );
                        sink.push(Change::Upsert(rec)).await?;
                    }
                }
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, kept, read, skipped = skipped.len(), "maildir: listed");
        let cur = ListingCursor {
            v: FILE_CURSOR_VERSION,
            kind: "maildir".into(),
            collection: coll.id.clone(),
            watermark_ns: started,
            skipped,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
