//! Matrix tests: the conformance suite and error handling against an
//! in-process stateful mock of the client-server API (`/sync` with filter
//! and `since`, `limited` timelines, `/messages` backfill with `to`,
//! `/event`, redactions, `m.replace` edits with bundled aggregations), and
//! the same checks against a real Synapse when `CUSTOS_TEST_MATRIX_URL` is
//! set (scripts/services/synapse.sh; required with `CUSTOS_REQUIRE_MATRIX=1`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::http::mock::{MockRequest, MockResponse, MockServer};

const TOKEN: &str = "syt_mock_token";
const ROOMS: [&str; 2] = ["!support:mock", "!sales:mock"];

#[derive(Default)]
struct State {
    /// room → (stream position, event)
    events: BTreeMap<String, Vec<(u64, Value)>>,
    pos: u64,
    encrypted: Vec<String>,
    rl: usize,
    broken: bool,
    n: u64,
}

fn err(status: u16, code: &str) -> MockResponse {
    MockResponse::json(status, &json!({"errcode": code, "error": code}))
}

impl State {
    fn push(&mut self, room: &str, mut ev: Value) -> String {
        self.pos += 1;
        let id = format!("$ev{}-{}", self.pos, room.len());
        ev["event_id"] = json!(id);
        ev["room_id"] = json!(room);
        ev["origin_server_ts"] = json!(1_700_000_000_000u64 + self.pos * 1000);
        ev["unsigned"] = json!({});
        let p = self.pos;
        self.events
            .entry(room.to_string())
            .or_default()
            .push((p, ev));
        id
    }

    fn message(&mut self, room: &str) -> String {
        self.n += 1;
        let sender = if self.n.is_multiple_of(2) {
            "@ana:mock"
        } else {
            "@bob:mock"
        };
        let n = self.n;
        self.push(
            room,
            json!({"type": "m.room.message", "sender": sender,
            "content": {"msgtype": "m.text", "body": format!("message {n} ünïcode")}}),
        )
    }

    fn find(&mut self, id: &str) -> Option<&mut Value> {
        self.events
            .values_mut()
            .flat_map(|v| v.iter_mut())
            .map(|(_, e)| e)
            .find(|e| e["event_id"] == id)
    }

    fn live(&self, room: &str) -> Vec<String> {
        self.events
            .get(room)
            .into_iter()
            .flatten()
            .filter(|(_, e)| {
                e["type"] == "m.room.message"
                    && e["unsigned"].get("redacted_because").is_none()
                    && e["content"].get("m.relates_to").is_none()
            })
            .map(|(_, e)| e["event_id"].as_str().unwrap().to_string())
            .collect()
    }

    fn redact(&mut self, room: &str, id: &str) {
        let rid = self.push(room, json!({"type": "m.room.redaction", "sender": "@ana:mock", "redacts": id, "content": {}}));
        let e = self.find(id).unwrap();
        e["content"] = json!({});
        e["unsigned"]["redacted_because"] = json!({"event_id": rid});
    }

    fn edit(&mut self, room: &str, id: &str) {
        let eid = self.push(room, json!({"type": "m.room.message", "sender": "@ana:mock",
            "content": {"msgtype": "m.text", "body": "* edited", "m.new_content": {"msgtype": "m.text", "body": "edited"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": id}}}));
        let e = self.find(id).unwrap();
        e["unsigned"]["m.relations"] = json!({"m.replace": {"event_id": eid}});
    }

    fn handle(&mut self, r: &MockRequest) -> MockResponse {
        if r.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
            return MockResponse::json(
                401,
                &json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": false}),
            );
        }
        if self.rl > 0 {
            self.rl -= 1;
            return MockResponse::json(
                429,
                &json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": 1200}),
            );
        }
        let path = percent_decode_str(&r.path)
            .decode_utf8()
            .unwrap()
            .to_string();
        let Some(rest) = path.strip_prefix("/_matrix/client/v3/") else {
            return err(404, "M_UNRECOGNIZED");
        };
        if rest == "account/whoami" {
            return MockResponse::json(200, &json!({"user_id": "@custos:mock"}));
        }
        if rest == "joined_rooms" {
            return MockResponse::json(200, &json!({"joined_rooms": ROOMS}));
        }
        if rest == "sync" {
            if self.broken {
                return MockResponse::raw(200, "application/json", b"{\"next_batch\": ".to_vec());
            }
            let filter: Value = serde_json::from_str(r.q("filter").unwrap_or("{}")).unwrap();
            let room = filter["room"]["rooms"][0].as_str().unwrap().to_string();
            let limit = filter["room"]["timeline"]["limit"].as_u64().unwrap_or(10) as usize;
            let since = match r.q("since") {
                None => 0,
                Some(s) => match s.strip_prefix('s').and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) => n,
                    None => return err(400, "M_UNKNOWN"),
                },
            };
            let evs: Vec<&(u64, Value)> = self
                .events
                .get(&room)
                .into_iter()
                .flatten()
                .filter(|(p, _)| *p > since)
                .collect();
            let limited = evs.len() > limit;
            let shown = &evs[evs.len().saturating_sub(limit)..];
            let mut rooms = json!({});
            if !shown.is_empty() {
                let prev = shown[0].0 - 1;
                rooms = json!({"join": {room.clone(): {"timeline": {
                    "events": shown.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
                    "limited": limited, "prev_batch": format!("t{prev}")}}}});
            }
            return MockResponse::json(
                200,
                &json!({"next_batch": format!("s{}", self.pos), "rooms": rooms}),
            );
        }
        let Some(rest) = rest.strip_prefix("rooms/") else {
            return err(404, "M_UNRECOGNIZED");
        };
        let (room, what) = rest.split_once('/').unwrap();
        if what == "state/m.room.name/" {
            return MockResponse::json(
                200,
                &json!({"name": room.trim_start_matches('!').split(':').next().unwrap()}),
            );
        }
        if what == "state/m.room.encryption/" {
            if self.encrypted.iter().any(|e| e == room) {
                return MockResponse::json(200, &json!({"algorithm": "m.megolm.v1.aes-sha2"}));
            }
            return err(404, "M_NOT_FOUND");
        }
        if let Some(id) = what.strip_prefix("event/") {
            return match self.find(id) {
                Some(e) => MockResponse::json(200, e),
                None => err(404, "M_NOT_FOUND"),
            };
        }
        if what == "messages" {
            let tok = |s: Option<&str>| -> Option<u64> {
                s.and_then(|s| s.get(1..)).and_then(|n| n.parse().ok())
            };
            let from = tok(r.q("from")).unwrap();
            let to = tok(r.q("to")).unwrap_or(0);
            let limit: usize = r.q("limit").unwrap().parse().unwrap();
            let chunk: Vec<&(u64, Value)> = self
                .events
                .get(room)
                .into_iter()
                .flatten()
                .rev()
                .filter(|(p, _)| *p <= from && *p > to)
                .take(limit)
                .collect();
            let mut ans = json!({"chunk": chunk.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(), "start": format!("t{from}")});
            if let Some(last) = chunk.last() {
                ans["end"] = json!(format!("t{}", last.0 - 1));
            }
            return MockResponse::json(200, &ans);
        }
        err(404, "M_UNRECOGNIZED")
    }

    fn truth(&self) -> Truth {
        let mut t = Truth::default();
        for room in ROOMS {
            let recs = t.collections.entry(collection_id(room)).or_default();
            for id in self.live(room) {
                let e = self.events[room]
                    .iter()
                    .find(|(_, e)| e["event_id"] == id.as_str())
                    .unwrap();
                let mut meta = BTreeMap::new();
                meta.insert(
                    "sender".to_string(),
                    e.1["sender"].as_str().unwrap().to_string(),
                );
                if e.1["unsigned"].get("m.relations").is_some() {
                    meta.insert("edited".to_string(), "true".to_string());
                }
                recs.insert(
                    record_id(&id),
                    TruthRecord {
                        digest: digest(e.1.to_string().as_bytes()),
                        meta,
                        attachments: None,
                    },
                );
            }
        }
        t
    }
}

struct MxFx {
    state: Arc<Mutex<State>>,
    srv: MockServer,
}

async fn fixture(n: usize) -> MxFx {
    let state = Arc::new(Mutex::new(State::default()));
    let st2 = state.clone();
    let srv = MockServer::start(move |r| st2.lock().unwrap().handle(r)).await;
    {
        let mut s = state.lock().unwrap();
        for i in 0..n {
            s.message(ROOMS[i % 2]);
        }
    }
    MxFx { state, srv }
}

fn config(url: &str, token: &str) -> MatrixConfig {
    MatrixConfig {
        name: "matrix-test".into(),
        base_url: url.into(),
        access_token_env: None,
        access_token_file: None,
        access_token_command: Some(format!("printf {token}")),
        user: None,
        password_env: None,
        password_file: None,
        password_command: None,
        rooms: None,
        customer_ids: Some([("@ana:mock".to_string(), "email:ana@example.org".to_string())].into()),
        page_size: Some(4),
        http: Some(HttpOptions {
            requests_per_second: Some(100_000.0),
            backoff_base_ms: Some(10),
            ..Default::default()
        }),
    }
}

#[async_trait]
impl Fixture for MxFx {
    fn label(&self) -> String {
        "matrix".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(MatrixConnector::new(config(&self.srv.url(), TOKEN)).unwrap())
    }
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        Some(Box::new(
            MatrixConnector::new(config(&self.srv.url(), "wrong")).unwrap(),
        ))
    }
    async fn truth(&mut self) -> Truth {
        self.state.lock().unwrap().truth()
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut s = self.state.lock().unwrap();
        for i in 0..n {
            s.message(ROOMS[i % 2]);
        }
        Expect {
            fetched: n,
            ..Default::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<String> = s.live(ROOMS[0]).into_iter().take(n).collect();
        for id in &ids {
            s.redact(ROOMS[0], id);
        }
        Some(Expect {
            removed: ids.len(),
            ..Default::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let mut s = self.state.lock().unwrap();
        let ids: Vec<String> = s.live(ROOMS[1]).into_iter().take(n).collect();
        for id in &ids {
            s.edit(ROOMS[1], id);
        }
        Some(Expect {
            fetched: ids.len(),
            ..Default::default()
        })
    }
}

#[tokio::test]
async fn matrix_conformance() {
    let mut fx = fixture(23).await;
    let plan = Plan {
        add_interrupted: 10,
        ..Plan::default()
    };
    let (report, h) = conformance::run_all(&mut fx, plan).await;
    println!("matrix conformance:\n{report}");
    let recs = &h.state[&collection_id(ROOMS[0])];
    let any = recs
        .values()
        .find(|r| r.participants == ["@ana:mock"])
        .unwrap();
    assert_eq!(any.kind, "chat_message");
    assert_eq!(any.customer_ids, ["email:ana@example.org"]);
    assert_eq!(any.payload_ext, "json");
    let bob = recs
        .values()
        .find(|r| r.participants == ["@bob:mock"])
        .unwrap();
    assert!(bob.customer_ids.is_empty());
}

#[tokio::test]
async fn limited_timeline_is_backfilled_and_incremental_reads_only_changes() {
    let fx = fixture(30).await;
    let conn = fx.connector().await;
    let mut h = Harness::new();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 30);
    assert!(
        fx.srv
            .count("/_matrix/client/v3/rooms/%21support%3Amock/messages")
            >= 3,
        "backfilled in pages of 4"
    );
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!((s.fetched, s.removed()), (0, 0));
    let msgs = fx
        .srv
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/messages"))
        .count();
    assert_eq!(msgs, 0, "a sync with nothing new backfills nothing");
    // 9 new messages in one room: limited timeline (4) + backfill down to `since` only.
    {
        let mut st = fx.state.lock().unwrap();
        for _ in 0..9 {
            st.message(ROOMS[0]);
        }
        let victim = st.live(ROOMS[0])[0].clone();
        st.redact(ROOMS[0], &victim);
        let fresh = st.live(ROOMS[0]).last().unwrap().clone();
        st.redact(ROOMS[0], &fresh); // new and gone within one sync: nothing sent
    }
    fx.srv.clear();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!((s.fetched, s.deletes), (8, 1), "{s:?}");
    h.assert_matches(
        &fx.state.lock().unwrap().truth(),
        "after limited incremental",
    );
}

#[tokio::test]
async fn rate_limit_auth_malformed_and_encrypted_rooms() {
    let fx = fixture(6).await;
    let conn = fx.connector().await;
    let colls = conn.collections().await.unwrap();
    let mut h = Harness::new();
    // 429 M_LIMIT_EXCEEDED with retry_after_ms 1200: waited, then fine.
    fx.state.lock().unwrap().rl = 1;
    let t = Instant::now();
    h.sync_collection(&*conn, &colls[0], None).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    // Garbage server answer: Malformed naming the endpoint, no panic.
    fx.state.lock().unwrap().broken = true;
    match h.sync_collection(&*conn, &colls[0], None).await {
        Err(ConnectorError::Malformed { what, detail, .. }) => {
            assert_eq!(what, "GET /_matrix/client/v3/sync");
            assert!(detail.contains("not JSON"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    fx.state.lock().unwrap().broken = false;
    // 401: Auth naming the endpoint, never the token.
    let bad = fx.bad_auth_connector().await.unwrap();
    match bad.sync(&colls[0], None, &mut NullSink).await {
        Err(ConnectorError::Auth { detail, .. }) => {
            assert!(
                detail.contains("401") && detail.contains("Invalid access token"),
                "{detail}"
            );
            assert!(!detail.contains("wrong"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // An encrypted room: listed, but its sync fails naming the room.
    fx.state
        .lock()
        .unwrap()
        .encrypted
        .push(ROOMS[1].to_string());
    let colls = conn.collections().await.unwrap();
    let enc = colls
        .iter()
        .find(|c| c.id == collection_id(ROOMS[1]))
        .unwrap();
    match conn.sync(enc, None, &mut NullSink).await {
        Err(ConnectorError::Unavailable { detail, .. }) => {
            assert!(
                detail.contains("sales")
                    && detail.contains(ROOMS[1])
                    && detail.contains("encrypted"),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn password_login_and_config_validation() {
    let mut cfg = config("http://127.0.0.1:9", TOKEN);
    cfg.user = Some("custos".into());
    assert!(
        MatrixConnector::new(cfg.clone()).is_err(),
        "token and password both"
    );
    cfg.access_token_command = None;
    assert!(
        MatrixConnector::new(cfg.clone()).is_err(),
        "user without password"
    );
    cfg.password_env = Some("X".into());
    MatrixConnector::new(cfg).unwrap();
}

struct NullSink;

#[async_trait]
impl crate::ChangeSink for NullSink {
    async fn push(&mut self, _c: Change) -> Result<()> {
        Ok(())
    }
}

// ---- Against a real Synapse (scripts/services/synapse.sh) ----

/// The Synapse URL, or `None` to skip (unless `CUSTOS_REQUIRE_MATRIX=1`).
fn real_synapse() -> Option<String> {
    match std::env::var("CUSTOS_TEST_MATRIX_URL") {
        Ok(u) => Some(u),
        Err(_) if std::env::var("CUSTOS_REQUIRE_MATRIX").as_deref() == Ok("1") => {
            panic!("CUSTOS_REQUIRE_MATRIX=1 but CUSTOS_TEST_MATRIX_URL is not set")
        }
        Err(_) => {
            eprintln!("skipped: CUSTOS_TEST_MATRIX_URL not set (scripts/services/synapse.sh)");
            None
        }
    }
}

struct Real {
    url: String,
    http: reqwest::Client,
}

impl Real {
    async fn call(&self, method: reqwest::Method, path: &str, tok: &str, body: Value) -> Value {
        let r = self
            .http
            .request(method, format!("{}/_matrix/client/v3/{path}", self.url))
            .bearer_auth(tok)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }
    async fn login(&self, user: &str) -> String {
        let pw = std::env::var("CUSTOS_TEST_MATRIX_PASSWORD").unwrap();
        let v = self
            .call(
                reqwest::Method::POST,
                "login",
                "",
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw}),
            )
            .await;
        v["access_token"].as_str().unwrap().to_string()
    }
    async fn room(&self, tok: &str, name: &str, encrypted: bool) -> String {
        let mut body = json!({"name": name, "preset": "public_chat"});
        if encrypted {
            body["initial_state"] = json!([{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}]);
        }
        let v = self
            .call(reqwest::Method::POST, "createRoom", tok, body)
            .await;
        v["room_id"].as_str().unwrap().to_string()
    }
    async fn send(&self, tok: &str, room: &str, txn: &str, content: Value) -> String {
        let v = self
            .call(
                reqwest::Method::PUT,
                &format!("rooms/{}/send/m.room.message/{txn}", seg(room)),
                tok,
                content,
            )
            .await;
        v["event_id"].as_str().unwrap().to_string()
    }
}

/// Collects every payload of full syncs.
#[derive(Default)]
struct Capture {
    payloads: BTreeMap<String, Vec<u8>>,
}

#[async_trait]
impl crate::ChangeSink for Capture {
    async fn push(&mut self, c: Change) -> Result<()> {
        if let Change::Upsert(r) = c {
            self.payloads.insert(r.id, r.payload.into_bytes().unwrap());
        }
        Ok(())
    }
}

#[tokio::test]
async fn real_synapse_full_incremental_edits_redactions_encrypted() {
    let Some(url) = real_synapse() else { return };
    let real = Real {
        url: url.clone(),
        http: reqwest::Client::new(),
    };
    let alice = real.login("alice").await;
    let custos = real.login("custos").await;
    let tag = format!("{}", std::process::id());
    let rooms = [
        real.room(&alice, &format!("support-{tag}"), false).await,
        real.room(&alice, &format!("sales-{tag}"), false).await,
    ];
    for r in &rooms {
        real.call(
            reqwest::Method::POST,
            &format!("join/{}", seg(r)),
            &custos,
            json!({}),
        )
        .await;
    }
    // 2000 messages, 1000 per room, 8 requests in flight.
    let total = 2000usize;
    let t = Instant::now();
    use futures::StreamExt as _;
    let sent: Vec<(String, String, String)> = futures::stream::iter(0..total)
        .map(|i| {
            let (real, alice, room) = (&real, &alice, rooms[i % 2].clone());
            async move {
                let body = format!("message {i} – ünïcode ✓");
                let id = real
                    .send(
                        alice,
                        &room,
                        &format!("s{i}"),
                        json!({"msgtype": "m.text", "body": body}),
                    )
                    .await;
                (room, id, body)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    println!("seeded {total} messages in {:?}", t.elapsed());
    let mut cfg = config(&url, "");
    cfg.access_token_command = None;
    cfg.user = Some("custos".into());
    cfg.password_env = Some("CUSTOS_TEST_MATRIX_PASSWORD".into());
    cfg.rooms = Some(rooms.to_vec());
    cfg.page_size = Some(100);
    cfg.customer_ids = Some(
        [(
            "@alice:localhost".to_string(),
            "email:alice@example.org".to_string(),
        )]
        .into(),
    );
    let conn = MatrixConnector::new(cfg.clone()).unwrap();
    let colls = conn.collections().await.unwrap();
    assert_eq!(colls.len(), 2);
    assert!(colls.iter().any(|c| c.name == format!("support-{tag}")));
    // Full sync: every message, its JSON as the server has it.
    let t = Instant::now();
    let mut h = Harness::new();
    let s = h.sync_all(&conn).await.unwrap();
    println!("full sync of {total}: {:?} {s:?}", t.elapsed());
    assert_eq!(s.fetched, total);
    let mut cap = Capture::default();
    for c in &colls {
        conn.sync(c, None, &mut cap).await.unwrap();
    }
    assert_eq!(cap.payloads.len(), total);
    for (room, id, body) in &sent {
        let p = &cap.payloads[&record_id(id)];
        let v: Value = serde_json::from_slice(p).unwrap();
        assert_eq!(v["event_id"], json!(id));
        assert_eq!(v["sender"], json!("@alice:localhost"));
        assert_eq!(v["content"]["body"], json!(body));
        assert_eq!(
            h.state[&collection_id(room)][&record_id(id)].digest.len(),
            64
        );
    }
    let rec = h.state[&collection_id(&rooms[0])].values().next().unwrap();
    assert_eq!(rec.customer_ids, ["email:alice@example.org"]);
    // Nothing new: nothing fetched.
    let s = h.sync_all(&conn).await.unwrap();
    assert_eq!((s.fetched, s.removed(), s.resets), (0, 0, 0));
    // 150 new (more than one timeline page: backfilled), 2 edits, 3 redactions.
    for i in 0..150 {
        real.send(
            &alice,
            &rooms[0],
            &format!("n{i}"),
            json!({"msgtype": "m.text", "body": format!("new {i}")}),
        )
        .await;
    }
    let old: Vec<&(String, String, String)> =
        sent.iter().filter(|s| s.0 == rooms[0]).take(5).collect();
    for (k, (room, id, _)) in old[..2].iter().enumerate() {
        real.send(
            &alice,
            room,
            &format!("e{k}"),
            json!({"msgtype": "m.text", "body": "* fixed",
            "m.new_content": {"msgtype": "m.text", "body": "fixed"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": id}}),
        )
        .await;
    }
    for (k, (room, id, _)) in old[2..].iter().enumerate() {
        real.call(
            reqwest::Method::PUT,
            &format!("rooms/{}/redact/{}/r{k}", seg(room), seg(id)),
            &alice,
            json!({}),
        )
        .await;
    }
    let s = h.sync_all(&conn).await.unwrap();
    assert_eq!((s.fetched, s.deletes, s.resets), (152, 3, 0), "{s:?}");
    let stored = &h.state[&collection_id(&rooms[0])];
    assert_eq!(stored.len(), 1000 + 150 - 3);
    let edited = &stored[&record_id(&old[0].1)];
    assert_eq!(edited.meta.get("edited").map(String::as_str), Some("true"));
    // An interrupted sync commits nothing; the rerun (new instance) catches up.
    for i in 0..20 {
        real.send(
            &alice,
            &rooms[1],
            &format!("i{i}"),
            json!({"msgtype": "m.text", "body": format!("late {i}")}),
        )
        .await;
    }
    let before = h.state.clone();
    assert!(matches!(
        h.sync_collection(&conn, &colls[1], Some(5)).await,
        Err(ConnectorError::Sink(_))
    ));
    assert_eq!(h.state, before);
    let conn2 = MatrixConnector::new(cfg.clone()).unwrap();
    let s = h.sync_all(&conn2).await.unwrap();
    assert_eq!((s.fetched, s.duplicate_upserts), (20, 0));
    assert_eq!(h.len(), total + 150 - 3 + 20);
    // A garbage since token is refused by the server: Reset + full listing.
    h.cursors.insert(
        colls[0].id.clone(),
        json!({"v": 1, "kind": "matrix", "room": rooms[0], "since": "garbage"}),
    );
    let s = h.sync_collection(&conn2, &colls[0], None).await.unwrap();
    assert_eq!((s.resets, s.fetched), (1, 1147));
    // An encrypted room: reported by name, not skipped silently.
    let enc = real.room(&alice, &format!("secret-{tag}"), true).await;
    real.call(
        reqwest::Method::POST,
        &format!("join/{}", seg(&enc)),
        &custos,
        json!({}),
    )
    .await;
    cfg.rooms = Some(vec![enc.clone()]);
    let conn3 = MatrixConnector::new(cfg).unwrap();
    let c = conn3.collections().await.unwrap().remove(0);
    match conn3.sync(&c, None, &mut NullSink).await {
        Err(ConnectorError::Unavailable { detail, .. }) => {
            assert!(
                detail.contains(&format!("secret-{tag}")) && detail.contains("encrypted"),
                "{detail}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A wrong token: Auth.
    let mut bad = config(&url, "syt_wrong");
    bad.rooms = Some(rooms.to_vec());
    match MatrixConnector::new(bad).unwrap().collections().await {
        Err(ConnectorError::Auth { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Optional contract check, skipped unless `CUSTOS_PRISM_MATRIX` names a
/// running Stoplight Prism mock of the Matrix client-server endpoints the
/// connector calls, as assembled from the spec's fragments by
/// `scripts/matrix-prism-spec.py` (run by `scripts/contract-check.sh`).
/// With a password login, `check` (whoami, joined rooms, room name and
/// encryption state) and a full and an incremental sync of a room
/// configured by alias go through [`PrismProxy`] (which strips
/// `/_matrix/client/v3`): every request must pass Prism's validation, and
/// login, whoami, joined rooms, the alias lookup, the state events, `/sync`
/// (without and with `since`), `/messages` (first and next page) and
/// `/rooms/{id}/event/{id}` must have been requested. The proxy answers the
/// encryption state with 404 (an unencrypted room), moves the spec's
/// example joined room under the synced room id, marks the first timeline
/// `limited` (so the gap is backfilled) and adds a redaction to the
/// incremental one (so the redacted event is looked up).
#[tokio::test]
async fn prism_contract_check() {
    use crate::http::prism::PrismProxy;
    let Ok(url) = std::env::var("CUSTOS_PRISM_MATRIX") else {
        return;
    };
    let proxy = PrismProxy::start_under(&url, "/_matrix/client/v3", |ex, a| {
        if ex.path.ends_with("/state/m.room.encryption/") {
            a.status = 404;
            a.body = json!({"errcode": "M_NOT_FOUND", "error": "Event not found."});
            return;
        }
        if !ex.path.ends_with("/sync") {
            return;
        }
        let room = ex
            .query
            .iter()
            .find(|(k, _)| k == "filter")
            .and_then(|(_, f)| serde_json::from_str::<Value>(f).ok())
            .and_then(|f| f.pointer("/room/rooms/0").cloned())
            .and_then(|r| r.as_str().map(str::to_string))
            .unwrap_or_default();
        let Some(join) = a
            .body
            .pointer_mut("/rooms/join")
            .and_then(|j| j.as_object_mut())
        else {
            return;
        };
        let Some(mut r) = join.values().next().cloned() else {
            return;
        };
        join.clear();
        if ex.has("since") {
            r["timeline"]["limited"] = json!(false);
            r["timeline"]["events"] = json!([{
                "type": "m.room.redaction",
                "event_id": "$redaction1:example.org",
                "sender": "@example:example.org",
                "origin_server_ts": 1_432_735_824_700u64,
                "redacts": "$143273582443PhrSn:example.org",
                "content": {"redacts": "$143273582443PhrSn:example.org"},
            }]);
        } else {
            r["timeline"]["limited"] = json!(true);
            r["timeline"]["prev_batch"] = json!("t34-23535_0_0");
        }
        join.insert(room, r);
    })
    .await;
    let cfg = |rooms: Option<Vec<String>>| MatrixConfig {
        name: "matrix-prism".into(),
        base_url: proxy.url(),
        access_token_env: None,
        access_token_file: None,
        access_token_command: None,
        user: Some("@backup:example.org".into()),
        password_env: None,
        password_file: None,
        password_command: Some("printf matrix-test".into()),
        rooms,
        customer_ids: None,
        page_size: Some(50),
        http: Some(HttpOptions {
            max_attempts: Some(1),
            ..Default::default()
        }),
    };
    let check = MatrixConnector::new(cfg(None)).unwrap().check().await;
    println!("prism matrix check: {check:?}");
    let conn = MatrixConnector::new(cfg(Some(vec!["#monkeys:matrix.org".into()]))).unwrap();
    let mut h = Harness::new();
    let full = h.sync_all(&conn).await;
    println!("prism matrix full sync: {full:?}");
    let stored = h.len();
    let incremental = h.sync_all(&conn).await;
    println!("prism matrix incremental sync: {incremental:?}");
    proxy.assert_valid(
        "matrix",
        &[
            ("/login", &[]),
            ("/account/whoami", &[]),
            ("/joined_rooms", &[]),
            ("/state/m.room.name/", &[]),
            ("/state/m.room.encryption/", &[]),
            ("/directory/room/%23monkeys%3Amatrix.org", &[]),
            ("/sync", &["filter", "timeout"]),
            ("/sync", &["since"]),
            ("/messages", &["dir", "from", "limit", "filter"]),
            ("/event/%24143273582443PhrSn%3Aexample.org", &[]),
        ],
    );
    check.unwrap();
    full.unwrap();
    incremental.unwrap();
    assert!(stored > 0, "the full sync stored no message");
}
