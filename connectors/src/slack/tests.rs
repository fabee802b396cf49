//! Slack Web API tests: the conformance suite and connector-specific checks
//! against an in-process stateful mock of `auth.test`, `conversations.list`,
//! `conversations.history`, `conversations.replies`, `users.list` and file
//! downloads (fields as in Slack's Web API reference).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::mock::*;
use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::MockServer;
use crate::http::HttpOptions;

impl State {
    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        for c in &self.chans {
            let recs = t.collections.entry(c.id.clone()).or_default();
            for (ts, m) in &c.msgs {
                let atts =
                    m.v.get("files")
                        .map(|_| vec![("report.pdf".to_string(), "application/pdf".to_string())]);
                recs.insert(
                    record_id(ts),
                    TruthRecord {
                        digest: digest(m.v.to_string().as_bytes()),
                        meta: [("ts".to_string(), ts.clone())].into(),
                        attachments: atts,
                    },
                );
                for (rts, rv) in &m.replies {
                    recs.insert(
                        record_id(rts),
                        TruthRecord {
                            digest: digest(rv.to_string().as_bytes()),
                            meta: [("thread_ts".to_string(), ts.clone())].into(),
                            attachments: None,
                        },
                    );
                }
            }
        }
        t
    }
}

struct SlackFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
    rr: usize,
}

async fn fixture() -> SlackFx {
    let state = Arc::new(Mutex::new(State::default()));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        s.base = srv.url();
        s.clock = chrono::Utc::now().timestamp() - 3 * 86400;
        s.users = (1..=3).map(|i| json!({"id": format!("U{i}"), "name": format!("user{i}"), "real_name": format!("User {i}"),
            "profile": {"email": format!("User{i}@Example.org"), "real_name": format!("User {i}")}})).collect();
        s.users.push(json!({"name": "no id: skipped"}));
        for (id, name) in [("C01SUPPORT", "support"), ("C02SALES", "sales")] {
            s.chans.push(Chan {
                id: id.into(),
                name: name.into(),
                ..Default::default()
            });
        }
        for i in 0..7 {
            s.add_message(i % 2, i == 3);
        }
        let parent = s.chans[0].msgs.keys().next().unwrap().clone();
        for _ in 0..4 {
            s.add_reply(0, &parent);
        }
    }
    SlackFx { state, srv, rr: 0 }
}

fn config(srv: &MockServer, token: &str) -> SlackConfig {
    SlackConfig {
        name: "slack-test".into(),
        base_url: Some(format!("{}/api/", srv.url())),
        token_env: None,
        token_file: None,
        token_command: Some(format!("printf {token}")),
        channels: None,
        types: None,
        recent_window_hours: Some(1),
        thread_lookback_days: Some(14),
        resolve_users: None,
        download_files: None,
        http: Some(HttpOptions {
            requests_per_second: Some(10_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

#[async_trait]
impl Fixture for SlackFx {
    fn label(&self) -> String {
        "slack".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(SlackConnector::new(config(&self.srv, TOKEN)).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            SlackConnector::new(config(&self.srv, "xoxb-revoked")).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        // All into one channel per call (alternating), so that an
        // interrupted sync has more than `fail_after` changes in one.
        self.rr += 1;
        for _ in 0..n {
            s.add_message(self.rr % 2, false);
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
async fn slack_conformance() {
    let mut fx = fixture().await;
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("slack conformance:\n{report}");
    // Customer ids from users.list e-mails; file content downloaded.
    let support = &h.state["C01SUPPORT"];
    assert!(support.values().any(|r| r
        .customer_ids
        .iter()
        .any(|c| c.starts_with("email:user") && c.ends_with("@example.org"))));
    let with_file = h
        .state
        .values()
        .flat_map(|c| c.values())
        .find(|r| !r.attachments.is_empty())
        .unwrap();
    let (_, _, size, streamed) = &with_file.attachments[0];
    assert!(
        streamed.is_some() && size == streamed,
        "{:?}",
        with_file.attachments
    );
}

#[tokio::test]
async fn incremental_sync_fetches_only_changes_and_new_replies_on_old_threads() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let mut h = Harness::new();
    h.sync_all(&*conn).await.unwrap();
    assert!(fx.srv.count("/files-pri/T1-F4/download/report.pdf") == 1);
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 0, "{s:?}");
    assert_eq!(fx.srv.count("/api/conversations.history"), 2);
    assert_eq!(fx.srv.count("/api/conversations.replies"), 0);
    assert_eq!(
        fx.srv.count("/api/users.list"),
        0,
        "users are cached per instance"
    );
    assert_eq!(
        fx.srv
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/files-pri"))
            .count(),
        0
    );
    // A new reply on a 3-day-old thread (outside the 1 h window, inside the look-back).
    let (parent, last) = {
        let s = fx.state.lock().unwrap();
        let (p, m) = s.chans[0].msgs.iter().next().unwrap();
        (p.clone(), m.replies.keys().last().unwrap().clone())
    };
    let new_reply = fx.state.lock().unwrap().add_reply(0, &parent);
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 2, "only the new reply and its parent: {s:?}");
    let reqs = fx.srv.requests();
    let replies: Vec<_> = reqs
        .iter()
        .filter(|r| r.path == "/api/conversations.replies")
        .collect();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].q("oldest"), Some(last.as_str()));
    assert!(h.state["C01SUPPORT"].contains_key(&record_id(&new_reply)));
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after new reply");
}

#[tokio::test]
async fn recent_window_reports_edits_and_deletions() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let mut h = Harness::new();
    let recent: Vec<String> = {
        let mut s = fx.state.lock().unwrap();
        s.clock = chrono::Utc::now().timestamp() - 600;
        (0..3).map(|_| s.add_message(1, false)).collect()
    };
    h.sync_all(&*conn).await.unwrap();
    {
        let mut s = fx.state.lock().unwrap();
        let m = s.chans[1].msgs.get_mut(&recent[0]).unwrap();
        m.v["text"] = json!("edited text");
        m.v["edited"] = json!({"user": "U1", "ts": "1700000000.000000"});
        s.chans[1].msgs.remove(&recent[1]);
    }
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!((s.fetched, s.deletes), (1, 1), "{s:?}");
    h.assert_matches(
        &fx.state.lock().unwrap().truth(),
        "after edit + delete in the window",
    );
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!((s.fetched, s.deletes), (0, 0), "{s:?}");
}

#[tokio::test]
async fn rate_limits_are_honoured() {
    let fx = fixture().await;
    let conn = fx.connector().await;
    let colls = conn.collections().await.unwrap();
    let mut h = Harness::new();
    fx.state.lock().unwrap().rl_http = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &colls[0], None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "HTTP 429 Retry-After: {:?}",
        t.elapsed()
    );
    fx.state.lock().unwrap().rl_ok_false = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &colls[1], None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "ok:false ratelimited: {:?}",
        t.elapsed()
    );
    h.assert_matches(&fx.state.lock().unwrap().truth(), "after rate limits");
}

#[tokio::test]
async fn bad_token_and_malformed_answers() {
    let fx = fixture().await;
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.check().await {
        Err(ConnectorError::Auth {
            source_name,
            detail,
        }) => {
            assert_eq!(source_name, "slack-test");
            assert!(
                detail.contains("invalid_auth") && detail.contains("GET /api/auth.test"),
                "{detail}"
            );
            assert!(!detail.contains("xoxb"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let conn = fx.connector().await;
    let colls = conn.collections().await.unwrap();
    // A message without ts is skipped with a warning; the rest is synced.
    fx.state.lock().unwrap().junk_message = true;
    let mut h = Harness::new();
    h.sync_all(&*conn).await.unwrap();
    h.assert_matches(&fx.state.lock().unwrap().truth(), "junk message skipped");
    // Broken JSON: a Malformed error naming the method, no panic.
    fx.state.lock().unwrap().broken_history = true;
    match h.sync_collection(&*conn, &colls[0], None).await {
        Err(ConnectorError::Malformed { what, .. }) => {
            assert_eq!(what, "GET /api/conversations.history")
        }
        other => panic!("{other:?}"),
    }
}

/// Optional contract check, skipped unless `CUSTOS_PRISM_SLACK` names a
/// running Stoplight Prism mock of Slack's Web API spec as corrected by
/// `scripts/slack-prism-spec.py` (the published spec requires `auth.test`'s
/// token in a header named `token`; nothing else is changed). Run by
/// `scripts/contract-check.sh`. A full and an incremental sync (plus
/// `check`) go through [`PrismProxy`]: every request must pass Prism's
/// validation, and `auth.test`, `conversations.list`, `users.list`,
/// `conversations.history` and `conversations.replies` (first pages, cursor
/// pages, `oldest`) must have been requested. The proxy ends each cursor
/// walk after its second page (Prism's static answers repeat their cursor)
/// and makes the first message of every history page a thread parent whose
/// `latest_reply` moves, so the incremental sync asks for new replies.
#[tokio::test]
async fn prism_contract_check() {
    use crate::http::prism::PrismProxy;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let Ok(url) = std::env::var("CUSTOS_PRISM_SLACK") else {
        return;
    };
    let n = Arc::new(AtomicUsize::new(0));
    let proxy = PrismProxy::start(&url, move |ex, a| {
        let v = &mut a.body;
        if ex.has("cursor") {
            if let Some(m) = v.get_mut("response_metadata") {
                m["next_cursor"] = json!("");
            }
        }
        if ex.path.ends_with("/conversations.history") {
            if let Some(m) = v.pointer_mut("/messages/0") {
                let i = n.fetch_add(1, Ordering::SeqCst);
                m["thread_ts"] = m["ts"].clone();
                m["reply_count"] = json!(3);
                m["latest_reply"] = json!(format!("1512090000.{i:06}"));
            }
        }
    })
    .await;
    let cfg = SlackConfig {
        name: "slack-prism".into(),
        base_url: Some(format!("{}/", proxy.url())),
        token_env: None,
        token_file: None,
        token_command: Some("printf xoxb-test".into()),
        channels: None,
        types: None,
        recent_window_hours: Some(24 * 365 * 10),
        thread_lookback_days: Some(365 * 10),
        resolve_users: Some(true),
        download_files: Some(false),
        http: Some(HttpOptions {
            max_attempts: Some(1),
            requests_per_second: Some(1000.0),
            ..Default::default()
        }),
    };
    let conn = SlackConnector::new(cfg).unwrap();
    let check = conn.check().await;
    println!("prism slack check: {check:?}");
    let mut h = Harness::new();
    let full = h.sync_all(&conn).await;
    println!("prism slack full sync: {full:?}");
    let incremental = h.sync_all(&conn).await;
    println!("prism slack incremental sync: {incremental:?}");
    proxy.assert_valid(
        "slack",
        &[
            ("/auth.test", &[]),
            ("/conversations.list", &["types", "limit"]),
            ("/conversations.list", &["cursor"]),
            ("/users.list", &["limit"]),
            ("/users.list", &["cursor"]),
            ("/conversations.history", &["channel", "limit"]),
            ("/conversations.history", &["cursor"]),
            ("/conversations.history", &["oldest"]),
            ("/conversations.replies", &["channel", "ts", "limit"]),
            ("/conversations.replies", &["cursor"]),
            ("/conversations.replies", &["oldest"]),
        ],
    );
    check.unwrap();
    full.unwrap();
    incremental.unwrap();
    assert!(!h.is_empty(), "the full sync stored no message");
}
