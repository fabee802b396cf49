//! No plaintext leaves the machine: a canary string in file contents, file
//! and directory names, symlink targets, a large compressible file and the
//! password never appears in any stored object, its name, or the cache.

use std::path::Path;

use crate::support::*;

/// A source tree full of the canary; returns the canary.
fn canary_tree(root: &Path) -> String {
    let canary = format!("CANARY{:016x}", rand::random::<u64>());
    write_file(
        &root.join(format!("notes-{canary}.txt")),
        format!("hello {canary} world\n").repeat(10).as_bytes(),
    );
    write_file(
        &root.join(format!("dir-{canary}/inner.txt")),
        canary.as_bytes(),
    );
    write_file(&root.join("tiny.txt"), canary.as_bytes());
    // Compressible: zstd keeps literals of repeated text; sealing must hide them.
    let mut big = Vec::with_capacity(10 << 20);
    let mut i = 0u64;
    while big.len() < 10 << 20 {
        big.extend_from_slice(
            format!("line {i} customer {canary} wrote: please refund order {i}\n").as_bytes(),
        );
        i += 1;
    }
    write_file(&root.join("big-compressible.log"), &big);
    // Once inside random data, across a likely chunk boundary region.
    let mut rnd = random_bytes(&mut rng("plaintext"), 300_000);
    rnd[150_000..150_000 + canary.len()].copy_from_slice(canary.as_bytes());
    write_file(&root.join("random.bin"), &rnd);
    std::os::unix::fs::symlink(
        format!("target-{canary}"),
        root.join(format!("link-{canary}")),
    )
    .unwrap();
    canary
}

/// Panic naming every stored object (or name) holding one of `needles`.
#[track_caller]
fn assert_clean(objects: &[(String, Vec<u8>)], needles: &[&str]) {
    assert!(
        objects.len() >= 5,
        "too few objects to be meaningful: {}",
        objects.len()
    );
    // The search itself works.
    assert!(contains(
        format!("xx{}yy", needles[0]).as_bytes(),
        needles[0].as_bytes()
    ));
    let mut hits = Vec::new();
    for (name, data) in objects {
        for n in needles {
            if name.contains(n) {
                hits.push(format!("name {name} contains {n}"));
            }
            if contains(data, n.as_bytes()) {
                hits.push(format!("{name} contains {n}"));
            }
        }
    }
    assert!(hits.is_empty(), "plaintext found:\n{}", hits.join("\n"));
}

fn cli(kind: Kind, test: &str) {
    let Some(mut repo) = Repo::new(kind, test) else {
        return;
    };
    repo.password = format!("pw-{:016x}-secret", rand::random::<u64>());
    let repo = repo.init();
    let src = repo.p("src");
    let canary = canary_tree(&src);
    let id = s(&repo.backup(&[&src]), "snapshot_id").to_string();
    // Fill the metadata cache too.
    repo.ok(["snapshots"]);
    repo.ok(["ls", id.as_str()]);
    let dest = repo.p("restore");
    repo.restore(&id, &dest);
    // Control: the restore holds the canary, so the search would find it.
    let restored_files = read_all_files(&dest);
    assert!(restored_files
        .iter()
        .any(|(_, d)| contains(d, canary.as_bytes())));

    let raw = repo.raw();
    let mut objects: Vec<(String, Vec<u8>)> = raw
        .names("")
        .into_iter()
        .map(|n| (n.clone(), raw.get(&n)))
        .collect();
    if kind == Kind::Local {
        // Every file in the directory, not only what the store lists.
        let root = Path::new(&repo.url);
        let listed = objects.len();
        objects = read_all_files(root)
            .into_iter()
            .map(|(p, d)| (p.strip_prefix(root).unwrap().display().to_string(), d))
            .collect();
        assert_eq!(
            objects.len(),
            listed,
            "the repository directory holds unlisted files"
        );
    }
    let cache: Vec<(String, Vec<u8>)> = read_all_files(&repo.p("cache"))
        .into_iter()
        .map(|(p, d)| (format!("cache:{}", p.display()), d))
        .collect();
    assert!(!cache.is_empty(), "the metadata cache was not used");
    objects.extend(cache);
    assert_clean(&objects, &[&canary, &repo.password]);
}

#[test]
fn cli_local() {
    cli(Kind::Local, "plaintext-local");
}

#[test]
fn cli_s3() {
    cli(Kind::S3, "plaintext-s3");
}

#[test]
fn library_memory() {
    let work = tempfile::tempdir().unwrap();
    let canary = canary_tree(&work.path().join("src"));
    let objects = block_on(async {
        let repo = LibRepo::init(
            lib_target(Kind::Memory, "plaintext", work.path()).unwrap(),
            &cheap_init(),
        )
        .await;
        repo.backup(&[&work.path().join("src")], false).await;
        let mut objects = Vec::new();
        for (name, _) in repo.list("").await {
            let data = repo.target.get(&name).await.unwrap().to_vec();
            objects.push((name, data));
        }
        objects
    });
    assert_clean(&objects, &[&canary, PASSWORD]);
}
