//! HubSpot tests: the conformance suite and connector-specific checks against
//! an in-process stateful mock of the CRM v3 search and list endpoints, the
//! v4 association batch read, the contacts batch read and the OAuth token
//! endpoint (field names from the HubSpot CRM v3 OpenAPI descriptions:
//! `PublicObjectSearchRequest`, `SimplePublicObject`, `paging.next.after`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::mock::*;
use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::MockServer;
use crate::http::{HttpOptions, OAuth2Config};

impl State {
    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        for ty in OBJECT_TYPES {
            t.collections.entry(ty.to_string()).or_default();
        }
        for (id, o) in &self.objs {
            if o.archived_at.is_some() {
                continue;
            }
            t.collections.get_mut(&o.t).unwrap().insert(
                id.to_string(),
                TruthRecord {
                    digest: digest(o.v.to_string().as_bytes()),
                    meta: [("object_type".to_string(), o.t.clone())].into(),
                    attachments: None,
                },
            );
        }
        t
    }
}

struct HsFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
    page_size: u32,
}

async fn fixture() -> HsFx {
    let state = Arc::new(Mutex::new(State {
        cap: 10_000,
        token: TOKEN.into(),
        ..Default::default()
    }));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        let contacts: Vec<u64> = (0..6).map(|_| s.add("contacts", None)).collect();
        for (i, t) in OBJECT_TYPES[1..].iter().enumerate() {
            s.add(t, Some(contacts[i % 6]));
            s.add(t, None);
        }
    }
    HsFx {
        state,
        srv,
        page_size: 4,
    }
}

fn config(srv: &MockServer, token: &str, page_size: u32) -> HubSpotConfig {
    HubSpotConfig {
        name: "hubspot-test".into(),
        base_url: Some(srv.url()),
        access_token_env: None,
        access_token_file: None,
        access_token_command: Some(format!("printf {token}")),
        oauth2: None,
        object_types: None,
        properties: None,
        page_size: Some(page_size),
        search_limit: None,
        http: Some(HttpOptions {
            requests_per_second: Some(10_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

#[async_trait]
impl Fixture for HsFx {
    fn label(&self) -> String {
        "hubspot".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(HubSpotConnector::new(config(&self.srv, TOKEN, self.page_size)).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            HubSpotConnector::new(config(&self.srv, "wrong", self.page_size)).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        let c = s.live("contacts")[0];
        for _ in 0..n {
            s.add("notes", Some(c));
        }
        Expect {
            fetched: n,
            ..Default::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s
            .live("calls")
            .into_iter()
            .chain(s.live("tasks"))
            .take(n)
            .collect();
        for id in &ids {
            s.archive(*id);
        }
        Some(Expect {
            removed: ids.len(),
            ..Default::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s.live("contacts").into_iter().rev().take(n).collect();
        for id in &ids {
            s.touch(*id, "edited");
        }
        Some(Expect {
            fetched: ids.len(),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn hubspot_conformance() {
    let mut fx = fixture().await;
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("hubspot conformance:\n{report}");
    let contact = h.state["contacts"].values().next().unwrap();
    assert_eq!(contact.kind, "contact");
    assert!(contact
        .customer_ids
        .iter()
        .any(|c| c.starts_with("crm:hubspot:")));
    assert!(contact
        .customer_ids
        .contains(&"phone:+351912345678".to_string()));
    // An email engagement associated with contact 1: its customer ids.
    let email = &h.state["emails"];
    let assoc = email
        .values()
        .find(|r| !r.customer_ids.is_empty())
        .expect("an associated email");
    assert_eq!(assoc.kind, "crm_activity");
    assert_eq!(
        assoc.customer_ids,
        vec![
            "crm:hubspot:1".to_string(),
            "email:customer1@example.org".to_string()
        ]
    );
    assert!(assoc
        .subject
        .as_deref()
        .is_some_and(|s| s.starts_with("Order ")));
    assert_eq!(fx.state.lock().unwrap().over_cap, 0);
}

#[tokio::test]
async fn incremental_sync_requests_only_changes() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let mut h = Harness::new();
    h.sync_all(&*conn).await.unwrap();
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 0);
    let reqs = fx.srv.requests();
    let searches = reqs.iter().filter(|r| r.path.ends_with("/search")).count();
    // check (collections) + per type: one archived listing, one search.
    assert_eq!(searches, 6, "{reqs:?}");
    assert_eq!(reqs.len(), 1 + 6 + 6);
    assert!(!reqs.iter().any(|r| r.path.contains("batch")));
    // One edited note: one search page, one association read, one contact read.
    let note = fx.state.lock().unwrap().live("notes")[0];
    fx.state.lock().unwrap().touch(note, "x");
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 1);
    assert_eq!(fx.srv.count("/crm/v3/objects/notes/search"), 1);
    assert_eq!(
        fx.srv
            .count("/crm/v4/associations/notes/contacts/batch/read"),
        1
    );
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after one edit");
}

#[tokio::test]
async fn search_limit_walks_time_windows() {
    let mut fx = fixture().await;
    fx.page_size = 3;
    {
        let mut s = fx.state.lock().unwrap();
        s.cap = 7;
        for _ in 0..25 {
            s.add("contacts", None);
        }
    }
    let mut cfg = config(&fx.srv, TOKEN, 3);
    cfg.search_limit = Some(7);
    cfg.object_types = Some(vec!["contacts".into()]);
    let conn = HubSpotConnector::new(cfg.clone()).unwrap();
    let mut h = Harness::new();
    let s = h.sync_all(&conn).await.unwrap();
    assert_eq!(s.fetched, 31);
    assert_eq!(s.duplicate_upserts, 0);
    let mut truth = fx.truth().await;
    truth.collections.retain(|k, _| k == "contacts");
    h.assert_matches(&truth, "after windowed full sync");
    assert_eq!(
        fx.state.lock().unwrap().over_cap,
        0,
        "never paged past the cap"
    );
    assert!(fx.srv.count("/crm/v3/objects/contacts/search") > 11);
    // More objects in one millisecond than the cap: a clear error, no loop.
    {
        let mut s = fx.state.lock().unwrap();
        s.same_ms = true;
        for _ in 0..9 {
            s.add("contacts", None);
        }
    }
    match h.sync_all(&conn).await {
        Err(ConnectorError::Unavailable { detail, .. }) => {
            assert!(detail.contains("share the modification time"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rate_limit_auth_refresh_and_malformed_answers() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let coll = Collection {
        id: "contacts".into(),
        name: "contacts".into(),
    };
    let mut h = Harness::new();
    fx.state.lock().unwrap().rl = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    // An object without id: skipped with a warning.
    fx.state.lock().unwrap().junk = true;
    fx.state.lock().unwrap().add("contacts", None);
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.fetched, 1);
    fx.state.lock().unwrap().junk = false;
    // Not JSON: Malformed naming the endpoint.
    fx.state.lock().unwrap().broken = true;
    match h.sync_collection(&*conn, &coll, None).await {
        Err(ConnectorError::Malformed { what, detail, .. }) => {
            assert_eq!(what, "POST /crm/v3/objects/contacts/search");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    fx.state.lock().unwrap().broken = false;
    // A refused token: Auth naming the endpoint, not the token.
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.check().await {
        Err(ConnectorError::Auth { detail, .. }) => {
            assert!(detail.contains("GET /crm/v3/objects/contacts") && detail.contains("401"));
            assert!(!detail.contains("wrong"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // OAuth2: the token is fetched, refreshed on 401, the rotated refresh
    // token saved to the token file.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("hubspot-refresh");
    fx.state.lock().unwrap().refresh = "rt-1".into();
    let mut cfg = config(&fx.srv, TOKEN, 4);
    cfg.access_token_command = None;
    cfg.oauth2 = Some(Box::new(OAuth2Config {
        token_url: format!("{}/oauth/v1/token", fx.srv.url()),
        client_id: "hs-client".into(),
        client_secret_env: None,
        client_secret_file: None,
        client_secret_command: Some("printf hs-secret".into()),
        refresh_token_env: None,
        refresh_token_file: None,
        refresh_token_command: Some("printf rt-1".into()),
        token_file: Some(token_file.clone()),
        scope: None,
    }));
    let oauth = HubSpotConnector::new(cfg).unwrap();
    oauth.check().await.unwrap();
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), "rt-2");
    fx.state.lock().unwrap().token = "revoked".into();
    oauth.check().await.unwrap();
    assert_eq!(fx.state.lock().unwrap().token_requests, 2);
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), "rt-3");
}

#[test]
fn config_is_validated() {
    let mut cfg = HubSpotConfig {
        name: "h".into(),
        base_url: None,
        access_token_env: Some("HS".into()),
        access_token_file: None,
        access_token_command: None,
        oauth2: None,
        object_types: Some(vec!["deals".into()]),
        properties: None,
        page_size: None,
        search_limit: None,
        http: None,
    };
    assert!(cfg.validate().unwrap_err().contains("object_types"));
    cfg.object_types = None;
    cfg.page_size = Some(500);
    assert!(cfg.validate().unwrap_err().contains("page_size"));
    cfg.page_size = None;
    cfg.validate().unwrap();
    cfg.access_token_env = None;
    assert!(cfg.validate().unwrap_err().contains("access_token_env"));
}

/// Optional contract check, skipped unless `CUSTOS_PRISM_HUBSPOT` names a
/// running Stoplight Prism mock of the HubSpot CRM v3 contacts spec: the
/// connector's check, search and archived listing of `contacts` must pass
/// Prism's request validation. Prism serves the spec as corrected by
/// `scripts/hubspot-prism-spec.py` (the published spec types the search's
/// `sorts` as strings; HubSpot's search guide and API take
/// `[{"propertyName", "direction"}]`, which the connector sends; nothing
/// else is changed):
/// `scripts/hubspot-prism-spec.py ../shared/contracts/hubspot/contacts.v3.json
/// /tmp/contacts.json && prism mock /tmp/contacts.json -d -p 4710 -h 127.0.0.1`.
#[tokio::test]
async fn prism_contract_check() {
    let Ok(url) = std::env::var("CUSTOS_PRISM_HUBSPOT") else {
        return;
    };
    let cfg = HubSpotConfig {
        name: "hubspot-prism".into(),
        base_url: Some(url),
        access_token_env: None,
        access_token_file: None,
        access_token_command: Some("printf pat-na1-test".into()),
        oauth2: None,
        object_types: Some(vec!["contacts".into()]),
        properties: None,
        page_size: Some(100),
        search_limit: Some(200),
        http: Some(HttpOptions {
            max_attempts: Some(1),
            ..Default::default()
        }),
    };
    let conn = HubSpotConnector::new(cfg).unwrap();
    // Prism answers 422 (500 with `Accept: */*`) to a request its spec
    // refuses: every call below must get past request validation (run
    // Prism with `-d`; its answers are generated from the schema, so only
    // the requests are judged: its random paging may repeat a cursor).
    let refused = |r: &Result<()>| matches!(r, Err(e) if e.to_string().contains("HTTP 4") || e.to_string().contains("HTTP 5"));
    let checks: Vec<(&str, Result<()>)> = vec![
        ("check", conn.check().await.map(|_| ())),
        (
            "search",
            conn.search_page("contacts", 1_700_000_000_000, None, 100)
                .await
                .map(|_| ()),
        ),
        (
            "search after",
            conn.search_page("contacts", 0, Some("NTI1Cg%3D%3D"), 100)
                .await
                .map(|_| ()),
        ),
        (
            "archived",
            conn.archived("contacts", 0, true, &mut NullSink)
                .await
                .map(|_| ()),
        ),
        (
            "contacts batch read",
            conn.contact_emails(&["101".to_string()].into(), &mut HashMap::new())
                .await,
        ),
    ];
    for (what, r) in &checks {
        println!("prism hubspot {what}: {r:?}");
    }
    assert!(
        !checks.iter().any(|(_, r)| refused(r)),
        "Prism refused a request"
    );
}

struct NullSink;

#[async_trait]
impl crate::ChangeSink for NullSink {
    async fn push(&mut self, _c: Change) -> Result<()> {
        Ok(())
    }
}
