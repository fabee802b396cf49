//! `type = "x"`: X API v2 mentions and direct messages.
//!
//! - Collections: `mentions` (`GET /2/users/{id}/mentions`) and `dm_events`
//!   (`GET /2/dm_events`, `event_types=MessageCreate`), or the configured
//!   subset.
//! - Mentions sync: `since_id=<newest id of the last sync>`, paged with
//!   `pagination_token` (`meta.next_token`). A `since_id` the API refuses
//!   (400) leads to `Reset` and a full listing (the API keeps the last 800
//!   mentions).
//! - DM sync: `/2/dm_events` has no `since_id`; the events come newest
//!   first and paging stops at the first event not newer than the cursor.
//! - Post and event ids are time-ordered numbers; the cursor is the newest
//!   id seen. Posts and events are neither edited in place (an edit is a new
//!   post) nor reported when deleted: all capabilities are false.
//! - One record per post (kind `social_post`) or message (kind
//!   `direct_message`), id = the post or event id; payload = the post or
//!   event JSON byte-exact as the API sent it (`json`).
//! - Customer ids: `x:<user id>` and `x:@<username>` (lower-case, from the
//!   `users` expansion) of the post author, of a message's sender, or for
//!   messages the account sent, of the other participants.
//! - Rate limits: 429 with `x-rate-limit-reset` (epoch seconds) is waited
//!   out by the HTTP layer up to `max_wait_secs`.
//! - A post without a numeric id is skipped with a warning; an answer that is
//!   not JSON is a `Malformed` error naming the endpoint.

mod config;
#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::OnceCell;

pub use config::XConfig;

use crate::http::{Auth, HttpClient, HttpError, RequestSpec};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result,
};

const CURSOR_VERSION: u32 = 1;
/// The collections this connector backs up.
pub const COLLECTIONS: [&str; 2] = ["mentions", "dm_events"];
const DEFAULT_BASE: &str = "https://api.x.com/";
const TWEET_FIELDS: &str =
    "id,text,author_id,created_at,conversation_id,in_reply_to_user_id,lang,referenced_tweets,entities";
const DM_FIELDS: &str =
    "id,text,event_type,created_at,sender_id,dm_conversation_id,participant_ids,attachments";

/// The X connector.
#[derive(Debug)]
pub struct XConnector {
    cfg: XConfig,
    http: HttpClient,
    me: OnceCell<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct XCursor {
    v: u32,
    kind: String,
    collection: String,
    newest_id: String,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<Box<RawValue>>,
    #[serde(default)]
    includes: Option<Includes>,
    #[serde(default)]
    meta: Option<Meta>,
    #[serde(default)]
    errors: Vec<Value>,
}

#[derive(Deserialize, Default)]
struct Includes {
    #[serde(default)]
    users: Vec<Value>,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    next_token: Option<String>,
}

fn auth_of(cfg: &XConfig) -> std::result::Result<Auth, String> {
    crate::http::token_or_oauth2(
        "bearer_token",
        &cfg.bearer_token_env,
        &cfg.bearer_token_file,
        &cfg.bearer_token_command,
        cfg.oauth2.as_deref(),
    )
}

fn numeric(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Compare two numeric ids (no leading zeros) as numbers.
fn newer(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

impl XConfig {
    /// Check the entry (authentication, user id, collections, page size).
    pub fn validate(&self) -> std::result::Result<(), String> {
        auth_of(self)?;
        if let Some(u) = &self.user_id {
            if !numeric(u) {
                return Err(format!("user_id {u:?} is not a numeric X user id"));
            }
        }
        if let Some(c) = &self.collections {
            if c.is_empty() {
                return Err("collections is empty (leave it out for all)".into());
            }
            for x in c {
                if !COLLECTIONS.contains(&x.as_str()) {
                    return Err(format!(
                        "collections: unknown collection {x:?} (known: mentions, dm_events)"
                    ));
                }
            }
        }
        if let Some(n) = self.page_size {
            if !(5..=100).contains(&n) {
                return Err(format!("page_size must be 5..=100 (got {n})"));
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

fn s<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str()).filter(|x| !x.is_empty())
}

impl XConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: XConfig) -> Result<XConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        cfg.validate().map_err(bad)?;
        let auth = auth_of(&cfg).map_err(bad)?;
        let base = cfg.base_url.clone().unwrap_or_else(|| DEFAULT_BASE.into());
        let opts = cfg.http.clone().unwrap_or_default();
        let http = HttpClient::new(&cfg.name, &base, &opts, Some(0.2), auth)
            .map_err(|e| e.into_connector(&cfg.name))?;
        Ok(XConnector {
            cfg,
            http,
            me: OnceCell::new(),
        })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    /// (user id, username) of the account: `/2/users/me`, or
    /// `/2/users/{user_id}` when configured.
    async fn me(&self) -> Result<&(String, String)> {
        self.me
            .get_or_try_init(|| async {
                let path = match &self.cfg.user_id {
                    Some(u) => format!("2/users/{u}"),
                    None => "2/users/me".to_string(),
                };
                let spec = self.http.get(&path).map_err(|e| self.err(e))?;
                let r = self.http.json(&spec).await.map_err(|e| self.err(e))?;
                let id = r
                    .value
                    .pointer("/data/id")
                    .and_then(|v| v.as_str())
                    .filter(|i| numeric(i))
                    .ok_or_else(|| {
                        self.err(HttpError::Malformed {
                            endpoint: spec.endpoint(),
                            path: "$.data.id".into(),
                            detail: "missing or not numeric".into(),
                        })
                    })?;
                let username = r
                    .value
                    .pointer("/data/username")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                Ok((id.to_string(), username.to_string()))
            })
            .await
    }

    fn collections_cfg(&self) -> Vec<String> {
        self.cfg
            .collections
            .clone()
            .unwrap_or_else(|| COLLECTIONS.iter().map(|s| s.to_string()).collect())
    }

    fn request(&self, coll: &str, uid: &str, since: Option<&str>) -> Result<RequestSpec> {
        let n = self.cfg.page_size.unwrap_or(100).to_string();
        let spec = if coll == "mentions" {
            let mut r = self
                .http
                .get(&format!("2/users/{uid}/mentions"))
                .map_err(|e| self.err(e))?
                .query("max_results", n)
                .query("tweet.fields", TWEET_FIELDS)
                .query("expansions", "author_id")
                .query("user.fields", "id,name,username");
            if let Some(s) = since {
                r = r.query("since_id", s);
            }
            r
        } else {
            self.http
                .get("2/dm_events")
                .map_err(|e| self.err(e))?
                .query("max_results", n)
                .query("event_types", "MessageCreate")
                .query("dm_event.fields", DM_FIELDS)
                .query("expansions", "sender_id,participant_ids")
                .query("user.fields", "id,name,username")
        };
        Ok(spec)
    }

    async fn page(&self, spec: &RequestSpec) -> std::result::Result<Page, HttpError> {
        let r = self.http.json(spec).await?;
        let p: Page = serde_json::from_slice(&r.body).map_err(|e| HttpError::Malformed {
            endpoint: spec.endpoint(),
            path: "$.data".into(),
            detail: e.to_string(),
        })?;
        for e in &p.errors {
            tracing::warn!(source = %self.cfg.name, endpoint = %spec.endpoint(), error = %s(e, "title").unwrap_or("error"), detail = %s(e, "detail").unwrap_or(""), "x: partial error in answer");
        }
        Ok(p)
    }

    fn record(
        &self,
        coll: &str,
        id: &str,
        raw: &RawValue,
        v: &Value,
        users: &HashMap<String, String>,
        me: &str,
    ) -> Record {
        let dm = coll == "dm_events";
        let mut who: Vec<String> = Vec::new();
        let mut participants = Vec::new();
        let author = s(v, if dm { "sender_id" } else { "author_id" }).map(|x| x.to_string());
        if let Some(a) = &author {
            if a != me || !dm {
                who.push(a.clone());
            }
            participants.push(a.clone());
        }
        if dm {
            for p in v
                .get("participant_ids")
                .and_then(|x| x.as_array())
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
            {
                if !participants.iter().any(|q| q == p) {
                    participants.push(p.to_string());
                }
                if author.as_deref() == Some(me) && p != me && !who.iter().any(|q| q == p) {
                    who.push(p.to_string());
                }
            }
        }
        let mut customer_ids = Vec::new();
        for w in &who {
            customer_ids.push(format!("x:{w}"));
            if let Some(u) = users.get(w) {
                customer_ids.push(format!("x:@{}", u.to_lowercase()));
            }
        }
        let participants = participants
            .into_iter()
            .map(|p| match users.get(&p) {
                Some(u) => format!("@{}", u.to_lowercase()),
                None => format!("x:{p}"),
            })
            .collect();
        let mut meta = BTreeMap::new();
        for k in [
            "author_id",
            "sender_id",
            "conversation_id",
            "dm_conversation_id",
            "in_reply_to_user_id",
            "lang",
            "event_type",
        ] {
            if let Some(x) = s(v, k) {
                meta.insert(k.to_string(), x.to_string());
            }
        }
        if let Some(u) = author.as_ref().and_then(|a| users.get(a)) {
            meta.insert("username".into(), u.clone());
        }
        Record {
            id: id.to_string(),
            collection: coll.to_string(),
            kind: if dm {
                RecordKind::DirectMessage
            } else {
                RecordKind::SocialPost
            },
            created: time(v, "created_at"),
            updated: None,
            participants,
            customer_ids,
            jurisdiction: None,
            subject: None,
            text: s(v, "text").map(|t| t.to_string()),
            attachments: Vec::new(),
            payload: Payload::Bytes(raw.get().as_bytes().to_vec()),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        }
    }
}

#[async_trait]
impl Connector for XConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn check(&self) -> Result<Health> {
        let (id, username) = self.me().await?;
        Ok(Health {
            summary: format!(
                "X {}: account @{username} ({id})",
                self.http.url("").map(|u| u.to_string()).unwrap_or_default()
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        self.check().await?;
        Ok(self
            .collections_cfg()
            .into_iter()
            .map(|c| Collection {
                id: c.clone(),
                name: c,
            })
            .collect())
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let c = coll.id.as_str();
        if !COLLECTIONS.contains(&c) {
            return Err(ConnectorError::unknown_collection(&self.cfg.name, c));
        }
        let me = self.me().await?.0.clone();
        let old = cursor
            .and_then(|x| serde_json::from_value::<XCursor>(x.clone()).ok())
            .filter(|x| {
                x.v == CURSOR_VERSION && x.kind == "x" && x.collection == c && numeric(&x.newest_id)
            });
        let mut since = old.as_ref().map(|o| o.newest_id.clone());
        let mut spec = self.request(
            c,
            &me,
            if c == "mentions" {
                since.as_deref()
            } else {
                None
            },
        )?;
        let mut page = match self.page(&spec).await {
            Ok(p) => p,
            Err(e) if since.is_some() && e.status() == Some(400) => {
                tracing::warn!(source = %self.cfg.name, error = %e, "x: since_id refused, listing everything again");
                since = None;
                spec = self.request(c, &me, None)?;
                self.page(&spec).await.map_err(|e| self.err(e))?
            }
            Err(e) => return Err(self.err(e)),
        };
        let full = since.is_none();
        if full {
            sink.push(Change::Reset).await?;
        }
        let mut newest = since.clone();
        let mut seen: HashSet<String> = HashSet::new();
        let mut users: HashMap<String, String> = HashMap::new();
        let (mut upserts, mut pages) = (0usize, 0usize);
        loop {
            pages += 1;
            for u in page.includes.take().unwrap_or_default().users {
                if let (Some(id), Some(n)) = (s(&u, "id"), s(&u, "username")) {
                    users.insert(id.to_string(), n.to_string());
                }
            }
            let mut reached_old = false;
            for (i, raw) in std::mem::take(&mut page.data).into_iter().enumerate() {
                let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                let Some(id) = s(&v, "id").filter(|i| numeric(i)).map(|i| i.to_string()) else {
                    tracing::warn!(source = %self.cfg.name, endpoint = %spec.endpoint(), "x: item without a numeric id skipped ($.data[{i}].id)");
                    continue;
                };
                if let Some(o) = &since {
                    if !newer(&id, o) {
                        reached_old = true;
                        continue;
                    }
                }
                if !seen.insert(id.clone()) {
                    continue;
                }
                if newest.as_ref().is_none_or(|n| newer(&id, n)) {
                    newest = Some(id.clone());
                }
                upserts += 1;
                let rec = self.record(c, &id, &raw, &v, &users, &me);
                sink.push(Change::Upsert(rec)).await?;
            }
            let next = page
                .meta
                .take()
                .and_then(|m| m.next_token)
                .filter(|t| !t.is_empty());
            let Some(token) = next.filter(|_| !reached_old) else {
                break;
            };
            spec.set_query("pagination_token", token);
            page = self.page(&spec).await.map_err(|e| self.err(e))?;
        }
        tracing::info!(source = %self.cfg.name, collection = c, full, pages, upserts, "x: synced");
        let cur = XCursor {
            v: CURSOR_VERSION,
            kind: "x".into(),
            collection: c.to_string(),
            newest_id: newest.unwrap_or_default(),
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
