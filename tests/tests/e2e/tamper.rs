//! Tamper and rot: one flipped bit in a data pack (blob region or sealed
//! header), a tree pack, an index object or a snapshot object is detected by
//! `check --read-data`, named in the error, and does not keep undamaged data
//! from restoring.

use std::path::PathBuf;

use crate::support::*;

/// Two snapshots of two disjoint source trees; names of the first one's objects.
struct Setup {
    repo: Repo,
    raw: RawStore,
    src1: PathBuf,
    src2: PathBuf,
    snap1: String,
    snap2: String,
    /// Data packs written by the first backup.
    packs1: Vec<String>,
    /// Tree packs written by the first backup.
    trees1: Vec<String>,
    /// The index object written by the first backup.
    index1: String,
}

const FILES: usize = 8;

fn setup(kind: Kind, test: &str) -> Option<Setup> {
    // No cache: every read must see the damaged bytes on the target.
    let repo = Repo::new(kind, test)?.no_cache().init();
    let raw = repo.raw();
    let mut rng = rng(test);
    let (src1, src2) = (repo.p("src1"), repo.p("src2"));
    random_files(&mut rng, &src1, "one", FILES, 150_000);
    random_files(&mut rng, &src2, "two", FILES, 150_000);

    let (data0, index0, tree0) = (raw.names("data/"), raw.names("index/"), raw.names("tree/"));
    let snap1 = s(&repo.backup(&[&src1]), "snapshot_id").to_string();
    let packs1: Vec<String> = raw
        .names("data/")
        .into_iter()
        .filter(|n| !data0.contains(n))
        .collect();
    let index1: Vec<String> = raw
        .names("index/")
        .into_iter()
        .filter(|n| !index0.contains(n))
        .collect();
    let trees1: Vec<String> = raw
        .names("tree/")
        .into_iter()
        .filter(|n| !tree0.contains(n))
        .collect();
    assert!(!packs1.is_empty(), "first backup wrote no data pack");
    assert!(!trees1.is_empty(), "first backup wrote no tree pack");
    assert_eq!(index1.len(), 1, "first backup wrote {index1:?}");
    assert!(raw
        .names("snapshots/")
        .contains(&format!("snapshots/{snap1}")));
    let snap2 = s(&repo.backup(&[&src2]), "snapshot_id").to_string();
    repo.ok(["check", "--read-data"]);
    Some(Setup {
        repo,
        raw,
        src1,
        src2,
        snap1,
        snap2,
        packs1,
        trees1,
        index1: index1[0].clone(),
    })
}

impl Setup {
    /// The second snapshot restores completely and identically.
    #[track_caller]
    fn second_restores(&self) -> Out {
        let dest = self.repo.p("restore2");
        let out = self.repo.run([
            std::ffi::OsStr::new("restore"),
            self.snap2.as_ref(),
            dest.as_os_str(),
        ]);
        out.expect_ok();
        assert_same_dir(&self.src2, &restored(&dest, &self.src2), Compare::ALL);
        out
    }

    /// `check --read-data` fails naming `object`.
    #[track_caller]
    fn check_names(&self, object: &str) {
        self.repo
            .run(["check", "--read-data"])
            .expect_failure()
            .expect_stderr(object);
    }
}

fn data_pack(kind: Kind, test: &str) {
    let Some(st) = setup(kind, test) else {
        return;
    };
    let pack = &st.packs1[0];
    let bytes = st.raw.get(pack);
    st.raw.flip(pack, blob_region_offset(&bytes, 0.5));

    st.check_names(pack);
    // The structure check does not read pack contents: it stays clean.
    st.repo.ok(["check"]);

    // Restoring the first snapshot fails, naming the pack and the one damaged
    // file; every other file is restored intact.
    let dest = st.repo.p("restore1");
    let out = st.repo.run([
        std::ffi::OsStr::new("restore"),
        st.snap1.as_ref(),
        dest.as_os_str(),
    ]);
    out.expect_failure().expect_stderr(pack);
    let root = restored(&dest, &st.src1);
    let expected = scan(&st.src1);
    let got = scan(&root);
    let mut damaged = Vec::new();
    for (rel, e) in &expected {
        if !matches!(e.item, Item::File { .. }) {
            continue;
        }
        let name = String::from_utf8_lossy(rel).into_owned();
        if out.stderr.contains(&format!("src1/{name}")) {
            damaged.push(name);
        } else {
            assert_eq!(
                got.get(rel),
                Some(e),
                "{name} is not named in the errors but differs\n{out}"
            );
        }
    }
    assert_eq!(
        damaged.len(),
        1,
        "expected exactly one damaged file, got {damaged:?}\n{out}"
    );
    // The damaged file is not left half-written under its name, nor as a temporary.
    let bad = damaged[0].as_bytes().to_vec();
    assert!(
        !got.contains_key(&bad),
        "a partial {} was left behind",
        damaged[0]
    );
    let partial: Vec<&Vec<u8>> = got
        .keys()
        .filter(|k| String::from_utf8_lossy(k).ends_with(".custos-partial"))
        .collect();
    assert!(partial.is_empty(), "temporary files left: {partial:?}");

    st.second_restores();
}

/// A flipped bit in a tree pack's blob region: both checks name the pack
/// (the structure check reads every tree), the first snapshot's restore
/// fails naming it, the second snapshot restores.
fn tree_pack(kind: Kind, test: &str) {
    let Some(st) = setup(kind, test) else {
        return;
    };
    for pack in &st.trees1 {
        let bytes = st.raw.get(pack);
        st.raw.flip(pack, blob_region_offset(&bytes, 0.5));
    }
    for pack in &st.trees1 {
        st.check_names(pack);
    }
    let out = st.repo.run(["check"]);
    out.expect_failure();
    assert!(
        st.trees1.iter().any(|p| out.stderr.contains(p.as_str())),
        "check does not name a damaged tree pack {:?}\n{out}",
        st.trees1
    );
    let dest = st.repo.p("restore1");
    let out = st.repo.run([
        std::ffi::OsStr::new("restore"),
        st.snap1.as_ref(),
        dest.as_os_str(),
    ]);
    out.expect_failure();
    assert!(
        st.trees1.iter().any(|p| out.stderr.contains(p.as_str())),
        "restore does not name a damaged tree pack {:?}\n{out}",
        st.trees1
    );
    st.second_restores();
}

/// A flipped bit in a data pack's sealed header: `check --read-data` names
/// the pack. Restore reads blobs by the index (each one authenticated on its
/// own), never the header, so the first snapshot still restores intact.
fn pack_header(kind: Kind, test: &str) {
    let Some(st) = setup(kind, test) else {
        return;
    };
    let pack = &st.packs1[0];
    let bytes = st.raw.get(pack);
    let n = bytes.len();
    let hlen = u32::from_le_bytes(bytes[n - 4..].try_into().unwrap()) as usize;
    st.raw.flip(pack, n - 4 - hlen / 2);

    st.check_names(pack);
    let dest = st.repo.p("restore1");
    st.repo.ok([
        std::ffi::OsStr::new("restore"),
        st.snap1.as_ref(),
        dest.as_os_str(),
    ]);
    assert_same_dir(&st.src1, &restored(&dest, &st.src1), Compare::ALL);
    st.second_restores();
}

fn index_object(kind: Kind, test: &str) {
    let Some(st) = setup(kind, test) else {
        return;
    };
    let len = st.raw.get(&st.index1).len();
    st.raw.flip(&st.index1, len / 2);

    st.check_names(&st.index1);
    // The first snapshot's blobs are now unindexed: its restore fails and says why.
    let dest = st.repo.p("restore1");
    st.repo
        .run([
            std::ffi::OsStr::new("restore"),
            st.snap1.as_ref(),
            dest.as_os_str(),
        ])
        .expect_failure()
        .expect_stderr(&st.index1);
    // The second snapshot does not depend on that index object.
    let out = st.second_restores();
    assert!(
        out.stderr.contains(&st.index1),
        "restore did not warn about {}\n{out}",
        st.index1
    );

    // A new backup of the same files stores them again and restores.
    let again = s(&st.repo.backup(&[&st.src1]), "snapshot_id").to_string();
    let dest = st.repo.p("restore-again");
    st.repo.ok([
        std::ffi::OsStr::new("restore"),
        again.as_ref(),
        dest.as_os_str(),
    ]);
    assert_same_dir(&st.src1, &restored(&dest, &st.src1), Compare::ALL);
}

fn snapshot_object(kind: Kind, test: &str) {
    let Some(st) = setup(kind, test) else {
        return;
    };
    let object = format!("snapshots/{}", st.snap1);
    let len = st.raw.get(&object).len();
    st.raw.flip(&object, len / 3);

    st.check_names(&object);
    // `snapshots` lists the undamaged one and warns about the damaged one.
    let out = st.repo.run(["--json", "snapshots"]);
    out.expect_ok().expect_stderr(&object);
    let ids: Vec<String> = out
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| s(v, "id").to_string())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&st.snap2));
    // The damaged snapshot cannot be restored; the error names it.
    let dest = st.repo.p("restore1");
    st.repo
        .run([
            std::ffi::OsStr::new("restore"),
            st.snap1.as_ref(),
            dest.as_os_str(),
        ])
        .expect_failure()
        .expect_stderr(&object);
    st.second_restores();
}

#[test]
fn data_pack_local() {
    data_pack(Kind::Local, "tamper-pack-local");
}

#[test]
fn data_pack_s3() {
    data_pack(Kind::S3, "tamper-pack-s3");
}

#[test]
fn tree_pack_local() {
    tree_pack(Kind::Local, "tamper-tree-local");
}

#[test]
fn tree_pack_s3() {
    tree_pack(Kind::S3, "tamper-tree-s3");
}

#[test]
fn pack_header_local() {
    pack_header(Kind::Local, "tamper-header-local");
}

#[test]
fn pack_header_s3() {
    pack_header(Kind::S3, "tamper-header-s3");
}

#[test]
fn index_local() {
    index_object(Kind::Local, "tamper-index-local");
}

#[test]
fn index_s3() {
    index_object(Kind::S3, "tamper-index-s3");
}

#[test]
fn snapshot_local() {
    snapshot_object(Kind::Local, "tamper-snapshot-local");
}

#[test]
fn snapshot_s3() {
    snapshot_object(Kind::S3, "tamper-snapshot-s3");
}

/// The same data-pack damage through the library on the in-memory target.
#[test]
fn data_pack_library_memory() {
    let work = tempfile::tempdir().unwrap();
    let mut rng = rng("tamper-library-memory");
    let (src1, src2) = (work.path().join("src1"), work.path().join("src2"));
    random_files(&mut rng, &src1, "one", FILES, 150_000);
    random_files(&mut rng, &src2, "two", FILES, 150_000);
    block_on(async {
        let repo = LibRepo::init(
            lib_target(Kind::Memory, "tamper", work.path()).unwrap(),
            &cheap_init(),
        )
        .await;
        let before = repo.list("data/").await;
        let r1 = repo.backup(&[&src1], false).await;
        let pack = repo
            .list("data/")
            .await
            .into_iter()
            .find(|p| !before.contains(p))
            .expect("a new data pack")
            .0;
        let r2 = repo.backup(&[&src2], false).await;
        let mut bytes = repo.target.get(&pack).await.unwrap().to_vec();
        let at = blob_region_offset(&bytes, 0.5);
        bytes[at] ^= 0x80;
        repo.target.overwrite(&pack, bytes.into()).await.unwrap();

        let c = repo.check(custos::check::ReadData::All).await;
        assert!(c.errors.iter().any(|e| e.contains(&pack)), "{c:?}");
        let c = repo.check(custos::check::ReadData::None).await;
        assert!(c.errors.is_empty(), "{c:?}");

        let dest = work.path().join("restore1");
        let r = repo.restore(&r1.id, &dest).await;
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].contains(&pack) && r.errors[0].contains("src1/one-"),
            "{:?}",
            r.errors
        );
        assert_eq!(r.files, FILES as u64 - 1);

        let dest = work.path().join("restore2");
        let r = repo.restore(&r2.id, &dest).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_same_dir(&src2, &dest.join("src2"), Compare::ALL);
    });
}

/// Index and snapshot damage through the library on the in-memory target:
/// the full check names the object, the index loader and the snapshot list
/// warn about it by name, and the other snapshot still restores.
#[test]
fn metadata_library_memory() {
    let work = tempfile::tempdir().unwrap();
    let mut rng = rng("tamper-metadata-memory");
    let (src1, src2) = (work.path().join("src1"), work.path().join("src2"));
    random_files(&mut rng, &src1, "one", FILES, 50_000);
    random_files(&mut rng, &src2, "two", FILES, 50_000);
    block_on(async {
        let repo = LibRepo::init(
            lib_target(Kind::Memory, "tamper-meta", work.path()).unwrap(),
            &cheap_init(),
        )
        .await;
        let before = repo.list("index/").await;
        let r1 = repo.backup(&[&src1], false).await;
        let index1 = repo
            .list("index/")
            .await
            .into_iter()
            .find(|p| !before.contains(p))
            .expect("a new index object")
            .0;
        let r2 = repo.backup(&[&src2], false).await;
        let flip = |name: String, at: f64| {
            let target = repo.target.clone();
            async move {
                let good = target.get(&name).await.unwrap();
                let mut bad = good.to_vec();
                let i = (bad.len() as f64 * at) as usize;
                bad[i] ^= 0x01;
                target.overwrite(&name, bad.into()).await.unwrap();
                good
            }
        };

        // Index object.
        let good = flip(index1.clone(), 0.5).await;
        let c = repo.check(custos::check::ReadData::All).await;
        assert!(c.errors.iter().any(|e| e.contains(&index1)), "{c:?}");
        let (_, warnings) = repo.repo.load_index().await.unwrap();
        assert!(warnings.iter().any(|w| w.contains(&index1)), "{warnings:?}");
        let dest = work.path().join("restore2-index");
        let r = repo.restore(&r2.id, &dest).await;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_same_dir(&src2, &dest.join("src2"), Compare::ALL);
        repo.target.overwrite(&index1, good).await.unwrap();

        // Snapshot object.
        let object = format!("snapshots/{}", r1.id);
        flip(object.clone(), 0.3).await;
        let c = repo.check(custos::check::ReadData::All).await;
        assert!(c.errors.iter().any(|e| e.contains(&object)), "{c:?}");
        let (snaps, warnings) = repo.repo.snapshots().await.unwrap();
        assert!(warnings.iter().any(|w| w.contains(&object)), "{warnings:?}");
        let ids: Vec<_> = snaps.iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![r2.id]);
    });
}
