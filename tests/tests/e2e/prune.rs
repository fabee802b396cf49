//! `prune`: two-phase deletion of unreferenced data (mark, then sweep after
//! the grace period), repacking, and safety while backups run.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::support::*;

fn prune(repo: &Repo, grace: &str) -> Value {
    repo.json(["prune", "--grace", grace])
}

#[test]
fn forgotten_data_is_marked_then_deleted_local() {
    let repo = Repo::new(Kind::Local, "prune").unwrap().init();
    let mut rng = rng("prune");
    let (a, b) = (repo.p("a"), repo.p("b"));
    random_files(&mut rng, &a, "a", 6, 500_000);
    random_files(&mut rng, &b, "b", 6, 500_000);
    let sa = s(&repo.backup(&[&a]), "snapshot_id").to_string();
    let sb = s(&repo.backup(&[&b]), "snapshot_id").to_string();
    let before = repo.stored_size();
    repo.ok(["forget", &sa[..8]]);

    // Phase 1 marks; nothing is deleted, everything still checks.
    let r1 = prune(&repo, "0s");
    assert!(u(&r1, "packs_marked") >= 1, "{r1}");
    assert_eq!(u(&r1, "packs_deleted"), 0, "{r1}");
    assert_eq!(repo.stored_size(), before);
    repo.ok(["check", "--read-data"]);

    // Phase 2 (a later run, grace elapsed) deletes; the kept snapshot restores.
    let r2 = prune(&repo, "0s");
    assert!(u(&r2, "packs_deleted") >= 1, "{r2}");
    assert!(u(&r2, "bytes_freed") >= 2_500_000, "{r2}");
    assert!(
        repo.stored_size() < before - 2_500_000,
        "{} vs {before}",
        repo.stored_size()
    );
    let chk = repo.json(["check", "--read-data"]);
    assert!(chk[0]["errors"].as_array().unwrap().is_empty(), "{chk}");
    assert!(chk[0]["warnings"].as_array().unwrap().is_empty(), "{chk}");
    let dest = repo.p("rb");
    repo.restore(&sb, &dest);
    assert_same_dir(&b, &restored(&dest, &b), Compare::ALL);

    // A long grace period keeps marks pending.
    repo.ok(["forget", &sb[..8]]);
    let r3 = prune(&repo, "24h");
    assert!(u(&r3, "packs_marked") >= 1, "{r3}");
    let r4 = prune(&repo, "24h");
    assert_eq!(u(&r4, "packs_deleted"), 0, "{r4}");
    assert!(u(&r4, "packs_pending") >= 1, "{r4}");
}

/// Many one-blob files, every other one deleted: which blobs share a pack is
/// up to the parallel packers, but with ~150 blobs of each kind spread over
/// a few packs every pack holds both, so each is about half garbage (more
/// than the 20 % threshold given, whatever the mix) and must be repacked;
/// afterwards only live data (plus metadata) remains.
#[test]
fn half_used_packs_are_repacked_local() {
    let repo = Repo::new(Kind::Local, "repack").unwrap().init();
    let mut rng = rng("repack");
    let src = repo.p("src");
    // 8 000 bytes is below the minimum chunk size: one blob per file.
    random_files(&mut rng, &src, "f", 300, 8_000);
    let s1 = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    for i in (0..300).step_by(2) {
        std::fs::remove_file(src.join(format!("f-{i:03}.bin"))).unwrap();
    }
    let s2 = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    let before = repo.stored_size();
    repo.ok(["forget", &s1[..8]]);
    let r1 = repo.json(["prune", "--grace", "0s", "--repack-threshold", "20"]);
    assert!(u(&r1, "packs_repacked") >= 1, "{r1}");
    assert!(u(&r1, "unused_blobs") >= 150, "{r1}");
    repo.json(["prune", "--grace", "0s", "--repack-threshold", "20"]);
    // Nothing is left to repack or mark.
    let r3 = repo.json([
        "prune",
        "--grace",
        "0s",
        "--repack-threshold",
        "20",
        "--dry-run",
    ]);
    assert_eq!(u(&r3, "packs_repacked"), 0, "{r3}");
    assert_eq!(u(&r3, "packs_marked"), 0, "{r3}");
    let chk = repo.json(["check", "--read-data"]);
    assert!(chk[0]["errors"].as_array().unwrap().is_empty(), "{chk}");
    let dest = repo.p("r2");
    repo.restore(&s2, &dest);
    assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
    // The 150 deleted files held 1.2 MB of incompressible data: all of it is
    // gone (less a margin for the rewritten index).
    let after = repo.stored_size();
    assert!(after + 1_150_000 < before, "{after} vs {before}");
}

/// Backups in a loop while prune runs in a loop with a tiny grace period, on
/// `kind`: every snapshot the backup loop committed restores byte-identical.
///
/// The pruner forgets only pre-seeded `junk` snapshots, one per run: each
/// holds data of its own (garbage once forgotten) and copies of files the
/// backup loop adds later (so backups deduplicate against packs prune then
/// repacks or deletes under them). It must have deleted packs while the
/// backups ran, or the test proves nothing.
fn backups_and_prune_concurrently(kind: Kind, test: &str) {
    let Some(repo) = Repo::new(kind, test) else {
        return;
    };
    let repo = repo.no_cache().init();
    let rounds = knob("CUSTOS_TEST_PRUNE_ROUNDS", 12);
    let size = knob("CUSTOS_TEST_PRUNE_FILE_BYTES", 150_000);
    let mut rng = rng(test);
    // The backup loop's data, made up front so junk snapshots can share it.
    let pool = repo.p("pool");
    for round in 0..rounds {
        random_files(&mut rng, &pool, &format!("r{round}"), 3, size);
    }
    let junk_count = rounds / 2 + 2;
    let mut junk: Vec<String> = Vec::new();
    for j in 0..junk_count {
        let dir = repo.p(&format!("junk{j}"));
        random_files(&mut rng, &dir, "own", 2, size);
        // A file the backup loop keeps from an early round (referenced from
        // this pack once that round committed: forgetting this snapshot then
        // repacks) and one of a later round (stored again if this pack is
        // marked by then).
        for name in [
            format!("r{}-002.bin", j / 2),
            format!("r{}-000.bin", (2 * j + 1).min(rounds - 1)),
        ] {
            std::fs::copy(pool.join(&name), dir.join(format!("shared-{name}"))).unwrap();
        }
        let r = repo.backup_with(&[&dir], &["--tag", "junk"]);
        junk.push(s(&r, "snapshot_id").to_string());
    }

    let src = repo.p("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut expected: BTreeMap<String, Tree> = BTreeMap::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    // The pruner starts once the first backup committed.
    let started = std::sync::atomic::AtomicBool::new(false);
    /// Stops the pruner even when the backup loop panics (else the scope never ends).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    #[derive(Default, Debug)]
    struct PrunerStats {
        runs: u64,
        forgotten: u64,
        marked: u64,
        repacked: u64,
        /// Packs deleted by runs that started while backups were running.
        deleted_during_backups: u64,
    }
    std::thread::scope(|scope| {
        let _stop_guard = StopOnDrop(&stop);
        let junk = &junk;
        let (repo, stop, started) = (&repo, &stop, &started);
        let pruner = scope.spawn(move || {
            let mut st = PrunerStats::default();
            while !started.load(std::sync::atomic::Ordering::Relaxed)
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            while (!stop.load(std::sync::atomic::Ordering::Relaxed) || st.runs < 2) && st.runs < 300
            {
                let running = !stop.load(std::sync::atomic::Ordering::Relaxed);
                if let Some(id) = junk.get(st.forgotten as usize) {
                    repo.ok(["forget", id.as_str()]);
                    st.forgotten += 1;
                }
                let r = repo.json(["prune", "--grace", "1s", "--repack-threshold", "10"]);
                assert!(r["errors"].as_array().unwrap().is_empty(), "{r}");
                st.marked += u(&r, "packs_marked");
                st.repacked += u(&r, "packs_repacked");
                if running {
                    st.deleted_during_backups += u(&r, "packs_deleted");
                }
                st.runs += 1;
                std::thread::sleep(std::time::Duration::from_millis(150));
            }
            st
        });
        for round in 0..rounds {
            // Each round adds this round's files (partly already stored by a
            // junk snapshot prune is about to drop), drops one of two rounds
            // ago and brings back data of earlier rounds under a new name.
            for i in 0..3 {
                let name = format!("r{round}-{i:03}.bin");
                std::fs::copy(pool.join(&name), src.join(&name)).unwrap();
            }
            if round >= 2 {
                let _ = std::fs::remove_file(src.join(format!("r{}-000.bin", round - 2)));
                std::fs::copy(
                    pool.join(format!("r{}-001.bin", round - 2)),
                    src.join(format!("copy{round}")),
                )
                .unwrap();
            }
            let snap = scan(&src);
            let out = repo.run(backup_args(&[&src], &[]));
            out.expect_ok();
            expected.insert(s(&single_report(&out), "snapshot_id").to_string(), snap);
            started.store(true, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let st = pruner.join().unwrap();
        eprintln!("{test}: pruner {st:?}");
        assert!(
            st.forgotten >= 2 && st.marked > 0 && st.repacked > 0 && st.deleted_during_backups > 0,
            "prune did not mark, repack and delete while backups ran: {st:?}"
        );
    });
    assert_eq!(expected.len(), rounds, "every backup committed");
    // Let every pending mark ripen and be carried out.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    repo.ok(["prune", "--grace", "1s"]);
    let out = repo.run(["--json", "check", "--read-data"]);
    assert_eq!(out.code, Some(0), "{out}");
    let chk = out.json();
    assert!(chk[0]["errors"].as_array().unwrap().is_empty(), "{chk}");
    let present: std::collections::BTreeSet<String> = repo
        .snapshots()
        .iter()
        .map(|v| s(v, "id").to_string())
        .collect();
    for (id, tree) in &expected {
        assert!(present.contains(id), "committed snapshot {id} is gone");
        let dest = repo.p(&format!("restore-{}", &id[..8]));
        repo.restore(id, &dest);
        let got = scan(&restored(&dest, &src));
        assert_trees_equal(tree, &got, Compare::CONTENT, &format!("snapshot {id}"));
    }
}

#[test]
fn backups_and_prune_concurrently_local() {
    backups_and_prune_concurrently(Kind::Local, "prune-race-local");
}

#[test]
fn backups_and_prune_concurrently_s3() {
    backups_and_prune_concurrently(Kind::S3, "prune-race-s3");
}

/// A backup that meets data prune has marked stores it again instead of
/// referencing the doomed pack, so the mark can be carried out.
#[test]
fn backup_stores_again_what_prune_marked_local() {
    let repo = Repo::new(Kind::Local, "prune-rescue").unwrap().init();
    let mut rng = rng("prune-rescue");
    let src = repo.p("src");
    random_files(&mut rng, &src, "f", 4, 300_000);
    let first = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    repo.ok(["forget", &first[..8]]);
    let marked = prune(&repo, "24h");
    assert!(u(&marked, "packs_marked") >= 1, "{marked}");

    // The same files again: dedup finds them only in marked packs.
    let second = repo.backup_with(&[&src], &["--force"]);
    let added = u(&second["summary"], "data_blobs_added");
    assert!(
        added >= 4,
        "the backup referenced marked packs instead of storing again: {second}"
    );

    let swept = prune(&repo, "0s");
    assert_eq!(u(&swept, "marks_dropped"), 0, "{swept}");
    assert!(u(&swept, "packs_deleted") >= 1, "{swept}");
    let out = repo.run(["--json", "check", "--read-data"]);
    assert_eq!(out.code, Some(0), "{out}");
    let dest = repo.p("restore");
    repo.restore(s(&second, "snapshot_id"), &dest);
    assert_same_dir(&src, &restored(&dest, &src), Compare::ALL);
}
