//! A stateful in-process mock of the HubSpot CRM API: the v3 search and list endpoints, the v4
//! association batch read, the contacts batch read and the OAuth token
//! endpoint (field names from the HubSpot CRM v3 OpenAPI descriptions).
//! Shared by this connector's tests and the e2e suite
//! (`tests/tests/e2e.rs` includes this file by path), so it names only
//! `crate::http::mock` and external crates.

#![allow(dead_code)]

use std::collections::BTreeMap;

use chrono::DateTime;
use serde_json::{json, Value};

use crate::http::mock::{MockRequest, MockResponse};

/// The property a type's modification time is in (contacts have their own).
pub fn modified_prop(object_type: &str) -> &'static str {
    if object_type == "contacts" {
        "lastmodifieddate"
    } else {
        "hs_lastmodifieddate"
    }
}

pub const TOKEN: &str = "hs-private-app-token";

pub struct Obj {
    pub t: String,
    pub v: Value,
    pub modified: i64,
    pub archived_at: Option<i64>,
}

#[derive(Default)]
pub struct State {
    pub objs: BTreeMap<u64, Obj>,
    pub assoc: BTreeMap<u64, Vec<u64>>,
    pub n: i64,
    /// Every mutation bumps `n`; two mutations share one millisecond.
    pub same_ms: bool,
    pub next_id: u64,
    pub cap: usize,
    pub over_cap: usize,
    pub rl: usize,
    pub broken: bool,
    pub junk: bool,
    pub token: String,
    pub refresh: String,
    pub token_requests: usize,
}

pub fn iso(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl State {
    pub fn stamp(&mut self) -> i64 {
        self.n += 1;
        if self.same_ms {
            return 1_800_000_000_000;
        }
        1_700_000_000_000 + (self.n / 2) * 1000
    }

    pub fn add(&mut self, t: &str, contact: Option<u64>) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let ms = self.stamp();
        let mut props = json!({"hs_object_id": id.to_string(), "hs_createdate": iso(ms)});
        if t == "contacts" {
            props["email"] = json!(format!("Customer{id}@Example.org"));
            props["firstname"] = json!("Ana");
            props["lastname"] = json!(format!("Customer {id}"));
            props["phone"] = json!("+351 912 345 678");
            props["createdate"] = json!(iso(ms));
            props["lastmodifieddate"] = json!(iso(ms));
        } else {
            props["hs_lastmodifieddate"] = json!(iso(ms));
            props["hs_timestamp"] = json!(iso(ms));
            let (k, body) = match t {
                "emails" => ("hs_email_text", "Your order shipped"),
                "notes" => ("hs_note_body", "<p>Called back</p>"),
                "calls" => ("hs_call_body", "Discussed renewal"),
                "tasks" => ("hs_task_body", "Send quote"),
                _ => ("hs_communication_body", "WhatsApp: thanks!"),
            };
            props[k] = json!(body);
            if t == "emails" {
                props["hs_email_subject"] = json!(format!("Order {id}"));
                props["hs_email_direction"] = json!("EMAIL");
            }
        }
        let v = json!({"id": id.to_string(), "properties": props, "createdAt": iso(ms),
            "updatedAt": iso(ms), "archived": false});
        self.objs.insert(
            id,
            Obj {
                t: t.into(),
                v,
                modified: ms,
                archived_at: None,
            },
        );
        if let Some(c) = contact {
            self.assoc.insert(id, vec![c]);
        }
        id
    }

    pub fn touch(&mut self, id: u64, note: &str) {
        let ms = self.stamp();
        let o = self.objs.get_mut(&id).unwrap();
        o.modified = ms;
        let p = modified_prop(&o.t);
        o.v["properties"][p] = json!(iso(ms));
        o.v["updatedAt"] = json!(iso(ms));
        o.v["properties"]["custos_test_note"] = json!(note);
    }

    pub fn archive(&mut self, id: u64) {
        let ms = self.stamp();
        self.objs.get_mut(&id).unwrap().archived_at = Some(ms);
    }

    pub fn live(&self, t: &str) -> Vec<u64> {
        self.objs
            .iter()
            .filter(|(_, o)| o.t == t && o.archived_at.is_none())
            .map(|(i, _)| *i)
            .collect()
    }

    pub fn handle(&mut self, r: &MockRequest) -> MockResponse {
        if r.path == "/oauth/v1/token" {
            self.token_requests += 1;
            let f = r.form();
            if f.get("grant_type").map(|s| s.as_str()) != Some("refresh_token")
                || f.get("refresh_token") != Some(&self.refresh)
                || f.get("client_id").map(|s| s.as_str()) != Some("hs-client")
            {
                return MockResponse::json(400, &json!({"status": "BAD_REFRESH_TOKEN"}));
            }
            let n = self.token_requests;
            self.token = format!("access-{n}");
            self.refresh = format!("rt-{}", n + 1);
            return MockResponse::json(
                200,
                &json!({"access_token": self.token, "refresh_token": self.refresh,
                "expires_in": 1800, "token_type": "bearer"}),
            );
        }
        if r.header("authorization") != Some(format!("Bearer {}", self.token).as_str()) {
            return MockResponse::json(
                401,
                &json!({"status": "error", "message": "Authentication credentials not found.", "category": "INVALID_AUTHENTICATION"}),
            );
        }
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let parts: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        match (r.method.as_str(), parts.as_slice()) {
            ("POST", ["crm", "v3", "objects", t, "search"]) => self.search(t, &body),
            ("GET", ["crm", "v3", "objects", t]) => {
                let archived = r.q("archived") == Some("true");
                let limit: usize = r.q("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
                let after: usize = r.q("after").and_then(|l| l.parse().ok()).unwrap_or(0);
                let all: Vec<Value> = self
                    .objs
                    .values()
                    .filter(|o| o.t == *t && o.archived_at.is_some() == archived)
                    .map(|o| {
                        let mut v = o.v.clone();
                        if let Some(a) = o.archived_at {
                            v["archived"] = json!(true);
                            v["archivedAt"] = json!(iso(a));
                        }
                        v
                    })
                    .collect();
                let end = (after + limit).min(all.len());
                let mut ans = json!({"results": all[after.min(end)..end]});
                if end < all.len() {
                    ans["paging"] = json!({"next": {"after": end.to_string(), "link": format!("?after={end}")}});
                }
                MockResponse::json(200, &ans)
            }
            ("POST", ["crm", "v4", "associations", _, "contacts", "batch", "read"]) => {
                let results: Vec<Value> = body["inputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|i| {
                        let id: u64 = i["id"].as_str()?.parse().ok()?;
                        let to = self.assoc.get(&id)?;
                        Some(json!({"from": {"id": id.to_string()}, "to": to.iter().map(|c| json!({"toObjectId": c,
                            "associationTypes": [{"category": "HUBSPOT_DEFINED", "typeId": 198, "label": null}]})).collect::<Vec<_>>()}))
                    })
                    .collect();
                MockResponse::json(
                    200,
                    &json!({"status": "COMPLETE", "results": results,
                    "startedAt": "2024-01-01T00:00:00Z", "completedAt": "2024-01-01T00:00:01Z"}),
                )
            }
            ("POST", ["crm", "v3", "objects", "contacts", "batch", "read"]) => {
                assert_eq!(body["properties"], json!(["email"]));
                let results: Vec<Value> = body["inputs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|i| {
                        let id: u64 = i["id"].as_str()?.parse().ok()?;
                        let o = self.objs.get(&id).filter(|o| o.archived_at.is_none())?;
                        Some(json!({"id": id.to_string(), "properties": {"email": o.v["properties"]["email"]},
                            "createdAt": o.v["createdAt"], "updatedAt": o.v["updatedAt"], "archived": false}))
                    })
                    .collect();
                MockResponse::json(200, &json!({"status": "COMPLETE", "results": results}))
            }
            _ => MockResponse::json(404, &json!({"status": "error", "message": "not found"})),
        }
    }

    pub fn search(&mut self, t: &str, body: &Value) -> MockResponse {
        if self.rl > 0 {
            self.rl -= 1;
            return MockResponse::json(
                429,
                &json!({"status": "error", "message": "You have reached your secondly limit.", "errorType": "RATE_LIMIT"}),
            )
            .header("retry-after", "1");
        }
        if self.broken {
            return MockResponse::raw(200, "application/json", b"{\"results\": [".to_vec());
        }
        let p = modified_prop(t);
        let f = &body["filterGroups"][0]["filters"][0];
        assert_eq!(f["propertyName"], p, "{body}");
        assert_eq!(f["operator"], "GTE");
        assert_eq!(
            body["sorts"][0],
            json!({"propertyName": p, "direction": "ASCENDING"})
        );
        let from: i64 = f["value"].as_str().unwrap().parse().unwrap();
        let limit = body["limit"].as_u64().unwrap() as usize;
        let after: usize = body["after"].as_str().unwrap().parse().unwrap();
        if after + limit > self.cap {
            self.over_cap += 1;
            return MockResponse::json(
                400,
                &json!({"status": "error", "message": format!("paging past {} results is not supported", self.cap), "category": "VALIDATION_ERROR"}),
            );
        }
        let mut hits: Vec<(i64, u64, Value)> = self
            .objs
            .iter()
            .filter(|(_, o)| o.t == t && o.archived_at.is_none() && o.modified >= from)
            .map(|(i, o)| (o.modified, *i, o.v.clone()))
            .collect();
        hits.sort_by_key(|h| (h.0, h.1));
        let total = hits.len();
        let end = (after + limit).min(total);
        let mut results: Vec<Value> = hits[after.min(end)..end]
            .iter()
            .map(|h| h.2.clone())
            .collect();
        if self.junk {
            results.insert(0, json!({"properties": {"hs_note_body": "no id"}}));
        }
        let mut ans = json!({"total": total, "results": results});
        if end < total {
            ans["paging"] =
                json!({"next": {"after": end.to_string(), "link": format!("?after={end}")}});
        }
        MockResponse::json(200, &ans)
    }
}
