//! `type = "rest"`: any REST/JSON API, described in the configuration (for
//! in-house CRMs and tools without a dedicated connector).
//!
//! - One collection per configured endpoint.
//! - Each sync pages through the endpoint (cursor field, `Link` header,
//!   offset/limit or next-URL style, through the shared HTTP layer), takes
//!   the record array at `records` and one record per element: id at `id`,
//!   times at `updated_at` / `created_at`, typed customer ids from
//!   `customer_fields` (`email:`, `phone:`, `crm:<crm_name>:`).
//! - With `incremental_query` (`updated_since={cursor}`), later syncs send
//!   the highest `updated_at` seen; records at exactly that value already
//!   sent are skipped (the cursor keeps their ids), so an inclusive filter
//!   fetches nothing twice. Deletions are not visible that way.
//! - Without it, every sync is a `Reset` + full listing: records no longer
//!   listed are removed (`reports_deletions` is true only when no endpoint
//!   is incremental).
//! - Payload: the record's JSON byte-exact as the API sent it (`json`).
//! - A record without an id is skipped with a warning; a page that is not
//!   JSON or has no array at `records` is a `Malformed` error naming the
//!   endpoint and the pointer.

mod config;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

pub use config::{RestConfig, RestEndpoint, RestPagination};

use crate::http::{Auth, HttpClient, HttpError, PageStyle, Pager, Secret};
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Health,
    Payload, Record, RecordKind, Result, SecretRef,
};

const CURSOR_VERSION: u32 = 1;

/// The generic REST connector.
#[derive(Debug)]
pub struct RestConnector {
    cfg: RestConfig,
    http: HttpClient,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestCursor {
    v: u32,
    kind: String,
    collection: String,
    since: String,
    ids_at_since: BTreeSet<String>,
}

fn auth_of(cfg: &RestConfig) -> std::result::Result<Auth, String> {
    let bearer = SecretRef::pick(
        "bearer_token",
        &cfg.bearer_token_env,
        &cfg.bearer_token_file,
        &cfg.bearer_token_command,
    )?;
    let password = SecretRef::pick(
        "password",
        &cfg.password_env,
        &cfg.password_file,
        &cfg.password_command,
    )?;
    if password.is_some() != cfg.username.is_some() {
        return Err("username and password_* go together (HTTP basic)".into());
    }
    match (bearer, password, &cfg.oauth2) {
        (None, None, None) => Ok(Auth::None),
        (Some(t), None, None) => Ok(Auth::Bearer(Secret::from_ref(t))),
        (None, Some(p), None) => Ok(Auth::Basic {
            username: cfg.username.clone().unwrap_or_default(),
            password: Secret::from_ref(p),
        }),
        (None, None, Some(o)) => Ok(Auth::OAuth2(o.build()?)),
        _ => Err("give only one of bearer_token_*, username + password_*, oauth2".into()),
    }
}

/// Check a JSON pointer (and that it maps onto the HTTP layer's dotted
/// paths when `dotted`).
fn pointer(key: &str, p: &str, dotted: bool) -> std::result::Result<String, String> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(format!(
            "{key} {p:?}: a JSON pointer starts with '/' (or is \"\" for the whole body)"
        ));
    }
    if dotted {
        if p.contains('.') || p.contains('~') {
            return Err(format!(
                "{key} {p:?}: pagination pointers may not contain '.' or '~'"
            ));
        }
        return Ok(p.trim_start_matches('/').replace('/', "."));
    }
    Ok(String::new())
}

fn parse_customer(key: &str, spec: &str) -> std::result::Result<(String, String), String> {
    match spec.split_once(':') {
        Some((t @ ("email" | "phone" | "crm"), p)) => {
            pointer(key, p, false)?;
            if p.is_empty() {
                return Err(format!("{key} {spec:?}: empty pointer"));
            }
            Ok((t.to_string(), p.to_string()))
        }
        _ => Err(format!(
            "{key} {spec:?}: expected TYPE:POINTER with TYPE email, phone or crm (\"email:/customer/email\")"
        )),
    }
}

fn incremental(key: &str, q: &str) -> std::result::Result<(String, String), String> {
    match q.split_once('=') {
        Some((n, v)) if !n.is_empty() && v.contains("{cursor}") => {
            Ok((n.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "{key} {q:?}: expected NAME=...{{cursor}}... like \"updated_since={{cursor}}\""
        )),
    }
}

impl RestConfig {
    /// Check the entry; errors name the bad key (`endpoints[1].id`).
    pub fn validate(&self) -> std::result::Result<(), String> {
        auth_of(self)?;
        if self.base_url.trim().is_empty() {
            return Err("base_url is empty".into());
        }
        if self.endpoints.is_empty() {
            return Err("endpoints is empty: configure at least one [[source.endpoints]]".into());
        }
        if self.kind.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err("kind is empty".into());
        }
        let mut seen = HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let k = |f: &str| format!("endpoints[{i}].{f}");
            if e.collection.is_empty() || crate::ids::collection_id(&e.collection) != e.collection {
                return Err(format!(
                    "{} {:?}: use only [A-Za-z0-9._-]",
                    k("collection"),
                    e.collection
                ));
            }
            if !seen.insert(e.collection.clone()) {
                return Err(format!(
                    "{} {:?}: used twice",
                    k("collection"),
                    e.collection
                ));
            }
            if e.path.trim().is_empty() {
                return Err(format!("{} is empty", k("path")));
            }
            pointer(&k("records"), &e.records, false)?;
            pointer(&k("id"), &e.id, false)?;
            if e.id.is_empty() {
                return Err(format!("{} is empty", k("id")));
            }
            for (f, v) in [
                ("updated_at", &e.updated_at),
                ("created_at", &e.created_at),
                ("subject", &e.subject),
                ("text", &e.text),
                ("jurisdiction", &e.jurisdiction),
            ] {
                if let Some(p) = v {
                    pointer(&k(f), p, false)?;
                }
            }
            for (j, c) in e.customer_fields.iter().enumerate() {
                parse_customer(&k(&format!("customer_fields[{j}]")), c)?;
            }
            if let Some(q) = &e.incremental_query {
                incremental(&k("incremental_query"), q)?;
                if e.updated_at.is_none() {
                    return Err(format!(
                        "{} needs {}",
                        k("incremental_query"),
                        k("updated_at")
                    ));
                }
            }
            if e.kind.as_deref().is_some_and(|x| x.trim().is_empty()) {
                return Err(format!("{} is empty", k("kind")));
            }
            match &e.pagination {
                Some(RestPagination::Cursor { param, cursor }) => {
                    if param.is_empty() {
                        return Err(format!("{} is empty", k("pagination.param")));
                    }
                    pointer(&k("pagination.cursor"), cursor, true)?;
                }
                Some(RestPagination::NextUrl { next, has_more }) => {
                    pointer(&k("pagination.next"), next, true)?;
                    if let Some(h) = has_more {
                        pointer(&k("pagination.has_more"), h, true)?;
                    }
                }
                Some(RestPagination::Offset { limit, .. }) => {
                    if *limit == Some(0) {
                        return Err(format!("{} must be at least 1", k("pagination.limit")));
                    }
                    pointer(&k("records"), &e.records, true)?;
                }
                Some(RestPagination::Link) | None => {}
            }
        }
        if let Some(o) = &self.oauth2 {
            o.validate()?;
        }
        if let Some(h) = &self.http {
            h.validate()?;
        }
        Ok(())
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn time_of(v: Option<&Value>) -> Option<DateTime<Utc>> {
    scalar(v?).and_then(|s| crate::files::parse_time(&s))
}

/// Order of two `updated_at` values: as times when both parse, else as text.
fn later(a: &str, b: &str) -> std::cmp::Ordering {
    match (crate::files::parse_time(a), crate::files::parse_time(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        _ => a.cmp(b),
    }
}

impl RestConnector {
    /// A connector for `cfg` (nothing contacted yet).
    pub fn new(cfg: RestConfig) -> Result<RestConnector> {
        let bad = |detail: String| ConnectorError::Malformed {
            source_name: cfg.name.clone(),
            what: "configuration".into(),
            detail,
        };
        cfg.validate().map_err(bad)?;
        let auth = auth_of(&cfg).map_err(bad)?;
        let opts = cfg.http.clone().unwrap_or_default();
        let http = HttpClient::new(&cfg.name, &cfg.base_url, &opts, Some(5.0), auth)
            .map_err(|e| e.into_connector(&cfg.name))?;
        Ok(RestConnector { cfg, http })
    }

    fn err(&self, e: HttpError) -> ConnectorError {
        self.http.err(e)
    }

    fn style(e: &RestEndpoint) -> Option<PageStyle> {
        let dotted = |p: &str| p.trim_start_matches('/').replace('/', ".");
        Some(match e.pagination.as_ref()? {
            RestPagination::Cursor { param, cursor } => PageStyle::CursorField {
                param: param.clone(),
                path: dotted(cursor),
            },
            RestPagination::Link => PageStyle::LinkHeader,
            RestPagination::Offset {
                offset_param,
                limit_param,
                limit,
            } => PageStyle::Offset {
                offset_param: offset_param.clone().unwrap_or_else(|| "offset".into()),
                limit_param: limit_param.clone().unwrap_or_else(|| "limit".into()),
                limit: limit.unwrap_or(100),
                items: dotted(&e.records),
            },
            RestPagination::NextUrl { next, has_more } => PageStyle::NextUrl {
                path: dotted(next),
                has_more: has_more.as_deref().map(dotted),
            },
        })
    }

    fn record(&self, e: &RestEndpoint, id: String, raw: &RawValue, v: &Value) -> Record {
        let crm = self.cfg.crm_name.as_deref().unwrap_or(&self.cfg.name);
        let mut customer_ids: Vec<String> = Vec::new();
        let mut participants: Vec<String> = Vec::new();
        for c in &e.customer_fields {
            let Ok((t, p)) = parse_customer("", c) else {
                continue;
            };
            let vals: Vec<String> = match v.pointer(&p) {
                Some(Value::Array(a)) => a.iter().filter_map(scalar).collect(),
                Some(x) => scalar(x).into_iter().collect(),
                None => Vec::new(),
            };
            for x in vals {
                let cid = if t == "crm" {
                    Some(format!("crm:{crm}:{}", x.trim()))
                } else {
                    crate::files::customer_id(&t, &x)
                };
                if let Some(cid) = cid {
                    if t == "email" {
                        let a = cid.trim_start_matches("email:").to_string();
                        if !participants.contains(&a) {
                            participants.push(a);
                        }
                    }
                    if !customer_ids.contains(&cid) {
                        customer_ids.push(cid);
                    }
                }
            }
        }
        let at = |p: &Option<String>| p.as_deref().and_then(|p| v.pointer(p));
        let mut meta = BTreeMap::new();
        meta.insert("source_id".to_string(), id.clone());
        if let Some(u) = at(&e.updated_at).and_then(scalar) {
            meta.insert("updated_at".to_string(), u);
        }
        let kind = e
            .kind
            .as_deref()
            .or(self.cfg.kind.as_deref())
            .unwrap_or("crm_activity");
        Record {
            id: crate::ids::record_id(&id),
            collection: e.collection.clone(),
            kind: RecordKind::parse(kind),
            created: time_of(at(&e.created_at)),
            updated: time_of(at(&e.updated_at)),
            participants,
            customer_ids,
            jurisdiction: at(&e.jurisdiction)
                .and_then(scalar)
                .map(|j| j.trim().to_string())
                .filter(|j| !j.is_empty()),
            subject: at(&e.subject).and_then(scalar),
            text: at(&e.text).and_then(scalar),
            attachments: Vec::new(),
            payload: Payload::Bytes(raw.get().as_bytes().to_vec()),
            payload_ext: "json".into(),
            deleted: false,
            meta,
        }
    }
}

#[async_trait]
impl Connector for RestConnector {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reports_deletions: self
                .cfg
                .endpoints
                .iter()
                .all(|e| e.incremental_query.is_none()),
            reports_edits: true,
            has_attachments: false,
            metadata_updates: false,
        }
    }

    async fn check(&self) -> Result<Health> {
        // The first page of the first endpoint: reachability, credentials
        // and the records pointer at once.
        let e = &self.cfg.endpoints[0];
        let mut spec = self.http.get(&e.path).map_err(|x| self.err(x))?;
        for (k, v) in e.query.iter().flatten() {
            spec.set_query(k, v.clone());
        }
        let r = self.http.json(&spec).await.map_err(|x| self.err(x))?;
        if !r.value.pointer(&e.records).is_some_and(|v| v.is_array()) {
            return Err(self.err(HttpError::Malformed {
                endpoint: spec.endpoint(),
                path: format!("{:?} (endpoints[0].records)", e.records),
                detail: "no array there".into(),
            }));
        }
        Ok(Health {
            summary: format!(
                "REST {}: {} endpoint(s), first answered",
                self.http.url("").map(|u| u.to_string()).unwrap_or_default(),
                self.cfg.endpoints.len()
            ),
        })
    }

    async fn collections(&self) -> Result<Vec<Collection>> {
        self.check().await?;
        Ok(self
            .cfg
            .endpoints
            .iter()
            .map(|e| Collection {
                id: e.collection.clone(),
                name: e.path.clone(),
            })
            .collect())
    }

    async fn sync(
        &self,
        coll: &Collection,
        cursor: Option<&Cursor>,
        sink: &mut dyn ChangeSink,
    ) -> Result<Cursor> {
        let Some(e) = self.cfg.endpoints.iter().find(|e| e.collection == coll.id) else {
            return Err(ConnectorError::unknown_collection(&self.cfg.name, &coll.id));
        };
        let inc = e
            .incremental_query
            .as_deref()
            .and_then(|q| incremental("", q).ok());
        let old = cursor
            .and_then(|c| serde_json::from_value::<RestCursor>(c.clone()).ok())
            .filter(|c| {
                c.v == CURSOR_VERSION
                    && c.kind == "rest"
                    && c.collection == coll.id
                    && !c.since.is_empty()
                    && inc.is_some()
            });
        let full = old.is_none();
        if full {
            sink.push(Change::Reset).await?;
        }
        let mut spec = self.http.get(&e.path).map_err(|x| self.err(x))?;
        for (k, v) in e.query.iter().flatten() {
            spec.set_query(k, v.clone());
        }
        if let (Some((name, tmpl)), Some(o)) = (&inc, &old) {
            spec.set_query(name, tmpl.replace("{cursor}", &o.since));
        }
        let endpoint = spec.endpoint();
        let mut since = old.as_ref().map(|o| o.since.clone()).unwrap_or_default();
        let mut ids_at_since = old
            .as_ref()
            .map(|o| o.ids_at_since.clone())
            .unwrap_or_default();
        let (old_since, old_ids) = (since.clone(), ids_at_since.clone());
        let mut sent: HashSet<String> = HashSet::new();
        let (mut upserts, mut pages) = (0usize, 0usize);
        let mut pager = Self::style(e).map(|s| Pager::new(s, spec.clone()));
        let mut single = Some(spec);
        loop {
            let page = match &mut pager {
                Some(p) => p.next_page(&self.http).await,
                None => match single.take() {
                    Some(s) => self.http.json(&s).await.map(Some),
                    None => Ok(None),
                },
            }
            .map_err(|x| self.err(x))?;
            let Some(page) = page else { break };
            pages += 1;
            let items: Vec<Box<RawValue>> = {
                #[derive(Deserialize)]
                #[serde(transparent)]
                struct Items(Vec<Box<RawValue>>);
                let at = if e.records.is_empty() {
                    Some(
                        serde_json::from_slice::<Box<RawValue>>(&page.body)
                            .map_err(|x| x.to_string()),
                    )
                } else {
                    raw_at(&page.body, &e.records)
                };
                match at.map(|r| {
                    r.and_then(|r| {
                        serde_json::from_str::<Items>(r.get()).map_err(|x| x.to_string())
                    })
                }) {
                    Some(Ok(Items(v))) => v,
                    Some(Err(d)) => {
                        return Err(self.err(HttpError::Malformed {
                            endpoint,
                            path: e.records.clone(),
                            detail: format!("not an array ({d})"),
                        }))
                    }
                    None => {
                        return Err(self.err(HttpError::Malformed {
                            endpoint,
                            path: e.records.clone(),
                            detail: "missing (endpoint records pointer)".into(),
                        }))
                    }
                }
            };
            for (i, raw) in items.into_iter().enumerate() {
                let v: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
                let Some(id) = v.pointer(&e.id).and_then(scalar) else {
                    tracing::warn!(source = %self.cfg.name, endpoint = %endpoint, "rest: record without an id at {} skipped (item {i})", e.id);
                    continue;
                };
                let upd = e
                    .updated_at
                    .as_deref()
                    .and_then(|p| v.pointer(p))
                    .and_then(scalar);
                if let Some(u) = &upd {
                    if *u == old_since && old_ids.contains(&id) {
                        continue;
                    }
                    match later(u, &since) {
                        std::cmp::Ordering::Greater => {
                            since = u.clone();
                            ids_at_since.clear();
                            ids_at_since.insert(id.clone());
                        }
                        std::cmp::Ordering::Equal => {
                            ids_at_since.insert(id.clone());
                        }
                        std::cmp::Ordering::Less => {}
                    }
                } else if inc.is_some() {
                    tracing::warn!(source = %self.cfg.name, endpoint = %endpoint, id = %id, "rest: record without updated_at");
                }
                if !sent.insert(id.clone()) {
                    continue;
                }
                upserts += 1;
                let rec = self.record(e, id, &raw, &v);
                sink.push(Change::Upsert(rec)).await?;
            }
        }
        tracing::info!(source = %self.cfg.name, collection = %coll.id, full, pages, upserts, "rest: synced");
        let cur = RestCursor {
            v: CURSOR_VERSION,
            kind: "rest".into(),
            collection: coll.id.clone(),
            since,
            ids_at_since,
        };
        Ok(serde_json::to_value(cur).expect("cursor serializes"))
    }
}

/// The raw JSON at `pointer` inside `body` (the bytes as sent): walks the
/// object keys / array indexes with `RawValue`s.
fn raw_at(body: &[u8], pointer: &str) -> Option<std::result::Result<Box<RawValue>, String>> {
    let mut cur: Box<RawValue> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Some(Err(e.to_string())),
    };
    for tok in pointer.split('/').skip(1) {
        let tok = tok.replace("~1", "/").replace("~0", "~");
        let s = cur.get();
        cur = if s.trim_start().starts_with('{') {
            let mut m: BTreeMap<String, Box<RawValue>> = serde_json::from_str(s).ok()?;
            m.remove(&tok)?
        } else if s.trim_start().starts_with('[') {
            let mut a: Vec<Box<RawValue>> = serde_json::from_str(s).ok()?;
            let i: usize = tok.parse().ok()?;
            if i >= a.len() {
                return None;
            }
            a.swap_remove(i)
        } else {
            return None;
        };
    }
    Some(Ok(cur))
}
