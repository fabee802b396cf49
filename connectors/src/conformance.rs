//! The connector conformance suite (for tests; hidden from the docs).
//!
//! Like object_store's integration functions: every connector's tests build a
//! [`Fixture`] (a small driver that can read the truth from the source and
//! mutate it: add, delete, edit, change validity) and run [`run_all`], which
//! checks, as far as the connector's [`Capabilities`] declare them:
//!
//! 1. full sync: the synced state equals the source's truth — same
//!    collections, same ids, payload digests byte-identical, checked metadata;
//!    every record id in the id alphabet, `collection` = the synced collection;
//! 2. incremental sync returns only changes: a sync with nothing changed
//!    fetches no body, removes nothing; after adding N, exactly the expected
//!    bodies are fetched;
//! 3. the cursor survives a restart: cursors go through JSON text and a NEW
//!    connector instance continues from them;
//! 4. an invalid cursor (garbage, wrong type, another collection's cursor) →
//!    `Change::Reset` + full listing, final state identical;
//! 5. deletions reported (when declared), with the expected count;
//! 6. edits / metadata updates (when declared): `UpdateMeta` count and the
//!    new metadata, or re-fetched bodies;
//! 7. attachments described (name, media type, size) and, when streamed,
//!    their content readable with the declared size;
//! 8. an interrupted sync (the sink fails after K changes) leaves the stored
//!    state and cursor untouched, and the rerun from the old cursor reaches
//!    the truth with no duplicate;
//! 9. a validity change (IMAP UIDVALIDITY) → Reset, nothing duplicated or lost;
//! 10. refused credentials → `ConnectorError::Auth` naming the source.
//!
//! The [`Harness`] stands in for custos: an in-memory [`ChangeSink`] that
//! stages one collection's changes and commits them with the new cursor only
//! when the sync succeeds (as custos commits records and cursor in one
//! snapshot), counting fetched bodies, metadata updates, deletions and resets.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::ids::is_valid_record_id;
use crate::{
    Capabilities, Change, ChangeSink, Collection, Connector, ConnectorError, Cursor, Payload,
    Result,
};

/// Hex BLAKE3 digest of `bytes` (the suite's payload identity).
pub fn digest(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// One record as the harness stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// BLAKE3 of the payload bytes.
    pub digest: String,
    /// Payload size.
    pub size: u64,
    /// Record kind name.
    pub kind: String,
    /// Payload file extension.
    pub payload_ext: String,
    /// Metadata (after `UpdateMeta` merges).
    pub meta: BTreeMap<String, String>,
    /// Subject.
    pub subject: Option<String>,
    /// Participants.
    pub participants: Vec<String>,
    /// Customer ids.
    pub customer_ids: Vec<String>,
    /// Created time (RFC 3339).
    pub created: Option<String>,
    /// Jurisdiction code the connector gave.
    pub jurisdiction: Option<String>,
    /// Attachments: (name, media type, declared size, streamed content length).
    pub attachments: Vec<(String, String, Option<u64>, Option<u64>)>,
}

/// Counters of one or more syncs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// `Upsert`s, i.e. record bodies fetched.
    pub fetched: usize,
    /// Payload bytes fetched.
    pub bytes: u64,
    /// `UpdateMeta`s.
    pub meta_updates: usize,
    /// Explicit `Delete`s.
    pub deletes: usize,
    /// Records dropped because a `Reset` listing did not mention them.
    pub dropped_by_reset: usize,
    /// `Keep`s.
    pub keeps: usize,
    /// `Reset`s.
    pub resets: usize,
    /// Ids upserted more than once within one collection sync.
    pub duplicate_upserts: usize,
}

impl SyncStats {
    /// Records removed, explicitly or by a reset listing.
    pub fn removed(&self) -> usize {
        self.deletes + self.dropped_by_reset
    }

    fn add(&mut self, o: &SyncStats) {
        self.fetched += o.fetched;
        self.bytes += o.bytes;
        self.meta_updates += o.meta_updates;
        self.deletes += o.deletes;
        self.dropped_by_reset += o.dropped_by_reset;
        self.keeps += o.keeps;
        self.resets += o.resets;
        self.duplicate_upserts += o.duplicate_upserts;
    }
}

/// What one mutation of the source should look like in the next sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expect {
    /// Bodies the next sync must fetch.
    pub fetched: usize,
    /// Records it must remove (deletes + dropped by a reset).
    pub removed: usize,
    /// `UpdateMeta`s it must send.
    pub meta_updates: usize,
    /// Whether it must send a `Reset`.
    pub reset: bool,
}

/// The source's truth, as the fixture reads it (not through the connector).
#[derive(Debug, Clone, Default)]
pub struct Truth {
    /// collection id → record id → expected record.
    pub collections: BTreeMap<String, BTreeMap<String, TruthRecord>>,
}

impl Truth {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.collections.values().map(|c| c.len()).sum()
    }

    /// True when there is no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One expected record.
#[derive(Debug, Clone, Default)]
pub struct TruthRecord {
    /// BLAKE3 of the exact payload bytes.
    pub digest: String,
    /// Metadata entries that must be present with these values.
    pub meta: BTreeMap<String, String>,
    /// When set: the attachments, as (name, media type).
    pub attachments: Option<Vec<(String, String)>>,
}

/// A connector's test driver: builds connectors and reads/mutates the source.
#[async_trait]
pub trait Fixture: Send + Sync {
    /// Label for messages (`imap`, `mbox` …).
    fn label(&self) -> String;
    /// A NEW connector instance on the source (each call a fresh one).
    async fn connector(&self) -> Box<dyn Connector>;
    /// A connector whose credentials the source refuses (`None`: no credentials).
    async fn bad_auth_connector(&self) -> Option<Box<dyn Connector>> {
        None
    }
    /// The truth, read from the source directly.
    async fn truth(&mut self) -> Truth;
    /// Add `n` records; what the next sync must show.
    async fn add(&mut self, n: usize) -> Expect;
    /// Delete `n` records (`None`: not supported by the fixture).
    async fn delete(&mut self, n: usize) -> Option<Expect>;
    /// Edit `n` records (flags, content); `None`: not supported.
    async fn edit(&mut self, n: usize) -> Option<Expect>;
    /// Change the source's validity (IMAP UIDVALIDITY); `None`: not applicable.
    async fn change_validity(&mut self) -> Option<Expect> {
        None
    }
}

/// The stand-in for custos: committed state and cursors per collection.
#[derive(Debug, Default, Clone)]
pub struct Harness {
    /// collection id → record id → record.
    pub state: BTreeMap<String, BTreeMap<String, StoredRecord>>,
    /// collection id → cursor of the last successful sync.
    pub cursors: BTreeMap<String, Cursor>,
    /// Contract violations seen (Keep/Delete/UpdateMeta of unknown ids, bad ids).
    pub anomalies: Vec<String>,
}

struct StagingSink {
    collection: String,
    records: BTreeMap<String, StoredRecord>,
    seen: Option<BTreeSet<String>>,
    upserted: BTreeSet<String>,
    stats: SyncStats,
    fail_after: Option<usize>,
    pushed: usize,
    anomalies: Vec<String>,
}

fn read_payload(p: Payload) -> std::io::Result<Vec<u8>> {
    p.into_bytes()
}

#[async_trait]
impl ChangeSink for StagingSink {
    async fn push(&mut self, change: Change) -> Result<()> {
        if self.fail_after.is_some_and(|n| self.pushed >= n) {
            return Err(ConnectorError::Sink(format!(
                "injected sink failure after {} changes",
                self.pushed
            )));
        }
        self.pushed += 1;
        match change {
            Change::Upsert(r) => {
                if !is_valid_record_id(&r.id) {
                    self.anomalies.push(format!("bad record id {:?}", r.id));
                }
                if r.collection != self.collection {
                    self.anomalies.push(format!(
                        "record {} says collection {:?}, synced {:?}",
                        r.id, r.collection, self.collection
                    ));
                }
                let payload = read_payload(r.payload)
                    .map_err(|e| ConnectorError::Sink(format!("payload of {}: {e}", r.id)))?;
                let mut attachments = Vec::new();
                for a in r.attachments {
                    let streamed = match a.content {
                        Some(c) => Some(
                            read_payload(c)
                                .map_err(|e| {
                                    ConnectorError::Sink(format!("attachment of {}: {e}", r.id))
                                })?
                                .len() as u64,
                        ),
                        None => None,
                    };
                    attachments.push((a.name, a.media_type, a.size, streamed));
                }
                self.stats.fetched += 1;
                self.stats.bytes += payload.len() as u64;
                if !self.upserted.insert(r.id.clone()) {
                    self.stats.duplicate_upserts += 1;
                }
                if let Some(seen) = &mut self.seen {
                    seen.insert(r.id.clone());
                }
                self.records.insert(
                    r.id,
                    StoredRecord {
                        digest: digest(&payload),
                        size: payload.len() as u64,
                        kind: r.kind.as_str().to_string(),
                        payload_ext: r.payload_ext,
                        meta: r.meta,
                        subject: r.subject,
                        participants: r.participants,
                        customer_ids: r.customer_ids,
                        created: r.created.map(|c| c.to_rfc3339()),
                        jurisdiction: r.jurisdiction,
                        attachments,
                    },
                );
            }
            Change::UpdateMeta { id, meta } => {
                self.stats.meta_updates += 1;
                match self.records.get_mut(&id) {
                    Some(rec) => rec.meta.extend(meta),
                    None => self.anomalies.push(format!("UpdateMeta of unknown {id}")),
                }
            }
            Change::Delete { id } => {
                self.stats.deletes += 1;
                if self.records.remove(&id).is_none() {
                    self.anomalies.push(format!("Delete of unknown {id}"));
                }
            }
            Change::Keep { id } => {
                self.stats.keeps += 1;
                if !self.records.contains_key(&id) {
                    self.anomalies.push(format!("Keep of unknown {id}"));
                }
                if let Some(seen) = &mut self.seen {
                    seen.insert(id);
                }
            }
            Change::Reset => {
                self.stats.resets += 1;
                self.seen = Some(BTreeSet::new());
            }
        }
        Ok(())
    }
}

impl Harness {
    /// A harness with nothing stored.
    pub fn new() -> Harness {
        Harness::default()
    }

    /// Sync one collection from its stored cursor; commit on success only.
    /// `fail_after`: the sink fails once it took that many changes.
    pub async fn sync_collection(
        &mut self,
        conn: &dyn Connector,
        coll: &Collection,
        fail_after: Option<usize>,
    ) -> Result<SyncStats> {
        let mut sink = StagingSink {
            collection: coll.id.clone(),
            records: self.state.get(&coll.id).cloned().unwrap_or_default(),
            seen: None,
            upserted: BTreeSet::new(),
            stats: SyncStats::default(),
            fail_after,
            pushed: 0,
            anomalies: Vec::new(),
        };
        let cursor = self.cursors.get(&coll.id).cloned();
        let new_cursor = conn.sync(coll, cursor.as_ref(), &mut sink).await?;
        if let Some(seen) = sink.seen.take() {
            let before = sink.records.len();
            sink.records.retain(|id, _| seen.contains(id));
            sink.stats.dropped_by_reset += before - sink.records.len();
        }
        // The cursor is stored as JSON text by custos: it must survive that.
        let text = serde_json::to_string(&new_cursor).expect("cursor serializes");
        let cursor: Cursor = serde_json::from_str(&text).expect("cursor parses back");
        self.cursors.insert(coll.id.clone(), cursor);
        self.state.insert(coll.id.clone(), sink.records);
        self.anomalies.extend(
            sink.anomalies
                .into_iter()
                .map(|a| format!("{}/{}: {a}", conn.name(), coll.id)),
        );
        Ok(sink.stats)
    }

    /// Sync every collection the connector lists.
    pub async fn sync_all(&mut self, conn: &dyn Connector) -> Result<SyncStats> {
        let mut total = SyncStats::default();
        for coll in conn.collections().await? {
            let s = self.sync_collection(conn, &coll, None).await?;
            total.add(&s);
        }
        Ok(total)
    }

    /// Number of stored records.
    pub fn len(&self) -> usize {
        self.state.values().map(|c| c.len()).sum()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Panic unless the stored state equals `truth` (ids, digests, checked meta,
    /// attachments) and no anomaly was seen.
    pub fn assert_matches(&self, truth: &Truth, ctx: &str) {
        assert!(
            self.anomalies.is_empty(),
            "{ctx}: contract violations: {:?}",
            &self.anomalies[..self.anomalies.len().min(10)]
        );
        for (cid, recs) in &self.state {
            if !truth.collections.contains_key(cid) {
                assert!(recs.is_empty(), "{ctx}: unexpected collection {cid}");
            }
        }
        for (cid, want) in &truth.collections {
            let empty = BTreeMap::new();
            let got = self.state.get(cid).unwrap_or(&empty);
            let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
            let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{ctx}: collection {cid}: {} stored, {} expected; missing {:?}, extra {:?}",
                got.len(),
                want.len(),
                &missing[..missing.len().min(5)],
                &extra[..extra.len().min(5)]
            );
            for (id, w) in want {
                let g = &got[id];
                assert_eq!(g.digest, w.digest, "{ctx}: {cid}/{id}: payload differs");
                for (k, v) in &w.meta {
                    assert_eq!(
                        g.meta.get(k),
                        Some(v),
                        "{ctx}: {cid}/{id}: meta {k} (stored meta {:?})",
                        g.meta
                    );
                }
                if let Some(atts) = &w.attachments {
                    let got_atts: Vec<(String, String)> = g
                        .attachments
                        .iter()
                        .map(|a| (a.0.clone(), a.1.clone()))
                        .collect();
                    assert_eq!(&got_atts, atts, "{ctx}: {cid}/{id}: attachments");
                }
            }
        }
    }
}

fn check_expect(label: &str, step: &str, got: &SyncStats, want: &Expect, caps: &Capabilities) {
    assert_eq!(
        got.fetched, want.fetched,
        "{label} {step}: bodies fetched ({got:?})"
    );
    assert_eq!(
        got.removed(),
        want.removed,
        "{label} {step}: removed ({got:?})"
    );
    if caps.metadata_updates {
        assert_eq!(
            got.meta_updates, want.meta_updates,
            "{label} {step}: metadata updates ({got:?})"
        );
    }
    if want.reset {
        assert!(got.resets > 0, "{label} {step}: expected a Reset ({got:?})");
    }
    assert_eq!(
        got.duplicate_upserts, 0,
        "{label} {step}: duplicates ({got:?})"
    );
}

/// Timings and counters of a suite run (printed by the tests).
#[derive(Debug, Default, Clone)]
pub struct SuiteReport {
    /// (step, duration, stats) in order.
    pub steps: Vec<(String, Duration, SyncStats)>,
}

impl SuiteReport {
    fn push(&mut self, step: &str, t: Instant, s: SyncStats) {
        self.steps.push((step.to_string(), t.elapsed(), s));
    }
}

impl std::fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (step, d, s) in &self.steps {
            writeln!(
                f,
                "  {step:<28} {:>8.3}s fetched={} bytes={} meta={} removed={} keeps={} resets={}",
                d.as_secs_f64(),
                s.fetched,
                s.bytes,
                s.meta_updates,
                s.removed(),
                s.keeps,
                s.resets
            )?;
        }
        Ok(())
    }
}

/// 1. Full sync from no cursor equals the truth.
pub async fn full_sync(fx: &mut dyn Fixture, report: &mut SuiteReport) -> Harness {
    let label = fx.label();
    let conn = fx.connector().await;
    let truth = fx.truth().await;
    let mut h = Harness::new();
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} full sync: {e}"));
    report.push("full sync", t, s);
    assert_eq!(s.fetched, truth.len(), "{label} full sync: bodies fetched");
    h.assert_matches(&truth, &format!("{label} full sync"));
    h
}

/// 2. Nothing changed → nothing fetched; add `n` → exactly the expected changes.
pub async fn incremental_only_changes(
    fx: &mut dyn Fixture,
    h: &mut Harness,
    n: usize,
    report: &mut SuiteReport,
) {
    let label = fx.label();
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} no-op sync: {e}"));
    report.push("no-op incremental", t, s);
    check_expect(&label, "no-op sync", &s, &Expect::default(), &caps);
    let want = fx.add(n).await;
    let truth = fx.truth().await;
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} add sync: {e}"));
    report.push(&format!("add {n}"), t, s);
    check_expect(&label, &format!("after adding {n}"), &s, &want, &caps);
    h.assert_matches(&truth, &format!("{label} after adding {n}"));
}

/// 3. Cursors go through JSON text; a new connector instance continues.
pub async fn cursor_survives_restart(
    fx: &mut dyn Fixture,
    h: &mut Harness,
    n: usize,
    report: &mut SuiteReport,
) {
    let label = fx.label();
    let text: BTreeMap<String, String> = h
        .cursors
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_string(v).unwrap()))
        .collect();
    let mut restarted = Harness {
        state: h.state.clone(),
        cursors: text
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_str(v).unwrap()))
            .collect(),
        anomalies: Vec::new(),
    };
    let want = fx.add(n).await;
    let truth = fx.truth().await;
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    let t = Instant::now();
    let s = restarted
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} sync after restart: {e}"));
    report.push("restart + add", t, s);
    check_expect(&label, "after restart", &s, &want, &caps);
    restarted.assert_matches(&truth, &format!("{label} after restart"));
    *h = restarted;
}

/// 4. Garbage, wrongly typed and foreign cursors → Reset + full listing, same state.
pub async fn invalid_cursor_resync(
    fx: &mut dyn Fixture,
    h: &mut Harness,
    report: &mut SuiteReport,
) {
    let label = fx.label();
    let conn = fx.connector().await;
    let truth = fx.truth().await;
    let colls = conn.collections().await.expect("collections");
    let foreign: Vec<Cursor> = h.cursors.values().cloned().collect();
    let mut bad: Vec<Cursor> = vec![
        serde_json::json!({"garbage": true}),
        serde_json::json!(42),
        serde_json::json!("not a cursor"),
        serde_json::Value::Null,
        serde_json::json!({"v": 999}),
    ];
    let t = Instant::now();
    let mut total = SyncStats::default();
    for (i, coll) in colls.iter().enumerate() {
        // Each collection gets one kind of bad cursor; with one collection, all kinds.
        let mut tries: Vec<Cursor> = if colls.len() == 1 {
            std::mem::take(&mut bad)
        } else {
            vec![bad[i % bad.len()].clone()]
        };
        if let Some(f) = foreign.iter().find(|c| Some(*c) != h.cursors.get(&coll.id)) {
            tries.push(f.clone());
        }
        for c in tries {
            h.cursors.insert(coll.id.clone(), c.clone());
            let s = h
                .sync_collection(&*conn, coll, None)
                .await
                .unwrap_or_else(|e| panic!("{label} {}: bad cursor {c}: {e}", coll.id));
            let n = h.state.get(&coll.id).map_or(0, |r| r.len());
            assert!(
                s.resets > 0 || n == 0,
                "{label} {}: cursor {c} did not reset ({s:?})",
                coll.id
            );
            total.add(&s);
            h.assert_matches(&truth, &format!("{label} {} after bad cursor {c}", coll.id));
        }
    }
    report.push("invalid cursors", t, total);
}

/// 5. Deletions (when declared).
pub async fn deletions(fx: &mut dyn Fixture, h: &mut Harness, m: usize, report: &mut SuiteReport) {
    let label = fx.label();
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    if !caps.reports_deletions {
        return;
    }
    let Some(want) = fx.delete(m).await else {
        return;
    };
    let truth = fx.truth().await;
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} delete sync: {e}"));
    report.push(&format!("delete {m}"), t, s);
    check_expect(&label, &format!("after deleting {m}"), &s, &want, &caps);
    h.assert_matches(&truth, &format!("{label} after deleting {m}"));
}

/// 6. Edits / metadata updates (when declared).
pub async fn edits(fx: &mut dyn Fixture, h: &mut Harness, k: usize, report: &mut SuiteReport) {
    let label = fx.label();
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    if !(caps.reports_edits || caps.metadata_updates) {
        return;
    }
    let Some(want) = fx.edit(k).await else { return };
    let truth = fx.truth().await;
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} edit sync: {e}"));
    report.push(&format!("edit {k}"), t, s);
    check_expect(&label, &format!("after editing {k}"), &s, &want, &caps);
    h.assert_matches(&truth, &format!("{label} after editing {k}"));
}

/// 7. Attachments described, and streamed ones readable at their declared size.
pub fn attachments(label: &str, caps: &Capabilities, h: &Harness) {
    if !caps.has_attachments {
        return;
    }
    let mut n = 0;
    for recs in h.state.values() {
        for (id, r) in recs {
            for (name, media_type, size, streamed) in &r.attachments {
                n += 1;
                assert!(
                    media_type.contains('/'),
                    "{label} {id}: attachment {name:?} media type {media_type:?}"
                );
                if let (Some(size), Some(streamed)) = (size, streamed) {
                    assert_eq!(size, streamed, "{label} {id}: attachment {name:?} size");
                }
            }
        }
    }
    assert!(
        n > 0,
        "{label}: declares attachments but the fixture produced none"
    );
}

/// 8. A sync interrupted after `k` changes commits nothing; the rerun from
///    the old cursor reaches the truth without duplicates.
pub async fn interrupted_sync(
    fx: &mut dyn Fixture,
    h: &mut Harness,
    n: usize,
    k: usize,
    report: &mut SuiteReport,
) {
    let label = fx.label();
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    let want = fx.add(n).await;
    let truth = fx.truth().await;
    let before = h.clone();
    let mut failed = 0;
    for coll in conn.collections().await.expect("collections") {
        match h.sync_collection(&*conn, &coll, Some(k)).await {
            Err(ConnectorError::Sink(_)) => failed += 1,
            Err(e) => panic!(
                "{label} interrupted sync of {}: unexpected error {e}",
                coll.id
            ),
            Ok(_) => {}
        }
    }
    assert!(
        failed > 0,
        "{label}: no sync was interrupted (k={k}, n={n})"
    );
    for (cid, recs) in &before.state {
        if h.cursors.get(cid) != before.cursors.get(cid) {
            continue; // that collection's sync finished before K changes
        }
        assert_eq!(
            h.state.get(cid),
            Some(recs),
            "{label}: failed sync changed {cid}"
        );
    }
    // The rerun uses a new connector (the process was killed).
    let conn = fx.connector().await;
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} rerun: {e}"));
    report.push("rerun after interruption", t, s);
    assert!(
        s.fetched <= want.fetched,
        "{label} rerun fetched too much: {s:?}"
    );
    assert_eq!(s.duplicate_upserts, 0, "{label} rerun duplicates");
    let _ = caps;
    h.assert_matches(&truth, &format!("{label} after interrupted sync + rerun"));
}

/// 9. Validity change (when the fixture can make one) → Reset, no dup, no loss.
pub async fn validity_change(fx: &mut dyn Fixture, h: &mut Harness, report: &mut SuiteReport) {
    let label = fx.label();
    let Some(want) = fx.change_validity().await else {
        return;
    };
    let conn = fx.connector().await;
    let caps = conn.capabilities();
    let truth = fx.truth().await;
    let t = Instant::now();
    let s = h
        .sync_all(&*conn)
        .await
        .unwrap_or_else(|e| panic!("{label} validity sync: {e}"));
    report.push("validity change", t, s);
    check_expect(&label, "after validity change", &s, &want, &caps);
    assert_eq!(
        h.len(),
        truth.len(),
        "{label}: record count after validity change"
    );
    h.assert_matches(&truth, &format!("{label} after validity change"));
}

/// 10. Refused credentials → `ConnectorError::Auth` naming the source.
pub async fn auth_failure(fx: &mut dyn Fixture) {
    let label = fx.label();
    let Some(conn) = fx.bad_auth_connector().await else {
        return;
    };
    let name = conn.name().to_string();
    for (what, r) in [
        ("check", conn.check().await.map(|_| ())),
        ("collections", conn.collections().await.map(|_| ())),
    ] {
        match r {
            Err(ConnectorError::Auth { source_name, .. }) => {
                assert_eq!(source_name, name, "{label} {what}: Auth names the source")
            }
            other => panic!("{label} {what} with bad credentials: {other:?}"),
        }
    }
}

/// Sizes used by [`run_all`].
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Records added in the incremental step.
    pub add: usize,
    /// Records added before the restart step.
    pub add_after_restart: usize,
    /// Records deleted.
    pub delete: usize,
    /// Records edited / flagged.
    pub edit: usize,
    /// Records added before the interrupted sync.
    pub add_interrupted: usize,
    /// The sink fails after this many changes.
    pub fail_after: usize,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            add: 5,
            add_after_restart: 3,
            delete: 2,
            edit: 2,
            add_interrupted: 6,
            fail_after: 3,
        }
    }
}

/// Run the whole suite in order on one fixture; returns the timings and the
/// harness (synced to the truth) for connector-specific steps.
pub async fn run_all(fx: &mut dyn Fixture, plan: Plan) -> (SuiteReport, Harness) {
    let mut report = SuiteReport::default();
    auth_failure(fx).await;
    let mut h = full_sync(fx, &mut report).await;
    let caps = fx.connector().await.capabilities();
    attachments(&fx.label(), &caps, &h);
    incremental_only_changes(fx, &mut h, plan.add, &mut report).await;
    cursor_survives_restart(fx, &mut h, plan.add_after_restart, &mut report).await;
    deletions(fx, &mut h, plan.delete, &mut report).await;
    edits(fx, &mut h, plan.edit, &mut report).await;
    interrupted_sync(
        fx,
        &mut h,
        plan.add_interrupted,
        plan.fail_after,
        &mut report,
    )
    .await;
    invalid_cursor_resync(fx, &mut h, &mut report).await;
    validity_change(fx, &mut h, &mut report).await;
    (report, h)
}
