//! Round trip: a tree full of edge cases is backed up and restored with
//! identical contents, paths, modes, mtimes (ns) and symlink targets.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;

use crate::support::*;

/// What an edge-case tree holds.
pub struct OddTree {
    pub root: PathBuf,
    /// Regular files (hard links count once per name).
    pub files: u64,
    pub symlinks: u64,
    /// FIFOs (recorded, not restored).
    pub specials: u64,
    /// The tree as built, without special files (what a restore must produce).
    pub expected: Tree,
    /// The tree as built, including special files.
    pub all: Tree,
}

/// Build the edge-case tree under `root` (`big` = size of the random large file).
pub fn build_odd_tree(root: &Path, rng: &mut StdRng, big: usize) -> OddTree {
    std::fs::create_dir_all(root).unwrap();
    // Empty files and an empty directory.
    write_file(&root.join("empty.txt"), b"");
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    // Over the 8 MiB small-file threshold: the streaming chunker runs.
    write_file(&root.join("big.bin"), &random_bytes(rng, big));
    write_file(&root.join("big-text.log"), &text_bytes(rng, 9 << 20));
    // Many small files in nested folders, some empty.
    for d in 0..10 {
        for f in 0..50 {
            let len = if rng.gen_ratio(1, 20) {
                0
            } else {
                rng.gen_range(1..4096)
            };
            write_file(
                &root.join(format!("many/d{d:02}/f{f:03}.dat")),
                &random_bytes(rng, len),
            );
        }
    }
    // Odd names.
    write_file(&root.join("with space.txt"), b"spaces\n");
    write_file(&root.join("ünï cødé.txt"), "ünï cødé ✓\n".as_bytes());
    write_file(&root.join("-leading-dash"), b"dash\n");
    write_file(
        &root.join("日本語のファイル名.txt"),
        "こんにちは".as_bytes(),
    );
    write_file(
        &root.join(OsStr::from_bytes(b"bad-\xff\xfe-name.bin")),
        b"not utf-8 name\n",
    );
    let newline = root.join("new\nline.txt");
    if std::fs::write(&newline, b"newline in name\n").is_err() {
        eprintln!("note: this file system refuses newlines in names; that case is skipped");
    }
    write_file(&root.join("nested/a/b/c/d/e/deep.txt"), b"deep\n");
    write_file(
        &root.join("nested/a/b/side.txt"),
        &random_bytes(rng, 70_000),
    );
    // Modes.
    for (name, mode) in [
        ("exec.sh", 0o755),
        ("private.txt", 0o600),
        ("readonly.txt", 0o444),
        ("setuid.bin", 0o4755),
        ("group.txt", 0o640),
    ] {
        let p = root.join("modes").join(name);
        write_file(&p, name.as_bytes());
        chmod(&p, mode);
    }
    write_file(&root.join("modes/private-dir/inside.txt"), b"inside\n");
    chmod(&root.join("modes/private-dir"), 0o700);
    std::fs::create_dir_all(root.join("modes/sticky-dir")).unwrap();
    chmod(&root.join("modes/sticky-dir"), 0o1777);
    // A hard link is restored as a second, equal file.
    std::fs::hard_link(root.join("with space.txt"), root.join("hardlink.txt")).unwrap();
    // Symlinks, including dangling and non-UTF-8 targets.
    std::fs::create_dir_all(root.join("links")).unwrap();
    let links: [(&str, &[u8]); 6] = [
        ("rel", b"../with space.txt"),
        ("dangling", b"does/not/exist"),
        ("abs", b"/etc/hostname"),
        ("dir", b"../nested"),
        ("odd-target", b"target-\xff-bytes"),
        ("ünï link", "../ünï cødé.txt".as_bytes()),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(OsStr::from_bytes(target), root.join("links").join(name))
            .unwrap();
    }
    // A FIFO: recorded, not recreated.
    let fifo = std::process::Command::new("mkfifo")
        .arg(root.join("a-fifo"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !fifo {
        eprintln!("note: mkfifo unavailable; the special-file case is skipped");
    }
    // Distinct mtimes with nanoseconds on everything, the root included.
    let all = scan(root);
    for (i, rel) in all.keys().enumerate() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(rel))
        };
        set_mtime(
            &p,
            1_500_000_000 + i as i64 * 977,
            ((i as u64 * 7_919_113) % 1_000_000_000) as u32,
        );
    }
    let all = scan(root);
    let expected: Tree = all
        .iter()
        .filter(|(_, e)| e.item != Item::Special)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let count = |f: fn(&Item) -> bool| all.values().filter(|e| f(&e.item)).count() as u64;
    OddTree {
        root: root.to_path_buf(),
        files: count(|i| matches!(i, Item::File { .. })),
        symlinks: count(|i| matches!(i, Item::Symlink(_))),
        specials: count(|i| *i == Item::Special),
        expected,
        all,
    }
}

fn cli_roundtrip(repo: Repo) {
    let repo = repo.init();
    let mut rng = rng(&repo.test);
    let tree = build_odd_tree(&repo.p("src"), &mut rng, 12 << 20);
    let src = tree.root.clone();

    let report = repo.backup_with(&[&src], &["--tag", "e2e"]);
    let sum = &report["summary"];
    assert_eq!(u(sum, "total_files"), tree.files, "{report}");
    assert_eq!(u(sum, "files_new"), tree.files, "{report}");
    assert_eq!(
        u(sum, "total_bytes"),
        tree_bytes(&tree.expected),
        "{report}"
    );
    assert_eq!(u(sum, "unreadable"), 0);
    assert_eq!(strings(&report, "committed"), ["repo"]);
    assert_eq!(report["lagging"], Value::Array(vec![]));
    assert_eq!(report["unreadable"], Value::Array(vec![]));
    let id = s(&report, "snapshot_id").to_string();

    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(s(&snaps[0], "id"), id);
    assert_eq!(strings(&snaps[0], "paths"), [src.display().to_string()]);
    assert_eq!(strings(&snaps[0], "tags"), ["e2e"]);

    // Full restore: byte-identical, same paths, modes, mtimes and link targets.
    let dest = repo.p("restore");
    let r = repo.restore(&id, &dest);
    assert_eq!(u(&r, "files"), tree.files, "{r}");
    assert_eq!(u(&r, "symlinks"), tree.symlinks, "{r}");
    assert_eq!(u(&r, "special_skipped"), tree.specials, "{r}");
    assert_eq!(u(&r, "bytes"), tree_bytes(&tree.expected), "{r}");
    assert_eq!(s(&r, "snapshot_id"), id);
    assert_trees_equal(
        &tree.expected,
        &scan(&restored(&dest, &src)),
        Compare::ALL,
        "full restore",
    );
    // `--verify` re-reads every file against its recorded digest: same result.
    let dest_v = repo.p("restore-verified");
    let rv = repo.json(["restore", id.as_str(), "--verify", dest_v.to_str().unwrap()]);
    assert_eq!(u(&rv, "files"), tree.files, "{rv}");
    assert_eq!(u(&rv, "bytes"), tree_bytes(&tree.expected), "{rv}");
    assert_trees_equal(
        &tree.expected,
        &scan(&restored(&dest_v, &src)),
        Compare::ALL,
        "restore --verify",
    );

    // `ls` lists every entry, special files included, with exact paths.
    let ls = repo.json(["ls", id.as_str()]);
    let paths: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| s(e, "path"))
        .collect();
    assert_eq!(paths.len(), tree.all.len(), "ls: {paths:?}");
    for p in [
        "/src/ünï cødé.txt",
        "/src/-leading-dash",
        "/src/links/dangling",
        "/src/empty-dir",
    ] {
        assert!(paths.contains(&p), "ls misses {p}");
    }

    // A sub-path of the snapshot restores on its own.
    let sub = repo.p("restore-sub");
    repo.restore(&format!("{id}:src/nested"), &sub);
    let mut nested = scan(&src.join("nested"));
    nested.remove(&Vec::new());
    let mut got = scan(&sub);
    got.remove(&Vec::new());
    assert_trees_equal(&nested, &got, Compare::ALL, "sub-path restore");

    // --include restores only matching files.
    let inc = repo.p("restore-include");
    let r = repo.restore_with(&id, &inc, &["--include", "src/many/d03/**"]);
    assert_eq!(u(&r, "files"), 50, "{r}");
    let want: Vec<(Vec<u8>, Item)> = tree
        .expected
        .iter()
        .filter(|(k, e)| k.starts_with(b"many/d03/") && matches!(e.item, Item::File { .. }))
        .map(|(k, e)| (k.clone(), e.item.clone()))
        .collect();
    let have: Vec<(Vec<u8>, Item)> = scan(&restored(&inc, &src))
        .into_iter()
        .filter(|(_, e)| matches!(e.item, Item::File { .. }))
        .map(|(k, e)| (k, e.item))
        .collect();
    assert_eq!(want.len(), 50);
    assert!(
        want == have,
        "--include restored other files: {:?}",
        have.iter().map(|(k, _)| show(k)).collect::<Vec<_>>()
    );

    // Structure and data are sound.
    repo.ok(["check", "--read-data"]);
}

impl Repo {
    /// `custos restore --json <snapshot> <dest> <extra>` requiring exit 0 and no errors.
    #[track_caller]
    pub fn restore_with(&self, snapshot: &str, dest: &Path, extra: &[&str]) -> Value {
        let mut args = vec![
            OsStr::new("restore"),
            OsStr::new(snapshot),
            dest.as_os_str(),
        ];
        args.extend(extra.iter().map(OsStr::new));
        let v = self.json(args);
        assert_eq!(
            v["errors"],
            Value::Array(vec![]),
            "restore reported errors: {v}"
        );
        v
    }
}

#[test]
fn cli_local() {
    cli_roundtrip(Repo::new(Kind::Local, "roundtrip-local").unwrap());
}

/// S3 addressed as `-r s3://bucket/prefix` with the endpoint from `AWS_ENDPOINT_URL`.
#[test]
fn cli_s3_url_and_env_endpoint() {
    if let Some(repo) = Repo::with_via(Kind::S3, "roundtrip-s3", Via::Url) {
        cli_roundtrip(repo);
    }
}

/// Library API on the in-memory target: same tree, same guarantees.
#[test]
fn library_memory() {
    let work = tempfile::tempdir().unwrap();
    let mut rng = rng("roundtrip-library-memory");
    let tree = build_odd_tree(&work.path().join("src"), &mut rng, 9 << 20);
    block_on(async {
        let target = lib_target(Kind::Memory, "roundtrip-memory", work.path()).unwrap();
        let repo = LibRepo::init(target, &cheap_init()).await;
        let report = repo.backup(&[&tree.root], false).await;
        assert_eq!(report.snapshot.summary.total_files, tree.files);
        assert_eq!(report.committed, ["mem"]);
        let dest = work.path().join("restore");
        let r = repo.restore(&report.id, &dest).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            (r.files, r.symlinks, r.special_skipped),
            (tree.files, tree.symlinks, tree.specials)
        );
        assert_trees_equal(
            &tree.expected,
            &scan(&dest.join("src")),
            Compare::ALL,
            "library restore",
        );
        let c = repo.check(custos::check::ReadData::All).await;
        assert!(c.errors.is_empty() && c.warnings.is_empty(), "{c:?}");
        assert_eq!(c.snapshots, 1);
        assert_eq!(c.packs_read, c.packs);
    });
}
