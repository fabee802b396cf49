//! The Slack, Zendesk, HubSpot and X connectors through the real `custos`
//! binary, killed mid-run: each API is the connector's own stateful test
//! mock (`connectors/src/<api>/mock.rs`, fields from the vendor's API
//! reference) served on 127.0.0.1 with a latency per request. A first full
//! backup is timed; then each trial adds and changes records at the mock and
//! SIGKILLs a full re-listing (`backup --force`) at a random point of that
//! span, and a normal backup follows. At the end every record the mock holds
//! is in the snapshot once, restores byte-identical to the payload the mock
//! serves (attachments too), and `check --read-data` passes. Knobs:
//! `CUSTOS_TEST_API_KILL_TRIALS` (default 3), `CUSTOS_TEST_API_KILL_SIZE`
//! (records seeded per API, default 400).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::mock::{MockRequest, MockResponse, MockServer};
use crate::hubspot_mock as hubspot;
use crate::slack_mock as slack;
use crate::support::*;
use crate::x_mock as x;
use crate::zendesk_mock as zendesk;

/// What the mock holds now: record id → the payload the connector stores
/// for it, and the bytes of every attachment (sorted).
struct Holding {
    records: BTreeMap<String, Vec<u8>>,
    attachments: Vec<Vec<u8>>,
}

/// One API under test.
struct Api {
    /// Test and repository name.
    name: &'static str,
    /// The `[[source]]` table, `base_url` pointing at the mock.
    source: String,
    /// Adds (and changes) records at the mock before trial `i`.
    grow: Box<dyn FnMut(usize)>,
    /// The mock's records now.
    holding: Box<dyn Fn() -> Holding>,
    /// A restored record's id, read from its payload.
    id_of: fn(&Value) -> String,
}

/// A multi-threaded runtime for the mock servers (the tests are synchronous).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A mock API over shared `state`, answering after [`LATENCY`]: the state
/// (for the test to grow) and the server.
fn serve<S: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    state: S,
    handle: fn(&mut S, &MockRequest) -> MockResponse,
) -> (Arc<Mutex<S>>, MockServer) {
    let state = Arc::new(Mutex::new(state));
    let st = state.clone();
    let srv = rt.block_on(MockServer::start(move |r| {
        handle(&mut st.lock().unwrap(), r)
    }));
    srv.set_latency(LATENCY);
    (state, srv)
}

/// Every record at `srv` is backed up once and restores byte-identical,
/// through kills: see the module doc.
fn kill_rerun_restore(srv: &MockServer, mut api: Api) {
    let t0 = Instant::now();
    let test = api.name;
    let repo = Repo::new(Kind::Local, test)
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(cfg, "\n{}\n", api.source);
    std::fs::write(repo.config_path(), cfg).unwrap();

    let start = Instant::now();
    let r0 = single_report(&repo.run(["--json", "backup"]));
    let span = start.elapsed();
    let n0 = (api.holding)().records.len();
    assert_eq!(u(&r0["summary"], "records_total"), n0 as u64, "{r0}");
    println!("{test}: first backup of {n0} records in {span:?}");

    let mut rng = rng(test);
    let mut killed = 0;
    let trials = knob("CUSTOS_TEST_API_KILL_TRIALS", 3);
    for trial in 0..trials {
        (api.grow)(trial);
        // Mid-run: died by the signal after the mock had answered it.
        let before = srv.requests().len();
        let died = kill_backup_midway(&repo, span, &mut rng, 0.2..0.8);
        let answered = srv.requests().len() - before;
        println!("{test}: trial {trial}: killed {died} after {answered} answers");
        if died && answered > 0 {
            killed += 1;
        }
        let out = repo.run(["--json", "backup"]);
        out.expect_ok();
        let r = single_report(&out);
        assert_eq!(
            u(&r["summary"], "records_total"),
            (api.holding)().records.len() as u64,
            "{test}: trial {trial}: {r}"
        );
    }
    assert!(
        killed >= 1,
        "{test}: none of {trials} trials killed a running backup (span {span:?})"
    );
    repo.ok(["check", "--read-data"]);

    let want = (api.holding)();
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let (records, attachments) = restored(&dest, api.id_of);
    assert_eq!(
        records.len(),
        want.records.len(),
        "{test}: no duplicates, nothing lost"
    );
    for (id, bytes) in &want.records {
        let got = records
            .get(id)
            .unwrap_or_else(|| panic!("{test}: record {id} not restored"));
        assert!(
            got == bytes,
            "{test}: {id}: restored {} != served {}",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(bytes)
        );
    }
    assert!(
        attachments == want.attachments,
        "{test}: {} attachments restored, {} served, or their bytes differ",
        attachments.len(),
        want.attachments.len()
    );
    println!(
        "{test}: {} records ({} attachments), {killed}/{trials} runs killed, {:?}",
        records.len(),
        attachments.len(),
        t0.elapsed()
    );
}

/// Restored records (id → bytes; an id restored twice fails) and the bytes
/// of every restored attachment (sorted). Records are the files outside
/// `*.attachments/` directories.
fn restored(dest: &Path, id_of: fn(&Value) -> String) -> (BTreeMap<String, Vec<u8>>, Vec<Vec<u8>>) {
    let mut records = BTreeMap::new();
    let mut attachments = Vec::new();
    for (p, bytes) in read_all_files(dest) {
        let rel = p.strip_prefix(dest).unwrap();
        if rel
            .parent()
            .into_iter()
            .flat_map(|d| d.components())
            .any(|c| c.as_os_str().to_string_lossy().ends_with(".attachments"))
        {
            attachments.push(bytes);
            continue;
        }
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
        let id = id_of(&v);
        assert!(
            records.insert(id.clone(), bytes).is_none(),
            "{id} restored twice ({})",
            p.display()
        );
    }
    attachments.sort();
    (records, attachments)
}

/// Records seeded per API.
fn size() -> usize {
    knob("CUSTOS_TEST_API_KILL_SIZE", 400)
}

/// Per-request latency of the mocks: with it a full listing takes long
/// enough that a kill at a random point lands mid-run.
const LATENCY: Duration = Duration::from_millis(4);

/// A client rate limit that never waits (the mock has none).
const FAST: &str = "http = { requests_per_second = 100000.0, burst = 1000, backoff_base_ms = 10 }";

#[test]
fn slack_backup_killed_mid_run_reruns_without_loss_or_duplicates() {
    let rt = runtime();
    let (state, srv) = serve(&rt, slack::State::default(), slack::State::handle);
    {
        let mut s = state.lock().unwrap();
        s.base = srv.url();
        s.clock = chrono::Utc::now().timestamp() - 3 * 86400;
        s.users = (1..=3)
            .map(|i| {
                json!({"id": format!("U{i}"), "name": format!("user{i}"),
            "profile": {"email": format!("user{i}@example.org")}})
            })
            .collect();
        for (id, name) in [("C01SUPPORT", "support"), ("C02SALES", "sales")] {
            s.chans.push(slack::Chan {
                id: id.into(),
                name: name.into(),
                ..Default::default()
            });
        }
        for i in 0..size() {
            s.add_message(i % 2, i % 50 == 7);
        }
        let parent = s.chans[0].msgs.keys().next().unwrap().clone();
        s.add_reply(0, &parent);
    }
    let grow = {
        let state = state.clone();
        move |_trial: usize| {
            let mut s = state.lock().unwrap();
            for i in 0..40 {
                s.add_message(i % 2, i == 3);
            }
            // A new reply on an old thread changes its parent too.
            let parent = s.chans[1].msgs.keys().nth(5).unwrap().clone();
            s.add_reply(1, &parent);
        }
    };
    let holding = {
        let state = state.clone();
        move || {
            let s = state.lock().unwrap();
            let mut records = BTreeMap::new();
            let mut attachments = Vec::new();
            for c in &s.chans {
                for (ts, m) in &c.msgs {
                    records.insert(ts.clone(), m.v.to_string().into_bytes());
                    for r in m.replies.values() {
                        records.insert(
                            r["ts"].as_str().unwrap().to_string(),
                            r.to_string().into_bytes(),
                        );
                    }
                    for f in m.v["files"].as_array().into_iter().flatten() {
                        attachments.push(s.files[f["id"].as_str().unwrap()].clone());
                    }
                }
            }
            attachments.sort();
            Holding {
                records,
                attachments,
            }
        }
    };
    let api = Api {
        name: "api-kill-slack",
        source: format!(
            "[[source]]\nname = \"slack\"\ntype = \"slack\"\nbase_url = \"{}/api/\"\n\
             token_command = \"printf {}\"\nrecent_window_hours = 1\n{FAST}",
            srv.url(),
            slack::TOKEN
        ),
        grow: Box::new(grow),
        holding: Box::new(holding),
        id_of: |v| v["ts"].as_str().unwrap().to_string(),
    };
    kill_rerun_restore(&srv, api);
}

#[test]
fn zendesk_backup_killed_mid_run_reruns_without_loss_or_duplicates() {
    let rt = runtime();
    let (state, srv) = serve(&rt, zendesk::State::default(), zendesk::State::handle);
    {
        let mut s = state.lock().unwrap();
        s.base = srv.url();
        for u in 20..23u64 {
            s.users.insert(
                u,
                json!({"id": u, "name": format!("Customer {u}"),
                "email": format!("customer{u}@example.org"), "role": "end-user"}),
            );
        }
        for _ in 0..size() / 2 {
            s.add_ticket();
        }
    }
    let grow = {
        let state = state.clone();
        move |trial: usize| {
            let mut s = state.lock().unwrap();
            for _ in 0..20 {
                s.add_ticket();
            }
            // A new comment on an old ticket.
            let id = 3 + trial as u64;
            let c = s.comment(id, true);
            s.tickets.get_mut(&id).unwrap().comments.push(c);
            s.touch(id);
        }
    };
    let holding = {
        let state = state.clone();
        move || {
            let s = state.lock().unwrap();
            let mut records = BTreeMap::new();
            let mut attachments = Vec::new();
            for (id, t) in &s.tickets {
                let comments: Vec<String> = t.comments.iter().map(|c| c.to_string()).collect();
                let payload = format!(
                    "{{\"ticket\":{},\"comments\":[{}]}}",
                    t.v,
                    comments.join(",")
                );
                records.insert(id.to_string(), payload.into_bytes());
                for c in &t.comments {
                    for _ in c["attachments"].as_array().into_iter().flatten() {
                        attachments.push(zendesk::att_bytes(c["id"].as_u64().unwrap()));
                    }
                }
            }
            attachments.sort();
            Holding {
                records,
                attachments,
            }
        }
    };
    let api = Api {
        name: "api-kill-zendesk",
        source: format!(
            "[[source]]\nname = \"zendesk\"\ntype = \"zendesk\"\nbase_url = \"{}\"\n\
             email = \"{}\"\napi_token_command = \"printf {}\"\n{FAST}",
            srv.url(),
            zendesk::EMAIL,
            zendesk::TOKEN
        ),
        grow: Box::new(grow),
        holding: Box::new(holding),
        id_of: |v| v["ticket"]["id"].as_u64().unwrap().to_string(),
    };
    kill_rerun_restore(&srv, api);
}

#[test]
fn hubspot_backup_killed_mid_run_reruns_without_loss_or_duplicates() {
    const TYPES: [&str; 6] = [
        "contacts",
        "emails",
        "notes",
        "calls",
        "tasks",
        "communications",
    ];
    let rt = runtime();
    let initial = hubspot::State {
        cap: 10_000,
        token: hubspot::TOKEN.into(),
        ..Default::default()
    };
    let (state, srv) = serve(&rt, initial, hubspot::State::handle);
    {
        let mut s = state.lock().unwrap();
        let contacts: Vec<u64> = (0..size() / 6).map(|_| s.add("contacts", None)).collect();
        for i in 0..size() - contacts.len() {
            let t = TYPES[1 + i % 5];
            s.add(t, (i % 2 == 0).then(|| contacts[i % contacts.len()]));
        }
    }
    let grow = {
        let state = state.clone();
        move |trial: usize| {
            let mut s = state.lock().unwrap();
            for i in 0..30 {
                s.add(TYPES[i % 6], None);
            }
            // Changed: one contact and one note of the first seeding.
            s.touch(1 + trial as u64, &format!("changed in trial {trial}"));
            let note = s.live("notes")[trial];
            s.touch(note, &format!("changed in trial {trial}"));
        }
    };
    let holding = {
        let state = state.clone();
        move || {
            let s = state.lock().unwrap();
            let records = s
                .objs
                .iter()
                .filter(|(_, o)| o.archived_at.is_none())
                .map(|(id, o)| (id.to_string(), o.v.to_string().into_bytes()))
                .collect();
            Holding {
                records,
                attachments: Vec::new(),
            }
        }
    };
    let api = Api {
        name: "api-kill-hubspot",
        source: format!(
            "[[source]]\nname = \"hubspot\"\ntype = \"hubspot\"\nbase_url = \"{}\"\n\
             access_token_command = \"printf {}\"\npage_size = 10\n{FAST}",
            srv.url(),
            hubspot::TOKEN
        ),
        grow: Box::new(grow),
        holding: Box::new(holding),
        id_of: |v| v["id"].as_str().unwrap().to_string(),
    };
    kill_rerun_restore(&srv, api);
}

#[test]
fn x_backup_killed_mid_run_reruns_without_loss_or_duplicates() {
    let rt = runtime();
    let (state, srv) = serve(&rt, x::State::default(), x::State::handle);
    {
        let mut s = state.lock().unwrap();
        for i in 0..size() {
            if i % 2 == 0 {
                s.mention();
            } else {
                s.dm(i % 3 == 0);
            }
        }
    }
    let grow = {
        let state = state.clone();
        move |_trial: usize| {
            let mut s = state.lock().unwrap();
            for i in 0..40 {
                if i % 2 == 0 {
                    s.mention();
                } else {
                    s.dm(i % 3 == 0);
                }
            }
        }
    };
    let holding = {
        let state = state.clone();
        move || {
            let s = state.lock().unwrap();
            let records = s
                .mentions
                .iter()
                .chain(&s.dms)
                .map(|(id, v)| (id.to_string(), v.to_string().into_bytes()))
                .collect();
            Holding {
                records,
                attachments: Vec::new(),
            }
        }
    };
    let api = Api {
        name: "api-kill-x",
        source: format!(
            "[[source]]\nname = \"x\"\ntype = \"x\"\nbase_url = \"{}\"\n\
             bearer_token_command = \"printf {}\"\npage_size = 5\n{FAST}",
            srv.url(),
            x::TOKEN
        ),
        grow: Box::new(grow),
        holding: Box::new(holding),
        id_of: |v| v["id"].as_str().unwrap().to_string(),
    };
    kill_rerun_restore(&srv, api);
}
