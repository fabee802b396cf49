//! Exit codes and machine output: wrong password (12), no repository (10),
//! unreadable source items (3), and the `snapshots --json` schema.

use serde_json::Value;
use std::ffi::OsStr;

use crate::support::*;

fn wrong_password(kind: Kind, test: &str) {
    let Some(repo) = Repo::new(kind, test) else {
        return;
    };
    let repo = repo.init();
    let src = repo.p("src");
    write_file(&src.join("a.txt"), b"a");
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let dest = repo.p("restore");
    let commands: [Vec<&OsStr>; 5] = [
        vec!["snapshots".as_ref()],
        vec!["backup".as_ref(), src.as_os_str()],
        vec!["restore".as_ref(), id.as_ref(), dest.as_os_str()],
        vec!["check".as_ref()],
        vec!["key".as_ref(), "list".as_ref()],
    ];
    for args in commands {
        let mut cmd = repo.cmd(args);
        cmd.env("CUSTOS_PASSWORD", "not the password");
        let out = run_cmd(cmd);
        out.expect_code(EXIT_WRONG_PASSWORD)
            .expect_stderr("wrong password");
        assert!(
            !out.stderr.contains(PASSWORD),
            "the password was echoed\n{out}"
        );
    }
    assert!(
        !dest.exists(),
        "restore with a wrong password created the destination"
    );

    // The other password sources: a file (trailing newline dropped) and a command.
    let pw_file = repo.p("password.txt");
    std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap();
    let mut cmd = repo.cmd([
        OsStr::new("--password-file"),
        pw_file.as_os_str(),
        OsStr::new("snapshots"),
    ]);
    cmd.env_remove("CUSTOS_PASSWORD");
    run_cmd(cmd).expect_ok();
    let mut cmd = repo.cmd([
        "--password-command",
        &format!("printf '%s' '{PASSWORD}'"),
        "snapshots",
    ]);
    cmd.env_remove("CUSTOS_PASSWORD");
    run_cmd(cmd).expect_ok();
    // No password at all, no terminal: an error, not a hang.
    let mut cmd = repo.cmd(["snapshots"]);
    cmd.env_remove("CUSTOS_PASSWORD");
    run_cmd(cmd).expect_failure().expect_stderr("password");
}

#[test]
fn wrong_password_local() {
    wrong_password(Kind::Local, "exit-password-local");
}

#[test]
fn wrong_password_s3() {
    wrong_password(Kind::S3, "exit-password-s3");
}

#[test]
fn missing_repository_local() {
    let work = tempfile::tempdir().unwrap();
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let src = work.path().join("src");
    write_file(&src.join("a"), b"a");
    let dest = work.path().join("dest");
    for location in [work.path().join("does-not-exist"), empty.clone()] {
        let commands: [Vec<&OsStr>; 4] = [
            vec!["snapshots".as_ref()],
            vec!["backup".as_ref(), src.as_os_str()],
            vec!["check".as_ref()],
            vec!["restore".as_ref(), "latest".as_ref(), dest.as_os_str()],
        ];
        for args in commands {
            let mut cmd = custos();
            cmd.arg("-r")
                .arg(&location)
                .arg("--no-cache")
                .args(args)
                .env("CUSTOS_PASSWORD", PASSWORD);
            run_cmd(cmd)
                .expect_code(EXIT_REPO_NOT_FOUND)
                .expect_stderr("no repository")
                .expect_stderr(&location.display().to_string());
        }
    }
    // Nothing was created by the failed commands.
    assert!(!work.path().join("does-not-exist").exists());
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
    assert!(!dest.exists());
}

#[test]
fn missing_repository_s3() {
    let Some(repo) = Repo::new(Kind::S3, "exit-missing-s3") else {
        return;
    };
    // Never initialised: the prefix is empty.
    repo.run(["snapshots"])
        .expect_code(EXIT_REPO_NOT_FOUND)
        .expect_stderr("no repository");
    repo.run(["check"]).expect_code(EXIT_REPO_NOT_FOUND);
}

#[test]
fn init_twice_is_refused() {
    let repo = Repo::new(Kind::Local, "exit-init-twice").unwrap().init();
    let keys = repo.raw().names("keys/");
    repo.run(["init", "--kdf-memory-kib", "64", "--kdf-iterations", "1"])
        .expect_failure()
        .expect_stderr("already");
    assert_eq!(
        repo.raw().names("keys/"),
        keys,
        "a refused init changed the keys"
    );
    repo.ok(["snapshots"]);
}

/// Unreadable items are skipped, named on stderr and in the JSON, and the
/// backup exits 3 with a usable snapshot. Root reads files whatever their
/// mode, so as root the commands run as `nobody` (uid/gid 65534).
#[test]
fn unreadable_source_exits_3() {
    let mut repo = Repo::new(Kind::Local, "exit-unreadable")
        .unwrap()
        .no_cache();
    if is_root() {
        chmod(repo.work.path(), 0o777);
        repo = repo.run_as(65534, 65534);
        let probe = repo.run(["--version"]);
        if probe.code != Some(0) {
            eprintln!("SKIP unreadable_source_exits_3: running as root and cannot switch to uid 65534\n{probe}");
            return;
        }
    }
    let repo = repo.init();
    let src = repo.p("src");
    write_file(&src.join("ok.txt"), b"readable");
    write_file(&src.join("secret.txt"), b"unreadable");
    write_file(&src.join("locked-dir/inner.txt"), b"inner");
    chmod(&src.join("secret.txt"), 0o000);
    chmod(&src.join("locked-dir"), 0o000);

    let out = repo.run(backup_args(&[&src], &[]));
    out.expect_code(EXIT_PARTIAL_SOURCE)
        .expect_stderr("secret.txt")
        .expect_stderr("locked-dir");
    let report = single_report(&out);
    assert_eq!(u(&report["summary"], "unreadable"), 2, "{report}");
    let mut paths: Vec<String> = report["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| s(e, "path").to_string())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            src.join("locked-dir").display().to_string(),
            src.join("secret.txt").display().to_string()
        ]
    );
    // The snapshot holds what could be read.
    let dest = repo.p("restore");
    repo.restore(s(&report, "snapshot_id"), &dest);
    assert_eq!(std::fs::read(dest.join("src/ok.txt")).unwrap(), b"readable");
    assert!(!dest.join("src/secret.txt").exists());
    assert!(!dest.join("src/locked-dir/inner.txt").exists());
    // The unreadable directory itself is recorded and restored with its mode
    // (by the same unprivileged user: the mode must not stop setting its mtime).
    let restored = scan(&dest.join("src"));
    let locked = &restored[b"locked-dir".as_slice()];
    assert_eq!((locked.item.clone(), locked.mode), (Item::Dir, 0o000));
    assert_eq!(
        locked.mtime_ns,
        scan(&src)[b"locked-dir".as_slice()].mtime_ns
    );
}

/// `snapshots --json`: an array of documented objects, filters work.
#[test]
fn snapshots_json_schema() {
    let repo = Repo::new(Kind::Local, "exit-snapshots-json")
        .unwrap()
        .init();
    assert_eq!(repo.snapshots(), Vec::<Value>::new());
    let (a, b) = (repo.p("a"), repo.p("b"));
    write_file(&a.join("x"), b"x");
    write_file(&b.join("y"), b"y");
    let ra = repo.backup_with(
        &[&a],
        &["--tag", "nightly", "--tag", "mail", "--host", "host-a"],
    );
    let rb = repo.backup_with(
        &[&b, &a.join("x")],
        &["--host", "host-b", "--time-zone", "Europe/Berlin"],
    );

    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 2);
    for (snap, report) in snaps.iter().zip([&ra, &rb]) {
        let id = s(snap, "id");
        assert_eq!(id, s(report, "snapshot_id"));
        assert!(
            id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(s(snap, "short_id"), &id[..8]);
        let time = s(snap, "time");
        chrono::DateTime::parse_from_rfc3339(time)
            .unwrap_or_else(|e| panic!("time {time:?} is not RFC 3339: {e}"));
        assert_eq!(s(snap, "source"), "files");
        for key in [
            "id",
            "short_id",
            "time",
            "time_zone",
            "source",
            "paths",
            "hostname",
            "username",
            "tags",
            "tree",
            "parent",
            "summary",
            "program",
        ] {
            assert!(
                snap.as_object().unwrap().contains_key(key),
                "documented key {key} missing in {snap}"
            );
        }
        for key in ["paths", "tags"] {
            assert!(
                snap[key].is_array(),
                "{key} missing or not an array in {snap}"
            );
        }
        assert!(snap["summary"].is_object(), "summary missing in {snap}");
        for key in [
            "files_new",
            "files_changed",
            "files_unmodified",
            "dirs",
            "total_files",
            "total_bytes",
            "data_blobs_added",
            "tree_blobs_added",
            "bytes_added",
            "bytes_stored",
            "unreadable",
        ] {
            u(&snap["summary"], key);
        }
        assert!(snap["summary"]["duration_seconds"].is_number());
        for key in ["time_zone", "hostname", "tree", "program"] {
            s(snap, key);
        }
    }
    // Sorted by time; fields as given.
    assert_eq!(strings(&snaps[0], "tags"), ["mail", "nightly"]);
    assert_eq!(strings(&snaps[1], "tags"), Vec::<String>::new());
    assert_eq!(strings(&snaps[0], "paths"), [a.display().to_string()]);
    assert_eq!(
        strings(&snaps[1], "paths"),
        [a.join("x").display().to_string(), b.display().to_string()]
    );
    assert_eq!(s(&snaps[0], "hostname"), "host-a");
    assert_eq!(s(&snaps[1], "time_zone"), "Europe/Berlin");
    assert!(s(&snaps[0], "time") <= s(&snaps[1], "time"));

    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["snapshots"];
        all.extend_from_slice(args);
        repo.json(all)
            .as_array()
            .unwrap()
            .iter()
            .map(|v| s(v, "id").to_string())
            .collect()
    };
    let (ida, idb) = (
        s(&ra, "snapshot_id").to_string(),
        s(&rb, "snapshot_id").to_string(),
    );
    assert_eq!(ids(&["--tag", "mail"]), std::slice::from_ref(&ida));
    assert_eq!(
        ids(&["--tag", "mail", "--tag", "nope"]),
        Vec::<String>::new()
    );
    assert_eq!(ids(&["--host", "host-b"]), [idb]);
    assert_eq!(ids(&["--source", "files"]).len(), 2);
    // `latest` and id prefixes resolve; an unknown prefix is an error naming it.
    let dest = repo.p("restore");
    repo.restore("latest", &dest);
    assert!(dest.join("b/y").exists() && dest.join("x").exists());
    repo.restore(&ida[..8], &repo.p("restore-a"));
    assert!(repo.p("restore-a/a/x").exists());
    repo.run(["restore", "00000000", repo.p("nowhere").to_str().unwrap()])
        .expect_failure()
        .expect_stderr("00000000");
}

/// The recorded time zone defaults to UTC, never the machine's `TZ`; the
/// repository setting and `--time-zone` still set it.
#[test]
fn time_zone_defaults_to_utc_not_tz() {
    let mut repo = Repo::new(Kind::Local, "exit-tz-default").unwrap();
    repo.env("TZ", "Asia/Tokyo");
    let repo = repo.init();
    let a = repo.p("a");
    write_file(&a.join("x"), b"x");
    repo.backup(&[&a]);
    repo.backup_with(&[&a], &["--time-zone", "Europe/Lisbon"]);
    let zones: Vec<String> = repo
        .snapshots()
        .iter()
        .map(|s| s["time_zone"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(zones, ["UTC", "Europe/Lisbon"]);

    // `[repository] time_zone` wins over the default (and `TZ`).
    let mut repo = Repo::new(Kind::Local, "exit-tz-config").unwrap();
    repo.env("TZ", "Asia/Tokyo");
    let repo = repo
        .with_repository_settings("time_zone = \"America/New_York\"")
        .init();
    let a = repo.p("a");
    write_file(&a.join("x"), b"x");
    repo.backup(&[&a]);
    assert_eq!(s(&repo.snapshots()[0], "time_zone"), "America/New_York");
}
