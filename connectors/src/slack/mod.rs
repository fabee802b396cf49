//! `type = "slack"`: a Slack workspace through the Web API.
//!
//! - Collections: `conversations.list` (cursor paging via
//!   `response_metadata.next_cursor`), the configured `channels` or every
//!   conversation the token is a member of. Collection id = the channel id
//!   (stable across renames), name = the channel name.
//! - Records: one per message, kind `chat_message`, id = the message `ts`
//!   (unique within a channel), mapped like the Slack export connector
//!   ([`crate::files`]); payload = the message's JSON **exactly as the API
//!   sent it** (sliced out of the page with `RawValue`), extension `json`.
//!   Thread replies (`conversations.replies`) are records of the same
//!   channel, with `thread_ts` in the metadata.
//! - customer_ids: `email:` of the author from `users.list` profiles (when
//!   `resolve_users` and the token has `users:read.email`).
//! - Files: attachments (name, media type, size) whose content is downloaded
//!   from `url_private_download` / `url_private` with the token (spooled to a
//!   temporary file, streamed into the backup); a file that is gone (404,
//!   403) stays described with no content, and a warning is logged.
//!
//! Sync (`conversations.history` with `oldest`):
//! - No usable cursor: `Reset`, the whole history and every thread.
//! - Otherwise history newer than the last seen `ts` **and** the recent
//!   window (`recent_window_hours`) and thread look-back
//!   (`thread_lookback_days`) is re-read. New messages are sent; messages in
//!   the recent window whose JSON changed (edits, reactions, reply counts) are
//!   sent again; messages of the window that vanished are sent as `Delete`;
//!   threads whose `latest_reply` moved get their new replies fetched
//!   (`conversations.replies` with `oldest`), so a new reply on an old thread
//!   is not missed while the parent is within the look-back (the parent,
//!   whose `reply_count` / `latest_reply` changed, is sent again too).
//! - Honest capabilities: `oldest` never shows edits or deletions of older
//!   messages, so `reports_edits` and `reports_deletions` are false and the
//!   caller's periodic full reconciliation (`reconcile_every`) catches them.
//!   Edits of thread replies are only seen by a full reconciliation too.
//!
//! Errors: Slack answers HTTP 200 `{"ok":false,"error":…}`;
//! `ratelimited` is retried like a 429 (both honour `Retry-After`),
//! `invalid_auth`, `not_authed`, `token_revoked` … are `Auth` errors,
//! anything else names the method and the error code.

mod config;
#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Mutex;

pub use config::SlackConfig;

use crate::files::slack::{message_record, ts_time, Message, User};
use crate::http::{json_path, Auth, HttpClient, HttpError, PageStyle, Pager, Secret, Verdict};
use crate::ids::{collection_id, record_id};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Result, SecretRef,
};

const CURSOR_VERSION: u32 = 1;
const DEFAULT_BASE: &str = "https://slack.com/api/";

/// The Slack Web API connector.
#[derive(Debug)]
pub struct SlackConnector {
    cfg: SlackConfig,
    http: HttpClient,
    users: Mutex<Option<Arc<HashMap<String, User>>>>,
}

/// Slack's API-level verdict on `{"ok": …}` answers.
fn slack_check(v: &Value) -> Verdict {
    match v.get("ok").and_then(|o| o.as_bool()) {
        Some(true) => return Verdict::Ok,
        Some(false) => {}
        None => {
            return Verdict::Malformed {
                path: "$.ok".into(),
                detail: "missing".into(),
            }
        }
    }
    let err = v.get("error").and_then(|e| e.as_str()).unwrap_or("unknown");
    match err {
        "ratelimited" | "rate_limited" => Verdict::Retry {
            after: None,
            reason: "Slack ratelimited".into(),
        },
        "internal_error" | "fatal_error" | "service_unavailable" | "request_timeout" => {
            Verdict::Retry {
                after: None,
                reason: format!("Slack {err}"),
            }
        }
        "invalid_auth" | "not_authed" | "account_inactive" | "token_revoked" | "token_expired"
        | "no_permission" | "ekm_access_denied" => Verdict::Auth(format!("Slack error {err}")),
        other => Verdict::Fail(format!("Slack error {other}")),
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackCursor {
    v: u32,
    kind: String,
    channel: String,
    /// Highest top-level `ts` seen ("" before any).
    latest: String,
    /// Top-level messages in the recent window: ts → first 16 hex of BLAKE3(JSON).
    recent: BTreeMap<String, String>,
    /// Threads whose parent is in the look-back: thread ts → `latest_reply`.
    threads: BTreeMap<String, String>,
}

fn ts_num(ts: &str) -> f64 {
    ts.parse().unwrap_or(0.0)
}

fn hash16(b: &[u8]) -> String {
    blake3::hash(b).to_hex()[..16].to_string()
}

#[derive(Deserialize)]
struct MessagesPage {
    messages: Vec<Box<RawValue>>,
}

impl SlackConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: SlackConfig) -> Result<SlackConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        let token = SecretRef::pick("token", &cfg.token_env, &cfg.token_file, &cfg.token_command)
            .map_err(bad)?
            .ok_or_else(|| bad("give one of token_env, token_file, token_command".into()))?;
        let opts = cfg.http.clone().unwrap_or_default();
        let mut http = HttpClient::new(
            &cfg.name,
            cfg.base_url.as_deref().unwrap_or(DEFAULT_BASE),
            &opts,
            Some(1.0),
            Auth::Bearer(Secret::from_ref(token)),
        )
        .map_err(|e| e.into_connector(&cfg.name))?;
        http.allow_auth_host("files.slack.com");
        Ok(SlackConnector {
            cfg,
            http,
            users: Mutex::new(None),
        })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    fn method(&self, m: &str) -> Result<crate::http::RequestSpec> {
        Ok(self
            .http
            .get(m)
            .map_err(|e| self.err(e))?
            .check(slack_check))
    }

    fn cursor_pager(&self, spec: crate::http::RequestSpec) -> Pager {
        Pager::new(
            PageStyle::CursorField {
                param: "cursor".into(),
                path: "response_metadata.next_cursor".into(),
            },
            spec,
        )
    }

    async fn users(&self) -> Result<Arc<HashMap<String, User>>> {
        let mut guard = self.users.lock().await;
        if let Some(u) = &*guard {
            return Ok(u.clone());
        }
        let mut map = HashMap::new();
        if self.cfg.resolve_users.unwrap_or(true) {
            let mut pager = self.cursor_pager(self.method("users.list")?.query("limit", "200"));
            loop {
                match pager.next_page(&self.http).await {
                    Ok(Some(page)) => {
                        let members = json_path(&page.value, "members")
                            .and_then(|m| m.as_array())
                            .cloned()
                            .unwrap_or_default();
                        for (i, m) in members.into_iter().enumerate() {
                            match serde_json::from_value::<User>(m) {
                                Ok(u) => {
                                    map.insert(u.id.clone(), u);
                                }
                                Err(e) => {
                                    tracing::warn!(source = %self.cfg.name, index = i, error = %e, "slack users.list: member skipped")
                                }
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e @ HttpError::Auth { .. }) => return Err(self.err(e)),
                    Err(e) => {
                        tracing::warn!(source = %self.cfg.name, error = %e, "slack users.list failed: records carry user ids only, no e-mail customer ids");
                        break;
                    }
                }
            }
        }
        let arc = Arc::new(map);
        *guard = Some(arc.clone());
        Ok(arc)
    }

    async fn conversations(&self) -> Result<Vec<(String, String, bool)>> {
        let types = self
            .cfg
            .types
            .clone()
            .unwrap_or_else(|| "public_channel,private_channel".into());
        let mut pager = self.cursor_pager(
            self.method("conversations.list")?
                .query("types", types)
                .query("exclude_archived", "false")
                .query("limit", "200"),
        );
        let mut out = Vec::new();
        while let Some(page) = pager.next_page(&self.http).await.map_err(|e| self.err(e))? {
            let chans = crate::http::take_at::<Vec<Value>>(
                "GET conversations.list",
                &page.value,
                "channels",
            )
            .map_err(|e| self.err(e))?;
            for (i, c) in chans.iter().enumerate() {
                let Some(id) = c.get("id").and_then(|v| v.as_str()) else {
                    tracing::warn!(source = %self.cfg.name, index = i, "slack conversations.list: channel without id skipped");
                    continue;
                };
                let name = c
                    .get("name")
                    .and_then(|v| v.as_str())
                    .unwrap_or(id)
                    .to_string();
                let member = c.get("is_member").and_then(|v| v.as_bool()).unwrap_or(true);
                out.push((id.to_string(), name, member));
            }
        }
        Ok(out)
    }

    /// Pages of `conversations.history` / `.replies`: (raw message, parsed).
    async fn messages(
        &self,
        spec: crate::http::RequestSpec,
        coll: &Collection,
    ) -> Result<Vec<(Box<RawValue>, Message, Value)>> {
        let endpoint = spec.endpoint();
        let mut pager = self.cursor_pager(spec);
        let mut out = Vec::new();
        while let Some(page) = pager.next_page(&self.http).await.map_err(|e| self.err(e))? {
            let parsed: MessagesPage = serde_json::from_slice(&page.body).map_err(|e| {
                self.err(HttpError::Malformed {
                    endpoint: endpoint.clone(),
                    path: "$.messages".into(),
                    detail: e.to_string(),
                })
            })?;
            for (i, raw) in parsed.messages.into_iter().enumerate() {
                let value: Value = match serde_json::from_str(raw.get()) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                let msg: Message = match serde_json::from_value(value.clone()) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(source = %self.cfg.name, collection = %coll.id, endpoint = %endpoint, index = i, error = %e, "slack: malformed message skipped");
                        continue;
                    }
                };
                if msg
                    .ts
                    .as_deref()
                    .is_none_or(|t| t.is_empty() || ts_time(t).is_none())
                {
                    tracing::warn!(source = %self.cfg.name, collection = %coll.id, endpoint = %endpoint, index = i, "slack: message without a valid ts skipped ($.messages[{i}].ts)");
                    continue;
                }
                out.push((raw, msg, value));
            }
        }
        Ok(out)
    }

    async fn record(
        &self,
        coll: &Collection,
        raw: &RawValue,
        msg: &Message,
        value: &Value,
        users: &HashMap<String, User>,
    ) -> Result<crate::Record> {
        let ts = msg.ts.clone().unwrap_or_default();
        let day = ts_time(&ts)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default();
        let mut rec = message_record(coll, &day, record_id(&ts), raw.get().as_bytes(), msg, users);
        if self.cfg.download_files.unwrap_or(true) {
            let files = value
                .get("files")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default();
            for (att, f) in rec.attachments.iter_mut().zip(files.iter()) {
                let mode = f.get("mode").and_then(|m| m.as_str()).unwrap_or("");
                if matches!(mode, "tombstone" | "hidden_by_limit" | "external") {
                    continue;
                }
                let Some(url) = f
                    .get("url_private_download")
                    .or_else(|| f.get("url_private"))
                    .and_then(|u| u.as_str())
                else {
                    continue;
                };
                match self.http.download(url).await {
                    Ok(d) => {
                        att.size = Some(d.size);
                        att.content = Some(Payload::Reader {
                            reader: Box::new(d.file),
                            size: Some(d.size),
                        });
                    }
                    Err(e)
                        if matches!(e, HttpError::Auth { .. })
                            || matches!(e.status(), Some(404 | 410)) =>
                    {
                        tracing::warn!(source = %self.cfg.name, collection = %coll.id, record = %rec.id, error = %e, "slack: file not downloadable, kept as description only");
                    }
                    Err(e) => return Err(self.err(e)),
                }
            }
        }
        Ok(rec)
    }
}

#[async_trait]
impl Connector for SlackConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: false,
            reports_edits: false,
            has_attachments: true,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        let r = self
            .http
            .json(&self.method("auth.test")?)
            .await
            .map_err(|e| self.err(e))?;
        let team = r.value.get("team").and_then(|v| v.as_str()).unwrap_or("?");
        let user = r.value.get("user").and_then(|v| v.as_str()).unwrap_or("?");
        let n = self.collections().await?.len();
        Ok(Health {
            summary: format!("Slack workspace {team} as {user}: {n} conversations"),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        let all = self.conversations().await?;
        let mut out = Vec::new();
        let mut found = BTreeSet::new();
        for (id, name, member) in all {
            let wanted = match &self.cfg.channels {
                Some(list) => list
                    .iter()
                    .any(|c| c == &id || c.trim_start_matches('#') == name),
                None => member,
            };
            if wanted {
                found.insert(id.clone());
                found.insert(name.clone());
                out.push(Collection {
                    id: collection_id(&id),
                    name,
                });
            }
        }
        if let Some(list) = &self.cfg.channels {
            for c in list {
                if !found.contains(c.trim_start_matches('#')) {
                    tracing::warn!(source = %self.cfg.name, channel = %c, "slack: configured channel not found (or not visible to the token)");
                }
            }
        }
        Ok(out)
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let channel = crate::ids::decode_collection_id(&coll.id).unwrap_or(coll.id.clone());
        let old: Option<SlackCursor> = cursor
            .and_then(|c| serde_json::from_value::<SlackCursor>(c.clone()).ok())
            .filter(|c| c.v == CURSOR_VERSION && c.kind == "slack" && c.channel == channel);
        let users = self.users().await?;
        let now = chrono::Utc::now().timestamp() as f64;
        let edit_from = now - 3600.0 * self.cfg.recent_window_hours.unwrap_or(48) as f64;
        let thread_from = now - 86400.0 * self.cfg.thread_lookback_days.unwrap_or(14) as f64;
        let full = old.is_none();
        let mut hist = self
            .method("conversations.history")?
            .query("channel", channel.clone())
            .query("limit", "200");
        // Re-read from the oldest of: the last seen message, the recent
        // window, the thread look-back (exclusive bound).
        let mut bound = f64::NEG_INFINITY;
        if let Some(o) = &old {
            let latest = if o.latest.is_empty() {
                f64::INFINITY
            } else {
                ts_num(&o.latest)
            };
            bound = latest.min(edit_from).min(thread_from);
            hist = hist.query("oldest", format!("{bound:.6}"));
        } else {
            sink.push(Change::Reset).await?;
        }
        let listing = self.messages(hist, coll).await?;
        let mut emitted: BTreeSet<String> = BTreeSet::new();
        let mut listed: BTreeSet<String> = BTreeSet::new();
        let mut cur = SlackCursor {
            v: CURSOR_VERSION,
            kind: "slack".into(),
            channel: channel.clone(),
            latest: old.as_ref().map(|o| o.latest.clone()).unwrap_or_default(),
            ..Default::default()
        };
        let old_latest = old
            .as_ref()
            .map(|o| ts_num(&o.latest))
            .unwrap_or(f64::NEG_INFINITY);
        let (mut new, mut edited, mut replies_read) = (0usize, 0usize, 0usize);
        for (raw, msg, value) in &listing {
            let ts = msg.ts.clone().unwrap_or_default();
            let t = ts_num(&ts);
            listed.insert(ts.clone());
            let h = hash16(raw.get().as_bytes());
            if t > ts_num(&cur.latest) || cur.latest.is_empty() {
                cur.latest = ts.clone();
            }
            if t >= edit_from {
                cur.recent.insert(ts.clone(), h.clone());
            }
            let known = !full && t <= old_latest;
            let changed =
                known && t >= edit_from && old.as_ref().and_then(|o| o.recent.get(&ts)) != Some(&h);
            if (!known || changed) && emitted.insert(ts.clone()) {
                if known {
                    edited += 1;
                } else {
                    new += 1;
                }
                let rec = self.record(coll, raw, msg, value, &users).await?;
                sink.push(Change::Upsert(rec)).await?;
            }
            // Threads: the parent carries `latest_reply`.
            let is_parent =
                msg.thread_ts.as_deref() == Some(ts.as_str()) && msg.reply_count.unwrap_or(0) > 0;
            if !is_parent {
                continue;
            }
            let latest_reply = value
                .get("latest_reply")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string();
            if t >= thread_from {
                cur.threads.insert(ts.clone(), latest_reply.clone());
            }
            let prev = old.as_ref().and_then(|o| o.threads.get(&ts));
            let fetch = !known || prev != Some(&latest_reply);
            if !fetch {
                continue;
            }
            // The parent's JSON changed too (reply_count, latest_reply):
            // send it again even outside the recent window.
            if known && emitted.insert(ts.clone()) {
                edited += 1;
                let rec = self.record(coll, raw, msg, value, &users).await?;
                sink.push(Change::Upsert(rec)).await?;
            }
            let mut rq = self
                .method("conversations.replies")?
                .query("channel", channel.clone())
                .query("ts", ts.clone())
                .query("limit", "200");
            if let Some(p) = prev.filter(|p| known && !p.is_empty()) {
                rq = rq.query("oldest", p.clone());
            }
            for (rraw, rmsg, rvalue) in self.messages(rq, coll).await? {
                let rts = rmsg.ts.clone().unwrap_or_default();
                if rts == ts {
                    continue;
                }
                let stale = prev.is_some_and(|p| known && ts_num(&rts) <= ts_num(p));
                if stale || !emitted.insert(rts) {
                    continue;
                }
                replies_read += 1;
                let rec = self.record(coll, &rraw, &rmsg, &rvalue, &users).await?;
                sink.push(Change::Upsert(rec)).await?;
            }
        }
        // Messages of the re-read window that are gone.
        let mut deleted = 0usize;
        if let Some(o) = &old {
            for ts in o.recent.keys() {
                if ts_num(ts) > bound && !listed.contains(ts) {
                    deleted += 1;
                    sink.push(Change::Delete { id: record_id(ts) }).await?;
                }
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, full, listed = listing.len(), new, edited, replies = replies_read, deleted, "slack: synced");
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
