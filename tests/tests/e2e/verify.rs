//! `restore-verify` and `verify-history` through the CLI: a passing DR test of
//! a directory source and an mbox record source (local and S3) with RPO/RTO
//! verdicts and a live comparison with the mbox; a damaged data pack, a
//! count mismatch and an RPO breach each fail naming what differed; a sampled
//! run reports an estimated RTO; the history lists runs newest first.

use std::fmt::Write as _;
use std::sync::Arc;

use serde_json::Value;

use crate::support::*;

/// An mbox with `n` simple messages (no body line starts with "From ").
fn mbox(ids: &[usize]) -> Vec<u8> {
    let mut out = String::new();
    for i in ids {
        let _ = write!(
            out,
            "From sender@example.org Mon Nov  2 09:15:00 2026\n\
             Message-ID: <verify-{i}@example.org>\n\
             Date: Mon, 02 Nov 2026 09:{:02}:00 +0100\n\
             From: c{i}@example.org\n\
             To: support@example.com\n\
             Subject: case {i}\n\n\
             Hello {i}\nBye\n\n",
            i % 60
        );
    }
    out.into_bytes()
}

fn add_config(repo: &Repo, toml: &str) {
    let mut cfg = std::fs::read_to_string(repo.config_path()).unwrap();
    let _ = write!(cfg, "\n{toml}\n");
    std::fs::write(repo.config_path(), cfg).unwrap();
}

/// The one target's report of a `restore-verify --json` run.
#[track_caller]
fn target_report(v: &Value) -> &Value {
    let t = v["targets"].as_array().expect("targets array");
    assert_eq!(t.len(), 1, "{v:#}");
    &t[0]
}

/// The check of `source` in a target report.
#[track_caller]
fn check_of<'a>(t: &'a Value, source: &str) -> &'a Value {
    t["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["source"] == source)
        .unwrap_or_else(|| panic!("no check of source {source}: {t:#}"))
}

/// `restore-verify --json <args>`, requiring `code`.
#[track_caller]
fn verify_json(repo: &Repo, args: &[&str], code: i32) -> (Value, Out) {
    let mut all = vec!["--json", "restore-verify"];
    all.extend_from_slice(args);
    let out = repo.run(all);
    out.expect_code(code);
    (out.json(), out)
}

fn passing(kind: Kind, test: &str) {
    let Some(repo) = Repo::new(kind, test) else {
        return;
    };
    let repo = repo.with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1");
    let repo = repo.init();
    let mut rng = rng(test);
    let src = repo.p("files");
    random_files(&mut rng, &src, "f", 6, 120_000);
    write_file(&src.join("sub/notes.txt"), &text_bytes(&mut rng, 30_000));
    let mbox_path = repo.p("export.mbox");
    std::fs::write(&mbox_path, mbox(&[1, 2, 3])).unwrap();
    add_config(
        &repo,
        &format!(
            "[[source]]\nname = \"docs\"\ntype = \"directory\"\npaths = [{}]\nrpo = \"26h\"\nrto = \"4h\"\n\n\
             [[source]]\nname = \"mail\"\ntype = \"mbox\"\npath = {}\nmode = \"archive\"\nrpo = \"1h\"\nrto = \"30m\"",
            toml_str(&src.display().to_string()),
            toml_str(&mbox_path.display().to_string())
        ),
    );
    repo.ok(["--json", "backup"]);

    let scratch = repo.p("scratch");
    let (v, _) = verify_json(
        &repo,
        &[
            "--scratch",
            scratch.to_str().unwrap(),
            "--against-source",
            "10",
        ],
        0,
    );
    assert_eq!(v["ok"], true, "{v:#}");
    let t = target_report(&v);
    assert_eq!(t["target"], "repo");
    assert!(
        t["record_id"].as_str().is_some_and(|s| s.len() == 64),
        "{t:#}"
    );
    assert!(t["errors"].as_array().unwrap().is_empty(), "{t:#}");

    let docs = check_of(t, "docs");
    assert_eq!(docs["ok"], true, "{docs:#}");
    assert_eq!(docs["sampled"], false);
    assert_eq!(u(docs, "files_expected"), 7, "{docs:#}");
    assert_eq!(u(docs, "files_verified"), 7, "{docs:#}");
    assert_eq!(u(docs, "bytes_verified"), 6 * 120_000 + 30_000, "{docs:#}");
    assert_eq!(u(docs, "bytes_total"), u(docs, "bytes_verified"));
    assert!(docs["snapshot_id"].as_str().is_some_and(|s| s.len() == 64));
    for key in [
        "restore_seconds",
        "duration_seconds",
        "throughput_bytes_per_second",
    ] {
        assert!(docs[key].as_f64().is_some(), "{key}: {docs:#}");
    }
    assert!(docs["throughput_bytes_per_second"].as_f64().unwrap() > 0.0);
    assert_eq!(docs["rpo"]["limit_seconds"].as_f64(), Some(26.0 * 3600.0));
    assert!(docs["rpo"]["age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(docs["rpo"]["ok"], true);
    assert_eq!(docs["rto"]["limit_seconds"].as_f64(), Some(4.0 * 3600.0));
    assert_eq!(docs["rto"]["estimate"], false);
    assert_eq!(docs["rto"]["ok"], true);
    assert!(docs["failures"].as_array().unwrap().is_empty());

    let mail = check_of(t, "mail");
    assert_eq!(mail["ok"], true, "{mail:#}");
    assert_eq!(mail["source_type"], "mbox");
    assert_eq!(u(mail, "records_expected"), 3, "{mail:#}");
    assert_eq!(u(mail, "records_verified"), 3, "{mail:#}");
    let colls = mail["collections"].as_array().unwrap();
    assert_eq!(colls.len(), 1, "{mail:#}");
    assert_eq!((u(&colls[0], "expected"), u(&colls[0], "found")), (3, 3));
    assert_eq!(mail["rpo"]["ok"], true);
    assert_eq!(mail["rto"]["ok"], true);
    let live = &mail["against_source"];
    assert_eq!((u(live, "sampled"), u(live, "matched")), (3, 3), "{live:#}");
    // The scratch restore is removed afterwards.
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);

    // A message gone from the export is reported apart, not as a failure.
    std::fs::write(&mbox_path, mbox(&[1, 2])).unwrap();
    let (v, _) = verify_json(&repo, &["--source", "mail", "--against-source", "10"], 0);
    let live = &check_of(target_report(&v), "mail")["against_source"];
    assert_eq!(u(live, "matched"), 2, "{live:#}");
    assert_eq!(
        live["gone_at_source"].as_array().unwrap().len(),
        1,
        "{live:#}"
    );

    // The human summary, on the one named target.
    let out = repo.ok(["restore-verify", "--target", "repo"]);
    assert!(out.stdout.contains("everything passed"), "{out}");
    assert!(out.stdout.contains("RPO 1h"), "{out}");

    // Three passing runs, newest first.
    let h = repo.json(["verify-history", "--source", "docs"]);
    let rows = h.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{h:#}");
    assert!(rows
        .iter()
        .all(|r| r["ok"] == true && r["source"] == "docs"));
    assert!(s(&rows[0], "time") >= s(&rows[1], "time"));
}

#[test]
fn passes_local() {
    passing(Kind::Local, "verify-pass-local");
}

#[test]
fn passes_s3() {
    passing(Kind::S3, "verify-pass-s3");
}

#[test]
fn damaged_pack_fails_naming_pack_and_file_and_history_shows_both() {
    let repo = Repo::new(Kind::Local, "verify-tamper")
        .unwrap()
        .no_cache()
        .init();
    let raw = repo.raw();
    let mut rng = rng("verify-tamper");
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 6, 150_000);
    repo.backup(&[&src]);
    let (v, _) = verify_json(&repo, &[], 0);
    assert_eq!(v["ok"], true, "{v:#}");

    let pack = raw.names("data/").into_iter().next().unwrap();
    let bytes = raw.get(&pack);
    raw.flip(&pack, blob_region_offset(&bytes, 0.5));
    let (v, out) = verify_json(&repo, &[], 1);
    out.expect_stderr(&pack).expect_stderr("target repo");
    assert_eq!(v["ok"], false);
    let t = target_report(&v);
    assert_eq!(t["ok"], false);
    let c = check_of(t, "files");
    assert_eq!(c["ok"], false);
    let failures = c["failures"].as_array().unwrap();
    assert!(!failures.is_empty(), "{c:#}");
    let f = failures
        .iter()
        .find(|f| f["detail"].as_str().unwrap().contains(&pack))
        .unwrap_or_else(|| panic!("no failure names {pack}: {c:#}"));
    assert_eq!(f["kind"], "restore", "{f:#}");
    let path = f["path"].as_str().unwrap();
    assert!(path.starts_with("/src/f"), "{f:#}");
    assert!(out.stderr.contains(path), "{out}");
    assert!(u(c, "files_verified") < 6, "{c:#}");

    // History: the failed run first, then the passing one.
    let h = repo.json(["verify-history"]);
    let rows = h.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{h:#}");
    assert_eq!(rows[0]["ok"], false, "{h:#}");
    assert!(u(&rows[0], "failures") >= 1);
    assert_eq!(rows[1]["ok"], true, "{h:#}");
    assert!(s(&rows[0], "time") > s(&rows[1], "time"));
    for r in rows {
        assert_eq!(r["target"], "repo");
        assert_eq!(r["source"], "files");
        for key in ["duration_seconds", "throughput_bytes_per_second"] {
            assert!(r[key].as_f64().is_some(), "{key}: {r:#}");
        }
        assert!(r["rpo"].is_object() && r["rto"].is_object(), "{r:#}");
    }
    let table = repo.ok(["verify-history"]);
    assert!(table.stdout.contains("FAIL"), "{table}");
}

#[test]
fn rpo_breach_fails() {
    let repo = Repo::new(Kind::Local, "verify-rpo").unwrap().init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"alpha");
    repo.backup(&[&src]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (v, out) = verify_json(&repo, &["--rpo", "1s"], 1);
    out.expect_stderr("rpo");
    let c = check_of(target_report(&v), "files");
    assert_eq!(c["rpo"]["ok"], false, "{c:#}");
    assert_eq!(c["rpo"]["limit_seconds"].as_f64(), Some(1.0));
    assert!(c["rpo"]["age_seconds"].as_f64().unwrap() >= 2.0, "{c:#}");
    assert!(c["failures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == "rpo"));
    // The restore itself was fine.
    assert_eq!(u(c, "files_verified"), 1);
    let (v, _) = verify_json(&repo, &["--rpo", "1h"], 0);
    assert_eq!(check_of(target_report(&v), "files")["rpo"]["ok"], true);
    // A full restore cannot beat a 1 ns RTO.
    let (v, out) = verify_json(&repo, &["--rto", "1ns"], 1);
    out.expect_stderr("rto");
    let c = check_of(target_report(&v), "files");
    assert_eq!(c["rto"]["ok"], false, "{c:#}");
    assert_eq!(c["rto"]["estimate"], false, "{c:#}");
}

#[test]
fn missing_pack_fails_naming_it() {
    let repo = Repo::new(Kind::Local, "verify-missing").unwrap().init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"alpha");
    repo.backup(&[&src]);
    let raw = repo.raw();
    let pack = raw.names("data/").into_iter().next().unwrap();
    raw.delete(&pack);
    let (v, out) = verify_json(&repo, &[], 1);
    out.expect_stderr(&pack).expect_stderr("/src/a.txt");
    let c = check_of(target_report(&v), "files");
    assert_eq!(u(c, "files_verified"), 0, "{c:#}");
}

#[test]
fn sample_reports_an_estimated_rto() {
    let repo = Repo::new(Kind::Local, "verify-sample").unwrap().init();
    let mut rng = rng("verify-sample");
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 40, 20_000);
    repo.backup(&[&src]);
    let (v, _) = verify_json(&repo, &["--sample", "50%", "--rto", "1h"], 0);
    let c = check_of(target_report(&v), "files");
    assert_eq!(c["sampled"], true);
    assert_eq!(c["rto"]["estimate"], true, "{c:#}");
    assert_eq!(c["rto"]["ok"], Value::Null, "{c:#}");
    assert_eq!(c["rto"]["limit_seconds"].as_f64(), Some(3600.0));
    assert!(c["rto"]["seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(u(c, "files_expected"), 40);
    // Half at random plus the newest ten: (almost surely) fewer than all 40.
    let n = u(c, "files_verified");
    assert!((10..40).contains(&n), "{c:#}");
    assert_eq!(u(c, "bytes_verified"), n * 20_000);
    assert_eq!(u(c, "bytes_total"), 40 * 20_000);
    let out = repo.ok(["restore-verify", "--sample", "50%"]);
    assert!(out.stdout.contains("ESTIMATED"), "{out}");
    let h = repo.json(["verify-history"]);
    assert_eq!(h[0]["sampled"], true, "{h:#}");
    assert_eq!(h[0]["rto"]["estimate"], true, "{h:#}");
}

#[test]
fn count_mismatch_fails() {
    let repo = Repo::new(Kind::Local, "verify-count").unwrap().init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"alpha");
    write_file(&src.join("b.txt"), b"beta");
    repo.backup(&[&src]);
    // A snapshot whose summary claims one more file than its tree holds.
    block_on(async {
        let t =
            custos::target::store::StoreTarget::open("repo", &repo.url, &Default::default(), false)
                .unwrap();
        let (lib, _) = custos::Repository::open(vec![Arc::new(t)], PASSWORD.as_bytes())
            .await
            .unwrap();
        let (snaps, _) = lib.snapshots().await.unwrap();
        let mut doc = snaps[0].snapshot.clone();
        doc.summary.total_files += 1;
        doc.time += chrono::Duration::seconds(1);
        let (_, results) = lib
            .save_object(lib.targets(), custos::object::ObjectKind::Snapshot, &doc)
            .await;
        assert!(results.iter().all(|r| r.is_ok()));
    });
    let (v, out) = verify_json(&repo, &[], 1);
    out.expect_stderr("total_files 3");
    let c = check_of(target_report(&v), "files");
    assert_eq!(u(c, "files_verified"), 2, "{c:#}");
    assert!(c["failures"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["kind"] == "count"));
}

#[test]
fn each_target_is_verified_alone_and_keeps_its_record() {
    let repo = Repo::new(Kind::Local, "verify-two")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1");
    let second = repo.p("repo2");
    add_config(
        &repo,
        &format!(
            "[[target]]\nname = \"second\"\nurl = {}",
            toml_str(&second.display().to_string())
        ),
    );
    let repo = repo.init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"alpha");
    repo.backup(&[&src]);
    let (v, _) = verify_json(&repo, &[], 0);
    let targets = v["targets"].as_array().unwrap();
    let names: Vec<&str> = targets.iter().map(|t| s(t, "target")).collect();
    assert_eq!(names, ["repo", "second"], "{v:#}");
    // Both records went to both targets: the targets stay identical.
    let (one, two) = (
        repo.raw(),
        RawStore::open(&second.display().to_string(), None),
    );
    let (a, b) = (one.names("verifications/"), two.names("verifications/"));
    assert_eq!((a.len(), b.len()), (2, 2));
    assert_eq!(a, b);
    assert!(a.iter().any(|n| n.ends_with(s(&targets[0], "record_id"))));
    let rows = repo.json(["targets"]);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| u(r, "missing") == 0),
        "{rows}"
    );
    let h = repo.json(["verify-history"]);
    let mut seen: Vec<&str> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(r, "target"))
        .collect();
    seen.sort();
    assert_eq!(seen, ["repo", "second"], "{h:#}");
    // --target verifies one target only.
    let (v, _) = verify_json(&repo, &[], 0);
    assert_eq!(v["targets"].as_array().unwrap().len(), 2);
    let out = repo.run(["--json", "--target", "second", "restore-verify"]);
    out.expect_ok();
    assert_eq!(target_report(&out.json())["target"], "second");
}

#[test]
fn against_source_names_a_record_that_differs_from_the_live_source() {
    let repo = Repo::new(Kind::Local, "verify-live")
        .unwrap()
        .with_repository_settings("kdf_memory_kib = 64\nkdf_iterations = 1")
        .init();
    let path = repo.p("posts.jsonl");
    let lines = |second: &str| {
        format!(
            "{{\"id\":\"p1\",\"text\":\"first\"}}\n{{\"id\":\"p2\",\"text\":\"{second}\"}}\n{{\"id\":\"p3\",\"text\":\"third\"}}\n"
        )
    };
    std::fs::write(&path, lines("second")).unwrap();
    add_config(
        &repo,
        &format!(
            "[[source]]\nname = \"posts\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\ntext_field = \"text\"\nkind = \"social_post\"",
            toml_str(&path.display().to_string())
        ),
    );
    repo.ok(["--json", "backup"]);
    let (v, _) = verify_json(&repo, &["--against-source", "3"], 0);
    let live = &check_of(target_report(&v), "posts")["against_source"];
    assert_eq!((u(live, "sampled"), u(live, "matched")), (3, 3), "{live:#}");

    // The source now holds other bytes for p2, and says nothing about a change.
    std::fs::write(&path, lines("edited")).unwrap();
    let (v, out) = verify_json(&repo, &["--against-source", "3"], 1);
    out.expect_stderr("record p2");
    let c = check_of(target_report(&v), "posts");
    // The backup itself restores fine; only the live comparison differs.
    assert_eq!(u(c, "records_verified"), 3, "{c:#}");
    assert_eq!(
        c["against_source"]["mismatched"],
        serde_json::json!(["p2"]),
        "{c:#}"
    );
    let f = &c["failures"][0];
    assert_eq!(
        (f["kind"].as_str(), f["record_id"].as_str()),
        (Some("source_digest"), Some("p2")),
        "{c:#}"
    );
}
