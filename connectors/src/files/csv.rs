//! `type = "csv"`: a CSV export (tickets, social posts …), one record per
//! row; a file, or a folder of `.csv` files (one collection per file, id
//! from the file stem).
//!
//! - The first record is the header. Quoted fields may span lines (RFC 4180).
//! - Record id = the `id_column` value, encoded with
//!   [`crate::ids::record_id`]; a row without one is skipped with a
//!   `missing_id` warning in the log.
//! - Payload = the header line and the row exactly as in the file
//!   (`header\nrow\n`, original line ends), extension `csv`.
//! - created = `time_column` (RFC 3339, `YYYY-MM-DD HH:MM:SS` as UTC,
//!   `YYYY-MM-DD`, or Unix seconds/milliseconds); customer_ids from
//!   `customer_columns` (`email:requester_email` → `email:<value>`).
//! - Meta: `file`, `offset` (byte offset of the row), and `warning` for
//!   rows with a field count different from the header's.
//! - An export that only grew is read from its old end; any other change is a
//!   rewrite (`Reset` + full read).

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{
    add_warnings, customer_id, file_collections, io_err, list_files, parse_customer_specs,
    parse_time, read_csv_record, FileState, SingleFileCursor, FILE_CURSOR_VERSION,
};
use crate::ids::record_id;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result,
};

/// A CSV export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// A CSV file, or a folder whose `*.csv` files are each a collection.
    pub path: PathBuf,
    /// Column holding the record's stable id (header name).
    pub id_column: String,
    /// Column holding the record's creation time.
    #[serde(default)]
    pub time_column: Option<String>,
    /// Typed customer-id columns, `TYPE:COLUMN` (`email:requester_email`,
    /// `phone:caller`, `crm:account_id`).
    #[serde(default)]
    pub customer_columns: Vec<String>,
    /// Column holding a subject / title.
    #[serde(default)]
    pub subject_column: Option<String>,
    /// Column holding the text body.
    #[serde(default)]
    pub text_column: Option<String>,
    /// Column holding the record's jurisdiction (ISO 3166 country code such
    /// as `DE`, or `EU`), matched by `[record_retention]` rules; a row with
    /// it empty gets the source's `jurisdiction`, if any.
    #[serde(default)]
    pub jurisdiction_column: Option<String>,
    /// Record kind of every row (`ticket`, `social_post`, `crm_activity` …).
    pub kind: String,
    /// Field delimiter (one ASCII character); default `,`.
    #[serde(default)]
    pub delimiter: Option<char>,
}

/// The CSV connector.
#[derive(Debug)]
pub struct CsvConnector {
    cfg: CsvConfig,
    customers: Vec<(String, String)>,
    delimiter: u8,
}

impl CsvConnector {
    /// A connector for `cfg` (checks the customer specs and the delimiter).
    pub fn new(cfg: CsvConfig) -> Result<CsvConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        let customers = parse_customer_specs(&cfg.customer_columns).map_err(bad)?;
        let delimiter = match cfg.delimiter {
            None => b',',
            Some(c) if c.is_ascii() && c != '"' && c != '\n' => c as u8,
            Some(c) => return Err(bad(format!("delimiter {c:?} must be one ASCII character"))),
        };
        Ok(CsvConnector {
            cfg,
            customers,
            delimiter,
        })
    }

    fn fields(&self, raw: &[u8]) -> Option<Vec<String>> {
        let mut r = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(self.delimiter)
            .from_reader(raw);
        let rec = r.byte_records().next()?.ok()?;
        Some(
            rec.iter()
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect(),
        )
    }
}

fn column(header: &[String], name: &str) -> Option<usize> {
    header.iter().position(|h| h == name)
}

#[async_trait]
impl Connector for CsvConnector {
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
        super::file_health("CSV", &self.cfg.path, "csv")
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        Ok(file_collections(&list_files(&self.cfg.path, "csv")?))
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let (path, size, mtime, offset) =
            match super::start_file_sync(&self.cfg.name, &self.cfg.path, "csv", coll, cursor, sink)
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
        let f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        let mut r = BufReader::with_capacity(256 * 1024, f.take(size));
        let mut header_raw = Vec::new();
        let hlen = read_csv_record(&mut r, &mut header_raw).map_err(|e| io_err(&path, e))?;
        let mut header = self.fields(&header_raw).unwrap_or_default();
        if let Some(first) = header.first_mut() {
            *first = first.trim_start_matches('\u{feff}').to_string();
        }
        let idx = |name: &str| column(&header, name);
        let id_col = if hlen == 0 {
            None
        } else {
            Some(
                idx(&self.cfg.id_column).ok_or_else(|| ConnectorError::Malformed {
                    source_name: self.cfg.name.clone(),
                    what: path.display().to_string(),
                    detail: format!("no column {:?} in the header", self.cfg.id_column),
                })?,
            )
        };
        let time_col = self.cfg.time_column.as_deref().and_then(idx);
        let subj_col = self.cfg.subject_column.as_deref().and_then(idx);
        let text_col = self.cfg.text_column.as_deref().and_then(idx);
        let jur_col = self.cfg.jurisdiction_column.as_deref().and_then(idx);
        let cust: Vec<(String, Option<usize>)> = self
            .customers
            .iter()
            .map(|(t, c)| (t.clone(), idx(c)))
            .collect();
        let mut pos = hlen as u64;
        if offset > pos {
            drop(r);
            let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| io_err(&path, e))?;
            r = BufReader::with_capacity(256 * 1024, f.take(size - offset));
            pos = offset;
        }
        let mut row = Vec::new();
        let mut fetched = 0usize;
        if let Some(id_col) = id_col {
            loop {
                let n = read_csv_record(&mut r, &mut row).map_err(|e| io_err(&path, e))?;
                if n == 0 {
                    break;
                }
                let at = pos;
                pos += n as u64;
                if row.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                    continue;
                }
                let fields = self.fields(&row).unwrap_or_default();
                let get = |i: Option<usize>| i.and_then(|i| fields.get(i)).map(|s| s.as_str());
                let Some(raw_id) = get(Some(id_col)).filter(|s| !s.trim().is_empty()) else {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), offset = at, "missing_id: row skipped");
                    continue;
                };
                let id = record_id(raw_id.trim());
                let mut warnings = Vec::new();
                if fields.len() != header.len() {
                    warnings.push(format!(
                        "field_count: {} fields, header has {}",
                        fields.len(),
                        header.len()
                    ));
                }
                let mut customer_ids = Vec::new();
                let mut participants = Vec::new();
                for (t, i) in &cust {
                    if let Some(v) = get(*i) {
                        if let Some(c) = customer_id(t, v) {
                            participants.push(v.trim().to_string());
                            customer_ids.push(c);
                        }
                    }
                }
                let mut meta = BTreeMap::new();
                meta.insert("file".into(), path.display().to_string());
                meta.insert("offset".into(), at.to_string());
                add_warnings(&mut meta, &warnings, &self.cfg.name, &coll.id, &id);
                let mut payload = Vec::with_capacity(header_raw.len() + row.len());
                payload.extend_from_slice(&header_raw);
                payload.extend_from_slice(&row);
                let rec = Record {
                    id,
                    collection: coll.id.clone(),
                    kind: RecordKind::parse(&self.cfg.kind),
                    created: get(time_col).and_then(parse_time),
                    updated: None,
                    participants,
                    customer_ids,
                    jurisdiction: get(jur_col)
                        .map(|j| j.trim().to_string())
                        .filter(|j| !j.is_empty()),
                    subject: get(subj_col).map(str::to_string),
                    text: get(text_col).map(str::to_string),
                    attachments: Vec::new(),
                    payload: Payload::Bytes(payload),
                    payload_ext: "csv".into(),
                    deleted: false,
                    meta,
                };
                fetched += 1;
                sink.push(Change::Upsert(rec)).await?;
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, from = offset, fetched, "csv: read");
        cursor_for(&path, size, mtime, "csv", &coll.id)
    }
}

pub(crate) fn cursor_for(
    path: &Path,
    size: u64,
    mtime: i64,
    kind: &str,
    coll: &str,
) -> Result<Cursor> {
    let state = FileState::of(path, size, mtime).map_err(|e| io_err(path, e))?;
    let cur = SingleFileCursor {
        v: FILE_CURSOR_VERSION,
        kind: kind.into(),
        collection: coll.to_string(),
        file: state,
        digests: String::new(),
    };
    Ok(serde_json::to_value(cur).expect("cursor serializes"))
}
