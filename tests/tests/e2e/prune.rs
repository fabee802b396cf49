//! `prune`: two-phase deletion of unreferenced data (mark, then sweep after
//! the grace period), repacking, and safety while backups run.

use std::collections::BTreeMap;
use std::path::Path;

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

/// Backups in a loop while forget + prune run in a loop with a tiny grace
/// period: every snapshot that committed and was not forgotten restores.
#[test]
fn backups_and_prune_concurrently_local() {
    let repo = Repo::new(Kind::Local, "prune-race")
        .unwrap()
        .no_cache()
        .init();
    let src = repo.p("src");
    let rounds = knob("CUSTOS_TEST_PRUNE_ROUNDS", 16);
    let mut expected: BTreeMap<String, Tree> = BTreeMap::new();
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Stops the pruner even when the backup loop panics (else the scope never ends).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|scope| {
        let _stop_guard = StopOnDrop(&stop);
        let pruner = scope.spawn(|| {
            let (mut runs, mut deleted) = (0, 0);
            while (!stop.load(std::sync::atomic::Ordering::Relaxed) || runs < 2) && runs < 200 {
                let f = repo.run(["forget", "--keep-last", "2"]);
                assert_eq!(f.code, Some(0), "{f}");
                let r = repo.json(["prune", "--grace", "1s", "--repack-threshold", "10"]);
                deleted += u(&r, "packs_deleted");
                runs += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            (runs, deleted)
        });
        let mut rng = rng("prune-race");
        for round in 0..rounds {
            // Each round keeps most files, changes some, and brings back data of
            // earlier rounds (so dedup meets blobs prune may have marked).
            random_files(&mut rng, &src, &format!("r{round}"), 3, 200_000);
            if round >= 2 {
                let old = src.join(format!("r{}-000.bin", round - 2));
                let _ = std::fs::remove_file(&old);
                std::fs::copy(
                    src.join(format!("r{}-001.bin", round - 2)),
                    src.join(format!("copy{round}")),
                )
                .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            let snap = expected_scan(&src);
            let out = repo.run(backup_args(&[&src], &[]));
            out.expect_ok();
            expected.insert(s(&single_report(&out), "snapshot_id").to_string(), snap);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (runs, deleted) = pruner.join().unwrap();
        assert!(
            runs >= 2 && deleted > 0,
            "prune ran {runs} times and deleted {deleted} packs"
        );
    });
    // Let every pending mark ripen and be carried out.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    repo.ok(["prune", "--grace", "1s"]);
    let out = repo.run(["--json", "check", "--read-data"]);
    assert_eq!(out.code, Some(0), "{out}");
    let chk = out.json();
    assert!(chk[0]["errors"].as_array().unwrap().is_empty(), "{chk}");
    let present: Vec<String> = repo
        .snapshots()
        .iter()
        .map(|v| s(v, "id").to_string())
        .collect();
    assert!(!present.is_empty());
    for id in &present {
        let dest = repo.p(&format!("restore-{}", &id[..8]));
        repo.restore(id, &dest);
        let got = scan(&restored(&dest, &src));
        assert_trees_equal(
            &expected[id],
            &got,
            Compare::CONTENT,
            &format!("snapshot {id}"),
        );
    }
}

fn expected_scan(src: &Path) -> Tree {
    scan(src)
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
