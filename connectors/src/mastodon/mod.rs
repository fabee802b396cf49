//! `type = "mastodon"`: mentions and direct messages of a Mastodon account.
//!
//! - Collections: `mentions` (`/api/v1/notifications?types[]=mention`) and
//!   `direct` (`/api/v1/conversations`), or the configured subset.
//! - Records: one per status, id = the status id; payload = the status JSON
//!   **as the API sent it** (sliced out of the page), extension `json`;
//!   kind `social_post`, or `direct_message` for `visibility = "direct"`
//!   (every record of `direct`); participants = the author's `acct` and the
//!   mentioned accounts' `acct`; customer id `mastodon:<author acct>`.
//!   `direct` holds each conversation's `last_status` and the direct
//!   statuses of its thread (`/api/v1/statuses/{id}/context`); separate,
//!   unthreaded direct messages between the same accounts that arrive
//!   between two syncs are only seen through their notification (in
//!   `mentions`) — the conversations API shows only the latest one. An
//!   incremental sync sends only statuses newer than the cursor (older ones
//!   of the thread were stored by the sync that listed them).
//! - Sync: pages are walked oldest → newest with `min_id` (the cursor is the
//!   highest notification id / conversation `last_status` id seen),
//!   following the `Link: rel="prev"` header (Mastodon's link to newer
//!   items) until an empty page. A link that lost the `types[]` filter
//!   gets it back. No usable cursor: `Reset` and the whole listing.
//! - Honest capabilities: `min_id` listings show neither edits nor
//!   deletions, so `reports_edits` and `reports_deletions` are false; the
//!   caller's periodic full reconciliation (`reconcile_every`) catches them.
//!
//! Errors: 401 → `Auth`; 429 honours `Retry-After` / `X-RateLimit-Reset`;
//! unparseable pages → `Malformed` naming the endpoint.

mod config;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub use config::MastodonConfig;
use config::COLLECTIONS;

use crate::http::paginate::rel_link;
use crate::http::{Auth, HttpClient, HttpError, RequestSpec, Secret};
use crate::ids::record_id;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result, SecretRef,
};

const CURSOR_VERSION: u32 = 1;
const PAGE: &str = "40";

/// The Mastodon API connector.
#[derive(Debug)]
pub struct MastodonConnector {
    cfg: MastodonConfig,
    http: HttpClient,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MastodonCursor {
    v: u32,
    kind: String,
    collection: String,
    /// Highest id seen (notification id / conversation last_status id).
    min_id: String,
}

/// Numeric-string order of Mastodon ids ("9" < "10").
fn id_gt(a: &str, b: &str) -> bool {
    (a.len(), a) > (b.len(), b)
}

struct Status {
    raw: Box<RawValue>,
    v: Value,
}

impl Status {
    fn parse(raw: Box<RawValue>) -> Option<Status> {
        let v: Value = serde_json::from_str(raw.get()).ok()?;
        v.get("id")?.as_str()?;
        Some(Status { raw, v })
    }
    fn id(&self) -> &str {
        self.v["id"].as_str().unwrap_or_default()
    }
}

fn time(v: &Value) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

impl MastodonConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: MastodonConfig) -> Result<MastodonConnector> {
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
        .map_err(bad)?
        .ok_or_else(|| bad("no access token".into()))?;
        let http = HttpClient::new(
            &cfg.name,
            &cfg.base_url,
            &cfg.http.clone().unwrap_or_default(),
            Some(5.0),
            Auth::Bearer(Secret::from_ref(token)),
        )
        .map_err(|e| e.into_connector(&cfg.name))?;
        Ok(MastodonConnector { cfg, http })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    fn get(&self, path: &str) -> Result<RequestSpec> {
        self.http.get(path).map_err(|e| self.err(e))
    }

    /// Walk a listing from `min_id` to the newest item: every page's raw
    /// items (newest first within a page), in page order.
    async fn walk(
        &self,
        path: &str,
        filter: &[(&str, &str)],
        min_id: &str,
    ) -> Result<Vec<Box<RawValue>>> {
        let mut spec = self.get(path)?.query("limit", PAGE).query("min_id", min_id);
        for (k, v) in filter {
            spec = spec.query(k, *v);
        }
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let endpoint = spec.endpoint();
            let page = self.http.json(&spec).await.map_err(|e| self.err(e))?;
            let items: Vec<Box<RawValue>> = serde_json::from_slice(&page.body).map_err(|e| {
                self.err(HttpError::Malformed {
                    endpoint: endpoint.clone(),
                    path: "$".into(),
                    detail: format!("not a list ({e})"),
                })
            })?;
            if items.is_empty() {
                break;
            }
            out.extend(items);
            let Some(link) = rel_link(&page.headers, "prev") else {
                break;
            };
            let mut url = self.http.url(&link).map_err(|e| self.err(e))?;
            // Some servers drop the filter from their links: put it back.
            let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
            for (k, v) in filter {
                if !pairs.iter().any(|(pk, _)| pk == k) {
                    url.query_pairs_mut().append_pair(k, v);
                }
            }
            if !seen.insert(url.to_string()) {
                return Err(self.err(HttpError::Malformed {
                    endpoint,
                    path: "Link".into(),
                    detail: "the server sent the same page link again".into(),
                }));
            }
            spec = RequestSpec::new(reqwest::Method::GET, url);
        }
        Ok(out)
    }

    fn record(&self, coll: &Collection, st: Status) -> Record {
        let v = &st.v;
        let author = v["account"]["acct"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut participants = vec![author.clone()];
        for m in v["mentions"].as_array().into_iter().flatten() {
            if let Some(a) = m["acct"].as_str() {
                if !participants.iter().any(|p| p == a) {
                    participants.push(a.to_string());
                }
            }
        }
        let visibility = v["visibility"].as_str().unwrap_or_default().to_string();
        let kind = if visibility == "direct" || coll.id == "direct" {
            RecordKind::DirectMessage
        } else {
            RecordKind::SocialPost
        };
        let mut meta = BTreeMap::new();
        meta.insert("status_id".to_string(), st.id().to_string());
        meta.insert("visibility".to_string(), visibility);
        if let Some(u) = v["url"].as_str().or_else(|| v["uri"].as_str()) {
            meta.insert("url".to_string(), u.to_string());
        }
        if let Some(c) = v["in_reply_to_id"].as_str() {
            meta.insert("in_reply_to_id".to_string(), c.to_string());
        }
        let subject = v["spoiler_text"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from);
        Record {
            id: record_id(st.id()),
            collection: coll.id.clone(),
            kind,
            created: time(&v["created_at"]),
            updated: time(&v["edited_at"]).or_else(|| time(&v["created_at"])),
            participants,
            customer_ids: if author.is_empty() {
                Vec::new()
            } else {
                vec![format!("mastodon:{author}")]
            },
            jurisdiction: None,
            subject,
            text: v["content"].as_str().map(String::from),
            attachments: Vec::new(),
            payload: Payload::Bytes(st.raw.get().as_bytes().to_vec()),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        }
    }

    /// The statuses of `mentions` after `min_id`, and the new cursor.
    async fn mentions(&self, min_id: &str) -> Result<(Vec<Status>, String)> {
        #[derive(Deserialize)]
        struct Notification {
            id: String,
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            status: Option<Box<RawValue>>,
        }
        let items = self
            .walk("api/v1/notifications", &[("types[]", "mention")], min_id)
            .await?;
        let mut top = min_id.to_string();
        let mut by_id: BTreeMap<String, Status> = BTreeMap::new();
        for (i, raw) in items.into_iter().enumerate() {
            let n: Notification = match serde_json::from_str(raw.get()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(source = %self.cfg.name, index = i, error = %e, "mastodon: malformed notification skipped");
                    continue;
                }
            };
            if id_gt(&n.id, &top) {
                top = n.id.clone();
            }
            if n.kind != "mention" {
                continue;
            }
            if let Some(st) = n.status.and_then(Status::parse) {
                by_id.insert(n.id, st);
            }
        }
        Ok((order_by_id(by_id), top))
    }

    /// The statuses of `direct` after `min_id`, and the new cursor.
    async fn direct(&self, min_id: &str) -> Result<(Vec<Status>, String)> {
        #[derive(Deserialize)]
        struct Conversation {
            #[serde(default)]
            last_status: Option<Box<RawValue>>,
        }
        let items = self.walk("api/v1/conversations", &[], min_id).await?;
        let mut top = min_id.to_string();
        let mut by_id: BTreeMap<String, Status> = BTreeMap::new();
        for (i, raw) in items.into_iter().enumerate() {
            let c: Conversation = match serde_json::from_str(raw.get()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(source = %self.cfg.name, index = i, error = %e, "mastodon: malformed conversation skipped");
                    continue;
                }
            };
            let Some(last) = c.last_status.and_then(Status::parse) else {
                continue;
            };
            let lid = last.id().to_string();
            if id_gt(&lid, &top) {
                top = lid.clone();
            }
            // The thread around it: earlier (and later) direct messages.
            let spec = self.get(&format!("api/v1/statuses/{lid}/context"))?;
            match self.http.json(&spec).await {
                Ok(page) => {
                    #[derive(Deserialize)]
                    struct Context {
                        #[serde(default)]
                        ancestors: Vec<Box<RawValue>>,
                        #[serde(default)]
                        descendants: Vec<Box<RawValue>>,
                    }
                    let ctx: Context = serde_json::from_slice(&page.body).map_err(|e| {
                        self.err(HttpError::Malformed {
                            endpoint: spec.endpoint(),
                            path: "$.ancestors".into(),
                            detail: e.to_string(),
                        })
                    })?;
                    for st in ctx
                        .ancestors
                        .into_iter()
                        .chain(ctx.descendants)
                        .filter_map(Status::parse)
                    {
                        if st.v["visibility"] == "direct" {
                            by_id.insert(st.id().to_string(), st);
                        }
                    }
                }
                Err(e) if e.status() == Some(404) => {}
                Err(e) => return Err(self.err(e)),
            }
            by_id.insert(lid, last);
        }
        // Incremental: statuses up to the cursor were in a conversation
        // listed by an earlier sync (the cursor is the highest `last_status`
        // id then), so they are stored already.
        if min_id != "0" {
            by_id.retain(|id, _| id_gt(id, min_id));
        }
        Ok((order_by_id(by_id), top))
    }
}

/// Statuses oldest first (numeric id order), one per id.
fn order_by_id(by: BTreeMap<String, Status>) -> Vec<Status> {
    let mut v: Vec<(String, Status)> = by.into_iter().collect();
    v.sort_by(|a, b| (a.0.len(), &a.0).cmp(&(b.0.len(), &b.0)));
    let mut seen = std::collections::HashSet::new();
    v.into_iter()
        .map(|(_, s)| s)
        .filter(|s| seen.insert(s.id().to_string()))
        .collect()
}

#[async_trait]
impl Connector for MastodonConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: false,
            reports_edits: false,
            has_attachments: false,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        let spec = self.get("api/v1/accounts/verify_credentials")?;
        let v = self.http.json(&spec).await.map_err(|e| self.err(e))?.value;
        let acct = v["acct"].as_str().unwrap_or("?");
        Ok(Health {
            summary: format!("Mastodon {} as {acct}", self.cfg.base_url),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        // Touch the API once so that bad credentials fail here.
        let spec = self.get("api/v1/accounts/verify_credentials")?;
        self.http.json(&spec).await.map_err(|e| self.err(e))?;
        Ok(COLLECTIONS
            .iter()
            .filter(|c| {
                self.cfg
                    .collections
                    .as_ref()
                    .is_none_or(|l| l.iter().any(|x| x == *c))
            })
            .map(|c| Collection {
                id: c.to_string(),
                name: c.to_string(),
            })
            .collect())
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        if !COLLECTIONS.contains(&coll.id.as_str()) {
            return Err(ConnectorError::unknown_collection(&self.cfg.name, &coll.id));
        }
        let old: Option<MastodonCursor> = cursor
            .and_then(|c| serde_json::from_value::<MastodonCursor>(c.clone()).ok())
            .filter(|c| {
                c.v == CURSOR_VERSION
                    && c.kind == "mastodon"
                    && c.collection == coll.id
                    && !c.min_id.is_empty()
                    && c.min_id.bytes().all(|b| b.is_ascii_digit())
            });
        let full = old.is_none();
        let from = old.map(|o| o.min_id).unwrap_or_else(|| "0".into());
        let (statuses, top) = if coll.id == "mentions" {
            self.mentions(&from).await?
        } else {
            self.direct(&from).await?
        };
        if full {
            sink.push(Change::Reset).await?;
        }
        let n = statuses.len();
        for st in statuses {
            sink.push(Change::Upsert(self.record(coll, st))).await?;
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, full, records = n, "mastodon: synced");
        Ok(serde_json::to_value(MastodonCursor {
            v: CURSOR_VERSION,
            kind: "mastodon".into(),
            collection: coll.id.clone(),
            min_id: top,
        })
        .expect("cursor serializes"))
    }
}
