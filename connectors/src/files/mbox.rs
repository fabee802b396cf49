//! `type = "mbox"`: an mbox file, or a folder of `.mbox` files (one
//! collection per file, id from the file stem).
//!
//! Dialect: **mboxrd**. A message starts after every line beginning with
//! `From ` (the `From_` line); inside a message, lines matching `^>+From `
//! lose one `>` (so `>From ` → `From `, `>>From ` → `>From `); the blank line
//! a writer puts between messages is removed (one `\n`, or `\r\n` in CRLF
//! files, when the message ends with an empty line). The payload is the
//! message itself — not the mbox lines — so restore gives back the message.
//!
//! Record id: mbox has no ids, and byte offsets shift when a message is
//! removed from the middle; so the id is the first 16 hex digits of the
//! BLAKE3 of the message bytes, with `-2`, `-3` … for the 2nd, 3rd exact copy
//! in the same file. The same message keeps its id across rewrites of the
//! file, and identical copies stay distinct records.
//!
//! A last message cut short (the file does not end with a newline) is
//! archived as it is, with `warning = truncated_message …` in its meta.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{NaiveDateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{
    add_warnings, file_collections, io_err, list_files, FileState, SingleFileCursor,
    FILE_CURSOR_VERSION,
};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, Cursor, Health, Payload, Record,
    RecordKind, Result,
};

/// An mbox file or folder of `.mbox` files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MboxConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// An mbox file, or a folder whose `*.mbox` files are each a collection.
    pub path: PathBuf,
}

/// The mbox connector.
#[derive(Debug)]
pub struct MboxConnector {
    cfg: MboxConfig,
}

impl MboxConnector {
    /// A connector for `cfg`.
    pub fn new(cfg: MboxConfig) -> MboxConnector {
        MboxConnector { cfg }
    }
}

/// One message cut out of an mbox.
#[derive(Debug)]
pub(crate) struct MboxMessage {
    /// Byte offset of its `From_` line.
    pub offset: u64,
    /// The `From_` line without its line end (empty when missing).
    pub from_line: String,
    /// The message, unescaped.
    pub bytes: Vec<u8>,
    /// Named warnings.
    pub warnings: Vec<String>,
}

/// Undo mboxrd quoting of one line: `^>+From ` loses one `>`.
pub(crate) fn unescape_line(line: &[u8]) -> &[u8] {
    let n = line.iter().take_while(|b| **b == b'>').count();
    if n > 0 && line[n..].starts_with(b"From ") {
        &line[1..]
    } else {
        line
    }
}

/// One mboxrd entry for `message` (for `custos export --format mbox`): the
/// `From_` line (`From <sender> <asctime date>`), the message with every
/// `^>*From ` line quoted with one more `>`, a newline if the message lacks
/// a final one, and the separating blank line. [`MboxConnector`] reads it
/// back to exactly `message` (when `message` ends with a newline).
pub fn mbox_entry(sender: &str, date: chrono::DateTime<Utc>, message: &[u8]) -> Vec<u8> {
    let sender: String = sender
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>();
    let sender = if sender.is_empty() {
        "MAILER-DAEMON".to_string()
    } else {
        sender
    };
    let mut out = Vec::with_capacity(message.len() + 100);
    out.extend_from_slice(
        format!("From {sender} {}\n", date.format("%a %b %e %H:%M:%S %Y")).as_bytes(),
    );
    for line in message.split_inclusive(|b| *b == b'\n') {
        let n = line.iter().take_while(|b| **b == b'>').count();
        if line[n..].starts_with(b"From ") {
            out.push(b'>');
        }
        out.extend_from_slice(line);
    }
    if !message.ends_with(b"\n") {
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// Reads messages one at a time from an mbox extent.
pub(crate) struct MboxReader<R: Read> {
    r: BufReader<std::io::Take<R>>,
    pos: u64,
    line: Vec<u8>,
    cur: Option<MboxMessage>,
    done: bool,
}

impl<R: Read> MboxReader<R> {
    /// Read from `r`, which is positioned at byte `start`, at most `limit` bytes.
    pub fn new(r: R, start: u64, limit: u64) -> MboxReader<R> {
        MboxReader {
            r: BufReader::with_capacity(256 * 1024, r.take(limit)),
            pos: start,
            line: Vec::new(),
            cur: None,
            done: false,
        }
    }

    fn finish(mut m: MboxMessage, last: bool) -> MboxMessage {
        if m.bytes.ends_with(b"\r\n\r\n") {
            m.bytes.truncate(m.bytes.len() - 2);
        } else if m.bytes.ends_with(b"\n\n") {
            m.bytes.pop();
        } else if last && !m.bytes.is_empty() && !m.bytes.ends_with(b"\n") {
            m.warnings
                .push("truncated_message: the mbox ends inside this message".into());
        }
        m
    }

    /// The next message, `None` at the end.
    pub fn next_message(&mut self) -> std::io::Result<Option<MboxMessage>> {
        if self.done {
            return Ok(None);
        }
        loop {
            self.line.clear();
            let n = self.r.read_until(b'\n', &mut self.line)?;
            if n == 0 {
                self.done = true;
                return Ok(self.cur.take().map(|m| Self::finish(m, true)));
            }
            let at = self.pos;
            self.pos += n as u64;
            if self.line.starts_with(b"From ") {
                let text = String::from_utf8_lossy(&self.line);
                let next = MboxMessage {
                    offset: at,
                    from_line: text.trim_end_matches(['\r', '\n']).to_string(),
                    bytes: Vec::new(),
                    warnings: Vec::new(),
                };
                if let Some(m) = self.cur.replace(next) {
                    return Ok(Some(Self::finish(m, false)));
                }
                continue;
            }
            match &mut self.cur {
                Some(m) => m.bytes.extend_from_slice(unescape_line(&self.line)),
                None => {
                    if self.line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    let mut m = MboxMessage {
                        offset: at,
                        from_line: String::new(),
                        bytes: Vec::new(),
                        warnings: vec!["missing_from_line: data before the first From_ line".into()],
                    };
                    m.bytes.extend_from_slice(unescape_line(&self.line));
                    self.cur = Some(m);
                }
            }
        }
    }
}

/// `From sender Mon Jan  1 00:00:00 2024` → the date, when it parses.
fn from_line_date(line: &str) -> Option<chrono::DateTime<Utc>> {
    let rest = line.strip_prefix("From ")?;
    let (_, date) = rest.trim().split_once(char::is_whitespace)?;
    let date = date.split_whitespace().collect::<Vec<_>>().join(" ");
    NaiveDateTime::parse_from_str(&date, "%a %b %d %H:%M:%S %Y")
        .ok()
        .map(|t| Utc.from_utc_datetime(&t))
}

fn record_of(
    source: &str,
    coll: &Collection,
    file: &Path,
    m: MboxMessage,
    counts: &mut HashMap<String, u32>,
    digests: &mut String,
) -> Record {
    let full = blake3::hash(&m.bytes).to_hex().to_string();
    let d16 = full[..16].to_string();
    digests.push_str(&d16);
    let n = counts.entry(d16.clone()).or_insert(0);
    *n += 1;
    let id = if *n == 1 { d16 } else { format!("{d16}-{n}") };
    let info = crate::mime::parse_email(&m.bytes);
    let mut warnings = m.warnings;
    warnings.extend(info.warnings.iter().cloned());
    let mut meta = BTreeMap::new();
    meta.insert("file".into(), file.display().to_string());
    meta.insert("offset".into(), m.offset.to_string());
    if !m.from_line.is_empty() {
        meta.insert("from_line".into(), m.from_line.clone());
    }
    if let Some(mid) = &info.message_id {
        meta.insert("message_id".into(), mid.clone());
    }
    meta.insert("blake3".into(), full);
    meta.insert("size".into(), m.bytes.len().to_string());
    add_warnings(&mut meta, &warnings, source, &coll.id, &id);
    Record {
        id,
        collection: coll.id.clone(),
        kind: RecordKind::Email,
        created: info.created.or_else(|| from_line_date(&m.from_line)),
        updated: None,
        participants: info.participants,
        customer_ids: info.customer_ids,
        jurisdiction: None,
        subject: info.subject,
        text: info.text,
        attachments: info.attachments,
        payload: Payload::Bytes(m.bytes),
        payload_ext: "eml".into(),
        deleted: false,
        meta,
    }
}

#[async_trait]
impl Connector for MboxConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: true,
            reports_edits: false,
            has_attachments: true,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        super::file_health("mbox", &self.cfg.path, "mbox")
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        Ok(file_collections(&list_files(&self.cfg.path, "mbox")?))
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let (path, size, mtime, from, mut digests) = match super::start_file_sync(
            &self.cfg.name,
            &self.cfg.path,
            "mbox",
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
                digests,
            } => (path, size, mtime, offset, digests),
        };
        let mut counts: HashMap<String, u32> = HashMap::new();
        for i in (0..digests.len() / 16).map(|i| i * 16) {
            if let Some(d) = digests.get(i..i + 16) {
                *counts.entry(d.to_string()).or_insert(0) += 1;
            }
        }
        let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, e))?;
        f.seek(SeekFrom::Start(from))
            .map_err(|e| io_err(&path, e))?;
        let mut reader = MboxReader::new(f, from, size - from);
        let mut fetched = 0usize;
        while let Some(m) = reader.next_message().map_err(|e| io_err(&path, e))? {
            let rec = record_of(&self.cfg.name, coll, &path, m, &mut counts, &mut digests);
            fetched += 1;
            sink.push(Change::Upsert(rec)).await?;
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, from, fetched, "mbox: read");
        let state = FileState::of(&path, size, mtime).map_err(|e| io_err(&path, e))?;
        let cur = SingleFileCursor {
            v: FILE_CURSOR_VERSION,
            kind: "mbox".into(),
            collection: coll.id.clone(),
            file: state,
            digests,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
