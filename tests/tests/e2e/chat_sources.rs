//! Chat sources through the CLI against real servers: a Matrix homeserver
//! (Synapse, scripts/services/synapse.sh; `CUSTOS_TEST_MATRIX_*`) and a
//! Mastodon API (mastodon-mock, scripts/services/mastodon.sh;
//! `CUSTOS_TEST_MASTODON_*`). Each test seeds the server, runs `custos
//! backup` for a configured `[[source]]`, adds messages, kills a full
//! re-listing (`backup --force`) with SIGKILL mid-run, reruns the backup,
//! and restores the latest snapshot: every message the server lists comes
//! back exactly once with the bytes the server sends for it. Skipped when
//! the server's URL is not set, unless `CUSTOS_REQUIRE_MATRIX=1` /
//! `CUSTOS_REQUIRE_MASTODON=1`. Sizes: `CUSTOS_TEST_CHAT_MATRIX_MESSAGES`
//! (default 1000) and `CUSTOS_TEST_CHAT_MASTODON_STATUSES` (default 2000).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::support::*;

/// `$url_var`, or `None` (after a skip line) when it is unset; panics when
/// `$require_var=1`.
fn server_url(test: &str, url_var: &str, require_var: &str, script: &str) -> Option<String> {
    match std::env::var(url_var) {
        Ok(u) if !u.is_empty() => Some(u.trim_end_matches('/').to_string()),
        _ => {
            assert!(
                std::env::var(require_var).as_deref() != Ok("1"),
                "{test}: {require_var}=1 but {url_var} is not set \
                 (scripts/test.sh starts the server with {script} and sets it)"
            );
            eprintln!("SKIP {test}: {url_var} is not set ({script})");
            None
        }
    }
}

fn env_var(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| panic!("{key} is not set"))
}

fn add_source(repo: &Repo, toml: &str) {
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(cfg, "\n{toml}\n");
    std::fs::write(repo.config_path(), cfg).unwrap();
}

/// A small HTTP client on its own runtime (the e2e tests are synchronous).
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Http {
        Http {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::new(),
        }
    }
}

/// One request; the answer's bytes (panics unless 2xx).
async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    tok: &str,
    body: Option<&Value>,
) -> Vec<u8> {
    let mut rb = client.request(method, url).bearer_auth(tok);
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = r.status();
    let bytes = r.bytes().await.unwrap().to_vec();
    assert!(
        status.is_success(),
        "{url}: {status} {}",
        String::from_utf8_lossy(&bytes)
    );
    bytes
}

/// Restored records: (file name, bytes), the record id read with `id_of`.
fn restored_records(dest: &Path, id_of: impl Fn(&Value) -> String) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for (p, bytes) in read_all_files(dest) {
        if p.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
        let id = id_of(&v);
        assert!(
            out.insert(id.clone(), bytes).is_none(),
            "{id} restored twice ({})",
            p.display()
        );
    }
    out
}

/// Kill `backup --force` runs at a random point of `span` until one is
/// killed while running (at most 3 tries, `more` adds messages before each);
/// then a normal backup catches up. Returns that backup's report.
fn kill_and_rerun(repo: &Repo, span: Duration, test: &str, mut more: impl FnMut(usize)) -> Value {
    let mut r = rng(test);
    for trial in 0..3 {
        more(trial);
        let delay = span.mul_f64(rand::Rng::gen_range(&mut r, 0.3..0.7));
        let mut child = spawn(repo.cmd(["backup", "--force"]));
        std::thread::sleep(delay);
        // Killed only if it died by the signal: it may exit on its own
        // between a check and the kill.
        let _ = child.kill();
        let running = child.wait().unwrap().code().is_none();
        println!("{test}: trial {trial}: killed after {delay:?} (running: {running})");
        if running {
            let out = repo.run(["--json", "backup"]);
            out.expect_ok();
            return single_report(&out);
        }
    }
    panic!("{test}: no trial killed a running backup (span {span:?})");
}

// ---------------------------------------------------------------------------
// Matrix

struct Matrix {
    http: Http,
    url: String,
}

impl Matrix {
    fn api(&self, path: &str) -> String {
        format!("{}/_matrix/client/v3/{path}", self.url)
    }

    fn call(&self, method: reqwest::Method, path: &str, tok: &str, body: Value) -> Value {
        let b = self.http.rt.block_on(call(
            &self.http.client,
            method,
            &self.api(path),
            tok,
            Some(&body),
        ));
        serde_json::from_slice(&b).unwrap()
    }

    fn login(&self, user: &str, pw: &str) -> String {
        let v = self.call(
            reqwest::Method::POST,
            "login",
            "",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw}),
        );
        v["access_token"].as_str().unwrap().to_string()
    }

    /// `n` text messages from `tok`, alternating over `rooms`, 8 in flight.
    fn send(&self, tok: &str, rooms: &[String], prefix: &str, n: usize) {
        let t = Instant::now();
        self.http.rt.block_on(
            futures::stream::iter(0..n)
                .map(|i| {
                    let room = seg(&rooms[i % rooms.len()]);
                    let url = self.api(&format!("rooms/{room}/send/m.room.message/{prefix}{i}"));
                    let body =
                        json!({"msgtype": "m.text", "body": format!("{prefix} {i} – ünïcode ✓")});
                    let client = &self.http.client;
                    async move {
                        call(client, reqwest::Method::PUT, &url, tok, Some(&body)).await;
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<()>>(),
        );
        println!("matrix: sent {n} messages in {:?}", t.elapsed());
    }

    /// Every `m.room.message` of `room` as the server sends it
    /// (`/messages`, oldest first): event id → event JSON bytes.
    fn listing(&self, tok: &str, room: &str) -> BTreeMap<String, Vec<u8>> {
        let filter = seg(&json!({"types": ["m.room.message"]}).to_string());
        let mut out = BTreeMap::new();
        let mut from: Option<String> = None;
        loop {
            let mut path = format!(
                "rooms/{}/messages?dir=f&limit=500&filter={filter}",
                seg(room)
            );
            if let Some(f) = &from {
                let _ = write!(path, "&from={}", seg(f));
            }
            let bytes = self.http.rt.block_on(call(
                &self.http.client,
                reqwest::Method::GET,
                &self.api(&path),
                tok,
                None,
            ));
            let page: BTreeMap<String, &RawValue> = serde_json::from_slice(&bytes).unwrap();
            let chunk: Vec<&RawValue> = serde_json::from_str(page["chunk"].get()).unwrap();
            let end: Option<String> = page
                .get("end")
                .map(|e| serde_json::from_str(e.get()).unwrap());
            for ev in &chunk {
                let v: Value = serde_json::from_str(ev.get()).unwrap();
                let id = v["event_id"].as_str().unwrap().to_string();
                assert!(out.insert(id, ev.get().as_bytes().to_vec()).is_none());
            }
            match end {
                Some(e) if !chunk.is_empty() => from = Some(e),
                _ => break,
            }
        }
        out
    }
}

/// Path segment encoding (room and event ids, txn ids, filters).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `"age":<n>` → `"age":0`: the age of an event (milliseconds since it
/// was sent) is computed per answer, the one part of a Matrix event that
/// changes between two answers.
fn without_age(bytes: &[u8]) -> String {
    let s = std::str::from_utf8(bytes).unwrap();
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\"age\":") {
        let (head, tail) = rest.split_at(i + "\"age\":".len());
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        assert!(digits > 0, "\"age\" without a number: {s}");
        out.push('0');
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

/// Synapse sends an event in two forms: `/messages` adds the legacy
/// client-event fields `age`, `room_id` and `user_id` (keys sorted, so
/// `{"age":..,"content":..,"room_id":"!r",..,"user_id":"@u"}`), `/sync`
/// timelines do not. The `/sync` form of a `/messages` event (after
/// [`without_age`]).
fn sync_form(messages_form: &str, room: &str, sender: &str) -> String {
    let cut = |s: &str, part: &str| {
        assert!(s.contains(part), "{part} not in {s}");
        s.replacen(part, "", 1)
    };
    let s = cut(messages_form, "{\"age\":0,");
    let s = cut(&s, &format!("\"room_id\":{},", json!(room)));
    let s = cut(&s, &format!(",\"user_id\":{}", json!(sender)));
    format!("{{{s}")
}

#[test]
fn matrix_backup_kill_rerun_restore_against_synapse() {
    let test = "chat-matrix";
    let Some(url) = server_url(
        test,
        "CUSTOS_TEST_MATRIX_URL",
        "CUSTOS_REQUIRE_MATRIX",
        "scripts/services/synapse.sh",
    ) else {
        return;
    };
    let t0 = Instant::now();
    let pw = env_var("CUSTOS_TEST_MATRIX_PASSWORD");
    let mx = Matrix {
        http: Http::new(),
        url: url.clone(),
    };
    let alice = mx.login("alice", &pw);
    let bob = mx.login("bob", &pw);
    let reader = mx.login("custos", &pw);
    let tag = unique(test);
    let mut rooms = Vec::new();
    for name in ["support", "sales"] {
        let v = mx.call(
            reqwest::Method::POST,
            "createRoom",
            &alice,
            json!({"name": format!("{name}-{tag}"), "preset": "public_chat"}),
        );
        let room = v["room_id"].as_str().unwrap().to_string();
        for tok in [&bob, &reader] {
            mx.call(
                reqwest::Method::POST,
                &format!("join/{}", seg(&room)),
                tok,
                json!({}),
            );
        }
        rooms.push(room);
    }
    let n = knob("CUSTOS_TEST_CHAT_MATRIX_MESSAGES", 1000);
    mx.send(&alice, &rooms, "first", n / 2);
    mx.send(&bob, &rooms, "first-bob", n - n / 2);

    let mut repo = Repo::new(Kind::Local, test)
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    // Not CUSTOS_*: the e2e harness strips those from the child.
    repo.env("E2E_MATRIX_PASSWORD", &pw);
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"matrix\"\ntype = \"matrix\"\nbase_url = {}\nuser = \"custos\"\n\
             password_env = \"E2E_MATRIX_PASSWORD\"\nrooms = [{}, {}]\npage_size = 100\n\
             http = {{ requests_per_second = 1000.0, burst = 100 }}\n\
             customer_ids = {{ \"@alice:localhost\" = \"email:alice@example.org\" }}",
            toml_str(&url),
            toml_str(&rooms[0]),
            toml_str(&rooms[1]),
        ),
    );
    let start = Instant::now();
    let r0 = single_report(&repo.run(["--json", "backup"]));
    let span = start.elapsed();
    println!("matrix: first backup of {n} in {span:?}");
    assert_eq!(u(&r0["summary"], "records_total"), n as u64, "{r0}");

    // More messages, a killed full re-listing, a rerun.
    let late = 100;
    let r = kill_and_rerun(&repo, span, test, |trial| {
        mx.send(&alice, &rooms, &format!("late{trial}-"), late)
    });
    let server: BTreeMap<String, BTreeMap<String, Vec<u8>>> = rooms
        .iter()
        .map(|room| (room.clone(), mx.listing(&reader, room)))
        .collect();
    let total: usize = server.values().map(BTreeMap::len).sum();
    assert!(total > n, "{total}");
    assert_eq!(u(&r["summary"], "records_total"), total as u64, "{r}");
    repo.ok(["check", "--read-data"]);

    // Restore: every message once, with the bytes the server sent for it
    // (in one of its two forms; `age` aside).
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored = restored_records(&dest, |v| v["event_id"].as_str().unwrap().to_string());
    assert_eq!(restored.len(), total, "no duplicates, nothing lost");
    let mut forms = [0usize; 2];
    for (room, events) in &server {
        for (id, want) in events {
            let got = restored
                .get(id)
                .unwrap_or_else(|| panic!("{id} not restored"));
            let (got, want) = (without_age(got), without_age(want));
            let sender = serde_json::from_str::<Value>(&want).unwrap()["sender"]
                .as_str()
                .unwrap()
                .to_string();
            if got == want {
                forms[0] += 1;
            } else {
                assert_eq!(got, sync_form(&want, room, &sender), "{id}");
                forms[1] += 1;
            }
        }
    }
    println!(
        "matrix: restored {} /messages and {} /sync forms",
        forms[0], forms[1]
    );
    println!("matrix: {total} messages in {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// Mastodon

struct Mastodon {
    http: Http,
    url: String,
}

impl Mastodon {
    /// `n` public statuses mentioning @custos, alternating over `senders`, 8 in flight.
    fn post(&self, senders: &[String], prefix: &str, n: usize) {
        let t = Instant::now();
        let url = format!("{}/api/v1/statuses", self.url);
        self.http.rt.block_on(
            futures::stream::iter(0..n)
                .map(|i| {
                    let body = json!({"status": format!("@custos {prefix} #{i} – ünïcode ✓"), "visibility": "public"});
                    let (client, url, tok) = (&self.http.client, &url, &senders[i % senders.len()]);
                    async move {
                        call(client, reqwest::Method::POST, url, tok, Some(&body)).await;
                    }
                })
                .buffer_unordered(8)
                .collect::<Vec<()>>(),
        );
        println!("mastodon: posted {n} statuses in {:?}", t.elapsed());
    }

    /// The statuses of the mention notifications newer than `since` (all
    /// with `None`) as the server sends them (newest first, `max_id`
    /// paging): status id → status JSON bytes, and the newest notification id.
    fn mentions(
        &self,
        tok: &str,
        since: Option<&str>,
    ) -> (BTreeMap<String, Vec<u8>>, Option<String>) {
        let mut out = BTreeMap::new();
        let mut newest: Option<String> = None;
        let mut max: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/api/v1/notifications?types%5B%5D=mention&limit=40",
                self.url
            );
            if let Some(m) = &max {
                let _ = write!(url, "&max_id={m}");
            }
            if let Some(m) = since {
                let _ = write!(url, "&since_id={m}");
            }
            let bytes = self.http.rt.block_on(call(
                &self.http.client,
                reqwest::Method::GET,
                &url,
                tok,
                None,
            ));
            let page: Vec<BTreeMap<String, &RawValue>> = serde_json::from_slice(&bytes).unwrap();
            let Some(last) = page.last() else { break };
            max = Some(serde_json::from_str(last["id"].get()).unwrap());
            if newest.is_none() {
                newest = Some(serde_json::from_str(page[0]["id"].get()).unwrap());
            }
            for n in &page {
                let status = n["status"].get();
                let v: Value = serde_json::from_str(status).unwrap();
                let id = v["id"].as_str().unwrap().to_string();
                assert!(
                    out.insert(id, status.as_bytes().to_vec()).is_none(),
                    "a status listed twice"
                );
            }
        }
        (out, newest)
    }
}

#[test]
fn mastodon_backup_kill_rerun_restore_against_mastodon_mock() {
    let test = "chat-mastodon";
    let Some(url) = server_url(
        test,
        "CUSTOS_TEST_MASTODON_URL",
        "CUSTOS_REQUIRE_MASTODON",
        "scripts/services/mastodon.sh",
    ) else {
        return;
    };
    let t0 = Instant::now();
    let token = env_var("CUSTOS_TEST_MASTODON_TOKEN");
    let senders: Vec<String> = env_var("CUSTOS_TEST_MASTODON_SENDER_TOKENS")
        .split(',')
        .map(String::from)
        .collect();
    let md = Mastodon {
        http: Http::new(),
        url: url.clone(),
    };
    let n = knob("CUSTOS_TEST_CHAT_MASTODON_STATUSES", 2000);
    md.post(&senders, "first", n);

    let mut repo = Repo::new(Kind::Local, test)
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    // Not CUSTOS_*: the e2e harness strips those from the child.
    repo.env("E2E_MASTODON_TOKEN", &token);
    add_source(
        &repo,
        &format!(
            "[[source]]\nname = \"mastodon\"\ntype = \"mastodon\"\nbase_url = {}\n\
             access_token_env = \"E2E_MASTODON_TOKEN\"\ncollections = [\"mentions\"]\n\
             http = {{ requests_per_second = 1000.0, burst = 100 }}",
            toml_str(&url),
        ),
    );
    // The server may hold statuses of other tests: the truth is its
    // listing, taken with nothing posted until the backup that stores it
    // (a status embeds its author's account, whose counters change).
    let (before, newest) = md.mentions(&token, None);
    assert!(before.len() >= n);
    let start = Instant::now();
    let r0 = single_report(&repo.run(["--json", "backup"]));
    let span = start.elapsed();
    println!("mastodon: first backup of {} in {span:?}", before.len());
    assert_eq!(
        u(&r0["summary"], "records_total"),
        before.len() as u64,
        "{r0}"
    );

    let late = 200;
    let r = kill_and_rerun(&repo, span, test, |trial| {
        md.post(&senders, &format!("late{trial}"), late)
    });
    // Statuses are only added: the listing now is `before` + the newer ones.
    let (newer, _) = md.mentions(&token, newest.as_deref());
    assert!(newer.len() >= late, "{}", newer.len());
    let mut server = before;
    for (id, bytes) in newer {
        assert!(server.insert(id, bytes).is_none(), "a status listed twice");
    }
    assert_eq!(
        u(&r["summary"], "records_total"),
        server.len() as u64,
        "{r}"
    );
    repo.ok(["check", "--read-data"]);

    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let restored = restored_records(&dest, |v| v["id"].as_str().unwrap().to_string());
    assert_eq!(restored.len(), server.len(), "no duplicates, nothing lost");
    for (id, want) in &server {
        let got = restored
            .get(id)
            .unwrap_or_else(|| panic!("{id} not restored"));
        assert!(
            got == want,
            "{id}: restored {} != server {}",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want)
        );
    }
    println!("mastodon: {} statuses in {:?}", server.len(), t0.elapsed());
}
