//! A stateful in-process mock of the Zendesk Support API: the cursor-based incremental ticket export,
//! ticket comments (cursor pagination), attachment content and `users/me`
//! (field names as in the Zendesk Support API reference).
//! Shared by this connector's tests and the e2e suite
//! (`tests/tests/e2e.rs` includes this file by path), so it names only
//! `crate::http::mock` and external crates.

#![allow(dead_code)]

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::mock::{MockRequest, MockResponse};

pub const EMAIL: &str = "agent@example.org";
pub const TOKEN: &str = "zd-api-token";

pub struct Ticket {
    pub v: Value,
    pub comments: Vec<Value>,
    pub seq: u64,
}

#[derive(Default)]
pub struct State {
    pub tickets: BTreeMap<u64, Ticket>,
    pub users: BTreeMap<u64, Value>,
    pub seq: u64,
    pub next_id: u64,
    pub base: String,
    pub rl: usize,
    pub broken: bool,
    pub junk_ticket: bool,
    /// Root of new attachments' content URLs (default `base`).
    pub att_base: Option<String>,
    /// Attachment content answers 404.
    pub att_gone: bool,
}

/// The bytes the mock serves for comment `cid`'s attachment.
pub fn att_bytes(cid: u64) -> Vec<u8> {
    let mut b = format!("%PDF-1.4 attachment of comment {cid}\n").into_bytes();
    b.extend((0..3000u32).map(|i| (i * 7 + cid as u32) as u8));
    b
}

pub fn stamp(seq: u64) -> String {
    let t = chrono::DateTime::from_timestamp(1_700_000_000 + seq as i64 * 60, 0).unwrap();
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

impl State {
    pub fn comment(&mut self, tid: u64, with_att: bool) -> Value {
        self.seq += 1;
        let cid = 1000 + self.seq;
        let mut c = json!({"id": cid, "type": "Comment", "author_id": 11, "body": format!("comment {cid} on {tid}"),
            "html_body": format!("<p>comment {cid}</p>"), "plain_body": format!("comment {cid}"),
            "public": true, "attachments": [], "created_at": stamp(self.seq), "via": {"channel": "web"}});
        if with_att {
            let root = self.att_base.as_ref().unwrap_or(&self.base);
            c["attachments"] = json!([{"id": cid * 10, "file_name": "invoice.pdf", "content_type": "application/pdf",
                "size": att_bytes(cid).len(), "content_url": format!("{root}/attachments/token/{cid}/?name=invoice.pdf")}]);
        }
        c
    }

    pub fn add_ticket(&mut self) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let requester = 20 + id % 3;
        let n = 1 + (id % 3) as usize;
        let comments: Vec<Value> = (0..n)
            .map(|i| self.comment(id, id % 4 == 1 && i == 0))
            .collect();
        self.seq += 1;
        let v = json!({"id": id, "url": format!("{}/api/v2/tickets/{id}.json", self.base), "subject": format!("Help with order {id}"),
            "raw_subject": format!("Help with order {id}"), "description": format!("comment on {id}"),
            "status": "open", "priority": "normal", "type": "question", "requester_id": requester, "submitter_id": requester,
            "assignee_id": 11, "group_id": 5, "via": {"channel": "email"}, "tags": ["order"],
            "created_at": stamp(self.seq), "updated_at": stamp(self.seq)});
        self.tickets.insert(
            id,
            Ticket {
                v,
                comments,
                seq: self.seq,
            },
        );
        id
    }

    pub fn touch(&mut self, id: u64) {
        self.seq += 1;
        let seq = self.seq;
        let t = self.tickets.get_mut(&id).unwrap();
        t.seq = seq;
        t.v["updated_at"] = json!(stamp(seq));
    }

    pub fn handle(&mut self, r: &MockRequest) -> MockResponse {
        // Attachment content: token URLs, served with or without credentials.
        if let Some(rest) = r.path.strip_prefix("/attachments/token/") {
            let cid = rest.trim_end_matches('/').parse::<u64>();
            return match cid {
                Ok(cid) if !self.att_gone => {
                    MockResponse::raw(200, "application/pdf", att_bytes(cid))
                }
                _ => MockResponse::json(404, &json!({"error": "RecordNotFound"})),
            };
        }
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{EMAIL}/token:{TOKEN}"))
        );
        if r.header("authorization") != Some(want.as_str()) {
            return MockResponse::json(401, &json!({"error": "Couldn't authenticate you"}));
        }
        if r.path == "/api/v2/users/me.json" {
            return MockResponse::json(
                200,
                &json!({"user": {"id": 11, "role": "admin", "email": EMAIL}}),
            );
        }
        if r.path == "/api/v2/incremental/tickets/cursor.json" {
            if self.rl > 0 {
                self.rl -= 1;
                return MockResponse::json(429, &json!({"error": "APIRateLimitExceeded"}))
                    .header("retry-after", "1");
            }
            if self.broken {
                return MockResponse::raw(
                    200,
                    "application/json",
                    b"<html>maintenance</html>".to_vec(),
                );
            }
            let from = match (r.q("cursor"), r.q("start_time")) {
                (Some(c), _) => match c.strip_prefix("seq:").and_then(|n| n.parse::<u64>().ok()) {
                    Some(n) => n,
                    None => {
                        return MockResponse::json(
                            422,
                            &json!({"error": "InvalidPaginationParameter", "description": "cursor is invalid"}),
                        )
                    }
                },
                (None, Some(_)) => 0,
                (None, None) => return MockResponse::json(400, &json!({"error": "InvalidValue"})),
            };
            let mut changed: Vec<&Ticket> =
                self.tickets.values().filter(|t| t.seq > from).collect();
            changed.sort_by_key(|t| t.seq);
            let end_of_stream = changed.len() <= 3;
            changed.truncate(3);
            let last = changed.last().map(|t| t.seq).unwrap_or(from);
            let mut tickets: Vec<Value> = changed.iter().map(|t| t.v.clone()).collect();
            if self.junk_ticket {
                tickets.insert(0, json!({"subject": "no id"}));
            }
            let users: Vec<Value> = changed
                .iter()
                .filter_map(|t| t.v["requester_id"].as_u64())
                .filter_map(|u| self.users.get(&u).cloned())
                .collect();
            return MockResponse::json(
                200,
                &json!({"tickets": tickets, "users": users,
                "after_cursor": format!("seq:{last}"), "before_cursor": null,
                "after_url": format!("{}/api/v2/incremental/tickets/cursor.json?cursor=seq:{last}", self.base),
                "end_of_stream": end_of_stream}),
            );
        }
        if let Some(rest) = r.path.strip_prefix("/api/v2/tickets/") {
            let Some(id) = rest
                .strip_suffix("/comments.json")
                .and_then(|i| i.parse::<u64>().ok())
            else {
                return MockResponse::json(404, &json!({"error": "RecordNotFound"}));
            };
            let Some(t) = self.tickets.get(&id) else {
                return MockResponse::json(404, &json!({"error": "RecordNotFound"}));
            };
            let size: usize = r
                .q("page[size]")
                .and_then(|s| s.parse().ok())
                .unwrap_or(100)
                .min(2);
            let after: usize = r.q("page[after]").and_then(|s| s.parse().ok()).unwrap_or(0);
            let end = (after + size).min(t.comments.len());
            let more = end < t.comments.len();
            return MockResponse::json(
                200,
                &json!({"comments": t.comments[after..end], "meta": {"has_more": more,
                "after_cursor": end.to_string(), "before_cursor": after.to_string()},
                "links": {"next": format!("{}/api/v2/tickets/{id}/comments.json?page[size]={size}&page[after]={end}", self.base),
                          "prev": null}}),
            );
        }
        MockResponse::json(404, &json!({"error": "InvalidEndpoint"}))
    }
}
