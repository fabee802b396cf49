//! IMAP source (`type = "imap"`).
//!
//! - Collections are folders: id = [`crate::ids::collection_id`] of the
//!   decoded folder name, name = the folder name as the server shows it
//!   (modified UTF-7 decoded).
//! - Record id = `<UIDVALIDITY>-<UID>`; meta: `folder`, `uidvalidity`,
//!   `uid`, `message_id`, `flags` (sorted, space-joined, `\Recent` left
//!   out: it is per session), `internal_date` (RFC 3339), `modseq` (with
//!   CONDSTORE), `size`, `blake3` (content digest), `warning` when the
//!   message could not be fully understood.
//! - Payload = the message exactly as `BODY.PEEK[]` returns it (the folder is
//!   opened with EXAMINE and bodies fetched with PEEK: nothing is marked
//!   `\Seen`), extension `eml`.
//! - Large messages: each body FETCH batch first asks for `RFC822.SIZE`.
//!   Messages up to `stream_threshold_mib` (default 8 MiB) are fetched whole
//!   into memory as before. Larger ones are fetched one by one in pieces of
//!   4 MiB (`BODY.PEEK[]<offset.4194304>` partial fetches, until a piece
//!   comes back short) into an unnamed temporary file (`temp_dir`, default
//!   the system's; mode 0600, removed when closed, i.e. once the record is
//!   stored) and handed on as `Payload::Reader`; at most one piece is in
//!   memory. Their metadata is parsed from the first MiB only
//!   (`mime::PARSE_PREFIX`, meta `parsed_bytes`): the text body is
//!   cut there, an attachment cut by it has an unknown size, and parts
//!   starting after it are not described (the payload holds them all).
//! - Cursor (JSON): `{v, folder, uidvalidity, uidnext, highestmodseq?, uids}`
//!   where `uids` is the set of UIDs already stored, as IMAP ranges
//!   (`1:500,502:9000`) to stay compact.
//!
//! Incremental sync of a folder:
//! 1. UIDVALIDITY differs, the cursor is for another folder or unreadable →
//!    `Change::Reset` and a full listing (every message fetched).
//! 2. Nothing changed (same UIDNEXT, same message count, same HIGHESTMODSEQ)
//!    → no change at all, no command beyond EXAMINE.
//! 3. UIDs ≥ the stored UIDNEXT → fetched (`Upsert`).
//! 4. Flag changes: with CONDSTORE, `UID FETCH 1:<uidnext-1> (FLAGS)
//!    (CHANGEDSINCE <modseq>)` → `UpdateMeta` (no body fetched). Without
//!    CONDSTORE the flags of every stored message are fetched and sent as
//!    `UpdateMeta` each time (still no body).
//! 5. Deletions: with QRESYNC the same FETCH carries `VANISHED`; otherwise,
//!    or when the counts do not add up, `UID SEARCH UID 1:<uidnext-1>`
//!    against the stored UID set → `Delete`.
//!
//! `UpdateMeta` carries `flags` and `modseq` only; custos merges them into
//! the stored metadata.

mod client;
mod config;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

pub use config::ImapConfig;

use crate::config::SecretRef;
use crate::ids::collection_id;
use crate::mime::Content;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Record, RecordKind, Result,
};
use client::{mutf7_encode, Conn, Event, FetchItem, SelectInfo};

/// UIDs per body FETCH command.
const FETCH_BATCH: usize = 256;

/// Bytes per partial FETCH of a streamed (large) message.
const PIECE: u64 = 4 << 20;

/// The IMAP connector.
pub struct ImapConnector {
    cfg: ImapConfig,
    password: SecretRef,
    conn: Mutex<Option<Conn>>,
    /// Tests: behave as if the server lacked QRESYNC (deletions by UID set
    /// difference).
    no_qresync: bool,
    /// Bytes per partial FETCH of a large message ([`PIECE`]; tests change it).
    piece: u64,
}

impl std::fmt::Debug for ImapConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImapConnector")
            .field("name", &self.cfg.name)
            .field("host", &self.cfg.host)
            .finish()
    }
}

/// The per-folder cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImapCursor {
    v: u32,
    folder: String,
    uidvalidity: u32,
    uidnext: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    highestmodseq: Option<u64>,
    uids: String,
}

const CURSOR_VERSION: u32 = 1;

/// Format sorted, deduplicated UIDs as IMAP ranges (`1:3,5`).
pub(crate) fn uids_to_ranges(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// Parse IMAP ranges back into sorted UIDs; `None` when malformed.
pub(crate) fn ranges_to_uids(s: &str) -> Option<Vec<u32>> {
    let mut out: Vec<u32> = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for part in s.split(',') {
        let (a, b) = match part.split_once(':') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        if a == 0 || b < a || out.last().is_some_and(|l| *l >= a) {
            return None;
        }
        out.extend(a..=b);
    }
    Some(out)
}

/// Flags as stored in meta: sorted, space-joined, `\Recent` left out.
fn flags_meta(flags: &[String]) -> String {
    let mut f: Vec<&str> = flags
        .iter()
        .map(|s| s.as_str())
        .filter(|s| !s.eq_ignore_ascii_case("\\Recent"))
        .collect();
    f.sort_unstable();
    f.dedup();
    f.join(" ")
}

/// Parse an IMAP INTERNALDATE (`17-Jul-1996 02:44:25 -0700`).
pub fn parse_internal_date(s: &str) -> Option<DateTime<FixedOffset>> {
    DateTime::parse_from_str(s.trim(), "%d-%b-%Y %H:%M:%S %z").ok()
}

/// Format a time as an IMAP INTERNALDATE (for APPEND).
pub fn format_internal_date(t: &DateTime<FixedOffset>) -> String {
    t.format("%d-%b-%Y %H:%M:%S %z").to_string()
}

impl ImapConnector {
    /// A connector for `cfg` (nothing is contacted yet).
    pub fn new(cfg: ImapConfig) -> Result<ImapConnector> {
        let password = SecretRef::pick(
            "password",
            &cfg.password_env,
            &cfg.password_file,
            &cfg.password_command,
        )
        .map_err(|detail| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        })?
        .ok_or_else(|| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail: "give one of password_env, password_file, password_command".into(),
        })?;
        Ok(ImapConnector {
            cfg,
            password,
            conn: Mutex::new(None),
            no_qresync: false,
            piece: PIECE,
        })
    }

    async fn connect(&self) -> Result<Conn> {
        let pw = self.password.resolve().map_err(|e| ConnectorError::Auth {
            source_name: self.cfg.name.clone(),
            detail: format!("password: {e}"),
        })?;
        let mut c = client::connect(&self.cfg, &pw).await?;
        if self.no_qresync {
            c.qresync = false;
        }
        Ok(c)
    }

    /// Run `f` on the cached session (or a new one); the session is kept for
    /// the next call only when `f` succeeded (an error may leave a command
    /// half-read).
    async fn with_conn<T, F>(&self, f: F) -> Result<T>
    where
        F: AsyncFnOnce(&mut Conn) -> Result<T>,
    {
        let mut guard = self.conn.lock().await;
        let mut conn = match guard.take() {
            Some(c) => c,
            None => self.connect().await?,
        };
        let r = f(&mut conn).await;
        if r.is_ok() {
            *guard = Some(conn);
        }
        r
    }

    /// Create `folder` (display name) unless it exists.
    pub async fn create_folder_if_missing(&self, folder: &str) -> Result<()> {
        let wire = mutf7_encode(folder);
        self.with_conn(async |c: &mut Conn| {
            let exists = c.list_folders().await?.iter().any(|f| f.wire == wire);
            if !exists {
                c.simple(&format!("CREATE {}", client::quote(&wire)))
                    .await?;
                tracing::info!(source = %c.source, folder, "imap: created folder");
            }
            Ok(())
        })
        .await
    }

    /// Append a message to `folder` (restore into the source): the raw bytes
    /// as given, with `flags` (`\Seen`, `$Label` …; `\Recent` is dropped) and
    /// the internal date. The folder is created when missing.
    pub async fn append(
        &self,
        folder: &str,
        raw: &[u8],
        flags: &[String],
        internal_date: Option<DateTime<FixedOffset>>,
    ) -> Result<()> {
        self.create_folder_if_missing(folder).await?;
        let wire = mutf7_encode(folder);
        let flags: Vec<String> = flags
            .iter()
            .filter(|f| !f.eq_ignore_ascii_case("\\Recent") && !f.is_empty())
            .cloned()
            .collect();
        let date = internal_date.as_ref().map(format_internal_date);
        self.with_conn(async |c: &mut Conn| {
            c.selected = None;
            c.append(&wire, raw, &flags, date.as_deref()).await
        })
        .await
    }

    /// [`ImapConnector::append`] with flags and internal date taken from a
    /// stored record's meta (`flags`, `internal_date`).
    pub async fn append_with_meta(
        &self,
        folder: &str,
        raw: &[u8],
        meta: &BTreeMap<String, String>,
    ) -> Result<()> {
        let flags: Vec<String> = meta
            .get("flags")
            .map(|f| f.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let date = meta
            .get("internal_date")
            .and_then(|d| DateTime::parse_from_rfc3339(d).ok());
        self.append(folder, raw, &flags, date).await
    }

    /// The record of `item` (UID, flags, dates) with its body: `content`,
    /// or else `item.body` in memory.
    fn record(
        &self,
        coll: &Collection,
        uidvalidity: u32,
        mut item: FetchItem,
        content: Option<Content>,
    ) -> Option<Record> {
        let uid = item.uid?;
        let id = format!("{uidvalidity}-{uid}");
        let mut warnings = Vec::new();
        let content = match (content, item.body.take()) {
            (Some(c), _) => c,
            (None, Some(b)) => Content::Bytes(b),
            (None, None) => {
                warnings.push("missing_body: the server returned no BODY[]".to_string());
                Content::Bytes(Vec::new())
            }
        };
        let mut meta = BTreeMap::new();
        let (info, payload) = content.into_payload(&mut meta);
        warnings.extend(info.warnings.iter().cloned());
        meta.insert("folder".into(), coll.name.clone());
        meta.insert("uidvalidity".into(), uidvalidity.to_string());
        meta.insert("uid".into(), uid.to_string());
        if let Some(m) = &info.message_id {
            meta.insert("message_id".into(), m.clone());
        }
        meta.insert(
            "flags".into(),
            flags_meta(item.flags.as_deref().unwrap_or_default()),
        );
        let idate = item.internal_date.as_deref().and_then(parse_internal_date);
        if let Some(d) = &idate {
            meta.insert("internal_date".into(), d.to_rfc3339());
        }
        if let Some(m) = item.modseq {
            meta.insert("modseq".into(), m.to_string());
        }
        if !warnings.is_empty() {
            tracing::warn!(source = %self.cfg.name, collection = %coll.id, record = %id, warning = %warnings.join("; "), "imap: message archived with a warning");
            meta.insert("warning".into(), warnings.join("; "));
        }
        Some(Record {
            id,
            collection: coll.id.clone(),
            kind: RecordKind::Email,
            created: info
                .created
                .or_else(|| idate.map(|d| d.with_timezone(&Utc))),
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
        })
    }

    /// Fetch the bodies of `uids` (sorted) and push them; returns the UIDs
    /// seen. Messages over the stream threshold are fetched in pieces into a
    /// temporary file ([`ImapConnector::fetch_large`]).
    async fn fetch_bodies(
        &self,
        c: &mut Conn,
        coll: &Collection,
        uidvalidity: u32,
        uids: &[u32],
        sink: &mut dyn ChangeSink,
    ) -> Result<Vec<u32>> {
        let items = if c.condstore {
            "(UID FLAGS INTERNALDATE MODSEQ BODY.PEEK[])"
        } else {
            "(UID FLAGS INTERNALDATE BODY.PEEK[])"
        };
        let threshold = crate::mime::stream_threshold(self.cfg.stream_threshold_mib);
        let mut seen = Vec::with_capacity(uids.len());
        for batch in uids.chunks(FETCH_BATCH) {
            let large = self.large_uids(c, batch, threshold).await?;
            let small: Vec<u32> = batch
                .iter()
                .copied()
                .filter(|u| large.binary_search(u).is_err())
                .collect();
            if !small.is_empty() {
                let set = uids_to_ranges(&small);
                let tag = c.command(&format!("UID FETCH {set} {items}")).await?;
                while let Some(ev) = c.next(&tag).await? {
                    let Event::Fetch(item) = ev else { continue };
                    let Some(uid) = item.uid else { continue };
                    if item.body.is_none() || small.binary_search(&uid).is_err() {
                        continue; // an unsolicited FETCH (flags of another message)
                    }
                    if let Some(rec) = self.record(coll, uidvalidity, item, None) {
                        sink.push(Change::Upsert(rec)).await?;
                        seen.push(uid);
                    }
                }
            }
            for uid in large {
                let Some((item, content)) = self.fetch_large(c, coll, uid).await? else {
                    continue;
                };
                if let Some(rec) = self.record(coll, uidvalidity, item, Some(content)) {
                    sink.push(Change::Upsert(rec)).await?;
                    seen.push(uid);
                }
            }
        }
        seen.sort_unstable();
        seen.dedup();
        Ok(seen)
    }

    /// The UIDs of `batch` whose RFC822.SIZE is over `threshold`, sorted.
    async fn large_uids(&self, c: &mut Conn, batch: &[u32], threshold: u64) -> Result<Vec<u32>> {
        let tag = c
            .command(&format!(
                "UID FETCH {} (UID RFC822.SIZE)",
                uids_to_ranges(batch)
            ))
            .await?;
        let mut large = Vec::new();
        while let Some(ev) = c.next(&tag).await? {
            if let Event::Fetch(FetchItem {
                uid: Some(uid),
                size: Some(size),
                ..
            }) = ev
            {
                if size > threshold && batch.binary_search(&uid).is_ok() {
                    large.push(uid);
                }
            }
        }
        large.sort_unstable();
        large.dedup();
        Ok(large)
    }

    /// Fetch message `uid` in pieces of `self.piece` bytes into an unnamed
    /// temporary file; its flags and dates come with the first piece.
    /// `None` when the server returns no body (the message is gone).
    async fn fetch_large(
        &self,
        c: &mut Conn,
        coll: &Collection,
        uid: u32,
    ) -> Result<Option<(FetchItem, Content)>> {
        use std::io::Write;
        let tmp_err = |e: std::io::Error| ConnectorError::Unavailable {
            source_name: self.cfg.name.clone(),
            detail: format!(
                "IMAP folder {:?}: temporary file for message UID {uid}: {e}",
                coll.name
            ),
        };
        let mut file = match &self.cfg.temp_dir {
            Some(d) => tempfile::tempfile_in(d),
            None => tempfile::tempfile(),
        }
        .map_err(tmp_err)?;
        let meta_items = if c.condstore {
            "UID FLAGS INTERNALDATE MODSEQ"
        } else {
            "UID FLAGS INTERNALDATE"
        };
        let mut first: Option<FetchItem> = None;
        let mut offset = 0u64;
        loop {
            let items = if first.is_none() { meta_items } else { "UID" };
            let cmd = format!(
                "UID FETCH {uid} ({items} BODY.PEEK[]<{offset}.{}>)",
                self.piece
            );
            let tag = c.command(&cmd).await?;
            let mut got: Option<FetchItem> = None;
            while let Some(ev) = c.next(&tag).await? {
                if let Event::Fetch(item) = ev {
                    if item.uid == Some(uid) && item.body.is_some() {
                        got = Some(item);
                    }
                }
            }
            let Some(mut item) = got else {
                tracing::warn!(source = %self.cfg.name, collection = %coll.id, uid, offset, "imap: large message gone while fetched; skipped");
                return Ok(None);
            };
            let piece = item.body.take().unwrap_or_default();
            file.write_all(&piece).map_err(tmp_err)?;
            offset += piece.len() as u64;
            if first.is_none() {
                first = Some(item);
            }
            if (piece.len() as u64) < self.piece {
                break;
            }
        }
        file.flush().map_err(tmp_err)?;
        use std::io::Seek;
        file.rewind().map_err(tmp_err)?;
        let content = Content::spool(file).map_err(tmp_err)?;
        tracing::debug!(source = %self.cfg.name, collection = %coll.id, uid, bytes = offset, "imap: large message fetched in pieces");
        Ok(first.map(|item| (item, content)))
    }

    async fn sync_folder(
        &self,
        c: &mut Conn,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let wire = mutf7_encode(&coll.name);
        let info = c.examine(&wire).await?;
        let Some(uidvalidity) = info.uidvalidity else {
            return Err(ConnectorError::Unavailable {
                source_name: self.cfg.name.clone(),
                detail: format!("IMAP folder {:?}: no UIDVALIDITY", coll.name),
            });
        };
        let old: Option<ImapCursor> = cursor.and_then(|c| serde_json::from_value(c.clone()).ok());
        let usable = old.as_ref().and_then(|o| {
            let uids = ranges_to_uids(&o.uids)?;
            let ok = o.v == CURSOR_VERSION
                && o.folder == wire
                && o.uidvalidity == uidvalidity
                && o.uidnext >= 1
                && uids.last().is_none_or(|l| *l < o.uidnext);
            ok.then_some(uids)
        });
        let (cur, known) = match (old, usable) {
            (Some(o), Some(known)) => (o, known),
            (o, _) => {
                let reason = match (&o, cursor) {
                    (_, None) => "no cursor",
                    (None, Some(_)) => "unreadable cursor",
                    (Some(o), _) if o.uidvalidity != uidvalidity => "UIDVALIDITY changed",
                    _ => "cursor does not match this folder",
                };
                tracing::info!(source = %self.cfg.name, collection = %coll.id, reason, uidvalidity, "imap: full listing");
                return self.full(c, coll, &wire, uidvalidity, info, sink).await;
            }
        };
        self.incremental(c, coll, &wire, uidvalidity, info, cur, known, sink)
            .await
    }

    async fn full(
        &self,
        c: &mut Conn,
        coll: &Collection,
        wire: &str,
        uidvalidity: u32,
        info: SelectInfo,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        sink.push(Change::Reset).await?;
        let uids = if info.exists == 0 {
            Vec::new()
        } else {
            c.uid_search("ALL").await?
        };
        let seen = self.fetch_bodies(c, coll, uidvalidity, &uids, sink).await?;
        let uidnext = info
            .uidnext
            .unwrap_or(1)
            .max(seen.last().map_or(1, |l| l + 1));
        let cur = ImapCursor {
            v: CURSOR_VERSION,
            folder: wire.to_string(),
            uidvalidity,
            uidnext,
            highestmodseq: info.highestmodseq.filter(|_| c.condstore),
            uids: uids_to_ranges(&seen),
        };
        tracing::info!(source = %self.cfg.name, collection = %coll.id, fetched = seen.len(), "imap: full listing done");
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn incremental(
        &self,
        c: &mut Conn,
        coll: &Collection,
        wire: &str,
        uidvalidity: u32,
        info: SelectInfo,
        cur: ImapCursor,
        known: Vec<u32>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let uidnext_now = info.uidnext.unwrap_or(u32::MAX);
        let modseq_same =
            c.condstore && cur.highestmodseq.is_some() && info.highestmodseq == cur.highestmodseq;
        if uidnext_now == cur.uidnext && info.exists as usize == known.len() && modseq_same {
            tracing::debug!(source = %self.cfg.name, collection = %coll.id, "imap: folder unchanged");
            return Ok(serde_json::to_value(cur).expect("cursor serializes"));
        }
        let last_known = cur.uidnext - 1; // UIDs ≤ this were listed before

        // Flags (and, with QRESYNC, deletions) of the stored messages.
        let mut deleted: Vec<u32> = Vec::new();
        let mut meta_updates: Vec<(u32, BTreeMap<String, String>)> = Vec::new();
        let mut vanished_used = false;
        if last_known >= 1 && !known.is_empty() && !modseq_same {
            let cmd = match (c.condstore, cur.highestmodseq) {
                (true, Some(m)) if c.qresync => {
                    vanished_used = true;
                    format!(
                        "UID FETCH 1:{last_known} (UID FLAGS MODSEQ) (CHANGEDSINCE {m} VANISHED)"
                    )
                }
                (true, Some(m)) => {
                    format!("UID FETCH 1:{last_known} (UID FLAGS MODSEQ) (CHANGEDSINCE {m})")
                }
                _ => format!("UID FETCH 1:{last_known} (UID FLAGS)"),
            };
            let tag = c.command(&cmd).await?;
            while let Some(ev) = c.next(&tag).await? {
                match ev {
                    Event::Fetch(item) => {
                        let (Some(uid), Some(flags)) = (item.uid, item.flags) else {
                            continue;
                        };
                        if known.binary_search(&uid).is_err() {
                            continue;
                        }
                        let mut meta = BTreeMap::new();
                        meta.insert("flags".to_string(), flags_meta(&flags));
                        if let Some(m) = item.modseq {
                            meta.insert("modseq".to_string(), m.to_string());
                        }
                        meta_updates.push((uid, meta));
                    }
                    Event::Vanished(ranges) => {
                        for r in ranges {
                            for uid in r {
                                if known.binary_search(&uid).is_ok() {
                                    deleted.push(uid);
                                }
                            }
                        }
                    }
                    Event::Search(_) => {}
                }
            }
        }
        deleted.sort_unstable();
        deleted.dedup();

        // New messages: UID ≥ the stored UIDNEXT (`n:*` also matches the
        // highest UID when it is below n, hence the filter).
        let new_uids: Vec<u32> = if uidnext_now > cur.uidnext {
            c.uid_search(&format!("UID {}:*", cur.uidnext))
                .await?
                .into_iter()
                .filter(|u| *u >= cur.uidnext)
                .collect()
        } else {
            Vec::new()
        };

        // Deletions by set difference unless VANISHED accounted for all of them.
        let new_at_examine = new_uids.iter().filter(|u| **u < uidnext_now).count();
        let still_known = known.len() - deleted.len();
        if !(vanished_used && info.exists as usize == still_known + new_at_examine)
            && info.exists as usize != known.len() + new_at_examine
        {
            let present = if last_known >= 1 {
                c.uid_search(&format!("UID 1:{last_known}")).await?
            } else {
                Vec::new()
            };
            deleted = known
                .iter()
                .copied()
                .filter(|u| present.binary_search(u).is_err())
                .collect();
        }

        for uid in &deleted {
            sink.push(Change::Delete {
                id: format!("{uidvalidity}-{uid}"),
            })
            .await?;
        }
        for (uid, meta) in meta_updates {
            if deleted.binary_search(&uid).is_ok() {
                continue;
            }
            sink.push(Change::UpdateMeta {
                id: format!("{uidvalidity}-{uid}"),
                meta,
            })
            .await?;
        }
        let fetched = self
            .fetch_bodies(c, coll, uidvalidity, &new_uids, sink)
            .await?;

        let mut uids: Vec<u32> = known
            .into_iter()
            .filter(|u| deleted.binary_search(u).is_err())
            .collect();
        uids.extend(fetched.iter().copied());
        uids.sort_unstable();
        uids.dedup();
        let uidnext = cur
            .uidnext
            .max(info.uidnext.unwrap_or(0))
            .max(fetched.last().map_or(0, |l| l + 1));
        tracing::info!(source = %self.cfg.name, collection = %coll.id, fetched = fetched.len(), deleted = deleted.len(), vanished_used, "imap: incremental sync done");
        let next = ImapCursor {
            v: CURSOR_VERSION,
            folder: wire.to_string(),
            uidvalidity,
            uidnext,
            highestmodseq: info.highestmodseq.filter(|_| c.condstore),
            uids: uids_to_ranges(&uids),
        };
        Ok(serde_json::to_value(next).expect("cursor serializes"))
    }
}

#[async_trait]
impl Connector for ImapConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: true,
            reports_edits: true,
            has_attachments: true,
            metadata_updates: true,
        }
    }

    async fn check(&self) -> Result<Health> {
        let mut c = self.connect().await?;
        let folders = c.list_folders().await?;
        let (condstore, qresync) = (c.condstore, c.qresync);
        c.logout().await;
        let mut missing = Vec::new();
        if let Some(want) = &self.cfg.folders {
            for f in want {
                if !folders.iter().any(|x| &x.name == f) {
                    missing.push(f.clone());
                }
            }
        }
        if !missing.is_empty() {
            return Err(ConnectorError::Unavailable {
                source_name: self.cfg.name.clone(),
                detail: format!("IMAP folders not found: {missing:?}"),
            });
        }
        let n = self.cfg.folders.as_ref().map_or(folders.len(), |f| f.len());
        Ok(Health {
            summary: format!(
                "IMAP {}:{}: {n} folders{}{}",
                self.cfg.host,
                self.cfg.effective_port(),
                if condstore { ", CONDSTORE" } else { "" },
                if qresync { ", QRESYNC" } else { "" },
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        let folders = self
            .with_conn(async |c: &mut Conn| c.list_folders().await)
            .await?;
        let names: Vec<String> = match &self.cfg.folders {
            Some(want) => {
                let missing: Vec<&String> = want
                    .iter()
                    .filter(|f| !folders.iter().any(|x| &x.name == *f))
                    .collect();
                if !missing.is_empty() {
                    return Err(ConnectorError::Unavailable {
                        source_name: self.cfg.name.clone(),
                        detail: format!("IMAP folders not found: {missing:?}"),
                    });
                }
                want.clone()
            }
            None => folders.into_iter().map(|f| f.name).collect(),
        };
        Ok(names
            .into_iter()
            .map(|name| Collection {
                id: collection_id(&name),
                name,
            })
            .collect())
    }

    async fn sync(
        &self,
        collection: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        self.with_conn(async |c: &mut Conn| self.sync_folder(c, collection, cursor, sink).await)
            .await
    }
}
