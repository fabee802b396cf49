//! A stateful in-process mock of the X API v2: `/2/users/me`, `/2/users/{id}/mentions` and
//! `/2/dm_events` (field names from the X API v2 reference / OpenAPI).
//! Shared by this connector's tests and the e2e suite
//! (`tests/tests/e2e.rs` includes this file by path), so it names only
//! `crate::http::mock` and external crates.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::http::mock::{MockRequest, MockResponse};

pub const TOKEN: &str = "x-user-access-token";
pub const ME: &str = "42";

#[derive(Default)]
pub struct State {
    pub mentions: BTreeMap<u64, Value>,
    pub dms: BTreeMap<u64, Value>,
    pub next_id: u64,
    pub rl: usize,
    pub broken: bool,
    pub junk: bool,
}

pub fn when(id: u64) -> String {
    let t =
        chrono::DateTime::from_timestamp(1_700_000_000 + (id % 100_000) as i64 * 60, 0).unwrap();
    t.format("%Y-%m-%dT%H:%M:%S.000Z").to_string()
}

pub fn user(id: u64) -> Value {
    if id.to_string() == ME {
        return json!({"id": ME, "name": "Acme Support", "username": "AcmeSupport"});
    }
    json!({"id": id.to_string(), "name": format!("Customer {id}"), "username": format!("Customer{id}")})
}

impl State {
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        1_700_000_000_000_000_000 + self.next_id
    }

    pub fn mention(&mut self) -> u64 {
        let id = self.id();
        let author = 7 + id % 3;
        self.mentions.insert(
            id,
            json!({"id": id.to_string(), "text": format!("@AcmeSupport where is order {id}?"),
                "author_id": author.to_string(), "created_at": when(id), "conversation_id": id.to_string(),
                "lang": "en", "edit_history_tweet_ids": [id.to_string()]}),
        );
        id
    }

    pub fn dm(&mut self, from_me: bool) -> u64 {
        let id = self.id();
        let other = 7 + id % 3;
        let sender = if from_me {
            ME.to_string()
        } else {
            other.to_string()
        };
        self.dms.insert(
            id,
            json!({"id": id.to_string(), "event_type": "MessageCreate", "text": format!("dm {id}"),
                "sender_id": sender, "dm_conversation_id": format!("{other}-{ME}"), "created_at": when(id),
                "participant_ids": [other.to_string(), ME]}),
        );
        id
    }

    pub fn listing(
        &self,
        r: &MockRequest,
        items: &BTreeMap<u64, Value>,
        author: &str,
    ) -> MockResponse {
        let since: u64 = r.q("since_id").and_then(|s| s.parse().ok()).unwrap_or(0);
        let max: usize = r.q("max_results").unwrap().parse().unwrap();
        let from: usize = r
            .q("pagination_token")
            .map(|t| t.parse().unwrap())
            .unwrap_or(0);
        let all: Vec<&Value> = items.range(since + 1..).rev().map(|(_, v)| v).collect();
        let end = (from + max).min(all.len());
        let page = &all[from.min(end)..end];
        if page.is_empty() {
            return MockResponse::json(200, &json!({"meta": {"result_count": 0}}));
        }
        let mut data: Vec<Value> = page.iter().map(|v| (*v).clone()).collect();
        if self.junk {
            data.insert(0, json!({"text": "no id"}));
        }
        // expansions=author_id / sender_id,participant_ids
        let mut uids: Vec<u64> = page
            .iter()
            .flat_map(|v| {
                let mut ids = vec![v[author].clone()];
                ids.extend(v["participant_ids"].as_array().cloned().unwrap_or_default());
                ids
            })
            .filter_map(|x| x.as_str()?.parse().ok())
            .collect();
        uids.sort();
        uids.dedup();
        let mut meta = json!({"result_count": page.len(), "newest_id": page[0]["id"],
            "oldest_id": page[page.len() - 1]["id"]});
        if end < all.len() {
            meta["next_token"] = json!(end.to_string());
        }
        MockResponse::json(
            200,
            &json!({"data": data, "includes": {"users": uids.into_iter().map(user).collect::<Vec<_>>()}, "meta": meta}),
        )
    }

    pub fn handle(&mut self, r: &MockRequest) -> MockResponse {
        if r.header("authorization") != Some(format!("Bearer {TOKEN}").as_str()) {
            return MockResponse::json(
                401,
                &json!({"title": "Unauthorized", "type": "about:blank", "status": 401, "detail": "Unauthorized"}),
            );
        }
        if self.rl > 0 && r.path != "/2/users/me" {
            self.rl -= 1;
            let reset = chrono::Utc::now().timestamp() + 2;
            return MockResponse::json(
                429,
                &json!({"title": "Too Many Requests", "detail": "Too Many Requests", "type": "about:blank", "status": 429}),
            )
            .header("x-rate-limit-limit", "180")
            .header("x-rate-limit-remaining", "0")
            .header("x-rate-limit-reset", &reset.to_string());
        }
        if self.broken {
            return MockResponse::raw(200, "application/json", b"{\"data\":[{".to_vec());
        }
        match r.path.as_str() {
            "/2/users/me" => MockResponse::json(200, &json!({"data": user(42)})),
            "/2/users/42/mentions" => {
                assert_eq!(r.q("expansions"), Some("author_id"));
                self.listing(r, &self.mentions, "author_id")
            }
            "/2/dm_events" => {
                assert_eq!(r.q("event_types"), Some("MessageCreate"));
                assert!(r.q("since_id").is_none());
                self.listing(r, &self.dms, "sender_id")
            }
            _ => MockResponse::json(404, &json!({"title": "Not Found Error", "status": 404})),
        }
    }
}
