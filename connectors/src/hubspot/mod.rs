//! `type = "hubspot"`: HubSpot CRM v3 contacts and engagements.
//!
//! - Collections: one per object type, `contacts`, `emails`, `notes`,
//!   `calls`, `tasks`, `communications` (or the configured subset).
//! - Sync: `POST /crm/v3/objects/{type}/search` with one filter
//!   `<modified> GTE <cursor ms>` (`lastmodifieddate` for contacts,
//!   `hs_lastmodifieddate` for the other types), sorted ascending by it,
//!   paged with `after`. The search API stops at 10 000 results per query:
//!   before a page would cross that limit the query is restarted as a new
//!   time window from the last modification time seen (objects of that
//!   exact millisecond already sent are skipped). More than 10 000 objects
//!   with the same modification millisecond cannot be paged and fail the
//!   sync with a clear error.
//! - The cursor keeps the highest modification time and the ids seen at it
//!   (the filter is inclusive), so an unchanged account fetches nothing.
//! - Deletions: `GET /crm/v3/objects/{type}?archived=true` is listed on every
//!   sync; objects archived after the cursor's `archived_since` are sent as
//!   `Delete`. Edits bump the modification time and are re-sent.
//! - One record per object, id = the HubSpot object id; payload = the
//!   object JSON byte-exact as the search returned it (`json`). Kinds:
//!   `contact` for contacts, `crm_activity` for engagements.
//! - Customer ids: contacts carry `crm:hubspot:<id>`, `email:` and
//!   `phone:`; engagements carry, for each associated contact (v4
//!   `POST /crm/v4/associations/{type}/contacts/batch/read`),
//!   `crm:hubspot:<contact id>` and the contact's `email:` (read with
//!   `POST /crm/v3/objects/contacts/batch/read`).
//! - An object without an id is skipped with a warning; an answer that is not
//!   JSON or lacks `results` is a `Malformed` error naming the endpoint.

mod config;
#[cfg(test)]
pub(crate) mod mock;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

pub use config::HubSpotConfig;

use crate::http::{Auth, HttpClient, HttpError, PageStyle, Pager, RequestSpec};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result,
};

const CURSOR_VERSION: u32 = 1;
/// The object types this connector backs up.
pub const OBJECT_TYPES: [&str; 6] = [
    "contacts",
    "emails",
    "notes",
    "calls",
    "tasks",
    "communications",
];
const DEFAULT_BASE: &str = "https://api.hubapi.com/";

/// The HubSpot connector.
#[derive(Debug)]
pub struct HubSpotConnector {
    cfg: HubSpotConfig,
    http: HttpClient,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HubSpotCursor {
    v: u32,
    kind: String,
    collection: String,
    /// Highest modification time seen (epoch ms).
    since_ms: i64,
    /// Ids seen at exactly `since_ms`.
    ids_at_since: BTreeSet<String>,
    /// Highest `archivedAt` seen (epoch ms).
    archived_since_ms: i64,
}

/// One search result.
struct Hit {
    id: String,
    raw: Box<RawValue>,
    v: Value,
    ts: Option<i64>,
}

#[derive(Deserialize)]
struct SearchPage {
    results: Vec<Box<RawValue>>,
    #[serde(default)]
    paging: Option<Value>,
}

fn auth_of(cfg: &HubSpotConfig) -> std::result::Result<Auth, String> {
    crate::http::token_or_oauth2(
        "access_token",
        &cfg.access_token_env,
        &cfg.access_token_file,
        &cfg.access_token_command,
        cfg.oauth2.as_deref(),
    )
}

impl HubSpotConfig {
    /// Check the entry (authentication, object types, sizes, HTTP options).
    pub fn validate(&self) -> std::result::Result<(), String> {
        auth_of(self)?;
        if let Some(t) = &self.object_types {
            if t.is_empty() {
                return Err("object_types is empty (leave it out for all)".into());
            }
            for x in t {
                if !OBJECT_TYPES.contains(&x.as_str()) {
                    return Err(format!(
                        "object_types: unknown type {x:?} (known: {})",
                        OBJECT_TYPES.join(", ")
                    ));
                }
            }
        }
        if let Some(p) = &self.properties {
            for k in p.keys() {
                if !OBJECT_TYPES.contains(&k.as_str()) {
                    return Err(format!("properties: unknown type {k:?}"));
                }
            }
        }
        if let Some(n) = self.page_size {
            if !(1..=200).contains(&n) {
                return Err(format!("page_size must be 1..=200 (got {n})"));
            }
        }
        if self.search_limit == Some(0) {
            return Err("search_limit must be at least 1".into());
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        Ok(())
    }
}

/// The modification-time property the search filters and sorts on.
fn modified_prop(object_type: &str) -> &'static str {
    if object_type == "contacts" {
        "lastmodifieddate"
    } else {
        "hs_lastmodifieddate"
    }
}

fn default_properties(object_type: &str) -> &'static [&'static str] {
    match object_type {
        "contacts" => &[
            "email",
            "firstname",
            "lastname",
            "phone",
            "mobilephone",
            "company",
            "createdate",
            "lastmodifieddate",
        ],
        "emails" => &[
            "hs_timestamp",
            "hs_email_subject",
            "hs_email_text",
            "hs_email_direction",
            "hs_email_status",
            "hs_email_headers",
            "hs_createdate",
            "hs_lastmodifieddate",
        ],
        "notes" => &[
            "hs_timestamp",
            "hs_note_body",
            "hs_createdate",
            "hs_lastmodifieddate",
        ],
        "calls" => &[
            "hs_timestamp",
            "hs_call_title",
            "hs_call_body",
            "hs_call_direction",
            "hs_call_duration",
            "hs_call_status",
            "hs_createdate",
            "hs_lastmodifieddate",
        ],
        "tasks" => &[
            "hs_timestamp",
            "hs_task_subject",
            "hs_task_body",
            "hs_task_status",
            "hs_task_priority",
            "hs_createdate",
            "hs_lastmodifieddate",
        ],
        _ => &[
            "hs_timestamp",
            "hs_communication_channel_type",
            "hs_communication_body",
            "hs_communication_logged_from",
            "hs_createdate",
            "hs_lastmodifieddate",
        ],
    }
}

/// A HubSpot time: ISO 8601 or epoch milliseconds.
fn parse_ms(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => {
            if let Ok(n) = s.parse::<i64>() {
                return Some(n);
            }
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.timestamp_millis())
        }
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn ms_time(ms: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
}

fn id_of(v: &Value) -> Option<String> {
    match v.get("id")? {
        Value::String(s) if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Some(s.clone())
        }
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn prop<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.pointer(&format!("/properties/{k}"))
        .and_then(|x| x.as_str())
        .filter(|s| !s.is_empty())
}

fn push_unique(v: &mut Vec<String>, s: String) {
    if !v.contains(&s) {
        v.push(s);
    }
}

/// Decode a cursor for `collection`; `None` when unusable.
fn decode_cursor(c: Option<&Cursor>, collection: &str) -> Option<HubSpotCursor> {
    c.and_then(|c| serde_json::from_value::<HubSpotCursor>(c.clone()).ok())
        .filter(|c| c.v == CURSOR_VERSION && c.kind == "hubspot" && c.collection == collection)
}

impl HubSpotConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: HubSpotConfig) -> Result<HubSpotConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        cfg.validate().map_err(bad)?;
        let auth = auth_of(&cfg).map_err(bad)?;
        let base = cfg.base_url.clone().unwrap_or_else(|| DEFAULT_BASE.into());
        let opts = cfg.http.clone().unwrap_or_default();
        let http = HttpClient::new(&cfg.name, &base, &opts, Some(4.0), auth)
            .map_err(|e| e.into_connector(&cfg.name))?;
        Ok(HubSpotConnector { cfg, http })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    fn types(&self) -> Vec<String> {
        self.cfg
            .object_types
            .clone()
            .unwrap_or_else(|| OBJECT_TYPES.iter().map(|s| s.to_string()).collect())
    }

    fn properties(&self, t: &str) -> Vec<String> {
        let mut p: Vec<String> = default_properties(t)
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(extra) = self.cfg.properties.as_ref().and_then(|m| m.get(t)) {
            for e in extra {
                push_unique(&mut p, e.clone());
            }
        }
        p
    }

    fn post(&self, path: &str, body: Value) -> Result<RequestSpec> {
        let url = self.http.url(path).map_err(|e| self.err(e))?;
        Ok(RequestSpec::post_json(url, body))
    }

    async fn search_page(
        &self,
        t: &str,
        from_ms: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Box<RawValue>>, Option<String>)> {
        let prop = modified_prop(t);
        let body = json!({
            "filterGroups": [{"filters": [{"propertyName": prop, "operator": "GTE", "value": from_ms.to_string()}]}],
            // The documented form (CRM search guide). HubSpot's published
            // OpenAPI types `sorts` as strings; its SDKs' issue trackers
            // report such sorts ignored, and the time-window walk needs this
            // order (`scripts/hubspot-prism-spec.py`).
            "sorts": [{"propertyName": prop, "direction": "ASCENDING"}],
            "properties": self.properties(t),
            "limit": limit,
            "after": after.unwrap_or("0"),
        });
        let spec = self.post(&format!("crm/v3/objects/{t}/search"), body)?;
        let r = self.http.json(&spec).await.map_err(|e| self.err(e))?;
        let page: SearchPage = serde_json::from_slice(&r.body).map_err(|e| {
            self.err(HttpError::Malformed {
                endpoint: spec.endpoint(),
                path: "$.results".into(),
                detail: e.to_string(),
            })
        })?;
        let next = page
            .paging
            .as_ref()
            .and_then(|p| p.pointer("/next/after"))
            .and_then(|a| match a {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
        Ok((page.results, next))
    }

    /// Associated contact ids per engagement id (v4 batch read).
    async fn associations(&self, t: &str, ids: &[String]) -> Result<HashMap<String, Vec<String>>> {
        let mut out = HashMap::new();
        if ids.is_empty() || t == "contacts" {
            return Ok(out);
        }
        let inputs: Vec<Value> = ids.iter().map(|i| json!({"id": i})).collect();
        let spec = self.post(
            &format!("crm/v4/associations/{t}/contacts/batch/read"),
            json!({"inputs": inputs}),
        )?;
        let r = self.http.json(&spec).await.map_err(|e| self.err(e))?;
        let Some(results) = r.value.get("results").and_then(|v| v.as_array()) else {
            return Err(self.err(HttpError::Malformed {
                endpoint: spec.endpoint(),
                path: "$.results".into(),
                detail: "missing".into(),
            }));
        };
        for (i, res) in results.iter().enumerate() {
            let Some(from) = res.pointer("/from/id").and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }) else {
                tracing::warn!(source = %self.cfg.name, endpoint = %spec.endpoint(), "hubspot: association without from.id skipped ($.results[{i}])");
                continue;
            };
            let to: Vec<String> = res
                .get("to")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
                .filter_map(|x| match x.get("toObjectId")? {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            out.insert(from, to);
        }
        Ok(out)
    }

    /// Fill `emails` with the e-mail addresses of `contacts` not yet known.
    async fn contact_emails(
        &self,
        contacts: &BTreeSet<String>,
        emails: &mut HashMap<String, Option<String>>,
    ) -> Result<()> {
        let missing: Vec<&String> = contacts
            .iter()
            .filter(|c| !emails.contains_key(*c))
            .collect();
        for chunk in missing.chunks(100) {
            let inputs: Vec<Value> = chunk.iter().map(|i| json!({"id": i})).collect();
            let spec = self.post(
                "crm/v3/objects/contacts/batch/read",
                json!({"inputs": inputs, "properties": ["email"], "propertiesWithHistory": []}),
            )?;
            let r = self.http.json(&spec).await.map_err(|e| self.err(e))?;
            for c in chunk {
                emails.insert((*c).clone(), None);
            }
            for res in r
                .value
                .get("results")
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                if let (Some(id), Some(e)) = (id_of(res), prop(res, "email")) {
                    emails.insert(id, Some(e.to_string()));
                }
            }
        }
        Ok(())
    }

    fn record(
        &self,
        t: &str,
        hit: &Hit,
        contacts: &[String],
        emails: &HashMap<String, Option<String>>,
    ) -> Record {
        let (id, raw, v, modified) = (hit.id.as_str(), &hit.raw, &hit.v, hit.ts);
        let mut customer_ids = Vec::new();
        let mut participants = Vec::new();
        let mut meta = BTreeMap::new();
        meta.insert("object_type".to_string(), t.to_string());
        meta.insert("object_id".to_string(), id.to_string());
        let (kind, subject, text) = if t == "contacts" {
            push_unique(&mut customer_ids, format!("crm:hubspot:{id}"));
            if let Some(e) = prop(v, "email") {
                if let Some(c) = crate::files::customer_id("email", e) {
                    push_unique(&mut customer_ids, c);
                }
                push_unique(&mut participants, e.to_lowercase());
            }
            for p in ["phone", "mobilephone"] {
                if let Some(c) = prop(v, p).and_then(|x| crate::files::customer_id("phone", x)) {
                    push_unique(&mut customer_ids, c);
                }
            }
            let name = [prop(v, "firstname"), prop(v, "lastname")]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ");
            (
                RecordKind::Contact,
                (!name.is_empty()).then_some(name),
                None,
            )
        } else {
            for c in contacts {
                push_unique(&mut customer_ids, format!("crm:hubspot:{c}"));
                match emails.get(c).and_then(|e| e.as_deref()) {
                    Some(e) => {
                        if let Some(x) = crate::files::customer_id("email", e) {
                            push_unique(&mut customer_ids, x);
                        }
                        push_unique(&mut participants, e.to_lowercase());
                    }
                    None => push_unique(&mut participants, format!("contact:{c}")),
                }
            }
            if !contacts.is_empty() {
                meta.insert("contacts".into(), contacts.join(","));
            }
            let subject = ["hs_email_subject", "hs_call_title", "hs_task_subject"]
                .iter()
                .find_map(|k| prop(v, k))
                .map(|s| s.to_string());
            let text = [
                "hs_email_text",
                "hs_note_body",
                "hs_call_body",
                "hs_task_body",
                "hs_communication_body",
            ]
            .iter()
            .find_map(|k| prop(v, k))
            .map(|s| s.to_string());
            (RecordKind::CrmActivity, subject, text)
        };
        for k in [
            "hs_timestamp",
            "hs_email_direction",
            "hs_call_direction",
            "hs_task_status",
            "hs_communication_channel_type",
        ] {
            if let Some(x) = prop(v, k) {
                meta.insert(k.to_string(), x.to_string());
            }
        }
        if let Some(m) = modified {
            meta.insert("modified_ms".into(), m.to_string());
        }
        Record {
            id: id.to_string(),
            collection: t.to_string(),
            kind,
            created: v.get("createdAt").and_then(parse_ms).and_then(ms_time),
            updated: modified.and_then(ms_time),
            participants,
            customer_ids,
            jurisdiction: None,
            subject,
            text,
            attachments: Vec::new(),
            payload: Payload::Bytes(raw.get().as_bytes().to_vec()),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        }
    }

    /// List archived objects; `Delete` those archived after `since` (unless
    /// `full`); return the highest `archivedAt`.
    async fn archived(
        &self,
        t: &str,
        since: i64,
        full: bool,
        sink: &mut dyn ChangeSink,
    ) -> Result<(i64, usize)> {
        let spec = self
            .http
            .get(&format!("crm/v3/objects/{t}"))
            .map_err(|e| self.err(e))?
            .query("archived", "true")
            .query("limit", "100");
        let endpoint = spec.endpoint();
        let mut pager = Pager::new(
            PageStyle::CursorField {
                param: "after".into(),
                path: "paging.next.after".into(),
            },
            spec,
        );
        let mut max = since;
        let mut deletes = 0;
        while let Some(page) = pager.next_page(&self.http).await.map_err(|e| self.err(e))? {
            let Some(results) = page.value.get("results").and_then(|v| v.as_array()) else {
                return Err(self.err(HttpError::Malformed {
                    endpoint,
                    path: "$.results".into(),
                    detail: "missing".into(),
                }));
            };
            for (i, o) in results.iter().enumerate() {
                let (Some(id), Some(at)) = (id_of(o), o.get("archivedAt").and_then(parse_ms))
                else {
                    tracing::warn!(source = %self.cfg.name, endpoint = %endpoint, "hubspot: archived object without id or archivedAt skipped ($.results[{i}])");
                    continue;
                };
                if at > since && !full {
                    deletes += 1;
                    sink.push(Change::Delete { id }).await?;
                }
                max = max.max(at);
            }
        }
        Ok((max, deletes))
    }
}

#[async_trait]
impl Connector for HubSpotConnector {
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
        let spec = self
            .http
            .get("crm/v3/objects/contacts")
            .map_err(|e| self.err(e))?
            .query("limit", "1");
        self.http.json(&spec).await.map_err(|e| self.err(e))?;
        Ok(Health {
            summary: format!(
                "HubSpot {}: token accepted, {} object type(s)",
                self.http.url("").map(|u| u.to_string()).unwrap_or_default(),
                self.types().len()
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        self.check().await?;
        Ok(self
            .types()
            .into_iter()
            .map(|t| Collection {
                id: t.clone(),
                name: t,
            })
            .collect())
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let t = coll.id.as_str();
        if !OBJECT_TYPES.contains(&t) {
            return Err(ConnectorError::unknown_collection(&self.cfg.name, t));
        }
        let old = decode_cursor(cursor, t);
        let full = old.is_none();
        if full {
            sink.push(Change::Reset).await?;
        }
        let (archived_since, deletes) = self
            .archived(
                t,
                old.as_ref().map_or(0, |o| o.archived_since_ms),
                full,
                sink,
            )
            .await?;
        let limit = self.cfg.page_size.unwrap_or(100);
        let cap = self.cfg.search_limit.unwrap_or(10_000) as usize;
        let mut since = old.as_ref().map_or(0, |o| o.since_ms);
        let mut ids_at_since: BTreeSet<String> = old
            .as_ref()
            .map(|o| o.ids_at_since.clone())
            .unwrap_or_default();
        let old_since = since;
        let old_ids = ids_at_since.clone();
        let mut sent: HashSet<(String, i64)> = HashSet::new();
        let mut emails: HashMap<String, Option<String>> = HashMap::new();
        let (mut upserts, mut windows, mut pages) = (0usize, 0usize, 0usize);
        let mut window = since;
        'windows: loop {
            windows += 1;
            let mut after: Option<String> = None;
            let mut in_window = 0usize;
            let mut last_ts: Option<i64> = None;
            loop {
                let (results, next) = self.search_page(t, window, after.as_deref(), limit).await?;
                pages += 1;
                in_window += results.len();
                let mut batch: Vec<Hit> = Vec::new();
                for (i, raw) in results.into_iter().enumerate() {
                    let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                    let Some(id) = id_of(&v) else {
                        tracing::warn!(source = %self.cfg.name, object_type = t, "hubspot: object without an id skipped ($.results[{i}].id)");
                        continue;
                    };
                    let ts = v
                        .pointer(&format!("/properties/{}", modified_prop(t)))
                        .and_then(parse_ms)
                        .or_else(|| v.get("updatedAt").and_then(parse_ms));
                    if let Some(ts) = ts {
                        last_ts = Some(ts);
                        if ts == old_since && old_ids.contains(&id) {
                            continue;
                        }
                        if !sent.insert((id.clone(), ts)) {
                            continue;
                        }
                        if ts > since {
                            since = ts;
                            ids_at_since.clear();
                        }
                        if ts == since {
                            ids_at_since.insert(id.clone());
                        }
                    } else {
                        tracing::warn!(source = %self.cfg.name, object_type = t, id = %id, "hubspot: object without a modification time");
                    }
                    batch.push(Hit { id, raw, v, ts });
                }
                let ids: Vec<String> = batch.iter().map(|b| b.id.clone()).collect();
                let assoc = self.associations(t, &ids).await?;
                let contacts: BTreeSet<String> = assoc.values().flatten().cloned().collect();
                self.contact_emails(&contacts, &mut emails).await?;
                for hit in &batch {
                    let c = assoc.get(&hit.id).cloned().unwrap_or_default();
                    let rec = self.record(t, hit, &c, &emails);
                    upserts += 1;
                    sink.push(Change::Upsert(rec)).await?;
                }
                let Some(next) = next else { break 'windows };
                if in_window + limit as usize > cap {
                    // The next page would cross the search limit: a new
                    // window from the last modification time seen.
                    let Some(lt) = last_ts.filter(|lt| *lt > window) else {
                        return Err(ConnectorError::Unavailable {
                            source_name: self.cfg.name.clone(),
                            detail: format!(
                                "POST /crm/v3/objects/{t}/search: more than {cap} objects share the modification time {window} ms; the search API cannot page past them"
                            ),
                        });
                    };
                    window = lt;
                    continue 'windows;
                }
                after = Some(next);
            }
        }
        tracing::info!(source = %self.cfg.name, object_type = t, full, windows, pages, upserts, deletes, "hubspot: synced");
        let cur = HubSpotCursor {
            v: CURSOR_VERSION,
            kind: "hubspot".into(),
            collection: t.to_string(),
            since_ms: since,
            ids_at_since,
            archived_since_ms: archived_since,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}
