//! `type = "matrix"`: a Matrix account through the client-server API.
//!
//! - Collections: the joined rooms (`/joined_rooms`), or the configured
//!   `rooms` (ids or aliases, resolved through `/directory/room`).
//!   Collection id = the room id (percent-encoded), name = the room's
//!   `m.room.name`, else the configured alias, else the room id.
//! - Records: one per `m.room.message` event, kind `chat_message`, id = the
//!   event id (encoded with [`record_id`]); payload = the event's JSON **as
//!   the server sent it** (sliced out of the page, `unsigned` included),
//!   extension `json`; participants = the sender's MXID; customer ids from
//!   the configured `customer_ids` map only (documented: other users' e-mail
//!   3pids are not readable through the client-server API).
//! - Sync: `/sync` with a filter for this room and the timeline types
//!   `m.room.message` + `m.room.redaction`; the cursor is the `next_batch`
//!   token. When the timeline is `limited`, the gap is backfilled with
//!   `/rooms/{id}/messages?dir=b` from the timeline's `prev_batch` (down to
//!   the previous `since` token, or to the room's start on a full sync).
//!   No cursor, or one that is unusable (garbage, another room's, or refused
//!   by the server): `Reset` and the whole visible history.
//! - Edits (`m.relates_to.rel_type = "m.replace"`): the edited event is
//!   fetched again (`/rooms/{id}/event/{event_id}`, carrying the server's
//!   bundled `m.replace` aggregation) and sent as an `Upsert` of the
//!   original record; the edit event itself is not a record.
//! - Redactions: a redacted message is sent as `Delete` (a message redacted
//!   within the same sync is simply not sent). Redactions of other events
//!   (reactions) are ignored.
//! - End-to-end encrypted rooms (`m.room.encryption` state): their events
//!   are ciphertext and custos has no support for Matrix keys, so the sync
//!   of such a room fails with an error naming the room (custos reports the
//!   collection as unreadable and backs up the others); a warning naming it
//!   is logged when the rooms are listed. Nothing is skipped silently.
//!
//! Errors: 401 / `M_UNKNOWN_TOKEN` / a refused login → `Auth`; 429
//! `M_LIMIT_EXCEEDED` is retried after `retry_after_ms` (or `Retry-After`);
//! unparseable answers → `Malformed` naming the endpoint.

mod config;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

pub use config::MatrixConfig;

use crate::http::{Auth, HttpClient, HttpError, HttpOptions, RequestSpec, Secret};
use crate::ids::{collection_id, decode_collection_id, record_id};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result, SecretRef,
};

const CURSOR_VERSION: u32 = 1;
const API: &str = "_matrix/client/v3";
const TYPES: [&str; 2] = ["m.room.message", "m.room.redaction"];

/// Path segment encoding (room ids `!a:b`, aliases `#a:b`, event ids `$a`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The Matrix client-server API connector.
#[derive(Debug)]
pub struct MatrixConnector {
    cfg: MatrixConfig,
    /// Unauthenticated client (login); also the authenticated one when an
    /// access token is configured.
    base: HttpClient,
    /// The client with the login's access token.
    logged_in: OnceCell<HttpClient>,
    password: Option<Secret>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixCursor {
    v: u32,
    kind: String,
    room: String,
    since: String,
}

/// One timeline event: its exact JSON and the fields used.
struct Event {
    raw: Box<RawValue>,
    v: Value,
}

impl Event {
    fn parse(raw: Box<RawValue>) -> Option<Event> {
        let v: Value = serde_json::from_str(raw.get()).ok()?;
        v.get("event_id")?.as_str()?;
        Some(Event { raw, v })
    }
    fn id(&self) -> &str {
        self.v["event_id"].as_str().unwrap_or_default()
    }
    fn kind(&self) -> &str {
        self.v["type"].as_str().unwrap_or_default()
    }
    fn redacted(&self) -> bool {
        self.v
            .get("unsigned")
            .and_then(|u| u.get("redacted_because"))
            .is_some()
    }
    /// The target of an `m.replace` edit.
    fn replaces(&self) -> Option<&str> {
        let rel = self.v.get("content")?.get("m.relates_to")?;
        (rel.get("rel_type")?.as_str()? == "m.replace")
            .then(|| rel.get("event_id")?.as_str())
            .flatten()
    }
    /// The target of a redaction (`redacts`, or `content.redacts` since room v11).
    fn redacts(&self) -> Option<&str> {
        self.v
            .get("redacts")
            .or_else(|| self.v.get("content")?.get("redacts"))?
            .as_str()
    }
}

#[derive(Deserialize)]
struct MessagesPage {
    #[serde(default)]
    chunk: Vec<Box<RawValue>>,
    #[serde(default)]
    end: Option<String>,
}

fn ms_time(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v.as_i64()?)
}

impl MatrixConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: MatrixConfig) -> Result<MatrixConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        cfg.validate().map_err(bad)?;
        let token = SecretRef::pick(
            "access_token",
            &cfg.access_token_env,
            &cfg.access_token_file,
            &cfg.access_token_command,
        )
        .map_err(bad)?;
        let password = SecretRef::pick(
            "password",
            &cfg.password_env,
            &cfg.password_file,
            &cfg.password_command,
        )
        .map_err(bad)?
        .map(Secret::from_ref);
        let auth = match token {
            Some(t) => Auth::Bearer(Secret::from_ref(t)),
            None => Auth::None,
        };
        let base = HttpClient::new(&cfg.name, &cfg.base_url, &opts(&cfg), Some(10.0), auth)
            .map_err(|e| e.into_connector(&cfg.name))?;
        Ok(MatrixConnector {
            cfg,
            base,
            logged_in: OnceCell::new(),
            password,
        })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        e.into_connector(&self.cfg.name)
    }

    fn page_size(&self) -> u32 {
        self.cfg.page_size.unwrap_or(100)
    }

    /// The authenticated client (logging in first when configured so).
    async fn http(&self) -> Result<&HttpClient> {
        let Some(password) = &self.password else {
            return Ok(&self.base);
        };
        self.logged_in
            .get_or_try_init(|| async {
                let user = self.cfg.user.clone().unwrap_or_default();
                let pw = password.get().map_err(|e| self.err(e))?;
                let spec = RequestSpec::new(
                    reqwest::Method::POST,
                    self.base
                        .url(&format!("{API}/login"))
                        .map_err(|e| self.err(e))?,
                )
                .without_auth()
                .json_body(json!({
                    "type": "m.login.password",
                    "identifier": {"type": "m.id.user", "user": user},
                    "password": pw,
                    "initial_device_display_name": "custos backup",
                }));
                let r = self.base.json(&spec).await.map_err(|e| self.err(e))?;
                let token: String =
                    crate::http::take_at(&spec.endpoint(), &r.value, "access_token")
                        .map_err(|e| self.err(e))?;
                HttpClient::new(
                    &self.cfg.name,
                    &self.cfg.base_url,
                    &opts(&self.cfg),
                    Some(10.0),
                    Auth::Bearer(Secret::value(token)),
                )
                .map_err(|e| self.err(e))
            })
            .await
    }

    async fn get(&self, path: &str) -> Result<RequestSpec> {
        self.http()
            .await?
            .get(&format!("{API}/{path}"))
            .map_err(|e| self.err(e))
    }

    async fn json(&self, spec: &RequestSpec) -> std::result::Result<Value, HttpError> {
        let http = self.http().await.map_err(|e| HttpError::Config {
            detail: e.to_string(),
        })?;
        Ok(http.json(spec).await?.value)
    }

    async fn json_c(&self, spec: &RequestSpec) -> Result<Value> {
        let http = self.http().await?;
        http.json(spec)
            .await
            .map(|r| r.value)
            .map_err(|e| self.err(e))
    }

    /// A room state event's content, `None` when the room has none (404).
    async fn state(&self, room: &str, kind: &str) -> Result<Option<Value>> {
        let spec = self
            .get(&format!("rooms/{}/state/{kind}/", seg(room)))
            .await?;
        match self.json(&spec).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    async fn joined(&self) -> Result<Vec<String>> {
        let spec = self.get("joined_rooms").await?;
        let v = self.json_c(&spec).await?;
        crate::http::take_at(&spec.endpoint(), &v, "joined_rooms").map_err(|e| self.err(e))
    }

    /// The configured rooms as (room id, configured name), aliases resolved.
    async fn wanted(&self) -> Result<Vec<(String, Option<String>)>> {
        let Some(list) = &self.cfg.rooms else {
            return Ok(self
                .joined()
                .await?
                .into_iter()
                .map(|r| (r, None))
                .collect());
        };
        let mut out = Vec::new();
        for r in list {
            if r.starts_with('#') {
                let spec = self.get(&format!("directory/room/{}", seg(r))).await?;
                match self.json(&spec).await {
                    Ok(v) => match v.get("room_id").and_then(|i| i.as_str()) {
                        Some(id) => out.push((id.to_string(), Some(r.clone()))),
                        None => {
                            return Err(self.err(HttpError::Malformed {
                                endpoint: spec.endpoint(),
                                path: "$.room_id".into(),
                                detail: "missing".into(),
                            }))
                        }
                    },
                    Err(e) if e.status() == Some(404) => {
                        tracing::warn!(source = %self.cfg.name, room = %r, "matrix: configured room alias not found");
                    }
                    Err(e) => return Err(self.err(e)),
                }
            } else {
                out.push((r.clone(), None));
            }
        }
        Ok(out)
    }

    async fn room_name(&self, room: &str) -> Result<Option<String>> {
        Ok(self
            .state(room, "m.room.name")
            .await?
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(String::from))
            .filter(|n| !n.is_empty()))
    }

    fn sync_filter(&self, room: &str) -> String {
        json!({
            "presence": {"types": []},
            "account_data": {"types": []},
            "room": {
                "rooms": [room],
                "timeline": {"types": TYPES, "limit": self.page_size()},
                "state": {"types": []},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            }
        })
        .to_string()
    }

    /// `/messages` backwards from `from` (down to `to`); oldest first.
    async fn backfill(&self, room: &str, from: &str, to: Option<&str>) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut from = from.to_string();
        let filter = json!({"types": TYPES}).to_string();
        let mut pages = 0usize;
        loop {
            let mut spec = self
                .get(&format!("rooms/{}/messages", seg(room)))
                .await?
                .query("dir", "b")
                .query("from", from.clone())
                .query("limit", self.page_size().to_string())
                .query("filter", filter.clone());
            if let Some(t) = to {
                spec = spec.query("to", t);
            }
            let http = self.http().await?;
            let r = http.json(&spec).await.map_err(|e| self.err(e))?;
            let page: MessagesPage = serde_json::from_slice(&r.body).map_err(|e| {
                self.err(HttpError::Malformed {
                    endpoint: spec.endpoint(),
                    path: "$.chunk".into(),
                    detail: e.to_string(),
                })
            })?;
            pages += 1;
            let n = page.chunk.len();
            out.extend(page.chunk.into_iter().filter_map(Event::parse));
            match page.end {
                Some(end) if n > 0 && end != from => from = end,
                _ => break,
            }
            if pages > 1_000_000 {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }

    /// `/sync` for `room`; `Ok(None)` when the server refuses `since`.
    async fn sync_once(
        &self,
        room: &str,
        since: Option<&str>,
    ) -> Result<Option<(String, Vec<Event>)>> {
        let mut spec = self
            .get("sync")
            .await?
            .query("filter", self.sync_filter(room))
            .query("timeout", "0");
        if let Some(s) = since {
            spec = spec.query("since", s);
        }
        let http = self.http().await?;
        let r = match http.json(&spec).await {
            Ok(r) => r,
            Err(e) if since.is_some() && matches!(e.status(), Some(400 | 404)) => {
                tracing::warn!(source = %self.cfg.name, room = %room, error = %e, "matrix: the server refused the sync token: full sync");
                return Ok(None);
            }
            Err(e) => return Err(self.err(e)),
        };
        let endpoint = spec.endpoint();
        let next: String =
            crate::http::take_at(&endpoint, &r.value, "next_batch").map_err(|e| self.err(e))?;
        #[derive(Deserialize)]
        struct Timeline {
            #[serde(default)]
            events: Vec<Box<RawValue>>,
            #[serde(default)]
            limited: bool,
            #[serde(default)]
            prev_batch: Option<String>,
        }
        #[derive(Deserialize)]
        struct JoinedRoom {
            #[serde(default)]
            timeline: Option<Timeline>,
        }
        #[derive(Deserialize)]
        struct Rooms {
            #[serde(default)]
            join: BTreeMap<String, JoinedRoom>,
        }
        #[derive(Deserialize)]
        struct SyncAnswer {
            #[serde(default)]
            rooms: Option<Rooms>,
        }
        let ans: SyncAnswer = serde_json::from_slice(&r.body).map_err(|e| {
            self.err(HttpError::Malformed {
                endpoint: endpoint.clone(),
                path: "$.rooms.join".into(),
                detail: e.to_string(),
            })
        })?;
        let tl = ans
            .rooms
            .and_then(|mut r| r.join.remove(room))
            .and_then(|j| j.timeline);
        let Some(tl) = tl else {
            if since.is_none() {
                return Err(ConnectorError::Unavailable {
                    source_name: self.cfg.name.clone(),
                    detail: format!("room {room}: not joined by this account"),
                });
            }
            return Ok(Some((next, Vec::new())));
        };
        let mut events = Vec::new();
        if tl.limited {
            if let Some(prev) = &tl.prev_batch {
                events = self.backfill(room, prev, since).await?;
            }
        }
        events.extend(tl.events.into_iter().filter_map(Event::parse));
        Ok(Some((next, events)))
    }

    /// The event `id` as the server has it now; `None` when gone.
    async fn event(&self, room: &str, id: &str) -> Result<Option<Event>> {
        let spec = self
            .get(&format!("rooms/{}/event/{}", seg(room), seg(id)))
            .await?;
        let http = self.http().await?;
        match http.json(&spec).await {
            Ok(r) => {
                let raw: Box<RawValue> = serde_json::from_slice(&r.body).map_err(|e| {
                    self.err(HttpError::Malformed {
                        endpoint: spec.endpoint(),
                        path: "$".into(),
                        detail: e.to_string(),
                    })
                })?;
                Ok(Event::parse(raw))
            }
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    fn record(&self, coll: &Collection, ev: Event) -> Record {
        let v = &ev.v;
        let sender = v["sender"].as_str().unwrap_or_default().to_string();
        let content = v.get("content");
        let text = content
            .and_then(|c| c.get("body"))
            .and_then(|b| b.as_str())
            .map(String::from);
        let edit = v
            .get("unsigned")
            .and_then(|u| u.get("m.relations"))
            .and_then(|r| r.get("m.replace"));
        let mut meta = BTreeMap::new();
        meta.insert("event_id".to_string(), ev.id().to_string());
        // `/sync` events carry no `room_id`: the collection names the room.
        let room = decode_collection_id(&coll.id).unwrap_or_else(|| coll.id.clone());
        meta.insert("room_id".to_string(), room);
        meta.insert("sender".to_string(), sender.clone());
        if let Some(m) = content
            .and_then(|c| c.get("msgtype"))
            .and_then(|m| m.as_str())
        {
            meta.insert("msgtype".to_string(), m.to_string());
        }
        if let Some(e) = edit {
            meta.insert("edited".to_string(), "true".to_string());
            if let Some(id) = e.get("event_id").and_then(|i| i.as_str()) {
                meta.insert("edit_event_id".to_string(), id.to_string());
            }
        }
        let customer_ids = self
            .cfg
            .customer_ids
            .as_ref()
            .and_then(|m| m.get(&sender))
            .cloned()
            .into_iter()
            .collect();
        Record {
            id: record_id(ev.id()),
            collection: coll.id.clone(),
            kind: RecordKind::ChatMessage,
            created: ms_time(&v["origin_server_ts"]),
            updated: edit
                .and_then(|e| e.get("origin_server_ts"))
                .and_then(ms_time)
                .or_else(|| ms_time(&v["origin_server_ts"])),
            participants: vec![sender],
            customer_ids,
            jurisdiction: None,
            subject: None,
            text,
            attachments: Vec::new(),
            payload: Payload::Bytes(ev.raw.get().as_bytes().to_vec()),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        }
    }
}

fn opts(cfg: &MatrixConfig) -> HttpOptions {
    cfg.http.clone().unwrap_or_default()
}

#[async_trait]
impl Connector for MatrixConnector {
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
        let spec = self.get("account/whoami").await?;
        let v = self.json_c(&spec).await?;
        let user = v
            .get("user_id")
            .and_then(|u| u.as_str())
            .unwrap_or("?")
            .to_string();
        let n = self.collections().await?.len();
        Ok(Health {
            summary: format!("Matrix {} as {user}: {n} rooms", self.cfg.base_url),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        let mut out = Vec::new();
        for (room, alias) in self.wanted().await? {
            let name = match self.room_name(&room).await? {
                Some(n) => n,
                None => alias.unwrap_or_else(|| room.clone()),
            };
            if self.state(&room, "m.room.encryption").await?.is_some() {
                tracing::warn!(source = %self.cfg.name, room = %room, room_name = %name, "matrix: room {name} ({room}) is end-to-end encrypted and is NOT backed up (encryption keys are not supported)");
            }
            out.push(Collection {
                id: collection_id(&room),
                name,
            });
        }
        Ok(out)
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let room = decode_collection_id(&coll.id).unwrap_or(coll.id.clone());
        if self.state(&room, "m.room.encryption").await?.is_some() {
            return Err(ConnectorError::Unavailable {
                source_name: self.cfg.name.clone(),
                detail: format!(
                    "room {} ({room}) is end-to-end encrypted: not backed up (custos does not support Matrix encryption keys)",
                    coll.name
                ),
            });
        }
        let old: Option<MatrixCursor> = cursor
            .and_then(|c| serde_json::from_value::<MatrixCursor>(c.clone()).ok())
            .filter(|c| c.v == CURSOR_VERSION && c.kind == "matrix" && c.room == room);
        let mut got = match &old {
            Some(o) => self.sync_once(&room, Some(&o.since)).await?,
            None => None,
        };
        let full = got.is_none();
        if got.is_none() {
            got = self.sync_once(&room, None).await?;
        }
        let (next, events) = got.expect("a full sync answers or fails");
        if full {
            sink.push(Change::Reset).await?;
        }
        // Messages in order; edits and redactions applied to them.
        let mut order: Vec<String> = Vec::new();
        let mut msgs: BTreeMap<String, Event> = BTreeMap::new();
        let mut edited: Vec<String> = Vec::new();
        let mut redacted: Vec<String> = Vec::new();
        // Messages of this listing that arrive already redacted: new in this
        // window (never stored), so their redaction deletes nothing.
        let mut gone_here = std::collections::BTreeSet::new();
        let listed = events.len();
        for ev in events {
            match ev.kind() {
                "m.room.message" => {
                    if ev.redacted() {
                        gone_here.insert(ev.id().to_string());
                        continue;
                    }
                    if let Some(target) = ev.replaces() {
                        edited.push(target.to_string());
                        continue;
                    }
                    let id = ev.id().to_string();
                    if !msgs.contains_key(&id) {
                        order.push(id.clone());
                    }
                    msgs.insert(id, ev);
                }
                "m.room.redaction" => {
                    let Some(target) = ev.redacts().map(String::from) else {
                        continue;
                    };
                    if msgs.remove(&target).is_none() && !gone_here.contains(&target) {
                        redacted.push(target);
                    }
                }
                _ => {}
            }
        }
        // Edited messages: their current version (with the bundled edit).
        let mut n_edited = 0usize;
        let mut seen_edit = std::collections::BTreeSet::new();
        for target in edited {
            if !seen_edit.insert(target.clone()) || redacted.contains(&target) {
                continue;
            }
            let in_batch = msgs.contains_key(&target);
            if !in_batch && full {
                continue; // redacted, or not a message of this room
            }
            let Some(ev) = self.event(&room, &target).await? else {
                continue;
            };
            if ev.kind() != "m.room.message" || ev.redacted() || ev.replaces().is_some() {
                continue;
            }
            if !in_batch {
                order.push(target.clone());
                n_edited += 1;
            }
            msgs.insert(target, ev);
        }
        let mut new = 0usize;
        for id in &order {
            if let Some(ev) = msgs.remove(id) {
                new += 1;
                sink.push(Change::Upsert(self.record(coll, ev))).await?;
            }
        }
        // Redactions of messages stored by an earlier sync.
        let mut deleted = 0usize;
        if !full {
            for target in redacted {
                // Only messages are records (not reactions, not state).
                let is_msg = match self.event(&room, &target).await? {
                    Some(ev) => ev.kind() == "m.room.message" && ev.replaces().is_none(),
                    None => true,
                };
                if is_msg {
                    deleted += 1;
                    sink.push(Change::Delete {
                        id: record_id(&target),
                    })
                    .await?;
                }
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, full, listed, upserts = new, edited = n_edited, deleted, "matrix: synced");
        Ok(serde_json::to_value(MatrixCursor {
            v: CURSOR_VERSION,
            kind: "matrix".into(),
            room,
            since: next,
        })
        .expect("cursor serializes"))
    }
}
