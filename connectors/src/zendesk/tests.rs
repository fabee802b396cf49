//! Zendesk tests: the conformance suite and connector-specific checks against
//! an in-process stateful mock of the cursor-based incremental ticket export,
//! ticket comments (cursor pagination) and `users/me` (field names as in the
//! Zendesk Support API reference).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::mock::*;
use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::{MockRequest, MockServer};
use crate::http::HttpOptions;

impl State {
    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        let recs = t.collections.entry(COLLECTION.to_string()).or_default();
        for (id, tk) in &self.tickets {
            if tk.v["status"] == "deleted" {
                continue;
            }
            let comments: Vec<String> = tk.comments.iter().map(|c| c.to_string()).collect();
            let payload = format!(
                "{{\"ticket\":{},\"comments\":[{}]}}",
                tk.v,
                comments.join(",")
            );
            let atts: Vec<(String, String)> = tk
                .comments
                .iter()
                .flat_map(|c| c["attachments"].as_array().cloned().unwrap_or_default())
                .map(|a| {
                    (
                        a["file_name"].as_str().unwrap().to_string(),
                        a["content_type"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            recs.insert(
                id.to_string(),
                TruthRecord {
                    digest: digest(payload.as_bytes()),
                    meta: [
                        (
                            "status".to_string(),
                            tk.v["status"].as_str().unwrap().to_string(),
                        ),
                        ("comment_count".to_string(), tk.comments.len().to_string()),
                    ]
                    .into(),
                    attachments: Some(atts),
                },
            );
        }
        t
    }
}

struct ZdFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
}

async fn fixture() -> ZdFx {
    let state = Arc::new(Mutex::new(State::default()));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        s.base = srv.url();
        for u in 20..23u64 {
            s.users.insert(u, json!({"id": u, "name": format!("Customer {u}"), "email": format!("Customer{u}@Example.org"), "role": "end-user"}));
        }
        for _ in 0..8 {
            s.add_ticket();
        }
    }
    ZdFx { state, srv }
}

fn config(srv: &MockServer, token: &str) -> ZendeskConfig {
    ZendeskConfig {
        name: "zendesk-test".into(),
        base_url: Some(srv.url()),
        subdomain: None,
        email: Some(EMAIL.into()),
        api_token_env: None,
        api_token_file: None,
        api_token_command: Some(format!("printf {token}")),
        oauth_token_env: None,
        oauth_token_file: None,
        oauth_token_command: None,
        oauth2: None,
        start_time: None,
        comments: None,
        download_attachments: None,
        attachment_auth_hosts: None,
        http: Some(HttpOptions {
            requests_per_second: Some(10_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

#[async_trait]
impl Fixture for ZdFx {
    fn label(&self) -> String {
        "zendesk".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(ZendeskConnector::new(config(&self.srv, TOKEN)).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            ZendeskConnector::new(config(&self.srv, "wrong")).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        for _ in 0..n {
            s.add_ticket();
        }
        Expect {
            fetched: n,
            ..Default::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s
            .tickets
            .iter()
            .filter(|(_, t)| t.v["status"] != "deleted")
            .map(|(i, _)| *i)
            .take(n)
            .collect();
        for id in &ids {
            s.tickets.get_mut(id).unwrap().v["status"] = json!("deleted");
            s.touch(*id);
        }
        Some(Expect {
            removed: ids.len(),
            ..Default::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<u64> = s
            .tickets
            .iter()
            .filter(|(_, t)| t.v["status"] != "deleted")
            .map(|(i, _)| *i)
            .rev()
            .take(n)
            .collect();
        for id in &ids {
            let c = s.comment(*id, false);
            s.tickets.get_mut(id).unwrap().comments.push(c);
            s.tickets.get_mut(id).unwrap().v["status"] = json!("pending");
            s.touch(*id);
        }
        Some(Expect {
            fetched: ids.len(),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn zendesk_conformance() {
    let mut fx = fixture().await;
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("zendesk conformance:\n{report}");
    let any = h.state[COLLECTION].values().next().unwrap();
    assert_eq!(any.kind, "ticket");
    assert!(
        any.customer_ids
            .iter()
            .all(|c| c.starts_with("email:customer2") && c.ends_with("@example.org")),
        "{:?}",
        any.customer_ids
    );
    assert!(any
        .subject
        .as_deref()
        .is_some_and(|s| s.starts_with("Help with order")));
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
    assert_eq!(fx.srv.count("/api/v2/incremental/tickets/cursor.json"), 1);
    let comment_reqs = |fx: &ZdFx| {
        fx.srv
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/comments.json"))
            .count()
    };
    assert_eq!(comment_reqs(&fx), 0);
    // One new comment on one ticket: one export page, that ticket's comments only.
    {
        let mut s = fx.state.lock().unwrap();
        let c = s.comment(2, false);
        s.tickets.get_mut(&2).unwrap().comments.push(c);
        s.touch(2);
    }
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 1);
    assert_eq!(
        fx.srv.count("/api/v2/tickets/2/comments.json"),
        2,
        "3 comments, pages of 2"
    );
    assert_eq!(comment_reqs(&fx), 2);
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after one comment");
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
    // A ticket without id: skipped with a warning.
    fx.state.lock().unwrap().junk_ticket = true;
    fx.state.lock().unwrap().add_ticket();
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.fetched, 1);
    fx.state.lock().unwrap().junk_ticket = false;
    h.assert_matches(&fx.state.lock().unwrap().truth(), "junk ticket skipped");
    // A server-refused cursor: full export again, same state.
    h.cursors.insert(
        coll.id.clone(),
        json!({"v": 1, "kind": "zendesk", "after_cursor": "expired"}),
    );
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.resets, 1);
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after a refused cursor");
    // Not JSON: Malformed naming the endpoint.
    fx.state.lock().unwrap().broken = true;
    match h.sync_collection(&*conn, &coll, None).await {
        Err(ConnectorError::Malformed { what, detail, .. }) => {
            assert_eq!(what, "GET /api/v2/incremental/tickets/cursor.json");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // 401: a clear Auth error naming the endpoint, without the token.
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.sync(&coll, None, &mut NullSink).await {
        Err(ConnectorError::Auth { detail, .. }) => {
            assert!(
                detail.contains("GET /api/v2/incremental/tickets/cursor.json")
                    && detail.contains("401"),
                "{detail}"
            );
            assert!(!detail.contains("wrong"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

struct NullSink;

#[async_trait]
impl crate::ChangeSink for NullSink {
    async fn push(&mut self, _c: Change) -> Result<()> {
        Ok(())
    }
}

/// Collects upserted tickets' attachments: (ticket, name, content).
#[derive(Default)]
struct AttSink(Vec<(String, String, Option<Vec<u8>>)>);

#[async_trait]
impl crate::ChangeSink for AttSink {
    async fn push(&mut self, c: Change) -> Result<()> {
        if let Change::Upsert(r) = c {
            for a in r.attachments {
                let content = a.content.map(|p| p.into_bytes().unwrap());
                if let Some(b) = &content {
                    assert_eq!(a.size, Some(b.len() as u64), "{}: size", r.id);
                }
                self.0.push((r.id.clone(), a.name, content));
            }
        }
        Ok(())
    }
}

/// The comment id in an attachment request path.
fn att_cid(path: &str) -> u64 {
    path.trim_start_matches("/attachments/token/")
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

fn att_requests(fx: &ZdFx) -> Vec<MockRequest> {
    fx.srv
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/attachments/"))
        .collect()
}

#[tokio::test]
async fn attachments_downloaded_intact_credentials_only_to_the_api_host() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let coll = conn.collections().await.unwrap().remove(0);
    let mut sink = AttSink::default();
    let cur = conn.sync(&coll, None, &mut sink).await.unwrap();
    // Tickets 1 and 5 have one attachment each, on the API host.
    let reqs = att_requests(&fx);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(sink.0.len(), 2);
    for (r, (ticket, name, content)) in reqs.iter().zip(&sink.0) {
        assert_eq!(name, "invoice.pdf", "ticket {ticket}");
        assert_eq!(content.as_deref(), Some(&att_bytes(att_cid(&r.path))[..]));
        assert!(r
            .header("authorization")
            .is_some_and(|a| a.starts_with("Basic ")));
    }
    // An attachment on another host (localhost ≠ 127.0.0.1): fetched
    // without credentials, content intact.
    {
        let mut s = fx.state.lock().unwrap();
        s.att_base = Some(format!("http://localhost:{}", fx.srv.addr.port()));
        assert_eq!(s.add_ticket(), 9, "9 % 4 == 1: with an attachment");
    }
    fx.srv.clear();
    let mut sink = AttSink::default();
    let cur = conn.sync(&coll, Some(&cur), &mut sink).await.unwrap();
    let reqs = att_requests(&fx);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].header("authorization"), None, "credentials leaked");
    assert_eq!(sink.0.len(), 1);
    assert_eq!(sink.0[0].0, "9");
    assert_eq!(
        sink.0[0].2.as_deref(),
        Some(&att_bytes(att_cid(&reqs[0].path))[..])
    );
    // Listed in attachment_auth_hosts: that host gets them.
    let mut cfg = config(&fx.srv, TOKEN);
    cfg.attachment_auth_hosts = Some(vec!["localhost".into()]);
    let conn = ZendeskConnector::new(cfg).unwrap();
    fx.state.lock().unwrap().touch(9);
    fx.srv.clear();
    conn.sync(&coll, Some(&cur), &mut AttSink::default())
        .await
        .unwrap();
    let reqs = att_requests(&fx);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0].header("authorization").is_some());
    // A host with a scheme is refused.
    let mut cfg = config(&fx.srv, TOKEN);
    cfg.attachment_auth_hosts = Some(vec!["https://evil.example".into()]);
    assert!(cfg
        .validate()
        .unwrap_err()
        .contains("attachment_auth_hosts"));
    assert!(ZendeskConnector::new(cfg).is_err());
}

#[tokio::test]
async fn download_attachments_false_downloads_nothing() {
    let fx = fixture().await;
    let mut cfg = config(&fx.srv, TOKEN);
    cfg.download_attachments = Some(false);
    let conn = ZendeskConnector::new(cfg).unwrap();
    let coll = conn.collections().await.unwrap().remove(0);
    let mut sink = AttSink::default();
    conn.sync(&coll, None, &mut sink).await.unwrap();
    assert!(att_requests(&fx).is_empty());
    assert_eq!(sink.0.len(), 2, "still described");
    assert!(sink
        .0
        .iter()
        .all(|(_, n, c)| n == "invoice.pdf" && c.is_none()));
}

/// A `Write` into a shared buffer, for capturing log lines.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn gone_attachment_is_skipped_with_a_warning() {
    let fx = fixture().await;
    fx.state.lock().unwrap().att_gone = true;
    let logs = LogBuf::default();
    let w = logs.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _g = tracing::subscriber::set_default(sub);
    let conn = fx.connector().await;
    let coll = conn.collections().await.unwrap().remove(0);
    let mut h = Harness::new();
    let s = h.sync_collection(&*conn, &coll, None).await.unwrap();
    assert_eq!(s.fetched, 8, "the sync goes on");
    h.assert_matches(&fx.state.lock().unwrap().truth(), "404 attachments");
    assert_eq!(att_requests(&fx).len(), 2);
    let stored = &h.state[COLLECTION]["1"].attachments;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].3, None, "no content");
    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    for t in ["1", "5"] {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains(&format!("ticket={t}"))
                && l.contains("file=invoice.pdf")
                && l.contains("404")),
            "{log}"
        );
    }
}
