//! X tests: the conformance suite and connector-specific checks against an
//! in-process stateful mock of `/2/users/me`, `/2/users/{id}/mentions` and
//! `/2/dm_events` (field names from the X API v2 reference / OpenAPI:
//! `data`, `includes.users`, `meta.next_token`, `meta.newest_id`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::mock::*;
use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::MockServer;
use crate::http::HttpOptions;

impl State {
    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        for (c, items) in [("mentions", &self.mentions), ("dm_events", &self.dms)] {
            let recs = t.collections.entry(c.to_string()).or_default();
            for (id, v) in items {
                recs.insert(
                    id.to_string(),
                    TruthRecord {
                        digest: digest(v.to_string().as_bytes()),
                        meta: BTreeMap::new(),
                        attachments: None,
                    },
                );
            }
        }
        t
    }
}

struct XFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
}

async fn fixture() -> XFx {
    let state = Arc::new(Mutex::new(State::default()));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        for i in 0..12 {
            s.mention();
            s.dm(i % 3 == 0);
        }
    }
    XFx { state, srv }
}

fn config(srv: &MockServer, token: &str) -> XConfig {
    XConfig {
        name: "x-test".into(),
        base_url: Some(srv.url()),
        bearer_token_env: None,
        bearer_token_file: None,
        bearer_token_command: Some(format!("printf {token}")),
        oauth2: None,
        user_id: None,
        collections: None,
        page_size: Some(5),
        http: Some(HttpOptions {
            requests_per_second: Some(10_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

#[async_trait]
impl Fixture for XFx {
    fn label(&self) -> String {
        "x".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(XConnector::new(config(&self.srv, TOKEN)).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            XConnector::new(config(&self.srv, "wrong")).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        for _ in 0..n {
            s.mention();
        }
        Expect {
            fetched: n,
            ..Default::default()
        }
    }
    async fn delete(&mut self, _n: usize) -> Option<Expect> {
        None
    }
    async fn edit(&mut self, _n: usize) -> Option<Expect> {
        None
    }
}

#[tokio::test]
async fn x_conformance() {
    let mut fx = fixture().await;
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("x conformance:\n{report}");
    let m = h.state["mentions"].values().next().unwrap();
    assert_eq!(m.kind, "social_post");
    let author = m.meta["author_id"].clone();
    assert_eq!(
        m.customer_ids,
        vec![format!("x:{author}"), format!("x:@customer{author}")]
    );
    for d in h.state["dm_events"].values() {
        assert_eq!(d.kind, "direct_message");
        // Sent or received: the customer is the other participant, never us.
        assert_eq!(d.customer_ids.len(), 2, "{:?}", d.customer_ids);
        assert!(!d
            .customer_ids
            .iter()
            .any(|c| c == "x:42" || c == "x:@acmesupport"));
    }
}

#[tokio::test]
async fn incremental_sync_requests_only_changes() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let mut h = Harness::new();
    h.sync_all(&*conn).await.unwrap();
    assert_eq!(h.len(), 24);
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 0);
    // One mentions request (since_id), one DM page (stops at known events).
    assert_eq!(fx.srv.count("/2/users/42/mentions"), 1);
    assert_eq!(fx.srv.count("/2/dm_events"), 1);
    let reqs = fx.srv.requests();
    let m = reqs
        .iter()
        .find(|r| r.path == "/2/users/42/mentions")
        .unwrap();
    assert!(m.q("since_id").is_some());
    {
        let mut st = fx.state.lock().unwrap();
        for _ in 0..7 {
            st.dm(false);
        }
    }
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 7);
    assert_eq!(fx.srv.count("/2/dm_events"), 2, "pages of 5");
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after new DMs");
}

#[tokio::test]
async fn rate_limit_auth_and_malformed_answers() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let coll = Collection {
        id: "mentions".into(),
        name: "mentions".into(),
    };
    let mut h = Harness::new();
    conn.check().await.unwrap();
    fx.state.lock().unwrap().rl = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "x-rate-limit-reset honoured: {:?}",
        t.elapsed()
    );
    fx.state.lock().unwrap().junk = true;
    fx.state.lock().unwrap().mention();
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.fetched, 1);
    fx.state.lock().unwrap().junk = false;
    fx.state.lock().unwrap().broken = true;
    match h.sync_collection(&*conn, &coll, None).await {
        Err(ConnectorError::Malformed { what, detail, .. }) => {
            assert_eq!(what, "GET /2/users/42/mentions");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    fx.state.lock().unwrap().broken = false;
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.sync(&coll, None, &mut NullSink).await {
        Err(ConnectorError::Auth { detail, .. }) => {
            assert!(
                detail.contains("GET /2/users/me") && detail.contains("401"),
                "{detail}"
            );
            assert!(!detail.contains("wrong"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ids_compare_as_numbers() {
    assert!(newer("1000", "999"));
    assert!(!newer("999", "1000"));
    assert!(!newer("5", "5"));
    let mut c = XConfig {
        name: "x".into(),
        base_url: None,
        bearer_token_env: Some("X".into()),
        bearer_token_file: None,
        bearer_token_command: None,
        oauth2: None,
        user_id: Some("@acme".into()),
        collections: None,
        page_size: None,
        http: None,
    };
    assert!(c.validate().unwrap_err().contains("user_id"));
    c.user_id = None;
    c.collections = Some(vec!["likes".into()]);
    assert!(c.validate().unwrap_err().contains("collections"));
}

struct NullSink;

#[async_trait]
impl crate::ChangeSink for NullSink {
    async fn push(&mut self, _c: Change) -> Result<()> {
        Ok(())
    }
}

/// Optional contract check, skipped unless `CUSTOS_PRISM_X` names a running
/// Stoplight Prism mock of the X API v2 spec (`prism mock openapi.json -p
/// 4712 -h 127.0.0.1`): `/2/users/me`, the mentions and the DM event
/// listings must pass Prism's request validation.
#[tokio::test]
async fn prism_contract_check() {
    let Ok(url) = std::env::var("CUSTOS_PRISM_X") else {
        return;
    };
    let mut cfg = XConfig {
        name: "x-prism".into(),
        base_url: Some(url),
        bearer_token_env: None,
        bearer_token_file: None,
        bearer_token_command: Some("printf x-test".into()),
        oauth2: None,
        user_id: Some("2244994945".into()),
        collections: None,
        page_size: Some(100),
        http: Some(HttpOptions {
            max_attempts: Some(1),
            ..Default::default()
        }),
    };
    cfg.user_id = None;
    let conn = XConnector::new(cfg).unwrap();
    // Prism answers 422 (500 with `Accept: */*`) to a request its spec
    // refuses; run it with `-d`: its answers are generated from the schema,
    // so only the requests are judged.
    let refused = |r: &Result<()>| matches!(r, Err(e) if e.to_string().contains("HTTP 4") || e.to_string().contains("HTTP 5"));
    let mut checks: Vec<(String, Result<()>)> =
        vec![("users/me".into(), conn.check().await.map(|_| ()))];
    for c in COLLECTIONS {
        for since in [None, Some("1346889436626259968")] {
            let spec = conn.request(c, "2244994945", since).unwrap();
            let r = conn.page(&spec).await.map(|_| ()).map_err(|e| conn.err(e));
            checks.push((format!("{c} since={since:?}"), r));
        }
    }
    for (what, r) in &checks {
        println!("prism x {what}: {r:?}");
    }
    assert!(
        !checks.iter().any(|(_, r)| refused(r)),
        "Prism refused a request"
    );
}
