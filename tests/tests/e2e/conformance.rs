//! Target conformance: every target kind (memory, local directory, S3, and the
//! wrappers) behaves the same through the `Target` trait the repository uses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use custos::target::cache::Cached;
use custos::target::limit::{Limited, Limits};
use custos::target::store::StoreTarget;
use custos::target::{PutOutcome, TargetRef};
use futures::TryStreamExt;

use crate::support::*;

fn names(list: &[custos::target::ObjectMeta]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = list.iter().map(|m| (m.name.clone(), m.size)).collect();
    v.sort();
    v
}

async fn conformance(t: TargetRef) {
    let tname = t.name().to_string();
    // An empty target lists nothing, for the root and for a folder never written.
    assert!(
        t.list("").await.unwrap().is_empty(),
        "{tname}: fresh target not empty"
    );
    assert!(t.list("index/").await.unwrap().is_empty());

    // put_new creates; a second put_new of the name does not change the bytes.
    let one = Bytes::from_static(b"first version");
    assert_eq!(
        t.put_new("data/ab/obj1", one.clone()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        t.put_new("data/ab/obj1", Bytes::from_static(b"second version!"))
            .await
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        t.get("data/ab/obj1").await.unwrap(),
        one,
        "{tname}: put_new replaced an object"
    );

    // Racing create-only writes: exactly one wins and its bytes are stored.
    let (a, b) = (
        Bytes::from(vec![b'a'; 100_000]),
        Bytes::from(vec![b'b'; 100_000]),
    );
    let (ra, rb) = tokio::join!(
        t.put_new("race/x", a.clone()),
        t.put_new("race/x", b.clone())
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let stored = t.get("race/x").await.unwrap();
    match (ra, rb) {
        (PutOutcome::Created, PutOutcome::AlreadyExists) => assert_eq!(stored, a),
        (PutOutcome::AlreadyExists, PutOutcome::Created) => assert_eq!(stored, b),
        other => panic!("{tname}: racing put_new gave {other:?}"),
    }

    // Whole and ranged reads of a larger object in nested folders.
    let mut rng = rng(&format!("conformance-{tname}"));
    let big = Bytes::from(random_bytes(&mut rng, 300_000));
    let nested = "tree/0f/a/b/c/deep-object";
    assert_eq!(
        t.put_new(nested, big.clone()).await.unwrap(),
        PutOutcome::Created
    );
    assert_eq!(t.get(nested).await.unwrap(), big);
    for r in [
        0..1u64,
        0..300_000,
        12_345..12_346,
        100_000..250_000,
        299_990..300_000,
    ] {
        let got = t.get_range(nested, r.clone()).await.unwrap();
        assert_eq!(
            got,
            big.slice(r.start as usize..r.end as usize),
            "{tname}: range {r:?}"
        );
    }
    // Streamed ranged reads (restore) give the same bytes in order, for
    // packs (streamed from S3) and metadata (read whole by caches).
    let streamed = "data/0f/streamed-object";
    t.put_new(streamed, big.clone()).await.unwrap();
    for object in [nested, streamed] {
        for r in [0..300_000u64, 1..2, 70_000..299_999] {
            let chunks: Vec<Bytes> = (t.get_range_stream(object, r.clone()).await.unwrap())
                .try_collect()
                .await
                .unwrap();
            assert_eq!(
                chunks.concat(),
                big[r.start as usize..r.end as usize],
                "{tname}: streamed {object} {r:?}"
            );
        }
    }
    t.delete(streamed).await.unwrap();

    // list(prefix) returns full names and sizes; folders do not match by string prefix.
    t.put_new("ab/x", Bytes::from_static(b"12345"))
        .await
        .unwrap();
    t.put_new("abc/y", Bytes::from_static(b"123"))
        .await
        .unwrap();
    assert_eq!(
        names(&t.list("ab/").await.unwrap()),
        vec![("ab/x".into(), 5)]
    );
    assert_eq!(
        names(&t.list("data/").await.unwrap()),
        vec![("data/ab/obj1".into(), 13)]
    );
    assert_eq!(
        names(&t.list("tree/").await.unwrap()),
        vec![(nested.to_string(), 300_000)]
    );
    assert_eq!(
        names(&t.list("tree/0f/a/").await.unwrap()),
        vec![(nested.to_string(), 300_000)]
    );
    let all = t.list("").await.unwrap();
    assert_eq!(
        names(&all),
        vec![
            ("ab/x".into(), 5),
            ("abc/y".into(), 3),
            ("data/ab/obj1".into(), 13),
            ("race/x".into(), 100_000),
            (nested.to_string(), 300_000),
        ]
    );
    let now = chrono::Utc::now();
    for m in &all {
        let skew = (now - m.modified).num_seconds().abs();
        assert!(
            skew < 3600,
            "{tname}: {} modified {} (now {now})",
            m.name,
            m.modified
        );
    }

    // list_after: only names after the start (S3 StartAfter), at most `limit`.
    for seq in [1u32, 2, 3, 10] {
        t.put_new(&format!("seqs/{seq:04}-x"), Bytes::from_static(b"s"))
            .await
            .unwrap();
    }
    assert_eq!(
        names(&t.list_after("seqs/", "seqs/0002", None).await.unwrap()),
        vec![
            ("seqs/0002-x".into(), 1),
            ("seqs/0003-x".into(), 1),
            ("seqs/0010-x".into(), 1)
        ],
        "{tname}: list_after"
    );
    let one = t.list_after("seqs/", "seqs/0003", Some(1)).await.unwrap();
    assert_eq!(one.len(), 1, "{tname}: list_after limit");
    assert!(t
        .list_after("seqs/", "seqs/0011", None)
        .await
        .unwrap()
        .is_empty());
    for seq in [1u32, 2, 3, 10] {
        t.delete(&format!("seqs/{seq:04}-x")).await.unwrap();
    }

    // Missing objects: not found, naming target and object; delete is idempotent.
    for e in [
        t.get("data/ab/missing").await.unwrap_err(),
        t.get_range("data/ab/missing", 0..1).await.unwrap_err(),
        match t.get_range_stream("data/ab/missing", 0..1).await {
            Err(e) => e,
            Ok(_) => panic!("{tname}: a stream of a missing object"),
        },
    ] {
        assert!(e.is_not_found(), "{tname}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("data/ab/missing") && msg.contains(&tname),
            "{msg}"
        );
    }
    t.delete("data/ab/missing").await.unwrap();
    t.delete("ab/x").await.unwrap();
    assert!(t.get("ab/x").await.unwrap_err().is_not_found());
    assert!(t.list("ab/").await.unwrap().is_empty());
    t.delete("ab/x").await.unwrap();
    // A deleted name can be created again.
    assert_eq!(
        t.put_new("ab/x", Bytes::from_static(b"again"))
            .await
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(t.get("ab/x").await.unwrap(), Bytes::from_static(b"again"));

    // overwrite (repair) replaces bytes.
    t.overwrite("data/ab/obj1", Bytes::from_static(b"repaired"))
        .await
        .unwrap();
    assert_eq!(
        t.get("data/ab/obj1").await.unwrap(),
        Bytes::from_static(b"repaired")
    );
    assert_eq!(
        names(&t.list("data/").await.unwrap()),
        vec![("data/ab/obj1".into(), 8)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory() {
    conformance(Arc::new(StoreTarget::memory("mem"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_dir() {
    let work = tempfile::tempdir().unwrap();
    conformance(lib_target(Kind::Local, "conformance-local", work.path()).unwrap()).await;
    // Nothing but the objects is left behind (no staging files).
    let mut files: Vec<String> = read_all_files(&work.path().join("repo"))
        .into_iter()
        .map(|(p, _)| {
            p.strip_prefix(work.path().join("repo"))
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "ab/x",
            "abc/y",
            "data/ab/obj1",
            "race/x",
            "tree/0f/a/b/c/deep-object"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3() {
    let work = tempfile::tempdir().unwrap();
    let Some(t) = lib_target(Kind::S3, "conformance-s3", work.path()) else {
        return;
    };
    conformance(t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_memory() {
    let limits = Limits {
        max_concurrency: 2,
        upload_bps: Some(50 << 20),
        download_bps: Some(50 << 20),
    };
    conformance(Limited::wrap(
        Arc::new(StoreTarget::memory("limited")),
        limits,
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_local() {
    let work = tempfile::tempdir().unwrap();
    let inner = lib_target(Kind::Local, "conformance-cached", work.path()).unwrap();
    conformance(Cached::wrap(inner, work.path().join("cache"), 1 << 20)).await;
}

/// S3 errors other than "not found" are not mistaken for it (a wrong secret
/// must not look like an empty repository), and they name the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_auth_failure_is_not_not_found() {
    let Some(s3) = s3_env("conformance-s3-auth") else {
        return;
    };
    let opts = custos::target::store::S3Options {
        endpoint: Some(s3.endpoint.clone()),
        access_key_id: Some("custostest".into()),
        secret_access_key: Some("wrong-secret".into()),
        ..Default::default()
    };
    let t = StoreTarget::open(
        "badauth",
        &format!("s3://{}/{}", s3.bucket, unique("auth")),
        &opts,
        false,
    )
    .unwrap();
    let e = tokio::time::timeout(
        Duration::from_secs(60),
        custos::target::Target::get(&t, "config"),
    )
    .await
    .expect("a refused request must not retry for a minute")
    .unwrap_err();
    assert!(!e.is_not_found(), "auth failure reported as not found: {e}");
    assert!(e.to_string().contains("badauth"), "{e}");
}
