//! IMAP tests: the conformance suite against a real Dovecot
//! (`scripts/services/imap.sh`, started by `scripts/test.sh`), plus unit tests.
//!
//! Knobs: `CUSTOS_TEST_IMAP_MESSAGES` (messages loaded into the main folder,
//! default 10 000), `CUSTOS_TEST_IMAP_BIG_MB` (size of the big attachment,
//! default 50). Without `CUSTOS_TEST_IMAP_HOST` the Dovecot test prints a
//! line and passes, unless `CUSTOS_REQUIRE_IMAP=1`.

use std::path::PathBuf;
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::client::{self, mutf7_encode, Conn, Event};
use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Plan, Truth, TruthRecord};
use crate::testgen;
use crate::Payload;

#[test]
fn uid_ranges_round_trip() {
    for v in [
        vec![],
        vec![1],
        vec![1, 2, 3, 5, 7, 8, 9, 100],
        (1..=10000).collect(),
    ] {
        let s = uids_to_ranges(&v);
        assert_eq!(ranges_to_uids(&s), Some(v.clone()), "{s}");
    }
    assert_eq!(uids_to_ranges(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
    for bad in ["x", "3:1", "0", "5,3", "1:2,2"] {
        assert_eq!(ranges_to_uids(bad), None, "{bad}");
    }
}

#[test]
fn flags_and_dates() {
    let f: Vec<String> = ["\\Seen", "\\Recent", "$Label", "\\Flagged", "\\Seen"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(flags_meta(&f), "$Label \\Flagged \\Seen");
    let d = parse_internal_date(" 7-Jul-1996 02:44:25 -0700").unwrap();
    assert_eq!(d.to_rfc3339(), "1996-07-07T02:44:25-07:00");
    assert_eq!(format_internal_date(&d), "07-Jul-1996 02:44:25 -0700");
    assert_eq!(parse_internal_date(&format_internal_date(&d)), Some(d));
}

#[test]
fn bad_cursors_are_not_usable() {
    let good = ImapCursor {
        v: CURSOR_VERSION,
        folder: "INBOX".into(),
        uidvalidity: 7,
        uidnext: 10,
        highestmodseq: Some(3),
        uids: "1:9".into(),
    };
    let v = serde_json::to_value(&good).unwrap();
    assert_eq!(serde_json::from_value::<ImapCursor>(v).unwrap(), good);
    assert!(serde_json::from_value::<ImapCursor>(serde_json::json!({"garbage": 1})).is_err());
}

#[tokio::test]
async fn refused_connection_is_unavailable_and_names_the_source() {
    let cfg = ImapConfig {
        name: "nowhere".into(),
        host: "127.0.0.1".into(),
        port: Some(1),
        tls: false,
        username: "u".into(),
        password_env: None,
        password_file: None,
        password_command: Some("printf x".into()),
        folders: None,
        timeout_secs: Some(5),
        stream_threshold_mib: None,
        temp_dir: None,
    };
    let c = ImapConnector::new(cfg).unwrap();
    match c.check().await {
        Err(ConnectorError::Unavailable { source_name, .. }) => assert_eq!(source_name, "nowhere"),
        other => panic!("{other:?}"),
    }
}

struct Env {
    host: String,
    port: u16,
    user: String,
    password: String,
    maildir: PathBuf,
}

fn env() -> Option<Env> {
    let Ok(host) = std::env::var("CUSTOS_TEST_IMAP_HOST") else {
        if std::env::var("CUSTOS_REQUIRE_IMAP").as_deref() == Ok("1") {
            panic!(
                "CUSTOS_REQUIRE_IMAP=1 but CUSTOS_TEST_IMAP_HOST is not set (run scripts/test.sh)"
            );
        }
        println!("skipping the Dovecot IMAP test: CUSTOS_TEST_IMAP_HOST is not set (scripts/test.sh sets it)");
        return None;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    Some(Env {
        host,
        port: var("CUSTOS_TEST_IMAP_PORT").parse().expect("port"),
        user: var("CUSTOS_TEST_IMAP_USER"),
        password: var("CUSTOS_TEST_IMAP_PASSWORD"),
        maildir: PathBuf::from(var("CUSTOS_TEST_IMAP_MAILDIR")),
    })
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(env: &Env, name: &str, folders: Option<Vec<String>>) -> ImapConfig {
    ImapConfig {
        name: name.into(),
        host: env.host.clone(),
        port: Some(env.port),
        tls: false,
        username: env.user.clone(),
        password_env: Some("CUSTOS_TEST_IMAP_PASSWORD".into()),
        password_file: None,
        password_command: None,
        folders,
        timeout_secs: Some(300),
        stream_threshold_mib: None,
        temp_dir: None,
    }
}

/// (uid, flags, internal date, body) of every message of `folder`.
async fn fetch_all(c: &mut Conn, folder: &str) -> (u32, Vec<(u32, Vec<String>, String, Vec<u8>)>) {
    let info = c.examine(&mutf7_encode(folder)).await.expect("examine");
    let mut out = Vec::new();
    if info.exists > 0 {
        let tag = c
            .command("UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[])")
            .await
            .unwrap();
        while let Some(ev) = c.next(&tag).await.unwrap() {
            if let Event::Fetch(i) = ev {
                if let (Some(uid), Some(body)) = (i.uid, i.body) {
                    out.push((
                        uid,
                        i.flags.unwrap_or_default(),
                        i.internal_date.unwrap_or_default(),
                        body,
                    ));
                }
            }
        }
    }
    (info.uidvalidity.unwrap(), out)
}

struct ImapFixture {
    env: Env,
    folders: Vec<String>,
    main: String,
    small: String,
    admin: Mutex<Conn>,
    seed: u64,
    next_msg: u64,
    keyword: u32,
}

impl ImapFixture {
    async fn select_main_uids(&self) -> Vec<u32> {
        let mut a = self.admin.lock().await;
        a.open(&mutf7_encode(&self.main), false).await.unwrap();
        a.uid_search("ALL").await.unwrap()
    }
}

#[async_trait]
impl Fixture for ImapFixture {
    fn label(&self) -> String {
        "imap".into()
    }

    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(
            ImapConnector::new(config(&self.env, "dovecot", Some(self.folders.clone()))).unwrap(),
        )
    }

    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        let mut cfg = config(&self.env, "dovecot-bad", Some(self.folders.clone()));
        cfg.password_env = None;
        cfg.password_command = Some("printf wrong-password".into());
        Some(Box::new(ImapConnector::new(cfg).unwrap()))
    }

    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        let mut a = self.admin.lock().await;
        for f in &self.folders {
            let (v, msgs) = fetch_all(&mut a, f).await;
            let recs = msgs
                .into_iter()
                .map(|(uid, flags, _, body)| {
                    let mut meta = BTreeMap::new();
                    meta.insert("flags".to_string(), flags_meta(&flags));
                    (
                        format!("{v}-{uid}"),
                        TruthRecord {
                            digest: digest(&body),
                            meta,
                            attachments: None,
                        },
                    )
                })
                .collect();
            t.collections.insert(collection_id(f), recs);
        }
        t
    }

    async fn add(&mut self, n: usize) -> Expect {
        let wire = mutf7_encode(&self.main);
        let mut a = self.admin.lock().await;
        for _ in 0..n {
            let raw = testgen::message(self.seed, self.next_msg);
            self.next_msg += 1;
            a.append(&wire, &raw, &[], None).await.unwrap();
        }
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }

    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let uids = self.select_main_uids().await;
        let step = uids.len() / (n + 1);
        let mut pick: Vec<u32> = (0..n).map(|k| uids[step * (k + 1)]).collect();
        pick.sort_unstable();
        let set = uids_to_ranges(&pick);
        let mut a = self.admin.lock().await;
        a.simple(&format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"))
            .await
            .unwrap();
        a.simple(&format!("UID EXPUNGE {set}")).await.unwrap();
        Some(Expect {
            removed: n,
            ..Expect::default()
        })
    }

    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let uids = self.select_main_uids().await;
        let step = uids.len() / (n + 1);
        let mut pick: Vec<u32> = (0..n).map(|k| uids[step * (k + 1) - step / 2]).collect();
        pick.sort_unstable();
        self.keyword += 1;
        let mut a = self.admin.lock().await;
        a.simple(&format!(
            "UID STORE {} +FLAGS.SILENT ($custos_k{} \\Flagged)",
            uids_to_ranges(&pick),
            self.keyword
        ))
        .await
        .unwrap();
        Some(Expect {
            meta_updates: n,
            ..Expect::default()
        })
    }

    async fn change_validity(&mut self) -> Option<Expect> {
        let mut a = self.admin.lock().await;
        let (old_v, msgs) = fetch_all(&mut a, &self.small).await;
        let wire = mutf7_encode(&self.small);
        a.examine("INBOX").await.unwrap();
        a.simple(&format!("DELETE {}", client::quote(&wire)))
            .await
            .unwrap();
        a.simple(&format!("CREATE {}", client::quote(&wire)))
            .await
            .unwrap();
        for (_, flags, date, body) in &msgs {
            let flags: Vec<String> = flags
                .iter()
                .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
                .cloned()
                .collect();
            a.append(&wire, body, &flags, Some(date)).await.unwrap();
        }
        let (new_v, again) = fetch_all(&mut a, &self.small).await;
        assert_ne!(
            old_v, new_v,
            "recreating the folder must change UIDVALIDITY"
        );
        assert_eq!(again.len(), msgs.len());
        Some(Expect {
            fetched: msgs.len(),
            removed: msgs.len(),
            reset: true,
            ..Expect::default()
        })
    }
}

/// Write `raw` into the Maildir folder `folder` (as Dovecot's own delivery
/// would: tmp/ then rename into cur/ with flags).
fn drop_into_maildir(root: &std::path::Path, folder: &str, n: u64, raw: &[u8], flags: &str) {
    let dir = if folder == "INBOX" {
        root.to_path_buf()
    } else {
        root.join(format!(".{}", mutf7_encode(folder)))
    };
    let unique = format!("1700000000.M{n}P{}.custos-test", std::process::id());
    let tmp = dir.join("tmp").join(&unique);
    std::fs::write(&tmp, raw).unwrap();
    std::fs::rename(&tmp, dir.join("cur").join(format!("{unique}:2,{flags}"))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_conformance() {
    let Some(env) = env() else { return };
    let n_main = knob("CUSTOS_TEST_IMAP_MESSAGES", 10_000);
    let big_mb = knob("CUSTOS_TEST_IMAP_BIG_MB", 50);
    let run = format!("{}-{}", std::process::id(), now_suffix());
    let main = format!("custos-{run}-main");
    let small = format!("Sent Items {run}");
    let unicode = format!("Entwürfe {run}");
    let big = format!("custos-{run}-big");
    let empty = format!("custos-{run}-empty");
    let restore = format!("custos-{run}-restored");
    let folders = vec![
        main.clone(),
        small.clone(),
        unicode.clone(),
        big.clone(),
        empty.clone(),
    ];
    let mut admin = client::connect(&config(&env, "admin", None), &env.password)
        .await
        .expect("login to the test Dovecot");
    assert!(
        admin.condstore && admin.qresync,
        "the test Dovecot offers CONDSTORE and QRESYNC"
    );
    for f in &folders {
        admin
            .simple(&format!("CREATE {}", client::quote(&mutf7_encode(f))))
            .await
            .unwrap();
    }

    // Load: Maildir delivery, then one EXAMINE per folder so Dovecot indexes.
    let seed = 42;
    let t = Instant::now();
    let flags = ["S", "S", "S", "", "FS", "RS", "", "S"];
    for i in 0..n_main as u64 {
        drop_into_maildir(
            &env.maildir,
            &main,
            i,
            &testgen::message(seed, i),
            flags[(i % 8) as usize],
        );
    }
    let mut k = n_main as u64;
    for raw in [testgen::broken_mime(), testgen::invalid_utf8_headers()] {
        drop_into_maildir(&env.maildir, &main, k, &raw, "");
        k += 1;
    }
    for i in 0..200 {
        drop_into_maildir(&env.maildir, &small, k, &testgen::message(seed + 1, i), "S");
        k += 1;
    }
    for i in 0..5 {
        drop_into_maildir(
            &env.maildir,
            &unicode,
            k,
            &testgen::message(seed + 2, i),
            "",
        );
        k += 1;
    }
    drop_into_maildir(&env.maildir, &big, k, &testgen::big_attachment(big_mb), "");
    for f in &folders {
        admin.examine(&mutf7_encode(f)).await.unwrap();
    }
    let load = t.elapsed();
    println!(
        "imap: loaded {} messages ({n_main} in the main folder, one of {big_mb} MiB) into Dovecot in {:.2}s",
        k + 1,
        load.as_secs_f64()
    );
    admin.examine(&mutf7_encode(&main)).await.unwrap();
    let unseen_before = admin.uid_search("UNSEEN").await.unwrap().len();

    let mut fx = ImapFixture {
        env,
        folders: folders.clone(),
        main: main.clone(),
        small,
        admin: Mutex::new(admin),
        seed: 4242,
        next_msg: 0,
        keyword: 0,
    };
    let plan = Plan {
        add: 100,
        add_after_restart: 7,
        delete: 10,
        edit: 5,
        add_interrupted: 50,
        fail_after: 20,
    };
    let t = Instant::now();
    let (report, mut h) = conformance::run_all(&mut fx, plan).await;
    println!(
        "imap conformance ({:.1}s):\n{report}",
        t.elapsed().as_secs_f64()
    );

    // Nothing was marked \Seen by the syncs.
    {
        let mut a = fx.admin.lock().await;
        a.examine(&mutf7_encode(&main)).await.unwrap();
        let unseen_after = a.uid_search("UNSEEN").await.unwrap().len();
        // Messages APPENDed by the suite have no flags: they are unseen too.
        assert!(unseen_after >= unseen_before, "a sync set \\Seen");
    }

    // The scenario in one sync: add 100, delete 10, flag 5.
    fx.add(100).await;
    fx.delete(10).await;
    fx.edit(5).await;
    let truth = fx.truth().await;
    let conn = fx.connector().await;
    let t = Instant::now();
    let s = h.sync_all(&*conn).await.unwrap();
    println!(
        "imap: add 100 + delete 10 + flag 5 → incremental sync {:.3}s {s:?}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(s.fetched, 100, "bodies fetched");
    assert_eq!(s.deletes, 10, "deletes reported");
    assert_eq!(s.meta_updates, 5, "UpdateMeta");
    assert_eq!(s.resets, 0);
    h.assert_matches(&truth, "imap add/delete/flag");

    // Without QRESYNC (no VANISHED): deletions by UID set difference.
    fx.delete(3).await;
    fx.edit(2).await;
    let truth = fx.truth().await;
    let mut plain = ImapConnector::new(config(&fx.env, "dovecot", Some(folders.clone()))).unwrap();
    plain.no_qresync = true;
    let s = h.sync_all(&plain).await.unwrap();
    assert_eq!(
        (s.fetched, s.deletes, s.meta_updates, s.resets),
        (0, 3, 2, 0),
        "{s:?}"
    );
    h.assert_matches(&truth, "imap without QRESYNC");

    // Counts per folder equal the server's; malformed messages archived byte-exact.
    for f in &folders {
        let cid = collection_id(f);
        assert_eq!(
            h.state.get(&cid).map_or(0, |r| r.len()),
            truth.collections[&cid].len(),
            "{f}"
        );
    }
    let main_recs = &h.state[&collection_id(&main)];
    // Broken MIME and invalid UTF-8 headers: archived (the truth check above
    // compared their bytes); the header problem is named in the meta.
    assert!(
        main_recs.values().any(|r| r
            .meta
            .get("warning")
            .is_some_and(|w| w.contains("invalid_utf8_header"))),
        "invalid UTF-8 headers carry a named warning"
    );
    assert!(main_recs
        .values()
        .any(|r| r.subject.as_deref() == Some("broken mime")));
    let big_recs = &h.state[&collection_id(&big)];
    let big_rec = big_recs.values().next().unwrap();
    assert!(big_rec.size > (big_mb as u64) << 20);
    assert_eq!(big_rec.attachments.len(), 1);
    assert!(h.state[&collection_id(&empty)].is_empty());
    let uni = &h.state[&collection_id(&unicode)];
    assert_eq!(uni.len(), 5);
    assert!(uni.values().all(|r| r.meta["folder"] == unicode));

    // Restore into the source: APPEND with flags and internal date.
    let restored_conn = ImapConnector::new(config(&fx.env, "dovecot", None)).unwrap();
    let originals = {
        let mut a = fx.admin.lock().await;
        fetch_all(&mut a, &main).await.1
    };
    let v = {
        let mut a = fx.admin.lock().await;
        a.examine(&mutf7_encode(&main))
            .await
            .unwrap()
            .uidvalidity
            .unwrap()
    };
    let mut want = Vec::new();
    for (uid, flags, date, body) in originals.iter().take(3) {
        let meta = &main_recs[&format!("{v}-{uid}")].meta;
        restored_conn
            .append_with_meta(&restore, body, meta)
            .await
            .unwrap();
        want.push((
            digest(body),
            flags_meta(flags),
            parse_internal_date(date).unwrap(),
        ));
    }
    let got = {
        let mut a = fx.admin.lock().await;
        fetch_all(&mut a, &restore).await.1
    };
    let got: Vec<_> = got
        .iter()
        .map(|(_, f, d, b)| (digest(b), flags_meta(f), parse_internal_date(d).unwrap()))
        .collect();
    assert_eq!(
        got, want,
        "restored messages: bytes, flags and internal dates"
    );

    // All folders by default (no `folders` key): ours are among them.
    let all = ImapConnector::new(config(&fx.env, "dovecot", None)).unwrap();
    let colls = all.collections().await.unwrap();
    for f in &folders {
        assert!(colls.iter().any(|c| &c.name == f), "{f} listed");
    }
    assert!(colls.iter().any(|c| c.name == "INBOX"));
    let health = all.check().await.unwrap();
    println!("imap: {}", health.summary);

    let mut a = fx.admin.lock().await;
    a.examine("INBOX").await.unwrap();
    for f in folders.iter().chain([&restore]) {
        let _ = a
            .simple(&format!("DELETE {}", client::quote(&mutf7_encode(f))))
            .await;
    }
}

fn now_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64 % 1_000_000)
}

/// Keeps (record, payload was a reader, declared size, payload bytes).
#[derive(Default)]
struct PayloadSink {
    got: Vec<(Record, bool, Option<u64>, Vec<u8>)>,
}

#[async_trait]
impl ChangeSink for PayloadSink {
    async fn push(&mut self, change: Change) -> Result<()> {
        if let Change::Upsert(mut r) = change {
            let payload = std::mem::replace(&mut r.payload, Payload::Bytes(Vec::new()));
            let (reader, size) = match &payload {
                Payload::Bytes(b) => (false, Some(b.len() as u64)),
                Payload::Reader { size, .. } => (true, *size),
            };
            let bytes = payload.into_bytes().unwrap();
            self.got.push((r, reader, size, bytes));
        }
        Ok(())
    }
}

/// A message of exactly `len` bytes (CRLF lines).
fn message_of_len(len: usize) -> Vec<u8> {
    let mut m = b"From: exact@example.org\r\nTo: archive@example.org\r\nSubject: exact size\r\nMessage-ID: <exact@example.org>\r\n\r\n".to_vec();
    while m.len() + 80 <= len {
        m.extend_from_slice(&[b'x'; 78]);
        m.extend_from_slice(b"\r\n");
    }
    m.resize(len - 2, b'y');
    m.extend_from_slice(b"\r\n");
    m
}

/// Messages over `stream_threshold_mib` are fetched in partial pieces into a
/// temporary file and arrive as a reader, byte-exact, with their flags and
/// headers; small ones stay in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_large_messages_are_streamed() {
    let Some(env) = env() else { return };
    let folder = format!("custos-{}-{}-large", std::process::id(), now_suffix());
    let wire = mutf7_encode(&folder);
    let mut admin = client::connect(&config(&env, "admin", None), &env.password)
        .await
        .expect("login to the test Dovecot");
    admin
        .simple(&format!("CREATE {}", client::quote(&wire)))
        .await
        .unwrap();
    let big = testgen::big_attachment(40);
    // Exactly 9 pieces of 1 MiB: the last partial FETCH comes back empty.
    let exact = message_of_len(9 << 20);
    let small = testgen::message(7, 1);
    drop_into_maildir(&env.maildir, &folder, 1, &big, "S");
    drop_into_maildir(&env.maildir, &folder, 2, &exact, "F");
    drop_into_maildir(&env.maildir, &folder, 3, &small, "");
    let (_, truth) = fetch_all(&mut admin, &folder).await;
    assert_eq!(truth.len(), 3);
    let tmp = tempfile::tempdir().unwrap();
    for piece in [PIECE, 1 << 20] {
        let mut cfg = config(&env, "dovecot", Some(vec![folder.clone()]));
        cfg.temp_dir = Some(tmp.path().to_path_buf());
        let mut conn = ImapConnector::new(cfg).unwrap();
        conn.piece = piece;
        let coll = conn.collections().await.unwrap().remove(0);
        let mut sink = PayloadSink::default();
        conn.sync(&coll, None, &mut sink).await.unwrap();
        assert_eq!(sink.got.len(), 3);
        for (rec, reader, size, bytes) in &sink.got {
            let uid: u32 = rec.meta["uid"].parse().unwrap();
            let (_, flags, _, want) = truth.iter().find(|t| t.0 == uid).unwrap();
            assert!(bytes == want, "UID {uid}: payload differs (piece {piece})");
            assert_eq!(*size, Some(want.len() as u64));
            assert_eq!(rec.meta["size"], want.len().to_string());
            assert_eq!(rec.meta["blake3"], blake3::hash(want).to_hex().to_string());
            assert_eq!(rec.meta["flags"], flags_meta(flags));
            assert!(rec.meta.contains_key("internal_date"));
            assert!(rec.meta.contains_key("modseq"));
            assert!(!rec.meta.contains_key("warning"), "{:?}", rec.meta);
            let large = want.len() > 8 << 20;
            assert_eq!(*reader, large, "UID {uid}: streamed iff over 8 MiB");
            if want.len() == big.len() {
                assert_eq!(rec.subject.as_deref(), Some("big attachment"));
                assert_eq!(rec.meta["parsed_bytes"], (1 << 20).to_string());
                assert_eq!(rec.attachments.len(), 1);
                assert_eq!(rec.attachments[0].size, None);
            } else if want.len() == exact.len() {
                assert_eq!(rec.subject.as_deref(), Some("exact size"));
            } else {
                assert!(!rec.meta.contains_key("parsed_bytes"));
            }
        }
        drop(sink);
        // The temporary files are unnamed and gone once the payloads are read.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
    admin.examine("INBOX").await.unwrap();
    admin
        .simple(&format!("DELETE {}", client::quote(&wire)))
        .await
        .unwrap();
}
