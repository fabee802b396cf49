//! `type = "jsonl"`: a JSON Lines export, one record per line; a file, or a
//! folder of `.jsonl` files (one collection per file, id from the stem).
//!
//! - Record id = the `id_field` value (string or number; dotted paths like
//!   `ticket.id` reach into objects), encoded with [`crate::ids::record_id`].
//!   A line that is not JSON, or has no id, is skipped with a named warning
//!   (`invalid_json`, `missing_id`) in the log.
//! - Payload = the line exactly as in the file, without its line end;
//!   extension `json`.
//! - created from `time_field`; customer_ids from `customer_fields`
//!   (`email:user.email`); jurisdiction from `jurisdiction_field`; meta:
//!   `file`, `offset`.
//! - An export that only grew is read from its old end; any other change is a
//!   rewrite (`Reset` + full read).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::csv::cursor_for;
use super::{customer_id, file_collections, io_err, list_files, parse_customer_specs, parse_time};
use crate::ids::record_id;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result,
};

/// A JSON Lines export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// A `.jsonl` file, or a folder whose `*.jsonl` files are each a collection.
    pub path: PathBuf,
    /// Field holding the record's stable id (dotted path for nested objects).
    pub id_field: String,
    /// Field holding the creation time.
    #[serde(default)]
    pub time_field: Option<String>,
    /// Typed customer-id fields, `TYPE:FIELD` (`email:user.email`).
    #[serde(default)]
    pub customer_fields: Vec<String>,
    /// Field holding a subject / title.
    #[serde(default)]
    pub subject_field: Option<String>,
    /// Field holding the text body.
    #[serde(default)]
    pub text_field: Option<String>,
    /// Field holding the record's jurisdiction (ISO 3166 country code such
    /// as `DE`, or `EU`), matched by `[record_retention]` rules; a line
    /// without it gets the source's `jurisdiction`, if any.
    #[serde(default)]
    pub jurisdiction_field: Option<String>,
    /// Record kind of every line (`social_post`, `ticket`, `direct_message` …).
    pub kind: String,
}

/// The JSONL connector.
#[derive(Debug)]
pub struct JsonlConnector {
    cfg: JsonlConfig,
    customers: Vec<(String, String)>,
}

impl JsonlConnector {
    /// A connector for `cfg` (checks the customer specs).
    pub fn new(cfg: JsonlConfig) -> Result<JsonlConnector> {
        let customers = parse_customer_specs(&cfg.customer_fields).map_err(|detail| {
            ConnectorError::Malformed {
                source_name: cfg.name.clone(),
                what: "configuration".into(),
                detail,
            }
        })?;
        Ok(JsonlConnector { cfg, customers })
    }
}

/// The value at a dotted path, as text (strings as-is, numbers/bools printed).
fn field(v: &Value, path: &str) -> Option<String> {
    let mut cur = v;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[async_trait]
impl Connector for JsonlConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: true,
            reports_edits: true,
            has_attachments: false,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        super::file_health("JSONL", &self.cfg.path, "jsonl")
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        Ok(file_collections(&list_files(&self.cfg.path, "jsonl")?))
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let (path, size, mtime, offset) = match super::start_file_sync(
            &self.cfg.name,
            &self.cfg.path,
            "jsonl",
            coll,
            cursor,
            sink,
        )
        .await?
        {
            super::Start::Unchanged(c) => return Ok(c),
            super::Start::Read {
                path,
                size,
                mtime,
                offset,
                ..
            } => (path, size, mtime, offset),
        };
        let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(|e| io_err(&path, e))?;
        let mut r = BufReader::with_capacity(256 * 1024, f.take(size - offset));
        let mut pos = offset;
        let mut line = Vec::new();
        let mut fetched = 0usize;
        loop {
            line.clear();
            let n = r
                .read_until(b'\n', &mut line)
                .map_err(|e| io_err(&path, e))?;
            if n == 0 {
                break;
            }
            let at = pos;
            pos += n as u64;
            let mut end = line.len();
            if line[..end].ends_with(b"\n") {
                end -= 1;
            }
            if line[..end].ends_with(b"\r") {
                end -= 1;
            }
            let text = &line[..end];
            if text.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let v: Value = match serde_json::from_slice(text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), offset = at, error = %e, "invalid_json: line skipped");
                    continue;
                }
            };
            let Some(raw_id) = field(&v, &self.cfg.id_field).filter(|s| !s.trim().is_empty())
            else {
                tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), offset = at, "missing_id: line skipped");
                continue;
            };
            let id = record_id(raw_id.trim());
            let mut customer_ids = Vec::new();
            let mut participants = Vec::new();
            for (t, fpath) in &self.customers {
                if let Some(val) = field(&v, fpath) {
                    if let Some(c) = customer_id(t, &val) {
                        participants.push(val.trim().to_string());
                        customer_ids.push(c);
                    }
                }
            }
            let mut meta = BTreeMap::new();
            meta.insert("file".into(), path.display().to_string());
            meta.insert("offset".into(), at.to_string());
            let rec = Record {
                id,
                collection: coll.id.clone(),
                kind: RecordKind::parse(&self.cfg.kind),
                created: self
                    .cfg
                    .time_field
                    .as_deref()
                    .and_then(|f| field(&v, f))
                    .and_then(|s| parse_time(&s)),
                updated: None,
                participants,
                customer_ids,
                jurisdiction: self
                    .cfg
                    .jurisdiction_field
                    .as_deref()
                    .and_then(|f| field(&v, f))
                    .map(|j| j.trim().to_string())
                    .filter(|j| !j.is_empty()),
                subject: self.cfg.subject_field.as_deref().and_then(|f| field(&v, f)),
                text: self.cfg.text_field.as_deref().and_then(|f| field(&v, f)),
                attachments: Vec::new(),
                payload: Payload::Bytes(text.to_vec()),
                payload_ext: "json".into(),
                deleted: false,
                meta,
            };
            fetched += 1;
            sink.push(Change::Upsert(rec)).await?;
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, from = offset, fetched, "jsonl: read");
        cursor_for(&path, size, mtime, "jsonl", &coll.id)
    }
}
