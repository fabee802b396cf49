//! `type = "slack_export"`: an unzipped Slack export folder
//! (`channels.json`, `users.json`, `<channel>/<YYYY-MM-DD>.json`; also
//! `groups.json`, `mpims.json`, `dms.json` when present).
//!
//! - Collection = a channel (or group / DM) folder; id from its name.
//! - One record per message, kind `chat_message`, id = the message's `ts`
//!   (`1612345678.000200`, the `.` kept; `-2` … for a repeated ts).
//! - Payload = the message's JSON object **exactly as in the day file**: the
//!   array is parsed into `Box<RawValue>` slices, so no re-serialization
//!   touches it. Extension `json`.
//! - participants = the author's user id and name (from `users.json`) and the
//!   users mentioned (`<@U…>`); customer_ids = `email:` of the author when
//!   the profile has one; created from `ts`, updated from `edited.ts`.
//! - Meta: `channel`, `day`, `ts`, `user`, `user_name`, `thread_ts`,
//!   `parent_user_id`, `reply_count`, `subtype`, `edited_ts`, `file_urls`.
//! - Files listed in a message are attachments by metadata only (name, media
//!   type, size; content `None`): an export holds their URLs, not the files.
//! - Sync: full listing (`Reset`); a day file whose size, mtime and ctime are
//!   unchanged is sent as `Keep` from the cursor without being read; a
//!   changed day file is read and only messages whose bytes changed are sent
//!   as `Upsert` (the cursor keeps a short hash per message). A day file
//!   that cannot be parsed keeps its previous records (`Keep`) and is logged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{ctime_ns, io_err, mtime_ns, FILE_CURSOR_VERSION};
use crate::ids::{collection_id, record_id};
use crate::record::Attachment;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result,
};

/// An unzipped Slack export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackExportConfig {
    /// Source name (snapshots are grouped by it).
    pub name: String,
    /// The export folder (holding `channels.json` and one folder per channel).
    pub path: PathBuf,
}

/// The Slack export connector.
#[derive(Debug)]
pub struct SlackExportConnector {
    cfg: SlackExportConfig,
}

impl SlackExportConnector {
    /// A connector for `cfg`.
    pub fn new(cfg: SlackExportConfig) -> SlackExportConnector {
        SlackExportConnector { cfg }
    }
}

#[derive(Debug, Default, Deserialize)]
struct Conversation {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Profile {
    #[serde(default)]
    pub(crate) email: Option<String>,
    #[serde(default)]
    pub(crate) real_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct User {
    pub(crate) id: String,
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) real_name: Option<String>,
    #[serde(default)]
    pub(crate) profile: Option<Profile>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct SlackFile {
    #[serde(default)]
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) title: Option<String>,
    #[serde(default)]
    pub(crate) mimetype: Option<String>,
    #[serde(default)]
    pub(crate) size: Option<u64>,
    #[serde(default)]
    pub(crate) url_private: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Edited {
    #[serde(default)]
    pub(crate) ts: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Message {
    #[serde(default)]
    pub(crate) ts: Option<String>,
    #[serde(default)]
    pub(crate) user: Option<String>,
    #[serde(default)]
    pub(crate) text: Option<String>,
    #[serde(default)]
    pub(crate) thread_ts: Option<String>,
    #[serde(default)]
    pub(crate) parent_user_id: Option<String>,
    #[serde(default)]
    pub(crate) reply_count: Option<u64>,
    #[serde(default)]
    pub(crate) subtype: Option<String>,
    #[serde(default)]
    pub(crate) edited: Option<Edited>,
    #[serde(default)]
    pub(crate) files: Option<Vec<SlackFile>>,
    #[serde(default)]
    pub(crate) username: Option<String>,
}

/// Per day file: what was read last time.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DayState {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    /// record id → first 8 hex of the BLAKE3 of its payload.
    msgs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackCursor {
    v: u32,
    kind: String,
    collection: String,
    files: BTreeMap<String, DayState>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ConnectorError::Malformed {
                source_name: String::new(),
                what: path.display().to_string(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, e)),
    }
}

pub(crate) fn ts_time(ts: &str) -> Option<chrono::DateTime<Utc>> {
    let (s, frac) = ts.split_once('.').unwrap_or((ts, "0"));
    let secs: i64 = s.parse().ok()?;
    let mut f = frac.to_string();
    f.truncate(9);
    while f.len() < 9 {
        f.push('0');
    }
    let nanos: u32 = f.parse().ok()?;
    Utc.timestamp_opt(secs, nanos).single()
}

fn mentions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("<@") {
        rest = &rest[i + 2..];
        let end = rest.find(['>', '|']).unwrap_or(rest.len());
        let id = &rest[..end];
        if !id.is_empty() && id.len() < 32 && id.chars().all(|c| c.is_ascii_alphanumeric()) {
            out.push(id.to_string());
        }
    }
    out
}

impl SlackExportConnector {
    fn with_source(&self, e: ConnectorError) -> ConnectorError {
        match e {
            ConnectorError::Malformed { what, detail, .. } => ConnectorError::Malformed {
                source_name: self.cfg.name.clone(),
                what,
                detail,
            },
            other => other,
        }
    }

    /// (folder name) of every conversation: from the index files, plus any
    /// folder with day files that they do not list.
    fn conversations(&self) -> Result<Vec<String>> {
        let root = &self.cfg.path;
        if !root.join("channels.json").is_file() && !root.is_dir() {
            return Err(io_err(
                root,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a Slack export folder"),
            ));
        }
        let mut names = BTreeSet::new();
        for (file, by_id) in [
            ("channels.json", false),
            ("groups.json", false),
            ("mpims.json", false),
            ("dms.json", true),
        ] {
            let list: Option<Vec<Conversation>> =
                read_json(&root.join(file)).map_err(|e| self.with_source(e))?;
            for c in list.unwrap_or_default() {
                let n = if by_id { c.id } else { c.name.or(c.id) };
                if let Some(n) = n.filter(|n| !n.is_empty() && !n.contains(['/', '\\'])) {
                    names.insert(n);
                }
            }
        }
        for entry in std::fs::read_dir(root)
            .map_err(|e| io_err(root, e))?
            .flatten()
        {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                names.insert(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names.into_iter().collect())
    }

    fn users(&self) -> Result<HashMap<String, User>> {
        let list: Option<Vec<User>> =
            read_json(&self.cfg.path.join("users.json")).map_err(|e| self.with_source(e))?;
        Ok(list
            .unwrap_or_default()
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect())
    }
}

/// One Slack message (export day file or Web API answer) as a record: `raw`
/// is the message's exact JSON bytes (the payload), `day` its UTC day.
pub(crate) fn message_record(
    coll: &Collection,
    day: &str,
    id: String,
    raw: &[u8],
    msg: &Message,
    users: &HashMap<String, User>,
) -> Record {
    let mut meta = BTreeMap::new();
    let mut participants = Vec::new();
    let mut customer_ids = Vec::new();
    let push_user = |uid: &str, participants: &mut Vec<String>| {
        if !participants.iter().any(|p| p == uid) {
            participants.push(uid.to_string());
        }
        if let Some(n) = users.get(uid).and_then(|u| u.name.clone()) {
            if !participants.contains(&n) {
                participants.push(n);
            }
        }
    };
    if let Some(uid) = &msg.user {
        push_user(uid, &mut participants);
        meta.insert("user".into(), uid.clone());
        if let Some(u) = users.get(uid) {
            let name = u
                .real_name
                .clone()
                .or_else(|| u.profile.as_ref().and_then(|p| p.real_name.clone()))
                .or_else(|| u.name.clone());
            if let Some(n) = name {
                meta.insert("user_name".into(), n);
            }
            if let Some(e) = u.profile.as_ref().and_then(|p| p.email.as_deref()) {
                if let Some(c) = super::customer_id("email", e) {
                    customer_ids.push(c);
                }
            }
        }
    } else if let Some(n) = &msg.username {
        participants.push(n.clone());
        meta.insert("user_name".into(), n.clone());
    }
    for m in mentions(msg.text.as_deref().unwrap_or_default()) {
        push_user(&m, &mut participants);
    }
    meta.insert("channel".into(), coll.name.clone());
    meta.insert("day".into(), day.to_string());
    if let Some(ts) = &msg.ts {
        meta.insert("ts".into(), ts.clone());
    }
    for (k, v) in [
        ("thread_ts", msg.thread_ts.clone()),
        ("parent_user_id", msg.parent_user_id.clone()),
        ("reply_count", msg.reply_count.map(|n| n.to_string())),
        ("subtype", msg.subtype.clone()),
        ("edited_ts", msg.edited.as_ref().and_then(|e| e.ts.clone())),
    ] {
        if let Some(v) = v {
            meta.insert(k.into(), v);
        }
    }
    let mut attachments = Vec::new();
    let mut urls = Vec::new();
    for f in msg.files.iter().flatten() {
        attachments.push(Attachment {
            name: f
                .name
                .clone()
                .or_else(|| f.title.clone())
                .unwrap_or_default(),
            media_type: f
                .mimetype
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
            size: f.size,
            content: None,
        });
        if let Some(u) = &f.url_private {
            urls.push(u.clone());
        }
    }
    if !urls.is_empty() {
        meta.insert("file_urls".into(), urls.join(" "));
    }
    Record {
        id,
        collection: coll.id.clone(),
        kind: RecordKind::ChatMessage,
        created: msg.ts.as_deref().and_then(ts_time),
        updated: msg
            .edited
            .as_ref()
            .and_then(|e| e.ts.as_deref())
            .and_then(ts_time),
        participants,
        customer_ids,
        jurisdiction: None,
        subject: None,
        text: msg.text.clone(),
        attachments,
        payload: Payload::Bytes(raw.to_vec()),
        payload_ext: "json".into(),
        deleted: false,
        meta,
    }
}

fn day_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.ends_with(".json") && e.file_type().is_ok_and(|t| t.is_file()))
                .then(|| (name, e.path()))
        })
        .collect();
    v.sort();
    v
}

#[async_trait]
impl Connector for SlackExportConnector {
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
        let n = self.conversations()?.len();
        let u = self.users()?.len();
        Ok(Health {
            summary: format!(
                "Slack export {}: {n} conversations, {u} users",
                self.cfg.path.display()
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        Ok(self
            .conversations()?
            .into_iter()
            .map(|name| Collection {
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
        let old: Option<SlackCursor> = cursor
            .and_then(|c| serde_json::from_value::<SlackCursor>(c.clone()).ok())
            .filter(|c| {
                c.v == FILE_CURSOR_VERSION && c.kind == "slack_export" && c.collection == coll.id
            });
        let users = self.users()?;
        let dir = self.cfg.path.join(&coll.name);
        sink.push(Change::Reset).await?;
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut files: BTreeMap<String, DayState> = BTreeMap::new();
        let (mut kept, mut read) = (0usize, 0usize);
        for (day_file, path) in day_files(&dir) {
            let Ok(md) = std::fs::metadata(&path) else {
                continue;
            };
            let (size, mt, ct) = (md.len(), mtime_ns(&md), ctime_ns(&md));
            let prev = old.as_ref().and_then(|o| o.files.get(&day_file));
            if let Some(p) = prev.filter(|p| p.size == size && p.mtime_ns == mt && p.ctime_ns == ct)
            {
                for id in p.msgs.keys() {
                    seen.insert(id.clone());
                    kept += 1;
                    sink.push(Change::Keep { id: id.clone() }).await?;
                }
                files.insert(day_file, p.clone());
                continue;
            }
            let day = day_file.trim_end_matches(".json").to_string();
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| {
                    serde_json::from_slice::<Vec<Box<RawValue>>>(&b).map_err(|e| e.to_string())
                });
            let elems = match parsed {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), error = %e, "unparseable_day_file: previous records kept");
                    if let Some(p) = prev {
                        for id in p.msgs.keys() {
                            seen.insert(id.clone());
                            sink.push(Change::Keep { id: id.clone() }).await?;
                        }
                        files.insert(day_file, p.clone());
                    }
                    continue;
                }
            };
            let mut msgs = BTreeMap::new();
            for (i, raw) in elems.iter().enumerate() {
                let msg: Message = match serde_json::from_str(raw.get()) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), index = i, error = %e, "malformed_message: not a message object, skipped");
                        continue;
                    }
                };
                let Some(ts) = msg.ts.clone().filter(|t| !t.is_empty()) else {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, file = %path.display(), index = i, "message_without_ts: skipped");
                    continue;
                };
                let base = record_id(&ts);
                let mut id = base.clone();
                let mut n = 1;
                while seen.contains(&id) {
                    n += 1;
                    id = format!("{base}-{n}");
                }
                seen.insert(id.clone());
                let h = blake3::hash(raw.get().as_bytes()).to_hex()[..8].to_string();
                let unchanged = prev.and_then(|p| p.msgs.get(&id)) == Some(&h);
                msgs.insert(id.clone(), h);
                if unchanged {
                    kept += 1;
                    sink.push(Change::Keep { id }).await?;
                } else {
                    read += 1;
                    let rec = message_record(coll, &day, id, raw.get().as_bytes(), &msg, &users);
                    sink.push(Change::Upsert(rec)).await?;
                }
            }
            files.insert(
                day_file,
                DayState {
                    size,
                    mtime_ns: mt,
                    ctime_ns: ct,
                    msgs,
                },
            );
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, kept, read, "slack export: listed");
        let cur = SlackCursor {
            v: FILE_CURSOR_VERSION,
            kind: "slack_export".into(),
            collection: coll.id.clone(),
            files,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
