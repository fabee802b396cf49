//! The audit trail: every state-changing or data-reading command appends an
//! entry; `audit verify` names an altered, removed or reordered entry, and a
//! cut-back tail against an anchored head; concurrent writers fork the chain
//! visibly and the next entry merges the fork.

use serde_json::Value;

use crate::support::*;

fn entries(repo: &Repo) -> Vec<(String, Value)> {
    let log = repo.json(["audit", "log"]);
    log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), e[1].clone()))
        .collect()
}

#[test]
fn commands_are_audited_and_tampering_is_named() {
    let mut repo = Repo::new(Kind::Local, "audit").unwrap().init();
    repo.env("CUSTOS_OPERATOR", "alice (ops)");
    let mut rng = rng("audit");
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 3, 10_000);
    let snap = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    repo.restore(&snap, &repo.p("r"));
    repo.ok(["snapshots"]); // a listing: not audited
    repo.run(["restore", "nope", repo.p("x").to_str().unwrap()])
        .expect_failure();

    let log = entries(&repo);
    let commands: Vec<&str> = log
        .iter()
        .map(|(_, e)| e["action"]["command"].as_str().unwrap())
        .collect();
    assert_eq!(
        commands,
        vec!["init", "backup", "restore", "restore"],
        "{log:?}"
    );
    let (_, backup) = &log[1];
    assert_eq!(backup["actor"]["operator"], "alice (ops)");
    assert_eq!(backup["action"]["outcome"], "ok");
    assert_eq!(backup["action"]["counts"]["files"], 3, "{backup}");
    assert!(backup["action"]["subjects"][0]
        .as_str()
        .unwrap()
        .contains(&snap[..8]));
    assert!(log[3].1["action"]["outcome"]
        .as_str()
        .unwrap()
        .starts_with("error"));
    for (i, (_, e)) in log.iter().enumerate() {
        assert_eq!(e["seq"], i as u64);
    }
    repo.ok(["audit", "verify"]);
    let head = repo.json(["audit", "head"])["heads"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(head, log[3].0);

    let raw = repo.raw();
    // Altered: one bit of the backup's entry.
    let name = format!("audit/{}", log[1].0);
    raw.flip(&name, 30);
    let out = repo.run(["audit", "verify"]);
    out.expect_code(1);
    assert!(
        out.stdout.contains(&log[1].0) && out.stdout.contains("altered"),
        "{out}"
    );
    raw.flip(&name, 30);
    repo.ok(["audit", "verify", "--head", &head]);

    // Removed from the middle: the next entry names it.
    let bytes = raw.get(&name);
    raw.delete(&name);
    let out = repo.run(["audit", "verify"]);
    out.expect_code(1);
    assert!(
        out.stdout.contains("missing (removed)") && out.stdout.contains(&log[1].0),
        "{out}"
    );
    raw.put(&name, bytes);

    // Reordered: an entry stored under another sequence number.
    let third = format!("audit/{}", log[2].0);
    let data = raw.get(&third);
    raw.delete(&third);
    let renamed = format!("audit/{:020}-{}", 9, &log[2].0[21..]);
    raw.put(&renamed, data.clone());
    let out = repo.run(["audit", "verify"]);
    out.expect_code(1);
    assert!(out.stdout.contains("reordered"), "{out}");
    raw.delete(&renamed);
    raw.put(&third, data);
    repo.ok(["audit", "verify"]);

    // The tail cut back: invisible without an anchor, named with one.
    let last = format!("audit/{}", log[3].0);
    raw.delete(&last);
    repo.ok(["audit", "verify"]);
    let out = repo.run(["audit", "verify", "--head", &head]);
    out.expect_code(1);
    assert!(
        out.stdout.contains(&head) && out.stdout.contains("cut back"),
        "{out}"
    );
}

/// Two writers that read the same head append two entries with one sequence
/// number. Made deterministic here: the newest entry is set aside while a
/// second command appends, then put back, exactly the state a race leaves.
#[test]
fn concurrent_writers_fork_visibly_and_the_next_entry_merges() {
    let repo = Repo::new(Kind::Local, "audit-fork").unwrap().init();
    let mut rng = rng("audit-fork");
    let a = repo.p("a");
    random_files(&mut rng, &a, "a", 2, 5_000);
    repo.backup(&[&a]);
    let raw = repo.raw();
    let first = entries(&repo);
    let (newest, _) = first.last().unwrap().clone();
    let name = format!("audit/{newest}");
    let kept = raw.get(&name);
    raw.delete(&name);
    repo.ok(["restore", "latest", repo.p("r1").to_str().unwrap()]);
    raw.put(&name, kept);

    let log = repo.json(["audit", "log"]);
    assert_eq!(log["forks"], serde_json::json!([1]), "{log}");
    assert!(
        log["problems"].as_array().unwrap().is_empty(),
        "a fork is not damage: {log}"
    );
    assert_eq!(log["heads"].as_array().unwrap().len(), 2, "{log}");
    let text = repo.ok(["audit", "log"]).stdout;
    assert!(
        text.contains("fork: two writers appended entry 1"),
        "{text}"
    );

    // The next entry names both heads: one chain again.
    repo.ok(["restore", "latest", repo.p("r2").to_str().unwrap()]);
    let log = repo.json(["audit", "log"]);
    assert_eq!(log["heads"].as_array().unwrap().len(), 1, "{log}");
    let merged = &log["entries"].as_array().unwrap().last().unwrap()[1];
    assert_eq!(merged["seq"], 2);
    assert_eq!(merged["prev"].as_array().unwrap().len(), 2, "{merged}");
    repo.ok(["audit", "verify"]);
}
