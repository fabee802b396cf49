//! `type = "zendesk"`: Zendesk Support tickets through the API.
//!
//! - One collection, `tickets`.
//! - Sync: the cursor-based incremental ticket export
//!   (`/api/v2/incremental/tickets/cursor.json`, `start_time=…` the first
//!   time, then `cursor=<after_cursor>` until `end_of_stream`), with
//!   `include=users` so requester and submitter e-mail addresses come along.
//!   The cursor stores the last `after_cursor`; no usable cursor → `Reset` and
//!   an export from `start_time`. A cursor the server refuses (400/422) leads
//!   to the same full export.
//! - One record per ticket, kind `ticket`, id = the ticket id. **Comments are
//!   inside the ticket's payload**, not separate records: a new comment
//!   always bumps the ticket's `updated_at`, so the export reports exactly the
//!   tickets whose conversation changed, and a ticket is the unit that is
//!   restored, exported and erased together; separate comment records would
//!   need their own change tracking for no gain. The payload is
//!   `{"ticket":<ticket JSON>,"comments":[<comment JSON>…]}` where every
//!   embedded object is byte-exact as the API sent it
//!   (`/api/v2/tickets/{id}/comments.json`, cursor paging via `links.next`
//!   while `meta.has_more`). Extension `json`.
//! - Deleted tickets (`status: "deleted"` in the export) are sent as
//!   `Delete` (and skipped in a full export); edits (any update) re-send the
//!   ticket: `reports_deletions` and `reports_edits` are true.
//! - customer_ids: `email:` of the requester and submitter (from the
//!   sideloaded users); participants: those addresses, or `user:<id>`.
//! - Comment attachments (`comments[].attachments[]`) are attachments of the
//!   record (name, media type, size). With `download_attachments` (default
//!   true) their content is downloaded from `content_url` like Slack's files:
//!   spooled to a temporary file and streamed into the backup, the size
//!   being what arrived. Credentials are sent only to the base URL's host
//!   (and any `attachment_auth_hosts`); a content URL on another host (such
//!   as `*.zdusercontent.com`) is fetched without them, and a redirect to
//!   another host drops them too. Errors follow the Slack connector: an
//!   attachment that is gone or refused (404, 410, 401/403) stays described
//!   with no content and a warning naming the ticket and file; other
//!   failures (after the retries) fail the sync, so the next run tries again
//!   instead of silently keeping a ticket without its file.
//! - A ticket without an id is skipped with a warning; an answer that is not
//!   JSON, or lacks `tickets`, is a `Malformed` error naming the endpoint.

mod config;
#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub use config::ZendeskConfig;

use crate::http::{Auth, HttpClient, HttpError, PageStyle, Pager, RequestSpec, Secret};
use crate::record::Attachment;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result, SecretRef,
};

const CURSOR_VERSION: u32 = 1;
const COLLECTION: &str = "tickets";
const EXPORT: &str = "api/v2/incremental/tickets/cursor.json";

/// The Zendesk Support connector.
#[derive(Debug)]
pub struct ZendeskConnector {
    cfg: ZendeskConfig,
    http: HttpClient,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ZendeskCursor {
    v: u32,
    kind: String,
    after_cursor: String,
}

#[derive(Deserialize)]
struct ExportPage {
    tickets: Vec<Box<RawValue>>,
    #[serde(default)]
    users: Vec<Value>,
    #[serde(default)]
    after_cursor: Option<String>,
    #[serde(default)]
    end_of_stream: bool,
}

#[derive(Deserialize)]
struct CommentsPage {
    comments: Vec<Box<RawValue>>,
}

/// The configured authentication, or why it is wrong.
fn auth_of(cfg: &ZendeskConfig) -> std::result::Result<Auth, String> {
    let token = SecretRef::pick(
        "api_token",
        &cfg.api_token_env,
        &cfg.api_token_file,
        &cfg.api_token_command,
    )?;
    let oauth = SecretRef::pick(
        "oauth_token",
        &cfg.oauth_token_env,
        &cfg.oauth_token_file,
        &cfg.oauth_token_command,
    )?;
    match (token, oauth, &cfg.oauth2) {
        (Some(t), None, None) => {
            let email = cfg
                .email
                .clone()
                .filter(|e| !e.trim().is_empty())
                .ok_or("api_token_* needs email")?;
            Ok(Auth::Basic {
                username: format!("{email}/token"),
                password: Secret::from_ref(t),
            })
        }
        (None, Some(o), None) => Ok(Auth::Bearer(Secret::from_ref(o))),
        (None, None, Some(o)) => Ok(Auth::OAuth2(o.build()?)),
        (None, None, None) => {
            Err("give api_token_* (with email), oauth_token_* or an oauth2 table".into())
        }
        _ => Err("give only one of api_token_*, oauth_token_*, oauth2".into()),
    }
}

/// The API root of `cfg`.
fn base_of(cfg: &ZendeskConfig) -> std::result::Result<String, String> {
    match (&cfg.base_url, &cfg.subdomain) {
        (Some(b), None) => Ok(b.clone()),
        (None, Some(s))
            if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') =>
        {
            Ok(format!("https://{s}.zendesk.com/"))
        }
        (None, Some(s)) => Err(format!("subdomain {s:?} is not a subdomain")),
        (None, None) => Err("give base_url or subdomain".into()),
        (Some(_), Some(_)) => Err("give only one of base_url, subdomain".into()),
    }
}

impl ZendeskConfig {
    /// Check the entry (authentication, base URL, HTTP options).
    pub fn validate(&self) -> std::result::Result<(), String> {
        auth_of(self)?;
        base_of(self)?;
        for h in self.attachment_auth_hosts.iter().flatten() {
            if h.is_empty() || h.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()) {
                return Err(format!(
                    "attachment_auth_hosts: {h:?} is not a host name (no scheme, port or path)"
                ));
            }
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        Ok(())
    }
}

fn time(v: &Value, k: &str) -> Option<DateTime<Utc>> {
    v.get(k)
        .and_then(|t| t.as_str())
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

impl ZendeskConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: ZendeskConfig) -> Result<ZendeskConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        cfg.validate().map_err(bad)?;
        let auth = auth_of(&cfg).map_err(bad)?;
        let base = base_of(&cfg).map_err(bad)?;
        let opts = cfg.http.clone().unwrap_or_default();
        let mut http = HttpClient::new(&cfg.name, &base, &opts, Some(1.0), auth)
            .map_err(|e| e.into_connector(&cfg.name))?;
        for h in cfg.attachment_auth_hosts.iter().flatten() {
            http.allow_auth_host(h);
        }
        Ok(ZendeskConnector { cfg, http })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    fn export_start(&self) -> Result<RequestSpec> {
        Ok(self
            .http
            .get(EXPORT)
            .map_err(|e| self.err(e))?
            .query("start_time", self.cfg.start_time.unwrap_or(0).to_string())
            .query("include", "users"))
    }

    fn export_from(&self, cursor: &str) -> Result<RequestSpec> {
        Ok(self
            .http
            .get(EXPORT)
            .map_err(|e| self.err(e))?
            .query("cursor", cursor)
            .query("include", "users"))
    }

    async fn export_page(&self, spec: &RequestSpec) -> std::result::Result<ExportPage, HttpError> {
        let r = self.http.json(spec).await?;
        serde_json::from_slice(&r.body).map_err(|e| HttpError::Malformed {
            endpoint: spec.endpoint(),
            path: "$.tickets".into(),
            detail: e.to_string(),
        })
    }

    async fn comments(&self, id: u64) -> Result<Vec<Box<RawValue>>> {
        let spec = self
            .http
            .get(&format!("api/v2/tickets/{id}/comments.json"))
            .map_err(|e| self.err(e))?
            .query("page[size]", "100");
        let endpoint = spec.endpoint();
        let mut pager = Pager::new(
            PageStyle::NextUrl {
                path: "links.next".into(),
                has_more: Some("meta.has_more".into()),
            },
            spec,
        );
        let mut out = Vec::new();
        while let Some(page) = pager.next_page(&self.http).await.map_err(|e| self.err(e))? {
            let p: CommentsPage = serde_json::from_slice(&page.body).map_err(|e| {
                self.err(HttpError::Malformed {
                    endpoint: endpoint.clone(),
                    path: "$.comments".into(),
                    detail: e.to_string(),
                })
            })?;
            out.extend(p.comments);
        }
        Ok(out)
    }

    /// Fill in the content of `atts` from their content URLs (see the module
    /// documentation for credentials and errors).
    async fn download(
        &self,
        id: u64,
        atts: &mut [Attachment],
        urls: &[Option<String>],
    ) -> Result<()> {
        for (att, url) in atts.iter_mut().zip(urls) {
            let Some(url) = url.as_deref().filter(|u| !u.is_empty()) else {
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
                    tracing::warn!(source = %self.cfg.name, ticket = id, file = %att.name, error = %e, "zendesk: attachment not downloadable, kept as description only");
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    async fn record(
        &self,
        id: u64,
        raw: &RawValue,
        t: &Value,
        emails: &HashMap<u64, String>,
    ) -> Result<Record> {
        let comments = if self.cfg.comments.unwrap_or(true) {
            self.comments(id).await?
        } else {
            Vec::new()
        };
        let mut payload = Vec::with_capacity(raw.get().len() + 64);
        payload.extend_from_slice(b"{\"ticket\":");
        payload.extend_from_slice(raw.get().as_bytes());
        payload.extend_from_slice(b",\"comments\":[");
        let mut attachments = Vec::new();
        let mut urls = Vec::new();
        for (i, c) in comments.iter().enumerate() {
            if i > 0 {
                payload.push(b',');
            }
            payload.extend_from_slice(c.get().as_bytes());
            let cv: Value = serde_json::from_str(c.get()).unwrap_or(Value::Null);
            for a in cv
                .get("attachments")
                .and_then(|a| a.as_array())
                .into_iter()
                .flatten()
            {
                attachments.push(Attachment {
                    name: a
                        .get("file_name")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string(),
                    media_type: a
                        .get("content_type")
                        .and_then(|v| v.as_str())
                        .filter(|m| m.contains('/'))
                        .unwrap_or("application/octet-stream")
                        .to_string(),
                    size: a.get("size").and_then(|v| v.as_u64()),
                    content: None,
                });
                urls.push(
                    a.get("content_url")
                        .and_then(|v| v.as_str())
                        .map(|u| u.to_string()),
                );
            }
        }
        payload.extend_from_slice(b"]}");
        if self.cfg.download_attachments.unwrap_or(true) {
            self.download(id, &mut attachments, &urls).await?;
        }
        let mut participants = Vec::new();
        let mut customer_ids = Vec::new();
        for k in ["requester_id", "submitter_id"] {
            let Some(uid) = t.get(k).and_then(|v| v.as_u64()) else {
                continue;
            };
            match emails.get(&uid) {
                Some(e) => {
                    if let Some(c) = crate::files::customer_id("email", e) {
                        if !customer_ids.contains(&c) {
                            customer_ids.push(c);
                        }
                    }
                    let e = e.to_lowercase();
                    if !participants.contains(&e) {
                        participants.push(e);
                    }
                }
                None => {
                    let p = format!("user:{uid}");
                    if !participants.contains(&p) {
                        participants.push(p);
                    }
                }
            }
        }
        let mut meta = BTreeMap::new();
        meta.insert("ticket_id".to_string(), id.to_string());
        meta.insert("comment_count".to_string(), comments.len().to_string());
        for k in [
            "status",
            "priority",
            "type",
            "updated_at",
            "requester_id",
            "assignee_id",
            "group_id",
        ] {
            match t.get(k) {
                Some(Value::String(s)) => {
                    meta.insert(k.to_string(), s.clone());
                }
                Some(Value::Number(n)) => {
                    meta.insert(k.to_string(), n.to_string());
                }
                _ => {}
            }
        }
        if let Some(ch) = t.pointer("/via/channel").and_then(|v| v.as_str()) {
            meta.insert("via".into(), ch.to_string());
        }
        Ok(Record {
            id: id.to_string(),
            collection: COLLECTION.into(),
            kind: RecordKind::Ticket,
            created: time(t, "created_at"),
            updated: time(t, "updated_at"),
            participants,
            customer_ids,
            jurisdiction: None,
            subject: t
                .get("subject")
                .or_else(|| t.get("raw_subject"))
                .and_then(|v| v.as_str())
                .map(|s| s.to_string()),
            text: t
                .get("description")
                .and_then(|v| v.as_str())
                .map(|s| s.to_string()),
            attachments,
            payload: Payload::Bytes(payload),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        })
    }
}

#[async_trait]
impl Connector for ZendeskConnector {
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
        let spec = self
            .http
            .get("api/v2/users/me.json")
            .map_err(|e| self.err(e))?;
        let r = self.http.json(&spec).await.map_err(|e| self.err(e))?;
        // Zendesk answers an anonymous user (id null) for bad credentials on
        // some accounts instead of 401.
        if r.value.pointer("/user/id").is_none_or(|v| v.is_null()) {
            return Err(ConnectorError::Auth {
                source_name: self.cfg.name.clone(),
                detail: "GET /api/v2/users/me.json: anonymous user (credentials not accepted)"
                    .into(),
            });
        }
        let role = r
            .value
            .pointer("/user/role")
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        Ok(Health {
            summary: format!(
                "Zendesk {}: signed in as {role}",
                self.http.url("").map(|u| u.to_string()).unwrap_or_default()
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        // Listing needs no request, but credentials are checked here so
        // that `sources check` and the first sync fail early and clearly.
        self.check().await?;
        Ok(vec![Collection {
            id: COLLECTION.into(),
            name: "tickets".into(),
        }])
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let old: Option<ZendeskCursor> = cursor
            .and_then(|c| serde_json::from_value::<ZendeskCursor>(c.clone()).ok())
            .filter(|c| {
                c.v == CURSOR_VERSION
                    && c.kind == "zendesk"
                    && coll.id == COLLECTION
                    && !c.after_cursor.is_empty()
            });
        let mut full = old.is_none();
        let mut spec = match &old {
            Some(o) => self.export_from(&o.after_cursor)?,
            None => self.export_start()?,
        };
        let mut after = old.as_ref().map(|o| o.after_cursor.clone());
        let mut first = match self.export_page(&spec).await {
            Ok(p) => p,
            Err(e) if !full && matches!(e.status(), Some(400 | 422)) => {
                tracing::warn!(source = %self.cfg.name, error = %e, "zendesk: export cursor refused, exporting everything again");
                full = true;
                after = None;
                spec = self.export_start()?;
                self.export_page(&spec).await.map_err(|e| self.err(e))?
            }
            Err(e) => return Err(self.err(e)),
        };
        if full {
            sink.push(Change::Reset).await?;
        }
        // Collect the whole export first: a ticket updated while we page
        // may come twice; the last version wins, sent once.
        let mut order: Vec<u64> = Vec::new();
        let mut latest: HashMap<u64, (Box<RawValue>, Value)> = HashMap::new();
        let mut emails: HashMap<u64, String> = HashMap::new();
        let mut pages = 0usize;
        loop {
            pages += 1;
            for u in &first.users {
                if let (Some(id), Some(e)) = (
                    u.get("id").and_then(|v| v.as_u64()),
                    u.get("email").and_then(|v| v.as_str()),
                ) {
                    emails.insert(id, e.to_string());
                }
            }
            for (i, raw) in std::mem::take(&mut first.tickets).into_iter().enumerate() {
                let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                let Some(id) = v.get("id").and_then(|x| x.as_u64()) else {
                    tracing::warn!(source = %self.cfg.name, endpoint = %spec.endpoint(), index = i, "zendesk: ticket without a numeric id skipped ($.tickets[{i}].id)");
                    continue;
                };
                if latest.insert(id, (raw, v)).is_none() {
                    order.push(id);
                }
            }
            if let Some(a) = first.after_cursor.take().filter(|a| !a.is_empty()) {
                after = Some(a);
            }
            if first.end_of_stream {
                break;
            }
            let Some(a) = &after else {
                return Err(self.err(HttpError::Malformed {
                    endpoint: spec.endpoint(),
                    path: "$.after_cursor".into(),
                    detail: "missing before end_of_stream".into(),
                }));
            };
            spec = self.export_from(a)?;
            first = self.export_page(&spec).await.map_err(|e| self.err(e))?;
        }
        let (mut upserts, mut deletes) = (0usize, 0usize);
        for id in order {
            let (raw, v) = latest.remove(&id).expect("collected");
            if v.get("status").and_then(|s| s.as_str()) == Some("deleted") {
                if !full {
                    deletes += 1;
                    sink.push(Change::Delete { id: id.to_string() }).await?;
                }
                continue;
            }
            upserts += 1;
            let rec = self.record(id, &raw, &v, &emails).await?;
            sink.push(Change::Upsert(rec)).await?;
        }
        tracing::info!(source = %self.cfg.name, full, pages, upserts, deletes, "zendesk: synced");
        let cur = ZendeskCursor {
            v: CURSOR_VERSION,
            kind: "zendesk".into(),
            after_cursor: after.unwrap_or_default(),
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
