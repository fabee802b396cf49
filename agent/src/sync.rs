//! `sync`: make every target hold every object that any target holds.
//!
//! Objects are immutable and named by the hash of their bytes, so copying is
//! safe at any time, even while backups run: a copy is verified against its
//! name before it is written, and a create-only write of an object that
//! appeared meanwhile is a no-op. Order per target: keys, data packs, tree
//! packs, index objects, snapshots newest first — so a target never holds an
//! index object whose packs it lacks, nor a snapshot whose index it lacks. A
//! target whose copy fails stops there (it stays consistent, just behind).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt;

use crate::error::Result;
use crate::id::Id;
use crate::object::ObjectKind;
use crate::repo::Repository;
use crate::snapshot::Snapshot;
use crate::target::TargetRef;

/// Folders that replicate, in copy order.
const FOLDERS: [&str; 14] = [
    "keys/",
    // Before data/: a data pack is never on a target without its data key.
    "datakeys/",
    "data/",
    "tree/",
    "index/",
    // Before snapshots: a snapshot names its customer index.
    "customers/",
    "snapshots/",
    "marks/",
    "verifications/",
    "holds/",
    "disposals/",
    "suppressions/",
    "erasures/",
    "audit/",
];
/// Folders compared by the quick check: when they agree, the packs do too
/// (an index object is only ever written after its packs).
const QUICK: [&str; 12] = [
    "keys/",
    "datakeys/",
    "index/",
    "customers/",
    "snapshots/",
    "marks/",
    "verifications/",
    "holds/",
    "disposals/",
    "suppressions/",
    "erasures/",
    "audit/",
];
/// Objects copied concurrently per target.
const COPY_CONCURRENCY: usize = 4;

/// What a sync did per target.
#[derive(Debug, Default, serde::Serialize)]
pub struct SyncReport {
    /// (target, objects copied, bytes copied) for every target that received objects.
    pub copied: Vec<(String, usize, u64)>,
    /// (target, error) for every target that could not be brought up to date.
    pub failed: Vec<(String, String)>,
}

impl SyncReport {
    /// Was `target` left behind?
    pub fn failed_target(&self, target: &str) -> bool {
        self.failed.iter().any(|(t, _)| t == target)
    }
}

type Listing = BTreeSet<String>;

async fn list_folders(t: &TargetRef, folders: &[&str]) -> Result<Listing> {
    let mut names = Listing::new();
    for f in folders {
        names.extend(t.list(f).await?.into_iter().map(|m| m.name));
    }
    Ok(names)
}

/// The hash id at the end of an object name.
fn name_id(name: &str) -> Option<Id> {
    // `audit/<seq>-<hash>`: the hash follows the sequence number.
    let last = name.rsplit('/').next()?;
    Id::from_hex(last.rsplit('-').next()?)
}

/// Copy what is missing where. With `quick`, targets whose key, index and
/// snapshot listings already agree are not listed further.
pub async fn sync(repo: &Repository, quick: bool) -> Result<SyncReport> {
    let targets = repo.targets();
    let mut report = SyncReport::default();
    if targets.len() < 2 {
        return Ok(report);
    }
    let folders: &[&str] = if quick { &QUICK } else { &FOLDERS };
    let mut listings: Vec<Option<Listing>> = Vec::new();
    for t in targets {
        match list_folders(t, folders).await {
            Ok(l) => listings.push(Some(l)),
            Err(e) => {
                report.failed.push((t.name().to_string(), e.to_string()));
                listings.push(None);
            }
        }
    }
    let ok: Vec<&Listing> = listings.iter().flatten().collect();
    if quick && ok.windows(2).all(|w| w[0] == w[1]) {
        return Ok(report);
    }
    if quick {
        // Something differs: list everything (packs too) on the reachable targets.
        for (t, l) in targets.iter().zip(listings.iter_mut()) {
            if l.is_some() {
                match list_folders(t, &FOLDERS).await {
                    Ok(full) => *l = Some(full),
                    Err(e) => {
                        report.failed.push((t.name().to_string(), e.to_string()));
                        *l = None;
                    }
                }
            }
        }
    }
    // Who holds what.
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, l) in listings.iter().enumerate() {
        for name in l.iter().flatten() {
            holders.entry(name.clone()).or_default().push(i);
        }
    }
    let order = copy_order(repo, &holders).await;
    for (i, t) in targets.iter().enumerate() {
        let Some(have) = &listings[i] else { continue };
        let missing: Vec<&String> = order.iter().filter(|n| !have.contains(*n)).collect();
        if missing.is_empty() {
            continue;
        }
        match copy_to(targets, t, &missing, &holders).await {
            Ok((n, bytes)) => report.copied.push((t.name().to_string(), n, bytes)),
            Err((n, bytes, e)) => {
                if n > 0 {
                    report.copied.push((t.name().to_string(), n, bytes));
                }
                report.failed.push((t.name().to_string(), e));
            }
        }
    }
    Ok(report)
}

/// Every object name in copy order: folders in [`FOLDERS`] order, snapshots newest first.
async fn copy_order(repo: &Repository, holders: &BTreeMap<String, Vec<usize>>) -> Vec<String> {
    let mut order = Vec::new();
    for f in FOLDERS {
        let names: Vec<&String> = holders.keys().filter(|n| n.starts_with(f)).collect();
        if f == "snapshots/" {
            let mut timed: Vec<(Option<chrono::DateTime<chrono::Utc>>, &String)> = Vec::new();
            for n in names {
                let time = match name_id(n) {
                    Some(id) => repo
                        .load_object::<Snapshot>(ObjectKind::Snapshot, &id)
                        .await
                        .ok()
                        .map(|s| s.time),
                    None => None,
                };
                timed.push((time, n));
            }
            timed.sort_by_key(|t| std::cmp::Reverse(t.0));
            order.extend(timed.into_iter().map(|(_, n)| n.clone()));
        } else {
            order.extend(names.into_iter().cloned());
        }
    }
    order
}

/// Copy `missing` (in order) to `dest`; stops at the first failure, returning
/// what was copied and the error.
async fn copy_to(
    targets: &[TargetRef],
    dest: &TargetRef,
    missing: &[&String],
    holders: &BTreeMap<String, Vec<usize>>,
) -> std::result::Result<(usize, u64), (usize, u64, String)> {
    let (mut n, mut bytes) = (0usize, 0u64);
    // Folder by folder, so an index object never lands before its packs.
    let mut by_folder: HashMap<&str, Vec<&String>> = HashMap::new();
    for m in missing {
        let folder = FOLDERS
            .iter()
            .find(|f| m.starts_with(**f))
            .copied()
            .unwrap_or("");
        by_folder.entry(folder).or_default().push(m);
    }
    for f in FOLDERS {
        let Some(names) = by_folder.get(f) else {
            continue;
        };
        let results: Vec<std::result::Result<u64, String>> = futures::stream::iter(names.iter())
            .map(|name| {
                copy_one(
                    targets,
                    dest,
                    name,
                    holders.get(*name).map(|v| v.as_slice()).unwrap_or(&[]),
                )
            })
            .buffered(if f == "snapshots/" {
                1
            } else {
                COPY_CONCURRENCY
            })
            .collect()
            .await;
        for r in results {
            match r {
                Ok(b) => {
                    n += 1;
                    bytes += b;
                }
                Err(e) => return Err((n, bytes, e)),
            }
        }
    }
    Ok((n, bytes))
}

async fn copy_one(
    targets: &[TargetRef],
    dest: &TargetRef,
    name: &str,
    holders: &[usize],
) -> std::result::Result<u64, String> {
    let want = name_id(name).ok_or_else(|| format!("{name}: not a content-addressed name"))?;
    let mut last = format!("{name}: no target holds a copy");
    for &h in holders {
        match targets[h].get(name).await {
            Ok(data) if Id::of_object(&data) == want => {
                let len = data.len() as u64;
                return dest
                    .put_new(name, data)
                    .await
                    .map(|_| len)
                    .map_err(|e| e.to_string());
            }
            Ok(_) => {
                last = format!(
                    "{name} on target {}: bytes do not hash to the name",
                    targets[h].name()
                );
                tracing::warn!(
                    object = name,
                    target = targets[h].name(),
                    "damaged copy; trying another target"
                );
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// What `check --repair-from` did on one target.
#[derive(Debug, Default, serde::Serialize)]
pub struct RepairReport {
    pub target: String,
    /// Objects copied because the target lacked them.
    pub copied: Vec<String>,
    /// Objects rewritten because the target's copy was damaged (wrong size or hash).
    pub replaced: Vec<String>,
    pub errors: Vec<String>,
}

/// Replace what `dest` lacks or holds damaged with verified copies from `source`.
/// With `read_data` every object on `dest` is downloaded and hashed; without,
/// only missing objects and wrong sizes are found.
pub async fn repair_from(
    source: &TargetRef,
    dest: &TargetRef,
    read_data: bool,
) -> Result<RepairReport> {
    let mut report = RepairReport {
        target: dest.name().to_string(),
        ..Default::default()
    };
    for folder in FOLDERS {
        let theirs = source.list(folder).await?;
        let ours: HashMap<String, u64> = dest
            .list(folder)
            .await?
            .into_iter()
            .map(|m| (m.name, m.size))
            .collect();
        for m in theirs {
            let Some(want) = name_id(&m.name) else {
                continue;
            };
            let damaged = match ours.get(&m.name) {
                None => false,
                Some(size) if *size != m.size => true,
                Some(_) if read_data => match dest.get(&m.name).await {
                    Ok(bytes) => Id::of_object(&bytes) != want,
                    Err(_) => true,
                },
                Some(_) => continue,
            };
            if !damaged && ours.contains_key(&m.name) {
                continue;
            }
            let good = match source.get(&m.name).await {
                Ok(b) if Id::of_object(&b) == want => b,
                Ok(_) => {
                    report.errors.push(format!(
                        "{} on {}: the source copy is damaged too",
                        m.name,
                        source.name()
                    ));
                    continue;
                }
                Err(e) => {
                    report.errors.push(e.to_string());
                    continue;
                }
            };
            let r = if damaged {
                dest.overwrite(&m.name, good).await.map(|_| ())
            } else {
                dest.put_new(&m.name, good).await.map(|_| ())
            };
            match r {
                Ok(()) if damaged => report.replaced.push(m.name),
                Ok(()) => report.copied.push(m.name),
                Err(e) => report.errors.push(e.to_string()),
            }
        }
    }
    Ok(report)
}

/// Per-target inventory for `custos targets`.
#[derive(Debug, Default, serde::Serialize)]
pub struct TargetStatus {
    pub target: String,
    pub location: String,
    pub reachable: bool,
    pub error: Option<String>,
    pub snapshots: usize,
    pub objects: usize,
    pub bytes: u64,
    /// Objects other targets hold and this one lacks.
    pub missing: usize,
    /// Objects only this target holds.
    pub extra: usize,
}

/// Bytes stored in `target` (every repository folder listed).
pub async fn stored_bytes(target: &TargetRef) -> Result<u64> {
    let mut total = 0;
    for f in FOLDERS {
        total += target.list(f).await?.iter().map(|m| m.size).sum::<u64>();
    }
    Ok(total)
}

/// List every target and compare their objects.
pub async fn status(repo: &Repository) -> Vec<TargetStatus> {
    let mut rows = Vec::new();
    let mut listings: Vec<Option<BTreeSet<String>>> = Vec::new();
    for t in repo.targets() {
        let mut row = TargetStatus {
            target: t.name().to_string(),
            location: t.location().to_string(),
            ..Default::default()
        };
        let mut names = BTreeSet::new();
        let mut ok = true;
        for f in FOLDERS {
            match t.list(f).await {
                Ok(list) => {
                    for m in list {
                        row.objects += 1;
                        row.bytes += m.size;
                        if f == "snapshots/" {
                            row.snapshots += 1;
                        }
                        names.insert(m.name);
                    }
                }
                Err(e) => {
                    row.error = Some(e.to_string());
                    ok = false;
                    break;
                }
            }
        }
        row.reachable = ok;
        listings.push(ok.then_some(names));
        rows.push(row);
    }
    for (i, row) in rows.iter_mut().enumerate() {
        let Some(mine) = &listings[i] else { continue };
        let others: Vec<&BTreeSet<String>> = listings
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .filter_map(|(_, l)| l.as_ref())
            .collect();
        row.missing = others
            .iter()
            .flat_map(|o| o.iter())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|n| !mine.contains(*n))
            .count();
        row.extra = mine
            .iter()
            .filter(|n| !others.iter().any(|o| o.contains(*n)))
            .count();
    }
    for (name, e) in repo.unreachable() {
        rows.push(TargetStatus {
            target: name.clone(),
            error: Some(e.clone()),
            ..Default::default()
        });
    }
    rows
}
