//! Key roles (FORMAT.md, "Roles"): a backup key adds snapshots but cannot read
//! content back; a restore key reads everything but cannot forget, prune or
//! manage keys; an admin key can do everything. Every refusal exits 13 and
//! names the operation and the role it needs; nothing is lost on the way.

use std::process::Command;

use crate::support::*;

const CHEAP: [&str; 4] = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"];
const EXIT_ROLE: i32 = 13;
const BACKUP_PW: &str = "backup-only sidecar password";
const RESTORE_PW: &str = "restore desk password";

fn with_pw(mut cmd: Command, pw: &str) -> Out {
    cmd.env("CUSTOS_PASSWORD", pw);
    run_cmd(cmd)
}

/// Add a key of `role` with password `pw` (as admin); returns its id.
fn add_key(repo: &Repo, role: &str, pw: &str) -> String {
    let mut add = repo.cmd(["--json", "key", "add", "--role", role]);
    add.args(CHEAP).env("CUSTOS_NEW_PASSWORD", pw);
    let out = run_cmd(add);
    out.expect_ok();
    let v = out.json();
    assert_eq!(s(&v, "role"), role, "{v}");
    s(&v, "id").to_string()
}

/// The command fails with the role exit code and names what it needs.
#[track_caller]
fn refused(out: &Out, needs: &str) {
    out.expect_code(EXIT_ROLE).expect_stderr(needs);
}

fn scenario(kind: Kind, test: &str) {
    let Some(repo) = Repo::new(kind, test) else {
        return;
    };
    let repo = repo.init();
    let mut r = rng(test);
    let src = repo.p("src");
    random_files(&mut r, &src, "f", 12, 40_000);
    write_file(
        &src.join("canary.txt"),
        b"ROLE-CANARY-7f3a only in this file",
    );

    let backup_id = add_key(&repo, "backup", BACKUP_PW);
    let restore_id = add_key(&repo, "restore", RESTORE_PW);
    let list = with_pw(repo.cmd(["--json", "key", "list"]), BACKUP_PW);
    list.expect_ok();
    let roles: Vec<(String, String, bool)> = list
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                s(k, "id").to_string(),
                s(k, "role").to_string(),
                k["current"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(roles.len(), 3, "{roles:?}");
    assert!(
        roles.contains(&(backup_id.clone(), "backup".into(), true)),
        "{roles:?}"
    );
    assert!(
        roles.contains(&(restore_id.clone(), "restore".into(), false)),
        "{roles:?}"
    );

    // The backup key: a first and an incremental backup.
    let backup = |extra: &[&str]| {
        let args = backup_args(&[&src], extra);
        let out = with_pw(repo.cmd(args), BACKUP_PW);
        out.expect_ok();
        single_report(&out)
    };
    let first = backup(&[]);
    let first_id = s(&first, "snapshot_id").to_string();
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    random_files(&mut r, &src, "g", 3, 30_000);
    write_file(&names[0], b"changed by the second run");
    let second = backup(&[]);
    let second_id = s(&second, "snapshot_id").to_string();
    let sum = &second["summary"];
    assert_eq!(u(sum, "files_new"), 3, "{second}");
    assert_eq!(u(sum, "files_changed"), 1, "{second}");
    assert!(u(sum, "files_unmodified") >= 11, "{second}");
    let tree_after_second = scan(&src);

    // The backup key lists and checks structure, but reads no content.
    let snaps = with_pw(repo.cmd(["--json", "snapshots"]), BACKUP_PW);
    snaps.expect_ok();
    assert_eq!(snaps.json().as_array().unwrap().len(), 2);
    with_pw(repo.cmd(["check"]), BACKUP_PW).expect_ok();
    let dest = repo.p("restore-by-backup-key");
    refused(
        &with_pw(
            repo.cmd(["restore".as_ref(), second_id.as_ref(), dest.as_os_str()]),
            BACKUP_PW,
        ),
        "a restore or admin key",
    );
    assert!(
        !dest.exists() || read_all_files(&dest).is_empty(),
        "a refused restore wrote files"
    );
    refused(
        &with_pw(repo.cmd(["check", "--read-data"]), BACKUP_PW),
        "a restore or admin key",
    );
    refused(
        &with_pw(repo.cmd(["restore-verify"]), BACKUP_PW),
        "a restore or admin key",
    );
    for args in [
        vec!["forget", "--keep-last", "1"],
        vec!["prune"],
        vec!["key", "add", "--role", "backup"],
    ] {
        refused(&with_pw(repo.cmd(&args), BACKUP_PW), "an admin key");
    }
    // A backup-only daemon may not be configured to prune.
    refused_daemon(&repo);

    // The restore key reads everything back.
    let restore_dest = repo.p("restore-by-restore-key");
    let out = with_pw(
        repo.cmd([
            "--json".as_ref(),
            "restore".as_ref(),
            second_id.as_ref(),
            restore_dest.as_os_str(),
        ]),
        RESTORE_PW,
    );
    out.expect_ok();
    assert_trees_equal(
        &tree_after_second,
        &scan(&restored(&restore_dest, &src)),
        Compare::ALL,
        "restored with the restore key",
    );
    with_pw(repo.cmd(["check", "--read-data"]), RESTORE_PW).expect_ok();
    for args in [vec!["forget", "--keep-last", "1"], vec!["prune"]] {
        refused(&with_pw(repo.cmd(&args), RESTORE_PW), "an admin key");
    }
    // Changing its own password keeps the role.
    let mut passwd = repo.cmd(["--json", "key", "passwd"]);
    passwd
        .args(CHEAP)
        .env("CUSTOS_NEW_PASSWORD", "restore desk, new");
    with_pw(passwd, RESTORE_PW).expect_ok();
    with_pw(repo.cmd(["check"]), RESTORE_PW).expect_code(EXIT_WRONG_PASSWORD);
    refused(
        &with_pw(repo.cmd(["prune"]), "restore desk, new"),
        "an admin key",
    );

    // Nothing was lost on the way, and admin can do everything.
    let snaps = repo.snapshots();
    let ids: Vec<&str> = snaps.iter().map(|v| s(v, "id")).collect();
    assert!(
        ids.contains(&first_id.as_str()) && ids.contains(&second_id.as_str()),
        "{ids:?}"
    );
    repo.ok(["forget", "--keep-last", "1", "--prune"]);
    repo.ok(["check", "--read-data"]);
    let admin_dest = repo.p("restore-by-admin");
    repo.restore("latest", &admin_dest);
    assert_trees_equal(
        &tree_after_second,
        &scan(&restored(&admin_dest, &src)),
        Compare::ALL,
        "restored by admin after prune",
    );

    // No plaintext in storage: the canary is in no object.
    let raw = repo.raw();
    for name in raw.names("") {
        assert!(
            !contains(&raw.get(&name), b"ROLE-CANARY-7f3a"),
            "{name} holds plaintext"
        );
    }
    // One data key object per run that stored content (two backups, and
    // prune when it repacked), each 104 bytes.
    let datakeys = raw.list("datakeys/");
    assert!((2..=3).contains(&datakeys.len()), "{datakeys:?}");
    assert!(
        datakeys.iter().all(|(_, size)| *size == 104),
        "{datakeys:?}"
    );

    sidecar_backs_up(&repo, &src);

    // A damaged data key object is an error of plain `check`, named.
    let (name, _) = &datakeys[0];
    raw.flip(name, 50);
    repo.run(["check"])
        .expect_failure()
        .expect_stderr(name.as_str());
}

fn daemon_config(repo: &Repo, jobs: &str) -> std::path::PathBuf {
    let cfg = repo.p("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[target]]\nname = \"local\"\nurl = {url}\n\n[daemon]\nlisten = \"127.0.0.1:0\"\n{jobs}",
            url = toml_str(&repo.url)
        ),
    )
    .unwrap();
    cfg
}

fn daemon_cmd(repo: &Repo, cfg: &std::path::Path) -> Command {
    let mut cmd = custos();
    cmd.arg("-c")
        .arg(cfg)
        .arg("--cache-dir")
        .arg(repo.p("cache"))
        .arg("daemon")
        .env("CUSTOS_PASSWORD", BACKUP_PW);
    cmd
}

/// A daemon holding only the backup key runs its backup job: the snapshot
/// it writes restores with the admin key.
fn sidecar_backs_up(repo: &Repo, src: &std::path::Path) {
    if repo.kind != Kind::Local {
        return;
    }
    let before = repo.snapshots().len();
    let cfg = daemon_config(
        repo,
        &format!(
            r#"
[[source]]
name = "sidecar-docs"
type = "directory"
paths = [{src}]

[[job]]
name = "sidecar-backup"
kind = "backup"
schedule = "*/1 * * * * *"
"#,
            src = toml_str(&src.display().to_string())
        ),
    );
    let start = std::time::Instant::now();
    let mut child = spawn(daemon_cmd(repo, &cfg));
    let snap = loop {
        let snaps = repo.snapshots();
        if let Some(v) = snaps.iter().find(|v| s(v, "source") == "sidecar-docs") {
            break v.clone();
        }
        if child.try_wait().unwrap().is_some() {
            panic!(
                "the backup-key daemon exited:\n{}",
                finish(child, "daemon", start)
            );
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no sidecar snapshot within 60 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(repo.snapshots().len() > before);
    let dest = repo.p("restore-sidecar");
    repo.restore(s(&snap, "id"), &dest);
    assert_trees_equal(
        &scan(src),
        &scan(&restored(&dest, src)),
        Compare::ALL,
        "the sidecar's snapshot, restored by admin",
    );
}

/// `custos daemon` with the backup key and a prune job fails at start,
/// naming the job and the role.
fn refused_daemon(repo: &Repo) {
    if repo.kind != Kind::Local {
        return;
    }
    let cfg = daemon_config(
        repo,
        r#"
[[job]]
name = "sidecar-sync"
kind = "sync"
schedule = "0 * * * *"

[[job]]
name = "weekly-prune"
kind = "prune"
schedule = "0 3 * * 0"
"#,
    );
    let out = run_cmd(daemon_cmd(repo, &cfg));
    out.expect_failure()
        .expect_stderr("weekly-prune")
        .expect_stderr("needs an admin key")
        .expect_stderr("backup key");
}

#[test]
fn roles_local() {
    scenario(Kind::Local, "roles-local");
}

#[test]
fn roles_s3() {
    scenario(Kind::S3, "roles-s3");
}
