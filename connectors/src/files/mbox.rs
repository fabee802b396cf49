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
//!
//! Memory: the file is read in one pass in constant memory (lines of any
//! length included), unescaping and hashing each message as it goes. A
//! message up to `stream_threshold_mib` (default 8 MiB) is kept in memory; a
//! larger one keeps only its first MiB ([`crate::mime::PARSE_PREFIX`]) for its
//! metadata (meta `parsed_bytes`, as for Maildir) and is handed on as a
//! `Payload::Reader` of its byte range in the mbox, unescaped on the fly
//! while it is stored (positional reads of the already open file). If the
//! file changes between the pass and that read so that the range no longer
//! holds the message, the read fails with an error naming the offset.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
    /// Messages larger than this many MiB are streamed from the mbox instead
    /// of being held in memory; default 8 (`0` streams every message).
    #[serde(default)]
    pub stream_threshold_mib: Option<u64>,
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

/// Positional reads of an mbox's bytes, shared by the scanning pass and the
/// payload readers of streamed messages (reads never move a shared offset).
pub(crate) trait Source: Send + Sync + 'static {
    /// Read into `buf` from byte `offset`; 0 at the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl Source for std::fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
}

impl Source for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// `Read` over the byte range `pos..end` of a [`Source`].
struct RangeReader<S: Source> {
    src: Arc<S>,
    pos: u64,
    end: u64,
}

impl<S: Source> Read for RangeReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.end.saturating_sub(self.pos)) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.src.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// A step of the mboxrd token stream.
#[derive(Debug, PartialEq, Eq)]
enum Tok {
    /// This many unescaped message bytes were written to the output buffer.
    Data(usize),
    /// A `From_` line starting at `offset` (line end not included in `line`).
    From { offset: u64, line: String },
    /// End of the extent.
    Eof,
}

const FROM: &[u8; 5] = b"From ";
/// Longest `From_` line text kept (the rest of the line is skipped).
const FROM_LINE_MAX: usize = 1024;
/// Buffer of the scanning pass and of streamed payload readers.
const BUF: usize = 256 * 1024;

/// The mboxrd token stream of a byte stream in constant memory: `From_`
/// lines, and message bytes with one `>` removed from every `^>+From ` line.
/// Lines of any length are handled without being held whole.
struct Unescape<R: BufRead> {
    r: R,
    /// Absolute offset of the next unread raw byte.
    pos: u64,
    /// At the start of a line.
    at_start: bool,
    /// `>` still to be written (from a classified line start).
    gt: u64,
    /// Matched start of `From ` still to be written: `FROM[tail_pos..tail_len]`.
    tail_len: usize,
    tail_pos: usize,
}

impl<R: BufRead> Unescape<R> {
    fn new(r: R, pos: u64) -> Unescape<R> {
        Unescape {
            r,
            pos,
            at_start: true,
            gt: 0,
            tail_len: 0,
            tail_pos: 0,
        }
    }

    fn consume(&mut self, n: usize) {
        self.r.consume(n);
        self.pos += n as u64;
    }

    /// Write pending `>`s and `From ` bytes into `out`.
    fn pending(&mut self, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() && self.gt > 0 {
            out[n] = b'>';
            n += 1;
            self.gt -= 1;
        }
        while n < out.len() && self.tail_pos < self.tail_len {
            out[n] = FROM[self.tail_pos];
            n += 1;
            self.tail_pos += 1;
        }
        n
    }

    /// The next token; `out` must not be empty.
    fn next(&mut self, out: &mut [u8]) -> std::io::Result<Tok> {
        debug_assert!(!out.is_empty());
        let n = self.pending(out);
        if n > 0 {
            return Ok(Tok::Data(n));
        }
        if self.at_start {
            self.at_start = false;
            let line_at = self.pos;
            // Leading `>`s, counted (not stored), then the matching start of `From `.
            loop {
                let buf = self.r.fill_buf()?;
                let k = buf.iter().take_while(|b| **b == b'>').count();
                let whole = k == buf.len() && k > 0;
                self.gt += k as u64;
                self.consume(k);
                if !whole {
                    break;
                }
            }
            self.tail_len = 0;
            self.tail_pos = 0;
            while self.tail_len < FROM.len() {
                let buf = self.r.fill_buf()?;
                if buf.first() != Some(&FROM[self.tail_len]) {
                    break;
                }
                self.tail_len += 1;
                self.consume(1);
            }
            if self.tail_len == FROM.len() {
                if self.gt == 0 {
                    self.tail_len = 0;
                    return self.rest_of_from_line(line_at);
                }
                self.gt -= 1; // mboxrd: a quoted `From ` loses one `>`
            }
            let n = self.pending(out);
            if n > 0 {
                return Ok(Tok::Data(n));
            }
        }
        // Inside a line: copy up to a line end after which a line starts
        // that may need a look (`>` or `F`), or the buffer's end.
        let buf = self.r.fill_buf()?;
        if buf.is_empty() {
            return Ok(Tok::Eof);
        }
        let lim = buf.len().min(out.len());
        let mut n = lim;
        let mut i = 0;
        while let Some(j) = buf[i..lim].iter().position(|b| *b == b'\n') {
            let end = i + j + 1;
            if end >= buf.len() || matches!(buf[end], b'>' | b'F') {
                n = end;
                self.at_start = true;
                break;
            }
            i = end;
        }
        out[..n].copy_from_slice(&buf[..n]);
        self.consume(n);
        Ok(Tok::Data(n))
    }

    /// The rest of a `From_` line whose `From ` was consumed.
    fn rest_of_from_line(&mut self, offset: u64) -> std::io::Result<Tok> {
        let mut text = FROM.to_vec();
        loop {
            let buf = self.r.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            let (k, done) = match buf.iter().position(|b| *b == b'\n') {
                Some(j) => (j + 1, true),
                None => (buf.len(), false),
            };
            let keep = k.min(FROM_LINE_MAX.saturating_sub(text.len()));
            text.extend_from_slice(&buf[..keep]);
            self.consume(k);
            if done {
                break;
            }
        }
        self.at_start = true;
        let line = String::from_utf8_lossy(&text)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        Ok(Tok::From { offset, line })
    }
}

/// A message's bytes as the scanning pass leaves them.
#[derive(Debug)]
pub(crate) enum Body {
    /// The whole message, unescaped (at most the stream threshold).
    Bytes(Vec<u8>),
    /// A large message: the raw mbox bytes `start..end` (after its `From_`
    /// line, up to the next one), unescaped on the fly when read; `prefix`
    /// is its first [`crate::mime::PARSE_PREFIX`] unescaped bytes.
    Range {
        start: u64,
        end: u64,
        prefix: Vec<u8>,
    },
}

/// One message cut out of an mbox.
#[derive(Debug)]
pub(crate) struct MboxMessage {
    /// Byte offset of its `From_` line.
    pub offset: u64,
    /// The `From_` line without its line end (empty when missing).
    pub from_line: String,
    /// The message, in memory or as a range of the mbox.
    pub body: Body,
    /// Size of the message (unescaped, without the separating blank line).
    pub len: u64,
    /// BLAKE3 (hex) of the message.
    pub blake3: String,
    /// Named warnings.
    pub warnings: Vec<String>,
}

/// Reads a streamed message: the unescaped range, exactly `remaining` bytes.
struct MessageReader<S: Source> {
    tokens: Unescape<BufReader<RangeReader<S>>>,
    remaining: u64,
    offset: u64,
}

impl<S: Source> Read for MessageReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (buf.len() as u64).min(self.remaining) as usize;
        if want == 0 {
            return Ok(0);
        }
        match self.tokens.next(&mut buf[..want])? {
            Tok::Data(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Tok::From { .. } => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the mbox changed while it was read: a From_ line inside the message at offset {}",
                    self.offset
                ),
            )),
            Tok::Eof => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the mbox changed while it was read: the message at offset {} ends {} bytes early",
                    self.offset, self.remaining
                ),
            )),
        }
    }
}

/// A reader of the raw range `start..end` of `src` that unescapes on the fly
/// and yields exactly the `len` bytes of the message at `offset`.
pub(crate) fn range_payload<S: Source>(
    src: &Arc<S>,
    offset: u64,
    start: u64,
    end: u64,
    len: u64,
) -> Payload {
    let range = RangeReader {
        src: src.clone(),
        pos: start,
        end,
    };
    let reader = MessageReader {
        tokens: Unescape::new(BufReader::with_capacity(BUF, range), start),
        remaining: len,
        offset,
    };
    Payload::Reader {
        reader: Box::new(reader),
        size: Some(len),
    }
}

/// The message being cut in the scanning pass.
struct Acc {
    offset: u64,
    from_line: String,
    /// Raw offset of its first byte (after the `From_` line).
    start: u64,
    /// Its bytes while it fits the threshold, then its parse prefix.
    buf: Vec<u8>,
    in_memory: bool,
    hasher: blake3::Hasher,
    /// Bytes seen (before the separator is removed).
    total: u64,
    /// The last two bytes seen, not hashed yet (they may be the separator).
    held: [u8; 2],
    held_len: usize,
    /// The last four bytes seen (right-aligned), to recognise the separator.
    last4: [u8; 4],
    warnings: Vec<String>,
}

impl Acc {
    fn new(offset: u64, from_line: String, start: u64, warnings: Vec<String>) -> Acc {
        Acc {
            offset,
            from_line,
            start,
            buf: Vec::new(),
            in_memory: true,
            hasher: blake3::Hasher::new(),
            total: 0,
            held: [0; 2],
            held_len: 0,
            last4: [0; 4],
            warnings,
        }
    }

    fn push(&mut self, d: &[u8], threshold: u64) {
        if d.is_empty() {
            return;
        }
        // Hash all but the last two bytes seen.
        if d.len() >= 2 {
            self.hasher.update(&self.held[..self.held_len]);
            self.hasher.update(&d[..d.len() - 2]);
            self.held = [d[d.len() - 2], d[d.len() - 1]];
            self.held_len = 2;
        } else if self.held_len < 2 {
            self.held[self.held_len] = d[0];
            self.held_len += 1;
        } else {
            self.hasher.update(&self.held[..1]);
            self.held = [self.held[1], d[0]];
        }
        for b in d.iter().skip(d.len().saturating_sub(4)) {
            self.last4.copy_within(1.., 0);
            self.last4[3] = *b;
        }
        self.total += d.len() as u64;
        if self.in_memory && self.total > threshold {
            self.in_memory = false;
            self.buf.truncate(crate::mime::PARSE_PREFIX);
            self.buf.shrink_to_fit();
        }
        let room = if self.in_memory {
            d.len()
        } else {
            crate::mime::PARSE_PREFIX.saturating_sub(self.buf.len())
        };
        self.buf.extend_from_slice(&d[..room.min(d.len())]);
    }

    /// The message, its raw bytes ending at `end`; `last` when the extent ends.
    fn finish(mut self, end: u64, last: bool) -> MboxMessage {
        let seen = &self.last4[4 - self.total.min(4) as usize..];
        let cut = if seen.ends_with(b"\r\n\r\n") {
            2
        } else if seen.ends_with(b"\n\n") {
            1
        } else {
            if last && self.total > 0 && !seen.ends_with(b"\n") {
                self.warnings
                    .push("truncated_message: the mbox ends inside this message".into());
            }
            0
        };
        self.hasher.update(&self.held[..self.held_len - cut]);
        let len = self.total - cut as u64;
        if (self.buf.len() as u64) > len {
            self.buf.truncate(len as usize);
        }
        let body = if self.in_memory {
            Body::Bytes(self.buf)
        } else {
            Body::Range {
                start: self.start,
                end,
                prefix: self.buf,
            }
        };
        MboxMessage {
            offset: self.offset,
            from_line: self.from_line,
            body,
            len,
            blake3: self.hasher.finalize().to_hex().to_string(),
            warnings: self.warnings,
        }
    }
}

/// Cuts messages out of an mbox extent in one pass, in constant memory for
/// messages over the threshold (they come out as [`Body::Range`]).
pub(crate) struct MboxReader<S: Source> {
    tokens: Unescape<BufReader<RangeReader<S>>>,
    out: Vec<u8>,
    cur: Option<Acc>,
    /// Before the first message: whitespace of the current line (dropped
    /// unless the line turns out to hold more than whitespace).
    ws: Vec<u8>,
    ws_at: u64,
    threshold: u64,
    done: bool,
}

impl<S: Source> MboxReader<S> {
    /// Read `src` from byte `start` up to byte `end`; messages larger than
    /// `threshold` bytes are not kept in memory.
    pub fn new(src: Arc<S>, start: u64, end: u64, threshold: u64) -> MboxReader<S> {
        let range = RangeReader {
            src,
            pos: start,
            end,
        };
        MboxReader {
            tokens: Unescape::new(BufReader::with_capacity(BUF, range), start),
            out: vec![0; BUF],
            cur: None,
            ws: Vec::new(),
            ws_at: start,
            threshold,
            done: false,
        }
    }

    /// The next message, `None` at the end.
    pub fn next_message(&mut self) -> std::io::Result<Option<MboxMessage>> {
        if self.done {
            return Ok(None);
        }
        loop {
            let at = self.tokens.pos;
            match self.tokens.next(&mut self.out)? {
                Tok::Eof => {
                    self.done = true;
                    let end = self.tokens.pos;
                    return Ok(self.cur.take().map(|m| m.finish(end, true)));
                }
                Tok::From { offset, line } => {
                    let next = Acc::new(offset, line, self.tokens.pos, Vec::new());
                    if let Some(m) = self.cur.replace(next) {
                        return Ok(Some(m.finish(offset, false)));
                    }
                }
                Tok::Data(n) => {
                    if let Some(m) = &mut self.cur {
                        m.push(&self.out[..n], self.threshold);
                        continue;
                    }
                    // Data before the first `From_` line: whitespace-only
                    // lines are skipped; the first other line starts a message.
                    let d = &self.out[..n];
                    match d.iter().position(|b| !b.is_ascii_whitespace()) {
                        None => match d.iter().rposition(|b| *b == b'\n') {
                            Some(j) => {
                                self.ws.clear();
                                self.ws.extend_from_slice(&d[j + 1..]);
                                self.ws_at = at + j as u64 + 1;
                            }
                            None => self.ws.extend_from_slice(d),
                        },
                        Some(i) => {
                            let line = d[..i]
                                .iter()
                                .rposition(|b| *b == b'\n')
                                .map_or(0, |j| j + 1);
                            let (start, ws) = if line > 0 {
                                (at + line as u64, Vec::new())
                            } else {
                                (self.ws_at, std::mem::take(&mut self.ws))
                            };
                            let mut m = Acc::new(
                                start,
                                String::new(),
                                start,
                                vec!["missing_from_line: data before the first From_ line".into()],
                            );
                            m.push(&ws, self.threshold);
                            m.push(&self.out[line..n], self.threshold);
                            self.cur = Some(m);
                        }
                    }
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

fn record_of<S: Source>(
    source: &str,
    coll: &Collection,
    file: &Path,
    src: &Arc<S>,
    m: MboxMessage,
    counts: &mut HashMap<String, u32>,
    digests: &mut String,
) -> Record {
    let d16 = m.blake3[..16].to_string();
    digests.push_str(&d16);
    let n = counts.entry(d16.clone()).or_insert(0);
    *n += 1;
    let id = if *n == 1 { d16 } else { format!("{d16}-{n}") };
    let mut meta = BTreeMap::new();
    let (info, payload) = match m.body {
        Body::Bytes(bytes) => (crate::mime::parse_email(&bytes), Payload::Bytes(bytes)),
        Body::Range { start, end, prefix } => {
            if (prefix.len() as u64) < m.len {
                meta.insert("parsed_bytes".into(), prefix.len().to_string());
            }
            (
                crate::mime::parse_email_prefix(&prefix, m.len),
                range_payload(src, m.offset, start, end, m.len),
            )
        }
    };
    let mut warnings = m.warnings;
    warnings.extend(info.warnings.iter().cloned());
    meta.insert("file".into(), file.display().to_string());
    meta.insert("offset".into(), m.offset.to_string());
    if !m.from_line.is_empty() {
        meta.insert("from_line".into(), m.from_line.clone());
    }
    if let Some(mid) = &info.message_id {
        meta.insert("message_id".into(), mid.clone());
    }
    meta.insert("blake3".into(), m.blake3);
    meta.insert("size".into(), m.len.to_string());
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
        payload,
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
        let src = Arc::new(std::fs::File::open(&path).map_err(|e| io_err(&path, e))?);
        let threshold = crate::mime::stream_threshold(self.cfg.stream_threshold_mib);
        let mut reader = MboxReader::new(src.clone(), from, size, threshold);
        let mut fetched = 0usize;
        while let Some(m) = reader.next_message().map_err(|e| io_err(&path, e))? {
            let rec = record_of(
                &self.cfg.name,
                coll,
                &path,
                &src,
                m,
                &mut counts,
                &mut digests,
            );
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
