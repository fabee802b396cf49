//! Record retention and legal holds: `retention apply` removes records past
//! their rule's retention from every snapshot, a hold keeps what it covers
//! until released, the disposal log says what went, and prune frees the data.

use std::fmt::Write as _;

use serde_json::Value;

use crate::support::*;

fn add_config(repo: &Repo, toml: &str) {
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(cfg, "\n{toml}\n");
    std::fs::write(repo.config_path(), cfg).unwrap();
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["meta"]["record_id"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn holds_override_rules_and_the_log_records_disposals_local() {
    let repo = Repo::new(Kind::Local, "retention")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let export = repo.p("tickets.jsonl");
    std::fs::write(
        &export,
        concat!(
            "{\"id\":\"t1\",\"created\":\"2015-01-01T00:00:00Z\",\"email\":\"ana@example.org\",\"subject\":\"old, on hold\"}\n",
            "{\"id\":\"t2\",\"created\":\"2015-06-01T00:00:00Z\",\"email\":\"bo@example.org\",\"subject\":\"old\"}\n",
            "{\"id\":\"t3\",\"created\":\"2026-10-01T00:00:00Z\",\"email\":\"bo@example.org\",\"subject\":\"recent\"}\n",
        ),
    )
    .unwrap();
    add_config(
        &repo,
        &format!(
            "[[source]]\nname = \"helpdesk\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\ntime_field = \"created\"\ncustomer_fields = [\"email:email\"]\nsubject_field = \"subject\"\nkind = \"ticket\"\n\n[record_retention]\ndefault = \"forever\"\n[[record_retention.rule]]\nname = \"tickets 3y\"\nkind = \"ticket\"\nkeep = \"3y\"",
            toml_str(&export.display().to_string())
        ),
    );
    repo.ok(["backup"]);
    repo.ok(["backup"]); // a second snapshot of the same state: both get rewritten
    assert_eq!(ids(&repo.json(["find"])), ["t1", "t2", "t3"]);

    repo.ok([
        "hold",
        "add",
        "case-1",
        "--reason",
        "litigation 2026-17",
        "--customer",
        "ana@example.org",
    ]);
    repo.run(["hold", "add", "case-1", "--reason", "again"])
        .expect_failure()
        .expect_stderr("already active");
    let holds = repo.json(["hold", "list"]);
    assert_eq!(holds.as_array().unwrap().len(), 1, "{holds}");

    // Dry run: t2 would go, t1 is held.
    let dry = repo.json(["retention", "apply", "--dry-run"]);
    assert_eq!(u(&dry, "held"), 2, "{dry}"); // t1 in each of the 2 snapshots
    assert_eq!(u(&dry["removed"][0], "records"), 2, "{dry}");
    assert_eq!(dry["removed"][0]["rule"], "tickets 3y");
    // It names the record that would go (once, in 2 snapshots), not bodies or addresses.
    let listed = dry["records"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{dry}");
    assert_eq!(listed[0]["record_id"], "t2");
    assert_eq!(listed[0]["kind"], "ticket");
    assert_eq!(listed[0]["rule"], "tickets 3y");
    assert_eq!(listed[0]["collection"], "tickets");
    assert_eq!(u(&listed[0], "snapshots"), 2);
    let human = repo.ok(["retention", "apply", "--dry-run"]).stdout.clone();
    assert!(
        human.contains("t2") && human.contains("tickets 3y"),
        "{human}"
    );
    assert!(
        !human.contains("t1") && !human.contains("example.org") && !human.contains("subject"),
        "{human}"
    );
    assert_eq!(
        ids(&repo.json(["find"])),
        ["t1", "t2", "t3"],
        "a dry run changes nothing"
    );

    let applied = repo.json(["retention", "apply", "--no-prune"]);
    assert_eq!(u(&applied, "snapshots_rewritten"), 2, "{applied}");
    assert!(applied.get("prune").is_none(), "{applied}");
    assert!(applied.get("records").is_none(), "{applied}");
    for snap in repo.snapshots() {
        let found = repo.json(["find", "--snapshot", s(&snap, "id")]);
        assert_eq!(ids(&found), ["t1", "t3"], "{found}");
    }
    let log = repo.json(["retention", "log"]);
    assert_eq!(log.as_array().unwrap().len(), 1, "{log}");
    assert_eq!(u(&log[0]["entry"]["removed"][0], "records"), 2);

    // Released: t1 goes too, and the prune that follows marks the data of
    // both (deleted after the grace period).
    repo.ok(["hold", "release", "case-1", "--reason", "case closed"]);
    assert!(repo.json(["hold", "list"]).as_array().unwrap().is_empty());
    let applied = repo.json(["retention", "apply"]);
    let pruned = &applied["prune"];
    assert!(
        u(pruned, "packs_marked") + u(pruned, "packs_repacked") >= 1,
        "{applied}"
    );
    assert_eq!(u(pruned, "packs_deleted"), 0, "24h grace: {applied}");
    assert_eq!(ids(&repo.json(["find"])), ["t3"]);
    assert_eq!(repo.json(["retention", "log"]).as_array().unwrap().len(), 2);

    // After the grace period the data goes; what remains checks and restores.
    let swept = repo.json(["prune", "--grace", "0s"]);
    assert!(u(&swept, "packs_deleted") >= 1, "{swept}");
    repo.ok(["check", "--read-data"]);
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    let files = read_all_files(&dest);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(String::from_utf8_lossy(&files[0].1).contains("\"t3\""));
    // The next backup continues from the rewritten snapshot: nothing comes back.
    repo.ok(["backup"]);
    assert_eq!(ids(&repo.json(["find"])), ["t3"]);
}

/// Legal holds stop rotation: `forget --keep-last 1` keeps an older snapshot
/// holding a held record that the newer one no longer has (deleted at the
/// source, mirror mode), says why, refuses to forget it by id, and forgets it
/// once the hold is released. Holds by kind and source, and by creation
/// time, keep it too; a hold on another source does not.
#[test]
fn holds_stop_forget_local() {
    let repo = Repo::new(Kind::Local, "hold-forget")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let export = repo.p("tickets.jsonl");
    let ana = "{\"id\":\"t1\",\"created\":\"2024-03-01T00:00:00Z\",\"email\":\"ana@example.org\",\"subject\":\"ana\"}\n";
    let bo = "{\"id\":\"t2\",\"created\":\"2025-05-01T00:00:00Z\",\"email\":\"bo@example.org\",\"subject\":\"bo\"}\n";
    std::fs::write(&export, format!("{ana}{bo}")).unwrap();
    add_config(
        &repo,
        &format!(
            "[[source]]\nname = \"helpdesk\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\ntime_field = \"created\"\ncustomer_fields = [\"email:email\"]\nsubject_field = \"subject\"\nkind = \"ticket\"\nmode = \"mirror\"",
            toml_str(&export.display().to_string())
        ),
    );
    repo.ok(["backup"]);
    std::fs::write(&export, bo).unwrap(); // Ana's ticket deleted at the source
    repo.ok(["backup"]);
    let mut snaps = repo.snapshots();
    snaps.sort_by(|a, b| s(a, "time").cmp(s(b, "time")));
    let old = s(&snaps[0], "id").to_string();
    let new = s(&snaps[1], "id").to_string();
    assert_eq!(ids(&repo.json(["find", "--snapshot", &old])), ["t1", "t2"]);
    assert_eq!(ids(&repo.json(["find", "--snapshot", &new])), ["t2"]);

    // The reasons forget gives for the old snapshot (dry run).
    let reasons = |repo: &Repo| -> Vec<Value> {
        let plan = repo.json(["forget", "--keep-last", "1", "--dry-run"]);
        let d = plan["groups"][0]["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == old.as_str())
            .unwrap_or_else(|| panic!("{plan}"))
            .clone();
        assert_eq!(
            d["keep"],
            !d["reasons"].as_array().unwrap().is_empty(),
            "{d}"
        );
        d["reasons"].as_array().unwrap().clone()
    };
    assert!(
        reasons(&repo).is_empty(),
        "no hold: the old snapshot would go"
    );

    repo.ok([
        "hold",
        "add",
        "case-ana",
        "--reason",
        "litigation",
        "--customer",
        "ana@example.org",
    ]);
    assert_eq!(
        reasons(&repo),
        [serde_json::json!({"rule": "hold", "name": "case-ana"})]
    );
    let human = repo
        .ok(["forget", "--keep-last", "1", "--dry-run"])
        .stdout
        .clone();
    assert!(
        human.contains(&format!("keep {}: hold case-ana", &old[..8])),
        "{human}"
    );
    // Named by id: refused, nothing removed.
    repo.run(["forget", &old[..8]])
        .expect_code(1)
        .expect_stderr("case-ana")
        .expect_stderr(&old[..8]);
    // By policy: kept.
    let done = repo.json(["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"], serde_json::json!([]), "{done}");
    assert_eq!(repo.snapshots().len(), 2);
    assert_eq!(ids(&repo.json(["find", "--snapshot", &old])), ["t1", "t2"]);
    repo.ok(["hold", "release", "case-ana", "--reason", "settled"]);

    // A hold on another source keeps nothing; one by source and kind, or by
    // creation time, keeps the old snapshot (both snapshots have tickets of
    // helpdesk, only the old one a ticket created in 2024).
    repo.ok(["hold", "add", "other", "--reason", "r", "--source", "crm"]);
    assert!(reasons(&repo).is_empty());
    repo.ok([
        "hold", "add", "tickets", "--reason", "r", "--source", "helpdesk", "--kind", "ticket",
    ]);
    assert_eq!(
        reasons(&repo),
        [serde_json::json!({"rule": "hold", "name": "tickets"})]
    );
    repo.ok(["hold", "release", "tickets", "--reason", "r"]);
    repo.ok(["hold", "add", "emails", "--reason", "r", "--kind", "email"]);
    assert!(reasons(&repo).is_empty(), "no email in any snapshot");
    repo.ok([
        "hold",
        "add",
        "y2024",
        "--reason",
        "r",
        "--from",
        "2024-01-01",
        "--until",
        "2025-01-01",
    ]);
    assert_eq!(
        reasons(&repo),
        [serde_json::json!({"rule": "hold", "name": "y2024"})]
    );
    let listed = repo.json(["hold", "list"]);
    let y = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "y2024")
        .unwrap();
    assert_eq!(y["from"], "2024-01-01T00:00:00Z", "{listed}");
    assert_eq!(y["until"], "2025-01-01T00:00:00Z", "{listed}");
    repo.run([
        "hold",
        "add",
        "bad",
        "--reason",
        "r",
        "--from",
        "2025-01-01",
        "--until",
        "2024-01-01",
    ])
    .expect_code(1)
    .expect_stderr("--from");
    repo.ok(["hold", "release", "y2024", "--reason", "r"]);

    // Released: forget removes it.
    let done = repo.json(["forget", "--keep-last", "1"]);
    assert_eq!(done["removed"], serde_json::json!([old]), "{done}");
    let left = repo.snapshots();
    assert_eq!(left.len(), 1);
    assert_eq!(s(&left[0], "id"), new);
}

/// A source's `jurisdiction` key marks its records, a connector's own
/// jurisdiction field wins over it, and a rule for `jurisdiction = "EU"`
/// shorter than the kind's rule removes only the EU records of that age.
#[test]
fn jurisdiction_rules_match_source_and_record_jurisdictions_local() {
    let repo = Repo::new(Kind::Local, "retention-jurisdiction")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let ago = |days: i64| (chrono::Utc::now() - chrono::Duration::days(days)).to_rfc3339();
    // 30 months old: past the EU rule (2y), within the chat rule (3y).
    let (mid, new, ancient) = (ago(913), ago(365), ago(4 * 365 + 30));
    let line = |id: &str, ts: &str, region: Option<&str>| match region {
        Some(r) => format!("{{\"id\":\"{id}\",\"ts\":\"{ts}\",\"region\":\"{r}\"}}\n"),
        None => format!("{{\"id\":\"{id}\",\"ts\":\"{ts}\"}}\n"),
    };
    let eu = repo.p("eu.jsonl");
    std::fs::write(
        &eu,
        [
            line("eu-mid", &mid, None),          // EU (source): goes
            line("eu-new", &new, None),          // EU, young: stays
            line("eu-us-mid", &mid, Some("US")), // own US wins: chat 3y, stays
        ]
        .concat(),
    )
    .unwrap();
    let us = repo.p("us.jsonl");
    std::fs::write(
        &us,
        [
            line("us-mid", &mid, None),          // US (source): stays
            line("us-fr-mid", &mid, Some("FR")), // own FR, an EU member: goes
            line("us-ancient", &ancient, None),  // past 3y: goes by the chat rule
        ]
        .concat(),
    )
    .unwrap();
    let source = |name: &str, path: &std::path::Path, jur: &str| {
        format!(
            "[[source]]\nname = \"{name}\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\ntime_field = \"ts\"\njurisdiction_field = \"region\"\nkind = \"chat_message\"\njurisdiction = \"{jur}\"\n",
            toml_str(&path.display().to_string())
        )
    };
    add_config(
        &repo,
        &format!(
            "{}\n{}\n[record_retention]\ndefault = \"forever\"\n[[record_retention.rule]]\nname = \"chat 3y\"\nkind = \"chat_message\"\nkeep = \"3y\"\n[[record_retention.rule]]\nname = \"EU chat 2y\"\nkind = \"chat_message\"\njurisdiction = \"EU\"\nkeep = \"2y\"",
            source("chat-eu", &eu, "EU"),
            source("chat-us", &us, "us"),
        ),
    );
    repo.ok(["backup"]);
    let all = repo.json(["find"]);
    assert_eq!(
        ids(&all),
        [
            "eu-mid",
            "eu-new",
            "eu-us-mid",
            "us-ancient",
            "us-fr-mid",
            "us-mid"
        ]
    );
    let jurisdiction_of = |v: &Value, id: &str| -> String {
        v.as_array()
            .unwrap()
            .iter()
            .find(|h| h["meta"]["record_id"] == id)
            .and_then(|h| h["meta"]["jurisdiction"].as_str())
            .unwrap_or_else(|| panic!("{id} has no jurisdiction in {v}"))
            .to_string()
    };
    for (id, want) in [
        ("eu-mid", "EU"),
        ("eu-new", "EU"),
        ("eu-us-mid", "US"),
        ("us-mid", "US"),
        ("us-fr-mid", "FR"),
    ] {
        assert_eq!(jurisdiction_of(&all, id), want, "{id}");
    }

    let removed = |v: &Value| -> Vec<(String, String, u64)> {
        let mut out: Vec<_> = v["removed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    s(r, "rule").to_string(),
                    s(r, "source").to_string(),
                    u(r, "records"),
                )
            })
            .collect();
        out.sort();
        out
    };
    let want = vec![
        ("EU chat 2y".to_string(), "chat-eu".to_string(), 1),
        ("EU chat 2y".to_string(), "chat-us".to_string(), 1),
        ("chat 3y".to_string(), "chat-us".to_string(), 1),
    ];
    let dry = repo.json(["retention", "apply", "--dry-run"]);
    assert_eq!(removed(&dry), want, "{dry}");
    assert_eq!(
        ids(&repo.json(["find"])).len(),
        6,
        "a dry run changes nothing"
    );

    let applied = repo.json(["retention", "apply"]);
    assert_eq!(removed(&applied), want, "{applied}");
    assert_eq!(u(&applied, "snapshots_rewritten"), 2, "{applied}");
    assert_eq!(ids(&repo.json(["find"])), ["eu-new", "eu-us-mid", "us-mid"]);
    let log = repo.json(["retention", "log"]);
    assert_eq!(removed(&log[0]["entry"]), want, "{log}");
}

/// A `jurisdiction` added to a source later reaches the records already
/// backed up only through a full listing (`backup --force`), as documented.
#[test]
fn a_source_jurisdiction_added_later_applies_on_a_full_listing_local() {
    let repo = Repo::new(Kind::Local, "retention-jurisdiction-later")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let export = repo.p("chat.jsonl");
    std::fs::write(&export, "{\"id\":\"c1\",\"ts\":\"2025-01-01T00:00:00Z\"}\n").unwrap();
    add_config(
        &repo,
        &format!(
            "[[source]]\nname = \"chat\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\ntime_field = \"ts\"\nkind = \"chat_message\"\n#JURISDICTION\n",
            toml_str(&export.display().to_string())
        ),
    );
    let jurisdiction = |repo: &Repo| -> Option<String> {
        let found = repo.json(["find"]);
        assert_eq!(ids(&found), ["c1"], "{found}");
        found[0]["meta"]["jurisdiction"]
            .as_str()
            .map(str::to_string)
    };
    repo.ok(["backup"]);
    assert_eq!(jurisdiction(&repo), None);
    let cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    std::fs::write(
        repo.config_path(),
        cfg.replace("#JURISDICTION", "jurisdiction = \"DE\""),
    )
    .unwrap();
    repo.ok(["backup"]); // incremental: the unchanged record is carried forward
    assert_eq!(jurisdiction(&repo), None);
    repo.ok(["backup", "--force"]);
    assert_eq!(jurisdiction(&repo).as_deref(), Some("DE"));
}
