//! File-source tests: the conformance suite for every file connector (on temp
//! dirs), plus the format specifics (mboxrd quoting, truncated mbox, append
//! reads only the tail, Slack byte-exactness, CSV/JSONL payloads, malformed
//! email).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use chrono::TimeZone;

use super::*;
use crate::conformance::{self, digest, Expect, Fixture, Harness, Plan, Truth, TruthRecord};
use crate::ids::record_id;
use crate::{testgen, Connector};

/// File timestamps can lag the clock by a few ms; listing sources use a
/// watermark margin, so fixtures wait a little after each mutation.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(120)).await;
}

fn truth_of(
    coll: &str,
    recs: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> BTreeMap<String, TruthRecord> {
    let _ = coll;
    recs.into_iter()
        .map(|(id, bytes)| {
            (
                id,
                TruthRecord {
                    digest: digest(&bytes),
                    ..TruthRecord::default()
                },
            )
        })
        .collect()
}

// ---------------------------------------------------------------- mbox

/// The fixture's own id rule (independent of the connector's code).
fn mbox_ids(msgs: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    msgs.iter()
        .map(|m| {
            let d = blake3::hash(m).to_hex()[..16].to_string();
            let n = counts.entry(d.clone()).or_insert(0);
            *n += 1;
            let id = if *n == 1 { d } else { format!("{d}-{n}") };
            (id, m.clone())
        })
        .collect()
}

fn lf(m: Vec<u8>) -> Vec<u8> {
    String::from_utf8_lossy(&m)
        .replace("\r\n", "\n")
        .into_bytes()
}

struct MboxFixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    files: BTreeMap<String, Vec<Vec<u8>>>,
    next: u64,
    stream: Option<u64>,
}

impl MboxFixture {
    fn new() -> MboxFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mail");
        std::fs::create_dir(&root).unwrap();
        let mut files = BTreeMap::new();
        let mut a: Vec<Vec<u8>> = (0..30).map(|i| lf(testgen::message(7, i))).collect();
        a.push(a[3].clone()); // an exact duplicate
        a.push(
            b"From: q@example.org\nSubject: quoting\n\nFrom here on\n>From quoted\n>>From twice\n"
                .to_vec(),
        );
        files.insert("archive 2019".to_string(), a);
        files.insert(
            "b".to_string(),
            (100..105).map(|i| testgen::message(8, i)).collect(),
        );
        let fx = MboxFixture {
            _dir: dir,
            root,
            files,
            next: 1000,
            stream: None,
        };
        for k in fx.files.keys().cloned().collect::<Vec<_>>() {
            fx.write(&k);
        }
        fx
    }

    fn write(&self, name: &str) {
        let mut out = Vec::new();
        for m in &self.files[name] {
            out.extend(mbox_entry(
                "sender@example.org",
                chrono::Utc.timestamp_opt(1_600_000_000, 0).unwrap(),
                m,
            ));
        }
        std::fs::write(self.root.join(format!("{name}.mbox")), out).unwrap();
    }
}

#[async_trait]
impl Fixture for MboxFixture {
    fn label(&self) -> String {
        "mbox".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(MboxConnector::new(MboxConfig {
            name: "mbox".into(),
            path: self.root.clone(),
            stream_threshold_mib: self.stream,
        }))
    }
    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        for (name, msgs) in &self.files {
            let cid = crate::ids::collection_id(name);
            t.collections
                .insert(cid.clone(), truth_of(&cid, mbox_ids(msgs)));
        }
        t
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut tail = Vec::new();
        let msgs = self.files.get_mut("archive 2019").unwrap();
        for _ in 0..n {
            let m = lf(testgen::message(9, self.next));
            self.next += 1;
            tail.extend(mbox_entry("x@example.org", chrono::Utc::now(), &m));
            msgs.push(m);
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.root.join("archive 2019.mbox"))
            .unwrap();
        f.write_all(&tail).unwrap();
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let msgs = self.files.get_mut("archive 2019").unwrap();
        for _ in 0..n {
            msgs.remove(5);
        }
        let remaining = msgs.len();
        self.write("archive 2019");
        Some(Expect {
            fetched: remaining,
            removed: n,
            reset: true,
            ..Expect::default()
        })
    }
    async fn edit(&mut self, _n: usize) -> Option<Expect> {
        None
    }
}

#[tokio::test]
async fn mbox_conformance() {
    let mut fx = MboxFixture::new();
    let (report, _) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("mbox:\n{report}");
}

#[tokio::test]
async fn mbox_conformance_streamed() {
    // Every message streamed from its range of the mbox (threshold 0): same
    // records, same digests, unescaped on the fly.
    let mut fx = MboxFixture::new();
    fx.stream = Some(0);
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("mbox (streamed):\n{report}");
    assert!(h.state.values().flatten().all(|(_, r)| r.subject.is_some()));
}

/// Every message of `data` cut with `threshold`, with its bytes (a streamed
/// one read through its payload reader) and whether it was streamed.
fn cut_mbox(data: &[u8], threshold: u64) -> Vec<(mbox::MboxMessage, Vec<u8>, bool)> {
    let src = std::sync::Arc::new(data.to_vec());
    let mut r = mbox::MboxReader::new(src.clone(), 0, data.len() as u64, threshold);
    let mut out = Vec::new();
    while let Some(mut m) = r.next_message().unwrap() {
        let body = std::mem::replace(&mut m.body, mbox::Body::Bytes(Vec::new()));
        let (bytes, streamed) = match body {
            mbox::Body::Bytes(b) => (b, false),
            mbox::Body::Range { start, end, prefix } => {
                let p = mbox::range_payload(&src, m.offset, start, end, m.len);
                let b = p.into_bytes().unwrap();
                assert!(
                    b.starts_with(&prefix),
                    "the parse prefix is the message's start"
                );
                (b, true)
            }
        };
        assert_eq!(bytes.len() as u64, m.len);
        assert_eq!(m.blake3, blake3::hash(&bytes).to_hex().to_string());
        out.push((m, bytes, streamed));
    }
    out
}

#[test]
fn mboxrd_quoting_round_trips() {
    let msg = b"From: a@example.org\nSubject: q\n\nFrom the start\n>From one\n>>From two\nnot From here\n>not quoted From\n".to_vec();
    let entry = mbox_entry(
        "a@example.org",
        chrono::Utc.timestamp_opt(0, 0).unwrap(),
        &msg,
    );
    let text = String::from_utf8(entry.clone()).unwrap();
    assert!(text
        .contains("\n>From the start\n>>From one\n>>>From two\nnot From here\n>not quoted From\n"));
    for threshold in [0, u64::MAX] {
        let got = cut_mbox(&entry, threshold);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, msg);
        assert_eq!(got[0].2, threshold == 0);
        assert!(got[0].0.warnings.is_empty());
    }
    // CRLF messages too.
    let crlf = testgen::message(1, 2);
    let entry = mbox_entry("a@example.org", chrono::Utc::now(), &crlf);
    for threshold in [0, u64::MAX] {
        assert_eq!(cut_mbox(&entry, threshold)[0].1, crlf);
    }
}

/// Boundaries and escaping, streamed or in memory, through every read size:
/// messages that end without a blank line, with CRLF, empty ones, quoted
/// `From ` at buffer edges, long runs of `>`, lines longer than the scan
/// buffer, data before the first `From_` line — each message comes back as
/// it was written, with the offset of its `From_` line.
#[test]
fn mbox_boundaries_and_escaping_round_trip() {
    let long_line = [b"X-Long: ".to_vec(), vec![b'a'; 700 * 1024], b"\n".to_vec()].concat();
    let many_gt = [vec![b'>'; 300 * 1024], b"From deep\n".to_vec()].concat();
    let msgs: Vec<Vec<u8>> = vec![
        b"Subject: one\n\nbody\n".to_vec(),
        b"Subject: crlf\r\n\r\nline\r\nFrom x\r\n>From y\r\n\r\n".to_vec(),
        b"\n".to_vec(),
        b"Subject: ends blank\n\nbody\n\n".to_vec(),
        [
            b"Subject: long\n\n".to_vec(),
            long_line.clone(),
            b"From in the end\n".to_vec(),
        ]
        .concat(),
        [
            b"Subject: gt\n\n".to_vec(),
            many_gt,
            b">\n>>\nFro\nFrom\n>Fromage\n".to_vec(),
        ]
        .concat(),
        b"Subject: last\n\nFrom the end\n".to_vec(),
    ];
    let mut data = Vec::new();
    let mut offsets = Vec::new();
    for m in &msgs {
        offsets.push(data.len() as u64);
        data.extend(mbox_entry(
            "s@example.org",
            chrono::Utc.timestamp_opt(0, 0).unwrap(),
            m,
        ));
    }
    for threshold in [0, 10, 1 << 20, u64::MAX] {
        let got = cut_mbox(&data, threshold);
        assert_eq!(got.len(), msgs.len(), "threshold {threshold}");
        for (i, ((m, bytes, streamed), want)) in got.iter().zip(&msgs).enumerate() {
            assert!(
                bytes == want,
                "message {i}, threshold {threshold}: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            );
            assert_eq!(m.offset, offsets[i], "message {i}");
            assert!(
                m.from_line.starts_with("From s@example.org "),
                "{}",
                m.from_line
            );
            assert!(m.warnings.is_empty(), "message {i}: {:?}", m.warnings);
            assert_eq!(
                *streamed,
                want.len() as u64 > threshold,
                "message {i}, threshold {threshold}"
            );
        }
    }
    // A truncated mbox: the last message is kept as far as it goes, warned.
    let cut = &data[..data.len() - 7];
    let last = msgs.len() - 1;
    for threshold in [0, u64::MAX] {
        let got = cut_mbox(cut, threshold);
        assert_eq!(got.len(), msgs.len());
        let (m, bytes, _) = got.last().unwrap();
        assert_eq!(
            bytes, b"Subject: last\n\nFrom th",
            "unescaped, as far as it goes"
        );
        assert!(
            m.warnings[0].starts_with("truncated_message"),
            "{:?}",
            m.warnings
        );
        assert!(got[..last].iter().zip(&msgs).all(|(g, w)| &g.1 == w));
    }
    // Blank lines before the first From_ line are skipped; other data there
    // is a message of its own, with a named warning.
    let mut pre = b"\n \t\n".to_vec();
    pre.extend_from_slice(&data);
    assert_eq!(cut_mbox(&pre, 0).len(), msgs.len());
    let mut pre = b"\n  stray line\n>From quoted\n".to_vec();
    pre.extend_from_slice(&data);
    for threshold in [0, u64::MAX] {
        let got = cut_mbox(&pre, threshold);
        assert_eq!(got.len(), msgs.len() + 1);
        assert_eq!(got[0].1, b"  stray line\nFrom quoted\n");
        assert_eq!(got[0].0.offset, 1);
        assert!(got[0].0.warnings[0].starts_with("missing_from_line"));
    }
}

/// A large message (over the threshold) arrives as a reader of its mbox
/// range, unescaped, byte-exact, with metadata from its first MiB; the small
/// ones beside it stay in memory; a file rewritten under a streamed record
/// makes its read fail with an error naming the message's offset.
#[tokio::test]
async fn large_mbox_messages_are_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.mbox");
    // 20 MiB, with quoted lines well past the parsed prefix.
    let mut big = testgen::big_attachment(20);
    let tail = big.split_off(big.len() - 9);
    big.extend_from_slice(b"From here\r\n>From there\r\n");
    big.extend_from_slice(&tail);
    let small = testgen::message(3, 1);
    let mut data = mbox_entry("s@x", chrono::Utc::now(), &small);
    data.extend(mbox_entry("big@example.org", chrono::Utc::now(), &big));
    data.extend(mbox_entry(
        "s@x",
        chrono::Utc::now(),
        &testgen::message(3, 2),
    ));
    std::fs::write(&p, &data).unwrap();
    let conn = MboxConnector::new(MboxConfig {
        name: "m".into(),
        path: p.clone(),
        stream_threshold_mib: Some(8),
    });
    let coll = conn.collections().await.unwrap().remove(0);
    let mut sink = PayloadSink::default();
    conn.sync(&coll, None, &mut sink).await.unwrap();
    assert_eq!(sink.got.len(), 3);
    let (rec, reader, size, bytes) = &sink.got[1];
    assert!(*reader, "a 20 MiB message must be streamed");
    assert_eq!(*size, Some(big.len() as u64));
    assert!(bytes == &big, "streamed payload differs from the message");
    assert_eq!(rec.meta["size"], big.len().to_string());
    assert_eq!(rec.meta["blake3"], blake3::hash(&big).to_hex().to_string());
    assert_eq!(rec.id, blake3::hash(&big).to_hex()[..16]);
    assert_eq!(rec.meta["parsed_bytes"], (1 << 20).to_string());
    assert_eq!(rec.subject.as_deref(), Some("big attachment"));
    assert_eq!(rec.attachments.len(), 1);
    assert_eq!(rec.attachments[0].size, None, "cut by the parsed prefix");
    for (rec, reader, _, bytes) in [&sink.got[0], &sink.got[2]] {
        assert!(!reader, "small messages stay in memory");
        assert!(!rec.meta.contains_key("parsed_bytes"));
        assert_eq!(rec.meta["blake3"], blake3::hash(bytes).to_hex().to_string());
    }
    assert_eq!(sink.got[0].3, small);

    // The file is rewritten between the scan and the read of the payload.
    struct Rewrite(PathBuf, Option<String>);
    #[async_trait]
    impl crate::ChangeSink for Rewrite {
        async fn push(&mut self, change: crate::Change) -> crate::Result<()> {
            if let crate::Change::Upsert(r) = change {
                if let crate::Payload::Reader { mut reader, .. } = r.payload {
                    use std::io::{Read, Write};
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(&self.0)
                        .unwrap();
                    f.set_len(r.meta["offset"].parse::<u64>().unwrap() + 1000)
                        .unwrap();
                    f.flush().unwrap();
                    let mut v = Vec::new();
                    self.1 = Some(reader.read_to_end(&mut v).unwrap_err().to_string());
                }
            }
            Ok(())
        }
    }
    let mut sink = Rewrite(p.clone(), None);
    // (The sync then fails too: the file is shorter than when it started.)
    let _ = conn.sync(&coll, None, &mut sink).await;
    let err = sink.1.expect("the streamed record was read");
    let off = mbox_entry("s@x", chrono::Utc::now(), &small).len();
    assert!(
        err.contains(&format!(
            "the mbox changed while it was read: the message at offset {off} ends"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_mbox_is_archived_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.mbox");
    let a = lf(testgen::message(3, 1));
    let b = lf(testgen::message(3, 2));
    let mut data = mbox_entry("s@x", chrono::Utc::now(), &a);
    let second = mbox_entry("s@x", chrono::Utc::now(), &b);
    let cut = second.len() / 2;
    data.extend_from_slice(&second[..cut]);
    std::fs::write(&p, &data).unwrap();
    let conn = MboxConnector::new(MboxConfig {
        name: "m".into(),
        path: p.clone(),
        stream_threshold_mib: None,
    });
    let mut h = Harness::new();
    h.sync_all(&conn).await.unwrap();
    let recs = &h.state["cut"];
    assert_eq!(recs.len(), 2);
    let cut_rec = recs
        .values()
        .find(|r| {
            r.meta
                .get("warning")
                .is_some_and(|w| w.contains("truncated_message"))
        })
        .expect("the cut message is archived with a warning");
    // Archived as-is: the bytes after the From_ line, unchanged.
    let from_end = second.iter().position(|b| *b == b'\n').unwrap() + 1;
    assert_eq!(cut_rec.digest, digest(&second[from_end..cut]));
    // Completing the file later is a rewrite (the cut message changed).
    std::fs::write(
        &p,
        [mbox_entry("s@x", chrono::Utc::now(), &a), second.clone()].concat(),
    )
    .unwrap();
    let s = h.sync_all(&conn).await.unwrap();
    assert_eq!(s.resets, 1);
    assert_eq!(h.state["cut"].len(), 2);
    assert!(h.state["cut"]
        .values()
        .all(|r| !r.meta.contains_key("warning")));
}

#[tokio::test]
async fn appended_mbox_reads_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.mbox");
    let mut data = Vec::new();
    for i in 0..500 {
        data.extend(mbox_entry(
            "s@x",
            chrono::Utc::now(),
            &lf(testgen::message(5, i)),
        ));
    }
    std::fs::write(&p, &data).unwrap();
    let conn = MboxConnector::new(MboxConfig {
        name: "m".into(),
        path: p.clone(),
        stream_threshold_mib: None,
    });
    let mut h = Harness::new();
    let full = h.sync_all(&conn).await.unwrap();
    assert_eq!(full.fetched, 500);
    let before = std::fs::metadata(&p).unwrap().len();
    let extra = [
        mbox_entry("s@x", chrono::Utc::now(), &lf(testgen::message(5, 1))), // a duplicate of #1
        mbox_entry("s@x", chrono::Utc::now(), &lf(testgen::message(5, 9999))),
    ]
    .concat();
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p)
        .unwrap()
        .write_all(&extra)
        .unwrap();
    let s = h.sync_all(&conn).await.unwrap();
    assert_eq!((s.fetched, s.resets, s.removed()), (2, 0, 0));
    // Only the two new messages were read (bytes = their sizes).
    let want = lf(testgen::message(5, 1)).len() + lf(testgen::message(5, 9999)).len();
    assert_eq!(s.bytes as usize, want);
    assert!(before > 0);
    assert_eq!(h.state["big"].len(), 502);
    // The duplicate got the `-2` id, exactly as a full read gives it.
    let mut fresh = Harness::new();
    fresh.sync_all(&conn).await.unwrap();
    assert_eq!(fresh.state, h.state);
}

// ------------------------------------------------------------- maildir

/// folder dir → unique → (sub, flags, bytes)
type MaildirModel = BTreeMap<PathBuf, BTreeMap<String, (String, String, Vec<u8>)>>;

struct MaildirFixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    msgs: MaildirModel,
    next: u64,
    /// `stream_threshold_mib` of the connector (`Some(0)`: every file streamed).
    stream: Option<u64>,
}

impl MaildirFixture {
    fn new() -> MaildirFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        let mut fx = MaildirFixture {
            root: root.clone(),
            _dir: dir,
            msgs: BTreeMap::new(),
            next: 0,
            stream: None,
        };
        for (folder, n) in [
            (root.clone(), 12),
            (root.join(".Sent"), 4),
            (root.join(".Empty"), 0),
        ] {
            for sub in ["cur", "new", "tmp"] {
                std::fs::create_dir_all(folder.join(sub)).unwrap();
            }
            fx.msgs.insert(folder.clone(), BTreeMap::new());
            for _ in 0..n {
                fx.put(&folder);
            }
        }
        fx
    }

    fn file(folder: &Path, unique: &str, sub: &str, flags: &str) -> PathBuf {
        if sub == "new" {
            folder.join("new").join(unique)
        } else {
            folder.join("cur").join(format!("{unique}:2,{flags}"))
        }
    }

    fn put(&mut self, folder: &Path) {
        let i = self.next;
        self.next += 1;
        let unique = format!("17000{i:05}.M{i}P99.host,S=1");
        let (sub, flags) = if i.is_multiple_of(3) {
            ("new", "")
        } else {
            ("cur", "S")
        };
        let bytes = testgen::message(11, i);
        std::fs::write(Self::file(folder, &unique, sub, flags), &bytes).unwrap();
        self.msgs
            .get_mut(folder)
            .unwrap()
            .insert(unique, (sub.into(), flags.into(), bytes));
    }
}

#[async_trait]
impl Fixture for MaildirFixture {
    fn label(&self) -> String {
        "maildir".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        settle().await;
        Box::new(MaildirConnector::new(MaildirConfig {
            name: "maildir".into(),
            path: self.root.clone(),
            stream_threshold_mib: self.stream,
        }))
    }
    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        for (folder, msgs) in &self.msgs {
            let name = if *folder == self.root {
                "INBOX".to_string()
            } else {
                folder.file_name().unwrap().to_string_lossy()[1..].to_string()
            };
            let recs = msgs
                .iter()
                .map(|(u, (_, flags, b))| {
                    let mut meta = BTreeMap::new();
                    meta.insert("maildir_flags".to_string(), flags.clone());
                    (
                        record_id(u),
                        TruthRecord {
                            digest: digest(b),
                            meta,
                            attachments: None,
                        },
                    )
                })
                .collect();
            t.collections.insert(crate::ids::collection_id(&name), recs);
        }
        t
    }
    async fn add(&mut self, n: usize) -> Expect {
        let root = self.root.clone();
        for _ in 0..n {
            self.put(&root);
        }
        settle().await;
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let root = self.root.clone();
        let msgs = self.msgs.get_mut(&root).unwrap();
        let victims: Vec<String> = msgs.keys().take(n).cloned().collect();
        for u in victims {
            let (sub, flags, _) = msgs.remove(&u).unwrap();
            std::fs::remove_file(Self::file(&root, &u, &sub, &flags)).unwrap();
        }
        settle().await;
        Some(Expect {
            removed: n,
            ..Expect::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        // Flag changes: rename (new → cur with flags, or new flags in cur).
        let root = self.root.clone();
        let msgs = self.msgs.get_mut(&root).unwrap();
        for (u, (sub, flags, _)) in msgs.iter_mut().rev().take(n) {
            let from = Self::file(&root, u, sub, flags);
            *sub = "cur".into();
            *flags = "FRS".into();
            std::fs::rename(from, Self::file(&root, u, sub, flags)).unwrap();
        }
        settle().await;
        Some(Expect {
            fetched: n,
            ..Expect::default()
        })
    }
}

#[tokio::test]
async fn maildir_conformance() {
    let mut fx = MaildirFixture::new();
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("maildir:\n{report}");
    let inbox = &h.state["INBOX"];
    assert!(inbox
        .values()
        .any(|r| r.meta["flags"] == "\\Answered \\Flagged \\Seen"));
    assert!(h.state["Empty"].is_empty());
}

#[tokio::test]
async fn maildir_conformance_streamed() {
    // Every file streamed from disk (threshold 0): same records, same digests.
    let mut fx = MaildirFixture::new();
    fx.stream = Some(0);
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("maildir (streamed):\n{report}");
    assert!(h.state["INBOX"].values().all(|r| r.subject.is_some()));
}

/// A sync sink that keeps the records and checks how their payload arrives.
#[derive(Default)]
struct PayloadSink {
    /// (record, payload was a reader, declared size, payload bytes)
    got: Vec<(crate::Record, bool, Option<u64>, Vec<u8>)>,
}

#[async_trait]
impl crate::ChangeSink for PayloadSink {
    async fn push(&mut self, change: crate::Change) -> crate::Result<()> {
        if let crate::Change::Upsert(mut r) = change {
            let payload = std::mem::replace(&mut r.payload, crate::Payload::Bytes(Vec::new()));
            let (reader, size) = match &payload {
                crate::Payload::Bytes(b) => (false, Some(b.len() as u64)),
                crate::Payload::Reader { size, .. } => (true, *size),
            };
            let bytes = payload.into_bytes().unwrap();
            self.got.push((r, reader, size, bytes));
        }
        Ok(())
    }
}

/// A large message in a Maildir or an `.eml` folder arrives as a reader of the
/// file, byte-exact, with its digest, headers and (cut) attachment described;
/// small ones stay in memory with full metadata.
#[tokio::test]
async fn large_files_are_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let big = testgen::big_attachment(40);
    let small = testgen::message(3, 1);
    let md = dir.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(md.join(sub)).unwrap();
    }
    std::fs::write(md.join("cur/1.big:2,S"), &big).unwrap();
    std::fs::write(md.join("cur/2.small:2,S"), &small).unwrap();
    let eml = dir.path().join("eml");
    std::fs::create_dir_all(&eml).unwrap();
    std::fs::write(eml.join("big.eml"), &big).unwrap();
    std::fs::write(eml.join("small.eml"), &small).unwrap();
    let connectors: Vec<Box<dyn Connector>> = vec![
        Box::new(MaildirConnector::new(MaildirConfig {
            name: "md".into(),
            path: md,
            stream_threshold_mib: None,
        })),
        Box::new(EmlFolderConnector::new(EmlFolderConfig {
            name: "eml".into(),
            path: eml,
            stream_threshold_mib: Some(8),
        })),
    ];
    for c in connectors {
        let coll = c.collections().await.unwrap().remove(0);
        let mut sink = PayloadSink::default();
        c.sync(&coll, None, &mut sink).await.unwrap();
        assert_eq!(sink.got.len(), 2, "{}", c.name());
        for (rec, reader, size, bytes) in &sink.got {
            let want = if rec.id.contains("big") { &big } else { &small };
            assert_eq!(bytes.len(), want.len());
            assert!(bytes == want, "{}: payload differs", rec.id);
            assert_eq!(*size, Some(want.len() as u64));
            assert_eq!(rec.meta["size"], want.len().to_string());
            assert_eq!(rec.meta["blake3"], blake3::hash(want).to_hex().to_string());
            assert!(!rec.meta.contains_key("warning"), "{:?}", rec.meta);
            if rec.id.contains("big") {
                assert!(reader, "{}: a 40 MiB message must be streamed", c.name());
                assert_eq!(rec.subject.as_deref(), Some("big attachment"));
                assert_eq!(rec.participants, ["big@example.org", "archive@example.org"]);
                assert_eq!(rec.meta["message_id"], "big@example.org");
                assert_eq!(rec.meta["parsed_bytes"], (1 << 20).to_string());
                assert_eq!(rec.text.as_deref().map(str::trim), Some("see attachment"));
                assert_eq!(rec.attachments.len(), 1);
                assert_eq!(rec.attachments[0].name, "big.bin");
                assert_eq!(rec.attachments[0].size, None, "cut by the parsed prefix");
            } else {
                assert!(!reader, "{}: small messages stay in memory", c.name());
                assert!(!rec.meta.contains_key("parsed_bytes"));
            }
        }
    }
}

#[test]
fn maildir_names_and_flags() {
    assert_eq!(
        maildir::split_name("123.M1P2.h,S=5:2,FS"),
        ("123.M1P2.h,S=5", "FS")
    );
    assert_eq!(maildir::split_name("123.M1P2.h"), ("123.M1P2.h", ""));
    assert_eq!(maildir::flag_names("SFR"), "\\Answered \\Flagged \\Seen");
}

// ----------------------------------------------------------- eml folder

struct EmlFixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
    next: u64,
    stream: Option<u64>,
}

impl EmlFixture {
    fn new() -> EmlFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("exported mail");
        std::fs::create_dir_all(root.join("2023/Q4")).unwrap();
        let mut fx = EmlFixture {
            root,
            _dir: dir,
            files: BTreeMap::new(),
            next: 0,
            stream: None,
        };
        for i in 0..10 {
            let rel = if i % 2 == 0 {
                format!("msg {i}.eml")
            } else {
                format!("2023/Q4/m{i}.EML")
            };
            fx.put(&rel);
        }
        std::fs::write(fx.root.join("notes.txt"), "not mail").unwrap();
        fx
    }
    fn put(&mut self, rel: &str) {
        let b = testgen::message(13, self.next);
        self.next += 1;
        std::fs::write(self.root.join(rel), &b).unwrap();
        self.files.insert(rel.to_string(), b);
    }
}

#[async_trait]
impl Fixture for EmlFixture {
    fn label(&self) -> String {
        "eml_folder".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        settle().await;
        Box::new(EmlFolderConnector::new(EmlFolderConfig {
            name: "eml".into(),
            path: self.root.clone(),
            stream_threshold_mib: self.stream,
        }))
    }
    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        let cid = crate::ids::collection_id("exported mail");
        t.collections.insert(
            cid.clone(),
            truth_of(
                &cid,
                self.files.iter().map(|(r, b)| (record_id(r), b.clone())),
            ),
        );
        t
    }
    async fn add(&mut self, n: usize) -> Expect {
        for _ in 0..n {
            let rel = format!("2023/new-{}.eml", self.next);
            self.put(&rel);
        }
        settle().await;
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let victims: Vec<String> = self.files.keys().take(n).cloned().collect();
        for r in victims {
            std::fs::remove_file(self.root.join(&r)).unwrap();
            self.files.remove(&r);
        }
        settle().await;
        Some(Expect {
            removed: n,
            ..Expect::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let victims: Vec<String> = self.files.keys().rev().take(n).cloned().collect();
        for r in victims {
            self.put(&r);
        }
        settle().await;
        Some(Expect {
            fetched: n,
            ..Expect::default()
        })
    }
}

#[tokio::test]
async fn eml_folder_conformance() {
    let mut fx = EmlFixture::new();
    let (report, _) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("eml_folder:\n{report}");
}

#[tokio::test]
async fn eml_folder_conformance_streamed() {
    let mut fx = EmlFixture::new();
    fx.stream = Some(0);
    let (report, _) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("eml_folder (streamed):\n{report}");
}

#[tokio::test]
async fn malformed_email_is_archived_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("odd");
    std::fs::create_dir(&root).unwrap();
    let mb = std::env::var("CUSTOS_TEST_BIG_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("broken.eml", testgen::broken_mime()),
        ("latin1.eml", testgen::invalid_utf8_headers()),
        ("big.eml", testgen::big_attachment(mb)),
        ("empty.eml", Vec::new()),
        ("garbage.eml", vec![0u8, 159, 146, 150, 255, 10, 13, 0]),
    ];
    for (n, b) in &cases {
        std::fs::write(root.join(n), b).unwrap();
    }
    std::fs::create_dir(root.join("empty folder")).unwrap();
    let conn = EmlFolderConnector::new(EmlFolderConfig {
        name: "odd".into(),
        path: root.clone(),
        stream_threshold_mib: None,
    });
    let mut h = Harness::new();
    h.sync_all(&conn).await.unwrap();
    let recs = &h.state["odd"];
    assert_eq!(recs.len(), cases.len());
    for (n, b) in &cases {
        assert_eq!(recs[&record_id(n)].digest, digest(b), "{n}");
    }
    assert!(recs["latin1.eml"].meta["warning"].contains("invalid_utf8_header"));
    assert!(recs["empty.eml"].meta["warning"].contains("empty_message"));
    assert_eq!(recs["big.eml"].attachments.len(), 1);
    if mb > 8 {
        // Streamed (over the 8 MiB default): the attachment is cut by the
        // parsed first MiB, so its size is unknown.
        assert_eq!(recs["big.eml"].attachments[0].2, None);
        assert_eq!(recs["big.eml"].meta["parsed_bytes"], (1 << 20).to_string());
    } else {
        assert!(recs["big.eml"].attachments[0].2.unwrap() > (mb as u64) << 19);
    }

    // An empty folder is an empty collection, not an error.
    let empty = EmlFolderConnector::new(EmlFolderConfig {
        name: "e".into(),
        path: root.join("empty folder"),
        stream_threshold_mib: None,
    });
    let mut h = Harness::new();
    let s = h.sync_all(&empty).await.unwrap();
    assert_eq!(s.fetched, 0);
    // A missing path is an error naming the path.
    let missing = EmlFolderConnector::new(EmlFolderConfig {
        name: "m".into(),
        path: root.join("nope"),
        stream_threshold_mib: None,
    });
    let e = missing.collections().await.unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
}

// --------------------------------------------------------- slack export

struct SlackFixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    /// channel → day → messages (exact JSON text of each element)
    days: BTreeMap<String, BTreeMap<String, Vec<(String, String)>>>,
    next: u64,
}

impl SlackFixture {
    fn msg_json(&mut self, text: &str) -> (String, String) {
        let i = self.next;
        self.next += 1;
        let ts = format!("{}.{:06}", 1_612_345_000 + i * 60, 100 + i);
        let user = ["U01ANA", "U02BRUNO", "U03BOT"][(i % 3) as usize];
        // Slack's own layout: 4-space indent, \/ escapes, \u escapes.
        let mut j = format!(
            "{{\n        \"client_msg_id\": \"c{i}\",\n        \"type\": \"message\",\n        \"text\": \"{text} <@U02BRUNO> caf\\u00e9 https:\\/\\/example.org\\/x\",\n        \"user\": \"{user}\",\n        \"ts\": \"{ts}\""
        );
        if i % 4 == 1 {
            j.push_str(&format!(
                ",\n        \"thread_ts\": \"{ts}\",\n        \"reply_count\": 1"
            ));
        }
        if i % 5 == 2 {
            j.push_str(",\n        \"files\": [\n            {\n                \"id\": \"F1\",\n                \"name\": \"contract.pdf\",\n                \"mimetype\": \"application\\/pdf\",\n                \"size\": 12345,\n                \"url_private\": \"https:\\/\\/files.slack.com\\/files-pri\\/T1-F1\\/contract.pdf\"\n            }\n        ]");
        }
        j.push_str("\n    }");
        (ts, j)
    }

    fn new() -> SlackFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("export");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(
            root.join("channels.json"),
            r#"[{"id":"C1","name":"general"},{"id":"C2","name":"support-é"},{"id":"C3","name":"quiet"}]"#,
        )
        .unwrap();
        std::fs::write(
            root.join("users.json"),
            r#"[{"id":"U01ANA","name":"ana","real_name":"Ana Silva","profile":{"email":"Ana@Example.org"}},{"id":"U02BRUNO","name":"bruno","profile":{}},{"id":"U03BOT","name":"bot","is_bot":true}]"#,
        )
        .unwrap();
        let mut fx = SlackFixture {
            _dir: dir,
            root,
            days: BTreeMap::new(),
            next: 0,
        };
        for (ch, days) in [("general", 3), ("support-é", 2)] {
            for d in 0..days {
                let day = format!("2021-02-0{}", d + 1);
                let msgs: Vec<_> = (0..4).map(|k| fx.msg_json(&format!("hello {k}"))).collect();
                fx.days
                    .entry(ch.to_string())
                    .or_default()
                    .insert(day.clone(), msgs);
                fx.write(ch, &day);
            }
        }
        std::fs::create_dir(fx.root.join("quiet")).unwrap();
        fx.days.insert("quiet".into(), BTreeMap::new());
        fx
    }

    fn write(&self, ch: &str, day: &str) {
        let msgs = &self.days[ch][day];
        let body = msgs
            .iter()
            .map(|(_, j)| format!("    {j}"))
            .collect::<Vec<_>>()
            .join(",\n");
        let dir = self.root.join(ch);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{day}.json")), format!("[\n{body}\n]")).unwrap();
    }
}

#[async_trait]
impl Fixture for SlackFixture {
    fn label(&self) -> String {
        "slack_export".into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        Box::new(SlackExportConnector::new(SlackExportConfig {
            name: "slack".into(),
            path: self.root.clone(),
        }))
    }
    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        for (ch, days) in &self.days {
            let cid = crate::ids::collection_id(ch);
            let recs = days
                .values()
                .flatten()
                .map(|(ts, j)| {
                    let attachments = j
                        .contains("contract.pdf")
                        .then(|| vec![("contract.pdf".to_string(), "application/pdf".to_string())])
                        .or(Some(Vec::new()));
                    (
                        ts.clone(),
                        TruthRecord {
                            digest: digest(j.as_bytes()),
                            meta: BTreeMap::from([("ts".to_string(), ts.clone())]),
                            attachments,
                        },
                    )
                })
                .collect();
            t.collections.insert(cid, recs);
        }
        t
    }
    async fn add(&mut self, n: usize) -> Expect {
        for k in 0..n {
            let m = self.msg_json(&format!("new {k}"));
            self.days
                .get_mut("general")
                .unwrap()
                .entry("2021-02-03".into())
                .or_default()
                .push(m);
        }
        self.write("general", "2021-02-03");
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        let day = self
            .days
            .get_mut("support-é")
            .unwrap()
            .get_mut("2021-02-01")
            .unwrap();
        for _ in 0..n {
            day.remove(0);
        }
        self.write("support-é", "2021-02-01");
        Some(Expect {
            removed: n,
            ..Expect::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        let day = self
            .days
            .get_mut("general")
            .unwrap()
            .get_mut("2021-02-02")
            .unwrap();
        for (_, j) in day.iter_mut().take(n) {
            *j = j.replacen("\"type\": \"message\"", "\"type\": \"message\",\n        \"edited\": {\"user\": \"U01ANA\", \"ts\": \"1612400000.000000\"}", 1);
        }
        self.write("general", "2021-02-02");
        Some(Expect {
            fetched: n,
            ..Expect::default()
        })
    }
}

#[tokio::test]
async fn slack_export_conformance() {
    let mut fx = SlackFixture::new();
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("slack_export:\n{report}");
    let general = &h.state["general"];
    let r = general
        .values()
        .find(|r| r.meta.get("user").map(String::as_str) == Some("U01ANA"))
        .unwrap();
    assert_eq!(r.kind, "chat_message");
    assert_eq!(r.payload_ext, "json");
    assert!(
        r.participants.contains(&"U01ANA".to_string())
            && r.participants.contains(&"ana".to_string())
    );
    assert!(r.participants.contains(&"bruno".to_string()), "mentions");
    assert_eq!(r.customer_ids, ["email:ana@example.org"]);
    assert_eq!(r.meta["user_name"], "Ana Silva");
    assert!(r.created.is_some());
    assert!(general.values().any(|r| r.meta.contains_key("thread_ts")));
    assert!(general.values().any(|r| r.meta.contains_key("edited_ts")));
    assert!(general.values().any(|r| r
        .meta
        .get("file_urls")
        .is_some_and(|u| u.contains("contract.pdf"))));
    assert!(h.state["quiet"].is_empty());
}

#[tokio::test]
async fn slack_bad_day_file_keeps_previous_records() {
    let mut fx = SlackFixture::new();
    let conn = fx.connector().await;
    let mut h = Harness::new();
    h.sync_all(&*conn).await.unwrap();
    let before = h.state.clone();
    std::fs::write(fx.root.join("general/2021-02-01.json"), "[{\"ts\": broken").unwrap();
    std::fs::write(
        fx.root.join("general/2021-02-09.json"),
        "[1, \"x\", {\"no_ts\": true}]",
    )
    .unwrap();
    let s = h.sync_all(&*conn).await.unwrap();
    assert_eq!(s.fetched, 0);
    assert_eq!(h.state, before);
    let _ = fx.truth().await;
}

// ------------------------------------------------------------ csv/jsonl

struct TableFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    jsonl: bool,
    header: String,
    rows: Vec<(String, String)>, // (id, raw line incl. \n)
    next: u64,
}

impl TableFixture {
    fn row(&mut self, tag: &str) -> (String, String) {
        let i = self.next;
        self.next += 1;
        let id = format!("T-{i}");
        let line = if self.jsonl {
            format!(
                "{{\"ticket\":{{\"id\":\"{id}\"}},\"created\":\"2024-03-0{} 10:00:00\",\"requester\":{{\"email\":\"User{i}@Example.org\"}},\"subject\":\"{tag} {i}\",\"body\":\"caf\\u00e9 \\\"quoted\\\"\"}}\n",
                1 + i % 9
            )
        } else {
            format!(
                "{id},2024-03-0{}T10:00:00Z,User{i}@Example.org,\"{tag} {i}, with comma\",\"line one\nline \"\"two\"\"\"\n",
                1 + i % 9
            )
        };
        (id, line)
    }

    fn new(jsonl: bool) -> TableFixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join(if jsonl { "posts.jsonl" } else { "tickets.csv" });
        let header = if jsonl {
            String::new()
        } else {
            "id,created_at,requester_email,subject,body\n".to_string()
        };
        let mut fx = TableFixture {
            _dir: dir,
            path,
            jsonl,
            header,
            rows: Vec::new(),
            next: 0,
        };
        for _ in 0..20 {
            let r = fx.row("ticket");
            fx.rows.push(r);
        }
        fx.write();
        fx
    }

    fn write(&self) {
        let mut s = self.header.clone();
        for (_, l) in &self.rows {
            s.push_str(l);
        }
        std::fs::write(&self.path, s).unwrap();
    }

    fn payload(&self, line: &str) -> Vec<u8> {
        if self.jsonl {
            line.trim_end_matches('\n').as_bytes().to_vec()
        } else {
            format!("{}{line}", self.header).into_bytes()
        }
    }
}

#[async_trait]
impl Fixture for TableFixture {
    fn label(&self) -> String {
        if self.jsonl { "jsonl" } else { "csv" }.into()
    }
    async fn connector(&self) -> Box<dyn Connector> {
        let cfg = if self.jsonl {
            crate::SourceConfig::Jsonl(JsonlConfig {
                name: "posts".into(),
                path: self.path.clone(),
                id_field: "ticket.id".into(),
                time_field: Some("created".into()),
                customer_fields: vec!["email:requester.email".into()],
                subject_field: Some("subject".into()),
                text_field: Some("body".into()),
                jurisdiction_field: None,
                kind: "social_post".into(),
            })
        } else {
            crate::SourceConfig::Csv(CsvConfig {
                name: "tickets".into(),
                path: self.path.clone(),
                id_column: "id".into(),
                time_column: Some("created_at".into()),
                customer_columns: vec!["email:requester_email".into()],
                subject_column: Some("subject".into()),
                text_column: Some("body".into()),
                jurisdiction_column: None,
                kind: "ticket".into(),
                delimiter: None,
            })
        };
        crate::build(&cfg).unwrap()
    }
    async fn truth(&mut self) -> Truth {
        let mut t = Truth::default();
        let stem = self
            .path
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        t.collections.insert(
            stem.clone(),
            truth_of(
                &stem,
                self.rows
                    .iter()
                    .map(|(id, l)| (id.clone(), self.payload(l))),
            ),
        );
        t
    }
    async fn add(&mut self, n: usize) -> Expect {
        let mut tail = String::new();
        for _ in 0..n {
            let r = self.row("added");
            tail.push_str(&r.1);
            self.rows.push(r);
        }
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .unwrap()
            .write_all(tail.as_bytes())
            .unwrap();
        Expect {
            fetched: n,
            ..Expect::default()
        }
    }
    async fn delete(&mut self, n: usize) -> Option<Expect> {
        for _ in 0..n {
            self.rows.remove(3);
        }
        self.write();
        Some(Expect {
            fetched: self.rows.len(),
            removed: n,
            reset: true,
            ..Expect::default()
        })
    }
    async fn edit(&mut self, n: usize) -> Option<Expect> {
        for (_, l) in self.rows.iter_mut().take(n) {
            *l = l.replacen("ticket ", "edited ", 1);
        }
        self.write();
        Some(Expect {
            fetched: self.rows.len(),
            reset: true,
            ..Expect::default()
        })
    }
}

#[tokio::test]
async fn csv_conformance() {
    let mut fx = TableFixture::new(false);
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("csv:\n{report}");
    let r = &h.state["tickets"]["T-0"];
    assert_eq!(r.kind, "ticket");
    assert_eq!(r.customer_ids, ["email:user0@example.org"]);
    assert_eq!(r.created.as_deref(), Some("2024-03-01T10:00:00+00:00"));
    assert_eq!(r.subject.as_deref(), Some("edited 0, with comma"));
    assert_eq!(r.payload_ext, "csv");
    assert_eq!(
        r.digest,
        digest(b"id,created_at,requester_email,subject,body\nT-0,2024-03-01T10:00:00Z,User0@Example.org,\"edited 0, with comma\",\"line one\nline \"\"two\"\"\"\n")
    );
}

#[tokio::test]
async fn jsonl_conformance() {
    let mut fx = TableFixture::new(true);
    let (report, h) = conformance::run_all(&mut fx, Plan::default()).await;
    println!("jsonl:\n{report}");
    let r = &h.state["posts"]["T-1"];
    assert_eq!(r.kind, "social_post");
    assert_eq!(r.customer_ids, ["email:user1@example.org"]);
    assert_eq!(r.created.as_deref(), Some("2024-03-02T10:00:00+00:00"));
    assert_eq!(r.payload_ext, "json");
}

#[tokio::test]
async fn table_exports_skip_rows_without_ids_and_never_fail_on_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("t.csv");
    std::fs::write(
        &csv_path,
        "\u{feff}id,who\n1,a@x.org\n,no-id\n2\n3,c@x.org,extra\n",
    )
    .unwrap();
    let c = CsvConnector::new(CsvConfig {
        name: "t".into(),
        path: csv_path,
        id_column: "id".into(),
        time_column: None,
        customer_columns: vec!["email:who".into()],
        subject_column: None,
        text_column: None,
        jurisdiction_column: None,
        kind: "ticket".into(),
        delimiter: None,
    })
    .unwrap();
    let mut h = Harness::new();
    h.sync_all(&c).await.unwrap();
    let recs = &h.state["t"];
    assert_eq!(recs.keys().cloned().collect::<Vec<_>>(), ["1", "2", "3"]);
    assert!(recs["2"].meta["warning"].starts_with("field_count"));
    let jl = dir.path().join("p.jsonl");
    std::fs::write(
        &jl,
        "{\"id\": 5}\nnot json\n\n{\"other\": 1}\n[1,2]\n{\"id\": \"a/b\"}\r\n",
    )
    .unwrap();
    let j = JsonlConnector::new(JsonlConfig {
        name: "p".into(),
        path: jl,
        id_field: "id".into(),
        time_field: None,
        customer_fields: vec![],
        subject_field: None,
        text_field: None,
        jurisdiction_field: None,
        kind: "social_post".into(),
    })
    .unwrap();
    let mut h = Harness::new();
    h.sync_all(&j).await.unwrap();
    let recs = &h.state["p"];
    assert_eq!(recs.len(), 2);
    assert_eq!(recs["a=2Fb"].digest, digest(b"{\"id\": \"a/b\"}"));
    // Missing id column: a named error, not a panic.
    let bad = CsvConnector::new(CsvConfig {
        name: "bad".into(),
        path: dir.path().join("t.csv"),
        id_column: "nope".into(),
        time_column: None,
        customer_columns: vec![],
        subject_column: None,
        text_column: None,
        jurisdiction_column: None,
        kind: "ticket".into(),
        delimiter: None,
    })
    .unwrap();
    let e = Harness::new().sync_all(&bad).await.unwrap_err().to_string();
    assert!(e.contains("nope") && e.contains("bad"), "{e}");
}

#[test]
fn time_parsing() {
    let t = |s: &str| parse_time(s).map(|t| t.to_rfc3339());
    assert_eq!(
        t("2024-03-01T10:00:00+02:00").as_deref(),
        Some("2024-03-01T08:00:00+00:00")
    );
    assert_eq!(
        t("2024-03-01 10:00:00").as_deref(),
        Some("2024-03-01T10:00:00+00:00")
    );
    assert_eq!(
        t("2024-03-01").as_deref(),
        Some("2024-03-01T00:00:00+00:00")
    );
    assert_eq!(
        t("1700000000").as_deref(),
        Some("2023-11-14T22:13:20+00:00")
    );
    assert_eq!(
        t("1700000000000").as_deref(),
        Some("2023-11-14T22:13:20+00:00")
    );
    assert_eq!(t("soon"), None);
    assert!(parse_customer_specs(&["email:x".into(), "phone:y".into()]).is_ok());
    assert!(parse_customer_specs(&["x".into()]).is_err());
    assert_eq!(
        customer_id("phone", "+351 912-345 678").as_deref(),
        Some("phone:+351912345678")
    );
}

/// A real mbox from the shared corpus, when present (`../shared/corpus/email/`).
#[tokio::test]
#[ignore = "needs ../shared/corpus/email (run with --ignored)"]
async fn shared_corpus_mbox() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/email");
    let Ok(users) = std::fs::read_dir(&root) else {
        println!("no {}", root.display());
        return;
    };
    for u in users.flatten().take(3) {
        let conn = MboxConnector::new(MboxConfig {
            name: "corpus".into(),
            path: u.path(),
            stream_threshold_mib: None,
        });
        let Ok(colls) = conn.collections().await else {
            continue;
        };
        let mut h = Harness::new();
        let t = std::time::Instant::now();
        let s = h.sync_all(&conn).await.unwrap();
        println!(
            "{}: {} collections, {} messages, {} bytes in {:.2}s",
            u.path().display(),
            colls.len(),
            s.fetched,
            s.bytes,
            t.elapsed().as_secs_f64()
        );
        let s2 = h.sync_all(&conn).await.unwrap();
        assert_eq!(s2.fetched, 0);
    }
}

#[tokio::test]
async fn table_exports_take_the_jurisdiction_from_a_field_or_column() {
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("t.csv");
    std::fs::write(&csv_path, "id,country\n1,DE\n2, \n3,us\n").unwrap();
    let c = CsvConnector::new(CsvConfig {
        name: "t".into(),
        path: csv_path,
        id_column: "id".into(),
        time_column: None,
        customer_columns: vec![],
        subject_column: None,
        text_column: None,
        jurisdiction_column: Some("country".into()),
        kind: "ticket".into(),
        delimiter: None,
    })
    .unwrap();
    let mut h = Harness::new();
    h.sync_all(&c).await.unwrap();
    let jur = |id: &str| h.state["t"][id].jurisdiction.clone();
    assert_eq!(jur("1").as_deref(), Some("DE"));
    assert_eq!(jur("2"), None, "a blank cell is no jurisdiction");
    assert_eq!(jur("3").as_deref(), Some("us"));

    let jl = dir.path().join("p.jsonl");
    std::fs::write(
        &jl,
        "{\"id\": 1, \"user\": {\"region\": \"FR\"}}\n{\"id\": 2, \"user\": {}}\n",
    )
    .unwrap();
    let j = JsonlConnector::new(JsonlConfig {
        name: "p".into(),
        path: jl,
        id_field: "id".into(),
        time_field: None,
        customer_fields: vec![],
        subject_field: None,
        text_field: None,
        jurisdiction_field: Some("user.region".into()),
        kind: "chat_message".into(),
    })
    .unwrap();
    let mut h = Harness::new();
    h.sync_all(&j).await.unwrap();
    assert_eq!(h.state["p"]["1"].jurisdiction.as_deref(), Some("FR"));
    assert_eq!(h.state["p"]["2"].jurisdiction, None);
}
