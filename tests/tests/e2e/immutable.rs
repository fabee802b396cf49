//! Immutable and versioned S3 targets, and a target that dies mid-backup.
//!
//! - Three targets (local + two SeaweedFS instances, the second started by
//!   this test): one instance is SIGKILLed during a backup; the backup
//!   commits on the other two and exits 4; after a restart on the same data
//!   `custos sync` makes all three identical.
//! - A versioned bucket: prune removes the versions (and delete markers) of
//!   what it deletes, not just the current object.
//! - Object Lock: objects carry a retain-until, forget and prune skip and
//!   report locked objects, `locks extend` pushes retain-until forward,
//!   `targets check` passes on a lock-enforcing bucket and refuses on one
//!   without locks.
//!
//! Buckets with versioning or Object Lock are created here through the S3
//! API (`weed mini -bucket=` makes plain ones), with a unique name per test.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use custos::target::s3api::{Connect, S3Api};
use serde_json::Value;
use tempfile::TempDir;

use crate::support::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"))
}

fn api(endpoint: &str, bucket: &str) -> S3Api {
    S3Api::new(Connect {
        bucket,
        endpoint: Some(endpoint),
        region: &std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        path_style: true,
        access_key_id: &env("AWS_ACCESS_KEY_ID"),
        secret_access_key: &env("AWS_SECRET_ACCESS_KEY"),
        session_token: None,
    })
}

/// A fresh bucket on `endpoint`: `versioned` and/or with Object Lock.
fn make_bucket(endpoint: &str, test: &str, object_lock: bool, versioned: bool) -> String {
    let name = format!("{test}-{:08x}", rand::random::<u32>());
    let a = api(endpoint, &name);
    rt().block_on(async {
        let mut req = a.client().create_bucket().bucket(&name);
        if object_lock {
            req = req.object_lock_enabled_for_bucket(true);
        }
        req.send().await.expect("create bucket");
        if versioned {
            a.client()
                .put_bucket_versioning()
                .bucket(&name)
                .versioning_configuration(
                    aws_sdk_s3::types::VersioningConfiguration::builder()
                        .status(aws_sdk_s3::types::BucketVersioningStatus::Enabled)
                        .build(),
                )
                .send()
                .await
                .expect("enable versioning");
        }
    });
    name
}

/// A repository on one S3 bucket, driven through a config file.
struct Bucketed {
    work: TempDir,
    endpoint: String,
    bucket: String,
    prefix: String,
}

impl Bucketed {
    fn new(test: &str, s3: &S3Env, bucket: String) -> Bucketed {
        let work = tempfile::Builder::new()
            .prefix(&format!("custos-e2e-{test}-"))
            .tempdir()
            .unwrap();
        let b = Bucketed {
            work,
            endpoint: s3.endpoint.clone(),
            bucket,
            prefix: unique(test),
        };
        b.config(None);
        b
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    /// (Re)write the config, with `object_lock = lock` when given.
    fn config(&self, lock: Option<(&str, &str)>) {
        let mut t = String::from("[repository]\nkdf_memory_kib = 64\nkdf_iterations = 1\n");
        let _ = write!(
            t,
            "\n[[target]]\nname = \"s3\"\nurl = {}\nendpoint = {}\n",
            toml_str(&format!("s3://{}/{}", self.bucket, self.prefix)),
            toml_str(&self.endpoint)
        );
        if let Some((mode, period)) = lock {
            let _ = writeln!(
                t,
                "object_lock = {{ mode = {}, period = {} }}",
                toml_str(mode),
                toml_str(period)
            );
        }
        std::fs::write(self.p("custos.toml"), t).unwrap();
    }

    fn run<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = custos();
        cmd.arg("-c")
            .arg(self.p("custos.toml"))
            .arg("--no-cache")
            .env("CUSTOS_PASSWORD", PASSWORD)
            .args(args);
        run_cmd(cmd)
    }

    #[track_caller]
    fn json<I, S>(&self, args: I) -> Value
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut all: Vec<std::ffi::OsString> = vec!["--json".into()];
        all.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        let out = self.run(all);
        out.expect_ok();
        out.json()
    }

    fn api(&self) -> S3Api {
        api(&self.endpoint, &self.bucket)
    }

    fn key(&self, object: &str) -> String {
        format!("{}/{object}", self.prefix)
    }

    /// Every (key relative to the prefix, is delete marker) stored, all versions.
    fn versions(&self) -> Vec<(String, bool)> {
        let a = self.api();
        let mut v: Vec<(String, bool)> = rt()
            .block_on(a.list_versions(&format!("{}/", self.prefix)))
            .unwrap()
            .into_iter()
            .map(|v| (v.key[self.prefix.len() + 1..].to_string(), v.delete_marker))
            .collect();
        v.sort();
        v
    }

    /// Current object names under `prefix`.
    fn names(&self, prefix: &str) -> Vec<String> {
        if prefix == "config" {
            return vec!["config".into()];
        }
        RawStore::open(
            &format!("s3://{}/{}", self.bucket, self.prefix),
            Some(&self.endpoint),
        )
        .names(prefix)
    }

    fn retain_until(&self, object: &str) -> Option<DateTime<Utc>> {
        rt().block_on(self.api().protected_until(&self.key(object), None))
            .unwrap()
    }

    fn source(&self, test: &str, files: usize) -> PathBuf {
        let src = self.p("src");
        let mut rng = rng(test);
        random_files(&mut rng, &src, "m", files, 200_000);
        src
    }

    fn backup(&self, src: &Path) -> Value {
        let out = self.run(backup_args(&[src], &[]));
        out.expect_ok();
        single_report(&out)
    }
}

fn hours_from_now(t: DateTime<Utc>) -> f64 {
    (t - Utc::now()).num_seconds() as f64 / 3600.0
}

/// On a versioned bucket prune deletes every version and delete marker of
/// the packs, index objects and snapshots it removes (a plain DELETE would
/// only hide them), and leaves no probe behind.
#[test]
fn versioned_bucket_prune_leaves_no_versions() {
    let test = "ver-prune";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, false, true);
    let b = Bucketed::new(test, &s3, bucket);
    b.run(["init"]).expect_ok();
    let src = b.source(test, 8);
    let first = b.backup(&src);
    let first_id = s(&first, "snapshot_id").to_string();
    let doomed: Vec<String> = ["data/", "tree/", "index/"]
        .iter()
        .flat_map(|p| b.names(p))
        .collect();
    assert!(!doomed.is_empty());
    // A second snapshot of other data, then the first one goes.
    std::fs::remove_dir_all(&src).unwrap();
    let src2 = b.p("src2");
    random_files(&mut rng("ver-prune-2"), &src2, "n", 3, 100_000);
    b.backup(&src2);
    b.run(["forget", &first_id]).expect_ok();
    b.json(["prune", "--grace", "0s"]);
    let r = b.json(["prune", "--grace", "0s"]);
    assert!(u(&r, "packs_deleted") >= 1, "{r}");
    assert!(r["errors"].as_array().unwrap().is_empty(), "{r}");
    let versions = b.versions();
    for name in &doomed {
        assert!(
            !versions.iter().any(|(k, _)| k == name),
            "{name} still has a version or delete marker: {versions:?}"
        );
    }
    let snap = format!("snapshots/{first_id}");
    assert!(!versions.iter().any(|(k, _)| *k == snap), "{versions:?}");
    assert!(
        !versions.iter().any(|(k, m)| *m || k.starts_with("probes/")),
        "delete markers or probes left: {versions:?}"
    );
    // What is left is exactly what is current, one version each.
    let current: Vec<String> = [
        "config",
        "keys/",
        "datakeys/",
        "data/",
        "tree/",
        "index/",
        "snapshots/",
        "marks/",
        "audit/",
        "removals/",
    ]
    .iter()
    .flat_map(|p| b.names(p))
    .collect();
    let mut current = current;
    current.sort();
    current.dedup();
    let mut stored: Vec<String> = versions.into_iter().map(|(k, _)| k).collect();
    stored.sort();
    assert_eq!(stored, current);
    b.run(["check", "--read-data"]).expect_ok();
}

/// Object Lock: every repository object carries a retain-until; forget keeps
/// a locked snapshot and says until when; prune keeps (and reports) locked
/// packs of a snapshot an administrator removed; `targets check` proves the
/// lock is enforced.
#[test]
fn object_lock_retains_and_prune_forget_skip_locked() {
    let test = "lock-skip";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, true, false);
    let b = Bucketed::new(test, &s3, bucket);
    b.config(Some(("governance", "1d")));
    b.run(["init"]).expect_ok();
    let src = b.source(test, 6);
    let r = b.backup(&src);
    let id = s(&r, "snapshot_id").to_string();
    for prefix in [
        "config",
        "keys/",
        "datakeys/",
        "data/",
        "tree/",
        "index/",
        "snapshots/",
    ] {
        let names = b.names(prefix);
        assert!(!names.is_empty(), "{prefix}");
        for n in names {
            let until = b
                .retain_until(&n)
                .unwrap_or_else(|| panic!("{n} has no retain-until"));
            let h = hours_from_now(until);
            assert!((23.0..=24.5).contains(&h), "{n}: retain-until in {h} h");
        }
    }

    // A repair writes through `overwrite`: on a locked bucket the written
    // version is locked like any new object (a fresh name, so only the
    // overwrite itself can have set the retain-until).
    let t = custos::target::store::StoreTarget::open(
        "s3",
        &format!("s3://{}/{}", b.bucket, b.prefix),
        &custos::target::store::S3Options {
            endpoint: Some(b.endpoint.clone()),
            access_key_id: Some(env("AWS_ACCESS_KEY_ID")),
            secret_access_key: Some(env("AWS_SECRET_ACCESS_KEY")),
            object_lock: Some(custos::target::ObjectLock {
                mode: custos::target::LockMode::Governance,
                period: Duration::from_secs(24 * 3600),
            }),
            ..Default::default()
        },
        false,
    )
    .unwrap();
    // (A folder no reader parses: the bytes are not a real object.)
    let repaired = format!("repair-test/{}", custos::Id(rand::random()));
    {
        use custos::target::Target as _;
        rt().block_on(t.overwrite(&repaired, bytes::Bytes::from_static(b"repaired copy")))
            .unwrap();
    }
    let until = b
        .retain_until(&repaired)
        .expect("the repaired object has a retain-until");
    assert!((23.0..=24.5).contains(&hours_from_now(until)));

    // targets check: the bucket enforces the lock.
    let v = b.json(["targets", "check"]);
    assert_eq!(v["ok"], Value::Bool(true), "{v}");
    let t = &v["targets"][0];
    assert_eq!(t["immutable"], Value::Bool(true), "{v}");
    assert_eq!(t["bucket_object_lock"], Value::Bool(true), "{v}");
    assert_eq!(s(t, "object_lock_mode"), "governance");

    // forget: the snapshot is locked, kept and reported; exit 0.
    let v = b.json(["forget", &id]);
    assert!(v["removed"].as_array().unwrap().is_empty(), "{v}");
    let locked = v["locked"].as_array().unwrap();
    assert_eq!(locked.len(), 1, "{v}");
    assert_eq!(s(&locked[0], "object"), format!("snapshots/{id}"));
    assert!(!s(&locked[0], "retain_until").is_empty());
    assert_eq!(b.names("snapshots/").len(), 1);
    let out = b.run(["forget", &id]);
    out.expect_ok();
    assert!(out.stdout.contains("locked until"), "{out}");

    // An administrator removes the snapshot (governance bypass); its packs
    // are unreferenced but still locked: prune marks, then keeps and reports them.
    let a = b.api();
    let key = b.key(&format!("snapshots/{id}"));
    rt().block_on(async {
        for v in a.list_versions(&key).await.unwrap() {
            a.client()
                .delete_object()
                .bucket(&b.bucket)
                .key(&v.key)
                .version_id(&v.version_id)
                .bypass_governance_retention(true)
                .send()
                .await
                .expect("governance bypass delete");
        }
    });
    assert!(b.names("snapshots/").is_empty());
    let packs = b.names("data/");
    let r = b.json(["prune", "--grace", "0s"]);
    assert!(u(&r, "packs_marked") >= 1, "{r}");
    let r = b.json(["prune", "--grace", "0s"]);
    assert_eq!(u(&r, "packs_deleted"), 0, "{r}");
    assert!(u(&r, "marks_locked") >= 1, "{r}");
    let locked: Vec<String> = r["locked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| s(l, "object").to_string())
        .collect();
    for p in &packs {
        assert!(locked.contains(p), "{p} not reported locked: {r}");
    }
    assert!(r["errors"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(b.names("data/"), packs, "locked packs must stay");
    assert_eq!(
        b.names("marks/").len(),
        1,
        "the mark stays for a later prune"
    );
    let out = b.run(["prune", "--grace", "0s"]);
    out.expect_ok();
    assert!(out.stdout.contains("locked until"), "{out}");
}

/// `locks extend` raises the retain-until of data a newer snapshot with a
/// longer horizon deduplicated against, and of config and keys; a second
/// run has nothing to do.
#[test]
fn locks_extend_pushes_retain_until_forward() {
    let test = "lock-extend";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, true, false);
    let b = Bucketed::new(test, &s3, bucket);
    b.config(Some(("compliance", "1h")));
    b.run(["init"]).expect_ok();
    let src = b.source(test, 4);
    b.backup(&src);
    let pack = b.names("data/").remove(0);
    let before = hours_from_now(b.retain_until(&pack).unwrap());
    assert!((0.9..=1.1).contains(&before), "{before}");
    // A longer period for new objects: the next snapshot (same data, so no
    // new data packs) is locked 3 h; the packs it needs only 1 h.
    b.config(Some(("compliance", "3h")));
    let src2 = b.p("src");
    write_file(&src2.join("new.txt"), b"one more file");
    b.backup(&src2);
    assert!(b.names("data/").contains(&pack));
    let dry = b.json(["locks", "extend", "--dry-run"]);
    assert!(u(&dry["targets"][0], "extended") >= 1, "{dry}");
    assert!(hours_from_now(b.retain_until(&pack).unwrap()) < 1.2);
    let v = b.json(["locks", "extend"]);
    let t = &v["targets"][0];
    assert!(u(t, "extended") >= 2, "{v}");
    for n in [pack.as_str(), "config"] {
        let h = hours_from_now(b.retain_until(n).unwrap());
        assert!((2.9..=3.1).contains(&h), "{n}: {h} h");
    }
    let again = b.json(["locks", "extend"]);
    assert_eq!(u(&again["targets"][0], "extended"), 0, "{again}");
}

/// `migrate upgrade-format` on a locked bucket: the config is replaced by a
/// new, locked version (the old one stays, locked); the repository then
/// reads as format 3, old and new snapshots restore, `check --read-data` is
/// clean, and a second run has nothing to do.
#[test]
fn format_upgrade_on_a_locked_bucket() {
    let test = "lock-upgrade";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, true, false);
    let b = Bucketed::new(test, &s3, bucket);
    b.config(Some(("governance", "1d")));
    b.run(["init", "--format-version", "2"]).expect_ok();
    assert_eq!(u(&b.json(["cat", "config"]), "version"), 2);
    let src = b.p("src");
    for i in 0..30 {
        write_file(
            &src.join(format!("{i:02}.eml")),
            format!("Subject: {i}\n\nbody {i}").as_bytes(),
        );
    }
    let first = b.backup(&src);

    let v = b.json(["migrate", "upgrade-format"]);
    assert_eq!((u(&v, "from"), u(&v, "to")), (2, 3), "{v}");
    assert_eq!(strings(&v, "upgraded"), ["s3"], "{v}");
    assert_eq!(u(&b.json(["cat", "config"]), "version"), 3);
    let h = hours_from_now(b.retain_until("config").unwrap());
    assert!((23.0..=24.5).contains(&h), "config: retain-until in {h} h");
    let configs = b
        .versions()
        .into_iter()
        .filter(|(k, _)| k == "config")
        .count();
    assert_eq!(configs, 2, "the old config version stays, locked");
    let again = b.json(["migrate", "upgrade-format"]);
    assert!(strings(&again, "upgraded").is_empty(), "{again}");
    assert_eq!(strings(&again, "already"), ["s3"], "{again}");

    for i in 30..40 {
        write_file(
            &src.join(format!("{i:02}.eml")),
            format!("Subject: {i}\n\nnew {i}").as_bytes(),
        );
    }
    b.backup(&src);
    for (snap, n) in [(s(&first, "snapshot_id"), 30), ("latest", 40)] {
        let dest = b.p(&format!("restored-{n}"));
        b.json(["restore", snap, dest.to_str().unwrap()]);
        let root = dest.join("src");
        let got = std::fs::read_dir(&root).unwrap().count();
        assert_eq!(got, n, "{snap}");
        for i in 0..n {
            let name = format!("{i:02}.eml");
            assert_eq!(
                std::fs::read(root.join(&name)).unwrap(),
                std::fs::read(src.join(&name)).unwrap(),
                "{snap} {name}"
            );
        }
    }
    b.run(["check", "--read-data"]).expect_ok();
}

/// A tiny container-credentials endpoint (the ECS/EKS kind): every request
/// gets the test server's keys as temporary credentials. Returns its URL.
fn serve_container_credentials() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/credentials", listener.local_addr().unwrap());
    let body = serde_json::json!({
        "AccessKeyId": env("AWS_ACCESS_KEY_ID"),
        "SecretAccessKey": env("AWS_SECRET_ACCESS_KEY"),
        "Token": "",
        "Expiration": "2099-01-01T00:00:00Z",
    })
    .to_string();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = c.read(&mut buf);
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, served)
}

/// Without static keys (credentials from the container credential chain),
/// prune on a versioned bucket still removes every version: the aws-sdk
/// client is built from the same credentials object_store uses.
#[test]
fn versioned_bucket_without_static_keys_leaves_no_versions() {
    let test = "ver-chain";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, false, true);
    let b = Bucketed::new(test, &s3, bucket);
    let (url, served) = serve_container_credentials();
    let token = b.p("token");
    std::fs::write(&token, "test-token").unwrap();
    let run = |args: &[&str]| {
        let mut cmd = custos();
        cmd.arg("-c")
            .arg(b.p("custos.toml"))
            .arg("--no-cache")
            .env("CUSTOS_PASSWORD", PASSWORD)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", &url)
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token)
            .args(args);
        run_cmd(cmd)
    };
    run(&["init"]).expect_ok();
    let src = b.source(test, 3);
    let out = run(&["--json", "backup", src.to_str().unwrap()]);
    out.expect_ok();
    let first = s(&single_report(&out), "snapshot_id").to_string();
    let doomed = b.names("data/");
    std::fs::remove_dir_all(&src).unwrap();
    let src2 = b.p("src2");
    random_files(&mut rng("ver-chain-2"), &src2, "n", 2, 50_000);
    run(&["backup", src2.to_str().unwrap()]).expect_ok();
    run(&["forget", &first]).expect_ok();
    run(&["prune", "--grace", "0s"]).expect_ok();
    let out = run(&["--json", "prune", "--grace", "0s"]);
    out.expect_ok();
    assert!(u(&out.json(), "packs_deleted") >= 1, "{out}");
    assert!(!doomed.is_empty());
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no credentials requested"
    );
    let versions = b.versions();
    assert!(!versions.is_empty());
    for name in doomed.iter().chain([&format!("snapshots/{first}")]) {
        assert!(
            !versions.iter().any(|(k, _)| k == name),
            "{name} left a version or delete marker: {versions:?}"
        );
    }
}

/// Every object still needed is kept locked, however old: a snapshot whose
/// own lock (upload + period) has run out still has its packs and index
/// extended to now + period, and so does a legal hold; a run right after
/// has nothing to do (only what would expire within half a period is
/// extended).
#[test]
fn locks_extend_keeps_old_snapshots_data_and_holds_locked() {
    let test = "lock-extend-old";
    let Some(s3) = s3_env(test) else { return };
    let bucket = make_bucket(&s3.endpoint, test, true, false);
    let b = Bucketed::new(test, &s3, bucket);
    b.config(Some(("governance", "6s")));
    b.run(["init"]).expect_ok();
    let src = b.source(test, 3);
    let snap = s(&b.backup(&src), "snapshot_id").to_string();
    b.run(["hold", "add", "case-1", "--reason", "litigation"])
        .expect_ok();
    let pack = b.names("data/").remove(0);
    let index = b.names("index/").remove(0);
    let hold = b.names("holds/").remove(0);
    let written: Vec<DateTime<Utc>> = [&pack, &index, &hold]
        .iter()
        .map(|n| b.retain_until(n).unwrap())
        .collect();
    // Past every object's own lock: the snapshot is 7 s old, its period 6 s.
    std::thread::sleep(std::time::Duration::from_secs(7));
    for (n, w) in [&pack, &index, &hold].iter().zip(&written) {
        assert!(*w < Utc::now(), "{n} still locked until {w}");
    }
    let v = b.json(["locks", "extend"]);
    let t = &v["targets"][0];
    assert!(t["errors"].as_array().unwrap().is_empty(), "{v}");
    let now = Utc::now();
    for n in [&pack, &index, &hold, &"config".to_string()] {
        let until = b.retain_until(n).unwrap();
        assert!(
            until > now + chrono::Duration::seconds(3),
            "{n}: retain-until {until} not pushed to about now + 6 s ({now})"
        );
    }
    // The snapshot object keeps its own lock (forget may remove it now).
    assert!(b.retain_until(&format!("snapshots/{snap}")).unwrap() < now);
    let again = b.json(["locks", "extend"]);
    assert_eq!(u(&again["targets"][0], "extended"), 0, "{again}");
}

/// Occurrences of `needle` in the decrypted blobs of every pack of the bucket's repository.
fn bucket_hits(b: &Bucketed, needle: &[u8]) -> usize {
    let raw = RawStore::open(
        &format!("s3://{}/{}", b.bucket, b.prefix),
        Some(&b.endpoint),
    );
    block_on(async {
        let (r, _) = custos::Repository::open(vec![raw.target.clone()], PASSWORD.as_bytes())
            .await
            .expect("open");
        let mut hits = 0;
        for prefix in ["data/", "tree/"] {
            for m in raw.target.list(prefix).await.unwrap() {
                let bytes = raw.target.get(&m.name).await.unwrap();
                for e in custos::pack::read_header(r.keys(), &m.name, &bytes).unwrap() {
                    let sealed = &bytes[e.offset as usize..(e.offset + e.length) as usize];
                    if e.ty == custos::blob::BlobType::Data {
                        r.ensure_data_keys([sealed]).await.unwrap();
                    }
                    let plain = custos::pack::decode_entry(r.keys(), &e, &bytes).unwrap();
                    if contains(&plain, needle) {
                        hits += 1;
                    }
                }
            }
        }
        hits
    })
}

/// A bucket with a 25 s governance lock, a jsonl chat source (plus `extra`
/// config) holding `lines`, initialized and backed up once (the canary is
/// stored); `None` without an S3 server.
fn locked_chat_backup(test: &str, extra: &str, lines: &[Value], canary: &str) -> Option<Bucketed> {
    let s3 = s3_env(test)?;
    let bucket = make_bucket(&s3.endpoint, test, true, false);
    let b = Bucketed::new(test, &s3, bucket);
    b.config(Some(("governance", "25s")));
    let chat = b.p("chat.jsonl");
    let mut cfg = std::fs::read_to_string(b.p("custos.toml")).unwrap();
    let _ = write!(
        cfg,
        "\n[[source]]\nname = \"chat\"\ntype = \"jsonl\"\npath = {}\nid_field = \"id\"\n\
         time_field = \"ts\"\ncustomer_fields = [\"email:email\"]\ntext_field = \"text\"\n\
         kind = \"chat_message\"\n{extra}",
        toml_str(&chat.display().to_string())
    );
    std::fs::write(b.p("custos.toml"), cfg).unwrap();
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    write_file(&chat, text.as_bytes());
    b.run(["init"]).expect_ok();
    b.run(["backup"]).expect_ok();
    assert!(bucket_hits(&b, canary.as_bytes()) >= 1);
    Some(b)
}

/// `object` is gone from the listing and no version of it is left.
fn assert_no_version_left(b: &Bucketed, object: &str) {
    assert!(!b.names("snapshots/").contains(&object.to_string()));
    assert!(
        !b.versions().iter().any(|(k, _)| k == object),
        "a version of {object} is left"
    );
}

/// An erasure an Object Lock holds back: `customer erase` reports the locked
/// old snapshot with its retain-until and the erasure is pending; a retry
/// before that date changes nothing; a retry after it deletes the snapshot
/// (every version), prunes the erased data out, marks the erasure complete
/// and audits it — and no decrypted byte of the bucket holds the canary.
#[test]
fn a_locked_erasure_completes_after_the_retain_until() {
    const CANARY: &str = "CANARY-ANA-LOCK-5e1d";
    let Some(b) = locked_chat_backup(
        "lock-erase",
        "",
        &[
            serde_json::json!({"id": "a1", "ts": "2026-03-03T10:00:00Z", "email": "ana@example.org", "text": format!("ana {CANARY}")}),
            serde_json::json!({"id": "b1", "ts": "2026-03-03T10:01:00Z", "email": "bo@example.org", "text": "bo here"}),
        ],
        CANARY,
    ) else {
        return;
    };

    let e = b.json([
        "customer",
        "erase",
        "ana@example.org",
        "--reason",
        "GDPR #9",
        "--prune-grace",
        "0s",
    ]);
    let id = s(&e, "erasure_log").to_string();
    let locked = e["locked"].as_array().unwrap();
    assert_eq!(locked.len(), 1, "{e}");
    let old = s(&locked[0], "object").to_string();
    assert!(old.starts_with("snapshots/"), "{e}");
    let until: DateTime<Utc> = s(&locked[0], "retain_until").parse().unwrap();
    assert!(until > Utc::now(), "{e}");
    let log = b.json(["customer", "log"]);
    assert_eq!(s(&log[0], "state"), "pending", "{log}");
    assert_eq!(s(&log[0]["pending"][0], "object"), old, "{log}");
    let out = b.run(["customer", "log"]);
    assert!(
        out.stdout.contains("pending") && out.stdout.contains("locked until"),
        "{out}"
    );

    // Before the retain-until: still pending, nothing deleted.
    let r = b.json([
        "customer",
        "erase",
        "--retry-pending",
        "--prune-grace",
        "0s",
    ]);
    assert!(r["completed"].as_array().unwrap().is_empty(), "{r}");
    assert_eq!(r["erasures"][0]["not_due"], true, "{r}");
    assert!(b.names("snapshots/").contains(&old));
    assert!(bucket_hits(&b, CANARY.as_bytes()) >= 1);
    assert_eq!(s(&b.json(["customer", "log"])[0], "state"), "pending");

    // After it: the old snapshot and the erased data go, the erasure completes.
    let wait = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    std::thread::sleep(wait);
    let r = b.json([
        "customer",
        "erase",
        "--retry-pending",
        "--prune-grace",
        "0s",
    ]);
    assert_eq!(r["completed"], serde_json::json!([id]), "{r}");
    assert_eq!(s(&r["erasures"][0]["removed"][0], "object"), old, "{r}");
    assert_no_version_left(&b, &old);
    assert_eq!(bucket_hits(&b, CANARY.as_bytes()), 0);
    let log = b.json(["customer", "log"]);
    assert_eq!(s(&log[0], "state"), "complete", "{log}");
    assert!(!s(&log[0], "completed").is_empty(), "{log}");
    let audit = b.json(["audit", "log"]);
    assert!(
        audit.to_string().contains("erasure complete") && audit.to_string().contains(&id),
        "{audit}"
    );
    // Bo's record is still there and the repository checks.
    let bo = b.json(["customer", "show", "bo@example.org"]);
    assert_eq!(u(&bo, "records"), 1, "{bo}");
    b.run(["check", "--read-data"]).expect_ok();
    // A second retry has nothing to do.
    let r = b.json(["customer", "erase", "--retry-pending"]);
    assert_eq!(u(&r, "open"), 0, "{r}");
}

/// `retention apply` under a short governance lock: the replaced snapshot
/// is locked, so the disposal is pending (`retention log` says until when)
/// and the expired record's data stays; a prune before the retain-until
/// changes nothing; prunes after it delete the old snapshot (every version)
/// and the disposed data, the disposal completes (audited), the repository
/// checks, and the record no rule expires is still there.
#[test]
fn a_locked_retention_disposal_completes_after_the_retain_until() {
    const CANARY: &str = "CANARY-EXPIRED-LOCK-77c2";
    let Some(b) = locked_chat_backup(
        "lock-dispose",
        "\n[record_retention]\ndefault = \"forever\"\n[[record_retention.rule]]\n\
         name = \"chat 1y\"\nkind = \"chat_message\"\nkeep = \"1y\"\n",
        &[
            serde_json::json!({"id": "old1", "ts": "2020-03-03T10:00:00Z", "email": "ana@example.org", "text": format!("ana {CANARY}")}),
            serde_json::json!({"id": "new1", "ts": Utc::now().to_rfc3339(), "email": "bo@example.org", "text": "bo here"}),
        ],
        CANARY,
    ) else {
        return;
    };

    let a = b.json(["retention", "apply", "--prune-grace", "0s"]);
    let id = s(&a, "disposal_log").to_string();
    assert_eq!(u(&a["removed"][0], "records"), 1, "{a}");
    let locked = a["locked"].as_array().unwrap();
    assert_eq!(locked.len(), 1, "{a}");
    let old = s(&locked[0], "object").to_string();
    assert!(old.starts_with("snapshots/"), "{a}");
    let until: DateTime<Utc> = s(&locked[0], "retain_until").parse().unwrap();
    assert!(until > Utc::now(), "{a}");
    assert_eq!(u(&a["prune"]["erasures"], "disposals_open"), 1, "{a}");
    let log = b.json(["retention", "log"]);
    assert_eq!(s(&log[0], "state"), "pending", "{log}");
    assert_eq!(s(&log[0], "id"), id, "{log}");
    assert_eq!(s(&log[0]["pending"][0], "object"), old, "{log}");
    let out = b.run(["retention", "log"]);
    assert!(
        out.stdout.contains("pending") && out.stdout.contains("locked until"),
        "{out}"
    );

    // Before the retain-until: the prune retries nothing.
    let p = b.json(["prune", "--grace", "0s"]);
    assert_eq!(p["erasures"]["disposals"][0]["not_due"], true, "{p}");
    assert!(b.names("snapshots/").contains(&old));
    assert!(bucket_hits(&b, CANARY.as_bytes()) >= 1);

    // After it: the old snapshot, then the disposed data go.
    let wait = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(2);
    std::thread::sleep(wait);
    let p = b.json(["prune", "--grace", "0s"]);
    assert_eq!(
        s(&p["erasures"]["disposals"][0]["removed"][0], "object"),
        old,
        "{p}"
    );
    assert_no_version_left(&b, &old);
    let mut prunes = 1;
    while s(&b.json(["retention", "log"])[0], "state") == "pending" && prunes < 3 {
        b.run(["prune", "--grace", "0s"]).expect_ok();
        prunes += 1;
    }
    let log = b.json(["retention", "log"]);
    assert_eq!(
        s(&log[0], "state"),
        "complete",
        "after {prunes} prunes: {log}"
    );
    assert_eq!(bucket_hits(&b, CANARY.as_bytes()), 0);
    let audit = b.json(["audit", "log"]);
    assert!(
        audit.to_string().contains("disposal complete") && audit.to_string().contains(&id),
        "{audit}"
    );
    // Nothing else lost: Bo's record is there and the repository checks.
    let bo = b.json(["customer", "show", "bo@example.org"]);
    assert_eq!(u(&bo, "records"), 1, "{bo}");
    b.run(["check", "--read-data"]).expect_ok();
    let p = b.json(["prune", "--grace", "0s"]);
    assert!(p.get("erasures").is_none(), "nothing open any more: {p}");
}

/// `targets check` refuses a target whose bucket does not enforce Object
/// Lock (exit 1, `immutable: false`, the reason in `detail`).
#[test]
fn targets_check_refuses_a_bucket_without_lock() {
    let test = "lock-refuse";
    let Some(s3) = s3_env(test) else { return };
    let b = Bucketed::new(test, &s3, s3.bucket.clone());
    b.config(Some(("compliance", "1d")));
    let out = b.run(["--json", "targets", "check"]);
    out.expect_code(1);
    let v = out.json();
    assert_eq!(v["ok"], Value::Bool(false), "{v}");
    let t = &v["targets"][0];
    assert_eq!(t["immutable"], Value::Bool(false), "{v}");
    assert_eq!(t["bucket_object_lock"], Value::Bool(false), "{v}");
    assert!(s(t, "detail").contains("Object Lock"), "{v}");
    let out = b.run(["targets", "check"]);
    out.expect_code(1).expect_stderr("not enforced");
    assert!(out.stdout.contains("NOT IMMUTABLE"), "{out}");
}

// ---------------------------------------------------------------------------
// A second SeaweedFS instance, killed mid-backup

/// A SeaweedFS instance of our own (scripts/services/s3.sh), stopped on drop.
struct Weed {
    name: String,
    endpoint: String,
}

fn s3_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/services/s3.sh")
}

impl Weed {
    fn start(test: &str) -> Weed {
        let name = format!("e2e-{test}-{}", std::process::id());
        for i in 0..20 {
            let port = 18700 + 10 * i;
            let st = Command::new("bash")
                .arg(s3_sh())
                .args(["start", &name, &port.to_string()])
                .status()
                .unwrap();
            match st.code() {
                Some(0) => {
                    return Weed {
                        name,
                        endpoint: format!("http://127.0.0.1:{port}"),
                    }
                }
                Some(3) => continue,
                other => panic!("s3.sh start {name} {port} exited {other:?}"),
            }
        }
        panic!("no free port range for a second S3 server");
    }

    fn dir(&self) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/services/s3")
            .join(&self.name)
    }

    /// SIGKILL the server's process group (it runs under setsid).
    fn kill(&self) {
        let pid = std::fs::read_to_string(self.dir().join("pid")).unwrap();
        let st = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", pid.trim())])
            .status()
            .unwrap();
        assert!(st.success(), "kill -KILL -{pid}");
    }

    /// Start again on the same port and data.
    fn restart(&self) {
        let st = Command::new("bash")
            .arg(s3_sh())
            .args(["restart", &self.name])
            .status()
            .unwrap();
        assert!(st.success(), "s3.sh restart {}", self.name);
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(s3_sh())
            .args(["stop", &self.name])
            .status();
    }
}

/// Must hold: local + two S3 instances; one instance is SIGKILLed while a
/// backup uploads to it. The backup commits on the other two and exits 4
/// (lagging); after the instance restarts on its old data, `custos sync`
/// makes all three targets hold identical objects, byte for byte.
#[test]
fn killed_s3_instance_lags_then_sync_makes_three_targets_identical() {
    let test = "kill-sync";
    let Some(s3) = s3_env(test) else { return };
    let weed = Weed::start(test);
    let work = tempfile::Builder::new()
        .prefix("custos-e2e-kill-sync-")
        .tempdir()
        .unwrap();
    let prefix = unique(test);
    let targets = [
        (
            "local",
            work.path().join("local").display().to_string(),
            None,
        ),
        (
            "s3a",
            format!("s3://{}/{prefix}", s3.bucket),
            Some(s3.endpoint.clone()),
        ),
        (
            "s3b",
            format!("s3://{}/{prefix}", s3.bucket),
            Some(weed.endpoint.clone()),
        ),
    ];
    let mut cfg = String::from("[repository]\nkdf_memory_kib = 64\nkdf_iterations = 1\n");
    for (name, url, ep) in &targets {
        let _ = write!(
            cfg,
            "\n[[target]]\nname = {}\nurl = {}\n",
            toml_str(name),
            toml_str(url)
        );
        if let Some(ep) = ep {
            let _ = writeln!(cfg, "endpoint = {}", toml_str(ep));
        }
        if *name == "s3b" {
            // Slow enough that the kill lands mid-backup.
            cfg.push_str("max_concurrency = 1\nupload_limit_kib = 4096\n");
        }
    }
    let config = work.path().join("custos.toml");
    std::fs::write(&config, cfg).unwrap();
    let cmd = |args: &[&str]| {
        let mut c = custos();
        c.arg("-c")
            .arg(&config)
            .arg("--no-cache")
            .env("CUSTOS_PASSWORD", PASSWORD)
            .args(args);
        c
    };
    run_cmd(cmd(&["init", "--pack-size-mib", "1"])).expect_ok();
    let src = work.path().join("src");
    random_files(&mut rng(test), &src, "m", 24, 1_000_000);

    let raw = |i: usize| RawStore::open(&targets[i].1, targets[i].2.as_deref());
    let start = Instant::now();
    let args: Vec<String> = backup_args(&[&src], &[])
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut child = spawn(cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    // Kill s3b once some packs reached it.
    let b = raw(2);
    loop {
        if b.target_list_quiet("data/") >= 2 {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            panic!(
                "backup ended before the kill:\n{}",
                finish(child, "backup", start)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no pack reached s3b within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    weed.kill();
    let out = finish(child, "backup", start);
    out.expect_code(EXIT_LAGGING);
    let r = single_report(&out);
    let mut committed = strings(&r, "committed");
    committed.sort();
    assert_eq!(committed, ["local", "s3a"], "{r}");
    assert_eq!(s(&r["lagging"][0], "target"), "s3b", "{r}");

    weed.restart();
    // The restarted server answers before its volume is back (500s for a
    // moment): wait until it serves the repository's config again.
    let back = raw(2);
    let waiting = Instant::now();
    while rt().block_on(back.target.get("config")).is_err() {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "s3b does not serve its data 60 s after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(back);
    let out = run_cmd(cmd(&["--json", "sync"]));
    out.expect_ok();
    let stores: Vec<RawStore> = (0..3).map(raw).collect();
    let mut total = 0;
    let config = stores[0].get("config");
    for other in &stores[1..] {
        assert!(config == other.get("config"), "config differs");
    }
    for prefix in [
        "keys/",
        "datakeys/",
        "data/",
        "tree/",
        "index/",
        "snapshots/",
    ] {
        let listing = stores[0].list(prefix);
        assert!(!listing.is_empty(), "{prefix}");
        for other in &stores[1..] {
            assert_eq!(listing, other.list(prefix), "{prefix} differs");
        }
        for (name, _) in &listing {
            let bytes = stores[0].get(name);
            for other in &stores[1..] {
                assert!(bytes == other.get(name), "{name} differs");
            }
            total += 1;
        }
    }
    assert!(total > 10, "{total} objects");
    let snaps = run_cmd(cmd(&["--json", "snapshots", "--target", "s3b"]));
    snaps.expect_ok();
    assert_eq!(snaps.json().as_array().unwrap().len(), 1);
    run_cmd(cmd(&["check", "--read-data"])).expect_ok();
}

impl RawStore {
    /// How many objects are under `prefix` (0 when the listing fails).
    fn target_list_quiet(&self, prefix: &str) -> usize {
        rt().block_on(self.target.list(prefix))
            .map(|l| l.len())
            .unwrap_or(0)
    }
}
