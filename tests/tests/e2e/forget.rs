//! `forget`: by policy (dry run explains, real run removes exactly the
//! snapshots the policy does not keep) and by id; what remains checks and
//! restores.

use crate::support::*;

fn ids(repo: &Repo) -> Vec<String> {
    let mut v: Vec<String> = repo
        .snapshots()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn policy_and_ids_local() {
    let repo = Repo::new(Kind::Local, "forget").unwrap().init();
    let src = repo.p("src");
    let mut rng = rng("forget");
    random_files(&mut rng, &src, "f", 5, 2000);
    let legal = repo.backup_with(&[&src], &["--tag", "legal"]);
    let legal_id = s(&legal, "snapshot_id").to_string();
    let mut others = Vec::new();
    for i in 0..3 {
        write_file(&src.join(format!("n{i}")), format!("change {i}").as_bytes());
        others.push(s(&repo.backup(&[&src]), "snapshot_id").to_string());
    }
    assert_eq!(ids(&repo).len(), 4);

    // The dry run explains every decision and removes nothing.
    let plan = repo.json([
        "forget",
        "--keep-last",
        "1",
        "--keep-tag",
        "legal",
        "--dry-run",
    ]);
    assert_eq!(plan["dry_run"], true);
    assert!(plan["removed"].as_array().unwrap().is_empty());
    let decisions = plan["groups"][0]["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 4, "{plan}");
    let kept: Vec<&str> = decisions
        .iter()
        .filter(|d| d["keep"] == true)
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(
        kept.contains(&legal_id.as_str()) && kept.contains(&others[2].as_str()),
        "{plan}"
    );
    assert_eq!(kept.len(), 2, "{plan}");
    let human = repo.ok([
        "forget",
        "--keep-last",
        "1",
        "--keep-tag",
        "legal",
        "--dry-run",
    ]);
    assert!(
        human.stdout.contains("tag legal") && human.stdout.contains("not matched"),
        "{human}"
    );
    assert_eq!(ids(&repo).len(), 4);

    // The real run removes exactly the two others.
    repo.ok(["forget", "--keep-last", "1", "--keep-tag", "legal"]);
    let mut expect = vec![legal_id.clone(), others[2].clone()];
    expect.sort();
    assert_eq!(ids(&repo), expect);

    // A policy that keeps nothing is refused; so are ids mixed with rules.
    repo.run(["forget", "--keep-last", "0"])
        .expect_failure()
        .expect_stderr("keep");
    repo.run(["forget", "--keep-last", "1", &others[2][..8]])
        .expect_failure()
        .expect_stderr("not both");
    repo.run(["forget"])
        .expect_failure()
        .expect_stderr("no policy");

    // By id.
    repo.ok(["forget", &legal_id[..8]]);
    assert_eq!(ids(&repo), vec![others[2].clone()]);
    repo.ok(["check", "--read-data"]);
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);

    // --prune with --json: one document, the prune report nested.
    let both = repo.json(["forget", "--keep-last", "1", "--prune"]);
    assert!(both["prune"]["packs"].is_u64(), "{both}");
    assert!(both["removed"].as_array().unwrap().is_empty(), "{both}");
}
