//! `restore-verify`: the disaster-recovery test, and `verify-history`.
//!
//! For every target on its own (no fallback to another target, no cache),
//! the latest snapshot of each source (or one chosen snapshot) is restored
//! into a scratch directory with [`crate::restore::restore`], which
//! authenticates every blob and compares every file with the digest recorded
//! at backup. The snapshot's tree is then walked again and every restored
//! file, record and attachment is checked independently: it exists, has the
//! recorded size, and hashes (keyed digest) to the recorded digest. Counts
//! are compared with the snapshot: files and bytes with the summary of a
//! directory snapshot; per collection, the records found with the
//! collection's `records` count, and their sum with `records_total`.
//!
//! `--sample N%` restores a random N% of the files or records plus the
//! newest ones (include patterns of literal paths), so a large repository can
//! be spot-checked often; it reports throughput and an *estimated* full
//! restore time, never an RTO verdict. Restore time and throughput are
//! measured on the restore phase; the newest snapshot's age is compared with
//! the source's RPO, a full restore's time with its RTO.
//!
//! With `against_source`, N random records of a record source are fetched
//! live through the connector and their payload digests compared with the
//! snapshot; records changed at the source after the snapshot, or gone from
//! it, are reported apart from real mismatches.
//!
//! Each target's result is sealed into a `verifications/<id>` object, written
//! to every target like any object (it names the target it verified);
//! [`history`] lists them.
//! Memory stays bounded: restore streams, and the check walks one directory
//! at a time (a sample holds only the sampled nodes).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::crypto::Keys;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::repo::Repository;
use crate::restore::{self, RestoreOptions};
use crate::settings::SourceSettings;
use crate::snapshot::{self, SnapshotEntry};
use crate::target::TargetRef;
use crate::tree::{Node, NodeKind};

/// Failures listed per snapshot; more are counted in `failures_omitted`.
pub const MAX_FAILURES: usize = 1000;
/// A sample always includes this many of the newest files or records.
pub const SAMPLE_NEWEST: usize = 10;
/// Files checked per batch (hashed in parallel).
const VERIFY_BATCH: usize = 1024;

/// What to verify.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// This snapshot (id, prefix or `latest`) instead of the latest of each source.
    pub snapshot: Option<String>,
    /// Only these sources (empty: every source with snapshots, and every configured one).
    pub sources: Vec<String>,
    /// Restore only this share (percent, 0 < p ≤ 100) of files/records plus the newest ones.
    pub sample_percent: Option<f64>,
    /// Where scratch directories go (default: the system temporary directory).
    pub scratch: Option<PathBuf>,
    /// Leave the restored files in place.
    pub keep_scratch: bool,
    /// RPO for every source (overrides the configured ones).
    pub rpo: Option<Duration>,
    /// RTO for every source (overrides the configured ones).
    pub rto: Option<Duration>,
    /// The configured sources: objectives, connectors, and which sources must have a snapshot.
    pub configured: Vec<SourceSettings>,
    /// Re-fetch this many random records of each record source live and compare.
    pub against_source: Option<usize>,
}

impl VerifyOptions {
    fn objectives(&self, source: &str) -> (Option<Duration>, Option<Duration>) {
        let conf = self.configured.iter().find(|s| s.name() == source);
        (
            self.rpo.or_else(|| conf.and_then(SourceSettings::rpo)),
            self.rto.or_else(|| conf.and_then(SourceSettings::rto)),
        )
    }
}

/// Parse `10%` or `10` into a percentage in (0, 100].
pub fn parse_percent(flag: &str, v: &str) -> Result<f64> {
    let pct: f64 = v
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| Error::Invalid(format!("{flag} {v:?}: give a percentage like 10%")))?;
    if !(pct > 0.0 && pct <= 100.0) {
        return Err(Error::Invalid(format!("{flag} {v:?}: must be in (0, 100]")));
    }
    Ok(pct)
}

/// One thing that did not verify.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// `restore`, `missing`, `size`, `digest`, `symlink`, `tree`, `count`,
    /// `rpo`, `rto`, `snapshot`, `index`, `target`, `source`, `source_digest`.
    pub kind: String,
    /// Path inside the snapshot (`/mail/inbox/1.eml`), when it concerns one entry.
    pub path: Option<String>,
    /// Record id, when it concerns a record.
    pub record_id: Option<String>,
    /// What differed (names objects, never content).
    pub detail: String,
}

impl Failure {
    fn new(kind: &str, detail: impl Into<String>) -> Failure {
        Failure {
            kind: kind.into(),
            path: None,
            record_id: None,
            detail: detail.into(),
        }
    }

    fn at(kind: &str, rel: &str, node: Option<&Node>, detail: impl Into<String>) -> Failure {
        Failure {
            kind: kind.into(),
            path: Some(format!("/{rel}")),
            record_id: node.and_then(|n| n.meta.get(crate::records::keys::RECORD_ID).cloned()),
            detail: detail.into(),
        }
    }

    fn line(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.path {
            s.push_str(p);
            s.push_str(": ");
        }
        if let Some(r) = &self.record_id {
            s.push_str(&format!("record {r}: "));
        }
        s.push_str(&format!("{}: {}", self.kind, self.detail));
        s
    }
}

/// Records counted in one collection of a record snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CollectionCount {
    pub collection: String,
    /// The collection node's `records` count.
    pub expected: Option<u64>,
    /// Record nodes found in its tree.
    pub found: u64,
}

/// The RPO verdict: the newest snapshot's age against the objective.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RpoVerdict {
    /// The objective, when one is configured or given.
    pub limit_seconds: Option<f64>,
    /// Age of the newest snapshot of the source on this target at verification
    /// time (`null` when it has none).
    pub age_seconds: Option<f64>,
    /// That snapshot.
    pub newest_snapshot: Option<Id>,
    /// `null` without an objective.
    pub ok: Option<bool>,
}

/// The RTO verdict: restore time against the objective.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RtoVerdict {
    /// The objective, when one is configured or given.
    pub limit_seconds: Option<f64>,
    /// Measured restore time, or with `estimate` the estimated full restore time.
    pub seconds: f64,
    /// True for sampled runs: `seconds` is extrapolated from the sample's throughput.
    pub estimate: bool,
    /// `null` without an objective and for estimates (only a full restore gives a verdict).
    pub ok: Option<bool>,
}

/// Result of comparing a sample of records with the live source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgainstSource {
    /// Records sampled from the snapshot.
    pub sampled: u64,
    /// Re-fetched with the same payload digest.
    pub matched: u64,
    /// Payload differs, and the source says it changed after the snapshot (not a failure).
    pub changed_at_source: Vec<String>,
    /// No longer at the source (not a failure).
    pub gone_at_source: Vec<String>,
    /// Payload differs without a later change at the source (failures, listed there too).
    pub mismatched: Vec<String>,
}

/// The verification of one snapshot on one target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotCheck {
    /// `null` when the source has no snapshot on this target.
    pub snapshot_id: Option<Id>,
    pub source: String,
    pub source_type: Option<String>,
    pub snapshot_time: Option<DateTime<Utc>>,
    pub ok: bool,
    /// Only a sample was restored.
    pub sampled: bool,
    /// Directory snapshots: files in the snapshot summary.
    pub files_expected: u64,
    pub files_verified: u64,
    /// Record snapshots: `records_total` of the snapshot summary.
    pub records_expected: u64,
    pub records_verified: u64,
    /// Records not restored because they name an erased (suppressed) customer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub records_suppressed: u64,
    pub attachments_verified: u64,
    /// Content bytes of the files/records in the snapshot.
    pub bytes_total: u64,
    /// Content bytes restored and verified.
    pub bytes_verified: u64,
    /// Record snapshots: counts per collection.
    pub collections: Vec<CollectionCount>,
    /// The restore phase (reading, decrypting, writing, digest checks).
    pub restore_seconds: f64,
    /// Everything for this snapshot, including the independent check.
    pub duration_seconds: f64,
    /// Bytes restored per second of the restore phase.
    pub throughput_bytes_per_second: f64,
    pub rpo: RpoVerdict,
    pub rto: RtoVerdict,
    pub against_source: Option<AgainstSource>,
    pub failures: Vec<Failure>,
    /// Failures beyond [`MAX_FAILURES`], counted only.
    pub failures_omitted: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The sealed document of a `verifications/<id>` object: one run on one target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verification {
    /// When the run started (UTC).
    pub time: DateTime<Utc>,
    pub target: String,
    pub location: String,
    pub hostname: String,
    pub program: String,
    pub sample_percent: Option<f64>,
    pub ok: bool,
    pub duration_seconds: f64,
    /// Problems of the target as a whole (damaged snapshot or index objects …).
    pub errors: Vec<Failure>,
    pub snapshots: Vec<SnapshotCheck>,
}

/// One target's outcome in a run.
#[derive(Debug, Clone)]
pub struct TargetOutcome {
    pub verification: Verification,
    /// The stored `verifications/<id>` object.
    pub record_id: Option<Id>,
    /// Why the record could not be stored.
    pub record_error: Option<String>,
}

impl TargetOutcome {
    /// Passed, and recorded.
    pub fn ok(&self) -> bool {
        self.verification.ok && self.record_error.is_none()
    }
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub targets: Vec<TargetOutcome>,
    /// With `keep_scratch`: where the restored files are (`<dir>/t<n>/<snapshot>`).
    pub kept_scratch: Option<PathBuf>,
}

impl RunReport {
    /// Everything passed on every target.
    pub fn ok(&self) -> bool {
        !self.targets.is_empty() && self.targets.iter().all(TargetOutcome::ok)
    }

    /// The `--json` document.
    pub fn to_json(&self) -> serde_json::Value {
        let targets: Vec<serde_json::Value> = self
            .targets
            .iter()
            .map(|t| {
                let mut v = serde_json::to_value(&t.verification).expect("verification json");
                v["ok"] = serde_json::json!(t.ok());
                v["record_id"] = serde_json::json!(t.record_id);
                v["record_error"] = serde_json::json!(t.record_error);
                v
            })
            .collect();
        serde_json::json!({
            "ok": self.ok(),
            "targets": targets,
            "kept_scratch": self.kept_scratch,
        })
    }

    /// One line per failure, naming target and snapshot.
    pub fn failure_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for t in &self.targets {
            let v = &t.verification;
            for e in &v.errors {
                out.push(format!("target {}: {}", v.target, e.line()));
            }
            for c in &v.snapshots {
                let snap = c
                    .snapshot_id
                    .map(|i| i.short())
                    .unwrap_or_else(|| "-".into());
                for f in &c.failures {
                    out.push(format!(
                        "target {}, snapshot {snap} (source {}): {}",
                        v.target,
                        c.source,
                        f.line()
                    ));
                }
                if c.failures_omitted > 0 {
                    out.push(format!(
                        "target {}, snapshot {snap} (source {}): {} more failure(s) not listed",
                        v.target, c.source, c.failures_omitted
                    ));
                }
            }
            if let Some(e) = &t.record_error {
                out.push(format!(
                    "target {}: the verification record could not be stored: {e}",
                    v.target
                ));
            }
        }
        out
    }

    /// Number of failures (listed and omitted).
    pub fn failure_count(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| {
                let v = &t.verification;
                v.errors.len() as u64
                    + v.snapshots
                        .iter()
                        .map(|c| c.failures.len() as u64 + c.failures_omitted)
                        .sum::<u64>()
                    + u64::from(t.record_error.is_some())
            })
            .sum()
    }

    /// The human summary.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for t in &self.targets {
            let v = &t.verification;
            for c in &v.snapshots {
                let Some(id) = c.snapshot_id else {
                    out.push_str(&format!(
                        "target {}: source {}: NO SNAPSHOT\n",
                        v.target, c.source
                    ));
                    continue;
                };
                let what = if c.records_expected > 0 || c.records_verified > 0 {
                    format!(
                        "{}/{} records{}",
                        c.records_verified,
                        c.records_expected,
                        if c.attachments_verified > 0 {
                            format!(" (+{} attachments)", c.attachments_verified)
                        } else {
                            String::new()
                        }
                    )
                } else {
                    format!("{}/{} files", c.files_verified, c.files_expected)
                };
                out.push_str(&format!(
                    "target {}: snapshot {} (source {}){}: {what}, {} verified in {:.1}s ({}/s): {}\n",
                    v.target,
                    id.short(),
                    c.source,
                    if c.sampled { ", sample" } else { "" },
                    human_bytes(c.bytes_verified),
                    c.restore_seconds,
                    human_bytes(c.throughput_bytes_per_second as u64),
                    if c.ok { "ok" } else { "FAILED" }
                ));
                let r = &c.rpo;
                let age = human_secs(r.age_seconds.unwrap_or_default());
                match r.limit_seconds {
                    Some(l) => out.push_str(&format!(
                        "  RPO {}: newest snapshot {age} old: {}\n",
                        human_secs(l),
                        verdict(r.ok)
                    )),
                    None => out.push_str(&format!("  RPO not set: newest snapshot {age} old\n")),
                }
                let r = &c.rto;
                let limit = r
                    .limit_seconds
                    .map(|l| format!("RTO {}", human_secs(l)))
                    .unwrap_or_else(|| "RTO not set".into());
                if r.estimate {
                    out.push_str(&format!(
                        "  {limit}: ESTIMATED full restore {} (extrapolated from the sample; no verdict)\n",
                        human_secs(r.seconds)
                    ));
                } else {
                    out.push_str(&format!(
                        "  {limit}: full restore took {}{}\n",
                        human_secs(r.seconds),
                        r.ok.map(|_| format!(": {}", verdict(r.ok)))
                            .unwrap_or_default()
                    ));
                }
                if let Some(a) = &c.against_source {
                    out.push_str(&format!(
                        "  against the source: {} sampled, {} matched, {} changed at the source since, {} gone, {} mismatched\n",
                        a.sampled,
                        a.matched,
                        a.changed_at_source.len(),
                        a.gone_at_source.len(),
                        a.mismatched.len()
                    ));
                }
            }
            match (&t.record_id, &t.record_error) {
                (Some(id), _) => out.push_str(&format!(
                    "target {}: {} — verification record {} stored\n",
                    v.target,
                    if t.ok() { "passed" } else { "FAILED" },
                    id.short()
                )),
                _ => out.push_str(&format!("target {}: FAILED\n", v.target)),
            }
        }
        if let Some(dir) = &self.kept_scratch {
            out.push_str(&format!("restored files kept in {}\n", dir.display()));
        }
        out.push_str(&if self.ok() {
            "restore-verify: everything passed\n".to_string()
        } else {
            format!(
                "restore-verify: FAILED ({} failure(s), listed on stderr)\n",
                self.failure_count()
            )
        });
        out
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "BREACHED",
        None => "no verdict",
    }
}

fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Run restore-verify on every target of `repo` (each on its own).
pub async fn run(repo: &Repository, opts: &VerifyOptions) -> Result<RunReport> {
    repo.require(crate::crypto::Role::Restore, "restore-verify")?;
    if let Some(p) = opts.sample_percent {
        if !(p > 0.0 && p <= 100.0) {
            return Err(Error::Invalid(format!("--sample {p}: must be in (0, 100]")));
        }
    }
    if opts.against_source == Some(0) {
        return Err(Error::Invalid(
            "--against-source 0: give a number of records".into(),
        ));
    }
    let scratch = Scratch::create(opts.scratch.as_deref())?;
    // Every target's ledger together: a customer erased anywhere stays out.
    let suppressed = crate::customer::Suppressed::load(repo).await?;
    let mut targets = Vec::new();
    for (i, t) in repo.targets().iter().enumerate() {
        let dir = scratch.root.join(format!("t{i}"));
        let verification = verify_target(&repo.only(t), t, opts, &dir, &suppressed).await;
        // Replicated like every object (so targets stay identical); the record
        // itself names the target it verified.
        let (id, results) = repo
            .save_object(repo.targets(), ObjectKind::Verification, &verification)
            .await;
        let record_error = results
            .into_iter()
            .find_map(|r| r.err())
            .map(|e| e.to_string());
        targets.push(TargetOutcome {
            verification,
            record_id: record_error.is_none().then_some(id),
            record_error,
        });
    }
    // A configured target that could not be opened was not verified: a failure.
    for (name, e) in repo.unreachable() {
        targets.push(TargetOutcome {
            verification: Verification {
                time: Utc::now(),
                target: name.clone(),
                location: String::new(),
                hostname: hostname(),
                program: program(),
                sample_percent: opts.sample_percent,
                ok: false,
                duration_seconds: 0.0,
                errors: vec![Failure::new(
                    "target",
                    format!("unreachable, not verified: {e}"),
                )],
                snapshots: Vec::new(),
            },
            record_id: None,
            record_error: Some("target unreachable".into()),
        });
    }
    let kept_scratch = opts.keep_scratch.then(|| scratch.keep());
    Ok(RunReport {
        targets,
        kept_scratch,
    })
}

fn program() -> String {
    format!("custos {}", env!("CARGO_PKG_VERSION"))
}

fn is_records(s: &SnapshotEntry) -> bool {
    s.snapshot
        .source_type
        .as_deref()
        .is_some_and(|t| t != "directory")
        || !s.snapshot.cursors.is_empty()
}

async fn verify_target(
    repo: &Repository,
    t: &TargetRef,
    opts: &VerifyOptions,
    scratch: &Path,
    suppressed: &crate::customer::Suppressed,
) -> Verification {
    let clock = Instant::now();
    let mut v = Verification {
        time: Utc::now(),
        target: t.name().to_string(),
        location: t.location().to_string(),
        hostname: hostname(),
        program: program(),
        sample_percent: opts.sample_percent,
        ok: false,
        duration_seconds: 0.0,
        errors: Vec::new(),
        snapshots: Vec::new(),
    };
    match crate::customer::Suppressed::load(repo).await {
        Ok(own) if own.len() < suppressed.len() => v.errors.push(Failure::new(
            "ledger",
            format!(
                "the suppression ledger differs: this target holds {} suppressed customer(s), \
                 the targets together {} (run `custos sync`)",
                own.len(),
                suppressed.len()
            ),
        )),
        Ok(_) => {}
        Err(e) => v.errors.push(Failure::new(
            "ledger",
            format!("cannot read the suppression ledger: {e}"),
        )),
    }
    let snaps = match repo.snapshots().await {
        Ok((snaps, warnings)) => {
            for w in warnings {
                v.errors.push(Failure::new("snapshot", w));
            }
            snaps
        }
        Err(e) => {
            v.errors.push(Failure::new(
                "target",
                format!("cannot list snapshots: {e}"),
            ));
            v.duration_seconds = clock.elapsed().as_secs_f64();
            return v;
        }
    };
    let index = match repo.load_index().await {
        Ok((index, warnings)) => {
            for w in warnings {
                v.errors.push(Failure::new("index", w));
            }
            Arc::new(index)
        }
        Err(e) => {
            v.errors.push(Failure::new(
                "target",
                format!("cannot load the index: {e}"),
            ));
            v.duration_seconds = clock.elapsed().as_secs_f64();
            return v;
        }
    };
    // What to verify: one chosen snapshot, or the latest of each source.
    let mut chosen: Vec<&SnapshotEntry> = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    if let Some(spec) = &opts.snapshot {
        match snapshot::find(&snaps, spec) {
            Ok(s) => chosen.push(s),
            Err(e) => v.errors.push(Failure::new("snapshot", e.to_string())),
        }
    } else {
        let mut latest: BTreeMap<&str, &SnapshotEntry> = BTreeMap::new();
        for s in &snaps {
            let cur = latest.entry(&s.snapshot.source).or_insert(s);
            if s.snapshot.time >= cur.snapshot.time {
                *cur = s;
            }
        }
        let wanted = |name: &str| opts.sources.is_empty() || opts.sources.iter().any(|n| n == name);
        chosen.extend(latest.values().filter(|s| wanted(&s.snapshot.source)));
        let expected = opts
            .configured
            .iter()
            .map(|s| s.name().to_string())
            .filter(|n| wanted(n))
            .chain(opts.sources.iter().cloned());
        for name in expected {
            if !latest.contains_key(name.as_str()) && !missing.contains(&name) {
                missing.push(name);
            }
        }
    }
    for s in chosen {
        let dir = scratch.join(s.id.short());
        let check = verify_snapshot(repo, &index, &snaps, s, opts, &dir, suppressed).await;
        if !opts.keep_scratch {
            force_remove(&dir);
        }
        v.snapshots.push(check);
    }
    for source in missing {
        let (rpo, rto) = opts.objectives(&source);
        v.snapshots.push(SnapshotCheck {
            snapshot_id: None,
            source_type: None,
            snapshot_time: None,
            ok: false,
            sampled: opts.sample_percent.is_some(),
            files_expected: 0,
            files_verified: 0,
            records_expected: 0,
            records_verified: 0,
            records_suppressed: 0,
            attachments_verified: 0,
            bytes_total: 0,
            bytes_verified: 0,
            collections: Vec::new(),
            restore_seconds: 0.0,
            duration_seconds: 0.0,
            throughput_bytes_per_second: 0.0,
            rpo: RpoVerdict {
                limit_seconds: rpo.map(|d| d.as_secs_f64()),
                age_seconds: None,
                newest_snapshot: None,
                ok: rpo.map(|_| false),
            },
            rto: RtoVerdict {
                limit_seconds: rto.map(|d| d.as_secs_f64()),
                seconds: 0.0,
                estimate: false,
                ok: rto.map(|_| false),
            },
            against_source: None,
            failures: vec![Failure::new(
                "snapshot",
                format!("source {source} has no snapshot on this target"),
            )],
            failures_omitted: 0,
            source,
        });
    }
    v.ok = v.errors.is_empty() && v.snapshots.iter().all(|c| c.ok);
    v.duration_seconds = clock.elapsed().as_secs_f64();
    v
}

/// A file, record, directory or symlink to check at its restored place.
struct Item {
    /// Snapshot-relative path (lossy UTF-8, as restore's include patterns see it).
    rel: String,
    path: PathBuf,
    node: Node,
}

/// Failures of one snapshot, capped.
#[derive(Default)]
struct Failures {
    list: Vec<Failure>,
    omitted: u64,
}

impl Failures {
    fn push(&mut self, f: Failure) {
        if self.list.len() < MAX_FAILURES {
            self.list.push(f);
        } else {
            self.omitted += 1;
        }
    }
}

/// A record chosen for the live comparison.
struct Wanted {
    collection: String,
    record_id: String,
    rel: String,
    digest: Option<Id>,
}

/// Random picks made while walking.
struct Sampler {
    rng: StdRng,
    /// Probability of picking a file/record (sampled runs).
    p: Option<f64>,
    picked: Vec<Item>,
    newest: BinaryHeap<Reverse<(Option<DateTime<Utc>>, u64)>>,
    held: HashMap<u64, Item>,
    seq: u64,
    /// Reservoir of records for the live comparison.
    live_n: usize,
    live_seen: u64,
    live: Vec<Wanted>,
}

impl Sampler {
    fn offer(&mut self, item: Item, time: Option<DateTime<Utc>>) {
        let Some(p) = self.p else { return };
        self.seq += 1;
        let seq = self.seq;
        if self.rng.gen_bool(p) {
            self.picked.push(item);
        } else {
            self.held.insert(seq, item);
        }
        self.newest.push(Reverse((time, seq)));
        if self.newest.len() > SAMPLE_NEWEST {
            if let Some(Reverse((_, old))) = self.newest.pop() {
                self.held.remove(&old);
            }
        }
    }

    fn offer_live(&mut self, w: Wanted) {
        if self.live_n == 0 {
            return;
        }
        self.live_seen += 1;
        if self.live.len() < self.live_n {
            self.live.push(w);
        } else {
            let j = self.rng.gen_range(0..self.live_seen);
            if (j as usize) < self.live_n {
                self.live[j as usize] = w;
            }
        }
    }

    fn take(&mut self) -> Vec<Item> {
        let mut all = std::mem::take(&mut self.picked);
        all.extend(std::mem::take(&mut self.held).into_values());
        all.sort_by(|a, b| a.rel.cmp(&b.rel));
        all
    }
}

/// Counts found by walking a snapshot's tree.
#[derive(Default)]
struct Tally {
    files: u64,
    records: u64,
    bytes: u64,
    /// collection → (expected from its node, found)
    collections: BTreeMap<String, (Option<u64>, u64)>,
    files_verified: u64,
    records_verified: u64,
    records_suppressed: u64,
    attachments_verified: u64,
    bytes_verified: u64,
}

/// One snapshot being verified.
struct SnapshotRun<'a> {
    repo: &'a Repository,
    index: &'a Arc<Index>,
    snap: &'a SnapshotEntry,
    dest: PathBuf,
    records: bool,
    failures: Failures,
    /// Restore errors by the snapshot-relative path they name, folded into
    /// that entry's failure when the check reaches it.
    restore_errors: HashMap<String, String>,
    tally: Tally,
    sampler: Sampler,
    /// Erased customers (the union of every target's ledger).
    suppressed: &'a crate::customer::Suppressed,
}

/// Restore errors kept by path (beyond this they are listed as they come).
const MAX_RESTORE_ERRORS_BY_PATH: usize = 100_000;

async fn verify_snapshot(
    repo: &Repository,
    index: &Arc<Index>,
    all: &[SnapshotEntry],
    s: &SnapshotEntry,
    opts: &VerifyOptions,
    dest: &Path,
    suppressed: &crate::customer::Suppressed,
) -> SnapshotCheck {
    let clock = Instant::now();
    let records = is_records(s);
    let mut run = SnapshotRun {
        repo,
        index,
        snap: s,
        dest: dest.to_path_buf(),
        records,
        failures: Failures::default(),
        restore_errors: HashMap::new(),
        tally: Tally::default(),
        suppressed,
        sampler: Sampler {
            rng: StdRng::from_entropy(),
            p: opts.sample_percent.map(|p| p / 100.0),
            picked: Vec::new(),
            newest: BinaryHeap::new(),
            held: HashMap::new(),
            seq: 0,
            live_n: if records {
                opts.against_source.unwrap_or(0)
            } else {
                0
            },
            live_seen: 0,
            live: Vec::new(),
        },
    };
    let sampled = opts.sample_percent.is_some();
    let (restore_time, restored_bytes, restored_items) = if sampled {
        // Plan: walk the tree, pick the sample; restore only it; check it.
        run.walk(false).await;
        let items = run.sampler.take();
        let n = items.len() as u64;
        let (time, bytes) = if items.is_empty() {
            (Duration::ZERO, 0)
        } else {
            let include = items.iter().map(|i| literal_glob(&i.rel)).collect();
            let r = run.restore(include).await;
            let mut items = items;
            while !items.is_empty() {
                let rest = items.split_off(items.len().min(VERIFY_BATCH));
                run.verify_batch(items).await;
                items = rest;
            }
            r
        };
        (time, bytes, n)
    } else {
        let (time, bytes) = run.restore(Vec::new()).await;
        run.walk(true).await;
        (time, bytes, run.tally.files + run.tally.records)
    };
    run.check_counts();

    // RPO: the newest snapshot of the source on this target.
    let (rpo, rto) = opts.objectives(&s.snapshot.source);
    let newest = all
        .iter()
        .filter(|x| x.snapshot.source == s.snapshot.source)
        .max_by_key(|x| x.snapshot.time)
        .unwrap_or(s);
    let age = (Utc::now() - newest.snapshot.time)
        .to_std()
        .unwrap_or(Duration::ZERO);
    let rpo_ok = rpo.map(|l| age <= l);
    if rpo_ok == Some(false) {
        run.failures.push(Failure::new(
            "rpo",
            format!(
                "the newest snapshot of source {} ({}) is {} old, the RPO is {}",
                s.snapshot.source,
                newest.id.short(),
                human_secs(age.as_secs_f64()),
                human_secs(rpo.unwrap_or_default().as_secs_f64())
            ),
        ));
    }
    let secs = restore_time.as_secs_f64();
    let throughput = if secs > 0.0 {
        restored_bytes as f64 / secs
    } else {
        0.0
    };
    // RTO: measured on a full restore; extrapolated (no verdict) from a sample.
    let total_items = run.tally.files + run.tally.records;
    let rto_secs = if !sampled {
        secs
    } else if restored_bytes > 0 {
        secs * run.tally.bytes as f64 / restored_bytes as f64
    } else if restored_items > 0 {
        secs * total_items as f64 / restored_items as f64
    } else {
        0.0
    };
    let rto_ok = if sampled {
        None
    } else {
        rto.map(|l| restore_time <= l)
    };
    if rto_ok == Some(false) {
        run.failures.push(Failure::new(
            "rto",
            format!(
                "the full restore took {}, the RTO is {}",
                human_secs(secs),
                human_secs(rto.unwrap_or_default().as_secs_f64())
            ),
        ));
    }
    // Against the live source.
    let against = if run.sampler.live_n > 0 {
        let wanted = std::mem::take(&mut run.sampler.live);
        let conf = opts
            .configured
            .iter()
            .find(|c| c.name() == s.snapshot.source);
        match conf {
            Some(SourceSettings::Records { config, .. }) => Some(
                against_source(
                    config,
                    repo.keys_arc(),
                    s.snapshot.time,
                    wanted,
                    &mut run.failures,
                )
                .await,
            ),
            _ => {
                run.failures.push(Failure::new(
                    "source",
                    format!(
                        "--against-source: source {} is not a record source in the config",
                        s.snapshot.source
                    ),
                ));
                None
            }
        }
    } else {
        None
    };
    let t = &run.tally;
    let sum = &s.snapshot.summary;
    let failures = std::mem::take(&mut run.failures);
    SnapshotCheck {
        snapshot_id: Some(s.id),
        source: s.snapshot.source.clone(),
        source_type: s.snapshot.source_type.clone(),
        snapshot_time: Some(s.snapshot.time),
        ok: failures.list.is_empty() && failures.omitted == 0,
        sampled,
        files_expected: if records { 0 } else { sum.total_files },
        files_verified: t.files_verified,
        records_expected: if records { sum.records_total } else { 0 },
        records_verified: t.records_verified,
        records_suppressed: t.records_suppressed,
        attachments_verified: t.attachments_verified,
        bytes_total: t.bytes,
        bytes_verified: t.bytes_verified,
        collections: t
            .collections
            .iter()
            .map(|(c, (e, f))| CollectionCount {
                collection: c.clone(),
                expected: *e,
                found: *f,
            })
            .collect(),
        restore_seconds: secs,
        duration_seconds: clock.elapsed().as_secs_f64(),
        throughput_bytes_per_second: throughput,
        rpo: RpoVerdict {
            limit_seconds: rpo.map(|d| d.as_secs_f64()),
            age_seconds: Some(age.as_secs_f64()),
            newest_snapshot: Some(newest.id),
            ok: rpo_ok,
        },
        rto: RtoVerdict {
            limit_seconds: rto.map(|d| d.as_secs_f64()),
            seconds: rto_secs,
            estimate: sampled,
            ok: rto_ok,
        },
        against_source: against,
        failures: failures.list,
        failures_omitted: failures.omitted,
    }
}

/// A glob matching exactly `rel` (restore matches include patterns against
/// the lossy UTF-8 path). A backslash is matched by `?`: at worst one more
/// file is restored.
fn literal_glob(rel: &str) -> String {
    globset::escape(rel).replace('\\', "?")
}

impl SnapshotRun<'_> {
    /// Restore (everything, or the `include` patterns) into the scratch directory.
    async fn restore(&mut self, include: Vec<String>) -> (Duration, u64) {
        let start = Instant::now();
        let r = restore::restore(
            self.repo,
            self.index.clone(),
            self.snap,
            None,
            &self.dest,
            &RestoreOptions {
                include,
                suppressed: self.suppressed.clone(),
                progress: None,
                // Every restored file is hashed against its digest below.
                verify: false,
            },
        )
        .await;
        let took = start.elapsed();
        match r {
            Ok(report) => {
                for e in report.errors {
                    // Restore names the entry first: `<rel path>: <what failed>`.
                    match e.split_once(": ") {
                        Some((rel, rest))
                            if self.restore_errors.len() < MAX_RESTORE_ERRORS_BY_PATH =>
                        {
                            self.restore_errors
                                .insert(rel.to_string(), rest.to_string());
                        }
                        _ => self.failures.push(Failure::new("restore", e)),
                    }
                }
                (took, report.bytes)
            }
            Err(e) => {
                self.failures.push(Failure::new("restore", e.to_string()));
                (took, 0)
            }
        }
    }

    /// Walk the snapshot's tree one directory at a time: count, and either
    /// check each entry at its restored place (`check`) or offer it to the sampler.
    async fn walk(&mut self, check: bool) {
        // (dir on disk, rel path, tree, collection, depth)
        let mut stack: Vec<(PathBuf, String, Id, Option<String>, usize)> = vec![(
            self.dest.clone(),
            String::new(),
            self.snap.snapshot.tree,
            None,
            0,
        )];
        while let Some((dir, rel, tree, coll, depth)) = stack.pop() {
            let nodes = match self.repo.load_tree(self.index, &tree).await {
                Ok(n) => n,
                Err(e) => {
                    self.failures.push(Failure {
                        kind: "tree".into(),
                        path: Some(format!("/{rel}")),
                        record_id: None,
                        detail: format!("tree {}: {e}", tree.short()),
                    });
                    continue;
                }
            };
            let mut batch = Vec::new();
            for node in nodes {
                let name = node.name_bytes();
                let r = if rel.is_empty() {
                    String::from_utf8_lossy(&name).into_owned()
                } else {
                    format!("{rel}/{}", String::from_utf8_lossy(&name))
                };
                if name.is_empty()
                    || name == b"."
                    || name == b".."
                    || name.contains(&b'/')
                    || name.contains(&0)
                {
                    self.failures.push(Failure::at(
                        "tree",
                        &r,
                        None,
                        "unsafe entry name in the snapshot tree",
                    ));
                    continue;
                }
                let path = dir.join(OsStr::from_bytes(&name));
                match node.kind {
                    NodeKind::Dir => {
                        let mut c = coll.clone();
                        if self.records && depth == 0 {
                            let expected =
                                node.meta.get("records").and_then(|v| v.parse::<u64>().ok());
                            self.tally.collections.insert(r.clone(), (expected, 0));
                            c = Some(r.clone());
                        }
                        if let Some(sub) = node.subtree {
                            stack.push((path.clone(), r.clone(), sub, c, depth + 1));
                        }
                        if check {
                            batch.push(Item { rel: r, path, node });
                        }
                    }
                    NodeKind::Record
                        if self.suppressed.covers(
                            self.repo.keys(),
                            &self.snap.snapshot.source,
                            &node,
                        ) =>
                    {
                        // Counted (the summary includes it) but not restored:
                        // an erased customer's record in a copy the erasure missed.
                        self.tally.records += 1;
                        self.tally.records_suppressed += 1;
                        if let Some(c) = &coll {
                            if let Some(e) = self.tally.collections.get_mut(c) {
                                e.1 += 1;
                            }
                        }
                    }
                    NodeKind::File | NodeKind::Record => {
                        self.tally.bytes += node.size;
                        let time = if node.kind == NodeKind::Record {
                            self.tally.records += 1;
                            if let Some(c) = &coll {
                                if let Some(e) = self.tally.collections.get_mut(c) {
                                    e.1 += 1;
                                }
                            }
                            let m = &node.meta;
                            if !m.contains_key(crate::records::keys::DELETED) {
                                if let (Some(c), Some(id)) =
                                    (&coll, m.get(crate::records::keys::RECORD_ID))
                                {
                                    self.sampler.offer_live(Wanted {
                                        collection: m
                                            .get(crate::records::keys::COLLECTION)
                                            .cloned()
                                            .unwrap_or_else(|| c.clone()),
                                        record_id: id.clone(),
                                        rel: r.clone(),
                                        digest: node.digest,
                                    });
                                }
                            }
                            m.get(crate::records::keys::CREATED)
                                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                                .map(|t| t.with_timezone(&Utc))
                                .or(node.mtime)
                        } else {
                            self.tally.files += 1;
                            node.mtime
                        };
                        let item = Item { rel: r, path, node };
                        if check {
                            batch.push(item);
                        } else {
                            self.sampler.offer(item, time);
                        }
                    }
                    NodeKind::Symlink if check => batch.push(Item { rel: r, path, node }),
                    // Attachments are checked with their record; specials are not restored.
                    NodeKind::Symlink | NodeKind::Attachment | NodeKind::Special => {}
                }
                if batch.len() >= VERIFY_BATCH {
                    self.verify_batch(std::mem::take(&mut batch)).await;
                }
            }
            if !batch.is_empty() {
                self.verify_batch(batch).await;
            }
        }
    }

    /// Check restored entries (and the attachments of records) in parallel.
    async fn verify_batch(&mut self, items: Vec<Item>) {
        let mut all = Vec::with_capacity(items.len());
        for it in items {
            if it.node.kind == NodeKind::Record {
                if let Some(sub) = it.node.subtree {
                    match self.repo.load_tree(self.index, &sub).await {
                        Ok(nodes) => {
                            let dir = attachments_dir(&it.path);
                            for n in nodes {
                                let name = n.name_bytes();
                                all.push(Item {
                                    rel: format!(
                                        "{}.attachments/{}",
                                        it.rel,
                                        String::from_utf8_lossy(&name)
                                    ),
                                    path: dir.join(OsStr::from_bytes(&name)),
                                    node: n,
                                });
                            }
                        }
                        Err(e) => self.failures.push(Failure::at(
                            "tree",
                            &it.rel,
                            Some(&it.node),
                            format!("attachments tree {}: {e}", sub.short()),
                        )),
                    }
                }
            }
            all.push(it);
        }
        let keys = self.repo.keys_arc();
        let checked: Vec<(Item, CheckResult)> = tokio::task::spawn_blocking(move || {
            all.into_par_iter()
                .map(|it| {
                    let r = check_entry(&keys, &it.path, &it.node);
                    (it, r)
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        for (it, r) in checked {
            match r {
                Ok(bytes) => {
                    let t = &mut self.tally;
                    match it.node.kind {
                        NodeKind::File => t.files_verified += 1,
                        NodeKind::Record => t.records_verified += 1,
                        NodeKind::Attachment => t.attachments_verified += 1,
                        _ => {}
                    }
                    t.bytes_verified += bytes;
                }
                Err((kind, detail)) => {
                    let f = match self.restore_errors.remove(&it.rel) {
                        Some(e) => Failure::at("restore", &it.rel, Some(&it.node), e),
                        None => Failure::at(kind, &it.rel, Some(&it.node), detail),
                    };
                    self.failures.push(f);
                }
            }
        }
    }

    /// Counts in the tree against the snapshot's summary and collection nodes;
    /// restore errors no checked entry accounted for.
    fn check_counts(&mut self) {
        let mut left: Vec<(String, String)> = std::mem::take(&mut self.restore_errors)
            .into_iter()
            .collect();
        left.sort();
        for (rel, e) in left {
            self.failures
                .push(Failure::new("restore", format!("{rel}: {e}")));
        }
        let sum = &self.snap.snapshot.summary;
        let t = &self.tally;
        let mut out = Vec::new();
        if self.records {
            for (c, (expected, found)) in &t.collections {
                match expected {
                    Some(e) if e == found => {}
                    Some(e) => out.push(Failure::at(
                        "count",
                        c,
                        None,
                        format!("collection {c}: {found} records in the tree, its node says {e}"),
                    )),
                    None => out.push(Failure::at(
                        "count",
                        c,
                        None,
                        format!("collection {c}: no record count on its node"),
                    )),
                }
            }
            if t.records != sum.records_total {
                out.push(Failure::new(
                    "count",
                    format!(
                        "{} records in the tree, the snapshot summary says records_total {}",
                        t.records, sum.records_total
                    ),
                ));
            }
            if t.collections.len() as u64 != sum.collections {
                out.push(Failure::new(
                    "count",
                    format!(
                        "{} collections in the tree, the snapshot summary says {}",
                        t.collections.len(),
                        sum.collections
                    ),
                ));
            }
        } else {
            if t.files != sum.total_files {
                out.push(Failure::new(
                    "count",
                    format!(
                        "{} files in the tree, the snapshot summary says total_files {}",
                        t.files, sum.total_files
                    ),
                ));
            }
            if t.bytes != sum.total_bytes {
                out.push(Failure::new(
                    "count",
                    format!(
                        "{} bytes of files in the tree, the snapshot summary says total_bytes {}",
                        t.bytes, sum.total_bytes
                    ),
                ));
            }
        }
        for f in out {
            self.failures.push(f);
        }
    }
}

fn attachments_dir(record: &Path) -> PathBuf {
    let mut name = record.file_name().unwrap_or_default().to_os_string();
    name.push(".attachments");
    record.with_file_name(name)
}

/// Content bytes verified, or (failure kind, what differed).
type CheckResult = std::result::Result<u64, (&'static str, String)>;

/// Check one restored entry; returns the content bytes verified.
fn check_entry(keys: &Keys, path: &Path, node: &Node) -> CheckResult {
    let md = match std::fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(("missing", "not restored".into()))
        }
        Err(e) => return Err(("missing", format!("cannot inspect the restored copy: {e}"))),
    };
    match node.kind {
        NodeKind::Dir => {
            if md.is_dir() {
                Ok(0)
            } else {
                Err(("missing", "restored, but not as a directory".into()))
            }
        }
        NodeKind::Symlink => {
            let want = node.link_target_bytes().unwrap_or_default();
            match std::fs::read_link(path) {
                Ok(got) if got.as_os_str().as_bytes() == want.as_slice() => Ok(0),
                Ok(_) => Err((
                    "symlink",
                    "restored link target differs from the recorded one".into(),
                )),
                Err(_) => Err(("missing", "restored, but not as a symlink".into())),
            }
        }
        _ => {
            if !md.is_file() {
                return Err(("missing", "restored, but not as a regular file".into()));
            }
            if md.len() != node.size {
                return Err((
                    "size",
                    format!(
                        "{} bytes restored, {} recorded at backup",
                        md.len(),
                        node.size
                    ),
                ));
            }
            let mut f = match std::fs::File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    // The recorded mode (say 000) was applied; we own the copy.
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
                    std::fs::File::open(path)
                        .map_err(|e| ("missing", format!("cannot read the restored copy: {e}")))?
                }
                Err(e) => return Err(("missing", format!("cannot read the restored copy: {e}"))),
            };
            let mut hasher = keys.digest_hasher();
            let n = std::io::copy(&mut f, &mut hasher)
                .map_err(|e| ("missing", format!("cannot read the restored copy: {e}")))?;
            if n != node.size {
                return Err((
                    "size",
                    format!("{n} bytes read back, {} recorded at backup", node.size),
                ));
            }
            if let Some(expected) = node.digest {
                let got = Id(*hasher.finalize().as_bytes());
                if got != expected {
                    return Err((
                        "digest",
                        "restored content does not match the digest recorded at backup".into(),
                    ));
                }
            }
            Ok(n)
        }
    }
}

/// A record fetched live: its payload digest and when the source says it changed.
type LiveRecord = (Id, Option<DateTime<Utc>>);

/// Keeps the payload digests of the wanted records of one collection.
struct PickSink {
    keys: Arc<Keys>,
    /// record id → (digest of the live payload, updated at the source)
    wanted: HashMap<String, Option<LiveRecord>>,
}

#[async_trait]
impl custos_connectors::ChangeSink for PickSink {
    async fn push(&mut self, change: custos_connectors::Change) -> custos_connectors::Result<()> {
        let custos_connectors::Change::Upsert(rec) = change else {
            return Ok(());
        };
        let Some(slot) = self.wanted.get_mut(&rec.id) else {
            return Ok(());
        };
        let keys = self.keys.clone();
        let digest = match rec.payload {
            custos_connectors::Payload::Bytes(b) => {
                Id(*keys.digest_hasher().update(&b).finalize().as_bytes())
            }
            custos_connectors::Payload::Reader { mut reader, .. } => {
                tokio::task::spawn_blocking(move || {
                    let mut h = keys.digest_hasher();
                    std::io::copy(&mut reader, &mut h).map(|_| Id(*h.finalize().as_bytes()))
                })
                .await
                .map_err(|e| custos_connectors::ConnectorError::Sink(e.to_string()))?
                .map_err(|e| {
                    custos_connectors::ConnectorError::Sink(format!("record {}: {e}", rec.id))
                })?
            }
        };
        *slot = Some((digest, rec.updated));
        Ok(())
    }
}

/// Fetch `wanted` records live through the source's connector and compare digests.
async fn against_source(
    config: &custos_connectors::SourceConfig,
    keys: Arc<Keys>,
    snapshot_time: DateTime<Utc>,
    wanted: Vec<Wanted>,
    failures: &mut Failures,
) -> AgainstSource {
    let mut out = AgainstSource {
        sampled: wanted.len() as u64,
        ..Default::default()
    };
    let connector = match custos_connectors::config::build(config) {
        Ok(c) => c,
        Err(e) => {
            failures.push(Failure::new("source", e.to_string()));
            return out;
        }
    };
    let collections = match connector.collections().await {
        Ok(c) => c,
        Err(e) => {
            failures.push(Failure::new("source", e.to_string()));
            return out;
        }
    };
    let mut by_coll: BTreeMap<String, Vec<Wanted>> = BTreeMap::new();
    for w in wanted {
        by_coll.entry(w.collection.clone()).or_default().push(w);
    }
    for (coll_id, ws) in by_coll {
        let Some(coll) = collections.iter().find(|c| c.id == coll_id) else {
            out.gone_at_source
                .extend(ws.into_iter().map(|w| w.record_id));
            continue;
        };
        let mut sink = PickSink {
            keys: keys.clone(),
            wanted: ws.iter().map(|w| (w.record_id.clone(), None)).collect(),
        };
        if let Err(e) = connector.sync(coll, None, &mut sink).await {
            failures.push(Failure::new("source", format!("collection {coll_id}: {e}")));
            continue;
        }
        for w in ws {
            match sink.wanted.get(&w.record_id).cloned().flatten() {
                None => out.gone_at_source.push(w.record_id),
                Some((d, _)) if Some(d) == w.digest => out.matched += 1,
                Some((_, Some(updated))) if updated > snapshot_time => {
                    out.changed_at_source.push(w.record_id)
                }
                Some(_) => {
                    failures.push(Failure {
                        kind: "source_digest".into(),
                        path: Some(format!("/{}", w.rel)),
                        record_id: Some(w.record_id.clone()),
                        detail: "the live record's payload digest differs from the snapshot's, \
                                 and the source reports no change since the snapshot"
                            .into(),
                    });
                    out.mismatched.push(w.record_id);
                }
            }
        }
    }
    out
}

/// The scratch root of one run: private (0700), removed when dropped —
/// also when the run fails or is cancelled part way (restored customer data
/// must not stay behind in the temporary directory) — unless kept.
struct Scratch {
    root: PathBuf,
    keep: bool,
}

impl Scratch {
    fn create(base: Option<&Path>) -> Result<Scratch> {
        use std::os::unix::fs::PermissionsExt;
        let parent = base
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let root = parent.join(format!("custos-verify-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&root).map_err(|e| Error::io(&root, e))?;
        // Restored records are customer data: only this user may read them.
        let scratch = Scratch { root, keep: false };
        std::fs::set_permissions(&scratch.root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&scratch.root, e))?;
        Ok(scratch)
    }

    /// Leave the directory in place (`--keep-scratch`); its path.
    fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.root.clone()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            force_remove(&self.root);
        }
    }
}

/// Remove a restored tree even where the recorded modes took write access away.
fn force_remove(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    fn open_up(p: &Path) {
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                open_up(&e.path());
            }
        }
    }
    if !path.exists() {
        return;
    }
    open_up(path);
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove the scratch directory");
    }
}

/// One row of `verify-history`: a snapshot verified on a target in one run.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryRow {
    /// The `verifications/<id>` object.
    pub record_id: Id,
    /// When the run started.
    pub time: DateTime<Utc>,
    pub target: String,
    pub location: String,
    pub snapshot_id: Option<Id>,
    pub source: Option<String>,
    pub ok: bool,
    pub sampled: bool,
    pub duration_seconds: f64,
    pub throughput_bytes_per_second: f64,
    pub rpo: Option<RpoVerdict>,
    pub rto: Option<RtoVerdict>,
    pub failures: u64,
}

/// Every stored verification (all targets' records, as replicated), newest
/// first, optionally of one source; damaged records are returned as warnings.
pub async fn history(
    repo: &Repository,
    source: Option<&str>,
) -> Result<(Vec<HistoryRow>, Vec<String>)> {
    let ids = repo.list_ids(ObjectKind::Verification).await?;
    let mut rows = Vec::new();
    let mut warnings = Vec::new();
    for id in ids {
        let v: Verification = match repo.load_object(ObjectKind::Verification, &id).await {
            Ok(v) => v,
            Err(e) => {
                warnings.push(e.to_string());
                continue;
            }
        };
        let base = |snapshot_id, source, ok, failures| HistoryRow {
            record_id: id,
            time: v.time,
            target: v.target.clone(),
            location: v.location.clone(),
            snapshot_id,
            source,
            ok,
            sampled: v.sample_percent.is_some(),
            duration_seconds: v.duration_seconds,
            throughput_bytes_per_second: 0.0,
            rpo: None,
            rto: None,
            failures,
        };
        if (!v.errors.is_empty() || v.snapshots.is_empty()) && source.is_none() {
            rows.push(base(None, None, v.errors.is_empty(), v.errors.len() as u64));
        }
        for c in &v.snapshots {
            if source.is_some_and(|s| s != c.source) {
                continue;
            }
            let mut row = base(
                c.snapshot_id,
                Some(c.source.clone()),
                c.ok,
                c.failures.len() as u64 + c.failures_omitted,
            );
            row.sampled = c.sampled;
            row.duration_seconds = c.duration_seconds;
            row.throughput_bytes_per_second = c.throughput_bytes_per_second;
            row.rpo = Some(c.rpo.clone());
            row.rto = Some(c.rto.clone());
            rows.push(row);
        }
    }
    rows.sort_by(|a, b| {
        b.time
            .cmp(&a.time)
            .then_with(|| a.target.cmp(&b.target))
            .then_with(|| a.source.cmp(&b.source))
    });
    Ok((rows, warnings))
}

/// The `verify-history` table.
pub fn history_table(rows: &[HistoryRow]) -> String {
    let mut out = format!(
        "{:<20}  {:<10}  {:<8}  {:<14}  {:<6}  {:>8}  {:>12}  {:<16}  {}\n",
        "time (UTC)",
        "target",
        "snapshot",
        "source",
        "result",
        "duration",
        "throughput",
        "RPO",
        "RTO"
    );
    for r in rows {
        let rpo = r
            .rpo
            .as_ref()
            .map(|v| match v.limit_seconds {
                Some(l) => format!(
                    "{} ({} ≤ {})",
                    verdict(v.ok),
                    v.age_seconds
                        .map(human_secs)
                        .unwrap_or_else(|| "none".into()),
                    human_secs(l)
                ),
                None => "-".into(),
            })
            .unwrap_or_else(|| "-".into());
        let rto = r
            .rto
            .as_ref()
            .filter(|_| r.snapshot_id.is_some())
            .map(|v| {
                let what = if v.estimate { "est. " } else { "" };
                match v.limit_seconds {
                    Some(l) if !v.estimate => {
                        format!(
                            "{} ({} ≤ {})",
                            verdict(v.ok),
                            human_secs(v.seconds),
                            human_secs(l)
                        )
                    }
                    _ => format!("{what}{}", human_secs(v.seconds)),
                }
            })
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<20}  {:<10}  {:<8}  {:<14}  {:<6}  {:>8}  {:>12}  {:<16}  {}\n",
            r.time.format("%Y-%m-%d %H:%M:%S"),
            r.target,
            r.snapshot_id
                .map(|i| i.short())
                .unwrap_or_else(|| "-".into()),
            r.source.as_deref().unwrap_or("-"),
            if r.ok {
                "ok".to_string()
            } else {
                format!("FAIL {}", r.failures)
            },
            human_secs(r.duration_seconds),
            format!("{}/s", human_bytes(r.throughput_bytes_per_second as u64)),
            rpo,
            rto
        ));
    }
    out.push_str(&format!("{} verification(s)\n", rows.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory goes with its run, whichever way the run ends,
    /// unless it is kept.
    #[test]
    fn scratch_is_removed_when_dropped_unless_kept() {
        let base = tempfile::tempdir().unwrap();
        let gone = Scratch::create(Some(base.path())).unwrap();
        let root = gone.root.clone();
        std::fs::create_dir_all(root.join("t0/snap")).unwrap();
        std::fs::write(root.join("t0/snap/record.eml"), b"customer data").unwrap();
        // A restored folder without write permission does not keep it either.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("t0/snap"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
        drop(gone);
        assert!(!root.exists());
        let kept = Scratch::create(Some(base.path())).unwrap().keep();
        assert!(kept.is_dir());
    }

    #[test]
    fn percentages_parse_and_are_bounded() {
        assert_eq!(parse_percent("--sample", "10%").unwrap(), 10.0);
        assert_eq!(parse_percent("--sample", "2.5").unwrap(), 2.5);
        for bad in ["0%", "101%", "x", "-5"] {
            let e = parse_percent("--sample", bad).unwrap_err().to_string();
            assert!(e.contains("--sample"), "{bad}: {e}");
        }
    }

    #[test]
    fn literal_globs_match_only_their_path() {
        for rel in ["a/b[1].eml", "x/{y}*?.txt", "plain/name.bin", "back\\slash"] {
            let set = restore::build_include(&[literal_glob(rel)])
                .unwrap()
                .unwrap();
            assert!(set.is_match(rel), "{rel}");
            assert!(!set.is_match(format!("{rel}x")), "{rel}");
        }
        let set = restore::build_include(&[literal_glob("a/b[1].eml")])
            .unwrap()
            .unwrap();
        assert!(!set.is_match("a/b1.eml"));
    }

    #[test]
    fn a_sample_holds_the_newest_items_and_about_its_share() {
        let mut s = Sampler {
            rng: StdRng::seed_from_u64(7),
            p: Some(0.2),
            picked: Vec::new(),
            newest: BinaryHeap::new(),
            held: HashMap::new(),
            seq: 0,
            live_n: 0,
            live_seen: 0,
            live: Vec::new(),
        };
        let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for i in 0..1000i64 {
            let rel = format!("f{i:04}");
            s.offer(
                Item {
                    path: PathBuf::from(&rel),
                    node: Node::new(rel.as_bytes(), NodeKind::File),
                    rel,
                },
                Some(base + chrono::Duration::seconds(i)),
            );
        }
        let picked: Vec<String> = s.take().into_iter().map(|i| i.rel).collect();
        for i in 990..1000 {
            assert!(picked.contains(&format!("f{i:04}")), "newest f{i} missing");
        }
        assert!((150..=260).contains(&picked.len()), "{}", picked.len());
        let mut dedup = picked.clone();
        dedup.dedup();
        assert_eq!(dedup.len(), picked.len());
    }
}
