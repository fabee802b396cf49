//! Crash safety: `custos backup` killed with SIGKILL at a random moment
//! leaves a repository that checks clean (unindexed packs are only warnings),
//! whose earlier snapshots restore byte-identically, and in which the next
//! backup completes and restores. On a local target, prune then deletes
//! the staging files (`NAME#N`) a killed writer left, once they are old.
//!
//! Each trial uses a fresh repository holding one earlier snapshot (A), then
//! kills a backup of a larger tree (B). Kill times are drawn from the
//! measured duration of one uninterrupted run: every odd trial at 5–60 % of
//! it (surely mid-run, even when later runs are faster than the measured
//! one), the others from 0 to 110 % with extra weight near the end, where
//! the index and snapshot objects are written. At least half of the trials
//! must really have been killed mid-run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;

use crate::support::*;

/// Build tree B of about `mb` MB: a large random file, many medium random
/// files, and compressible text.
fn build_b(rng: &mut StdRng, root: &Path, mb: usize) {
    let total = mb << 20;
    write_file(&root.join("big.bin"), &random_bytes(rng, total * 3 / 8));
    let per = total / 4 / 30;
    random_files(rng, &root.join("files"), "b", 30, per);
    for i in 0..5 {
        write_file(
            &root.join(format!("text/t-{i}.log")),
            &text_bytes(rng, total * 3 / 8 / 5),
        );
    }
}

/// Structure and data check: no errors; returns the number of warnings.
#[track_caller]
fn check_clean(repo: &Repo, what: &str) -> usize {
    let out = repo.run(["--json", "check", "--read-data"]);
    assert_eq!(out.code, Some(0), "{what}: check failed\n{out}");
    let mut warnings = 0;
    for rep in out.json().as_array().unwrap() {
        assert_eq!(rep["errors"], Value::Array(vec![]), "{what}: {rep}");
        for w in rep["warnings"].as_array().unwrap() {
            let w = w.as_str().unwrap();
            assert!(w.contains("not indexed"), "{what}: unexpected warning {w}");
            warnings += 1;
        }
    }
    warnings
}

/// Staging files a writer killed mid-write leaves behind (`name#N`).
fn staging_paths(root: &Path) -> Vec<PathBuf> {
    read_all_files(root)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains('#'))
        })
        .collect()
}

fn staging_files(root: &Path) -> usize {
    staging_paths(root).len()
}

/// Every staging file under `root` dated two days back, plus one planted
/// beside a pack as `NAME#9` (a pack cut short, what a writer killed
/// before publishing leaves): what prune must delete. Returns how many
/// there are.
fn age_staging_files(root: &Path) -> usize {
    let pack = read_all_files(&root.join("data"))
        .into_iter()
        .next()
        .expect("a data pack")
        .0;
    let mut planted = pack.into_os_string();
    planted.push("#9");
    std::fs::write(&planted, b"a pack cut short").unwrap();
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(48 * 3600);
    let staged = staging_paths(root);
    for p in &staged {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(two_days_ago).unwrap();
    }
    staged.len()
}

fn trials(kind: Kind, test: &str, trials: usize, mb: usize) {
    if kind == Kind::S3 && s3_env(test).is_none() {
        return;
    }
    let mut rng = rng(test);
    let scratch = tempfile::Builder::new()
        .prefix(&format!("custos-e2e-{test}-"))
        .tempdir()
        .unwrap();
    let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
    random_files(&mut rng, &a, "a", 30, 50_000);
    build_b(&mut rng, &b, mb);
    let (tree_a, tree_b) = (scan(&a), scan(&b));
    let restores_ok = |repo: &Repo, id: &str, src: &PathBuf, tree: &Tree, what: &str| {
        let dest = repo.p(&format!("restore-{what}-{}", &id[..8]));
        repo.restore(id, &dest);
        assert_trees_equal(tree, &scan(&restored(&dest, src)), Compare::ALL, what);
        std::fs::remove_dir_all(&dest).unwrap();
    };

    let mut duration = Duration::ZERO;
    let (mut killed_n, mut committed_n, mut unindexed_n) = (0, 0, 0);
    for trial in 0..=trials {
        let repo = Repo::new(kind, &format!("{test}-{trial}")).unwrap();
        let repo = repo.init_with(&["--pack-size-mib", "2"]);
        let snap_a = s(&repo.backup(&[&a]), "snapshot_id").to_string();

        if trial == 0 {
            // Measure one uninterrupted run.
            let start = Instant::now();
            let r = repo.backup(&[&b]);
            duration = start.elapsed();
            eprintln!("{test}: an uninterrupted backup of {mb} MB took {duration:.2?}");
            restores_ok(&repo, s(&r, "snapshot_id"), &b, &tree_b, "measured");
            continue;
        }

        let frac = if trial % 2 == 1 {
            rng.gen_range(0.05..0.6)
        } else if rng.gen_bool(0.5) {
            rng.gen_range(0.75..1.1)
        } else {
            rng.gen_range(0.0..1.0)
        };
        let delay = duration.mul_f64(frac);
        let start = Instant::now();
        let mut child = spawn(repo.cmd(backup_args(&[&b], &[])));
        while start.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2).min(delay.saturating_sub(start.elapsed())));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
        }
        let out = finish(child, "backup (to be killed)", start);
        // The backup may exit on its own between `try_wait` and the SIGKILL;
        // the signal then hits a zombie and the exit status is the real one.
        // Only a death by signal counts as killed; anything else must be a
        // clean success.
        let killed = out.code.is_none();
        if killed {
            killed_n += 1;
        } else {
            out.expect_ok();
            // A run that beat the kill: later kill times scale with the
            // fastest run seen (the measured one may have been slowed down).
            duration = duration.min(out.elapsed);
        }

        // The repository is sound.
        let what = format!("trial {trial} (kill at {delay:.2?}, {:.0} %)", frac * 100.0);
        let warnings = check_clean(&repo, &what);
        unindexed_n += warnings;
        let snaps = repo.snapshots();
        let ids: Vec<&str> = snaps.iter().map(|v| s(v, "id")).collect();
        assert!(
            ids.contains(&snap_a.as_str()),
            "{what}: first snapshot lost: {ids:?}"
        );
        assert!(ids.len() <= 2, "{what}: {ids:?}");
        // Every snapshot that is listed restores exactly.
        restores_ok(&repo, &snap_a, &a, &tree_a, "earlier snapshot");
        if let Some(b_id) = ids.iter().find(|i| **i != snap_a) {
            committed_n += 1;
            restores_ok(
                &repo,
                b_id,
                &b,
                &tree_b,
                "snapshot committed before the kill",
            );
        }
        let staging = if kind == Kind::Local {
            staging_files(Path::new(&repo.url))
        } else {
            0
        };
        eprintln!(
            "{test}: {what}: killed {killed}, {} snapshot(s), {warnings} unindexed pack(s), {staging} staging file(s)",
            ids.len()
        );

        // The next backup completes and restores.
        let r = repo.backup(&[&b]);
        restores_ok(
            &repo,
            s(&r, "snapshot_id"),
            &b,
            &tree_b,
            "backup after the kill",
        );
        check_clean(&repo, &format!("{what}, after the next backup"));

        if kind == Kind::Local {
            // Prune deletes staging files once they are old enough, and only those.
            let root = Path::new(&repo.url);
            let staged = age_staging_files(root);
            let out = repo.run(["--json", "prune"]);
            assert_eq!(out.code, Some(0), "{what}: prune\n{out}");
            assert_eq!(out.json()["staging_files"], staged, "{what}: {out}");
            assert_eq!(
                staging_files(root),
                0,
                "{what}: staging files left after prune"
            );
            check_clean(&repo, &format!("{what}, after prune"));
            restores_ok(&repo, s(&r, "snapshot_id"), &b, &tree_b, "after prune");
        }
    }
    eprintln!(
        "{test}: {trials} trials: {killed_n} killed mid-run, {committed_n} had committed their snapshot, \
         {unindexed_n} unindexed packs in total"
    );
    // A trial whose backup finished before the signal proves nothing about
    // crashes: most must have died by SIGKILL mid-run.
    let min_killed = trials.div_ceil(2);
    assert!(
        killed_n >= min_killed,
        "{test}: only {killed_n} of {trials} trials were killed mid-run (need {min_killed})"
    );
}

#[test]
fn kill9_local() {
    trials(
        Kind::Local,
        "crash-local",
        knob("CUSTOS_TEST_CRASH_TRIALS", 12),
        knob("CUSTOS_TEST_CRASH_MB", 48),
    );
}

#[test]
fn kill9_s3() {
    trials(
        Kind::S3,
        "crash-s3",
        knob("CUSTOS_TEST_S3_CRASH_TRIALS", 2),
        knob("CUSTOS_TEST_CRASH_MB", 48) / 2,
    );
}
