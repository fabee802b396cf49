//! Concurrency: two backups into one repository at the same time (no lock)
//! both commit, both restore, and the repository checks clean; a reader
//! running `check` meanwhile never sees a damaged state.

use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

use crate::support::*;

/// Backups per writer.
const ROUNDS: usize = 6;

fn concurrent(kind: Kind, test: &str) {
    let Some(repo) = Repo::new(kind, test) else {
        return;
    };
    let repo = repo.init_with(&["--pack-size-mib", "1"]);
    let mut rng = rng(test);
    let (a, b) = (repo.p("a"), repo.p("b"));
    // Overlapping content: the same shared files in both trees, plus own data.
    for i in 0..20 {
        let data = random_bytes(&mut rng, 100_000);
        write_file(&a.join(format!("shared/s-{i:02}.bin")), &data);
        write_file(&b.join(format!("shared/s-{i:02}.bin")), &data);
    }
    let text = text_bytes(&mut rng, 2 << 20);
    write_file(&a.join("shared/text.log"), &text);
    write_file(&b.join("shared/text.log"), &text);
    random_files(&mut rng, &a.join("own"), "a", 15, 100_000);
    random_files(&mut rng, &b.join("own"), "b", 15, 100_000);
    write_file(&a.join("big.bin"), &random_bytes(&mut rng, 6 << 20));
    write_file(&b.join("big.bin"), &random_bytes(&mut rng, 6 << 20));

    // Two writers, each backing up its tree ROUNDS times (changing one file in
    // between), while a reader runs `check` in a loop: every commit of one
    // writer happens while the other writer and the reader are busy.
    let start = Instant::now();
    let writer = |src: std::path::PathBuf, seed: u64| {
        let cmds: Vec<_> = (0..ROUNDS)
            .map(|_| repo.cmd(backup_args(&[&src], &[])))
            .collect();
        std::thread::spawn(move || {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            let mut reports = Vec::new();
            for (round, cmd) in cmds.into_iter().enumerate() {
                if round > 0 {
                    write_file(
                        &src.join("own/changing.bin"),
                        &random_bytes(&mut rng, 200_000),
                    );
                }
                let out = finish(spawn(cmd), "backup", Instant::now());
                out.expect_ok();
                reports.push(single_report(&out));
            }
            reports
        })
    };
    let (wa, wb) = (writer(a.clone(), rng.gen()), writer(b.clone(), rng.gen()));
    let mut checks = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !(wa.is_finished() && wb.is_finished()) && Instant::now() < deadline {
        repo.run(["check"]).expect_ok();
        checks += 1;
    }
    let (ra, rb) = (wa.join().expect("writer a"), wb.join().expect("writer b"));
    eprintln!(
        "{test}: {ROUNDS} + {ROUNDS} backups took {:.2?}; {checks} checks ran meanwhile",
        start.elapsed()
    );
    let ids = |rs: &[Value]| -> Vec<String> {
        rs.iter().map(|r| s(r, "snapshot_id").to_string()).collect()
    };
    let (ida, idb) = (ids(&ra).pop().unwrap(), ids(&rb).pop().unwrap());

    let snaps = repo.snapshots();
    let mut listed: Vec<(String, Vec<String>)> = snaps
        .iter()
        .map(|v| (s(v, "id").to_string(), strings(v, "paths")))
        .collect();
    listed.sort();
    let mut want: Vec<(String, Vec<String>)> = ids(&ra)
        .into_iter()
        .map(|id| (id, vec![a.display().to_string()]))
        .chain(
            ids(&rb)
                .into_iter()
                .map(|id| (id, vec![b.display().to_string()])),
        )
        .collect();
    want.sort();
    assert_eq!(listed, want);

    for (id, src, dest) in [(&ida, &a, "restore-a"), (&idb, &b, "restore-b")] {
        repo.restore(id, &repo.p(dest));
        assert_same_dir(src, &restored(&repo.p(dest), src), Compare::ALL);
    }
    let reports = repo.json(["check", "--read-data"]);
    for rep in reports.as_array().unwrap() {
        assert_eq!(rep["errors"], Value::Array(vec![]), "{rep}");
        assert_eq!(rep["warnings"], Value::Array(vec![]), "{rep}");
        assert_eq!(u(rep, "snapshots"), 2 * ROUNDS as u64);
    }
    // Both writers' index objects are seen: nothing is stored again.
    for src in [&a, &b] {
        let r = repo.backup_with(&[src], &["--force"]);
        assert_eq!(u(&r["summary"], "data_blobs_added"), 0, "{r}");
    }
}

#[test]
fn two_backups_local() {
    concurrent(Kind::Local, "concurrency-local");
}

#[test]
fn two_backups_s3() {
    concurrent(Kind::S3, "concurrency-s3");
}
