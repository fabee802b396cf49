//! Generic REST tests: the conformance suite on an in-process stateful mock
//! of an in-house CRM (`/v1/interactions`, inclusive `updated_since`,
//! cursor pagination), every pagination style, rate limits, auth, malformed
//! answers and configuration validation.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::{MockRequest, MockResponse, MockServer};
use crate::http::HttpOptions;
use crate::SourceConfig;

const TOKEN: &str = "crm-token";

#[derive(Default)]
struct State {
    items: BTreeMap<u64, Value>,
    n: i64,
    next_id: u64,
    base: String,
    rl: usize,
    broken: bool,
    junk: bool,
}

impl State {
    /// Two changes share each second: `updated_since` is inclusive.
    fn stamp(&mut self) -> String {
        self.n += 1;
        let t = chrono::DateTime::from_timestamp(1_700_000_000 + self.n / 2, 0).unwrap();
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    }

    fn add(&mut self) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let t = self.stamp();
        self.items.insert(
            id,
            json!({"id": id, "type": "call", "summary": format!("Call about invoice {id}"),
                "notes": "Customer asked for a refund", "customer": {"id": format!("C-{}", id % 4),
                "email": format!("Client{}@Example.org", id % 4), "phones": ["+44 20 7946 0958"],
                "country": if id.is_multiple_of(2) { "DE" } else { "PT" }},
                "created_at": t, "updated_at": t}),
        );
        id
    }

    fn edit(&mut self, id: u64) {
        let t = self.stamp();
        let v = self.items.get_mut(&id).unwrap();
        v["updated_at"] = json!(t);
        v["summary"] = json!("edited");
    }

    fn handle(&mut self, r: &MockRequest) -> MockResponse {
        if r.header("authorization") != Some(format!("Bearer {TOKEN}").as_str()) {
            return MockResponse::json(401, &json!({"error": "invalid_token"}));
        }
        if self.rl > 0 {
            self.rl -= 1;
            return MockResponse::json(429, &json!({"error": "slow down"}))
                .header("retry-after", "1");
        }
        if self.broken {
            return MockResponse::raw(200, "application/json", b"<html>".to_vec());
        }
        let since = r.q("updated_since").map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .expect("updated_since is the API's own timestamp")
        });
        let mut all: Vec<Value> = self
            .items
            .values()
            .filter(|v| {
                since.is_none_or(|s| {
                    chrono::DateTime::parse_from_rfc3339(v["updated_at"].as_str().unwrap()).unwrap()
                        >= s
                })
            })
            .cloned()
            .collect();
        if self.junk {
            all.insert(0, json!({"summary": "no id"}));
        }
        let page = 3usize;
        match r.path.as_str() {
            "/v1/interactions" => {
                let from: usize = r.q("cursor").map(|c| c.parse().unwrap()).unwrap_or(0);
                let end = (from + page).min(all.len());
                let next = if end < all.len() {
                    json!(end.to_string())
                } else {
                    json!(null)
                };
                MockResponse::json(
                    200,
                    &json!({"data": all[from.min(end)..end], "meta": {"next_cursor": next}}),
                )
            }
            "/v2/interactions" => {
                let from: usize = r.q("page").map(|c| c.parse().unwrap()).unwrap_or(0);
                let end = (from + page).min(all.len());
                let resp = MockResponse::json(200, &Value::Array(all[from.min(end)..end].to_vec()));
                if end < all.len() {
                    resp.header(
                        "link",
                        &format!("<{}/v2/interactions?page={end}>; rel=\"next\", <{}/v2/interactions>; rel=\"first\"", self.base, self.base),
                    )
                } else {
                    resp
                }
            }
            "/v3/interactions" => {
                let from: usize = r.q("skip").map(|c| c.parse().unwrap()).unwrap_or(0);
                let n: usize = r.q("take").map(|c| c.parse().unwrap()).unwrap_or(3);
                let end = (from + n).min(all.len());
                MockResponse::json(200, &json!({"result": {"rows": all[from.min(end)..end]}}))
            }
            "/v4/interactions" => {
                let from: usize = r.q("p").map(|c| c.parse().unwrap()).unwrap_or(0);
                let end = (from + page).min(all.len());
                MockResponse::json(
                    200,
                    &json!({"items": all[from.min(end)..end], "links": {"next": format!("/v4/interactions?p={end}")},
                        "has_more": end < all.len()}),
                )
            }
            _ => MockResponse::json(404, &json!({"error": "not found"})),
        }
    }

    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        let recs = t.collections.entry("interactions".into()).or_default();
        for (id, v) in &self.items {
            recs.insert(
                id.to_string(),
                TruthRecord {
                    digest: digest(v.to_string().as_bytes()),
                    meta: [(
                        "updated_at".to_string(),
                        v["updated_at"].as_str().unwrap().to_string(),
                    )]
                    .into(),
                    attachments: None,
                },
            );
        }
        t
    }
}

struct RestFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
}

async fn fixture() -> RestFx {
    let state = Arc::new(Mutex::new(State::default()));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        s.base = srv.url();
        for _ in 0..10 {
            s.add();
        }
    }
    RestFx { state, srv }
}

fn endpoint(path: &str, records: &str, pagination: Option<RestPagination>) -> RestEndpoint {
    RestEndpoint {
        collection: "interactions".into(),
        path: path.into(),
        query: Some([("include".to_string(), "customer".to_string())].into()),
        records: records.into(),
        id: "/id".into(),
        updated_at: Some("/updated_at".into()),
        created_at: Some("/created_at".into()),
        subject: Some("/summary".into()),
        text: Some("/notes".into()),
        jurisdiction: Some("/customer/country".into()),
        customer_fields: vec![
            "email:/customer/email".into(),
            "phone:/customer/phones".into(),
            "crm:/customer/id".into(),
        ],
        incremental_query: Some("updated_since={cursor}".into()),
        kind: None,
        pagination,
    }
}

fn config(srv: &MockServer, token: &str, ep: RestEndpoint) -> RestConfig {
    RestConfig {
        name: "crm-test".into(),
        base_url: srv.url(),
        bearer_token_env: None,
        bearer_token_file: None,
        bearer_token_command: Some(format!("printf {token}")),
        username: None,
        password_env: None,
        password_file: None,
        password_command: None,
        oauth2: None,
        kind: Some("call_log".into()),
        crm_name: Some("acme".into()),
        endpoints: vec![ep],
        http: Some(HttpOptions {
            requests_per_second: Some(10_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

fn cursor_style() -> RestEndpoint {
    endpoint(
        "v1/interactions",
        "/data",
        Some(RestPagination::Cursor {
            param: "cursor".into(),
            cursor: "/meta/next_cursor".into(),
        }),
    )
}

#[async_trait]
impl Fixture for RestFx {
    fn label(&self) -> String {
        "rest".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(RestConnector::new(config(&self.srv, TOKEN, cursor_style())).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            RestConnector::new(config(&self.srv, "wrong", cursor_style())).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        for _ in 0..n {
            s.add();
        }
        Expect {
            fetched: n,
            ..Default::default()
        }
    }
    async fn delete(&mut self, _n: usize) -> Option<Expect> {
        None
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s.items.keys().copied().take(n).collect();
        for id in &ids {
            s.edit(*id);
        }
        Some(Expect {
            fetched: ids.len(),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn rest_conformance() {
    let mut fx = fixture().await;
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("rest conformance:\n{report}");
    let r = &h.state["interactions"]["3"];
    assert_eq!(r.kind, "call_log");
    assert_eq!(
        r.customer_ids,
        vec![
            "email:client3@example.org".to_string(),
            "phone:+442079460958".to_string(),
            "crm:acme:C-3".to_string()
        ]
    );
    assert_eq!(r.subject.as_deref(), Some("Call about invoice 3"));
    assert_eq!(r.jurisdiction.as_deref(), Some("PT"));
    assert_eq!(
        h.state["interactions"]["4"].jurisdiction.as_deref(),
        Some("DE")
    );
}

#[tokio::test]
async fn every_pagination_style_and_incremental_requests() {
    let fx = fixture().await;
    let styles = [
        cursor_style(),
        endpoint("v2/interactions", "", Some(RestPagination::Link)),
        endpoint(
            "v3/interactions",
            "/result/rows",
            Some(RestPagination::Offset {
                offset_param: Some("skip".into()),
                limit_param: Some("take".into()),
                limit: Some(3),
            }),
        ),
        endpoint(
            "v4/interactions",
            "/items",
            Some(RestPagination::NextUrl {
                next: "/links/next".into(),
                has_more: Some("/has_more".into()),
            }),
        ),
    ];
    let truth = fx.state.lock().unwrap().truth();
    for ep in styles {
        let path = format!("/{}", ep.path);
        let conn = RestConnector::new(config(&fx.srv, TOKEN, ep)).unwrap();
        let mut h = Harness::new();
        fx.srv.clear();
        let s = h.sync_all(&conn).await.unwrap();
        assert_eq!(s.fetched, 10, "{path}");
        h.assert_matches(&truth, &path);
        // The fixed query goes with the first page; next-page URLs carry
        // their own parameters.
        assert!(fx.srv.requests()[..2]
            .iter()
            .all(|r| r.q("include") == Some("customer")));
        assert_eq!(fx.srv.count(&path), 1 + 4, "{path}: check + 4 pages");
        // Nothing changed: one page with the record at the cursor's second,
        // skipped.
        fx.srv.clear();
        let s = h.sync_all(&conn).await.unwrap();
        assert_eq!(s.fetched, 0, "{path}");
        assert_eq!(fx.srv.count(&path), 2, "{path}");
        let last = fx.srv.requests().pop().unwrap();
        assert_eq!(last.q("updated_since"), Some("2023-11-14T22:13:25Z"));
    }
}

#[tokio::test]
async fn rate_limit_auth_and_malformed_answers() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let coll = conn.collections().await.unwrap().remove(0);
    let mut h = Harness::new();
    fx.state.lock().unwrap().rl = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    fx.state.lock().unwrap().junk = true;
    fx.state.lock().unwrap().add();
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.fetched, 1, "the record without id is skipped");
    fx.state.lock().unwrap().junk = false;
    fx.state.lock().unwrap().broken = true;
    match h.sync_collection(&*conn, &coll, None).await {
        Err(ConnectorError::Malformed { what, detail, .. }) => {
            assert_eq!(what, "GET /v1/interactions");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    fx.state.lock().unwrap().broken = false;
    // A records pointer that is not there: named.
    let mut ep = cursor_style();
    ep.records = "/rows".into();
    let wrong = RestConnector::new(config(&fx.srv, TOKEN, ep)).unwrap();
    match wrong.check().await {
        Err(ConnectorError::Malformed { detail, .. }) => {
            assert!(detail.contains("/rows"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.collections().await {
        Err(ConnectorError::Auth { detail, .. }) => {
            assert!(
                detail.contains("GET /v1/interactions") && detail.contains("401"),
                "{detail}"
            );
            assert!(!detail.contains("wrong"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_errors_name_the_key() {
    let base = r#"{"type":"rest","name":"crm","base_url":"https://crm.example.org/","bearer_token_env":"T","endpoints":[ENDPOINT]}"#;
    let cases = [
        (
            r#"{"collection":"a","path":"x","records":"data","id":"/id"}"#,
            "endpoints[0].records",
        ),
        (
            r#"{"collection":"a","path":"x","records":"/data","id":"id"}"#,
            "endpoints[0].id",
        ),
        (
            r#"{"collection":"a b","path":"x","records":"/data","id":"/id"}"#,
            "endpoints[0].collection",
        ),
        (
            r#"{"collection":"a","path":"x","records":"/data","id":"/id","customer_fields":["fax:/f"]}"#,
            "endpoints[0].customer_fields[0]",
        ),
        (
            r#"{"collection":"a","path":"x","records":"/data","id":"/id","incremental_query":"since=x"}"#,
            "endpoints[0].incremental_query",
        ),
        (
            r#"{"collection":"a","path":"x","records":"/data","id":"/id","incremental_query":"since={cursor}"}"#,
            "needs endpoints[0].updated_at",
        ),
        (
            r#"{"collection":"a","path":"x","records":"/data","id":"/id","pagination":{"style":"cursor","param":"c","cursor":"/meta/next.cursor"}}"#,
            "endpoints[0].pagination.cursor",
        ),
    ];
    for (ep, want) in cases {
        let json = base.replace("ENDPOINT", ep);
        let cfg: SourceConfig =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let e = crate::build(&cfg).err().expect(want).to_string();
        assert!(e.contains(want), "{e} lacks {want}");
    }
    // Unknown keys and plain secrets are refused at parse time.
    let unknown = base.replace(
        "ENDPOINT",
        r#"{"collection":"a","path":"x","records":"/data","id":"/id","colour":"red"}"#,
    );
    assert!(serde_json::from_str::<SourceConfig>(&unknown).is_err());
    let plain = r#"{"type":"rest","name":"crm","base_url":"https://x/","bearer_token":"s3cret","endpoints":[]}"#;
    assert!(serde_json::from_str::<SourceConfig>(plain).is_err());
    let basic = r#"{"type":"rest","name":"crm","base_url":"https://x/","username":"u","endpoints":[{"collection":"a","path":"x","records":"/data","id":"/id"}]}"#;
    let cfg: SourceConfig = serde_json::from_str(basic).unwrap();
    assert!(crate::build(&cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("password_"));
}
