//! Storage identities per role (ARCHITECTURE.md, "Who can do what") against
//! SeaweedFS, whose test server (`scripts/services/s3.sh`) has, besides the
//! admin identity, a `backup` identity (list, read, create objects; no
//! delete, no governance bypass) and a `restore` identity (list, read, and
//! create `audit/` entries only), both as IAM policy documents.
//!
//! - A target configured with the backup identity's credentials backs up
//!   (incrementally); `forget --prune`, `prune` and `customer erase` with it
//!   fail naming the bucket, the key and the refusal; nothing is lost:
//!   `check --read-data` (admin) passes and every snapshot restores
//!   byte-exact. The admin identity then does what the backup one could not.
//! - The restore identity restores and checks; its `backup` fails clearly and
//!   adds nothing but its audit entry.
//! - On an Object Lock bucket the backup identity writes locked objects but
//!   can neither delete a version with `x-amz-bypass-governance-retention`
//!   nor shorten a retention; the admin identity can (so the refusal is the
//!   identity's, not a missing feature).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use aws_sdk_s3::error::ProvideErrorMetadata;
use custos::target::s3api::{Connect, S3Api};
use serde_json::Value;

use crate::support::*;

/// One role's S3 credentials (from the env file of `s3.sh`).
#[derive(Clone)]
struct Creds {
    role: &'static str,
    key: String,
    secret: String,
}

/// The backup and restore identities, or `None` (after a skip line) when the
/// server's env file does not define them; panics under `CUSTOS_REQUIRE_S3=1`.
fn role_creds(test: &str) -> Option<(Creds, Creds)> {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let role = |role: &'static str, up: &str| {
        Some(Creds {
            role,
            key: get(&format!("CUSTOS_TEST_S3_{up}_ACCESS_KEY_ID"))?,
            secret: get(&format!("CUSTOS_TEST_S3_{up}_SECRET_ACCESS_KEY"))?,
        })
    };
    match (role("backup", "BACKUP"), role("restore", "RESTORE")) {
        (Some(b), Some(r)) => Some((b, r)),
        _ => {
            assert!(
                std::env::var("CUSTOS_REQUIRE_S3").as_deref() != Ok("1"),
                "{test}: CUSTOS_REQUIRE_S3=1 but CUSTOS_TEST_S3_BACKUP_* / _RESTORE_* are not set \
                 (scripts/services/s3.sh env defines them)"
            );
            eprintln!("SKIP {test}: no backup/restore identities (CUSTOS_TEST_S3_BACKUP_*)");
            None
        }
    }
}

/// An admin repository fixture (AWS_* credentials) plus config files that
/// reach the same target with a role's credentials.
struct Roles {
    repo: Repo,
    sources: String,
}

impl Roles {
    /// `sources`: extra config sections (`[[source]]`, `[[customer]]`) for every role.
    fn new(test: &str, sources: impl FnOnce(&Repo) -> String) -> Option<Roles> {
        let repo = Repo::new(Kind::S3, test)?;
        let sources = sources(&repo);
        let base = std::fs::read_to_string(repo.config_path()).unwrap();
        std::fs::write(repo.config_path(), format!("{base}{sources}")).unwrap();
        Some(Roles { repo, sources })
    }

    /// The config of `c`'s role: the admin's target with the role's key id
    /// in the file and its secret from `ROLE_SECRET` (`*_env`, as on a host).
    fn config(&self, c: &Creds) -> PathBuf {
        let path = self.repo.p(&format!("{}.toml", c.role));
        let base = std::fs::read_to_string(self.repo.config_path()).unwrap();
        let target = base.strip_suffix(self.sources.as_str()).unwrap();
        let mut t = target.to_string();
        let _ = writeln!(
            t,
            "access_key_id = {}\nsecret_access_key_env = \"ROLE_SECRET\"",
            toml_str(&c.key)
        );
        t.push_str(&self.sources);
        std::fs::write(&path, t).unwrap();
        path
    }

    /// `custos <args>` as role `c`: its own cache, no admin credentials around.
    fn run<I, S>(&self, c: &Creds, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = custos();
        cmd.arg("-c")
            .arg(self.config(c))
            .arg("--cache-dir")
            .arg(self.repo.p(&format!("cache-{}", c.role)))
            .env("CUSTOS_PASSWORD", &self.repo.password)
            .env("XDG_CACHE_HOME", self.repo.p("xdg-cache"))
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("ROLE_SECRET", &c.secret)
            .args(args);
        run_cmd(cmd)
    }

    /// Every stored object (name → size), read with the admin identity.
    fn objects(&self) -> BTreeMap<String, u64> {
        self.repo.raw().list("").into_iter().collect()
    }
}

/// A refused command: non-zero exit, and stderr names the operation's
/// object under `folder`, the bucket and the refusal.
#[track_caller]
fn expect_denied(out: &Out, bucket: &str, folder: &str) {
    out.expect_failure();
    out.expect_stderr("AccessDenied (HTTP 403)")
        .expect_stderr(&format!("from bucket {bucket}, key "))
        .expect_stderr("the storage identity in use is not allowed to do this");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("AccessDenied") && l.contains(&format!("/{folder}/"))),
        "no refusal names an object in {folder}/\n{out}"
    );
}

/// Nothing of `before` is gone or changed in `after`.
#[track_caller]
fn nothing_lost(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, what: &str) {
    let lost: Vec<_> = before
        .iter()
        .filter(|(n, s)| after.get(*n) != Some(*s))
        .collect();
    assert!(lost.is_empty(), "{what}: objects lost or changed: {lost:?}");
}

/// Snapshot ids (as the admin sees them), sorted.
fn snapshot_ids(repo: &Repo) -> Vec<String> {
    let mut v: Vec<String> = repo
        .snapshots()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Restore every `(snapshot, expected tree)` with the admin identity and
/// compare bytes.
fn restore_all(repo: &Repo, expected: &[(String, Tree)], src: &Path) {
    for (i, (id, tree)) in expected.iter().enumerate() {
        let dest = repo.p(&format!("restore-admin-{i}"));
        repo.restore(id, &dest);
        assert_trees_equal(
            tree,
            &scan(&restored(&dest, src)),
            Compare::CONTENT,
            &format!("snapshot {id}"),
        );
    }
}

fn chat_sources(repo: &Repo) -> String {
    format!(
        r#"
[[source]]
name = "chat"
type = "jsonl"
path = {}
id_field = "id"
time_field = "ts"
customer_fields = ["email:author.email"]
text_field = "text"
kind = "chat_message"

[[customer]]
name = "ana"
ids = ["email:ana@example.org"]
"#,
        toml_str(&repo.p("chat.jsonl").display().to_string())
    )
}

fn write_chat(repo: &Repo, lines: &[Value]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write_file(&repo.p("chat.jsonl"), text.as_bytes());
}

#[test]
fn backup_identity_adds_snapshots_but_cannot_delete() {
    let test = "identities-backup";
    let Some((backup, _)) = role_creds(test) else {
        return;
    };
    let Some(roles) = Roles::new(test, chat_sources) else {
        return;
    };
    let repo = &roles.repo;
    let bucket = repo.s3.as_ref().unwrap().bucket.clone();
    repo.ok(["init", "--kdf-memory-kib", "64", "--kdf-iterations", "1"]);

    // Three incremental file backups and two chat backups, all by the backup identity.
    let src = repo.p("src");
    let mut rng = rng(test);
    random_files(&mut rng, &src, "f", 6, 150_000);
    let mut expected: Vec<(String, Tree)> = Vec::new();
    for run in 0..3 {
        if run > 0 {
            write_file(
                &src.join(format!("new-{run}.bin")),
                &random_bytes(&mut rng, 90_000),
            );
        }
        let out = roles.run(&backup, backup_args(&[&src], &[]));
        out.expect_ok();
        let r = single_report(&out);
        if run > 0 {
            let m = &r["summary"];
            assert_eq!(u(m, "files_new"), 1, "run {run} is incremental: {r}");
            assert_eq!(u(m, "files_unmodified"), 5 + run as u64, "{r}");
        }
        expected.push((s(&r, "snapshot_id").to_string(), scan(&src)));
    }
    let ana = |id: &str, text: &str| serde_json::json!({"id": id, "ts": "2026-03-03T10:05:00Z", "author": {"email": "ana@example.org"}, "text": text});
    let bo = serde_json::json!({"id": "c2", "ts": "2026-03-03T10:06:00Z", "author": {"email": "bo@example.org"}, "text": "bo on chat"});
    write_chat(repo, &[ana("c1", "ana on chat"), bo.clone()]);
    roles
        .run(&backup, ["backup", "--source", "chat"])
        .expect_ok();
    write_chat(
        repo,
        &[ana("c1", "ana on chat"), bo, ana("c3", "ana again")],
    );
    roles
        .run(&backup, ["backup", "--source", "chat"])
        .expect_ok();
    let snaps = snapshot_ids(repo);
    assert_eq!(snaps.len(), 5, "{snaps:?}");
    let before = roles.objects();

    // forget --prune: the snapshot deletion is refused by the store.
    let out = roles.run(&backup, ["forget", "--keep-last", "1", "--prune"]);
    expect_denied(&out, &bucket, "snapshots");
    // customer erase: the rewritten snapshots may be written, the old ones stay.
    let out = roles.run(
        &backup,
        [
            "customer",
            "erase",
            "ana",
            "--reason",
            "e2e",
            "--prune-grace",
            "0s",
        ],
    );
    expect_denied(&out, &bucket, "snapshots");
    let after = roles.objects();
    nothing_lost(
        &before,
        &after,
        "after forget and erase by the backup identity",
    );
    let now = snapshot_ids(repo);
    assert!(
        snaps.iter().all(|id| now.contains(id)),
        "a snapshot vanished: {snaps:?} -> {now:?}"
    );

    // prune: a scratch snapshot the admin forgets leaves unused packs; the
    // backup identity marks them (create-only) but its sweep is refused.
    let scratch = repo.p("scratch");
    random_files(&mut rng, &scratch, "s", 2, 120_000);
    let out = roles.run(&backup, backup_args(&[&scratch], &[]));
    out.expect_ok();
    let scratch_id = s(&single_report(&out), "snapshot_id").to_string();
    repo.ok(["forget", &scratch_id]);
    let before = roles.objects();
    roles
        .run(&backup, ["--json", "prune", "--grace", "0s"])
        .expect_ok();
    let out = roles.run(&backup, ["--json", "prune", "--grace", "0s"]);
    expect_denied(&out, &bucket, "data");
    let r = out.json();
    assert_eq!(u(&r, "packs_deleted"), 0, "nothing was deleted: {r}");
    assert_eq!(u(&r, "bytes_freed"), 0, "nothing was freed: {r}");
    nothing_lost(
        &before,
        &roles.objects(),
        "after prune by the backup identity",
    );

    // Nothing lost: the admin identity checks every byte and restores every snapshot.
    let check = repo.ok(["check", "--read-data"]);
    assert!(check.stdout.contains("no errors"), "{check}");
    restore_all(repo, &expected, &src);

    // The admin identity can do what the backup identity could not.
    let r = repo.json(["prune", "--grace", "0s"]);
    assert!(u(&r, "packs_deleted") >= 1, "{r}");
    let e = repo.json([
        "customer",
        "erase",
        "ana",
        "--reason",
        "e2e",
        "--prune-grace",
        "0s",
    ]);
    assert_eq!(u(&e, "held"), 0, "{e}");
    assert_eq!(
        u(&repo.json(["customer", "show", "ana"]), "records"),
        0,
        "the admin's erase completes what the backup identity's left half done"
    );
    repo.ok(["check", "--read-data"]);
    restore_all(repo, &expected, &src);
}

#[test]
fn restore_identity_reads_but_cannot_back_up() {
    let test = "identities-restore";
    let Some((_, restore)) = role_creds(test) else {
        return;
    };
    let Some(roles) = Roles::new(test, |_| String::new()) else {
        return;
    };
    let repo = &roles.repo;
    let bucket = repo.s3.as_ref().unwrap().bucket.clone();
    repo.ok(["init", "--kdf-memory-kib", "64", "--kdf-iterations", "1"]);
    let src = repo.p("src");
    let mut rng = rng(test);
    random_files(&mut rng, &src, "f", 4, 200_000);
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let tree = scan(&src);

    let before = roles.objects();
    let dest = repo.p("restored");
    let out = roles.run(
        &restore,
        [OsStr::new("restore"), OsStr::new(&id), dest.as_os_str()],
    );
    out.expect_ok();
    assert!(
        !out.stderr.contains("audit entry could not be written"),
        "{out}"
    );
    assert_trees_equal(
        &tree,
        &scan(&restored(&dest, &src)),
        Compare::CONTENT,
        "restore by the restore identity",
    );
    let check = roles.run(&restore, ["check", "--read-data"]);
    check.expect_ok();
    assert!(check.stdout.contains("no errors"), "{check}");

    // backup: refused at its first write; no partial damage.
    write_file(&src.join("new.bin"), &random_bytes(&mut rng, 100_000));
    let out = roles.run(&restore, backup_args(&[&src], &[]));
    out.expect_failure();
    out.expect_stderr("AccessDenied (HTTP 403)")
        .expect_stderr(&format!("from bucket {bucket}, key "));
    let after = roles.objects();
    nothing_lost(&before, &after, "after the restore identity's backup");
    let added: Vec<&String> = after.keys().filter(|n| !before.contains_key(*n)).collect();
    assert!(
        !added.is_empty() && added.iter().all(|n| n.starts_with("audit/")),
        "the restore identity adds its audit entries and nothing else: {added:?}"
    );
    assert_eq!(snapshot_ids(repo), vec![id.clone()]);
    repo.ok(["check", "--read-data"]);
    let log = repo.ok(["audit", "log"]).stdout;
    assert!(
        log.lines()
            .any(|l| l.contains(" restore ") && l.contains(" ok ")),
        "the restore identity's restore is audited:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(" backup ") && l.contains("error")),
        "so is its refused backup:\n{log}"
    );
}

/// An S3 API client on `bucket` with explicit credentials.
fn api(endpoint: &str, bucket: &str, key: &str, secret: &str) -> S3Api {
    S3Api::new(Connect {
        bucket,
        endpoint: Some(endpoint),
        region: "us-east-1",
        path_style: true,
        access_key_id: key,
        secret_access_key: secret,
        session_token: None,
    })
}

#[test]
fn backup_identity_cannot_bypass_governance_retention() {
    let test = "identities-governance";
    let Some((backup, _)) = role_creds(test) else {
        return;
    };
    let Some(s3) = s3_env(test) else {
        return;
    };
    let admin_key = std::env::var("AWS_ACCESS_KEY_ID").expect("AWS_ACCESS_KEY_ID");
    let admin_secret = std::env::var("AWS_SECRET_ACCESS_KEY").expect("AWS_SECRET_ACCESS_KEY");
    let bucket = format!("{test}-{:08x}", rand::random::<u32>());
    let admin = api(&s3.endpoint, &bucket, &admin_key, &admin_secret);
    let bk = api(&s3.endpoint, &bucket, &backup.key, &backup.secret);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    rt.block_on(async {
        admin
            .client()
            .create_bucket()
            .bucket(&bucket)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .expect("create bucket");
        // The backup identity writes a governance-locked object (as custos does with object_lock).
        assert!(bk
            .put(
                "canary",
                bytes::Bytes::from_static(b"locked by backup"),
                true,
                Some((custos::target::LockMode::Governance, until))
            )
            .await
            .expect("backup identity writes a locked object"));
        let versions = admin.list_versions("canary").await.unwrap();
        assert_eq!(versions.len(), 1, "{versions:?}");
        let vid = versions[0].version_id.clone();

        // Bypass as the backup identity: refused.
        let e = bk
            .client()
            .delete_object()
            .bucket(&bucket)
            .key("canary")
            .version_id(&vid)
            .bypass_governance_retention(true)
            .send()
            .await
            .expect_err("the backup identity deleted a governance-locked version");
        assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
        // Shortening the retention with bypass: refused.
        let shorter = aws_sdk_s3::types::ObjectLockRetention::builder()
            .mode(aws_sdk_s3::types::ObjectLockRetentionMode::Governance)
            .retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                until.timestamp() - 1800,
            ))
            .build();
        let e = bk
            .client()
            .put_object_retention()
            .bucket(&bucket)
            .key("canary")
            .version_id(&vid)
            .bypass_governance_retention(true)
            .retention(shorter)
            .send()
            .await
            .expect_err("the backup identity shortened a governance retention");
        assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
        assert_eq!(
            admin
                .protected_until("canary", Some(&vid))
                .await
                .unwrap()
                .map(|t| t.timestamp()),
            Some(until.timestamp()),
            "the retention is unchanged"
        );
        // Not even a plain delete (a delete marker) is allowed.
        let e = bk
            .client()
            .delete_object()
            .bucket(&bucket)
            .key("canary")
            .send()
            .await
            .expect_err("the backup identity deleted an object");
        assert_eq!(e.code(), Some("AccessDenied"), "{e:?}");
        assert_eq!(admin.list_versions("canary").await.unwrap().len(), 1);

        // The admin identity may bypass: the refusal above was the identity's.
        admin
            .client()
            .delete_object()
            .bucket(&bucket)
            .key("canary")
            .version_id(&vid)
            .bypass_governance_retention(true)
            .send()
            .await
            .expect("the admin identity bypasses governance retention");
        assert!(admin.list_versions("canary").await.unwrap().is_empty());
    });
}
