//! Export-file sources: mbox, Maildir, `.eml` folders, Slack exports, CSV and
//! JSONL exports.
//!
//! All of them report deletions by listing (capability `reports_deletions`):
//! - single-file collections (an mbox, a CSV or JSONL file) keep a cursor of
//!   the file's size, mtime and the BLAKE3 of its first 64 KiB and of the
//!   last 4 KiB it had: an unchanged file yields no change at all, a file that
//!   only grew (append-only export) is read from the old end on (only the new
//!   records are fetched), anything else is a rewrite → `Change::Reset` and
//!   a full read;
//! - multi-file collections (a Maildir folder, an `.eml` folder, a Slack
//!   channel) are listed in full each time (`Reset` first): files that did
//!   not change since the last sync are sent as `Keep` without being read.
//!
//! File reads are blocking (`std::fs`) and happen on the calling task; custos
//! drives connectors from a multi-threaded runtime.
//!
//! Malformed input never stops a sync: a record that can be archived is
//! archived byte-exact with a `warning` in its meta (and a `tracing` warning);
//! one that cannot (no id) is skipped with a named warning.

mod csv;
mod eml;
mod jsonl;
mod maildir;
mod mbox;
pub(crate) mod slack;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

pub use self::csv::{CsvConfig, CsvConnector};
pub use eml::{EmlFolderConfig, EmlFolderConnector};
pub use jsonl::{JsonlConfig, JsonlConnector};
pub use maildir::{MaildirConfig, MaildirConnector};
pub use mbox::{mbox_entry, MboxConfig, MboxConnector};
pub use slack::{SlackExportConfig, SlackExportConnector};

use crate::ids::collection_id;
use crate::{Collection, ConnectorError, Result};

/// Bytes hashed at the start of a file to recognise it.
const HEAD_BYTES: u64 = 64 * 1024;
/// Bytes hashed at the old end of a file to recognise an append.
const TAIL_BYTES: u64 = 4 * 1024;

pub(crate) fn io_err(path: &Path, e: std::io::Error) -> ConnectorError {
    ConnectorError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Files of a source `path`: the file itself, or the files directly in the
/// folder whose extension is `ext` (case-insensitive), sorted by name.
pub(crate) fn list_files(path: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| io_err(path, e))? {
        let entry = entry.map_err(|e| io_err(path, e))?;
        let p = entry.path();
        let is_ext = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case(ext));
        if is_ext && p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// One collection per file: id from the file stem, name = the file name.
pub(crate) fn file_collections(files: &[PathBuf]) -> Vec<Collection> {
    files
        .iter()
        .map(|p| Collection {
            id: collection_id(&p.file_stem().unwrap_or_default().to_string_lossy()),
            name: p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        })
        .collect()
}

/// The file behind a file collection.
pub(crate) fn file_for(source: &str, path: &Path, ext: &str, coll: &Collection) -> Result<PathBuf> {
    let files = list_files(path, ext)?;
    let colls = file_collections(&files);
    colls
        .iter()
        .position(|c| c.id == coll.id)
        .map(|i| files[i].clone())
        .ok_or_else(|| ConnectorError::Unavailable {
            source_name: source.to_string(),
            detail: format!("{}: no file for collection {:?}", path.display(), coll.id),
        })
}

pub(crate) fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Last status change (Unix ctime: set by every write and rename, and not
/// settable by tools that copy mtimes); mtime elsewhere.
pub(crate) fn ctime_ns(m: &std::fs::Metadata) -> i64 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        m.ctime() * 1_000_000_000 + m.ctime_nsec()
    }
    #[cfg(not(unix))]
    {
        mtime_ns(m)
    }
}

pub(crate) fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn hash_range(f: &mut std::fs::File, from: u64, len: u64) -> std::io::Result<String> {
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity(len as usize);
    f.take(len).read_to_end(&mut buf)?;
    Ok(blake3::hash(&buf).to_hex()[..32].to_string())
}

/// The identity of a single-file collection's extent that was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileState {
    /// Bytes read (the file's size when the sync started).
    pub size: u64,
    /// Modification time then (ns since the epoch).
    pub mtime_ns: i64,
    /// BLAKE3 (truncated) of the first `min(size, 64 KiB)` bytes.
    pub head: String,
    /// BLAKE3 (truncated) of the last `min(size, 4 KiB)` bytes.
    pub tail: String,
    /// Whether the extent ended with `\n` (a complete last record).
    pub ends_with_newline: bool,
}

/// How a single file changed since `old`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileChange {
    Unchanged,
    /// Only grew: read from this offset on.
    Appended(u64),
    Rewritten,
}

impl FileState {
    /// The state of the first `size` bytes of `path`.
    pub fn of(path: &Path, size: u64, mtime_ns: i64) -> std::io::Result<FileState> {
        let mut f = std::fs::File::open(path)?;
        let head = hash_range(&mut f, 0, size.min(HEAD_BYTES))?;
        let tail_len = size.min(TAIL_BYTES);
        let tail = hash_range(&mut f, size - tail_len, tail_len)?;
        let mut last = [0u8; 1];
        let ends_with_newline = if size > 0 {
            f.seek(SeekFrom::Start(size - 1))?;
            f.read_exact(&mut last)?;
            last[0] == b'\n'
        } else {
            true
        };
        Ok(FileState {
            size,
            mtime_ns,
            head,
            tail,
            ends_with_newline,
        })
    }

    /// Compare the file as it is now (`size`, `mtime`) with this old state.
    pub fn classify(&self, path: &Path, size: u64, mtime_ns: i64) -> std::io::Result<FileChange> {
        if size < self.size {
            return Ok(FileChange::Rewritten);
        }
        let now = FileState::of(path, self.size, mtime_ns)?;
        if now.head != self.head || now.tail != self.tail {
            return Ok(FileChange::Rewritten);
        }
        if size == self.size {
            return Ok(if mtime_ns == self.mtime_ns {
                FileChange::Unchanged
            } else {
                // Same size, same ends, new mtime: cannot tell; read again.
                FileChange::Rewritten
            });
        }
        if !self.ends_with_newline {
            return Ok(FileChange::Rewritten); // the old last record was cut
        }
        Ok(FileChange::Appended(self.size))
    }
}

/// Typed customer-id specs (`email:requester_email`) → (type, column/field).
pub fn parse_customer_specs(
    specs: &[String],
) -> std::result::Result<Vec<(String, String)>, String> {
    specs
        .iter()
        .map(|s| match s.split_once(':') {
            Some((t, c))
                if !t.is_empty()
                    && !c.is_empty()
                    && t.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_') =>
            {
                Ok((t.to_string(), c.to_string()))
            }
            _ => Err(format!(
                "customer spec {s:?}: expected TYPE:COLUMN like \"email:requester_email\""
            )),
        })
        .collect()
}

/// A customer id of `kind` from a raw value (emails lowercased, phones with
/// spaces/dashes/parentheses removed); `None` for empty values.
pub(crate) fn customer_id(kind: &str, value: &str) -> Option<String> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    let v = match kind {
        "email" => v.to_lowercase(),
        "phone" => v
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
            .collect(),
        _ => v.to_string(),
    };
    Some(format!("{kind}:{v}"))
}

/// Parse a time value from an export: RFC 3339, `YYYY-MM-DD HH:MM:SS[.f]`
/// (UTC), `YYYY-MM-DD`, or Unix seconds / milliseconds (numbers > 10^11).
pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| Utc.from_utc_datetime(&t));
    }
    if let Ok(x) = s.parse::<f64>() {
        if x.is_finite() && x > 0.0 {
            let secs = if x > 1e11 { x / 1000.0 } else { x };
            let whole = secs.trunc() as i64;
            let nanos = ((secs - secs.trunc()) * 1e9).round() as u32;
            return Utc.timestamp_opt(whole, nanos.min(999_999_999)).single();
        }
    }
    None
}

/// Put named warnings into `meta` (joined with `; `) and log them.
pub(crate) fn add_warnings(
    meta: &mut BTreeMap<String, String>,
    warnings: &[String],
    source: &str,
    collection: &str,
    id: &str,
) {
    if warnings.is_empty() {
        return;
    }
    let w = warnings.join("; ");
    tracing::warn!(source, collection, record = id, warning = %w, "record archived with a warning");
    meta.insert("warning".into(), w);
}

/// Cursor of a single-file collection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SingleFileCursor {
    pub v: u32,
    /// The source type (`mbox`, `csv`, `jsonl`).
    pub kind: String,
    /// The collection id the cursor belongs to.
    pub collection: String,
    pub file: FileState,
    /// mbox only: the 16-hex digests of the messages read, concatenated in
    /// file order (to number exact duplicates in an appended tail).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digests: String,
}

pub(crate) const FILE_CURSOR_VERSION: u32 = 1;

/// What to read of a single-file collection.
pub(crate) enum Plan {
    /// Nothing changed: return this cursor.
    Unchanged(SingleFileCursor),
    /// Read from `offset` (after a `Reset` when `reset`); `digests` carried over.
    Read {
        offset: u64,
        reset: bool,
        digests: String,
    },
}

/// Where an append-only single-file sync starts.
pub(crate) enum Start {
    /// The file is unchanged: return this cursor.
    Unchanged(crate::Cursor),
    /// Read `path` from `offset` up to `size` (a `Reset` was already pushed
    /// when the file has to be read from the start again).
    Read {
        path: PathBuf,
        size: u64,
        mtime: i64,
        offset: u64,
        digests: String,
    },
}

/// The shared start of the mbox / CSV / JSONL syncs: find the collection's
/// file, compare it with the cursor, push `Reset` when it must be re-read.
pub(crate) async fn start_file_sync(
    source: &str,
    root: &Path,
    ext: &str,
    coll: &Collection,
    cursor: Option<&crate::Cursor>,
    sink: &mut dyn crate::ChangeSink,
) -> Result<Start> {
    let path = file_for(source, root, ext, coll)?;
    let md = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
    let (size, mtime) = (md.len(), mtime_ns(&md));
    match plan(&path, size, mtime, cursor, ext, &coll.id)? {
        Plan::Unchanged(c) => Ok(Start::Unchanged(
            serde_json::to_value(c).expect("cursor serializes"),
        )),
        Plan::Read {
            offset,
            reset,
            digests,
        } => {
            if reset {
                sink.push(crate::Change::Reset).await?;
            }
            Ok(Start::Read {
                path,
                size,
                mtime,
                offset,
                digests,
            })
        }
    }
}

/// `check` of a file source: the files are there to read.
pub(crate) fn file_health(label: &str, root: &Path, ext: &str) -> Result<crate::Health> {
    let files = list_files(root, ext)?;
    Ok(crate::Health {
        summary: format!("{label} {}: {} files", root.display(), files.len()),
    })
}

/// Decide what to read of `path` (size and mtime as of now) given the cursor.
pub(crate) fn plan(
    path: &Path,
    size: u64,
    mtime: i64,
    cursor: Option<&crate::Cursor>,
    kind: &str,
    collection: &str,
) -> Result<Plan> {
    let Some(old) = SingleFileCursor::load(cursor, kind, collection) else {
        return Ok(Plan::Read {
            offset: 0,
            reset: true,
            digests: String::new(),
        });
    };
    Ok(
        match old
            .file
            .classify(path, size, mtime)
            .map_err(|e| io_err(path, e))?
        {
            FileChange::Unchanged => Plan::Unchanged(old),
            FileChange::Appended(offset) => Plan::Read {
                offset,
                reset: false,
                digests: old.digests,
            },
            FileChange::Rewritten => Plan::Read {
                offset: 0,
                reset: true,
                digests: String::new(),
            },
        },
    )
}

/// Read one logical CSV record (quoted fields may span lines): bytes up to
/// and including the line end where the count of `"` is even. Empty at EOF.
pub(crate) fn read_csv_record<R: std::io::BufRead>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    buf.clear();
    let mut quotes = 0usize;
    loop {
        let start = buf.len();
        let n = r.read_until(b'\n', buf)?;
        if n == 0 {
            return Ok(buf.len());
        }
        quotes += buf[start..].iter().filter(|b| **b == b'"').count();
        if quotes.is_multiple_of(2) {
            return Ok(buf.len());
        }
    }
}

impl SingleFileCursor {
    /// The cursor if it is one of ours for this collection.
    pub fn load(
        c: Option<&crate::Cursor>,
        kind: &str,
        collection: &str,
    ) -> Option<SingleFileCursor> {
        let c: SingleFileCursor = serde_json::from_value(c?.clone()).ok()?;
        (c.v == FILE_CURSOR_VERSION && c.kind == kind && c.collection == collection).then_some(c)
    }
}
