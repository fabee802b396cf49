//! The debugging and inspection commands: `ls SNAPSHOT PATH`, `cat KIND ID`
//! (prefixes, errors), a closed stdout pipe, `check --read-data-subset`,
//! `stats SNAPSHOT`, and the `--json` output of key, hold and audit commands.

use std::ffi::OsStr;
use std::io::Read;
use std::process::Stdio;

use serde_json::Value;

use crate::support::*;

/// A repository with one snapshot of `src/{a.txt, sub/b.txt, sub/deeper/c.txt}`.
fn small_repo(test: &str) -> (Repo, std::path::PathBuf, String) {
    let repo = Repo::new(Kind::Local, test).unwrap().init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"0123456789");
    write_file(&src.join("sub/b.txt"), &[7u8; 20]);
    write_file(&src.join("sub/deeper/c.txt"), &[9u8; 30]);
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    (repo, src, id)
}

fn ls_paths(repo: &Repo, id: &str, path: &str) -> Vec<String> {
    repo.json(["ls", id, path])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| s(v, "path").to_string())
        .collect()
}

#[test]
fn ls_with_a_path_lists_it_and_a_missing_path_is_an_error() {
    let (repo, src, id) = small_repo("cli-ls");
    let under_sub = [
        "/src/sub",
        "/src/sub/b.txt",
        "/src/sub/deeper",
        "/src/sub/deeper/c.txt",
    ];
    // A directory: snapshot-relative (with or without the leading slash) or as backed up.
    for path in [
        "src/sub".to_string(),
        "/src/sub/".to_string(),
        src.join("sub").display().to_string(),
    ] {
        assert_eq!(ls_paths(&repo, &id, &path), under_sub, "ls {path}");
    }
    // A file.
    for path in [
        "src/sub/b.txt".to_string(),
        src.join("sub/b.txt").display().to_string(),
    ] {
        let v = repo.json(["ls", &id, &path]);
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{v}");
        assert_eq!(s(&rows[0], "path"), "/src/sub/b.txt");
        assert_eq!(u(&rows[0], "size"), 20);
    }
    // The whole snapshot.
    assert_eq!(ls_paths(&repo, &id, "/").len(), 6);
    // Missing paths: exit 1 naming the path and the snapshot (text and JSON).
    for path in ["src/nope", "/src/sub/b.txt/x", "/elsewhere/src/sub"] {
        for json in [false, true] {
            let mut args = vec!["ls", &id[..8], path];
            if json {
                args.insert(0, "--json");
            }
            let out = repo.run(args);
            out.expect_code(1)
                .expect_stderr(path)
                .expect_stderr(&id[..8])
                .expect_stderr("no such path");
            assert_eq!(out.stdout, "", "{out}");
        }
    }
}

#[test]
fn cat_each_kind_by_id_or_prefix() {
    let (repo, src, id) = small_repo("cli-cat");
    let config = repo.json(["cat", "config"]);
    assert_eq!(config["id"].as_str().unwrap().len(), 64, "{config}");

    let snap = repo.json(["cat", "snapshot", &id[..8]]);
    assert_eq!(
        strings(&snap, "paths"),
        [src.display().to_string()],
        "{snap}"
    );
    let tree = s(&snap, "tree").to_string();
    assert_eq!(snap, repo.json(["cat", "snapshot", &id]));

    let index_names = repo.raw().names("index/");
    assert_eq!(index_names.len(), 1, "{index_names:?}");
    let index_id = index_names[0].rsplit('/').next().unwrap().to_string();
    let index = repo.json(["cat", "index", &index_id[..6]]);
    assert_eq!(index, repo.json(["cat", "index", &index_id]));
    // The index lists the root tree among its tree blobs.
    let listed = index["packs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["blobs"].as_array().unwrap().clone())
        .any(|b| s(&b, "id") == tree);
    assert!(listed, "{index}");

    let root = repo.json(["cat", "tree", &tree[..10]]);
    assert_eq!(root, repo.json(["cat", "tree", &tree]));
    let names: Vec<&str> = root["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| s(n, "name"))
        .collect();
    assert_eq!(names, ["src"], "{root}");

    let keys = repo.json(["key", "list"]);
    let key_id = s(&keys[0], "id").to_string();
    let key = repo.json(["cat", "key", &key_id[..8]]);
    assert!(key.is_object(), "{key}");

    // Errors name the kind and the id: missing, too short, not hex, unknown kind.
    let missing = if index_id.starts_with("0000") {
        "ffff"
    } else {
        "0000"
    };
    for (args, needles) in [
        (
            vec!["cat", "index", missing],
            vec!["cat index", missing, "no such id"],
        ),
        (vec!["cat", "tree", "0000"], vec!["cat tree", "0000"]),
        (
            vec!["cat", "index", "ab"],
            vec!["cat index", "at least 4 hex digits"],
        ),
        (vec!["cat", "snapshot", "zzzz"], vec!["zzzz"]),
        (
            vec!["cat", "snapshot", "00000000"],
            vec!["00000000", "not found"],
        ),
        (vec!["cat", "index"], vec!["give an id"]),
        (vec!["cat", "bogus", "1234"], vec!["unknown kind"]),
    ] {
        let out = repo.run(&args);
        out.expect_code(1);
        for n in needles {
            out.expect_stderr(n);
        }
    }
}

/// A reader that goes away (`custos … | head -c 1`) ends custos quietly:
/// no panic, no backtrace, exit 0.
#[test]
fn a_closed_stdout_pipe_is_a_quiet_exit() {
    let repo = Repo::new(Kind::Local, "cli-epipe").unwrap().init();
    let src = repo.p("src");
    for i in 0..1500 {
        write_file(
            &src.join(format!("file-with-a-longish-name-{i:05}.txt")),
            b"x",
        );
    }
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let tree = s(&repo.json(["cat", "snapshot", &id]), "tree").to_string();
    let root = repo.json(["cat", "tree", &tree]);
    let src_tree = s(&root["nodes"][0], "subtree").to_string();
    // Each prints far more than a pipe buffer (64 KiB), so the writer must hit EPIPE.
    for args in [
        vec!["ls", id.as_str()],
        vec!["--json", "ls", id.as_str()],
        vec!["cat", "tree", src_tree.as_str()],
    ] {
        let mut cmd = repo.cmd(&args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 1];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout);
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert_eq!(status.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn check_read_data_subset_reads_its_share_of_packs() {
    let repo = Repo::new(Kind::Local, "cli-subset")
        .unwrap()
        .no_cache()
        .init();
    let mut rng = rng("cli-subset");
    // At least one pack per backup (data and tree blobs go to separate packs).
    for i in 0..10 {
        let src = repo.p(&format!("src{i}"));
        write_file(&src.join("f"), &random_bytes(&mut rng, 50_000));
        repo.backup(&[&src]);
    }
    let check = |pct: &str| -> Value {
        let v = repo.json(["check", "--read-data-subset", pct]);
        assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
        v[0].clone()
    };
    let packs = u(&check("100%"), "packs");
    assert!(packs >= 10, "{packs} packs");
    for (pct, share) in [("10%", 0.10), ("25%", 0.25), ("50", 0.5), ("100%", 1.0)] {
        let r = check(pct);
        assert_eq!(u(&r, "packs"), packs, "{r}");
        let want = (packs as f64 * share).ceil() as u64;
        assert_eq!(u(&r, "packs_read"), want, "{pct}: {r}");
        assert_eq!(r["errors"], Value::Array(vec![]), "{r}");
    }
    assert_eq!(u(&repo.json(["check"])[0], "packs_read"), 0);

    // A corrupted pack: 100 % always finds it, naming it; a subset reads only its share.
    let names = repo.raw().names("data/");
    let mut victim = None;
    for name in &names {
        let bytes = repo.raw().get(name);
        if bytes.len() > 40_000 {
            repo.raw().flip(name, blob_region_offset(&bytes, 0.5));
            victim = Some(name.clone());
            break;
        }
    }
    let victim = victim.expect("a data pack");
    let pack_id = victim.rsplit('/').next().unwrap();
    for _ in 0..2 {
        repo.run(["check", "--read-data-subset", "100%"])
            .expect_code(1)
            .expect_stderr(pack_id);
    }
    let out = repo.run(["--json", "check", "--read-data-subset", "10%"]);
    let r = out.json()[0].clone();
    assert_eq!(u(&r, "packs_read"), (packs as f64 * 0.1).ceil() as u64);
    let errors = r["errors"].as_array().unwrap();
    assert_eq!(out.code == Some(0), errors.is_empty(), "{out}");
    assert!(
        errors.iter().all(|e| e.as_str().unwrap().contains(pack_id)),
        "{r}"
    );

    // Bad values are refused naming the flag.
    for bad in ["0%", "101%", "abc", "-5%", ""] {
        repo.run(["check", &format!("--read-data-subset={bad}")])
            .expect_code(1)
            .expect_stderr("--read-data-subset");
    }
}

#[test]
fn stats_of_a_snapshot_counts_its_files_and_bytes() {
    let (repo, _src, id) = small_repo("cli-stats");
    let v = repo.json(["stats", &id[..8]]);
    assert_eq!(s(&v, "snapshot_id"), id);
    assert_eq!(u(&v, "total_files"), 3, "{v}");
    assert_eq!(u(&v, "total_size"), 60, "{v}");
    assert_eq!(u(&v["summary"], "files_new"), 3, "{v}");
    // src, sub, deeper.
    assert_eq!(u(&v["summary"], "dirs"), 3, "{v}");
    let text = repo.ok(["stats", &id]).stdout;
    assert!(text.contains("total_files: 3"), "{text}");
    // The repository totals: one snapshot of 60 bytes.
    let all = repo.json(["stats"]);
    assert_eq!(u(&all, "snapshots"), 1);
    assert_eq!(u(&all, "total_size"), 60);
    repo.run(["stats", "00000000"])
        .expect_code(1)
        .expect_stderr("00000000");
}

#[test]
fn key_hold_and_audit_commands_print_documented_json() {
    let (mut repo, _src, _id) = small_repo("cli-json");
    let pw2 = repo.p("pw2");
    std::fs::write(&pw2, "second password\n").unwrap();
    let add = repo.json([
        OsStr::new("key"),
        OsStr::new("add"),
        OsStr::new("--new-password-file"),
        pw2.as_os_str(),
    ]);
    let second = s(&add, "id").to_string();
    assert_eq!(s(&add, "role"), "admin");
    let removed = repo.json(["key", "remove", &second[..8]]);
    assert_eq!(removed, serde_json::json!({ "removed": second }));

    // A key object that cannot be read is a row naming it.
    let bogus = "ab".repeat(32);
    repo.raw()
        .put(&format!("keys/{bogus}"), b"not a key file".to_vec());
    let keys = repo.json(["key", "list"]);
    let row = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| s(k, "id") == bogus)
        .unwrap_or_else(|| panic!("{keys}"));
    assert!(!s(row, "error").is_empty(), "{row}");
    repo.raw().delete(&format!("keys/{bogus}"));

    let current = s(&repo.json(["key", "list"])[0], "id").to_string();
    let pw3 = repo.p("pw3");
    std::fs::write(&pw3, "third password\n").unwrap();
    let passwd = repo.json([
        OsStr::new("key"),
        OsStr::new("passwd"),
        OsStr::new("--new-password-file"),
        pw3.as_os_str(),
    ]);
    assert_eq!(s(&passwd, "removed"), current);
    assert_ne!(s(&passwd, "id"), current);
    repo.password = "third password".into();

    let placed = repo.json(["hold", "add", "case-1", "--reason", "litigation"]);
    assert_eq!(s(&placed, "name"), "case-1");
    assert_eq!(s(&placed, "id").len(), 64, "{placed}");
    let released = repo.json(["hold", "release", "case-1", "--reason", "settled"]);
    assert_eq!(s(&released, "name"), "case-1");
    assert_ne!(s(&released, "id"), s(&placed, "id"));

    let heads = strings(&repo.json(["audit", "head"]), "heads");
    assert_eq!(heads.len(), 1, "{heads:?}");
    let log = repo.json(["audit", "log"]);
    assert_eq!(strings(&log, "heads"), heads);
    let commands: Vec<&str> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| s(&e[1]["action"], "command"))
        .collect();
    for c in [
        "init",
        "key add",
        "key remove",
        "key passwd",
        "hold add",
        "hold release",
    ] {
        assert!(commands.contains(&c), "{c} not in {commands:?}");
    }
    let verify = repo.json(["audit", "verify", "--head", &heads[0]]);
    assert_eq!(verify["problems"], Value::Array(vec![]), "{verify}");
    assert_eq!(verify["forks"], Value::Array(vec![]), "{verify}");
}
