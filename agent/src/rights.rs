//! Customer rights: `customer show` (what we hold), `customer export` (the
//! access request: every record in open formats with a manifest) and
//! `customer erase` (every record naming the customer removed from every
//! retained snapshot on every target, the customer suppressed for good).
//!
//! The unit of erasure is the record: a record that names the customer is
//! erased whole, attachments included — unless a legal hold covers it. Not
//! reached: the customer quoted or mentioned inside another customer's record
//! (that record names someone else; it stays). What stays: data another
//! record still references (an attachment two customers' records share
//! stays, because the other record does — deduplication stores it once).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::blob::BlobType;
use crate::customer::{records_of, PartDoc, Suppressed, SuppressionAction, SuppressionDoc};
use crate::disposal::{active_holds, replace_snapshots, rewrite};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::index::Index;
use crate::object::ObjectKind;
use crate::pipeline::{Progress, Session};
use crate::records::keys;
use crate::repo::Repository;
use crate::snapshot::{Snapshot, SnapshotEntry};
use crate::tree::{Node, NodeKind};

/// The customer keys of a set of normalized identifiers.
fn wanted(repo: &Repository, identifiers: &BTreeSet<String>) -> BTreeSet<String> {
    identifiers
        .iter()
        .map(|i| repo.keys().customer_key(i))
        .collect()
}

/// Record snapshots, newest first.
async fn record_snapshots(repo: &Repository) -> Result<Vec<SnapshotEntry>> {
    let (snaps, warnings) = repo.snapshots().await?;
    if !warnings.is_empty() {
        return Err(Error::Failed(format!(
            "a snapshot is unreadable ({}); customer commands need every snapshot",
            warnings.join("; ")
        )));
    }
    let mut out: Vec<SnapshotEntry> = snaps
        .into_iter()
        .filter(|s| s.snapshot.source_type.is_some())
        .collect();
    out.reverse();
    Ok(out)
}

// ---------------------------------------------------------------------------
// show

/// One source in `customer show`.
#[derive(Debug, Default, Serialize)]
pub struct SourceHits {
    pub source: String,
    /// Distinct records naming the customer (in any retained snapshot).
    pub records: u64,
    pub kinds: BTreeMap<String, u64>,
    pub collections: BTreeSet<String>,
    pub first_contact: Option<DateTime<Utc>>,
    pub last_contact: Option<DateTime<Utc>>,
    /// Snapshots holding at least one of them (short ids, newest first).
    pub snapshots: Vec<String>,
}

/// One target in `customer show`.
#[derive(Debug, Serialize)]
pub struct TargetHits {
    pub target: String,
    /// Snapshots holding the customer's records that this target has.
    pub snapshots: usize,
}

/// What `customer show` prints.
#[derive(Debug, Serialize)]
pub struct ShowReport {
    pub customer: String,
    pub identifiers: Vec<String>,
    /// In the suppression ledger (erased).
    pub suppressed: bool,
    pub records: u64,
    pub first_contact: Option<DateTime<Utc>>,
    pub last_contact: Option<DateTime<Utc>>,
    pub sources: Vec<SourceHits>,
    pub targets: Vec<TargetHits>,
}

/// Everything held on a customer, from the customer index (no bodies read).
pub async fn show(
    repo: &Repository,
    customer: &str,
    identifiers: &BTreeSet<String>,
) -> Result<ShowReport> {
    repo.require(crate::crypto::Role::Restore, "customer show")?;
    let want = wanted(repo, identifiers);
    let suppressed = Suppressed::load(repo).await?;
    let (blob_index, _) = repo.load_index().await?;
    let mut cache: HashMap<Id, PartDoc> = HashMap::new();
    let mut sources: BTreeMap<String, SourceHits> = BTreeMap::new();
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut holding: BTreeSet<Id> = BTreeSet::new();
    for s in record_snapshots(repo).await? {
        let hits = records_of(repo, &blob_index, &s.snapshot, &want, &mut cache).await?;
        if hits.is_empty() {
            continue;
        }
        holding.insert(s.id);
        let src = sources
            .entry(s.snapshot.source.clone())
            .or_insert_with(|| SourceHits {
                source: s.snapshot.source.clone(),
                ..Default::default()
            });
        src.snapshots.push(s.id.short());
        for (collection, _, r) in hits {
            if !seen.insert((s.snapshot.source.clone(), collection.clone(), r.id.clone())) {
                continue;
            }
            src.records += 1;
            *src.kinds.entry(r.kind.clone()).or_default() += 1;
            src.collections.insert(collection);
            if let Some(t) = r.created {
                src.first_contact = Some(src.first_contact.map_or(t, |f| f.min(t)));
                src.last_contact = Some(src.last_contact.map_or(t, |l| l.max(t)));
            }
        }
    }
    let mut targets = Vec::new();
    for t in repo.targets() {
        let names: BTreeSet<String> = t
            .list(&format!("{}/", ObjectKind::Snapshot.folder()))
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        targets.push(TargetHits {
            target: t.name().to_string(),
            snapshots: holding
                .iter()
                .filter(|id| names.contains(&ObjectKind::Snapshot.name(id)))
                .count(),
        });
    }
    let sources: Vec<SourceHits> = sources.into_values().collect();
    Ok(ShowReport {
        customer: customer.to_string(),
        identifiers: identifiers.iter().cloned().collect(),
        suppressed: want.iter().any(|k| suppressed.contains(k)),
        records: sources.iter().map(|s| s.records).sum(),
        first_contact: sources.iter().filter_map(|s| s.first_contact).min(),
        last_contact: sources.iter().filter_map(|s| s.last_contact).max(),
        sources,
        targets,
    })
}

// ---------------------------------------------------------------------------
// export

/// One exported record in the manifest.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestRecord {
    pub source: String,
    pub collection: String,
    pub record_id: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Path inside the export.
    pub file: String,
    pub size: u64,
    /// The content digest recorded at backup (keyed BLAKE3, hex), checked on export.
    pub digest: String,
    /// The snapshot the record was taken from.
    pub snapshot: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted_at_source: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<String>,
}

/// `manifest.json` of an export.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub customer: String,
    pub identifiers: Vec<String>,
    pub generated: DateTime<Utc>,
    pub records: Vec<ManifestRecord>,
}

/// What `customer export` did.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub out: String,
    pub records: u64,
    pub attachments: u64,
    pub bytes: u64,
    /// Records left out because they also name an erased (suppressed) customer.
    pub suppressed: u64,
}

/// Where export files go: a folder or a zip archive.
enum Sink {
    Dir(PathBuf),
    Zip(Box<zip::ZipWriter<std::fs::File>>, PathBuf),
}

impl Sink {
    fn open(out: &Path) -> Result<Sink> {
        if out
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
        {
            if out.exists() {
                return Err(Error::Invalid(format!(
                    "{}: exists; give a new file name",
                    out.display()
                )));
            }
            let f = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
            return Ok(Sink::Zip(
                Box::new(zip::ZipWriter::new(f)),
                out.to_path_buf(),
            ));
        }
        if out.exists()
            && std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_some()
        {
            return Err(Error::Invalid(format!(
                "{}: not empty; give a new or empty folder",
                out.display()
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        Ok(Sink::Dir(out.to_path_buf()))
    }

    fn write(&mut self, rel: &str, data: &[u8]) -> Result<()> {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(Error::Invalid(format!("refusing unsafe export path {rel}")));
        }
        match self {
            Sink::Dir(root) => {
                let dest = root.join(rel);
                if let Some(p) = dest.parent() {
                    std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
                }
                std::fs::write(&dest, data).map_err(|e| Error::io(&dest, e))
            }
            Sink::Zip(z, path) => {
                let opts = zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Deflated)
                    .large_file(data.len() as u64 >= u32::MAX as u64);
                z.start_file(rel, opts)
                    .map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?;
                z.write_all(data).map_err(|e| Error::io(path.clone(), e))
            }
        }
    }

    fn finish(self) -> Result<()> {
        match self {
            Sink::Dir(_) => Ok(()),
            Sink::Zip(z, path) => {
                let f = z
                    .finish()
                    .map_err(|e| Error::Failed(format!("{}: {e}", path.display())))?;
                f.sync_all().map_err(|e| Error::io(&path, e))
            }
        }
    }
}

/// A node's content, checked against the digest recorded at backup.
async fn content(repo: &Repository, index: &Index, node: &Node, what: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(node.size as usize);
    for b in &node.content {
        out.extend(repo.read_blob(index, BlobType::Data, b).await?);
    }
    if let Some(d) = node.digest {
        let mut h = repo.keys().digest_hasher();
        h.update(&out);
        if Id(*h.finalize().as_bytes()) != d {
            return Err(Error::Failed(format!(
                "{what}: content does not match the digest recorded at backup"
            )));
        }
    }
    Ok(out)
}

/// A file-name-safe rendering of a path component.
fn safe(c: &str) -> String {
    let s: String = c
        .chars()
        .map(|ch| {
            if ch == '/' || ch == '\\' || ch == '\0' {
                '_'
            } else {
                ch
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "_".into()
    } else {
        s
    }
}

/// Write every record naming the customer (newest version of each, from every
/// retained snapshot, or only from `snapshot`) to `out` (a folder, or a
/// `.zip` file): `records/<source>/<collection>/<record>` original payloads
/// (emails as `.eml`, chats, tickets and posts as their JSON), attachments
/// beside them, `manifest.json` and a readable `index.md`.
pub async fn export(
    repo: &Repository,
    customer: &str,
    identifiers: &BTreeSet<String>,
    snapshot: Option<&str>,
    out: &Path,
) -> Result<ExportReport> {
    repo.require(crate::crypto::Role::Restore, "customer export")?;
    let want = wanted(repo, identifiers);
    let suppressed = Suppressed::load(repo).await?;
    let (blob_index, _) = repo.load_index().await?;
    let mut snaps = record_snapshots(repo).await?;
    if let Some(spec) = snapshot {
        let mut all = snaps.clone();
        all.reverse();
        let one = crate::snapshot::find(&all, spec)?.clone();
        snaps = vec![one];
    }
    let mut sink = Sink::open(out)?;
    let mut cache: HashMap<Id, PartDoc> = HashMap::new();
    let mut trees: HashMap<Id, Vec<Node>> = HashMap::new();
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut manifest = Manifest {
        customer: customer.to_string(),
        identifiers: identifiers.iter().cloned().collect(),
        generated: Utc::now(),
        records: Vec::new(),
    };
    let mut report = ExportReport {
        out: out.display().to_string(),
        records: 0,
        attachments: 0,
        bytes: 0,
        suppressed: 0,
    };
    for s in &snaps {
        for (collection, tree, r) in
            records_of(repo, &blob_index, &s.snapshot, &want, &mut cache).await?
        {
            let key = (s.snapshot.source.clone(), collection.clone(), r.id.clone());
            if seen.contains(&key) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = trees.entry(tree) {
                e.insert(repo.load_tree(&blob_index, &tree).await?);
            }
            let Some(node) = trees[&tree]
                .iter()
                .find(|n| n.kind == NodeKind::Record && n.meta.get(keys::RECORD_ID) == Some(&r.id))
                .cloned()
            else {
                return Err(Error::corrupt(
                    format!("snapshot {} {collection}", s.id.short()),
                    format!(
                        "record {} is in the customer index but not in the tree",
                        r.id
                    ),
                ));
            };
            seen.insert(key);
            if suppressed.covers(repo.keys(), &s.snapshot.source, &node) {
                report.suppressed += 1;
                continue;
            }
            let dir = format!("records/{}/{}", safe(&s.snapshot.source), safe(&collection));
            let what = format!("{} {collection} record {}", s.snapshot.source, r.id);
            let data = content(repo, &blob_index, &node, &what).await?;
            let file = format!("{dir}/{}", safe(&node.name));
            sink.write(&file, &data)?;
            report.bytes += data.len() as u64;
            let mut attachments = Vec::new();
            if let Some(sub) = node.subtree {
                for a in repo.load_tree(&blob_index, &sub).await? {
                    if a.kind != NodeKind::Attachment {
                        continue;
                    }
                    let bytes = content(
                        repo,
                        &blob_index,
                        &a,
                        &format!("{what} attachment {}", a.name),
                    )
                    .await?;
                    let af = format!("{dir}/{}.attachments/{}", safe(&r.id), safe(&a.name));
                    sink.write(&af, &bytes)?;
                    report.bytes += bytes.len() as u64;
                    report.attachments += 1;
                    attachments.push(af);
                }
            }
            report.records += 1;
            manifest.records.push(ManifestRecord {
                source: s.snapshot.source.clone(),
                collection,
                record_id: r.id.clone(),
                kind: r.kind.clone(),
                created: node.meta.get(keys::CREATED).cloned(),
                subject: node.meta.get(keys::SUBJECT).cloned(),
                file,
                size: data.len() as u64,
                digest: node.digest.map(|d| d.to_hex()).unwrap_or_default(),
                snapshot: s.id.to_hex(),
                deleted_at_source: node.meta.get(keys::DELETED).is_some_and(|d| d == "true"),
                attachments,
            });
        }
    }
    manifest.records.sort_by(|a, b| {
        (&a.created, &a.source, &a.record_id).cmp(&(&b.created, &b.source, &b.record_id))
    });
    sink.write(
        "manifest.json",
        &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"),
    )?;
    sink.write("index.md", index_markdown(&manifest).as_bytes())?;
    sink.finish()?;
    Ok(report)
}

/// The human-readable index of an export.
fn index_markdown(m: &Manifest) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = format!(
        "# Records held on {}\n\nIdentifiers: {}  \nGenerated: {}  \nRecords: {}\n\n",
        cell(&m.customer),
        m.identifiers.join(", "),
        m.generated.to_rfc3339(),
        m.records.len()
    );
    out.push_str(
        "| created | source | kind | subject | file | attachments |\n|---|---|---|---|---|---|\n",
    );
    for r in &m.records {
        out.push_str(&format!(
            "| {} | {} | {} | {} | [{}]({}) | {} |\n",
            r.created.as_deref().unwrap_or(""),
            cell(&r.source),
            cell(&r.kind),
            cell(r.subject.as_deref().unwrap_or("")),
            cell(&r.record_id),
            r.file,
            r.attachments.len()
        ));
    }
    out.push_str(
        "\nEach record is its original: emails as `.eml` (RFC 822), chats, tickets and posts \
         as the JSON the source gave. `manifest.json` lists the same records with their \
         content digests.\n",
    );
    out
}

// ---------------------------------------------------------------------------
// erase

/// `erasures/<id>`: the record of one erasure.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureDoc {
    pub time: DateTime<Utc>,
    pub reason: String,
    /// Customer keys erased (never the identifiers).
    pub customers: Vec<String>,
    /// Record copies removed per source (once per snapshot holding them).
    pub removed: BTreeMap<String, u64>,
    /// Record copies kept because a legal hold covers them.
    pub held: u64,
    /// (old snapshot, new snapshot).
    pub snapshots: Vec<(Id, Id)>,
    /// Targets the rewritten snapshots were stored on.
    pub targets: Vec<String>,
    /// Blobs of the erased records (payload, attachment tree, attachments)
    /// and every blob of their old partition trees (a split tree's top blob
    /// and all its parts): every prune repacks a pack that still holds one
    /// unused, whatever the repack threshold, so no copy survives in a
    /// mostly-used pack.
    #[serde(default)]
    pub blobs: Vec<Id>,
    /// Objects an Object Lock kept (old snapshots, packs holding erased
    /// data) with their retain-until: the erasure completes when a retry
    /// after that deletes them ([`crate::erasures`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<crate::target::LockedObject>,
}

/// What `customer erase` did (or would do).
#[derive(Debug, Default, Serialize)]
pub struct EraseReport {
    pub dry_run: bool,
    pub customer: String,
    pub identifiers: Vec<String>,
    /// Record copies removed per source.
    pub removed: BTreeMap<String, u64>,
    /// Record copies kept under a legal hold, and the holds.
    pub held: u64,
    pub holds: Vec<String>,
    pub snapshots_rewritten: usize,
    pub targets: Vec<String>,
    pub suppression_entries: Vec<Id>,
    pub erasure_log: Option<Id>,
    /// The prune run(s) that deleted the data no snapshot references any more.
    pub prune: Vec<crate::prune::PruneReport>,
    /// Replaced snapshots (and packs) an Object Lock keeps, with their
    /// retain-until: the customer's data they hold stays until then; the
    /// erasure is pending, and a retry after that date completes it
    /// (`customer erase --retry-pending`, `prune`, the daemon's prune jobs).
    pub locked: Vec<crate::target::LockedObject>,
    /// A progress document listing locked packs (when no old snapshot was locked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Id>,
}

/// Remove every record naming the customer from every retained snapshot on
/// every target (legal holds win), suppress the customer, log the erasure,
/// then prune with `grace` (`None`: leave the deletion to the next prune).
pub async fn erase(
    repo: &Repository,
    customer: &str,
    identifiers: &BTreeSet<String>,
    reason: &str,
    dry_run: bool,
    grace: Option<std::time::Duration>,
) -> Result<EraseReport> {
    repo.require(crate::crypto::Role::Admin, "customer erase")?;
    if reason.trim().is_empty() {
        return Err(Error::Invalid("customer erase needs --reason".into()));
    }
    if !repo.unreachable().is_empty() {
        return Err(Error::Failed(format!(
            "every target must take part in an erasure; unreachable: {}",
            repo.unreachable()
                .iter()
                .map(|(t, e)| format!("{t}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let want = wanted(repo, identifiers);
    let holds = active_holds(repo).await?;
    let snaps = record_snapshots(repo).await?;
    let now = Utc::now();
    let mut report = EraseReport {
        dry_run,
        customer: customer.to_string(),
        identifiers: identifiers.iter().cloned().collect(),
        targets: repo
            .targets()
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
        ..Default::default()
    };
    // The ledger first: from now on nothing brings the customer back, even
    // if the rewrite below is interrupted.
    if !dry_run {
        for k in &want {
            let id = crate::customer::write_suppression(
                repo,
                &SuppressionDoc {
                    customer: k.clone(),
                    action: SuppressionAction::Suppress,
                    time: now,
                    reason: reason.to_string(),
                },
            )
            .await?;
            report.suppression_entries.push(id);
        }
    }
    let session = if dry_run {
        None
    } else {
        Some(Session::start(repo, Arc::new(Progress::default())).await?)
    };
    let (blob_index, _) = repo.load_index().await?;
    let saver = session.as_ref().map(|s| s.saver());
    let keys = repo.keys().clone();
    let mut removed: BTreeMap<String, u64> = BTreeMap::new();
    let mut held = 0u64;
    let mut held_by: BTreeSet<String> = BTreeSet::new();
    let mut rewritten = Vec::new();
    // Blobs of erased records and the partition trees that listed them: the
    // prune below repacks whatever pack still holds one, whatever its share.
    let mut purge: std::collections::HashSet<Id> = std::collections::HashSet::new();
    // Trees whose every blob goes too: erased records' attachment trees and
    // the old partition trees (a split tree is a top blob and its parts).
    let mut gone_trees: BTreeSet<Id> = BTreeSet::new();
    for s in &snaps {
        let mut filter = |snap: &Snapshot, coll: &str, nodes: Vec<Node>| {
            let mut kept = Vec::with_capacity(nodes.len());
            let mut n_removed = 0;
            for n in nodes {
                let names = n.kind == NodeKind::Record
                    && crate::customer::node_keys(&keys, &n)
                        .iter()
                        .any(|k| want.contains(k));
                if !names {
                    kept.push(n);
                    continue;
                }
                let covering: Vec<&str> = holds
                    .iter()
                    .filter(|h| h.covers(&snap.source, coll, &n))
                    .map(|h| h.name.as_str())
                    .collect();
                if covering.is_empty() {
                    purge.extend(n.content.iter().copied());
                    gone_trees.extend(n.subtree);
                    n_removed += 1;
                    *removed.entry(snap.source.clone()).or_default() += 1;
                } else {
                    held += 1;
                    held_by.extend(covering.iter().map(|h| h.to_string()));
                    kept.push(n);
                }
            }
            (kept, n_removed)
        };
        let old_parts = crate::customer::partitions(repo, &blob_index, &s.snapshot.tree).await?;
        if let Some(r) =
            rewrite(repo, &blob_index, saver.as_ref(), &s.snapshot, &mut filter).await?
        {
            report.snapshots_rewritten += 1;
            let kept: BTreeSet<Id> = r.parts.iter().map(|p| p.tree).collect();
            gone_trees.extend(
                old_parts
                    .iter()
                    .map(|p| p.tree)
                    .filter(|t| !kept.contains(t)),
            );
            if let Some(tree) = r.tree {
                let mut new = s.snapshot.clone();
                new.tree = tree;
                new.summary.records_total = new.summary.records_total.saturating_sub(r.removed);
                rewritten.push((s.id, new, r.parts));
            }
        }
    }
    // Every blob of those trees: prune forces out the ones no snapshot uses
    // any more (parts a new split tree shares stay, being used).
    for t in gone_trees {
        purge.extend(tree_blobs(repo, &blob_index, &t).await?);
    }
    report.removed = removed;
    report.held = held;
    report.holds = held_by.into_iter().collect();
    drop(saver);
    let Some(session) = session else {
        return Ok(report);
    };
    let pairs = if rewritten.is_empty() {
        session.abandon().await;
        Vec::new()
    } else {
        let (pairs, locked) = replace_snapshots(repo, session, rewritten, "customer erase").await?;
        report.locked = locked;
        pairs
    };
    let doc = ErasureDoc {
        time: now,
        reason: reason.to_string(),
        customers: want.iter().cloned().collect(),
        removed: report.removed.clone(),
        held: report.held,
        snapshots: pairs,
        targets: report.targets.clone(),
        blobs: purge.iter().copied().collect(),
        pending: report.locked.clone(),
    };
    let (id, results) = repo
        .save_object(repo.targets(), ObjectKind::Erasure, &doc)
        .await;
    for r in results {
        r?;
    }
    report.erasure_log = Some(id);
    if let Some(grace) = grace {
        let opts = crate::prune::PruneOptions {
            grace,
            ..Default::default()
        };
        report.prune.push(crate::prune::prune(repo, &opts).await?);
        // A zero grace period: the packs marked just now may go at once.
        if grace.is_zero() {
            report.prune.push(crate::prune::prune(repo, &opts).await?);
        }
    }
    // Packs a lock keeps although no old snapshot is locked: pending too.
    report.progress = crate::erasures::after_replace(
        repo,
        crate::erasures::Tracked::Erasure,
        id,
        &doc.pending,
        &doc.blobs,
        Utc::now(),
    )
    .await?;
    if report.progress.is_some() {
        report.locked = crate::erasures::statuses(repo)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| s.pending)
            .unwrap_or_default();
    }
    Ok(report)
}

/// Every blob of the tree `id`: the top blob, the parts of a split tree,
/// and the content of attachment nodes (and their attachment trees).
pub(crate) async fn tree_blobs(repo: &Repository, index: &Index, id: &Id) -> Result<Vec<Id>> {
    let mut out = Vec::new();
    let mut stack = vec![*id];
    while let Some(t) = stack.pop() {
        out.push(t);
        let plain = repo.read_blob(index, BlobType::Tree, &t).await?;
        match crate::tree::parse_tree(&t, &plain)? {
            crate::tree::TreeDoc::Split { parts } => stack.extend(parts.iter().map(|p| p.tree)),
            crate::tree::TreeDoc::Leaf { nodes } => {
                for n in nodes.iter().filter(|n| n.kind == NodeKind::Attachment) {
                    out.extend(n.content.iter().copied());
                    stack.extend(n.subtree);
                }
            }
        }
    }
    Ok(out)
}

/// The erasure log (the erasure records, without their progress
/// documents), oldest first.
pub async fn erasure_log(repo: &Repository) -> Result<Vec<(Id, ErasureDoc)>> {
    Ok(crate::erasures::load_all(repo).await?.0)
}

/// Lift the suppression of a customer (later backups store their records again).
pub async fn lift(
    repo: &Repository,
    identifiers: &BTreeSet<String>,
    reason: &str,
) -> Result<Vec<Id>> {
    repo.require(crate::crypto::Role::Admin, "customer lift")?;
    if reason.trim().is_empty() {
        return Err(Error::Invalid("customer lift needs --reason".into()));
    }
    let suppressed = Suppressed::load(repo).await?;
    let mut ids = Vec::new();
    for k in wanted(repo, identifiers) {
        if !suppressed.contains(&k) {
            continue;
        }
        ids.push(
            crate::customer::write_suppression(
                repo,
                &SuppressionDoc {
                    customer: k,
                    action: SuppressionAction::Lift,
                    time: Utc::now(),
                    reason: reason.to_string(),
                },
            )
            .await?,
        );
    }
    if ids.is_empty() {
        return Err(Error::Invalid(
            "the customer is not in the suppression ledger".into(),
        ));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasures::tests::{backup_lines, hits, line, repo_on};
    use crate::target::store::StoreTarget;
    use crate::target::TargetRef;
    use crate::tree::{parse_tree, TreeDoc};

    const CANARY: &str = "CANARY-ANA-SPLIT";

    /// The part blobs of a split partition tree, with the record names of each.
    async fn parts_of(repo: &Repository, snap: &Snapshot) -> Vec<(Id, Vec<String>)> {
        let (index, _) = repo.load_index().await.unwrap();
        let parts = crate::customer::partitions(repo, &index, &snap.tree)
            .await
            .unwrap();
        assert_eq!(parts.len(), 1, "one partition");
        let plain = repo
            .read_blob(&index, BlobType::Tree, &parts[0].tree)
            .await
            .unwrap();
        let TreeDoc::Split { parts } = parse_tree(&parts[0].tree, &plain).unwrap() else {
            panic!("the partition is not split");
        };
        let mut out = Vec::new();
        for p in parts {
            let nodes = repo.load_tree(&index, &p.tree).await.unwrap();
            out.push((p.tree, nodes.into_iter().map(|n| n.name).collect()));
        }
        out
    }

    /// A partition of more than 1000 records is a split tree; erasing a
    /// record must force out the old part blob that held it (and the old top
    /// blob), even when they sit in a pack that is mostly still used and the
    /// top blob is elsewhere.
    #[tokio::test]
    async fn erase_forces_out_every_old_part_of_a_split_partition() {
        let t: TargetRef = Arc::new(StoreTarget::memory("m"));
        let repo = repo_on(t.clone()).await;
        let dir = tempfile::tempdir().unwrap();
        let mut lines = vec![line("a0001", "ana@example.org", CANARY)];
        lines.extend((0..3000).map(|i| line(&format!("r{i:05}"), "bo@example.org", "bo")));
        backup_lines(&repo, dir.path(), &lines).await;
        // A second backup changes one record at the far end: its part, the
        // top blob, collection and root are new (another pack); Ana's part
        // stays in the first pack, with most other parts.
        let last = lines.len() - 1;
        lines[last] = line("r02999", "bo@example.org", "bo, edited");
        backup_lines(&repo, dir.path(), &lines).await;
        let (snaps, _) = repo.snapshots().await.unwrap();
        assert_eq!(snaps.len(), 2);
        let (first, second) = if snaps[0].snapshot.time < snaps[1].snapshot.time {
            (&snaps[0], &snaps[1])
        } else {
            (&snaps[1], &snaps[0])
        };
        let parts = parts_of(&repo, &second.snapshot).await;
        assert!(parts.len() >= 2, "{} part(s)", parts.len());
        let ana_part = parts
            .iter()
            .find(|(_, names)| names.iter().any(|n| n.starts_with("a0001")))
            .unwrap()
            .0;
        assert!(!parts
            .last()
            .unwrap()
            .1
            .iter()
            .any(|n| n.starts_with("a0001")));
        // The first snapshot goes (its top blob is then unused, but no
        // erasure names it).
        let removal = crate::forget::remove(&repo, &[first.id]).await.unwrap();
        assert!(removal.failures.is_empty());
        let before = hits(&repo, &t, CANARY.as_bytes()).await;
        assert!(
            before.iter().any(|h| h.ends_with(&ana_part.to_hex())),
            "the canary is in Ana's part blob: {before:?}"
        );

        let ana: BTreeSet<String> = ["email:ana@example.org".to_string()].into_iter().collect();
        let r = erase(
            &repo,
            "ana",
            &ana,
            "request",
            false,
            Some(std::time::Duration::ZERO),
        )
        .await
        .unwrap();
        assert_eq!(r.removed.get("chat"), Some(&1));
        let log = erasure_log(&repo).await.unwrap();
        assert!(
            log[0].1.blobs.contains(&ana_part),
            "the old part holding the record is in the erasure's blobs"
        );
        assert_eq!(
            hits(&repo, &t, CANARY.as_bytes()).await,
            Vec::<String>::new()
        );
        // Everything else is intact.
        let bo: BTreeSet<String> = ["email:bo@example.org".to_string()].into_iter().collect();
        assert_eq!(show(&repo, "bo", &bo).await.unwrap().records, 3000);
        let report = crate::check::check(&repo, crate::check::ReadData::All)
            .await
            .unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
}
