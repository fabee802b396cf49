//! Key management: add (environment and file), list, remove (not the key in
//! use), passwd; every password opens exactly what it should.

use std::process::Command;

use serde_json::Value;

use crate::support::*;

const CHEAP: [&str; 4] = ["--kdf-memory-kib", "64", "--kdf-iterations", "1"];

fn with_pw(mut cmd: Command, pw: &str) -> Out {
    cmd.env("CUSTOS_PASSWORD", pw);
    run_cmd(cmd)
}

/// `key list --json` with `pw`: (id, current) per key, sorted by id.
fn keys(repo: &Repo, pw: &str) -> Vec<(String, bool)> {
    let out = with_pw(repo.cmd(["--json", "key", "list"]), pw);
    out.expect_ok();
    let mut v: Vec<(String, bool)> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            assert!(k["created"].is_string() && k["kdf"].is_object(), "{k}");
            assert_eq!(k["role"], Value::from("admin"));
            (s(k, "id").to_string(), k["current"].as_bool().unwrap())
        })
        .collect();
    v.sort();
    v
}

fn current(list: &[(String, bool)]) -> String {
    let cur: Vec<&String> = list.iter().filter(|(_, c)| *c).map(|(id, _)| id).collect();
    assert_eq!(cur.len(), 1, "{list:?}");
    cur[0].clone()
}

fn scenario(repo: Repo) {
    let repo = repo.init();
    let test = repo.test.clone();
    let test = test.as_str();
    let pw1 = PASSWORD;
    let src = repo.p("src");
    random_files(&mut rng(test), &src, "k", 5, 20_000);
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();

    let k = keys(&repo, pw1);
    assert_eq!(k.len(), 1);
    let key1 = current(&k);

    // key add, new password from the environment.
    let mut add = repo.cmd(["--json", "key", "add"]);
    add.args(CHEAP)
        .env("CUSTOS_NEW_PASSWORD", "second password");
    let out = run_cmd(add);
    out.expect_ok();
    let key2 = s(&out.json(), "id").to_string();
    let k = keys(&repo, pw1);
    assert_eq!(k.len(), 2);
    assert_eq!(current(&k), key1, "opened with the first password");
    assert_eq!(current(&keys(&repo, "second password")), key2);

    // key add, new password from a file.
    let pw_file = repo.p("third.txt");
    std::fs::write(&pw_file, "third password\n").unwrap();
    let mut add = repo.cmd(["--json", "key", "add", "--new-password-file"]);
    add.arg(&pw_file).args(CHEAP);
    let out = run_cmd(add);
    out.expect_ok();
    let key3 = s(&out.json(), "id").to_string();
    assert_eq!(keys(&repo, "third password").len(), 3);
    with_pw(repo.cmd(["snapshots"]), "third password").expect_ok();

    // The key in use cannot be removed.
    with_pw(repo.cmd(["key", "remove", &key1[..12]]), pw1)
        .expect_failure()
        .expect_stderr("in use");
    assert_eq!(keys(&repo, pw1).len(), 3);
    // Another one can; its password stops working.
    with_pw(repo.cmd(["key", "remove", &key3[..12]]), pw1).expect_ok();
    assert_eq!(
        keys(&repo, pw1)
            .iter()
            .map(|(i, _)| i.clone())
            .collect::<Vec<_>>(),
        {
            let mut v = vec![key1.clone(), key2.clone()];
            v.sort();
            v
        }
    );
    with_pw(repo.cmd(["snapshots"]), "third password")
        .expect_code(EXIT_WRONG_PASSWORD)
        .expect_stderr("wrong password");

    // passwd replaces the key in use: old password out, new one in.
    let mut passwd = repo.cmd(["--json", "key", "passwd"]);
    passwd
        .args(CHEAP)
        .env("CUSTOS_NEW_PASSWORD", "fourth password");
    let out = with_pw(passwd, "second password");
    out.expect_ok();
    let v = out.json();
    assert_eq!(s(&v, "removed"), key2);
    let key4 = s(&v, "id").to_string();
    with_pw(repo.cmd(["snapshots"]), "second password")
        .expect_code(EXIT_WRONG_PASSWORD)
        .expect_stderr("wrong password");
    let k = keys(&repo, "fourth password");
    assert_eq!(k.len(), 2);
    assert_eq!(current(&k), key4);
    assert!(k.iter().any(|(i, _)| *i == key1));

    // Both remaining passwords still restore the data.
    for (n, pw) in [pw1, "fourth password"].into_iter().enumerate() {
        let dest = repo.p(&format!("restore-{n}"));
        with_pw(
            repo.cmd([
                std::ffi::OsStr::new("restore"),
                id.as_ref(),
                dest.as_os_str(),
            ]),
            pw,
        )
        .expect_ok();
        assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
    }
    // No new password and no terminal: refused, nothing added.
    with_pw(repo.cmd(["key", "add"]), pw1)
        .expect_failure()
        .expect_stderr("new password");
    assert_eq!(keys(&repo, pw1).len(), 2);
}

#[test]
fn local() {
    scenario(Repo::new(Kind::Local, "keys-local").unwrap());
}

/// Also exercises `-r s3://…` with `AWS_ENDPOINT_URL`.
#[test]
fn s3() {
    if let Some(repo) = Repo::with_via(Kind::S3, "keys-s3", Via::Url) {
        scenario(repo);
    }
}
