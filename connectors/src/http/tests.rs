//! HTTP layer tests against the in-process mock server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::mock::{MockRequest, MockResponse, MockServer};
use super::*;

fn fast() -> HttpOptions {
    HttpOptions {
        backoff_base_ms: Some(10),
        max_attempts: Some(4),
        ..Default::default()
    }
}

fn client(srv: &MockServer, opts: &HttpOptions, auth: Auth) -> HttpClient {
    HttpClient::new("test-src", &format!("{}/api", srv.url()), opts, None, auth).unwrap()
}

#[tokio::test]
async fn retry_after_429_is_honoured() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let srv = MockServer::start(move |_| {
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            MockResponse::json(429, &json!({"error": "slow down"})).header("retry-after", "1")
        } else {
            MockResponse::json(200, &json!({"ok": true}))
        }
    })
    .await;
    let c = client(&srv, &fast(), Auth::None);
    let t = Instant::now();
    let r = c.json(&c.get("thing").unwrap()).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.value["ok"], true);
    assert_eq!(srv.count("/api/thing"), 2);
}

#[tokio::test]
async fn matrix_retry_after_ms_and_too_long_waits() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let srv = MockServer::start(move |r| {
        if r.path.ends_with("/long") {
            return MockResponse::json(429, &json!({})).header("retry-after", "3600");
        }
        if n2.fetch_add(1, Ordering::SeqCst) == 0 {
            MockResponse::json(
                429,
                &json!({"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 300}),
            )
        } else {
            MockResponse::json(200, &json!({"chunk": []}))
        }
    })
    .await;
    let c = client(&srv, &fast(), Auth::None);
    let t = Instant::now();
    c.json(&c.get("sync").unwrap()).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    // A wait beyond max_wait_secs fails at once, naming the endpoint.
    let t = Instant::now();
    let e = c.json(&c.get("long").unwrap()).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5));
    let msg = e.to_string();
    assert!(
        msg.contains("GET /api/long") && msg.contains("3600"),
        "{msg}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let srv = MockServer::start(move |_| match n2.fetch_add(1, Ordering::SeqCst) {
        0 => MockResponse::raw(503, "text/plain", b"busy".to_vec()),
        1 => MockResponse::raw(502, "text/plain", b"bad gw".to_vec()),
        _ => MockResponse::json(200, &json!({"v": 1})),
    })
    .await;
    let c = client(&srv, &fast(), Auth::None);
    let r = c.json(&c.get("x").unwrap()).await.unwrap();
    assert_eq!(r.value["v"], 1);
    assert_eq!(srv.count("/api/x"), 3);
}

#[tokio::test]
async fn final_failure_names_endpoint_and_status_not_secrets() {
    let srv =
        MockServer::start(|_| MockResponse::json(503, &json!({"error": "maintenance"}))).await;
    let c = client(&srv, &fast(), Auth::Bearer(Secret::value("xoxb-SECRET")));
    let spec = c
        .get("conversations.list")
        .unwrap()
        .query("token", "xoxp-QUERYSECRET");
    let e = c.json(&spec).await.unwrap_err();
    assert_eq!(e.status(), Some(503));
    assert_eq!(srv.count("/api/conversations.list"), 4);
    let ce = c.err(e);
    let msg = ce.to_string();
    assert!(matches!(ce, ConnectorError::Unavailable { .. }), "{ce:?}");
    assert!(msg.contains("test-src"), "{msg}");
    assert!(msg.contains("GET /api/conversations.list"), "{msg}");
    assert!(msg.contains("503") && msg.contains("maintenance"), "{msg}");
    assert!(!msg.contains("SECRET"), "{msg}");
    // A 404 is not retried.
    let srv = MockServer::start(|_| MockResponse::json(404, &json!({"error": "nope"}))).await;
    let c = client(&srv, &fast(), Auth::None);
    let e = c.json(&c.get("gone").unwrap()).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    assert_eq!(srv.count("/api/gone"), 1);
}

#[tokio::test]
async fn connection_errors_are_retried_and_named() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let c = HttpClient::new(
        "nowhere",
        &format!("http://127.0.0.1:{port}/"),
        &fast(),
        None,
        Auth::None,
    )
    .unwrap();
    let e = c.json(&c.get("x").unwrap()).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("GET /x") && msg.contains("after 4 attempts"),
        "{msg}"
    );
}

#[derive(Default)]
struct OAuthState {
    valid_access: String,
    refresh_ok: bool,
    grants: Vec<(String, Option<String>)>,
    api_auth: Vec<String>,
}

async fn oauth_server(state: Arc<Mutex<OAuthState>>) -> MockServer {
    MockServer::start(move |r: &MockRequest| {
        let mut st = state.lock().unwrap();
        if r.path == "/oauth/token" {
            let f = r.form();
            st.grants.push((
                f.get("grant_type").cloned().unwrap_or_default(),
                f.get("refresh_token").cloned(),
            ));
            if !st.refresh_ok {
                return MockResponse::json(400, &json!({"error": "invalid_grant"}));
            }
            let n = st.grants.len();
            st.valid_access = format!("access-{n}");
            return MockResponse::json(
                200,
                &json!({"access_token": st.valid_access, "token_type": "bearer",
                        "expires_in": 3600, "refresh_token": format!("refresh-{n}")}),
            );
        }
        let a = r.header("authorization").unwrap_or_default().to_string();
        st.api_auth.push(a.clone());
        if a == format!("Bearer {}", st.valid_access) {
            MockResponse::json(200, &json!({"me": "ok"}))
        } else {
            MockResponse::json(401, &json!({"error": "invalid_token"}))
        }
    })
    .await
}

fn oauth_cfg(srv: &MockServer, token_file: &std::path::Path) -> OAuth2Config {
    OAuth2Config {
        token_url: format!("{}/oauth/token", srv.url()),
        client_id: "cid".into(),
        client_secret_env: None,
        client_secret_file: None,
        client_secret_command: Some("printf client-secret".into()),
        refresh_token_env: None,
        refresh_token_file: None,
        refresh_token_command: Some("printf refresh-0".into()),
        token_file: Some(token_file.to_path_buf()),
        scope: None,
    }
}

#[tokio::test]
async fn oauth_401_refreshes_and_saves_the_rotated_token() {
    let state = Arc::new(Mutex::new(OAuthState {
        refresh_ok: true,
        ..Default::default()
    }));
    let srv = oauth_server(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    let c = client(
        &srv,
        &fast(),
        Auth::OAuth2(oauth_cfg(&srv, &tf).build().unwrap()),
    );
    // First use: refresh-0 → access-1, refresh-1 saved.
    c.json(&c.get("me").unwrap()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&tf).unwrap(), "refresh-1\n");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&tf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    // The server revokes the access token: the 401 triggers one refresh.
    state.lock().unwrap().valid_access = "revoked-elsewhere".into();
    let r = c.json(&c.get("me").unwrap()).await;
    // The refresh issued access-2, which the server now accepts.
    assert!(r.is_ok(), "{r:?}");
    {
        let st = state.lock().unwrap();
        assert_eq!(
            st.grants,
            vec![
                ("refresh_token".to_string(), Some("refresh-0".to_string())),
                ("refresh_token".to_string(), Some("refresh-1".to_string())),
            ]
        );
        assert_eq!(
            st.api_auth,
            vec!["Bearer access-1", "Bearer access-1", "Bearer access-2"]
        );
    }
    assert_eq!(std::fs::read_to_string(&tf).unwrap(), "refresh-2\n");
    // A new client (restart) starts from the saved token, not the configured one.
    let c2 = client(
        &srv,
        &fast(),
        Auth::OAuth2(oauth_cfg(&srv, &tf).build().unwrap()),
    );
    c2.json(&c2.get("me").unwrap()).await.unwrap();
    assert_eq!(
        state.lock().unwrap().grants.last().unwrap().1.as_deref(),
        Some("refresh-2")
    );
}

#[tokio::test]
async fn oauth_client_credentials_grant() {
    let state = Arc::new(Mutex::new(OAuthState {
        refresh_ok: true,
        ..Default::default()
    }));
    let srv = oauth_server(state.clone()).await;
    let mut cfg = oauth_cfg(&srv, std::path::Path::new("/nonexistent/x"));
    cfg.refresh_token_command = None;
    cfg.token_file = None;
    let c = client(&srv, &fast(), Auth::OAuth2(cfg.build().unwrap()));
    c.json(&c.get("me").unwrap()).await.unwrap();
    assert_eq!(
        state.lock().unwrap().grants,
        vec![("client_credentials".to_string(), None)]
    );
}

#[tokio::test]
async fn refresh_failure_is_an_auth_error() {
    let state = Arc::new(Mutex::new(OAuthState::default()));
    let srv = oauth_server(state.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let c = client(
        &srv,
        &fast(),
        Auth::OAuth2(oauth_cfg(&srv, &dir.path().join("t")).build().unwrap()),
    );
    let e = c.err(c.json(&c.get("me").unwrap()).await.unwrap_err());
    match &e {
        ConnectorError::Auth {
            source_name,
            detail,
        } => {
            assert_eq!(source_name, "test-src");
            assert!(detail.contains("POST /oauth/token"), "{detail}");
            assert!(detail.contains("invalid_grant"), "{detail}");
            assert!(!detail.contains("refresh-0"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // Plain bearer refused: Auth naming the endpoint.
    let c = client(&srv, &fast(), Auth::Bearer(Secret::value("wrong")));
    let e = c.err(c.json(&c.get("me").unwrap()).await.unwrap_err());
    assert!(
        matches!(&e, ConnectorError::Auth { detail, .. } if detail.contains("GET /api/me") && detail.contains("401")),
        "{e:?}"
    );
}

#[tokio::test]
async fn basic_auth_and_auth_hosts() {
    let srv =
        MockServer::start(|r| MockResponse::json(200, &json!({"auth": r.header("authorization")})))
            .await;
    let c = client(
        &srv,
        &fast(),
        Auth::Basic {
            username: "agent@example.org/token".into(),
            password: Secret::value("tok"),
        },
    );
    let r = c.json(&c.get("x").unwrap()).await.unwrap();
    assert_eq!(
        r.value["auth"],
        "Basic YWdlbnRAZXhhbXBsZS5vcmcvdG9rZW46dG9r" // agent@example.org/token:tok
    );
    // Another host (localhost ≠ 127.0.0.1) gets no credentials.
    let other = format!("http://localhost:{}/x", srv.addr.port());
    let r = c.json(&c.get(&other).unwrap()).await.unwrap();
    assert_eq!(r.value["auth"], serde_json::Value::Null);
}

#[tokio::test]
async fn token_bucket_spaces_requests() {
    let srv = MockServer::start(|_| MockResponse::json(200, &json!({}))).await;
    let opts = HttpOptions {
        requests_per_second: Some(20.0),
        burst: Some(1),
        ..fast()
    };
    let c = client(&srv, &opts, Auth::None);
    let t = Instant::now();
    for _ in 0..6 {
        c.json(&c.get("x").unwrap()).await.unwrap();
    }
    // 1 immediate + 5 spaced by 50 ms.
    assert!(
        t.elapsed() >= Duration::from_millis(245),
        "{:?}",
        t.elapsed()
    );
    let b = TokenBucket::new(10.0, 3);
    assert_eq!(b.reserve(), Duration::ZERO);
    assert_eq!(b.reserve(), Duration::ZERO);
    assert_eq!(b.reserve(), Duration::ZERO);
    let w = b.reserve();
    assert!(
        w > Duration::from_millis(80) && w <= Duration::from_millis(100),
        "{w:?}"
    );
    let w = b.reserve();
    assert!(
        w > Duration::from_millis(180) && w <= Duration::from_millis(200),
        "{w:?}"
    );
}

const ITEMS: usize = 23;

fn page_of(from: usize, n: usize) -> Vec<serde_json::Value> {
    (from..(from + n).min(ITEMS))
        .map(|i| json!({"id": i}))
        .collect()
}

async fn collect(c: &HttpClient, mut p: Pager, items: &str) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(page) = p.next_page(c).await.unwrap() {
        for it in json_path(&page.value, items).unwrap().as_array().unwrap() {
            out.push(it["id"].as_u64().unwrap());
        }
    }
    out
}

#[tokio::test]
async fn pagination_styles() {
    let srv = MockServer::start(|r| {
        let at = |k: &str| r.q(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        match r.path.as_str() {
            "/api/cursor" => {
                let from = at("cursor");
                let next = if from + 5 < ITEMS { (from + 5).to_string() } else { String::new() };
                MockResponse::json(
                    200,
                    &json!({"items": page_of(from, 5), "response_metadata": {"next_cursor": next}}),
                )
            }
            "/api/link" => {
                let from = at("page") * 5;
                let mut resp = MockResponse::json(200, &json!(page_of(from, 5)));
                if from + 5 < ITEMS {
                    resp = resp.header(
                        "link",
                        &format!("</api/link?page={}>; rel=\"next\", </api/link?page=0>; rel=\"first\"", at("page") + 1),
                    );
                }
                resp
            }
            "/api/offset" => MockResponse::json(
                200,
                &json!({"data": page_of(at("offset"), at("limit"))}),
            ),
            "/api/next" => {
                let from = at("p");
                let more = from + 5 < ITEMS;
                MockResponse::json(
                    200,
                    &json!({"tickets": page_of(from, 5), "meta": {"has_more": more},
                            "links": {"next": format!("http://{}/api/next?p={}", r.header("host").unwrap(), from + 5)}}),
                )
            }
            _ => MockResponse::json(404, &json!({})),
        }
    })
    .await;
    let c = client(&srv, &fast(), Auth::None);
    let all: Vec<u64> = (0..ITEMS as u64).collect();
    let p = Pager::new(
        PageStyle::CursorField {
            param: "cursor".into(),
            path: "response_metadata.next_cursor".into(),
        },
        c.get("cursor").unwrap(),
    );
    assert_eq!(collect(&c, p, "items").await, all);
    let p = Pager::new(PageStyle::LinkHeader, c.get("link").unwrap());
    assert_eq!(collect(&c, p, "").await, all);
    let p = Pager::new(
        PageStyle::Offset {
            offset_param: "offset".into(),
            limit_param: "limit".into(),
            limit: 5,
            items: "data".into(),
        },
        c.get("offset").unwrap(),
    );
    assert_eq!(collect(&c, p, "data").await, all);
    let p = Pager::new(
        PageStyle::NextUrl {
            path: "links.next".into(),
            has_more: Some("meta.has_more".into()),
        },
        c.get("next").unwrap(),
    );
    assert_eq!(collect(&c, p, "tickets").await, all);
    assert_eq!(srv.count("/api/next"), 5);
}

#[tokio::test]
async fn repeated_cursor_stops_instead_of_looping() {
    let srv =
        MockServer::start(|_| MockResponse::json(200, &json!({"items": [], "next": "same"}))).await;
    let c = client(&srv, &fast(), Auth::None);
    let mut p = Pager::new(
        PageStyle::CursorField {
            param: "cursor".into(),
            path: "next".into(),
        },
        c.get("loop").unwrap(),
    );
    let mut err = None;
    for _ in 0..10 {
        match p.next_page(&c).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let e = err.expect("a loop error");
    assert!(e.to_string().contains("same next page"), "{e}");
}

#[tokio::test]
async fn malformed_json_is_a_named_error() {
    let srv = MockServer::start(|r| match r.path.as_str() {
        "/api/broken" => MockResponse::raw(200, "application/json", b"{\"ok\": tru".to_vec()),
        _ => MockResponse::json(200, &json!({"messages": [{"ts": 5}]})),
    })
    .await;
    let c = client(&srv, &fast(), Auth::None);
    let e = c.err(c.json(&c.get("broken").unwrap()).await.unwrap_err());
    match &e {
        ConnectorError::Malformed { what, detail, .. } => {
            assert_eq!(what, "GET /api/broken");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let r = c.json(&c.get("typed").unwrap()).await.unwrap();
    let e = take_at::<String>("GET /api/typed", &r.value, "messages.0.ts").unwrap_err();
    assert!(e.to_string().contains("$.messages.0.ts"), "{e}");
    let e = take_at::<String>("GET /api/typed", &r.value, "response_metadata").unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
}

#[tokio::test]
async fn api_level_verdicts() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let srv = MockServer::start(move |r| match r.path.as_str() {
        "/api/rl" => {
            if n2.fetch_add(1, Ordering::SeqCst) == 0 {
                MockResponse::json(200, &json!({"ok": false, "error": "ratelimited"}))
                    .header("retry-after", "1")
            } else {
                MockResponse::json(200, &json!({"ok": true}))
            }
        }
        _ => MockResponse::json(200, &json!({"ok": false, "error": "invalid_auth"})),
    })
    .await;
    fn check(v: &serde_json::Value) -> Verdict {
        match v["error"].as_str() {
            Some("ratelimited") => Verdict::Retry {
                after: None,
                reason: "ratelimited".into(),
            },
            Some("invalid_auth") => Verdict::Auth("invalid_auth".into()),
            Some(e) => Verdict::Fail(e.into()),
            None => Verdict::Ok,
        }
    }
    let c = client(&srv, &fast(), Auth::None);
    let t = Instant::now();
    c.json(&c.get("rl").unwrap().check(check)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    let e = c.err(
        c.json(&c.get("auth").unwrap().check(check))
            .await
            .unwrap_err(),
    );
    assert!(matches!(e, ConnectorError::Auth { .. }), "{e:?}");
}

#[tokio::test]
async fn downloads_are_spooled() {
    let srv = MockServer::start(|_| MockResponse::raw(200, "image/png", vec![7u8; 100_000])).await;
    let c = client(&srv, &fast(), Auth::Bearer(Secret::value("t")));
    let d = c
        .download(&format!("{}/files/a.png", srv.url()))
        .await
        .unwrap();
    assert_eq!(d.size, 100_000);
    assert_eq!(d.content_type.as_deref(), Some("image/png"));
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut { d.file }, &mut v).unwrap();
    assert_eq!(v, vec![7u8; 100_000]);
    assert_eq!(srv.requests()[0].header("authorization"), Some("Bearer t"));
}

#[test]
fn secrets_do_not_show_in_debug() {
    let s = Secret::value("hunter2");
    assert!(!format!("{s:?}").contains("hunter2"));
    let a = Auth::Bearer(Secret::from_ref(crate::SecretRef::Env("X".into())));
    assert!(format!("{a:?}").contains("environment variable X"));
}
