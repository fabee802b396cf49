//! A stateful in-process mock of the Slack Web API: `auth.test`, `conversations.list`, `conversations.history`,
//! `conversations.replies`, `users.list` and file downloads (fields as in
//! Slack's Web API reference).
//! Shared by this connector's tests and the e2e suite
//! (`tests/tests/e2e.rs` includes this file by path), so it names only
//! `crate::http::mock` and external crates.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};

use crate::http::mock::{MockRequest, MockResponse};

pub const TOKEN: &str = "xoxb-good";

#[derive(Default)]
pub struct Msg {
    pub v: Value,
    pub replies: BTreeMap<String, Value>,
}

#[derive(Default)]
pub struct Chan {
    pub id: String,
    pub name: String,
    pub msgs: BTreeMap<String, Msg>,
}

#[derive(Default)]
pub struct State {
    pub chans: Vec<Chan>,
    pub users: Vec<Value>,
    pub files: HashMap<String, Vec<u8>>,
    pub clock: i64,
    pub base: String,
    pub rl_http: usize,
    pub rl_ok_false: usize,
    pub broken_history: bool,
    pub junk_message: bool,
    pub n: usize,
}

pub fn ok(mut v: Value) -> MockResponse {
    v["ok"] = json!(true);
    MockResponse::json(200, &v)
}

pub fn page<T: Clone>(items: &[T], r: &MockRequest, max: usize) -> (Vec<T>, String) {
    let from: usize = r
        .q("cursor")
        .and_then(|c| c.strip_prefix("next:")?.parse().ok())
        .unwrap_or(0);
    let size = r
        .q("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .min(max);
    let end = (from + size).min(items.len());
    let next = if end < items.len() {
        format!("next:{end}")
    } else {
        String::new()
    };
    (items[from.min(end)..end].to_vec(), next)
}

impl State {
    pub fn next_ts(&mut self) -> String {
        self.clock += 1;
        format!("{}.000100", self.clock)
    }

    pub fn add_message(&mut self, chan: usize, with_file: bool) -> String {
        self.n += 1;
        let n = self.n;
        let ts = self.next_ts();
        let mut v = json!({"type": "message", "user": format!("U{}", n % 3 + 1),
            "text": format!("message {n} for <@U2>"), "ts": ts, "team": "T1"});
        if with_file {
            let fid = format!("F{n}");
            let content = vec![b'%'; 3000 + n];
            v["files"] = json!([{"id": fid, "name": "report.pdf", "title": "Report",
                "mimetype": "application/pdf", "filetype": "pdf", "size": content.len(), "mode": "hosted",
                "url_private": format!("{}/files-pri/T1-{fid}/report.pdf", self.base),
                "url_private_download": format!("{}/files-pri/T1-{fid}/download/report.pdf", self.base)}]);
            self.files.insert(fid, content);
        }
        self.chans[chan].msgs.insert(
            ts.clone(),
            Msg {
                v,
                replies: BTreeMap::new(),
            },
        );
        ts
    }

    pub fn add_reply(&mut self, chan: usize, parent: &str) -> String {
        self.n += 1;
        let n = self.n;
        let ts = self.next_ts();
        let m = self.chans[chan].msgs.get_mut(parent).unwrap();
        let r = json!({"type": "message", "user": "U2", "text": format!("reply {n}"),
            "ts": ts, "thread_ts": parent, "parent_user_id": m.v["user"]});
        m.replies.insert(ts.clone(), r);
        m.v["thread_ts"] = json!(parent);
        m.v["reply_count"] = json!(m.replies.len());
        m.v["latest_reply"] = json!(ts);
        m.v["reply_users"] = json!(["U2"]);
        ts
    }

    pub fn handle(&mut self, r: &MockRequest) -> MockResponse {
        if r.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
            if r.path.starts_with("/files-pri/") {
                return MockResponse::raw(403, "text/html", b"<html>login</html>".to_vec());
            }
            return MockResponse::json(200, &json!({"ok": false, "error": "invalid_auth"}));
        }
        let chan_idx = |s: &State| {
            r.q("channel")
                .and_then(|c| s.chans.iter().position(|x| x.id == c))
        };
        match r.path.as_str() {
            "/api/auth.test" => ok(
                json!({"url": "https://t.slack.com/", "team": "Team", "user": "bot", "team_id": "T1", "user_id": "U0"}),
            ),
            "/api/conversations.list" => {
                let all: Vec<Value> = self
                    .chans
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "name": c.name,
                    "is_channel": true, "is_member": true, "is_archived": false})
                    })
                    .collect();
                let (items, next) = page(&all, r, 1);
                ok(json!({"channels": items, "response_metadata": {"next_cursor": next}}))
            }
            "/api/conversations.history" => {
                if self.rl_http > 0 {
                    self.rl_http -= 1;
                    return MockResponse::json(429, &json!({"ok": false, "error": "ratelimited"}))
                        .header("retry-after", "1");
                }
                if self.rl_ok_false > 0 {
                    self.rl_ok_false -= 1;
                    return MockResponse::json(200, &json!({"ok": false, "error": "ratelimited"}))
                        .header("retry-after", "1");
                }
                if self.broken_history {
                    return MockResponse::raw(
                        200,
                        "application/json",
                        b"{\"ok\":true,\"messages\":[{\"ts\":".to_vec(),
                    );
                }
                let Some(ci) = chan_idx(self) else {
                    return MockResponse::json(
                        200,
                        &json!({"ok": false, "error": "channel_not_found"}),
                    );
                };
                let oldest: f64 = r.q("oldest").and_then(|o| o.parse().ok()).unwrap_or(0.0);
                let mut all: Vec<Value> = self.chans[ci]
                    .msgs
                    .iter()
                    .rev()
                    .filter(|(ts, _)| ts.parse::<f64>().unwrap() > oldest)
                    .map(|(_, m)| m.v.clone())
                    .collect();
                if self.junk_message {
                    all.insert(0, json!({"type": "message", "text": "no ts here"}));
                }
                let (items, next) = page(&all, r, 4);
                ok(
                    json!({"messages": items, "has_more": !next.is_empty(), "pin_count": 0,
                    "response_metadata": {"next_cursor": next}}),
                )
            }
            "/api/conversations.replies" => {
                let Some(ci) = chan_idx(self) else {
                    return MockResponse::json(
                        200,
                        &json!({"ok": false, "error": "channel_not_found"}),
                    );
                };
                let Some(m) = r.q("ts").and_then(|t| self.chans[ci].msgs.get(t)) else {
                    return MockResponse::json(
                        200,
                        &json!({"ok": false, "error": "thread_not_found"}),
                    );
                };
                let oldest: f64 = r.q("oldest").and_then(|o| o.parse().ok()).unwrap_or(0.0);
                let mut all = vec![m.v.clone()];
                all.extend(
                    m.replies
                        .iter()
                        .filter(|(ts, _)| ts.parse::<f64>().unwrap() > oldest)
                        .map(|(_, v)| v.clone()),
                );
                let (items, next) = page(&all, r, 3);
                ok(
                    json!({"messages": items, "has_more": !next.is_empty(), "response_metadata": {"next_cursor": next}}),
                )
            }
            "/api/users.list" => {
                let (items, next) = page(&self.users, r, 2);
                ok(
                    json!({"members": items, "cache_ts": 0, "response_metadata": {"next_cursor": next}}),
                )
            }
            p if p.starts_with("/files-pri/") => {
                let fid = p
                    .trim_start_matches("/files-pri/T1-")
                    .split('/')
                    .next()
                    .unwrap_or_default();
                match self.files.get(fid) {
                    Some(b) => MockResponse::raw(200, "application/pdf", b.clone()),
                    None => MockResponse::raw(404, "text/plain", b"not found".to_vec()),
                }
            }
            _ => MockResponse::json(404, &json!({"ok": false, "error": "unknown_method"})),
        }
    }
}
